//! The card verifier: the only way to a [`VerifiedCard`].

use std::fmt;

use tessera_crypto::{EncryptionPublicKey, VerifyingKey};
use tessera_proto::card::v1 as pb;

use crate::{CardError, CardId, CardKind, ParsedCard, SignatureRole};

/// Holds the pinned AppKey and key-service public keys and checks cards
/// against them (the seed's automatic card verification).
#[derive(Clone, Debug)]
pub struct Verifier {
    app_key: VerifyingKey,
    kms_key: VerifyingKey,
}

impl Verifier {
    pub fn new(app_key: VerifyingKey, kms_key: VerifyingKey) -> Self {
        Self { app_key, kms_key }
    }

    pub fn app_key(&self) -> &VerifyingKey {
        &self.app_key
    }

    pub fn kms_key(&self) -> &VerifyingKey {
        &self.kms_key
    }

    /// Accepts `card` only if its snapshot is well formed, it belongs to
    /// `identity` (when given) and is of `kind`, and its self, app and kms
    /// signatures all verify, checked in that order.
    pub fn verify(
        &self,
        card: &pb::Card,
        identity: Option<&str>,
        kind: CardKind,
    ) -> Result<VerifiedCard, CardError> {
        let parsed = ParsedCard::parse(card.clone())?;
        if let Some(expected) = identity
            && parsed.identity() != expected
        {
            return Err(CardError::IdentityMismatch {
                expected: expected.to_owned(),
                found: parsed.identity().to_owned(),
            });
        }
        if parsed.kind() != kind {
            return Err(CardError::KindMismatch {
                expected: kind,
                found: parsed.kind(),
            });
        }
        parsed.check_self_signature()?;
        parsed.check_signature(SignatureRole::App, &self.app_key)?;
        parsed.check_signature(SignatureRole::Kms, &self.kms_key)?;
        Ok(VerifiedCard(parsed))
    }
}

/// A card whose three signatures verified against the pinned keys, for the
/// identity and kind that were asked for. Only [`Verifier::verify`] makes one.
#[derive(Clone)]
pub struct VerifiedCard(ParsedCard);

impl fmt::Debug for VerifiedCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCard")
            .field("id", &self.id())
            .field("identity", &self.identity())
            .field("kind", &self.kind())
            .field("device_name", &self.device_name())
            .finish_non_exhaustive()
    }
}

impl VerifiedCard {
    pub fn id(&self) -> CardId {
        self.0.id()
    }
    pub fn identity(&self) -> &str {
        self.0.identity()
    }
    pub fn kind(&self) -> CardKind {
        self.0.kind()
    }
    pub fn device_name(&self) -> &str {
        self.0.device_name()
    }
    pub fn created_at(&self) -> i64 {
        self.0.created_at()
    }
    pub fn previous_card_id(&self) -> Option<CardId> {
        self.0.previous_card_id()
    }
    pub fn signing_key(&self) -> &VerifyingKey {
        self.0.signing_key()
    }
    pub fn encryption_key(&self) -> &EncryptionPublicKey {
        self.0.encryption_key()
    }
    pub fn card(&self) -> &pb::Card {
        self.0.card()
    }
    /// The card's parsed fields (what revocation checks take).
    pub fn parsed(&self) -> &ParsedCard {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use tessera_crypto::{DeviceKeys, SigningKey};

    use super::*;
    use crate::{NewCard, app_sign, kms_sign};

    struct Setup {
        app: SigningKey,
        kms: SigningKey,
        verifier: Verifier,
    }

    fn setup() -> Setup {
        let app = SigningKey::generate().unwrap();
        let kms = SigningKey::generate().unwrap();
        let verifier = Verifier::new(app.verifying_key(), kms.verifying_key());
        Setup { app, kms, verifier }
    }

    fn card(identity: &str, kind: CardKind) -> (DeviceKeys, pb::Card) {
        let keys = DeviceKeys::generate().unwrap();
        let card = NewCard {
            identity,
            kind,
            device_name: "dev",
            created_at: 5,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        (keys, card)
    }

    #[test]
    fn accepts_a_fully_signed_card() {
        let s = setup();
        let (_, mut c) = card("bob", CardKind::Client);
        app_sign(&mut c, &s.app);
        kms_sign(&mut c, &s.kms);
        let v = s
            .verifier
            .verify(&c, Some("bob"), CardKind::Client)
            .unwrap();
        assert_eq!(v.identity(), "bob");
        assert_eq!(v.id(), CardId::of_snapshot(&c.content_snapshot));
    }

    #[test]
    fn each_check_fails_with_its_own_error() {
        let s = setup();
        let (_, mut c) = card("bob", CardKind::Client);
        assert_eq!(
            s.verifier
                .verify(&c, Some("bob"), CardKind::Client)
                .unwrap_err(),
            CardError::MissingSignature(SignatureRole::App)
        );
        app_sign(&mut c, &s.app);
        assert_eq!(
            s.verifier
                .verify(&c, Some("bob"), CardKind::Client)
                .unwrap_err(),
            CardError::MissingSignature(SignatureRole::Kms)
        );
        kms_sign(&mut c, &s.kms);

        // Signed by another app (a MITM's own AppKey).
        let other_app = SigningKey::generate().unwrap();
        let mut forged = c.clone();
        app_sign(&mut forged, &other_app);
        assert_eq!(
            s.verifier
                .verify(&forged, Some("bob"), CardKind::Client)
                .unwrap_err(),
            CardError::BadSignature(SignatureRole::App)
        );
        // Signed by another key service.
        let mut forged = c.clone();
        kms_sign(&mut forged, &SigningKey::generate().unwrap());
        assert_eq!(
            s.verifier
                .verify(&forged, Some("bob"), CardKind::Client)
                .unwrap_err(),
            CardError::BadSignature(SignatureRole::Kms)
        );
        // Self signature replaced.
        let mut forged = c.clone();
        forged.self_signature = other_app
            .sign(
                tessera_crypto::SignatureContext::CardSelf,
                &c.content_snapshot,
            )
            .to_vec();
        assert_eq!(
            s.verifier
                .verify(&forged, Some("bob"), CardKind::Client)
                .unwrap_err(),
            CardError::BadSignature(SignatureRole::SelfSigned)
        );
        // Wrong identity, wrong kind.
        assert!(matches!(
            s.verifier.verify(&c, Some("alice"), CardKind::Client),
            Err(CardError::IdentityMismatch { .. })
        ));
        assert!(matches!(
            s.verifier.verify(&c, Some("bob"), CardKind::Org),
            Err(CardError::KindMismatch { .. })
        ));
        // A signature over other content (the snapshot swapped under the signatures).
        let (_, other) = card("bob", CardKind::Client);
        let mut swapped = c.clone();
        swapped.content_snapshot = other.content_snapshot;
        assert_eq!(
            s.verifier
                .verify(&swapped, Some("bob"), CardKind::Client)
                .unwrap_err(),
            CardError::BadSignature(SignatureRole::SelfSigned)
        );
    }
}
