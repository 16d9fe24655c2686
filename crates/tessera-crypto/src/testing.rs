//! Test devices shared by the unit tests of `envelope` and `sender_key`.

#![allow(clippy::unwrap_used, reason = "test code")]

use crate::{
    DeviceKeys, EncryptionPublicKey,
    envelope::{Opener, Recipient, Sender},
};

pub(crate) struct Device {
    pub(crate) identity: &'static str,
    pub(crate) card_id: [u8; 32],
    pub(crate) keys: DeviceKeys,
    pub(crate) public: EncryptionPublicKey,
}

/// A device with fresh keys and the card id `[n; 32]`.
pub(crate) fn device(identity: &'static str, n: u8) -> Device {
    let keys = DeviceKeys::generate().unwrap();
    let public = keys.encryption.public_key();
    Device {
        identity,
        card_id: [n; 32],
        keys,
        public,
    }
}

impl Device {
    pub(crate) fn sender(&self) -> Sender<'_> {
        Sender {
            identity: self.identity,
            card_id: self.card_id,
            key: &self.keys.signing,
        }
    }

    pub(crate) fn recipient(&self) -> Recipient<'_> {
        Recipient {
            card_id: self.card_id,
            key: &self.public,
        }
    }

    pub(crate) fn opener(&self) -> Opener<'_> {
        Opener {
            card_id: self.card_id,
            secret: &self.keys.encryption,
        }
    }
}
