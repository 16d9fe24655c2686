//! Membership: channels start from a signed creation and change only by
//! signed statements, which the server checks with the same rules as every
//! client (`tessera_card::channel::ChannelState::apply`) against the
//! signer's enrolled device, orders by compare-and-set on the chain's
//! length and head, stores and serves. The member records are the server's
//! view of the chain, kept with it in the same write.

use std::collections::BTreeMap;

use tessera_card::channel::{
    Change, ChannelError, ChannelState, MAX_CHAIN_PAGE_BYTES, MAX_CHAIN_PAGE_ENTRIES, Member,
    ParsedChannelStatement,
};
use tessera_proto::{
    channel::v1::SignedChannelStatement,
    server::v1::{ChainEntry, Channel as PbChannel, ChannelChain},
};
use tessera_service::{Caller, limits};

use super::{
    Channels, check_id, head_of, legacy, not_a_member, role_code, role_of, visibility_code,
    visibility_of,
};
use crate::{
    error::ServerError,
    signers::DeviceSigner,
    store::{ChannelRecord, MemberRecord, StatementChange},
};

impl Channels {
    /// Starts a channel from its signed creation (epoch 0), under the id
    /// the creation names. The same creation sent again (a retry) answers
    /// the channel it made.
    pub(crate) async fn create(
        &self,
        caller: &Caller,
        creation: Option<SignedChannelStatement>,
    ) -> Result<PbChannel, ServerError> {
        let creation =
            creation.ok_or_else(|| ServerError::InvalidArgument("creation is missing".into()))?;
        let parsed = ParsedChannelStatement::parse(creation)?;
        if !matches!(parsed.change(), Change::Create { .. }) {
            return Err(ServerError::InvalidArgument(
                "CreateChannel takes a creation (epoch 0); publish later statements with PublishChannelStatement"
                    .into(),
            ));
        }
        let signer = self.statement_signer(caller, &parsed).await?;
        let channel_id = parsed.channel_id();
        let _lock = self.channel_locks.of(channel_id).lock().await;
        if let Some(existing) = self.store.channel(channel_id).await? {
            if self.is_stored(&existing, &parsed).await? {
                return self.view_for(&existing, &caller.identity).await;
            }
            return Err(ServerError::AlreadyExists(format!(
                "channel {channel_id} exists: choose another id"
            )));
        }
        let mut state = ChannelState::empty(channel_id);
        apply(&mut state, &parsed, &signer)?;
        let members = state.members();
        if members.len() > self.limits.max_members_per_channel {
            return Err(ServerError::ResourceExhausted(format!(
                "{} members; the limit is {} members per channel",
                members.len(),
                self.limits.max_members_per_channel
            )));
        }
        for identity in members.keys() {
            self.check_account(identity).await?;
            self.check_room_for_channel(identity).await?;
        }
        let now = tessera_service::now_ms();
        let channel = ChannelRecord {
            channel_id: channel_id.to_owned(),
            name: state.name().to_owned(),
            creator: signer.identity.clone(),
            history_visibility: visibility_code(state.visibility()),
            created_at_ms: now,
            next_index: 1,
            chain_length: state.length(),
            chain_head: parsed.hash().to_vec(),
        };
        let change = StatementChange {
            put_members: members
                .iter()
                .map(|(identity, m)| new_member(identity, m, 1, now))
                .collect(),
            remove_members: Vec::new(),
            entry: entry(&parsed, now, 1),
            channel,
        };
        if !self
            .store
            .append_statement(channel_id, 0, &[], &change)
            .await?
        {
            return Err(ServerError::AlreadyExists(format!(
                "channel {channel_id} exists: choose another id"
            )));
        }
        self.store.flush().await?;
        tracing::info!(%channel_id, creator = %caller.identity, members = members.len(), "channel created");
        self.view_for(&change.channel, &caller.identity).await
    }

