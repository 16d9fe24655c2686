//! What the services' stores share: opening sled (the embedded backend),
//! durable flushes, and one backend-neutral error type that reaches callers
//! as a bare `INTERNAL` (details only in logs), or as `UNAVAILABLE` when
//! the backend cannot be reached for now (a database server down or
//! restarting).

use std::{future::Future, path::Path};

use thiserror::Error;
use tonic::Status;

/// A storage failure, whatever the backend: the stores' traits name no
/// backend's types (a backend's errors convert into `Backend`).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The backend failed (its name and its own message, for the logs).
    #[error("{backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    /// The backend cannot be reached for now (no connection could be had,
    /// the connection was lost, the database is shutting down or starting):
    /// nothing was decided, and the same call may succeed later.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
    },
    #[error("stored record is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        Self::Backend {
            backend: "sled",
            message: e.to_string(),
        }
    }
}

impl From<sled::transaction::TransactionError<StorageError>> for StorageError {
    fn from(e: sled::transaction::TransactionError<StorageError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(inner) => inner,
            sled::transaction::TransactionError::Storage(s) => s.into(),
        }
    }
}

/// What a caller is told while the database cannot be reached (the
/// details, which may name hosts, go to the log only).
pub const UNAVAILABLE_MESSAGE: &str = "its database cannot be reached; try again shortly";

impl From<StorageError> for Status {
    fn from(e: StorageError) -> Self {
        if let StorageError::Unavailable { .. } = e {
            tracing::warn!(error = %e, "storage unavailable");
            return Status::unavailable(UNAVAILABLE_MESSAGE);
        }
        tracing::error!(error = %e, "storage failure");
        Status::internal("storage failure; see the service log")
    }
}

/// What a store's `flush` returns: resolves when every write so far is durable.
pub type FlushFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<(), StorageError>> + Send + 'a>>;

/// Opens (creating if needed) the sled database in `dir`.
pub fn open_db(dir: &Path) -> Result<sled::Db, StorageError> {
    std::fs::create_dir_all(dir)?;
    // sled's default page cache (1 GiB) holds 100 k cards and their log.
    Ok(sled::Config::new().path(dir).open()?)
}

/// Waits until everything written so far is on disk (fsync).
///
/// Runs sled's synchronous flush on tokio's blocking pool: `flush_async`
/// hands the work to sled's own small global thread pool, which under
/// concurrent flushes (several databases in one process, many writers) was
/// seen to leave flushes queued with no thread to run them.
pub async fn flush(db: &sled::Db) -> Result<(), StorageError> {
    let db = db.clone();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|_| StorageError::Corrupt("flush task failed"))??;
    crate::metrics::record_store("flush", started);
    Ok(())
}

/// Big-endian u64 key part: keys sort in numeric order.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a big-endian u64 written by [`u64_key`].
pub fn read_u64(bytes: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StorageError::Corrupt("u64 is not 8 bytes"))?;
    Ok(u64::from_be_bytes(arr))
}

/// Locks an in-memory store's state. A poisoned lock (a panic while it was
/// held) means the state may be half-updated: report it as corruption.
pub fn lock<T>(state: &std::sync::Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, StorageError> {
    state
        .lock()
        .map_err(|_| StorageError::Corrupt("memory store lock poisoned"))
}
