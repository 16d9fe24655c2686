//! Serving a service: gRPC over tonic with the health and reflection
//! services, optional TLS (rustls), graceful shutdown on SIGTERM / Ctrl-C
//! with a bounded grace period.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use thiserror::Error;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    service::Routes,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::ServingStatus;

/// Why a service could not be served.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Tls(String),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Certificate chain and private key, both PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub tls: Option<TlsFiles>,
    /// How long in-flight calls may run after shutdown was requested.
    pub grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            tls: None,
            grace: Duration::from_secs(10),
        }
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::TlsFile {
        path: path.clone(),
        source,
    })
}

/// The gRPC name of the health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The gRPC name of the reflection service.
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// Adds health (every name in `service_names` reported SERVING) and
/// reflection to `routes`. Reflection lists exactly `service_names`, health
/// and itself, and describes only the proto files that define them and what
/// those files import: a client never sees a service this server does not
/// serve.
pub async fn with_health_and_reflection(
    routes: Routes,
    service_names: &[&str],
) -> Result<Routes, ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    for name in service_names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(descriptors_for(service_names)?)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE);
    for name in service_names {
        builder = builder.with_service_name(*name);
    }
    let reflection = builder
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    Ok(routes.add_service(health).add_service(reflection))
}

/// The files of Tessera's descriptor set that define one of `services`
/// (fully qualified names), with every file they import, transitively, and
/// no other service.
fn descriptors_for(services: &[&str]) -> Result<prost_types::FileDescriptorSet, ServeError> {
    use prost::Message as _;
    let all = prost_types::FileDescriptorSet::decode(tessera_proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let names = |file: &prost_types::FileDescriptorProto| -> Vec<String> {
        file.service
            .iter()
            .map(|s| format!("{}.{}", file.package(), s.name()))
            .collect()
    };
    if let Some(missing) = services
        .iter()
        .find(|s| !all.file.iter().any(|f| names(f).iter().any(|n| n == *s)))
    {
        return Err(ServeError::Reflection(format!(
            "no proto file defines the service {missing}"
        )));
    }
    let mut wanted: Vec<String> = all
        .file
        .iter()
        .filter(|f| names(f).iter().any(|n| services.contains(&n.as_str())))
        .map(|f| f.name().to_owned())
        .collect();
    let mut i = 0;
    while let Some(name) = wanted.get(i).cloned() {
        if let Some(file) = all.file.iter().find(|f| f.name() == name) {
            for dep in &file.dependency {
                if !wanted.contains(dep) {
                    wanted.push(dep.clone());
                }
            }
        }
        i += 1;
    }
    // A file pulled in only for its messages (the app server's protos
    // import the key service's) keeps them but loses its services.
    let file = all
        .file
        .into_iter()
        .filter(|f| wanted.iter().any(|w| w == f.name()))
        .map(|mut f| {
            let package = f.package().to_owned();
            f.service
                .retain(|s| services.contains(&format!("{package}.{}", s.name()).as_str()));
            f
        })
        .collect();
    Ok(prost_types::FileDescriptorSet { file })
}

/// Binds `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves `routes` on `listener` until `shutdown` resolves, then lets
/// in-flight calls finish for at most `options.grace`. Every call is counted
/// and timed when metrics are on ([`crate::metrics`]).
pub async fn serve(
    routes: Routes,
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = &options.tls {
        let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let (stopping_tx, stopping_rx) = oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new calls, in-flight calls may finish");
        let _ = stopping_tx.send(());
    };
    // The builder's tcp_nodelay only applies to listeners tonic binds itself:
    // set it on the accepted sockets here, or multi-frame responses wait on
    // Nagle's algorithm and delayed ACKs (~40 ms each).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    // The first layer is the outermost: metrics see the rewritten status.
    let server = builder
        .layer(crate::rpc_metrics::RpcMetricsLayer)
        .layer(crate::status_rewrite::StatusRewriteLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = options.grace;
    tokio::select! {
        result = server => result.map_err(ServeError::from),
        () = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining calls");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A service running in this process (tests, `tessera stack`).
pub struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Running {
    /// Spawns `serve` on the current runtime.
    pub fn spawn(
        routes: Routes,
        listener: TcpListener,
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(routes, listener, &options, async move {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the service and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
