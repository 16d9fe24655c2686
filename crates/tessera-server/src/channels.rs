//! Channels: membership, the ordered message index, live subscriptions,
//! read horizons and encrypted attachments. Everything here is ciphertext
//! and metadata; the server cannot read a message.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
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
    sync::{broadcast::error::RecvError, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    App,
    store::{AttachmentRecord, ChannelChange, ChannelRecord, DeviceStatus, MemberRecord},
};

pub(crate) struct ChannelsService(pub(crate) Arc<App>);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const CLIENT_MESSAGE_ID_LEN: usize = 16;
const DEFAULT_PAGE: u32 = 50;
/// Messages read from the store at a time while a subscriber catches up.
const CATCH_UP_BATCH: usize = 256;
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

fn visible_from(channel: &ChannelRecord, member: &MemberRecord) -> u64 {
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

/// Sends `message` to a subscriber; `false` when the subscriber is gone.
async fn deliver(tx: &mpsc::Sender<Result<StoredMessage, Status>>, message: StoredMessage) -> bool {
    tx.send(Ok(message)).await.is_ok()
}

/// Drives one subscription: catch up from the store, then forward live
/// messages; a gap (lagging behind the broadcast) is filled from the store,
/// so a subscriber sees every index once, in order.
async fn run_subscription(
    app: Arc<App>,
    caller: Caller,
    channel_id: String,
    mut next: u64,
    tx: mpsc::Sender<Result<StoredMessage, Status>>,
) {
    let _live = metrics::GaugeGuard::new(metrics::SERVER_LIVE_SUBSCRIPTIONS);
    let Some(mut live) = app.hub.subscribe(&channel_id) else {
        let _ = tx
            .send(Err(Status::internal("subscription hub unavailable")))
            .await;
        return;
    };
    let mut closing = app.closing.clone();
    let expires_in =
        Duration::from_secs((caller.expires_at - tessera_service::now_secs()).max(0) as u64);
    let expiry = tokio::time::sleep(expires_in);
    tokio::pin!(expiry);
    // Catch up: everything stored from `next` on (the broadcast subscription
    // above already buffers what arrives meanwhile).
    if !catch_up(&app, &channel_id, &mut next, &tx).await {
        return;
    }
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(message) if message.index < next => {} // already delivered from the store
                Ok(message) if message.index == next => {
                    if app.store.member(&channel_id, &caller.identity).ok().flatten().is_none() {
                        let _ = tx.send(Err(Status::permission_denied("you were removed from the channel"))).await;
                        return;
                    }
                    next += 1;
                    if !deliver(&tx, (*message).clone()).await {
                        return;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    if !catch_up(&app, &channel_id, &mut next, &tx).await {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            _ = closing.changed() => {
                let _ = tx.send(Err(Status::unavailable("server shutting down; resubscribe from your last index"))).await;
                return;
            }
            () = &mut expiry => {
                let _ = tx.send(Err(Status::unauthenticated("access token expired; log in and resubscribe"))).await;
                return;
            }
            () = tx.closed() => return,
        }
    }
}

/// Delivers stored messages from `*next` on; `false` when the subscription ended.
async fn catch_up(
    app: &App,
    channel_id: &str,
    next: &mut u64,
    tx: &mpsc::Sender<Result<StoredMessage, Status>>,
) -> bool {
    loop {
        let batch = match app
            .store
            .messages(channel_id, *next, u64::MAX, CATCH_UP_BATCH)
        {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return false;
            }
        };
        let done = batch.len() < CATCH_UP_BATCH;
        for message in batch {
            *next = message.index + 1;
            if !deliver(tx, message).await {
                return false;
            }
        }
        if done {
            return true;
        }
    }
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
            let stored = app.store.messages(&r.channel_id, index, index + 1, 1)?;
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
        app.store.append_message(&channel, &message)?;
        // The lock only orders the indices: released before the flush, so
        // concurrent sends share one flush (group commit, see the store).
        drop(lock);
        app.store.flush().await?;
        metrics::increment(metrics::SERVER_MESSAGES_STORED);
        let (index, server_time_ms) = (message.index, message.server_time_ms);
        app.hub.publish(Arc::new(message));
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
        let first = visible_from(&channel, &me);
        let end = channel.next_index; // exclusive
        let (messages, next_anchor) = match Direction::try_from(r.direction) {
            Ok(Direction::Unspecified | Direction::Forward) => {
                let start = r.anchor.max(first);
                let messages = app.store.messages(&r.channel_id, start, end, page)?;
                let next = match messages.last() {
                    Some(last) if messages.len() == page && last.index + 1 < end => last.index + 1,
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
                    let start = (last + 1).saturating_sub(page as u64).max(first);
                    let messages = app.store.messages(&r.channel_id, start, last + 1, page)?;
                    (messages, if start > first { start - 1 } else { 0 })
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
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run_subscription(app, caller, r.channel_id, start, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
        let id = random_id()?;
        let tmp = app.attachments_dir.join(format!(".upload-{id}"));
        let result = receive_upload(app, first.data, &mut stream, &tmp).await;
        let (size, sha256) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        tokio::fs::rename(&tmp, app.attachments_dir.join(&id))
            .await
            .map_err(tessera_service::storage::StorageError::Io)?;
        app.store.put_attachment(&AttachmentRecord {
            attachment_id: id.clone(),
            channel_id: first.channel_id,
            size,
            sha256: sha256.clone(),
            uploader: caller.identity,
            created_at_ms: tessera_service::now_ms(),
        })?;
        app.store.flush().await?;
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
        app.membership(&r.channel_id, &caller.identity)?;
        let record = app
            .store
            .attachment(&r.attachment_id)?
            .filter(|a| a.channel_id == r.channel_id)
            .ok_or_else(|| {
                Status::not_found(format!("no attachment {} in this channel", r.attachment_id))
            })?;
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
async fn receive_upload(
    app: &App,
    first_data: Vec<u8>,
    stream: &mut Streaming<UploadAttachmentRequest>,
    tmp: &std::path::Path,
) -> Result<(u64, Vec<u8>), Status> {
    let io = |e: std::io::Error| Status::from(tessera_service::storage::StorageError::Io(e));
    let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut size = 0u64;
    let max = app.config.limits.max_attachment_bytes;
    let mut chunk = Some(first_data);
    loop {
        if let Some(data) = chunk.take() {
            size += data.len() as u64;
            if size > max {
                return Err(Status::resource_exhausted(format!(
                    "attachment larger than the limit of {max} bytes"
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
