//! HPKE (RFC 9180) base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and
//! AES-256-GCM.
//!
//! Sender: the encapsulation is an ephemeral X25519 agreement, done with
//! ring (the fastest X25519 here; ring cannot hold a static X25519 key, but
//! the sender's key is ephemeral). The RFC 9180 key schedule on top of it is
//! written out below with ring's HMAC-SHA256 / HKDF and AES-256-GCM, and is
//! checked byte for byte against the RFC 9180 vectors from the DH output on
//! (`hazmat::hpke_seal_base_from_dh`).
//!
//! Receiver: the `hpke` crate with the device's static X25519 key
//! (x25519-dalek). Every seal is thus checked against an independent
//! implementation whenever it is opened.

use hpke::{
    Deserializable, OpModeR,
    aead::{AeadTag, AesGcm256},
    inout::InOutBuf,
    kdf::HkdfSha256,
    kem::X25519HkdfSha256,
};
use ring::{
    agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519},
    hkdf, hmac,
    rand::SystemRandom,
};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::{EncryptionPublicKey, EncryptionSecret, KeyError, aead};

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = AesGcm256;
type KemPrivateKey = <Kem as hpke::Kem>::PrivateKey;
type EncappedKey = <Kem as hpke::Kem>::EncappedKey;

/// Length of an encapsulated key (an X25519 public key).
pub(crate) const ENC_LEN: usize = 32;
/// Length of the AES-256-GCM tag HPKE appends.
pub(crate) const HPKE_TAG_LEN: usize = 16;

/// suite_id of the KEM: "KEM" || I2OSP(kem_id = 0x0020, 2).
const SUITE_KEM: &[u8] = b"KEM\x00\x20";
/// suite_id of HPKE: "HPKE" || kem_id || kdf_id (0x0001) || aead_id (0x0002).
const SUITE_HPKE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x02";
const MODE_BASE: u8 = 0x00;

/// The HPKE `info` strings Tessera uses: one per purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HpkeInfo {
    /// Wrapping an envelope's content key for one recipient card.
    KeyWrap,
    /// An OrgEncMsg: a backup record sealed to the OrgCard.
    OrgBackup,
    /// A signed sender chain key sealed to one recipient card.
    SenderKeyWrap,
}

impl HpkeInfo {
    pub(crate) fn label(self) -> &'static [u8] {
        match self {
            Self::KeyWrap => b"tessera/v1/envelope/key-wrap",
            Self::OrgBackup => b"tessera/v1/org-backup",
            Self::SenderKeyWrap => b"tessera/v2/sender-key/wrap",
        }
    }
}

/// HPKE failed to open: wrong key, altered ciphertext or wrong associated data.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HpkeOpenError {
    #[error("encapsulated key must be 32 bytes, got {0}")]
    EncLength(usize),
    #[error("HPKE ciphertext too short ({0} bytes)")]
    TooShort(usize),
    #[error("HPKE decryption failed: wrong key or altered ciphertext")]
    Failed,
}

/// An HPKE-sealed message: the encapsulated key and the ciphertext (with tag).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedToKey {
    pub encapsulated_key: [u8; ENC_LEN],
    pub ciphertext: Vec<u8>,
}

/// LabeledExtract(salt, label, ikm) = HKDF-Extract(salt, "HPKE-v1" || suite_id || label || ikm).
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<[u8; 32]> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut ctx = hmac::Context::with_key(&key);
    for part in [b"HPKE-v1".as_slice(), suite, label, ikm] {
        ctx.update(part);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// LabeledExpand(prk, label, info, L) = HKDF-Expand(prk, I2OSP(L, 2) || "HPKE-v1" || suite_id || label || info, L).
fn labeled_expand<const L: usize>(
    suite: &[u8],
    prk: &[u8; 32],
    label: &[u8],
    info: &[u8],
) -> Zeroizing<[u8; L]> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (L as u16).to_be_bytes();
    let parts = [length.as_slice(), b"HPKE-v1", suite, label, info];
    let mut out = Zeroizing::new([0u8; L]);
    // L is 12 or 32 here, far below HKDF-SHA256's 255 * 32 limit, so expand
    // and fill cannot fail; on the impossible failure `out` stays zero and
    // the AEAD open on the other side fails.
    if let Ok(okm) = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk).expand(&parts, Len(L)) {
        let _ = okm.fill(out.as_mut());
    }
    out
}

