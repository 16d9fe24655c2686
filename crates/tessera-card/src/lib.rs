//! Tessera's card model.
//!
//! A card is the public identity of one device (a ClientCard) or of an
//! organisation (an OrgCard): an exact `CardContent` snapshot plus three
//! signatures, by the card's own key, by the AppKey and by the key service.
//!
//! Trust decisions take a [`VerifiedCard`], which only [`Verifier::verify`]
//! makes, after checking all three signatures against pinned AppKey and KMS
//! keys and the identity and kind asked for (the seed's automatic card
//! verification): parse, don't validate.
//!
//! Also here: channel membership chains signed by members ([`channel`],
//! protocol v2), the one check of a key-service card record ([`record`]),
//! device lists signed by an identity's own devices ([`device_list`],
//! protocol v2), revocation records ([`revocation`]), the transparency log's
//! Merkle tree and proof checks ([`transparency`]) and safety numbers
//! ([`safety_number`]).

mod card;
pub mod channel;
pub mod device_list;
mod error;
mod identity;
pub mod record;
pub mod revocation;
pub mod safety_number;
pub mod transparency;
mod verifier;

pub use card::{CardId, CardKind, NewCard, ParsedCard, app_sign, kms_sign};
pub use error::{CardError, SignatureRole};
pub use identity::{
    MAX_DEVICE_NAME_LEN, MAX_IDENTITY_LEN, validate_device_name, validate_identity,
};
pub use verifier::{VerifiedCard, Verifier};

/// Protocol version of card contents and revocations.
pub const VERSION: u32 = 1;

/// What a device (or the OrgKey) signs, with label `tessera/v1/device-login`,
/// to answer a passwordless log-in challenge:
/// `challenge || u32(len identity) || identity || card_id`.
pub fn device_login_message(challenge: &[u8], identity: &str, card_id: &CardId) -> Vec<u8> {
    let mut m = Vec::with_capacity(challenge.len() + 4 + identity.len() + 32);
    m.extend_from_slice(challenge);
    m.extend_from_slice(&(identity.len() as u32).to_be_bytes());
    m.extend_from_slice(identity.as_bytes());
    m.extend_from_slice(card_id.as_bytes());
    m
}
