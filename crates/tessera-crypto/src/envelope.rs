//! Multi-recipient sign-then-encrypt envelopes (the seed's EncMsg).
//!
//! Sealing: the sender signs a `SignedPayload` naming the channel, a random
//! message id, itself (identity and card id), the time and the sorted card
//! ids of every recipient; the payload and signature are sealed with
//! AES-256-GCM under a fresh content key, with the envelope header as
//! associated data; the content key is wrapped for each recipient card with
//! HPKE. Opening checks all of that before returning anything.
//! `docs/protocol.md` gives the byte layout.

use std::fmt;

use tessera_proto::{
    Message as _,
    envelope::v1::{Envelope, EnvelopeHeaderV2, SealedContent, SignedPayload, Stanza},
};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::{
    EncryptionPublicKey, EncryptionSecret, KeyError, SignatureContext, SigningKey, VerifyingKey,
    aead, commitment,
    hpke_wrap::{self, ENC_LEN, HPKE_TAG_LEN, HpkeOpenError},
    random::random_array,
};

/// Protocol version of envelopes, headers and payloads.
pub const VERSION: u32 = 1;
/// Version of an `EnvelopeHeader` that commits to the content key
/// (`key_commitment`, protocol v2). Sealing writes it for every version-2
/// payload; opening requires it for one.
pub const HEADER_VERSION_COMMITTED: u32 = 2;
/// Version of a payload that names its channel membership epoch (protocol
/// v2); envelopes and headers keep [`VERSION`].
pub const PAYLOAD_VERSION_EPOCH: u32 = 2;
/// Length of a message id.
pub const MESSAGE_ID_LEN: usize = 16;
/// Most recipient cards one envelope may carry.
pub const MAX_RECIPIENTS: usize = 10_000;

/// Content type of a plain text message.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
/// Content type of a message carrying a `FileAttachment`.
pub const CONTENT_TYPE_FILE: &str = "application/vnd.tessera.file+v1";
/// Content type of a message carrying a `HistoryItem` from the organisation.
pub const CONTENT_TYPE_HISTORY: &str = "application/vnd.tessera.history+v1";
/// Content type of the organisation's signed `HistoryEnd`, the last message
/// of every history sync answer.
pub const CONTENT_TYPE_HISTORY_END: &str = "application/vnd.tessera.history-end+v1";

/// The content key is fresh for every message, so one fixed nonce is safe.
const BODY_NONCE: [u8; 12] = [0u8; 12];

/// Why an envelope could not be sealed or opened.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u32),
    #[error("an envelope needs at least one recipient")]
    NoRecipients,
    #[error("too many recipients: {got} (at most {max})")]
    TooManyRecipients { got: usize, max: usize },
    #[error("the same recipient card appears twice")]
    DuplicateRecipient,
    #[error("this card is not a recipient of the envelope")]
    NotARecipient,
    #[error("the content key could not be unwrapped: wrong key or altered stanza")]
    KeyUnwrapFailed,
    #[error("the message body does not authenticate: the header or ciphertext was altered")]
    BodyDecryptFailed,
    #[error("the sender's signature does not verify")]
    BadSignature,
    #[error("the sender named in the envelope is not the expected sender")]
    SenderMismatch,
    #[error("the recipients in the header differ from the recipients the sender signed")]
    RecipientSetMismatch,
    #[error("this card is not among the recipients the sender signed")]
    NotInSignedRecipients,
    #[error("not the envelope the record names: {0}")]
    OtherEnvelope(&'static str),
    #[error(
        "the header does not authenticate: a version-2 header carries a 32-byte key commitment, a version-1 header none"
    )]
    KeyCommitmentShape,
    #[error(
        "the content key does not match the header's key commitment (refused before decrypting)"
    )]
    KeyCommitmentMismatch,
    #[error("a version-2 payload came in a version-1 header, which does not commit to its key")]
    Uncommitted,
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl From<HpkeOpenError> for EnvelopeError {
    fn from(_: HpkeOpenError) -> Self {
        Self::KeyUnwrapFailed
    }
}

/// The sending device: its identity, card id and ClientKey.
pub struct Sender<'a> {
    pub identity: &'a str,
    pub card_id: [u8; 32],
    pub key: &'a SigningKey,
}

/// One recipient card.
#[derive(Clone, Copy)]
pub struct Recipient<'a> {
    pub card_id: [u8; 32],
    pub key: &'a EncryptionPublicKey,
}

/// A channel's membership epoch as the sender verified it: its number and
/// the hash of the statement that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    pub number: u64,
    pub hash: [u8; 32],
}

/// What to send.
pub struct Draft<'a> {
    pub channel_id: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub sent_at_ms: i64,
    /// The epoch sealed under: a version-2 payload. `None` for a version-1
    /// payload (the organisation's messages to one device, and channels
    /// made before protocol v2).
    pub epoch: Option<Epoch>,
}

/// A sealed envelope and what the sender keeps of it.
pub struct Sealed {
    pub message_id: [u8; MESSAGE_ID_LEN],
    /// Encoded `Envelope`.
    pub envelope: Vec<u8>,
}

/// The card that signed a payload, as the caller verified it.
pub struct ExpectedSender<'a> {
    pub identity: &'a str,
    pub card_id: [u8; 32],
    pub key: &'a VerifyingKey,
}

/// The recipient opening an envelope.
pub struct Opener<'a> {
    pub card_id: [u8; 32],
    pub secret: &'a EncryptionSecret,
}

