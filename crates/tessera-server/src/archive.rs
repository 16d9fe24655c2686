//! Calls of the organisation's backup service. It logs in with the OrgKey
//! (a SERVICE token of the organisation's identity) and asks what a member
//! may see, so it never needs, or forwards, a user's token.

use std::sync::Arc;

use tessera_proto::server::v1::{
    Channel as PbChannel, GetMemberViewRequest, GetStoredMessageRequest, StoredMessage,
    archive_server::Archive,
};
use tessera_service::{
    Caller,
    token::{AuthMethod, Role},
};
use tonic::{Request, Response, Status};

use crate::App;

pub(crate) struct ArchiveService(pub(crate) Arc<App>);

impl App {
    /// Only the organisation's backup service, logged in with the OrgKey.
    fn require_backup_service(&self, caller: &Caller) -> Result<(), Status> {
        let is_org = self.config.org_identity.as_deref() == Some(caller.identity.as_str());
        if caller.role == Role::Backup && caller.auth == AuthMethod::Service && is_org {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "only the organisation's backup service may call this",
            ))
        }
    }
}

#[tonic::async_trait]
impl Archive for ArchiveService {
    async fn get_member_view(
        &self,
        request: Request<GetMemberViewRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        app.require_backup_service(&caller)?;
        let r = request.into_inner();
        Ok(Response::new(
            app.channels.member_view(&r.channel_id, &r.identity).await?,
        ))
    }

    async fn get_stored_message(
        &self,
        request: Request<GetStoredMessageRequest>,
    ) -> Result<Response<StoredMessage>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        app.require_backup_service(&caller)?;
        let r = request.into_inner();
        Ok(Response::new(
            app.channels.stored_message(&r.channel_id, r.index).await?,
        ))
    }
}
