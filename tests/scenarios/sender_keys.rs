//! Sender keys (protocol section 15) on the real binaries: every channel
//! message is one group envelope under its sender's chain for the epoch,
//! whose key each device of the epoch got once, sealed to it. Removed
//! members, revoked devices and late joiners get no key for what they may
//! not read, even when the app server hands them everything it stores; a
//! device missing a key fetches it; a tampered copy, a replay across
//! epochs and a forged recipient list are refused.

use std::sync::Arc;

use tessera_card::channel::Role;
use tessera_client::{Client, Visibility};
use tessera_crypto::{
    envelope::{Epoch, ExpectedSender, Opener},
    sender_key::{ExpectedChannel, ParsedDistribution, ParsedGroupEnvelope, Retention},
};
use tessera_proto::{
    Message as _,
    envelope::v1::SenderKeyDistribution,
    server::v1::{
        EnvelopeKind, GetSenderKeyRequest, GetSenderKeyResponse, ListMessagesResponse,
        StoredMessage, channels_client::ChannelsClient,
    },
};
use tessera_stack::hostile::{self, Proxy};
use tessera_testkit::Cluster;

use crate::{behind_relay, connect, text, user_tokens};

const GET_SENDER_KEY: &str = "/tessera.server.v1.Channels/GetSenderKey";

/// The message stored at `index`, as `reader` lists it.
async fn stored_at(reader: &Client, channel_id: &str, index: u64) -> StoredMessage {
    reader
        .stored_messages(channel_id, index, 1)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.index == index)
        .unwrap()
}

/// The text of message `index`, as `reader` opens it from what `via`
/// lists (the app server handing it over).
async fn read_at(reader: &Client, via: &Client, channel_id: &str, index: u64) -> String {
    let m = stored_at(via, channel_id, index).await;
    text(&reader.open_message(&m).await.unwrap()).to_owned()
}

