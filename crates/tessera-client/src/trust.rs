//! Safety numbers, verified contacts, and the audit of the transparency log
//! for cards under this user's identity that none of its devices made, and
//! for statements of its device list that none of them signed.

use std::collections::{BTreeMap, BTreeSet};

use tessera_card::{
    CardId, CardKind, ParsedCard,
    device_list::{Action, ParsedStatement},
    revocation::ParsedRevocation,
    safety_number::SafetyNumber,
    transparency::{self, LogEvent, Tree},
};
use tessera_proto::kms::v1::{ListLogEntriesRequest, key_directory_client::KeyDirectoryClient};

use crate::{Client, ClientError, TrustEvent, client::Service, error::rpc, state};

/// The safety number of this user and a contact, with the card sets it covers.
#[derive(Debug, Clone)]
pub struct SafetyCheck {
    pub number: SafetyNumber,
    pub contact: String,
    pub contact_cards: BTreeSet<CardId>,
    pub own_cards: BTreeSet<CardId>,
    /// Whether the user had confirmed this very card set.
    pub verified: bool,
    pub events: Vec<TrustEvent>,
}

/// How a card under this user's identity came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This device.
    ThisDevice,
    /// Enrolled from a profile in the same home (another device of this installation).
    CreatedHere,
    /// The user confirmed they enrolled it.
    Acknowledged,
    /// One of the devices above signed it into the device list.
    Approved,
    /// None of this user's devices is known to have made it.
    Unrecognised,
}

#[derive(Debug, Clone)]
pub struct AuditedCard {
    pub card_id: CardId,
    pub device_name: String,
    pub log_index: u64,
    pub revoked: bool,
    pub origin: Origin,
}

/// A statement of this user's device list, as the log holds it.
#[derive(Debug, Clone)]
pub struct AuditedStatement {
    pub seqno: u64,
    pub action: Action,
    pub subject: CardId,
    pub signer: CardId,
    pub log_index: u64,
    /// How the signing card came to be (a statement signed by a card none
    /// of the user's devices made was made behind their back).
    pub signer_origin: Origin,
}

#[derive(Debug, Clone)]
pub struct AuditReport {
    pub log_size: u64,
    pub cards: Vec<AuditedCard>,
    /// Every statement of this user's device list, in log order.
    pub statements: Vec<AuditedStatement>,
    /// Sequence numbers the log holds more than one statement for: the key
    /// service logged two histories of the list.
    pub conflicts: Vec<u64>,
}

impl AuditReport {
    /// Cards no device of this user made that are still active: an attack,
    /// or a device the user forgot to acknowledge.
    pub fn unrecognised_active(&self) -> impl Iterator<Item = &AuditedCard> {
        self.cards
            .iter()
            .filter(|c| c.origin == Origin::Unrecognised && !c.revoked)
    }

    /// Statements of this user's device list signed by a card none of the
    /// user's devices made (a reset by the app server, say).
    pub fn unrecognised_statements(&self) -> impl Iterator<Item = &AuditedStatement> {
        self.statements
            .iter()
            .filter(|s| s.signer_origin == Origin::Unrecognised)
    }
}

const AUDIT_PAGE: u32 = 1000;

impl Client {
    /// The safety number of this user and `contact`, over both sides'
    /// current (verified) cards.
    pub async fn safety_number(&self, contact: &str) -> Result<SafetyCheck, ClientError> {
        let identities = vec![self.identity().to_owned(), contact.to_owned()];
        let (found, events) = self.cards_of(&identities).await?;
        let ids = |who: &str| -> BTreeSet<CardId> {
            found
                .get(who)
                .map(|devices| devices.approved.iter().map(|c| c.id()).collect())
                .unwrap_or_default()
        };
        let own_cards = ids(self.identity());
        let contact_cards = ids(contact);
        if contact_cards.is_empty() {
            return Err(ClientError::NotFound {
                what: "active device of",
                name: contact.to_owned(),
            });
        }
        let own: Vec<CardId> = own_cards.iter().copied().collect();
        let theirs: Vec<CardId> = contact_cards.iter().copied().collect();
        let number = SafetyNumber::compute((self.identity(), &own), (contact, &theirs));
        let verified = state::read_state(&self.dir)?
            .contacts
            .get(contact)
            .and_then(|p| p.verified.clone())
            .is_some_and(|v| {
                v == contact_cards
                    .iter()
                    .map(CardId::to_string)
                    .collect::<BTreeSet<_>>()
            });
        Ok(SafetyCheck {
            number,
            contact: contact.to_owned(),
            contact_cards,
            own_cards,
            verified,
            events,
        })
    }

    /// Marks `check.contact` verified for exactly the cards of `check`; any
    /// later change to their cards drops the mark.
    pub fn mark_verified(&self, check: &SafetyCheck) -> Result<(), ClientError> {
        let cards: BTreeSet<String> = check.contact_cards.iter().map(CardId::to_string).collect();
        state::with_state(&self.dir, |s| {
            let resets = s.device_lists.get(&check.contact).map_or(0, |p| p.resets);
            let pin = s.contacts.entry(check.contact.clone()).or_default();
            pin.verified = Some(cards);
            // Verifying again is how the user takes note of a reset.
            pin.acknowledged_resets = resets;
        })
    }

    /// Contacts and whether they are verified.
    pub fn contacts(&self) -> Result<BTreeMap<String, bool>, ClientError> {
        Ok(state::read_state(&self.dir)?
            .contacts
            .into_iter()
            .map(|(identity, pin)| (identity, pin.verified.is_some()))
            .collect())
    }

    /// Records that the user enrolled `card_id` themselves.
    pub fn acknowledge(&self, card_id: &CardId) -> Result<(), ClientError> {
        state::with_state(&self.dir, |s| {
            s.acknowledged.insert(card_id.to_string());
        })
    }

