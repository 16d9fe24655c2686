//! The directory: cards, their status, and the transparency log over every
//! registration and revocation.
//!
//! Writes are serialised by one lock: each appends a log entry, updates the
//! card records, signs a checkpoint, stores all of it atomically and flushes
//! before the new checkpoint is published. Reads see the directory exactly
//! as of the published checkpoint (records written by an append still in
//! flight are filtered out by their log index), so every card returned comes
//! with an inclusion proof in the checkpoint returned beside it.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, Ordering},
};

use tessera_card::{
    CardId, CardKind, ParsedCard, SignatureRole, VerifiedCard, Verifier,
    device_list::{self, DeviceListError, DeviceListState, ParsedStatement},
    revocation::ParsedRevocation,
    transparency::{self, Tree, VerifiedCheckpoint},
};
use tessera_crypto::{SigningKey, VerifyingKey};
use tessera_proto::{
    card::v1 as card_pb,
    kms::v1::{CardRecord, CardStatus, DeviceList, IdentityCards, LoggedStatement},
    transparency::v1::{ConsistencyProof, InclusionProof, SignedCheckpoint},
};
use tessera_service::{
    Caller,
    metrics::{self, KMS_CARDS_REGISTERED, KMS_CARDS_REVOKED, KMS_LOG_ENTRIES},
    storage::StorageError,
    token::Role,
};
use thiserror::Error;
use tonic::Status;

use crate::{
    index::{self, CardIndex, Fetched},
    store::{Append, Store, StoredCard, StoredDeviceList},
};

/// Limits of the key service.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_identities_per_search: usize,
    pub max_page_size: u32,
    pub max_active_cards_per_identity: usize,
    pub max_snapshot_bytes: usize,
    pub max_statement_bytes: usize,
    /// Device list statements one search answer carries at most; the lists
    /// past it are sent truncated (fetch them with GetDeviceList).
    pub max_statements_per_search: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_identities_per_search: 100,
            max_page_size: 1000,
            max_active_cards_per_identity: 256,
            max_snapshot_bytes: 4096,
            max_statement_bytes: 1024,
            max_statements_per_search: 2000,
        }
    }
}

/// What went wrong, sorted by who is at fault; converted to a gRPC status once.
#[derive(Debug, Error)]
pub enum KmsError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("the key service is unavailable after a storage failure; restart it")]
    Unavailable,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<KmsError> for Status {
    fn from(e: KmsError) -> Self {
        match e {
            KmsError::InvalidArgument(m) => Status::invalid_argument(m),
            KmsError::PermissionDenied(m) => Status::permission_denied(m),
            KmsError::NotFound(m) => Status::not_found(m),
            KmsError::FailedPrecondition(m) => Status::failed_precondition(m),
            KmsError::ResourceExhausted(m) => Status::resource_exhausted(m),
            KmsError::Aborted(m) => Status::aborted(m),
            KmsError::OutOfRange(m) => Status::out_of_range(m),
            KmsError::Unavailable => Status::unavailable(e.to_string()),
            KmsError::Storage(s) => s.into(),
            KmsError::Internal(what) => {
                tracing::error!(what, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Why the directory could not open its stored state.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "the stored checkpoint was not signed by this service's key: the key file was replaced or the data directory belongs to another key service"
    )]
    ForeignCheckpoint,
    #[error(
        "the stored log does not match its checkpoint (size {size}, {detail}): the data is corrupt"
    )]
    Inconsistent { size: u64, detail: &'static str },
    #[error(
        "the database holds no checkpoint yet: a read-only replica starts once the writer has published one"
    )]
    NothingPublished,
}

/// Clock difference tolerated between a revocation's signer and the key
/// service, in seconds.
const REVOCATION_SKEW_SECS: i64 = 300;

/// The device list state a stored record holds.
fn stored_state(list: &StoredDeviceList) -> Result<DeviceListState, KmsError> {
    let corrupt = |_| KmsError::Internal("stored device list is corrupt");
    let head: Option<transparency::Hash> = match list.head.len() {
        0 => None,
        _ => Some(list.head.as_slice().try_into().map_err(corrupt)?),
    };
    let trusted = list
        .trusted
        .iter()
        .map(|id| {
            CardId::from_bytes(id).map_err(|_| KmsError::Internal("stored device list is corrupt"))
        })
        .collect::<Result<_, _>>()?;
    DeviceListState::resume(&list.identity, list.indices.len() as u64, head, trusted)
        .map_err(|_| KmsError::Internal("stored device list is corrupt"))
}

struct Published {
    size: u64,
    checkpoint: SignedCheckpoint,
}

pub struct Directory {
    store: Arc<dyn Store>,
    /// The log's key; `None` on a read-only replica, which serves what the
    /// writer published and signs nothing.
    key: Option<SigningKey>,
    /// The log's public key.
    public: VerifyingKey,
    app_key: VerifyingKey,
    limits: Limits,
    write: tokio::sync::Mutex<()>,
    tree: RwLock<Tree>,
    /// What search reads: every card, in memory (see `index.rs`).
    index: RwLock<CardIndex>,
    published: RwLock<Arc<Published>>,
    failed: AtomicBool,
}

