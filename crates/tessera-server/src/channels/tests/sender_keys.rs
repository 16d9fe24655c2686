//! Sender keys at the app server's domain layer: which copies are stored
//! and handed out, and which group messages are taken (docs/protocol.md
//! section 15, "At the app server").

use tessera_crypto::{
    EncryptionPublicKey,
    envelope::{CONTENT_TYPE_TEXT, Epoch, Recipient, Sender},
    sender_key::{GroupDraft, SenderChain},
};
use tessera_proto::{
    envelope::v1::SenderKeyDistribution,
    server::v1::{GetSenderKeyRequest, PutSenderKeysRequest},
};

use super::*;

/// A sending device's chain: the only place these tests use
/// tessera-crypto's sender-key API (so a change of it is mended here).
struct Group {
    chain: SenderChain,
}

fn sender(dev: &Dev) -> Sender<'_> {
    Sender {
        identity: &dev.identity,
        card_id: *dev.card.as_bytes(),
        key: &dev.keys.signing,
    }
}

impl Group {
    /// A new chain of `from` in `channel_id` at `epoch`.
    fn new(from: &Dev, channel_id: &str, epoch: u64) -> Self {
        let epoch = Epoch {
            number: epoch,
            hash: [7; 32],
        };
        Self {
            chain: SenderChain::new(&sender(from), channel_id, epoch).unwrap(),
        }
    }

    fn id(&self) -> Vec<u8> {
        self.chain.chain_id().to_vec()
    }

    /// One copy for each of `to`, in that order.
    fn copies(&self, from: &Dev, to: &[&Dev]) -> Vec<Vec<u8>> {
        let keys: Vec<EncryptionPublicKey> =
            to.iter().map(|d| d.keys.encryption.public_key()).collect();
        let recipients: Vec<Recipient<'_>> = to
            .iter()
            .zip(&keys)
            .map(|(d, key)| Recipient {
                card_id: *d.card.as_bytes(),
                key,
            })
            .collect();
        self.chain
            .distribute(&sender(from), &recipients, 1)
            .unwrap()
            .into_iter()
            .map(|c| c.distribution)
            .collect()
    }

    /// The next group envelope.
    fn seal(&mut self, from: &Dev) -> Vec<u8> {
        let draft = GroupDraft {
            content_type: CONTENT_TYPE_TEXT,
            body: b"hello",
            sent_at_ms: 1,
        };
        self.chain.seal(&sender(from), &draft).unwrap().envelope
    }
}

fn put(from: &Dev, epoch: u64, group: &Group, copies: Vec<Vec<u8>>) -> PutSenderKeysRequest {
    PutSenderKeysRequest {
        channel_id: CH.into(),
        sender_card_id: from.card.to_vec(),
        epoch,
        chain_id: group.id(),
        distributions: copies,
        recipient_card_ids: Vec::new(),
    }
}

fn get(me: &Dev, from: &Dev, group: &Group) -> GetSenderKeyRequest {
    GetSenderKeyRequest {
        channel_id: CH.into(),
        recipient_card_id: me.card.to_vec(),
        sender_card_id: from.card.to_vec(),
        chain_id: group.id(),
    }
}

fn group_send(from: &Dev, epoch: u64, n: u8, envelope: Vec<u8>) -> SendMessageRequest {
    SendMessageRequest {
        envelope,
        kind: EnvelopeKind::Group as i32,
        ..send_request(from, epoch, n)
    }
}

/// A copy with its clear fields changed (what a server can see of it).
fn altered(copy: &[u8], change: impl FnOnce(&mut SenderKeyDistribution)) -> Vec<u8> {
    let mut d = SenderKeyDistribution::decode(copy).unwrap();
    change(&mut d);
    d.encode_to_vec()
}

impl World {
    async fn put(&self, by: &Dev, r: PutSenderKeysRequest) -> Result<u32, ServerError> {
        self.channels
            .put_sender_keys(&caller(by), r)
            .await
            .map(|r| r.stored)
    }
}

