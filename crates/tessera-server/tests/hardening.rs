//! The app server's defences against its own users, over real gRPC on
//! 127.0.0.1:0 (clients bind other loopback addresses, 127.0.0.2 and up, to
//! be other peers): log-in attempts are reserved before hashing, hashing is
//! capped, sign-ups are throttled per peer, device log-in challenges are
//! capped per identity and per peer, admin rights come only from the
//! operator, a removed member stops receiving, attachments honour history
//! visibility.
//!
//! None of these calls reaches the key service, so none runs: devices are
//! put in the server's store directly, envelopes are well-formed headers
//! around opaque bytes (the server never opens them).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use futures_util::future::join_all;
use tessera_card::{
    CardId, CardKind, NewCard,
    channel::{Change, NewChannelStatement, Role, Visibility, statement_hash},
    device_list::{Action, NewStatement},
    transparency::Hash,
};
use tessera_crypto::{DeviceKeys, EncryptionSecret, SigningKey};
use tessera_proto::{
    Message as _,
    channel::v1::SignedChannelStatement,
    envelope::v1::{Envelope, EnvelopeHeader, Stanza},
    server::v1::{
        BeginDeviceLoginRequest, ChannelEvent, CreateChannelRequest, Direction,
        DownloadAttachmentRequest, EnrollDeviceRequest, EnvelopeKind, HistoryVisibility,
        ListChannelsRequest, ListMessagesRequest, LoginRequest, PublishChannelStatementRequest,
        SendMessageRequest, SignUpRequest, SubscribeRequest, UploadAttachmentRequest,
        WhoAmIRequest, accounts_client::AccountsClient, channel_event,
        channels_client::ChannelsClient, devices_client::DevicesClient,
    },
};
use tessera_server::{
    Config, HashLimits, PasswordParams, Server, ThrottleLimits,
    store::{Device, DeviceStatus, MemoryStore, Store as _},
};
use tessera_service::{
    limits::retry_after,
    serve::{Running, ServeOptions, bind},
    token::bearer_header,
};
use tonic::{Code, Request, Status, transport::Endpoint};

struct App {
    _dir: tempfile::TempDir,
    server: Arc<Server>,
    store: MemoryStore,
    running: Running,
    /// The key service beside it (asked whether statement signers are
    /// approved; these tests' devices have no device lists there).
    _kms: Running,
}

impl App {
    async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (app_key, token_key) = tessera_server::load_or_create_keys(
            &dir.path().join("app.key"),
            &dir.path().join("token.key"),
        )
        .unwrap();
        let kms = Running::spawn(
            tessera_kms::Kms::open(&tessera_kms::Config {
                data_dir: dir.path().join("kms"),
                key_path: None,
                app_public_key: app_key.verifying_key(),
                token_public_key: token_key.verifying_key(),
                limits: tessera_kms::Limits::default(),
                max_request_bytes: tessera_kms::DEFAULT_MAX_REQUEST_BYTES,
            })
            .await
            .unwrap()
            .routes()
            .await
            .unwrap(),
            bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
            ServeOptions::default(),
        )
        .unwrap();
        let mut config = Config::new(dir.path(), kms.url());
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
            server,
            store,
            running,
            _kms: kms,
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

    /// An active device of `identity`, straight into the store; its
    /// signing key is [`device_key`]`(n)`.
    async fn device(&self, identity: &str, n: u8) -> Vec<u8> {
        let card_id = [n; 32].to_vec();
        let signing_public_key = device_key(n).verifying_key().as_bytes().to_vec();
        self.store
            .put_devices(&[Device {
                card_id: card_id.clone(),
                identity: identity.to_owned(),
                device_name: "phone".into(),
                created_at: 1,
                status: DeviceStatus::Active as i32,
                org_card: false,
                signing_public_key,
            }])
            .await
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
    app.server
        .create_admin("root", "root-password")
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
    let alice_card = app.device("alice", 1).await;
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
        let card = app.device(&identity, n).await;
        match peer1.begin_device_login(begin(&identity, &card)).await {
            Ok(_) => more += 1,
            Err(s) => assert!(exhausted_with_retry(&s), "{s:?}"),
        }
    }
    assert_eq!(ok + more, 64, "per peer");
    // Everyone else still logs in: the shared table is far from full.
    let bob_card = app.device("bob", 200).await;
    peer2
        .begin_device_login(begin("bob", &bob_card))
        .await
        .unwrap();
}

