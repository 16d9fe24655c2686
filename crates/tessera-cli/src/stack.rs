//! `tessera stack`: the whole service stack on loopback, until Ctrl-C / SIGTERM.

use tessera_stack::{Stack, StackConfig};

use crate::{cli::StackArgs, error::CliError};

pub(crate) async fn run(args: StackArgs) -> Result<(), CliError> {
    let config = StackConfig {
        data_dir: args.data_dir.clone(),
        host: args.host,
        server_port: args.server_port,
        kms_port: args.kms_port,
        backup_port: args.backup_port,
        org_identity: (!args.no_org).then_some(args.org_identity),
        ..StackConfig::new(&args.data_dir)
    };
    let stack = Stack::start(config)
        .await
        .map_err(|e| CliError::Failed(format!("stack: {e}")))?;
    let info = stack.info();
    println!(
        "Tessera stack running (data in {}):",
        info.data_dir.display()
    );
    println!("  app server      {}", info.server_url);
    println!("  key service     {}", info.kms_url);
    match &info.backup_url {
        Some(url) => println!(
            "  backup service  {url}  (organisation {})",
            info.org_identity.clone().unwrap_or_default()
        ),
        None => println!("  backup service  (none: no organisation)"),
    }
    println!("Pin these keys in clients (tessera signup --app-key ... --kms-key ...):");
    println!(
        "  AppKey       {}",
        hex::encode(info.app_public_key.as_bytes())
    );
    println!(
        "  key service  {}",
        hex::encode(info.kms_public_key.as_bytes())
    );
    println!(
        "Admin account: {} (password in {})",
        info.admin_identity,
        info.data_dir.join("admin-password").display()
    );
    println!("Try: TESSERA_PROFILE=alice tessera signup alice   (Ctrl-C stops the stack)");
    tessera_service::serve::shutdown_signal().await;
    println!("stopping...");
    stack.stop().await;
    Ok(())
}
