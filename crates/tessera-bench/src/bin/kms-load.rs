//! `cargo run --release -p tessera-bench --bin kms-load`: SearchCards and
//! RegisterCard throughput and latency at several concurrencies with 1 k and
//! 100 k registered cards, beside a bare tonic echo service measured by the
//! same tool in the same run. Everything runs on loopback in this process,
//! the key service over sled in a temporary directory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark tool"
)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use tessera_bench::{EchoService, Stats, closed_loop, machine};
use tessera_card::{CardKind, NewCard, app_sign};
use tessera_crypto::{DeviceKeys, SigningKey};
use tessera_kms::{Config, DEFAULT_MAX_REQUEST_BYTES, Kms, Limits};
use tessera_proto::{
    bench::v1::{EchoMessage, echo_client::EchoClient, echo_server::EchoServer},
    kms::v1::{RegisterCardRequest, SearchCardsRequest, key_directory_client::KeyDirectoryClient},
};
use tessera_service::{
    TokenIssuer,
    serve::{Running, ServeOptions, bind},
    token::{Audience, AuthMethod, Grant, bearer_header},
};
use tonic::{Request, service::Routes, transport::Channel};

#[derive(Parser)]
struct Args {
    /// Directory sizes (registered cards) to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    sizes: Vec<u64>,
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Which calls to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "echo,echo-large,search,register"
    )]
    calls: Vec<String>,
}

/// One row of the closing summary: search against the echoes.
struct Ratio {
    size: u64,
    concurrency: usize,
    to_echo: Option<f64>,
    to_same_size_echo: Option<f64>,
    p99_ms: f64,
}

struct Load {
    kms: Vec<KeyDirectoryClient<Channel>>,
    echo: Vec<EchoClient<Channel>>,
    app: SigningKey,
    service_token: String,
    user_token: String,
    /// Cards registered so far (identity `user<n / 2>`: two cards each).
    next_card: AtomicU64,
}

fn with<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", token.parse().unwrap());
    r
}

impl Load {
    async fn register(&self, worker: usize) -> bool {
        let n = self.next_card.fetch_add(1, Ordering::Relaxed);
        let identity = format!("user{}", n / 2);
        let mut card = NewCard {
            identity: &identity,
            kind: CardKind::Client,
            device_name: "bench device",
            created_at: n as i64,
            previous_card_id: None,
        }
        .self_signed(&DeviceKeys::generate().unwrap())
        .unwrap();
        app_sign(&mut card, &self.app);
        let mut client = self.kms[worker % self.kms.len()].clone();
        client
            .register_card(with(
                &self.service_token,
                RegisterCardRequest { card: Some(card) },
            ))
            .await
            .is_ok()
    }

    async fn search(&self, worker: usize, seq: u64, size: u64) -> bool {
        // A cheap spread over every registered identity.
        let pick = (seq
            .wrapping_mul(2_654_435_761)
            .wrapping_add(worker as u64 * 97))
            % (size / 2).max(1);
        let mut client = self.kms[worker % self.kms.len()].clone();
        let r = client
            .search_cards(with(
                &self.user_token,
                SearchCardsRequest {
                    identities: vec![format!("user{pick}")],
                    kind: 0,
                    device_list_from: Default::default(),
                },
            ))
            .await;
        matches!(r, Ok(r) if r.get_ref().results.first().is_some_and(|x| !x.cards.is_empty()))
    }

    /// A 32-byte echo; with `answer_bytes`, answered with that many bytes.
    async fn echo(&self, worker: usize, answer_bytes: u32) -> bool {
        let mut client = self.echo[worker % self.echo.len()].clone();
        client
            .echo(EchoMessage {
                payload: vec![7; 32],
                answer_bytes,
            })
            .await
            .is_ok()
    }

    /// Encoded size of one search answer at this directory size.
    async fn search_answer_bytes(&self) -> u32 {
        use tessera_proto::Message as _;
        let mut client = self.kms[0].clone();
        let r = client
            .search_cards(with(
                &self.user_token,
                SearchCardsRequest {
                    identities: vec!["user0".into()],
                    kind: 0,
                    device_list_from: Default::default(),
                },
            ))
            .await
            .expect("search for user0");
        r.get_ref().encoded_len() as u32
    }
}