/// `identity`'s copy of the chain `message` was sealed under, for its card
/// `card`, straight from the app server (a password log-in).
async fn copy_for(
    cluster: &Cluster,
    identity: &str,
    card: tessera_client::CardId,
    message: &StoredMessage,
) -> Result<GetSenderKeyResponse, tonic::Status> {
    let parsed = ParsedGroupEnvelope::parse(&message.envelope).unwrap();
    let tokens = user_tokens(cluster, identity).await;
    let mut request = tonic::Request::new(GetSenderKeyRequest {
        channel_id: message.channel_id.clone(),
        recipient_card_id: card.to_vec(),
        sender_card_id: parsed.sender_card_id().to_vec(),
        chain_id: parsed.chain_id().to_vec(),
    });
    request
        .metadata_mut()
        .insert("authorization", tokens.server.parse().unwrap());
    ChannelsClient::new(connect(&cluster.server.url()).await)
        .get_sender_key(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Whether `keys` (a device's) open `copy`: they never should when the copy
/// is another device's.
fn opens_with(
    copy: &[u8],
    me: &Client,
    keys: &tessera_crypto::DeviceKeys,
    sender: &tessera_client::VerifiedCard,
    channel_id: &str,
    epoch: Epoch,
) -> bool {
    ParsedDistribution::parse(copy)
        .unwrap()
        .open(
            &Opener {
                card_id: *me.card_id().as_bytes(),
                secret: &keys.encryption,
            },
            &ExpectedSender {
                identity: sender.identity(),
                card_id: *sender.id().as_bytes(),
                key: sender.signing_key(),
            },
            &ExpectedChannel { channel_id, epoch },
            Retention::KeepHistory,
        )
        .is_ok()
}

fn device_keys(cluster: &Cluster, profile: &str) -> tessera_crypto::DeviceKeys {
    tessera_crypto::keystore::load(
        &cluster.home.profile_dir(profile).join("device.key"),
        Some(tessera_testkit::PASSPHRASE),
    )
    .unwrap()
    .into_device()
    .unwrap()
}

async fn card_of(c: &Client, identity: &str) -> tessera_client::VerifiedCard {
    c.cards_of(&[identity.to_owned()]).await.unwrap().0[identity].approved[0].clone()
}

fn epoch_of(message: &StoredMessage) -> Epoch {
    ParsedGroupEnvelope::parse(&message.envelope)
        .unwrap()
        .epoch()
}

/// The error text of opening `m` on `c`.
async fn refusal(c: &Client, m: &StoredMessage) -> String {
    c.open_message(m).await.unwrap_err().to_string()
}

#[tokio::test]
async fn every_message_is_one_group_envelope_of_constant_size() {
    let cluster = Cluster::start().await;
    let users = cluster.users(&["alice", "bob", "carol"], 2).await;
    let alice = &users["alice"][0];
    let ch = alice
        .create_channel("big", Visibility::Shared, &["bob".into(), "carol".into()])
        .await
        .unwrap()
        .channel_id;
    let body = "x".repeat(1024);
    let first = alice.send_text(&ch, &body).await.unwrap();
    assert_eq!(first.recipients.len(), 6, "every approved device");
    let second = alice.send_text(&ch, &body).await.unwrap();
    let (m1, m2) = (
        stored_at(alice, &ch, first.index).await,
        stored_at(alice, &ch, second.index).await,
    );
    for m in [&m1, &m2] {
        assert_eq!(m.kind, EnvelopeKind::Group as i32);
        assert!(m.envelope.len() <= 1536, "{} bytes", m.envelope.len());
    }
    // One chain for both (its key was given out once).
    let (p1, p2) = (
        ParsedGroupEnvelope::parse(&m1.envelope).unwrap(),
        ParsedGroupEnvelope::parse(&m2.envelope).unwrap(),
    );
    assert_eq!(p1.chain_id(), p2.chain_id());
    assert_eq!((p1.generation(), p2.generation()), (0, 1));
    for device in users.values().flatten() {
        let page = device.history(&ch, first.index, 2, false).await.unwrap();
        for (_, r) in &page.messages {
            let r = r.as_ref().unwrap();
            assert_eq!(text(r), body, "{}", device.device_name());
            assert!(r.recipient_differences.is_empty(), "{r:?}");
        }
    }
}

#[tokio::test]
async fn a_removed_member_cannot_open_the_next_epochs_messages_even_with_the_servers_help() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let bob = cluster.device("bob", "bob", true).await;
    let carol = cluster.device("carol", "carol", true).await;
    let ch = alice
        .create_channel("plans", Visibility::Shared, &["bob".into(), "carol".into()])
        .await
        .unwrap()
        .channel_id;
    let before = alice.send_text(&ch, "all three").await.unwrap();
    assert_eq!(
        read_at(&carol, &alice, &ch, before.index).await,
        "all three"
    );
    alice.remove_member(&ch, "carol").await.unwrap();
    let after = alice.send_text(&ch, "without carol").await.unwrap();
    assert!(!after.recipients.contains(&carol.card_id()));
    let m = stored_at(&alice, &ch, after.index).await;
    // A new epoch, so a new chain: carol's old key does not reach it.
    let old =
        ParsedGroupEnvelope::parse(&stored_at(&alice, &ch, before.index).await.envelope).unwrap();
    let new = ParsedGroupEnvelope::parse(&m.envelope).unwrap();
    assert_ne!(old.chain_id(), new.chain_id());
    assert!(new.epoch().number > old.epoch().number);

    // The app server hands carol the message: refused (she is no member
    // now, and she holds no key for it).
    let err = refusal(&carol, &m).await;
    assert!(err.contains("not a member"), "{err}");
    // Nor does the app server hold a copy for her card; and every copy it
    // does hold (alice's and bob's, which it could hand her) is sealed to
    // another device: carol's keys open none of them.
    let status = copy_for(&cluster, "carol", carol.card_id(), &m)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let carol_keys = device_keys(&cluster, "carol");
    let alice_card = card_of(&bob, "alice").await;
    for (identity, card) in [("alice", alice.card_id()), ("bob", bob.card_id())] {
        let copy = copy_for(&cluster, identity, card, &m).await.unwrap();
        assert!(
            !copy
                .recipient_card_ids
                .iter()
                .any(|id| id.as_slice() == carol.card_id().as_bytes()),
            "the chain went to carol"
        );
        assert!(!opens_with(
            &copy.distribution,
            &carol,
            &carol_keys,
            &alice_card,
            &ch,
            epoch_of(&m)
        ));
        // Relabelled for carol, it is still sealed to the other device.
        let mut relabelled = SenderKeyDistribution::decode(copy.distribution.as_slice()).unwrap();
        relabelled.recipient_card_id = carol.card_id().to_vec();
        assert!(!opens_with(
            &relabelled.encode_to_vec(),
            &carol,
            &carol_keys,
            &alice_card,
            &ch,
            epoch_of(&m)
        ));
    }
    // bob reads it.
    assert_eq!(text(&bob.open_message(&m).await.unwrap()), "without carol");
}

#[tokio::test]
async fn a_revoked_device_cannot_open_what_follows() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let phone = cluster.device("bob-phone", "bob", true).await;
    let laptop = cluster.approved_device("bob-laptop", &phone).await;
    let ch = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let before = alice.send_text(&ch, "both devices").await.unwrap();
    assert!(before.recipients.contains(&laptop.card_id()));
    let m_before = stored_at(&alice, &ch, before.index).await;
    assert_eq!(
        text(&laptop.open_message(&m_before).await.unwrap()),
        "both devices"
    );

    phone
        .revoke_device(&laptop.card_id(), "stolen", Some("bob-testkit-password"))
        .await
        .unwrap();
    // The same epoch, but bob's devices changed: alice starts a new chain
    // and gives it only to the devices approved now.
    let after = alice.send_text(&ch, "after the theft").await.unwrap();
    assert_eq!(after.epoch, before.epoch);
    assert!(!after.recipients.contains(&laptop.card_id()));
    let m = stored_at(&alice, &ch, after.index).await;
    let (old, new) = (
        ParsedGroupEnvelope::parse(&m_before.envelope).unwrap(),
        ParsedGroupEnvelope::parse(&m.envelope).unwrap(),
    );
    assert_ne!(old.chain_id(), new.chain_id());

    // The thief holds the laptop's keys and gets the message and every copy
    // the server holds: none opens.
    let laptop_keys = device_keys(&cluster, "bob-laptop");
    let alice_card = card_of(&phone, "alice").await;
    for (identity, card) in [("alice", alice.card_id()), ("bob", phone.card_id())] {
        let copy = copy_for(&cluster, identity, card, &m).await.unwrap();
        assert!(
            !copy
                .recipient_card_ids
                .iter()
                .any(|id| id.as_slice() == laptop.card_id().as_bytes())
        );
        assert!(!opens_with(
            &copy.distribution,
            &laptop,
            &laptop_keys,
            &alice_card,
            &ch,
            epoch_of(&m)
        ));
    }
    assert!(laptop.open_message(&m).await.is_err());
    assert_eq!(
        text(&phone.open_message(&m).await.unwrap()),
        "after the theft"
    );
}

#[tokio::test]
async fn a_late_joiner_of_a_joined_channel_cannot_open_earlier_epochs() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let dave = cluster.device("dave", "dave", true).await;
    let ch = alice
        .create_channel("joined", Visibility::Joined, &[])
        .await
        .unwrap()
        .channel_id;
    let early = alice.send_text(&ch, "before dave").await.unwrap();
    let m_early = stored_at(&alice, &ch, early.index).await;
    alice.add_member(&ch, "dave", Role::Member).await.unwrap();
    // The app server would not list it to dave; handed it anyway, he holds
    // no key of that epoch's chain.
    let err = refusal(&dave, &m_early).await;
    assert!(err.contains("not encrypted to this device"), "{err}");
    let status = copy_for(&cluster, "dave", dave.card_id(), &m_early)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    // What follows his joining he reads.
    let late = alice.send_text(&ch, "welcome dave").await.unwrap();
    assert_eq!(
        read_at(&dave, &alice, &ch, late.index).await,
        "welcome dave"
    );
}

