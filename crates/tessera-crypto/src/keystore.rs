//! Key files: a device's ClientKey, the OrgKey, and the services' signing keys.
//!
//! ```text
//! file       = magic "TSRKEYS1" || version (1) || protection || [kdf params] || body || sha256(all before)
//! protection = 0: none (body = plaintext; the file's 0600 mode is the protection)
//!              1: Argon2id v19: m_cost u32 BE (KiB) || t_cost u32 BE || p_cost u32 BE || salt (16) || nonce (12)
//!                 body = AES-256-GCM(Argon2id(passphrase, salt), nonce, aad = header, plaintext)
//! plaintext  = kind (1: signing, 2: signing + encryption) || Ed25519 seed (32) || [X25519 secret (32)]
//! ```
//!
//! The trailing SHA-256 tells a damaged file ([`KeystoreError::Corrupted`])
//! from a wrong passphrase ([`KeystoreError::WrongPassphrase`]).

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use argon2::{Algorithm, Argon2, Params, Version};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::{EncryptionSecret, SigningKey, aead, random::random_array, sha256};

const MAGIC: &[u8; 8] = b"TSRKEYS1";
const VERSION: u8 = 1;
const PROTECTION_NONE: u8 = 0;
const PROTECTION_ARGON2ID: u8 = 1;
const KIND_SIGNING: u8 = 1;
const KIND_DEVICE: u8 = 2;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const CHECKSUM_LEN: usize = 32;
/// Largest Argon2id memory cost accepted from a file (4 GiB), so a crafted
/// file cannot make us allocate without bound.
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 16;

/// Why a key file could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeystoreError {
    #[error("not a Tessera key file")]
    NotAKeystore,
    #[error("unsupported key file version {0}")]
    UnsupportedVersion(u8),
    #[error("the key file is truncated")]
    Truncated,
    #[error("the key file is corrupted (checksum mismatch)")]
    Corrupted,
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("the key file is protected by a passphrase, and none was given")]
    PassphraseRequired,
    #[error("the key file holds {found} but {wanted} was expected")]
    WrongKind {
        found: &'static str,
        wanted: &'static str,
    },
    #[error("unsupported key file protection: {0}")]
    BadParameters(String),
    #[error(transparent)]
    Key(#[from] crate::KeyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended option).
    pub const DEFAULT: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// Cheap parameters for tests only: never protect a real key with these.
    pub const DANGER_FAST_FOR_TESTS: Self = Self {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    };
}

/// How a key file is protected at rest.
pub enum Protection<'a> {
    /// Plain, relying on the file's 0600 mode (service keys that must start unattended).
    None,
    /// Argon2id(passphrase) + AES-256-GCM.
    Passphrase(&'a [u8], KdfParams),
}

/// The secret contents of a key file.
pub enum KeyMaterial {
    /// An Ed25519 key alone (AppKey, token key, key-service key).
    Signing(SigningKey),
    /// Ed25519 + X25519 (a device's ClientKey, the OrgKey).
    Device(crate::DeviceKeys),
}

