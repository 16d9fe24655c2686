//! Single-use challenges for passwordless device log-in.
//!
//! `BeginDeviceLogin` needs no token, so the table of outstanding
//! challenges is capped three ways: per identity, per peer (an IPv4
//! address or an IPv6 /64) and in total, with the per-peer cap far below
//! the total: no one caller can fill the table and lock everyone out.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tessera_card::CardId;

use crate::throttle::Peer;

/// How long a challenge may be answered, unless configured otherwise.
pub(crate) const DEFAULT_CHALLENGE_TTL: Duration = Duration::from_secs(60);

/// Caps on outstanding (issued, unanswered, unexpired) challenges.
#[derive(Debug, Clone, Copy)]
pub struct ChallengeLimits {
    /// Per identity, whoever asks: a user's devices (at most 32) log in
    /// one at a time.
    pub per_identity: usize,
    /// Per peer, whatever identities it asks for.
    pub per_peer: usize,
    /// In total.
    pub total: usize,
}

impl Default for ChallengeLimits {
    fn default() -> Self {
        Self {
            per_identity: 16,
            per_peer: 64,
            total: 100_000,
        }
    }
}

/// Why no challenge was issued, with the seconds until one frees up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Identity(u64),
    Peer(u64),
    Full(u64),
}

struct Pending {
    identity: String,
    card_id: CardId,
    peer: Option<Peer>,
    issued: Instant,
}

#[derive(Default)]
struct Table {
    pending: HashMap<[u8; 32], Pending>,
    /// Challenges in the order issued, to expire them from the front.
    order: VecDeque<(Instant, [u8; 32])>,
    by_identity: HashMap<String, usize>,
    by_peer: HashMap<Peer, usize>,
}

impl Table {
    fn forget(&mut self, challenge: &[u8; 32]) -> Option<Pending> {
        let p = self.pending.remove(challenge)?;
        decrement(&mut self.by_identity, &p.identity);
        if let Some(peer) = &p.peer {
            decrement(&mut self.by_peer, peer);
        }
        Some(p)
    }

    /// Drops expired challenges, and the order entries of answered ones,
    /// from the front of the issue order.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((issued, challenge)) = self.order.front().copied() {
            let answered = !self.pending.contains_key(&challenge);
            if !answered && now.duration_since(issued) < ttl {
                break;
            }
            self.order.pop_front();
            if !answered {
                self.forget(&challenge);
            }
        }
    }

    /// Seconds until the oldest outstanding challenge matching `pick` expires.
    fn wait(&self, now: Instant, ttl: Duration, pick: impl Fn(&Pending) -> bool) -> u64 {
        self.order
            .iter()
            .filter_map(|(_, c)| self.pending.get(c))
            .find(|p| pick(p))
            .map_or(1, |p| {
                ttl.saturating_sub(now.duration_since(p.issued)).as_secs() + 1
            })
    }
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

pub(crate) struct Challenges {
    limits: ChallengeLimits,
    ttl: Duration,
    table: Mutex<Table>,
}

impl Challenges {
    pub(crate) fn new(limits: ChallengeLimits, ttl: Duration) -> Self {
        Self {
            limits,
            ttl,
            table: Mutex::new(Table::default()),
        }
    }

    /// Remembers `challenge` for (`identity`, `card_id`) asked by `peer`,
    /// unless a cap is reached.
    pub(crate) fn insert(
        &self,
        challenge: [u8; 32],
        identity: &str,
        card_id: CardId,
        peer: Option<IpAddr>,
    ) -> Result<(), Refused> {
        let now = Instant::now();
        let Ok(mut t) = self.table.lock() else {
            return Err(Refused::Full(1));
        };
        t.expire(now, self.ttl);
        let peer = peer.map(Peer::of);
        if t.by_identity.get(identity).copied().unwrap_or(0) >= self.limits.per_identity {
            return Err(Refused::Identity(
                t.wait(now, self.ttl, |p| p.identity == identity),
            ));
        }
        if let Some(peer) = &peer
            && t.by_peer.get(peer).copied().unwrap_or(0) >= self.limits.per_peer
        {
            return Err(Refused::Peer(
                t.wait(now, self.ttl, |p| p.peer.as_ref() == Some(peer)),
            ));
        }
        if t.pending.len() >= self.limits.total {
            return Err(Refused::Full(t.wait(now, self.ttl, |_| true)));
        }
        *t.by_identity.entry(identity.to_owned()).or_default() += 1;
        if let Some(peer) = peer {
            *t.by_peer.entry(peer).or_default() += 1;
        }
        t.order.push_back((now, challenge));
        t.pending.insert(
            challenge,
            Pending {
                identity: identity.to_owned(),
                card_id,
                peer,
                issued: now,
            },
        );
        Ok(())
    }

    /// How long a challenge may be answered.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Consumes `challenge`: `true` only once, within the TTL, and for the
    /// same identity and card it was issued to.
    pub(crate) fn take(&self, challenge: &[u8], identity: &str, card_id: &CardId) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(challenge) else {
            return false;
        };
        let Ok(mut t) = self.table.lock() else {
            return false;
        };
        match t.forget(&key) {
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

    fn challenges() -> Challenges {
        Challenges::new(
            ChallengeLimits {
                per_identity: 2,
                per_peer: 3,
                total: 5,
            },
            DEFAULT_CHALLENGE_TTL,
        )
    }

    #[test]
    fn single_use_and_bound_to_identity_and_card() {
        let c = Challenges::new(ChallengeLimits::default(), DEFAULT_CHALLENGE_TTL);
        let card = CardId::of_snapshot(b"c");
        c.insert([1; 32], "alice", card, None).unwrap();
        assert!(!c.take(&[1; 32], "bob", &card));
        assert!(
            !c.take(&[1; 32], "alice", &card),
            "a failed answer uses it up"
        );
        c.insert([2; 32], "alice", card, None).unwrap();
        assert!(c.take(&[2; 32], "alice", &card));
        assert!(!c.take(&[2; 32], "alice", &card), "single use");
        assert!(!c.take(&[3; 5], "alice", &card));
    }

    #[test]
    fn capped_per_identity_per_peer_and_in_total() {
        let c = challenges();
        let card = CardId::of_snapshot(b"c");
        let (p1, p2, p3): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        c.insert([1; 32], "alice", card, Some(p1)).unwrap();
        c.insert([2; 32], "alice", card, Some(p2)).unwrap();
        assert!(matches!(
            c.insert([3; 32], "alice", card, Some(p3)),
            Err(Refused::Identity(_))
        ));
        c.insert([4; 32], "bob", card, Some(p1)).unwrap();
        c.insert([5; 32], "carol", card, Some(p1)).unwrap();
        assert!(matches!(
            c.insert([6; 32], "dave", card, Some(p1)),
            Err(Refused::Peer(_))
        ));
        c.insert([7; 32], "dave", card, Some(p2)).unwrap();
        assert!(matches!(
            c.insert([8; 32], "erin", card, Some(p3)),
            Err(Refused::Full(_))
        ));
        // Answering frees the slots it held.
        assert!(c.take(&[1; 32], "alice", &card));
        c.insert([9; 32], "alice", card, Some(p3)).unwrap();
    }
}
