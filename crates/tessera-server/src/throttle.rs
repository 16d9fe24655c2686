//! Throttling of failed log-ins, per identity and per peer address, over a
//! sliding window. In memory: a restart forgets it, which only ever helps a
//! legitimate user.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How many failures are allowed per window.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleLimits {
    pub per_identity: usize,
    pub per_peer: usize,
    pub window: Duration,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        Self {
            per_identity: 5,
            per_peer: 20,
            window: Duration::from_secs(300),
        }
    }
}

#[derive(Default)]
struct Failures {
    by_identity: HashMap<String, VecDeque<Instant>>,
    by_peer: HashMap<IpAddr, VecDeque<Instant>>,
}

pub struct Throttle {
    limits: ThrottleLimits,
    failures: Mutex<Failures>,
}

fn prune(q: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while q.front().is_some_and(|t| now.duration_since(*t) > window) {
        q.pop_front();
    }
}

/// Most distinct keys remembered; beyond it the oldest entries are dropped.
const MAX_KEYS: usize = 100_000;

impl Throttle {
    pub fn new(limits: ThrottleLimits) -> Self {
        Self {
            limits,
            failures: Mutex::new(Failures::default()),
        }
    }

    /// `Err(seconds to wait)` when either the identity or the peer has used
    /// up its failures.
    pub fn check(&self, identity: &str, peer: Option<IpAddr>) -> Result<(), u64> {
        let now = Instant::now();
        let Ok(mut f) = self.failures.lock() else {
            return Ok(());
        };
        let window = self.limits.window;
        let wait = |q: &VecDeque<Instant>| {
            q.front().map_or(0, |t| {
                window.saturating_sub(now.duration_since(*t)).as_secs() + 1
            })
        };
        if let Some(q) = f.by_identity.get_mut(identity) {
            prune(q, now, window);
            if q.len() >= self.limits.per_identity {
                return Err(wait(q));
            }
        }
        if let Some(q) = peer.and_then(|p| f.by_peer.get_mut(&p)) {
            prune(q, now, window);
            if q.len() >= self.limits.per_peer {
                return Err(wait(q));
            }
        }
        Ok(())
    }

    pub fn record_failure(&self, identity: &str, peer: Option<IpAddr>) {
        let now = Instant::now();
        let Ok(mut f) = self.failures.lock() else {
            return;
        };
        if f.by_identity.len() > MAX_KEYS || f.by_peer.len() > MAX_KEYS {
            let window = self.limits.window;
            f.by_identity
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) <= window));
            f.by_peer
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) <= window));
        }
        f.by_identity
            .entry(identity.to_owned())
            .or_default()
            .push_back(now);
        if let Some(p) = peer {
            f.by_peer.entry(p).or_default().push_back(now);
        }
    }

    pub fn record_success(&self, identity: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.by_identity.remove(identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_per_identity_and_per_peer() {
        let t = Throttle::new(ThrottleLimits {
            per_identity: 2,
            per_peer: 3,
            window: Duration::from_secs(60),
        });
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(t.check("alice", Some(peer)).is_ok());
        t.record_failure("alice", Some(peer));
        t.record_failure("alice", Some(peer));
        assert!(t.check("alice", Some(peer)).is_err());
        assert!(
            t.check("alice", None).is_err(),
            "per identity, whatever the address"
        );
        // Another identity from the same peer: one more failure allowed, then blocked.
        assert!(t.check("bob", Some(peer)).is_ok());
        t.record_failure("bob", Some(peer));
        assert!(t.check("carol", Some(peer)).is_err());
        assert!(t.check("carol", Some("10.0.0.2".parse().unwrap())).is_ok());
        t.record_success("alice");
        assert!(t.check("alice", Some("10.0.0.3".parse().unwrap())).is_ok());
    }
}
