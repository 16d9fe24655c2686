//! Finding and verifying cards (the seed's automatic card verification) and
//! device lists (protocol v2), checking the key directory's transparency
//! log, and noticing when someone's devices change.
//!
//! A card is used only when it passes `tessera_card::record::check_record`
//! (three signatures, log inclusion under a checkpoint consistent with every
//! checkpoint this device saw) *and* the identity's device list, verified
//! from the state this device kept, approves it. A verified card that the
//! list does not approve is *pending*: never encrypted to, its messages
//! refused.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
};

use tessera_card::{
    CardId, CardKind, VerifiedCard,
    device_list::{Change, DeviceListError, DeviceListState, ServedList},
    record::{self, CheckedRecord, Status},
    transparency::{self, VerifiedCheckpoint},
};
use tessera_proto::{
    Message as _,
    kms::v1::{
        CardStatus, DeviceList, GetCardRequest, GetConsistencyProofRequest, GetDeviceListRequest,
        IdentityCards, SearchCardsRequest, SearchCardsResponse,
        key_directory_client::KeyDirectoryClient,
    },
    transparency::v1::SignedCheckpoint,
};

use crate::{
    Client, ClientError,
    client::Service,
    error::rpc,
    state::{self, DeviceListPin},
};

/// A change in someone's devices, reported rather than silently accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustEvent {
    /// A device the identity's own devices approved, not seen before.
    DeviceAdded {
        identity: String,
        card_id: CardId,
        device_name: String,
    },
    /// A device seen before is no longer used (removed from the device
    /// list, revoked or replaced).
    DeviceRemoved { identity: String, card_id: CardId },
    /// A card replaced an earlier one of the same device (key rotation).
    KeyChanged {
        identity: String,
        old_card_id: CardId,
        new_card_id: CardId,
    },
    /// A card the app and the key service vouch for but none of the
    /// identity's devices approved: nothing is encrypted to it and its
    /// messages are refused until one of them approves it.
    DevicePending {
        identity: String,
        card_id: CardId,
        device_name: String,
    },
    /// The identity's device list was reset since this device first saw it
    /// (every device lost, a new one took over after a password log-in, or
    /// a hostile server took over): treat it like a new identity and compare
    /// safety numbers again. Reported every time until the user does
    /// ([`Client::mark_verified`] or [`Client::acknowledge_reset`]).
    IdentityReset { identity: String },
    /// The identity had been verified by safety number; its devices changed
    /// since, so the mark was dropped.
    VerificationLost { identity: String },
}

/// A card's status at the key service.
#[derive(Debug, Clone)]
pub struct CardInfo {
    pub card: VerifiedCard,
    pub status: CardStatus,
    /// Unix seconds at which the key service logged the revocation, when
    /// revoked (the revocation's own log entry, proven).
    pub revoked_at: Option<i64>,
}

impl CardInfo {
    fn from_record(r: &CheckedRecord) -> Self {
        Self {
            card: r.card.clone(),
            status: match r.status {
                Status::Active => CardStatus::Active,
                Status::Revoked => CardStatus::Revoked,
                Status::Superseded => CardStatus::Superseded,
            },
            revoked_at: r.revocation.as_ref().map(|r| r.logged_at),
        }
    }
}

/// An identity's devices as verified.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    /// Active cards the identity's device list approves: what is encrypted to.
    pub approved: Vec<VerifiedCard>,
    /// Active, verified cards the list never approved (never encrypted to).
    pub pending: Vec<VerifiedCard>,
    /// Active cards the list approved once and withdrew (removed, or
    /// replaced by a reset): no longer encrypted to.
    pub removed: Vec<VerifiedCard>,
    /// Number of statements in the verified device list.
    pub list_length: u64,
    /// Number of RESET statements in it.
    pub resets: u64,
}

/// How many times a checkpoint update is checked again when another process
/// of the profile moved the kept checkpoint meanwhile.
const CHECKPOINT_ATTEMPTS: usize = 5;

