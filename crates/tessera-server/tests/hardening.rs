//! The app server's defences against its own users, over real gRPC on
//! 127.0.0.1:0 (clients bind other loopback addresses, 127.0.0.2 and up, to
//! be other peers): log-in attempts are reserved before hashing, hashing is
//! capped, sign-ups are throttled per peer, device log-in challenges are
//! capped per identity and per peer.
//!
//! None of these calls reaches the key service, so none runs: devices are
//! put in the server's store directly.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures_util::future::join_all;
use tessera_proto::server::v1::{
    BeginDeviceLoginRequest, LoginRequest, SignUpRequest, accounts_client::AccountsClient,
};
use tessera_server::{
    Config, HashLimits, PasswordParams, Server, ThrottleLimits,
    store::{Device, DeviceStatus, MemoryStore, Store as _},
};
use tessera_service::{
    limits::retry_after,
    serve::{Running, ServeOptions, bind},
};
use tonic::{Code, Status, transport::Endpoint};

struct App {
    _dir: tempfile::TempDir,
    _server: Arc<Server>,
    store: MemoryStore,
    running: Running,
}

impl App {
    async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (app_key, token_key) = tessera_server::load_or_create_keys(
            &dir.path().join("app.key"),
            &dir.path().join("token.key"),
        )
        .unwrap();
        // No key service: the calls under test never reach it.
        let mut config = Config::new(dir.path(), "http://127.0.0.1:9");
        config.password_params = PasswordParams::DANGER_FAST_FOR_TESTS;
        config.throttle.signups_per_peer = 1000;
        tune(&mut config);
        let store = MemoryStore::default();
        let server = Arc::new(
            Server::with_store(Arc::new(store.clone()), app_key, token_key, config).unwrap(),
        );
        let running = Running::spawn(
            server.routes().await.unwrap(),
            bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
            ServeOptions::default(),
        )
        .unwrap();
        Self {
            _dir: dir,
            _server: server,
            store,
            running,
        }
    }

    /// A client connecting from loopback address 127.0.0.`host`.
    async fn from(&self, host: u8) -> AccountsClient<tonic::transport::Channel> {
        let local: IpAddr = format!("127.0.0.{host}").parse().unwrap();
        let channel = Endpoint::from_shared(self.running.url())
            .unwrap()
            .local_address(Some(local))
            .connect()
            .await
            .unwrap();
        AccountsClient::new(channel)
    }

    /// An active device of `identity`, straight into the store.
    fn device(&self, identity: &str, n: u8) -> Vec<u8> {
        let card_id = [n; 32].to_vec();
        self.store
            .put_devices(&[Device {
                card_id: card_id.clone(),
                identity: identity.to_owned(),
                device_name: "phone".into(),
                created_at: 1,
                status: DeviceStatus::Active as i32,
                org_card: false,
            }])
            .unwrap();
        card_id
    }
}

/// Argon2id slow enough (tens of milliseconds) that parallel calls overlap.
const SLOW: PasswordParams = PasswordParams {
    m_cost_kib: 16 * 1024,
    t_cost: 3,
    p_cost: 1,
};

fn exhausted_with_retry(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted && retry_after(status).is_some()
}

