//! Bad input: malformed protobuf, oversized messages and fields, wrong key
//! lengths, on every RPC: a clear status, and the services stay healthy.

use tessera_client::Visibility;
use tessera_proto::{
    Message,
    backup::v1::{OrgEncMsg, SubmitBackupRequest},
    card::v1::SignedDeviceStatement,
    channel::v1::SignedChannelStatement,
    kms::v1::{GetCardRequest, GetDeviceListRequest, PublishDeviceStatementRequest},
    server::v1::{
        BeginDeviceLoginRequest, CreateChannelRequest, SendMessageRequest, SignUpRequest,
    },
};
use tessera_stack::hostile::raw_call;
use tessera_testkit::Cluster;
use tonic::Code;

use crate::{connect, user_tokens};

const METHODS: &[(&str, &str)] = &[
    ("kms", "/tessera.kms.v1.KeyDirectory/GetServiceInfo"),
    ("kms", "/tessera.kms.v1.KeyDirectory/RegisterCard"),
    ("kms", "/tessera.kms.v1.KeyDirectory/SearchCards"),
    ("kms", "/tessera.kms.v1.KeyDirectory/GetCard"),
    ("kms", "/tessera.kms.v1.KeyDirectory/RevokeCard"),
    ("kms", "/tessera.kms.v1.KeyDirectory/GetCheckpoint"),
    ("kms", "/tessera.kms.v1.KeyDirectory/GetConsistencyProof"),
    ("kms", "/tessera.kms.v1.KeyDirectory/GetInclusionProof"),
    ("kms", "/tessera.kms.v1.KeyDirectory/ListLogEntries"),
    ("kms", "/tessera.kms.v1.KeyDirectory/PublishDeviceStatement"),
    ("kms", "/tessera.kms.v1.KeyDirectory/GetDeviceList"),
    ("server", "/tessera.server.v1.Accounts/GetServerInfo"),
    ("server", "/tessera.server.v1.Accounts/SignUp"),
    ("server", "/tessera.server.v1.Accounts/Login"),
    ("server", "/tessera.server.v1.Accounts/BeginDeviceLogin"),
    ("server", "/tessera.server.v1.Accounts/FinishDeviceLogin"),
    ("server", "/tessera.server.v1.Accounts/WhoAmI"),
    ("server", "/tessera.server.v1.Accounts/IssueToken"),
    ("server", "/tessera.server.v1.Devices/EnrollDevice"),
    ("server", "/tessera.server.v1.Devices/ListDevices"),
    ("server", "/tessera.server.v1.Devices/RevokeDevice"),
    ("server", "/tessera.server.v1.Admin/RegisterOrgCard"),
    ("server", "/tessera.server.v1.Admin/SetOrgMember"),
    ("server", "/tessera.server.v1.Admin/ListOrgMembers"),
    ("server", "/tessera.server.v1.Admin/AdminRevokeDevice"),
    ("server", "/tessera.server.v1.Archive/GetMemberView"),
    ("server", "/tessera.server.v1.Archive/GetStoredMessage"),
    ("server", "/tessera.server.v1.Channels/CreateChannel"),
    (
        "server",
        "/tessera.server.v1.Channels/PublishChannelStatement",
    ),
    ("server", "/tessera.server.v1.Channels/GetChannelChain"),
    ("server", "/tessera.server.v1.Channels/ListChannels"),
    ("server", "/tessera.server.v1.Channels/GetChannel"),
    ("server", "/tessera.server.v1.Channels/SendMessage"),
    ("server", "/tessera.server.v1.Channels/ListMessages"),
    ("server", "/tessera.server.v1.Channels/Subscribe"),
    ("server", "/tessera.server.v1.Channels/SetReadHorizon"),
    ("server", "/tessera.server.v1.Channels/GetReadHorizon"),
    ("server", "/tessera.server.v1.Channels/UploadAttachment"),
    ("server", "/tessera.server.v1.Channels/DownloadAttachment"),
    ("backup", "/tessera.backup.v1.Backup/GetOrgInfo"),
    ("backup", "/tessera.backup.v1.Backup/SubmitBackup"),
    ("backup", "/tessera.backup.v1.Backup/SyncHistory"),
];

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn malformed_and_oversized_input_gets_clear_statuses_on_every_rpc() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    // In the organisation, so input checks of the backup service are reached.
    cluster
        .admin()
        .await
        .set_org_member("alice", true)
        .await
        .unwrap();
    let tokens = user_tokens(&cluster, "alice").await;
    let url = |service: &str| match service {
        "kms" => cluster.kms.url(),
        "server" => cluster.server.url(),
        _ => cluster.backup.url(),
    };

    // Not protobuf at all (a truncated varint), and far over every size limit.
    let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0xff];
    let huge = vec![0x0a; 5 * 1024 * 1024];
    for (service, method) in METHODS {
        let channel = connect(&url(service)).await;
        let token = tokens.of(service);
        let c = code(raw_call(channel.clone(), method, garbage.clone(), Some(token)).await);
        assert_eq!(c, Code::InvalidArgument, "{method} with malformed protobuf");
        let c = code(raw_call(channel, method, huge.clone(), Some(token)).await);
        assert_eq!(c, Code::ResourceExhausted, "{method} with 5 MiB");
    }

    // Oversized fields and wrong key lengths.
    let server = connect(&cluster.server.url()).await;
    let kms = connect(&cluster.kms.url()).await;
    let backup = connect(&cluster.backup.url()).await;
    let cases: Vec<(tonic::transport::Channel, &str, Vec<u8>)> = vec![
        (
            kms.clone(),
            "/tessera.kms.v1.KeyDirectory/PublishDeviceStatement",
            PublishDeviceStatementRequest {
                statement: Some(SignedDeviceStatement {
                    statement: vec![0x08, 0x01],
                    signature: vec![0; 64],
                    app_signature: vec![],
                }),
            }
            .encode_to_vec(),
        ),
        (
            kms.clone(),
            "/tessera.kms.v1.KeyDirectory/GetDeviceList",
            GetDeviceListRequest {
                identity: "Not An Identity".into(),
                from_seqno: 0,
            }
            .encode_to_vec(),
        ),
        (
            kms.clone(),
            "/tessera.kms.v1.KeyDirectory/GetCard",
            GetCardRequest {
                card_id: vec![1, 2, 3],
            }
            .encode_to_vec(),
        ),
        (
            server.clone(),
            "/tessera.server.v1.Accounts/SignUp",
            SignUpRequest {
                identity: "a".repeat(10_000),
                password: "long enough".into(),
            }
            .encode_to_vec(),
        ),
        (
            server.clone(),
            "/tessera.server.v1.Accounts/BeginDeviceLogin",
            BeginDeviceLoginRequest {
                identity: "alice".into(),
                card_id: vec![0; 5],
            }
            .encode_to_vec(),
        ),
        (
            server.clone(),
            "/tessera.server.v1.Channels/CreateChannel",
            CreateChannelRequest { creation: None }.encode_to_vec(),
        ),
        (
            server.clone(),
            "/tessera.server.v1.Channels/CreateChannel",
            CreateChannelRequest {
                creation: Some(SignedChannelStatement {
                    statement: vec![0xff; 10],
                    signature: vec![0; 64],
                }),
            }
            .encode_to_vec(),
        ),
        (
            backup.clone(),
            "/tessera.backup.v1.Backup/SubmitBackup",
            SubmitBackupRequest {
                channel_id: "c".into(),
                message_index: 1,
                org_enc_msg: Some(OrgEncMsg {
                    org_card_id: vec![1],
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
        ),
    ];
    for (channel, method, body) in cases {
        let service = method.split('.').nth(1).unwrap_or("server");
        let c = code(raw_call(channel, method, body, Some(tokens.of(service))).await);
        assert_eq!(c, Code::InvalidArgument, "{method}");
    }
    let channel = alice
        .create_channel("c", Visibility::Shared, &[])
        .await
        .unwrap()
        .channel_id;
    let send = |sender_card_id: Vec<u8>, envelope: Vec<u8>| {
        SendMessageRequest {
            channel_id: channel.clone(),
            client_message_id: vec![9; 16],
            sender_card_id,
            envelope,
            epoch: 0,
            kind: 0,
        }
        .encode_to_vec()
    };
    let c = code(
        raw_call(
            server.clone(),
            "/tessera.server.v1.Channels/SendMessage",
            send(vec![1; 31], vec![1]),
            Some(&tokens.server),
        )
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "31-byte card id");
    let c = code(
        raw_call(
            server.clone(),
            "/tessera.server.v1.Channels/SendMessage",
            send(alice.card_id().to_vec(), vec![0xee; 1000]),
            Some(&tokens.server),
        )
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "an envelope that is not one");

    // Every service is still healthy and working.
    for url in [
        cluster.kms.url(),
        cluster.server.url(),
        cluster.backup.url(),
    ] {
        let status = tonic_health::pb::health_client::HealthClient::new(connect(&url).await)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    assert_eq!(
        alice.send_text(&channel, "still fine").await.unwrap().index,
        1
    );
}