fn read_only() -> KmsError {
    KmsError::FailedPrecondition(
        "this key service is a read-only replica: register, revoke and publish through the writer"
            .into(),
    )
}

fn lock_error<T>(_: T) -> KmsError {
    KmsError::Internal("lock poisoned")
}

/// The proof that leaf `index` is in the tree of `size` leaves.
fn inclusion_proof(tree: &Tree, index: u64, size: u64) -> Result<InclusionProof, KmsError> {
    let hashes = tree
        .inclusion_proof(index, size)
        .ok_or(KmsError::Internal("inclusion proof out of range"))?;
    Ok(transparency::inclusion_proof_message(index, size, hashes))
}

impl Directory {
    /// Rebuilds the tree from the stored leaf hashes and checks it against
    /// the stored checkpoint.
    pub async fn open(
        store: Arc<dyn Store>,
        key: SigningKey,
        app_key: VerifyingKey,
        limits: Limits,
    ) -> Result<Self, OpenError> {
        let public = key.verifying_key();
        Self::open_with(store, Some(key), public, app_key, limits).await
    }

    /// A read-only replica of the log `public` signs, over a store its
    /// writer keeps: it serves search, cards, proofs and entries as of the
    /// checkpoint the writer published last ([`Self::reload`] catches up),
    /// and refuses writes (FAILED_PRECONDITION). It holds no private key.
    pub async fn open_read_only(
        store: Arc<dyn Store>,
        public: VerifyingKey,
        app_key: VerifyingKey,
        limits: Limits,
    ) -> Result<Self, OpenError> {
        Self::open_with(store, None, public, app_key, limits).await
    }

    async fn open_with(
        store: Arc<dyn Store>,
        key: Option<SigningKey>,
        public: VerifyingKey,
        app_key: VerifyingKey,
        limits: Limits,
    ) -> Result<Self, OpenError> {
        let mut tree = Tree::from_leaves(store.leaf_hashes().await?);
        let published = match store.checkpoint().await? {
            Some(signed) => {
                let cp = transparency::verify_checkpoint(&signed, &public)
                    .map_err(|_| OpenError::ForeignCheckpoint)?;
                // A replica may see entries the writer stored after its
                // last checkpoint (not yet published): it leaves them out.
                if key.is_none() && cp.tree_size < tree.len() {
                    tree.truncate(cp.tree_size);
                }
                if cp.tree_size != tree.len() {
                    return Err(OpenError::Inconsistent {
                        size: cp.tree_size,
                        detail: "entry count differs",
                    });
                }
                if tree.root(cp.tree_size) != Some(cp.root_hash) {
                    return Err(OpenError::Inconsistent {
                        size: cp.tree_size,
                        detail: "root hash differs",
                    });
                }
                Published {
                    size: cp.tree_size,
                    checkpoint: signed,
                }
            }
            None if tree.is_empty() => {
                let Some(key) = &key else {
                    return Err(OpenError::NothingPublished);
                };
                let root = tree.root(0).ok_or(OpenError::Inconsistent {
                    size: 0,
                    detail: "empty root",
                })?;
                Published {
                    size: 0,
                    checkpoint: transparency::sign_checkpoint(
                        key,
                        0,
                        &root,
                        tessera_service::now_secs(),
                    ),
                }
            }
            None => {
                return Err(OpenError::Inconsistent {
                    size: tree.len(),
                    detail: "entries without a checkpoint",
                });
            }
        };
        tracing::info!(entries = tree.len(), log_id = %transparency::log_id(&public), read_only = key.is_none(), "log rebuilt from disk");
        let index = CardIndex::build(store.as_ref()).await?;
        metrics::set_gauge(KMS_LOG_ENTRIES, published.size as f64);
        Ok(Self {
            store,
            key,
            public,
            app_key,
            limits,
            write: tokio::sync::Mutex::new(()),
            tree: RwLock::new(tree),
            index: RwLock::new(index),
            published: RwLock::new(Arc::new(published)),
            failed: AtomicBool::new(false),
        })
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.public
    }

    /// Whether this is a read-only replica.
    pub fn is_read_only(&self) -> bool {
        self.key.is_none()
    }

    /// The log's private key, for writes (never on a replica).
    fn signer(&self) -> Result<&SigningKey, KmsError> {
        self.key.as_ref().ok_or_else(read_only)
    }

