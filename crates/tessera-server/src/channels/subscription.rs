//! Live subscriptions: catch up from the store, then forward live messages;
//! a gap (lagging behind the broadcast, an index announced by another
//! replica, a wake-up after lost announcements) is filled from the store,
//! so a subscriber sees every index once, in order. Statements accepted into the
//! membership chain come in order among the messages: one accepted when
//! the channel's next index was `n` is announced (`chain_length`) after
//! message `n - 1` and before message `n`. A subscription from index `i`
//! announces the statements accepted when the next index was `i` or later.
//! Membership is checked again at each statement: a member it removed
//! gets nothing sent after it, and the stream ends with PERMISSION_DENIED.
//!
//! The stream is pulled: the next message is read (or taken from the
//! broadcast) only when gRPC asks for it, that is when the client has read
//! what was sent before. So a subscriber that stops reading costs the
//! server at most one catch-up batch (`CATCH_UP_BYTES`, or one message if
//! larger) and the message in flight, whatever the channel holds.

use std::{collections::VecDeque, pin::Pin, sync::Arc, time::Duration};

use futures_util::{Stream, stream};
use tessera_proto::server::v1::{ChannelEvent, StoredMessage, channel_event::Event as PbEvent};
use tessera_service::{Caller, metrics};
use tokio::{
    sync::{broadcast, broadcast::error::RecvError, watch},
    time::Sleep,
};

use super::{Channels, hub::Live, visible_from};
use crate::{error::ServerError, quota::Full, quota::SubscriptionSlot};

/// Bytes of stored messages (or statements read at a time while catching
/// up (at least one, however large).
const CATCH_UP_BYTES: usize = 1024 * 1024;
/// Messages (or statements) read at a time while catching up.
const CATCH_UP_MESSAGES: usize = 256;

enum Event {
    Live(Result<Live, RecvError>),
    Closing,
    Expired,
}

struct Subscription {
    channels: Arc<Channels>,
    caller: Caller,
    channel_id: String,
    /// The next message index to deliver.
    next: u64,
    /// The first index the caller may see, as of the last look at its
    /// membership.
    first_visible: u64,
    /// Statements in the chain, as last read or heard.
    chain_length: u64,
    /// The chain length announced so far (statements before the
    /// subscription's start count as announced).
    announced: u64,
    /// Statements read, not yet announced: the length each makes the chain
    /// and the next message index when it was accepted.
    statements: VecDeque<(u64, u64)>,
    live: broadcast::Receiver<Live>,
    closing: watch::Receiver<bool>,
    expiry: Pin<Box<Sleep>>,
    /// Read from the store or taken live, not yet delivered.
    pending: VecDeque<StoredMessage>,
    catching_up: bool,
    ended: bool,
    _slot: SubscriptionSlot,
    /// Counts this subscription in the live-subscriptions gauge while it lasts.
    _live: metrics::GaugeGuard,
}

fn removed() -> ServerError {
    ServerError::PermissionDenied("you were removed from the channel".into())
}

