//! The app server's storage: a trait, the sled implementation (the embedded
//! default) and an in-memory one for unit tests. Every acknowledged write is
//! flushed by the caller (`Store::flush`) before it answers; concurrent
//! callers share flushes (group commit, see [`SledStore`]).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use tessera_proto::server::v1::{ChainEntry, StoredMessage};
use tessera_service::{
    metrics::{self, time_store},
    storage::{self, FlushFuture, StorageError, read_u64, u64_key},
};

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

/// Takes records from `items` (each with its encoded size) while they fit
/// in `limit` records and `max_bytes`, the first always.
fn take_bounded<T, E>(
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

/// The sled records of a key range, bounded as [`take_bounded`] says (from
/// the newest on when `newest_first`), decoded: only what is kept is
/// decoded, sizes come from the raw records.
fn decode_bounded<M: Message + Default>(
    range: sled::Iter,
    limit: usize,
    max_bytes: usize,
    newest_first: bool,
    what: &'static str,
) -> Result<Vec<M>, StorageError> {
    let sized = |item: sled::Result<(sled::IVec, sled::IVec)>| {
        let (_, v) = item?;
        Ok::<_, StorageError>((v.len(), v))
    };
    let raw: Vec<sled::IVec> = if newest_first {
        take_bounded(range.rev().map(sized), limit, max_bytes)?
    } else {
        take_bounded(range.map(sized), limit, max_bytes)?
    };
    raw.iter().map(|v| decode(v, what)).collect()
}

/// The in-memory records of a range, bounded as [`take_bounded`] says (from
/// the newest on when `newest_first`), cloned.
fn clone_bounded<'a, K: 'a, M: Message + Clone + 'a>(
    range: impl DoubleEndedIterator<Item = (&'a K, &'a M)>,
    limit: usize,
    max_bytes: usize,
    newest_first: bool,
) -> Result<Vec<M>, StorageError> {
    let sized = |(_, v): (&K, &M)| Ok((v.encoded_len(), v.clone()));
    if newest_first {
        take_bounded(range.rev().map(sized), limit, max_bytes)
    } else {
        take_bounded(range.map(sized), limit, max_bytes)
    }
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
/// has `expected_length` statements ending at `expected_head`.
fn extends(current: Option<&ChannelRecord>, expected_length: u64, expected_head: &[u8]) -> bool {
    match current {
        None => expected_length == 0,
        Some(c) => {
            expected_length > 0
                && c.chain_length == expected_length
                && c.chain_head == expected_head
        }
    }
}

/// Storage of the app server.
pub trait Store: Send + Sync + 'static {
    fn account(&self, identity: &str) -> Result<Option<Account>, StorageError>;
    /// Creates the account; `false` if the identity is taken.
    fn create_account(&self, account: &Account) -> Result<bool, StorageError>;
    /// Replaces `old` with `new` (same identity) if `old` is still what is
    /// stored; `false` otherwise.
    fn replace_account(&self, old: &Account, new: &Account) -> Result<bool, StorageError>;

    fn devices(&self, identity: &str) -> Result<Vec<Device>, StorageError>;
    fn device(&self, card_id: &[u8]) -> Result<Option<Device>, StorageError>;
    fn put_devices(&self, devices: &[Device]) -> Result<(), StorageError>;

    fn org_members(&self) -> Result<Vec<String>, StorageError>;
    fn set_org_member(&self, identity: &str, member: bool) -> Result<(), StorageError>;

    fn channel(&self, channel_id: &str) -> Result<Option<ChannelRecord>, StorageError>;
    fn member(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<Option<MemberRecord>, StorageError>;
    fn members(&self, channel_id: &str) -> Result<Vec<MemberRecord>, StorageError>;
    fn channels_of(&self, identity: &str) -> Result<Vec<String>, StorageError>;
    /// Appends a statement to a channel's chain by compare-and-set: stores
    /// `change` atomically if the channel's chain still has
    /// `expected_length` statements ending at `expected_head` (for a
    /// creation, `expected_length` 0: if no channel has this id); `false`,
    /// changing nothing, otherwise.
    fn append_statement(
        &self,
        channel_id: &str,
        expected_length: u64,
        expected_head: &[u8],
        change: &StatementChange,
    ) -> Result<bool, StorageError>;
    /// Statements of the chain with `from <= epoch < to`, ascending, at most
    /// `limit` and, but for the first, at most `max_bytes` of stored
    /// entries.
    fn chain(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChainEntry>, StorageError>;

    /// Index of a message already stored under this client message id.
    fn dedupe(
        &self,
        channel_id: &str,
        client_message_id: &[u8],
    ) -> Result<Option<u64>, StorageError>;
    /// Stores `message`, the channel's new `next_index` and the sender's new
    /// `usage` atomically.
    fn append_message(
        &self,
        channel: &ChannelRecord,
        message: &StoredMessage,
        usage: &Usage,
    ) -> Result<(), StorageError>;
    /// Messages with `from <= index < to`, at most `limit` and, but for the
    /// first, at most `max_bytes` of stored records (a page never holds more
    /// than that in memory, whatever the envelopes' sizes), taken from the
    /// oldest on, or from the newest on when `newest_first`; in the order
    /// taken. Records past the bounds are not decoded.
    fn message_range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        newest_first: bool,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    /// The oldest messages of `from..to` that fit the bounds, ascending.
    fn messages(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        self.message_range(channel_id, from, to, limit, max_bytes, false)
    }

    /// The newest messages of `from..to` that fit the bounds, ascending.
    fn messages_before(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let mut out = self.message_range(channel_id, from, to, limit, max_bytes, true)?;
        out.reverse();
        Ok(out)
    }

    /// What `identity` stores: message and attachment bytes, attachments.
    fn usage(&self, identity: &str) -> Result<Usage, StorageError>;

    fn read_horizon(&self, identity: &str, channel_id: &str) -> Result<u64, StorageError>;
    fn set_read_horizon(
        &self,
        identity: &str,
        channel_id: &str,
        index: u64,
    ) -> Result<(), StorageError>;

    fn attachment(&self, attachment_id: &str) -> Result<Option<AttachmentRecord>, StorageError>;
    /// Stores the record and the uploader's new `usage` atomically.
    fn put_attachment(&self, record: &AttachmentRecord, usage: &Usage) -> Result<(), StorageError>;

    /// The record of a sender-key chain.
    fn sender_key_chain(
        &self,
        channel_id: &str,
        sender_card_id: &[u8],
        chain_id: &[u8],
    ) -> Result<Option<SenderKeyChain>, StorageError>;
    /// The copy of a chain stored for `recipient_card_id`, with the chain's
    /// record.
    fn sender_key(
        &self,
        channel_id: &str,
        sender_card_id: &[u8],
        chain_id: &[u8],
        recipient_card_id: &[u8],
    ) -> Result<Option<(Vec<u8>, SenderKeyChain)>, StorageError>;
    /// Stores the chain's record, its copies and the sender's new `usage`
    /// atomically. The caller decides, under the channel's lock, what the
    /// record is (the stored one again for a later put of the same chain).
    fn put_sender_keys(&self, put: &SenderKeysPut, usage: &Usage) -> Result<(), StorageError>;

    /// Resolves when every write so far is durable.
    fn flush(&self) -> FlushFuture<'_>;
}

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn decode<M: Message + Default>(bytes: &[u8], what: &'static str) -> Result<M, StorageError> {
    M::decode(bytes).map_err(|_| StorageError::Corrupt(what))
}

/// The sled store: one tree with prefixed keys:
/// `a/` accounts, `d/` devices by card id, `du/<identity>\0<card id>` device
/// index, `o/` org members, `c/` channels, `cm/<channel>\0<identity>`
/// members, `cs/<channel>\0<epoch>` the membership chain's statements
/// (`ChainEntry`), `uc/<identity>\0<channel>` a user's channels,
/// `m/<channel>\0<index>` messages, `md/<channel>\0<client id>` dedupe,
/// `rh/<identity>\0<channel>` read horizons, `at/` attachments, `uq/` usage,
/// `sk/<channel>\0<sender card>\0<chain id>` sender-key chains
/// (`SenderKeyChain`), `skc/<channel>\0<sender card>\0<chain id>\0<recipient
/// card>` their copies (the encoded `SenderKeyDistribution`).
///
/// Flushes are group commits: one fsync makes durable every write made
/// before it started, so callers that ask while a flush runs share the next
/// one instead of queueing one each (concurrent sends to a channel no
/// longer pay one fsync per message).
pub struct SledStore {
    db: sled::Db,
    /// `flush` calls so far; a call's number is its ticket.
    tickets: AtomicU64,
    /// The highest ticket known durable. Held while a flush runs.
    durable: tokio::sync::Mutex<u64>,
    /// Flushes done (fsyncs).
    flushes: AtomicU64,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Ok(Self {
            db: storage::open_db(dir)?,
            tickets: AtomicU64::new(0),
            durable: tokio::sync::Mutex::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    /// Flushes (fsyncs) done since the store opened.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Resolves once everything written before the call is durable. The
    /// caller's writes happened before it took its ticket; a flush that
    /// starts after a ticket was taken covers that ticket, so it makes
    /// durable every ticket taken before it started.
    async fn group_flush(&self) -> Result<(), StorageError> {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.durable.lock().await;
        if *durable >= ticket {
            return Ok(()); // a flush that started after our writes finished
        }
        let covers = self.tickets.load(Ordering::SeqCst);
        storage::flush(&self.db).await?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        metrics::increment(metrics::SERVER_STORE_FLUSHES);
        metrics::record(metrics::SERVER_FLUSH_BATCH, (covers - *durable) as f64);
        *durable = covers;
        Ok(())
    }

    fn get<M: Message + Default>(
        &self,
        k: Vec<u8>,
        what: &'static str,
    ) -> Result<Option<M>, StorageError> {
        self.db.get(k)?.map(|v| decode(&v, what)).transpose()
    }

    fn suffixes(&self, prefix: Vec<u8>) -> Result<Vec<Vec<u8>>, StorageError> {
        let len = prefix.len();
        let mut out = Vec::new();
        for item in self.db.scan_prefix(prefix) {
            let (k, _) = item?;
            out.push(k[len..].to_vec());
        }
        Ok(out)
    }
}

impl Store for SledStore {
    fn account(&self, identity: &str) -> Result<Option<Account>, StorageError> {
        self.get(key(b"a/", &[identity.as_bytes()]), "account")
    }

    fn create_account(&self, account: &Account) -> Result<bool, StorageError> {
        let k = key(b"a/", &[account.identity.as_bytes()]);
        Ok(self
            .db
            .compare_and_swap(k, None as Option<&[u8]>, Some(account.encode_to_vec()))?
            .is_ok())
    }

    fn replace_account(&self, old: &Account, new: &Account) -> Result<bool, StorageError> {
        let k = key(b"a/", &[old.identity.as_bytes()]);
        Ok(self
            .db
            .compare_and_swap(k, Some(old.encode_to_vec()), Some(new.encode_to_vec()))?
            .is_ok())
    }

    fn devices(&self, identity: &str) -> Result<Vec<Device>, StorageError> {
        let mut out = Vec::new();
        for id in self.suffixes(key(b"du/", &[identity.as_bytes(), b""]))? {
            out.push(
                self.device(&id)?
                    .ok_or(StorageError::Corrupt("device index names a missing device"))?,
            );
        }
        Ok(out)
    }

    fn device(&self, card_id: &[u8]) -> Result<Option<Device>, StorageError> {
        self.get(key(b"d/", &[card_id]), "device")
    }

    fn put_devices(&self, devices: &[Device]) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for d in devices {
            batch.insert(key(b"d/", &[&d.card_id]), d.encode_to_vec());
            batch.insert(
                key(b"du/", &[d.identity.as_bytes(), &d.card_id]),
                Vec::<u8>::new(),
            );
        }
        Ok(self.db.apply_batch(batch)?)
    }

    fn org_members(&self) -> Result<Vec<String>, StorageError> {
        self.suffixes(b"o/".to_vec())?
            .into_iter()
            .map(|s| String::from_utf8(s).map_err(|_| StorageError::Corrupt("org member")))
            .collect()
    }

    fn set_org_member(&self, identity: &str, member: bool) -> Result<(), StorageError> {
        let k = key(b"o/", &[identity.as_bytes()]);
        if member {
            self.db.insert(k, Vec::<u8>::new())?;
        } else {
            self.db.remove(k)?;
        }
        Ok(())
    }

    fn channel(&self, channel_id: &str) -> Result<Option<ChannelRecord>, StorageError> {
        self.get(key(b"c/", &[channel_id.as_bytes()]), "channel")
    }

    fn member(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<Option<MemberRecord>, StorageError> {
        self.get(
            key(b"cm/", &[channel_id.as_bytes(), identity.as_bytes()]),
            "member",
        )
    }

    fn members(&self, channel_id: &str) -> Result<Vec<MemberRecord>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .db
            .scan_prefix(key(b"cm/", &[channel_id.as_bytes(), b""]))
        {
            out.push(decode(&item?.1, "member")?);
        }
        Ok(out)
    }

    fn channels_of(&self, identity: &str) -> Result<Vec<String>, StorageError> {
        self.suffixes(key(b"uc/", &[identity.as_bytes(), b""]))?
            .into_iter()
            .map(|s| String::from_utf8(s).map_err(|_| StorageError::Corrupt("channel id")))
            .collect()
    }

    fn append_statement(
        &self,
        channel_id: &str,
        expected_length: u64,
        expected_head: &[u8],
        change: &StatementChange,
    ) -> Result<bool, StorageError> {
        use sled::transaction::ConflictableTransactionError as Conflict;
        let id = channel_id.as_bytes();
        let channel_key = key(b"c/", &[id]);
        let channel = change.channel.encode_to_vec();
        let entry = change.entry.encode_to_vec();
        let appended = self.db.transaction(|tx| {
            let current = tx
                .get(&channel_key)?
                .map(|v| decode::<ChannelRecord>(&v, "channel"))
                .transpose()
                .map_err(Conflict::Abort)?;
            if !extends(current.as_ref(), expected_length, expected_head) {
                return Ok(false);
            }
            tx.insert(channel_key.as_slice(), channel.as_slice())?;
            tx.insert(
                key(b"cs/", &[id, &u64_key(expected_length)]),
                entry.as_slice(),
            )?;
            for m in &change.put_members {
                tx.insert(key(b"cm/", &[id, m.identity.as_bytes()]), m.encode_to_vec())?;
                tx.insert(key(b"uc/", &[m.identity.as_bytes(), id]), &[] as &[u8])?;
            }
            for identity in &change.remove_members {
                tx.remove(key(b"cm/", &[id, identity.as_bytes()]))?;
                tx.remove(key(b"uc/", &[identity.as_bytes(), id]))?;
            }
            Ok(true)
        })?;
        Ok(appended)
    }

    fn chain(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChainEntry>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let id = channel_id.as_bytes();
        let range = self
            .db
            .range(key(b"cs/", &[id, &u64_key(from)])..key(b"cs/", &[id, &u64_key(to)]));
        decode_bounded(range, limit, max_bytes, false, "chain entry")
    }

    fn dedupe(
        &self,
        channel_id: &str,
        client_message_id: &[u8],
    ) -> Result<Option<u64>, StorageError> {
        time_store("dedupe", || {
            self.db
                .get(key(b"md/", &[channel_id.as_bytes(), client_message_id]))?
                .map(|v| read_u64(&v))
                .transpose()
        })
    }

    fn append_message(
        &self,
        channel: &ChannelRecord,
        message: &StoredMessage,
        usage: &Usage,
    ) -> Result<(), StorageError> {
        let id = channel.channel_id.as_bytes();
        let mut batch = sled::Batch::default();
        batch.insert(
            key(b"uq/", &[message.sender_identity.as_bytes()]),
            usage.encode_to_vec(),
        );
        batch.insert(
            key(b"m/", &[id, &u64_key(message.index)]),
            message.encode_to_vec(),
        );
        batch.insert(
            key(b"md/", &[id, &message.client_message_id]),
            u64_key(message.index).to_vec(),
        );
        batch.insert(key(b"c/", &[id]), channel.encode_to_vec());
        Ok(time_store("append_message", || self.db.apply_batch(batch))?)
    }

    fn message_range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        newest_first: bool,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let id = channel_id.as_bytes();
        time_store("messages", || {
            let range = self
                .db
                .range(key(b"m/", &[id, &u64_key(from)])..key(b"m/", &[id, &u64_key(to)]));
            decode_bounded(range, limit, max_bytes, newest_first, "message")
        })
    }

    fn usage(&self, identity: &str) -> Result<Usage, StorageError> {
        Ok(self
            .get(key(b"uq/", &[identity.as_bytes()]), "usage")?
            .unwrap_or_default())
    }

    fn read_horizon(&self, identity: &str, channel_id: &str) -> Result<u64, StorageError> {
        self.db
            .get(key(b"rh/", &[identity.as_bytes(), channel_id.as_bytes()]))?
            .map_or(Ok(0), |v| read_u64(&v))
    }

    fn set_read_horizon(
        &self,
        identity: &str,
        channel_id: &str,
        index: u64,
    ) -> Result<(), StorageError> {
        self.db.insert(
            key(b"rh/", &[identity.as_bytes(), channel_id.as_bytes()]),
            u64_key(index).to_vec(),
        )?;
        Ok(())
    }

    fn attachment(&self, attachment_id: &str) -> Result<Option<AttachmentRecord>, StorageError> {
        self.get(key(b"at/", &[attachment_id.as_bytes()]), "attachment")
    }

    fn put_attachment(&self, record: &AttachmentRecord, usage: &Usage) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            key(b"at/", &[record.attachment_id.as_bytes()]),
            record.encode_to_vec(),
        );
        batch.insert(
            key(b"uq/", &[record.uploader.as_bytes()]),
            usage.encode_to_vec(),
        );
        Ok(self.db.apply_batch(batch)?)
    }

    fn sender_key_chain(
        &self,
        channel_id: &str,
        sender_card_id: &[u8],
        chain_id: &[u8],
    ) -> Result<Option<SenderKeyChain>, StorageError> {
        self.get(
            key(b"sk/", &[channel_id.as_bytes(), sender_card_id, chain_id]),
            "sender-key chain",
        )
    }

    fn sender_key(
        &self,
        channel_id: &str,
        sender_card_id: &[u8],
        chain_id: &[u8],
        recipient_card_id: &[u8],
    ) -> Result<Option<(Vec<u8>, SenderKeyChain)>, StorageError> {
        let id = channel_id.as_bytes();
        let Some(copy) = self.db.get(key(
            b"skc/",
            &[id, sender_card_id, chain_id, recipient_card_id],
        ))?
        else {
            return Ok(None);
        };
        let chain = self
            .sender_key_chain(channel_id, sender_card_id, chain_id)?
            .ok_or(StorageError::Corrupt("sender-key copy without its chain"))?;
        Ok(Some((copy.to_vec(), chain)))
    }

    fn put_sender_keys(&self, put: &SenderKeysPut, usage: &Usage) -> Result<(), StorageError> {
        let id = put.channel_id.as_bytes();
        let (sender, chain) = (put.sender_card_id.as_slice(), put.chain_id.as_slice());
        let mut batch = sled::Batch::default();
        batch.insert(key(b"sk/", &[id, sender, chain]), put.chain.encode_to_vec());
        for (recipient, copy) in &put.copies {
            batch.insert(
                key(b"skc/", &[id, sender, chain, recipient]),
                copy.as_slice(),
            );
        }
        batch.insert(
            key(b"uq/", &[put.sender_identity.as_bytes()]),
            usage.encode_to_vec(),
        );
        Ok(time_store("put_sender_keys", || {
            self.db.apply_batch(batch)
        })?)
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(self.group_flush())
    }
}

