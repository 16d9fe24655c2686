//! "Invisible salamanders" (Dodis, Grubbs, Ristenpart, Woodage 2018;
//! Albertini et al. 2020): AES-GCM does not commit to its key, so a sender
//! who picks two keys can make ONE ciphertext and tag that authenticates
//! under both. Here the ciphertext is really built, by the GF(2^128)
//! algebra of GHASH (one ciphertext block solves the equation
//! tag(K1) = tag(K2)), checked to open under both keys with ring, and then
//! shown refused by Tessera's key commitments, before decrypting:
//!
//! * an envelope whose header (version 2) commits to the key of one
//!   recipient while the stanza of another wraps a second key;
//! * a group message whose sender gave two devices two chain keys under
//!   one chain id.
//!
//! The attack code (raw AES blocks from the `aes` crate, GHASH written out
//! from NIST SP 800-38D) lives in this test only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use tessera_crypto::{
    DeviceKeys, SignatureContext,
    envelope::{
        CONTENT_TYPE_TEXT, EnvelopeError, Epoch, ExpectedSender, Opener, PAYLOAD_VERSION_EPOCH,
        ParsedEnvelope, VERSION,
    },
    hazmat,
    sender_key::{
        ChainKey, ExpectedChannel, ParsedDistribution, ParsedGroupEnvelope, Retention, SenderChain,
        SenderKeyError,
    },
};
use tessera_proto::{
    Message as _,
    envelope::v1::{
        Envelope, EnvelopeHeaderV2, GroupEnvelope, GroupHeader, SealedContent, SignedPayload,
        Stanza,
    },
};

/// Multiplication in GF(2^128) with GCM's bit order (SP 800-38D, 6.3).
fn gf_mul(x: u128, y: u128) -> u128 {
    const R: u128 = 0xe1 << 120;
    let (mut z, mut v) = (0u128, y);
    for i in 0..128 {
        if (x >> (127 - i)) & 1 == 1 {
            z ^= v;
        }
        v = if v & 1 == 1 { (v >> 1) ^ R } else { v >> 1 };
    }
    z
}

fn gf_pow(mut x: u128, mut e: u128) -> u128 {
    let mut acc = 1u128 << 127; // the field's 1 in GCM's bit order
    while e > 0 {
        if e & 1 == 1 {
            acc = gf_mul(acc, x);
        }
        x = gf_mul(x, x);
        e >>= 1;
    }
    acc
}

/// x^(2^128 - 2) = x^-1.
fn gf_inv(x: u128) -> u128 {
    gf_pow(x, u128::MAX - 1)
}

fn aes_block(key: &[u8; 32], block: [u8; 16]) -> u128 {
    let cipher = aes::Aes256::new_from_slice(key).unwrap();
    let mut b = aes::Block::default();
    b.copy_from_slice(&block);
    cipher.encrypt_block(&mut b);
    u128::from_be_bytes(b.as_slice().try_into().unwrap())
}

fn blocks(data: &[u8]) -> impl Iterator<Item = u128> + '_ {
    data.chunks(16).map(|c| {
        let mut b = [0u8; 16];
        b[..c.len()].copy_from_slice(c);
        u128::from_be_bytes(b)
    })
}

fn ghash(h: u128, aad: &[u8], ct: &[u8]) -> u128 {
    let lengths = ((aad.len() as u128 * 8) << 64) | (ct.len() as u128 * 8);
    blocks(aad)
        .chain(blocks(ct))
        .chain(std::iter::once(lengths))
        .fold(0, |y, x| gf_mul(y ^ x, h))
}

/// (H, tag mask E_K(J0)) of a key and 12-byte nonce.
fn gcm_constants(key: &[u8; 32], nonce: [u8; 12]) -> (u128, u128) {
    let mut j0 = [0u8; 16];
    j0[..12].copy_from_slice(&nonce);
    j0[15] = 1;
    (aes_block(key, [0; 16]), aes_block(key, j0))
}

fn gcm_tag(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], ct: &[u8]) -> [u8; 16] {
    let (h, mask) = gcm_constants(key, nonce);
    (ghash(h, aad, ct) ^ mask).to_be_bytes()
}

