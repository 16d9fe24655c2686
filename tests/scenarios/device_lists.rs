//! Device lists (protocol v2): a user's devices are the ones the user's own
//! devices signed into their list, whatever the app server (which holds the
//! AppKey) or the key service (which holds the log) claim. Each scenario
//! plays the hostile party for real: the AppKey read from the app server's
//! data directory, tokens captured by a proxy in front of a service, a key
//! service whose operator writes into its own database and signs with its
//! own key.

use std::path::Path;

use tessera_card::{
    CardId, CardKind, NewCard, app_sign,
    device_list::{self, Action, NewStatement},
    transparency::{self, Tree, leaf_hash, sign_checkpoint},
};
use tessera_client::{ClientError, Endpoints, TrustEvent, Visibility};
use tessera_crypto::{
    DeviceKeys,
    envelope::{self, Draft, Recipient, Sender},
    keystore,
};
use tessera_kms::store::{Append, SledStore, Store};
use tessera_proto::{
    Message as _,
    auth::v1::{AccessToken, AuthMethod, TokenClaims},
    card::v1::Card,
    kms::v1::{
        DeviceList, GetDeviceListRequest, GetDeviceListResponse, PublishDeviceStatementRequest,
        RegisterCardRequest, SearchCardsResponse, key_directory_client::KeyDirectoryClient,
    },
    server::v1::{EnrollDeviceRequest, WhoAmIRequest},
};
use tessera_stack::hostile::{self, Proxy, raw_call};
use tessera_testkit::{Cluster, PASSPHRASE, approve};
use tonic::{Code, Request};

use crate::{app_key, behind_directory, cli, connect, service_token};

/// A card for `identity` signed with the AppKey and registered at the key
/// service without any of `identity`'s devices: what a hostile app server
/// can do.
pub(crate) async fn card_behind_their_back(
    cluster: &Cluster,
    identity: &str,
) -> (DeviceKeys, CardId) {
    let (keys, card) = server_made_card(cluster, identity);
    let id = CardId::of_snapshot(&card.content_snapshot);
    let mut request = Request::new(RegisterCardRequest { card: Some(card) });
    request
        .metadata_mut()
        .insert("authorization", service_token(cluster).parse().unwrap());
    KeyDirectoryClient::new(connect(&cluster.kms.url()).await)
        .register_card(request)
        .await
        .unwrap();
    (keys, id)
}

/// A card for `identity` that the app server signs with the AppKey, made
/// without any of `identity`'s devices (not registered yet).
fn server_made_card(cluster: &Cluster, identity: &str) -> (DeviceKeys, Card) {
    let keys = DeviceKeys::generate().unwrap();
    let mut card = NewCard {
        identity,
        kind: CardKind::Client,
        device_name: "made by the server",
        created_at: tessera_service::now_secs(),
        previous_card_id: None,
    }
    .self_signed(&keys)
    .unwrap();
    app_sign(&mut card, &app_key(cluster));
    (keys, card)
}

