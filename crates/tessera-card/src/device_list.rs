//! Device lists (protocol v2): the client cards an identity's own devices
//! approved.
//!
//! A device list is a hash-chained sequence of [`DeviceStatement`]s, each
//! signed by a device of the identity and logged by the key service. The
//! AppKey and key-service signatures on a card stay necessary; they are no
//! longer sufficient: a client trusts a card only when the verified list
//! names it.
//!
//! * GENESIS (seqno 0): the subject card signs; it becomes the only trusted
//!   device. The AppKey co-signs.
//! * ADD: a trusted device approves the subject card.
//! * REMOVE: a trusted device (possibly the subject itself) withdraws a
//!   trusted card.
//! * RESET: recovery after every device was lost. The subject card signs and
//!   replaces every trusted device; the AppKey co-signs (the app server does
//!   so only after a fresh password log-in). Contacts see an identity change.
//!
//! The same [`DeviceListState::apply`] runs at the key service (before it
//! logs a statement), at every client and at the backup service.

use std::{collections::BTreeSet, fmt};

use tessera_crypto::{SignatureContext, SigningKey, VerifyingKey};
use tessera_proto::{
    Message as _,
    card::v1::{DeviceAction, DeviceStatement, SignedDeviceStatement},
    kms::v1::{DeviceList, LoggedStatement},
};
use thiserror::Error;

use crate::{
    CardError, CardId, CardKind, VerifiedCard,
    record::CheckedRecord,
    transparency::{self, Hash, LogEvent, VerifiedCheckpoint},
    validate_identity,
};

/// Format version of device list statements.
pub const STATEMENT_VERSION: u32 = 1;

/// Most statements one identity's list may hold.
pub const MAX_STATEMENTS: u64 = 1000;

/// ADD and REMOVE stop this many statements short of [`MAX_STATEMENTS`], so
/// a device that cycles them cannot use up the room a RESET needs.
pub const RESET_HEADROOM: u64 = 10;

/// Label of the statement hash.
const HASH_LABEL: &[u8] = b"tessera/v2/device-list/hash";

/// Label of the approval code derived from a card id.
const CODE_LABEL: &[u8] = b"tessera/v2/device-code";

/// What a statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Genesis,
    Add,
    Remove,
    Reset,
}

impl Action {
    fn to_proto(self) -> DeviceAction {
        match self {
            Self::Genesis => DeviceAction::Genesis,
            Self::Add => DeviceAction::Add,
            Self::Remove => DeviceAction::Remove,
            Self::Reset => DeviceAction::Reset,
        }
    }

    fn from_proto(value: i32) -> Result<Self, DeviceListError> {
        match DeviceAction::try_from(value) {
            Ok(DeviceAction::Genesis) => Ok(Self::Genesis),
            Ok(DeviceAction::Add) => Ok(Self::Add),
            Ok(DeviceAction::Remove) => Ok(Self::Remove),
            Ok(DeviceAction::Reset) => Ok(Self::Reset),
            _ => Err(DeviceListError::Malformed("unknown action")),
        }
    }

    /// Whether the AppKey must co-sign (GENESIS and RESET).
    pub fn needs_app_signature(self) -> bool {
        matches!(self, Self::Genesis | Self::Reset)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Genesis => "genesis",
            Self::Add => "add",
            Self::Remove => "remove",
            Self::Reset => "reset",
        })
    }
}

/// Why a device list statement, or a list, was refused. Every variant but
/// `Stale` is a security failure when it comes from a server.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceListError {
    #[error("malformed device list statement: {0}")]
    Malformed(&'static str),
    #[error("unsupported device list statement version {0}")]
    UnsupportedVersion(u32),
    #[error("the statement is for {found:?}, not {expected:?}")]
    WrongIdentity { expected: String, found: String },
    #[error("the statement's signer card is not the card given to check it")]
    SignerMismatch,
    #[error("the statement's signature does not verify with its signer's card")]
    BadSignature,
    #[error("the AppKey's co-signature on a {0} statement does not verify")]
    BadAppSignature(Action),
    #[error("the signer {0} is not a trusted device of the list at that point")]
    SignerNotTrusted(CardId),
    #[error("the signer {0} was revoked before the statement was logged")]
    SignerRevoked(CardId),
    #[error("{0} is already a trusted device")]
    AlreadyTrusted(CardId),
    #[error("{0} is not a trusted device")]
    NotTrusted(CardId),
    #[error(
        "the list was rolled back: {known} statements were verified before, the key service shows {served}"
    )]
    Rollback { known: u64, served: u64 },
    #[error("the list forked at statement {seqno}: it does not extend the list verified before")]
    Fork { seqno: u64 },
    #[error("statement {found} does not follow statement {expected_previous}")]
    OutOfOrder { expected_previous: u64, found: u64 },
    /// At the key service, not an attack: the statement was made against an
    /// older head (it answers ABORTED); refetch the list and sign again.
    #[error(
        "statement {found} does not extend the list's head (the list has {length} statements): refetch it"
    )]
    Stale { length: u64, found: u64 },
    #[error(
        "the device list is full ({MAX_STATEMENTS} statements; ADD and REMOVE stop {RESET_HEADROOM} short, for a RESET)"
    )]
    Full,
    #[error("device list proof: {0}")]
    Proof(#[from] CardError),
}

