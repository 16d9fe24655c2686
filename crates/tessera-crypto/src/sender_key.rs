//! Sender keys for large channels (protocol v2, draft; `docs/protocol.md`
//! section 15): a message costs the same at 1000 devices as at 2.
//!
//! Each sending device draws, for each membership epoch of a channel, a
//! random 32-byte chain key and a 16-byte chain id ([`SenderChain`]). It
//! sends that chain key once to every device of every member of the epoch,
//! signed by its card (context `tessera/v2/sender-key`) and sealed to the
//! device's X25519 key with HPKE ([`SenderChain::distribute`]). Each
//! message then takes one step of a one-way HMAC-SHA256 ratchet:
//!
//! ```text
//! message_secret(n) = HMAC-SHA256(ck_n, 0x01 || "tessera/v2/ratchet")
//! ck_{n+1}          = HMAC-SHA256(ck_n, 0x02 || "tessera/v2/ratchet")
//! key (32) || commitment_key (32)
//!                   = HKDF-SHA256(salt = 32 zero bytes, ikm = message_secret(n),
//!                                 info = "tessera/v2/group-message", L = 76)
//! key_commitment    = HMAC-SHA256(commitment_key, "tessera/v2/key-commitment")
//! ```
//!
//! The message is the existing signed payload (version 2, no recipient
//! list) in one AES-256-GCM ciphertext under a [`GroupHeader`] that names
//! the channel, epoch, sender card, chain, generation and key commitment;
//! no per-device data. A receiver ([`ReceiverChain`]) checks the header
//! against its chain, the generation against replay and its limits, the
//! commitment (constant time) before decrypting, then the signature, then
//! the payload against the header, and only then moves its ratchet.
//!
//! Server storage and delivery of the distribution copies and the client's
//! use of these chains are not built yet.
//!
//! [`GroupHeader`]: tessera_proto::envelope::v1::GroupHeader

use std::{collections::BTreeMap, fmt};

use tessera_proto::{
    Message as _,
    envelope::v1::{
        GroupEnvelope, GroupHeader, KeptReceiverChain, KeptSenderChain, SealedContent,
        SenderKeyContent, SenderKeyDistribution, SignedSenderKey,
    },
};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::{
    KeyError, SignatureContext, aead, commitment,
    envelope::{
        self, Draft, EnvelopeBinding, EnvelopeError, Epoch, ExpectedSender, MESSAGE_ID_LEN, Opener,
        Recipient, Sender, VerifiedPayload, card_id_of,
    },
    hpke_wrap::{self, ENC_LEN, HpkeInfo},
    random::random_array,
};

/// Version of `GroupHeader`.
pub const GROUP_VERSION: u32 = 1;
/// Version of `SenderKeyContent` and `SenderKeyDistribution`.
pub const SENDER_KEY_VERSION: u32 = 1;
/// Length of a chain id.
pub const CHAIN_ID_LEN: usize = 16;
/// Length of a chain key.
pub const CHAIN_KEY_LEN: usize = 32;
/// Most generations one received message may skip ahead of the next
/// expected one.
pub const MAX_SKIP: u32 = 2000;
/// Most skipped message keys a receiver keeps per chain (the oldest go
/// first).
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// Generations of one chain are below this: a sender starts a new chain
/// (a new epoch) before it runs out.
pub const MAX_GENERATION: u32 = 10_000;

const RATCHET_LABEL: &[u8] = b"tessera/v2/ratchet";
const MESSAGE_SECRET_TAG: u8 = 0x01;
const CHAIN_KEY_TAG: u8 = 0x02;
const MESSAGE_INFO: &[u8] = b"tessera/v2/group-message";
const MESSAGE_KEYS_LEN: usize = 32 + 32;
/// Length of a group message's AES-GCM nonce (random, in its header).
pub const NONCE_LEN: usize = 12;
const CHAIN_ID_LABEL: &[u8] = b"tessera/v2/chain-id";
const RECIPIENTS_LABEL: &[u8] = b"tessera/v2/sender-key/recipients";

/// A chain's id: HMAC-SHA256(key = the chain key of its first generation,
/// msg = "tessera/v2/chain-id" || u32be(first_generation))[0..16]. Derived,
/// so that one chain id means one key for every holder: a sender cannot
/// give two devices different keys under one id.
pub fn chain_id_for(chain_key: &ChainKey, first_generation: u32) -> [u8; CHAIN_ID_LEN] {
    let full = commitment::hmac_sha256(
        chain_key.expose_bytes(),
        &[CHAIN_ID_LABEL, &first_generation.to_be_bytes()],
    );
    let mut id = [0u8; CHAIN_ID_LEN];
    id.copy_from_slice(&full[..CHAIN_ID_LEN]);
    id
}

/// The digest of a chain's recipients that each copy signs:
/// SHA-256("tessera/v2/sender-key/recipients" || 0x00 || the card ids,
/// sorted, concatenated). Duplicates count once.
pub fn recipients_digest<'a>(card_ids: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let sorted: std::collections::BTreeSet<&[u8; 32]> = card_ids.into_iter().collect();
    let mut data = Vec::with_capacity(RECIPIENTS_LABEL.len() + 1 + 32 * sorted.len());
    data.extend_from_slice(RECIPIENTS_LABEL);
    data.push(0);
    for id in sorted {
        data.extend_from_slice(id);
    }
    crate::sha256(&data)
}

/// Why a group message or a sender key could not be made or opened. No
/// variant carries key material.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderKeyError {
    #[error("malformed sender-key data: {0}")]
    Malformed(&'static str),
    #[error("unsupported sender-key format version {0}")]
    UnsupportedVersion(u32),
    #[error("this sender key is addressed to another device")]
    NotForThisDevice,
    #[error("the sender key could not be unwrapped: wrong key or altered copy")]
    KeyUnwrapFailed,
    #[error("the sender's signature does not verify")]
    BadSignature,
    #[error("the sender named is not the expected sender")]
    SenderMismatch,
    #[error("the sender key is for another channel")]
    WrongChannel,
    #[error("the sender key is for another epoch than the one expected")]
    WrongEpoch,
    #[error("the message names another channel, epoch, sender or chain than this chain: {0}")]
    OtherChain(&'static str),
    #[error("generation {0} of this chain was already used (replay)")]
    Replay(u32),
    #[error(
        "the key of generation {0} is not held (before the chain's first generation, dropped after the skipped-key limit, or dropped for forward secrecy)"
    )]
    KeyUnavailable(u32),
    #[error("generation {generation} is too far ahead of {next} (at most {MAX_SKIP} skipped)")]
    TooFarAhead { generation: u32, next: u32 },
    #[error("generation {0} is past the chain's limit of {MAX_GENERATION}")]
    GenerationOutOfRange(u32),
    #[error("this chain has sent {MAX_GENERATION} messages: start a new chain")]
    ChainExhausted,
    #[error(
        "the message key does not match the header's key commitment (refused before decrypting)"
    )]
    KeyCommitmentMismatch,
    #[error("the message body does not authenticate: the header or ciphertext was altered")]
    BodyDecryptFailed,
    #[error("the signed payload does not match the header: {0}")]
    PayloadMismatch(&'static str),
    #[error("this chain keeps no initial key (forward secrecy): history cannot be re-read")]
    HistoryUnavailable,
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A 32-byte chain key. Zeroized on drop; cannot be printed.
pub struct ChainKey(Zeroizing<[u8; CHAIN_KEY_LEN]>);

impl ChainKey {
    /// A fresh random chain key.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self(Zeroizing::new(random_array::<CHAIN_KEY_LEN>()?)))
    }

    /// A chain key from its bytes (restoring kept state; test vectors).
    pub fn from_bytes(bytes: [u8; CHAIN_KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw bytes, for the caller's encrypted state.
    pub fn expose_bytes(&self) -> &[u8; CHAIN_KEY_LEN] {
        &self.0
    }

    fn ratchet(&self, tag: u8) -> Zeroizing<[u8; 32]> {
        commitment::hmac_sha256(self.0.as_ref(), &[&[tag], RATCHET_LABEL])
    }

    /// The message secret of this generation.
    fn message_secret(&self) -> MessageSecret {
        MessageSecret(self.ratchet(MESSAGE_SECRET_TAG))
    }

    /// The chain key of the next generation.
    fn next(&self) -> ChainKey {
        ChainKey(self.ratchet(CHAIN_KEY_TAG))
    }
}

/// The 32-byte secret of one generation, from which its keys are derived.
struct MessageSecret(Zeroizing<[u8; 32]>);

/// AES-256 key and commitment key of one message.
pub(crate) struct MessageKeys {
    pub(crate) key: Zeroizing<[u8; 32]>,
    pub(crate) commitment_key: Zeroizing<[u8; 32]>,
}

impl MessageKeys {
    pub(crate) fn derive(secret: &[u8; 32]) -> Self {
        let mut out = Self {
            key: Zeroizing::new([0u8; 32]),
            commitment_key: Zeroizing::new([0u8; 32]),
        };
        // 64 bytes is far below HKDF-SHA256's limit of 255 * 32; on the
        // impossible failure the keys stay zero and nothing opens.
        if let Some(okm) =
            crate::stream::hkdf_sha256(secret, &[0u8; 32], MESSAGE_INFO, MESSAGE_KEYS_LEN)
        {
            let okm = Zeroizing::new(okm);
            if okm.len() == MESSAGE_KEYS_LEN {
                out.key.copy_from_slice(&okm[..32]);
                out.commitment_key.copy_from_slice(&okm[32..]);
            }
        }
        out
    }

    pub(crate) fn commitment(&self) -> [u8; commitment::COMMITMENT_LEN] {
        commitment::commit(&self.commitment_key, commitment::GROUP_COMMITMENT_LABEL)
    }

    /// The message's id: the first 16 bytes of HMAC-SHA256(commitment key,
    /// "tessera/v2/group-message-id"). The signature covers it, so whoever
    /// holds the chain key cannot re-seal a signed payload at another
    /// generation or in another chain (its id would not match).
    pub(crate) fn message_id(&self) -> [u8; MESSAGE_ID_LEN] {
        let full = commitment::commit(&self.commitment_key, commitment::GROUP_MESSAGE_ID_LABEL);
        let mut id = [0u8; MESSAGE_ID_LEN];
        id.copy_from_slice(&full[..MESSAGE_ID_LEN]);
        id
    }
}

/// One step of the ratchet from `ck`: (message secret, next chain key).
pub(crate) fn ratchet_step(ck: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let ck = ChainKey::from_bytes(*ck);
    (ck.message_secret().0, ck.next().0)
}

/// What a group message says, beside the chain's channel and epoch.
pub struct GroupDraft<'a> {
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub sent_at_ms: i64,
}

/// A sealed group message.
pub struct GroupSealed {
    pub message_id: [u8; MESSAGE_ID_LEN],
    pub generation: u32,
    /// Encoded `GroupEnvelope`.
    pub envelope: Vec<u8>,
}

/// One copy of a chain key for one recipient device.
pub struct DistributionCopy {
    pub recipient_card_id: [u8; 32],
    /// Encoded `SenderKeyDistribution`.
    pub distribution: Vec<u8>,
}

/// A sending device's chain for one epoch of one channel. Keeps the key of
/// its first generation, to send it to the epoch's devices (all of them at
/// the start of the epoch, or one that lost its copy later).
pub struct SenderChain {
    channel_id: String,
    epoch: Epoch,
    identity: String,
    card_id: [u8; 32],
    chain_id: [u8; CHAIN_ID_LEN],
    first_generation: u32,
    initial: ChainKey,
    current: ChainKey,
    next_generation: u32,
}

impl fmt::Debug for SenderChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderChain")
            .field("channel_id", &self.channel_id)
            .field("epoch", &self.epoch.number)
            .field("chain_id", &hex::encode(self.chain_id))
            .field("next_generation", &self.next_generation)
            .finish_non_exhaustive()
    }
}

