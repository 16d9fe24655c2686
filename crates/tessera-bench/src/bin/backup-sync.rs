//! `cargo run --release -p tessera-bench --bin backup-sync`: history sync of
//! 10 000 archived 1 KiB messages to a user with 3 devices, beside the pure
//! cryptographic cost of the same work measured in the same run (per
//! message: open the OrgEncMsg, seal the history envelope to 3 cards, sign).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark tool"
)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use futures_util::StreamExt;
use tessera_bench::machine;
use tessera_client::{Client, Endpoints, Enrollment, HistoryVisibility, Home, KdfParams};
use tessera_crypto::{
    DeviceKeys,
    envelope::{self, CONTENT_TYPE_HISTORY, Draft, Recipient, Sender},
    open_org_backup, seal_org_backup,
};
use tessera_proto::{
    Message as _,
    backup::v1::{BackupRecord, SyncHistoryRequest, backup_client::BackupClient},
    envelope::v1::HistoryItem,
    server::v1::{LoginRequest, accounts_client::AccountsClient},
};
use tessera_stack::{Stack, StackConfig};
use tokio::sync::Semaphore;
use tonic::{Request, transport::Channel};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    #[arg(long, default_value_t = 3)]
    devices: usize,
}

/// Messages per second of the service's per-message crypto, alone.
fn pure_crypto(n: usize, devices: usize) -> f64 {
    let org = DeviceKeys::generate().unwrap();
    let sender = DeviceKeys::generate().unwrap();
    let recipients: Vec<DeviceKeys> = (0..devices)
        .map(|_| DeviceKeys::generate().unwrap())
        .collect();
    let publics: Vec<_> = recipients
        .iter()
        .map(|d| d.encryption.public_key())
        .collect();
    let record = BackupRecord {
        channel_id: "0123456789abcdef0123456789abcdef".into(),
        message_index: 7,
        original_payload: vec![0x61; 1024 + 200],
        original_signature: vec![1; 64],
        server_time_ms: 0,
        envelope_sha256: vec![2; 32],
        content_key: vec![3; 32],
    }
    .encode_to_vec();
    let sealed = seal_org_backup(
        &org.encryption.public_key(),
        "0123456789abcdef0123456789abcdef",
        7,
        &record,
    )
    .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let plain = open_org_backup(
            &org.encryption,
            "0123456789abcdef0123456789abcdef",
            7,
            &sealed.encapsulated_key,
            &sealed.ciphertext,
        )
        .unwrap();
        let r = BackupRecord::decode(plain.as_slice()).unwrap();
        let body = HistoryItem {
            channel_id: r.channel_id,
            message_index: r.message_index,
            original_payload: r.original_payload,
            original_signature: r.original_signature,
            server_time_ms: r.server_time_ms,
            envelope_sha256: r.envelope_sha256,
            content_key: r.content_key,
        }
        .encode_to_vec();
        let to: Vec<Recipient<'_>> = publics
            .iter()
            .enumerate()
            .map(|(i, key)| Recipient {
                card_id: [i as u8; 32],
                key,
            })
            .collect();
        envelope::seal(
            &Sender {
                identity: "org:bench",
                card_id: [9; 32],
                key: &sender.signing,
            },
            &Draft {
                channel_id: "c",
                content_type: CONTENT_TYPE_HISTORY,
                body: &body,
                sent_at_ms: 0,
            },
            &to,
        )
        .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn enrollment<'a>(
    e: &Endpoints,
    identity: &'a str,
    password: &'a str,
    first: bool,
    info: &tessera_stack::StackInfo,
) -> Enrollment<'a> {
    Enrollment {
        endpoints: e.clone(),
        identity,
        password,
        sign_up: first,
        device_name: "bench",
        passphrase: b"bench",
        kdf: KdfParams::DANGER_FAST_FOR_TESTS,
        expected_app_key: Some(info.app_public_key),
        expected_kms_key: Some(info.kms_public_key),
        reset: false,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(StackConfig::for_tests(dir.path().join("stack")))
        .await
        .unwrap();
    let info = stack.info().clone();
    let home = Home::new(dir.path().join("home"));
    let e = info.endpoints();
    let admin = Client::enroll(
        &home,
        "admin",
        enrollment(&e, &info.admin_identity, &info.admin_password, false, &info),
    )
    .await
    .unwrap();
    let alice = Arc::new(
        Client::enroll(
            &home,
            "alice",
            enrollment(&e, "alice", "alice-bench-pw", true, &info),
        )
        .await
        .unwrap(),
    );
    for d in 0..args.devices {
        Client::enroll(
            &home,
            &format!("bob-{d}"),
            enrollment(&e, "bob", "bob-bench-pw", d == 0, &info),
        )
        .await
        .unwrap();
    }
    admin.set_org_member("bob", true).await.unwrap();
    let bob = Arc::new(Client::open(&home, "bob-0", b"bench").unwrap());
    let channel_id = alice
        .create_channel("archive", HistoryVisibility::Shared, &["bob".into()])
        .await
        .unwrap()
        .channel_id;

    eprintln!("sending {} messages of 1 KiB...", args.messages);
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..args.messages {
        let (alice, channel_id, gate) = (alice.clone(), channel_id.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let text = format!("{i:06} {}", "m".repeat(1017));
            alice.send_text(&channel_id, &text).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "sent in {:.1} s; backing up through bob-0...",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut anchor = 0;
    loop {
        let page = bob.history(&channel_id, anchor, 500, false).await.unwrap();
        let mut tasks = Vec::new();
        for (_, r) in page.messages {
            let (bob, gate) = (bob.clone(), gate.clone());
            let r = r.unwrap();
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                bob.back_up(&r).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        if page.next_anchor == 0 {
            break;
        }
        anchor = page.next_anchor;
    }
    eprintln!("archived in {:.1} s", t.elapsed().as_secs_f64());

    println!(
        "backup-sync on {} — {} archived 1 KiB messages, {} devices",
        machine(),
        args.messages,
        args.devices
    );
    // Best of two runs: the first warms caches and the CPU's clock.
    let pure = pure_crypto(2000, args.devices).max(pure_crypto(2000, args.devices));
    // The service's side of a sync, consumed raw (the caller verifies nothing).
    let login = AccountsClient::new(
        Channel::from_shared(info.server_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .login(LoginRequest {
        identity: "bob".into(),
        password: "bob-bench-pw".into(),
    })
    .await
    .unwrap()
    .into_inner();
    let mut backup = BackupClient::new(
        Channel::from_shared(info.backup_url.clone().unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .max_decoding_message_size(64 << 20);
    let mut request = Request::new(SyncHistoryRequest {
        channel_id: channel_id.clone(),
        from_index: 0,
        limit: args.messages as u32,
        nonce: vec![7; 16],
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", hex::encode(login.access_token))
            .parse()
            .unwrap(),
    );
    let t = Instant::now();
    let mut stream = backup.sync_history(request).await.unwrap().into_inner();
    let mut n = 0usize;
    let mut bytes = 0usize;
    while let Some(item) = stream.next().await {
        let item = item.unwrap();
        bytes += item.envelope.len();
        // The last item (index 0) is the organisation's signed end.
        if item.message_index != 0 {
            n += 1;
        }
    }
    let raw = t.elapsed();
    assert_eq!(n, args.messages, "every archived message synced");
    // The same sync through the client library, every entry verified twice.
    let t = Instant::now();
    let verified = bob
        .sync_from_org(&channel_id, 0, args.messages as u32, |_, _| {})
        .await
        .unwrap();
    let client = t.elapsed();
    assert!(verified.iter().all(|e| e.result.is_ok()));

    let rate = n as f64 / raw.as_secs_f64();
    println!("\n| what | messages/s |\n|---|---|");
    println!(
        "| pure crypto: open OrgEncMsg + seal to {} cards + sign | {pure:.0} |",
        args.devices
    );
    println!("| SyncHistory, service side (stream consumed raw) | {rate:.0} |");
    println!(
        "| SyncHistory + client verification (org and original signatures) | {:.0} |",
        verified.len() as f64 / client.as_secs_f64()
    );
    println!(
        "\nservice / pure crypto = {:.0} % ({} envelopes, {:.1} MB, in {:.2} s)",
        rate / pure * 100.0,
        n,
        bytes as f64 / 1e6,
        raw.as_secs_f64()
    );
    let _ = Duration::ZERO;
    stack.stop().await;
}
