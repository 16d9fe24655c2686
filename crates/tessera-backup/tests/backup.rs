//! The backup service over real gRPC with a real key service and app server
//! on loopback (the whole stack, each service on its own sled directory);
//! the tests named `…_on_postgres` run the same checks against a backup
//! service keeping its archive in a throwaway PostgreSQL server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::sync::Arc;

use common::{archived_rows, back_up_at_once, received, texts};
use futures_util::StreamExt;
use tessera_backup::{Backup, store::PgOptions};
use tessera_client::{
    Client, Content, Endpoints, Enrollment, Home, KdfParams, Received, Role, Visibility,
};
use tessera_crypto::{
    envelope::{CONTENT_TYPE_HISTORY_END, ExpectedSender, Opener, ParsedEnvelope},
    seal_org_backup,
};
use tessera_proto::{
    Message as _,
    backup::v1::{
        BackupRecord, GetOrgInfoRequest, OrgEncMsg, SubmitBackupRequest, SyncHistoryRequest,
        backup_client::BackupClient,
    },
    envelope::v1::HistoryEnd,
    server::v1::{IssueTokenRequest, LoginRequest, accounts_client::AccountsClient},
};
use tessera_service::serve::{Running, ServeOptions, bind};
use tessera_stack::{Stack, StackConfig};
use tessera_testkit::Postgres;
use tonic::{Code, Request, transport::Channel};

struct World {
    _dir: tempfile::TempDir,
    stack: Stack,
    home: Home,
    /// A backup service of its own on PostgreSQL that clients use instead
    /// of the stack's (on sled), and its database.
    on_postgres: Option<(Running, Postgres)>,
}

