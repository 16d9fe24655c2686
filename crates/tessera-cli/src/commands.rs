//! The account, device, channel and message commands.

use std::{io::IsTerminal, path::PathBuf};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tessera_client::{
    Approval, CardId, CheckpointView, Client, ClientError, Content, Endpoints, Enrollment,
    ExistingFile, Home, KdfParams, Origin, Received, Source, TrustEvent, approval_code,
    channel_event::Event, safe_file_name,
};
use tessera_crypto::VerifyingKey;
use zeroize::Zeroizing;

use crate::{
    cli::{AdminCommand, DeviceCommand, Joining, OrgCommand},
    error::CliError,
};

fn approval_name(a: Approval) -> &'static str {
    match a {
        Approval::Approved => "approved",
        Approval::Pending => "pending",
        Approval::Gone => "gone",
    }
}

/// First and longest pause before `listen` subscribes again.
const RECONNECT_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `listen` should keep trying to subscribe after `e`: the app
/// server or the way to it is down, not a refusal.
fn reconnectable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Unreachable { .. }
            | ClientError::Rejected {
                code: tonic::Code::Unavailable,
                ..
            }
    )
}

/// Whether a live subscription that ended with `status` should be resumed:
/// the server restarting or shutting down, the connection lost (locally or
/// at a proxy on the way), or the token expired (a fresh log-in follows).
/// A refusal (removed from the channel, a bad request) ends `listen`.
fn resumable(status: &tonic::Status) -> bool {
    use tonic::Code;
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            Code::Unavailable
                | Code::Unauthenticated
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::Aborted
                | Code::DeadlineExceeded
        )
}

/// Exit code 6 once every message was printed, when some were refused.
fn refusals(refused: usize) -> Result<(), CliError> {
    if refused == 0 {
        return Ok(());
    }
    Err(CliError::Security(format!(
        "{refused} message(s) refused (printed above as REFUSED)"
    )))
}

/// What every command works with.
pub(crate) struct Ctx {
    pub(crate) home: Home,
    pub(crate) profile: String,
    pub(crate) json: bool,
}

/// Reads a secret from `var`, or prompts for it on a terminal.
pub(crate) fn secret(
    var: &str,
    prompt: &str,
    confirm: bool,
) -> Result<Zeroizing<String>, CliError> {
    if let Ok(value) = std::env::var(var) {
        return Ok(Zeroizing::new(value));
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(format!(
            "{prompt}: set {var} or run in a terminal"
        )));
    }
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("{prompt}: "))
            .map_err(|e| CliError::Failed(e.to_string()))?,
    );
    if confirm {
        let again = Zeroizing::new(
            rpassword::prompt_password("again: ").map_err(|e| CliError::Failed(e.to_string()))?,
        );
        if *first != *again {
            return Err(CliError::Usage("the two entries differ".into()));
        }
    }
    Ok(first)
}

/// Argon2id cost of device key files; TESSERA_DANGER_FAST_KDF=1 lowers it
/// for tests (never for real keys).
pub(crate) fn kdf() -> KdfParams {
    if std::env::var("TESSERA_DANGER_FAST_KDF").is_ok_and(|v| v == "1") {
        KdfParams::DANGER_FAST_FOR_TESTS
    } else {
        KdfParams::DEFAULT
    }
}

fn parse_key(hex_key: &str, what: &str) -> Result<VerifyingKey, CliError> {
    hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| CliError::Usage(format!("{what} must be 64 hex digits")))
}

impl Ctx {
    pub(crate) fn open(&self) -> Result<Client, CliError> {
        if !self
            .home
            .profile_dir(&self.profile)
            .join("profile.json")
            .exists()
        {
            return Err(ClientError::NotFound {
                what: "profile",
                name: self.profile.clone(),
            }
            .into());
        }
        let pass = secret(
            "TESSERA_PASSPHRASE",
            &format!("passphrase of profile {}", self.profile),
            false,
        )?;
        Ok(Client::open(&self.home, &self.profile, pass.as_bytes())?)
    }

    /// Prints `value` as JSON, or `text` for people.
    pub(crate) fn out(&self, text: impl FnOnce() -> String, value: impl FnOnce() -> Value) {
        if self.json {
            println!("{}", value());
        } else {
            let t = text();
            if !t.is_empty() {
                println!("{t}");
            }
        }
    }

