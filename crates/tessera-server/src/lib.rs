//! `tessera-server`, the app server: the seed's "developer's server" and the
//! message transport Twilio Programmable Chat was in the seed. It holds
//! accounts, vouches for cards with the AppKey, and carries ciphertext in
//! ordered channels; it never sees plaintext.
//!
//! Five gRPC services: `Accounts` (sign-up, log-in by password or by device
//! signature, tokens for each service), `Devices` (enroll, list, revoke),
//! `Admin` (org card, org members, revoking any device), `Archive` (what the
//! organisation's backup service may ask) and `Channels` (membership
//! chains, ordered messages, live subscriptions, read horizons,
//! attachments). Channels have a domain layer (`channels::Channels`) that
//! answers a typed `ServerError`, turned into a status at the gRPC edge.

mod accounts;
mod archive;
mod challenges;
mod channels;
mod devices;
mod error;
mod kms_client;
pub mod passwords;
mod quota;
mod signers;
pub mod store;
pub mod throttle;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tessera_crypto::{SigningKey, VerifyingKey, keystore};
use tessera_proto::server::v1::{
    accounts_server::AccountsServer, admin_server::AdminServer, archive_server::ArchiveServer,
    channels_server::ChannelsServer, devices_server::DevicesServer,
};
use tessera_service::{
    TokenIssuer, TokenVerifier,
    serve::{self, ServeError},
    storage::StorageError,
    token::Audience,
};
use thiserror::Error;
use tokio::sync::watch;
use tonic::{server::NamedService, service::Routes};

pub use challenges::ChallengeLimits;
pub use passwords::{HashLimits, PasswordParams};
pub use throttle::ThrottleLimits;

/// Limits of the app server (Twilio's are the floor: 1 000 members per
/// channel, 32 KB bodies).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_members_per_channel: usize,
    pub max_channels_per_user: usize,
    /// Sized for 1 000 recipient devices (~120 bytes of stanza each) plus a
    /// 256 KiB body.
    pub max_envelope_bytes: usize,
    pub max_page_size: u32,
    pub max_devices_per_user: usize,
    pub max_attachment_bytes: u64,
    pub max_password_bytes: usize,
    /// Messages each channel's live broadcast keeps for slow subscribers;
    /// one that falls further behind catches up from the store.
    pub live_buffer_messages: usize,
    /// Most bytes of stored messages in one `ListMessages` page (a single
    /// larger message still comes alone).
    pub max_page_bytes: usize,
    /// Open subscriptions per user, and in the whole server.
    pub max_subscriptions_per_user: usize,
    pub max_subscriptions: usize,
    /// Per-user quotas: bytes of stored messages (envelopes and their
    /// metadata, bytes and number of attachments, uploads at once.
    pub max_message_bytes_per_user: u64,
    pub max_attachment_bytes_per_user: u64,
    pub max_attachments_per_user: usize,
    pub max_uploads_per_user: usize,
    /// Most sends to one channel stored together (one transaction on
    /// PostgreSQL, one flush on sled: group commit); 1 stores each alone.
    pub max_send_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_members_per_channel: 2000,
            max_channels_per_user: 1000,
            max_envelope_bytes: 2 * 1024 * 1024,
            max_page_size: 500,
            max_devices_per_user: 32,
            max_attachment_bytes: 1024 * 1024 * 1024,
            max_password_bytes: 1024,
            live_buffer_messages: 256,
            max_page_bytes: 4 * 1024 * 1024,
            max_subscriptions_per_user: 64,
            max_subscriptions: 4096,
            max_message_bytes_per_user: 1024 * 1024 * 1024,
            max_attachment_bytes_per_user: 10 * 1024 * 1024 * 1024,
            max_attachments_per_user: 10_000,
            max_uploads_per_user: 4,
            max_send_batch: 256,
        }
    }
}

