//! The `tessera` command-line client. Run `tessera --help`; the README has a
//! five-minute tour and `docs/cli.md` every command.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool prints"
)]

mod cli;
mod commands;
mod demo;
mod error;
mod stack;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use commands::Ctx;
use error::CliError;
use tessera_client::Home;

fn home(explicit: Option<std::path::PathBuf>) -> Home {
    Home::new(explicit.unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_default()
            .join(".tessera")
    }))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let ctx = Ctx {
        home: home(cli.home),
        profile: cli.profile,
        json: cli.json,
    };
    match cli.command {
        Command::Signup(j) => ctx.join(j, true).await,
        Command::Login(j) => ctx.join(j, false).await,
        Command::Whoami => ctx.whoami().await,
        Command::Profiles => {
            ctx.profiles();
            Ok(())
        }
        Command::Devices => ctx.devices().await,
        Command::Device(cmd) => ctx.device(cmd).await,
        Command::Whois { identity } => ctx.whois(&identity).await,
        Command::Verify { identity, confirm } => ctx.verify(&identity, confirm).await,
        Command::Channel(cmd) => ctx.channel(cmd).await,
        Command::Send { channel, text } => ctx.send(&channel, &text).await,
        Command::SendFile { channel, path } => ctx.send_file(&channel, &path).await,
        Command::Download {
            channel,
            index,
            output,
            force,
        } => ctx.download(&channel, index, output, force).await,
        Command::Listen {
            channel,
            from,
            count,
            no_backup,
        } => ctx.listen(&channel, from, count, no_backup).await,
        Command::History {
            channel,
            anchor,
            limit,
            backward,
        } => ctx.history(&channel, anchor, limit, backward).await,
        Command::Sync {
            channel,
            from,
            limit,
        } => ctx.sync(&channel, from, limit).await,
        Command::Audit { acknowledge } => ctx.audit(acknowledge).await,
        Command::Checkpoint { compare } => ctx.checkpoint(compare.as_deref()).await,
        Command::Admin(cmd) => ctx.admin(cmd).await,
        Command::Stack(args) => stack::run(args).await,
        Command::Demo { keep } => demo::run(keep.as_deref()).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tessera",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Service logs only with RUST_LOG set: the CLI's own output is for people.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            e.exit_code()
        }
    }
}
