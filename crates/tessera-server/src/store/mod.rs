//! The app server's storage: an async trait naming no backend's types, and
//! three backends, one file each: `sled` (the embedded default), `postgres`
//! (several machines; the database makes each change atomic, and `listen`
//! carries its announcements between replicas) and `memory` (unit tests). Every acknowledged write is flushed by the caller
//! (`Store::flush`) before it answers; on sled concurrent callers share
//! flushes (group commit, see [`SledStore`]), and concurrent sends to one
//! channel are stored as one batch ([`Store::append_messages`]) on every
//! backend. The shared behaviour every
//! backend must show is [`conformance::exercise`].

mod listen;
mod memory;
mod postgres;
mod sled;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    pin::Pin,
};

use prost::Message;
use tessera_proto::server::v1::{ChainEntry, StoredMessage};
use tessera_service::storage::{FlushFuture, StorageError};

#[cfg(test)]
pub(crate) use self::memory::Sabotage;
pub use self::{
    listen::{Announced, Listening, listen},
    memory::MemoryStore,
    postgres::{PgOpenError, PgOptions, PgStore},
    sled::SledStore,
};

/// What a store's methods return: boxed, so `Arc<dyn Store>` works.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StorageError>> + Send + 'a>>;

/// Argon2id password hash with its parameters.
#[derive(Clone, PartialEq, Message)]
pub struct PasswordHash {
    #[prost(uint32, tag = "1")]
    pub m_cost_kib: u32,
    #[prost(uint32, tag = "2")]
    pub t_cost: u32,
    #[prost(uint32, tag = "3")]
    pub p_cost: u32,
    #[prost(bytes = "vec", tag = "4")]
    pub salt: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub hash: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Account {
    #[prost(string, tag = "1")]
    pub identity: String,
    #[prost(message, optional, tag = "2")]
    pub password: Option<PasswordHash>,
    #[prost(int64, tag = "3")]
    pub created_at: i64,
    /// Made by the operator (`tessera-server create-admin`), never by a
    /// sign-up: the account's tokens carry the ADMIN role.
    #[prost(bool, tag = "4")]
    pub admin: bool,
    /// The app server co-signed this account's device list GENESIS: a
    /// second one is never co-signed (only a RESET replaces the list).
    #[prost(bool, tag = "5")]
    pub device_list_started: bool,
}

/// Device status as the server knows it (the key service is the authority
/// for clients; this is what the server checks senders against).
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum DeviceStatus {
    Unspecified = 0,
    Active = 1,
    Revoked = 2,
    Superseded = 3,
}

#[derive(Clone, PartialEq, Message)]
pub struct Device {
    #[prost(bytes = "vec", tag = "1")]
    pub card_id: Vec<u8>,
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(string, tag = "3")]
    pub device_name: String,
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(enumeration = "DeviceStatus", tag = "5")]
    pub status: i32,
    /// The kind of card: client devices, or the organisation's card.
    #[prost(bool, tag = "6")]
    pub org_card: bool,
    /// The card's Ed25519 signing key (32 bytes), which channel statements
    /// are checked against. Empty in records written before it was kept:
    /// then taken once from the card at the key service.
    #[prost(bytes = "vec", tag = "7")]
    pub signing_public_key: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ChannelRecord {
    #[prost(string, tag = "1")]
    pub channel_id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub creator: String,
    #[prost(int32, tag = "4")]
    pub history_visibility: i32,
    #[prost(int64, tag = "5")]
    pub created_at_ms: i64,
    /// Index the next message gets (messages are numbered from 1).
    #[prost(uint64, tag = "6")]
    pub next_index: u64,
    /// Statements in the membership chain; 0 for a channel made before
    /// protocol v2 (readable, but it takes no statement and no message).
    #[prost(uint64, tag = "7")]
    pub chain_length: u64,
    /// Statement hash of the chain's last statement (32 bytes; empty when
    /// `chain_length` is 0).
    #[prost(bytes = "vec", tag = "8")]
    pub chain_head: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct MemberRecord {
    #[prost(string, tag = "1")]
    pub identity: String,
    #[prost(int32, tag = "2")]
    pub role: i32,
    #[prost(uint64, tag = "3")]
    pub joined_at_index: u64,
    #[prost(int64, tag = "4")]
    pub joined_at_ms: i64,
    /// The epoch whose statement added the member (last time), and its
    /// signer.
    #[prost(uint64, tag = "5")]
    pub added_at_epoch: u64,
    #[prost(string, tag = "6")]
    pub added_by: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttachmentRecord {
    #[prost(string, tag = "1")]
    pub attachment_id: String,
    #[prost(string, tag = "2")]
    pub channel_id: String,
    #[prost(uint64, tag = "3")]
    pub size: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub sha256: Vec<u8>,
    #[prost(string, tag = "5")]
    pub uploader: String,
    #[prost(int64, tag = "6")]
    pub created_at_ms: i64,
    /// The channel's next index when the upload finished: members who
    /// cannot see a message stored then cannot download it (0 in records
    /// written before this field: treated as 1).
    #[prost(uint64, tag = "7")]
    pub uploaded_at_index: u64,
}

/// One sender-key chain of a channel (docs/protocol.md section 15), kept
/// per (channel, sender card, chain id): fixed by the first put of its
/// copies.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SenderKeyChain {
    /// The membership epoch the chain was stored at.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// Every recipient device (32 bytes each), sorted ascending.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub recipient_card_ids: Vec<Vec<u8>>,
    /// When the chain's first copies were stored.
    #[prost(int64, tag = "3")]
    pub server_time_ms: i64,
}

/// Copies of one sender-key chain, stored atomically by
/// [`Store::put_sender_keys`].
pub struct SenderKeysPut {
    pub channel_id: String,
    /// The sending device (32 bytes).
    pub sender_card_id: Vec<u8>,
    /// 16 bytes.
    pub chain_id: Vec<u8>,
    /// The chain's record: new on the first put, the stored one again on a
    /// later put.
    pub chain: SenderKeyChain,
    /// `(recipient card id, encoded SenderKeyDistribution)`; a copy already
    /// stored for that recipient is replaced.
    pub copies: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whose usage `usage` is (the sender's owner).
    pub sender_identity: String,
}

/// What one user stores, counted against the per-user quotas.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct Usage {
    /// Stored message records (envelopes and their metadata), in bytes.
    #[prost(uint64, tag = "1")]
    pub message_bytes: u64,
    #[prost(uint64, tag = "2")]
    pub attachment_bytes: u64,
    #[prost(uint64, tag = "3")]
    pub attachments: u64,
}

/// A user's usage as the caller read it, and what a write makes it: the
/// write happens only if the stored usage is still `before` (a
/// compare-and-set, so replicas sharing a database cannot both spend the
/// same quota).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageChange {
    pub before: Usage,
    pub after: Usage,
}

