//! Durability: writes keep coming from several writers while a service is
//! killed with SIGKILL and restarted three times. Each kill lands while
//! writes are in flight, and the test proves it: at least one write in
//! flight at every kill failed and was retried (`tessera_testkit::Writes`).
//! Only transport failures are retried; a refusal fails the test at once.
//! Every acknowledged write is there afterwards, in order, nothing
//! duplicated; the transparency log stays consistent. The app server is
//! crashed on sled and on PostgreSQL.

use std::sync::Arc;

use tessera_card::{CardId, app_sign, transparency};
use tessera_client::{Client, ClientError, Visibility};
use tessera_crypto::envelope::CONTENT_TYPE_TEXT;
use tessera_proto::kms::v1::{
    GetCardRequest, GetConsistencyProofRequest, RegisterCardRequest,
    key_directory_client::KeyDirectoryClient,
};
use tessera_testkit::{Cluster, Postgres, Writes, is_transport};
use tokio::sync::Mutex;
use tonic::Request;

use crate::{
    alice_and_org_member_bob, app_key, channel, connect, kms_checkpoint, new_card, service_token,
    text,
};

/// Kills per scenario.
const KILLS: u64 = 3;
/// Concurrent writers: while one waits for its answer, others are in flight.
const WRITERS: usize = 3;

/// The service was not there (refused, reset, closed): worth retrying.
fn unreachable(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable { .. })
}

/// Kills `service` three times, each while writes are in flight, spread over
/// `total` writes (so the writers are still busy at the third kill).
/// The acknowledged counts at which the kills land.
fn kill_points(total: u64) -> impl Iterator<Item = u64> {
    (1..=KILLS).map(move |k| k * total / (KILLS + 1))
}

async fn crash_three_times(service: &mut tessera_testkit::Service, writes: &Writes, total: u64) {
    for at in kill_points(total) {
        service.crash_during(writes, at).await;
    }
    let kills = writes.kills();
    assert_eq!(kills.len(), KILLS as usize);
    // A write in flight at a signal may have been answered just before it:
    // one kill may miss, but not all of them.
    assert!(
        kills.iter().all(|&(in_flight, failed)| failed <= in_flight)
            && kills.iter().any(|&(_, failed)| failed > 0),
        "(in flight, failed) at each kill: {kills:?}"
    );
}

/// `writers` tasks sending `each` texts (`writer <w> message <i>`) one
/// after the other through `from`, every attempt recorded in `writes`:
/// only transport failures are retried, with the same client message id
/// (so a message is stored once). Each task returns its acknowledged
/// (index, text).
pub(crate) fn send_through_crashes(
    from: &Arc<Client>,
    channel: &str,
    writes: &Arc<Writes>,
    writers: usize,
    each: usize,
) -> Vec<tokio::task::JoinHandle<Vec<(u64, String)>>> {
    (0..writers)
        .map(|w| {
            let (from, channel, writes) = (from.clone(), channel.to_owned(), writes.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..each {
                    let body = format!("writer {w} message {i}");
                    let id = tessera_crypto::random_array::<16>().unwrap();
                    let sent = writes
                        .retry(
                            || from.send_with_id(&channel, CONTENT_TYPE_TEXT, body.as_bytes(), id),
                            unreachable,
                        )
                        .await;
                    acked.push((sent.index, body));
                }
                acked
            })
        })
        .collect()
}

fn with<T>(token: &str, m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", token.parse().unwrap());
    r
}

#[tokio::test]
async fn acknowledged_messages_survive_app_server_crashes() {
    messages_survive_app_server_crashes(Cluster::start().await).await;
}

/// The app server on PostgreSQL: a kill mid-send leaves each transaction
/// committed or not at all; every acknowledged message is there, once.
#[tokio::test]
async fn acknowledged_messages_survive_app_server_crashes_on_postgres() {
    let pg = Postgres::start();
    messages_survive_app_server_crashes(
        Cluster::start_server_on_database(&pg.url("postgres")).await,
    )
    .await;
}

