//! Devices: enrollment (the AppKey vouches for a self-signed ClientCard and
//! the server registers it at the key service), listing, revocation; and the
//! admin calls (the OrgCard, org members, revoking any device).

use std::sync::Arc;

use tessera_card::{
    CardId, CardKind, ParsedCard, app_sign,
    device_list::{Action, ParsedStatement, app_cosign},
    revocation::{ParsedRevocation, RevokedBy, sign_revocation},
};
use tessera_proto::{
    card::v1::{Card, Revocation, SignedDeviceStatement},
    kms::v1::{CardResponse, CardStatus},
    server::v1::{
        AdminRevokeDeviceRequest, Device as PbDevice, EnrollDeviceRequest, EnrollDeviceResponse,
        ListDevicesRequest, ListDevicesResponse, ListOrgMembersRequest, ListOrgMembersResponse,
        RegisterOrgCardRequest, RevokeDeviceRequest, SetOrgMemberRequest, SetOrgMemberResponse,
        admin_server::Admin, devices_server::Devices,
    },
};
use tessera_service::{Caller, limits};
use tonic::{Request, Response, Status};

use crate::{
    App,
    store::{Device, DeviceStatus},
};

pub(crate) struct DevicesService(pub(crate) Arc<App>);
pub(crate) struct AdminService(pub(crate) Arc<App>);

/// Largest card snapshot accepted for enrollment.
const MAX_SNAPSHOT_BYTES: usize = 4096;

/// How old a password log-in may be to enroll a device or reset an identity.
pub(crate) const FRESH_PASSWORD_SECS: i64 = 300;

/// Checks a GENESIS or RESET statement sent with a card for `identity` and
/// adds the AppKey's co-signature (the app server vouching that the account
/// password was just given).
fn cosign_statement(
    statement: SignedDeviceStatement,
    card: &ParsedCard,
    app_key: &tessera_crypto::SigningKey,
) -> Result<(SignedDeviceStatement, Action), Status> {
    let mut unsigned = statement;
    // The device leaves it empty; parsing checks the shape with it filled.
    let app_len = unsigned.app_signature.len();
    if app_len != 0 {
        return Err(Status::invalid_argument(
            "leave the statement's app_signature empty: the server adds it",
        ));
    }
    app_cosign(&mut unsigned, app_key);
    let parsed =
        ParsedStatement::parse(unsigned).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !matches!(parsed.action(), Action::Genesis | Action::Reset) {
        return Err(Status::invalid_argument(
            "only a genesis or reset statement comes with an enrollment; publish others at the key service",
        ));
    }
    if parsed.identity() != card.identity() || parsed.subject() != card.id() {
        return Err(Status::invalid_argument(
            "the statement must make the enrolled card its subject and signer",
        ));
    }
    card.signing_key()
        .verify(
            tessera_crypto::SignatureContext::DeviceStatement,
            &parsed.signed().statement,
            &parsed.signed().signature,
        )
        .map_err(|_| Status::invalid_argument("the statement's signature does not verify"))?;
    Ok((parsed.signed().clone(), parsed.action()))
}

fn parse_self_signed(card: Option<Card>, kind: CardKind) -> Result<ParsedCard, Status> {
    let card = card.ok_or_else(|| Status::invalid_argument("card is missing"))?;
    limits::check_len(
        "content_snapshot",
        card.content_snapshot.len(),
        MAX_SNAPSHOT_BYTES,
    )?;
    let parsed = ParsedCard::parse(card).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if parsed.kind() != kind {
        return Err(Status::invalid_argument(format!(
            "expected a {kind} card, got a {} card",
            parsed.kind()
        )));
    }
    parsed
        .check_self_signature()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(parsed)
}

fn device_status(status: i32) -> CardStatus {
    match DeviceStatus::try_from(status) {
        Ok(DeviceStatus::Active) => CardStatus::Active,
        Ok(DeviceStatus::Revoked) => CardStatus::Revoked,
        Ok(DeviceStatus::Superseded) => CardStatus::Superseded,
        _ => CardStatus::Unspecified,
    }
}

