//! The SDK prints no file key: neither its `Content::File` nor the
//! `FileAttachment` type it re-exports.

#![allow(clippy::unwrap_used, reason = "test code")]

use tessera_client::{Content, FileAttachment};

#[test]
fn attachments_print_without_their_key() {
    let attachment = FileAttachment {
        attachment_id: "0123456789abcdef0123456789abcdef".into(),
        file_name: "plan.txt".into(),
        media_type: "text/plain".into(),
        size: 8,
        file_key: vec![0xa5; 32],
        ciphertext_sha256: vec![1; 32],
    };
    for printed in [
        format!("{attachment:?}"),
        format!("{:#?}", attachment),
        format!("{:?}", Content::File(attachment.clone())),
    ] {
        assert!(
            !printed.contains("165") && !printed.contains("a5a5"),
            "{printed}"
        );
    }
}