impl SenderChain {
    /// A fresh chain (random chain id and key, generation 0) for `sender`
    /// in `epoch` of `channel_id`.
    pub fn new(
        sender: &Sender<'_>,
        channel_id: &str,
        epoch: Epoch,
    ) -> Result<Self, SenderKeyError> {
        Ok(Self::with(
            sender,
            channel_id,
            epoch,
            ChainKey::generate()?,
            0,
        ))
    }

    /// A chain with a given key and first generation (its id derived from
    /// them, [`chain_id_for`]): restoring kept state, and test vectors. The
    /// chain seals `first_generation` next: a
    /// restored chain that sent messages before must be moved on with
    /// [`Self::skip_to`] first, since a generation sealed twice reuses an
    /// AES-GCM key and nonce (keep the next generation durably before
    /// sending).
    pub fn with(
        sender: &Sender<'_>,
        channel_id: &str,
        epoch: Epoch,
        chain_key: ChainKey,
        first_generation: u32,
    ) -> Self {
        let current = ChainKey::from_bytes(*chain_key.expose_bytes());
        let chain_id = chain_id_for(&chain_key, first_generation);
        Self {
            channel_id: channel_id.to_owned(),
            epoch,
            identity: sender.identity.to_owned(),
            card_id: sender.card_id,
            chain_id,
            first_generation,
            initial: chain_key,
            current,
            next_generation: first_generation,
        }
    }

    pub fn chain_id(&self) -> [u8; CHAIN_ID_LEN] {
        self.chain_id
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Moves the ratchet forward so that `next_generation` is sealed next
    /// (restoring a chain that already sent). Never backwards.
    pub fn skip_to(&mut self, next_generation: u32) -> Result<(), SenderKeyError> {
        if next_generation < self.next_generation {
            return Err(SenderKeyError::Replay(next_generation));
        }
        if next_generation > MAX_GENERATION {
            return Err(SenderKeyError::GenerationOutOfRange(next_generation));
        }
        while self.next_generation < next_generation {
            self.current = self.current.next();
            self.next_generation += 1;
        }
        Ok(())
    }

    /// The generation the next message will use.
    pub fn next_generation(&self) -> u32 {
        self.next_generation
    }

    /// The chain as a device keeps it (to be stored encrypted). Keep it
    /// with the next generation *before* sealing that generation.
    pub fn export(&self) -> KeptSenderChain {
        KeptSenderChain {
            channel_id: self.channel_id.clone(),
            epoch: self.epoch.number,
            epoch_hash: self.epoch.hash.to_vec(),
            chain_key: self.initial.expose_bytes().to_vec(),
            first_generation: self.first_generation,
            next_generation: self.next_generation,
        }
    }

    /// A chain kept by [`Self::export`], resumed at its kept next
    /// generation (never earlier: no generation is sealed twice).
    pub fn restore(sender: &Sender<'_>, kept: &KeptSenderChain) -> Result<Self, SenderKeyError> {
        let key: [u8; CHAIN_KEY_LEN] = kept
            .chain_key
            .as_slice()
            .try_into()
            .map_err(|_| SenderKeyError::Malformed("kept chain key is not 32 bytes"))?;
        if kept.first_generation >= MAX_GENERATION {
            return Err(SenderKeyError::GenerationOutOfRange(kept.first_generation));
        }
        let epoch = Epoch {
            number: kept.epoch,
            hash: id_of(&kept.epoch_hash, "kept epoch hash is not 32 bytes")?,
        };
        let mut chain = Self::with(
            sender,
            &kept.channel_id,
            epoch,
            ChainKey::from_bytes(key),
            kept.first_generation,
        );
        chain.skip_to(kept.next_generation)?;
        Ok(chain)
    }

    /// Messages this chain can still send.
    pub fn remaining(&self) -> u32 {
        MAX_GENERATION.saturating_sub(self.next_generation)
    }

    fn check_sender(&self, sender: &Sender<'_>) -> Result<(), SenderKeyError> {
        if sender.card_id != self.card_id || sender.identity != self.identity {
            return Err(SenderKeyError::SenderMismatch);
        }
        Ok(())
    }

    /// Seals `draft` as the next generation and moves the ratchet on (the
    /// used chain key is wiped).
    /// The message id is derived from the generation's keys
    /// ([`MessageKeys::message_id`]), so sealing is deterministic.
    pub fn seal(
        &mut self,
        sender: &Sender<'_>,
        draft: &GroupDraft<'_>,
    ) -> Result<GroupSealed, SenderKeyError> {
        let nonce = random_array::<NONCE_LEN>()?;
        self.seal_with_nonce(sender, draft, nonce)
    }

    /// [`Self::seal`] with the nonce given: test vectors only (a nonce must
    /// never repeat under one key).
    pub(crate) fn seal_with_nonce(
        &mut self,
        sender: &Sender<'_>,
        draft: &GroupDraft<'_>,
        nonce: [u8; NONCE_LEN],
    ) -> Result<GroupSealed, SenderKeyError> {
        self.check_sender(sender)?;
        let generation = self.next_generation;
        if generation >= MAX_GENERATION {
            return Err(SenderKeyError::ChainExhausted);
        }
        let keys = MessageKeys::derive(&self.current.message_secret().0);
        let message_id = keys.message_id();
        let mut body = envelope::signed_content(
            sender,
            &Draft {
                channel_id: &self.channel_id,
                content_type: draft.content_type,
                body: draft.body,
                sent_at_ms: draft.sent_at_ms,
                epoch: Some(self.epoch),
            },
            &message_id,
            Vec::new(),
        );
        let header = GroupHeader {
            version: GROUP_VERSION,
            channel_id: self.channel_id.clone(),
            epoch: self.epoch.number,
            epoch_hash: self.epoch.hash.to_vec(),
            sender_card_id: self.card_id.to_vec(),
            chain_id: self.chain_id.to_vec(),
            generation,
            key_commitment: keys.commitment().to_vec(),
            nonce: nonce.to_vec(),
        }
        .encode_to_vec();
        aead::AeadKey::new(&keys.key).seal_in_place(nonce, &header, &mut body);
        let envelope = GroupEnvelope {
            header,
            ciphertext: body,
        }
        .encode_to_vec();
        self.current = self.current.next();
        self.next_generation = generation + 1;
        Ok(GroupSealed {
            message_id,
            generation,
            envelope,
        })
    }

    /// One signed, HPKE-sealed copy of the chain's first key for each
    /// recipient device (the sender's own other devices included), in the
    /// order given, each signing the digest of the whole list
    /// ([`recipients_digest`]). Large lists are sealed on several threads.
    pub fn distribute(
        &self,
        sender: &Sender<'_>,
        recipients: &[Recipient<'_>],
        created_at_ms: i64,
    ) -> Result<Vec<DistributionCopy>, SenderKeyError> {
        self.check_sender(sender)?;
        let mut seen: Vec<[u8; 32]> = recipients.iter().map(|r| r.card_id).collect();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(EnvelopeError::DuplicateRecipient.into());
        }
        let digest = recipients_digest(&seen);
        crate::parallel::try_map(
            recipients,
            |r| self.distribution_for(sender, r, &digest, created_at_ms, None),
            || SenderKeyError::Malformed("sender-key sealing thread failed"),
        )
    }

    pub(crate) fn distribution_for(
        &self,
        sender: &Sender<'_>,
        recipient: &Recipient<'_>,
        recipients_sha256: &[u8; 32],
        created_at_ms: i64,
        ephemeral: Option<&[u8; 32]>,
    ) -> Result<DistributionCopy, SenderKeyError> {
        self.check_sender(sender)?;
        let mut content = SenderKeyContent {
            version: SENDER_KEY_VERSION,
            channel_id: self.channel_id.clone(),
            epoch: self.epoch.number,
            epoch_hash: self.epoch.hash.to_vec(),
            sender_identity: self.identity.clone(),
            sender_card_id: self.card_id.to_vec(),
            chain_id: self.chain_id.to_vec(),
            chain_key: self.initial.expose_bytes().to_vec(),
            first_generation: self.first_generation,
            recipient_card_id: recipient.card_id.to_vec(),
            created_at_ms,
            recipients_sha256: recipients_sha256.to_vec(),
        };
        let content_bytes = Zeroizing::new(content.encode_to_vec());
        content.chain_key.zeroize();
        let signature = sender.key.sign(SignatureContext::SenderKey, &content_bytes);
        let mut signed = SignedSenderKey {
            content: content_bytes.to_vec(),
            signature: signature.to_vec(),
        };
        let plaintext = Zeroizing::new(signed.encode_to_vec());
        signed.content.zeroize();
        let sealed = hpke_wrap::seal_base(
            recipient.key,
            HpkeInfo::SenderKeyWrap.label(),
            &recipient.card_id,
            &plaintext,
            ephemeral,
        )?;
        let distribution = SenderKeyDistribution {
            version: SENDER_KEY_VERSION,
            recipient_card_id: recipient.card_id.to_vec(),
            sender_card_id: self.card_id.to_vec(),
            channel_id: self.channel_id.clone(),
            epoch: self.epoch.number,
            chain_id: self.chain_id.to_vec(),
            encapsulated_key: sealed.encapsulated_key.to_vec(),
            ciphertext: sealed.ciphertext,
        }
        .encode_to_vec();
        Ok(DistributionCopy {
            recipient_card_id: recipient.card_id,
            distribution,
        })
    }
}

/// The channel and epoch a receiver expects a sender key for, from the
/// membership chain it verified.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedChannel<'a> {
    pub channel_id: &'a str,
    pub epoch: Epoch,
}

