//! Group commit of sends: the sends to one channel whose checks passed
//! wait in the channel's queue and are stored together, one call of
//! [`Store::append_messages`] (one transaction on PostgreSQL) and one flush
//! (sled) per batch.
//!
//! The first send to a channel with nothing in flight starts a task, the
//! channel's committer, which stores the queue at once (no added latency
//! when the channel is idle); sends arriving while it commits wait in the
//! queue and form its next batch, up to [`Limits::max_send_batch`]
//! messages and [`MAX_BATCH_BYTES`]. The task ends when the queue is
//! empty. A task rather than the first sender's own future: a client that
//! hangs up must not strand the others' answers. So a channel has at most
//! one batch in flight, which orders its indices, and different channels
//! commit in parallel. The committer stamps each batch's `server_time_ms`
//! when it stores it. Should it end abnormally (a panic), a guard answers
//! the sends still queued and frees the channel. A channel's queue is
//! bounded ([`queue_limit`], [`MAX_QUEUE_BYTES`]: past it, sends are
//! refused as busy), and a queued send whose caller has gone is dropped
//! when the next batch is formed.
//!
//! On the embedded stores the task holds the user locks of the batch's
//! senders (shared with the rest of the server, taken in one fixed order)
//! while the store decides: they check a user's usage and write it under
//! that lock elsewhere (sender keys, attachments). On PostgreSQL it takes
//! none ([`Store::batch_needs_user_locks`]): the transaction locks the
//! usage rows. It never holds a channel's lock
//! or gate: a statement accepted meanwhile (by another replica) moves the
//! chain, the store answers `Moved` and that sender checks again. A
//! statement on this replica takes the channel's send gate exclusive and
//! waits for the channel's batches to drain ([`SendBatches::idle`]).
//!
//! [`Limits::max_send_batch`]: crate::Limits::max_send_batch

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prost::Message as _;
use tessera_service::{metrics, storage::StorageError};
use tokio::sync::oneshot;

use super::hub::Hub;
use crate::{
    Locks,
    error::ServerError,
    store::{BatchOutcome, PendingMessage, Store},
};

/// Most bytes of stored messages in one batch (the first always goes).
pub(crate) const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most bytes of messages waiting in one channel's queue (besides the
/// batch in flight); past it, or past [`queue_limit`] sends, a send is
/// refused RESOURCE_EXHAUSTED with a retry delay.
pub(crate) const MAX_QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// One sender may hold at most 1/`SENDER_SHARE` of a channel's queue.
const SENDER_SHARE: usize = 4;
/// Fewest sends a channel's queue takes, whatever `max_send_batch`.
const MIN_QUEUE_SENDS: usize = 1024;
/// The retry delay a send refused for a full queue carries.
const QUEUE_RETRY: Duration = Duration::from_secs(1);

/// Most sends waiting in one channel's queue: four batches, and at least
/// [`MIN_QUEUE_SENDS`].
fn queue_limit(max_batch: usize) -> usize {
    max_batch.saturating_mul(4).max(MIN_QUEUE_SENDS)
}

/// A send's outcome, and the time it was stored at (stamped by the
/// committer: never before an earlier batch's on this server).
#[derive(Debug)]
pub(crate) struct Committed {
    pub(crate) outcome: BatchOutcome,
    pub(crate) server_time_ms: i64,
}

/// Where a queued send's outcome goes; [`SendBatches::answer`] awaits it.
pub(crate) type Answer = oneshot::Receiver<Result<Committed, ServerError>>;

/// A send in a channel's queue, and where its outcome goes.
struct Waiting {
    pending: PendingMessage,
    /// Its stored size, counted in its queue's bytes.
    size: usize,
    reply: oneshot::Sender<Result<Committed, ServerError>>,
}

/// A channel's sends waiting for its next batch.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    bytes: usize,
}

