//! Hostile stand-ins for demos and tests: a gRPC proxy that sits between a
//! client and a real service and can tamper with what passes through — the
//! relay or directory an attacker controls. Clients must detect everything
//! it does.
//!
//! The proxy forwards any call of the services it is told to carry, as raw
//! bytes (unary and streaming calls alike: on the wire every gRPC call is a
//! stream of length-prefixed messages), and passes each response message
//! through a [`Tamper`] hook that may rewrite, drop or duplicate it.

use std::{
    convert::Infallible,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use bytes::{Buf, BufMut};
use futures_util::{StreamExt, future::BoxFuture};
use tonic::{
    Status, Streaming,
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::NamedService,
    service::Routes,
    transport::{Channel, Endpoint},
};

use tessera_service::serve::{Running, ServeOptions, bind};

/// Rewrites one response message of `method` (e.g.
/// `/tessera.kms.v1.KeyDirectory/SearchCards`); returns the messages to send
/// on instead (none drops it, two duplicate it).
pub type Tamper = Arc<dyn Fn(&str, Vec<u8>) -> Vec<Vec<u8>> + Send + Sync>;

/// Passes everything through unchanged.
pub fn honest() -> Tamper {
    Arc::new(|_, message| vec![message])
}

#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// The proxy's state: where it forwards to, how it tampers, and the
/// credentials it saw (what the operator of a service can capture).
pub struct ProxyControl {
    upstream: RwLock<Channel>,
    tamper: RwLock<Tamper>,
    captured: std::sync::Mutex<Vec<String>>,
    /// Calls forwarded so far, per method path.
    calls: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl ProxyControl {
    /// Forwards to another upstream from now on (a directory that starts
    /// showing another history).
    pub fn set_upstream(&self, url: &str) -> Result<(), String> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| e.to_string())?
            .connect_lazy();
        *self.upstream.write().map_err(|_| "poisoned".to_owned())? = channel;
        Ok(())
    }

    /// Every `authorization` header the proxy forwarded so far.
    pub fn captured_tokens(&self) -> Vec<String> {
        self.captured.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// How many calls of `method` (e.g. `/tessera.server.v1.Channels/Subscribe`)
    /// came through so far.
    pub fn calls(&self, method: &str) -> usize {
        self.calls
            .lock()
            .map(|c| c.get(method).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Tampers with responses this way from now on.
    pub fn set_tamper(&self, tamper: Tamper) {
        if let Ok(mut t) = self.tamper.write() {
            *t = tamper;
        }
    }
}

#[derive(Clone)]
struct Forward {
    control: Arc<ProxyControl>,
}

struct Method {
    path: String,
    control: Arc<ProxyControl>,
}

type MessageStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Vec<u8>, Status>> + Send>>;

impl tonic::server::StreamingService<Vec<u8>> for Method {
    type Response = Vec<u8>;
    type ResponseStream = MessageStream;
    type Future = BoxFuture<'static, Result<tonic::Response<MessageStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<Vec<u8>>>) -> Self::Future {
        let path = self.path.clone();
        let control = self.control.clone();
        if let Ok(mut calls) = control.calls.lock() {
            *calls.entry(path.clone()).or_default() += 1;
        }
        Box::pin(async move {
            let upstream = control
                .upstream
                .read()
                .map_err(|_| Status::internal("proxy poisoned"))?
                .clone();
            let tamper = control
                .tamper
                .read()
                .map_err(|_| Status::internal("proxy poisoned"))?
                .clone();
            let (metadata, extensions, inbound) = request.into_parts();
            if let Some(token) = metadata.get("authorization").and_then(|v| v.to_str().ok())
                && let Ok(mut captured) = control.captured.lock()
            {
                captured.push(token.to_owned());
            }
            let outbound = inbound.filter_map(|m| async move { m.ok() });
            let mut forwarded = tonic::Request::from_parts(metadata, extensions, outbound);
            forwarded.set_timeout(std::time::Duration::from_secs(120));
            let mut grpc = tonic::client::Grpc::new(upstream);
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let uri_path = path
                .parse()
                .map_err(|_| Status::internal("bad method path"))?;
            let response = grpc.streaming(forwarded, uri_path, RawCodec).await?;
            let (metadata, stream, extensions) = response.into_parts();
            let tampered = stream.flat_map(move |item| {
                let out: Vec<Result<Vec<u8>, Status>> = match item {
                    Ok(message) => tamper(&path, message).into_iter().map(Ok).collect(),
                    Err(status) => vec![Err(status)],
                };
                futures_util::stream::iter(out)
            });
            Ok(tonic::Response::from_parts(
                metadata,
                Box::pin(tampered) as MessageStream,
                extensions,
            ))
        })
    }
}

impl tower::Service<http::Request<Body>> for Forward {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = Method {
            path: request.uri().path().to_owned(),
            control: self.control.clone(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(64 << 20), Some(64 << 20));
            Ok(grpc.streaming(method, request).await)
        })
    }
}

