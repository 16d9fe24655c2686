//! Card ids, card contents and their signatures.

use std::{fmt, str::FromStr};

use tessera_crypto::{
    DeviceKeys, EncryptionPublicKey, SIGNATURE_LEN, SignatureContext, SigningKey, VerifyingKey,
};
use tessera_proto::{
    Message as _,
    card::v1::{self as pb, CardContent},
};

use crate::{CardError, SignatureRole, VERSION, validate_device_name, validate_identity};

/// SHA-256 of a card's content snapshot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardId([u8; 32]);

impl CardId {
    /// The id of the card whose content snapshot is `snapshot`.
    pub fn of_snapshot(snapshot: &[u8]) -> Self {
        Self(tessera_crypto::sha256(snapshot))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CardError> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| CardError::Malformed("card id must be 32 bytes"))
    }

    pub const fn from_array(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The first 8 bytes in hex, for display next to device names.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardId({})", hex::encode(self.0))
    }
}

impl FromStr for CardId {
    type Err = CardError;

    fn from_str(s: &str) -> Result<Self, CardError> {
        let bytes = hex::decode(s).map_err(|_| CardError::Malformed("card id is not hex"))?;
        Self::from_bytes(&bytes)
    }
}

/// Whose card it is: one device of a user, or an organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CardKind {
    Client,
    Org,
}

impl CardKind {
    pub fn to_proto(self) -> pb::CardKind {
        match self {
            Self::Client => pb::CardKind::Client,
            Self::Org => pb::CardKind::Org,
        }
    }

    pub fn from_proto(value: i32) -> Result<Self, CardError> {
        match pb::CardKind::try_from(value) {
            Ok(pb::CardKind::Client) => Ok(Self::Client),
            Ok(pb::CardKind::Org) => Ok(Self::Org),
            _ => Err(CardError::UnknownKind),
        }
    }
}

impl fmt::Display for CardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Org => "org",
        })
    }
}

/// What a new card should say; [`NewCard::self_signed`] makes the card.
pub struct NewCard<'a> {
    pub identity: &'a str,
    pub kind: CardKind,
    pub device_name: &'a str,
    /// Unix seconds.
    pub created_at: i64,
    pub previous_card_id: Option<CardId>,
}

impl NewCard<'_> {
    /// Encodes the content snapshot once and signs it with the device's own
    /// key. The app and kms signatures are added later by the app server
    /// and the key service.
    pub fn self_signed(&self, keys: &DeviceKeys) -> Result<pb::Card, CardError> {
        validate_identity(self.identity)?;
        validate_device_name(self.device_name)?;
        let content = CardContent {
            version: VERSION,
            identity: self.identity.to_owned(),
            kind: self.kind.to_proto() as i32,
            device_name: self.device_name.to_owned(),
            signing_public_key: keys.signing.verifying_key().as_bytes().to_vec(),
            encryption_public_key: keys.encryption.public_key().as_bytes().to_vec(),
            created_at: self.created_at,
            previous_card_id: self
                .previous_card_id
                .map(|id| id.to_vec())
                .unwrap_or_default(),
        };
        let content_snapshot = content.encode_to_vec();
        let self_signature = keys
            .signing
            .sign(SignatureContext::CardSelf, &content_snapshot)
            .to_vec();
        Ok(pb::Card {
            content_snapshot,
            self_signature,
            app_signature: Vec::new(),
            kms_signature: Vec::new(),
        })
    }
}

/// A card whose snapshot parsed and whose fields are well formed; no
/// signature has been checked yet (see [`ParsedCard::check_signature`] and
/// [`crate::Verifier`]).
#[derive(Clone)]
pub struct ParsedCard {
    card: pb::Card,
    id: CardId,
    identity: String,
    kind: CardKind,
    device_name: String,
    created_at: i64,
    previous_card_id: Option<CardId>,
    signing_key: VerifyingKey,
    encryption_key: EncryptionPublicKey,
}

impl fmt::Debug for ParsedCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedCard")
            .field("id", &self.id)
            .field("identity", &self.identity)
            .field("kind", &self.kind)
            .field("device_name", &self.device_name)
            .finish_non_exhaustive()
    }
}

fn check_signature_len(sig: &[u8], role: SignatureRole) -> Result<(), CardError> {
    match sig.len() {
        0 | SIGNATURE_LEN => Ok(()),
        _ => Err(CardError::BadSignature(role)),
    }
}

