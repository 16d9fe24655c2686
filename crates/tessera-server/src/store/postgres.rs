//! The PostgreSQL store: several app-server replicas may share one
//! database, which makes each change atomic.
//!
//! Where the embedded stores rely on the caller's in-process locks (one
//! process owns a sled database), this store decides in one transaction:
//!
//! * a batch of messages is stored at the channels' next indices, with
//!   their client ids for deduplication and their senders' usage, under
//!   the channel rows' locks (`SELECT … FOR UPDATE`, by id) and then the
//!   usage rows' (by identity): two replicas cannot give one index twice,
//!   nor store one client message id twice, nor both spend one quota;
//! * a statement extends the membership chain only if the channel row,
//!   locked, still has the expected length and head (compare-and-set);
//! * a write that charges a user's usage (messages, sender keys,
//!   attachments) writes only over the usage the caller read
//!   (compare-and-set on the row), so two replicas cannot both spend the
//!   same quota;
//! * a new device is stored only if its owner has fewer active devices
//!   than the limit, counted under a transaction lock on the owner
//!   ([`DEVICE_LOCK_CLASS`]), so two replicas cannot both enroll the last
//!   one.
//!
//! The schema comes from the SQL files in `migrations/`, compiled in and
//! applied at start (`tessera_service::postgres::migrate`, service
//! `server`). A stored message or statement is announced to every replica
//! by `NOTIFY` in the same transaction (`listen`). A transaction is
//! durable when its COMMIT returns, so `flush` has nothing left to do.
//! Concurrent sends to one channel share one transaction (group commit:
//! the server's per-channel committer calls [`Store::append_messages`]
//! with every send that waited for it), so a channel's sends pay one
//! commit, and about four round trips, per batch rather than per message.

use std::{collections::BTreeMap, time::Duration};

use deadpool_postgres::{GenericClient, Pool};
use prost::Message;
use tessera_proto::server::v1::{ChainEntry, StoredMessage};
pub use tessera_service::postgres::PgOptions;
use tessera_service::{
    metrics::record_store,
    postgres::{
        Migration, PgSetupError, column, config, migrate, pg_error, pool_error, read_pool, to_i64,
    },
    storage::{FlushFuture, StorageError},
};
use thiserror::Error;
use tokio_postgres::{Row, types::ToSql};

use super::{
    Account, Announced, AttachmentRecord, BatchOutcome, ChannelRecord, Device, MemberRecord,
    PendingMessage, SenderKeyChain, SenderKeysPut, StatementChange, Store, StoreFuture, Usage,
    UsageChange, active_besides, batch_keys, decode, extends,
    listen::{CHANNEL, notify},
    plan_batch, take_bounded,
};

/// This service's name in `schema_migrations`.
const SERVICE: &str = "server";

/// Every migration, in order; a database has a prefix of them applied.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial schema",
    sql: include_str!("migrations/0001_initial.sql"),
}];