    /// A read-only replica catches up with the checkpoint its writer
    /// published last: the log must extend the one served so far (same
    /// root at the old size), and the new checkpoint must be the log's
    /// key's over the new root. The search index is rebuilt from the store
    /// (it answers as of any log size, so newer records do no harm) and
    /// swapped in before the new checkpoint is. `Ok(true)` when it moved.
    pub async fn reload(&self) -> Result<bool, KmsError> {
        let Some(signed) = self.store.checkpoint().await? else {
            return Ok(false);
        };
        let cp = transparency::verify_checkpoint(&signed, &self.public)
            .map_err(|_| KmsError::Internal("the stored checkpoint is not this log's"))?;
        let old = self.published()?;
        if cp.tree_size <= old.size {
            return Ok(false);
        }
        let mut leaves = self.store.leaf_hashes().await?;
        let Ok(size) = usize::try_from(cp.tree_size) else {
            return Err(KmsError::Internal("log size beyond this machine"));
        };
        if leaves.len() < size {
            // Read between the writer's entries and its checkpoint: later.
            return Ok(false);
        }
        leaves.truncate(size);
        let tree = Tree::from_leaves(leaves);
        if tree.root(cp.tree_size) != Some(cp.root_hash) {
            return Err(KmsError::Internal(
                "the stored log does not match the stored checkpoint",
            ));
        }
        let old_root = transparency::verify_checkpoint(&old.checkpoint, &self.public)
            .map_err(|_| KmsError::Internal("the served checkpoint is not this log's"))?
            .root_hash;
        if tree.root(old.size) != Some(old_root) {
            tracing::error!(
                old_size = old.size,
                new_size = cp.tree_size,
                "the stored log does not extend the one this replica served"
            );
            return Err(KmsError::Internal(
                "the stored log does not extend the one served so far",
            ));
        }
        let index = CardIndex::build(self.store.as_ref()).await?;
        *self.tree.write().map_err(lock_error)? = tree;
        *self.index.write().map_err(lock_error)? = index;
        *self.published.write().map_err(lock_error)? = Arc::new(Published {
            size: cp.tree_size,
            checkpoint: signed,
        });
        metrics::set_gauge(KMS_LOG_ENTRIES, cp.tree_size as f64);
        Ok(true)
    }

