//! What a device remembers between runs.
//!
//! * `state.json`: the last checkpoint of the key directory, the cards seen
//!   for each contact (TOFU pins), which contacts the user verified, and
//!   acknowledged own devices. Small; read and rewritten under an exclusive
//!   lock, only when it changes.
//! * `seen.log`: the message ids accepted so far and where (replay
//!   protection): one appended line per message, read incrementally, so a
//!   `listen` and a `history` of the same profile see each other's entries.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    ClientError,
    profile::{read_json, write_json},
};

/// Message ids kept for replay detection; the log is compacted to this many.
const MAX_SEEN: usize = 200_000;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ContactPin {
    /// Approved, active card ids (hex) last seen for the contact, with
    /// device names.
    pub(crate) cards: BTreeMap<String, String>,
    /// Pending cards (hex) already reported.
    #[serde(default)]
    pub(crate) pending: BTreeSet<String>,
    /// The card set the user confirmed with a safety number, if any.
    pub(crate) verified: Option<BTreeSet<String>>,
    /// Resets of the contact's device list the user has taken note of (by
    /// verifying them again); fewer than the list holds: warn.
    #[serde(default)]
    pub(crate) acknowledged_resets: u64,
}

/// An identity's device list as this device verified it last.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeviceListPin {
    /// Number of statements verified.
    pub(crate) length: u64,
    /// Hex of the head statement's hash.
    pub(crate) head: String,
    /// Cards (hex) the list trusts.
    pub(crate) trusted: BTreeSet<String>,
    /// Cards (hex) the list trusted once and no longer does, with the Unix
    /// time the key service logged their removal (or reset): messages the
    /// app server stored before then still verify.
    pub(crate) removed: BTreeMap<String, i64>,
    /// Number of resets seen.
    pub(crate) resets: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct State {
    /// Hex of the last verified `SignedCheckpoint`.
    pub(crate) checkpoint: Option<String>,
    pub(crate) contacts: BTreeMap<String, ContactPin>,
    /// Device lists verified so far, by identity (this user's own included).
    #[serde(default)]
    pub(crate) device_lists: BTreeMap<String, DeviceListPin>,
    /// Cards (hex) seen revoked, with a proven revocation: a key service
    /// that shows one as active again is lying.
    #[serde(default)]
    pub(crate) revoked: BTreeSet<String>,
    /// Own cards (hex) the user said they enrolled.
    pub(crate) acknowledged: BTreeSet<String>,
}

fn lock(dir: &Path, name: &str) -> Result<File, ClientError> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ClientError::io(&path, e))?;
    file.lock().map_err(|e| ClientError::io(&path, e))?;
    Ok(file)
}

/// Runs `f` on the profile's state under an exclusive file lock and saves
/// what it leaves (when it changed anything).
pub(crate) fn with_state<T>(dir: &Path, f: impl FnOnce(&mut State) -> T) -> Result<T, ClientError> {
    let guard = lock(dir, "state.lock")?;
    let path = dir.join("state.json");
    let before: State = read_json(&path)?.unwrap_or_default();
    let mut state = before.clone();
    let out = f(&mut state);
    if state != before {
        write_json(&path, &state)?;
    }
    drop(guard);
    Ok(out)
}

/// Reads the state without changing it.
pub(crate) fn read_state(dir: &Path) -> Result<State, ClientError> {
    Ok(read_json(&dir.join("state.json"))?.unwrap_or_default())
}

struct SeenAt {
    channel_id: String,
    index: u64,
    order: u64,
}

#[derive(Default)]
struct Loaded {
    seen: HashMap<String, SeenAt>,
    /// Bytes of `seen.log` already read.
    offset: u64,
    lines: u64,
}

/// The accepted message ids of a profile (`seen.log`).
pub(crate) struct ReplayLog {
    dir: PathBuf,
    loaded: Mutex<Loaded>,
}

impl ReplayLog {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            loaded: Mutex::new(Loaded::default()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("seen.log")
    }