/// Seals `draft` from `sender` to every card in `recipients`.
pub fn seal(
    sender: &Sender<'_>,
    draft: &Draft<'_>,
    recipients: &[Recipient<'_>],
) -> Result<Sealed, EnvelopeError> {
    seal_with(sender, draft, recipients, None)
}

/// The random values of one envelope, chosen by the caller: for test
/// vectors only ([`crate::hazmat::seal_envelope_with`]).
pub(crate) struct FixedRandomness<'a> {
    pub(crate) message_id: [u8; MESSAGE_ID_LEN],
    pub(crate) content_key: [u8; 32],
    /// One HPKE ephemeral secret per recipient, in ascending card-id order.
    pub(crate) ephemeral: &'a [[u8; 32]],
}

pub(crate) fn seal_with(
    sender: &Sender<'_>,
    draft: &Draft<'_>,
    recipients: &[Recipient<'_>],
    fixed: Option<&FixedRandomness<'_>>,
) -> Result<Sealed, EnvelopeError> {
    if recipients.is_empty() {
        return Err(EnvelopeError::NoRecipients);
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(EnvelopeError::TooManyRecipients {
            got: recipients.len(),
            max: MAX_RECIPIENTS,
        });
    }
    let mut sorted: Vec<Recipient<'_>> = recipients.to_vec();
    sorted.sort_unstable_by_key(|r| r.card_id);
    if sorted.windows(2).any(|w| w[0].card_id == w[1].card_id) {
        return Err(EnvelopeError::DuplicateRecipient);
    }

    let message_id = match fixed {
        Some(f) => f.message_id,
        None => random_array::<MESSAGE_ID_LEN>()?,
    };
    let mut body = signed_content(
        sender,
        draft,
        &message_id,
        sorted.iter().map(|r| r.card_id.to_vec()).collect(),
    );

    let content_key = Zeroizing::new(match fixed {
        Some(f) => f.content_key,
        None => random_array::<32>()?,
    });
    let stanzas = match fixed {
        Some(f) if f.ephemeral.len() == sorted.len() => sorted
            .iter()
            .zip(f.ephemeral)
            .map(|(r, esk)| wrap_one(r, &content_key, Some(esk)))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(EnvelopeError::Malformed(
                "one ephemeral secret per recipient is needed",
            ));
        }
        None => wrap_for_all(&sorted, &content_key)?,
    };
    // A version-2 payload (a channel with a membership chain, opened by
    // every member's devices) goes in a header that commits to the key.
    let (version, key_commitment) = if draft.epoch.is_some() {
        (
            HEADER_VERSION_COMMITTED,
            commitment::commit(&content_key, commitment::ENVELOPE_COMMITMENT_LABEL).to_vec(),
        )
    } else {
        (VERSION, Vec::new())
    };
    let header = EnvelopeHeaderV2 {
        version,
        sender_card_id: sender.card_id.to_vec(),
        stanzas,
        key_commitment,
    }
    .encode_to_vec();
    aead::AeadKey::new(&content_key).seal_in_place(BODY_NONCE, &header, &mut body);
    let envelope = Envelope {
        header,
        ciphertext: body,
    }
    .encode_to_vec();
    Ok(Sealed {
        message_id,
        envelope,
    })
}

/// Signs `draft`'s payload (version 2 when it names an epoch) and returns
/// the encoded `SealedContent`: the plaintext of an envelope's body, and of
/// a group envelope's (with no recipient card ids).
pub(crate) fn signed_content(
    sender: &Sender<'_>,
    draft: &Draft<'_>,
    message_id: &[u8; MESSAGE_ID_LEN],
    recipient_card_ids: Vec<Vec<u8>>,
) -> Vec<u8> {
    let payload = SignedPayload {
        version: if draft.epoch.is_some() {
            PAYLOAD_VERSION_EPOCH
        } else {
            VERSION
        },
        epoch: draft.epoch.map_or(0, |e| e.number),
        epoch_hash: draft.epoch.map(|e| e.hash.to_vec()).unwrap_or_default(),
        channel_id: draft.channel_id.to_owned(),
        message_id: message_id.to_vec(),
        sender_identity: sender.identity.to_owned(),
        sender_card_id: sender.card_id.to_vec(),
        sent_at_ms: draft.sent_at_ms,
        recipient_card_ids,
        content_type: draft.content_type.to_owned(),
        body: draft.body.to_vec(),
    }
    .encode_to_vec();
    let signature = sender.key.sign(SignatureContext::Message, &payload);
    SealedContent {
        payload,
        signature: signature.to_vec(),
    }
    .encode_to_vec()
}

fn wrap_one(
    r: &Recipient<'_>,
    content_key: &[u8; 32],
    ephemeral: Option<&[u8; 32]>,
) -> Result<Stanza, EnvelopeError> {
    let wrapped = hpke_wrap::wrap_key(r.key, &r.card_id, content_key, ephemeral)?;
    Ok(Stanza {
        card_id: r.card_id.to_vec(),
        encapsulated_key: wrapped.encapsulated_key.to_vec(),
        wrapped_key: wrapped.ciphertext,
    })
}