#[tokio::test]
async fn a_card_the_server_made_is_pending_refused_and_flagged() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster
        .device_with(
            "alice",
            "alice",
            true,
            Endpoints {
                server_url: relay.url(),
                ..cluster.endpoints()
            },
        )
        .await;
    let bob = cluster.device("bob", "bob", true).await;
    let channel = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let (rogue_keys, rogue) = card_behind_their_back(&cluster, "bob").await;

    // alice does not encrypt to it, and says so.
    let sent = alice.send_text(&channel, "for bob only").await.unwrap();
    assert!(!sent.recipients.contains(&rogue));
    assert_eq!(
        sent.recipients.len(),
        2,
        "alice's and bob's approved devices"
    );
    assert_eq!(sent.pending.len(), 1);
    assert_eq!(sent.pending[0].card_id, rogue);
    assert!(sent.events.contains(&TrustEvent::DevicePending {
        identity: "bob".into(),
        card_id: rogue,
        device_name: "made by the server".into(),
    }));
    let whois = cli(&cluster, "alice", &["whois", "bob"]).await;
    assert!(whois.status.success(), "{whois:?}");
    let text = String::from_utf8_lossy(&whois.stdout);
    assert!(text.contains("1 pending (not encrypted to)"), "{text}");
    assert!(
        text.contains(&format!("{rogue}  made by the server  (pending)")),
        "{text}"
    );

    // A message signed by it, slipped in by the relay, is refused.
    let real = bob.send_text(&channel, "the real bob").await.unwrap();
    let alice_card = alice.card_id();
    let alice_key = alice.cards_of(&["alice".into()]).await.unwrap().0["alice"].approved[0]
        .encryption_key()
        .to_owned();
    let forged = envelope::seal(
        &Sender {
            identity: "bob",
            card_id: *rogue.as_bytes(),
            key: &rogue_keys.signing,
        },
        &Draft {
            channel_id: &channel,
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: b"wire the money to the server's account",
            sent_at_ms: tessera_service::now_ms(),
            epoch: None,
        },
        &[Recipient {
            card_id: *alice_card.as_bytes(),
            key: &alice_key,
        }],
    )
    .unwrap()
    .envelope;
    relay
        .control
        .set_tamper(hostile::rewrite_messages(move |m| {
            if m.index == real.index {
                m.envelope = forged.clone();
                m.kind = 0; // a per-device envelope (section 4)
                m.sender_card_id = rogue.to_vec();
            }
        }));
    let page = alice.history(&channel, 0, 10, false).await.unwrap();
    relay.control.set_tamper(hostile::honest());
    assert!(page.messages[0].1.is_ok());
    let err = page.messages[1].1.as_ref().unwrap_err().to_string();
    assert!(err.contains("none of bob's devices approved"), "{err}");

    // bob's audit flags it as made by none of his devices.
    let audit = bob.audit().await.unwrap();
    assert!(audit.unrecognised_active().any(|c| c.card_id == rogue));
    let out = cli(&cluster, "bob", &["audit"]).await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");

    // The server goes further: it resets bob's list onto its card (it holds
    // the AppKey to co-sign). That cannot be hidden: alice is warned, and
    // bob's audit names the statement no device of his signed.
    let (length, head) = {
        let list = list_from(&cluster, "bob", u64::MAX).await;
        (
            list.length,
            statement_hash_at(&cluster, "bob", list.length - 1).await,
        )
    };
    let mut reset = NewStatement {
        identity: "bob",
        seqno: length,
        previous_hash: Some(head),
        action: Action::Reset,
        subject: rogue,
        signer: rogue,
        created_at: tessera_service::now_secs(),
    }
    .sign(&rogue_keys.signing);
    device_list::app_cosign(&mut reset, &app_key(&cluster));
    let mut request = Request::new(PublishDeviceStatementRequest {
        statement: Some(reset),
    });
    request
        .metadata_mut()
        .insert("authorization", service_token(&cluster).parse().unwrap());
    KeyDirectoryClient::new(connect(&cluster.kms.url()).await)
        .publish_device_statement(request)
        .await
        .unwrap();
    let sent = alice.send_text(&channel, "still you, bob?").await.unwrap();
    assert!(sent.events.contains(&TrustEvent::IdentityReset {
        identity: "bob".into()
    }));
    let out = cli(&cluster, "bob", &["audit"]).await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("none of your devices made"), "{stderr}");
    assert!(stderr.contains("reset by"), "{stderr}");
}