impl World {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stack = Stack::start(StackConfig::for_tests(dir.path().join("stack")))
            .await
            .unwrap();
        let home = Home::new(dir.path().join("home"));
        Self {
            _dir: dir,
            stack,
            home,
            on_postgres: None,
        }
    }

    /// The stack, with the backup service clients use keeping its archive
    /// in a throwaway PostgreSQL database (the OrgKey and OrgCard are the
    /// stack's).
    async fn start_on_postgres() -> Self {
        let mut w = Self::start().await;
        let pg = Postgres::start();
        let info = w.stack.info();
        let backup = Backup::open_postgres(
            tessera_backup::Config {
                data_dir: info.data_dir.join("backup"),
                org_key_path: None,
                org_card_path: None,
                org_key_passphrase: None,
                server_url: info.server_url.clone(),
                kms_url: info.kms_url.clone(),
                upstream_ca: None,
                app_public_key: info.app_public_key,
                kms_public_key: info.kms_public_key,
                token_public_key: info.token_public_key,
                limits: tessera_backup::Limits::default(),
            },
            &PgOptions {
                url: pg.url("postgres"),
                pool_size: 4,
            },
        )
        .await
        .unwrap();
        let running = Running::spawn(
            backup.routes().await.unwrap(),
            bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
            ServeOptions::default(),
        )
        .unwrap();
        w.on_postgres = Some((running, pg));
        w
    }

    /// How many messages the PostgreSQL archive holds.
    async fn archived_on_postgres(&self) -> i64 {
        let (_, pg) = self.on_postgres.as_ref().unwrap();
        archived_rows(&pg.url("postgres")).await
    }

    fn backup_url(&self) -> String {
        match &self.on_postgres {
            Some((running, _)) => running.url(),
            None => self.stack.info().backup_url.clone().unwrap(),
        }
    }

    fn endpoints(&self) -> Endpoints {
        Endpoints {
            backup_url: Some(self.backup_url()),
            ..self.stack.info().endpoints()
        }
    }

    async fn device(&self, profile: &str, identity: &str, first: bool) -> Client {
        let info = self.stack.info();
        let admin = identity == info.admin_identity;
        let password = if admin {
            info.admin_password.clone()
        } else {
            format!("{identity}-password-123")
        };
        Client::enroll(
            &self.home,
            profile,
            Enrollment {
                endpoints: self.endpoints(),
                identity,
                password: &password,
                sign_up: first && !admin,
                device_name: profile,
                passphrase: b"pp",
                kdf: KdfParams::DANGER_FAST_FOR_TESTS,
                expected_app_key: Some(info.app_public_key),
                expected_kms_key: Some(info.kms_public_key),
                reset: false,
            },
        )
        .await
        .unwrap()
    }

    /// A raw backup client speaking for `identity` (password log-in).
    async fn raw(&self, identity: &str) -> (BackupClient<Channel>, String) {
        let info = self.stack.info();
        let server = Channel::from_shared(info.server_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut accounts = AccountsClient::new(server);
        let login = accounts
            .login(LoginRequest {
                identity: identity.into(),
                password: format!("{identity}-password-123"),
            })
            .await
            .unwrap()
            .into_inner();
        let server_token = format!("Bearer {}", hex::encode(login.access_token));
        let backup = Channel::from_shared(self.backup_url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = BackupClient::new(backup);
        // The app server's token is refused here: each token has one audience.
        let status = client
            .get_org_info(with(&server_token, GetOrgInfoRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let traded = accounts
            .issue_token(with(
                &server_token,
                IssueTokenRequest {
                    audience: "backup".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(traded.audience, "backup");
        (
            client,
            format!("Bearer {}", hex::encode(traded.access_token)),
        )
    }
}

fn with<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", token.parse().unwrap());
    r
}

impl World {
    /// Alice sends two messages to a channel with bob, an org member;
    /// returns bob's device, the channel and the two messages as he got them.
    async fn bob_receives_two_payments(&self) -> (Client, String, Vec<Received>) {
        let admin = self.device("admin", "admin", true).await;
        let alice = self.device("alice", "alice", true).await;
        let bob = self.device("bob", "bob", true).await;
        admin.set_org_member("bob", true).await.unwrap();
        let channel_id = alice
            .create_channel("c", Visibility::Shared, &["bob".into()])
            .await
            .unwrap()
            .channel_id;
        for text in ["pay 10", "pay 1000"] {
            alice.send_text(&channel_id, text).await.unwrap();
        }
        let messages = received(&bob, &channel_id).await;
        (bob, channel_id, messages)
    }
}

/// An OrgEncMsg of `message`, as a member's device makes it, optionally altered.
fn org_enc_msg(
    org: &tessera_client::OrgInfo,
    m: &Received,
    index: u64,
    alter: impl FnOnce(&mut BackupRecord),
) -> SubmitBackupRequest {
    let (payload, signature) = m.signed_original();
    let binding = m.envelope_binding().unwrap();
    let mut record = BackupRecord {
        channel_id: m.channel_id.clone(),
        message_index: index,
        original_payload: payload.to_vec(),
        original_signature: signature.to_vec(),
        server_time_ms: m.server_time_ms,
        envelope_sha256: binding.envelope_sha256.to_vec(),
        content_key: binding.content_key.to_vec(),
    };
    alter(&mut record);
    let sealed = seal_org_backup(
        org.card.encryption_key(),
        &m.channel_id,
        index,
        &record.encode_to_vec(),
    )
    .unwrap();
    SubmitBackupRequest {
        channel_id: m.channel_id.clone(),
        message_index: index,
        org_enc_msg: Some(OrgEncMsg {
            org_card_id: org.card.id().to_vec(),
            encapsulated_key: sealed.encapsulated_key.to_vec(),
            ciphertext: sealed.ciphertext,
        }),
    }
}

#[tokio::test]
async fn ingestion_checks_membership_signatures_duplicates_and_conflicts() {
    ingestion(&World::start().await).await;
}

#[tokio::test]
async fn ingestion_checks_membership_signatures_duplicates_and_conflicts_on_postgres() {
    let w = World::start_on_postgres().await;
    ingestion(&w).await;
    assert_eq!(w.archived_on_postgres().await, 2, "archived on PostgreSQL");
}

async fn ingestion(w: &World) {
    let admin = w.device("admin", "admin", true).await;
    let alice = w.device("alice", "alice", true).await;
    let bob = w.device("bob", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    let channel = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap();
    alice.send_text(&channel.channel_id, "first").await.unwrap();
    alice
        .send_text(&channel.channel_id, "second")
        .await
        .unwrap();
    let messages = received(&bob, &channel.channel_id).await;
    let org = bob.org().await.unwrap();
    let (mut backup, bob_token) = w.raw("bob").await;

    // A member backs up; the same record again is stored once.
    let ok = backup
        .submit_backup(with(&bob_token, org_enc_msg(&org, &messages[0], 1, |_| {})))
        .await
        .unwrap();
    assert!(ok.into_inner().stored);
    let again = backup
        .submit_backup(with(&bob_token, org_enc_msg(&org, &messages[0], 1, |_| {})))
        .await
        .unwrap();
    assert!(!again.into_inner().stored);

    // A different record for the same message is refused: every field of
    // it is checked against the stored message (here its server time).
    let conflicting = org_enc_msg(&org, &messages[0], 1, |r| r.server_time_ms += 1);
    let err = backup
        .submit_backup(with(&bob_token, conflicting))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("server time"), "{err:?}");
    // Another message's payload under this message's envelope: not stored here.
    let swapped = org_enc_msg(&org, &messages[0], 1, |r| {
        let (p, s) = messages[1].signed_original();
        r.original_payload = p.to_vec();
        r.original_signature = s.to_vec();
    });
    let err = backup
        .submit_backup(with(&bob_token, swapped))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A forged original signature is refused, and nothing is stored.
    let forged = org_enc_msg(&org, &messages[1], 2, |r| r.original_signature[5] ^= 1);
    let err = backup
        .submit_backup(with(&bob_token, forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("signature"), "{}", err.message());
    // A record claiming another index than the stored message's: its
    // server time is not the one stored there.
    let shifted = org_enc_msg(&org, &messages[1], 1, |_| {});
    let err = backup
        .submit_backup(with(&bob_token, shifted))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("server time") || err.message().contains("stores"),
        "index 1 stores another message: {err:?}"
    );
    // Sealed to another card, or garbage.
    let mut other_card = org_enc_msg(&org, &messages[1], 2, |_| {});
    other_card.org_enc_msg.as_mut().unwrap().org_card_id = vec![7; 32];
    assert_eq!(
        backup
            .submit_backup(with(&bob_token, other_card))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let mut garbage = org_enc_msg(&org, &messages[1], 2, |_| {});
    garbage.org_enc_msg.as_mut().unwrap().ciphertext = vec![0; 100];
    assert_eq!(
        backup
            .submit_backup(with(&bob_token, garbage))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Beyond the channel.
    let beyond = org_enc_msg(&org, &messages[1], 50, |_| {});
    assert_eq!(
        backup
            .submit_backup(with(&bob_token, beyond))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Alice is not in the organisation: her backups are refused.
    let (mut backup_a, alice_token) = w.raw("alice").await;
    let alice_view = received(&alice, &channel.channel_id).await;
    let err = backup_a
        .submit_backup(with(
            &alice_token,
            org_enc_msg(&org, &alice_view[1], 2, |_| {}),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Anonymous: refused.
    let err = backup_a
        .submit_backup(org_enc_msg(&org, &alice_view[1], 2, |_| {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The service is still healthy: a valid backup goes through.
    assert!(bob.back_up(&messages[1]).await.unwrap());
}

#[tokio::test]
async fn history_sync_respects_visibility_and_membership() {
    history_sync(&World::start().await).await;
}

#[tokio::test]
async fn history_sync_respects_visibility_and_membership_on_postgres() {
    let w = World::start_on_postgres().await;
    history_sync(&w).await;
    assert_eq!(w.archived_on_postgres().await, 5, "archived on PostgreSQL");
}

async fn history_sync(w: &World) {
    let admin = w.device("admin", "admin", true).await;
    let alice = w.device("alice", "alice", true).await;
    let bob = w.device("bob", "bob", true).await;
    let carol = w.device("carol", "carol", true).await;
    let _eve = w.device("eve", "eve", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    let bob = {
        drop(bob);
        Client::open(&w.home, "bob", b"pp").unwrap()
    };
    let channel = alice
        .create_channel("j", Visibility::Joined, &["bob".into()])
        .await
        .unwrap();
    for i in 0..3 {
        alice
            .send_text(&channel.channel_id, &format!("before carol {i}"))
            .await
            .unwrap();
    }
    alice
        .add_member(&channel.channel_id, "carol", Role::Member)
        .await
        .unwrap();
    for i in 0..2 {
        alice
            .send_text(&channel.channel_id, &format!("after carol {i}"))
            .await
            .unwrap();
    }
    for m in received(&bob, &channel.channel_id).await {
        assert!(bob.back_up(&m).await.unwrap());
    }

    // Carol joined at message 4: the organisation gives her 4 and 5 only.
    let synced = carol
        .sync_from_org(&channel.channel_id, 1, 0, |_, _| {})
        .await
        .unwrap();
    let indices: Vec<u64> = synced.iter().map(|e| e.index).collect();
    assert_eq!(indices, vec![4, 5]);
    for e in &synced {
        let r = e.result.as_ref().unwrap();
        assert_eq!(r.sender_identity, "alice");
        assert!(matches!(&r.content, Content::Text(t) if t.starts_with("after carol")));
    }
    // Bob sees all five, each re-encrypted to his current device.
    let all = bob
        .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        texts(&all),
        [
            "before carol 0",
            "before carol 1",
            "before carol 2",
            "after carol 0",
            "after carol 1"
        ]
    );

    // A device of bob's that none of his devices approved (pending) gets
    // no history: the organisation re-encrypts only to approved devices,
    // and says so.
    let laptop = w.device("bob-laptop", "bob", false).await;
    let err = laptop
        .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not approved by bob's other devices yet"),
        "{err}"
    );

    // Eve is not a member of the channel: denied.
    let (mut backup, eve_token) = w.raw("eve").await;
    let err = backup
        .sync_history(with(
            &eve_token,
            SyncHistoryRequest {
                channel_id: channel.channel_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Paging limits.
    let (mut backup, bob_token) = w.raw("bob").await;
    let err = backup
        .sync_history(with(
            &bob_token,
            SyncHistoryRequest {
                channel_id: channel.channel_id.clone(),
                limit: 1_000_000,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut two = backup
        .sync_history(with(
            &bob_token,
            SyncHistoryRequest {
                channel_id: channel.channel_id.clone(),
                from_index: 2,
                limit: 2,
                nonce: b"sixteen byte nonce".to_vec(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut last = None;
    while let Some(item) = two.next().await {
        let item = item.unwrap();
        got.push((item.message_index, item.remaining));
        last = Some(item.envelope);
    }
    // Two messages, then the organisation's signed end (index 0).
    assert_eq!(got, vec![(2, 1), (3, 0), (0, 0)]);
    // The end is signed by the OrgCard, addressed to bob's device, and
    // names the request's nonce and the count.
    let org = bob.org().await.unwrap();
    let keys =
        tessera_crypto::keystore::load(&w.home.profile_dir("bob").join("device.key"), Some(b"pp"))
            .unwrap()
            .into_device()
            .unwrap();
    let end = ParsedEnvelope::parse(&last.unwrap())
        .unwrap()
        .open(
            &Opener {
                card_id: *bob.card_id().as_bytes(),
                secret: &keys.encryption,
            },
            &ExpectedSender {
                identity: org.card.identity(),
                card_id: *org.card.id().as_bytes(),
                key: org.card.signing_key(),
            },
        )
        .unwrap();
    assert_eq!(end.content_type, CONTENT_TYPE_HISTORY_END);
    let end = HistoryEnd::decode(end.body.as_slice()).unwrap();
    assert_eq!(end.channel_id, channel.channel_id);
    assert_eq!(end.nonce, b"sixteen byte nonce");
    assert_eq!(end.count, 2);
    // A nonce longer than 64 bytes is refused.
    let err = backup
        .sync_history(with(
            &bob_token,
            SyncHistoryRequest {
                channel_id: channel.channel_id.clone(),
                nonce: vec![0; 65],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// Two of a member's devices back up the same messages at the same moment:
/// each message is archived once, one backup says stored and the others
/// say it was there already, and the archive syncs every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_backing_up_the_same_message_at_once() {
    racing_backups(&World::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_backing_up_the_same_message_at_once_on_postgres() {
    let w = World::start_on_postgres().await;
    racing_backups(&w).await;
    assert_eq!(w.archived_on_postgres().await, 6, "archived on PostgreSQL");
}

async fn racing_backups(w: &World) {
    let admin = w.device("admin", "admin", true).await;
    let alice = w.device("alice", "alice", true).await;
    let bob0 = w.device("bob-0", "bob", true).await;
    let bob1 = w.device("bob-1", "bob", false).await;
    bob0.approve_device(&bob1.card_id()).await.unwrap();
    admin.set_org_member("bob", true).await.unwrap();
    let bobs = ["bob-0", "bob-1"].map(|p| Arc::new(Client::open(&w.home, p, b"pp").unwrap()));
    let channel = alice
        .create_channel("race", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    for i in 0..6 {
        alice
            .send_text(&channel, &format!("raced {i}"))
            .await
            .unwrap();
    }
    // Each device reads the messages itself, then both back up every
    // message at the same moment (twice each).
    let copies = [
        received(&bobs[0], &channel).await,
        received(&bobs[1], &channel).await,
    ];
    for (first, second) in copies[0].iter().zip(&copies[1]) {
        let stored = back_up_at_once(&bobs, [first, second]).await;
        assert_eq!(stored, 1, "message {} stored exactly once", first.index);
    }
    let synced = bobs[0]
        .sync_from_org(&channel, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        texts(&synced),
        (0..6).map(|i| format!("raced {i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_message_cannot_be_archived_at_another_index_to_block_the_genuine_one() {
    let w = World::start().await;
    let (bob, _channel_id, messages) = w.bob_receives_two_payments().await;
    let org = bob.org().await.unwrap();
    let (mut backup, bob_token) = w.raw("bob").await;

    // Bob, a member, files message 1 as index 2: same sender, same
    // channel, a valid signature: with its own envelope's binding ...
    let as_second = org_enc_msg(&org, &messages[0], 2, |_| {});
    let err = backup
        .submit_backup(with(&bob_token, as_second))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // ... or with index 2's (he received it, so he has its key).
    let as_second = org_enc_msg(&org, &messages[0], 2, |r| {
        let binding = messages[1].envelope_binding().unwrap();
        r.envelope_sha256 = binding.envelope_sha256.to_vec();
        r.content_key = binding.content_key.to_vec();
    });
    let err = backup
        .submit_backup(with(&bob_token, as_second))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // So the genuine backup of index 2 is still the first, and is kept.
    let genuine = backup
        .submit_backup(with(&bob_token, org_enc_msg(&org, &messages[1], 2, |_| {})))
        .await
        .unwrap();
    assert!(genuine.into_inner().stored);
}

#[tokio::test]
async fn a_device_refuses_history_whose_archived_message_is_not_the_one_stored_at_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let config = StackConfig::for_tests(dir.path().join("stack"));
    let stack = Stack::start(config.clone()).await.unwrap();
    let w = World {
        _dir: tempfile::tempdir().unwrap(),
        stack,
        home: Home::new(dir.path().join("home")),
        on_postgres: None,
    };
    let (bob, channel_id, messages) = w.bob_receives_two_payments().await;
    assert!(bob.back_up(&messages[0]).await.unwrap());
    let org = bob.org().await.unwrap();
    let org_card_id = org.card.id().to_vec();
    let org_key = *org.card.encryption_key();
    w.stack.stop().await;

    // The archive (a compromised backup service, or its disk) holds
    // message 1, intact and correctly signed, at index 2.
    let backup_dir = dir.path().join("stack/backup");
    {
        let store = tessera_backup::store::SledStore::open(&backup_dir.join("db")).unwrap();
        use tessera_backup::store::Store as _;
        let (payload, signature) = messages[0].signed_original();
        let binding = messages[0].envelope_binding().unwrap();
        let record = BackupRecord {
            channel_id: channel_id.clone(),
            message_index: 2,
            original_payload: payload.to_vec(),
            original_signature: signature.to_vec(),
            server_time_ms: messages[1].server_time_ms,
            envelope_sha256: binding.envelope_sha256.to_vec(),
            content_key: binding.content_key.to_vec(),
        };
        let sealed = seal_org_backup(&org_key, &channel_id, 2, &record.encode_to_vec()).unwrap();
        assert!(
            store
                .insert(&tessera_backup::store::Archived {
                    channel_id: channel_id.clone(),
                    message_index: 2,
                    org_card_id,
                    encapsulated_key: sealed.encapsulated_key.to_vec(),
                    ciphertext: sealed.ciphertext,
                    submitted_by: "bob".into(),
                    submitted_at_ms: 0,
                })
                .unwrap()
        );
        store.flush().await.unwrap();
    }
    let stack = Stack::start(config).await.unwrap();
    let w = World {
        _dir: tempfile::tempdir().unwrap(),
        stack,
        home: Home::new(dir.path().join("home")),
        on_postgres: None,
    };
    let tablet = w.device("bob-tablet", "bob", false).await;
    // Bob's phone approves it, at the restarted stack's addresses.
    w.home
        .set_endpoints("bob", w.stack.info().endpoints())
        .unwrap();
    Client::open(&w.home, "bob", b"pp")
        .unwrap()
        .approve_device(&tablet.card_id())
        .await
        .unwrap();
    let history = tablet
        .sync_from_org(&channel_id, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    let first = history[0].result.as_ref().unwrap();
    assert_eq!(first.index, 1);
    let err = history[1].result.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("not the one stored at this index"),
        "message 1 shown as message 2: {err}"
    );
}
