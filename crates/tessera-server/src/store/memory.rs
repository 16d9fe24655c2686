//! The in-memory store, for unit tests.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prost::Message;
use tessera_proto::server::v1::{ChainEntry, StoredMessage};
use tessera_service::storage::{self, FlushFuture, StorageError};

use super::{
    Account, AttachmentRecord, BatchOutcome, ChannelRecord, Device, MemberRecord, PendingMessage,
    SenderKeyChain, SenderKeysPut, StatementChange, Store, StoreFuture, Usage, UsageChange,
    batch_keys, extends, plan_batch, take_bounded,
};

/// The in-memory records of a range, bounded as [`take_bounded`] says (from
/// the newest on when `newest_first`), cloned.
fn clone_bounded<'a, K: 'a, M: Message + Clone + 'a>(
    range: impl DoubleEndedIterator<Item = (&'a K, &'a M)>,
    limit: usize,
    max_bytes: usize,
    newest_first: bool,
) -> Result<Vec<M>, StorageError> {
    let sized = |(_, v): (&K, &M)| Ok((v.encoded_len(), v.clone()));
    if newest_first {
        take_bounded(range.rev().map(sized), limit, max_bytes)
    } else {
        take_bounded(range.map(sized), limit, max_bytes)
    }
}

/// In-memory store for unit tests.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Memory>>,
}

#[cfg(test)]
impl MemoryStore {
    /// The next `append_messages` call fails as `how` says.
    pub(crate) fn sabotage_next_batch(&self, how: Sabotage) {
        if let Ok(mut m) = self.inner.lock() {
            m.sabotage = Some(how);
        }
    }
}

/// How the next batch fails, for tests of the committer.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sabotage {
    /// `append_messages` answers an error.
    Fail,
    /// `append_messages` panics.
    Panic,
    /// The flush after the next batch of this many messages answers an
    /// error (the batch itself is written).
    FailFlushAfterBatchOf(usize),
}

#[derive(Default)]
struct Memory {
    #[cfg(test)]
    sabotage: Option<Sabotage>,
    #[cfg(test)]
    fail_flush: bool,
    accounts: BTreeMap<String, Account>,
    devices: BTreeMap<Vec<u8>, Device>,
    org: BTreeMap<String, ()>,
    channels: BTreeMap<String, ChannelRecord>,
    members: BTreeMap<(String, String), MemberRecord>,
    chains: BTreeMap<(String, u64), ChainEntry>,
    messages: BTreeMap<(String, u64), StoredMessage>,
    dedupe: BTreeMap<(String, Vec<u8>), u64>,
    horizons: BTreeMap<(String, String), u64>,
    attachments: BTreeMap<String, AttachmentRecord>,
    usage: BTreeMap<String, Usage>,
    sender_chains: BTreeMap<ChainAt, SenderKeyChain>,
    /// By (chain, recipient card).
    sender_keys: BTreeMap<(ChainAt, Vec<u8>), Vec<u8>>,
}

/// Where a sender-key chain is: (channel, sender card, chain id).
type ChainAt = (String, Vec<u8>, Vec<u8>);

fn chain_at(channel_id: &str, sender_card_id: &[u8], chain_id: &[u8]) -> ChainAt {
    (
        channel_id.to_owned(),
        sender_card_id.to_vec(),
        chain_id.to_vec(),
    )
}

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Memory>, StorageError> {
        storage::lock(&self.inner)
    }
}

impl Store for MemoryStore {
    fn account<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Option<Account>> {
        Box::pin(async move { Ok(self.lock()?.accounts.get(identity).cloned()) })
    }