/// In-memory store for unit tests.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Memory>>,
}

#[derive(Default)]
struct Memory {
    accounts: BTreeMap<String, Account>,
    devices: BTreeMap<Vec<u8>, Device>,
    org: BTreeMap<String, ()>,
    channels: BTreeMap<String, ChannelRecord>,
    members: BTreeMap<(String, String), MemberRecord>,
    chains: BTreeMap<(String, u64), ChainEntry>,
    messages: BTreeMap<(String, u64), StoredMessage>,
    dedupe: BTreeMap<(String, Vec<u8>), u64>,
    horizons: BTreeMap<(String, String), u64>,
    attachments: BTreeMap<String, AttachmentRecord>,
    usage: BTreeMap<String, Usage>,
    sender_chains: BTreeMap<ChainAt, SenderKeyChain>,
    /// By (chain, recipient card).
    sender_keys: BTreeMap<(ChainAt, Vec<u8>), Vec<u8>>,
}

/// Where a sender-key chain is: (channel, sender card, chain id).
type ChainAt = (String, Vec<u8>, Vec<u8>);

fn chain_at(channel_id: &str, sender_card_id: &[u8], chain_id: &[u8]) -> ChainAt {
    (
        channel_id.to_owned(),
        sender_card_id.to_vec(),
        chain_id.to_vec(),
    )
}

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Memory>, StorageError> {
        storage::lock(&self.inner)
    }
}