/// RFC 9180 section 4.1 ExtractAndExpand for DHKEM(X25519, HKDF-SHA256):
/// the KEM shared secret from the DH output and kem_context = enc || pkR.
fn extract_and_expand(dh: &[u8; 32], enc: &[u8; 32], pk_r: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let eae_prk = labeled_extract(SUITE_KEM, b"", b"eae_prk", dh);
    let mut kem_context = [0u8; 64];
    kem_context[..32].copy_from_slice(enc);
    kem_context[32..].copy_from_slice(pk_r);
    labeled_expand::<32>(SUITE_KEM, &eae_prk, b"shared_secret", &kem_context)
}

/// RFC 9180 section 5.1 KeySchedule for mode_base (empty psk and psk_id):
/// the AEAD key and base nonce.
fn key_schedule(shared_secret: &[u8; 32], info: &[u8]) -> (Zeroizing<[u8; 32]>, [u8; 12]) {
    let psk_id_hash = labeled_extract(SUITE_HPKE, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(SUITE_HPKE, b"", b"info_hash", info);
    let mut context = [0u8; 65];
    context[0] = MODE_BASE;
    context[1..33].copy_from_slice(psk_id_hash.as_ref());
    context[33..].copy_from_slice(info_hash.as_ref());
    let secret = labeled_extract(SUITE_HPKE, shared_secret, b"secret", b"");
    let key = labeled_expand::<32>(SUITE_HPKE, &secret, b"key", &context);
    let base_nonce = labeled_expand::<12>(SUITE_HPKE, &secret, b"base_nonce", &context);
    (key, *base_nonce)
}

/// SealBase from the DH output on: the deterministic half of the sender,
/// shared by production (DH from ring) and the RFC 9180 vector test (DH from
/// the vector's skEm).
pub(crate) fn seal_from_dh(
    dh: &[u8; 32],
    enc: &[u8; 32],
    pk_r: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let shared_secret = extract_and_expand(dh, enc, pk_r);
    let (key, base_nonce) = key_schedule(&shared_secret, info);
    // Sequence number 0: the nonce is base_nonce itself.
    aead::seal(&key, base_nonce, aad, plaintext)
}

/// SealBase(pkR, info, aad, pt) with a fresh ephemeral key from ring, or,
/// for test vectors only ([`crate::hazmat`]), with the given ephemeral
/// X25519 secret (x25519-dalek).
pub(crate) fn seal_base(
    recipient: &EncryptionPublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    ephemeral: Option<&[u8; 32]>,
) -> Result<SealedToKey, KeyError> {
    if let Some(esk) = ephemeral {
        let secret = EncryptionSecret::from_bytes(*esk);
        let enc = *secret.public_key().as_bytes();
        let dh = secret.agree(recipient.as_bytes())?;
        let ciphertext = seal_from_dh(&dh, &enc, recipient.as_bytes(), info, aad, plaintext);
        return Ok(SealedToKey {
            encapsulated_key: enc,
            ciphertext,
        });
    }
    let rng = SystemRandom::new();
    let ephemeral = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| KeyError::Rng)?;
    let mut enc = [0u8; ENC_LEN];
    enc.copy_from_slice(
        ephemeral
            .compute_public_key()
            .map_err(|_| KeyError::Rng)?
            .as_ref(),
    );
    let pk_r = recipient.as_bytes();
    // ring refuses an all-zero (non-contributory) result.
    let mut dh =
        agreement::agree_ephemeral(ephemeral, &UnparsedPublicKey::new(&X25519, pk_r), |dh| {
            let mut out = [0u8; 32];
            out.copy_from_slice(dh);
            out
        })
        .map_err(|_| KeyError::NonContributory)?;
    let ciphertext = seal_from_dh(&dh, &enc, pk_r, info, aad, plaintext);
    dh.zeroize();
    Ok(SealedToKey {
        encapsulated_key: enc,
        ciphertext,
    })
}

fn kem_private(sk: &EncryptionSecret) -> Result<KemPrivateKey, KeyError> {
    KemPrivateKey::from_bytes(sk.as_bytes()).map_err(|_| KeyError::Rejected)
}

