//! Seed inputs for the fuzz targets, made with Tessera's real encoders and
//! the fixture keys of `bodies.rs`: one or more valid inputs per target (so
//! the fuzzers start deep inside each decoder) plus a little garbage.
//! Written by `TESSERA_WRITE_FUZZ_SEEDS=1 cargo test -p tessera-tests --test
//! fuzz_corpus`; the files are checked in under `fuzz/corpus/<target>/`.

#![allow(
    unreachable_pub,
    clippy::expect_used,
    reason = "test-only seed writer: a failure is a failed test"
)]

use std::path::Path;

use tessera_card::{
    CardKind, ParsedCard, channel, device_list,
    revocation::{RevokedBy, sign_revocation},
    transparency,
};
use tessera_crypto::{
    SignatureContext,
    envelope::{self, Draft, Recipient, Sender},
    hazmat,
    keystore::{self, KdfParams, KeyMaterial, Protection},
    sender_key::{GroupDraft, SenderChain},
    stream::{self, FileKey},
};
use tessera_proto::{
    Message as _,
    auth::v1::{AccessToken, TokenClaims},
    backup::v1::{BackupRecord, OrgEncMsg},
    envelope::v1::{SealedContent, SignedPayload},
    server::v1::{ChainEntry, ChannelChain, StoredMessage},
};
use tessera_service::token::bearer_header;

use crate::bodies::{self, BACKUP_CHANNEL, BACKUP_INDEX, FILE_KEY, RECIPIENT_CARD, fixture};

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(bytes);
    out
}

