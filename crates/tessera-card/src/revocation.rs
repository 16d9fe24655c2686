//! Revocation records: signed by the revoked card's own key, or by the AppKey.

use std::fmt;

use tessera_crypto::{SignatureContext, SigningKey, VerifyingKey};
use tessera_proto::{
    Message as _,
    card::v1::{self as pb, RevocationContent},
};

use crate::{CardError, CardId, ParsedCard, VERSION};

/// Longest revocation reason, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// Who signed a revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    /// The revoked card's own key.
    SelfKey,
    /// The AppKey.
    App,
}

impl RevokedBy {
    fn to_proto(self) -> pb::RevokedBy {
        match self {
            Self::SelfKey => pb::RevokedBy::Self_,
            Self::App => pb::RevokedBy::App,
        }
    }
}

impl fmt::Display for RevokedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SelfKey => "its own key",
            Self::App => "the app",
        })
    }
}

/// Makes a revocation of `card_id` signed by `key`, which must be the card's
/// own key (`RevokedBy::SelfKey`) or the AppKey (`RevokedBy::App`).
pub fn sign_revocation(
    card_id: CardId,
    by: RevokedBy,
    key: &SigningKey,
    reason: &str,
    revoked_at: i64,
) -> Result<pb::Revocation, CardError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(CardError::MalformedRevocation(
            "reason longer than 256 bytes",
        ));
    }
    let content_snapshot = RevocationContent {
        version: VERSION,
        card_id: card_id.to_vec(),
        revoked_by: by.to_proto() as i32,
        revoked_at,
        reason: reason.to_owned(),
    }
    .encode_to_vec();
    let signature = key
        .sign(SignatureContext::Revocation, &content_snapshot)
        .to_vec();
    Ok(pb::Revocation {
        content_snapshot,
        signature,
    })
}

/// A revocation whose content parsed; check it with [`ParsedRevocation::verify`].
#[derive(Clone, Debug)]
pub struct ParsedRevocation {
    revocation: pb::Revocation,
    card_id: CardId,
    revoked_by: RevokedBy,
    revoked_at: i64,
    reason: String,
}

impl ParsedRevocation {
    pub fn parse(revocation: pb::Revocation) -> Result<Self, CardError> {
        let content = RevocationContent::decode(revocation.content_snapshot.as_slice())
            .map_err(|_| CardError::MalformedRevocation("not a RevocationContent"))?;
        if content.version != VERSION {
            return Err(CardError::UnsupportedVersion(content.version));
        }
        let card_id = CardId::from_bytes(&content.card_id)
            .map_err(|_| CardError::MalformedRevocation("card id must be 32 bytes"))?;
        let revoked_by = match pb::RevokedBy::try_from(content.revoked_by) {
            Ok(pb::RevokedBy::Self_) => RevokedBy::SelfKey,
            Ok(pb::RevokedBy::App) => RevokedBy::App,
            _ => return Err(CardError::MalformedRevocation("unknown signer")),
        };
        if content.reason.len() > MAX_REASON_LEN {
            return Err(CardError::MalformedRevocation(
                "reason longer than 256 bytes",
            ));
        }
        if revocation.signature.len() != tessera_crypto::SIGNATURE_LEN {
            return Err(CardError::BadRevocationSignature);
        }
        Ok(Self {
            revocation,
            card_id,
            revoked_by,
            revoked_at: content.revoked_at,
            reason: content.reason,
        })
    }

    /// Checks that this revokes `card` and is signed by the card's own key
    /// or by `app_key`, as the record says.
    pub fn verify(&self, card: &ParsedCard, app_key: &VerifyingKey) -> Result<(), CardError> {
        if self.card_id != card.id() {
            return Err(CardError::RevocationCardMismatch);
        }
        let key = match self.revoked_by {
            RevokedBy::SelfKey => card.signing_key(),
            RevokedBy::App => app_key,
        };
        key.verify(
            SignatureContext::Revocation,
            &self.revocation.content_snapshot,
            &self.revocation.signature,
        )
        .map_err(|_| CardError::BadRevocationSignature)
    }

    pub fn card_id(&self) -> CardId {
        self.card_id
    }
    pub fn revoked_by(&self) -> RevokedBy {
        self.revoked_by
    }
    pub fn revoked_at(&self) -> i64 {
        self.revoked_at
    }
    pub fn reason(&self) -> &str {
        &self.reason
    }
    pub fn revocation(&self) -> &pb::Revocation {
        &self.revocation
    }
}

#[cfg(test)]
mod tests {
    use tessera_crypto::DeviceKeys;

    use super::*;
    use crate::{CardKind, NewCard};

    fn card() -> (DeviceKeys, ParsedCard) {
        let keys = DeviceKeys::generate().unwrap();
        let card = NewCard {
            identity: "alice",
            kind: CardKind::Client,
            device_name: "old phone",
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        (keys, ParsedCard::parse(card).unwrap())
    }

    #[test]
    fn self_and_app_revocations_verify() {
        let (keys, card) = card();
        let app = SigningKey::generate().unwrap();
        let r = sign_revocation(card.id(), RevokedBy::SelfKey, &keys.signing, "lost", 10).unwrap();
        let parsed = ParsedRevocation::parse(r).unwrap();
        parsed.verify(&card, &app.verifying_key()).unwrap();
        assert_eq!(parsed.reason(), "lost");

        let r = sign_revocation(card.id(), RevokedBy::App, &app, "admin", 11).unwrap();
        ParsedRevocation::parse(r)
            .unwrap()
            .verify(&card, &app.verifying_key())
            .unwrap();
    }

    #[test]
    fn strangers_cannot_revoke() {
        let (_, card) = card();
        let app = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        for by in [RevokedBy::SelfKey, RevokedBy::App] {
            let r = sign_revocation(card.id(), by, &stranger, "", 0).unwrap();
            assert_eq!(
                ParsedRevocation::parse(r)
                    .unwrap()
                    .verify(&card, &app.verifying_key()),
                Err(CardError::BadRevocationSignature)
            );
        }
        let (other_keys, other) = self::card();
        let r =
            sign_revocation(other.id(), RevokedBy::SelfKey, &other_keys.signing, "", 0).unwrap();
        assert_eq!(
            ParsedRevocation::parse(r)
                .unwrap()
                .verify(&card, &app.verifying_key()),
            Err(CardError::RevocationCardMismatch)
        );
    }
}
