//! CLI errors: what went wrong, what to do, and the exit code.

use std::process::ExitCode;

use tessera_client::ClientError;
use tonic::Code;

#[derive(Debug)]
pub(crate) enum CliError {
    Client(ClientError),
    Usage(String),
    Failed(String),
    DemoStep { step: String, detail: String },
    Security(String),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::Usage(m) | Self::Failed(m) | Self::Security(m) => f.write_str(m),
            Self::DemoStep { step, detail } => {
                write!(f, "demo step \"{step}\" did not behave as stated: {detail}")
            }
        }
    }
}

impl CliError {
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Usage(_) => 2,
            Self::Failed(_) => 1,
            Self::Security(_) => 6,
            Self::DemoStep { .. } => 8,
            Self::Client(e) => match e {
                ClientError::Usage(_) => 2,
                ClientError::Unreachable { .. } => 5,
                ClientError::NotFound { .. } => 4,
                ClientError::CardRejected { .. }
                | ClientError::Fork(_)
                | ClientError::DeviceList { .. }
                | ClientError::BadMessage { .. }
                | ClientError::History { .. } => 6,
                ClientError::Keystore(tessera_crypto::keystore::KeystoreError::WrongPassphrase) => {
                    7
                }
                ClientError::Rejected { code, .. } => match code {
                    Code::Unauthenticated | Code::PermissionDenied => 3,
                    Code::NotFound => 4,
                    Code::InvalidArgument
                    | Code::OutOfRange
                    | Code::AlreadyExists
                    | Code::FailedPrecondition => 2,
                    Code::Unavailable => 5,
                    _ => 1,
                },
                _ => 1,
            },
        })
    }

    /// What the user can do about it.
    pub(crate) fn hint(&self) -> Option<String> {
        match self {
            Self::Client(ClientError::Unreachable { service, .. }) => Some(format!(
                "is the {service} running? `tessera stack` runs all services locally"
            )),
            Self::Client(ClientError::NotFound { what: "profile", .. }) => {
                Some("create it with `tessera signup <identity>` or pick another with --profile".into())
            }
            Self::Client(ClientError::Keystore(tessera_crypto::keystore::KeystoreError::WrongPassphrase)) => {
                Some("set TESSERA_PASSPHRASE to this profile's passphrase".into())
            }
            Self::Client(ClientError::CardRejected { .. }) => {
                Some("the directory served a card that does not verify: do not trust this contact until it is resolved".into())
            }
            Self::Client(ClientError::Fork(_)) => {
                Some("the key directory may be attacked; compare `tessera audit` with other users".into())
            }
            Self::Client(ClientError::Rejected { code: Code::Unauthenticated, .. }) => {
                Some("this device may have been revoked; enroll it again with `tessera login`".into())
            }
            _ => None,
        }
    }
}
