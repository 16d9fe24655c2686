//! Messages: the ordered index of each channel (one index per message,
//! given by the channel's batches, `send_batch`), each naming the
//! membership epoch it was sealed under, pages of history as each member
//! may see it, read horizons.

use tessera_crypto::{envelope::ParsedEnvelope, sender_key::ParsedGroupEnvelope};
use tessera_proto::server::v1::{
    Direction, EnvelopeKind, ListMessagesRequest, ListMessagesResponse, SendMessageRequest,
    SendMessageResponse, StoredMessage,
};
use tessera_service::{Caller, limits};

use super::{
    Channels, check_id, legacy, send_batch::SendBatches, sender_keys::check_current_epoch,
    visible_from,
};
use crate::{
    error::ServerError,
    signers::own_active_device,
    store::{BatchOutcome, PendingMessage},
};

const CLIENT_MESSAGE_ID_LEN: usize = 16;
const DEFAULT_PAGE: u32 = 50;
/// Tries of a send whose channel or quota another replica moved meanwhile.
const SEND_ATTEMPTS: usize = 16;

impl Channels {
    /// Stores a message at the channel's next index, if it was sealed at
    /// the channel's current epoch, and hands it to live subscribers.
    pub(crate) async fn send(
        &self,
        caller: &Caller,
        r: SendMessageRequest,
    ) -> Result<SendMessageResponse, ServerError> {
        if r.client_message_id.len() != CLIENT_MESSAGE_ID_LEN {
            return Err(ServerError::InvalidArgument(
                "client_message_id must be 16 bytes".into(),
            ));
        }
        let sender_card = limits::card_id("sender_card_id", &r.sender_card_id)?;
        limits::check_len("envelope", r.envelope.len(), self.limits.max_envelope_bytes)?;
        let kind = EnvelopeKind::try_from(r.kind).map_err(|_| {
            ServerError::InvalidArgument(format!("unknown envelope kind {}", r.kind))
        })?;
        // A group message's chain, checked below.
        let mut group_chain = None;
        match kind {
            EnvelopeKind::Device => {
                let envelope = ParsedEnvelope::parse(&r.envelope)
                    .map_err(|e| ServerError::InvalidArgument(format!("envelope: {e}")))?;
                if envelope.sender_card_id() != sender_card.as_bytes() {
                    return Err(ServerError::InvalidArgument(
                        "the envelope names another sender card".into(),
                    ));
                }
            }
            EnvelopeKind::Group => {
                let envelope = ParsedGroupEnvelope::parse(&r.envelope)
                    .map_err(|e| ServerError::InvalidArgument(format!("group envelope: {e}")))?;
                let mismatch = if envelope.sender_card_id() != sender_card.as_bytes() {
                    Some("sender card")
                } else if envelope.channel_id() != r.channel_id {
                    Some("channel")
                } else if envelope.epoch().number != r.epoch {
                    Some("epoch")
                } else {
                    None
                };
                if let Some(field) = mismatch {
                    return Err(ServerError::InvalidArgument(format!(
                        "the group envelope's header names another {field} than the request"
                    )));
                }
                group_chain = Some(envelope.chain_id());
            }
        }
        check_id("channel_id", &r.channel_id)?;
        // A retry of a send already stored (its first answer was lost, or
        // was an error after the write) is answered as a duplicate first:
        // before the epoch check, and, when the stored message is the
        // caller's own from this device, even if the caller was removed or
        // the device revoked since. A send racing its retry is caught by
        // its batch (`Duplicate`).
        if let Some(index) = self
            .store
            .dedupe(&r.channel_id, &r.client_message_id)
            .await?
        {
            let stored = self.message_at(&r.channel_id, index).await?;
            let own = stored.as_ref().is_some_and(|m| {
                m.sender_identity == caller.identity && m.sender_card_id == sender_card.as_bytes()
            });
            if !own {
                self.membership(&r.channel_id, &caller.identity).await?;
            }
            return self.answer_duplicate(index, stored.as_ref()).await;
        }
        self.membership(&r.channel_id, &caller.identity).await?;
        own_active_device(&*self.store, caller, sender_card, "send").await?;

        // A statement accepted between the checks and the batch's commit
        // (on this replica or another sharing the database) moves the
        // chain: the store refuses (nothing written) and the send is
        // checked again from a fresh read.
        for _ in 0..SEND_ATTEMPTS {
            if let Some(sent) = self
                .try_send(caller, &r, sender_card.as_bytes(), kind, group_chain)
                .await?
            {
                return Ok(sent);
            }
        }
        Err(ServerError::Aborted(format!(
            "channel {} changed under {SEND_ATTEMPTS} attempts to store the message; send it again",
            r.channel_id
        )))
    }

