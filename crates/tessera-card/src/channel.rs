//! Channel membership (protocol v2): who is in a channel is decided by its
//! members, not by the app server.
//!
//! A channel's state is a hash-chained sequence of [`ChannelStatement`]s,
//! each signed by the device of a member allowed to make it; each one starts
//! a new epoch. The app server checks and orders them (compare-and-set on the
//! head) and serves them; it cannot make one. The same
//! [`ChannelState::apply`] runs at the app server before it accepts a
//! statement and at every client, from the creation or from the state the
//! client kept.
//!
//! Rules: the creator is an admin of the members it lists; admins add and
//! remove members, change roles, the name and the visibility; any member may
//! leave; while members remain, at least one of them is an admin.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use tessera_crypto::{SignatureContext, VerifyingKey};
use tessera_proto::{
    Message as _,
    channel::v1::{
        self as pb, ChannelStatement, HistoryVisibility, MemberEntry, MemberRole,
        SignedChannelStatement, channel_statement::Change as PbChange,
    },
};
use thiserror::Error;

use crate::{CardError, CardId, CardKind, VerifiedCard, transparency::Hash, validate_identity};

/// Format version of channel statements.
pub const STATEMENT_VERSION: u32 = 1;
/// Most members a channel may have.
pub const MAX_MEMBERS: usize = 2000;
/// Most statements one channel's chain may hold.
pub const MAX_STATEMENTS: u64 = 100_000;
/// The last statements of a chain, kept for removing, leaving and demoting:
/// a member who fills the chain with renames cannot stop others from
/// removing them or leaving.
pub const RESERVED_STATEMENTS: u64 = 1000;
/// Most statements in one `GetChannelChain` answer.
pub const MAX_CHAIN_PAGE_ENTRIES: usize = 1000;
/// Most bytes of encoded entries in one `GetChannelChain` answer after its
/// first entry (which always comes, whatever its size).
pub const MAX_CHAIN_PAGE_BYTES: usize = 1024 * 1024;
/// Longest encoded statement, in bytes (a creation listing 2000 members of
/// the longest identities fits).
pub const MAX_STATEMENT_BYTES: usize = 256 * 1024;
/// Longest channel name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

const HASH_LABEL: &[u8] = b"tessera/v2/channel/hash";

/// `SHA-256("tessera/v2/channel/hash" || 0x00 || statement)`.
pub fn statement_hash(statement: &[u8]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(HASH_LABEL);
    ctx.update(&[0x00]);
    ctx.update(statement);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
}

impl Role {
    pub fn to_proto(self) -> MemberRole {
        match self {
            Self::Member => MemberRole::Member,
            Self::Admin => MemberRole::Admin,
        }
    }

    pub fn from_proto(value: i32) -> Result<Self, ChannelError> {
        match MemberRole::try_from(value) {
            Ok(MemberRole::Member) => Ok(Self::Member),
            Ok(MemberRole::Admin) => Ok(Self::Admin),
            _ => Err(ChannelError::Malformed("unknown member role")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Member => "member",
            Self::Admin => "admin",
        })
    }
}

/// Who may read which history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Members see the whole history.
    Shared,
    /// Members see the messages from the epoch they were added on.
    Joined,
}

impl Visibility {
    pub fn to_proto(self) -> HistoryVisibility {
        match self {
            Self::Shared => HistoryVisibility::Shared,
            Self::Joined => HistoryVisibility::Joined,
        }
    }

    pub fn from_proto(value: i32) -> Result<Self, ChannelError> {
        match HistoryVisibility::try_from(value) {
            Ok(HistoryVisibility::Shared) => Ok(Self::Shared),
            Ok(HistoryVisibility::Joined) => Ok(Self::Joined),
            _ => Err(ChannelError::Malformed("unknown history visibility")),
        }
    }
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shared => "shared",
            Self::Joined => "joined",
        })
    }
}

/// What one statement changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Create {
        name: String,
        visibility: Visibility,
        members: Vec<(String, Role)>,
    },
    Add {
        identity: String,
        role: Role,
    },
    Remove {
        identity: String,
    },
    SetRole {
        identity: String,
        role: Role,
    },
    SetVisibility(Visibility),
    Rename(String),
    Leave,
}

impl Change {
    /// Whether the change only takes members or rights away (a removal, a
    /// departure, a demotion): what the chain's last statements are kept for.
    pub fn takes_away(&self) -> bool {
        matches!(
            self,
            Self::Remove { .. }
                | Self::Leave
                | Self::SetRole {
                    role: Role::Member,
                    ..
                }
        )
    }

    fn to_proto(&self) -> PbChange {
        let entry = |identity: &str, role: Role| MemberEntry {
            identity: identity.to_owned(),
            role: role.to_proto() as i32,
        };
        match self {
            Self::Create {
                name,
                visibility,
                members,
            } => PbChange::Create(pb::Create {
                name: name.clone(),
                visibility: visibility.to_proto() as i32,
                members: members.iter().map(|(i, r)| entry(i, *r)).collect(),
            }),
            Self::Add { identity, role } => PbChange::Add(entry(identity, *role)),
            Self::Remove { identity } => PbChange::Remove(identity.clone()),
            Self::SetRole { identity, role } => PbChange::SetRole(entry(identity, *role)),
            Self::SetVisibility(v) => PbChange::SetVisibility(v.to_proto() as i32),
            Self::Rename(name) => PbChange::Rename(name.clone()),
            Self::Leave => PbChange::Leave(pb::Leave {}),
        }
    }

