//! Channel membership (protocol v2): who is in a channel is what its
//! members signed, whatever the app server says. A hostile relay in front of
//! the real app server plays the server: it adds a ghost to the member list,
//! drops a member, slips in statements (a non-member's, one from a card the
//! server made, one replayed from another channel), rolls the chain back,
//! shows two members forked chains, and delivers messages from a non-member
//! and to a ghost. Each is refused or reported, and nothing is ever
//! encrypted to a ghost.

use std::sync::Arc;

use tessera_card::channel::{Change, NewChannelStatement, Role};
use tessera_client::{Client, ClientError, MembershipChange, RecipientDifference, Visibility};
use tessera_crypto::{
    DeviceKeys,
    envelope::{self, Draft, Epoch, Recipient, Sender},
    keystore,
};
use tessera_proto::{
    Message as _,
    server::v1::{
        ChainEntry, Channel, ChannelChain, ListChannelsResponse, ListMessagesResponse, Member,
        StoredMessage,
    },
};
use tessera_stack::hostile::{self, Proxy, Tamper};
use tessera_testkit::{Cluster, PASSPHRASE};

use crate::{behind_relay, cli, device_lists::card_behind_their_back, text};

const GET_CHANNEL: &str = "/tessera.server.v1.Channels/GetChannel";
const GET_CHAIN: &str = "/tessera.server.v1.Channels/GetChannelChain";

/// A device's keys, read from its profile: what a member who signs a
/// statement or a message outside the app holds.
fn keys_of(cluster: &Cluster, profile: &str) -> DeviceKeys {
    keystore::load(
        &cluster.home.profile_dir(profile).join("device.key"),
        Some(PASSPHRASE),
    )
    .unwrap()
    .into_device()
    .unwrap()
}

/// A relay answer of the chain: `entries` from `from_epoch` as the client
/// asked, with `length`.
fn serve_chain(channel_id: String, entries: Vec<ChainEntry>) -> Tamper {
    hostile::rewrite::<ChannelChain>(GET_CHAIN, move |c| {
        if c.channel_id != channel_id {
            return;
        }
        // The client asks from its kept epoch: serve from there on.
        let from = c
            .entries
            .first()
            .and_then(|e| e.statement.as_ref())
            .and_then(|s| tessera_card::channel::ParsedChannelStatement::parse(s.clone()).ok())
            .map_or(0, |s| s.epoch());
        c.length = entries.len() as u64;
        c.entries = entries.iter().skip(from as usize).cloned().collect();
    })
}

