//! Card verification against man-in-the-middle attacks: a hostile directory
//! (a proxy in front of the real key service) serves a card registered with
//! another AppKey, an altered card, a revoked card's messages, and a history
//! inconsistent with what the client saw before. Each is refused with its
//! specific error.

use tessera_card::{CardKind, NewCard, app_sign, kms_sign};
use tessera_client::{ClientError, Endpoints, Visibility};
use tessera_crypto::{
    DeviceKeys, SigningKey,
    envelope::{self, Draft, Recipient, Sender},
    keystore,
};
use tessera_proto::{
    Message as _,
    card::v1::CardContent,
    kms::v1::{RegisterCardRequest, SearchCardsResponse, key_directory_client::KeyDirectoryClient},
    transparency::v1::{LogEntry, log_entry::Event},
};
use tessera_stack::hostile::{self, Proxy};
use tessera_testkit::{Cluster, PASSPHRASE};
use tonic::Request;

use crate::{app_key, connect, service_token};

fn card_error(e: ClientError) -> String {
    match e {
        e @ ClientError::CardRejected { .. } => e.to_string(),
        other => panic!("expected a refused card, got: {other}"),
    }
}

async fn alice_behind(cluster: &Cluster, directory: &Proxy) -> tessera_client::Client {
    cluster
        .device_with(
            "alice",
            "alice",
            true,
            Endpoints {
                kms_url: directory.url(),
                ..cluster.endpoints()
            },
        )
        .await
}

#[tokio::test]
async fn a_card_signed_with_another_app_key_or_altered_is_refused() {
    let cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let alice = alice_behind(&cluster, &directory).await;
    cluster.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap();
    alice
        .send_text(&channel.channel_id, "before the attack")
        .await
        .unwrap();

    // A card for bob registered with another AppKey (the attacker's own directory).
    let mut forged = NewCard {
        identity: "bob",
        kind: CardKind::Client,
        device_name: "bob's other phone",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&DeviceKeys::generate().unwrap())
    .unwrap();
    app_sign(&mut forged, &SigningKey::generate().unwrap());
    kms_sign(&mut forged, &SigningKey::generate().unwrap());
    directory
        .control
        .set_tamper(hostile::inject_card("bob".into(), forged));
    let err = card_error(alice.send_text(&channel.channel_id, "x").await.unwrap_err());
    assert!(
        err.contains("the card's app signature does not verify"),
        "{err}"
    );

    // Bob's real card with its snapshot altered (another device name).
    directory
        .control
        .set_tamper(std::sync::Arc::new(|method, message| {
            if method != "/tessera.kms.v1.KeyDirectory/SearchCards" {
                return vec![message];
            }
            let mut r = SearchCardsResponse::decode(message.as_slice()).unwrap();
            for record in r
                .results
                .iter_mut()
                .filter(|r| r.identity == "bob")
                .flat_map(|r| r.cards.iter_mut())
            {
                // The card travels inside its log entry: alter it there.
                let mut entry = LogEntry::decode(record.registration_entry.as_slice()).unwrap();
                let Some(Event::CardRegistered(card)) = entry.event.as_mut() else {
                    panic!("a search record without a registered card");
                };
                let mut content = CardContent::decode(card.content_snapshot.as_slice()).unwrap();
                content.device_name = "bob's phone (evil twin)".into();
                card.content_snapshot = content.encode_to_vec();
                record.registration_entry = entry.encode_to_vec();
            }
            vec![r.encode_to_vec()]
        }));
    let err = card_error(alice.send_text(&channel.channel_id, "x").await.unwrap_err());
    assert!(
        err.contains("the card's self signature does not verify"),
        "{err}"
    );

    // Honest again: sending works, and nothing was sent meanwhile.
    directory.control.set_tamper(hostile::honest());
    let sent = alice
        .send_text(&channel.channel_id, "after the attack")
        .await
        .unwrap();
    assert_eq!(sent.index, 2);
}

