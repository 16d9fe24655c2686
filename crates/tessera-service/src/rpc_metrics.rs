//! Counts and times every gRPC call of a service ([`RPC_REQUESTS`],
//! [`RPC_DURATION`]): one tower layer around all of a server's routes, so
//! no service repeats it.
//!
//! A call's status is in the response headers when it failed before
//! answering (a "trailers-only" response), else in the trailers that end
//! the response body; the body is wrapped to see them. A body dropped
//! before its trailers (the client went away) counts as `CANCELLED`.
//! When metrics are off the layer only passes calls through.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message as _;
use tower::{Layer, Service};

use crate::metrics::{RPC_DURATION, RPC_REQUESTS, enabled};

/// gRPC status names by code.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of the status in `headers` (`grpc-status`), if any.
fn code(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code: usize = value.to_str().ok()?.parse().ok()?;
    Some(CODES.get(code).copied().unwrap_or("UNKNOWN"))
}

/// `/package.Service/Method` → (service, method), for every method the
/// services serve (Tessera's, health, reflection); anything else is
/// `("unknown", "unknown")`. Built once from the descriptor sets.
fn method_labels(path: &str) -> (&'static str, &'static str) {
    static KNOWN: OnceLock<HashMap<String, (&'static str, &'static str)>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut known = HashMap::new();
        for set in [
            tessera_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    let full = format!("{}.{}", file.package(), service.name());
                    // Labels must be 'static; these few strings live as long
                    // as the process anyway.
                    let service_label: &'static str = full.clone().leak();
                    for method in &service.method {
                        let method_label: &'static str = method.name().to_owned().leak();
                        known.insert(
                            format!("/{full}/{}", method.name()),
                            (service_label, method_label),
                        );
                    }
                }
            }
        }
        known
    });
    known.get(path).copied().unwrap_or(("unknown", "unknown"))
}

/// A call not yet counted.
struct Pending {
    service: &'static str,
    method: &'static str,
    started: Instant,
}

impl Pending {
    fn finish(self, code: &'static str) {
        metrics::counter!(
            RPC_REQUESTS,
            "service" => self.service,
            "method" => self.method,
            "code" => code
        )
        .increment(1);
        metrics::histogram!(RPC_DURATION, "service" => self.service, "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let pending = enabled().then(|| {
            let (service, method) = method_labels(request.uri().path());
            Pending {
                service,
                method,
                started: Instant::now(),
            }
        });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let pending = match (pending, code(response.headers())) {
                (Some(pending), Some(code)) => {
                    // Trailers-only: the call ended here.
                    pending.finish(code);
                    None
                }
                (pending, _) => pending,
            };
            Ok(response.map(|inner| MeteredBody { inner, pending }))
        })
    }
}

/// A response body that counts its call when its trailers pass.
pub(crate) struct MeteredBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: &'static str) {
        if let Some(pending) = self.pending.take() {
            pending.finish(code);
        }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.finish(code(trailers).unwrap_or("UNKNOWN"));
                }
            }
            Poll::Ready(Some(Err(_)) | None) => this.finish("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_labels() {
        assert_eq!(
            method_labels("/tessera.kms.v1.KeyDirectory/SearchCards"),
            ("tessera.kms.v1.KeyDirectory", "SearchCards")
        );
        assert_eq!(
            method_labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        for path in [
            "/tessera.kms.v1.KeyDirectory/NoSuchMethod",
            "/made.up.Service/Call",
            "/",
            "",
        ] {
            assert_eq!(method_labels(path), ("unknown", "unknown"), "{path}");
        }
    }

    #[test]
    fn status_names() {
        let mut headers = HeaderMap::new();
        assert_eq!(code(&headers), None);
        headers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(code(&headers), Some("OK"));
        headers.insert("grpc-status", "16".parse().unwrap());
        assert_eq!(code(&headers), Some("UNAUTHENTICATED"));
        headers.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(code(&headers), Some("UNKNOWN"));
    }
}