#[tokio::test]
async fn a_device_missing_a_key_distribution_fetches_it_and_opens() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    let bob = behind_relay(&cluster, &relay, "bob", "bob").await;
    let ch = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let one = alice.send_text(&ch, "one").await.unwrap();
    let two = alice.send_text(&ch, "two").await.unwrap();
    // bob's device has no key yet: it fetches its copy once, for both.
    let page = bob.history(&ch, one.index, 10, false).await.unwrap();
    let texts: Vec<&str> = page
        .messages
        .iter()
        .map(|(_, r)| text(r.as_ref().unwrap()))
        .collect();
    assert_eq!(texts, ["one", "two"]);
    assert_eq!(relay.control.calls(GET_SENDER_KEY), 1);
    // It loses its kept keys (a restore from an old backup, say): it
    // fetches the copy again and reads the history again (a re-read, not a
    // replay).
    std::fs::remove_dir_all(cluster.home.profile_dir("bob").join("sender-keys")).unwrap();
    let again = bob
        .open_message(&stored_at(&alice, &ch, two.index).await)
        .await
        .unwrap();
    assert_eq!(text(&again), "two");
    assert_eq!(relay.control.calls(GET_SENDER_KEY), 2);
    // The kept keys are sealed: nothing of them is readable on disk.
    let dir = cluster.home.profile_dir("bob").join("sender-keys");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(serde_json_free(&bytes), "kept keys in the clear");
    }
}

