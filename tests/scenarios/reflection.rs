//! gRPC reflection on each real service process: it lists exactly the
//! services that process serves, plus health and reflection, and describes
//! no other service.

use std::collections::BTreeSet;

use tessera_testkit::Cluster;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::connect;

async fn ask(url: &str, request: MessageRequest) -> Result<MessageResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(connect(url).await);
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }]))
        .await
        .unwrap()
        .into_inner();
    Ok(answers.message().await?.unwrap().message_response.unwrap())
}

async fn listed(url: &str) -> BTreeSet<String> {
    match ask(url, MessageRequest::ListServices(String::new())).await {
        Ok(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Whether reflection describes `symbol` (a fully qualified service name).
async fn describes(url: &str, symbol: &str) -> bool {
    match ask(url, MessageRequest::FileContainingSymbol(symbol.to_owned())).await {
        Ok(MessageResponse::FileDescriptorResponse(_)) => true,
        Err(status) if status.code() == tonic::Code::NotFound => false,
        other => panic!("unexpected answer {other:?}"),
    }
}

const ALL: &[&str] = &[
    "tessera.kms.v1.KeyDirectory",
    "tessera.server.v1.Accounts",
    "tessera.server.v1.Devices",
    "tessera.server.v1.Archive",
    "tessera.server.v1.Admin",
    "tessera.server.v1.Channels",
    "tessera.backup.v1.Backup",
    "tessera.bench.v1.Echo",
];

#[tokio::test]
async fn each_service_lists_only_what_it_serves_plus_health_and_reflection() {
    let cluster = Cluster::start().await;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];
    for (url, serves) in [
        (cluster.kms.url(), &ALL[..1]),
        (cluster.server.url(), &ALL[1..6]),
        (cluster.backup.url(), &ALL[6..7]),
    ] {
        let expected: BTreeSet<String> = serves
            .iter()
            .chain(common.iter())
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(listed(&url).await, expected, "services listed by {url}");
        for service in ALL {
            assert_eq!(
                describes(&url, service).await,
                serves.contains(service),
                "{url} describing {service}"
            );
        }
    }
}
