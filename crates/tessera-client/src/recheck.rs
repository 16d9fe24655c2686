//! Checking a received message again, as anyone holding its signed original
//! could: the sender's card (three signatures, in the log) and the sender's
//! signature over the exact payload bytes, and that the payload says what
//! the [`Received`] says. The CLI reports this check as `verified`.

use tessera_card::CardKind;
use tessera_crypto::envelope::{ExpectedSender, VerifiedPayload};

use crate::{Client, ClientError, Received};

impl Client {
    /// Verifies `r`'s signed original again against its sender's card.
    pub async fn verify_received(&self, r: &Received) -> Result<(), ClientError> {
        let bad = |reason: String| ClientError::BadMessage {
            channel_id: r.channel_id.clone(),
            index: r.index,
            reason,
        };
        let info = self
            .card_info(&r.sender_card_id, &r.sender_identity, CardKind::Client)
            .await
            .map_err(|e| bad(format!("sender: {e}")))?;
        let (payload, signature) = r.signed_original();
        let original = VerifiedPayload::verify(
            payload.to_vec(),
            signature.to_vec(),
            &ExpectedSender {
                identity: info.card.identity(),
                card_id: *info.card.id().as_bytes(),
                key: info.card.signing_key(),
            },
        )
        .map_err(|e| bad(format!("signed original: {e}")))?;
        if original.channel_id != r.channel_id
            || original.message_id != r.message_id
            || original.sent_at_ms != r.sent_at_ms
            || original.body != r.payload.body
        {
            return Err(bad(
                "the signed original does not say what was received".into()
            ));
        }
        Ok(())
    }
}
