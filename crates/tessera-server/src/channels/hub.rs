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
//! Messages go out in index order. What another replica stored is read
//! from the store once here, by one task per channel, and broadcast like
//! this replica's own, rather than read by each subscriber; this
//! replica's messages past such a gap wait until it is read. Only gaps of
//! at most half the buffer (`capacity / 2`) are read, and at most as many
//! messages wait: a wider gap would make the subscribers lag anyway. For
//! a wider gap, a failed or slow read, or one that does not find the
//! gap's start, what waits goes out as it is and subscribers read the gap
//! themselves. The hub trusts the database's announcements as it trusts
//! its rows.
//!
//! The broadcast keeps its last `capacity` items for slow subscribers, so
//! only small messages travel in it whole; for a larger one it carries the
//! index and each subscriber reads the message from the store when it is
//! ready for it. A channel's buffer thus holds at most `capacity ×
//! INLINE_MAX_BYTES`, whatever the envelopes' sizes, and what waits behind
//! a gap half as much again.

use std::{
    collections::{BTreeMap, HashMap},
    mem,
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message as _;
use tessera_proto::server::v1::StoredMessage;
use tokio::{runtime::Handle, sync::broadcast};

use crate::{error::ServerError, store::Store};

/// Largest stored message carried whole by the broadcast.
const INLINE_MAX_BYTES: usize = 16 * 1024;
/// Bytes of messages read at a time to fill a gap (the gap's messages
/// are at most half the broadcast's capacity).
const FILL_BYTES: usize = 1024 * 1024;
/// How long reading one gap may take before subscribers are left to read
/// it themselves.
const FILL_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// A stored message as the broadcast carries it: whole if small.
    fn of(message: StoredMessage) -> Self {
        if message.encoded_len() <= INLINE_MAX_BYTES {
            Self::Inline(Arc::new(message))
        } else {
            Self::Stored(message.index)
        }
    }

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
    /// Where gaps are read from.
    store: Arc<dyn Store>,
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
    /// Widest gap read, and most messages waiting behind one.
    limit: u64,
    /// The highest message index broadcast so far, if any: every index
    /// below it went out before it (or was left to the subscribers to
    /// read, see [`Feed::give_up`]).
    last_index: Option<u64>,
    /// The highest index known stored: announced, or waiting.
    known: Option<u64>,
    /// This replica's messages past a gap, by index, until it is filled.
    waiting: BTreeMap<u64, Live>,
    /// Whether a task is reading a gap from the store ([`Hub::fill`]).
    filling: bool,
    /// Counts wake-ups: a read started before one is void.
    generation: u64,
}

impl Feed {
    fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::channel(capacity).0,
            limit: (capacity as u64 / 2).max(1),
            last_index: None,
            known: None,
            waiting: BTreeMap::new(),
            filling: false,
            generation: 0,
        }
    }

    /// Sends `item` to the subscribers, noting its index.
    fn broadcast(&mut self, item: Live) {
        if let Some(index) = item.index() {
            self.last_index = Some(self.last_index.map_or(index, |last| last.max(index)));
        }
        // None listening: the hub drops the feed (`Hub::with_feed`).
        let _ = self.sender.send(item);
    }

    /// Takes the message at `index` in order: broadcast if it is the next
    /// (with what waited behind it), kept while a gap comes before it,
    /// dropped if it went out already.
    fn offer(&mut self, index: u64, item: Live) {
        match self.last_index {
            Some(last) if index <= last => {}
            Some(last) if index > last.saturating_add(1) => {
                self.known = Some(self.known.map_or(index, |known| known.max(index)));
                self.waiting.insert(index, item);
                if self.waiting.len() as u64 > self.limit {
                    self.give_up();
                }
            }
            // The next index, or the first this feed hears of.
            _ => {
                self.broadcast(item);
                while let Some(entry) = self.waiting.first_entry() {
                    if Some(*entry.key()) != self.last_index.map(|last| last.saturating_add(1)) {
                        break;
                    }
                    let item = entry.remove();
                    self.broadcast(item);
                }
            }
        }
    }

    /// Notes that a message is stored at `index` (by some replica).
    fn announce(&mut self, index: u64) {
        match self.last_index {
            // Nothing to read from yet: the subscribers read the store.
            None => self.broadcast(Live::Stored(index)),
            Some(last) if index <= last => {}
            Some(_) => self.known = Some(self.known.map_or(index, |known| known.max(index))),
        }
    }

    /// The indices to read from the store: after the last broadcast, up
    /// to the first waiting message or the highest known index.
    fn gap(&self) -> Option<(u64, u64)> {
        let last = self.last_index?;
        let end = match self.waiting.keys().next() {
            Some(&first) => first.saturating_sub(1),
            None => self.known?,
        };
        (end > last).then(|| (last + 1, end))
    }

    /// The gap, if it is to be read: a wider one is given up on at once.
    fn gap_to_read(&mut self) -> Option<(u64, u64)> {
        let (from, to) = self.gap()?;
        if to - from >= self.limit {
            self.give_up();
            return None;
        }
        Some((from, to))
    }

    /// Broadcasts what waits as it is and the highest index known: each
    /// subscriber reads what it lacks from the store.
    fn give_up(&mut self) {
        for (_, item) in mem::take(&mut self.waiting) {
            self.broadcast(item);
        }
        if let Some(known) = self.known
            && self.last_index.is_none_or(|last| last < known)
        {
            self.broadcast(Live::Stored(known));
        }
    }

    /// After announcements may have been lost: what waits goes out, every
    /// subscriber reads the store, and the feed starts afresh (a read in
    /// flight is void: the subscribers have read past it).
    fn wake(&mut self) {
        self.give_up();
        let _ = self.sender.send(Live::Wake);
        self.last_index = None;
        self.known = None;
        self.generation += 1;
    }
}