/// Encrypts `plaintext` under (k1, n1) and rewrites its ciphertext block
/// `free` so that the tag is the same under (k2, n2) too. Returns
/// ciphertext || tag.
fn two_key_ciphertext(
    (k1, n1): (&[u8; 32], [u8; 12]),
    (k2, n2): (&[u8; 32], [u8; 12]),
    aad: &[u8],
    plaintext: &[u8],
    free: usize,
) -> Vec<u8> {
    let mut ct = hazmat::aes256gcm_seal(k1, n1, aad, plaintext);
    ct.truncate(plaintext.len());
    assert!(16 * free + 16 <= ct.len(), "the free block must be whole");
    ct[16 * free..16 * free + 16].fill(0);
    let (h1, m1) = gcm_constants(k1, n1);
    let (h2, m2) = gcm_constants(k2, n2);
    let base = ghash(h1, aad, &ct) ^ ghash(h2, aad, &ct) ^ m1 ^ m2;
    // Ciphertext block `free` is multiplied by H^(m - free + 1) in GHASH,
    // m being the number of ciphertext blocks (the last one padded).
    let power = (ct.len().div_ceil(16) - free + 1) as u128;
    let coefficient = gf_pow(h1, power) ^ gf_pow(h2, power);
    let block = gf_mul(base, gf_inv(coefficient));
    ct[16 * free..16 * free + 16].copy_from_slice(&block.to_be_bytes());
    let tag = gcm_tag(k1, n1, aad, &ct);
    assert_eq!(tag, gcm_tag(k2, n2, aad, &ct));
    ct.extend_from_slice(&tag);
    ct
}

/// `content` followed by an unknown protobuf field (number 15) of 48
/// bytes, which decoders skip, and the index of a whole 16-byte block
/// inside that field: the block the attack may overwrite.
fn with_free_block(content: Vec<u8>) -> (Vec<u8>, usize) {
    let mut out = content;
    out.extend_from_slice(&[(15 << 3) | 2, 48]);
    let free = out.len().div_ceil(16);
    out.extend_from_slice(&[0u8; 48]);
    (out, free)
}

#[test]
fn the_gcm_algebra_matches_ring() {
    let key = [0x13u8; 32];
    for (aad, len) in [(&b""[..], 0usize), (b"header", 17), (&[7u8; 40][..], 64)] {
        let pt = vec![0x42u8; len];
        let sealed = hazmat::aes256gcm_seal(&key, [5; 12], aad, &pt);
        assert_eq!(
            sealed[len..],
            gcm_tag(&key, [5; 12], aad, &sealed[..len]),
            "GHASH as written here is GCM's"
        );
    }
    let x = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
    assert_eq!(gf_mul(x, gf_inv(x)), 1 << 127);
}

#[test]
fn one_ciphertext_authenticates_under_two_keys_without_a_commitment() {
    let (k1, k2) = ([0x01u8; 32], [0x02u8; 32]);
    let (pt, free) = with_free_block(b"for bob".to_vec());
    let ct = two_key_ciphertext((&k1, [0; 12]), (&k2, [0; 12]), b"aad", &pt, free);
    let one = hazmat::aes256gcm_open(&k1, [0; 12], b"aad", &ct).unwrap();
    let two = hazmat::aes256gcm_open(&k2, [0; 12], b"aad", &ct).unwrap();
    assert_eq!(&one[..7], b"for bob");
    assert_ne!(one, two, "two keys, two plaintexts, one ciphertext and tag");
}

struct Device {
    identity: &'static str,
    card_id: [u8; 32],
    keys: DeviceKeys,
}

fn device(identity: &'static str, n: u8) -> Device {
    Device {
        identity,
        card_id: [n; 32],
        keys: DeviceKeys::generate().unwrap(),
    }
}

fn signed_content(alice: &Device, payload: SignedPayload) -> Vec<u8> {
    let payload = payload.encode_to_vec();
    let signature = alice.keys.signing.sign(SignatureContext::Message, &payload);
    SealedContent {
        payload,
        signature: signature.to_vec(),
    }
    .encode_to_vec()
}

fn payload(alice: &Device, epoch: Option<Epoch>, recipients: Vec<Vec<u8>>) -> SignedPayload {
    SignedPayload {
        version: if epoch.is_some() {
            PAYLOAD_VERSION_EPOCH
        } else {
            VERSION
        },
        channel_id: "0123456789abcdef0123456789abcdef".into(),
        message_id: vec![0x4d; 16],
        sender_identity: alice.identity.into(),
        sender_card_id: alice.card_id.to_vec(),
        sent_at_ms: 1_700_000_000_000,
        recipient_card_ids: recipients,
        content_type: CONTENT_TYPE_TEXT.into(),
        body: b"wire 10 000 to account A".to_vec(),
        epoch: epoch.map_or(0, |e| e.number),
        epoch_hash: epoch.map(|e| e.hash.to_vec()).unwrap_or_default(),
    }
}

