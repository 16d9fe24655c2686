//! Attachments: files already encrypted by the clients (the stream format),
//! stored whole under a random id, counted against the uploader's quotas,
//! and fetched by members who may see a message stored when the upload
//! finished.

use std::{path::Path, time::Duration};

use futures_util::{Stream, StreamExt as _};
use ring::digest;
use tessera_crypto::random_array;
use tessera_proto::server::v1::{
    AttachmentChunk, UploadAttachmentRequest, UploadAttachmentResponse,
};
use tessera_service::{Caller, storage::StorageError};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Channels, check_id, visible_from};
use crate::{
    error::ServerError,
    quota::UploadSlot,
    store::{AttachmentRecord, Usage, UsageChange},
};

const ATTACHMENT_CHUNK: usize = 64 * 1024;

fn random_id() -> Result<String, ServerError> {
    random_array::<16>()
        .map(hex::encode)
        .map_err(|_| ServerError::Internal("random number generator failed"))
}

fn io(e: std::io::Error) -> ServerError {
    ServerError::Storage(StorageError::Io(e))
}

impl Channels {
    /// Receives an upload (its first message names the channel) and
    /// stores it, durably.
    pub(crate) async fn upload<S>(
        &self,
        caller: &Caller,
        mut stream: S,
    ) -> Result<UploadAttachmentResponse, ServerError>
    where
        S: Stream<Item = Result<UploadAttachmentRequest, Status>> + Unpin + Send,
    {
        let first = stream.next().await.transpose()?.ok_or_else(|| {
            ServerError::InvalidArgument("empty upload: the first message names the channel".into())
        })?;
        self.membership(&first.channel_id, &caller.identity).await?;
        let limits = &self.limits;
        let mut slot = self
            .uploads
            .begin(&caller.identity)
            .map_err(|_| ServerError::Busy {
                what: format!(
                    "{} has {} uploads in progress, the most one user may",
                    caller.identity, limits.max_uploads_per_user
                ),
                retry_after: Duration::from_secs(5),
            })?;
        let stored = self.store.usage(&caller.identity).await?;
        if stored.attachments >= limits.max_attachments_per_user as u64 {
            return Err(ServerError::ResourceExhausted(format!(
                "{} has used up its quota of {} attachments",
                caller.identity, limits.max_attachments_per_user
            )));
        }
        let id = random_id()?;
        let tmp = self.attachments_dir.join(format!(".upload-{id}"));
        let result = match self
            .receive_upload(
                &mut slot,
                stored.attachment_bytes,
                first.data,
                &mut stream,
                &tmp,
            )
            .await
        {
            Ok((size, sha256)) => {
                self.store_upload(caller, &first.channel_id, &id, &tmp, size, sha256)
                    .await
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
        Ok(UploadAttachmentResponse {
            attachment_id: id,
            size,
            sha256,
        })
    }

    /// The chunks of an attachment the caller may see.
    pub(crate) async fn download(
        &self,
        caller: &Caller,
        channel_id: &str,
        attachment_id: &str,
    ) -> Result<ReceiverStream<Result<AttachmentChunk, ServerError>>, ServerError> {
        check_id("attachment_id", attachment_id)?;
        let (channel, me) = self.membership(channel_id, &caller.identity).await?;
        let record = self
            .store
            .attachment(attachment_id)
            .await?
            .filter(|a| a.channel_id == channel_id)
            .ok_or_else(|| {
                ServerError::NotFound(format!("no attachment {attachment_id} in this channel"))
            })?;
        // Records from before `uploaded_at_index` existed count as index 1:
        // visible to members who see the whole history.
        if record.uploaded_at_index.max(1) < visible_from(&channel, &me) {
            return Err(ServerError::PermissionDenied(
                "the attachment was uploaded before the history you can see".into(),
            ));
        }
        let mut file = tokio::fs::File::open(self.attachments_dir.join(&record.attachment_id))
            .await
            .map_err(io)?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; ATTACHMENT_CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = AttachmentChunk {
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "attachment read failed");
                        let _ = tx
                            .send(Err(ServerError::Internal("attachment read failed")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Moves a received upload into place and records it, charging the
    /// uploader's quota (under its lock: two uploads finishing at once
    /// cannot both fit). Returns its SHA-256.
    async fn store_upload(
        &self,
        caller: &Caller,
        channel_id: &str,
        id: &str,
        tmp: &Path,
        size: u64,
        sha256: Vec<u8>,
    ) -> Result<Vec<u8>, ServerError> {
        let _user = self.user_locks.of(&caller.identity).lock().await;
        let charge = |before: Usage| {
            let mut usage = before;
            usage.attachment_bytes = usage.attachment_bytes.saturating_add(size);
            usage.attachments += 1;
            let limits = &self.limits;
            if usage.attachment_bytes > limits.max_attachment_bytes_per_user
                || usage.attachments > limits.max_attachments_per_user as u64
            {
                return Err(attachment_quota(
                    caller,
                    limits.max_attachment_bytes_per_user,
                ));
            }
            Ok(UsageChange {
                before,
                after: usage,
            })
        };
        // Refused over quota before the file is moved into place.
        let usage = self.store.usage(&caller.identity).await?;
        charge(usage)?;
        // The message that will carry it can only come after this index:
        // who may not see a message stored now may not fetch the file.
        let (channel, _) = self.membership(channel_id, &caller.identity).await?;
        tokio::fs::rename(tmp, self.attachments_dir.join(id))
            .await
            .map_err(io)?;
        let record = AttachmentRecord {
            attachment_id: id.to_owned(),
            channel_id: channel_id.to_owned(),
            size,
            sha256: sha256.clone(),
            uploader: caller.identity.clone(),
            created_at_ms: tessera_service::now_ms(),
            uploaded_at_index: channel.next_index,
        };
        // On PostgreSQL the user's own batches of sends (which take no user
        // lock there) may charge its usage between the read and the
        // compare-and-set: `charge_usage` reads it again and retries (a
        // refused record leaves the file unreferenced; a retried upload
        // stores another).
        let store = &self.store;
        self.charge_usage(&caller.identity, usage, charge, |change| {
            let record = &record;
            async move { store.put_attachment(record, &change).await }
        })
        .await?;
        self.store.flush().await?;
        Ok(sha256)
    }

    /// Writes an upload to `tmp`, durably, counting it against the
    /// uploader's quota (`stored` bytes plus every upload in progress) as it
    /// arrives; returns its size and SHA-256.
    async fn receive_upload<S>(
        &self,
        slot: &mut UploadSlot,
        stored: u64,
        first_data: Vec<u8>,
        stream: &mut S,
        tmp: &Path,
    ) -> Result<(u64, Vec<u8>), ServerError>
    where
        S: Stream<Item = Result<UploadAttachmentRequest, Status>> + Unpin + Send,
    {
        let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut size = 0u64;
        let max = self.limits.max_attachment_bytes;
        let quota = self.limits.max_attachment_bytes_per_user;
        let mut chunk = Some(first_data);
        loop {
            if let Some(data) = chunk.take() {
                size += data.len() as u64;
                if size > max {
                    return Err(ServerError::ResourceExhausted(format!(
                        "attachment larger than the limit of {max} bytes"
                    )));
                }
                if stored.saturating_add(slot.add(data.len() as u64)) > quota {
                    return Err(ServerError::ResourceExhausted(format!(
                        "attachments in progress would exceed the quota of {quota} bytes"
                    )));
                }
                hash.update(&data);
                file.write_all(&data).await.map_err(io)?;
            }
            match stream.next().await.transpose()? {
                Some(next) => chunk = Some(next.data),
                None => break,
            }
        }
        file.sync_all().await.map_err(io)?;
        Ok((size, hash.finish().as_ref().to_vec()))
    }
}

fn attachment_quota(caller: &Caller, max: u64) -> ServerError {
    ServerError::ResourceExhausted(format!(
        "{} has used up its quota of {max} bytes of attachments",
        caller.identity
    ))
}
