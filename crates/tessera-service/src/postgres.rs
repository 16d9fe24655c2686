//! What the services' PostgreSQL stores share: how to reach the database
//! ([`PgOptions`], [`config`], [`connect`], [`read_pool`]), the migration
//! runner ([`migrate`]) and the conversions of the driver's errors and
//! numbers into [`StorageError`].
//!
//! Each service keeps its own schema (SQL files compiled into its binary)
//! and names itself in the shared `schema_migrations (service, version)`
//! table, so the three services may share one database or use one each.

use std::{collections::BTreeSet, str::FromStr, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use thiserror::Error;
use tokio_postgres::{Client, NoTls, Row};

use crate::storage::StorageError;

/// Held (per transaction) while migrations run, so two processes starting
/// at once do not both apply them: the bytes of "tessmig1".
const MIGRATION_LOCK_KEY: i64 = 0x7465_7373_6d69_6731;

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq-style URL or key/value string
    /// (`postgresql://user:password@host:port/database`, `host=/run/postgresql
    /// dbname=tessera`). It may hold a password: it is never logged.
    pub url: String,
    /// Connections in the pool (a service may open a few more of its own).
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// One schema change, applied once per database.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Why a service could not set its database up. Each service wraps it in
/// its own open error.
#[derive(Debug, Error)]
pub enum PgSetupError {
    /// The URL does not parse (the message names no part of it).
    #[error("database URL: {0}")]
    Url(String),
    #[error(
        "the database schema of tessera-{service} is at version {found}, newer than this \
         tessera-{service} knows ({known}): upgrade tessera-{service}"
    )]
    NewerSchema {
        service: String,
        found: i32,
        known: i32,
    },
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// The driver's configuration from `options.url`, with a connect timeout
/// (10 s) and `application_name` (shown in `pg_stat_activity`) unless the
/// URL sets them.
pub fn config(
    options: &PgOptions,
    application_name: &str,
) -> Result<tokio_postgres::Config, PgSetupError> {
    let mut config = tokio_postgres::Config::from_str(&options.url)
        .map_err(|e| PgSetupError::Url(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    Ok(config)
}

/// Opens a connection whose driver runs on its own task; `on_end` is logged
/// as an error if the connection ends with one.
pub async fn connect(
    config: &tokio_postgres::Config,
    on_end: &'static str,
) -> Result<Client, StorageError> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!(error = %e, "{on_end}");
        }
    });
    Ok(client)
}

/// A pool of `size` (at least one) connections made from `config`.
///
/// A connection is taken back out only if it is still open
/// ([`RecyclingMethod::Fast`]): after the database restarted, the pool drops
/// the connections the restart ended and makes fresh ones, so queries work
/// again without restarting the service. (A connection whose peer vanished
/// without closing it fails its next query once, as UNAVAILABLE; the
/// `Verified` method would catch that at the cost of a round trip on every
/// checkout.)
pub fn read_pool(config: tokio_postgres::Config, size: usize) -> Result<Pool, StorageError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(30)))
        .build()
        .map_err(|e| StorageError::Backend {
            backend: "postgres",
            message: e.to_string(),
        })
}

/// Applies the `migrations` of `service` that `client`'s database lacks, in
/// one transaction under an advisory lock; refuses a database whose schema
/// is newer than the last of them.
pub async fn migrate(
    client: &mut Client,
    service: &str,
    migrations: &[Migration],
) -> Result<(), PgSetupError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    // A service may run its queries under a statement timeout (the app
    // server's connections carry one); a migration, and the wait for
    // another replica's, must not be cut short by it.
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg_error)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             service TEXT NOT NULL,
             version INTEGER NOT NULL,
             name TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (service, version)
         )",
    )
    .await
    .map_err(pg_error)?;
    let applied = tx
        .query(
            "SELECT version FROM schema_migrations WHERE service = $1",
            &[&service],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| column::<i32>(row, 0))
        .collect::<Result<BTreeSet<i32>, _>>()?;
    let known = migrations.last().map_or(0, |m| m.version);
    if let Some(&found) = applied.last()
        && found > known
    {
        return Err(PgSetupError::NewerSchema {
            service: service.to_owned(),
            found,
            known,
        });
    }
    for migration in migrations {
        if applied.contains(&migration.version) {
            continue;
        }
        tx.batch_execute(migration.sql).await.map_err(pg_error)?;
        tx.execute(
            "INSERT INTO schema_migrations (service, version, name) VALUES ($1, $2, $3)",
            &[&service, &migration.version, &migration.name],
        )
        .await
        .map_err(pg_error)?;
        tracing::info!(
            service,
            version = migration.version,
            name = migration.name,
            "applied a database migration"
        );
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(())
}

/// SQLSTATEs that mean "not now" rather than "no": the connection failed
/// (class 08), the server is shutting down or starting
/// (`admin_shutdown`, `crash_shutdown`, `cannot_connect_now`), or it has
/// no connection slot left (`too_many_connections`).
fn unavailable_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// The driver's error as a storage error: the server's message and SQLSTATE
/// when the database answered, else the driver's own message. Connection
/// failures (refused, reset, closed, timed out, the server shutting down or
/// starting) are [`StorageError::Unavailable`]: the call may succeed on a
/// fresh connection once the database is back.
pub fn pg_error(e: tokio_postgres::Error) -> StorageError {
    let (message, unavailable) = match e.as_db_error() {
        Some(db) => (
            format!("{} ({})", db.message(), db.code().code()),
            unavailable_state(db.code().code()),
        ),
        // tokio-postgres leaves the cause (e.g. "Connection refused") to
        // `source()`: name it, or the operator learns only that it failed.
        None => {
            let mut message = e.to_string();
            let mut io = false;
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                message.push_str(": ");
                message.push_str(&c.to_string());
                io |= c.is::<std::io::Error>();
                cause = c.source();
            }
            (message, io || e.is_closed())
        }
    };
    if unavailable {
        StorageError::Unavailable {
            backend: "postgres",
            message,
        }
    } else {
        StorageError::Backend {
            backend: "postgres",
            message,
        }
    }
}

/// A pool's error as a storage error: no connection could be had in time
/// (or made: the database refused or is down) is
/// [`StorageError::Unavailable`].
pub fn pool_error(e: PoolError) -> StorageError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        PoolError::Timeout(_) => StorageError::Unavailable {
            backend: "postgres",
            message: format!("no pooled connection: {e}"),
        },
        e => StorageError::Backend {
            backend: "postgres",
            message: e.to_string(),
        },
    }
}

/// A count or index as PostgreSQL's BIGINT.
pub fn to_i64(n: u64) -> Result<i64, StorageError> {
    i64::try_from(n).map_err(|_| StorageError::Corrupt("number beyond PostgreSQL's BIGINT"))
}

/// Column `index` of `row`, or a storage error if its type is not `T`.
pub fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StorageError> {
    row.try_get(index).map_err(pg_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_connection_names_its_cause() {
        // Port 1 on loopback: nothing listens there.
        let options = PgOptions {
            url: "postgresql://nobody@127.0.0.1:1/none".into(),
            pool_size: 1,
        };
        let config = config(&options, "tessera-test").unwrap();
        let err = connect(&config, "test connection ended").await.unwrap_err();
        let text = err.to_string();
        assert!(text.to_lowercase().contains("refused"), "{text}");
        assert!(
            matches!(err, StorageError::Unavailable { .. }),
            "a refused connection is worth retrying: {err:?}"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!status.message().contains("127.0.0.1"), "{status}");
    }
}
