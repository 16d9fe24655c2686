//! The `tessera-backup` binary: see `docs/operations.md`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tessera_backup::{Backup, Config, Limits, OrgSetup, store::PgOptions};
use tessera_crypto::keystore::KdfParams;
use tessera_service::{config::init_tracing, serve, service_args};
use zeroize::Zeroizing;

service_args!(
    /// Options every service has.
    CommonArgs,
    prefix = "TESSERA_BACKUP",
    listen = "127.0.0.1:7402",
    data_dir = "./tessera-data/backup"
);

/// Tessera's organisation backup service: the OrgEncMsg archive and history sync.
#[derive(Parser, Debug)]
#[command(name = "tessera-backup", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The app server.
    #[arg(
        long,
        global = true,
        env = "TESSERA_BACKUP_SERVER_URL",
        default_value = "http://127.0.0.1:7400"
    )]
    server_url: String,
    /// The key service.
    #[arg(
        long,
        global = true,
        env = "TESSERA_BACKUP_KMS_URL",
        default_value = "http://127.0.0.1:7401"
    )]
    kms_url: String,
    /// CA certificate (PEM) for https upstreams.
    #[arg(long, global = true, env = "TESSERA_BACKUP_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// The OrgKey file [default: <data-dir>/org.key].
    #[arg(long, global = true, env = "TESSERA_BACKUP_ORG_KEY_PATH")]
    org_key_path: Option<PathBuf>,
    /// The registered OrgCard [default: <data-dir>/org.card].
    #[arg(long, global = true, env = "TESSERA_BACKUP_ORG_CARD_PATH")]
    org_card_path: Option<PathBuf>,
    /// AppKey public key (64 hex digits), pinned.
    #[arg(long, global = true, env = "TESSERA_BACKUP_APP_PUBLIC_KEY")]
    app_public_key: Option<String>,
    /// Key-service public key (64 hex digits), pinned.
    #[arg(long, global = true, env = "TESSERA_BACKUP_KMS_PUBLIC_KEY")]
    kms_public_key: Option<String>,
    /// The app server's token public key (64 hex digits).
    #[arg(long, global = true, env = "TESSERA_BACKUP_TOKEN_PUBLIC_KEY")]
    token_public_key: Option<String>,
    /// Largest OrgEncMsg, in bytes.
    #[arg(long, global = true, env = "TESSERA_BACKUP_MAX_RECORD_BYTES", default_value_t = Limits::default().max_record_bytes)]
    max_record_bytes: usize,
    /// Most messages in one history sync.
    #[arg(long, global = true, env = "TESSERA_BACKUP_MAX_SYNC_LIMIT", default_value_t = Limits::default().max_sync_limit)]
    max_sync_limit: u32,
    /// Keep the archive in this PostgreSQL database (`postgresql://user:password@host:port/db`
    /// or `host=/run/postgresql dbname=tessera`) instead of sled in <data-dir>/db; several
    /// backup services may share one.
    #[arg(
        long,
        global = true,
        env = "TESSERA_BACKUP_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Pooled PostgreSQL connections.
    #[arg(
        long,
        global = true,
        env = "TESSERA_BACKUP_DATABASE_POOL_SIZE",
        default_value_t = 16
    )]
    database_pool_size: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Generate the OrgKey and register the OrgCard through the app server's admin API.
    /// The OrgKey is protected with TESSERA_BACKUP_ORG_KEY_PASSPHRASE when it is set.
    InitOrg {
        /// An admin of the app server.
        #[arg(long, env = "TESSERA_BACKUP_ADMIN")]
        admin: String,
        /// The admin's password.
        #[arg(long, env = "TESSERA_BACKUP_ADMIN_PASSWORD", hide_env_values = true)]
        admin_password: String,
        /// Replace the current OrgKey; the old one is kept to read the archive.
        #[arg(long)]
        rotate: bool,
    },
}

fn passphrase() -> Option<Zeroizing<String>> {
    std::env::var("TESSERA_BACKUP_ORG_KEY_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty())
        .map(Zeroizing::new)
}

async fn run(cli: Cli) -> Result<(), String> {
    let common = cli.common.common();
    init_tracing(common.log_format);
    if let Some(Command::InitOrg {
        admin,
        admin_password,
        rotate,
    }) = &cli.command
    {
        let pass = passphrase();
        let created = tessera_backup::init_org(OrgSetup {
            data_dir: &common.data_dir,
            org_key_path: cli.org_key_path.as_deref(),
            org_card_path: cli.org_card_path.as_deref(),
            passphrase: pass.as_ref().map(|p| p.as_bytes()),
            kdf: KdfParams::DEFAULT,
            server_url: &cli.server_url,
            upstream_ca: cli.upstream_ca.as_deref(),
            admin_identity: admin,
            admin_password,
            rotate: *rotate,
        })
        .await
        .map_err(|e| e.to_string())?;
        let json = serde_json::json!({
            "org_identity": created.org_identity,
            "org_card_id": created.card_id.to_string(),
            "org_key_path": created.key_path,
            "org_card_path": created.card_path,
        });
        tessera_service::config::print_json(&json);
        return Ok(());
    }
    let config = Config {
        data_dir: common.data_dir.clone(),
        org_key_path: cli.org_key_path,
        org_card_path: cli.org_card_path,
        org_key_passphrase: passphrase(),
        server_url: cli.server_url,
        kms_url: cli.kms_url,
        upstream_ca: cli.upstream_ca,
        app_public_key: tessera_service::config::public_key_flag(
            "app-public-key",
            cli.app_public_key.as_deref(),
        )?,
        kms_public_key: tessera_service::config::public_key_flag(
            "kms-public-key",
            cli.kms_public_key.as_deref(),
        )?,
        token_public_key: tessera_service::config::public_key_flag(
            "token-public-key",
            cli.token_public_key.as_deref(),
        )?,
        limits: Limits {
            max_record_bytes: cli.max_record_bytes,
            max_sync_limit: cli.max_sync_limit,
            ..Limits::default()
        },
    };
    common.start_metrics().map_err(|e| e.to_string())?;
    let storage = if cli.database_url.is_some() {
        "postgres"
    } else {
        "sled"
    };
    let backup = match cli.database_url {
        Some(url) => {
            let database = PgOptions {
                url,
                pool_size: cli.database_pool_size,
            };
            Backup::open_postgres(config, &database).await
        }
        None => Backup::open(config),
    }
    .map_err(|e| e.to_string())?;
    let routes = backup.routes().await.map_err(|e| e.to_string())?;
    let listener = serve::bind(common.listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, org = backup.org_identity(), storage, "tessera-backup listening");
    serve::serve(
        routes,
        listener,
        &common.serve_options(),
        serve::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!("tessera-backup stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tessera_service::config::exit("tessera-backup", run(Cli::parse()).await)
}
