//! Channel membership (protocol v2) as this device verifies it.
//!
//! Who is in a channel comes only from its membership chain: statements
//! signed by members' approved devices, each checked with
//! [`ChannelState::apply`], from the creation or from the state this device
//! kept (`channels/<id>.json` in the profile). The app server's member list
//! is compared with it and never used. A chain that does not extend the kept
//! one (shorter, or another statement at a kept epoch) is refused
//! ([`ClientError::Channel`]).

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::{Deserialize, Serialize};
use tessera_card::{
    CardId,
    channel::{
        Change, ChannelError, ChannelState, MAX_CHAIN_PAGE_BYTES, MAX_CHAIN_PAGE_ENTRIES,
        NewChannelStatement, ParsedChannelStatement, Role, ServedChain, StatementSigner,
        Visibility, validate_channel_id,
    },
};
use tessera_proto::{
    Message as _,
    server::v1::{
        Channel, ChannelChain, CreateChannelRequest, GetChannelChainRequest, GetChannelRequest,
        PublishChannelStatementRequest,
    },
};

use crate::{
    CardInfo, Client, ClientError,
    client::{now_ms, now_secs},
    error::rpc,
    profile::{read_json, write_json},
    state,
};

/// How long the devices of an epoch's members are trusted without asking
/// the key service again (while opening a page of history, say).
const EPOCH_DEVICES_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// How many times a statement is signed again when another one got in
/// first (the app server answers ABORTED).
const PUBLISH_ATTEMPTS: usize = 3;

/// One verified membership change, for showing among the messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub channel_id: String,
    /// The epoch the statement started.
    pub epoch: u64,
    /// The member who signed it, and their device.
    pub by: String,
    pub by_card: CardId,
    pub change: Change,
    /// When the app server accepted it (its word).
    pub server_time_ms: i64,
    /// The index the channel's next message had then (the app server's
    /// word, for placing the change among the messages).
    pub next_index: u64,
}

impl fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = &self.by;
        match &self.change {
            Change::Create {
                name,
                visibility,
                members,
            } => {
                let names: Vec<&str> = members.iter().map(|(i, _)| i.as_str()).collect();
                write!(
                    f,
                    "{by} created {name:?} ({visibility} history) with {}",
                    names.join(", ")
                )
            }
            Change::Add { identity, role } => match role {
                Role::Member => write!(f, "{by} added {identity}"),
                Role::Admin => write!(f, "{by} added {identity} as an admin"),
            },
            Change::Remove { identity } => write!(f, "{by} removed {identity}"),
            Change::SetRole { identity, role } => write!(f, "{by} made {identity} {role}"),
            Change::SetVisibility(v) => write!(f, "{by} set the history visibility to {v}"),
            Change::Rename(name) => write!(f, "{by} renamed the channel to {name:?}"),
            Change::Leave => write!(f, "{by} left"),
        }
    }
}

/// What this device keeps of a channel: the verified state and the changes
/// that made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeptChannel {
    pub(crate) state: ChannelState,
    pub(crate) changes: Vec<MembershipChange>,
    /// The app server's time of the head statement, as it served it (none
    /// when this device made the head and has not fetched it since): served
    /// again, it must not change.
    #[serde(default)]
    pub(crate) head_time_ms: Option<i64>,
}

/// A channel as verified now.
#[derive(Debug, Clone)]
pub struct VerifiedChannel {
    pub state: ChannelState,
    /// Every change since the creation, oldest first.
    pub changes: Vec<MembershipChange>,
    /// How many of `changes` this look verified for the first time.
    pub new_changes: usize,
}

impl VerifiedChannel {
    /// A channel made before protocol v2: no chain, its members unverified;
    /// it takes no new message.
    pub fn is_legacy(&self) -> bool {
        self.state.length() == 0
    }

    /// The changes verified for the first time by this look.
    pub fn fresh_changes(&self) -> &[MembershipChange] {
        &self.changes[self.changes.len() - self.new_changes..]
    }
}

