//! The key service's storage: an async trait naming no backend's types, and
//! three backends, one file each: `sled` (the embedded default), `postgres`
//! (several machines, one writer) and `memory` (unit tests). The shared
//! behaviour every backend must show is [`conformance::exercise`].
//!
//! Every append (one log entry, the card records it changes and the new
//! checkpoint) is applied atomically and durable once `flush` resolves,
//! before the service answers.

mod memory;
mod postgres;
mod sled;

use std::{future::Future, pin::Pin};

use prost::Message;
use tessera_card::{CardId, transparency::Hash};
use tessera_proto::{card::v1 as card_pb, transparency::v1::SignedCheckpoint};
use tessera_service::storage::{FlushFuture, StorageError};

pub use self::{
    memory::MemoryStore,
    postgres::{PgOpenError, PgOptions, PgStore, WRITER_LOCK_KEY},
    sled::SledStore,
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

/// What a store's methods return: boxed, so `Arc<dyn Store>` works.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StorageError>> + Send + 'a>>;

/// An answer already known (the embedded backends answer synchronously).
fn ready<'a, T: Send + 'a>(result: Result<T, StorageError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

/// Storage of the key service. Writes come from one task at a time (the
/// directory's write lock; on PostgreSQL one process, by an advisory lock).
pub trait Store: Send + Sync + 'static {
    fn card<'a>(&'a self, id: &'a CardId) -> StoreFuture<'a, Option<StoredCard>>;
    /// Every card ever registered for `identity` (any status), in
    /// registration order.
    fn cards_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<StoredCard>>;
    /// Up to `limit` card records whose ids come after `after` (all when
    /// `None`), ascending by id bytes: the search index reads them page by
    /// page at start.
    fn cards_after<'a>(
        &'a self,
        after: Option<&'a CardId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredCard>>;
    /// The identity's device list, if it has one.
    fn device_list<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<StoredDeviceList>>;
    /// Up to `limit` device lists whose identities come after `after`,
    /// ascending by the identity's UTF-8 bytes.
    fn device_lists_after<'a>(
        &'a self,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredDeviceList>>;
    fn entry(&self, index: u64) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Up to `limit` entries from `from` on, in order.
    fn entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<Vec<u8>>>;
    /// The entries at `indices` the log holds, ascending by index (one
    /// round trip for many statements' entries).
    fn entries_at<'a>(&'a self, indices: &'a [u64]) -> StoreFuture<'a, Vec<(u64, Vec<u8>)>>;
    /// Every leaf hash in order, to rebuild the tree at start.
    fn leaf_hashes(&self) -> StoreFuture<'_, Vec<Hash>>;
    fn checkpoint(&self) -> StoreFuture<'_, Option<SignedCheckpoint>>;
    /// Applies `append` atomically: all of it or nothing. Refused (nothing
    /// written) unless `append.index` is the log's size. Durable once
    /// `flush` resolves.
    fn apply(&self, append: Append) -> StoreFuture<'_, ()>;
    /// Resolves when everything applied so far is durable.
    fn flush(&self) -> FlushFuture<'_>;
}

/// The id of a stored card record.
pub(crate) fn record_id(card: &StoredCard) -> Result<CardId, StorageError> {
    card.card
        .as_ref()
        .map(|c| CardId::of_snapshot(&c.content_snapshot))
        .ok_or(StorageError::Corrupt("card record without card"))
}

fn decode_device_list(bytes: &[u8]) -> Result<StoredDeviceList, StorageError> {
    StoredDeviceList::decode(bytes).map_err(|_| StorageError::Corrupt("device list record"))
}

fn decode_card(bytes: &[u8]) -> Result<StoredCard, StorageError> {
    StoredCard::decode(bytes).map_err(|_| StorageError::Corrupt("card record"))
}

fn decode_checkpoint(bytes: &[u8]) -> Result<SignedCheckpoint, StorageError> {
    SignedCheckpoint::decode(bytes).map_err(|_| StorageError::Corrupt("checkpoint"))
}

fn leaf_hash(bytes: &[u8]) -> Result<Hash, StorageError> {
    bytes
        .try_into()
        .map_err(|_| StorageError::Corrupt("leaf hash"))
}

/// The behaviour every backend of [`Store`] must show, as one check each
/// backend's tests run (`conformance::exercise(&store).await` on an empty
/// store), so a new backend is held to what sled and the in-memory store
/// do. Built for this crate's tests, and for other crates with the
/// `conformance` feature.
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

    fn card(identity: &str, snapshot: u8, registration_index: u64) -> StoredCard {
        StoredCard {
            card: Some(card_pb::Card {
                content_snapshot: vec![snapshot; 40],
                ..Default::default()
            }),
            identity: identity.into(),
            kind: 1,
            registration_index,
            registration_entry: vec![snapshot; 3],
            ..Default::default()
        }
    }

    fn id(card: &StoredCard) -> CardId {
        record_id(card).unwrap()
    }

    fn checkpoint(size: u64) -> SignedCheckpoint {
        SignedCheckpoint {
            content_snapshot: size.to_be_bytes().to_vec(),
            signature: vec![7; 64],
        }
    }

    fn entry(index: u64) -> Vec<u8> {
        format!("entry {index}").into_bytes()
    }

    fn append(index: u64, cards: Vec<StoredCard>, list: Option<StoredDeviceList>) -> Append {
        Append {
            index,
            entry: entry(index),
            leaf_hash: [index as u8; 32],
            cards,
            device_list: list,
            checkpoint: checkpoint(index + 1),
        }
    }

    fn list(identity: &str, indices: &[u64]) -> StoredDeviceList {
        StoredDeviceList {
            identity: identity.into(),
            indices: indices.to_vec(),
            head: vec![indices.len() as u8; 32],
            trusted: vec![vec![1; 32]],
        }
    }

    /// Every card id, page by page (`limit` at a time).
    async fn all_ids(store: &dyn Store, limit: usize) -> Vec<CardId> {
        let mut out: Vec<CardId> = Vec::new();
        loop {
            let page = store.cards_after(out.last(), limit).await.unwrap();
            assert!(page.len() <= limit);
            let done = page.len() < limit;
            out.extend(page.iter().map(id));
            if done {
                return out;
            }
        }
    }

    pub async fn exercise(store: &dyn Store) {
        // Empty.
        assert!(store.leaf_hashes().await.unwrap().is_empty());
        assert_eq!(store.checkpoint().await.unwrap(), None);
        assert_eq!(store.entry(0).await.unwrap(), None);
        assert!(store.entries(0, 10).await.unwrap().is_empty());
        assert!(store.cards_after(None, 10).await.unwrap().is_empty());
        assert!(store.device_lists_after(None, 10).await.unwrap().is_empty());
        assert!(store.cards_of("alice").await.unwrap().is_empty());
        assert_eq!(store.device_list("alice").await.unwrap(), None);

        // 0: alice's first card. 1: her second replaces it. 2: bob's card.
        // 3: alice's device list starts. 4: it grows, bob's card is revoked.
        let a = card("alice", 0xa0, 0);
        let b = card("alice", 0x10, 1);
        let mut c = card("bob", 0xc0, 2);
        store.apply(append(0, vec![a.clone()], None)).await.unwrap();
        assert_eq!(store.card(&id(&a)).await.unwrap(), Some(a.clone()));
        let superseded = StoredCard {
            superseded_by: id(&b).to_vec(),
            superseded_at_index: 1,
            ..a.clone()
        };
        store
            .apply(append(1, vec![b.clone(), superseded.clone()], None))
            .await
            .unwrap();
        store.apply(append(2, vec![c.clone()], None)).await.unwrap();
        store
            .apply(append(3, vec![], Some(list("alice", &[3]))))
            .await
            .unwrap();
        c.revocation = Some(card_pb::Revocation::default());
        c.revocation_index = 4;
        store
            .apply(append(4, vec![c.clone()], Some(list("alice", &[3, 4]))))
            .await
            .unwrap();
        store.flush().await.unwrap();

        // Records: the latest version of each, by id and by identity.
        assert_eq!(store.card(&id(&a)).await.unwrap(), Some(superseded.clone()));
        assert_eq!(store.card(&id(&c)).await.unwrap(), Some(c.clone()));
        assert_eq!(
            store.card(&CardId::of_snapshot(b"none")).await.unwrap(),
            None
        );
        assert_eq!(
            store.cards_of("alice").await.unwrap(),
            vec![superseded.clone(), b.clone()],
            "in registration order, whatever the ids"
        );
        assert_eq!(store.cards_of("bob").await.unwrap(), vec![c.clone()]);
        assert!(store.cards_of("carol").await.unwrap().is_empty());
        assert!(store.cards_of("alic").await.unwrap().is_empty());

        // Paged by id bytes, whatever the page size.
        let mut ids = vec![id(&a), id(&b), id(&c)];
        ids.sort();
        for limit in [1, 2, 3, 10] {
            assert_eq!(all_ids(store, limit).await, ids, "pages of {limit}");
        }
        assert_eq!(store.cards_after(Some(&ids[0]), 10).await.unwrap().len(), 2);

        // Device lists: the latest, paged by identity.
        assert_eq!(
            store.device_list("alice").await.unwrap(),
            Some(list("alice", &[3, 4]))
        );
        assert_eq!(store.device_list("bob").await.unwrap(), None);
        store
            .apply(append(5, vec![], Some(list("al", &[5]))))
            .await
            .unwrap();
        store
            .apply(append(6, vec![], Some(list("alice2", &[6]))))
            .await
            .unwrap();
        let mut identities = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.device_lists_after(after.as_deref(), 1).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.identity.clone());
            identities.push(last.identity.clone());
        }
        assert_eq!(identities, vec!["al", "alice", "alice2"], "byte order");

        // The log.
        assert_eq!(store.entry(4).await.unwrap(), Some(entry(4)));
        assert_eq!(store.entry(7).await.unwrap(), None);
        assert_eq!(store.entries(1, 2).await.unwrap(), vec![entry(1), entry(2)]);
        assert_eq!(
            store.entries(5, 10).await.unwrap(),
            vec![entry(5), entry(6)]
        );
        assert!(store.entries(7, 10).await.unwrap().is_empty());
        assert_eq!(
            store.entries_at(&[6, 0, 9, 6]).await.unwrap(),
            vec![(0, entry(0)), (6, entry(6))],
            "ascending, once each, only what exists"
        );
        assert!(store.entries_at(&[]).await.unwrap().is_empty());
        let hashes: Vec<Hash> = (0..7u8).map(|i| [i; 32]).collect();
        assert_eq!(store.leaf_hashes().await.unwrap(), hashes);
        assert_eq!(store.checkpoint().await.unwrap(), Some(checkpoint(7)));

        // Appends out of order are refused, and a refused append leaves no
        // trace (all or nothing).
        assert!(store.apply(append(8, vec![], None)).await.is_err());
        assert!(store.apply(append(6, vec![], None)).await.is_err());
        let mut broken = card("carol", 0x33, 7);
        broken.card = None;
        let carol = card("carol", 0x44, 7);
        assert!(matches!(
            store
                .apply(append(
                    7,
                    vec![carol.clone(), broken],
                    Some(list("carol", &[7]))
                ))
                .await,
            Err(StorageError::Corrupt(_))
        ));
        assert_eq!(store.leaf_hashes().await.unwrap(), hashes);
        assert_eq!(store.entry(7).await.unwrap(), None);
        assert_eq!(store.card(&id(&carol)).await.unwrap(), None);
        assert!(store.cards_of("carol").await.unwrap().is_empty());
        assert_eq!(store.device_list("carol").await.unwrap(), None);
        assert_eq!(store.checkpoint().await.unwrap(), Some(checkpoint(7)));
        // The log goes on from where it was.
        store
            .apply(append(7, vec![carol.clone()], None))
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.cards_of("carol").await.unwrap(), vec![carol]);
        assert_eq!(store.leaf_hashes().await.unwrap().len(), 8);
    }
}