#[tokio::test]
async fn messages_of_a_revoked_card_are_refused() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster
        .device_with(
            "alice",
            "alice",
            true,
            Endpoints {
                server_url: relay.url(),
                ..cluster.endpoints()
            },
        )
        .await;
    let bob0 = cluster.device("bob-0", "bob", true).await;
    let bob1 = cluster.approved_device("bob-1", &bob0).await;
    let channel = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap();
    bob1.send_text(&channel.channel_id, "from my old phone")
        .await
        .unwrap();
    // alice reads it now: her client caches bob-1's card as active (the
    // card-status cache), moments before the revocation.
    let page = alice
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    assert!(page.messages[0].1.is_ok());
    let stolen = keystore::load(
        &cluster.home.profile_dir("bob-1").join("device.key"),
        Some(PASSPHRASE),
    )
    .unwrap()
    .into_device()
    .unwrap();
    bob0.revoke_device(&bob1.card_id(), "stolen", Some("bob-testkit-password"))
        .await
        .unwrap();
    // Revocations carry whole seconds: what follows is in a later second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    // The revoked device cannot send any more...
    let err = cluster
        .reopen("bob-1")
        .send_text(&channel.channel_id, "still me")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not an active device"), "{err}");
    // ...and a relay slipping in a message signed with the stolen key after
    // the revocation is caught by every recipient.
    let later = bob0
        .send_text(&channel.channel_id, "new phone who dis")
        .await
        .unwrap();
    let (found, _) = alice.cards_of(&["alice".into()]).await.unwrap();
    let alice_card = &found["alice"].approved[0];
    let forged = envelope::seal(
        &Sender {
            identity: "bob",
            card_id: *bob1.card_id().as_bytes(),
            key: &stolen.signing,
        },
        &Draft {
            channel_id: &channel.channel_id,
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: b"send the money to this account",
            sent_at_ms: 0,
            epoch: None,
        },
        &[Recipient {
            card_id: *alice_card.id().as_bytes(),
            key: alice_card.encryption_key(),
        }],
    )
    .unwrap()
    .envelope;
    let stolen_card = bob1.card_id().to_vec();
    relay
        .control
        .set_tamper(hostile::rewrite_messages(move |m| {
            if m.index == later.index {
                m.envelope = forged.clone();
                m.kind = 0; // a per-device envelope (section 4)
                m.sender_card_id = stolen_card.clone();
            }
        }));
    let page = alice
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    assert!(
        page.messages[0].1.is_ok(),
        "sent before the revocation: still verifies"
    );
    // Within the cache's minute: the cached "active" predates the message,
    // so the card is looked up again and found revoked.
    let err = page.messages[1].1.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("sent after the sender's card was revoked"),
        "{err}"
    );
}

#[tokio::test]
async fn a_directory_that_rewrites_history_is_detected() {
    let cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let alice = alice_behind(&cluster, &directory).await;
    cluster.device("bob", "bob", true).await;
    cluster.device("carol", "carol", true).await;
    // Alice has seen the log with her, bob's and carol's cards.
    alice
        .cards_of(&["bob".into(), "carol".into()])
        .await
        .unwrap();

    // A second key service with the same signing key, whose log holds other
    // cards (say, without carol, with a forged bob): it signs valid checkpoints.
    let fork = cluster.forked_kms().await;
    let token = service_token(&cluster);
    let app = app_key(&cluster);
    let mut kms = KeyDirectoryClient::new(connect(&fork.url()).await);
    for identity in ["alice", "bob", "mallory", "mallory"] {
        let mut card = NewCard {
            identity,
            kind: CardKind::Client,
            device_name: "fork",
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&DeviceKeys::generate().unwrap())
        .unwrap();
        app_sign(&mut card, &app);
        let mut request = Request::new(RegisterCardRequest { card: Some(card) });
        request
            .metadata_mut()
            .insert("authorization", token.parse().unwrap());
        kms.register_card(request).await.unwrap();
    }
    directory.control.set_upstream(&fork.url()).unwrap();
    let err = alice.cards_of(&["bob".into()]).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Fork(_)),
        "expected a fork, got: {err}"
    );
    assert!(
        err.to_string()
            .contains("inconsistent with what this device saw before"),
        "{err}"
    );
    // The audit refuses it too.
    assert!(matches!(
        alice.audit().await.unwrap_err(),
        ClientError::Fork(_)
    ));
    // Back to the real directory: consistent again.
    directory.control.set_upstream(&cluster.kms.url()).unwrap();
    alice.cards_of(&["bob".into()]).await.unwrap();
}
