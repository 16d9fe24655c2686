//! The app server over real gRPC on 127.0.0.1:0, with a real key service
//! beside it, each on its own temporary sled directory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures_util::StreamExt;
use tessera_card::{
    CardId, CardKind, NewCard, Verifier,
    channel::{Change, NewChannelStatement, Role, Visibility},
    device_list::{Action, NewStatement},
    revocation, transparency,
};
use tessera_crypto::{
    DeviceKeys, SignatureContext, VerifyingKey,
    envelope::{self, Draft, Recipient, Sender},
};
use tessera_kms::{DEFAULT_MAX_REQUEST_BYTES, Kms};
use tessera_proto::{
    channel::v1::SignedChannelStatement,
    kms::v1::CardStatus,
    server::v1::{
        BeginDeviceLoginRequest, ChannelEvent, CreateChannelRequest, Direction,
        DownloadAttachmentRequest, EnrollDeviceRequest, EnvelopeKind, FinishDeviceLoginRequest,
        GetChannelRequest, GetReadHorizonRequest, GetSenderKeyRequest, GetServerInfoRequest,
        HistoryVisibility, IssueTokenRequest, ListChannelsRequest, ListDevicesRequest,
        ListMessagesRequest, LoginRequest, PublishChannelStatementRequest, PutSenderKeysRequest,
        RevokeDeviceRequest, SendMessageRequest, SetOrgMemberRequest, SetReadHorizonRequest,
        SignUpRequest, StoredMessage, SubscribeRequest, UploadAttachmentRequest, WhoAmIRequest,
        accounts_client::AccountsClient, admin_client::AdminClient, channel_event,
        channels_client::ChannelsClient, devices_client::DevicesClient,
    },
};
use tessera_server::{Config, Limits, PasswordParams, Server, ThrottleLimits, store::SledStore};
use tessera_service::{
    serve::{Running, ServeOptions, bind},
    token::bearer_header,
};
use tonic::{Code, Request, Status, transport::Channel};

struct Stack {
    _kms_dir: tempfile::TempDir,
    server_dir: tempfile::TempDir,
    kms: Running,
    /// The server, and its store (to count its flushes).
    server: Option<(Running, std::sync::Arc<Server>, std::sync::Arc<SledStore>)>,
    channel: Channel,
    verifier: Verifier,
    limits: Limits,
    challenge_ttl: Duration,
    /// Each channel's chain length and head, as the statements accepted so far left them.
    tips: std::sync::Mutex<HashMap<String, (u64, Option<transparency::Hash>)>>,
}

async fn spawn_server(
    dir: &std::path::Path,
    kms_url: String,
    limits: Limits,
    challenge_ttl: Duration,
) -> (Running, std::sync::Arc<Server>, std::sync::Arc<SledStore>) {
    let mut config = Config::new(dir, kms_url);
    config.challenge_ttl = challenge_ttl;
    config.password_params = PasswordParams::DANGER_FAST_FOR_TESTS;
    config.org_identity = Some("org:acme".into());
    config.limits = limits;
    config.throttle = ThrottleLimits {
        per_identity: 3,
        per_peer: 1000,
        signups_per_peer: 1000,
        window: Duration::from_secs(60),
    };
    let (app, token) =
        tessera_server::load_or_create_keys(&dir.join("app.key"), &dir.join("token.key")).unwrap();
    let store = std::sync::Arc::new(SledStore::open(&dir.join("db")).unwrap());
    let server =
        std::sync::Arc::new(Server::with_store(store.clone(), app, token, config).unwrap());
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let running = Running::spawn(
        server.routes().await.unwrap(),
        listener,
        ServeOptions::default(),
    )
    .unwrap();
    (running, server, store)
}

impl Stack {
    async fn start() -> Self {
        Self::with_limits(Limits::default()).await
    }

    async fn with_limits(limits: Limits) -> Self {
        Self::with(limits, Duration::from_secs(60)).await
    }

    async fn with(limits: Limits, challenge_ttl: Duration) -> Self {
        let kms_dir = tempfile::tempdir().unwrap();
        let server_dir = tempfile::tempdir().unwrap();
        let (app, token) = tessera_server::load_or_create_keys(
            &server_dir.path().join("app.key"),
            &server_dir.path().join("token.key"),
        )
        .unwrap();
        let kms = Kms::open(&tessera_kms::Config {
            data_dir: kms_dir.path().to_path_buf(),
            key_path: None,
            app_public_key: app.verifying_key(),
            token_public_key: token.verifying_key(),
            limits: tessera_kms::Limits::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        })
        .await
        .unwrap();
        let kms_key = kms.directory().public_key();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let kms = Running::spawn(
            kms.routes().await.unwrap(),
            listener,
            ServeOptions::default(),
        )
        .unwrap();
        let (running, server, store) =
            spawn_server(server_dir.path(), kms.url(), limits.clone(), challenge_ttl).await;
        let channel = Channel::from_shared(running.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            _kms_dir: kms_dir,
            server_dir,
            kms,
            server: Some((running, server, store)),
            channel,
            verifier: Verifier::new(app.verifying_key(), kms_key),
            limits,
            challenge_ttl,
            tips: Default::default(),
        }
    }