/// A send waiting in a batch for [`Store::append_messages`]: its sender's
/// checks (membership, epoch, sender key) were made with the channel's
/// chain at `chain_length` statements; the store gives it its index.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingMessage {
    /// Statements in the channel's chain when the sender's checks were
    /// made: a statement accepted since moves it, and the checks are void.
    pub chain_length: u64,
    /// The message (its channel, sender and client message id); `index` is
    /// ignored: the store assigns the channel's next one.
    pub message: StoredMessage,
    /// The sender's quota of stored message bytes ([`Usage::message_bytes`]
    /// after the message may not exceed it).
    pub max_message_bytes: u64,
}

/// What [`Store::append_messages`] did with one message of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Stored at this index.
    Stored(u64),
    /// A message with this client message id is stored already (or earlier
    /// in the same batch), at this index: nothing written for this one.
    Duplicate(u64),
    /// The channel's chain moved since the sender's checks (or the channel
    /// is gone): nothing written; check again and retry.
    Moved,
    /// The message would take its sender past `max_message_bytes`:
    /// nothing written for this one.
    OverQuota,
}

/// What a batch writes, as [`plan_batch`] decides it.
#[derive(Debug, Default)]
pub(crate) struct BatchPlan {
    /// One per message of the batch, in its order.
    pub outcomes: Vec<BatchOutcome>,
    /// The messages to store, their indices set, in the batch's order.
    pub messages: Vec<StoredMessage>,
    /// The new records of the channels a message was stored in.
    pub channels: BTreeMap<String, ChannelRecord>,
    /// The new usage of the senders of the stored messages.
    pub usage: BTreeMap<String, Usage>,
}

/// The decision every backend makes for a batch, from what it read under
/// its locks (or in its transaction): `channels` as stored (absent: no such
/// channel), `stored_ids` the client message ids already stored (channel,
/// id) with their indices, `usage` each sender's stored usage (absent:
/// none). Each message in order: a duplicate id (stored, or earlier in the
/// batch) answers its index; a moved chain answers `Moved`; a message past
/// its sender's quota is refused alone; else it gets its channel's next
/// index and is charged. One message's refusal never changes another's
/// outcome but for what a stored message takes (its index, its bytes).
pub(crate) fn plan_batch(
    batch: &[PendingMessage],
    mut channels: BTreeMap<String, ChannelRecord>,
    mut stored_ids: BTreeMap<(String, Vec<u8>), u64>,
    mut usage: BTreeMap<String, Usage>,
) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut changed_usage = BTreeSet::new();
    for p in batch {
        let id = &p.message.channel_id;
        let dedupe = (id.clone(), p.message.client_message_id.clone());
        if let Some(&index) = stored_ids.get(&dedupe) {
            plan.outcomes.push(BatchOutcome::Duplicate(index));
            continue;
        }
        let Some(channel) = channels
            .get_mut(id)
            .filter(|c| c.chain_length == p.chain_length)
        else {
            plan.outcomes.push(BatchOutcome::Moved);
            continue;
        };
        let mut message = p.message.clone();
        message.index = channel.next_index;
        let used = usage.entry(message.sender_identity.clone()).or_default();
        let after = used
            .message_bytes
            .saturating_add(message.encoded_len() as u64);
        if after > p.max_message_bytes {
            plan.outcomes.push(BatchOutcome::OverQuota);
            continue;
        }
        used.message_bytes = after;
        channel.next_index += 1;
        plan.channels.insert(id.clone(), channel.clone());
        changed_usage.insert(message.sender_identity.clone());
        stored_ids.insert(dedupe, message.index);
        plan.outcomes.push(BatchOutcome::Stored(message.index));
        plan.messages.push(message);
    }
    plan.usage = usage
        .into_iter()
        .filter(|(identity, _)| changed_usage.contains(identity))
        .collect();
    plan
}

