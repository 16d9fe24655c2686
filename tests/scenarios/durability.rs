//! Durability: writes keep coming while a service is killed with SIGKILL and
//! restarted several times. Every acknowledged write is there afterwards, in
//! order, nothing duplicated; the transparency log stays consistent.

use std::{sync::Arc, time::Duration};

use tessera_card::{CardId, CardKind, NewCard, app_sign, transparency};
use tessera_client::{Client, HistoryVisibility};
use tessera_crypto::{DeviceKeys, envelope::CONTENT_TYPE_TEXT};
use tessera_proto::kms::v1::{
    GetCardRequest, GetCheckpointRequest, GetConsistencyProofRequest, RegisterCardRequest,
    key_directory_client::KeyDirectoryClient,
};
use tessera_testkit::Cluster;
use tokio::sync::Mutex;
use tonic::Request;

use crate::{app_key, connect, service_token, text};

const ROUNDS: usize = 3;

/// Sends `n` messages, retrying each with the same client message id until
/// acknowledged; returns (text, acknowledged index) pairs.
async fn send_through_crashes(alice: Arc<Client>, channel: String, n: usize) -> Vec<(String, u64)> {
    let mut acked = Vec::new();
    for i in 0..n {
        let body = format!("message {i}");
        let id = tessera_crypto::random_array::<16>().unwrap();
        loop {
            match alice
                .send_with_id(&channel, CONTENT_TYPE_TEXT, body.as_bytes(), id)
                .await
            {
                Ok(sent) => {
                    acked.push((body, sent.index));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    acked
}

#[tokio::test]
async fn acknowledged_messages_survive_app_server_crashes() {
    messages_survive_app_server_crashes(1, 60).await;
}

/// The same with four senders at once, so acknowledgements come from shared
/// flushes (group commit): still every acknowledged message, once, in order.
#[tokio::test]
async fn acknowledged_concurrent_messages_survive_app_server_crashes() {
    messages_survive_app_server_crashes(4, 30).await;
}

/// `senders` × `each` messages sent while the app server is SIGKILLed
/// `ROUNDS` times: all acknowledged, each at its index, in order, no gap,
/// none twice.
async fn messages_survive_app_server_crashes(senders: usize, each: usize) {
    let mut cluster = Cluster::start().await;
    let alice = Arc::new(cluster.device("alice", "alice", true).await);
    let bob = cluster.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("crashes", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let sending: Vec<_> = (0..senders)
        .map(|_| tokio::spawn(send_through_crashes(alice.clone(), channel.clone(), each)))
        .collect();
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(400)).await;
        cluster.server.kill();
        tokio::time::sleep(Duration::from_millis(150)).await;
        cluster.server.restart().await;
    }
    let mut acked = Vec::new();
    for (n, sender) in sending.into_iter().enumerate() {
        // Bodies repeat across senders: tell them apart.
        for (body, index) in sender.await.unwrap() {
            acked.push((format!("{n}/{body}"), body, index));
        }
    }
    let total = senders * each;
    assert_eq!(acked.len(), total);

    let page = bob.history(&channel, 0, 500, false).await.unwrap();
    let indices: Vec<u64> = page.messages.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indices,
        (1..=total as u64).collect::<Vec<_>>(),
        "in order, no gaps, nothing duplicated"
    );
    let mut seen = std::collections::HashSet::new();
    for (tag, body, index) in &acked {
        assert!(
            seen.insert(*index),
            "{tag} acknowledged at an index already taken"
        );
        let (_, r) = &page.messages[(*index - 1) as usize];
        assert_eq!(text(r.as_ref().unwrap()), body, "{tag} at {index}");
    }
}

#[tokio::test]
async fn acknowledged_cards_survive_key_service_crashes_and_the_log_stays_consistent() {
    let mut cluster = Cluster::start().await;
    let token = service_token(&cluster);
    let app = app_key(&cluster);
    let url = cluster.kms.url();
    // The cluster's set-up already logged the OrgCard.
    let before = {
        let mut r = Request::new(GetCheckpointRequest {});
        r.metadata_mut()
            .insert("authorization", token.parse().unwrap());
        let cp = KeyDirectoryClient::new(connect(&url).await)
            .get_checkpoint(r)
            .await
            .unwrap()
            .into_inner()
            .checkpoint
            .unwrap();
        transparency::verify_checkpoint(&cp, &cluster.keys.kms)
            .unwrap()
            .tree_size
    };
    let checkpoints = Arc::new(Mutex::new(Vec::new()));
    let seen = checkpoints.clone();
    let writer = tokio::spawn(async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_lazy();
        let mut kms = KeyDirectoryClient::new(channel);
        let mut acked = Vec::new();
        for i in 0..40 {
            let mut card = NewCard {
                identity: &format!("user{}", i % 7),
                kind: CardKind::Client,
                device_name: "d",
                created_at: i,
                previous_card_id: None,
            }
            .self_signed(&DeviceKeys::generate().unwrap())
            .unwrap();
            app_sign(&mut card, &app);
            let id = CardId::of_snapshot(&card.content_snapshot);
            loop {
                let mut request = Request::new(RegisterCardRequest {
                    card: Some(card.clone()),
                });
                request
                    .metadata_mut()
                    .insert("authorization", token.parse().unwrap());
                match kms.register_card(request).await {
                    Ok(r) => {
                        seen.lock().await.push(r.into_inner().checkpoint.unwrap());
                        acked.push(id);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        acked
    });
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kms.kill();
        tokio::time::sleep(Duration::from_millis(150)).await;
        cluster.kms.restart().await;
    }
    let acked = writer.await.unwrap();

    let token = service_token(&cluster);
    let mut kms = KeyDirectoryClient::new(connect(&cluster.kms.url()).await);
    fn with<T>(token: &str, m: T) -> Request<T> {
        let mut r = Request::new(m);
        r.metadata_mut()
            .insert("authorization", token.parse().unwrap());
        r
    }
    for id in &acked {
        kms.get_card(with(
            &token,
            GetCardRequest {
                card_id: id.to_vec(),
            },
        ))
        .await
        .unwrap();
    }
    let latest = kms
        .get_checkpoint(with(&token, GetCheckpointRequest {}))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let latest = transparency::verify_checkpoint(&latest, &cluster.keys.kms).unwrap();
    assert_eq!(
        latest.tree_size,
        before + 40,
        "each card logged exactly once"
    );
    // Every checkpoint handed out before a crash is a prefix of today's log.
    for old in checkpoints.lock().await.iter() {
        let old = transparency::verify_checkpoint(old, &cluster.keys.kms).unwrap();
        let proof = kms
            .get_consistency_proof(with(
                &token,
                GetConsistencyProofRequest {
                    old_size: old.tree_size,
                    new_size: latest.tree_size,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .proof
            .unwrap();
        transparency::verify_consistency(&old, &latest, &proof).unwrap();
    }
}

#[tokio::test]
async fn acknowledged_backups_survive_backup_service_crashes() {
    let mut cluster = Cluster::start().await;
    let admin = cluster.admin().await;
    let alice = cluster.device("alice", "alice", true).await;
    cluster.device("bob", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    let bob = Arc::new(cluster.reopen("bob"));
    let channel = alice
        .create_channel("archive", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    for i in 0..30 {
        alice
            .send_text(&channel, &format!("line {i}"))
            .await
            .unwrap();
    }
    let messages: Vec<_> = bob
        .history(&channel, 0, 100, false)
        .await
        .unwrap()
        .messages
        .into_iter()
        .map(|(_, r)| r.unwrap())
        .collect();
    let backer = bob.clone();
    let writer = tokio::spawn(async move {
        for m in &messages {
            // Retried until acknowledged; "already stored" after a lost ack is fine.
            while backer.back_up(m).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.backup.kill();
        tokio::time::sleep(Duration::from_millis(150)).await;
        cluster.backup.restart().await;
    }
    writer.await.unwrap();
    let synced = bob.sync_from_org(&channel, 0, 0, |_, _| {}).await.unwrap();
    let indices: Vec<u64> = synced.iter().map(|e| e.index).collect();
    assert_eq!(indices, (1..=30).collect::<Vec<_>>());
    for (i, e) in synced.iter().enumerate() {
        assert_eq!(text(e.result.as_ref().unwrap()), format!("line {i}"));
    }
}