/// The queues of the channels with a batch in flight.
pub(crate) struct SendBatches {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    user_locks: Arc<Locks>,
    max_batch: usize,
    /// A channel is here while its committer runs (its queue may be empty).
    queues: Mutex<HashMap<String, Queue>>,
    /// The last time stamped on a batch (ms since the epoch).
    last_stamp: AtomicI64,
    /// Batches committed, and the largest one, since start (for tests;
    /// operators read `tessera_server_send_batch_size`).
    batches: AtomicU64,
    largest: AtomicUsize,
    /// Woken whenever a channel's committer ends.
    drained: tokio::sync::Notify,
}

impl SendBatches {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        user_locks: Arc<Locks>,
        max_batch: usize,
    ) -> Self {
        Self {
            store,
            hub,
            user_locks,
            max_batch: max_batch.max(1),
            queues: Mutex::default(),
            last_stamp: AtomicI64::new(0),
            batches: AtomicU64::new(0),
            largest: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
        }
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<String, Queue>> {
        // Nothing panics while holding it; if something did, the map is
        // still whole.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `pending` in its channel's queue for its next batch (starting
    /// the channel's committer if none runs) and answers where its outcome
    /// will go: called under the channel's send gate, so a statement that
    /// takes the gate next finds it queued ([`Self::idle`]). A full queue
    /// refuses it (RESOURCE_EXHAUSTED, retry in a second): the channel is
    /// busy.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        pending: PendingMessage,
    ) -> Result<Answer, ServerError> {
        let (reply, answer) = oneshot::channel();
        let channel_id = pending.message.channel_id.clone();
        let size = pending.message.encoded_len();
        let waiting = Waiting {
            pending,
            size,
            reply,
        };
        let start = match self.queues().entry(channel_id.clone()) {
            Entry::Occupied(mut queue) => {
                let queue = queue.get_mut();
                let limit = queue_limit(self.max_batch);
                // One sender holds at most a quarter of the queue: its own
                // sends cannot crowd out the other members' (a send costs
                // quota only once stored, and one client id may be queued
                // many times before it is).
                let sender = &waiting.pending.message.sender_identity;
                let own = queue
                    .waiting
                    .iter()
                    .filter(|w| &w.pending.message.sender_identity == sender)
                    .count();
                if own >= limit / SENDER_SHARE {
                    return Err(ServerError::Busy {
                        what: format!(
                            "{sender} has {own} sends waiting to be stored in channel {channel_id}"
                        ),
                        retry_after: QUEUE_RETRY,
                    });
                }
                if queue.waiting.len() >= limit
                    || queue.bytes.saturating_add(size) > MAX_QUEUE_BYTES
                {
                    return Err(ServerError::Busy {
                        what: format!(
                            "channel {channel_id} is busy ({} sends waiting to be stored)",
                            queue.waiting.len()
                        ),
                        retry_after: QUEUE_RETRY,
                    });
                }
                queue.bytes = queue.bytes.saturating_add(size);
                queue.waiting.push_back(waiting);
                false
            }
            Entry::Vacant(queue) => {
                queue.insert(Queue {
                    waiting: VecDeque::from([waiting]),
                    bytes: size,
                });
                true
            }
        };
        if start {
            tokio::spawn(self.clone().commit_queue(channel_id));
        }
        Ok(answer)
    }

    /// The outcome of a send [`Self::enqueue`]d, once its batch is durable
    /// (and its stored messages handed to the hub, which broadcasts them
    /// in index order: behind a gap another replica left, they wait for
    /// it to be read).
    pub(crate) async fn answer(answer: Answer) -> Result<Committed, ServerError> {
        answer
            .await
            .map_err(|_| ServerError::Internal("the send's batch ended without an answer"))?
    }

    /// Resolves once `channel_id` has no batch in flight or waiting. A
    /// caller holding the channel's lock (a membership statement) then
    /// reads the channel's `next_index` as no send will move it: sends
    /// join a batch only after their checks under that lock.
    pub(crate) async fn idle(&self, channel_id: &str) {
        loop {
            let mut drained = std::pin::pin!(self.drained.notified());
            drained.as_mut().enable();
            if !self.queues().contains_key(channel_id) {
                return;
            }
            drained.await;
        }
    }

    /// The committer of `channel_id`: batch after batch until its queue is
    /// empty. Should it end otherwise (a panic in a store, the task
    /// aborted), its guard answers every send still queued and frees the
    /// channel, so the next send starts a committer again and statements
    /// waiting in [`Self::idle`] go on.
    async fn commit_queue(self: Arc<Self>, channel_id: String) {
        let mut guard = Committer {
            batches: &self,
            channel_id: &channel_id,
            running: true,
        };
        loop {
            let batch = {
                let mut queues = self.queues();
                let Some(queue) = queues.get_mut(&channel_id) else {
                    guard.running = false;
                    return;
                };
                if queue.waiting.is_empty() {
                    queues.remove(&channel_id);
                    guard.running = false;
                    self.drained.notify_waiters();
                    return;
                }
                take_batch(queue, self.max_batch)
            };
            self.commit(batch).await;
        }
    }

    /// Stores one batch, flushes once, publishes what was stored in index
    /// order and answers every sender.
    async fn commit(&self, batch: Vec<Waiting>) {
        if batch.is_empty() {
            return;
        }
        let (mut pending, replies): (Vec<PendingMessage>, Vec<_>) =
            batch.into_iter().map(|w| (w.pending, w.reply)).unzip();
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.largest.fetch_max(pending.len(), Ordering::Relaxed);
        metrics::record(metrics::SERVER_SEND_BATCH, pending.len() as f64);
        // Holds back the database's announcement of this very batch until
        // it is published below (`Hub::local_batch`).
        let channel_id = pending[0].message.channel_id.clone();
        let _announcements = self.hub.local_batch(&channel_id);
        match self.store_batch(&mut pending).await {
            Ok((outcomes, stamp, flushed)) => {
                for ((p, reply), outcome) in pending.into_iter().zip(replies).zip(outcomes) {
                    let answer = match (&outcome, &flushed) {
                        // Written but not known durable: an error, and
                        // subscribers read the store for it (not published
                        // whole; a later message would open a gap anyway).
                        (BatchOutcome::Stored(index), Err(e)) => {
                            self.hub.publish_index(&p.message.channel_id, *index);
                            Err(ServerError::Storage(copy(e)))
                        }
                        (BatchOutcome::Stored(index), Ok(())) => {
                            metrics::increment(metrics::SERVER_MESSAGES_STORED);
                            let mut message = p.message;
                            message.index = *index;
                            self.hub.publish(message);
                            Ok(Committed {
                                outcome,
                                server_time_ms: stamp,
                            })
                        }
                        // Nothing of its own written: its real outcome.
                        _ => Ok(Committed {
                            outcome,
                            server_time_ms: stamp,
                        }),
                    };
                    // A sender that hung up no longer waits: nothing to do.
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(ServerError::Storage(copy(&e))));
                }
            }
        }
    }

    /// Stamps the batch with the time it is stored at and stores it: its
    /// outcomes, that stamp, and how its flush went (a failed flush leaves
    /// the outcomes standing: the messages were written).
    async fn store_batch(
        &self,
        batch: &mut [PendingMessage],
    ) -> Result<(Vec<BatchOutcome>, i64, Result<(), StorageError>), StorageError> {
        // Only where the store needs them (the embedded stores): on
        // PostgreSQL no user's lock (held, say, across a key-service call
        // while enrolling a device) stalls the channel's batches.
        let senders: Vec<String> = if self.store.batch_needs_user_locks() {
            batch
                .iter()
                .map(|p| p.message.sender_identity.clone())
                .collect()
        } else {
            Vec::new()
        };
        let locks = self
            .user_locks
            .lock_all(senders.iter().map(String::as_str))
            .await;
        // Stamped now, when stored, not when checked (a send may have
        // waited in the queue): never before a batch stored earlier here
        // (a clock stepped back holds the last stamp), so the stamps rise
        // along each channel's index.
        let now = tessera_service::now_ms();
        let stamp = now.max(self.last_stamp.fetch_max(now, Ordering::Relaxed));
        for p in batch.iter_mut() {
            p.message.server_time_ms = stamp;
        }
        let outcomes = self.store.append_messages(batch).await?;
        drop(locks);
        if outcomes.len() != batch.len() {
            return Err(StorageError::Corrupt(
                "a batch's outcomes do not match its sends",
            ));
        }
        let flushed = if outcomes
            .iter()
            .any(|o| matches!(o, BatchOutcome::Stored(_)))
        {
            self.store.flush().await
        } else {
            Ok(())
        };
        Ok((outcomes, stamp, flushed))
    }

    /// Batches committed since start, and the most messages in one.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> (u64, usize) {
        (
            self.batches.load(Ordering::Relaxed),
            self.largest.load(Ordering::Relaxed),
        )
    }

    /// Sends waiting for `channel_id`'s next batch (not the one in
    /// flight); `None` when it has no batch in flight.
    #[cfg(test)]
    pub(crate) fn queued(&self, channel_id: &str) -> Option<usize> {
        self.queues().get(channel_id).map(|q| q.waiting.len())
    }
}