impl Store for MemoryStore {
    fn account(&self, identity: &str) -> Result<Option<Account>, StorageError> {
        Ok(self.lock()?.accounts.get(identity).cloned())
    }

    fn create_account(&self, account: &Account) -> Result<bool, StorageError> {
        let mut m = self.lock()?;
        if m.accounts.contains_key(&account.identity) {
            return Ok(false);
        }
        m.accounts.insert(account.identity.clone(), account.clone());
        Ok(true)
    }

    fn replace_account(&self, old: &Account, new: &Account) -> Result<bool, StorageError> {
        let mut m = self.lock()?;
        if m.accounts.get(&old.identity) != Some(old) {
            return Ok(false);
        }
        m.accounts.insert(new.identity.clone(), new.clone());
        Ok(true)
    }

    fn devices(&self, identity: &str) -> Result<Vec<Device>, StorageError> {
        Ok(self
            .lock()?
            .devices
            .values()
            .filter(|d| d.identity == identity)
            .cloned()
            .collect())
    }

    fn device(&self, card_id: &[u8]) -> Result<Option<Device>, StorageError> {
        Ok(self.lock()?.devices.get(card_id).cloned())
    }

    fn put_devices(&self, devices: &[Device]) -> Result<(), StorageError> {
        let mut m = self.lock()?;
        for d in devices {
            m.devices.insert(d.card_id.clone(), d.clone());
        }
        Ok(())
    }