    fn from_proto(change: Option<PbChange>) -> Result<Self, ChannelError> {
        let entry = |e: MemberEntry| -> Result<(String, Role), ChannelError> {
            validate_identity(&e.identity)?;
            Ok((e.identity, Role::from_proto(e.role)?))
        };
        Ok(match change.ok_or(ChannelError::Malformed("no change"))? {
            PbChange::Create(c) => {
                validate_name(&c.name)?;
                let members = c
                    .members
                    .into_iter()
                    .map(entry)
                    .collect::<Result<Vec<_>, _>>()?;
                if members.is_empty() || members.len() > MAX_MEMBERS {
                    return Err(ChannelError::Malformed(
                        "a channel is created with 1 to 2000 members",
                    ));
                }
                if members.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return Err(ChannelError::Malformed(
                        "members must be listed once each, in ascending identity order",
                    ));
                }
                Self::Create {
                    name: c.name,
                    visibility: Visibility::from_proto(c.visibility)?,
                    members,
                }
            }
            PbChange::Add(e) => {
                let (identity, role) = entry(e)?;
                Self::Add { identity, role }
            }
            PbChange::Remove(identity) => {
                validate_identity(&identity)?;
                Self::Remove { identity }
            }
            PbChange::SetRole(e) => {
                let (identity, role) = entry(e)?;
                Self::SetRole { identity, role }
            }
            PbChange::SetVisibility(v) => Self::SetVisibility(Visibility::from_proto(v)?),
            PbChange::Rename(name) => {
                validate_name(&name)?;
                Self::Rename(name)
            }
            PbChange::Leave(_) => Self::Leave,
        })
    }
}

fn validate_name(name: &str) -> Result<(), ChannelError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.trim().is_empty()
        || name.chars().any(char::is_control)
    {
        return Err(ChannelError::Malformed(
            "a channel name is 1 to 128 bytes of printable text",
        ));
    }
    Ok(())
}

/// A channel id is 32 lowercase hex digits.
pub fn validate_channel_id(id: &str) -> Result<(), ChannelError> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ChannelError::Malformed(
            "a channel id is 32 lowercase hex digits",
        ));
    }
    Ok(())
}

/// Why a channel statement or chain was refused. Every variant but `Stale`
/// is a security failure when it comes from a server.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelError {
    #[error("malformed channel statement: {0}")]
    Malformed(&'static str),
    #[error("unsupported channel statement version {0}")]
    UnsupportedVersion(u32),
    #[error("the statement is for channel {found}, not {expected}")]
    WrongChannel { expected: String, found: String },
    #[error("the statement's signer card is not the card given to check it")]
    SignerMismatch,
    #[error("the statement's signature does not verify with its signer's card")]
    BadSignature,
    #[error("{0} is not a member of the channel at that epoch")]
    NotAMember(String),
    #[error("{0} is not an admin of the channel at that epoch")]
    NotAnAdmin(String),
    #[error("{0} is already a member")]
    AlreadyMember(String),
    #[error("the channel would have more than {MAX_MEMBERS} members")]
    TooManyMembers,
    #[error("the channel would be left without an admin: make another member admin first")]
    NoAdminLeft,
    #[error("a member leaves with a Leave statement, not by removing themselves")]
    RemovesSelf,
    /// At the app server, not an attack: the statement was made against an
    /// older head (it answers ABORTED); refetch the chain and sign again.
    #[error(
        "statement {found} does not extend the chain's head (the chain has {length} statements): refetch it"
    )]
    Stale { length: u64, found: u64 },
    #[error("the channel's chain is full ({MAX_STATEMENTS} statements)")]
    Full,
    #[error(
        "the chain was rolled back: {known} statements were verified before, the server shows {served}"
    )]
    Rollback { known: u64, served: u64 },
    #[error("the chain forked at epoch {epoch}: it does not extend the chain verified before")]
    Fork { epoch: u64 },
    #[error("card: {0}")]
    Card(#[from] CardError),
}

/// A statement whose fields are well formed; no signature checked yet.
#[derive(Clone)]
pub struct ParsedChannelStatement {
    signed: SignedChannelStatement,
    hash: Hash,
    channel_id: String,
    epoch: u64,
    previous_hash: Option<Hash>,
    signer_identity: String,
    signer: CardId,
    created_at: i64,
    change: Change,
}

impl fmt::Debug for ParsedChannelStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedChannelStatement")
            .field("channel_id", &self.channel_id)
            .field("epoch", &self.epoch)
            .field("signer_identity", &self.signer_identity)
            .field("change", &self.change)
            .finish_non_exhaustive()
    }
}

