//! Comparing views of the key directory with other users (gossip): a
//! directory that shows two users different logs (a split view) passes each
//! user's own checks, because each view is consistent with itself; it is
//! caught when the users compare checkpoints. A device exports the last
//! checkpoint it verified ([`Client::export_checkpoint`]), hands it to
//! someone out of band, and they check it against their own view
//! ([`Client::compare_checkpoint`]).

use tessera_card::transparency::{self, VerifiedCheckpoint};
use tessera_proto::{
    Message as _,
    kms::v1::{GetCheckpointRequest, key_directory_client::KeyDirectoryClient},
    transparency::v1::SignedCheckpoint,
};

use crate::{Client, ClientError, error::rpc};

/// A checkpoint of the key directory's log, as one device verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointView {
    pub tree_size: u64,
    pub root_hash: [u8; 32],
    /// Unix seconds, as the key service signed it.
    pub timestamp: i64,
    /// The signed checkpoint, hex-encoded, to give to someone else.
    pub exported: String,
}

impl CheckpointView {
    fn of(c: &VerifiedCheckpoint) -> Self {
        Self {
            tree_size: c.tree_size,
            root_hash: c.root_hash,
            timestamp: c.timestamp,
            exported: hex::encode(c.signed.encode_to_vec()),
        }
    }
}

/// The result of a comparison that found both views consistent.
#[derive(Debug, Clone)]
pub struct Agreement {
    /// This device's view, brought up to date before comparing.
    pub mine: CheckpointView,
    pub theirs: CheckpointView,
}

impl Client {
    /// Brings this device's view of the log up to date and returns it, to
    /// hand to someone who runs [`Client::compare_checkpoint`].
    pub async fn export_checkpoint(&self) -> Result<CheckpointView, ClientError> {
        Ok(CheckpointView::of(&self.refresh_checkpoint().await?))
    }

    /// Checks a checkpoint someone else's device exported against this
    /// device's view: it must be signed by the pinned key service; the same
    /// size must have the same root; a smaller one must be a prefix of this
    /// view (consistency proof); a larger one must be known to this device's
    /// directory. Anything else is a [`ClientError::Fork`]: the directory
    /// shows the two devices different logs.
    pub async fn compare_checkpoint(&self, exported: &str) -> Result<Agreement, ClientError> {
        let theirs = hex::decode(exported.trim())
            .ok()
            .and_then(|b| SignedCheckpoint::decode(b.as_slice()).ok())
            .ok_or_else(|| {
                ClientError::Usage("not an exported checkpoint (hex of a SignedCheckpoint)".into())
            })?;
        let theirs = transparency::verify_checkpoint(&theirs, self.verifier.kms_key())
            .map_err(|e| ClientError::Crypto(format!("the other checkpoint: {e}")))?;
        let mine = self.refresh_checkpoint().await?;
        if theirs.tree_size > mine.tree_size {
            return Err(ClientError::Fork(format!(
                "the other device holds a checkpoint of {} entries signed by the key service, \
                 whose latest for this device has {}",
                theirs.tree_size, mine.tree_size
            )));
        }
        self.check_consistent(&theirs, &mine).await?;
        Ok(Agreement {
            mine: CheckpointView::of(&mine),
            theirs: CheckpointView::of(&theirs),
        })
    }

    /// The directory's latest checkpoint, checked against this device's
    /// last one and remembered.
    pub(crate) async fn refresh_checkpoint(&self) -> Result<VerifiedCheckpoint, ClientError> {
        self.fresh(|| self.checkpoint_once()).await
    }

    async fn checkpoint_once(&self) -> Result<VerifiedCheckpoint, ClientError> {
        let request = self
            .request_to(crate::client::Service::Kms, GetCheckpointRequest {})
            .await?;
        let signed = KeyDirectoryClient::new(self.kms.clone())
            .get_checkpoint(request)
            .await
            .map_err(rpc("key service", self.kms_url(), "the checkpoint"))?
            .into_inner()
            .checkpoint
            .ok_or_else(|| ClientError::Fork("the key service sent no checkpoint".into()))?;
        self.advance_checkpoint(&signed).await
    }
}
