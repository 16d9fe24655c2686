//! The throwaway PostgreSQL server: real queries through tokio-postgres, a
//! restart that keeps the data, and nothing left behind after the test,
//! even one that panics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{net::TcpStream, path::Path, sync::Mutex};

use tessera_testkit::Postgres;
use tokio_postgres::{Client, NoTls};

async fn connect(pg: &Postgres) -> Client {
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", pg.url("postgres"), pg.log()));
    tokio::spawn(connection);
    client
}

fn gone(port: u16, dir: &Path) {
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on {port}"
    );
}

#[tokio::test]
async fn a_throwaway_server_answers_queries_keeps_data_across_a_restart_and_leaves_nothing() {
    let mut pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let client = connect(&pg).await;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version >= 150_000, "PostgreSQL {version} is older than 15");
    client
        .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL)")
        .await
        .unwrap();
    for (id, body) in [(1i64, "one"), (2, "two"), (3, "three")] {
        client
            .execute("INSERT INTO notes VALUES ($1, $2)", &[&id, &body])
            .await
            .unwrap();
    }
    let duplicate = client
        .execute("INSERT INTO notes VALUES ($1, $2)", &[&1i64, &"again"])
        .await
        .unwrap_err();
    assert_eq!(
        duplicate.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );

    drop(client);
    pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    let client = connect(&pg).await;
    let row = client
        .query_one(
            "SELECT count(*), string_agg(body, ',' ORDER BY id) FROM notes",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    assert_eq!(row.get::<_, String>(1), "one,two,three");

    let (port, dir) = (pg.port(), pg.dir().to_path_buf());
    drop(client);
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    gone(port, &dir);
}

#[test]
fn a_test_that_panics_still_stops_and_removes_its_server() {
    let started = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let pg = Postgres::start();
        *started.lock().unwrap() = Some((pg.port(), pg.dir().to_path_buf()));
        assert!(TcpStream::connect(("127.0.0.1", pg.port())).is_ok());
        panic!("the test failed");
    });
    assert!(result.is_err());
    let (port, dir) = started.lock().unwrap().take().unwrap();
    gone(port, &dir);
}

/// What the server runs with: `fsync` off for tests, on when started
/// durable (benchmarks), also after a restart; `synchronous_commit` on.
#[tokio::test]
async fn fsync_is_off_for_tests_and_on_for_a_durable_server_and_commits_stay_synchronous() {
    async fn settings(pg: &Postgres) -> (String, String) {
        let row = connect(pg)
            .await
            .query_one(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
    let on = |s: &str| (s.to_owned(), "on".to_owned());
    let test = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    assert!(!test.fsync());
    assert_eq!(settings(&test).await, on("off"));
    let mut durable = tokio::task::spawn_blocking(Postgres::start_durable)
        .await
        .unwrap();
    assert!(durable.fsync());
    assert_eq!(settings(&durable).await, on("on"));
    durable = tokio::task::spawn_blocking(move || {
        durable.restart();
        durable
    })
    .await
    .unwrap();
    assert_eq!(settings(&durable).await, on("on"), "after a restart");
    tokio::task::spawn_blocking(move || drop((test, durable)))
        .await
        .unwrap();
}
