//! Two app-server replicas on one PostgreSQL database (the same keys and
//! attachments directory): live delivery across them (LISTEN/NOTIFY), a
//! replica SIGKILLed mid-send while its subscriber moves to the other, a
//! replica whose listening connection the database ends, and enrollments
//! racing through both at the device limit.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tessera_card::{CardId, CardKind, NewCard};
use tessera_client::{CardStatus, Client, ClientError};
use tessera_crypto::DeviceKeys;
use tessera_proto::server::v1::{EnrollDeviceRequest, devices_client::DevicesClient};
use tessera_stack::hostile::Proxy;
use tessera_testkit::{CliProcess, Cluster, Postgres, Service, Writes, approve};
use tonic::Code;

use crate::{behind_relay, channel, connect, durability::send_through_crashes, text, user_tokens};

const WAIT: Duration = Duration::from_secs(30);
const SUBSCRIBE: &str = "/tessera.server.v1.Channels/Subscribe";

/// A cluster whose app server keeps its data in `pg`, and a second
/// replica of it, both running.
async fn two_replicas(pg: &Postgres) -> (Cluster, Service) {
    let cluster = Cluster::start_server_on_database(&pg.url("postgres")).await;
    let mut b = cluster.server_replica("server-b");
    b.start().await;
    (cluster, b)
}

/// `tessera listen` as `profile`, once it listens.
async fn listen(cluster: &Cluster, profile: &str, channel: &str, count: usize) -> CliProcess {
    let count = count.to_string();
    let listen = cluster.spawn_cli(
        profile,
        &["listen", channel, "--count", &count, "--no-backup"],
    );
    listen.wait_stderr("listening on", WAIT).await;
    listen
}

/// The next `n` messages `listen` prints, as (index, text), and checks it
/// then ends with nothing more.
async fn printed(mut listen: CliProcess, n: usize) -> Vec<(u64, String)> {
    let mut messages = Vec::new();
    while messages.len() < n {
        let line = listen.line(WAIT).await;
        // `#<index> <sender> (<device>): <text>`; membership changes aside.
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let (index, _) = rest.split_once(' ').unwrap();
        let (_, body) = rest.split_once("): ").unwrap();
        messages.push((index.parse().unwrap(), body.to_owned()));
    }
    let (code, rest, stderr) = listen.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(rest.is_empty(), "printed more: {rest:?}");
    messages
}

/// Sends `count` texts `<prefix> <i>` one after the other; returns what
/// each was acknowledged at.
async fn send_all(from: &Client, channel: &str, prefix: &str, count: usize) -> Vec<(u64, String)> {
    let mut sent = Vec::new();
    for i in 0..count {
        let body = format!("{prefix} {i}");
        sent.push((from.send_text(channel, &body).await.unwrap().index, body));
    }
    sent
}

/// `acked` (index, text), in index order, each index once from 1 on.
fn in_order(acked: impl IntoIterator<Item = (u64, String)>) -> Vec<(u64, String)> {
    let by_index: BTreeMap<u64, String> = acked.into_iter().collect();
    let all: Vec<(u64, String)> = by_index.into_iter().collect();
    let indices: Vec<u64> = all.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indices,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "acknowledged indices"
    );
    all
}

#[tokio::test]
async fn a_subscriber_on_each_replica_gets_what_both_store_once_in_order() {
    const EACH: usize = 8;
    let pg = Postgres::start();
    let (cluster, b) = two_replicas(&pg).await;
    let via_b = cluster.endpoints_via(&b);
    let alice = cluster.device("alice", "alice", true).await;
    let carol = cluster
        .device_with("carol", "carol", true, via_b.clone())
        .await;
    let bob_a = cluster.device("bob-a", "bob", true).await;
    let bob_b = cluster.device_with("bob-b", "bob", false, via_b).await;
    approve(&bob_a, &bob_b).await;
    let channel = channel(&alice, "replicas", &["bob", "carol"]).await;
    let on_a = listen(&cluster, "bob-a", &channel, 2 * EACH).await;
    let on_b = listen(&cluster, "bob-b", &channel, 2 * EACH).await;
    // Alice sends through the first replica, carol through the second,
    // at the same time.
    let (through_a, through_b) = tokio::join!(
        send_all(&alice, &channel, "alice", EACH),
        send_all(&carol, &channel, "carol", EACH),
    );
    let sent = in_order(through_a.into_iter().chain(through_b));
    assert_eq!(printed(on_a, 2 * EACH).await, sent, "listening on a");
    assert_eq!(printed(on_b, 2 * EACH).await, sent, "listening on b");
}