/// What a receiver keeps of a chain's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep the first chain key, so any message of the chain can be opened
    /// again later (history re-read from the app server). Whoever steals
    /// the device's state can read the whole epoch.
    KeepHistory,
    /// Keep only the current chain key and the keys of skipped messages,
    /// each wiped once used: forward secrecy within the epoch, and no
    /// re-reading from the server.
    ForwardSecret,
}

/// A `SenderKeyDistribution` parsed but not yet opened or trusted: its
/// clear fields tell the caller which sender card to fetch.
pub struct ParsedDistribution {
    d: SenderKeyDistribution,
    recipient_card_id: [u8; 32],
    sender_card_id: [u8; 32],
    chain_id: [u8; CHAIN_ID_LEN],
}

impl fmt::Debug for ParsedDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedDistribution")
            .field("channel_id", &self.d.channel_id)
            .field("epoch", &self.d.epoch)
            .field("sender_card_id", &hex::encode(self.sender_card_id))
            .field("recipient_card_id", &hex::encode(self.recipient_card_id))
            .field("chain_id", &hex::encode(self.chain_id))
            .finish_non_exhaustive()
    }
}

fn chain_id_of(bytes: &[u8]) -> Result<[u8; CHAIN_ID_LEN], SenderKeyError> {
    bytes
        .try_into()
        .map_err(|_| SenderKeyError::Malformed("chain id is not 16 bytes"))
}

fn id_of(bytes: &[u8], what: &'static str) -> Result<[u8; 32], SenderKeyError> {
    card_id_of(bytes, what).map_err(|_| SenderKeyError::Malformed(what))
}

impl ParsedDistribution {
    /// Decodes and checks the shape (version, lengths).
    pub fn parse(bytes: &[u8]) -> Result<Self, SenderKeyError> {
        let d = SenderKeyDistribution::decode(bytes)
            .map_err(|_| SenderKeyError::Malformed("not a SenderKeyDistribution"))?;
        if d.version != SENDER_KEY_VERSION {
            return Err(SenderKeyError::UnsupportedVersion(d.version));
        }
        let recipient_card_id = id_of(&d.recipient_card_id, "recipient card id is not 32 bytes")?;
        let sender_card_id = id_of(&d.sender_card_id, "sender card id is not 32 bytes")?;
        let chain_id = chain_id_of(&d.chain_id)?;
        if d.encapsulated_key.len() != ENC_LEN {
            return Err(SenderKeyError::Malformed(
                "encapsulated key is not 32 bytes",
            ));
        }
        Ok(Self {
            d,
            recipient_card_id,
            sender_card_id,
            chain_id,
        })
    }

    pub fn recipient_card_id(&self) -> &[u8; 32] {
        &self.recipient_card_id
    }

    /// The card the copy claims to come from (not yet authenticated).
    pub fn sender_card_id(&self) -> &[u8; 32] {
        &self.sender_card_id
    }

    pub fn channel_id(&self) -> &str {
        &self.d.channel_id
    }

    pub fn epoch(&self) -> u64 {
        self.d.epoch
    }

    pub fn chain_id(&self) -> [u8; CHAIN_ID_LEN] {
        self.chain_id
    }

    /// Opens the copy as `opener`, checks the signature against `sender`
    /// (a card the caller verified), then that the signed content is for
    /// this device, from that sender, for `expected`'s channel and epoch,
    /// and agrees with the clear fields. Returns the receiving chain.
    pub fn open(
        &self,
        opener: &Opener<'_>,
        sender: &ExpectedSender<'_>,
        expected: &ExpectedChannel<'_>,
        retention: Retention,
    ) -> Result<ReceiverChain, SenderKeyError> {
        if self.recipient_card_id != opener.card_id {
            return Err(SenderKeyError::NotForThisDevice);
        }
        let plaintext = hpke_wrap::open_raw(
            opener.secret,
            HpkeInfo::SenderKeyWrap.label(),
            &opener.card_id,
            &self.d.encapsulated_key,
            &self.d.ciphertext,
        )
        .map_err(|_| SenderKeyError::KeyUnwrapFailed)?;
        let mut signed = SignedSenderKey::decode(plaintext.as_slice())
            .map_err(|_| SenderKeyError::Malformed("plaintext is not a SignedSenderKey"))?;
        let content_bytes = Zeroizing::new(std::mem::take(&mut signed.content));
        sender
            .key
            .verify(
                SignatureContext::SenderKey,
                &content_bytes,
                &signed.signature,
            )
            .map_err(|_| SenderKeyError::BadSignature)?;
        let mut content = SenderKeyContent::decode(content_bytes.as_slice())
            .map_err(|_| SenderKeyError::Malformed("content is not a SenderKeyContent"))?;
        let chain_key = Zeroizing::new(std::mem::take(&mut content.chain_key));
        check_content(&content, sender, opener, expected)?;
        let chain_key: [u8; CHAIN_KEY_LEN] = chain_key
            .as_slice()
            .try_into()
            .map_err(|_| SenderKeyError::Malformed("chain key is not 32 bytes"))?;
        let chain_id = chain_id_of(&content.chain_id)?;
        let chain_key = ChainKey::from_bytes(chain_key);
        if !crate::ct_eq(
            &chain_id_for(&chain_key, content.first_generation),
            &chain_id,
        ) {
            return Err(SenderKeyError::Malformed(
                "the chain id is not derived from the chain key",
            ));
        }
        let recipients_sha256 = id_of(
            &content.recipients_sha256,
            "recipients digest is not 32 bytes",
        )?;
        // The clear routing fields must say what was signed.
        if content.sender_card_id != self.d.sender_card_id
            || content.channel_id != self.d.channel_id
            || content.epoch != self.d.epoch
            || chain_id != self.chain_id
        {
            return Err(SenderKeyError::Malformed(
                "the clear fields differ from the signed content",
            ));
        }
        Ok(ReceiverChain::new(
            ChainInfo {
                channel_id: content.channel_id,
                epoch: expected.epoch,
                identity: content.sender_identity,
                card_id: sender.card_id,
                chain_id,
                created_at_ms: content.created_at_ms,
                recipients_sha256,
            },
            chain_key,
            content.first_generation,
            retention,
        ))
    }
}

/// The checks on a signed `SenderKeyContent` (the signature already holds).
fn check_content(
    content: &SenderKeyContent,
    sender: &ExpectedSender<'_>,
    opener: &Opener<'_>,
    expected: &ExpectedChannel<'_>,
) -> Result<(), SenderKeyError> {
    if content.version != SENDER_KEY_VERSION {
        return Err(SenderKeyError::UnsupportedVersion(content.version));
    }
    let sender_card_id = id_of(&content.sender_card_id, "sender card id is not 32 bytes")?;
    if sender_card_id != sender.card_id || content.sender_identity != sender.identity {
        return Err(SenderKeyError::SenderMismatch);
    }
    let recipient = id_of(
        &content.recipient_card_id,
        "recipient card id is not 32 bytes",
    )?;
    if recipient != opener.card_id {
        return Err(SenderKeyError::NotForThisDevice);
    }
    if content.channel_id != expected.channel_id {
        return Err(SenderKeyError::WrongChannel);
    }
    if content.epoch != expected.epoch.number
        || !crate::ct_eq(&content.epoch_hash, &expected.epoch.hash)
    {
        return Err(SenderKeyError::WrongEpoch);
    }
    if content.first_generation >= MAX_GENERATION {
        return Err(SenderKeyError::GenerationOutOfRange(
            content.first_generation,
        ));
    }
    Ok(())
}

/// Whose chain a receiver holds.
struct ChainInfo {
    channel_id: String,
    epoch: Epoch,
    identity: String,
    card_id: [u8; 32],
    chain_id: [u8; CHAIN_ID_LEN],
    created_at_ms: i64,
    recipients_sha256: [u8; 32],
}

/// A generation's message secret, found or derived, and what opening it
/// would change in the receiver's state.
enum Found {
    /// A skipped generation's stored secret.
    Skipped(MessageSecret),
    /// Derived ahead: the secrets of the generations skipped on the way,
    /// the chain key after this generation.
    Ahead {
        secret: MessageSecret,
        skipped: Vec<(u32, MessageSecret)>,
        next: ChainKey,
    },
}

/// A receiving device's state for one sender's chain in one epoch.
pub struct ReceiverChain {
    info: ChainInfo,
    first_generation: u32,
    /// The first chain key, kept with [`Retention::KeepHistory`].
    initial: Option<ChainKey>,
    current: ChainKey,
    next_generation: u32,
    skipped: BTreeMap<u32, MessageSecret>,
    /// One bit per generation: opened already.
    used: Vec<u64>,
}

impl fmt::Debug for ReceiverChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverChain")
            .field("channel_id", &self.info.channel_id)
            .field("epoch", &self.info.epoch.number)
            .field("sender_card_id", &hex::encode(self.info.card_id))
            .field("chain_id", &hex::encode(self.info.chain_id))
            .field("next_generation", &self.next_generation)
            .field("skipped", &self.skipped.len())
            .field("keeps_history", &self.initial.is_some())
            .finish_non_exhaustive()
    }
}

