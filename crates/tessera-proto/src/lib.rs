//! Tessera's wire format: every card, envelope, proof and RPC is a protobuf
//! message defined once in `proto/` and compiled here.
//!
//! Messages are always available; the tonic stubs need the `client` and/or
//! `server` features. [`FILE_DESCRIPTOR_SET`] feeds gRPC reflection.

#![allow(
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    reason = "generated code"
)]

/// Encoded `FileDescriptorSet` of every Tessera proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));

pub use prost::{Message, bytes::Bytes};

/// Cards: the public identity of a device or an organisation.
pub mod card {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.card.v1.rs"));
    }
}

/// Channel membership statements (protocol v2).
pub mod channel {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.channel.v1.rs"));
    }
}

/// Sign-then-encrypt multi-recipient messages.
pub mod envelope {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.envelope.v1.rs"));
    }
}

/// The key service's transparency log.
pub mod transparency {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.transparency.v1.rs"));
    }
}

/// Access tokens.
pub mod auth {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.auth.v1.rs"));
    }
}

/// The key-management service.
pub mod kms {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.kms.v1.rs"));
    }
}

/// The app server.
pub mod server {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.server.v1.rs"));
    }
}

/// The organisation's backup service.
pub mod backup {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.backup.v1.rs"));
    }
}

/// The echo baseline of the load benchmarks.
pub mod bench {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.bench.v1.rs"));
    }
}

#[cfg(feature = "client")]
pub mod connect;

mod redacted;
