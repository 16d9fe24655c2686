//! Compiles `proto/` with protox (pure Rust: no protoc needed) and generates
//! prost messages plus tonic stubs, the stubs gated behind the crate's
//! `client` / `server` features.

use std::{env, path::PathBuf};

/// Messages whose `Debug` is written by hand in `src/redacted.rs`.
const REDACTED: [&str; 13] = [
    ".tessera.envelope.v1.KeptSenderChain",
    ".tessera.envelope.v1.KeptReceiverChain",
    ".tessera.envelope.v1.FileAttachment",
    ".tessera.envelope.v1.SignedPayload",
    ".tessera.envelope.v1.SealedContent",
    ".tessera.envelope.v1.HistoryItem",
    ".tessera.envelope.v1.SenderKeyContent",
    ".tessera.envelope.v1.SignedSenderKey",
    ".tessera.backup.v1.BackupRecord",
    ".tessera.auth.v1.AccessToken",
    ".tessera.server.v1.SignUpRequest",
    ".tessera.server.v1.LoginRequest",
    ".tessera.server.v1.LoginResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let files = [
        "tessera/card/v1/card.proto",
        "tessera/card/v1/device_list.proto",
        "tessera/channel/v1/channel.proto",
        "tessera/envelope/v1/envelope.proto",
        "tessera/envelope/v1/group.proto",
        "tessera/transparency/v1/log.proto",
        "tessera/auth/v1/token.proto",
        "tessera/kms/v1/kms.proto",
        "tessera/server/v1/server.proto",
        "tessera/backup/v1/backup.proto",
        "tessera/bench/v1/echo.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    let fds = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tessera_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        // Messages that hold a secret or plaintext get a hand-written Debug
        // that leaves it out (src/redacted.rs).
        .skip_debug(REDACTED)
        // A search answer carries an inclusion proof per card and per device
        // list statement, 20 hashes each at a million cards: as `Bytes`, the
        // key service slices them out of one buffer per proof and a reader
        // decodes them as slices of the received frame, instead of one
        // allocation per hash on each side (docs/benchmarks.md). Same bytes
        // on the wire.
        .bytes(".tessera.transparency.v1.InclusionProof.hashes")
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .client_mod_attribute(".", r#"#[cfg(feature = "client")]"#)
        .server_mod_attribute(".", r#"#[cfg(feature = "server")]"#)
        .compile_fds(fds)?;
    Ok(())
}
