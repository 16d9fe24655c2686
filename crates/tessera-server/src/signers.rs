//! Which of the caller's devices may sign or send, and with which key: the
//! app server checks channel statements against the signing key of the
//! enrolled device that signed them, kept in its device record since
//! enrollment (or, for a record written before, taken once from the card at
//! the key service).

use std::sync::Arc;

use tessera_card::{CardId, ParsedCard, channel::StatementSigner, transparency};
use tessera_crypto::VerifyingKey;
use tessera_service::{Caller, TokenIssuer};

use crate::{
    Locks,
    error::ServerError,
    kms_client::KmsClient,
    store::{Device, DeviceStatus, Store},
};

/// The caller's active client device `card`, the one its token names when
/// it names one; `PERMISSION_DENIED` otherwise. `what` says what the device
/// does ("send", "sign").
pub(crate) async fn own_active_device(
    store: &dyn Store,
    caller: &Caller,
    card: CardId,
    what: &str,
) -> Result<Device, ServerError> {
    if caller.device_card_id.is_some_and(|d| d != card) {
        return Err(ServerError::PermissionDenied(format!(
            "a device may only {what} as itself"
        )));
    }
    store
        .device(card.as_bytes())
        .await?
        .filter(|d| {
            d.identity == caller.identity && d.status == DeviceStatus::Active as i32 && !d.org_card
        })
        .ok_or_else(|| {
            ServerError::PermissionDenied(format!(
                "{card} is not an active device of {}",
                caller.identity
            ))
        })
}

/// A statement's signer as the app server knows it: an active client device
/// of the caller, with its signing key.
#[derive(Debug, Clone)]
pub(crate) struct DeviceSigner {
    pub(crate) identity: String,
    pub(crate) card_id: CardId,
    pub(crate) key: VerifyingKey,
}

impl DeviceSigner {
    pub(crate) fn statement_signer(&self) -> StatementSigner<'_> {
        StatementSigner {
            identity: &self.identity,
            card_id: self.card_id,
            key: &self.key,
        }
    }
}

/// Finds the devices that sign statements, and their keys.
pub(crate) struct SignerKeys {
    store: Arc<dyn Store>,
    kms: Arc<KmsClient>,
    issuer: Arc<TokenIssuer>,
    user_locks: Arc<Locks>,
    /// Whether signers must be approved by their device list.
    check_approval: bool,
}

impl SignerKeys {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        kms: Arc<KmsClient>,
        issuer: Arc<TokenIssuer>,
        user_locks: Arc<Locks>,
    ) -> Self {
        Self {
            store,
            kms,
            issuer,
            user_locks,
            check_approval: true,
        }
    }

    /// Without asking the key service whether a signer is approved: for the
    /// domain layer's unit tests, which run no key service (the check runs
    /// over gRPC in `tests/server.rs`).
    #[cfg(test)]
    pub(crate) fn without_approval_check(mut self) -> Self {
        self.check_approval = false;
        self
    }

    /// The device that signed a statement naming `identity` and `card`,
    /// if it may sign for the caller: the caller is `identity` and `card`
    /// is one of its active client devices (the one its token names, when
    /// it names one). `PERMISSION_DENIED` otherwise.
    pub(crate) async fn signer(
        &self,
        caller: &Caller,
        identity: &str,
        card: CardId,
    ) -> Result<DeviceSigner, ServerError> {
        if identity != caller.identity {
            return Err(ServerError::PermissionDenied(format!(
                "the statement is signed by {identity}, not by {}",
                caller.identity
            )));
        }
        let device = own_active_device(&*self.store, caller, card, "sign").await?;
        if self.check_approval {
            self.check_approved(identity, card).await?;
        }
        Ok(DeviceSigner {
            identity: device.identity.clone(),
            card_id: card,
            key: self.key(device).await?,
        })
    }

    /// Refuses a device its owner's device list does not trust (pending or
    /// removed), or an identity with no list at all: every member would
    /// refuse what it signs, and no statement could follow it.
    async fn check_approved(&self, identity: &str, card: CardId) -> Result<(), ServerError> {
        match self.kms.trusted_devices(&self.issuer, identity).await? {
            None => Err(ServerError::PermissionDenied(format!(
                "{identity} has no device list: enroll a device with a current client first"
            ))),
            Some(trusted) if !trusted.iter().any(|t| t.as_slice() == card.as_bytes()) => {
                Err(ServerError::PermissionDenied(format!(
                    "device {} of {identity} is not approved by {identity}'s device list (pending or removed).await: approve it from another device first",
                    card.short()
                )))
            }
            Some(_) => Ok(()),
        }
    }

    /// The device's signing key: from its record, or (a record written
    /// before keys were kept) from its card at the key service, checked to
    /// be the card the record names and then kept in the record.
    async fn key(&self, device: Device) -> Result<VerifyingKey, ServerError> {
        if !device.signing_public_key.is_empty() {
            return VerifyingKey::from_bytes(&device.signing_public_key)
                .map_err(|_| ServerError::Internal("a stored device key is not a valid key"));
        }
        let id = CardId::from_bytes(&device.card_id)
            .map_err(|_| ServerError::Internal("a stored device card id is not 32 bytes"))?;
        let record = self
            .kms
            .get(&self.issuer, &id)
            .await?
            .record
            .ok_or(ServerError::Internal("the key service answered no card"))?;
        let key = key_from_registration(&device, &record.registration_entry)?;
        // Kept under the user's lock, on the record as it is now (a
        // revocation meanwhile stays).
        let _user = self.user_locks.of(&device.identity).lock().await;
        if let Some(mut now) = self.store.device(&device.card_id).await?
            && now.signing_public_key.is_empty()
        {
            now.signing_public_key = key.as_bytes().to_vec();
            self.store.put_devices(&[now]).await?;
        }
        tracing::info!(card_id = %id, "device signing key taken from the key service");
        Ok(key)
    }
}

/// The signing key of `device`'s card, from the key service's registration
/// entry of it: only if the card in the entry is the device's card (its id,
/// computed from the card, is the record's, so the key is the one that id
/// commits to) and of the device's identity.
pub(crate) fn key_from_registration(
    device: &Device,
    entry: &[u8],
) -> Result<VerifyingKey, ServerError> {
    let card = transparency::registered_card(entry)
        .and_then(ParsedCard::parse)
        .map_err(|e| {
            tracing::error!(error = %e, "the key service answered an unreadable card");
            ServerError::Internal("the key service answered an unreadable card")
        })?;
    if card.id().as_bytes().as_slice() != device.card_id || card.identity() != device.identity {
        tracing::error!(
            asked = %hex::encode(&device.card_id),
            answered = %card.id(),
            "the key service answered another card"
        );
        return Err(ServerError::Internal(
            "the key service answered another card than the one asked for",
        ));
    }
    Ok(*card.signing_key())
}