    /// Reads what was appended since the last read (by this or another process).
    fn catch_up(&self, loaded: &mut Loaded) -> Result<(), ClientError> {
        let path = self.path();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ClientError::io(&path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| ClientError::io(&path, e))?
            .len();
        if len < loaded.offset {
            // Compacted by another process: read it whole again.
            *loaded = Loaded::default();
        }
        file.seek(SeekFrom::Start(loaded.offset))
            .map_err(|e| ClientError::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| ClientError::io(&path, e))?;
            if n == 0 || !line.ends_with('\n') {
                break; // the end, or a line still being written
            }
            loaded.offset += n as u64;
            loaded.lines += 1;
            let mut parts = line.trim_end().splitn(3, ' ');
            if let (Some(key), Some(index), Some(channel)) =
                (parts.next(), parts.next(), parts.next())
                && let Ok(index) = index.parse()
            {
                let order = loaded.lines;
                loaded.seen.entry(key.to_owned()).or_insert(SeenAt {
                    channel_id: channel.to_owned(),
                    index,
                    order,
                });
            }
        }
        Ok(())
    }

    /// Records that message `message_id` from `sender_card` was accepted at
    /// (`channel_id`, `index`). `Ok(Err(where))` when the same message was
    /// accepted elsewhere before: a replay. Reading a message again at the
    /// same place is fine.
    pub(crate) fn accept(
        &self,
        sender_card: &str,
        message_id: &str,
        channel_id: &str,
        index: u64,
    ) -> Result<Result<(), (String, u64)>, ClientError> {
        let key = format!("{sender_card}:{message_id}");
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| ClientError::Message("replay log lock poisoned".into()))?;
        if let Some(seen) = loaded.seen.get(&key) {
            return Ok(if seen.channel_id == channel_id && seen.index == index {
                Ok(())
            } else {
                Err((seen.channel_id.clone(), seen.index))
            });
        }
        let guard = lock(&self.dir, "seen.lock")?;
        self.catch_up(&mut loaded)?;
        if let Some(seen) = loaded.seen.get(&key) {
            return Ok(if seen.channel_id == channel_id && seen.index == index {
                Ok(())
            } else {
                Err((seen.channel_id.clone(), seen.index))
            });
        }
        let path = self.path();
        let line = format!("{key} {index} {channel_id}\n");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| ClientError::io(&path, e))?;
        loaded.offset += line.len() as u64;
        loaded.lines += 1;
        let order = loaded.lines;
        loaded.seen.insert(
            key,
            SeenAt {
                channel_id: channel_id.to_owned(),
                index,
                order,
            },
        );
        if loaded.seen.len() > 2 * MAX_SEEN {
            self.compact(&mut loaded)?;
        }
        drop(guard);
        Ok(Ok(()))
    }

    /// Keeps the most recent `MAX_SEEN` entries.
    fn compact(&self, loaded: &mut Loaded) -> Result<(), ClientError> {
        let mut entries: Vec<(&String, &SeenAt)> = loaded.seen.iter().collect();
        entries.sort_unstable_by_key(|(_, s)| std::cmp::Reverse(s.order));
        entries.truncate(MAX_SEEN);
        entries.reverse();
        let mut text = String::new();
        for (key, s) in &entries {
            text.push_str(&format!("{key} {} {}\n", s.index, s.channel_id));
        }
        let path = self.path();
        tessera_crypto::keystore::write_private_file(&path, text.as_bytes()).map_err(|e| {
            ClientError::Profile {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        *loaded = Loaded::default();
        self.catch_up(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_caught_and_rereads_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let log = ReplayLog::new(dir.path());
        assert_eq!(log.accept("card", "m1", "c", 1).unwrap(), Ok(()));
        assert_eq!(
            log.accept("card", "m1", "c", 1).unwrap(),
            Ok(()),
            "reading the same message again"
        );
        assert_eq!(
            log.accept("card", "m1", "c", 9).unwrap(),
            Err(("c".into(), 1))
        );
        assert_eq!(
            log.accept("card", "m1", "d", 1).unwrap(),
            Err(("c".into(), 1))
        );
        assert_eq!(
            log.accept("other", "m1", "c", 2).unwrap(),
            Ok(()),
            "ids are per sender card"
        );
        // Another process (a second log over the same file) sees them.
        let other = ReplayLog::new(dir.path());
        assert_eq!(
            other.accept("card", "m1", "c", 5).unwrap(),
            Err(("c".into(), 1))
        );
        assert_eq!(other.accept("card", "m2", "c", 5).unwrap(), Ok(()));
        assert_eq!(
            log.accept("card", "m2", "c", 6).unwrap(),
            Err(("c".into(), 5))
        );
    }

    #[test]
    fn state_round_trips_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        with_state(dir.path(), |s| s.acknowledged.insert("ab".into())).unwrap();
        assert!(read_state(dir.path()).unwrap().acknowledged.contains("ab"));
    }
}