/// The distinct channels and senders of a batch, each sorted: the order in
/// which stores that lock rows lock them.
pub(crate) fn batch_keys(batch: &[PendingMessage]) -> (Vec<String>, Vec<String>) {
    let channels: BTreeSet<&str> = batch
        .iter()
        .map(|p| p.message.channel_id.as_str())
        .collect();
    let senders: BTreeSet<&str> = batch
        .iter()
        .map(|p| p.message.sender_identity.as_str())
        .collect();
    (
        channels.into_iter().map(str::to_owned).collect(),
        senders.into_iter().map(str::to_owned).collect(),
    )
}

/// How many of `stored` are active, `device` itself not counted (enrolling
/// a card again does not count it twice).
pub(crate) fn active_besides(stored: &[Device], device: &Device) -> usize {
    stored
        .iter()
        .filter(|d| d.status == DeviceStatus::Active as i32 && d.card_id != device.card_id)
        .count()
}

/// Takes records from `items` (each with its encoded size) while they fit
/// in `limit` records and `max_bytes`, the first always.
pub(crate) fn take_bounded<T, E>(
    items: impl Iterator<Item = Result<(usize, T), E>>,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<T>, E> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for item in items.take(limit) {
        let (size, message) = item?;
        if !out.is_empty() && bytes.saturating_add(size) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(size);
        out.push(message);
    }
    Ok(out)
}

/// A statement accepted into a channel's chain and what it changes,
/// stored atomically by [`Store::append_statement`].
pub struct StatementChange {
    /// The channel afterwards (its `chain_length` and `chain_head` name
    /// the new statement).
    pub channel: ChannelRecord,
    /// The statement, stored at epoch = the expected chain length.
    pub entry: ChainEntry,
    /// Members added or whose role changed (new members also enter the
    /// user's channel index).
    pub put_members: Vec<MemberRecord>,
    /// Members removed (and their channel index entries).
    pub remove_members: Vec<String>,
}

/// Whether a stored channel is the one a statement expects to extend:
/// none for a creation (`expected_length` 0), else a channel whose chain
/// has `expected_length` statements ending at `expected_head`. Messages
/// stored since the statement was read (by a replica sharing the database)
/// do not matter: the store places the statement after them
/// ([`StatementChange::placed`]).
pub(crate) fn extends(
    current: Option<&ChannelRecord>,
    expected_length: u64,
    expected_head: &[u8],
) -> bool {
    match current {
        None => expected_length == 0,
        Some(c) => {
            expected_length > 0
                && c.chain_length == expected_length
                && c.chain_head == expected_head
        }
    }
}

impl StatementChange {
    /// This change as the store writes it over `current`, the channel as
    /// stored in the same atomic step: the statement's place is the
    /// channel's `next_index` then (a creation keeps its own), not the one
    /// read before, so messages stored meanwhile by another replica go
    /// before it. The channel's `next_index`, the chain entry's and the
    /// joining members' `joined_at_index` (members this statement adds:
    /// `added_at_epoch` is its epoch) take that place; none of them is
    /// covered by the statement's signature.
    pub(crate) fn placed(&self, current: Option<&ChannelRecord>) -> StatementChange {
        let place = current.map_or(self.channel.next_index, |c| c.next_index);
        let epoch = self.channel.chain_length.saturating_sub(1);
        StatementChange {
            channel: ChannelRecord {
                next_index: place,
                ..self.channel.clone()
            },
            entry: ChainEntry {
                next_index: place,
                ..self.entry.clone()
            },
            put_members: self
                .put_members
                .iter()
                .map(|m| MemberRecord {
                    joined_at_index: if m.added_at_epoch == epoch {
                        place
                    } else {
                        m.joined_at_index
                    },
                    ..m.clone()
                })
                .collect(),
            remove_members: self.remove_members.clone(),
        }
    }
}

