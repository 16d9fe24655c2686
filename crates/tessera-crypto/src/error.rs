use thiserror::Error;

/// A key could not be made or parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("X25519 public key is of low order or not on the curve")]
    WeakPublicKey,
    #[error("X25519 public key is not canonical (u must be below 2^255 - 19)")]
    NonCanonicalPublicKey,
    #[error("Ed25519 public key is not a canonical encoding of a curve point")]
    MalformedSigningKey,
    #[error("Ed25519 public key is of small order (it would let forged signatures verify)")]
    WeakSigningKey,
    #[error("X25519 agreement was not contributory (the peer key has low order)")]
    NonContributory,
    #[error("Ed25519 key rejected")]
    Rejected,
    #[error("the system random number generator failed")]
    Rng,
}

/// A signature did not verify.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("signature must be 64 bytes, got {0}")]
    Length(usize),
    #[error("signature does not verify")]
    Invalid,
}
