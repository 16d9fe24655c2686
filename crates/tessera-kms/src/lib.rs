//! `tessera-kms`, the key-management service (the seed's "Virgil Key
//! Management Service"): the directory where cards are registered, searched
//! and revoked, with an append-only Merkle log over every registration and
//! revocation so clients can check it shows everyone the same history.
//!
//! The library runs the service ([`Kms::open`], [`Kms::routes`]); `main.rs`
//! is a thin binary over it. Operators: see `docs/operations.md`.

mod directory;
mod index;
mod service;
pub mod store;

use std::{path::PathBuf, sync::Arc};

pub use directory::{Directory, KmsError, Limits, OpenError};
use tessera_crypto::{SigningKey, VerifyingKey, keystore};
use tessera_proto::kms::v1::key_directory_server::KeyDirectoryServer;
use tessera_service::{
    TokenVerifier,
    serve::{self, ServeError},
    storage::StorageError,
    token::Audience,
};
use thiserror::Error;
use tonic::{server::NamedService, service::Routes};

/// Largest request the service decodes, in bytes.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Everything the key service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the sled database (`<data_dir>/db`; unused on
    /// PostgreSQL) and, by default, the key.
    pub data_dir: PathBuf,
    /// The service's signing key; `<data_dir>/kms.key` when `None`.
    pub key_path: Option<PathBuf>,
    /// The AppKey public key: only cards it signed are registered.
    pub app_public_key: VerifyingKey,
    /// The app server's token public key.
    pub token_public_key: VerifyingKey,
    pub limits: Limits,
    pub max_request_bytes: usize,
}

impl Config {
    pub fn key_path(&self) -> PathBuf {
        key_path(&self.data_dir, self.key_path.as_deref())
    }
}

/// Where the service key lives.
pub fn key_path(data_dir: &std::path::Path, explicit: Option<&std::path::Path>) -> PathBuf {
    explicit.map_or_else(|| data_dir.join("kms.key"), std::path::Path::to_path_buf)
}

/// Why the service could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("key file: {0}")]
    Key(#[from] keystore::KeystoreError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] store::PgOpenError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Loads the service key, generating it (mode 0600) on first start.
pub fn load_or_create_key(path: &std::path::Path) -> Result<SigningKey, StartError> {
    let (key, created) = keystore::load_or_generate_signing(path)?;
    if created {
        tracing::info!(path = %path.display(), "generated a new key-service key");
    }
    Ok(key)
}

/// A key service ready to serve.
pub struct Kms {
    directory: Arc<Directory>,
    tokens: TokenVerifier,
    max_request_bytes: usize,
}

impl Kms {
    /// Opens the sled store under `config.data_dir` (the embedded
    /// default) and the key.
    pub async fn open(config: &Config) -> Result<Self, StartError> {
        let key = load_or_create_key(&config.key_path())?;
        let store = store::SledStore::open(&config.data_dir.join("db"))?;
        Self::with_store(Arc::new(store), key, config).await
    }

    /// Opens the key and the PostgreSQL store `database` names, as its only
    /// writer (refused while another key service holds the writer lock).
    /// `config.data_dir` then holds only the key.
    pub async fn open_postgres(
        config: &Config,
        database: &store::PgOptions,
    ) -> Result<Self, StartError> {
        let key = load_or_create_key(&config.key_path())?;
        let store = store::PgStore::open(database).await?;
        Self::with_store(Arc::new(store), key, config).await
    }

    /// A read-only replica over the PostgreSQL database its writer keeps:
    /// it needs the log's public key only (no private key), serves what
    /// the writer published, and catches up every `refresh`.
    pub async fn open_read_only(
        config: &Config,
        database: &store::PgOptions,
        public: VerifyingKey,
        refresh: std::time::Duration,
    ) -> Result<Self, StartError> {
        let store = store::PgStore::open_read_only(database).await?;
        let directory = Directory::open_read_only(
            Arc::new(store),
            public,
            config.app_public_key,
            config.limits.clone(),
        )
        .await?;
        let directory = Arc::new(directory);
        let weak = Arc::downgrade(&directory);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(directory) = weak.upgrade() else {
                    return;
                };
                match directory.reload().await {
                    Ok(true) => tracing::debug!("caught up with the writer's checkpoint"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not catch up with the writer"),
                }
            }
        });
        Ok(Self {
            directory,
            tokens: TokenVerifier::new(config.token_public_key, Audience::Kms),
            max_request_bytes: config.max_request_bytes,
        })
    }

    /// Runs over any store (the in-memory one in unit tests).
    pub async fn with_store(
        store: Arc<dyn store::Store>,
        key: SigningKey,
        config: &Config,
    ) -> Result<Self, StartError> {
        let directory =
            Directory::open(store, key, config.app_public_key, config.limits.clone()).await?;
        Ok(Self {
            directory: Arc::new(directory),
            tokens: TokenVerifier::new(config.token_public_key, Audience::Kms),
            max_request_bytes: config.max_request_bytes,
        })
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// The gRPC routes: the directory, health and reflection.
    pub async fn routes(&self) -> Result<Routes, ServeError> {
        let service = KeyDirectoryServer::new(service::KmsService {
            directory: self.directory.clone(),
            tokens: self.tokens.clone(),
        })
        .max_decoding_message_size(self.max_request_bytes)
        .max_encoding_message_size(16 * 1024 * 1024);
        serve::with_health_and_reflection(
            Routes::new(service),
            &[<KeyDirectoryServer<service::KmsService> as NamedService>::NAME],
        )
        .await
    }
}
