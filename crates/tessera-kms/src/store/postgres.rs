//! The PostgreSQL store: several machines can reach the key service's data,
//! and the database makes each append atomic (one transaction).
//!
//! The key service keeps its Merkle tree in memory, so it must be the only
//! writer of its database. At start the store opens a connection of its own
//! and takes a session advisory lock on it ([`WRITER_LOCK_KEY`]); a second
//! key service on the same database finds the lock taken and refuses to
//! start. Every append runs on that connection, so no write can happen
//! without the lock: if the connection ends (the database restarted, the
//! network failed), the lock is gone too and every later write is refused
//! until a restart rebuilds the tree from the database. Reads go through a
//! pool of other connections.
//!
//! The schema comes from the SQL files in `migrations/`, compiled in and
//! applied at start in one transaction; `schema_migrations` records which
//! ones a database has.
//!
//! Durability: a transaction is durable when its COMMIT returns (PostgreSQL's
//! default `synchronous_commit = on`), so `flush` has nothing left to do.
//! The key service appends one entry at a time (its write lock covers the
//! flush), so there is no batch for a group commit to gather: one
//! transaction per append, as sled has one flush per append.

use deadpool_postgres::Pool;
use futures_util::TryStreamExt;
use prost::Message;
use tessera_card::{CardId, transparency::Hash};
use tessera_proto::transparency::v1::SignedCheckpoint;
pub use tessera_service::postgres::PgOptions;
use tessera_service::{
    metrics::record_store,
    postgres::{
        Migration, PgSetupError, column, config, connect, migrate, pg_error, pool_error, read_pool,
        to_i64,
    },
    storage::{FlushFuture, StorageError},
};
use thiserror::Error;
use tokio_postgres::{
    Client, Row, Statement,
    binary_copy::BinaryCopyInWriter,
    types::{ToSql, Type},
};

use super::{
    Append, Store, StoreFuture, StoredCard, StoredDeviceList, decode_card, decode_checkpoint,
    decode_device_list, leaf_hash, record_id,
};

/// The session advisory lock the writing key service holds
/// (`pg_try_advisory_lock`): the bytes of "tesskms1".
pub const WRITER_LOCK_KEY: i64 = 0x7465_7373_6b6d_7331;
/// This service's name in `schema_migrations`.
const SERVICE: &str = "kms";

/// Every migration, in order; a database has a prefix of them applied.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial schema",
    sql: include_str!("migrations/0001_initial.sql"),
}];

/// Why the PostgreSQL store could not open.
#[derive(Debug, Error)]
pub enum PgOpenError {
    #[error(
        "another tessera-kms is already the writer of this database: it holds the single-writer lock \
         (PostgreSQL advisory lock {WRITER_LOCK_KEY}{holder}); stop it first"
    )]
    Locked { holder: String },
    /// The URL, the schema's version, or the database itself.
    #[error("{0}")]
    Setup(#[from] PgSetupError),
}

impl From<StorageError> for PgOpenError {
    fn from(e: StorageError) -> Self {
        Self::Setup(e.into())
    }
}

/// The writer's connection and its statements, prepared once.
struct Writer {
    client: Client,
    size: Statement,
    log: Statement,
    card: Statement,
    list: Statement,
    checkpoint: Statement,
}

pub struct PgStore {
    pool: Pool,
    /// Holds the single-writer lock for the life of the process; `None`
    /// for a read-only replica.
    writer: Option<tokio::sync::Mutex<Writer>>,
}

