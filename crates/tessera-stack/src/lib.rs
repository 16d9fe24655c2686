//! The whole Tessera stack in one process: the key service, the app server
//! and the organisation's backup service, each on its own sled directory
//! under one data directory, on loopback. On first start it creates every
//! key, an admin account (password saved next to the data, mode 0600) and
//! the organisation (OrgKey + OrgCard registered through the admin API).
//! Each service still runs alone from its own binary; this is for
//! `tessera stack`, `tessera demo` and tests.

pub mod hostile;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use tessera_backup::{Backup, OrgSetup};
use tessera_crypto::{VerifyingKey, keystore::KdfParams};
use tessera_server::{PasswordParams, Server};
use tessera_service::serve::{Running, ServeOptions, bind};
use thiserror::Error;

/// How to run the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub data_dir: PathBuf,
    pub host: IpAddr,
    /// Ports of the app server, key service and backup service; 0 picks a free one.
    pub server_port: u16,
    pub kms_port: u16,
    pub backup_port: u16,
    pub admin_identity: String,
    /// `None` runs without an organisation (and without the backup service).
    pub org_identity: Option<String>,
    /// Cheap Argon2id costs for passwords and the OrgKey: tests only.
    pub danger_fast_kdf: bool,
    /// Sign-ups allowed per peer address and throttle window; `None` keeps
    /// the app server's default. Tests and benchmarks sign every user up
    /// from loopback.
    pub signups_per_peer: Option<usize>,
    /// Keep the app server's data in this PostgreSQL database instead of
    /// sled (the load tools compare the two; `tessera stack` never sets it).
    pub server_database: Option<tessera_server::store::PgOptions>,
    /// Most sends to one channel the app server stores together; `None`
    /// keeps its default (server-load compares batching on and off).
    pub server_max_send_batch: Option<usize>,
}

impl StackConfig {
    /// The defaults of `tessera stack`: ports 7400/7401/7402 on 127.0.0.1.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            server_port: 7400,
            kms_port: 7401,
            backup_port: 7402,
            admin_identity: "admin".into(),
            org_identity: Some("org:example".into()),
            danger_fast_kdf: false,
            signups_per_peer: None,
            server_database: None,
            server_max_send_batch: None,
        }
    }

    /// Free ports, fast KDFs: for tests.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            server_port: 0,
            kms_port: 0,
            backup_port: 0,
            danger_fast_kdf: true,
            signups_per_peer: Some(100_000),
            ..Self::new(data_dir)
        }
    }
}

/// What clients need to use the stack.
#[derive(Debug, Clone)]
pub struct StackInfo {
    pub server_url: String,
    pub kms_url: String,
    pub backup_url: Option<String>,
    pub app_public_key: VerifyingKey,
    pub kms_public_key: VerifyingKey,
    pub token_public_key: VerifyingKey,
    pub admin_identity: String,
    pub admin_password: String,
    pub org_identity: Option<String>,
    pub data_dir: PathBuf,
}