async fn messages_survive_app_server_crashes(mut cluster: Cluster) {
    const N: usize = 60;
    let alice = Arc::new(cluster.device("alice", "alice", true).await);
    let bob = cluster.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("crashes", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let writes = Arc::new(Writes::pausing_at(kill_points(N as u64)));
    let writers = send_through_crashes(&alice, &channel, &writes, WRITERS, N / WRITERS);
    crash_three_times(&mut cluster.server, &writes, N as u64).await;
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert_eq!(acked.len(), N);

    let page = bob.history(&channel, 0, 500, false).await.unwrap();
    let indices: Vec<u64> = page.messages.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indices,
        (1..=N as u64).collect::<Vec<_>>(),
        "in order, no gaps, nothing duplicated"
    );
    for (index, body) in &acked {
        let (_, r) = &page.messages[(*index - 1) as usize];
        assert_eq!(text(r.as_ref().unwrap()), body, "message at {index}");
    }
}

#[tokio::test]
async fn acknowledged_cards_survive_key_service_crashes_and_the_log_stays_consistent() {
    const N: usize = 48;
    let mut cluster = Cluster::start().await;
    let token = service_token(&cluster);
    let app = Arc::new(app_key(&cluster));
    let url = cluster.kms.url();
    // The cluster's set-up already logged the OrgCard.
    let before = kms_checkpoint(&cluster).await.tree_size;
    let checkpoints = Arc::new(Mutex::new(Vec::new()));
    let writes = Arc::new(Writes::pausing_at(kill_points(N as u64)));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (seen, writes, app, token) = (
            checkpoints.clone(),
            writes.clone(),
            app.clone(),
            token.clone(),
        );
        let kms = KeyDirectoryClient::new(
            tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .connect_lazy(),
        );
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..N / WRITERS {
                let mut card = new_card(&format!("user{}", i % 7), &format!("writer {w}"));
                app_sign(&mut card, &app);
                let id = CardId::of_snapshot(&card.content_snapshot);
                let response = writes
                    .retry(
                        || {
                            let mut kms = kms.clone();
                            let request = with(
                                &token,
                                RegisterCardRequest {
                                    card: Some(card.clone()),
                                },
                            );
                            async move { kms.register_card(request).await }
                        },
                        is_transport,
                    )
                    .await;
                seen.lock()
                    .await
                    .push(response.into_inner().checkpoint.unwrap());
                acked.push(id);
            }
            acked
        }));
    }
    crash_three_times(&mut cluster.kms, &writes, N as u64).await;
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert_eq!(acked.len(), N);

    let token = service_token(&cluster);
    let mut kms = KeyDirectoryClient::new(connect(&cluster.kms.url()).await);
    for id in &acked {
        kms.get_card(with(
            &token,
            GetCardRequest {
                card_id: id.to_vec(),
            },
        ))
        .await
        .unwrap_or_else(|e| panic!("acknowledged card {id} is gone: {e}"));
    }
    let latest = kms_checkpoint(&cluster).await;
    assert_eq!(
        latest.tree_size,
        before + N as u64,
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
    const N: usize = 30;
    let mut cluster = Cluster::start().await;
    let (alice, bob) = alice_and_org_member_bob(&cluster).await;
    let bob: Arc<Client> = Arc::new(bob);
    let channel = channel(&alice, "archive", &["bob"]).await;
    for i in 0..N {
        alice
            .send_text(&channel, &format!("line {i}"))
            .await
            .unwrap();
    }
    let mut messages: Vec<_> = bob
        .history(&channel, 0, 100, false)
        .await
        .unwrap()
        .messages
        .into_iter()
        .map(|(_, r)| r.unwrap())
        .collect();
    assert_eq!(messages.len(), N);
    let writes = Arc::new(Writes::pausing_at(kill_points(N as u64)));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mine: Vec<_> = messages.drain(..N / WRITERS).collect();
        let (bob, writes) = (bob.clone(), writes.clone());
        writers.push(tokio::spawn(async move {
            for m in &mine {
                // "Already stored" after a lost acknowledgement is Ok(false).
                writes.retry(|| bob.back_up(m), unreachable).await;
            }
            w
        }));
    }
    crash_three_times(&mut cluster.backup, &writes, N as u64).await;
    for w in writers {
        w.await.unwrap();
    }
    let synced = bob.sync_from_org(&channel, 0, 0, |_, _| {}).await.unwrap();
    let indices: Vec<u64> = synced.iter().map(|e| e.index).collect();
    assert_eq!(indices, (1..=N as u64).collect::<Vec<_>>());
    for (i, e) in synced.iter().enumerate() {
        assert_eq!(text(e.result.as_ref().unwrap()), format!("line {i}"));
    }
}