impl Hub {
    pub(crate) fn new(capacity: usize, store: Arc<dyn Store>) -> Self {
        Self {
            capacity: capacity.max(1),
            store,
            state: Mutex::default(),
        }
    }

    pub(crate) fn subscribe(&self, channel_id: &str) -> Option<broadcast::Receiver<Live>> {
        let mut state = self.state.lock().ok()?;
        Some(
            state
                .feeds
                .entry(channel_id.to_owned())
                .or_insert_with(|| Feed::new(self.capacity))
                .sender
                .subscribe(),
        )
    }

    /// Runs `f` on `channel_id`'s feed, if it has subscribers (dropping it
    /// once it has none), then starts a task reading its gap if it has one
    /// and none runs.
    fn with_feed<T>(
        self: &Arc<Self>,
        channel_id: &str,
        f: impl FnOnce(&mut Feed) -> T,
    ) -> Option<T> {
        let (out, fill) = {
            let mut state = self.state.lock().ok()?;
            let feed = state.feeds.get_mut(channel_id)?;
            let out = f(feed);
            let mut fill = None;
            if feed.sender.receiver_count() == 0 {
                state.feeds.remove(channel_id);
            } else if !feed.filling && feed.gap_to_read().is_some() {
                feed.filling = true;
                fill = Some(feed.sender.clone());
            }
            (out, fill)
        };
        // Spawned with the lock released.
        if let Some(sender) = fill {
            let task = Fill {
                hub: self.clone(),
                channel_id: channel_id.to_owned(),
                sender,
                running: true,
                deadline: None,
            };
            match Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(task.run());
                }
                // No runtime to read in: the guard gives the gap up.
                Err(_) => drop(task),
            }
        }
        Some(out)
    }

    pub(crate) fn publish(self: &Arc<Self>, message: StoredMessage) {
        let (id, index) = (message.channel_id.clone(), message.index);
        self.with_feed(&id, |feed| feed.offer(index, Live::of(message)));
    }

    /// Announces that `channel_id`'s chain grew to `length` statements.
    pub(crate) fn publish_chain(self: &Arc<Self>, channel_id: &str, length: u64) {
        self.with_feed(channel_id, |feed| feed.broadcast(Live::Chain { length }));
    }

    /// Announces that `channel_id` has a message at `index`, to be read
    /// from the store.
    pub(crate) fn publish_index(self: &Arc<Self>, channel_id: &str, index: u64) {
        self.with_feed(channel_id, |feed| feed.offer(index, Live::Stored(index)));
    }

    /// What the database announced: a message stored at `index` by some
    /// replica, this one included. Nothing to do when this hub has
    /// broadcast a message at `index` or past it already (this replica's
    /// own sends are published by their batch); otherwise the gap up to it
    /// is read here, for all subscribers, and broadcast (unless it is too
    /// wide, or the feed is new or just woken: then the index goes out and
    /// each subscriber reads).
    ///
    /// While this replica stores a batch of the channel's, announcements
    /// are held back until the batch is published ([`Self::local_batch`]):
    /// the database announces a batch as it commits, before its committer
    /// has published it here, and the batch would be read back.
    pub(crate) fn announced_index(self: &Arc<Self>, channel_id: &str, index: u64) {
        if let Ok(mut state) = self.state.lock()
            && let Some(held) = state.local.get_mut(channel_id)
        {
            *held = Some(held.map_or(index, |held| held.max(index)));
            return;
        }
        self.with_feed(channel_id, |feed| feed.announce(index));
    }

    /// Marks a batch of `channel_id`'s being stored and published by this
    /// replica, until the guard drops: the database's announcements of the
    /// channel meanwhile are held back, then taken as one. One batch per
    /// channel is in flight at a time (`send_batch`).
    pub(crate) fn local_batch(self: &Arc<Self>, channel_id: &str) -> LocalBatch {
        if let Ok(mut state) = self.state.lock() {
            state.local.insert(channel_id.to_owned(), None);
        }
        LocalBatch {
            hub: self.clone(),
            channel_id: channel_id.to_owned(),
        }
    }

    /// Wakes every channel's subscribers to read the store again (after
    /// announcements may have been lost).
    pub(crate) fn wake_all(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.feeds.retain(|_, feed| {
            feed.wake();
            feed.sender.receiver_count() > 0
        });
    }
}

