//! The bodies of Tessera's fuzz targets: one function per decoder of bytes
//! that come from the network or from disk. Each must return (never panic,
//! hang or allocate without bound) on any input.
//!
//! This file is compiled twice: by the `tessera-fuzz` crate (cargo-fuzz,
//! nightly, libFuzzer) and, through `#[path]`, by the workspace test
//! `tests/fuzz_corpus.rs`, which runs every body over the checked-in seed
//! corpus on stable as part of `cargo test --workspace`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    reason = "fuzz harness: a panic is a finding; public for the fuzz crate, private in the test"
)]

use std::sync::OnceLock;

use tessera_card::{
    CardKind, ParsedCard, VerifiedCard, Verifier, app_sign,
    channel::{ChannelState, ParsedChannelStatement, ServedChain, StatementSigner},
    device_list::{DeviceListState, ParsedStatement},
    kms_sign,
    revocation::ParsedRevocation,
    transparency,
};
use tessera_crypto::{
    DeviceKeys, EncryptionSecret, SignatureContext, SigningKey,
    envelope::{Epoch, ExpectedSender, Opener, ParsedEnvelope, Sender, VerifiedPayload},
    hazmat, keystore, open_org_backup, seal_org_backup,
    sender_key::{
        ChainKey, ExpectedChannel, ParsedDistribution, ParsedGroupEnvelope, Retention, SenderChain,
    },
    stream::{self, FileKey},
};
use tessera_proto::{
    Message as _,
    auth::v1::AccessToken,
    backup::v1::{BackupRecord, OrgEncMsg},
    card::v1::{Card, Revocation, SignedDeviceStatement},
    channel::v1::SignedChannelStatement,
    envelope::v1::{Envelope, EnvelopeHeader, HistoryItem, SealedContent, Stanza},
    server::v1::ChannelChain,
    transparency::v1::{ConsistencyProof, InclusionProof, SignedCheckpoint},
};
use tessera_service::{TokenVerifier, token::bearer_header};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs`).
pub const TARGETS: &[(&str, Body)] = &[
    ("envelope_header", envelope_header),
    ("envelope_body", envelope_body),
    ("card_snapshot", card_snapshot),
    ("revocation", revocation),
    ("checkpoint", checkpoint),
    ("log_entry", log_entry),
    ("token", token),
    ("key_file", key_file),
    ("stream_chunks", stream_chunks),
    ("backup_record", backup_record),
    ("store_records", store_records),
    ("device_statement", device_statement),
    ("channel_statement", channel_statement),
    ("sender_key", sender_key),
];

/// Fixed keys, made once: the fuzzer must see a deterministic target.
pub struct Fixture {
    pub app: SigningKey,
    pub kms: SigningKey,
    pub token: SigningKey,
    pub sender: DeviceKeys,
    pub recipient: DeviceKeys,
    pub org: EncryptionSecret,
    pub verifier: Verifier,
    /// A valid, fully signed card of `sender` ("alice").
    pub sender_card: Card,
    /// The content key wrapped for `recipient`, card id [2; 32].
    pub stanza: Stanza,
}

pub const CONTENT_KEY: [u8; 32] = [7; 32];
pub const RECIPIENT_CARD: [u8; 32] = [2; 32];
pub const FILE_KEY: [u8; 32] = [5; 32];
/// The channel and index every backup record of the targets is sealed for.
pub const BACKUP_CHANNEL: &str = "c";
pub const BACKUP_INDEX: u64 = 1;

fn device(seed: u8) -> DeviceKeys {
    DeviceKeys {
        signing: SigningKey::from_seed(&[seed; 32]).expect("fixed key"),
        encryption: EncryptionSecret::from_bytes([seed.wrapping_add(100); 32]),
    }
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = |seed| SigningKey::from_seed(&[seed; 32]).expect("fixed key");
        let (app, kms, token) = (key(11), key(12), key(13));
        let sender = device(1);
        let recipient = device(2);
        let mut sender_card = tessera_card::NewCard {
            identity: "alice",
            kind: CardKind::Client,
            device_name: "laptop",
            created_at: 1,
            previous_card_id: None,
        }
        .self_signed(&sender)
        .expect("fixed key");
        app_sign(&mut sender_card, &app);
        kms_sign(&mut sender_card, &kms);
        let wrapped = hazmat::wrap_content_key(
            &recipient.encryption.public_key(),
            &RECIPIENT_CARD,
            &CONTENT_KEY,
        )
        .expect("fixed key");
        Fixture {
            verifier: Verifier::new(app.verifying_key(), kms.verifying_key()),
            app,
            kms,
            token,
            sender,
            recipient,
            org: EncryptionSecret::from_bytes([9; 32]),
            sender_card,
            stanza: Stanza {
                card_id: RECIPIENT_CARD.to_vec(),
                encapsulated_key: wrapped.encapsulated_key.to_vec(),
                wrapped_key: wrapped.ciphertext,
            },
        }
    })
}

/// The first byte picks a mode; the rest is the input.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((mode, rest)) => (*mode, rest),
        None => (0, data),
    }
}

/// Two inputs in one: a big-endian u16 length, that many bytes, the rest.
fn two(data: &[u8]) -> (&[u8], &[u8]) {
    match data {
        [a, b, rest @ ..] => {
            let n = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
            rest.split_at(n)
        }
        _ => (data, &[]),
    }
}

/// An envelope from the network (the app server parses every one it stores).
pub fn envelope_header(data: &[u8]) {
    if let Ok(parsed) = ParsedEnvelope::parse(data) {
        let _ = parsed.sender_card_id();
        let _ = parsed.recipient_count();
        let _ = parsed.has_recipient(&RECIPIENT_CARD);
    }
}

/// An envelope body: the fuzz input is put behind a genuine stanza and
/// AEAD layer, so opening reaches the decoders of what the sender sealed.
/// Mode 0: the input is the SealedContent; mode 1: it is the SignedPayload,
/// signed by the sender's real key.
pub fn envelope_body(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let sealed = if mode % 2 == 0 {
        input.to_vec()
    } else {
        SealedContent {
            payload: input.to_vec(),
            signature: f
                .sender
                .signing
                .sign(SignatureContext::Message, input)
                .to_vec(),
        }
        .encode_to_vec()
    };
    let parsed_card = match ParsedCard::parse(f.sender_card.clone()) {
        Ok(c) => c,
        Err(_) => return,
    };
    let header = EnvelopeHeader {
        version: 1,
        sender_card_id: parsed_card.id().to_vec(),
        stanzas: vec![f.stanza.clone()],
    }
    .encode_to_vec();
    let ciphertext = hazmat::aes256gcm_seal(&CONTENT_KEY, [0; 12], &header, &sealed);
    let envelope = Envelope { header, ciphertext }.encode_to_vec();
    let Ok(parsed) = ParsedEnvelope::parse(&envelope) else {
        return;
    };
    let _ = parsed.open(
        &Opener {
            card_id: RECIPIENT_CARD,
            secret: &f.recipient.encryption,
        },
        &ExpectedSender {
            identity: "alice",
            card_id: *parsed_card.id().as_bytes(),
            key: parsed_card.signing_key(),
        },
    );
    let _ = VerifiedPayload::claimed_sender(input);
}

/// A card from the key service, or a card snapshot signed by the app and
/// the key service (mode 1), through the verifier.
pub fn card_snapshot(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let card = if mode % 2 == 0 {
        match Card::decode(input) {
            Ok(c) => c,
            Err(_) => return,
        }
    } else {
        let mut c = Card {
            content_snapshot: input.to_vec(),
            self_signature: vec![0; 64],
            ..Card::default()
        };
        app_sign(&mut c, &f.app);
        kms_sign(&mut c, &f.kms);
        c
    };
    if let Ok(parsed) = ParsedCard::parse(card.clone()) {
        let _ = parsed.check_self_signature();
        let _ = f
            .verifier
            .verify(&card, Some(parsed.identity()), parsed.kind());
    }
    let _ = f.verifier.verify(&card, None, CardKind::Client);
}

/// A revocation, raw (mode 0) or with its content signed by the AppKey (mode 1).
pub fn revocation(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let revocation = if mode % 2 == 0 {
        match Revocation::decode(input) {
            Ok(r) => r,
            Err(_) => return,
        }
    } else {
        Revocation {
            content_snapshot: input.to_vec(),
            signature: f.app.sign(SignatureContext::Revocation, input).to_vec(),
        }
    };
    if let (Ok(r), Ok(card)) = (
        ParsedRevocation::parse(revocation),
        ParsedCard::parse(f.sender_card.clone()),
    ) {
        let _ = r.verify(&card, &f.app.verifying_key());
        let _ = (r.card_id(), r.revoked_by(), r.revoked_at(), r.reason());
    }
}

/// A signed checkpoint (mode 1: content signed by the KMS key), then
/// inclusion and consistency proofs decoded from the rest of the input.
pub fn checkpoint(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let (head, tail) = two(input);
    let signed = if mode % 2 == 0 {
        match SignedCheckpoint::decode(head) {
            Ok(s) => s,
            Err(_) => return,
        }
    } else {
        SignedCheckpoint {
            content_snapshot: head.to_vec(),
            signature: f.kms.sign(SignatureContext::Checkpoint, head).to_vec(),
        }
    };
    let kms_key = f.kms.verifying_key();
    let Ok(checkpoint) = transparency::verify_checkpoint(&signed, &kms_key) else {
        return;
    };
    if let Ok(proof) = InclusionProof::decode(tail) {
        let _ = transparency::verify_inclusion(&checkpoint, b"entry", &proof);
    }
    if let Ok(proof) = ConsistencyProof::decode(tail) {
        let empty = transparency::sign_checkpoint(
            &f.kms,
            0,
            &transparency::Tree::new().root(0).unwrap_or_default(),
            0,
        );
        if let Ok(old) = transparency::verify_checkpoint(&empty, &kms_key) {
            let _ = transparency::verify_consistency(&old, &checkpoint, &proof);
            let _ = transparency::verify_consistency(&checkpoint, &checkpoint, &proof);
        }
    }
}

/// A transparency-log entry (the key service's leaves, sent to clients).
pub fn log_entry(data: &[u8]) {
    let _ = transparency::parse_entry(data);
    if let Ok(card) = transparency::registered_card(data) {
        let _ = ParsedCard::parse(card);
    }
    let _ = transparency::leaf_hash(data);
}

/// An `authorization` header (mode 0), or token claims signed by the real
/// token key (mode 1).
pub fn token(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let verifier = TokenVerifier::new(
        f.token.verifying_key(),
        tessera_service::token::Audience::Server,
    );
    if mode % 2 == 0 {
        if let Ok(header) = std::str::from_utf8(input) {
            let _ = verifier.verify_header(header);
        }
        let _ = verifier.verify_header(&bearer_header(input));
    } else {
        let token = AccessToken {
            claims: input.to_vec(),
            signature: f.token.sign(SignatureContext::Token, input).to_vec(),
        };
        let _ = verifier.verify_header(&bearer_header(&token.encode_to_vec()));
    }
}

/// A key file. Mode 1 lowers any Argon2id cost to the minimum and fixes the
/// trailing checksum, so decryption and the key decoders are reached.
pub fn key_file(data: &[u8]) {
    let (mode, input) = split(data);
    let _ = keystore::is_protected(input);
    if mode % 2 == 0 {
        let _ = keystore::open(input, None);
        let _ = keystore::open(input, Some(b"passphrase"));
        return;
    }
    let mut bytes = input.to_vec();
    if bytes.len() > 22 && bytes.get(9) == Some(&1) {
        bytes[10..14].copy_from_slice(&8u32.to_be_bytes());
        bytes[14..18].copy_from_slice(&1u32.to_be_bytes());
        bytes[18..22].copy_from_slice(&1u32.to_be_bytes());
    }
    let checksum = tessera_crypto::sha256(&bytes);
    bytes.extend_from_slice(&checksum);
    let _ = keystore::open(&bytes, None);
    let _ = keystore::open(&bytes, Some(b"passphrase"));
}

/// An attachment stream as downloaded. Mode 0: the input is the stream;
/// mode 1: the input is a plaintext, encrypted, then one byte flipped
/// (the round trip must hold, the flip must be caught).
pub fn stream_chunks(data: &[u8]) {
    let (mode, input) = split(data);
    let key = FileKey::from_bytes(&FILE_KEY).expect("fixed key");
    if mode % 2 == 0 {
        let _ = stream::decrypt(&key, input, std::io::sink());
        return;
    }
    let mut sealed = Vec::new();
    if stream::encrypt(&key, input, &mut sealed).is_err() {
        return;
    }
    let mut plain = Vec::new();
    let ok = stream::decrypt(&key, sealed.as_slice(), &mut plain).is_ok();
    assert!(ok && plain == input, "stream round trip failed");
    if !sealed.is_empty() {
        let at = usize::from(mode) * 7919 % sealed.len();
        sealed[at] ^= 0x01;
        assert!(
            stream::decrypt(&key, sealed.as_slice(), std::io::sink()).is_err(),
            "a flipped stream byte went unnoticed"
        );
    }
}

/// What a member submits as a backup (an OrgEncMsg), and the history item
/// the organisation sends back. Mode 1 seals the input to the OrgKey first,
/// so the record decoders are reached.
pub fn backup_record(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let plain = if mode % 2 == 0 {
        let Ok(msg) = OrgEncMsg::decode(input) else {
            return;
        };
        match open_org_backup(
            &f.org,
            BACKUP_CHANNEL,
            BACKUP_INDEX,
            &msg.encapsulated_key,
            &msg.ciphertext,
        ) {
            Ok(p) => p.to_vec(),
            Err(_) => return,
        }
    } else {
        let Ok(sealed) = seal_org_backup(&f.org.public_key(), BACKUP_CHANNEL, BACKUP_INDEX, input)
        else {
            return;
        };
        match open_org_backup(
            &f.org,
            BACKUP_CHANNEL,
            BACKUP_INDEX,
            &sealed.encapsulated_key,
            &sealed.ciphertext,
        ) {
            Ok(p) => p.to_vec(),
            Err(_) => return,
        }
    };
    if let Ok(record) = BackupRecord::decode(plain.as_slice()) {
        let _ = VerifiedPayload::claimed_sender(&record.original_payload);
        // The ingestion check against a stored envelope.
        let _ = tessera_crypto::envelope::check_binding(
            &record.original_payload,
            &record.envelope_sha256,
            &record.content_key,
            &record.original_payload,
            &record.original_signature,
        );
    }
    if let Ok(item) = HistoryItem::decode(plain.as_slice()) {
        let _ = VerifiedPayload::claimed_sender(&item.original_payload);
    }
}

/// Every record the three services keep in their stores, decoded from
/// what is on disk (the first byte picks the record type).
pub fn store_records(data: &[u8]) {
    use tessera_backup::store as backup;
    use tessera_kms::store as kms;
    use tessera_server::store as server;
    let (kind, input) = split(data);
    match kind % 11 {
        0 => {
            let _ = server::Account::decode(input);
        }
        1 => {
            let _ = server::Device::decode(input);
        }
        2 => {
            let _ = server::ChannelRecord::decode(input);
        }
        3 => {
            let _ = server::MemberRecord::decode(input);
        }
        4 => {
            let _ = server::AttachmentRecord::decode(input);
        }
        5 => {
            let _ = server::PasswordHash::decode(input);
        }
        6 => {
            let _ = tessera_proto::server::v1::StoredMessage::decode(input);
        }
        7 => {
            if let Ok(stored) = kms::StoredCard::decode(input) {
                if let Some(card) = stored.card {
                    let _ = ParsedCard::parse(card);
                }
                let _ = transparency::parse_entry(&stored.registration_entry);
            }
        }
        8 => {
            let _ = SignedCheckpoint::decode(input);
            let _ = tessera_service::storage::read_u64(input);
        }
        9 => {
            let _ = server::Usage::decode(input);
        }
        _ => {
            let _ = backup::Archived::decode(input);
        }
    }
}

/// The fixture's card ("alice"), verified.
fn verified_sender() -> VerifiedCard {
    let f = fixture();
    f.verifier
        .verify(&f.sender_card, Some("alice"), CardKind::Client)
        .expect("the fixture's card verifies")
}

/// A device-list statement (mode 0), applied as the genesis of "alice"'s
/// list with the fixture's card as signer; or (mode 1) the rest signed by
/// that card, so parsing and the rules see well-signed content.
pub fn device_statement(data: &[u8]) {
    let f = fixture();
    let (mode, input) = split(data);
    let signed = if mode % 2 == 0 {
        match SignedDeviceStatement::decode(input) {
            Ok(s) => s,
            Err(_) => return,
        }
    } else {
        let mut s = SignedDeviceStatement {
            statement: input.to_vec(),
            signature: f
                .sender
                .signing
                .sign(SignatureContext::DeviceStatement, input)
                .to_vec(),
            app_signature: Vec::new(),
        };
        tessera_card::device_list::app_cosign(&mut s, &f.app);
        s
    };
    if let Ok(parsed) = ParsedStatement::parse(signed) {
        let _ = (
            parsed.hash(),
            parsed.seqno(),
            parsed.action(),
            parsed.subject(),
        );
        let mut state = DeviceListState::empty("alice");
        let _ = state.apply(&parsed, &verified_sender(), &f.app.verifying_key());
    }
}

/// A channel statement (mode 0) applied to an empty chain with the
/// fixture's card as signer, its bytes signed by that card (mode 1), or a
/// served chain (mode 2: `ChannelChain`) parsed and extended.
pub fn channel_statement(data: &[u8]) {
    let f = fixture();
    let card = verified_sender();
    let Some(signer) = StatementSigner::of(&card) else {
        return;
    };
    let (mode, input) = split(data);
    match mode % 3 {
        0 | 1 => {
            let signed = if mode % 3 == 0 {
                match SignedChannelStatement::decode(input) {
                    Ok(s) => s,
                    Err(_) => return,
                }
            } else {
                SignedChannelStatement {
                    statement: input.to_vec(),
                    signature: f
                        .sender
                        .signing
                        .sign(SignatureContext::ChannelStatement, input)
                        .to_vec(),
                }
            };
            if let Ok(parsed) = ParsedChannelStatement::parse(signed) {
                let mut state = ChannelState::empty(parsed.channel_id());
                let _ = state.apply(&parsed, &signer);
                let _ = (state.members_at(0), state.was_member("alice", 0));
            }
        }
        _ => {
            let Ok(chain) = ChannelChain::decode(input) else {
                return;
            };
            let statements = chain
                .entries
                .into_iter()
                .map(|e| e.statement.unwrap_or_default())
                .collect();
            if let Ok(served) = ServedChain::parse(statements, chain.length) {
                let mut state = ChannelState::empty(&chain.channel_id);
                let _ = served.extend(&mut state, &|identity: &str, _| {
                    (identity == "alice").then(|| card.clone())
                });
            }
        }
    }
}

/// The fixed sender chain of the `sender_key` target: alice's, for
/// channel [`BACKUP_CHANNEL`] at epoch 1.
pub fn sender_chain() -> SenderChain {
    let f = fixture();
    SenderChain::with(
        &Sender {
            identity: "alice",
            card_id: *verified_sender().id().as_bytes(),
            key: &f.sender.signing,
        },
        SENDER_KEY_CHANNEL,
        SENDER_KEY_EPOCH,
        ChainKey::from_bytes([3; 32]),
        0,
    )
}

/// The channel of the `sender_key` target (32 hex digits).
pub const SENDER_KEY_CHANNEL: &str = "0123456789abcdef0123456789abcdef";
pub const SENDER_KEY_EPOCH: Epoch = Epoch {
    number: 1,
    hash: [6; 32],
};

/// A distribution copy (mode 0) opened by the fixture's recipient and, when
/// it opens, (mode 1 input) a group envelope opened with the chain it gave;
/// or (mode 2) a group envelope opened with the fixed chain's key as given
/// to the recipient.
pub fn sender_key(data: &[u8]) {
    let f = fixture();
    let card = verified_sender();
    let sender = ExpectedSender {
        identity: "alice",
        card_id: *card.id().as_bytes(),
        key: card.signing_key(),
    };
    let opener = Opener {
        card_id: RECIPIENT_CARD,
        secret: &f.recipient.encryption,
    };
    let expected = ExpectedChannel {
        channel_id: SENDER_KEY_CHANNEL,
        epoch: SENDER_KEY_EPOCH,
    };
    let (mode, input) = split(data);
    let (copy, envelope) = if mode % 2 == 0 {
        two(input)
    } else {
        (&[][..], input)
    };
    let copy = if mode % 2 == 0 {
        copy.to_vec()
    } else {
        // The fixed chain's own copy for the recipient.
        match sender_chain().distribute(
            &Sender {
                identity: "alice",
                card_id: *card.id().as_bytes(),
                key: &f.sender.signing,
            },
            &[tessera_crypto::envelope::Recipient {
                card_id: RECIPIENT_CARD,
                key: &f.recipient.encryption.public_key(),
            }],
            1,
        ) {
            Ok(mut copies) => match copies.pop() {
                Some(c) => c.distribution,
                None => return,
            },
            Err(_) => return,
        }
    };
    let Ok(parsed) = ParsedDistribution::parse(&copy) else {
        return;
    };
    let _ = (parsed.channel_id(), parsed.epoch(), parsed.chain_id());
    let Ok(mut chain) = parsed.open(&opener, &sender, &expected, Retention::KeepHistory) else {
        return;
    };
    if let Ok(group) = ParsedGroupEnvelope::parse(envelope) {
        let _ = (group.generation(), group.chain_id(), group.epoch());
        let _ = chain.open_history(&group, &sender);
        let _ = chain.open(&group, &sender);
        let _ = chain.open(&group, &sender);
    }
}
