//! A service served with `--tls-cert/--tls-key` speaks TLS: a client that
//! trusts the certificate reaches it, a plaintext client and a client that
//! trusts a different certificate do not.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use tessera_service::serve::{self, Running, ServeOptions, TlsFiles};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn self_signed(dir: &std::path::Path, name: &str) -> (TlsFiles, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("generate certificate");
    let cert_pem = cert.cert.pem();
    let files = TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, &cert_pem).unwrap();
    std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
    (files, cert_pem)
}

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

async fn tls_channel(port: u16, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://localhost:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name("localhost"),
        )?
        .connect()
        .await
}

#[tokio::test]
async fn tls_is_served_and_only_the_trusted_certificate_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (files, ca_pem) = self_signed(dir.path(), "server");
    let (_, other_pem) = self_signed(dir.path(), "other");

    let routes = serve::with_health_and_reflection(Default::default(), &[])
        .await
        .unwrap();
    let listener = serve::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
    let running = Running::spawn(
        routes,
        listener,
        ServeOptions {
            tls: Some(files),
            ..ServeOptions::default()
        },
    )
    .unwrap();
    let port = running.addr().port();

    // Trusting the server's certificate: health answers SERVING (1).
    let channel = tls_channel(port, &ca_pem).await.expect("TLS connect");
    assert_eq!(health(channel).await.expect("health over TLS"), 1);

    // Trusting some other certificate: the handshake fails.
    let wrong = match tls_channel(port, &other_pem).await {
        Err(_) => true,
        Ok(channel) => health(channel).await.is_err(),
    };
    assert!(wrong, "a client trusting another CA must not get through");

    // Plaintext HTTP/2 against the TLS port gets no answer.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let plain_failed = match plain.connect().await {
        Err(_) => true,
        Ok(channel) => health(channel).await.is_err(),
    };
    assert!(plain_failed, "plaintext must not reach a TLS service");

    running.stop().await.unwrap();
}

#[tokio::test]
async fn unreadable_tls_files_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let routes = serve::with_health_and_reflection(Default::default(), &[])
        .await
        .unwrap();
    let listener = serve::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
    let missing = dir.path().join("missing.crt");
    let options = ServeOptions {
        tls: Some(TlsFiles {
            cert: missing.clone(),
            key: dir.path().join("missing.key"),
        }),
        ..ServeOptions::default()
    };
    let err = serve::serve(routes, listener, &options, std::future::pending())
        .await
        .expect_err("missing files must fail");
    let message = err.to_string();
    assert!(
        message.contains("missing.crt"),
        "error names the file: {message}"
    );

    // A key file that is not PEM is rejected before serving.
    let (files, _) = self_signed(dir.path(), "server");
    std::fs::write(&files.key, b"not a key").unwrap();
    let routes = serve::with_health_and_reflection(Default::default(), &[])
        .await
        .unwrap();
    let listener = serve::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
    let options = ServeOptions {
        tls: Some(files),
        ..ServeOptions::default()
    };
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        serve::serve(routes, listener, &options, std::future::pending()),
    )
    .await
    .expect("a bad key must not leave the server hanging");
    assert!(result.is_err(), "a bad key must be refused");
}
