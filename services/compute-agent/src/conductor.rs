//! The agent's side of conductor: every call carries a deadline and the
//! agent's SPIFFE id in `x-cirrus-peer`. Behind the mesh the sidecar removes
//! that header and sets it from the agent's verified certificate, so sending
//! it changes nothing there; without a sidecar (tests on loopback) it is how
//! conductor learns which host calls.

use std::time::Duration;

use proto::conductor::v1 as pb;
use proto::conductor::v1::conductor_client::ConductorClient;
use runtime::trace::Channel;
use tonic::{Request, Status};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Conductor {
    client: ConductorClient<Channel>,
    peer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Conductor {
    pub fn new(channel: Channel, spiffe_id: &str) -> Result<Self, Status> {
        let peer = spiffe_id
            .parse()
            .map_err(|_| Status::invalid_argument("the SPIFFE id is not a valid header value"))?;
        Ok(Self {
            client: ConductorClient::new(channel),
            peer,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(CALL_TIMEOUT);
        r.metadata_mut()
            .insert(runtime::caller::PEER, self.peer.clone());
        r
    }

    pub async fn heartbeat(
        &self,
        h: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        Ok(self
            .client
            .clone()
            .heartbeat(self.req(h))
            .await?
            .into_inner())
    }

    pub async fn build_spec(&self, id: &str) -> Result<pb::BuildSpec, Status> {
        let r = self.req(pb::ServerRef { id: id.into() });
        Ok(self.client.clone().get_build_spec(r).await?.into_inner())
    }

    pub async fn update(&self, u: pb::UpdateServerStateRequest) -> Result<pb::ServerState, Status> {
        Ok(self
            .client
            .clone()
            .update_server_state(self.req(u))
            .await?
            .into_inner())
    }

    pub async fn build_result(
        &self,
        r: pb::ReportBuildResultRequest,
    ) -> Result<pb::ReportBuildResultResponse, Status> {
        Ok(self
            .client
            .clone()
            .report_build_result(self.req(r))
            .await?
            .into_inner())
    }

    pub async fn deleted(&self, id: &str) -> Result<pb::ServerState, Status> {
        let r = self.req(pb::ServerRef { id: id.into() });
        Ok(self.client.clone().report_deleted(r).await?.into_inner())
    }

    pub async fn host_servers(&self, host: &str) -> Result<Vec<pb::ServerState>, Status> {
        let r = self.req(pb::ListHostServersRequest { host: host.into() });
        Ok(self
            .client
            .clone()
            .list_host_servers(r)
            .await?
            .into_inner()
            .servers)
    }

    pub async fn console(&self, id: &str, text: String) -> Result<(), Status> {
        let r = self.req(pb::AppendConsoleLogRequest {
            id: id.into(),
            text,
        });
        self.client.clone().append_console_log(r).await?;
        Ok(())
    }

    /// The end of an `attach_volume` / `detach_volume` cast; the outcome
    /// (attached, detached, failed, stale).
    pub async fn volume_result(
        &self,
        r: pb::ReportVolumeAttachmentRequest,
    ) -> Result<String, Status> {
        Ok(self
            .client
            .clone()
            .report_volume_attachment(self.req(r))
            .await?
            .into_inner()
            .outcome)
    }

    pub async fn set_agent_endpoint(&self, host: &str, endpoint: &str) -> Result<(), Status> {
        let r = self.req(pb::SetAgentEndpointRequest {
            host: host.into(),
            endpoint: endpoint.into(),
        });
        self.client.clone().set_agent_endpoint(r).await?;
        Ok(())
    }
}
