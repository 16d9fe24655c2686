//! Encrypted attachments: the file goes through the stream format to the app
//! server in 64 KiB chunks (constant memory for any size); its key, name,
//! size and the ciphertext's SHA-256 travel in a normal message.

use std::path::Path;

use futures_util::StreamExt;
use ring::digest;
use tessera_crypto::{
    envelope::CONTENT_TYPE_FILE,
    stream::{self, CHUNK_SIZE, Encryptor, FileKey},
};
use tessera_proto::{
    Message as _,
    envelope::v1::FileAttachment,
    server::v1::{DownloadAttachmentRequest, UploadAttachmentRequest},
};
use tokio::{io::AsyncReadExt, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Client, ClientError, Sent, error::rpc};

/// What a download does when its output file exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingFile {
    /// Fail, leaving the file as it is (the default).
    Refuse,
    /// Replace it (atomically, once the download is whole and authentic).
    Replace,
}

/// Most bytes of a file name [`safe_file_name`] returns.
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// A file name to save an attachment under, made from the name its sender
/// chose, which is untrusted: only the part after the last `/` or `\`;
/// control characters and `:` replaced by `_`; leading dots and spaces
/// removed (no dotfile such as `.bashrc`, no `.` or `..`) and trailing dots
/// and spaces too; at most 255 bytes; `attachment` when nothing is left.
/// The result is a plain name in the current directory, never a path.
pub fn safe_file_name(sender_name: &str) -> String {
    let base = sender_name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| if c.is_control() || c == ':' { '_' } else { c })
        .collect();
    let trimmed = cleaned
        .trim_start_matches(|c: char| c == '.' || c.is_whitespace())
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    let mut name = String::new();
    for c in trimmed.chars() {
        if name.len() + c.len_utf8() > MAX_FILE_NAME_BYTES {
            break;
        }
        name.push(c);
    }
    if name.is_empty() {
        "attachment".to_owned()
    } else {
        name
    }
}

/// Reads until `buf` is full or the file ends.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

impl Client {
    /// Encrypts `path`, uploads it to the channel and sends its key to every
    /// member's devices.
    pub async fn send_file(&self, channel_id: &str, path: &Path) -> Result<Sent, ClientError> {
        let io = |e| ClientError::io(path, e);
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("attachment")
            .to_owned();
        let key = FileKey::generate().map_err(|e| ClientError::Crypto(e.to_string()))?;
        let (mut encryptor, header) =
            Encryptor::new(&key).map_err(|e| ClientError::Crypto(e.to_string()))?;

        // Chunks are read, sealed and sent as the upload goes; a one-byte
        // look-ahead tells which chunk is the last.
        let (tx, rx) = mpsc::channel::<UploadAttachmentRequest>(4);
        let request = self.request(ReceiverStream::new(rx)).await?;
        let mut channels = self.channels_client();
        let upload = tokio::spawn(async move { channels.upload_attachment(request).await });
        let mut hash = digest::Context::new(&digest::SHA256);
        hash.update(&header);
        let send = |data: Vec<u8>, first: bool| UploadAttachmentRequest {
            channel_id: if first {
                channel_id.to_owned()
            } else {
                String::new()
            },
            data,
        };
        let mut pending = Some(send(header.to_vec(), true));
        let mut buf = vec![0u8; CHUNK_SIZE + 1];
        let mut carried = 0usize;
        let mut size = 0u64;
        loop {
            let n = carried
                + read_full(&mut file, &mut buf[carried..])
                    .await
                    .map_err(io)?;
            let last = n <= CHUNK_SIZE;
            let len = n.min(CHUNK_SIZE);
            let mut chunk = buf[..len].to_vec();
            size += len as u64;
            encryptor
                .seal_chunk(&mut chunk, last)
                .map_err(|e| ClientError::Attachment(e.to_string()))?;
            hash.update(&chunk);
            if let Some(p) = pending.take()
                && tx.send(p).await.is_err()
            {
                break;
            }
            pending = Some(send(chunk, false));
            if last {
                break;
            }
            buf[0] = buf[CHUNK_SIZE];
            carried = 1;
        }
        if let Some(p) = pending.take() {
            let _ = tx.send(p).await;
        }
        drop(tx);
        let uploaded = upload
            .await
            .map_err(|_| ClientError::Attachment("upload task failed".into()))?
            .map_err(rpc("app server", self.server_url(), "the attachment"))?
            .into_inner();
        let sha256 = hash.finish().as_ref().to_vec();
        if uploaded.sha256 != sha256 {
            return Err(ClientError::Attachment(
                "the server stored other bytes than were sent".into(),
            ));
        }
        let attachment = FileAttachment {
            attachment_id: uploaded.attachment_id,
            file_name,
            media_type: "application/octet-stream".into(),
            size,
            file_key: key.expose_bytes().to_vec(),
            ciphertext_sha256: sha256,
        };
        self.send_content(channel_id, CONTENT_TYPE_FILE, &attachment.encode_to_vec())
            .await
    }

    /// Downloads an attachment, checks the ciphertext's SHA-256 against the
    /// signed message, and decrypts it to `out` (written only when whole and
    /// authentic; an existing `out` is never replaced). Returns the
    /// plaintext size.
    pub async fn download_file(
        &self,
        channel_id: &str,
        attachment: &FileAttachment,
        out: &Path,
    ) -> Result<u64, ClientError> {
        self.download_file_to(channel_id, attachment, out, ExistingFile::Refuse)
            .await
    }