/// Takes the single-writer lock on `client`'s session, or says who has it.
async fn lock_writer(client: &Client) -> Result<(), PgOpenError> {
    let locked: bool = column(
        &client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK_KEY])
            .await
            .map_err(pg_error)?,
        0,
    )?;
    if locked {
        return Ok(());
    }
    // A bigint key shows in pg_locks as classid (high half) and objid (low half).
    let holder = client
        .query_opt(
            "SELECT a.pid, COALESCE(host(a.client_addr), 'a local socket'), a.application_name \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.classid = $1 AND l.objid = $2",
            &[
                &((WRITER_LOCK_KEY >> 32) as u32),
                &((WRITER_LOCK_KEY & 0xffff_ffff) as u32),
            ],
        )
        .await
        .ok()
        .flatten()
        .and_then(|row| {
            let pid: i32 = row.try_get(0).ok()?;
            let from: String = row.try_get(1).ok()?;
            let name: String = row.try_get(2).ok()?;
            Some(format!(
                ", held by server process {pid} for {name:?} connected from {from}"
            ))
        })
        .unwrap_or_default();
    Err(PgOpenError::Locked { holder })
}

impl PgStore {
    /// Connects, takes the single-writer lock, applies the migrations and
    /// opens the read pool.
    pub async fn open(options: &PgOptions) -> Result<Self, PgOpenError> {
        let config = config(options, "tessera-kms")?;
        let mut client = connect(
            &config,
            "the key service's writer connection to PostgreSQL ended: it no longer holds the \
             single-writer lock, and refuses writes until restarted",
        )
        .await?;
        lock_writer(&client).await?;
        migrate(&mut client, SERVICE, MIGRATIONS).await?;
        let prepare = async |sql: &str| client.prepare(sql).await.map_err(pg_error);
        let writer = Writer {
            size: prepare("SELECT COALESCE(MAX(idx) + 1, 0) FROM kms_log").await?,
            log: prepare("INSERT INTO kms_log (idx, entry, leaf_hash) VALUES ($1, $2, $3)").await?,
            card: prepare(
                "INSERT INTO kms_cards (card_id, identity, registration_index, record) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (card_id) DO UPDATE SET record = EXCLUDED.record",
            )
            .await?,
            list: prepare(
                "INSERT INTO kms_device_lists (identity, record) VALUES ($1, $2) \
                 ON CONFLICT (identity) DO UPDATE SET record = EXCLUDED.record",
            )
            .await?,
            checkpoint: prepare(
                "INSERT INTO kms_checkpoint (one, checkpoint) VALUES (TRUE, $1) \
                 ON CONFLICT (one) DO UPDATE SET checkpoint = EXCLUDED.checkpoint",
            )
            .await?,
            client,
        };
        let pool = read_pool(config, options.pool_size)?;
        Ok(Self {
            pool,
            writer: Some(tokio::sync::Mutex::new(writer)),
        })
    }

    /// A read-only replica's store: a read pool only, no writer lock, no
    /// migrations (the writer applies them; until it has, reads fail and
    /// the replica does not start).
    pub async fn open_read_only(options: &PgOptions) -> Result<Self, PgOpenError> {
        let config = config(options, "tessera-kms-replica")?;
        let pool = read_pool(config, options.pool_size)?;
        let store = Self { pool, writer: None };
        // The schema must be there (made by the writer).
        store
            .query("SELECT COUNT(*) FROM kms_checkpoint", &[])
            .await?;
        Ok(store)
    }

