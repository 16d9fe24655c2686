//! The real `tessera-kms` binary with `--database-url` on a throwaway
//! PostgreSQL server: its directory survives restarts, a second writer is
//! refused, and a whole cluster runs on it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use tessera_card::{
    CardId, CardKind, NewCard, app_sign,
    revocation::{RevokedBy, sign_revocation},
    transparency,
};
use tessera_client::{Content, Visibility};
use tessera_crypto::{DeviceKeys, SigningKey};
use tessera_kms::store::WRITER_LOCK_KEY;
use tessera_proto::kms::v1::{
    GetCheckpointRequest, ListLogEntriesRequest, RegisterCardRequest, RevokeCardRequest,
    SearchCardsRequest, key_directory_client::KeyDirectoryClient,
};
use tessera_service::{
    TokenIssuer,
    token::{Audience, Grant, bearer_header},
};
use tessera_testkit::{Cluster, Postgres, Service};
use tonic::Request;

fn with<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", token.parse().unwrap());
    r
}

/// What a reader sees of the directory: the checkpoint, every log entry,
/// and the search answer for alice and bob.
async fn view(kms: &Service, token: &str) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
    use tessera_proto::Message as _;
    let mut client = KeyDirectoryClient::new(kms.channel().await.unwrap());
    let checkpoint = client
        .get_checkpoint(with(token, GetCheckpointRequest {}))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let entries = client
        .list_log_entries(with(
            token,
            ListLogEntriesRequest {
                from_index: 0,
                limit: 100,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let search = client
        .search_cards(with(
            token,
            SearchCardsRequest {
                identities: vec!["alice".into(), "bob".into()],
                kind: 0,
                device_list_from: Default::default(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    (checkpoint.encode_to_vec(), entries, search.encode_to_vec())
}

#[tokio::test]
async fn the_binary_keeps_its_directory_in_postgres_and_refuses_a_second_writer() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let app = SigningKey::generate().unwrap();
    let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
    let token = bearer_header(
        &issuer
            .issue(&Grant::service("tessera-server"), Audience::Kms)
            .unwrap()
            .bytes,
    );
    let url = pg.url("postgres");
    let kms_dir = dir.path().join("kms");
    let mut kms =
        Service::kms_on_database(&kms_dir, &app.verifying_key(), &issuer.public_key(), &url);
    kms.start().await;

    let mut client = KeyDirectoryClient::new(kms.channel().await.unwrap());
    let mut ids = Vec::new();
    for (identity, device) in [("alice", "laptop"), ("alice", "phone"), ("bob", "desk")] {
        let keys = DeviceKeys::generate().unwrap();
        let mut card = NewCard {
            identity,
            kind: CardKind::Client,
            device_name: device,
            created_at: 1_700_000_000,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        app_sign(&mut card, &app);
        let record = client
            .register_card(with(&token, RegisterCardRequest { card: Some(card) }))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        let registered = transparency::registered_card(&record.registration_entry).unwrap();
        ids.push(CardId::of_snapshot(&registered.content_snapshot));
    }
    let revocation = sign_revocation(
        ids[1],
        RevokedBy::App,
        &app,
        "",
        tessera_service::now_secs(),
    )
    .unwrap();
    client
        .revoke_card(with(
            &token,
            RevokeCardRequest {
                revocation: Some(revocation),
            },
        ))
        .await
        .unwrap();
    drop(client);
    let before = view(&kms, &token).await;
    assert_eq!(before.1.len(), 4, "three registrations and a revocation");
    assert!(
        !kms_dir.join("db").exists(),
        "no sled database beside the key"
    );

    // A second key service on the same database refuses to start, naming
    // the lock; the first keeps serving.
    let mut second = Service::kms_on_database(
        &dir.path().join("second"),
        &app.verifying_key(),
        &issuer.public_key(),
        &url,
    );
    let (code, log) = second.start_refused().await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("single-writer lock") && log.contains(&WRITER_LOCK_KEY.to_string()),
        "{log}"
    );
    assert_eq!(view(&kms, &token).await, before);

    // Restarted on the same database: the same checkpoint (root and size),
    // log and cards.
    assert!(kms.stop().await, "clean exit on SIGTERM");
    kms.start().await;
    assert_eq!(view(&kms, &token).await, before);
}

/// A whole cluster (the real binaries) with the key service on PostgreSQL:
/// devices enroll, members exchange messages, and after the key service
/// restarts on the same database a new device enrolls and the clients,
/// which check every checkpoint against the ones they saw before, carry on.
#[tokio::test]
async fn a_cluster_runs_with_the_key_service_on_postgres() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    let mut cluster =
        Cluster::start_with_env(&[("tessera-kms", "TESSERA_KMS_DATABASE_URL", &url)]).await;
    let users = cluster.users(&["alice", "bob"], 1).await;
    let (alice, bob) = (&users["alice"], &users["bob"]);
    let channel = alice[0]
        .create_channel("team", Visibility::Shared, &["bob".into()])
        .await
        .unwrap();
    alice[0]
        .send_text(&channel.channel_id, "before the restart")
        .await
        .unwrap();

    assert!(cluster.kms.stop().await, "clean exit on SIGTERM");
    cluster.kms.restart().await;
    let bob2 = cluster.approved_device("bob-2", &bob[0]).await;
    let sent = alice[0]
        .send_text(&channel.channel_id, "after the restart")
        .await
        .unwrap();
    assert_eq!(sent.recipients.len(), 3, "alice's device and bob's two");
    for device in [&bob[0], &bob2] {
        let page = device
            .history(&channel.channel_id, 0, 10, false)
            .await
            .unwrap();
        let texts: Vec<String> = page
            .messages
            .iter()
            .filter_map(|(_, r)| match &r.as_ref().ok()?.content {
                Content::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        assert!(
            texts.contains(&"after the restart".to_owned()),
            "{}: {texts:?}",
            device.device_name()
        );
    }
}