    /// One attempt of [`Self::send`]: `None` when the store found the
    /// channel's chain moved since the checks. The checks run under the
    /// channel's send gate, shared; the message then joins the channel's next batch
    /// (`send_batch`: group commit), which gives it its index.
    async fn try_send(
        &self,
        caller: &Caller,
        r: &SendMessageRequest,
        sender_card: &[u8],
        kind: EnvelopeKind,
        group_chain: Option<[u8; 16]>,
    ) -> Result<Option<SendMessageResponse>, ServerError> {
        // Shared: sends to one channel check in parallel (a statement
        // takes the gate exclusive). Each check reads the channel first;
        // the store stores the message only if the chain is still as read
        // then, so a statement accepted in between (by another replica)
        // makes the send check again.
        let gate = self.send_gates.of(&r.channel_id).read().await;
        let channel = self.channel(&r.channel_id).await?;
        if channel.chain_length == 0 {
            return Err(legacy(&r.channel_id));
        }
        self.still_a_member(&r.channel_id, &caller.identity).await?;
        let epoch = check_current_epoch(&channel, r.epoch, "the message was")?;
        if let Some(chain) = group_chain {
            let stored = self
                .store
                .sender_key_chain(&r.channel_id, sender_card, &chain)
                .await?;
            if stored.is_none_or(|c| c.epoch != epoch) {
                return Err(ServerError::FailedPrecondition(format!(
                    "no sender key stored for this chain ({}) at epoch {epoch}: put the chain's copies with PutSenderKeys first",
                    hex::encode(chain)
                )));
            }
        }
        let message = StoredMessage {
            channel_id: r.channel_id.clone(),
            index: 0, // the store gives the channel's next index
            sender_identity: caller.identity.clone(),
            sender_card_id: sender_card.to_vec(),
            client_message_id: r.client_message_id.clone(),
            server_time_ms: 0, // stamped by the batch, when stored
            envelope: r.envelope.clone(),
            epoch,
            kind: kind as i32,
        };
        let pending = PendingMessage {
            chain_length: channel.chain_length,
            message,
            max_message_bytes: self.limits.max_message_bytes_per_user,
        };
        // The checks hold for this chain length. Queued before the gate is
        // released, so a statement that takes the gate next waits for this
        // send's batch; the gate is not held while the batch commits
        // (other sends check meanwhile and join the next batch). A
        // statement accepted since (by another replica) moves the chain:
        // the store answers `Moved` and the send is checked again.
        let answer = self.send_batches.enqueue(pending)?;
        drop(gate);
        // Stored, flushed and handed to the hub (broadcast in index
        // order) by the batch.
        let committed = SendBatches::answer(answer).await?;
        match committed.outcome {
            BatchOutcome::Stored(index) => Ok(Some(SendMessageResponse {
                index,
                server_time_ms: committed.server_time_ms,
                duplicate: false,
            })),
            BatchOutcome::Duplicate(index) => self.duplicate(&r.channel_id, index).await.map(Some),
            BatchOutcome::Moved => Ok(None),
            BatchOutcome::OverQuota => Err(ServerError::ResourceExhausted(format!(
                "{} has used up its quota of {} bytes of stored messages",
                caller.identity, self.limits.max_message_bytes_per_user
            ))),
        }
    }

    /// The answer to a send whose client message id is stored already, at
    /// `index`.
    async fn duplicate(
        &self,
        channel_id: &str,
        index: u64,
    ) -> Result<SendMessageResponse, ServerError> {
        let stored = self.message_at(channel_id, index).await?;
        self.answer_duplicate(index, stored.as_ref()).await
    }