/// Takes the next batch from the front of `queue`: at most `max_batch`
/// sends and [`MAX_BATCH_BYTES`] (the first always). Sends whose caller
/// has gone (its RPC cancelled) are dropped unstored: nobody would learn
/// their index, and a retry stores them (or finds them by their id).
fn take_batch(queue: &mut Queue, max_batch: usize) -> Vec<Waiting> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while batch.len() < max_batch {
        let Some(front) = queue.waiting.front() else {
            break;
        };
        if !front.reply.is_closed()
            && !batch.is_empty()
            && bytes.saturating_add(front.size) > MAX_BATCH_BYTES
        {
            break;
        }
        let Some(w) = queue.waiting.pop_front() else {
            break;
        };
        queue.bytes = queue.bytes.saturating_sub(w.size);
        if w.reply.is_closed() {
            continue;
        }
        bytes = bytes.saturating_add(w.size);
        batch.push(w);
    }
    batch
}

/// Frees a channel whose committer ends without emptying its queue
/// (unwinding from a panic, or dropped): its queued sends are answered
/// INTERNAL (those of the batch in flight get INTERNAL from their dropped
/// reply), and statements waiting for the channel to drain are woken.
struct Committer<'a> {
    batches: &'a SendBatches,
    channel_id: &'a str,
    /// Cleared on the normal exit, which frees the channel itself under
    /// the queues' lock (a new committer may own the entry by the time
    /// this guard drops).
    running: bool,
}

impl Drop for Committer<'_> {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let left = self.batches.queues().remove(self.channel_id);
        self.batches.drained.notify_waiters();
        tracing::error!(channel_id = %self.channel_id, "a channel's committer ended abnormally; its queued sends are refused");
        for waiting in left.into_iter().flat_map(|q| q.waiting) {
            let _ = waiting.reply.send(Err(ServerError::Internal(
                "the channel's batch failed; send again",
            )));
        }
    }
}

/// The same error again, for each sender of a failed batch.
fn copy(e: &StorageError) -> StorageError {
    match e {
        StorageError::Backend { backend, message } => StorageError::Backend {
            backend,
            message: message.clone(),
        },
        StorageError::Unavailable { backend, message } => StorageError::Unavailable {
            backend,
            message: message.clone(),
        },
        StorageError::Corrupt(what) => StorageError::Corrupt(what),
        StorageError::Io(io) => StorageError::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => StorageError::Backend {
            backend: "store",
            message: other.to_string(),
        },
    }
}
