//! The client library against a real stack (key service, app server, backup
//! service) on loopback: each trust rule of the client, one test each.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use tessera_client::{
    Client, ClientError, Content, Endpoints, Enrollment, HistoryVisibility, Home, KdfParams,
    Origin, Source, TrustEvent,
};
use tessera_stack::{Stack, StackConfig};

struct World {
    _dir: tempfile::TempDir,
    stack: Stack,
    home: Home,
}

impl World {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stack = Stack::start(StackConfig::for_tests(dir.path().join("stack")))
            .await
            .unwrap();
        let home = Home::new(dir.path().join("home"));
        Self {
            _dir: dir,
            stack,
            home,
        }
    }

    fn endpoints(&self) -> Endpoints {
        self.stack.info().endpoints()
    }

    /// A new device for `identity` (signing up on its first device).
    async fn device(&self, profile: &str, identity: &str, first: bool) -> Client {
        let password = format!("{identity}-password-123");
        Client::enroll(
            &self.home,
            profile,
            Enrollment {
                endpoints: self.endpoints(),
                identity,
                password: &password,
                sign_up: first,
                device_name: profile,
                passphrase: b"device passphrase",
                kdf: KdfParams::DANGER_FAST_FOR_TESTS,
                expected_app_key: Some(self.stack.info().app_public_key),
                expected_kms_key: Some(self.stack.info().kms_public_key),
                reset: false,
            },
        )
        .await
        .unwrap()
    }

    /// Another device of `identity`, approved from its device `approver`.
    async fn approved_device(&self, profile: &str, identity: &str, approver: &Client) -> Client {
        let device = self.device(profile, identity, false).await;
        assert_eq!(
            device.approval().await.unwrap(),
            tessera_client::Approval::Pending
        );
        approver.approve_device(&device.card_id()).await.unwrap();
        assert_eq!(
            device.approval().await.unwrap(),
            tessera_client::Approval::Approved
        );
        device
    }

    fn reopen(&self, profile: &str) -> Client {
        Client::open(&self.home, profile, b"device passphrase").unwrap()
    }

    async fn admin(&self) -> Client {
        let info = self.stack.info();
        Client::enroll(
            &self.home,
            "admin",
            Enrollment {
                endpoints: self.endpoints(),
                identity: &info.admin_identity,
                password: &info.admin_password,
                sign_up: false,
                device_name: "admin console",
                passphrase: b"admin passphrase",
                kdf: KdfParams::DANGER_FAST_FOR_TESTS,
                expected_app_key: None,
                expected_kms_key: None,
                reset: false,
            },
        )
        .await
        .unwrap()
    }
}

