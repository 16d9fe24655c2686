//! Command-line arguments. Every global option also reads an environment
//! variable, so scripts and several devices on one machine are easy.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Tessera: end-to-end encrypted chat with verified devices, from a terminal.
///
/// Several devices can live on one machine: each is a profile under
/// TESSERA_HOME, picked with --profile. Exit codes: 0 success, 1 failure,
/// 2 bad usage, 3 denied (log-in, permission), 4 not found, 5 a service is
/// unreachable, 6 a security check failed (card, log, message), 7 wrong
/// passphrase, 8 a demo step did not behave as stated.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Directory of the device profiles [default: ~/.tessera].
    #[arg(long, global = true, env = "TESSERA_HOME")]
    pub(crate) home: Option<PathBuf>,
    /// Which device profile to use.
    #[arg(
        long,
        short = 'p',
        global = true,
        env = "TESSERA_PROFILE",
        default_value = "default"
    )]
    pub(crate) profile: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true, env = "TESSERA_JSON")]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Services {
    /// The app server.
    #[arg(
        long = "server",
        env = "TESSERA_SERVER_URL",
        default_value = "http://127.0.0.1:7400"
    )]
    pub(crate) server_url: String,
    /// The key service.
    #[arg(
        long = "kms",
        env = "TESSERA_KMS_URL",
        default_value = "http://127.0.0.1:7401"
    )]
    pub(crate) kms_url: String,
    /// The organisation's backup service.
    #[arg(
        long = "backup",
        env = "TESSERA_BACKUP_URL",
        default_value = "http://127.0.0.1:7402"
    )]
    pub(crate) backup_url: String,
    /// Use no backup service.
    #[arg(long)]
    pub(crate) no_backup: bool,
    /// CA certificate (PEM) to trust for https services.
    #[arg(long, env = "TESSERA_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// AppKey public key (hex) known out of band; refuse any other.
    #[arg(long, env = "TESSERA_APP_KEY")]
    pub(crate) app_key: Option<String>,
    /// Key-service public key (hex) known out of band; refuse any other.
    #[arg(long, env = "TESSERA_KMS_KEY")]
    pub(crate) kms_key: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Joining {
    /// Your user name (lowercase letters, digits, . _ - @ + :).
    pub(crate) identity: String,
    /// A name for this device [default: the profile name].
    #[arg(long)]
    pub(crate) device_name: Option<String>,
    /// Every other device of the account is lost: make this one the only
    /// device (contacts see an identity change). Login only.
    #[arg(long)]
    pub(crate) reset: bool,
    #[command(flatten)]
    pub(crate) services: Services,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create an account and enroll this device (password: TESSERA_PASSWORD or a prompt).
    Signup(Joining),
    /// Enroll this profile as a new device of an existing account; it waits
    /// for approval by one of your other devices (tessera device approve).
    Login(Joining),
    /// Who this profile is.
    Whoami,
    /// List the device profiles in TESSERA_HOME.
    Profiles,
    /// List your devices: approved, pending approval, revoked.
    Devices,
    /// Manage your devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Show a user's devices: approved by their own devices, and pending.
    Whois { identity: String },
    /// Show the safety number of you and a user; --confirm marks them verified.
    Verify {
        identity: String,
        /// The numbers match on both devices: mark the user verified.
        #[arg(long)]
        confirm: bool,
    },
    /// Channels.
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Send a text message ("-" reads it from standard input).
    Send { channel: String, text: String },
    /// Send an encrypted file.
    SendFile { channel: String, path: PathBuf },
    /// Download the attachment of a message. Never replaces an existing
    /// file unless --force is given.
    Download {
        channel: String,
        index: u64,
        /// Where to write it [default: the sender's file name made safe: its
        /// last path component, without leading dots or control characters,
        /// in the current directory].
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print messages as they arrive, decrypted and verified; backs them up
    /// to the organisation in the background when you belong to it.
    Listen {
        channel: String,
        /// First index to print [default: only new messages].
        #[arg(long)]
        from: Option<u64>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Do not back up to the organisation.
        #[arg(long)]
        no_backup: bool,
    },
    /// Print a channel's history from the app server.
    History {
        channel: String,
        /// Index to start from [default: the oldest (or, with --backward, the newest)].
        #[arg(long, default_value_t = 0)]
        anchor: u64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Page towards older messages.
        #[arg(long)]
        backward: bool,
    },
    /// Fetch a channel's history from the organisation's archive (for a new device).
    Sync {
        channel: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many messages [default: all, in as many calls as the service's page size takes].
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Walk the key directory's log for cards under your name that none of your devices made.
    Audit {
        /// Record that you enrolled this card yourself.
        #[arg(long)]
        acknowledge: Option<String>,
    },
    /// Print this device's view of the key directory's log (to compare with
    /// someone else's), or check theirs against yours: a directory showing
    /// you different logs is caught here (exit code 6).
    Checkpoint {
        /// A checkpoint someone else's `tessera checkpoint` printed (hex).
        #[arg(long)]
        compare: Option<String>,
    },
    /// Admin commands (the organisation, any device).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Run the key service, app server and backup service together on loopback.
    Stack(StackArgs),
    /// Start a throwaway stack and play the seed end to end, checking every step.
    Demo {
        /// Keep the demo's data in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub(crate) enum DeviceCommand {
    /// Approve a pending device of yours (a card id or a unique prefix of
    /// one) after comparing the code both devices show.
    Approve {
        card: String,
        /// Do not ask: the codes were compared already.
        #[arg(long)]
        yes: bool,
    },
    /// Remove one of your devices from your device list and revoke it (a
    /// card id or a unique prefix of one).
    Revoke {
        card: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Visibility {
    /// Members see the whole history.
    Shared,
    /// Members see messages from when they joined.
    Joined,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ChannelCommand {
    /// Create a channel (this device signs its creation; you are its admin).
    Create {
        name: String,
        /// Further members, comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        #[arg(long, value_enum, default_value = "shared")]
        visibility: Visibility,
    },
    /// Add a member (channel admins only).
    Add {
        channel: String,
        identity: String,
        /// Add them as an admin.
        #[arg(long)]
        admin: bool,
    },
    /// Remove a member (channel admins only; to remove yourself, `leave`).
    Remove { channel: String, identity: String },
    /// Leave a channel.
    Leave { channel: String },
    /// Make a member an admin or a plain member (channel admins only).
    Role {
        channel: String,
        identity: String,
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// Rename a channel (channel admins only).
    Rename { channel: String, name: String },
    /// Change who sees history from before they joined (channel admins only).
    Visibility {
        channel: String,
        #[arg(value_enum)]
        visibility: Visibility,
    },
    /// Your channels (as the app server lists them).
    List,
    /// A channel's verified membership: epoch, members, who added each.
    Show { channel: String },
    /// Keep received message keys for re-reading history from the app
    /// server (`keep`, the default) or wipe each once used (`forward-secret`:
    /// a thief of this device's state cannot read what it already read, and
    /// neither can you again). A setting of this device only.
    Keys {
        channel: String,
        #[arg(value_enum)]
        retention: RetentionArg,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum RetentionArg {
    Keep,
    ForwardSecret,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum RoleArg {
    Member,
    Admin,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminCommand {
    /// The organisation's members.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Revoke any user's device with the AppKey.
    RevokeDevice {
        card: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum OrgCommand {
    /// Add a user to the organisation (their devices back up).
    AddMember { identity: String },
    /// Remove a user from the organisation.
    RemoveMember { identity: String },
    /// List the organisation's members.
    Members,
}

#[derive(Args, Debug)]
pub(crate) struct StackArgs {
    /// Where the services keep their data and keys (created on first run).
    #[arg(long, env = "TESSERA_STACK_DIR", default_value = "./tessera-data")]
    pub(crate) data_dir: PathBuf,
    #[arg(long, env = "TESSERA_STACK_HOST", default_value = "127.0.0.1")]
    pub(crate) host: std::net::IpAddr,
    #[arg(long, default_value_t = 7400)]
    pub(crate) server_port: u16,
    #[arg(long, default_value_t = 7401)]
    pub(crate) kms_port: u16,
    #[arg(long, default_value_t = 7402)]
    pub(crate) backup_port: u16,
    /// Identity of the organisation.
    #[arg(long, default_value = "org:example")]
    pub(crate) org_identity: String,
    /// Run without an organisation (and without the backup service).
    #[arg(long)]
    pub(crate) no_org: bool,
}