/// Whether `bytes` show no trace of the JSON layout the keys are kept in.
fn serde_json_free(bytes: &[u8]) -> bool {
    !bytes.windows(9).any(|w| w == b"receiving") && !bytes.windows(7).any(|w| w == b"sending")
}

#[tokio::test]
async fn a_tampered_distribution_message_is_refused() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    let bob = behind_relay(&cluster, &relay, "bob", "bob").await;
    let carol = cluster.device("carol", "carol", true).await;
    let ch = alice
        .create_channel("c", Visibility::Shared, &["bob".into(), "carol".into()])
        .await
        .unwrap()
        .channel_id;
    let sent = alice.send_text(&ch, "hello").await.unwrap();
    let m = stored_at(&alice, &ch, sent.index).await;

    // The relay edits the copy it hands bob.
    let edit_copy = |edit: fn(&mut SenderKeyDistribution)| {
        hostile::rewrite::<GetSenderKeyResponse>(GET_SENDER_KEY, move |r| {
            let mut d = SenderKeyDistribution::decode(r.distribution.as_slice()).unwrap();
            edit(&mut d);
            r.distribution = d.encode_to_vec();
        })
    };
    let cases: Vec<(&str, hostile::Tamper, &str)> = vec![
        (
            "a flipped bit in the sealed key",
            edit_copy(|d| d.ciphertext[10] ^= 0x01),
            "could not be unwrapped",
        ),
        (
            "a clear field changed (the copy filed under another epoch)",
            edit_copy(|d| d.epoch += 1),
            "the key of another chain",
        ),
        (
            "the copy filed under another chain id",
            edit_copy(|d| d.chain_id[0] ^= 1),
            "the key of another chain",
        ),
        (
            "a recipient list without carol",
            {
                let carol_card = carol.card_id();
                hostile::rewrite::<GetSenderKeyResponse>(GET_SENDER_KEY, move |r| {
                    r.recipient_card_ids
                        .retain(|id| id.as_slice() != carol_card.as_bytes());
                })
            },
            "not the ones the sender signed",
        ),
        (
            "a ghost added to the recipient list",
            hostile::rewrite::<GetSenderKeyResponse>(GET_SENDER_KEY, |r| {
                r.recipient_card_ids.push(vec![0x66; 32]);
                r.recipient_card_ids.sort();
            }),
            "not the ones the sender signed",
        ),
        (
            "another device's copy",
            {
                let carol_copy = copy_for(&cluster, "carol", carol.card_id(), &m)
                    .await
                    .unwrap()
                    .distribution;
                hostile::rewrite::<GetSenderKeyResponse>(GET_SENDER_KEY, move |r| {
                    r.distribution = carol_copy.clone();
                })
            },
            "addressed to another device",
        ),
    ];
    for (what, tamper, expected) in cases {
        relay.control.set_tamper(tamper);
        let err = refusal(&bob, &m).await;
        assert!(err.contains(expected), "{what}: {err}");
    }
    // Nothing of it was kept: the honest copy opens afterwards.
    relay.control.set_tamper(hostile::honest());
    assert_eq!(text(&bob.open_message(&m).await.unwrap()), "hello");
}

