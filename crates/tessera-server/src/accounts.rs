//! Accounts: sign-up, password log-in (throttled), passwordless log-in by
//! device signature, and the server's public keys.

use std::{sync::Arc, time::Duration};

use tessera_card::{CardKind, ParsedCard, transparency};
use tessera_crypto::{SignatureContext, random_array};
use tessera_proto::{
    kms::v1::CardStatus,
    server::v1::{
        BeginDeviceLoginRequest, BeginDeviceLoginResponse, FinishDeviceLoginRequest,
        GetServerInfoRequest, GetServerInfoResponse, IssueTokenRequest, Limits as PbLimits,
        LoginRequest, LoginResponse, SignUpRequest, WhoAmIRequest, WhoAmIResponse,
        accounts_server::Accounts,
    },
};
use tessera_service::{
    limits,
    token::{Audience, AuthMethod, Grant, Role},
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::{
    App, challenges,
    kms_client::SERVICE_SUBJECT,
    passwords,
    store::{Account, DeviceStatus},
};

pub(crate) struct AccountsService(pub(crate) Arc<App>);

const MIN_PASSWORD_BYTES: usize = 8;

impl App {
    /// A log-in answer with a fresh app-server token for a user.
    pub(crate) async fn login_response(
        &self,
        identity: &str,
        device: Option<tessera_card::CardId>,
    ) -> Result<LoginResponse, Status> {
        let admin = self.store.account(identity).await?.is_some_and(|a| a.admin);
        let grant = Grant {
            subject: identity.to_owned(),
            role: if admin { Role::Admin } else { Role::User },
            device_card_id: device,
            org_member: self.is_org_member(identity).await?,
            auth: if device.is_some() {
                AuthMethod::Device
            } else {
                AuthMethod::Password
            },
        };
        self.token_response(&grant, Audience::Server, i64::MAX)
    }

    /// A token for `grant` at `audience`, expiring no later than `not_after`.
    pub(crate) fn token_response(
        &self,
        grant: &Grant,
        audience: Audience,
        not_after: i64,
    ) -> Result<LoginResponse, Status> {
        let token = self
            .issuer
            .issue_until(grant, audience, not_after)
            .map_err(|_| Status::internal("cannot issue a token"))?;
        Ok(LoginResponse {
            access_token: token.bytes,
            expires_at: token.expires_at,
            identity: grant.subject.clone(),
            admin: grant.role == Role::Admin,
            org_member: grant.org_member,
            audience: audience.as_str().to_owned(),
        })
    }

    /// Creates an admin account (the operator's own act, never a sign-up);
    /// `Ok(false)` when that admin exists already (its password is kept).
    pub(crate) async fn create_admin(
        &self,
        identity: &str,
        password: &str,
    ) -> Result<bool, Status> {
        limits::identity("identity", identity)?;
        self.check_password_shape(password)?;
        self.check_not_reserved(identity)?;
        if let Some(existing) = self.store.account(identity).await? {
            if existing.admin {
                return Ok(false);
            }
            // An existing account becomes admin only if the operator knows
            // its password: someone who signed up first under the name the
            // operator meant to use is found out here, not promoted.
            let stored = existing.password.clone();
            let given = Zeroizing::new(password.to_owned());
            let theirs = hash_limited(self, move || {
                stored.is_some_and(|h| passwords::verify(&given, &h))
            })
            .await?;
            if !theirs {
                return Err(Status::already_exists(format!(
                    "{identity:?} is an account with another password: someone else may have signed up under this name; pick another for the admin"
                )));
            }
            let promoted = Account {
                admin: true,
                ..existing.clone()
            };
            if !self.store.replace_account(&existing, &promoted).await? {
                return Err(Status::aborted("the account changed meanwhile; try again"));
            }
            self.store.flush().await?;
            tracing::info!(%identity, "account made admin by the operator");
            return Ok(true);
        }
        self.create_account(identity, password, true).await?;
        tracing::info!(%identity, "admin account created by the operator");
        Ok(true)
    }

    /// Hashes `password` (in a hashing slot) and stores a new account,
    /// durably; ALREADY_EXISTS when the identity is taken.
    async fn create_account(
        &self,
        identity: &str,
        password: &str,
        admin: bool,
    ) -> Result<(), Status> {
        let params = self.config.password_params;
        let password = Zeroizing::new(password.to_owned());
        let hash = hash_limited(self, move || passwords::hash(&password, params))
            .await?
            .ok_or_else(|| Status::internal("password hashing failed"))?;
        let account = Account {
            identity: identity.to_owned(),
            password: Some(hash),
            created_at: tessera_service::now_secs(),
            admin,
            device_list_started: false,
        };
        if !self.store.create_account(&account).await? {
            return Err(Status::already_exists(format!(
                "identity {identity:?} is taken"
            )));
        }
        self.store.flush().await?;
        Ok(())
    }

    fn check_not_reserved(&self, identity: &str) -> Result<(), Status> {
        if identity == SERVICE_SUBJECT || self.config.org_identity.as_deref() == Some(identity) {
            return Err(Status::already_exists(format!(
                "identity {identity:?} is reserved"
            )));
        }
        Ok(())
    }

    fn check_password_shape(&self, password: &str) -> Result<(), Status> {
        limits::check_len(
            "password",
            password.len(),
            self.config.limits.max_password_bytes,
        )?;
        if password.len() < MIN_PASSWORD_BYTES {
            return Err(Status::invalid_argument(format!(
                "password must be at least {MIN_PASSWORD_BYTES} bytes"
            )));
        }
        Ok(())
    }
}

/// Runs a password hash on the blocking pool, holding one of the limited
/// hashing slots; RESOURCE_EXHAUSTED (retry in a second) when none is free.
async fn hash_limited<T: Send + 'static>(
    app: &App,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let Some(slot) = app.hashes.slot().await else {
        return Err(limits::exhausted_retry(
            "too many password checks in progress",
            Duration::from_secs(1),
        ));
    };
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Status::internal("password hashing task failed"));
    drop(slot);
    result
}

