//! The sled store, the embedded default: one tree, keys prefixed by record
//! type (`c/` cards, `i/` identity index, `d/` device lists, `l/` entries,
//! `h/` leaf hashes, `m/` meta).
//!
//! Its methods are synchronous (sled is); the [`Store`] implementation hands
//! their answers back as ready futures. Offline tools (the benchmark's bulk
//! preload, a test doctoring a stopped service's log) call them directly.

use std::path::Path;

use prost::Message;
use tessera_card::{CardId, transparency::Hash};
use tessera_proto::transparency::v1::SignedCheckpoint;
use tessera_service::{
    metrics::record_store,
    storage::{self, FlushFuture, StorageError, read_u64, u64_key},
};

use super::{
    Append, Store, StoreFuture, StoredCard, StoredDeviceList, decode_card, decode_checkpoint,
    decode_device_list, leaf_hash, ready, record_id,
};

fn stored_card_key(id: &[u8]) -> Vec<u8> {
    [b"c/".as_slice(), id].concat()
}

/// One key per identity; its value is the ids (32 bytes each) of every card
/// ever registered for it, in order.
fn identity_key(identity: &str) -> Vec<u8> {
    [b"i/".as_slice(), identity.as_bytes()].concat()
}

fn device_list_key(identity: &str) -> Vec<u8> {
    [b"d/".as_slice(), identity.as_bytes()].concat()
}

fn entry_key(index: u64) -> Vec<u8> {
    [b"l/".as_slice(), &u64_key(index)].concat()
}

fn hash_key(index: u64) -> Vec<u8> {
    [b"h/".as_slice(), &u64_key(index)].concat()
}

const CHECKPOINT_KEY: &[u8] = b"m/checkpoint";

/// The first key after every key starting with `prefix` + `after`.
fn after_key(prefix: &[u8], after: &[u8]) -> Vec<u8> {
    // Keys are prefix + name; the next name after `after` is `after` + 0.
    [prefix, after, &[0]].concat()
}