#[tokio::test]
async fn bob_approves_his_laptop_and_alices_next_message_reaches_both() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let phone = cluster.device("bob-phone", "bob", true).await;
    let laptop = cluster.device("bob-laptop", "bob", false).await;
    let channel = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    let before = alice.send_text(&channel, "before").await.unwrap();
    assert!(!before.recipients.contains(&laptop.card_id()));
    let page = laptop.history(&channel, 0, 10, false).await.unwrap();
    let err = page.messages[0].1.as_ref().unwrap_err().to_string();
    assert!(err.contains("not encrypted to this device"), "{err}");

    // The phone approves the laptop (the CLI, as a user would).
    let out = cli(
        &cluster,
        "bob-phone",
        &[
            "device",
            "approve",
            &laptop.card_id().to_string()[..12],
            "--yes",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let code = device_list::approval_code(&laptop.card_id());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&code));

    let after = alice.send_text(&channel, "after").await.unwrap();
    assert!(after.recipients.contains(&laptop.card_id()));
    assert!(after.recipients.contains(&phone.card_id()));
    assert!(after.events.iter().any(|e| matches!(
        e,
        TrustEvent::DeviceAdded { card_id, .. } if *card_id == laptop.card_id()
    )));
    for device in [&phone, &laptop] {
        let page = device
            .history(&channel, after.index, 1, false)
            .await
            .unwrap();
        let r = page.messages[0].1.as_ref().unwrap();
        assert_eq!(crate::text(r), "after", "{}", device.device_name());
    }
}

#[tokio::test]
async fn tokens_captured_at_the_key_service_or_the_backup_service_are_refused_by_the_app_server() {
    let cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let backup = Proxy::backup(&cluster.backup.url()).await.unwrap();
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let admin = cluster.admin().await;
    cluster
        .device_with(
            "alice",
            "alice",
            true,
            Endpoints {
                server_url: relay.url(),
                kms_url: directory.url(),
                backup_url: Some(backup.url()),
                ca_cert: None,
            },
        )
        .await;
    admin.set_org_member("alice", true).await.unwrap();
    let alice = cluster.reopen("alice");
    let channel = alice
        .create_channel("c", Visibility::Shared, &[])
        .await
        .unwrap()
        .channel_id;
    alice.send_text(&channel, "note to self").await.unwrap();
    let page = alice.history(&channel, 0, 1, false).await.unwrap();
    assert!(
        alice
            .back_up(page.messages[0].1.as_ref().unwrap())
            .await
            .unwrap()
    );

    let at_kms = directory.control.captured_tokens();
    let at_backup = backup.control.captured_tokens();
    let at_server = relay.control.captured_tokens();
    assert!(!at_kms.is_empty() && !at_backup.is_empty() && !at_server.is_empty());

    // Replayed at the app server, to enroll a device of the attacker's.
    let keys = DeviceKeys::generate().unwrap();
    let card = NewCard {
        identity: "alice",
        kind: CardKind::Client,
        device_name: "attacker",
        created_at: tessera_service::now_secs(),
        previous_card_id: None,
    }
    .self_signed(&keys)
    .unwrap();
    let enroll = EnrollDeviceRequest {
        card: Some(card),
        statement: None,
    }
    .encode_to_vec();
    let server = connect(&cluster.server.url()).await;
    for token in at_kms.iter().chain(&at_backup) {
        for (method, body) in [
            ("/tessera.server.v1.Devices/EnrollDevice", enroll.clone()),
            (
                "/tessera.server.v1.Accounts/WhoAmI",
                WhoAmIRequest {}.encode_to_vec(),
            ),
        ] {
            let status = raw_call(server.clone(), method, body, Some(token))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{method}: {status:?}");
            assert!(status.message().contains("not meant for this service"));
        }
    }
    // A device-login token (what the app server's own traffic carries) cannot
    // enroll a device either: that needs the password, just given.
    let device_tokens: Vec<&String> = at_server
        .iter()
        .filter(|t| claims(t).auth == AuthMethod::Device as i32)
        .collect();
    assert!(!device_tokens.is_empty());
    for token in device_tokens {
        let status = raw_call(
            server.clone(),
            "/tessera.server.v1.Devices/EnrollDevice",
            enroll.clone(),
            Some(token),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("password log-in"), "{status:?}");
    }
    // The backup service spoke to the app server with a credential of its
    // own (the OrgKey), never alice's.
    assert!(
        cluster
            .server
            .log_tail()
            .contains("backup service logged in with the OrgKey")
    );
}

