//! Channels: membership, the ordered message index, live subscriptions,
//! read horizons and encrypted attachments. Everything here is ciphertext
//! and metadata; the server cannot read a message.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use prost::Message as _;
use ring::digest;
use tessera_crypto::{envelope::ParsedEnvelope, random_array};
use tessera_proto::server::v1::{
    AddMemberRequest, AttachmentChunk, Channel as PbChannel, CreateChannelRequest, Direction,
    DownloadAttachmentRequest, GetChannelRequest, GetReadHorizonRequest, HistoryVisibility,
    ListChannelsRequest, ListChannelsResponse, ListMessagesRequest, ListMessagesResponse, Member,
    MemberRole, ReadHorizon, RemoveMemberRequest, SendMessageRequest, SendMessageResponse,
    SetReadHorizonRequest, StoredMessage, SubscribeRequest, UploadAttachmentRequest,
    UploadAttachmentResponse, channels_server::Channels,
};
use tessera_service::{Caller, limits, metrics};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    App,
    quota::{Full, UploadSlot},
    store::{AttachmentRecord, ChannelChange, ChannelRecord, DeviceStatus, MemberRecord},
    subscription,
};

pub(crate) struct ChannelsService(pub(crate) Arc<App>);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const CLIENT_MESSAGE_ID_LEN: usize = 16;
const DEFAULT_PAGE: u32 = 50;
const ATTACHMENT_CHUNK: usize = 64 * 1024;

fn random_id() -> Result<String, Status> {
    random_array::<16>()
        .map(hex::encode)
        .map_err(|_| Status::internal("random number generator failed"))
}

/// Channel and attachment ids are 32 lowercase hex digits.
fn check_id(field: &str, id: &str) -> Result<(), Status> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Status::invalid_argument(format!(
            "{field} must be 32 lowercase hex digits"
        )));
    }
    Ok(())
}

fn is_admin(member: &MemberRecord) -> bool {
    member.role == MemberRole::Admin as i32
}

pub(crate) fn visible_from(channel: &ChannelRecord, member: &MemberRecord) -> u64 {
    if channel.history_visibility == HistoryVisibility::Joined as i32 {
        member.joined_at_index.max(1)
    } else {
        1
    }
}

impl App {
    pub(crate) fn channel_record(&self, channel_id: &str) -> Result<ChannelRecord, Status> {
        self.channel(channel_id)
    }

    fn channel(&self, channel_id: &str) -> Result<ChannelRecord, Status> {
        check_id("channel_id", channel_id)?;
        self.store
            .channel(channel_id)?
            .ok_or_else(|| Status::not_found(format!("no channel {channel_id}")))
    }

