//! What a device remembers between runs: the last checkpoint of the key
//! directory, the cards it has seen for each contact (TOFU pins), which
//! contacts the user verified, acknowledged own devices, and the message
//! ids it has accepted (replay protection). One JSON file, read and
//! written under an exclusive lock so a `listen` and a `send` of the same
//! profile can run side by side.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::OpenOptions,
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{
    ClientError,
    profile::{read_json, write_json},
};

/// Most message ids remembered for replay detection.
const MAX_SEEN: usize = 200_000;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct ContactPin {
    /// Card ids (hex) last seen for the contact, with device names.
    pub(crate) cards: BTreeMap<String, String>,
    /// The card set the user confirmed with a safety number, if any.
    pub(crate) verified: Option<BTreeSet<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Seen {
    pub(crate) channel_id: String,
    pub(crate) index: u64,
    pub(crate) order: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    /// Hex of the last verified `SignedCheckpoint`.
    pub(crate) checkpoint: Option<String>,
    pub(crate) contacts: BTreeMap<String, ContactPin>,
    /// Own cards (hex) the user said they enrolled.
    pub(crate) acknowledged: BTreeSet<String>,
    /// `"<sender card hex>:<message id hex>"` → where it was accepted.
    pub(crate) seen: BTreeMap<String, Seen>,
    pub(crate) seen_counter: u64,
}

impl State {
    /// Records that message `message_id` from `sender_card` was accepted at
    /// (`channel_id`, `index`). `Err` with where it was seen before when the
    /// same message shows up anywhere else (a replay).
    pub(crate) fn accept_message(
        &mut self,
        sender_card: &str,
        message_id: &str,
        channel_id: &str,
        index: u64,
    ) -> Result<(), (String, u64)> {
        let key = format!("{sender_card}:{message_id}");
        if let Some(seen) = self.seen.get(&key) {
            if seen.channel_id == channel_id && seen.index == index {
                return Ok(());
            }
            return Err((seen.channel_id.clone(), seen.index));
        }
        self.seen_counter += 1;
        self.seen.insert(
            key,
            Seen {
                channel_id: channel_id.to_owned(),
                index,
                order: self.seen_counter,
            },
        );
        if self.seen.len() > MAX_SEEN {
            let cutoff = self.seen_counter - MAX_SEEN as u64;
            self.seen.retain(|_, s| s.order > cutoff);
        }
        Ok(())
    }
}

/// Runs `f` on the profile's state under an exclusive file lock and saves
/// what it leaves.
pub(crate) fn with_state<T>(dir: &Path, f: impl FnOnce(&mut State) -> T) -> Result<T, ClientError> {
    let lock_path = dir.join("state.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ClientError::io(&lock_path, e))?;
    lock.lock().map_err(|e| ClientError::io(&lock_path, e))?;
    let path = dir.join("state.json");
    let mut state: State = read_json(&path)?.unwrap_or_default();
    let out = f(&mut state);
    write_json(&path, &state)?;
    drop(lock);
    Ok(out)
}

/// Reads the state without changing it.
pub(crate) fn read_state(dir: &Path) -> Result<State, ClientError> {
    Ok(read_json(&dir.join("state.json"))?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_caught_and_rereads_are_not() {
        let mut s = State::default();
        assert!(s.accept_message("card", "m1", "c", 1).is_ok());
        assert!(
            s.accept_message("card", "m1", "c", 1).is_ok(),
            "reading the same message again"
        );
        assert_eq!(s.accept_message("card", "m1", "c", 9), Err(("c".into(), 1)));
        assert_eq!(s.accept_message("card", "m1", "d", 1), Err(("c".into(), 1)));
        assert!(
            s.accept_message("other", "m1", "c", 2).is_ok(),
            "ids are per sender card"
        );
    }

    #[test]
    fn state_round_trips_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        with_state(dir.path(), |s| s.acknowledged.insert("ab".into())).unwrap();
        assert!(read_state(dir.path()).unwrap().acknowledged.contains("ab"));
    }
}
