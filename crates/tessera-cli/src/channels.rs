//! The `channel` commands, and how verified membership changes are shown
//! among messages.

use serde_json::{Value, json};
use tessera_client::{
    Change, ChannelView, Client, ClientError, MembershipChange, Role, Visibility,
};

use crate::{
    cli::{ChannelCommand, RetentionArg, RoleArg, Visibility as VisibilityArg},
    commands::Ctx,
    error::CliError,
};

fn visibility(v: VisibilityArg) -> Visibility {
    match v {
        VisibilityArg::Shared => Visibility::Shared,
        VisibilityArg::Joined => Visibility::Joined,
    }
}

/// A channel's verified membership, for people and as JSON.
fn show(view: &ChannelView) -> (String, Value) {
    let served = &view.served;
    let state = &view.verified.state;
    if view.verified.is_legacy() {
        let members: Vec<&str> = served.members.iter().map(|m| m.identity.as_str()).collect();
        let text = format!(
            "{}  {}  ({} messages)\n  made before signed membership (protocol v2): its members are the app server's word, unverified: {}\n  it takes no new message; create a new channel",
            served.channel_id,
            served.name,
            served.next_index.saturating_sub(1),
            members.join(", ")
        );
        let value = json!({"channel_id": served.channel_id, "name": served.name, "legacy": true, "unverified_members": members, "messages": served.next_index.saturating_sub(1)});
        return (text, value);
    }
    let mut text = format!(
        "{}  {}  ({} history, {} messages)\n  epoch {} (head {})",
        served.channel_id,
        state.name(),
        state.visibility(),
        served.next_index.saturating_sub(1),
        state.epoch().unwrap_or(0),
        state
            .head()
            .map(|h| hex::encode(&h[..8]))
            .unwrap_or_default(),
    );
    let names: Vec<&str> = state.members().keys().map(String::as_str).collect();
    text.push_str(&format!("\n  members: {}", names.join(", ")));
    let mut members = Vec::new();
    for (identity, m) in state.members() {
        let role = if m.role == Role::Admin {
            " (admin)"
        } else {
            ""
        };
        text.push_str(&format!(
            "\n  {identity}{role}: added by {} at epoch {}",
            m.added_by, m.added_at
        ));
        members.push(json!({"identity": identity, "role": m.role.to_string(), "added_by": m.added_by, "added_at_epoch": m.added_at}));
    }
    for ghost in &view.unverified_members {
        text.push_str(&format!(
            "\n  !!! the app server lists {ghost} as a member, but no member added them: not a member, never encrypted to"
        ));
    }
    for omitted in &view.omitted_members {
        text.push_str(&format!(
            "\n  warning: the app server's list leaves out {omitted}, a member by the signed chain"
        ));
    }
    let value = json!({
        "channel_id": served.channel_id,
        "name": state.name(),
        "visibility": state.visibility().to_string(),
        "epoch": state.epoch(),
        "head": state.head().map(hex::encode),
        "members": members,
        "unverified_members": view.unverified_members,
        "omitted_members": view.omitted_members,
        "messages": served.next_index.saturating_sub(1),
        "visible_from_index": served.visible_from_index,
    });
    (text, value)
}

impl Ctx {
    /// Prints verified membership changes (as they would appear among the
    /// messages).
    /// A change signed by someone whose identity was reset since this user
    /// last verified them is flagged, as their messages are.
    pub(crate) fn print_changes(&self, client: &Client, changes: &[MembershipChange]) {
        for c in changes {
            let reset = client.unacknowledged_reset(&c.by).unwrap_or(false);
            if reset && !self.json {
                eprintln!(
                    "warning: {} RESET their identity and you have not verified them since: check this change before you trust it (tessera verify {})",
                    c.by, c.by
                );
            }
            self.out(
                || format!("-- epoch {}: {c} (verified)", c.epoch),
                || json!({"membership_change": c.to_string(), "channel_id": c.channel_id, "epoch": c.epoch, "by": c.by, "by_card_id": c.by_card.to_string(), "verified": true, "signer_reset_unverified": reset}),
            );
        }
    }

    /// Warns about a server list that differs from the chain.
    fn warn_served(&self, view: &ChannelView) {
        if self.json {
            return;
        }
        for ghost in &view.unverified_members {
            eprintln!(
                "warning: the app server lists {ghost} as a member of {}, but no member added them: ignored (not encrypted to)",
                view.served.channel_id
            );
        }
    }