    pub(crate) async fn join(&self, j: Joining, sign_up: bool) -> Result<(), CliError> {
        if j.reset && sign_up {
            return Err(CliError::Usage(
                "--reset replaces the devices of an existing account: use it with login".into(),
            ));
        }
        let password = secret(
            "TESSERA_PASSWORD",
            &format!("password of {}", j.identity),
            sign_up,
        )?;
        let passphrase = secret(
            "TESSERA_PASSPHRASE",
            &format!(
                "new passphrase for this device's key (profile {})",
                self.profile
            ),
            true,
        )?;
        let s = j.services;
        let endpoints = Endpoints {
            server_url: s.server_url,
            kms_url: s.kms_url,
            backup_url: (!s.no_backup).then_some(s.backup_url),
            ca_cert: s.ca_cert,
        };
        let device_name = j.device_name.unwrap_or_else(|| self.profile.clone());
        let client = Client::enroll(
            &self.home,
            &self.profile,
            Enrollment {
                endpoints,
                identity: &j.identity,
                password: &password,
                sign_up,
                device_name: &device_name,
                passphrase: passphrase.as_bytes(),
                kdf: kdf(),
                expected_app_key: s
                    .app_key
                    .as_deref()
                    .map(|k| parse_key(k, "--app-key"))
                    .transpose()?,
                expected_kms_key: s
                    .kms_key
                    .as_deref()
                    .map(|k| parse_key(k, "--kms-key"))
                    .transpose()?,
                reset: j.reset,
            },
        )
        .await?;
        let approval = client.approval().await?;
        let cfg = client.config();
        self.out(
            || {
                format!(
                    "{} device {:?} of {} enrolled: card {}\n  AppKey     {}\n  key service {}\n(profile {:?} in {})",
                    if sign_up { "signed up;" } else { "logged in;" },
                    client.device_name(),
                    client.identity(),
                    client.card_id(),
                    cfg.app_public_key,
                    cfg.kms_public_key,
                    self.profile,
                    self.home.root().display()
                )
            },
            || json!({"identity": client.identity(), "card_id": client.card_id().to_string(), "device_name": client.device_name(), "profile": self.profile, "app_public_key": cfg.app_public_key, "kms_public_key": cfg.kms_public_key, "approval": approval_name(approval), "approval_code": approval_code(&client.card_id())}),
        );
        if !self.json {
            match approval {
                Approval::Approved if j.reset => eprintln!(
                    "warning: this device replaced every other device of {}: their contacts will see an identity change",
                    client.identity()
                ),
                Approval::Approved => {}
                Approval::Pending => println!(
                    "This device is waiting for approval: nothing is encrypted to it yet.\n  approval code  {}\nOn one of your other devices run:\n  tessera device approve {}\nand check it shows the same code.",
                    approval_code(&client.card_id()),
                    &client.card_id().to_string()[..16]
                ),
                Approval::Gone => {
                    eprintln!("warning: the enrolled card is not active in your device list")
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn whoami(&self) -> Result<(), CliError> {
        let c = self.open()?;
        let org = c.is_org_member().await?;
        let admin = c.is_admin().await?;
        self.out(
            || {
                format!(
                    "{} on device {:?} (card {}){}{}",
                    c.identity(),
                    c.device_name(),
                    c.card_id(),
                    if org { format!(", member of {}", c.config().org_identity.clone().unwrap_or_default()) } else { String::new() },
                    if admin { ", admin" } else { "" }
                )
            },
            || json!({"identity": c.identity(), "device_name": c.device_name(), "card_id": c.card_id().to_string(), "org_member": org, "admin": admin}),
        );
        Ok(())
    }

    pub(crate) fn profiles(&self) {
        let names = self.home.profiles();
        self.out(|| names.join("\n"), || json!(names));
    }

    pub(crate) async fn devices(&self) -> Result<(), CliError> {
        let c = self.open()?;
        let listed = c.devices().await?;
        let own = c.own_devices().await?;
        let status = |id: &str, server_status: i32| {
            if own.approved.iter().any(|d| d.id().to_string() == id) {
                "approved".to_owned()
            } else if own.pending.iter().any(|d| d.id().to_string() == id) {
                "pending".to_owned()
            } else {
                tessera_client::CardStatus::try_from(server_status)
                    .map(|s| {
                        s.as_str_name()
                            .trim_start_matches("CARD_STATUS_")
                            .to_lowercase()
                    })
                    .map(|s| {
                        if s == "active" {
                            "removed".to_owned()
                        } else {
                            s
                        }
                    })
                    .unwrap_or_default()
            }
        };
        let rows: Vec<(String, String, String)> = listed
            .iter()
            .map(|d| {
                let id = hex::encode(&d.card_id);
                let st = status(&id, d.status);
                (id, st, d.device_name.clone())
            })
            .collect();
        self.out(
            || {
                let mut lines: Vec<String> = rows
                    .iter()
                    .map(|(id, st, name)| {
                        let me = if *id == c.card_id().to_string() { "  (this device)" } else { "" };
                        format!("{}  {:<10} {name}{me}", &id[..16], st)
                    })
                    .collect();
                if !own.pending.is_empty() {
                    lines.push(format!(
                        "{} device(s) wait for approval: compare the code on that device, then tessera device approve <card>",
                        own.pending.len()
                    ));
                }
                lines.join("\n")
            },
            || json!(rows.iter().map(|(id, st, name)| json!({"card_id": id, "device_name": name, "status": st})).collect::<Vec<_>>()),
        );
        Ok(())
    }

    /// A full card id from a unique prefix of one of `candidates`.
    fn resolve_card(
        prefix: &str,
        candidates: impl IntoIterator<Item = String>,
    ) -> Result<CardId, CliError> {
        let prefix = prefix.to_lowercase();
        if prefix.len() < 8 {
            return Err(CliError::Usage(
                "give at least 8 hex digits of the card id".into(),
            ));
        }
        let matches: Vec<String> = candidates
            .into_iter()
            .filter(|c| c.starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [one] => one
                .parse()
                .map_err(|_| CliError::Usage("not a card id".into())),
            [] => Err(ClientError::NotFound {
                what: "card",
                name: prefix,
            }
            .into()),
            _ => Err(CliError::Usage(format!(
                "{prefix} matches several cards; give more digits"
            ))),
        }
    }

    pub(crate) async fn device(&self, cmd: DeviceCommand) -> Result<(), CliError> {
        let c = self.open()?;
        match cmd {
            DeviceCommand::Approve { card, yes } => {
                let pending = c.own_devices().await?.pending;
                let id = Self::resolve_card(&card, pending.iter().map(|d| d.id().to_string()))?;
                let name = pending
                    .iter()
                    .find(|d| d.id() == id)
                    .map(|d| d.device_name().to_owned())
                    .unwrap_or_default();
                let code = approval_code(&id);
                if !yes {
                    if !std::io::stdin().is_terminal() {
                        return Err(CliError::Usage(format!(
                            "device {name:?} shows approval code {code}? Compare it, then pass --yes"
                        )));
                    }
                    eprint!(
                        "Approve device {name:?} (card {})?\nIt must show the approval code {code}. [y/N] ",
                        id.short()
                    );
                    let mut answer = String::new();
                    let ok = std::io::stdin().read_line(&mut answer).is_ok()
                        && answer.trim().eq_ignore_ascii_case("y");
                    if !ok {
                        return Err(CliError::Failed("not approved".into()));
                    }
                }
                c.approve_device(&id).await?;
                self.out(
                    || format!("approved {name:?} (card {id}, code {code})"),
                    || json!({"approved": id.to_string(), "device_name": name, "approval_code": code}),
                );
            }
            DeviceCommand::Revoke { card, reason } => {
                let own: Vec<String> = c
                    .devices()
                    .await?
                    .iter()
                    .map(|d| hex::encode(&d.card_id))
                    .collect();
                let id = Self::resolve_card(&card, own)?;
                let password = if id == c.card_id() {
                    None
                } else {
                    Some(secret(
                        "TESSERA_PASSWORD",
                        &format!("password of {} (revoking another device)", c.identity()),
                        false,
                    )?)
                };
                c.revoke_device(&id, &reason, password.as_ref().map(|p| p.as_str()))
                    .await?;
                self.out(
                    || format!("revoked {id}"),
                    || json!({"revoked": id.to_string()}),
                );
            }
        }
        Ok(())
    }

    pub(crate) fn warn_events(&self, events: &[TrustEvent]) {
        for e in events {
            let line = match e {
                TrustEvent::DeviceAdded {
                    identity,
                    card_id,
                    device_name,
                } => format!(
                    "{identity} has a new device {device_name:?} (card {}); if unexpected, compare safety numbers: tessera verify {identity}",
                    card_id.short()
                ),
                TrustEvent::DeviceRemoved { identity, card_id } => {
                    format!(
                        "{identity}'s device {} is gone (revoked or replaced)",
                        card_id.short()
                    )
                }
                TrustEvent::KeyChanged {
                    identity,
                    old_card_id,
                    new_card_id,
                } => format!(
                    "{identity} replaced the key of a device ({} -> {})",
                    old_card_id.short(),
                    new_card_id.short()
                ),
                TrustEvent::VerificationLost { identity } => {
                    format!(
                        "{identity} is no longer verified: their devices changed; run tessera verify {identity}"
                    )
                }
                TrustEvent::DevicePending {
                    identity,
                    card_id,
                    device_name,
                } => format!(
                    "{identity} has a device {device_name:?} (card {}) that none of their devices approved: nothing is encrypted to it, its messages are refused",
                    card_id.short()
                ),
                TrustEvent::IdentityReset { identity } => format!(
                    "!!! {identity} RESET their identity: every earlier device was replaced after a password log-in. If {identity} did not lose all their devices, this may be an attack by the server. Compare safety numbers: tessera verify {identity}"
                ),
            };
            eprintln!("warning: {line}");
        }
    }

    /// Says which members' devices a message was not encrypted to.
    pub(crate) fn warn_unsent(&self, sent: &tessera_client::Sent) {
        let mut pending: std::collections::BTreeMap<&str, usize> = Default::default();
        for p in &sent.pending {
            *pending.entry(p.identity.as_str()).or_default() += 1;
        }
        for (identity, n) in pending {
            eprintln!("{identity} has {n} pending device(s) (not encrypted to)");
        }
        for identity in &sent.unreachable {
            eprintln!("warning: {identity} has no approved device: they cannot read this message");
        }
    }

    pub(crate) async fn whois(&self, identity: &str) -> Result<(), CliError> {
        let c = self.open()?;
        let (found, events) = c.cards_of(&[identity.to_owned()]).await?;
        self.warn_events(&events);
        let devices = found.get(identity).cloned().unwrap_or_default();
        let verified = c.contacts()?.get(identity).copied().unwrap_or(false);
        let card_json = |card: &tessera_client::VerifiedCard, status: &str| json!({"card_id": card.id().to_string(), "device_name": card.device_name(), "created_at": card.created_at(), "status": status});
        self.out(
            || {
                let mut lines = vec![format!(
                    "{identity}: {} approved device(s){}, {}",
                    devices.approved.len(),
                    match devices.pending.len() {
                        0 => String::new(),
                        n => format!(", {n} pending (not encrypted to)"),
                    },
                    if verified { "verified" } else { "not verified" }
                )];
                for card in &devices.approved {
                    lines.push(format!("  {}  {}", card.id(), card.device_name()));
                }
                for card in &devices.pending {
                    lines.push(format!("  {}  {}  (pending)", card.id(), card.device_name()));
                }
                lines.join("\n")
            },
            || json!({"identity": identity, "verified": verified, "cards": devices.approved.iter().map(|c| card_json(c, "approved")).chain(devices.pending.iter().map(|c| card_json(c, "pending"))).collect::<Vec<_>>()}),
        );
        Ok(())
    }

    pub(crate) async fn verify(&self, identity: &str, confirm: bool) -> Result<(), CliError> {
        let c = self.open()?;
        let check = c.safety_number(identity).await?;
        self.warn_events(&check.events);
        self.out(
            || {
                format!(
                    "Safety number of {} and {identity}:\n\n{}\n\nCompare it with {identity}'s screen ({} of their devices, {} of yours).{}",
                    c.identity(),
                    check.number,
                    check.contact_cards.len(),
                    check.own_cards.len(),
                    if check.verified { "\nAlready verified." } else { "" }
                )
            },
            || json!({"identity": identity, "safety_number": check.number.digits(), "verified": check.verified}),
        );
        let confirmed = confirm
            || (!self.json && !check.verified && std::io::stdin().is_terminal() && {
                eprint!("Do the numbers match? [y/N] ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer).is_ok()
                    && answer.trim().eq_ignore_ascii_case("y")
            });
        if confirmed {
            c.mark_verified(&check)?;
            if !self.json {
                println!("{identity} marked verified.");
            }
        }
        Ok(())
    }

    /// A channel id from an id or a unique channel name.
    pub(crate) async fn channel_id(&self, c: &Client, arg: &str) -> Result<String, CliError> {
        if arg.len() == 32 && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(arg.to_lowercase());
        }
        let named: Vec<_> = c
            .channels()
            .await?
            .into_iter()
            .filter(|ch| ch.name == arg)
            .collect();
        match named.as_slice() {
            // The name listed is the app server's word: it must be the one
            // the channel's members signed (a legacy channel has no other).
            [one] if one.chain_length == 0 => Ok(one.channel_id.clone()),
            [one] => {
                let verified = c.verified_channel(&one.channel_id).await?;
                if verified.state.name() != arg {
                    return Err(CliError::Security(format!(
                        "the app server lists channel {} as {arg:?}, but its members named it {:?}: use the id if you mean that channel",
                        one.channel_id,
                        verified.state.name()
                    )));
                }
                Ok(one.channel_id.clone())
            }
            [] => Err(ClientError::NotFound {
                what: "channel",
                name: arg.to_owned(),
            }
            .into()),
            _ => Err(CliError::Usage(format!(
                "several channels are named {arg:?}; use the id"
            ))),
        }
    }

    pub(crate) async fn send(&self, channel: &str, text: &str) -> Result<(), CliError> {
        let c = self.open()?;
        let id = self.channel_id(&c, channel).await?;
        let body = if text == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            s
        } else {
            text.to_owned()
        };
        let sent = c.send_text(&id, &body).await?;
        self.warn_events(&sent.events);
        self.warn_unsent(&sent);
        if !self.json {
            self.print_changes(&c, &sent.membership_changes);
        }
        self.out(
            || format!("sent as message {} (epoch {}, encrypted to {} devices)", sent.index, sent.epoch, sent.recipients.len()),
            || json!({"index": sent.index, "epoch": sent.epoch, "message_id": hex::encode(sent.message_id), "recipients": sent.recipients.iter().map(|r| r.to_string()).collect::<Vec<_>>(), "duplicate": sent.duplicate}),
        );
        Ok(())
    }

    pub(crate) async fn send_file(
        &self,
        channel: &str,
        path: &std::path::Path,
    ) -> Result<(), CliError> {
        let c = self.open()?;
        let id = self.channel_id(&c, channel).await?;
        let sent = c.send_file(&id, path).await?;
        self.warn_events(&sent.events);
        self.out(
            || {
                format!(
                    "sent {} as message {} (key encrypted to {} devices)",
                    path.display(),
                    sent.index,
                    sent.recipients.len()
                )
            },
            || json!({"index": sent.index, "recipients": sent.recipients.len()}),
        );
        Ok(())
    }

    pub(crate) async fn download(
        &self,
        channel: &str,
        index: u64,
        output: Option<PathBuf>,
        force: bool,
    ) -> Result<(), CliError> {
        let c = self.open()?;
        let id = self.channel_id(&c, channel).await?;
        let page = c.history(&id, index, 1, false).await?;
        let received = page
            .messages
            .into_iter()
            .find(|(i, _)| *i == index)
            .ok_or_else(|| ClientError::NotFound {
                what: "message",
                name: index.to_string(),
            })?
            .1?;
        let Content::File(file) = &received.content else {
            return Err(CliError::Usage(format!("message {index} is not a file")));
        };
        // The sender chose the name: never a path, never a dotfile.
        let out = output.unwrap_or_else(|| PathBuf::from(safe_file_name(&file.file_name)));
        let existing = if force {
            ExistingFile::Replace
        } else {
            ExistingFile::Refuse
        };
        let size = c
            .download_file_to(&id, file, &out, existing)
            .await
            .map_err(|e| match e {
                ClientError::Usage(m) => CliError::Usage(format!("{m} (--force replaces it)")),
                other => other.into(),
            })?;
        self.out(
            || {
                format!(
                    "saved {} ({size} bytes, from {})",
                    out.display(),
                    received.sender_identity
                )
            },
            || json!({"path": out, "size": size}),
        );
        Ok(())
    }

    /// Prints a received message once its signed original verifies again
    /// against the sender's card (`verified` in JSON is that check), or as
    /// refused; returns whether it verified.
    async fn show_received(&self, c: &Client, r: &Received) -> bool {
        match c.verify_received(r).await {
            Ok(()) => {
                self.print_message(r, true);
                true
            }
            Err(e) => {
                self.print_refused(r.index, &e);
                false
            }
        }
    }

    fn print_message(&self, r: &Received, verified: bool) {
        let what = match &r.content {
            Content::Text(t) => t.clone(),
            Content::File(f) => format!(
                "[file {} ({} bytes): tessera download {} {}]",
                safe_file_name(&f.file_name),
                f.size,
                r.channel_id,
                r.index
            ),
            Content::Other { content_type, body } => {
                format!("[{content_type}, {} bytes]", body.len())
            }
        };
        let via = if r.source == Source::Organisation {
            " (from the org archive)"
        } else {
            ""
        };
        let unverified_membership = if r.epoch.is_none() {
            " (membership unverified: channel made before protocol v2)"
        } else {
            ""
        };
        self.warn_events(&r.events);
        if !self.json {
            for d in &r.recipient_differences {
                eprintln!("note: message {}: {d}", r.index);
            }
        }
        if r.sender_reset_unacknowledged && !self.json {
            eprintln!(
                "warning: {} RESET their identity and you have not verified them since: check before you trust this (tessera verify {})",
                r.sender_identity, r.sender_identity
            );
        }
        self.out(
            || format!("#{} {} ({}){via}{unverified_membership}: {what}", r.index, r.sender_identity, r.sender_device),
            || json!({"index": r.index, "epoch": r.epoch, "recipient_differences": r.recipient_differences.iter().map(ToString::to_string).collect::<Vec<_>>(), "channel_id": r.channel_id, "sender": r.sender_identity, "sender_card_id": r.sender_card_id.to_string(), "device": r.sender_device, "sent_at_ms": r.sent_at_ms, "text": match &r.content { Content::Text(t) => Value::from(t.clone()), _ => Value::Null }, "source": if r.source == Source::Organisation { "org" } else { "server" }, "verified": verified, "sender_reset_unverified": r.sender_reset_unacknowledged}),
        );
    }

    fn print_refused(&self, index: u64, e: &ClientError) {
        if self.json {
            println!(
                "{}",
                json!({"index": index, "error": e.to_string(), "verified": false})
            );
        } else {
            eprintln!("#{index} REFUSED: {e}");
        }
    }

    pub(crate) async fn history(
        &self,
        channel: &str,
        anchor: u64,
        limit: u32,
        backward: bool,
    ) -> Result<(), CliError> {
        let c = self.open()?;
        let id = self.channel_id(&c, channel).await?;
        c.verified_channel(&id).await?;
        let page = c.history(&id, anchor, limit, backward).await?;
        let mut refused = 0;
        let mut previous = None;
        for (index, result) in &page.messages {
            self.print_changes_placed(&c, &id, previous.map_or(*index, |p: u64| p + 1), index + 1)?;
            previous = Some(*index);
            let shown = match result {
                Ok(r) => self.show_received(&c, r).await,
                Err(e) => {
                    self.print_refused(*index, e);
                    false
                }
            };
            refused += usize::from(!shown);
        }
        // Changes after the newest message, on the page that ends there.
        let newest = if backward {
            anchor == 0
        } else {
            page.next_anchor == 0
        };
        if newest {
            let after = previous.map_or(anchor.max(1), |p| p + 1);
            self.print_changes_placed(&c, &id, after, u64::MAX)?;
        }
        if page.next_anchor != 0 && !self.json {
            eprintln!(
                "(more: --anchor {}{})",
                page.next_anchor,
                if backward { " --backward" } else { "" }
            );
        }
        refusals(refused)
    }

    pub(crate) async fn listen(
        &self,
        channel: &str,
        from: Option<u64>,
        count: Option<u64>,
        no_backup: bool,
    ) -> Result<(), CliError> {
        let c = std::sync::Arc::new(self.open()?);
        let id = self.channel_id(&c, channel).await?;
        let backup = !no_backup && c.is_org_member().await?;
        // "Only new messages" is pinned to an index now, so a reconnect
        // resumes from there and nothing sent during an outage is lost
        // (subscribing from 0 again would skip it).
        let view = c.channel(&id).await?;
        let mut next = match from {
            Some(n) => n,
            None => view.served.next_index,
        };
        // Membership changes are shown from here on, in order with the
        // messages: those up to the first message's epoch before it.
        let mut shown_through = view.verified.state.length();
        let mut seen = 0u64;
        let mut refused = 0;
        let mut backoff = RECONNECT_FIRST;
        let mut backups = tokio::task::JoinSet::new();
        if !self.json {
            eprintln!(
                "listening on {id}{} (Ctrl-C to stop)",
                if backup {
                    ", backing up to the organisation"
                } else {
                    ""
                }
            );
        }
        'outer: loop {
            let mut stream = match c.subscribe(&id, next).await {
                Ok(stream) => stream,
                Err(e) if reconnectable(&e) => {
                    // The app server (or the way to it) is down: try again.
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = tokio::signal::ctrl_c() => break 'outer,
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue 'outer;
                }
                Err(e) => return Err(e.into()),
            };
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = tokio::signal::ctrl_c() => break 'outer,
                };
                let event = match item {
                    Some(Ok(e)) => e.event,
                    Some(Err(status)) if resumable(&status) => {
                        // A server restart, the connection lost, or the
                        // token expired: resume from the next index (with a
                        // fresh log-in when the token expired).
                        tokio::select! {
                            () = tokio::time::sleep(RECONNECT_FIRST) => {}
                            _ = tokio::signal::ctrl_c() => break 'outer,
                        }
                        continue 'outer;
                    }
                    Some(Err(status)) => {
                        return Err(CliError::Failed(format!(
                            "subscription ended: {}",
                            status.message()
                        )));
                    }
                    None => continue 'outer,
                };
                backoff = RECONNECT_FIRST;
                let stored = match event {
                    Some(Event::Message(m)) => m,
                    Some(Event::ChainLength(length)) => {
                        if length > shown_through {
                            let verified = c.verified_channel(&id).await?;
                            let to = verified.state.length();
                            self.print_changes(&c, &c.membership_changes(&id, shown_through, to)?);
                            shown_through = shown_through.max(to);
                        }
                        continue;
                    }
                    None => continue,
                };
                next = stored.index + 1;
                if stored.epoch >= shown_through {
                    // The message names a later epoch: its changes first
                    // (opening it verifies the chain that far).
                    if let Ok(verified) = c.verified_channel(&id).await {
                        let to = verified.state.length().min(stored.epoch + 1);
                        self.print_changes(&c, &c.membership_changes(&id, shown_through, to)?);
                        shown_through = shown_through.max(to);
                    }
                }
                match c.open_message(&stored).await {
                    Ok(r) if self.show_received(&c, &r).await => {
                        let _ = c.set_read_horizon(&id, r.index).await;
                        if backup {
                            let c = c.clone();
                            backups.spawn(async move {
                                if let Err(e) = c.back_up(&r).await {
                                    eprintln!("warning: backup of message {} failed: {e}", r.index);
                                }
                            });
                        }
                    }
                    Ok(_) => refused += 1,
                    Err(e) => {
                        refused += 1;
                        self.print_refused(stored.index, &e);
                    }
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break 'outer;
                }
            }
        }
        while backups.join_next().await.is_some() {}
        refusals(refused)
    }