impl ParsedChannelStatement {
    /// Checks the statement's shape: version, channel id, epoch and parent,
    /// signer, the change's fields, signature length.
    pub fn parse(signed: SignedChannelStatement) -> Result<Self, ChannelError> {
        if signed.statement.len() > MAX_STATEMENT_BYTES {
            return Err(ChannelError::Malformed("statement longer than 256 KiB"));
        }
        let s = ChannelStatement::decode(signed.statement.as_slice())
            .map_err(|_| ChannelError::Malformed("not a ChannelStatement"))?;
        // One encoding per statement (as for cards): no padding with
        // unknown fields, no second spelling of the same statement.
        if s.encode_to_vec() != signed.statement {
            return Err(ChannelError::Malformed(
                "statement is not in its canonical encoding",
            ));
        }
        if s.version != STATEMENT_VERSION {
            return Err(ChannelError::UnsupportedVersion(s.version));
        }
        validate_channel_id(&s.channel_id)?;
        if s.epoch >= MAX_STATEMENTS {
            return Err(ChannelError::Full);
        }
        let previous_hash = match (s.epoch, s.previous_hash.len()) {
            (0, 0) => None,
            (_, 32) if s.epoch > 0 => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&s.previous_hash);
                Some(h)
            }
            _ => {
                return Err(ChannelError::Malformed(
                    "epoch 0 names no parent; every later one names a 32-byte parent",
                ));
            }
        };
        validate_identity(&s.signer_identity)?;
        let signer = CardId::from_bytes(&s.signer_card_id)
            .map_err(|_| ChannelError::Malformed("signer card id must be 32 bytes"))?;
        let change = Change::from_proto(s.change)?;
        if matches!(change, Change::Create { .. }) != (s.epoch == 0) {
            return Err(ChannelError::Malformed(
                "a creation is epoch 0 and epoch 0 is a creation",
            ));
        }
        if signed.signature.len() != tessera_crypto::SIGNATURE_LEN {
            return Err(ChannelError::Malformed("signature must be 64 bytes"));
        }
        Ok(Self {
            hash: statement_hash(&signed.statement),
            signed,
            channel_id: s.channel_id,
            epoch: s.epoch,
            previous_hash,
            signer_identity: s.signer_identity,
            signer,
            created_at: s.created_at,
            change,
        })
    }

    pub fn hash(&self) -> Hash {
        self.hash
    }
    pub fn channel_id(&self) -> &str {
        &self.channel_id
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn previous_hash(&self) -> Option<Hash> {
        self.previous_hash
    }
    pub fn signer_identity(&self) -> &str {
        &self.signer_identity
    }
    pub fn signer(&self) -> CardId {
        self.signer
    }
    pub fn created_at(&self) -> i64 {
        self.created_at
    }
    pub fn change(&self) -> &Change {
        &self.change
    }
    pub fn signed(&self) -> &SignedChannelStatement {
        &self.signed
    }
}

/// What a new statement says; [`NewChannelStatement::sign`] makes it.
#[derive(Debug, Clone)]
pub struct NewChannelStatement<'a> {
    pub channel_id: &'a str,
    pub epoch: u64,
    /// Hash of the statement at `epoch - 1`; `None` for a creation.
    pub previous_hash: Option<Hash>,
    pub signer_identity: &'a str,
    pub signer: CardId,
    /// Unix seconds.
    pub created_at: i64,
    pub change: Change,
}

impl NewChannelStatement<'_> {
    /// Encodes the statement once and signs it with the signer card's key.
    pub fn sign(&self, key: &tessera_crypto::SigningKey) -> SignedChannelStatement {
        let statement = ChannelStatement {
            version: STATEMENT_VERSION,
            channel_id: self.channel_id.to_owned(),
            epoch: self.epoch,
            previous_hash: self.previous_hash.map(|h| h.to_vec()).unwrap_or_default(),
            signer_identity: self.signer_identity.to_owned(),
            signer_card_id: self.signer.to_vec(),
            created_at: self.created_at,
            change: Some(self.change.to_proto()),
        }
        .encode_to_vec();
        let signature = key
            .sign(SignatureContext::ChannelStatement, &statement)
            .to_vec();
        SignedChannelStatement {
            statement,
            signature,
        }
    }
}

/// A member as the verified chain has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub role: Role,
    /// The epoch whose statement added the member (0: the creation).
    pub added_at: u64,
    /// Who added them (the creator for epoch 0).
    pub added_by: String,
}

/// Epochs during which an identity was a member: from the epoch whose
/// statement added it up to, not including, the one whose statement removed
/// it (`None`: still a member).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub from: u64,
    pub until: Option<u64>,
}

impl Span {
    fn contains(&self, epoch: u64) -> bool {
        self.from <= epoch && self.until.is_none_or(|until| epoch < until)
    }
}

/// The signer of a statement as its checker knows it: a client's verified
/// card, or the app server's record of an enrolled device.
#[derive(Debug, Clone, Copy)]
pub struct StatementSigner<'a> {
    pub identity: &'a str,
    pub card_id: CardId,
    pub key: &'a VerifyingKey,
}

impl<'a> StatementSigner<'a> {
    /// The signer a verified card makes; `None` for a card that is not a
    /// client device (an organisation card is never a member).
    pub fn of(card: &'a VerifiedCard) -> Option<Self> {
        (card.kind() == CardKind::Client).then(|| Self {
            identity: card.identity(),
            card_id: card.id(),
            key: card.signing_key(),
        })
    }
}

/// A channel's state after verifying its chain up to a head: what every
/// statement so far made of it, the hash of each statement (to check the
/// head a message names at its epoch) and who was a member when (to check
/// a message's sender and recipients at its epoch).
///
/// A client keeps the whole state; the app server resumes one from its
/// records ([`ChannelState::resume`]), which knows only the head's hash and
/// the current members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    channel_id: String,
    /// Epoch of `hashes[0]`: 0 for a state verified from the creation.
    base: u64,
    #[serde(with = "hex_hashes")]
    hashes: Vec<Hash>,
    name: String,
    visibility: Visibility,
    members: BTreeMap<String, Member>,
    spans: BTreeMap<String, Vec<Span>>,
}

