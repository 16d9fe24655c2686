-- The backup service's archive: one row per archived message, the first
-- record stored for it kept for good (the primary key makes a second one
-- a conflict, which `INSERT ... ON CONFLICT DO NOTHING` leaves out). The
-- record is the prost message `Archived` of `store/mod.rs`; the columns
-- beside it are what the queries look up by.

CREATE TABLE backup_archive (
    -- Byte order (COLLATE "C"): a channel id is compared whole.
    channel_id TEXT COLLATE "C" NOT NULL,
    message_index BIGINT NOT NULL CHECK (message_index >= 0),
    record BYTEA NOT NULL,
    PRIMARY KEY (channel_id, message_index)
);
