//! The key service's storage: a trait, the sled implementation (the embedded
//! default) and an in-memory one for unit tests.
//!
//! Every append (one log entry, the card records it changes and the new
//! checkpoint) is applied atomically and flushed before the service answers.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
};

use prost::Message;
use tessera_card::{CardId, transparency::Hash};
use tessera_proto::{card::v1 as card_pb, transparency::v1::SignedCheckpoint};
use tessera_service::{
    metrics::record_store,
    storage::{self, FlushFuture, StorageError, read_u64, u64_key},
};

/// A card as stored, with the log indices that let a reader see the
/// directory as of any checkpoint.
#[derive(Clone, PartialEq, Message)]
pub struct StoredCard {
    #[prost(message, optional, tag = "1")]
    pub card: Option<card_pb::Card>,
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(int32, tag = "3")]
    pub kind: i32,
    #[prost(uint64, tag = "4")]
    pub registration_index: u64,
    /// Present once revoked.
    #[prost(message, optional, tag = "5")]
    pub revocation: Option<card_pb::Revocation>,
    #[prost(uint64, tag = "6")]
    pub revocation_index: u64,
    /// Id of the card that names this one as its predecessor, or empty.
    #[prost(bytes = "vec", tag = "7")]
    pub superseded_by: Vec<u8>,
    /// Log index of the superseding card's registration.
    #[prost(uint64, tag = "8")]
    pub superseded_at_index: u64,
    /// Exact bytes of the registration's log entry (also stored in the log),
    /// so a lookup needs no second read.
    #[prost(bytes = "vec", tag = "9")]
    pub registration_entry: Vec<u8>,
}

/// An identity's device list as verified when each statement was appended:
/// where its statements are in the log, and the state after the last one.
#[derive(Clone, PartialEq, Message)]
pub struct StoredDeviceList {
    #[prost(string, tag = "1")]
    pub identity: String,
    /// Log index of each statement, in sequence order.
    #[prost(uint64, repeated, tag = "2")]
    pub indices: Vec<u64>,
    /// Statement hash of the head (32 bytes).
    #[prost(bytes = "vec", tag = "3")]
    pub head: Vec<u8>,
    /// Trusted card ids after the head (32 bytes each), ascending.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub trusted: Vec<Vec<u8>>,
}

/// One atomic append.
pub struct Append {
    pub index: u64,
    pub entry: Vec<u8>,
    pub leaf_hash: Hash,
    /// Card records created or changed by the entry.
    pub cards: Vec<StoredCard>,
    /// The device list the entry extends, already including `index`.
    pub device_list: Option<StoredDeviceList>,
    pub checkpoint: SignedCheckpoint,
}

/// Storage of the key service.
pub trait Store: Send + Sync + 'static {
    fn card(&self, id: &CardId) -> Result<Option<StoredCard>, StorageError>;
    /// Every card ever registered for `identity` (any status), by index lookup.
    fn cards_of(&self, identity: &str) -> Result<Vec<StoredCard>, StorageError>;
    /// Calls `f` with every card record, in no particular order (to build
    /// the search index at start); stops at the first error.
    fn for_each_card(
        &self,
        f: &mut dyn FnMut(StoredCard) -> Result<(), StorageError>,
    ) -> Result<(), StorageError>;
    /// The identity's device list, if it has one.
    fn device_list(&self, identity: &str) -> Result<Option<StoredDeviceList>, StorageError>;
    /// Calls `f` with every device list, in no particular order (to build
    /// the search index at start); stops at the first error.
    fn for_each_device_list(
        &self,
        f: &mut dyn FnMut(StoredDeviceList) -> Result<(), StorageError>,
    ) -> Result<(), StorageError>;
    fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError>;
    fn entries(&self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StorageError>;
    /// Every leaf hash in order, to rebuild the tree at start.
    fn leaf_hashes(&self) -> Result<Vec<Hash>, StorageError>;
    fn checkpoint(&self) -> Result<Option<SignedCheckpoint>, StorageError>;
    /// Applies `append` atomically (not yet durable).
    fn apply(&self, append: Append) -> Result<(), StorageError>;
    /// Resolves when everything applied so far is durable.
    fn flush(&self) -> FlushFuture<'_>;
}

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

fn decode_device_list(bytes: &[u8]) -> Result<StoredDeviceList, StorageError> {
    StoredDeviceList::decode(bytes).map_err(|_| StorageError::Corrupt("device list record"))
}

fn decode_card(bytes: &[u8]) -> Result<StoredCard, StorageError> {
    StoredCard::decode(bytes).map_err(|_| StorageError::Corrupt("card record"))
}

/// The sled store: one tree, keys prefixed by record type
/// (`c/` cards, `i/` identity index, `d/` device lists, `l/` entries,
/// `h/` leaf hashes, `m/` meta).
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
}

