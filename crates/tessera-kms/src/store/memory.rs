//! The in-memory store, for unit tests: nothing survives the process.

use std::{
    collections::BTreeMap,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
};

use tessera_card::{CardId, transparency::Hash};
use tessera_proto::transparency::v1::SignedCheckpoint;
use tessera_service::storage::{self, FlushFuture, StorageError};

use super::{Append, Store, StoreFuture, StoredCard, StoredDeviceList, ready, record_id};

#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Default)]
struct MemoryInner {
    cards: BTreeMap<CardId, StoredCard>,
    by_identity: BTreeMap<String, Vec<CardId>>,
    device_lists: BTreeMap<String, StoredDeviceList>,
    entries: Vec<(Vec<u8>, Hash)>,
    checkpoint: Option<SignedCheckpoint>,
}

impl MemoryStore {
    fn lock(&self) -> Result<MutexGuard<'_, MemoryInner>, StorageError> {
        storage::lock(&self.inner)
    }

    /// Runs `read` on the state, as a ready answer.
    fn read<'a, T: Send + 'a>(&self, read: impl FnOnce(&MemoryInner) -> T) -> StoreFuture<'a, T> {
        ready(self.lock().map(|inner| read(&inner)))
    }
}

/// Up to `limit` values of `map` with keys after `after`, in key order.
fn page<K: Ord + ?Sized, Q: Ord + std::borrow::Borrow<K>, V: Clone>(
    map: &BTreeMap<Q, V>,
    after: Option<&K>,
    limit: usize,
) -> Vec<V> {
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    map.range::<K, _>((start, Bound::Unbounded))
        .take(limit)
        .map(|(_, v)| v.clone())
        .collect()
}

impl Store for MemoryStore {
    fn card<'a>(&'a self, id: &'a CardId) -> StoreFuture<'a, Option<StoredCard>> {
        self.read(|inner| inner.cards.get(id).cloned())
    }

    fn cards_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<StoredCard>> {
        self.read(|inner| {
            inner
                .by_identity
                .get(identity)
                .map(|ids| {
                    ids.iter()
                        .filter_map(|id| inner.cards.get(id).cloned())
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    fn cards_after<'a>(
        &'a self,
        after: Option<&'a CardId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredCard>> {
        self.read(|inner| page(&inner.cards, after, limit))
    }

    fn device_list<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<StoredDeviceList>> {
        self.read(|inner| inner.device_lists.get(identity).cloned())
    }

    fn device_lists_after<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDeviceList>> {
        self.read(|inner| page(&inner.device_lists, after, limit))
    }

    fn entry(&self, index: u64) -> StoreFuture<'_, Option<Vec<u8>>> {
        self.read(|inner| inner.entries.get(index as usize).map(|e| e.0.clone()))
    }

    fn entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<Vec<u8>>> {
        self.read(|inner| {
            inner
                .entries
                .iter()
                .skip(from as usize)
                .take(limit)
                .map(|e| e.0.clone())
                .collect()
        })
    }

    fn entries_at<'a>(&'a self, indices: &'a [u64]) -> StoreFuture<'a, Vec<(u64, Vec<u8>)>> {
        self.read(|inner| {
            let mut sorted = indices.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            sorted
                .into_iter()
                .filter_map(|i| Some((i, inner.entries.get(i as usize)?.0.clone())))
                .collect()
        })
    }

    fn leaf_hashes(&self) -> StoreFuture<'_, Vec<Hash>> {
        self.read(|inner| inner.entries.iter().map(|e| e.1).collect())
    }

    fn checkpoint(&self) -> StoreFuture<'_, Option<SignedCheckpoint>> {
        self.read(|inner| inner.checkpoint.clone())
    }

    fn apply(&self, append: Append) -> StoreFuture<'_, ()> {
        ready((|| {
            let mut inner = self.lock()?;
            if append.index != inner.entries.len() as u64 {
                return Err(StorageError::Corrupt("append out of order"));
            }
            // Every check before the first change: all or nothing.
            let ids = append
                .cards
                .iter()
                .map(record_id)
                .collect::<Result<Vec<_>, _>>()?;
            inner.entries.push((append.entry, append.leaf_hash));
            for (id, card) in ids.into_iter().zip(append.cards) {
                let ids = inner.by_identity.entry(card.identity.clone()).or_default();
                if !ids.contains(&id) {
                    ids.push(id);
                }
                inner.cards.insert(id, card);
            }
            if let Some(list) = append.device_list {
                inner.device_lists.insert(list.identity.clone(), list);
            }
            inner.checkpoint = Some(append.checkpoint);
            Ok(())
        })())
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
