//! Sender keys (protocol section 15) as a device uses them: one sending
//! chain per channel at a time, receiving chains for what others sent, all
//! kept in one file per channel, sealed at rest
//! ([`tessera_crypto::local_state`]).
//!
//! A sending chain is replaced by a new one (new random key, copies to
//! every device again) when the channel's epoch changes, when the set of
//! approved devices of the members differs from the one the chain was
//! given to (a device added, removed, revoked; a reset), when it has sent
//! its 10 000 messages, or when it is older than seven days. So a removed
//! member or a revoked device never holds the key of what follows.
//!
//! The next generation is kept on disk *before* a message is sealed under
//! it, so no generation is ever sealed twice, even across a crash.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use tessera_card::{CardId, VerifiedCard};
use tessera_crypto::{
    envelope::{Epoch, ExpectedSender, Opener, Recipient, Sender, VerifiedPayload},
    local_state::LocalStateKey,
    sender_key::{
        ExpectedChannel, GroupDraft, GroupSealed, ParsedDistribution, ParsedGroupEnvelope,
        ReceiverChain, Retention, SenderChain, SenderKeyError, recipients_digest,
    },
};
use tessera_proto::{
    envelope::v1::{KeptReceiverChain, KeptSenderChain},
    server::v1::{GetSenderKeyRequest, PutSenderKeysRequest},
};
use zeroize::{Zeroize, Zeroizing};

use crate::{Client, ClientError, client::now_ms, error::rpc, state};

/// A sending chain older than this is replaced.
pub(crate) const CHAIN_MAX_AGE_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// Receiving chains kept per sender card and epoch, and per channel: a
/// sender starts a new chain on each device change. Past these, the
/// oldest chain is dropped (its copy stays at the app server: fetched
/// again if one of its messages is read again).
pub(crate) const MAX_CHAINS_PER_SENDER_EPOCH: usize = 64;
pub(crate) const MAX_CHAINS_PER_CHANNEL: usize = 1024;
/// Copies per `PutSenderKeys` call (about 450 KiB).
const PUT_BATCH: usize = 1000;
/// Most recipients a chain's listed recipients may have.
const MAX_CHAIN_RECIPIENTS: usize = 64_000;

/// What a device keeps of one channel's chains (sealed on disk).
#[derive(Default, Serialize, Deserialize)]
struct ChannelKeys {
    /// Receiving chains keep only what forward secrecy allows.
    #[serde(default)]
    forward_secret: bool,
    sending: Option<Sending>,
    /// By "sender card hex/epoch/chain id hex".
    #[serde(default)]
    receiving: BTreeMap<String, Receiving>,
    /// Chains' recipient lists (hex card ids), by the hex of their digest:
    /// a sender's chains of one epoch mostly share one, kept once.
    #[serde(default)]
    recipient_lists: BTreeMap<String, Vec<String>>,
}

#[derive(Serialize, Deserialize)]
struct Sending {
    /// Hex of an encoded `KeptSenderChain`.
    chain: String,
    /// The devices (hex card ids) the chain was given to.
    recipients: BTreeSet<String>,
    started_at_ms: i64,
    /// The app server stored the copies.
    distributed: bool,
}

#[derive(Serialize, Deserialize)]
struct Receiving {
    /// Hex of an encoded `KeptReceiverChain`.
    chain: String,
    /// The hex digest of the chain's recipients (signed by the sender,
    /// matched by the list the app server gave): a key of `recipient_lists`.
    recipients: String,
    /// When this device last opened one of the chain's messages (its own
    /// clock): the least recently used chain is dropped first.
    #[serde(default)]
    last_used_ms: i64,
}

impl Drop for ChannelKeys {
    fn drop(&mut self) {
        if let Some(s) = &mut self.sending {
            s.chain.zeroize();
        }
        for r in self.receiving.values_mut() {
            r.chain.zeroize();
        }
    }
}

