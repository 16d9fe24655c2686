//! `cargo bench -p tessera-crypto`: the figures of docs/benchmarks.md.
//!
//! * `ed25519_sign`: a signature over 1 KiB by `SigningKey` (which keeps
//!   only the seed and rebuilds ring's key pair for each signature, so no
//!   un-wipeable expanded key lives on) beside ring signing with a key pair
//!   built once.
//! * `key_wrap`: one HPKE key wrap (Tessera's per-recipient cost) beside
//!   ring's X25519 ephemeral agreement (generate + public key + agree).
//! * `envelope`: seal and open of a 1 KiB message for 1, 10, 100, 1000 cards.
//! * `stream`: 100 MiB through the file stream beside ring's raw AES-256-GCM
//!   over the same 100 MiB buffer (in place, and with the one copy into an
//!   output buffer that any Read -> Write pipeline makes), a bare memcpy, and
//!   the copy through a 64 KiB buffer alone (a Read -> Write stream's floor).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519},
    rand::SystemRandom,
};
use tessera_crypto::{
    DeviceKeys, EncryptionPublicKey,
    envelope::{self, Draft, ExpectedSender, Opener, ParsedEnvelope, Recipient, Sender},
    hazmat,
    stream::{self, FileKey},
};

fn ed25519_sign(c: &mut Criterion) {
    use ring::signature::Ed25519KeyPair;
    let mut g = c.benchmark_group("ed25519_sign_1KiB");
    let seed = [7u8; 32];
    let message = vec![0x61u8; 1024];
    let key = tessera_crypto::SigningKey::from_seed(&seed).unwrap();
    g.bench_function("tessera_signing_key", |b| {
        b.iter(|| hazmat::ed25519_sign(&key, black_box(&message)))
    });
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    g.bench_function("ring_keypair_built_once", |b| {
        b.iter(|| pair.sign(black_box(&message)))
    });
    g.finish();
}

fn key_wrap(c: &mut Criterion) {
    let mut g = c.benchmark_group("key_wrap");
    let recipient = DeviceKeys::generate().unwrap();
    let pk = recipient.encryption.public_key();
    let card_id = [7u8; 32];
    let content_key = [9u8; 32];
    g.bench_function("tessera_hpke_wrap", |b| {
        b.iter(|| hazmat::wrap_content_key(black_box(&pk), &card_id, &content_key).unwrap())
    });
    let rng = SystemRandom::new();
    let peer = UnparsedPublicKey::new(&X25519, *pk.as_bytes());
    g.bench_function("ring_x25519_ephemeral_agreement", |b| {
        b.iter(|| {
            let private = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
            let public = private.compute_public_key().unwrap();
            let shared = agreement::agree_ephemeral(private, black_box(&peer), |s| {
                let mut out = [0u8; 32];
                out.copy_from_slice(s);
                out
            })
            .unwrap();
            (public, shared)
        })
    });
    g.finish();
}

struct Device {
    card_id: [u8; 32],
    keys: DeviceKeys,
    public: EncryptionPublicKey,
}

