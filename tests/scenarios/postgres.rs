//! The app server on PostgreSQL (`tessera-server --database-url`): the
//! exchange flow with sender keys, a live subscriber, and a restart that
//! keeps everything; nothing is in sled. The database stopped and started
//! again under a sending client: UNAVAILABLE meanwhile, then sends work
//! again, and nothing acknowledged is lost.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use tessera_client::{ClientError, Visibility};
use tessera_crypto::envelope::CONTENT_TYPE_TEXT;
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
        let stored = tokio::time::timeout(Duration::from_secs(20), live.next())
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

/// Where the database is while a send is tried.
const UP: u8 = 0;
const DOWN: u8 = 1;
const BACK: u8 = 2;

/// Waits (up to a minute) until `check` holds.
async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..1200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_unavailable_while_the_database_restarts_and_nothing_acknowledged_is_lost() {
    let mut pg = Postgres::start();
    let cluster = Cluster::start_server_on_database(&pg.url("postgres")).await;
    let alice = Arc::new(cluster.device("alice", "alice", true).await);
    let bob = cluster.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("restarts", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;

    // One client sends in a loop; a failed send is tried again with the
    // same client message id until it is acknowledged.
    let phase = Arc::new(AtomicU8::new(UP));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, u64, u8)>::new()));
    let failed = Arc::new(Mutex::new(Vec::<(u8, ClientError)>::new()));
    let sender = {
        let (alice, channel, phase, stop, acked, failed) = (
            alice.clone(),
            channel.clone(),
            phase.clone(),
            stop.clone(),
            acked.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let body = format!("message {i}");
                let id = tessera_crypto::random_array::<16>().unwrap();
                loop {
                    let tried_at = phase.load(Ordering::SeqCst);
                    match alice
                        .send_with_id(&channel, CONTENT_TYPE_TEXT, body.as_bytes(), id)
                        .await
                    {
                        Ok(sent) => {
                            acked.lock().unwrap().push((body, sent.index, tried_at));
                            break;
                        }
                        Err(e) => {
                            failed.lock().unwrap().push((tried_at, e));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        })
    };
    let acked_in = |p: u8| acked.lock().unwrap().iter().filter(|a| a.2 == p).count();
    let failed_in = |p: u8| failed.lock().unwrap().iter().filter(|f| f.0 == p).count();

    until("sends before the outage", || acked_in(UP) >= 5).await;
    tokio::task::block_in_place(|| pg.stop());
    phase.store(DOWN, Ordering::SeqCst);
    until("sends failing during the outage", || failed_in(DOWN) >= 3).await;
    tokio::task::block_in_place(|| pg.start_again());
    phase.store(BACK, Ordering::SeqCst);
    until("sends after the outage", || acked_in(BACK) >= 5).await;
    stop.store(true, Ordering::SeqCst);
    sender.await.unwrap();

    let failed = std::mem::take(&mut *failed.lock().unwrap());
    for (at, e) in &failed {
        assert_eq!(
            e.code(),
            Some(tonic::Code::Unavailable),
            "a send tried while the database was {} failed otherwise: {e}\n{}",
            ["up", "down", "back"][usize::from(*at)],
            cluster.server.log_tail()
        );
        assert!(
            e.to_string().contains("the app server is unavailable"),
            "{e}"
        );
    }
    assert_eq!(
        failed.iter().filter(|f| f.0 == BACK).count(),
        0,
        "sends tried once the database was back all succeeded"
    );

    // Every acknowledged message is stored once, at its index; nothing
    // else is (each failed send was tried again until acknowledged).
    let acked = acked.lock().unwrap().clone();
    let page = bob.history(&channel, 0, 500, false).await.unwrap();
    let indices: Vec<u64> = page.messages.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indices,
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "in order, no gaps, nothing duplicated"
    );
    for (body, index, _) in &acked {
        let (_, r) = &page.messages[(*index - 1) as usize];
        assert_eq!(text(r.as_ref().unwrap()), body, "message at {index}");
    }
}