fn throttled(what: &str, wait_secs: u64) -> Status {
    limits::exhausted_retry(what, Duration::from_secs(wait_secs))
}

#[tonic::async_trait]
impl Accounts for AccountsService {
    async fn get_server_info(
        &self,
        _request: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        let l = &self.0.config.limits;
        Ok(Response::new(GetServerInfoResponse {
            app_public_key: self.0.app_key.verifying_key().as_bytes().to_vec(),
            token_public_key: self.0.issuer.public_key().as_bytes().to_vec(),
            org_identity: self.0.config.org_identity.clone().unwrap_or_default(),
            limits: Some(PbLimits {
                max_members_per_channel: l.max_members_per_channel as u32,
                max_channels_per_user: l.max_channels_per_user as u32,
                max_envelope_bytes: l.max_envelope_bytes as u32,
                max_page_size: l.max_page_size,
                max_devices_per_user: l.max_devices_per_user as u32,
                max_attachment_bytes: l.max_attachment_bytes,
            }),
        }))
    }

    async fn sign_up(
        &self,
        request: Request<SignUpRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let app = &self.0;
        let peer = request.remote_addr().map(|a| a.ip());
        let SignUpRequest { identity, password } = request.into_inner();
        limits::identity("identity", &identity)?;
        app.check_password_shape(&password)?;
        app.check_not_reserved(&identity)?;
        app.throttle
            .reserve_signup(peer)
            .map_err(|wait| throttled("too many sign-ups from your address", wait))?;
        app.create_account(&identity, &password, false).await?;
        tracing::info!(%identity, "account created");
        Ok(Response::new(app.login_response(&identity, None).await?))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let app = self.0.clone();
        let peer = request.remote_addr().map(|a| a.ip());
        let LoginRequest { identity, password } = request.into_inner();
        limits::identity("identity", &identity)?;
        limits::check_len(
            "password",
            password.len(),
            app.config.limits.max_password_bytes,
        )?;
        // The attempt counts from here on; only a right password gives it back.
        let reservation = app
            .throttle
            .reserve(&identity, peer)
            .map_err(|wait| throttled("too many failed log-ins", wait))?;
        let stored = app.store.account(&identity).await?.and_then(|a| a.password);
        let params = app.config.password_params;
        let ok = hash_limited(&app, move || match stored {
            Some(hash) => passwords::verify(&password, &hash),
            None => {
                passwords::verify_dummy(&password, params);
                false
            }
        })
        .await?;
        if !ok {
            tracing::info!(%identity, "failed log-in");
            return Err(Status::unauthenticated("wrong identity or password"));
        }
        app.throttle.succeeded(&identity, reservation);
        Ok(Response::new(app.login_response(&identity, None).await?))
    }

