//! The key service's append-only Merkle log (RFC 9162 section 2.1 hashing):
//! the tree that computes roots and proofs (key-service side), signed
//! checkpoints, and the proof checks clients run (with `ct-merkle`, an
//! independent implementation of the same RFC).
//!
//! `leaf_hash(e) = SHA-256(0x00 || e)`, `node_hash(l, r) = SHA-256(0x01 || l || r)`,
//! the root of the empty tree is `SHA-256("")`.

use ct_merkle::{ConsistencyProof as CtConsistency, InclusionProof as CtInclusion, RootHash};
use sha2::Sha256;
use tessera_crypto::{SignatureContext, SigningKey, VerifyingKey};
use tessera_proto::{
    Bytes, Message as _,
    card::v1 as card_pb,
    transparency::v1::{
        CheckpointContent, ConsistencyProof, InclusionProof, LogEntry, SignedCheckpoint,
        log_entry::Event,
    },
};

use crate::{CardError, VERSION};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Most hashes a proof may carry (a tree of 2^64 leaves needs 64).
pub const MAX_PROOF_HASHES: usize = 64;

pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[0x00]);
    ctx.update(entry);
    to_hash(ctx.finish().as_ref())
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    to_hash(ctx.finish().as_ref())
}

fn to_hash(bytes: &[u8]) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(bytes);
    out
}

/// Largest power of two strictly less than `n` (n >= 2).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The Merkle tree over the log's leaf hashes. It stores the hash of every
/// complete, aligned subtree (2n hashes for n leaves), so any root, inclusion
/// proof or consistency proof for any past size takes O(log n) stored hashes
/// (O(log² n) for a past size that is not a power of two).
#[derive(Default, Debug)]
pub struct Tree {
    /// `levels[k][i]` is the hash of leaves `i * 2^k .. (i + 1) * 2^k`.
    levels: Vec<Vec<Hash>>,
    /// Hashes of incomplete subtrees (the right edge of past sizes) already
    /// computed: every proof at one tree size needs the same few.
    edges: std::sync::Mutex<std::collections::HashMap<(u64, u64), Hash>>,
}

