//! The gRPC face of the directory: authentication, then one call into
//! [`Directory`], then the error converted to a status once.

use std::sync::Arc;

use tessera_card::CardKind;
use tessera_proto::kms::v1::{
    CardResponse, GetCardRequest, GetCheckpointRequest, GetCheckpointResponse,
    GetConsistencyProofRequest, GetConsistencyProofResponse, GetDeviceListRequest,
    GetDeviceListResponse, GetInclusionProofRequest, GetInclusionProofResponse,
    GetServiceInfoRequest, GetServiceInfoResponse, ListLogEntriesRequest, ListLogEntriesResponse,
    PublishDeviceStatementRequest, PublishDeviceStatementResponse, RegisterCardRequest,
    RevokeCardRequest, SearchCardsRequest, SearchCardsResponse, key_directory_server::KeyDirectory,
};
use tessera_service::{TokenVerifier, limits, token::Role};
use tonic::{Request, Response, Status};

use crate::directory::Directory;

pub(crate) struct KmsService {
    pub(crate) directory: Arc<Directory>,
    pub(crate) tokens: TokenVerifier,
}

fn card_response(
    (record, checkpoint): (
        tessera_proto::kms::v1::CardRecord,
        tessera_proto::transparency::v1::SignedCheckpoint,
    ),
) -> Response<CardResponse> {
    Response::new(CardResponse {
        record: Some(record),
        checkpoint: Some(checkpoint),
    })
}

#[tonic::async_trait]
impl KeyDirectory for KmsService {
    async fn get_service_info(
        &self,
        _request: Request<GetServiceInfoRequest>,
    ) -> Result<Response<GetServiceInfoResponse>, Status> {
        let key = self.directory.public_key();
        Ok(Response::new(GetServiceInfoResponse {
            service_public_key: key.as_bytes().to_vec(),
            log_id: tessera_card::transparency::log_id(&key),
            app_public_key: self.directory.app_key().as_bytes().to_vec(),
        }))
    }

    async fn register_card(
        &self,
        request: Request<RegisterCardRequest>,
    ) -> Result<Response<CardResponse>, Status> {
        let caller = self.tokens.authenticate(&request)?;
        if !matches!(caller.role, Role::Service | Role::Admin) {
            return Err(Status::permission_denied(
                "only the app server registers cards: enroll devices through it",
            ));
        }
        let card = request
            .into_inner()
            .card
            .ok_or_else(|| Status::invalid_argument("card is missing"))?;
        Ok(card_response(self.directory.register(card).await?))
    }

    async fn search_cards(
        &self,
        request: Request<SearchCardsRequest>,
    ) -> Result<Response<SearchCardsResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let request = request.into_inner();
        let kind = match request.kind {
            0 => None,
            k => Some(
                CardKind::from_proto(k)
                    .map_err(|_| Status::invalid_argument("unknown card kind"))?,
            ),
        };
        if request.device_list_from.len() > request.identities.len() {
            return Err(Status::invalid_argument(
                "device_list_from names more identities than the search",
            ));
        }
        let (results, checkpoint) =
            self.directory
                .search(&request.identities, kind, &request.device_list_from)?;
        Ok(Response::new(SearchCardsResponse {
            results,
            checkpoint: Some(checkpoint),
        }))
    }

    async fn get_card(
        &self,
        request: Request<GetCardRequest>,
    ) -> Result<Response<CardResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let id = limits::card_id("card_id", &request.get_ref().card_id)?;
        Ok(card_response(self.directory.get(&id).await?))
    }

    async fn revoke_card(
        &self,
        request: Request<RevokeCardRequest>,
    ) -> Result<Response<CardResponse>, Status> {
        let caller = self.tokens.authenticate(&request)?;
        let revocation = request
            .into_inner()
            .revocation
            .ok_or_else(|| Status::invalid_argument("revocation is missing"))?;
        Ok(card_response(
            self.directory.revoke(&caller, revocation).await?,
        ))
    }

    async fn get_checkpoint(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let (_, checkpoint) = self.directory.checkpoint()?;
        Ok(Response::new(GetCheckpointResponse {
            checkpoint: Some(checkpoint),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let r = request.get_ref();
        let (proof, checkpoint) = self.directory.consistency(r.old_size, r.new_size)?;
        Ok(Response::new(GetConsistencyProofResponse {
            proof: Some(proof),
            checkpoint: Some(checkpoint),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let r = request.get_ref();
        let (proof, entry, checkpoint) =
            self.directory.inclusion(r.leaf_index, r.tree_size).await?;
        Ok(Response::new(GetInclusionProofResponse {
            proof: Some(proof),
            entry,
            checkpoint: Some(checkpoint),
        }))
    }

    async fn list_log_entries(
        &self,
        request: Request<ListLogEntriesRequest>,
    ) -> Result<Response<ListLogEntriesResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let r = request.get_ref();
        let (entries, checkpoint) = self.directory.entries(r.from_index, r.limit).await?;
        Ok(Response::new(ListLogEntriesResponse {
            entries,
            from_index: r.from_index,
            checkpoint: Some(checkpoint),
        }))
    }

    async fn publish_device_statement(
        &self,
        request: Request<PublishDeviceStatementRequest>,
    ) -> Result<Response<PublishDeviceStatementResponse>, Status> {
        let caller = self.tokens.authenticate(&request)?;
        let statement = request
            .into_inner()
            .statement
            .ok_or_else(|| Status::invalid_argument("statement is missing"))?;
        let (statement, checkpoint) = self.directory.publish(&caller, statement).await?;
        Ok(Response::new(PublishDeviceStatementResponse {
            statement: Some(statement),
            checkpoint: Some(checkpoint),
        }))
    }

    async fn get_device_list(
        &self,
        request: Request<GetDeviceListRequest>,
    ) -> Result<Response<GetDeviceListResponse>, Status> {
        self.tokens.authenticate(&request)?;
        let r = request.into_inner();
        let (device_list, checkpoint) = self
            .directory
            .device_list(&r.identity, r.from_seqno)
            .await?;
        Ok(Response::new(GetDeviceListResponse {
            identity: r.identity,
            device_list: Some(device_list),
            checkpoint: Some(checkpoint),
        }))
    }
}
