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
        Ok(Self::with_nonce(file_key, random_array::<NONCE_LEN>()?))
    }

    /// A stream with the given nonce: test vectors only.
    pub(crate) fn with_nonce(
        file_key: &FileKey,
        nonce: [u8; NONCE_LEN],
    ) -> (Self, [u8; HEADER_LEN]) {
        let mut header = [0u8; HEADER_LEN];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC.len()..].copy_from_slice(&nonce);
        (
            Self {
                key: payload_key(file_key, &nonce),
                counter: 0,
                finished: false,
            },
            header,
        )
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

/// Chunks per batch: the unit handed between the I/O thread and the AES-GCM
/// thread (about 1 MiB; two batches are alive at once).
const BATCH_CHUNKS: usize = 16;
/// Each chunk has a slot of this size in a batch, room for its tag.
const SLOT: usize = CHUNK_CIPHERTEXT_SIZE;

/// Up to [`BATCH_CHUNKS`] chunks, laid out one per [`SLOT`].
struct Batch {
    buf: Vec<u8>,
    /// Per chunk: bytes read, bytes to write after processing, final flag.
    chunks: Vec<(usize, usize, bool)>,
}

impl Batch {
    fn new() -> Self {
        Self {
            // One byte past the last slot: the look-ahead of its read.
            buf: vec![0u8; BATCH_CHUNKS * SLOT + 1],
            chunks: Vec::with_capacity(BATCH_CHUNKS),
        }
    }

    fn is_last(&self) -> bool {
        self.chunks.last().is_some_and(|c| c.2)
    }

    /// Fills the batch with chunks of `size` input bytes. One byte more is
    /// read each time to learn whether input follows (a chunk is final only
    /// if nothing does); it lands in the slot's spare room and is carried
    /// to the front of the next chunk.
    fn read(
        &mut self,
        reader: &mut impl Read,
        size: usize,
        carry: &mut Option<u8>,
    ) -> io::Result<()> {
        self.chunks.clear();
        for i in 0..BATCH_CHUNKS {
            let slot = &mut self.buf[i * SLOT..i * SLOT + size + 1];
            let carried = match carry.take() {
                Some(byte) => {
                    slot[0] = byte;
                    1
                }
                None => 0,
            };
            let n = carried + read_full(reader, &mut slot[carried..])?;
            let last = n <= size;
            self.chunks.push((n.min(size), 0, last));
            if last {
                break;
            }
            *carry = Some(slot[size]);
        }
        Ok(())
    }

    fn write(&self, writer: &mut impl Write) -> io::Result<()> {
        for (i, &(_, out, _)) in self.chunks.iter().enumerate() {
            writer.write_all(&self.buf[i * SLOT..i * SLOT + out])?;
        }
        Ok(())
    }
}

/// Reads, processes and writes batches in order. Once the input is longer
/// than one batch (and a second core exists), `process` runs on its own
/// thread one batch behind, so reading and writing (copies as costly as the
/// AES-GCM itself) overlap the cryptography. Output order and error
/// behaviour are those of the plain loop: nothing of a batch that failed is
/// written, and nothing after it is read.
fn run_batches(
    mut read: impl FnMut(&mut Batch) -> Result<(), StreamError>,
    mut process: impl FnMut(&mut Batch) -> Result<(), StreamError> + Send,
    mut write: impl FnMut(&Batch) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    let mut batch = Batch::new();
    read(&mut batch)?;
    let parallel = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    if batch.is_last() || !parallel {
        loop {
            process(&mut batch)?;
            write(&batch)?;
            if batch.is_last() {
                return Ok(());
            }
            read(&mut batch)?;
        }
    }
    std::thread::scope(|scope| {
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Batch>(1);
        let (done_tx, done) = std::sync::mpsc::sync_channel::<(Batch, Result<(), StreamError>)>(1);
        scope.spawn(move || {
            for mut batch in job_rx {
                let result = process(&mut batch);
                let failed = result.is_err();
                if done_tx.send((batch, result)).is_err() || failed {
                    break;
                }
            }
        });
        let result = (|| {
            // The worker seals (or opens) batch k+1 while this thread
            // writes batch k and reads batch k+2 into the same buffer.
            let mut reading = !batch.is_last();
            jobs.send(batch).map_err(|_| worker_gone())?;
            let mut in_flight = 1usize;
            let mut next = None;
            if reading {
                let mut batch = Batch::new();
                read(&mut batch)?;
                reading = !batch.is_last();
                next = Some(batch);
            }
            while in_flight > 0 {
                let (mut batch, result) = done.recv().map_err(|_| worker_gone())?;
                in_flight -= 1;
                result?;
                if let Some(queued) = next.take() {
                    // The worker stops early only after reporting an error,
                    // and that report has been checked just above.
                    jobs.send(queued).map_err(|_| worker_gone())?;
                    in_flight += 1;
                }
                write(&batch)?;
                if reading {
                    read(&mut batch)?;
                    reading = !batch.is_last();
                    next = Some(batch);
                }
            }
            Ok(())
        })();
        // Ends the worker: no more jobs, and nobody to report to.
        drop(jobs);
        drop(done);
        result
    })
}

