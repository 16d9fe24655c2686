//! Test support (not published): runs the real `tessera-kms`,
//! `tessera-server` and `tessera-backup` binaries as child processes on free
//! loopback ports, each with its own temporary data directory and keys,
//! waits for their health checks, and can stop (SIGTERM), kill (SIGKILL) and
//! restart any of them on the same data. [`Cluster::start_tls`] runs the
//! same cluster with every hop over TLS (a self-signed certificate the
//! services and clients are told to trust). No child outlives the test: they
//! are killed on drop (also when a test panics) and, on Linux, when the test
//! process itself dies. [`Postgres`] is a throwaway PostgreSQL server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: failures are test failures"
)]

use std::{
    collections::BTreeMap,
    fs::File,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub mod postgres;

pub use postgres::Postgres;
use tessera_client::{Client, Endpoints, Enrollment, Home, KdfParams};
use tessera_crypto::VerifyingKey;
use tessera_proto::server::v1::{SignUpRequest, accounts_client::AccountsClient};
use tonic::transport::Channel;

/// Passphrase of every test device profile.
pub const PASSPHRASE: &[u8] = b"testkit passphrase";
/// Identity of the organisation in every cluster.
pub const ORG: &str = "org:test";
const ADMIN: &str = "admin";
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the service binaries are, built once per test process.
fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TESSERA_BIN_DIR") {
            return PathBuf::from(dir);
        }
        // The test executable is <target>/<profile>/deps/<name>.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The very build `cargo test --workspace` makes (same targets, same
        // features): under it this is a no-op; run alone it builds what is
        // missing or stale, the service binaries included.
        cmd.args(["test", "--quiet", "--workspace", "--no-run"])
            .arg("--target-dir")
            .arg(&target_dir);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("run cargo to build the service binaries");
        assert!(status.success(), "building the service binaries failed");
        profile_dir
    })
}

/// On Linux, the child started by `cmd` is killed when this process dies.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the child
        // between fork and exec; it allocates nothing and takes no lock.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One service process.
pub struct Service {
    name: &'static str,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    pub addr: SocketAddr,
    /// Where the service serves its Prometheus metrics (`--metrics-addr`).
    pub metrics_addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    /// Served over TLS with a certificate this CA file vouches for.
    ca: Option<PathBuf>,
}

impl Service {
    fn new(
        name: &'static str,
        dir: &Path,
        args: Vec<String>,
        mut env: BTreeMap<String, String>,
        tls: Option<&TlsFiles>,
    ) -> Self {
        let mut service = Self {
            name,
            args,
            env: BTreeMap::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            log: dir.join(format!("{name}.log")),
            child: None,
            ca: tls.map(|t| t.cert.clone()),
        };
        if let Some(tls) = tls {
            let prefix = service.env_prefix();
            env.insert(format!("{prefix}_TLS_CERT"), path_string(&tls.cert));
            env.insert(format!("{prefix}_TLS_KEY"), path_string(&tls.key));
        }
        service.env = env;
        service
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A connection to the service (trusting its certificate under TLS).
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        tessera_proto::connect::endpoint(&self.url(), self.ca.as_deref())
            .unwrap()
            .connect()
            .await
    }

    /// Starts the process and waits until its health check says SERVING.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin_dir().join(self.name));
        cmd.args(&self.args)
            .envs(&self.env)
            .env(
                format!("{}_LISTEN", self.env_prefix()),
                self.addr.to_string(),
            )
            .env(
                format!("{}_METRICS_ADDR", self.env_prefix()),
                self.metrics_addr.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name)),
        );
        self.wait_healthy().await;
    }

    fn env_prefix(&self) -> &'static str {
        match self.name {
            "tessera-kms" => "TESSERA_KMS",
            "tessera-server" => "TESSERA_SERVER",
            _ => "TESSERA_BACKUP",
        }
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited ({status}) while starting:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(channel) = self.channel().await {
                let serving = tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| {
                        r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32
                    });
                if serving {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not healthy after {HEALTH_TIMEOUT:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The service's metrics as it serves them (`GET /metrics`).
    pub async fn scrape(&self) -> Metrics {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .unwrap_or_else(|e| panic!("{} metrics at {}: {e}", self.name, self.metrics_addr));
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{} metrics: no HTTP response: {response}", self.name));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{} metrics: {head}",
            self.name
        );
        Metrics(body.to_owned())
    }

    /// The last lines of the service's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn signal(&mut self, signal: &str) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status();
        Some(child.wait().unwrap())
    }

    /// SIGTERM, and waits for a graceful exit; returns whether it exited
    /// cleanly. The wait happens off the async runtime, so this process's
    /// own connections keep answering the service while it shuts down.
    pub async fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        tokio::task::spawn_blocking(move || {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            child.wait().is_ok_and(|s| s.success())
        })
        .await
        .unwrap_or(false)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        self.signal("-KILL");
    }

    /// Starts again on the same address and data.
    pub async fn restart(&mut self) {
        self.start().await;
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A scrape of a service's metrics (Prometheus text format).
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample `name` whose labels include every one of
    /// `labels`, summed over the samples that match (0 when none does).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (series_name, series_labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let matches = series_name == name
                    && labels.iter().all(|(k, v)| {
                        series_labels
                            .split(',')
                            .any(|l| l == format!("{k}=\"{v}\""))
                    });
                matches.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }
}

