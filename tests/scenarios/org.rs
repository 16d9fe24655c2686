//! The seed's org backup (steps 3–4) and both history-sync options: the app
//! server re-sending stored EncMsgs, and the organisation re-encrypting
//! OrgEncMsgs for a device enrolled later.

use tessera_client::{Source, Visibility};
use tessera_testkit::Cluster;

use crate::text;

#[tokio::test]
async fn org_backup_and_both_history_sync_options() {
    let cluster = Cluster::start().await;
    let admin = cluster.admin().await;
    let alice = cluster.device("alice-0", "alice", true).await;
    let bob0 = cluster.device("bob-0", "bob", true).await;
    cluster.approved_device("bob-1", &bob0).await;
    admin.set_org_member("bob", true).await.unwrap();
    let bob0 = cluster.reopen("bob-0");
    let bob1 = cluster.reopen("bob-1");
    assert!(bob0.is_org_member().await.unwrap());

    let channel = alice
        .create_channel("contract", Visibility::Shared, &["bob".into()])
        .await
        .unwrap();
    let lines = ["clause 1", "clause 2", "clause 3"];
    for line in lines {
        alice.send_text(&channel.channel_id, line).await.unwrap();
    }
    // Each is one group envelope under alice's sender-key chain: the
    // archive binds its records to those (protocol.md section 15).
    let stored = alice
        .stored_messages(&channel.channel_id, 1, 10)
        .await
        .unwrap();
    assert!(
        stored
            .iter()
            .all(|m| m.kind == tessera_proto::server::v1::EnvelopeKind::Group as i32)
    );
    // Steps 3-4: bob's device decrypts, re-encrypts to the OrgCard, sends.
    let page = bob0
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), lines.len());
    for (_, r) in page.messages {
        assert!(bob0.back_up(&r.unwrap()).await.unwrap());
    }
    // Option 1: the app server re-sends the stored EncMsgs to an existing device.
    let page = bob1
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    let got: Vec<String> = page
        .messages
        .iter()
        .map(|(_, r)| text(r.as_ref().unwrap()).to_owned())
        .collect();
    assert_eq!(got, lines);

    // Option 2: a device enrolled afterwards could not read the originals...
    let bob_new = cluster.approved_device("bob-new", &bob0).await;
    let page = bob_new
        .history(&channel.channel_id, 0, 10, false)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), lines.len());
    for (i, r) in page.messages {
        let err = r.expect_err("the originals were not encrypted to the new device");
        assert!(
            err.to_string().contains("not encrypted to this device"),
            "message {i}: {err}"
        );
    }
    // ...and reads them all from the organisation, verified twice over.
    let synced = bob_new
        .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.len(), 3);
    for (entry, line) in synced.iter().zip(lines) {
        let r = entry.result.as_ref().unwrap();
        assert_eq!(text(r), line);
        assert_eq!(r.source, Source::Organisation);
        assert_eq!(
            r.sender_card_id,
            alice.card_id(),
            "the original sender's signature, not the org's"
        );
    }
}