    /// The channel and the caller's membership, or `PERMISSION_DENIED`.
    pub(crate) fn membership(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<(ChannelRecord, MemberRecord), Status> {
        let channel = self.channel(channel_id)?;
        let member = self.store.member(channel_id, identity)?.ok_or_else(|| {
            Status::permission_denied(format!(
                "{identity} is not a member of channel {channel_id}"
            ))
        })?;
        Ok((channel, member))
    }

    pub(crate) fn channel_view(
        &self,
        channel: &ChannelRecord,
        me: &MemberRecord,
        with_members: bool,
    ) -> Result<PbChannel, Status> {
        let members = if with_members {
            self.store
                .members(&channel.channel_id)?
                .into_iter()
                .map(|m| Member {
                    identity: m.identity,
                    role: m.role,
                    joined_at_index: m.joined_at_index,
                    joined_at_ms: m.joined_at_ms,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(PbChannel {
            channel_id: channel.channel_id.clone(),
            name: channel.name.clone(),
            creator: channel.creator.clone(),
            history_visibility: channel.history_visibility,
            created_at_ms: channel.created_at_ms,
            members,
            next_index: channel.next_index,
            visible_from_index: visible_from(channel, me),
        })
    }

    fn check_user_exists(&self, identity: &str) -> Result<(), Status> {
        limits::identity("member identity", identity)?;
        if self.store.account(identity)?.is_none() {
            return Err(Status::not_found(format!("no user {identity:?}")));
        }
        Ok(())
    }

    fn check_room_for_channel(&self, identity: &str) -> Result<(), Status> {
        let count = self.store.channels_of(identity)?.len();
        limits::check_quota(
            &format!("channels for {identity}"),
            count,
            self.config.limits.max_channels_per_user,
        )
    }
}

fn check_name(name: &str, max: usize) -> Result<(), Status> {
    limits::check_len("channel name", name.len(), max)?;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "channel name must be non-empty printable text",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Channels for ChannelsService {
    async fn create_channel(
        &self,
        request: Request<CreateChannelRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        check_name(&r.name, app.config.limits.max_channel_name_bytes)?;
        let visibility = match HistoryVisibility::try_from(r.history_visibility) {
            Ok(HistoryVisibility::Unspecified) => HistoryVisibility::Shared,
            Ok(v) => v,
            Err(_) => return Err(Status::invalid_argument("unknown history visibility")),
        };
        let mut others: Vec<String> = r
            .members
            .into_iter()
            .filter(|m| *m != caller.identity)
            .collect();
        others.sort();
        others.dedup();
        if others.len() + 1 > app.config.limits.max_members_per_channel {
            return Err(Status::resource_exhausted(format!(
                "{} members; the limit is {} members per channel",
                others.len() + 1,
                app.config.limits.max_members_per_channel
            )));
        }
        app.check_room_for_channel(&caller.identity)?;
        for m in &others {
            app.check_user_exists(m)?;
            app.check_room_for_channel(m)?;
        }
        let now = tessera_service::now_ms();
        let channel = ChannelRecord {
            channel_id: random_id()?,
            name: r.name,
            creator: caller.identity.clone(),
            history_visibility: visibility as i32,
            created_at_ms: now,
            next_index: 1,
        };
        let member = |identity: &str, role: MemberRole| MemberRecord {
            identity: identity.to_owned(),
            role: role as i32,
            joined_at_index: 1,
            joined_at_ms: now,
        };
        let me = member(&caller.identity, MemberRole::Admin);
        let mut put_members = vec![me.clone()];
        put_members.extend(others.iter().map(|m| member(m, MemberRole::Member)));
        app.store.change_channel(
            &channel.channel_id,
            ChannelChange {
                channel: Some(channel.clone()),
                put_members,
                remove_members: Vec::new(),
            },
        )?;
        app.store.flush().await?;
        tracing::info!(channel_id = %channel.channel_id, creator = %caller.identity, "channel created");
        Ok(Response::new(app.channel_view(&channel, &me, true)?))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        let (_, me) = app.membership(&r.channel_id, &caller.identity)?;
        if !is_admin(&me) {
            return Err(Status::permission_denied(
                "only a channel admin can add members",
            ));
        }
        app.check_user_exists(&r.identity)?;
        let role = match MemberRole::try_from(r.role) {
            Ok(MemberRole::Unspecified) => MemberRole::Member,
            Ok(role) => role,
            Err(_) => return Err(Status::invalid_argument("unknown member role")),
        };
        // Under the channel's send lock: the new member's first index is
        // exactly the next message's.
        let _lock = app.channel_lock(&r.channel_id).lock().await;
        let channel = app.channel(&r.channel_id)?;
        if app.store.member(&r.channel_id, &r.identity)?.is_none() {
            let count = app.store.members(&r.channel_id)?.len();
            limits::check_quota(
                "members per channel",
                count,
                app.config.limits.max_members_per_channel,
            )?;
            app.check_room_for_channel(&r.identity)?;
            app.store.change_channel(
                &r.channel_id,
                ChannelChange {
                    channel: None,
                    put_members: vec![MemberRecord {
                        identity: r.identity.clone(),
                        role: role as i32,
                        joined_at_index: channel.next_index,
                        joined_at_ms: tessera_service::now_ms(),
                    }],
                    remove_members: Vec::new(),
                },
            )?;
            app.store.flush().await?;
            tracing::info!(channel_id = %r.channel_id, member = %r.identity, by = %caller.identity, "member added");
        }
        Ok(Response::new(app.channel_view(&channel, &me, true)?))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        let (channel, me) = app.membership(&r.channel_id, &caller.identity)?;
        if r.identity != caller.identity && !is_admin(&me) {
            return Err(Status::permission_denied(
                "only a channel admin can remove other members",
            ));
        }
        limits::identity("identity", &r.identity)?;
        if app.store.member(&r.channel_id, &r.identity)?.is_none() {
            return Err(Status::not_found(format!("{} is not a member", r.identity)));
        }
        let _lock = app.channel_lock(&r.channel_id).lock().await;
        app.store.change_channel(
            &r.channel_id,
            ChannelChange {
                channel: None,
                put_members: Vec::new(),
                remove_members: vec![r.identity.clone()],
            },
        )?;
        app.store.flush().await?;
        tracing::info!(channel_id = %r.channel_id, member = %r.identity, by = %caller.identity, "member removed");
        Ok(Response::new(app.channel_view(&channel, &me, true)?))
    }

    async fn list_channels(
        &self,
        request: Request<ListChannelsRequest>,
    ) -> Result<Response<ListChannelsResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let mut channels = Vec::new();
        for id in app.store.channels_of(&caller.identity)? {
            if let (Some(channel), Some(me)) = (
                app.store.channel(&id)?,
                app.store.member(&id, &caller.identity)?,
            ) {
                channels.push(app.channel_view(&channel, &me, false)?);
            }
        }
        Ok(Response::new(ListChannelsResponse { channels }))
    }

    async fn get_channel(
        &self,
        request: Request<GetChannelRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let (channel, me) = app.membership(&request.get_ref().channel_id, &caller.identity)?;
        Ok(Response::new(app.channel_view(&channel, &me, true)?))
    }

    async fn send_message(
        &self,
        request: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        if r.client_message_id.len() != CLIENT_MESSAGE_ID_LEN {
            return Err(Status::invalid_argument(
                "client_message_id must be 16 bytes",
            ));
        }
        let sender_card = limits::card_id("sender_card_id", &r.sender_card_id)?;
        limits::check_len(
            "envelope",
            r.envelope.len(),
            app.config.limits.max_envelope_bytes,
        )?;
        let envelope = ParsedEnvelope::parse(&r.envelope)
            .map_err(|e| Status::invalid_argument(format!("envelope: {e}")))?;
        if envelope.sender_card_id() != sender_card.as_bytes() {
            return Err(Status::invalid_argument(
                "the envelope names another sender card",
            ));
        }
        app.membership(&r.channel_id, &caller.identity)?;
        if caller.device_card_id.is_some_and(|d| d != sender_card) {
            return Err(Status::permission_denied(
                "a device may only send as itself",
            ));
        }
        let own_active = app.store.device(sender_card.as_bytes())?.is_some_and(|d| {
            d.identity == caller.identity && d.status == DeviceStatus::Active as i32 && !d.org_card
        });
        if !own_active {
            return Err(Status::permission_denied(format!(
                "{sender_card} is not an active device of {}",
                caller.identity
            )));
        }

        let lock = app.channel_lock(&r.channel_id).lock().await;
        let mut channel = app.channel(&r.channel_id)?;
        if let Some(index) = app.store.dedupe(&r.channel_id, &r.client_message_id)? {
            let stored = app
                .store
                .messages(&r.channel_id, index, index + 1, 1, usize::MAX)?;
            drop(lock);
            // The first copy's own send may still be waiting for its flush.
            app.store.flush().await?;
            return Ok(Response::new(SendMessageResponse {
                index,
                server_time_ms: stored.first().map_or(0, |m| m.server_time_ms),
                duplicate: true,
            }));
        }
        let message = StoredMessage {
            channel_id: r.channel_id.clone(),
            index: channel.next_index,
            sender_identity: caller.identity.clone(),
            sender_card_id: sender_card.to_vec(),
            client_message_id: r.client_message_id,
            server_time_ms: tessera_service::now_ms(),
            envelope: r.envelope,
        };
        channel.next_index += 1;
        // The sender's quota, under its own lock (taken after the channel's,
        // as everywhere): sends to two channels at once cannot both fit.
        let user = app.user_lock(&caller.identity).lock().await;
        let mut usage = app.store.usage(&caller.identity)?;
        usage.message_bytes = usage
            .message_bytes
            .saturating_add(message.encoded_len() as u64);
        if usage.message_bytes > app.config.limits.max_message_bytes_per_user {
            return Err(Status::resource_exhausted(format!(
                "{} has used up its quota of {} bytes of stored messages",
                caller.identity, app.config.limits.max_message_bytes_per_user
            )));
        }
        app.store.append_message(&channel, &message, &usage)?;
        // The locks only order the indices and the quota: released before
        // the flush, so concurrent sends share one flush (group commit, see
        // the store).
        drop(user);
        drop(lock);
        app.store.flush().await?;
        metrics::increment(metrics::SERVER_MESSAGES_STORED);
        let (index, server_time_ms) = (message.index, message.server_time_ms);
        app.hub.publish(message);
        Ok(Response::new(SendMessageResponse {
            index,
            server_time_ms,
            duplicate: false,
        }))
    }

    async fn list_messages(
        &self,
        request: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        let (channel, me) = app.membership(&r.channel_id, &caller.identity)?;
        let page = limits::page_size(r.page_size, DEFAULT_PAGE, app.config.limits.max_page_size)?;
        // A page holds at most `max_page_bytes` of stored messages (one
        // message alone may be larger): it is cut short rather than loaded.
        let max_bytes = app.config.limits.max_page_bytes;
        let first = visible_from(&channel, &me);
        let end = channel.next_index; // exclusive
        let (messages, next_anchor) = match Direction::try_from(r.direction) {
            Ok(Direction::Unspecified | Direction::Forward) => {
                let start = r.anchor.max(first);
                let messages = app
                    .store
                    .messages(&r.channel_id, start, end, page, max_bytes)?;
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
                    let messages = app.store.messages_before(
                        &r.channel_id,
                        first,
                        last + 1,
                        page,
                        max_bytes,
                    )?;
                    let next = match messages.first() {
                        Some(oldest) if oldest.index > first => oldest.index - 1,
                        _ => 0,
                    };
                    (messages, next)
                }
            }
            Err(_) => return Err(Status::invalid_argument("unknown direction")),
        };
        Ok(Response::new(ListMessagesResponse {
            messages,
            next_anchor,
        }))
    }

    type SubscribeStream = ResponseStream<StoredMessage>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let app = self.0.clone();
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        let (channel, me) = app.membership(&r.channel_id, &caller.identity)?;
        let start = match r.from_index {
            0 => channel.next_index,
            from => from.max(visible_from(&channel, &me)),
        };
        let slot = app.subscriptions.open(&caller.identity).map_err(|full| {
            let what = match full {
                Full::User => format!(
                    "{} has {} subscriptions open, the most one user may",
                    caller.identity, app.config.limits.max_subscriptions_per_user
                ),
                Full::Process => "the server has all the subscriptions it takes".to_owned(),
            };
            limits::exhausted_retry(&what, Duration::from_secs(5))
        })?;
        let stream = subscription::subscribe(app, caller, r.channel_id, start, slot)?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_read_horizon(
        &self,
        request: Request<SetReadHorizonRequest>,
    ) -> Result<Response<ReadHorizon>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        let (channel, _) = app.membership(&r.channel_id, &caller.identity)?;
        if r.index >= channel.next_index {
            return Err(Status::out_of_range(format!(
                "index {} is beyond the last message ({})",
                r.index,
                channel.next_index - 1
            )));
        }
        let _lock = app.user_lock(&caller.identity).lock().await;
        let index = app
            .store
            .read_horizon(&caller.identity, &r.channel_id)?
            .max(r.index);
        app.store
            .set_read_horizon(&caller.identity, &r.channel_id, index)?;
        app.store.flush().await?;
        Ok(Response::new(ReadHorizon {
            channel_id: r.channel_id,
            index,
        }))
    }

    async fn get_read_horizon(
        &self,
        request: Request<GetReadHorizonRequest>,
    ) -> Result<Response<ReadHorizon>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        app.membership(&r.channel_id, &caller.identity)?;
        Ok(Response::new(ReadHorizon {
            index: app.store.read_horizon(&caller.identity, &r.channel_id)?,
            channel_id: r.channel_id,
        }))
    }

    async fn upload_attachment(
        &self,
        request: Request<Streaming<UploadAttachmentRequest>>,
    ) -> Result<Response<UploadAttachmentResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty upload: the first message names the channel")
        })?;
        app.membership(&first.channel_id, &caller.identity)?;
        let limits = &app.config.limits;
        let mut slot = app.uploads.begin(&caller.identity).map_err(|_| {
            limits::exhausted_retry(
                &format!(
                    "{} has {} uploads in progress, the most one user may",
                    caller.identity, limits.max_uploads_per_user
                ),
                Duration::from_secs(5),
            )
        })?;
        let stored = app.store.usage(&caller.identity)?;
        if stored.attachments >= limits.max_attachments_per_user as u64 {
            return Err(Status::resource_exhausted(format!(
                "{} has used up its quota of {} attachments",
                caller.identity, limits.max_attachments_per_user
            )));
        }
        let id = random_id()?;
        let tmp = app.attachments_dir.join(format!(".upload-{id}"));
        let result = receive_upload(
            app,
            &mut slot,
            stored.attachment_bytes,
            first.data,
            &mut stream,
            &tmp,
        )
        .await;
        let result = match result {
            Ok((size, sha256)) => {
                store_upload(app, &caller, &first.channel_id, &id, &tmp, size, sha256).await
            }
            Err(e) => Err(e),
        };
        let sha256 = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let size = slot.received();
        drop(slot);
        Ok(Response::new(UploadAttachmentResponse {
            attachment_id: id,
            size,
            sha256,
        }))
    }

    type DownloadAttachmentStream = ResponseStream<AttachmentChunk>;

    async fn download_attachment(
        &self,
        request: Request<DownloadAttachmentRequest>,
    ) -> Result<Response<Self::DownloadAttachmentStream>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request)?;
        let r = request.into_inner();
        check_id("attachment_id", &r.attachment_id)?;
        let (channel, me) = app.membership(&r.channel_id, &caller.identity)?;
        let record = app
            .store
            .attachment(&r.attachment_id)?
            .filter(|a| a.channel_id == r.channel_id)
            .ok_or_else(|| {
                Status::not_found(format!("no attachment {} in this channel", r.attachment_id))
            })?;
        // Records from before `uploaded_at_index` existed count as index 1:
        // visible to members who see the whole history.
        if record.uploaded_at_index.max(1) < visible_from(&channel, &me) {
            return Err(Status::permission_denied(
                "the attachment was uploaded before the history you can see",
            ));
        }
        let mut file = tokio::fs::File::open(app.attachments_dir.join(&record.attachment_id))
            .await
            .map_err(tessera_service::storage::StorageError::Io)?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; ATTACHMENT_CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx
                            .send(Ok(AttachmentChunk {
                                data: buf[..n].to_vec(),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "attachment read failed");
                        let _ = tx
                            .send(Err(Status::internal("attachment read failed")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Writes an upload to `tmp`, durably; returns its size and SHA-256.
/// Moves a received upload into place and records it, charging the
/// uploader's quota (under its lock: two uploads finishing at once cannot
/// both fit). Returns its SHA-256.
async fn store_upload(
    app: &App,
    caller: &Caller,
    channel_id: &str,
    id: &str,
    tmp: &std::path::Path,
    size: u64,
    sha256: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let _user = app.user_lock(&caller.identity).lock().await;
    let mut usage = app.store.usage(&caller.identity)?;
    usage.attachment_bytes = usage.attachment_bytes.saturating_add(size);
    usage.attachments += 1;
    let limits = &app.config.limits;
    if usage.attachment_bytes > limits.max_attachment_bytes_per_user
        || usage.attachments > limits.max_attachments_per_user as u64
    {
        return Err(attachment_quota(
            caller,
            limits.max_attachment_bytes_per_user,
        ));
    }
    // The message that will carry it can only come after this index:
    // who may not see a message stored now may not fetch the file.
    let (channel, _) = app.membership(channel_id, &caller.identity)?;
    tokio::fs::rename(tmp, app.attachments_dir.join(id))
        .await
        .map_err(tessera_service::storage::StorageError::Io)?;
    app.store.put_attachment(
        &AttachmentRecord {
            attachment_id: id.to_owned(),
            channel_id: channel_id.to_owned(),
            size,
            sha256: sha256.clone(),
            uploader: caller.identity.clone(),
            created_at_ms: tessera_service::now_ms(),
            uploaded_at_index: channel.next_index,
        },
        &usage,
    )?;
    app.store.flush().await?;
    Ok(sha256)
}

fn attachment_quota(caller: &Caller, max: u64) -> Status {
    Status::resource_exhausted(format!(
        "{} has used up its quota of {max} bytes of attachments",
        caller.identity
    ))
}

/// Writes an upload to `tmp`, durably, counting it against the uploader's
/// quota (`stored` bytes plus every upload in progress) as it arrives;
/// returns its size and SHA-256.
async fn receive_upload(
    app: &App,
    slot: &mut UploadSlot,
    stored: u64,
    first_data: Vec<u8>,
    stream: &mut Streaming<UploadAttachmentRequest>,
    tmp: &std::path::Path,
) -> Result<(u64, Vec<u8>), Status> {
    let io = |e: std::io::Error| Status::from(tessera_service::storage::StorageError::Io(e));
    let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut size = 0u64;
    let max = app.config.limits.max_attachment_bytes;
    let quota = app.config.limits.max_attachment_bytes_per_user;
    let mut chunk = Some(first_data);
    loop {
        if let Some(data) = chunk.take() {
            size += data.len() as u64;
            if size > max {
                return Err(Status::resource_exhausted(format!(
                    "attachment larger than the limit of {max} bytes"
                )));
            }
            if stored.saturating_add(slot.add(data.len() as u64)) > quota {
                return Err(Status::resource_exhausted(format!(
                    "attachments in progress would exceed the quota of {quota} bytes"
                )));
            }
            hash.update(&data);
            file.write_all(&data).await.map_err(io)?;
        }
        match stream.message().await? {
            Some(next) => chunk = Some(next.data),
            None => break,
        }
    }
    file.sync_all().await.map_err(io)?;
    Ok((size, hash.finish().as_ref().to_vec()))
}
