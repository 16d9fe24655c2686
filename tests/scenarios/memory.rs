//! Memory under worst-case calls: the app server process, full of the
//! largest envelopes, answers 10 parallel `ListMessages` of the largest page
//! and 10 parallel subscriptions that catch up from the first message and
//! are never read, and its resident memory stays under a stated bound
//! (measured from `/proc/<pid>/status`: the peak, `VmHWM`, reset just
//! before the calls).

use futures_util::future::join_all;
use tessera_client::Visibility;
use tessera_proto::{
    Message as _,
    envelope::v1::{Envelope, EnvelopeHeader, Stanza},
    server::v1::{
        Direction, ListMessagesRequest, SendMessageRequest, SubscribeRequest, channel_event,
        channels_client::ChannelsClient,
    },
};
use tessera_testkit::Cluster;
use tonic::{Request, transport::Channel};

use crate::{connect, user_tokens};

/// Envelopes stored: 48 of the largest size, ~96 MiB of history.
const MESSAGES: usize = 48;
/// Just under the app server's 2 MiB envelope limit.
const ENVELOPE_BYTES: usize = 2 * 1024 * 1024 - 1024;
/// The bound on the peak resident memory while the 20 calls run, above
/// what the process held just before them.
const BOUND_ABOVE_START_MIB: u64 = 192;

fn with_token<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", token.parse().unwrap());
    r
}

fn channels(channel: Channel) -> ChannelsClient<Channel> {
    ChannelsClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(4 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_parallel_worst_case_calls_keep_the_app_server_under_its_memory_bound() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    let channel_id = alice
        .create_channel("big", Visibility::Shared, &[])
        .await
        .unwrap()
        .channel_id;
    let token = user_tokens(&cluster, "alice").await.server;
    let card = alice.card_id().to_vec();
    let mut client = channels(connect(&cluster.server.url()).await);
    for n in 0..MESSAGES {
        // The server never opens an envelope: a well-formed header around
        // opaque bytes is the largest thing it stores.
        let envelope = Envelope {
            header: EnvelopeHeader {
                version: 1,
                sender_card_id: card.clone(),
                stanzas: vec![Stanza {
                    card_id: card.clone(),
                    encapsulated_key: vec![1; 32],
                    wrapped_key: vec![2; 48],
                }],
            }
            .encode_to_vec(),
            ciphertext: vec![n as u8; ENVELOPE_BYTES],
        }
        .encode_to_vec();
        let mut client_message_id = vec![0u8; 16];
        client_message_id[0] = n as u8;
        client
            .send_message(with_token(
                &token,
                SendMessageRequest {
                    channel_id: channel_id.clone(),
                    client_message_id,
                    sender_card_id: card.clone(),
                    envelope,
                    // The chain is the creation alone.
                    epoch: 0,
                    kind: 0,
                },
            ))
            .await
            .unwrap();
    }

    let start = cluster.server.memory().unwrap();
    assert!(cluster.server.reset_peak_memory(), "cannot reset VmHWM");
    let url = cluster.server.url();
    let lists = (0..10).map(|_| {
        let (url, token, channel_id) = (url.clone(), token.clone(), channel_id.clone());
        async move {
            let mut client = channels(connect(&url).await);
            client
                .list_messages(with_token(
                    &token,
                    ListMessagesRequest {
                        channel_id,
                        anchor: 0,
                        page_size: 500,
                        direction: Direction::Forward as i32,
                    },
                ))
                .await
                .map(|page| page.into_inner().messages.len())
        }
    });
    let subscriptions = (0..10).map(|_| {
        let (url, token, channel_id) = (url.clone(), token.clone(), channel_id.clone());
        async move {
            let mut client = channels(connect(&url).await);
            let mut stream = client
                .subscribe(with_token(
                    &token,
                    SubscribeRequest {
                        channel_id,
                        from_index: 1,
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            // One message proves the catch-up runs; the rest is left unread.
            let first = loop {
                let event = stream.message().await.unwrap().unwrap();
                if let Some(channel_event::Event::Message(m)) = event.event {
                    break m.index;
                }
            };
            (first, stream)
        }
    });
    let (pages, subscribed) = tokio::join!(join_all(lists), join_all(subscriptions));
    let peak = cluster.server.memory().unwrap();
    for (first, _) in &subscribed {
        assert_eq!(*first, 1);
    }
    let above_mib = peak.peak_rss_kib.saturating_sub(start.rss_kib) / 1024;
    println!(
        "app server: {} MiB resident before, peak {} MiB during 10 ListMessages + 10 unread subscriptions ({above_mib} MiB above); pages: {pages:?}",
        start.rss_kib / 1024,
        peak.peak_rss_kib / 1024
    );
    assert!(
        above_mib <= BOUND_ABOVE_START_MIB,
        "peak {above_mib} MiB above the start, bound {BOUND_ABOVE_START_MIB} MiB"
    );
    for page in pages {
        let n = page.expect("a page within the response limit");
        assert!(
            (1..MESSAGES).contains(&n),
            "a page bounded by bytes, not by count: {n}"
        );
    }
    drop(subscribed);
}
