//! What the load tools share: a closed-loop load generator with latency
//! percentiles, and the echo baseline service.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "benchmark tools print their results"
)]

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tessera_proto::bench::v1::{EchoMessage, echo_server::Echo};
use tonic::{Request, Response, Status};

/// The result of one load run.
#[derive(Debug, Clone)]
pub struct Stats {
    pub concurrency: usize,
    pub ops: usize,
    pub errors: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    /// CPU time this process used during the run (every thread: the
    /// services and the load generator), when the platform tells.
    pub cpu: Option<Duration>,
}

impl Stats {
    pub fn qps(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU time of this process per successful call, in microseconds: on a
    /// shared machine this moves far less than the QPS, which depends on
    /// how much CPU the other tenants leave.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        self.cpu
            .filter(|_| self.ops > 0)
            .map(|c| c.as_secs_f64() * 1e6 / self.ops as f64)
    }

    /// A markdown table row: what, concurrency, QPS, p50, p99, CPU per call.
    pub fn row(&self, what: &str) -> String {
        format!(
            "| {what} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |{}",
            self.concurrency,
            self.qps(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.cpu_us_per_op()
                .map_or("—".to_owned(), |c| format!("{c:.0} µs")),
            if self.errors > 0 {
                format!(" {} errors", self.errors)
            } else {
                String::new()
            }
        )
    }
}

/// Percentile `p` (0..=100) of sorted latencies.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs `op(worker, sequence)` from `concurrency` workers, each starting the
/// next call when the last one returned, for `duration`.
pub async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let cpu_before = process_cpu_time();
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut errors = 0;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if op(worker, seq).await {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
                seq += 1;
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed();
    let cpu = process_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    all.sort_unstable();
    Stats {
        concurrency,
        ops: all.len(),
        errors,
        elapsed,
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
        cpu,
    }
}

/// Resident memory of this process, in MiB (Linux: `/proc/self/status`).
pub fn resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// User + system CPU time of this process so far (Linux: `/proc/self/stat`,
/// in clock ticks of 10 ms).
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 here.
    let total = ticks(11)? + ticks(12)?;
    const TICKS_PER_SECOND: u64 = 100;
    Some(Duration::from_millis(total * 1000 / TICKS_PER_SECOND))
}

/// The bare unary echo service.
#[derive(Debug, Default)]
pub struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        let mut message = request.into_inner();
        if message.answer_bytes > 0 {
            // Capped: a bench tool, but still no unbounded allocation on request.
            let n = message.answer_bytes.min(1 << 20) as usize;
            message.payload = vec![7; n];
            message.answer_bytes = 0;
        }
        Ok(Response::new(message))
    }
}

/// Where a load tool's service keeps its data (`--backends sled,postgres`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Sled,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sled => "sled",
            Self::Postgres => "postgres",
        }
    }
}

/// The PostgreSQL server the `postgres` backend uses: `given` (a URL
/// without a database, `postgresql://user@host:port`), else a throwaway
/// one (the testkit's: the distribution's binaries; `fsync` off, or on
/// with `fsync`), kept running as long as the returned handle lives.
/// `None` without the `postgres` backend. An error names a flag that does
/// not fit the others (`--pg-fsync` with `--database-url`, or without the
/// `postgres` backend).
pub fn database_server(
    backends: &[Backend],
    given: Option<&str>,
    fsync: bool,
) -> Result<(Option<String>, Option<tessera_testkit::Postgres>), String> {
    if !backends.contains(&Backend::Postgres) {
        if fsync {
            return Err("--pg-fsync is for the postgres backend: add --backends postgres".into());
        }
        return Ok((None, None));
    }
    if let Some(url) = given {
        if fsync {
            return Err(
                "--pg-fsync sets up the throwaway server; a server given by --database-url \
                 runs with its own settings (set fsync there)"
                    .into(),
            );
        }
        return Ok((Some(url.trim_end_matches('/').to_owned()), None));
    }
    let pg = if fsync {
        tessera_testkit::Postgres::start_durable()
    } else {
        tessera_testkit::Postgres::start()
    };
    Ok((Some(pg.url("").trim_end_matches('/').to_owned()), Some(pg)))
}

/// What `server` (a URL without a database) runs with, for the reports:
/// `fsync on, synchronous_commit on`.
pub async fn durability(server: &str) -> Result<String, tokio_postgres::Error> {
    let (admin, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = admin
        .query_one(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit')",
            &[],
        )
        .await?;
    Ok(format!(
        "fsync {}, synchronous_commit {}",
        row.get::<_, String>(0),
        row.get::<_, String>(1)
    ))
}

/// Drops and creates database `name` on `server` (a URL without a
/// database); returns the new database's URL.
pub async fn fresh_database(server: &str, name: &str) -> Result<String, tokio_postgres::Error> {
    let (admin, connection) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(format!("{server}/{name}"))
}

/// One line describing the machine, for the reports.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