fn worker_gone() -> StreamError {
    StreamError::Io(io::Error::other("the stream worker thread stopped"))
}

/// Encrypts everything `reader` yields into `writer`; returns the plaintext size.
pub fn encrypt(
    file_key: &FileKey,
    reader: impl Read,
    writer: impl Write,
) -> Result<u64, StreamError> {
    encrypt_with(Encryptor::new(file_key)?, reader, writer)
}

/// [`encrypt`] with the stream's nonce given: test vectors only.
pub(crate) fn encrypt_with_nonce(
    file_key: &FileKey,
    nonce: [u8; NONCE_LEN],
    reader: impl Read,
    writer: impl Write,
) -> Result<u64, StreamError> {
    encrypt_with(Encryptor::with_nonce(file_key, nonce), reader, writer)
}

fn encrypt_with(
    (mut enc, header): (Encryptor, [u8; HEADER_LEN]),
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<u64, StreamError> {
    writer.write_all(&header)?;
    let mut carry = None;
    let mut total = 0u64;
    run_batches(
        |batch| Ok(batch.read(&mut reader, CHUNK_SIZE, &mut carry)?),
        |batch| {
            for (i, chunk) in batch.chunks.iter_mut().enumerate() {
                let (len, out, last) = chunk;
                let slot = &mut batch.buf[i * SLOT..(i + 1) * SLOT];
                let tag = enc.seal_chunk_detached(&mut slot[..*len], *last)?;
                slot[*len..*len + TAG_LEN].copy_from_slice(&tag);
                *out = *len + TAG_LEN;
            }
            Ok(())
        },
        |batch| {
            batch.write(&mut writer)?;
            total += batch.chunks.iter().map(|c| c.0 as u64).sum::<u64>();
            Ok(())
        },
    )?;
    writer.flush()?;
    Ok(total)
}

/// Decrypts a stream from `reader` into `writer`; returns the plaintext size.
/// Nothing unauthenticated is written: chunks are checked before their
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
    let mut carry = None;
    let mut total = 0u64;
    run_batches(
        // A slot's look-ahead byte is the next slot's first byte.
        |batch| Ok(batch.read(&mut reader, SLOT, &mut carry)?),
        |batch| {
            for (i, chunk) in batch.chunks.iter_mut().enumerate() {
                let (len, out, last) = chunk;
                if *len < TAG_LEN {
                    return Err(if dec.counter == 0 && *len == 0 {
                        StreamError::Truncated
                    } else {
                        StreamError::ChunkAuthFailed { index: dec.counter }
                    });
                }
                *out = dec.open_chunk(&mut batch.buf[i * SLOT..i * SLOT + *len], *last)?;
            }
            Ok(())
        },
        |batch| {
            batch.write(&mut writer)?;
            total += batch.chunks.iter().map(|c| c.1 as u64).sum::<u64>();
            Ok(())
        },
    )?;
    writer.flush()?;
    Ok(total)
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

    /// Yields its data in reads of varying small sizes.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = self.1 % 7919 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Fails after `ok` bytes.
    struct FailAfter(usize);

    impl Read for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = self.0.min(buf.len());
            buf[..n].fill(9);
            self.0 -= n;
            Ok(n)
        }
    }

    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk full"));
            }
            let n = self.0.min(buf.len());
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn round_trips_across_batches_and_short_reads() {
        let key = FileKey::generate().unwrap();
        let batch = BATCH_CHUNKS * CHUNK_SIZE;
        for len in [
            batch - 1,
            batch,
            batch + 1,
            2 * batch,
            2 * batch + CHUNK_SIZE,
            5 * batch + 12345,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
            let ct = enc(&key, &data);
            let chunks = len.div_ceil(CHUNK_SIZE).max(1);
            assert_eq!(ct.len(), HEADER_LEN + len + chunks * TAG_LEN, "len {len}");
            assert_eq!(dec(&key, &ct).unwrap(), data, "len {len}");
            // Readers that return a few bytes at a time give the same result.
            let mut trickled = Vec::new();
            let n = encrypt(&key, Trickle(&data, 0), &mut trickled).unwrap();
            assert_eq!(n, len as u64);
            let mut back = Vec::new();
            decrypt(&key, Trickle(&trickled, 0), &mut back).unwrap();
            assert_eq!(back, data, "len {len}");
        }
    }

    #[test]
    fn damage_in_a_later_batch_is_detected_and_nothing_of_it_is_written() {
        let key = FileKey::generate().unwrap();
        let data = vec![5u8; 3 * BATCH_CHUNKS * CHUNK_SIZE + 99];
        let ct = enc(&key, &data);
        let c = |i: usize| HEADER_LEN + i * CHUNK_CIPHERTEXT_SIZE;
        let index = 2 * BATCH_CHUNKS + 3;
        let mut flipped = ct.clone();
        flipped[c(index) + 10] ^= 0x80;
        let mut out = Vec::new();
        let err = decrypt(&key, flipped.as_slice(), &mut out).unwrap_err();
        assert!(
            matches!(err, StreamError::ChunkAuthFailed { index: i } if i == index as u64),
            "{err}"
        );
        // Whole batches before the damaged one went out, nothing after.
        assert_eq!(out.len(), 2 * BATCH_CHUNKS * CHUNK_SIZE);
        assert_eq!(out, data[..out.len()]);
        // Cut at a chunk boundary in the third batch.
        assert!(matches!(
            dec(&key, &ct[..c(index)]),
            Err(StreamError::Truncated)
        ));
    }

    #[test]
    fn io_errors_end_the_stream_with_the_error() {
        let key = FileKey::generate().unwrap();
        for fail_at in [0, 100, 3 * BATCH_CHUNKS * CHUNK_SIZE + 5] {
            let err = encrypt(&key, FailAfter(fail_at), Vec::new()).unwrap_err();
            assert!(err.to_string().contains("disk on fire"), "{err}");
        }
        let data = vec![1u8; 4 * BATCH_CHUNKS * CHUNK_SIZE];
        for fail_at in [10, 2 * BATCH_CHUNKS * CHUNK_SIZE + 7] {
            let err = encrypt(&key, data.as_slice(), FailAfter(fail_at)).unwrap_err();
            assert!(err.to_string().contains("disk full"), "{err}");
            let ct = enc(&key, &data);
            let err = decrypt(&key, ct.as_slice(), FailAfter(fail_at)).unwrap_err();
            assert!(err.to_string().contains("disk full"), "{err}");
        }
    }

    #[test]
    fn the_batched_forms_match_the_chunk_by_chunk_api() {
        let key = FileKey::generate().unwrap();
        let data: Vec<u8> = (0..(2 * BATCH_CHUNKS + 5) * CHUNK_SIZE + 3)
            .map(|i| (i % 239) as u8)
            .collect();
        // Made chunk by chunk (as attachments are uploaded), read by `decrypt`.
        let (mut encryptor, header) = Encryptor::new(&key).unwrap();
        let mut ct = header.to_vec();
        let pieces: Vec<&[u8]> = data.chunks(CHUNK_SIZE).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let mut chunk = piece.to_vec();
            encryptor
                .seal_chunk(&mut chunk, i + 1 == pieces.len())
                .unwrap();
            ct.extend_from_slice(&chunk);
        }
        assert_eq!(dec(&key, &ct).unwrap(), data);
        // Made by `encrypt`, read chunk by chunk.
        let ct = enc(&key, &data);
        let mut decryptor = Decryptor::new(&key, &ct[..HEADER_LEN]).unwrap();
        let chunks: Vec<&[u8]> = ct[HEADER_LEN..].chunks(CHUNK_CIPHERTEXT_SIZE).collect();
        let mut plain = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut chunk = chunk.to_vec();
            let len = decryptor
                .open_chunk(&mut chunk, i + 1 == chunks.len())
                .unwrap();
            plain.extend_from_slice(&chunk[..len]);
        }
        assert_eq!(plain, data);
    }
}
