//! Live delivery: one broadcast channel per chat channel with subscribers,
//! carrying new messages and the growth of the membership chain. A
//! subscriber that falls behind reloads from the store, so the broadcast is
//! only a fast path, never the source of truth.
//!
//! What this process stores is published here at once. On PostgreSQL,
//! what any replica stores (this one included) is announced again by the
//! database ([`crate::store::listen`]) as an index or a chain length only,
//! and after a lost announcement every channel is woken: a subscriber
//! reads the store by index, so an item heard twice is delivered once.
//!
//! The broadcast keeps its last `capacity` items for slow subscribers, so
//! only small messages travel in it whole; for a larger one it carries the
//! index and each subscriber reads the message from the store when it is
//! ready for it. A channel's buffer thus holds at most `capacity ×
//! INLINE_MAX_BYTES`, whatever the envelopes' sizes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prost::Message as _;
use tessera_proto::server::v1::StoredMessage;
use tokio::sync::broadcast;

use crate::{error::ServerError, store::Store};

/// Largest stored message carried whole by the broadcast.
const INLINE_MAX_BYTES: usize = 16 * 1024;

/// What the broadcast carries: a new message, or a statement accepted into
/// the chain.
#[derive(Clone)]
pub(crate) enum Live {
    Inline(Arc<StoredMessage>),
    Stored(u64),
    /// The chain grew to `length` statements (subscribers read where the
    /// statement falls among the messages from the store).
    Chain {
        length: u64,
    },
    /// Something may have been stored unannounced: read the store again.
    Wake,
}

impl Live {
    /// The new message's index (none for a statement).
    pub(crate) fn index(&self) -> Option<u64> {
        match self {
            Self::Inline(m) => Some(m.index),
            Self::Stored(index) => Some(*index),
            Self::Chain { .. } | Self::Wake => None,
        }
    }

    /// The message itself (from the store when it was not carried whole).
    pub(crate) async fn message(
        &self,
        store: &Arc<dyn Store>,
        channel_id: &str,
    ) -> Result<StoredMessage, ServerError> {
        match self {
            Self::Inline(m) => Ok((**m).clone()),
            Self::Stored(index) => store
                .messages(channel_id, *index, index + 1, 1, usize::MAX)
                .await?
                .pop()
                .ok_or(ServerError::Internal(
                    "a published message is not in the store",
                )),
            Self::Chain { .. } | Self::Wake => {
                Err(ServerError::Internal("an announcement is not a message"))
            }
        }
    }
}

pub(crate) struct Hub {
    /// Items buffered per channel for slow subscribers before they reload.
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    feeds: HashMap<String, Feed>,
    /// Channels with a batch of this replica's being stored, and the
    /// highest index the database announced meanwhile (held back until
    /// the batch is published: see [`Hub::local_batch`]).
    local: HashMap<String, Option<u64>>,
}

/// One chat channel's broadcast.
struct Feed {
    sender: broadcast::Sender<Live>,
    /// The highest message index broadcast so far, if any.
    last_index: Option<u64>,
}

impl Hub {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::default(),
        }
    }

    pub(crate) fn subscribe(&self, channel_id: &str) -> Option<broadcast::Receiver<Live>> {
        let mut state = self.state.lock().ok()?;
        Some(
            state
                .feeds
                .entry(channel_id.to_owned())
                .or_insert_with(|| Feed {
                    sender: broadcast::channel(self.capacity).0,
                    last_index: None,
                })
                .sender
                .subscribe(),
        )
    }

    pub(crate) fn publish(&self, message: StoredMessage) {
        let id = message.channel_id.clone();
        let item = if message.encoded_len() <= INLINE_MAX_BYTES {
            Live::Inline(Arc::new(message))
        } else {
            Live::Stored(message.index)
        };
        self.send(&id, item);
    }

    /// Announces that `channel_id`'s chain grew to `length` statements.
    pub(crate) fn publish_chain(&self, channel_id: &str, length: u64) {
        self.send(channel_id, Live::Chain { length });
    }

    /// Announces that `channel_id` has a message at `index`, to be read
    /// from the store.
    pub(crate) fn publish_index(&self, channel_id: &str, index: u64) {
        self.send(channel_id, Live::Stored(index));
    }

    /// What the database announced: a message stored at `index` by some
    /// replica, this one included. Skipped when this hub has broadcast a
    /// message at `index` or past it already: this replica's own sends are
    /// published by their batch, and a subscriber that got a later index
    /// than the one it expects reads the gap from the store. Without this
    /// each subscriber would read again, from the database, the batch its
    /// own replica had just handed it.
    ///
    /// While this replica stores a batch of the channel's, announcements
    /// are held back until the batch is published ([`Self::local_batch`]):
    /// the database announces a batch as it commits, before its committer
    /// has published it here, and a subscriber handed that index first
    /// would read the whole batch from the database.
    pub(crate) fn announced_index(&self, channel_id: &str, index: u64) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(held) = state.local.get_mut(channel_id) {
            *held = Some(held.map_or(index, |held| held.max(index)));
            return;
        }
        state.send_if(channel_id, Live::Stored(index), |last| {
            last.is_none_or(|last| last < index)
        });
    }

    /// Marks a batch of `channel_id`'s being stored and published by this
    /// replica, until the guard drops: the database's announcements of the
    /// channel meanwhile are held back, then passed on as one if they name
    /// an index past what the batch published. One batch per channel is
    /// in flight at a time (`send_batch`).
    pub(crate) fn local_batch<'a>(&'a self, channel_id: &'a str) -> LocalBatch<'a> {
        if let Ok(mut state) = self.state.lock() {
            state.local.insert(channel_id.to_owned(), None);
        }
        LocalBatch {
            hub: self,
            channel_id,
        }
    }

    /// Wakes every channel's subscribers to read the store again.
    pub(crate) fn wake_all(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state
            .feeds
            .retain(|_, feed| feed.sender.send(Live::Wake).is_ok());
    }

    fn send(&self, channel_id: &str, item: Live) {
        if let Ok(mut state) = self.state.lock() {
            state.send_if(channel_id, item, |_| true);
        }
    }
}

