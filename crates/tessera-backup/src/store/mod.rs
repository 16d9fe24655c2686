//! The backup service's storage: the archive of OrgEncMsgs, kept as the
//! ciphertext members sent (sealed to the OrgCard), keyed by channel and
//! message index. An async trait naming no backend's types, and three
//! backends, one file each: `sled` (the embedded default), `postgres`
//! (several replicas on one database) and `memory` (unit tests). The shared
//! behaviour every backend must show is [`conformance::exercise`].
//!
//! The archive only grows: the first record stored for a message is kept
//! for good, so whoever finds one already there may read it back.

mod memory;
mod postgres;
mod sled;

use std::{future::Future, pin::Pin};

use prost::Message;
use tessera_service::storage::{FlushFuture, StorageError};

pub use tessera_service::postgres::{PgOptions, PgSetupError};

pub use self::{memory::MemoryStore, postgres::PgStore, sled::SledStore};

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

/// What a store's methods return: boxed, so `Arc<dyn Store>` works.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StorageError>> + Send + 'a>>;

/// An answer already known (the embedded backends answer synchronously).
fn ready<'a, T: Send + 'a>(result: Result<T, StorageError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

fn decode(bytes: &[u8]) -> Result<Archived, StorageError> {
    Archived::decode(bytes).map_err(|_| StorageError::Corrupt("archived message"))
}

/// Storage of the backup service. Every method may run concurrently with
/// any other, from this process or (on PostgreSQL) from other replicas.
pub trait Store: Send + Sync + 'static {
    fn get<'a>(&'a self, channel_id: &'a str, index: u64) -> StoreFuture<'a, Option<Archived>>;
    /// Stores `record` unless one exists for its message; `false` if one
    /// did. Of concurrent inserts for one message exactly one stores.
    fn insert<'a>(&'a self, record: &'a Archived) -> StoreFuture<'a, bool>;
    /// Archived messages of a channel with `from <= index < to`, ascending, at most `limit`.
    fn range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<Archived>>;
    /// How many messages [`Store::range`] would return, without decoding them.
    fn count<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> StoreFuture<'a, usize>;
    /// Resolves when every insert so far is durable.
    fn flush(&self) -> FlushFuture<'_>;
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

    pub fn record(channel_id: &str, index: u64, who: &str) -> Archived {
        Archived {
            channel_id: channel_id.into(),
            message_index: index,
            org_card_id: vec![1; 32],
            encapsulated_key: vec![2; 32],
            ciphertext: format!("{channel_id}/{index} by {who}").into_bytes(),
            submitted_by: who.into(),
            submitted_at_ms: 1_700_000_000_000,
        }
    }

    /// Inserts `writers` different records for one message at once (all
    /// polled together, so a backend with connections runs them in
    /// parallel) on `stores` in turn; exactly one must be stored, and it
    /// must be the one every store then reads back.
    pub async fn racing_inserts(stores: &[&dyn Store], channel_id: &str, index: u64) {
        let writers = 8;
        let records: Vec<Archived> = (0..writers)
            .map(|n| record(channel_id, index, &format!("writer {n}")))
            .collect();
        let results = futures_util::future::join_all(
            records
                .iter()
                .enumerate()
                .map(|(n, r)| stores[n % stores.len()].insert(r)),
        )
        .await;
        let stored: Vec<usize> = results
            .into_iter()
            .enumerate()
            .filter_map(|(n, r)| r.unwrap().then_some(n))
            .collect();
        assert_eq!(stored.len(), 1, "exactly one racing insert stores");
        for store in stores {
            store.flush().await.unwrap();
            assert_eq!(
                store.get(channel_id, index).await.unwrap(),
                Some(records[stored[0]].clone()),
                "every store reads back the one stored"
            );
        }
    }

    pub async fn exercise(store: &dyn Store) {
        // Empty.
        assert_eq!(store.get("c", 1).await.unwrap(), None);
        assert!(store.range("c", 0, 100, 10).await.unwrap().is_empty());
        assert_eq!(store.count("c", 0, 100, 10).await.unwrap(), 0);

        for i in [3, 1, 2, 10] {
            assert!(store.insert(&record("c", i, "alice")).await.unwrap());
        }
        store.flush().await.unwrap();
        assert!(
            !store.insert(&record("c", 2, "bob")).await.unwrap(),
            "first backup wins"
        );
        assert!(
            !store.insert(&record("c", 2, "alice")).await.unwrap(),
            "the same record again is not stored twice"
        );
        assert_eq!(
            store.get("c", 2).await.unwrap(),
            Some(record("c", 2, "alice")),
            "kept whole, as first stored"
        );
        assert_eq!(store.get("c", 4).await.unwrap(), None);
        assert_eq!(store.get("d", 2).await.unwrap(), None);
        let got: Vec<u64> = store
            .range("c", 2, 11, 10)
            .await
            .unwrap()
            .iter()
            .map(|a| a.message_index)
            .collect();
        assert_eq!(got, vec![2, 3, 10]);
        assert_eq!(
            store.range("c", 1, 100, 2).await.unwrap(),
            vec![record("c", 1, "alice"), record("c", 2, "alice")]
        );
        assert!(
            store.range("c", 4, 10, 10).await.unwrap().is_empty(),
            "end excluded"
        );
        assert!(store.range("c", 5, 5, 10).await.unwrap().is_empty());
        assert!(store.range("c", 9, 2, 10).await.unwrap().is_empty());
        assert!(store.range("c", 0, 100, 0).await.unwrap().is_empty());
        assert_eq!(store.count("c", 2, 11, 10).await.unwrap(), 3);
        assert_eq!(store.count("c", 0, 100, 2).await.unwrap(), 2);
        assert_eq!(store.count("c", 11, 2, 10).await.unwrap(), 0);
        assert!(store.range("other", 0, 100, 10).await.unwrap().is_empty());

        // Channel ids are compared whole: neither a prefix nor an extension
        // of another channel's id reaches its messages.
        assert!(store.insert(&record("c/x", 1, "eve")).await.unwrap());
        assert!(store.insert(&record("cc", 1, "eve")).await.unwrap());
        assert!(store.insert(&record("", 1, "eve")).await.unwrap());
        assert_eq!(store.count("c", 0, 100, 10).await.unwrap(), 4);
        assert_eq!(
            store.get("cc", 1).await.unwrap(),
            Some(record("cc", 1, "eve"))
        );

        // Indices far apart, up to the largest a store must hold, and
        // bounds beyond it.
        let far = i64::MAX as u64;
        assert!(store.insert(&record("big", far, "alice")).await.unwrap());
        assert!(store.insert(&record("big", 0, "alice")).await.unwrap());
        assert_eq!(
            store.range("big", 1, u64::MAX, 10).await.unwrap(),
            vec![record("big", far, "alice")]
        );
        assert_eq!(store.count("big", 0, u64::MAX, 10).await.unwrap(), 2);
        assert_eq!(store.get("big", u64::MAX).await.unwrap(), None);

        racing_inserts(&[store], "race", 7).await;
        store.flush().await.unwrap();
    }
}