/// Public keys of a cluster, for pinning.
#[derive(Debug, Clone)]
pub struct Keys {
    pub app: VerifyingKey,
    pub token: VerifyingKey,
    pub kms: VerifyingKey,
}

/// The three services, running as processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The certificate (also the CA to trust) and key, under TLS.
    pub tls: Option<TlsFiles>,
    pub kms: Service,
    pub server: Service,
    pub backup: Service,
    pub keys: Keys,
    pub admin_password: String,
    pub home: Home,
}

fn key_from(json: &serde_json::Value, field: &str) -> VerifyingKey {
    let hex_key = json[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {json}"));
    VerifyingKey::from_bytes(&hex::decode(hex_key).unwrap()).unwrap()
}

/// Runs one of the binaries' `keys` / `init-org` commands and parses its JSON.
fn run_json(bin: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new(bin_dir().join(bin))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{bin} {args:?} printed no JSON: {e}"))
}

/// A self-signed certificate for 127.0.0.1 and localhost, and its key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    fn generate(dir: &Path) -> Self {
        let generated = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .unwrap();
        let files = Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&files.cert, generated.cert.pem()).unwrap();
        std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();
        files
    }
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Cluster {
    /// Keys generated, key service, app server (admin `admin`, organisation
    /// `org:test`), the OrgKey set up, backup service: all healthy.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// [`Cluster::start`] with every service served over TLS, the server
    /// and backup service reaching their upstreams over TLS, and clients
    /// trusting the certificate.
    pub async fn start_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls.then(|| TlsFiles::generate(dir.path()));
        let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        let server_keys = run_json("tessera-server", &["keys", "--data-dir", &d("server")], &[]);
        let kms_keys = run_json("tessera-kms", &["keys", "--data-dir", &d("kms")], &[]);
        let keys = Keys {
            app: key_from(&server_keys, "app_public_key"),
            token: key_from(&server_keys, "token_public_key"),
            kms: key_from(&kms_keys, "kms_public_key"),
        };
        let hex_key = |k: &VerifyingKey| hex::encode(k.as_bytes());

        let env = |pairs: &[(&str, String)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };
        let mut kms = Service::new(
            "tessera-kms",
            dir.path(),
            vec![],
            env(&[
                ("TESSERA_KMS_DATA_DIR", d("kms")),
                ("TESSERA_KMS_APP_PUBLIC_KEY", hex_key(&keys.app)),
                ("TESSERA_KMS_TOKEN_PUBLIC_KEY", hex_key(&keys.token)),
            ]),
            tls.as_ref(),
        );
        kms.start().await;
        let ca = tls.as_ref().map(|t| path_string(&t.cert));
        let with_ca = |mut vars: BTreeMap<String, String>, var: &str| {
            if let Some(ca) = &ca {
                vars.insert(var.to_owned(), ca.clone());
            }
            vars
        };
        let mut server = Service::new(
            "tessera-server",
            dir.path(),
            vec![],
            with_ca(
                env(&[
                    ("TESSERA_SERVER_DATA_DIR", d("server")),
                    ("TESSERA_SERVER_KMS_URL", kms.url()),
                    ("TESSERA_SERVER_ADMINS", ADMIN.into()),
                    ("TESSERA_SERVER_ORG_IDENTITY", ORG.into()),
                ]),
                "TESSERA_SERVER_KMS_CA",
            ),
            tls.as_ref(),
        );
        server.start().await;

        let admin_password = hex::encode(tessera_crypto::random_array::<12>().unwrap());
        let channel = server.channel().await.unwrap();
        AccountsClient::new(channel)
            .sign_up(SignUpRequest {
                identity: ADMIN.into(),
                password: admin_password.clone(),
            })
            .await
            .unwrap();
        let url = server.url();
        let pw = admin_password.clone();
        let backup_dir = d("backup");
        let init_env = with_ca(
            env(&[("TESSERA_BACKUP_ADMIN_PASSWORD", pw)]),
            "TESSERA_BACKUP_UPSTREAM_CA",
        );
        let org = tokio::task::spawn_blocking(move || {
            let init_env: Vec<(&str, &str)> = init_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            run_json(
                "tessera-backup",
                &[
                    "init-org",
                    "--data-dir",
                    &backup_dir,
                    "--server-url",
                    &url,
                    "--admin",
                    ADMIN,
                ],
                &init_env,
            )
        })
        .await
        .unwrap();
        assert_eq!(org["org_identity"], ORG);
        let mut backup = Service::new(
            "tessera-backup",
            dir.path(),
            vec![],
            with_ca(
                env(&[
                    ("TESSERA_BACKUP_DATA_DIR", d("backup")),
                    ("TESSERA_BACKUP_SERVER_URL", server.url()),
                    ("TESSERA_BACKUP_KMS_URL", kms.url()),
                    ("TESSERA_BACKUP_APP_PUBLIC_KEY", hex_key(&keys.app)),
                    ("TESSERA_BACKUP_KMS_PUBLIC_KEY", hex_key(&keys.kms)),
                    ("TESSERA_BACKUP_TOKEN_PUBLIC_KEY", hex_key(&keys.token)),
                ]),
                "TESSERA_BACKUP_UPSTREAM_CA",
            ),
            tls.as_ref(),
        );
        backup.start().await;
        let home = Home::new(dir.path().join("home"));
        Self {
            dir,
            tls,
            kms,
            server,
            backup,
            keys,
            admin_password,
            home,
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            server_url: self.server.url(),
            kms_url: self.kms.url(),
            backup_url: Some(self.backup.url()),
            ca_cert: self.tls.as_ref().map(|t| t.cert.clone()),
        }
    }

    /// Enrolls device `profile` of `identity` (signing up first when `first`).
    pub async fn device(&self, profile: &str, identity: &str, first: bool) -> Client {
        self.device_with(profile, identity, first, self.endpoints())
            .await
    }

    /// Like [`Cluster::device`], reaching the services at `endpoints` (a proxy, say).
    pub async fn device_with(
        &self,
        profile: &str,
        identity: &str,
        first: bool,
        endpoints: Endpoints,
    ) -> Client {
        let admin = identity == ADMIN;
        let password = if admin {
            self.admin_password.clone()
        } else {
            format!("{identity}-testkit-password")
        };
        Client::enroll(
            &self.home,
            profile,
            Enrollment {
                endpoints,
                identity,
                password: &password,
                sign_up: first && !admin,
                device_name: profile,
                passphrase: PASSPHRASE,
                kdf: KdfParams::DANGER_FAST_FOR_TESTS,
                expected_app_key: Some(self.keys.app),
                expected_kms_key: Some(self.keys.kms),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("enrolling {profile} of {identity}: {e}"))
    }

    /// Profiles for `users` × `devices` (named `<user>-<n>`), in order.
    pub async fn users(&self, users: &[&str], devices: usize) -> BTreeMap<String, Vec<Client>> {
        let mut out = BTreeMap::new();
        for user in users {
            let mut clients = Vec::new();
            for n in 0..devices {
                clients.push(self.device(&format!("{user}-{n}"), user, n == 0).await);
            }
            out.insert((*user).to_owned(), clients);
        }
        out
    }

    /// The admin's device (to manage the organisation).
    pub async fn admin(&self) -> Client {
        self.device("admin", ADMIN, false).await
    }

    /// Reopens a profile (a fresh session: new token claims).
    pub fn reopen(&self, profile: &str) -> Client {
        Client::open(&self.home, profile, PASSPHRASE).unwrap()
    }

    /// The data directory of a service ("kms", "server", "backup").
    pub fn data_dir(&self, service: &str) -> PathBuf {
        self.dir.path().join(service)
    }
}

/// Path of a workspace binary (`tessera`, `tessera-kms`, ...), built with the services.
pub fn bin_path(name: &str) -> PathBuf {
    bin_dir().join(name)
}

impl Cluster {
    /// A second key service holding this cluster's KMS key but its own,
    /// empty log: a directory that can sign checkpoints of another history.
    pub async fn forked_kms(&self) -> Service {
        let dir = self.dir.path().join("kms-fork");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.data_dir("kms").join("kms.key"), dir.join("kms.key")).unwrap();
        let mut env = self.kms.env.clone();
        env.insert(
            "TESSERA_KMS_DATA_DIR".into(),
            dir.to_string_lossy().into_owned(),
        );
        env.retain(|k, _| !k.ends_with("_TLS_CERT") && !k.ends_with("_TLS_KEY"));
        let mut fork = Service::new("tessera-kms", &dir, vec![], env, self.tls.as_ref());
        fork.start().await;
        fork
    }
}
