//! Live delivery: one broadcast channel per chat channel with subscribers.
//! A subscriber that falls behind reloads from the store, so the broadcast
//! is only a fast path, never the source of truth.
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
use tonic::Status;

use crate::store::Store;

/// Largest stored message carried whole by the broadcast.
const INLINE_MAX_BYTES: usize = 16 * 1024;

/// What the broadcast carries for one new message.
#[derive(Clone)]
pub(crate) enum Live {
    Inline(Arc<StoredMessage>),
    Stored(u64),
}

impl Live {
    pub(crate) fn index(&self) -> u64 {
        match self {
            Self::Inline(m) => m.index,
            Self::Stored(index) => *index,
        }
    }

    /// The message itself (from the store when it was not carried whole).
    pub(crate) fn message(
        &self,
        store: &Arc<dyn Store>,
        channel_id: &str,
    ) -> Result<StoredMessage, Status> {
        match self {
            Self::Inline(m) => Ok((**m).clone()),
            Self::Stored(index) => store
                .messages(channel_id, *index, index + 1, 1, usize::MAX)?
                .pop()
                .ok_or_else(|| Status::internal("a published message is not in the store")),
        }
    }
}

pub(crate) struct Hub {
    /// Items buffered per channel for slow subscribers before they reload.
    capacity: usize,
    channels: Mutex<HashMap<String, broadcast::Sender<Live>>>,
}

impl Hub {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            channels: Mutex::default(),
        }
    }

    pub(crate) fn subscribe(&self, channel_id: &str) -> Option<broadcast::Receiver<Live>> {
        let mut channels = self.channels.lock().ok()?;
        Some(
            channels
                .entry(channel_id.to_owned())
                .or_insert_with(|| broadcast::channel(self.capacity).0)
                .subscribe(),
        )
    }

    pub(crate) fn publish(&self, message: StoredMessage) {
        let Ok(mut channels) = self.channels.lock() else {
            return;
        };
        let id = message.channel_id.clone();
        let Some(sender) = channels.get(&id) else {
            return;
        };
        let item = if message.encoded_len() <= INLINE_MAX_BYTES {
            Live::Inline(Arc::new(message))
        } else {
            Live::Stored(message.index)
        };
        if sender.send(item).is_err() {
            // Nobody listens any more.
            channels.remove(&id);
        }
    }
}
