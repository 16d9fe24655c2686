//! What the app server's domain layer answers when it refuses or fails,
//! turned into a gRPC status once, at the edge (`impl From<ServerError> for
//! Status`).

use std::time::Duration;

use tessera_card::channel::ChannelError;
use tessera_service::{limits, storage::StorageError};
use thiserror::Error;
use tonic::{Code, Status};

/// Why a call was refused or failed, sorted by the status it gets.
#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum ServerError {
    /// The request can never succeed as sent.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller (or the device that signed) may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not in the channel's current state (e.g. a channel made before
    /// protocol v2, a member who is not there).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Made against an older state: refetch and try again.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// A quota or limit is used up.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A cap that frees up with time (answered with a `RetryInfo`).
    #[error("{what}; retry in {} s", retry_after.as_secs().max(1))]
    Busy { what: String, retry_after: Duration },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Unavailable(String),
    /// A membership statement broke a rule of the chain (the variant
    /// decides the status, see [`statement_code`].
    #[error(transparent)]
    Statement(#[from] ChannelError),
    /// A status from elsewhere (the key service) with no better mapping,
    /// relayed as it is.
    #[error("{}", .0.message())]
    Relayed(Status),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A bug or corrupt state; details go to the log only.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// The status a refused statement gets.
pub(crate) fn statement_code(e: &ChannelError) -> Code {
    match e {
        ChannelError::Malformed(_)
        | ChannelError::UnsupportedVersion(_)
        | ChannelError::WrongChannel { .. }
        | ChannelError::Card(_) => Code::InvalidArgument,
        ChannelError::SignerMismatch
        | ChannelError::BadSignature
        | ChannelError::NotAMember(_)
        | ChannelError::NotAnAdmin(_) => Code::PermissionDenied,
        ChannelError::Stale { .. } => Code::Aborted,
        ChannelError::Full => Code::ResourceExhausted,
        // AlreadyMember, TooManyMembers, NoAdminLeft, RemovesSelf; and the
        // client-side Rollback and Fork, which the server never reaches.
        _ => Code::FailedPrecondition,
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::InvalidArgument(m) => Status::invalid_argument(m),
            ServerError::NotFound(m) => Status::not_found(m),
            ServerError::AlreadyExists(m) => Status::already_exists(m),
            ServerError::PermissionDenied(m) => Status::permission_denied(m),
            ServerError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServerError::Aborted(m) => Status::aborted(m),
            ServerError::OutOfRange(m) => Status::out_of_range(m),
            ServerError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ServerError::Busy { what, retry_after } => limits::exhausted_retry(&what, retry_after),
            ServerError::Unauthenticated(m) => Status::unauthenticated(m),
            ServerError::Unavailable(m) => Status::unavailable(m),
            ServerError::Statement(e) => Status::new(statement_code(&e), e.to_string()),
            ServerError::Relayed(s) => s,
            ServerError::Storage(s) => s.into(),
            ServerError::Internal(what) => {
                tracing::error!(what, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// A status from a shared helper (`tessera_service::limits`) or the key
/// service client, sorted back by its code.
impl From<Status> for ServerError {
    fn from(s: Status) -> Self {
        let m = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument => Self::InvalidArgument(m),
            Code::NotFound => Self::NotFound(m),
            Code::AlreadyExists => Self::AlreadyExists(m),
            Code::PermissionDenied => Self::PermissionDenied(m),
            Code::FailedPrecondition => Self::FailedPrecondition(m),
            Code::Aborted => Self::Aborted(m),
            Code::OutOfRange => Self::OutOfRange(m),
            Code::ResourceExhausted => Self::ResourceExhausted(m),
            Code::Unauthenticated => Self::Unauthenticated(m),
            Code::Unavailable => Self::Unavailable(m),
            _ => Self::Relayed(s),
        }
    }
}

impl ServerError {
    /// The status this error becomes at the edge.
    #[cfg(test)]
    pub(crate) fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::ResourceExhausted(_) | Self::Busy { .. } => Code::ResourceExhausted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Statement(e) => statement_code(e),
            Self::Relayed(s) => s.code(),
            Self::Storage(StorageError::Unavailable { .. }) => Code::Unavailable,
            Self::Storage(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_becomes_the_status_it_names() {
        let cases = [
            (
                ServerError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (ServerError::NotFound("x".into()), Code::NotFound),
            (ServerError::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                ServerError::PermissionDenied("x".into()),
                Code::PermissionDenied,
            ),
            (
                ServerError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (ServerError::Aborted("x".into()), Code::Aborted),
            (ServerError::OutOfRange("x".into()), Code::OutOfRange),
            (
                ServerError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (
                ServerError::Busy {
                    what: "x".into(),
                    retry_after: Duration::from_secs(2),
                },
                Code::ResourceExhausted,
            ),
            (
                ServerError::Unauthenticated("x".into()),
                Code::Unauthenticated,
            ),
            (ServerError::Unavailable("x".into()), Code::Unavailable),
            (
                ServerError::Statement(ChannelError::Stale {
                    length: 2,
                    found: 1,
                }),
                Code::Aborted,
            ),
            (
                ServerError::Statement(ChannelError::NotAnAdmin("bob".into())),
                Code::PermissionDenied,
            ),
            (
                ServerError::Statement(ChannelError::BadSignature),
                Code::PermissionDenied,
            ),
            (
                ServerError::Statement(ChannelError::NoAdminLeft),
                Code::FailedPrecondition,
            ),
            (
                ServerError::Statement(ChannelError::AlreadyMember("bob".into())),
                Code::FailedPrecondition,
            ),
            (
                ServerError::Statement(ChannelError::Malformed("x")),
                Code::InvalidArgument,
            ),
            (
                ServerError::Statement(ChannelError::Full),
                Code::ResourceExhausted,
            ),
            (ServerError::Relayed(Status::data_loss("x")), Code::DataLoss),
            (ServerError::Internal("x"), Code::Internal),
            (
                ServerError::Storage(StorageError::Corrupt("x")),
                Code::Internal,
            ),
            (
                ServerError::Storage(StorageError::Unavailable {
                    backend: "postgres",
                    message: "connection refused by db.internal".into(),
                }),
                Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error:?}");
            let storage = matches!(error, ServerError::Storage(_));
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            if storage {
                // The details (hosts, SQL) go to the log only.
                assert!(!status.message().contains("db.internal"), "{status:?}");
            } else if code != Code::Internal {
                assert_eq!(status.message(), message);
            }
        }
        let busy = Status::from(ServerError::Busy {
            what: "full".into(),
            retry_after: Duration::from_secs(3),
        });
        assert_eq!(limits::retry_after(&busy), Some(Duration::from_secs(3)));
        // A helper's status comes back with its code.
        let back = ServerError::from(Status::resource_exhausted("limit of 3 things reached"));
        assert!(
            matches!(back, ServerError::ResourceExhausted(ref m) if m == "limit of 3 things reached")
        );
    }
}
