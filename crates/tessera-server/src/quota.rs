//! Per-user and per-process caps that live in memory: open subscriptions,
//! and uploads in progress (their bytes count against the attachment quota
//! before they are stored).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Counts per user, with a total.
#[derive(Default)]
struct Counts {
    by_user: HashMap<String, (usize, u64)>,
    total: usize,
}

/// Open subscriptions: at most `per_user` for one user, `total` in all.
pub(crate) struct Subscriptions {
    per_user: usize,
    total: usize,
    counts: Arc<Mutex<Counts>>,
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    User,
    Process,
}

/// One open subscription; dropping it frees the slot.
pub(crate) struct SubscriptionSlot {
    identity: String,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        release(&self.counts, &self.identity, 0);
    }
}

fn release(counts: &Mutex<Counts>, identity: &str, bytes: u64) {
    if let Ok(mut c) = counts.lock() {
        c.total = c.total.saturating_sub(1);
        if let Some(entry) = c.by_user.get_mut(identity) {
            entry.0 = entry.0.saturating_sub(1);
            entry.1 = entry.1.saturating_sub(bytes);
            if entry.0 == 0 {
                c.by_user.remove(identity);
            }
        }
    }
}

/// Takes one of `per_user` slots of `identity` and one of `total`.
fn take(counts: &Mutex<Counts>, identity: &str, per_user: usize, total: usize) -> Result<(), Full> {
    let Ok(mut c) = counts.lock() else {
        return Err(Full::Process);
    };
    if c.total >= total {
        return Err(Full::Process);
    }
    let entry = c.by_user.entry(identity.to_owned()).or_default();
    if entry.0 >= per_user {
        return Err(Full::User);
    }
    entry.0 += 1;
    c.total += 1;
    Ok(())
}

impl Subscriptions {
    pub(crate) fn new(per_user: usize, total: usize) -> Self {
        Self {
            per_user,
            total,
            counts: Arc::default(),
        }
    }

    pub(crate) fn open(&self, identity: &str) -> Result<SubscriptionSlot, Full> {
        take(&self.counts, identity, self.per_user, self.total)?;
        Ok(SubscriptionSlot {
            identity: identity.to_owned(),
            counts: self.counts.clone(),
        })
    }
}

/// Uploads in progress: at most `per_user` at once for one user, and the
/// bytes each has received so far.
pub(crate) struct Uploads {
    per_user: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One upload in progress; dropping it forgets its bytes.
pub(crate) struct UploadSlot {
    identity: String,
    bytes: u64,
    counts: Arc<Mutex<Counts>>,
}

impl Uploads {
    pub(crate) fn new(per_user: usize) -> Self {
        Self {
            per_user,
            counts: Arc::default(),
        }
    }

    pub(crate) fn begin(&self, identity: &str) -> Result<UploadSlot, Full> {
        take(&self.counts, identity, self.per_user, usize::MAX)?;
        Ok(UploadSlot {
            identity: identity.to_owned(),
            bytes: 0,
            counts: self.counts.clone(),
        })
    }
}

impl UploadSlot {
    /// The bytes this upload has received.
    pub(crate) fn received(&self) -> u64 {
        self.bytes
    }

    /// Counts `n` more received bytes; returns the bytes of all of this
    /// user's uploads in progress.
    pub(crate) fn add(&mut self, n: u64) -> u64 {
        self.bytes += n;
        match self.counts.lock() {
            Ok(mut c) => {
                let entry = c.by_user.entry(self.identity.clone()).or_default();
                entry.1 += n;
                entry.1
            }
            Err(_) => u64::MAX,
        }
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        release(&self.counts, &self.identity, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_user_and_in_total_are_given_back() {
        let subs = Subscriptions::new(2, 3);
        let a1 = subs.open("alice").unwrap();
        let _a2 = subs.open("alice").unwrap();
        assert!(matches!(subs.open("alice"), Err(Full::User)));
        let _b = subs.open("bob").unwrap();
        assert!(matches!(subs.open("carol"), Err(Full::Process)));
        drop(a1);
        assert!(subs.open("alice").is_ok());
    }

    #[test]
    fn upload_bytes_add_up_per_user_until_dropped() {
        let uploads = Uploads::new(2);
        let mut one = uploads.begin("alice").unwrap();
        let mut two = uploads.begin("alice").unwrap();
        assert!(matches!(uploads.begin("alice"), Err(Full::User)));
        assert_eq!(one.add(10), 10);
        assert_eq!(two.add(5), 15);
        drop(one);
        assert_eq!(two.add(1), 6);
    }
}