impl KeyMaterial {
    fn kind_name(kind: u8) -> &'static str {
        match kind {
            KIND_SIGNING => "a signing key",
            KIND_DEVICE => "device keys",
            _ => "an unknown key kind",
        }
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        match self {
            Self::Signing(k) => encode_signing(k),
            Self::Device(d) => encode_device(d),
        }
    }

    fn decode(plain: &[u8]) -> Result<Self, KeystoreError> {
        let seed = |b: &[u8]| -> Result<SigningKey, KeystoreError> {
            let arr: Zeroizing<[u8; 32]> =
                Zeroizing::new(b.try_into().map_err(|_| KeystoreError::Corrupted)?);
            Ok(SigningKey::from_seed(&arr)?)
        };
        match plain.first() {
            Some(&KIND_SIGNING) if plain.len() == 33 => Ok(Self::Signing(seed(&plain[1..33])?)),
            Some(&KIND_DEVICE) if plain.len() == 65 => {
                let mut x = Zeroizing::new([0u8; 32]);
                x.copy_from_slice(&plain[33..65]);
                Ok(Self::Device(crate::DeviceKeys {
                    signing: seed(&plain[1..33])?,
                    encryption: EncryptionSecret::from_bytes(*x),
                }))
            }
            _ => Err(KeystoreError::Corrupted),
        }
    }

    /// The signing key, if this is a signing-only file.
    pub fn into_signing(self) -> Result<SigningKey, KeystoreError> {
        match self {
            Self::Signing(k) => Ok(k),
            Self::Device(_) => Err(KeystoreError::WrongKind {
                found: Self::kind_name(KIND_DEVICE),
                wanted: Self::kind_name(KIND_SIGNING),
            }),
        }
    }

    /// The device keys, if this is a device (or org) key file.
    pub fn into_device(self) -> Result<crate::DeviceKeys, KeystoreError> {
        match self {
            Self::Device(d) => Ok(d),
            Self::Signing(_) => Err(KeystoreError::WrongKind {
                found: Self::kind_name(KIND_SIGNING),
                wanted: Self::kind_name(KIND_DEVICE),
            }),
        }
    }
}

fn encode_signing(key: &SigningKey) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(33));
    out.push(KIND_SIGNING);
    out.extend_from_slice(key.seed());
    out
}

fn encode_device(keys: &crate::DeviceKeys) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(65));
    out.push(KIND_DEVICE);
    out.extend_from_slice(keys.signing.seed());
    out.extend_from_slice(keys.encryption.as_bytes());
    out
}

fn derive_key(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, KeystoreError> {
    let p = Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(32))
        .map_err(|e| KeystoreError::BadParameters(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|e| KeystoreError::BadParameters(e.to_string()))?;
    Ok(key)
}

/// Serialises key material into the key file format.
pub fn seal(material: &KeyMaterial, protection: &Protection<'_>) -> Result<Vec<u8>, KeystoreError> {
    seal_plain(&material.encode(), protection, None)
}

/// [`seal`] with the Argon2id salt and the AES-GCM nonce given: test
/// vectors only ([`crate::hazmat::keystore_seal_with`]).
pub(crate) fn seal_with(
    material: &KeyMaterial,
    protection: &Protection<'_>,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, KeystoreError> {
    seal_plain(&material.encode(), protection, Some((salt, nonce)))
}

/// Serialises a device's (or organisation's) keys into the key file format.
pub fn seal_device(
    keys: &crate::DeviceKeys,
    protection: &Protection<'_>,
) -> Result<Vec<u8>, KeystoreError> {
    seal_plain(&encode_device(keys), protection, None)
}

/// Seals device keys and writes them to `path` (atomic, 0600).
pub fn save_device(
    path: &Path,
    keys: &crate::DeviceKeys,
    protection: &Protection<'_>,
) -> Result<(), KeystoreError> {
    write_private_file(path, &seal_device(keys, protection)?)
}

fn seal_plain(
    plain: &[u8],
    protection: &Protection<'_>,
    fixed: Option<([u8; SALT_LEN], [u8; NONCE_LEN])>,
) -> Result<Vec<u8>, KeystoreError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    match protection {
        Protection::None => {
            out.push(PROTECTION_NONE);
            out.extend_from_slice(plain);
        }
        Protection::Passphrase(passphrase, params) => {
            if params.m_cost_kib > MAX_M_COST_KIB
                || params.t_cost > MAX_T_COST
                || params.p_cost > MAX_P_COST
            {
                return Err(KeystoreError::BadParameters(
                    "Argon2id cost above the supported maximum".into(),
                ));
            }
            out.push(PROTECTION_ARGON2ID);
            out.extend_from_slice(&params.m_cost_kib.to_be_bytes());
            out.extend_from_slice(&params.t_cost.to_be_bytes());
            out.extend_from_slice(&params.p_cost.to_be_bytes());
            let (salt, nonce) = match fixed {
                Some(f) => f,
                None => (random_array::<SALT_LEN>()?, random_array::<NONCE_LEN>()?),
            };
            out.extend_from_slice(&salt);
            out.extend_from_slice(&nonce);
            let key = derive_key(passphrase, &salt, *params)?;
            let ciphertext = aead::seal(&key, nonce, &out, plain);
            out.extend_from_slice(&ciphertext);
        }
    }
    let checksum = sha256(&out);
    out.extend_from_slice(&checksum);
    Ok(out)
}