impl Clone for Tree {
    fn clone(&self) -> Self {
        Self {
            levels: self.levels.clone(),
            edges: Default::default(),
        }
    }
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a leaf hash; returns its index.
    pub fn push(&mut self, leaf: Hash) -> u64 {
        let index = self.len();
        // Incomplete subtrees ending at the old size stay valid (they are
        // keyed by their range), but keep the memo small.
        if let Ok(edges) = self.edges.get_mut()
            && edges.len() > 4096
        {
            edges.clear();
        }
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(hash);
            let len = self.levels[level].len();
            if len % 2 == 1 {
                break;
            }
            hash = node_hash(&self.levels[level][len - 2], &self.levels[level][len - 1]);
            level += 1;
        }
        index
    }

    /// Drops every leaf from `len` on (undoing appends that could not be stored).
    pub fn truncate(&mut self, len: u64) {
        if let Ok(edges) = self.edges.get_mut() {
            edges.retain(|(_, end), _| *end <= len);
        }
        for (level, hashes) in self.levels.iter_mut().enumerate() {
            hashes.truncate((len >> level) as usize);
        }
        while self.levels.last().is_some_and(Vec::is_empty) {
            self.levels.pop();
        }
    }

    /// Builds the tree over `leaves` in order.
    pub fn from_leaves(leaves: impl IntoIterator<Item = Hash>) -> Self {
        let mut tree = Self::new();
        for leaf in leaves {
            tree.push(leaf);
        }
        tree
    }

    /// MTH(D[start..end]); `start` is aligned to the largest power of two
    /// not above `end - start`, as in every range the RFC recursions visit.
    fn subtree(&self, start: u64, end: u64) -> Hash {
        let n = end - start;
        if n.is_power_of_two() {
            let level = n.trailing_zeros() as usize;
            return self.levels[level][(start >> level) as usize];
        }
        if let Some(hash) = self
            .edges
            .lock()
            .ok()
            .and_then(|e| e.get(&(start, end)).copied())
        {
            return hash;
        }
        let k = split_point(n);
        let hash = node_hash(
            &self.subtree(start, start + k),
            &self.subtree(start + k, end),
        );
        if let Ok(mut edges) = self.edges.lock() {
            edges.insert((start, end), hash);
        }
        hash
    }

    /// Root hash of the first `size` leaves.
    pub fn root(&self, size: u64) -> Option<Hash> {
        match size {
            0 => Some(to_hash(
                ring::digest::digest(&ring::digest::SHA256, b"").as_ref(),
            )),
            s if s <= self.len() => Some(self.subtree(0, s)),
            _ => None,
        }
    }

    /// RFC 9162 inclusion proof of leaf `index` in the tree of `size` leaves.
    ///
    /// Walked bottom-up, level by level: the node covering the leaf at
    /// level `l` is `index >> l`, and its sibling (when the tree of `size`
    /// has one) is the hash the RFC's PATH recursion emits at that depth. A
    /// sibling to the left is always a complete subtree, one to the right
    /// is complete unless it is the tree's right edge, and a node alone at
    /// the right edge is its only child's hash moved up (no hash emitted).
    /// Every stored hash the walk reads is known from `index` and `size`
    /// alone, so the reads (cache misses in the large bottom levels of a
    /// big tree) overlap instead of waiting on each other.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        if index >= size || size > self.len() {
            return None;
        }
        let mut out = Vec::with_capacity(64 - (size - 1).leading_zeros() as usize);
        let (mut node, mut last) = (index, size - 1);
        let mut level = 0;
        while last > 0 {
            if node % 2 == 1 {
                out.push(self.levels[level][(node - 1) as usize]);
            } else if node < last {
                let start = (node + 1) << level;
                let end = ((node + 2) << level).min(size);
                out.push(if end - start == 1 << level {
                    self.levels[level][(node + 1) as usize]
                } else {
                    self.subtree(start, end)
                });
            }
            node >>= 1;
            last >>= 1;
            level += 1;
        }
        Some(out)
    }

    /// RFC 9162 consistency proof from the tree of `old` leaves to the tree
    /// of `new` leaves (empty when `old` is 0 or equals `new`).
    pub fn consistency_proof(&self, old: u64, new: u64) -> Option<Vec<Hash>> {
        if old > new || new > self.len() {
            return None;
        }
        let mut out = Vec::new();
        if old > 0 && old < new {
            self.subproof(old, 0, new, true, &mut out);
        }
        Some(out)
    }

    fn subproof(&self, m: u64, start: u64, end: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = end - start;
        if m == n {
            if !complete {
                out.push(self.subtree(start, end));
            }
            return;
        }
        let k = split_point(n);
        if m <= k {
            self.subproof(m, start, start + k, complete, out);
            out.push(self.subtree(start + k, end));
        } else {
            self.subproof(m - k, start + k, end, false, out);
            out.push(self.subtree(start, start + k));
        }
    }
}

/// The log id of the key service whose public key is `key`.
pub fn log_id(key: &VerifyingKey) -> String {
    let digest = tessera_crypto::sha256(key.as_bytes());
    format!("tessera-kms/{}", hex::encode(&digest[..8]))
}

/// Signs a checkpoint (size, root, time) with the key service's key.
pub fn sign_checkpoint(
    key: &SigningKey,
    tree_size: u64,
    root_hash: &Hash,
    timestamp: i64,
) -> SignedCheckpoint {
    let content_snapshot = CheckpointContent {
        version: VERSION,
        log_id: log_id(&key.verifying_key()),
        tree_size,
        root_hash: root_hash.to_vec(),
        timestamp,
    }
    .encode_to_vec();
    let signature = key
        .sign(SignatureContext::Checkpoint, &content_snapshot)
        .to_vec();
    SignedCheckpoint {
        content_snapshot,
        signature,
    }
}

/// A checkpoint whose signature verified against the pinned key-service key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    pub log_id: String,
    pub tree_size: u64,
    pub root_hash: Hash,
    pub timestamp: i64,
    /// The checkpoint as received, to store and show to others.
    pub signed: SignedCheckpoint,
}

