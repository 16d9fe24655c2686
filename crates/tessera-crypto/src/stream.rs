//! Attachments as a STREAM (Hoang, Reyhanitabar, Rogaway, Vizár 2015) of
//! AES-256-GCM chunks, in constant memory for any size.
//!
//! ```text
//! stream  = header || chunk*
//! header  = "TSRSTRM1" || nonce (16 random bytes)
//! key     = HKDF-SHA256(ikm = file key, salt = nonce, info = "tessera/v1/file-stream", 32)
//! chunk_i = AES-256-GCM(key, counter_i (11 bytes BE) || last_flag (1 byte), aad = "", 64 KiB or less)
//! ```
//!
//! Every chunk but the last holds exactly 64 KiB of plaintext; the last holds
//! 0..=64 KiB and is the only one with `last_flag = 1` (it is empty only for
//! an empty file). Reordering, truncation, extension and a missing final
//! chunk are each detected.

use std::io::{self, Read, Write};

use ring::hkdf;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::{
    aead::{AeadKey, TAG_LEN},
    random::random_array,
};

/// Plaintext bytes per chunk.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Ciphertext bytes per full chunk.
pub const CHUNK_CIPHERTEXT_SIZE: usize = CHUNK_SIZE + TAG_LEN;
/// Bytes before the first chunk.
pub const HEADER_LEN: usize = MAGIC.len() + NONCE_LEN;

const MAGIC: &[u8; 8] = b"TSRSTRM1";
const NONCE_LEN: usize = 16;
const KDF_INFO: &[u8] = b"tessera/v1/file-stream";
/// The 11-byte counter must not wrap.
const MAX_CHUNKS: u64 = 1 << 40;

/// Why a stream could not be encrypted or decrypted.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("not a Tessera file stream (bad magic)")]
    BadMagic,
    #[error("the stream ends inside its header")]
    TruncatedHeader,
    #[error("the stream was truncated: its final chunk is missing")]
    Truncated,
    #[error(
        "chunk {index} does not authenticate: wrong key, or the stream was altered or reordered"
    )]
    ChunkAuthFailed { index: u64 },
    #[error("data follows the final chunk")]
    TrailingData,
    #[error("the stream is too long")]
    TooLong,
    #[error(transparent)]
    Key(#[from] crate::KeyError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The 32-byte key of one file. Zeroized on drop; cannot be printed.
pub struct FileKey(Zeroizing<[u8; 32]>);

impl FileKey {
    pub fn generate() -> Result<Self, crate::KeyError> {
        Ok(Self(Zeroizing::new(random_array::<32>()?)))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| crate::KeyError::Length {
            what: "file key",
            expected: 32,
            got: bytes.len(),
        })?;
        Ok(Self(Zeroizing::new(arr)))
    }

    /// The key bytes, to put in a `FileAttachment` inside an envelope.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

pub(crate) fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8], len: usize) -> Option<Vec<u8>> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    let okm = prk.expand(&info, Len(len)).ok()?;
    let mut out = vec![0u8; len];
    okm.fill(&mut out).ok()?;
    Some(out)
}

fn payload_key(file_key: &FileKey, nonce: &[u8]) -> AeadKey {
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
    if let Some(okm) = hkdf_sha256(file_key.expose_bytes(), nonce, KDF_INFO, 32) {
        key.copy_from_slice(&okm);
    }
    AeadKey::new(&key)
}

fn chunk_nonce(counter: u64, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[3..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce
}

/// Seals a stream chunk by chunk; for callers that send chunks as they go
/// (the attachment upload). [`encrypt`] is the `Read`/`Write` form.
pub struct Encryptor {
    key: AeadKey,
    counter: u64,
    finished: bool,
}

impl Encryptor {
    /// Starts a stream; returns the encryptor and the header to send first.
    pub fn new(file_key: &FileKey) -> Result<(Self, [u8; HEADER_LEN]), StreamError> {
        let nonce = random_array::<NONCE_LEN>()?;
        let mut header = [0u8; HEADER_LEN];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC.len()..].copy_from_slice(&nonce);
        Ok((
            Self {
                key: payload_key(file_key, &nonce),
                counter: 0,
                finished: false,
            },
            header,
        ))
    }

    /// Encrypts one chunk in place, appending its tag. Every chunk but the
    /// last must be exactly [`CHUNK_SIZE`] bytes.
    pub fn seal_chunk(&mut self, chunk: &mut Vec<u8>, last: bool) -> Result<(), StreamError> {
        let tag = self.seal_chunk_detached(chunk, last)?;
        chunk.extend_from_slice(&tag);
        Ok(())
    }

    fn seal_chunk_detached(
        &mut self,
        chunk: &mut [u8],
        last: bool,
    ) -> Result<[u8; TAG_LEN], StreamError> {
        if self.finished || self.counter >= MAX_CHUNKS {
            return Err(StreamError::TooLong);
        }
        if chunk.len() > CHUNK_SIZE || (!last && chunk.len() != CHUNK_SIZE) {
            return Err(StreamError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the last chunk may be shorter than 64 KiB",
            )));
        }
        let tag = self
            .key
            .seal_in_place_detached(chunk_nonce(self.counter, last), &[], chunk);
        self.counter += 1;
        self.finished = last;
        Ok(tag)
    }
}

