//! `cargo bench -p tessera-card --bench channel`: what a channel's
//! membership chain costs a client.
//!
//! * `verify_chain/first_look/N`: parsing and applying a chain of N
//!   statements seen for the first time (every signature and rule), for
//!   N = 10, 100 and 1000; `verify_chain/extend_by_one/N` extends a kept
//!   state of N statements by one.
//! * `message/seal` and `message/open`: sealing to and opening from a
//!   10-member channel (one device each), `v1` without an epoch and `v2`
//!   naming its epoch, `v2` opening with the in-memory membership checks a
//!   client makes (the epoch's hash, the sender a member then, every
//!   recipient a device of a member then). The card lookups both versions
//!   share (cached by the client) are not part of either.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench code: a failed unwrap is a failed run"
)]

use std::{collections::BTreeMap, hint::black_box};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use tessera_card::{
    CardId, CardKind, NewCard, VerifiedCard, Verifier, app_sign,
    channel::{
        Change, ChannelState, NewChannelStatement, ParsedChannelStatement, Role, ServedChain,
        StatementSigner, Visibility,
    },
    kms_sign,
};
use tessera_crypto::{
    DeviceKeys, SigningKey,
    envelope::{
        self, CONTENT_TYPE_TEXT, Draft, Epoch, ExpectedSender, Opener, ParsedEnvelope, Recipient,
        Sender,
    },
};
use tessera_proto::channel::v1::SignedChannelStatement;

const CH: &str = "00112233445566778899aabbccddeeff";

struct Device {
    keys: DeviceKeys,
    card: VerifiedCard,
}

fn device(identity: &str, app: &SigningKey, kms: &SigningKey) -> Device {
    let keys = DeviceKeys::generate().unwrap();
    let mut card = NewCard {
        identity,
        kind: CardKind::Client,
        device_name: "d",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&keys)
    .unwrap();
    app_sign(&mut card, app);
    kms_sign(&mut card, kms);
    let card = Verifier::new(app.verifying_key(), kms.verifying_key())
        .verify(&card, Some(identity), CardKind::Client)
        .unwrap();
    Device { keys, card }
}

struct World {
    admins: Vec<Device>,
    members: Vec<Device>,
}

fn world(members: usize) -> World {
    let app = SigningKey::generate().unwrap();
    let kms = SigningKey::generate().unwrap();
    World {
        admins: (0..3)
            .map(|i| device(&format!("admin{i}"), &app, &kms))
            .collect(),
        members: (0..members)
            .map(|i| device(&format!("member{i:04}"), &app, &kms))
            .collect(),
    }
}

fn sign(state: &ChannelState, by: &Device, change: Change) -> SignedChannelStatement {
    NewChannelStatement {
        channel_id: CH,
        epoch: state.length(),
        previous_hash: state.head(),
        signer_identity: by.card.identity(),
        signer: by.card.id(),
        created_at: 0,
        change,
    }
    .sign(&by.keys.signing)
}

/// A chain of `n` statements: the creation by three admins' first, then
/// members added, and every fifth statement one removed, by the admins in
/// turn.
fn chain(w: &World, n: usize) -> Vec<SignedChannelStatement> {
    let mut state = ChannelState::empty(CH);
    let mut out = Vec::with_capacity(n);
    let mut added = Vec::new();
    for i in 0..n {
        let by = &w.admins[i % w.admins.len()];
        let change = if i == 0 {
            Change::Create {
                name: "bench".into(),
                visibility: Visibility::Shared,
                members: w
                    .admins
                    .iter()
                    .map(|a| (a.card.identity().to_owned(), Role::Admin))
                    .collect(),
            }
        } else if i % 5 == 0 && !added.is_empty() {
            Change::Remove {
                identity: added.remove(0),
            }
        } else {
            let identity = w.members[i].card.identity().to_owned();
            added.push(identity.clone());
            Change::Add {
                identity,
                role: Role::Member,
            }
        };
        let signed = sign(&state, by, change);
        let parsed = ParsedChannelStatement::parse(signed.clone()).unwrap();
        state
            .apply(&parsed, &StatementSigner::of(&by.card).unwrap())
            .unwrap();
        out.push(signed);
    }
    out
}

fn cards(w: &World) -> BTreeMap<CardId, VerifiedCard> {
    w.admins
        .iter()
        .map(|a| (a.card.id(), a.card.clone()))
        .collect()
}