/// Storage of the app server.
pub trait Store: Send + Sync + 'static {
    fn account<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<Account>>;
    /// Creates the account; `false` if the identity is taken.
    fn create_account<'a>(&'a self, account: &'a Account) -> StoreFuture<'a, bool>;
    /// Replaces `old` with `new` (same identity) if `old` is still what is
    /// stored; `false` otherwise.
    fn replace_account<'a>(&'a self, old: &'a Account, new: &'a Account) -> StoreFuture<'a, bool>;

    fn devices<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<Device>>;
    fn device<'a>(&'a self, card_id: &'a [u8]) -> StoreFuture<'a, Option<Device>>;
    fn put_devices<'a>(&'a self, devices: &'a [Device]) -> StoreFuture<'a, ()>;
    /// Stores `device`, a new active device of `device.identity`, with
    /// `superseded` (the device it replaces, already marked) if that
    /// identity has fewer than `max_active` active devices besides
    /// `device`; `false`, writing nothing, otherwise.
    ///
    /// This default counts and writes in two steps: right for the embedded
    /// stores, one process each, whose caller holds the user's lock. A
    /// store that several processes share decides in one transaction.
    fn add_device<'a>(
        &'a self,
        device: &'a Device,
        superseded: Option<&'a Device>,
        max_active: usize,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let stored = self.devices(&device.identity).await?;
            if active_besides(&stored, device) >= max_active {
                return Ok(false);
            }
            let mut changed = vec![device.clone()];
            changed.extend(superseded.cloned());
            self.put_devices(&changed).await?;
            Ok(true)
        })
    }

    fn org_members(&self) -> StoreFuture<'_, Vec<String>>;
    fn set_org_member<'a>(&'a self, identity: &'a str, member: bool) -> StoreFuture<'a, ()>;

    fn channel<'a>(&'a self, channel_id: &'a str) -> StoreFuture<'a, Option<ChannelRecord>>;
    fn member<'a>(
        &'a self,
        channel_id: &'a str,
        identity: &'a str,
    ) -> StoreFuture<'a, Option<MemberRecord>>;
    fn members<'a>(&'a self, channel_id: &'a str) -> StoreFuture<'a, Vec<MemberRecord>>;
    fn channels_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<String>>;
    /// Appends a statement to a channel's chain by compare-and-set on the
    /// chain: stores `change` atomically if the channel's chain still has
    /// `expected_length` statements ending at `expected_head` (for a
    /// creation, `expected_length` 0: if no channel has this id); `false`,
    /// changing nothing, otherwise. The statement's place is the channel's
    /// `next_index` read in the same atomic step, whatever messages were
    /// stored since the caller read it ([`StatementChange::placed`]).
    fn append_statement<'a>(
        &'a self,
        channel_id: &'a str,
        expected_length: u64,
        expected_head: &'a [u8],
        change: &'a StatementChange,
    ) -> StoreFuture<'a, bool>;
    /// Statements of the chain with `from <= epoch < to`, ascending, at most
    /// `limit` and, but for the first, at most `max_bytes` of stored
    /// entries.
    fn chain<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<ChainEntry>>;

    /// Index of a message already stored under this client message id.
    fn dedupe<'a>(
        &'a self,
        channel_id: &'a str,
        client_message_id: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>>;
    /// Stores a batch of sends atomically, in one transaction (PostgreSQL)
    /// or under one lock (the embedded stores), deciding for each message
    /// in order as [`plan_batch`] says: the channels' rows are locked (or
    /// read) first, sorted by id, then the senders' usage, sorted by
    /// identity; each stored message takes its channel's next index, its
    /// client id for deduplication and its bytes of its sender's usage,
    /// and the channels' new records are written once. One outcome per
    /// message, in the batch's order; a refused message writes nothing and
    /// never fails the others. The caller flushes afterwards (one flush
    /// for the whole batch). On PostgreSQL the channels' last indices are
    /// announced to the other replicas (`listen`) when the batch commits.
    fn append_messages<'a>(
        &'a self,
        batch: &'a [PendingMessage],
    ) -> StoreFuture<'a, Vec<BatchOutcome>>;
    /// Whether the caller of [`Self::append_messages`] must hold the
    /// user locks (`crate::Locks`) of the batch's senders. The embedded
    /// stores (one process each) need them: the other writers of a user's
    /// usage (sender keys, attachments) read and write it in two steps
    /// under that lock. A database that locks the usage rows in the
    /// batch's transaction, and whose other writers compare-and-set the
    /// usage, needs none (PostgreSQL), so no user's lock stalls a batch.
    fn batch_needs_user_locks(&self) -> bool {
        true
    }
    /// Messages with `from <= index < to`, at most `limit` and, but for the
    /// first, at most `max_bytes` of stored records (a page never holds more
    /// than that in memory, whatever the envelopes' sizes), taken from the
    /// oldest on, or from the newest on when `newest_first`; in the order
    /// taken. Records past the bounds are not decoded.
    fn message_range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        newest_first: bool,
    ) -> StoreFuture<'a, Vec<StoredMessage>>;

    /// The oldest messages of `from..to` that fit the bounds, ascending.
    fn messages<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<StoredMessage>> {
        self.message_range(channel_id, from, to, limit, max_bytes, false)
    }

    /// The newest messages of `from..to` that fit the bounds, ascending.
    fn messages_before<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<StoredMessage>> {
        Box::pin(async move {
            let mut out = self
                .message_range(channel_id, from, to, limit, max_bytes, true)
                .await?;
            out.reverse();
            Ok(out)
        })
    }

    /// What `identity` stores: message and attachment bytes, attachments.
    fn usage<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Usage>;

    fn read_horizon<'a>(&'a self, identity: &'a str, channel_id: &'a str) -> StoreFuture<'a, u64>;
    fn set_read_horizon<'a>(
        &'a self,
        identity: &'a str,
        channel_id: &'a str,
        index: u64,
    ) -> StoreFuture<'a, ()>;

    fn attachment<'a>(
        &'a self,
        attachment_id: &'a str,
    ) -> StoreFuture<'a, Option<AttachmentRecord>>;
    /// Stores the record and the uploader's new usage atomically if its
    /// usage is still `usage.before`; `false`, writing nothing, otherwise.
    fn put_attachment<'a>(
        &'a self,
        record: &'a AttachmentRecord,
        usage: &'a UsageChange,
    ) -> StoreFuture<'a, bool>;

    /// The record of a sender-key chain.
    fn sender_key_chain<'a>(
        &'a self,
        channel_id: &'a str,
        sender_card_id: &'a [u8],
        chain_id: &'a [u8],
    ) -> StoreFuture<'a, Option<SenderKeyChain>>;
    /// The copy of a chain stored for `recipient_card_id`, with the chain's
    /// record.
    fn sender_key<'a>(
        &'a self,
        channel_id: &'a str,
        sender_card_id: &'a [u8],
        chain_id: &'a [u8],
        recipient_card_id: &'a [u8],
    ) -> StoreFuture<'a, Option<(Vec<u8>, SenderKeyChain)>>;
    /// Stores the chain's record, its copies and the sender's new usage
    /// atomically if its usage is still `usage.before`; `false`, writing
    /// nothing, otherwise. The caller decides, under the channel's lock,
    /// what the record is (the stored one again for a later put of the
    /// same chain).
    fn put_sender_keys<'a>(
        &'a self,
        put: &'a SenderKeysPut,
        usage: &'a UsageChange,
    ) -> StoreFuture<'a, bool>;

    /// Resolves when every write so far is durable.
    fn flush(&self) -> FlushFuture<'_>;
}

