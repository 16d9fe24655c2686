//! The `Channels` gRPC service: authenticates the caller, hands the request
//! to the domain layer ([`Channels`](super::Channels)) and turns its
//! [`ServerError`](crate::error::ServerError) into a status.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt as _};
use tessera_proto::server::v1::{
    AttachmentChunk, Channel as PbChannel, ChannelChain, ChannelEvent, CreateChannelRequest,
    DownloadAttachmentRequest, GetChannelChainRequest, GetChannelRequest, GetReadHorizonRequest,
    GetSenderKeyRequest, GetSenderKeyResponse, ListChannelsRequest, ListChannelsResponse,
    ListMessagesRequest, ListMessagesResponse, PublishChannelStatementRequest,
    PutSenderKeysRequest, PutSenderKeysResponse, ReadHorizon, SendMessageRequest,
    SendMessageResponse, SetReadHorizonRequest, SubscribeRequest, UploadAttachmentRequest,
    UploadAttachmentResponse, channels_server::Channels,
};
use tonic::{Request, Response, Status, Streaming};

use crate::App;

pub(crate) struct ChannelsService(pub(crate) Arc<App>);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Channels for ChannelsService {
    async fn create_channel(
        &self,
        request: Request<CreateChannelRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let creation = request.into_inner().creation;
        Ok(Response::new(
            self.0.channels.create(&caller, creation).await?,
        ))
    }

    async fn publish_channel_statement(
        &self,
        request: Request<PublishChannelStatementRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let r = request.into_inner();
        Ok(Response::new(
            self.0
                .channels
                .publish(&caller, &r.channel_id, r.statement)
                .await?,
        ))
    }

    async fn get_channel_chain(
        &self,
        request: Request<GetChannelChainRequest>,
    ) -> Result<Response<ChannelChain>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let r = request.get_ref();
        Ok(Response::new(
            self.0
                .channels
                .chain(&caller, &r.channel_id, r.from_epoch)
                .await?,
        ))
    }

    async fn list_channels(
        &self,
        request: Request<ListChannelsRequest>,
    ) -> Result<Response<ListChannelsResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(ListChannelsResponse {
            channels: self.0.channels.list(&caller).await?,
        }))
    }

    async fn get_channel(
        &self,
        request: Request<GetChannelRequest>,
    ) -> Result<Response<PbChannel>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(
            self.0
                .channels
                .get(&caller, &request.get_ref().channel_id)
                .await?,
        ))
    }

    async fn send_message(
        &self,
        request: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(
            self.0.channels.send(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_messages(
        &self,
        request: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(
            self.0.channels.messages(&caller, request.get_ref()).await?,
        ))
    }

    type SubscribeStream = ResponseStream<ChannelEvent>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let r = request.into_inner();
        let stream = self
            .0
            .channels
            .subscribe(caller, r.channel_id, r.from_index)
            .await?;
        Ok(Response::new(Box::pin(
            stream.map(|item| item.map_err(Status::from)),
        )))
    }

    async fn set_read_horizon(
        &self,
        request: Request<SetReadHorizonRequest>,
    ) -> Result<Response<ReadHorizon>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let r = request.into_inner();
        let index = self
            .0
            .channels
            .set_read_horizon(&caller, &r.channel_id, r.index)
            .await?;
        Ok(Response::new(ReadHorizon {
            channel_id: r.channel_id,
            index,
        }))
    }

    async fn get_read_horizon(
        &self,
        request: Request<GetReadHorizonRequest>,
    ) -> Result<Response<ReadHorizon>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let r = request.into_inner();
        Ok(Response::new(ReadHorizon {
            index: self.0.channels.read_horizon(&caller, &r.channel_id).await?,
            channel_id: r.channel_id,
        }))
    }

    async fn upload_attachment(
        &self,
        request: Request<Streaming<UploadAttachmentRequest>>,
    ) -> Result<Response<UploadAttachmentResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(
            self.0
                .channels
                .upload(&caller, request.into_inner())
                .await?,
        ))
    }

    type DownloadAttachmentStream = ResponseStream<AttachmentChunk>;

    async fn download_attachment(
        &self,
        request: Request<DownloadAttachmentRequest>,
    ) -> Result<Response<Self::DownloadAttachmentStream>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let r = request.into_inner();
        let chunks = self
            .0
            .channels
            .download(&caller, &r.channel_id, &r.attachment_id)
            .await?;
        Ok(Response::new(Box::pin(
            chunks.map(|item| item.map_err(Status::from)),
        )))
    }

    async fn put_sender_keys(
        &self,
        request: Request<PutSenderKeysRequest>,
    ) -> Result<Response<PutSenderKeysResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(
            self.0
                .channels
                .put_sender_keys(&caller, request.into_inner())
                .await?,
        ))
    }

    async fn get_sender_key(
        &self,
        request: Request<GetSenderKeyRequest>,
    ) -> Result<Response<GetSenderKeyResponse>, Status> {
        let caller = self.0.authenticate(&request).await?;
        Ok(Response::new(
            self.0
                .channels
                .get_sender_key(&caller, request.get_ref())
                .await?,
        ))
    }
}
