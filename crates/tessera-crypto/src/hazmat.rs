//! The raw primitives under Tessera's wrappers, exposed so known-answer tests
//! (Wycheproof, RFC 8032, RFC 7748, RFC 9180) run against exactly the code
//! paths Tessera uses, and deterministic variants of the sealing functions
//! (randomness given by the caller) that make Tessera's own golden vectors
//! (`testdata/`). Protocol code never calls these: it goes through the
//! domain-separated APIs of the crate root. Reusing a message id, content
//! key, ephemeral secret, nonce or salt breaks the protocol's security.

use crate::{EncryptionSecret, KeyError, SignatureError, SigningKey, VerifyingKey, aead};

/// AES-256-GCM seal with a 12-byte nonce (the wrapper behind envelopes,
/// streams and keystores).
pub fn aes256gcm_seal(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    aead::seal(key, nonce, aad, plaintext)
}

/// AES-256-GCM open; `None` when authentication fails.
pub fn aes256gcm_open(
    key: &[u8; 32],
    nonce: [u8; 12],
    aad: &[u8],
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    aead::open(key, nonce, aad, ciphertext).ok()
}

/// Plain Ed25519 signature with no domain separation.
pub fn ed25519_sign(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    key.sign_raw(message)
}

/// Plain Ed25519 verification with no domain separation.
pub fn ed25519_verify(
    key: &VerifyingKey,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    if signature.len() != crate::SIGNATURE_LEN {
        return Err(SignatureError::Length(signature.len()));
    }
    key.verify_raw(message, signature)
}

/// X25519 with the contributory check Tessera applies.
pub fn x25519(secret: [u8; 32], peer: &[u8; 32]) -> Result<[u8; 32], KeyError> {
    EncryptionSecret::from_bytes(secret).agree(peer).map(|s| *s)
}

/// HKDF-SHA256 (RFC 5869) through ring, as the stream format derives its key.
/// `None` when `len` exceeds 255 * 32.
pub fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8], len: usize) -> Option<Vec<u8>> {
    crate::stream::hkdf_sha256(ikm, salt, info, len)
}

/// HPKE SealBase from the DH output on (the sender's DH itself is ring's
/// ephemeral X25519): the exact code behind every key wrap. Returns the
/// ciphertext for sequence number 0.
pub fn hpke_seal_base_from_dh(
    dh: &[u8; 32],
    enc: &[u8; 32],
    recipient: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    crate::hpke_wrap::seal_from_dh(dh, enc, recipient, info, aad, plaintext)
}

/// The HPKE base-mode schedule from the DH output: (shared_secret, key, base_nonce).
pub fn hpke_base_schedule(
    dh: &[u8; 32],
    enc: &[u8; 32],
    recipient: &[u8; 32],
    info: &[u8],
) -> ([u8; 32], [u8; 32], [u8; 12]) {
    crate::hpke_wrap::schedule_from_dh(dh, enc, recipient, info)
}

/// HPKE OpenBase, the function behind every key unwrap.
pub fn hpke_open_base(
    secret: [u8; 32],
    info: &[u8],
    aad: &[u8],
    encapsulated_key: &[u8],
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    crate::hpke_wrap::open_raw(
        &EncryptionSecret::from_bytes(secret),
        info,
        aad,
        encapsulated_key,
        ciphertext,
    )
    .ok()
    .map(|p| p.to_vec())
}

/// Wraps a 32-byte content key for one recipient card: the per-recipient
/// step of [`crate::envelope::seal`], exposed for the benchmark.
pub fn wrap_content_key(
    recipient: &crate::EncryptionPublicKey,
    card_id: &[u8; 32],
    key: &[u8; 32],
) -> Result<crate::SealedToKey, KeyError> {
    crate::hpke_wrap::wrap_key(recipient, card_id, key, None)
}

/// The raw private halves of device keys (Ed25519 seed, X25519 secret), for
/// tests that prove a key never left its device (by searching every other
/// byte stored anywhere for them). Never call this in protocol code.
pub fn device_key_bytes(
    keys: &crate::DeviceKeys,
) -> (zeroize::Zeroizing<[u8; 32]>, zeroize::Zeroizing<[u8; 32]>) {
    (
        zeroize::Zeroizing::new(*keys.signing.seed()),
        zeroize::Zeroizing::new(*keys.encryption.as_bytes()),
    )
}

/// The random values of one envelope (see [`seal_envelope_with`]).
pub struct EnvelopeRandomness<'a> {
    pub message_id: [u8; crate::envelope::MESSAGE_ID_LEN],
    pub content_key: [u8; 32],
    /// One HPKE ephemeral X25519 secret per recipient, in ascending card-id
    /// order (the order of the stanzas).
    pub ephemeral: &'a [[u8; 32]],
}