/// alice wraps K1 for bob and K2 for carol in one envelope whose body
/// authenticates under both. Returns the envelope and K2.
fn two_key_envelope(alice: &Device, bob: &Device, carol: &Device, epoch: Option<Epoch>) -> Vec<u8> {
    let (k1, k2) = ([0x51u8; 32], [0x52u8; 32]);
    let stanza = |d: &Device, key: &[u8; 32]| {
        let w = hazmat::wrap_content_key(&d.keys.encryption.public_key(), &d.card_id, key).unwrap();
        Stanza {
            card_id: d.card_id.to_vec(),
            encapsulated_key: w.encapsulated_key.to_vec(),
            wrapped_key: w.ciphertext,
        }
    };
    let (version, key_commitment) = match epoch {
        Some(_) => (2, hazmat::envelope_key_commitment(&k1).to_vec()),
        None => (1, Vec::new()),
    };
    let header = EnvelopeHeaderV2 {
        version,
        sender_card_id: alice.card_id.to_vec(),
        stanzas: vec![stanza(bob, &k1), stanza(carol, &k2)],
        key_commitment,
    }
    .encode_to_vec();
    let recipients = vec![bob.card_id.to_vec(), carol.card_id.to_vec()];
    let (pt, free) = with_free_block(signed_content(alice, payload(alice, epoch, recipients)));
    let ciphertext = two_key_ciphertext((&k1, [0; 12]), (&k2, [0; 12]), &header, &pt, free);
    assert!(hazmat::aes256gcm_open(&k2, [0; 12], &header, &ciphertext).is_some());
    Envelope { header, ciphertext }.encode_to_vec()
}

fn open_envelope(envelope: &[u8], me: &Device, alice: &Device) -> Result<Vec<u8>, EnvelopeError> {
    let vk = alice.keys.signing.verifying_key();
    ParsedEnvelope::parse(envelope)?
        .open(
            &Opener {
                card_id: me.card_id,
                secret: &me.keys.encryption,
            },
            &ExpectedSender {
                identity: alice.identity,
                card_id: alice.card_id,
                key: &vk,
            },
        )
        .map(|p| p.body)
}

#[test]
fn a_committing_envelope_header_refuses_the_second_key_before_decrypting() {
    let (alice, bob, carol) = (device("alice", 1), device("bob", 2), device("carol", 3));
    let epoch = Epoch {
        number: 1,
        hash: [0x77; 32],
    };
    let committed = two_key_envelope(&alice, &bob, &carol, Some(epoch));
    assert_eq!(
        open_envelope(&committed, &bob, &alice).unwrap(),
        b"wire 10 000 to account A"
    );
    assert_eq!(
        open_envelope(&committed, &carol, &alice),
        Err(EnvelopeError::KeyCommitmentMismatch)
    );
    // The same attack on a version-1 header: AES-GCM lets carol's key
    // through (the body "authenticates"), and only the garbage after it
    // fails to parse.
    let uncommitted = two_key_envelope(&alice, &bob, &carol, None);
    assert!(open_envelope(&uncommitted, &bob, &alice).is_ok());
    let carol_err = open_envelope(&uncommitted, &carol, &alice).unwrap_err();
    assert_ne!(carol_err, EnvelopeError::BodyDecryptFailed);
    assert_ne!(carol_err, EnvelopeError::KeyCommitmentMismatch);
}

