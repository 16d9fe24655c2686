//! A throwaway PostgreSQL server for tests: `initdb` and `postgres` from the
//! distribution's binaries, in a temporary directory, listening on a free
//! loopback port (and a Unix socket in that directory), with `trust`
//! authentication for the superuser `postgres`. It is stopped and its
//! directory removed when the [`Postgres`] is dropped, also when a test
//! panics, and it is killed if the test process itself dies.
//!
//! The binaries: `TESSERA_PG_BINDIR` when set, else the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu: `pg_config
//! --bindir` there names the client tools' directory, not the server's),
//! else `pg_config --bindir`, else `$PATH`. `.ci/run` installs the
//! distribution's `postgresql` package when none is found.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI does),
//! both programs run as an unprivileged user instead: `TESSERA_PG_USER`, or
//! the `postgres` system user the distribution's package creates. The
//! temporary directory is handed to that user, and the programs start
//! through util-linux's `setpriv`, which switches the user and sets the
//! parent-death signal in one exec (so the child is the server itself,
//! and dies with the test).
//!
//! `fsync` is off (a test database need not survive a power cut; a server
//! that is killed still keeps every commit it acknowledged), unless it is
//! started with [`Postgres::start_durable`] (benchmarks that want the cost
//! of durable commits). `synchronous_commit` keeps PostgreSQL's default,
//! `on`, either way: a COMMIT is answered once its WAL is written (and,
//! with fsync on, flushed).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Superuser of the throwaway cluster.
pub const SUPERUSER: &str = "postgres";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A PostgreSQL server of its own for one test.
pub struct Postgres {
    dir: Option<tempfile::TempDir>,
    bindir: PathBuf,
    /// Set when running as root: the user the server runs as.
    run_as: Option<RunAs>,
    port: u16,
    child: Option<Child>,
    /// `fsync=on` (else off).
    fsync: bool,
}

#[derive(Debug, Clone)]
struct RunAs {
    user: String,
    uid: u32,
    gid: u32,
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The directory holding `initdb` and `postgres`.
fn find_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    // Debian and Ubuntu: /usr/lib/postgresql/<major>/bin, newest first.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    if let Some(dir) = command_output("pg_config", &["--bindir"]).map(PathBuf::from)
        && has_server(&dir)
    {
        return dir;
    }
    if let Some(dir) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_server(dir))
    {
        return dir;
    }
    panic!(
        "no PostgreSQL server binaries (initdb, postgres) found in /usr/lib/postgresql/*/bin, \
         pg_config --bindir or $PATH: install the distribution's postgresql package \
         (.ci/run does) or set TESSERA_PG_BINDIR"
    );
}

/// The unprivileged user to run as, when this process is root.
fn run_as() -> Option<RunAs> {
    if command_output("id", &["-u"]).as_deref() != Some("0") {
        return None;
    }
    let user = std::env::var("TESSERA_PG_USER").unwrap_or_else(|_| "postgres".into());
    let id = |flag: &str| {
        command_output("id", &[flag, &user])
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "running as root, PostgreSQL must run as another user, but there is no \
                     user {user:?} (the distribution's postgresql package creates `postgres`; \
                     or set TESSERA_PG_USER)"
                )
            })
    };
    Some(RunAs {
        uid: id("-u"),
        gid: id("-g"),
        user,
    })
}

impl Postgres {
    /// Creates a cluster in a new temporary directory and starts it on a
    /// free port, with `fsync=off`; returns once it accepts connections.
    pub fn start() -> Self {
        Self::start_with_fsync(false)
    }

    /// [`Postgres::start`] with `fsync=on`: every commit waits for its WAL
    /// to reach the disk, as on a production server (for benchmarks; the
    /// tests need not pay for it).
    pub fn start_durable() -> Self {
        Self::start_with_fsync(true)
    }

    fn start_with_fsync(fsync: bool) -> Self {
        let bindir = find_bindir();
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg-")
            .tempdir()
            .expect("a temporary directory");
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap_or_else(
                |e| panic!("handing {} to {}: {e}", dir.path().display(), user.user),
            );
        }
        let mut pg = Self {
            dir: Some(dir),
            bindir,
            run_as,
            port: 0,
            child: None,
            fsync,
        };
        let data = pg.data_dir();
        let log = pg.dir().join("initdb.log");
        let status = pg
            .command("initdb")
            .arg("--pgdata")
            .arg(&data)
            .args(["--username", SUPERUSER, "--auth=trust", "--no-locale"])
            .args(["--encoding=UTF8", "--no-sync"])
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .status()
            .unwrap_or_else(|e| panic!("cannot run initdb from {}: {e}", pg.bindir.display()));
        assert!(
            status.success(),
            "initdb failed ({status}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        pg.port = crate::free_port();
        pg.spawn();
        pg
    }

    /// The temporary directory (cluster in `data/`, Unix socket, logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server runs with `fsync=on` ([`Postgres::start_durable`]).
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    /// `postgresql://postgres@127.0.0.1:<port>/<database>` (no password:
    /// the cluster trusts local connections).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server (fast shutdown: sessions are ended) and starts it
    /// again on the same data and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the stopped server again on the same data and port; returns
    /// once it accepts connections. Does nothing if it is running.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// A server program of the cluster, run as the cluster's user.
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={}", user.uid))
                    .arg(format!("--regid={}", user.gid))
                    .args(["--clear-groups", "--pdeathsig", "KILL", "--"])
                    .arg(path)
                    // The user's own home, not root's.
                    .env("HOME", self.dir());
                cmd
            }
            None => Command::new(path),
        }
    }

    fn spawn(&mut self) {
        let log = self.dir().join("postgres.log");
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir())
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(if self.fsync { "fsync=on" } else { "fsync=off" })
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        if self.run_as.is_none() {
            crate::die_with_parent(&mut cmd);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("postgres exited ({status}) while starting:\n{}", self.log());
            }
            let ready = Command::new(self.bindir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", SUPERUSER, "-p"])
                .arg(self.port.to_string())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready after {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: sessions are ended; SIGKILL if that
    /// takes too long) and returns once it has exited. Nothing listens on
    /// its port until [`Postgres::start_again`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        // The TempDir removes the cluster.
        self.dir.take();
    }
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