#[tokio::test]
async fn a_large_chain_comes_in_several_calls_whose_first_names_every_recipient() {
    let w = World::new();
    let (alice, bob) = (w.user("alice").await, w.user("bob").await);
    let tablet = w.device("alice").await;
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    let group = Group::new(&alice, CH, 0);
    let copies = group.copies(&alice, &[&bob, &tablet, &alice]);
    let mut all = vec![alice.card.to_vec(), bob.card.to_vec(), tablet.card.to_vec()];
    all.sort();
    // A copy for a device the list leaves out is refused.
    let err = w
        .channels
        .put_sender_keys(
            &caller(&alice),
            PutSenderKeysRequest {
                recipient_card_ids: vec![alice.card.to_vec(), tablet.card.to_vec()],
                ..put(&alice, 0, &group, copies[..1].to_vec())
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // The first call names all three and carries one copy; the second the rest.
    let first = PutSenderKeysRequest {
        recipient_card_ids: all.clone(),
        ..put(&alice, 0, &group, copies[..1].to_vec())
    };
    assert_eq!(w.put(&alice, first).await.unwrap(), 1);
    assert_eq!(
        w.put(&alice, put(&alice, 0, &group, copies[1..].to_vec()))
            .await
            .unwrap(),
        2
    );
    let got = w
        .channels
        .get_sender_key(&caller(&tablet), &get(&tablet, &alice, &group))
        .await
        .unwrap();
    assert_eq!(got.distribution, copies[1]);
    assert_eq!(got.recipient_card_ids, all);
    // A later call naming other recipients is refused.
    let other = PutSenderKeysRequest {
        recipient_card_ids: all[..2].to_vec(),
        ..put(&alice, 0, &group, copies[..1].to_vec())
    };
    let err = w
        .channels
        .put_sender_keys(&caller(&alice), other)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn copies_are_stored_once_per_device_and_handed_to_that_device_only() {
    let w = World::new();
    let (alice, bob, carol) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
    );
    let tablet = w.device("alice").await;
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    let group = Group::new(&alice, CH, 0);
    let copies = group.copies(&alice, &[&bob, &tablet, &alice]);
    let bytes: u64 = copies.iter().map(|c| c.len() as u64).sum();
    assert_eq!(
        w.put(&alice, put(&alice, 0, &group, copies.clone()))
            .await
            .unwrap(),
        3
    );
    let record = w
        .store
        .sender_key_chain(CH, alice.card.as_bytes(), &group.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.recipient_card_ids.len(), 3);
    assert_eq!(
        w.store.usage("alice").await.unwrap().message_bytes,
        bytes + prost::Message::encoded_len(&record) as u64,
        "copies and the chain's recipient list count against the sender's stored bytes"
    );

    let got = w
        .channels
        .get_sender_key(&caller(&bob), &get(&bob, &alice, &group))
        .await
        .unwrap();
    assert_eq!(got.distribution, copies[0]);
    assert_eq!(got.epoch, 0);
    let mut sorted = vec![alice.card.to_vec(), bob.card.to_vec(), tablet.card.to_vec()];
    sorted.sort();
    assert_eq!(got.recipient_card_ids, sorted);
    assert!(got.server_time_ms > 0);
    let own = w
        .channels
        .get_sender_key(&caller(&tablet), &get(&tablet, &alice, &group))
        .await
        .unwrap();
    assert_eq!(own.distribution, copies[1]);
    assert_eq!(own.server_time_ms, got.server_time_ms);

    // Another device's copy, a non-member, a chain or recipient with no copy.
    let bobs_as_tablet = get(&bob, &alice, &group);
    assert_eq!(
        code(
            w.channels
                .get_sender_key(&caller(&tablet), &bobs_as_tablet)
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            w.channels
                .get_sender_key(&caller(&carol), &get(&carol, &alice, &group))
                .await
        ),
        Code::PermissionDenied
    );
    let other = Group::new(&alice, CH, 0);
    assert_eq!(
        code(
            w.channels
                .get_sender_key(&caller(&bob), &get(&bob, &alice, &other))
                .await
        ),
        Code::NotFound
    );
    let phone = w.device("bob").await;
    assert_eq!(
        code(
            w.channels
                .get_sender_key(&caller(&phone), &get(&phone, &alice, &group))
                .await
        ),
        Code::NotFound
    );
    let short = GetSenderKeyRequest {
        chain_id: vec![1; 15],
        ..get(&bob, &alice, &group)
    };
    assert_eq!(
        code(w.channels.get_sender_key(&caller(&bob), &short).await),
        Code::InvalidArgument
    );

    // A later put may replace copies of the chain's recipients, and only
    // those: a device added since needs a new chain.
    let again = group.copies(&alice, &[&bob]);
    assert_eq!(
        w.put(&alice, put(&alice, 0, &group, again.clone()))
            .await
            .unwrap(),
        1
    );
    let got = w
        .channels
        .get_sender_key(&caller(&bob), &get(&bob, &alice, &group))
        .await
        .unwrap();
    assert_eq!(got.distribution, again[0]);
    assert_eq!(
        got.recipient_card_ids, sorted,
        "the recipients stay those of the first put"
    );
    let err = w
        .put(
            &alice,
            put(&alice, 0, &group, group.copies(&alice, &[&bob, &phone])),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.to_string().contains("new devices need a new chain"),
        "{err}"
    );
    assert!(err.to_string().contains(&phone.card.short()), "{err}");
}

#[tokio::test]
async fn puts_that_break_a_rule_are_refused_with_their_status() {
    let w = World::new();
    let (alice, bob, carol, mut chain) = w.channel_of_alice_with(&["bob"]).await;
    let group = Group::new(&alice, CH, 0);
    let good = group.copies(&alice, &[&bob]);
    let refused = |r: PutSenderKeysRequest, by: &Dev| {
        let w = &w;
        let by = caller(by);
        async move { w.channels.put_sender_keys(&by, r).await.unwrap_err() }
    };
    let invalid = [
        (
            "chain_id must be 16 bytes",
            PutSenderKeysRequest {
                chain_id: vec![1; 15],
                ..put(&alice, 0, &group, good.clone())
            },
        ),
        ("distributions is empty", put(&alice, 0, &group, vec![])),
        (
            "distribution 0 is 4097 bytes",
            put(&alice, 0, &group, vec![vec![0; 4097]]),
        ),
        (
            "distribution 0: malformed",
            put(&alice, 0, &group, vec![b"garbage".to_vec()]),
        ),
        (
            "another sender card",
            put(
                &alice,
                0,
                &group,
                Group::new(&bob, CH, 0).copies(&bob, &[&alice]),
            ),
        ),
        (
            "another channel",
            put(
                &alice,
                0,
                &group,
                vec![altered(&good[0], |d| d.channel_id = "ff".repeat(16))],
            ),
        ),
        (
            "another epoch",
            put(&alice, 0, &group, group_copies_at(&alice, &bob, 3)),
        ),
        (
            "another chain id",
            put(
                &alice,
                0,
                &group,
                Group::new(&alice, CH, 0).copies(&alice, &[&bob]),
            ),
        ),
        (
            "has two copies",
            put(&alice, 0, &group, [good.clone(), good.clone()].concat()),
        ),
    ];
    for (expected, r) in invalid {
        let err = refused(r, &alice).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    let too_many = Limits {
        max_members_per_channel: 1,
        max_devices_per_user: 1,
        ..Limits::default()
    };
    let small = World::with(too_many);
    let err = small
        .channels
        .put_sender_keys(
            &caller(&alice),
            put(&alice, 0, &group, group.copies(&alice, &[&bob, &alice])),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("2 distributions in one request"),
        "{err}"
    );
    // Not the caller's device, a caller not a member.
    let as_bob = PutSenderKeysRequest {
        ..put(&alice, 0, &group, good.clone())
    };
    assert_eq!(refused(as_bob, &bob).await.code(), Code::PermissionDenied);
    let carols = Group::new(&carol, CH, 0);
    let err = refused(
        put(&carol, 0, &carols, carols.copies(&carol, &[&bob])),
        &carol,
    )
    .await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        w.store
            .sender_key_chain(CH, alice.card.as_bytes(), &group.id())
            .await
            .unwrap()
            .is_none(),
        "nothing stored"
    );

    // Not the current epoch: refetch and seal again; a chain stays in the
    // epoch it was stored at.
    assert_eq!(
        w.put(&alice, put(&alice, 0, &group, good.clone()))
            .await
            .unwrap(),
        1
    );
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    let err = refused(put(&alice, 0, &group, good.clone()), &alice).await;
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.to_string().contains("at epoch 1"), "{err}");
    let moved = vec![altered(&good[0], |d| d.epoch = 1)];
    let err = refused(put(&alice, 1, &group, moved), &alice).await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("stored at epoch 0"), "{err}");
}

