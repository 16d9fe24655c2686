//! Device keys: Ed25519 for signatures (ring), X25519 for encryption (x25519-dalek).

use std::fmt;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::{KeyError, SignatureError, random::random_array};

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// What a signature is for. The signed bytes are always
/// `label || 0x00 || message`, so a signature made for one purpose can never
/// be taken for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureContext {
    /// A card's own key over its content snapshot.
    CardSelf,
    /// The AppKey over a card's content snapshot.
    CardApp,
    /// The key service over a card's content snapshot.
    CardKms,
    /// A revocation record.
    Revocation,
    /// A transparency-log checkpoint.
    Checkpoint,
    /// A message payload (EncMsg).
    Message,
    /// An access token issued by the app server.
    Token,
    /// A device's answer to a passwordless log-in challenge.
    DeviceLogin,
    /// A device list statement, by the signing device (protocol v2).
    DeviceStatement,
    /// The AppKey's co-signature on a GENESIS or RESET device list statement.
    DeviceStatementApp,
    /// A channel membership statement, by a member's device (protocol v2).
    ChannelStatement,
    /// A sender's chain key for one channel epoch, for one recipient device
    /// (`SenderKeyContent`, protocol v2 sender keys).
    SenderKey,
}

impl SignatureContext {
    /// The ASCII label that prefixes the signed bytes.
    pub fn label(self) -> &'static str {
        match self {
            Self::CardSelf => "tessera/v1/card/self",
            Self::CardApp => "tessera/v1/card/app",
            Self::CardKms => "tessera/v1/card/kms",
            Self::Revocation => "tessera/v1/card/revocation",
            Self::Checkpoint => "tessera/v1/checkpoint",
            Self::Message => "tessera/v1/message",
            Self::Token => "tessera/v1/token",
            Self::DeviceLogin => "tessera/v1/device-login",
            Self::DeviceStatement => "tessera/v2/device-list/statement",
            Self::DeviceStatementApp => "tessera/v2/device-list/app",
            Self::ChannelStatement => "tessera/v2/channel/statement",
            Self::SenderKey => "tessera/v2/sender-key",
        }
    }

    fn signed_bytes(self, message: &[u8]) -> Vec<u8> {
        let label = self.label().as_bytes();
        let mut out = Vec::with_capacity(label.len() + 1 + message.len());
        out.extend_from_slice(label);
        out.push(0);
        out.extend_from_slice(message);
        out
    }
}

/// An Ed25519 private key; cannot be printed.
///
/// What is wiped: the key is held only as its 32-byte RFC 8032 seed, in
/// [`Zeroizing`] memory that is overwritten when the key is dropped.
///
/// What is not: ring's `Ed25519KeyPair` (the SHA-512-expanded secret
/// scalar and nonce prefix) cannot be zeroized, so none is kept. Each
/// signature rebuilds one from the seed on the stack and drops it at once;
/// that stack frame, and the temporaries inside ring's signing code, are
/// released without being overwritten and stay in memory until reused.
/// Copies the operating system makes (swap, core dumps, hibernation) are
/// out of the process's reach; so is anything a caller copies out through
/// [`crate::hazmat`] or the keystore.
pub struct SigningKey {
    seed: Zeroizing<[u8; 32]>,
    public: VerifyingKey,
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let seed = Zeroizing::new(random_array::<32>()?);
        Self::from_seed(&seed)
    }

    /// The key whose RFC 8032 private seed is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyError::Rejected)?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Self {
            seed: Zeroizing::new(*seed),
            public: VerifyingKey(public),
        })
    }

    /// The RFC 8032 private seed, for the keystore.
    pub(crate) fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.public
    }

    /// Signs `message` for `context`.
    pub fn sign(&self, context: SignatureContext, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.sign_raw(&context.signed_bytes(message))
    }

    /// Plain RFC 8032 Ed25519 over `message`, with no context.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        // The same seed was accepted when the key was made, so this cannot
        // fail; were it to, the all-zero signature verifies for no key.
        if let Ok(pair) = Ed25519KeyPair::from_seed_unchecked(self.seed.as_ref()) {
            out.copy_from_slice(pair.sign(message).as_ref());
        }
        out
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifyingKey([u8; 32]);