    async fn restart_server(&mut self) {
        let (running, server, store) = self.server.take().unwrap();
        server.begin_shutdown();
        // Close our connection, stop serving, and let go of the database.
        self.channel = Channel::from_static("http://127.0.0.1:9").connect_lazy();
        running.stop().await.unwrap();
        drop((server, store));
        let (running, server, store) = spawn_server(
            self.server_dir.path(),
            self.kms.url(),
            self.limits.clone(),
            self.challenge_ttl,
        )
        .await;
        self.channel = Channel::from_shared(running.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        self.server = Some((running, server, store));
    }

    /// A stack where alice (device "laptop") and bob (device "phone")
    /// share a channel with shared history.
    async fn alice_and_bob_in_a_channel() -> (Self, User, User, String) {
        let s = Self::start().await;
        let mut alice = s.signup("alice").await;
        let mut bob = s.signup("bob").await;
        s.enroll(&mut alice, "laptop").await;
        s.enroll(&mut bob, "phone").await;
        let channel_id = s
            .create_channel(&alice, &[&bob], HistoryVisibility::Shared)
            .await;
        (s, alice, bob, channel_id)
    }

    /// Flushes the server's store has made.
    fn flushes(&self) -> u64 {
        self.server
            .as_ref()
            .map_or(0, |(_, _, store)| store.flushes())
    }

    fn accounts(&self) -> AccountsClient<Channel> {
        AccountsClient::new(self.channel.clone())
    }
    fn devices(&self) -> DevicesClient<Channel> {
        DevicesClient::new(self.channel.clone())
    }
    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }
    fn channels(&self) -> ChannelsClient<Channel> {
        ChannelsClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    async fn signup(&self, identity: &str) -> User {
        let r = self
            .accounts()
            .sign_up(SignUpRequest {
                identity: identity.into(),
                password: format!("{identity}-password"),
            })
            .await
            .unwrap()
            .into_inner();
        User {
            identity: identity.into(),
            token: bearer_header(&r.access_token),
            devices: Vec::new(),
        }
    }

    /// Enrolls a device of `user`; the first one starts the user's device
    /// list (GENESIS), later ones are pending in it.
    async fn enroll(&self, user: &mut User, name: &str) -> CardId {
        let keys = DeviceKeys::generate().unwrap();
        let card = NewCard {
            identity: &user.identity,
            kind: CardKind::Client,
            device_name: name,
            created_at: 1_700_000_000,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        let id = CardId::of_snapshot(&card.content_snapshot);
        let genesis = user.devices.is_empty().then(|| {
            NewStatement {
                identity: &user.identity,
                seqno: 0,
                previous_hash: None,
                action: Action::Genesis,
                subject: id,
                signer: id,
                created_at: 0,
            }
            .sign(&keys.signing)
        });
        let r = self
            .devices()
            .enroll_device(user.req(EnrollDeviceRequest {
                card: Some(card),
                statement: genesis,
            }))
            .await
            .unwrap()
            .into_inner();
        let record = r.record.unwrap();
        let verified = self
            .verifier
            .verify(
                &transparency::registered_card(&record.registration_entry).unwrap(),
                Some(&user.identity),
                CardKind::Client,
            )
            .unwrap();
        user.devices.push(Device {
            card_id: verified.id(),
            keys,
            public: *verified.encryption_key(),
        });
        verified.id()
    }

    async fn create_channel(
        &self,
        creator: &User,
        members: &[&User],
        visibility: HistoryVisibility,
    ) -> String {
        let channel_id = format!(
            "{:032x}",
            u128::from_be_bytes(tessera_crypto::random_array::<16>().unwrap())
        );
        let mut entries: Vec<(String, Role)> =
            std::iter::once((creator.identity.clone(), Role::Admin))
                .chain(members.iter().map(|u| (u.identity.clone(), Role::Member)))
                .collect();
        entries.sort();
        let creation = statement(
            creator,
            &channel_id,
            (0, None),
            Change::Create {
                name: "general".into(),
                visibility: Visibility::from_proto(visibility as i32).unwrap(),
                members: entries,
            },
        );
        let id = self
            .channels()
            .create_channel(creator.req(CreateChannelRequest {
                creation: Some(creation.clone()),
            }))
            .await
            .unwrap()
            .into_inner()
            .channel_id;
        assert_eq!(id, channel_id);
        self.accepted(&channel_id, &creation);
        channel_id
    }

    /// Signs `change` with `by`'s first device at the channel's tip and
    /// publishes it.
    async fn publish(&self, by: &User, channel_id: &str, change: Change) -> Result<(), Status> {
        let tip = self.tips.lock().unwrap()[channel_id];
        let signed = statement(by, channel_id, tip, change);
        self.channels()
            .publish_channel_statement(by.req(PublishChannelStatementRequest {
                channel_id: channel_id.into(),
                statement: Some(signed.clone()),
            }))
            .await?;
        self.accepted(channel_id, &signed);
        Ok(())
    }

    fn accepted(&self, channel_id: &str, signed: &SignedChannelStatement) {
        let mut tips = self.tips.lock().unwrap();
        let tip = tips.entry(channel_id.into()).or_insert((0, None));
        *tip = (
            tip.0 + 1,
            Some(tessera_card::channel::statement_hash(&signed.statement)),
        );
    }

    /// A live subscription of `user` to a channel from `from_index`.
    async fn subscribe(
        &self,
        user: &User,
        channel_id: &str,
        from_index: u64,
    ) -> tonic::Streaming<ChannelEvent> {
        self.channels()
            .subscribe(user.req(SubscribeRequest {
                channel_id: channel_id.into(),
                from_index,
            }))
            .await
            .unwrap()
            .into_inner()
    }

    /// The current epoch of a channel whose chain this stack wrote.
    fn epoch(&self, channel_id: &str) -> u64 {
        self.tips
            .lock()
            .unwrap()
            .get(channel_id)
            .map_or(0, |(length, _)| length.saturating_sub(1))
    }

    async fn send(
        &self,
        from: &User,
        device: usize,
        channel_id: &str,
        to: &[&User],
        body: &str,
    ) -> Result<u64, Status> {
        let envelope = seal(from, device, channel_id, to, body);
        let r = self
            .channels()
            .send_message(from.req(SendMessageRequest {
                channel_id: channel_id.into(),
                client_message_id: tessera_crypto::random_array::<16>().unwrap().to_vec(),
                sender_card_id: from.devices[device].card_id.to_vec(),
                envelope,
                epoch: self.epoch(channel_id),
                kind: EnvelopeKind::Device as i32,
            }))
            .await?
            .into_inner();
        Ok(r.index)
    }
}

struct Device {
    card_id: CardId,
    keys: DeviceKeys,
    public: tessera_crypto::EncryptionPublicKey,
}

struct User {
    identity: String,
    token: String,
    devices: Vec<Device>,
}

impl User {
    fn req<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert("authorization", self.token.parse().unwrap());
        r
    }
}

/// Every device of `to`.
fn recipients<'a>(to: &[&'a User]) -> Vec<Recipient<'a>> {
    to.iter()
        .flat_map(|u| u.devices.iter())
        .map(|d| Recipient {
            card_id: *d.card_id.as_bytes(),
            key: &d.public,
        })
        .collect()
}

