//! Sender keys (docs/protocol.md section 15, "At the app server"): the
//! copies of each sending device's chain, one per recipient device, stored
//! under the channel's lock at its current epoch and handed to the device
//! each is addressed to; and the check that a group message's chain was
//! stored first. The server cannot open a copy: it checks only the clear
//! routing fields against the request and the recipients against its own
//! records of members and devices.

use prost::Message as _;
use std::collections::BTreeSet;

use tessera_card::CardId;
use tessera_crypto::sender_key::{CHAIN_ID_LEN, ParsedDistribution};
use tessera_proto::server::v1::{
    GetSenderKeyRequest, GetSenderKeyResponse, PutSenderKeysRequest, PutSenderKeysResponse,
};
use tessera_service::{Caller, limits, metrics};

use super::{Channels, legacy};
use crate::{
    error::ServerError,
    signers::own_active_device,
    store::{ChannelRecord, SenderKeyChain, SenderKeysPut, Usage, UsageChange},
};

/// The most bytes of one encoded `SenderKeyDistribution` (one is about 440).
pub(crate) const MAX_DISTRIBUTION_BYTES: usize = 4096;

/// A 16-byte chain id field, else `INVALID_ARGUMENT`.
pub(crate) fn chain_id(bytes: &[u8]) -> Result<[u8; CHAIN_ID_LEN], ServerError> {
    bytes.try_into().map_err(|_| {
        ServerError::InvalidArgument(format!(
            "chain_id must be {CHAIN_ID_LEN} bytes, got {}",
            bytes.len()
        ))
    })
}

/// `ABORTED` unless `epoch` is the channel's current one (`FAILED_PRECONDITION`
/// for a channel made before protocol v2). `what` names what was sealed.
pub(crate) fn check_current_epoch(
    channel: &ChannelRecord,
    epoch: u64,
    what: &str,
) -> Result<u64, ServerError> {
    if channel.chain_length == 0 {
        return Err(legacy(&channel.channel_id));
    }
    let current = channel.chain_length - 1;
    if epoch != current {
        return Err(ServerError::Aborted(format!(
            "channel {} is at epoch {current}, {what} sealed at epoch {epoch}: refetch the chain and seal again",
            channel.channel_id
        )));
    }
    Ok(current)
}