#[tokio::test]
async fn admin_rights_come_only_from_the_operator_never_from_a_sign_up() {
    let app = App::start(|_| {}).await;
    let mut client = app.from(1).await;
    // Whoever signs up first under the operator's admin name is no admin.
    let signed_up = client
        .sign_up(SignUpRequest {
            identity: "admin".into(),
            password: "first-come".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!signed_up.admin);
    let mut who = Request::new(WhoAmIRequest {});
    who.metadata_mut().insert(
        "authorization",
        bearer_header(&signed_up.access_token).parse().unwrap(),
    );
    assert!(!client.who_am_i(who).await.unwrap().into_inner().admin);
    // The operator cannot make that account an admin either (it has
    // another password than the operator's) ...
    assert!(
        app.server
            .create_admin("admin", "operator-pw")
            .await
            .is_err()
    );
    // ... though an account whose password the operator gives can be ...
    client
        .sign_up(SignUpRequest {
            identity: "carol".into(),
            password: "carols-password".into(),
        })
        .await
        .unwrap();
    assert!(
        app.server
            .create_admin("carol", "carols-password")
            .await
            .unwrap()
    );
    // ... but makes its own admin account, which logs in as one (once).
    assert!(app.server.create_admin("ops", "operator-pw").await.unwrap());
    assert!(!app.server.create_admin("ops", "other-pw").await.unwrap());
    let login = client
        .login(LoginRequest {
            identity: "ops".into(),
            password: "operator-pw".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(login.admin);
    let err = client
        .sign_up(SignUpRequest {
            identity: "ops".into(),
            password: "long-enough".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

/// A signed-up user with a device in the store and a password token.
struct User {
    identity: String,
    card_id: Vec<u8>,
    /// Seed of the device's signing key ([`device_key`]).
    n: u8,
    token: String,
}

fn device_key(n: u8) -> SigningKey {
    SigningKey::from_seed(&[n; 32]).unwrap()
}

/// Each channel's chain length and head, as the statements accepted so far
/// left them (channel ids are random, so tests running at once share it).
/// A chain's length and head.
type Tip = (u64, Option<Hash>);
static TIPS: Mutex<Option<HashMap<String, Tip>>> = Mutex::new(None);

fn tip(channel_id: &str) -> Tip {
    TIPS.lock()
        .unwrap()
        .get_or_insert_default()
        .get(channel_id)
        .copied()
        .unwrap_or((0, None))
}

fn accepted(channel_id: &str, signed: &SignedChannelStatement) {
    let (length, _) = tip(channel_id);
    TIPS.lock().unwrap().get_or_insert_default().insert(
        channel_id.to_owned(),
        (length + 1, Some(statement_hash(&signed.statement))),
    );
}

/// The current epoch of a channel these tests made.
fn epoch(channel_id: &str) -> u64 {
    tip(channel_id).0.saturating_sub(1)
}

/// Signs `change` at the channel's tip with `by`'s device key.
fn statement(by: &User, channel_id: &str, change: Change) -> SignedChannelStatement {
    let (epoch, previous_hash) = tip(channel_id);
    NewChannelStatement {
        channel_id,
        epoch,
        previous_hash,
        signer_identity: &by.identity,
        signer: CardId::from_bytes(&by.card_id).unwrap(),
        created_at: tessera_service::now_secs(),
        change,
    }
    .sign(&device_key(by.n))
}

async fn publish(
    channels: &mut ChannelsClient<tonic::transport::Channel>,
    by: &User,
    channel_id: &str,
    change: Change,
) -> Result<(), Status> {
    let signed = statement(by, channel_id, change);
    channels
        .publish_channel_statement(by.req(PublishChannelStatementRequest {
            channel_id: channel_id.to_owned(),
            statement: Some(signed.clone()),
        }))
        .await?;
    accepted(channel_id, &signed);
    Ok(())
}

impl User {
    fn req<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert("authorization", self.token.parse().unwrap());
        r
    }
}

impl App {
    async fn user(&self, identity: &str, n: u8) -> User {
        let login = self
            .from(1)
            .await
            .sign_up(SignUpRequest {
                identity: identity.into(),
                password: format!("{identity}-password"),
            })
            .await
            .unwrap()
            .into_inner();
        let token = bearer_header(&login.access_token);
        // A real device, enrolled with the GENESIS of the user's device list
        // (the app server refuses statements from devices no list trusts);
        // its keys are [`device_key`]`(n)`'s.
        let keys = DeviceKeys {
            signing: device_key(n),
            encryption: EncryptionSecret::from_bytes([n; 32]),
        };
        let card = NewCard {
            identity,
            kind: CardKind::Client,
            device_name: "phone",
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        let id = CardId::of_snapshot(&card.content_snapshot);
        let genesis = NewStatement {
            identity,
            seqno: 0,
            previous_hash: None,
            action: Action::Genesis,
            subject: id,
            signer: id,
            created_at: 0,
        }
        .sign(&keys.signing);
        let channel = Endpoint::from_shared(self.running.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut request = Request::new(EnrollDeviceRequest {
            card: Some(card),
            statement: Some(genesis),
        });
        request
            .metadata_mut()
            .insert("authorization", token.parse().unwrap());
        let enrolled = DevicesClient::new(channel)
            .enroll_device(request)
            .await
            .unwrap()
            .into_inner();
        assert!(enrolled.statement_logged);
        User {
            identity: identity.into(),
            card_id: id.to_vec(),
            n,
            token,
        }
    }

    async fn channels(&self) -> ChannelsClient<tonic::transport::Channel> {
        let channel = Endpoint::from_shared(self.running.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        ChannelsClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// A well-formed envelope from `card_id` around `size` opaque bytes.
fn envelope(card_id: &[u8], size: usize, tag: u8) -> Vec<u8> {
    Envelope {
        header: EnvelopeHeader {
            version: 1,
            sender_card_id: card_id.to_vec(),
            stanzas: vec![Stanza {
                card_id: vec![9; 32],
                encapsulated_key: vec![1; 32],
                wrapped_key: vec![2; 48],
            }],
        }
        .encode_to_vec(),
        ciphertext: vec![tag; size],
    }
    .encode_to_vec()
}

async fn send(
    channels: &mut ChannelsClient<tonic::transport::Channel>,
    from: &User,
    channel_id: &str,
    size: usize,
    n: u32,
) -> u64 {
    let mut client_message_id = vec![0u8; 16];
    client_message_id[..4].copy_from_slice(&n.to_be_bytes());
    channels
        .send_message(from.req(SendMessageRequest {
            channel_id: channel_id.to_owned(),
            client_message_id,
            sender_card_id: from.card_id.clone(),
            envelope: envelope(&from.card_id, size, n as u8),
            epoch: epoch(channel_id),
            kind: EnvelopeKind::Device as i32,
        }))
        .await
        .unwrap()
        .into_inner()
        .index
}

async fn create_channel(
    channels: &mut ChannelsClient<tonic::transport::Channel>,
    creator: &User,
    members: &[&User],
    visibility: HistoryVisibility,
) -> String {
    let channel_id = format!(
        "{:032x}",
        u128::from_be_bytes(tessera_crypto::random_array::<16>().unwrap())
    );
    let mut entries: Vec<(String, Role)> = std::iter::once((creator.identity.clone(), Role::Admin))
        .chain(members.iter().map(|m| (m.identity.clone(), Role::Member)))
        .collect();
    entries.sort();
    let creation = statement(
        creator,
        &channel_id,
        Change::Create {
            name: "room".into(),
            visibility: Visibility::from_proto(visibility as i32).unwrap(),
            members: entries,
        },
    );
    channels
        .create_channel(creator.req(CreateChannelRequest {
            creation: Some(creation.clone()),
        }))
        .await
        .unwrap();
    accepted(&channel_id, &creation);
    channel_id
}

#[tokio::test]
async fn a_removed_member_gets_nothing_sent_after_a_lagged_catch_up() {
    // A tiny live buffer, so a subscriber who does not read lags behind.
    let app = App::start(|c| c.limits.live_buffer_messages = 4).await;
    let alice = app.user("alice", 1).await;
    let bob = app.user("bob", 2).await;
    let mut channels = app.channels().await;
    let channel_id =
        create_channel(&mut channels, &alice, &[&bob], HistoryVisibility::Shared).await;
    let mut live = app
        .channels()
        .await
        .subscribe(bob.req(SubscribeRequest {
            channel_id: channel_id.clone(),
            from_index: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    // Bob does not read while far more than the buffers hold is sent.
    let mut last_before_removal = 0;
    for n in 0..100 {
        last_before_removal = send(&mut channels, &alice, &channel_id, 256 * 1024, n).await;
    }
    publish(
        &mut channels,
        &alice,
        &channel_id,
        Change::Remove {
            identity: "bob".into(),
        },
    )
    .await
    .unwrap();
    for n in 100..105 {
        send(&mut channels, &alice, &channel_id, 1024, n).await;
    }
    // Now bob reads everything his subscription hands him.
    let mut received = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(60), live.next()).await {
            Ok(Some(Ok(ChannelEvent {
                event: Some(channel_event::Event::Message(m)),
            }))) => received.push(m.index),
            Ok(Some(Ok(_))) => {} // the chain grew
            Ok(Some(Err(status))) => break Some(status),
            Ok(None) => break None,
            Err(_) => panic!("the subscription neither ended nor delivered: {received:?}"),
        }
    };
    assert!(
        received.iter().all(|i| *i <= last_before_removal),
        "bob received messages sent after his removal: {:?}",
        received
            .iter()
            .filter(|i| **i > last_before_removal)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        end.map(|s| s.code()),
        Some(Code::PermissionDenied),
        "the subscription ends telling bob he was removed"
    );
}

#[tokio::test]
async fn attachments_uploaded_before_a_member_could_see_are_refused() {
    let app = App::start(|_| {}).await;
    let alice = app.user("alice", 1).await;
    let bob = app.user("bob", 2).await;
    let carol = app.user("carol", 3).await;
    let mut channels = app.channels().await;
    let channel_id =
        create_channel(&mut channels, &alice, &[&bob], HistoryVisibility::Joined).await;
    let upload = |data: Vec<u8>| UploadAttachmentRequest {
        channel_id: channel_id.clone(),
        data,
    };
    let early = channels
        .upload_attachment(alice.req(tokio_stream::iter([upload(vec![1; 1000])])))
        .await
        .unwrap()
        .into_inner()
        .attachment_id;
    send(&mut channels, &alice, &channel_id, 100, 1).await;
    publish(
        &mut channels,
        &alice,
        &channel_id,
        Change::Add {
            identity: "carol".into(),
            role: Role::Member,
        },
    )
    .await
    .unwrap();
    let late = channels
        .upload_attachment(alice.req(tokio_stream::iter([upload(vec![2; 1000])])))
        .await
        .unwrap()
        .into_inner()
        .attachment_id;
    let download = |who: &User, id: &str| {
        who.req(DownloadAttachmentRequest {
            channel_id: channel_id.clone(),
            attachment_id: id.to_owned(),
        })
    };
    async fn bytes(
        channels: &mut ChannelsClient<tonic::transport::Channel>,
        request: Request<DownloadAttachmentRequest>,
    ) -> Result<usize, Status> {
        let mut stream = channels.download_attachment(request).await?.into_inner();
        let mut n = 0;
        while let Some(chunk) = stream.next().await {
            n += chunk?.data.len();
        }
        Ok(n)
    }
    // Carol joined after the first upload: she sees neither that message
    // nor that file; the second is hers to fetch. Bob gets both.
    let err = bytes(&mut channels, download(&carol, &early))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        bytes(&mut channels, download(&carol, &late)).await.unwrap(),
        1000
    );
    assert_eq!(
        bytes(&mut channels, download(&bob, &early)).await.unwrap(),
        1000
    );
    assert_eq!(
        bytes(&mut channels, download(&bob, &late)).await.unwrap(),
        1000
    );
}

#[tokio::test]
async fn send_message_requires_the_header_sender_card_and_list_channels_has_no_members() {
    let app = App::start(|_| {}).await;
    let alice = app.user("alice", 1).await;
    let bob = app.user("bob", 2).await;
    let mut channels = app.channels().await;
    let channel_id =
        create_channel(&mut channels, &alice, &[&bob], HistoryVisibility::Shared).await;
    // The request names alice's card, the envelope header another card
    // (bob's, also a registered device): INVALID_ARGUMENT, nothing stored.
    let err = channels
        .send_message(alice.req(SendMessageRequest {
            channel_id: channel_id.clone(),
            client_message_id: vec![1; 16],
            sender_card_id: alice.card_id.clone(),
            envelope: envelope(&bob.card_id, 100, 1),
            epoch: epoch(&channel_id),
            kind: EnvelopeKind::Device as i32,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(send(&mut channels, &alice, &channel_id, 100, 2).await, 1);
    // ListChannels leaves members out, as the proto says; GetChannel has them.
    let listed = channels
        .list_channels(bob.req(ListChannelsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .channels;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].members.is_empty());
    assert_eq!(listed[0].next_index, 2);
}

#[tokio::test]
async fn pages_are_bounded_by_bytes_in_both_directions() {
    let app = App::start(|c| c.limits.max_page_bytes = 7000).await;
    let alice = app.user("alice", 1).await;
    let mut channels = app.channels().await;
    let channel_id = create_channel(&mut channels, &alice, &[], HistoryVisibility::Shared).await;
    for n in 0..5 {
        send(&mut channels, &alice, &channel_id, 3000, n).await;
    }
    let page = |anchor, direction: Direction| {
        let request = alice.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor,
            page_size: 500,
            direction: direction as i32,
        });
        let mut channels = channels.clone();
        async move {
            let page = channels.list_messages(request).await.unwrap().into_inner();
            let indices: Vec<u64> = page.messages.iter().map(|m| m.index).collect();
            (indices, page.next_anchor)
        }
    };
    assert_eq!(page(0, Direction::Forward).await, (vec![1, 2], 3));
    assert_eq!(page(3, Direction::Forward).await, (vec![3, 4], 5));
    assert_eq!(page(5, Direction::Forward).await, (vec![5], 0));
    assert_eq!(page(0, Direction::Backward).await, (vec![4, 5], 3));
    assert_eq!(page(3, Direction::Backward).await, (vec![2, 3], 1));
    assert_eq!(page(1, Direction::Backward).await, (vec![1], 0));
}

#[tokio::test]
async fn per_user_quotas_for_messages_and_attachments() {
    let app = App::start(|c| {
        c.limits.max_message_bytes_per_user = 10_000;
        c.limits.max_attachment_bytes_per_user = 5000;
        c.limits.max_attachments_per_user = 2;
    })
    .await;
    let alice = app.user("alice", 1).await;
    let bob = app.user("bob", 2).await;
    let mut channels = app.channels().await;
    let channel_id =
        create_channel(&mut channels, &alice, &[&bob], HistoryVisibility::Shared).await;
    let message = |from: &User, n: u8| {
        from.req(SendMessageRequest {
            channel_id: channel_id.clone(),
            client_message_id: vec![n; 16],
            sender_card_id: from.card_id.clone(),
            envelope: envelope(&from.card_id, 3000, n),
            epoch: epoch(&channel_id),
            kind: EnvelopeKind::Device as i32,
        })
    };
    // Three ~3.1 kB records fit in 10 000 bytes; the fourth does not.
    for n in 0..3 {
        channels.send_message(message(&alice, n)).await.unwrap();
    }
    let err = channels.send_message(message(&alice, 3)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The quota is alice's, not the channel's.
    channels.send_message(message(&bob, 4)).await.unwrap();

    // Alice: 3000 bytes fit; 3000 more do not (bytes); 1000 do; a third
    // file does not (count). Bob's quota is his own.
    for (who, size, fits) in [
        (&alice, 3000, true),
        (&alice, 3000, false),
        (&alice, 1000, true),
        (&alice, 10, false),
        (&bob, 4000, true),
    ] {
        let request = who.req(tokio_stream::iter([UploadAttachmentRequest {
            channel_id: channel_id.clone(),
            data: vec![7; size],
        }]));
        match channels.upload_attachment(request).await {
            Ok(_) => assert!(fits, "{} uploading {size} bytes", who.identity),
            Err(e) => {
                assert!(!fits, "{} uploading {size} bytes: {e:?}", who.identity);
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            }
        }
    }
}

#[tokio::test]
async fn subscriptions_are_capped_per_user_and_per_process() {
    let app = App::start(|c| {
        c.limits.max_subscriptions_per_user = 2;
        c.limits.max_subscriptions = 3;
    })
    .await;
    let alice = app.user("alice", 1).await;
    let bob = app.user("bob", 2).await;
    let mut channels = app.channels().await;
    let channel_id =
        create_channel(&mut channels, &alice, &[&bob], HistoryVisibility::Shared).await;
    let subscribe = |who: &User| {
        let request = who.req(SubscribeRequest {
            channel_id: channel_id.clone(),
            from_index: 0,
        });
        let mut channels = channels.clone();
        async move { channels.subscribe(request).await.map(|r| r.into_inner()) }
    };
    let first = subscribe(&alice).await.unwrap();
    let _second = subscribe(&alice).await.unwrap();
    let err = subscribe(&alice).await.unwrap_err();
    assert!(exhausted_with_retry(&err), "per user: {err:?}");
    let _bob = subscribe(&bob).await.unwrap();
    let err = subscribe(&bob).await.unwrap_err();
    assert!(exhausted_with_retry(&err), "per process: {err:?}");
    // Closing a subscription frees its slot (once the server sees it go).
    drop(first);
    let mut reopened = None;
    for _ in 0..200 {
        match subscribe(&bob).await {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(e) => {
                assert!(exhausted_with_retry(&e), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(reopened.is_some(), "the freed slot was never given back");
}
