//! Authorization: every RPC of every service, called anonymously, as a
//! non-member and as another user, is denied.

use tessera_card::{
    CardId, CardKind, NewCard,
    channel::{Change, NewChannelStatement, Role},
    device_list::{Action, NewStatement},
    revocation,
};
use tessera_client::Visibility;
use tessera_crypto::DeviceKeys;
use tessera_proto::{
    Message,
    backup::v1::{GetOrgInfoRequest, OrgEncMsg, SubmitBackupRequest, SyncHistoryRequest},
    kms::v1::{
        GetCardRequest, GetCheckpointRequest, GetConsistencyProofRequest, GetDeviceListRequest,
        GetInclusionProofRequest, ListLogEntriesRequest, PublishDeviceStatementRequest,
        RegisterCardRequest, RevokeCardRequest, SearchCardsRequest,
    },
    server::v1::{
        AdminRevokeDeviceRequest, CreateChannelRequest, DownloadAttachmentRequest,
        EnrollDeviceRequest, EnvelopeKind, GetChannelChainRequest, GetChannelRequest,
        GetMemberViewRequest, GetReadHorizonRequest, GetSenderKeyRequest, GetStoredMessageRequest,
        IssueTokenRequest, ListChannelsRequest, ListDevicesRequest, ListMessagesRequest,
        ListOrgMembersRequest, PublishChannelStatementRequest, PutSenderKeysRequest,
        RegisterOrgCardRequest, RevokeDeviceRequest, SendMessageRequest, SetOrgMemberRequest,
        SetReadHorizonRequest, SubscribeRequest, UploadAttachmentRequest, WhoAmIRequest,
        channels_client::ChannelsClient,
    },
};
use tessera_stack::hostile::raw_call;
use tessera_testkit::Cluster;
use tonic::Code;

use crate::{connect, user_tokens};

struct Call {
    service: &'static str,
    method: &'static str,
    body: Vec<u8>,
    /// The code when called by eve (a user who is not a member / not the owner / not admin);
    /// `None`: allowed to any user by design.
    as_eve: Option<Code>,
}

fn call(
    service: &'static str,
    method: &'static str,
    body: impl Message,
    as_eve: Option<Code>,
) -> Call {
    Call {
        service,
        method,
        body: body.encode_to_vec(),
        as_eve,
    }
}

