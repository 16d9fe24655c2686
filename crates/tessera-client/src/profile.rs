//! Device profiles on disk.
//!
//! ```text
//! <home>/profiles/<name>/profile.json   what the device is and where its services are (0600)
//! <home>/profiles/<name>/device.key     the ClientKey, Argon2id + AES-256-GCM (0600)
//! <home>/profiles/<name>/state.json     pins, verified contacts, last checkpoint (0600)
//! <home>/profiles/<name>/seen.log       message ids accepted, for replay detection
//! <home>/created-cards.json             cards enrolled from this home, per identity
//! ```
//!
//! Several profiles in one home are several devices (of one user or more).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tessera_crypto::keystore;

use crate::ClientError;

const PROFILE_VERSION: u32 = 1;

/// Where a device's services are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub server_url: String,
    pub kms_url: String,
    /// The organisation's backup service, when there is one.
    pub backup_url: Option<String>,
    /// CA certificate (PEM) to trust for `https` services.
    pub ca_cert: Option<PathBuf>,
}

/// The non-secret description of one device profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileConfig {
    pub version: u32,
    pub identity: String,
    pub device_name: String,
    /// Hex card id of this device's ClientCard.
    pub card_id: String,
    pub endpoints: Endpoints,
    /// Pinned keys (hex): every card and checkpoint is checked against them.
    pub app_public_key: String,
    pub kms_public_key: String,
    /// The organisation's identity, when the app server has one.
    pub org_identity: Option<String>,
    pub created_at: i64,
}

/// A directory of device profiles (`TESSERA_HOME`).
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Points profile `name` at services that moved (new addresses; the
    /// pinned keys stay, so services with other keys are still refused).
    pub fn set_endpoints(&self, name: &str, endpoints: Endpoints) -> Result<(), ClientError> {
        validate_profile_name(name)?;
        let dir = self.profile_dir(name);
        let mut config = ProfileConfig::load(&dir)?;
        config.endpoints = endpoints;
        config.save(&dir)
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn profile_dir(&self, name: &str) -> PathBuf {
        self.root.join("profiles").join(name)
    }

    /// Names of the profiles in this home.
    pub fn profiles(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.root.join("profiles"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().join("profile.json").exists())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    fn created_path(&self) -> PathBuf {
        self.root.join("created-cards.json")
    }

    /// Card ids enrolled from this home for `identity`.
    pub fn created_cards(&self, identity: &str) -> BTreeSet<String> {
        read_json::<BTreeMap<String, BTreeSet<String>>>(&self.created_path())
            .ok()
            .flatten()
            .and_then(|mut m| m.remove(identity))
            .unwrap_or_default()
    }

    pub(crate) fn record_created(&self, identity: &str, card_id: &str) -> Result<(), ClientError> {
        let path = self.created_path();
        let mut all: BTreeMap<String, BTreeSet<String>> = read_json(&path)?.unwrap_or_default();
        all.entry(identity.to_owned())
            .or_default()
            .insert(card_id.to_owned());
        write_json(&path, &all)
    }
}

/// Profile names become directory names: keep them simple.
pub fn validate_profile_name(name: &str) -> Result<(), ClientError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.');
    if !ok {
        return Err(ClientError::Usage(format!(
            "profile name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
) -> Result<Option<T>, ClientError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Profile {
                path: path.to_owned(),
                reason: format!("unreadable ({e}); restore it from a backup or remove the profile"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClientError::io(path, e)),
    }
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ClientError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ClientError::Profile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    keystore::write_private_file(path, &bytes).map_err(|e| ClientError::Profile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl ProfileConfig {
    pub(crate) fn new_version() -> u32 {
        PROFILE_VERSION
    }

    pub(crate) fn load(dir: &Path) -> Result<Self, ClientError> {
        let path = dir.join("profile.json");
        let config: Self = read_json(&path)?.ok_or_else(|| ClientError::NotFound {
            what: "profile",
            name: dir.display().to_string(),
        })?;
        if config.version != PROFILE_VERSION {
            return Err(ClientError::Profile {
                path,
                reason: format!("version {} is not supported", config.version),
            });
        }
        Ok(config)
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<(), ClientError> {
        write_json(&dir.join("profile.json"), self)
    }
}
