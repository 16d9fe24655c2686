//! Property tests: seal/open round trips for 0 to 200 recipients and bodies
//! from 0 bytes to 1 MiB, stream round trips of arbitrary sizes, and group
//! messages (sender keys) delivered in any order with repeats.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use proptest::prelude::*;
use tessera_crypto::{
    DeviceKeys, EncryptionPublicKey,
    envelope::{
        self, Draft, EnvelopeError, ExpectedSender, Opener, ParsedEnvelope, Recipient, Sender,
    },
    stream::{self, FileKey},
};

struct Device {
    card_id: [u8; 32],
    keys: DeviceKeys,
    public: EncryptionPublicKey,
}

fn devices(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| {
            let keys = DeviceKeys::generate().unwrap();
            let public = keys.encryption.public_key();
            let mut card_id = tessera_crypto::sha256(public.as_bytes());
            card_id[0] = i as u8; // arbitrary, distinct ids
            Device {
                card_id,
                keys,
                public,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn seal_open_round_trip(
        n in 0usize..=200,
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..=(1 << 20)),
        ],
        channel in "[a-z0-9-]{0,40}",
    ) {
        let sender = devices(1).pop().unwrap();
        let recipients = devices(n);
        let list: Vec<Recipient<'_>> = recipients.iter().map(|d| Recipient { card_id: d.card_id, key: &d.public }).collect();
        let result = envelope::seal(
            &Sender { identity: "alice", card_id: sender.card_id, key: &sender.keys.signing },
            &Draft { channel_id: &channel, content_type: envelope::CONTENT_TYPE_TEXT, body: &body, sent_at_ms: 42, epoch: None },
            &list,
        );
        if n == 0 {
            prop_assert_eq!(result.map(|_| ()), Err(EnvelopeError::NoRecipients));
            return Ok(());
        }
        let sealed = result.unwrap();
        let parsed = ParsedEnvelope::parse(&sealed.envelope).unwrap();
        prop_assert_eq!(parsed.recipient_count(), n);
        let vk = sender.keys.signing.verifying_key();
        // Every recipient when few, a sample when many (each open is one HPKE).
        let step = (n / 8).max(1);
        for d in recipients.iter().step_by(step) {
            let p = parsed.open(
                &Opener { card_id: d.card_id, secret: &d.keys.encryption },
                &ExpectedSender { identity: "alice", card_id: sender.card_id, key: &vk },
            ).unwrap();
            prop_assert_eq!(&p.body, &body);
            prop_assert_eq!(&p.channel_id, &channel);
            prop_assert_eq!(p.message_id, sealed.message_id);
            prop_assert_eq!(p.recipient_card_ids.len(), n);
        }
    }

    #[test]
    fn stream_round_trip(len in 0usize..(3 * stream::CHUNK_SIZE + 100), seed in any::<u8>()) {
        let key = FileKey::generate().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let mut ct = Vec::new();
        prop_assert_eq!(stream::encrypt(&key, data.as_slice(), &mut ct).unwrap(), len as u64);
        let mut back = Vec::new();
        prop_assert_eq!(stream::decrypt(&key, ct.as_slice(), &mut back).unwrap(), len as u64);
        prop_assert_eq!(back, data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Group messages delivered in any order, with repeats: each opens
    /// exactly once, every repeat is a replay, and the receiver never holds
    /// a skipped key for a generation it has opened (nor any, when it keeps
    /// the chain's first key).
    #[test]
    fn sender_key_messages_open_once_in_any_order(
        order in prop::collection::vec(0usize..40, 1..80),
        forward_secret in any::<bool>(),
    ) {
        use std::collections::BTreeSet;
        use tessera_crypto::sender_key::{
            ExpectedChannel, GroupDraft, ParsedDistribution, ParsedGroupEnvelope, Retention,
            SenderChain, SenderKeyError,
        };
        let mut two = devices(2);
        let (bob, alice) = (two.pop().unwrap(), two.pop().unwrap());
        let sender = Sender { identity: "alice", card_id: alice.card_id, key: &alice.keys.signing };
        let epoch = envelope::Epoch { number: 2, hash: [2; 32] };
        let mut chain = SenderChain::new(&sender, "c", epoch).unwrap();
        let sealed: Vec<Vec<u8>> = (0..40u8)
            .map(|i| {
                let draft = GroupDraft { content_type: "t", body: &[i], sent_at_ms: 0 };
                chain.seal(&sender, &draft).unwrap().envelope
            })
            .collect();
        let copy = chain
            .distribute(&sender, &[Recipient { card_id: bob.card_id, key: &bob.public }], 0)
            .unwrap()
            .remove(0);
        let vk = alice.keys.signing.verifying_key();
        let from = ExpectedSender { identity: "alice", card_id: alice.card_id, key: &vk };
        let retention = if forward_secret { Retention::ForwardSecret } else { Retention::KeepHistory };
        let mut rx = ParsedDistribution::parse(&copy.distribution)
            .unwrap()
            .open(
                &Opener { card_id: bob.card_id, secret: &bob.keys.encryption },
                &from,
                &ExpectedChannel { channel_id: "c", epoch },
                retention,
            )
            .unwrap();
        let mut opened = BTreeSet::new();
        for g in order {
            let parsed = ParsedGroupEnvelope::parse(&sealed[g]).unwrap();
            match rx.open(&parsed, &from) {
                Ok(p) => {
                    prop_assert!(opened.insert(g), "generation {} opened twice", g);
                    prop_assert_eq!(p.body, vec![g as u8]);
                }
                Err(e) => {
                    prop_assert!(opened.contains(&g), "generation {} refused: {}", g, e);
                    prop_assert_eq!(e, SenderKeyError::Replay(g as u32));
                }
            }
            let highest = opened.iter().next_back().copied().unwrap_or(0);
            prop_assert_eq!(rx.next_generation() as usize, highest + 1);
            // A forward-secret chain keeps the keys it skipped; one that
            // keeps history derives them again from its first key.
            let skipped = if forward_secret { highest + 1 - opened.len() } else { 0 };
            prop_assert_eq!(rx.skipped_keys(), skipped);
        }
    }
}