/// The claims of a captured `authorization` header.
fn claims(header: &str) -> TokenClaims {
    let bytes = hex::decode(header.trim_start_matches("Bearer ")).unwrap();
    let token = AccessToken::decode(bytes.as_slice()).unwrap();
    TokenClaims::decode(token.claims.as_slice()).unwrap()
}

/// What a hostile key-service operator does to its own stopped database:
/// appends `entry` to the log, signs a checkpoint with the service's key,
/// and makes `identity`'s device list have the entry as statement `seqno`.
async fn doctor_log(dir: &Path, entry: Vec<u8>, identity: &str, seqno: usize) {
    doctor_log_as(dir, entry, Some((identity, seqno))).await;
}

/// [`doctor_log`], touching a device list only when `list` names one.
async fn doctor_log_as(dir: &Path, entry: Vec<u8>, list: Option<(&str, usize)>) {
    let key = keystore::load(&dir.join("kms.key"), None)
        .unwrap()
        .into_signing()
        .unwrap();
    let store = SledStore::open(&dir.join("db")).unwrap();
    let mut tree = Tree::from_leaves(store.leaf_hashes().unwrap());
    let index = tree.len();
    let leaf = leaf_hash(&entry);
    tree.push(leaf);
    let checkpoint = sign_checkpoint(
        &key,
        index + 1,
        &tree.root(index + 1).unwrap(),
        tessera_service::now_secs(),
    );
    let device_list = list.map(|(identity, seqno)| {
        let mut list = store.device_list(identity).unwrap().unwrap();
        list.indices.truncate(seqno);
        list.indices.push(index);
        list
    });
    store
        .apply(Append {
            index,
            entry,
            leaf_hash: leaf,
            cards: Vec::new(),
            device_list,
            checkpoint,
        })
        .unwrap();
    store.flush().await.unwrap();
}

/// `identity`'s device list at the real key service, from `from` on.
async fn list_from(cluster: &Cluster, identity: &str, from: u64) -> DeviceList {
    let mut request = Request::new(GetDeviceListRequest {
        identity: identity.into(),
        from_seqno: from,
    });
    request
        .metadata_mut()
        .insert("authorization", service_token(cluster).parse().unwrap());
    KeyDirectoryClient::new(connect(&cluster.kms.url()).await)
        .get_device_list(request)
        .await
        .unwrap()
        .into_inner()
        .device_list
        .unwrap()
}

/// The statement hash of `identity`'s statement `seqno`.
async fn statement_hash_at(cluster: &Cluster, identity: &str, seqno: u64) -> [u8; 32] {
    let list = list_from(cluster, identity, seqno).await;
    let Ok(transparency::LogEvent::DeviceStatement { statement, .. }) =
        transparency::parse_entry(&list.statements[0].entry)
    else {
        panic!("not a statement")
    };
    device_list::statement_hash(&statement.statement)
}

/// The head (seqno, hash) of `identity`'s list at the real key service.
async fn head(cluster: &Cluster, identity: &str) -> (u64, [u8; 32]) {
    let length = list_from(cluster, identity, u64::MAX).await.length;
    (
        length - 1,
        statement_hash_at(cluster, identity, length - 1).await,
    )
}