#[tokio::test]
async fn a_replica_killed_mid_send_loses_nothing_and_its_subscriber_resumes_on_the_other() {
    // Through the replica that is killed, by two writers; through the
    // other, by one.
    const THROUGH_A: u64 = 30;
    const THROUGH_B: usize = 10;
    const WRITERS: usize = 2;
    let pg = Postgres::start();
    let (mut cluster, b) = two_replicas(&pg).await;
    // Bob's device reaches the app servers through a relay that stands for
    // the load balancer: first to replica a.
    let balancer = Proxy::relay(&cluster.server.url()).await.unwrap();
    behind_relay(&cluster, &balancer, "bob", "bob").await;
    let alice = Arc::new(cluster.device("alice", "alice", true).await);
    let carol = cluster
        .device_with("carol", "carol", true, cluster.endpoints_via(&b))
        .await;
    let channel = channel(&alice, "failover", &["bob", "carol"]).await;
    let total = THROUGH_A as usize + THROUGH_B;
    let on_bob = listen(&cluster, "bob", &channel, total).await;

    let writes = Arc::new(Writes::pausing_at([THROUGH_A / 2]));
    let writers = send_through_crashes(
        &alice,
        &channel,
        &writes,
        WRITERS,
        THROUGH_A as usize / WRITERS,
    );
    let through_b = {
        let channel = channel.clone();
        async move { send_all(&carol, &channel, "carol", THROUGH_B).await }
    };
    // New calls go to replica b from now on; replica a dies mid-send (and
    // comes back), ending bob's subscription there.
    balancer.control.set_upstream(&b.url()).unwrap();
    let subscribed = balancer.control.calls(SUBSCRIBE);
    let (through_b, ()) = tokio::join!(
        through_b,
        cluster.server.crash_during(&writes, THROUGH_A / 2)
    );
    let mut acked = through_b;
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let sent = in_order(acked);
    assert_eq!(sent.len(), total);

    // Every acknowledged message is stored once, at its index.
    let history = cluster.reopen("carol");
    let page = history.history(&channel, 0, 500, false).await.unwrap();
    let stored: Vec<(u64, String)> = page
        .messages
        .iter()
        .map(|(i, r)| (*i, text(r.as_ref().unwrap()).to_owned()))
        .collect();
    assert_eq!(stored, sent, "stored once each, in order");
    // Bob moved to replica b from his next index: every message once, in
    // order, nothing missed across the move.
    assert_eq!(printed(on_bob, total).await, sent, "bob's listen");
    assert!(
        balancer.control.calls(SUBSCRIBE) > subscribed,
        "bob subscribed again (through the balancer, to replica b)"
    );
}

#[tokio::test]
async fn a_replica_whose_listening_connection_is_ended_reconnects_and_misses_nothing() {
    let pg = Postgres::start();
    let (cluster, b) = two_replicas(&pg).await;
    let alice = cluster.device("alice", "alice", true).await;
    let carol = cluster
        .device_with("carol", "carol", true, cluster.endpoints_via(&b))
        .await;
    cluster.device("bob", "bob", true).await;
    let channel = channel(&alice, "reconnect", &["bob", "carol"]).await;
    let on_a = listen(&cluster, "bob", &channel, 3).await;
    carol.send_text(&channel, "before").await.unwrap();
    // The database ends every listening connection (both replicas'), as
    // an administrator or a failover would.
    let ended = pg_terminate_listeners(&pg).await;
    assert_eq!(ended, 2, "one listening connection per replica");
    carol.send_text(&channel, "around").await.unwrap();
    // Each replica listens again, logs it and counts it.
    for replica in [&cluster.server, &b] {
        let deadline = Instant::now() + WAIT;
        while replica
            .scrape()
            .await
            .value("tessera_server_listen_reconnects_total", &[])
            < 1.0
        {
            assert!(
                Instant::now() < deadline,
                "no reconnection: {}",
                replica.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            replica
                .log_tail()
                .contains("listening to the database again"),
            "{}",
            replica.log_tail()
        );
    }
    carol.send_text(&channel, "after").await.unwrap();
    let texts: Vec<String> = printed(on_a, 3).await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["before", "around", "after"]);
}

const REGISTER: &str = "/tessera.kms.v1.KeyDirectory/RegisterCard";