/// Whether a key file needs a passphrase, without opening it.
pub fn is_protected(bytes: &[u8]) -> Result<bool, KeystoreError> {
    check_frame(bytes).map(|body| body.protection == PROTECTION_ARGON2ID)
}

struct Frame<'a> {
    protection: u8,
    content: &'a [u8],
}

fn check_frame(bytes: &[u8]) -> Result<Frame<'_>, KeystoreError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(if MAGIC.starts_with(bytes) && !bytes.is_empty() {
            KeystoreError::Truncated
        } else {
            KeystoreError::NotAKeystore
        });
    }
    let version = *bytes.get(8).ok_or(KeystoreError::Truncated)?;
    if version != VERSION {
        return Err(KeystoreError::UnsupportedVersion(version));
    }
    let protection = *bytes.get(9).ok_or(KeystoreError::Truncated)?;
    let min_len = match protection {
        PROTECTION_NONE => 10 + 33 + CHECKSUM_LEN,
        PROTECTION_ARGON2ID => 10 + 12 + SALT_LEN + NONCE_LEN + 33 + aead::TAG_LEN + CHECKSUM_LEN,
        other => {
            return Err(KeystoreError::BadParameters(format!(
                "protection scheme {other}"
            )));
        }
    };
    if bytes.len() < min_len {
        return Err(KeystoreError::Truncated);
    }
    let (content, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if !crate::ct_eq(&sha256(content), checksum) {
        return Err(KeystoreError::Corrupted);
    }
    Ok(Frame {
        protection,
        content,
    })
}

/// Parses a key file, decrypting it with `passphrase` when it is protected.
pub fn open(bytes: &[u8], passphrase: Option<&[u8]>) -> Result<KeyMaterial, KeystoreError> {
    let frame = check_frame(bytes)?;
    match frame.protection {
        PROTECTION_NONE => KeyMaterial::decode(&frame.content[10..]),
        _ => {
            let passphrase = passphrase.ok_or(KeystoreError::PassphraseRequired)?;
            let c = frame.content;
            let u32_at = |i: usize| u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
            let params = KdfParams {
                m_cost_kib: u32_at(10),
                t_cost: u32_at(14),
                p_cost: u32_at(18),
            };
            if params.m_cost_kib > MAX_M_COST_KIB
                || params.t_cost > MAX_T_COST
                || params.p_cost > MAX_P_COST
            {
                return Err(KeystoreError::BadParameters(
                    "Argon2id cost above the supported maximum".into(),
                ));
            }
            let salt = &c[22..22 + SALT_LEN];
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&c[22 + SALT_LEN..22 + SALT_LEN + NONCE_LEN]);
            let header_len = 22 + SALT_LEN + NONCE_LEN;
            let key = derive_key(passphrase, salt, params)?;
            let plain = Zeroizing::new(
                aead::open(&key, nonce, &c[..header_len], &c[header_len..])
                    .map_err(|_| KeystoreError::WrongPassphrase)?,
            );
            KeyMaterial::decode(&plain)
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename,
/// fsync of the directory) with mode 0600.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    let io_err = |source| KeystoreError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        hex::encode(random_array::<6>()?)
    ));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// Seals `material` and writes it to `path` (atomic, 0600).
pub fn save(
    path: &Path,
    material: &KeyMaterial,
    protection: &Protection<'_>,
) -> Result<(), KeystoreError> {
    write_private_file(path, &seal(material, protection)?)
}

/// Reads and opens the key file at `path`.
pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<KeyMaterial, KeystoreError> {
    let bytes = fs::read(path).map_err(|source| KeystoreError::Io {
        path: path.to_owned(),
        source,
    })?;
    open(&bytes, passphrase)
}