async fn preload(load: &Arc<Load>, target: u64) {
    let start = Instant::now();
    let from = load.next_card.load(Ordering::Relaxed);
    let mut workers = Vec::new();
    for w in 0..64 {
        let load = load.clone();
        workers.push(tokio::spawn(async move {
            while load.next_card.load(Ordering::Relaxed) < target {
                assert!(load.register(w).await, "registration failed during preload");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let n = load.next_card.load(Ordering::Relaxed) - from;
    eprintln!(
        "preloaded {n} cards in {:.1} s ({:.0}/s)",
        start.elapsed().as_secs_f64(),
        n as f64 / start.elapsed().as_secs_f64()
    );
}

async fn connect(url: &str, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Channel::from_shared(url.to_owned())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let app = SigningKey::generate().unwrap();
    let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(3600));
    let kms = Kms::open(&Config {
        data_dir: dir.path().join("kms"),
        key_path: None,
        app_public_key: app.verifying_key(),
        token_public_key: issuer.public_key(),
        limits: Limits::default(),
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
    })
    .unwrap();
    let kms_running = Running::spawn(
        kms.routes().await.unwrap(),
        bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
        ServeOptions::default(),
    )
    .unwrap();
    let echo_running = Running::spawn(
        Routes::new(EchoServer::new(EchoService)),
        bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
        ServeOptions::default(),
    )
    .unwrap();
    let load = Arc::new(Load {
        kms: connect(&kms_running.url(), args.connections)
            .await
            .into_iter()
            .map(KeyDirectoryClient::new)
            .collect(),
        echo: connect(&echo_running.url(), args.connections)
            .await
            .into_iter()
            .map(EchoClient::new)
            .collect(),
        app,
        service_token: bearer_header(
            &issuer
                .issue(&Grant::service("tessera-server"), Audience::Kms)
                .unwrap()
                .bytes,
        ),
        user_token: bearer_header(
            &issuer
                .issue(&Grant::user("bench", AuthMethod::Password), Audience::Kms)
                .unwrap()
                .bytes,
        ),
        next_card: AtomicU64::new(0),
    });
    let secs = Duration::from_secs(args.seconds);
    println!(
        "kms-load on {} — {} s per measurement, {} connections",
        machine(),
        args.seconds,
        args.connections
    );
    let mut summary: Vec<Ratio> = Vec::new();
    for &size in &args.sizes {
        preload(&load, size).await;
        let answer_bytes = load.search_answer_bytes().await;
        println!("\n### {size} registered cards (a search answer: {answer_bytes} bytes)\n");
        println!("| call | concurrency | QPS | p50 | p99 |\n|---|---|---|---|---|");
        let on = |name: &str| args.calls.iter().any(|c| c == name);
        for &c in &args.concurrency {
            let mut echo_qps = None;
            let mut echo_large_qps = None;
            if on("echo") {
                let l = load.clone();
                let echo: Stats = closed_loop(c, secs, move |w, _| {
                    let l = l.clone();
                    async move { l.echo(w, 0).await }
                })
                .await;
                println!("{}", echo.row("echo (baseline)"));
                echo_qps = Some(echo.qps());
            }
            if on("echo-large") {
                // A small request answered with as many bytes as a search:
                // what the answer's size alone costs.
                let l = load.clone();
                let echo: Stats = closed_loop(c, secs, move |w, _| {
                    let l = l.clone();
                    async move { l.echo(w, answer_bytes).await }
                })
                .await;
                println!("{}", echo.row("echo answering a search's size"));
                echo_large_qps = Some(echo.qps());
            }
            if on("search") {
                let l = load.clone();
                let search = closed_loop(c, secs, move |w, seq| {
                    let l = l.clone();
                    async move { l.search(w, seq, size).await }
                })
                .await;
                println!("{}", search.row("SearchCards"));
                summary.push(Ratio {
                    size,
                    concurrency: c,
                    to_echo: echo_qps.map(|e| search.qps() / e),
                    to_same_size_echo: echo_large_qps.map(|e| search.qps() / e),
                    p99_ms: search.p99.as_secs_f64() * 1e3,
                });
            }
            if on("register") {
                let l = load.clone();
                let register = closed_loop(c, secs, move |w, _| {
                    let l = l.clone();
                    async move { l.register(w).await }
                })
                .await;
                println!("{}", register.row("RegisterCard"));
            }
        }
    }
    println!(
        "\n| cards | concurrency | search / echo | search / same-size echo | search p99 |\n|---|---|---|---|---|"
    );
    let pct = |r: Option<f64>| r.map_or("—".to_owned(), |r| format!("{:.0} %", r * 100.0));
    for r in summary {
        println!(
            "| {} | {} | {} | {} | {:.2} ms |",
            r.size,
            r.concurrency,
            pct(r.to_echo),
            pct(r.to_same_size_echo),
            r.p99_ms
        );
    }
    drop(kms_running);
    drop(echo_running);
}