impl ReceiverChain {
    fn new(
        info: ChainInfo,
        chain_key: ChainKey,
        first_generation: u32,
        retention: Retention,
    ) -> Self {
        let current = ChainKey::from_bytes(*chain_key.expose_bytes());
        Self {
            info,
            first_generation,
            initial: (retention == Retention::KeepHistory).then_some(chain_key),
            current,
            next_generation: first_generation,
            skipped: BTreeMap::new(),
            used: vec![0; (MAX_GENERATION as usize).div_ceil(64)],
        }
    }

    pub fn channel_id(&self) -> &str {
        &self.info.channel_id
    }

    pub fn epoch(&self) -> Epoch {
        self.info.epoch
    }

    pub fn sender_card_id(&self) -> &[u8; 32] {
        &self.info.card_id
    }

    pub fn chain_id(&self) -> [u8; CHAIN_ID_LEN] {
        self.info.chain_id
    }

    /// When the sender made the copy (its clock, Unix milliseconds).
    pub fn created_at_ms(&self) -> i64 {
        self.info.created_at_ms
    }

    /// The generation expected next.
    pub fn next_generation(&self) -> u32 {
        self.next_generation
    }

    /// The digest of the chain's recipients the sender signed
    /// ([`recipients_digest`]).
    pub fn recipients_sha256(&self) -> &[u8; 32] {
        &self.info.recipients_sha256
    }

    /// Whether the chain keeps its first key (history can be re-read).
    pub fn keeps_history(&self) -> bool {
        self.initial.is_some()
    }

    /// The chain as a device keeps it (to be stored encrypted).
    pub fn export(&self) -> KeptReceiverChain {
        let (skipped_generations, skipped_secrets) =
            self.skipped.iter().map(|(g, s)| (*g, s.0.to_vec())).unzip();
        KeptReceiverChain {
            channel_id: self.info.channel_id.clone(),
            epoch: self.info.epoch.number,
            epoch_hash: self.info.epoch.hash.to_vec(),
            sender_identity: self.info.identity.clone(),
            sender_card_id: self.info.card_id.to_vec(),
            chain_id: self.info.chain_id.to_vec(),
            created_at_ms: self.info.created_at_ms,
            first_generation: self.first_generation,
            initial_chain_key: self
                .initial
                .as_ref()
                .map(|k| k.expose_bytes().to_vec())
                .unwrap_or_default(),
            current_chain_key: self.current.expose_bytes().to_vec(),
            next_generation: self.next_generation,
            skipped_generations,
            skipped_secrets,
            used: self.used.clone(),
            recipients_sha256: self.info.recipients_sha256.to_vec(),
        }
    }

    /// A chain kept by [`Self::export`]. Checks the shapes, the limits, and
    /// that the chain id is the first key's (when kept).
    pub fn restore(kept: &KeptReceiverChain) -> Result<Self, SenderKeyError> {
        let key = |bytes: &[u8]| -> Result<ChainKey, SenderKeyError> {
            let b: [u8; CHAIN_KEY_LEN] = bytes
                .try_into()
                .map_err(|_| SenderKeyError::Malformed("kept chain key is not 32 bytes"))?;
            Ok(ChainKey::from_bytes(b))
        };
        let chain_id = chain_id_of(&kept.chain_id)?;
        let initial = if kept.initial_chain_key.is_empty() {
            None
        } else {
            let k = key(&kept.initial_chain_key)?;
            if !crate::ct_eq(&chain_id_for(&k, kept.first_generation), &chain_id) {
                return Err(SenderKeyError::Malformed(
                    "kept chain id is not derived from its key",
                ));
            }
            Some(k)
        };
        if kept.first_generation >= MAX_GENERATION
            || kept.next_generation > MAX_GENERATION
            || kept.next_generation < kept.first_generation
            || kept.skipped_generations.len() != kept.skipped_secrets.len()
            || kept.skipped_generations.len() > MAX_SKIPPED_KEYS
            || kept.used.len() != (MAX_GENERATION as usize).div_ceil(64)
        {
            return Err(SenderKeyError::Malformed(
                "kept receiving chain is out of its limits",
            ));
        }
        let mut skipped = BTreeMap::new();
        for (g, s) in kept.skipped_generations.iter().zip(&kept.skipped_secrets) {
            let s: [u8; 32] = s
                .as_slice()
                .try_into()
                .map_err(|_| SenderKeyError::Malformed("kept message secret is not 32 bytes"))?;
            if *g >= kept.next_generation {
                return Err(SenderKeyError::Malformed(
                    "kept skipped generation is ahead",
                ));
            }
            skipped.insert(*g, MessageSecret(Zeroizing::new(s)));
        }
        Ok(Self {
            info: ChainInfo {
                channel_id: kept.channel_id.clone(),
                epoch: Epoch {
                    number: kept.epoch,
                    hash: id_of(&kept.epoch_hash, "kept epoch hash is not 32 bytes")?,
                },
                identity: kept.sender_identity.clone(),
                card_id: id_of(&kept.sender_card_id, "kept sender card id is not 32 bytes")?,
                chain_id,
                created_at_ms: kept.created_at_ms,
                recipients_sha256: id_of(
                    &kept.recipients_sha256,
                    "kept recipients digest is not 32 bytes",
                )?,
            },
            first_generation: kept.first_generation,
            initial,
            current: key(&kept.current_chain_key)?,
            next_generation: kept.next_generation,
            skipped,
            used: kept.used.clone(),
        })
    }

    /// How many skipped message keys are held.
    pub fn skipped_keys(&self) -> usize {
        self.skipped.len()
    }

    /// Drops the first chain key: from now on only forward-secret opening.
    pub fn forget_history(&mut self) {
        self.initial = None;
    }

