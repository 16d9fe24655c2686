//! The key service over real gRPC on 127.0.0.1:0 with a temporary sled
//! directory, as it runs in production; the tests in `on_postgres` (at the
//! end) run some of them again over a throwaway PostgreSQL server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use tessera_card::{
    CardId, CardKind, NewCard, Verifier, app_sign,
    device_list::{self, Action, DeviceListState, NewStatement, ParsedStatement},
    record,
    revocation::{RevokedBy, sign_revocation},
    transparency::{self, VerifiedCheckpoint},
};
use tessera_crypto::{DeviceKeys, SigningKey, VerifyingKey};
use tessera_kms::{Config, DEFAULT_MAX_REQUEST_BYTES, Kms, Limits};
use tessera_proto::{
    Message as _,
    card::v1::Card,
    kms::v1::{
        CardRecord, CardStatus, GetCardRequest, GetCheckpointRequest, GetConsistencyProofRequest,
        GetDeviceListRequest, GetInclusionProofRequest, GetServiceInfoRequest,
        ListLogEntriesRequest, PublishDeviceStatementRequest, RegisterCardRequest,
        RevokeCardRequest, SearchCardsRequest, key_directory_client::KeyDirectoryClient,
    },
    transparency::v1::SignedCheckpoint,
};
use tessera_service::{
    TokenIssuer,
    serve::{Running, ServeOptions},
    token::{Audience, AuthMethod, Grant, bearer_header},
};
use tonic::{Code, Request, transport::Channel};

struct Fixture {
    dir: tempfile::TempDir,
    /// The database, when the test runs over PostgreSQL.
    pg: Option<tessera_testkit::Postgres>,
    app: SigningKey,
    issuer: TokenIssuer,
    kms_key: VerifyingKey,
    running: Option<Running>,
    client: KeyDirectoryClient<Channel>,
    service_token: String,
    user_token: String,
}

fn config(dir: &std::path::Path, app: &SigningKey, issuer: &TokenIssuer) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        key_path: None,
        app_public_key: app.verifying_key(),
        token_public_key: issuer.public_key(),
        limits: Limits::default(),
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
    }
}