/// The intermediate values of SealBase (shared_secret, key, base_nonce), for the vector test.
pub(crate) fn schedule_from_dh(
    dh: &[u8; 32],
    enc: &[u8; 32],
    pk_r: &[u8; 32],
    info: &[u8],
) -> ([u8; 32], [u8; 32], [u8; 12]) {
    let shared_secret = extract_and_expand(dh, enc, pk_r);
    let (key, nonce) = key_schedule(&shared_secret, info);
    (*shared_secret, *key, nonce)
}

/// OpenBase(enc, skR, info, aad, ct).
pub(crate) fn open_raw(
    secret: &EncryptionSecret,
    info: &[u8],
    aad: &[u8],
    encapsulated_key: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HpkeOpenError> {
    if encapsulated_key.len() != ENC_LEN {
        return Err(HpkeOpenError::EncLength(encapsulated_key.len()));
    }
    let Some(body_len) = ciphertext.len().checked_sub(HPKE_TAG_LEN) else {
        return Err(HpkeOpenError::TooShort(ciphertext.len()));
    };
    let enc = EncappedKey::from_bytes(encapsulated_key).map_err(|_| HpkeOpenError::Failed)?;
    let tag =
        AeadTag::<Aead>::from_bytes(&ciphertext[body_len..]).map_err(|_| HpkeOpenError::Failed)?;
    let sk = kem_private(secret).map_err(|_| HpkeOpenError::Failed)?;
    let mut buf = Zeroizing::new(ciphertext[..body_len].to_vec());
    hpke::single_shot_open_inout_detached::<Aead, Kdf, Kem>(
        &OpModeR::Base,
        &sk,
        &enc,
        info,
        InOutBuf::from(buf.as_mut_slice()),
        aad,
        &tag,
    )
    .map_err(|_| HpkeOpenError::Failed)?;
    Ok(buf)
}

/// Wraps a 32-byte content key for one recipient; the recipient's card id
/// is the aad. `ephemeral`: test vectors only.
pub(crate) fn wrap_key(
    recipient: &EncryptionPublicKey,
    card_id: &[u8; 32],
    key: &[u8; 32],
    ephemeral: Option<&[u8; 32]>,
) -> Result<SealedToKey, KeyError> {
    seal_base(
        recipient,
        HpkeInfo::KeyWrap.label(),
        card_id,
        key,
        ephemeral,
    )
}

/// Unwraps a content key wrapped by [`wrap_key`].
pub(crate) fn unwrap_key(
    secret: &EncryptionSecret,
    card_id: &[u8; 32],
    encapsulated_key: &[u8],
    wrapped: &[u8],
) -> Result<Zeroizing<[u8; 32]>, HpkeOpenError> {
    let plain = open_raw(
        secret,
        HpkeInfo::KeyWrap.label(),
        card_id,
        encapsulated_key,
        wrapped,
    )?;
    let mut key = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(HpkeOpenError::Failed);
    }
    key.copy_from_slice(&plain);
    Ok(key)
}

/// The associated data of an OrgEncMsg: `u32(len channel) || channel || u64(index)`.
fn org_backup_aad(channel_id: &str, message_index: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(12 + channel_id.len());
    aad.extend_from_slice(&(channel_id.len() as u32).to_be_bytes());
    aad.extend_from_slice(channel_id.as_bytes());
    aad.extend_from_slice(&message_index.to_be_bytes());
    aad
}

/// Seals a backup record of message `message_index` of `channel_id` to the
/// OrgCard's key (an OrgEncMsg).
pub fn seal_org_backup(
    org_key: &EncryptionPublicKey,
    channel_id: &str,
    message_index: u64,
    record: &[u8],
) -> Result<SealedToKey, KeyError> {
    seal_to_key(
        org_key,
        &org_backup_aad(channel_id, message_index),
        record,
        None,
    )
}

/// [`seal_org_backup`] with a given ephemeral secret: test vectors only.
pub(crate) fn seal_org_backup_with(
    org_key: &EncryptionPublicKey,
    channel_id: &str,
    message_index: u64,
    record: &[u8],
    ephemeral: &[u8; 32],
) -> Result<SealedToKey, KeyError> {
    seal_to_key(
        org_key,
        &org_backup_aad(channel_id, message_index),
        record,
        Some(ephemeral),
    )
}

