//! Prometheus metrics on the real binaries: after some traffic, each
//! service's metrics endpoint reports exactly what happened.

use std::time::Duration;

use futures_util::StreamExt;
use tessera_card::transparency;
use tessera_proto::{
    kms::v1::{GetCheckpointRequest, key_directory_client::KeyDirectoryClient},
    server::v1::{SendMessageRequest, channels_client::ChannelsClient},
};
use tessera_service::metrics::{
    BACKUP_SUBMISSIONS, BACKUP_SYNCED_MESSAGES, BACKUP_SYNCS, KMS_CARDS_REGISTERED,
    KMS_LOG_ENTRIES, RPC_REQUESTS, SERVER_LIVE_SUBSCRIPTIONS, SERVER_MESSAGES_STORED,
};
use tessera_testkit::{Cluster, Service};
use tonic::Request;

use crate::{alice_and_org_member_bob, channel, connect, service_token, user_tokens};

const SENT: usize = 4;

fn rpc(
    service: &'static str,
    method: &'static str,
    code: &'static str,
) -> [(&'static str, &'static str); 3] {
    [("service", service), ("method", method), ("code", code)]
}

const CHANNELS: &str = "tessera.server.v1.Channels";
const DIRECTORY: &str = "tessera.kms.v1.KeyDirectory";
const BACKUP: &str = "tessera.backup.v1.Backup";

/// Waits (a few seconds at most) until the gauge `name` of `service` reads `want`.
async fn gauge_reaches(service: &Service, name: &str, want: f64) {
    for _ in 0..100 {
        if service.scrape().await.value(name, &[]) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never reached {want}");
}

#[tokio::test]
async fn each_service_counts_its_calls_and_records() {
    let cluster = Cluster::start().await;
    let (alice, bob) = alice_and_org_member_bob(&cluster).await;
    let channel = channel(&alice, "metrics", &["bob"]).await;

    // A live subscription while alice sends, and one refused send.
    let mut live = bob.subscribe_messages(&channel, 0).await.unwrap();
    gauge_reaches(&cluster.server, SERVER_LIVE_SUBSCRIPTIONS, 1.0).await;
    for i in 0..SENT {
        alice.send_text(&channel, &format!("m{i}")).await.unwrap();
    }
    for _ in 0..SENT {
        live.next().await.unwrap().unwrap();
    }
    let mut refused = Request::new(SendMessageRequest {
        channel_id: channel.clone(),
        client_message_id: vec![1; 16],
        sender_card_id: alice.card_id().to_vec(),
        envelope: b"not an envelope".to_vec(),
        epoch: 0,
        kind: 0,
    });
    refused.metadata_mut().insert(
        "authorization",
        user_tokens(&cluster, "alice").await.server.parse().unwrap(),
    );
    let status = ChannelsClient::new(connect(&cluster.server.url()).await)
        .send_message(refused)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    drop(live);
    gauge_reaches(&cluster.server, SERVER_LIVE_SUBSCRIPTIONS, 0.0).await;

    // Bob backs everything up (one twice), and a new device syncs it.
    let page = bob.history(&channel, 0, 100, false).await.unwrap();
    for (_, received) in &page.messages {
        assert!(bob.back_up(received.as_ref().unwrap()).await.unwrap());
    }
    let (_, first) = &page.messages[0];
    bob.back_up(first.as_ref().unwrap()).await.unwrap();
    let bob_new = cluster.approved_device("bob-1", &bob).await;
    let synced = bob_new
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.len(), SENT);

    let server = cluster.server.scrape().await;
    let sent = SENT as f64;
    assert_eq!(
        server.value(RPC_REQUESTS, &rpc(CHANNELS, "SendMessage", "OK")),
        sent
    );
    assert_eq!(
        server.value(
            RPC_REQUESTS,
            &rpc(CHANNELS, "SendMessage", "INVALID_ARGUMENT")
        ),
        1.0
    );
    assert_eq!(
        server.value(
            "tessera_rpc_duration_seconds_count",
            &[("service", CHANNELS), ("method", "SendMessage")]
        ),
        sent + 1.0
    );
    assert_eq!(server.value(SERVER_MESSAGES_STORED, &[]), sent);
    assert_eq!(
        server.value(RPC_REQUESTS, &rpc(CHANNELS, "Subscribe", "CANCELLED")),
        1.0,
        "the subscriber went away"
    );
    assert!(server.value("tessera_store_operation_seconds_count", &[("op", "flush")]) >= sent);
    assert!(
        server.value(
            "tessera_store_operation_seconds_count",
            &[("op", "append_messages")]
        ) >= 1.0
    );
    // Every stored send went through one batch (group commit).
    assert_eq!(
        server.value("tessera_server_send_batch_size_sum", &[]),
        sent
    );

    // The key service: its log size is the checkpoint's, every registration
    // counted; a call without a token is counted as refused.
    let mut checkpoint = Request::new(GetCheckpointRequest {});
    checkpoint
        .metadata_mut()
        .insert("authorization", service_token(&cluster).parse().unwrap());
    let mut kms_client = KeyDirectoryClient::new(connect(&cluster.kms.url()).await);
    let signed = kms_client
        .get_checkpoint(checkpoint)
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let size = transparency::verify_checkpoint(&signed, &cluster.keys.kms)
        .unwrap()
        .tree_size;
    let status = kms_client
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let kms = cluster.kms.scrape().await;
    assert_eq!(kms.value(KMS_LOG_ENTRIES, &[]), size as f64);
    let registered = kms.value(KMS_CARDS_REGISTERED, &[]);
    assert!(registered >= 4.0, "the org card and three devices");
    assert_eq!(
        kms.value(RPC_REQUESTS, &rpc(DIRECTORY, "RegisterCard", "OK")),
        registered
    );
    assert_eq!(
        kms.value(
            RPC_REQUESTS,
            &rpc(DIRECTORY, "GetCheckpoint", "UNAUTHENTICATED")
        ),
        1.0
    );
    assert!(kms.value(RPC_REQUESTS, &rpc(DIRECTORY, "SearchCards", "OK")) > 0.0);

    // The backup service: every backup archived once, the repeat seen as
    // such, one sync of every message.
    let backup = cluster.backup.scrape().await;
    assert_eq!(
        backup.value(BACKUP_SUBMISSIONS, &[("result", "archived")]),
        sent
    );
    assert_eq!(
        backup.value(BACKUP_SUBMISSIONS, &[("result", "duplicate")]),
        1.0
    );
    assert_eq!(
        backup.value(RPC_REQUESTS, &rpc(BACKUP, "SubmitBackup", "OK")),
        sent + 1.0
    );
    assert_eq!(backup.value(BACKUP_SYNCS, &[]), 1.0);
    assert_eq!(backup.value(BACKUP_SYNCED_MESSAGES, &[]), sent);
    assert_eq!(
        backup.value(RPC_REQUESTS, &rpc(BACKUP, "SyncHistory", "OK")),
        1.0
    );
    assert!(backup.value("tessera_store_operation_seconds_count", &[("op", "insert")]) >= sent);
}