#[tokio::test]
async fn a_message_replayed_across_epochs_is_refused() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    let bob = behind_relay(&cluster, &relay, "bob", "bob").await;
    let laptop = cluster.approved_device("bob-laptop", &bob).await;
    cluster.device("carol", "carol", true).await;
    let ch = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let pay = alice.send_text(&ch, "pay carol 10").await.unwrap();
    // A second message in the same epoch, so index pay + 1 is taken by it.
    alice.send_text(&ch, "and dave 5").await.unwrap();
    let m = stored_at(&alice, &ch, pay.index).await;
    assert_eq!(text(&bob.open_message(&m).await.unwrap()), "pay carol 10");
    // A new epoch, and a message in it.
    alice.add_member(&ch, "carol", Role::Member).await.unwrap();
    let later = alice.send_text(&ch, "carol is in").await.unwrap();
    // The relay serves the old message again as a message of the new epoch,
    // at a later index.
    let mut replayed = m.clone();
    replayed.index = later.index + 1;
    replayed.epoch = later.epoch;
    let injected = replayed.clone();
    relay.control.set_tamper(Arc::new(move |method, bytes| {
        if method != "/tessera.server.v1.Channels/ListMessages" {
            return vec![bytes];
        }
        let mut page = ListMessagesResponse::decode(bytes.as_slice()).unwrap();
        page.messages.push(injected.clone());
        vec![page.encode_to_vec()]
    }));
    let page = bob.history(&ch, later.index, 10, false).await.unwrap();
    let (index, result) = page.messages.last().unwrap();
    assert_eq!(*index, replayed.index);
    let err = result.as_ref().unwrap_err().to_string();
    assert!(err.contains("stored after epoch"), "{err}");
    // bob's laptop never read it, holds the chain's key (it reads the
    // genuine message), and still refuses the replay: it is stored after
    // the statement of the next epoch.
    let laptop = &laptop;
    let err = laptop
        .open_message(&replayed)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("stored after epoch"), "{err}");
    assert_eq!(
        text(&laptop.open_message(&m).await.unwrap()),
        "pay carol 10"
    );
    // A message of epoch 2 placed before epoch 2 began: refused too.
    let mut early = stored_at(&alice, &ch, later.index).await;
    early.index = pay.index;
    let err = laptop.open_message(&early).await.unwrap_err().to_string();
    assert!(err.contains("stored before that epoch began"), "{err}");
    // And where it was stored, a device that read it sees a replay if it is
    // served again at another index of its own epoch.
    let mut again = m.clone();
    again.index = pay.index + 1;
    let err = bob.open_message(&again).await.unwrap_err().to_string();
    assert!(err.contains("replay"), "{err}");
    // The genuine one, re-read where it was stored, still opens.
    assert_eq!(text(&bob.open_message(&m).await.unwrap()), "pay carol 10");
}

#[tokio::test]
async fn forward_secret_channels_cannot_reread_history() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let bob = cluster.device("bob", "bob", true).await;
    let ch = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let one = alice.send_text(&ch, "one").await.unwrap();
    let m = stored_at(&alice, &ch, one.index).await;
    assert_eq!(text(&bob.open_message(&m).await.unwrap()), "one");
    // Kept keys (the default): the history re-reads.
    assert_eq!(text(&bob.open_message(&m).await.unwrap()), "one");
    bob.set_forward_secret(&ch, true).unwrap();
    assert!(bob.forward_secret(&ch).unwrap());
    let err = bob.open_message(&m).await.unwrap_err().to_string();
    assert!(err.contains("forward secrecy"), "{err}");
    // New messages still open, once.
    let two = alice.send_text(&ch, "two").await.unwrap();
    let m2 = stored_at(&alice, &ch, two.index).await;
    assert_eq!(text(&bob.open_message(&m2).await.unwrap()), "two");
    assert!(bob.open_message(&m2).await.is_err());
}