/// A channel as the app server shows it, next to the verified chain.
#[derive(Debug, Clone)]
pub struct ChannelView {
    pub channel_id: String,
    pub verified: VerifiedChannel,
    /// The app server's view: its counts and indices are its word.
    pub served: Channel,
    /// Identities the app server lists as members that the chain does not
    /// have (ghosts): never encrypted to.
    pub unverified_members: Vec<String>,
    /// Members by the chain the app server's list leaves out.
    pub omitted_members: Vec<String>,
}

fn channel_error(channel_id: &str, reason: ChannelError) -> ClientError {
    ClientError::Channel {
        channel_id: channel_id.to_owned(),
        reason,
    }
}

impl Client {
    fn kept_path(&self, channel_id: &str) -> PathBuf {
        self.dir.join("channels").join(format!("{channel_id}.json"))
    }

    fn kept_channel(&self, channel_id: &str) -> Result<Option<KeptChannel>, ClientError> {
        read_json(&self.kept_path(channel_id))
    }

    /// Keeps `new` unless the kept state is further along; either must
    /// extend the other (two processes of this profile may verify at once),
    /// or the app server showed them different chains.
    fn keep_channel(&self, new: &KeptChannel) -> Result<KeptChannel, ClientError> {
        let channel_id = new.state.channel_id();
        let _guard = state::lock(&self.dir, "channels.lock")?;
        let path = self.kept_path(channel_id);
        let kept: Option<KeptChannel> = read_json(&path)?;
        if let Some(kept) = &kept {
            let (short, long) = if kept.state.length() <= new.state.length() {
                (&kept.state, &new.state)
            } else {
                (&new.state, &kept.state)
            };
            if let Some(epoch) = short.epoch()
                && long.hash_at(epoch) != short.head()
            {
                return Err(channel_error(channel_id, ChannelError::Fork { epoch }));
            }
            // The same chain again keeps what was kept, unless it now
            // learns the server's time of a head this device made.
            let learns_time = kept.head_time_ms.is_none() && new.head_time_ms.is_some();
            if kept.state.length() > new.state.length()
                || (kept.state.length() == new.state.length() && !learns_time)
            {
                return Ok(kept.clone());
            }
        }
        write_json(&path, new)?;
        Ok(new.clone())
    }

    /// Refuses to sign membership from a device its owner's devices have
    /// not approved (pending, removed): every member would refuse the
    /// statement, and no statement can follow one they refuse.
    async fn check_approved_to_sign(&self) -> Result<(), ClientError> {
        let (cards, found, _) = self.recipient_cards(&[self.identity().to_owned()]).await?;
        if cards.iter().any(|c| c.id() == self.card_id) {
            Ok(())
        } else {
            Err(self.not_approved(&found, "sign membership changes"))
        }
    }

    /// This device as the signer of its own statements.
    fn own_signer(&self) -> (tessera_crypto::VerifyingKey, CardId) {
        (self.keys.signing.verifying_key(), self.card_id)
    }

