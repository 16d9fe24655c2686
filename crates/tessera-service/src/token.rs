//! Access tokens: issued by the app server, checked offline by every service
//! with the server's token public key.
//!
//! A token is an `AccessToken { claims, signature }` whose signature is
//! Ed25519 (label `tessera/v1/token`) over the exact `TokenClaims` bytes. It
//! travels as `authorization: Bearer <lowercase hex of the AccessToken>`.
//!
//! A token names exactly one audience, and each service accepts only its
//! own: a token shown to the key service or the backup service is useless at
//! the app server. It also says how its subject logged in (password, device
//! signature, service), so the app server can ask for a fresh password
//! log-in where a device-login token must not suffice.

use std::{fmt, time::Duration};

use tessera_card::CardId;
use tessera_crypto::{SignatureContext, SigningKey, VerifyingKey, random_array};
use tessera_proto::{
    Message as _,
    auth::v1::{AccessToken, AuthMethod as PbAuthMethod, Role as PbRole, TokenClaims},
};
use thiserror::Error;
use tonic::{Request, Status};

/// The one service a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Kms,
    Server,
    Backup,
}

impl Audience {
    /// The `audience` claim: "kms", "server" or "backup".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kms => "kms",
            Self::Server => "server",
            Self::Backup => "backup",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "kms" => Some(Self::Kms),
            "server" => Some(Self::Server),
            "backup" => Some(Self::Backup),
            _ => None,
        }
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a token's subject proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// The account password.
    Password,
    /// A device signing a challenge with its ClientKey.
    Device,
    /// A service (the app server itself, or the backup service with the OrgKey).
    Service,
}

impl AuthMethod {
    fn to_proto(self) -> PbAuthMethod {
        match self {
            Self::Password => PbAuthMethod::Password,
            Self::Device => PbAuthMethod::Device,
            Self::Service => PbAuthMethod::Service,
        }
    }
}

/// Version of the token claims (2: one audience and the log-in method).
const VERSION: u32 = 2;
/// Longest `authorization` header accepted.
const MAX_HEADER_LEN: usize = 4096;
/// Clock skew tolerated between services, in seconds.
const SKEW_SECS: i64 = 60;

/// What the token's subject may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Admin,
    /// The app server calling the key service.
    Service,
    /// The organisation's backup service, logged in with the OrgKey.
    Backup,
}

impl Role {
    fn to_proto(self) -> PbRole {
        match self {
            Self::User => PbRole::User,
            Self::Admin => PbRole::Admin,
            Self::Service => PbRole::Service,
            Self::Backup => PbRole::Backup,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    #[error("missing access token: send `authorization: Bearer <token>` (log in first)")]
    Missing,
    #[error("malformed access token")]
    Malformed,
    #[error("access token signature does not verify")]
    BadSignature,
    #[error("access token expired; log in again")]
    Expired,
    #[error("access token is not meant for this service: get a token for it from the app server")]
    WrongAudience,
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Self {
        Status::unauthenticated(e.to_string())
    }
}

/// A freshly issued token.
pub struct IssuedToken {
    /// Encoded `AccessToken`.
    pub bytes: Vec<u8>,
    pub expires_at: i64,
}

/// Who a token is for and how they logged in (everything but the audience
/// and the times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: String,
    pub role: Role,
    /// The card of a device that logged in by signature.
    pub device_card_id: Option<CardId>,
    pub org_member: bool,
    pub auth: AuthMethod,
}

impl Grant {
    /// A service's own grant (the app server calling the key service).
    pub fn service(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            role: Role::Service,
            device_card_id: None,
            org_member: false,
            auth: AuthMethod::Service,
        }
    }

    /// A plain user's grant, not a member of the organisation.
    pub fn user(subject: &str, auth: AuthMethod) -> Self {
        Self {
            subject: subject.to_owned(),
            role: Role::User,
            device_card_id: None,
            org_member: false,
            auth,
        }
    }
}

/// Issues tokens (the app server).
pub struct TokenIssuer {
    key: SigningKey,
    lifetime: Duration,
}

