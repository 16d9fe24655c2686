use std::fmt;

use thiserror::Error;

/// Which of a card's three signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureRole {
    /// By the card's own key.
    SelfSigned,
    /// By the AppKey.
    App,
    /// By the key-management service.
    Kms,
}

impl fmt::Display for SignatureRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SelfSigned => "self",
            Self::App => "app",
            Self::Kms => "kms",
        })
    }
}

/// Why a card, revocation or log proof was refused. Each variant names the
/// check that failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CardError {
    #[error("malformed card: {0}")]
    Malformed(&'static str),
    #[error("unsupported card version {0}")]
    UnsupportedVersion(u32),
    #[error("invalid identity: {0}")]
    InvalidIdentity(&'static str),
    #[error("invalid device name: {0}")]
    InvalidDeviceName(&'static str),
    #[error("unknown card kind")]
    UnknownKind,
    #[error("invalid key in card: {0}")]
    Key(#[from] tessera_crypto::KeyError),
    #[error("the card has no {0} signature")]
    MissingSignature(SignatureRole),
    #[error("the card's {0} signature does not verify")]
    BadSignature(SignatureRole),
    #[error("the card belongs to {found:?}, not {expected:?}")]
    IdentityMismatch { expected: String, found: String },
    #[error("the card is a {found} card, not a {expected} card")]
    KindMismatch {
        expected: crate::CardKind,
        found: crate::CardKind,
    },
    #[error("malformed revocation: {0}")]
    MalformedRevocation(&'static str),
    #[error("the revocation is for another card")]
    RevocationCardMismatch,
    #[error("the revocation's signature does not verify")]
    BadRevocationSignature,
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    #[error("the checkpoint's signature does not verify against the pinned key service key")]
    BadCheckpointSignature,
    #[error("the checkpoint is for log {found:?}, not {expected:?}")]
    WrongLog { expected: String, found: String },
    #[error("inclusion proof does not verify: {0}")]
    BadInclusionProof(&'static str),
    #[error("consistency proof does not verify: the log was rewritten or forked ({0})")]
    BadConsistencyProof(&'static str),
    #[error("malformed log entry: {0}")]
    MalformedLogEntry(&'static str),
}
