//! The `conductor.v1` adapter: validates every field and maps answers.

use compute_api::model::{HostReport, Server, power, task, vm};
use proto::conductor::v1 as pb;
use runtime::caller::Caller;
use runtime::error::Error;
use runtime::types::{check_text, parse_id};
use tonic::{Request, Response, Status};

use crate::service::{
    BuildResult, Conductor, Outcome, StateUpdate, VolumeOp, VolumeOutcome, VolumeResult,
};

type R<T> = Result<Response<T>, Status>;

#[derive(Clone)]
pub struct Api {
    pub conductor: Conductor,
}

fn caller<T>(r: &Request<T>) -> Caller {
    Caller::from_metadata(r.metadata())
}

fn one_of(field: &'static str, v: &str, allowed: &[&str]) -> Result<Option<String>, Error> {
    if v.is_empty() {
        Ok(None)
    } else if allowed.contains(&v) {
        Ok(Some(v.to_string()))
    } else {
        Err(Error::invalid(
            field,
            format!("must be one of {}", allowed.join(", ")),
        ))
    }
}

/// A task state: empty is "leave it", `none` is "no task".
fn task_of(field: &'static str, v: &str) -> Result<Option<Option<String>>, Error> {
    match v {
        "" => Ok(None),
        "none" => Ok(Some(None)),
        t => one_of(field, t, &task::ALL).map(Some),
    }
}

fn ratio(field: &'static str, v: f64, default: f64) -> Result<f64, Error> {
    if v == 0.0 {
        Ok(default)
    } else if v.is_finite() && v > 0.0 && v <= 1000.0 {
        Ok(v)
    } else {
        Err(Error::invalid(field, "must be above 0 and at most 1000"))
    }
}

fn state_pb(s: &Server) -> pb::ServerState {
    pb::ServerState {
        id: s.id.to_string(),
        vm_state: s.vm_state.clone(),
        task_state: s.task_state.clone().unwrap_or_default(),
        power_state: s.power_state.clone(),
        revision: s.revision,
    }
}

fn spec_pb(s: Server) -> pb::BuildSpec {
    pb::BuildSpec {
        server_id: s.id.to_string(),
        name: s.name,
        project_id: s.project_id,
        host: s.host.unwrap_or_default(),
        attempt: u32::try_from(s.attempt).unwrap_or(0),
        vcpus: u32::try_from(s.vcpus).unwrap_or(0),
        ram_mb: u32::try_from(s.ram_mb).unwrap_or(0),
        disk_gb: u32::try_from(s.disk_gb).unwrap_or(0),
        ephemeral_gb: u32::try_from(s.ephemeral_gb).unwrap_or(0),
        flavor_name: s.flavor_name,
        image_id: s.image_id,
        networks: s
            .networks
            .into_iter()
            .map(|n| pb::Network {
                network_id: n.network_id.map(|i| i.to_string()).unwrap_or_default(),
                port_id: n.port_id.map(|i| i.to_string()).unwrap_or_default(),
                fixed_ip: n.fixed_ip,
            })
            .collect(),
        volumes: s
            .block_devices
            .into_iter()
            .filter(|b| b.source == "volume")
            .map(|b| pb::Volume {
                volume_id: b.uuid.map(|i| i.to_string()).unwrap_or_default(),
                boot_index: b.boot_index,
                delete_on_termination: b.delete_on_termination,
            })
            .collect(),
        key_name: s.key_name,
        public_key: s.public_key,
        user_data: s.user_data,
        metadata: s.metadata.into_iter().collect(),
        vm_state: s.vm_state,
        task_state: s.task_state.unwrap_or_default(),
        image_properties: s.image_properties.into_iter().collect(),
    }
}

fn host_name(field: &'static str, s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(Error::invalid(field, "is not a valid host name"))
    }
}

