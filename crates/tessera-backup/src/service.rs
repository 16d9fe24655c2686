//! The gRPC face of the backup service: ingestion of OrgEncMsgs and history
//! sync by re-encryption to the caller's current cards.

use std::{pin::Pin, sync::Arc};

use tessera_card::CardId;
use tessera_crypto::{
    EncryptionPublicKey,
    envelope::{
        self, CONTENT_TYPE_HISTORY, CONTENT_TYPE_HISTORY_END, Draft, ExpectedSender, Recipient,
        Sender, VerifiedPayload,
    },
    open_org_backup,
    sender_key::{StoredFormat, check_stored_binding},
};
use tessera_proto::{
    Message as _,
    backup::v1::{
        BackupRecord, GetOrgInfoRequest, GetOrgInfoResponse, SubmitBackupRequest,
        SubmitBackupResponse, SyncHistoryItem, SyncHistoryRequest, backup_server::Backup,
    },
    envelope::v1::{HistoryEnd, HistoryItem},
};
use tessera_service::{
    Caller, TokenVerifier, limits,
    metrics::{self, BACKUP_SUBMISSIONS, BACKUP_SYNCED_MESSAGES, BACKUP_SYNCS},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::{
    Limits, Org,
    store::{Archived, Store},
    upstream::Upstream,
};

pub(crate) struct BackupService {
    pub(crate) org: Arc<Org>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tokens: TokenVerifier,
    pub(crate) upstream: Upstream,
    pub(crate) limits: Limits,
}

type SyncStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<SyncHistoryItem, Status>> + Send>>;

/// Archived messages read from the store at a time during a sync.
const SYNC_BATCH: usize = 128;
/// Longest nonce a sync request may carry.
const MAX_NONCE_BYTES: usize = 64;

impl Org {
    /// Decrypts an archived OrgEncMsg into its backup record.
    pub(crate) fn open(
        &self,
        archived: &Archived,
    ) -> Result<(BackupRecord, Zeroizing<Vec<u8>>), Status> {
        let card_id = CardId::from_bytes(&archived.org_card_id)
            .map_err(|_| Status::invalid_argument("org card id must be 32 bytes"))?;
        let keys = if card_id == self.card_id {
            &self.keys
        } else {
            self.retired.get(&card_id).ok_or_else(|| {
                Status::failed_precondition(format!("no OrgKey for org card {card_id}"))
            })?
        };
        let plain = open_org_backup(
            &keys.encryption,
            &archived.channel_id,
            archived.message_index,
            &archived.encapsulated_key,
            &archived.ciphertext,
        )
        .map_err(|_| {
            Status::invalid_argument(
                "the backup does not decrypt with the OrgKey for this channel and index",
            )
        })?;
        let record = BackupRecord::decode(plain.as_slice())
            .map_err(|_| Status::invalid_argument("the backup is not a BackupRecord"))?;
        Ok((record, plain))
    }

    /// The envelope that carries one archived message to `recipients`,
    /// sent and signed by the OrgCard.
    pub(crate) fn history_envelope(
        &self,
        record: BackupRecord,
        recipients: &[(CardId, EncryptionPublicKey)],
    ) -> Result<Vec<u8>, Status> {
        let item = HistoryItem {
            channel_id: record.channel_id,
            message_index: record.message_index,
            original_payload: record.original_payload,
            original_signature: record.original_signature,
            server_time_ms: record.server_time_ms,
            envelope_sha256: record.envelope_sha256,
            content_key: record.content_key,
        };
        let body = Zeroizing::new(item.encode_to_vec());
        self.seal_history(&item.channel_id, CONTENT_TYPE_HISTORY, &body, recipients)
    }

    /// The signed end of a sync answer: the request's nonce and how many
    /// messages the answer carried.
    pub(crate) fn history_end_envelope(
        &self,
        end: &HistoryEnd,
        recipients: &[(CardId, EncryptionPublicKey)],
    ) -> Result<Vec<u8>, Status> {
        self.seal_history(
            &end.channel_id,
            CONTENT_TYPE_HISTORY_END,
            &end.encode_to_vec(),
            recipients,
        )
    }

    fn seal_history(
        &self,
        channel_id: &str,
        content_type: &str,
        body: &[u8],
        recipients: &[(CardId, EncryptionPublicKey)],
    ) -> Result<Vec<u8>, Status> {
        let to: Vec<Recipient<'_>> = recipients
            .iter()
            .map(|(id, key)| Recipient {
                card_id: *id.as_bytes(),
                key,
            })
            .collect();
        envelope::seal(
            &Sender {
                identity: &self.identity,
                card_id: *self.card_id.as_bytes(),
                key: &self.keys.signing,
            },
            &Draft {
                channel_id,
                content_type,
                body,
                sent_at_ms: tessera_service::now_ms(),
                epoch: None,
            },
            &to,
        )
        .map(|s| s.envelope)
        .map_err(|e| Status::internal(format!("sealing history failed: {e}")))
    }
}

impl BackupService {
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.tokens.authenticate(request)
    }
}