std::thread_local! {
    /// Set by the tests in `on_postgres`: `Fixture::start` then keeps the
    /// directory in a throwaway PostgreSQL server.
    static ON_POSTGRES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

async fn serve(
    dir: &std::path::Path,
    app: &SigningKey,
    issuer: &TokenIssuer,
    pg: Option<&tessera_testkit::Postgres>,
) -> (Running, KeyDirectoryClient<Channel>, VerifyingKey) {
    // After a restart, sled releases its file lock (PostgreSQL the writer
    // lock) when the old service's last handle drops, which may trail its
    // stop by a moment on a loaded machine: try again for up to 5 s.
    let mut attempts = 0;
    let kms = loop {
        let config = config(dir, app, issuer);
        let opened = match pg {
            None => Kms::open(&config).await,
            Some(pg) => {
                let database = tessera_kms::store::PgOptions {
                    url: pg.url("postgres"),
                    pool_size: 4,
                };
                Kms::open_postgres(&config, &database).await
            }
        };
        match opened {
            Ok(kms) => break kms,
            Err(e)
                if attempts < 50
                    && ["acquire lock", "single-writer lock"]
                        .iter()
                        .any(|lock| e.to_string().contains(lock)) =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("opening the key service: {e}"),
        }
    };
    let kms_key = kms.directory().public_key();
    let listener = tessera_service::serve::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let running = Running::spawn(
        kms.routes().await.unwrap(),
        listener,
        ServeOptions::default(),
    )
    .unwrap();
    let channel = Channel::from_shared(running.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = KeyDirectoryClient::new(channel).max_decoding_message_size(16 << 20);
    (running, client, kms_key)
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let app = SigningKey::generate().unwrap();
        let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
        let pg = ON_POSTGRES.get().then(tessera_testkit::Postgres::start);
        let (running, client, kms_key) = serve(dir.path(), &app, &issuer, pg.as_ref()).await;
        assert_eq!(
            dir.path().join("db").exists(),
            pg.is_none(),
            "sled only when not on PostgreSQL"
        );
        let service_token = bearer_header(
            &issuer
                .issue(&Grant::service("tessera-server"), Audience::Kms)
                .unwrap()
                .bytes,
        );
        let user_token = bearer_header(
            &issuer
                .issue(&Grant::user("alice", AuthMethod::Password), Audience::Kms)
                .unwrap()
                .bytes,
        );
        Self {
            dir,
            pg,
            app,
            issuer,
            kms_key,
            running: Some(running),
            client,
            service_token,
            user_token,
        }
    }

    async fn restart(&mut self) {
        // The old client's connection keeps the old service (and its sled
        // database) alive: close it before stopping.
        self.client =
            KeyDirectoryClient::new(Channel::from_static("http://127.0.0.1:9").connect_lazy());
        self.running.take().unwrap().stop().await.unwrap();
        let (running, client, kms_key) =
            serve(self.dir.path(), &self.app, &self.issuer, self.pg.as_ref()).await;
        assert_eq!(kms_key, self.kms_key, "the key survives a restart");
        self.running = Some(running);
        self.client = client;
    }

    fn verifier(&self) -> Verifier {
        Verifier::new(self.app.verifying_key(), self.kms_key)
    }

    fn with<T>(&self, token: &str, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert("authorization", token.parse().unwrap());
        r
    }

    fn card(&self, identity: &str, device: &str) -> (DeviceKeys, Card) {
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
        app_sign(&mut card, &self.app);
        (keys, card)
    }

    async fn register(
        &mut self,
        card: Card,
    ) -> Result<(CardRecord, SignedCheckpoint), tonic::Status> {
        let request = self.with(
            &self.service_token.clone(),
            RegisterCardRequest { card: Some(card) },
        );
        let r = self.client.register_card(request).await?.into_inner();
        Ok((r.record.unwrap(), r.checkpoint.unwrap()))
    }

    async fn search(
        &mut self,
        identities: &[&str],
    ) -> Result<tessera_proto::kms::v1::SearchCardsResponse, tonic::Status> {
        let request = self.with(
            &self.user_token.clone(),
            SearchCardsRequest {
                identities: identities.iter().map(|s| s.to_string()).collect(),
                kind: 0,
                device_list_from: Default::default(),
            },
        );
        Ok(self.client.search_cards(request).await?.into_inner())
    }

    async fn checkpoint(&mut self) -> VerifiedCheckpoint {
        let request = self.with(&self.user_token.clone(), GetCheckpointRequest {});
        let cp = self
            .client
            .get_checkpoint(request)
            .await
            .unwrap()
            .into_inner()
            .checkpoint
            .unwrap();
        transparency::verify_checkpoint(&cp, &self.kms_key).unwrap()
    }

    /// What a client does with a record: verify the card, then its inclusion.
    fn check_record(
        &self,
        record: &CardRecord,
        checkpoint: &SignedCheckpoint,
        identity: &str,
    ) -> CardId {
        let card = self
            .verifier()
            .verify(
                &transparency::registered_card(&record.registration_entry).unwrap(),
                Some(identity),
                CardKind::Client,
            )
            .unwrap();
        let cp = transparency::verify_checkpoint(checkpoint, &self.kms_key).unwrap();
        transparency::verify_inclusion(
            &cp,
            &record.registration_entry,
            record.inclusion.as_ref().unwrap(),
        )
        .unwrap();
        card.id()
    }
}

#[tokio::test]
async fn register_search_get_revoke_with_several_devices() {
    let mut f = Fixture::start().await;
    let (alice1_keys, alice1) = f.card("alice", "laptop");
    let (_, alice2) = f.card("alice", "phone");
    let (_, bob1) = f.card("bob", "desktop");
    let (r1, cp1) = f.register(alice1.clone()).await.unwrap();
    let id1 = f.check_record(&r1, &cp1, "alice");
    let (r2, cp2) = f.register(alice2).await.unwrap();
    let id2 = f.check_record(&r2, &cp2, "alice");
    f.register(bob1).await.unwrap();

    let found = f.search(&["alice", "bob", "carol"]).await.unwrap();
    let names: Vec<_> = found.results.iter().map(|r| r.identity.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    let cp = found.checkpoint.unwrap();
    let alice_ids: Vec<CardId> = found.results[0]
        .cards
        .iter()
        .map(|r| f.check_record(r, &cp, "alice"))
        .collect();
    assert_eq!(alice_ids.len(), 2);
    assert!(alice_ids.contains(&id1) && alice_ids.contains(&id2));
    assert_eq!(found.results[1].cards.len(), 1);
    assert!(
        found.results[2].cards.is_empty(),
        "never a card of an identity not asked for"
    );
    for r in &found.results[1].cards {
        f.check_record(r, &cp, "bob");
    }

    // Self-revocation: the card leaves search but stays fetchable by id.
    let revocation = sign_revocation(
        id1,
        RevokedBy::SelfKey,
        &alice1_keys.signing,
        "lost",
        tessera_service::now_secs(),
    )
    .unwrap();
    let request = f.with(
        &f.user_token.clone(),
        RevokeCardRequest {
            revocation: Some(revocation),
        },
    );
    let revoked = f.client.revoke_card(request).await.unwrap().into_inner();
    assert_eq!(revoked.record.unwrap().status, CardStatus::Revoked as i32);

    let found = f.search(&["alice"]).await.unwrap();
    assert_eq!(found.results[0].cards.len(), 1);
    let request = f.with(
        &f.user_token.clone(),
        GetCardRequest {
            card_id: id1.to_vec(),
        },
    );
    let got = f.client.get_card(request).await.unwrap().into_inner();
    let record = got.record.unwrap();
    assert_eq!(record.status, CardStatus::Revoked as i32);
    assert!(record.revocation.is_some());
    f.check_record(&record, &got.checkpoint.unwrap(), "alice");

    // Registering the same card again changes nothing.
    let before = f.checkpoint().await;
    let (again, _) = f.register(alice1).await.unwrap();
    assert_eq!(again.status, CardStatus::Revoked as i32);
    assert_eq!(f.checkpoint().await.tree_size, before.tree_size);
    assert_eq!(before.tree_size, 4, "3 registrations + 1 revocation");
}

#[tokio::test]
async fn cards_the_app_did_not_sign_are_refused() {
    let mut f = Fixture::start().await;
    let (_, mut unsigned) = f.card("alice", "laptop");
    unsigned.app_signature.clear();
    let err = f.register(unsigned).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("no app signature"),
        "{}",
        err.message()
    );

    let (_, mut other_app) = f.card("alice", "laptop");
    app_sign(&mut other_app, &SigningKey::generate().unwrap());
    let err = f.register(other_app).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("app signature does not verify"),
        "{}",
        err.message()
    );

    // A bad self signature or a malformed snapshot is the caller's error.
    let (_, mut bad_self) = f.card("alice", "laptop");
    bad_self.self_signature[0] ^= 1;
    assert_eq!(
        f.register(bad_self).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let garbage = Card {
        content_snapshot: vec![0xff; 40],
        self_signature: vec![1; 64],
        app_signature: vec![2; 64],
        kms_signature: vec![],
    };
    assert_eq!(
        f.register(garbage).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let wrong_lengths = Card {
        self_signature: vec![1; 3],
        ..f.card("alice", "x").1
    };
    assert_eq!(
        f.register(wrong_lengths).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Users cannot register directly, nobody anonymously.
    let (_, card) = f.card("alice", "laptop");
    let request = f.with(
        &f.user_token.clone(),
        RegisterCardRequest {
            card: Some(card.clone()),
        },
    );
    assert_eq!(
        f.client.register_card(request).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let err = f
        .client
        .register_card(RegisterCardRequest { card: Some(card) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(f.checkpoint().await.tree_size, 0, "nothing was logged");
}

#[tokio::test]
async fn revocation_by_a_stranger_is_refused() {
    let mut f = Fixture::start().await;
    let (_, card) = f.card("alice", "laptop");
    let (record, cp) = f.register(card).await.unwrap();
    let id = f.check_record(&record, &cp, "alice");
    let stranger = SigningKey::generate().unwrap();
    for by in [RevokedBy::SelfKey, RevokedBy::App] {
        let revocation = sign_revocation(id, by, &stranger, "", 1).unwrap();
        let request = f.with(
            &f.user_token.clone(),
            RevokeCardRequest {
                revocation: Some(revocation),
            },
        );
        let err = f.client.revoke_card(request).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    // The AppKey may revoke.
    // A revocation dated before the card existed would void its whole past.
    let backdated = sign_revocation(id, RevokedBy::App, &f.app, "admin", 1).unwrap();
    let request = f.with(
        &f.service_token.clone(),
        RevokeCardRequest {
            revocation: Some(backdated),
        },
    );
    let status = f.client.revoke_card(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("before the card was registered"));
    let revocation = sign_revocation(
        id,
        RevokedBy::App,
        &f.app,
        "admin",
        tessera_service::now_secs(),
    )
    .unwrap();
    let request = f.with(
        &f.service_token.clone(),
        RevokeCardRequest {
            revocation: Some(revocation),
        },
    );
    f.client.revoke_card(request).await.unwrap();
    // Unknown card: NOT_FOUND.
    let revocation =
        sign_revocation(CardId::of_snapshot(b"none"), RevokedBy::App, &f.app, "", 1).unwrap();
    let request = f.with(
        &f.service_token.clone(),
        RevokeCardRequest {
            revocation: Some(revocation),
        },
    );
    assert_eq!(
        f.client.revoke_card(request).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn proofs_verify_for_every_size_and_history_survives_restart() {
    let mut f = Fixture::start().await;
    let mut seen: Vec<VerifiedCheckpoint> = vec![f.checkpoint().await];
    for i in 0..13 {
        let (_, card) = f.card(&format!("user{}", i % 4), &format!("device {i}"));
        f.register(card).await.unwrap();
        seen.push(f.checkpoint().await);
    }
    // Every earlier checkpoint is consistent with the latest (sizes 0..=13,
    // most not powers of two), and every leaf is included in each.
    let latest = seen.last().unwrap().clone();
    for old in &seen {
        let request = f.with(
            &f.user_token.clone(),
            GetConsistencyProofRequest {
                old_size: old.tree_size,
                new_size: 0,
            },
        );
        let response = f
            .client
            .get_consistency_proof(request)
            .await
            .unwrap()
            .into_inner();
        let new =
            transparency::verify_checkpoint(&response.checkpoint.unwrap(), &f.kms_key).unwrap();
        assert_eq!(new.tree_size, latest.tree_size);
        transparency::verify_consistency(old, &new, &response.proof.unwrap()).unwrap();
        for index in 0..old.tree_size {
            let request = f.with(
                &f.user_token.clone(),
                GetInclusionProofRequest {
                    leaf_index: index,
                    tree_size: old.tree_size,
                },
            );
            let r = f
                .client
                .get_inclusion_proof(request)
                .await
                .unwrap()
                .into_inner();
            transparency::verify_inclusion(old, &r.entry, &r.proof.unwrap()).unwrap();
        }
    }

    let request = f.with(
        &f.user_token.clone(),
        ListLogEntriesRequest {
            from_index: 5,
            limit: 4,
        },
    );
    let listed = f
        .client
        .list_log_entries(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 4);

    let before = f.search(&["user0", "user1"]).await.unwrap();
    f.restart().await;
    let after_cp = f.checkpoint().await;
    assert_eq!(
        (after_cp.tree_size, after_cp.root_hash),
        (latest.tree_size, latest.root_hash)
    );
    let after = f.search(&["user0", "user1"]).await.unwrap();
    for (b, a) in before.results.iter().zip(&after.results) {
        let ids = |r: &tessera_proto::kms::v1::IdentityCards| -> Vec<Vec<u8>> {
            r.cards
                .iter()
                .map(|c| {
                    transparency::registered_card(&c.registration_entry)
                        .unwrap()
                        .content_snapshot
                })
                .collect()
        };
        assert_eq!(ids(b), ids(a));
    }
    // The log goes on from where it was, consistently.
    let (_, card) = f.card("user9", "new");
    f.register(card).await.unwrap();
    let request = f.with(
        &f.user_token.clone(),
        GetConsistencyProofRequest {
            old_size: latest.tree_size,
            new_size: 0,
        },
    );
    let response = f
        .client
        .get_consistency_proof(request)
        .await
        .unwrap()
        .into_inner();
    let new = transparency::verify_checkpoint(&response.checkpoint.unwrap(), &f.kms_key).unwrap();
    transparency::verify_consistency(&latest, &new, &response.proof.unwrap()).unwrap();
}

#[tokio::test]
async fn rotation_supersedes_the_previous_card() {
    let mut f = Fixture::start().await;
    let (old_keys, old) = f.card("alice", "laptop");
    let (r, cp) = f.register(old).await.unwrap();
    let old_id = f.check_record(&r, &cp, "alice");
    let new_keys = DeviceKeys::generate().unwrap();
    let mut new = NewCard {
        identity: "alice",
        kind: CardKind::Client,
        device_name: "laptop",
        created_at: 1_700_000_100,
        previous_card_id: Some(old_id),
    }
    .self_signed(&new_keys)
    .unwrap();
    app_sign(&mut new, &f.app);
    let (r, cp) = f.register(new.clone()).await.unwrap();
    let new_id = f.check_record(&r, &cp, "alice");
    let found = f.search(&["alice"]).await.unwrap();
    assert_eq!(found.results[0].cards.len(), 1);
    assert_eq!(
        f.check_record(
            &found.results[0].cards[0],
            found.checkpoint.as_ref().unwrap(),
            "alice"
        ),
        new_id
    );
    let request = f.with(
        &f.user_token.clone(),
        GetCardRequest {
            card_id: old_id.to_vec(),
        },
    );
    let got = f
        .client
        .get_card(request)
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(got.status, CardStatus::Superseded as i32);
    assert_eq!(got.superseded_by, new_id.to_vec());
    drop(old_keys);

    // A second successor of the same card is refused.
    let mut twin = NewCard {
        identity: "alice",
        kind: CardKind::Client,
        device_name: "twin",
        created_at: 1_700_000_200,
        previous_card_id: Some(old_id),
    }
    .self_signed(&DeviceKeys::generate().unwrap())
    .unwrap();
    app_sign(&mut twin, &f.app);
    assert_eq!(
        f.register(twin).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn limits_and_bad_input_get_clear_statuses() {
    let mut f = Fixture::start().await;
    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = f.search(&refs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("the limit is 100"),
        "{}",
        err.message()
    );

    let err = f.search(&[""]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("empty"), "{}", err.message());

    let huge = "a".repeat(10 * 1024 * 1024);
    let err = f.search(&[huge.as_str()]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("the limit is"), "{}", err.message());

    let request = f.with(
        &f.user_token.clone(),
        GetCardRequest {
            card_id: vec![1, 2, 3],
        },
    );
    let err = f.client.get_card(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("32 bytes"));

    let request = f.with(
        &f.user_token.clone(),
        ListLogEntriesRequest {
            from_index: 0,
            limit: 5000,
        },
    );
    assert_eq!(
        f.client.list_log_entries(request).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let request = f.with(
        &f.user_token.clone(),
        GetConsistencyProofRequest {
            old_size: 1,
            new_size: 50,
        },
    );
    assert_eq!(
        f.client
            .get_consistency_proof(request)
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    let request = f.with(
        &f.user_token.clone(),
        GetInclusionProofRequest {
            leaf_index: 0,
            tree_size: 0,
        },
    );
    assert_eq!(
        f.client
            .get_inclusion_proof(request)
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );

    let request = f.with(
        &f.user_token.clone(),
        RevokeCardRequest {
            revocation: Some(tessera_proto::card::v1::Revocation {
                content_snapshot: vec![9; 9],
                signature: vec![0; 64],
            }),
        },
    );
    assert_eq!(
        f.client.revoke_card(request).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let request = f.with("Bearer 00ff", GetCheckpointRequest {});
    assert_eq!(
        f.client.get_checkpoint(request).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Still healthy and serving after all that.
    let info = f
        .client
        .get_service_info(GetServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.service_public_key, f.kms_key.as_bytes().to_vec());
    let (_, card) = f.card("alice", "laptop");
    f.register(card).await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let f = Fixture::start().await;
    let channel = Channel::from_shared(f.running.as_ref().unwrap().url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tessera.kms.v1.KeyDirectory".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Reflection lists the key directory, health and reflection itself, and
    // describes the key directory's file.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| {
        futures_util::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };
    let mut answers = reflection
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list the services");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "tessera.kms.v1.KeyDirectory",
        ]
    );
    let mut answers = reflection
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "tessera.kms.v1.KeyDirectory".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not describe tessera.kms.v1.KeyDirectory");
    };
    let described = files.file_descriptor_proto.iter().any(|bytes| {
        let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
        file.service.iter().any(|s| {
            s.name() == "KeyDirectory" && s.method.iter().any(|m| m.name() == "RegisterCard")
        })
    });
    assert!(described, "no descriptor of KeyDirectory.RegisterCard");
}

/// Many registrations at once, some of them the same card: every card is
/// logged exactly once, every answer's record is proven in its checkpoint,
/// and every checkpoint handed out is a prefix of the final log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_are_each_logged_once() {
    const DISTINCT: usize = 16;
    const SAME: usize = 6;
    let mut f = Fixture::start().await;
    let before = f.checkpoint().await.tree_size;
    let mut cards: Vec<Card> = (0..DISTINCT)
        .map(|i| f.card(&format!("user{}", i % 3), &format!("device {i}")).1)
        .collect();
    let shared = f.card("shared", "one card, registered six times at once").1;
    cards.extend(std::iter::repeat_n(shared.clone(), SAME));
    let calls = cards.into_iter().map(|card| {
        let mut client = f.client.clone();
        let request = f.with(&f.service_token, RegisterCardRequest { card: Some(card) });
        tokio::spawn(async move { client.register_card(request).await })
    });
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        let r = call.await.unwrap().unwrap().into_inner();
        answers.push((r.record.unwrap(), r.checkpoint.unwrap()));
    }
    let latest = f.checkpoint().await;
    assert_eq!(
        latest.tree_size,
        before + DISTINCT as u64 + 1,
        "each distinct card logged once"
    );
    let shared_id = CardId::of_snapshot(&shared.content_snapshot);
    let mut shared_entries = std::collections::HashSet::new();
    for (record, checkpoint) in &answers {
        let identity = transparency::registered_card(&record.registration_entry)
            .map(|c| {
                tessera_card::ParsedCard::parse(c)
                    .unwrap()
                    .identity()
                    .to_owned()
            })
            .unwrap();
        let id = f.check_record(record, checkpoint, &identity);
        if id == shared_id {
            shared_entries.insert(record.registration_entry.clone());
        }
        // Each checkpoint handed out is a prefix of the final log.
        let old = transparency::verify_checkpoint(checkpoint, &f.kms_key).unwrap();
        let request = f.with(
            &f.user_token.clone(),
            GetConsistencyProofRequest {
                old_size: old.tree_size,
                new_size: latest.tree_size,
            },
        );
        let proof = f
            .client
            .get_consistency_proof(request)
            .await
            .unwrap()
            .into_inner()
            .proof
            .unwrap();
        transparency::verify_consistency(&old, &latest, &proof).unwrap();
    }
    assert_eq!(
        shared_entries.len(),
        1,
        "the card registered six times at once has one registration entry"
    );
    // The log itself holds each card once.
    let request = f.with(
        &f.user_token.clone(),
        ListLogEntriesRequest {
            from_index: before,
            limit: 100,
        },
    );
    let entries = f
        .client
        .list_log_entries(request)
        .await
        .unwrap()
        .into_inner()
        .entries;
    let mut ids: Vec<CardId> = entries
        .iter()
        .map(|e| {
            let card = transparency::registered_card(e).unwrap();
            CardId::of_snapshot(&card.content_snapshot)
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), DISTINCT + 1);
    assert_eq!(entries.len(), DISTINCT + 1);
}

/// Signs `action` on `subject` against `state` with `signer`'s key.
fn statement(
    state: &DeviceListState,
    action: Action,
    subject: CardId,
    signer: (CardId, &DeviceKeys),
    app: Option<&SigningKey>,
) -> tessera_proto::card::v1::SignedDeviceStatement {
    let mut signed = NewStatement {
        identity: state.identity(),
        seqno: state.length(),
        previous_hash: state.head(),
        action,
        subject,
        signer: signer.0,
        created_at: tessera_service::now_secs(),
    }
    .sign(&signer.1.signing);
    if let Some(app) = app {
        device_list::app_cosign(&mut signed, app);
    }
    signed
}

#[tokio::test]
async fn device_lists_are_checked_logged_served_and_survive_restart() {
    let mut f = Fixture::start().await;
    let (phone_keys, phone) = f.card("alice", "phone");
    let (laptop_keys, laptop) = f.card("alice", "laptop");
    let (_, rogue) = f.card("alice", "made by the server");
    let mut ids = Vec::new();
    let mut cards = Vec::new();
    for card in [phone, laptop, rogue] {
        let (record, cp) = f.register(card).await.unwrap();
        ids.push(f.check_record(&record, &cp, "alice"));
        cards.push(
            f.verifier()
                .verify(
                    &transparency::registered_card(&record.registration_entry).unwrap(),
                    Some("alice"),
                    CardKind::Client,
                )
                .unwrap(),
        );
    }
    let (phone_id, laptop_id, rogue_id) = (ids[0], ids[1], ids[2]);
    let phone_card = cards[0].clone();
    let alice = f.user_token.clone();
    let service = f.service_token.clone();
    let publish =
        |f: &mut Fixture, token: &str, s: tessera_proto::card::v1::SignedDeviceStatement| {
            let request = f.with(token, PublishDeviceStatementRequest { statement: Some(s) });
            let mut client = f.client.clone();
            async move { client.publish_device_statement(request).await }
        };

    // A genesis without the AppKey's co-signature is refused; with it, logged.
    let mut truth = DeviceListState::empty("alice");
    let bare = statement(
        &truth,
        Action::Genesis,
        phone_id,
        (phone_id, &phone_keys),
        None,
    );
    let err = publish(&mut f, &alice, bare).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let genesis = statement(
        &truth,
        Action::Genesis,
        phone_id,
        (phone_id, &phone_keys),
        Some(&f.app),
    );
    let logged = publish(&mut f, &service, genesis.clone())
        .await
        .unwrap()
        .into_inner();
    let cp = transparency::verify_checkpoint(&logged.checkpoint.unwrap(), &f.kms_key).unwrap();
    let one = device_list::check_logged(&logged.statement.unwrap(), "alice", &cp).unwrap();
    truth
        .apply(&one.statement, &phone_card, &f.app.verifying_key())
        .unwrap();
    // Publishing the same statement again returns it as logged.
    let again = publish(&mut f, &service, genesis)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.statement.unwrap().inclusion.unwrap().leaf_index,
        one.leaf_index
    );

    // Another user cannot write alice's list.
    let bob = bearer_header(
        &f.issuer
            .issue(&Grant::user("bob", AuthMethod::Device), Audience::Kms)
            .unwrap()
            .bytes,
    );
    let add_laptop = statement(
        &truth,
        Action::Add,
        laptop_id,
        (phone_id, &phone_keys),
        None,
    );
    let err = publish(&mut f, &bob, add_laptop.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A device nobody approved cannot add itself or another.
    let forged = statement(
        &truth,
        Action::Add,
        rogue_id,
        (laptop_id, &laptop_keys),
        None,
    );
    let err = publish(&mut f, &alice, forged).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not a trusted device"), "{err:?}");
    // The phone approves the laptop.
    publish(&mut f, &alice, add_laptop.clone()).await.unwrap();
    let mut stale_base = truth.clone();
    let laptop_added = ParsedStatement::parse(add_laptop).unwrap();
    truth
        .apply(&laptop_added, &phone_card, &f.app.verifying_key())
        .unwrap();
    // A statement signed against the old head is ABORTED: refetch and sign again.
    let stale = statement(
        &stale_base,
        Action::Remove,
        phone_id,
        (phone_id, &phone_keys),
        None,
    );
    let err = publish(&mut f, &alice, stale).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    stale_base = truth.clone();

    // Served from any seqno, with proofs, in search and alone; the same after a restart.
    f.restart().await;
    let request = f.with(
        &alice,
        GetDeviceListRequest {
            identity: "alice".into(),
            from_seqno: 1,
        },
    );
    let list = f
        .client
        .get_device_list(request)
        .await
        .unwrap()
        .into_inner();
    let cp = transparency::verify_checkpoint(&list.checkpoint.unwrap(), &f.kms_key).unwrap();
    let list = list.device_list.unwrap();
    assert_eq!(list.length, 2);
    assert_eq!(list.statements.len(), 1);
    let served = device_list::ServedList::check(&list, "alice", &cp).unwrap();
    assert_eq!(
        served.statements[0].statement.hash(),
        stale_base.head().unwrap()
    );

    let mut from = std::collections::HashMap::new();
    from.insert("alice".to_owned(), 0u64);
    let request = f.with(
        &alice,
        SearchCardsRequest {
            identities: vec!["alice".into(), "nobody".into()],
            kind: CardKind::Client.to_proto() as i32,
            device_list_from: from,
        },
    );
    let found = f.client.search_cards(request).await.unwrap().into_inner();
    let cp = transparency::verify_checkpoint(&found.checkpoint.unwrap(), &f.kms_key).unwrap();
    let list = found.results[0].device_list.clone().unwrap();
    let mut view = DeviceListState::empty("alice");
    let records: std::collections::BTreeMap<CardId, record::CheckedRecord> = found.results[0]
        .cards
        .iter()
        .map(|r| {
            let c = record::check_record(&f.verifier(), r, &cp, Some("alice"), CardKind::Client)
                .unwrap();
            (c.card.id(), c)
        })
        .collect();
    device_list::ServedList::check(&list, "alice", &cp)
        .unwrap()
        .extend(
            &mut view,
            &|id| records.get(id).cloned(),
            &f.app.verifying_key(),
        )
        .unwrap();
    assert_eq!(view, truth);
    assert!(view.is_trusted(&laptop_id) && !view.is_trusted(&rogue_id));
    assert_eq!(found.results[1].device_list.clone().unwrap().length, 0);
    // Asking for ORG cards only leaves the device lists out.
    let request = f.with(
        &alice,
        SearchCardsRequest {
            identities: vec!["alice".into()],
            kind: CardKind::Org.to_proto() as i32,
            device_list_from: Default::default(),
        },
    );
    let found = f.client.search_cards(request).await.unwrap().into_inner();
    assert!(found.results[0].device_list.is_none());
}

/// The tests above whose state outlives a call (registrations, revocations,
/// rotations, device lists, restarts, concurrent appends), again with the
/// directory in PostgreSQL.
mod on_postgres {
    macro_rules! again {
        ($($test:ident),* $(,)?) => {$(
            #[test]
            fn $test() {
                super::ON_POSTGRES.set(true);
                super::$test();
            }
        )*};
    }

    again!(
        register_search_get_revoke_with_several_devices,
        proofs_verify_for_every_size_and_history_survives_restart,
        rotation_supersedes_the_previous_card,
        limits_and_bad_input_get_clear_statuses,
        concurrent_registrations_are_each_logged_once,
        device_lists_are_checked_logged_served_and_survive_restart,
    );
}

/// A read-only replica on the writer's PostgreSQL database: it serves what
/// the writer published (with proofs under the writer's checkpoint), holds
/// no private key, refuses writes, and catches up with later appends.
#[tokio::test]
async fn a_read_only_replica_serves_what_the_writer_published_and_refuses_writes() {
    ON_POSTGRES.set(true);
    let mut f = Fixture::start().await;
    let (_, alice) = f.card("alice", "laptop");
    let (record, _) = f.register(alice).await.unwrap();

    let replica_dir = tempfile::tempdir().unwrap();
    let database = tessera_kms::store::PgOptions {
        url: f.pg.as_ref().unwrap().url("postgres"),
        pool_size: 2,
    };
    let replica = Kms::open_read_only(
        &config(replica_dir.path(), &f.app, &f.issuer),
        &database,
        f.kms_key,
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert!(replica.directory().is_read_only());
    assert!(
        !replica_dir.path().join("kms.key").exists(),
        "a replica neither needs nor makes a private key"
    );
    let listener = tessera_service::serve::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let running = Running::spawn(
        replica.routes().await.unwrap(),
        listener,
        ServeOptions::default(),
    )
    .unwrap();
    let mut replica_client = KeyDirectoryClient::new(
        Channel::from_shared(running.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );

    // Through the replica: alice's card, proven under the writer's checkpoint.
    std::mem::swap(&mut f.client, &mut replica_client);
    let found = f.search(&["alice"]).await.unwrap();
    let cp = found.checkpoint.unwrap();
    assert_eq!(
        f.check_record(&found.results[0].cards[0], &cp, "alice"),
        f.check_record(&record, &cp, "alice")
    );
    let (_, bob) = f.card("bob", "phone");
    let refused = f.register(bob.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("read-only replica"),
        "{refused:?}"
    );

    // The writer appends; the replica catches up.
    std::mem::swap(&mut f.client, &mut replica_client);
    f.register(bob).await.unwrap();
    std::mem::swap(&mut f.client, &mut replica_client);
    let mut seen = None;
    for _ in 0..100 {
        let found = f.search(&["bob"]).await.unwrap();
        if !found.results[0].cards.is_empty() {
            seen = Some(found);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found = seen.expect("the replica never caught up with the writer");
    let cp = found.checkpoint.unwrap();
    assert_eq!(
        transparency::verify_checkpoint(&cp, &f.kms_key)
            .unwrap()
            .tree_size,
        2
    );
    f.check_record(&found.results[0].cards[0], &cp, "bob");
    running.stop().await.unwrap();
}