    /// Appends a signed statement to a channel's chain. The same statement
    /// sent again once stored (a retry) answers the channel as it is.
    pub(crate) async fn publish(
        &self,
        caller: &Caller,
        channel_id: &str,
        statement: Option<SignedChannelStatement>,
    ) -> Result<PbChannel, ServerError> {
        check_id("channel_id", channel_id)?;
        let statement =
            statement.ok_or_else(|| ServerError::InvalidArgument("statement is missing".into()))?;
        let parsed = ParsedChannelStatement::parse(statement)?;
        if parsed.channel_id() != channel_id {
            return Err(ServerError::InvalidArgument(format!(
                "the statement is for channel {}, not {channel_id}",
                parsed.channel_id()
            )));
        }
        if parsed.epoch() == 0 {
            return Err(ServerError::InvalidArgument(
                "a creation (epoch 0) starts a channel: send it with CreateChannel".into(),
            ));
        }
        let signer = self.statement_signer(caller, &parsed).await?;
        self.try_publish(caller, channel_id, &parsed, &signer).await
    }

    /// The rest of [`Self::publish`], under the channel's lock. Messages
    /// stored meanwhile by another replica sharing the database do not
    /// refuse the statement: the store places it after them, in the same
    /// atomic step that checks the chain ([`StatementChange::placed`]).
    ///
    /// [`StatementChange::placed`]: crate::store::StatementChange::placed
    async fn try_publish(
        &self,
        caller: &Caller,
        channel_id: &str,
        parsed: &ParsedChannelStatement,
        signer: &DeviceSigner,
    ) -> Result<PbChannel, ServerError> {
        // Held until the statement is stored (and announced): a message is
        // sent either before it or after it, at a known index.
        let _lock = self.channel_locks.of(channel_id).lock().await;
        // No send checks while the statement is stored; those checked
        // before may still wait for their batch (`send_batch`): stored
        // first, at the old epoch, so the statement's place (`next_index`)
        // is read after them.
        let _sends = self.send_gates.of(channel_id).write().await;
        self.send_batches.idle(channel_id).await;
        let channel = self.channel(channel_id).await?;
        if channel.chain_length == 0 {
            return Err(legacy(channel_id));
        }
        let records = self.store.members(channel_id).await?;
        let member = records.iter().any(|m| m.identity == caller.identity);
        if self.is_stored(&channel, parsed).await? {
            // Sent again (a retry): OK. Someone no longer a member (who
            // left with it, or replays an old statement of theirs) learns
            // only the chain's length, not the channel's name or members.
            return if member {
                self.view_for(&channel, &caller.identity).await
            } else {
                Ok(PbChannel {
                    channel_id: channel_id.to_owned(),
                    chain_length: channel.chain_length,
                    ..PbChannel::default()
                })
            };
        }
        if !member {
            return Err(not_a_member(&caller.identity, channel_id));
        }
        let mut state = resume(&channel, &records)?;
        let change = apply(&mut state, parsed, signer)?;
        if let Change::Add { identity, .. } = &change {
            self.check_account(identity).await?;
            limits::check_quota(
                "members per channel",
                records.len(),
                self.limits.max_members_per_channel,
            )?;
            self.check_room_for_channel(identity).await?;
        }
        // Clients refuse a chain whose times go back (a backdated statement),
        // so a clock stepped back must not date this one before the head.
        let head_time = self
            .store
            .chain(
                channel_id,
                channel.chain_length - 1,
                channel.chain_length,
                1,
                usize::MAX,
            )
            .await?
            .first()
            .map_or(0, |e| e.server_time_ms);
        let now = tessera_service::now_ms().max(head_time);
        let after = ChannelRecord {
            name: state.name().to_owned(),
            history_visibility: visibility_code(state.visibility()),
            chain_length: state.length(),
            chain_head: parsed.hash().to_vec(),
            ..channel.clone()
        };
        let (put_members, remove_members) =
            member_changes(&records, &state, channel.next_index, now);
        let stored = StatementChange {
            channel: after,
            entry: entry(parsed, now, channel.next_index),
            put_members,
            remove_members,
        };
        if !self
            .store
            .append_statement(
                channel_id,
                channel.chain_length,
                &channel.chain_head,
                &stored,
            )
            .await?
        {
            // Another statement took this epoch (on a replica sharing the
            // database, which has no lock in common with this one).
            return Err(ServerError::Aborted(
                "the channel's chain changed meanwhile: refetch it and sign again".into(),
            ));
        }
        self.store.flush().await?;
        self.hub
            .publish_chain(channel_id, stored.channel.chain_length);
        tracing::info!(%channel_id, epoch = parsed.epoch(), by = %caller.identity, change = change_name(&change), "membership statement accepted");
        // As stored: its place may be past the `next_index` read above.
        let now_stored = self.store.channel(channel_id).await?;
        self.view_for(
            now_stored.as_ref().unwrap_or(&stored.channel),
            &caller.identity,
        )
        .await
    }