/// `SHA-256("tessera/v2/device-list/hash" || 0x00 || statement)`: the hash
/// the next statement names as `previous_hash`.
pub fn statement_hash(statement: &[u8]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(HASH_LABEL);
    ctx.update(&[0x00]);
    ctx.update(statement);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The code two devices show to confirm an approval concerns the same card:
/// 12 digits from `SHA-256("tessera/v2/device-code" || 0x00 || card_id)`,
/// the first 8 bytes as a big-endian integer mod 10^12, in groups of four.
pub fn approval_code(card_id: &CardId) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(CODE_LABEL);
    ctx.update(&[0x00]);
    ctx.update(card_id.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    let n = u64::from_be_bytes(first) % 1_000_000_000_000;
    let digits = format!("{n:012}");
    format!("{} {} {}", &digits[0..4], &digits[4..8], &digits[8..12])
}

/// What a new statement says; [`NewStatement::sign`] makes it.
#[derive(Debug, Clone)]
pub struct NewStatement<'a> {
    pub identity: &'a str,
    pub seqno: u64,
    /// Hash of the statement at `seqno - 1`; `None` for a genesis.
    pub previous_hash: Option<Hash>,
    pub action: Action,
    pub subject: CardId,
    pub signer: CardId,
    /// Unix seconds.
    pub created_at: i64,
}

impl NewStatement<'_> {
    /// Encodes the statement once and signs it with the signer's key. The
    /// AppKey's co-signature, when needed, is added with [`app_cosign`].
    pub fn sign(&self, key: &SigningKey) -> SignedDeviceStatement {
        let statement = DeviceStatement {
            version: STATEMENT_VERSION,
            identity: self.identity.to_owned(),
            seqno: self.seqno,
            previous_hash: self.previous_hash.map(|h| h.to_vec()).unwrap_or_default(),
            action: self.action.to_proto() as i32,
            subject_card_id: self.subject.to_vec(),
            signer_card_id: self.signer.to_vec(),
            created_at: self.created_at,
        }
        .encode_to_vec();
        let signature = key
            .sign(SignatureContext::DeviceStatement, &statement)
            .to_vec();
        SignedDeviceStatement {
            statement,
            signature,
            app_signature: Vec::new(),
        }
    }
}

/// Adds the AppKey's co-signature (GENESIS and RESET statements).
pub fn app_cosign(signed: &mut SignedDeviceStatement, app_key: &SigningKey) {
    signed.app_signature = app_key
        .sign(SignatureContext::DeviceStatementApp, &signed.statement)
        .to_vec();
}

/// A statement whose fields are well formed; no signature checked yet.
#[derive(Clone)]
pub struct ParsedStatement {
    signed: SignedDeviceStatement,
    hash: Hash,
    identity: String,
    seqno: u64,
    previous_hash: Option<Hash>,
    action: Action,
    subject: CardId,
    signer: CardId,
    created_at: i64,
}

impl fmt::Debug for ParsedStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedStatement")
            .field("identity", &self.identity)
            .field("seqno", &self.seqno)
            .field("action", &self.action)
            .field("subject", &self.subject)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

fn id_field(bytes: &[u8], what: &'static str) -> Result<CardId, DeviceListError> {
    CardId::from_bytes(bytes).map_err(|_| DeviceListError::Malformed(what))
}

impl ParsedStatement {
    /// Checks the statement's shape: version, identity, sequence and parent,
    /// action, ids, signature lengths, and which actions need the AppKey.
    pub fn parse(signed: SignedDeviceStatement) -> Result<Self, DeviceListError> {
        let s = DeviceStatement::decode(signed.statement.as_slice())
            .map_err(|_| DeviceListError::Malformed("not a DeviceStatement"))?;
        if s.version != STATEMENT_VERSION {
            return Err(DeviceListError::UnsupportedVersion(s.version));
        }
        validate_identity(&s.identity)?;
        let previous_hash = match (s.seqno, s.previous_hash.len()) {
            (0, 0) => None,
            (0, _) => {
                return Err(DeviceListError::Malformed(
                    "statement 0 names a previous statement",
                ));
            }
            (_, 32) => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&s.previous_hash);
                Some(h)
            }
            _ => {
                return Err(DeviceListError::Malformed("previous hash must be 32 bytes"));
            }
        };
        if s.seqno >= MAX_STATEMENTS {
            return Err(DeviceListError::Full);
        }
        let action = Action::from_proto(s.action)?;
        if (action == Action::Genesis) != (s.seqno == 0) {
            return Err(DeviceListError::Malformed(
                "a genesis is statement 0 and statement 0 is a genesis",
            ));
        }
        let subject = id_field(&s.subject_card_id, "subject card id must be 32 bytes")?;
        let signer = id_field(&s.signer_card_id, "signer card id must be 32 bytes")?;
        if action.needs_app_signature() && subject != signer {
            return Err(DeviceListError::Malformed(
                "a genesis or reset is signed by its subject",
            ));
        }
        if signed.signature.len() != tessera_crypto::SIGNATURE_LEN {
            return Err(DeviceListError::Malformed("signature must be 64 bytes"));
        }
        let app_len = if action.needs_app_signature() {
            tessera_crypto::SIGNATURE_LEN
        } else {
            0
        };
        if signed.app_signature.len() != app_len {
            return Err(DeviceListError::Malformed(
                "the AppKey co-signs exactly the genesis and reset statements",
            ));
        }
        Ok(Self {
            hash: statement_hash(&signed.statement),
            signed,
            identity: s.identity,
            seqno: s.seqno,
            previous_hash,
            action,
            subject,
            signer,
            created_at: s.created_at,
        })
    }

    pub fn hash(&self) -> Hash {
        self.hash
    }
    pub fn identity(&self) -> &str {
        &self.identity
    }
    pub fn seqno(&self) -> u64 {
        self.seqno
    }
    pub fn previous_hash(&self) -> Option<Hash> {
        self.previous_hash
    }
    pub fn action(&self) -> Action {
        self.action
    }
    pub fn subject(&self) -> CardId {
        self.subject
    }
    pub fn signer(&self) -> CardId {
        self.signer
    }
    pub fn created_at(&self) -> i64 {
        self.created_at
    }
    pub fn signed(&self) -> &SignedDeviceStatement {
        &self.signed
    }
}

