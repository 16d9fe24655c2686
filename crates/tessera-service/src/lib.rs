//! Plumbing shared by `tessera-kms`, `tessera-server` and `tessera-backup`,
//! so none of them repeats it: access tokens ([`token`]), the caller behind a
//! request ([`Caller`]), request limits ([`limits`]), serving with health,
//! reflection, TLS and graceful shutdown ([`serve`]), Prometheus metrics
//! ([`metrics`]), tracing set-up and the common command-line options
//! ([`config`]), and small time helpers.
//!
//! The services never link each other: this crate knows none of them.

pub mod config;
pub mod limits;
pub mod metrics;
mod rpc_metrics;
pub mod serve;
mod status_rewrite;
pub mod storage;
pub mod token;

pub use token::{Caller, TokenIssuer, TokenVerifier};

/// Unix seconds now.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