#[tokio::test]
async fn every_rpc_is_denied_to_anonymous_callers_non_members_and_other_users() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice", "alice", true).await;
    cluster.device("eve", "eve", true).await;
    let channel = alice
        .create_channel("private", Visibility::Shared, &[])
        .await
        .unwrap()
        .channel_id;
    alice.send_text(&channel, "for alice only").await.unwrap();
    let alice_card = alice.card_id();
    let eve_keys = DeviceKeys::generate().unwrap();
    let alice_claim = NewCard {
        identity: "alice",
        kind: CardKind::Client,
        device_name: "x",
        created_at: 0,
        previous_card_id: None,
    }
    .self_signed(&eve_keys)
    .unwrap();
    let eve_revokes_alice = revocation::sign_revocation(
        alice_card,
        revocation::RevokedBy::SelfKey,
        &eve_keys.signing,
        "",
        0,
    )
    .unwrap();
    let eve_edits_alices_list = NewStatement {
        identity: "alice",
        seqno: 1,
        previous_hash: Some([0; 32]),
        action: Action::Add,
        subject: CardId::of_snapshot(&alice_claim.content_snapshot),
        signer: alice_card,
        created_at: 0,
    }
    .sign(&eve_keys.signing);
    let eve_adds_herself_as_alice = NewChannelStatement {
        channel_id: &channel,
        epoch: 1,
        previous_hash: Some([0; 32]),
        signer_identity: "alice",
        signer: alice_card,
        created_at: 0,
        change: Change::Add {
            identity: "eve".into(),
            role: Role::Member,
        },
    }
    .sign(&eve_keys.signing);
    let denied = Some(Code::PermissionDenied);
    let ch = || channel.clone();
    // alice's own copy of her chain's key, as a well-formed distribution.
    let stored = alice.stored_messages(&channel, 1, 1).await.unwrap()[0].clone();
    let group = tessera_crypto::sender_key::ParsedGroupEnvelope::parse(&stored.envelope).unwrap();
    let key_request = GetSenderKeyRequest {
        channel_id: ch(),
        recipient_card_id: alice_card.to_vec(),
        sender_card_id: alice_card.to_vec(),
        chain_id: group.chain_id().to_vec(),
    };
    let alice_copy = {
        let mut request = tonic::Request::new(key_request.clone());
        request.metadata_mut().insert(
            "authorization",
            user_tokens(&cluster, "alice").await.server.parse().unwrap(),
        );
        ChannelsClient::new(connect(&cluster.server.url()).await)
            .get_sender_key(request)
            .await
            .unwrap()
            .into_inner()
            .distribution
    };

    let calls = vec![
        // Key service: reading the directory is open to every user; writing is not.
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/PublishDeviceStatement",
            PublishDeviceStatementRequest {
                statement: Some(eve_edits_alices_list),
            },
            denied,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/GetDeviceList",
            GetDeviceListRequest {
                identity: "alice".into(),
                from_seqno: 0,
            },
            None,
        ),
        call(
            "server",
            "/tessera.server.v1.Accounts/IssueToken",
            IssueTokenRequest {
                audience: "kms".into(),
            },
            None,
        ),
        // Only the organisation's backup service, logged in with the OrgKey.
        call(
            "server",
            "/tessera.server.v1.Archive/GetMemberView",
            GetMemberViewRequest {
                channel_id: ch(),
                identity: "alice".into(),
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Archive/GetStoredMessage",
            GetStoredMessageRequest {
                channel_id: ch(),
                index: 1,
            },
            denied,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/RegisterCard",
            RegisterCardRequest {
                card: Some(alice_claim.clone()),
            },
            denied,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/RevokeCard",
            RevokeCardRequest {
                revocation: Some(eve_revokes_alice.clone()),
            },
            denied,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/SearchCards",
            SearchCardsRequest {
                identities: vec!["alice".into()],
                kind: 0,
                device_list_from: Default::default(),
            },
            None,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/GetCard",
            GetCardRequest {
                card_id: alice_card.to_vec(),
            },
            None,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/GetCheckpoint",
            GetCheckpointRequest {},
            None,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/GetConsistencyProof",
            GetConsistencyProofRequest {
                old_size: 1,
                new_size: 0,
            },
            None,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/GetInclusionProof",
            GetInclusionProofRequest {
                leaf_index: 0,
                tree_size: 0,
            },
            None,
        ),
        call(
            "kms",
            "/tessera.kms.v1.KeyDirectory/ListLogEntries",
            ListLogEntriesRequest {
                from_index: 0,
                limit: 10,
            },
            None,
        ),
        // App server.
        call(
            "server",
            "/tessera.server.v1.Accounts/WhoAmI",
            WhoAmIRequest {},
            None,
        ),
        call(
            "server",
            "/tessera.server.v1.Devices/EnrollDevice",
            EnrollDeviceRequest {
                card: Some(alice_claim),
                statement: None,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Devices/ListDevices",
            ListDevicesRequest {},
            None,
        ),
        call(
            "server",
            "/tessera.server.v1.Devices/RevokeDevice",
            RevokeDeviceRequest {
                card_id: alice_card.to_vec(),
                reason: String::new(),
                revocation: None,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Admin/RegisterOrgCard",
            RegisterOrgCardRequest { card: None },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Admin/SetOrgMember",
            SetOrgMemberRequest {
                identity: "eve".into(),
                member: true,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Admin/ListOrgMembers",
            ListOrgMembersRequest {},
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Admin/AdminRevokeDevice",
            AdminRevokeDeviceRequest {
                card_id: alice_card.to_vec(),
                reason: String::new(),
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/CreateChannel",
            CreateChannelRequest { creation: None },
            None,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/PublishChannelStatement",
            PublishChannelStatementRequest {
                channel_id: ch(),
                statement: Some(eve_adds_herself_as_alice),
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/GetChannelChain",
            GetChannelChainRequest {
                channel_id: ch(),
                from_epoch: 0,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/ListChannels",
            ListChannelsRequest {},
            None,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/GetChannel",
            GetChannelRequest { channel_id: ch() },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/SendMessage",
            SendMessageRequest {
                channel_id: ch(),
                client_message_id: vec![1; 16],
                sender_card_id: alice_card.to_vec(),
                envelope: stored.envelope.clone(),
                epoch: 0,
                kind: EnvelopeKind::Group as i32,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/PutSenderKeys",
            PutSenderKeysRequest {
                channel_id: ch(),
                sender_card_id: alice_card.to_vec(),
                epoch: 0,
                chain_id: group.chain_id().to_vec(),
                distributions: vec![alice_copy],
                recipient_card_ids: Vec::new(),
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/GetSenderKey",
            key_request,
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/ListMessages",
            ListMessagesRequest {
                channel_id: ch(),
                anchor: 0,
                page_size: 10,
                direction: 0,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/Subscribe",
            SubscribeRequest {
                channel_id: ch(),
                from_index: 1,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/SetReadHorizon",
            SetReadHorizonRequest {
                channel_id: ch(),
                index: 1,
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/GetReadHorizon",
            GetReadHorizonRequest { channel_id: ch() },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/UploadAttachment",
            UploadAttachmentRequest {
                channel_id: ch(),
                data: vec![1, 2, 3],
            },
            denied,
        ),
        call(
            "server",
            "/tessera.server.v1.Channels/DownloadAttachment",
            DownloadAttachmentRequest {
                channel_id: ch(),
                attachment_id: "00".repeat(16),
            },
            denied,
        ),
        // Backup service.
        call(
            "backup",
            "/tessera.backup.v1.Backup/GetOrgInfo",
            GetOrgInfoRequest {},
            None,
        ),
        call(
            "backup",
            "/tessera.backup.v1.Backup/SubmitBackup",
            SubmitBackupRequest {
                channel_id: ch(),
                message_index: 1,
                org_enc_msg: Some(OrgEncMsg::default()),
            },
            denied,
        ),
        call(
            "backup",
            "/tessera.backup.v1.Backup/SyncHistory",
            SyncHistoryRequest {
                channel_id: ch(),
                ..Default::default()
            },
            denied,
        ),
    ];
    assert_eq!(calls.len(), 38, "every RPC that needs a token");

    let eve = user_tokens(&cluster, "eve").await;
    for c in calls {
        let url = match c.service {
            "kms" => cluster.kms.url(),
            "server" => cluster.server.url(),
            _ => cluster.backup.url(),
        };
        let channel = connect(&url).await;
        let anonymous = raw_call(channel.clone(), c.method, c.body.clone(), None).await;
        assert_eq!(
            anonymous.map(|_| ()).unwrap_err().code(),
            Code::Unauthenticated,
            "{} anonymously",
            c.method
        );
        let forged = raw_call(
            channel.clone(),
            c.method,
            c.body.clone(),
            Some("Bearer 0a0b0c"),
        )
        .await;
        assert_eq!(
            forged.map(|_| ()).unwrap_err().code(),
            Code::Unauthenticated,
            "{} with a forged token",
            c.method
        );
        // A token of another service is refused: a token captured at the key
        // service or the backup service is useless anywhere else.
        for other in ["kms", "server", "backup"] {
            if other == c.service {
                continue;
            }
            let captured = raw_call(
                channel.clone(),
                c.method,
                c.body.clone(),
                Some(eve.of(other)),
            )
            .await;
            let status = captured.map(|_| ()).unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{} with a {other} token",
                c.method
            );
            assert!(
                status.message().contains("not meant for this service"),
                "{status:?}"
            );
        }
        if let Some(code) = c.as_eve {
            let result = raw_call(channel, c.method, c.body, Some(eve.of(c.service))).await;
            assert_eq!(
                result.map(|_| ()).unwrap_err().code(),
                code,
                "{} as eve",
                c.method
            );
        }
    }
    // Alice's history is untouched by all of it.
    let page = alice.history(&channel, 0, 10, false).await.unwrap();
    assert_eq!(page.messages.len(), 1);
}