impl App {
    /// Signs `parsed` with the AppKey, registers it at the key service and
    /// records it; `superseded` is the device it replaces, if any. A
    /// client device is recorded only while its owner has fewer active
    /// devices than the limit, which the store decides (on PostgreSQL in
    /// one transaction, so replicas cannot both enroll the last one): if it
    /// refuses, the card just registered is revoked again and the call
    /// answers RESOURCE_EXHAUSTED.
    async fn vouch_and_register(
        &self,
        parsed: ParsedCard,
        superseded: Option<Device>,
        org_card: bool,
    ) -> Result<CardResponse, Status> {
        let device = Device {
            card_id: parsed.id().to_vec(),
            identity: parsed.identity().to_owned(),
            device_name: parsed.device_name().to_owned(),
            created_at: parsed.created_at(),
            status: DeviceStatus::Active as i32,
            org_card,
            signing_public_key: parsed.signing_key().as_bytes().to_vec(),
        };
        let mut card = parsed.into_card();
        card.kms_signature.clear();
        app_sign(&mut card, &self.app_key);
        let response = self.kms.register(&self.issuer, card).await?;
        let superseded = superseded.map(|mut prev| {
            prev.status = DeviceStatus::Superseded as i32;
            prev
        });
        if org_card {
            let mut changed = vec![device];
            changed.extend(superseded);
            self.store.put_devices(&changed).await?;
        } else {
            let max = self.config.limits.max_devices_per_user;
            if !self
                .store
                .add_device(&device, superseded.as_ref(), max)
                .await?
            {
                // Another app server on the database enrolled one since
                // the caller's check: the key service must not keep a card
                // this server never recorded as a device.
                let card_id = hex::encode(&device.card_id);
                self.revoke_device(device, None, "over the device limit")
                    .await?;
                tracing::info!(%card_id, "device revoked again: over the device limit");
                return Err(limits::quota_reached("devices per user", max));
            }
        }
        self.store.flush().await?;
        Ok(response)
    }

    /// Revokes `device` at the key service (with `revocation`, or one the
    /// AppKey signs) and records it.
    async fn revoke_device(
        &self,
        mut device: Device,
        revocation: Option<Revocation>,
        reason: &str,
    ) -> Result<CardResponse, Status> {
        let card_id = limits::card_id("card_id", &device.card_id)?;
        let revocation = match revocation {
            Some(r) => {
                let parsed = ParsedRevocation::parse(r)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if parsed.card_id() != card_id {
                    return Err(Status::invalid_argument(
                        "the revocation is for another card",
                    ));
                }
                parsed.revocation().clone()
            }
            None => sign_revocation(
                card_id,
                RevokedBy::App,
                &self.app_key,
                reason,
                tessera_service::now_secs(),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        let response = self.kms.revoke(&self.issuer, revocation).await?;
        device.status = DeviceStatus::Revoked as i32;
        self.store.put_devices(&[device]).await?;
        self.store.flush().await?;
        tracing::info!(%card_id, "device revoked");
        Ok(response)
    }

    fn require_admin(&self, caller: &Caller) -> Result<(), Status> {
        if !caller.is_admin() {
            return Err(Status::permission_denied("admin only"));
        }
        Ok(())
    }

    fn org_identity(&self) -> Result<&str, Status> {
        self.config.org_identity.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "this server has no organisation (start it with --org-identity)",
            )
        })
    }
}

