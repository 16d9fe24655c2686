//! Hand-written `Debug` for the messages that carry a secret (a file key,
//! a content key, a password, a bearer token) or plaintext (a signed
//! payload and what wraps it): they print lengths, never the bytes, so no
//! `{:?}` can put them in a log. `build.rs` lists them (`skip_debug`).

use std::fmt;

use crate::{auth, backup, envelope, server};

/// Shows a secret or plaintext field by its length only.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

impl fmt::Debug for envelope::v1::FileAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileAttachment")
            .field("attachment_id", &self.attachment_id)
            .field("file_name", &self.file_name)
            .field("media_type", &self.media_type)
            .field("size", &self.size)
            .field("file_key", &Len(self.file_key.len()))
            .field("ciphertext_sha256", &hex(&self.ciphertext_sha256))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::SignedPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPayload")
            .field("version", &self.version)
            .field("channel_id", &self.channel_id)
            .field("message_id", &hex(&self.message_id))
            .field("sender_identity", &self.sender_identity)
            .field("sender_card_id", &hex(&self.sender_card_id))
            .field("sent_at_ms", &self.sent_at_ms)
            .field("recipients", &self.recipient_card_ids.len())
            .field("content_type", &self.content_type)
            .field("body", &Len(self.body.len()))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::SealedContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedContent")
            .field("payload", &Len(self.payload.len()))
            .field("signature", &Len(self.signature.len()))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::HistoryItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryItem")
            .field("channel_id", &self.channel_id)
            .field("message_index", &self.message_index)
            .field("original_payload", &Len(self.original_payload.len()))
            .field("server_time_ms", &self.server_time_ms)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::SenderKeyContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyContent")
            .field("version", &self.version)
            .field("channel_id", &self.channel_id)
            .field("epoch", &self.epoch)
            .field("sender_identity", &self.sender_identity)
            .field("sender_card_id", &hex(&self.sender_card_id))
            .field("chain_id", &hex(&self.chain_id))
            .field("chain_key", &Len(self.chain_key.len()))
            .field("first_generation", &self.first_generation)
            .field("recipient_card_id", &hex(&self.recipient_card_id))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::KeptSenderChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptSenderChain")
            .field("channel_id", &self.channel_id)
            .field("epoch", &self.epoch)
            .field("chain_key", &Len(self.chain_key.len()))
            .field("first_generation", &self.first_generation)
            .field("next_generation", &self.next_generation)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::KeptReceiverChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptReceiverChain")
            .field("channel_id", &self.channel_id)
            .field("epoch", &self.epoch)
            .field("sender_identity", &self.sender_identity)
            .field("sender_card_id", &hex(&self.sender_card_id))
            .field("chain_id", &hex(&self.chain_id))
            .field("next_generation", &self.next_generation)
            .field("skipped", &self.skipped_generations.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for envelope::v1::SignedSenderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedSenderKey")
            .field("content", &Len(self.content.len()))
            .field("signature", &Len(self.signature.len()))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for backup::v1::BackupRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupRecord")
            .field("channel_id", &self.channel_id)
            .field("message_index", &self.message_index)
            .field("original_payload", &Len(self.original_payload.len()))
            .field("server_time_ms", &self.server_time_ms)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for auth::v1::AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("claims", &Len(self.claims.len()))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for server::v1::SignUpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignUpRequest")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for server::v1::LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for server::v1::LoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginResponse")
            .field("expires_at", &self.expires_at)
            .field("identity", &self.identity)
            .field("admin", &self.admin)
            .field("org_member", &self.org_member)
            .finish_non_exhaustive()
    }
}

/// Public bytes (ids, digests) in hex.
fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: u8 = 0xa5; // 165

    fn leaks(s: &str) -> bool {
        s.contains("165") || s.contains("a5a5")
    }

    #[test]
    fn secrets_and_plaintext_are_not_printed() {
        let printed = [
            format!(
                "{:?}",
                envelope::v1::FileAttachment {
                    attachment_id: "id".into(),
                    file_name: "plan.txt".into(),
                    media_type: "text/plain".into(),
                    size: 3,
                    file_key: vec![SECRET; 32],
                    ciphertext_sha256: vec![1; 32],
                }
            ),
            format!(
                "{:?}",
                envelope::v1::SignedPayload {
                    body: vec![SECRET; 8],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                envelope::v1::SealedContent {
                    payload: vec![SECRET; 8],
                    signature: vec![SECRET; 64],
                }
            ),
            format!(
                "{:?}",
                envelope::v1::HistoryItem {
                    original_payload: vec![SECRET; 8],
                    original_signature: vec![SECRET; 64],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                envelope::v1::SenderKeyContent {
                    chain_key: vec![SECRET; 32],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                envelope::v1::SignedSenderKey {
                    content: vec![SECRET; 40],
                    signature: vec![SECRET; 64],
                }
            ),
            format!(
                "{:?}",
                envelope::v1::KeptSenderChain {
                    chain_key: vec![SECRET; 32],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                envelope::v1::KeptReceiverChain {
                    initial_chain_key: vec![SECRET; 32],
                    current_chain_key: vec![SECRET; 32],
                    skipped_secrets: vec![vec![SECRET; 32]],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                backup::v1::BackupRecord {
                    original_payload: vec![SECRET; 8],
                    original_signature: vec![SECRET; 64],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                auth::v1::AccessToken {
                    claims: vec![SECRET; 8],
                    signature: vec![SECRET; 64],
                }
            ),
            format!(
                "{:?}",
                server::v1::SignUpRequest {
                    identity: "alice".into(),
                    password: "pw-165-a5a5".into(),
                }
            ),
            format!(
                "{:?}",
                server::v1::LoginRequest {
                    identity: "alice".into(),
                    password: "pw-165-a5a5".into(),
                }
            ),
            format!(
                "{:?}",
                server::v1::LoginResponse {
                    access_token: vec![SECRET; 40],
                    ..Default::default()
                }
            ),
        ];
        for p in &printed {
            assert!(!leaks(p), "{p}");
        }
        assert!(printed[0].contains("plan.txt") && printed[0].contains("<32 bytes>"));
    }
}
