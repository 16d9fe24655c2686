//! Organisation backup (seed steps 3–4) and history sync from the
//! organisation's archive.

use futures_util::StreamExt;
use tessera_card::{CardId, CardKind, VerifiedCard};
use tessera_crypto::{
    envelope::{
        CONTENT_TYPE_HISTORY, CONTENT_TYPE_HISTORY_END, EnvelopeBinding, ExpectedSender, Opener,
        ParsedEnvelope, VerifiedPayload,
    },
    seal_org_backup,
    sender_key::{StoredFormat, check_stored_binding},
};
use tessera_proto::{
    Message as _,
    backup::v1::{
        BackupRecord, GetOrgInfoRequest, OrgEncMsg, SubmitBackupRequest, SyncHistoryRequest,
        backup_client::BackupClient,
    },
    envelope::v1::{HistoryEnd, HistoryItem},
    kms::v1::CardStatus,
    server::v1::StoredMessage,
};
use zeroize::Zeroizing;

use crate::{Client, ClientError, Received, Source, client::Service, error::rpc};

impl Received {
    /// The envelope this message was opened from (its SHA-256 and content
    /// key), which a backup of it names; `None` for a message that came from
    /// the organisation's archive.
    pub fn envelope_binding(&self) -> Option<&EnvelopeBinding> {
        self.payload.envelope.as_ref()
    }
}

/// The organisation's current OrgCard, verified.
#[derive(Debug, Clone)]
pub struct OrgInfo {
    pub identity: String,
    pub card: VerifiedCard,
}

/// One message of a history sync.
#[derive(Debug)]
pub struct HistoryEntry {
    pub index: u64,
    pub result: Result<Received, ClientError>,
}

impl Client {
    fn backup_client(&self) -> Result<BackupClient<tonic::transport::Channel>, ClientError> {
        self.backup
            .clone()
            .map(|c| BackupClient::new(c).max_decoding_message_size(64 << 20))
            .ok_or_else(|| {
                ClientError::Usage(
                    "this profile has no backup service address (--backup-url)".into(),
                )
            })
    }

    fn backup_url(&self) -> &str {
        self.config
            .endpoints
            .backup_url
            .as_deref()
            .unwrap_or("(none)")
    }

    /// The organisation's card, as announced by the backup service and
    /// verified like any card (kind ORG, the organisation's identity, active).
    /// Remembered for backups until the backup service refuses one as sealed
    /// to another card (the OrgKey was rotated); a history sync always asks
    /// again.
    pub async fn org(&self) -> Result<OrgInfo, ClientError> {
        if let Some(org) = self.org.lock().ok().and_then(|o| o.clone()) {
            return Ok(org);
        }
        self.fetch_org().await
    }

    /// Asks the backup service for the current OrgCard and checks it.
    async fn fetch_org(&self) -> Result<OrgInfo, ClientError> {
        let identity = self
            .config
            .org_identity
            .clone()
            .ok_or_else(|| ClientError::Usage("the app server has no organisation".into()))?;
        let request = self
            .request_to(Service::Backup, GetOrgInfoRequest {})
            .await?;
        let announced = self
            .backup_client()?
            .get_org_info(request)
            .await
            .map_err(rpc(
                "backup service",
                self.backup_url(),
                "the organisation info",
            ))?
            .into_inner();
        if announced.org_identity != identity {
            return Err(ClientError::Message(format!(
                "the backup service speaks for {:?}, but the app server's organisation is {identity:?}",
                announced.org_identity
            )));
        }
        let card_id = CardId::from_bytes(&announced.org_card_id).map_err(|_| {
            ClientError::Message("the backup service sent a malformed card id".into())
        })?;
        let info = self.card_by_id(&card_id, &identity, CardKind::Org).await?;
        if info.status != CardStatus::Active {
            return Err(ClientError::Message(format!(
                "the backup service offers the org card {}, which is no longer active",
                card_id.short()
            )));
        }
        let org = OrgInfo {
            identity,
            card: info.card,
        };
        if let Ok(mut cached) = self.org.lock() {
            *cached = Some(org.clone());
        }
        Ok(org)
    }