/// How many times a stale answer is asked again before it is a rollback.
const STALE_ATTEMPTS: u64 = 3;

/// How long a verified card's status is trusted without asking again.
const CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

fn device_list_error(identity: &str, reason: DeviceListError) -> ClientError {
    ClientError::DeviceList {
        identity: identity.to_owned(),
        reason,
    }
}

impl DeviceListPin {
    fn state(&self, identity: &str) -> Result<DeviceListState, ClientError> {
        let corrupt = || ClientError::Profile {
            path: "state.json".into(),
            reason: format!("the stored device list of {identity} is corrupt"),
        };
        let head = match self.head.as_str() {
            "" => None,
            h => Some(
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(corrupt)?,
            ),
        };
        let trusted = self
            .trusted
            .iter()
            .map(|id| id.parse().map_err(|_| corrupt()))
            .collect::<Result<_, _>>()?;
        DeviceListState::resume(identity, self.length, head, trusted).map_err(|_| corrupt())
    }
}

impl Client {
    fn kms_client(&self) -> KeyDirectoryClient<tonic::transport::Channel> {
        KeyDirectoryClient::new(self.kms.clone()).max_decoding_message_size(64 << 20)
    }

    /// The last checkpoint this device verified, if any.
    pub(crate) fn last_checkpoint(&self) -> Result<Option<VerifiedCheckpoint>, ClientError> {
        Ok(self.kept_checkpoint(&state::read_state(&self.dir)?))
    }

