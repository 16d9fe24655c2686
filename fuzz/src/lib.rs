//! Tessera's fuzz target bodies; `fuzz_targets/*.rs` call one each.

#[path = "bodies.rs"]
pub mod bodies;
