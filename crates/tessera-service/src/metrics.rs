//! Prometheus metrics, off unless a service runs with `--metrics-addr`.
//!
//! [`install`] installs the `metrics` recorder and serves the Prometheus
//! text format on its own listen address (plain HTTP, any path), apart from
//! the gRPC port. Every service's gRPC calls are counted and timed by one
//! tower layer ([`serve`](crate::serve) adds it); the services record their
//! own figures under the names below. `docs/operations.md` lists every
//! metric with its labels (a test checks that it does).
//!
//! Label values come from fixed sets only (gRPC method names read from the
//! services' descriptors, status code names, store operation names), so a
//! client cannot grow the number of series.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use thiserror::Error;

/// Counter: finished gRPC calls, by `service`, `method` and `code` (the
/// gRPC status name: `OK`, `INVALID_ARGUMENT`, …; `CANCELLED` when the
/// client went away first).
pub const RPC_REQUESTS: &str = "tessera_rpc_requests_total";
/// Histogram: seconds from a call's request to the end of its answer (for
/// a streaming answer, the whole stream), by `service` and `method`.
pub const RPC_DURATION: &str = "tessera_rpc_duration_seconds";
/// Histogram: seconds per storage operation, by `op` (`flush` in every
/// service; the others are named in `docs/operations.md`).
pub const STORE_OPERATION: &str = "tessera_store_operation_seconds";

/// Gauge (key service): entries in the published transparency log.
pub const KMS_LOG_ENTRIES: &str = "tessera_kms_log_entries";
/// Counter (key service): cards registered since the process started.
pub const KMS_CARDS_REGISTERED: &str = "tessera_kms_cards_registered_total";
/// Counter (key service): cards revoked since the process started.
pub const KMS_CARDS_REVOKED: &str = "tessera_kms_cards_revoked_total";

/// Gauge (app server): live `Subscribe` streams.
pub const SERVER_LIVE_SUBSCRIPTIONS: &str = "tessera_server_live_subscriptions";
/// Counter (app server): messages stored (acknowledged new sends, not
/// duplicates) since the process started.
pub const SERVER_MESSAGES_STORED: &str = "tessera_server_messages_stored_total";
/// Counter (app server): sender-key copies stored (`PutSenderKeys`, one
/// per recipient device; a replaced copy counts again) since the process
/// started.
pub const SERVER_SENDER_KEYS_STORED: &str = "tessera_server_sender_keys_stored_total";
/// Counter (app server): flushes of the store to disk.
pub const SERVER_STORE_FLUSHES: &str = "tessera_server_store_flushes_total";
/// Histogram (app server): acknowledged writes made durable by one flush
/// (group commit: concurrent sends share a flush).
pub const SERVER_FLUSH_BATCH: &str = "tessera_server_store_flush_batch_size";
/// Histogram (app server): sends to one channel stored together by one
/// store call (one transaction on PostgreSQL, one flush on sled: group
/// commit; at most `--max-send-batch`).
pub const SERVER_SEND_BATCH: &str = "tessera_server_send_batch_size";
/// Counter (app server on PostgreSQL): reconnections of the connection
/// that listens for the other replicas' messages.
pub const SERVER_LISTEN_RECONNECTS: &str = "tessera_server_listen_reconnects_total";

/// Counter (backup service): backups submitted, by `result`: `archived`
/// (new), `duplicate` (the same record again), `conflict` (refused: another
/// record is archived for that message).
pub const BACKUP_SUBMISSIONS: &str = "tessera_backup_submissions_total";
/// Counter (backup service): history syncs started.
pub const BACKUP_SYNCS: &str = "tessera_backup_syncs_total";
/// Counter (backup service): messages re-encrypted and sent by history syncs.
pub const BACKUP_SYNCED_MESSAGES: &str = "tessera_backup_synced_messages_total";

/// Every metric name above, for the documentation check.
pub const ALL: &[&str] = &[
    RPC_REQUESTS,
    RPC_DURATION,
    STORE_OPERATION,
    KMS_LOG_ENTRIES,
    KMS_CARDS_REGISTERED,
    KMS_CARDS_REVOKED,
    SERVER_LIVE_SUBSCRIPTIONS,
    SERVER_MESSAGES_STORED,
    SERVER_SENDER_KEYS_STORED,
    SERVER_STORE_FLUSHES,
    SERVER_FLUSH_BATCH,
    SERVER_SEND_BATCH,
    SERVER_LISTEN_RECONNECTS,
    BACKUP_SUBMISSIONS,
    BACKUP_SYNCS,
    BACKUP_SYNCED_MESSAGES,
];

