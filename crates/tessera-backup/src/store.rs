//! The backup service's storage: the archive of OrgEncMsgs, kept as the
//! ciphertext members sent (sealed to the OrgCard), keyed by channel and
//! message index. A trait, the sled implementation and an in-memory one.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
};

use prost::Message;
use tessera_service::{
    metrics::record_store,
    storage::{self, FlushFuture, StorageError, u64_key},
};

/// One archived message.
#[derive(Clone, PartialEq, Message)]
pub struct Archived {
    #[prost(string, tag = "1")]
    pub channel_id: String,
    #[prost(uint64, tag = "2")]
    pub message_index: u64,
    /// Card id of the OrgCard it is sealed to.
    #[prost(bytes = "vec", tag = "3")]
    pub org_card_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub encapsulated_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub ciphertext: Vec<u8>,
    /// Who backed it up first, and when (unix ms).
    #[prost(string, tag = "6")]
    pub submitted_by: String,
    #[prost(int64, tag = "7")]
    pub submitted_at_ms: i64,
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, channel_id: &str, index: u64) -> Result<Option<Archived>, StorageError>;
    /// Stores `record` unless one exists for its message; `false` if one did.
    fn insert(&self, record: &Archived) -> Result<bool, StorageError>;
    /// Archived messages of a channel with `from <= index < to`, ascending, at most `limit`.
    fn range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Archived>, StorageError>;
    /// How many messages [`Store::range`] would return, without decoding them.
    fn count(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<usize, StorageError>;
    fn flush(&self) -> FlushFuture<'_>;
}

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
}

fn decode(bytes: &[u8]) -> Result<Archived, StorageError> {
    Archived::decode(bytes).map_err(|_| StorageError::Corrupt("archived message"))
}

impl Store for SledStore {
    fn get(&self, channel_id: &str, index: u64) -> Result<Option<Archived>, StorageError> {
        self.db
            .get(key(channel_id, index))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn insert(&self, record: &Archived) -> Result<bool, StorageError> {
        let started = std::time::Instant::now();
        let swapped = self.db.compare_and_swap(
            key(&record.channel_id, record.message_index),
            None as Option<&[u8]>,
            Some(record.encode_to_vec()),
        );
        record_store("insert", started);
        Ok(swapped?.is_ok())
    }

    fn range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Archived>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self
            .db
            .range(key(channel_id, from)..key(channel_id, to))
            .take(limit)
        {
            out.push(decode(&item?.1)?);
        }
        Ok(out)
    }

    fn count(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<usize, StorageError> {
        if from >= to {
            return Ok(0);
        }
        let mut n = 0;
        for item in self
            .db
            .range(key(channel_id, from)..key(channel_id, to))
            .take(limit)
        {
            item?;
            n += 1;
        }
        Ok(n)
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(storage::flush(&self.db))
    }
}

type Archive = BTreeMap<(String, u64), Archived>;

#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Archive>>,
}

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Archive>, StorageError> {
        storage::lock(&self.inner)
    }
}

impl Store for MemoryStore {
    fn get(&self, channel_id: &str, index: u64) -> Result<Option<Archived>, StorageError> {
        Ok(self.lock()?.get(&(channel_id.to_owned(), index)).cloned())
    }

    fn insert(&self, record: &Archived) -> Result<bool, StorageError> {
        let mut m = self.lock()?;
        let k = (record.channel_id.clone(), record.message_index);
        if m.contains_key(&k) {
            return Ok(false);
        }
        m.insert(k, record.clone());
        Ok(true)
    }

    fn range(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Archived>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .lock()?
            .range((channel_id.to_owned(), from)..(channel_id.to_owned(), to))
            .take(limit)
            .map(|(_, v)| v.clone())
            .collect())
    }

    fn count(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<usize, StorageError> {
        Ok(self.range(channel_id, from, to, limit)?.len())
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
        let rec = |i: u64, who: &str| Archived {
            channel_id: "c".into(),
            message_index: i,
            submitted_by: who.into(),
            ..Default::default()
        };
        for i in [3, 1, 2, 10] {
            assert!(store.insert(&rec(i, "alice")).unwrap());
        }
        assert!(!store.insert(&rec(2, "bob")).unwrap(), "first backup wins");
        assert_eq!(store.get("c", 2).unwrap().unwrap().submitted_by, "alice");
        let got: Vec<u64> = store
            .range("c", 2, 11, 10)
            .unwrap()
            .iter()
            .map(|a| a.message_index)
            .collect();
        assert_eq!(got, vec![2, 3, 10]);
        assert_eq!(store.range("c", 1, 100, 2).unwrap().len(), 2);
        assert_eq!(store.count("c", 2, 11, 10).unwrap(), 3);
        assert_eq!(store.count("c", 0, 100, 2).unwrap(), 2);
        assert!(store.range("other", 0, 100, 10).unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store() {
        conformance::exercise(&MemoryStore::default());
    }

    #[test]
    fn sled_store() {
        let dir = std::env::temp_dir().join(format!("tessera-backup-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        conformance::exercise(&SledStore::open(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
