//! The search index: every card of every identity, in memory, with the log
//! indices that decide its status at any checkpoint and the exact bytes of
//! its registration entry, and every identity's device list statements with
//! their log indices and entries: what a search answers with.
//!
//! Search used to read the store three times per identity (the identity's
//! card list, then each card). Past a few hundred thousand cards those
//! records no longer fit sled's page cache, and at a million cards search
//! spent half its time paging them in from disk (`docs/benchmarks.md`).
//! The index is built from the stored card records and device lists at
//! start and updated by every append, so a search touches no storage: two
//! hash lookups per identity, whatever the directory's size. It costs about
//! 0.5 KB of memory per card and per statement (the entries are most of
//! it).

use std::collections::HashMap;

use tessera_card::CardId;
use tessera_service::storage::StorageError;

use crate::store::{Store, StoredCard, StoredDeviceList, record_id};

/// Marks a status change that has not happened.
const NEVER: u64 = u64::MAX;

/// Records read per page while the index is built.
const BUILD_PAGE: usize = 1000;

/// Log entries read from the store, by index.
pub(crate) type Fetched = HashMap<u64, Vec<u8>>;

/// The entries at `indices`, in one read.
pub(crate) async fn fetch(store: &dyn Store, indices: Vec<u64>) -> Result<Fetched, StorageError> {
    if indices.is_empty() {
        return Ok(Fetched::new());
    }
    Ok(store.entries_at(&indices).await?.into_iter().collect())
}

struct Slot {
    id: CardId,
    kind: i32,
    registration_index: u64,
    revoked_at: u64,
    superseded_at: u64,
    entry: Box<[u8]>,
}

impl Slot {
    /// Whether the card is registered and neither revoked nor superseded in
    /// the directory of `size` entries (as `Directory::record_at` decides).
    fn active_at(&self, size: u64) -> bool {
        self.registration_index < size && self.revoked_at >= size && self.superseded_at >= size
    }

    /// Takes the status of `stored` (the registration never changes).
    fn set_status(&mut self, stored: &StoredCard) {
        self.revoked_at = if stored.revocation.is_some() {
            stored.revocation_index
        } else {
            NEVER
        };
        self.superseded_at = if stored.superseded_by.is_empty() {
            NEVER
        } else {
            stored.superseded_at_index
        };
    }
}

/// An active card as a search sees it.
pub(crate) struct ActiveCard<'a> {
    pub(crate) registration_index: u64,
    pub(crate) registration_entry: &'a [u8],
}

/// A device list statement: its log index and entry.
pub(crate) type Statement = (u64, Box<[u8]>);

#[derive(Default)]
pub(crate) struct CardIndex {
    by_identity: HashMap<String, Vec<Slot>>,
    /// Each identity's device list statements, in sequence order.
    lists: HashMap<String, Vec<Statement>>,
}