fn envelope_seal_open(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope_1KiB");
    g.sample_size(20);
    let sender = DeviceKeys::generate().unwrap();
    let sender_card = [0xAAu8; 32];
    let vk = sender.signing.verifying_key();
    let body = vec![0x42u8; 1024];
    for n in [1usize, 10, 100, 1000] {
        let devices: Vec<Device> = (0..n)
            .map(|i| {
                let keys = DeviceKeys::generate().unwrap();
                let public = keys.encryption.public_key();
                let mut card_id = [0u8; 32];
                card_id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                Device {
                    card_id,
                    keys,
                    public,
                }
            })
            .collect();
        let recipients: Vec<Recipient<'_>> = devices
            .iter()
            .map(|d| Recipient {
                card_id: d.card_id,
                key: &d.public,
            })
            .collect();
        let from = Sender {
            identity: "alice",
            card_id: sender_card,
            key: &sender.signing,
        };
        let draft = Draft {
            channel_id: "bench",
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: &body,
            sent_at_ms: 0,
        };
        g.bench_with_input(BenchmarkId::new("seal", n), &n, |b, _| {
            b.iter(|| envelope::seal(&from, &draft, black_box(&recipients)).unwrap())
        });
        let sealed = envelope::seal(&from, &draft, &recipients).unwrap();
        let me = &devices[n / 2];
        g.bench_with_input(BenchmarkId::new("open", n), &n, |b, _| {
            b.iter(|| {
                ParsedEnvelope::parse(black_box(&sealed.envelope))
                    .unwrap()
                    .open(
                        &Opener {
                            card_id: me.card_id,
                            secret: &me.keys.encryption,
                        },
                        &ExpectedSender {
                            identity: "alice",
                            card_id: sender_card,
                            key: &vk,
                        },
                    )
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn stream_100mib(c: &mut Criterion) {
    const SIZE: usize = 100 * 1024 * 1024;
    let mut g = c.benchmark_group("stream_100MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    let data: Vec<u8> = (0..SIZE).map(|i| i as u8).collect();
    let key = FileKey::generate().unwrap();

    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[3u8; 32]).unwrap());
    let mut raw = data.clone();
    raw.reserve(16);
    g.bench_function("ring_raw_aes256gcm_seal", |b| {
        b.iter(|| {
            raw.truncate(SIZE);
            ring_key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key([0u8; 12]),
                    Aad::empty(),
                    &mut raw,
                )
                .unwrap();
        })
    });
    let mut sealed_raw = data.clone();
    ring_key
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::empty(),
            &mut sealed_raw,
        )
        .unwrap();
    // In-place open destroys its input, so each run gets a fresh copy made
    // outside the timed part.
    g.bench_function("ring_raw_aes256gcm_open", |b| {
        b.iter_batched_ref(
            || sealed_raw.clone(),
            |work| {
                ring_key
                    .open_in_place(Nonce::assume_unique_for_key([0u8; 12]), Aad::empty(), work)
                    .unwrap()
                    .len()
            },
            BatchSize::PerIteration,
        )
    });

    // The least any Read -> Write pipeline does: one copy into the output,
    // then AES-256-GCM in place there.
    let mut copy_out = vec![0u8; SIZE];
    g.bench_function("memcpy", |b| {
        b.iter(|| copy_out.copy_from_slice(black_box(&data)))
    });
    let mut copy_out = Vec::with_capacity(SIZE + 16);
    g.bench_function("ring_raw_aes256gcm_seal_copy_out", |b| {
        b.iter(|| {
            copy_out.clear();
            copy_out.extend_from_slice(black_box(&data));
            ring_key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key([0u8; 12]),
                    Aad::empty(),
                    &mut copy_out,
                )
                .unwrap();
        })
    });

    // What any Read -> Write stream costs before its cryptography: the
    // input copied through a 64 KiB buffer into the output.
    let mut out = Vec::with_capacity(SIZE + SIZE / 1000 + 4096);
    g.bench_function("read_write_copy_only", |b| {
        b.iter(|| {
            out.clear();
            let mut reader = black_box(data.as_slice());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        })
    });
    g.bench_function("tessera_stream_encrypt", |b| {
        b.iter(|| {
            out.clear();
            stream::encrypt(&key, black_box(data.as_slice()), &mut out).unwrap()
        })
    });
    let mut ciphertext = Vec::new();
    stream::encrypt(&key, data.as_slice(), &mut ciphertext).unwrap();
    let mut plain = Vec::with_capacity(SIZE);
    g.bench_function("tessera_stream_decrypt", |b| {
        b.iter(|| {
            plain.clear();
            stream::decrypt(&key, black_box(ciphertext.as_slice()), &mut plain).unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    ed25519_sign,
    key_wrap,
    envelope_seal_open,
    stream_100mib
);
criterion_main!(benches);
