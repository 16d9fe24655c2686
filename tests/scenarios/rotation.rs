//! Key rotation. The OrgKey (`tessera-backup init-org --rotate`): the old
//! archive still syncs and verifies, new backups are sealed to the new
//! OrgCard, and a `tessera listen` that was running across the rotation
//! backs up to the new card. The AppKey, rotated by hand as
//! docs/operations.md says: devices enrolled again under the new key
//! exchange messages, the old devices are shut out, and what was lost is
//! what the document says is lost.

use std::time::Duration;

use tessera_card::CardKind;
use tessera_client::{CardId, CardStatus, Source, Visibility};
use tessera_testkit::Cluster;

use crate::{alice_and_org_member_bob, channel, text};

/// Waits until bob's archive of `channel` holds `n` messages.
async fn archived(bob: &tessera_client::Client, channel: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let synced = bob.sync_from_org(channel, 0, 0, |_, _| {}).await.unwrap();
        if synced.len() >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the archive holds {} of {n} messages",
            synced.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn org_key_rotation_keeps_the_archive_and_a_running_listen_follows_the_new_card() {
    let mut cluster = Cluster::start().await;
    let (alice, bob) = alice_and_org_member_bob(&cluster).await;
    let channel = channel(&alice, "rotation", &["bob"]).await;

    // Message 1, backed up by the library to the first OrgCard.
    alice
        .send_text(&channel, "sealed to the old card")
        .await
        .unwrap();
    let first = bob.history(&channel, 1, 1, false).await.unwrap();
    let first = first.messages[0].1.as_ref().unwrap();
    assert!(bob.back_up(first).await.unwrap());
    let old_card = bob.org().await.unwrap().card.id();

    // A long-running listen of bob's: message 2 arrives and is backed up
    // with the card it looked up then.
    let mut listen = cluster.spawn_cli("bob", &["listen", &channel, "--from", "2", "--count", "2"]);
    alice
        .send_text(&channel, "before the rotation")
        .await
        .unwrap();
    let line = listen.line(Duration::from_secs(30)).await;
    assert!(line.ends_with(": before the rotation"), "{line}");
    archived(&bob, &channel, 2).await;

    // The OrgKey is rotated and the backup service restarted.
    let created = cluster.rotate_org_key().await;
    let new_card: CardId = created["org_card_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new_card, old_card);
    let old_status = bob
        .card_by_id(&old_card, tessera_testkit::ORG, CardKind::Org)
        .await
        .unwrap()
        .status;
    assert_eq!(old_status, CardStatus::Superseded);

    // Message 3 reaches the same listen, which backs it up to the new card
    // (the service takes nothing sealed to the old one).
    alice
        .send_text(&channel, "after the rotation")
        .await
        .unwrap();
    let line = listen.line(Duration::from_secs(30)).await;
    assert!(line.ends_with(": after the rotation"), "{line}");
    let (code, _, stderr) = listen.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("backup of message"), "{stderr}");

    // The library too: bob's client still holds the old card, and backs up
    // message 4 to the new one.
    alice
        .send_text(&channel, "the library follows")
        .await
        .unwrap();
    let fourth = bob.history(&channel, 4, 1, false).await.unwrap();
    assert!(
        bob.back_up(fourth.messages[0].1.as_ref().unwrap())
            .await
            .unwrap()
    );
    assert_eq!(bob.org().await.unwrap().card.id(), new_card);

    // A device enrolled now reads the whole archive, old card and new,
    // re-encrypted and signed by the new card, original signatures intact.
    let tablet = cluster.approved_device("bob-tablet", &bob).await;
    let synced = tablet
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    let read: Vec<&str> = synced
        .iter()
        .map(|e| {
            let r = e
                .result
                .as_ref()
                .unwrap_or_else(|err| panic!("message {}: {err}", e.index));
            assert_eq!(r.source, Source::Organisation);
            assert_eq!(r.sender_card_id, alice.card_id());
            text(r)
        })
        .collect();
    assert_eq!(
        read,
        [
            "sealed to the old card",
            "before the rotation",
            "after the rotation",
            "the library follows"
        ]
    );
}

#[tokio::test]
async fn app_key_rotation_by_hand_as_the_operations_guide_says() {
    let mut cluster = Cluster::start().await;
    let (alice, bob) = alice_and_org_member_bob(&cluster).await;
    let channel = channel(&alice, "before", &["bob"]).await;
    alice
        .send_text(&channel, "under the old AppKey")
        .await
        .unwrap();
    let page = bob.history(&channel, 1, 1, false).await.unwrap();
    assert!(
        bob.back_up(page.messages[0].1.as_ref().unwrap())
            .await
            .unwrap()
    );

    // 1. Stop the app server, set app.key aside, make a new one.
    assert!(cluster.server.stop().await, "app server exit status");
    let server_dir = cluster.data_dir("server");
    std::fs::rename(
        server_dir.join("app.key"),
        server_dir.join("app.key.retired"),
    )
    .unwrap();
    let keys = tessera_testkit::run_json(
        "tessera-server",
        &["keys", "--data-dir", server_dir.to_str().unwrap()],
        &[],
    );
    let new_app = keys["app_public_key"].as_str().unwrap().to_owned();
    assert_ne!(new_app, hex::encode(cluster.keys.app.as_bytes()));
    // 2. The key service trusts only the new AppKey from now on.
    assert!(cluster.kms.stop().await, "key service exit status");
    cluster.kms.set_env("TESSERA_KMS_APP_PUBLIC_KEY", &new_app);
    cluster.kms.start().await;
    // 3. The app server, with the new key.
    cluster.server.start().await;
    // 4. A new OrgKey whose OrgCard the new AppKey signs; the backup service
    //    restarted, pinning the new AppKey.
    cluster
        .backup
        .set_env("TESSERA_BACKUP_APP_PUBLIC_KEY", &new_app);
    cluster.rotate_org_key().await;
    cluster.keys.app =
        tessera_crypto::VerifyingKey::from_bytes(&hex::decode(&new_app).unwrap()).unwrap();

    // 5. Every user resets onto a device enrolled under the new AppKey (the
    //    earlier statements of their device lists carry the old AppKey's
    //    co-signature; a reset re-roots the list, and revokes the old devices).
    let alice2 = cluster.reset_device("alice-2", "alice").await;
    let bob2 = cluster.reset_device("bob-2", "bob").await;
    for (old, who) in [(&alice, "alice"), (&bob, "bob")] {
        let info = alice2
            .card_by_id(&old.card_id(), who, CardKind::Client)
            .await;
        // Signed by the old AppKey: it no longer even verifies.
        let err = info
            .err()
            .unwrap_or_else(|| panic!("{who}'s old card verified"));
        assert!(
            err.to_string().contains("app signature does not verify"),
            "{who}'s old card: {err}"
        );
    }

    // The old channel's membership chain was signed by cards only the old
    // AppKey vouches for: it no longer verifies, and takes no message (the
    // guide says to create channels anew).
    let err = alice2
        .send_text(&channel, "into the old channel")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not a device its owner's devices approved"),
        "{err}"
    );
    // Devices enrolled under the new AppKey exchange messages and back up.
    let after = alice2
        .create_channel("after", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let sent = alice2
        .send_text(&after, "under the new AppKey")
        .await
        .unwrap();
    assert_eq!(sent.recipients.len(), 2, "alice-2 and bob-2 only");
    let page = bob2.history(&after, sent.index, 1, false).await.unwrap();
    let received = page.messages[0].1.as_ref().unwrap();
    assert_eq!(text(received), "under the new AppKey");
    assert_eq!(received.sender_card_id, alice2.card_id());
    assert!(bob2.back_up(received).await.unwrap());

    // The old devices are shut out.
    let err = cluster.reopen("alice").channels().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");

    // What the guide says is lost: history from before the rotation does not
    // verify on a device that pins only the new AppKey; what came after does.
    let synced = bob2.sync_from_org(&channel, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(synced.len(), 1);
    let err = synced[0].result.as_ref().unwrap_err().to_string();
    assert!(err.contains("app signature does not verify"), "{err}");
    let synced = bob2.sync_from_org(&after, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(synced.len(), 1);
    assert_eq!(
        text(synced[0].result.as_ref().unwrap()),
        "under the new AppKey"
    );
}
