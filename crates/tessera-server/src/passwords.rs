//! Password hashes: Argon2id (RFC 9106), compared in constant time, with a
//! cap on how many run at once (each takes its own `m_cost` of memory).

use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, Version};
use tessera_crypto::{ct_eq, random_array};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use crate::store::PasswordHash;

/// Argon2id cost of new password hashes.
#[derive(Debug, Clone, Copy)]
pub struct PasswordParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl PasswordParams {
    /// OWASP's Argon2id minimum: 19 MiB, 2 passes, 1 lane.
    pub const DEFAULT: Self = Self {
        m_cost_kib: 19 * 1024,
        t_cost: 2,
        p_cost: 1,
    };

    /// Cheap parameters for tests only.
    pub const DANGER_FAST_FOR_TESTS: Self = Self {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };
}

fn derive(password: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Option<Zeroizing<[u8; 32]>> {
    let params = Params::new(m, t, p, Some(32)).ok()?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password, salt, out.as_mut())
        .ok()?;
    Some(out)
}

/// Hashes a new password with a random salt.
pub fn hash(password: &str, params: PasswordParams) -> Option<PasswordHash> {
    let salt = random_array::<16>().ok()?;
    let hash = derive(
        password.as_bytes(),
        &salt,
        params.m_cost_kib,
        params.t_cost,
        params.p_cost,
    )?;
    Some(PasswordHash {
        m_cost_kib: params.m_cost_kib,
        t_cost: params.t_cost,
        p_cost: params.p_cost,
        salt: salt.to_vec(),
        hash: hash.to_vec(),
    })
}

/// Whether `password` matches `stored`.
pub fn verify(password: &str, stored: &PasswordHash) -> bool {
    derive(
        password.as_bytes(),
        &stored.salt,
        stored.m_cost_kib,
        stored.t_cost,
        stored.p_cost,
    )
    .is_some_and(|h| ct_eq(h.as_ref(), &stored.hash))
}

/// Spends the same work as a real check, so an unknown identity answers as
/// slowly as a wrong password.
pub fn verify_dummy(password: &str, params: PasswordParams) {
    let _ = derive(
        password.as_bytes(),
        &[0u8; 16],
        params.m_cost_kib,
        params.t_cost,
        params.p_cost,
    );
}

/// How many password hashes may run at once, and how many more may wait.
#[derive(Debug, Clone, Copy)]
pub struct HashLimits {
    pub concurrent: usize,
    pub queued: usize,
}

impl Default for HashLimits {
    /// One hash per core; four per core waiting.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            concurrent: cores,
            queued: 4 * cores,
        }
    }
}

/// Admits password hashes: at most `concurrent` run, at most `queued` more
/// wait, and beyond that a caller is turned away at once (the server
/// answers RESOURCE_EXHAUSTED): memory for Argon2id is bounded by
/// `concurrent × m_cost`, whatever the load.
pub struct HashLimiter {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

/// A slot to run one hash; the hash runs while it is held.
pub struct HashSlot {
    _admitted: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
}

impl HashLimiter {
    pub fn new(limits: HashLimits) -> Self {
        let concurrent = limits.concurrent.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(concurrent + limits.queued)),
            running: Arc::new(Semaphore::new(concurrent)),
        }
    }

    /// Waits for a slot, or `None` at once when too many hashes are
    /// already running or waiting.
    pub async fn slot(&self) -> Option<HashSlot> {
        let admitted = self.admitted.clone().try_acquire_owned().ok()?;
        let running = self.running.clone().acquire_owned().await.ok()?;
        Some(HashSlot {
            _admitted: admitted,
            _running: running,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_concurrent_plus_queued_are_admitted() {
        let limiter = Arc::new(HashLimiter::new(HashLimits {
            concurrent: 2,
            queued: 1,
        }));
        let a = limiter.slot().await.unwrap();
        let _b = limiter.slot().await.unwrap();
        // A third waits for a running slot; a fourth is turned away.
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.slot().await.is_some() })
        };
        while limiter.admitted.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        assert!(limiter.slot().await.is_none(), "over the cap");
        drop(a);
        assert!(waiter.await.unwrap(), "the waiter runs once a slot frees");
        assert!(limiter.slot().await.is_some());
    }

    #[test]
    fn hash_and_verify() {
        let h = hash("correct horse", PasswordParams::DANGER_FAST_FOR_TESTS).unwrap();
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horsE", &h));
        let h2 = hash("correct horse", PasswordParams::DANGER_FAST_FOR_TESTS).unwrap();
        assert_ne!(h.salt, h2.salt, "salts are random");
        assert_ne!(h.hash, h2.hash);
    }
}