impl StackInfo {
    /// The addresses a client of this stack dials (plain loopback, no CA).
    pub fn endpoints(&self) -> tessera_client::Endpoints {
        tessera_client::Endpoints {
            server_url: self.server_url.clone(),
            kms_url: self.kms_url.clone(),
            backup_url: self.backup_url.clone(),
            ca_cert: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum StackError {
    #[error("key service: {0}")]
    Kms(#[from] tessera_kms::StartError),
    #[error("app server: {0}")]
    Server(#[from] tessera_server::StartError),
    #[error("backup service: {0}")]
    Backup(#[from] tessera_backup::StartError),
    #[error("serving: {0}")]
    Serve(#[from] tessera_service::serve::ServeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin account: {0}")]
    Admin(String),
    #[error("app-server replicas need the app server on PostgreSQL (server_database)")]
    Replica,
}

/// The running stack. Dropping it stops every service.
pub struct Stack {
    info: StackInfo,
    config: StackConfig,
    /// The app server, then its replicas ([`Stack::start_server_replica`]).
    servers: Vec<Arc<Server>>,
    running: Vec<Running>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StackError + '_ {
    move |source| StackError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The admin password, created (random, 0600) on first start.
fn admin_password(path: &Path) -> Result<(String, bool), StackError> {
    match std::fs::read_to_string(path) {
        Ok(p) => Ok((p.trim().to_owned(), false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = tessera_crypto::random_array::<16>()
                .map_err(|e| StackError::Admin(e.to_string()))?;
            let password = hex::encode(bytes);
            tessera_crypto::keystore::write_private_file(path, password.as_bytes())
                .map_err(|e| StackError::Admin(e.to_string()))?;
            Ok((password, true))
        }
        Err(e) => Err(io(path)(e)),
    }
}

impl Stack {
    pub async fn start(config: StackConfig) -> Result<Self, StackError> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(io(data))?;
        let (kms_dir, server_dir, backup_dir) =
            (data.join("kms"), data.join("server"), data.join("backup"));
        let (app_path, token_path) = tessera_server::key_paths(&server_dir, None, None);
        let (app_key, token_key) = tessera_server::load_or_create_keys(&app_path, &token_path)?;
        let addr = |port| SocketAddr::new(config.host, port);

        let kms = tessera_kms::Kms::open(&tessera_kms::Config {
            data_dir: kms_dir,
            key_path: None,
            app_public_key: app_key.verifying_key(),
            token_public_key: token_key.verifying_key(),
            limits: tessera_kms::Limits::default(),
            max_request_bytes: tessera_kms::DEFAULT_MAX_REQUEST_BYTES,
        })
        .await?;
        let kms_public_key = kms.directory().public_key();
        let kms_running = Running::spawn(
            kms.routes().await?,
            bind(addr(config.kms_port)).await?,
            ServeOptions::default(),
        )?;

        let server_config = Config::server(&server_dir, kms_running.url(), &config);
        let server = Arc::new(match &config.server_database {
            None => Server::open(server_config)?,
            Some(database) => Server::open_postgres(server_config, database).await?,
        });
        let (admin_password, _) = admin_password(&data.join("admin-password"))?;
        if server
            .create_admin(&config.admin_identity, &admin_password)
            .await?
        {
            tracing::info!(admin = %config.admin_identity, "admin account created");
        }
        let server_running = Running::spawn(
            server.routes().await?,
            bind(addr(config.server_port)).await?,
            ServeOptions::default(),
        )?;

        let mut running = vec![kms_running, server_running];
        let mut backup_url = None;
        if config.org_identity.is_some() {
            let (key_path, _) = tessera_backup::org_paths(&backup_dir, None, None);
            if !key_path.exists() {
                let created = tessera_backup::init_org(OrgSetup {
                    data_dir: &backup_dir,
                    org_key_path: None,
                    org_card_path: None,
                    passphrase: None,
                    kdf: KdfParams::DEFAULT,
                    server_url: &running[1].url(),
                    upstream_ca: None,
                    admin_identity: &config.admin_identity,
                    admin_password: &admin_password,
                    rotate: false,
                })
                .await?;
                tracing::info!(org = %created.org_identity, card_id = %created.card_id, "organisation set up");
            }
            let backup = Backup::open(tessera_backup::Config {
                data_dir: backup_dir,
                org_key_path: None,
                org_card_path: None,
                org_key_passphrase: None,
                server_url: running[1].url(),
                kms_url: running[0].url(),
                upstream_ca: None,
                app_public_key: app_key.verifying_key(),
                kms_public_key,
                token_public_key: token_key.verifying_key(),
                limits: tessera_backup::Limits::default(),
            })?;
            let backup_running = Running::spawn(
                backup.routes().await?,
                bind(addr(config.backup_port)).await?,
                ServeOptions::default(),
            )?;
            backup_url = Some(backup_running.url());
            running.push(backup_running);
        }
        let info = StackInfo {
            server_url: running[1].url(),
            kms_url: running[0].url(),
            backup_url,
            app_public_key: app_key.verifying_key(),
            kms_public_key,
            token_public_key: token_key.verifying_key(),
            admin_identity: config.admin_identity.clone(),
            admin_password,
            org_identity: config.org_identity.clone(),
            data_dir: config.data_dir.clone(),
        };
        Ok(Self {
            info,
            config,
            servers: vec![server],
            running,
        })
    }

    pub fn info(&self) -> &StackInfo {
        &self.info
    }

    /// Starts another app server on the stack's PostgreSQL database (a
    /// replica, as docs/operations.md describes: the same keys, data
    /// directory and key service, its own listener on a free port and its
    /// own connection that listens for what the others store); returns its
    /// URL. Only with [`StackConfig::server_database`]: on sled the
    /// database belongs to one process.
    pub async fn start_server_replica(&mut self) -> Result<String, StackError> {
        let Some(database) = &self.config.server_database else {
            return Err(StackError::Replica);
        };
        let server_config = Config::server(
            &self.config.data_dir.join("server"),
            self.info.kms_url.clone(),
            &self.config,
        );
        let server = Arc::new(Server::open_postgres(server_config, database).await?);
        let running = Running::spawn(
            server.routes().await?,
            bind(SocketAddr::new(self.config.host, 0)).await?,
            ServeOptions::default(),
        )?;
        let url = running.url();
        self.servers.push(server);
        self.running.push(running);
        Ok(url)
    }

    /// Stops every service (live subscriptions end first) and waits.
    pub async fn stop(mut self) {
        for server in &self.servers {
            server.begin_shutdown();
        }
        while let Some(r) = self.running.pop() {
            let _ = r.stop().await;
        }
    }
}

struct Config;

impl Config {
    fn server(dir: &Path, kms_url: String, stack: &StackConfig) -> tessera_server::Config {
        let mut c = tessera_server::Config::new(dir, kms_url);
        c.org_identity = stack.org_identity.clone();
        if stack.danger_fast_kdf {
            c.password_params = PasswordParams::DANGER_FAST_FOR_TESTS;
        }
        if let Some(n) = stack.signups_per_peer {
            c.throttle.signups_per_peer = n;
        }
        if let Some(n) = stack.server_max_send_batch {
            c.limits.max_send_batch = n.max(1);
        }
        c
    }
}
