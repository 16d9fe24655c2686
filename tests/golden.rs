//! Golden vectors of Tessera's own formats (`testdata/tessera-vectors.json`):
//! regenerated here from fixed inputs and compared byte for byte with the
//! checked-in file, then every vector in the file is read back through the
//! real decoders (cards through the verifier, envelopes opened by each
//! recipient, streams decrypted, key files opened, tokens verified, proofs
//! checked). A second implementation checks itself against the same file.
//!
//! `TESSERA_WRITE_GOLDEN=1` rewrites the file (only when a format changes on
//! purpose; bump `version` then, or add a new section).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::PathBuf;

use serde_json::{Value, json};
use tessera_card::{
    CardId, CardKind, NewCard, ParsedCard, VerifiedCard, Verifier, app_sign,
    channel::{
        Change, ChannelState, NewChannelStatement, ParsedChannelStatement, Role, StatementSigner,
        Visibility,
    },
    device_list::{self, Action, DeviceListState, NewStatement, ParsedStatement},
    kms_sign,
    revocation::{ParsedRevocation, RevokedBy, sign_revocation},
    safety_number::SafetyNumber,
    transparency::{self, Tree},
};
use tessera_crypto::{
    DeviceKeys, EncryptionSecret, SignatureContext, SigningKey, VerifyingKey,
    envelope::{
        CONTENT_TYPE_TEXT, Draft, Epoch, ExpectedSender, Opener, ParsedEnvelope, Recipient, Sender,
        check_binding,
    },
    hazmat::{self, EnvelopeRandomness},
    keystore::{self, KdfParams, KeyMaterial, Protection},
    open_org_backup,
    sender_key::{
        self, ChainKey, ExpectedChannel, GroupDraft, ParsedDistribution, ParsedGroupEnvelope,
        Retention, SenderChain,
    },
    stream::{self, FileKey},
};
use tessera_proto::{
    Message as _,
    auth::v1::{AccessToken, AuthMethod as PbAuthMethod, Role as PbRole, TokenClaims},
    backup::v1::BackupRecord,
    card::v1::{Card, SignedDeviceStatement},
    channel::v1::SignedChannelStatement,
    transparency::v1::SignedCheckpoint,
};
use tessera_service::{
    TokenVerifier,
    token::{Audience, AuthMethod, TokenError, bearer_header},
};

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tessera-vectors.json")
}

fn h(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn arr32(v: &Value) -> [u8; 32] {
    unhex(v).try_into().unwrap()
}

fn signing(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32]).unwrap()
}

fn device(signing_seed: u8, x25519: u8) -> DeviceKeys {
    DeviceKeys {
        signing: signing(signing_seed),
        encryption: EncryptionSecret::from_bytes([x25519; 32]),
    }
}

/// The fixed inputs: every key from a repeated byte (the seed of an
/// Ed25519 key, the secret of an X25519 key).
struct Inputs {
    app: SigningKey,
    kms: SigningKey,
    token: SigningKey,
    devices: Vec<(&'static str, &'static str, CardKind, u8, u8, DeviceKeys)>,
}

fn inputs() -> Inputs {
    let devices = [
        ("alice", "laptop", CardKind::Client, 0x11, 0x12),
        ("bob", "phone", CardKind::Client, 0x21, 0x22),
        ("bob", "laptop", CardKind::Client, 0x31, 0x32),
        ("org:acme", "organisation", CardKind::Org, 0x41, 0x42),
    ]
    .into_iter()
    .map(|(identity, name, kind, s, x)| (identity, name, kind, s, x, device(s, x)))
    .collect();
    Inputs {
        app: signing(0xa1),
        kms: signing(0xa2),
        token: signing(0xa3),
        devices,
    }
}

const CREATED_AT: i64 = 1_700_000_000;
/// The two-chunk stream's plaintext, too long to list.
const TWO_CHUNK_RULE: &str = "65541 bytes, byte i = i mod 251";

fn two_chunk_plaintext() -> Vec<u8> {
    (0..stream::CHUNK_SIZE + 5)
        .map(|i| (i % 251) as u8)
        .collect()
}
/// The (old, new) tree sizes of the consistency proofs.
const CONSISTENCY: [(u64, u64); 4] = [(1, 5), (2, 5), (3, 5), (4, 5)];
const CHANNEL: &str = "0123456789abcdef0123456789abcdef";

