//! Live subscriptions: catch up from the store, then forward live messages;
//! a gap (lagging behind the broadcast) is filled from the store, so a
//! subscriber sees every index once, in order.
//!
//! The stream is pulled: the next message is read (or taken from the
//! broadcast) only when gRPC asks for it, that is when the client has read
//! what was sent before. So a subscriber that stops reading costs the
//! server at most one catch-up batch (`CATCH_UP_BYTES`, or one message if
//! larger) and the message in flight, whatever the channel holds.

use std::{collections::VecDeque, pin::Pin, sync::Arc, time::Duration};

use futures_util::{Stream, stream};
use tessera_proto::server::v1::StoredMessage;
use tessera_service::{Caller, metrics};
use tokio::{
    sync::{broadcast, broadcast::error::RecvError, watch},
    time::Sleep,
};
use tonic::Status;

use crate::{App, channels::visible_from, hub::Live, quota::SubscriptionSlot};

/// Bytes of stored messages read at a time while catching up (at least one
/// message, however large).
const CATCH_UP_BYTES: usize = 1024 * 1024;
/// Messages read at a time while catching up.
const CATCH_UP_MESSAGES: usize = 256;

enum Event {
    Live(Result<Live, RecvError>),
    Closing,
    Expired,
}

struct Subscription {
    app: Arc<App>,
    caller: Caller,
    channel_id: String,
    next: u64,
    live: broadcast::Receiver<Live>,
    closing: watch::Receiver<bool>,
    expiry: Pin<Box<Sleep>>,
    /// Read from the store, not yet delivered.
    pending: VecDeque<StoredMessage>,
    catching_up: bool,
    ended: bool,
    _slot: SubscriptionSlot,
    /// Counts this subscription in the live-subscriptions gauge while it lasts.
    _live: metrics::GaugeGuard,
}

/// The stream of one subscription from index `next`.
pub(crate) fn subscribe(
    app: Arc<App>,
    caller: Caller,
    channel_id: String,
    next: u64,
    slot: SubscriptionSlot,
) -> Result<impl Stream<Item = Result<StoredMessage, Status>> + Send + 'static, Status> {
    let live = app
        .hub
        .subscribe(&channel_id)
        .ok_or_else(|| Status::internal("subscription hub unavailable"))?;
    let expires_in =
        Duration::from_secs((caller.expires_at - tessera_service::now_secs()).max(0) as u64);
    let state = Subscription {
        closing: app.closing.clone(),
        app,
        caller,
        channel_id,
        next,
        live,
        expiry: Box::pin(tokio::time::sleep(expires_in)),
        pending: VecDeque::new(),
        // Everything stored from `next` on first (the broadcast receiver
        // above already holds what arrives meanwhile).
        catching_up: true,
        ended: false,
        _slot: slot,
        _live: metrics::GaugeGuard::new(metrics::SERVER_LIVE_SUBSCRIPTIONS),
    };
    Ok(stream::unfold(state, |mut s| async move {
        let item = s.next().await?;
        Some((item, s))
    }))
}

impl Subscription {
    fn end(&mut self, status: Status) -> Option<Result<StoredMessage, Status>> {
        self.ended = true;
        Some(Err(status))
    }

    fn removed(&mut self) -> Option<Result<StoredMessage, Status>> {
        self.end(Status::permission_denied(
            "you were removed from the channel",
        ))
    }

    /// The next message to deliver, an error that ends the stream, or `None`.
    async fn next(&mut self) -> Option<Result<StoredMessage, Status>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(message) = self.pending.pop_front() {
                return Some(Ok(message));
            }
            if self.catching_up {
                if let Err(status) = self.read_batch() {
                    return self.end(status);
                }
                continue;
            }
            let event = tokio::select! {
                received = self.live.recv() => Event::Live(received),
                _ = self.closing.changed() => Event::Closing,
                () = self.expiry.as_mut() => Event::Expired,
            };
            match event {
                Event::Live(Ok(item)) if item.index() < self.next => {} // delivered from the store
                Event::Live(Ok(item)) if item.index() == self.next => {
                    if !self.is_member() {
                        return self.removed();
                    }
                    self.next += 1;
                    return match item.message(&self.app.store, &self.channel_id) {
                        Ok(message) => Some(Ok(message)),
                        Err(status) => self.end(status),
                    };
                }
                Event::Live(Ok(_) | Err(RecvError::Lagged(_))) => self.catching_up = true,
                Event::Live(Err(RecvError::Closed)) => return None,
                Event::Closing => {
                    return self.end(Status::unavailable(
                        "server shutting down; resubscribe from your last index",
                    ));
                }
                Event::Expired => {
                    return self.end(Status::unauthenticated(
                        "access token expired; log in and resubscribe",
                    ));
                }
            }
        }
    }

    fn is_member(&self) -> bool {
        self.app
            .store
            .member(&self.channel_id, &self.caller.identity)
            .ok()
            .flatten()
            .is_some()
    }

    /// Reads the next catch-up batch into `pending`; an empty read ends
    /// the catch-up. Membership is read after the batch: every message in
    /// it was stored before this check, so a member removed meanwhile gets
    /// none of them, and one re-added gets only what it may now see.
    fn read_batch(&mut self) -> Result<(), Status> {
        let batch = self.app.store.messages(
            &self.channel_id,
            self.next,
            u64::MAX,
            CATCH_UP_MESSAGES,
            CATCH_UP_BYTES,
        )?;
        let first_visible = match self.app.membership(&self.channel_id, &self.caller.identity) {
            Ok((channel, member)) => visible_from(&channel, &member),
            Err(_) => {
                return Err(Status::permission_denied(
                    "you were removed from the channel",
                ));
            }
        };
        if batch.is_empty() {
            self.catching_up = false;
        }
        for message in batch {
            self.next = message.index + 1;
            if message.index >= first_visible {
                self.pending.push_back(message);
            }
        }
        Ok(())
    }
}