impl CardIndex {
    /// Indexes every card record and device list in `store`, reading
    /// them page by page.
    pub(crate) async fn build(store: &dyn Store) -> Result<Self, StorageError> {
        let mut index = Self::default();
        let mut after: Option<CardId> = None;
        loop {
            let page = store.cards_after(after.as_ref(), BUILD_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(record_id(last)?);
            let fetched = fetch(store, index.missing(&page, None)).await?;
            index.update(&page, None, &fetched)?;
            if page.len() < BUILD_PAGE {
                break;
            }
        }
        let mut after: Option<String> = None;
        loop {
            let page = store
                .device_lists_after(after.as_deref(), BUILD_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.identity.clone());
            let needed = page
                .iter()
                .flat_map(|list| index.missing(&[], Some(list)))
                .collect();
            let fetched = fetch(store, needed).await?;
            for list in &page {
                index.update(&[], Some(list), &fetched)?;
            }
            if page.len() < BUILD_PAGE {
                break;
            }
        }
        for slots in index.by_identity.values_mut() {
            slots.sort_by_key(|s| s.registration_index);
        }
        Ok(index)
    }

    /// The log indices whose entries [`CardIndex::update`] needs for these
    /// records and does not hold yet.
    pub(crate) fn missing(
        &self,
        cards: &[StoredCard],
        list: Option<&StoredDeviceList>,
    ) -> Vec<u64> {
        let mut out: Vec<u64> = cards
            .iter()
            .filter(|stored| stored.registration_entry.is_empty())
            .filter(|stored| {
                let known = record_id(stored).ok().and_then(|id| {
                    self.by_identity
                        .get(&stored.identity)?
                        .iter()
                        .find(|s| s.id == id)
                });
                known.is_none()
            })
            .map(|stored| stored.registration_index)
            .collect();
        if let Some(list) = list {
            let known = self.statements(&list.identity);
            out.extend(
                list.indices
                    .iter()
                    .filter(|i| !known.iter().any(|(k, _)| k == *i)),
            );
        }
        out
    }

    /// Takes in card records (new cards, or new statuses) and a device list
    /// just written.
    /// `fetched` holds the entries [`CardIndex::missing`] named.
    pub(crate) fn update(
        &mut self,
        cards: &[StoredCard],
        list: Option<&StoredDeviceList>,
        fetched: &Fetched,
    ) -> Result<(), StorageError> {
        if let Some(list) = list {
            self.update_list(list, fetched)?;
        }
        for stored in cards {
            let id = record_id(stored)?;
            let slots = self.by_identity.entry(stored.identity.clone()).or_default();
            if let Some(slot) = slots.iter_mut().find(|s| s.id == id) {
                slot.set_status(stored);
                continue;
            }
            let entry = if stored.registration_entry.is_empty() {
                // Records written before cards carried their entry.
                fetched
                    .get(&stored.registration_index)
                    .cloned()
                    .ok_or(StorageError::Corrupt("registration entry missing"))?
            } else {
                stored.registration_entry.clone()
            };
            let mut slot = Slot {
                id,
                kind: stored.kind,
                registration_index: stored.registration_index,
                revoked_at: NEVER,
                superseded_at: NEVER,
                entry: entry.into_boxed_slice(),
            };
            slot.set_status(stored);
            slots.push(slot);
        }
        Ok(())
    }

    /// Takes `list` in: entries already indexed are kept, new ones read.
    fn update_list(
        &mut self,
        list: &StoredDeviceList,
        fetched: &Fetched,
    ) -> Result<(), StorageError> {
        let mut known: HashMap<u64, Box<[u8]>> = self
            .lists
            .remove(&list.identity)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let statements = list
            .indices
            .iter()
            .map(|&index| {
                let entry = match known.remove(&index) {
                    Some(entry) => entry,
                    None => fetched
                        .get(&index)
                        .ok_or(StorageError::Corrupt("statement entry missing"))?
                        .clone()
                        .into_boxed_slice(),
                };
                Ok((index, entry))
            })
            .collect::<Result<_, StorageError>>()?;
        self.lists.insert(list.identity.clone(), statements);
        Ok(())
    }

    /// Every device list statement of `identity`, in sequence order (also
    /// those not yet published: callers filter by log index).
    pub(crate) fn statements(&self, identity: &str) -> &[Statement] {
        self.lists.get(identity).map_or(&[], Vec::as_slice)
    }

    /// The cards of `identity` (of `kind`, when given) active in the
    /// directory of `size` entries, in registration order.
    pub(crate) fn active<'a>(
        &'a self,
        identity: &str,
        kind: Option<i32>,
        size: u64,
    ) -> impl Iterator<Item = ActiveCard<'a>> + 'a {
        self.by_identity
            .get(identity)
            .into_iter()
            .flatten()
            .filter(move |s| kind.is_none_or(|k| s.kind == k) && s.active_at(size))
            .map(|s| ActiveCard {
                registration_index: s.registration_index,
                registration_entry: &s.entry,
            })
    }
}

#[cfg(test)]
mod tests {
    use tessera_proto::card::v1 as card_pb;

    use super::*;
    use crate::store::MemoryStore;

    /// What `update` needs for these records, read from `store`.
    async fn fetched(
        index: &CardIndex,
        store: &MemoryStore,
        cards: &[StoredCard],
        list: Option<&StoredDeviceList>,
    ) -> Fetched {
        fetch(store, index.missing(cards, list)).await.unwrap()
    }