macro_rules! named {
    ($($ty:ident => $name:literal),* $(,)?) => {
        $(
            #[derive(Clone)]
            struct $ty(Forward);
            impl NamedService for $ty {
                const NAME: &'static str = $name;
            }
            impl tower::Service<http::Request<Body>> for $ty {
                type Response = http::Response<Body>;
                type Error = Infallible;
                type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;
                fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                    self.0.poll_ready(cx)
                }
                fn call(&mut self, request: http::Request<Body>) -> Self::Future {
                    self.0.call(request)
                }
            }
        )*
    };
}

named!(
    KeyDirectoryProxy => "tessera.kms.v1.KeyDirectory",
    AccountsProxy => "tessera.server.v1.Accounts",
    DevicesProxy => "tessera.server.v1.Devices",
    AdminProxy => "tessera.server.v1.Admin",
    ArchiveProxy => "tessera.server.v1.Archive",
    ChannelsProxy => "tessera.server.v1.Channels",
    BackupProxy => "tessera.backup.v1.Backup",
);

/// A running hostile proxy.
pub struct Proxy {
    pub control: Arc<ProxyControl>,
    running: Running,
}

impl Proxy {
    /// A proxy on a free loopback port in front of the key service at `upstream`.
    pub async fn directory(upstream: &str) -> Result<Self, String> {
        Self::start(upstream, |f| Routes::new(KeyDirectoryProxy(f))).await
    }

    /// A proxy on a free loopback port in front of the app server at `upstream`.
    pub async fn relay(upstream: &str) -> Result<Self, String> {
        Self::start(upstream, |f| {
            Routes::new(AccountsProxy(f.clone()))
                .add_service(DevicesProxy(f.clone()))
                .add_service(AdminProxy(f.clone()))
                .add_service(ArchiveProxy(f.clone()))
                .add_service(ChannelsProxy(f))
        })
        .await
    }

    /// A proxy on a free loopback port in front of the backup service at `upstream`.
    pub async fn backup(upstream: &str) -> Result<Self, String> {
        Self::start(upstream, |f| Routes::new(BackupProxy(f))).await
    }