#[tokio::test]
async fn parallel_wrong_passwords_each_reserve_an_attempt_before_hashing() {
    let app = App::start(|c| {
        c.password_params = SLOW;
        c.throttle = ThrottleLimits {
            per_identity: 3,
            per_peer: 1000,
            signups_per_peer: 1000,
            window: Duration::from_secs(300),
        };
        c.hash_limits = HashLimits {
            concurrent: 2,
            queued: 100,
        };
    })
    .await;
    let client = app.from(1).await;
    client
        .clone()
        .sign_up(SignUpRequest {
            identity: "alice".into(),
            password: "alice-password".into(),
        })
        .await
        .unwrap();
    let attempts = (0..20).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .login(LoginRequest {
                    identity: "alice".into(),
                    password: format!("guess-{i:04}"),
                })
                .await
                .unwrap_err()
        }
    });
    let errors = join_all(attempts).await;
    let wrong = errors
        .iter()
        .filter(|s| s.code() == Code::Unauthenticated)
        .count();
    let throttled = errors.iter().filter(|s| exhausted_with_retry(s)).count();
    assert_eq!(
        (wrong, throttled),
        (3, 17),
        "exactly the allowed 3 guesses were hashed: {errors:?}"
    );
    // Locked for the window, even with the right password.
    let err = client
        .clone()
        .login(LoginRequest {
            identity: "alice".into(),
            password: "alice-password".into(),
        })
        .await
        .unwrap_err();
    assert!(exhausted_with_retry(&err), "{err:?}");
    // Another identity is not affected.
    client
        .clone()
        .sign_up(SignUpRequest {
            identity: "root".into(),
            password: "root-password".into(),
        })
        .await
        .unwrap();
    client
        .clone()
        .login(LoginRequest {
            identity: "root".into(),
            password: "root-password".into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn password_hashes_past_the_cap_are_turned_away_with_retry_info() {
    let app = App::start(|c| {
        c.password_params = PasswordParams {
            m_cost_kib: 32 * 1024,
            ..SLOW
        };
        c.hash_limits = HashLimits {
            concurrent: 1,
            queued: 0,
        };
    })
    .await;
    let client = app.from(1).await;
    // Unknown identities: each still costs a full (dummy) hash.
    let attempts = (0..8).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .login(LoginRequest {
                    identity: format!("nobody{i}"),
                    password: "some-password".into(),
                })
                .await
                .unwrap_err()
        }
    });
    let errors = join_all(attempts).await;
    let hashed = errors
        .iter()
        .filter(|s| s.code() == Code::Unauthenticated)
        .count();
    let turned_away = errors.iter().filter(|s| exhausted_with_retry(s)).count();
    assert_eq!(hashed + turned_away, 8, "{errors:?}");
    assert!(hashed >= 1, "{errors:?}");
    assert!(
        turned_away >= 1,
        "one hash at a time, none queued: {errors:?}"
    );
}

#[tokio::test]
async fn sign_ups_are_throttled_per_peer() {
    let app = App::start(|c| c.throttle.signups_per_peer = 3).await;
    let mut here = app.from(1).await;
    let mut outcomes = Vec::new();
    for i in 0..5 {
        outcomes.push(
            here.sign_up(SignUpRequest {
                identity: format!("user{i}"),
                password: "long-enough".into(),
            })
            .await,
        );
    }
    assert!(outcomes[..3].iter().all(Result::is_ok), "{outcomes:?}");
    for o in &outcomes[3..] {
        assert!(exhausted_with_retry(o.as_ref().unwrap_err()), "{o:?}");
    }
    // Another peer still signs up.
    app.from(2)
        .await
        .sign_up(SignUpRequest {
            identity: "elsewhere".into(),
            password: "long-enough".into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn device_log_in_challenges_are_capped_per_identity_and_per_peer() {
    let app = App::start(|_| {}).await;
    let alice_card = app.device("alice", 1);
    let begin = |identity: &str, card_id: &[u8]| BeginDeviceLoginRequest {
        identity: identity.to_owned(),
        card_id: card_id.to_vec(),
    };

    // One peer hammers alice's device: 16 outstanding, then refused.
    let mut peer1 = app.from(1).await;
    let mut ok = 0;
    for _ in 0..100 {
        match peer1.begin_device_login(begin("alice", &alice_card)).await {
            Ok(_) => ok += 1,
            Err(s) => assert!(exhausted_with_retry(&s), "{s:?}"),
        }
    }
    assert_eq!(ok, 16, "per identity");
    // From elsewhere too: the cap is alice's, whoever asks.
    let mut peer2 = app.from(2).await;
    let err = peer2
        .begin_device_login(begin("alice", &alice_card))
        .await
        .unwrap_err();
    assert!(exhausted_with_retry(&err));

    // The first peer asks for many other users: 64 outstanding in all, then refused.
    let mut more = 0;
    for n in 10..100u8 {
        let identity = format!("user{n}");
        let card = app.device(&identity, n);
        match peer1.begin_device_login(begin(&identity, &card)).await {
            Ok(_) => more += 1,
            Err(s) => assert!(exhausted_with_retry(&s), "{s:?}"),
        }
    }
    assert_eq!(ok + more, 64, "per peer");
    // Everyone else still logs in: the shared table is far from full.
    let bob_card = app.device("bob", 200);
    peer2
        .begin_device_login(begin("bob", &bob_card))
        .await
        .unwrap();
}
