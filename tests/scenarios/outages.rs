//! Limits and clocks on the real processes: `tessera listen` across an
//! outage that starts before any message arrived; an access token that
//! expires during a subscription; services whose clocks are 60 seconds
//! apart.

use std::time::Duration;

use tessera_client::Source;
use tessera_stack::hostile::Proxy;
use tessera_testkit::Cluster;

use crate::{alice_and_org_member_bob, behind_relay, channel, kms_checkpoint, text};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn listen_resumes_after_an_outage_that_began_before_any_message() {
    let mut cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    // Bob's device reaches the app server through a relay we can cut.
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    behind_relay(&cluster, &relay, "bob", "bob").await;
    let channel = channel(&alice, "outage", &["bob"]).await;
    alice.send_text(&channel, "before listening").await.unwrap();

    // Bob listens for new messages only; none has arrived when the outage
    // begins: the way to the app server is cut and the server restarts,
    // ending the subscription.
    let mut listen = cluster.spawn_cli("bob", &["listen", &channel, "--count", "2"]);
    listen.wait_stderr("listening on", WAIT).await;
    relay.control.set_upstream("http://127.0.0.1:1").unwrap();
    cluster.server.kill();
    cluster.server.start().await;
    // Sent while bob cannot reach the server...
    alice
        .send_text(&channel, "during the outage")
        .await
        .unwrap();
    // ...and bob's way back.
    let resubscribed = relay.control.calls("/tessera.server.v1.Channels/Subscribe");
    relay.control.set_upstream(&cluster.server.url()).unwrap();
    let line = listen.line(WAIT).await;
    assert!(line.ends_with(": during the outage"), "{line}");
    alice.send_text(&channel, "after the outage").await.unwrap();
    let line = listen.line(WAIT).await;
    assert!(line.ends_with(": after the outage"), "{line}");
    let (code, rest, stderr) = listen.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        relay.control.calls("/tessera.server.v1.Channels/Subscribe") > resubscribed,
        "listen subscribed again"
    );
}

#[tokio::test]
async fn a_token_that_expires_during_a_subscription_is_renewed_without_loss() {
    const LIFETIME: u64 = 2;
    let lifetime = LIFETIME.to_string();
    let cluster = Cluster::start_with_env(&[(
        "tessera-server",
        "TESSERA_SERVER_TOKEN_LIFETIME_SECS",
        &lifetime,
    )])
    .await;
    let alice = cluster.device("alice", "alice", true).await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    behind_relay(&cluster, &relay, "bob", "bob").await;
    let channel = channel(&alice, "tokens", &["bob"]).await;
    let subscribe = "/tessera.server.v1.Channels/Subscribe";
    let login = "/tessera.server.v1.Accounts/FinishDeviceLogin";
    let mut listen = cluster.spawn_cli("bob", &["listen", &channel, "--count", "4"]);
    listen.wait_stderr("listening on", WAIT).await;
    // Messages keep coming, 0.7 of the token's life apart: the tokens of
    // the subscriptions run out between them.
    let gap = Duration::from_millis(LIFETIME * 700);
    let mut sent = std::time::Instant::now();
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(gap.saturating_sub(sent.elapsed())).await;
        }
        let line = format!("message {i}");
        alice.send_text(&channel, &line).await.unwrap();
        sent = std::time::Instant::now();
        let printed = listen.line(WAIT).await;
        assert!(printed.ends_with(&format!(": {line}")), "{printed}");
    }
    let (code, rest, stderr) = listen.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(rest.is_empty(), "{rest:?}");
    // The subscriptions ended as their tokens expired (nothing else ends
    // them here), and listen logged in again and subscribed again.
    let subscriptions = relay.control.calls(subscribe);
    assert!(
        subscriptions >= 2,
        "one subscription lived longer than its {LIFETIME} s token"
    );
    assert!(relay.control.calls(login) >= subscriptions);
}

#[tokio::test]
async fn services_sixty_seconds_apart_still_work() {
    // The key service runs 60 s behind the app server, the backup service
    // 60 s ahead: tokens the app server issues are checked by both.
    let cluster = Cluster::start_with_env(&[
        ("tessera-kms", "TESSERA_DANGER_CLOCK_OFFSET_SECS", "-60"),
        ("tessera-backup", "TESSERA_DANGER_CLOCK_OFFSET_SECS", "60"),
    ])
    .await;
    let (alice, bob) = alice_and_org_member_bob(&cluster).await;
    // The key service's clock really is behind: its checkpoint says so.
    let signed_at = kms_checkpoint(&cluster).await.timestamp;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        signed_at <= now - 55,
        "the key service's clock is not behind: checkpoint at {signed_at}, now {now}"
    );

    // Enrollment, exchange, backup and sync all work across the skew.
    let channel = channel(&alice, "skew", &["bob"]).await;
    alice.send_text(&channel, "across the skew").await.unwrap();
    let page = bob.history(&channel, 0, 10, false).await.unwrap();
    let received = page.messages[0].1.as_ref().unwrap();
    assert_eq!(text(received), "across the skew");
    assert!(bob.back_up(received).await.unwrap());
    let tablet = cluster.approved_device("bob-tablet", &bob).await;
    let synced = tablet
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    let r = synced[0].result.as_ref().unwrap();
    assert_eq!(
        (text(r), r.source),
        ("across the skew", Source::Organisation)
    );
}