    pub(crate) async fn sync(&self, channel: &str, from: u64, limit: u32) -> Result<(), CliError> {
        let c = self.open()?;
        let id = self.channel_id(&c, channel).await?;
        let bar = (!self.json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} messages ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let entries = c
            .sync_from_org(&id, from, limit, |done, total| {
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            })
            .await?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let mut refused = 0;
        for entry in &entries {
            match &entry.result {
                Ok(r) => {
                    if !self.show_received(&c, r).await {
                        refused += 1;
                    }
                }
                Err(e) => {
                    refused += 1;
                    self.print_refused(entry.index, e);
                }
            }
        }
        if !self.json {
            eprintln!(
                "{} message(s) from the organisation, {} verified, {refused} refused",
                entries.len(),
                entries.len() - refused
            );
        }
        if refused > 0 {
            return Err(CliError::Security(format!(
                "{refused} message(s) from the organisation did not verify"
            )));
        }
        Ok(())
    }

    pub(crate) async fn audit(&self, acknowledge: Option<String>) -> Result<(), CliError> {
        let c = self.open()?;
        let report = c.audit().await?;
        if let Some(prefix) = acknowledge {
            let id =
                Self::resolve_card(&prefix, report.cards.iter().map(|a| a.card_id.to_string()))?;
            c.acknowledge(&id)?;
            if !self.json {
                println!("acknowledged {id}");
            }
            return Ok(());
        }
        let origin = |o: Origin| match o {
            Origin::ThisDevice => "this device",
            Origin::CreatedHere => "enrolled from this computer",
            Origin::Acknowledged => "acknowledged by you",
            Origin::Approved => "approved by one of your devices",
            Origin::Unrecognised => "UNRECOGNISED",
        };
        self.out(
            || {
                let mut lines = vec![format!(
                    "The log holds {} entries; {} card(s) were ever registered for {}:",
                    report.log_size,
                    report.cards.len(),
                    c.identity()
                )];
                for a in &report.cards {
                    lines.push(format!(
                        "  {}  {:<24} {:<8} {}",
                        &a.card_id.to_string()[..16],
                        a.device_name,
                        if a.revoked { "revoked" } else { "active" },
                        origin(a.origin)
                    ));
                }
                lines.push(format!(
                    "Your device list has {} statement(s):",
                    report.statements.len()
                ));
                for s in &report.statements {
                    lines.push(format!(
                        "  #{:<3} {:<8} {}  signed by {} ({})",
                        s.seqno,
                        s.action,
                        &s.subject.to_string()[..16],
                        &s.signer.to_string()[..16],
                        origin(s.signer_origin)
                    ));
                }
                lines.join("\n")
            },
            || json!({"log_size": report.log_size, "cards": report.cards.iter().map(|a| json!({"card_id": a.card_id.to_string(), "device_name": a.device_name, "revoked": a.revoked, "origin": origin(a.origin), "log_index": a.log_index})).collect::<Vec<_>>(), "statements": report.statements.iter().map(|s| json!({"seqno": s.seqno, "action": s.action.to_string(), "subject": s.subject.to_string(), "signer": s.signer.to_string(), "signer_origin": origin(s.signer_origin), "log_index": s.log_index})).collect::<Vec<_>>(), "conflicts": report.conflicts}),
        );
        if !report.conflicts.is_empty() {
            return Err(CliError::Security(format!(
                "the log holds two histories of your device list (statements {:?}): the key service is forking it",
                report.conflicts
            )));
        }
        let strangers: Vec<String> = report
            .unrecognised_statements()
            .map(|s| format!("#{} {} by {}", s.seqno, s.action, s.signer.short()))
            .collect();
        if !strangers.is_empty() {
            return Err(CliError::Security(format!(
                "statement(s) of your device list signed by a card none of your devices made: {}. If you did not reset your account, it was taken over: reset it (tessera login --reset)",
                strangers.join(", ")
            )));
        }
        let unknown: Vec<String> = report
            .unrecognised_active()
            .map(|a| a.card_id.short())
            .collect();
        if !unknown.is_empty() {
            return Err(CliError::Security(format!(
                "{} active card(s) under your name that none of your devices made: {}. If you enrolled them, run `tessera audit --acknowledge <id>`; otherwise revoke them with `tessera device revoke <id>`",
                unknown.len(),
                unknown.join(", ")
            )));
        }
        Ok(())
    }