mod hex_hashes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::SerializeSeq};

    use crate::transparency::Hash;

    pub(super) fn serialize<S: Serializer>(hashes: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(hashes.len()))?;
        for h in hashes {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|h| {
                let bytes = hex::decode(h).map_err(D::Error::custom)?;
                Hash::try_from(bytes.as_slice()).map_err(|_| D::Error::custom("hash length"))
            })
            .collect()
    }
}

impl ChannelState {
    /// The channel before its creation.
    pub fn empty(channel_id: &str) -> Self {
        Self {
            channel_id: channel_id.to_owned(),
            base: 0,
            hashes: Vec::new(),
            name: String::new(),
            visibility: Visibility::Shared,
            members: BTreeMap::new(),
            spans: BTreeMap::new(),
        }
    }

    /// The state of a chain of `length` statements (at least one) whose head
    /// is `head`, as its keeper recorded it, to check the next statement
    /// against. It knows no earlier hash and no earlier membership.
    pub fn resume(
        channel_id: &str,
        length: u64,
        head: Hash,
        name: &str,
        visibility: Visibility,
        members: BTreeMap<String, Member>,
    ) -> Self {
        let spans = members
            .iter()
            .map(|(identity, m)| {
                (
                    identity.clone(),
                    vec![Span {
                        from: m.added_at,
                        until: None,
                    }],
                )
            })
            .collect();
        Self {
            channel_id: channel_id.to_owned(),
            base: length.saturating_sub(1),
            hashes: vec![head],
            name: name.to_owned(),
            visibility,
            members,
            spans,
        }
    }

    pub fn channel_id(&self) -> &str {
        &self.channel_id
    }
    /// Number of statements verified (the next epoch).
    pub fn length(&self) -> u64 {
        self.base + self.hashes.len() as u64
    }
    /// The current epoch (the last statement's), if the channel exists.
    pub fn epoch(&self) -> Option<u64> {
        self.length().checked_sub(1)
    }
    pub fn head(&self) -> Option<Hash> {
        self.hashes.last().copied()
    }
    /// The hash of the statement that started `epoch`, when known.
    pub fn hash_at(&self, epoch: u64) -> Option<Hash> {
        let i = epoch.checked_sub(self.base)?;
        self.hashes.get(usize::try_from(i).ok()?).copied()
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn visibility(&self) -> Visibility {
        self.visibility
    }
    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.members
    }
    pub fn member(&self, identity: &str) -> Option<&Member> {
        self.members.get(identity)
    }
    /// Whether `identity` was a member at `epoch`.
    pub fn was_member(&self, identity: &str, epoch: u64) -> bool {
        self.spans
            .get(identity)
            .is_some_and(|spans| spans.iter().any(|s| s.contains(epoch)))
    }
    /// Everyone who was a member at `epoch`, in identity order.
    pub fn members_at(&self, epoch: u64) -> Vec<&str> {
        self.spans
            .iter()
            .filter(|(_, spans)| spans.iter().any(|s| s.contains(epoch)))
            .map(|(identity, _)| identity.as_str())
            .collect()
    }
    /// The epoch from which `identity` is a member without a break (the
    /// start of its last span), if it is one now.
    pub fn member_since(&self, identity: &str) -> Option<u64> {
        let last = self.spans.get(identity)?.last()?;
        last.until.is_none().then_some(last.from)
    }

