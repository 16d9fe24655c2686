//! Configuration shared by the service binaries: log set-up, and the options
//! every service takes (listen address, data directory, log format, TLS).
//!
//! Each binary declares its options with [`service_args!`], which gives every
//! option a flag and an environment variable under the service's prefix
//! (`TESSERA_KMS_LISTEN`, `TESSERA_SERVER_DATA_DIR`, ...).

use std::path::PathBuf;

pub use clap;

use crate::serve::{ServeOptions, TlsFiles};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sets up tracing to stderr. The level comes from `RUST_LOG` when set,
/// else `info`. Logs never carry keys, tokens, passwords or plaintext: the
/// types holding them cannot be formatted.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second initialisation (tests running several services) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The options every service has, once parsed.
#[derive(Debug, Clone)]
pub struct Common {
    pub listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub tls: Option<TlsFiles>,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Common {
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            tls: self.tls.clone(),
            ..ServeOptions::default()
        }
    }

    /// Starts serving Prometheus metrics when `--metrics-addr` was given
    /// (before the service opens its store, so what it records while
    /// opening is kept).
    pub fn start_metrics(&self) -> Result<(), crate::metrics::MetricsError> {
        match self.metrics_addr {
            Some(addr) => crate::metrics::install(addr),
            None => Ok(()),
        }
    }
}

/// Declares a clap `Args` struct with the common service options, each with
/// a flag and an environment variable `<PREFIX>_<NAME>`.
#[macro_export]
macro_rules! service_args {
    ($(#[$meta:meta])* $name:ident, prefix = $prefix:literal, listen = $listen:literal, data_dir = $data:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, $crate::config::clap::Args)]
        pub struct $name {
            /// Address to listen on.
            #[arg(long, global = true, env = concat!($prefix, "_LISTEN"), default_value = $listen)]
            pub listen: std::net::SocketAddr,
            /// Directory of the service's database and keys (created if missing).
            #[arg(long, global = true, env = concat!($prefix, "_DATA_DIR"), default_value = $data)]
            pub data_dir: std::path::PathBuf,
            /// Log format.
            #[arg(long, global = true, env = concat!($prefix, "_LOG_FORMAT"), value_enum, default_value = "text")]
            pub log_format: $crate::config::LogFormat,
            /// PEM certificate chain: serve over TLS (with --tls-key).
            #[arg(long, global = true, env = concat!($prefix, "_TLS_CERT"), requires = "tls_key")]
            pub tls_cert: Option<std::path::PathBuf>,
            /// PEM private key for --tls-cert.
            #[arg(long, global = true, env = concat!($prefix, "_TLS_KEY"), requires = "tls_cert")]
            pub tls_key: Option<std::path::PathBuf>,
            /// Serve Prometheus metrics (plain HTTP) on this address [default: off].
            #[arg(long, global = true, env = concat!($prefix, "_METRICS_ADDR"))]
            pub metrics_addr: Option<std::net::SocketAddr>,
        }

        impl $name {
            pub fn common(&self) -> $crate::config::Common {
                $crate::config::Common {
                    listen: self.listen,
                    data_dir: self.data_dir.clone(),
                    log_format: self.log_format,
                    tls: match (&self.tls_cert, &self.tls_key) {
                        (Some(cert), Some(key)) => Some($crate::serve::TlsFiles {
                            cert: cert.clone(),
                            key: key.clone(),
                        }),
                        _ => None,
                    },
                    metrics_addr: self.metrics_addr,
                }
            }
        }
    };
}

/// Parses a required public-key flag (64 hex digits) of a service binary.
pub fn public_key_flag(
    flag: &str,
    value: Option<&str>,
) -> Result<tessera_crypto::VerifyingKey, String> {
    let value = value.ok_or_else(|| format!("--{flag} is required to serve"))?;
    let bytes = hex::decode(value.trim()).map_err(|_| format!("--{flag}: not hex"))?;
    tessera_crypto::VerifyingKey::from_bytes(&bytes).map_err(|e| format!("--{flag}: {e}"))
}

/// Prints a JSON result of a service binary's command on stdout.
pub fn print_json(value: &impl std::fmt::Display) {
    #[allow(clippy::print_stdout, reason = "the command's output")]
    {
        println!("{value}");
    }
}

/// The exit of a service binary: errors are printed for the operator.
pub fn exit(binary: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr, reason = "the error for the operator")]
            {
                eprintln!("{binary}: {e}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
