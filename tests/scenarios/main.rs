//! End-to-end scenarios on the real service processes (see `docs/testing.md`).
//! Each `#[tokio::test]` starts its own cluster through the testkit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod authorization;
mod bad_input;
mod durability;
mod exchange;
mod metrics;
mod mitm;
mod org;
mod registration;
mod relay;
mod tls;

use std::time::Duration;

use tessera_client::{Content, Received};
use tessera_crypto::{SigningKey, keystore};
use tessera_proto::server::v1::{LoginRequest, accounts_client::AccountsClient};
use tessera_service::{
    TokenIssuer,
    token::{Role, bearer_header},
};
use tessera_testkit::Cluster;
use tonic::transport::Channel;

pub(crate) fn text(r: &Received) -> &str {
    match &r.content {
        Content::Text(t) => t,
        other => panic!("expected text, got {other:?}"),
    }
}

pub(crate) async fn connect(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The AppKey, read from the app server's data directory: what an attacker
/// who compromised the app server holds.
pub(crate) fn app_key(cluster: &Cluster) -> SigningKey {
    keystore::load(&cluster.data_dir("server").join("app.key"), None)
        .unwrap()
        .into_signing()
        .unwrap()
}

/// A SERVICE token as the app server mints for itself.
pub(crate) fn service_token(cluster: &Cluster) -> String {
    let key = keystore::load(&cluster.data_dir("server").join("token.key"), None)
        .unwrap()
        .into_signing()
        .unwrap();
    let issuer = TokenIssuer::new(key, Duration::from_secs(600));
    bearer_header(
        &issuer
            .issue("tessera-server", Role::Service, None, false)
            .unwrap()
            .bytes,
    )
}

/// A user's token from a password log-in.
pub(crate) async fn user_token(cluster: &Cluster, identity: &str) -> String {
    let login = AccountsClient::new(connect(&cluster.server.url()).await)
        .login(LoginRequest {
            identity: identity.into(),
            password: format!("{identity}-testkit-password"),
        })
        .await
        .unwrap()
        .into_inner();
    bearer_header(&login.access_token)
}
