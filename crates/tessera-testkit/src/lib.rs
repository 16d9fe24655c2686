//! Test support (not published): runs the real `tessera-kms`,
//! `tessera-server` and `tessera-backup` binaries as child processes on free
//! loopback ports, each with its own temporary data directory and keys,
//! waits for their health checks, and can stop (SIGTERM), kill (SIGKILL) and
//! restart any of them on the same data ([`Service::crash_during`] kills one
//! while [`Writes`] are in flight, and proves it). [`Cluster::start_tls`] runs the
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

mod crash;
pub mod postgres;

pub use crash::{Writes, is_transport};
pub use postgres::Postgres;
use tessera_client::{Client, Endpoints, Enrollment, Home, KdfParams};
use tessera_crypto::VerifyingKey;
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
        // What cargo sets for the running test (its manifest directory, its
        // package) must not reach the build: some build scripts watch these
        // variables (ring's watches CARGO_MANIFEST_DIR), so passing them on
        // would rebuild half the workspace here and again in the next
        // `cargo test`.
        for (name, _) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&name)
            {
                cmd.env_remove(name);
            }
        }
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
        self.child = Some(self.spawn());
        self.wait_healthy().await;
    }

    /// The process, its output appended to its log.
    fn spawn(&self) -> Child {
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
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name))
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

    /// A key service of its own (outside any [`Cluster`]), not started:
    /// its key in `dir` (made at first start), trusting the AppKey `app`
    /// and the token key `token`, keeping its directory in the PostgreSQL
    /// database `database_url` (`tessera-kms --database-url`).
    pub fn kms_on_database(
        dir: &Path,
        app: &VerifyingKey,
        token: &VerifyingKey,
        database_url: &str,
    ) -> Self {
        let env = [
            ("TESSERA_KMS_DATA_DIR", path_string(dir)),
            ("TESSERA_KMS_APP_PUBLIC_KEY", hex::encode(app.as_bytes())),
            (
                "TESSERA_KMS_TOKEN_PUBLIC_KEY",
                hex::encode(token.as_bytes()),
            ),
            ("TESSERA_KMS_DATABASE_URL", database_url.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        std::fs::create_dir_all(dir).unwrap();
        Self::new("tessera-kms", dir, vec![], env, None)
    }

    /// Starts the process expecting it to refuse to start: waits until it
    /// exits and returns its exit code and log. Panics if it becomes
    /// healthy or still runs after a minute.
    pub async fn start_refused(&mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        let mut child = self.spawn();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code(), std::fs::read_to_string(&self.log).unwrap());
            }
            let healthy = match self.channel().await {
                Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if healthy || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} started when it should have refused:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the service's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILLs the service while `writes` are in flight (once at least
    /// `at_least` were acknowledged), waits until every write then in flight
    /// has ended, fails the test unless one of them failed (the kill hit a
    /// write), and starts the service again on the same data.
    pub async fn crash_during(&mut self, writes: &Writes, at_least: u64) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        writes
            .kill_in_flight(at_least, || {
                let _ = child.kill();
            })
            .await;
        let _ = child.wait();
        self.start().await;
    }

    /// SIGSTOP: the process stops where it is, its sockets open; calls to
    /// it wait (the kernel still accepts connections and queues requests)
    /// until [`Service::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Service::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// Starts again on the same address and data.
    pub async fn restart(&mut self) {
        self.start().await;
    }

    /// Sets an environment variable of the service for its next start.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.insert(name.to_owned(), value.to_owned());
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The process's memory as Linux reports it (`/proc/<pid>/status`).
    pub fn memory(&self) -> Option<Memory> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        Some(Memory {
            rss_kib: kib("VmRSS:")?,
            peak_rss_kib: kib("VmHWM:")?,
        })
    }

    /// Resets the process's peak resident set size (`VmHWM`) to its current
    /// size, so [`Service::memory`] then shows the peak from now on.
    pub fn reset_peak_memory(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|c| std::fs::write(format!("/proc/{}/clear_refs", c.id()), "5").is_ok())
    }
}

