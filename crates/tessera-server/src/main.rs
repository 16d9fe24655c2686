//! The `tessera-server` binary: see `docs/operations.md`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tessera_server::{Config, Limits, Server, store::PgOptions};
use tessera_service::{config::init_tracing, serve, service_args};

service_args!(
    /// Options every service has.
    CommonArgs,
    prefix = "TESSERA_SERVER",
    listen = "127.0.0.1:7400",
    data_dir = "./tessera-data/server"
);

/// Tessera's app server: accounts, AppKey enrollment, channels and the encrypted transport.
#[derive(Parser)]
#[command(name = "tessera-server", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The key service.
    #[arg(
        long,
        global = true,
        env = "TESSERA_SERVER_KMS_URL",
        default_value = "http://127.0.0.1:7401"
    )]
    kms_url: String,
    /// CA certificate (PEM) to trust when the key service URL is https.
    #[arg(long, global = true, env = "TESSERA_SERVER_KMS_CA")]
    kms_ca: Option<PathBuf>,
    /// The AppKey (generated with mode 0600 on first start) [default: <data-dir>/app.key].
    #[arg(long, global = true, env = "TESSERA_SERVER_APP_KEY_PATH")]
    app_key_path: Option<PathBuf>,
    /// The token signing key (generated on first start) [default: <data-dir>/token.key].
    #[arg(long, global = true, env = "TESSERA_SERVER_TOKEN_KEY_PATH")]
    token_key_path: Option<PathBuf>,
    /// No longer accepted: admins are made with `create-admin`.
    #[arg(long = "admin", global = true, hide = true)]
    admins: Vec<String>,
    /// Identity of the organisation's card; enables org backup.
    #[arg(long, global = true, env = "TESSERA_SERVER_ORG_IDENTITY")]
    org_identity: Option<String>,
    /// Lifetime of access tokens, in seconds.
    #[arg(
        long,
        global = true,
        env = "TESSERA_SERVER_TOKEN_LIFETIME_SECS",
        default_value_t = 900
    )]
    token_lifetime_secs: u64,
    /// Most members per channel.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_MEMBERS_PER_CHANNEL", default_value_t = Limits::default().max_members_per_channel)]
    max_members_per_channel: usize,
    /// Most channels per user.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_CHANNELS_PER_USER", default_value_t = Limits::default().max_channels_per_user)]
    max_channels_per_user: usize,
    /// Largest message envelope, in bytes.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_ENVELOPE_BYTES", default_value_t = Limits::default().max_envelope_bytes)]
    max_envelope_bytes: usize,
    /// Largest page of messages.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_PAGE_SIZE", default_value_t = Limits::default().max_page_size)]
    max_page_size: u32,
    /// Most active devices per user.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_DEVICES_PER_USER", default_value_t = Limits::default().max_devices_per_user)]
    max_devices_per_user: usize,
    /// Most bytes of stored messages in one ListMessages page.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_PAGE_BYTES", default_value_t = Limits::default().max_page_bytes)]
    max_page_bytes: usize,
    /// Open subscriptions per user.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_SUBSCRIPTIONS_PER_USER", default_value_t = Limits::default().max_subscriptions_per_user)]
    max_subscriptions_per_user: usize,
    /// Open subscriptions in all.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_SUBSCRIPTIONS", default_value_t = Limits::default().max_subscriptions)]
    max_subscriptions: usize,
    /// Quota of stored message bytes per user.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_MESSAGE_BYTES_PER_USER", default_value_t = Limits::default().max_message_bytes_per_user)]
    max_message_bytes_per_user: u64,
    /// Quota of attachment bytes per user.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_ATTACHMENT_BYTES_PER_USER", default_value_t = Limits::default().max_attachment_bytes_per_user)]
    max_attachment_bytes_per_user: u64,
    /// Quota of attachments per user.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_ATTACHMENTS_PER_USER", default_value_t = Limits::default().max_attachments_per_user)]
    max_attachments_per_user: usize,
    /// Most sends to one channel stored together (one transaction on
    /// PostgreSQL, one flush on sled); 1 stores each send alone.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_SEND_BATCH", default_value_t = Limits::default().max_send_batch)]
    max_send_batch: usize,
    /// Sign-ups allowed per peer address (IPv6: per /64) and throttle window.
    #[arg(long, global = true, env = "TESSERA_SERVER_SIGNUPS_PER_PEER", default_value_t = tessera_server::ThrottleLimits::default().signups_per_peer)]
    signups_per_peer: usize,
    /// Password hashes (Argon2id) run at once [default: one per core]; four
    /// times as many may wait, more are answered RESOURCE_EXHAUSTED.
    #[arg(long, global = true, env = "TESSERA_SERVER_CONCURRENT_HASHES")]
    concurrent_hashes: Option<usize>,
    /// Largest attachment, in bytes.
    #[arg(long, global = true, env = "TESSERA_SERVER_MAX_ATTACHMENT_BYTES", default_value_t = Limits::default().max_attachment_bytes)]
    max_attachment_bytes: u64,
    /// Keep the app server's data in PostgreSQL instead of sled (a libpq
    /// URL or key/value string; it may hold a password and is never
    /// logged). Attachments stay files under `<data-dir>/attachments`.
    #[arg(
        long,
        global = true,
        env = "TESSERA_SERVER_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Pooled PostgreSQL connections.
    #[arg(
        long,
        global = true,
        env = "TESSERA_SERVER_DATABASE_POOL_SIZE",
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
    /// Create the AppKey and token key if missing and print their public keys as JSON.
    Keys,
    /// Create an admin account (password from TESSERA_SERVER_ADMIN_PASSWORD,
    /// or the first line of standard input); run it while the server is
    /// stopped. The only way to an admin: sign-ups never are, whatever the name.
    CreateAdmin {
        /// The admin's identity.
        identity: String,
    },
}