fn text(content: &Content) -> &str {
    match content {
        Content::Text(t) => t,
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn send_to_every_device_and_verify_on_each() {
    let w = World::start().await;
    let alice1 = w.device("alice-laptop", "alice", true).await;
    let alice2 = w.approved_device("alice-phone", "alice", &alice1).await;
    let bob = w.device("bob-phone", "bob", true).await;
    let channel = alice1
        .create_channel("general", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    let sent = alice1
        .send_text(&channel.channel_id, "hello bob")
        .await
        .unwrap();
    assert_eq!(
        sent.recipients.len(),
        3,
        "alice's two devices and bob's one"
    );
    for reader in [&bob, &alice2, &alice1] {
        let page = reader
            .history(&channel.channel_id, 0, 10, false)
            .await
            .unwrap();
        let received = page.messages[0].1.as_ref().unwrap();
        assert_eq!(text(&received.content), "hello bob");
        assert_eq!(received.sender_identity, "alice");
        assert_eq!(received.sender_card_id, alice1.card_id());
        assert_eq!(received.source, Source::Server);
    }
    // Reopening the profile needs the passphrase.
    drop(bob);
    let err = Client::open(&w.home, "bob-phone", b"wrong").err().unwrap();
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    let bob = Client::open(&w.home, "bob-phone", b"device passphrase").unwrap();
    assert_eq!(bob.identity(), "bob");
    // A passwordless log-in works for the reopened profile.
    assert_eq!(bob.channels().await.unwrap().len(), 1);
}

#[tokio::test]
async fn device_changes_are_reported_and_drop_verification() {
    let w = World::start().await;
    let alice = w.device("alice", "alice", true).await;
    let bob = w.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("c", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    let first = alice.send_text(&channel.channel_id, "one").await.unwrap();
    assert!(
        first.events.is_empty(),
        "first contact pins silently: {:?}",
        first.events
    );

    // Safety numbers agree on both sides; alice marks bob verified.
    let a_view = alice.safety_number("bob").await.unwrap();
    let b_view = bob.safety_number("alice").await.unwrap();
    assert_eq!(a_view.number, b_view.number);
    assert!(!a_view.verified);
    alice.mark_verified(&a_view).unwrap();
    assert!(alice.safety_number("bob").await.unwrap().verified);

    // Bob enrolls a device: pending until one of his devices approves it,
    // reported as such, not encrypted to.
    let bob2 = w.device("bob-tablet", "bob", false).await;
    let sent = alice
        .send_text(&channel.channel_id, "pending")
        .await
        .unwrap();
    assert_eq!(
        sent.events,
        vec![TrustEvent::DevicePending {
            identity: "bob".into(),
            card_id: bob2.card_id(),
            device_name: "bob-tablet".into(),
        }]
    );
    assert!(!sent.recipients.contains(&bob2.card_id()));
    assert_eq!(sent.pending.len(), 1);
    assert!(alice.safety_number("bob").await.unwrap().verified);
    // The pending device cannot send either.
    let err = bob2
        .send_text(&channel.channel_id, "let me in")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("waiting for approval"), "{err}");

    // Bob approves it: reported, the verification mark drops, the number changes.
    bob.approve_device(&bob2.card_id()).await.unwrap();
    let sent = alice.send_text(&channel.channel_id, "two").await.unwrap();
    assert!(sent.recipients.contains(&bob2.card_id()));
    assert!(sent.events.contains(&TrustEvent::DeviceAdded {
        identity: "bob".into(),
        card_id: bob2.card_id(),
        device_name: "bob-tablet".into(),
    }));
    assert!(sent.events.contains(&TrustEvent::VerificationLost {
        identity: "bob".into()
    }));
    let after = alice.safety_number("bob").await.unwrap();
    assert!(!after.verified);
    assert_ne!(after.number, a_view.number);

    // Bob revokes the tablet: reported as removed.
    let err = bob
        .revoke_device(&bob2.card_id(), "sold", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs your password"), "{err}");
    bob.revoke_device(&bob2.card_id(), "sold", Some("bob-password-123"))
        .await
        .unwrap();
    let sent = alice.send_text(&channel.channel_id, "three").await.unwrap();
    assert!(sent.events.contains(&TrustEvent::DeviceRemoved {
        identity: "bob".into(),
        card_id: bob2.card_id(),
    }));
    assert_eq!(sent.recipients.len(), 2);
    // The revoked device can no longer log in (nor use the token it holds).
    let err = bob2.channels().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
    assert!(
        err.to_string()
            .contains("this device was revoked or replaced"),
        "{err}"
    );
    let err = w.reopen("bob-tablet").channels().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(
        err.to_string().contains("is not an active device of bob"),
        "{err}"
    );
}

#[tokio::test]
async fn relabelled_moved_and_replayed_messages_are_refused() {
    let w = World::start().await;
    let alice = w.device("alice", "alice", true).await;
    let bob = w.device("bob", "bob", true).await;
    let _carol = w.device("carol", "carol", true).await;
    let c1 = alice
        .create_channel(
            "c1",
            HistoryVisibility::Shared,
            &["bob".into(), "carol".into()],
        )
        .await
        .unwrap();
    let c2 = alice
        .create_channel("c2", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    alice.send_text(&c1.channel_id, "original").await.unwrap();
    let page = bob.history(&c1.channel_id, 0, 10, false).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    let first = page.messages[0].1.as_ref().unwrap();
    assert_eq!(text(&first.content), "original");
    // What a hostile relay could hand a client, built from the stored copy.
    let mut stored = bob
        .subscribe(&c1.channel_id, 1)
        .await
        .unwrap()
        .message()
        .await
        .unwrap()
        .unwrap();
    let again = bob
        .open_message(&stored)
        .await
        .unwrap_or_else(|e| panic!("reading it again is fine, got: {e}"));
    assert_eq!(again.message_id, first.message_id);

    let mut relabelled = stored.clone();
    relabelled.sender_identity = "carol".into();
    let err = bob.open_message(&relabelled).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("belongs to \"alice\", not \"carol\""),
        "{err}"
    );

    let mut moved = stored.clone();
    moved.channel_id = c2.channel_id.clone();
    let err = bob.open_message(&moved).await.unwrap_err();
    assert!(err.to_string().contains("moved by the relay"), "{err}");

    stored.index = 99;
    let err = bob.open_message(&stored).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("replay of a message already received as message 1"),
        "{err}"
    );

    let mut tampered = bob
        .subscribe(&c1.channel_id, 1)
        .await
        .unwrap()
        .message()
        .await
        .unwrap()
        .unwrap();
    let n = tampered.envelope.len();
    tampered.envelope[n - 3] ^= 1;
    let err = bob.open_message(&tampered).await.unwrap_err();
    assert!(err.to_string().contains("does not authenticate"), "{err}");
}

#[tokio::test]
async fn org_backup_and_history_sync_for_a_later_device() {
    let w = World::start().await;
    let admin = w.admin().await;
    let alice = w.device("alice", "alice", true).await;
    let bob = w.device("bob-old", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    // A fresh session carries the membership.
    let bob = {
        drop(bob);
        Client::open(&w.home, "bob-old", b"device passphrase").unwrap()
    };
    assert!(bob.is_org_member().await.unwrap());
    assert!(!alice.is_org_member().await.unwrap());

    let channel = alice
        .create_channel("deal", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    for i in 0..5 {
        alice
            .send_text(&channel.channel_id, &format!("term {i}"))
            .await
            .unwrap();
    }
    let page = bob
        .history(&channel.channel_id, 0, 50, false)
        .await
        .unwrap();
    for (_, received) in &page.messages {
        assert!(
            bob.back_up(received.as_ref().unwrap()).await.unwrap(),
            "stored"
        );
    }
    // Again: already archived, stored once.
    assert!(
        !bob.back_up(page.messages[0].1.as_ref().unwrap())
            .await
            .unwrap()
    );
    // Alice is not in the organisation: her device does not back up.
    let alice_view = alice
        .history(&channel.channel_id, 0, 1, false)
        .await
        .unwrap();
    assert!(
        !alice
            .back_up(alice_view.messages[0].1.as_ref().unwrap())
            .await
            .unwrap()
    );

    // Bob's new device gets nothing from the organisation before he approves it...
    let bob_new = w.device("bob-new", "bob", false).await;
    let err = bob_new
        .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("not approved"), "{err}");
    bob.approve_device(&bob_new.card_id()).await.unwrap();
    // ...cannot read the originals...
    let page = bob_new
        .history(&channel.channel_id, 0, 50, false)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 5);
    for (_, r) in &page.messages {
        assert!(
            r.as_ref()
                .unwrap_err()
                .to_string()
                .contains("not encrypted to this device")
        );
    }
    // ...and reads them all from the organisation, original signatures verified.
    let mut progress = Vec::new();
    let synced = bob_new
        .sync_from_org(&channel.channel_id, 0, 0, |done, total| {
            progress.push((done, total))
        })
        .await
        .unwrap();
    assert_eq!(synced.len(), 5);
    for (i, entry) in synced.iter().enumerate() {
        let r = entry.result.as_ref().unwrap();
        assert_eq!(r.index, i as u64 + 1);
        assert_eq!(text(&r.content), format!("term {i}"));
        assert_eq!(r.sender_identity, "alice");
        assert_eq!(r.sender_card_id, alice.card_id());
        assert_eq!(r.source, Source::Organisation);
    }
    assert_eq!(progress.last(), Some(&(5, 5)));
}

#[tokio::test]
async fn attachments_round_trip_and_audit_flags_unknown_cards() {
    let w = World::start().await;
    let alice = w.device("alice", "alice", true).await;
    let bob = w.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("files", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    let src = w.home.root().join("report.bin");
    std::fs::create_dir_all(w.home.root()).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    alice.send_file(&channel.channel_id, &src).await.unwrap();
    let page = bob
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    let received = page.messages[0].1.as_ref().unwrap();
    let Content::File(file) = &received.content else {
        panic!("expected a file, got {:?}", received.content);
    };
    assert_eq!(file.file_name, "report.bin");
    assert_eq!(file.size, data.len() as u64);
    let out = w.home.root().join("downloaded.bin");
    assert_eq!(
        bob.download_file(&channel.channel_id, file, &out)
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // A tampered key in the signed message cannot decrypt it.
    let mut wrong = file.clone();
    wrong.file_key[0] ^= 1;
    let err = bob
        .download_file(&channel.channel_id, &wrong, &w.home.root().join("x.bin"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Attachment(_)) && err.to_string().contains("authenticat"),
        "{err}"
    );
    assert!(
        !w.home.root().join("x.bin").exists(),
        "nothing unauthenticated is written"
    );

    // Audit: both of alice's devices made here are recognised.
    let alice2 = w.device("alice-2", "alice", false).await;
    let report = alice.audit().await.unwrap();
    let origins: Vec<Origin> = report.cards.iter().map(|c| c.origin).collect();
    assert_eq!(origins, vec![Origin::ThisDevice, Origin::CreatedHere]);
    assert_eq!(report.unrecognised_active().count(), 0);
    drop(alice2);

    // A card for alice that none of her devices made (what an app server
    // misusing its AppKey would do) is flagged until she acknowledges it.
    let injected = inject_card(&w, "alice").await;
    let report = alice.audit().await.unwrap();
    let flagged: Vec<_> = report.unrecognised_active().map(|c| c.card_id).collect();
    assert_eq!(flagged, vec![injected]);
    alice.acknowledge(&injected).unwrap();
    assert_eq!(
        alice.audit().await.unwrap().unrecognised_active().count(),
        0
    );
}

/// Registers a card for `identity` with the stack's own AppKey and token
/// key, as a compromised app server could.
async fn inject_card(w: &World, identity: &str) -> tessera_client::CardId {
    use tessera_card::{NewCard, app_sign};
    use tessera_crypto::{DeviceKeys, keystore};
    use tessera_proto::kms::v1::{RegisterCardRequest, key_directory_client::KeyDirectoryClient};
    let server_dir = w.stack.info().data_dir.join("server");
    let app = keystore::load(&server_dir.join("app.key"), None)
        .unwrap()
        .into_signing()
        .unwrap();
    let token = keystore::load(&server_dir.join("token.key"), None)
        .unwrap()
        .into_signing()
        .unwrap();
    let issuer = tessera_service::TokenIssuer::new(token, std::time::Duration::from_secs(60));
    let header = tessera_service::token::bearer_header(
        &issuer
            .issue(
                &tessera_service::token::Grant::service("tessera-server"),
                tessera_service::token::Audience::Kms,
            )
            .unwrap()
            .bytes,
    );
    let mut card = NewCard {
        identity,
        kind: tessera_card::CardKind::Client,
        device_name: "not mine",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&DeviceKeys::generate().unwrap())
    .unwrap();
    app_sign(&mut card, &app);
    let id = tessera_client::CardId::of_snapshot(&card.content_snapshot);
    let mut request = tonic::Request::new(RegisterCardRequest { card: Some(card) });
    request
        .metadata_mut()
        .insert("authorization", header.parse().unwrap());
    let channel = tonic::transport::Channel::from_shared(w.stack.info().kms_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    KeyDirectoryClient::new(channel)
        .register_card(request)
        .await
        .unwrap();
    id
}

/// More archived messages than the backup service sends in one answer (its
/// default page is 1000): the client asks again until the signed end says
/// there is no more, and gets every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_sync_pages_past_the_services_page_size() {
    const N: u64 = 1003;
    let w = World::start().await;
    let admin = w.admin().await;
    let alice = std::sync::Arc::new(w.device("alice", "alice", true).await);
    w.device("bob", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    let bob = std::sync::Arc::new(Client::open(&w.home, "bob", b"device passphrase").unwrap());
    let channel = alice
        .create_channel("long", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    // Eight senders at once; the server orders them.
    let mut senders = Vec::new();
    for s in 0..8 {
        let (alice, channel) = (alice.clone(), channel.clone());
        senders.push(tokio::spawn(async move {
            for i in (s..N).step_by(8) {
                alice
                    .send_text(&channel, &format!("line {i}"))
                    .await
                    .unwrap();
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let mut received = Vec::new();
    let mut anchor = 0;
    loop {
        let page = bob.history(&channel, anchor, 500, false).await.unwrap();
        received.extend(page.messages.into_iter().map(|(_, r)| r.unwrap()));
        if page.next_anchor == 0 {
            break;
        }
        anchor = page.next_anchor;
    }
    assert_eq!(received.len() as u64, N);
    let received = std::sync::Arc::new(received);
    let mut backers = Vec::new();
    for s in 0..8 {
        let (bob, received) = (bob.clone(), received.clone());
        backers.push(tokio::spawn(async move {
            for m in received.iter().skip(s).step_by(8) {
                assert!(bob.back_up(m).await.unwrap());
            }
        }));
    }
    for b in backers {
        b.await.unwrap();
    }
    let tablet = w.approved_device("bob-tablet", "bob", &bob).await;
    let synced = tablet
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    let indices: Vec<u64> = synced.iter().map(|e| e.index).collect();
    assert_eq!(indices.len() as u64, N, "messages synced");
    assert_eq!(indices, (1..=N).collect::<Vec<_>>());
    let mut lines: Vec<String> = synced
        .iter()
        .map(|e| match &e.result {
            Ok(r) => text(&r.content).to_owned(),
            Err(err) => panic!("message {}: {err}", e.index),
        })
        .collect();
    lines.sort();
    let mut expected: Vec<String> = (0..N).map(|i| format!("line {i}")).collect();
    expected.sort();
    assert_eq!(lines, expected);
    // A limit is honoured across answers too, and so is a start.
    let some = tablet
        .sync_from_org(&channel, 990, 12, |_, _| {})
        .await
        .unwrap();
    let indices: Vec<u64> = some.iter().map(|e| e.index).collect();
    assert_eq!(indices, (990..1002).collect::<Vec<_>>());
}

/// A device keeps sending while another device of the same user revokes it.
/// Every send either is acknowledged or denied (nothing else); every send
/// that began after the revocation returned is denied; every acknowledged
/// message is either read by the recipient or refused as sent after the
/// revocation, never accepted from a revoked card later than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_during_a_send() {
    let w = World::start().await;
    let alice = w.device("alice", "alice", true).await;
    let bob0 = w.device("bob-0", "bob", true).await;
    let bob1 = std::sync::Arc::new(w.approved_device("bob-1", "bob", &bob0).await);
    let channel = alice
        .create_channel("race", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let go = started.clone();
    let sender = {
        let (bob1, channel) = (bob1.clone(), channel.clone());
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut denied_in_a_row = 0;
            for i in 0..200 {
                let began = std::time::Instant::now();
                let result = bob1.send_text(&channel, &format!("send {i}")).await;
                if i == 3 {
                    go.notify_one();
                }
                denied_in_a_row = if result.is_err() {
                    denied_in_a_row + 1
                } else {
                    0
                };
                outcomes.push((began, result));
                if denied_in_a_row == 3 {
                    break;
                }
            }
            outcomes
        })
    };
    started.notified().await;
    bob0.revoke_device(&bob1.card_id(), "stolen", Some("bob-password-123"))
        .await
        .unwrap();
    let revoked = std::time::Instant::now();
    let outcomes = sender.await.unwrap();
    assert!(
        outcomes.last().unwrap().1.is_err(),
        "bob-1 kept sending after its revocation"
    );
    let mut acknowledged = Vec::new();
    for (began, result) in &outcomes {
        match result {
            Ok(sent) => {
                assert!(
                    *began < revoked,
                    "a send that began after the revocation was acknowledged (message {})",
                    sent.index
                );
                acknowledged.push(sent.index);
            }
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("is not an active device")
                        || text.contains("not active at the key service")
                        || text.contains("no longer in your device list")
                        || text.contains("this device was revoked or replaced"),
                    "a send failed for another reason than the revocation: {text}"
                );
            }
        }
    }
    assert!(acknowledged.len() >= 4, "{acknowledged:?}");
    // What the server acknowledged, alice either reads or refuses as sent
    // after the revocation.
    let page = alice.history(&channel, 0, 500, false).await.unwrap();
    let stored: Vec<u64> = page.messages.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        stored, acknowledged,
        "exactly the acknowledged messages are stored"
    );
    for (index, result) in &page.messages {
        match result {
            Ok(r) => assert_eq!(r.sender_card_id, bob1.card_id()),
            Err(e) => assert!(
                e.to_string()
                    .contains("sent after the sender's card was revoked"),
                "message {index}: {e}"
            ),
        }
    }
}
