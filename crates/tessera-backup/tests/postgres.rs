//! The real `tessera-backup` binary with `--database-url` on a throwaway
//! PostgreSQL server, in a cluster of the real binaries: the org backup and
//! history sync of a new device (the `org` scenario's flow), the archive
//! surviving a restart, and two backup-service replicas on one database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::sync::Arc;

use common::{archived_rows, back_up_at_once, received, texts};
use tessera_client::{Source, Visibility};
use tessera_testkit::{Cluster, Postgres, Service, approve};

/// A cluster whose backup service keeps its archive in `url`.
async fn cluster_on(url: &str) -> Cluster {
    Cluster::start_with_env(&[("tessera-backup", "TESSERA_BACKUP_DATABASE_URL", url)]).await
}

/// Accepted backups a backup service counted, by result.
async fn submissions(backup: &Service, result: &str) -> f64 {
    backup
        .scrape()
        .await
        .value("tessera_backup_submissions_total", &[("result", result)])
}

#[tokio::test]
async fn org_backup_and_history_sync_with_the_backup_service_on_postgres() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    let mut cluster = cluster_on(&url).await;
    let admin = cluster.admin().await;
    let alice = cluster.device("alice-0", "alice", true).await;
    let bob0 = cluster.device("bob-0", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    let bob0 = {
        drop(bob0);
        cluster.reopen("bob-0")
    };
    let channel = alice
        .create_channel("contract", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let lines = ["clause 1", "clause 2", "clause 3"];
    for line in lines {
        alice.send_text(&channel, line).await.unwrap();
    }
    for m in received(&bob0, &channel).await {
        assert!(bob0.back_up(&m).await.unwrap(), "message {}", m.index);
    }
    assert_eq!(archived_rows(&url).await, 3, "the archive is in PostgreSQL");
    assert!(
        !cluster.data_dir("backup").join("db").exists(),
        "no sled database beside the OrgKey"
    );

    // A device enrolled afterwards reads the past from the organisation,
    // also after the backup service restarted on the same database.
    let bob_new = cluster.approved_device("bob-new", &bob0).await;
    let synced = bob_new
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(texts(&synced), lines);
    for entry in &synced {
        assert_eq!(entry.result.as_ref().unwrap().source, Source::Organisation);
        assert_eq!(
            entry.result.as_ref().unwrap().sender_card_id,
            alice.card_id(),
            "the original sender's signature, not the org's"
        );
    }
    assert!(cluster.backup.stop().await, "clean exit on SIGTERM");
    cluster.backup.restart().await;
    let bob_later = cluster.approved_device("bob-later", &bob0).await;
    let synced = bob_later
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(texts(&synced), lines);
    // A backup already archived before the restart is a duplicate now.
    let first = &received(&bob0, &channel).await[0];
    assert!(!bob0.back_up(first).await.unwrap());
    assert_eq!(archived_rows(&url).await, 3);
}

/// Two backup services on one database are replicas of one archive: what
/// one archived, the other syncs; the same message backed up through both
/// at the same moment is archived once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backup_replicas_on_one_database() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    let cluster = cluster_on(&url).await;
    let mut second = cluster.backup_on_database("backup-2", &url);
    second.start().await;
    let on_second = tessera_client::Endpoints {
        backup_url: Some(second.url()),
        ..cluster.endpoints()
    };

    let admin = cluster.admin().await;
    let alice = cluster.device("alice-0", "alice", true).await;
    // bob-0 uses the first replica, bob-1 the second.
    let bob0 = cluster.device("bob-0", "bob", true).await;
    let bob1 = cluster
        .device_with("bob-1", "bob", false, on_second.clone())
        .await;
    approve(&bob0, &bob1).await;
    admin.set_org_member("bob", true).await.unwrap();
    let bobs = [
        Arc::new(cluster.reopen("bob-0")),
        Arc::new(cluster.reopen("bob-1")),
    ];
    let channel = alice
        .create_channel("replicated", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;

    // Archived through the first replica, synced from the second.
    for i in 0..3 {
        alice
            .send_text(&channel, &format!("first {i}"))
            .await
            .unwrap();
    }
    for m in received(&bobs[0], &channel).await {
        assert!(bobs[0].back_up(&m).await.unwrap());
    }
    let bob_new = cluster
        .device_with("bob-new", "bob", false, on_second.clone())
        .await;
    approve(&bobs[0], &bob_new).await;
    let synced = bob_new
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(texts(&synced), ["first 0", "first 1", "first 2"]);

    // Each of the next messages backed up by both devices, each through
    // its own replica, at the same moment (twice each): archived once.
    for i in 0..6 {
        alice
            .send_text(&channel, &format!("raced {i}"))
            .await
            .unwrap();
    }
    let copies = [
        received(&bobs[0], &channel).await,
        received(&bobs[1], &channel).await,
    ];
    for (first, second) in copies[0].iter().zip(&copies[1]).skip(3) {
        let stored = back_up_at_once(&bobs, [first, second]).await;
        assert_eq!(stored, 1, "message {} archived exactly once", first.index);
    }
    assert_eq!(archived_rows(&url).await, 9);
    // Both replicas took part, and between them counted each message
    // archived once and every other backup of it as a duplicate.
    let (archived, duplicates) = (
        [
            submissions(&cluster.backup, "archived").await,
            submissions(&second, "archived").await,
        ],
        [
            submissions(&cluster.backup, "duplicate").await,
            submissions(&second, "duplicate").await,
        ],
    );
    assert_eq!(archived.iter().sum::<f64>(), 9.0, "{archived:?}");
    assert_eq!(duplicates.iter().sum::<f64>(), 18.0, "{duplicates:?}");
    assert!(
        duplicates.iter().all(|&d| d > 0.0),
        "both replicas answered: {duplicates:?}"
    );
    // Either replica syncs the whole archive.
    let expected: Vec<String> = (0..3)
        .map(|i| format!("first {i}"))
        .chain((0..6).map(|i| format!("raced {i}")))
        .collect();
    for device in [&bobs[0], &bobs[1]] {
        let synced = device
            .sync_from_org(&channel, 0, 0, |_, _| {})
            .await
            .unwrap();
        assert_eq!(texts(&synced), expected, "{}", device.device_name());
    }
}