    async fn start(upstream: &str, routes: impl FnOnce(Forward) -> Routes) -> Result<Self, String> {
        let control = Arc::new(ProxyControl {
            upstream: RwLock::new(
                Endpoint::from_shared(upstream.to_owned())
                    .map_err(|e| e.to_string())?
                    .connect_lazy(),
            ),
            tamper: RwLock::new(honest()),
            captured: Default::default(),
            calls: Default::default(),
        });
        let listener = bind("127.0.0.1:0".parse().map_err(|_| "address")?)
            .await
            .map_err(|e| e.to_string())?;
        let running = Running::spawn(
            routes(Forward {
                control: control.clone(),
            }),
            listener,
            ServeOptions::default(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self { control, running })
    }

    pub fn url(&self) -> String {
        self.running.url()
    }

    pub async fn stop(self) {
        let _ = self.running.stop().await;
    }
}

/// A directory that adds `card` (an attacker's card, e.g. signed with
/// another AppKey or altered) to every search result for `identity`, as if
/// it were one of their devices.
pub fn inject_card(identity: String, card: tessera_proto::card::v1::Card) -> Tamper {
    use tessera_proto::{
        Message as _,
        kms::v1::{CardRecord, CardStatus, SearchCardsResponse},
    };
    Arc::new(move |method, message| {
        if method != "/tessera.kms.v1.KeyDirectory/SearchCards" {
            return vec![message];
        }
        let Ok(mut response) = SearchCardsResponse::decode(message.as_slice()) else {
            return vec![message];
        };
        for result in response
            .results
            .iter_mut()
            .filter(|r| r.identity == identity)
        {
            // A registration entry of its own, with a real record's proof
            // borrowed: the forgery must fail on its own merits.
            let inclusion = result.cards.first().and_then(|r| r.inclusion.clone());
            let entry = tessera_card::transparency::registration_entry(
                &card,
                &identity,
                tessera_service::now_secs(),
            );
            result.cards.push(CardRecord {
                status: CardStatus::Active as i32,
                revocation: None,
                registration_entry: entry,
                inclusion,
                ..Default::default()
            });
        }
        vec![response.encode_to_vec()]
    })
}

/// Rewrites every response message of `method` (e.g.
/// `/tessera.backup.v1.Backup/GetOrgInfo`) decoded as `M`; anything that
/// does not decode passes unchanged.
pub fn rewrite<M: tessera_proto::Message + Default + 'static>(
    method: &'static str,
    f: impl Fn(&mut M) + Send + Sync + 'static,
) -> Tamper {
    Arc::new(move |called, message| {
        if called != method {
            return vec![message];
        }
        match M::decode(message.as_slice()) {
            Ok(mut m) => {
                f(&mut m);
                vec![m.encode_to_vec()]
            }
            Err(_) => vec![message],
        }
    })
}

/// A relay that rewrites every stored message it delivers (live or history).
pub fn rewrite_messages(
    f: impl Fn(&mut tessera_proto::server::v1::StoredMessage) + Send + Sync + 'static,
) -> Tamper {
    use tessera_proto::{
        Message as _,
        server::v1::{ListMessagesResponse, StoredMessage},
    };
    Arc::new(move |method, message| match method {
        "/tessera.server.v1.Channels/Subscribe" => {
            match StoredMessage::decode(message.as_slice()) {
                Ok(mut m) => {
                    f(&mut m);
                    vec![m.encode_to_vec()]
                }
                Err(_) => vec![message],
            }
        }
        "/tessera.server.v1.Channels/ListMessages" => {
            match ListMessagesResponse::decode(message.as_slice()) {
                Ok(mut page) => {
                    page.messages.iter_mut().for_each(&f);
                    vec![page.encode_to_vec()]
                }
                Err(_) => vec![message],
            }
        }
        _ => vec![message],
    })
}

/// Calls `method` (e.g. `/tessera.kms.v1.KeyDirectory/GetCard`) with `body`
/// as the raw request message (valid protobuf or not) and returns the raw
/// response messages: for tests that send what no generated client would.
pub async fn raw_call(
    channel: Channel,
    method: &str,
    body: Vec<u8>,
    authorization: Option<&str>,
) -> Result<Vec<Vec<u8>>, Status> {
    let mut request = tonic::Request::new(futures_util::stream::iter(vec![body]));
    if let Some(a) = authorization {
        request.metadata_mut().insert(
            "authorization",
            a.parse().map_err(|_| Status::internal("bad header"))?,
        );
    }
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = method
        .parse()
        .map_err(|_| Status::internal("bad method path"))?;
    let mut stream = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await? {
        out.push(message);
    }
    Ok(out)
}