    /// Rows of one read, on a pooled connection.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StorageError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&statement, params).await.map_err(pg_error)
    }

    /// The first column of each row, as bytes, decoded.
    async fn records<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        decode: fn(&[u8]) -> Result<T, StorageError>,
    ) -> Result<Vec<T>, StorageError> {
        self.query(sql, params)
            .await?
            .iter()
            .map(|row| decode(column(row, 0)?))
            .collect()
    }

    /// The one record a query finds, if any.
    async fn record<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        decode: fn(&[u8]) -> Result<T, StorageError>,
    ) -> Result<Option<T>, StorageError> {
        Ok(self.records(sql, params, decode).await?.into_iter().next())
    }

    /// The writer's connection, if it still holds the single-writer lock.
    async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, Writer>, StorageError> {
        let Some(writer) = &self.writer else {
            return Err(StorageError::Backend {
                backend: "postgres",
                message: "this key service is a read-only replica".into(),
            });
        };
        let writer = writer.lock().await;
        if writer.client.is_closed() {
            return Err(StorageError::Backend {
                backend: "postgres",
                message: "the connection holding the single-writer lock has ended (the database \
                          restarted or was unreachable); restart tessera-kms"
                    .into(),
            });
        }
        Ok(writer)
    }

    /// Applies `appends` in order, in one transaction: all or nothing.
    /// The service applies one at a time.
    pub async fn apply_all(&self, appends: Vec<Append>) -> Result<(), StorageError> {
        let mut writer = self.writer().await?;
        let Writer {
            client,
            size,
            log,
            card,
            list,
            checkpoint,
        } = &mut *writer;
        let tx = client.transaction().await.map_err(pg_error)?;
        let mut next: i64 = column(&tx.query_one(&*size, &[]).await.map_err(pg_error)?, 0)?;
        for append in appends {
            let ids = append
                .cards
                .iter()
                .map(record_id)
                .collect::<Result<Vec<_>, _>>()?;
            let index = in_order(&mut next, &append)?;
            tx.execute(
                &*log,
                &[&index, &append.entry, &append.leaf_hash.as_slice()],
            )
            .await
            .map_err(pg_error)?;
            for (id, stored) in ids.iter().zip(&append.cards) {
                tx.execute(
                    &*card,
                    &[
                        &id.as_bytes().as_slice(),
                        &stored.identity,
                        &to_i64(stored.registration_index)?,
                        &stored.encode_to_vec(),
                    ],
                )
                .await
                .map_err(pg_error)?;
            }
            if let Some(device_list) = &append.device_list {
                tx.execute(
                    &*list,
                    &[&device_list.identity, &device_list.encode_to_vec()],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.execute(&*checkpoint, &[&append.checkpoint.encode_to_vec()])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }

    /// Writes the rows [`PgStore::apply_all`] would for `appends`, in one
    /// transaction, but with one binary `COPY` per table instead of a
    /// statement per row: a bulk load (the benchmark's preload of a
    /// million cards) at tens of thousands of appends a second instead of
    /// about a thousand. Every card and device list must be new to the
    /// database (a row already there fails the whole load: `COPY` does not
    /// update), and only the last append's checkpoint is stored, as the
    /// checkpoint row would end up after applying them one by one.
    pub async fn copy_all(&self, appends: Vec<Append>) -> Result<(), StorageError> {
        let mut writer = self.writer().await?;
        let Writer {
            client,
            size,
            checkpoint,
            ..
        } = &mut *writer;
        let tx = client.transaction().await.map_err(pg_error)?;
        let mut next: i64 = column(&tx.query_one(&*size, &[]).await.map_err(pg_error)?, 0)?;
        let mut log = Vec::with_capacity(appends.len());
        let mut cards = Vec::new();
        let mut lists = Vec::new();
        for append in &appends {
            let index = in_order(&mut next, append)?;
            log.push((index, &append.entry, append.leaf_hash.as_slice()));
            for stored in &append.cards {
                cards.push((
                    record_id(stored)?.as_bytes().to_vec(),
                    &stored.identity,
                    to_i64(stored.registration_index)?,
                    stored.encode_to_vec(),
                ));
            }
            if let Some(list) = &append.device_list {
                lists.push((&list.identity, list.encode_to_vec()));
            }
        }
        copy_rows(
            &tx,
            "COPY kms_log (idx, entry, leaf_hash) FROM STDIN (FORMAT binary)",
            &[Type::INT8, Type::BYTEA, Type::BYTEA],
            log.iter()
                .map(|(i, e, h)| [i as &(dyn ToSql + Sync), e, h].to_vec()),
        )
        .await?;
        copy_rows(
            &tx,
            "COPY kms_cards (card_id, identity, registration_index, record) \
             FROM STDIN (FORMAT binary)",
            &[Type::BYTEA, Type::TEXT, Type::INT8, Type::BYTEA],
            cards
                .iter()
                .map(|(id, n, i, r)| [id as &(dyn ToSql + Sync), n, i, r].to_vec()),
        )
        .await?;
        copy_rows(
            &tx,
            "COPY kms_device_lists (identity, record) FROM STDIN (FORMAT binary)",
            &[Type::TEXT, Type::BYTEA],
            lists
                .iter()
                .map(|(n, r)| [n as &(dyn ToSql + Sync), r].to_vec()),
        )
        .await?;
        if let Some(last) = appends.last() {
            tx.execute(&*checkpoint, &[&last.checkpoint.encode_to_vec()])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }
}

/// `append`'s log index, which must be `next` (the log's size so far);
/// `next` moves past it.
fn in_order(next: &mut i64, append: &Append) -> Result<i64, StorageError> {
    let index = to_i64(append.index)?;
    if *next != index {
        return Err(StorageError::Corrupt("append out of order"));
    }
    *next += 1;
    Ok(index)
}

/// Streams `rows` (of `types`) into a binary `COPY ... FROM STDIN`.
async fn copy_rows<'a>(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    types: &[Type],
    rows: impl Iterator<Item = Vec<&'a (dyn ToSql + Sync)>>,
) -> Result<(), StorageError> {
    let sink = tx.copy_in(sql).await.map_err(pg_error)?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, types));
    for row in rows {
        writer.as_mut().write(&row).await.map_err(pg_error)?;
    }
    writer.finish().await.map_err(pg_error)?;
    Ok(())
}