fn seal(from: &User, device: usize, channel_id: &str, to: &[&User], body: &str) -> Vec<u8> {
    let recipients = recipients(to);
    envelope::seal(
        &Sender {
            identity: &from.identity,
            card_id: *from.devices[device].card_id.as_bytes(),
            key: &from.devices[device].keys.signing,
        },
        &Draft {
            channel_id,
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: body.as_bytes(),
            sent_at_ms: 0,
            epoch: None,
        },
        &recipients,
    )
    .unwrap()
    .envelope
}

/// Signs `change` with `by`'s first device, after the statement `tip` names.
fn statement(
    by: &User,
    channel_id: &str,
    (epoch, previous_hash): (u64, Option<transparency::Hash>),
    change: Change,
) -> SignedChannelStatement {
    NewChannelStatement {
        channel_id,
        epoch,
        previous_hash,
        signer_identity: &by.identity,
        signer: by.devices[0].card_id,
        created_at: tessera_service::now_secs(),
        change,
    }
    .sign(&by.devices[0].keys.signing)
}

/// The next `n` messages of a subscription (chain growth skipped).
async fn collect(stream: &mut tonic::Streaming<ChannelEvent>, n: usize) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("a message within 20 s")
            .expect("stream still open")
            .unwrap();
        if let Some(channel_event::Event::Message(message)) = next.event {
            out.push(message);
        }
    }
    out
}

