//! The PostgreSQL store: the archive in one table that several backup
//! service replicas may share.
//!
//! Nothing is held in the process between calls, so replicas need nothing
//! from each other: the primary key on (channel, index) makes the first
//! record of a message the only one (`INSERT ... ON CONFLICT DO NOTHING`
//! stores it, or stores nothing when another replica or call got there
//! first, waiting for that one's transaction to end), and the archive only
//! grows, so a caller told "already there" can read the stored record
//! back.
//!
//! The schema comes from the SQL files in `migrations/`, compiled in and
//! applied at start (`tessera_service::postgres::migrate`, as "backup" in
//! `schema_migrations`).
//!
//! Durability: each insert is one statement, committed on its own; it is
//! durable when it returns (PostgreSQL's default `synchronous_commit = on`),
//! so `flush` has nothing left to do.

use deadpool_postgres::Pool;
use prost::Message;
use tessera_service::{
    metrics::record_store,
    postgres::{
        Migration, PgOptions, PgSetupError, column, config, connect, migrate, pg_error, pool_error,
        read_pool, to_i64,
    },
    storage::{FlushFuture, StorageError},
};
use tokio_postgres::{Row, types::ToSql};

use super::{Archived, Store, StoreFuture, decode};

/// This service's name in `schema_migrations`.
const SERVICE: &str = "backup";

/// Every migration, in order; a database has a prefix of them applied.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial schema",
    sql: include_str!("migrations/0001_initial.sql"),
}];

/// The archive in PostgreSQL, reached through a pool.
pub struct PgStore {
    pool: Pool,
}

/// The stored indices `from <= index < to` as an inclusive BIGINT range
/// (`None` when it holds none a store can have: PostgreSQL's BIGINT ends
/// at `i64::MAX`).
fn span(from: u64, to: u64) -> Option<(i64, i64)> {
    let last = to.checked_sub(1)?.min(i64::MAX as u64);
    (from <= last).then_some((from as i64, last as i64))
}

/// A page size as a LIMIT (any larger one is as good as all rows).
fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects, applies the migrations the database lacks and opens a
    /// pool of `options.pool_size` connections.
    pub async fn open(options: &PgOptions) -> Result<Self, PgSetupError> {
        let config = config(options, "tessera-backup")?;
        let mut client = connect(
            &config,
            "the backup service's migration connection to PostgreSQL ended",
        )
        .await?;
        migrate(&mut client, SERVICE, MIGRATIONS).await?;
        drop(client);
        Ok(Self {
            pool: read_pool(config, options.pool_size)?,
        })
    }

    /// Rows of one statement, on a pooled connection.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StorageError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&statement, params).await.map_err(pg_error)
    }
}

impl Store for PgStore {
    fn get<'a>(&'a self, channel_id: &'a str, index: u64) -> StoreFuture<'a, Option<Archived>> {
        Box::pin(async move {
            let Ok(index) = i64::try_from(index) else {
                return Ok(None);
            };
            self.query(
                "SELECT record FROM backup_archive WHERE channel_id = $1 AND message_index = $2",
                &[&channel_id, &index],
            )
            .await?
            .first()
            .map(|row| decode(column(row, 0)?))
            .transpose()
        })
    }

    fn insert<'a>(&'a self, record: &'a Archived) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let index = to_i64(record.message_index)?;
            let started = std::time::Instant::now();
            let client = self.pool.get().await.map_err(pool_error)?;
            let statement = client
                .prepare_cached(
                    "INSERT INTO backup_archive (channel_id, message_index, record) \
                     VALUES ($1, $2, $3) ON CONFLICT (channel_id, message_index) DO NOTHING",
                )
                .await
                .map_err(pg_error)?;
            let inserted = client
                .execute(
                    &statement,
                    &[&record.channel_id, &index, &record.encode_to_vec()],
                )
                .await
                .map_err(pg_error)?;
            record_store("insert", started);
            Ok(inserted == 1)
        })
    }

    fn range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<Archived>> {
        Box::pin(async move {
            let Some((first, last)) = span(from, to) else {
                return Ok(Vec::new());
            };
            self.query(
                "SELECT record FROM backup_archive \
                 WHERE channel_id = $1 AND message_index BETWEEN $2 AND $3 \
                 ORDER BY message_index LIMIT $4",
                &[&channel_id, &first, &last, &self::limit(limit)],
            )
            .await?
            .iter()
            .map(|row| decode(column(row, 0)?))
            .collect()
        })
    }

    fn count<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let Some((first, last)) = span(from, to) else {
                return Ok(0);
            };
            let rows = self
                .query(
                    "SELECT count(*) FROM (SELECT 1 FROM backup_archive \
                     WHERE channel_id = $1 AND message_index BETWEEN $2 AND $3 \
                     ORDER BY message_index LIMIT $4) AS page",
                    &[&channel_id, &first, &last, &self::limit(limit)],
                )
                .await?;
            let n: i64 = match rows.first() {
                Some(row) => column(row, 0)?,
                None => 0,
            };
            usize::try_from(n).map_err(|_| StorageError::Corrupt("negative count"))
        })
    }

    fn flush(&self) -> FlushFuture<'_> {
        // Every insert committed before `insert` returned.
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
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

    /// Two stores on one database (two replicas' worth), opened at once:
    /// the schema is made once, and of racing inserts for one message from
    /// both exactly one stores, the one both then read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_the_archive_and_race_for_the_first_record() {
        let pg = Postgres::start();
        let options = options(&pg);
        let (a, b) = tokio::join!(PgStore::open(&options), PgStore::open(&options));
        let (a, b) = (a.unwrap(), b.unwrap());
        for index in 1..=20 {
            conformance::racing_inserts(&[&a, &b], "shared", index).await;
        }
        assert_eq!(b.count("shared", 0, 100, 100).await.unwrap(), 20);
        assert_eq!(
            a.range("shared", 0, 100, 100).await.unwrap(),
            b.range("shared", 0, 100, 100).await.unwrap()
        );
        let client = a.pool.get().await.unwrap();
        let versions: Vec<i32> = client
            .query(
                "SELECT version FROM schema_migrations WHERE service = 'backup'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, vec![1], "applied once");
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let pg = Postgres::start();
        let store = PgStore::open(&options(&pg)).await.unwrap();
        store
            .pool
            .get()
            .await
            .unwrap()
            .execute(
                "INSERT INTO schema_migrations (service, version, name) \
                 VALUES ('backup', 2, 'future')",
                &[],
            )
            .await
            .unwrap();
        let Err(e) = PgStore::open(&options(&pg)).await else {
            panic!("a schema newer than the binary was accepted");
        };
        assert!(
            matches!(
                e,
                PgSetupError::NewerSchema {
                    found: 2,
                    known: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("tessera-backup"), "{e}");
    }
}
