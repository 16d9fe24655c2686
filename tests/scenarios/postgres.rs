//! The app server on PostgreSQL (`tessera-server --database-url`): the
//! exchange flow with sender keys, a live subscriber, and a restart that
//! keeps everything; nothing is in sled.

use futures_util::StreamExt;
use tessera_client::Visibility;
use tessera_testkit::{Cluster, Postgres};

use crate::text;

#[tokio::test]
async fn the_app_server_on_postgres_exchanges_and_keeps_everything_across_a_restart() {
    let pg = Postgres::start();
    let mut cluster = Cluster::start_server_on_database(&pg.url("postgres")).await;
    let users = cluster.users(&["alice", "bob"], 2).await;
    let (alice, bob) = (&users["alice"], &users["bob"]);
    let channel = alice[0]
        .create_channel("team", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let mut live = bob[1].subscribe_messages(&channel, 0).await.unwrap();
    let first = alice[0].send_text(&channel, "one").await.unwrap();
    let second = alice[0].send_text(&channel, "two").await.unwrap();
    assert_eq!((first.index, second.index), (1, 2));
    assert_eq!(first.recipients.len(), 4, "every approved device");
    for n in 1..=2u64 {
        let stored = tokio::time::timeout(std::time::Duration::from_secs(20), live.next())
            .await
            .expect("live within 20 s")
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}: {}", cluster.server.log_tail()));
        assert_eq!(stored.index, n);
    }
    bob[0].send_text(&channel, "three").await.unwrap();

    // The app server keeps nothing in sled: everything is in the database.
    assert!(!cluster.data_dir("server").join("db").exists());
    assert!(cluster.server.stop().await, "stopped cleanly");
    cluster.server.restart().await;
    for device in alice.iter().chain(bob.iter()) {
        let page = device.history(&channel, 0, 10, false).await.unwrap();
        let texts: Vec<&str> = page
            .messages
            .iter()
            .map(|(_, r)| text(r.as_ref().unwrap()))
            .collect();
        assert_eq!(texts, ["one", "two", "three"], "{}", device.device_name());
    }
    // Indices go on after the restart; the sender's chain is still stored.
    let fourth = alice[0].send_text(&channel, "four").await.unwrap();
    assert_eq!(fourth.index, 4);
    let page = bob[1].history(&channel, 4, 1, false).await.unwrap();
    assert_eq!(text(page.messages[0].1.as_ref().unwrap()), "four");
}
