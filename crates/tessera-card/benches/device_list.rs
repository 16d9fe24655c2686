//! `cargo bench -p tessera-card --bench device_list`: what verifying a
//! device list costs a client seeing it for the first time (every statement:
//! log inclusion, shape, signature, rules), for lists of 1, 10 and 100
//! statements, and what extending a kept list by one statement costs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code: a failed unwrap is a failed run"
)]

use std::{collections::BTreeMap, hint::black_box};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tessera_card::{
    CardId, CardKind, NewCard, VerifiedCard, Verifier, app_sign,
    device_list::{Action, DeviceListState, NewStatement, ParsedStatement, ServedList, app_cosign},
    kms_sign,
    record::{CheckedRecord, Status},
    transparency::{
        Tree, VerifiedCheckpoint, device_statement_entry, inclusion_proof_message, leaf_hash,
        sign_checkpoint, verify_checkpoint,
    },
};
use tessera_crypto::{DeviceKeys, SigningKey};
use tessera_proto::kms::v1::{DeviceList, LoggedStatement};

struct Chain {
    list: DeviceList,
    checkpoint: VerifiedCheckpoint,
    records: BTreeMap<CardId, CheckedRecord>,
    app: SigningKey,
}

/// A list of `n` statements: a genesis, then devices added and removed in
/// turn by the first device, logged among 1000 other entries.
fn chain(n: usize) -> Chain {
    let app = SigningKey::generate().unwrap();
    let kms = SigningKey::generate().unwrap();
    let verifier = Verifier::new(app.verifying_key(), kms.verifying_key());
    let device = || {
        let keys = DeviceKeys::generate().unwrap();
        let mut card = NewCard {
            identity: "bob",
            kind: CardKind::Client,
            device_name: "d",
            created_at: 0,
            previous_card_id: None,
        }
        .self_signed(&keys)
        .unwrap();
        app_sign(&mut card, &app);
        kms_sign(&mut card, &kms);
        let card: VerifiedCard = verifier
            .verify(&card, Some("bob"), CardKind::Client)
            .unwrap();
        (keys, card)
    };
    let (first_keys, first) = device();
    let (_, other) = device();
    let mut entries: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("entry {i}").into_bytes())
        .collect();
    let mut indices = Vec::new();
    let mut state = DeviceListState::empty("bob");
    for i in 0..n {
        let action = match i {
            0 => Action::Genesis,
            i if i % 2 == 1 => Action::Add,
            _ => Action::Remove,
        };
        let subject = if i == 0 { first.id() } else { other.id() };
        let mut signed = NewStatement {
            identity: "bob",
            seqno: state.length(),
            previous_hash: state.head(),
            action,
            subject,
            signer: first.id(),
            created_at: 0,
        }
        .sign(&first_keys.signing);
        if action == Action::Genesis {
            app_cosign(&mut signed, &app);
        }
        let parsed = ParsedStatement::parse(signed.clone()).unwrap();
        state.apply(&parsed, &first, &app.verifying_key()).unwrap();
        indices.push(entries.len() as u64);
        entries.push(device_statement_entry(&signed, "bob", 0));
    }
    let tree = Tree::from_leaves(entries.iter().map(|e| leaf_hash(e)));
    let size = tree.len();
    let checkpoint = verify_checkpoint(
        &sign_checkpoint(&kms, size, &tree.root(size).unwrap(), 0),
        &kms.verifying_key(),
    )
    .unwrap();
    let statements = indices
        .iter()
        .map(|&i| LoggedStatement {
            entry: entries[i as usize].clone(),
            inclusion: Some(inclusion_proof_message(
                i,
                size,
                tree.inclusion_proof(i, size).unwrap(),
            )),
        })
        .collect();
    let record = CheckedRecord {
        card: first.clone(),
        status: Status::Active,
        registered_index: 0,
        registered_at: 0,
        revocation: None,
    };
    Chain {
        list: DeviceList {
            length: n as u64,
            statements,
            truncated: false,
            trusted_card_ids: Vec::new(),
        },
        checkpoint,
        records: BTreeMap::from([(first.id(), record)]),
        app,
    }
}

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("device_list_verify");
    for n in [1usize, 10, 100] {
        let chain = chain(n);
        let app = chain.app.verifying_key();
        g.bench_with_input(BenchmarkId::new("first_look", n), &chain, |b, chain| {
            b.iter(|| {
                let served =
                    ServedList::check(black_box(&chain.list), "bob", &chain.checkpoint).unwrap();
                let mut state = DeviceListState::empty("bob");
                served
                    .extend(&mut state, &|id| chain.records.get(id).cloned(), &app)
                    .unwrap();
                state
            })
        });
    }
    // A client that kept the list and sees one more statement (the usual
    // case): the head shown again plus the new statement.
    let chain = chain(100);
    let app = chain.app.verifying_key();
    let mut kept = DeviceListState::empty("bob");
    let mut first_99 = chain.list.clone();
    first_99.statements.truncate(99);
    first_99.length = 99;
    ServedList::check(&first_99, "bob", &chain.checkpoint)
        .unwrap()
        .extend(&mut kept, &|id| chain.records.get(id).cloned(), &app)
        .unwrap();
    let mut tail = chain.list.clone();
    tail.statements.drain(..98);
    g.bench_function("extend_kept_by_one", |b| {
        b.iter(|| {
            let served = ServedList::check(black_box(&tail), "bob", &chain.checkpoint).unwrap();
            let mut state = kept.clone();
            served
                .extend(&mut state, &|id| chain.records.get(id).cloned(), &app)
                .unwrap();
            state
        })
    });
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
