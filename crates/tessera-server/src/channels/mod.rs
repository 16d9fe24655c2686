//! Channels, the app server's domain layer for them: membership chains
//! (`membership`), the ordered message index and read horizons
//! (`messages`), sender-key copies (`sender_keys`), live subscriptions (`subscription`, over the `hub`'s
//! broadcast), encrypted attachments (`attachments`); and the gRPC edge
//! (`service`), which only authenticates, calls [`Channels`] and turns a
//! [`ServerError`] into a status. Everything here is ciphertext and
//! metadata; the server cannot read a message, and cannot make a membership
//! statement, only check, order, store and serve them.

mod attachments;
mod hub;
mod membership;
mod messages;
mod send_batch;
mod sender_keys;
mod service;
mod subscription;
#[cfg(test)]
mod tests;

use std::{path::PathBuf, sync::Arc};

use tessera_card::{
    channel::{Role, Visibility},
    transparency::Hash,
};
use tessera_proto::server::v1::{Channel as PbChannel, HistoryVisibility, Member, MemberRole};
use tessera_service::limits;
use tokio::sync::watch;

pub(crate) use service::ChannelsService;

use crate::{
    Gates, Limits, Locks,
    error::ServerError,
    quota,
    signers::SignerKeys,
    store::{Announced, ChannelRecord, MemberRecord, Store},
};

/// The channels of one app server.
pub(crate) struct Channels {
    store: Arc<dyn Store>,
    limits: Limits,
    signers: SignerKeys,
    hub: Arc<hub::Hub>,
    /// The sends waiting for their channel's next batch (group commit).
    send_batches: Arc<send_batch::SendBatches>,
    /// Orders what happens in one channel: statements and sends (each
    /// message's index, each statement's place among the messages).
    channel_locks: Locks,
    /// Sends check a channel under its gate shared, so they check in
    /// parallel; a statement takes it exclusive (after the channel's lock)
    /// and waits for the batches in flight, so the statement's place is
    /// read after every send checked at the old epoch.
    send_gates: Gates,
    /// Per user, shared with the rest of the server: quotas and read
    /// horizons are updated under it (taken after a channel's lock).
    user_locks: Arc<Locks>,
    subscriptions: quota::Subscriptions,
    uploads: quota::Uploads,
    attachments_dir: PathBuf,
    closing: watch::Receiver<bool>,
}