/// Every vector, made from the fixed inputs with Tessera's own code.
fn generate() -> Value {
    let i = inputs();
    let mut cards = Vec::new();
    let mut card_json = Vec::new();
    for (identity, name, kind, s, x, keys) in &i.devices {
        let mut card = NewCard {
            identity,
            kind: *kind,
            device_name: name,
            created_at: CREATED_AT,
            previous_card_id: None,
        }
        .self_signed(keys)
        .unwrap();
        app_sign(&mut card, &i.app);
        kms_sign(&mut card, &i.kms);
        let id = CardId::of_snapshot(&card.content_snapshot);
        card_json.push(json!({
            "identity": identity,
            "device_name": name,
            "kind": kind.to_string(),
            "created_at": CREATED_AT,
            "signing_seed": h(&[*s; 32]),
            "signing_public_key": h(keys.signing.verifying_key().as_bytes()),
            "x25519_secret": h(&[*x; 32]),
            "x25519_public_key": h(keys.encryption.public_key().as_bytes()),
            "content_snapshot": h(&card.content_snapshot),
            "card_id": h(id.as_bytes()),
            "self_signature": h(&card.self_signature),
            "app_signature": h(&card.app_signature),
            "kms_signature": h(&card.kms_signature),
            "card": h(&card.encode_to_vec()),
        }));
        cards.push((id, card));
    }
    let (alice, bob_phone, bob_laptop, org) = (&cards[0], &cards[1], &cards[2], &cards[3]);

    // Revocations: bob's laptop by the AppKey, bob's phone by itself.
    let by_app = sign_revocation(
        bob_laptop.0,
        RevokedBy::App,
        &i.app,
        "lost",
        CREATED_AT + 100,
    )
    .unwrap();
    let by_self = sign_revocation(
        bob_phone.0,
        RevokedBy::SelfKey,
        &i.devices[1].5.signing,
        "",
        CREATED_AT + 200,
    )
    .unwrap();
    let revocation_json = |r: &tessera_proto::card::v1::Revocation, card: &CardId, by: &str| {
        json!({
            "card_id": h(card.as_bytes()),
            "revoked_by": by,
            "content_snapshot": h(&r.content_snapshot),
            "signature": h(&r.signature),
            "revocation": h(&r.encode_to_vec()),
        })
    };

    // The transparency log: four registrations and a revocation.
    let mut entries: Vec<Vec<u8>> = cards
        .iter()
        .enumerate()
        .map(|(n, (_, card))| {
            let identity = i.devices[n].0;
            transparency::registration_entry(card, identity, CREATED_AT + 1 + n as i64)
        })
        .collect();
    entries.push(transparency::revocation_entry(
        &by_app,
        "bob",
        CREATED_AT + 5,
    ));
    let tree = Tree::from_leaves(entries.iter().map(|e| transparency::leaf_hash(e)));
    let size = entries.len() as u64;
    let root = tree.root(size).unwrap();
    let checkpoint = transparency::sign_checkpoint(&i.kms, size, &root, CREATED_AT + 6);
    let log_json = json!({
        "entries": entries.iter().map(|e| json!({
            "entry": h(e),
            "leaf_hash": h(&transparency::leaf_hash(e)),
        })).collect::<Vec<_>>(),
        "roots": (0..=size).map(|n| h(&tree.root(n).unwrap())).collect::<Vec<_>>(),
        "checkpoint": {
            "log_id": transparency::log_id(&i.kms.verifying_key()),
            "tree_size": size,
            "timestamp": CREATED_AT + 6,
            "content_snapshot": h(&checkpoint.content_snapshot),
            "signature": h(&checkpoint.signature),
            "signed_checkpoint": h(&checkpoint.encode_to_vec()),
        },
        "inclusion_proofs": (0..size).map(|leaf| json!({
            "leaf_index": leaf,
            "tree_size": size,
            "hashes": tree.inclusion_proof(leaf, size).unwrap().iter().map(|x| h(x)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "consistency_proofs": CONSISTENCY.iter().map(|(old, new)| json!({
            "old_size": old,
            "new_size": new,
            "hashes": tree.consistency_proof(*old, *new).unwrap().iter().map(|x| h(x)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });

    // An envelope from alice's laptop to all three client cards.
    let publics: Vec<_> = i.devices[..3]
        .iter()
        .map(|d| d.5.encryption.public_key())
        .collect();
    let recipients: Vec<Recipient<'_>> = (0..3)
        .map(|n| Recipient {
            card_id: *cards[n].0.as_bytes(),
            key: &publics[n],
        })
        .collect();
    let ephemeral = [[0x71u8; 32], [0x72; 32], [0x73; 32]];
    let randomness = EnvelopeRandomness {
        message_id: [0x5a; 16],
        content_key: [0x6b; 32],
        ephemeral: &ephemeral,
    };
    let body = "Meet at noon?";
    let sealed = hazmat::seal_envelope_with(
        &Sender {
            identity: "alice",
            card_id: *alice.0.as_bytes(),
            key: &i.devices[0].5.signing,
        },
        &Draft {
            channel_id: CHANNEL,
            content_type: CONTENT_TYPE_TEXT,
            body: body.as_bytes(),
            sent_at_ms: CREATED_AT * 1000 + 123,
            epoch: None,
        },
        &recipients,
        &randomness,
    )
    .unwrap();
    let mut sorted_ids: Vec<[u8; 32]> = recipients.iter().map(|r| r.card_id).collect();
    sorted_ids.sort();
    let opened = ParsedEnvelope::parse(&sealed.envelope)
        .unwrap()
        .open(
            &Opener {
                card_id: *bob_phone.0.as_bytes(),
                secret: &i.devices[1].5.encryption,
            },
            &ExpectedSender {
                identity: "alice",
                card_id: *alice.0.as_bytes(),
                key: &i.devices[0].5.signing.verifying_key(),
            },
        )
        .unwrap();
    let envelope_json = json!({
        "sender": "alice/laptop",
        "channel_id": CHANNEL,
        "content_type": CONTENT_TYPE_TEXT,
        "body": body,
        "sent_at_ms": CREATED_AT * 1000 + 123,
        "message_id": h(&randomness.message_id),
        "content_key": h(&randomness.content_key),
        "recipients_ascending": sorted_ids.iter().map(|id| h(id)).collect::<Vec<_>>(),
        "ephemeral_secrets_in_stanza_order": ephemeral.iter().map(|e| h(e)).collect::<Vec<_>>(),
        "signed_payload": h(&opened.signed_payload),
        "signature": h(&opened.signature),
        "envelope": h(&sealed.envelope),
        "envelope_sha256": h(&tessera_crypto::sha256(&sealed.envelope)),
    });

    // Bob's phone backs message 1 up to the organisation.
    let record = BackupRecord {
        channel_id: CHANNEL.into(),
        message_index: 1,
        original_payload: opened.signed_payload.clone(),
        original_signature: opened.signature.clone(),
        server_time_ms: CREATED_AT * 1000 + 456,
        envelope_sha256: tessera_crypto::sha256(&sealed.envelope).to_vec(),
        content_key: randomness.content_key.to_vec(),
    }
    .encode_to_vec();
    let org_public = i.devices[3].5.encryption.public_key();
    let org_sealed =
        hazmat::seal_org_backup_with(&org_public, CHANNEL, 1, &record, &[0x81; 32]).unwrap();
    let org_json = json!({
        "org_card_id": h(org.0.as_bytes()),
        "channel_id": CHANNEL,
        "message_index": 1,
        "ephemeral_secret": h(&[0x81; 32]),
        "backup_record": h(&record),
        "encapsulated_key": h(&org_sealed.encapsulated_key),
        "ciphertext": h(&org_sealed.ciphertext),
    });

    // Safety numbers of alice and bob: with both of bob's devices, and after
    // his laptop is revoked.
    let both = SafetyNumber::compute(("alice", &[alice.0]), ("bob", &[bob_phone.0, bob_laptop.0]));
    let phone_only = SafetyNumber::compute(("alice", &[alice.0]), ("bob", &[bob_phone.0]));
    let safety_json = json!([
        {
            "a": {"identity": "alice", "card_ids": [h(alice.0.as_bytes())]},
            "b": {"identity": "bob", "card_ids": [h(bob_phone.0.as_bytes()), h(bob_laptop.0.as_bytes())]},
            "digits": both.digits(),
        },
        {
            "a": {"identity": "alice", "card_ids": [h(alice.0.as_bytes())]},
            "b": {"identity": "bob", "card_ids": [h(bob_phone.0.as_bytes())]},
            "digits": phone_only.digits(),
        },
    ]);

    // File streams: empty, one short chunk, two chunks.
    let file_key = FileKey::from_bytes(&[0x91; 32]).unwrap();
    let streams_json: Vec<Value> = [
        ("empty", Vec::new()),
        ("one short chunk", b"the plan\n".to_vec()),
        ("two chunks", two_chunk_plaintext()),
    ]
    .into_iter()
    .map(|(what, plain)| {
        let mut out = Vec::new();
        hazmat::stream_encrypt_with_nonce(&file_key, [0x92; 16], plain.as_slice(), &mut out)
            .unwrap();
        let mut v = json!({
            "comment": what,
            "file_key": h(&[0x91; 32]),
            "nonce": h(&[0x92; 16]),
            "plaintext_sha256": h(&tessera_crypto::sha256(&plain)),
            "stream": h(&out),
        });
        if plain.len() <= 64 {
            v["plaintext"] = json!(h(&plain));
        } else {
            v["plaintext_rule"] = json!(TWO_CHUNK_RULE);
            v["plaintext_length"] = json!(plain.len());
        }
        v
    })
    .collect();

    // Key files: the AppKey unprotected, alice's device keys under a passphrase.
    let tiny = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let app_file = keystore::seal(&KeyMaterial::Signing(signing(0xa1)), &Protection::None).unwrap();
    let device_file = hazmat::keystore_seal_with(
        &KeyMaterial::Device(device(0x11, 0x12)),
        &Protection::Passphrase(b"correct horse battery staple", tiny),
        [0xc1; 16],
        [0xc2; 12],
    )
    .unwrap();
    let keyfiles_json = json!([
        {"comment": "signing key, unprotected", "signing_seed": h(&[0xa1; 32]), "file": h(&app_file)},
        {
            "comment": "device keys, Argon2id m = 1024 KiB, t = 1, p = 1",
            "passphrase": "correct horse battery staple",
            "signing_seed": h(&[0x11; 32]),
            "x25519_secret": h(&[0x12; 32]),
            "salt": h(&[0xc1; 16]),
            "nonce": h(&[0xc2; 12]),
            "file": h(&device_file),
        },
    ]);

    // Protocol v2. An access token for alice's laptop at the app server,
    // from a device log-in, valid until 2100.
    let claims = TokenClaims {
        version: 2,
        subject: "alice".into(),
        device_card_id: alice.0.to_vec(),
        issued_at: CREATED_AT,
        expires_at: 4_102_444_800,
        role: PbRole::User as i32,
        token_id: vec![0xd1; 16],
        org_member: true,
        audience: Audience::Server.as_str().into(),
        auth: PbAuthMethod::Device as i32,
    }
    .encode_to_vec();
    let token = AccessToken {
        signature: i.token.sign(SignatureContext::Token, &claims).to_vec(),
        claims: claims.clone(),
    }
    .encode_to_vec();
    let token_json = json!({
        "subject": "alice",
        "claims": h(&claims),
        "access_token": h(&token),
        "authorization": bearer_header(&token),
    });

    json!({
        "format": "tessera-golden-vectors",
        "version": 6,
        "description": "Golden vectors of Tessera's formats, generated by tests/golden.rs from the fixed inputs named in each vector. Byte strings are lowercase hex. See docs/protocol.md, section 14.",
        "protocol_v1": {
            "keys": {
                "app_signing_seed": h(&[0xa1; 32]),
                "app_public_key": h(i.app.verifying_key().as_bytes()),
                "kms_signing_seed": h(&[0xa2; 32]),
                "kms_public_key": h(i.kms.verifying_key().as_bytes()),
                "token_signing_seed": h(&[0xa3; 32]),
                "token_public_key": h(i.token.verifying_key().as_bytes()),
            },
            "cards": card_json,
            "revocations": [
                revocation_json(&by_app, &bob_laptop.0, "app"),
                revocation_json(&by_self, &bob_phone.0, "self"),
            ],
            "transparency_log": log_json,
            "envelopes": [envelope_json],
            "org_backups": [org_json],
            "safety_numbers": safety_json,
            "file_streams": streams_json,
            "key_files": keyfiles_json,
        },
        "protocol_v2": {
            "tokens": [token_json],
            "device_lists": device_lists_json(&i, &cards),
            "channels": channels_json(&i, &cards),
            "sender_keys": sender_keys_json(&i, &cards),
        },
    })
}

/// A channel's membership chain: alice creates it with bob, makes him an
/// admin, bob renames it, alice leaves; and alice's message to bob's phone
/// at epoch 1 (a version-2 payload naming the epoch).
fn channels_json(i: &Inputs, cards: &[(CardId, Card)]) -> Value {
    let verifier = Verifier::new(i.app.verifying_key(), i.kms.verifying_key());
    let verify = |n: usize, identity: &str| {
        verifier
            .verify(&cards[n].1, Some(identity), CardKind::Client)
            .unwrap()
    };
    let (alice, bob) = (verify(0, "alice"), verify(1, "bob"));
    let (alice_keys, bob_keys) = (&i.devices[0].5, &i.devices[1].5);
    let mut state = ChannelState::empty(CHANNEL);
    let mut out = Vec::new();
    for (by, keys, change) in [
        (
            &alice,
            alice_keys,
            Change::Create {
                name: "plans".into(),
                visibility: Visibility::Shared,
                members: vec![("alice".into(), Role::Admin), ("bob".into(), Role::Member)],
            },
        ),
        (
            &alice,
            alice_keys,
            Change::SetRole {
                identity: "bob".into(),
                role: Role::Admin,
            },
        ),
        (&bob, bob_keys, Change::Rename("plans v2".into())),
        (&alice, alice_keys, Change::Leave),
    ] {
        let signed = NewChannelStatement {
            channel_id: CHANNEL,
            epoch: state.length(),
            previous_hash: state.head(),
            signer_identity: by.identity(),
            signer: by.id(),
            created_at: CREATED_AT,
            change,
        }
        .sign(&keys.signing);
        let parsed = ParsedChannelStatement::parse(signed.clone()).unwrap();
        state
            .apply(&parsed, &StatementSigner::of(by).unwrap())
            .unwrap();
        out.push(json!({
            "epoch": parsed.epoch(),
            "signer": by.identity(),
            "signer_card_id": h(by.id().as_bytes()),
            "statement": h(&signed.statement),
            "signature": h(&signed.signature),
            "statement_hash": h(&parsed.hash()),
            "members_after": members_json(&state),
            "name_after": state.name(),
        }));
        if parsed.epoch() == 1 {
            out.push(message_at_epoch_json(i, cards, &state));
        }
    }
    json!({ "channel_id": CHANNEL, "chain": out })
}

fn members_json(state: &ChannelState) -> Value {
    json!(state
        .members()
        .iter()
        .map(|(identity, m)| json!({"identity": identity, "role": m.role.to_string(), "added_at": m.added_at, "added_by": m.added_by}))
        .collect::<Vec<_>>())
}

/// alice's message to bob's phone sealed at the state's current epoch.
fn message_at_epoch_json(i: &Inputs, cards: &[(CardId, Card)], state: &ChannelState) -> Value {
    let bob_phone = i.devices[1].5.encryption.public_key();
    let ephemeral = [[0x74u8; 32]];
    let randomness = EnvelopeRandomness {
        message_id: [0x5b; 16],
        content_key: [0x6c; 32],
        ephemeral: &ephemeral,
    };
    let epoch = Epoch {
        number: state.epoch().unwrap(),
        hash: state.head().unwrap(),
    };
    let sealed = hazmat::seal_envelope_with(
        &Sender {
            identity: "alice",
            card_id: *cards[0].0.as_bytes(),
            key: &i.devices[0].5.signing,
        },
        &Draft {
            channel_id: CHANNEL,
            content_type: CONTENT_TYPE_TEXT,
            body: b"You run it now.",
            sent_at_ms: CREATED_AT * 1000 + 456,
            epoch: Some(epoch),
        },
        &[Recipient {
            card_id: *cards[1].0.as_bytes(),
            key: &bob_phone,
        }],
        &randomness,
    )
    .unwrap();
    json!({
        "message": "alice/laptop to bob/phone at this epoch",
        "epoch": epoch.number,
        "epoch_hash": h(&epoch.hash),
        "body": "You run it now.",
        "sent_at_ms": CREATED_AT * 1000 + 456,
        "message_id": h(&randomness.message_id),
        "content_key": h(&randomness.content_key),
        "ephemeral_secrets_in_stanza_order": ephemeral.iter().map(|e| h(e)).collect::<Vec<_>>(),
        "envelope": h(&sealed.envelope),
    })
}

/// The sender-key epoch of the vectors (section 15): a fixed number and hash.
const SK_EPOCH: Epoch = Epoch {
    number: 1,
    hash: [0xe1; 32],
};
const SK_CHAIN_KEY: [u8; 32] = [0x5c; 32];
/// (message id, body) of the group messages, generations 0 and 1.
/// Group messages' bodies (their ids come from their keys).
const SK_MESSAGES: [&str; 2] = ["Hello, channel.", "Second."];

/// Sender keys: three ratchet steps, an envelope key commitment, alice's
/// chain, two group messages and her chain key sealed to bob's phone.
fn sender_keys_json(i: &Inputs, cards: &[(CardId, Card)]) -> Value {
    let mut ck = SK_CHAIN_KEY;
    let mut steps = Vec::new();
    for generation in 0..3 {
        let (secret, next) = hazmat::sender_key_ratchet_step(&ck);
        let keys = hazmat::group_message_keys(&secret);
        steps.push(json!({
            "generation": generation,
            "chain_key": h(&ck),
            "message_secret": h(&secret),
            "next_chain_key": h(&next),
            "aes_key": h(&keys.key),
            "commitment_key": h(&keys.commitment_key),
            "key_commitment": h(&keys.commitment),
        }));
        ck = next;
    }
    let sender = Sender {
        identity: "alice",
        card_id: *cards[0].0.as_bytes(),
        key: &i.devices[0].5.signing,
    };
    let mut chain = SenderChain::with(
        &sender,
        CHANNEL,
        SK_EPOCH,
        ChainKey::from_bytes(SK_CHAIN_KEY),
        0,
    );
    let messages: Vec<Value> = SK_MESSAGES
        .iter()
        .enumerate()
        .map(|(n, body)| {
            let sent_at_ms = CREATED_AT * 1000 + 600 + n as i64;
            let nonce = [0x90 + n as u8; 12];
            let sealed = hazmat::group_seal_with_nonce(
                &mut chain,
                &sender,
                &GroupDraft {
                    content_type: CONTENT_TYPE_TEXT,
                    body: body.as_bytes(),
                    sent_at_ms,
                },
                nonce,
            )
            .unwrap();
            json!({
                "generation": sealed.generation,
                "nonce": h(&nonce),
                "message_id": h(&sealed.message_id),
                "body": body,
                "sent_at_ms": sent_at_ms,
                "envelope": h(&sealed.envelope),
            })
        })
        .collect();
    let bob_phone = i.devices[1].5.encryption.public_key();
    let ephemeral = [0x75u8; 32];
    let created_at_ms = CREATED_AT * 1000 + 500;
    // The chain went to bob's phone and to alice's laptop itself.
    let recipients = [*cards[0].0.as_bytes(), *cards[1].0.as_bytes()];
    let digest = sender_key::recipients_digest(&recipients);
    let copy = hazmat::sender_key_distribution_with(
        &chain,
        &sender,
        &Recipient {
            card_id: *cards[1].0.as_bytes(),
            key: &bob_phone,
        },
        &digest,
        created_at_ms,
        &ephemeral,
    )
    .unwrap();
    let content_key = [0x6c; 32];
    json!({
        "ratchet": steps,
        "envelope_key_commitment": {
            "content_key": h(&content_key),
            "key_commitment": h(&hazmat::envelope_key_commitment(&content_key)),
        },
        "chain": {
            "channel_id": CHANNEL,
            "epoch": SK_EPOCH.number,
            "epoch_hash": h(&SK_EPOCH.hash),
            "sender": "alice/laptop",
            "sender_card_id": h(cards[0].0.as_bytes()),
            "chain_id": h(&chain.chain_id()),
            "chain_key": h(&SK_CHAIN_KEY),
            "first_generation": 0,
        },
        "group_messages": messages,
        "distribution": {
            "recipient": "bob/phone",
            "recipient_card_id": h(cards[1].0.as_bytes()),
            "created_at_ms": created_at_ms,
            "ephemeral_secret": h(&ephemeral),
            "recipient_card_ids": recipients.iter().map(|r| h(r)).collect::<Vec<_>>(),
            "recipients_sha256": h(&digest),
            "copy": h(&copy.distribution),
        },
    })
}

/// Bob's device list: his phone's GENESIS (co-signed by the AppKey), the
/// phone approving the laptop, and a RESET onto the laptop (co-signed).
fn device_lists_json(i: &Inputs, cards: &[(CardId, Card)]) -> Value {
    let verifier = Verifier::new(i.app.verifying_key(), i.kms.verifying_key());
    let verify = |(id, card): &(CardId, Card)| {
        (
            *id,
            verifier
                .verify(card, Some("bob"), CardKind::Client)
                .unwrap(),
        )
    };
    let (phone, laptop) = (verify(&cards[1]), verify(&cards[2]));
    let (phone, laptop) = (&phone, &laptop);
    let (phone_keys, laptop_keys) = (&i.devices[1].5, &i.devices[2].5);
    let mut state = DeviceListState::empty("bob");
    let mut out = Vec::new();
    for (action, subject, signer, keys) in [
        (Action::Genesis, phone, phone, phone_keys),
        (Action::Add, laptop, phone, phone_keys),
        (Action::Reset, laptop, laptop, laptop_keys),
    ] {
        let mut signed = NewStatement {
            identity: "bob",
            seqno: state.length(),
            previous_hash: state.head(),
            action,
            subject: subject.0,
            signer: signer.0,
            created_at: CREATED_AT,
        }
        .sign(&keys.signing);
        if action.needs_app_signature() {
            device_list::app_cosign(&mut signed, &i.app);
        }
        let parsed = ParsedStatement::parse(signed.clone()).unwrap();
        state
            .apply(&parsed, &signer.1, &i.app.verifying_key())
            .unwrap();
        out.push(json!({
            "action": action.to_string(),
            "seqno": parsed.seqno(),
            "subject_card_id": h(subject.0.as_bytes()),
            "signer_card_id": h(signer.0.as_bytes()),
            "statement": h(&signed.statement),
            "signature": h(&signed.signature),
            "app_signature": h(&signed.app_signature),
            "statement_hash": h(&parsed.hash()),
            "trusted_after": state.trusted().iter().map(|c| h(c.as_bytes())).collect::<Vec<_>>(),
        }));
    }
    json!({
        "identity": "bob",
        "statements": out,
        "approval_codes": [
            { "card_id": h(laptop.0.as_bytes()), "code": device_list::approval_code(&laptop.0) },
        ],
    })
}

#[test]
fn golden_vectors_are_regenerated_byte_for_byte() {
    let generated = serde_json::to_string_pretty(&generate()).unwrap() + "\n";
    if std::env::var_os("TESSERA_WRITE_GOLDEN").is_some() {
        std::fs::write(path(), &generated).unwrap();
    }
    let stored = std::fs::read_to_string(path()).unwrap();
    assert!(
        stored == generated,
        "testdata/tessera-vectors.json differs from what the code makes now: a format changed \\
         (if on purpose, rewrite it with TESSERA_WRITE_GOLDEN=1 and say so in docs/protocol.md)"
    );
}

#[test]
fn every_golden_vector_reads_back_through_the_real_decoders() {
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    assert_eq!(file["version"], 6);
    let v1 = &file["protocol_v1"];
    let key = |name: &str| VerifyingKey::from_bytes(&unhex(&v1["keys"][name])).unwrap();
    let verifier = Verifier::new(key("app_public_key"), key("kms_public_key"));

    // Cards verify, and their ids are the snapshot's SHA-256.
    let mut verified = Vec::new();
    for c in v1["cards"].as_array().unwrap() {
        let card = Card::decode(unhex(&c["card"]).as_slice()).unwrap();
        assert_eq!(card.content_snapshot, unhex(&c["content_snapshot"]));
        let kind = if c["kind"] == "org" {
            CardKind::Org
        } else {
            CardKind::Client
        };
        let v = verifier
            .verify(&card, Some(c["identity"].as_str().unwrap()), kind)
            .unwrap();
        assert_eq!(v.id().as_bytes(), &arr32(&c["card_id"]));
        assert_eq!(v.signing_key().as_bytes(), &arr32(&c["signing_public_key"]));
        let seed = SigningKey::from_seed(&arr32(&c["signing_seed"])).unwrap();
        assert_eq!(seed.verifying_key(), *v.signing_key());
        verified.push(v);
    }

    // Revocations verify against their cards.
    for r in v1["revocations"].as_array().unwrap() {
        let revocation =
            tessera_proto::card::v1::Revocation::decode(unhex(&r["revocation"]).as_slice())
                .unwrap();
        let parsed = ParsedRevocation::parse(revocation).unwrap();
        let card = verified
            .iter()
            .find(|c| c.id().as_bytes() == &arr32(&r["card_id"]))
            .unwrap();
        parsed
            .verify(
                &ParsedCard::parse(card.card().clone()).unwrap(),
                &key("app_public_key"),
            )
            .unwrap();
    }

    // The checkpoint verifies; every entry is included; consistency holds.
    let log = &v1["transparency_log"];
    let signed =
        SignedCheckpoint::decode(unhex(&log["checkpoint"]["signed_checkpoint"]).as_slice())
            .unwrap();
    let checkpoint = transparency::verify_checkpoint(&signed, &key("kms_public_key")).unwrap();
    let entries = log["entries"].as_array().unwrap();
    for (n, proof) in log["inclusion_proofs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let entry = unhex(&entries[n]["entry"]);
        assert_eq!(
            transparency::leaf_hash(&entry),
            arr32(&entries[n]["leaf_hash"])
        );
        let hashes = proof["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(arr32)
            .collect();
        transparency::verify_inclusion(
            &checkpoint,
            &entry,
            &transparency::inclusion_proof_message(n as u64, checkpoint.tree_size, hashes),
        )
        .unwrap();
    }
    for proof in log["consistency_proofs"].as_array().unwrap() {
        let old_size = proof["old_size"].as_u64().unwrap();
        let old_root = arr32(&log["roots"][old_size as usize]);
        let old = transparency::verify_checkpoint(
            &transparency::sign_checkpoint(&signing(0xa2), old_size, &old_root, 0),
            &key("kms_public_key"),
        )
        .unwrap();
        let hashes = proof["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(arr32)
            .collect();
        transparency::verify_consistency(
            &old,
            &checkpoint,
            &transparency::consistency_proof_message(old_size, checkpoint.tree_size, hashes),
        )
        .unwrap();
    }

    // Every recipient opens the envelope to the stated body.
    let e = &v1["envelopes"][0];
    let envelope = unhex(&e["envelope"]);
    let alice = &verified[0];
    for (n, card) in verified[..3].iter().enumerate() {
        let c = &v1["cards"][n];
        let secret = EncryptionSecret::from_bytes(arr32(&c["x25519_secret"]));
        let payload = ParsedEnvelope::parse(&envelope)
            .unwrap()
            .open(
                &Opener {
                    card_id: *card.id().as_bytes(),
                    secret: &secret,
                },
                &ExpectedSender {
                    identity: "alice",
                    card_id: *alice.id().as_bytes(),
                    key: alice.signing_key(),
                },
            )
            .unwrap();
        assert_eq!(payload.body, e["body"].as_str().unwrap().as_bytes());
        assert_eq!(payload.signed_payload, unhex(&e["signed_payload"]));
        assert_eq!(payload.message_id.to_vec(), unhex(&e["message_id"]));
    }

    // The organisation opens the backup, bound to that envelope.
    let o = &v1["org_backups"][0];
    let org_secret = EncryptionSecret::from_bytes(arr32(&v1["cards"][3]["x25519_secret"]));
    let record = open_org_backup(
        &org_secret,
        o["channel_id"].as_str().unwrap(),
        o["message_index"].as_u64().unwrap(),
        &unhex(&o["encapsulated_key"]),
        &unhex(&o["ciphertext"]),
    )
    .unwrap();
    assert_eq!(record.as_slice(), unhex(&o["backup_record"]).as_slice());
    let record = BackupRecord::decode(record.as_slice()).unwrap();
    check_binding(
        &envelope,
        &record.envelope_sha256,
        &record.content_key,
        &record.original_payload,
        &record.original_signature,
    )
    .unwrap();

    // Safety numbers.
    for s in v1["safety_numbers"].as_array().unwrap() {
        let ids = |side: &Value| -> Vec<CardId> {
            side["card_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| CardId::from_array(arr32(id)))
                .collect()
        };
        let (a, b) = (ids(&s["a"]), ids(&s["b"]));
        let number = SafetyNumber::compute(
            (s["a"]["identity"].as_str().unwrap(), &a),
            (s["b"]["identity"].as_str().unwrap(), &b),
        );
        assert_eq!(number.digits(), s["digits"].as_str().unwrap());
    }

    // Streams decrypt to their plaintexts.
    for f in v1["file_streams"].as_array().unwrap() {
        let key = FileKey::from_bytes(&unhex(&f["file_key"])).unwrap();
        let mut plain = Vec::new();
        stream::decrypt(&key, unhex(&f["stream"]).as_slice(), &mut plain).unwrap();
        let expected = if f["plaintext_rule"].is_null() {
            unhex(&f["plaintext"])
        } else {
            assert_eq!(f["plaintext_rule"], TWO_CHUNK_RULE);
            two_chunk_plaintext()
        };
        assert_eq!(plain, expected);
        assert_eq!(
            tessera_crypto::sha256(&plain).to_vec(),
            unhex(&f["plaintext_sha256"])
        );
    }

    // Key files open to their keys.
    let files = v1["key_files"].as_array().unwrap();
    let app = keystore::open(&unhex(&files[0]["file"]), None)
        .unwrap()
        .into_signing()
        .unwrap();
    assert_eq!(app.verifying_key(), signing(0xa1).verifying_key());
    let device = keystore::open(
        &unhex(&files[1]["file"]),
        Some(files[1]["passphrase"].as_str().unwrap().as_bytes()),
    )
    .unwrap()
    .into_device()
    .unwrap();
    assert_eq!(
        device.signing.verifying_key(),
        signing(0x11).verifying_key()
    );
    assert_eq!(
        device.encryption.public_key(),
        EncryptionSecret::from_bytes([0x12; 32]).public_key()
    );

    // The token verifies at the app server only.
    let v2 = &file["protocol_v2"];
    let t = &v2["tokens"][0];
    let header = t["authorization"].as_str().unwrap();
    let caller = TokenVerifier::new(key("token_public_key"), Audience::Server)
        .verify_header(header)
        .unwrap();
    assert_eq!(caller.identity, "alice");
    assert_eq!(caller.device_card_id, Some(alice.id()));
    assert_eq!(caller.auth, AuthMethod::Device);
    for audience in [Audience::Kms, Audience::Backup] {
        assert_eq!(
            TokenVerifier::new(key("token_public_key"), audience)
                .verify_header(header)
                .unwrap_err(),
            TokenError::WrongAudience
        );
    }

    // Bob's device list applies statement by statement to what it says.
    let lists = &v2["device_lists"];
    let cards: std::collections::BTreeMap<CardId, VerifiedCard> = verified
        .iter()
        .map(|c: &VerifiedCard| (c.id(), c.clone()))
        .collect();
    let mut state = DeviceListState::empty("bob");
    for s in lists["statements"].as_array().unwrap() {
        let parsed = ParsedStatement::parse(SignedDeviceStatement {
            statement: unhex(&s["statement"]),
            signature: unhex(&s["signature"]),
            app_signature: unhex(&s["app_signature"]),
        })
        .unwrap();
        assert_eq!(h(&parsed.hash()), s["statement_hash"].as_str().unwrap());
        let signer = &cards[&parsed.signer()];
        state
            .apply(&parsed, signer, &key("app_public_key"))
            .unwrap();
        let trusted: Vec<String> = state.trusted().iter().map(|c| h(c.as_bytes())).collect();
        assert_eq!(serde_json::json!(trusted), s["trusted_after"]);
    }
    // The channel chain applies statement by statement; the message names
    // its epoch and opens for bob's phone.
    let chain = &v2["channels"];
    let channel_id = chain["channel_id"].as_str().unwrap();
    let mut channel = ChannelState::empty(channel_id);
    for s in chain["chain"].as_array().unwrap() {
        if let Some(envelope) = s.get("envelope") {
            let opened = ParsedEnvelope::parse(&unhex(envelope))
                .unwrap()
                .open(
                    &Opener {
                        card_id: *verified[1].id().as_bytes(),
                        secret: &EncryptionSecret::from_bytes([0x22; 32]),
                    },
                    &ExpectedSender {
                        identity: "alice",
                        card_id: *alice.id().as_bytes(),
                        key: alice.signing_key(),
                    },
                )
                .unwrap();
            let epoch = opened.epoch.unwrap();
            assert_eq!(epoch.number, s["epoch"].as_u64().unwrap());
            assert_eq!(h(&epoch.hash), s["epoch_hash"].as_str().unwrap());
            assert_eq!(channel.hash_at(epoch.number), Some(epoch.hash));
            assert_eq!(opened.body, s["body"].as_str().unwrap().as_bytes());
            continue;
        }
        let parsed = ParsedChannelStatement::parse(SignedChannelStatement {
            statement: unhex(&s["statement"]),
            signature: unhex(&s["signature"]),
        })
        .unwrap();
        assert_eq!(h(&parsed.hash()), s["statement_hash"].as_str().unwrap());
        let signer = &cards[&parsed.signer()];
        channel
            .apply(&parsed, &StatementSigner::of(signer).unwrap())
            .unwrap();
        assert_eq!(members_json(&channel), s["members_after"]);
        assert_eq!(channel.name(), s["name_after"].as_str().unwrap());
    }
    // Sender keys: the ratchet and split as listed; bob's phone opens its
    // copy of alice's chain key, then both group messages.
    let sk = &v2["sender_keys"];
    for step in sk["ratchet"].as_array().unwrap() {
        let (secret, next) = hazmat::sender_key_ratchet_step(&arr32(&step["chain_key"]));
        assert_eq!(h(&secret), step["message_secret"].as_str().unwrap());
        assert_eq!(h(&next), step["next_chain_key"].as_str().unwrap());
        let keys = hazmat::group_message_keys(&secret);
        assert_eq!(h(&keys.key), step["aes_key"].as_str().unwrap());
        assert_eq!(
            h(&keys.commitment_key),
            step["commitment_key"].as_str().unwrap()
        );
        assert_eq!(
            h(&keys.commitment),
            step["key_commitment"].as_str().unwrap()
        );
    }
    let ekc = &sk["envelope_key_commitment"];
    assert_eq!(
        h(&hazmat::envelope_key_commitment(&arr32(
            &ekc["content_key"]
        ))),
        ekc["key_commitment"].as_str().unwrap()
    );
    let c = &sk["chain"];
    let sk_epoch = Epoch {
        number: c["epoch"].as_u64().unwrap(),
        hash: arr32(&c["epoch_hash"]),
    };
    let from = ExpectedSender {
        identity: "alice",
        card_id: *alice.id().as_bytes(),
        key: alice.signing_key(),
    };
    let d = &sk["distribution"];
    let mut rx = ParsedDistribution::parse(&unhex(&d["copy"]))
        .unwrap()
        .open(
            &Opener {
                card_id: *verified[1].id().as_bytes(),
                secret: &EncryptionSecret::from_bytes([0x22; 32]),
            },
            &from,
            &ExpectedChannel {
                channel_id: c["channel_id"].as_str().unwrap(),
                epoch: sk_epoch,
            },
            Retention::KeepHistory,
        )
        .unwrap();
    assert_eq!(h(&rx.chain_id()), c["chain_id"].as_str().unwrap());
    assert_eq!(
        h(&sender_key::chain_id_for(
            &ChainKey::from_bytes(arr32(&c["chain_key"])),
            0
        )),
        c["chain_id"].as_str().unwrap()
    );
    assert_eq!(rx.created_at_ms(), d["created_at_ms"].as_i64().unwrap());
    let listed: Vec<[u8; 32]> = d["recipient_card_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(arr32)
        .collect();
    assert_eq!(
        h(&sender_key::recipients_digest(&listed)),
        d["recipients_sha256"].as_str().unwrap()
    );
    assert_eq!(
        h(rx.recipients_sha256()),
        d["recipients_sha256"].as_str().unwrap()
    );
    for m in sk["group_messages"].as_array().unwrap() {
        let parsed = ParsedGroupEnvelope::parse(&unhex(&m["envelope"])).unwrap();
        assert_eq!(
            u64::from(parsed.generation()),
            m["generation"].as_u64().unwrap()
        );
        let opened = rx.open(&parsed, &from).unwrap();
        assert_eq!(opened.body, m["body"].as_str().unwrap().as_bytes());
        assert_eq!(h(&opened.message_id), m["message_id"].as_str().unwrap());
        assert_eq!(opened.sent_at_ms, m["sent_at_ms"].as_i64().unwrap());
        assert_eq!(opened.epoch, Some(sk_epoch));
    }
    let code = &lists["approval_codes"][0];
    let card: CardId = code["card_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        device_list::approval_code(&card),
        code["code"].as_str().unwrap()
    );
}