/// Upper bounds (seconds) of the latency histograms' buckets: 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the flush batch histogram's buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Why metrics could not be served.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: BuildError,
    },
}

/// Whether this process records metrics (a recorder was installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the recorder and serves the metrics on `addr`. Must run inside
/// a tokio runtime; a process has one recorder, so only the first call can
/// succeed.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    let error = |source| MetricsError::Serve { addr, source };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(SERVER_FLUSH_BATCH.into()), BATCH_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(SERVER_SEND_BATCH.into()), BATCH_BUCKETS)
        })
        .map_err(error)?
        .install()
        .map_err(error)?;
    describe();
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        RPC_REQUESTS,
        "Finished gRPC calls by service, method and status code"
    );
    describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "Duration of gRPC calls (whole stream for streaming answers)"
    );
    describe_histogram!(
        STORE_OPERATION,
        Unit::Seconds,
        "Duration of storage operations by operation"
    );
    describe_gauge!(KMS_LOG_ENTRIES, "Entries in the published transparency log");
    describe_counter!(KMS_CARDS_REGISTERED, "Cards registered since start");
    describe_counter!(KMS_CARDS_REVOKED, "Cards revoked since start");
    describe_gauge!(SERVER_LIVE_SUBSCRIPTIONS, "Live Subscribe streams");
    describe_counter!(SERVER_MESSAGES_STORED, "Messages stored since start");
    describe_counter!(
        SERVER_SENDER_KEYS_STORED,
        "Sender-key copies stored since start"
    );
    describe_counter!(SERVER_STORE_FLUSHES, "Flushes of the store to disk");
    describe_histogram!(
        SERVER_FLUSH_BATCH,
        "Acknowledged writes made durable by one flush"
    );
    describe_histogram!(
        SERVER_SEND_BATCH,
        "Sends to one channel stored together by one store call"
    );
    describe_counter!(BACKUP_SUBMISSIONS, "Backups submitted by result");
    describe_counter!(BACKUP_SYNCS, "History syncs started");
    describe_counter!(BACKUP_SYNCED_MESSAGES, "Messages sent by history syncs");
}

/// Adds one to the counter `name`.
pub fn increment(name: &'static str) {
    if enabled() {
        metrics::counter!(name).increment(1);
    }
}

/// Adds `n` to the counter `name`.
pub fn increment_by(name: &'static str, n: u64) {
    if enabled() {
        metrics::counter!(name).increment(n);
    }
}

/// Adds one to the counter `name` with the label `key` = `value`.
pub fn increment_labelled(name: &'static str, key: &'static str, value: &'static str) {
    if enabled() {
        metrics::counter!(name, key => value).increment(1);
    }
}

/// Sets the gauge `name`.
pub fn set_gauge(name: &'static str, value: f64) {
    if enabled() {
        metrics::gauge!(name).set(value);
    }
}

/// Records `value` in the histogram `name`.
pub fn record(name: &'static str, value: f64) {
    if enabled() {
        metrics::histogram!(name).record(value);
    }
}

/// Holds one unit of the gauge `name` while it lives (a live subscription).
#[derive(Debug)]
pub struct GaugeGuard {
    name: &'static str,
    counted: bool,
}

impl GaugeGuard {
    pub fn new(name: &'static str) -> Self {
        let counted = enabled();
        if counted {
            metrics::gauge!(name).increment(1.0);
        }
        Self { name, counted }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        if self.counted {
            metrics::gauge!(self.name).decrement(1.0);
        }
    }
}

/// Times one storage operation into [`STORE_OPERATION`] under `op`.
pub fn time_store<T>(op: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let started = Instant::now();
    let out = f();
    record_store(op, started);
    out
}

/// Records a storage operation `op` that started at `started`.
pub fn record_store(op: &'static str, started: Instant) {
    if enabled() {
        metrics::histogram!(STORE_OPERATION, "op" => op).record(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/operations.md` names every metric.
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../../docs/operations.md");
        for name in ALL {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/operations.md does not list {name}"
            );
        }
    }
}