/// The task reading one channel's gaps ([`Hub::with_feed`] starts it):
/// reads each gap once and broadcasts it, until the channel has none, its
/// feed is gone (`sender`: the feed it was started for), or a read fails.
/// Should it end otherwise (a panic, the task aborted), its guard gives
/// the gap up to the subscribers and lets a later gap start a new task.
struct Fill {
    hub: Arc<Hub>,
    channel_id: String,
    sender: broadcast::Sender<Live>,
    running: bool,
    /// When the gap being read is given up on ([`FILL_TIMEOUT`] after its
    /// first read: a gap of large messages takes a read per megabyte).
    deadline: Option<tokio::time::Instant>,
}

impl Fill {
    async fn run(mut self) {
        while self.fill_one().await {}
        self.running = false;
    }

    /// Runs `f` on this task's feed (not one made afresh since).
    fn with_own_feed<T>(&self, f: impl FnOnce(&mut Feed) -> T) -> Option<T> {
        let sender = &self.sender;
        self.hub
            .with_feed(&self.channel_id, |feed| {
                feed.sender.same_channel(sender).then(|| f(feed))
            })
            .flatten()
    }

    /// Reads and broadcasts the feed's next gap; false when done.
    async fn fill_one(&mut self) -> bool {
        let gap = self.with_own_feed(|feed| {
            let gap = feed.gap_to_read().map(|gap| (gap, feed.generation));
            feed.filling = gap.is_some();
            gap
        });
        let Some(Some(((from, to), generation))) = gap else {
            return false;
        };
        let want = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
        let deadline = *self
            .deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + FILL_TIMEOUT);
        let read = tokio::time::timeout_at(
            deadline,
            self.hub.store.messages(
                &self.channel_id,
                from,
                to.saturating_add(1),
                want,
                FILL_BYTES,
            ),
        )
        .await;
        let filled = self.with_own_feed(|feed| {
            if feed.generation != generation {
                // Woken meanwhile: the subscribers read past this.
                return Some(true);
            }
            match read {
                Ok(Ok(messages)) if messages.first().is_some_and(|m| m.index == from) => {
                    for message in messages {
                        let index = message.index;
                        feed.offer(index, Live::of(message));
                    }
                    // The gap read whole: the next one gets a new deadline.
                    Some(feed.last_index.is_some_and(|last| last >= to))
                }
                // An error, a timeout, or the gap's start missing: the
                // subscribers read the store themselves.
                _ => {
                    feed.give_up();
                    feed.filling = false;
                    None
                }
            }
        });
        match filled {
            Some(Some(whole)) => {
                if whole {
                    self.deadline = None;
                }
                true
            }
            _ => false,
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if self.running {
            self.with_own_feed(|feed| {
                feed.give_up();
                feed.filling = false;
            });
        }
    }
}

/// A batch of this replica's in flight ([`Hub::local_batch`]).
pub(crate) struct LocalBatch {
    hub: Arc<Hub>,
    channel_id: String,
}

