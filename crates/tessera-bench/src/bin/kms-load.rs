//! `cargo run --release -p tessera-bench --bin kms-load`: SearchCards and
//! RegisterCard throughput and latency at several concurrencies and
//! directory sizes (1 k, 100 k and 1 M cards by default), beside a bare
//! tonic echo service measured by the same tool in the same run. Everything
//! runs on loopback in this process, the key service over sled in a
//! temporary directory, or over PostgreSQL (`--backends sled,postgres`
//! measures both in one run).
//!
//! Each size gets a fresh key service whose store is preloaded in bulk
//! ([`bulk_preload`]): the very records `Directory::register` and
//! `Directory::publish` write (card records with their log entries,
//! identity index, each identity's device list with its GENESIS statement,
//! log entries, leaf hashes, signed checkpoint), written straight into the
//! store before the service opens it (on PostgreSQL one binary `COPY` per
//! table for 8 192 cards, `PgStore::copy_all`), since a million registrations
//! through the RPC (each flushed alone) would take the best part of an
//! hour.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark tool"
)]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use tessera_bench::{
    Backend, EchoService, Stats, closed_loop, database_server, fresh_database, machine,
    resident_mib,
};
use tessera_card::{
    CardId, CardKind, NewCard, Verifier, app_sign,
    device_list::{Action, DeviceListState, NewStatement, ParsedStatement, ServedList, app_cosign},
    kms_sign,
    transparency::{self, Tree},
};
use tessera_crypto::{DeviceKeys, SigningKey, VerifyingKey};
use tessera_kms::{
    Config, DEFAULT_MAX_REQUEST_BYTES, Kms, Limits,
    store::{Append, PgOptions, PgStore, SledStore, Store, StoredCard, StoredDeviceList},
};
use tessera_proto::{
    bench::v1::{EchoMessage, echo_client::EchoClient, echo_server::EchoServer},
    card::v1 as card_pb,
    kms::v1::{
        RegisterCardRequest, SearchCardsRequest, SearchCardsResponse,
        key_directory_client::KeyDirectoryClient,
    },
    transparency::v1::SignedCheckpoint,
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
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
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
        default_value = "echo,echo-large,echo-token,search,search-no-lists,register"
    )]
    calls: Vec<String>,
    /// Rounds: each measures every size in turn, so a change in the
    /// machine's load hits every size alike; the summary takes the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Keep the preloaded stores (and the AppKey that signed their cards)
    /// here and reuse them on the next run (default: a temporary directory,
    /// removed after each size). PostgreSQL databases are reused only on a
    /// server given with `--database-url` (a throwaway one is new each run).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Stores to measure, each at every size: `sled`, `postgres`.
    #[arg(long, value_delimiter = ',', default_value = "sled")]
    backends: Vec<Backend>,
    /// For `postgres`: a server URL without a database
    /// (`postgresql://user@host:port`) where the tool may create and drop
    /// the databases `kms_load_<size>`; without it, a throwaway server
    /// (the testkit's: the distribution's binaries, fsync off) is started.
    #[arg(long)]
    database_url: Option<String>,
    /// Start the throwaway PostgreSQL server with `fsync=on` (durable
    /// commits, as in production).
    #[arg(long)]
    pg_fsync: bool,
}

struct Load {
    kms: Vec<KeyDirectoryClient<Channel>>,
    echo: Vec<EchoClient<Channel>>,
    app: Arc<SigningKey>,
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
    async fn call(
        &self,
        call: Call,
        worker: usize,
        seq: u64,
        size: u64,
        answer_bytes: u32,
    ) -> bool {
        match call {
            Call::Echo => self.echo(worker, 0, false).await,
            Call::SameSizeEcho => self.echo(worker, answer_bytes, false).await,
            Call::TokenEcho => self.echo(worker, answer_bytes, true).await,
            Call::Search => self.search(worker, seq, size, true).await,
            Call::SearchNoLists => self.search(worker, seq, size, false).await,
            Call::Register => self.register(worker).await,
        }
    }

