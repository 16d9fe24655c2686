//! Finding and verifying cards (the seed's automatic card verification),
//! checking the key directory's transparency log, and noticing when a
//! contact's devices change (TOFU pins).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tessera_card::{
    CardError, CardId, CardKind, ParsedCard, VerifiedCard,
    revocation::ParsedRevocation,
    transparency::{self, VerifiedCheckpoint},
};
use tessera_proto::{
    Message as _,
    kms::v1::{
        CardRecord, CardStatus, GetCardRequest, GetConsistencyProofRequest, SearchCardsRequest,
        key_directory_client::KeyDirectoryClient,
    },
    transparency::v1::SignedCheckpoint,
};

use crate::{Client, ClientError, error::rpc, state};

/// A change in someone's devices, reported rather than silently accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustEvent {
    /// A card appeared that was not seen before for this identity.
    DeviceAdded {
        identity: String,
        card_id: CardId,
        device_name: String,
    },
    /// A card seen before is no longer active (revoked or replaced).
    DeviceRemoved { identity: String, card_id: CardId },
    /// A card replaced an earlier one of the same device (key rotation).
    KeyChanged {
        identity: String,
        old_card_id: CardId,
        new_card_id: CardId,
    },
    /// The identity had been verified by safety number; its cards changed
    /// since, so the mark was dropped.
    VerificationLost { identity: String },
}

/// A card's status at the key service.
#[derive(Debug, Clone)]
pub struct CardInfo {
    pub card: VerifiedCard,
    pub status: CardStatus,
    /// Unix seconds of the revocation, when revoked.
    pub revoked_at: Option<i64>,
}

/// How long a verified card's status is trusted without asking again.
const CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

fn kms_status(record: &CardRecord) -> CardStatus {
    CardStatus::try_from(record.status).unwrap_or(CardStatus::Unspecified)
}

impl Client {
    fn kms_client(&self) -> KeyDirectoryClient<tonic::transport::Channel> {
        KeyDirectoryClient::new(self.kms.clone()).max_decoding_message_size(64 << 20)
    }

