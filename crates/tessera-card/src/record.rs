//! The one check of a card record from the key service, run by every party
//! that uses a card (the client, and the backup service before it
//! re-encrypts history): the card's three signatures against the pinned keys,
//! the identity and kind asked for, its registration's inclusion in the
//! checkpoint sent with it, and, for a revoked card, the revocation's
//! signature and its own inclusion in the same checkpoint.

use tessera_proto::kms::v1::{CardRecord, CardStatus};

use crate::{
    CardError, CardKind, VerifiedCard, Verifier,
    revocation::{ParsedRevocation, RevokedBy},
    transparency::{self, LogEvent, VerifiedCheckpoint},
};

/// A card's status as the key service reports it (and the record proves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    /// Revoked by its own key or the AppKey: gone from search, still
    /// fetchable by id so old messages verify.
    Revoked,
    /// A later card names this one as `previous_card_id`.
    Superseded,
}

/// A revocation and where the log put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRevocation {
    pub by: RevokedBy,
    /// Unix seconds the signer wrote (its own clock; informational).
    pub revoked_at: i64,
    /// Leaf index of the revocation's log entry.
    pub leaf_index: u64,
    /// Unix seconds at which the key service logged it.
    pub logged_at: i64,
}

/// A card record that passed [`check_record`].
#[derive(Debug, Clone)]
pub struct CheckedRecord {
    pub card: VerifiedCard,
    pub status: Status,
    /// Leaf index of the card's registration entry.
    pub registered_index: u64,
    /// Unix seconds at which the key service logged the registration.
    pub registered_at: i64,
    /// Present exactly when `status` is `Revoked`.
    pub revocation: Option<LoggedRevocation>,
}

impl CheckedRecord {
    /// Whether the card was active at log position `leaf_index` (registered
    /// before it and not revoked before it).
    pub fn active_at(&self, leaf_index: u64) -> bool {
        self.registered_index < leaf_index
            && self
                .revocation
                .as_ref()
                .is_none_or(|r| r.leaf_index > leaf_index)
    }
}

/// Checks `record` as sent with `checkpoint` (already verified against the
/// pinned key-service key), for a card of `identity` (when given) and `kind`.
/// The card is taken out of the very bytes the inclusion proof covers.
pub fn check_record(
    verifier: &Verifier,
    record: &CardRecord,
    checkpoint: &VerifiedCheckpoint,
    identity: Option<&str>,
    kind: CardKind,
) -> Result<CheckedRecord, CardError> {
    let (entry_identity, registered_at, card) =
        match transparency::parse_entry(&record.registration_entry)? {
            LogEvent::Registered {
                identity,
                appended_at,
                card,
            } => (identity, appended_at, card),
            _ => {
                return Err(CardError::MalformedLogEntry(
                    "a card record whose registration entry does not register a card",
                ));
            }
        };
    let card = verifier.verify(&card, identity, kind)?;
    if entry_identity != card.identity() {
        return Err(CardError::MalformedLogEntry(
            "the log entry names another identity than its card",
        ));
    }
    let inclusion = record
        .inclusion
        .as_ref()
        .ok_or(CardError::BadInclusionProof("missing"))?;
    transparency::verify_inclusion(checkpoint, &record.registration_entry, inclusion)?;

    let status = match CardStatus::try_from(record.status) {
        Ok(CardStatus::Active) => Status::Active,
        Ok(CardStatus::Revoked) => Status::Revoked,
        Ok(CardStatus::Superseded) => Status::Superseded,
        _ => return Err(CardError::Malformed("unknown card status")),
    };
    let revocation = match status {
        Status::Revoked => Some(check_revocation(verifier, record, checkpoint, &card)?),
        _ if !record.revocation_entry.is_empty() || record.revocation.is_some() => {
            return Err(CardError::Malformed(
                "a revocation on a card that is not revoked",
            ));
        }
        _ => None,
    };
    Ok(CheckedRecord {
        card,
        status,
        registered_index: inclusion.leaf_index,
        registered_at,
        revocation,
    })
}

fn check_revocation(
    verifier: &Verifier,
    record: &CardRecord,
    checkpoint: &VerifiedCheckpoint,
    card: &VerifiedCard,
) -> Result<LoggedRevocation, CardError> {
    let (entry_identity, logged_at, revocation) =
        match transparency::parse_entry(&record.revocation_entry)? {
            LogEvent::Revoked {
                identity,
                appended_at,
                revocation,
            } => (identity, appended_at, revocation),
            _ => {
                return Err(CardError::MalformedLogEntry(
                    "a revoked card without its revocation's log entry",
                ));
            }
        };
    if entry_identity != card.identity() {
        return Err(CardError::MalformedLogEntry(
            "the log entry names another identity than its card",
        ));
    }
    if record.revocation.as_ref().is_some_and(|r| *r != revocation) {
        return Err(CardError::Malformed(
            "the record's revocation is not the logged one",
        ));
    }
    let parsed = ParsedRevocation::parse(revocation)?;
    parsed.verify(card.parsed(), verifier.app_key())?;
    let inclusion = record
        .revocation_inclusion
        .as_ref()
        .ok_or(CardError::BadInclusionProof(
            "the revocation's proof is missing",
        ))?;
    transparency::verify_inclusion(checkpoint, &record.revocation_entry, inclusion)?;
    Ok(LoggedRevocation {
        by: parsed.revoked_by(),
        revoked_at: parsed.revoked_at(),
        leaf_index: inclusion.leaf_index,
        logged_at,
    })
}
