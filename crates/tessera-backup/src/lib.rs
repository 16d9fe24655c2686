//! `tessera-backup`, the organisation's backup service (the seed's
//! "Message Exchange" steps 3–4 and "History sync"): it holds the OrgKey,
//! archives the OrgEncMsgs members' devices send, and re-encrypts archived
//! messages to a member's current devices so a new device reads the past,
//! every message still carrying its original sender's signature.
//!
//! [`init_org`] creates the OrgKey and registers the OrgCard through the app
//! server's admin API; [`Backup::open`] and [`Backup::routes`] run the service.

mod service;
pub mod store;
mod upstream;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tessera_card::{CardId, CardKind, NewCard, ParsedCard, Verifier, transparency};
use tessera_crypto::{
    DeviceKeys, VerifyingKey,
    keystore::{self, KdfParams, KeyMaterial, Protection},
};
use tessera_proto::{
    Message as _,
    backup::v1::backup_server::BackupServer,
    card::v1::Card,
    server::v1::{
        GetServerInfoRequest, LoginRequest, RegisterOrgCardRequest,
        accounts_client::AccountsClient, admin_client::AdminClient,
    },
};
use tessera_service::{
    TokenVerifier,
    serve::{self, ServeError},
    storage::StorageError,
    token::{Audience, bearer_header},
};
use thiserror::Error;
use tonic::{Request, server::NamedService, service::Routes, transport::Channel};
use zeroize::Zeroizing;

/// Limits of the backup service.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest OrgEncMsg ciphertext.
    pub max_record_bytes: usize,
    pub default_sync_limit: u32,
    pub max_sync_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_record_bytes: 2 * 1024 * 1024,
            default_sync_limit: 1000,
            max_sync_limit: 10_000,
        }
    }
}

/// Everything the backup service needs to run.
#[derive(Clone)]
pub struct Config {
    /// The sled database (`<data_dir>/db`; unused on PostgreSQL) and, by
    /// default, the OrgKey and OrgCard.
    pub data_dir: PathBuf,
    /// `<data_dir>/org.key` when `None`.
    pub org_key_path: Option<PathBuf>,
    /// `<data_dir>/org.card` when `None`.
    pub org_card_path: Option<PathBuf>,
    /// Passphrase of the OrgKey file, when it has one.
    pub org_key_passphrase: Option<Zeroizing<String>>,
    pub server_url: String,
    pub kms_url: String,
    /// CA certificate (PEM) for `https` upstreams.
    pub upstream_ca: Option<PathBuf>,
    /// Pinned AppKey, key-service and token public keys.
    pub app_public_key: VerifyingKey,
    pub kms_public_key: VerifyingKey,
    pub token_public_key: VerifyingKey,
    pub limits: Limits,
}

/// Where the OrgKey and OrgCard files live.
pub fn org_paths(data_dir: &Path, key: Option<&Path>, card: Option<&Path>) -> (PathBuf, PathBuf) {
    (
        key.map_or_else(|| data_dir.join("org.key"), Path::to_path_buf),
        card.map_or_else(|| data_dir.join("org.card"), Path::to_path_buf),
    )
}

/// Why the service could not start or set up the organisation.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("OrgKey file: {0}")]
    Key(#[from] keystore::KeystoreError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] store::PgSetupError),
    #[error("OrgCard file {path}: {reason}")]
    Card { path: PathBuf, reason: String },
    #[error("no OrgKey at {0}: run `tessera-backup init-org` first")]
    NotInitialised(PathBuf),
    #[error("{service} at {url:?}: {reason}")]
    Upstream {
        service: &'static str,
        url: String,
        reason: String,
    },
    #[error("organisation set-up: {0}")]
    Setup(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The organisation: its identity, current OrgCard id and OrgKey, and the
/// keys of retired OrgCards (archived messages stay sealed to the card they
/// were sent to). Cannot be printed.
pub(crate) struct Org {
    pub(crate) identity: String,
    pub(crate) card_id: CardId,
    pub(crate) keys: DeviceKeys,
    pub(crate) retired: std::collections::HashMap<CardId, DeviceKeys>,
}

/// Directory of retired OrgKeys, each `<card id>.key`.
fn retired_dir(key_path: &Path) -> PathBuf {
    key_path.with_file_name("retired-org-keys")
}

fn load_retired(
    key_path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<std::collections::HashMap<CardId, DeviceKeys>, StartError> {
    let mut out = std::collections::HashMap::new();
    let dir = retired_dir(key_path);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".key"))
            .and_then(|n| n.parse::<CardId>().ok())
        else {
            continue;
        };
        out.insert(id, keystore::load(&path, passphrase)?.into_device()?);
    }
    Ok(out)
}