/// [`crate::envelope::seal`] with every random value given: for test
/// vectors only.
pub fn seal_envelope_with(
    sender: &crate::envelope::Sender<'_>,
    draft: &crate::envelope::Draft<'_>,
    recipients: &[crate::envelope::Recipient<'_>],
    randomness: &EnvelopeRandomness<'_>,
) -> Result<crate::envelope::Sealed, crate::envelope::EnvelopeError> {
    crate::envelope::seal_with(
        sender,
        draft,
        recipients,
        Some(&crate::envelope::FixedRandomness {
            message_id: randomness.message_id,
            content_key: randomness.content_key,
            ephemeral: randomness.ephemeral,
        }),
    )
}

/// [`crate::seal_org_backup`] with the HPKE ephemeral secret given: for
/// test vectors only.
pub fn seal_org_backup_with(
    org_key: &crate::EncryptionPublicKey,
    channel_id: &str,
    message_index: u64,
    record: &[u8],
    ephemeral: &[u8; 32],
) -> Result<crate::SealedToKey, KeyError> {
    crate::hpke_wrap::seal_org_backup_with(org_key, channel_id, message_index, record, ephemeral)
}

/// [`crate::stream::encrypt`] with the stream's 16-byte nonce given: for
/// test vectors only.
pub fn stream_encrypt_with_nonce(
    file_key: &crate::stream::FileKey,
    nonce: [u8; 16],
    reader: impl std::io::Read,
    writer: impl std::io::Write,
) -> Result<u64, crate::stream::StreamError> {
    crate::stream::encrypt_with_nonce(file_key, nonce, reader, writer)
}

/// [`crate::keystore::seal`] with the Argon2id salt and AES-GCM nonce
/// given: for test vectors only.
pub fn keystore_seal_with(
    material: &crate::keystore::KeyMaterial,
    protection: &crate::keystore::Protection<'_>,
    salt: [u8; 16],
    nonce: [u8; 12],
) -> Result<Vec<u8>, crate::keystore::KeystoreError> {
    crate::keystore::seal_with(material, protection, salt, nonce)
}

/// One step of the sender-key ratchet from chain key `ck`:
/// `(message secret, next chain key)` (`docs/protocol.md` section 15).
pub fn sender_key_ratchet_step(ck: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    let (secret, next) = crate::sender_key::ratchet_step(ck);
    (*secret, *next)
}

/// The keys of one group message from its message secret.
pub struct GroupMessageKeys {
    pub key: [u8; 32],
    pub commitment_key: [u8; 32],
    /// HMAC-SHA256(commitment_key, "tessera/v2/key-commitment").
    pub commitment: [u8; 32],
    /// The first 16 bytes of HMAC-SHA256(commitment_key,
    /// "tessera/v2/group-message-id"): the message id the payload must name.
    pub message_id: [u8; 16],
}

/// The HKDF split of a message secret and its key commitment.
pub fn group_message_keys(message_secret: &[u8; 32]) -> GroupMessageKeys {
    let keys = crate::sender_key::MessageKeys::derive(message_secret);
    GroupMessageKeys {
        key: *keys.key,
        commitment_key: *keys.commitment_key,
        commitment: keys.commitment(),
        message_id: keys.message_id(),
    }
}

/// The key commitment of an envelope content key (`EnvelopeHeader`
/// version 2): HMAC-SHA256(key, "tessera/v2/envelope/key-commitment").
pub fn envelope_key_commitment(content_key: &[u8; 32]) -> [u8; 32] {
    crate::commitment::commit(content_key, crate::commitment::ENVELOPE_COMMITMENT_LABEL)
}

/// A group message sealed with its AES-GCM nonce given: for test vectors
/// only (a nonce must never repeat under one key).
pub fn group_seal_with_nonce(
    chain: &mut crate::sender_key::SenderChain,
    sender: &crate::envelope::Sender<'_>,
    draft: &crate::sender_key::GroupDraft<'_>,
    nonce: [u8; 12],
) -> Result<crate::sender_key::GroupSealed, crate::sender_key::SenderKeyError> {
    chain.seal_with_nonce(sender, draft, nonce)
}

/// One distribution copy with the HPKE ephemeral secret given: for test
/// vectors only.
pub fn sender_key_distribution_with(
    chain: &crate::sender_key::SenderChain,
    sender: &crate::envelope::Sender<'_>,
    recipient: &crate::envelope::Recipient<'_>,
    recipients_sha256: &[u8; 32],
    created_at_ms: i64,
    ephemeral: &[u8; 32],
) -> Result<crate::sender_key::DistributionCopy, crate::sender_key::SenderKeyError> {
    chain.distribution_for(
        sender,
        recipient,
        recipients_sha256,
        created_at_ms,
        Some(ephemeral),
    )
}