/// What one applied statement changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Genesis(CardId),
    Added(CardId),
    Removed(CardId),
    /// Every trusted device was replaced by `new`.
    Reset {
        new: CardId,
        replaced: Vec<CardId>,
    },
}

/// A device list verified up to its head: its length, the head's hash and
/// the trusted cards. A client keeps it between runs and extends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListState {
    identity: String,
    length: u64,
    head: Option<Hash>,
    trusted: BTreeSet<CardId>,
}

impl DeviceListState {
    /// The list before its genesis.
    pub fn empty(identity: &str) -> Self {
        Self {
            identity: identity.to_owned(),
            length: 0,
            head: None,
            trusted: BTreeSet::new(),
        }
    }

    /// A list verified before (what [`DeviceListState::length`],
    /// [`DeviceListState::head`] and [`DeviceListState::trusted`] returned).
    pub fn resume(
        identity: &str,
        length: u64,
        head: Option<Hash>,
        trusted: BTreeSet<CardId>,
    ) -> Result<Self, DeviceListError> {
        if (length == 0) != head.is_none() || (length == 0 && !trusted.is_empty()) {
            return Err(DeviceListError::Malformed(
                "a stored list's length, head and devices disagree",
            ));
        }
        Ok(Self {
            identity: identity.to_owned(),
            length,
            head,
            trusted,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }
    /// Number of statements verified.
    pub fn length(&self) -> u64 {
        self.length
    }
    /// Hash of the last statement verified.
    pub fn head(&self) -> Option<Hash> {
        self.head
    }
    /// The cards the list trusts now.
    pub fn trusted(&self) -> &BTreeSet<CardId> {
        &self.trusted
    }
    pub fn is_trusted(&self, card: &CardId) -> bool {
        self.trusted.contains(card)
    }

    /// Checks that `statement` is the next one of this list and is allowed,
    /// then applies it. `signer` is the verified card the statement names as
    /// its signer (the caller also makes sure it was not revoked before the
    /// statement). Checks, in order: identity, signer card, signature, the
    /// AppKey's co-signature, position and parent, then the action's rule.
    pub fn apply(
        &mut self,
        statement: &ParsedStatement,
        signer: &VerifiedCard,
        app_key: &VerifyingKey,
    ) -> Result<Change, DeviceListError> {
        if statement.identity != self.identity {
            return Err(DeviceListError::WrongIdentity {
                expected: self.identity.clone(),
                found: statement.identity.clone(),
            });
        }
        if signer.id() != statement.signer
            || signer.identity() != self.identity
            || signer.kind() != CardKind::Client
        {
            return Err(DeviceListError::SignerMismatch);
        }
        signer
            .signing_key()
            .verify(
                SignatureContext::DeviceStatement,
                &statement.signed.statement,
                &statement.signed.signature,
            )
            .map_err(|_| DeviceListError::BadSignature)?;
        if statement.action.needs_app_signature() {
            app_key
                .verify(
                    SignatureContext::DeviceStatementApp,
                    &statement.signed.statement,
                    &statement.signed.app_signature,
                )
                .map_err(|_| DeviceListError::BadAppSignature(statement.action))?;
        }
        if statement.seqno != self.length || statement.previous_hash != self.head {
            return Err(DeviceListError::Stale {
                length: self.length,
                found: statement.seqno,
            });
        }
        let room = match statement.action {
            Action::Genesis | Action::Reset => MAX_STATEMENTS,
            Action::Add | Action::Remove => MAX_STATEMENTS - RESET_HEADROOM,
        };
        if self.length >= room {
            return Err(DeviceListError::Full);
        }
        let change = match statement.action {
            Action::Genesis => {
                self.trusted = BTreeSet::from([statement.subject]);
                Change::Genesis(statement.subject)
            }
            Action::Reset => {
                let replaced =
                    std::mem::replace(&mut self.trusted, BTreeSet::from([statement.subject]));
                Change::Reset {
                    new: statement.subject,
                    replaced: replaced.into_iter().collect(),
                }
            }
            Action::Add => {
                self.require_trusted_signer(statement)?;
                if !self.trusted.insert(statement.subject) {
                    return Err(DeviceListError::AlreadyTrusted(statement.subject));
                }
                Change::Added(statement.subject)
            }
            Action::Remove => {
                self.require_trusted_signer(statement)?;
                if !self.trusted.remove(&statement.subject) {
                    return Err(DeviceListError::NotTrusted(statement.subject));
                }
                Change::Removed(statement.subject)
            }
        };
        self.length += 1;
        self.head = Some(statement.hash);
        Ok(change)
    }

    fn require_trusted_signer(&self, statement: &ParsedStatement) -> Result<(), DeviceListError> {
        if self.trusted.contains(&statement.signer) {
            Ok(())
        } else {
            Err(DeviceListError::SignerNotTrusted(statement.signer))
        }
    }
}

/// A statement taken out of a [`LoggedStatement`] whose inclusion proof
/// verified, with where and when the log put it.
#[derive(Debug, Clone)]
pub struct LoggedDeviceStatement {
    pub statement: ParsedStatement,
    pub leaf_index: u64,
    /// Unix seconds at which the key service logged it.
    pub logged_at: i64,
}

/// Takes a statement out of its log entry for `identity` and checks the
/// entry's inclusion in `checkpoint`.
pub fn check_logged(
    logged: &LoggedStatement,
    identity: &str,
    checkpoint: &VerifiedCheckpoint,
) -> Result<LoggedDeviceStatement, DeviceListError> {
    let (entry_identity, logged_at, signed) = match transparency::parse_entry(&logged.entry)? {
        LogEvent::DeviceStatement {
            identity,
            appended_at,
            statement,
        } => (identity, appended_at, statement),
        _ => {
            return Err(DeviceListError::Malformed(
                "a log entry that carries no device list statement",
            ));
        }
    };
    let statement = ParsedStatement::parse(signed)?;
    if statement.identity != identity || entry_identity != identity {
        return Err(DeviceListError::WrongIdentity {
            expected: identity.to_owned(),
            found: if entry_identity != identity {
                entry_identity
            } else {
                statement.identity
            },
        });
    }
    let proof = logged
        .inclusion
        .as_ref()
        .ok_or(CardError::BadInclusionProof("missing"))?;
    transparency::verify_inclusion(checkpoint, &logged.entry, proof)?;
    Ok(LoggedDeviceStatement {
        statement,
        leaf_index: proof.leaf_index,
        logged_at,
    })
}

/// Part of a device list as the key service served it, each statement's
/// inclusion checked, not yet applied.
#[derive(Debug, Clone)]
pub struct ServedList {
    /// The length the key service claims for the whole list.
    pub length: u64,
    pub statements: Vec<LoggedDeviceStatement>,
}

impl ServedList {
    /// Checks every statement of `list` (served for `identity` with
    /// `checkpoint`): inclusion, shape, consecutive sequence numbers ending
    /// at the claimed head.
    pub fn check(
        list: &DeviceList,
        identity: &str,
        checkpoint: &VerifiedCheckpoint,
    ) -> Result<Self, DeviceListError> {
        if list.truncated {
            return Err(DeviceListError::Malformed(
                "the list was left out of a search answer: fetch it with GetDeviceList",
            ));
        }
        if list.statements.len() as u64 > MAX_STATEMENTS || list.length > MAX_STATEMENTS {
            return Err(DeviceListError::Full);
        }
        let statements = list
            .statements
            .iter()
            .map(|s| check_logged(s, identity, checkpoint))
            .collect::<Result<Vec<_>, _>>()?;
        for pair in statements.windows(2) {
            // Parsing bounded every seqno below MAX_STATEMENTS: no overflow.
            if pair[1].statement.seqno != pair[0].statement.seqno + 1
                || pair[1].leaf_index <= pair[0].leaf_index
            {
                return Err(DeviceListError::OutOfOrder {
                    expected_previous: pair[0].statement.seqno,
                    found: pair[1].statement.seqno,
                });
            }
        }
        if let Some(last) = statements.last()
            && last.statement.seqno + 1 != list.length
        {
            return Err(DeviceListError::Malformed(
                "the statements do not end at the list's head",
            ));
        }
        Ok(Self {
            length: list.length,
            statements,
        })
    }

    /// Where applying starts for `state`: after its head (shown again first),
    /// or, on a first look, at the latest RESET (which replaces every device,
    /// so nothing before it matters but its place in the chain) or else the
    /// genesis.
    fn start(&self, state: &DeviceListState) -> usize {
        if state.head.is_some() {
            1
        } else {
            self.statements
                .iter()
                .rposition(|s| s.statement.action == Action::Reset)
                .unwrap_or(0)
        }
    }

    /// Every card that signs a statement [`ServedList::extend`] applies to
    /// `state`: the cards to look up before extending it.
    pub fn signers(&self, state: &DeviceListState) -> BTreeSet<CardId> {
        self.signers_from(self.start(state))
    }

    /// Every card that signs a statement of the whole served part: the cards
    /// to look up before [`ServedList::extend_whole`].
    pub fn all_signers(&self) -> BTreeSet<CardId> {
        self.signers_from(0)
    }

    fn signers_from(&self, start: usize) -> BTreeSet<CardId> {
        self.statements
            .iter()
            .skip(start)
            .map(|s| s.statement.signer)
            .collect()
    }

    /// Whether a first look would skip statements before a RESET.
    pub fn has_reset(&self) -> bool {
        self.statements
            .iter()
            .skip(1)
            .any(|s| s.statement.action == Action::Reset)
    }

    /// Like [`ServedList::extend`] on a first look, but applying the rules
    /// from the genesis through every RESET, so the devices a reset
    /// replaced are known as removed at the reset (and what they signed
    /// before it can be dated). Fails where [`ServedList::extend`] would not
    /// when a statement before the latest reset no longer verifies (one
    /// co-signed by a retired AppKey): callers fall back to it then.
    pub fn extend_whole(
        &self,
        state: &mut DeviceListState,
        signers: &dyn Fn(&CardId) -> Option<CheckedRecord>,
        app_key: &VerifyingKey,
    ) -> Result<Vec<(LoggedDeviceStatement, Change)>, DeviceListError> {
        if state.head.is_some() {
            return self.extend(state, signers, app_key);
        }
        self.extend_from(state, signers, app_key, 0)
    }

    /// Extends `state` (verified before, possibly empty) with this served
    /// part, which must start at the state's head (seqno `length - 1`, its
    /// hash equal to the head: the head proven again) or, for an empty
    /// state, at the genesis (the rules apply from the latest RESET on; the
    /// statements before it need only chain). `signers` gives the checked
    /// record of each card in [`ServedList::signers`]; a signer revoked before a statement
    /// it signed was logged invalidates the statement.
    pub fn extend(
        &self,
        state: &mut DeviceListState,
        signers: &dyn Fn(&CardId) -> Option<CheckedRecord>,
        app_key: &VerifyingKey,
    ) -> Result<Vec<(LoggedDeviceStatement, Change)>, DeviceListError> {
        self.extend_from(state, signers, app_key, self.start(state))
    }

    /// [`ServedList::extend`] applying the rules of a first look from
    /// statement `start` on.
    fn extend_from(
        &self,
        state: &mut DeviceListState,
        signers: &dyn Fn(&CardId) -> Option<CheckedRecord>,
        app_key: &VerifyingKey,
        start: usize,
    ) -> Result<Vec<(LoggedDeviceStatement, Change)>, DeviceListError> {
        if self.length < state.length {
            return Err(DeviceListError::Rollback {
                known: state.length,
                served: self.length,
            });
        }
        let mut rest = self.statements.as_slice();
        if let Some(head) = state.head {
            let Some((first, tail)) = rest.split_first() else {
                return Err(DeviceListError::Rollback {
                    known: state.length,
                    served: self.length,
                });
            };
            if first.statement.seqno != state.length - 1 || first.statement.hash != head {
                return Err(DeviceListError::Fork {
                    seqno: first.statement.seqno,
                });
            }
            rest = tail;
        } else if rest.first().is_some_and(|s| s.statement.seqno != 0)
            || (rest.is_empty() && self.length > 0)
        {
            return Err(DeviceListError::Malformed(
                "a list seen for the first time must be shown from its genesis",
            ));
        } else if start > 0 {
            // The chain up to the latest reset must hold (each statement
            // names its parent); their signers no longer matter.
            for pair in rest[..=start].windows(2) {
                if pair[1].statement.previous_hash != Some(pair[0].statement.hash) {
                    return Err(DeviceListError::Fork {
                        seqno: pair[1].statement.seqno,
                    });
                }
            }
            let reset = &rest[start].statement;
            *state = DeviceListState::resume(
                &state.identity,
                reset.seqno,
                reset.previous_hash,
                BTreeSet::new(),
            )?;
            rest = &rest[start..];
        }
        let mut changes = Vec::with_capacity(rest.len());
        for logged in rest {
            let s = &logged.statement;
            let record = signers(&s.signer).ok_or(DeviceListError::SignerMismatch)?;
            if !record.active_at(logged.leaf_index) {
                return Err(DeviceListError::SignerRevoked(s.signer));
            }
            // Consecutive sequence numbers were checked: a parent that is not
            // the head verified so far is another history of the list.
            let change = state.apply(s, &record.card, app_key).map_err(|e| match e {
                DeviceListError::Stale { .. } => DeviceListError::Fork { seqno: s.seqno },
                other => other,
            })?;
            changes.push((logged.clone(), change));
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use tessera_crypto::DeviceKeys;
    use tessera_proto::kms::v1::DeviceList;

    use super::*;
    use crate::{
        NewCard, Verifier, app_sign, kms_sign,
        record::Status,
        transparency::{
            Tree, inclusion_proof_message, leaf_hash, sign_checkpoint, verify_checkpoint,
        },
    };

    struct Device {
        keys: DeviceKeys,
        card: VerifiedCard,
    }

    struct World {
        app: SigningKey,
        kms: SigningKey,
        verifier: Verifier,
        /// Log entries so far (exact bytes).
        log: Vec<Vec<u8>>,
    }

    impl World {
        fn new() -> Self {
            let app = SigningKey::generate().unwrap();
            let kms = SigningKey::generate().unwrap();
            let verifier = Verifier::new(app.verifying_key(), kms.verifying_key());
            Self {
                app,
                kms,
                verifier,
                // Leaf 0 stands for the cards' registrations, which precede
                // every statement.
                log: vec![b"registrations".to_vec()],
            }
        }

        fn device(&self, identity: &str) -> Device {
            let keys = DeviceKeys::generate().unwrap();
            let mut card = NewCard {
                identity,
                kind: CardKind::Client,
                device_name: "d",
                created_at: 0,
                previous_card_id: None,
            }
            .self_signed(&keys)
            .unwrap();
            app_sign(&mut card, &self.app);
            kms_sign(&mut card, &self.kms);
            let card = self
                .verifier
                .verify(&card, Some(identity), CardKind::Client)
                .unwrap();
            Device { keys, card }
        }

        fn statement(
            &self,
            state: &DeviceListState,
            action: Action,
            subject: &Device,
            signer: &Device,
        ) -> ParsedStatement {
            let mut signed = NewStatement {
                identity: state.identity(),
                seqno: state.length(),
                previous_hash: state.head(),
                action,
                subject: subject.card.id(),
                signer: signer.card.id(),
                created_at: 1,
            }
            .sign(&signer.keys.signing);
            if action.needs_app_signature() {
                app_cosign(&mut signed, &self.app);
            }
            ParsedStatement::parse(signed).unwrap()
        }

        fn log_statement(&mut self, s: &ParsedStatement) -> u64 {
            self.log.push(transparency::device_statement_entry(
                s.signed(),
                s.identity(),
                100 + self.log.len() as i64,
            ));
            self.log.len() as u64 - 1
        }

        /// The statements at `indices` served from the log as it stands.
        fn serve(&self, indices: &[u64], length: u64) -> (DeviceList, VerifiedCheckpoint) {
            let tree = Tree::from_leaves(self.log.iter().map(|e| leaf_hash(e)));
            let size = tree.len();
            let cp = sign_checkpoint(&self.kms, size, &tree.root(size).unwrap(), 0);
            let cp = verify_checkpoint(&cp, &self.kms.verifying_key()).unwrap();
            let statements = indices
                .iter()
                .map(|&i| LoggedStatement {
                    entry: self.log[i as usize].clone(),
                    inclusion: Some(inclusion_proof_message(
                        i,
                        size,
                        tree.inclusion_proof(i, size).unwrap(),
                    )),
                })
                .collect();
            (
                DeviceList {
                    length,
                    statements,
                    truncated: false,
                    trusted_card_ids: Vec::new(),
                },
                cp,
            )
        }
    }

    fn record(card: &VerifiedCard) -> CheckedRecord {
        CheckedRecord {
            card: card.clone(),
            status: Status::Active,
            registered_index: 0,
            registered_at: 0,
            revocation: None,
        }
    }

    #[test]
    fn genesis_add_remove_and_reset_change_the_trusted_set() {
        let w = World::new();
        let (phone, laptop, tablet) = (w.device("bob"), w.device("bob"), w.device("bob"));
        let app = w.app.verifying_key();
        let mut state = DeviceListState::empty("bob");
        let s = w.statement(&state, Action::Genesis, &phone, &phone);
        assert_eq!(
            state.apply(&s, &phone.card, &app).unwrap(),
            Change::Genesis(phone.card.id())
        );
        let s = w.statement(&state, Action::Add, &laptop, &phone);
        state.apply(&s, &phone.card, &app).unwrap();
        assert_eq!(state.trusted().len(), 2);
        // The laptop, now trusted, removes the phone.
        let s = w.statement(&state, Action::Remove, &phone, &laptop);
        assert_eq!(
            state.apply(&s, &laptop.card, &app).unwrap(),
            Change::Removed(phone.card.id())
        );
        assert!(!state.is_trusted(&phone.card.id()));
        // A reset replaces everything with the tablet.
        let s = w.statement(&state, Action::Reset, &tablet, &tablet);
        assert_eq!(
            state.apply(&s, &tablet.card, &app).unwrap(),
            Change::Reset {
                new: tablet.card.id(),
                replaced: vec![laptop.card.id()]
            }
        );
        assert_eq!(state.trusted(), &BTreeSet::from([tablet.card.id()]));
        assert_eq!(state.length(), 4);
        assert_eq!(state.head(), Some(s.hash()));
    }

    #[test]
    fn each_rule_is_enforced() {
        let w = World::new();
        let (phone, laptop, rogue) = (w.device("bob"), w.device("bob"), w.device("bob"));
        let app = w.app.verifying_key();
        let mut state = DeviceListState::empty("bob");
        let g = w.statement(&state, Action::Genesis, &phone, &phone);
        state.apply(&g, &phone.card, &app).unwrap();

        // A device nobody approved cannot add itself (the hostile server's card).
        let forged = w.statement(&state, Action::Add, &rogue, &rogue);
        assert_eq!(
            state.clone().apply(&forged, &rogue.card, &app),
            Err(DeviceListError::SignerNotTrusted(rogue.card.id()))
        );
        // A signature by another key than the named signer's.
        let mut signed = NewStatement {
            identity: "bob",
            seqno: 1,
            previous_hash: state.head(),
            action: Action::Add,
            subject: rogue.card.id(),
            signer: phone.card.id(),
            created_at: 1,
        }
        .sign(&rogue.keys.signing);
        let bad = ParsedStatement::parse(signed.clone()).unwrap();
        assert_eq!(
            state.clone().apply(&bad, &phone.card, &app),
            Err(DeviceListError::BadSignature)
        );
        // The right key but checked against another card.
        signed = NewStatement {
            identity: "bob",
            seqno: 1,
            previous_hash: state.head(),
            action: Action::Add,
            subject: rogue.card.id(),
            signer: phone.card.id(),
            created_at: 1,
        }
        .sign(&phone.keys.signing);
        let ok = ParsedStatement::parse(signed).unwrap();
        assert_eq!(
            state.clone().apply(&ok, &laptop.card, &app),
            Err(DeviceListError::SignerMismatch)
        );
        // A reset co-signed by another app key.
        let mut reset = NewStatement {
            identity: "bob",
            seqno: 1,
            previous_hash: state.head(),
            action: Action::Reset,
            subject: rogue.card.id(),
            signer: rogue.card.id(),
            created_at: 1,
        }
        .sign(&rogue.keys.signing);
        app_cosign(&mut reset, &SigningKey::generate().unwrap());
        assert_eq!(
            state
                .clone()
                .apply(&ParsedStatement::parse(reset).unwrap(), &rogue.card, &app),
            Err(DeviceListError::BadAppSignature(Action::Reset))
        );
        // Stale: signed against the genesis twice.
        let mut s2 = state.clone();
        s2.apply(&ok, &phone.card, &app).unwrap();
        assert_eq!(
            s2.clone().apply(&ok, &phone.card, &app),
            Err(DeviceListError::Stale {
                length: 2,
                found: 1
            })
        );
        // Adding a trusted card again, removing an untrusted one.
        let again = w.statement(&s2, Action::Add, &rogue, &phone);
        assert_eq!(
            s2.clone().apply(&again, &phone.card, &app),
            Err(DeviceListError::AlreadyTrusted(rogue.card.id()))
        );
        let remove = w.statement(&s2, Action::Remove, &laptop, &phone);
        assert_eq!(
            s2.clone().apply(&remove, &phone.card, &app),
            Err(DeviceListError::NotTrusted(laptop.card.id()))
        );
        // Another identity's statement.
        let alice = w.device("alice");
        let other = w.statement(
            &DeviceListState::empty("alice"),
            Action::Genesis,
            &alice,
            &alice,
        );
        assert!(matches!(
            DeviceListState::empty("bob").apply(&other, &alice.card, &app),
            Err(DeviceListError::WrongIdentity { .. })
        ));
    }

    #[test]
    fn shapes_are_checked_at_parse() {
        let w = World::new();
        let phone = w.device("bob");
        let base = NewStatement {
            identity: "bob",
            seqno: 0,
            previous_hash: None,
            action: Action::Genesis,
            subject: phone.card.id(),
            signer: phone.card.id(),
            created_at: 1,
        };
        // A genesis without the AppKey's co-signature.
        assert!(matches!(
            ParsedStatement::parse(base.sign(&phone.keys.signing)),
            Err(DeviceListError::Malformed(_))
        ));
        // An add at seqno 0, a genesis later, a 31-byte parent.
        let mut s = base.clone();
        s.action = Action::Add;
        assert!(ParsedStatement::parse(s.sign(&phone.keys.signing)).is_err());
        let mut s = base.clone();
        s.seqno = 3;
        s.previous_hash = Some([1; 32]);
        let mut signed = s.sign(&phone.keys.signing);
        app_cosign(&mut signed, &w.app);
        assert!(ParsedStatement::parse(signed).is_err());
        let mut signed = base.sign(&phone.keys.signing);
        signed.statement.push(0xff);
        assert!(ParsedStatement::parse(signed).is_err());
    }

    #[test]
    fn a_served_list_extends_what_was_verified_and_nothing_else() {
        let mut w = World::new();
        let (phone, laptop, tablet) = (w.device("bob"), w.device("bob"), w.device("bob"));
        let app = w.app.verifying_key();
        let cards = [&phone, &laptop, &tablet]
            .map(|d| (d.card.id(), record(&d.card)))
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();
        let lookup = |id: &CardId| cards.get(id).cloned();

        let mut truth = DeviceListState::empty("bob");
        let g = w.statement(&truth, Action::Genesis, &phone, &phone);
        truth.apply(&g, &phone.card, &app).unwrap();
        let i0 = w.log_statement(&g);
        let a = w.statement(&truth, Action::Add, &laptop, &phone);
        truth.apply(&a, &phone.card, &app).unwrap();
        let i1 = w.log_statement(&a);

        // First contact: the whole list.
        let (list, cp) = w.serve(&[i0, i1], 2);
        let served = ServedList::check(&list, "bob", &cp).unwrap();
        let mut alice_view = DeviceListState::empty("bob");
        let changes = served.extend(&mut alice_view, &lookup, &app).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(alice_view, truth);

        // The list grows; alice asks from her head.
        let b = w.statement(&truth, Action::Add, &tablet, &laptop);
        let mut grown = truth.clone();
        grown.apply(&b, &laptop.card, &app).unwrap();
        let i2 = w.log_statement(&b);
        let (list, cp) = w.serve(&[i1, i2], 3);
        let mut view = alice_view.clone();
        ServedList::check(&list, "bob", &cp)
            .unwrap()
            .extend(&mut view, &lookup, &app)
            .unwrap();
        assert_eq!(view, grown);

        // Rolled back: the key service shows 2 statements to someone who saw 3.
        let (list, cp) = w.serve(&[i1], 2);
        assert_eq!(
            ServedList::check(&list, "bob", &cp)
                .unwrap()
                .extend(&mut view.clone(), &lookup, &app)
                .unwrap_err(),
            DeviceListError::Rollback {
                known: 3,
                served: 2
            }
        );
        // Withheld: the right length, no statements.
        let (list, cp) = w.serve(&[], 3);
        assert!(matches!(
            ServedList::check(&list, "bob", &cp)
                .unwrap()
                .extend(&mut view.clone(), &lookup, &app),
            Err(DeviceListError::Rollback { .. })
        ));

        // A fork: another statement 2, validly signed and logged, shown to
        // someone who verified the first.
        let fork = w.statement(&truth, Action::Remove, &phone, &laptop);
        let i3 = w.log_statement(&fork);
        let (list, cp) = w.serve(&[i3], 3);
        assert_eq!(
            ServedList::check(&list, "bob", &cp)
                .unwrap()
                .extend(&mut view.clone(), &lookup, &app)
                .unwrap_err(),
            DeviceListError::Fork { seqno: 2 }
        );
        // ... and as a continuation of an older head.
        let (list, cp) = w.serve(&[i1, i3], 3);
        let mut older = alice_view.clone();
        ServedList::check(&list, "bob", &cp)
            .unwrap()
            .extend(&mut older, &lookup, &app)
            .unwrap();
        let (list, cp) = w.serve(&[i3, i2], 3);
        assert!(
            ServedList::check(&list, "bob", &cp).is_err(),
            "seqnos must be consecutive"
        );

        // A statement whose proof is for another entry.
        let (mut list, cp) = w.serve(&[i0, i1], 2);
        list.statements[1].inclusion = list.statements[0].inclusion.clone();
        assert!(matches!(
            ServedList::check(&list, "bob", &cp),
            Err(DeviceListError::Proof(CardError::BadInclusionProof(_)))
        ));
        // A signer revoked before it signed.
        let mut revoked = cards.clone();
        revoked.get_mut(&phone.card.id()).unwrap().revocation =
            Some(crate::record::LoggedRevocation {
                by: crate::revocation::RevokedBy::App,
                revoked_at: 0,
                leaf_index: 1,
                logged_at: 0,
            });
        let (list, cp) = w.serve(&[i0, i1], 2);
        let mut fresh = DeviceListState::empty("bob");
        assert_eq!(
            ServedList::check(&list, "bob", &cp)
                .unwrap()
                .extend(&mut fresh, &|id| revoked.get(id).cloned(), &app)
                .unwrap_err(),
            DeviceListError::SignerRevoked(phone.card.id())
        );
    }

    #[test]
    fn a_full_list_still_takes_a_reset_and_seqnos_are_bounded() {
        let w = World::new();
        let (phone, laptop, tablet) = (w.device("bob"), w.device("bob"), w.device("bob"));
        let app = w.app.verifying_key();
        let full = DeviceListState::resume(
            "bob",
            MAX_STATEMENTS - RESET_HEADROOM,
            Some([7; 32]),
            BTreeSet::from([phone.card.id(), laptop.card.id()]),
        )
        .unwrap();
        let remove = w.statement(&full, Action::Remove, &laptop, &phone);
        assert_eq!(
            full.clone().apply(&remove, &phone.card, &app),
            Err(DeviceListError::Full)
        );
        let reset = w.statement(&full, Action::Reset, &tablet, &tablet);
        let mut after = full.clone();
        after.apply(&reset, &tablet.card, &app).unwrap();
        assert_eq!(after.trusted(), &BTreeSet::from([tablet.card.id()]));
        // No statement may claim a seqno beyond the cap (or near u64::MAX).
        let mut s = NewStatement {
            identity: "bob",
            seqno: u64::MAX,
            previous_hash: Some([1; 32]),
            action: Action::Add,
            subject: tablet.card.id(),
            signer: phone.card.id(),
            created_at: 0,
        };
        assert_eq!(
            ParsedStatement::parse(s.sign(&phone.keys.signing)).unwrap_err(),
            DeviceListError::Full
        );
        s.seqno = MAX_STATEMENTS;
        assert!(ParsedStatement::parse(s.sign(&phone.keys.signing)).is_err());
    }

    #[test]
    fn a_first_look_must_start_at_the_genesis() {
        let mut w = World::new();
        let phone = w.device("bob");
        let app = w.app.verifying_key();
        let s = w.statement(
            &DeviceListState::empty("bob"),
            Action::Genesis,
            &phone,
            &phone,
        );
        w.log_statement(&s);
        // A length with no statements, to someone who never saw the list.
        let (list, cp) = w.serve(&[], 1);
        let served = ServedList::check(&list, "bob", &cp).unwrap();
        assert!(matches!(
            served.extend(&mut DeviceListState::empty("bob"), &|_| None, &app),
            Err(DeviceListError::Malformed(_))
        ));
    }

    #[test]
    fn a_first_look_applies_the_rules_from_the_latest_reset() {
        let mut w = World::new();
        let (old, other, new) = (w.device("bob"), w.device("bob"), w.device("bob"));
        let app = w.app.verifying_key();
        let mut truth = DeviceListState::empty("bob");
        let mut indices = Vec::new();
        for (action, subject, signer) in [
            (Action::Genesis, &old, &old),
            (Action::Add, &other, &old),
            (Action::Reset, &new, &new),
        ] {
            let s = w.statement(&truth, action, subject, signer);
            truth.apply(&s, &signer.card, &app).unwrap();
            indices.push(w.log_statement(&s));
        }
        // Only the reset's signer is looked up: the cards before it may no
        // longer verify at all (an AppKey rotated since).
        let (list, cp) = w.serve(&indices, 3);
        let served = ServedList::check(&list, "bob", &cp).unwrap();
        let mut view = DeviceListState::empty("bob");
        assert_eq!(served.signers(&view), BTreeSet::from([new.card.id()]));
        let new_record = record(&new.card);
        served
            .extend(
                &mut view,
                &|id| (*id == new.card.id()).then(|| new_record.clone()),
                &app,
            )
            .unwrap();
        assert_eq!(view, truth);
        // The reset must still chain onto the statements before it.
        let stray = w.statement(
            &DeviceListState::resume("bob", 2, Some([9; 32]), BTreeSet::new()).unwrap(),
            Action::Reset,
            &new,
            &new,
        );
        let stray_index = w.log_statement(&stray);
        let (list, cp) = w.serve(&[indices[0], indices[1], stray_index], 3);
        assert!(matches!(
            ServedList::check(&list, "bob", &cp).unwrap().extend(
                &mut DeviceListState::empty("bob"),
                &|id| (*id == new.card.id()).then(|| new_record.clone()),
                &app
            ),
            Err(DeviceListError::Fork { seqno: 2 })
        ));
    }

    #[test]
    fn approval_codes_are_twelve_digits_and_differ() {
        let a = approval_code(&CardId::of_snapshot(b"a"));
        let b = approval_code(&CardId::of_snapshot(b"b"));
        assert_eq!(a.len(), 14);
        assert!(a.replace(' ', "").bytes().all(|c| c.is_ascii_digit()));
        assert_ne!(a, b);
        assert_eq!(a, approval_code(&CardId::of_snapshot(b"a")));
    }
}
