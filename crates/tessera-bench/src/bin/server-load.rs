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
//!
//! On PostgreSQL, `--replicas 1,2` runs the app server as that many
//! replicas in this process, on the one database (each its own listener
//! and its own LISTEN connection, as in production) and the one key
//! service: the subscribers are spread over them round-robin, and so are
//! the messages of the latency run and the senders of the throughput run.
//! A subscriber on another replica than the one a message was sent through
//! receives it through LISTEN/NOTIFY; the latency run reports those
//! deliveries apart. Each count gets a fresh database. Every acknowledged message
//! must reach every subscriber exactly once: missing and duplicate
//! deliveries are counted and printed for both runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark tool"
)]

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use tessera_bench::{
    Backend, closed_loop, database_server, durability, fresh_database, machine, percentile,
};
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
    /// Start the throwaway PostgreSQL server with `fsync=on` (durable
    /// commits, as in production).
    #[arg(long)]
    pg_fsync: bool,
    /// App-server replicas on the one database, each count measured in
    /// turn on a fresh database (more than 1: `postgres` only).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    replicas: Vec<usize>,
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

/// The first sequence number of the throughput run (the latency run's
/// are 1..=rate×seconds).
const THROUGHPUT_SEQ: u64 = 1_000_000;

/// What one subscriber received.
#[derive(Default)]
struct Received {
    /// Arrivals by sequence number.
    count: HashMap<u64, u32>,
    /// Send → first receipt, for the latency run's messages, and whether
    /// the message was sent through another replica than this
    /// subscriber's (so it came by LISTEN/NOTIFY).
    latencies: Vec<(Duration, bool)>,
}

/// What a subscriber received so far, shared with its task.
type Subscriber = Arc<Mutex<Received>>;

/// How the deliveries of a run's acknowledged sends went.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    expected: usize,
    delivered: usize,
    missing: usize,
    duplicates: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} deliveries, {} missing, {} duplicates",
            self.delivered, self.expected, self.missing, self.duplicates
        )
    }
}

/// Counts, over every subscriber, the deliveries of `acked`.
fn tally(subscribers: &[Subscriber], acked: &HashSet<u64>) -> Tally {
    let mut t = Tally {
        expected: acked.len() * subscribers.len(),
        ..Tally::default()
    };
    for s in subscribers {
        let received = s.lock().unwrap();
        for seq in acked {
            match received.count.get(seq).copied().unwrap_or(0) {
                0 => t.missing += 1,
                n => {
                    t.delivered += 1;
                    t.duplicates += n as usize - 1;
                }
            }
        }
    }
    t
}

