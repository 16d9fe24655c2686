//! A device's secret state kept on its own disk (its sender-key chains),
//! sealed at rest under a key derived from the device's X25519 secret:
//!
//! ```text
//! key   = HKDF-SHA256(salt = 32 zero bytes, ikm = the device's X25519 secret,
//!                     info = "tessera/v2/local-state", L = 32)
//! file  = nonce (12 random bytes) || AES-256-GCM(key, nonce, aad = label, state)
//! ```
//!
//! The device key file is itself sealed under the user's passphrase, so the
//! state is as well protected as the device's keys. The label names what
//! the file is (e.g. its channel), so one file cannot be swapped for
//! another. Local only: no other party ever reads this format.

use zeroize::Zeroizing;

use crate::{DeviceKeys, KeyError, aead, random::random_array};

const LOCAL_STATE_INFO: &[u8] = b"tessera/v2/local-state";

/// The key that seals a device's local state. Zeroized on drop; cannot be
/// printed.
pub struct LocalStateKey(Zeroizing<[u8; 32]>);

/// A sealed state file that does not open: altered, truncated, sealed by
/// another device, or under another label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the sealed local state does not open (altered, or another device's)")]
pub struct LocalStateError;

impl LocalStateKey {
    /// The local-state key of a device.
    pub fn of_device(keys: &DeviceKeys) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        if let Some(okm) =
            crate::stream::hkdf_sha256(keys.encryption.as_bytes(), &[0u8; 32], LOCAL_STATE_INFO, 32)
        {
            let okm = Zeroizing::new(okm);
            key.copy_from_slice(&okm);
        }
        Self(key)
    }

    /// Seals `state` under `label`.
    pub fn seal(&self, label: &[u8], state: &[u8]) -> Result<Vec<u8>, KeyError> {
        let nonce = random_array::<{ aead::NONCE_LEN }>()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&aead::seal(&self.0, nonce, label, state));
        Ok(out)
    }

    /// Opens what [`Self::seal`] made under the same label.
    pub fn open(&self, label: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, LocalStateError> {
        if sealed.len() < aead::NONCE_LEN + aead::TAG_LEN {
            return Err(LocalStateError);
        }
        let (nonce, ciphertext) = sealed.split_at(aead::NONCE_LEN);
        let nonce: [u8; aead::NONCE_LEN] = nonce.try_into().map_err(|_| LocalStateError)?;
        aead::open(&self.0, nonce, label, ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| LocalStateError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_opens_only_with_its_device_and_label() {
        let keys = DeviceKeys::generate().unwrap();
        let key = LocalStateKey::of_device(&keys);
        let sealed = key.seal(b"channel-a", b"chains").unwrap();
        assert_eq!(
            key.open(b"channel-a", &sealed).unwrap().as_slice(),
            b"chains"
        );
        assert_eq!(key.open(b"channel-b", &sealed), Err(LocalStateError));
        let other = LocalStateKey::of_device(&DeviceKeys::generate().unwrap());
        assert_eq!(other.open(b"channel-a", &sealed), Err(LocalStateError));
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert_eq!(key.open(b"channel-a", &bad), Err(LocalStateError));
        assert_eq!(key.open(b"channel-a", &sealed[..20]), Err(LocalStateError));
    }
}