/// Why the PostgreSQL store could not open.
#[derive(Debug, Error)]
pub enum PgOpenError {
    /// The URL, the schema's version, or the database itself.
    #[error("{0}")]
    Setup(#[from] PgSetupError),
}

impl From<StorageError> for PgOpenError {
    fn from(e: StorageError) -> Self {
        Self::Setup(e.into())
    }
}

/// The first key of the transaction advisory lock
/// `pg_advisory_xact_lock(DEVICE_LOCK_CLASS, hashtext(identity))` that
/// [`Store::add_device`] holds while it counts an identity's devices and
/// adds one (the bytes of "tdev"). An advisory lock rather than the
/// account's row: it needs no row (the organisation's identity has none)
/// and leaves the account's reads and updates alone. Two identities whose
/// hashes collide only wait for each other.
pub(super) const DEVICE_LOCK_CLASS: i32 = 0x7464_6576;

pub struct PgStore {
    pool: Pool,
    /// Batches of sends tried again after PostgreSQL aborted them
    /// (deadlock or serialization failure) since the store opened.
    batch_retries: std::sync::atomic::AtomicU64,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The server-side bound on one statement of the app server's store,
/// unless the URL's `options` set `statement_timeout` (e.g.
/// `?options=-c%20statement_timeout%3D5s`): a hung statement (a lock never
/// released, a stuck backend) fails its call instead of stalling the
/// channel's batches, and the statements waiting for them, for ever.
const STATEMENT_TIMEOUT: &str = "30s";
/// How long a session may sit idle inside a transaction before the server
/// ends it (a client that vanished mid-transaction frees its row locks).
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";

/// `config` with the store's bounds: `statement_timeout` and
/// `idle_in_transaction_session_timeout` (through the startup `options`,
/// added to the URL's own unless it names them), and TCP keepalives (idle
/// 30 s, every 10 s, 3 probes) and a TCP user timeout of 60 s unless the
/// URL sets them, so a peer that vanished without closing the connection
/// (a network partition) fails the call within about a minute instead of
/// never.
fn with_timeouts(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    let own = config.get_options().unwrap_or_default().to_owned();
    let mut options = own.clone();
    for (name, value) in [
        ("statement_timeout", STATEMENT_TIMEOUT),
        (
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        ),
    ] {
        if !own.contains(name) {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={value}"));
        }
    }
    config.options(options);
    config.keepalives(true);
    // The driver's default idle time is 2 hours: shorten only that.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(60));
    }
    config
}

impl PgStore {
    /// Connects, applies the migrations and opens the pool.
    pub async fn open(options: &PgOptions) -> Result<Self, PgOpenError> {
        let config = with_timeouts(config(options, "tessera-server")?);
        let pool = read_pool(config, options.pool_size)?;
        let mut client = pool.get().await.map_err(pool_error)?;
        migrate(&mut client, SERVICE, MIGRATIONS).await?;
        Ok(Self {
            pool,
            batch_retries: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Batches of sends tried again after PostgreSQL aborted them
    /// (deadlock or serialization failure) since the store opened: rows
    /// are locked in one order, so this stays 0 unless something locks
    /// them otherwise.
    pub fn batch_retries(&self) -> u64 {
        self.batch_retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StorageError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&statement, params).await.map_err(pg_error)
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StorageError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.execute(&statement, params).await.map_err(pg_error)
    }

    /// The first column of each row, decoded as a `what` record.
    async fn records<M: Message + Default>(
        &self,
        sql: &str,
        params: Params<'_>,
        what: &'static str,
    ) -> Result<Vec<M>, StorageError> {
        self.query(sql, params)
            .await?
            .iter()
            .map(|row| decode(column(row, 0)?, what))
            .collect()
    }

    async fn record<M: Message + Default>(
        &self,
        sql: &str,
        params: Params<'_>,
        what: &'static str,
    ) -> Result<Option<M>, StorageError> {
        Ok(self.records(sql, params, what).await?.into_iter().next())
    }

    /// Rows of records (first column), bounded as `take_bounded` says.
    async fn bounded<M: Message + Default>(
        &self,
        sql: &str,
        params: Params<'_>,
        limit: usize,
        max_bytes: usize,
        what: &'static str,
    ) -> Result<Vec<M>, StorageError> {
        let rows = self.query(sql, params).await?;
        let raw = take_bounded(
            rows.iter().map(|row| {
                let bytes: &[u8] = column(row, 0)?;
                Ok::<_, StorageError>((bytes.len(), bytes))
            }),
            limit,
            max_bytes,
        )?;
        raw.into_iter().map(|b| decode(b, what)).collect()
    }

    /// Rows of strings (first column).
    async fn strings(&self, sql: &str, params: Params<'_>) -> Result<Vec<String>, StorageError> {
        self.query(sql, params)
            .await?
            .iter()
            .map(|row| column(row, 0))
            .collect()
    }
}

/// A range bound or a limit as a BIGINT: beyond its range means "all"
/// (callers ask up to `u64::MAX`), which `i64::MAX` also means here.
fn bound(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Writes `change.after` as `identity`'s usage if the stored usage is
/// still `change.before` (none stored counts as zero): `false` otherwise.
async fn cas_usage(
    tx: &impl GenericClient,
    identity: &str,
    change: &UsageChange,
) -> Result<bool, StorageError> {
    let (before, after) = (change.before.encode_to_vec(), change.after.encode_to_vec());
    let rows = if change.before == Usage::default() {
        // No row, or a row of zeros (encoded as no bytes): an insert that
        // waits for a concurrent one and then checks what it wrote.
        tx.execute(
            "INSERT INTO server_usage (identity, record) VALUES ($1, $2) \
             ON CONFLICT (identity) DO UPDATE SET record = EXCLUDED.record \
             WHERE server_usage.record = $3",
            &[&identity, &after, &before],
        )
        .await
    } else {
        tx.execute(
            "UPDATE server_usage SET record = $2 WHERE identity = $1 AND record = $3",
            &[&identity, &after, &before],
        )
        .await
    }
    .map_err(pg_error)?;
    Ok(rows == 1)
}

/// Stores a device record (replacing the one with its card id).
async fn put_device(tx: &impl GenericClient, d: &Device) -> Result<(), StorageError> {
    tx.execute(
        "INSERT INTO server_devices (card_id, identity, record) VALUES ($1, $2, $3) \
         ON CONFLICT (card_id) DO UPDATE SET identity = EXCLUDED.identity, \
         record = EXCLUDED.record",
        &[&d.card_id, &d.identity, &d.encode_to_vec()],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// The channel's row, locked until the transaction ends.
async fn lock_channel(
    tx: &impl GenericClient,
    channel_id: &str,
) -> Result<Option<ChannelRecord>, StorageError> {
    tx.query_opt(
        "SELECT record FROM server_channels WHERE channel_id = $1 FOR UPDATE",
        &[&channel_id],
    )
    .await
    .map_err(pg_error)?
    .map(|row| decode(column(&row, 0)?, "channel"))
    .transpose()
}

/// Tries of a batch of sends that PostgreSQL aborted for a deadlock or a
/// serialization failure.
const BATCH_ATTEMPTS: usize = 8;

/// Why one try of a batch failed: the database's own error (which may be
/// worth a retry) or anything else.
enum BatchError {
    Pg(tokio_postgres::Error),
    Store(StorageError),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl From<StorageError> for BatchError {
    fn from(e: StorageError) -> Self {
        Self::Store(e)
    }
}

/// A deadlock or serialization failure: the transaction was rolled back
/// and the same one may succeed again.
fn retryable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

impl PgStore {
    /// One try of [`Store::append_messages`], in one transaction of four
    /// round trips whatever the batch's size: BEGIN; the reads, pipelined
    /// (the channels' rows locked in id order, the stored client ids, the
    /// senders' usage rows made if missing and locked in identity order);
    /// the writes, pipelined, one multi-row statement each (messages,
    /// client ids, usage, channels, and one NOTIFY per channel with its
    /// last index: a replica's subscribers read what they lack from the
    /// store by index, so the last one is enough); COMMIT. Locking
    /// channels before usage, and usage alone
    /// elsewhere (sender keys, attachments), two batches or a batch and
    /// another write never wait for each other in a cycle.
    async fn append_batch(
        &self,
        batch: &[PendingMessage],
    ) -> Result<Vec<BatchOutcome>, BatchError> {
        let (channel_ids, senders) = batch_keys(batch);
        let (ids, client_ids): (Vec<&str>, Vec<&[u8]>) = batch
            .iter()
            .map(|p| {
                (
                    p.message.channel_id.as_str(),
                    p.message.client_message_id.as_slice(),
                )
            })
            .unzip();
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        let (lock_channels, read_ids, make_usage, lock_usage) = futures_util::try_join!(
            tx.prepare_cached(
                "SELECT channel_id, record FROM server_channels WHERE channel_id = ANY($1) \
                 ORDER BY channel_id FOR UPDATE"
            ),
            tx.prepare_cached(
                "SELECT d.channel_id, d.client_message_id, d.idx FROM server_dedupe d \
                 JOIN unnest($1::text[], $2::bytea[]) AS q(channel_id, client_message_id) \
                 USING (channel_id, client_message_id)"
            ),
            // A missing row is made first (zero usage: no bytes), so every
            // sender's row exists to be locked, in order.
            tx.prepare_cached(
                "INSERT INTO server_usage (identity, record) \
                 SELECT i, ''::bytea FROM unnest($1::text[]) AS i ORDER BY i \
                 ON CONFLICT (identity) DO NOTHING"
            ),
            tx.prepare_cached(
                "SELECT identity, record FROM server_usage WHERE identity = ANY($1) \
                 ORDER BY identity FOR UPDATE"
            ),
        )?;
        let (by_channel, by_id, by_sender): (Params<'_>, Params<'_>, Params<'_>) =
            (&[&channel_ids], &[&ids, &client_ids], &[&senders]);
        let (channel_rows, id_rows, _, usage_rows) = futures_util::try_join!(
            tx.query(&lock_channels, by_channel),
            tx.query(&read_ids, by_id),
            tx.execute(&make_usage, by_sender),
            tx.query(&lock_usage, by_sender),
        )?;
        let mut channels = BTreeMap::new();
        for row in &channel_rows {
            channels.insert(column(row, 0)?, decode(column(row, 1)?, "channel")?);
        }
        let mut stored_ids = BTreeMap::new();
        for row in &id_rows {
            let index: i64 = column(row, 2)?;
            stored_ids.insert((column(row, 0)?, column(row, 1)?), index as u64);
        }
        let mut usage = BTreeMap::new();
        for row in &usage_rows {
            usage.insert(column(row, 0)?, decode(column(row, 1)?, "usage")?);
        }
        let plan = plan_batch(batch, channels, stored_ids, usage);
        if plan.messages.is_empty() {
            return Ok(plan.outcomes); // nothing to write: rolled back when dropped
        }
        let mut m_ids = Vec::new();
        let mut m_indices = Vec::new();
        let mut m_records = Vec::new();
        let mut m_client_ids = Vec::new();
        for m in &plan.messages {
            m_ids.push(m.channel_id.as_str());
            m_indices.push(to_i64(m.index)?);
            m_records.push(m.encode_to_vec());
            m_client_ids.push(m.client_message_id.as_slice());
        }
        let (u_ids, u_records): (Vec<&str>, Vec<Vec<u8>>) = plan
            .usage
            .iter()
            .map(|(identity, u)| (identity.as_str(), u.encode_to_vec()))
            .unzip();
        let (c_ids, c_records): (Vec<&str>, Vec<Vec<u8>>) = plan
            .channels
            .iter()
            .map(|(id, c)| (id.as_str(), c.encode_to_vec()))
            .unzip();
        let payloads: Vec<String> = plan
            .channels
            .iter()
            .filter_map(|(id, c)| {
                Announced::Message {
                    channel_id: id.clone(),
                    index: c.next_index - 1,
                }
                .payload()
            })
            .collect();
        let (put_messages, put_ids, put_usage, put_channels, announce) = futures_util::try_join!(
            tx.prepare_cached(
                "INSERT INTO server_messages (channel_id, idx, record) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])"
            ),
            tx.prepare_cached(
                "INSERT INTO server_dedupe (channel_id, client_message_id, idx) \
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])"
            ),
            tx.prepare_cached(
                "UPDATE server_usage SET record = u.record \
                 FROM unnest($1::text[], $2::bytea[]) AS u(identity, record) \
                 WHERE server_usage.identity = u.identity"
            ),
            tx.prepare_cached(
                "UPDATE server_channels SET record = c.record \
                 FROM unnest($1::text[], $2::bytea[]) AS c(channel_id, record) \
                 WHERE server_channels.channel_id = c.channel_id"
            ),
            tx.prepare_cached("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"),
        )?;
        let messages: Params<'_> = &[&m_ids, &m_indices, &m_records];
        let client_ids: Params<'_> = &[&m_ids, &m_client_ids, &m_indices];
        let usage: Params<'_> = &[&u_ids, &u_records];
        let channels: Params<'_> = &[&c_ids, &c_records];
        let notices: Params<'_> = &[&CHANNEL, &payloads];
        futures_util::try_join!(
            tx.execute(&put_messages, messages),
            tx.execute(&put_ids, client_ids),
            tx.execute(&put_usage, usage),
            tx.execute(&put_channels, channels),
            tx.execute(&announce, notices),
        )?;
        tx.commit().await?;
        Ok(plan.outcomes)
    }
}

impl Store for PgStore {
    fn account<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<Account>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM server_accounts WHERE identity = $1",
                &[&identity],
                "account",
            )
            .await
        })
    }

    fn create_account<'a>(&'a self, account: &'a Account) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let rows = self
                .execute(
                    "INSERT INTO server_accounts (identity, record) VALUES ($1, $2) \
                     ON CONFLICT (identity) DO NOTHING",
                    &[&account.identity, &account.encode_to_vec()],
                )
                .await?;
            Ok(rows == 1)
        })
    }

