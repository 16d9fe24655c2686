//! The client: one device profile, connected to its services.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use tessera_card::{
    CardId, CardKind, NewCard, Verifier,
    device_list::{self, Action, NewStatement},
    transparency,
};
use tessera_crypto::{
    DeviceKeys, SignatureContext, VerifyingKey,
    keystore::{self, KdfParams, Protection},
};
use tessera_proto::{
    kms::v1::{
        GetDeviceListRequest, GetServiceInfoRequest, key_directory_client::KeyDirectoryClient,
    },
    server::v1::{
        BeginDeviceLoginRequest, EnrollDeviceRequest, FinishDeviceLoginRequest,
        GetServerInfoRequest, IssueTokenRequest, LoginRequest, LoginResponse, SignUpRequest,
        accounts_client::AccountsClient, devices_client::DevicesClient,
    },
};
use tonic::{Request, transport::Channel};

use crate::{
    ClientError,
    error::rpc,
    profile::{Endpoints, Home, ProfileConfig, validate_profile_name},
    state,
};

/// How a new device joins.
pub struct Enrollment<'a> {
    pub endpoints: Endpoints,
    pub identity: &'a str,
    pub password: &'a str,
    /// Create the account first (sign-up) rather than log in.
    pub sign_up: bool,
    pub device_name: &'a str,
    /// Protects the device key file.
    pub passphrase: &'a [u8],
    pub kdf: KdfParams,
    /// AppKey and key-service keys known out of band (hex). When absent
    /// they are taken from the services on first use and pinned from then on.
    pub expected_app_key: Option<VerifyingKey>,
    pub expected_kms_key: Option<VerifyingKey>,
    /// Every device of the account was lost: replace them all with this one
    /// (a RESET of the device list; contacts see an identity change).
    /// Without it, a device of an account that already has devices joins as
    /// pending until one of them approves it.
    pub reset: bool,
}

/// Whether the user's own devices approved a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// In the verified device list, active.
    Approved,
    /// Enrolled (signed by the app and the key service) but not approved
    /// yet: it receives nothing until another device of the user approves it.
    Pending,
    /// Neither: removed from the list, revoked or replaced.
    Gone,
}

/// The service a token is for: each token works at one service only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Server,
    Kms,
    Backup,
}

impl Service {
    fn audience(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Kms => "kms",
            Self::Backup => "backup",
        }
    }
}

/// A token for one service.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) header: String,
    pub(crate) expires_at: i64,
    pub(crate) org_member: bool,
    pub(crate) admin: bool,
}

/// This device's tokens, one per service. The app-server token comes from a
/// log-in; the others are traded for it (`IssueToken`), so no service ever
/// sees a token another one accepts.
#[derive(Default)]
pub(crate) struct Sessions {
    server: Option<Session>,
    kms: Option<Session>,
    backup: Option<Session>,
}

impl Sessions {
    fn slot(&mut self, service: Service) -> &mut Option<Session> {
        match service {
            Service::Server => &mut self.server,
            Service::Kms => &mut self.kms,
            Service::Backup => &mut self.backup,
        }
    }
}

impl Session {
    fn from_login(r: &LoginResponse) -> Self {
        Self {
            header: format!("Bearer {}", hex::encode(&r.access_token)),
            expires_at: r.expires_at,
            org_member: r.org_member,
            admin: r.admin,
        }
    }
}

/// One device, connected. Cheap to share behind an `Arc`.
pub struct Client {
    pub(crate) home: Home,
    pub(crate) dir: PathBuf,
    pub(crate) config: ProfileConfig,
    pub(crate) card_id: CardId,
    pub(crate) keys: DeviceKeys,
    pub(crate) verifier: Verifier,
    pub(crate) server: Channel,
    pub(crate) kms: Channel,
    pub(crate) backup: Option<Channel>,
    sessions: tokio::sync::Mutex<Sessions>,
    /// Cards verified by id (inclusion checked), with their status and when it was fetched.
    pub(crate) card_cache:
        Mutex<HashMap<CardId, (tessera_card::record::CheckedRecord, std::time::Instant)>>,
    pub(crate) org: Mutex<Option<crate::backup::OrgInfo>>,
    pub(crate) replay: state::ReplayLog,
}

