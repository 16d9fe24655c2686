//! Calls to the app server and the key service on a caller's behalf, with
//! the caller's own token: the app server stays the source of truth for
//! channel membership and history visibility, and the backup service needs
//! no credential of its own.

use tessera_card::{CardId, CardKind, VerifiedCard, Verifier, transparency};
use tessera_proto::{
    kms::v1::{GetCardRequest, SearchCardsRequest, key_directory_client::KeyDirectoryClient},
    server::v1::{
        Channel as PbChannel, Direction, GetChannelRequest, ListMessagesRequest, StoredMessage,
        channels_client::ChannelsClient,
    },
};
use tessera_service::Caller;
use tonic::{Request, Status, transport::Channel};

pub(crate) struct Upstream {
    pub(crate) server: Channel,
    pub(crate) kms: Channel,
    pub(crate) verifier: Verifier,
}

fn on_behalf<T>(caller: &Caller, message: T) -> Result<Request<T>, Status> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        caller
            .authorization_header()
            .parse()
            .map_err(|_| Status::unauthenticated("malformed authorization header"))?,
    );
    Ok(r)
}

fn relay(service: &str, e: Status) -> Status {
    match e.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            Status::unavailable(format!("{service} unavailable: {}", e.message()))
        }
        code => Status::new(code, format!("{service}: {}", e.message())),
    }
}

impl Upstream {
    /// The channel as the app server shows it to the caller (fails unless a member).
    pub(crate) async fn channel(
        &self,
        caller: &Caller,
        channel_id: &str,
    ) -> Result<PbChannel, Status> {
        let request = on_behalf(
            caller,
            GetChannelRequest {
                channel_id: channel_id.to_owned(),
            },
        )?;
        Ok(ChannelsClient::new(self.server.clone())
            .get_channel(request)
            .await
            .map_err(|e| relay("app server", e))?
            .into_inner())
    }

    /// The stored message at `index`, if the caller may see it.
    pub(crate) async fn message(
        &self,
        caller: &Caller,
        channel_id: &str,
        index: u64,
    ) -> Result<Option<StoredMessage>, Status> {
        let request = on_behalf(
            caller,
            ListMessagesRequest {
                channel_id: channel_id.to_owned(),
                anchor: index,
                page_size: 1,
                direction: Direction::Forward as i32,
            },
        )?;
        let page = ChannelsClient::new(self.server.clone())
            .max_decoding_message_size(64 << 20)
            .list_messages(request)
            .await
            .map_err(|e| relay("app server", e))?
            .into_inner();
        Ok(page.messages.into_iter().find(|m| m.index == index))
    }

    /// A card by id (revoked ones included), verified against the pinned keys.
    pub(crate) async fn card(
        &self,
        caller: &Caller,
        id: &CardId,
        identity: &str,
    ) -> Result<VerifiedCard, Status> {
        let request = on_behalf(
            caller,
            GetCardRequest {
                card_id: id.to_vec(),
            },
        )?;
        let record = KeyDirectoryClient::new(self.kms.clone())
            .get_card(request)
            .await
            .map_err(|e| relay("key service", e))?
            .into_inner()
            .record
            .ok_or_else(|| Status::internal("key service answered without a record"))?;
        let card = transparency::registered_card(&record.registration_entry)
            .and_then(|card| {
                self.verifier
                    .verify(&card, Some(identity), CardKind::Client)
            })
            .map_err(|e| {
                Status::invalid_argument(format!("the original sender's card does not verify: {e}"))
            })?;
        if card.id() != *id {
            return Err(Status::internal("the key service returned another card"));
        }
        Ok(card)
    }

    /// Every active client card of `identity`, verified.
    pub(crate) async fn active_cards(
        &self,
        caller: &Caller,
        identity: &str,
    ) -> Result<Vec<VerifiedCard>, Status> {
        let request = on_behalf(
            caller,
            SearchCardsRequest {
                identities: vec![identity.to_owned()],
                kind: tessera_proto::card::v1::CardKind::Client as i32,
            },
        )?;
        let found = KeyDirectoryClient::new(self.kms.clone())
            .max_decoding_message_size(16 << 20)
            .search_cards(request)
            .await
            .map_err(|e| relay("key service", e))?
            .into_inner();
        let mut cards = Vec::new();
        for result in found.results {
            for record in result.cards {
                match transparency::registered_card(&record.registration_entry).and_then(|card| {
                    self.verifier
                        .verify(&card, Some(identity), CardKind::Client)
                }) {
                    Ok(card) => cards.push(card),
                    Err(e) => {
                        tracing::warn!(%identity, "skipping a card that does not verify: {e}")
                    }
                }
            }
        }
        Ok(cards)
    }
}
