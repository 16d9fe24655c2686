//! Single-use challenges for passwordless device log-in.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tessera_card::CardId;

/// How long a challenge may be answered, unless configured otherwise.
pub(crate) const DEFAULT_CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Most challenges outstanding at once.
const MAX_OUTSTANDING: usize = 100_000;

struct Pending {
    identity: String,
    card_id: CardId,
    issued: Instant,
}

pub(crate) struct Challenges {
    pending: Mutex<HashMap<[u8; 32], Pending>>,
    ttl: Duration,
}

impl Challenges {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            pending: Mutex::default(),
            ttl,
        }
    }

    /// How long a challenge may be answered.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Remembers `challenge` for (`identity`, `card_id`); `false` when too
    /// many are outstanding.
    pub(crate) fn insert(&self, challenge: [u8; 32], identity: &str, card_id: CardId) -> bool {
        let Ok(mut p) = self.pending.lock() else {
            return false;
        };
        if p.len() >= MAX_OUTSTANDING {
            p.retain(|_, v| v.issued.elapsed() < self.ttl);
            if p.len() >= MAX_OUTSTANDING {
                return false;
            }
        }
        p.insert(
            challenge,
            Pending {
                identity: identity.to_owned(),
                card_id,
                issued: Instant::now(),
            },
        );
        true
    }

    /// Consumes `challenge`: `true` only once, within the TTL, and for the
    /// same identity and card it was issued to.
    pub(crate) fn take(&self, challenge: &[u8], identity: &str, card_id: &CardId) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(challenge) else {
            return false;
        };
        let Ok(mut p) = self.pending.lock() else {
            return false;
        };
        match p.remove(&key) {
            Some(v) => {
                v.issued.elapsed() < self.ttl && v.identity == identity && &v.card_id == card_id
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_and_bound_to_identity_and_card() {
        let c = Challenges::new(DEFAULT_CHALLENGE_TTL);
        let card = CardId::of_snapshot(b"c");
        assert!(c.insert([1; 32], "alice", card));
        assert!(!c.take(&[1; 32], "bob", &card));
        assert!(
            !c.take(&[1; 32], "alice", &card),
            "a failed answer uses it up"
        );
        assert!(c.insert([2; 32], "alice", card));
        assert!(c.take(&[2; 32], "alice", &card));
        assert!(!c.take(&[2; 32], "alice", &card), "single use");
        assert!(!c.take(&[3; 5], "alice", &card));
    }
}