    fn org_members(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.lock()?.org.keys().cloned().collect())
    }

    fn set_org_member(&self, identity: &str, member: bool) -> Result<(), StorageError> {
        let mut m = self.lock()?;
        if member {
            m.org.insert(identity.to_owned(), ());
        } else {
            m.org.remove(identity);
        }
        Ok(())
    }

    fn channel(&self, channel_id: &str) -> Result<Option<ChannelRecord>, StorageError> {
        Ok(self.lock()?.channels.get(channel_id).cloned())
    }

    fn member(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<Option<MemberRecord>, StorageError> {
        Ok(self
            .lock()?
            .members
            .get(&(channel_id.to_owned(), identity.to_owned()))
            .cloned())
    }

    fn members(&self, channel_id: &str) -> Result<Vec<MemberRecord>, StorageError> {
        Ok(self
            .lock()?
            .members
            .iter()
            .filter(|((c, _), _)| c == channel_id)
            .map(|(_, m)| m.clone())
            .collect())
    }

    fn channels_of(&self, identity: &str) -> Result<Vec<String>, StorageError> {
        Ok(self
            .lock()?
            .members
            .keys()
            .filter(|(_, i)| i == identity)
            .map(|(c, _)| c.clone())
            .collect())
    }

    fn append_statement(
        &self,
        channel_id: &str,
        expected_length: u64,
        expected_head: &[u8],
        change: &StatementChange,
    ) -> Result<bool, StorageError> {
        let mut m = self.lock()?;
        if !extends(m.channels.get(channel_id), expected_length, expected_head) {
            return Ok(false);
        }
        let id = channel_id.to_owned();
        m.channels.insert(id.clone(), change.channel.clone());
        m.chains
            .insert((id.clone(), expected_length), change.entry.clone());
        for member in &change.put_members {
            m.members
                .insert((id.clone(), member.identity.clone()), member.clone());
        }
        for identity in &change.remove_members {
            m.members.remove(&(id.clone(), identity.clone()));
        }
        Ok(true)
    }

    fn chain(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChainEntry>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let m = self.lock()?;
        let range = m
            .chains
            .range((channel_id.to_owned(), from)..(channel_id.to_owned(), to));
        clone_bounded(range, limit, max_bytes, false)
    }

    fn dedupe(
        &self,
        channel_id: &str,
        client_message_id: &[u8],
    ) -> Result<Option<u64>, StorageError> {
        Ok(self
            .lock()?
            .dedupe
            .get(&(channel_id.to_owned(), client_message_id.to_vec()))
            .copied())
    }

    fn append_message(
        &self,
        channel: &ChannelRecord,
        message: &StoredMessage,
        usage: &Usage,
    ) -> Result<(), StorageError> {
        let mut m = self.lock()?;
        m.usage.insert(message.sender_identity.clone(), *usage);
        let id = channel.channel_id.clone();
        m.messages
            .insert((id.clone(), message.index), message.clone());
        m.dedupe.insert(
            (id.clone(), message.client_message_id.clone()),
            message.index,
        );
        m.channels.insert(id, channel.clone());
        Ok(())
    }

    fn message_range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        newest_first: bool,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let m = self.lock()?;
        let range = m
            .messages
            .range((channel_id.to_owned(), from)..(channel_id.to_owned(), to));
        clone_bounded(range, limit, max_bytes, newest_first)
    }

    fn usage(&self, identity: &str) -> Result<Usage, StorageError> {
        Ok(self
            .lock()?
            .usage
            .get(identity)
            .copied()
            .unwrap_or_default())
    }

    fn read_horizon(&self, identity: &str, channel_id: &str) -> Result<u64, StorageError> {
        Ok(self
            .lock()?
            .horizons
            .get(&(identity.to_owned(), channel_id.to_owned()))
            .copied()
            .unwrap_or(0))
    }

    fn set_read_horizon(
        &self,
        identity: &str,
        channel_id: &str,
        index: u64,
    ) -> Result<(), StorageError> {
        self.lock()?
            .horizons
            .insert((identity.to_owned(), channel_id.to_owned()), index);
        Ok(())
    }

    fn attachment(&self, attachment_id: &str) -> Result<Option<AttachmentRecord>, StorageError> {
        Ok(self.lock()?.attachments.get(attachment_id).cloned())
    }

    fn put_attachment(&self, record: &AttachmentRecord, usage: &Usage) -> Result<(), StorageError> {
        let mut m = self.lock()?;
        m.usage.insert(record.uploader.clone(), *usage);
        m.attachments
            .insert(record.attachment_id.clone(), record.clone());
        Ok(())
    }

    fn sender_key_chain(
        &self,
        channel_id: &str,
        sender_card_id: &[u8],
        chain_id: &[u8],
    ) -> Result<Option<SenderKeyChain>, StorageError> {
        Ok(self
            .lock()?
            .sender_chains
            .get(&chain_at(channel_id, sender_card_id, chain_id))
            .cloned())
    }

    fn sender_key(
        &self,
        channel_id: &str,
        sender_card_id: &[u8],
        chain_id: &[u8],
        recipient_card_id: &[u8],
    ) -> Result<Option<(Vec<u8>, SenderKeyChain)>, StorageError> {
        let m = self.lock()?;
        let chain = chain_at(channel_id, sender_card_id, chain_id);
        let copy = m
            .sender_keys
            .get(&(chain.clone(), recipient_card_id.to_vec()));
        match (copy, m.sender_chains.get(&chain)) {
            (None, _) => Ok(None),
            (Some(copy), Some(chain)) => Ok(Some((copy.clone(), chain.clone()))),
            (Some(_), None) => Err(StorageError::Corrupt("sender-key copy without its chain")),
        }
    }

    fn put_sender_keys(&self, put: &SenderKeysPut, usage: &Usage) -> Result<(), StorageError> {
        let mut m = self.lock()?;
        let chain = chain_at(&put.channel_id, &put.sender_card_id, &put.chain_id);
        for (recipient, copy) in &put.copies {
            m.sender_keys
                .insert((chain.clone(), recipient.clone()), copy.clone());
        }
        m.sender_chains.insert(chain, put.chain.clone());
        m.usage.insert(put.sender_identity.clone(), *usage);
        Ok(())
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(async { Ok(()) })
    }
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

    pub fn exercise(store: &dyn Store) {
        let account = Account {
            identity: "alice".into(),
            password: None,
            created_at: 1,
            admin: false,
            device_list_started: false,
        };
        assert!(store.create_account(&account).unwrap());
        assert!(
            !store.create_account(&account).unwrap(),
            "identities are unique"
        );
        assert_eq!(store.account("alice").unwrap(), Some(account.clone()));
        let admin = Account {
            admin: true,
            ..account.clone()
        };
        assert!(store.replace_account(&account, &admin).unwrap());
        assert!(
            !store.replace_account(&account, &admin).unwrap(),
            "only over what is stored"
        );
        assert_eq!(store.account("alice").unwrap(), Some(admin));

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
            .unwrap();
        assert_eq!(store.devices("alice").unwrap().len(), 2);
        assert_eq!(store.device(&[3; 32]).unwrap().unwrap().identity, "bob");

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
        assert!(store.append_statement("c1", 0, &[], &creation).unwrap());
        assert!(
            !store.append_statement("c1", 0, &[], &creation).unwrap(),
            "a channel id is created once"
        );
        assert_eq!(store.members("c1").unwrap().len(), 2);
        assert_eq!(store.channels_of("bob").unwrap(), vec!["c1".to_string()]);
        channel.chain_length = 2;
        channel.chain_head = vec![2; 32];
        let removal = StatementChange {
            channel: channel.clone(),
            entry: entry(1),
            put_members: vec![],
            remove_members: vec!["bob".into()],
        };
        // Not at the head: nothing changes.
        assert!(!store.append_statement("c1", 2, &[1; 32], &removal).unwrap());
        assert!(!store.append_statement("c1", 1, &[9; 32], &removal).unwrap());
        assert!(!store.append_statement("c2", 1, &[1; 32], &removal).unwrap());
        assert!(store.member("c1", "bob").unwrap().is_some());
        assert_eq!(store.chain("c1", 0, 10, 10, usize::MAX).unwrap().len(), 1);
        assert!(store.append_statement("c1", 1, &[1; 32], &removal).unwrap());
        assert!(
            !store.append_statement("c1", 1, &[1; 32], &removal).unwrap(),
            "the same position twice"
        );
        assert!(store.member("c1", "bob").unwrap().is_none());
        assert!(store.channels_of("bob").unwrap().is_empty());
        assert_eq!(store.channel("c1").unwrap().unwrap().chain_length, 2);
        let chain = store.chain("c1", 0, 2, 10, usize::MAX).unwrap();
        assert_eq!(chain, vec![entry(0), entry(1)]);
        assert_eq!(
            store.chain("c1", 1, 2, 10, usize::MAX).unwrap(),
            vec![entry(1)]
        );
        assert_eq!(
            store.chain("c1", 0, 1, 10, usize::MAX).unwrap(),
            vec![entry(0)]
        );
        assert_eq!(
            store.chain("c1", 0, 2, 10, 0).unwrap(),
            vec![entry(0)],
            "the first always"
        );
        assert!(store.chain("c2", 0, 2, 10, usize::MAX).unwrap().is_empty());

        for i in 1..=5u64 {
            let m = StoredMessage {
                channel_id: "c1".into(),
                index: i,
                client_message_id: vec![i as u8; 16],
                ..Default::default()
            };
            channel.next_index = i + 1;
            store
                .append_message(&channel, &m, &Usage::default())
                .unwrap();
        }
        assert_eq!(store.channel("c1").unwrap().unwrap().next_index, 6);
        let range: Vec<u64> = store
            .messages("c1", 2, 5, 10, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(range, vec![2, 3, 4]);
        assert_eq!(
            store.messages("c1", 1, 100, 2, usize::MAX).unwrap().len(),
            2
        );
        assert!(
            store
                .messages("c2", 1, 100, 10, usize::MAX)
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
        let by_bytes = |from, to, max| -> Vec<u64> {
            store
                .messages("c1", from, to, 10, max)
                .unwrap()
                .iter()
                .map(|m| m.index)
                .collect()
        };
        assert_eq!(by_bytes(1, 6, 0), vec![1]);
        assert_eq!(by_bytes(1, 6, 2 * one + 1), vec![1, 2]);
        let newest: Vec<u64> = store
            .messages_before("c1", 1, 6, 10, 2 * one)
            .unwrap()
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(newest, vec![4, 5]);
        let usage = Usage {
            message_bytes: 7,
            attachment_bytes: 8,
            attachments: 1,
        };
        assert_eq!(store.usage("dave").unwrap(), Usage::default());
        store
            .append_message(
                &channel,
                &StoredMessage {
                    channel_id: "c1".into(),
                    index: 6,
                    sender_identity: "dave".into(),
                    client_message_id: vec![6; 16],
                    ..Default::default()
                },
                &usage,
            )
            .unwrap();
        assert_eq!(store.usage("dave").unwrap(), usage);
        assert_eq!(store.dedupe("c1", &[3; 16]).unwrap(), Some(3));
        assert_eq!(store.dedupe("c1", &[9; 16]).unwrap(), None);

        // Sender-key chains: a record per (channel, sender, chain), a copy
        // per recipient; channels, senders and chains do not mix.
        let chain = SenderKeyChain {
            epoch: 1,
            recipient_card_ids: vec![vec![2; 32], vec![3; 32]],
            server_time_ms: 42,
        };
        let copy = |channel: &str, sender: u8, chain: u8, recipient: u8| {
            store
                .sender_key(channel, &[sender; 32], &[chain; 16], &[recipient; 32])
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
                .unwrap()
                .is_none()
        );
        assert!(copy("c1", 1, 7, 2).is_none());
        let erin = Usage {
            message_bytes: 14,
            ..Usage::default()
        };
        store.put_sender_keys(&put, &erin).unwrap();
        assert_eq!(store.usage("erin").unwrap(), erin, "stored with the copies");
        assert_eq!(
            store.sender_key_chain("c1", &[1; 32], &[7; 16]).unwrap(),
            Some(chain.clone())
        );
        assert_eq!(
            copy("c1", 1, 7, 3),
            Some((b"to three".to_vec(), chain.clone()))
        );
        assert!(copy("c1", 1, 7, 4).is_none());
        assert!(copy("c2", 1, 7, 2).is_none());
        assert!(copy("c1", 2, 7, 2).is_none());
        assert!(copy("c1", 1, 8, 2).is_none());
        // A later put replaces one copy and keeps the others.
        store
            .put_sender_keys(
                &SenderKeysPut {
                    copies: vec![(vec![2; 32], b"again".to_vec())],
                    ..put
                },
                &erin,
            )
            .unwrap();
        assert_eq!(
            copy("c1", 1, 7, 2),
            Some((b"again".to_vec(), chain.clone()))
        );
        assert_eq!(copy("c1", 1, 7, 3), Some((b"to three".to_vec(), chain)));

        store.set_read_horizon("alice", "c1", 4).unwrap();
        assert_eq!(store.read_horizon("alice", "c1").unwrap(), 4);
        assert_eq!(store.read_horizon("bob", "c1").unwrap(), 0);
        store.set_org_member("alice", true).unwrap();
        assert_eq!(store.org_members().unwrap(), vec!["alice".to_string()]);
        store.set_org_member("alice", false).unwrap();
        assert!(store.org_members().unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same behaviour from every store.

    #[test]
    fn memory_store() {
        conformance::exercise(&MemoryStore::default());
    }

    #[tokio::test]
    async fn concurrent_flushes_share_fsyncs() {
        const N: u64 = 32;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let barrier = Arc::new(tokio::sync::Barrier::new(N as usize));
        let writers: Vec<_> = (0..N)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    store
                        .set_read_horizon("alice", &format!("c{i}"), i)
                        .unwrap();
                    barrier.wait().await;
                    store.flush().await.unwrap();
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        // The first flush covers the writer that started it; everyone who
        // asked meanwhile shares the next (on a loaded machine a late
        // writer may need one more): far fewer fsyncs than writers.
        let flushes = store.flushes();
        assert!(
            (2..=N / 8).contains(&flushes),
            "{N} concurrent flushes took {flushes} fsyncs"
        );
        for i in 0..N {
            assert_eq!(store.read_horizon("alice", &format!("c{i}")).unwrap(), i);
        }
        // A write after the last flush gets a flush of its own.
        store.set_read_horizon("bob", "c0", 1).unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.flushes(), flushes + 1);
    }

    #[test]
    fn sled_store() {
        let dir = std::env::temp_dir().join(format!("tessera-server-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        conformance::exercise(&SledStore::open(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
