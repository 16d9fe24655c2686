//! Message exchange to a user with several devices: every device decrypts
//! and verifies; the sender's other devices see the message too.

use futures_util::StreamExt;
use tessera_client::HistoryVisibility;
use tessera_testkit::Cluster;

use crate::text;

#[tokio::test]
async fn every_device_of_every_member_decrypts_and_verifies() {
    let cluster = Cluster::start().await;
    let users = cluster.users(&["alice", "bob"], 3).await;
    let (alice, bob) = (&users["alice"], &users["bob"]);
    let channel = alice[0]
        .create_channel("team", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    // Bob's third device is listening live before the message is sent.
    let mut live = bob[2].subscribe(&channel.channel_id, 0).await.unwrap();

    let sent = alice[0]
        .send_text(&channel.channel_id, "to all six devices")
        .await
        .unwrap();
    assert_eq!(sent.recipients.len(), 6);
    for device in alice.iter().chain(bob.iter()) {
        let page = device
            .history(&channel.channel_id, 0, 10, false)
            .await
            .unwrap();
        let r = page.messages[0]
            .1
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", device.device_name()));
        assert_eq!(text(r), "to all six devices");
        assert_eq!(r.sender_card_id, alice[0].card_id());
        assert_eq!(r.sender_identity, "alice");
    }
    let stored = tokio::time::timeout(std::time::Duration::from_secs(20), live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        text(&bob[2].open_message(&stored).await.unwrap()),
        "to all six devices"
    );

    // A live subscription stays open across the reply below, and the
    // services still stop cleanly on SIGTERM at the end.
    let mut open_stream = bob[0].subscribe(&channel.channel_id, 0).await.unwrap();

    // A reply from bob reaches alice's devices, bob's own other devices too.
    bob[1]
        .send_text(&channel.channel_id, "received on all of mine")
        .await
        .unwrap();
    for device in alice.iter().chain([&bob[0], &bob[2]]) {
        let page = device
            .history(&channel.channel_id, 2, 1, false)
            .await
            .unwrap();
        assert_eq!(
            text(page.messages[0].1.as_ref().unwrap()),
            "received on all of mine"
        );
    }
    let reply = tokio::time::timeout(std::time::Duration::from_secs(20), open_stream.next())
        .await
        .expect("the reply within 20 s")
        .expect("the stream is still open")
        .expect("a message, not an error");
    assert_eq!(reply.index, 2);
    assert_eq!(
        text(&bob[0].open_message(&reply).await.unwrap()),
        "received on all of mine"
    );

    // SIGTERM: each service exits cleanly (0), the app server without
    // waiting out its grace period on the open subscription.
    let mut cluster = cluster;
    assert!(cluster.server.stop().await, "app server exit status");
    let log = cluster.server.log_tail();
    assert!(
        log.contains("shutting down") && !log.contains("grace period over"),
        "the open stream held the shutdown until the grace period ran out:\n{log}"
    );
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), open_stream.next())
        .await
        .expect("the stream ends with the server");
    match ended {
        Some(Err(status)) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("server shutting down"),
                "the server did not end the subscription itself: {status:?}"
            );
        }
        other => panic!("expected the server's shutdown status, got {other:?}"),
    }
    assert!(cluster.backup.stop().await, "backup service exit status");
    assert!(cluster.kms.stop().await, "key service exit status");
}
