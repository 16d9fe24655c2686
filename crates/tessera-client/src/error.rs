use std::path::PathBuf;

use tessera_card::{CardError, CardId};
use thiserror::Error;

/// Everything that can go wrong in the client, each naming what failed and,
/// where it helps, what to do.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {path}: {reason}")]
    Profile { path: PathBuf, reason: String },
    #[error("device key: {0}")]
    Keystore(#[from] tessera_crypto::keystore::KeystoreError),
    #[error("cannot reach the {service} at {url}: {detail}")]
    Unreachable {
        service: &'static str,
        url: String,
        detail: String,
    },
    #[error("{}: {message} ({code:?})", refusal(.service, .what, *.code))]
    Rejected {
        service: &'static str,
        what: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("card {card} of {identity:?} refused: {reason}")]
    CardRejected {
        identity: String,
        card: String,
        reason: CardError,
    },
    #[error(
        "the key directory's history is inconsistent with what this device saw before ({0}): the directory may be showing different histories to different users"
    )]
    Fork(String),
    #[error(
        "the key service answered from an older view of its log ({served} entries, after {seen} were seen): ask again"
    )]
    StaleView { served: u64, seen: u64 },
    #[error(
        "the device list of {identity:?} refused: {reason}: the key service or the app server may be lying about which devices {identity} approved"
    )]
    DeviceList {
        identity: String,
        reason: tessera_card::device_list::DeviceListError,
    },
    #[error(
        "the membership chain of channel {channel_id} refused: {reason}: the app server may be lying about who is in the channel"
    )]
    Channel {
        channel_id: String,
        reason: tessera_card::channel::ChannelError,
    },
    #[error("message refused: {0}")]
    Message(String),
    #[error("the organisation's history of {channel_id} refused: {reason}")]
    History { channel_id: String, reason: String },
    #[error("message {index} in {channel_id} refused: {reason}")]
    BadMessage {
        channel_id: String,
        index: u64,
        reason: String,
    },
    #[error("attachment: {0}")]
    Attachment(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("no such {what}: {name}")]
    NotFound { what: &'static str, name: String },
}

/// How a rejection starts: a service that answered UNAVAILABLE (e.g. its
/// database is down) refused nothing; it cannot serve for now.
fn refusal(service: &str, what: &str, code: tonic::Code) -> String {
    if code == tonic::Code::Unavailable {
        format!("the {service} is unavailable for {what}")
    } else {
        format!("{service} refused {what}")
    }
}

impl ClientError {
    pub(crate) fn card(identity: &str, card: Option<CardId>, reason: CardError) -> Self {
        Self::CardRejected {
            identity: identity.to_owned(),
            card: card.map_or_else(|| "(unparsable)".to_owned(), |c| c.short()),
            reason,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// The gRPC code behind a rejection, if any.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Maps a gRPC failure of `service` while doing `what`.
pub(crate) fn rpc(
    service: &'static str,
    url: &str,
    what: &'static str,
) -> impl FnOnce(tonic::Status) -> ClientError {
    let url = url.to_owned();
    move |status| {
        // tonic builds a status from a local transport failure (refused,
        // reset or closed connection, TLS handshake, DNS) with the error as
        // its source, whatever code it picks (UNAVAILABLE, or UNKNOWN for a
        // connection that died mid-call); one the service sent back never
        // has a source.
        if let Some(source) = std::error::Error::source(&status) {
            let mut detail = status.message().to_owned();
            let mut cause = Some(source);
            while let Some(e) = cause {
                let text = e.to_string();
                if !detail.contains(&text) {
                    detail = format!("{detail}: {text}");
                }
                cause = e.source();
            }
            ClientError::Unreachable {
                service,
                url,
                detail,
            }
        } else {
            ClientError::Rejected {
                service,
                what,
                code: status.code(),
                message: status.message().to_owned(),
            }
        }
    }
}