fn wrap_for_all(
    recipients: &[Recipient<'_>],
    content_key: &[u8; 32],
) -> Result<Vec<Stanza>, EnvelopeError> {
    crate::parallel::try_map(
        recipients,
        |r| wrap_one(r, content_key, None),
        || EnvelopeError::Malformed("key wrap thread failed"),
    )
}

/// An envelope whose header has been parsed but nothing decrypted or trusted.
pub struct ParsedEnvelope {
    /// SHA-256 of the exact envelope bytes parsed.
    sha256: [u8; 32],
    header_bytes: Vec<u8>,
    header: EnvelopeHeaderV2,
    sender_card_id: [u8; 32],
    ciphertext: Vec<u8>,
}

impl fmt::Debug for ParsedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedEnvelope")
            .field("sender_card_id", &hex::encode(self.sender_card_id))
            .field("stanzas", &self.header.stanzas.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

pub(crate) fn card_id_of(bytes: &[u8], what: &'static str) -> Result<[u8; 32], EnvelopeError> {
    bytes.try_into().map_err(|_| EnvelopeError::Malformed(what))
}

impl ParsedEnvelope {
    /// Parses an encoded `Envelope` and checks the header's shape: version
    /// (1, or 2 with a 32-byte key commitment), id lengths, 1 to
    /// [`MAX_RECIPIENTS`] stanzas in strictly ascending card-id order.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope =
            Envelope::decode(bytes).map_err(|_| EnvelopeError::Malformed("not an Envelope"))?;
        // Version 2 adds field 4 to version 1: one message decodes both.
        let header = EnvelopeHeaderV2::decode(envelope.header.as_slice())
            .map_err(|_| EnvelopeError::Malformed("header is not an EnvelopeHeader"))?;
        match (header.version, header.key_commitment.len()) {
            (VERSION, 0) | (HEADER_VERSION_COMMITTED, commitment::COMMITMENT_LEN) => {}
            (VERSION | HEADER_VERSION_COMMITTED, _) => {
                return Err(EnvelopeError::KeyCommitmentShape);
            }
            (other, _) => return Err(EnvelopeError::UnsupportedVersion(other)),
        }
        let sender_card_id = card_id_of(&header.sender_card_id, "sender card id is not 32 bytes")?;
        if header.stanzas.is_empty() {
            return Err(EnvelopeError::NoRecipients);
        }
        if header.stanzas.len() > MAX_RECIPIENTS {
            return Err(EnvelopeError::TooManyRecipients {
                got: header.stanzas.len(),
                max: MAX_RECIPIENTS,
            });
        }
        let mut previous: Option<[u8; 32]> = None;
        for stanza in &header.stanzas {
            let id = card_id_of(&stanza.card_id, "stanza card id is not 32 bytes")?;
            if stanza.encapsulated_key.len() != ENC_LEN
                || stanza.wrapped_key.len() != 32 + HPKE_TAG_LEN
            {
                return Err(EnvelopeError::Malformed("stanza key lengths are wrong"));
            }
            // Sealing writes stanzas in strictly ascending card-id order;
            // anything else (a repeat included) was not made by a sealer.
            match previous {
                Some(p) if p == id => return Err(EnvelopeError::DuplicateRecipient),
                Some(p) if p > id => {
                    return Err(EnvelopeError::Malformed(
                        "stanzas are not in ascending card-id order",
                    ));
                }
                _ => {}
            }
            previous = Some(id);
        }
        if envelope.ciphertext.len() < aead::TAG_LEN {
            return Err(EnvelopeError::Malformed("ciphertext shorter than its tag"));
        }
        Ok(Self {
            sha256: crate::sha256(bytes),
            header_bytes: envelope.header,
            header,
            sender_card_id,
            ciphertext: envelope.ciphertext,
        })
    }

    /// Decrypts the body with a known content key (no stanza involved), as
    /// whoever checks an [`EnvelopeBinding`] does. A version-2 header's key
    /// commitment is checked first: a key it does not commit to decrypts
    /// nothing.
    fn open_with_key(&self, content_key: &[u8; 32]) -> Result<SealedContent, EnvelopeError> {
        if self.header.version == HEADER_VERSION_COMMITTED
            && !commitment::verify(
                content_key,
                commitment::ENVELOPE_COMMITMENT_LABEL,
                &self.header.key_commitment,
            )
        {
            return Err(EnvelopeError::KeyCommitmentMismatch);
        }
        let mut body = Zeroizing::new(self.ciphertext.clone());
        let len = aead::AeadKey::new(content_key)
            .open_in_place(BODY_NONCE, &self.header_bytes, &mut body)
            .map_err(|_| EnvelopeError::BodyDecryptFailed)?;
        SealedContent::decode(&body[..len])
            .map_err(|_| EnvelopeError::Malformed("body is not a SealedContent"))
    }

    /// The card the header says sent this (not yet authenticated).
    pub fn sender_card_id(&self) -> &[u8; 32] {
        &self.sender_card_id
    }

    /// Whether the header commits to its content key (version 2).
    pub fn is_key_committing(&self) -> bool {
        self.header.version == HEADER_VERSION_COMMITTED
    }

    /// Number of recipient stanzas.
    pub fn recipient_count(&self) -> usize {
        self.header.stanzas.len()
    }

    /// Whether the header has a stanza for `card_id`.
    pub fn has_recipient(&self, card_id: &[u8; 32]) -> bool {
        self.header
            .stanzas
            .iter()
            .any(|s| s.card_id.as_slice() == card_id)
    }

    /// Decrypts with `opener`'s key and verifies the sender's signature
    /// against `sender` (a card the caller verified). Returns the payload
    /// only if every check holds.
    pub fn open(
        &self,
        opener: &Opener<'_>,
        sender: &ExpectedSender<'_>,
    ) -> Result<VerifiedPayload, EnvelopeError> {
        let stanza = self
            .header
            .stanzas
            .iter()
            .find(|s| s.card_id.as_slice() == opener.card_id)
            .ok_or(EnvelopeError::NotARecipient)?;
        let content_key = hpke_wrap::unwrap_key(
            opener.secret,
            &opener.card_id,
            &stanza.encapsulated_key,
            &stanza.wrapped_key,
        )?;
        let sealed = self.open_with_key(&content_key)?;

        if self.sender_card_id != sender.card_id {
            return Err(EnvelopeError::SenderMismatch);
        }
        let mut payload = VerifiedPayload::verify(sealed.payload, sealed.signature, sender)?;
        // Without this, a sender could leave the commitment out by writing
        // a version-1 header around a version-2 payload.
        if payload.epoch.is_some() && !self.is_key_committing() {
            return Err(EnvelopeError::Uncommitted);
        }
        payload.envelope = Some(EnvelopeBinding {
            envelope_sha256: self.sha256,
            content_key,
        });

        // The stanzas must be exactly the recipients the sender signed: a
        // stripped or added stanza, or an envelope re-addressed by a
        // recipient who knows the content key, shows up here. Both lists
        // are strictly ascending (checked at parse and at verify).
        let stanza_ids: Vec<&[u8]> = self
            .header
            .stanzas
            .iter()
            .map(|s| s.card_id.as_slice())
            .collect();
        let signed_ids: Vec<&[u8]> = payload
            .recipient_card_ids
            .iter()
            .map(|id| id.as_slice())
            .collect();
        if !payload.recipient_card_ids.contains(&opener.card_id) {
            return Err(EnvelopeError::NotInSignedRecipients);
        }
        if stanza_ids != signed_ids {
            return Err(EnvelopeError::RecipientSetMismatch);
        }
        Ok(payload)
    }
}

/// A payload whose signature verified against the expected sender's card.
/// `Debug` never shows the body.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedPayload {
    pub channel_id: String,
    pub message_id: [u8; MESSAGE_ID_LEN],
    pub sender_identity: String,
    pub sender_card_id: [u8; 32],
    pub sent_at_ms: i64,
    /// Strictly ascending.
    pub recipient_card_ids: Vec<[u8; 32]>,
    pub content_type: String,
    pub body: Vec<u8>,
    /// The membership epoch the sender named (version-2 payloads).
    pub epoch: Option<Epoch>,
    /// The exact signed bytes and the signature, for backups and history.
    pub signed_payload: Vec<u8>,
    pub signature: Vec<u8>,
    /// The envelope it came in, when it was opened from one (not for a
    /// detached payload): what binds a backup of it to that envelope.
    pub envelope: Option<EnvelopeBinding>,
}

