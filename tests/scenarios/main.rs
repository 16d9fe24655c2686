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
mod hostile_backup;
mod mitm;
mod org;
mod outages;
mod registration;
mod relay;
mod rotation;
mod tls;
mod transparency;

use std::time::Duration;

use tessera_card::transparency::{VerifiedCheckpoint, verify_checkpoint};
use tessera_client::{Client, Content, Endpoints, HistoryVisibility, Received};
use tessera_crypto::{SigningKey, keystore};
use tessera_proto::server::v1::{LoginRequest, accounts_client::AccountsClient};
use tessera_proto::{
    card::v1::Card,
    kms::v1::{GetCheckpointRequest, key_directory_client::KeyDirectoryClient},
};
use tessera_service::{
    TokenIssuer,
    token::{Role, bearer_header},
};
use tessera_stack::hostile::Proxy;
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

/// Alice, and bob in the organisation (his session opened after he joined,
/// so it carries the membership).
pub(crate) async fn alice_and_org_member_bob(cluster: &Cluster) -> (Client, Client) {
    let admin = cluster.admin().await;
    let alice = cluster.device("alice", "alice", true).await;
    cluster.device("bob", "bob", true).await;
    admin.set_org_member("bob", true).await.unwrap();
    (alice, cluster.reopen("bob"))
}

/// A shared-history channel `name` of `creator` with `members`; its id.
pub(crate) async fn channel(creator: &Client, name: &str, members: &[&str]) -> String {
    let members: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
    creator
        .create_channel(name, HistoryVisibility::Shared, &members)
        .await
        .unwrap()
        .channel_id
}

/// Signs up `identity` on device `profile`, reaching the app server only
/// through `relay`.
pub(crate) async fn behind_relay(
    cluster: &Cluster,
    relay: &Proxy,
    profile: &str,
    identity: &str,
) -> Client {
    let endpoints = Endpoints {
        server_url: relay.url(),
        ..cluster.endpoints()
    };
    cluster
        .device_with(profile, identity, true, endpoints)
        .await
}

/// Signs up `identity` on device `profile`, reaching the key service only
/// through `directory`.
pub(crate) async fn behind_directory(
    cluster: &Cluster,
    directory: &Proxy,
    profile: &str,
    identity: &str,
) -> Client {
    let endpoints = Endpoints {
        kms_url: directory.url(),
        ..cluster.endpoints()
    };
    cluster
        .device_with(profile, identity, true, endpoints)
        .await
}

/// The key service's latest checkpoint, verified against its key.
pub(crate) async fn kms_checkpoint(cluster: &Cluster) -> VerifiedCheckpoint {
    let mut request = tonic::Request::new(GetCheckpointRequest {});
    request
        .metadata_mut()
        .insert("authorization", service_token(cluster).parse().unwrap());
    let signed = KeyDirectoryClient::new(connect(&cluster.kms.url()).await)
        .get_checkpoint(request)
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    verify_checkpoint(&signed, &cluster.keys.kms).unwrap()
}

/// A new client card for `identity`, self-signed by fresh keys.
pub(crate) fn new_card(identity: &str, device_name: &str) -> Card {
    tessera_card::NewCard {
        identity,
        kind: tessera_card::CardKind::Client,
        device_name,
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&tessera_crypto::DeviceKeys::generate().unwrap())
    .unwrap()
}