/// A chain's key in [`ChannelKeys::receiving`]: its sender and epoch
/// first, so the chains of one sender in one epoch are counted by prefix.
fn chain_key(sender: &[u8; 32], epoch: u64, chain_id: &[u8]) -> String {
    format!("{}/{epoch}/{}", hex::encode(sender), hex::encode(chain_id))
}

fn malformed(what: &str) -> ClientError {
    ClientError::Message(format!(
        "this device's kept sender keys are damaged: {what}"
    ))
}

fn decode_hex<M: tessera_proto::Message + Default>(hex_str: &str) -> Result<M, ClientError> {
    let bytes = Zeroizing::new(hex::decode(hex_str).map_err(|_| malformed("not hex"))?);
    M::decode(bytes.as_slice()).map_err(|_| malformed("undecodable chain"))
}

fn encode_hex<M: tessera_proto::Message>(m: &M) -> String {
    let bytes = Zeroizing::new(m.encode_to_vec());
    hex::encode(bytes.as_slice())
}

/// The decoded kept forms hold keys in plain `Vec`s: wiped after use.
fn wipe_sender(k: &mut KeptSenderChain) {
    k.chain_key.zeroize();
}

fn wipe_receiver(k: &mut KeptReceiverChain) {
    k.initial_chain_key.zeroize();
    k.current_chain_key.zeroize();
    for s in &mut k.skipped_secrets {
        s.zeroize();
    }
}

fn sender_from_hex(sender: &Sender<'_>, h: &str) -> Result<SenderChain, ClientError> {
    let mut kept: KeptSenderChain = decode_hex(h)?;
    let chain = SenderChain::restore(sender, &kept).map_err(|e| malformed(&e.to_string()));
    wipe_sender(&mut kept);
    chain
}

fn sender_to_hex(chain: &SenderChain) -> String {
    let mut kept = chain.export();
    let out = encode_hex(&kept);
    wipe_sender(&mut kept);
    out
}

fn receiver_from_hex(h: &str) -> Result<ReceiverChain, ClientError> {
    let mut kept: KeptReceiverChain = decode_hex(h)?;
    let chain = ReceiverChain::restore(&kept).map_err(|e| malformed(&e.to_string()));
    wipe_receiver(&mut kept);
    chain
}

fn receiver_to_hex(chain: &ReceiverChain) -> String {
    let mut kept = chain.export();
    let out = encode_hex(&kept);
    wipe_receiver(&mut kept);
    out
}

/// A kept sending chain's epoch, epoch hash, next generation and first key.
type SendingState = (u64, Vec<u8>, u32, Zeroizing<Vec<u8>>);

fn sending_state(h: &str) -> Option<SendingState> {
    let mut kept: KeptSenderChain = decode_hex(h).ok()?;
    let out = (
        kept.epoch,
        std::mem::take(&mut kept.epoch_hash),
        kept.next_generation,
        Zeroizing::new(std::mem::take(&mut kept.chain_key)),
    );
    wipe_sender(&mut kept);
    Some(out)
}

/// Opens `parsed` with `chain`: a generation opened before, skipped past
/// the kept keys or far ahead is opened again from the chain's first key
/// when it keeps one (changing nothing); the reasons otherwise.
fn open_with(
    chain: &mut ReceiverChain,
    parsed: &ParsedGroupEnvelope,
    sender: &ExpectedSender<'_>,
) -> Result<VerifiedPayload, String> {
    match chain.open(parsed, sender) {
        Ok(payload) => Ok(payload),
        Err(
            SenderKeyError::Replay(_)
            | SenderKeyError::KeyUnavailable(_)
            | SenderKeyError::TooFarAhead { .. },
        ) if chain.keeps_history() => chain.open_history(parsed, sender).map_err(|e| describe(&e)),
        Err(SenderKeyError::Replay(g)) => Err(format!(
            "generation {g} of this chain was opened before, and this channel keeps no message keys (forward secrecy): it cannot be read again"
        )),
        Err(e) => Err(describe(&e)),
    }
}