/// Two replicas enroll devices of one user at once, with one place left
/// under the device limit. The key service is paused until each replica
/// has checked the limit (each saw the place free) and asked to register
/// its card: then the database lets one replica record its device, and the
/// other revokes again the card it registered and answers
/// RESOURCE_EXHAUSTED; the enrollments queued behind them are refused
/// before registering anything.
#[tokio::test]
async fn replicas_racing_enrollments_at_the_device_limit_enroll_the_limit_and_revoke_the_refused_card()
 {
    const LIMIT: usize = 3;
    /// Enrollments sent through each replica at once.
    const EACH: usize = 3;
    let pg = Postgres::start();
    let limit = LIMIT.to_string();
    let database = pg.url("postgres");
    let mut cluster = Cluster::start_with_env(&[
        ("tessera-server", "TESSERA_SERVER_DATABASE_URL", &database),
        (
            "tessera-server",
            "TESSERA_SERVER_MAX_DEVICES_PER_USER",
            &limit,
        ),
    ])
    .await;
    // Both replicas reach the key service through a proxy that counts the
    // cards they register.
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    cluster
        .server
        .set_env("TESSERA_SERVER_KMS_URL", &directory.url());
    assert!(cluster.server.stop().await, "app server exit status");
    cluster.server.start().await;
    let mut b = cluster.server_replica("server-b");
    b.start().await;
    // Two of alice's places taken, one through each replica.
    let alice = cluster.device("alice-0", "alice", true).await;
    cluster
        .device_with("alice-1", "alice", false, cluster.endpoints_via(&b))
        .await;
    let token = user_tokens(&cluster, "alice").await.server;
    let cards: Vec<_> = (0..2 * EACH)
        .map(|n| {
            NewCard {
                identity: "alice",
                kind: CardKind::Client,
                device_name: &format!("racer-{n}"),
                created_at: 0,
                previous_card_id: None,
            }
            .self_signed(&DeviceKeys::generate().unwrap())
            .unwrap()
        })
        .collect();
    let ids: Vec<CardId> = cards
        .iter()
        .map(|c| CardId::of_snapshot(&c.content_snapshot))
        .collect();

    let registered = directory.control.calls(REGISTER);
    cluster.kms.pause();
    let urls = [cluster.server.url(), b.url()];
    let racing: Vec<_> = cards
        .into_iter()
        .enumerate()
        .map(|(n, card)| {
            let (url, token) = (urls[n % 2].clone(), token.clone());
            tokio::spawn(async move {
                let mut request = tonic::Request::new(EnrollDeviceRequest {
                    card: Some(card),
                    statement: None,
                });
                request
                    .metadata_mut()
                    .insert("authorization", token.parse().unwrap());
                DevicesClient::new(connect(&url).await)
                    .enroll_device(request)
                    .await
                    .map(drop)
                    .map_err(|s| (s.code(), s.message().to_owned()))
            })
        })
        .collect();
    // Each replica now holds alice's lock over one enrollment that saw the
    // place free and waits for the key service; the others queue behind.
    let deadline = Instant::now() + WAIT;
    while directory.control.calls(REGISTER) < registered + 2 {
        assert!(
            Instant::now() < deadline,
            "the replicas did not both ask the key service to register a card"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kms.resume();
    let mut outcomes = Vec::new();
    for r in racing {
        outcomes.push(r.await.unwrap());
    }

    let enrolled: Vec<&CardId> = ids
        .iter()
        .zip(&outcomes)
        .filter_map(|(id, o)| o.is_ok().then_some(id))
        .collect();
    assert_eq!(
        enrolled.len(),
        LIMIT - 2,
        "one place was left: {outcomes:?}"
    );
    for outcome in &outcomes {
        if let Err((code, message)) = outcome {
            assert_eq!(*code, Code::ResourceExhausted, "{message}");
            assert!(message.contains("devices per user"), "{message}");
        }
    }
    assert_eq!(
        directory.control.calls(REGISTER),
        registered + 2,
        "only the two enrollments that saw the place free registered a card"
    );
    // The app server records exactly the limit active, and the refused
    // card it registered as revoked.
    let listed = alice.devices().await.unwrap();
    let status_of = |id: &CardId| {
        listed
            .iter()
            .find(|d| d.card_id == id.to_vec())
            .map(|d| d.status)
    };
    assert_eq!(
        listed
            .iter()
            .filter(|d| d.status == CardStatus::Active as i32)
            .count(),
        LIMIT,
        "active devices"
    );
    // The key service, asked through alice's device (which checks every
    // answer's proofs): the enrolled card is active, the registered and
    // refused card revoked, the others unknown.
    let mut revoked = 0;
    for (id, outcome) in ids.iter().zip(&outcomes) {
        let at_kms = alice.card_by_id(id, "alice", CardKind::Client).await;
        match (outcome, at_kms) {
            (Ok(()), Ok(info)) => {
                assert_eq!(info.status, CardStatus::Active, "enrolled {id}");
                assert_eq!(status_of(id), Some(CardStatus::Active as i32));
            }
            (Err(_), Ok(info)) => {
                assert_eq!(
                    info.status,
                    CardStatus::Revoked,
                    "refused {id} left registered at the key service"
                );
                assert_eq!(status_of(id), Some(CardStatus::Revoked as i32));
                revoked += 1;
            }
            (Err(_), Err(e)) => {
                assert!(
                    matches!(
                        e,
                        ClientError::Rejected {
                            code: Code::NotFound,
                            ..
                        }
                    ),
                    "refused {id} before registering: {e:?}"
                );
                assert_eq!(status_of(id), None, "refused {id} recorded");
            }
            (Ok(()), Err(e)) => panic!("enrolled {id} unknown at the key service: {e}"),
        }
    }
    assert_eq!(revoked, 1, "the card the database refused, revoked again");
}

/// Ends the app servers' listening connections as a database
/// administrator would (`pg_terminate_backend`): how many it ended.
async fn pg_terminate_listeners(pg: &Postgres) -> i64 {
    let (admin, connection) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'tessera-server listen'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