#[tokio::test]
async fn enrollment_of_several_devices_and_passwordless_login() {
    let s = Stack::start().await;
    let info = s
        .accounts()
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.app_public_key,
        s.verifier.app_key().as_bytes().to_vec()
    );
    assert_eq!(info.org_identity, "org:acme");

    let mut alice = s.signup("alice").await;
    let mut bob = s.signup("bob").await;
    let a1 = s.enroll(&mut alice, "laptop").await;
    let a2 = s.enroll(&mut alice, "phone").await;
    s.enroll(&mut bob, "desktop").await;
    let listed = s
        .devices()
        .list_devices(alice.req(ListDevicesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let ids: HashSet<Vec<u8>> = listed.devices.iter().map(|d| d.card_id.clone()).collect();
    assert_eq!(ids, HashSet::from([a1.to_vec(), a2.to_vec()]));

    // Passwordless: sign the challenge with the device key.
    let challenge = s
        .accounts()
        .begin_device_login(BeginDeviceLoginRequest {
            identity: "alice".into(),
            card_id: a2.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .challenge;
    let message = [
        challenge.as_slice(),
        &5u32.to_be_bytes(),
        b"alice",
        a2.as_bytes(),
    ]
    .concat();
    let signature = alice.devices[1]
        .keys
        .signing
        .sign(SignatureContext::DeviceLogin, &message);
    let login = s
        .accounts()
        .finish_device_login(FinishDeviceLoginRequest {
            identity: "alice".into(),
            card_id: a2.to_vec(),
            challenge: challenge.clone(),
            signature: signature.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let device_user = User {
        identity: "alice".into(),
        token: bearer_header(&login.access_token),
        devices: vec![],
    };
    let me = s
        .accounts()
        .who_am_i(device_user.req(WhoAmIRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity, "alice");
    assert_eq!(me.device_card_id, a2.to_vec());

    // A device-login token never enrolls a device: that needs the password.
    let keys = DeviceKeys::generate().unwrap();
    let card = NewCard {
        identity: "alice",
        kind: CardKind::Client,
        device_name: "behind your back",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&keys)
    .unwrap();
    let err = s
        .devices()
        .enroll_device(device_user.req(EnrollDeviceRequest {
            card: Some(card),
            statement: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("password log-in"), "{err:?}");
    // It trades for a key-service token, which the app server refuses, and
    // never for another app-server token.
    let traded = s
        .accounts()
        .issue_token(device_user.req(IssueTokenRequest {
            audience: "kms".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(traded.audience, "kms");
    assert!(traded.expires_at <= login.expires_at);
    let kms_user = User {
        identity: "alice".into(),
        token: bearer_header(&traded.access_token),
        devices: vec![],
    };
    let err = s
        .accounts()
        .who_am_i(kms_user.req(WhoAmIRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = s
        .accounts()
        .issue_token(device_user.req(IssueTokenRequest {
            audience: "server".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The same challenge cannot be replayed; a wrong key cannot answer one.
    let replay = s
        .accounts()
        .finish_device_login(FinishDeviceLoginRequest {
            identity: "alice".into(),
            card_id: a2.to_vec(),
            challenge,
            signature: signature.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated);
    let challenge = s
        .accounts()
        .begin_device_login(BeginDeviceLoginRequest {
            identity: "alice".into(),
            card_id: a1.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .challenge;
    let message = [
        challenge.as_slice(),
        &5u32.to_be_bytes(),
        b"alice",
        a1.as_bytes(),
    ]
    .concat();
    let wrong = bob.devices[0]
        .keys
        .signing
        .sign(SignatureContext::DeviceLogin, &message);
    let err = s
        .accounts()
        .finish_device_login(FinishDeviceLoginRequest {
            identity: "alice".into(),
            card_id: a1.to_vec(),
            challenge,
            signature: wrong.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A revoked card cannot log in.
    let revoked = s
        .devices()
        .revoke_device(alice.req(RevokeDeviceRequest {
            card_id: a1.to_vec(),
            reason: "lost".into(),
            revocation: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.record.unwrap().status, CardStatus::Revoked as i32);
    let err = s
        .accounts()
        .begin_device_login(BeginDeviceLoginRequest {
            identity: "alice".into(),
            card_id: a1.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn enrollment_publishes_a_genesis_and_a_reset_co_signed_by_the_app() {
    let s = Stack::start().await;
    let carol = s.signup("carol").await;
    let enroll = |name: &'static str, action: Action, seqno: u64, previous: Option<[u8; 32]>| {
        let keys = DeviceKeys::generate().unwrap();
        let card = NewCard {
            identity: "carol",
            kind: CardKind::Client,
            device_name: name,
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        let id = CardId::of_snapshot(&card.content_snapshot);
        let statement = NewStatement {
            identity: "carol",
            seqno,
            previous_hash: previous,
            action,
            subject: id,
            signer: id,
            created_at: 0,
        }
        .sign(&keys.signing);
        (
            EnrollDeviceRequest {
                card: Some(card),
                statement: Some(statement.clone()),
            },
            statement,
        )
    };
    let (request, genesis) = enroll("first", Action::Genesis, 0, None);
    let r = s
        .devices()
        .enroll_device(carol.req(request))
        .await
        .unwrap()
        .into_inner();
    assert!(r.statement_logged);
    // The app server co-signs one genesis per account.
    let (request, _) = enroll("second", Action::Genesis, 0, None);
    let err = s
        .devices()
        .enroll_device(carol.req(request))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // An ADD does not come with an enrollment; a statement with the app
    // signature already filled in is refused.
    let (request, _) = enroll("third", Action::Add, 1, Some([0; 32]));
    let err = s
        .devices()
        .enroll_device(carol.req(request))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A reset against the genesis, with a fresh password log-in, is logged.
    let head = tessera_card::device_list::statement_hash(&genesis.statement);
    let (request, _) = enroll("after loss", Action::Reset, 1, Some(head));
    let r = s
        .devices()
        .enroll_device(carol.req(request))
        .await
        .unwrap()
        .into_inner();
    assert!(r.statement_logged);
}

#[tokio::test]
async fn device_revoked_by_its_own_key_and_device_limits() {
    let s = Stack::with_limits(Limits {
        max_devices_per_user: 2,
        ..Limits::default()
    })
    .await;
    let mut carol = s.signup("carol").await;
    let c1 = s.enroll(&mut carol, "one").await;
    s.enroll(&mut carol, "two").await;
    // Third device: quota.
    let keys = DeviceKeys::generate().unwrap();
    let card = NewCard {
        identity: "carol",
        kind: CardKind::Client,
        device_name: "three",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&keys)
    .unwrap();
    let err = s
        .devices()
        .enroll_device(carol.req(EnrollDeviceRequest {
            card: Some(card.clone()),
            statement: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("limit of 2 devices per user"),
        "{}",
        err.message()
    );
    // Revoke one with a revocation signed by the device itself, then there is room.
    let r = revocation::sign_revocation(
        c1,
        revocation::RevokedBy::SelfKey,
        &carol.devices[0].keys.signing,
        "retired",
        tessera_service::now_secs(),
    )
    .unwrap();
    s.devices()
        .revoke_device(carol.req(RevokeDeviceRequest {
            card_id: c1.to_vec(),
            reason: String::new(),
            revocation: Some(r),
        }))
        .await
        .unwrap();
    s.devices()
        .enroll_device(carol.req(EnrollDeviceRequest {
            card: Some(card),
            statement: None,
        }))
        .await
        .unwrap();
}

#[tokio::test]
async fn authorization_denials() {
    let s = Stack::start().await;
    let mut alice = s.signup("alice").await;
    let mut bob = s.signup("bob").await;
    let mut eve = s.signup("eve").await;
    let a1 = s.enroll(&mut alice, "laptop").await;
    s.enroll(&mut bob, "phone").await;
    s.enroll(&mut eve, "evil").await;
    let anon = User {
        identity: "anon".into(),
        token: "Bearer 00".into(),
        devices: vec![],
    };

    // Enrolling a card for someone else.
    let keys = DeviceKeys::generate().unwrap();
    let card = NewCard {
        identity: "alice",
        kind: CardKind::Client,
        device_name: "x",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&keys)
    .unwrap();
    let err = s
        .devices()
        .enroll_device(eve.req(EnrollDeviceRequest {
            card: Some(card.clone()),
            statement: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Revoking someone else's device.
    let err = s
        .devices()
        .revoke_device(eve.req(RevokeDeviceRequest {
            card_id: a1.to_vec(),
            reason: String::new(),
            revocation: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Admin calls by a non-admin.
    let err = s
        .admin()
        .set_org_member(eve.req(SetOrgMemberRequest {
            identity: "eve".into(),
            member: true,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Channel access.
    let channel_id = s
        .create_channel(&alice, &[&bob], HistoryVisibility::Shared)
        .await;
    s.send(&alice, 0, &channel_id, &[&alice, &bob], "hi bob")
        .await
        .unwrap();
    let err = s
        .channels()
        .get_channel(eve.req(GetChannelRequest {
            channel_id: channel_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = s
        .channels()
        .list_messages(eve.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor: 0,
            page_size: 10,
            direction: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = s
        .channels()
        .subscribe(eve.req(SubscribeRequest {
            channel_id: channel_id.clone(),
            from_index: 1,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = s
        .send(&eve, 0, &channel_id, &[&alice], "let me in")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = s
        .publish(
            &bob,
            &channel_id,
            Change::Add {
                identity: "eve".into(),
                role: Role::Member,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "only channel admins add members"
    );
    // Sending as another user's card.
    let envelope = seal(&alice, 0, &channel_id, &[&bob], "forged");
    let err = s
        .channels()
        .send_message(bob.req(SendMessageRequest {
            channel_id: channel_id.clone(),
            client_message_id: vec![1; 16],
            sender_card_id: a1.to_vec(),
            envelope,
            epoch: s.epoch(&channel_id),
            kind: EnvelopeKind::Device as i32,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Anonymous (or garbage token) on every call that needs a token.
    let errs = vec![
        s.accounts()
            .who_am_i(anon.req(WhoAmIRequest {}))
            .await
            .unwrap_err(),
        s.devices()
            .enroll_device(anon.req(EnrollDeviceRequest {
                card: Some(card),
                statement: None,
            }))
            .await
            .unwrap_err(),
        s.devices()
            .list_devices(anon.req(ListDevicesRequest {}))
            .await
            .unwrap_err(),
        s.channels()
            .list_channels(anon.req(ListChannelsRequest {}))
            .await
            .unwrap_err(),
        s.channels()
            .get_channel(anon.req(GetChannelRequest {
                channel_id: channel_id.clone(),
            }))
            .await
            .unwrap_err(),
        s.channels()
            .subscribe(anon.req(SubscribeRequest {
                channel_id: channel_id.clone(),
                from_index: 0,
            }))
            .await
            .unwrap_err(),
        s.channels()
            .list_messages(Request::new(ListMessagesRequest {
                channel_id: channel_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap_err(),
    ];
    for e in errs {
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
}

/// Group commit: sends to one channel at once share flushes, and each is
/// acknowledged with its own index, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_to_one_channel_share_flushes() {
    const SENDS: usize = 32;
    let (s, alice, bob, channel_id) = Stack::alice_and_bob_in_a_channel().await;
    let before = s.flushes();
    let (to, bodies) = (
        [&alice, &bob],
        (0..SENDS).map(|i| format!("m{i}")).collect::<Vec<_>>(),
    );
    let sends = bodies
        .iter()
        .map(|body| s.send(&alice, 0, &channel_id, &to, body));
    let mut indices: Vec<u64> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let flushes = s.flushes() - before;
    indices.sort_unstable();
    assert_eq!(indices, (1..=SENDS as u64).collect::<Vec<_>>());
    assert!(
        flushes < SENDS as u64,
        "{SENDS} concurrent sends took {flushes} flushes"
    );
    // All of them are stored, in order.
    let stored = s
        .channels()
        .list_messages(alice.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor: 1,
            page_size: 100,
            direction: Direction::Forward as i32,
        }))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(stored.len(), SENDS);
}

#[tokio::test]
async fn ordered_delivery_to_concurrent_subscribers_resume_and_dedupe() {
    let (s, alice, bob, channel_id) = Stack::alice_and_bob_in_a_channel().await;

    // Three live subscribers from the start.
    let mut subs = Vec::new();
    for user in [&alice, &bob, &bob] {
        subs.push(s.subscribe(user, &channel_id, 1).await);
    }
    // Two senders at once.
    let (a, b) = tokio::join!(
        async {
            for i in 0..20 {
                s.send(&alice, 0, &channel_id, &[&alice, &bob], &format!("a{i}"))
                    .await
                    .unwrap();
            }
        },
        async {
            for i in 0..20 {
                s.send(&bob, 0, &channel_id, &[&alice, &bob], &format!("b{i}"))
                    .await
                    .unwrap();
            }
        }
    );
    let ((), ()) = (a, b);
    for sub in &mut subs {
        let got = collect(sub, 40).await;
        let indices: Vec<u64> = got.iter().map(|m| m.index).collect();
        assert_eq!(
            indices,
            (1..=40).collect::<Vec<_>>(),
            "every index once, in order"
        );
    }

    // A subscriber drops after 10, then resumes from 11 with no gap or duplicate.
    let mut early = s.subscribe(&bob, &channel_id, 1).await;
    let first = collect(&mut early, 10).await;
    drop(early);
    for i in 0..5 {
        s.send(
            &alice,
            0,
            &channel_id,
            &[&alice, &bob],
            &format!("later {i}"),
        )
        .await
        .unwrap();
    }
    let mut resumed = s
        .channels()
        .subscribe(bob.req(SubscribeRequest {
            channel_id: channel_id.clone(),
            from_index: first.last().unwrap().index + 1,
        }))
        .await
        .unwrap()
        .into_inner();
    let rest = collect(&mut resumed, 35).await;
    assert_eq!(rest.first().unwrap().index, 11);
    assert_eq!(rest.last().unwrap().index, 45);
    s.send(&alice, 0, &channel_id, &[&alice, &bob], "live")
        .await
        .unwrap();
    assert_eq!(collect(&mut resumed, 1).await[0].index, 46);

    // Dedupe: the same client message id is stored once.
    let envelope = seal(&alice, 0, &channel_id, &[&alice, &bob], "once");
    let request = || {
        alice.req(SendMessageRequest {
            channel_id: channel_id.clone(),
            client_message_id: vec![7; 16],
            sender_card_id: alice.devices[0].card_id.to_vec(),
            envelope: envelope.clone(),
            epoch: s.epoch(&channel_id),
            kind: EnvelopeKind::Device as i32,
        })
    };
    let first = s
        .channels()
        .send_message(request())
        .await
        .unwrap()
        .into_inner();
    let again = s
        .channels()
        .send_message(request())
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.index, again.index);
    assert_eq!(collect(&mut resumed, 1).await[0].index, first.index);
}

#[tokio::test]
async fn paging_both_ways_read_horizon_and_durability() {
    let mut s = Stack::start().await;
    let mut alice = s.signup("alice").await;
    let mut bob = s.signup("bob").await;
    s.enroll(&mut alice, "laptop").await;
    s.enroll(&mut bob, "phone").await;
    s.enroll(&mut bob, "tablet").await;
    let channel_id = s
        .create_channel(&alice, &[&bob], HistoryVisibility::Shared)
        .await;
    for i in 0..25 {
        s.send(&alice, 0, &channel_id, &[&alice, &bob], &format!("m{i}"))
            .await
            .unwrap();
    }
    let page = |anchor, direction: Direction| {
        let s = &s;
        let req = bob.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor,
            page_size: 10,
            direction: direction as i32,
        });
        async move { s.channels().list_messages(req).await.unwrap().into_inner() }
    };
    let indices = |r: &tessera_proto::server::v1::ListMessagesResponse| {
        r.messages.iter().map(|m| m.index).collect::<Vec<_>>()
    };
    let p1 = page(0, Direction::Forward).await;
    assert_eq!(indices(&p1), (1..=10).collect::<Vec<_>>());
    let p2 = page(p1.next_anchor, Direction::Forward).await;
    assert_eq!(indices(&p2), (11..=20).collect::<Vec<_>>());
    let p3 = page(p2.next_anchor, Direction::Forward).await;
    assert_eq!(indices(&p3), (21..=25).collect::<Vec<_>>());
    assert_eq!(p3.next_anchor, 0);
    let b1 = page(0, Direction::Backward).await;
    assert_eq!(indices(&b1), (16..=25).collect::<Vec<_>>());
    let b2 = page(b1.next_anchor, Direction::Backward).await;
    assert_eq!(indices(&b2), (6..=15).collect::<Vec<_>>());
    let b3 = page(b2.next_anchor, Direction::Backward).await;
    assert_eq!(indices(&b3), (1..=5).collect::<Vec<_>>());
    assert_eq!(b3.next_anchor, 0);
    let err = s
        .channels()
        .list_messages(bob.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor: 0,
            page_size: 100_000,
            direction: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The read horizon is per user, shared by devices, and never goes back.
    let set = |index| {
        bob.req(SetReadHorizonRequest {
            channel_id: channel_id.clone(),
            index,
        })
    };
    assert_eq!(
        s.channels()
            .set_read_horizon(set(12))
            .await
            .unwrap()
            .into_inner()
            .index,
        12
    );
    assert_eq!(
        s.channels()
            .set_read_horizon(set(3))
            .await
            .unwrap()
            .into_inner()
            .index,
        12
    );
    assert_eq!(
        s.channels()
            .set_read_horizon(set(99))
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    let alice_h = s
        .channels()
        .get_read_horizon(alice.req(GetReadHorizonRequest {
            channel_id: channel_id.clone(),
        }))
        .await
        .unwrap();
    assert_eq!(alice_h.into_inner().index, 0);

    // Everything acknowledged survives a restart.
    s.restart_server().await;
    let all = s
        .channels()
        .list_messages(bob.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor: 0,
            page_size: 100,
            direction: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(indices(&all), (1..=25).collect::<Vec<_>>());
    let h = s
        .channels()
        .get_read_horizon(bob.req(GetReadHorizonRequest {
            channel_id: channel_id.clone(),
        }))
        .await
        .unwrap();
    assert_eq!(h.into_inner().index, 12);
    assert_eq!(
        s.send(&alice, 0, &channel_id, &[&alice, &bob], "after restart")
            .await
            .unwrap(),
        26
    );
}

#[tokio::test]
async fn joined_visibility_membership_changes_and_limits() {
    let s = Stack::with_limits(Limits {
        max_members_per_channel: 3,
        max_envelope_bytes: 4096,
        ..Limits::default()
    })
    .await;
    let mut alice = s.signup("alice").await;
    let mut bob = s.signup("bob").await;
    let mut carol = s.signup("carol").await;
    let dave = s.signup("dave").await;
    s.enroll(&mut alice, "laptop").await;
    s.enroll(&mut bob, "phone").await;
    s.enroll(&mut carol, "phone").await;
    let channel_id = s
        .create_channel(&alice, &[&bob], HistoryVisibility::Joined)
        .await;
    for i in 0..5 {
        s.send(
            &alice,
            0,
            &channel_id,
            &[&alice, &bob],
            &format!("before carol {i}"),
        )
        .await
        .unwrap();
    }
    s.publish(
        &alice,
        &channel_id,
        Change::Add {
            identity: "carol".into(),
            role: Role::Member,
        },
    )
    .await
    .unwrap();
    s.send(
        &alice,
        0,
        &channel_id,
        &[&alice, &bob, &carol],
        "welcome carol",
    )
    .await
    .unwrap();
    let seen = s
        .channels()
        .list_messages(carol.req(ListMessagesRequest {
            channel_id: channel_id.clone(),
            anchor: 1,
            page_size: 100,
            direction: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        seen.messages.iter().map(|m| m.index).collect::<Vec<_>>(),
        vec![6]
    );
    let view = s
        .channels()
        .get_channel(carol.req(GetChannelRequest {
            channel_id: channel_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(view.visible_from_index, 6);
    assert_eq!(view.members.len(), 3);
    // Bob, a member from the start, sees everything.
    let view = s
        .channels()
        .get_channel(bob.req(GetChannelRequest {
            channel_id: channel_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(view.visible_from_index, 1);

    // Member limit.
    let err = s
        .publish(
            &alice,
            &channel_id,
            Change::Add {
                identity: "dave".into(),
                role: Role::Member,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("limit of 3 members per channel"),
        "{}",
        err.message()
    );
    // Unknown user.
    let err = s
        .publish(
            &alice,
            &channel_id,
            Change::Add {
                identity: "nobody".into(),
                role: Role::Member,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Envelope limit.
    let big = "x".repeat(5000);
    let err = s
        .send(&alice, 0, &channel_id, &[&alice], &big)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("the limit is 4096"),
        "{}",
        err.message()
    );
    // Garbage envelope.
    let err = s
        .channels()
        .send_message(alice.req(SendMessageRequest {
            channel_id: channel_id.clone(),
            client_message_id: vec![0; 16],
            sender_card_id: alice.devices[0].card_id.to_vec(),
            envelope: vec![0xde, 0xad],
            epoch: s.epoch(&channel_id),
            kind: EnvelopeKind::Device as i32,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A removed member's live stream ends; they can no longer read.
    let mut stream = s.subscribe(&bob, &channel_id, 0).await;
    s.publish(
        &alice,
        &channel_id,
        Change::Remove {
            identity: "bob".into(),
        },
    )
    .await
    .unwrap();
    s.send(&alice, 0, &channel_id, &[&alice, &carol], "bob is gone")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.unwrap_err().code(), Code::PermissionDenied);
    let err = s
        .channels()
        .get_channel(bob.req(GetChannelRequest {
            channel_id: channel_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    drop(dave);
}

#[tokio::test]
async fn attachments_and_login_throttling() {
    let s = Stack::start().await;
    let mut alice = s.signup("alice").await;
    let mut bob = s.signup("bob").await;
    let eve = s.signup("eve").await;
    s.enroll(&mut alice, "laptop").await;
    s.enroll(&mut bob, "phone").await;
    let channel_id = s
        .create_channel(&alice, &[&bob], HistoryVisibility::Shared)
        .await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<UploadAttachmentRequest> = data
        .chunks(50_000)
        .enumerate()
        .map(|(i, c)| UploadAttachmentRequest {
            channel_id: if i == 0 {
                channel_id.clone()
            } else {
                String::new()
            },
            data: c.to_vec(),
        })
        .collect();
    let uploaded = s
        .channels()
        .upload_attachment(alice.req(tokio_stream::iter(chunks)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.size, data.len() as u64);
    assert_eq!(uploaded.sha256, tessera_crypto::sha256(&data).to_vec());
    let mut download = s
        .channels()
        .download_attachment(bob.req(DownloadAttachmentRequest {
            channel_id: channel_id.clone(),
            attachment_id: uploaded.attachment_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(chunk) = download.next().await {
        back.extend(chunk.unwrap().data);
    }
    assert_eq!(back, data);
    let err = s
        .channels()
        .download_attachment(eve.req(DownloadAttachmentRequest {
            channel_id: channel_id.clone(),
            attachment_id: uploaded.attachment_id,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Three wrong passwords, then even the right one waits.
    for _ in 0..3 {
        let err = s
            .accounts()
            .login(LoginRequest {
                identity: "alice".into(),
                password: "wrong-password".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let err = s
        .accounts()
        .login(LoginRequest {
            identity: "alice".into(),
            password: "alice-password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Other users are unaffected; unknown users get the same answer as wrong passwords.
    s.accounts()
        .login(LoginRequest {
            identity: "bob".into(),
            password: "bob-password".into(),
        })
        .await
        .unwrap();
    let err = s
        .accounts()
        .login(LoginRequest {
            identity: "zed".into(),
            password: "whatever-pw".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Sign-up input errors.
    let err = s
        .accounts()
        .sign_up(SignUpRequest {
            identity: "Bad Name".into(),
            password: "long-enough".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .accounts()
        .sign_up(SignUpRequest {
            identity: "frank".into(),
            password: "short".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .accounts()
        .sign_up(SignUpRequest {
            identity: "bob".into(),
            password: "long-enough".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let _ = VerifyingKey::from_bytes(&[0u8; 32]);
    let listed = s
        .channels()
        .list_channels(alice.req(ListChannelsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.channels.len(), 1);
}

/// A device-login challenge answered after it expired is refused; a fresh
/// one answered in time is not.
#[tokio::test]
async fn device_login_challenges_expire() {
    const TTL: Duration = Duration::from_secs(1);
    let s = Stack::with(Limits::default(), TTL).await;
    let mut alice = s.signup("alice").await;
    let card = s.enroll(&mut alice, "laptop").await;
    let begin = || async {
        s.accounts()
            .begin_device_login(BeginDeviceLoginRequest {
                identity: "alice".into(),
                card_id: card.to_vec(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let finish = |challenge: Vec<u8>| {
        let message = [
            challenge.as_slice(),
            &5u32.to_be_bytes(),
            b"alice",
            card.as_bytes(),
        ]
        .concat();
        let signature = alice.devices[0]
            .keys
            .signing
            .sign(SignatureContext::DeviceLogin, &message);
        let request = FinishDeviceLoginRequest {
            identity: "alice".into(),
            card_id: card.to_vec(),
            challenge,
            signature: signature.to_vec(),
        };
        let mut accounts = s.accounts();
        async move { accounts.finish_device_login(request).await }
    };
    let late = begin().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now..=now + TTL.as_secs() as i64 + 1).contains(&late.expires_at),
        "expires_at {} announces the TTL",
        late.expires_at
    );
    tokio::time::sleep(TTL + Duration::from_millis(300)).await;
    let err = finish(late.challenge).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("unknown, used or expired challenge"),
        "{}",
        err.message()
    );
    let in_time = begin().await;
    finish(in_time.challenge).await.unwrap();
}

/// Two devices enrolling at once when the user has room for one more:
/// exactly one is enrolled, the other refused with the limit, and the user
/// ends with as many devices as the limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_at_the_device_limit_from_two_clients_at_once() {
    let s = Stack::with_limits(Limits {
        max_devices_per_user: 2,
        ..Limits::default()
    })
    .await;
    for round in 0..5 {
        let identity = format!("user{round}");
        let mut user = s.signup(&identity).await;
        s.enroll(&mut user, "first").await;
        let attempt = |name: &str| {
            let card = NewCard {
                identity: &identity,
                kind: CardKind::Client,
                device_name: name,
                created_at: 0,
                previous_card_id: None,
            }
            .self_signed(&DeviceKeys::generate().unwrap())
            .unwrap();
            let request = user.req(EnrollDeviceRequest {
                card: Some(card),
                statement: None,
            });
            let mut devices = s.devices();
            tokio::spawn(async move { devices.enroll_device(request).await })
        };
        let (a, b) = (attempt("second"), attempt("also second"));
        let results = [a.await.unwrap(), b.await.unwrap()];
        let outcomes: Vec<Result<(), Code>> = results
            .iter()
            .map(|r| r.as_ref().map(|_| ()).map_err(Status::code))
            .collect();
        let enrolled = outcomes.iter().filter(|r| r.is_ok()).count();
        assert_eq!(enrolled, 1, "round {round}: {outcomes:?}");
        let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains("limit of 2 devices per user"),
            "{}",
            refused.message()
        );
        let listed = s
            .devices()
            .list_devices(user.req(ListDevicesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .devices;
        assert_eq!(listed.len(), 2, "round {round}");
    }
}

#[tokio::test]
async fn statements_from_a_device_its_owner_did_not_approve_are_refused() {
    let s = Stack::start().await;
    let mut carol = s.signup("carol").await;
    let bob = s.signup("bob").await;
    // carol's first device starts her device list (GENESIS).
    s.enroll(&mut carol, "phone").await;
    // A laptop enrolled by password: active at the app server, pending in
    // carol's list.
    let laptop = s.enroll(&mut carol, "laptop").await;
    let channel_id = s
        .create_channel(&carol, &[&bob], HistoryVisibility::Shared)
        .await;
    let tip = s.tips.lock().unwrap()[&channel_id];
    let by_laptop = NewChannelStatement {
        channel_id: &channel_id,
        epoch: tip.0,
        previous_hash: tip.1,
        signer_identity: "carol",
        signer: laptop,
        created_at: 0,
        change: Change::Rename("mine".into()),
    }
    .sign(&carol.devices[1].keys.signing);
    let err = s
        .channels()
        .publish_channel_statement(carol.req(PublishChannelStatementRequest {
            channel_id: channel_id.clone(),
            statement: Some(by_laptop),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("is not approved by carol's device list"),
        "{err:?}"
    );
    // The phone, which the list trusts, may.
    s.publish(&carol, &channel_id, Change::Rename("ours".into()))
        .await
        .unwrap();
}

/// A chain of `from`'s first device at the channel's epoch `epoch`, its
/// copies for every device of `to`, and `n` group envelopes: the one place
/// these tests use tessera-crypto's sender-key API.
fn sender_chain(
    from: &User,
    channel_id: &str,
    epoch: u64,
    to: &[&User],
    n: usize,
) -> (Vec<u8>, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use tessera_crypto::sender_key::{GroupDraft, SenderChain};
    let device = &from.devices[0];
    let sender = Sender {
        identity: &from.identity,
        card_id: *device.card_id.as_bytes(),
        key: &device.keys.signing,
    };
    let epoch = envelope::Epoch {
        number: epoch,
        hash: [7; 32],
    };
    let mut chain = SenderChain::new(&sender, channel_id, epoch).unwrap();
    let recipients = recipients(to);
    let copies = chain
        .distribute(&sender, &recipients, 1)
        .unwrap()
        .into_iter()
        .map(|c| c.distribution)
        .collect();
    let envelopes = (0..n)
        .map(|i| {
            let body = format!("group {i}");
            let draft = GroupDraft {
                content_type: envelope::CONTENT_TYPE_TEXT,
                body: body.as_bytes(),
                sent_at_ms: 1,
            };
            chain.seal(&sender, &draft).unwrap().envelope
        })
        .collect();
    (chain.chain_id().to_vec(), copies, envelopes)
}

#[tokio::test]
async fn sender_keys_are_stored_handed_out_and_kept_across_a_restart() {
    let (mut s, alice, bob, channel_id) = Stack::alice_and_bob_in_a_channel().await;
    let carol = s.signup("carol").await;
    let (chain_id, copies, envelopes) = sender_chain(&alice, &channel_id, 0, &[&alice, &bob], 2);
    let mut live = s.subscribe(&bob, &channel_id, 1).await;
    let group_send = |envelope: Vec<u8>| {
        alice.req(SendMessageRequest {
            channel_id: channel_id.clone(),
            client_message_id: tessera_crypto::random_array::<16>().unwrap().to_vec(),
            sender_card_id: alice.devices[0].card_id.to_vec(),
            envelope,
            epoch: 0,
            kind: EnvelopeKind::Group as i32,
        })
    };
    // Before its copies are stored, a chain's messages are refused.
    let err = s
        .channels()
        .send_message(group_send(envelopes[0].clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let put = PutSenderKeysRequest {
        channel_id: channel_id.clone(),
        sender_card_id: alice.devices[0].card_id.to_vec(),
        epoch: 0,
        chain_id: chain_id.clone(),
        distributions: copies.clone(),
        recipient_card_ids: Vec::new(),
    };
    let stored = s
        .channels()
        .put_sender_keys(alice.req(put))
        .await
        .unwrap()
        .into_inner()
        .stored;
    assert_eq!(stored, 2);
    s.channels()
        .send_message(group_send(envelopes[0].clone()))
        .await
        .unwrap();
    let delivered = collect(&mut live, 1).await;
    assert_eq!(delivered[0].kind, EnvelopeKind::Group as i32);
    assert_eq!(delivered[0].envelope, envelopes[0]);

    let get = |me: &User| {
        me.req(GetSenderKeyRequest {
            channel_id: channel_id.clone(),
            recipient_card_id: me
                .devices
                .first()
                .map_or(vec![0; 32], |d| d.card_id.to_vec()),
            sender_card_id: alice.devices[0].card_id.to_vec(),
            chain_id: chain_id.clone(),
        })
    };
    let before = s
        .channels()
        .get_sender_key(get(&bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.distribution, copies[1]);
    let mut recipients = vec![
        alice.devices[0].card_id.to_vec(),
        bob.devices[0].card_id.to_vec(),
    ];
    recipients.sort();
    assert_eq!(before.recipient_card_ids, recipients);
    let err = s.channels().get_sender_key(get(&carol)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Acknowledged copies and chains survive a restart.
    drop(live);
    s.restart_server().await;
    let after = s
        .channels()
        .get_sender_key(get(&bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
    s.channels()
        .send_message(group_send(envelopes[1].clone()))
        .await
        .unwrap();
}