/// Verifies a signed checkpoint against the pinned key-service key.
pub fn verify_checkpoint(
    signed: &SignedCheckpoint,
    kms_key: &VerifyingKey,
) -> Result<VerifiedCheckpoint, CardError> {
    kms_key
        .verify(
            SignatureContext::Checkpoint,
            &signed.content_snapshot,
            &signed.signature,
        )
        .map_err(|_| CardError::BadCheckpointSignature)?;
    let c = CheckpointContent::decode(signed.content_snapshot.as_slice())
        .map_err(|_| CardError::MalformedCheckpoint("not a CheckpointContent"))?;
    if c.version != VERSION {
        return Err(CardError::UnsupportedVersion(c.version));
    }
    let expected = log_id(kms_key);
    if c.log_id != expected {
        return Err(CardError::WrongLog {
            expected,
            found: c.log_id,
        });
    }
    let root_hash: Hash = c
        .root_hash
        .as_slice()
        .try_into()
        .map_err(|_| CardError::MalformedCheckpoint("root hash must be 32 bytes"))?;
    Ok(VerifiedCheckpoint {
        log_id: c.log_id,
        tree_size: c.tree_size,
        root_hash,
        timestamp: c.timestamp,
        signed: signed.clone(),
    })
}

fn concat_hashes(
    hashes: &[impl AsRef<[u8]>],
    err: fn(&'static str) -> CardError,
) -> Result<Vec<u8>, CardError> {
    if hashes.len() > MAX_PROOF_HASHES {
        return Err(err("too many hashes"));
    }
    let mut out = Vec::with_capacity(hashes.len() * 32);
    for h in hashes {
        let h = h.as_ref();
        if h.len() != 32 {
            return Err(err("a hash is not 32 bytes"));
        }
        out.extend_from_slice(h);
    }
    Ok(out)
}

fn ct_root(checkpoint: &VerifiedCheckpoint) -> RootHash<Sha256> {
    RootHash::new(checkpoint.root_hash.into(), checkpoint.tree_size)
}

/// Checks that `entry` (exact LogEntry bytes) is leaf `proof.leaf_index` of
/// the tree `checkpoint` commits to.
pub fn verify_inclusion(
    checkpoint: &VerifiedCheckpoint,
    entry: &[u8],
    proof: &InclusionProof,
) -> Result<(), CardError> {
    if proof.tree_size != checkpoint.tree_size {
        return Err(CardError::BadInclusionProof(
            "proof is for another tree size",
        ));
    }
    if proof.leaf_index >= checkpoint.tree_size {
        return Err(CardError::BadInclusionProof("leaf index beyond the tree"));
    }
    let bytes = concat_hashes(&proof.hashes, CardError::BadInclusionProof)?;
    ct_root(checkpoint)
        .verify_inclusion(
            &entry,
            proof.leaf_index,
            &CtInclusion::<Sha256>::from_bytes(bytes),
        )
        .map_err(|_| CardError::BadInclusionProof("hashes do not lead to the checkpoint's root"))
}

/// Checks that the tree of `old` is a prefix of the tree of `new`.
pub fn verify_consistency(
    old: &VerifiedCheckpoint,
    new: &VerifiedCheckpoint,
    proof: &ConsistencyProof,
) -> Result<(), CardError> {
    if old.tree_size > new.tree_size {
        return Err(CardError::BadConsistencyProof(
            "the new checkpoint is smaller than the old",
        ));
    }
    if proof.old_size != old.tree_size || proof.new_size != new.tree_size {
        return Err(CardError::BadConsistencyProof(
            "proof is for other tree sizes",
        ));
    }
    if old.tree_size == new.tree_size {
        return if old.root_hash == new.root_hash && proof.hashes.is_empty() {
            Ok(())
        } else {
            Err(CardError::BadConsistencyProof(
                "two different roots for the same size",
            ))
        };
    }
    if old.tree_size == 0 {
        return Ok(()); // the empty tree is a prefix of every tree
    }
    let bytes = concat_hashes(&proof.hashes, CardError::BadConsistencyProof)?;
    let proof = CtConsistency::<Sha256>::try_from_bytes(bytes)
        .map_err(|_| CardError::BadConsistencyProof("malformed proof"))?;
    ct_root(new)
        .verify_consistency(&ct_root(old), &proof)
        .map_err(|_| CardError::BadConsistencyProof("hashes do not join the two roots"))
}

/// The encoded leaf for a card registration.
pub fn registration_entry(card: &card_pb::Card, identity: &str, appended_at: i64) -> Vec<u8> {
    LogEntry {
        version: VERSION,
        appended_at,
        identity: identity.to_owned(),
        event: Some(Event::CardRegistered(card.clone())),
    }
    .encode_to_vec()
}

/// The encoded leaf for a revocation.
pub fn revocation_entry(
    revocation: &card_pb::Revocation,
    identity: &str,
    appended_at: i64,
) -> Vec<u8> {
    LogEntry {
        version: VERSION,
        appended_at,
        identity: identity.to_owned(),
        event: Some(Event::CardRevoked(revocation.clone())),
    }
    .encode_to_vec()
}

/// The encoded leaf for a device list statement (protocol v2).
pub fn device_statement_entry(
    statement: &card_pb::SignedDeviceStatement,
    identity: &str,
    appended_at: i64,
) -> Vec<u8> {
    LogEntry {
        version: VERSION,
        appended_at,
        identity: identity.to_owned(),
        event: Some(Event::DeviceStatement(statement.clone())),
    }
    .encode_to_vec()
}

/// A decoded log entry (not yet checked against any checkpoint). The outer
/// `identity` is the directory's claim; readers compare it with what the
/// card, revocation or statement inside says.
#[derive(Clone, Debug)]
pub enum LogEvent {
    Registered {
        identity: String,
        appended_at: i64,
        card: card_pb::Card,
    },
    Revoked {
        identity: String,
        appended_at: i64,
        revocation: card_pb::Revocation,
    },
    DeviceStatement {
        identity: String,
        appended_at: i64,
        statement: card_pb::SignedDeviceStatement,
    },
}

pub fn parse_entry(entry: &[u8]) -> Result<LogEvent, CardError> {
    let e = LogEntry::decode(entry).map_err(|_| CardError::MalformedLogEntry("not a LogEntry"))?;
    if e.version != VERSION {
        return Err(CardError::UnsupportedVersion(e.version));
    }
    match e.event {
        Some(Event::CardRegistered(card)) => Ok(LogEvent::Registered {
            identity: e.identity,
            appended_at: e.appended_at,
            card,
        }),
        Some(Event::CardRevoked(revocation)) => Ok(LogEvent::Revoked {
            identity: e.identity,
            appended_at: e.appended_at,
            revocation,
        }),
        Some(Event::DeviceStatement(statement)) => Ok(LogEvent::DeviceStatement {
            identity: e.identity,
            appended_at: e.appended_at,
            statement,
        }),
        None => Err(CardError::MalformedLogEntry("no event")),
    }
}

/// The card a registration entry carries (a `CardRecord` sends its card
/// only this way). Nothing about the card is checked here.
pub fn registered_card(entry: &[u8]) -> Result<card_pb::Card, CardError> {
    match parse_entry(entry)? {
        LogEvent::Registered { card, .. } => Ok(card),
        _ => Err(CardError::MalformedLogEntry(
            "another event where a card registration was expected",
        )),
    }
}

/// Encodes proof hashes for the wire: one buffer, each hash a slice of it.
pub fn inclusion_proof_message(index: u64, size: u64, hashes: Vec<Hash>) -> InclusionProof {
    let all = Bytes::from(hashes.concat());
    InclusionProof {
        leaf_index: index,
        tree_size: size,
        hashes: (0..hashes.len())
            .map(|i| all.slice(i * 32..(i + 1) * 32))
            .collect(),
    }
}

/// Encodes consistency proof hashes for the wire.
pub fn consistency_proof_message(old: u64, new: u64, hashes: Vec<Hash>) -> ConsistencyProof {
    ConsistencyProof {
        old_size: old,
        new_size: new,
        hashes: hashes.into_iter().map(|h| h.to_vec()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use ct_merkle::mem_backed_tree::MemoryBackedTree;

    use super::*;

    fn entry(i: u64) -> Vec<u8> {
        format!("entry {i}").into_bytes()
    }

    /// RFC 9162 MTH by the book: the reference the stored-subtree tree must match.
    fn reference_root(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => to_hash(ring::digest::digest(&ring::digest::SHA256, b"").as_ref()),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn checkpoint(key: &SigningKey, tree: &Tree, size: u64) -> VerifiedCheckpoint {
        let signed = sign_checkpoint(key, size, &tree.root(size).unwrap(), 0);
        verify_checkpoint(&signed, &key.verifying_key()).unwrap()
    }

    #[test]
    fn roots_match_the_rfc_recursion_and_ct_merkle() {
        let mut tree = Tree::new();
        let mut ct = MemoryBackedTree::<Sha256, Vec<u8>>::new();
        let mut leaves = Vec::new();
        assert_eq!(tree.root(0).unwrap(), reference_root(&[]));
        for i in 0..70u64 {
            leaves.push(entry(i));
            tree.push(leaf_hash(&entry(i)));
            ct.push(entry(i));
            let size = i + 1;
            assert_eq!(
                tree.root(size).unwrap(),
                reference_root(&leaves),
                "size {size}"
            );
            assert_eq!(
                &tree.root(size).unwrap()[..],
                ct.root().as_bytes().as_slice()
            );
            // Past roots stay computable.
            for old in 0..=size {
                assert_eq!(
                    tree.root(old).unwrap(),
                    reference_root(&leaves[..old as usize])
                );
            }
        }
    }

    #[test]
    fn truncate_undoes_appends() {
        for keep in 0..20u64 {
            let mut tree = Tree::new();
            for i in 0..20u64 {
                tree.push(leaf_hash(&entry(i)));
            }
            let expected = tree.root(keep).unwrap();
            tree.truncate(keep);
            assert_eq!(tree.len(), keep);
            assert_eq!(tree.root(keep).unwrap(), expected);
            tree.push(leaf_hash(b"new"));
            let mut fresh = Tree::from_leaves((0..keep).map(|i| leaf_hash(&entry(i))));
            fresh.push(leaf_hash(b"new"));
            assert_eq!(tree.root(keep + 1), fresh.root(keep + 1));
        }
    }

    #[test]
    fn inclusion_proofs_verify_for_all_sizes_and_indices() {
        let key = SigningKey::generate().unwrap();
        let mut tree = Tree::new();
        for i in 0..40u64 {
            tree.push(leaf_hash(&entry(i)));
        }
        for size in 1..=40u64 {
            let cp = checkpoint(&key, &tree, size);
            for index in 0..size {
                let proof = inclusion_proof_message(
                    index,
                    size,
                    tree.inclusion_proof(index, size).unwrap(),
                );
                assert!(proof.hashes.len() <= 6);
                verify_inclusion(&cp, &entry(index), &proof).unwrap();
                // Another entry, or the same entry at another index, fails.
                assert!(verify_inclusion(&cp, &entry(index + 100), &proof).is_err());
                if size > 1 {
                    let moved = InclusionProof {
                        leaf_index: (index + 1) % size,
                        ..proof.clone()
                    };
                    assert!(verify_inclusion(&cp, &entry(index), &moved).is_err());
                }
            }
        }
        assert!(tree.inclusion_proof(5, 5).is_none());
        assert!(tree.inclusion_proof(0, 41).is_none());
    }

    /// RFC 9162's PATH(m, D[start..end]), as the RFC writes it (recursive,
    /// top-down), over the hashes of `leaves`.
    fn rfc_path(leaves: &[Hash], m: usize) -> Vec<Hash> {
        fn mth(d: &[Hash]) -> Hash {
            match d.len() {
                1 => d[0],
                n => {
                    let k = split_point(n as u64) as usize;
                    node_hash(&mth(&d[..k]), &mth(&d[k..]))
                }
            }
        }
        let n = leaves.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split_point(n as u64) as usize;
        let (mut out, sibling) = if m < k {
            (rfc_path(&leaves[..k], m), mth(&leaves[k..]))
        } else {
            (rfc_path(&leaves[k..], m - k), mth(&leaves[..k]))
        };
        out.push(sibling);
        out
    }

    #[test]
    fn inclusion_proofs_are_the_rfc_paths_in_larger_trees() {
        let leaves: Vec<Hash> = (0..1100u64).map(|i| leaf_hash(&entry(i))).collect();
        let tree = Tree::from_leaves(leaves.iter().copied());
        for size in [511u64, 512, 513, 767, 768, 1000, 1023, 1024, 1025, 1100] {
            let prefix = &leaves[..size as usize];
            for index in (0..size).step_by(7).chain([size - 2, size - 1]) {
                assert_eq!(
                    tree.inclusion_proof(index, size).unwrap(),
                    rfc_path(prefix, index as usize),
                    "leaf {index} of {size}"
                );
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_for_all_size_pairs() {
        let key = SigningKey::generate().unwrap();
        let mut tree = Tree::new();
        for i in 0..33u64 {
            tree.push(leaf_hash(&entry(i)));
        }
        for new in 0..=33u64 {
            for old in 0..=new {
                let proof =
                    consistency_proof_message(old, new, tree.consistency_proof(old, new).unwrap());
                verify_consistency(
                    &checkpoint(&key, &tree, old),
                    &checkpoint(&key, &tree, new),
                    &proof,
                )
                .unwrap_or_else(|e| panic!("{old} -> {new}: {e}"));
            }
        }
    }

    #[test]
    fn a_rewritten_history_is_detected() {
        let key = SigningKey::generate().unwrap();
        let mut honest = Tree::new();
        let mut forked = Tree::new();
        for i in 0..10u64 {
            honest.push(leaf_hash(&entry(i)));
            // The fork replaces entry 3 (say, a card the directory wants to hide).
            forked.push(leaf_hash(&entry(if i == 3 { 999 } else { i })));
        }
        for i in 10..20u64 {
            honest.push(leaf_hash(&entry(i)));
            forked.push(leaf_hash(&entry(i)));
        }
        let seen = checkpoint(&key, &honest, 7);
        let forked_new = checkpoint(&key, &forked, 20);
        let proof = consistency_proof_message(7, 20, forked.consistency_proof(7, 20).unwrap());
        assert!(matches!(
            verify_consistency(&seen, &forked_new, &proof),
            Err(CardError::BadConsistencyProof(_))
        ));
        // Same size, different root.
        let split = checkpoint(&key, &forked, 7);
        let empty = consistency_proof_message(7, 7, vec![]);
        assert!(verify_consistency(&seen, &split, &empty).is_err());
        // Shrinking.
        assert!(
            verify_consistency(
                &checkpoint(&key, &honest, 9),
                &seen,
                &consistency_proof_message(9, 7, vec![])
            )
            .is_err()
        );
    }

    #[test]
    fn checkpoints_must_be_signed_by_the_pinned_key() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let mut tree = Tree::new();
        tree.push(leaf_hash(b"x"));
        let signed = sign_checkpoint(&other, 1, &tree.root(1).unwrap(), 0);
        assert_eq!(
            verify_checkpoint(&signed, &key.verifying_key()).unwrap_err(),
            CardError::BadCheckpointSignature
        );
        let mut tampered = sign_checkpoint(&key, 1, &tree.root(1).unwrap(), 0);
        tampered.content_snapshot[5] ^= 1;
        assert!(verify_checkpoint(&tampered, &key.verifying_key()).is_err());
    }

    #[test]
    fn entries_round_trip() {
        let card = card_pb::Card {
            content_snapshot: vec![1, 2, 3],
            ..Default::default()
        };
        match parse_entry(&registration_entry(&card, "alice", 9)).unwrap() {
            LogEvent::Registered {
                identity,
                appended_at,
                card: c,
            } => {
                assert_eq!((identity.as_str(), appended_at), ("alice", 9));
                assert_eq!(c, card);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_entry(b"\xff").is_err());
        assert!(
            parse_entry(
                &LogEntry {
                    version: 1,
                    ..Default::default()
                }
                .encode_to_vec()
            )
            .is_err()
        );
    }
}