    async fn begin_device_login(
        &self,
        request: Request<BeginDeviceLoginRequest>,
    ) -> Result<Response<BeginDeviceLoginResponse>, Status> {
        let app = &self.0;
        let peer = request.remote_addr().map(|a| a.ip());
        let r = request.into_inner();
        limits::identity("identity", &r.identity)?;
        let card_id = limits::card_id("card_id", &r.card_id)?;
        match app.store.device(card_id.as_bytes()).await? {
            // A user's device, or the organisation's card (the backup
            // service logging in with the OrgKey).
            Some(d) if d.identity == r.identity && d.status == DeviceStatus::Active as i32 => {}
            _ => {
                return Err(Status::permission_denied(format!(
                    "{card_id} is not an active device of {}",
                    r.identity
                )));
            }
        }
        let challenge =
            random_array::<32>().map_err(|_| Status::internal("random number generator failed"))?;
        app.challenges
            .insert(challenge, &r.identity, card_id, peer)
            .map_err(|refused| match refused {
                challenges::Refused::Identity(wait) => throttled(
                    "too many device log-ins in progress for this identity",
                    wait,
                ),
                challenges::Refused::Peer(wait) => throttled(
                    "too many device log-ins in progress from your address",
                    wait,
                ),
                challenges::Refused::Full(wait) => {
                    throttled("too many device log-ins in progress", wait)
                }
            })?;
        Ok(Response::new(BeginDeviceLoginResponse {
            challenge: challenge.to_vec(),
            expires_at: tessera_service::now_secs() + app.challenges.ttl().as_secs() as i64,
        }))
    }

    async fn finish_device_login(
        &self,
        request: Request<FinishDeviceLoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let app = &self.0;
        let r = request.into_inner();
        limits::identity("identity", &r.identity)?;
        let card_id = limits::card_id("card_id", &r.card_id)?;
        if !app.challenges.take(&r.challenge, &r.identity, &card_id) {
            return Err(Status::unauthenticated(
                "unknown, used or expired challenge: begin the device log-in again",
            ));
        }
        // The key service is the authority on the card and its status.
        let record = app
            .kms
            .get(&app.issuer, &card_id)
            .await?
            .record
            .ok_or_else(|| Status::internal("key service answered without a record"))?;
        if record.status != CardStatus::Active as i32 {
            return Err(Status::permission_denied(format!(
                "card {card_id} is revoked or replaced"
            )));
        }
        let card = transparency::registered_card(&record.registration_entry)
            .and_then(ParsedCard::parse)
            .map_err(|e| Status::internal(format!("key service returned a bad card: {e}")))?;
        if card.id() != card_id {
            return Err(Status::internal("key service returned another card"));
        }
        let org = app.config.org_identity.as_deref();
        let is_org = card.kind() == CardKind::Org && org == Some(card.identity());
        if card.identity() != r.identity || !(card.kind() == CardKind::Client || is_org) {
            return Err(Status::permission_denied(
                "the card is not a device of this identity",
            ));
        }
        let still_active = app
            .store
            .device(card_id.as_bytes())
            .await?
            .is_some_and(|d| d.status == DeviceStatus::Active as i32);
        if !still_active {
            return Err(Status::permission_denied(format!(
                "card {card_id} is revoked"
            )));
        }
        card.signing_key()
            .verify(
                SignatureContext::DeviceLogin,
                &tessera_card::device_login_message(&r.challenge, &r.identity, &card_id),
                &r.signature,
            )
            .map_err(|_| Status::unauthenticated("the challenge signature does not verify"))?;
        if is_org {
            // The backup service: a credential of its own, never a user's.
            let grant = Grant {
                subject: r.identity.clone(),
                role: Role::Backup,
                device_card_id: Some(card_id),
                org_member: false,
                auth: AuthMethod::Service,
            };
            tracing::info!(org = %r.identity, "backup service logged in with the OrgKey");
            return Ok(Response::new(app.token_response(
                &grant,
                Audience::Server,
                i64::MAX,
            )?));
        }
        Ok(Response::new(
            app.login_response(&r.identity, Some(card_id)).await?,
        ))
    }

    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let app = &self.0;
        let caller = app.authenticate(&request).await?;
        let audience = match Audience::parse(&request.get_ref().audience) {
            Some(a @ (Audience::Kms | Audience::Backup)) => a,
            Some(Audience::Server) => {
                return Err(Status::invalid_argument(
                    "app-server tokens come from a log-in only",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "audience must be \"kms\" or \"backup\"",
                ));
            }
        };
        // Membership may have changed since the log-in: ask again.
        let mut grant = caller.grant();
        if caller.role == Role::User || caller.role == Role::Admin {
            grant.org_member = app.is_org_member(&caller.identity).await?;
        }
        Ok(Response::new(app.token_response(
            &grant,
            audience,
            caller.expires_at,
        )?))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(WhoAmIResponse {
            org_member: self.0.is_org_member(&caller.identity).await?,
            org_identity: self.0.config.org_identity.clone().unwrap_or_default(),
            device_card_id: caller
                .device_card_id
                .map(|id| id.to_vec())
                .unwrap_or_default(),
            admin: caller.is_admin(),
            identity: caller.identity,
        }))
    }
}
