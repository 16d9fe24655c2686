//! `cargo run --release -p tessera-bench --bin server-load`: message send
//! throughput, and end-to-end delivery latency from send to receipt by 100
//! live subscribed devices on one channel, at a fixed send rate. The stack
//! runs on loopback in this process. One envelope with a 1 KiB body is
//! sealed once and sent with fresh client message ids: this measures the
//! transport, not the sender's crypto, which `cargo bench -p
//! tessera-crypto` measures. The envelope is, by `--envelope`:
//!
//! * `group` (default): the sender's client sends one message, which makes
//!   its sender-key chain for the channel's epoch and stores a copy for
//!   every device with `PutSenderKeys` (once, before the runs); the runs
//!   send that group envelope (`ENVELOPE_KIND_GROUP`, docs/protocol.md
//!   section 15).
//! * `device`: a per-device envelope (section 4) with a real HPKE stanza
//!   for each device's card id, of the real size, sealed by this tool with
//!   throwaway keys (the client seals only group messages now, and the
//!   subscribers here measure receipt without opening).
//!
//! The app server keeps its data in sled in a temporary directory, or in
//! PostgreSQL (`--backends sled,postgres` measures both in one run, each on
//! a stack of its own, one after the other).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark tool"
)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use tessera_bench::{Backend, closed_loop, database_server, fresh_database, machine, percentile};
use tessera_client::{Client, Enrollment, Home, KdfParams, Visibility};
use tessera_crypto::{
    EncryptionSecret, SigningKey,
    envelope::{self, Draft, Epoch, Recipient, Sender},
};
use tessera_proto::server::v1::{
    EnvelopeKind, LoginRequest, SendMessageRequest, accounts_client::AccountsClient,
    channels_client::ChannelsClient,
};
use tessera_server::store::PgOptions;
use tessera_stack::{Stack, StackConfig};
use tonic::{Request, transport::Channel};

#[derive(Parser)]
struct Args {
    /// Live subscribed devices (one per user).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Messages per second for the latency run.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent senders for the throughput run.
    #[arg(long, default_value_t = 16)]
    send_concurrency: usize,
    /// What the messages are: group envelopes under a sender-key chain, or
    /// envelopes sealed to each device.
    #[arg(long, value_enum, default_value_t = Mode::Group)]
    envelope: Mode,
    /// Where the app server keeps its data, each measured in turn:
    /// `sled`, `postgres`.
    #[arg(long, value_delimiter = ',', default_value = "sled")]
    backends: Vec<Backend>,
    /// For `postgres`: a server URL without a database
    /// (`postgresql://user@host:port`) where the tool may create and drop
    /// the database `server_load`; without it, a throwaway server (the
    /// testkit's: the distribution's binaries, fsync off) is started.
    #[arg(long)]
    database_url: Option<String>,
    /// Most sends to one channel the app server stores together (group
    /// commit), each measured in turn: `--max-send-batch 256,1` compares
    /// batching with each send stored alone.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    max_send_batch: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Group,
    Device,
}

/// A per-device envelope with a 1 KiB body for every card of `cards`, from
/// `sender_card` of `user0`: real HPKE stanzas of the real size, to
/// throwaway X25519 keys and signed with a throwaway key (nobody opens it).
fn device_envelope(channel_id: &str, sender_card: [u8; 32], cards: &[[u8; 32]]) -> Vec<u8> {
    let signing = SigningKey::generate().unwrap();
    let keys: Vec<_> = cards
        .iter()
        .map(|_| EncryptionSecret::generate().unwrap().public_key())
        .collect();
    let recipients: Vec<Recipient<'_>> = cards
        .iter()
        .zip(&keys)
        .map(|(card_id, key)| Recipient {
            card_id: *card_id,
            key,
        })
        .collect();
    let body = "x".repeat(1024);
    envelope::seal(
        &Sender {
            identity: "user0",
            card_id: sender_card,
            key: &signing,
        },
        &Draft {
            channel_id,
            content_type: envelope::CONTENT_TYPE_TEXT,
            body: body.as_bytes(),
            sent_at_ms: 0,
            epoch: Some(Epoch {
                number: 0,
                hash: [0; 32],
            }),
        },
        &recipients,
    )
    .unwrap()
    .envelope
}

fn seq_id(seq: u64) -> Vec<u8> {
    let mut id = vec![0u8; 16];
    id[..8].copy_from_slice(&seq.to_be_bytes());
    id[8..].copy_from_slice(&tessera_crypto::random_array::<8>().unwrap());
    id
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (database, _throwaway) = database_server(&args.backends, args.database_url.as_deref());
    for &backend in &args.backends {
        for &batch in &args.max_send_batch {
            run(&args, backend, batch, database.as_deref()).await;
        }
    }
}