/// Drops the least recently used kept chains so that one more fits under
/// `key`: of the same sender and epoch past [`MAX_CHAINS_PER_SENDER_EPOCH`],
/// of the channel past [`MAX_CHAINS_PER_CHANNEL`]; then the recipient lists
/// no chain names. (By this device's own clock, not by a time the sender
/// signed: a sender cannot make its chains outlive everyone else's.)
fn make_room(keys: &mut ChannelKeys, key: &str) {
    let group = |k: &str| k.rsplit_once('/').map(|(p, _)| p.to_owned());
    let mine = group(key);
    let mut ages: Vec<(i64, String)> = keys
        .receiving
        .iter()
        .map(|(k, r)| (r.last_used_ms, k.clone()))
        .collect();
    ages.sort();
    let same: Vec<&String> = ages
        .iter()
        .map(|(_, k)| k)
        .filter(|k| group(k) == mine)
        .collect();
    let mut drop: Vec<String> = same
        .iter()
        .take((same.len() + 1).saturating_sub(MAX_CHAINS_PER_SENDER_EPOCH))
        .map(|k| (*k).clone())
        .collect();
    let over = (keys.receiving.len() + 1)
        .saturating_sub(drop.len())
        .saturating_sub(MAX_CHAINS_PER_CHANNEL);
    let more: Vec<String> = ages
        .iter()
        .map(|(_, k)| k.clone())
        .filter(|k| !drop.contains(k))
        .take(over)
        .collect();
    drop.extend(more);
    for k in drop {
        if let Some(mut r) = keys.receiving.remove(&k) {
            r.chain.zeroize();
        }
    }
    let named: BTreeSet<String> = keys
        .receiving
        .values()
        .map(|r| r.recipients.clone())
        .collect();
    keys.recipient_lists
        .retain(|digest, _| named.contains(digest));
}

fn describe(e: &SenderKeyError) -> String {
    match e {
        SenderKeyError::KeyCommitmentMismatch => "the message key does not match the header's key commitment: the sender may be showing devices different messages".into(),
        other => other.to_string(),
    }
}

/// Why sealing to a channel must start over.
pub(crate) enum GroupSeal {
    Sealed {
        sealed: GroupSealed,
        recipients: Vec<CardId>,
    },
    /// The app server moved to another epoch while the chain was being
    /// distributed: verify the channel again.
    EpochMoved,
}

/// A group message opened (nothing kept yet), with its chain's recipients.
/// [`Client::commit_group`] keeps what opening it changed, once the
/// message passed every other check.
pub(crate) struct GroupOpened {
    pub(crate) payload: VerifiedPayload,
    pub(crate) recipients: Vec<[u8; 32]>,
    pub(crate) pending: PendingChain,
}

/// Where a group message's chain is kept, and the chain itself when it was
/// just fetched (kept only once a message of it opened and was accepted).
pub(crate) struct PendingChain {
    key: String,
    fetched: Option<(Receiving, Vec<String>)>,
}

