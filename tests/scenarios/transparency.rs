//! The transparency log at the client, served through a hostile directory
//! (a proxy in front of the real key service): a missing or bad inclusion
//! proof; a card with valid app and key-service signatures that was never
//! logged; a checkpoint rolled back to an older one; a consistency proof that
//! does not hold; and a split view (two users shown different logs, of the
//! same size and then of different sizes), caught when they compare
//! checkpoints.

use std::sync::{Arc, Mutex};

use tessera_card::{CardKind, Verifier, app_sign, kms_sign};
use tessera_client::ClientError;
use tessera_crypto::keystore;
use tessera_proto::kms::v1::{
    CardResponse, GetConsistencyProofResponse, RegisterCardRequest, SearchCardsResponse,
    key_directory_client::KeyDirectoryClient,
};
use tessera_stack::hostile::{self, Proxy};
use tessera_testkit::Cluster;
use tonic::Request;

use crate::{app_key, behind_directory, connect, new_card, service_token};

const SEARCH: &str = "/tessera.kms.v1.KeyDirectory/SearchCards";

fn refused_card(e: ClientError) -> String {
    match e {
        e @ ClientError::CardRejected { .. } => e.to_string(),
        other => panic!("expected a refused card, got: {other}"),
    }
}

fn fork(e: ClientError) -> String {
    match e {
        e @ ClientError::Fork(_) => e.to_string(),
        other => panic!("expected a fork, got: {other}"),
    }
}