pub(crate) fn channel(
    service: &'static str,
    url: &str,
    ca: Option<&Path>,
) -> Result<Channel, ClientError> {
    let err = |detail: String| ClientError::Unreachable {
        service,
        url: url.to_owned(),
        detail,
    };
    let endpoint = tessera_proto::connect::endpoint(url, ca).map_err(|e| err(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy())
}

fn parse_key(hex_key: &str, what: &str, path: &Path) -> Result<VerifyingKey, ClientError> {
    hex::decode(hex_key)
        .ok()
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| ClientError::Profile {
            path: path.to_owned(),
            reason: format!("{what} is not a 32-byte hex key"),
        })
}

impl Client {
    /// Creates profile `name` in `home`: signs up or logs in with a
    /// password, makes this device's keys and ClientCard, has the app server
    /// enroll it, and checks the registered card like any other.
    pub async fn enroll(home: &Home, name: &str, e: Enrollment<'_>) -> Result<Self, ClientError> {
        validate_profile_name(name)?;
        tessera_card::validate_identity(e.identity)
            .map_err(|err| ClientError::Usage(format!("identity: {err}")))?;
        tessera_card::validate_device_name(e.device_name)
            .map_err(|err| ClientError::Usage(format!("device name: {err}")))?;
        let dir = home.profile_dir(name);
        if dir.join("profile.json").exists() {
            return Err(ClientError::Usage(format!(
                "profile {name:?} already exists in {}",
                home.root().display()
            )));
        }
        let ca = e.endpoints.ca_cert.as_deref();
        let server = channel("app server", &e.endpoints.server_url, ca)?;
        let kms = channel("key service", &e.endpoints.kms_url, ca)?;
        let url = &e.endpoints.server_url;

        // The keys every card and checkpoint will be checked against.
        let info = AccountsClient::new(server.clone())
            .get_server_info(GetServerInfoRequest {})
            .await
            .map_err(rpc("app server", url, "server info"))?
            .into_inner();
        let kms_info = KeyDirectoryClient::new(kms.clone())
            .get_service_info(GetServiceInfoRequest {})
            .await
            .map_err(rpc("key service", &e.endpoints.kms_url, "service info"))?
            .into_inner();
        let app_key = VerifyingKey::from_bytes(&info.app_public_key)
            .map_err(|_| ClientError::Crypto("the app server sent a malformed AppKey".into()))?;
        let kms_key = VerifyingKey::from_bytes(&kms_info.service_public_key)
            .map_err(|_| ClientError::Crypto("the key service sent a malformed key".into()))?;
        if e.expected_app_key.is_some_and(|k| k != app_key) {
            return Err(ClientError::Crypto(
                "the app server's AppKey is not the one you pinned: refusing to enroll".into(),
            ));
        }
        if e.expected_kms_key.is_some_and(|k| k != kms_key) {
            return Err(ClientError::Crypto(
                "the key service's key is not the one you pinned: refusing to enroll".into(),
            ));
        }
        if kms_info.app_public_key != info.app_public_key {
            return Err(ClientError::Crypto(
                "the app server and the key service disagree on the AppKey: refusing to enroll"
                    .into(),
            ));
        }

        let mut accounts = AccountsClient::new(server.clone());
        let login = if e.sign_up {
            accounts
                .sign_up(SignUpRequest {
                    identity: e.identity.to_owned(),
                    password: e.password.to_owned(),
                })
                .await
                .map_err(rpc("app server", url, "sign-up"))?
        } else {
            accounts
                .login(LoginRequest {
                    identity: e.identity.to_owned(),
                    password: e.password.to_owned(),
                })
                .await
                .map_err(rpc("app server", url, "log-in"))?
        }
        .into_inner();
        let session = Session::from_login(&login);

        let keys = DeviceKeys::generate().map_err(|err| ClientError::Crypto(err.to_string()))?;
        let card = NewCard {
            identity: e.identity,
            kind: CardKind::Client,
            device_name: e.device_name,
            created_at: now_secs(),
            previous_card_id: None,
        }
        .self_signed(&keys)
        .map_err(|err| ClientError::Usage(err.to_string()))?;
        let card_id = CardId::of_snapshot(&card.content_snapshot);
        // The first device starts the device list (GENESIS); a reset
        // replaces it; any other device joins as pending.
        let (length, head) = own_list_head(&server, &kms, &session, e.identity, url).await?;
        let action = match (length, e.reset) {
            (0, _) => Some(Action::Genesis),
            (_, true) => Some(Action::Reset),
            (_, false) => None,
        };
        let statement = action.map(|action| {
            NewStatement {
                identity: e.identity,
                seqno: length,
                previous_hash: head,
                action,
                subject: card_id,
                signer: card_id,
                created_at: now_secs(),
            }
            .sign(&keys.signing)
        });
        let mut request = Request::new(EnrollDeviceRequest {
            card: Some(card),
            statement,
        });
        authorize(&mut request, &session.header)?;
        let response = DevicesClient::new(server.clone())
            .enroll_device(request)
            .await
            .map_err(rpc("app server", url, "enrollment"))?
            .into_inner();

        std::fs::create_dir_all(&dir).map_err(|err| ClientError::io(&dir, err))?;
        let verifier = Verifier::new(app_key, kms_key);
        let (record, checkpoint) = match (response.record, response.checkpoint) {
            (Some(r), Some(c)) => (r, c),
            _ => {
                return Err(ClientError::Message(
                    "the app server answered without a card".into(),
                ));
            }
        };
        let config = ProfileConfig {
            version: ProfileConfig::new_version(),
            identity: e.identity.to_owned(),
            device_name: e.device_name.to_owned(),
            card_id: String::new(),
            endpoints: e.endpoints.clone(),
            app_public_key: hex::encode(app_key.as_bytes()),
            kms_public_key: hex::encode(kms_key.as_bytes()),
            org_identity: Some(info.org_identity).filter(|o| !o.is_empty()),
            created_at: now_secs(),
        };
        let backup = match &config.endpoints.backup_url {
            Some(u) => Some(channel("backup service", u, ca)?),
            None => None,
        };
        let mut client = Self {
            home: home.clone(),
            dir: dir.clone(),
            card_id: CardId::from_array([0; 32]),
            keys,
            verifier,
            server,
            kms,
            backup,
            sessions: tokio::sync::Mutex::new(Sessions {
                server: Some(session),
                ..Default::default()
            }),
            card_cache: Mutex::new(HashMap::new()),
            org: Mutex::new(None),
            replay: state::ReplayLog::new(&dir),
            config,
        };
        // The registered card is checked like any other: signatures and log inclusion.
        let checkpoint = client.advance_checkpoint(&checkpoint).await?;
        let card = client
            .check_record(&record, &checkpoint, e.identity, CardKind::Client)?
            .card;
        if card.signing_key() != &client.keys.signing.verifying_key() {
            return Err(ClientError::Crypto(
                "the enrolled card is not this device's".into(),
            ));
        }
        client.card_id = card.id();
        client.config.card_id = card.id().to_string();

        keystore::save_device(
            &dir.join("device.key"),
            &client.keys,
            &Protection::Passphrase(e.passphrase, e.kdf),
        )?;
        client.config.save(&dir)?;
        home.record_created(e.identity, &client.config.card_id)?;
        // From now on this device logs in as itself (by signature), so
        // revoking it takes effect at once.
        *client.sessions.get_mut() = Sessions::default();
        state::with_state(&dir, |s| {
            s.acknowledged.insert(client.config.card_id.clone());
        })?;
        tracing::info!(identity = e.identity, card_id = %client.card_id, "device enrolled");
        Ok(client)
    }