fn endpoint(service: &'static str, url: &str, ca: Option<&Path>) -> Result<Channel, StartError> {
    let err = |reason: String| StartError::Upstream {
        service,
        url: url.to_owned(),
        reason,
    };
    let endpoint = tessera_proto::connect::endpoint(url, ca).map_err(|e| err(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect_lazy())
}

/// A backup service ready to serve.
pub struct Backup {
    service: Arc<service::BackupService>,
}

impl Backup {
    /// Loads the OrgKey and OrgCard and opens the sled store.
    pub fn open(config: Config) -> Result<Self, StartError> {
        let store = store::SledStore::open(&config.data_dir.join("db"))?;
        Self::with_store(Arc::new(store), config)
    }

    /// Loads the OrgKey and OrgCard and opens the PostgreSQL store
    /// `database` names (applying its migrations). Any number of backup
    /// services may share one database; `config.data_dir` then holds only
    /// the OrgKey and OrgCard.
    pub async fn open_postgres(
        config: Config,
        database: &store::PgOptions,
    ) -> Result<Self, StartError> {
        let store = store::PgStore::open(database).await?;
        Self::with_store(Arc::new(store), config)
    }

    /// Runs over any store (the in-memory one in unit tests).
    pub fn with_store(store: Arc<dyn store::Store>, config: Config) -> Result<Self, StartError> {
        let (key_path, card_path) = org_paths(
            &config.data_dir,
            config.org_key_path.as_deref(),
            config.org_card_path.as_deref(),
        );
        if !key_path.exists() {
            return Err(StartError::NotInitialised(key_path));
        }
        let keys = keystore::load(
            &key_path,
            config.org_key_passphrase.as_ref().map(|p| p.as_bytes()),
        )?
        .into_device()?;
        let card_err = |reason: String| StartError::Card {
            path: card_path.clone(),
            reason,
        };
        let bytes = std::fs::read(&card_path).map_err(|e| card_err(e.to_string()))?;
        let card = Card::decode(bytes.as_slice()).map_err(|e| card_err(e.to_string()))?;
        let verifier = Verifier::new(config.app_public_key, config.kms_public_key);
        let parsed = ParsedCard::parse(card.clone()).map_err(|e| card_err(e.to_string()))?;
        let verified = verifier
            .verify(&card, Some(parsed.identity()), CardKind::Org)
            .map_err(|e| card_err(format!("does not verify against the pinned keys: {e}")))?;
        if verified.signing_key() != &keys.signing.verifying_key()
            || verified.encryption_key() != &keys.encryption.public_key()
        {
            return Err(card_err("belongs to another key than the OrgKey".into()));
        }
        let retired = load_retired(
            &key_path,
            config.org_key_passphrase.as_ref().map(|p| p.as_bytes()),
        )?;
        let org = Arc::new(Org {
            identity: verified.identity().to_owned(),
            card_id: verified.id(),
            keys,
            retired,
        });
        tracing::info!(org = %org.identity, card_id = %org.card_id, retired_keys = org.retired.len(), "OrgKey loaded");
        let upstream = upstream::Upstream {
            server: endpoint(
                "app server",
                &config.server_url,
                config.upstream_ca.as_deref(),
            )?,
            kms: endpoint(
                "key service",
                &config.kms_url,
                config.upstream_ca.as_deref(),
            )?,
            verifier,
            org: org.clone(),
            tokens: Default::default(),
        };
        Ok(Self {
            service: Arc::new(service::BackupService {
                org,
                store,
                tokens: TokenVerifier::new(config.token_public_key, Audience::Backup),
                upstream,
                limits: config.limits,
            }),
        })
    }

    pub fn org_identity(&self) -> &str {
        &self.service.org.identity
    }

    pub fn org_card_id(&self) -> CardId {
        self.service.org.card_id
    }

    /// The gRPC routes: the backup service, health and reflection.
    pub async fn routes(&self) -> Result<Routes, ServeError> {
        let limit = self.service.limits.max_record_bytes + 64 * 1024;
        let server = BackupServer::from_arc(self.service.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(64 * 1024 * 1024);
        serve::with_health_and_reflection(
            Routes::new(server),
            &[<BackupServer<service::BackupService> as NamedService>::NAME],
        )
        .await
    }
}

/// What organisation set-up needs.
pub struct OrgSetup<'a> {
    pub data_dir: &'a Path,
    pub org_key_path: Option<&'a Path>,
    pub org_card_path: Option<&'a Path>,
    /// Protects the OrgKey file when given.
    pub passphrase: Option<&'a [u8]>,
    pub kdf: KdfParams,
    pub server_url: &'a str,
    /// CA certificate (PEM) to trust when `server_url` is https.
    pub upstream_ca: Option<&'a Path>,
    pub admin_identity: &'a str,
    pub admin_password: &'a str,
    /// Replace an existing OrgKey (the new card supersedes the old one).
    pub rotate: bool,
}

/// The result of organisation set-up.
#[derive(Debug)]
pub struct OrgCreated {
    pub org_identity: String,
    pub card_id: CardId,
    pub key_path: PathBuf,
    pub card_path: PathBuf,
}

/// Generates the OrgKey, has the OrgCard signed with the AppKey and
/// registered at the key service through the app server's admin API (as
/// `admin_identity`), and writes the key (0600, passphrase-protected when
/// one is given) and the registered card.
pub async fn init_org(setup: OrgSetup<'_>) -> Result<OrgCreated, StartError> {
    let (key_path, card_path) = org_paths(setup.data_dir, setup.org_key_path, setup.org_card_path);
    let previous = if key_path.exists() {
        if !setup.rotate {
            return Err(StartError::Setup(format!(
                "an OrgKey already exists at {}; pass --rotate to replace it",
                key_path.display()
            )));
        }
        let bytes = std::fs::read(&card_path)
            .map_err(|e| StartError::Setup(format!("current OrgCard: {e}")))?;
        Some(CardId::of_snapshot(
            &Card::decode(bytes.as_slice())
                .map_err(|e| StartError::Setup(format!("current OrgCard: {e}")))?
                .content_snapshot,
        ))
    } else {
        None
    };
    let upstream = |reason: String| StartError::Upstream {
        service: "app server",
        url: setup.server_url.to_owned(),
        reason,
    };
    let channel = endpoint("app server", setup.server_url, setup.upstream_ca)?;
    let mut accounts = AccountsClient::new(channel.clone());
    let info = accounts
        .get_server_info(GetServerInfoRequest {})
        .await
        .map_err(|e| upstream(e.message().to_owned()))?
        .into_inner();
    if info.org_identity.is_empty() {
        return Err(StartError::Setup(
            "the app server has no organisation: start it with --org-identity".into(),
        ));
    }
    let login = accounts
        .login(LoginRequest {
            identity: setup.admin_identity.to_owned(),
            password: setup.admin_password.to_owned(),
        })
        .await
        .map_err(|e| upstream(format!("admin log-in: {}", e.message())))?
        .into_inner();
    let keys = DeviceKeys::generate().map_err(|e| StartError::Setup(e.to_string()))?;
    let card = NewCard {
        identity: &info.org_identity,
        kind: CardKind::Org,
        device_name: "organisation",
        created_at: tessera_service::now_secs(),
        previous_card_id: previous,
    }
    .self_signed(&keys)
    .map_err(|e| StartError::Setup(e.to_string()))?;
    let mut request = Request::new(RegisterOrgCardRequest { card: Some(card) });
    request.metadata_mut().insert(
        "authorization",
        bearer_header(&login.access_token)
            .parse()
            .map_err(|_| StartError::Setup("token header".into()))?,
    );
    let registered = AdminClient::new(channel)
        .register_org_card(request)
        .await
        .map_err(|e| upstream(format!("registering the OrgCard: {}", e.message())))?
        .into_inner()
        .record
        .ok_or_else(|| StartError::Setup("the app server returned no card".into()))?;
    let registered = transparency::registered_card(&registered.registration_entry)
        .map_err(|e| StartError::Setup(format!("the app server returned a bad card: {e}")))?;
    let parsed =
        ParsedCard::parse(registered.clone()).map_err(|e| StartError::Setup(e.to_string()))?;
    let protection = match setup.passphrase {
        Some(p) => Protection::Passphrase(p, setup.kdf),
        None => Protection::None,
    };
    if let Some(previous) = previous {
        // Keep the retired key: the archive sealed to it stays readable.
        let dir = retired_dir(&key_path);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StartError::Setup(format!("{}: {e}", dir.display())))?;
        std::fs::rename(&key_path, dir.join(format!("{previous}.key")))
            .map_err(|e| StartError::Setup(format!("retiring the old OrgKey: {e}")))?;
    }
    keystore::save(&key_path, &KeyMaterial::Device(keys), &protection)?;
    keystore::write_private_file(&card_path, &registered.encode_to_vec())?;
    Ok(OrgCreated {
        org_identity: info.org_identity,
        card_id: parsed.id(),
        key_path,
        card_path,
    })
}
