//! Channels and messages: sign-then-encrypt to every active card of every
//! member (own other devices included), and opening with every check of
//! `docs/protocol.md` plus the ones only a client can make (the relay's
//! claimed sender, the channel, replays).

use std::fmt;

use tessera_card::{CardId, CardKind};
use tessera_crypto::{
    envelope::{
        self, CONTENT_TYPE_FILE, CONTENT_TYPE_TEXT, Epoch, ExpectedSender, Opener, ParsedEnvelope,
        VerifiedPayload,
    },
    sender_key::{GroupDraft, StoredFormat},
};
use tessera_proto::{
    Message as _,
    envelope::v1::FileAttachment,
    kms::v1::CardStatus,
    server::v1::{
        Channel, ChannelEvent, Direction, EnvelopeKind, GetReadHorizonRequest, ListChannelsRequest,
        ListMessagesRequest, SendMessageRequest, SetReadHorizonRequest, StoredMessage,
        SubscribeRequest, channel_event, channels_client::ChannelsClient,
    },
};

use crate::{
    CardInfo, Client, ClientError, MembershipChange, RecipientDifference, TrustEvent,
    client::now_ms,
    error::rpc,
    sender_keys::{GroupOpened, GroupSeal},
};

/// How many times a message is sealed again when the membership changed
/// meanwhile (the app server answers ABORTED).
const SEND_ATTEMPTS: usize = 3;

/// Largest message body a client sends (Twilio's limit is 32 KB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What a message says.
#[derive(Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    File(FileAttachment),
    Other { content_type: String, body: Vec<u8> },
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Plaintext is never formatted into logs.
        match self {
            Self::Text(t) => write!(f, "Text({} bytes)", t.len()),
            Self::File(a) => write!(f, "File({} bytes)", a.size),
            Self::Other { content_type, body } => {
                write!(f, "Other({content_type}, {} bytes)", body.len())
            }
        }
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The app server (live, or its stored copy).
    Server,
    /// The organisation's archive, re-encrypted for this device.
    Organisation,
}

/// A message that decrypted and whose sender's signature verified.
#[derive(Clone)]
pub struct Received {
    pub channel_id: String,
    pub index: u64,
    pub sender_identity: String,
    pub sender_card_id: CardId,
    pub sender_device: String,
    pub message_id: [u8; 16],
    pub sent_at_ms: i64,
    pub server_time_ms: i64,
    pub content: Content,
    pub source: Source,
    /// The sender reset their identity (section 12 of the protocol) and the
    /// user has not verified them again: show it with the message.
    pub sender_reset_unacknowledged: bool,
    /// The membership epoch the sender sealed under (checked against the
    /// verified chain); `None` in a channel made before protocol v2, whose
    /// membership nobody signed.
    pub epoch: Option<u64>,
    /// How the recipients differ from the epoch's members' approved devices
    /// as this device sees them now (see [`RecipientDifference`]).
    pub recipient_differences: Vec<RecipientDifference>,
    /// Device changes noticed while checking the recipients.
    pub events: Vec<TrustEvent>,
    pub(crate) payload: VerifiedPayload,
}

impl Received {
    /// The exact signed payload and the sender's signature, as an
    /// application would keep them to prove later who said what.
    pub fn signed_original(&self) -> (&[u8], &[u8]) {
        (&self.payload.signed_payload, &self.payload.signature)
    }
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("channel_id", &self.channel_id)
            .field("index", &self.index)
            .field("sender_identity", &self.sender_identity)
            .field("sender_card_id", &self.sender_card_id)
            .field("content", &self.content)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A sent message.
#[derive(Debug, Clone)]
pub struct Sent {
    pub index: u64,
    pub message_id: [u8; 16],
    /// The cards it was encrypted to.
    pub recipients: Vec<CardId>,
    pub duplicate: bool,
    /// Device changes noticed while finding the recipients.
    pub events: Vec<TrustEvent>,
    /// Members' cards that no device of theirs approved: not encrypted to.
    pub pending: Vec<PendingDevice>,
    /// Members with no approved active device: they cannot read it.
    pub unreachable: Vec<String>,
    /// The membership epoch it was sealed under.
    pub epoch: u64,
    /// Membership changes verified for the first time while sending.
    pub membership_changes: Vec<MembershipChange>,
}

/// A card the app and the key service vouch for but its identity's own
/// devices did not approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDevice {
    pub identity: String,
    pub card_id: CardId,
    pub device_name: String,
}

/// One page of history.
#[derive(Debug)]
pub struct HistoryPage {
    pub messages: Vec<(u64, Result<Received, ClientError>)>,
    pub next_anchor: u64,
}

