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
//! commit in parallel.
//!
//! The task holds the user locks of the batch's senders (shared with the
//! rest of the server, taken in one fixed order) while the store decides:
//! the embedded stores check a user's usage and write it under that lock
//! elsewhere (sender keys, attachments). It never holds a channel's lock
//! or gate: a statement accepted meanwhile (by another replica) moves the
//! chain, the store answers `Moved` and that sender checks again. A
//! statement on this replica takes the channel's send gate exclusive and
//! waits for the channel's batches to drain ([`SendBatches::idle`]).
//!
//! [`Limits::max_send_batch`]: crate::Limits::max_send_batch

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
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

/// A send in a channel's queue, and where its outcome goes.
struct Waiting {
    pending: PendingMessage,
    reply: oneshot::Sender<Result<BatchOutcome, ServerError>>,
}

/// The queues of the channels with a batch in flight.
pub(crate) struct SendBatches {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    user_locks: Arc<Locks>,
    max_batch: usize,
    /// A channel is here while its committer runs (its queue may be empty).
    queues: Mutex<HashMap<String, Vec<Waiting>>>,
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
            batches: AtomicU64::new(0),
            largest: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
        }
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<String, Vec<Waiting>>> {
        // Nothing panics while holding it; if something did, the map is
        // still whole.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `pending` in its channel's next batch; its outcome once the
    /// batch is durable (and its stored messages are published).
    pub(crate) async fn submit(
        self: &Arc<Self>,
        pending: PendingMessage,
    ) -> Result<BatchOutcome, ServerError> {
        let (reply, outcome) = oneshot::channel();
        let channel_id = pending.message.channel_id.clone();
        let waiting = Waiting { pending, reply };
        let start = match self.queues().entry(channel_id.clone()) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push(waiting);
                false
            }
            Entry::Vacant(queue) => {
                queue.insert(vec![waiting]);
                true
            }
        };
        if start {
            tokio::spawn(self.clone().commit_queue(channel_id));
        }
        outcome
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
    /// empty.
    async fn commit_queue(self: Arc<Self>, channel_id: String) {
        loop {
            let batch = {
                let mut queues = self.queues();
                let Some(queue) = queues.get_mut(&channel_id) else {
                    return;
                };
                if queue.is_empty() {
                    queues.remove(&channel_id);
                    self.drained.notify_waiters();
                    return;
                }
                let mut bytes = 0usize;
                let mut n = 0;
                for w in queue.iter().take(self.max_batch) {
                    let size = w.pending.message.encoded_len();
                    if n > 0 && bytes.saturating_add(size) > MAX_BATCH_BYTES {
                        break;
                    }
                    bytes = bytes.saturating_add(size);
                    n += 1;
                }
                queue.drain(..n).collect::<Vec<_>>()
            };
            self.commit(batch).await;
        }
    }

    /// Stores one batch, flushes once, publishes what was stored in index
    /// order and answers every sender.
    async fn commit(&self, batch: Vec<Waiting>) {
        let (pending, replies): (Vec<PendingMessage>, Vec<_>) =
            batch.into_iter().map(|w| (w.pending, w.reply)).unzip();
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.largest.fetch_max(pending.len(), Ordering::Relaxed);
        metrics::record(metrics::SERVER_SEND_BATCH, pending.len() as f64);
        let outcomes = self.store_batch(&pending).await;
        match outcomes {
            Ok(outcomes) => {
                for ((p, reply), outcome) in pending.into_iter().zip(replies).zip(outcomes) {
                    if let BatchOutcome::Stored(index) = outcome {
                        metrics::increment(metrics::SERVER_MESSAGES_STORED);
                        let mut message = p.message;
                        message.index = index;
                        self.hub.publish(message);
                    }
                    // A sender that hung up no longer waits: nothing to do.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(ServerError::Storage(copy(&e))));
                }
            }
        }
    }

    async fn store_batch(
        &self,
        batch: &[PendingMessage],
    ) -> Result<Vec<BatchOutcome>, StorageError> {
        let senders = batch.iter().map(|p| p.message.sender_identity.as_str());
        let locks = self.user_locks.lock_all(senders).await;
        let outcomes = self.store.append_messages(batch).await?;
        drop(locks);
        if outcomes.len() != batch.len() {
            return Err(StorageError::Corrupt(
                "a batch's outcomes do not match its sends",
            ));
        }
        if outcomes
            .iter()
            .any(|o| matches!(o, BatchOutcome::Stored(_)))
        {
            self.store.flush().await?;
        }
        Ok(outcomes)
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
        self.queues().get(channel_id).map(Vec::len)
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