#[test]
fn a_group_header_commits_to_one_message_key() {
    let (alice, bob, carol) = (device("alice", 1), device("bob", 2), device("carol", 3));
    let channel = "0123456789abcdef0123456789abcdef";
    let epoch = Epoch {
        number: 4,
        hash: [0x44; 32],
    };
    let (ck_bob, ck_carol) = ([0x61u8; 32], [0x62u8; 32]);
    // A chain id is derived from its key, so the sender cannot even name
    // one chain with two keys: bob and carol hold two chains.
    let chain_id = tessera_crypto::sender_key::chain_id_for(&ChainKey::from_bytes(ck_bob), 0);
    assert_ne!(
        chain_id,
        tessera_crypto::sender_key::chain_id_for(&ChainKey::from_bytes(ck_carol), 0)
    );
    let sender = tessera_crypto::envelope::Sender {
        identity: alice.identity,
        card_id: alice.card_id,
        key: &alice.keys.signing,
    };
    // Two chain keys: bob's copy and carol's copy disagree.
    let receive = |me: &Device, ck: [u8; 32]| {
        let chain = SenderChain::with(&sender, channel, epoch, ChainKey::from_bytes(ck), 0);
        let public = me.keys.encryption.public_key();
        let copy = chain
            .distribute(
                &sender,
                &[tessera_crypto::envelope::Recipient {
                    card_id: me.card_id,
                    key: &public,
                }],
                0,
            )
            .unwrap()
            .remove(0);
        let vk = alice.keys.signing.verifying_key();
        ParsedDistribution::parse(&copy.distribution)
            .unwrap()
            .open(
                &Opener {
                    card_id: me.card_id,
                    secret: &me.keys.encryption,
                },
                &ExpectedSender {
                    identity: alice.identity,
                    card_id: alice.card_id,
                    key: &vk,
                },
                &ExpectedChannel {
                    channel_id: channel,
                    epoch,
                },
                Retention::KeepHistory,
            )
            .unwrap()
    };
    let (mut bob_rx, mut carol_rx) = (receive(&bob, ck_bob), receive(&carol, ck_carol));
    let keys = |ck: &[u8; 32]| hazmat::group_message_keys(&hazmat::sender_key_ratchet_step(ck).0);
    let (kb, kc) = (keys(&ck_bob), keys(&ck_carol));
    let nonce = [0x4e; 12];
    let header = GroupHeader {
        version: 1,
        channel_id: channel.into(),
        epoch: epoch.number,
        epoch_hash: epoch.hash.to_vec(),
        sender_card_id: alice.card_id.to_vec(),
        chain_id: chain_id.to_vec(),
        generation: 0,
        key_commitment: kb.commitment.to_vec(),
        nonce: nonce.to_vec(),
    }
    .encode_to_vec();
    // The payload names the id of generation 0 under bob's key.
    let mut signed = payload(&alice, Some(epoch), vec![]);
    signed.message_id = kb.message_id.to_vec();
    let (pt, free) = with_free_block(signed_content(&alice, signed));
    let ciphertext = two_key_ciphertext((&kb.key, nonce), (&kc.key, nonce), &header, &pt, free);
    // Without the commitment, carol's key would authenticate the body.
    assert!(hazmat::aes256gcm_open(&kc.key, nonce, &header, &ciphertext).is_some());
    let envelope = GroupEnvelope { header, ciphertext }.encode_to_vec();
    let parsed = ParsedGroupEnvelope::parse(&envelope).unwrap();
    let vk = alice.keys.signing.verifying_key();
    let from = ExpectedSender {
        identity: alice.identity,
        card_id: alice.card_id,
        key: &vk,
    };
    assert_eq!(
        bob_rx.open(&parsed, &from).unwrap().body,
        b"wire 10 000 to account A"
    );
    // Carol's chain is another chain: the header does not name it.
    assert_eq!(
        carol_rx.open(&parsed, &from).unwrap_err(),
        SenderKeyError::OtherChain("chain id")
    );
    assert_eq!(
        carol_rx.next_generation(),
        0,
        "a refused message moves nothing"
    );
    // And where only the key is given (an archive's binding check), the
    // commitment refuses carol's key before decrypting.
    let sealed = SealedContent::decode(
        hazmat::aes256gcm_open(
            &kb.key,
            nonce,
            &parsed_header(&envelope),
            &ciphertext_of(&envelope),
        )
        .unwrap()
        .as_slice(),
    )
    .unwrap();
    let secret_of = |ck: &[u8; 32]| hazmat::sender_key_ratchet_step(ck).0;
    let digest = tessera_crypto::sha256(&envelope);
    assert_eq!(
        tessera_crypto::sender_key::check_group_binding(
            &envelope,
            &digest,
            &secret_of(&ck_carol),
            &sealed.payload,
            &sealed.signature
        )
        .unwrap_err(),
        SenderKeyError::KeyCommitmentMismatch
    );
    assert!(
        tessera_crypto::sender_key::check_group_binding(
            &envelope,
            &digest,
            &secret_of(&ck_bob),
            &sealed.payload,
            &sealed.signature
        )
        .is_ok()
    );
}

fn parsed_header(envelope: &[u8]) -> Vec<u8> {
    GroupEnvelope::decode(envelope).unwrap().header
}

fn ciphertext_of(envelope: &[u8]) -> Vec<u8> {
    GroupEnvelope::decode(envelope).unwrap().ciphertext
}