impl Channels {
    /// Stores the copies of one of the caller's chains at the channel's
    /// current epoch. The first put fixes the chain's recipients; a later
    /// one may only replace copies of those.
    pub(crate) async fn put_sender_keys(
        &self,
        caller: &Caller,
        r: PutSenderKeysRequest,
    ) -> Result<PutSenderKeysResponse, ServerError> {
        let sender_card = limits::card_id("sender_card_id", &r.sender_card_id)?;
        let chain = chain_id(&r.chain_id)?;
        if r.distributions.is_empty() {
            return Err(ServerError::InvalidArgument(
                "distributions is empty: send one copy per recipient device".into(),
            ));
        }
        limits::check_count(
            "distributions",
            r.distributions.len(),
            self.limits
                .max_members_per_channel
                .saturating_mul(self.limits.max_devices_per_user),
        )?;
        limits::check_count(
            "recipient_card_ids",
            r.recipient_card_ids.len(),
            self.limits
                .max_members_per_channel
                .saturating_mul(self.limits.max_devices_per_user),
        )?;
        let mut listed = BTreeSet::new();
        for id in &r.recipient_card_ids {
            let card = limits::card_id("recipient_card_ids", id)?;
            if !listed.insert(card) {
                return Err(ServerError::InvalidArgument(format!(
                    "device {} is listed twice in recipient_card_ids",
                    card.short()
                )));
            }
        }
        let mut recipients = BTreeSet::new();
        let mut copies = Vec::with_capacity(r.distributions.len());
        for (i, bytes) in r.distributions.into_iter().enumerate() {
            limits::check_len(
                &format!("distribution {i}"),
                bytes.len(),
                MAX_DISTRIBUTION_BYTES,
            )?;
            let parsed = ParsedDistribution::parse(&bytes)
                .map_err(|e| ServerError::InvalidArgument(format!("distribution {i}: {e}")))?;
            let mismatch = if parsed.sender_card_id() != sender_card.as_bytes() {
                Some("sender card")
            } else if parsed.channel_id() != r.channel_id {
                Some("channel")
            } else if parsed.epoch() != r.epoch {
                Some("epoch")
            } else if parsed.chain_id() != chain {
                Some("chain id")
            } else {
                None
            };
            if let Some(field) = mismatch {
                return Err(ServerError::InvalidArgument(format!(
                    "distribution {i} names another {field} than the request"
                )));
            }
            let recipient = CardId::from_array(*parsed.recipient_card_id());
            if !recipients.insert(recipient) {
                return Err(ServerError::InvalidArgument(format!(
                    "device {} has two copies: one per recipient device",
                    recipient.short()
                )));
            }
            copies.push((recipient.to_vec(), bytes));
        }
        self.membership(&r.channel_id, &caller.identity).await?;
        own_active_device(&*self.store, caller, sender_card, "distribute keys").await?;

        let lock = self.channel_locks.of(&r.channel_id).lock().await;
        let channel = self.channel(&r.channel_id).await?;
        self.still_a_member(&r.channel_id, &caller.identity).await?;
        let epoch = check_current_epoch(&channel, r.epoch, "the sender keys were")?;
        // The recipients are not checked against the server's device
        // records: the members' device lists (at the key service) decide
        // whom a sender trusts, and a device approved or revoked there may
        // not have reached these records yet. A copy only ever reaches a
        // current member's own active device (GetSenderKey).
        let (sender, chain) = (sender_card.to_vec(), chain.to_vec());
        let stored_before = self
            .store
            .sender_key_chain(&r.channel_id, &sender, &chain)
            .await?;
        let new_chain = stored_before.is_none();
        let record = match stored_before {
            None if listed.is_empty() => SenderKeyChain {
                epoch,
                recipient_card_ids: recipients.iter().map(CardId::to_vec).collect(),
                server_time_ms: tessera_service::now_ms(),
            },
            None => {
                if let Some(other) = recipients.iter().find(|c| !listed.contains(*c)) {
                    return Err(ServerError::InvalidArgument(format!(
                        "device {} has a copy but is not among recipient_card_ids",
                        other.short()
                    )));
                }
                SenderKeyChain {
                    epoch,
                    recipient_card_ids: listed.iter().map(CardId::to_vec).collect(),
                    server_time_ms: tessera_service::now_ms(),
                }
            }
            Some(stored) if stored.epoch != epoch => {
                return Err(ServerError::FailedPrecondition(format!(
                    "chain {} was stored at epoch {}: start a new chain for epoch {epoch}",
                    hex::encode(&chain),
                    stored.epoch
                )));
            }
            Some(stored) => {
                if !listed.is_empty()
                    && !listed
                        .iter()
                        .map(CardId::as_bytes)
                        .eq(stored.recipient_card_ids.iter().map(Vec::as_slice))
                {
                    return Err(ServerError::FailedPrecondition(format!(
                        "chain {} was stored with other recipients",
                        hex::encode(&chain)
                    )));
                }
                // Stored sorted: a binary search per copy.
                if let Some(new) = recipients.iter().find(|c| {
                    stored
                        .recipient_card_ids
                        .binary_search_by(|s| s.as_slice().cmp(c.as_bytes().as_slice()))
                        .is_err()
                }) {
                    return Err(ServerError::FailedPrecondition(format!(
                        "device {} is not a recipient of chain {}: new devices need a new chain",
                        new.short(),
                        hex::encode(&chain)
                    )));
                }
                stored
            }
        };
        // The copies count against the sender's stored message bytes (a
        // replaced copy gives its bytes back), under the user's lock taken
        // after the channel's, as for a send.
        let user = self.user_locks.of(&caller.identity).lock().await;
        // A new chain's record (its recipient list) is stored too: it counts.
        let mut added = if new_chain {
            record.encoded_len() as u64
        } else {
            0
        };
        let mut replaced = 0u64;
        for (recipient, copy) in &copies {
            replaced = replaced.saturating_add(
                self.store
                    .sender_key(&r.channel_id, &sender, &chain, recipient)
                    .await?
                    .map_or(0, |(old, _)| old.len() as u64),
            );
            added = added.saturating_add(copy.len() as u64);
        }
        let stored = copies.len();
        let put = SenderKeysPut {
            channel_id: r.channel_id,
            sender_card_id: sender,
            chain_id: chain,
            chain: record,
            copies,
            sender_identity: caller.identity.clone(),
        };
        // On PostgreSQL the sender's own batches of sends (which take no
        // user lock there) may charge its usage between the read and the
        // compare-and-set: `charge_usage` reads it again and retries.
        let limit = self.limits.max_message_bytes_per_user;
        let charge = |before: Usage| {
            let mut after = before;
            after.message_bytes = after
                .message_bytes
                .saturating_sub(replaced)
                .saturating_add(added);
            if after.message_bytes > limit {
                return Err(ServerError::ResourceExhausted(format!(
                    "{} has used up its quota of {limit} bytes of stored messages",
                    caller.identity
                )));
            }
            Ok(UsageChange { before, after })
        };
        let store = &self.store;
        let usage = self.store.usage(&caller.identity).await?;
        self.charge_usage(&caller.identity, usage, charge, |change| {
            let put = &put;
            async move { store.put_sender_keys(put, &change).await }
        })
        .await?;
        drop(user);
        drop(lock);
        self.store.flush().await?;
        metrics::increment_by(metrics::SERVER_SENDER_KEYS_STORED, stored as u64);
        Ok(PutSenderKeysResponse {
            stored: u32::try_from(stored).unwrap_or(u32::MAX),
        })
    }

    /// The copy of a chain addressed to one of the caller's devices.
    pub(crate) async fn get_sender_key(
        &self,
        caller: &Caller,
        r: &GetSenderKeyRequest,
    ) -> Result<GetSenderKeyResponse, ServerError> {
        let recipient = limits::card_id("recipient_card_id", &r.recipient_card_id)?;
        let sender = limits::card_id("sender_card_id", &r.sender_card_id)?;
        let chain = chain_id(&r.chain_id)?;
        self.membership(&r.channel_id, &caller.identity).await?;
        own_active_device(&*self.store, caller, recipient, "fetch keys as").await?;
        let (distribution, record) = self
            .store
            .sender_key(
                &r.channel_id,
                sender.as_bytes(),
                &chain,
                recipient.as_bytes(),
            )
            .await?
            .ok_or_else(|| {
                ServerError::NotFound(format!(
                    "no copy of chain {} of device {} for device {}",
                    hex::encode(chain),
                    sender.short(),
                    recipient.short()
                ))
            })?;
        Ok(GetSenderKeyResponse {
            distribution,
            recipient_card_ids: record.recipient_card_ids,
            server_time_ms: record.server_time_ms,
            epoch: record.epoch,
        })
    }
}