impl ParsedCard {
    /// Parses the snapshot and checks every field's shape: version, identity,
    /// kind, device name, key lengths, X25519 key not of low order.
    pub fn parse(card: pb::Card) -> Result<Self, CardError> {
        let content = CardContent::decode(card.content_snapshot.as_slice())
            .map_err(|_| CardError::Malformed("content snapshot is not a CardContent"))?;
        // Strict: the snapshot must be the canonical encoding of what it
        // says (docs/protocol.md section 3). Unknown fields, repeated or
        // out-of-order fields, default values written out and overlong
        // varints are all refused, so what is signed is exactly what is read.
        if content.encode_to_vec() != card.content_snapshot {
            return Err(CardError::Malformed(
                "content snapshot is not the canonical encoding of a CardContent",
            ));
        }
        if content.version != VERSION {
            return Err(CardError::UnsupportedVersion(content.version));
        }
        validate_identity(&content.identity)?;
        validate_device_name(&content.device_name)?;
        let kind = CardKind::from_proto(content.kind)?;
        let signing_key = VerifyingKey::from_bytes(&content.signing_public_key)?;
        let encryption_key = EncryptionPublicKey::from_bytes(&content.encryption_public_key)?;
        let previous_card_id = match content.previous_card_id.len() {
            0 => None,
            _ => Some(CardId::from_bytes(&content.previous_card_id)?),
        };
        check_signature_len(&card.self_signature, SignatureRole::SelfSigned)?;
        check_signature_len(&card.app_signature, SignatureRole::App)?;
        check_signature_len(&card.kms_signature, SignatureRole::Kms)?;
        Ok(Self {
            id: CardId::of_snapshot(&card.content_snapshot),
            identity: content.identity,
            kind,
            device_name: content.device_name,
            created_at: content.created_at,
            previous_card_id,
            signing_key,
            encryption_key,
            card,
        })
    }

    /// Checks one of the card's signatures: `SelfSigned` against the card's
    /// own key (and `key` is ignored), the others against `key`.
    pub fn check_signature(
        &self,
        role: SignatureRole,
        key: &VerifyingKey,
    ) -> Result<(), CardError> {
        let (signature, context, key) = match role {
            SignatureRole::SelfSigned => (
                &self.card.self_signature,
                SignatureContext::CardSelf,
                &self.signing_key,
            ),
            SignatureRole::App => (&self.card.app_signature, SignatureContext::CardApp, key),
            SignatureRole::Kms => (&self.card.kms_signature, SignatureContext::CardKms, key),
        };
        if signature.is_empty() {
            return Err(CardError::MissingSignature(role));
        }
        key.verify(context, &self.card.content_snapshot, signature)
            .map_err(|_| CardError::BadSignature(role))
    }

    /// Checks the self signature (the card's key vouches for its content).
    pub fn check_self_signature(&self) -> Result<(), CardError> {
        self.check_signature(SignatureRole::SelfSigned, &self.signing_key)
    }

    pub fn id(&self) -> CardId {
        self.id
    }
    pub fn identity(&self) -> &str {
        &self.identity
    }
    pub fn kind(&self) -> CardKind {
        self.kind
    }
    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    pub fn created_at(&self) -> i64 {
        self.created_at
    }
    pub fn previous_card_id(&self) -> Option<CardId> {
        self.previous_card_id
    }
    pub fn signing_key(&self) -> &VerifyingKey {
        &self.signing_key
    }
    pub fn encryption_key(&self) -> &EncryptionPublicKey {
        &self.encryption_key
    }
    /// The card as it travels.
    pub fn card(&self) -> &pb::Card {
        &self.card
    }
    pub fn into_card(self) -> pb::Card {
        self.card
    }
}

/// Adds the AppKey's signature (the app server vouching for the card).
pub fn app_sign(card: &mut pb::Card, app_key: &SigningKey) {
    card.app_signature = app_key
        .sign(SignatureContext::CardApp, &card.content_snapshot)
        .to_vec();
}