    fn is_used(&self, generation: u32) -> bool {
        let g = generation as usize;
        self.used
            .get(g / 64)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    fn mark_used(&mut self, generation: u32) {
        let g = generation as usize;
        if let Some(w) = self.used.get_mut(g / 64) {
            *w |= 1 << (g % 64);
        }
    }

    /// Checks the header names this chain (channel, epoch, sender, chain).
    fn check_header(
        &self,
        envelope: &ParsedGroupEnvelope,
        sender: &ExpectedSender<'_>,
    ) -> Result<(), SenderKeyError> {
        if sender.card_id != self.info.card_id || sender.identity != self.info.identity {
            return Err(SenderKeyError::SenderMismatch);
        }
        if envelope.sender_card_id != self.info.card_id {
            return Err(SenderKeyError::OtherChain("sender card"));
        }
        if envelope.header.channel_id != self.info.channel_id {
            return Err(SenderKeyError::OtherChain("channel"));
        }
        if envelope.epoch != self.info.epoch {
            return Err(SenderKeyError::OtherChain("epoch"));
        }
        if envelope.chain_id != self.info.chain_id {
            return Err(SenderKeyError::OtherChain("chain id"));
        }
        Ok(())
    }

    /// The secret of `generation`, derived from the chain's first key (none
    /// when the chain keeps no first key, or before its first generation).
    fn secret_from_initial(&self, generation: u32) -> Option<MessageSecret> {
        let initial = self.initial.as_ref()?;
        if generation < self.first_generation {
            return None;
        }
        let mut ck = ChainKey::from_bytes(*initial.expose_bytes());
        for _ in self.first_generation..generation {
            ck = ck.next();
        }
        Some(ck.message_secret())
    }

    /// Finds the secret of `generation` without changing any state.
    fn find(&self, generation: u32) -> Result<Found, SenderKeyError> {
        if generation >= MAX_GENERATION {
            return Err(SenderKeyError::GenerationOutOfRange(generation));
        }
        if self.is_used(generation) {
            return Err(SenderKeyError::Replay(generation));
        }
        if generation < self.next_generation {
            return match (self.skipped.get(&generation), &self.initial) {
                (Some(secret), _) => Ok(Found::Skipped(MessageSecret(secret.0.clone()))),
                // A chain that keeps its first key keeps no skipped keys:
                // it derives them again.
                (None, Some(_)) => self
                    .secret_from_initial(generation)
                    .map(Found::Skipped)
                    .ok_or(SenderKeyError::KeyUnavailable(generation)),
                (None, None) => Err(SenderKeyError::KeyUnavailable(generation)),
            };
        }
        if generation - self.next_generation > MAX_SKIP {
            return Err(SenderKeyError::TooFarAhead {
                generation,
                next: self.next_generation,
            });
        }
        let mut ck = ChainKey::from_bytes(*self.current.expose_bytes());
        let mut skipped = Vec::with_capacity((generation - self.next_generation) as usize);
        for g in self.next_generation..generation {
            skipped.push((g, ck.message_secret()));
            ck = ck.next();
        }
        Ok(Found::Ahead {
            secret: ck.message_secret(),
            skipped,
            next: ck.next(),
        })
    }

    /// Opens a message of this chain once: checks the header against the
    /// chain, the generation (replay, limits), the key commitment before
    /// decrypting, the signature against `sender`, and the payload against
    /// the header; only then records the generation as used and moves the
    /// ratchet (keeping the keys of skipped generations, at most
    /// [`MAX_SKIPPED_KEYS`], the oldest dropped first).
    pub fn open(
        &mut self,
        envelope: &ParsedGroupEnvelope,
        sender: &ExpectedSender<'_>,
    ) -> Result<VerifiedPayload, SenderKeyError> {
        self.open_with_secret(envelope, sender)
            .map(|(payload, _)| payload)
    }

    /// [`Self::open`], also giving the generation's message secret: what an
    /// organisation backup record carries as its `content_key`, to bind
    /// the record to the stored envelope ([`check_group_binding`]).
    pub fn open_with_secret(
        &mut self,
        envelope: &ParsedGroupEnvelope,
        sender: &ExpectedSender<'_>,
    ) -> Result<(VerifiedPayload, Zeroizing<[u8; 32]>), SenderKeyError> {
        self.check_header(envelope, sender)?;
        let generation = envelope.header.generation;
        let found = self.find(generation)?;
        let secret = match &found {
            Found::Skipped(secret) | Found::Ahead { secret, .. } => secret,
        };
        let payload = envelope.decrypt_and_verify(secret, sender)?;
        let kept_secret = Zeroizing::new(*secret.0);
        match found {
            Found::Skipped(_) => {
                self.skipped.remove(&generation);
            }
            Found::Ahead { skipped, next, .. } => {
                // Kept only where they cannot be derived again.
                if self.initial.is_none() {
                    self.skipped.extend(skipped);
                }
                self.current = next;
                self.next_generation = generation + 1;
                while self.skipped.len() > MAX_SKIPPED_KEYS {
                    self.skipped.pop_first();
                }
            }
        }
        self.mark_used(generation);
        Ok((payload, kept_secret))
    }

    /// Opens a message of this chain again (a history re-read): derives
    /// its key from the first chain key; no replay check, no state change.
    /// Refused when the chain keeps no first key ([`Retention::ForwardSecret`]).
    pub fn open_history(
        &self,
        envelope: &ParsedGroupEnvelope,
        sender: &ExpectedSender<'_>,
    ) -> Result<VerifiedPayload, SenderKeyError> {
        self.open_history_with_secret(envelope, sender)
            .map(|(payload, _)| payload)
    }

    /// [`Self::open_history`], also giving the generation's message secret.
    pub fn open_history_with_secret(
        &self,
        envelope: &ParsedGroupEnvelope,
        sender: &ExpectedSender<'_>,
    ) -> Result<(VerifiedPayload, Zeroizing<[u8; 32]>), SenderKeyError> {
        self.check_header(envelope, sender)?;
        if self.initial.is_none() {
            return Err(SenderKeyError::HistoryUnavailable);
        }
        let generation = envelope.header.generation;
        let secret = self
            .secret_from_initial(generation)
            .ok_or(SenderKeyError::KeyUnavailable(generation))?;
        let payload = envelope.decrypt_and_verify(&secret, sender)?;
        Ok((payload, secret.0))
    }
}

/// The binding check of an organisation backup record (section 7) against
/// a stored group envelope: `SHA-256(envelope) == envelope_sha256`; the
/// envelope parses; the keys derived from `message_secret` (the record's
/// `content_key`) match the header's commitment, open the body, and it is
/// exactly `payload` and `signature`, whose message id is the one those
/// keys derive. The signature itself is checked by the caller
/// ([`VerifiedPayload::verify`]).
pub fn check_group_binding(
    envelope: &[u8],
    envelope_sha256: &[u8],
    message_secret: &[u8],
    payload: &[u8],
    signature: &[u8],
) -> Result<(), SenderKeyError> {
    if envelope_sha256.len() != 32 || message_secret.len() != 32 {
        return Err(SenderKeyError::Malformed(
            "an envelope binding needs a 32-byte digest and key",
        ));
    }
    if !crate::ct_eq(&crate::sha256(envelope), envelope_sha256) {
        return Err(SenderKeyError::Malformed("the envelope's SHA-256 differs"));
    }
    let parsed = ParsedGroupEnvelope::parse(envelope)?;
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(message_secret);
    let keys = MessageKeys::derive(&secret);
    let sealed = parsed.decrypt(&keys)?;
    if sealed.payload != payload || sealed.signature != signature {
        return Err(SenderKeyError::PayloadMismatch(
            "the envelope carries another payload or signature",
        ));
    }
    let id = tessera_proto::envelope::v1::SignedPayload::decode(payload)
        .map_err(|_| SenderKeyError::Malformed("payload is not a SignedPayload"))?
        .message_id;
    if id != keys.message_id() {
        return Err(SenderKeyError::PayloadMismatch(
            "message id (signed for another generation or chain)",
        ));
    }
    Ok(())
}

/// A group envelope whose header has been parsed but nothing decrypted or
/// trusted.
pub struct ParsedGroupEnvelope {
    /// SHA-256 of the exact bytes parsed (for the archive's binding).
    envelope_sha256: [u8; 32],
    header_bytes: Vec<u8>,
    header: GroupHeader,
    epoch: Epoch,
    sender_card_id: [u8; 32],
    chain_id: [u8; CHAIN_ID_LEN],
    key_commitment: [u8; commitment::COMMITMENT_LEN],
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

impl fmt::Debug for ParsedGroupEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedGroupEnvelope")
            .field("channel_id", &self.header.channel_id)
            .field("epoch", &self.epoch.number)
            .field("sender_card_id", &hex::encode(self.sender_card_id))
            .field("chain_id", &hex::encode(self.chain_id))
            .field("generation", &self.header.generation)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl ParsedGroupEnvelope {
    /// Decodes an encoded `GroupEnvelope` and checks the header's shape:
    /// version 1, a 32-byte epoch hash, sender card id and key commitment,
    /// a 16-byte chain id, a generation below [`MAX_GENERATION`], and a
    /// ciphertext at least as long as its tag.
    pub fn parse(bytes: &[u8]) -> Result<Self, SenderKeyError> {
        let envelope = GroupEnvelope::decode(bytes)
            .map_err(|_| SenderKeyError::Malformed("not a GroupEnvelope"))?;
        let header = GroupHeader::decode(envelope.header.as_slice())
            .map_err(|_| SenderKeyError::Malformed("header is not a GroupHeader"))?;
        if header.version != GROUP_VERSION {
            return Err(SenderKeyError::UnsupportedVersion(header.version));
        }
        let epoch = Epoch {
            number: header.epoch,
            hash: id_of(&header.epoch_hash, "epoch hash is not 32 bytes")?,
        };
        let sender_card_id = id_of(&header.sender_card_id, "sender card id is not 32 bytes")?;
        let chain_id = chain_id_of(&header.chain_id)?;
        let key_commitment = id_of(&header.key_commitment, "key commitment is not 32 bytes")?;
        let nonce: [u8; NONCE_LEN] = header
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| SenderKeyError::Malformed("nonce is not 12 bytes"))?;
        if header.generation >= MAX_GENERATION {
            return Err(SenderKeyError::GenerationOutOfRange(header.generation));
        }
        if envelope.ciphertext.len() < aead::TAG_LEN {
            return Err(SenderKeyError::Malformed("ciphertext shorter than its tag"));
        }
        Ok(Self {
            envelope_sha256: crate::sha256(bytes),
            header_bytes: envelope.header,
            header,
            epoch,
            sender_card_id,
            chain_id,
            key_commitment,
            nonce,
            ciphertext: envelope.ciphertext,
        })
    }

