//! Weak keys through the card verifier: a card whose Ed25519 key is of small
//! order or whose X25519 key is not canonical is refused, even when all
//! three of its signatures verify. The cases are the Wycheproof-style files
//! of `tessera-crypto/testdata`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use serde::Deserialize;
use tessera_card::{CardError, CardKind, Verifier, app_sign, kms_sign};
use tessera_crypto::{DeviceKeys, KeyError, SignatureContext, SigningKey};
use tessera_proto::{
    Message as _,
    card::v1::{Card, CardContent, CardKind as PbKind},
};

#[derive(Deserialize)]
struct File {
    tests: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    #[serde(rename = "tcId")]
    tc_id: u32,
    public: String,
    result: String,
}

fn cases(name: &str) -> Vec<Case> {
    let path = format!(
        "{}/../tessera-crypto/testdata/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let file: File = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file.tests
}

struct Keys {
    app: SigningKey,
    kms: SigningKey,
    verifier: Verifier,
}

fn keys() -> Keys {
    let app = SigningKey::generate().unwrap();
    let kms = SigningKey::generate().unwrap();
    let verifier = Verifier::new(app.verifying_key(), kms.verifying_key());
    Keys { app, kms, verifier }
}

/// A card with the given raw keys, self-signed with `self_signature` and
/// signed by the app and the key service: everything a directory would
/// hand out.
fn card(k: &Keys, signing: &[u8], encryption: &[u8], self_signature: Vec<u8>) -> Card {
    let content_snapshot = CardContent {
        version: 1,
        identity: "mallory".into(),
        kind: PbKind::Client as i32,
        device_name: "laptop".into(),
        signing_public_key: signing.to_vec(),
        encryption_public_key: encryption.to_vec(),
        created_at: 1,
        previous_card_id: Vec::new(),
    }
    .encode_to_vec();
    let mut card = Card {
        content_snapshot,
        self_signature,
        ..Card::default()
    };
    app_sign(&mut card, &k.app);
    kms_sign(&mut card, &k.kms);
    card
}

#[test]
fn a_card_with_a_small_order_signing_key_and_a_forged_self_signature_is_refused() {
    let k = keys();
    let good = DeviceKeys::generate().unwrap();
    // A = identity, signature (R = identity, S = 0): "valid" for any message.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut forged = vec![0u8; 64];
    forged[0] = 1;
    let c = card(
        &k,
        &identity,
        good.encryption.public_key().as_bytes(),
        forged,
    );
    assert_eq!(
        k.verifier
            .verify(&c, Some("mallory"), CardKind::Client)
            .unwrap_err(),
        CardError::Key(KeyError::WeakSigningKey)
    );
}

#[test]
fn every_weak_ed25519_key_is_refused_by_the_verifier() {
    let k = keys();
    let good = DeviceKeys::generate().unwrap();
    let mut refused = 0;
    for case in cases("ed25519-public-keys.json") {
        let key = hex::decode(&case.public).unwrap();
        let c = card(
            &k,
            &key,
            good.encryption.public_key().as_bytes(),
            vec![0; 64],
        );
        let result = k.verifier.verify(&c, Some("mallory"), CardKind::Client);
        if case.result == "valid" {
            // Well-formed; only the (dummy) self signature fails.
            assert!(
                matches!(result, Err(CardError::BadSignature(_))),
                "tc {}: {result:?}",
                case.tc_id
            );
        } else {
            assert!(
                matches!(
                    result,
                    Err(CardError::Key(
                        KeyError::WeakSigningKey | KeyError::MalformedSigningKey
                    ))
                ),
                "tc {}: {result:?}",
                case.tc_id
            );
            refused += 1;
        }
    }
    assert!(refused >= 14);
}

#[test]
fn every_weak_or_non_canonical_x25519_key_is_refused_by_the_verifier() {
    let k = keys();
    let mut refused = 0;
    for case in cases("x25519-public-keys.json") {
        let device = DeviceKeys::generate().unwrap();
        let key = hex::decode(&case.public).unwrap();
        let signing = device.signing.verifying_key();
        // Self-sign the exact snapshot, so every signature is genuine.
        let mut c = card(&k, signing.as_bytes(), &key, Vec::new());
        c.self_signature = device
            .signing
            .sign(SignatureContext::CardSelf, &c.content_snapshot)
            .to_vec();
        let result = k.verifier.verify(&c, Some("mallory"), CardKind::Client);
        if case.result == "valid" {
            assert!(result.is_ok(), "tc {}: {result:?}", case.tc_id);
        } else {
            assert!(
                matches!(
                    result,
                    Err(CardError::Key(
                        KeyError::WeakPublicKey | KeyError::NonCanonicalPublicKey
                    ))
                ),
                "tc {}: {result:?}",
                case.tc_id
            );
            refused += 1;
        }
    }
    assert!(refused >= 14);
}