/// Opens an OrgEncMsg with the OrgKey; fails unless it was sealed for this
/// very channel and index.
pub fn open_org_backup(
    org_secret: &EncryptionSecret,
    channel_id: &str,
    message_index: u64,
    encapsulated_key: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HpkeOpenError> {
    open_from_key(
        org_secret,
        &org_backup_aad(channel_id, message_index),
        encapsulated_key,
        ciphertext,
    )
}

/// Seals `plaintext` to an organisation's key, binding `aad`.
fn seal_to_key(
    recipient: &EncryptionPublicKey,
    aad: &[u8],
    plaintext: &[u8],
    ephemeral: Option<&[u8; 32]>,
) -> Result<SealedToKey, KeyError> {
    seal_base(
        recipient,
        HpkeInfo::OrgBackup.label(),
        aad,
        plaintext,
        ephemeral,
    )
}

/// Opens what [`seal_to_key`] sealed.
fn open_from_key(
    secret: &EncryptionSecret,
    aad: &[u8],
    encapsulated_key: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HpkeOpenError> {
    open_raw(
        secret,
        HpkeInfo::OrgBackup.label(),
        aad,
        encapsulated_key,
        ciphertext,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_binding() {
        let secret = EncryptionSecret::generate().unwrap();
        let card = [7u8; 32];
        let key = [9u8; 32];
        let sealed = wrap_key(&secret.public_key(), &card, &key, None).unwrap();
        assert_eq!(sealed.ciphertext.len(), 48);
        let back =
            unwrap_key(&secret, &card, &sealed.encapsulated_key, &sealed.ciphertext).unwrap();
        assert_eq!(*back, key);
        // Another card id (aad) or another key fails.
        assert_eq!(
            unwrap_key(
                &secret,
                &[8u8; 32],
                &sealed.encapsulated_key,
                &sealed.ciphertext
            )
            .map(|_| ()),
            Err(HpkeOpenError::Failed)
        );
        let other = EncryptionSecret::generate().unwrap();
        assert_eq!(
            unwrap_key(&other, &card, &sealed.encapsulated_key, &sealed.ciphertext).map(|_| ()),
            Err(HpkeOpenError::Failed)
        );
        assert_eq!(
            unwrap_key(
                &secret,
                &card,
                &sealed.encapsulated_key[..31],
                &sealed.ciphertext
            )
            .map(|_| ()),
            Err(HpkeOpenError::EncLength(31))
        );
        assert_eq!(
            unwrap_key(
                &secret,
                &card,
                &sealed.encapsulated_key,
                &sealed.ciphertext[..10]
            )
            .map(|_| ()),
            Err(HpkeOpenError::TooShort(10))
        );
    }

    #[test]
    fn low_order_encapsulated_key_fails_cleanly() {
        let secret = EncryptionSecret::generate().unwrap();
        assert_eq!(
            open_from_key(&secret, b"", &[0u8; 32], &[0u8; 40]).map(|_| ()),
            Err(HpkeOpenError::Failed)
        );
    }

    #[test]
    fn org_backups_are_bound_to_channel_and_index() {
        let org = EncryptionSecret::generate().unwrap();
        let sealed = seal_org_backup(&org.public_key(), "chan", 7, b"record").unwrap();
        let open =
            |c: &str, i| open_org_backup(&org, c, i, &sealed.encapsulated_key, &sealed.ciphertext);
        assert_eq!(open("chan", 7).unwrap().as_slice(), b"record");
        assert_eq!(open("chan", 8).map(|_| ()), Err(HpkeOpenError::Failed));
        assert_eq!(open("chan2", 7).map(|_| ()), Err(HpkeOpenError::Failed));
    }

    #[test]
    fn ring_sender_interoperates_with_the_hpke_crate_receiver() {
        let secret = EncryptionSecret::generate().unwrap();
        for len in [0usize, 1, 32, 1000] {
            let pt = vec![0x5a; len];
            let sealed = seal_to_key(&secret.public_key(), b"aad", &pt, None).unwrap();
            let back = open_from_key(
                &secret,
                b"aad",
                &sealed.encapsulated_key,
                &sealed.ciphertext,
            )
            .unwrap();
            assert_eq!(back.as_slice(), pt.as_slice());
        }
    }
}