    pub fn channel_id(&self) -> &str {
        &self.header.channel_id
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The card the header says sent this (not yet authenticated).
    pub fn sender_card_id(&self) -> &[u8; 32] {
        &self.sender_card_id
    }

    pub fn chain_id(&self) -> [u8; CHAIN_ID_LEN] {
        self.chain_id
    }

    pub fn generation(&self) -> u32 {
        self.header.generation
    }

    /// The key commitment (constant time, before decrypting), then the
    /// body under `keys`, the header's nonce and the header as aad.
    fn decrypt(&self, keys: &MessageKeys) -> Result<SealedContent, SenderKeyError> {
        if !crate::ct_eq(&keys.commitment(), &self.key_commitment) {
            return Err(SenderKeyError::KeyCommitmentMismatch);
        }
        let mut body = Zeroizing::new(self.ciphertext.clone());
        let len = aead::AeadKey::new(&keys.key)
            .open_in_place(self.nonce, &self.header_bytes, &mut body)
            .map_err(|_| SenderKeyError::BodyDecryptFailed)?;
        SealedContent::decode(&body[..len])
            .map_err(|_| SenderKeyError::Malformed("body is not a SealedContent"))
    }

    /// Commitment, decryption, signature, and the payload against the header.
    fn decrypt_and_verify(
        &self,
        secret: &MessageSecret,
        sender: &ExpectedSender<'_>,
    ) -> Result<VerifiedPayload, SenderKeyError> {
        let keys = MessageKeys::derive(&secret.0);
        let sealed = self.decrypt(&keys)?;
        let mut payload = VerifiedPayload::verify(sealed.payload, sealed.signature, sender)
            .map_err(|e| match e {
                EnvelopeError::BadSignature => SenderKeyError::BadSignature,
                EnvelopeError::SenderMismatch => SenderKeyError::SenderMismatch,
                other => SenderKeyError::Envelope(other),
            })?;
        if payload.epoch != Some(self.epoch) {
            return Err(SenderKeyError::PayloadMismatch("epoch"));
        }
        if payload.channel_id != self.header.channel_id {
            return Err(SenderKeyError::PayloadMismatch("channel"));
        }
        if payload.sender_card_id != self.sender_card_id {
            return Err(SenderKeyError::PayloadMismatch("sender card"));
        }
        if !payload.recipient_card_ids.is_empty() {
            return Err(SenderKeyError::PayloadMismatch(
                "a group message names no recipient cards",
            ));
        }
        if payload.message_id != keys.message_id() {
            return Err(SenderKeyError::PayloadMismatch(
                "message id (signed for another generation or chain)",
            ));
        }
        // What an archive record names to be checked against this envelope
        // (section 7): its digest, and the message secret as the key.
        payload.envelope = Some(EnvelopeBinding {
            envelope_sha256: self.envelope_sha256,
            content_key: Zeroizing::new(*secret.0),
        });
        Ok(payload)
    }
}

/// The format of a stored envelope, as the app server labels it
/// (`StoredMessage.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredFormat {
    /// Sealed to each device (section 4).
    Device,
    /// A group envelope under a sender-key chain (section 15).
    Group,
}

impl StoredFormat {
    /// The format a `StoredMessage.kind` names; `None` for an unknown one.
    pub fn of_kind(kind: i32) -> Option<Self> {
        use tessera_proto::server::v1::EnvelopeKind;
        match EnvelopeKind::try_from(kind).ok()? {
            EnvelopeKind::Device => Some(Self::Device),
            EnvelopeKind::Group => Some(Self::Group),
        }
    }
}

/// Why an archive record is not bound to a stored envelope.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BindingError {
    #[error(transparent)]
    Device(#[from] EnvelopeError),
    #[error(transparent)]
    Group(#[from] SenderKeyError),
}

/// The binding check of section 7 for a stored envelope of either format:
/// [`envelope::check_binding`] or [`check_group_binding`].
pub fn check_stored_binding(
    format: StoredFormat,
    envelope: &[u8],
    envelope_sha256: &[u8],
    content_key: &[u8],
    payload: &[u8],
    signature: &[u8],
) -> Result<(), BindingError> {
    match format {
        StoredFormat::Device => Ok(envelope::check_binding(
            envelope,
            envelope_sha256,
            content_key,
            payload,
            signature,
        )?),
        StoredFormat::Group => Ok(check_group_binding(
            envelope,
            envelope_sha256,
            content_key,
            payload,
            signature,
        )?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        envelope::CONTENT_TYPE_TEXT,
        testing::{Device, device},
    };

    const CHANNEL: &str = "0123456789abcdef0123456789abcdef";
    const EPOCH: Epoch = Epoch {
        number: 3,
        hash: [0x33; 32],
    };

    fn expect(sender: &Device, check: impl FnOnce(&ExpectedSender<'_>)) {
        let vk = sender.keys.signing.verifying_key();
        check(&ExpectedSender {
            identity: sender.identity,
            card_id: sender.card_id,
            key: &vk,
        })
    }

    fn text(body: &[u8]) -> GroupDraft<'_> {
        GroupDraft {
            content_type: CONTENT_TYPE_TEXT,
            body,
            sent_at_ms: 1_700_000_000_000,
        }
    }

    fn receive(
        chain: &SenderChain,
        from: &Device,
        me: &Device,
        retention: Retention,
    ) -> Result<ReceiverChain, SenderKeyError> {
        let copy = chain
            .distribute(&from.sender(), &[me.recipient()], 1)?
            .remove(0);
        let parsed = ParsedDistribution::parse(&copy.distribution)?;
        let mut out = Err(SenderKeyError::Malformed("unset"));
        expect(from, |s| {
            out = parsed.open(
                &me.opener(),
                s,
                &ExpectedChannel {
                    channel_id: CHANNEL,
                    epoch: EPOCH,
                },
                retention,
            )
        });
        out
    }

    fn open(
        rx: &mut ReceiverChain,
        from: &Device,
        envelope: &[u8],
    ) -> Result<VerifiedPayload, SenderKeyError> {
        let parsed = ParsedGroupEnvelope::parse(envelope)?;
        let mut out = Err(SenderKeyError::Malformed("unset"));
        expect(from, |s| out = rx.open(&parsed, s));
        out
    }

    fn setup() -> (Device, Device, SenderChain) {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let chain = SenderChain::new(&alice.sender(), CHANNEL, EPOCH).unwrap();
        (alice, bob, chain)
    }

    #[test]
    fn ratchet_and_split_follow_the_specification() {
        use ring::{hkdf, hmac};
        let ck = [0x42u8; 32];
        let mac = |key: &[u8], msg: &[u8]| {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
                .as_ref()
                .to_vec()
        };
        let secret = mac(&ck, b"\x01tessera/v2/ratchet");
        let next = mac(&ck, b"\x02tessera/v2/ratchet");
        let (s, n) = ratchet_step(&ck);
        assert_eq!(s.to_vec(), secret);
        assert_eq!(n.to_vec(), next);
        assert_ne!(secret, next);
        struct L;
        impl hkdf::KeyType for L {
            fn len(&self) -> usize {
                64
            }
        }
        let mut okm = [0u8; 64];
        hkdf::Salt::new(hkdf::HKDF_SHA256, &[0u8; 32])
            .extract(&secret)
            .expand(&[b"tessera/v2/group-message"], L)
            .unwrap()
            .fill(&mut okm)
            .unwrap();
        let keys = MessageKeys::derive(&s);
        assert_eq!(&keys.key[..], &okm[..32]);
        assert_eq!(&keys.commitment_key[..], &okm[32..]);
        assert_eq!(
            keys.commitment().to_vec(),
            mac(&okm[32..], b"tessera/v2/key-commitment")
        );
    }

    #[test]
    fn kept_chains_resume_where_they_stopped() {
        let (alice, bob) = (device("alice", 1), device("bob", 2));
        let mut chain = SenderChain::new(&alice.sender(), CHANNEL, EPOCH).unwrap();
        let mut rx = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        let first = chain.seal(&alice.sender(), &text(b"one")).unwrap();
        let _skipped = chain.seal(&alice.sender(), &text(b"two")).unwrap();
        let third = chain.seal(&alice.sender(), &text(b"three")).unwrap();
        assert!(open(&mut rx, &alice, &third.envelope).is_ok());
        // The sender resumes at the generation after the last sealed one.
        let mut resumed = SenderChain::restore(&alice.sender(), &chain.export()).unwrap();
        assert_eq!(resumed.chain_id(), chain.chain_id());
        let fourth = resumed.seal(&alice.sender(), &text(b"four")).unwrap();
        assert_eq!(fourth.generation, 3);
        // The receiver keeps its replay record; a forward-secret one keeps
        // its skipped keys, one that keeps history derives them again.
        let mut fs = receive(&chain, &alice, &bob, Retention::ForwardSecret).unwrap();
        assert!(open(&mut fs, &alice, &third.envelope).is_ok());
        assert_eq!(
            ReceiverChain::restore(&fs.export()).unwrap().skipped_keys(),
            2
        );
        let mut back = ReceiverChain::restore(&rx.export()).unwrap();
        assert_eq!(back.skipped_keys(), 0);
        assert_eq!(
            open(&mut back, &alice, &third.envelope).unwrap_err(),
            SenderKeyError::Replay(2)
        );
        assert!(open(&mut back, &alice, &first.envelope).is_ok());
        assert!(open(&mut back, &alice, &fourth.envelope).is_ok());
        assert_eq!(back.recipients_sha256(), rx.recipients_sha256());
        // Restored from an older copy of the state (a backup), the chain
        // seals a generation again: under a fresh random nonce, so AES-GCM
        // never sees one (key, nonce) twice; receivers refuse the second
        // one as a replay.
        let old_state = SenderChain::new(&alice.sender(), CHANNEL, EPOCH).unwrap();
        let mut a = SenderChain::restore(&alice.sender(), &old_state.export()).unwrap();
        let mut b = SenderChain::restore(&alice.sender(), &old_state.export()).unwrap();
        let (x, y) = (
            a.seal(&alice.sender(), &text(b"x")).unwrap(),
            b.seal(&alice.sender(), &text(b"y")).unwrap(),
        );
        let nonce_of = |e: &[u8]| {
            GroupHeader::decode(GroupEnvelope::decode(e).unwrap().header.as_slice())
                .unwrap()
                .nonce
        };
        assert_eq!((x.generation, y.generation), (0, 0));
        assert_ne!(nonce_of(&x.envelope), nonce_of(&y.envelope));
        let mut rx2 = receive(&old_state, &alice, &bob, Retention::ForwardSecret).unwrap();
        assert!(open(&mut rx2, &alice, &x.envelope).is_ok());
        assert_eq!(
            open(&mut rx2, &alice, &y.envelope).unwrap_err(),
            SenderKeyError::Replay(0)
        );
        // A kept chain whose id is not its key's is refused.
        let mut kept = rx.export();
        kept.chain_id = vec![7; 16];
        assert!(ReceiverChain::restore(&kept).is_err());
    }

    #[test]
    fn a_copy_whose_chain_id_is_not_its_keys_is_refused() {
        let (alice, bob) = (device("alice", 1), device("bob", 2));
        let chain = SenderChain::new(&alice.sender(), CHANNEL, EPOCH).unwrap();
        let mut forged = SenderChain::new(&alice.sender(), CHANNEL, EPOCH).unwrap();
        // The same key under another id, as a sender giving two devices two
        // keys under one id would need.
        forged.chain_id = chain.chain_id();
        assert_eq!(
            receive(&forged, &alice, &bob, Retention::KeepHistory).unwrap_err(),
            SenderKeyError::Malformed("the chain id is not derived from the chain key")
        );
    }

    #[test]
    fn every_device_opens_in_order_and_out_of_order() {
        let (alice, bob, mut chain) = setup();
        let bob2 = device("bob", 3);
        let sealed: Vec<GroupSealed> = (0..5u8)
            .map(|i| chain.seal(&alice.sender(), &text(&[i; 10])).unwrap())
            .collect();
        assert_eq!(chain.next_generation(), 5);
        let mut in_order = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        for (i, s) in sealed.iter().enumerate() {
            let p = open(&mut in_order, &alice, &s.envelope).unwrap();
            assert_eq!(p.body, vec![i as u8; 10]);
            assert_eq!(p.message_id, s.message_id);
            assert_eq!(p.epoch, Some(EPOCH));
            assert_eq!(p.channel_id, CHANNEL);
            assert!(p.recipient_card_ids.is_empty());
        }
        let mut shuffled = receive(&chain, &alice, &bob2, Retention::ForwardSecret).unwrap();
        for i in [3usize, 0, 4, 2, 1] {
            let p = open(&mut shuffled, &alice, &sealed[i].envelope).unwrap();
            assert_eq!(p.body, vec![i as u8; 10]);
        }
        assert_eq!(
            shuffled.skipped_keys(),
            0,
            "every skipped key was used once"
        );
        // The sender's own other device is a recipient like any other.
        let alice2 = device("alice", 4);
        let mut own = receive(&chain, &alice, &alice2, Retention::KeepHistory).unwrap();
        assert!(open(&mut own, &alice, &sealed[4].envelope).is_ok());
    }

    #[test]
    fn replays_are_refused_and_failures_leave_the_state_alone() {
        let (alice, bob, mut chain) = setup();
        let first = chain.seal(&alice.sender(), &text(b"one")).unwrap();
        let second = chain.seal(&alice.sender(), &text(b"two")).unwrap();
        let mut rx = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        assert!(open(&mut rx, &alice, &second.envelope).is_ok());
        assert_eq!(
            open(&mut rx, &alice, &second.envelope).unwrap_err(),
            SenderKeyError::Replay(1)
        );
        // Every flipped bit of the skipped message is refused, and none of
        // the failures uses up its key.
        for i in 0..first.envelope.len() {
            let mut bad = first.envelope.clone();
            bad[i] ^= 0x01;
            assert!(open(&mut rx, &alice, &bad).is_err(), "flip in byte {i}");
        }
        // (A chain that keeps history derives skipped keys again: it keeps
        // none.)
        assert_eq!(rx.skipped_keys(), 0);
        assert_eq!(rx.next_generation(), 2);
        assert!(open(&mut rx, &alice, &first.envelope).is_ok());
        assert_eq!(
            open(&mut rx, &alice, &first.envelope).unwrap_err(),
            SenderKeyError::Replay(0)
        );
    }

    #[test]
    fn history_rereads_need_the_first_key() {
        let (alice, bob, mut chain) = setup();
        let sealed: Vec<_> = (0..3u8)
            .map(|i| chain.seal(&alice.sender(), &text(&[i])).unwrap())
            .collect();
        let mut keep = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        let mut fs = receive(&chain, &alice, &bob, Retention::ForwardSecret).unwrap();
        for s in &sealed {
            open(&mut keep, &alice, &s.envelope).unwrap();
            open(&mut fs, &alice, &s.envelope).unwrap();
        }
        for (i, s) in sealed.iter().enumerate() {
            let parsed = ParsedGroupEnvelope::parse(&s.envelope).unwrap();
            expect(&alice, |from| {
                assert_eq!(
                    keep.open_history(&parsed, from).unwrap().body,
                    vec![i as u8]
                );
                assert_eq!(
                    fs.open_history(&parsed, from).unwrap_err(),
                    SenderKeyError::HistoryUnavailable
                );
            });
        }
        keep.forget_history();
        let parsed = ParsedGroupEnvelope::parse(&sealed[0].envelope).unwrap();
        expect(&alice, |from| {
            assert_eq!(
                keep.open_history(&parsed, from).unwrap_err(),
                SenderKeyError::HistoryUnavailable
            )
        });
    }

    #[test]
    fn skipping_is_bounded() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let key = [0x51u8; 32];
        let chain_at = |first| {
            SenderChain::with(
                &alice.sender(),
                CHANNEL,
                EPOCH,
                ChainKey::from_bytes(key),
                first,
            )
        };
        let seal_at = |generation: u32| {
            let mut c = chain_at(0);
            // Jump straight to the generation, as a sender that sent that
            // many messages would be.
            c.skip_to(generation).unwrap();
            c.seal(&alice.sender(), &text(b"x")).unwrap().envelope
        };
        let mut back = chain_at(0);
        back.skip_to(3).unwrap();
        assert_eq!(back.skip_to(2), Err(SenderKeyError::Replay(2)));
        assert_eq!(
            back.skip_to(MAX_GENERATION + 1),
            Err(SenderKeyError::GenerationOutOfRange(MAX_GENERATION + 1))
        );
        let mut rx = receive(&chain_at(0), &alice, &bob, Retention::ForwardSecret).unwrap();
        assert_eq!(
            open(&mut rx, &alice, &seal_at(MAX_SKIP + 1)).unwrap_err(),
            SenderKeyError::TooFarAhead {
                generation: MAX_SKIP + 1,
                next: 0
            }
        );
        assert_eq!(rx.next_generation(), 0);
        open(&mut rx, &alice, &seal_at(MAX_SKIP)).unwrap();
        assert_eq!(rx.skipped_keys(), MAX_SKIP as usize);
        open(&mut rx, &alice, &seal_at(2 * MAX_SKIP + 1)).unwrap();
        assert_eq!(rx.skipped_keys(), MAX_SKIPPED_KEYS);
        // The oldest skipped keys went first.
        assert_eq!(
            open(&mut rx, &alice, &seal_at(5)).unwrap_err(),
            SenderKeyError::KeyUnavailable(5)
        );
        open(&mut rx, &alice, &seal_at(2 * MAX_SKIP)).unwrap();

        // A chain ends at MAX_GENERATION; the receiver refuses beyond.
        let mut last = chain_at(MAX_GENERATION - 1);
        assert_eq!(last.remaining(), 1);
        assert!(last.seal(&alice.sender(), &text(b"last")).is_ok());
        assert_eq!(
            last.seal(&alice.sender(), &text(b"more"))
                .map(|_| ())
                .unwrap_err(),
            SenderKeyError::ChainExhausted
        );
        let sealed = seal_at(9);
        let mut env = GroupEnvelope::decode(sealed.as_slice()).unwrap();
        let mut header = GroupHeader::decode(env.header.as_slice()).unwrap();
        header.generation = MAX_GENERATION;
        env.header = header.encode_to_vec();
        assert_eq!(
            ParsedGroupEnvelope::parse(&env.encode_to_vec()).unwrap_err(),
            SenderKeyError::GenerationOutOfRange(MAX_GENERATION)
        );
        // A received chain starting late opens nothing before its start.
        let mut ck9 = ChainKey::from_bytes(key);
        for _ in 0..9 {
            ck9 = ck9.next();
        }
        // (Its id is derived from its first key: another chain's id.)
        let mut late_chain = SenderChain::with(&alice.sender(), CHANNEL, EPOCH, ck9, 9);
        let mut late = receive(&late_chain, &alice, &bob, Retention::KeepHistory).unwrap();
        let mut env = GroupEnvelope::decode(seal_at(8).as_slice()).unwrap();
        let mut header = GroupHeader::decode(env.header.as_slice()).unwrap();
        header.chain_id = late_chain.chain_id().to_vec();
        env.header = header.encode_to_vec();
        assert_eq!(
            open(&mut late, &alice, &env.encode_to_vec()).unwrap_err(),
            SenderKeyError::KeyUnavailable(8)
        );
        let nine = late_chain.seal(&alice.sender(), &text(b"nine")).unwrap();
        assert_eq!(nine.generation, 9);
        assert!(open(&mut late, &alice, &nine.envelope).is_ok());
    }

    /// Re-encrypts `content` (a SealedContent) under `header`, as someone
    /// holding the chain key can.
    fn forge(
        chain_key: &[u8; 32],
        generation: u32,
        mut header: GroupHeader,
        content: &[u8],
    ) -> Vec<u8> {
        let mut ck = ChainKey::from_bytes(*chain_key);
        for _ in 0..generation {
            ck = ck.next();
        }
        let keys = MessageKeys::derive(&ck.message_secret().0);
        header.generation = generation;
        header.key_commitment = keys.commitment().to_vec();
        let nonce: [u8; NONCE_LEN] = header.nonce.as_slice().try_into().unwrap();
        let header = header.encode_to_vec();
        let ciphertext = aead::seal(&keys.key, nonce, &header, content);
        GroupEnvelope { header, ciphertext }.encode_to_vec()
    }

    fn decrypt(chain_key: &[u8; 32], envelope: &[u8]) -> (GroupHeader, Vec<u8>) {
        let env = GroupEnvelope::decode(envelope).unwrap();
        let header = GroupHeader::decode(env.header.as_slice()).unwrap();
        let mut ck = ChainKey::from_bytes(*chain_key);
        for _ in 0..header.generation {
            ck = ck.next();
        }
        let keys = MessageKeys::derive(&ck.message_secret().0);
        let nonce: [u8; NONCE_LEN] = header.nonce.as_slice().try_into().unwrap();
        let plain = aead::open(&keys.key, nonce, &env.header, &env.ciphertext).unwrap();
        (header, plain)
    }

    #[test]
    fn a_signed_message_resealed_at_another_generation_is_refused() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let k = [0x63u8; 32];
        let mut chain =
            SenderChain::with(&alice.sender(), CHANNEL, EPOCH, ChainKey::from_bytes(k), 0);
        let first = chain.seal(&alice.sender(), &text(b"pay bob")).unwrap();
        let mut rx = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        // Whoever holds the chain key (any member, or one removed since)
        // re-seals alice's signed generation-0 content at generation 5: the
        // header, commitment and tag all hold, alice's signature too, but
        // the signed message id is generation 0's.
        let (header, content) = decrypt(&k, &first.envelope);
        let moved = forge(&k, 5, header, &content);
        assert_eq!(
            open(&mut rx, &alice, &moved).unwrap_err(),
            SenderKeyError::PayloadMismatch("message id (signed for another generation or chain)")
        );
        // Nothing was burnt: the genuine generation 0 still opens.
        assert_eq!(rx.next_generation(), 0);
        assert_eq!(
            open(&mut rx, &alice, &first.envelope).unwrap().body,
            b"pay bob"
        );
    }

    #[test]
    fn a_message_moved_to_another_epoch_or_chain_is_refused() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let old_epoch = Epoch {
            number: 2,
            hash: [0x22; 32],
        };
        let (k_old, k_new) = ([0x61u8; 32], [0x62u8; 32]);
        let mut old = SenderChain::with(
            &alice.sender(),
            CHANNEL,
            old_epoch,
            ChainKey::from_bytes(k_old),
            0,
        );
        let new = SenderChain::with(
            &alice.sender(),
            CHANNEL,
            EPOCH,
            ChainKey::from_bytes(k_new),
            0,
        );
        let old_msg = old
            .seal(&alice.sender(), &text(b"before bob was removed"))
            .unwrap();
        let mut rx = receive(&new, &alice, &bob, Retention::KeepHistory).unwrap();
        // Sent as is, the old epoch's message names another chain.
        assert_eq!(
            open(&mut rx, &alice, &old_msg.envelope).unwrap_err(),
            SenderKeyError::OtherChain("epoch")
        );
        // A member holding the new chain key re-encrypts the old signed
        // payload under a header of the new chain: the signature holds,
        // the payload names the old epoch.
        let (mut header, content) = decrypt(&k_old, &old_msg.envelope);
        header.epoch = EPOCH.number;
        header.epoch_hash = EPOCH.hash.to_vec();
        header.chain_id = new.chain_id().to_vec();
        let moved = forge(&k_new, 0, header.clone(), &content);
        assert_eq!(
            open(&mut rx, &alice, &moved).unwrap_err(),
            SenderKeyError::PayloadMismatch("epoch")
        );
        // Another chain id of the same sender and epoch.
        header.chain_id = vec![9; 16];
        let other = forge(&k_new, 0, header, &content);
        assert_eq!(
            open(&mut rx, &alice, &other).unwrap_err(),
            SenderKeyError::OtherChain("chain id")
        );
        // A per-device envelope's payload (it names recipients) is not a
        // group message either.
        let direct = envelope::seal(
            &alice.sender(),
            &Draft {
                channel_id: CHANNEL,
                content_type: CONTENT_TYPE_TEXT,
                body: b"direct",
                sent_at_ms: 0,
                epoch: Some(EPOCH),
            },
            &[bob.recipient()],
        )
        .unwrap();
        let opened = envelope::ParsedEnvelope::parse(&direct.envelope).unwrap();
        let mut payload = None;
        expect(&alice, |s| {
            payload = Some(opened.open(&bob.opener(), s).unwrap())
        });
        let payload = payload.unwrap();
        let content = SealedContent {
            payload: payload.signed_payload.clone(),
            signature: payload.signature.clone(),
        }
        .encode_to_vec();
        let (header, _) = decrypt(&k_new, &new_seal(&alice, k_new));
        let relayed = forge(&k_new, 1, header, &content);
        assert_eq!(
            open(&mut rx, &alice, &relayed).unwrap_err(),
            SenderKeyError::PayloadMismatch("a group message names no recipient cards")
        );
    }