    /// The message stored at `index`, if any.
    async fn message_at(
        &self,
        channel_id: &str,
        index: u64,
    ) -> Result<Option<StoredMessage>, ServerError> {
        Ok(self
            .store
            // One message, however large (a page always carries its first).
            .messages(channel_id, index, index.saturating_add(1), 1, 0)
            .await?
            .into_iter()
            .find(|m| m.index == index))
    }

    /// [`Self::duplicate`]'s answer, with the message at `index` read.
    async fn answer_duplicate(
        &self,
        index: u64,
        stored: Option<&StoredMessage>,
    ) -> Result<SendMessageResponse, ServerError> {
        // The first copy's own send may still be waiting for its flush.
        self.store.flush().await?;
        Ok(SendMessageResponse {
            index,
            server_time_ms: stored.map_or(0, |m| m.server_time_ms),
            duplicate: true,
        })
    }

    /// A page of the messages the caller may see.
    pub(crate) async fn messages(
        &self,
        caller: &Caller,
        r: &ListMessagesRequest,
    ) -> Result<ListMessagesResponse, ServerError> {
        let (channel, me) = self.membership(&r.channel_id, &caller.identity).await?;
        let page = limits::page_size(r.page_size, DEFAULT_PAGE, self.limits.max_page_size)?;
        // A page holds at most `max_page_bytes` of stored messages (one
        // message alone may be larger: it is cut short rather than loaded.
        let max_bytes = self.limits.max_page_bytes;
        let first = visible_from(&channel, &me);
        let end = channel.next_index; // exclusive
        let (messages, next_anchor) = match Direction::try_from(r.direction) {
            Ok(Direction::Unspecified | Direction::Forward) => {
                let start = r.anchor.max(first);
                let messages = self
                    .store
                    .messages(&r.channel_id, start, end, page, max_bytes)
                    .await?;
                let next = match messages.last() {
                    Some(last) if last.index + 1 < end => last.index + 1,
                    _ => 0,
                };
                (messages, next)
            }
            Ok(Direction::Backward) => {
                let last = if r.anchor == 0 {
                    end.saturating_sub(1)
                } else {
                    r.anchor.min(end.saturating_sub(1))
                };
                if last < first {
                    (Vec::new(), 0)
                } else {
                    let messages = self
                        .store
                        .messages_before(&r.channel_id, first, last + 1, page, max_bytes)
                        .await?;
                    let next = match messages.first() {
                        Some(oldest) if oldest.index > first => oldest.index - 1,
                        _ => 0,
                    };
                    (messages, next)
                }
            }
            Err(_) => return Err(ServerError::InvalidArgument("unknown direction".into())),
        };
        Ok(ListMessagesResponse {
            messages,
            next_anchor,
        })
    }

    /// The message stored at `index` (for the organisation's backup
    /// service), or `NOT_FOUND`.
    pub(crate) async fn stored_message(
        &self,
        channel_id: &str,
        index: u64,
    ) -> Result<StoredMessage, ServerError> {
        self.channel(channel_id).await?;
        self.message_at(channel_id, index).await?.ok_or_else(|| {
            ServerError::NotFound(format!("no message {index} in channel {channel_id}"))
        })
    }

    /// Moves the caller's read horizon up to `index` (never down).
    pub(crate) async fn set_read_horizon(
        &self,
        caller: &Caller,
        channel_id: &str,
        index: u64,
    ) -> Result<u64, ServerError> {
        let (channel, _) = self.membership(channel_id, &caller.identity).await?;
        if index >= channel.next_index {
            return Err(ServerError::OutOfRange(format!(
                "index {index} is beyond the last message ({}).await",
                channel.next_index - 1
            )));
        }
        let _lock = self.user_locks.of(&caller.identity).lock().await;
        let index = self
            .store
            .read_horizon(&caller.identity, channel_id)
            .await?
            .max(index);
        self.store
            .set_read_horizon(&caller.identity, channel_id, index)
            .await?;
        self.store.flush().await?;
        Ok(index)
    }

    pub(crate) async fn read_horizon(
        &self,
        caller: &Caller,
        channel_id: &str,
    ) -> Result<u64, ServerError> {
        self.membership(channel_id, &caller.identity).await?;
        Ok(self
            .store
            .read_horizon(&caller.identity, channel_id)
            .await?)
    }
}