/// Loads the signing key at `path`, or generates one and saves it (0600)
/// when the file does not exist yet. Returns the key and whether it is new.
pub fn load_or_generate_signing(path: &Path) -> Result<(SigningKey, bool), KeystoreError> {
    match fs::metadata(path) {
        Ok(_) => Ok((load(path, None)?.into_signing()?, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = SigningKey::generate()?;
            let material = KeyMaterial::Signing(key);
            save(path, &material, &Protection::None)?;
            Ok((material.into_signing()?, true))
        }
        Err(source) => Err(KeystoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceKeys;

    const FAST: KdfParams = KdfParams::DANGER_FAST_FOR_TESTS;

    fn device_file(pass: &[u8]) -> (Vec<u8>, [u8; 32], [u8; 32]) {
        let keys = DeviceKeys::generate().unwrap();
        let vk = *keys.signing.verifying_key().as_bytes();
        let ek = *keys.encryption.public_key().as_bytes();
        let bytes = seal(
            &KeyMaterial::Device(keys),
            &Protection::Passphrase(pass, FAST),
        )
        .unwrap();
        (bytes, vk, ek)
    }

    #[test]
    fn round_trip_with_passphrase() {
        let (bytes, vk, ek) = device_file(b"correct horse");
        assert!(is_protected(&bytes).unwrap());
        let keys = open(&bytes, Some(b"correct horse"))
            .unwrap()
            .into_device()
            .unwrap();
        assert_eq!(keys.signing.verifying_key().as_bytes(), &vk);
        assert_eq!(keys.encryption.public_key().as_bytes(), &ek);
    }

    #[test]
    fn each_failure_is_distinct() {
        let (bytes, ..) = device_file(b"pw");
        assert!(matches!(
            open(&bytes, Some(b"nope")),
            Err(KeystoreError::WrongPassphrase)
        ));
        assert!(matches!(
            open(&bytes, None),
            Err(KeystoreError::PassphraseRequired)
        ));
        assert!(matches!(
            open(&bytes[..40], Some(b"pw")),
            Err(KeystoreError::Truncated)
        ));
        assert!(matches!(
            open(&bytes[..4], Some(b"pw")),
            Err(KeystoreError::Truncated)
        ));
        let mut corrupted = bytes.clone();
        corrupted[50] ^= 0x10;
        assert!(matches!(
            open(&corrupted, Some(b"pw")),
            Err(KeystoreError::Corrupted)
        ));
        let mut future = bytes.clone();
        future[8] = 9;
        assert!(matches!(
            open(&future, Some(b"pw")),
            Err(KeystoreError::UnsupportedVersion(9))
        ));
        assert!(matches!(
            open(b"hello world, not a key", None),
            Err(KeystoreError::NotAKeystore)
        ));
        assert!(matches!(open(b"", None), Err(KeystoreError::NotAKeystore)));
    }

    #[test]
    fn kind_is_checked() {
        let bytes = seal(
            &KeyMaterial::Signing(SigningKey::generate().unwrap()),
            &Protection::None,
        )
        .unwrap();
        assert!(!is_protected(&bytes).unwrap());
        assert!(matches!(
            open(&bytes, None).unwrap().into_device(),
            Err(KeystoreError::WrongKind { .. })
        ));
    }

    #[test]
    fn files_are_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/app.key");
        let (key, fresh) = load_or_generate_signing(&path).unwrap();
        assert!(fresh);
        let (again, fresh) = load_or_generate_signing(&path).unwrap();
        assert!(!fresh);
        assert_eq!(key.verifying_key(), again.verifying_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn absurd_kdf_costs_in_a_file_are_refused() {
        let (mut bytes, ..) = device_file(b"pw");
        bytes[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        let len = bytes.len();
        let sum = sha256(&bytes[..len - 32]);
        bytes[len - 32..].copy_from_slice(&sum);
        assert!(matches!(
            open(&bytes, Some(b"pw")),
            Err(KeystoreError::BadParameters(_))
        ));
    }
}
