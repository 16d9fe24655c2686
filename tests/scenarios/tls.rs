//! The whole system over TLS: every service serves with `--tls-cert`, the
//! app server reaches the key service and the backup service reaches both
//! over https trusting the CA it was given, and clients do the same. A
//! message is exchanged, backed up and synced to a new device; a client
//! that does not trust the certificate is refused with a clear error.

use tessera_client::{Client, ClientError, Endpoints, Enrollment, HistoryVisibility};
use tessera_testkit::{Cluster, PASSPHRASE};

use crate::text;

#[tokio::test]
async fn every_hop_over_tls() {
    let cluster = Cluster::start_tls().await;
    assert!(cluster.server.url().starts_with("https://"));
    let admin = cluster.admin().await;
    let alice = cluster.device("alice-0", "alice", true).await;
    let bob = cluster.device("bob-0", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();

    let channel = alice
        .create_channel("tls", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap();
    alice
        .send_text(&channel.channel_id, "over TLS")
        .await
        .unwrap();
    let page = bob
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    let received = page.messages[0].1.as_ref().unwrap();
    assert_eq!(text(received), "over TLS");
    assert_eq!(received.sender_card_id, alice.card_id());

    // Backed up to the organisation and synced to a later device: the
    // backup service verified the sender through the key service over TLS.
    let bob = cluster.reopen("bob-0");
    assert!(bob.back_up(received).await.unwrap());
    let bob_new = cluster.approved_device("bob-new", &bob).await;
    let synced = bob_new
        .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.len(), 1);
    assert_eq!(text(synced[0].result.as_ref().unwrap()), "over TLS");

    // A client trusting another CA does not get through, and says why.
    let other = cluster.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_ca = other.join("ca.crt");
    let not_ours = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(&other_ca, not_ours.cert.pem()).unwrap();
    let endpoints = Endpoints {
        ca_cert: Some(other_ca),
        ..cluster.endpoints()
    };
    let err = Client::enroll(
        &cluster.home,
        "carol-0",
        Enrollment {
            endpoints,
            identity: "carol",
            password: "carol-password",
            sign_up: true,
            device_name: "carol-0",
            passphrase: PASSPHRASE,
            kdf: tessera_client::KdfParams::DANGER_FAST_FOR_TESTS,
            expected_app_key: Some(cluster.keys.app),
            expected_kms_key: Some(cluster.keys.kms),
            reset: false,
        },
    )
    .await
    .err()
    .expect("a client that does not trust the certificate must fail");
    assert!(
        matches!(err, ClientError::Unreachable { .. }),
        "unexpected error: {err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "cannot reach the app server at {}",
            cluster.server.url()
        )) && message.contains("invalid peer certificate"),
        "the refusal does not say why: {message}"
    );
}