    async fn register(&self, worker: usize) -> bool {
        let n = self.next_card.fetch_add(1, Ordering::Relaxed);
        let (_, card) = bench_card(n, &DeviceKeys::generate().unwrap(), &self.app);
        let mut client = self.kms[worker % self.kms.len()].clone();
        client
            .register_card(with(
                &self.service_token,
                RegisterCardRequest { card: Some(card) },
            ))
            .await
            .is_ok()
    }

    /// A search for one identity; `with_lists` false asks for its device
    /// list from past its end (no statements: what the answer costs
    /// without device lists).
    async fn search(&self, worker: usize, seq: u64, size: u64, with_lists: bool) -> bool {
        // A cheap spread over every registered identity.
        let pick = (seq
            .wrapping_mul(2_654_435_761)
            .wrapping_add(worker as u64 * 97))
            % (size / 2).max(1);
        let r = self
            .search_for(worker, format!("user{pick}"), with_lists)
            .await;
        matches!(r, Ok(r) if r.results.first().is_some_and(|x| !x.cards.is_empty()))
    }

    /// Searches for `identity` on connection `worker`.
    async fn search_for(
        &self,
        worker: usize,
        identity: String,
        with_lists: bool,
    ) -> Result<SearchCardsResponse, tonic::Status> {
        let mut client = self.kms[worker % self.kms.len()].clone();
        let request = SearchCardsRequest {
            identities: vec![identity.clone()],
            kind: 0,
            device_list_from: if with_lists {
                Default::default()
            } else {
                [(identity, u64::MAX)].into()
            },
        };
        Ok(client
            .search_cards(with(&self.user_token, request))
            .await?
            .into_inner())
    }

    /// A 32-byte echo; with `answer_bytes`, answered with that many bytes;
    /// `with_token`: carrying the search's `authorization` header, so a
    /// search's transport without its work (HTTP/2 never indexes an
    /// `authorization` value in HPACK: each call sends the whole token).
    async fn echo(&self, worker: usize, answer_bytes: u32, with_token: bool) -> bool {
        let mut client = self.echo[worker % self.echo.len()].clone();
        let message = EchoMessage {
            payload: vec![7; 32],
            answer_bytes,
        };
        let request = if with_token {
            with(&self.user_token, message)
        } else {
            Request::new(message)
        };
        client.echo(request).await.is_ok()
    }

    /// Encoded size of one search answer at this directory size (`size`
    /// cards), after checking the answers for [`CHECKED`] identities spread
    /// over the whole directory, the first and the last among them.
    async fn search_answer_bytes(&self, kms_key: &VerifyingKey, size: u64) -> u32 {
        use tessera_proto::Message as _;
        let identities = (size / 2).max(1);
        let mut bytes = 0;
        for i in 0..CHECKED {
            let identity = format!("user{}", i * (identities - 1) / (CHECKED - 1));
            let r = self
                .search_for(0, identity.clone(), true)
                .await
                .expect("a search of a preloaded identity");
            check_answer(&r, &identity, &self.app.verifying_key(), kms_key);
            if i == 0 {
                bytes = r.encoded_len() as u32;
            }
        }
        eprintln!("checked the search answers for {CHECKED} identities of {identities}");
        bytes
    }
}

/// Identities whose search answers are checked at each size.
const CHECKED: u64 = 16;

