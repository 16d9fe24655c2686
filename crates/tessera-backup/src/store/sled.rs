//! The sled store, the embedded default: one tree, each archived message
//! under `a/<channel id>\0<index, 8 bytes big-endian>`.
//!
//! Its methods are synchronous (sled is); the [`Store`] implementation hands
//! their answers back as ready futures. Offline tools (a test doctoring a
//! stopped service's archive) call them directly.

use std::path::Path;

use prost::Message;
use tessera_service::{
    metrics::record_store,
    storage::{self, FlushFuture, StorageError, u64_key},
};

use super::{Archived, Store, StoreFuture, decode, ready};

fn key(channel_id: &str, index: u64) -> Vec<u8> {
    [
        b"a/".as_slice(),
        channel_id.as_bytes(),
        b"\0",
        &u64_key(index),
    ]
    .concat()
}

pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Ok(Self {
            db: storage::open_db(dir)?,
        })
    }

    pub fn get(&self, channel_id: &str, index: u64) -> Result<Option<Archived>, StorageError> {
        self.db
            .get(key(channel_id, index))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Stores `record` unless one exists for its message (one
    /// compare-and-swap); `false` if one did.
    pub fn insert(&self, record: &Archived) -> Result<bool, StorageError> {
        let started = std::time::Instant::now();
        let swapped = self.db.compare_and_swap(
            key(&record.channel_id, record.message_index),
            None as Option<&[u8]>,
            Some(record.encode_to_vec()),
        );
        record_store("insert", started);
        Ok(swapped?.is_ok())
    }

    /// The stored values of a channel with `from <= index < to`, at most `limit`.
    fn values(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> impl Iterator<Item = Result<sled::IVec, StorageError>> {
        let range = (from < to).then(|| {
            self.db
                .range(key(channel_id, from)..key(channel_id, to))
                .take(limit)
        });
        range.into_iter().flatten().map(|item| Ok(item?.1))
    }

    pub fn range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Archived>, StorageError> {
        self.values(channel_id, from, to, limit)
            .map(|v| decode(&v?))
            .collect()
    }

    pub fn count(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<usize, StorageError> {
        self.values(channel_id, from, to, limit)
            .try_fold(0, |n, v| v.map(|_| n + 1))
    }
}

impl Store for SledStore {
    fn get<'a>(&'a self, channel_id: &'a str, index: u64) -> StoreFuture<'a, Option<Archived>> {
        ready(SledStore::get(self, channel_id, index))
    }

    fn insert<'a>(&'a self, record: &'a Archived) -> StoreFuture<'a, bool> {
        ready(SledStore::insert(self, record))
    }

    fn range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<Archived>> {
        ready(SledStore::range(self, channel_id, from, to, limit))
    }

    fn count<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, usize> {
        ready(SledStore::count(self, channel_id, from, to, limit))
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(storage::flush(&self.db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn sled_store() {
        let dir = tempfile::tempdir().unwrap();
        conformance::exercise(&SledStore::open(dir.path()).unwrap()).await;
    }
}
