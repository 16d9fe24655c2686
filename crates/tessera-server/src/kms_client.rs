//! The app server's client of the key service. It authenticates with a
//! token it issues to itself (role SERVICE).

use std::sync::Mutex;

use tessera_card::CardId;
use tessera_proto::{
    card::v1::{Card, Revocation, SignedDeviceStatement},
    kms::v1::{
        CardResponse, GetCardRequest, GetDeviceListRequest, PublishDeviceStatementRequest,
        PublishDeviceStatementResponse, RegisterCardRequest, RevokeCardRequest,
        key_directory_client::KeyDirectoryClient,
    },
};
use tessera_service::{
    TokenIssuer,
    token::{Audience, Grant, bearer_header},
};
use tonic::{Request, Status, transport::Channel};

/// Subject of the server's own tokens.
pub(crate) const SERVICE_SUBJECT: &str = "tessera-server";

pub(crate) struct KmsClient {
    client: KeyDirectoryClient<Channel>,
    token: Mutex<Option<(String, i64)>>,
}

fn relay(e: Status) -> Status {
    match e.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            Status::unavailable(format!("key service unavailable: {}", e.message()))
        }
        code => Status::new(code, format!("key service: {}", e.message())),
    }
}

impl KmsClient {
    pub(crate) fn new(channel: Channel) -> Self {
        Self {
            client: KeyDirectoryClient::new(channel).max_decoding_message_size(16 << 20),
            token: Mutex::new(None),
        }
    }

    fn request<T>(&self, issuer: &TokenIssuer, message: T) -> Result<Request<T>, Status> {
        let now = tessera_service::now_secs();
        let header = {
            let mut cached = self
                .token
                .lock()
                .map_err(|_| Status::internal("token cache poisoned"))?;
            match cached.as_ref() {
                Some((h, expires)) if *expires - 60 > now => h.clone(),
                _ => {
                    let t = issuer
                        .issue(&Grant::service(SERVICE_SUBJECT), Audience::Kms)
                        .map_err(|_| Status::internal("cannot issue a service token"))?;
                    let h = bearer_header(&t.bytes);
                    *cached = Some((h.clone(), t.expires_at));
                    h
                }
            }
        };
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            header
                .parse()
                .map_err(|_| Status::internal("token header"))?,
        );
        Ok(request)
    }

    pub(crate) async fn register(
        &self,
        issuer: &TokenIssuer,
        card: Card,
    ) -> Result<CardResponse, Status> {
        let request = self.request(issuer, RegisterCardRequest { card: Some(card) })?;
        Ok(self
            .client
            .clone()
            .register_card(request)
            .await
            .map_err(relay)?
            .into_inner())
    }

    pub(crate) async fn revoke(
        &self,
        issuer: &TokenIssuer,
        revocation: Revocation,
    ) -> Result<CardResponse, Status> {
        let request = self.request(
            issuer,
            RevokeCardRequest {
                revocation: Some(revocation),
            },
        )?;
        Ok(self
            .client
            .clone()
            .revoke_card(request)
            .await
            .map_err(relay)?
            .into_inner())
    }

    pub(crate) async fn get(
        &self,
        issuer: &TokenIssuer,
        id: &CardId,
    ) -> Result<CardResponse, Status> {
        let request = self.request(
            issuer,
            GetCardRequest {
                card_id: id.to_vec(),
            },
        )?;
        Ok(self
            .client
            .clone()
            .get_card(request)
            .await
            .map_err(relay)?
            .into_inner())
    }

    pub(crate) async fn publish(
        &self,
        issuer: &TokenIssuer,
        statement: SignedDeviceStatement,
    ) -> Result<PublishDeviceStatementResponse, Status> {
        let request = self.request(
            issuer,
            PublishDeviceStatementRequest {
                statement: Some(statement),
            },
        )?;
        Ok(self
            .client
            .clone()
            .publish_device_statement(request)
            .await
            .map_err(relay)?
            .into_inner())
    }

    /// The card ids `identity`'s device list trusts, as the key service
    /// reads it; `None` when the identity has no list (an account from
    /// before device lists.
    pub(crate) async fn trusted_devices(
        &self,
        issuer: &TokenIssuer,
        identity: &str,
    ) -> Result<Option<Vec<Vec<u8>>>, Status> {
        let request = self.request(
            issuer,
            GetDeviceListRequest {
                identity: identity.to_owned(),
                // Past any list's end: the length and trusted set, no
                // statements.
                from_seqno: u64::MAX,
            },
        )?;
        let answer = self
            .client
            .clone()
            .get_device_list(request)
            .await
            .map_err(relay)?
            .into_inner();
        if answer.identity != identity {
            return Err(Status::internal(
                "the key service answered for another identity",
            ));
        }
        let list = answer.device_list.unwrap_or_default();
        Ok((list.length > 0).then_some(list.trusted_card_ids))
    }
}