#[tonic::async_trait]
impl Devices for DevicesService {
    async fn enroll_device(
        &self,
        request: Request<EnrollDeviceRequest>,
    ) -> Result<Response<EnrollDeviceResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        // A device-login token, or a token another service could have
        // captured, never enrolls a device: only the password, just given.
        if !caller.password_login_within(FRESH_PASSWORD_SECS) {
            return Err(Status::unauthenticated(format!(
                "enrolling a device needs a password log-in less than {} minutes old: log in with the password again",
                FRESH_PASSWORD_SECS / 60
            )));
        }
        let r = request.into_inner();
        let parsed = parse_self_signed(r.card, CardKind::Client)?;
        if parsed.identity() != caller.identity {
            return Err(Status::permission_denied(format!(
                "{} cannot enroll a card for {}",
                caller.identity,
                parsed.identity()
            )));
        }
        let statement = r
            .statement
            .map(|s| cosign_statement(s, &parsed, &app.app_key))
            .transpose()?;
        let _user = app.user_lock(&caller.identity).lock().await;
        let mut genesis_of = None;
        if let Some((_, Action::Genesis)) = &statement {
            // A genesis is co-signed once per account: after that, only a
            // reset (reported to contacts as one) replaces the list.
            let account = app
                .store
                .account(&caller.identity)
                .await?
                .ok_or_else(|| Status::not_found("no such account"))?;
            if account.device_list_started {
                return Err(Status::failed_precondition(
                    "this account already has a device list: approve the device from another one, or reset",
                ));
            }
            genesis_of = Some(account);
        }
        let devices = app.store.devices(&caller.identity).await?;
        let id = parsed.id();
        let mut response = if let Some(existing) = devices.iter().find(|d| d.card_id == id.to_vec())
        {
            // Enrolling the same card again returns it as registered.
            if existing.status != DeviceStatus::Active as i32 {
                return Err(Status::failed_precondition(
                    "this card was revoked or replaced: make a new card to enroll this device again",
                ));
            }
            app.kms.get(&app.issuer, &id).await?
        } else {
            let active = devices
                .iter()
                .filter(|d| d.status == DeviceStatus::Active as i32)
                .count();
            limits::check_quota(
                "devices per user",
                active,
                app.config.limits.max_devices_per_user,
            )?;
            let superseded = match parsed.previous_card_id() {
                None => None,
                Some(prev) => Some(
                    devices
                        .into_iter()
                        .find(|d| {
                            d.card_id == prev.to_vec() && d.status == DeviceStatus::Active as i32
                        })
                        .ok_or_else(|| {
                            Status::failed_precondition(format!(
                                "previous card {prev} is not an active device of yours"
                            ))
                        })?,
                ),
            };
            let response = app.vouch_and_register(parsed, superseded, false).await?;
            tracing::info!(identity = %caller.identity, card_id = %id, "device enrolled");
            response
        };
        let statement_logged = statement.is_some();
        if let Some((statement, action)) = statement {
            app.kms.publish(&app.issuer, statement).await?;
            tracing::info!(identity = %caller.identity, card_id = %id, %action, "device list statement published");
            if let Some(account) = genesis_of {
                let started = crate::store::Account {
                    device_list_started: true,
                    ..account.clone()
                };
                if !app.store.replace_account(&account, &started).await? {
                    return Err(Status::aborted("the account changed meanwhile; try again"));
                }
                app.store.flush().await?;
            }
            if action == Action::Reset {
                // Every earlier device was lost: none of them may log in,
                // send or back up any more (a stolen one least of all).
                for other in app.store.devices(&caller.identity).await? {
                    if other.status == DeviceStatus::Active as i32
                        && other.card_id != id.to_vec()
                        && !other.org_card
                    {
                        let other_id = hex::encode(&other.card_id);
                        app.revoke_device(other, None, "replaced by a reset")
                            .await?;
                        tracing::info!(identity = %caller.identity, card_id = %other_id, "device revoked by a reset");
                    }
                }
            }
            // The card again, proven in a checkpoint that has the statement too.
            response = app.kms.get(&app.issuer, &id).await?;
        }
        Ok(Response::new(EnrollDeviceResponse {
            record: response.record,
            checkpoint: response.checkpoint,
            statement_logged,
        }))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let devices = self
            .0
            .store
            .devices(&caller.identity)
            .await?
            .into_iter()
            .filter(|d| !d.org_card)
            .map(|d| PbDevice {
                card_id: d.card_id,
                device_name: d.device_name,
                created_at: d.created_at,
                status: device_status(d.status) as i32,
            })
            .collect();
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn revoke_device(
        &self,
        request: Request<RevokeDeviceRequest>,
    ) -> Result<Response<CardResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        let r = request.into_inner();
        let card_id: CardId = limits::card_id("card_id", &r.card_id)?;
        limits::check_len(
            "reason",
            r.reason.len(),
            tessera_card::revocation::MAX_REASON_LEN,
        )?;
        // A device revokes itself with its own key. Revoking another device
        // with the AppKey is an account change: it needs the password, just
        // given, so a pending or stolen device cannot revoke the others.
        if r.revocation.is_none() && !caller.password_login_within(FRESH_PASSWORD_SECS) {
            return Err(Status::unauthenticated(format!(
                "revoking another device needs a password log-in less than {} minutes old (a device revokes itself with a revocation signed by its own key)",
                FRESH_PASSWORD_SECS / 60
            )));
        }
        let _user = app.user_lock(&caller.identity).lock().await;
        let device = app
            .store
            .device(card_id.as_bytes())
            .await?
            .filter(|d| d.identity == caller.identity && !d.org_card)
            .ok_or_else(|| {
                Status::permission_denied(format!("{card_id} is not one of your devices"))
            })?;
        Ok(Response::new(
            app.revoke_device(device, r.revocation, &r.reason).await?,
        ))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn register_org_card(
        &self,
        request: Request<RegisterOrgCardRequest>,
    ) -> Result<Response<CardResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        app.require_admin(&caller)?;
        let org = app.org_identity()?.to_owned();
        let parsed = parse_self_signed(request.into_inner().card, CardKind::Org)?;
        if parsed.identity() != org {
            return Err(Status::invalid_argument(format!(
                "the organisation's card must be for {org:?}, not {:?}",
                parsed.identity()
            )));
        }
        let _org = app.user_lock(&org).lock().await;
        let superseded = match parsed.previous_card_id() {
            None => None,
            Some(prev) => app
                .store
                .device(prev.as_bytes())
                .await?
                .filter(|d| d.org_card),
        };
        let id = parsed.id();
        let response = app.vouch_and_register(parsed, superseded, true).await?;
        tracing::info!(%org, card_id = %id, by = %caller.identity, "org card registered");
        Ok(Response::new(response))
    }

    async fn set_org_member(
        &self,
        request: Request<SetOrgMemberRequest>,
    ) -> Result<Response<SetOrgMemberResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        app.require_admin(&caller)?;
        app.org_identity()?;
        let r = request.into_inner();
        limits::identity("identity", &r.identity)?;
        if app.store.account(&r.identity).await?.is_none() {
            return Err(Status::not_found(format!("no user {:?}", r.identity)));
        }
        app.store.set_org_member(&r.identity, r.member).await?;
        app.store.flush().await?;
        tracing::info!(identity = %r.identity, member = r.member, by = %caller.identity, "org membership changed");
        Ok(Response::new(SetOrgMemberResponse {
            members: app.store.org_members().await?,
        }))
    }

    async fn list_org_members(
        &self,
        request: Request<ListOrgMembersRequest>,
    ) -> Result<Response<ListOrgMembersResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        app.require_admin(&caller)?;
        Ok(Response::new(ListOrgMembersResponse {
            org_identity: app.org_identity()?.to_owned(),
            members: app.store.org_members().await?,
        }))
    }

    async fn admin_revoke_device(
        &self,
        request: Request<AdminRevokeDeviceRequest>,
    ) -> Result<Response<CardResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        app.require_admin(&caller)?;
        let r = request.into_inner();
        let card_id = limits::card_id("card_id", &r.card_id)?;
        limits::check_len(
            "reason",
            r.reason.len(),
            tessera_card::revocation::MAX_REASON_LEN,
        )?;
        let device = app
            .store
            .device(card_id.as_bytes())
            .await?
            .ok_or_else(|| Status::not_found(format!("no device {card_id}")))?;
        let _user = app.user_lock(&device.identity).lock().await;
        Ok(Response::new(
            app.revoke_device(device, None, &r.reason).await?,
        ))
    }
}
