//! Calls to the app server and the key service. The backup service never
//! holds or forwards a user's token: it logs in to the app server by signing
//! a challenge with the OrgKey (a SERVICE token of the organisation's
//! identity), trades that token for one of the key service, and asks the app
//! server's `Archive` service what a member may see.
//!
//! Cards it re-encrypts history to pass the same check every client runs
//! (`tessera_card::record::check_record` and the device list), so history
//! only reaches devices the member's own devices approved.

use std::{collections::BTreeMap, sync::Arc};

use tessera_card::{
    CardId, CardKind, VerifiedCard, Verifier,
    device_list::{DeviceListState, ServedList},
    record::{self, CheckedRecord, Status as RecordStatus},
    transparency::{self, VerifiedCheckpoint},
};
use tessera_crypto::SignatureContext;
use tessera_proto::{
    kms::v1::{
        DeviceList, GetCardRequest, GetDeviceListRequest, SearchCardsRequest,
        key_directory_client::KeyDirectoryClient,
    },
    server::v1::{
        BeginDeviceLoginRequest, Channel as PbChannel, FinishDeviceLoginRequest,
        GetMemberViewRequest, GetStoredMessageRequest, IssueTokenRequest, StoredMessage,
        accounts_client::AccountsClient, archive_client::ArchiveClient,
    },
    transparency::v1::SignedCheckpoint,
};
use tessera_service::{Caller, token::bearer_header};
use tokio::sync::Mutex;
use tonic::{Request, Status, transport::Channel};

use crate::Org;

pub(crate) struct Upstream {
    pub(crate) server: Channel,
    pub(crate) kms: Channel,
    pub(crate) verifier: Verifier,
    pub(crate) org: Arc<Org>,
    /// The service's own tokens: (app server header, key service header, expiry).
    pub(crate) tokens: Mutex<Option<(String, String, i64)>>,
}

fn relay(service: &str, e: Status) -> Status {
    match e.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            Status::unavailable(format!("{service} unavailable: {}", e.message()))
        }
        code => Status::new(code, format!("{service}: {}", e.message())),
    }
}

fn with_header<T>(header: &str, message: T) -> Result<Request<T>, Status> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        header
            .parse()
            .map_err(|_| Status::internal("malformed authorization header"))?,
    );
    Ok(r)
}

/// What an upstream answer that does not verify becomes.
fn refused(what: &str, e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the key service's {what} does not verify: {e}"))
}

#[derive(Clone, Copy)]
enum Audience {
    Server,
    Kms,
}

impl Upstream {
    /// The service's own token for `audience`, logging in again (by OrgKey
    /// signature) shortly before the last one expires.
    async fn header(&self, audience: Audience) -> Result<String, Status> {
        let mut cached = self.tokens.lock().await;
        let now = tessera_service::now_secs();
        if cached.as_ref().is_none_or(|(_, _, exp)| exp - 60 <= now) {
            *cached = Some(self.log_in().await?);
        }
        let (server, kms, _) = cached
            .as_ref()
            .ok_or_else(|| Status::internal("no service token"))?;
        Ok(match audience {
            Audience::Server => server.clone(),
            Audience::Kms => kms.clone(),
        })
    }

    async fn log_in(&self) -> Result<(String, String, i64), Status> {
        let mut accounts = AccountsClient::new(self.server.clone());
        let challenge = accounts
            .begin_device_login(BeginDeviceLoginRequest {
                identity: self.org.identity.clone(),
                card_id: self.org.card_id.to_vec(),
            })
            .await
            .map_err(|e| relay("app server (OrgKey log-in)", e))?
            .into_inner()
            .challenge;
        let message =
            tessera_card::device_login_message(&challenge, &self.org.identity, &self.org.card_id);
        let signature = self
            .org
            .keys
            .signing
            .sign(SignatureContext::DeviceLogin, &message);
        let login = accounts
            .finish_device_login(FinishDeviceLoginRequest {
                identity: self.org.identity.clone(),
                card_id: self.org.card_id.to_vec(),
                challenge,
                signature: signature.to_vec(),
            })
            .await
            .map_err(|e| relay("app server (OrgKey log-in)", e))?
            .into_inner();
        let server = bearer_header(&login.access_token);
        let kms = accounts
            .issue_token(with_header(
                &server,
                IssueTokenRequest {
                    audience: "kms".into(),
                },
            )?)
            .await
            .map_err(|e| relay("app server (key service token)", e))?
            .into_inner();
        Ok((
            server,
            bearer_header(&kms.access_token),
            login.expires_at.min(kms.expires_at),
        ))
    }

    /// The channel as the app server shows it to `caller` (fails unless a member).
    pub(crate) async fn channel(
        &self,
        caller: &Caller,
        channel_id: &str,
    ) -> Result<PbChannel, Status> {
        let request = with_header(
            &self.header(Audience::Server).await?,
            GetMemberViewRequest {
                channel_id: channel_id.to_owned(),
                identity: caller.identity.clone(),
            },
        )?;
        Ok(ArchiveClient::new(self.server.clone())
            .get_member_view(request)
            .await
            .map_err(|e| relay("app server", e))?
            .into_inner())
    }