    /// Whether this user's own devices approved this device (per the device
    /// list, verified).
    pub async fn approval(&self) -> Result<Approval, ClientError> {
        let (found, _) = self.cards_of(&[self.identity().to_owned()]).await?;
        let devices = found.get(self.identity()).cloned().unwrap_or_default();
        Ok(if devices.approved.iter().any(|c| c.id() == self.card_id) {
            Approval::Approved
        } else if devices.pending.iter().any(|c| c.id() == self.card_id) {
            Approval::Pending
        } else {
            Approval::Gone
        })
    }

    /// Opens profile `name` of `home`, unlocking its key with `passphrase`.
    pub fn open(home: &Home, name: &str, passphrase: &[u8]) -> Result<Self, ClientError> {
        validate_profile_name(name)?;
        let dir = home.profile_dir(name);
        let config = ProfileConfig::load(&dir)?;
        let keys = keystore::load(&dir.join("device.key"), Some(passphrase))?.into_device()?;
        let path = dir.join("profile.json");
        let app_key = parse_key(&config.app_public_key, "app_public_key", &path)?;
        let kms_key = parse_key(&config.kms_public_key, "kms_public_key", &path)?;
        let card_id: CardId = config.card_id.parse().map_err(|_| ClientError::Profile {
            path: path.clone(),
            reason: "card_id is not a card id".into(),
        })?;
        let ca = config.endpoints.ca_cert.as_deref();
        let server = channel("app server", &config.endpoints.server_url, ca)?;
        let kms = channel("key service", &config.endpoints.kms_url, ca)?;
        let backup = match &config.endpoints.backup_url {
            Some(u) => Some(channel("backup service", u, ca)?),
            None => None,
        };
        Ok(Self {
            home: home.clone(),
            card_id,
            keys,
            verifier: Verifier::new(app_key, kms_key),
            server,
            kms,
            backup,
            sessions: tokio::sync::Mutex::new(Sessions::default()),
            card_cache: Mutex::new(HashMap::new()),
            org: Mutex::new(None),
            replay: state::ReplayLog::new(&dir),
            dir,
            config,
        })
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    pub fn card_id(&self) -> CardId {
        self.card_id
    }

    pub fn device_name(&self) -> &str {
        &self.config.device_name
    }

    pub fn config(&self) -> &ProfileConfig {
        &self.config
    }

    pub fn profile_dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn server_url(&self) -> &str {
        &self.config.endpoints.server_url
    }

    pub(crate) fn kms_url(&self) -> &str {
        &self.config.endpoints.kms_url
    }

    /// A valid app-server session, logging in without a password (by
    /// signing a challenge with this device's key) when the last one is
    /// about to expire.
    pub(crate) async fn session(&self) -> Result<Session, ClientError> {
        self.session_for(Service::Server).await
    }

    /// A valid token for `service`.
    pub(crate) async fn session_for(&self, service: Service) -> Result<Session, ClientError> {
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.slot(service).as_ref()
            && s.expires_at - now_secs() > 60
        {
            return Ok(s.clone());
        }
        let server = match sessions.server.as_ref() {
            Some(s) if s.expires_at - now_secs() > 60 => s.clone(),
            _ => {
                let s = self.device_login().await?;
                sessions.server = Some(s.clone());
                s
            }
        };
        if service == Service::Server {
            return Ok(server);
        }
        let token = self.trade(&server, service).await?;
        *sessions.slot(service) = Some(token.clone());
        Ok(token)
    }

    /// A fresh app-server session from a password log-in (what account
    /// changes need); not kept.
    pub(crate) async fn password_session(&self, password: &str) -> Result<Session, ClientError> {
        let login = AccountsClient::new(self.server.clone())
            .login(LoginRequest {
                identity: self.identity().to_owned(),
                password: password.to_owned(),
            })
            .await
            .map_err(rpc("app server", self.server_url(), "log-in"))?
            .into_inner();
        Ok(Session::from_login(&login))
    }

    /// Trades an app-server token for a token of `service`.
    async fn trade(&self, server: &Session, service: Service) -> Result<Session, ClientError> {
        let mut request = Request::new(IssueTokenRequest {
            audience: service.audience().to_owned(),
        });
        authorize(&mut request, &server.header)?;
        let response = AccountsClient::new(self.server.clone())
            .issue_token(request)
            .await
            .map_err(rpc("app server", self.server_url(), "a service token"))?
            .into_inner();
        Ok(Session::from_login(&response))
    }

    async fn device_login(&self) -> Result<Session, ClientError> {
        let url = self.server_url().to_owned();
        let mut accounts = AccountsClient::new(self.server.clone());
        let challenge = accounts
            .begin_device_login(BeginDeviceLoginRequest {
                identity: self.identity().to_owned(),
                card_id: self.card_id.to_vec(),
            })
            .await
            .map_err(rpc("app server", &url, "device log-in"))?
            .into_inner()
            .challenge;
        let message =
            tessera_card::device_login_message(&challenge, self.identity(), &self.card_id);
        let signature = self
            .keys
            .signing
            .sign(SignatureContext::DeviceLogin, &message);
        let login = accounts
            .finish_device_login(FinishDeviceLoginRequest {
                identity: self.identity().to_owned(),
                card_id: self.card_id.to_vec(),
                challenge,
                signature: signature.to_vec(),
            })
            .await
            .map_err(rpc("app server", &url, "device log-in"))?
            .into_inner();
        Ok(Session::from_login(&login))
    }

    /// `message` with this device's current app-server token.
    pub(crate) async fn request<T>(&self, message: T) -> Result<Request<T>, ClientError> {
        self.request_to(Service::Server, message).await
    }

    /// `message` with this device's current token for `service`.
    pub(crate) async fn request_to<T>(
        &self,
        service: Service,
        message: T,
    ) -> Result<Request<T>, ClientError> {
        let session = self.session_for(service).await?;
        let mut request = Request::new(message);
        authorize(&mut request, &session.header)?;
        Ok(request)
    }

    /// Whether this user belongs to the organisation (so received messages
    /// are backed up), per the app server.
    pub async fn is_org_member(&self) -> Result<bool, ClientError> {
        Ok(self.session().await?.org_member && self.config.org_identity.is_some())
    }

    /// Whether this user is an admin of the app server.
    pub async fn is_admin(&self) -> Result<bool, ClientError> {
        Ok(self.session().await?.admin)
    }

    /// Replaces the key file's passphrase.
    pub fn change_passphrase(&self, new: &[u8], kdf: KdfParams) -> Result<(), ClientError> {
        keystore::save_device(
            &self.dir.join("device.key"),
            &self.keys,
            &Protection::Passphrase(new, kdf),
        )?;
        Ok(())
    }
}

/// The length and head hash of `identity`'s device list, to sign the next
/// statement against. Not trusted beyond that: the key service refuses a
/// statement that does not extend the real head, and the list is verified
/// in full once the device is enrolled.
async fn own_list_head(
    server: &Channel,
    kms: &Channel,
    session: &Session,
    identity: &str,
    url: &str,
) -> Result<(u64, Option<[u8; 32]>), ClientError> {
    let mut request = Request::new(IssueTokenRequest {
        audience: "kms".into(),
    });
    authorize(&mut request, &session.header)?;
    let kms_token = AccountsClient::new(server.clone())
        .issue_token(request)
        .await
        .map_err(rpc("app server", url, "a key service token"))?
        .into_inner();
    let mut request = Request::new(GetDeviceListRequest {
        identity: identity.to_owned(),
        from_seqno: u64::MAX,
    });
    authorize(&mut request, &Session::from_login(&kms_token).header)?;
    let list = KeyDirectoryClient::new(kms.clone())
        .get_device_list(request)
        .await
        .map_err(rpc("key service", url, "the device list"))?
        .into_inner()
        .device_list
        .unwrap_or_default();
    if list.length == 0 {
        return Ok((0, None));
    }
    let mut request = Request::new(GetDeviceListRequest {
        identity: identity.to_owned(),
        from_seqno: list.length - 1,
    });
    authorize(&mut request, &Session::from_login(&kms_token).header)?;
    let head = KeyDirectoryClient::new(kms.clone())
        .get_device_list(request)
        .await
        .map_err(rpc("key service", url, "the device list"))?
        .into_inner()
        .device_list
        .and_then(|l| l.statements.into_iter().last())
        .and_then(|s| match transparency::parse_entry(&s.entry) {
            Ok(transparency::LogEvent::DeviceStatement { statement, .. }) => {
                Some(device_list::statement_hash(&statement.statement))
            }
            _ => None,
        })
        .ok_or_else(|| {
            ClientError::Message("the key service did not show the device list's head".into())
        })?;
    Ok((list.length, Some(head)))
}

pub(crate) fn authorize<T>(request: &mut Request<T>, header: &str) -> Result<(), ClientError> {
    request.metadata_mut().insert(
        "authorization",
        header
            .parse()
            .map_err(|_| ClientError::Crypto("malformed access token".into()))?,
    );
    Ok(())
}

pub(crate) fn now_secs() -> i64 {
    now_ms() / 1000
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
