//! AES-256-GCM through ring: bulk data (bodies, file chunks, keystores) goes here.

pub(crate) use ring::aead::NONCE_LEN;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

pub(crate) const TAG_LEN: usize = 16;
pub(crate) const KEY_LEN: usize = 32;

/// Authentication failed: wrong key, wrong associated data or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AeadFailure;

pub(crate) struct AeadKey(LessSafeKey);

impl AeadKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        // An AES-256 key of exactly 32 bytes is always accepted by ring.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key");
        Self(LessSafeKey::new(unbound))
    }

    /// Appends the ciphertext and tag of `in_out` in place.
    pub(crate) fn seal_in_place(&self, nonce: [u8; NONCE_LEN], aad: &[u8], in_out: &mut Vec<u8>) {
        // ring only fails to seal inputs longer than 2^36 bytes; callers bound
        // their inputs far below that (64 KiB chunks, limited message bodies).
        #[allow(clippy::expect_used)]
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .expect("AES-GCM input within ring's length limit");
    }

    /// Encrypts `in_out` in place and returns the tag.
    pub(crate) fn seal_in_place_detached(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> [u8; TAG_LEN] {
        // As above: inputs are bounded far below ring's limit.
        #[allow(clippy::expect_used)]
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .expect("AES-GCM input within ring's length limit");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `in_out` (ciphertext || tag) in place; returns the plaintext length.
    pub(crate) fn open_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, AeadFailure> {
        self.0
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .map(|plain| plain.len())
            .map_err(|_| AeadFailure)
    }
}

/// One-shot AES-256-GCM seal.
pub(crate) fn seal(
    key: &[u8; KEY_LEN],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    AeadKey::new(key).seal_in_place(nonce, aad, &mut out);
    out
}

/// One-shot AES-256-GCM open.
pub(crate) fn open(
    key: &[u8; KEY_LEN],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, AeadFailure> {
    let mut buf = ciphertext.to_vec();
    let len = AeadKey::new(key).open_in_place(nonce, aad, &mut buf)?;
    buf.truncate(len);
    Ok(buf)
}