/// Checks a search answer for `identity` as a client would: both cards
/// verify and are in the log, and the device list is a logged GENESIS that
/// applies (so the bulk preload wrote what the directory would have).
fn check_answer(
    answer: &SearchCardsResponse,
    identity: &str,
    app: &VerifyingKey,
    kms: &VerifyingKey,
) {
    let checkpoint =
        transparency::verify_checkpoint(answer.checkpoint.as_ref().unwrap(), kms).unwrap();
    let found = &answer.results[0];
    assert_eq!(found.identity, identity);
    assert_eq!(found.cards.len(), 2, "{identity} has two active cards");
    let verifier = Verifier::new(*app, *kms);
    let cards: Vec<_> = found
        .cards
        .iter()
        .map(|record| {
            transparency::verify_inclusion(
                &checkpoint,
                &record.registration_entry,
                record.inclusion.as_ref().unwrap(),
            )
            .unwrap();
            let card = transparency::registered_card(&record.registration_entry).unwrap();
            verifier
                .verify(&card, Some(identity), CardKind::Client)
                .unwrap()
        })
        .collect();
    let served = ServedList::check(found.device_list.as_ref().unwrap(), identity, &checkpoint)
        .expect("a logged device list");
    assert_eq!(served.statements.len(), 1);
    let mut state = DeviceListState::empty(identity);
    state
        .apply(&served.statements[0].statement, &cards[0], app)
        .expect("the GENESIS statement applies");
    assert!(state.is_trusted(&cards[0].id()));
}

/// Cards made per batch by the preload's worker threads.
const PRELOAD_BATCH: u64 = 8192;

/// Card `n` of the bench (identity `user<n / 2>`: two cards each), with
/// its self and app signatures.
fn bench_card(n: u64, keys: &DeviceKeys, app: &SigningKey) -> (String, card_pb::Card) {
    let identity = format!("user{}", n / 2);
    let mut card = NewCard {
        identity: &identity,
        kind: CardKind::Client,
        device_name: "bench device",
        created_at: n as i64,
        previous_card_id: None,
    }
    .self_signed(keys)
    .unwrap();
    app_sign(&mut card, app);
    (identity, card)
}

/// One append as the directory makes it: the log entry, the card records
/// it writes, the device list it extends.
type Appended = (Vec<u8>, Vec<StoredCard>, Option<StoredDeviceList>);

/// Card `n`'s registration as `Directory::register` makes it (the card with
/// its self, app and kms signatures, and its log entry) and, for the first
/// card of an identity, the GENESIS statement of its device list as
/// `Directory::publish` logs it (signed by that card, co-signed by the
/// AppKey): every enrolled user has one. Log indices are set when applied.
fn registration(
    n: u64,
    keys: &DeviceKeys,
    app: &SigningKey,
    kms: &SigningKey,
    now: i64,
) -> Vec<Appended> {
    let (identity, mut card) = bench_card(n, keys, app);
    kms_sign(&mut card, kms);
    let id = CardId::of_snapshot(&card.content_snapshot);
    let entry = transparency::registration_entry(&card, &identity, now);
    let stored = StoredCard {
        registration_entry: entry.clone(),
        card: Some(card),
        identity: identity.clone(),
        kind: CardKind::Client.to_proto() as i32,
        ..StoredCard::default()
    };
    let mut appends = vec![(entry, vec![stored], None)];
    if n.is_multiple_of(2) {
        let mut genesis = NewStatement {
            identity: &identity,
            seqno: 0,
            previous_hash: None,
            action: Action::Genesis,
            subject: id,
            signer: id,
            created_at: now,
        }
        .sign(&keys.signing);
        app_cosign(&mut genesis, app);
        let list = StoredDeviceList {
            identity: identity.clone(),
            indices: Vec::new(),
            head: ParsedStatement::parse(genesis.clone())
                .unwrap()
                .hash()
                .to_vec(),
            trusted: vec![id.to_vec()],
        };
        let entry = transparency::device_statement_entry(&genesis, &identity, now);
        appends.push((entry, Vec::new(), Some(list)));
    }
    appends
}