    pub fn app_key(&self) -> &VerifyingKey {
        &self.app_key
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn published(&self) -> Result<Arc<Published>, KmsError> {
        Ok(self.published.read().map_err(lock_error)?.clone())
    }

    /// The latest checkpoint and its size.
    pub fn checkpoint(&self) -> Result<(u64, SignedCheckpoint), KmsError> {
        let p = self.published()?;
        Ok((p.size, p.checkpoint.clone()))
    }

    /// A card record as the directory stood at `size` entries, or `None`
    /// when the card was not registered yet.
    async fn record_at(
        &self,
        stored: &StoredCard,
        size: u64,
    ) -> Result<Option<CardRecord>, KmsError> {
        if stored.registration_index >= size {
            return Ok(None);
        }
        let revoked = stored.revocation.is_some() && stored.revocation_index < size;
        let superseded = !stored.superseded_by.is_empty() && stored.superseded_at_index < size;
        let status = if revoked {
            CardStatus::Revoked
        } else if superseded {
            CardStatus::Superseded
        } else {
            CardStatus::Active
        };
        let entry = if stored.registration_entry.is_empty() {
            self.store
                .entry(stored.registration_index)
                .await?
                .ok_or(KmsError::Internal("registration entry missing"))?
        } else {
            stored.registration_entry.clone()
        };
        let revocation_entry = if revoked {
            self.store
                .entry(stored.revocation_index)
                .await?
                .ok_or(KmsError::Internal("revocation entry missing"))?
        } else {
            Vec::new()
        };
        // The entries are read first: no lock is held across a read.
        let tree = self.tree.read().map_err(lock_error)?;
        let revocation_inclusion = if revoked {
            Some(inclusion_proof(&tree, stored.revocation_index, size)?)
        } else {
            None
        };
        Ok(Some(CardRecord {
            status: status as i32,
            revocation: if revoked {
                stored.revocation.clone()
            } else {
                None
            },
            revocation_entry,
            revocation_inclusion,
            registration_entry: entry,
            inclusion: Some(inclusion_proof(&tree, stored.registration_index, size)?),
            superseded_by: if superseded {
                stored.superseded_by.clone()
            } else {
                Vec::new()
            },
        }))
    }

    async fn single_record(
        &self,
        stored: &StoredCard,
    ) -> Result<(CardRecord, SignedCheckpoint), KmsError> {
        let p = self.published()?;
        let record = self
            .record_at(stored, p.size)
            .await?
            .ok_or(KmsError::Internal("record not visible after append"))?;
        Ok((record, p.checkpoint.clone()))
    }

    /// Appends one entry with the card records it changes; durable and
    /// published when this returns `Ok`.
    async fn append(
        &self,
        entry: Vec<u8>,
        mut cards: Vec<StoredCard>,
        mut device_list: Option<StoredDeviceList>,
        set_index: impl Fn(&mut [StoredCard], u64),
    ) -> Result<u64, KmsError> {
        let index = self.tree.read().map_err(lock_error)?.len();
        set_index(&mut cards, index);
        if let Some(list) = &mut device_list {
            list.indices.push(index);
        }
        let leaf_hash = transparency::leaf_hash(&entry);
        let root = {
            let mut tree = self.tree.write().map_err(lock_error)?;
            tree.push(leaf_hash);
            tree.root(index + 1)
                .ok_or(KmsError::Internal("root of new size"))?
        };
        let checkpoint = transparency::sign_checkpoint(
            self.signer()?,
            index + 1,
            &root,
            tessera_service::now_secs(),
        );
        let indexed = (cards.clone(), device_list.clone());
        let mut fetched = Fetched::from([(index, entry.clone())]);
        let applied = self
            .store
            .apply(Append {
                index,
                entry,
                leaf_hash,
                cards,
                device_list,
                checkpoint: checkpoint.clone(),
            })
            .await;
        if let Err(e) = applied {
            // Nothing was written: undo the in-memory append.
            self.tree.write().map_err(lock_error)?.truncate(index);
            return Err(e.into());
        }
        // Readers see the indexed change only once it is published.
        let missing: Vec<u64> = self
            .index
            .read()
            .map_err(lock_error)?
            .missing(&indexed.0, indexed.1.as_ref())
            .into_iter()
            .filter(|i| !fetched.contains_key(i))
            .collect();
        let reindexed = match index::fetch(self.store.as_ref(), missing).await {
            Ok(more) => {
                fetched.extend(more);
                self.index.write().map_err(lock_error)?.update(
                    &indexed.0,
                    indexed.1.as_ref(),
                    &fetched,
                )
            }
            Err(e) => Err(e),
        };
        let flushed = match reindexed {
            Ok(()) => self.store.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = flushed {
            // Written but maybe not durable (or not indexed): the in-memory
            // state can no longer be trusted to match the disk. Stop
            // accepting writes; a restart rebuilds from what is on disk.
            self.failed.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "flush or index update failed; refusing further writes");
            return Err(KmsError::Unavailable);
        }
        *self.published.write().map_err(lock_error)? = Arc::new(Published {
            size: index + 1,
            checkpoint,
        });
        metrics::set_gauge(KMS_LOG_ENTRIES, (index + 1) as f64);
        Ok(index)
    }

    fn check_writable(&self) -> Result<(), KmsError> {
        if self.key.is_none() {
            return Err(read_only());
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(KmsError::Unavailable);
        }
        Ok(())
    }

    /// Registers a card carrying valid self and app signatures.
    pub async fn register(
        &self,
        card: card_pb::Card,
    ) -> Result<(CardRecord, SignedCheckpoint), KmsError> {
        tessera_service::limits::check_len(
            "content_snapshot",
            card.content_snapshot.len(),
            self.limits.max_snapshot_bytes,
        )
        .map_err(|s| KmsError::InvalidArgument(s.message().to_owned()))?;
        let parsed =
            ParsedCard::parse(card).map_err(|e| KmsError::InvalidArgument(e.to_string()))?;
        parsed
            .check_self_signature()
            .map_err(|e| KmsError::InvalidArgument(e.to_string()))?;
        parsed
            .check_signature(SignatureRole::App, &self.app_key)
            .map_err(|e| {
                KmsError::PermissionDenied(format!("{e}: only cards the app signed are accepted"))
            })?;

        let _write = self.write.lock().await;
        self.check_writable()?;
        let id = parsed.id();
        if let Some(existing) = self.store.card(&id).await? {
            // Same snapshot, same id: registering again is a no-op.
            return self.single_record(&existing).await;
        }
        let mut changed = Vec::new();
        let others = self.store.cards_of(parsed.identity()).await?;
        let active = others
            .iter()
            .filter(|c| c.revocation.is_none() && c.superseded_by.is_empty())
            .count();
        if active >= self.limits.max_active_cards_per_identity {
            return Err(KmsError::ResourceExhausted(format!(
                "{} already has {active} active cards; the limit is {}",
                parsed.identity(),
                self.limits.max_active_cards_per_identity
            )));
        }
        if let Some(previous) = parsed.previous_card_id() {
            let mut prev = self.store.card(&previous).await?.ok_or_else(|| {
                KmsError::FailedPrecondition(format!(
                    "previous card {previous} is not in the directory"
                ))
            })?;
            if prev.identity != parsed.identity() || prev.kind != parsed.kind().to_proto() as i32 {
                return Err(KmsError::FailedPrecondition(
                    "previous card belongs to another identity or kind".into(),
                ));
            }
            if prev.revocation.is_some() || !prev.superseded_by.is_empty() {
                return Err(KmsError::FailedPrecondition(format!(
                    "previous card {previous} is no longer active"
                )));
            }
            prev.superseded_by = id.to_vec();
            changed.push(prev);
        }

        let identity = parsed.identity().to_owned();
        let kind = parsed.kind();
        let mut card = parsed.into_card();
        tessera_card::kms_sign(&mut card, self.signer()?);
        let entry = transparency::registration_entry(&card, &identity, tessera_service::now_secs());
        let new_record = StoredCard {
            registration_entry: entry.clone(),
            card: Some(card),
            identity,
            kind: kind.to_proto() as i32,
            registration_index: 0,
            revocation: None,
            revocation_index: 0,
            superseded_by: Vec::new(),
            superseded_at_index: 0,
        };
        changed.insert(0, new_record);
        self.append(entry, changed, None, |cards, index| {
            cards[0].registration_index = index;
            for prev in &mut cards[1..] {
                prev.superseded_at_index = index;
            }
        })
        .await?;
        let stored = self
            .store
            .card(&id)
            .await?
            .ok_or(KmsError::Internal("card missing after append"))?;
        let (record, checkpoint) = self.single_record(&stored).await?;
        tracing::info!(card_id = %id, identity = %stored.identity, "card registered");
        metrics::increment(KMS_CARDS_REGISTERED);
        Ok((record, checkpoint))
    }

    /// Revokes a card with a revocation signed by its own key or the AppKey.
    pub async fn revoke(
        &self,
        caller: &Caller,
        revocation: card_pb::Revocation,
    ) -> Result<(CardRecord, SignedCheckpoint), KmsError> {
        let parsed = ParsedRevocation::parse(revocation)
            .map_err(|e| KmsError::InvalidArgument(e.to_string()))?;
        let _write = self.write.lock().await;
        self.check_writable()?;
        let id = parsed.card_id();
        let mut stored = self
            .store
            .card(&id)
            .await?
            .ok_or_else(|| KmsError::NotFound(format!("no card {id}")))?;
        let card = ParsedCard::parse(stored.card.clone().unwrap_or_default())
            .map_err(|_| KmsError::Internal("stored card does not parse"))?;
        parsed.verify(&card, &self.app_key).map_err(|e| {
            tracing::warn!(card_id = %id, caller = %caller.identity, "refused revocation: {e}");
            KmsError::PermissionDenied(format!(
                "{e}: a revocation must be signed by the card's own key or by the AppKey"
            ))
        })?;
        if stored.revocation.is_some() {
            return self.single_record(&stored).await;
        }
        // The signer chooses `revoked_at`; clients date a revocation by its
        // log entry, but a date before the card existed is refused outright.
        let registration = match stored.registration_entry.is_empty() {
            false => stored.registration_entry.clone(),
            true => self
                .store
                .entry(stored.registration_index)
                .await?
                .ok_or(KmsError::Internal("registration entry missing"))?,
        };
        if let Ok(transparency::LogEvent::Registered { appended_at, .. }) =
            transparency::parse_entry(&registration)
            && parsed.revoked_at() < appended_at - REVOCATION_SKEW_SECS
        {
            return Err(KmsError::InvalidArgument(format!(
                "the revocation is dated {}, before the card was registered ({appended_at})",
                parsed.revoked_at()
            )));
        }
        let entry = transparency::revocation_entry(
            parsed.revocation(),
            &stored.identity,
            tessera_service::now_secs(),
        );
        stored.revocation = Some(parsed.revocation().clone());
        self.append(entry, vec![stored], None, |cards, index| {
            cards[0].revocation_index = index
        })
        .await?;
        let stored = self
            .store
            .card(&id)
            .await?
            .ok_or(KmsError::Internal("card missing after revocation"))?;
        tracing::info!(card_id = %id, by = %parsed.revoked_by(), "card revoked");
        metrics::increment(KMS_CARDS_REVOKED);
        self.single_record(&stored).await
    }

    /// A stored card as a verified card (the directory checked its
    /// signatures when it registered it) and whether it is active now.
    async fn verified_card(&self, id: &CardId) -> Result<Option<(VerifiedCard, bool)>, KmsError> {
        let Some(stored) = self.store.card(id).await? else {
            return Ok(None);
        };
        if stored.kind != CardKind::Client.to_proto() as i32 {
            return Err(KmsError::FailedPrecondition(format!(
                "{id} is not a client card"
            )));
        }
        let verified = Verifier::new(self.app_key, self.public)
            .verify(
                &stored.card.clone().unwrap_or_default(),
                None,
                CardKind::Client,
            )
            .map_err(|_| KmsError::Internal("a stored card does not verify"))?;
        let active = stored.revocation.is_none() && stored.superseded_by.is_empty();
        Ok(Some((verified, active)))
    }

    /// Appends a device list statement after checking it extends the
    /// identity's list (the same rules every client applies): signed by the
    /// card it names, that card a trusted and active device of the identity
    /// (or, for a genesis or reset, the subject itself with the AppKey's
    /// co-signature), naming the current head. A statement signed against an
    /// older head is ABORTED: the device refetches and signs again. Publishing
    /// the same statement again returns it as logged.
    pub async fn publish(
        &self,
        caller: &Caller,
        signed: card_pb::SignedDeviceStatement,
    ) -> Result<(LoggedStatement, SignedCheckpoint), KmsError> {
        tessera_service::limits::check_len(
            "statement",
            signed.statement.len(),
            self.limits.max_statement_bytes,
        )
        .map_err(|s| KmsError::InvalidArgument(s.message().to_owned()))?;
        let statement =
            ParsedStatement::parse(signed).map_err(|e| KmsError::InvalidArgument(e.to_string()))?;
        let identity = statement.identity().to_owned();
        if caller.role != Role::Service && caller.identity != identity {
            return Err(KmsError::PermissionDenied(format!(
                "{} cannot publish to the device list of {identity}",
                caller.identity
            )));
        }
        let _write = self.write.lock().await;
        self.check_writable()?;
        let stored = self.store.device_list(&identity).await?;
        let mut state = match &stored {
            None => DeviceListState::empty(&identity),
            Some(list) => stored_state(list)?,
        };
        if let Some(list) = &stored
            && let Some(&index) = list.indices.get(statement.seqno() as usize)
        {
            let entry = self
                .store
                .entry(index)
                .await?
                .ok_or(KmsError::Internal("statement entry missing"))?;
            let same = matches!(
                transparency::parse_entry(&entry),
                Ok(transparency::LogEvent::DeviceStatement { statement: s, .. }) if s == *statement.signed()
            );
            if same {
                return self.logged_statement(index, &entry);
            }
        }
        let (signer, signer_active) =
            self.verified_card(&statement.signer())
                .await?
                .ok_or_else(|| {
                    KmsError::FailedPrecondition(format!("no card {}", statement.signer()))
                })?;
        if !signer_active {
            return Err(KmsError::PermissionDenied(format!(
                "the signer {} is revoked or replaced",
                statement.signer()
            )));
        }
        if statement.action() != device_list::Action::Remove {
            match self.verified_card(&statement.subject()).await? {
                Some((card, true)) if card.identity() == identity => {}
                Some(_) => {
                    return Err(KmsError::FailedPrecondition(format!(
                        "{} is not an active card of {identity}",
                        statement.subject()
                    )));
                }
                None => {
                    return Err(KmsError::FailedPrecondition(format!(
                        "no card {}",
                        statement.subject()
                    )));
                }
            }
        }
        state
            .apply(&statement, &signer, &self.app_key)
            .map_err(|e| match e {
                DeviceListError::Stale { .. } => KmsError::Aborted(e.to_string()),
                DeviceListError::Full => KmsError::ResourceExhausted(format!("{identity}: {e}")),
                DeviceListError::SignerNotTrusted(_)
                | DeviceListError::BadSignature
                | DeviceListError::BadAppSignature(_)
                | DeviceListError::SignerMismatch => KmsError::PermissionDenied(e.to_string()),
                other => KmsError::FailedPrecondition(other.to_string()),
            })?;
        let entry = transparency::device_statement_entry(
            statement.signed(),
            &identity,
            tessera_service::now_secs(),
        );
        let mut list = stored.unwrap_or_else(|| StoredDeviceList {
            identity: identity.clone(),
            ..Default::default()
        });
        list.head = state.head().map(|h| h.to_vec()).unwrap_or_default();
        list.trusted = state.trusted().iter().map(CardId::to_vec).collect();
        let index = self
            .append(entry.clone(), Vec::new(), Some(list), |_, _| {})
            .await?;
        tracing::info!(%identity, seqno = statement.seqno(), action = %statement.action(), subject = %statement.subject(), "device list statement logged");
        self.logged_statement(index, &entry)
    }

    fn logged_statement(
        &self,
        index: u64,
        entry: &[u8],
    ) -> Result<(LoggedStatement, SignedCheckpoint), KmsError> {
        let p = self.published()?;
        let tree = self.tree.read().map_err(lock_error)?;
        let hashes = tree
            .inclusion_proof(index, p.size)
            .ok_or(KmsError::Internal("statement not visible after append"))?;
        Ok((
            LoggedStatement {
                entry: entry.to_vec(),
                inclusion: Some(transparency::inclusion_proof_message(index, p.size, hashes)),
            },
            p.checkpoint.clone(),
        ))
    }

    /// `identity`'s device list as it stood at `size` entries, from
    /// sequence number `from` on; truncated (no statements) when it would
    /// carry more than `budget` statements.
    fn device_list_at(
        &self,
        index: &CardIndex,
        identity: &str,
        from: u64,
        size: u64,
        tree: &Tree,
        budget: usize,
    ) -> Result<DeviceList, KmsError> {
        // Statements appended after the published checkpoint do not exist yet.
        let visible: Vec<&(u64, Box<[u8]>)> = index
            .statements(identity)
            .iter()
            .filter(|(i, _)| *i < size)
            .collect();
        let wanted = &visible[(from.min(visible.len() as u64) as usize)..];
        if wanted.len() > budget {
            return Ok(DeviceList {
                length: visible.len() as u64,
                statements: Vec::new(),
                truncated: true,
                trusted_card_ids: Vec::new(),
            });
        }
        let mut statements = Vec::with_capacity(wanted.len());
        for (index, entry) in wanted {
            statements.push(LoggedStatement {
                entry: entry.to_vec(),
                inclusion: Some(inclusion_proof(tree, *index, size)?),
            });
        }
        Ok(DeviceList {
            length: visible.len() as u64,
            statements,
            truncated: false,
            trusted_card_ids: Vec::new(),
        })
    }

    /// `identity`'s device list from sequence number `from` on, as of the
    /// latest checkpoint.
    pub async fn device_list(
        &self,
        identity: &str,
        from: u64,
    ) -> Result<(DeviceList, SignedCheckpoint), KmsError> {
        tessera_service::limits::identity("identity", identity)
            .map_err(|s| KmsError::InvalidArgument(s.message().to_owned()))?;
        let p = self.published()?;
        let trusted = self
            .store
            .device_list(identity)
            .await?
            .map(|l| l.trusted)
            .unwrap_or_default();
        let tree = self.tree.read().map_err(lock_error)?;
        let index = self.index.read().map_err(lock_error)?;
        let mut list = self.device_list_at(&index, identity, from, p.size, &tree, usize::MAX)?;
        list.trusted_card_ids = trusted;
        Ok((list, p.checkpoint.clone()))
    }

    /// Every active card of each identity, as of the latest checkpoint.
    pub fn search(
        &self,
        identities: &[String],
        kind: Option<CardKind>,
        device_list_from: &std::collections::HashMap<String, u64>,
    ) -> Result<(Vec<IdentityCards>, SignedCheckpoint), KmsError> {
        if identities.len() > self.limits.max_identities_per_search {
            return Err(KmsError::InvalidArgument(format!(
                "{} identities in one search; the limit is {}",
                identities.len(),
                self.limits.max_identities_per_search
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for identity in identities {
            tessera_service::limits::identity("identity", identity)
                .map_err(|s| KmsError::InvalidArgument(s.message().to_owned()))?;
            if !seen.insert(identity) {
                return Err(KmsError::InvalidArgument(format!(
                    "{identity} is asked for twice"
                )));
            }
        }
        let mut statement_budget = self.limits.max_statements_per_search;
        let p = self.published()?;
        let tree = self.tree.read().map_err(lock_error)?;
        let index = self.index.read().map_err(lock_error)?;
        let kind_code = kind.map(|k| k.to_proto() as i32);
        let mut results = Vec::with_capacity(identities.len());
        for identity in identities {
            let cards = index
                .active(identity, kind_code, p.size)
                .map(|card| {
                    Ok(CardRecord {
                        status: CardStatus::Active as i32,
                        registration_entry: card.registration_entry.to_vec(),
                        inclusion: Some(inclusion_proof(&tree, card.registration_index, p.size)?),
                        ..CardRecord::default()
                    })
                })
                .collect::<Result<_, KmsError>>()?;
            let device_list = if kind.is_none_or(|k| k == CardKind::Client) {
                let from = device_list_from.get(identity).copied().unwrap_or(0);
                let list =
                    self.device_list_at(&index, identity, from, p.size, &tree, statement_budget)?;
                statement_budget -= list.statements.len();
                Some(list)
            } else {
                None
            };
            results.push(IdentityCards {
                identity: identity.clone(),
                cards,
                device_list,
            });
        }
        Ok((results, p.checkpoint.clone()))
    }

    /// One card by id, whatever its status.
    pub async fn get(&self, id: &CardId) -> Result<(CardRecord, SignedCheckpoint), KmsError> {
        let p = self.published()?;
        let stored = self
            .store
            .card(id)
            .await?
            .ok_or_else(|| KmsError::NotFound(format!("no card {id}")))?;
        let record = self
            .record_at(&stored, p.size)
            .await?
            .ok_or_else(|| KmsError::NotFound(format!("no card {id}")))?;
        Ok((record, p.checkpoint.clone()))
    }

    fn resolve_size(&self, requested: u64, latest: u64) -> Result<u64, KmsError> {
        match requested {
            0 => Ok(latest),
            s if s > latest => Err(KmsError::OutOfRange(format!(
                "tree size {s} is beyond the latest checkpoint ({latest})"
            ))),
            s => Ok(s),
        }
    }

    pub fn consistency(
        &self,
        old: u64,
        new: u64,
    ) -> Result<(ConsistencyProof, SignedCheckpoint), KmsError> {
        let p = self.published()?;
        let new = self.resolve_size(new, p.size)?;
        if old > new {
            return Err(KmsError::InvalidArgument(format!(
                "old size {old} is larger than new size {new}"
            )));
        }
        let hashes = self
            .tree
            .read()
            .map_err(lock_error)?
            .consistency_proof(old, new)
            .ok_or(KmsError::Internal("consistency proof out of range"))?;
        Ok((
            transparency::consistency_proof_message(old, new, hashes),
            p.checkpoint.clone(),
        ))
    }

    pub async fn inclusion(
        &self,
        index: u64,
        size: u64,
    ) -> Result<(InclusionProof, Vec<u8>, SignedCheckpoint), KmsError> {
        let p = self.published()?;
        let size = self.resolve_size(size, p.size)?;
        if index >= size {
            return Err(KmsError::OutOfRange(format!(
                "leaf {index} is beyond the tree of size {size}"
            )));
        }
        let hashes = self
            .tree
            .read()
            .map_err(lock_error)?
            .inclusion_proof(index, size)
            .ok_or(KmsError::Internal("inclusion proof out of range"))?;
        let entry = self
            .store
            .entry(index)
            .await?
            .ok_or(KmsError::Internal("log entry missing"))?;
        Ok((
            transparency::inclusion_proof_message(index, size, hashes),
            entry,
            p.checkpoint.clone(),
        ))
    }

    pub async fn entries(
        &self,
        from: u64,
        limit: u32,
    ) -> Result<(Vec<Vec<u8>>, SignedCheckpoint), KmsError> {
        let limit = tessera_service::limits::page_size(limit, 100, self.limits.max_page_size)
            .map_err(|s| KmsError::InvalidArgument(s.message().to_owned()))?;
        let p = self.published()?;
        if from > p.size {
            return Err(KmsError::OutOfRange(format!(
                "index {from} is beyond the log's size {}",
                p.size
            )));
        }
        let available = (p.size - from).min(limit as u64) as usize;
        Ok((
            self.store.entries(from, available).await?,
            p.checkpoint.clone(),
        ))
    }

    /// The checkpoint's verified form (for tests and logs).
    pub fn verified_checkpoint(&self) -> Result<VerifiedCheckpoint, KmsError> {
        let p = self.published()?;
        transparency::verify_checkpoint(&p.checkpoint, &self.public)
            .map_err(|_| KmsError::Internal("own checkpoint does not verify"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_card::{NewCard, app_sign};
    use tessera_crypto::DeviceKeys;
    use tessera_service::{
        TokenIssuer, TokenVerifier,
        token::{Audience, AuthMethod, Grant, bearer_header},
    };

    use super::*;
    use crate::store::MemoryStore;

    async fn directory(store: MemoryStore, key: SigningKey, app: &SigningKey) -> Directory {
        Directory::open(Arc::new(store), key, app.verifying_key(), Limits::default())
            .await
            .unwrap()
    }

    fn card(app: &SigningKey, identity: &str) -> card_pb::Card {
        let mut card = NewCard {
            identity,
            kind: CardKind::Client,
            device_name: "d",
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&DeviceKeys::generate().unwrap())
        .unwrap();
        app_sign(&mut card, app);
        card
    }

    #[tokio::test]
    async fn directory_over_the_memory_store() {
        let app = SigningKey::generate().unwrap();
        let key_seed = [7u8; 32];
        let store = MemoryStore::default();
        let dir = directory(
            store.clone(),
            SigningKey::from_seed(&key_seed).unwrap(),
            &app,
        )
        .await;
        let (record, _) = dir.register(card(&app, "alice")).await.unwrap();
        dir.register(card(&app, "alice")).await.unwrap();
        let (found, cp) = dir
            .search(&["alice".into()], None, &Default::default())
            .unwrap();
        assert_eq!(found[0].cards.len(), 2);

        let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(60));
        let caller = TokenVerifier::new(issuer.public_key(), Audience::Kms)
            .verify_header(&bearer_header(
                &issuer
                    .issue(&Grant::user("alice", AuthMethod::Password), Audience::Kms)
                    .unwrap()
                    .bytes,
            ))
            .unwrap();
        let id = CardId::of_snapshot(
            &transparency::registered_card(&record.registration_entry)
                .unwrap()
                .content_snapshot,
        );
        let revocation = tessera_card::revocation::sign_revocation(
            id,
            tessera_card::revocation::RevokedBy::App,
            &app,
            "",
            tessera_service::now_secs(),
        )
        .unwrap();
        dir.revoke(&caller, revocation).await.unwrap();
        assert_eq!(
            dir.search(&["alice".into()], None, &Default::default())
                .unwrap()
                .0[0]
                .cards
                .len(),
            1
        );

        // Reopening over the same store rebuilds the same log and index.
        let reopened = directory(store, SigningKey::from_seed(&key_seed).unwrap(), &app).await;
        assert_eq!(reopened.verified_checkpoint().unwrap().tree_size, 3);
        assert_eq!(
            reopened
                .search(&["alice".into()], None, &Default::default())
                .unwrap()
                .0,
            dir.search(&["alice".into()], None, &Default::default())
                .unwrap()
                .0
        );
        assert_eq!(
            reopened.verified_checkpoint().unwrap().root_hash,
            dir.verified_checkpoint().unwrap().root_hash
        );
        let _ = cp;
    }

    #[tokio::test]
    async fn a_store_signed_by_another_key_is_refused() {
        let app = SigningKey::generate().unwrap();
        let store = MemoryStore::default();
        let dir = directory(store.clone(), SigningKey::generate().unwrap(), &app).await;
        dir.register(card(&app, "bob")).await.unwrap();
        let other = Directory::open(
            Arc::new(store),
            SigningKey::generate().unwrap(),
            app.verifying_key(),
            Limits::default(),
        )
        .await;
        assert!(matches!(other, Err(OpenError::ForeignCheckpoint)));
    }

    #[tokio::test]
    async fn reads_see_the_directory_as_of_the_published_checkpoint() {
        let app = SigningKey::generate().unwrap();
        let dir = directory(
            MemoryStore::default(),
            SigningKey::generate().unwrap(),
            &app,
        )
        .await;
        let (record, _) = dir.register(card(&app, "carol")).await.unwrap();
        let stored = dir
            .store
            .card(&CardId::of_snapshot(
                &transparency::registered_card(&record.registration_entry)
                    .unwrap()
                    .content_snapshot,
            ))
            .await
            .unwrap()
            .unwrap();
        // At size 0 the card did not exist yet; at size 1 it is active.
        assert!(dir.record_at(&stored, 0).await.unwrap().is_none());
        assert_eq!(
            dir.record_at(&stored, 1).await.unwrap().unwrap().status,
            CardStatus::Active as i32
        );
    }
}
