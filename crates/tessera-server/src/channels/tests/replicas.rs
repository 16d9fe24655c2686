//! Replicas: several `Channels` (each with its own live hub, as separate
//! app-server processes have) on one PostgreSQL database, hearing each
//! other through LISTEN/NOTIFY (`store::listen`).

use tessera_testkit::Postgres;
use tokio_postgres::NoTls;

use super::*;
use crate::store::{Listening, PgOptions, PgStore, listen};

/// A replica on `pg`'s database, listening to the others when `listens`.
async fn replica(pg: &Postgres, listens: bool) -> (World, Option<Listening>) {
    let options = PgOptions {
        url: pg.url("postgres"),
        pool_size: 4,
    };
    let world = World::on(
        Arc::new(PgStore::open(&options).await.unwrap()),
        Limits::default(),
    );
    let listening = if listens {
        let channels = Arc::downgrade(&world.channels);
        Some(
            listen(&options, move |a| {
                channels.upgrade().map(|c| c.announced(a)).is_some()
            })
            .await
            .unwrap(),
        )
    } else {
        None
    };
    (world, listening)
}

/// A subscription pulled all the time (as a client reading at once
/// does), so it waits on its live feed whenever it has caught up; its
/// events as labels, an error as `err <code>`, and `end` when it ends.
struct Live(tokio::sync::mpsc::UnboundedReceiver<String>);

impl Live {
    async fn of(w: &World, dev: &Dev, from: u64) -> Self {
        let mut s = Box::pin(
            w.channels
                .subscribe(caller(dev), CH.into(), from)
                .await
                .unwrap(),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = s.next().await {
                let event = match event {
                    Ok(event) => label(event),
                    Err(e) => format!("err {:?}", e.code()),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
            let _ = tx.send("end".into());
        });
        Self(rx)
    }

    /// The next `n` events, each within 10 s.
    async fn next(&mut self, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..n {
            let event = tokio::time::timeout(Duration::from_secs(10), self.0.recv())
                .await
                .expect("an event within 10 s")
                .expect("the stream is open");
            got.push(event);
        }
        got
    }
}

/// Lets subscriptions that caught up settle on their live feed, so what
/// is sent next reaches them live (not in a read of the store that was
/// under way): this makes the tests able to fail, never pass.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn subscribers_on_each_replica_get_what_either_stores_once_in_order() {
    let pg = Postgres::start();
    let (a, _a_listens) = replica(&pg, true).await;
    let (b, _b_listens) = replica(&pg, true).await;
    let (alice, bob, _, mut chain) = a.channel_of_alice_with(&["bob"]).await;
    let mut on_a = Live::of(&a, &bob, 0).await;
    let mut on_b = Live::of(&b, &bob, 0).await;
    assert_eq!(on_a.next(1).await, ["chain1"]);
    assert_eq!(on_b.next(1).await, ["chain1"]);
    settle().await;
    // One after the other through each replica in turn, then ten at once:
    // a subscriber on the sending replica hears each of its own messages
    // twice (its hub, then the database), the other's once.
    for n in 1..=10u8 {
        let through = if n % 2 == 0 { &a } else { &b };
        through.send(&alice, 0, n).await.unwrap();
    }
    let at_once = (11..=20u8).map(|n| {
        let through = if n % 2 == 0 { &a } else { &b };
        through.send(&alice, 0, n)
    });
    for sent in futures_util::future::join_all(at_once).await {
        sent.unwrap();
    }
    // A statement through one, a message after it through the other.
    b.publish(&mut chain, &alice, Change::Rename("b".into()))
        .await
        .unwrap();
    a.send(&alice, 1, 21).await.unwrap();
    let mut expected: Vec<String> = (1..=20).map(|n| format!("m{n}")).collect();
    expected.extend(["chain2".into(), "m21".into()]);
    for (name, live) in [("on a", &mut on_a), ("on b", &mut on_b)] {
        assert_eq!(live.next(expected.len()).await, expected, "{name}");
    }
    // The last message through the other replica: only its announcement
    // tells each subscriber (nothing after it fills a gap). And nothing
    // came twice: the next event is that message.
    settle().await;
    b.send(&alice, 1, 22).await.unwrap();
    assert_eq!(on_a.next(1).await, ["m22"], "on a");
    assert_eq!(on_b.next(1).await, ["m22"], "on b");
    settle().await;
    a.send(&alice, 1, 23).await.unwrap();
    assert_eq!(on_a.next(1).await, ["m23"], "on a");
    assert_eq!(on_b.next(1).await, ["m23"], "on b");
    // A subscriber whose replica went away resumes on the other from its
    // next index: no gap, no duplicate.
    drop(on_a);
    drop(a);
    b.send(&alice, 1, 24).await.unwrap();
    let mut resumed = Live::of(&b, &bob, 24).await;
    b.send(&alice, 1, 25).await.unwrap();
    assert_eq!(resumed.next(2).await, ["m24", "m25"]);
}