/// Everything the app server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Database (`<data_dir>/db`), attachments and, by default, the keys.
    pub data_dir: PathBuf,
    /// The AppKey; `<data_dir>/app.key` when `None`.
    pub app_key_path: Option<PathBuf>,
    /// The token signing key; `<data_dir>/token.key` when `None`.
    pub token_key_path: Option<PathBuf>,
    /// The key service, e.g. `http://127.0.0.1:7401`.
    pub kms_url: String,
    /// CA certificate (PEM) to trust for an `https` key service.
    pub kms_ca: Option<PathBuf>,
    /// Identity of the organisation's ORG card; `None`: no organisation.
    pub org_identity: Option<String>,
    pub token_lifetime: Duration,
    /// How long a device-login challenge may be answered.
    pub challenge_ttl: Duration,
    pub limits: Limits,
    pub password_params: PasswordParams,
    /// Password hashes running and waiting at once.
    pub hash_limits: HashLimits,
    /// Outstanding device log-in challenges.
    pub challenge_limits: ChallengeLimits,
    pub throttle: ThrottleLimits,
}

impl Config {
    /// Defaults for a server storing in `data_dir` and using the key service at `kms_url`.
    pub fn new(data_dir: impl Into<PathBuf>, kms_url: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            app_key_path: None,
            token_key_path: None,
            kms_url: kms_url.into(),
            kms_ca: None,
            org_identity: None,
            token_lifetime: Duration::from_secs(15 * 60),
            challenge_ttl: challenges::DEFAULT_CHALLENGE_TTL,
            limits: Limits::default(),
            password_params: PasswordParams::DEFAULT,
            hash_limits: HashLimits::default(),
            challenge_limits: ChallengeLimits::default(),
            throttle: ThrottleLimits::default(),
        }
    }
}