/// Adds the key service's signature.
pub fn kms_sign(card: &mut pb::Card, kms_key: &SigningKey) {
    card.kms_signature = kms_key
        .sign(SignatureContext::CardKms, &card.content_snapshot)
        .to_vec();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_id_hex_round_trip() {
        let id = CardId::of_snapshot(b"x");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<CardId>().unwrap(), id);
        assert!("zz".parse::<CardId>().is_err());
        assert!("abcd".parse::<CardId>().is_err());
    }

    #[test]
    fn self_signed_card_parses_and_checks() {
        let keys = DeviceKeys::generate().unwrap();
        let card = NewCard {
            identity: "alice",
            kind: CardKind::Client,
            device_name: "laptop",
            created_at: 1,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        let parsed = ParsedCard::parse(card.clone()).unwrap();
        parsed.check_self_signature().unwrap();
        assert_eq!(parsed.id(), CardId::of_snapshot(&card.content_snapshot));
        assert_eq!(parsed.identity(), "alice");
        assert_eq!(
            parsed.check_signature(SignatureRole::App, &keys.signing.verifying_key()),
            Err(CardError::MissingSignature(SignatureRole::App))
        );
        let mut altered = card;
        altered.content_snapshot[3] ^= 1;
        // Either the flip broke the encoding (refused at parse) or the self
        // signature no longer verifies.
        if let Ok(p) = ParsedCard::parse(altered) {
            assert_eq!(
                p.check_self_signature(),
                Err(CardError::BadSignature(SignatureRole::SelfSigned))
            );
        }
    }

    #[test]
    fn a_snapshot_that_is_not_canonical_is_refused_even_when_signed() {
        let keys = DeviceKeys::generate().unwrap();
        let card = NewCard {
            identity: "alice",
            kind: CardKind::Client,
            device_name: "laptop",
            created_at: 1,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        let canonical = card.content_snapshot.clone();
        let resign = |snapshot: Vec<u8>| pb::Card {
            self_signature: keys
                .signing
                .sign(SignatureContext::CardSelf, &snapshot)
                .to_vec(),
            content_snapshot: snapshot,
            ..Default::default()
        };
        let mut unknown_field = canonical.clone();
        unknown_field.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
        let mut version_repeated = canonical.clone();
        version_repeated.extend_from_slice(&[0x08, 0x01]); // field 1 again
        let mut overlong_version = vec![0x08, 0x81, 0x00]; // version = 1 in two bytes
        overlong_version.extend_from_slice(&canonical[2..]);
        let mut default_written = canonical.clone();
        default_written.extend_from_slice(&[0x42, 0x00]); // empty previous_card_id
        for (what, snapshot) in [
            ("unknown field", unknown_field),
            ("repeated field", version_repeated),
            ("overlong varint", overlong_version),
            ("default value written out", default_written),
        ] {
            // Each still decodes to the same content under prost...
            assert_eq!(
                CardContent::decode(snapshot.as_slice()).unwrap(),
                CardContent::decode(canonical.as_slice()).unwrap(),
                "{what}"
            );
            // ... and carries a valid self signature, yet is refused.
            let signed = resign(snapshot);
            assert_eq!(
                ParsedCard::parse(signed).unwrap_err(),
                CardError::Malformed(
                    "content snapshot is not the canonical encoding of a CardContent"
                ),
                "{what}"
            );
        }
        assert!(ParsedCard::parse(resign(canonical)).is_ok());
    }

    #[test]
    fn bad_fields_are_refused() {
        let keys = DeviceKeys::generate().unwrap();
        let good = CardContent {
            version: VERSION,
            identity: "bob".into(),
            kind: pb::CardKind::Client as i32,
            device_name: "phone".into(),
            signing_public_key: keys.signing.verifying_key().as_bytes().to_vec(),
            encryption_public_key: keys.encryption.public_key().as_bytes().to_vec(),
            created_at: 0,
            previous_card_id: vec![],
        };
        let parse = |c: CardContent| {
            ParsedCard::parse(pb::Card {
                content_snapshot: c.encode_to_vec(),
                ..Default::default()
            })
        };
        assert!(parse(good.clone()).is_ok());
        assert_eq!(
            parse(CardContent {
                version: 2,
                ..good.clone()
            })
            .unwrap_err(),
            CardError::UnsupportedVersion(2)
        );
        assert!(matches!(
            parse(CardContent {
                identity: String::new(),
                ..good.clone()
            }),
            Err(CardError::InvalidIdentity(_))
        ));
        assert_eq!(
            parse(CardContent {
                kind: 7,
                ..good.clone()
            })
            .unwrap_err(),
            CardError::UnknownKind
        );
        assert!(matches!(
            parse(CardContent {
                signing_public_key: vec![1; 31],
                ..good.clone()
            }),
            Err(CardError::Key(_))
        ));
        assert!(matches!(
            parse(CardContent {
                encryption_public_key: vec![0; 32],
                ..good.clone()
            }),
            Err(CardError::Key(_))
        ));
        assert!(matches!(
            parse(CardContent {
                previous_card_id: vec![1; 5],
                ..good.clone()
            }),
            Err(CardError::Malformed(_))
        ));
        assert!(
            ParsedCard::parse(pb::Card {
                content_snapshot: vec![0xff; 10],
                ..Default::default()
            })
            .is_err()
        );
    }
}