/// A replica's own message sealed at an epoch whose statement another
/// replica accepted comes after that statement, even when the statement's
/// announcement has not arrived (here it never does: nobody listens).
#[tokio::test]
async fn a_message_comes_after_a_statement_another_replica_accepted() {
    let pg = Postgres::start();
    let (a, _) = replica(&pg, false).await;
    let (b, _) = replica(&pg, false).await;
    let (alice, bob, _, mut chain) = a.channel_of_alice_with(&["bob"]).await;
    let mut live = Live::of(&a, &bob, 0).await;
    settle().await;
    a.send(&alice, 0, 1).await.unwrap();
    assert_eq!(live.next(2).await, ["chain1", "m1"]);
    b.publish(&mut chain, &alice, Change::Rename("b".into()))
        .await
        .unwrap();
    settle().await;
    a.send(&alice, 1, 2).await.unwrap();
    assert_eq!(live.next(2).await, ["chain2", "m2"]);
}

async fn admin(pg: &Postgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Connections listening for the app server's announcements.
async fn listeners(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tessera-server listen'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The listening connection is ended under the replica (as a database
/// restart or a network cut would), and a message is stored through
/// another replica before it listens again: its announcement is lost, yet
/// the subscriber gets it, because the reconnection wakes every
/// subscription to read the store.
#[tokio::test]
async fn a_lost_listening_connection_is_made_again_and_nothing_stored_meanwhile_is_missed() {
    let pg = Postgres::start();
    let admin = admin(&pg).await;
    let (a, _a_listens) = replica(&pg, true).await;
    let (b, _) = replica(&pg, false).await;
    let (alice, bob, _, _) = a.channel_of_alice_with(&["bob"]).await;
    let mut live = Live::of(&a, &bob, 0).await;
    assert_eq!(live.next(1).await, ["chain1"]);
    settle().await;
    b.send(&alice, 0, 1).await.unwrap();
    assert_eq!(live.next(1).await, ["m1"], "heard");
    // Until a message lands while nobody listens (the reconnection may be
    // quicker than the send).
    let mut n = 1;
    let missed = loop {
        assert!(n < 10, "every send was heard: none landed in the gap");
        n += 1;
        settle().await;
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'tessera-server listen'",
                &[],
            )
            .await
            .unwrap();
        while listeners(&admin).await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.send(&alice, 0, n).await.unwrap();
        if listeners(&admin).await == 0 {
            break n;
        }
        assert_eq!(live.next(1).await, [format!("m{n}")]);
    };
    assert_eq!(live.next(1).await, [format!("m{missed}")]);
    // Listening again.
    settle().await;
    b.send(&alice, 0, missed + 1).await.unwrap();
    assert_eq!(live.next(1).await, [format!("m{}", missed + 1)]);
}

/// On PostgreSQL a batch takes no user locks (the transaction locks the
/// usage rows): a sender whose user lock is held elsewhere (an enrollment
/// waiting on the key service, say) does not stall the channel's batch.
#[tokio::test]
async fn a_held_user_lock_does_not_stall_a_batch_on_postgres() {
    let pg = Postgres::start();
    let (w, _) = replica(&pg, false).await;
    let (alice, bob, _, _) = w.channel_of_alice_with(&["bob"]).await;
    let _held = w.channels.user_locks.of("alice").lock().await;
    let sent = tokio::time::timeout(Duration::from_secs(30), async {
        let (a, b) = tokio::join!(w.send(&alice, 0, 1), w.send(&bob, 0, 2));
        (a.unwrap(), b.unwrap())
    })
    .await
    .expect("stored while alice's user lock is held");
    let mut indices = [sent.0, sent.1];
    indices.sort_unstable();
    assert_eq!(indices, [1, 2]);
}

/// A member removed through another replica gets
/// nothing sent after the statement even when this replica's hub reads
/// that replica's message (sent after the statement) from the store and
/// broadcasts it whole, before the statement's announcement (here it
/// never comes: nobody listens). The fill is set off by this replica's
/// own message past the gap.
#[tokio::test]
async fn a_member_removed_elsewhere_gets_nothing_the_hub_fills_after_the_statement() {
    let pg = Postgres::start();
    let (a, _) = replica(&pg, false).await;
    let (b, _) = replica(&pg, false).await;
    let (alice, bob, _, mut chain) = a.channel_of_alice_with(&["bob"]).await;
    let mut bob_on_a = Live::of(&a, &bob, 0).await;
    assert_eq!(bob_on_a.next(1).await, ["chain1"]);
    settle().await;
    a.send(&alice, 0, 1).await.unwrap();
    assert_eq!(bob_on_a.next(1).await, ["m1"]);
    b.remove(&mut chain, &alice, "bob").await;
    assert_eq!(b.send(&alice, 1, 2).await.unwrap(), 2);
    settle().await;
    // This replica's own message past the gap: the hub reads 2 and
    // broadcasts 2 and 3 whole.
    assert_eq!(a.send(&alice, 1, 3).await.unwrap(), 3);
    // The statement's check ends the stream before anything past it.
    assert_eq!(bob_on_a.next(2).await, ["err PermissionDenied", "end"]);
}