    /// [`Client::download_file`], saying what to do when `out` exists.
    pub async fn download_file_to(
        &self,
        channel_id: &str,
        attachment: &FileAttachment,
        out: &Path,
        existing: ExistingFile,
    ) -> Result<u64, ClientError> {
        // The id names temporary files: it must be the server's id format,
        // never a path the sender chose.
        if attachment.attachment_id.len() != 32
            || !attachment
                .attachment_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ClientError::Attachment(
                "the message names a malformed attachment id".into(),
            ));
        }
        if existing == ExistingFile::Refuse && out.symlink_metadata().is_ok() {
            return Err(ClientError::Usage(format!(
                "{} exists; choose another path or allow replacing it",
                out.display()
            )));
        }
        let request = self
            .request(DownloadAttachmentRequest {
                channel_id: channel_id.to_owned(),
                attachment_id: attachment.attachment_id.clone(),
            })
            .await?;
        let mut stream = self
            .channels_client()
            .download_attachment(request)
            .await
            .map_err(rpc("app server", self.server_url(), "the attachment"))?
            .into_inner();
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let cipher_path = dir.join(format!(".{}.download", attachment.attachment_id));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| ClientError::io(p, e)
        };
        let mut hash = digest::Context::new(&digest::SHA256);
        {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::fs::File::create(&cipher_path)
                .await
                .map_err(io(&cipher_path))?;
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(rpc("app server", self.server_url(), "the attachment"))?;
                hash.update(&chunk.data);
                f.write_all(&chunk.data).await.map_err(io(&cipher_path))?;
            }
            f.flush().await.map_err(io(&cipher_path))?;
        }
        if hash.finish().as_ref() != attachment.ciphertext_sha256.as_slice() {
            let _ = std::fs::remove_file(&cipher_path);
            return Err(ClientError::Attachment(
                "the downloaded file is not the one the sender signed for".into(),
            ));
        }
        let key = FileKey::from_bytes(&attachment.file_key)
            .map_err(|e| ClientError::Attachment(e.to_string()))?;
        let out = out.to_owned();
        let partial = dir.join(format!(".{}.partial", attachment.attachment_id));
        let (cp, pp) = (cipher_path.clone(), partial.clone());
        let result = tokio::task::spawn_blocking(move || -> Result<u64, ClientError> {
            let input = std::fs::File::open(&cp).map_err(|e| ClientError::io(&cp, e))?;
            let output = std::fs::File::create(&pp).map_err(|e| ClientError::io(&pp, e))?;
            let mut writer = std::io::BufWriter::new(output);
            let size = stream::decrypt(&key, std::io::BufReader::new(input), &mut writer)
                .map_err(|e| ClientError::Attachment(e.to_string()))?;
            let file = writer
                .into_inner()
                .map_err(|e| ClientError::io(&pp, e.into_error()))?;
            file.sync_all().map_err(|e| ClientError::io(&pp, e))?;
            match existing {
                ExistingFile::Replace => {
                    std::fs::rename(&pp, &out).map_err(|e| ClientError::io(&out, e))?;
                }
                // A hard link fails if `out` exists (even if it appeared
                // since the check above): nothing is ever replaced.
                ExistingFile::Refuse => {
                    std::fs::hard_link(&pp, &out).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::AlreadyExists {
                            ClientError::Usage(format!(
                                "{} exists; choose another path or allow replacing it",
                                out.display()
                            ))
                        } else {
                            ClientError::io(&out, e)
                        }
                    })?;
                    let _ = std::fs::remove_file(&pp);
                }
            }
            Ok(size)
        })
        .await
        .map_err(|_| ClientError::Attachment("decryption task failed".into()))?;
        let _ = std::fs::remove_file(&cipher_path);
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_chosen_names_become_plain_safe_names() {
        for (sent, saved) in [
            ("plan.txt", "plan.txt"),
            (".bashrc", "bashrc"),
            ("..", "attachment"),
            (".", "attachment"),
            ("", "attachment"),
            ("../../etc/passwd", "passwd"),
            ("/etc/shadow", "shadow"),
            ("..\\..\\windows\\win.ini", "win.ini"),
            ("dir/", "attachment"),
            ("  ..hidden  ", "hidden"),
            ("a\u{1b}[31mred.txt", "a_[31mred.txt"),
            ("line\nbreak", "line_break"),
            ("C:evil", "C_evil"),
            ("rapport été.pdf", "rapport été.pdf"),
            ("name.", "name"),
        ] {
            assert_eq!(safe_file_name(sent), saved, "{sent:?}");
        }
        let long = "é".repeat(300);
        let name = safe_file_name(&long);
        assert!(name.len() <= MAX_FILE_NAME_BYTES && name.chars().all(|c| c == 'é'));
        for hostile in [
            "../x",
            "a/b/../../c",
            "\\\\server\\share",
            ".ssh/authorized_keys",
        ] {
            let name = safe_file_name(hostile);
            assert!(
                !name.contains(['/', '\\']) && !name.starts_with('.'),
                "{name}"
            );
        }
    }
}