    fn admins(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.role == Role::Admin)
            .count()
    }

    fn admin(&self, identity: &str) -> Result<(), ChannelError> {
        match self.members.get(identity) {
            Some(m) if m.role == Role::Admin => Ok(()),
            Some(_) => Err(ChannelError::NotAnAdmin(identity.to_owned())),
            None => Err(ChannelError::NotAMember(identity.to_owned())),
        }
    }

    /// Checks that `statement` is the next one of this chain and allowed,
    /// then applies it. `signer` holds the key of the card the statement
    /// names (the caller also makes sure its owner's devices approve it).
    /// Checks, in order: channel, signer card, signature, position and
    /// parent, then the change's rule.
    pub fn apply(
        &mut self,
        statement: &ParsedChannelStatement,
        signer: &StatementSigner<'_>,
    ) -> Result<Change, ChannelError> {
        if statement.channel_id != self.channel_id {
            return Err(ChannelError::WrongChannel {
                expected: self.channel_id.clone(),
                found: statement.channel_id.clone(),
            });
        }
        if signer.card_id != statement.signer || signer.identity != statement.signer_identity {
            return Err(ChannelError::SignerMismatch);
        }
        signer
            .key
            .verify(
                SignatureContext::ChannelStatement,
                &statement.signed.statement,
                &statement.signed.signature,
            )
            .map_err(|_| ChannelError::BadSignature)?;
        if statement.epoch != self.length() || statement.previous_hash != self.head() {
            return Err(ChannelError::Stale {
                length: self.length(),
                found: statement.epoch,
            });
        }
        let by = statement.signer_identity.clone();
        let epoch = statement.epoch;
        if epoch >= MAX_STATEMENTS - RESERVED_STATEMENTS && !statement.change.takes_away() {
            return Err(ChannelError::Full);
        }
        // Every check comes before the first change to `self`.
        let (joined, gone): (Vec<String>, Option<String>) = match &statement.change {
            Change::Create {
                name,
                visibility,
                members,
            } => {
                if !members.iter().any(|(i, r)| *i == by && *r == Role::Admin) {
                    return Err(ChannelError::NotAnAdmin(by));
                }
                self.members = members
                    .iter()
                    .map(|(identity, role)| {
                        (
                            identity.clone(),
                            Member {
                                role: *role,
                                added_at: 0,
                                added_by: by.clone(),
                            },
                        )
                    })
                    .collect();
                self.name = name.clone();
                self.visibility = *visibility;
                (members.iter().map(|(i, _)| i.clone()).collect(), None)
            }
            Change::Add { identity, role } => {
                self.admin(&by)?;
                if self.members.contains_key(identity) {
                    return Err(ChannelError::AlreadyMember(identity.clone()));
                }
                if self.members.len() >= MAX_MEMBERS {
                    return Err(ChannelError::TooManyMembers);
                }
                self.members.insert(
                    identity.clone(),
                    Member {
                        role: *role,
                        added_at: epoch,
                        added_by: by.clone(),
                    },
                );
                (vec![identity.clone()], None)
            }
            Change::Remove { identity } => {
                self.admin(&by)?;
                if *identity == by {
                    return Err(ChannelError::RemovesSelf);
                }
                // The remover is an admin and stays: an admin remains.
                if self.members.remove(identity).is_none() {
                    return Err(ChannelError::NotAMember(identity.clone()));
                }
                (Vec::new(), Some(identity.clone()))
            }
            Change::SetRole { identity, role } => {
                self.admin(&by)?;
                let current = self
                    .members
                    .get(identity)
                    .ok_or_else(|| ChannelError::NotAMember(identity.clone()))?
                    .role;
                if current == *role {
                    // Nothing would change: refused, so the chain's last
                    // statements (kept for demotions) cannot be spent on it.
                    return Err(ChannelError::Malformed("the member already has that role"));
                }
                if current == Role::Admin && *role != Role::Admin && self.admins() == 1 {
                    return Err(ChannelError::NoAdminLeft);
                }
                if let Some(member) = self.members.get_mut(identity) {
                    member.role = *role;
                }
                (Vec::new(), None)
            }
            Change::SetVisibility(v) => {
                self.admin(&by)?;
                self.visibility = *v;
                (Vec::new(), None)
            }
            Change::Rename(name) => {
                self.admin(&by)?;
                self.name = name.clone();
                (Vec::new(), None)
            }
            Change::Leave => {
                let role = self
                    .members
                    .get(&by)
                    .ok_or_else(|| ChannelError::NotAMember(by.clone()))?
                    .role;
                if role == Role::Admin && self.admins() == 1 && self.members.len() > 1 {
                    return Err(ChannelError::NoAdminLeft);
                }
                self.members.remove(&by);
                (Vec::new(), Some(by.clone()))
            }
        };
        for identity in joined {
            self.spans.entry(identity).or_default().push(Span {
                from: epoch,
                until: None,
            });
        }
        if let Some(identity) = gone
            && let Some(span) = self.spans.get_mut(&identity).and_then(|s| s.last_mut())
        {
            span.until = Some(epoch);
        }
        self.hashes.push(statement.hash);
        Ok(statement.change.clone())
    }
}

/// Part of a channel's chain as the app server served it, parsed, not yet
/// applied.
#[derive(Debug, Clone)]
pub struct ServedChain {
    /// The length the server claims for the whole chain.
    pub length: u64,
    pub statements: Vec<ParsedChannelStatement>,
}

impl ServedChain {
    /// Parses `statements`, served from some epoch up to the head of a chain
    /// of `length` statements: each well formed, epochs consecutive, ending
    /// at the head.
    pub fn parse(
        statements: Vec<SignedChannelStatement>,
        length: u64,
    ) -> Result<Self, ChannelError> {
        if length > MAX_STATEMENTS || statements.len() as u64 > length {
            return Err(ChannelError::Full);
        }
        let statements = statements
            .into_iter()
            .map(ParsedChannelStatement::parse)
            .collect::<Result<Vec<_>, _>>()?;
        for pair in statements.windows(2) {
            // Parsing bounded every epoch below MAX_STATEMENTS.
            if pair[1].epoch != pair[0].epoch + 1 {
                return Err(ChannelError::Malformed("epochs are not consecutive"));
            }
        }
        if let Some(last) = statements.last()
            && last.epoch + 1 != length
        {
            return Err(ChannelError::Malformed(
                "the statements do not end at the chain's head",
            ));
        }
        Ok(Self { length, statements })
    }

    /// The (identity, card) of every signer [`ServedChain::extend`] applies
    /// to `state`: the cards to look up first.
    pub fn signers(&self, state: &ChannelState) -> Vec<(String, CardId)> {
        let skip = usize::from(state.head().is_some());
        self.statements
            .iter()
            .skip(skip)
            .map(|s| (s.signer_identity.clone(), s.signer))
            .collect()
    }