    /// Re-encrypts a received message to the OrgCard (an OrgEncMsg) and
    /// sends it to the backup service, keeping the original signed payload
    /// and signature. Does nothing (`Ok(false)`) when this user is not in the
    /// organisation or the message came from the archive.
    pub async fn back_up(&self, message: &Received) -> Result<bool, ClientError> {
        if message.source == Source::Organisation || !self.is_org_member().await? {
            return Ok(false);
        }
        let org = self.org().await?;
        match self.submit_backup(&org, message).await {
            // Sealed to a card the organisation no longer uses: its OrgKey was
            // rotated since the card was looked up. Look it up again, once.
            Err(
                refused @ ClientError::Rejected {
                    code: tonic::Code::FailedPrecondition,
                    ..
                },
            ) => {
                let current = self.fetch_org().await?;
                if current.card.id() == org.card.id() {
                    return Err(refused);
                }
                tracing::info!(old = %org.card.id(), new = %current.card.id(), "the organisation's card changed");
                self.submit_backup(&current, message).await
            }
            other => other,
        }
    }

    async fn submit_backup(&self, org: &OrgInfo, message: &Received) -> Result<bool, ClientError> {
        let Some(binding) = &message.payload.envelope else {
            return Err(ClientError::Usage(
                "only a message opened from the app server's envelope can be backed up".into(),
            ));
        };
        let record = Zeroizing::new(
            BackupRecord {
                channel_id: message.channel_id.clone(),
                message_index: message.index,
                original_payload: message.payload.signed_payload.clone(),
                original_signature: message.payload.signature.clone(),
                server_time_ms: message.server_time_ms,
                envelope_sha256: binding.envelope_sha256.to_vec(),
                content_key: binding.content_key.to_vec(),
            }
            .encode_to_vec(),
        );
        let sealed = seal_org_backup(
            org.card.encryption_key(),
            &message.channel_id,
            message.index,
            &record,
        )
        .map_err(|e| ClientError::Crypto(e.to_string()))?;
        let request = self
            .request_to(
                Service::Backup,
                SubmitBackupRequest {
                    channel_id: message.channel_id.clone(),
                    message_index: message.index,
                    org_enc_msg: Some(OrgEncMsg {
                        org_card_id: org.card.id().to_vec(),
                        encapsulated_key: sealed.encapsulated_key.to_vec(),
                        ciphertext: sealed.ciphertext,
                    }),
                },
            )
            .await?;
        let stored = self
            .backup_client()?
            .submit_backup(request)
            .await
            .map_err(rpc("backup service", self.backup_url(), "the backup"))?
            .into_inner()
            .stored;
        Ok(stored)
    }

    /// History of a channel from the organisation's archive, re-encrypted
    /// for this user's current devices: every archived message from
    /// `from_index` on (at most `limit` when it is not 0), asked for in as
    /// many calls as the service's page size takes. Each entry is verified
    /// twice: the organisation's signature on the re-encrypted copy, and the
    /// original sender's signature on the original payload. Each answer as a
    /// whole must come in ascending index order and end with the
    /// organisation's signed end naming this request's nonce, how many
    /// messages it carried and whether more follow, or the sync is refused
    /// (`ClientError::History`): messages dropped, reordered, duplicated, cut
    /// off or replayed from an earlier answer. `progress(done, total)` is
    /// called after each message (`total` as far as known).
    pub async fn sync_from_org(
        &self,
        channel_id: &str,
        from_index: u64,
        limit: u32,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        // The history is signed by the organisation's current card: ask
        // which one that is now (it changes when the OrgKey is rotated).
        let org = self.fetch_org().await?;
        let mut out: Vec<HistoryEntry> = Vec::new();
        let mut from = from_index;
        loop {
            let want = match limit {
                0 => 0,
                n => n - out.len() as u32,
            };
            let more = self
                .sync_answer(&org, channel_id, from, want, &mut out, &mut progress)
                .await?;
            let done = limit != 0 && out.len() >= limit as usize;
            match out.last() {
                Some(last) if more && !done => from = last.index + 1,
                None if more => {
                    return Err(ClientError::History {
                        channel_id: channel_id.to_owned(),
                        reason: "an empty answer that says more follow".into(),
                    });
                }
                _ => return Ok(out),
            }
        }
    }

