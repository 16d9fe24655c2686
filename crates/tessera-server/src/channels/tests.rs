//! Unit tests of the channels domain layer, on the in-memory store, with no
//! gRPC: the membership rules as the server applies them (who may sign,
//! compare-and-set on the head, retries, channels made before protocol v2,
//! who may read the chain), sends naming their epoch, visibility, and
//! subscriptions announcing statements in order among the messages.

use std::{sync::Arc, time::Duration};

use futures_util::{Stream, StreamExt as _};
use tessera_card::{
    CardId, CardKind, NewCard,
    channel::{
        Change, ChannelError, MAX_STATEMENTS, NewChannelStatement, Role, Visibility, statement_hash,
    },
    transparency::{self, Hash},
};
use tessera_crypto::DeviceKeys;
use tessera_proto::{
    Message as _,
    channel::v1::SignedChannelStatement,
    envelope::v1::{Envelope, EnvelopeHeader, Stanza},
    server::v1::{
        ChannelEvent, Direction, EnvelopeKind, ListMessagesRequest, SendMessageRequest,
        channel_event::Event as PbEvent,
    },
};
use tessera_service::{
    Caller, TokenIssuer,
    token::{AuthMethod, Role as TokenRole},
};
use tokio::sync::watch;
use tonic::Code;

use super::Channels;
use crate::{
    Limits, Locks,
    error::ServerError,
    kms_client::KmsClient,
    signers::{SignerKeys, key_from_registration},
    store::{
        Account, ChannelRecord, Device, DeviceStatus, MemberRecord, MemoryStore, StatementChange,
    },
};

const CH: &str = "00112233445566778899aabbccddeeff";

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn crate::store::Store>,
    channels: Arc<Channels>,
    _closing: watch::Sender<bool>,
}

/// An enrolled device: its keys, its card id, its owner.
struct Dev {
    identity: String,
    keys: DeviceKeys,
    card: CardId,
}

impl World {
    fn new() -> Self {
        Self::with(Limits::default())
    }

    fn with(limits: Limits) -> Self {
        Self::on(Arc::new(MemoryStore::default()), limits)
    }

    /// Channels over `store` (a replica of its own when the store is a
    /// database that others share).
    fn on(store: Arc<dyn crate::store::Store>, limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shared = store.clone();
        // The key service is never reached: every device record here holds
        // its key (the fetch for older records is tested over gRPC).
        let kms = Arc::new(KmsClient::new(
            tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
        ));
        let issuer = Arc::new(TokenIssuer::new(
            tessera_crypto::SigningKey::generate().unwrap(),
            Duration::from_secs(900),
        ));
        let user_locks = Arc::new(Locks::new());
        let (closing_tx, closing) = watch::channel(false);
        let channels = Channels::new(
            shared.clone(),
            limits,
            SignerKeys::new(shared, kms, issuer, user_locks.clone()).without_approval_check(),
            user_locks,
            dir.path().to_path_buf(),
            closing,
        );
        Self {
            _dir: dir,
            store,
            channels: Arc::new(channels),
            _closing: closing_tx,
        }
    }