    fn create_account<'a>(&'a self, account: &'a Account) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut m = self.lock()?;
            if m.accounts.contains_key(&account.identity) {
                return Ok(false);
            }
            m.accounts.insert(account.identity.clone(), account.clone());
            Ok(true)
        })
    }

    fn replace_account<'a>(&'a self, old: &'a Account, new: &'a Account) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut m = self.lock()?;
            if m.accounts.get(&old.identity) != Some(old) {
                return Ok(false);
            }
            m.accounts.insert(new.identity.clone(), new.clone());
            Ok(true)
        })
    }

    fn devices<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<Device>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .devices
                .values()
                .filter(|d| d.identity == identity)
                .cloned()
                .collect())
        })
    }

    fn device<'a>(&'a self, card_id: &'a [u8]) -> StoreFuture<'a, Option<Device>> {
        Box::pin(async move { Ok(self.lock()?.devices.get(card_id).cloned()) })
    }

    fn put_devices<'a>(&'a self, devices: &'a [Device]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut m = self.lock()?;
            for d in devices {
                m.devices.insert(d.card_id.clone(), d.clone());
            }
            Ok(())
        })
    }

    fn org_members(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move { Ok(self.lock()?.org.keys().cloned().collect()) })
    }

    fn set_org_member<'a>(&'a self, identity: &'a str, member: bool) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut m = self.lock()?;
            if member {
                m.org.insert(identity.to_owned(), ());
            } else {
                m.org.remove(identity);
            }
            Ok(())
        })
    }

    fn channel<'a>(&'a self, channel_id: &'a str) -> StoreFuture<'a, Option<ChannelRecord>> {
        Box::pin(async move { Ok(self.lock()?.channels.get(channel_id).cloned()) })
    }

    fn member<'a>(
        &'a self,
        channel_id: &'a str,
        identity: &'a str,
    ) -> StoreFuture<'a, Option<MemberRecord>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .members
                .get(&(channel_id.to_owned(), identity.to_owned()))
                .cloned())
        })
    }

    fn members<'a>(&'a self, channel_id: &'a str) -> StoreFuture<'a, Vec<MemberRecord>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .members
                .iter()
                .filter(|((c, _), _)| c == channel_id)
                .map(|(_, m)| m.clone())
                .collect())
        })
    }

    fn channels_of<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .members
                .keys()
                .filter(|(_, i)| i == identity)
                .map(|(c, _)| c.clone())
                .collect())
        })
    }

    fn append_statement<'a>(
        &'a self,
        channel_id: &'a str,
        expected_length: u64,
        expected_head: &'a [u8],
        change: &'a StatementChange,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut m = self.lock()?;
            let current = m.channels.get(channel_id);
            if !extends(current, expected_length, expected_head) {
                return Ok(false);
            }
            let change = change.placed(current);
            let id = channel_id.to_owned();
            m.channels.insert(id.clone(), change.channel.clone());
            m.chains
                .insert((id.clone(), expected_length), change.entry.clone());
            for member in &change.put_members {
                m.members
                    .insert((id.clone(), member.identity.clone()), member.clone());
            }
            for identity in &change.remove_members {
                m.members.remove(&(id.clone(), identity.clone()));
            }
            Ok(true)
        })
    }

    fn chain<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'a, Vec<ChainEntry>> {
        Box::pin(async move {
            if from >= to {
                return Ok(Vec::new());
            }
            let m = self.lock()?;
            let range = m
                .chains
                .range((channel_id.to_owned(), from)..(channel_id.to_owned(), to));
            clone_bounded(range, limit, max_bytes, false)
        })
    }

    fn dedupe<'a>(
        &'a self,
        channel_id: &'a str,
        client_message_id: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .dedupe
                .get(&(channel_id.to_owned(), client_message_id.to_vec()))
                .copied())
        })
    }

    fn append_messages<'a>(
        &'a self,
        batch: &'a [PendingMessage],
    ) -> StoreFuture<'a, Vec<BatchOutcome>> {
        Box::pin(async move {
            #[cfg(test)]
            {
                let sabotage = self.lock()?.sabotage.take();
                match sabotage {
                    Some(Sabotage::Fail) => {
                        return Err(StorageError::Backend {
                            backend: "memory",
                            message: "the batch was made to fail".into(),
                        });
                    }
                    #[allow(clippy::panic)]
                    Some(Sabotage::Panic) => panic!("the batch was made to panic"),
                    Some(Sabotage::FailFlushAfterBatchOf(n)) => {
                        let mut m = self.lock()?;
                        if batch.len() == n {
                            m.fail_flush = true;
                        } else {
                            m.sabotage = sabotage;
                        }
                    }
                    None => {}
                }
            }
            let mut m = self.lock()?;
            let (channel_ids, senders) = batch_keys(batch);
            let channels = channel_ids
                .into_iter()
                .filter_map(|id| m.channels.get(&id).cloned().map(|c| (id, c)))
                .collect();
            let stored_ids = batch
                .iter()
                .filter_map(|p| {
                    let k = (
                        p.message.channel_id.clone(),
                        p.message.client_message_id.clone(),
                    );
                    m.dedupe.get(&k).map(|&index| (k, index))
                })
                .collect();
            let usage = senders
                .into_iter()
                .filter_map(|s| m.usage.get(&s).copied().map(|u| (s, u)))
                .collect();
            let plan = plan_batch(batch, channels, stored_ids, usage);
            for message in plan.messages {
                let id = message.channel_id.clone();
                m.dedupe.insert(
                    (id.clone(), message.client_message_id.clone()),
                    message.index,
                );
                m.messages.insert((id, message.index), message);
            }
            m.channels.extend(plan.channels);
            m.usage.extend(plan.usage);
            Ok(plan.outcomes)
        })
    }

    fn message_range<'a>(
        &'a self,
        channel_id: &'a str,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        newest_first: bool,
    ) -> StoreFuture<'a, Vec<StoredMessage>> {
        Box::pin(async move {
            if from >= to {
                return Ok(Vec::new());
            }
            let m = self.lock()?;
            let range = m
                .messages
                .range((channel_id.to_owned(), from)..(channel_id.to_owned(), to));
            clone_bounded(range, limit, max_bytes, newest_first)
        })
    }

    fn usage<'a>(&'a self, identity: &'a str) -> StoreFuture<'a, Usage> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .usage
                .get(identity)
                .copied()
                .unwrap_or_default())
        })
    }

    fn read_horizon<'a>(&'a self, identity: &'a str, channel_id: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .horizons
                .get(&(identity.to_owned(), channel_id.to_owned()))
                .copied()
                .unwrap_or(0))
        })
    }

    fn set_read_horizon<'a>(
        &'a self,
        identity: &'a str,
        channel_id: &'a str,
        index: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.lock()?
                .horizons
                .insert((identity.to_owned(), channel_id.to_owned()), index);
            Ok(())
        })
    }

    fn attachment<'a>(
        &'a self,
        attachment_id: &'a str,
    ) -> StoreFuture<'a, Option<AttachmentRecord>> {
        Box::pin(async move { Ok(self.lock()?.attachments.get(attachment_id).cloned()) })
    }

    fn put_attachment<'a>(
        &'a self,
        record: &'a AttachmentRecord,
        usage: &'a UsageChange,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut m = self.lock()?;
            if m.usage.get(&record.uploader).copied().unwrap_or_default() != usage.before {
                return Ok(false);
            }
            m.usage.insert(record.uploader.clone(), usage.after);
            m.attachments
                .insert(record.attachment_id.clone(), record.clone());
            Ok(true)
        })
    }

    fn sender_key_chain<'a>(
        &'a self,
        channel_id: &'a str,
        sender_card_id: &'a [u8],
        chain_id: &'a [u8],
    ) -> StoreFuture<'a, Option<SenderKeyChain>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .sender_chains
                .get(&chain_at(channel_id, sender_card_id, chain_id))
                .cloned())
        })
    }

    fn sender_key<'a>(
        &'a self,
        channel_id: &'a str,
        sender_card_id: &'a [u8],
        chain_id: &'a [u8],
        recipient_card_id: &'a [u8],
    ) -> StoreFuture<'a, Option<(Vec<u8>, SenderKeyChain)>> {
        Box::pin(async move {
            let m = self.lock()?;
            let chain = chain_at(channel_id, sender_card_id, chain_id);
            let copy = m
                .sender_keys
                .get(&(chain.clone(), recipient_card_id.to_vec()));
            match (copy, m.sender_chains.get(&chain)) {
                (None, _) => Ok(None),
                (Some(copy), Some(chain)) => Ok(Some((copy.clone(), chain.clone()))),
                (Some(_), None) => Err(StorageError::Corrupt("sender-key copy without its chain")),
            }
        })
    }

    fn put_sender_keys<'a>(
        &'a self,
        put: &'a SenderKeysPut,
        usage: &'a UsageChange,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut m = self.lock()?;
            if m.usage
                .get(&put.sender_identity)
                .copied()
                .unwrap_or_default()
                != usage.before
            {
                return Ok(false);
            }
            let chain = chain_at(&put.channel_id, &put.sender_card_id, &put.chain_id);
            for (recipient, copy) in &put.copies {
                m.sender_keys
                    .insert((chain.clone(), recipient.clone()), copy.clone());
            }
            m.sender_chains.insert(chain, put.chain.clone());
            m.usage.insert(put.sender_identity.clone(), usage.after);
            Ok(true)
        })
    }

    fn flush(&self) -> FlushFuture<'_> {
        Box::pin(async {
            #[cfg(test)]
            if let Ok(mut m) = self.inner.lock()
                && std::mem::take(&mut m.fail_flush)
            {
                return Err(StorageError::Backend {
                    backend: "memory",
                    message: "the flush was made to fail".into(),
                });
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store() {
        conformance::exercise(&MemoryStore::default()).await;
    }
}