/// A batch of this replica's in flight ([`Hub::local_batch`]).
pub(crate) struct LocalBatch<'a> {
    hub: &'a Hub,
    channel_id: &'a str,
}

impl Drop for LocalBatch<'_> {
    fn drop(&mut self) {
        let Ok(mut state) = self.hub.state.lock() else {
            return;
        };
        if let Some(Some(index)) = state.local.remove(self.channel_id) {
            state.send_if(self.channel_id, Live::Stored(index), |last| {
                last.is_none_or(|last| last < index)
            });
        }
    }
}

impl State {
    /// Broadcasts `item` if `wanted` says so, given the highest message
    /// index broadcast so far.
    fn send_if(&mut self, channel_id: &str, item: Live, wanted: impl FnOnce(Option<u64>) -> bool) {
        let channels = &mut self.feeds;
        let Some(feed) = channels.get_mut(channel_id) else {
            return;
        };
        if !wanted(feed.last_index) {
            return;
        }
        if let Some(index) = item.index() {
            feed.last_index = Some(feed.last_index.map_or(index, |last| last.max(index)));
        }
        if feed.sender.send(item).is_err() {
            // Nobody listens any more.
            channels.remove(channel_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(index: u64) -> StoredMessage {
        StoredMessage {
            channel_id: "c".into(),
            index,
            ..StoredMessage::default()
        }
    }

    fn indices(rx: &mut broadcast::Receiver<Live>) -> Vec<Option<u64>> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|item| item.index())).collect()
    }

    #[test]
    fn announcements_of_what_this_replica_broadcast_are_skipped_and_others_pass() {
        let hub = Hub::new(16);
        let mut rx = hub.subscribe("c").unwrap();
        hub.publish(message(1));
        hub.publish(message(2));
        // The database announces this replica's own batch (its last index),
        // then another replica's message, then a late announcement of an
        // index this replica passed already.
        hub.announced_index("c", 2);
        hub.announced_index("c", 5);
        hub.announced_index("c", 4);
        hub.publish_chain("c", 3);
        hub.announced_index("c", 6);
        assert_eq!(indices(&mut rx), [Some(1), Some(2), Some(5), None, Some(6)]);
        // A channel nobody listens to keeps nothing.
        hub.announced_index("other", 1);
        assert!(!hub.state.lock().unwrap().feeds.contains_key("other"));
    }

    #[test]
    fn announcements_during_a_local_batch_wait_for_it_and_pass_only_past_it() {
        let hub = Hub::new(16);
        let mut rx = hub.subscribe("c").unwrap();
        let mut other = hub.subscribe("d").unwrap();
        {
            let _batch = hub.local_batch("c");
            // The database announces the batch as it commits, before its
            // committer publishes it; another channel is not held back.
            hub.announced_index("c", 3);
            hub.announced_index("d", 7);
            assert_eq!(indices(&mut rx), []);
            assert_eq!(indices(&mut other), [Some(7)]);
            for index in 1..=3 {
                hub.publish(message(index));
            }
        }
        assert_eq!(indices(&mut rx), [Some(1), Some(2), Some(3)]);
        // A batch that published nothing (its store failed) while another
        // replica's was announced: the highest announcement passes when it
        // ends.
        {
            let _batch = hub.local_batch("c");
            hub.announced_index("c", 5);
            hub.announced_index("c", 4);
            assert_eq!(indices(&mut rx), []);
        }
        assert_eq!(indices(&mut rx), [Some(5)]);
        // Once it has ended, announcements pass at once again.
        hub.announced_index("c", 6);
        assert_eq!(indices(&mut rx), [Some(6)]);
    }
}
