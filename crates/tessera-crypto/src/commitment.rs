//! HMAC-SHA256 (ring) for the sender-key ratchet and key commitments.
//!
//! AES-GCM does not commit to its key: one ciphertext and tag can be made to
//! authenticate under two keys chosen together ("invisible salamanders").
//! Every ciphertext that more than one party opens therefore carries, in
//! its authenticated header, `HMAC-SHA256(key, label)`, which receivers
//! compare in constant time before decrypting: finding two keys with the
//! same commitment means finding an HMAC-SHA256 collision.

use ring::hmac;
use zeroize::Zeroizing;

/// Commitment label of an envelope's content key (`EnvelopeHeader` version 2).
pub(crate) const ENVELOPE_COMMITMENT_LABEL: &[u8] = b"tessera/v2/envelope/key-commitment";
/// Commitment label of a group message's commitment key.
pub(crate) const GROUP_COMMITMENT_LABEL: &[u8] = b"tessera/v2/key-commitment";
/// Label of a group message's id, derived from its commitment key: the
/// signed message id then names the one generation of the one chain it was
/// sealed at.
pub(crate) const GROUP_MESSAGE_ID_LABEL: &[u8] = b"tessera/v2/group-message-id";
/// Length of a key commitment.
pub const COMMITMENT_LEN: usize = 32;

/// HMAC-SHA256(key, parts[0] || parts[1] || ...).
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for part in parts {
        ctx.update(part);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// `HMAC-SHA256(key, label)`: public once computed.
pub(crate) fn commit(key: &[u8; 32], label: &[u8]) -> [u8; COMMITMENT_LEN] {
    *hmac_sha256(key, &[label])
}

/// Whether `claimed` is the commitment of `key` under `label` (constant time).
pub(crate) fn verify(key: &[u8; 32], label: &[u8], claimed: &[u8]) -> bool {
    crate::ct_eq(&commit(key, label), claimed)
}