impl Channels {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        limits: Limits,
        signers: SignerKeys,
        user_locks: Arc<Locks>,
        attachments_dir: PathBuf,
        closing: watch::Receiver<bool>,
    ) -> Self {
        let hub = Arc::new(hub::Hub::new(limits.live_buffer_messages, store.clone()));
        let send_batches = Arc::new(send_batch::SendBatches::new(
            store.clone(),
            hub.clone(),
            user_locks.clone(),
            limits.max_send_batch,
        ));
        Self {
            hub,
            send_batches,
            subscriptions: quota::Subscriptions::new(
                limits.max_subscriptions_per_user,
                limits.max_subscriptions,
            ),
            uploads: quota::Uploads::new(limits.max_uploads_per_user),
            channel_locks: Locks::new(),
            send_gates: Gates::new(),
            store,
            limits,
            signers,
            user_locks,
            attachments_dir,
            closing,
        }
    }

    /// Hands what the database announced (a replica stored it, this one
    /// included) to this process's subscribers.
    pub(crate) fn announced(&self, announced: Announced) {
        match announced {
            Announced::Message { channel_id, index } => {
                self.hub.announced_index(&channel_id, index);
            }
            Announced::Chain { channel_id, length } => self.hub.publish_chain(&channel_id, length),
            Announced::Missed => self.hub.wake_all(),
        }
    }

    /// The channel, or `NOT_FOUND`.
    pub(crate) async fn channel(&self, channel_id: &str) -> Result<ChannelRecord, ServerError> {
        check_id("channel_id", channel_id)?;
        self.store
            .channel(channel_id)
            .await?
            .ok_or_else(|| ServerError::NotFound(format!("no channel {channel_id}")))
    }

    /// The channel and `identity`'s membership: `NOT_FOUND` for no channel,
    /// `PERMISSION_DENIED` for a non-member.
    /// `PERMISSION_DENIED` unless `identity` is a member now: checked again
    /// under the channel's lock, where a statement accepted since may have
    /// removed it.
    pub(crate) async fn still_a_member(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<(), ServerError> {
        if self.store.member(channel_id, identity).await?.is_none() {
            return Err(not_a_member(identity, channel_id));
        }
        Ok(())
    }

    pub(crate) async fn membership(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<(ChannelRecord, MemberRecord), ServerError> {
        let channel = self.channel(channel_id).await?;
        let member = self
            .store
            .member(channel_id, identity)
            .await?
            .ok_or_else(|| not_a_member(identity, channel_id))?;
        Ok((channel, member))
    }

    /// The channel as `me` sees it (members only `with_members`; none and
    /// nothing visible for someone who is not a member any more).
    async fn view(
        &self,
        channel: &ChannelRecord,
        me: Option<&MemberRecord>,
        with_members: bool,
    ) -> Result<PbChannel, ServerError> {
        let members = if with_members && me.is_some() {
            self.store
                .members(&channel.channel_id)
                .await?
                .into_iter()
                .map(|m| Member {
                    identity: m.identity,
                    role: m.role,
                    joined_at_index: m.joined_at_index,
                    joined_at_ms: m.joined_at_ms,
                    added_at_epoch: m.added_at_epoch,
                    added_by: m.added_by,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(PbChannel {
            channel_id: channel.channel_id.clone(),
            name: channel.name.clone(),
            creator: channel.creator.clone(),
            history_visibility: channel.history_visibility,
            created_at_ms: channel.created_at_ms,
            members,
            next_index: channel.next_index,
            visible_from_index: me.map_or(0, |me| visible_from(channel, me)),
            chain_length: channel.chain_length,
            chain_head: channel.chain_head.clone(),
        })
    }

    /// The channel as `identity` sees it now, members included.
    async fn view_for(
        &self,
        channel: &ChannelRecord,
        identity: &str,
    ) -> Result<PbChannel, ServerError> {
        let me = self.store.member(&channel.channel_id, identity).await?;
        self.view(channel, me.as_ref(), true).await
    }

    /// `RESOURCE_EXHAUSTED` when `identity` is in as many channels as a
    /// user may be.
    async fn check_room_for_channel(&self, identity: &str) -> Result<(), ServerError> {
        let count = self.store.channels_of(identity).await?.len();
        Ok(limits::check_quota(
            &format!("channels for {identity}"),
            count,
            self.limits.max_channels_per_user,
        )?)
    }
}

fn not_a_member(identity: &str, channel_id: &str) -> ServerError {
    ServerError::PermissionDenied(format!(
        "{identity} is not a member of channel {channel_id}"
    ))
}

/// `FAILED_PRECONDITION` for a channel made before protocol v2: it takes
/// no statement and no message.
fn legacy(channel_id: &str) -> ServerError {
    ServerError::FailedPrecondition(format!(
        "channel {channel_id} was made before signed membership; its history stays readable: create a new channel"
    ))
}

/// Channel and attachment ids are 32 lowercase hex digits.
fn check_id(field: &str, id: &str) -> Result<(), ServerError> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ServerError::InvalidArgument(format!(
            "{field} must be 32 lowercase hex digits"
        )));
    }
    Ok(())
}

/// The first index `member` may read.
pub(crate) fn visible_from(channel: &ChannelRecord, member: &MemberRecord) -> u64 {
    if channel.history_visibility == HistoryVisibility::Joined as i32 {
        member.joined_at_index.max(1)
    } else {
        1
    }
}

/// How records store a role and a visibility (the app server's enums,
/// numbered like the statements').
fn role_code(role: Role) -> i32 {
    match role {
        Role::Member => MemberRole::Member as i32,
        Role::Admin => MemberRole::Admin as i32,
    }
}

fn role_of(code: i32) -> Result<Role, ServerError> {
    match MemberRole::try_from(code) {
        Ok(MemberRole::Member) => Ok(Role::Member),
        Ok(MemberRole::Admin) => Ok(Role::Admin),
        _ => Err(ServerError::Internal("a stored member has no role")),
    }
}

fn visibility_code(visibility: Visibility) -> i32 {
    match visibility {
        Visibility::Shared => HistoryVisibility::Shared as i32,
        Visibility::Joined => HistoryVisibility::Joined as i32,
    }
}

fn visibility_of(code: i32) -> Result<Visibility, ServerError> {
    match HistoryVisibility::try_from(code) {
        Ok(HistoryVisibility::Shared) => Ok(Visibility::Shared),
        Ok(HistoryVisibility::Joined) => Ok(Visibility::Joined),
        _ => Err(ServerError::Internal("a stored channel has no visibility")),
    }
}

fn head_of(channel: &ChannelRecord) -> Result<Hash, ServerError> {
    channel
        .chain_head
        .as_slice()
        .try_into()
        .map_err(|_| ServerError::Internal("a stored chain head is not 32 bytes"))
}

/// How often a write charging a user's usage reads it again when it
/// changed between its read and the compare-and-set (on PostgreSQL the
/// user's own batches of sends and other replicas charge it unlocked).
const USAGE_ATTEMPTS: usize = 16;

impl Channels {
    /// Charges `identity`'s usage, read as `usage`, for a write: `charge`
    /// computes the change (or refuses it, over quota), and `write` stores
    /// the record with that compare-and-set; when the usage moved meanwhile
    /// (`write` answers false, nothing written), reads it again, up to
    /// [`USAGE_ATTEMPTS`] times.
    async fn charge_usage<W, F>(
        &self,
        identity: &str,
        mut usage: crate::store::Usage,
        charge: impl Fn(crate::store::Usage) -> Result<crate::store::UsageChange, ServerError>,
        mut write: W,
    ) -> Result<(), ServerError>
    where
        W: FnMut(crate::store::UsageChange) -> F,
        F: Future<Output = Result<bool, tessera_service::storage::StorageError>>,
    {
        for _ in 0..USAGE_ATTEMPTS {
            if write(charge(usage)?).await? {
                return Ok(());
            }
            usage = self.store.usage(identity).await?;
        }
        Err(moved(identity))
    }
}

/// What a write answers when the caller's usage kept changing between its
/// read and the write, [`USAGE_ATTEMPTS`] times (nothing was written).
fn moved(identity: &str) -> ServerError {
    ServerError::Aborted(format!(
        "the usage of {identity} kept changing while this was stored (other writes of the same user); try again"
    ))
}