impl TokenIssuer {
    pub fn new(key: SigningKey, lifetime: Duration) -> Self {
        Self { key, lifetime }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// A token for `grant`, valid at `audience` only.
    pub fn issue(
        &self,
        grant: &Grant,
        audience: Audience,
    ) -> Result<IssuedToken, tessera_crypto::KeyError> {
        self.issue_at(crate::now_secs(), grant, audience, i64::MAX)
    }

    /// A token for `grant` at `audience` that expires no later than
    /// `not_after` (a token traded for another never outlives it).
    pub fn issue_until(
        &self,
        grant: &Grant,
        audience: Audience,
        not_after: i64,
    ) -> Result<IssuedToken, tessera_crypto::KeyError> {
        self.issue_at(crate::now_secs(), grant, audience, not_after)
    }

    fn issue_at(
        &self,
        now: i64,
        grant: &Grant,
        audience: Audience,
        not_after: i64,
    ) -> Result<IssuedToken, tessera_crypto::KeyError> {
        let expires_at = (now + self.lifetime.as_secs() as i64).min(not_after);
        let claims = TokenClaims {
            version: VERSION,
            subject: grant.subject.clone(),
            device_card_id: grant
                .device_card_id
                .map(|id| id.to_vec())
                .unwrap_or_default(),
            issued_at: now,
            expires_at,
            role: grant.role.to_proto() as i32,
            token_id: random_array::<16>()?.to_vec(),
            org_member: grant.org_member,
            audience: audience.as_str().to_owned(),
            auth: grant.auth.to_proto() as i32,
        }
        .encode_to_vec();
        let signature = self.key.sign(SignatureContext::Token, &claims).to_vec();
        Ok(IssuedToken {
            bytes: AccessToken { claims, signature }.encode_to_vec(),
            expires_at,
        })
    }
}

/// The value of the `authorization` header for `token`.
pub fn bearer_header(token: &[u8]) -> String {
    format!("Bearer {}", hex::encode(token))
}

/// Who is calling, from a verified token. Holds no credential: a service
/// never forwards a caller's token.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: String,
    pub role: Role,
    /// Set when the token came from a passwordless device log-in.
    pub device_card_id: Option<CardId>,
    pub org_member: bool,
    pub auth: AuthMethod,
    pub issued_at: i64,
    pub expires_at: i64,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// What the caller's token granted, to issue it a token for another
    /// service.
    pub fn grant(&self) -> Grant {
        Grant {
            subject: self.identity.clone(),
            role: self.role,
            device_card_id: self.device_card_id,
            org_member: self.org_member,
            auth: self.auth,
        }
    }

    /// Whether the caller logged in with the password at most `max_age_secs`
    /// ago (what enrolling a device or resetting an identity needs).
    pub fn password_login_within(&self, max_age_secs: i64) -> bool {
        self.auth == AuthMethod::Password && crate::now_secs() - self.issued_at <= max_age_secs
    }
}

/// Most verified tokens remembered; the cache is emptied when it is full.
const CACHE_ENTRIES: usize = 10_000;

/// Checks tokens for one service. A token verified once is remembered (by
/// its SHA-256) until it expires, so a client's every call does not cost an
/// Ed25519 verification.
#[derive(Clone)]
pub struct TokenVerifier {
    key: VerifyingKey,
    audience: Audience,
    cache: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<[u8; 32], Caller>>>,
}

impl TokenVerifier {
    pub fn new(key: VerifyingKey, audience: Audience) -> Self {
        Self {
            key,
            audience,
            cache: Default::default(),
        }
    }

