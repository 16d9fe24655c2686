//! This user's devices (the verified device list: approving and removing
//! devices), and the admin calls.

use tessera_card::{
    CardId, VerifiedCard,
    device_list::{Action, NewStatement},
    revocation::{RevokedBy, sign_revocation},
};
use tessera_proto::{
    kms::v1::{
        CardStatus, PublishDeviceStatementRequest, key_directory_client::KeyDirectoryClient,
    },
    server::v1::{
        AdminRevokeDeviceRequest, Device, ListDevicesRequest, ListOrgMembersRequest,
        RevokeDeviceRequest, SetOrgMemberRequest, admin_client::AdminClient,
        devices_client::DevicesClient,
    },
};

use crate::{
    Client, ClientError,
    client::{Service, now_secs},
    error::rpc,
    state,
};

/// This user's devices as the verified device list sorts them.
#[derive(Debug, Clone, Default)]
pub struct OwnDevices {
    /// Approved by the user's devices and active.
    pub approved: Vec<VerifiedCard>,
    /// Enrolled but not approved: they receive nothing until approved.
    pub pending: Vec<VerifiedCard>,
}

/// How many times a statement is signed again after the list moved on.
const PUBLISH_ATTEMPTS: usize = 3;

impl Client {
    /// This user's devices from the verified device list.
    pub async fn own_devices(&self) -> Result<OwnDevices, ClientError> {
        let identity = self.identity().to_owned();
        let (mut found, _) = self.cards_of(std::slice::from_ref(&identity)).await?;
        let devices = found.remove(&identity).unwrap_or_default();
        Ok(OwnDevices {
            approved: devices.approved,
            pending: devices.pending,
        })
    }

    /// Signs `action` on `subject` with this device's key against the head
    /// of this user's verified device list and publishes it at the key
    /// service; signs again if another device moved the head meanwhile.
    async fn publish_own(&self, action: Action, subject: CardId) -> Result<(), ClientError> {
        let identity = self.identity().to_owned();
        for attempt in 1..=PUBLISH_ATTEMPTS {
            self.cards_of(std::slice::from_ref(&identity)).await?;
            let pin = state::read_state(&self.dir)?
                .device_lists
                .remove(&identity)
                .unwrap_or_default();
            let head = match pin.head.as_str() {
                "" => None,
                h => hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok()),
            };
            let statement = NewStatement {
                identity: &identity,
                seqno: pin.length,
                previous_hash: head,
                action,
                subject,
                signer: self.card_id,
                created_at: now_secs(),
            }
            .sign(&self.keys.signing);
            let request = self
                .request_to(
                    Service::Kms,
                    PublishDeviceStatementRequest {
                        statement: Some(statement),
                    },
                )
                .await?;
            match KeyDirectoryClient::new(self.kms.clone())
                .publish_device_statement(request)
                .await
            {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::Aborted && attempt < PUBLISH_ATTEMPTS => {}
                Err(s) => {
                    return Err(rpc(
                        "key service",
                        self.kms_url(),
                        "the device list statement",
                    )(s));
                }
            }
        }
        // What was published is now part of the verified list.
        self.cards_of(std::slice::from_ref(&identity)).await?;
        Ok(())
    }

    /// Approves a pending device of this user: this device signs an ADD to
    /// the device list. Only an approved device can approve another.
    pub async fn approve_device(&self, card_id: &CardId) -> Result<VerifiedCard, ClientError> {
        let devices = self.own_devices().await?;
        if !devices.approved.iter().any(|c| c.id() == self.card_id) {
            return Err(ClientError::Usage(
                "this device is not approved itself, so it cannot approve others".into(),
            ));
        }
        let card = devices
            .pending
            .iter()
            .find(|c| c.id() == *card_id)
            .cloned()
            .ok_or_else(|| ClientError::NotFound {
                what: "pending device",
                name: card_id.to_string(),
            })?;
        self.publish_own(Action::Add, *card_id).await?;
        tracing::info!(card_id = %card_id, "device approved");
        Ok(card)
    }

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

    /// Revokes one of this user's devices: first removes it from the device
    /// list (a REMOVE this device signs, when the card is approved and this
    /// device too), then revokes its card. This device revokes itself with
    /// its own key; another device's card is revoked by the app (AppKey),
    /// which needs the account `password` (an account change).
    pub async fn revoke_device(
        &self,
        card_id: &CardId,
        reason: &str,
        password: Option<&str>,
    ) -> Result<CardStatus, ClientError> {
        let password_session = match (card_id == &self.card_id, password) {
            (true, _) => None,
            (false, Some(password)) => Some(self.password_session(password).await?),
            (false, None) => {
                return Err(ClientError::Usage(
                    "revoking another device needs your password".into(),
                ));
            }
        };
        let devices = self.own_devices().await?;
        let approved = |id: &CardId| devices.approved.iter().any(|c| c.id() == *id);
        if approved(card_id) && approved(&self.card_id) {
            self.publish_own(Action::Remove, *card_id).await?;
        }
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
        let message = RevokeDeviceRequest {
            card_id: card_id.to_vec(),
            reason: reason.to_owned(),
            revocation,
        };
        let request = match password_session {
            Some(session) => {
                let mut r = tonic::Request::new(message);
                crate::client::authorize(&mut r, &session.header)?;
                r
            }
            None => self.request(message).await?,
        };
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
