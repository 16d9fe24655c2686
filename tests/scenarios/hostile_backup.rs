//! A hostile backup service (a proxy in front of the real one, rewriting
//! what it answers): a forged OrgCard id, and history that is tampered with,
//! reordered, repeated, replayed from an earlier answer, cut short, or taken
//! from another channel. The client refuses each.

use std::sync::{Arc, Mutex};

use tessera_client::{ClientError, Endpoints, HistoryEntry};
use tessera_proto::{
    Message as _,
    backup::v1::{GetOrgInfoResponse, SyncHistoryItem},
};
use tessera_stack::hostile::{self, Proxy, Tamper};
use tessera_testkit::Cluster;

use crate::{alice_and_org_member_bob, channel, text};

const SYNC: &str = "/tessera.backup.v1.Backup/SyncHistory";

/// Rewrites the items of every history sync answer, one at a time: `f` gets
/// each item and returns the items to send instead.
fn sync_items(
    f: impl Fn(SyncHistoryItem) -> Vec<SyncHistoryItem> + Send + Sync + 'static,
) -> Tamper {
    Arc::new(move |method, message| {
        if method != SYNC {
            return vec![message];
        }
        let item = SyncHistoryItem::decode(message.as_slice()).unwrap();
        f(item).into_iter().map(|i| i.encode_to_vec()).collect()
    })
}

/// Passes answers through and keeps a copy of every item.
fn recording(into: Arc<Mutex<Vec<SyncHistoryItem>>>) -> Tamper {
    sync_items(move |item| {
        into.lock().unwrap().push(item.clone());
        vec![item]
    })
}

fn history_refused(result: Result<Vec<HistoryEntry>, ClientError>) -> String {
    match result {
        Err(e @ ClientError::History { .. }) => e.to_string(),
        Err(other) => panic!("expected the history to be refused, got: {other}"),
        Ok(entries) => panic!("the history was accepted: {entries:?}"),
    }
}

fn entry_refused(entries: &[HistoryEntry], index: u64) -> String {
    let entry = entries.iter().find(|e| e.index == index).unwrap();
    match &entry.result {
        Err(e) => e.to_string(),
        Ok(r) => panic!("message {index} was accepted: {r:?}"),
    }
}

fn texts(entries: &[HistoryEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| match &e.result {
            Ok(r) => text(r).to_owned(),
            Err(err) => panic!("message {} refused: {err}", e.index),
        })
        .collect()
}

