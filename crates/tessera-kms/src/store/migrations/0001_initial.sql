-- The key service's records: the log, the card records, the device lists
-- and the latest signed checkpoint. Records are the prost messages of
-- `store/mod.rs` (StoredCard, StoredDeviceList, SignedCheckpoint); the
-- columns beside them are what the queries look up by.

CREATE TABLE kms_log (
    idx BIGINT PRIMARY KEY CHECK (idx >= 0),
    entry BYTEA NOT NULL,
    leaf_hash BYTEA NOT NULL CHECK (length(leaf_hash) = 32)
);

CREATE TABLE kms_cards (
    card_id BYTEA PRIMARY KEY CHECK (length(card_id) = 32),
    identity TEXT COLLATE "C" NOT NULL,
    registration_index BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX kms_cards_by_identity ON kms_cards (identity, registration_index);

CREATE TABLE kms_device_lists (
    -- Byte order (COLLATE "C"), as the index is read page by page.
    identity TEXT COLLATE "C" PRIMARY KEY,
    record BYTEA NOT NULL
);

-- One row: the latest signed checkpoint.
CREATE TABLE kms_checkpoint (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    checkpoint BYTEA NOT NULL
);