/// Opens a stream chunk by chunk. The caller must say which chunk is last
/// (the one followed by end of input); [`decrypt`] does this for a `Read`.
pub struct Decryptor {
    key: AeadKey,
    counter: u64,
    finished: bool,
}

impl Decryptor {
    pub fn new(file_key: &FileKey, header: &[u8]) -> Result<Self, StreamError> {
        if header.len() < HEADER_LEN {
            return Err(StreamError::TruncatedHeader);
        }
        if &header[..MAGIC.len()] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        Ok(Self {
            key: payload_key(file_key, &header[MAGIC.len()..HEADER_LEN]),
            counter: 0,
            finished: false,
        })
    }

    /// Decrypts one chunk in place; returns the plaintext length.
    pub fn open_chunk(&mut self, chunk: &mut [u8], last: bool) -> Result<usize, StreamError> {
        if self.finished {
            return Err(StreamError::TrailingData);
        }
        if self.counter >= MAX_CHUNKS {
            return Err(StreamError::TooLong);
        }
        let index = self.counter;
        // ring clears the buffer when authentication fails; keep a copy of a
        // final chunk to tell truncation from tampering.
        let saved = last.then(|| chunk.to_vec());
        match self.key.open_in_place(chunk_nonce(index, last), &[], chunk) {
            Ok(len) if last && len == 0 && index > 0 => {
                // Only an empty file has an empty final chunk.
                Err(StreamError::ChunkAuthFailed { index })
            }
            Ok(len) => {
                self.counter += 1;
                self.finished = last;
                Ok(len)
            }
            Err(_) if last => {
                // A valid non-final chunk at the end means the rest was cut off.
                let mut probe = saved.unwrap_or_default();
                if self
                    .key
                    .open_in_place(chunk_nonce(index, false), &[], &mut probe)
                    .is_ok()
                {
                    Err(StreamError::Truncated)
                } else {
                    Err(StreamError::ChunkAuthFailed { index })
                }
            }
            Err(_) => Err(StreamError::ChunkAuthFailed { index }),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Encrypts everything `reader` yields into `writer`; returns the plaintext size.
pub fn encrypt(
    file_key: &FileKey,
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<u64, StreamError> {
    let (mut enc, header) = Encryptor::new(file_key)?;
    writer.write_all(&header)?;
    // One byte past the chunk tells whether more input follows a full chunk;
    // it is carried over to the front of the next chunk.
    let mut buf = vec![0u8; CHUNK_SIZE + 1];
    let mut carried = 0usize;
    let mut total = 0u64;
    loop {
        let n = carried + read_full(&mut reader, &mut buf[carried..])?;
        let last = n <= CHUNK_SIZE;
        let len = n.min(CHUNK_SIZE);
        let tag = enc.seal_chunk_detached(&mut buf[..len], last)?;
        writer.write_all(&buf[..len])?;
        writer.write_all(&tag)?;
        total += len as u64;
        if last {
            writer.flush()?;
            return Ok(total);
        }
        buf[0] = buf[CHUNK_SIZE];
        carried = 1;
    }
}

/// Decrypts a stream from `reader` into `writer`; returns the plaintext size.
/// Nothing unauthenticated is written: each chunk is checked before its
/// plaintext goes out, and a failure stops the stream.
pub fn decrypt(
    file_key: &FileKey,
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<u64, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    if read_full(&mut reader, &mut header)? < HEADER_LEN {
        return Err(StreamError::TruncatedHeader);
    }
    let mut dec = Decryptor::new(file_key, &header)?;
    let mut buf = vec![0u8; CHUNK_CIPHERTEXT_SIZE + 1];
    let mut carried = 0usize;
    let mut total = 0u64;
    loop {
        let n = carried + read_full(&mut reader, &mut buf[carried..])?;
        let last = n <= CHUNK_CIPHERTEXT_SIZE;
        let chunk_len = n.min(CHUNK_CIPHERTEXT_SIZE);
        if chunk_len < TAG_LEN {
            return Err(if dec.counter == 0 && chunk_len == 0 {
                StreamError::Truncated
            } else {
                StreamError::ChunkAuthFailed { index: dec.counter }
            });
        }
        let spare = buf[CHUNK_CIPHERTEXT_SIZE];
        let len = dec.open_chunk(&mut buf[..chunk_len], last)?;
        writer.write_all(&buf[..len])?;
        total += len as u64;
        if last {
            writer.flush()?;
            return Ok(total);
        }
        buf[0] = spare;
        carried = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(key: &FileKey, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encrypt(key, data, &mut out).unwrap();
        out
    }

    fn dec(key: &FileKey, data: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        decrypt(key, data, &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let key = FileKey::generate().unwrap();
        for len in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE,
            3 * CHUNK_SIZE + 7,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let ct = enc(&key, &data);
            let chunks = len.div_ceil(CHUNK_SIZE).max(1);
            assert_eq!(ct.len(), HEADER_LEN + len + chunks * TAG_LEN, "len {len}");
            assert_eq!(dec(&key, &ct).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn truncation_is_detected() {
        let key = FileKey::generate().unwrap();
        let data = vec![7u8; 2 * CHUNK_SIZE + 100];
        let ct = enc(&key, &data);
        // Cut at a chunk boundary: the remaining final chunk is not marked last.
        let cut = HEADER_LEN + 2 * CHUNK_CIPHERTEXT_SIZE;
        assert!(matches!(dec(&key, &ct[..cut]), Err(StreamError::Truncated)));
        // Cut inside a chunk.
        assert!(matches!(
            dec(&key, &ct[..cut - 5]),
            Err(StreamError::ChunkAuthFailed { index: 1 })
        ));
        // Only the header left.
        assert!(matches!(
            dec(&key, &ct[..HEADER_LEN]),
            Err(StreamError::Truncated)
        ));
        assert!(matches!(
            dec(&key, &ct[..5]),
            Err(StreamError::TruncatedHeader)
        ));
    }

    #[test]
    fn reordering_extension_and_tampering_are_detected() {
        let key = FileKey::generate().unwrap();
        let data: Vec<u8> = (0..3 * CHUNK_SIZE + 10).map(|i| (i % 253) as u8).collect();
        let ct = enc(&key, &data);
        let c = |i: usize| HEADER_LEN + i * CHUNK_CIPHERTEXT_SIZE;
        let mut swapped = ct[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&ct[c(1)..c(2)]);
        swapped.extend_from_slice(&ct[c(0)..c(1)]);
        swapped.extend_from_slice(&ct[c(2)..]);
        assert!(matches!(
            dec(&key, &swapped),
            Err(StreamError::ChunkAuthFailed { index: 0 })
        ));

        let mut extended = ct.clone();
        extended.extend_from_slice(&ct[c(0)..c(1)]);
        assert!(dec(&key, &extended).is_err());
        let mut one_more_byte = ct.clone();
        one_more_byte.push(0);
        assert!(dec(&key, &one_more_byte).is_err());

        let mut flipped = ct.clone();
        flipped[c(2) + 3] ^= 1;
        assert!(matches!(
            dec(&key, &flipped),
            Err(StreamError::ChunkAuthFailed { index: 2 })
        ));

        let other = FileKey::generate().unwrap();
        assert!(matches!(
            dec(&other, &ct),
            Err(StreamError::ChunkAuthFailed { index: 0 })
        ));
        let mut bad_magic = ct.clone();
        bad_magic[0] = b'X';
        assert!(matches!(dec(&key, &bad_magic), Err(StreamError::BadMagic)));
    }

    #[test]
    fn final_chunk_of_a_full_multiple_cannot_be_dropped() {
        let key = FileKey::generate().unwrap();
        let data = vec![1u8; 2 * CHUNK_SIZE];
        let ct = enc(&key, &data);
        assert_eq!(ct.len(), HEADER_LEN + 2 * CHUNK_CIPHERTEXT_SIZE);
        assert!(matches!(
            dec(&key, &ct[..HEADER_LEN + CHUNK_CIPHERTEXT_SIZE]),
            Err(StreamError::Truncated)
        ));
    }
}