pub(crate) fn decode<M: Message + Default>(
    bytes: &[u8],
    what: &'static str,
) -> Result<M, StorageError> {
    M::decode(bytes).map_err(|_| StorageError::Corrupt(what))
}

/// The behaviour every backend of [`Store`] must show, as one check each
/// backend's tests run (`conformance::exercise(&store)`), so a new backend
/// is held to what sled and the in-memory store do. Built for this crate's
/// tests, and for other crates with the `conformance` feature.
#[cfg(any(test, feature = "conformance"))]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "a conformance check: a failed assertion is a failed test"
)]
pub mod conformance {
    use super::*;

    pub async fn exercise(store: &dyn Store) {
        let account = Account {
            identity: "alice".into(),
            password: None,
            created_at: 1,
            admin: false,
            device_list_started: false,
        };
        assert!(store.create_account(&account).await.unwrap());
        assert!(
            !store.create_account(&account).await.unwrap(),
            "identities are unique"
        );
        assert_eq!(store.account("alice").await.unwrap(), Some(account.clone()));
        let admin = Account {
            admin: true,
            ..account.clone()
        };
        assert!(store.replace_account(&account, &admin).await.unwrap());
        assert!(
            !store.replace_account(&account, &admin).await.unwrap(),
            "only over what is stored"
        );
        assert_eq!(store.account("alice").await.unwrap(), Some(admin));

        let device = |id: u8, identity: &str| Device {
            card_id: vec![id; 32],
            identity: identity.into(),
            device_name: "d".into(),
            created_at: 0,
            status: DeviceStatus::Active as i32,
            org_card: false,
            signing_public_key: vec![id; 32],
        };
        store
            .put_devices(&[device(1, "alice"), device(2, "alice"), device(3, "bob")])
            .await
            .unwrap();
        assert_eq!(store.devices("alice").await.unwrap().len(), 2);
        assert_eq!(
            store.device(&[3; 32]).await.unwrap().unwrap().identity,
            "bob"
        );
        // The device limit: a new device only below it; one that replaces
        // another still needs room (the old one counts until replaced).
        assert!(
            !store
                .add_device(&device(4, "alice"), None, 2)
                .await
                .unwrap(),
            "alice has 2 active devices: the limit"
        );
        assert!(store.device(&[4; 32]).await.unwrap().is_none());
        let mut replaced = device(2, "alice");
        replaced.status = DeviceStatus::Superseded as i32;
        assert!(
            !store
                .add_device(&device(4, "alice"), Some(&replaced), 2)
                .await
                .unwrap()
        );
        assert!(
            store
                .add_device(&device(4, "alice"), Some(&replaced), 3)
                .await
                .unwrap()
        );
        assert_eq!(
            store.device(&[2; 32]).await.unwrap().unwrap().status,
            DeviceStatus::Superseded as i32,
            "stored with the new device"
        );
        // alice: 1 and 4 active, 2 superseded.
        assert!(
            store
                .add_device(&device(4, "alice"), None, 2)
                .await
                .unwrap(),
            "the same card again does not count itself"
        );
        assert!(
            !store
                .add_device(&device(5, "alice"), None, 2)
                .await
                .unwrap()
        );
        assert!(
            store.add_device(&device(5, "bob"), None, 2).await.unwrap(),
            "per user"
        );
        assert_eq!(store.devices("alice").await.unwrap().len(), 3);

        // The membership chain: appended by compare-and-set on its length
        // and head.
        let member = |identity: &str| MemberRecord {
            identity: identity.into(),
            role: 1,
            joined_at_index: 1,
            joined_at_ms: 0,
            added_at_epoch: 0,
            added_by: "alice".into(),
        };
        let entry = |n: u8| ChainEntry {
            statement: Some(tessera_proto::channel::v1::SignedChannelStatement {
                statement: vec![n; 10],
                signature: vec![n; 64],
            }),
            server_time_ms: i64::from(n),
            next_index: 1,
        };
        let mut channel = ChannelRecord {
            channel_id: "c1".into(),
            next_index: 1,
            chain_length: 1,
            chain_head: vec![1; 32],
            ..Default::default()
        };
        let creation = StatementChange {
            channel: channel.clone(),
            entry: entry(0),
            put_members: vec![member("alice"), member("bob")],
            remove_members: vec![],
        };
        assert!(
            store
                .append_statement("c1", 0, &[], &creation)
                .await
                .unwrap()
        );
        assert!(
            !store
                .append_statement("c1", 0, &[], &creation)
                .await
                .unwrap(),
            "a channel id is created once"
        );
        assert_eq!(store.members("c1").await.unwrap().len(), 2);
        assert_eq!(
            store.channels_of("bob").await.unwrap(),
            vec!["c1".to_string()]
        );
        channel.chain_length = 2;
        channel.chain_head = vec![2; 32];
        let removal = StatementChange {
            channel: channel.clone(),
            entry: entry(1),
            put_members: vec![],
            remove_members: vec!["bob".into()],
        };
        // Not at the head: nothing changes.
        assert!(
            !store
                .append_statement("c1", 2, &[1; 32], &removal)
                .await
                .unwrap()
        );
        assert!(
            !store
                .append_statement("c1", 1, &[9; 32], &removal)
                .await
                .unwrap()
        );
        assert!(
            !store
                .append_statement("c2", 1, &[1; 32], &removal)
                .await
                .unwrap()
        );
        assert!(store.member("c1", "bob").await.unwrap().is_some());
        assert_eq!(
            store
                .chain("c1", 0, 10, 10, usize::MAX)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            store
                .append_statement("c1", 1, &[1; 32], &removal)
                .await
                .unwrap()
        );
        assert!(
            !store
                .append_statement("c1", 1, &[1; 32], &removal)
                .await
                .unwrap(),
            "the same position twice"
        );
        assert!(store.member("c1", "bob").await.unwrap().is_none());
        assert!(store.channels_of("bob").await.unwrap().is_empty());
        assert_eq!(store.channel("c1").await.unwrap().unwrap().chain_length, 2);
        let chain = store.chain("c1", 0, 2, 10, usize::MAX).await.unwrap();
        assert_eq!(chain, vec![entry(0), entry(1)]);
        assert_eq!(
            store.chain("c1", 1, 2, 10, usize::MAX).await.unwrap(),
            vec![entry(1)]
        );
        assert_eq!(
            store.chain("c1", 0, 1, 10, usize::MAX).await.unwrap(),
            vec![entry(0)]
        );
        assert_eq!(
            store.chain("c1", 0, 2, 10, 0).await.unwrap(),
            vec![entry(0)],
            "the first always"
        );
        assert!(
            store
                .chain("c2", 0, 2, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store
                .chain("c1", 1, u64::MAX, usize::MAX, usize::MAX)
                .await
                .unwrap(),
            vec![entry(1)],
            "open-ended"
        );

        // Messages: each at the channel's next index (more in `batches`).
        let pending = |n: u8, sender: &str| PendingMessage {
            chain_length: 2,
            message: StoredMessage {
                channel_id: "c1".into(),
                sender_identity: sender.into(),
                client_message_id: vec![n; 16],
                ..Default::default()
            },
            max_message_bytes: u64::MAX,
        };
        for i in 1..=5u8 {
            assert_eq!(
                store.append_messages(&[pending(i, "")]).await.unwrap(),
                vec![BatchOutcome::Stored(u64::from(i))]
            );
            // The same client message id again: the first index, nothing written.
            assert_eq!(
                store.append_messages(&[pending(i, "")]).await.unwrap(),
                vec![BatchOutcome::Duplicate(u64::from(i))]
            );
        }
        assert_eq!(store.channel("c1").await.unwrap().unwrap().next_index, 6);
        let range: Vec<u64> = store
            .messages("c1", 2, 5, 10, usize::MAX)
            .await
            .unwrap()
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(range, vec![2, 3, 4]);
        assert_eq!(
            store
                .messages("c1", 5, u64::MAX, usize::MAX, usize::MAX)
                .await
                .unwrap()
                .len(),
            1,
            "open-ended"
        );
        assert_eq!(
            store
                .messages("c1", 1, 100, 2, usize::MAX)
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            store
                .messages("c2", 1, 100, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty(),
            "channels do not mix"
        );
        // Bounded by bytes: the first always, then only what fits.
        let one = StoredMessage {
            channel_id: "c1".into(),
            index: 1,
            client_message_id: vec![1; 16],
            ..Default::default()
        }
        .encoded_len();
        let by_bytes = async |from, to, max| -> Vec<u64> {
            store
                .messages("c1", from, to, 10, max)
                .await
                .unwrap()
                .iter()
                .map(|m| m.index)
                .collect()
        };
        assert_eq!(by_bytes(1, 6, 0).await, vec![1]);
        assert_eq!(by_bytes(1, 6, 2 * one + 1).await, vec![1, 2]);
        let newest: Vec<u64> = store
            .messages_before("c1", 1, 6, 10, 2 * one)
            .await
            .unwrap()
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(newest, vec![4, 5]);
        assert_eq!(store.usage("dave").await.unwrap(), Usage::default());
        assert_eq!(
            store.append_messages(&[pending(6, "dave")]).await.unwrap(),
            vec![BatchOutcome::Stored(6)]
        );
        let sixth = StoredMessage {
            index: 6,
            ..pending(6, "dave").message
        };
        assert_eq!(
            store.usage("dave").await.unwrap().message_bytes,
            sixth.encoded_len() as u64,
            "charged with the message"
        );
        // A statement whose place was read before messages were stored
        // (by another replica): stored after them, at the channel's
        // `next_index` when it is written; so are the joining member's
        // index and the chain entry's, not the other members'.
        let carol = MemberRecord {
            joined_at_index: 6,
            added_at_epoch: 2,
            ..member("carol")
        };
        let promoted = MemberRecord {
            role: 2,
            ..member("alice")
        };
        let stale = StatementChange {
            channel: ChannelRecord {
                chain_length: 3,
                chain_head: vec![3; 32],
                next_index: 6,
                ..channel.clone()
            },
            entry: ChainEntry {
                next_index: 6,
                ..entry(2)
            },
            put_members: vec![carol.clone(), promoted.clone()],
            remove_members: vec![],
        };
        assert!(
            store
                .append_statement("c1", 2, &[2; 32], &stale)
                .await
                .unwrap(),
            "messages stored since its place was read do not refuse it"
        );
        let placed = store.channel("c1").await.unwrap().unwrap();
        assert_eq!((placed.next_index, placed.chain_length), (7, 3));
        assert_eq!(
            store.chain("c1", 2, 3, 1, usize::MAX).await.unwrap(),
            vec![ChainEntry {
                next_index: 7,
                ..entry(2)
            }]
        );
        assert_eq!(
            store.member("c1", "carol").await.unwrap(),
            Some(MemberRecord {
                joined_at_index: 7,
                ..carol
            })
        );
        assert_eq!(store.member("c1", "alice").await.unwrap(), Some(promoted));
        assert_eq!(store.dedupe("c1", &[3; 16]).await.unwrap(), Some(3));
        assert_eq!(store.dedupe("c1", &[9; 16]).await.unwrap(), None);

        // Sender-key chains: a record per (channel, sender, chain), a copy
        // per recipient; channels, senders and chains do not mix.
        let chain = SenderKeyChain {
            epoch: 1,
            recipient_card_ids: vec![vec![2; 32], vec![3; 32]],
            server_time_ms: 42,
        };
        let copy = async |channel: &str, sender: u8, chain: u8, recipient: u8| {
            store
                .sender_key(channel, &[sender; 32], &[chain; 16], &[recipient; 32])
                .await
                .unwrap()
        };
        let put = SenderKeysPut {
            channel_id: "c1".into(),
            sender_card_id: vec![1; 32],
            chain_id: vec![7; 16],
            chain: chain.clone(),
            copies: vec![
                (vec![2; 32], b"to two".to_vec()),
                (vec![3; 32], b"to three".to_vec()),
            ],
            sender_identity: "erin".into(),
        };
        assert!(
            store
                .sender_key_chain("c1", &[1; 32], &[7; 16])
                .await
                .unwrap()
                .is_none()
        );
        assert!(copy("c1", 1, 7, 2).await.is_none());
        let erin = Usage {
            message_bytes: 14,
            ..Usage::default()
        };
        let erin_change = UsageChange {
            before: Usage::default(),
            after: erin,
        };
        assert!(
            !store
                .put_sender_keys(
                    &put,
                    &UsageChange {
                        before: erin,
                        after: erin
                    }
                )
                .await
                .unwrap(),
            "the sender's usage is not what the caller read"
        );
        assert!(copy("c1", 1, 7, 2).await.is_none(), "nothing written");
        assert!(store.put_sender_keys(&put, &erin_change).await.unwrap());
        assert_eq!(
            store.usage("erin").await.unwrap(),
            erin,
            "stored with the copies"
        );
        assert_eq!(
            store
                .sender_key_chain("c1", &[1; 32], &[7; 16])
                .await
                .unwrap(),
            Some(chain.clone())
        );
        assert_eq!(
            copy("c1", 1, 7, 3).await,
            Some((b"to three".to_vec(), chain.clone()))
        );
        assert!(copy("c1", 1, 7, 4).await.is_none());
        assert!(copy("c2", 1, 7, 2).await.is_none());
        assert!(copy("c1", 2, 7, 2).await.is_none());
        assert!(copy("c1", 1, 8, 2).await.is_none());
        // A later put replaces one copy and keeps the others.
        store
            .put_sender_keys(
                &SenderKeysPut {
                    copies: vec![(vec![2; 32], b"again".to_vec())],
                    ..put
                },
                &UsageChange {
                    before: erin,
                    after: erin,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            copy("c1", 1, 7, 2).await,
            Some((b"again".to_vec(), chain.clone()))
        );
        assert_eq!(
            copy("c1", 1, 7, 3).await,
            Some((b"to three".to_vec(), chain))
        );

        // Attachments: the record with the uploader's usage.
        let attachment = AttachmentRecord {
            attachment_id: "a1".into(),
            channel_id: "c1".into(),
            size: 8,
            uploader: "frank".into(),
            ..Default::default()
        };
        let frank = Usage {
            attachment_bytes: 8,
            attachments: 1,
            ..Usage::default()
        };
        assert!(
            !store
                .put_attachment(
                    &attachment,
                    &UsageChange {
                        before: frank,
                        after: frank
                    }
                )
                .await
                .unwrap()
        );
        assert!(store.attachment("a1").await.unwrap().is_none());
        let upload = UsageChange {
            before: Usage::default(),
            after: frank,
        };
        assert!(store.put_attachment(&attachment, &upload).await.unwrap());
        assert_eq!(store.attachment("a1").await.unwrap(), Some(attachment));
        assert_eq!(store.usage("frank").await.unwrap(), frank);

        batches(store, &entry).await;

        store.set_read_horizon("alice", "c1", 4).await.unwrap();
        assert_eq!(store.read_horizon("alice", "c1").await.unwrap(), 4);
        assert_eq!(store.read_horizon("bob", "c1").await.unwrap(), 0);
        store.set_org_member("alice", true).await.unwrap();
        assert_eq!(
            store.org_members().await.unwrap(),
            vec!["alice".to_string()]
        );
        store.set_org_member("alice", false).await.unwrap();
        assert!(store.org_members().await.unwrap().is_empty());
    }

    /// [`Store::append_messages`]: indices in order, duplicates (stored or
    /// in the batch), a moved chain, a message over its quota refused
    /// alone, nothing of a refused message stored, usage charged once.
    async fn batches(store: &dyn Store, entry: &dyn Fn(u8) -> ChainEntry) {
        let channel = ChannelRecord {
            channel_id: "cb".into(),
            next_index: 1,
            chain_length: 1,
            chain_head: vec![1; 32],
            ..Default::default()
        };
        let creation = StatementChange {
            channel,
            entry: entry(0),
            put_members: vec![],
            remove_members: vec![],
        };
        assert!(
            store
                .append_statement("cb", 0, &[], &creation)
                .await
                .unwrap()
        );
        let send = |n: u8, sender: &str| PendingMessage {
            chain_length: 1,
            message: StoredMessage {
                channel_id: "cb".into(),
                sender_identity: sender.into(),
                client_message_id: vec![n; 16],
                envelope: vec![n; 100],
                ..Default::default()
            },
            max_message_bytes: u64::MAX,
        };
        // Every message here is charged the same (senders' names of four
        // letters; indices below 128 take one byte).
        let size = {
            let mut m = send(1, "gina").message;
            m.index = 1;
            m.encoded_len() as u64
        };
        let limited = |n: u8, sender: &str, max: u64| PendingMessage {
            max_message_bytes: max,
            ..send(n, sender)
        };
        assert!(store.append_messages(&[]).await.unwrap().is_empty());
        let mut elsewhere = send(6, "gina");
        elsewhere.message.channel_id = "no such channel".into();
        let batch = [
            send(1, "gina"),
            send(2, "hank"),
            send(1, "gina"),
            limited(3, "ivan", size - 1),
            send(4, "gina"),
            PendingMessage {
                chain_length: 2,
                ..send(5, "gina")
            },
            elsewhere,
        ];
        assert_eq!(
            store.append_messages(&batch).await.unwrap(),
            vec![
                BatchOutcome::Stored(1),
                BatchOutcome::Stored(2),
                BatchOutcome::Duplicate(1),
                BatchOutcome::OverQuota,
                BatchOutcome::Stored(3),
                BatchOutcome::Moved,
                BatchOutcome::Moved,
            ]
        );
        let stored = |from, to| async move {
            store
                .messages("cb", from, to, 100, usize::MAX)
                .await
                .unwrap()
                .iter()
                .map(|m| (m.index, m.client_message_id[0], m.sender_identity.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            stored(1, 100).await,
            vec![
                (1, 1, "gina".to_string()),
                (2, 2, "hank".to_string()),
                (3, 4, "gina".to_string())
            ]
        );
        assert_eq!(store.channel("cb").await.unwrap().unwrap().next_index, 4);
        assert_eq!(store.dedupe("cb", &[4; 16]).await.unwrap(), Some(3));
        for refused in [3u8, 5, 6] {
            assert_eq!(
                store.dedupe("cb", &[refused; 16]).await.unwrap(),
                None,
                "nothing of a refused message"
            );
        }
        assert_eq!(store.usage("gina").await.unwrap().message_bytes, 2 * size);
        assert_eq!(store.usage("hank").await.unwrap().message_bytes, size);
        assert_eq!(store.usage("ivan").await.unwrap(), Usage::default());
        // Against what is stored; usage adds up within a batch, and a
        // message exactly at the quota fits.
        assert_eq!(
            store
                .append_messages(&[
                    send(2, "hank"),
                    send(7, "hank"),
                    limited(8, "ivan", size),
                    limited(9, "ivan", 2 * size),
                    limited(10, "ivan", 2 * size),
                ])
                .await
                .unwrap(),
            vec![
                BatchOutcome::Duplicate(2),
                BatchOutcome::Stored(4),
                BatchOutcome::Stored(5),
                BatchOutcome::Stored(6),
                BatchOutcome::OverQuota,
            ]
        );
        assert_eq!(store.usage("hank").await.unwrap().message_bytes, 2 * size);
        assert_eq!(store.usage("ivan").await.unwrap().message_bytes, 2 * size);
        let indices: Vec<u64> = stored(1, 100).await.iter().map(|m| m.0).collect();
        assert_eq!(indices, (1..=6).collect::<Vec<u64>>(), "consecutive");
        // A batch of refusals alone writes nothing.
        assert_eq!(
            store
                .append_messages(&[
                    PendingMessage {
                        chain_length: 0,
                        ..send(11, "hank")
                    },
                    limited(12, "hank", 0),
                ])
                .await
                .unwrap(),
            vec![BatchOutcome::Moved, BatchOutcome::OverQuota]
        );
        assert_eq!(store.channel("cb").await.unwrap().unwrap().next_index, 7);
        assert_eq!(store.usage("hank").await.unwrap().message_bytes, 2 * size);
    }
}