/// What ties a signed payload to the one envelope that carried it: the
/// SHA-256 of the envelope's exact bytes and its content key. Whoever holds
/// the envelope (the app server stores it) can check with
/// [`check_binding`] that the envelope is those bytes and that its body
/// decrypts, under that key, to exactly that payload and signature: a
/// member cannot pass one message off as another stored elsewhere. The
/// content key opens nothing but this one message. Cannot be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvelopeBinding {
    pub envelope_sha256: [u8; 32],
    pub content_key: Zeroizing<[u8; 32]>,
}

/// Checks that `envelope` (exact bytes) is the envelope a binding names
/// (`envelope_sha256`, `content_key`, as a backup record or history item
/// carries them) and that its body, decrypted with that key, is exactly
/// `payload` and `signature`. The signature itself is not checked here.
pub fn check_binding(
    envelope: &[u8],
    envelope_sha256: &[u8],
    content_key: &[u8],
    payload: &[u8],
    signature: &[u8],
) -> Result<(), EnvelopeError> {
    if envelope_sha256.len() != 32 || content_key.len() != 32 {
        return Err(EnvelopeError::Malformed(
            "an envelope binding needs a 32-byte digest and key",
        ));
    }
    if crate::sha256(envelope).as_slice() != envelope_sha256 {
        return Err(EnvelopeError::OtherEnvelope("its SHA-256 differs"));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(content_key);
    let parsed = ParsedEnvelope::parse(envelope)?;
    let sealed = parsed
        .open_with_key(&key)
        .map_err(|_| EnvelopeError::OtherEnvelope("its body does not open with the key"))?;
    if sealed.payload != payload || sealed.signature != signature {
        return Err(EnvelopeError::OtherEnvelope(
            "it carries another payload or signature",
        ));
    }
    // As when opening: a payload that names an epoch (version 2) came in a
    // committing header, else the archive could keep what every member
    // refused (and what another key opens differently).
    let names_epoch = SignedPayload::decode(payload)
        .map(|p| p.version >= PAYLOAD_VERSION_EPOCH || !p.epoch_hash.is_empty())
        .unwrap_or(true);
    if names_epoch && !parsed.is_key_committing() {
        return Err(EnvelopeError::Uncommitted);
    }
    Ok(())
}

impl fmt::Debug for VerifiedPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedPayload")
            .field("channel_id", &self.channel_id)
            .field("message_id", &hex::encode(self.message_id))
            .field("sender_identity", &self.sender_identity)
            .field("sender_card_id", &hex::encode(self.sender_card_id))
            .field("sent_at_ms", &self.sent_at_ms)
            .field("recipients", &self.recipient_card_ids.len())
            .field("content_type", &self.content_type)
            .field("body_len", &self.body.len())
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl VerifiedPayload {
    /// Verifies a detached signed payload (as kept in backups and history
    /// items) against `sender`, then parses it. The signature is checked
    /// before any field is read.
    pub fn verify(
        signed_payload: Vec<u8>,
        signature: Vec<u8>,
        sender: &ExpectedSender<'_>,
    ) -> Result<Self, EnvelopeError> {
        sender
            .key
            .verify(SignatureContext::Message, &signed_payload, &signature)
            .map_err(|_| EnvelopeError::BadSignature)?;
        let p = SignedPayload::decode(signed_payload.as_slice())
            .map_err(|_| EnvelopeError::Malformed("payload is not a SignedPayload"))?;
        let epoch = match p.version {
            VERSION if p.epoch == 0 && p.epoch_hash.is_empty() => None,
            VERSION => {
                return Err(EnvelopeError::Malformed(
                    "a version-1 payload names no epoch",
                ));
            }
            PAYLOAD_VERSION_EPOCH => Some(Epoch {
                number: p.epoch,
                hash: card_id_of(&p.epoch_hash, "epoch hash is not 32 bytes")?,
            }),
            other => return Err(EnvelopeError::UnsupportedVersion(other)),
        };
        let sender_card_id =
            card_id_of(&p.sender_card_id, "payload sender card id is not 32 bytes")?;
        if sender_card_id != sender.card_id || p.sender_identity != sender.identity {
            return Err(EnvelopeError::SenderMismatch);
        }
        let message_id: [u8; MESSAGE_ID_LEN] = p
            .message_id
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::Malformed("message id is not 16 bytes"))?;
        let mut recipient_card_ids = Vec::with_capacity(p.recipient_card_ids.len());
        for id in &p.recipient_card_ids {
            recipient_card_ids.push(card_id_of(id, "signed recipient id is not 32 bytes")?);
        }
        if recipient_card_ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EnvelopeError::Malformed(
                "signed recipients are not strictly ascending",
            ));
        }
        Ok(Self {
            channel_id: p.channel_id,
            message_id,
            sender_identity: p.sender_identity,
            sender_card_id,
            sent_at_ms: p.sent_at_ms,
            recipient_card_ids,
            content_type: p.content_type,
            body: p.body,
            epoch,
            signed_payload,
            signature,
            envelope: None,
        })
    }

    /// Reads the sender card id of a detached payload without trusting it,
    /// so the caller can fetch that card and then call [`Self::verify`].
    pub fn claimed_sender(signed_payload: &[u8]) -> Result<(String, [u8; 32]), EnvelopeError> {
        let p = SignedPayload::decode(signed_payload)
            .map_err(|_| EnvelopeError::Malformed("payload is not a SignedPayload"))?;
        let id = card_id_of(&p.sender_card_id, "payload sender card id is not 32 bytes")?;
        Ok((p.sender_identity, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        DeviceKeys,
        testing::{Device, device},
    };

    fn seal_from(sender: &Device, to: &[&Device], body: &[u8]) -> Sealed {
        seal_under(sender, to, body, None)
    }

    fn seal_under(sender: &Device, to: &[&Device], body: &[u8], epoch: Option<Epoch>) -> Sealed {
        let recipients: Vec<Recipient<'_>> = to.iter().map(|d| d.recipient()).collect();
        seal(
            &sender.sender(),
            &Draft {
                channel_id: "general",
                content_type: CONTENT_TYPE_TEXT,
                body,
                sent_at_ms: 1_700_000_000_000,
                epoch,
            },
            &recipients,
        )
        .unwrap()
    }

    fn open_as(
        envelope: &[u8],
        me: &Device,
        sender: &Device,
    ) -> Result<VerifiedPayload, EnvelopeError> {
        let vk = sender.keys.signing.verifying_key();
        ParsedEnvelope::parse(envelope)?.open(
            &Opener {
                card_id: me.card_id,
                secret: &me.keys.encryption,
            },
            &ExpectedSender {
                identity: sender.identity,
                card_id: sender.card_id,
                key: &vk,
            },
        )
    }

    /// Re-addresses an envelope the way a malicious recipient who knows the
    /// content key could: new stanzas, body re-encrypted under the new header.
    fn readdress(
        envelope: &[u8],
        me: &Device,
        edit: impl FnOnce(&mut Vec<Stanza>, &[u8; 32]),
    ) -> Vec<u8> {
        rewrite_header(envelope, me, |header, key| edit(&mut header.stanzas, key))
    }

    #[test]
    fn every_recipient_opens_and_verifies() {
        let alice = device("alice", 1);
        let bob1 = device("bob", 2);
        let bob2 = device("bob", 3);
        let sealed = seal_from(&alice, &[&bob1, &bob2, &alice], b"hello bob");
        for me in [&bob1, &bob2, &alice] {
            let p = open_as(&sealed.envelope, me, &alice).unwrap();
            assert_eq!(p.body, b"hello bob");
            assert_eq!(p.channel_id, "general");
            assert_eq!(p.sender_identity, "alice");
            assert_eq!(p.message_id, sealed.message_id);
            assert_eq!(p.recipient_card_ids, vec![[1u8; 32], [2u8; 32], [3u8; 32]]);
        }
    }

    #[test]
    fn non_recipient_and_wrong_key_fail() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let eve = device("eve", 9);
        let sealed = seal_from(&alice, &[&bob], b"secret");
        assert_eq!(
            open_as(&sealed.envelope, &eve, &alice),
            Err(EnvelopeError::NotARecipient)
        );
        // Eve claims Bob's card id but has her own key.
        let impostor = Device {
            card_id: bob.card_id,
            ..device("bob", 2)
        };
        assert_eq!(
            open_as(&sealed.envelope, &impostor, &alice),
            Err(EnvelopeError::KeyUnwrapFailed)
        );
    }

    #[test]
    fn wrong_sender_key_or_identity_fails() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let mallory = device("alice", 1); // same identity and card id, other key
        let sealed = seal_from(&alice, &[&bob], b"hi");
        assert_eq!(
            open_as(&sealed.envelope, &bob, &mallory),
            Err(EnvelopeError::BadSignature)
        );
        let carol = Device {
            identity: "carol",
            card_id: alice.card_id,
            keys: DeviceKeys::generate().unwrap(),
            public: alice.public,
        };
        let vk = alice.keys.signing.verifying_key();
        let relabeled = ParsedEnvelope::parse(&sealed.envelope).unwrap().open(
            &Opener {
                card_id: bob.card_id,
                secret: &bob.keys.encryption,
            },
            &ExpectedSender {
                identity: carol.identity,
                card_id: alice.card_id,
                key: &vk,
            },
        );
        assert_eq!(relabeled, Err(EnvelopeError::SenderMismatch));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let sealed = seal_from(&alice, &[&bob], b"flip me");
        let mut detected = 0;
        for i in 0..sealed.envelope.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.envelope.clone();
                bad[i] ^= bit;
                assert!(
                    open_as(&bad, &bob, &alice).is_err(),
                    "flip of bit {bit:#x} in byte {i} went unnoticed"
                );
                detected += 1;
            }
        }
        assert_eq!(detected, sealed.envelope.len() * 2);
    }

    #[test]
    fn stripped_stanza_is_detected() {
        let alice = device("alice", 1);
        let bob1 = device("bob", 2);
        let bob2 = device("bob", 3);
        let sealed = seal_from(&alice, &[&bob1, &bob2], b"to both");
        // Dropping a stanza without the content key breaks the header binding.
        let env = Envelope::decode(sealed.envelope.as_slice()).unwrap();
        let mut header = EnvelopeHeaderV2::decode(env.header.as_slice()).unwrap();
        header
            .stanzas
            .retain(|s| s.card_id.as_slice() == bob1.card_id);
        let stripped = Envelope {
            header: header.encode_to_vec(),
            ciphertext: env.ciphertext,
        }
        .encode_to_vec();
        assert_eq!(
            open_as(&stripped, &bob1, &alice),
            Err(EnvelopeError::BodyDecryptFailed)
        );
        // A recipient re-encrypting the body under the stripped header is caught
        // by the signed recipient set.
        let readdressed = readdress(&sealed.envelope, &bob1, |stanzas, _| {
            stanzas.retain(|s| s.card_id.as_slice() == [2u8; 32])
        });
        assert_eq!(
            open_as(&readdressed, &bob1, &alice),
            Err(EnvelopeError::RecipientSetMismatch)
        );
    }

    #[test]
    fn forwarding_to_someone_not_signed_for_is_detected() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let eve = device("eve", 9);
        let sealed = seal_from(&alice, &[&bob], b"only for bob");
        let eve_public = eve.public;
        let forwarded = readdress(&sealed.envelope, &bob, |stanzas, key| {
            let w = hpke_wrap::wrap_key(&eve_public, &[9u8; 32], key, None).unwrap();
            stanzas.push(Stanza {
                card_id: vec![9u8; 32],
                encapsulated_key: w.encapsulated_key.to_vec(),
                wrapped_key: w.ciphertext,
            });
        });
        assert_eq!(
            open_as(&forwarded, &eve, &alice),
            Err(EnvelopeError::NotInSignedRecipients)
        );
        assert_eq!(
            open_as(&forwarded, &bob, &alice),
            Err(EnvelopeError::RecipientSetMismatch)
        );
    }

    #[test]
    fn seal_refuses_bad_recipient_lists() {
        let alice = device("alice", 1);
        let sender = Sender {
            identity: "alice",
            card_id: alice.card_id,
            key: &alice.keys.signing,
        };
        let draft = Draft {
            channel_id: "c",
            content_type: CONTENT_TYPE_TEXT,
            body: b"",
            sent_at_ms: 0,
            epoch: None,
        };
        assert_eq!(
            seal(&sender, &draft, &[]).map(|_| ()),
            Err(EnvelopeError::NoRecipients)
        );
        let r = Recipient {
            card_id: [5u8; 32],
            key: &alice.public,
        };
        assert_eq!(
            seal(&sender, &draft, &[r, r]).map(|_| ()),
            Err(EnvelopeError::DuplicateRecipient)
        );
    }

    #[test]
    fn stanzas_out_of_order_are_refused_even_when_the_body_authenticates() {
        let alice = device("alice", 1);
        let bob1 = device("bob", 2);
        let bob2 = device("bob", 3);
        let sealed = seal_from(&alice, &[&bob1, &bob2], b"in order");
        // A recipient who knows the content key swaps the two stanzas and
        // re-encrypts the body under the new header: the set is still the
        // signed one, only the order differs from what sealing writes.
        let swapped = readdress(&sealed.envelope, &bob1, |stanzas, _| stanzas.swap(0, 1));
        assert_eq!(
            ParsedEnvelope::parse(&swapped).map(|_| ()),
            Err(EnvelopeError::Malformed(
                "stanzas are not in ascending card-id order"
            ))
        );
        assert!(open_as(&sealed.envelope, &bob2, &alice).is_ok());
        // A repeated stanza is a duplicate recipient, wherever it sits.
        let doubled = readdress(&sealed.envelope, &bob1, |stanzas, _| {
            let first = stanzas[0].clone();
            stanzas.push(first);
        });
        assert!(ParsedEnvelope::parse(&doubled).is_err());
    }

    #[test]
    fn payload_checks_message_id_length_and_recipient_order() {
        let alice = device("alice", 1);
        let vk = alice.keys.signing.verifying_key();
        let sender = ExpectedSender {
            identity: "alice",
            card_id: alice.card_id,
            key: &vk,
        };
        let versioned = |version, epoch, epoch_hash: Vec<u8>, message_id: Vec<u8>, recipients| {
            let bytes = SignedPayload {
                version,
                channel_id: "c".into(),
                message_id,
                sender_identity: "alice".into(),
                sender_card_id: alice.card_id.to_vec(),
                sent_at_ms: 0,
                recipient_card_ids: recipients,
                content_type: CONTENT_TYPE_TEXT.into(),
                body: vec![],
                epoch,
                epoch_hash,
            }
            .encode_to_vec();
            let sig = alice.keys.signing.sign(SignatureContext::Message, &bytes);
            VerifiedPayload::verify(bytes, sig.to_vec(), &sender)
        };
        let payload =
            |message_id, recipients| versioned(VERSION, 0, vec![], message_id, recipients);
        // Version 2 names its epoch with a 32-byte hash; version 1 none.
        let epoch = |version, number, hash| {
            versioned(version, number, hash, vec![0; 16], vec![vec![1; 32]]).map(|p| p.epoch)
        };
        assert_eq!(
            epoch(PAYLOAD_VERSION_EPOCH, 0, vec![7; 32]),
            Ok(Some(Epoch {
                number: 0,
                hash: [7; 32]
            }))
        );
        assert_eq!(epoch(VERSION, 0, vec![]), Ok(None));
        assert!(epoch(PAYLOAD_VERSION_EPOCH, 3, vec![7; 31]).is_err());
        assert!(epoch(PAYLOAD_VERSION_EPOCH, 3, vec![]).is_err());
        assert!(epoch(VERSION, 3, vec![]).is_err());
        assert!(epoch(VERSION, 0, vec![7; 32]).is_err());
        assert_eq!(
            epoch(3, 0, vec![]),
            Err(EnvelopeError::UnsupportedVersion(3))
        );
        assert!(payload(vec![0; 16], vec![vec![1; 32], vec![2; 32]]).is_ok());
        assert_eq!(
            payload(vec![0; 15], vec![vec![1; 32]]).unwrap_err(),
            EnvelopeError::Malformed("message id is not 16 bytes")
        );
        for recipients in [
            vec![vec![2; 32], vec![1; 32]],
            vec![vec![1; 32], vec![1; 32]],
        ] {
            assert_eq!(
                payload(vec![0; 16], recipients).unwrap_err(),
                EnvelopeError::Malformed("signed recipients are not strictly ascending")
            );
        }
    }

    #[test]
    fn a_binding_names_one_envelope_and_its_exact_payload() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let first = seal_from(&alice, &[&bob], b"first");
        let second = seal_from(&alice, &[&bob], b"second");
        let opened = open_as(&first.envelope, &bob, &alice).unwrap();
        let other = open_as(&second.envelope, &bob, &alice).unwrap();
        let binding = opened.envelope.clone().unwrap();
        let check = |envelope: &[u8], sha: &[u8], key: &[u8], p: &VerifiedPayload| {
            check_binding(envelope, sha, key, &p.signed_payload, &p.signature)
        };
        let (sha, key) = (&binding.envelope_sha256[..], &binding.content_key[..]);
        assert_eq!(check(&first.envelope, sha, key, &opened), Ok(()));
        // The first message's payload claimed for the second envelope.
        assert_eq!(
            check(&second.envelope, sha, key, &opened),
            Err(EnvelopeError::OtherEnvelope("its SHA-256 differs"))
        );
        let second_sha = crate::sha256(&second.envelope);
        assert_eq!(
            check(&second.envelope, &second_sha, key, &opened),
            Err(EnvelopeError::OtherEnvelope(
                "its body does not open with the key"
            ))
        );
        let second_key = other.envelope.clone().unwrap().content_key;
        assert_eq!(
            check(&second.envelope, &second_sha, &second_key[..], &opened),
            Err(EnvelopeError::OtherEnvelope(
                "it carries another payload or signature"
            ))
        );
        assert!(check(&first.envelope, sha, &key[..31], &opened).is_err());
        // A detached payload has no envelope.
        let detached = VerifiedPayload::verify(
            opened.signed_payload.clone(),
            opened.signature.clone(),
            &ExpectedSender {
                identity: "alice",
                card_id: alice.card_id,
                key: &alice.keys.signing.verifying_key(),
            },
        )
        .unwrap();
        assert!(detached.envelope.is_none());
    }

    fn seal_at_epoch(sender: &Device, to: &[&Device], body: &[u8]) -> Sealed {
        let epoch = Epoch {
            number: 1,
            hash: [7; 32],
        };
        seal_under(sender, to, body, Some(epoch))
    }

    /// Rewrites the header of an envelope as someone who knows the content
    /// key can, re-encrypting the body under the new header.
    fn rewrite_header(
        envelope: &[u8],
        me: &Device,
        edit: impl FnOnce(&mut EnvelopeHeaderV2, &[u8; 32]),
    ) -> Vec<u8> {
        let env = Envelope::decode(envelope).unwrap();
        let mut header = EnvelopeHeaderV2::decode(env.header.as_slice()).unwrap();
        let stanza = header
            .stanzas
            .iter()
            .find(|s| s.card_id.as_slice() == me.card_id)
            .unwrap();
        let key = hpke_wrap::unwrap_key(
            &me.keys.encryption,
            &me.card_id,
            &stanza.encapsulated_key,
            &stanza.wrapped_key,
        )
        .unwrap();
        let body = aead::open(&key, BODY_NONCE, &env.header, &env.ciphertext).unwrap();
        edit(&mut header, &key);
        let new_header = header.encode_to_vec();
        Envelope {
            ciphertext: aead::seal(&key, BODY_NONCE, &new_header, &body),
            header: new_header,
        }
        .encode_to_vec()
    }

    #[test]
    fn epoch_messages_commit_to_their_content_key() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let sealed = seal_at_epoch(&alice, &[&bob, &alice], b"committed");
        let parsed = ParsedEnvelope::parse(&sealed.envelope).unwrap();
        assert!(parsed.is_key_committing());
        let opened = open_as(&sealed.envelope, &bob, &alice).unwrap();
        let key = opened.envelope.unwrap().content_key;
        assert_eq!(
            parsed.header.key_commitment,
            commitment::commit(&key, b"tessera/v2/envelope/key-commitment").to_vec()
        );
        // A version-1 payload keeps the version-1 header.
        let old = seal_from(&alice, &[&bob], b"v1");
        assert!(
            !ParsedEnvelope::parse(&old.envelope)
                .unwrap()
                .is_key_committing()
        );
        assert!(open_as(&old.envelope, &bob, &alice).is_ok());
    }

    #[test]
    fn a_key_that_the_header_does_not_commit_to_decrypts_nothing() {
        let alice = device("alice", 1);
        let bob = device("bob", 2);
        let sealed = seal_at_epoch(&alice, &[&bob], b"committed");
        // The commitment of another key, with the body re-encrypted so that
        // it authenticates: refused before decrypting.
        let other = rewrite_header(&sealed.envelope, &bob, |h, _| {
            h.key_commitment =
                commitment::commit(&[9; 32], b"tessera/v2/envelope/key-commitment").to_vec();
        });
        assert_eq!(
            open_as(&other, &bob, &alice),
            Err(EnvelopeError::KeyCommitmentMismatch)
        );
        let key = open_as(&sealed.envelope, &bob, &alice)
            .unwrap()
            .envelope
            .unwrap()
            .content_key;
        let sha = crate::sha256(&other);
        let p = open_as(&sealed.envelope, &bob, &alice).unwrap();
        assert_eq!(
            check_binding(&other, &sha, &key[..], &p.signed_payload, &p.signature),
            Err(EnvelopeError::OtherEnvelope(
                "its body does not open with the key"
            ))
        );
        // Dropping the commitment (a version-1 header around a version-2
        // payload) is refused after the signature check.
        let dropped = rewrite_header(&sealed.envelope, &bob, |h, _| {
            h.version = VERSION;
            h.key_commitment.clear();
        });
        assert_eq!(
            open_as(&dropped, &bob, &alice),
            Err(EnvelopeError::Uncommitted)
        );
        // ... and by the archive's binding check alike (the backup service
        // and a syncing device): what every member refused is not archived.
        let dropped_sha = crate::sha256(&dropped);
        assert_eq!(
            check_binding(
                &dropped,
                &dropped_sha,
                &key[..],
                &p.signed_payload,
                &p.signature
            ),
            Err(EnvelopeError::Uncommitted)
        );
        // A commitment of the wrong length, or one in a version-1 header.
        for (version, len) in [
            (HEADER_VERSION_COMMITTED, 0),
            (HEADER_VERSION_COMMITTED, 31),
            (VERSION, 32),
        ] {
            let bad = rewrite_header(&sealed.envelope, &bob, |h, _| {
                h.version = version;
                h.key_commitment = vec![1; len];
            });
            assert_eq!(
                ParsedEnvelope::parse(&bad).map(|_| ()),
                Err(EnvelopeError::KeyCommitmentShape)
            );
        }
        let future = rewrite_header(&sealed.envelope, &bob, |h, _| h.version = 3);
        assert_eq!(
            ParsedEnvelope::parse(&future).map(|_| ()),
            Err(EnvelopeError::UnsupportedVersion(3))
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for input in [
            &b""[..],
            b"\x00",
            b"\xff\xff\xff",
            &[0x0a, 0x05, 1, 2, 3, 4, 5],
        ] {
            assert!(ParsedEnvelope::parse(input).is_err());
        }
    }
}
