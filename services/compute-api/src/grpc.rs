//! The `compute.v1` gRPC adapter: reads the caller from the sidecar's trusted
//! headers, validates every field of every request into the typed values of
//! [`crate::service`], and maps answers back. Nothing here decides anything.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;

use futures_util::Stream;
use proto::compute::v1 as pb;
use runtime::caller::Caller;
use runtime::error::Error;
use runtime::types::{Name, NameOrId, check_text, page_limit, parse_id, parse_opt_id};
use time::OffsetDateTime;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::model::*;
use crate::peers::Credentials;
use crate::service::{self, Action, Compute, CreateServer, ListServers, NewFlavor};

type R<T> = Result<Response<T>, Status>;

const MAX_METADATA: usize = 128;
const MAX_METADATA_VALUE: usize = 255;
const MAX_NETWORKS: usize = 16;
const MAX_BLOCK_DEVICES: usize = 16;
const MAX_EXTRA_SPECS: usize = 64;

#[derive(Clone)]
pub struct Api {
    pub compute: Compute,
}

fn caller<T>(r: &Request<T>) -> Caller {
    Caller::from_metadata(r.metadata())
}

/// The caller and its bearer token (passed on to peers and hosts).
fn creds<T>(r: &Request<T>) -> Credentials {
    Credentials::from_metadata(r.metadata())
}

fn ts(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn key(field: &'static str, k: &str) -> Result<(), Error> {
    let ok = !k.is_empty()
        && k.len() <= 255
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.: ".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "key {:?} must be 1 to 255 of A-Z a-z 0-9 _ - . : and space",
                runtime::types::short(k)
            ),
        ))
    }
}

fn string_map(
    field: &'static str,
    m: HashMap<String, String>,
    max: usize,
) -> Result<BTreeMap<String, String>, Error> {
    if m.len() > max {
        return Err(Error::invalid(field, format!("at most {max} entries")));
    }
    for (k, v) in &m {
        key(field, k)?;
        check_text(field, v, MAX_METADATA_VALUE)?;
    }
    Ok(m.into_iter().collect())
}

fn positive(field: &'static str, v: u32, max: u32) -> Result<i32, Error> {
    if v == 0 || v > max {
        Err(Error::invalid(
            field,
            format!("must be between 1 and {max}"),
        ))
    } else {
        Ok(v as i32)
    }
}

fn opt_state(field: &'static str, v: &str, allowed: &[&str]) -> Result<Option<String>, Error> {
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

fn project_id(field: &'static str, s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(Error::invalid(
            field,
            format!("is not a valid project id: {:?}", runtime::types::short(s)),
        ))
    }
}

impl TryFrom<pb::CreateServerRequest> for CreateServer {
    type Error = Error;