#[tonic::async_trait]
impl Backup for BackupService {
    async fn get_org_info(
        &self,
        request: Request<GetOrgInfoRequest>,
    ) -> Result<Response<GetOrgInfoResponse>, Status> {
        self.authenticate(&request)?;
        Ok(Response::new(GetOrgInfoResponse {
            org_identity: self.org.identity.clone(),
            org_card_id: self.org.card_id.to_vec(),
        }))
    }

    async fn submit_backup(
        &self,
        request: Request<SubmitBackupRequest>,
    ) -> Result<Response<SubmitBackupResponse>, Status> {
        let caller = self.authenticate(&request)?;
        if !caller.org_member {
            return Err(Status::permission_denied(format!(
                "{} is not a member of the organisation; only members' devices back up",
                caller.identity
            )));
        }
        let r = request.into_inner();
        let sealed = r
            .org_enc_msg
            .ok_or_else(|| Status::invalid_argument("org_enc_msg is missing"))?;
        limits::check_len(
            "org_enc_msg.ciphertext",
            sealed.ciphertext.len(),
            self.limits.max_record_bytes,
        )?;
        let org_card = limits::card_id("org_card_id", &sealed.org_card_id)?;
        if org_card != self.org.card_id {
            return Err(Status::failed_precondition(format!(
                "sealed to card {org_card}, but the organisation's card is {}; fetch it again",
                self.org.card_id
            )));
        }

        // The app server decides who may see what: the caller must be a
        // member who can see this message.
        let channel = self.upstream.channel(&caller, &r.channel_id).await?;
        if r.message_index < channel.visible_from_index.max(1)
            || r.message_index >= channel.next_index
        {
            return Err(Status::permission_denied(format!(
                "message {} is not one you can see in this channel",
                r.message_index
            )));
        }
        let archived = Archived {
            channel_id: r.channel_id.clone(),
            message_index: r.message_index,
            org_card_id: sealed.org_card_id,
            encapsulated_key: sealed.encapsulated_key,
            ciphertext: sealed.ciphertext,
            submitted_by: caller.identity.clone(),
            submitted_at_ms: tessera_service::now_ms(),
        };
        let (record, plain) = self.org.open(&archived)?;
        if record.channel_id != r.channel_id || record.message_index != r.message_index {
            return Err(Status::invalid_argument(
                "the record names another channel or index",
            ));
        }

        // The original sender's signature must verify against their card,
        // and the app server must hold that sender's message at that index.
        let (sender_identity, sender_card) =
            VerifiedPayload::claimed_sender(&record.original_payload)
                .map_err(|e| Status::invalid_argument(format!("original payload: {e}")))?;
        let stored = self
            .upstream
            .message(&r.channel_id, r.message_index)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("no message {} in this channel", r.message_index))
            })?;
        if stored.sender_identity != sender_identity
            || stored.sender_card_id != sender_card.to_vec()
        {
            return Err(Status::invalid_argument(
                "the record's sender is not the sender the app server stored at this index",
            ));
        }
        // Clients date the message by this time (revocation and removal
        // cut-offs): it must be the app server's, not the submitter's.
        if record.server_time_ms != stored.server_time_ms {
            return Err(Status::invalid_argument(
                "the record's server time is not the one the app server stored at this index",
            ));
        }
        // And it must be *that* message: the envelope stored at this index
        // is the one the record names, and its body opens, with the record's
        // content key, to exactly the record's payload and signature.
        let format = StoredFormat::of_kind(stored.kind).ok_or_else(|| {
            Status::failed_precondition(format!(
                "the app server stores message {} in an unknown envelope format",
                r.message_index
            ))
        })?;
        check_stored_binding(
            format,
            &stored.envelope,
            &record.envelope_sha256,
            &record.content_key,
            &record.original_payload,
            &record.original_signature,
        )
        .map_err(|e| {
            tracing::warn!(channel_id = %r.channel_id, index = r.message_index, by = %caller.identity, "refused backup: {e}");
            Status::invalid_argument(format!(
                "the record is not the message the app server stores at index {}: {e}",
                r.message_index
            ))
        })?;
        let card = self
            .upstream
            .card(&CardId::from_array(sender_card), &sender_identity)
            .await?
            .card;
        let payload = VerifiedPayload::verify(
            record.original_payload.clone(),
            record.original_signature.clone(),
            &ExpectedSender {
                identity: card.identity(),
                card_id: *card.id().as_bytes(),
                key: card.signing_key(),
            },
        )
        .map_err(|e| {
            tracing::warn!(channel_id = %r.channel_id, index = r.message_index, by = %caller.identity, "refused backup: {e}");
            Status::invalid_argument(format!("the original sender's signature does not hold: {e}"))
        })?;
        if payload.channel_id != r.channel_id {
            return Err(Status::invalid_argument(
                "the original message was sent to another channel",
            ));
        }

        let stored = if self.store.insert(&archived).await? {
            self.store.flush().await?;
            tracing::info!(channel_id = %r.channel_id, index = r.message_index, by = %caller.identity, "message archived");
            metrics::increment_labelled(BACKUP_SUBMISSIONS, "result", "archived");
            true
        } else {
            let existing = self
                .store
                .get(&r.channel_id, r.message_index)
                .await?
                .ok_or_else(|| Status::internal("archived message vanished"))?;
            let (_, existing_plain) = self.org.open(&existing)?;
            if !tessera_crypto::ct_eq(&existing_plain, &plain) {
                tracing::warn!(
                    channel_id = %r.channel_id,
                    index = r.message_index,
                    by = %caller.identity,
                    first_by = %existing.submitted_by,
                    "conflicting backup refused"
                );
                metrics::increment_labelled(BACKUP_SUBMISSIONS, "result", "conflict");
                return Err(Status::already_exists(
                    "a different record is archived for this message; the backup was refused",
                ));
            }
            metrics::increment_labelled(BACKUP_SUBMISSIONS, "result", "duplicate");
            false
        };
        Ok(Response::new(SubmitBackupResponse { stored }))
    }

    type SyncHistoryStream = SyncStream;

    async fn sync_history(
        &self,
        request: Request<SyncHistoryRequest>,
    ) -> Result<Response<Self::SyncHistoryStream>, Status> {
        let caller = self.authenticate(&request)?;
        let r = request.into_inner();
        limits::check_len("nonce", r.nonce.len(), MAX_NONCE_BYTES)?;
        let limit = limits::page_size(
            r.limit,
            self.limits.default_sync_limit,
            self.limits.max_sync_limit,
        )?;
        let channel = self.upstream.channel(&caller, &r.channel_id).await?;
        let start = r.from_index.max(channel.visible_from_index).max(1);
        let end = channel.next_index;
        // Only devices the member's own devices approved get history.
        let recipients: Vec<(CardId, EncryptionPublicKey)> = self
            .upstream
            .approved_cards(&caller.identity)
            .await?
            .iter()
            .map(|c| (c.id(), *c.encryption_key()))
            .collect();
        if let Some(device) = caller.device_card_id
            && !recipients.iter().any(|(id, _)| *id == device)
        {
            return Err(Status::failed_precondition(format!(
                "device {device} is not approved by {}'s other devices yet: approve it first",
                caller.identity
            )));
        }
        if recipients.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{} has no approved active device to re-encrypt history to",
                caller.identity
            )));
        }
        // One more than the limit tells whether the archive goes on.
        let found = self
            .store
            .count(&r.channel_id, start, end, limit.saturating_add(1))
            .await?;
        let more = found > limit;
        let total = found.min(limit) as u64;
        let (tx, rx) = mpsc::channel(64);
        let (org, store, channel_id) = (self.org.clone(), self.store.clone(), r.channel_id);
        let nonce = r.nonce;
        tracing::info!(%channel_id, identity = %caller.identity, from = start, total, "history sync");
        metrics::increment(BACKUP_SYNCS);
        let recipients = Arc::new(recipients);
        tokio::spawn(async move {
            let mut next = start;
            let mut sent = 0u64;
            while sent < total {
                let want = ((total - sent) as usize).min(SYNC_BATCH);
                let batch = match store.range(&channel_id, next, end, want).await {
                    Ok(b) if !b.is_empty() => b,
                    Ok(_) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                // Opening and sealing is the CPU work: off the runtime's
                // threads, one batch at a time (as many messages as one
                // store read brings).
                let worker = (org.clone(), recipients.clone(), tx.clone());
                let sealed = tokio::task::spawn_blocking(move || {
                    let (org, recipients, tx) = worker;
                    for archived in batch {
                        next = archived.message_index + 1;
                        sent += 1;
                        let item = org.open(&archived).and_then(|(record, _)| {
                            let index = record.message_index;
                            org.history_envelope(record, &recipients).map(|envelope| {
                                SyncHistoryItem {
                                    message_index: index,
                                    envelope,
                                    remaining: total - sent,
                                }
                            })
                        });
                        let failed = item.is_err();
                        if tx.blocking_send(item).is_err() || failed {
                            return None; // the caller went away, or the answer ends with an error
                        }
                        metrics::increment(BACKUP_SYNCED_MESSAGES);
                    }
                    Some((next, sent))
                })
                .await;
                match sealed {
                    Ok(Some(progress)) => (next, sent) = progress,
                    Ok(None) => return,
                    Err(_) => {
                        let _ = tx
                            .send(Err(Status::internal("re-encrypting history failed")))
                            .await;
                        return;
                    }
                }
            }
            let end = HistoryEnd {
                channel_id: channel_id.clone(),
                nonce,
                count: sent,
                more: more && sent == total,
            };
            let last =
                org.history_end_envelope(&end, &recipients)
                    .map(|envelope| SyncHistoryItem {
                        message_index: 0,
                        envelope,
                        remaining: 0,
                    });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
