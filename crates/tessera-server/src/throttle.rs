//! Throttling of password log-ins (per identity and per peer) and of
//! sign-ups (per peer), over a sliding window. An attempt is reserved
//! before the password is hashed, so parallel attempts cannot all pass the
//! check; a successful log-in gives its reservation back. In memory: a
//! restart forgets it, which only ever helps a legitimate user.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How many attempts are allowed per window.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleLimits {
    /// Failed (or in-flight) password log-ins per identity.
    pub per_identity: usize,
    /// Failed (or in-flight) password log-ins per peer.
    pub per_peer: usize,
    /// Sign-ups per peer, successful or not.
    pub signups_per_peer: usize,
    pub window: Duration,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        Self {
            per_identity: 5,
            per_peer: 20,
            signups_per_peer: 10,
            window: Duration::from_secs(300),
        }
    }
}

/// Where a request comes from, for throttling: an IPv4 address, or the /64
/// prefix of an IPv6 address (one host usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer(IpAddr);

impl Peer {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let mut octets = v6.octets();
                    octets[8..].fill(0);
                    Self(IpAddr::from(octets))
                }
            },
        }
    }
}

#[derive(Default)]
struct Attempts {
    by_identity: HashMap<String, VecDeque<Instant>>,
    by_peer: HashMap<Peer, VecDeque<Instant>>,
    signups: HashMap<Peer, VecDeque<Instant>>,
}

pub struct Throttle {
    limits: ThrottleLimits,
    attempts: Mutex<Attempts>,
}

/// A log-in attempt counted before the password was checked; give it back
/// with [`Throttle::succeeded`] when the password was right.
#[derive(Debug)]
#[must_use]
pub struct Reservation {
    at: Instant,
    peer: Option<Peer>,
}

fn prune(q: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while q.front().is_some_and(|t| now.duration_since(*t) > window) {
        q.pop_front();
    }
}

/// Seconds until the oldest attempt in `q` leaves the window.
fn wait(q: &VecDeque<Instant>, now: Instant, window: Duration) -> u64 {
    q.front().map_or(1, |t| {
        window.saturating_sub(now.duration_since(*t)).as_secs() + 1
    })
}

/// Most distinct keys remembered; beyond it, keys with no attempt in the
/// window are dropped.
const MAX_KEYS: usize = 100_000;

fn forget_idle<K>(map: &mut HashMap<K, VecDeque<Instant>>, now: Instant, window: Duration) {
    if map.len() > MAX_KEYS {
        map.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) <= window));
    }
}

impl Throttle {
    pub fn new(limits: ThrottleLimits) -> Self {
        Self {
            limits,
            attempts: Mutex::new(Attempts::default()),
        }
    }

    /// Counts a log-in attempt for `identity` from `peer`, or `Err(seconds
    /// to wait)` when either has used up its attempts. Check and count are
    /// one step, under one lock.
    pub fn reserve(&self, identity: &str, peer: Option<IpAddr>) -> Result<Reservation, u64> {
        let now = Instant::now();
        let window = self.limits.window;
        let peer = peer.map(Peer::of);
        let Ok(mut a) = self.attempts.lock() else {
            return Err(1);
        };
        forget_idle(&mut a.by_identity, now, window);
        forget_idle(&mut a.by_peer, now, window);
        let by_identity = a.by_identity.entry(identity.to_owned()).or_default();
        prune(by_identity, now, window);
        if by_identity.len() >= self.limits.per_identity {
            return Err(wait(by_identity, now, window));
        }
        if let Some(p) = peer {
            let by_peer = a.by_peer.entry(p).or_default();
            prune(by_peer, now, window);
            if by_peer.len() >= self.limits.per_peer {
                return Err(wait(by_peer, now, window));
            }
            by_peer.push_back(now);
        }
        a.by_identity
            .entry(identity.to_owned())
            .or_default()
            .push_back(now);
        Ok(Reservation { at: now, peer })
    }

    /// The password was right: the identity's failures are forgiven and the
    /// attempt no longer counts against the peer.
    pub fn succeeded(&self, identity: &str, reservation: Reservation) {
        if let Ok(mut a) = self.attempts.lock() {
            a.by_identity.remove(identity);
            if let Some(q) = reservation.peer.and_then(|p| a.by_peer.get_mut(&p))
                && let Some(i) = q.iter().position(|t| *t == reservation.at)
            {
                q.remove(i);
            }
        }
    }

    /// Counts a sign-up from `peer`, or `Err(seconds to wait)`.
    pub fn reserve_signup(&self, peer: Option<IpAddr>) -> Result<(), u64> {
        let Some(peer) = peer.map(Peer::of) else {
            return Ok(());
        };
        let now = Instant::now();
        let window = self.limits.window;
        let Ok(mut a) = self.attempts.lock() else {
            return Err(1);
        };
        forget_idle(&mut a.signups, now, window);
        let q = a.signups.entry(peer).or_default();
        prune(q, now, window);
        if q.len() >= self.limits.signups_per_peer {
            return Err(wait(q, now, window));
        }
        q.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ThrottleLimits {
        ThrottleLimits {
            per_identity: 2,
            per_peer: 3,
            signups_per_peer: 2,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn blocks_after_the_limit_per_identity_and_per_peer() {
        let t = Throttle::new(limits());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let _ = t.reserve("alice", Some(peer)).unwrap();
        let _ = t.reserve("alice", Some(peer)).unwrap();
        assert!(t.reserve("alice", Some(peer)).is_err());
        assert!(
            t.reserve("alice", None).is_err(),
            "per identity, whatever the address"
        );
        // Another identity from the same peer: one more attempt, then blocked.
        let _ = t.reserve("bob", Some(peer)).unwrap();
        assert!(t.reserve("carol", Some(peer)).is_err());
        let carol = t
            .reserve("carol", Some("10.0.0.2".parse().unwrap()))
            .unwrap();
        t.succeeded("carol", carol);
        assert!(
            t.reserve("carol", Some("10.0.0.2".parse().unwrap()))
                .is_ok()
        );
    }

    #[test]
    fn a_success_gives_its_reservation_back() {
        let t = Throttle::new(limits());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10 {
            let r = t.reserve("alice", Some(peer)).unwrap();
            t.succeeded("alice", r);
        }
        assert!(t.reserve("alice", Some(peer)).is_ok());
    }

    #[test]
    fn sign_ups_are_counted_per_peer_and_ipv6_per_64() {
        let t = Throttle::new(limits());
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        t.reserve_signup(Some(a)).unwrap();
        t.reserve_signup(Some(b)).unwrap();
        assert!(t.reserve_signup(Some(a)).is_err(), "same /64");
        assert!(t.reserve_signup(Some(c)).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(Peer::of(mapped), Peer::of("10.0.0.9".parse().unwrap()));
    }
}