/// Waits until every subscriber has every message of `acked`, or nothing
/// more arrived for 3 s (then what is missing is missing).
async fn settle(subscribers: &[Subscriber], acked: &HashSet<u64>) -> Tally {
    let mut last = tally(subscribers, acked);
    let mut still = Instant::now();
    loop {
        if last.missing == 0 || still.elapsed() > Duration::from_secs(3) {
            // A duplicate may still be on its way: a last look.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return tally(subscribers, acked);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tally(subscribers, acked);
        if now != last {
            still = Instant::now();
        }
        last = now;
    }
}

fn exit_with(message: &str) -> ! {
    eprintln!("server-load: {message}");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.replicas.contains(&0) {
        exit_with("--replicas: each count must be at least 1");
    }
    if args.replicas.iter().any(|&n| n > 1) && args.backends.contains(&Backend::Sled) {
        exit_with(
            "--replicas above 1 needs --backends postgres: app-server replicas share a \
             PostgreSQL database (on sled one process owns the database)",
        );
    }
    let (database, _throwaway) =
        database_server(&args.backends, args.database_url.as_deref(), args.pg_fsync)
            .unwrap_or_else(|e| exit_with(&e));
    for &backend in &args.backends {
        for &batch in &args.max_send_batch {
            for &replicas in &args.replicas {
                run(&args, backend, batch, replicas, database.as_deref()).await;
            }
        }
    }
}

/// Enrolls the devices on a fresh stack over `backend` with `replicas`
/// app servers, each storing sends in batches of at most `max_send_batch`,
/// then measures.
async fn run(
    args: &Args,
    backend: Backend,
    max_send_batch: usize,
    replicas: usize,
    database: Option<&str>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StackConfig::for_tests(dir.path().join("stack"));
    config.org_identity = None;
    config.server_max_send_batch = Some(max_send_batch);
    let mut store = backend.name().to_owned();
    if backend == Backend::Postgres {
        let server = database.expect("a PostgreSQL server");
        config.server_database = Some(PgOptions {
            url: fresh_database(server, "server_load").await.unwrap(),
            pool_size: 16,
        });
        store = format!("postgres ({})", durability(server).await.unwrap());
    }
    let mut stack = Stack::start(config).await.unwrap();
    let info = stack.info().clone();
    let mut urls = vec![info.server_url.clone()];
    for _ in 1..replicas {
        urls.push(stack.start_server_replica().await.unwrap());
    }
    let home = Home::new(dir.path().join("home"));
    eprintln!(
        "enrolling {} devices over {replicas} app server(s)...",
        args.devices
    );
    let mut clients = Vec::new();
    for i in 0..args.devices {
        let identity = format!("user{i}");
        let password = format!("{identity}-bench-password");
        // This stack runs without an organisation, so there is no backup
        // URL; device i reaches the app server through replica i mod n.
        let mut endpoints = info.endpoints();
        endpoints.server_url = urls[i % replicas].clone();
        clients.push(
            Client::enroll(
                &home,
                &identity,
                Enrollment {
                    endpoints,
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

    // Every device subscribes live (through its replica); each records
    // what it receives and, for the latency run, how long after the send.
    let sent_at: Arc<Mutex<HashMap<u64, (Instant, usize)>>> = Arc::default();
    let mut subscribers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut stream = c.subscribe_messages(&channel_id, 0).await.unwrap();
        let received: Arc<Mutex<Received>> = Arc::default();
        let replica = i % replicas;
        subscribers.push(received.clone());
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let now = Instant::now();
                let seq = u64::from_be_bytes(m.client_message_id[..8].try_into().unwrap());
                let sent = if seq < THROUGHPUT_SEQ {
                    sent_at.lock().unwrap().get(&seq).copied()
                } else {
                    None
                };
                let mut received = received.lock().unwrap();
                let count = received.count.entry(seq).or_default();
                *count += 1;
                if let (1, Some((t, through))) = (*count, sent) {
                    received.latencies.push((now - t, through != replica));
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "\nserver-load on {} — app server on {store} (sends stored in batches of at most {max_send_batch}), {replicas} replica(s), {} live devices on one channel, {} envelope {} bytes",
        machine(),
        args.devices,
        match args.envelope {
            Mode::Group => "group (sender keys)",
            Mode::Device => "per-device",
        },
        envelope.len()
    );
    // Latency at a fixed rate (open loop), message n sent through replica
    // n mod replicas.
    let mut through = vec![channel.clone()];
    for url in &urls[1..] {
        through.push(
            Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let total = args.rate * args.seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut pending = Vec::new();
    let start = Instant::now();
    for seq in 1..=total {
        ticker.tick().await;
        let replica = (seq as usize - 1) % replicas;
        sent_at
            .lock()
            .unwrap()
            .insert(seq, (Instant::now(), replica));
        pending.push((
            seq,
            tokio::spawn(send(ChannelsClient::new(through[replica].clone()), seq)),
        ));
    }
    let mut acked = HashSet::new();
    for (seq, p) in pending {
        if p.await.unwrap() {
            acked.insert(seq);
        }
    }
    let sending = start.elapsed();
    let delivered = settle(&subscribers, &acked).await;
    println!(
        "\nDelivery at {} msg/s for {} s: {delivered} ({} send errors), sent in {:.1} s",
        args.rate,
        args.seconds,
        total as usize - acked.len(),
        sending.as_secs_f64()
    );
    println!(
        "| send → receipt by each of {} devices | p50 | p99 | max |\n|---|---|---|---|",
        args.devices
    );
    let latencies = |on: &dyn Fn(bool) -> bool| {
        let mut all: Vec<Duration> = subscribers
            .iter()
            .flat_map(|s| s.lock().unwrap().latencies.clone())
            .filter(|(_, across)| on(*across))
            .map(|(latency, _)| latency)
            .collect();
        all.sort_unstable();
        all
    };
    let row = |what: &str, all: &[Duration]| {
        println!(
            "| {what} | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(all, 50.0).as_secs_f64() * 1e3,
            percentile(all, 99.0).as_secs_f64() * 1e3,
            all.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    };
    row(&format!("{} msg/s", args.rate), &latencies(&|_| true));
    if replicas > 1 {
        row(
            "subscriber on the replica the message was sent through",
            &latencies(&|across| !across),
        );
        row(
            "subscriber on another replica (LISTEN/NOTIFY)",
            &latencies(&|across| across),
        );
    }

    // Throughput: closed loop, subscribers still attached; the senders
    // spread over the replicas (worker w through replica w mod n).
    let channels: Vec<Vec<Channel>> = urls
        .iter()
        .map(|url| {
            (0..4)
                .map(|_| Channel::from_shared(url.clone()).unwrap().connect_lazy())
                .collect()
        })
        .collect();
    let next = Arc::new(AtomicU64::new(THROUGHPUT_SEQ));
    let acked: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let stats = {
        let acked = acked.clone();
        closed_loop(
            args.send_concurrency,
            Duration::from_secs(args.seconds),
            move |w, _| {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let replica = &channels[w % channels.len()];
                let sent = send(
                    ChannelsClient::new(replica[(w / channels.len()) % replica.len()].clone()),
                    seq,
                );
                let acked = acked.clone();
                async move {
                    let ok = sent.await;
                    if ok {
                        acked.lock().unwrap().insert(seq);
                    }
                    ok
                }
            },
        )
        .await
    };
    let acked = acked.lock().unwrap().clone();
    let delivered = settle(&subscribers, &acked).await;
    println!(
        "\n| call | concurrency | QPS | p50 | p99 | CPU per call |\n|---|---|---|---|---|---|"
    );
    println!(
        "{}",
        stats.row(&format!(
            "SendMessage {} batch ≤ {max_send_batch}, {replicas} replica(s) ({} live subscribers)",
            backend.name(),
            args.devices
        ))
    );
    println!("Deliveries of the acknowledged sends: {delivered}");
    stack.stop().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_missing_and_duplicate_deliveries_of_acknowledged_sends_only() {
        let subscriber = |counts: &[(u64, u32)]| -> Subscriber {
            Arc::new(Mutex::new(Received {
                count: counts.iter().copied().collect(),
                latencies: Vec::new(),
            }))
        };
        // 9 was delivered but never acknowledged: not counted.
        let subscribers = [
            subscriber(&[(1, 1), (2, 1), (3, 1), (9, 1)]),
            subscriber(&[(1, 1), (2, 3)]),
        ];
        let acked: HashSet<u64> = [1, 2, 3].into();
        assert_eq!(
            tally(&subscribers, &acked),
            Tally {
                expected: 6,
                delivered: 5,
                missing: 1,
                duplicates: 2,
            }
        );
    }
}