/// Writes happen under the directory's write lock, so the identity index
/// is read and rewritten without races.
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Ok(Self {
            db: storage::open_db(dir)?,
        })
    }

    pub fn card(&self, id: &CardId) -> Result<Option<StoredCard>, StorageError> {
        let started = std::time::Instant::now();
        let card = self.db.get(stored_card_key(id.as_bytes()));
        record_store("card", started);
        card?.map(|v| decode_card(&v)).transpose()
    }

    pub fn cards_of(&self, identity: &str) -> Result<Vec<StoredCard>, StorageError> {
        let Some(ids) = self.db.get(identity_key(identity))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(ids.len() / 32);
        for id in ids.chunks(32) {
            match self.db.get(stored_card_key(id))? {
                Some(v) => out.push(decode_card(&v)?),
                None => return Err(StorageError::Corrupt("identity index names a missing card")),
            }
        }
        Ok(out)
    }

    /// Up to `limit` records of prefix `prefix` after the name `after`.
    fn page<T>(
        &self,
        prefix: &'static [u8],
        after: Option<&[u8]>,
        limit: usize,
        decode: fn(&[u8]) -> Result<T, StorageError>,
    ) -> Result<Vec<T>, StorageError> {
        let start = match after {
            Some(after) => after_key(prefix, after),
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.db.range(start..).take(limit) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push(decode(&value)?);
        }
        Ok(out)
    }

    pub fn cards_after(
        &self,
        after: Option<&CardId>,
        limit: usize,
    ) -> Result<Vec<StoredCard>, StorageError> {
        self.page(
            b"c/",
            after.map(|id| id.as_bytes().as_slice()),
            limit,
            decode_card,
        )
    }

    pub fn device_list(&self, identity: &str) -> Result<Option<StoredDeviceList>, StorageError> {
        self.db
            .get(device_list_key(identity))?
            .map(|v| decode_device_list(&v))
            .transpose()
    }

    pub fn device_lists_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredDeviceList>, StorageError> {
        self.page(b"d/", after.map(str::as_bytes), limit, decode_device_list)
    }

    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get(entry_key(index))?.map(|v| v.to_vec()))
    }

    pub fn entries(&self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .db
            .range(entry_key(from)..entry_key(u64::MAX))
            .take(limit)
        {
            out.push(item?.1.to_vec());
        }
        Ok(out)
    }

    pub fn entries_at(&self, indices: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut sorted = indices.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::with_capacity(sorted.len());
        for index in sorted {
            if let Some(entry) = self.entry(index)? {
                out.push((index, entry));
            }
        }
        Ok(out)
    }

    pub fn leaf_hashes(&self) -> Result<Vec<Hash>, StorageError> {
        let mut out = Vec::new();
        for (expected, item) in self.db.scan_prefix(b"h/").enumerate() {
            let (key, value) = item?;
            if read_u64(&key[2..])? != expected as u64 {
                return Err(StorageError::Corrupt("gap in the log"));
            }
            out.push(leaf_hash(&value)?);
        }
        Ok(out)
    }

    /// The log's size: one past the last leaf hash.
    fn size(&self) -> Result<u64, StorageError> {
        match self.db.scan_prefix(b"h/").next_back() {
            Some(item) => Ok(read_u64(&item?.0[2..])? + 1),
            None => Ok(0),
        }
    }

    pub fn checkpoint(&self) -> Result<Option<SignedCheckpoint>, StorageError> {
        self.db
            .get(CHECKPOINT_KEY)?
            .map(|v| decode_checkpoint(&v))
            .transpose()
    }

    /// Applies `append` in one sled batch (atomic; durable after a flush).
    pub fn apply(&self, append: Append) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        if append.index != self.size()? {
            return Err(StorageError::Corrupt("append out of order"));
        }
        let mut batch = sled::Batch::default();
        batch.insert(entry_key(append.index), append.entry);
        batch.insert(hash_key(append.index), append.leaf_hash.to_vec());
        for card in &append.cards {
            let id = record_id(card)?;
            batch.insert(stored_card_key(id.as_bytes()), card.encode_to_vec());
            let key = identity_key(&card.identity);
            let mut ids = self.db.get(&key)?.map(|v| v.to_vec()).unwrap_or_default();
            if !ids.chunks(32).any(|known| known == id.as_bytes()) {
                ids.extend_from_slice(id.as_bytes());
                batch.insert(key, ids);
            }
        }
        if let Some(list) = &append.device_list {
            batch.insert(device_list_key(&list.identity), list.encode_to_vec());
        }
        batch.insert(CHECKPOINT_KEY, append.checkpoint.encode_to_vec());
        self.db.apply_batch(batch)?;
        record_store("apply", started);
        Ok(())
    }
}

impl Store for SledStore {
    fn card<'a>(&'a self, id: &'a CardId) -> StoreFuture<'a, Option<StoredCard>> {
        ready(SledStore::card(self, id))
    }

    fn cards_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<StoredCard>> {
        ready(SledStore::cards_of(self, identity))
    }

    fn cards_after<'a>(
        &'a self,
        after: Option<&'a CardId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredCard>> {
        ready(SledStore::cards_after(self, after, limit))
    }

    fn device_list<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<StoredDeviceList>> {
        ready(SledStore::device_list(self, identity))
    }

    fn device_lists_after<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDeviceList>> {
        ready(SledStore::device_lists_after(self, after, limit))
    }

    fn entry(&self, index: u64) -> StoreFuture<'_, Option<Vec<u8>>> {
        ready(SledStore::entry(self, index))
    }

    fn entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<Vec<u8>>> {
        ready(SledStore::entries(self, from, limit))
    }

    fn entries_at<'a>(&'a self, indices: &'a [u64]) -> StoreFuture<'a, Vec<(u64, Vec<u8>)>> {
        ready(SledStore::entries_at(self, indices))
    }

    fn leaf_hashes(&self) -> StoreFuture<'_, Vec<Hash>> {
        ready(SledStore::leaf_hashes(self))
    }

    fn checkpoint(&self) -> StoreFuture<'_, Option<SignedCheckpoint>> {
        ready(SledStore::checkpoint(self))
    }

    fn apply(&self, append: Append) -> StoreFuture<'_, ()> {
        ready(SledStore::apply(self, append))
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