    pub(crate) async fn channel(&self, cmd: ChannelCommand) -> Result<(), CliError> {
        let c = self.open()?;
        let change = |id: String, change: Change| (id, change);
        let (id, change) = match cmd {
            ChannelCommand::Create {
                name,
                members,
                visibility: v,
            } => {
                let view = c.create_channel(&name, visibility(v), &members).await?;
                let (t, v) = show(&view);
                self.out(|| t, || v);
                return Ok(());
            }
            ChannelCommand::List => {
                let all: Vec<(String, Value)> = c
                    .channels()
                    .await?
                    .iter()
                    .map(|ch| {
                        (
                            format!(
                                "{}  {}  ({} messages)",
                                ch.channel_id,
                                ch.name,
                                ch.next_index.saturating_sub(1)
                            ),
                            json!({"channel_id": ch.channel_id, "name": ch.name, "messages": ch.next_index.saturating_sub(1), "chain_length": ch.chain_length}),
                        )
                    })
                    .collect();
                self.out(
                    || {
                        all.iter()
                            .map(|(t, _)| t.clone())
                            .collect::<Vec<_>>()
                            .join("\n")
                    },
                    || json!(all.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()),
                );
                return Ok(());
            }
            ChannelCommand::Show { channel } => {
                let id = self.channel_id(&c, &channel).await?;
                let view = c.channel(&id).await?;
                self.warn_served(&view);
                let (t, v) = show(&view);
                self.out(|| t, || v);
                return Ok(());
            }
            ChannelCommand::Keys { channel, retention } => {
                let id = self.channel_id(&c, &channel).await?;
                let on = matches!(retention, RetentionArg::ForwardSecret);
                c.set_forward_secret(&id, on)?;
                self.out(
                    || {
                        if on {
                            format!("{id}: message keys are wiped once used (forward secrecy); history already read cannot be opened again on this device")
                        } else {
                            format!("{id}: message keys are kept, history can be re-read from the app server")
                        }
                    },
                    || json!({"channel_id": id, "forward_secret": on}),
                );
                return Ok(());
            }
            ChannelCommand::Add {
                channel,
                identity,
                admin,
            } => change(
                self.channel_id(&c, &channel).await?,
                Change::Add {
                    identity,
                    role: if admin { Role::Admin } else { Role::Member },
                },
            ),
            ChannelCommand::Remove { channel, identity } => {
                if identity == c.identity() {
                    return Err(CliError::Usage(format!(
                        "to remove yourself, leave: tessera channel leave {channel}"
                    )));
                }
                change(
                    self.channel_id(&c, &channel).await?,
                    Change::Remove { identity },
                )
            }
            ChannelCommand::Leave { channel } => {
                change(self.channel_id(&c, &channel).await?, Change::Leave)
            }
            ChannelCommand::Role {
                channel,
                identity,
                role,
            } => change(
                self.channel_id(&c, &channel).await?,
                Change::SetRole {
                    identity,
                    role: match role {
                        RoleArg::Member => Role::Member,
                        RoleArg::Admin => Role::Admin,
                    },
                },
            ),
            ChannelCommand::Rename { channel, name } => {
                change(self.channel_id(&c, &channel).await?, Change::Rename(name))
            }
            ChannelCommand::Visibility {
                channel,
                visibility: v,
            } => change(
                self.channel_id(&c, &channel).await?,
                Change::SetVisibility(visibility(v)),
            ),
        };
        let made = c.change_channel(&id, change).await?;
        self.print_changes(&c, std::slice::from_ref(&made));
        Ok(())
    }

    /// Prints the verified membership changes the app server placed among
    /// messages `from_index..to_index` (a change accepted between messages
    /// i - 1 and i is placed before message i: only its place is the app
    /// server's word).
    pub(crate) fn print_changes_placed(
        &self,
        c: &Client,
        channel_id: &str,
        from_index: u64,
        to_index: u64,
    ) -> Result<(), ClientError> {
        let changes: Vec<MembershipChange> = c
            .membership_changes(channel_id, 0, u64::MAX)?
            .into_iter()
            .filter(|m| (from_index..to_index).contains(&m.next_index))
            .collect();
        self.print_changes(c, &changes);
        Ok(())
    }
}
