//! The client: one device profile, connected to its services.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use tessera_card::{CardId, CardKind, NewCard, Verifier};
use tessera_crypto::{
    DeviceKeys, SignatureContext, VerifyingKey,
    keystore::{self, KdfParams, Protection},
};
use tessera_proto::{
    kms::v1::{GetServiceInfoRequest, key_directory_client::KeyDirectoryClient},
    server::v1::{
        BeginDeviceLoginRequest, EnrollDeviceRequest, FinishDeviceLoginRequest,
        GetServerInfoRequest, LoginRequest, LoginResponse, SignUpRequest,
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
}

/// A logged-in session with the app server.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) header: String,
    pub(crate) expires_at: i64,
    pub(crate) org_member: bool,
    pub(crate) admin: bool,
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
    session: tokio::sync::Mutex<Option<Session>>,
    /// Cards verified by id (inclusion checked), with their status and when it was fetched.
    pub(crate) card_cache: Mutex<HashMap<CardId, (crate::directory::CardInfo, std::time::Instant)>>,
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
        let mut request = Request::new(EnrollDeviceRequest { card: Some(card) });
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
            session: tokio::sync::Mutex::new(Some(session)),
            card_cache: Mutex::new(HashMap::new()),
            org: Mutex::new(None),
            replay: state::ReplayLog::new(&dir),
            config,
        };
        // The registered card is checked like any other: signatures and log inclusion.
        let checkpoint = client.advance_checkpoint(&checkpoint).await?;
        let card = client.check_record(&record, &checkpoint, e.identity, CardKind::Client)?;
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
        *client.session.get_mut() = None;
        state::with_state(&dir, |s| {
            s.acknowledged.insert(client.config.card_id.clone());
        })?;
        tracing::info!(identity = e.identity, card_id = %client.card_id, "device enrolled");
        Ok(client)
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
            session: tokio::sync::Mutex::new(None),
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

    /// A valid session, logging in without a password (by signing a
    /// challenge with this device's key) when the last one is about to expire.
    pub(crate) async fn session(&self) -> Result<Session, ClientError> {
        let mut cached = self.session.lock().await;
        if let Some(s) = cached.as_ref()
            && s.expires_at - now_secs() > 60
        {
            return Ok(s.clone());
        }
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
        let mut message = Vec::with_capacity(100);
        message.extend_from_slice(&challenge);
        message.extend_from_slice(&(self.identity().len() as u32).to_be_bytes());
        message.extend_from_slice(self.identity().as_bytes());
        message.extend_from_slice(self.card_id.as_bytes());
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
        let session = Session::from_login(&login);
        *cached = Some(session.clone());
        Ok(session)
    }

    /// `message` with this device's current access token.
    pub(crate) async fn request<T>(&self, message: T) -> Result<Request<T>, ClientError> {
        let session = self.session().await?;
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