/// Enrolls the devices on a fresh stack over `backend`, then measures.
async fn run(args: &Args, backend: Backend, max_send_batch: usize, database: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StackConfig::for_tests(dir.path().join("stack"));
    config.org_identity = None;
    config.server_max_send_batch = Some(max_send_batch);
    if backend == Backend::Postgres {
        let server = database.expect("a PostgreSQL server");
        config.server_database = Some(PgOptions {
            url: fresh_database(server, "server_load").await.unwrap(),
            pool_size: 16,
        });
    }
    let stack = Stack::start(config).await.unwrap();
    let info = stack.info().clone();
    let home = Home::new(dir.path().join("home"));
    // This stack runs without an organisation, so there is no backup URL.
    let endpoints = info.endpoints();
    eprintln!("enrolling {} devices...", args.devices);
    let mut clients = Vec::new();
    for i in 0..args.devices {
        let identity = format!("user{i}");
        let password = format!("{identity}-bench-password");
        clients.push(
            Client::enroll(
                &home,
                &identity,
                Enrollment {
                    endpoints: endpoints.clone(),
                    identity: &identity,
                    password: &password,
                    sign_up: true,
                    device_name: "bench",
                    passphrase: b"bench",
                    kdf: KdfParams::DANGER_FAST_FOR_TESTS,
                    expected_app_key: Some(info.app_public_key),
                    expected_kms_key: Some(info.kms_public_key),
                    reset: false,
                },
            )
            .await
            .unwrap(),
        );
    }
    let members: Vec<String> = (1..args.devices).map(|i| format!("user{i}")).collect();
    let channel_id = clients[0]
        .create_channel("load", Visibility::Shared, &members)
        .await
        .unwrap()
        .channel_id;
    let sender_card = clients[0].card_id().to_vec();
    let (envelope, kind) = match args.envelope {
        Mode::Group => {
            // The client's first message makes its chain and stores the
            // copies for every device (PutSenderKeys) before sending.
            clients[0]
                .send_text(&channel_id, &"x".repeat(1024))
                .await
                .unwrap();
            let stored = clients[0]
                .stored_messages(&channel_id, 1, 1)
                .await
                .unwrap()
                .remove(0);
            assert_eq!(stored.kind, EnvelopeKind::Group as i32);
            (stored.envelope, EnvelopeKind::Group)
        }
        Mode::Device => {
            let cards: Vec<[u8; 32]> = clients.iter().map(|c| *c.card_id().as_bytes()).collect();
            let sender = *clients[0].card_id().as_bytes();
            (
                device_envelope(&channel_id, sender, &cards),
                EnvelopeKind::Device,
            )
        }
    };
    let channel = Channel::from_shared(info.server_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let login = AccountsClient::new(channel.clone())
        .login(LoginRequest {
            identity: "user0".into(),
            password: "user0-bench-password".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let token = format!("Bearer {}", hex::encode(login.access_token));
    let send = {
        let (envelope, sender_card, token, channel_id) = (
            envelope.clone(),
            sender_card.clone(),
            token.clone(),
            channel_id.clone(),
        );
        move |client: ChannelsClient<Channel>, seq: u64| {
            let mut r = Request::new(SendMessageRequest {
                channel_id: channel_id.clone(),
                client_message_id: seq_id(seq),
                sender_card_id: sender_card.clone(),
                envelope: envelope.clone(),
                // The channel's chain is its creation alone.
                epoch: 0,
                kind: kind as i32,
            });
            r.metadata_mut()
                .insert("authorization", token.parse().unwrap());
            let mut client = client;
            async move { client.send_message(r).await.is_ok() }
        }
    };

    // Every device subscribes live; receipt times are recorded per (seq, device).
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut streams = Vec::new();
    for c in &clients {
        streams.push(c.subscribe_messages(&channel_id, 0).await.unwrap());
    }
    for mut stream in streams {
        let (sent_at, latencies) = (sent_at.clone(), latencies.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let now = Instant::now();
                let seq = u64::from_be_bytes(m.client_message_id[..8].try_into().unwrap());
                if let Some(t) = sent_at.lock().unwrap().get(&seq) {
                    latencies.lock().unwrap().push(now - *t);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "\nserver-load on {} — app server on {} (sends stored in batches of at most {}), {} live devices on one channel, {} envelope {} bytes",
        machine(),
        backend.name(),
        max_send_batch,
        args.devices,
        match args.envelope {
            Mode::Group => "group (sender keys)",
            Mode::Device => "per-device",
        },
        envelope.len()
    );
    // Latency at a fixed rate (open loop).
    let total = args.rate * args.seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut pending = Vec::new();
    let start = Instant::now();
    for seq in 1..=total {
        ticker.tick().await;
        sent_at.lock().unwrap().insert(seq, Instant::now());
        pending.push(tokio::spawn(send(
            ChannelsClient::new(channel.clone()),
            seq,
        )));
    }
    let mut send_errors = 0;
    for p in pending {
        if !p.await.unwrap() {
            send_errors += 1;
        }
    }
    let sending = start.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut all = latencies.lock().unwrap().clone();
    all.sort_unstable();
    let expected = total as usize * args.devices;
    println!(
        "\nDelivery at {} msg/s for {} s: {} of {} deliveries ({} send errors), sent in {:.1} s",
        args.rate,
        args.seconds,
        all.len(),
        expected,
        send_errors,
        sending.as_secs_f64()
    );
    println!(
        "| send → receipt by each of {} devices | p50 | p99 | max |\n|---|---|---|---|",
        args.devices
    );
    println!(
        "| {} msg/s | {:.2} ms | {:.2} ms | {:.2} ms |",
        args.rate,
        percentile(&all, 50.0).as_secs_f64() * 1e3,
        percentile(&all, 99.0).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );

    // Throughput: closed loop, subscribers still attached.
    latencies.lock().unwrap().clear();
    let channels: Vec<Channel> = (0..4)
        .map(|_| {
            Channel::from_shared(info.server_url.clone())
                .unwrap()
                .connect_lazy()
        })
        .collect();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
    let stats = closed_loop(
        args.send_concurrency,
        Duration::from_secs(args.seconds),
        move |w, _| {
            let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            send(
                ChannelsClient::new(channels[w % channels.len()].clone()),
                seq,
            )
        },
    )
    .await;
    println!(
        "\n| call | concurrency | QPS | p50 | p99 | CPU per call |\n|---|---|---|---|---|---|"
    );
    println!(
        "{}",
        stats.row(&format!(
            "SendMessage {} batch ≤ {} ({} live subscribers)",
            backend.name(),
            max_send_batch,
            args.devices
        ))
    );
    stack.stop().await;
}
