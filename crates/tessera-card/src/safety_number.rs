//! Safety numbers: 60 digits two users compare (aloud, or side by side) to
//! confirm they see the same cards for each other.
//!
//! For each identity, over its set of card ids:
//!
//! ```text
//! input  = "tessera/v1/safety-number" || 0x00
//!          || u32be(len(identity)) || identity
//!          || u32be(count) || card_id_1 || ... || card_id_count   (ascending, no duplicates)
//! h_0    = SHA-512(input)
//! h_i    = SHA-512(h_{i-1} || input)        for i = 1 .. 5199
//! digits = for each of the first six 5-byte groups g of h_5199:
//!          (g as a 40-bit big-endian integer) mod 100000, as 5 digits
//! ```
//!
//! The safety number of two identities is the two 30-digit halves ordered by
//! identity (bytewise), so both users see the same 60 digits. It does not
//! depend on the order cards were listed in, and changes when any card of
//! either side is added, removed or replaced. The 5200 iterations (as in
//! Signal) make finding a colliding card set expensive.

use std::fmt;

use ring::digest::{SHA512, digest};

use crate::CardId;

const LABEL: &[u8] = b"tessera/v1/safety-number";
const ITERATIONS: usize = 5200;

/// 30 digits for one identity's card set.
fn fingerprint(identity: &str, cards: &[CardId]) -> [u32; 6] {
    let mut ids: Vec<&[u8; 32]> = cards.iter().map(CardId::as_bytes).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut input = Vec::with_capacity(LABEL.len() + 9 + identity.len() + 32 * ids.len());
    input.extend_from_slice(LABEL);
    input.push(0);
    input.extend_from_slice(&(identity.len() as u32).to_be_bytes());
    input.extend_from_slice(identity.as_bytes());
    input.extend_from_slice(&(ids.len() as u32).to_be_bytes());
    for id in ids {
        input.extend_from_slice(id);
    }
    let mut hash = digest(&SHA512, &input);
    let mut buf = Vec::with_capacity(64 + input.len());
    for _ in 1..ITERATIONS {
        buf.clear();
        buf.extend_from_slice(hash.as_ref());
        buf.extend_from_slice(&input);
        hash = digest(&SHA512, &buf);
    }
    let h = hash.as_ref();
    let mut groups = [0u32; 6];
    for (i, group) in groups.iter_mut().enumerate() {
        let chunk = &h[i * 5..i * 5 + 5];
        let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        *group = (value % 100_000) as u32;
    }
    groups
}

/// The safety number of two identities' card sets.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SafetyNumber([u32; 12]);

impl SafetyNumber {
    /// `a` and `b` are (identity, its active card ids); the order of the two
    /// arguments and of the card lists does not matter.
    pub fn compute(a: (&str, &[CardId]), b: (&str, &[CardId])) -> Self {
        let (first, second) = if a.0.as_bytes() <= b.0.as_bytes() {
            (a, b)
        } else {
            (b, a)
        };
        let mut groups = [0u32; 12];
        groups[..6].copy_from_slice(&fingerprint(first.0, first.1));
        groups[6..].copy_from_slice(&fingerprint(second.0, second.1));
        Self(groups)
    }

    /// The 60 digits with no spaces.
    pub fn digits(&self) -> String {
        self.0.iter().map(|g| format!("{g:05}")).collect()
    }
}

/// Twelve groups of five digits, in three lines of four.
impl fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(if i % 4 == 0 { "\n" } else { " " })?;
            }
            write!(f, "{g:05}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> CardId {
        CardId::of_snapshot(&[n])
    }

    #[test]
    fn symmetric_and_order_independent() {
        let a = [id(1), id(2)];
        let a_rev = [id(2), id(1)];
        let b = [id(3)];
        let n1 = SafetyNumber::compute(("alice", &a), ("bob", &b));
        let n2 = SafetyNumber::compute(("bob", &b), ("alice", &a_rev));
        assert_eq!(n1, n2);
        assert_eq!(n1.digits().len(), 60);
        assert!(n1.digits().bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(n1.to_string().lines().count(), 3);
    }

    #[test]
    fn changes_when_any_card_changes() {
        let base = SafetyNumber::compute(("alice", &[id(1), id(2)]), ("bob", &[id(3)]));
        let added = SafetyNumber::compute(("alice", &[id(1), id(2), id(4)]), ("bob", &[id(3)]));
        let removed = SafetyNumber::compute(("alice", &[id(1)]), ("bob", &[id(3)]));
        let replaced = SafetyNumber::compute(("alice", &[id(1), id(2)]), ("bob", &[id(5)]));
        let renamed = SafetyNumber::compute(("alice", &[id(1), id(2)]), ("bobby", &[id(3)]));
        for other in [&added, &removed, &replaced, &renamed] {
            assert_ne!(&base, other);
        }
        // Only the changed side's half changes.
        assert_eq!(base.digits()[..30], replaced.digits()[..30]);
        assert_ne!(base.digits()[30..], replaced.digits()[30..]);
    }
}