    /// The stored message at `index` (the caller's right to see it is
    /// checked with [`Upstream::channel`] first).
    pub(crate) async fn message(
        &self,
        channel_id: &str,
        index: u64,
    ) -> Result<Option<StoredMessage>, Status> {
        let request = with_header(
            &self.header(Audience::Server).await?,
            GetStoredMessageRequest {
                channel_id: channel_id.to_owned(),
                index,
            },
        )?;
        match ArchiveClient::new(self.server.clone())
            .max_decoding_message_size(64 << 20)
            .get_stored_message(request)
            .await
        {
            Ok(m) => Ok(Some(m.into_inner()).filter(|m| m.index == index)),
            Err(e) if e.code() == tonic::Code::NotFound => Ok(None),
            Err(e) => Err(relay("app server", e)),
        }
    }

    fn kms_client(&self) -> KeyDirectoryClient<Channel> {
        KeyDirectoryClient::new(self.kms.clone()).max_decoding_message_size(16 << 20)
    }

    fn checkpoint(&self, signed: Option<&SignedCheckpoint>) -> Result<VerifiedCheckpoint, Status> {
        let signed = signed.ok_or_else(|| refused("answer", "no checkpoint"))?;
        transparency::verify_checkpoint(signed, self.verifier.kms_key())
            .map_err(|e| refused("checkpoint", e))
    }

    /// A card by id (revoked ones included), checked like a client checks it.
    pub(crate) async fn card(&self, id: &CardId, identity: &str) -> Result<CheckedRecord, Status> {
        let request = with_header(
            &self.header(Audience::Kms).await?,
            GetCardRequest {
                card_id: id.to_vec(),
            },
        )?;
        let response = self
            .kms_client()
            .get_card(request)
            .await
            .map_err(|e| relay("key service", e))?
            .into_inner();
        let checkpoint = self.checkpoint(response.checkpoint.as_ref())?;
        let record = response
            .record
            .ok_or_else(|| refused("answer", "no record"))?;
        let checked = record::check_record(
            &self.verifier,
            &record,
            &checkpoint,
            Some(identity),
            CardKind::Client,
        )
        .map_err(|e| {
            Status::invalid_argument(format!("the original sender's card does not verify: {e}"))
        })?;
        if checked.card.id() != *id {
            return Err(refused("answer", "another card than the one asked for"));
        }
        Ok(checked)
    }

    /// `identity`'s whole device list, with the checkpoint it is proven in.
    async fn device_list(
        &self,
        identity: &str,
    ) -> Result<(DeviceList, VerifiedCheckpoint), Status> {
        let request = with_header(
            &self.header(Audience::Kms).await?,
            GetDeviceListRequest {
                identity: identity.to_owned(),
                from_seqno: 0,
            },
        )?;
        let response = self
            .kms_client()
            .get_device_list(request)
            .await
            .map_err(|e| relay("key service", e))?
            .into_inner();
        let checkpoint = self.checkpoint(response.checkpoint.as_ref())?;
        Ok((response.device_list.unwrap_or_default(), checkpoint))
    }

    /// The cards of `identity` that are active and approved by its own
    /// devices (its verified device list), checked like a client checks them.
    pub(crate) async fn approved_cards(&self, identity: &str) -> Result<Vec<VerifiedCard>, Status> {
        let request = with_header(
            &self.header(Audience::Kms).await?,
            SearchCardsRequest {
                identities: vec![identity.to_owned()],
                kind: tessera_proto::card::v1::CardKind::Client as i32,
                device_list_from: Default::default(),
            },
        )?;
        let found = self
            .kms_client()
            .search_cards(request)
            .await
            .map_err(|e| relay("key service", e))?
            .into_inner();
        let checkpoint = self.checkpoint(found.checkpoint.as_ref())?;
        let result = found
            .results
            .into_iter()
            .find(|r| r.identity == identity)
            .ok_or_else(|| refused("search", format!("no answer for {identity}")))?;
        let mut records: BTreeMap<CardId, CheckedRecord> = BTreeMap::new();
        for record in &result.cards {
            let checked = record::check_record(
                &self.verifier,
                record,
                &checkpoint,
                Some(identity),
                CardKind::Client,
            )
            .map_err(|e| refused("card", e))?;
            if checked.status != RecordStatus::Active {
                return Err(refused("search", "an inactive card among the active ones"));
            }
            records.insert(checked.card.id(), checked);
        }
        let mut list = result.device_list.unwrap_or_default();
        let mut list_checkpoint = checkpoint.clone();
        if list.truncated {
            (list, list_checkpoint) = self.device_list(identity).await?;
        }
        let served = ServedList::check(&list, identity, &list_checkpoint)
            .map_err(|e| refused("device list", e))?;
        let mut state = DeviceListState::empty(identity);
        // Signers no longer active are fetched by id.
        for signer in served.signers(&state) {
            if let std::collections::btree_map::Entry::Vacant(slot) = records.entry(signer) {
                slot.insert(self.card(&signer, identity).await?);
            }
        }
        served
            .extend(
                &mut state,
                &|id| records.get(id).cloned(),
                self.verifier.app_key(),
            )
            .map_err(|e| refused("device list", e))?;
        Ok(records
            .into_values()
            .filter(|r| r.status == RecordStatus::Active && state.is_trusted(&r.card.id()))
            .map(|r| r.card)
            .collect())
    }
}