impl Drop for LocalBatch {
    fn drop(&mut self) {
        let held = match self.hub.state.lock() {
            Ok(mut state) => state.local.remove(&self.channel_id).flatten(),
            Err(_) => None,
        };
        if let Some(index) = held {
            self.hub
                .with_feed(&self.channel_id, |feed| feed.announce(index));
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

    /// A hub whose store holds nothing: any gap it reads is missing, and
    /// it leaves the subscribers to read it.
    fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(16, Arc::new(crate::store::MemoryStore::default())))
    }

    /// What the feed holds now.
    fn indices(rx: &mut broadcast::Receiver<Live>) -> Vec<Option<u64>> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|item| item.index())).collect()
    }

    /// The next item, within 10 s.
    async fn next(rx: &mut broadcast::Receiver<Live>) -> Option<u64> {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an item within 10 s")
            .expect("the feed is open")
            .index()
    }

    #[tokio::test]
    async fn announcements_of_what_this_replica_broadcast_are_skipped_and_others_pass() {
        let hub = hub();
        let mut rx = hub.subscribe("c").unwrap();
        hub.publish(message(1));
        hub.publish(message(2));
        // The database announces this replica's own batch (its last
        // index), then late an index passed already.
        hub.announced_index("c", 2);
        hub.announced_index("c", 1);
        hub.publish_chain("c", 3);
        assert_eq!(indices(&mut rx), [Some(1), Some(2), None]);
        // Another replica's message, which the hub cannot read (not in its
        // store): it names the index, and subscribers read the store.
        hub.announced_index("c", 5);
        assert_eq!(next(&mut rx).await, Some(5));
        // A channel nobody listens to keeps nothing.
        hub.announced_index("other", 1);
        assert!(!hub.state.lock().unwrap().feeds.contains_key("other"));
    }

    #[tokio::test]
    async fn announcements_during_a_local_batch_wait_for_it_and_pass_only_past_it() {
        let hub = hub();
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
        // replica's was announced: the highest announcement is taken when
        // it ends.
        {
            let _batch = hub.local_batch("c");
            hub.announced_index("c", 5);
            hub.announced_index("c", 4);
            assert_eq!(indices(&mut rx), []);
        }
        assert_eq!(next(&mut rx).await, Some(5));
        // Once it has ended, announcements are taken at once again.
        hub.announced_index("c", 6);
        assert_eq!(next(&mut rx).await, Some(6));
        assert_eq!(indices(&mut rx), []);
    }

    #[tokio::test]
    async fn a_gap_wider_than_half_the_buffer_is_left_to_the_subscribers_unread() {
        let hub = hub(); // a buffer of 16: gaps of up to 8 are read
        let mut rx = hub.subscribe("c").unwrap();
        hub.publish(message(1));
        hub.announced_index("c", 20);
        // At once, before any task could have read the store.
        assert_eq!(indices(&mut rx), [Some(1), Some(20)]);
        // This replica's messages waiting behind a gap: at most 8.
        for index in 22..=29 {
            hub.publish(message(index));
        }
        assert_eq!(indices(&mut rx), []);
        hub.publish(message(30));
        assert_eq!(
            indices(&mut rx),
            (22..=30).map(Some).collect::<Vec<_>>(),
            "the ninth sends them all out, in order"
        );
    }

    #[test]
    fn without_a_runtime_to_read_in_a_gap_is_left_to_the_subscribers() {
        let hub = hub();
        let mut rx = hub.subscribe("c").unwrap();
        hub.publish(message(1));
        hub.publish(message(3));
        assert_eq!(indices(&mut rx), [Some(1), Some(3)]);
        assert!(!hub.state.lock().unwrap().feeds["c"].filling);
        // The hub still works (its lock was not poisoned).
        assert!(hub.subscribe("c").is_some());
    }

    #[tokio::test]
    async fn a_fill_task_that_ends_abnormally_gives_its_gap_up() {
        let hub = hub();
        let mut rx = hub.subscribe("c").unwrap();
        let sender = {
            let mut state = hub.state.lock().unwrap();
            let feed = state.feeds.get_mut("c").unwrap();
            feed.offer(1, Live::of(message(1)));
            feed.offer(3, Live::of(message(3)));
            feed.filling = true; // as if a task were reading 2
            feed.sender.clone()
        };
        assert_eq!(indices(&mut rx), [Some(1)]);
        // The task ends without finishing (a panic, or aborted).
        drop(Fill {
            hub: hub.clone(),
            channel_id: "c".into(),
            sender,
            running: true,
            deadline: None,
        });
        assert_eq!(indices(&mut rx), [Some(3)]);
        assert!(!hub.state.lock().unwrap().feeds["c"].filling);
    }
}
