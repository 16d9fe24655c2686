//! Announcements between app-server replicas sharing one PostgreSQL
//! database: the transaction that stores a message or a membership
//! statement also sends `NOTIFY` on [`CHANNEL`] with the channel id and the
//! message's index (or the chain's new length), never any content; each
//! replica holds one connection that `LISTEN`s and hands what it hears to
//! its live subscriptions, which read what they lack from the store.
//!
//! PostgreSQL delivers a notification only once its transaction has
//! committed, in commit order, to the connections listening then. One
//! sent while this replica's connection was down is lost, so after a
//! reconnection [`Announced::Missed`] tells every subscription to read
//! the store again.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt as _;
use tessera_service::{
    metrics,
    postgres::{PgOptions, PgSetupError, config, pg_error},
    storage::StorageError,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

/// The notification channel the app server's transactions send on.
pub(crate) const CHANNEL: &str = "tessera_server_events";

/// First and longest pause before connecting again.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often an idle listening connection is checked (a connection that
/// died without a word, behind a dead network path, is noticed within
/// about this long plus [`PING_TIMEOUT`]).
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// What a replica heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announced {
    /// A message was stored at `index`.
    Message { channel_id: String, index: u64 },
    /// The membership chain grew to `length` statements.
    Chain { channel_id: String, length: u64 },
    /// The listening connection was lost and is back: announcements sent
    /// meanwhile may be lost.
    Missed,
}

impl Announced {
    /// The payload of the notification (the channel id is 32 hex digits:
    /// well under PostgreSQL's 8000-byte limit).
    pub(crate) fn payload(&self) -> Option<String> {
        match self {
            Self::Message { channel_id, index } => Some(format!("m {channel_id} {index}")),
            Self::Chain { channel_id, length } => Some(format!("c {channel_id} {length}")),
            Self::Missed => None,
        }
    }

    /// The announcement a payload carries, if it is one.
    pub(crate) fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.split(' ');
        let (kind, channel_id, n) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || channel_id.is_empty() {
            return None;
        }
        // Indices and lengths are BIGINT in the database.
        let n: u64 = n.parse().ok().filter(|&n| i64::try_from(n).is_ok())?;
        let channel_id = channel_id.to_owned();
        match kind {
            "m" => Some(Self::Message {
                channel_id,
                index: n,
            }),
            "c" => Some(Self::Chain {
                channel_id,
                length: n,
            }),
            _ => None,
        }
    }
}

/// Sends `announced` when the transaction `tx` commits (not if it rolls
/// back).
pub(crate) async fn notify(
    tx: &impl GenericClient,
    announced: &Announced,
) -> Result<(), StorageError> {
    if let Some(payload) = announced.payload() {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await
            .map_err(pg_error)?;
    }
    Ok(())
}

/// The listening task of a replica; stops it when dropped.
pub struct Listening(JoinHandle<()>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on the database `options` names and hands every announcement
/// to `deliver`, until `deliver` answers `false` or the [`Listening`] is
/// dropped. Fails if the first connection fails; later losses are
/// reconnected with backoff (logged, counted in
/// `tessera_server_listen_reconnects_total`) and followed by
/// [`Announced::Missed`].
pub async fn listen<F>(options: &PgOptions, deliver: F) -> Result<Listening, PgSetupError>
where
    F: FnMut(Announced) -> bool + Send + 'static,
{
    let config = config(options, "tessera-server listen")?;
    let first = Connection::open(&config).await?;
    Ok(Listening(tokio::spawn(run(config, first, deliver))))
}

/// A listening connection and what it hears.
struct Connection {
    client: Client,
    /// Ends when the connection does.
    heard: mpsc::UnboundedReceiver<Notification>,
}

impl Connection {
    async fn open(config: &tokio_postgres::Config) -> Result<Self, StorageError> {
        let (client, mut connection) = config.connect(NoTls).await.map_err(pg_error)?;
        let (tx, heard) = mpsc::unbounded_channel();
        // Drives the connection (also for the client's own queries) and
        // passes its notifications on; ends with it.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {} // a notice
                    Err(e) => {
                        tracing::warn!(error = %e, "the database connection listening for other replicas' messages failed");
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(pg_error)?;
        Ok(Self { client, heard })
    }

    /// Hands what it hears to `deliver` until the connection is lost
    /// (`Ok`, with why) or `deliver` wants no more (`Err`).
    async fn serve<F>(&mut self, deliver: &mut F) -> Result<String, ()>
    where
        F: FnMut(Announced) -> bool,
    {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await; // the first tick is now
        loop {
            tokio::select! {
                heard = self.heard.recv() => {
                    let Some(n) = heard else {
                        return Ok("the connection ended".into());
                    };
                    match Announced::parse(n.payload()) {
                        Some(announced) => {
                            if !deliver(announced) {
                                return Err(());
                            }
                        }
                        None => tracing::warn!(channel = n.channel(), "an announcement that is not one of the app server's; ignored"),
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, self.client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ok(e.to_string()),
                        Err(_) => return Ok(format!("no answer within {PING_TIMEOUT:?}")),
                    }
                }
            }
        }
    }
}

async fn run<F>(config: tokio_postgres::Config, mut connection: Connection, mut deliver: F)
where
    F: FnMut(Announced) -> bool,
{
    loop {
        let Ok(lost) = connection.serve(&mut deliver).await else {
            return;
        };
        tracing::warn!(why = %lost, "lost the database connection that hears other replicas' messages; reconnecting");
        let mut pause = RECONNECT_FIRST;
        connection = loop {
            tokio::time::sleep(pause).await;
            match Connection::open(&config).await {
                Ok(connection) => break connection,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "cannot listen to the database yet");
                    pause = (pause * 2).min(RECONNECT_MAX);
                }
            }
        };
        metrics::increment(metrics::SERVER_LISTEN_RECONNECTS);
        tracing::info!(
            "listening to the database again; every live subscription reads the store again"
        );
        if !deliver(Announced::Missed) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_back_and_nothing_else_does() {
        let id = "00112233445566778899aabbccddeeff".to_owned();
        for a in [
            Announced::Message {
                channel_id: id.clone(),
                index: 7,
            },
            Announced::Chain {
                channel_id: id.clone(),
                length: i64::MAX as u64,
            },
        ] {
            assert_eq!(Announced::parse(&a.payload().unwrap()), Some(a));
        }
        assert_eq!(Announced::Missed.payload(), None);
        for bad in [
            "",
            "m",
            "m id",
            "m id x",
            "m id -1",
            "x id 1",
            "m  1",
            "m id 1 2",
            // Past a BIGINT: no index or length is that large.
            "m id 9223372036854775808",
            "c id 18446744073709551615",
        ] {
            assert_eq!(Announced::parse(bad), None, "{bad:?}");
        }
    }
}
