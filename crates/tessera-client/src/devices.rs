//! This user's devices, and the admin calls.

use tessera_card::{
    CardId,
    revocation::{RevokedBy, sign_revocation},
};
use tessera_proto::{
    kms::v1::CardStatus,
    server::v1::{
        AdminRevokeDeviceRequest, Device, ListDevicesRequest, ListOrgMembersRequest,
        RevokeDeviceRequest, SetOrgMemberRequest, admin_client::AdminClient,
        devices_client::DevicesClient,
    },
};

use crate::{Client, ClientError, client::now_secs, error::rpc};

impl Client {
    /// This user's devices as the app server lists them.
    pub async fn devices(&self) -> Result<Vec<Device>, ClientError> {
        let request = self.request(ListDevicesRequest {}).await?;
        Ok(DevicesClient::new(self.server.clone())
            .list_devices(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the device list"))?
            .into_inner()
            .devices)
    }

    /// Revokes one of this user's devices. This device revokes itself with
    /// its own key; another device is revoked by the app (AppKey).
    pub async fn revoke_device(
        &self,
        card_id: &CardId,
        reason: &str,
    ) -> Result<CardStatus, ClientError> {
        let revocation = if card_id == &self.card_id {
            Some(
                sign_revocation(
                    *card_id,
                    RevokedBy::SelfKey,
                    &self.keys.signing,
                    reason,
                    now_secs(),
                )
                .map_err(|e| ClientError::Usage(e.to_string()))?,
            )
        } else {
            None
        };
        let request = self
            .request(RevokeDeviceRequest {
                card_id: card_id.to_vec(),
                reason: reason.to_owned(),
                revocation,
            })
            .await?;
        let response = DevicesClient::new(self.server.clone())
            .revoke_device(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the revocation"))?
            .into_inner();
        Ok(response.record.map_or(CardStatus::Unspecified, |r| {
            CardStatus::try_from(r.status).unwrap_or(CardStatus::Unspecified)
        }))
    }

    /// Admin: adds or removes a user from the organisation.
    pub async fn set_org_member(
        &self,
        identity: &str,
        member: bool,
    ) -> Result<Vec<String>, ClientError> {
        let request = self
            .request(SetOrgMemberRequest {
                identity: identity.to_owned(),
                member,
            })
            .await?;
        Ok(AdminClient::new(self.server.clone())
            .set_org_member(request)
            .await
            .map_err(rpc(
                "app server",
                self.server_url(),
                "the org membership change",
            ))?
            .into_inner()
            .members)
    }

    /// Admin: the organisation and its members.
    pub async fn org_members(&self) -> Result<(String, Vec<String>), ClientError> {
        let request = self.request(ListOrgMembersRequest {}).await?;
        let r = AdminClient::new(self.server.clone())
            .list_org_members(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the org member list"))?
            .into_inner();
        Ok((r.org_identity, r.members))
    }

    /// Admin: revokes any user's device with the AppKey.
    pub async fn admin_revoke_device(
        &self,
        card_id: &CardId,
        reason: &str,
    ) -> Result<(), ClientError> {
        let request = self
            .request(AdminRevokeDeviceRequest {
                card_id: card_id.to_vec(),
                reason: reason.to_owned(),
            })
            .await?;
        AdminClient::new(self.server.clone())
            .admin_revoke_device(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the revocation"))?;
        Ok(())
    }
}
