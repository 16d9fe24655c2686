//! The `tessera-kms` binary: see `docs/operations.md`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tessera_kms::{Config, DEFAULT_MAX_REQUEST_BYTES, Kms, Limits, store::PgOptions};
use tessera_service::{config::init_tracing, serve, service_args};

service_args!(
    /// Options every service has.
    CommonArgs,
    prefix = "TESSERA_KMS",
    listen = "127.0.0.1:7401",
    data_dir = "./tessera-data/kms"
);

/// Tessera's key-management service: the card directory and its transparency log.
#[derive(Parser, Debug)]
#[command(name = "tessera-kms", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The service's signing key (generated with mode 0600 on first start) [default: <data-dir>/kms.key].
    #[arg(long, global = true, env = "TESSERA_KMS_KEY_PATH")]
    key_path: Option<PathBuf>,
    /// AppKey public key (64 hex digits): only cards it signed are accepted.
    #[arg(long, global = true, env = "TESSERA_KMS_APP_PUBLIC_KEY")]
    app_public_key: Option<String>,
    /// The app server's token public key (64 hex digits).
    #[arg(long, global = true, env = "TESSERA_KMS_TOKEN_PUBLIC_KEY")]
    token_public_key: Option<String>,
    /// Most identities in one search.
    #[arg(long, global = true, env = "TESSERA_KMS_MAX_IDENTITIES_PER_SEARCH", default_value_t = Limits::default().max_identities_per_search)]
    max_identities_per_search: usize,
    /// Largest page of log entries.
    #[arg(long, global = true, env = "TESSERA_KMS_MAX_PAGE_SIZE", default_value_t = Limits::default().max_page_size)]
    max_page_size: u32,
    /// Most active cards one identity may have.
    #[arg(long, global = true, env = "TESSERA_KMS_MAX_CARDS_PER_IDENTITY", default_value_t = Limits::default().max_active_cards_per_identity)]
    max_cards_per_identity: usize,
    /// Largest request, in bytes.
    #[arg(long, global = true, env = "TESSERA_KMS_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Keep the directory in this PostgreSQL database (`postgresql://user:password@host:port/db`
    /// or `host=/run/postgresql dbname=tessera`) instead of sled in <data-dir>/db.
    #[arg(
        long,
        global = true,
        env = "TESSERA_KMS_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Pooled PostgreSQL connections for reads (the writer has one more).
    #[arg(
        long,
        global = true,
        env = "TESSERA_KMS_DATABASE_POOL_SIZE",
        default_value_t = 16
    )]
    database_pool_size: usize,
    /// Run as a read-only replica of the writer that keeps --database-url:
    /// serve search, cards, proofs and entries as of its last checkpoint,
    /// refuse writes. Needs only the log's public key (--kms-public-key).
    #[arg(
        long,
        global = true,
        env = "TESSERA_KMS_READ_ONLY",
        requires = "database_url"
    )]
    read_only: bool,
    /// The log's public key (64 hex digits), for --read-only.
    #[arg(long, global = true, env = "TESSERA_KMS_PUBLIC_KEY")]
    kms_public_key: Option<String>,
    /// How often a read-only replica catches up with the writer, in milliseconds.
    #[arg(
        long,
        global = true,
        env = "TESSERA_KMS_REFRESH_MS",
        default_value_t = 1000
    )]
    refresh_ms: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Create the service key if missing and print its public key and log id as JSON.
    Keys,
}

async fn run(cli: Cli) -> Result<(), String> {
    let common = cli.common.common();
    init_tracing(common.log_format);
    if let Some(Command::Keys) = cli.command {
        let path = tessera_kms::key_path(&common.data_dir, cli.key_path.as_deref());
        let key = tessera_kms::load_or_create_key(&path).map_err(|e| e.to_string())?;
        let public = key.verifying_key();
        let json = serde_json::json!({
            "kms_public_key": hex::encode(public.as_bytes()),
            "log_id": tessera_card::transparency::log_id(&public),
            "key_path": path,
        });
        tessera_service::config::print_json(&json);
        return Ok(());
    }
    let config = Config {
        data_dir: common.data_dir.clone(),
        key_path: cli.key_path,
        app_public_key: tessera_service::config::public_key_flag(
            "app-public-key",
            cli.app_public_key.as_deref(),
        )?,
        token_public_key: tessera_service::config::public_key_flag(
            "token-public-key",
            cli.token_public_key.as_deref(),
        )?,
        limits: Limits {
            max_identities_per_search: cli.max_identities_per_search,
            max_page_size: cli.max_page_size,
            max_active_cards_per_identity: cli.max_cards_per_identity,
            ..Limits::default()
        },
        max_request_bytes: cli.max_request_bytes,
    };
    common.start_metrics().map_err(|e| e.to_string())?;
    let storage = match (&cli.database_url, cli.read_only) {
        (Some(_), true) => "postgres (read-only replica)",
        (Some(_), false) => "postgres",
        (None, _) => "sled",
    };
    let kms = match cli.database_url {
        Some(url) if cli.read_only => {
            let public = tessera_service::config::public_key_flag(
                "kms-public-key",
                cli.kms_public_key.as_deref(),
            )?;
            let database = PgOptions {
                url,
                pool_size: cli.database_pool_size,
            };
            Kms::open_read_only(
                &config,
                &database,
                public,
                std::time::Duration::from_millis(cli.refresh_ms.max(50)),
            )
            .await
        }
        Some(url) => {
            let database = PgOptions {
                url,
                pool_size: cli.database_pool_size,
            };
            Kms::open_postgres(&config, &database).await
        }
        None => Kms::open(&config).await,
    }
    .map_err(|e| e.to_string())?;
    let routes = kms.routes().await.map_err(|e| e.to_string())?;
    let listener = serve::bind(common.listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, data_dir = %common.data_dir.display(), storage, "tessera-kms listening");
    serve::serve(
        routes,
        listener,
        &common.serve_options(),
        serve::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!("tessera-kms stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tessera_service::config::exit("tessera-kms", run(Cli::parse()).await)
}