    /// Verifies an `authorization` header value.
    pub fn verify_header(&self, header: &str) -> Result<Caller, TokenError> {
        let digest = tessera_crypto::sha256(header.as_bytes());
        let now = crate::now_secs();
        if let Some(caller) = self.cache.lock().ok().and_then(|c| c.get(&digest).cloned())
            && caller.expires_at + SKEW_SECS >= now
        {
            return Ok(caller);
        }
        let caller = self.verify_uncached(header)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(digest, caller.clone());
        }
        Ok(caller)
    }

    fn verify_uncached(&self, header: &str) -> Result<Caller, TokenError> {
        if header.len() > MAX_HEADER_LEN {
            return Err(TokenError::Malformed);
        }
        let hex_token = header
            .strip_prefix("Bearer ")
            .ok_or(TokenError::Malformed)?;
        // Exactly as docs/protocol.md says: lowercase hex, nothing around it.
        if hex_token.is_empty()
            || !hex_token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(TokenError::Malformed);
        }
        let bytes = hex::decode(hex_token).map_err(|_| TokenError::Malformed)?;
        let token = AccessToken::decode(bytes.as_slice()).map_err(|_| TokenError::Malformed)?;
        self.key
            .verify(SignatureContext::Token, &token.claims, &token.signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims =
            TokenClaims::decode(token.claims.as_slice()).map_err(|_| TokenError::Malformed)?;
        if claims.version != VERSION {
            return Err(TokenError::Malformed);
        }
        let now = crate::now_secs();
        if claims.expires_at + SKEW_SECS < now || claims.issued_at > now + SKEW_SECS {
            return Err(TokenError::Expired);
        }
        if claims.audience != self.audience.as_str() {
            return Err(TokenError::WrongAudience);
        }
        let auth = match PbAuthMethod::try_from(claims.auth) {
            Ok(PbAuthMethod::Password) => AuthMethod::Password,
            Ok(PbAuthMethod::Device) => AuthMethod::Device,
            Ok(PbAuthMethod::Service) => AuthMethod::Service,
            _ => return Err(TokenError::Malformed),
        };
        let role = match PbRole::try_from(claims.role) {
            Ok(PbRole::User) => Role::User,
            Ok(PbRole::Admin) => Role::Admin,
            Ok(PbRole::Service) => Role::Service,
            Ok(PbRole::Backup) => Role::Backup,
            _ => return Err(TokenError::Malformed),
        };
        let device_card_id = match claims.device_card_id.len() {
            0 => None,
            _ => Some(
                CardId::from_bytes(&claims.device_card_id).map_err(|_| TokenError::Malformed)?,
            ),
        };
        Ok(Caller {
            identity: claims.subject,
            role,
            device_card_id,
            org_member: claims.org_member,
            auth,
            issued_at: claims.issued_at,
            expires_at: claims.expires_at,
        })
    }

    /// The caller of `request`, or `UNAUTHENTICATED`.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or(TokenError::Missing)?
            .to_str()
            .map_err(|_| TokenError::Malformed)?;
        Ok(self.verify_header(header)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(auth: AuthMethod) -> Grant {
        Grant {
            subject: "alice".into(),
            role: Role::User,
            device_card_id: Some(CardId::of_snapshot(b"card")),
            org_member: true,
            auth,
        }
    }

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
        let verifier = TokenVerifier::new(issuer.public_key(), Audience::Kms);
        let t = issuer
            .issue(&grant(AuthMethod::Device), Audience::Kms)
            .unwrap();
        let caller = verifier.verify_header(&bearer_header(&t.bytes)).unwrap();
        assert_eq!(caller.identity, "alice");
        assert_eq!(caller.device_card_id, Some(CardId::of_snapshot(b"card")));
        assert_eq!(caller.auth, AuthMethod::Device);
        assert_eq!(caller.grant(), grant(AuthMethod::Device));
        assert!(caller.org_member);
        assert!(!caller.is_admin());
        assert!(!caller.password_login_within(300));

        let other = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
        let mut admin = grant(AuthMethod::Password);
        admin.role = Role::Admin;
        let forged = other.issue(&admin, Audience::Kms).unwrap();
        assert_eq!(
            verifier
                .verify_header(&bearer_header(&forged.bytes))
                .unwrap_err(),
            TokenError::BadSignature
        );
        assert_eq!(
            verifier.verify_header("Bearer zz").unwrap_err(),
            TokenError::Malformed
        );
        assert_eq!(
            verifier.verify_header("Basic abc").unwrap_err(),
            TokenError::Malformed
        );
        assert_eq!(
            verifier.verify_header(&"x".repeat(10_000)).unwrap_err(),
            TokenError::Malformed
        );

        let old = issuer
            .issue_at(
                crate::now_secs() - 3600,
                &grant(AuthMethod::Password),
                Audience::Kms,
                i64::MAX,
            )
            .unwrap();
        assert_eq!(
            verifier
                .verify_header(&bearer_header(&old.bytes))
                .unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn a_token_works_at_its_one_service_only() {
        let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
        let at = |a| TokenVerifier::new(issuer.public_key(), a);
        for audience in [Audience::Kms, Audience::Server, Audience::Backup] {
            let t = issuer.issue(&grant(AuthMethod::Device), audience).unwrap();
            let header = bearer_header(&t.bytes);
            for service in [Audience::Kms, Audience::Server, Audience::Backup] {
                let result = at(service).verify_header(&header);
                if service == audience {
                    assert!(result.is_ok(), "{audience} token at {service}: {result:?}");
                } else {
                    assert_eq!(result.unwrap_err(), TokenError::WrongAudience);
                }
            }
        }
    }

    #[test]
    fn password_freshness_and_traded_tokens() {
        let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(900));
        let server = TokenVerifier::new(issuer.public_key(), Audience::Server);
        let fresh = issuer
            .issue(&grant(AuthMethod::Password), Audience::Server)
            .unwrap();
        let caller = server.verify_header(&bearer_header(&fresh.bytes)).unwrap();
        assert!(caller.password_login_within(300));
        let stale = issuer
            .issue_at(
                crate::now_secs() - 301,
                &grant(AuthMethod::Password),
                Audience::Server,
                i64::MAX,
            )
            .unwrap();
        let caller = server.verify_header(&bearer_header(&stale.bytes)).unwrap();
        assert!(!caller.password_login_within(300));
        // A traded token never outlives the one it was traded for.
        let capped = issuer
            .issue_until(
                &grant(AuthMethod::Device),
                Audience::Kms,
                caller.expires_at - 10,
            )
            .unwrap();
        assert_eq!(capped.expires_at, caller.expires_at - 10);
    }
}