/// The admin password: from the environment, else the first line of stdin.
fn admin_password() -> Result<zeroize::Zeroizing<String>, String> {
    if let Ok(p) = std::env::var("TESSERA_SERVER_ADMIN_PASSWORD") {
        return Ok(zeroize::Zeroizing::new(p));
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("reading the admin password from standard input: {e}"))?;
    Ok(zeroize::Zeroizing::new(
        line.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

async fn run(cli: Cli) -> Result<(), String> {
    let common = cli.common.common();
    init_tracing(common.log_format);
    if let Some(Command::Keys) = cli.command {
        let (app_path, token_path) = tessera_server::key_paths(
            &common.data_dir,
            cli.app_key_path.as_deref(),
            cli.token_key_path.as_deref(),
        );
        let (app, token) = tessera_server::load_or_create_keys(&app_path, &token_path)
            .map_err(|e| e.to_string())?;
        let json = serde_json::json!({
            "app_public_key": hex::encode(app.verifying_key().as_bytes()),
            "token_public_key": hex::encode(token.verifying_key().as_bytes()),
        });
        tessera_service::config::print_json(&json);
        return Ok(());
    }
    if !cli.admins.is_empty() || std::env::var_os("TESSERA_SERVER_ADMINS").is_some() {
        return Err(
            "--admin / TESSERA_SERVER_ADMINS are no longer read (whoever signed up first under such a name became admin): create admin accounts with `tessera-server create-admin <identity>`".into(),
        );
    }
    let mut config = Config::new(common.data_dir.clone(), cli.kms_url);
    config.kms_ca = cli.kms_ca;
    config.app_key_path = cli.app_key_path;
    config.token_key_path = cli.token_key_path;
    config.org_identity = cli.org_identity.filter(|o| !o.is_empty());
    config.token_lifetime = Duration::from_secs(cli.token_lifetime_secs);
    config.limits = Limits {
        max_members_per_channel: cli.max_members_per_channel,
        max_channels_per_user: cli.max_channels_per_user,
        max_envelope_bytes: cli.max_envelope_bytes,
        max_page_size: cli.max_page_size,
        max_devices_per_user: cli.max_devices_per_user,
        max_attachment_bytes: cli.max_attachment_bytes,
        max_page_bytes: cli.max_page_bytes,
        max_subscriptions_per_user: cli.max_subscriptions_per_user,
        max_subscriptions: cli.max_subscriptions,
        max_message_bytes_per_user: cli.max_message_bytes_per_user,
        max_attachment_bytes_per_user: cli.max_attachment_bytes_per_user,
        max_attachments_per_user: cli.max_attachments_per_user,
        max_send_batch: cli.max_send_batch.max(1),
        ..Limits::default()
    };
    config.throttle.signups_per_peer = cli.signups_per_peer;
    if let Some(n) = cli.concurrent_hashes {
        config.hash_limits = tessera_server::HashLimits {
            concurrent: n.max(1),
            queued: 4 * n.max(1),
        };
    }
    common.start_metrics().map_err(|e| e.to_string())?;
    let storage = if cli.database_url.is_some() {
        "postgres"
    } else {
        "sled"
    };
    let server = match cli.database_url {
        Some(url) => {
            let database = PgOptions {
                url,
                pool_size: cli.database_pool_size,
            };
            Server::open_postgres(config, &database).await
        }
        None => Server::open(config),
    }
    .map_err(|e| e.to_string())?;
    if let Some(Command::CreateAdmin { identity }) = &cli.command {
        let password = admin_password()?;
        let created = server
            .create_admin(identity, &password)
            .await
            .map_err(|e| e.to_string())?;
        tessera_service::config::print_json(
            &serde_json::json!({ "identity": identity, "created": created }),
        );
        return Ok(());
    }
    let routes = server.routes().await.map_err(|e| e.to_string())?;
    let listener = serve::bind(common.listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, data_dir = %common.data_dir.display(), storage, "tessera-server listening");
    let server = std::sync::Arc::new(server);
    let stopper = server.clone();
    serve::serve(routes, listener, &common.serve_options(), async move {
        serve::shutdown_signal().await;
        stopper.begin_shutdown();
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!("tessera-server stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tessera_service::config::exit("tessera-server", run(Cli::parse()).await)
}
