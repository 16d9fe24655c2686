//! The in-memory store, for unit tests: nothing survives the process.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tessera_service::storage::{self, FlushFuture, StorageError};

use super::{Archived, Store, StoreFuture, ready};

type Archive = BTreeMap<(String, u64), Archived>;

#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Archive>>,
}

impl MemoryStore {
    fn lock(&self) -> Result<MutexGuard<'_, Archive>, StorageError> {
        storage::lock(&self.inner)
    }

    /// Runs `read` on the archive, as a ready answer (the lock is released
    /// before the future is returned).
    fn read<'a, T: Send + 'a>(&self, read: impl FnOnce(&Archive) -> T) -> StoreFuture<'a, T> {
        ready(self.lock().map(|archive| read(&archive)))
    }
}

/// The archived messages of a channel with `from <= index < to`, at most `limit`.
fn span<'a>(
    archive: &'a Archive,
    channel_id: &str,
    from: u64,
    to: u64,
    limit: usize,
) -> impl Iterator<Item = &'a Archived> {
    let range = (from < to).then(|| {
        archive
            .range((channel_id.to_owned(), from)..(channel_id.to_owned(), to))
            .take(limit)
    });
    range.into_iter().flatten().map(|(_, v)| v)
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, channel_id: &'a str, index: u64) -> StoreFuture<'a, Option<Archived>> {
        self.read(|archive| archive.get(&(channel_id.to_owned(), index)).cloned())
    }

    fn insert<'a>(&'a self, record: &'a Archived) -> StoreFuture<'a, bool> {
        ready(self.lock().map(|mut archive| {
            let k = (record.channel_id.clone(), record.message_index);
            if archive.contains_key(&k) {
                return false;
            }
            archive.insert(k, record.clone());
            true
        }))
    }

    fn range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<Archived>> {
        self.read(|archive| {
            span(archive, channel_id, from, to, limit)
                .cloned()
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
        self.read(|archive| span(archive, channel_id, from, to, limit).count())
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store() {
        conformance::exercise(&MemoryStore::default()).await;
    }
}