    /// The statements of a channel from `from_epoch` to the head, asked for
    /// page by page; with the chain's length as the last page said.
    async fn fetch_chain(
        &self,
        channel_id: &str,
        from_epoch: u64,
    ) -> Result<(u64, Vec<tessera_proto::server::v1::ChainEntry>), ClientError> {
        let mut entries = Vec::new();
        loop {
            let from = from_epoch + entries.len() as u64;
            let request = self
                .request(GetChannelChainRequest {
                    channel_id: channel_id.to_owned(),
                    from_epoch: from,
                })
                .await?;
            let ChannelChain {
                channel_id: served_id,
                length,
                entries: page,
            } = self
                .channels_client()
                .get_channel_chain(request)
                .await
                .map_err(rpc("app server", self.server_url(), "the membership chain"))?
                .into_inner();
            if served_id != channel_id {
                return Err(channel_error(
                    channel_id,
                    ChannelError::Malformed("the app server answered with another channel's chain"),
                ));
            }
            let got = from + page.len() as u64;
            if got > length || length > tessera_card::channel::MAX_STATEMENTS {
                return Err(channel_error(channel_id, ChannelError::Full));
            }
            // The page bounds of the protocol (section 11), so a hostile
            // server cannot make this device hold an unbounded chain.
            let beyond_first: usize = page.iter().skip(1).map(|e| e.encoded_len()).sum();
            if page.len() > MAX_CHAIN_PAGE_ENTRIES || beyond_first > MAX_CHAIN_PAGE_BYTES {
                return Err(channel_error(
                    channel_id,
                    ChannelError::Malformed("the app server's chain page is over the limits"),
                ));
            }
            let empty = page.is_empty();
            entries.extend(page);
            if got == length {
                return Ok((length, entries));
            }
            if empty {
                return Err(channel_error(
                    channel_id,
                    ChannelError::Malformed(
                        "the app server's chain stops before the length it claims",
                    ),
                ));
            }
        }
    }