/// Registers a card for `identity` signed with the cluster's AppKey at the
/// key service at `url` (what a compromised app server could do).
async fn register(cluster: &Cluster, url: &str, identity: &str) {
    let mut card = new_card(identity, "registered directly");
    app_sign(&mut card, &app_key(cluster));
    let mut request = Request::new(RegisterCardRequest { card: Some(card) });
    request
        .metadata_mut()
        .insert("authorization", service_token(cluster).parse().unwrap());
    KeyDirectoryClient::new(connect(url).await)
        .register_card(request)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_client_refuses_what_the_log_does_not_prove() {
    let cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let alice = behind_directory(&cluster, &directory, "alice", "alice").await;
    cluster.device("bob", "bob", true).await;
    // An honest answer, kept for the rollback below.
    let recorded = Arc::new(Mutex::new(None));
    let keep = recorded.clone();
    directory
        .control
        .set_tamper(Arc::new(move |method, message| {
            if method == SEARCH {
                *keep.lock().unwrap() = Some(message.clone());
            }
            vec![message]
        }));
    let (found, _) = alice.cards_of(&["bob".into()]).await.unwrap();
    assert_eq!(found["bob"].approved.len(), 1);
    let recorded = recorded.lock().unwrap().clone().unwrap();

    // 1. The inclusion proof left out, or altered.
    directory
        .control
        .set_tamper(hostile::rewrite::<SearchCardsResponse>(SEARCH, |r| {
            for record in r.results.iter_mut().flat_map(|r| r.cards.iter_mut()) {
                record.inclusion = None;
            }
        }));
    let err = refused_card(alice.cards_of(&["bob".into()]).await.unwrap_err());
    assert!(
        err.contains("inclusion proof does not verify: missing"),
        "{err}"
    );
    directory
        .control
        .set_tamper(hostile::rewrite::<SearchCardsResponse>(SEARCH, |r| {
            for record in r.results.iter_mut().flat_map(|r| r.cards.iter_mut()) {
                let proof = record.inclusion.as_mut().unwrap();
                assert!(!proof.hashes.is_empty());
                let mut first = proof.hashes[0].to_vec();
                first[0] ^= 1;
                proof.hashes[0] = first.into();
            }
        }));
    let err = refused_card(alice.cards_of(&["bob".into()]).await.unwrap_err());
    assert!(err.contains("inclusion proof does not verify"), "{err}");

    // 2. A card for bob with valid self, app and key-service signatures (the
    // attacker holds the AppKey and the key service's key) that was never
    // logged: only the log refuses it.
    let kms_key = keystore::load(&cluster.data_dir("kms").join("kms.key"), None)
        .unwrap()
        .into_signing()
        .unwrap();
    let mut forged = new_card("bob", "bob's other phone");
    app_sign(&mut forged, &app_key(&cluster));
    kms_sign(&mut forged, &kms_key);
    Verifier::new(cluster.keys.app, cluster.keys.kms)
        .verify(&forged, Some("bob"), CardKind::Client)
        .expect("every signature of the forgery verifies");
    directory
        .control
        .set_tamper(hostile::inject_card("bob".into(), forged));
    let err = refused_card(alice.cards_of(&["bob".into()]).await.unwrap_err());
    assert!(
        err.contains(
            "inclusion proof does not verify: hashes do not lead to the checkpoint's root"
        ),
        "{err}"
    );

    // 3. Rolled back: after alice saw a newer log, the directory answers with
    // the older (validly signed, consistent) checkpoint, hiding what came since.
    directory.control.set_tamper(hostile::honest());
    cluster.device("carol", "carol", true).await;
    alice
        .cards_of(&["bob".into(), "carol".into()])
        .await
        .unwrap();
    directory
        .control
        .set_tamper(Arc::new(move |method, message| {
            if method == SEARCH {
                vec![recorded.clone()]
            } else {
                vec![message]
            }
        }));
    let err = fork(alice.cards_of(&["bob".into()]).await.unwrap_err());
    assert!(err.contains("went back to"), "{err}");

    // 4. A newer checkpoint whose consistency proof does not hold.
    directory
        .control
        .set_tamper(hostile::rewrite::<GetConsistencyProofResponse>(
            "/tessera.kms.v1.KeyDirectory/GetConsistencyProof",
            |r| {
                let proof = r.proof.as_mut().unwrap();
                assert!(!proof.hashes.is_empty());
                proof.hashes[0][0] ^= 1;
            },
        ));
    cluster.device("dave", "dave", true).await;
    let err = fork(alice.cards_of(&["bob".into()]).await.unwrap_err());
    assert!(err.contains("consistency proof does not verify"), "{err}");

    // Honest again: all of it verifies.
    directory.control.set_tamper(hostile::honest());
    let (found, _) = alice
        .cards_of(&["bob".into(), "carol".into(), "dave".into()])
        .await
        .unwrap();
    assert_eq!(found.values().map(|d| d.approved.len()).sum::<usize>(), 3);
}

#[tokio::test]
async fn a_split_view_is_caught_when_users_compare_checkpoints() {
    let mut cluster = Cluster::start().await;
    let to_alice = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let to_bob = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let alice = behind_directory(&cluster, &to_alice, "alice", "alice").await;
    let bob = behind_directory(&cluster, &to_bob, "bob", "bob").await;
    // One log so far: their views agree both ways.
    alice.cards_of(&["bob".into()]).await.unwrap();
    let agreed = bob
        .compare_checkpoint(&alice.export_checkpoint().await.unwrap().exported)
        .await
        .unwrap();
    assert_eq!(agreed.mine.tree_size, agreed.theirs.tree_size);
    alice
        .compare_checkpoint(&bob.export_checkpoint().await.unwrap().exported)
        .await
        .unwrap();

    // The directory splits: bob is shown a copy of the log that grows apart
    // from the real one, signed with the same key.
    let clone = cluster.cloned_kms().await;
    to_bob.control.set_upstream(&clone.url()).unwrap();
    register(&cluster, &cluster.kms.url(), "carol").await;
    register(&cluster, &clone.url(), "mallory").await;
    // Each view is consistent with what each device saw before: neither
    // notices on its own.
    alice.cards_of(&["bob".into()]).await.unwrap();
    bob.cards_of(&["alice".into()]).await.unwrap();
    let (a, b) = (
        alice.export_checkpoint().await.unwrap(),
        bob.export_checkpoint().await.unwrap(),
    );
    assert_eq!(a.tree_size, b.tree_size, "same size");
    assert_ne!(a.root_hash, b.root_hash, "different logs");
    // Comparing catches it, both ways.
    let err = fork(alice.compare_checkpoint(&b.exported).await.unwrap_err());
    assert!(err.contains("two different roots"), "{err}");
    let err = fork(bob.compare_checkpoint(&a.exported).await.unwrap_err());
    assert!(err.contains("two different roots"), "{err}");

    // Different sizes: bob's copy grows further.
    register(&cluster, &clone.url(), "mallory").await;
    let b = bob.export_checkpoint().await.unwrap();
    assert_eq!(b.tree_size, a.tree_size + 1);
    let err = fork(alice.compare_checkpoint(&b.exported).await.unwrap_err());
    assert!(err.contains("whose latest for this device has"), "{err}");
    let err = fork(bob.compare_checkpoint(&a.exported).await.unwrap_err());
    assert!(err.contains("consistency proof does not verify"), "{err}");

    // The same through the CLI: `tessera checkpoint` on one side, `tessera
    // checkpoint --compare` on the other, exit code 6.
    let exported = cluster.run_cli("bob", &["--json", "checkpoint"]).await;
    assert!(exported.status.success(), "{exported:?}");
    let exported: serde_json::Value = serde_json::from_slice(&exported.stdout).unwrap();
    let out = cluster
        .run_cli(
            "alice",
            &[
                "checkpoint",
                "--compare",
                exported["checkpoint"].as_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("inconsistent with what this device saw before"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_directory_that_hides_a_contacts_cards_or_the_contact_is_refused() {
    let cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let alice = behind_directory(&cluster, &directory, "alice", "alice").await;
    let bob = cluster.device("bob", "bob", true).await;
    let (found, _) = alice.cards_of(&["bob".into()]).await.unwrap();
    assert_eq!(found["bob"].approved[0].id(), bob.card_id());

    // Bob's approved card left out of the answer (zero active cards): not
    // an empty contact to pin afresh, but a hidden device.
    directory
        .control
        .set_tamper(hostile::rewrite::<SearchCardsResponse>(SEARCH, |r| {
            for result in &mut r.results {
                result.cards.clear();
            }
        }));
    let err = alice.cards_of(&["bob".into()]).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Fork(m) if m.contains("left out") && m.contains("an approved active device of bob")),
        "{err}"
    );
    // Bob left out of the answer altogether: not "nobody to encrypt to".
    directory
        .control
        .set_tamper(hostile::rewrite::<SearchCardsResponse>(SEARCH, |r| {
            r.results.retain(|result| result.identity != "bob");
        }));
    let err = alice.cards_of(&["bob".into()]).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Fork(m) if m.contains("exactly the identities asked for")),
        "{err}"
    );

    // Honest again: the same card, and no event (the pin was never reset,
    // so the card does not count as new).
    directory.control.set_tamper(hostile::honest());
    let (found, events) = alice.cards_of(&["bob".into()]).await.unwrap();
    assert_eq!(found["bob"].approved[0].id(), bob.card_id());
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn a_revocation_without_a_valid_proof_is_refused() {
    let cluster = Cluster::start().await;
    let directory = Proxy::directory(&cluster.kms.url()).await.unwrap();
    let alice = behind_directory(&cluster, &directory, "alice", "alice").await;
    let bob0 = cluster.device("bob-0", "bob", true).await;
    let bob1 = cluster.approved_device("bob-1", &bob0).await;
    bob0.revoke_device(&bob1.card_id(), "lost", Some("bob-testkit-password"))
        .await
        .unwrap();
    let info = alice
        .card_by_id(&bob1.card_id(), "bob", CardKind::Client)
        .await
        .unwrap();
    assert_eq!(info.status, tessera_client::CardStatus::Revoked);

    // A record claiming the revocation without proving it was logged (its
    // inclusion proof left out, or altered): a directory could otherwise
    // date a revocation as it pleased, or show one that never happened.
    const GET_CARD: &str = "/tessera.kms.v1.KeyDirectory/GetCard";
    directory
        .control
        .set_tamper(hostile::rewrite::<CardResponse>(GET_CARD, |r| {
            if let Some(record) = r.record.as_mut() {
                record.revocation_inclusion = None;
            }
        }));
    let err = refused_card(
        alice
            .card_by_id(&bob1.card_id(), "bob", CardKind::Client)
            .await
            .unwrap_err(),
    );
    assert!(err.contains("the revocation's proof is missing"), "{err}");
    directory
        .control
        .set_tamper(hostile::rewrite::<CardResponse>(GET_CARD, |r| {
            if let Some(proof) = r
                .record
                .as_mut()
                .and_then(|record| record.revocation_inclusion.as_mut())
            {
                proof.leaf_index ^= 1;
            }
        }));
    let err = refused_card(
        alice
            .card_by_id(&bob1.card_id(), "bob", CardKind::Client)
            .await
            .unwrap_err(),
    );
    assert!(err.contains("inclusion proof does not verify"), "{err}");
}