pub(crate) fn decode_content(content_type: &str, body: Vec<u8>) -> Content {
    match content_type {
        CONTENT_TYPE_TEXT => match String::from_utf8(body) {
            Ok(text) => Content::Text(text),
            Err(e) => Content::Other {
                content_type: content_type.to_owned(),
                body: e.into_bytes(),
            },
        },
        CONTENT_TYPE_FILE => match FileAttachment::decode(body.as_slice()) {
            Ok(file) => Content::File(file),
            Err(_) => Content::Other {
                content_type: content_type.to_owned(),
                body,
            },
        },
        other => Content::Other {
            content_type: other.to_owned(),
            body,
        },
    }
}

impl Client {
    pub(crate) fn channels_client(&self) -> ChannelsClient<tonic::transport::Channel> {
        ChannelsClient::new(self.server.clone()).max_decoding_message_size(64 << 20)
    }

    pub async fn channels(&self) -> Result<Vec<Channel>, ClientError> {
        let request = self.request(ListChannelsRequest {}).await?;
        Ok(self
            .channels_client()
            .list_channels(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the channel list"))?
            .into_inner()
            .channels)
    }

    /// Sends a text message.
    pub async fn send_text(&self, channel_id: &str, text: &str) -> Result<Sent, ClientError> {
        self.send_content(channel_id, CONTENT_TYPE_TEXT, text.as_bytes())
            .await
    }

    /// Seals `body` to every active card of every member of the channel and
    /// sends it; a transient failure is retried with the same client message
    /// id, so the server stores it once.
    pub async fn send_content(
        &self,
        channel_id: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Sent, ClientError> {
        let client_message_id =
            tessera_crypto::random_array::<16>().map_err(|e| ClientError::Crypto(e.to_string()))?;
        self.send_with_id(channel_id, content_type, body, client_message_id)
            .await
    }

    /// [`Client::send_content`] with the client message id chosen by the
    /// caller: calling it again with the same id after an error whose outcome
    /// is unknown (a crash, a timeout) never stores the message twice.
    pub async fn send_with_id(
        &self,
        channel_id: &str,
        content_type: &str,
        body: &[u8],
        client_message_id: [u8; 16],
    ) -> Result<Sent, ClientError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(ClientError::Usage(format!(
                "the message is {} bytes; the limit is {MAX_BODY_BYTES}",
                body.len()
            )));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some((envelope, mut sent)) = self
                .seal_for_channel(channel_id, content_type, body)
                .await?
            else {
                // The epoch moved while the chain's key was being given
                // out: verify the channel again.
                if attempt < SEND_ATTEMPTS {
                    continue;
                }
                return Err(ClientError::Message(format!(
                    "channel {channel_id}'s membership kept changing while sending: try again"
                )));
            };
            let mut unavailable = 0;
            let response = loop {
                let request = self
                    .request(SendMessageRequest {
                        channel_id: channel_id.to_owned(),
                        client_message_id: client_message_id.to_vec(),
                        sender_card_id: self.card_id.to_vec(),
                        envelope: envelope.clone(),
                        epoch: sent.epoch,
                        kind: EnvelopeKind::Group as i32,
                    })
                    .await?;
                match self.channels_client().send_message(request).await {
                    Ok(r) => break Ok(r.into_inner()),
                    Err(s) if s.code() == tonic::Code::Unavailable && unavailable < 2 => {
                        unavailable += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(200 * unavailable))
                            .await;
                    }
                    Err(s) => break Err(s),
                }
            };
            match response {
                Ok(r) => {
                    sent.index = r.index;
                    sent.duplicate = r.duplicate;
                    return Ok(sent);
                }
                // The membership changed since the chain was read: seal
                // again for the new epoch's members (nothing was stored).
                Err(s) if s.code() == tonic::Code::Aborted && attempt < SEND_ATTEMPTS => {}
                Err(s) => return Err(rpc("app server", self.server_url(), "the message")(s)),
            }
        }
    }

    /// Seals `body` under this device's sender-key chain of the channel's
    /// current epoch, whose key every approved device of every member (as
    /// the verified chain has them) holds. `None` when the channel's epoch
    /// moved meanwhile.
    async fn seal_for_channel(
        &self,
        channel_id: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Option<(Vec<u8>, Sent)>, ClientError> {
        let verified = self.verified_channel(channel_id).await?;
        let (Some(epoch), Some(head)) = (verified.state.epoch(), verified.state.head()) else {
            return Err(ClientError::Usage(format!(
                "channel {channel_id} was made before signed membership (protocol v2): its history stays readable, but it takes no new message; create a new channel"
            )));
        };
        if verified.state.member(self.identity()).is_none() {
            return Err(ClientError::Usage(format!(
                "{} is not a member of channel {channel_id} (by its signed membership)",
                self.identity()
            )));
        }
        let identities: Vec<String> = verified.state.members().keys().cloned().collect();
        let (cards, found, events) = self.recipient_cards(&identities).await?;
        if !cards.iter().any(|c| c.id() == self.card_id) {
            return Err(self.not_approved(&found, "send"));
        }
        let pending: Vec<PendingDevice> = found
            .iter()
            .flat_map(|(identity, d)| {
                d.pending.iter().map(|c| PendingDevice {
                    identity: identity.clone(),
                    card_id: c.id(),
                    device_name: c.device_name().to_owned(),
                })
            })
            .collect();
        let unreachable: Vec<String> = found
            .iter()
            .filter(|(_, d)| d.approved.is_empty())
            .map(|(identity, _)| identity.clone())
            .collect();
        let sealed = match self
            .seal_group(
                channel_id,
                Epoch {
                    number: epoch,
                    hash: head,
                },
                &cards,
                &GroupDraft {
                    content_type,
                    body,
                    sent_at_ms: now_ms(),
                },
            )
            .await?
        {
            GroupSeal::Sealed { sealed, recipients } => (sealed, recipients),
            GroupSeal::EpochMoved => return Ok(None),
        };
        let (sealed, recipients) = sealed;
        let sent = Sent {
            index: 0,
            message_id: sealed.message_id,
            recipients,
            duplicate: false,
            epoch,
            events,
            pending,
            unreachable,
            membership_changes: verified.fresh_changes().to_vec(),
        };
        Ok(Some((sealed.envelope, sent)))
    }

    /// Decrypts a message the app server delivered and verifies it: the
    /// sender's card (signatures, log inclusion, the identity the server
    /// names), the signature, the recipient set, the channel, and that the
    /// same message was not accepted elsewhere before (replay).
    pub async fn open_message(&self, m: &StoredMessage) -> Result<Received, ClientError> {
        let bad = |reason: String| ClientError::BadMessage {
            channel_id: m.channel_id.clone(),
            index: m.index,
            reason,
        };
        let format = StoredFormat::of_kind(m.kind)
            .ok_or_else(|| bad(format!("unknown envelope kind {}", m.kind)))?;
        let claimed: [u8; 32] = match format {
            StoredFormat::Device => *ParsedEnvelope::parse(&m.envelope)
                .map_err(|e| bad(e.to_string()))?
                .sender_card_id(),
            StoredFormat::Group => {
                *tessera_crypto::sender_key::ParsedGroupEnvelope::parse(&m.envelope)
                    .map_err(|e| bad(e.to_string()))?
                    .sender_card_id()
            }
        };
        if claimed.as_slice() != m.sender_card_id.as_slice() {
            return Err(bad(
                "the relay names another sender card than the envelope".into()
            ));
        }
        let sender_card = CardId::from_array(claimed);
        let info = self
            .sender_card(&sender_card, &m.sender_identity, m.server_time_ms)
            .await
            .map_err(|e| match e {
                ClientError::Message(reason) => bad(reason),
                other => bad(format!("sender: {other}")),
            })?;
        let card = &info.card;
        let expected = ExpectedSender {
            identity: card.identity(),
            card_id: *card.id().as_bytes(),
            key: card.signing_key(),
        };
        let (payload, recipients, pending) = match format {
            StoredFormat::Device => {
                let payload = ParsedEnvelope::parse(&m.envelope)
                    .map_err(|e| bad(e.to_string()))?
                    .open(
                        &Opener {
                            card_id: *self.card_id.as_bytes(),
                            secret: &self.keys.encryption,
                        },
                        &expected,
                    )
                    .map_err(|e| match e {
                        envelope::EnvelopeError::NotARecipient => bad(
                            "not encrypted to this device (sent before it was enrolled?): sync it from the organisation".into(),
                        ),
                        other => bad(other.to_string()),
                    })?;
                let recipients = payload.recipient_card_ids.clone();
                (payload, recipients, None)
            }
            StoredFormat::Group => {
                let GroupOpened {
                    payload,
                    recipients,
                    pending,
                } = self
                    .open_group(&m.channel_id, &m.envelope, &expected)
                    .await
                    .map_err(|e| match e {
                        Ok(reason) => bad(reason),
                        Err(other) => other,
                    })?;
                (payload, recipients, Some(pending))
            }
        };
        if payload.channel_id != m.channel_id {
            return Err(bad(format!(
                "the sender sent it to channel {}, not this one: moved by the relay",
                payload.channel_id
            )));
        }
        let received = self
            .finish_received(
                payload,
                Some(&recipients),
                m.index,
                m.server_time_ms,
                card.device_name(),
                Source::Server,
            )
            .await?;
        // Only an accepted message moves its chain on (with forward
        // secrecy, a refused one must stay readable when it comes again).
        if let Some(pending) = pending {
            self.commit_group(&m.channel_id, &m.envelope, &expected, pending)?;
        }
        Ok(received)
    }

    /// The verified card of a message's sender, refused when it was revoked
    /// before the app server stored the message, or when the sender's own
    /// devices did not approve it (then or now).
    pub(crate) async fn sender_card(
        &self,
        card_id: &CardId,
        identity: &str,
        server_time_ms: i64,
    ) -> Result<CardInfo, ClientError> {
        let info = self
            .card_info_as_of(card_id, identity, CardKind::Client, server_time_ms)
            .await?;
        // Revocations are dated by their log entry, in whole seconds: only a
        // message stored in a later second is known to postdate it.
        if info.status == CardStatus::Revoked
            && info.revoked_at.is_some_and(|at| at < server_time_ms / 1000)
        {
            return Err(ClientError::Message(
                "sent after the sender's card was revoked".into(),
            ));
        }
        if !self
            .approved_sender(identity, card_id, server_time_ms)
            .await?
        {
            return Err(ClientError::Message(format!(
                "sent by device {} ({}), which none of {identity}'s devices approved (pending)",
                card_id.short(),
                info.card.device_name()
            )));
        }
        Ok(info)
    }

    /// Common last steps of opening: the membership checks (the epoch the
    /// sender named, the sender and recipients at that epoch) and the
    /// replay check.
    /// `recipients` are the devices the message (or its sender-key chain)
    /// was given to, `None` when not known (an archived group message).
    pub(crate) async fn finish_received(
        &self,
        payload: VerifiedPayload,
        recipients: Option<&[[u8; 32]]>,
        index: u64,
        server_time_ms: i64,
        device: &str,
        source: Source,
    ) -> Result<Received, ClientError> {
        let channel_id = payload.channel_id.clone();
        let membership = self
            .check_membership(&payload, recipients)
            .await?
            .map_err(|reason| ClientError::BadMessage {
                channel_id: channel_id.clone(),
                index,
                reason,
            })?;
        // The app server checks a message's epoch when it stores it, under
        // the channel's lock: a message of epoch n never lands after the
        // statement of epoch n + 1 (known by where the server placed it).
        if let Some(n) = membership.epoch {
            let places = self.membership_changes(&channel_id, n, n + 2)?;
            let place = |epoch: u64| {
                places
                    .iter()
                    .find(|c| c.epoch == epoch)
                    .map(|c| c.next_index)
                    .filter(|p| *p > 0)
            };
            if let Some(next) = place(n + 1)
                && index >= next
            {
                return Err(ClientError::BadMessage {
                    channel_id,
                    index,
                    reason: format!(
                        "it names membership epoch {n}, but it is stored after epoch {} began (at message {next}): held back or replayed by the relay",
                        n + 1
                    ),
                });
            }
            // Nor before its own epoch began.
            if let Some(start) = place(n)
                && index < start
            {
                return Err(ClientError::BadMessage {
                    channel_id,
                    index,
                    reason: format!(
                        "it names membership epoch {n}, but it is stored before that epoch began (at message {start}): placed there by the relay"
                    ),
                });
            }
        }
        let sender_card = CardId::from_array(payload.sender_card_id);
        let accepted = self.replay.accept(
            &sender_card.to_string(),
            &hex::encode(payload.message_id),
            &channel_id,
            index,
        )?;
        if let Err((c, i)) = accepted {
            return Err(ClientError::BadMessage {
                channel_id,
                index,
                reason: format!(
                    "replay of a message already received as message {i} of channel {c}"
                ),
            });
        }
        let sender_reset_unacknowledged = self.unacknowledged_reset(&payload.sender_identity)?;
        Ok(Received {
            index,
            sender_reset_unacknowledged,
            sender_identity: payload.sender_identity.clone(),
            sender_card_id: sender_card,
            sender_device: device.to_owned(),
            message_id: payload.message_id,
            sent_at_ms: payload.sent_at_ms,
            server_time_ms,
            content: decode_content(&payload.content_type, payload.body.clone()),
            source,
            epoch: membership.epoch,
            recipient_differences: membership.differences,
            events: membership.events,
            channel_id,
            payload,
        })
    }

    /// One page of the channel's history from the app server (the stored
    /// EncMsgs), each opened and verified.
    pub async fn history(
        &self,
        channel_id: &str,
        anchor: u64,
        page_size: u32,
        backward: bool,
    ) -> Result<HistoryPage, ClientError> {
        let request = self
            .request(ListMessagesRequest {
                channel_id: channel_id.to_owned(),
                anchor,
                page_size,
                direction: if backward {
                    Direction::Backward
                } else {
                    Direction::Forward
                } as i32,
            })
            .await?;
        let page = self
            .channels_client()
            .list_messages(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the history"))?
            .into_inner();
        let mut messages = Vec::with_capacity(page.messages.len());
        for m in &page.messages {
            if m.channel_id != channel_id {
                messages.push((
                    m.index,
                    Err(ClientError::BadMessage {
                        channel_id: channel_id.to_owned(),
                        index: m.index,
                        reason: format!("the relay returned a message of channel {}", m.channel_id),
                    }),
                ));
                continue;
            }
            messages.push((m.index, self.open_message(m).await));
        }
        Ok(HistoryPage {
            messages,
            next_anchor: page.next_anchor,
        })
    }

    /// One page of a channel's stored messages as the app server holds them
    /// (ciphertext and routing metadata), without opening them.
    pub async fn stored_messages(
        &self,
        channel_id: &str,
        anchor: u64,
        page_size: u32,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        let request = self
            .request(ListMessagesRequest {
                channel_id: channel_id.to_owned(),
                anchor,
                page_size,
                direction: Direction::Forward as i32,
            })
            .await?;
        Ok(self
            .channels_client()
            .list_messages(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the history"))?
            .into_inner()
            .messages)
    }

    /// The live stream of a channel from `from_index` (0: only new messages).
    /// Open each with [`Client::open_message`].
    pub async fn subscribe(
        &self,
        channel_id: &str,
        from_index: u64,
    ) -> Result<tonic::Streaming<ChannelEvent>, ClientError> {
        let request = self
            .request(SubscribeRequest {
                channel_id: channel_id.to_owned(),
                from_index,
            })
            .await?;
        Ok(self
            .channels_client()
            .subscribe(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the subscription"))?
            .into_inner())
    }

    /// [`Client::subscribe`] without the chain events: only the messages.
    pub async fn subscribe_messages(
        &self,
        channel_id: &str,
        from_index: u64,
    ) -> Result<
        impl futures_util::Stream<Item = Result<StoredMessage, tonic::Status>> + use<>,
        ClientError,
    > {
        use futures_util::StreamExt as _;
        let events = self.subscribe(channel_id, from_index).await?;
        // `ready` keeps the stream `Unpin`, so callers can poll it with `next()`.
        Ok(events.filter_map(|item| {
            std::future::ready(match item {
                Ok(ChannelEvent {
                    event: Some(channel_event::Event::Message(m)),
                }) => Some(Ok(m)),
                Ok(_) => None,
                Err(status) => Some(Err(status)),
            })
        }))
    }

    /// Why this device may not `act` (send, sign): it is not among the
    /// approved cards `found` lists for this user.
    pub(crate) fn not_approved(
        &self,
        found: &std::collections::BTreeMap<String, crate::directory::Devices>,
        act: &str,
    ) -> ClientError {
        let mine = found.get(self.identity());
        let pending = mine.is_some_and(|d| d.pending.iter().any(|c| c.id() == self.card_id));
        let removed = mine.is_some_and(|d| d.removed.iter().any(|c| c.id() == self.card_id));
        ClientError::Message(if pending {
            format!(
                "this device is waiting for approval: approve it from one of your other devices (tessera device approve); until then it cannot {act}"
            )
        } else if removed {
            format!(
                "this device is no longer in your device list (removed by another device, or replaced by a reset): it cannot {act}"
            )
        } else {
            "this device's card is not active at the key service (revoked?)".into()
        })
    }

    /// Marks messages up to `index` as read, for all of this user's devices.
    pub async fn set_read_horizon(&self, channel_id: &str, index: u64) -> Result<u64, ClientError> {
        let request = self
            .request(SetReadHorizonRequest {
                channel_id: channel_id.to_owned(),
                index,
            })
            .await?;
        Ok(self
            .channels_client()
            .set_read_horizon(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the read horizon"))?
            .into_inner()
            .index)
    }

    pub async fn read_horizon(&self, channel_id: &str) -> Result<u64, ClientError> {
        let request = self
            .request(GetReadHorizonRequest {
                channel_id: channel_id.to_owned(),
            })
            .await?;
        Ok(self
            .channels_client()
            .get_read_horizon(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the read horizon"))?
            .into_inner()
            .index)
    }
}