    /// Extends `state` (verified before, possibly empty) with this served
    /// part: with a kept head, the part starts with it (its epoch and hash
    /// equal: shown again); without, at the creation. A shorter chain than
    /// kept is a rollback, another statement at a kept epoch a fork.
    /// `signer` gives each signer's verified card, or `None` when the card
    /// does not verify or its owner's devices do not approve it.
    pub fn extend(
        &self,
        state: &mut ChannelState,
        signer: &dyn Fn(&str, &CardId) -> Option<VerifiedCard>,
    ) -> Result<Vec<ParsedChannelStatement>, ChannelError> {
        if self.length < state.length() {
            return Err(ChannelError::Rollback {
                known: state.length(),
                served: self.length,
            });
        }
        let mut rest = self.statements.as_slice();
        if let Some(head) = state.head() {
            let Some((first, tail)) = rest.split_first() else {
                return Err(ChannelError::Rollback {
                    known: state.length(),
                    served: self.length,
                });
            };
            if first.epoch + 1 != state.length() || first.hash != head {
                return Err(ChannelError::Fork { epoch: first.epoch });
            }
            rest = tail;
        } else if rest.first().is_some_and(|s| s.epoch != 0) || (rest.is_empty() && self.length > 0)
        {
            return Err(ChannelError::Malformed(
                "a chain seen for the first time must be shown from its creation",
            ));
        }
        let mut applied = Vec::with_capacity(rest.len());
        for s in rest {
            let card = signer(&s.signer_identity, &s.signer).ok_or_else(|| {
                ChannelError::NotAMember(format!(
                    "{} (card {} is not a device its owner's devices approved)",
                    s.signer_identity,
                    s.signer.short()
                ))
            })?;
            let signer = StatementSigner::of(&card).ok_or(ChannelError::SignerMismatch)?;
            state.apply(s, &signer).map_err(|e| match e {
                ChannelError::Stale { .. } => ChannelError::Fork { epoch: s.epoch },
                other => other,
            })?;
            applied.push(s.clone());
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use tessera_crypto::{DeviceKeys, SigningKey};

    use super::*;
    use crate::{NewCard, Verifier, app_sign, kms_sign};

    struct World {
        app: SigningKey,
        kms: SigningKey,
    }

    struct Device {
        keys: DeviceKeys,
        card: VerifiedCard,
    }

    impl World {
        fn new() -> Self {
            Self {
                app: SigningKey::generate().unwrap(),
                kms: SigningKey::generate().unwrap(),
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
            let card = Verifier::new(self.app.verifying_key(), self.kms.verifying_key())
                .verify(&card, Some(identity), CardKind::Client)
                .unwrap();
            Device { keys, card }
        }
    }

    impl Device {
        fn signer(&self) -> StatementSigner<'_> {
            StatementSigner::of(&self.card).unwrap()
        }
    }

    const CH: &str = "00112233445566778899aabbccddeeff";

    fn statement(state: &ChannelState, by: &Device, change: Change) -> ParsedChannelStatement {
        ParsedChannelStatement::parse(
            NewChannelStatement {
                channel_id: CH,
                epoch: state.length(),
                previous_hash: state.head(),
                signer_identity: by.card.identity(),
                signer: by.card.id(),
                created_at: 0,
                change,
            }
            .sign(&by.keys.signing),
        )
        .unwrap()
    }

    fn create(alice: &Device, others: &[&str]) -> (ChannelState, ParsedChannelStatement) {
        let mut members: Vec<(String, Role)> = others
            .iter()
            .map(|i| ((*i).to_owned(), Role::Member))
            .collect();
        members.push(("alice".into(), Role::Admin));
        members.sort();
        let mut state = ChannelState::empty(CH);
        let s = statement(
            &state,
            alice,
            Change::Create {
                name: "plans".into(),
                visibility: Visibility::Shared,
                members,
            },
        );
        state.apply(&s, &alice.signer()).unwrap();
        (state, s)
    }

    #[test]
    fn admins_manage_members_and_everyone_may_leave() {
        let w = World::new();
        let (alice, bob) = (w.device("alice"), w.device("bob"));
        let (mut state, _) = create(&alice, &["bob"]);
        assert_eq!(state.epoch(), Some(0));
        assert_eq!(state.members()["bob"].added_by, "alice");

        let add = statement(
            &state,
            &alice,
            Change::Add {
                identity: "carol".into(),
                role: Role::Member,
            },
        );
        state.apply(&add, &alice.signer()).unwrap();
        assert_eq!(state.members()["carol"].added_at, 1);
        // bob is no admin: he cannot add or remove.
        let eve = statement(
            &state,
            &bob,
            Change::Add {
                identity: "eve".into(),
                role: Role::Member,
            },
        );
        assert_eq!(
            state.clone().apply(&eve, &bob.signer()),
            Err(ChannelError::NotAnAdmin("bob".into()))
        );
        let kick = statement(
            &state,
            &bob,
            Change::Remove {
                identity: "carol".into(),
            },
        );
        assert_eq!(
            state.clone().apply(&kick, &bob.signer()),
            Err(ChannelError::NotAnAdmin("bob".into()))
        );
        // ... but he may leave.
        let leave = statement(&state, &bob, Change::Leave);
        state.apply(&leave, &bob.signer()).unwrap();
        assert!(state.member("bob").is_none());
        // The last admin cannot leave while others remain.
        let leave = statement(&state, &alice, Change::Leave);
        assert_eq!(
            state.clone().apply(&leave, &alice.signer()),
            Err(ChannelError::NoAdminLeft)
        );
        let promote = statement(
            &state,
            &alice,
            Change::SetRole {
                identity: "carol".into(),
                role: Role::Admin,
            },
        );
        state.apply(&promote, &alice.signer()).unwrap();
        let leave = statement(&state, &alice, Change::Leave);
        state.apply(&leave, &alice.signer()).unwrap();
        assert_eq!(state.members().len(), 1);
        assert_eq!(state.length(), 5);
        assert_eq!(state.hash_at(4), Some(leave.hash()));

        // Who was a member when: bob until his leave (epoch 2), carol from
        // her addition (1), alice until hers (4).
        assert_eq!(state.members_at(0), ["alice", "bob"]);
        assert_eq!(state.members_at(1), ["alice", "bob", "carol"]);
        assert_eq!(state.members_at(2), ["alice", "carol"]);
        assert_eq!(state.members_at(4), ["carol"]);
        assert!(state.was_member("bob", 1) && !state.was_member("bob", 2));
        assert!(!state.was_member("carol", 0) && state.was_member("carol", 4));
        assert_eq!(state.member_since("carol"), Some(1));
        assert_eq!(state.member_since("bob"), None);
        // A kept state reads back as it was written.
        let kept: ChannelState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(kept, state);
    }

    #[test]
    fn a_resumed_state_checks_the_next_statement_like_the_full_one() {
        let w = World::new();
        let (alice, bob) = (w.device("alice"), w.device("bob"));
        let (mut full, _) = create(&alice, &["bob"]);
        let add = statement(
            &full,
            &alice,
            Change::Add {
                identity: "carol".into(),
                role: Role::Member,
            },
        );
        full.apply(&add, &alice.signer()).unwrap();
        let mut resumed = ChannelState::resume(
            CH,
            full.length(),
            full.head().unwrap(),
            full.name(),
            full.visibility(),
            full.members().clone(),
        );
        assert_eq!(resumed.hash_at(0), None);
        assert_eq!(resumed.hash_at(1), full.hash_at(1));
        for (by, change) in [
            (&bob, Change::Rename("mine".into())),
            (&alice, Change::Rename("ours".into())),
        ] {
            let next = statement(&full, by, change);
            let (a, b) = (
                full.clone().apply(&next, &by.signer()),
                resumed.clone().apply(&next, &by.signer()),
            );
            assert_eq!(a, b);
        }
        let leave = statement(&full, &bob, Change::Leave);
        full.apply(&leave, &bob.signer()).unwrap();
        resumed.apply(&leave, &bob.signer()).unwrap();
        assert_eq!(resumed.length(), 3);
        assert_eq!(resumed.head(), full.head());
        assert_eq!(resumed.members(), full.members());
    }

    #[test]
    fn forgeries_stale_parents_and_other_channels_are_refused() {
        let w = World::new();
        let (alice, bob, eve) = (w.device("alice"), w.device("bob"), w.device("eve"));
        let (state, _) = create(&alice, &["bob"]);
        // A non-member cannot add herself.
        let ghost = statement(
            &state,
            &eve,
            Change::Add {
                identity: "eve".into(),
                role: Role::Admin,
            },
        );
        assert_eq!(
            state.clone().apply(&ghost, &eve.signer()),
            Err(ChannelError::NotAMember("eve".into()))
        );
        // Signed by one card, checked against another.
        let add = statement(
            &state,
            &alice,
            Change::Add {
                identity: "eve".into(),
                role: Role::Member,
            },
        );
        assert_eq!(
            state.clone().apply(&add, &bob.signer()),
            Err(ChannelError::SignerMismatch)
        );
        // A signature by another key.
        let mut forged = add.signed().clone();
        forged.signature = eve
            .keys
            .signing
            .sign(SignatureContext::ChannelStatement, &forged.statement)
            .to_vec();
        let forged = ParsedChannelStatement::parse(forged).unwrap();
        assert_eq!(
            state.clone().apply(&forged, &alice.signer()),
            Err(ChannelError::BadSignature)
        );
        // The same statement twice: the second names an old parent.
        let mut s = state.clone();
        s.apply(&add, &alice.signer()).unwrap();
        assert_eq!(
            s.clone().apply(&add, &alice.signer()),
            Err(ChannelError::Stale {
                length: 2,
                found: 1
            })
        );
        // A statement of another channel (replayed here).
        let mut other = ChannelState::empty("ffeeddccbbaa99887766554433221100");
        assert!(matches!(
            other.apply(&add, &alice.signer()),
            Err(ChannelError::WrongChannel { .. })
        ));
    }

    #[test]
    fn a_served_chain_extends_what_was_kept_and_nothing_else() {
        let w = World::new();
        let alice = w.device("alice");
        let (mut truth, genesis) = create(&alice, &["bob"]);
        let add = statement(
            &truth,
            &alice,
            Change::Add {
                identity: "carol".into(),
                role: Role::Member,
            },
        );
        truth.apply(&add, &alice.signer()).unwrap();
        let cards = |_: &str, id: &CardId| (*id == alice.card.id()).then(|| alice.card.clone());
        let served = |s: &[&ParsedChannelStatement], length| {
            ServedChain::parse(s.iter().map(|s| s.signed().clone()).collect(), length).unwrap()
        };
        // A first look, from the creation.
        let mut view = ChannelState::empty(CH);
        served(&[&genesis, &add], 2)
            .extend(&mut view, &cards)
            .unwrap();
        assert_eq!(view, truth);
        // Kept at epoch 0, shown from it: extends.
        let (mut kept, _) = create(&alice, &["bob"]);
        kept = ChannelState {
            hashes: vec![genesis.hash()],
            ..kept
        };
        served(&[&genesis, &add], 2)
            .extend(&mut kept, &cards)
            .unwrap();
        // Rolled back, withheld, forked.
        assert!(matches!(
            served(&[&genesis], 1).extend(&mut view.clone(), &cards),
            Err(ChannelError::Rollback {
                known: 2,
                served: 1
            })
        ));
        assert!(matches!(
            served(&[], 2).extend(&mut view.clone(), &cards),
            Err(ChannelError::Rollback { .. })
        ));
        let (_, other_genesis) = create(&alice, &["bob", "eve"]);
        let fork = statement(
            &ChannelState {
                hashes: vec![other_genesis.hash()],
                ..truth.clone()
            },
            &alice,
            Change::Add {
                identity: "eve".into(),
                role: Role::Member,
            },
        );
        assert!(matches!(
            served(&[&fork], 2).extend(&mut view.clone(), &cards),
            Err(ChannelError::Fork { epoch: 1 })
        ));
        // A signer whose card is not approved.
        let nobody = |_: &str, _: &CardId| None;
        assert!(matches!(
            served(&[&genesis, &add], 2).extend(&mut ChannelState::empty(CH), &nobody),
            Err(ChannelError::NotAMember(_))
        ));
    }

    #[test]
    fn shapes_are_checked_at_parse() {
        let w = World::new();
        let alice = w.device("alice");
        let base = NewChannelStatement {
            channel_id: CH,
            epoch: 0,
            previous_hash: None,
            signer_identity: "alice",
            signer: alice.card.id(),
            created_at: 0,
            change: Change::Create {
                name: "x".into(),
                visibility: Visibility::Joined,
                members: vec![("bob".into(), Role::Member), ("alice".into(), Role::Admin)],
            },
        };
        // Members out of order.
        assert!(ParsedChannelStatement::parse(base.sign(&alice.keys.signing)).is_err());
        let mut s = base.clone();
        s.change = Change::Create {
            name: "\u{7}".into(),
            visibility: Visibility::Joined,
            members: vec![("alice".into(), Role::Admin)],
        };
        assert!(ParsedChannelStatement::parse(s.sign(&alice.keys.signing)).is_err());
        let mut s = base.clone();
        s.channel_id = "NOT-HEX";
        assert!(ParsedChannelStatement::parse(s.sign(&alice.keys.signing)).is_err());
        let mut s = base.clone();
        s.epoch = 1;
        s.previous_hash = Some([0; 32]);
        assert!(ParsedChannelStatement::parse(s.sign(&alice.keys.signing)).is_err());
        let mut s = base;
        s.change = Change::Leave;
        assert!(ParsedChannelStatement::parse(s.sign(&alice.keys.signing)).is_err());
    }

    #[test]
    fn padded_non_canonical_and_oversized_statements_are_refused() {
        let w = World::new();
        let alice = w.device("alice");
        let signed = NewChannelStatement {
            channel_id: CH,
            epoch: 0,
            previous_hash: None,
            signer_identity: "alice",
            signer: alice.card.id(),
            created_at: 0,
            change: Change::Create {
                name: "x".into(),
                visibility: Visibility::Shared,
                members: vec![("alice".into(), Role::Admin)],
            },
        }
        .sign(&alice.keys.signing);
        assert!(ParsedChannelStatement::parse(signed.clone()).is_ok());
        // The same statement with an unknown field appended (field 99,
        // length-delimited), signed again: one statement, two spellings.
        let resign = |bytes: Vec<u8>| SignedChannelStatement {
            signature: alice
                .keys
                .signing
                .sign(SignatureContext::ChannelStatement, &bytes)
                .to_vec(),
            statement: bytes,
        };
        let mut padded = signed.statement.clone();
        padded.extend_from_slice(&[0x9a, 0x06, 3, b'p', b'a', b'd']);
        let err = ParsedChannelStatement::parse(resign(padded)).unwrap_err();
        assert!(err.to_string().contains("canonical"), "{err}");
        let mut huge = signed.statement.clone();
        huge.extend(std::iter::repeat_n(0u8, MAX_STATEMENT_BYTES));
        let err = ParsedChannelStatement::parse(resign(huge)).unwrap_err();
        assert!(err.to_string().contains("256 KiB"), "{err}");
    }

    #[test]
    fn the_last_statements_are_kept_for_removals_and_departures() {
        let w = World::new();
        let (alice, bob) = (w.device("alice"), w.device("bob"));
        let (state, _) = create(&alice, &["bob", "carol"]);
        // A chain just short of full, resumed where the reserve begins.
        let at = MAX_STATEMENTS - RESERVED_STATEMENTS;
        let mut full = ChannelState::resume(
            CH,
            at,
            state.head().unwrap(),
            "plans",
            Visibility::Shared,
            state.members().clone(),
        );
        let rename = statement(&full, &alice, Change::Rename("again".into()));
        assert!(matches!(
            full.apply(&rename, &alice.signer()),
            Err(ChannelError::Full)
        ));
        let add = statement(
            &full,
            &alice,
            Change::Add {
                identity: "dave".into(),
                role: Role::Member,
            },
        );
        assert!(matches!(
            full.apply(&add, &alice.signer()),
            Err(ChannelError::Full)
        ));
        let remove = statement(
            &full,
            &alice,
            Change::Remove {
                identity: "carol".into(),
            },
        );
        full.apply(&remove, &alice.signer()).unwrap();
        let leave = statement(&full, &bob, Change::Leave);
        full.apply(&leave, &bob.signer()).unwrap();
        assert_eq!(full.length(), at + 2);
    }

    #[test]
    fn a_role_change_that_changes_nothing_is_refused() {
        let w = World::new();
        let alice = w.device("alice");
        let (mut state, _) = create(&alice, &["bob"]);
        let same = statement(
            &state,
            &alice,
            Change::SetRole {
                identity: "bob".into(),
                role: Role::Member,
            },
        );
        assert!(matches!(
            state.apply(&same, &alice.signer()),
            Err(ChannelError::Malformed("the member already has that role"))
        ));
        assert_eq!(state.length(), 1, "nothing applied");
    }
}