impl Client {
    fn keys_path(&self, channel_id: &str) -> Result<PathBuf, ClientError> {
        // Channel ids are chosen by clients; only a plain one names a file.
        if channel_id.is_empty()
            || channel_id.len() > 128
            || !channel_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClientError::Usage(format!(
                "channel id {channel_id:?} is not one this device keeps keys for"
            )));
        }
        Ok(self
            .dir
            .join("sender-keys")
            .join(format!("{channel_id}.sealed")))
    }

    fn label(channel_id: &str) -> Vec<u8> {
        format!("tessera sender keys of channel {channel_id}").into_bytes()
    }

    fn load_keys(&self, channel_id: &str) -> Result<ChannelKeys, ClientError> {
        let path = self.keys_path(channel_id)?;
        let sealed = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ChannelKeys::default()),
            Err(e) => return Err(ClientError::io(&path, e)),
        };
        let plain = LocalStateKey::of_device(&self.keys)
            .open(&Self::label(channel_id), &sealed)
            .map_err(|e| ClientError::Message(format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&plain).map_err(|_| malformed("not the expected layout"))
    }

    fn save_keys(&self, channel_id: &str, keys: &ChannelKeys) -> Result<(), ClientError> {
        let path = self.keys_path(channel_id)?;
        let plain = Zeroizing::new(
            serde_json::to_vec(keys).map_err(|e| ClientError::Message(e.to_string()))?,
        );
        let sealed = LocalStateKey::of_device(&self.keys)
            .seal(&Self::label(channel_id), &plain)
            .map_err(|e| ClientError::Crypto(e.to_string()))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ClientError::io(parent, e))?;
        }
        tessera_crypto::keystore::write_private_file(&path, &sealed)
            .map_err(|e| ClientError::Message(format!("{}: {e}", path.display())))
    }

    /// Runs `f` on the channel's kept keys under the profile's lock, and
    /// saves them when `f` succeeds.
    fn with_keys<T>(
        &self,
        channel_id: &str,
        f: impl FnOnce(&mut ChannelKeys) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let guard = state::lock(&self.dir, "sender-keys.lock")?;
        let mut keys = self.load_keys(channel_id)?;
        let encode = |k: &ChannelKeys| {
            serde_json::to_vec(k)
                .map(Zeroizing::new)
                .map_err(|e| ClientError::Message(e.to_string()))
        };
        let before = encode(&keys)?;
        let out = f(&mut keys)?;
        // Sealed and written only when something changed.
        if encode(&keys)? != before {
            self.save_keys(channel_id, &keys)?;
        }
        drop(guard);
        Ok(out)
    }

    /// Whether this device keeps the channel's message keys forward-secret
    /// (it cannot re-read messages from the app server then).
    pub fn forward_secret(&self, channel_id: &str) -> Result<bool, ClientError> {
        Ok(self.load_keys(channel_id)?.forward_secret)
    }

    /// Turns forward secrecy of received messages on or off for a channel.
    /// On: every receiving chain drops its first key now, and message keys
    /// are wiped once used, so messages already read cannot be opened again
    /// (a history page shows them as unavailable). Off applies to chains
    /// received from now on.
    pub fn set_forward_secret(&self, channel_id: &str, on: bool) -> Result<(), ClientError> {
        self.with_keys(channel_id, |keys| {
            keys.forward_secret = on;
            if on {
                for r in keys.receiving.values_mut() {
                    let mut chain = receiver_from_hex(&r.chain)?;
                    chain.forget_history();
                    r.chain.zeroize();
                    r.chain = receiver_to_hex(&chain);
                }
            }
            Ok(())
        })
    }

    fn sender(&self) -> Sender<'_> {
        Sender {
            identity: self.identity(),
            card_id: *self.card_id.as_bytes(),
            key: &self.keys.signing,
        }
    }

    /// Seals a message of `channel_id` at `epoch` under this device's
    /// sending chain, first replacing the chain (and giving its key to
    /// every device in `cards`) when the rules of the module say so.
    pub(crate) async fn seal_group(
        &self,
        channel_id: &str,
        epoch: Epoch,
        cards: &[VerifiedCard],
        draft: &GroupDraft<'_>,
    ) -> Result<GroupSeal, ClientError> {
        let wanted: BTreeSet<String> = cards.iter().map(|c| c.id().to_string()).collect();
        let now = now_ms();
        // A chain to distribute, when the kept one will not do.
        let pending = self.with_keys(channel_id, |keys| {
            let reuse = keys.sending.as_ref().is_some_and(|s| {
                sending_state(&s.chain).is_some_and(|(e, hash, next, _)| {
                    e == epoch.number
                        && hash == epoch.hash
                        && next < tessera_crypto::sender_key::MAX_GENERATION
                }) && s.recipients == wanted
                    && now.saturating_sub(s.started_at_ms) < CHAIN_MAX_AGE_MS
            });
            if !reuse {
                let chain = SenderChain::new(&self.sender(), channel_id, epoch)
                    .map_err(|e| ClientError::Crypto(e.to_string()))?;
                keys.sending = Some(Sending {
                    chain: sender_to_hex(&chain),
                    recipients: wanted.clone(),
                    started_at_ms: now,
                    distributed: false,
                });
            }
            match &keys.sending {
                Some(s) if !s.distributed => Ok(Some(sender_from_hex(&self.sender(), &s.chain)?)),
                _ => Ok(None),
            }
        })?;
        if let Some(chain) = pending {
            if !self.distribute(channel_id, &chain, cards).await? {
                return Ok(GroupSeal::EpochMoved);
            }
            let chain_id = chain.chain_id();
            let sender = self.sender();
            self.with_keys(channel_id, |keys| {
                // Still the chain given out (another process may have
                // replaced it meanwhile).
                if let Some(s) = &mut keys.sending
                    && sender_from_hex(&sender, &s.chain)?.chain_id() == chain_id
                {
                    s.distributed = true;
                }
                Ok(())
            })?;
        }
        // Seal, keeping the next generation before the message leaves.
        let sender = self.sender();
        self.with_keys(channel_id, |keys| {
            let s = keys
                .sending
                .as_mut()
                .filter(|s| s.distributed)
                .ok_or_else(|| {
                    ClientError::Message(
                        "another process replaced this channel's sending chain: send again".into(),
                    )
                })?;
            let mut chain = sender_from_hex(&sender, &s.chain)?;
            let sealed = chain
                .seal(&sender, draft)
                .map_err(|e| ClientError::Crypto(e.to_string()))?;
            s.chain.zeroize();
            s.chain = sender_to_hex(&chain);
            Ok(GroupSeal::Sealed {
                sealed,
                recipients: cards.iter().map(|c| c.id()).collect(),
            })
        })
    }

    /// Gives the chain's first key to every device in `cards` through the
    /// app server. `Ok(false)` when the channel moved to another epoch.
    async fn distribute(
        &self,
        channel_id: &str,
        chain: &SenderChain,
        cards: &[VerifiedCard],
    ) -> Result<bool, ClientError> {
        let recipients: Vec<Recipient<'_>> = cards
            .iter()
            .map(|c| Recipient {
                card_id: *c.id().as_bytes(),
                key: c.encryption_key(),
            })
            .collect();
        let copies = chain
            .distribute(&self.sender(), &recipients, now_ms())
            .map_err(|e| ClientError::Crypto(e.to_string()))?;
        // A large channel's copies go in several calls (each well under
        // the server's message size); the first names every recipient.
        let mut all: Vec<Vec<u8>> = cards.iter().map(|c| c.id().to_vec()).collect();
        all.sort();
        let mut batches = copies.chunks(PUT_BATCH).peekable();
        let mut first = true;
        while let Some(batch) = batches.next() {
            let request = self
                .request(PutSenderKeysRequest {
                    channel_id: channel_id.to_owned(),
                    sender_card_id: self.card_id.to_vec(),
                    epoch: chain.epoch().number,
                    chain_id: chain.chain_id().to_vec(),
                    distributions: batch.iter().map(|c| c.distribution.clone()).collect(),
                    recipient_card_ids: if first && batches.peek().is_some() {
                        std::mem::take(&mut all)
                    } else {
                        Vec::new()
                    },
                })
                .await?;
            first = false;
            match self.channels_client().put_sender_keys(request).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::Aborted => return Ok(false),
                Err(s) => return Err(rpc("app server", self.server_url(), "the sender keys")(s)),
            }
        }
        Ok(true)
    }

    /// Opens a group message from `sender` (a card the caller verified and
    /// may accept at the message's epoch), fetching the chain's key from the
    /// app server when this device does not hold it yet. `Err(Ok(reason))`
    /// refuses the message; `Err(Err(e))` is any other failure.
    pub(crate) async fn open_group(
        &self,
        channel_id: &str,
        envelope: &[u8],
        sender: &ExpectedSender<'_>,
    ) -> Result<GroupOpened, Result<String, ClientError>> {
        let parsed = ParsedGroupEnvelope::parse(envelope).map_err(|e| Ok(e.to_string()))?;
        if parsed.channel_id() != channel_id {
            return Err(Ok(format!(
                "it was sealed for channel {}, not this one: moved by the relay",
                parsed.channel_id()
            )));
        }
        if parsed.sender_card_id() != &sender.card_id {
            return Err(Ok(
                "the relay names another sender card than the envelope".into()
            ));
        }
        // The epoch the header names, against the chain this device
        // verified (fetched again when it is behind).
        let n = parsed.epoch().number;
        let state = self.state_at_least(channel_id, n).await.map_err(Err)?;
        let Some(hash) = state.hash_at(n) else {
            return Err(Ok(format!(
                "it names membership epoch {n}, which the channel's verified chain ({} statements) does not have",
                state.length()
            )));
        };
        if !tessera_crypto::ct_eq(&hash, &parsed.epoch().hash) {
            return Err(Ok(format!(
                "it was sent under another membership history at epoch {n} than this device verified: the app server may be showing members different chains"
            )));
        }
        let key = chain_key(
            parsed.sender_card_id(),
            parsed.epoch().number,
            &parsed.chain_id(),
        );
        let kept = self
            .load_keys(channel_id)
            .map_err(Err)?
            .receiving
            .get(&key)
            .map(|r| (Zeroizing::new(r.chain.clone()), r.recipients.clone()));
        let (mut chain, recipients, fetched) = match kept {
            Some((h, digest)) => {
                let recipients = self
                    .load_keys(channel_id)
                    .map_err(Err)?
                    .recipient_lists
                    .get(&digest)
                    .cloned()
                    .ok_or_else(|| Err(malformed("a chain's recipient list is missing")))?;
                (receiver_from_hex(&h).map_err(Err)?, recipients, None)
            }
            None => {
                let (chain, recipients) = self.fetch_chain_key(&parsed, hash, sender).await?;
                let fetched = Receiving {
                    chain: receiver_to_hex(&chain),
                    recipients: hex::encode(chain.recipients_sha256()),
                    last_used_ms: 0,
                };
                (chain, recipients.clone(), Some((fetched, recipients)))
            }
        };
        let recipients = recipients
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| malformed("a recipient card id"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(Err)?;
        // Opened on a copy of the kept state: kept only once the message
        // passed every other check (`commit_group`).
        let payload = open_with(&mut chain, &parsed, sender).map_err(Ok)?;
        Ok(GroupOpened {
            payload,
            recipients,
            pending: PendingChain { key, fetched },
        })
    }

    /// Keeps what opening a group message changed in its chain (and the
    /// chain, when it was just fetched), after the message was accepted.
    pub(crate) fn commit_group(
        &self,
        channel_id: &str,
        envelope: &[u8],
        sender: &ExpectedSender<'_>,
        pending: PendingChain,
    ) -> Result<(), ClientError> {
        let parsed = ParsedGroupEnvelope::parse(envelope)
            .map_err(|e| ClientError::Message(e.to_string()))?;
        let PendingChain { key, fetched } = pending;
        let now = now_ms();
        self.with_keys(channel_id, |keys| {
            if !keys.receiving.contains_key(&key) {
                let Some((fetched, list)) = fetched else {
                    // Dropped meanwhile (too many chains): fetched again
                    // when needed.
                    return Ok(());
                };
                make_room(keys, &key);
                keys.recipient_lists
                    .entry(fetched.recipients.clone())
                    .or_insert(list);
                keys.receiving.insert(key.clone(), fetched);
            }
            let Some(r) = keys.receiving.get_mut(&key) else {
                return Ok(());
            };
            let mut chain = receiver_from_hex(&r.chain)?;
            // Opened before by another process, or a history re-read: the
            // chain stays as it is.
            if chain.open(&parsed, sender).is_ok() {
                r.chain.zeroize();
                r.chain = receiver_to_hex(&chain);
                r.last_used_ms = now;
            } else if r.last_used_ms == 0 {
                r.last_used_ms = now;
            }
            Ok(())
        })
    }

    /// Fetches and opens this device's copy of the chain a message names;
    /// checks that the chain's recipients the app server lists are the ones
    /// the sender signed.
    async fn fetch_chain_key(
        &self,
        parsed: &ParsedGroupEnvelope,
        hash: [u8; 32],
        sender: &ExpectedSender<'_>,
    ) -> Result<(ReceiverChain, Vec<String>), Result<String, ClientError>> {
        let channel_id = parsed.channel_id();
        let n = parsed.epoch().number;
        let request = self
            .request(GetSenderKeyRequest {
                channel_id: channel_id.to_owned(),
                recipient_card_id: self.card_id.to_vec(),
                sender_card_id: parsed.sender_card_id().to_vec(),
                chain_id: parsed.chain_id().to_vec(),
            })
            .await
            .map_err(Err)?;
        let answer = match self.channels_client().get_sender_key(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(Ok(
                    "not encrypted to this device: the app server has no copy of the sender's key for it (sent before it was enrolled or approved, or after it was removed; or the app server withholds it)".into(),
                ));
            }
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                return Err(Ok(format!(
                    "not encrypted to this device: the app server gives it no sender key ({})",
                    s.message()
                )));
            }
            Err(s) => {
                return Err(Err(rpc("app server", self.server_url(), "a sender key")(s)));
            }
        };
        let copy = ParsedDistribution::parse(&answer.distribution)
            .map_err(|e| Ok(format!("the sender's key for this device: {e}")))?;
        // The copy must be of the chain the message names (else the app
        // server could file an old chain under a new chain's id).
        if copy.chain_id() != parsed.chain_id()
            || copy.sender_card_id() != parsed.sender_card_id()
            || copy.epoch() != n
            || copy.channel_id() != channel_id
        {
            return Err(Ok(
                "the app server answered with the key of another chain than the message names"
                    .into(),
            ));
        }
        // `hash` is the epoch's in the chain this device verified: a copy
        // for another history of the channel does not open.
        let forward_secret = self.load_keys(channel_id).map_err(Err)?.forward_secret;
        let chain = copy
            .open(
                &Opener {
                    card_id: *self.card_id.as_bytes(),
                    secret: &self.keys.encryption,
                },
                sender,
                &ExpectedChannel {
                    channel_id,
                    epoch: Epoch { number: n, hash },
                },
                if forward_secret {
                    Retention::ForwardSecret
                } else {
                    Retention::KeepHistory
                },
            )
            .map_err(|e| Ok(format!("the sender's key for this device: {e}")))?;
        let listed: Vec<[u8; 32]> = answer
            .recipient_card_ids
            .iter()
            .map(|id| <[u8; 32]>::try_from(id.as_slice()))
            .collect::<Result<_, _>>()
            .map_err(|_| Ok("the app server listed a malformed recipient card id".to_owned()))?;
        if listed.len() > MAX_CHAIN_RECIPIENTS || !listed.windows(2).all(|w| w[0] < w[1]) {
            return Err(Ok(
                "the app server's list of the chain's recipients is not strictly ascending or too long"
                    .into(),
            ));
        }
        if !tessera_crypto::ct_eq(&recipients_digest(&listed), chain.recipients_sha256()) {
            return Err(Ok(
                "the chain's recipients the app server lists are not the ones the sender signed"
                    .into(),
            ));
        }
        Ok((chain, listed.iter().map(hex::encode).collect()))
    }
}