    fn new_seal(alice: &Device, key: [u8; 32]) -> Vec<u8> {
        SenderChain::with(
            &alice.sender(),
            CHANNEL,
            EPOCH,
            ChainKey::from_bytes(key),
            0,
        )
        .seal(&alice.sender(), &text(b"template"))
        .unwrap()
        .envelope
    }

    #[test]
    fn the_commitment_is_checked_before_decrypting() {
        let (alice, bob, mut chain) = setup();
        let sealed = chain.seal(&alice.sender(), &text(b"committed")).unwrap();
        let mut rx = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        let mut env = GroupEnvelope::decode(sealed.envelope.as_slice()).unwrap();
        let mut header = GroupHeader::decode(env.header.as_slice()).unwrap();
        header.key_commitment[0] ^= 1;
        env.header = header.encode_to_vec();
        assert_eq!(
            open(&mut rx, &alice, &env.encode_to_vec()).unwrap_err(),
            SenderKeyError::KeyCommitmentMismatch
        );
        let mut tampered = sealed.envelope.clone();
        let n = tampered.len();
        tampered[n - 1] ^= 1;
        assert_eq!(
            open(&mut rx, &alice, &tampered).unwrap_err(),
            SenderKeyError::BodyDecryptFailed
        );
        assert!(open(&mut rx, &alice, &sealed.envelope).is_ok());
    }