/// Writes cards `0..count` (identity `user<n / 2>`: two cards each, and a
/// device list of one GENESIS statement) into the key service's store under
/// `data_dir`, one append per registration and statement, like the
/// directory's; the last append of each batch carries a freshly signed
/// checkpoint over the tree so far (the others repeat the previous one,
/// which the next append overwrites anyway), so the service opens the
/// store, rebuilds the tree and checks the root as it would after real
/// registrations. Devices share a few keys (the card ids still differ:
/// each snapshot names its own identity and time).
fn bulk_preload(
    kms: &SigningKey,
    app: &SigningKey,
    count: u64,
    mut write: impl FnMut(Vec<Append>),
) {
    let start = Instant::now();
    let keys: Vec<DeviceKeys> = (0..16).map(|_| DeviceKeys::generate().unwrap()).collect();
    let now = tessera_service::now_secs();
    let mut tree = Tree::new();
    let mut checkpoint = SignedCheckpoint::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mut writing = Duration::ZERO;
    // The next batch is made (signed) while this one is written: the store
    // (PostgreSQL's server, or sled's flushes) works beside the signing.
    let (made_tx, made_rx) = std::sync::mpsc::sync_channel::<Vec<Appended>>(1);
    std::thread::scope(|scope| {
        let keys = &keys;
        scope.spawn(move || {
            for batch in (0..count).step_by(PRELOAD_BATCH as usize) {
                let end = (batch + PRELOAD_BATCH).min(count);
                let per_thread = (end - batch).div_ceil(threads);
                let made: Vec<Appended> = std::thread::scope(|inner| {
                    let workers: Vec<_> = (0..threads)
                        .map(|t| {
                            let from = (batch + t * per_thread).min(end);
                            let to = (from + per_thread).min(end);
                            inner.spawn(move || {
                                (from..to)
                                    .flat_map(|n| {
                                        registration(
                                            n,
                                            &keys[n as usize % keys.len()],
                                            app,
                                            kms,
                                            now,
                                        )
                                    })
                                    .collect::<Vec<_>>()
                            })
                        })
                        .collect();
                    workers
                        .into_iter()
                        .flat_map(|w| w.join().unwrap())
                        .collect()
                });
                if made_tx.send(made).is_err() {
                    return;
                }
            }
        });
        for made in made_rx {
            let last = made.len() - 1;
            let mut appends = Vec::with_capacity(made.len());
            for (i, (entry, mut cards, mut device_list)) in made.into_iter().enumerate() {
                let leaf_hash = transparency::leaf_hash(&entry);
                let index = tree.push(leaf_hash);
                for card in &mut cards {
                    card.registration_index = index;
                }
                if let Some(list) = &mut device_list {
                    list.indices.push(index);
                }
                if i == last {
                    let root = tree.root(index + 1).unwrap();
                    checkpoint = transparency::sign_checkpoint(kms, index + 1, &root, now);
                }
                appends.push(Append {
                    index,
                    entry,
                    leaf_hash,
                    cards,
                    device_list,
                    checkpoint: checkpoint.clone(),
                });
            }
            let writing_from = Instant::now();
            write(appends);
            writing += writing_from.elapsed();
        }
    });
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "preloaded {count} cards and {} device lists in bulk in {secs:.1} s ({:.0} cards/s; \
         {:.1} s of it waiting on the store's writes)",
        count.div_ceil(2),
        count as f64 / secs,
        writing.as_secs_f64(),
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

/// A key service preloaded with `size` cards, serving on loopback.
async fn start_kms(
    dir: &Path,
    backend: Backend,
    database: Option<&str>,
    size: u64,
    app: &Arc<SigningKey>,
    issuer: &TokenIssuer,
) -> (Kms, Running) {
    let data_dir = match backend {
        Backend::Sled => dir.join(format!("kms-{size}")),
        Backend::Postgres => dir.join(format!("kms-pg-{size}")),
    };
    std::fs::create_dir_all(&data_dir).unwrap();
    let key = tessera_kms::load_or_create_key(&data_dir.join("kms.key")).unwrap();
    let config = Config {
        data_dir: data_dir.clone(),
        key_path: None,
        app_public_key: app.verifying_key(),
        token_public_key: issuer.public_key(),
        limits: Limits::default(),
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
    };
    let kms = match backend {
        Backend::Sled => {
            let done = data_dir.join("preloaded");
            if done.exists() {
                eprintln!(
                    "reusing the {size} cards preloaded in {}",
                    data_dir.display()
                );
            } else {
                let app_key = app.clone();
                let db = data_dir.join("db");
                tokio::task::spawn_blocking(move || {
                    let store = SledStore::open(&db).unwrap();
                    bulk_preload(&key, &app_key, size, |appends| {
                        for append in appends {
                            store.apply(append).unwrap();
                        }
                    });
                    tokio::runtime::Handle::current()
                        .block_on(store.flush())
                        .unwrap();
                })
                .await
                .unwrap();
                std::fs::write(&done, b"").unwrap();
            }
            let opening = Instant::now();
            let kms = Kms::open(&config).await.unwrap();
            eprintln!(
                "opened the key service over {size} cards on sled in {:.1} s",
                opening.elapsed().as_secs_f64()
            );
            kms
        }
        Backend::Postgres => {
            // A database of its own per size. It is reused when the marker
            // names this server (a server given with `--database-url`; a
            // throwaway one is new each run), else preloaded afresh.
            let server = database.expect("a PostgreSQL server");
            let name = format!("kms_load_{size}");
            let done = data_dir.join("preloaded");
            let reuse = std::fs::read_to_string(&done).is_ok_and(|s| s == server);
            let url = if reuse {
                eprintln!("reusing the {size} cards preloaded in {server}/{name}");
                format!("{server}/{name}")
            } else {
                let _ = std::fs::remove_file(&done);
                fresh_database(server, &name).await.unwrap()
            };
            let store = Arc::new(
                PgStore::open(&PgOptions { url, pool_size: 16 })
                    .await
                    .unwrap(),
            );
            if !reuse {
                let (writer, app_key) = (store.clone(), app.clone());
                let preload_key =
                    tessera_kms::load_or_create_key(&data_dir.join("kms.key")).unwrap();
                tokio::task::spawn_blocking(move || {
                    bulk_preload(&preload_key, &app_key, size, |appends| {
                        tokio::runtime::Handle::current()
                            .block_on(writer.copy_all(appends))
                            .unwrap();
                    });
                })
                .await
                .unwrap();
                std::fs::write(&done, server).unwrap();
            }
            let opening = Instant::now();
            let kms = Kms::with_store(store, key, &config).await.unwrap();
            eprintln!(
                "opened the key service over {size} cards on PostgreSQL in {:.1} s",
                opening.elapsed().as_secs_f64()
            );
            kms
        }
    };
    eprintln!(
        "this process now holds {} MiB",
        resident_mib().map_or("?".to_owned(), |m| m.to_string())
    );
    let running = Running::spawn(
        kms.routes().await.unwrap(),
        bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
        ServeOptions::default(),
    )
    .unwrap();
    (kms, running)
}

/// What was measured at one size and concurrency, one entry per round.
#[derive(Default)]
struct Measured {
    /// One entry per round, for each of [`CALLS`].
    runs: [Vec<Stats>; 6],
}

/// What is measured: the `--calls` name, the row's label.
#[derive(Clone, Copy)]
enum Call {
    Echo,
    SameSizeEcho,
    TokenEcho,
    Search,
    SearchNoLists,
    Register,
}

const CALLS: [(Call, &str, &str); 6] = [
    (Call::Echo, "echo", "echo (baseline)"),
    (Call::SameSizeEcho, "echo-large", "same-size echo"),
    (
        Call::TokenEcho,
        "echo-token",
        "same-size echo with the search's token",
    ),
    (Call::Search, "search", "SearchCards"),
    (
        Call::SearchNoLists,
        "search-no-lists",
        "SearchCards, no list statements",
    ),
    (Call::Register, "register", "RegisterCard"),
];

impl Measured {
    fn of(&self, call: Call) -> &[Stats] {
        &self.runs[call as usize]
    }
}

/// Search QPS at one size against the smallest, each divided by the echo
/// measured just before it in the same round: the echo does not depend on
/// the directory, so this takes out the machine's changes of speed between
/// the two measurements. The median over the rounds.
fn normalised_change(at: &Measured, smallest: &Measured) -> Option<f64> {
    let ratios = |m: &Measured| -> Vec<f64> {
        m.of(Call::Search)
            .iter()
            .zip(m.of(Call::Echo))
            .map(|(search, echo)| search.qps() / echo.qps())
            .collect()
    };
    let mut changes: Vec<f64> = ratios(at)
        .iter()
        .zip(ratios(smallest))
        .map(|(a, b)| a / b - 1.0)
        .collect();
    changes.sort_by(f64::total_cmp);
    changes.get(changes.len() / 2).copied()
}

/// The round with the median QPS.
fn median(runs: &[Stats]) -> Option<&Stats> {
    let mut sorted: Vec<&Stats> = runs.iter().collect();
    sorted.sort_by(|a, b| a.qps().total_cmp(&b.qps()));
    sorted.get(sorted.len() / 2).copied()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let temp = tempfile::tempdir().unwrap();
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    // The AppKey lives with the preloaded stores: a store reused from an
    // earlier run holds cards that key signed.
    std::fs::create_dir_all(&dir).unwrap();
    let (app, _) =
        tessera_crypto::keystore::load_or_generate_signing(&dir.join("bench-app.key")).unwrap();
    let app = Arc::new(app);
    let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(3600));
    let echo_running = Running::spawn(
        Routes::new(EchoServer::new(EchoService)),
        bind("127.0.0.1:0".parse().unwrap()).await.unwrap(),
        ServeOptions::default(),
    )
    .unwrap();
    let echo: Vec<EchoClient<Channel>> = connect(&echo_running.url(), args.connections)
        .await
        .into_iter()
        .map(EchoClient::new)
        .collect();
    let service_token = bearer_header(
        &issuer
            .issue(&Grant::service("tessera-server"), Audience::Kms)
            .unwrap()
            .bytes,
    );
    let user_token = bearer_header(
        &issuer
            .issue(&Grant::user("bench", AuthMethod::Password), Audience::Kms)
            .unwrap()
            .bytes,
    );
    // A throwaway PostgreSQL server unless one is given.
    let (database, throwaway) =
        database_server(&args.backends, args.database_url.as_deref(), args.pg_fsync)
            .unwrap_or_else(|e| {
                eprintln!("kms-load: {e}");
                std::process::exit(2)
            });
    // Every size on every backend is preloaded and served at once, so the
    // rounds below can take them in turns.
    let mut services = Vec::new();
    for &backend in &args.backends {
        let base = services.len();
        for &size in &args.sizes {
            let (kms, running) =
                start_kms(&dir, backend, database.as_deref(), size, &app, &issuer).await;
            let name = match args.backends.len() {
                1 => size.to_string(),
                _ => format!("{size} {}", backend.name()),
            };
            let load = Arc::new(Load {
                kms: connect(&running.url(), args.connections)
                    .await
                    .into_iter()
                    .map(KeyDirectoryClient::new)
                    .collect(),
                echo: echo.clone(),
                app: app.clone(),
                service_token: service_token.clone(),
                user_token: user_token.clone(),
                next_card: AtomicU64::new(size),
            });
            let answer_bytes = load
                .search_answer_bytes(&kms.directory().public_key(), size)
                .await;
            services.push((size, name, base, backend, kms, running, load, answer_bytes));
        }
    }
    let secs = Duration::from_secs(args.seconds);
    println!(
        "kms-load on {} — {} s per measurement, {} connections, {} rounds",
        machine(),
        args.seconds,
        args.connections,
        args.rounds
    );
    for (_, name, _, _, _, _, _, answer_bytes) in &services {
        println!("{name} cards: a search answer is {answer_bytes} bytes");
    }
    let on = |name: &str| args.calls.iter().any(|c| c == name);
    let mut measured: Vec<Vec<Measured>> = services
        .iter()
        .map(|_| {
            args.concurrency
                .iter()
                .map(|_| Measured::default())
                .collect()
        })
        .collect();
    // Sizes are measured back to back at each concurrency, so a change in
    // the machine's load falls on every size alike.
    for round in 1..=args.rounds {
        println!("\n### Round {round}\n");
        println!(
            "| cards | call | concurrency | QPS | p50 | p99 | CPU per call |\n|---|---|---|---|---|---|---|"
        );
        for (ci, &c) in args.concurrency.iter().enumerate() {
            for (s, (size, name, _, _, _, _, load, answer_bytes)) in services.iter().enumerate() {
                let (size, answer_bytes) = (*size, *answer_bytes);
                for (call, flag, label) in CALLS {
                    if !on(flag) {
                        continue;
                    }
                    let l = load.clone();
                    let stats = closed_loop(c, secs, move |w, seq| {
                        let l = l.clone();
                        async move { l.call(call, w, seq, size, answer_bytes).await }
                    })
                    .await;
                    println!("| {name} {}", stats.row(label));
                    measured[s][ci].runs[call as usize].push(stats);
                }
            }
        }
    }
    println!("\n### Median of {} rounds\n", args.rounds);
    println!(
        "| cards | call | concurrency | QPS | p50 | p99 | CPU per call |\n|---|---|---|---|---|---|---|"
    );
    for (s, (_, name, ..)) in services.iter().enumerate() {
        for m in &measured[s] {
            for (call, _, label) in CALLS {
                if let Some(stats) = median(m.of(call)) {
                    println!("| {name} {}", stats.row(label));
                }
            }
        }
    }
    println!(
        "\n| cards | concurrency | search QPS | against the smallest size | search / echo | search / same-size echo | search / same-size echo with token | search p99 | search CPU per call | against the smallest size | search / echo against the smallest size |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let pct = |r: Option<f64>| r.map_or("—".to_owned(), |r| format!("{:.0} %", r * 100.0));
    for (s, (_, name, base, ..)) in services.iter().enumerate() {
        for (ci, &c) in args.concurrency.iter().enumerate() {
            let m = &measured[s][ci];
            let Some(search) = median(m.of(Call::Search)) else {
                continue;
            };
            let smallest = median(measured[*base][ci].of(Call::Search));
            let change =
                |d: Option<f64>| d.map_or("—".to_owned(), |d| format!("{:+.0} %", d * 100.0));
            let cpu = search.cpu_us_per_op();
            println!(
                "| {name} | {c} | {:.0} | {} | {} | {} | {} | {:.2} ms | {} | {} | {} |",
                search.qps(),
                change(smallest.map(|f| search.qps() / f.qps() - 1.0)),
                pct(median(m.of(Call::Echo)).map(|e| search.qps() / e.qps())),
                pct(median(m.of(Call::SameSizeEcho)).map(|e| search.qps() / e.qps())),
                pct(median(m.of(Call::TokenEcho)).map(|e| search.qps() / e.qps())),
                search.p99.as_secs_f64() * 1e3,
                cpu.map_or("—".to_owned(), |c| format!("{c:.0} µs")),
                change(
                    cpu.zip(smallest.and_then(Stats::cpu_us_per_op))
                        .map(|(c, f)| c / f - 1.0)
                ),
                change(normalised_change(m, &measured[*base][ci])),
            );
        }
    }
    for (_, _, _, _, kms, running, load, _) in services {
        drop(load);
        running.stop().await.unwrap();
        drop(kms);
    }
    drop(echo_running);
    drop(throwaway);
}