fn refused(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[tokio::test]
async fn rolled_back_forged_and_forked_device_lists_are_refused_with_exit_code_6() {
    let mut cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    cluster
        .device_with(
            "alice",
            "alice",
            true,
            Endpoints {
                kms_url: directory.url(),
                ..cluster.endpoints()
            },
        )
        .await;
    let phone = cluster.device("bob-phone", "bob", true).await;
    cluster.approved_device("bob-laptop", &phone).await;
    let out = cli(&cluster, "alice", &["whois", "bob"]).await;
    assert!(out.status.success(), "{out:?}");

    // Rolled back: the directory hides bob's last statement (the laptop's ADD).
    directory
        .control
        .set_tamper(std::sync::Arc::new(|method, message| {
            let shrink = |list: &mut DeviceList| {
                list.statements.pop();
                list.length -= 1;
            };
            match method {
                "/tessera.kms.v1.KeyDirectory/SearchCards" => {
                    let mut r = SearchCardsResponse::decode(message.as_slice()).unwrap();
                    for result in r.results.iter_mut().filter(|r| r.identity == "bob") {
                        if let Some(list) = result.device_list.as_mut() {
                            shrink(list);
                        }
                    }
                    vec![r.encode_to_vec()]
                }
                "/tessera.kms.v1.KeyDirectory/GetDeviceList" => {
                    let mut r = GetDeviceListResponse::decode(message.as_slice()).unwrap();
                    if let Some(list) = r.device_list.as_mut() {
                        shrink(list);
                    }
                    vec![r.encode_to_vec()]
                }
                _ => vec![message],
            }
        }));
    refused(
        &cli(&cluster, "alice", &["whois", "bob"]).await,
        "rolled back",
    );
    directory.control.set_tamper(hostile::honest());

    // Forged: the key service's operator logs an ADD that no device of bob's
    // signed (the server's card adds itself), with valid proofs and
    // checkpoints signed by the service's own key.
    let (rogue_keys, rogue) = card_behind_their_back(&cluster, "bob").await;
    let (seqno, hash) = head(&cluster, "bob").await;
    let forged_dir = cluster.copy_kms_data("kms-forged").await;
    let forged = NewStatement {
        identity: "bob",
        seqno: seqno + 1,
        previous_hash: Some(hash),
        action: Action::Add,
        subject: rogue,
        signer: rogue,
        created_at: tessera_service::now_secs(),
    }
    .sign(&rogue_keys.signing);
    doctor_log(
        &forged_dir,
        transparency::device_statement_entry(&forged, "bob", tessera_service::now_secs()),
        "bob",
        (seqno + 1) as usize,
    )
    .await;
    let forged_kms = cluster.kms_on(&forged_dir).await;
    directory.control.set_upstream(&forged_kms.url()).unwrap();
    refused(
        &cli(&cluster, "alice", &["whois", "bob"]).await,
        "is not a trusted device",
    );
    // alice keeps the forged log's checkpoint (signed with the service's
    // key): from now on the honest log is a fork to her, rightly. Another
    // user, dave, watches the next attack.
    directory.control.set_upstream(&cluster.kms.url()).unwrap();
    refused(
        &cli(&cluster, "alice", &["whois", "bob"]).await,
        "inconsistent with what this device saw before",
    );
    cluster
        .device_with(
            "dave",
            "dave",
            true,
            Endpoints {
                kms_url: directory.url(),
                ..cluster.endpoints()
            },
        )
        .await;

    // Forked: bob's phone really approves a tablet, and dave sees it; the
    // operator then also logs another statement in its place, validly signed
    // by bob's phone (which removed the laptop in another history), and
    // shows dave the list that ends with it.
    let tablet = cluster.device("bob-tablet", "bob", false).await;
    approve(&phone, &tablet).await;
    let out = cli(&cluster, "dave", &["whois", "bob"]).await;
    assert!(out.status.success(), "{out:?}");
    let (seqno, _) = head(&cluster, "bob").await;
    let laptop = cluster.reopen("bob-laptop").card_id();
    let phone_keys = keystore::load(
        &cluster.home.profile_dir("bob-phone").join("device.key"),
        Some(PASSPHRASE),
    )
    .unwrap()
    .into_device()
    .unwrap();
    // The parent of the tablet's ADD.
    let parent = statement_hash_at(&cluster, "bob", seqno - 1).await;
    let fork = NewStatement {
        identity: "bob",
        seqno,
        previous_hash: Some(parent),
        action: Action::Remove,
        subject: laptop,
        signer: phone.card_id(),
        created_at: tessera_service::now_secs(),
    }
    .sign(&phone_keys.signing);
    let forked_dir = cluster.copy_kms_data("kms-forked").await;
    doctor_log(
        &forked_dir,
        transparency::device_statement_entry(&fork, "bob", tessera_service::now_secs()),
        "bob",
        seqno as usize,
    )
    .await;
    let forked_kms = cluster.kms_on(&forked_dir).await;
    directory.control.set_upstream(&forked_kms.url()).unwrap();
    refused(&cli(&cluster, "dave", &["whois", "bob"]).await, "forked");
    // The SDK names the same failure.
    match cluster.reopen("dave").cards_of(&["bob".into()]).await {
        Err(ClientError::DeviceList { identity, .. }) => assert_eq!(identity, "bob"),
        other => panic!("expected a device list failure, got {other:?}"),
    }
}

#[tokio::test]
async fn after_an_identity_reset_contacts_see_the_change_and_lose_their_verified_mark() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let phone = cluster.device("bob-phone", "bob", true).await;
    let channel = alice
        .create_channel("c", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    phone
        .send_text(&channel, "from the old phone")
        .await
        .unwrap();
    let check = alice.safety_number("bob").await.unwrap();
    alice.mark_verified(&check).unwrap();
    assert!(alice.contacts().unwrap()["bob"]);

    // Every device lost: a new one resets bob's list after a password log-in.
    let out = cli(
        &cluster,
        "bob-new",
        &["login", "bob", "--reset", "--device-name", "new"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("replaced every other device"));
    let new = cluster.reopen("bob-new");
    new.send_text(&channel, "it's me, on a new phone")
        .await
        .unwrap();

    // alice first learns of it from that message: it is shown with a loud
    // warning, and the verified mark is gone.
    let out = cli(&cluster, "alice", &["history", "c"]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("it's me, on a new phone"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RESET their identity"), "{stderr}");
    assert!(!alice.contacts().unwrap()["bob"]);
    // ...and every later look says so again, until alice verifies bob anew.
    for _ in 0..2 {
        let out = cli(&cluster, "alice", &["whois", "bob"]).await;
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("RESET their identity"), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("not verified"));
    }
    let out = cli(&cluster, "alice", &["verify", "bob", "--confirm"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = cli(&cluster, "alice", &["whois", "bob"]).await;
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("RESET"),
        "{out:?}"
    );

    // Messages go to the new device only; the old one's past still verifies.
    let sent = alice.send_text(&channel, "welcome back").await.unwrap();
    assert!(sent.recipients.contains(&new.card_id()));
    assert!(!sent.recipients.contains(&phone.card_id()));
    let page = alice.history(&channel, 0, 10, false).await.unwrap();
    assert!(page.messages[0].1.is_ok(), "{:?}", page.messages[0].1);
    // The reset revoked the old phone: a thief holding it cannot log in.
    let err = phone.send_text(&channel, "still here?").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
    let (found, _) = alice.cards_of(&["bob".into()]).await.unwrap();
    assert!(found["bob"].pending.is_empty());
    assert_eq!(found["bob"].approved.len(), 1);
}

#[tokio::test]
async fn a_log_entry_labelled_with_another_identity_fails_the_audit() {
    let mut cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    behind_directory(&cluster, &directory, "bob", "bob").await;
    let out = cli(&cluster, "bob", &["audit"]).await;
    assert!(out.status.success(), "{out:?}");
    // The operator logs a card for bob (AppKey-signed, as a hostile app
    // server makes one) under the label "mallory": an audit that trusted
    // the label would never show it to bob.
    let (_, card) = server_made_card(&cluster, "bob");
    let dir = cluster.copy_kms_data("kms-mislabelled").await;
    doctor_log_as(
        &dir,
        transparency::registration_entry(&card, "mallory", tessera_service::now_secs()),
        None,
    )
    .await;
    let mislabelled = cluster.kms_on(&dir).await;
    directory.control.set_upstream(&mislabelled.url()).unwrap();
    refused(
        &cli(&cluster, "bob", &["audit"]).await,
        "is labelled with another identity than its content (bob)",
    );
}