    /// The chain's statements from `from_epoch` on, for a current member.
    pub(crate) async fn chain(
        &self,
        caller: &Caller,
        channel_id: &str,
        from_epoch: u64,
    ) -> Result<ChannelChain, ServerError> {
        let (channel, _) = self.membership(channel_id, &caller.identity).await?;
        if from_epoch > channel.chain_length {
            return Err(ServerError::InvalidArgument(format!(
                "from_epoch {from_epoch} is beyond the chain's {} statements",
                channel.chain_length
            )));
        }
        Ok(ChannelChain {
            channel_id: channel_id.to_owned(),
            length: channel.chain_length,
            entries: self
                .store
                .chain(
                    channel_id,
                    from_epoch,
                    channel.chain_length,
                    MAX_CHAIN_PAGE_ENTRIES,
                    MAX_CHAIN_PAGE_BYTES,
                )
                .await?,
        })
    }

    /// The channel as the caller, a member, sees it.
    pub(crate) async fn get(
        &self,
        caller: &Caller,
        channel_id: &str,
    ) -> Result<PbChannel, ServerError> {
        let (channel, me) = self.membership(channel_id, &caller.identity).await?;
        self.view(&channel, Some(&me), true).await
    }

    /// The channel as `identity` sees it (for the organisation's backup
    /// service), or `PERMISSION_DENIED` when `identity` is not a member.
    pub(crate) async fn member_view(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<PbChannel, ServerError> {
        limits::identity("identity", identity)?;
        let (channel, member) = self.membership(channel_id, identity).await?;
        self.view(&channel, Some(&member), true).await
    }

    /// The caller's channels, without their members.
    pub(crate) async fn list(&self, caller: &Caller) -> Result<Vec<PbChannel>, ServerError> {
        let mut channels = Vec::new();
        for id in self.store.channels_of(&caller.identity).await? {
            if let (Some(channel), Some(me)) = (
                self.store.channel(&id).await?,
                self.store.member(&id, &caller.identity).await?,
            ) {
                channels.push(self.view(&channel, Some(&me), false).await?);
            }
        }
        Ok(channels)
    }

    /// The device that signed `statement`, if it may sign for the caller.
    async fn statement_signer(
        &self,
        caller: &Caller,
        statement: &ParsedChannelStatement,
    ) -> Result<DeviceSigner, ServerError> {
        self.signers
            .signer(caller, statement.signer_identity(), statement.signer())
            .await
    }

    /// Whether this exact statement (bytes and signature) is stored at its
    /// epoch already: it was accepted before and is sent again.
    async fn is_stored(
        &self,
        channel: &ChannelRecord,
        statement: &ParsedChannelStatement,
    ) -> Result<bool, ServerError> {
        let epoch = statement.epoch();
        if epoch >= channel.chain_length {
            return Ok(false);
        }
        let stored = self
            .store
            .chain(&channel.channel_id, epoch, epoch + 1, 1, usize::MAX)
            .await?;
        Ok(stored
            .first()
            .and_then(|e| e.statement.as_ref())
            .is_some_and(|s| s == statement.signed()))
    }

    /// `NOT_FOUND` unless `identity` has an account.
    async fn check_account(&self, identity: &str) -> Result<(), ServerError> {
        if self.store.account(identity).await?.is_none() {
            return Err(ServerError::NotFound(format!("no user {identity:?}")));
        }
        Ok(())
    }
}

/// Applies `statement` to `state` with its signer's key, as every client
/// does. A member named by a removal or role change who is not there is
/// the channel's state, not the signer's fault: `FAILED_PRECONDITION`.
fn apply(
    state: &mut ChannelState,
    statement: &ParsedChannelStatement,
    signer: &DeviceSigner,
) -> Result<Change, ServerError> {
    state
        .apply(statement, &signer.statement_signer())
        .map_err(|e| match e {
            ChannelError::NotAMember(who) if who != signer.identity => {
                ServerError::FailedPrecondition(format!("{who} is not a member of the channel"))
            }
            other => ServerError::Statement(other),
        })
}

/// The state the stored records describe, to check the next statement
/// against.
fn resume(channel: &ChannelRecord, records: &[MemberRecord]) -> Result<ChannelState, ServerError> {
    let mut members = BTreeMap::new();
    for m in records {
        members.insert(
            m.identity.clone(),
            Member {
                role: role_of(m.role)?,
                added_at: m.added_at_epoch,
                added_by: m.added_by.clone(),
            },
        );
    }
    Ok(ChannelState::resume(
        &channel.channel_id,
        channel.chain_length,
        head_of(channel)?,
        &channel.name,
        visibility_of(channel.history_visibility)?,
        members,
    ))
}

/// The member records to write and remove for `state`, the chain after a
/// statement accepted when the channel's next message index was
/// `next_index`: a new member sees from that index on (with `joined`
/// visibility); one whose role changed keeps the rest of its record.
fn member_changes(
    before: &[MemberRecord],
    state: &ChannelState,
    next_index: u64,
    now: i64,
) -> (Vec<MemberRecord>, Vec<String>) {
    let before: BTreeMap<&str, &MemberRecord> =
        before.iter().map(|m| (m.identity.as_str(), m)).collect();
    let mut put = Vec::new();
    for (identity, member) in state.members() {
        match before.get(identity.as_str()) {
            None => put.push(new_member(identity, member, next_index, now)),
            Some(record) if record.role != role_code(member.role) => put.push(MemberRecord {
                role: role_code(member.role),
                ..(*record).clone()
            }),
            Some(_) => {}
        }
    }
    let removed = before
        .keys()
        .filter(|identity| state.member(identity).is_none())
        .map(|identity| (*identity).to_owned())
        .collect();
    (put, removed)
}

fn new_member(identity: &str, member: &Member, next_index: u64, now: i64) -> MemberRecord {
    MemberRecord {
        identity: identity.to_owned(),
        role: role_code(member.role),
        joined_at_index: next_index,
        joined_at_ms: now,
        added_at_epoch: member.added_at,
        added_by: member.added_by.clone(),
    }
}

fn entry(statement: &ParsedChannelStatement, now: i64, next_index: u64) -> ChainEntry {
    ChainEntry {
        statement: Some(statement.signed().clone()),
        server_time_ms: now,
        next_index,
    }
}

fn change_name(change: &Change) -> &'static str {
    match change {
        Change::Create { .. } => "create",
        Change::Add { .. } => "add",
        Change::Remove { .. } => "remove",
        Change::SetRole { .. } => "set_role",
        Change::SetVisibility(_) => "set_visibility",
        Change::Rename(_) => "rename",
        Change::Leave => "leave",
    }
}