    /// An account with one enrolled device.
    async fn user(&self, identity: &str) -> Dev {
        self.store
            .create_account(&Account {
                identity: identity.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.device(identity).await
    }

    /// Another enrolled device of `identity`.
    async fn device(&self, identity: &str) -> Dev {
        let keys = DeviceKeys::generate().unwrap();
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
        self.store
            .put_devices(&[Device {
                card_id: id.to_vec(),
                identity: identity.into(),
                device_name: "phone".into(),
                created_at: 0,
                status: DeviceStatus::Active as i32,
                org_card: false,
                signing_public_key: keys.signing.verifying_key().as_bytes().to_vec(),
            }])
            .await
            .unwrap();
        Dev {
            identity: identity.into(),
            keys,
            card: id,
        }
    }

    async fn revoke(&self, dev: &Dev) {
        let mut d = self
            .store
            .device(dev.card.as_bytes())
            .await
            .unwrap()
            .unwrap();
        d.status = DeviceStatus::Revoked as i32;
        self.store.put_devices(&[d]).await.unwrap();
    }

    async fn record(&self) -> ChannelRecord {
        self.store.channel(CH).await.unwrap().unwrap()
    }

    async fn member(&self, identity: &str) -> Option<MemberRecord> {
        self.store.member(CH, identity).await.unwrap()
    }

    /// Users alice, bob and carol, and channel `CH` made by alice with
    /// `members`, with its chain.
    async fn channel_of_alice_with(&self, members: &[&str]) -> (Dev, Dev, Dev, Chain) {
        let (alice, bob, carol) = (
            self.user("alice").await,
            self.user("bob").await,
            self.user("carol").await,
        );
        let mut chain = Chain::new();
        self.create(&mut chain, &alice, members).await;
        (alice, bob, carol, chain)
    }

    /// Channel `CH` of alice alone, created by her: alice, and the
    /// channel's chain length.
    async fn channel_of_alice_alone(&self) -> (Dev, u64) {
        let alice = self.user("alice").await;
        self.create(&mut Chain::new(), &alice, &[]).await;
        let length = self.store.channel(CH).await.unwrap().unwrap().chain_length;
        (alice, length)
    }

    /// Creates channel `CH` by `creator` (admin) with `members`.
    async fn create(&self, chain: &mut Chain, creator: &Dev, members: &[&str]) {
        let creation = chain.creation(creator, Visibility::Shared, members);
        self.channels
            .create(&caller(creator), Some(creation))
            .await
            .unwrap();
    }

    /// Publishes `change` signed by `by` at `chain`'s head.
    async fn publish(
        &self,
        chain: &mut Chain,
        by: &Dev,
        change: Change,
    ) -> Result<(), ServerError> {
        let s = chain.sign(by, change);
        self.channels
            .publish(&caller(by), chain.channel_id, Some(s.clone()))
            .await?;
        chain.accepted(&s);
        Ok(())
    }

    /// Publishes `by`'s removal of `identity` at `chain`'s head.
    async fn remove(&self, chain: &mut Chain, by: &Dev, identity: &str) {
        self.publish(
            chain,
            by,
            Change::Remove {
                identity: identity.into(),
            },
        )
        .await
        .unwrap();
    }

    /// A world whose sends are stored one per batch, with channel `CH`
    /// made by alice; and the channel's chain length.
    async fn batches_of_one() -> (Self, u64) {
        let w = World::with(Limits {
            max_send_batch: 1,
            ..Limits::default()
        });
        let alice = w.user("alice").await;
        w.create(&mut Chain::new(), &alice, &[]).await;
        let length = w.store.channel(CH).await.unwrap().unwrap().chain_length;
        (w, length)
    }

    /// Waits until `n` sends wait for `CH`'s next batch while one is in
    /// flight (up to 10 s).
    async fn queued_reaches(&self, n: usize) {
        for _ in 0..1000 {
            if self.channels.send_batches.queued(CH) == Some(n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} sends never waited for the next batch");
    }

    /// A send from `from` (message `n`, epoch 0) on a task of its own.
    fn spawn_send(
        &self,
        from: &Dev,
        n: u8,
    ) -> tokio::task::JoinHandle<Result<tessera_proto::server::v1::SendMessageResponse, ServerError>>
    {
        let (channels, who, r) = (
            self.channels.clone(),
            caller(from),
            send_request(from, 0, n),
        );
        tokio::spawn(async move { channels.send(&who, r).await })
    }

    async fn send(&self, from: &Dev, epoch: u64, n: u8) -> Result<u64, ServerError> {
        self.channels
            .send(&caller(from), send_request(from, epoch, n))
            .await
            .map(|r| r.index)
    }
}

/// A send to `CH` past its checks at chain length `length`, as the
/// committer queues it: message `n` of `sender` (its id names both).
fn queued(length: u64, sender: &str, n: u16) -> crate::store::PendingMessage {
    crate::store::PendingMessage {
        chain_length: length,
        message: tessera_proto::server::v1::StoredMessage {
            channel_id: CH.into(),
            sender_identity: sender.into(),
            client_message_id: [&n.to_be_bytes()[..], sender.as_bytes()].concat(),
            ..Default::default()
        },
        max_message_bytes: u64::MAX,
    }
}

/// The token of a device log-in of `dev`.
fn caller(dev: &Dev) -> Caller {
    Caller {
        identity: dev.identity.clone(),
        role: TokenRole::User,
        device_card_id: Some(dev.card),
        org_member: false,
        auth: AuthMethod::Device,
        issued_at: tessera_service::now_secs(),
        expires_at: tessera_service::now_secs() + 900,
    }
}

/// The token of a password log-in of `dev`'s owner (it names no device).
fn password_caller(dev: &Dev) -> Caller {
    Caller {
        device_card_id: None,
        auth: AuthMethod::Password,
        ..caller(dev)
    }
}

fn send_request(from: &Dev, epoch: u64, n: u8) -> SendMessageRequest {
    SendMessageRequest {
        channel_id: CH.into(),
        client_message_id: vec![n; 16],
        sender_card_id: from.card.to_vec(),
        envelope: Envelope {
            header: EnvelopeHeader {
                version: 1,
                sender_card_id: from.card.to_vec(),
                stanzas: vec![Stanza {
                    card_id: vec![9; 32],
                    encapsulated_key: vec![1; 32],
                    wrapped_key: vec![2; 48],
                }],
            }
            .encode_to_vec(),
            ciphertext: vec![n; 64],
        }
        .encode_to_vec(),
        epoch,
        kind: EnvelopeKind::Device as i32,
    }
}

/// A channel's chain as the test's clients know it: its length and head.
struct Chain {
    channel_id: &'static str,
    length: u64,
    head: Option<Hash>,
}

impl Chain {
    /// Channel `CH`, before its creation.
    fn new() -> Self {
        Self::of(CH)
    }

    fn of(channel_id: &'static str) -> Self {
        Self {
            channel_id,
            length: 0,
            head: None,
        }
    }

    /// `CH` at `length` statements ending at `head`.
    fn at(length: u64, head: Hash) -> Self {
        Self {
            channel_id: CH,
            length,
            head: Some(head),
        }
    }

    fn epoch(&self) -> u64 {
        self.length - 1
    }

    fn creation(
        &mut self,
        creator: &Dev,
        visibility: Visibility,
        others: &[&str],
    ) -> SignedChannelStatement {
        let mut members: Vec<(String, Role)> = others
            .iter()
            .map(|i| ((*i).to_owned(), Role::Member))
            .collect();
        members.push((creator.identity.clone(), Role::Admin));
        members.sort();
        let s = self.sign(
            creator,
            Change::Create {
                name: "plans".into(),
                visibility,
                members,
            },
        );
        self.accepted(&s);
        s
    }

    /// `change` signed by `by` against the current head.
    fn sign(&self, by: &Dev, change: Change) -> SignedChannelStatement {
        self.sign_at(by, self.length, self.head, change)
    }

    fn sign_at(
        &self,
        by: &Dev,
        epoch: u64,
        previous: Option<Hash>,
        change: Change,
    ) -> SignedChannelStatement {
        NewChannelStatement {
            channel_id: self.channel_id,
            epoch,
            previous_hash: previous,
            signer_identity: &by.identity,
            signer: by.card,
            created_at: 0,
            change,
        }
        .sign(&by.keys.signing)
    }

    fn accepted(&mut self, s: &SignedChannelStatement) {
        self.length += 1;
        self.head = Some(statement_hash(&s.statement));
    }
}

fn add(identity: &str) -> Change {
    Change::Add {
        identity: identity.into(),
        role: Role::Member,
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, ServerError>) -> Code {
    result.unwrap_err().code()
}

#[tokio::test]
async fn a_creation_stores_the_channel_its_members_and_its_first_statement() {
    let w = World::new();
    let (alice, _bob) = (w.user("alice").await, w.user("bob").await);
    let mut chain = Chain::new();
    let creation = chain.creation(&alice, Visibility::Joined, &["bob"]);
    let view = w
        .channels
        .create(&caller(&alice), Some(creation.clone()))
        .await
        .unwrap();
    assert_eq!(view.channel_id, CH);
    assert_eq!(view.name, "plans");
    assert_eq!(view.creator, "alice");
    assert_eq!(view.chain_length, 1);
    assert_eq!(
        view.chain_head,
        statement_hash(&creation.statement).to_vec()
    );
    assert_eq!(view.next_index, 1);
    assert_eq!(view.visible_from_index, 1);
    assert_eq!(view.members.len(), 2);
    for m in &view.members {
        assert_eq!((m.added_at_epoch, m.added_by.as_str()), (0, "alice"));
        assert_eq!(m.joined_at_index, 1);
    }
    let record = w.record().await;
    assert_eq!(record.chain_length, 1);
    assert_eq!(record.next_index, 1);
    let entries = w.store.chain(CH, 0, 10, 10, usize::MAX).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].statement.as_ref(), Some(&creation));
    assert_eq!(entries[0].next_index, 1);
    assert_eq!(w.store.channels_of("bob").await.unwrap(), [CH]);
    let chain = w.channels.chain(&caller(&alice), CH, 0).await.unwrap();
    assert_eq!((chain.length, chain.entries.len()), (1, 1));

    // Sent again (a retry): the same channel. Another creation under the
    // same id: taken.
    let again = w
        .channels
        .create(&caller(&alice), Some(creation))
        .await
        .unwrap();
    assert_eq!(again, view);
    let other = Chain::new().creation(&alice, Visibility::Shared, &[]);
    let err = w
        .channels
        .create(&caller(&alice), Some(other))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert_eq!(
        w.store
            .chain(CH, 0, 10, 10, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn creations_that_break_a_rule_or_a_limit_are_refused() {
    let w = World::with(Limits {
        max_members_per_channel: 3,
        max_channels_per_user: 1,
        ..Limits::default()
    });
    let (alice, bob, carol, dave) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
        w.user("dave").await,
    );
    let create = |by: &Dev, s: Option<SignedChannelStatement>| {
        let c = caller(by);
        let channels = w.channels.clone();
        async move { channels.create(&c, s).await }
    };
    assert_eq!(code(create(&alice, None).await), Code::InvalidArgument);
    let garbage = SignedChannelStatement {
        statement: vec![0xff; 10],
        signature: vec![0; 64],
    };
    assert_eq!(
        code(create(&alice, Some(garbage)).await),
        Code::InvalidArgument
    );
    // A later statement is not a creation.
    let later = Chain::at(1, [7; 32]).sign(&alice, add("bob"));
    assert_eq!(
        code(create(&alice, Some(later)).await),
        Code::InvalidArgument
    );
    // A member without an account, named.
    let ghost = Chain::new().creation(&alice, Visibility::Shared, &["nobody"]);
    let err = create(&alice, Some(ghost)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.to_string().contains("nobody"), "{err}");
    // The creator must be an admin among the members.
    let s = Chain::new();
    let not_admin = s.sign(
        &alice,
        Change::Create {
            name: "x".into(),
            visibility: Visibility::Shared,
            members: vec![("alice".into(), Role::Member), ("bob".into(), Role::Admin)],
        },
    );
    assert_eq!(
        code(create(&alice, Some(not_admin)).await),
        Code::PermissionDenied
    );
    // The server's member limit.
    let crowd = Chain::new().creation(&alice, Visibility::Shared, &["bob", "carol", "dave"]);
    let err = create(&alice, Some(crowd)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.to_string().contains("3 members per channel"), "{err}");
    // Channels per user: bob's one channel is used up, so nobody can put him
    // in another.
    let mut first = Chain::new();
    w.create(&mut first, &bob, &[]).await;
    let with_bob = Chain::of("ffeeddccbbaa99887766554433221100").creation(
        &carol,
        Visibility::Shared,
        &["bob"],
    );
    let err = create(&carol, Some(with_bob)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.to_string().contains("channels for bob"), "{err}");
    assert!(w.store.channels_of("carol").await.unwrap().is_empty());
    drop(dave);
}

#[tokio::test]
async fn only_an_active_device_of_the_caller_signs() {
    let w = World::new();
    let (alice, bob) = (w.user("alice").await, w.user("bob").await);
    let alice_laptop = w.device("alice").await;
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    let publish = |who: Caller, s: SignedChannelStatement| {
        let channels = w.channels.clone();
        async move { channels.publish(&who, CH, Some(s)).await }
    };
    // Signed by alice, sent by bob.
    let s = chain.sign(&alice, Change::Rename("a".into()));
    let err = publish(caller(&bob), s.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // Alice's token names her phone; the statement names her laptop.
    let laptop = chain.sign(&alice_laptop, Change::Rename("b".into()));
    assert_eq!(
        code(publish(caller(&alice), laptop.clone()).await),
        Code::PermissionDenied
    );
    // ... which a password token (naming no device) may send.
    publish(password_caller(&alice), laptop.clone())
        .await
        .unwrap();
    chain.accepted(&laptop);
    // Bob's card named as alice's signer.
    let forged = chain.sign_at(
        &Dev {
            identity: "alice".into(),
            keys: DeviceKeys::generate().unwrap(),
            card: bob.card,
        },
        chain.length,
        chain.head,
        Change::Rename("c".into()),
    );
    assert_eq!(
        code(publish(password_caller(&alice), forged).await),
        Code::PermissionDenied
    );
    // A key that is not the card's: the signature does not verify.
    let other_key = Dev {
        identity: "alice".into(),
        keys: DeviceKeys::generate().unwrap(),
        card: alice.card,
    };
    let bad = chain.sign(&other_key, Change::Rename("d".into()));
    let err = publish(caller(&alice), bad).await.unwrap_err();
    assert!(
        matches!(err, ServerError::Statement(ChannelError::BadSignature)),
        "{err:?}"
    );
    assert_eq!(err.code(), Code::PermissionDenied);
    // A revoked device.
    w.revoke(&alice_laptop).await;
    let revoked = chain.sign(&alice_laptop, Change::Rename("e".into()));
    assert_eq!(
        code(publish(password_caller(&alice), revoked).await),
        Code::PermissionDenied
    );
    // An unknown card.
    let stranger = Dev {
        identity: "alice".into(),
        keys: DeviceKeys::generate().unwrap(),
        card: CardId::from_array([5; 32]),
    };
    let unknown = chain.sign(&stranger, Change::Rename("f".into()));
    assert_eq!(
        code(publish(password_caller(&alice), unknown).await),
        Code::PermissionDenied
    );
    // The organisation's card is no member's device.
    let mut org = w
        .store
        .device(alice.card.as_bytes())
        .await
        .unwrap()
        .unwrap();
    org.org_card = true;
    w.store.put_devices(&[org]).await.unwrap();
    let by_org = chain.sign(&alice, Change::Rename("g".into()));
    assert_eq!(
        code(publish(caller(&alice), by_org).await),
        Code::PermissionDenied
    );
    // Nothing but the laptop's rename was stored.
    assert_eq!(w.record().await.chain_length, 2);
    assert_eq!(w.record().await.name, "b");
}

#[tokio::test]
async fn statements_extend_the_head_by_compare_and_set_and_retries_answer_ok() {
    let w = World::new();
    let (alice, bob, _carol, mut chain) = w.channel_of_alice_with(&["bob"]).await;
    assert_eq!(w.send(&alice, 0, 1).await.unwrap(), 1);
    // Two statements made against the same head: the first wins, the
    // second is told to refetch.
    let first = chain.sign(&alice, add("carol"));
    let second = chain.sign(&alice, Change::Rename("late".into()));
    let view = w
        .channels
        .publish(&caller(&alice), CH, Some(first.clone()))
        .await
        .unwrap();
    chain.accepted(&first);
    assert_eq!(view.chain_length, 2);
    assert_eq!(view.chain_head, chain.head.unwrap().to_vec());
    let err = w
        .channels
        .publish(&caller(&alice), CH, Some(second))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.to_string().contains("refetch"), "{err}");
    // At the right epoch but on another parent; and one from the future.
    let fork = chain.sign_at(
        &alice,
        chain.length,
        Some([3; 32]),
        Change::Rename("x".into()),
    );
    assert_eq!(
        code(w.channels.publish(&caller(&alice), CH, Some(fork)).await),
        Code::Aborted
    );
    let future = chain.sign_at(
        &alice,
        chain.length + 1,
        chain.head,
        Change::Rename("x".into()),
    );
    assert_eq!(
        code(w.channels.publish(&caller(&alice), CH, Some(future)).await),
        Code::Aborted
    );
    let record = w.record().await;
    assert_eq!((record.chain_length, record.name.as_str()), (2, "plans"));

    // The accepted one sent again: answered as stored, nothing appended.
    let again = w
        .channels
        .publish(&caller(&alice), CH, Some(first))
        .await
        .unwrap();
    assert_eq!(again.chain_length, 2);
    assert_eq!(
        w.store
            .chain(CH, 0, 10, 10, usize::MAX)
            .await
            .unwrap()
            .len(),
        2
    );
    // Carol was added when the next message index was 2: she joined there.
    let carol = w.member("carol").await.unwrap();
    assert_eq!(
        (
            carol.joined_at_index,
            carol.added_at_epoch,
            carol.added_by.as_str()
        ),
        (2, 1, "alice")
    );
    assert_eq!(
        w.store.chain(CH, 1, 2, 1, usize::MAX).await.unwrap()[0].next_index,
        2
    );

    // A retried leave, from someone who is no longer a member, is
    // answered too (without the members).
    let leave = chain.sign(&bob, Change::Leave);
    w.channels
        .publish(&caller(&bob), CH, Some(leave.clone()))
        .await
        .unwrap();
    chain.accepted(&leave);
    assert!(w.member("bob").await.is_none());
    assert!(w.store.channels_of("bob").await.unwrap().is_empty());
    let retried = w
        .channels
        .publish(&caller(&bob), CH, Some(leave))
        .await
        .unwrap();
    assert_eq!(retried.chain_length, 3);
    assert!(retried.members.is_empty());
    assert!(retried.name.is_empty(), "an ex-member learns no name");
    assert_eq!(retried.visible_from_index, 0);
}

#[tokio::test]
async fn only_admins_change_members_and_the_rules_answer_their_statuses() {
    let w = World::with(Limits {
        max_members_per_channel: 4,
        ..Limits::default()
    });
    let (alice, bob, carol, eve) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
        w.user("eve").await,
    );
    let dave = w.user("dave").await;
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    // A ghost added by a member who is no admin; a non-member adding
    // herself.
    let err = w.publish(&mut chain, &bob, add("eve")).await.unwrap_err();
    assert!(
        matches!(err, ServerError::Statement(ChannelError::NotAnAdmin(ref who)) if who == "bob"),
        "{err:?}"
    );
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = w.publish(&mut chain, &eve, add("eve")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.to_string().contains("eve is not a member"), "{err}");
    assert!(w.member("eve").await.is_none());
    // An identity without an account.
    let err = w
        .publish(&mut chain, &alice, add("nobody"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.to_string().contains("nobody"), "{err}");
    // Already a member; removing oneself; removing or promoting someone who
    // is not there; the last admin leaving.
    for (by, change) in [
        (&alice, add("bob")),
        (
            &alice,
            Change::Remove {
                identity: "alice".into(),
            },
        ),
        (
            &alice,
            Change::Remove {
                identity: "carol".into(),
            },
        ),
        (
            &alice,
            Change::SetRole {
                identity: "carol".into(),
                role: Role::Admin,
            },
        ),
        (&alice, Change::Leave),
    ] {
        let err = w.publish(&mut chain, by, change.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{change:?}: {err}");
    }
    assert_eq!(w.record().await.chain_length, 1, "nothing was stored");
    // The server's member limit (4), then the channel's chain limit.
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    w.publish(&mut chain, &alice, add("dave")).await.unwrap();
    let err = w.publish(&mut chain, &alice, add("eve")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    let full = chain.sign_at(
        &alice,
        MAX_STATEMENTS,
        chain.head,
        Change::Rename("x".into()),
    );
    assert_eq!(
        code(w.channels.publish(&caller(&alice), CH, Some(full)).await),
        Code::ResourceExhausted
    );
    // Roles, names and visibility change by admins; a member leaves; an
    // admin removes.
    w.publish(
        &mut chain,
        &alice,
        Change::SetRole {
            identity: "bob".into(),
            role: Role::Admin,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        w.member("bob").await.unwrap().role,
        super::role_code(Role::Admin)
    );
    assert_eq!(w.member("bob").await.unwrap().added_at_epoch, 0, "kept");
    w.publish(&mut chain, &bob, Change::Rename("ours".into()))
        .await
        .unwrap();
    w.publish(&mut chain, &bob, Change::SetVisibility(Visibility::Joined))
        .await
        .unwrap();
    w.publish(&mut chain, &carol, Change::Leave).await.unwrap();
    w.remove(&mut chain, &bob, "dave").await;
    let record = w.record().await;
    assert_eq!(record.name, "ours");
    assert_eq!(
        record.history_visibility,
        super::visibility_code(Visibility::Joined)
    );
    assert_eq!(record.chain_length, chain.length);
    assert_eq!(record.chain_head, chain.head.unwrap().to_vec());
    let members: Vec<String> = w
        .store
        .members(CH)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.identity)
        .collect();
    assert_eq!(members, ["alice", "bob"]);
    assert!(w.store.channels_of("dave").await.unwrap().is_empty());
    // The removed member may not publish any more.
    let err = w
        .publish(&mut chain, &dave, Change::Leave)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn malformed_and_misaddressed_statements_are_invalid_arguments() {
    let w = World::new();
    let alice = w.user("alice").await;
    let mut chain = Chain::new();
    let publish = |channel_id: &'static str, s: Option<SignedChannelStatement>| {
        let c = caller(&alice);
        let channels = w.channels.clone();
        async move { channels.publish(&c, channel_id, s).await }
    };
    let rename = chain.sign_at(&alice, 1, Some([1; 32]), Change::Rename("x".into()));
    // No channel yet.
    assert_eq!(
        code(publish(CH, Some(rename.clone())).await),
        Code::NotFound
    );
    w.create(&mut chain, &alice, &[]).await;
    assert_eq!(
        code(publish("NOT-HEX", Some(rename.clone())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(publish("ffeeddccbbaa99887766554433221100", Some(rename)).await),
        Code::InvalidArgument
    );
    assert_eq!(code(publish(CH, None).await), Code::InvalidArgument);
    let mut short = chain.sign(&alice, Change::Rename("x".into()));
    short.signature.pop();
    assert_eq!(code(publish(CH, Some(short)).await), Code::InvalidArgument);
    let creation = Chain::new().creation(&alice, Visibility::Shared, &[]);
    assert_eq!(
        code(publish(CH, Some(creation)).await),
        Code::InvalidArgument
    );
    assert_eq!(w.record().await.chain_length, 1);
}

#[tokio::test]
async fn the_chain_is_served_to_current_members_only_from_an_epoch_in_pages() {
    let w = World::new();
    let (alice, bob, eve) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("eve").await,
    );
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    for i in 0..1004 {
        w.publish(&mut chain, &alice, Change::Rename(format!("name {i}")))
            .await
            .unwrap();
    }
    let all = w.channels.chain(&caller(&bob), CH, 0).await.unwrap();
    assert_eq!(all.length, 1005);
    assert_eq!(all.entries.len(), 1000, "at most 1000 in one answer");
    let rest = w.channels.chain(&caller(&bob), CH, 1000).await.unwrap();
    assert_eq!(rest.entries.len(), 5);
    let last = rest.entries.last().unwrap().statement.as_ref().unwrap();
    assert_eq!(statement_hash(&last.statement), chain.head.unwrap());
    assert!(
        w.channels
            .chain(&caller(&bob), CH, 1005)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    assert_eq!(
        code(w.channels.chain(&caller(&bob), CH, 1006).await),
        Code::InvalidArgument
    );
    // Not a member (any more: no chain.
    assert_eq!(
        code(w.channels.chain(&caller(&eve), CH, 0).await),
        Code::PermissionDenied
    );
    w.publish(&mut chain, &bob, Change::Leave).await.unwrap();
    assert_eq!(
        code(w.channels.chain(&caller(&bob), CH, 0).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            w.channels
                .chain(&caller(&bob), "ffeeddccbbaa99887766554433221100", 0)
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn messages_name_the_current_epoch() {
    let w = World::new();
    let (alice, bob, _carol, mut chain) = w.channel_of_alice_with(&["bob"]).await;
    assert_eq!(w.send(&alice, 0, 1).await.unwrap(), 1);
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    // Sealed at the old epoch: refetch and seal again.
    let err = w.send(&bob, 0, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.to_string().contains("at epoch 1"), "{err}");
    assert_eq!(code(w.send(&bob, 2, 2).await), Code::Aborted);
    assert_eq!(w.send(&bob, 1, 2).await.unwrap(), 2);
    // A retry of a message stored before the statement is still a
    // duplicate, not a stale epoch.
    let again = w
        .channels
        .send(&caller(&alice), send_request(&alice, 0, 1))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.index, 1);
    let stored = w
        .channels
        .messages(
            &caller(&bob),
            &ListMessagesRequest {
                channel_id: CH.into(),
                direction: Direction::Forward as i32,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .messages;
    let epochs: Vec<(u64, u64)> = stored.iter().map(|m| (m.index, m.epoch)).collect();
    assert_eq!(epochs, [(1, 0), (2, 1)]);
    // A member removed cannot send, at any epoch; nor a revoked device.
    w.remove(&mut chain, &alice, "bob").await;
    assert_eq!(code(w.send(&bob, 2, 3).await), Code::PermissionDenied);
    let laptop = w.device("alice").await;
    w.revoke(&laptop).await;
    assert_eq!(code(w.send(&laptop, 2, 4).await), Code::PermissionDenied);
    assert_eq!(w.send(&alice, 2, 5).await.unwrap(), 3);
}

#[tokio::test]
async fn a_channel_made_before_protocol_v2_stays_readable_and_takes_nothing_new() {
    let w = World::new();
    let (alice, bob) = (w.user("alice").await, w.user("bob").await);
    // As a protocol v1 server left it: no chain, members joined at 1.
    let channel = ChannelRecord {
        channel_id: CH.into(),
        name: "old".into(),
        creator: "alice".into(),
        history_visibility: super::visibility_code(Visibility::Shared),
        created_at_ms: 1,
        next_index: 1,
        chain_length: 0,
        chain_head: Vec::new(),
    };
    let member = |identity: &str, role: Role| MemberRecord {
        identity: identity.into(),
        role: super::role_code(role),
        joined_at_index: 1,
        joined_at_ms: 1,
        ..Default::default()
    };
    assert!(
        w.store
            .append_statement(
                CH,
                0,
                &[],
                &StatementChange {
                    channel: channel.clone(),
                    // Never served: reads stop at the record's length, 0.
                    entry: Default::default(),
                    put_members: vec![member("alice", Role::Admin), member("bob", Role::Member)],
                    remove_members: Vec::new(),
                },
            )
            .await
            .unwrap()
    );
    let old = tessera_proto::server::v1::StoredMessage {
        channel_id: CH.into(),
        index: 1,
        sender_identity: "alice".into(),
        client_message_id: vec![1; 16],
        ..Default::default()
    };
    let appended = w
        .store
        .append_messages(&[crate::store::PendingMessage {
            chain_length: 0,
            message: old.clone(),
            max_message_bytes: u64::MAX,
        }])
        .await
        .unwrap();
    assert_eq!(appended, vec![crate::store::BatchOutcome::Stored(1)]);
    let view = w.channels.get(&caller(&bob), CH).await.unwrap();
    assert_eq!((view.chain_length, view.chain_head.len()), (0, 0));
    let chain = w.channels.chain(&caller(&bob), CH, 0).await.unwrap();
    assert_eq!((chain.length, chain.entries.len()), (0, 0));
    assert_eq!(
        code(w.channels.chain(&caller(&bob), CH, 1).await),
        Code::InvalidArgument
    );
    let history = w
        .channels
        .messages(
            &caller(&bob),
            &ListMessagesRequest {
                channel_id: CH.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(history.messages, [old]);
    let err = w.send(&alice, 0, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.to_string().contains("create a new channel"), "{err}");
    let rename = Chain::at(1, [0; 32]).sign(&alice, Change::Rename("new".into()));
    assert_eq!(
        code(w.channels.publish(&caller(&alice), CH, Some(rename)).await),
        Code::FailedPrecondition
    );
    let creation = Chain::new().creation(&alice, Visibility::Shared, &["bob"]);
    assert_eq!(
        code(w.channels.create(&caller(&alice), Some(creation)).await),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn joined_history_starts_where_the_last_addition_was_accepted() {
    let w = World::new();
    let (alice, _bob, carol) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
    );
    let mut chain = Chain::new();
    let creation = chain.creation(&alice, Visibility::Joined, &["bob"]);
    w.channels
        .create(&caller(&alice), Some(creation))
        .await
        .unwrap();
    for n in 1..=3 {
        w.send(&alice, chain.epoch(), n).await.unwrap();
    }
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    assert_eq!(
        w.channels
            .get(&caller(&carol), CH)
            .await
            .unwrap()
            .visible_from_index,
        4
    );
    w.send(&alice, chain.epoch(), 4).await.unwrap();
    w.publish(&mut chain, &carol, Change::Leave).await.unwrap();
    w.send(&alice, chain.epoch(), 5).await.unwrap();
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    w.send(&alice, chain.epoch(), 6).await.unwrap();
    let view = w.channels.get(&caller(&carol), CH).await.unwrap();
    assert_eq!(view.visible_from_index, 6);
    let carol_member = view.members.iter().find(|m| m.identity == "carol").unwrap();
    assert_eq!(
        (carol_member.added_at_epoch, carol_member.joined_at_index),
        (3, 6)
    );
    let seen: Vec<u64> = w
        .channels
        .messages(
            &caller(&carol),
            &ListMessagesRequest {
                channel_id: CH.into(),
                anchor: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| m.index)
        .collect();
    assert_eq!(seen, [6]);
    // The organisation's backup service sees the same view of her.
    let archived = w.channels.member_view(CH, "carol").await.unwrap();
    assert_eq!(archived.visible_from_index, 6);
    assert_eq!(archived.chain_length, chain.length);
    assert_eq!(
        code(w.channels.member_view(CH, "dave").await),
        Code::PermissionDenied
    );
}

/// The next event of a subscription, within 10 s.
async fn next_event<S>(s: &mut S) -> Result<ChannelEvent, ServerError>
where
    S: Stream<Item = Result<ChannelEvent, ServerError>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
}

/// An event as `m<index>` or `chain<length>`.
fn label(event: ChannelEvent) -> String {
    match event.event {
        Some(PbEvent::Message(m)) => format!("m{}", m.index),
        Some(PbEvent::ChainLength(n)) => format!("chain{n}"),
        None => "none".into(),
    }
}

#[tokio::test]
async fn subscriptions_announce_statements_in_order_among_the_messages() {
    let w = World::new();
    let (alice, bob, _carol, _dave) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
        w.user("dave").await,
    );
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    w.send(&alice, 0, 1).await.unwrap();
    w.send(&alice, 0, 2).await.unwrap();
    w.publish(&mut chain, &alice, add("carol")).await.unwrap();
    w.send(&alice, 1, 3).await.unwrap();
    // Two statements between two messages come as one announcement.
    w.publish(&mut chain, &alice, Change::Rename("a".into()))
        .await
        .unwrap();
    w.publish(&mut chain, &alice, Change::Rename("b".into()))
        .await
        .unwrap();
    w.send(&alice, 3, 4).await.unwrap();
    w.publish(&mut chain, &alice, Change::Rename("c".into()))
        .await
        .unwrap();

    // From the start: the creation comes before message 1.
    let mut from_start = Box::pin(
        w.channels
            .subscribe(caller(&bob), CH.into(), 1)
            .await
            .unwrap(),
    );
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(label(next_event(&mut from_start).await.unwrap()));
    }
    assert_eq!(
        got,
        [
            "chain1", "m1", "m2", "chain2", "m3", "chain4", "m4", "chain5"
        ]
    );
    // From message 3: the statements accepted when the next index was 3
    // or later (the addition came right before message 3).
    let mut from_three = Box::pin(
        w.channels
            .subscribe(caller(&bob), CH.into(), 3)
            .await
            .unwrap(),
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(label(next_event(&mut from_three).await.unwrap()));
    }
    assert_eq!(got, ["chain2", "m3", "chain4", "m4", "chain5"]);
    // Live: a message, a statement, a message.
    w.send(&alice, 4, 5).await.unwrap();
    w.publish(&mut chain, &alice, add("dave")).await.unwrap();
    w.send(&alice, 5, 6).await.unwrap();
    for s in [&mut from_start, &mut from_three] {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(label(next_event(s).await.unwrap()));
        }
        assert_eq!(got, ["m5", "chain6", "m6"]);
    }
}

#[tokio::test]
async fn a_removed_member_gets_nothing_sent_after_the_removal() {
    let w = World::new();
    let (alice, bob) = (w.user("alice").await, w.user("bob").await);
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    let mut live = Box::pin(
        w.channels
            .subscribe(caller(&bob), CH.into(), 0)
            .await
            .unwrap(),
    );
    // From the next message on: the statements since the last message
    // (here the creation) come first.
    assert_eq!(label(next_event(&mut live).await.unwrap()), "chain1");
    w.send(&alice, 0, 1).await.unwrap();
    assert_eq!(label(next_event(&mut live).await.unwrap()), "m1");
    // Bob does not read while he is removed and more is sent.
    w.send(&alice, 0, 2).await.unwrap();
    w.remove(&mut chain, &alice, "bob").await;
    w.send(&alice, 1, 3).await.unwrap();
    assert_eq!(label(next_event(&mut live).await.unwrap()), "m2");
    let end = next_event(&mut live).await.unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied, "{end}");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), live.next())
            .await
            .unwrap()
            .is_none()
    );
    // A new subscription is refused outright.
    assert_eq!(
        w.channels
            .subscribe(caller(&bob), CH.into(), 1)
            .await
            .err()
            .map(|e| e.code()),
        Some(Code::PermissionDenied)
    );
}

#[tokio::test]
async fn a_device_record_without_a_key_takes_the_key_its_card_id_commits_to() {
    let w = World::new();
    let alice = w.user("alice").await;
    let bob = w.user("bob").await;
    let card_of = |dev: &Dev| {
        let mut card = NewCard {
            identity: &dev.identity,
            kind: CardKind::Client,
            device_name: "phone",
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&dev.keys)
        .unwrap();
        card.app_signature = vec![1; 64];
        card.kms_signature = vec![2; 64];
        card
    };
    let record = w
        .store
        .device(alice.card.as_bytes())
        .await
        .unwrap()
        .unwrap();
    let entry = transparency::registration_entry(&card_of(&alice), "alice", 0);
    assert_eq!(
        key_from_registration(&record, &entry).unwrap(),
        alice.keys.signing.verifying_key()
    );
    // The key service answering with another card (bob's) is not believed.
    let other = transparency::registration_entry(&card_of(&bob), "bob", 0);
    assert_eq!(
        key_from_registration(&record, &other).unwrap_err().code(),
        Code::Internal
    );
    assert_eq!(
        key_from_registration(&record, b"not an entry")
            .unwrap_err()
            .code(),
        Code::Internal
    );
}

mod replicas;
mod sender_keys;

/// `N` sends to one channel at once while a batch is in flight: they wait
/// and are stored together as the next batch, each at its own index, the
/// indices consecutive, published to a subscriber in order. With
/// `max_send_batch` 1 the same sends are stored one per batch.
async fn concurrent_sends(max_send_batch: usize) -> (u64, usize) {
    const N: u8 = 24;
    let w = World::with(Limits {
        max_send_batch,
        ..Limits::default()
    });
    let (alice, bob) = (w.user("alice").await, w.user("bob").await);
    let mut chain = Chain::new();
    w.create(&mut chain, &alice, &["bob"]).await;
    let mut live = Box::pin(
        w.channels
            .subscribe(caller(&bob), CH.into(), 1)
            .await
            .unwrap(),
    );
    // The first batch's committer takes its senders' locks: holding
    // alice's stalls it, and the other sends queue behind it.
    // The hub's raw feed: the subscription above delivers in index order
    // whatever the publish order (it fills gaps from the store), so only
    // this shows the order the batch publishes in.
    let mut raw = w.channels.hub.subscribe(CH).unwrap();
    let held = w.channels.user_locks.of("alice").lock().await;
    let spawn = |n: u8| {
        let (channels, who, r) = (
            w.channels.clone(),
            caller(&alice),
            send_request(&alice, 0, n),
        );
        tokio::spawn(async move { channels.send(&who, r).await.unwrap().index })
    };
    let mut sends = vec![spawn(1)];
    w.queued_reaches(0).await; // the first batch is in flight
    sends.extend((2..=N).map(spawn));
    w.queued_reaches(usize::from(N) - 1).await;
    drop(held);
    let mut indices = Vec::new();
    for s in sends {
        indices.push(s.await.unwrap());
    }
    indices.sort_unstable();
    assert_eq!(
        indices,
        (1..=u64::from(N)).collect::<Vec<_>>(),
        "distinct, consecutive"
    );
    let mut heard = Vec::new();
    while heard.len() < usize::from(N) {
        let event = label(next_event(&mut live).await.unwrap());
        if event.starts_with('m') {
            heard.push(event);
        }
    }
    let expected: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(heard, expected, "each delivered once");
    let mut published = Vec::new();
    while let Ok(item) = raw.try_recv() {
        published.extend(item.index());
    }
    assert_eq!(
        published,
        (1..=u64::from(N)).collect::<Vec<_>>(),
        "published in index order"
    );
    w.channels.send_batches.stats()
}

#[tokio::test]
async fn concurrent_sends_to_one_channel_are_stored_in_one_batch() {
    let (batches, largest) = concurrent_sends(256).await;
    assert_eq!(
        (batches, largest),
        (2, 23),
        "the first alone, then the rest"
    );
    let (batches, largest) = concurrent_sends(1).await;
    assert_eq!((batches, largest), (24, 1), "batching off: one by one");
}

/// A statement published while a send checked at the old epoch waits for
/// its batch: the statement waits for that batch, so the message is
/// stored at the epoch it was checked at and the statement's place comes
/// after it (without the wait, the statement would take index 1 and the
/// send, checked again, would be refused for its stale epoch).
#[tokio::test]
async fn a_statement_waits_for_the_sends_already_checked() {
    let w = World::new();
    let (alice, bob, _carol, mut chain) = w.channel_of_alice_with(&["bob"]).await;
    // Bob's batch stalls on his lock (its committer takes it).
    let held = w.channels.user_locks.of("bob").lock().await;
    let send = {
        let (channels, who, r) = (w.channels.clone(), caller(&bob), send_request(&bob, 0, 1));
        tokio::spawn(async move { channels.send(&who, r).await.map(|r| r.index) })
    };
    w.queued_reaches(0).await; // in flight
    let statement = chain.sign(&alice, add("carol"));
    let publish = {
        let (channels, who, s) = (w.channels.clone(), caller(&alice), statement.clone());
        tokio::spawn(async move { channels.publish(&who, CH, Some(s)).await })
    };
    // Every task runs as far as it can (one thread: the statement is
    // stored by now unless it waits for the batch).
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    drop(held);
    assert_eq!(send.await.unwrap().unwrap(), 1, "stored at its epoch");
    publish.await.unwrap().unwrap();
    chain.accepted(&statement);
    let entries = w
        .channels
        .chain(&caller(&alice), CH, 1)
        .await
        .unwrap()
        .entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].next_index, 2, "the statement comes after it");
}

/// A batch whose store call fails (`Fail`) or panics (`Panic`) while two
/// more sends wait behind it (batches of one): every sender gets an
/// answer, the channel is not wedged (the next send is stored) and a
/// statement still goes through (it waits for the channel to drain).
/// Returns the answers of the failed send and of the two queued ones.
async fn a_failed_batch(how: crate::store::Sabotage) -> Vec<Result<u64, Code>> {
    let store = Arc::new(MemoryStore::default());
    let w = World::on(
        store.clone(),
        Limits {
            max_send_batch: 1,
            ..Limits::default()
        },
    );
    let (alice, bob, _carol, mut chain) = w.channel_of_alice_with(&["bob"]).await;
    let held = w.channels.user_locks.of("bob").lock().await;
    let mut sends = vec![w.spawn_send(&bob, 1)];
    w.queued_reaches(0).await; // the first batch is in flight
    sends.extend([w.spawn_send(&bob, 2), w.spawn_send(&bob, 3)]);
    w.queued_reaches(2).await;
    store.sabotage_next_batch(how);
    drop(held);
    let mut answers = Vec::new();
    for s in sends {
        // A send never answered would hang: fail instead.
        let answer = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("every sender gets an answer");
        answers.push(
            answer
                .unwrap()
                .map(|r| r.index)
                .map_err(|e| tonic::Status::from(e).code()),
        );
    }
    let next = tokio::time::timeout(Duration::from_secs(60), w.send(&bob, 0, 4))
        .await
        .expect("the next send is answered")
        .expect("the channel still takes sends");
    let statement = chain.sign(&alice, add("carol"));
    w.channels
        .publish(&caller(&alice), CH, Some(statement.clone()))
        .await
        .expect("a statement still goes through");
    chain.accepted(&statement);
    let stored = answers.iter().filter(|a| a.is_ok()).count() as u64;
    assert_eq!(next, stored + 1, "stored after the others, no gap");
    assert_eq!(w.channels.send_batches.queued(CH), None, "drained");
    answers
}

#[tokio::test]
async fn a_batch_that_fails_answers_its_senders_and_the_queue_goes_on() {
    let answers = a_failed_batch(crate::store::Sabotage::Fail).await;
    assert_eq!(answers, vec![Err(Code::Internal), Ok(1), Ok(2)]);
}

#[tokio::test]
async fn a_committer_that_panics_answers_every_waiting_sender() {
    let answers = a_failed_batch(crate::store::Sabotage::Panic).await;
    assert_eq!(answers, vec![Err(Code::Internal); 3]);
}

/// A channel's queue takes at most `max(4 × max_send_batch, 1024)` sends
/// behind the batch in flight: the next is refused RESOURCE_EXHAUSTED
/// with a retry delay. Sends whose caller went away while queued are
/// dropped when a batch is formed, unstored; the others are stored in
/// order at consecutive indices.
#[tokio::test]
async fn a_full_queue_refuses_sends_and_abandoned_ones_are_not_stored() {
    use crate::store::BatchOutcome;

    use super::send_batch::SendBatches;
    let (w, length) = World::batches_of_one().await;
    // Four senders: one may hold a quarter of the queue.
    let pending = |n: u16| {
        queued(
            length,
            ["alice", "bob", "carol", "dave"][usize::from(n) % 4],
            n,
        )
    };
    let batches = w.channels.send_batches.clone();
    let held = w.channels.user_locks.of("alice").lock().await;
    let first = batches.enqueue(pending(0)).unwrap();
    w.queued_reaches(0).await; // in flight
    let mut kept = Vec::new();
    for n in 1..=1024u16 {
        let answer = batches.enqueue(pending(n)).unwrap();
        // The odd ones' callers hang up.
        if n % 2 == 0 {
            kept.push(answer);
        }
    }
    let full = batches.enqueue(pending(1025)).unwrap_err();
    let status = tonic::Status::from(full);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(tessera_service::limits::retry_after(&status).is_some());
    drop(held);
    let stored = |a| async move {
        match SendBatches::answer(a).await.unwrap().outcome {
            BatchOutcome::Stored(index) => index,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(stored(first).await, 1);
    let mut indices = Vec::new();
    for a in kept {
        indices.push(stored(a).await);
    }
    assert_eq!(indices, (2..=513).collect::<Vec<_>>(), "only the kept ones");
    assert_eq!(
        w.store
            .dedupe(CH, &pending(1).message.client_message_id)
            .await
            .unwrap(),
        None
    );
    // Room again.
    stored(batches.enqueue(pending(1025)).unwrap()).await;
}

/// A send's `server_time_ms` is stamped when its batch is stored, not
/// when it was checked: a send that waited in the queue is not dated
/// before the batch that stored it was let go.
#[tokio::test]
async fn a_queued_send_is_stamped_when_stored() {
    let w = World::new();
    let (alice, _) = w.channel_of_alice_alone().await;
    let held = w.channels.user_locks.of("alice").lock().await;
    let first = w.spawn_send(&alice, 1);
    w.queued_reaches(0).await;
    let second = w.spawn_send(&alice, 2);
    w.queued_reaches(1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let released = tessera_service::now_ms();
    drop(held);
    let (first, second) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert!(
        second.server_time_ms >= released,
        "stamped at {} before it was stored (released at {released})",
        second.server_time_ms
    );
    assert!(
        second.server_time_ms >= first.server_time_ms,
        "monotonic along the index"
    );
    let stored = w.channels.stored_message(CH, second.index).await.unwrap();
    assert_eq!(
        stored.server_time_ms, second.server_time_ms,
        "the stamp stored"
    );
}

/// The flush after a written batch fails: the message it wrote answers an
/// error (not known durable), but a duplicate of it in the same batch
/// answers its real outcome (duplicate, its index), and a subscriber
/// still hears of the written message.
#[tokio::test]
async fn a_failed_flush_errs_only_the_messages_it_wrote() {
    let store = Arc::new(MemoryStore::default());
    let w = World::on(store.clone(), Limits::default());
    let (alice, _) = w.channel_of_alice_alone().await;
    let mut raw = w.channels.hub.subscribe(CH).unwrap();
    let held = w.channels.user_locks.of("alice").lock().await;
    let blocker = w.spawn_send(&alice, 1);
    w.queued_reaches(0).await;
    let (first, again) = (w.spawn_send(&alice, 2), w.spawn_send(&alice, 2));
    w.queued_reaches(2).await;
    store.sabotage_next_batch(crate::store::Sabotage::FailFlushAfterBatchOf(2));
    drop(held);
    assert_eq!(blocker.await.unwrap().unwrap().index, 1);
    let first = first.await.unwrap().unwrap_err();
    assert_eq!(tonic::Status::from(first).code(), Code::Internal);
    let again = again.await.unwrap().expect("a duplicate's real answer");
    assert_eq!((again.index, again.duplicate), (2, true));
    let mut heard = Vec::new();
    while let Ok(item) = raw.try_recv() {
        heard.extend(item.index());
    }
    assert_eq!(heard, [1, 2], "the written message announced too");
}

#[tokio::test]
async fn one_sender_holds_at_most_a_quarter_of_a_channels_queue() {
    let (w, length) = World::batches_of_one().await;
    let pending = |sender: &str, n: u16| queued(length, sender, n);
    let batches = w.channels.send_batches.clone();
    let held = w.channels.user_locks.of("mallory").lock().await;
    let mut answers = vec![batches.enqueue(pending("mallory", 0)).unwrap()];
    w.queued_reaches(0).await; // in flight, stalled on mallory's lock
    for n in 1..=256 {
        answers.push(batches.enqueue(pending("mallory", n)).unwrap());
    }
    let refused = tonic::Status::from(batches.enqueue(pending("mallory", 257)).unwrap_err());
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("mallory has 256 sends waiting"),
        "{refused:?}"
    );
    // The other members still get in.
    answers.push(batches.enqueue(pending("alice", 0)).unwrap());
    drop(held);
    for answer in answers {
        super::send_batch::SendBatches::answer(answer)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_removed_members_retry_of_a_stored_send_is_answered_as_a_duplicate() {
    let w = World::new();
    let (alice, bob, carol, mut chain) = w.channel_of_alice_with(&["bob", "carol"]).await;
    assert_eq!(w.send(&bob, 0, 7).await.unwrap(), 1);
    w.remove(&mut chain, &alice, "bob").await;
    // Its first answer was lost: the retry learns it was stored.
    let again = w
        .channels
        .send(&caller(&bob), send_request(&bob, 0, 7))
        .await
        .unwrap();
    assert_eq!((again.index, again.duplicate), (1, true));
    // A new message is refused, and nobody else's id answers for bob.
    assert_eq!(code(w.send(&bob, 0, 8).await), Code::PermissionDenied);
    assert_eq!(w.send(&carol, 1, 9).await.unwrap(), 2);
    assert_eq!(code(w.send(&bob, 0, 9).await), Code::PermissionDenied);
}

/// What another replica stored (written here behind the hub's back, then
/// announced as the database would, late) is read once by the hub and
/// broadcast whole, in index order with this replica's own messages: its
/// subscribers need not each read it from the store.
#[tokio::test]
async fn another_replicas_messages_are_read_once_by_the_hub_and_broadcast_whole_in_order() {
    let w = World::new();
    let (alice, length) = w.channel_of_alice_alone().await;
    let mut raw = w.channels.hub.subscribe(CH).unwrap();
    let elsewhere = |n| queued(length, "alice", n);
    let announce = |index| {
        w.channels.announced(crate::store::Announced::Message {
            channel_id: CH.into(),
            index,
        });
    };
    assert_eq!(w.send(&alice, 0, 1).await.unwrap(), 1);
    // Another replica stores 2 and 3; its announcement comes after this
    // replica has stored 4.
    w.store
        .append_messages(&[elsewhere(102), elsewhere(103)])
        .await
        .unwrap();
    assert_eq!(w.send(&alice, 0, 4).await.unwrap(), 4);
    announce(3);
    w.store
        .append_messages(&[elsewhere(105), elsewhere(106)])
        .await
        .unwrap();
    announce(6);
    let mut heard = Vec::new();
    while heard.len() < 6 {
        let item = tokio::time::timeout(Duration::from_secs(10), raw.recv())
            .await
            .expect("an item within 10 s")
            .unwrap();
        match item {
            super::hub::Live::Inline(m) => heard.push(m.index),
            other => panic!("{:?} was not broadcast whole", other.index()),
        }
    }
    assert_eq!(heard, [1, 2, 3, 4, 5, 6]);
}

/// After a lost announcement (`Announced::Missed`) every subscriber is
/// woken and reads the store itself; the hub starts afresh, so the next
/// announcement goes out at once instead of the hub reading back, and
/// broadcasting, everything stored meanwhile (a backlog of 5: without the
/// fresh start the first item after the wake-up is 2; of 598: the
/// subscribers lagged, `Lagged(343)`, before gaps that wide were left to
/// them).
#[tokio::test]
async fn after_a_missed_announcement_the_hub_does_not_read_back_the_backlog() {
    for backlog in [5u16, 598] {
        let w = World::new();
        let (alice, length) = w.channel_of_alice_alone().await;
        let mut raw = w.channels.hub.subscribe(CH).unwrap();
        assert_eq!(w.send(&alice, 0, 1).await.unwrap(), 1);
        // Another replica stores 2..=backlog + 1 while this one's
        // listening connection is down: nothing announced.
        let ids: Vec<u16> = (1000..1000 + backlog).collect();
        for chunk in ids.chunks(100) {
            let batch: Vec<_> = chunk.iter().map(|&n| queued(length, "alice", n)).collect();
            w.store.append_messages(&batch).await.unwrap();
        }
        w.channels.announced(crate::store::Announced::Missed);
        // Listening again: the next message is announced.
        w.store
            .append_messages(&[queued(length, "alice", 1)])
            .await
            .unwrap();
        let next = u64::from(backlog) + 2;
        w.channels.announced(crate::store::Announced::Message {
            channel_id: CH.into(),
            index: next,
        });
        let mut first_after_wake = None;
        let mut woken = false;
        while first_after_wake.is_none() {
            let item = tokio::time::timeout(Duration::from_secs(10), raw.recv())
                .await
                .expect("an item within 10 s");
            match item {
                Ok(super::hub::Live::Wake) => woken = true,
                Ok(other) if woken => first_after_wake = Some(format!("{:?}", other.index())),
                Ok(_) => {}
                Err(e) => first_after_wake = Some(format!("{e:?}")),
            }
        }
        assert_eq!(
            first_after_wake.unwrap(),
            format!("Some({next})"),
            "backlog {backlog}"
        );
    }
}
