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
mod channels;
mod device_lists;
mod durability;
mod exchange;
mod hostile_backup;
mod memory;
mod metrics;
mod mitm;
mod org;
mod outages;
mod postgres;
mod reflection;
mod registration;
mod relay;
mod replicas;
mod rotation;
mod sender_keys;
mod tls;
mod transparency;

use std::time::Duration;

use tessera_card::transparency::{VerifiedCheckpoint, verify_checkpoint};
use tessera_client::{Client, Content, Endpoints, Received, Visibility};
use tessera_crypto::{SigningKey, keystore};
use tessera_proto::server::v1::{IssueTokenRequest, LoginRequest, accounts_client::AccountsClient};
use tessera_proto::{
    card::v1::Card,
    kms::v1::{GetCheckpointRequest, key_directory_client::KeyDirectoryClient},
};
use tessera_service::{
    TokenIssuer,
    token::{Audience, Grant, bearer_header},
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

/// Runs the `tessera` CLI as `profile` of the cluster's home, off the async
/// runtime (so in-process proxies keep answering it).
pub(crate) async fn cli(cluster: &Cluster, profile: &str, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(tessera_testkit::bin_path("tessera"));
    command
        .args(args)
        .env("TESSERA_HOME", cluster.home.root())
        .env("TESSERA_PROFILE", profile)
        .env(
            "TESSERA_PASSPHRASE",
            std::str::from_utf8(tessera_testkit::PASSPHRASE).unwrap_or_default(),
        )
        .env(
            "TESSERA_PASSWORD",
            format!(
                "{}-testkit-password",
                profile.split('-').next().unwrap_or(profile)
            ),
        )
        .env("TESSERA_DANGER_FAST_KDF", "1")
        .env("TESSERA_SERVER_URL", cluster.server.url())
        .env("TESSERA_KMS_URL", cluster.kms.url())
        .env("TESSERA_BACKUP_URL", cluster.backup.url())
        .env_remove("TESSERA_JSON")
        .stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
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
            .issue(&Grant::service("tessera-server"), Audience::Kms)
            .unwrap()
            .bytes,
    )
}

/// A user's tokens from a password log-in: the app server's, and the key
/// and backup services' traded for it.
pub(crate) struct UserTokens {
    pub(crate) server: String,
    pub(crate) kms: String,
    pub(crate) backup: String,
}

impl UserTokens {
    /// The token of `service` ("kms", "server" or "backup").
    pub(crate) fn of(&self, service: &str) -> &str {
        match service {
            "kms" => &self.kms,
            "server" => &self.server,
            _ => &self.backup,
        }
    }
}

pub(crate) async fn user_tokens(cluster: &Cluster, identity: &str) -> UserTokens {
    let mut accounts = AccountsClient::new(connect(&cluster.server.url()).await);
    let login = accounts
        .login(LoginRequest {
            identity: identity.into(),
            password: format!("{identity}-testkit-password"),
        })
        .await
        .unwrap()
        .into_inner();
    let server = bearer_header(&login.access_token);
    let mut traded = Vec::new();
    for audience in ["kms", "backup"] {
        let mut request = tonic::Request::new(IssueTokenRequest {
            audience: audience.into(),
        });
        request
            .metadata_mut()
            .insert("authorization", server.parse().unwrap());
        let token = accounts.issue_token(request).await.unwrap().into_inner();
        traded.push(bearer_header(&token.access_token));
    }
    let backup = traded.pop().unwrap();
    let kms = traded.pop().unwrap();
    UserTokens {
        server,
        kms,
        backup,
    }
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
        .create_channel(name, Visibility::Shared, &members)
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
