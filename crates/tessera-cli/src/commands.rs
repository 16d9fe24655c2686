//! The account, device, channel and message commands.

use std::{io::IsTerminal, path::PathBuf};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tessera_client::{
    CardId, Client, ClientError, Content, Endpoints, Enrollment, ExistingFile, HistoryVisibility,
    Home, KdfParams, Origin, Received, Source, TrustEvent, safe_file_name,
};
use tessera_crypto::VerifyingKey;
use zeroize::Zeroizing;

use crate::{
    cli::{AdminCommand, ChannelCommand, DeviceCommand, Joining, OrgCommand, Visibility},
    error::CliError,
};

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
            },
        )
        .await?;
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
            || json!({"identity": client.identity(), "card_id": client.card_id().to_string(), "device_name": client.device_name(), "profile": self.profile, "app_public_key": cfg.app_public_key, "kms_public_key": cfg.kms_public_key}),
        );
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
        let devices = c.devices().await?;
        let status = |s: i32| {
            tessera_client::CardStatus::try_from(s)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("CARD_STATUS_")
                        .to_lowercase()
                })
                .unwrap_or_default()
        };
        self.out(
            || {
                devices
                    .iter()
                    .map(|d| {
                        let id = hex::encode(&d.card_id);
                        let me = if id == c.card_id().to_string() { "  (this device)" } else { "" };
                        format!("{}  {:<10} {}{me}", &id[..16], status(d.status), d.device_name)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            },
            || json!(devices.iter().map(|d| json!({"card_id": hex::encode(&d.card_id), "device_name": d.device_name, "status": status(d.status)})).collect::<Vec<_>>()),
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
            DeviceCommand::Revoke { card, reason } => {
                let own: Vec<String> = c
                    .devices()
                    .await?
                    .iter()
                    .map(|d| hex::encode(&d.card_id))
                    .collect();
                let id = Self::resolve_card(&card, own)?;
                c.revoke_device(&id, &reason).await?;
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
            };
            eprintln!("warning: {line}");
        }
    }

    pub(crate) async fn whois(&self, identity: &str) -> Result<(), CliError> {
        let c = self.open()?;
        let (found, events) = c.cards_of(&[identity.to_owned()]).await?;
        self.warn_events(&events);
        let cards = found.get(identity).cloned().unwrap_or_default();
        let verified = c.contacts()?.get(identity).copied().unwrap_or(false);
        self.out(
            || {
                let mut lines = vec![format!(
                    "{identity}: {} active device(s), {}",
                    cards.len(),
                    if verified { "verified" } else { "not verified" }
                )];
                for card in &cards {
                    lines.push(format!("  {}  {}", card.id(), card.device_name()));
                }
                lines.join("\n")
            },
            || json!({"identity": identity, "verified": verified, "cards": cards.iter().map(|c| json!({"card_id": c.id().to_string(), "device_name": c.device_name(), "created_at": c.created_at()})).collect::<Vec<_>>()}),
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
            [one] => Ok(one.channel_id.clone()),
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

    pub(crate) async fn channel(&self, cmd: ChannelCommand) -> Result<(), CliError> {
        let c = self.open()?;
        let show = |ch: &tessera_client::Channel| {
            let members: Vec<&str> = ch.members.iter().map(|m| m.identity.as_str()).collect();
            let text = format!(
                "{}  {}  ({}, {} messages){}",
                ch.channel_id,
                ch.name,
                if ch.history_visibility == HistoryVisibility::Joined as i32 {
                    "joined"
                } else {
                    "shared"
                },
                ch.next_index.saturating_sub(1),
                if members.is_empty() {
                    String::new()
                } else {
                    format!("\n  members: {}", members.join(", "))
                }
            );
            let value = json!({"channel_id": ch.channel_id, "name": ch.name, "creator": ch.creator, "members": members, "messages": ch.next_index.saturating_sub(1), "visible_from_index": ch.visible_from_index});
            (text, value)
        };
        match cmd {
            ChannelCommand::Create {
                name,
                members,
                visibility,
            } => {
                let vis = match visibility {
                    Visibility::Shared => HistoryVisibility::Shared,
                    Visibility::Joined => HistoryVisibility::Joined,
                };
                let ch = c.create_channel(&name, vis, &members).await?;
                let (t, v) = show(&ch);
                self.out(|| t, || v);
            }
            ChannelCommand::Add { channel, identity } => {
                let id = self.channel_id(&c, &channel).await?;
                let (t, v) = show(&c.add_member(&id, &identity).await?);
                self.out(|| t, || v);
            }
            ChannelCommand::Remove { channel, identity } => {
                let id = self.channel_id(&c, &channel).await?;
                let (t, v) = show(&c.remove_member(&id, &identity).await?);
                self.out(|| t, || v);
            }
            ChannelCommand::List => {
                let all: Vec<_> = c.channels().await?.iter().map(show).collect();
                self.out(
                    || {
                        all.iter()
                            .map(|(t, _)| t.clone())
                            .collect::<Vec<_>>()
                            .join("\n")
                    },
                    || json!(all.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()),
                );
            }
            ChannelCommand::Show { channel } => {
                let id = self.channel_id(&c, &channel).await?;
                let (t, v) = show(&c.channel(&id).await?);
                self.out(|| t, || v);
            }
        }
        Ok(())
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
        self.out(
            || format!("sent as message {} (encrypted to {} devices)", sent.index, sent.recipients.len()),
            || json!({"index": sent.index, "message_id": hex::encode(sent.message_id), "recipients": sent.recipients.iter().map(|r| r.to_string()).collect::<Vec<_>>(), "duplicate": sent.duplicate}),
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

    fn print_message(&self, r: &Received) {
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
        self.out(
            || format!("#{} {} ({}){via}: {what}", r.index, r.sender_identity, r.sender_device),
            || json!({"index": r.index, "channel_id": r.channel_id, "sender": r.sender_identity, "sender_card_id": r.sender_card_id.to_string(), "device": r.sender_device, "sent_at_ms": r.sent_at_ms, "text": match &r.content { Content::Text(t) => Value::from(t.clone()), _ => Value::Null }, "source": if r.source == Source::Organisation { "org" } else { "server" }, "verified": true}),
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
        let page = c.history(&id, anchor, limit, backward).await?;
        for (index, result) in &page.messages {
            match result {
                Ok(r) => self.print_message(r),
                Err(e) => self.print_refused(*index, e),
            }
        }
        if page.next_anchor != 0 && !self.json {
            eprintln!(
                "(more: --anchor {}{})",
                page.next_anchor,
                if backward { " --backward" } else { "" }
            );
        }
        Ok(())
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
        let mut next = from.unwrap_or(0);
        let mut seen = 0u64;
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
            let mut stream = c.subscribe(&id, next).await?;
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = tokio::signal::ctrl_c() => break 'outer,
                };
                let stored = match item {
                    Some(Ok(m)) => m,
                    Some(Err(status))
                        if status.code() == tonic::Code::Unavailable
                            || status.code() == tonic::Code::Unauthenticated =>
                    {
                        // Server restart or token expiry: resume after the last index.
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
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
                next = stored.index + 1;
                match c.open_message(&stored).await {
                    Ok(r) => {
                        self.print_message(&r);
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
                    Err(e) => self.print_refused(stored.index, &e),
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break 'outer;
                }
            }
        }
        while backups.join_next().await.is_some() {}
        Ok(())
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
                Ok(r) => self.print_message(r),
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
                lines.join("\n")
            },
            || json!({"log_size": report.log_size, "cards": report.cards.iter().map(|a| json!({"card_id": a.card_id.to_string(), "device_name": a.device_name, "revoked": a.revoked, "origin": origin(a.origin), "log_index": a.log_index})).collect::<Vec<_>>()}),
        );
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