    fn replace_account<'a>(&'a self, old: &'a Account, new: &'a Account) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let rows = self
                .execute(
                    "UPDATE server_accounts SET record = $3 WHERE identity = $1 AND record = $2",
                    &[&old.identity, &old.encode_to_vec(), &new.encode_to_vec()],
                )
                .await?;
            Ok(rows == 1)
        })
    }

    fn devices<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<Device>> {
        Box::pin(async move {
            self.records(
                "SELECT record FROM server_devices WHERE identity = $1 ORDER BY card_id",
                &[&identity],
                "device",
            )
            .await
        })
    }

    fn device<'a>(&'a self, card_id: &'a [u8]) -> StoreFuture<'a, Option<Device>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM server_devices WHERE card_id = $1",
                &[&card_id],
                "device",
            )
            .await
        })
    }

    fn put_devices<'a>(&'a self, devices: &'a [Device]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            for d in devices {
                put_device(&tx, d).await?;
            }
            tx.commit().await.map_err(pg_error)
        })
    }

    fn add_device<'a>(
        &'a self,
        device: &'a Device,
        superseded: Option<&'a Device>,
        max_active: usize,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&DEVICE_LOCK_CLASS, &device.identity],
            )
            .await
            .map_err(pg_error)?;
            let stored = tx
                .query(
                    "SELECT record FROM server_devices WHERE identity = $1",
                    &[&device.identity],
                )
                .await
                .map_err(pg_error)?
                .iter()
                .map(|row| decode(column(row, 0)?, "device"))
                .collect::<Result<Vec<Device>, _>>()?;
            if active_besides(&stored, device) >= max_active {
                return Ok(false); // the transaction rolls back when dropped
            }
            for d in std::iter::once(device).chain(superseded) {
                put_device(&tx, d).await?;
            }
            tx.commit().await.map_err(pg_error)?;
            Ok(true)
        })
    }

    fn org_members(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            self.strings(
                "SELECT identity FROM server_org_members ORDER BY identity",
                &[],
            )
            .await
        })
    }

    fn set_org_member<'a>(&'a self, identity: &'a str, member: bool) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let sql = if member {
                "INSERT INTO server_org_members (identity) VALUES ($1) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM server_org_members WHERE identity = $1"
            };
            self.execute(sql, &[&identity]).await.map(|_| ())
        })
    }

    fn channel<'a>(&'a self, channel_id: &'a str) -> StoreFuture<'a, Option<ChannelRecord>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM server_channels WHERE channel_id = $1",
                &[&channel_id],
                "channel",
            )
            .await
        })
    }

    fn member<'a>(
        &'a self,
        channel_id: &'a str,
        identity: &'a str,
    ) -> StoreFuture<'a, Option<MemberRecord>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM server_members WHERE channel_id = $1 AND identity = $2",
                &[&channel_id, &identity],
                "member",
            )
            .await
        })
    }

    fn members<'a>(&'a self, channel_id: &'a str) -> StoreFuture<'a, Vec<MemberRecord>> {
        Box::pin(async move {
            self.records(
                "SELECT record FROM server_members WHERE channel_id = $1 ORDER BY identity",
                &[&channel_id],
                "member",
            )
            .await
        })
    }

    fn channels_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            self.strings(
                "SELECT channel_id FROM server_members WHERE identity = $1 ORDER BY channel_id",
                &[&identity],
            )
            .await
        })
    }

    fn append_statement<'a>(
        &'a self,
        channel_id: &'a str,
        expected_length: u64,
        expected_head: &'a [u8],
        change: &'a StatementChange,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let current = lock_channel(&tx, channel_id).await?;
            if !extends(current.as_ref(), expected_length, expected_head) {
                return Ok(false); // the transaction rolls back when dropped
            }
            // Placed after every message stored so far: the row is locked.
            let change = &change.placed(current.as_ref());
            let record = change.channel.encode_to_vec();
            let written = if current.is_none() {
                // A creation: another replica may create the same id at once.
                tx.execute(
                    "INSERT INTO server_channels (channel_id, record) VALUES ($1, $2) \
                     ON CONFLICT (channel_id) DO NOTHING",
                    &[&channel_id, &record],
                )
                .await
            } else {
                tx.execute(
                    "UPDATE server_channels SET record = $2 WHERE channel_id = $1",
                    &[&channel_id, &record],
                )
                .await
            }
            .map_err(pg_error)?;
            if written != 1 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO server_chain (channel_id, epoch, entry) VALUES ($1, $2, $3)",
                &[
                    &channel_id,
                    &to_i64(expected_length)?,
                    &change.entry.encode_to_vec(),
                ],
            )
            .await
            .map_err(pg_error)?;
            for m in &change.put_members {
                tx.execute(
                    "INSERT INTO server_members (channel_id, identity, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (channel_id, identity) DO UPDATE SET record = EXCLUDED.record",
                    &[&channel_id, &m.identity, &m.encode_to_vec()],
                )
                .await
                .map_err(pg_error)?;
            }
            for identity in &change.remove_members {
                tx.execute(
                    "DELETE FROM server_members WHERE channel_id = $1 AND identity = $2",
                    &[&channel_id, identity],
                )
                .await
                .map_err(pg_error)?;
            }
            let chain = Announced::Chain {
                channel_id: channel_id.to_owned(),
                length: change.channel.chain_length,
            };
            notify(&tx, &chain).await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(true)
        })
    }

    fn chain<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<ChainEntry>> {
        Box::pin(async move {
            if from >= to {
                return Ok(Vec::new());
            }
            self.bounded(
                "SELECT entry FROM server_chain WHERE channel_id = $1 AND epoch >= $2 \
                 AND epoch < $3 ORDER BY epoch LIMIT $4",
                &[&channel_id, &bound(from), &bound(to), &bound(limit as u64)],
                limit,
                max_bytes,
                "chain entry",
            )
            .await
        })
    }

    fn dedupe<'a>(
        &'a self,
        channel_id: &'a str,
        client_message_id: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let rows = self
                .query(
                    "SELECT idx FROM server_dedupe WHERE channel_id = $1 AND client_message_id = $2",
                    &[&channel_id, &client_message_id],
                )
                .await?;
            record_store("dedupe", started);
            rows.first()
                .map(|row| Ok(column::<i64>(row, 0)? as u64))
                .transpose()
        })
    }

    fn append_messages<'a>(
        &'a self,
        batch: &'a [PendingMessage],
    ) -> StoreFuture<'a, Vec<BatchOutcome>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let mut attempt = 1;
            loop {
                match self.append_batch(batch).await {
                    Ok(outcomes) => {
                        record_store("append_messages", started);
                        return Ok(outcomes);
                    }
                    // Rows are locked in a fixed order, so this is rare
                    // (a transaction elsewhere that locks them otherwise):
                    // nothing was written, the batch is tried again whole.
                    Err(BatchError::Pg(e)) if retryable(&e) && attempt < BATCH_ATTEMPTS => {
                        self.batch_retries
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(attempt, error = %e, "a batch of sends was aborted by PostgreSQL; trying it again");
                        attempt += 1;
                    }
                    Err(BatchError::Pg(e)) => return Err(pg_error(e)),
                    Err(BatchError::Store(e)) => return Err(e),
                }
            }
        })
    }

    fn batch_needs_user_locks(&self) -> bool {
        // Usage rows are locked FOR UPDATE in the batch's transaction;
        // sender keys and attachments compare-and-set them (`cas_usage`).
        false
    }

    fn message_range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        newest_first: bool,
    ) -> StoreFuture<'a, Vec<StoredMessage>> {
        Box::pin(async move {
            if from >= to {
                return Ok(Vec::new());
            }
            let started = std::time::Instant::now();
            let sql = if newest_first {
                "SELECT record FROM server_messages WHERE channel_id = $1 AND idx >= $2 \
                 AND idx < $3 ORDER BY idx DESC LIMIT $4"
            } else {
                "SELECT record FROM server_messages WHERE channel_id = $1 AND idx >= $2 \
                 AND idx < $3 ORDER BY idx LIMIT $4"
            };
            let messages = self
                .bounded(
                    sql,
                    &[&channel_id, &bound(from), &bound(to), &bound(limit as u64)],
                    limit,
                    max_bytes,
                    "message",
                )
                .await;
            record_store("messages", started);
            messages
        })
    }

    fn usage<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Usage> {
        Box::pin(async move {
            Ok(self
                .record(
                    "SELECT record FROM server_usage WHERE identity = $1",
                    &[&identity],
                    "usage",
                )
                .await?
                .unwrap_or_default())
        })
    }

    fn read_horizon<'a>(&'a self, identity: &'a str, channel_id: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT idx FROM server_read_horizons WHERE identity = $1 AND channel_id = $2",
                    &[&identity, &channel_id],
                )
                .await?;
            rows.first()
                .map_or(Ok(0), |row| Ok(column::<i64>(row, 0)? as u64))
        })
    }

    fn set_read_horizon<'a>(
        &'a self,
        identity: &'a str,
        channel_id: &'a str,
        index: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "INSERT INTO server_read_horizons (identity, channel_id, idx) VALUES ($1, $2, $3) \
                 ON CONFLICT (identity, channel_id) DO UPDATE SET idx = EXCLUDED.idx",
                &[&identity, &channel_id, &to_i64(index)?],
            )
            .await
            .map(|_| ())
        })
    }

    fn attachment<'a>(
        &'a self,
        attachment_id: &'a str,
    ) -> StoreFuture<'a, Option<AttachmentRecord>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM server_attachments WHERE attachment_id = $1",
                &[&attachment_id],
                "attachment",
            )
            .await
        })
    }

    fn put_attachment<'a>(
        &'a self,
        record: &'a AttachmentRecord,
        usage: &'a UsageChange,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            if !cas_usage(&tx, &record.uploader, usage).await? {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO server_attachments (attachment_id, record) VALUES ($1, $2) \
                 ON CONFLICT (attachment_id) DO UPDATE SET record = EXCLUDED.record",
                &[&record.attachment_id, &record.encode_to_vec()],
            )
            .await
            .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
            Ok(true)
        })
    }

    fn sender_key_chain<'a>(
        &'a self,
        channel_id: &'a str,
        sender_card_id: &'a [u8],
        chain_id: &'a [u8],
    ) -> StoreFuture<'a, Option<SenderKeyChain>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM server_sender_key_chains \
             WHERE channel_id = $1 AND sender_card_id = $2 AND chain_id = $3",
                &[&channel_id, &sender_card_id, &chain_id],
                "sender-key chain",
            )
            .await
        })
    }

    fn sender_key<'a>(
        &'a self,
        channel_id: &'a str,
        sender_card_id: &'a [u8],
        chain_id: &'a [u8],
        recipient_card_id: &'a [u8],
    ) -> StoreFuture<'a, Option<(Vec<u8>, SenderKeyChain)>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT k.copy, c.record FROM server_sender_keys k \
                     LEFT JOIN server_sender_key_chains c USING (channel_id, sender_card_id, chain_id) \
                     WHERE k.channel_id = $1 AND k.sender_card_id = $2 AND k.chain_id = $3 \
                     AND k.recipient_card_id = $4",
                    &[&channel_id, &sender_card_id, &chain_id, &recipient_card_id],
                )
                .await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let chain: Option<&[u8]> = column(row, 1)?;
            let chain = chain.ok_or(StorageError::Corrupt("sender-key copy without its chain"))?;
            Ok(Some((column(row, 0)?, decode(chain, "sender-key chain")?)))
        })
    }

    fn put_sender_keys<'a>(
        &'a self,
        put: &'a SenderKeysPut,
        usage: &'a UsageChange,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            if !cas_usage(&tx, &put.sender_identity, usage).await? {
                return Ok(false);
            }
            let (id, sender, chain) = (&put.channel_id, &put.sender_card_id, &put.chain_id);
            tx.execute(
                "INSERT INTO server_sender_key_chains (channel_id, sender_card_id, chain_id, record) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (channel_id, sender_card_id, chain_id) \
                 DO UPDATE SET record = EXCLUDED.record",
                &[id, sender, chain, &put.chain.encode_to_vec()],
            )
            .await
            .map_err(pg_error)?;
            let statement = tx
                .prepare(
                    "INSERT INTO server_sender_keys \
                     (channel_id, sender_card_id, chain_id, recipient_card_id, copy) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (channel_id, sender_card_id, chain_id, recipient_card_id) \
                     DO UPDATE SET copy = EXCLUDED.copy",
                )
                .await
                .map_err(pg_error)?;
            for (recipient, copy) in &put.copies {
                tx.execute(&statement, &[id, sender, chain, recipient, copy])
                    .await
                    .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)?;
            record_store("put_sender_keys", started);
            Ok(true)
        })
    }

    fn flush(&self) -> FlushFuture<'_> {
        // Every write committed before its method returned.
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use tessera_testkit::Postgres;

    use super::*;
    use crate::store::DeviceStatus;
    use crate::store::conformance;

    fn options(pg: &Postgres) -> PgOptions {
        PgOptions {
            url: pg.url("postgres"),
            pool_size: 4,
        }
    }

    #[tokio::test]
    async fn postgres_store() {
        let pg = Postgres::start();
        conformance::exercise(&PgStore::open(&options(&pg)).await.unwrap()).await;
    }

    #[tokio::test]
    async fn migrations_are_applied_once_and_a_newer_schema_is_refused() {
        let pg = Postgres::start();
        let store = PgStore::open(&options(&pg)).await.unwrap();
        drop(store);
        // Again: nothing is applied twice (the tables exist).
        let store = PgStore::open(&options(&pg)).await.unwrap();
        let client = store.pool.get().await.unwrap();
        let applied: Vec<i32> = client
            .query(
                "SELECT version FROM schema_migrations WHERE service = 'server' ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(applied, vec![1]);
        client
            .execute(
                "INSERT INTO schema_migrations (service, version, name) VALUES ('server', 99, 'future')",
                &[],
            )
            .await
            .unwrap();
        let Err(e) = PgStore::open(&options(&pg)).await else {
            panic!("a schema newer than the binary was accepted")
        };
        assert!(
            matches!(
                e,
                PgOpenError::Setup(PgSetupError::NewerSchema {
                    found: 99,
                    known: 1,
                    ..
                })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("upgrade tessera-server"), "{e}");
    }

    /// Two stores on one database (two replicas) enroll devices of one
    /// user at once, each seeing room under the limit before it writes: the
    /// database lets exactly the limit in.
    #[tokio::test]
    async fn replicas_never_enroll_past_the_device_limit() {
        const LIMIT: usize = 3;
        let pg = Postgres::start();
        let a = std::sync::Arc::new(PgStore::open(&options(&pg)).await.unwrap());
        let b = std::sync::Arc::new(PgStore::open(&options(&pg)).await.unwrap());
        // Every pooled connection made beforehand, so the enrollments below
        // reach the database together rather than one per new connection.
        let warm: Vec<_> = (0..8)
            .map(|n| if n % 2 == 0 { &a } else { &b }.devices("alice"))
            .collect();
        futures_util::future::try_join_all(warm).await.unwrap();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for n in 0..16u8 {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let device = Device {
                    card_id: vec![n; 32],
                    identity: "alice".into(),
                    status: DeviceStatus::Active as i32,
                    ..Default::default()
                };
                barrier.wait().await;
                store.add_device(&device, None, LIMIT).await.unwrap()
            }));
        }
        let mut added = 0;
        for t in tasks {
            added += usize::from(t.await.unwrap());
        }
        assert_eq!(added, LIMIT, "as many enrollments accepted as the limit");
        assert_eq!(a.devices("alice").await.unwrap().len(), LIMIT, "and stored");
    }

    /// The database stopped: calls fail as UNAVAILABLE (not INTERNAL);
    /// started again: the pool drops the connections the restart ended and
    /// the same store works on fresh ones.
    #[tokio::test]
    async fn calls_are_unavailable_while_the_database_is_down_then_work_again() {
        let mut pg = Postgres::start();
        let store = PgStore::open(&options(&pg)).await.unwrap();
        let account = Account {
            identity: "alice".into(),
            ..Default::default()
        };
        assert!(store.create_account(&account).await.unwrap());
        // Every pooled connection in use once, so the pool holds several.
        let reads: Vec<_> = (0..4).map(|_| store.account("alice")).collect();
        for read in futures_util::future::join_all(reads).await {
            assert!(read.unwrap().is_some());
        }
        pg.stop();
        let down = store.account("alice").await.unwrap_err();
        assert!(
            matches!(down, StorageError::Unavailable { .. }),
            "while the database is down: {down:?}"
        );
        assert_eq!(tonic::Status::from(down).code(), tonic::Code::Unavailable);
        pg.start_again();
        for _ in 0..8 {
            assert_eq!(
                store.account("alice").await.unwrap(),
                Some(account.clone()),
                "answered on a fresh connection"
            );
        }
        assert!(
            store
                .create_account(&Account {
                    identity: "bob".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
        );
    }

    /// Two stores on one database (two replicas) store batches at once,
    /// each spanning two channels (named in either order) and four
    /// senders, some repeating another batch's client ids: the database
    /// lets no index be stored twice or skipped, each id once, each charge
    /// once, and no batch fails (rows are locked in one order: no
    /// deadlock).
    #[tokio::test]
    async fn replicas_store_concurrent_batches_without_gaps_or_deadlocks() {
        const TASKS: u8 = 8;
        const BATCHES: u8 = 6;
        let pg = Postgres::start();
        let a = std::sync::Arc::new(PgStore::open(&options(&pg)).await.unwrap());
        let b = std::sync::Arc::new(PgStore::open(&options(&pg)).await.unwrap());
        for id in ["c", "d"] {
            let creation = StatementChange {
                channel: ChannelRecord {
                    channel_id: id.into(),
                    next_index: 1,
                    chain_length: 1,
                    chain_head: vec![1; 32],
                    ..Default::default()
                },
                entry: ChainEntry::default(),
                put_members: vec![],
                remove_members: vec![],
            };
            assert!(a.append_statement(id, 0, &[], &creation).await.unwrap());
        }
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(usize::from(TASKS)));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = if t % 2 == 0 { a.clone() } else { b.clone() };
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut stored = Vec::new();
                for n in 0..BATCHES {
                    // Channels and senders named in either order.
                    let ks: Vec<u8> = if t % 2 == 0 {
                        (0..8).collect()
                    } else {
                        (0..8).rev().collect()
                    };
                    let batch: Vec<PendingMessage> = ks
                        .into_iter()
                        .map(|k| {
                            // Tasks t and t^1 send the same ids in batch 0.
                            let id = if n == 0 { [t / 2, 0, k] } else { [t, n, k] };
                            PendingMessage {
                                chain_length: 1,
                                message: StoredMessage {
                                    channel_id: ["c", "d"][usize::from(k % 2)].into(),
                                    sender_identity: format!("u{}", (k + t) % 4),
                                    client_message_id: [&id[..], &[0xee; 13]].concat(),
                                    ..Default::default()
                                },
                                max_message_bytes: u64::MAX,
                            }
                        })
                        .collect();
                    let outcomes = store.append_messages(&batch).await.unwrap();
                    for (p, o) in batch.iter().zip(outcomes) {
                        match o {
                            BatchOutcome::Stored(i) => stored.push((
                                p.message.channel_id.clone(),
                                i,
                                p.message.client_message_id.clone(),
                                p.message.sender_identity.clone(),
                            )),
                            BatchOutcome::Duplicate(_) => assert_eq!(n, 0, "only batch 0 repeats"),
                            other => panic!("{other:?}"),
                        }
                    }
                }
                stored
            }));
        }
        let mut stored = Vec::new();
        for t in tasks {
            stored.extend(t.await.unwrap());
        }
        // Batch 0: 4 distinct id sets of 8; then 8 tasks × 5 batches × 8.
        let total = 4 * 8 + usize::from(TASKS) * usize::from(BATCHES - 1) * 8;
        assert_eq!(stored.len(), total, "each id stored once");
        for id in ["c", "d"] {
            let mut indices: Vec<u64> = stored.iter().filter(|s| s.0 == id).map(|s| s.1).collect();
            indices.sort_unstable();
            let n = indices.len() as u64;
            assert_eq!(
                indices,
                (1..=n).collect::<Vec<u64>>(),
                "{id}: each index once"
            );
            let messages = a
                .messages(id, 1, u64::MAX, usize::MAX, usize::MAX)
                .await
                .unwrap();
            assert_eq!(messages.len() as u64, n);
            assert_eq!(a.channel(id).await.unwrap().unwrap().next_index, n + 1);
        }
        for u in 0..4 {
            let identity = format!("u{u}");
            let charged: u64 = stored
                .iter()
                .filter(|s| s.3 == identity)
                .map(|s| {
                    StoredMessage {
                        channel_id: s.0.clone(),
                        index: s.1,
                        sender_identity: s.3.clone(),
                        client_message_id: s.2.clone(),
                        ..Default::default()
                    }
                    .encoded_len() as u64
                })
                .sum();
            assert_eq!(
                b.usage(&identity).await.unwrap().message_bytes,
                charged,
                "every charge counted once"
            );
        }
        // Rows locked in one order: PostgreSQL aborted no batch (a retry
        // would hide a lock-order bug, only slower).
        assert_eq!(
            (a.batch_retries(), b.batch_retries()),
            (0, 0),
            "no deadlock or serialization failure retried"
        );
    }

    /// One replica stores batches in a loop while another appends
    /// statements, each built from a read of the channel made before some
    /// of those batches: every statement is stored (none starved by the
    /// messages), each at the channel's `next_index` when it was written,
    /// so every message's epoch is the one its index falls under.
    #[tokio::test]
    async fn a_statement_is_placed_after_the_batches_another_replica_stored() {
        const STATEMENTS: u8 = 6;
        let pg = Postgres::start();
        let a = std::sync::Arc::new(PgStore::open(&options(&pg)).await.unwrap());
        let b = std::sync::Arc::new(PgStore::open(&options(&pg)).await.unwrap());
        let record = |length: u8| ChannelRecord {
            channel_id: "c".into(),
            next_index: 1,
            chain_length: u64::from(length),
            chain_head: vec![length; 32],
            ..Default::default()
        };
        let creation = StatementChange {
            channel: record(1),
            entry: ChainEntry {
                next_index: 1,
                ..Default::default()
            },
            put_members: vec![],
            remove_members: vec![],
        };
        assert!(a.append_statement("c", 0, &[], &creation).await.unwrap());
        let batch = |channel: &ChannelRecord, n: u32| -> Vec<PendingMessage> {
            (0..4u32)
                .map(|k| PendingMessage {
                    chain_length: channel.chain_length,
                    message: StoredMessage {
                        channel_id: "c".into(),
                        sender_identity: "u".into(),
                        client_message_id: [&n.to_be_bytes()[..], &k.to_be_bytes(), &[0; 8]]
                            .concat(),
                        epoch: channel.chain_length - 1,
                        ..Default::default()
                    },
                    max_message_bytes: u64::MAX,
                })
                .collect()
        };
        // The statement's read, then a batch of the other replica, then
        // the statement: placed after the batch, not refused.
        let read = a.channel("c").await.unwrap().unwrap();
        let first = batch(&read, 0);
        assert!(
            b.append_messages(&first)
                .await
                .unwrap()
                .iter()
                .all(|o| matches!(o, BatchOutcome::Stored(_)))
        );
        let mut statements = 0u8;
        let statement = |read: &ChannelRecord, length: u8| StatementChange {
            channel: ChannelRecord {
                chain_length: u64::from(length),
                chain_head: vec![length; 32],
                ..read.clone()
            },
            entry: ChainEntry {
                next_index: read.next_index,
                server_time_ms: i64::from(length),
                ..Default::default()
            },
            put_members: vec![],
            remove_members: vec![],
        };
        assert!(
            a.append_statement("c", 1, &[1; 32], &statement(&read, 2))
                .await
                .unwrap(),
            "messages stored since the read do not refuse the statement"
        );
        statements += 1;
        assert_eq!(
            a.chain("c", 1, 2, 1, usize::MAX).await.unwrap()[0].next_index,
            5,
            "placed after the other replica's batch"
        );
        // Now at once: batches on b in a loop, statements on a.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (b, done) = (b.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 1;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let channel = b.channel("c").await.unwrap().unwrap();
                    b.append_messages(&batch(&channel, n)).await.unwrap();
                    n += 1;
                }
            })
        };
        while statements < STATEMENTS {
            let read = a.channel("c").await.unwrap().unwrap();
            // Room for the other replica's batches between read and write.
            let _ = a.dedupe("c", &[0; 16]).await.unwrap();
            let length = 2 + statements;
            assert!(
                a.append_statement(
                    "c",
                    read.chain_length,
                    &read.chain_head,
                    &statement(&read, length)
                )
                .await
                .unwrap(),
                "statement {length} stored"
            );
            statements += 1;
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.await.unwrap();
        let channel = a.channel("c").await.unwrap().unwrap();
        assert_eq!(channel.chain_length, u64::from(STATEMENTS) + 1);
        let chain = a
            .chain("c", 0, u64::MAX, usize::MAX, usize::MAX)
            .await
            .unwrap();
        let messages = a
            .messages("c", 1, u64::MAX, usize::MAX, usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            messages.iter().map(|m| m.index).collect::<Vec<_>>(),
            (1..channel.next_index).collect::<Vec<_>>(),
            "no index skipped or stored twice"
        );
        for m in &messages {
            let epoch = usize::try_from(m.epoch).unwrap();
            let from = chain[epoch].next_index;
            let to = chain.get(epoch + 1).map_or(u64::MAX, |e| e.next_index);
            assert!(
                (from..to).contains(&m.index),
                "message {} sealed at epoch {epoch} lies in {from}..{to}",
                m.index
            );
        }
    }

    /// The store's connections carry a statement timeout and an idle in
    /// transaction timeout, unless the URL's options set their own.
    #[tokio::test]
    async fn connections_carry_statement_timeouts_unless_the_url_sets_them() {
        let pg = Postgres::start();
        let show = |store: PgStore, name: &'static str| async move {
            let rows = store.query(&format!("SHOW {name}"), &[]).await.unwrap();
            column::<String>(&rows[0], 0).unwrap()
        };
        let store = PgStore::open(&options(&pg)).await.unwrap();
        assert_eq!(show(store, "statement_timeout").await, "30s");
        let store = PgStore::open(&options(&pg)).await.unwrap();
        assert_eq!(
            show(store, "idle_in_transaction_session_timeout").await,
            "1min"
        );
        let own = PgOptions {
            url: format!("{}?options=-c%20statement_timeout%3D5s", options(&pg).url),
            ..options(&pg)
        };
        let store = PgStore::open(&own).await.unwrap();
        assert_eq!(
            show(store, "statement_timeout").await,
            "5s",
            "the URL's own"
        );
    }
}
