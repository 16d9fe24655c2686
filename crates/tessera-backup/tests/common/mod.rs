//! What the backup service's test files share.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "test code; each test file uses some of it"
)]

use std::sync::Arc;

use tessera_client::{Client, Content, HistoryEntry, Received};

/// The messages of a channel as `client` reads them from the app server.
pub(crate) async fn received(client: &Client, channel_id: &str) -> Vec<Received> {
    client
        .history(channel_id, 0, 100, false)
        .await
        .unwrap()
        .messages
        .into_iter()
        .map(|(_, r)| r.unwrap())
        .collect()
}

/// The texts of synced history, failing on any refused entry.
pub(crate) fn texts(entries: &[HistoryEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| match &e.result {
            Ok(r) => match &r.content {
                Content::Text(t) => t.clone(),
                other => panic!("message {}: {other:?}", e.index),
            },
            Err(err) => panic!("message {} refused: {err}", e.index),
        })
        .collect()
}

/// Two devices of one member back up one message (each its own copy) at
/// the same moment, twice each; returns how many of the four were stored.
pub(crate) async fn back_up_at_once(devices: &[Arc<Client>; 2], copies: [&Received; 2]) -> usize {
    let calls: Vec<_> = (0..4)
        .map(|n| {
            let device = devices[n % 2].clone();
            let m = copies[n % 2].clone();
            tokio::spawn(async move { device.back_up(&m).await })
        })
        .collect();
    let mut stored = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(true) => stored += 1,
            Ok(false) => {}
            Err(e) => panic!("message {}: a backup failed: {e}", copies[0].index),
        }
    }
    stored
}

/// Rows in the archive of the backup service on the PostgreSQL database `url`.
pub(crate) async fn archived_rows(url: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_one("SELECT count(*) FROM backup_archive", &[])
        .await
        .unwrap()
        .get(0)
}