#[tokio::test]
async fn a_hostile_backup_service_is_caught() {
    let cluster = Cluster::start().await;
    let (alice, bob) = alice_and_org_member_bob(&cluster).await;
    let mut channels = Vec::new();
    let mut from_server = Vec::new();
    for (name, lines) in [("a", vec!["a1", "a2", "a3"]), ("b", vec!["b1", "b2"])] {
        let id = channel(&alice, name, &["bob"]).await;
        for line in lines {
            alice.send_text(&id, line).await.unwrap();
        }
        let page = bob.history(&id, 0, 10, false).await.unwrap();
        for (i, r) in &page.messages {
            let r = r.as_ref().unwrap_or_else(|e| panic!("message {i}: {e}"));
            assert!(bob.back_up(r).await.unwrap(), "message {i} archived");
            from_server.push(r.clone());
        }
        channels.push(id);
    }
    let (a, b) = (channels[0].clone(), channels[1].clone());

    // Bob's tablet reaches the backup service only through the attacker.
    let proxy = Proxy::backup(&cluster.backup.url()).await.unwrap();
    let behind = Endpoints {
        backup_url: Some(proxy.url()),
        ..cluster.endpoints()
    };
    let tablet = cluster
        .device_with("bob-tablet", "bob", false, behind)
        .await;
    tessera_testkit::approve(&bob, &tablet).await;
    // Honest: recorded for the replays below.
    let answer_a = Arc::new(Mutex::new(Vec::new()));
    proxy.control.set_tamper(recording(answer_a.clone()));
    let honest = tablet.sync_from_org(&a, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(texts(&honest), ["a1", "a2", "a3"]);
    let answer_b = Arc::new(Mutex::new(Vec::new()));
    proxy.control.set_tamper(recording(answer_b.clone()));
    let honest_b = tablet.sync_from_org(&b, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(texts(&honest_b), ["b1", "b2"]);
    let answer_a: Vec<SyncHistoryItem> = answer_a.lock().unwrap().clone();
    let answer_b: Vec<SyncHistoryItem> = answer_b.lock().unwrap().clone();
    assert_eq!(answer_a.len(), 4, "three messages and the signed end");

    // 1. A forged OrgCard id: a real card, but a device's, not the organisation's.
    let device_card = tablet.card_id().to_vec();
    proxy
        .control
        .set_tamper(hostile::rewrite::<GetOrgInfoResponse>(
            "/tessera.backup.v1.Backup/GetOrgInfo",
            move |info| info.org_card_id = device_card.clone(),
        ));
    let fooled = cluster.reopen("bob-tablet");
    for err in [
        fooled.sync_from_org(&a, 0, 0, |_, _| {}).await.unwrap_err(),
        fooled.back_up(&from_server[0]).await.unwrap_err(),
    ] {
        assert!(
            matches!(err, ClientError::CardRejected { .. }) && err.to_string().contains("org:test"),
            "a device card passed for the OrgCard: {err}"
        );
    }
    // ...and an id no card has.
    proxy
        .control
        .set_tamper(hostile::rewrite::<GetOrgInfoResponse>(
            "/tessera.backup.v1.Backup/GetOrgInfo",
            |info| info.org_card_id = vec![0x42; 32],
        ));
    let err = cluster
        .reopen("bob-tablet")
        .sync_from_org(&a, 0, 0, |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    // 2. A tampered message: that message is refused, the others stand.
    proxy.control.set_tamper(sync_items(|mut item| {
        if item.message_index == 2 {
            let n = item.envelope.len();
            item.envelope[n - 1] ^= 0x01;
        }
        vec![item]
    }));
    let entries = tablet.sync_from_org(&a, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(entries.len(), 3);
    let err = entry_refused(&entries, 2);
    assert!(err.contains("does not authenticate"), "{err}");
    // A tampered end: the whole answer is refused.
    proxy.control.set_tamper(sync_items(|mut item| {
        if item.message_index == 0 {
            let n = item.envelope.len();
            item.envelope[n - 1] ^= 0x01;
        }
        vec![item]
    }));
    let err = history_refused(tablet.sync_from_org(&a, 0, 0, |_, _| {}).await);
    assert!(err.contains("signed end"), "{err}");

    // 3. Reordered: message 2 before message 1.
    let held = Arc::new(Mutex::new(None));
    proxy
        .control
        .set_tamper(sync_items(move |item| match item.message_index {
            1 => {
                *held.lock().unwrap() = Some(item);
                vec![]
            }
            2 => vec![item, held.lock().unwrap().take().unwrap()],
            _ => vec![item],
        }));
    let err = history_refused(tablet.sync_from_org(&a, 0, 0, |_, _| {}).await);
    assert!(err.contains("reordered or repeated"), "{err}");

    // 4. Repeated: message 2 twice.
    proxy.control.set_tamper(sync_items(|item| {
        if item.message_index == 2 {
            vec![item.clone(), item]
        } else {
            vec![item]
        }
    }));
    let err = history_refused(tablet.sync_from_org(&a, 0, 0, |_, _| {}).await);
    assert!(err.contains("reordered or repeated"), "{err}");

    // 5. Replayed: the whole recorded answer instead of a fresh one (as a
    // service hiding what was archived since would do).
    let recorded = answer_a.clone();
    let position = Arc::new(Mutex::new(0usize));
    proxy.control.set_tamper(sync_items(move |_| {
        let mut at = position.lock().unwrap();
        *at += 1;
        recorded.get(*at - 1).cloned().into_iter().collect()
    }));
    let err = history_refused(tablet.sync_from_org(&a, 0, 0, |_, _| {}).await);
    assert!(err.contains("replayed"), "{err}");

    // 6. Cut short: without the signed end, or without its last message.
    proxy.control.set_tamper(sync_items(|item| {
        if item.message_index == 0 {
            vec![]
        } else {
            vec![item]
        }
    }));
    let err = history_refused(tablet.sync_from_org(&a, 0, 0, |_, _| {}).await);
    assert!(err.contains("cut short"), "{err}");
    proxy.control.set_tamper(sync_items(|item| {
        if item.message_index == 3 {
            vec![]
        } else {
            vec![item]
        }
    }));
    let err = history_refused(tablet.sync_from_org(&a, 0, 0, |_, _| {}).await);
    assert!(err.contains("sent 3 message(s) and 2 arrived"), "{err}");

    // 7. History of another channel passed off as this one's.
    let from_b = answer_b.clone();
    proxy.control.set_tamper(sync_items(move |item| {
        match from_b
            .iter()
            .find(|b| b.message_index == item.message_index && item.message_index != 0)
        {
            Some(b) => vec![b.clone()],
            None => vec![item],
        }
    }));
    let entries = tablet.sync_from_org(&a, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(entries.len(), 3);
    for index in [1, 2] {
        let err = entry_refused(&entries, index);
        assert!(
            err.contains("not history of this channel"),
            "{index}: {err}"
        );
    }
    assert_eq!(text(entries[2].result.as_ref().unwrap()), "a3");

    // Honest again: everything verifies.
    proxy.control.set_tamper(hostile::honest());
    let entries = tablet.sync_from_org(&a, 0, 0, |_, _| {}).await.unwrap();
    assert_eq!(texts(&entries), ["a1", "a2", "a3"]);
}
