//! Access tokens: issued by the app server, checked offline by every service
//! with the server's token public key.
//!
//! A token is an `AccessToken { claims, signature }` whose signature is
//! Ed25519 (label `tessera/v1/token`) over the exact `TokenClaims` bytes. It
//! travels as `authorization: Bearer <lowercase hex of the AccessToken>`.

use std::{fmt, time::Duration};

use tessera_card::CardId;
use tessera_crypto::{SignatureContext, SigningKey, VerifyingKey, random_array};
use tessera_proto::{
    Message as _,
    auth::v1::{AccessToken, Role as PbRole, TokenClaims},
};
use thiserror::Error;
use tonic::{Request, Status};

/// Audience of the key service.
pub const AUDIENCE_KMS: &str = "kms";
/// Audience of the app server.
pub const AUDIENCE_SERVER: &str = "server";
/// Audience of the backup service.
pub const AUDIENCE_BACKUP: &str = "backup";

const VERSION: u32 = 1;
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
}

impl Role {
    fn to_proto(self) -> PbRole {
        match self {
            Self::User => PbRole::User,
            Self::Admin => PbRole::Admin,
            Self::Service => PbRole::Service,
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
    #[error("access token is not meant for this service")]
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

    /// A token for `subject`, valid at every service.
    pub fn issue(
        &self,
        subject: &str,
        role: Role,
        device_card_id: Option<CardId>,
        org_member: bool,
    ) -> Result<IssuedToken, tessera_crypto::KeyError> {
        self.issue_at(crate::now_secs(), subject, role, device_card_id, org_member)
    }

    fn issue_at(
        &self,
        now: i64,
        subject: &str,
        role: Role,
        device_card_id: Option<CardId>,
        org_member: bool,
    ) -> Result<IssuedToken, tessera_crypto::KeyError> {
        let expires_at = now + self.lifetime.as_secs() as i64;
        let claims = TokenClaims {
            version: VERSION,
            subject: subject.to_owned(),
            device_card_id: device_card_id.map(|id| id.to_vec()).unwrap_or_default(),
            issued_at: now,
            expires_at,
            audiences: vec![
                AUDIENCE_KMS.into(),
                AUDIENCE_SERVER.into(),
                AUDIENCE_BACKUP.into(),
            ],
            role: role.to_proto() as i32,
            token_id: random_array::<16>()?.to_vec(),
            org_member,
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

/// Who is calling, from a verified token.
#[derive(Clone)]
pub struct Caller {
    pub identity: String,
    pub role: Role,
    /// Set when the token came from a passwordless device log-in.
    pub device_card_id: Option<CardId>,
    pub org_member: bool,
    pub expires_at: i64,
    header: String,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token itself is a bearer credential: never printed.
        f.debug_struct("Caller")
            .field("identity", &self.identity)
            .field("role", &self.role)
            .field("device_card_id", &self.device_card_id)
            .finish_non_exhaustive()
    }
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The `authorization` header the caller sent, to call another service
    /// on the caller's behalf (the backup service asking the app server).
    pub fn authorization_header(&self) -> &str {
        &self.header
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
    audience: &'static str,
    cache: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<[u8; 32], Caller>>>,
}

impl TokenVerifier {
    pub fn new(key: VerifyingKey, audience: &'static str) -> Self {
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
        if !claims.audiences.iter().any(|a| a == self.audience) {
            return Err(TokenError::WrongAudience);
        }
        let role = match PbRole::try_from(claims.role) {
            Ok(PbRole::User) => Role::User,
            Ok(PbRole::Admin) => Role::Admin,
            Ok(PbRole::Service) => Role::Service,
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
            expires_at: claims.expires_at,
            header: header.to_owned(),
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

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
        let verifier = TokenVerifier::new(issuer.public_key(), AUDIENCE_KMS);
        let card = CardId::of_snapshot(b"card");
        let t = issuer.issue("alice", Role::User, Some(card), true).unwrap();
        let caller = verifier.verify_header(&bearer_header(&t.bytes)).unwrap();
        assert_eq!(caller.identity, "alice");
        assert_eq!(caller.device_card_id, Some(card));
        assert!(caller.org_member);
        assert!(!caller.is_admin());

        let other = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
        let forged = other.issue("alice", Role::Admin, None, false).unwrap();
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
            .issue_at(crate::now_secs() - 3600, "alice", Role::User, None, false)
            .unwrap();
        assert_eq!(
            verifier
                .verify_header(&bearer_header(&old.bytes))
                .unwrap_err(),
            TokenError::Expired
        );
    }
}
