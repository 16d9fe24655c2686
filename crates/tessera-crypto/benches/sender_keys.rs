//! `cargo bench -p tessera-crypto --bench sender_keys`: sender keys beside
//! per-device sealing, the figures of docs/benchmarks.md ("Sender keys").
//!
//! * `message_1KiB/{per_device,sender_key}_{seal,open}/N`: one message with
//!   a 1 KiB body to a channel of N devices. Per-device sealing wraps the
//!   content key for each of the N cards (HPKE); a sender-key message is
//!   one ratchet step, one signature and one AES-GCM seal whatever N is.
//!   Opening is one HPKE unwrap + AES-GCM + signature check against one
//!   ratchet step + commitment + AES-GCM + signature check.
//! * `epoch_change/distribute/N`: what a sender pays when an epoch starts:
//!   one signed, HPKE-sealed copy of its chain key per device (on several
//!   threads), and `epoch_change/open_copy`: one device opening its copy.
//!
//! The envelope sizes are printed once at the start.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code: a failed unwrap is a failed test; the sizes go to stderr"
)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use tessera_crypto::{
    DeviceKeys, EncryptionPublicKey, VerifyingKey,
    envelope::{
        self, CONTENT_TYPE_TEXT, Draft, Epoch, ExpectedSender, Opener, ParsedEnvelope, Recipient,
        Sender,
    },
    sender_key::{
        ChainKey, ExpectedChannel, GroupDraft, ParsedDistribution, ParsedGroupEnvelope,
        ReceiverChain, Retention, SenderChain,
    },
};

const CHANNEL: &str = "0123456789abcdef0123456789abcdef";
const EPOCH: Epoch = Epoch {
    number: 7,
    hash: [0x77; 32],
};
const SIZES: [usize; 3] = [2, 100, 1000];

struct Device {
    card_id: [u8; 32],
    keys: DeviceKeys,
    public: EncryptionPublicKey,
}

fn devices(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| {
            let keys = DeviceKeys::generate().unwrap();
            let mut card_id = [0u8; 32];
            card_id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Device {
                card_id,
                public: keys.encryption.public_key(),
                keys,
            }
        })
        .collect()
}

fn recipients(devices: &[Device]) -> Vec<Recipient<'_>> {
    devices
        .iter()
        .map(|d| Recipient {
            card_id: d.card_id,
            key: &d.public,
        })
        .collect()
}

fn opener(d: &Device) -> Opener<'_> {
    Opener {
        card_id: d.card_id,
        secret: &d.keys.encryption,
    }
}

fn chain(sender: &Sender<'_>) -> SenderChain {
    SenderChain::with(sender, CHANNEL, EPOCH, ChainKey::from_bytes([0x5c; 32]), 0)
}

fn receiver(
    chain: &SenderChain,
    sender: &Sender<'_>,
    me: &Device,
    from: &ExpectedSender<'_>,
) -> ReceiverChain {
    let copy = chain
        .distribute(
            sender,
            &[Recipient {
                card_id: me.card_id,
                key: &me.public,
            }],
            0,
        )
        .unwrap()
        .remove(0);
    ParsedDistribution::parse(&copy.distribution)
        .unwrap()
        .open(
            &opener(me),
            from,
            &ExpectedChannel {
                channel_id: CHANNEL,
                epoch: EPOCH,
            },
            Retention::ForwardSecret,
        )
        .unwrap()
}

/// The sending device, card id `[0xaa; 32]`.
struct Alice {
    keys: DeviceKeys,
    vk: VerifyingKey,
}

impl Alice {
    fn new() -> Self {
        let keys = DeviceKeys::generate().unwrap();
        let vk = keys.signing.verifying_key();
        Self { keys, vk }
    }

    fn sender(&self) -> Sender<'_> {
        Sender {
            identity: "alice",
            card_id: [0xaa; 32],
            key: &self.keys.signing,
        }
    }

    fn expected(&self) -> ExpectedSender<'_> {
        ExpectedSender {
            identity: "alice",
            card_id: [0xaa; 32],
            key: &self.vk,
        }
    }
}

fn message_1kib(c: &mut Criterion) {
    let alice = Alice::new();
    let (sender, from) = (alice.sender(), alice.expected());
    let body = vec![0x61u8; 1024];
    let draft = Draft {
        channel_id: CHANNEL,
        content_type: CONTENT_TYPE_TEXT,
        body: &body,
        sent_at_ms: 1_700_000_000_000,
        epoch: Some(EPOCH),
    };
    let group_draft = GroupDraft {
        content_type: CONTENT_TYPE_TEXT,
        body: &body,
        sent_at_ms: 1_700_000_000_000,
    };
    let mut g = c.benchmark_group("message_1KiB");
    for n in SIZES {
        let devs = devices(n);
        let rs = recipients(&devs);
        let me = &devs[n - 1];
        let direct = envelope::seal(&sender, &draft, &rs).unwrap();
        let group = chain(&sender).seal(&sender, &group_draft).unwrap();
        eprintln!(
            "envelope bytes, 1 KiB body, {n} devices: per-device {} / sender key {}",
            direct.envelope.len(),
            group.envelope.len()
        );
        g.bench_with_input(BenchmarkId::new("per_device_seal", n), &n, |b, _| {
            b.iter(|| envelope::seal(&sender, black_box(&draft), &rs).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("per_device_open", n), &n, |b, _| {
            b.iter(|| {
                ParsedEnvelope::parse(black_box(&direct.envelope))
                    .unwrap()
                    .open(&opener(me), &from)
                    .unwrap()
            })
        });
        // A fresh chain per batch: a chain ends after 10 000 messages.
        g.bench_with_input(BenchmarkId::new("sender_key_seal", n), &n, |b, _| {
            b.iter_batched_ref(
                || chain(&sender),
                |c| c.seal(&sender, black_box(&group_draft)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("sender_key_open", n), &n, |b, _| {
            b.iter_batched_ref(
                || receiver(&chain(&sender), &sender, me, &from),
                |rx| {
                    let parsed = ParsedGroupEnvelope::parse(black_box(&group.envelope)).unwrap();
                    rx.open(&parsed, &from).unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn epoch_change(c: &mut Criterion) {
    let alice = Alice::new();
    let (sender, from) = (alice.sender(), alice.expected());
    let mut g = c.benchmark_group("epoch_change");
    let all = devices(SIZES[SIZES.len() - 1]);
    for n in SIZES {
        let rs = recipients(&all[..n]);
        g.bench_with_input(BenchmarkId::new("distribute", n), &n, |b, _| {
            b.iter(|| {
                // A new epoch: a new chain, then one copy per device.
                let c = SenderChain::new(&sender, CHANNEL, EPOCH).unwrap();
                c.distribute(&sender, black_box(&rs), 0).unwrap()
            })
        });
    }
    let me = &all[0];
    let copy = chain(&sender)
        .distribute(&sender, &recipients(&all[..1]), 0)
        .unwrap()
        .remove(0);
    eprintln!("distribution copy bytes: {}", copy.distribution.len());
    let expected = ExpectedChannel {
        channel_id: CHANNEL,
        epoch: EPOCH,
    };
    g.bench_function("open_copy", |b| {
        b.iter(|| {
            ParsedDistribution::parse(black_box(&copy.distribution))
                .unwrap()
                .open(&opener(me), &from, &expected, Retention::KeepHistory)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, message_1kib, epoch_change);
criterion_main!(benches);
