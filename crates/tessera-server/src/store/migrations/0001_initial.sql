-- The app server's schema. Records are the store's prost structs (`record`
-- columns); the columns beside them are what queries select and order by.

CREATE TABLE server_accounts (
    identity TEXT PRIMARY KEY,
    record BYTEA NOT NULL
);

CREATE TABLE server_devices (
    card_id BYTEA PRIMARY KEY,
    identity TEXT NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX server_devices_by_identity ON server_devices (identity, card_id);

CREATE TABLE server_org_members (
    identity TEXT PRIMARY KEY
);

-- One row per channel; appends lock it (SELECT ... FOR UPDATE): the
-- compare-and-set on the membership chain's head and the next message
-- index are decided under that row lock.
CREATE TABLE server_channels (
    channel_id TEXT PRIMARY KEY,
    record BYTEA NOT NULL
);

CREATE TABLE server_members (
    channel_id TEXT NOT NULL,
    identity TEXT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (channel_id, identity)
);
CREATE INDEX server_members_by_identity ON server_members (identity, channel_id);

CREATE TABLE server_chain (
    channel_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    entry BYTEA NOT NULL,
    PRIMARY KEY (channel_id, epoch)
);

CREATE TABLE server_messages (
    channel_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (channel_id, idx)
);

CREATE TABLE server_dedupe (
    channel_id TEXT NOT NULL,
    client_message_id BYTEA NOT NULL,
    idx BIGINT NOT NULL,
    PRIMARY KEY (channel_id, client_message_id)
);

CREATE TABLE server_read_horizons (
    identity TEXT NOT NULL,
    channel_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    PRIMARY KEY (identity, channel_id)
);

CREATE TABLE server_attachments (
    attachment_id TEXT PRIMARY KEY,
    record BYTEA NOT NULL
);

CREATE TABLE server_usage (
    identity TEXT PRIMARY KEY,
    record BYTEA NOT NULL
);

CREATE TABLE server_sender_key_chains (
    channel_id TEXT NOT NULL,
    sender_card_id BYTEA NOT NULL,
    chain_id BYTEA NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (channel_id, sender_card_id, chain_id)
);

CREATE TABLE server_sender_keys (
    channel_id TEXT NOT NULL,
    sender_card_id BYTEA NOT NULL,
    chain_id BYTEA NOT NULL,
    recipient_card_id BYTEA NOT NULL,
    copy BYTEA NOT NULL,
    PRIMARY KEY (channel_id, sender_card_id, chain_id, recipient_card_id)
);