/// Resident memory of a service process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak since start or the last reset.
    pub peak_rss_kib: u64,
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

/// Runs one of the binaries' commands that print JSON (`keys`, `init-org`)
/// and parses what it printed; panics when it fails.
pub fn run_json(bin: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
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

/// Runs `tessera-backup init-org` (with `--rotate` when `rotate`), as the
/// admin, against the app server at `server_url`; returns its JSON.
async fn init_org(
    backup_dir: PathBuf,
    server_url: String,
    admin_password: String,
    ca: Option<PathBuf>,
    rotate: bool,
) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        let backup_dir = path_string(&backup_dir);
        let mut args = vec![
            "init-org",
            "--data-dir",
            &backup_dir,
            "--server-url",
            &server_url,
            "--admin",
            ADMIN,
        ];
        if rotate {
            args.push("--rotate");
        }
        let ca = ca.as_deref().map(path_string);
        let mut env = vec![("TESSERA_BACKUP_ADMIN_PASSWORD", admin_password.as_str())];
        if let Some(ca) = &ca {
            env.push(("TESSERA_BACKUP_UPSTREAM_CA", ca));
        }
        run_json("tessera-backup", &args, &env)
    })
    .await
    .unwrap()
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
        Self::start_with(false, &[]).await
    }

    /// [`Cluster::start`] with every service served over TLS, the server
    /// and backup service reaching their upstreams over TLS, and clients
    /// trusting the certificate.
    pub async fn start_tls() -> Self {
        Self::start_with(true, &[]).await
    }

    /// [`Cluster::start`] with the app server keeping its data in the
    /// PostgreSQL database at `database_url` (e.g. a testkit
    /// [`Postgres`]'s `url("postgres")`).
    pub async fn start_server_on_database(database_url: &str) -> Self {
        Self::start_with(
            false,
            &[(
                "tessera-server",
                "TESSERA_SERVER_DATABASE_URL",
                database_url,
            )],
        )
        .await
    }

    /// [`Cluster::start`] with more environment variables for some services:
    /// (`binary`, variable, value), e.g. `("tessera-server",
    /// "TESSERA_SERVER_TOKEN_LIFETIME_SECS", "3")`.
    pub async fn start_with_env(extra: &[(&str, &str, &str)]) -> Self {
        Self::start_with(false, extra).await
    }

    async fn start_with(tls: bool, extra: &[(&str, &str, &str)]) -> Self {
        let with_extra = |mut service: Service| {
            for (binary, name, value) in extra {
                if *binary == service.name {
                    service.set_env(name, value);
                }
            }
            service
        };
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
        let mut kms = with_extra(Service::new(
            "tessera-kms",
            dir.path(),
            vec![],
            env(&[
                ("TESSERA_KMS_DATA_DIR", d("kms")),
                ("TESSERA_KMS_APP_PUBLIC_KEY", hex_key(&keys.app)),
                ("TESSERA_KMS_TOKEN_PUBLIC_KEY", hex_key(&keys.token)),
            ]),
            tls.as_ref(),
        ));
        kms.start().await;
        let ca = tls.as_ref().map(|t| path_string(&t.cert));
        let with_ca = |mut vars: BTreeMap<String, String>, var: &str| {
            if let Some(ca) = &ca {
                vars.insert(var.to_owned(), ca.clone());
            }
            vars
        };
        let mut server = with_extra(Service::new(
            "tessera-server",
            dir.path(),
            vec![],
            with_ca(
                env(&[
                    ("TESSERA_SERVER_DATA_DIR", d("server")),
                    ("TESSERA_SERVER_KMS_URL", kms.url()),
                    // Every scenario signs its users up from loopback.
                    ("TESSERA_SERVER_SIGNUPS_PER_PEER", "100000".into()),
                    ("TESSERA_SERVER_ORG_IDENTITY", ORG.into()),
                ]),
                "TESSERA_SERVER_KMS_CA",
            ),
            tls.as_ref(),
        ));
        // The operator makes the admin account, before the server runs.
        let admin_password = hex::encode(tessera_crypto::random_array::<12>().unwrap());
        // With the server's own extra variables (its database, if any).
        let mut admin_env = vec![("TESSERA_SERVER_ADMIN_PASSWORD", admin_password.as_str())];
        admin_env.extend(
            extra
                .iter()
                .filter(|(binary, _, _)| *binary == "tessera-server")
                .map(|(_, name, value)| (*name, *value)),
        );
        let created = run_json(
            "tessera-server",
            &["create-admin", "--data-dir", &d("server"), ADMIN],
            &admin_env,
        );
        assert_eq!(created["created"], true);
        server.start().await;

        let org = init_org(
            dir.path().join("backup"),
            server.url(),
            admin_password.clone(),
            tls.as_ref().map(|t| t.cert.clone()),
            false,
        )
        .await;
        assert_eq!(org["org_identity"], ORG);
        let mut backup = with_extra(Service::new(
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
        ));
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

    /// A device of `identity` that replaces all its others (a RESET of its
    /// device list, after a password log-in).
    pub async fn reset_device(&self, profile: &str, identity: &str) -> Client {
        self.enroll(profile, identity, false, true, self.endpoints())
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
        self.enroll(profile, identity, first, false, endpoints)
            .await
    }

    async fn enroll(
        &self,
        profile: &str,
        identity: &str,
        first: bool,
        reset: bool,
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
                reset,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("enrolling {profile} of {identity}: {e}"))
    }

    /// Profiles for `users` × `devices` (named `<user>-<n>`), in order;
    /// each user's first device approves the others.
    pub async fn users(&self, users: &[&str], devices: usize) -> BTreeMap<String, Vec<Client>> {
        let mut out = BTreeMap::new();
        for user in users {
            let mut clients: Vec<Client> = Vec::new();
            for n in 0..devices {
                let device = self.device(&format!("{user}-{n}"), user, n == 0).await;
                if let Some(first) = clients.first() {
                    approve(first, &device).await;
                }
                clients.push(device);
            }
            out.insert((*user).to_owned(), clients);
        }
        out
    }

    /// Another device of `approver`'s user, approved by `approver`.
    pub async fn approved_device(&self, profile: &str, approver: &Client) -> Client {
        let device = self.device(profile, approver.identity(), false).await;
        approve(approver, &device).await;
        device
    }

    /// The admin's device (to manage the organisation). The first admin
    /// profile of a cluster starts the admin's device list.
    pub async fn admin(&self) -> Client {
        self.device("admin", ADMIN, false).await
    }

    /// Reopens a profile (a fresh session: new token claims).
    pub fn reopen(&self, profile: &str) -> Client {
        Client::open(&self.home, profile, PASSPHRASE).unwrap()
    }

    /// Rotates the OrgKey as docs/operations.md says: `tessera-backup
    /// init-org --rotate`, then a restart of the backup service. Returns
    /// what init-org printed (`org_card_id`, ...).
    pub async fn rotate_org_key(&mut self) -> serde_json::Value {
        let created = init_org(
            self.data_dir("backup"),
            self.server.url(),
            self.admin_password.clone(),
            self.tls.as_ref().map(|t| t.cert.clone()),
            true,
        )
        .await;
        assert!(self.backup.stop().await, "backup service exit status");
        self.backup.start().await;
        created
    }

    /// The data directory of a service ("kms", "server", "backup").
    pub fn data_dir(&self, service: &str) -> PathBuf {
        self.dir.path().join(service)
    }
}

