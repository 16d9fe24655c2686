//! Live delivery: one broadcast channel per chat channel with subscribers.
//! A subscriber that falls behind reloads from the store, so the broadcast
//! is only a fast path, never the source of truth.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tessera_proto::server::v1::StoredMessage;
use tokio::sync::broadcast;

pub(crate) struct Hub {
    /// Messages buffered per channel for slow subscribers before they reload.
    capacity: usize,
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<StoredMessage>>>>,
}

impl Hub {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            channels: Mutex::default(),
        }
    }

    pub(crate) fn subscribe(
        &self,
        channel_id: &str,
    ) -> Option<broadcast::Receiver<Arc<StoredMessage>>> {
        let mut channels = self.channels.lock().ok()?;
        Some(
            channels
                .entry(channel_id.to_owned())
                .or_insert_with(|| broadcast::channel(self.capacity).0)
                .subscribe(),
        )
    }

    pub(crate) fn publish(&self, message: Arc<StoredMessage>) {
        let Ok(mut channels) = self.channels.lock() else {
            return;
        };
        let id = message.channel_id.clone();
        if let Some(sender) = channels.get(&id)
            && sender.send(message).is_err()
        {
            // Nobody listens any more.
            channels.remove(&id);
        }
    }
}
