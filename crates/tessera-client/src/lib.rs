//! The Tessera client library (SDK): what an application embeds, and what
//! the `tessera` CLI is built on. No printing, no argument parsing.
//!
//! A [`Client`] is one device profile ([`Home`] holds several). It makes the
//! device's keys and card ([`Client::enroll`]), logs in without a password by
//! signing a challenge, verifies every card it uses against the pinned AppKey
//! and key-service keys and the transparency log ([`Client::cards_of`]),
//! reports device changes ([`TrustEvent`]), seals each message to every
//! active card of every channel member ([`Client::send_text`]), opens and
//! verifies what arrives ([`Client::open_message`]), backs messages up to
//! the organisation ([`Client::back_up`]) and syncs history from it
//! ([`Client::sync_from_org`]), carries attachments
//! ([`Client::send_file`]), and computes safety numbers and audits the log
//! ([`Client::safety_number`], [`Client::audit`]).

mod backup;
mod channels;
mod client;
mod devices;
mod directory;
mod error;
mod files;
mod gossip;
mod messages;
mod profile;
mod recheck;
mod sender_keys;
mod state;
mod trust;

pub use backup::{HistoryEntry, OrgInfo};
pub use channels::{ChannelView, MembershipChange, RecipientDifference, VerifiedChannel};
pub use client::{Approval, Client, Enrollment};
pub use devices::OwnDevices;
pub use directory::{CardInfo, Devices, TrustEvent};
pub use error::ClientError;
pub use files::{ExistingFile, MAX_FILE_NAME_BYTES, safe_file_name};
pub use gossip::{Agreement, CheckpointView};
pub use messages::{Content, HistoryPage, MAX_BODY_BYTES, PendingDevice, Received, Sent, Source};
pub use profile::{Endpoints, Home, ProfileConfig, validate_profile_name};
pub use trust::{AuditReport, AuditedCard, AuditedStatement, Origin, SafetyCheck};

pub use tessera_card::{
    CardId, VerifiedCard,
    channel::{Change, ChannelState, Role, Visibility},
    device_list::approval_code,
    safety_number::SafetyNumber,
};
pub use tessera_crypto::keystore::KdfParams;
pub use tessera_proto::{
    envelope::v1::FileAttachment,
    kms::v1::CardStatus,
    server::v1::{Channel, ChannelEvent, Device, Member, StoredMessage, channel_event},
};