/// Where the AppKey and the token key live.
pub fn key_paths(data_dir: &Path, app: Option<&Path>, token: Option<&Path>) -> (PathBuf, PathBuf) {
    (
        app.map_or_else(|| data_dir.join("app.key"), Path::to_path_buf),
        token.map_or_else(|| data_dir.join("token.key"), Path::to_path_buf),
    )
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("key file: {0}")]
    Key(#[from] keystore::KeystoreError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("database: {0}")]
    Postgres(#[from] store::PgOpenError),
    #[error("key service address {url:?}: {reason}")]
    KmsAddress { url: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Loads the AppKey and token key, generating them (mode 0600) on first start.
pub fn load_or_create_keys(
    app_path: &Path,
    token_path: &Path,
) -> Result<(SigningKey, SigningKey), StartError> {
    let (app, new_app) = keystore::load_or_generate_signing(app_path)?;
    let (token, new_token) = keystore::load_or_generate_signing(token_path)?;
    if new_app || new_token {
        tracing::info!(app_key = %app_path.display(), token_key = %token_path.display(), "generated new server keys");
    }
    Ok((app, token))
}

/// State shared by the five gRPC services.
pub(crate) struct App {
    pub(crate) store: Arc<dyn store::Store>,
    pub(crate) app_key: SigningKey,
    pub(crate) issuer: Arc<TokenIssuer>,
    pub(crate) verifier: TokenVerifier,
    pub(crate) kms: Arc<kms_client::KmsClient>,
    pub(crate) config: Config,
    pub(crate) throttle: throttle::Throttle,
    pub(crate) hashes: passwords::HashLimiter,
    pub(crate) challenges: challenges::Challenges,
    pub(crate) user_locks: Arc<Locks>,
    pub(crate) channels: Arc<channels::Channels>,
}

const LOCK_SHARDS: usize = 64;

/// Async locks by key (a channel, a user), sharded: two keys may share a
/// lock, which only costs contention.
pub(crate) struct Locks(Vec<tokio::sync::Mutex<()>>);

impl Locks {
    pub(crate) fn new() -> Self {
        Self(
            (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        )
    }

    pub(crate) fn of(&self, key: &str) -> &tokio::sync::Mutex<()> {
        &self.0[Self::shard(key)]
    }

    pub(crate) fn shard(key: &str) -> usize {
        // FNV-1a: cheap and stable; only spreads contention.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        (h % LOCK_SHARDS as u64) as usize
    }

    /// The locks of all `keys`, each shard once, taken in shard order (two
    /// callers locking overlapping sets cannot wait for each other in a
    /// cycle; keys sharing a shard do not lock it twice).
    pub(crate) async fn lock_all<'a>(
        &'a self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<tokio::sync::MutexGuard<'a, ()>> {
        let shards: std::collections::BTreeSet<usize> = keys.into_iter().map(Self::shard).collect();
        let mut guards = Vec::with_capacity(shards.len());
        for shard in shards {
            guards.push(self.0[shard].lock().await);
        }
        guards
    }
}

/// Read-write locks sharded by key, as [`Locks`].
pub(crate) struct Gates(Vec<tokio::sync::RwLock<()>>);

impl Gates {
    pub(crate) fn new() -> Self {
        Self(
            (0..LOCK_SHARDS)
                .map(|_| tokio::sync::RwLock::new(()))
                .collect(),
        )
    }

    pub(crate) fn of(&self, key: &str) -> &tokio::sync::RwLock<()> {
        &self.0[Locks::shard(key)]
    }
}

impl App {
    /// Serialises changes of one user: its devices (the device limit), its
    /// quotas and read horizons (taken after a channel's lock).
    pub(crate) fn user_lock(&self, identity: &str) -> &tokio::sync::Mutex<()> {
        self.user_locks.of(identity)
    }

    /// The caller of `request`. A token issued to a device (passwordless
    /// log-in) stops working as soon as that device is revoked.
    pub(crate) async fn authenticate<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<tessera_service::Caller, tonic::Status> {
        let caller = self.verifier.authenticate(request)?;
        if let Some(card) = caller.device_card_id {
            let active = self.store.device(card.as_bytes()).await?.is_some_and(|d| {
                d.identity == caller.identity && d.status == store::DeviceStatus::Active as i32
            });
            if !active {
                return Err(tonic::Status::unauthenticated(
                    "this device was revoked or replaced; its access ended",
                ));
            }
        }
        Ok(caller)
    }

    pub(crate) async fn is_org_member(&self, identity: &str) -> Result<bool, StorageError> {
        Ok(self.config.org_identity.is_some()
            && self
                .store
                .org_members()
                .await?
                .iter()
                .any(|m| m == identity))
    }
}

/// An app server ready to serve.
pub struct Server {
    app: Arc<App>,
    closing: watch::Sender<bool>,
    /// On PostgreSQL: hears what the other replicas store (stopped when
    /// the server is dropped).
    _listening: Option<store::Listening>,
}

impl Server {
    /// Opens the sled store and keys under `config.data_dir`.
    pub fn open(config: Config) -> Result<Self, StartError> {
        let (app_path, token_path) = key_paths(
            &config.data_dir,
            config.app_key_path.as_deref(),
            config.token_key_path.as_deref(),
        );
        let (app_key, token_key) = load_or_create_keys(&app_path, &token_path)?;
        let store = store::SledStore::open(&config.data_dir.join("db"))?;
        Self::with_store(Arc::new(store), app_key, token_key, config)
    }

    /// Opens the keys under `config.data_dir` and the PostgreSQL store
    /// `database` names (applying its migrations), and listens there for
    /// what other replicas store. Attachments stay files under
    /// `<data_dir>/attachments`.
    pub async fn open_postgres(
        config: Config,
        database: &store::PgOptions,
    ) -> Result<Self, StartError> {
        let (app_path, token_path) = key_paths(
            &config.data_dir,
            config.app_key_path.as_deref(),
            config.token_key_path.as_deref(),
        );
        let (app_key, token_key) = load_or_create_keys(&app_path, &token_path)?;
        let store = store::PgStore::open(database).await?;
        let mut server = Self::with_store(Arc::new(store), app_key, token_key, config)?;
        let channels = Arc::downgrade(&server.app.channels);
        let listening = store::listen(database, move |announced| {
            channels
                .upgrade()
                .map(|channels| channels.announced(announced))
                .is_some()
        })
        .await
        .map_err(store::PgOpenError::from)?;
        server._listening = Some(listening);
        Ok(server)
    }

    /// Runs over any store (the in-memory one in unit tests).
    pub fn with_store(
        store: Arc<dyn store::Store>,
        app_key: SigningKey,
        token_key: SigningKey,
        config: Config,
    ) -> Result<Self, StartError> {
        if let Some(org) = &config.org_identity {
            tessera_card::validate_identity(org)
                .map_err(|e| StartError::Config(format!("org identity: {e}")))?;
        }
        let attachments_dir = config.data_dir.join("attachments");
        std::fs::create_dir_all(&attachments_dir).map_err(StorageError::from)?;
        let endpoint = tessera_proto::connect::endpoint(&config.kms_url, config.kms_ca.as_deref())
            .map_err(|e| StartError::KmsAddress {
                url: config.kms_url.clone(),
                reason: e.to_string(),
            })?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        let issuer = Arc::new(TokenIssuer::new(token_key, config.token_lifetime));
        let verifier = TokenVerifier::new(issuer.public_key(), Audience::Server);
        let (closing_tx, closing_rx) = watch::channel(false);
        let kms = Arc::new(kms_client::KmsClient::new(channel));
        let user_locks = Arc::new(Locks::new());
        let channels = channels::Channels::new(
            store.clone(),
            config.limits.clone(),
            signers::SignerKeys::new(
                store.clone(),
                kms.clone(),
                issuer.clone(),
                user_locks.clone(),
            ),
            user_locks.clone(),
            attachments_dir,
            closing_rx,
        );
        let app = App {
            store,
            app_key,
            issuer,
            verifier,
            kms,
            throttle: throttle::Throttle::new(config.throttle),
            hashes: passwords::HashLimiter::new(config.hash_limits),
            challenges: challenges::Challenges::new(config.challenge_limits, config.challenge_ttl),
            user_locks,
            channels: Arc::new(channels),
            config,
        };
        Ok(Self {
            app: Arc::new(app),
            closing: closing_tx,
            _listening: None,
        })
    }

    /// Creates the admin account `identity` with `password`: the only way
    /// an account gets the ADMIN role (a sign-up never does, whatever its
    /// name). `Ok(false)` when this admin exists already (its password is
    /// kept); an error when a user who signed up holds the name.
    pub async fn create_admin(&self, identity: &str, password: &str) -> Result<bool, StartError> {
        self.app
            .create_admin(identity, password)
            .await
            .map_err(|s| StartError::Config(format!("admin account: {}", s.message())))
    }

    pub fn app_public_key(&self) -> VerifyingKey {
        self.app.app_key.verifying_key()
    }

    pub fn token_public_key(&self) -> VerifyingKey {
        self.app.issuer.public_key()
    }

    /// Ends live subscriptions so a graceful shutdown does not wait on them.
    pub fn begin_shutdown(&self) {
        let _ = self.closing.send(true);
    }

    /// The gRPC routes: the four services, health and reflection.
    pub async fn routes(&self) -> Result<Routes, ServeError> {
        let limit = self.app.config.limits.max_envelope_bytes + 64 * 1024;
        let accounts = AccountsServer::new(accounts::AccountsService(self.app.clone()));
        let devices = DevicesServer::new(devices::DevicesService(self.app.clone()));
        let admin = AdminServer::new(devices::AdminService(self.app.clone()));
        let archive = ArchiveServer::new(archive::ArchiveService(self.app.clone()))
            .max_encoding_message_size(64 * 1024 * 1024);
        let channels = ChannelsServer::new(channels::ChannelsService(self.app.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(64 * 1024 * 1024);
        serve::with_health_and_reflection(
            Routes::new(accounts)
                .add_service(devices)
                .add_service(admin)
                .add_service(archive)
                .add_service(channels),
            &[
                <AccountsServer<accounts::AccountsService> as NamedService>::NAME,
                <DevicesServer<devices::DevicesService> as NamedService>::NAME,
                <AdminServer<devices::AdminService> as NamedService>::NAME,
                <ArchiveServer<archive::ArchiveService> as NamedService>::NAME,
                <ChannelsServer<channels::ChannelsService> as NamedService>::NAME,
            ],
        )
        .await
    }
}