    fn try_from(r: pb::CreateServerRequest) -> Result<Self, Error> {
        if r.networks.len() > MAX_NETWORKS {
            return Err(Error::invalid(
                "networks",
                format!("at most {MAX_NETWORKS}"),
            ));
        }
        let networks = r
            .networks
            .iter()
            .map(|n| {
                let network_id = parse_opt_id("networks.network_id", &n.network_id)?;
                let port_id = parse_opt_id("networks.port_id", &n.port_id)?;
                if network_id.is_some() == port_id.is_some() {
                    return Err(Error::invalid(
                        "networks",
                        "each entry names exactly one of network_id and port_id",
                    ));
                }
                if !n.fixed_ip.is_empty() && n.fixed_ip.parse::<std::net::IpAddr>().is_err() {
                    return Err(Error::invalid("networks.fixed_ip", "is not an IP address"));
                }
                Ok(NetworkRequest {
                    network_id,
                    port_id,
                    fixed_ip: n.fixed_ip.clone(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if r.block_devices.len() > MAX_BLOCK_DEVICES {
            return Err(Error::invalid(
                "block_devices",
                format!("at most {MAX_BLOCK_DEVICES}"),
            ));
        }
        let block_devices = r
            .block_devices
            .iter()
            .map(|b| {
                if !["image", "volume", "blank"].contains(&b.source.as_str()) {
                    return Err(Error::invalid(
                        "block_devices.source",
                        "must be image, volume or blank",
                    ));
                }
                let uuid = parse_opt_id("block_devices.uuid", &b.uuid)?;
                if b.source != "blank" && uuid.is_none() {
                    return Err(Error::invalid(
                        "block_devices.uuid",
                        "is required for an image or volume source",
                    ));
                }
                Ok(BlockDevice {
                    source: b.source.clone(),
                    uuid,
                    size_gb: b.size_gb,
                    boot_index: b.boot_index,
                    delete_on_termination: b.delete_on_termination,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if r.user_data.len() > service::MAX_USER_DATA {
            return Err(Error::invalid(
                "user_data",
                format!("is larger than {} bytes", service::MAX_USER_DATA),
            ));
        }
        for g in &r.security_groups {
            Name::parse("security_groups", g)?;
        }
        let availability_zone = if r.availability_zone.is_empty() {
            None
        } else {
            Some(Name::parse("availability_zone", &r.availability_zone)?.into_string())
        };
        let idempotency_key = if r.idempotency_key.is_empty() {
            None
        } else {
            check_text("idempotency_key", &r.idempotency_key, 128)?;
            Some(r.idempotency_key.clone())
        };
        Ok(CreateServer {
            name: Name::parse("name", &r.name)?,
            flavor: NameOrId::parse("flavor", &r.flavor)?,
            image_id: parse_opt_id("image_id", &r.image_id)?,
            networks,
            block_devices,
            key_name: Name::parse_opt("key_name", &r.key_name)?,
            user_data: r.user_data,
            metadata: string_map("metadata", r.metadata, MAX_METADATA)?,
            security_groups: r.security_groups,
            server_group_id: parse_opt_id("server_group_id", &r.server_group_id)?,
            availability_zone,
            idempotency_key,
        })
    }
}

pub fn server_pb(s: Server) -> pb::Server {
    pb::Server {
        id: s.id.to_string(),
        name: s.name,
        project_id: s.project_id,
        user_id: s.user_id,
        flavor_id: s.flavor_id.to_string(),
        image_id: s.image_id,
        key_name: s.key_name,
        metadata: s.metadata.into_iter().collect(),
        availability_zone: s.availability_zone,
        server_group_id: s.server_group_id.map(|g| g.to_string()).unwrap_or_default(),
        host: s.host.unwrap_or_default(),
        vm_state: s.vm_state,
        task_state: s.task_state.unwrap_or_default(),
        power_state: s.power_state,
        fault: s.fault.map(|f| pb::Fault {
            code: f.code,
            message: f.message,
            created_at: f.at.map(ts),
        }),
        locked: s.locked,
        locked_reason: s.locked_reason,
        created_at: Some(ts(s.created_at)),
        updated_at: Some(ts(s.updated_at)),
        launched_at: s.launched_at.map(ts),
        revision: s.revision,
        networks: s
            .networks
            .into_iter()
            .map(|n| pb::NetworkRequest {
                network_id: n.network_id.map(|i| i.to_string()).unwrap_or_default(),
                port_id: n.port_id.map(|i| i.to_string()).unwrap_or_default(),
                fixed_ip: n.fixed_ip,
            })
            .collect(),
        block_devices: s
            .block_devices
            .into_iter()
            .map(|b| pb::BlockDevice {
                source: b.source,
                uuid: b.uuid.map(|i| i.to_string()).unwrap_or_default(),
                size_gb: b.size_gb,
                boot_index: b.boot_index,
                delete_on_termination: b.delete_on_termination,
            })
            .collect(),
        security_groups: s.security_groups,
        vcpus: u32::try_from(s.vcpus).unwrap_or(0),
        ram_mb: u32::try_from(s.ram_mb).unwrap_or(0),
        disk_gb: u32::try_from(s.disk_gb).unwrap_or(0),
    }
}

fn flavor_pb(f: Flavor) -> pb::Flavor {
    pb::Flavor {
        id: f.id.to_string(),
        name: f.name,
        vcpus: u32::try_from(f.vcpus).unwrap_or(0),
        ram_mb: u32::try_from(f.ram_mb).unwrap_or(0),
        disk_gb: u32::try_from(f.disk_gb).unwrap_or(0),
        ephemeral_gb: u32::try_from(f.ephemeral_gb).unwrap_or(0),
        extra_specs: f.extra_specs.into_iter().collect(),
        is_public: f.is_public,
        projects: f.projects,
    }
}

fn keypair_pb(k: KeyPair, private: Option<String>) -> pb::KeyPair {
    pb::KeyPair {
        name: k.name,
        r#type: k.kind,
        public_key: k.public_key,
        fingerprint: k.fingerprint,
        private_key: private.unwrap_or_default(),
        user_id: k.user_id,
        created_at: Some(ts(k.created_at)),
    }
}

fn group_pb(g: ServerGroup) -> pb::ServerGroup {
    pb::ServerGroup {
        id: g.id.to_string(),
        name: g.name,
        policy: g.policy,
        members: g.members.iter().map(|m| m.to_string()).collect(),
        project_id: g.project_id,
    }
}

fn limits_pb(l: Limits) -> pb::QuotaLimits {
    pb::QuotaLimits {
        instances: l.instances,
        cores: l.cores,
        ram_mb: l.ram_mb,
        key_pairs: l.key_pairs,
        server_groups: l.server_groups,
    }
}

fn quota_pb((project_id, limits, usage): (String, Limits, Limits)) -> pb::Quota {
    pb::Quota {
        project_id,
        limits: Some(limits_pb(limits)),
        usage: Some(limits_pb(usage)),
    }
}

pub fn host_pb(h: Host) -> pb::Host {
    pb::Host {
        name: h.name,
        enabled: h.enabled,
        disabled_reason: h.disabled_reason,
        up: h.up,
        availability_zone: h.availability_zone,
        vcpus: u32::try_from(h.vcpus).unwrap_or(0),
        ram_mb: u64::try_from(h.ram_mb).unwrap_or(0),
        disk_gb: u64::try_from(h.disk_gb).unwrap_or(0),
        vcpus_used: u32::try_from(h.vcpus_used).unwrap_or(0),
        ram_mb_used: u64::try_from(h.ram_mb_used).unwrap_or(0),
        disk_gb_used: u64::try_from(h.disk_gb_used).unwrap_or(0),
        cpu_allocation_ratio: h.cpu_ratio,
        ram_allocation_ratio: h.ram_ratio,
        disk_allocation_ratio: h.disk_ratio,
        servers: u32::try_from(h.servers).unwrap_or(0),
        hypervisor_type: h.hypervisor_type,
        architecture: h.architecture,
        last_heartbeat: Some(ts(h.last_heartbeat)),
    }
}

fn host_name(s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(Error::invalid(
            "name",
            format!("is not a valid host name: {:?}", runtime::types::short(s)),
        ))
    }
}

#[tonic::async_trait]
impl pb::servers_server::Servers for Api {
    async fn create_server(&self, r: Request<pb::CreateServerRequest>) -> R<pb::Server> {
        let c = creds(&r);
        let req = CreateServer::try_from(r.into_inner())?;
        let s = self.compute.create_server(&c, req).await?;
        Ok(Response::new(server_pb(s)))
    }

    async fn get_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(server_pb(
            self.compute.get_server(&c, id).await?,
        )))
    }

    async fn list_servers(&self, r: Request<pb::ListServersRequest>) -> R<pb::ListServersResponse> {
        let c = caller(&r);
        let q = r.into_inner();
        let query = ListServers {
            name: if q.name.is_empty() {
                None
            } else {
                check_text("name", &q.name, 255)?;
                Some(q.name)
            },
            vm_state: opt_state("vm_state", &q.vm_state, &vm::ALL)?,
            host: if q.host.is_empty() {
                None
            } else {
                Some(host_name(&q.host)?)
            },
            flavor_id: parse_opt_id("flavor_id", &q.flavor_id)?,
            image_id: parse_opt_id("image_id", &q.image_id)?,
            all_projects: q.all_projects,
            project_id: if q.project_id.is_empty() {
                None
            } else {
                Some(project_id("project_id", &q.project_id)?)
            },
            marker: parse_opt_id("marker", &q.marker)?,
            limit: page_limit("limit", q.limit, 100, 1000)?,
        };
        let (servers, next) = self.compute.list_servers(&c, query).await?;
        Ok(Response::new(pb::ListServersResponse {
            servers: servers.into_iter().map(server_pb).collect(),
            next_marker: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn delete_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        let c = creds(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(server_pb(
            self.compute.delete_server(&c, id).await?,
        )))
    }

    async fn start_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        self.act(r, Action::Start).await
    }

    async fn stop_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        self.act(r, Action::Stop).await
    }

    async fn reboot_server(&self, r: Request<pb::RebootServerRequest>) -> R<pb::Server> {
        let c = creds(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let hard = r.get_ref().hard;
        let s = self.compute.action(&c, id, Action::Reboot { hard }).await?;
        Ok(Response::new(server_pb(s)))
    }

    async fn pause_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        self.act(r, Action::Pause).await
    }

    async fn unpause_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        self.act(r, Action::Unpause).await
    }

    async fn suspend_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        self.act(r, Action::Suspend).await
    }

    async fn resume_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        self.act(r, Action::Resume).await
    }

    async fn lock_server(&self, r: Request<pb::LockServerRequest>) -> R<pb::Server> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        check_text("reason", &r.get_ref().reason, 255)?;
        let s = self.compute.lock(&c, id, true, &r.get_ref().reason).await?;
        Ok(Response::new(server_pb(s)))
    }

    async fn unlock_server(&self, r: Request<pb::ServerRef>) -> R<pb::Server> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let s = self.compute.lock(&c, id, false, "").await?;
        Ok(Response::new(server_pb(s)))
    }

    async fn get_console_log(&self, r: Request<pb::GetConsoleLogRequest>) -> R<pb::ConsoleLog> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let output = self.compute.console_log(&c, id, r.get_ref().lines).await?;
        Ok(Response::new(pb::ConsoleLog { output }))
    }

    type WatchServerStream = Pin<Box<dyn Stream<Item = Result<pb::Server, Status>> + Send>>;

    async fn watch_server(&self, r: Request<pb::ServerRef>) -> R<Self::WatchServerStream> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        self.compute.watch(&c, id, tx).await?;
        let stream = futures_util::StreamExt::map(ReceiverStream::new(rx), |item| {
            item.map(server_pb).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn attach_volume(&self, r: Request<pb::AttachVolumeRequest>) -> R<pb::VolumeAttachment> {
        let c = creds(&r);
        let id = parse_id("server_id", &r.get_ref().server_id)?;
        let volume = parse_id("volume_id", &r.get_ref().volume_id)?;
        let a = self.compute.attach_volume(&c, id, volume).await?;
        Ok(Response::new(attachment_pb(a)))
    }

    async fn detach_volume(&self, r: Request<pb::DetachVolumeRequest>) -> R<pb::VolumeAttachment> {
        let c = creds(&r);
        let id = parse_id("server_id", &r.get_ref().server_id)?;
        let volume = parse_id("volume_id", &r.get_ref().volume_id)?;
        let a = self.compute.detach_volume(&c, id, volume).await?;
        Ok(Response::new(attachment_pb(a)))
    }

    async fn list_volume_attachments(
        &self,
        r: Request<pb::ServerRef>,
    ) -> R<pb::ListVolumeAttachmentsResponse> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let all = self.compute.list_attachments(&c, id).await?;
        Ok(Response::new(pb::ListVolumeAttachmentsResponse {
            attachments: all.into_iter().map(attachment_pb).collect(),
        }))
    }

    type AttachConsoleStream =
        Pin<Box<dyn Stream<Item = Result<pb::ConsoleOutput, Status>> + Send>>;

    async fn attach_console(
        &self,
        r: Request<tonic::Streaming<pb::ConsoleInput>>,
    ) -> R<Self::AttachConsoleStream> {
        use futures_util::StreamExt;
        let c = caller(&r);
        let mut input = r.into_inner();
        let first = tokio::time::timeout(CONSOLE_FIRST_MESSAGE, input.message())
            .await
            .map_err(|_| {
                Error::invalid(
                    "server_id",
                    "the first message must name the server (none came in time)",
                )
            })?
            .map_err(|s| {
                Error::invalid(
                    "server_id",
                    format!("reading the first message: {}", s.message()),
                )
            })?
            .ok_or_else(|| Error::invalid("server_id", "the first message must name the server"))?;
        let id = parse_id("server_id", &first.server_id)?;
        check_console_data(&first.data)?;
        // Input ends at the client's first error or oversized message.
        let rest = futures_util::stream::unfold(input, next_input);
        let out = self.compute.console(&c, id, first.data, rest).await?;
        let stream = out.map(|m| {
            m.map(|m| pb::ConsoleOutput { data: m.data })
                .map_err(|s| Status::unavailable(format!("console: {}", s.message())))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn next_input(
    mut input: tonic::Streaming<pb::ConsoleInput>,
) -> Option<(Vec<u8>, tonic::Streaming<pb::ConsoleInput>)> {
    match input.message().await {
        Ok(Some(m)) if m.data.len() <= MAX_CONSOLE_CHUNK => Some((m.data, input)),
        _ => None,
    }
}

const CONSOLE_FIRST_MESSAGE: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_CONSOLE_CHUNK: usize = 64 * 1024;

fn check_console_data(d: &[u8]) -> Result<(), Error> {
    if d.len() > MAX_CONSOLE_CHUNK {
        Err(Error::invalid(
            "data",
            format!("at most {MAX_CONSOLE_CHUNK} bytes per message"),
        ))
    } else {
        Ok(())
    }
}

fn attachment_pb(a: VolumeAttachment) -> pb::VolumeAttachment {
    pb::VolumeAttachment {
        server_id: a.server_id.to_string(),
        volume_id: a.volume_id.to_string(),
        status: a.status,
        device: a.device,
        attachment_id: a.attachment_id,
        created_at: Some(ts(a.created_at)),
    }
}

impl Api {
    async fn act(&self, r: Request<pb::ServerRef>, action: Action) -> R<pb::Server> {
        let c = creds(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        let s = self.compute.action(&c, id, action).await?;
        Ok(Response::new(server_pb(s)))
    }
}

#[tonic::async_trait]
impl pb::flavors_server::Flavors for Api {
    async fn create_flavor(&self, r: Request<pb::CreateFlavorRequest>) -> R<pb::Flavor> {
        let c = caller(&r);
        let q = r.into_inner();
        let f = NewFlavor {
            name: Name::parse("name", &q.name)?,
            vcpus: positive("vcpus", q.vcpus, 1024)?,
            ram_mb: positive("ram_mb", q.ram_mb, 16 * 1024 * 1024)?,
            disk_gb: if q.disk_gb > 100_000 {
                return Err(Error::invalid("disk_gb", "must be at most 100000").into());
            } else {
                q.disk_gb as i32
            },
            ephemeral_gb: if q.ephemeral_gb > 100_000 {
                return Err(Error::invalid("ephemeral_gb", "must be at most 100000").into());
            } else {
                q.ephemeral_gb as i32
            },
            extra_specs: string_map("extra_specs", q.extra_specs, MAX_EXTRA_SPECS)?,
            is_public: q.is_public,
        };
        Ok(Response::new(flavor_pb(
            self.compute.create_flavor(&c, f).await?,
        )))
    }

    async fn get_flavor(&self, r: Request<pb::FlavorRef>) -> R<pb::Flavor> {
        let c = caller(&r);
        let f = NameOrId::parse("flavor", &r.get_ref().flavor)?;
        Ok(Response::new(flavor_pb(
            self.compute.get_flavor(&c, &f).await?,
        )))
    }

    async fn list_flavors(&self, r: Request<pb::ListFlavorsRequest>) -> R<pb::ListFlavorsResponse> {
        let c = caller(&r);
        let flavors = self.compute.list_flavors(&c).await?;
        Ok(Response::new(pb::ListFlavorsResponse {
            flavors: flavors.into_iter().map(flavor_pb).collect(),
        }))
    }

    async fn delete_flavor(&self, r: Request<pb::FlavorRef>) -> R<pb::DeleteResponse> {
        let c = caller(&r);
        let f = NameOrId::parse("flavor", &r.get_ref().flavor)?;
        self.compute.delete_flavor(&c, &f).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn add_flavor_access(&self, r: Request<pb::FlavorAccessRequest>) -> R<pb::Flavor> {
        let c = caller(&r);
        let f = NameOrId::parse("flavor", &r.get_ref().flavor)?;
        let p = project_id("project_id", &r.get_ref().project_id)?;
        Ok(Response::new(flavor_pb(
            self.compute.flavor_access(&c, &f, &p, true).await?,
        )))
    }

    async fn remove_flavor_access(&self, r: Request<pb::FlavorAccessRequest>) -> R<pb::Flavor> {
        let c = caller(&r);
        let f = NameOrId::parse("flavor", &r.get_ref().flavor)?;
        let p = project_id("project_id", &r.get_ref().project_id)?;
        Ok(Response::new(flavor_pb(
            self.compute.flavor_access(&c, &f, &p, false).await?,
        )))
    }
}

#[tonic::async_trait]
impl pb::key_pairs_server::KeyPairs for Api {
    async fn create_key_pair(&self, r: Request<pb::CreateKeyPairRequest>) -> R<pb::KeyPair> {
        let c = caller(&r);
        let q = r.into_inner();
        let name = Name::parse("name", &q.name)?;
        let public = if q.public_key.trim().is_empty() {
            None
        } else {
            Some(q.public_key)
        };
        let (kp, private) = self.compute.create_keypair(&c, name, public).await?;
        Ok(Response::new(keypair_pb(kp, private)))
    }

    async fn get_key_pair(&self, r: Request<pb::KeyPairRef>) -> R<pb::KeyPair> {
        let c = caller(&r);
        let name = Name::parse("name", &r.get_ref().name)?;
        Ok(Response::new(keypair_pb(
            self.compute.get_keypair(&c, &name).await?,
            None,
        )))
    }

    async fn list_key_pairs(
        &self,
        r: Request<pb::ListKeyPairsRequest>,
    ) -> R<pb::ListKeyPairsResponse> {
        let c = caller(&r);
        let kps = self.compute.list_keypairs(&c).await?;
        Ok(Response::new(pb::ListKeyPairsResponse {
            key_pairs: kps.into_iter().map(|k| keypair_pb(k, None)).collect(),
        }))
    }

    async fn delete_key_pair(&self, r: Request<pb::KeyPairRef>) -> R<pb::DeleteResponse> {
        let c = caller(&r);
        let name = Name::parse("name", &r.get_ref().name)?;
        self.compute.delete_keypair(&c, &name).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }
}

#[tonic::async_trait]
impl pb::server_groups_server::ServerGroups for Api {
    async fn create_server_group(
        &self,
        r: Request<pb::CreateServerGroupRequest>,
    ) -> R<pb::ServerGroup> {
        let c = caller(&r);
        let q = r.into_inner();
        let name = Name::parse("name", &q.name)?;
        if !GROUP_POLICIES.contains(&q.policy.as_str()) {
            return Err(Error::invalid(
                "policy",
                format!("must be one of {}", GROUP_POLICIES.join(", ")),
            )
            .into());
        }
        Ok(Response::new(group_pb(
            self.compute.create_group(&c, name, q.policy).await?,
        )))
    }

    async fn get_server_group(&self, r: Request<pb::ServerGroupRef>) -> R<pb::ServerGroup> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(group_pb(
            self.compute.get_group(&c, id).await?,
        )))
    }

    async fn list_server_groups(
        &self,
        r: Request<pb::ListServerGroupsRequest>,
    ) -> R<pb::ListServerGroupsResponse> {
        let c = caller(&r);
        let groups = self.compute.list_groups(&c).await?;
        Ok(Response::new(pb::ListServerGroupsResponse {
            server_groups: groups.into_iter().map(group_pb).collect(),
        }))
    }

    async fn delete_server_group(&self, r: Request<pb::ServerGroupRef>) -> R<pb::DeleteResponse> {
        let c = caller(&r);
        let id = parse_id("id", &r.get_ref().id)?;
        self.compute.delete_group(&c, id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }
}

#[tonic::async_trait]
impl pb::quotas_server::Quotas for Api {
    async fn get_quota(&self, r: Request<pb::GetQuotaRequest>) -> R<pb::Quota> {
        let c = caller(&r);
        let p = if r.get_ref().project_id.is_empty() {
            None
        } else {
            Some(project_id("project_id", &r.get_ref().project_id)?)
        };
        Ok(Response::new(quota_pb(
            self.compute.get_quota(&c, p).await?,
        )))
    }

    async fn set_quota(&self, r: Request<pb::SetQuotaRequest>) -> R<pb::Quota> {
        let c = caller(&r);
        let q = r.into_inner();
        let p = project_id("project_id", &q.project_id)?;
        let l = q
            .limits
            .ok_or_else(|| Error::invalid("limits", "is required"))?;
        for (field, v) in [
            ("limits.instances", l.instances),
            ("limits.cores", l.cores),
            ("limits.ram_mb", l.ram_mb),
            ("limits.key_pairs", l.key_pairs),
            ("limits.server_groups", l.server_groups),
        ] {
            if v < -1 {
                return Err(Error::invalid(field, "must be -1 (unlimited) or more").into());
            }
        }
        let limits = Limits {
            instances: l.instances,
            cores: l.cores,
            ram_mb: l.ram_mb,
            key_pairs: l.key_pairs,
            server_groups: l.server_groups,
        };
        Ok(Response::new(quota_pb(
            self.compute.set_quota(&c, p, limits).await?,
        )))
    }
}

#[tonic::async_trait]
impl pb::hosts_server::Hosts for Api {
    async fn list_hosts(&self, r: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        let c = caller(&r);
        let hosts = self.compute.list_hosts(&c).await?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: hosts.into_iter().map(host_pb).collect(),
        }))
    }

    async fn get_host(&self, r: Request<pb::HostRef>) -> R<pb::Host> {
        let c = caller(&r);
        let name = host_name(&r.get_ref().name)?;
        Ok(Response::new(host_pb(
            self.compute.get_host(&c, &name).await?,
        )))
    }

    async fn set_host(&self, r: Request<pb::SetHostRequest>) -> R<pb::Host> {
        let c = caller(&r);
        let name = host_name(&r.get_ref().name)?;
        check_text("disabled_reason", &r.get_ref().disabled_reason, 255)?;
        let h = self
            .compute
            .set_host(&c, &name, r.get_ref().enabled, &r.get_ref().disabled_reason)
            .await?;
        Ok(Response::new(host_pb(h)))
    }
}