impl Channels {
    /// The caller's subscription to a channel from `from_index` (0: from
    /// the next message on).
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        caller: Caller,
        channel_id: String,
        from_index: u64,
    ) -> Result<impl Stream<Item = Result<ChannelEvent, ServerError>> + Send + 'static, ServerError>
    {
        let (channel, me) = self.membership(&channel_id, &caller.identity).await?;
        let first_visible = visible_from(&channel, &me);
        let start = match from_index {
            0 => channel.next_index,
            from => from.max(first_visible),
        };
        let slot = self.subscriptions.open(&caller.identity).map_err(|full| {
            let what = match full {
                Full::User => format!(
                    "{} has {} subscriptions open, the most one user may",
                    caller.identity, self.limits.max_subscriptions_per_user
                ),
                Full::Process => "the server has all the subscriptions it takes".to_owned(),
            };
            ServerError::Busy {
                what,
                retry_after: Duration::from_secs(5),
            }
        })?;
        let live = self
            .hub
            .subscribe(&channel_id)
            .ok_or(ServerError::Internal("subscription hub unavailable"))?;
        // Read after subscribing to the broadcast: a statement accepted
        // since is in it.
        let chain_length = self.channel(&channel_id).await?.chain_length;
        let announced = self
            .first_statement_from(&channel_id, chain_length, start)
            .await?;
        let expires_in =
            Duration::from_secs((caller.expires_at - tessera_service::now_secs()).max(0) as u64);
        let state = Subscription {
            closing: self.closing.clone(),
            channels: self.clone(),
            caller,
            channel_id,
            next: start,
            first_visible,
            chain_length,
            announced,
            statements: VecDeque::new(),
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

    /// The first epoch of a chain of `length` statements accepted when the
    /// channel's next message index was `start` or later (`length` if
    /// none). Such indices never decrease along the chain.
    async fn first_statement_from(
        &self,
        channel_id: &str,
        length: u64,
        start: u64,
    ) -> Result<u64, ServerError> {
        let (mut low, mut high) = (0, length);
        while low < high {
            let mid = low + (high - low) / 2;
            let entry = self
                .store
                .chain(channel_id, mid, mid + 1, 1, usize::MAX)
                .await?
                .pop()
                .ok_or(ServerError::Internal("a chain entry is missing"))?;
            if entry.next_index >= start {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        Ok(low)
    }
}

impl Subscription {
    fn end(&mut self, error: ServerError) -> Option<Result<ChannelEvent, ServerError>> {
        self.ended = true;
        Some(Err(error))
    }

    /// The next event to deliver, an error that ends the stream, or `None`.
    async fn next(&mut self) -> Option<Result<ChannelEvent, ServerError>> {
        loop {
            if self.ended {
                return None;
            }
            // Statements accepted before the next message (with none
            // waiting, before the next one to come go first.
            let before = self.pending.front().map_or(self.next, |m| m.index);
            match self.due_statements(before).await {
                Ok(None) => {}
                Ok(Some(length)) => {
                    if let Err(e) = self.look_at_membership().await {
                        return self.end(e);
                    }
                    return Some(Ok(ChannelEvent {
                        event: Some(PbEvent::ChainLength(length)),
                    }));
                }
                Err(e) => return self.end(e),
            }
            if let Some(message) = self.pending.pop_front() {
                if message.index >= self.first_visible {
                    return Some(Ok(ChannelEvent {
                        event: Some(PbEvent::Message(message)),
                    }));
                }
                continue;
            }
            if self.catching_up {
                if let Err(e) = self.read_batch().await {
                    return self.end(e);
                }
                continue;
            }
            let event = tokio::select! {
                received = self.live.recv() => Event::Live(received),
                _ = self.closing.changed() => Event::Closing,
                () = self.expiry.as_mut() => Event::Expired,
            };
            match event {
                Event::Live(Ok(Live::Chain { length })) => {
                    self.chain_length = self.chain_length.max(length);
                }
                Event::Live(Ok(item)) => match item.index() {
                    Some(index) if index < self.next => {} // delivered from the store
                    Some(index) if index == self.next => {
                        match item.message(&self.channels.store, &self.channel_id).await {
                            // Sealed at an epoch whose statement this
                            // subscription has not heard of (another
                            // replica accepted it, and its announcement is
                            // still on the way): read the message and the
                            // chain from the store, so the statement comes
                            // first.
                            Ok(message) if message.epoch >= self.chain_length => {
                                self.catching_up = true;
                            }
                            Ok(message) => {
                                self.next += 1;
                                self.pending.push_back(message);
                            }
                            Err(e) => return self.end(e),
                        }
                    }
                    // A gap, or a wake-up: read the store.
                    _ => self.catching_up = true,
                },
                Event::Live(Err(RecvError::Lagged(_))) => self.catching_up = true,
                Event::Live(Err(RecvError::Closed)) => return None,
                Event::Closing => {
                    return self.end(ServerError::Unavailable(
                        "server shutting down; resubscribe from your last index".into(),
                    ));
                }
                Event::Expired => {
                    return self.end(ServerError::Unauthenticated(
                        "access token expired; log in and resubscribe".into(),
                    ));
                }
            }
        }
    }

    /// The chain length to announce before message `before`: that of the
    /// last statement accepted when the next index was `before` or lower,
    /// if any is not announced yet. Reads statements from the store as
    /// needed.
    async fn due_statements(&mut self, before: u64) -> Result<Option<u64>, ServerError> {
        let mut due = None;
        loop {
            if self.statements.is_empty() && self.announced < self.chain_length {
                let entries = self
                    .channels
                    .store
                    .chain(
                        &self.channel_id,
                        self.announced,
                        self.chain_length,
                        CATCH_UP_MESSAGES,
                        CATCH_UP_BYTES,
                    )
                    .await?;
                if entries.is_empty() {
                    return Err(ServerError::Internal("a chain entry is missing"));
                }
                let mut length = self.announced;
                for entry in entries {
                    length += 1;
                    self.statements.push_back((length, entry.next_index));
                }
            }
            match self.statements.front() {
                Some(&(length, next_index)) if next_index <= before => {
                    self.statements.pop_front();
                    self.announced = length;
                    due = Some(length);
                }
                _ => return Ok(due),
            }
        }
    }

    /// Reads the caller's membership again (a statement may have changed
    /// it, or the channel's visibility): ends the subscription of someone
    /// who is no longer a member.
    async fn look_at_membership(&mut self) -> Result<(), ServerError> {
        let (channel, member) = self
            .channels
            .membership(&self.channel_id, &self.caller.identity)
            .await
            .map_err(|e| match e {
                ServerError::PermissionDenied(_) => removed(),
                other => other,
            })?;
        self.first_visible = visible_from(&channel, &member);
        self.chain_length = self.chain_length.max(channel.chain_length);
        Ok(())
    }

    /// Reads the next catch-up batch into `pending`; an empty read ends
    /// the catch-up. The chain's length is read after the batch: every
    /// message in it was stored after the statements then in the chain, so
    /// each statement is known before the first message sent after it (and
    /// a member a statement removed gets nothing sent after it).
    async fn read_batch(&mut self) -> Result<(), ServerError> {
        let batch = self
            .channels
            .store
            .messages(
                &self.channel_id,
                self.next,
                u64::MAX,
                CATCH_UP_MESSAGES,
                CATCH_UP_BYTES,
            )
            .await?;
        let channel = self.channels.channel(&self.channel_id).await?;
        self.chain_length = self.chain_length.max(channel.chain_length);
        if batch.is_empty() {
            self.catching_up = false;
        }
        for message in batch {
            self.next = message.index + 1;
            self.pending.push_back(message);
        }
        Ok(())
    }
}