    /// Walks the whole transparency log, checks it against the latest
    /// checkpoint (which must extend the last one this device saw), and lists
    /// every card ever registered under this user's identity, flagging the
    /// ones none of this user's devices made.
    pub async fn audit(&self) -> Result<AuditReport, ClientError> {
        let mut kms = KeyDirectoryClient::new(self.kms.clone()).max_decoding_message_size(64 << 20);
        let checkpoint = self.refresh_checkpoint().await?;

        let mut tree = Tree::new();
        let mut mine: BTreeMap<CardId, AuditedCard> = BTreeMap::new();
        let mut revocations: Vec<CardId> = Vec::new();
        let mut statements: Vec<(ParsedStatement, u64)> = Vec::new();
        // Every card's identity, to check the identity a revocation's entry names.
        let mut identities: BTreeMap<CardId, String> = BTreeMap::new();
        while tree.len() < checkpoint.tree_size {
            let request = self
                .request_to(
                    Service::Kms,
                    ListLogEntriesRequest {
                        from_index: tree.len(),
                        limit: AUDIT_PAGE,
                    },
                )
                .await?;
            let page = kms
                .list_log_entries(request)
                .await
                .map_err(rpc("key service", self.kms_url(), "the log entries"))?
                .into_inner();
            if page.entries.is_empty() {
                return Err(ClientError::Fork(
                    "the log ended before the checkpoint's size".into(),
                ));
            }
            for entry in page.entries {
                if tree.len() >= checkpoint.tree_size {
                    break;
                }
                let index = tree.push(transparency::leaf_hash(&entry));
                // The entry's outer identity is only the directory's claim:
                // what is inside decides, and a mismatch hides the entry
                // from the owner's audit.
                let mislabelled = |inner: &str| {
                    ClientError::Fork(format!(
                        "log entry {index} is labelled with another identity than its content ({inner})"
                    ))
                };
                match transparency::parse_entry(&entry) {
                    Ok(LogEvent::Registered { identity, card, .. }) => {
                        let Ok(parsed) = ParsedCard::parse(card) else {
                            continue;
                        };
                        if identity != parsed.identity() {
                            return Err(mislabelled(parsed.identity()));
                        }
                        identities.insert(parsed.id(), identity.clone());
                        if parsed.kind() != CardKind::Client || identity != self.identity() {
                            continue;
                        }
                        mine.insert(
                            parsed.id(),
                            AuditedCard {
                                card_id: parsed.id(),
                                device_name: parsed.device_name().to_owned(),
                                log_index: index,
                                revoked: false,
                                origin: Origin::Unrecognised,
                            },
                        );
                    }
                    Ok(LogEvent::Revoked {
                        identity,
                        revocation,
                        ..
                    }) => {
                        let Ok(r) = ParsedRevocation::parse(revocation) else {
                            continue;
                        };
                        if let Some(owner) = identities.get(&r.card_id())
                            && *owner != identity
                        {
                            return Err(mislabelled(owner));
                        }
                        revocations.push(r.card_id());
                    }
                    Ok(LogEvent::DeviceStatement {
                        identity,
                        statement,
                        ..
                    }) => {
                        let Ok(parsed) = ParsedStatement::parse(statement) else {
                            continue;
                        };
                        if identity != parsed.identity() {
                            return Err(mislabelled(parsed.identity()));
                        }
                        if identity == self.identity() {
                            statements.push((parsed, index));
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        // The entries are exactly the log the signed checkpoint commits to.
        if tree.root(checkpoint.tree_size) != Some(checkpoint.root_hash) {
            return Err(ClientError::Fork(
                "the log entries do not hash to the checkpoint's root".into(),
            ));
        }
        for id in revocations {
            if let Some(card) = mine.get_mut(&id) {
                card.revoked = true;
            }
        }
        let created = self.home.created_cards(self.identity());
        let acknowledged = state::read_state(&self.dir)?.acknowledged;
        for card in mine.values_mut() {
            let id = card.card_id.to_string();
            card.origin = if card.card_id == self.card_id {
                Origin::ThisDevice
            } else if created.contains(&id) {
                Origin::CreatedHere
            } else if acknowledged.contains(&id) {
                Origin::Acknowledged
            } else {
                Origin::Unrecognised
            };
        }
        // A card a recognised device signed into the list is recognised too.
        statements.sort_by_key(|(s, _)| s.seqno());
        for (s, _) in &statements {
            let signer_known = mine
                .get(&s.signer())
                .is_some_and(|c| c.origin != Origin::Unrecognised);
            if signer_known
                && s.action() == Action::Add
                && let Some(card) = mine.get_mut(&s.subject())
                && card.origin == Origin::Unrecognised
            {
                card.origin = Origin::Approved;
            }
        }
        let origin_of = |id: &CardId| {
            mine.get(id)
                .map_or(Origin::Unrecognised, |card| card.origin)
        };
        let mut seqnos: BTreeMap<u64, usize> = BTreeMap::new();
        let statements: Vec<AuditedStatement> = statements
            .into_iter()
            .map(|(s, log_index)| {
                *seqnos.entry(s.seqno()).or_default() += 1;
                AuditedStatement {
                    seqno: s.seqno(),
                    action: s.action(),
                    subject: s.subject(),
                    signer: s.signer(),
                    log_index,
                    signer_origin: origin_of(&s.signer()),
                }
            })
            .collect();
        let conflicts = seqnos
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(seqno, _)| seqno)
            .collect();
        let mut cards: Vec<AuditedCard> = mine.into_values().collect();
        cards.sort_by_key(|c| c.log_index);
        Ok(AuditReport {
            log_size: checkpoint.tree_size,
            cards,
            statements,
            conflicts,
        })
    }
}