    /// Verifies the channel's chain from the kept state (or the creation)
    /// to the app server's head and keeps the result. Each signer's card
    /// must verify, be approved by its owner's devices and not be revoked
    /// before the app server accepted the statement.
    pub async fn verified_channel(&self, channel_id: &str) -> Result<VerifiedChannel, ClientError> {
        validate_channel_id(channel_id).map_err(|e| ClientError::Usage(e.to_string()))?;
        let kept = self.kept_channel(channel_id)?;
        let (mut state, mut changes, head_time) = match kept {
            Some(k) => (k.state, k.changes, k.head_time_ms),
            None => (ChannelState::empty(channel_id), Vec::new(), None),
        };
        let from = state.epoch().unwrap_or(0);
        let (length, entries) = self.fetch_chain(channel_id, from).await?;
        let times: BTreeMap<u64, (i64, u64)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (from + i as u64, (e.server_time_ms, e.next_index)))
            .collect();
        let served = ServedChain::parse(
            entries
                .into_iter()
                .map(|e| e.statement.unwrap_or_default())
                .collect(),
            length,
        )
        .map_err(|e| channel_error(channel_id, e))?;
        // The app server's times date the signers' cards: they must not go
        // back along the chain (from the kept head, served again first), so
        // a statement cannot be backdated to before an earlier one.
        // (Only for the same statement: another one there is a fork, which
        // extending reports.)
        if let (Some(kept), Some((served_time, _))) = (head_time, times.get(&from))
            && state.head().is_some()
            && served.statements.first().map(|s| s.hash()) == state.head()
            && *served_time != kept
        {
            return Err(channel_error(
                channel_id,
                ChannelError::Malformed(
                    "the app server changed the time of a statement it served before",
                ),
            ));
        }
        let mut previous = i64::MIN;
        for (time, _) in times.values() {
            if *time < previous {
                return Err(channel_error(
                    channel_id,
                    ChannelError::Malformed("the app server's times go back along the chain"),
                ));
            }
            previous = *time;
        }
        // Where the app server placed each statement among the messages
        // (the message rules of protocol section 13 use it): never back
        // along the chain, and the kept head's place served unchanged.
        let kept_place = changes
            .iter()
            .find(|c| c.epoch == from)
            .map(|c| c.next_index)
            .filter(|n| *n > 0);
        if let (Some(kept), Some((_, served_place))) = (kept_place, times.get(&from))
            && state.head().is_some()
            && served.statements.first().map(|s| s.hash()) == state.head()
            && *served_place > 0
            && *served_place != kept
        {
            return Err(channel_error(
                channel_id,
                ChannelError::Malformed(
                    "the app server moved a statement it served before to another place among the messages",
                ),
            ));
        }
        let mut previous_place = 0;
        for (_, place) in times.values().filter(|(_, n)| *n > 0) {
            if *place < previous_place {
                return Err(channel_error(
                    channel_id,
                    ChannelError::Malformed(
                        "the app server's places of statements go back along the chain",
                    ),
                ));
            }
            previous_place = *place;
        }
        // Every signer's card, checked first (the check is async), once, at
        // the latest of its statements: a card removed or revoked before any
        // of them is refused.
        let skip = usize::from(state.head().is_some());
        let mut latest: BTreeMap<CardId, (&str, i64)> = BTreeMap::new();
        for s in served.statements.iter().skip(skip) {
            let at = times.get(&s.epoch()).map_or(0, |t| t.0);
            latest.insert(s.signer(), (s.signer_identity(), at));
        }
        let mut cards: BTreeMap<CardId, CardInfo> = BTreeMap::new();
        for (card, (identity, at)) in latest {
            match self.sender_card(&card, identity, at).await {
                Ok(info) => {
                    cards.insert(card, info);
                }
                // A card that does not verify or was not approved: extend
                // refuses its statement.
                Err(
                    ClientError::Message(_)
                    | ClientError::CardRejected { .. }
                    | ClientError::Rejected {
                        code: tonic::Code::NotFound,
                        ..
                    },
                ) => {}
                Err(e) => return Err(e),
            }
        }
        let applied = served
            .extend(&mut state, &|identity: &str, id: &CardId| {
                cards
                    .get(id)
                    .filter(|i| i.card.identity() == identity)
                    .map(|i| i.card.clone())
            })
            .map_err(|e| channel_error(channel_id, e))?;
        let new_changes = applied.len();
        changes.extend(applied.iter().map(|s| change_of(s, &times)));
        let head_time_ms = times.values().last().map(|(time, _)| *time);
        let kept = self.keep_channel(&KeptChannel {
            state,
            changes,
            head_time_ms,
        })?;
        Ok(VerifiedChannel {
            new_changes: new_changes.min(kept.changes.len()),
            state: kept.state,
            changes: kept.changes,
        })
    }

    /// The app server's view of a channel next to the verified chain.
    pub async fn channel(&self, channel_id: &str) -> Result<ChannelView, ClientError> {
        let request = self
            .request(GetChannelRequest {
                channel_id: channel_id.to_owned(),
            })
            .await?;
        let served = self
            .channels_client()
            .get_channel(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the channel"))?
            .into_inner();
        let verified = self.verified_channel(channel_id).await?;
        let listed: std::collections::BTreeSet<&str> =
            served.members.iter().map(|m| m.identity.as_str()).collect();
        let (unverified_members, omitted_members) = if verified.is_legacy() {
            (Vec::new(), Vec::new())
        } else {
            let chain = verified.state.members();
            (
                listed
                    .iter()
                    .filter(|i| !chain.contains_key(**i))
                    .map(|i| (*i).to_owned())
                    .collect(),
                chain
                    .keys()
                    .filter(|i| !listed.contains(i.as_str()))
                    .cloned()
                    .collect(),
            )
        };
        Ok(ChannelView {
            channel_id: channel_id.to_owned(),
            verified,
            served,
            unverified_members,
            omitted_members,
        })
    }

    /// Creates a channel: this device signs its creation, with this user as
    /// its admin and `members` as members.
    pub async fn create_channel(
        &self,
        name: &str,
        visibility: Visibility,
        members: &[String],
    ) -> Result<ChannelView, ClientError> {
        self.check_approved_to_sign().await?;
        let mut listed: BTreeMap<String, Role> =
            members.iter().map(|m| (m.clone(), Role::Member)).collect();
        listed.insert(self.identity().to_owned(), Role::Admin);
        let channel_id = hex::encode(
            tessera_crypto::random_array::<16>().map_err(|e| ClientError::Crypto(e.to_string()))?,
        );
        let signed = NewChannelStatement {
            channel_id: &channel_id,
            epoch: 0,
            previous_hash: None,
            signer_identity: self.identity(),
            signer: self.card_id,
            created_at: now_secs(),
            change: Change::Create {
                name: name.to_owned(),
                visibility,
                members: listed.into_iter().collect(),
            },
        }
        .sign(&self.keys.signing);
        // Checked here first: a bad name or member list is the user's
        // mistake, said plainly, not the server's refusal.
        let parsed = ParsedChannelStatement::parse(signed.clone())
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let (key, card_id) = self.own_signer();
        let mut state = ChannelState::empty(&channel_id);
        state
            .apply(
                &parsed,
                &StatementSigner {
                    identity: self.identity(),
                    card_id,
                    key: &key,
                },
            )
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let request = self
            .request(CreateChannelRequest {
                creation: Some(signed),
            })
            .await?;
        let served = self
            .channels_client()
            .create_channel(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the new channel"))?
            .into_inner();
        let changes = vec![MembershipChange {
            channel_id: channel_id.clone(),
            epoch: 0,
            by: self.identity().to_owned(),
            by_card: self.card_id,
            change: parsed.change().clone(),
            server_time_ms: served.created_at_ms,
            next_index: 1,
        }];
        self.keep_channel(&KeptChannel {
            state: state.clone(),
            changes: changes.clone(),
            head_time_ms: Some(served.created_at_ms),
        })?;
        self.channel(&channel_id).await
    }

    /// Signs `change` as the next statement of the channel and publishes
    /// it; signs again on the new head when another statement got in first.
    /// A change the chain's rules refuse (not an admin, not a member) is
    /// refused here before anything is sent.
    pub async fn change_channel(
        &self,
        channel_id: &str,
        change: Change,
    ) -> Result<MembershipChange, ClientError> {
        self.check_approved_to_sign().await?;
        let (key, card_id) = self.own_signer();
        let signer = StatementSigner {
            identity: self.identity(),
            card_id,
            key: &key,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let verified = self.verified_channel(channel_id).await?;
            if verified.is_legacy() {
                return Err(ClientError::Usage(format!(
                    "channel {channel_id} was made before signed membership (protocol v2): its members cannot change; create a new channel"
                )));
            }
            let mut state = verified.state;
            let signed = NewChannelStatement {
                channel_id,
                epoch: state.length(),
                previous_hash: state.head(),
                signer_identity: self.identity(),
                signer: self.card_id,
                created_at: now_secs(),
                change: change.clone(),
            }
            .sign(&self.keys.signing);
            let parsed = ParsedChannelStatement::parse(signed.clone())
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            state
                .apply(&parsed, &signer)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            let request = self
                .request(PublishChannelStatementRequest {
                    channel_id: channel_id.to_owned(),
                    statement: Some(signed),
                })
                .await?;
            match self
                .channels_client()
                .publish_channel_statement(request)
                .await
            {
                Ok(served) => {
                    let served = served.into_inner();
                    let made = MembershipChange {
                        channel_id: channel_id.to_owned(),
                        epoch: parsed.epoch(),
                        by: self.identity().to_owned(),
                        by_card: self.card_id,
                        change,
                        server_time_ms: now_ms(),
                        next_index: served.next_index,
                    };
                    let mut changes = verified.changes;
                    changes.push(made.clone());
                    // The server's time of this statement is learnt at the
                    // next fetch.
                    self.keep_channel(&KeptChannel {
                        state,
                        changes,
                        head_time_ms: None,
                    })?;
                    return Ok(made);
                }
                Err(s) if s.code() == tonic::Code::Aborted && attempt < PUBLISH_ATTEMPTS => {}
                Err(s) => {
                    return Err(rpc(
                        "app server",
                        self.server_url(),
                        "the membership change",
                    )(s));
                }
            }
        }
    }

    pub async fn add_member(
        &self,
        channel_id: &str,
        identity: &str,
        role: Role,
    ) -> Result<MembershipChange, ClientError> {
        self.change_channel(
            channel_id,
            Change::Add {
                identity: identity.to_owned(),
                role,
            },
        )
        .await
    }

    pub async fn remove_member(
        &self,
        channel_id: &str,
        identity: &str,
    ) -> Result<MembershipChange, ClientError> {
        let change = if identity == self.identity() {
            Change::Leave
        } else {
            Change::Remove {
                identity: identity.to_owned(),
            }
        };
        self.change_channel(channel_id, change).await
    }

    /// The verified changes with epochs in `from..to`, from what this device
    /// kept (verify the channel first to have the latest).
    pub fn membership_changes(
        &self,
        channel_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<MembershipChange>, ClientError> {
        Ok(self
            .kept_channel(channel_id)?
            .map(|k| {
                k.changes
                    .into_iter()
                    .filter(|c| (from..to).contains(&c.epoch))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The kept state of a channel, verified up to `epoch` at least (the
    /// chain is fetched again when the kept one is shorter).
    pub(crate) async fn state_at_least(
        &self,
        channel_id: &str,
        epoch: u64,
    ) -> Result<ChannelState, ClientError> {
        if let Some(k) = self.kept_channel(channel_id)?
            && k.state.length() > epoch
        {
            return Ok(k.state);
        }
        Ok(self.verified_channel(channel_id).await?.state)
    }
}

/// A difference between the devices a message was encrypted to and the
/// approved devices of its epoch's members, as this device sees them now.
/// Device lists change over time, so an old message may show some; a
/// recipient who was not a member at all refuses the message instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientDifference {
    /// Encrypted to a member's device that is not among their approved,
    /// active devices now (removed since, or not yet approved then).
    Extra { identity: String, card_id: CardId },
    /// Not encrypted to one of a member's approved devices (added since, or
    /// unknown to the sender).
    Missing { identity: String, card_id: CardId },
}

impl fmt::Display for RecipientDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Extra { identity, card_id } => write!(
                f,
                "also encrypted to device {} of {identity}, not among its approved devices now",
                card_id.short()
            ),
            Self::Missing { identity, card_id } => write!(
                f,
                "not encrypted to device {} of {identity}",
                card_id.short()
            ),
        }
    }
}

/// What the membership check of a message found.
pub(crate) struct MembershipCheck {
    /// The epoch the message named; `None` for a message of a channel made
    /// before protocol v2.
    pub(crate) epoch: Option<u64>,
    pub(crate) differences: Vec<RecipientDifference>,
    pub(crate) events: Vec<crate::TrustEvent>,
}

impl Client {
    /// The membership checks of a verified payload: the epoch it names is in
    /// the verified chain with the same statement hash (else the app server
    /// showed the sender another history), the sender was a member then, and
    /// every recipient is a device of a member of that epoch (a ghost
    /// recipient refuses the message); other differences are reported.
    /// `Err(reason)` refuses the message; chain errors pass through.
    pub(crate) async fn check_membership(
        &self,
        payload: &tessera_crypto::envelope::VerifiedPayload,
        recipients: Option<&[[u8; 32]]>,
    ) -> Result<Result<MembershipCheck, String>, ClientError> {
        let channel_id = payload.channel_id.as_str();
        let Some(epoch) = payload.epoch else {
            let state = self.state_at_least(channel_id, 0).await?;
            if state.length() > 0 {
                return Ok(Err(
                    "it names no membership epoch (a protocol v1 message) in a channel with signed membership".into(),
                ));
            }
            return Ok(Ok(MembershipCheck {
                epoch: None,
                differences: Vec::new(),
                events: Vec::new(),
            }));
        };
        let n = epoch.number;
        let state = self.state_at_least(channel_id, n).await?;
        let Some(hash) = state.hash_at(n) else {
            return Ok(Err(format!(
                "it names membership epoch {n}, which the channel's verified chain ({} statements) does not have",
                state.length()
            )));
        };
        if !tessera_crypto::ct_eq(&hash, &epoch.hash) {
            return Ok(Err(format!(
                "it was sent under another membership history at epoch {n} than this device verified: the app server may be showing members different chains"
            )));
        }
        if !state.was_member(&payload.sender_identity, n) {
            return Ok(Err(format!(
                "{} was not a member of the channel at epoch {n}",
                payload.sender_identity
            )));
        }
        let Some(recipients) = recipients else {
            // Not known (a group message from the organisation's archive):
            // the sender and the epoch were checked; nothing to compare.
            return Ok(Ok(MembershipCheck {
                epoch: Some(n),
                differences: Vec::new(),
                events: Vec::new(),
            }));
        };
        let members: Vec<String> = state.members_at(n).into_iter().map(str::to_owned).collect();
        let (expected, events) = self.epoch_devices(channel_id, n, &members).await?;
        let mut differences = Vec::new();
        let recipients: std::collections::BTreeSet<CardId> = recipients
            .iter()
            .map(|id| CardId::from_array(*id))
            .collect();
        for id in recipients.iter().filter(|id| !expected.contains_key(id)) {
            let owner = match self.card_owner(id).await {
                Ok(info) => info.card.identity().to_owned(),
                Err(ClientError::Unreachable { .. }) => {
                    return Err(ClientError::Unreachable {
                        service: "key service",
                        url: self.kms_url().to_owned(),
                        detail: "while checking a message's recipients".into(),
                    });
                }
                Err(e) => {
                    return Ok(Err(format!(
                        "it was encrypted to card {}, which does not verify as anyone's device ({e})",
                        id.short()
                    )));
                }
            };
            if !state.was_member(&owner, n) {
                return Ok(Err(format!(
                    "it was encrypted to device {} of {owner}, who was not a member at epoch {n}: a ghost recipient",
                    id.short()
                )));
            }
            differences.push(RecipientDifference::Extra {
                identity: owner,
                card_id: *id,
            });
        }
        for (id, identity) in expected.iter().filter(|(id, _)| !recipients.contains(id)) {
            differences.push(RecipientDifference::Missing {
                identity: identity.clone(),
                card_id: *id,
            });
        }
        Ok(Ok(MembershipCheck {
            epoch: Some(n),
            differences,
            events,
        }))
    }

    /// The approved, active devices of an epoch's members (card id to
    /// owner), from a cache of a minute or the key service.
    async fn epoch_devices(
        &self,
        channel_id: &str,
        epoch: u64,
        members: &[String],
    ) -> Result<(BTreeMap<CardId, String>, Vec<crate::TrustEvent>), ClientError> {
        let key = (channel_id.to_owned(), epoch);
        if let Some((devices, at)) = self
            .epoch_devices
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
            && at.elapsed() < EPOCH_DEVICES_FOR
        {
            return Ok((devices, Vec::new()));
        }
        let (found, events) = self.cards_of(members).await?;
        let devices: BTreeMap<CardId, String> = found
            .iter()
            .flat_map(|(identity, d)| d.approved.iter().map(|c| (c.id(), identity.clone())))
            .collect();
        if let Ok(mut cache) = self.epoch_devices.lock() {
            cache.retain(|_, (_, at)| at.elapsed() < EPOCH_DEVICES_FOR);
            cache.insert(key, (devices.clone(), std::time::Instant::now()));
        }
        Ok((devices, events))
    }
}

fn change_of(s: &ParsedChannelStatement, times: &BTreeMap<u64, (i64, u64)>) -> MembershipChange {
    let (server_time_ms, next_index) = times.get(&s.epoch()).copied().unwrap_or_default();
    MembershipChange {
        channel_id: s.channel_id().to_owned(),
        epoch: s.epoch(),
        by: s.signer_identity().to_owned(),
        by_card: s.signer(),
        change: s.change().clone(),
        server_time_ms,
        next_index,
    }
}