impl Store for SledStore {
    fn card(&self, id: &CardId) -> Result<Option<StoredCard>, StorageError> {
        let started = std::time::Instant::now();
        let card = self.db.get(stored_card_key(id.as_bytes()));
        record_store("card", started);
        card?.map(|v| decode_card(&v)).transpose()
    }

    fn cards_of(&self, identity: &str) -> Result<Vec<StoredCard>, StorageError> {
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

    fn for_each_card(
        &self,
        f: &mut dyn FnMut(StoredCard) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        for item in self.db.scan_prefix(b"c/") {
            f(decode_card(&item?.1)?)?;
        }
        Ok(())
    }

    fn device_list(&self, identity: &str) -> Result<Option<StoredDeviceList>, StorageError> {
        self.db
            .get(device_list_key(identity))?
            .map(|v| decode_device_list(&v))
            .transpose()
    }

    fn for_each_device_list(
        &self,
        f: &mut dyn FnMut(StoredDeviceList) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        for item in self.db.scan_prefix(b"d/") {
            f(decode_device_list(&item?.1)?)?;
        }
        Ok(())
    }

    fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get(entry_key(index))?.map(|v| v.to_vec()))
    }

    fn entries(&self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StorageError> {
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

    fn leaf_hashes(&self) -> Result<Vec<Hash>, StorageError> {
        let mut out = Vec::new();
        for (expected, item) in self.db.scan_prefix(b"h/").enumerate() {
            let (key, value) = item?;
            if read_u64(&key[2..])? != expected as u64 {
                return Err(StorageError::Corrupt("gap in the log"));
            }
            out.push(
                value
                    .as_ref()
                    .try_into()
                    .map_err(|_| StorageError::Corrupt("leaf hash"))?,
            );
        }
        Ok(out)
    }

    fn checkpoint(&self) -> Result<Option<SignedCheckpoint>, StorageError> {
        self.db
            .get(CHECKPOINT_KEY)?
            .map(|v| {
                SignedCheckpoint::decode(v.as_ref())
                    .map_err(|_| StorageError::Corrupt("checkpoint"))
            })
            .transpose()
    }

    fn apply(&self, append: Append) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        batch.insert(entry_key(append.index), append.entry);
        batch.insert(hash_key(append.index), append.leaf_hash.to_vec());
        for card in &append.cards {
            let id = card
                .card
                .as_ref()
                .map(|c| CardId::of_snapshot(&c.content_snapshot))
                .ok_or(StorageError::Corrupt("card record without card"))?;
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

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(storage::flush(&self.db))
    }
}

/// In-memory store for unit tests; nothing survives the process.
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
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryInner>, StorageError> {
        storage::lock(&self.inner)
    }
}

impl Store for MemoryStore {
    fn card(&self, id: &CardId) -> Result<Option<StoredCard>, StorageError> {
        Ok(self.lock()?.cards.get(id).cloned())
    }

    fn cards_of(&self, identity: &str) -> Result<Vec<StoredCard>, StorageError> {
        let inner = self.lock()?;
        Ok(inner
            .by_identity
            .get(identity)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| inner.cards.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn for_each_card(
        &self,
        f: &mut dyn FnMut(StoredCard) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        // Copied out first: `f` may call back into the store.
        let cards: Vec<StoredCard> = self.lock()?.cards.values().cloned().collect();
        cards.into_iter().try_for_each(f)
    }

    fn device_list(&self, identity: &str) -> Result<Option<StoredDeviceList>, StorageError> {
        Ok(self.lock()?.device_lists.get(identity).cloned())
    }

    fn for_each_device_list(
        &self,
        f: &mut dyn FnMut(StoredDeviceList) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        // Copied out first: `f` may call back into the store.
        let lists: Vec<StoredDeviceList> = self.lock()?.device_lists.values().cloned().collect();
        lists.into_iter().try_for_each(f)
    }

    fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .lock()?
            .entries
            .get(index as usize)
            .map(|e| e.0.clone()))
    }

    fn entries(&self, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StorageError> {
        Ok(self
            .lock()?
            .entries
            .iter()
            .skip(from as usize)
            .take(limit)
            .map(|e| e.0.clone())
            .collect())
    }

    fn leaf_hashes(&self) -> Result<Vec<Hash>, StorageError> {
        Ok(self.lock()?.entries.iter().map(|e| e.1).collect())
    }

    fn checkpoint(&self) -> Result<Option<SignedCheckpoint>, StorageError> {
        Ok(self.lock()?.checkpoint.clone())
    }

    fn apply(&self, append: Append) -> Result<(), StorageError> {
        let mut inner = self.lock()?;
        if append.index != inner.entries.len() as u64 {
            return Err(StorageError::Corrupt("append out of order"));
        }
        inner.entries.push((append.entry, append.leaf_hash));
        for card in append.cards {
            let id = card
                .card
                .as_ref()
                .map(|c| CardId::of_snapshot(&c.content_snapshot))
                .ok_or(StorageError::Corrupt("card record without card"))?;
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
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}
