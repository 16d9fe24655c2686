//! The app server's defences against its own users, over real gRPC on
//! 127.0.0.1:0 (clients bind other loopback addresses, 127.0.0.2 and up, to
//! be other peers): log-in attempts are reserved before hashing, hashing is
//! capped, sign-ups are throttled per peer.
//!
//! None of these calls reaches the key service, so none runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures_util::future::join_all;
use tessera_proto::server::v1::{LoginRequest, SignUpRequest, accounts_client::AccountsClient};
use tessera_server::{
    Config, HashLimits, PasswordParams, Server, ThrottleLimits, store::MemoryStore,
};
use tessera_service::{
    limits::retry_after,
    serve::{Running, ServeOptions, bind},
};
use tonic::{Code, Status, transport::Endpoint};

struct App {
    _dir: tempfile::TempDir,
    _server: Arc<Server>,
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
        let server = Arc::new(
            Server::with_store(Arc::new(MemoryStore::default()), app_key, token_key, config)
                .unwrap(),
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
