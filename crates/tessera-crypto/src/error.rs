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