    fn stored(identity: &str, snapshot: &[u8], kind: i32, registered: u64) -> StoredCard {
        StoredCard {
            card: Some(card_pb::Card {
                content_snapshot: snapshot.to_vec(),
                ..Default::default()
            }),
            identity: identity.into(),
            kind,
            registration_index: registered,
            registration_entry: [b"entry of ", snapshot].concat(),
            ..Default::default()
        }
    }

    fn active(index: &CardIndex, identity: &str, kind: Option<i32>, size: u64) -> Vec<u64> {
        index
            .active(identity, kind, size)
            .map(|c| {
                assert!(c.registration_entry.starts_with(b"entry of "));
                c.registration_index
            })
            .collect()
    }

    #[test]
    fn statuses_follow_the_log_index_of_each_change() {
        // Every record carries its entry: nothing to read.
        let none = Fetched::new();
        let mut index = CardIndex::default();
        let mut a = stored("alice", b"a", 1, 0);
        let mut b = stored("alice", b"b", 1, 1);
        let c = stored("alice", b"c", 1, 2);
        index
            .update(&[a.clone(), b.clone(), c.clone()], None, &none)
            .unwrap();
        index
            .update(&[stored("org", b"o", 2, 3)], None, &none)
            .unwrap();
        // c replaces b at 2; a is revoked at 4.
        b.superseded_by = vec![9; 32];
        b.superseded_at_index = 2;
        a.revocation = Some(card_pb::Revocation::default());
        a.revocation_index = 4;
        index.update(&[b, a], None, &none).unwrap();

        assert_eq!(active(&index, "alice", None, 0), Vec::<u64>::new());
        assert_eq!(active(&index, "alice", None, 1), vec![0]);
        assert_eq!(active(&index, "alice", None, 2), vec![0, 1]);
        assert_eq!(active(&index, "alice", None, 3), vec![0, 2]);
        assert_eq!(active(&index, "alice", None, 5), vec![2]);
        assert_eq!(active(&index, "alice", Some(2), 5), Vec::<u64>::new());
        assert_eq!(active(&index, "org", Some(2), 5), vec![3]);
        assert_eq!(active(&index, "nobody", None, 5), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn device_lists_keep_their_statements_in_order() {
        use tessera_proto::transparency::v1::SignedCheckpoint;

        use crate::store::Append;
        let store = MemoryStore::default();
        for i in 0..4u64 {
            store
                .apply(Append {
                    index: i,
                    entry: format!("entry {i}").into_bytes(),
                    leaf_hash: [0; 32],
                    cards: Vec::new(),
                    device_list: None,
                    checkpoint: SignedCheckpoint::default(),
                })
                .await
                .unwrap();
        }
        let list = |indices: &[u64]| StoredDeviceList {
            identity: "alice".into(),
            indices: indices.to_vec(),
            ..Default::default()
        };
        let mut index = CardIndex::default();
        for indices in [&[0, 2][..], &[0, 2, 3]] {
            let list = list(indices);
            let fetched = fetched(&index, &store, &[], Some(&list)).await;
            index.update(&[], Some(&list), &fetched).unwrap();
        }
        assert_eq!(
            index.missing(&[], Some(&list(&[0, 2, 3, 1]))),
            vec![1],
            "only entries not held yet are read"
        );
        let got: Vec<(u64, &[u8])> = index
            .statements("alice")
            .iter()
            .map(|(i, e)| (*i, e.as_ref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, b"entry 0".as_slice()),
                (2, b"entry 2".as_slice()),
                (3, b"entry 3".as_slice())
            ]
        );
        assert!(index.statements("bob").is_empty());
        // A statement the log does not hold is corruption.
        let missing = list(&[0, 9]);
        let fetched = fetched(&index, &store, &[], Some(&missing)).await;
        assert!(matches!(
            index.update(&[], Some(&missing), &fetched),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn a_card_record_without_its_card_is_refused() {
        let mut card = stored("alice", b"a", 1, 0);
        card.card = None;
        assert!(matches!(
            CardIndex::default().update(&[card], None, &Fetched::new()),
            Err(StorageError::Corrupt(_))
        ));
    }
}
