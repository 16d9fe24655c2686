//! Two of tonic's answers to bad input name the wrong party: a request above
//! the decoding limit gets `OUT_OF_RANGE` (gRPC's convention, and Tessera's,
//! is `RESOURCE_EXHAUSTED`), and a body that is not valid protobuf gets
//! `INTERNAL` (it is the caller's `INVALID_ARGUMENT`). This layer rewrites
//! exactly those two answers, keeping tonic's message, which says what was
//! wrong (and for sizes, the size and the limit).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";
const INTERNAL: &str = "13";
const INVALID_ARGUMENT: &str = "3";

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StatusRewriteLayer;

impl<S> Layer<S> for StatusRewriteLayer {
    type Service = StatusRewrite<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusRewrite { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct StatusRewrite<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StatusRewrite<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            let headers = response.headers_mut();
            let status = headers
                .get("grpc-status")
                .and_then(|s| s.to_str().ok())
                .unwrap_or_default();
            let message = headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or_default();
            let rewritten = match status {
                OUT_OF_RANGE if message.contains("message%20length%20too%20large") => {
                    Some(RESOURCE_EXHAUSTED)
                }
                INTERNAL if message.contains("failed%20to%20decode%20Protobuf%20message") => {
                    Some(INVALID_ARGUMENT)
                }
                _ => None,
            };
            if let Some(code) = rewritten {
                headers.insert("grpc-status", HeaderValue::from_static(code));
            }
            Ok(response)
        })
    }
}