#[tonic::async_trait]
impl pb::conductor_server::Conductor for Api {
    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        let c = caller(&r);
        let q = r.into_inner();
        let report = HostReport {
            name: host_name("host", &q.host)?,
            vcpus: i32::try_from(q.vcpus).map_err(|_| Error::invalid("vcpus", "is too large"))?,
            ram_mb: i64::try_from(q.ram_mb)
                .map_err(|_| Error::invalid("ram_mb", "is too large"))?,
            disk_gb: i64::try_from(q.disk_gb)
                .map_err(|_| Error::invalid("disk_gb", "is too large"))?,
            availability_zone: if q.availability_zone.is_empty() {
                "nova".into()
            } else {
                runtime::types::Name::parse("availability_zone", &q.availability_zone)?
                    .into_string()
            },
            hypervisor_type: {
                check_text("hypervisor_type", &q.hypervisor_type, 64)?;
                q.hypervisor_type
            },
            architecture: {
                check_text("architecture", &q.architecture, 64)?;
                q.architecture
            },
            cpu_ratio: ratio("cpu_allocation_ratio", q.cpu_allocation_ratio, 16.0)?,
            ram_ratio: ratio("ram_allocation_ratio", q.ram_allocation_ratio, 1.5)?,
            disk_ratio: ratio("disk_allocation_ratio", q.disk_allocation_ratio, 1.0)?,
        };
        let enabled = self.conductor.heartbeat(&c, report).await?;
        Ok(Response::new(pb::HeartbeatResponse { enabled }))
    }

    async fn get_build_spec(&self, r: Request<pb::ServerRef>) -> R<pb::BuildSpec> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(spec_pb(
            self.conductor.build_spec(&c, id).await?,
        )))
    }

    async fn update_server_state(
        &self,
        r: Request<pb::UpdateServerStateRequest>,
    ) -> R<pb::ServerState> {
        let c = caller(&r);
        let q = r.into_inner();
        let id = parse_id("id", &q.id)?;
        let u = StateUpdate {
            vm_state: one_of("vm_state", &q.vm_state, &vm::ALL[..6])?,
            task_state: task_of("task_state", &q.task_state)?,
            power_state: one_of("power_state", &q.power_state, &power::ALL)?,
            expected_task_state: task_of("expected_task_state", &q.expected_task_state)?,
        };
        let s = self.conductor.update_state(&c, id, u).await?;
        Ok(Response::new(state_pb(&s)))
    }

    async fn report_build_result(
        &self,
        r: Request<pb::ReportBuildResultRequest>,
    ) -> R<pb::ReportBuildResultResponse> {
        let c = caller(&r);
        let q = r.into_inner();
        check_text("fault_message", &q.fault_message, 1024)?;
        let result = BuildResult {
            id: parse_id("id", &q.id)?,
            attempt: i32::try_from(q.attempt)
                .map_err(|_| Error::invalid("attempt", "is too large"))?,
            ok: q.ok,
            power_state: one_of("power_state", &q.power_state, &power::ALL)?,
            fault_code: q.fault_code,
            fault_message: q.fault_message,
            reschedulable: q.reschedulable,
            token: {
                if q.token.len() > 16 * 1024 {
                    return Err(Error::invalid("token", "at most 16384 bytes").into());
                }
                q.token
            },
        };
        let (outcome, host) = match self.conductor.build_result(&c, result).await? {
            Outcome::Active => ("active", String::new()),
            Outcome::Rescheduled(h) => ("rescheduled", h),
            Outcome::Error => ("error", String::new()),
            Outcome::Stale => ("stale", String::new()),
        };
        Ok(Response::new(pb::ReportBuildResultResponse {
            outcome: outcome.into(),
            host,
        }))
    }

    async fn report_deleted(&self, r: Request<pb::ServerRef>) -> R<pb::ServerState> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(state_pb(
            &self.conductor.deleted(&c, id).await?,
        )))
    }

    async fn list_host_servers(
        &self,
        r: Request<pb::ListHostServersRequest>,
    ) -> R<pb::ListHostServersResponse> {
        let c = caller(&r);
        let host = host_name("host", &r.get_ref().host)?;
        let servers = self.conductor.host_servers(&c, &host).await?;
        Ok(Response::new(pb::ListHostServersResponse {
            servers: servers.iter().map(state_pb).collect(),
        }))
    }

    async fn append_console_log(
        &self,
        r: Request<pb::AppendConsoleLogRequest>,
    ) -> R<pb::AppendConsoleLogResponse> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        check_text("text", &r.get_ref().text, 16 * 1024)?;
        self.conductor
            .append_console(&c, id, &r.get_ref().text)
            .await?;
        Ok(Response::new(pb::AppendConsoleLogResponse {}))
    }

    async fn report_volume_attachment(
        &self,
        r: Request<pb::ReportVolumeAttachmentRequest>,
    ) -> R<pb::ReportVolumeAttachmentResponse> {
        let c = caller(&r);
        let q = r.into_inner();
        check_text("device", &q.device, 64)?;
        check_text("attachment_id", &q.attachment_id, 64)?;
        check_text("fault_message", &q.fault_message, 1024)?;
        let op = match q.op.as_str() {
            "attach" => VolumeOp::Attach,
            "detach" => VolumeOp::Detach,
            _ => return Err(Error::invalid("op", "must be attach or detach").into()),
        };
        if op == VolumeOp::Attach && q.ok && q.device.is_empty() {
            return Err(
                Error::invalid("device", "is required for an attach that succeeded").into(),
            );
        }
        let outcome = self
            .conductor
            .volume_result(
                &c,
                VolumeResult {
                    server_id: parse_id("server_id", &q.server_id)?,
                    volume_id: parse_id("volume_id", &q.volume_id)?,
                    op,
                    ok: q.ok,
                    device: q.device,
                    attachment_id: q.attachment_id,
                    fault_message: q.fault_message,
                },
            )
            .await?;
        Ok(Response::new(pb::ReportVolumeAttachmentResponse {
            outcome: match outcome {
                VolumeOutcome::Attached => "attached",
                VolumeOutcome::Detached => "detached",
                VolumeOutcome::Failed => "failed",
                VolumeOutcome::Stale => "stale",
            }
            .into(),
        }))
    }

    async fn list_volume_attachments(
        &self,
        r: Request<pb::ServerRef>,
    ) -> R<pb::ListVolumeAttachmentsResponse> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let all = self.conductor.attachments(&c, id).await?;
        Ok(Response::new(pb::ListVolumeAttachmentsResponse {
            attachments: all
                .into_iter()
                .map(|a| pb::VolumeAttachment {
                    volume_id: a.volume_id.to_string(),
                    status: a.status,
                    device: a.device,
                    attachment_id: a.attachment_id,
                })
                .collect(),
        }))
    }

    async fn set_agent_endpoint(
        &self,
        r: Request<pb::SetAgentEndpointRequest>,
    ) -> R<pb::SetAgentEndpointResponse> {
        let c = caller(&r);
        let host = host_name("host", &r.get_ref().host)?;
        let e = &r.get_ref().endpoint;
        let url = e.starts_with("http://") || e.starts_with("https://");
        let name = !e.is_empty()
            && e.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if e.len() > 255 || !(e.is_empty() || url || name) {
            return Err(Error::invalid(
                "endpoint",
                "must be an http:// URL or a service name (at most 255 characters)",
            )
            .into());
        }
        if url {
            check_text("endpoint", e, 255)?;
        }
        self.conductor.set_agent_endpoint(&c, &host, e).await?;
        Ok(Response::new(pb::SetAgentEndpointResponse {}))
    }
}
