//! Message attacks through a hostile relay (a proxy in front of the real app
//! server): tampering, a dropped stanza, a replay, a relabelled sender, a
//! message moved to another channel. Each is rejected.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tessera_client::Visibility;
use tessera_proto::{
    Message as _,
    envelope::v1::{GroupEnvelope, GroupHeader},
    server::v1::StoredMessage,
};
use tessera_stack::hostile::{self, Proxy};
use tessera_testkit::Cluster;

use crate::{behind_relay, text};

fn refused(page: &tessera_client::HistoryPage, index: u64) -> String {
    let (_, r) = page.messages.iter().find(|(i, _)| *i == index).unwrap();
    match r {
        Err(e) => e.to_string(),
        Ok(m) => panic!("message {index} was accepted: {:?}", m.content),
    }
}

#[tokio::test]
async fn hostile_relay_attacks_are_rejected() {
    let cluster = Cluster::start().await;
    let relay = Proxy::relay(&cluster.server.url()).await.unwrap();
    let alice = cluster.device("alice", "alice", true).await;
    cluster.device("carol", "carol", true).await;
    let bob = behind_relay(&cluster, &relay, "bob", "bob").await;
    let c1 = alice
        .create_channel("one", Visibility::Shared, &["bob".into(), "carol".into()])
        .await
        .unwrap()
        .channel_id;
    let c2 = alice
        .create_channel("two", Visibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;
    alice.send_text(&c1, "first").await.unwrap();
    alice.send_text(&c1, "second").await.unwrap();
    alice.send_text(&c2, "elsewhere").await.unwrap();
    let honest = bob.history(&c1, 0, 10, false).await.unwrap();
    assert_eq!(text(honest.messages[1].1.as_ref().unwrap()), "second");
    let first_of_c1: StoredMessage = alice.stored_messages(&c1, 1, 1).await.unwrap().remove(0);

    // 1. A flipped bit.
    relay.control.set_tamper(hostile::rewrite_messages(|m| {
        let n = m.envelope.len();
        m.envelope[n - 1] ^= 0x20;
    }));
    let err = refused(&bob.history(&c1, 0, 10, false).await.unwrap(), 1);
    assert!(err.contains("does not authenticate"), "{err}");

    // 2. The header altered (the generation moved on), re-encoded: its
    // key commitment is the other generation's.
    relay.control.set_tamper(hostile::rewrite_messages(|m| {
        let mut env = GroupEnvelope::decode(m.envelope.as_slice()).unwrap();
        let mut header = GroupHeader::decode(env.header.as_slice()).unwrap();
        header.generation += 1;
        env.header = header.encode_to_vec();
        m.envelope = env.encode_to_vec();
    }));
    let page = bob.history(&c1, 0, 10, false).await.unwrap();
    assert_eq!(
        page.messages.len(),
        2,
        "both messages delivered, both refused"
    );
    for (_, r) in page.messages {
        let err = r.unwrap_err().to_string();
        assert!(err.contains("key commitment"), "{err}");
    }

    // 3. A replay: message 1 delivered again as message 2.
    let replayed = first_of_c1.clone();
    relay
        .control
        .set_tamper(hostile::rewrite_messages(move |m| {
            if m.index == 2 && m.channel_id == replayed.channel_id {
                *m = StoredMessage {
                    index: 2,
                    ..replayed.clone()
                };
            }
        }));
    let err = refused(&bob.history(&c1, 0, 10, false).await.unwrap(), 2);
    assert!(
        err.contains("replay of a message already received as message 1"),
        "{err}"
    );

    // 4. The sender relabelled.
    relay.control.set_tamper(hostile::rewrite_messages(|m| {
        m.sender_identity = "carol".into()
    }));
    let err = refused(&bob.history(&c1, 0, 10, false).await.unwrap(), 1);
    assert!(err.contains("belongs to \"alice\", not \"carol\""), "{err}");

    // 5. A message of channel one moved into channel two.
    let moved = first_of_c1.clone();
    let target = c2.clone();
    relay
        .control
        .set_tamper(hostile::rewrite_messages(move |m| {
            if m.channel_id == target {
                *m = StoredMessage {
                    channel_id: target.clone(),
                    index: m.index,
                    ..moved.clone()
                };
            }
        }));
    let err = refused(&bob.history(&c2, 0, 10, false).await.unwrap(), 1);
    assert!(err.contains("moved by the relay"), "{err}");

    // The live stream is checked the same way.
    let seen = Arc::new(Mutex::new(0));
    let counter = seen.clone();
    relay
        .control
        .set_tamper(hostile::rewrite_messages(move |m| {
            *counter.lock().unwrap() += 1;
            m.envelope[10] ^= 0xff;
        }));
    let mut live = bob.subscribe_messages(&c1, 0).await.unwrap();
    alice.send_text(&c1, "live").await.unwrap();
    let stored = tokio::time::timeout(std::time::Duration::from_secs(20), live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stored.index, 3);
    let err = bob.open_message(&stored).await.unwrap_err().to_string();
    assert!(
        err.contains("message 3") && err.contains("refused"),
        "the live message was not refused as tampered: {err}"
    );
    assert_eq!(*seen.lock().unwrap(), 1);

    // Without the attacker everything reads again.
    relay.control.set_tamper(hostile::honest());
    let page = bob.history(&c1, 0, 10, false).await.unwrap();
    let read: Vec<&str> = page
        .messages
        .iter()
        .map(|(i, r)| text(r.as_ref().unwrap_or_else(|e| panic!("message {i}: {e}"))))
        .collect();
    assert_eq!(read, ["first", "second", "live"]);
}
