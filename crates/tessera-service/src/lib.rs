//! Plumbing shared by `tessera-kms`, `tessera-server` and `tessera-backup`,
//! so none of them repeats it: access tokens ([`token`]), the caller behind a
//! request ([`Caller`]), request limits ([`limits`]), serving with health,
//! reflection, TLS and graceful shutdown ([`serve`]), Prometheus metrics
//! ([`metrics`]), what the PostgreSQL stores share ([`postgres`]), tracing
//! set-up and the common command-line options ([`config`]), and small time
//! helpers.
//!
//! The services never link each other: this crate knows none of them.

pub mod config;
pub mod limits;
pub mod metrics;
pub mod postgres;
mod rpc_metrics;
pub mod serve;
mod status_rewrite;
pub mod storage;
pub mod token;

pub use token::{Caller, TokenIssuer, TokenVerifier};

/// Test only: seconds added to this process's clock, to run services whose
/// clocks disagree (the clock-skew scenario). Never set it in production.
pub const CLOCK_OFFSET_VAR: &str = "TESSERA_DANGER_CLOCK_OFFSET_SECS";

/// The offset of [`CLOCK_OFFSET_VAR`] in milliseconds, read once.
fn clock_offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        let secs = std::env::var(CLOCK_OFFSET_VAR)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if secs != 0 {
            tracing::warn!(
                offset_secs = secs,
                "{CLOCK_OFFSET_VAR} is set: this process's clock is shifted (tests only)"
            );
        }
        secs.saturating_mul(1000)
    })
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Unix milliseconds now (shifted by [`CLOCK_OFFSET_VAR`] when it is set).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        .saturating_add(clock_offset_ms())
}
