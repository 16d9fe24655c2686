//! The fuzz target bodies of `fuzz/` run on stable over the checked-in seed
//! corpus (`fuzz/corpus/<target>/`) and over deterministic mutations of it,
//! so `cargo test --workspace` exercises every decoder the fuzzers cover
//! without a nightly compiler. `TESSERA_WRITE_FUZZ_SEEDS=1` rewrites the
//! seeds (valid inputs made with the real encoders) before running.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "../fuzz/src/bodies.rs"]
mod bodies;
#[path = "../fuzz/src/seeds.rs"]
mod seeds;

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// xorshift64*: a fixed, dependency-free source of mutations.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..1 + self.next() % 4 {
            let n = self.next();
            match n % 5 {
                0 if !out.is_empty() => {
                    let i = (n >> 8) as usize % out.len();
                    out[i] ^= 1 << ((n >> 4) % 8);
                }
                1 if !out.is_empty() => {
                    let i = (n >> 8) as usize % out.len();
                    out.truncate(i);
                }
                2 => out.push((n >> 8) as u8),
                3 if !out.is_empty() => {
                    let i = (n >> 8) as usize % out.len();
                    out[i] = (n >> 16) as u8;
                }
                _ if out.len() > 1 => {
                    let i = (n >> 8) as usize % out.len();
                    out.remove(i);
                }
                _ => out.push(0),
            }
        }
        out
    }
}

#[test]
fn every_fuzz_target_runs_over_its_seed_corpus_and_mutations() {
    if std::env::var_os("TESSERA_WRITE_FUZZ_SEEDS").is_some() {
        seeds::write_all(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus"));
    }
    let mut mutator = Mutator(0x5eed_1234_abcd_0001);
    for (name, body) in bodies::TARGETS {
        let dir = corpus_dir(name);
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        inputs.sort();
        assert!(
            inputs.len() >= 2,
            "{name}: the seed corpus has {} inputs",
            inputs.len()
        );
        for input in &inputs {
            body(input);
            for _ in 0..40 {
                body(&mutator.mutate(input));
            }
        }
    }
}