/// The entries the real server serves (fetched through a client's own
/// calls, so with their real statements).
async fn real_entries(cluster: &Cluster, profile: &str, channel_id: &str) -> Vec<ChainEntry> {
    use tessera_proto::server::v1::{GetChannelChainRequest, channels_client::ChannelsClient};
    let tokens = crate::user_tokens(cluster, profile).await;
    let mut request = tonic::Request::new(GetChannelChainRequest {
        channel_id: channel_id.to_owned(),
        from_epoch: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", tokens.server.parse().unwrap());
    ChannelsClient::new(crate::connect(&cluster.server.url()).await)
        .get_channel_chain(request)
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// A statement signed with `keys` (card `card`) of `identity`, at the next
/// epoch after `parent`.
fn statement(
    channel_id: &str,
    parent: &ChainEntry,
    identity: &str,
    card: tessera_client::CardId,
    keys: &DeviceKeys,
    change: Change,
) -> ChainEntry {
    let parent =
        tessera_card::channel::ParsedChannelStatement::parse(parent.statement.clone().unwrap())
            .unwrap();
    ChainEntry {
        statement: Some(
            NewChannelStatement {
                channel_id,
                epoch: parent.epoch() + 1,
                previous_hash: Some(parent.hash()),
                signer_identity: identity,
                signer: card,
                created_at: tessera_service::now_secs(),
                change,
            }
            .sign(&keys.signing),
        ),
        server_time_ms: tessera_service::now_ms(),
        next_index: 1,
    }
}

fn channel_refusal(e: ClientError) -> tessera_card::channel::ChannelError {
    match e {
        ClientError::Channel { reason, .. } => reason,
        other => panic!("expected a refused membership chain, got {other}"),
    }
}

/// A relay that adds `message` to every page of `channel_id`'s history.
fn inject(channel_id: String, message: StoredMessage) -> Tamper {
    Arc::new(move |method, bytes| {
        if method != "/tessera.server.v1.Channels/ListMessages" {
            return vec![bytes];
        }
        let Ok(mut page) = ListMessagesResponse::decode(bytes.as_slice()) else {
            return vec![bytes];
        };
        if page.messages.iter().any(|m| m.channel_id == channel_id) {
            page.messages.push(message.clone());
        }
        vec![page.encode_to_vec()]
    })
}

/// Seals `body` as `identity` (card `card`, `keys`) to `to`, naming
/// `channel_id` at `epoch`: what a member's (or anyone's) own software can
/// make, outside the app.
fn sealed(
    identity: &str,
    card: tessera_client::CardId,
    keys: &DeviceKeys,
    channel_id: &str,
    epoch: Epoch,
    to: &[&tessera_client::VerifiedCard],
    body: &[u8],
) -> Vec<u8> {
    let recipients: Vec<Recipient<'_>> = to
        .iter()
        .map(|c| Recipient {
            card_id: *c.id().as_bytes(),
            key: c.encryption_key(),
        })
        .collect();
    envelope::seal(
        &Sender {
            identity,
            card_id: *card.as_bytes(),
            key: &keys.signing,
        },
        &Draft {
            channel_id,
            content_type: envelope::CONTENT_TYPE_TEXT,
            body,
            sent_at_ms: tessera_service::now_ms(),
            epoch: Some(epoch),
        },
        &recipients,
    )
    .unwrap()
    .envelope
}

/// alice and bob in channel "plans" (alice's creation), bob behind a relay
/// the test controls, and a third user with an account who is no member.
struct Plans {
    cluster: Cluster,
    relay: Proxy,
    alice: Client,
    bob: Client,
    third: Client,
    ch: String,
}

async fn plans(third: &str) -> Plans {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    let bob = behind_relay(&cluster, &relay, "bob", "bob").await;
    let third = cluster.device(third, third, true).await;
    let ch = alice
        .create_channel("plans", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    Plans {
        cluster,
        relay,
        alice,
        bob,
        third,
        ch,
    }
}

async fn approved(c: &Client, identity: &str) -> Vec<tessera_client::VerifiedCard> {
    c.cards_of(&[identity.to_owned()]).await.unwrap().0[identity]
        .approved
        .clone()
}

async fn current_epoch(c: &Client, channel_id: &str) -> Epoch {
    let state = c.verified_channel(channel_id).await.unwrap().state;
    Epoch {
        number: state.epoch().unwrap(),
        hash: state.head().unwrap(),
    }
}

#[tokio::test]
async fn a_ghost_in_the_servers_member_list_is_never_encrypted_to() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = behind_relay(&cluster, &relay, "alice", "alice").await;
    let bob = cluster.device("bob", "bob", true).await;
    let eve = cluster.device("eve", "eve", true).await;
    let ch = alice
        .create_channel("plans", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;

    // The server adds eve to what GetChannel answers, and drops bob.
    relay
        .control
        .set_tamper(hostile::rewrite::<Channel>(GET_CHANNEL, |c| {
            c.members.retain(|m| m.identity != "bob");
            c.members.push(Member {
                identity: "eve".into(),
                role: 1,
                ..Default::default()
            });
        }));
    let view = alice.channel(&ch).await.unwrap();
    assert_eq!(view.unverified_members, ["eve"]);
    assert_eq!(view.omitted_members, ["bob"]);
    let members: Vec<&String> = view.verified.state.members().keys().collect();
    assert_eq!(members, ["alice", "bob"]);

    let sent = alice.send_text(&ch, "for alice and bob").await.unwrap();
    let eve_card = eve.card_id();
    assert!(
        !sent.recipients.contains(&eve_card),
        "encrypted to the ghost"
    );
    assert!(sent.recipients.contains(&bob.card_id()), "bob was dropped");
    assert_eq!(sent.recipients.len(), 2);
    let got = bob.history(&ch, 0, 10, false).await.unwrap();
    assert_eq!(
        text(got.messages[0].1.as_ref().unwrap()),
        "for alice and bob"
    );

    // The CLI shows it too.
    let out = cli(&cluster, "alice", &["channel", "show", &ch]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("lists eve as a member, but no member added them"),
        "{stdout}"
    );
    assert!(stdout.contains("leaves out bob"), "{stdout}");
    assert!(
        stdout.contains("bob: added by alice at epoch 0"),
        "{stdout}"
    );
}

#[tokio::test]
async fn forged_and_replayed_statements_are_refused() {
    let Plans {
        cluster,
        relay,
        alice,
        bob,
        third: eve,
        ch,
    } = plans("eve").await;
    let other = alice
        .create_channel("other", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    alice.add_member(&other, "eve", Role::Member).await.unwrap();
    let real = real_entries(&cluster, "alice", &ch).await;

    // 1. eve signs "eve joins" herself: she is no member.
    let by_eve = statement(
        &ch,
        &real[0],
        "eve",
        eve.card_id(),
        &keys_of(&cluster, "eve"),
        Change::Add {
            identity: "eve".into(),
            role: Role::Admin,
        },
    );
    // 2. The server makes a card for alice and signs "alice adds eve" with it.
    let (rogue_keys, rogue) = card_behind_their_back(&cluster, "alice").await;
    let by_rogue = statement(
        &ch,
        &real[0],
        "alice",
        rogue,
        &rogue_keys,
        Change::Add {
            identity: "eve".into(),
            role: Role::Member,
        },
    );
    // 3. alice's real "add eve" of the other channel, replayed here.
    let replayed = real_entries(&cluster, "alice", &other).await.remove(1);

    for (forged, expect) in [
        (by_eve, "eve is not a member"),
        (by_rogue, "is not a device its owner's devices approved"),
        (replayed, "is for channel"),
    ] {
        let mut entries = real.clone();
        entries.push(forged);
        relay.control.set_tamper(serve_chain(ch.clone(), entries));
        let before = alice.stored_messages(&ch, 0, 100).await.unwrap().len();
        let err = bob.send_text(&ch, "hello").await.unwrap_err();
        let reason = channel_refusal(err).to_string();
        assert!(reason.contains(expect), "{reason}");
        assert_eq!(
            alice.stored_messages(&ch, 0, 100).await.unwrap().len(),
            before,
            "nothing sent"
        );
        let out = cli(&cluster, "bob", &["send", &ch, "hello"]).await;
        assert_eq!(out.status.code(), Some(6), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("membership chain"), "{stderr}");
    }

    // Honest again: bob verifies the real chain and sends to alice only.
    relay.control.set_tamper(hostile::honest());
    let sent = bob.send_text(&ch, "hello").await.unwrap();
    assert!(!sent.recipients.contains(&eve.card_id()));
    assert!(!sent.recipients.contains(&rogue));
}

#[tokio::test]
async fn a_rolled_back_or_forked_chain_is_refused() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    let bob = behind_relay(&cluster, &relay, "bob", "bob").await;
    let dave = cluster.device("dave", "dave", true).await;
    cluster.device("carol", "carol", true).await;
    cluster.device("frank", "frank", true).await;
    let ch = alice
        .create_channel("plans", Visibility::Shared, &["bob".into(), "dave".into()])
        .await
        .unwrap()
        .channel_id;
    alice
        .change_channel(
            &ch,
            Change::SetRole {
                identity: "dave".into(),
                role: Role::Admin,
            },
        )
        .await
        .unwrap();
    // bob verifies the chain as it is: two statements.
    assert_eq!(bob.verified_channel(&ch).await.unwrap().state.length(), 2);
    let real = real_entries(&cluster, "alice", &ch).await;

    // A rollback: the server shows only the creation.
    relay
        .control
        .set_tamper(serve_chain(ch.clone(), real[..1].to_vec()));
    let err = bob.verified_channel(&ch).await.unwrap_err();
    assert!(
        matches!(
            channel_refusal(err),
            tessera_card::channel::ChannelError::Rollback {
                known: 2,
                served: 1
            }
        ),
        "rollback"
    );
    let out = cli(&cluster, "bob", &["channel", "show", &ch]).await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");

    // A fork: alice adds carol (the real epoch 2); the server gets dave to
    // sign "add frank" on the same head and shows bob that one instead.
    relay.control.set_tamper(hostile::honest());
    alice.add_member(&ch, "carol", Role::Member).await.unwrap();
    let forked = statement(
        &ch,
        &real[1],
        "dave",
        dave.card_id(),
        &keys_of(&cluster, "dave"),
        Change::Add {
            identity: "frank".into(),
            role: Role::Member,
        },
    );
    let mut fork = real.clone();
    fork.push(forked);
    relay.control.set_tamper(serve_chain(ch.clone(), fork));
    let seen = bob.verified_channel(&ch).await.unwrap();
    assert!(seen.state.member("frank").is_some(), "bob sees the fork");
    // alice's message names the real epoch 2: bob refuses it.
    alice.send_text(&ch, "welcome carol").await.unwrap();
    let page = bob.history(&ch, 0, 10, false).await.unwrap();
    let err = page.messages[0].1.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("another membership history at epoch 2"),
        "{err}"
    );
    // Shown the real chain again, bob's kept one does not extend: a fork.
    relay.control.set_tamper(hostile::honest());
    let err = bob.verified_channel(&ch).await.unwrap_err();
    assert!(
        matches!(
            channel_refusal(err),
            tessera_card::channel::ChannelError::Fork { epoch: 2 }
        ),
        "fork"
    );
}

#[tokio::test]
async fn messages_from_non_members_and_to_ghosts_are_refused() {
    let Plans {
        cluster,
        relay,
        alice,
        bob,
        third: eve,
        ch,
    } = plans("eve").await;
    let first = alice.send_text(&ch, "hi bob").await.unwrap();
    let epoch = current_epoch(&alice, &ch).await;
    let bob_cards = approved(&alice, "bob").await;
    let alice_cards = approved(&alice, "alice").await;
    let eve_cards = approved(&alice, "eve").await;
    let stored = |identity: &str, card: tessera_client::CardId, envelope: Vec<u8>| StoredMessage {
        channel_id: ch.clone(),
        index: first.index + 1,
        sender_identity: identity.to_owned(),
        sender_card_id: card.to_vec(),
        client_message_id: vec![7; 16],
        server_time_ms: tessera_service::now_ms(),
        envelope,
        epoch: epoch.number,
        kind: 0,
    };

    // 1. eve, no member, names the channel's current epoch.
    let from_eve = sealed(
        "eve",
        eve.card_id(),
        &keys_of(&cluster, "eve"),
        &ch,
        epoch,
        &[&bob_cards[0]],
        b"pay me",
    );
    relay
        .control
        .set_tamper(inject(ch.clone(), stored("eve", eve.card_id(), from_eve)));
    let page = bob.history(&ch, 0, 10, false).await.unwrap();
    assert_eq!(text(page.messages[0].1.as_ref().unwrap()), "hi bob");
    let err = page.messages[1].1.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("eve was not a member of the channel at epoch 0"),
        "{err}"
    );

    // 2. alice's own software encrypts to eve's device too (a ghost).
    let alice_keys = keys_of(&cluster, "alice");
    let to_ghost = sealed(
        "alice",
        alice.card_id(),
        &alice_keys,
        &ch,
        epoch,
        &[&alice_cards[0], &bob_cards[0], &eve_cards[0]],
        b"eve reads this",
    );
    relay.control.set_tamper(inject(
        ch.clone(),
        stored("alice", alice.card_id(), to_ghost),
    ));
    let page = bob.history(&ch, 0, 10, false).await.unwrap();
    let err = page.messages[1].1.as_ref().unwrap_err().to_string();
    assert!(err.contains("a ghost recipient"), "{err}");
    assert!(err.contains("of eve, who was not a member"), "{err}");

    // 3. One not encrypted to alice's own device: accepted, the difference said.
    let short = sealed(
        "alice",
        alice.card_id(),
        &alice_keys,
        &ch,
        epoch,
        &[&bob_cards[0]],
        b"bob only",
    );
    relay
        .control
        .set_tamper(inject(ch.clone(), stored("alice", alice.card_id(), short)));
    let page = bob.history(&ch, 0, 10, false).await.unwrap();
    let got = page.messages[1].1.as_ref().unwrap();
    assert_eq!(text(got), "bob only");
    assert_eq!(
        got.recipient_differences,
        [RecipientDifference::Missing {
            identity: "alice".into(),
            card_id: alice.card_id(),
        }]
    );

    // 4. A version-1 message (no epoch) in a channel with a chain.
    let v1 = envelope::seal(
        &Sender {
            identity: "alice",
            card_id: *alice.card_id().as_bytes(),
            key: &alice_keys.signing,
        },
        &Draft {
            channel_id: &ch,
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: b"old style",
            sent_at_ms: tessera_service::now_ms(),
            epoch: None,
        },
        &[Recipient {
            card_id: *bob_cards[0].id().as_bytes(),
            key: bob_cards[0].encryption_key(),
        }],
    )
    .unwrap()
    .envelope;
    relay
        .control
        .set_tamper(inject(ch.clone(), stored("alice", alice.card_id(), v1)));
    let page = bob.history(&ch, 0, 10, false).await.unwrap();
    let err = page.messages[1].1.as_ref().unwrap_err().to_string();
    assert!(err.contains("names no membership epoch"), "{err}");
}

#[tokio::test]
async fn membership_changes_show_in_order_and_members_choose_who_joins() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let bob = cluster.device("bob", "bob", true).await;
    let carol = cluster.device("carol", "carol", true).await;
    let ch = alice
        .create_channel("team", Visibility::Joined, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    alice.send_text(&ch, "before carol").await.unwrap();
    alice.add_member(&ch, "carol", Role::Member).await.unwrap();
    let sent = alice.send_text(&ch, "with carol").await.unwrap();
    assert_eq!(sent.epoch, 1);
    assert!(sent.recipients.contains(&carol.card_id()));

    // bob is no admin: his client refuses before asking the server.
    let err = bob.add_member(&ch, "eve", Role::Member).await.unwrap_err();
    assert!(matches!(err, ClientError::Usage(_)), "{err}");
    assert!(err.to_string().contains("bob is not an admin"), "{err}");
    // ... but he may leave; then he no longer gets messages.
    bob.remove_member(&ch, "bob").await.unwrap();
    let sent = alice.send_text(&ch, "after bob").await.unwrap();
    assert_eq!(sent.epoch, 2);
    assert!(!sent.recipients.contains(&bob.card_id()));

    // carol joined a `joined` channel: she reads from her epoch on.
    let page = carol.history(&ch, 0, 10, false).await.unwrap();
    let texts: Vec<&str> = page
        .messages
        .iter()
        .map(|(_, m)| text(m.as_ref().unwrap()))
        .collect();
    assert_eq!(texts, ["with carol", "after bob"]);

    // The changes, verified, with who made them.
    let changes: Vec<String> = carol
        .membership_changes(&ch, 0, u64::MAX)
        .unwrap()
        .iter()
        .map(MembershipChange::to_string)
        .collect();
    assert_eq!(
        changes,
        [
            "alice created \"team\" (joined history) with alice, bob",
            "alice added carol",
            "bob left",
        ]
    );
    let out = cli(&cluster, "carol", &["history", &ch]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let order: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.contains("alice added carol")
                || l.contains("bob left")
                || l.contains(": with carol")
                || l.contains(": after bob")
        })
        .collect();
    assert_eq!(order.len(), 4, "{stdout}");
    assert!(
        order[0].contains("alice added carol (verified)"),
        "{stdout}"
    );
    assert!(order[1].contains("with carol"), "{stdout}");
    assert!(order[2].contains("bob left (verified)"), "{stdout}");
    assert!(order[3].contains("after bob"), "{stdout}");
    let out = cli(&cluster, "carol", &["channel", "show", &ch]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("epoch 2"), "{stdout}");
    assert!(
        stdout.contains("carol: added by alice at epoch 1"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_reset_keeps_the_chain_verifiable_and_unapproved_devices_cannot_sign() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let bob = cluster.device("bob", "bob", true).await;
    cluster.device("carol", "carol", true).await;
    let ch = alice
        .create_channel("plans", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    // bob knows alice's phone (he verified the creation it signed).
    bob.channel(&ch).await.unwrap();
    // alice loses her phone and resets onto a new one: the creation is
    // signed by a device her list no longer has.
    let alice2 = cluster.reset_device("alice-2", "alice").await;
    // alice's new device, and carol, see the chain (and alice) for the
    // first time after the reset: the creation still verifies, dated before
    // it, and the new device may sign as the admin alice is.
    alice2.add_member(&ch, "carol", Role::Member).await.unwrap();
    let carol = cluster.device("carol-2", "carol", false).await;
    tessera_testkit::approve(&cluster.reopen("carol"), &carol).await;
    for device in [&carol, &alice2] {
        let view = device
            .channel(&ch)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", device.device_name()));
        let members: Vec<&String> = view.verified.state.members().keys().collect();
        assert_eq!(members, ["alice", "bob", "carol"]);
    }
    // bob sees alice's change among the messages, flagged: it was signed
    // after a reset he has not checked (as her messages are).
    let out = cli(&cluster, "bob", &["history", &ch]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("-- epoch 1: alice added carol (verified)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("alice RESET their identity and you have not verified them since"),
        "{stderr}"
    );
    let sent = alice2.send_text(&ch, "from my new phone").await.unwrap();
    let page = carol.history(&ch, sent.index, 1, false).await.unwrap();
    assert_eq!(
        text(page.messages[0].1.as_ref().unwrap()),
        "from my new phone"
    );

    // A device bob has not approved signs nothing: every member would refuse
    // the statement, and the chain could never grow past it.
    let laptop = cluster.device("bob-laptop", "bob", false).await;
    let err = laptop
        .change_channel(&ch, Change::Rename("mine".into()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("waiting for approval"), "{err}");
    let err = laptop
        .remove_member(&ch, "bob")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("waiting for approval"), "{err}");
    let view = bob.channel(&ch).await.unwrap();
    assert_eq!(view.verified.state.length(), 2, "nothing was published");
    assert_eq!(view.verified.state.name(), "plans");
}

#[tokio::test]
async fn a_card_revoked_between_two_of_its_statements_is_refused_at_the_later() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    cluster.device("bob", "bob", true).await;
    cluster.device("eve", "eve", true).await;
    let ch = alice
        .create_channel("plans", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    // alice's phone signed the creation; her laptop then revokes the phone
    // (stolen) and adds carol.
    let laptop = cluster.approved_device("alice-laptop", &alice).await;
    laptop
        .revoke_device(&alice.card_id(), "stolen", Some("alice-testkit-password"))
        .await
        .unwrap();
    let carol = behind_relay(&cluster, &relay, "carol", "carol").await;
    laptop.add_member(&ch, "carol", Role::Member).await.unwrap();
    // The thief signs "alice adds eve" with the phone's key; the server
    // shows it to carol, who looks at the chain for the first time.
    let real = real_entries(&cluster, "alice", &ch).await;
    let by_thief = statement(
        &ch,
        &real[1],
        "alice",
        alice.card_id(),
        &keys_of(&cluster, "alice"),
        Change::Add {
            identity: "eve".into(),
            role: Role::Member,
        },
    );
    // Stored (by the server's word) seconds after the revocation: log
    // times are whole seconds, and a statement in the revocation's own
    // second counts as before it.
    let mut by_thief = by_thief;
    by_thief.server_time_ms += 5_000;
    let mut entries = real.clone();
    entries.push(by_thief);
    relay.control.set_tamper(serve_chain(ch.clone(), entries));
    // The phone's card is dated at its latest statement, after the
    // revocation, not at the creation it signed before.
    let err = carol.channel(&ch).await.unwrap_err();
    let reason = channel_refusal(err);
    assert!(
        matches!(reason, tessera_card::channel::ChannelError::NotAMember(ref m) if m.contains("alice")),
        "{reason}"
    );
    relay.control.set_tamper(hostile::honest());
    let view = carol.channel(&ch).await.unwrap();
    assert!(view.verified.state.member("eve").is_none());
}

#[tokio::test]
async fn chain_times_that_go_back_are_refused() {
    let Plans {
        cluster,
        relay,
        alice,
        bob,
        ch,
        ..
    } = plans("carol").await;
    alice.add_member(&ch, "carol", Role::Member).await.unwrap();
    // The server backdates the second statement to before the first (as it
    // would to date a signer card before its removal).
    let target = ch.clone();
    relay
        .control
        .set_tamper(hostile::rewrite::<ChannelChain>(GET_CHAIN, move |c| {
            if c.channel_id == target && c.entries.len() >= 2 {
                c.entries[1].server_time_ms = c.entries[0].server_time_ms - 60_000;
            }
        }));
    let reason = channel_refusal(bob.channel(&ch).await.unwrap_err());
    assert!(reason.to_string().contains("times go back"), "{reason}");
    relay.control.set_tamper(hostile::honest());
    assert_eq!(bob.channel(&ch).await.unwrap().verified.state.length(), 2);

    // bob kept the head (epoch 1) with its time. After the next statement
    // the server serves that head again dated at 0, so that the new one
    // could be dated early too: refused, the head's time was known.
    alice
        .change_channel(&ch, Change::Rename("plans 2".into()))
        .await
        .unwrap();
    let target = ch.clone();
    relay
        .control
        .set_tamper(hostile::rewrite::<ChannelChain>(GET_CHAIN, move |c| {
            if c.channel_id == target {
                for e in &mut c.entries {
                    e.server_time_ms = 0;
                }
            }
        }));
    let reason = channel_refusal(bob.channel(&ch).await.unwrap_err());
    assert!(
        reason
            .to_string()
            .contains("changed the time of a statement it served before"),
        "{reason}"
    );
    relay.control.set_tamper(hostile::honest());
    assert_eq!(bob.channel(&ch).await.unwrap().verified.state.length(), 3);

    // A name is looked up in the server's list, then checked against the
    // name the members signed: the server cannot steer "send board" into
    // this channel by listing it under that name.
    relay
        .control
        .set_tamper(hostile::rewrite::<ListChannelsResponse>(
            "/tessera.server.v1.Channels/ListChannels",
            |l| {
                for c in &mut l.channels {
                    c.name = "board".into();
                }
            },
        ));
    let out = cli(&cluster, "bob", &["send", "board", "for the board"]).await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("its members named it \"plans 2\""),
        "{stderr}"
    );
    assert!(alice.stored_messages(&ch, 0, 10).await.unwrap().is_empty());
}
