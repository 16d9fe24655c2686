//! Writes that keep going while a service is SIGKILLed, with the evidence
//! that each kill hit writes in flight.
//!
//! Every attempt of a write is numbered and recorded as in flight until it
//! ends. [`crate::Service::crash_during`] snapshots the attempts in flight,
//! kills the service at once (no fork between the snapshot and the signal),
//! waits until each of those attempts has ended, and fails the test unless
//! at least one of them failed: the kill really landed on a write. Only
//! transport failures (the service gone) are retried; any other error fails
//! the test at once instead of being retried forever.

use std::{collections::BTreeSet, fmt::Display, future::Future, sync::Mutex, time::Duration};

use tokio::sync::Notify;

/// How long a kill may take to settle (every write then in flight ended).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    next_attempt: u64,
    in_flight: BTreeSet<u64>,
    /// Attempts that ended with a transport failure.
    failed: BTreeSet<u64>,
    /// Attempts refused for another reason (the test fails).
    refused: BTreeSet<u64>,
    acked: u64,
    /// Attempts in flight at each kill, and how many of them failed.
    kills: Vec<(usize, usize)>,
    /// Acknowledged counts at which no new attempt starts until the kill
    /// planned there lets them go: fast writes cannot all finish before
    /// the killer is ready.
    pauses: BTreeSet<u64>,
}

impl State {
    /// Whether a new attempt must wait for the killer.
    fn paused(&self) -> bool {
        self.pauses.first().is_some_and(|at| self.acked >= *at)
    }
}

/// The writes of a crash test; share it between the writers and the killer.
#[derive(Default)]
pub struct Writes {
    state: Mutex<State>,
    changed: Notify,
}

/// Whether a gRPC status is a local transport failure (the connection was
/// refused, reset or closed) rather than an answer the service sent: tonic
/// attaches the underlying error as the source of the former only.
pub fn is_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

impl Writes {
    /// Writes that pause, once `at` writes are acknowledged for each `at`,
    /// until a kill planned there ([`crate::Service::crash_during`] with
    /// that count) happens.
    pub fn pausing_at(at: impl IntoIterator<Item = u64>) -> Self {
        let writes = Self::default();
        writes.state().pauses = at.into_iter().collect();
        writes
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `attempt` until it succeeds. An error `transport` accepts is
    /// retried (after a short pause); any other error panics: a permanent
    /// refusal fails the test instead of hanging it.
    pub async fn retry<T, E, F, Fut>(&self, mut attempt: F, transport: impl Fn(&E) -> bool) -> T
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            self.wait_until("the kill planned here", |s| !s.paused())
                .await;
            let id = {
                let mut s = self.state();
                let id = s.next_attempt;
                s.next_attempt += 1;
                s.in_flight.insert(id);
                id
            };
            self.changed.notify_waiters();
            let result = attempt().await;
            let retry = {
                let mut s = self.state();
                s.in_flight.remove(&id);
                match &result {
                    Ok(_) => {
                        s.acked += 1;
                        false
                    }
                    Err(e) if transport(e) => {
                        s.failed.insert(id);
                        true
                    }
                    Err(_) => {
                        s.refused.insert(id);
                        false
                    }
                }
            };
            self.changed.notify_waiters();
            match result {
                Ok(v) => return v,
                Err(_) if retry => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("a write was refused (not a transport failure, not retried): {e}"),
            }
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.state().acked
    }

    /// For each kill so far: (attempts in flight, how many of them failed).
    pub fn kills(&self) -> Vec<(usize, usize)> {
        self.state().kills.clone()
    }

    /// Waits until `check` holds, woken by every attempt that starts or ends.
    async fn wait_until(&self, what: &str, mut check: impl FnMut(&State) -> bool) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if check(&self.state()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let s = self.state();
                panic!(
                    "timed out after {SETTLE_TIMEOUT:?} waiting for {what} ({} acknowledged, {} attempts, in flight: {:?})",
                    s.acked, s.next_attempt, s.in_flight
                );
            }
        }
    }

    /// Kills through `kill` once `at_least` writes are acknowledged, the
    /// moment the next attempt starts (so its request cannot have been
    /// answered yet), then waits until every attempt that was in flight has
    /// ended, and records how many were in flight and how many failed
    /// ([`Writes::kills`]).
    pub(crate) async fn kill_in_flight(&self, at_least: u64, kill: impl FnOnce()) {
        self.wait_until("acknowledged writes", |s| s.acked >= at_least)
            .await;
        let started = {
            // Writers paused here (if planned) start again now.
            let mut s = self.state();
            s.pauses.retain(|at| *at > at_least);
            s.next_attempt
        };
        self.changed.notify_waiters();
        self.wait_until("a write to start", |s| s.next_attempt > started)
            .await;
        let hit = {
            // The lock is held across the signal: no attempt can record its
            // end between the snapshot and the kill.
            let s = self.state();
            let hit = s.in_flight.clone();
            kill();
            hit
        };
        self.wait_until("the writes in flight at the kill to end", |s| {
            hit.iter().all(|id| !s.in_flight.contains(id))
        })
        .await;
        let mut s = self.state();
        let failed = hit.iter().filter(|id| s.failed.contains(id)).count();
        let refused = hit.iter().filter(|id| s.refused.contains(id)).count();
        s.kills.push((hit.len(), failed));
        assert_eq!(
            refused, 0,
            "{refused} write(s) in flight at the kill were refused rather than failing in transport"
        );
        // A write in flight at the signal may still have been answered
        // just before it (its answer already on the wire): a kill can miss.
        // Callers check that their kills, together, hit writes.
    }
}