    fn kept_checkpoint(&self, s: &state::State) -> Option<VerifiedCheckpoint> {
        s.checkpoint
            .as_ref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| SignedCheckpoint::decode(b.as_slice()).ok())
            .and_then(|c| transparency::verify_checkpoint(&c, self.verifier.kms_key()).ok())
    }

    /// Verifies `signed` against the pinned key-service key and checks that
    /// it and the last checkpoint this device kept are views of one log: the
    /// same root at the same size, or a consistency proof from the smaller
    /// to the larger. The log only grows, so a smaller checkpoint is never
    /// used: if the key service cannot prove it a prefix it is a fork, and
    /// if it can, the answer is stale ([`ClientError::StaleView`]: the caller
    /// asks again; a directory that keeps answering from the past is
    /// refused as a rollback). Remembers it when it is larger. The check and
    /// the update are atomic against other processes of this profile: if
    /// the kept checkpoint changed meanwhile, the check runs again.
    pub(crate) async fn advance_checkpoint(
        &self,
        signed: &SignedCheckpoint,
    ) -> Result<VerifiedCheckpoint, ClientError> {
        let new = transparency::verify_checkpoint(signed, self.verifier.kms_key())
            .map_err(|e| ClientError::Fork(format!("checkpoint refused: {e}")))?;
        for _ in 0..CHECKPOINT_ATTEMPTS {
            let last = self.last_checkpoint()?;
            if let Some(old) = &last {
                self.check_consistent(old, &new).await?;
                if new.tree_size < old.tree_size {
                    return Err(ClientError::StaleView {
                        served: new.tree_size,
                        seen: old.tree_size,
                    });
                }
            }
            let saved = state::with_state(&self.dir, |s| {
                let now = self.kept_checkpoint(s);
                if now.as_ref().map(|c| &c.signed) != last.as_ref().map(|c| &c.signed) {
                    return false; // another process moved it: check again
                }
                if last
                    .as_ref()
                    .is_none_or(|old| new.tree_size > old.tree_size)
                {
                    s.checkpoint = Some(hex::encode(new.signed.encode_to_vec()));
                }
                true
            })?;
            if saved {
                return Ok(new);
            }
        }
        Err(ClientError::Message(
            "the kept checkpoint kept changing under concurrent updates; try again".into(),
        ))
    }

    /// Checks that two checkpoints describe one log: the same root for the
    /// same size, else a consistency proof from the smaller to the larger
    /// (asked of this device's key directory; one it cannot give is a fork).
    pub(crate) async fn check_consistent(
        &self,
        a: &VerifiedCheckpoint,
        b: &VerifiedCheckpoint,
    ) -> Result<(), ClientError> {
        let (small, big) = if a.tree_size <= b.tree_size {
            (a, b)
        } else {
            (b, a)
        };
        if small.tree_size == big.tree_size {
            if small.root_hash != big.root_hash {
                return Err(ClientError::Fork(format!(
                    "two different roots for {} entries",
                    small.tree_size
                )));
            }
            return Ok(());
        }
        let request = self
            .request_to(
                Service::Kms,
                GetConsistencyProofRequest {
                    old_size: small.tree_size,
                    new_size: big.tree_size,
                },
            )
            .await?;
        let proof = match self.kms_client().get_consistency_proof(request).await {
            Ok(r) => r.into_inner().proof,
            Err(status) => match rpc("key service", self.kms_url(), "a consistency proof")(status)
            {
                ClientError::Rejected { message, .. } => {
                    return Err(ClientError::Fork(format!(
                        "the key service cannot prove that its log of {} entries and the one of {} this device saw are one log ({message})",
                        b.tree_size, a.tree_size
                    )));
                }
                other => return Err(other),
            },
        }
        .ok_or_else(|| ClientError::Fork("no consistency proof was given".into()))?;
        transparency::verify_consistency(small, big, &proof)
            .map_err(|e| ClientError::Fork(e.to_string()))
    }

    /// Checks one record from the key service with the check every party
    /// runs: signatures, identity and kind, log inclusion (and a revocation's).
    pub(crate) fn check_record(
        &self,
        record: &tessera_proto::kms::v1::CardRecord,
        checkpoint: &VerifiedCheckpoint,
        identity: &str,
        kind: CardKind,
    ) -> Result<CheckedRecord, ClientError> {
        record::check_record(&self.verifier, record, checkpoint, Some(identity), kind).map_err(
            |e| {
                let claimed = transparency::registered_card(&record.registration_entry)
                    .ok()
                    .map(|c| CardId::of_snapshot(&c.content_snapshot));
                ClientError::card(identity, claimed, e)
            },
        )
    }

    /// Every active client card of each identity, each verified and proven
    /// in the log, sorted by what the identity's device list says: approved
    /// or pending. Also the changes since the devices were last seen. A
    /// device list that does not extend what this device verified before is
    /// refused ([`ClientError::DeviceList`]).
    pub async fn cards_of(
        &self,
        identities: &[String],
    ) -> Result<(BTreeMap<String, Devices>, Vec<TrustEvent>), ClientError> {
        let mut found: BTreeMap<String, Devices> = BTreeMap::new();
        let identities: Vec<String> = identities
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for chunk in identities.chunks(100) {
            let pins = state::read_state(&self.dir)?.device_lists;
            let (response, checkpoint) = self.fresh(|| self.search_once(chunk, &pins)).await?;
            let answered: Vec<&str> = response
                .results
                .iter()
                .map(|r| r.identity.as_str())
                .collect();
            if answered != chunk.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err(ClientError::Fork(
                    "the key service did not answer for exactly the identities asked for".into(),
                ));
            }
            for result in &response.results {
                let devices = self
                    .verify_identity(result, &checkpoint, pins.get(&result.identity))
                    .await?;
                found.insert(result.identity.clone(), devices);
            }
        }
        let events = self.update_pins(&found)?;
        Ok((found, events))
    }

    /// One search of `chunk`, asking each device list from its kept head.
    async fn search_once(
        &self,
        chunk: &[String],
        pins: &BTreeMap<String, DeviceListPin>,
    ) -> Result<(SearchCardsResponse, VerifiedCheckpoint), ClientError> {
        let device_list_from = chunk
            .iter()
            .filter_map(|id| {
                pins.get(id)
                    .filter(|p| p.length > 0)
                    .map(|p| (id.clone(), p.length - 1))
            })
            .collect();
        let request = self
            .request_to(
                Service::Kms,
                SearchCardsRequest {
                    identities: chunk.to_vec(),
                    kind: tessera_proto::card::v1::CardKind::Client as i32,
                    device_list_from,
                },
            )
            .await?;
        let response = self
            .kms_client()
            .search_cards(request)
            .await
            .map_err(rpc("key service", self.kms_url(), "a card search"))?
            .into_inner();
        let checkpoint = self
            .advance_checkpoint(
                response.checkpoint.as_ref().ok_or_else(|| {
                    ClientError::Fork("search answered without a checkpoint".into())
                })?,
            )
            .await?;
        Ok((response, checkpoint))
    }

    /// Runs `ask`, a key-service call whose answer comes with a checkpoint,
    /// again while the answer is stale (older than a checkpoint this profile
    /// already kept: another call of the profile was answered later). A
    /// directory that keeps answering from the past is refused as a rollback.
    pub(crate) async fn fresh<T, F, Fut>(&self, mut ask: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match ask().await {
                Err(ClientError::StaleView { .. }) if attempt < STALE_ATTEMPTS => {
                    tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                }
                Err(ClientError::StaleView { served, seen }) => {
                    return Err(ClientError::Fork(format!(
                        "the directory went back to {served} entries after showing {seen}"
                    )));
                }
                other => return other,
            }
        }
    }

    /// Verifies one identity's answer: its cards, its device list from the
    /// pin kept before, and that every card the list trusts but the search
    /// left out is proven revoked or replaced.
    async fn verify_identity(
        &self,
        result: &IdentityCards,
        checkpoint: &VerifiedCheckpoint,
        pin: Option<&DeviceListPin>,
    ) -> Result<Devices, ClientError> {
        let identity = result.identity.as_str();
        let revoked = state::read_state(&self.dir)?.revoked;
        let mut records: BTreeMap<CardId, CheckedRecord> = BTreeMap::new();
        for record in &result.cards {
            let checked = self.check_record(record, checkpoint, identity, CardKind::Client)?;
            if checked.status != Status::Active {
                return Err(ClientError::Fork(format!(
                    "the key service listed an inactive card of {identity} as active"
                )));
            }
            if revoked.contains(&checked.card.id().to_string()) {
                return Err(ClientError::Fork(format!(
                    "the key service shows card {} of {identity} as active, which it proved revoked before",
                    checked.card.id().short()
                )));
            }
            self.cache_record(&checked);
            records.insert(checked.card.id(), checked);
        }
        let active: BTreeSet<CardId> = records.keys().copied().collect();

        let mut list = result.device_list.clone().unwrap_or_default();
        let mut list_checkpoint = checkpoint.clone();
        if list.truncated {
            // Left out of the search answer to keep it small: fetch it alone.
            let from = pin.map_or(0, |p| p.length.saturating_sub(1));
            (list, list_checkpoint) = self.device_list_from(identity, from).await?;
        }
        let served = ServedList::check(&list, identity, &list_checkpoint)
            .map_err(|e| device_list_error(identity, e))?;
        let mut state = match pin {
            Some(p) => p.state(identity)?,
            None => DeviceListState::empty(identity),
        };
        // A first look at a list with a reset: the rules from the genesis
        // when every statement still verifies, so the devices the reset
        // replaced are known (removed at the reset) and what they signed
        // before it, channel statements included, can be dated. Statements
        // co-signed by a retired AppKey no longer verify: then from the
        // latest reset, as a first look always may.
        let mut whole = None;
        if pin.is_none()
            && served.has_reset()
            && self
                .fetch_records(served.all_signers(), identity, &mut records)
                .await
                .is_ok()
        {
            let mut from_genesis = state.clone();
            whole = served
                .extend_whole(
                    &mut from_genesis,
                    &|id| records.get(id).cloned(),
                    self.verifier.app_key(),
                )
                .ok()
                .map(|changes| (from_genesis, changes));
        }
        let changes = match whole {
            Some((from_genesis, changes)) => {
                state = from_genesis;
                changes
            }
            None => {
                self.fetch_records(served.signers(&state), identity, &mut records)
                    .await?;
                served
                    .extend(
                        &mut state,
                        &|id| records.get(id).cloned(),
                        self.verifier.app_key(),
                    )
                    .map_err(|e| device_list_error(identity, e))?
            }
        };

        // A trusted card the search left out must be proven gone.
        for id in state.trusted() {
            if !active.contains(id) {
                let checked = match records.get(id) {
                    Some(r) => r.clone(),
                    None => self.card_record(id, identity).await?,
                };
                if checked.status == Status::Active {
                    return Err(ClientError::Fork(format!(
                        "the key service left out {}, an approved active device of {identity}",
                        id.short()
                    )));
                }
            }
        }

        let mut new_pin = pin.cloned().unwrap_or_default();
        for (logged, change) in &changes {
            match change {
                Change::Genesis(_) | Change::Added(_) => {}
                Change::Removed(id) => {
                    new_pin.removed.insert(id.to_string(), logged.logged_at);
                }
                Change::Reset { replaced, .. } => {
                    for id in replaced {
                        new_pin.removed.insert(id.to_string(), logged.logged_at);
                    }
                    new_pin.resets += 1;
                }
            }
        }
        new_pin.length = state.length();
        new_pin.head = state.head().map(hex::encode).unwrap_or_default();
        new_pin.trusted = state.trusted().iter().map(CardId::to_string).collect();
        for id in state.trusted() {
            new_pin.removed.remove(&id.to_string());
        }
        let new_pin_resets = new_pin.resets;
        let removed: BTreeSet<CardId> = new_pin
            .removed
            .keys()
            .filter_map(|id| id.parse().ok())
            .collect();
        self.save_device_list(identity, new_pin)?;

        let mut devices = Devices {
            list_length: state.length(),
            resets: new_pin_resets,
            ..Default::default()
        };
        for id in active {
            if let Some(r) = records.get(&id) {
                if state.is_trusted(&id) {
                    devices.approved.push(r.card.clone());
                } else if removed.contains(&id) {
                    // Approved once, withdrawn since (removed, or replaced by
                    // a reset): gone, not waiting for approval.
                    devices.removed.push(r.card.clone());
                } else {
                    devices.pending.push(r.card.clone());
                }
            }
        }
        Ok(devices)
    }

    /// `identity`'s device list from `from` on, with the checkpoint it is
    /// proven in (checked against the kept one).
    async fn device_list_from(
        &self,
        identity: &str,
        from: u64,
    ) -> Result<(DeviceList, VerifiedCheckpoint), ClientError> {
        self.fresh(|| self.device_list_once(identity, from)).await
    }

    async fn device_list_once(
        &self,
        identity: &str,
        from: u64,
    ) -> Result<(DeviceList, VerifiedCheckpoint), ClientError> {
        let request = self
            .request_to(
                Service::Kms,
                GetDeviceListRequest {
                    identity: identity.to_owned(),
                    from_seqno: from,
                },
            )
            .await?;
        let response = self
            .kms_client()
            .get_device_list(request)
            .await
            .map_err(rpc("key service", self.kms_url(), "a device list"))?
            .into_inner();
        let checkpoint = self
            .advance_checkpoint(response.checkpoint.as_ref().ok_or_else(|| {
                ClientError::Fork("a device list answered without a checkpoint".into())
            })?)
            .await?;
        if response.identity != identity {
            return Err(ClientError::Fork(format!(
                "asked for the device list of {identity}, the key service answered with {}'s",
                response.identity
            )));
        }
        Ok((response.device_list.unwrap_or_default(), checkpoint))
    }

    /// Stores a verified device list, unless another process of this
    /// profile stored a longer one meanwhile; one of the same length must be
    /// the same list.
    fn save_device_list(&self, identity: &str, new: DeviceListPin) -> Result<(), ClientError> {
        let outcome = state::with_state(&self.dir, |s| match s.device_lists.get(identity) {
            Some(c) if c.length > new.length => Ok(()),
            Some(c) if c.length == new.length && c.head != new.head => Err(DeviceListError::Fork {
                seqno: new.length.saturating_sub(1),
            }),
            _ => {
                s.device_lists.insert(identity.to_owned(), new);
                Ok(())
            }
        })?;
        outcome.map_err(|e| device_list_error(identity, e))
    }

    fn cache_record(&self, record: &CheckedRecord) {
        if record.status == Status::Revoked {
            let id = record.card.id().to_string();
            // Best effort: the next check of the card remembers it again.
            let _ = state::with_state(&self.dir, |s| s.revoked.insert(id));
        }
        if let Ok(mut cache) = self.card_cache.lock() {
            cache.insert(
                record.card.id(),
                (record.clone(), std::time::Instant::now()),
            );
        }
    }

    /// Compares the approved cards found with the pins, records the new pins
    /// and returns what changed (pending cards are reported once).
    fn update_pins(
        &self,
        found: &BTreeMap<String, Devices>,
    ) -> Result<Vec<TrustEvent>, ClientError> {
        state::with_state(&self.dir, |s| {
            let mut events = Vec::new();
            for (identity, devices) in found {
                let first_contact = !s.contacts.contains_key(identity);
                let pin = s.contacts.entry(identity.clone()).or_default();
                if first_contact {
                    // Resets before this device knew the contact changed
                    // nothing it trusted.
                    pin.acknowledged_resets = devices.resets;
                }
                let reset = devices.resets > pin.acknowledged_resets;
                if reset {
                    events.push(TrustEvent::IdentityReset {
                        identity: identity.clone(),
                    });
                }
                let now: BTreeMap<String, String> = devices
                    .approved
                    .iter()
                    .map(|c| (c.id().to_string(), c.device_name().to_owned()))
                    .collect();
                if !first_contact {
                    for card in &devices.approved {
                        let id = card.id().to_string();
                        if pin.cards.contains_key(&id) {
                            continue;
                        }
                        match card.previous_card_id() {
                            Some(prev) if pin.cards.contains_key(&prev.to_string()) => {
                                events.push(TrustEvent::KeyChanged {
                                    identity: identity.clone(),
                                    old_card_id: prev,
                                    new_card_id: card.id(),
                                });
                            }
                            _ => events.push(TrustEvent::DeviceAdded {
                                identity: identity.clone(),
                                card_id: card.id(),
                                device_name: card.device_name().to_owned(),
                            }),
                        }
                    }
                    let replaced: BTreeSet<String> = devices
                        .approved
                        .iter()
                        .filter_map(|c| c.previous_card_id().map(|p| p.to_string()))
                        .collect();
                    for id in pin.cards.keys() {
                        if !now.contains_key(id)
                            && !replaced.contains(id)
                            && let Ok(card_id) = id.parse()
                        {
                            events.push(TrustEvent::DeviceRemoved {
                                identity: identity.clone(),
                                card_id,
                            });
                        }
                    }
                }
                let pending: BTreeSet<String> =
                    devices.pending.iter().map(|c| c.id().to_string()).collect();
                for card in &devices.pending {
                    if !pin.pending.contains(&card.id().to_string()) {
                        events.push(TrustEvent::DevicePending {
                            identity: identity.clone(),
                            card_id: card.id(),
                            device_name: card.device_name().to_owned(),
                        });
                    }
                }
                pin.pending = pending;
                let now_ids: BTreeSet<String> = now.keys().cloned().collect();
                // A reset drops the mark even if the same cards came back.
                if let Some(verified) = &pin.verified
                    && (verified != &now_ids || reset)
                {
                    pin.verified = None;
                    events.push(TrustEvent::VerificationLost {
                        identity: identity.clone(),
                    });
                }
                pin.cards = now;
            }
            events
        })
    }

    /// A card by id, whatever its status, checked like any other.
    /// Fetches the checked record of each card in `ids` not in `records`
    /// yet (statement signers no longer active).
    async fn fetch_records(
        &self,
        ids: BTreeSet<CardId>,
        identity: &str,
        records: &mut BTreeMap<CardId, CheckedRecord>,
    ) -> Result<(), ClientError> {
        for id in ids {
            if let std::collections::btree_map::Entry::Vacant(slot) = records.entry(id) {
                slot.insert(self.card_record(&id, identity).await?);
            }
        }
        Ok(())
    }

    async fn card_record(&self, id: &CardId, identity: &str) -> Result<CheckedRecord, ClientError> {
        self.fetch_card(id, identity, CardKind::Client).await
    }

    async fn fetch_card(
        &self,
        id: &CardId,
        identity: &str,
        kind: CardKind,
    ) -> Result<CheckedRecord, ClientError> {
        self.fetch_card_as(id, Some(identity), kind).await
    }

    /// [`Self::fetch_card`] for an expected identity, or (`None`) whichever
    /// identity the card verifies under.
    async fn fetch_card_as(
        &self,
        id: &CardId,
        identity: Option<&str>,
        kind: CardKind,
    ) -> Result<CheckedRecord, ClientError> {
        let (record, checkpoint) = self.fresh(|| self.get_card_once(id)).await?;
        let claimed;
        let identity = match identity {
            Some(i) => i,
            None => {
                claimed = transparency::registered_card(&record.registration_entry)
                    .ok()
                    .and_then(|c| tessera_card::ParsedCard::parse(c).ok())
                    .map(|c| c.identity().to_owned())
                    .ok_or_else(|| {
                        ClientError::card(
                            "(unknown)",
                            Some(*id),
                            tessera_card::CardError::Malformed(
                                "the key service's record holds no readable card",
                            ),
                        )
                    })?;
                &claimed
            }
        };
        let checked = self.check_record(&record, &checkpoint, identity, kind)?;
        if &checked.card.id() != id {
            return Err(ClientError::card(
                identity,
                Some(checked.card.id()),
                tessera_card::CardError::Malformed(
                    "the key service returned another card than the one asked for",
                ),
            ));
        }
        self.cache_record(&checked);
        Ok(checked)
    }

    /// The client card with `id`, verified under whichever identity owns
    /// it (from the cache for up to a minute).
    pub(crate) async fn card_owner(&self, id: &CardId) -> Result<CardInfo, ClientError> {
        let cached = self
            .card_cache
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .filter(|(r, at)| r.card.kind() == CardKind::Client && at.elapsed() < CACHE_FOR);
        match cached {
            Some((record, _)) => Ok(CardInfo::from_record(&record)),
            None => Ok(CardInfo::from_record(
                &self.fetch_card_as(id, None, CardKind::Client).await?,
            )),
        }
    }

    async fn get_card_once(
        &self,
        id: &CardId,
    ) -> Result<(tessera_proto::kms::v1::CardRecord, VerifiedCheckpoint), ClientError> {
        let request = self
            .request_to(
                Service::Kms,
                GetCardRequest {
                    card_id: id.to_vec(),
                },
            )
            .await?;
        let response = self
            .kms_client()
            .get_card(request)
            .await
            .map_err(rpc("key service", self.kms_url(), "a card lookup"))?
            .into_inner();
        let (record, checkpoint) = match (response.record, response.checkpoint) {
            (Some(r), Some(c)) => (r, c),
            _ => {
                return Err(ClientError::Message(
                    "the key service answered without a card".into(),
                ));
            }
        };
        let checkpoint = self.advance_checkpoint(&checkpoint).await?;
        Ok((record, checkpoint))
    }

    /// A card by id, whatever its status (old messages still verify), checked
    /// like any other. `identity` and `kind` are what the caller expects.
    pub async fn card_by_id(
        &self,
        id: &CardId,
        identity: &str,
        kind: CardKind,
    ) -> Result<CardInfo, ClientError> {
        Ok(CardInfo::from_record(
            &self.fetch_card(id, identity, kind).await?,
        ))
    }

    /// The card with `id` and its status, from the cache of verified cards
    /// (for up to a minute) or the key service.
    pub(crate) async fn card_info(
        &self,
        id: &CardId,
        identity: &str,
        kind: CardKind,
    ) -> Result<CardInfo, ClientError> {
        self.card_info_as_of(id, identity, kind, i64::MIN).await
    }

    /// [`Self::card_info`] for judging something stored at `at_ms`: a
    /// cached status is used only if it was fetched after that time (a card
    /// active when looked up earlier may have been revoked since, before
    /// the message was stored).
    pub(crate) async fn card_info_as_of(
        &self,
        id: &CardId,
        identity: &str,
        kind: CardKind,
        at_ms: i64,
    ) -> Result<CardInfo, ClientError> {
        let now = crate::client::now_ms();
        let cached = self
            .card_cache
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .filter(|(r, at)| {
                let fetched_ms = now.saturating_sub(at.elapsed().as_millis() as i64);
                r.card.identity() == identity
                    && r.card.kind() == kind
                    && at.elapsed() < CACHE_FOR
                    && fetched_ms >= at_ms
            });
        match cached {
            Some((record, _)) => Ok(CardInfo::from_record(&record)),
            None => self.card_by_id(id, identity, kind).await,
        }
    }

    /// Whether `identity` reset their device list since this device knew
    /// them, and the user has not verified them again.
    pub fn unacknowledged_reset(&self, identity: &str) -> Result<bool, ClientError> {
        let s = state::read_state(&self.dir)?;
        let resets = s.device_lists.get(identity).map_or(0, |p| p.resets);
        Ok(s.contacts
            .get(identity)
            .is_some_and(|c| resets > c.acknowledged_resets))
    }

    /// Takes note of `identity`'s resets so far (after checking with them,
    /// e.g. by safety number, that the new device is theirs).
    pub fn acknowledge_reset(&self, identity: &str) -> Result<(), ClientError> {
        state::with_state(&self.dir, |s| {
            let resets = s.device_lists.get(identity).map_or(0, |p| p.resets);
            s.contacts
                .entry(identity.to_owned())
                .or_default()
                .acknowledged_resets = resets;
        })
    }

    /// Whether `identity`'s device list approved `card` for a message the
    /// app server stored at `server_time_ms`: approved now, or removed only
    /// after that time. Asks the key service again when the kept list says
    /// no (it may have grown).
    pub(crate) async fn approved_sender(
        &self,
        identity: &str,
        card: &CardId,
        server_time_ms: i64,
    ) -> Result<bool, ClientError> {
        let check = |pin: Option<&DeviceListPin>| {
            pin.is_some_and(|p| {
                let id = card.to_string();
                p.trusted.contains(&id)
                    // Log times are whole seconds: a message stored in the
                    // same second as the removal is taken as before it, as
                    // for revocations.
                    || p.removed
                        .get(&id)
                        .is_some_and(|&at| server_time_ms / 1000 <= at)
            })
        };
        if check(state::read_state(&self.dir)?.device_lists.get(identity)) {
            return Ok(true);
        }
        self.cards_of(&[identity.to_owned()]).await?;
        Ok(check(
            state::read_state(&self.dir)?.device_lists.get(identity),
        ))
    }

    /// The approved cards of identities, as a flat list for sealing, with
    /// the pending ones (never encrypted to) and the changes noticed.
    pub(crate) async fn recipient_cards(
        &self,
        identities: &[String],
    ) -> Result<
        (
            Vec<VerifiedCard>,
            BTreeMap<String, Devices>,
            Vec<TrustEvent>,
        ),
        ClientError,
    > {
        let (found, events) = self.cards_of(identities).await?;
        let mut out: HashMap<CardId, VerifiedCard> = HashMap::new();
        for devices in found.values() {
            for card in &devices.approved {
                out.insert(card.id(), card.clone());
            }
        }
        Ok((out.into_values().collect(), found, events))
    }
}