impl Store for PgStore {
    fn card<'a>(&'a self, id: &'a CardId) -> StoreFuture<'a, Option<StoredCard>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let card = self
                .record(
                    "SELECT record FROM kms_cards WHERE card_id = $1",
                    &[&id.as_bytes().as_slice()],
                    decode_card,
                )
                .await;
            record_store("card", started);
            card
        })
    }

    fn cards_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<StoredCard>> {
        Box::pin(async move {
            self.records(
                "SELECT record FROM kms_cards WHERE identity = $1 \
                 ORDER BY registration_index, card_id",
                &[&identity],
                decode_card,
            )
            .await
        })
    }

    fn cards_after<'a>(
        &'a self,
        after: Option<&'a CardId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredCard>> {
        Box::pin(async move {
            let after: &[u8] = after.map_or(&[], |id| id.as_bytes().as_slice());
            self.records(
                "SELECT record FROM kms_cards WHERE card_id > $1 ORDER BY card_id LIMIT $2",
                &[&after, &to_i64(limit as u64)?],
                decode_card,
            )
            .await
        })
    }

    fn device_list<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<StoredDeviceList>> {
        Box::pin(async move {
            self.record(
                "SELECT record FROM kms_device_lists WHERE identity = $1",
                &[&identity],
                decode_device_list,
            )
            .await
        })
    }

    fn device_lists_after<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDeviceList>> {
        Box::pin(async move {
            self.records(
                "SELECT record FROM kms_device_lists WHERE identity > $1 \
                 ORDER BY identity LIMIT $2",
                &[&after.unwrap_or(""), &to_i64(limit as u64)?],
                decode_device_list,
            )
            .await
        })
    }

    fn entry(&self, index: u64) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            self.record(
                "SELECT entry FROM kms_log WHERE idx = $1",
                &[&to_i64(index)?],
                |b| Ok(b.to_vec()),
            )
            .await
        })
    }

    fn entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<Vec<u8>>> {
        Box::pin(async move {
            self.records(
                "SELECT entry FROM kms_log WHERE idx >= $1 ORDER BY idx LIMIT $2",
                &[&to_i64(from)?, &to_i64(limit as u64)?],
                |b| Ok(b.to_vec()),
            )
            .await
        })
    }

    fn entries_at<'a>(&'a self, indices: &'a [u64]) -> StoreFuture<'a, Vec<(u64, Vec<u8>)>> {
        Box::pin(async move {
            let indices = indices
                .iter()
                .map(|&i| to_i64(i))
                .collect::<Result<Vec<_>, _>>()?;
            self.query(
                "SELECT idx, entry FROM kms_log WHERE idx = ANY($1) ORDER BY idx",
                &[&indices],
            )
            .await?
            .iter()
            .map(|row| Ok((column::<i64>(row, 0)? as u64, column(row, 1)?)))
            .collect()
        })
    }

    fn leaf_hashes(&self) -> StoreFuture<'_, Vec<Hash>> {
        Box::pin(async move {
            // Streamed: a million rows need not be held twice.
            let client = self.pool.get().await.map_err(pool_error)?;
            let statement = client
                .prepare_cached("SELECT idx, leaf_hash FROM kms_log ORDER BY idx")
                .await
                .map_err(pg_error)?;
            let rows = client
                .query_raw(&statement, std::iter::empty::<i64>())
                .await
                .map_err(pg_error)?;
            let mut rows = std::pin::pin!(rows);
            let mut out = Vec::new();
            while let Some(row) = rows.try_next().await.map_err(pg_error)? {
                if column::<i64>(&row, 0)? != out.len() as i64 {
                    return Err(StorageError::Corrupt("gap in the log"));
                }
                out.push(leaf_hash(column(&row, 1)?)?);
            }
            Ok(out)
        })
    }

    fn checkpoint(&self) -> StoreFuture<'_, Option<SignedCheckpoint>> {
        Box::pin(async move {
            self.record(
                "SELECT checkpoint FROM kms_checkpoint",
                &[],
                decode_checkpoint,
            )
            .await
        })
    }

    fn apply(&self, append: Append) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            self.apply_all(vec![append]).await?;
            record_store("apply", started);
            Ok(())
        })
    }

    fn flush(&self) -> FlushFuture<'_> {
        // Every append committed before `apply` returned.
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_testkit::Postgres;

    use super::*;
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
        let client = store.pool.get().await.unwrap();
        let versions = |rows: Vec<Row>| -> Vec<i32> { rows.iter().map(|r| r.get(0)).collect() };
        let applied =
            "SELECT version FROM schema_migrations WHERE service = 'kms' ORDER BY version";
        assert_eq!(versions(client.query(applied, &[]).await.unwrap()), vec![1]);
        drop(client);
        drop(store);
        // Opening again applies nothing twice (the lock is released once
        // the old writer's connection has closed).
        let store = reopen(&pg).await;
        let client = store.pool.get().await.unwrap();
        assert_eq!(versions(client.query(applied, &[]).await.unwrap()), vec![1]);
        client
            .execute(
                "INSERT INTO schema_migrations (service, version, name) VALUES ('kms', 99, 'future')",
                &[],
            )
            .await
            .unwrap();
        drop(client);
        drop(store);
        let mut newer = None;
        for _ in 0..100 {
            match PgStore::open(&options(&pg)).await {
                Err(PgOpenError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => {
                    newer = Some(other);
                    break;
                }
            }
        }
        let Some(Err(e)) = newer else {
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
    }

    /// Appends `from..to`: a card each (identity `user<i / 2>`) and, for
    /// each even index, a device list of that identity.
    fn appends(from: u64, to: u64) -> Vec<Append> {
        (from..to)
            .map(|i| Append {
                index: i,
                entry: format!("entry {i}").into_bytes(),
                leaf_hash: [i as u8; 32],
                cards: vec![StoredCard {
                    card: Some(tessera_proto::card::v1::Card {
                        content_snapshot: i.to_be_bytes().to_vec(),
                        ..Default::default()
                    }),
                    identity: format!("user{}", i / 2),
                    kind: 1,
                    registration_index: i,
                    registration_entry: format!("entry {i}").into_bytes(),
                    ..Default::default()
                }],
                device_list: i.is_multiple_of(2).then(|| StoredDeviceList {
                    identity: format!("user{}", i / 2),
                    indices: vec![i],
                    head: vec![i as u8; 32],
                    trusted: vec![vec![1; 32]],
                }),
                checkpoint: SignedCheckpoint {
                    content_snapshot: (i + 1).to_be_bytes().to_vec(),
                    signature: vec![7; 64],
                },
            })
            .collect()
    }

    /// Everything a reader sees in `store`.
    async fn contents(
        store: &dyn Store,
    ) -> (
        Vec<StoredCard>,
        Vec<StoredDeviceList>,
        Vec<Vec<u8>>,
        Vec<Hash>,
        Option<SignedCheckpoint>,
    ) {
        (
            store.cards_after(None, 1000).await.unwrap(),
            store.device_lists_after(None, 1000).await.unwrap(),
            store.entries(0, 1000).await.unwrap(),
            store.leaf_hashes().await.unwrap(),
            store.checkpoint().await.unwrap(),
        )
    }

    #[tokio::test]
    async fn a_bulk_copy_writes_what_the_appends_would() {
        let pg = Postgres::start();
        let store = PgStore::open(&options(&pg)).await.unwrap();
        let memory = crate::store::MemoryStore::default();
        for append in appends(0, 7) {
            memory.apply(append).await.unwrap();
        }
        store.copy_all(appends(0, 4)).await.unwrap();
        store.copy_all(appends(4, 7)).await.unwrap();
        let copied = contents(&store).await;
        assert_eq!(copied.0.len(), 7);
        assert_eq!(copied, contents(&memory).await);

        // Out of order, or a card already there: refused, and nothing of
        // it is left.
        assert!(store.copy_all(appends(8, 9)).await.is_err());
        let mut again = appends(7, 9);
        again[1].cards[0].card = appends(0, 1)[0].cards[0].card.clone();
        assert!(store.copy_all(again).await.is_err());
        assert_eq!(contents(&store).await, copied);
        store.copy_all(appends(7, 9)).await.unwrap();
        assert_eq!(store.leaf_hashes().await.unwrap().len(), 9);
    }

    /// Opens the store again once the previous writer's lock is released.
    async fn reopen(pg: &Postgres) -> PgStore {
        for _ in 0..100 {
            match PgStore::open(&options(pg)).await {
                Ok(store) => return store,
                Err(PgOpenError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the single-writer lock was never released");
    }

    #[tokio::test]
    async fn a_second_writer_is_refused_naming_the_lock() {
        let pg = Postgres::start();
        let first = PgStore::open(&options(&pg)).await.unwrap();
        let Err(e) = PgStore::open(&options(&pg)).await else {
            panic!("a second writer opened the database");
        };
        let message = e.to_string();
        assert!(matches!(e, PgOpenError::Locked { .. }), "{message}");
        assert!(
            message.contains(&WRITER_LOCK_KEY.to_string()) && message.contains("tessera-kms"),
            "{message}"
        );
        // The first writer still writes; once it is gone, another may.
        first
            .apply(Append {
                index: 0,
                entry: b"e".to_vec(),
                leaf_hash: [1; 32],
                cards: vec![],
                device_list: None,
                checkpoint: SignedCheckpoint::default(),
            })
            .await
            .unwrap();
        drop(first);
        let second = reopen(&pg).await;
        assert_eq!(second.leaf_hashes().await.unwrap(), vec![[1; 32]]);
    }

    #[tokio::test]
    async fn a_writer_whose_lock_connection_ended_refuses_to_write() {
        let mut pg = Postgres::start();
        let store = PgStore::open(&options(&pg)).await.unwrap();
        pg.restart();
        // The restart ended the writer's session, and its lock with it.
        for _ in 0..100 {
            if store
                .writer
                .as_ref()
                .unwrap()
                .lock()
                .await
                .client
                .is_closed()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let refused = store
            .apply(Append {
                index: 0,
                entry: b"e".to_vec(),
                leaf_hash: [1; 32],
                cards: vec![],
                device_list: None,
                checkpoint: SignedCheckpoint::default(),
            })
            .await;
        let Err(e) = refused else {
            panic!("wrote without the single-writer lock")
        };
        assert!(e.to_string().contains("single-writer lock"), "{e}");
        // Reads go on through the pool, on new connections.
        assert!(store.leaf_hashes().await.unwrap().is_empty());
    }
}