    /// The last checkpoint this device verified, if any.
    pub(crate) fn last_checkpoint(&self) -> Result<Option<VerifiedCheckpoint>, ClientError> {
        Ok(state::read_state(&self.dir)?
            .checkpoint
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| SignedCheckpoint::decode(b.as_slice()).ok())
            .and_then(|s| transparency::verify_checkpoint(&s, self.verifier.kms_key()).ok()))
    }

    /// Verifies `signed` against the pinned key-service key and checks that
    /// it extends the last checkpoint this device saw (consistency proof);
    /// remembers it when it is newer.
    pub(crate) async fn advance_checkpoint(
        &self,
        signed: &SignedCheckpoint,
    ) -> Result<VerifiedCheckpoint, ClientError> {
        let new = transparency::verify_checkpoint(signed, self.verifier.kms_key())
            .map_err(|e| ClientError::Fork(format!("checkpoint refused: {e}")))?;
        let last = self.last_checkpoint()?;
        if let Some(old) = &last {
            // The log only grows: an older checkpoint than one this device
            // already verified hides what was appended since (a rollback).
            if new.tree_size < old.tree_size {
                return Err(ClientError::Fork(format!(
                    "the directory went back to {} entries after showing {}",
                    new.tree_size, old.tree_size
                )));
            }
            self.check_consistent(old, &new).await?;
        }
        if last
            .as_ref()
            .is_none_or(|old| new.tree_size > old.tree_size)
        {
            let kms_key = *self.verifier.kms_key();
            state::with_state(&self.dir, |s| {
                // Only ever move forward, even with concurrent updates.
                let stored = s
                    .checkpoint
                    .as_ref()
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|b| SignedCheckpoint::decode(b.as_slice()).ok())
                    .and_then(|c| transparency::verify_checkpoint(&c, &kms_key).ok())
                    .map_or(0, |c| c.tree_size);
                if new.tree_size > stored || s.checkpoint.is_none() {
                    s.checkpoint = Some(hex::encode(new.signed.encode_to_vec()));
                }
            })?;
        }
        Ok(new)
    }

    /// Checks that two checkpoints describe one log: the same root for the
    /// same size, else a consistency proof from the smaller to the larger
    /// (asked of this device's key directory).
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
            .request(GetConsistencyProofRequest {
                old_size: small.tree_size,
                new_size: big.tree_size,
            })
            .await?;
        let proof = self
            .kms_client()
            .get_consistency_proof(request)
            .await
            .map_err(rpc("key service", self.kms_url(), "a consistency proof"))?
            .into_inner()
            .proof
            .ok_or_else(|| ClientError::Fork("no consistency proof was given".into()))?;
        transparency::verify_consistency(small, big, &proof)
            .map_err(|e| ClientError::Fork(e.to_string()))
    }

    /// Checks one record from the key service: the card's three signatures,
    /// its identity and kind, and that its registration is in the log the
    /// checkpoint commits to.
    pub(crate) fn check_record(
        &self,
        record: &CardRecord,
        checkpoint: &VerifiedCheckpoint,
        identity: &str,
        kind: CardKind,
    ) -> Result<VerifiedCard, ClientError> {
        // The card comes out of the very bytes the inclusion proof covers.
        let card = transparency::registered_card(&record.registration_entry)
            .map_err(|e| ClientError::card(identity, None, e))?;
        let claimed = ParsedCard::parse(card.clone()).ok().map(|p| p.id());
        let verified = self
            .verifier
            .verify(&card, Some(identity), kind)
            .map_err(|e| ClientError::card(identity, claimed, e))?;
        let proof = record.inclusion.as_ref().ok_or_else(|| {
            ClientError::card(identity, claimed, CardError::BadInclusionProof("missing"))
        })?;
        transparency::verify_inclusion(checkpoint, &record.registration_entry, proof)
            .map_err(|e| ClientError::card(identity, claimed, e))?;
        Ok(verified)
    }

    /// Every active client card of each identity, each verified and proven
    /// in the log; with the changes since the devices were last seen.
    pub async fn cards_of(
        &self,
        identities: &[String],
    ) -> Result<(BTreeMap<String, Vec<VerifiedCard>>, Vec<TrustEvent>), ClientError> {
        let mut found: BTreeMap<String, Vec<VerifiedCard>> = BTreeMap::new();
        for chunk in identities.chunks(100) {
            let request = self
                .request(SearchCardsRequest {
                    identities: chunk.to_vec(),
                    kind: tessera_proto::card::v1::CardKind::Client as i32,
                })
                .await?;
            let response = self
                .kms_client()
                .search_cards(request)
                .await
                .map_err(rpc("key service", self.kms_url(), "a card search"))?
                .into_inner();
            let checkpoint = self
                .advance_checkpoint(response.checkpoint.as_ref().ok_or_else(|| {
                    ClientError::Fork("search answered without a checkpoint".into())
                })?)
                .await?;
            for result in response.results {
                if !chunk.contains(&result.identity) {
                    return Err(ClientError::Message(format!(
                        "the key service answered for {:?}, which was not asked for",
                        result.identity
                    )));
                }
                let cards = found.entry(result.identity.clone()).or_default();
                for record in &result.cards {
                    if kms_status(record) != CardStatus::Active {
                        continue;
                    }
                    let card =
                        self.check_record(record, &checkpoint, &result.identity, CardKind::Client)?;
                    self.cache_card(&card);
                    cards.push(card);
                }
            }
        }
        let events = self.update_pins(&found)?;
        Ok((found, events))
    }

    pub(crate) fn cache_card(&self, card: &VerifiedCard) {
        self.cache_info(CardInfo {
            card: card.clone(),
            status: CardStatus::Active,
            revoked_at: None,
        });
    }

    fn cache_info(&self, info: CardInfo) {
        if let Ok(mut cache) = self.card_cache.lock() {
            cache.insert(info.card.id(), (info, std::time::Instant::now()));
        }
    }

    /// Compares what was found with the pins, records the new pins and
    /// returns what changed.
    fn update_pins(
        &self,
        found: &BTreeMap<String, Vec<VerifiedCard>>,
    ) -> Result<Vec<TrustEvent>, ClientError> {
        state::with_state(&self.dir, |s| {
            let mut events = Vec::new();
            for (identity, cards) in found {
                let pin = s.contacts.entry(identity.clone()).or_default();
                let first_contact = pin.cards.is_empty();
                let now: BTreeMap<String, String> = cards
                    .iter()
                    .map(|c| (c.id().to_string(), c.device_name().to_owned()))
                    .collect();
                if !first_contact {
                    for card in cards {
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
                    let replaced: BTreeSet<String> = cards
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
                let now_ids: BTreeSet<String> = now.keys().cloned().collect();
                if let Some(verified) = &pin.verified
                    && verified != &now_ids
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

    /// A card by id, whatever its status (old messages still verify), checked
    /// like any other. `identity` and `kind` are what the caller expects.
    pub async fn card_by_id(
        &self,
        id: &CardId,
        identity: &str,
        kind: CardKind,
    ) -> Result<CardInfo, ClientError> {
        let request = self
            .request(GetCardRequest {
                card_id: id.to_vec(),
            })
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
        let card = self.check_record(&record, &checkpoint, identity, kind)?;
        if &card.id() != id {
            return Err(ClientError::card(
                identity,
                Some(card.id()),
                CardError::Malformed(
                    "the key service returned another card than the one asked for",
                ),
            ));
        }
        let status = kms_status(&record);
        let revoked_at = match (&record.revocation, status) {
            (Some(r), CardStatus::Revoked) => {
                let parsed = ParsedRevocation::parse(r.clone())
                    .map_err(|e| ClientError::card(identity, Some(*id), e))?;
                let as_parsed = ParsedCard::parse(card.card().clone())
                    .map_err(|e| ClientError::card(identity, Some(*id), e))?;
                parsed
                    .verify(&as_parsed, self.verifier.app_key())
                    .map_err(|e| ClientError::card(identity, Some(*id), e))?;
                Some(parsed.revoked_at())
            }
            _ => None,
        };
        let info = CardInfo {
            card,
            status,
            revoked_at,
        };
        self.cache_info(info.clone());
        Ok(info)
    }

    /// The card with `id` and its status, from the cache of verified cards
    /// (for up to a minute) or the key service.
    pub(crate) async fn card_info(
        &self,
        id: &CardId,
        identity: &str,
        kind: CardKind,
    ) -> Result<CardInfo, ClientError> {
        let cached = self
            .card_cache
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .filter(|(info, at)| {
                info.card.identity() == identity
                    && info.card.kind() == kind
                    && at.elapsed() < CACHE_FOR
            });
        match cached {
            Some((info, _)) => Ok(info),
            None => self.card_by_id(id, identity, kind).await,
        }
    }

    /// The active cards of identities, as a flat list for sealing.
    pub(crate) async fn recipient_cards(
        &self,
        identities: &[String],
    ) -> Result<(Vec<VerifiedCard>, Vec<TrustEvent>), ClientError> {
        let (found, events) = self.cards_of(identities).await?;
        let mut out: HashMap<CardId, VerifiedCard> = HashMap::new();
        for cards in found.into_values() {
            for card in cards {
                out.insert(card.id(), card);
            }
        }
        Ok((out.into_values().collect(), events))
    }
}