impl VerifyingKey {
    /// Parses and validates an Ed25519 public key (RFC 8032 section 5.1.3,
    /// strictly): the encoding must be canonical (y below p, and no "negative
    /// zero" x), must decode to a curve point, and the point must not be of
    /// small order. A small-order key lets one signature verify for many
    /// messages (and, with a cofactored verifier, for every message), so such
    /// a key is refused wherever a key is parsed: cards, pinned keys, tokens.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Length {
            what: "Ed25519 public key",
            expected: 32,
            got: bytes.len(),
        })?;
        let compressed = curve25519_dalek::edwards::CompressedEdwardsY(arr);
        let point = compressed
            .decompress()
            .ok_or(KeyError::MalformedSigningKey)?;
        // decompress() reduces y mod p and accepts x = 0 with the sign bit
        // set; re-encoding gives the canonical form, which must be the input.
        if point.compress().0 != arr {
            return Err(KeyError::MalformedSigningKey);
        }
        if point.is_small_order() {
            return Err(KeyError::WeakSigningKey);
        }
        Ok(Self(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks `signature` over `message` for `context`.
    pub fn verify(
        &self,
        context: SignatureContext,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        if signature.len() != SIGNATURE_LEN {
            return Err(SignatureError::Length(signature.len()));
        }
        self.verify_raw(&context.signed_bytes(message), signature)
    }

    /// Plain RFC 8032 Ed25519 verification (ring), with no context.
    pub(crate) fn verify_raw(
        &self,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", hex::encode(self.0))
    }
}

/// An X25519 private key. Zeroized on drop (x25519-dalek); cannot be printed.
pub struct EncryptionSecret(StaticSecret);

impl EncryptionSecret {
    pub fn generate() -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(random_array::<32>()?);
        Ok(Self::from_bytes(*bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn public_key(&self) -> EncryptionPublicKey {
        EncryptionPublicKey(DalekPublic::from(&self.0).to_bytes())
    }

    /// X25519(self, peer), refusing a non-contributory result (an all-zero
    /// output from a low-order peer key, RFC 7748 section 6.1).
    pub fn agree(&self, peer: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let shared = self.0.diffie_hellman(&DalekPublic::from(*peer));
        if !shared.was_contributory() {
            return Err(KeyError::NonContributory);
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

/// An X25519 public key that is canonical, on the curve and not of low order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncryptionPublicKey([u8; 32]);

/// p = 2^255 - 19, little-endian: the bound of a canonical X25519 `u`.
const FIELD_PRIME_LE: [u8; 32] = {
    let mut p = [0xff; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    p
};

/// Whether the little-endian 32-byte integer `u` is below p = 2^255 - 19
/// (which also means its top bit is clear). Public data: no constant time needed.
fn is_canonical_u(u: &[u8; 32]) -> bool {
    for i in (0..32).rev() {
        if u[i] != FIELD_PRIME_LE[i] {
            return u[i] < FIELD_PRIME_LE[i];
        }
    }
    false // u == p
}

impl EncryptionPublicKey {
    /// Parses and validates a public key. Refused: a non-canonical encoding
    /// (the 256-bit little-endian integer `u` must be below p = 2^255 - 19,
    /// so the top bit is clear and none of the 19 values p..2^255-1, which
    /// RFC 7748 decoders silently reduce, e.g. u = p + 9 for the base point
    /// 9); a point on the twist (off the curve); a point of small order. So
    /// every accepted key has exactly one encoding and no agreement with it
    /// can be non-contributory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Length {
            what: "X25519 public key",
            expected: 32,
            got: bytes.len(),
        })?;
        if !is_canonical_u(&arr) {
            return Err(KeyError::NonCanonicalPublicKey);
        }
        let point = curve25519_dalek::montgomery::MontgomeryPoint(arr);
        match point.to_edwards(0) {
            Some(edwards) if !edwards.is_small_order() => Ok(Self(arr)),
            _ => Err(KeyError::WeakPublicKey),
        }
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for EncryptionPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionPublicKey({})", hex::encode(self.0))
    }
}

/// The two private keys of a device (its ClientKey) or of an organisation (OrgKey).
pub struct DeviceKeys {
    pub signing: SigningKey,
    pub encryption: EncryptionSecret,
}

impl DeviceKeys {
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self {
            signing: SigningKey::generate()?,
            encryption: EncryptionSecret::generate()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_contexts_do_not_cross() {
        let key = SigningKey::generate().unwrap();
        let sig = key.sign(SignatureContext::CardSelf, b"snapshot");
        let vk = key.verifying_key();
        vk.verify(SignatureContext::CardSelf, b"snapshot", &sig)
            .unwrap();
        assert_eq!(
            vk.verify(SignatureContext::CardApp, b"snapshot", &sig),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            vk.verify(SignatureContext::CardSelf, b"snapshoT", &sig),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            vk.verify(SignatureContext::CardSelf, b"snapshot", &sig[..63]),
            Err(SignatureError::Length(63))
        );
    }

    #[test]
    fn a_signing_key_holds_only_its_seed_and_public_key() {
        // 32 bytes of Zeroizing seed + the 32-byte public key: no ring key
        // pair (whose expanded secret cannot be wiped) lives in it.
        assert_eq!(size_of::<SigningKey>(), 64);
        let key = SigningKey::from_seed(&[7; 32]).unwrap();
        let again = SigningKey::from_seed(&[7; 32]).unwrap();
        assert_eq!(key.verifying_key(), again.verifying_key());
        assert_eq!(
            key.sign(SignatureContext::Token, b"m"),
            again.sign(SignatureContext::Token, b"m"),
            "Ed25519 is deterministic: the per-signature key pair is the same"
        );
    }

    #[test]
    fn labels_are_distinct() {
        use SignatureContext::*;
        let all = [
            CardSelf,
            CardApp,
            CardKms,
            Revocation,
            Checkpoint,
            Message,
            Token,
            DeviceLogin,
            DeviceStatement,
            DeviceStatementApp,
            ChannelStatement,
            SenderKey,
        ];
        for a in &all {
            for b in &all {
                assert!(
                    a == b || !b.label().starts_with(a.label()),
                    "{} is a prefix of {}",
                    a.label(),
                    b.label()
                );
            }
        }
        let mut labels: Vec<_> = all.iter().map(|c| c.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        // u = 0 and u = 1 are of small order; a generated key is accepted.
        assert_eq!(
            EncryptionPublicKey::from_bytes(&[0u8; 32]),
            Err(KeyError::WeakPublicKey)
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            EncryptionPublicKey::from_bytes(&one),
            Err(KeyError::WeakPublicKey)
        );
        let good = EncryptionSecret::generate().unwrap().public_key();
        assert_eq!(EncryptionPublicKey::from_bytes(good.as_bytes()), Ok(good));
        assert!(matches!(
            EncryptionPublicKey::from_bytes(&[1u8; 31]),
            Err(KeyError::Length { got: 31, .. })
        ));
    }

    #[test]
    fn agreement_refuses_low_order_peer() {
        let secret = EncryptionSecret::generate().unwrap();
        assert_eq!(
            secret.agree(&[0u8; 32]).map(|_| ()),
            Err(KeyError::NonContributory)
        );
        let other = EncryptionSecret::generate().unwrap();
        let a = secret.agree(other.public_key().as_bytes()).unwrap();
        let b = other.agree(secret.public_key().as_bytes()).unwrap();
        assert_eq!(*a, *b);
    }
}