/// Copies of a new chain of `from` at `epoch`, for `to`.
fn group_copies_at(from: &Dev, to: &Dev, epoch: u64) -> Vec<Vec<u8>> {
    Group::new(from, CH, epoch).copies(from, &[to])
}

#[tokio::test]
async fn group_messages_need_their_chain_stored_at_that_epoch() {
    let w = World::new();
    let (alice, bob, _carol, mut chain) = w.channel_of_alice_with(&["bob"]).await;
    let mut group = Group::new(&alice, CH, 0);
    let first = group.seal(&alice);
    let err = w
        .channels
        .send(&caller(&alice), group_send(&alice, 0, 1, first.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.to_string()
            .contains("no sender key stored for this chain"),
        "{err}"
    );

    w.put(
        &alice,
        put(&alice, 0, &group, group.copies(&alice, &[&bob])),
    )
    .await
    .unwrap();
    let sent = w
        .channels
        .send(&caller(&alice), group_send(&alice, 0, 1, first.clone()))
        .await
        .unwrap();
    let stored = w.channels.stored_message(CH, sent.index).await.unwrap();
    assert_eq!(stored.kind, EnvelopeKind::Group as i32);
    assert_eq!(stored.envelope, first);
    assert_eq!(stored.epoch, 0);
    let device = w.send(&alice, 0, 2).await.unwrap();
    assert_eq!(
        w.channels.stored_message(CH, device).await.unwrap().kind,
        EnvelopeKind::Device as i32
    );

    // Headers that name another channel, epoch or sender than the request;
    // kinds that do not match the envelope; unknown kinds.
    let mut elsewhere = Group::new(&alice, "ff".repeat(16).as_str(), 0);
    let mut later = Group::new(&alice, CH, 1);
    let mut bobs = Group::new(&bob, CH, 0);
    let cases = [
        (
            "another channel",
            group_send(&alice, 0, 3, elsewhere.seal(&alice)),
        ),
        (
            "another epoch",
            group_send(&alice, 0, 4, later.seal(&alice)),
        ),
        (
            "another sender card",
            group_send(&alice, 0, 5, bobs.seal(&bob)),
        ),
        (
            "group envelope",
            group_send(&alice, 0, 6, send_request(&alice, 0, 6).envelope),
        ),
        (
            "envelope",
            SendMessageRequest {
                envelope: group.seal(&alice),
                ..send_request(&alice, 0, 7)
            },
        ),
        (
            "unknown envelope kind 7",
            SendMessageRequest {
                kind: 7,
                ..send_request(&alice, 0, 8)
            },
        ),
    ];
    for (expected, r) in cases {
        let err = w.channels.send(&caller(&alice), r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }

    // A new epoch: the old chain is not the current one, and a chain of
    // the new epoch must be stored first.
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    let err = w
        .channels
        .send(
            &caller(&alice),
            group_send(&alice, 0, 9, group.seal(&alice)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let mut next = Group::new(&alice, CH, 1);
    let err = w
        .channels
        .send(
            &caller(&alice),
            group_send(&alice, 1, 10, next.seal(&alice)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    w.put(&alice, put(&alice, 1, &next, next.copies(&alice, &[&bob])))
        .await
        .unwrap();
    w.channels
        .send(
            &caller(&alice),
            group_send(&alice, 1, 11, next.seal(&alice)),
        )
        .await
        .unwrap();
}