    /// One call of a history sync: appends what it carried to `out` and
    /// returns whether the organisation says more follow.
    async fn sync_answer(
        &self,
        org: &OrgInfo,
        channel_id: &str,
        from_index: u64,
        limit: u32,
        out: &mut Vec<HistoryEntry>,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<bool, ClientError> {
        let refused = |reason: String| ClientError::History {
            channel_id: channel_id.to_owned(),
            reason,
        };
        let nonce =
            tessera_crypto::random_array::<16>().map_err(|e| ClientError::Crypto(e.to_string()))?;
        let request = self
            .request_to(
                Service::Backup,
                SyncHistoryRequest {
                    channel_id: channel_id.to_owned(),
                    from_index,
                    limit,
                    nonce: nonce.to_vec(),
                },
            )
            .await?;
        let mut stream = self
            .backup_client()?
            .sync_history(request)
            .await
            .map_err(rpc("backup service", self.backup_url(), "the history sync"))?
            .into_inner();
        let before = out.len();
        let mut end = None;
        let mut stored = StoredWindow::default();
        while let Some(item) = stream.next().await {
            let item =
                item.map_err(rpc("backup service", self.backup_url(), "the history sync"))?;
            if end.is_some() {
                return Err(refused(
                    "more arrived after the organisation's signed end".into(),
                ));
            }
            if item.message_index == 0 {
                end = Some(self.open_history_end(org, channel_id, &item.envelope)?);
                continue;
            }
            let previous = out[before..]
                .last()
                .map_or(from_index.max(1).saturating_sub(1), |e| e.index);
            if item.message_index <= previous {
                return Err(refused(format!(
                    "message {} arrived after message {previous}: reordered or repeated",
                    item.message_index
                )));
            }
            let result = match stored.get(self, channel_id, item.message_index).await {
                Ok(original) => {
                    self.open_history(
                        org,
                        channel_id,
                        item.message_index,
                        &item.envelope,
                        original,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let done = out.len() as u64 + 1;
            progress(done, done + item.remaining);
            out.push(HistoryEntry {
                index: item.message_index,
                result,
            });
        }
        let end = end.ok_or_else(|| {
            refused("the answer ended without the organisation's signed end: cut short".into())
        })?;
        if !tessera_crypto::ct_eq(&end.nonce, &nonce) {
            return Err(refused(
                "the organisation's signed end answers another request: a replayed answer".into(),
            ));
        }
        let arrived = (out.len() - before) as u64;
        if end.count != arrived {
            return Err(refused(format!(
                "the organisation sent {} message(s) and {arrived} arrived: some were dropped or added",
                end.count
            )));
        }
        Ok(end.more)
    }

    /// Opens the organisation's signed end of a sync answer.
    fn open_history_end(
        &self,
        org: &OrgInfo,
        channel_id: &str,
        envelope: &[u8],
    ) -> Result<HistoryEnd, ClientError> {
        let refused = |reason: String| ClientError::History {
            channel_id: channel_id.to_owned(),
            reason: format!("the organisation's signed end: {reason}"),
        };
        let wrapper = self.open_from_org(org, envelope).map_err(refused)?;
        if wrapper.content_type != CONTENT_TYPE_HISTORY_END || wrapper.channel_id != channel_id {
            return Err(refused("not the end of this channel's history".into()));
        }
        let end = HistoryEnd::decode(wrapper.body.as_slice())
            .map_err(|_| refused("not a HistoryEnd".into()))?;
        if end.channel_id != channel_id {
            return Err(refused("names another channel".into()));
        }
        Ok(end)
    }

    /// Opens an envelope the OrgCard sent to this device and checks the
    /// organisation's signature.
    fn open_from_org(&self, org: &OrgInfo, envelope: &[u8]) -> Result<VerifiedPayload, String> {
        let parsed = ParsedEnvelope::parse(envelope).map_err(|e| e.to_string())?;
        if parsed.sender_card_id() != org.card.id().as_bytes() {
            return Err("not sent by the organisation's card".into());
        }
        parsed
            .open(
                &Opener {
                    card_id: *self.card_id.as_bytes(),
                    secret: &self.keys.encryption,
                },
                &ExpectedSender {
                    identity: org.card.identity(),
                    card_id: *org.card.id().as_bytes(),
                    key: org.card.signing_key(),
                },
            )
            .map_err(|e| e.to_string())
    }

    async fn open_history(
        &self,
        org: &OrgInfo,
        channel_id: &str,
        index: u64,
        envelope: &[u8],
        stored: Option<&StoredMessage>,
    ) -> Result<Received, ClientError> {
        let bad = |reason: String| ClientError::BadMessage {
            channel_id: channel_id.to_owned(),
            index,
            reason,
        };
        let wrapper = self
            .open_from_org(org, envelope)
            .map_err(|e| bad(format!("organisation's copy: {e}")))?;
        if wrapper.content_type != CONTENT_TYPE_HISTORY || wrapper.channel_id != channel_id {
            return Err(bad(
                "the organisation's copy is not history of this channel".into(),
            ));
        }
        let item = HistoryItem::decode(wrapper.body.as_slice())
            .map_err(|_| bad("not a HistoryItem".into()))?;
        if item.channel_id != channel_id || item.message_index != index {
            return Err(bad("the history item names another channel or index".into()));
        }
        // The archived message must be the one the app server stores at
        // this index (an archive cannot move a message to another place).
        let stored = stored.ok_or_else(|| {
            bad("the app server has no message at this index to check the archive against".into())
        })?;
        let format = StoredFormat::of_kind(stored.kind)
            .ok_or_else(|| bad("the app server stores it in an unknown envelope format".into()))?;
        check_stored_binding(
            format,
            &stored.envelope,
            &item.envelope_sha256,
            &item.content_key,
            &item.original_payload,
            &item.original_signature,
        )
        .map_err(|e| {
            bad(format!(
                "the archived message is not the one stored at this index: {e}"
            ))
        })?;
        // The sender rules below date the message by this time.
        if item.server_time_ms != stored.server_time_ms {
            return Err(bad(
                "the archived message's server time is not the app server's".into(),
            ));
        }
        let (sender_identity, sender_card) =
            VerifiedPayload::claimed_sender(&item.original_payload)
                .map_err(|e| bad(e.to_string()))?;
        // The same sender rules as for the app server's copy: revoked before
        // the message was stored, or never approved, is refused.
        let info = self
            .sender_card(
                &CardId::from_array(sender_card),
                &sender_identity,
                item.server_time_ms,
            )
            .await
            .map_err(|e| bad(format!("original sender: {e}")))?;
        let original = VerifiedPayload::verify(
            item.original_payload,
            item.original_signature,
            &ExpectedSender {
                identity: info.card.identity(),
                card_id: *info.card.id().as_bytes(),
                key: info.card.signing_key(),
            },
        )
        .map_err(|e| bad(format!("original signature: {e}")))?;
        if original.channel_id != channel_id {
            return Err(bad(
                "the original message was sent to another channel".into()
            ));
        }
        // A per-device envelope names its recipients in the signed payload;
        // an archived group message's chain recipients are not known here.
        let recipients = original.recipient_card_ids.clone();
        self.finish_received(
            original,
            (format == StoredFormat::Device).then_some(recipients.as_slice()),
            index,
            item.server_time_ms,
            info.card.device_name(),
            Source::Organisation,
        )
        .await
    }
}

/// Messages the app server stores, fetched a page at a time as a sync
/// walks the archive, to check each archived message against its index.
#[derive(Default)]
struct StoredWindow {
    messages: std::collections::BTreeMap<u64, StoredMessage>,
    /// Indices asked for that the app server does not hold (or shows).
    missing: std::collections::BTreeSet<u64>,
}

/// Stored messages fetched at once while syncing.
const STORED_PAGE: u32 = 100;

impl StoredWindow {
    async fn get(
        &mut self,
        client: &Client,
        channel_id: &str,
        index: u64,
    ) -> Result<Option<&StoredMessage>, ClientError> {
        if !self.messages.contains_key(&index) && !self.missing.contains(&index) {
            // Earlier indices are done with: keep memory to one page.
            self.messages = self.messages.split_off(&index);
            let page = client
                .stored_messages(channel_id, index, STORED_PAGE)
                .await?;
            for m in page {
                if m.channel_id == channel_id && m.index >= index {
                    self.messages.insert(m.index, m);
                }
            }
            if !self.messages.contains_key(&index) {
                self.missing.insert(index);
            }
        }
        Ok(self.messages.get(&index))
    }
}
