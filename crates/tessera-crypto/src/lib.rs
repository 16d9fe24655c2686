//! Tessera's cryptography, with no networking, storage or async.
//!
//! * [`SigningKey`] / [`VerifyingKey`]: Ed25519 (ring), every signature over a
//!   domain-separated message named by a [`SignatureContext`].
//! * [`EncryptionSecret`] / [`EncryptionPublicKey`]: X25519 (x25519-dalek);
//!   public keys of low order or off the curve are refused when parsed.
//! * [`envelope`]: multi-recipient sign-then-encrypt messages (EncMsg): an
//!   AES-256-GCM body under a fresh content key wrapped for each recipient
//!   card with HPKE (RFC 9180).
//! * [`sender_key`]: per-epoch sender keys for large channels: a hash
//!   ratchet per sending device, key-committing group envelopes, and the
//!   signed chain keys sealed to each member device (protocol v2, draft).
//! * [`stream`]: attachments as a STREAM of 64 KiB AES-256-GCM chunks.
//! * [`keystore`]: key files sealed with Argon2id(passphrase) + AES-256-GCM.
//!
//! Secret types zeroize on drop and implement neither `Debug` nor `Display`.
//! The exact byte layouts are specified in `docs/protocol.md`.

mod aead;
mod commitment;
pub mod envelope;
mod error;
pub mod hazmat;
mod hpke_wrap;
mod keys;
pub mod keystore;
pub mod local_state;
mod parallel;
mod random;
pub mod sender_key;
pub mod stream;
#[cfg(test)]
mod testing;

pub use commitment::COMMITMENT_LEN;
pub use error::{KeyError, SignatureError};
pub use hpke_wrap::{HpkeOpenError, SealedToKey, open_org_backup, seal_org_backup};
pub use keys::{
    DeviceKeys, EncryptionPublicKey, EncryptionSecret, SIGNATURE_LEN, SignatureContext, SigningKey,
    VerifyingKey,
};
pub use random::{random_array, random_bytes};

/// Length of card ids, message digests and symmetric keys, in bytes.
pub const ID_LEN: usize = 32;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