    #[test]
    fn a_one_kib_body_makes_an_envelope_of_at_most_one_and_a_half_kib() {
        // The longest identity (64 bytes) and a real channel id.
        let alice = Device {
            identity: "a-very-long-identity-name.with.dots@example.organisation.example",
            ..device("x", 1)
        };
        assert_eq!(alice.identity.len(), 64);
        let mut chain = SenderChain::new(&alice.sender(), CHANNEL, EPOCH).unwrap();
        let body = vec![0x61u8; 1024];
        let sealed = chain.seal(&alice.sender(), &text(&body)).unwrap();
        assert!(
            sealed.envelope.len() <= 1536,
            "{} bytes",
            sealed.envelope.len()
        );
    }

    #[test]
    fn distribution_copies_are_checked_before_use() {
        let (alice, bob, chain) = setup();
        let eve = device("eve", 9);
        let copy = chain
            .distribute(&alice.sender(), &[bob.recipient()], 5)
            .unwrap()
            .remove(0);
        let channel = ExpectedChannel {
            channel_id: CHANNEL,
            epoch: EPOCH,
        };
        let try_open =
            |bytes: &[u8], me: &Device, from: &Device, expected: &ExpectedChannel<'_>| {
                let parsed = ParsedDistribution::parse(bytes)?;
                let mut out = Err(SenderKeyError::Malformed("unset"));
                expect(from, |s| {
                    out = parsed.open(&me.opener(), s, expected, Retention::KeepHistory)
                });
                out
            };
        let rx = try_open(&copy.distribution, &bob, &alice, &channel).unwrap();
        assert_eq!(rx.chain_id(), chain.chain_id());
        assert_eq!(rx.created_at_ms(), 5);
        assert_eq!(
            try_open(&copy.distribution, &eve, &alice, &channel).unwrap_err(),
            SenderKeyError::NotForThisDevice
        );
        // Re-addressed to eve in clear: her key does not open it.
        let mut d = SenderKeyDistribution::decode(copy.distribution.as_slice()).unwrap();
        d.recipient_card_id = eve.card_id.to_vec();
        assert_eq!(
            try_open(&d.encode_to_vec(), &eve, &alice, &channel).unwrap_err(),
            SenderKeyError::KeyUnwrapFailed
        );
        // Another sender's key, another channel or epoch than expected.
        let mallory = Device {
            identity: "alice",
            card_id: alice.card_id,
            ..device("alice", 1)
        };
        assert_eq!(
            try_open(&copy.distribution, &bob, &mallory, &channel).unwrap_err(),
            SenderKeyError::BadSignature
        );
        let elsewhere = ExpectedChannel {
            channel_id: "ffffffffffffffffffffffffffffffff",
            epoch: EPOCH,
        };
        assert_eq!(
            try_open(&copy.distribution, &bob, &alice, &elsewhere).unwrap_err(),
            SenderKeyError::WrongChannel
        );
        for epoch in [
            Epoch {
                number: 4,
                hash: EPOCH.hash,
            },
            Epoch {
                number: 3,
                hash: [0x34; 32],
            },
        ] {
            let later = ExpectedChannel {
                channel_id: CHANNEL,
                epoch,
            };
            assert_eq!(
                try_open(&copy.distribution, &bob, &alice, &later).unwrap_err(),
                SenderKeyError::WrongEpoch
            );
        }
        // A clear field that says something else than the signed content.
        let mut d = SenderKeyDistribution::decode(copy.distribution.as_slice()).unwrap();
        d.epoch = 7;
        assert_eq!(
            try_open(&d.encode_to_vec(), &bob, &alice, &channel).unwrap_err(),
            SenderKeyError::Malformed("the clear fields differ from the signed content")
        );
        // Every flipped bit is refused.
        for i in 0..copy.distribution.len() {
            let mut bad = copy.distribution.clone();
            bad[i] ^= 0x04;
            assert!(
                try_open(&bad, &bob, &alice, &channel).is_err(),
                "flip in byte {i}"
            );
        }
        // A SenderKeyContent signed under another context (here a message
        // signature) does not verify as a sender key.
        let content = SenderKeyContent {
            version: SENDER_KEY_VERSION,
            channel_id: CHANNEL.into(),
            epoch: EPOCH.number,
            epoch_hash: EPOCH.hash.to_vec(),
            sender_identity: "alice".into(),
            sender_card_id: alice.card_id.to_vec(),
            chain_id: vec![1; 16],
            chain_key: vec![2; 32],
            first_generation: 0,
            recipient_card_id: bob.card_id.to_vec(),
            created_at_ms: 0,
            recipients_sha256: vec![3; 32],
        }
        .encode_to_vec();
        let signed = SignedSenderKey {
            signature: alice
                .keys
                .signing
                .sign(SignatureContext::Message, &content)
                .to_vec(),
            content,
        }
        .encode_to_vec();
        let sealed = hpke_wrap::seal_base(
            &bob.public,
            HpkeInfo::SenderKeyWrap.label(),
            &bob.card_id,
            &signed,
            None,
        )
        .unwrap();
        let cross = SenderKeyDistribution {
            version: SENDER_KEY_VERSION,
            recipient_card_id: bob.card_id.to_vec(),
            sender_card_id: alice.card_id.to_vec(),
            channel_id: CHANNEL.into(),
            epoch: EPOCH.number,
            chain_id: vec![1; 16],
            encapsulated_key: sealed.encapsulated_key.to_vec(),
            ciphertext: sealed.ciphertext,
        }
        .encode_to_vec();
        assert_eq!(
            try_open(&cross, &bob, &alice, &channel).unwrap_err(),
            SenderKeyError::BadSignature
        );
        // Two copies for one device are refused when sealing.
        assert!(
            chain
                .distribute(&alice.sender(), &[bob.recipient(), bob.recipient()], 0)
                .is_err()
        );
    }

    #[test]
    fn large_fan_outs_give_one_copy_per_device_in_order() {
        let (alice, _, chain) = setup();
        let devices: Vec<Device> = (10..50u8).map(|n| device("m", n)).collect();
        let recipients: Vec<Recipient<'_>> = devices.iter().map(Device::recipient).collect();
        let copies = chain.distribute(&alice.sender(), &recipients, 0).unwrap();
        assert_eq!(copies.len(), devices.len());
        for (copy, d) in copies.iter().zip(&devices) {
            assert_eq!(copy.recipient_card_id, d.card_id);
        }
        let last = devices.last().unwrap();
        let parsed = ParsedDistribution::parse(&copies[devices.len() - 1].distribution).unwrap();
        expect(&alice, |s| {
            assert!(
                parsed
                    .open(
                        &last.opener(),
                        s,
                        &ExpectedChannel {
                            channel_id: CHANNEL,
                            epoch: EPOCH
                        },
                        Retention::ForwardSecret
                    )
                    .is_ok()
            )
        });
    }

    #[test]
    fn nothing_prints_key_material() {
        let (alice, bob, mut chain) = setup();
        let sealed = chain.seal(&alice.sender(), &text(b"x")).unwrap();
        let rx = receive(&chain, &alice, &bob, Retention::KeepHistory).unwrap();
        let key = hex::encode(chain.initial.expose_bytes());
        for printed in [
            format!("{chain:?}"),
            format!("{rx:?}"),
            format!(
                "{:?}",
                ParsedGroupEnvelope::parse(&sealed.envelope).unwrap()
            ),
        ] {
            assert!(!printed.contains(&key[..16]), "{printed}");
        }
    }
}