fn two(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = (a.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}

/// The seeds of every target, by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let f = fixture();
    let garbage = [vec![], vec![0xff; 7], vec![0x0a, 0x03, 1, 2, 3]];
    let sender_card = ParsedCard::parse(f.sender_card.clone()).expect("fixture card");
    let sender_id = sender_card.id();

    // Every random value is fixed (through hazmat), so the seeds are the
    // same each time they are written.
    let sealed = hazmat::seal_envelope_with(
        &Sender {
            identity: "alice",
            card_id: *sender_id.as_bytes(),
            key: &f.sender.signing,
        },
        &Draft {
            channel_id: "general",
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: b"hello",
            sent_at_ms: 1_700_000_000_000,
            epoch: None,
        },
        &[Recipient {
            card_id: RECIPIENT_CARD,
            key: &f.recipient.encryption.public_key(),
        }],
        &hazmat::EnvelopeRandomness {
            message_id: [3; 16],
            content_key: [4; 32],
            ephemeral: &[[5; 32]],
        },
    )
    .expect("seal");
    let payload = SignedPayload {
        version: 1,
        channel_id: "general".into(),
        message_id: vec![3; 16],
        sender_identity: "alice".into(),
        sender_card_id: sender_id.to_vec(),
        sent_at_ms: 1_700_000_000_000,
        recipient_card_ids: vec![RECIPIENT_CARD.to_vec()],
        content_type: envelope::CONTENT_TYPE_TEXT.into(),
        body: b"hello".to_vec(),
        epoch: 0,
        epoch_hash: Vec::new(),
    }
    .encode_to_vec();
    let sealed_content = SealedContent {
        signature: f
            .sender
            .signing
            .sign(SignatureContext::Message, &payload)
            .to_vec(),
        payload: payload.clone(),
    }
    .encode_to_vec();

    let revocation = sign_revocation(sender_id, RevokedBy::App, &f.app, "lost", 2).expect("sign");

    let leaves = [
        transparency::registration_entry(&f.sender_card, "alice", 1),
        transparency::revocation_entry(&revocation, "alice", 2),
        b"third".to_vec(),
    ];
    let tree = transparency::Tree::from_leaves(leaves.iter().map(|l| transparency::leaf_hash(l)));
    let root = tree.root(3).expect("root");
    let checkpoint = transparency::sign_checkpoint(&f.kms, 3, &root, 3);
    let inclusion =
        transparency::inclusion_proof_message(0, 3, tree.inclusion_proof(0, 3).expect("proof"));
    let consistency =
        transparency::consistency_proof_message(1, 3, tree.consistency_proof(1, 3).expect("proof"));

    let claims = TokenClaims {
        version: 2,
        subject: "alice".into(),
        device_card_id: sender_id.to_vec(),
        issued_at: 1_700_000_000,
        expires_at: 4_102_444_800,
        role: tessera_proto::auth::v1::Role::User as i32,
        token_id: vec![6; 16],
        org_member: true,
        audience: "server".into(),
        auth: tessera_proto::auth::v1::AuthMethod::Device as i32,
    }
    .encode_to_vec();
    let token_bytes = AccessToken {
        signature: f.token.sign(SignatureContext::Token, &claims).to_vec(),
        claims: claims.clone(),
    }
    .encode_to_vec();

    let plain_key = keystore::seal(
        &KeyMaterial::Signing(tessera_crypto::SigningKey::from_seed(&[21; 32]).expect("key")),
        &Protection::None,
    )
    .expect("key file");
    let tiny = KdfParams {
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
    };
    let device_key = hazmat::keystore_seal_with(
        &KeyMaterial::Device(bodies_device(22)),
        &Protection::Passphrase(b"passphrase", tiny),
        [7; 16],
        [8; 12],
    )
    .expect("key file");
    // Mode 1 appends the checksum itself.
    let device_key_body = device_key[..device_key.len() - 32].to_vec();

    let file_key = FileKey::from_bytes(&FILE_KEY).expect("key");
    let mut small_stream = Vec::new();
    hazmat::stream_encrypt_with_nonce(&file_key, [9; 16], &b"attachment"[..], &mut small_stream)
        .expect("stream");
    let mut empty_stream = Vec::new();
    hazmat::stream_encrypt_with_nonce(&file_key, [9; 16], &b""[..], &mut empty_stream)
        .expect("stream");
    let two_chunks = vec![0x42u8; stream::CHUNK_SIZE + 10];
    let mut long_stream = Vec::new();
    hazmat::stream_encrypt_with_nonce(&file_key, [9; 16], two_chunks.as_slice(), &mut long_stream)
        .expect("stream");

    let record = BackupRecord {
        channel_id: BACKUP_CHANNEL.into(),
        message_index: BACKUP_INDEX,
        original_payload: payload.clone(),
        original_signature: vec![0; 64],
        server_time_ms: 5,
        envelope_sha256: tessera_crypto::sha256(&sealed.envelope).to_vec(),
        content_key: vec![7; 32],
    }
    .encode_to_vec();
    let org_sealed = hazmat::seal_org_backup_with(
        &f.org.public_key(),
        BACKUP_CHANNEL,
        BACKUP_INDEX,
        &record,
        &[10; 32],
    )
    .expect("seal");
    let org_enc_msg = OrgEncMsg {
        org_card_id: vec![4; 32],
        encapsulated_key: org_sealed.encapsulated_key.to_vec(),
        ciphertext: org_sealed.ciphertext,
    }
    .encode_to_vec();

    let stored_message = StoredMessage {
        channel_id: "0123456789abcdef0123456789abcdef".into(),
        index: 1,
        sender_identity: "alice".into(),
        sender_card_id: sender_id.to_vec(),
        client_message_id: vec![3; 16],
        server_time_ms: 5,
        envelope: sealed.envelope.clone(),
        epoch: 0,
        kind: 0,
    }
    .encode_to_vec();
    let stored_card = tessera_kms::store::StoredCard {
        card: Some(f.sender_card.clone()),
        identity: "alice".into(),
        kind: 1,
        registration_index: 0,
        registration_entry: leaves[0].clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let account = tessera_server::store::Account {
        identity: "alice".into(),
        password: Some(tessera_server::store::PasswordHash {
            m_cost_kib: 19456,
            t_cost: 2,
            p_cost: 1,
            salt: vec![1; 16],
            hash: vec![2; 32],
        }),
        created_at: 1,
        admin: true,
        device_list_started: false,
    }
    .encode_to_vec();

    // Protocol v2: a device-list genesis, a channel creation and its chain,
    // a sender key's copy and two group messages.
    let alice_card = f
        .verifier
        .verify(&f.sender_card, Some("alice"), CardKind::Client)
        .expect("fixture card");
    let mut genesis = device_list::NewStatement {
        identity: "alice",
        seqno: 0,
        previous_hash: None,
        action: device_list::Action::Genesis,
        subject: alice_card.id(),
        signer: alice_card.id(),
        created_at: 1,
    }
    .sign(&f.sender.signing);
    device_list::app_cosign(&mut genesis, &f.app);
    let creation = channel::NewChannelStatement {
        channel_id: bodies::SENDER_KEY_CHANNEL,
        epoch: 0,
        previous_hash: None,
        signer_identity: "alice",
        signer: alice_card.id(),
        created_at: 1,
        change: channel::Change::Create {
            name: "plans".into(),
            visibility: channel::Visibility::Shared,
            members: vec![("alice".into(), channel::Role::Admin)],
        },
    }
    .sign(&f.sender.signing);
    let chain = ChannelChain {
        channel_id: bodies::SENDER_KEY_CHANNEL.into(),
        length: 1,
        entries: vec![ChainEntry {
            statement: Some(creation.clone()),
            server_time_ms: 5,
            next_index: 1,
        }],
    };
    let alice_sender = Sender {
        identity: "alice",
        card_id: *alice_card.id().as_bytes(),
        key: &f.sender.signing,
    };
    let mut sender_chain = bodies::sender_chain();
    let copy = sender_chain
        .distribute(
            &alice_sender,
            &[Recipient {
                card_id: RECIPIENT_CARD,
                key: &f.recipient.encryption.public_key(),
            }],
            1,
        )
        .expect("distribute")
        .pop()
        .expect("one copy")
        .distribution;
    let group = |n: usize, chain: &mut SenderChain| {
        chain
            .seal(
                &alice_sender,
                &GroupDraft {
                    content_type: envelope::CONTENT_TYPE_TEXT,
                    body: format!("message {n}").as_bytes(),
                    sent_at_ms: 2,
                },
            )
            .expect("seal")
            .envelope
    };
    let (first, second) = (group(0, &mut sender_chain), group(1, &mut sender_chain));

    let with_garbage = |mut v: Vec<Vec<u8>>| {
        v.extend(garbage.iter().cloned());
        v
    };
    vec![
        (
            "envelope_header",
            with_garbage(vec![sealed.envelope.clone()]),
        ),
        (
            "envelope_body",
            with_garbage(vec![with_mode(0, &sealed_content), with_mode(1, &payload)]),
        ),
        (
            "card_snapshot",
            with_garbage(vec![
                with_mode(0, &f.sender_card.encode_to_vec()),
                with_mode(1, &f.sender_card.content_snapshot),
            ]),
        ),
        (
            "revocation",
            with_garbage(vec![
                with_mode(0, &revocation.encode_to_vec()),
                with_mode(1, &revocation.content_snapshot),
            ]),
        ),
        (
            "checkpoint",
            with_garbage(vec![
                with_mode(
                    0,
                    &two(&checkpoint.encode_to_vec(), &inclusion.encode_to_vec()),
                ),
                with_mode(
                    1,
                    &two(&checkpoint.content_snapshot, &consistency.encode_to_vec()),
                ),
            ]),
        ),
        ("log_entry", with_garbage(leaves[..2].to_vec())),
        (
            "token",
            with_garbage(vec![
                with_mode(0, bearer_header(&token_bytes).as_bytes()),
                with_mode(1, &claims),
            ]),
        ),
        (
            "key_file",
            with_garbage(vec![
                with_mode(0, &plain_key),
                with_mode(1, &device_key_body),
            ]),
        ),
        (
            "stream_chunks",
            with_garbage(vec![
                with_mode(0, &small_stream),
                with_mode(0, &empty_stream),
                with_mode(0, &long_stream),
                with_mode(1, b"plaintext"),
            ]),
        ),
        (
            "backup_record",
            with_garbage(vec![with_mode(0, &org_enc_msg), with_mode(1, &record)]),
        ),
        (
            "device_statement",
            with_garbage(vec![
                with_mode(0, &genesis.encode_to_vec()),
                with_mode(1, &genesis.statement),
            ]),
        ),
        (
            "channel_statement",
            with_garbage(vec![
                with_mode(0, &creation.encode_to_vec()),
                with_mode(1, &creation.statement),
                with_mode(2, &chain.encode_to_vec()),
            ]),
        ),
        (
            "sender_key",
            with_garbage(vec![
                with_mode(0, &two(&copy, &first)),
                with_mode(1, &second),
                with_mode(1, &first),
            ]),
        ),
        (
            "store_records",
            with_garbage(vec![
                with_mode(0, &account),
                with_mode(6, &stored_message),
                with_mode(7, &stored_card),
                with_mode(8, &checkpoint.encode_to_vec()),
                with_mode(
                    9,
                    &tessera_server::store::Usage {
                        message_bytes: 1 << 20,
                        attachment_bytes: 3,
                        attachments: 1,
                    }
                    .encode_to_vec(),
                ),
            ]),
        ),
    ]
}

fn bodies_device(seed: u8) -> tessera_crypto::DeviceKeys {
    tessera_crypto::DeviceKeys {
        signing: tessera_crypto::SigningKey::from_seed(&[seed; 32]).expect("key"),
        encryption: tessera_crypto::EncryptionSecret::from_bytes([seed; 32]),
    }
}

/// Writes every target's seeds to `<root>/<target>/seed-<n>` (replacing
/// earlier seeds of that name).
pub fn write_all(root: &Path) {
    for (target, seeds) in all() {
        assert!(
            bodies::TARGETS.iter().any(|(name, _)| *name == target),
            "{target} has no body"
        );
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).expect("seed");
        }
    }
}