fn verify(
    state: &mut ChannelState,
    statements: Vec<SignedChannelStatement>,
    length: u64,
    cards: &BTreeMap<CardId, VerifiedCard>,
) {
    let served = ServedChain::parse(statements, length).unwrap();
    served
        .extend(state, &|_: &str, id: &CardId| cards.get(id).cloned())
        .unwrap();
}

fn bench_chain(c: &mut Criterion) {
    let w = world(1001);
    let cards = cards(&w);
    let mut group = c.benchmark_group("verify_chain");
    for n in [10usize, 100, 1000] {
        let statements = chain(&w, n + 1);
        let (first, _) = statements.split_at(n);
        group.bench_with_input(BenchmarkId::new("first_look", n), &n, |b, _| {
            b.iter(|| {
                let mut state = ChannelState::empty(CH);
                verify(&mut state, black_box(first.to_vec()), n as u64, &cards);
                state
            });
        });
        let mut kept = ChannelState::empty(CH);
        verify(&mut kept, first.to_vec(), n as u64, &cards);
        // The server shows the kept head again, then the new statement.
        let next = statements[n - 1..=n].to_vec();
        group.bench_with_input(BenchmarkId::new("extend_by_one", n), &n, |b, _| {
            b.iter_batched(
                || (kept.clone(), next.clone()),
                |(mut state, next)| {
                    verify(&mut state, black_box(next), n as u64 + 1, &cards);
                    state
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn bench_message(c: &mut Criterion) {
    let w = world(9);
    let cards = cards(&w);
    // A channel of 10: admin0 created it with the nine members.
    let mut state = ChannelState::empty(CH);
    let mut members: Vec<(String, Role)> = w
        .members
        .iter()
        .map(|m| (m.card.identity().to_owned(), Role::Member))
        .collect();
    members.push((w.admins[0].card.identity().to_owned(), Role::Admin));
    members.sort();
    let genesis = sign(
        &state,
        &w.admins[0],
        Change::Create {
            name: "bench".into(),
            visibility: Visibility::Shared,
            members,
        },
    );
    verify(&mut state, vec![genesis], 1, &cards);
    let epoch = Epoch {
        number: 0,
        hash: state.head().unwrap(),
    };
    let sender = &w.admins[0];
    let receiver = &w.members[0];
    let everyone: Vec<&Device> = std::iter::once(sender).chain(&w.members).collect();
    let devices: BTreeMap<CardId, String> = everyone
        .iter()
        .map(|d| (d.card.id(), d.card.identity().to_owned()))
        .collect();
    let recipients: Vec<Recipient<'_>> = everyone
        .iter()
        .map(|d| Recipient {
            card_id: *d.card.id().as_bytes(),
            key: d.card.encryption_key(),
        })
        .collect();
    let seal = |epoch: Option<Epoch>| {
        envelope::seal(
            &Sender {
                identity: sender.card.identity(),
                card_id: *sender.card.id().as_bytes(),
                key: &sender.keys.signing,
            },
            &Draft {
                channel_id: CH,
                content_type: CONTENT_TYPE_TEXT,
                body: b"meet at noon",
                sent_at_ms: 0,
                epoch,
            },
            &recipients,
        )
        .unwrap()
    };
    let open = |bytes: &[u8]| {
        ParsedEnvelope::parse(bytes)
            .unwrap()
            .open(
                &Opener {
                    card_id: *receiver.card.id().as_bytes(),
                    secret: &receiver.keys.encryption,
                },
                &ExpectedSender {
                    identity: sender.card.identity(),
                    card_id: *sender.card.id().as_bytes(),
                    key: sender.card.signing_key(),
                },
            )
            .unwrap()
    };
    let mut group = c.benchmark_group("message");
    group.bench_function("seal/v1", |b| b.iter(|| seal(black_box(None))));
    group.bench_function("seal/v2", |b| b.iter(|| seal(black_box(Some(epoch)))));
    let v1 = seal(None).envelope;
    let v2 = seal(Some(epoch)).envelope;
    group.bench_function("open/v1", |b| b.iter(|| open(black_box(&v1))));
    group.bench_function("open/v2", |b| {
        b.iter(|| {
            let payload = open(black_box(&v2));
            let named = payload.epoch.unwrap();
            assert_eq!(state.hash_at(named.number), Some(named.hash));
            assert!(state.was_member(&payload.sender_identity, named.number));
            let members = state.members_at(named.number);
            for id in &payload.recipient_card_ids {
                let owner = &devices[&CardId::from_array(*id)];
                assert!(members.contains(&owner.as_str()));
            }
            payload
        });
    });
    group.finish();
}

criterion_group!(benches, bench_chain, bench_message);
criterion_main!(benches);