    pub(crate) async fn checkpoint(&self, compare: Option<&str>) -> Result<(), CliError> {
        let c = self.open()?;
        let view = |v: &CheckpointView| json!({"tree_size": v.tree_size, "root_hash": hex::encode(v.root_hash), "timestamp": v.timestamp, "checkpoint": v.exported});
        match compare {
            None => {
                let mine = c.export_checkpoint().await?;
                self.out(
                    || {
                        format!(
                            "The key directory's log as this device sees it: {} entries, root {}.\nGive this to the other person, who runs `tessera checkpoint --compare <it>`:\n{}",
                            mine.tree_size,
                            hex::encode(mine.root_hash),
                            mine.exported
                        )
                    },
                    || view(&mine),
                );
            }
            Some(theirs) => {
                let agreed = c.compare_checkpoint(theirs).await?;
                self.out(
                    || {
                        format!(
                            "Consistent: their log of {} entries and yours of {} are one history.",
                            agreed.theirs.tree_size, agreed.mine.tree_size
                        )
                    },
                    || json!({"consistent": true, "mine": view(&agreed.mine), "theirs": view(&agreed.theirs)}),
                );
            }
        }
        Ok(())
    }

    pub(crate) async fn admin(&self, cmd: AdminCommand) -> Result<(), CliError> {
        let c = self.open()?;
        match cmd {
            AdminCommand::Org(OrgCommand::AddMember { identity }) => {
                let members = c.set_org_member(&identity, true).await?;
                self.out(
                    || format!("organisation members: {}", members.join(", ")),
                    || json!(members),
                );
            }
            AdminCommand::Org(OrgCommand::RemoveMember { identity }) => {
                let members = c.set_org_member(&identity, false).await?;
                self.out(
                    || format!("organisation members: {}", members.join(", ")),
                    || json!(members),
                );
            }
            AdminCommand::Org(OrgCommand::Members) => {
                let (org, members) = c.org_members().await?;
                self.out(
                    || format!("{org}: {}", members.join(", ")),
                    || json!({"org_identity": org, "members": members}),
                );
            }
            AdminCommand::RevokeDevice { card, reason } => {
                let id: CardId = card
                    .parse()
                    .map_err(|_| CliError::Usage("give the full 64-hex-digit card id".into()))?;
                c.admin_revoke_device(&id, &reason).await?;
                self.out(
                    || format!("revoked {id}"),
                    || json!({"revoked": id.to_string()}),
                );
            }
        }
        Ok(())
    }
}