/// A `tessera` CLI process running in the background (`listen`, say): its
/// output lines arrive as they are printed.
pub struct CliProcess {
    child: Option<Child>,
    stdout: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl CliProcess {
    /// The next line it prints on stdout, within `timeout`.
    pub async fn line(&mut self, timeout: Duration) -> String {
        match tokio::time::timeout(timeout, self.stdout.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the CLI ended; stderr:\n{}", self.stderr()),
            Err(_) => panic!(
                "no line from the CLI within {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Waits until its stderr contains `text`.
    pub async fn wait_stderr(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} not printed within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (off the runtime) until it exits; returns its exit code, the
    /// rest of its stdout and all of its stderr.
    pub async fn finish(mut self) -> (Option<i32>, Vec<String>, String) {
        let mut child = self.child.take().unwrap();
        let readers = std::mem::take(&mut self.readers);
        let code = tokio::task::spawn_blocking(move || {
            let status = child.wait().unwrap();
            for reader in readers {
                let _ = reader.join();
            }
            status.code()
        })
        .await
        .unwrap();
        let mut rest = Vec::new();
        while let Ok(line) = self.stdout.try_recv() {
            rest.push(line);
        }
        (code, rest, self.stderr.lock().unwrap().clone())
    }

    /// Sends SIGINT (Ctrl-C) to it.
    pub fn interrupt(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// The `tessera` CLI as profile `profile` of this cluster's home,
    /// pointed at its services (fast KDF, the testkit passphrase).
    pub fn cli(&self, profile: &str) -> Command {
        let mut cmd = Command::new(bin_path("tessera"));
        let endpoints = self.endpoints();
        cmd.env("TESSERA_HOME", self.home.root())
            .env("TESSERA_PROFILE", profile)
            .env(
                "TESSERA_PASSPHRASE",
                std::str::from_utf8(PASSPHRASE).unwrap(),
            )
            .env("TESSERA_DANGER_FAST_KDF", "1")
            .env("TESSERA_SERVER_URL", &endpoints.server_url)
            .env("TESSERA_KMS_URL", &endpoints.kms_url)
            .env(
                "TESSERA_BACKUP_URL",
                endpoints.backup_url.unwrap_or_default(),
            )
            .stdin(Stdio::null());
        if let Some(ca) = endpoints.ca_cert {
            cmd.env("TESSERA_CA_CERT", ca);
        }
        cmd
    }

    /// Runs `tessera <args>` as `profile` to the end (off the runtime).
    pub async fn run_cli(&self, profile: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = self.cli(profile);
        cmd.args(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// Starts `tessera <args>` as `profile` in the background.
    pub fn spawn_cli(&self, profile: &str, args: &[&str]) -> CliProcess {
        use std::io::BufRead;
        let mut cmd = self.cli(profile);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let (tx, stdout) = tokio::sync::mpsc::unbounded_channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let collected = stderr.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            }),
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    if let Ok(mut s) = collected.lock() {
                        s.push_str(&line);
                        s.push('\n');
                    }
                }
            }),
        ];
        CliProcess {
            child: Some(child),
            stdout,
            stderr,
            readers,
        }
    }
}

/// Path of a workspace binary (`tessera`, `tessera-kms`, ...), built with the services.
pub fn bin_path(name: &str) -> PathBuf {
    bin_dir().join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

impl Cluster {
    /// A copy of the key service's data directory as it is now (the key
    /// service is stopped for the copy and started again), to run a second
    /// key service on with [`Cluster::kms_on`], after editing its database
    /// as a key service's operator could.
    pub async fn copy_kms_data(&mut self, name: &str) -> PathBuf {
        let from = self.data_dir("kms");
        let to = self.dir.path().join(name);
        assert!(self.kms.stop().await, "key service exit status");
        copy_dir(&from, &to);
        self.kms.restart().await;
        to
    }

    /// A key service with the real one's key on the data in `dir` (from
    /// [`Cluster::copy_kms_data`]).
    pub async fn kms_on(&self, dir: &Path) -> Service {
        let mut env = self.kms.env.clone();
        env.insert("TESSERA_KMS_DATA_DIR".into(), path_string(dir));
        env.retain(|k, _| !k.ends_with("_TLS_CERT") && !k.ends_with("_TLS_KEY"));
        let mut kms = Service::new("tessera-kms", dir, vec![], env, self.tls.as_ref());
        kms.start().await;
        kms
    }

    /// Another backup service of this cluster, not started: the same
    /// upstreams, keys and environment as [`Cluster::backup`], a copy of its
    /// OrgKey and OrgCard (and retired OrgKeys) in a data directory `name`
    /// of its own, and its archive in the PostgreSQL database
    /// `database_url` (`tessera-backup --database-url`). Give
    /// [`Cluster::backup`] the same database (`start_with_env`) and the two
    /// are replicas of one backup service.
    pub fn backup_on_database(&self, name: &str, database_url: &str) -> Service {
        let from = self.data_dir("backup");
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["org.key", "org.card"] {
            std::fs::copy(from.join(file), dir.join(file)).unwrap();
        }
        let retired = from.join("retired-org-keys");
        if retired.is_dir() {
            copy_dir(&retired, &dir.join("retired-org-keys"));
        }
        let mut env = self.backup.env.clone();
        env.insert("TESSERA_BACKUP_DATA_DIR".into(), path_string(&dir));
        env.insert(
            "TESSERA_BACKUP_DATABASE_URL".into(),
            database_url.to_owned(),
        );
        env.retain(|k, _| !k.ends_with("_TLS_CERT") && !k.ends_with("_TLS_KEY"));
        Service::new("tessera-backup", &dir, vec![], env, self.tls.as_ref())
    }

    /// Another replica of the app server, not started: the same
    /// environment as [`Cluster::server`] (its database, its data
    /// directory, so the same AppKey, token key and attachments directory,
    /// the same key service), its own address, metrics address and log
    /// (`<name>.log`). Only for an app server on PostgreSQL
    /// ([`Cluster::start_server_on_database`]): on sled the replica would
    /// find the database locked.
    pub fn server_replica(&self, name: &str) -> Service {
        assert!(
            self.server.env.contains_key("TESSERA_SERVER_DATABASE_URL"),
            "app-server replicas share a PostgreSQL database: start the cluster with start_server_on_database"
        );
        let mut replica = Service::new(
            "tessera-server",
            self.dir.path(),
            vec![],
            self.server.env.clone(),
            self.tls.as_ref(),
        );
        replica.log = self.dir.path().join(format!("{name}.log"));
        replica
    }

    /// This cluster's endpoints with the app server at `server` (a replica).
    pub fn endpoints_via(&self, server: &Service) -> Endpoints {
        Endpoints {
            server_url: server.url(),
            ..self.endpoints()
        }
    }

    /// A second key service holding this cluster's KMS key but its own,
    /// empty log: a directory that can sign checkpoints of another history.
    pub async fn forked_kms(&self) -> Service {
        let dir = self.dir.path().join("kms-fork");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.data_dir("kms").join("kms.key"), dir.join("kms.key")).unwrap();
        self.kms_on(&dir).await
    }

    /// A second key service started from a copy of this one's key and log
    /// (the key service is stopped for the copy and started again): from
    /// here on the two logs can grow apart, each consistent with the common
    /// past, as a directory showing users a split view would.
    pub async fn cloned_kms(&mut self) -> Service {
        let dir = self.copy_kms_data("kms-clone").await;
        self.kms_on(&dir).await
    }
}

/// `approver` approves `device` (another device of the same user).
pub async fn approve(approver: &Client, device: &Client) {
    approver
        .approve_device(&device.card_id())
        .await
        .unwrap_or_else(|e| panic!("approving {}: {e}", device.device_name()));
}
