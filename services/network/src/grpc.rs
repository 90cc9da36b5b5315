//! The gRPC adapter, the only tonic code of the service: reads the caller
//! from the sidecar's trusted headers, validates every field of every
//! request into the domain's request values, calls [`Net`], and maps the
//! answer back. Nothing here decides anything; the domain code does.

use std::net::Ipv4Addr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use proto::network::v1 as pb;
use runtime::caller::Caller;
use runtime::error::Error;
use runtime::types::{Name, NameOrId, check_text, parse_id, parse_opt_id, short};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::addr::{self, Cidr4};
use crate::model::{self, *};
use crate::service::*;

type R<T> = Result<Response<T>, Status>;

const MAX_DNS: usize = 5;
const MAX_ROUTES: usize = 20;
const MAX_POOLS: usize = 16;
const MAX_FIXED_IPS: usize = 8;
const MAX_GROUPS: usize = 16;
const MAX_DEVICE: usize = 255;

#[derive(Clone)]
pub struct Api {
    pub net: Net,
}

fn actor<T>(r: &Request<T>) -> Result<Actor, Status> {
    Ok(Actor::from_caller(&Caller::from_metadata(r.metadata()))?)
}

pub fn timestamp(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn text(field: &'static str, s: &str, max: usize) -> Result<String, Error> {
    check_text(field, s, max)?;
    Ok(s.to_string())
}

fn project_id(field: &'static str, s: &str) -> Result<Option<String>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    let ok = s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(Some(s.to_string()))
    } else {
        Err(Error::invalid(
            field,
            format!("is not a valid project id: {:?}", short(s)),
        ))
    }
}

// ------------------------------------------------------------ to the wire

fn network_pb(n: Network, who: &Actor) -> pb::Network {
    let admin = matches!(who, Actor::User { admin: true, .. });
    pb::Network {
        id: n.id.to_string(),
        name: n.name,
        project_id: n.project_id,
        shared: n.shared,
        admin_state_up: n.admin_state_up,
        mtu: n.mtu,
        status: if n.admin_state_up { "ACTIVE" } else { "DOWN" }.into(),
        segmentation_id: if admin { n.segmentation_id } else { 0 },
        subnet_ids: n.subnet_ids.iter().map(Uuid::to_string).collect(),
        created_at: timestamp(n.created_at),
    }
}

fn subnet_pb(s: Subnet) -> pb::Subnet {
    pb::Subnet {
        id: s.id.to_string(),
        network_id: s.network_id.to_string(),
        project_id: s.project_id,
        name: s.name,
        ip_version: pb::IpVersion::IpVersion4 as i32,
        cidr: s.cidr.to_string(),
        gateway_ip: s.gateway.map(|g| g.to_string()).unwrap_or_default(),
        allocation_pools: s
            .pools
            .iter()
            .map(|p| pb::AllocationPool {
                start: p.start.to_string(),
                end: p.end.to_string(),
            })
            .collect(),
        dns_nameservers: s.dns,
        host_routes: s
            .routes
            .into_iter()
            .map(|r| pb::HostRoute {
                destination: r.destination,
                nexthop: r.nexthop,
            })
            .collect(),
        enable_dhcp: s.enable_dhcp,
        created_at: timestamp(s.created_at),
    }
}

fn port_pb(p: Port) -> pb::Port {
    let vif = if !p.binding_host.is_empty() {
        pb::VifType::Ovs
    } else if !p.binding_error.is_empty() {
        pb::VifType::BindingFailed
    } else {
        pb::VifType::Unbound
    };
    pb::Port {
        id: p.id.to_string(),
        network_id: p.network_id.to_string(),
        project_id: p.project_id,
        name: p.name,
        mac_address: p.mac,
        fixed_ips: p
            .fixed_ips
            .iter()
            .map(|(s, ip)| pb::FixedIp {
                subnet_id: s.to_string(),
                ip_address: ip.to_string(),
            })
            .collect(),
        device_id: p.device_id,
        device_owner: p.device_owner,
        security_group_ids: p.security_groups.iter().map(Uuid::to_string).collect(),
        admin_state_up: p.admin_state_up,
        status: p.status.as_str().into(),
        binding: Some(pb::PortBinding {
            interface_id: if vif == pb::VifType::Ovs {
                p.id.to_string()
            } else {
                String::new()
            },
            host: p.binding_host,
            vif_type: vif as i32,
            bridge: p.binding_bridge,
            binding_error: p.binding_error,
        }),
        port_security_enabled: p.port_security,
        created_at: timestamp(p.created_at),
    }
}

fn rule_pb(r: &Rule) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        id: r.id.to_string(),
        security_group_id: r.security_group_id.to_string(),
        direction: match r.direction {
            Direction::Ingress => pb::Direction::Ingress,
            Direction::Egress => pb::Direction::Egress,
        } as i32,
        ethertype: pb::IpVersion::IpVersion4 as i32,
        protocol: match r.protocol {
            Protocol::Any => pb::Protocol::Any,
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
            Protocol::Icmp => pb::Protocol::Icmp,
        } as i32,
        port_range_min: u32::from(r.port_min),
        port_range_max: u32::from(r.port_max),
        remote_ip_prefix: r.remote_ip_prefix.clone(),
        remote_group_id: r.remote_group_id.map(|g| g.to_string()).unwrap_or_default(),
    }
}

fn group_pb(g: SecurityGroup) -> pb::SecurityGroup {
    pb::SecurityGroup {
        id: g.id.to_string(),
        project_id: g.project_id,
        name: g.name,
        description: g.description,
        rules: g.rules.iter().map(rule_pb).collect(),
        created_at: timestamp(g.created_at),
    }
}

fn agent_pb(a: Agent) -> pb::Agent {
    pb::Agent {
        host: a.host,
        alive: a.alive,
        last_heartbeat: timestamp(a.last_heartbeat),
        started_at: a.started_at,
        version: a.version,
        bridge: a.bridge,
    }
}

fn quota_pb(project: String, items: Vec<(String, i64, i64)>) -> pb::Quota {
    pb::Quota {
        project_id: project,
        items: items
            .into_iter()
            .map(|(resource, limit, used)| pb::QuotaItem {
                resource,
                limit,
                used,
            })
            .collect(),
    }
}

// ---------------------------------------------------------- from the wire

fn ip_version(v: i32) -> Result<(), Error> {
    match pb::IpVersion::try_from(v) {
        Ok(pb::IpVersion::Unspecified) | Ok(pb::IpVersion::IpVersion4) => Ok(()),
        Ok(pb::IpVersion::IpVersion6) => {
            Err(Error::invalid("ip_version", "IPv6 is not supported yet"))
        }
        Err(_) => Err(Error::invalid(
            "ip_version",
            format!("unknown ip_version {v}"),
        )),
    }
}

impl TryFrom<pb::CreateSubnetRequest> for NewSubnet {
    type Error = Error;
    fn try_from(m: pb::CreateSubnetRequest) -> Result<Self, Error> {
        let network = NameOrId::parse("network_id", &m.network_id)?;
        ip_version(m.ip_version)?;
        let name = text("name", &m.name, runtime::types::MAX_NAME)?;
        if m.cidr.is_empty() {
            return Err(Error::invalid("cidr", "is required"));
        }
        let cidr = Cidr4::parse("cidr", &m.cidr)?;
        let gateway = addr::gateway(&cidr, m.gateway_ip.as_deref())?;
        if m.allocation_pools.len() > MAX_POOLS {
            return Err(Error::invalid(
                "allocation_pools",
                format!("at most {MAX_POOLS}"),
            ));
        }
        let given: Vec<(String, String)> = m
            .allocation_pools
            .into_iter()
            .map(|p| (p.start, p.end))
            .collect();
        let pools = addr::pools(&cidr, gateway, &given)?;
        if m.dns_nameservers.len() > MAX_DNS {
            return Err(Error::invalid(
                "dns_nameservers",
                format!("at most {MAX_DNS}"),
            ));
        }
        let dns = m
            .dns_nameservers
            .iter()
            .map(|d| addr::parse_ip("dns_nameservers", d))
            .collect::<Result<Vec<_>, _>>()?;
        if m.host_routes.len() > MAX_ROUTES {
            return Err(Error::invalid(
                "host_routes",
                format!("at most {MAX_ROUTES}"),
            ));
        }
        let mut routes = Vec::new();
        for r in m.host_routes {
            let d = Cidr4::parse("host_routes", &r.destination)?;
            let n = addr::parse_ip("host_routes", &r.nexthop)?;
            if !cidr.contains(n) {
                return Err(Error::invalid(
                    "host_routes",
                    format!("nexthop {n} is outside {cidr}"),
                ));
            }
            routes.push(Route {
                destination: d.to_string(),
                nexthop: n.to_string(),
            });
        }
        Ok(NewSubnet {
            network,
            name,
            cidr,
            gateway,
            pools,
            dns,
            routes,
            enable_dhcp: m.enable_dhcp.unwrap_or(true),
        })
    }
}

impl TryFrom<pb::CreatePortRequest> for NewPort {
    type Error = Error;
    fn try_from(m: pb::CreatePortRequest) -> Result<Self, Error> {
        let network = NameOrId::parse("network_id", &m.network_id)?;
        let mac = if m.mac_address.is_empty() {
            None
        } else {
            Some(addr::parse_mac("mac_address", &m.mac_address)?)
        };
        if m.fixed_ips.len() > MAX_FIXED_IPS {
            return Err(Error::invalid(
                "fixed_ips",
                format!("at most {MAX_FIXED_IPS}"),
            ));
        }
        let fixed_ips = m
            .fixed_ips
            .iter()
            .map(|f| {
                Ok(FixedIpRequest {
                    subnet: parse_opt_id("fixed_ips", &f.subnet_id)?,
                    ip: if f.ip_address.is_empty() {
                        None
                    } else {
                        Some(addr::parse_ip("fixed_ips", &f.ip_address)?)
                    },
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(NewPort {
            network,
            name: text("name", &m.name, runtime::types::MAX_NAME)?,
            mac,
            fixed_ips,
            device_id: text("device_id", &m.device_id, MAX_DEVICE)?,
            device_owner: text("device_owner", &m.device_owner, MAX_DEVICE)?,
            security_groups: groups(&m.security_groups)?,
            admin_state_up: m.admin_state_up.unwrap_or(true),
            project_id: project_id("project_id", &m.project_id)?,
        })
    }
}

fn groups(v: &[String]) -> Result<Vec<NameOrId>, Error> {
    if v.len() > MAX_GROUPS {
        return Err(Error::invalid(
            "security_groups",
            format!("at most {MAX_GROUPS}"),
        ));
    }
    v.iter()
        .map(|g| NameOrId::parse("security_groups", g))
        .collect()
}

impl TryFrom<pb::CreateSecurityGroupRuleRequest> for NewRule {
    type Error = Error;
    fn try_from(m: pb::CreateSecurityGroupRuleRequest) -> Result<Self, Error> {
        let group = NameOrId::parse("security_group_id", &m.security_group_id)?;
        let direction = match pb::Direction::try_from(m.direction) {
            Ok(pb::Direction::Ingress) => Direction::Ingress,
            Ok(pb::Direction::Egress) => Direction::Egress,
            Ok(pb::Direction::Unspecified) => {
                return Err(Error::invalid("direction", "is required"));
            }
            Err(_) => {
                return Err(Error::invalid(
                    "direction",
                    format!("unknown direction {}", m.direction),
                ));
            }
        };
        match pb::IpVersion::try_from(m.ethertype) {
            Ok(pb::IpVersion::Unspecified) | Ok(pb::IpVersion::IpVersion4) => {}
            Ok(pb::IpVersion::IpVersion6) => {
                return Err(Error::invalid("ethertype", "IPv6 is not supported yet"));
            }
            Err(_) => {
                return Err(Error::invalid(
                    "ethertype",
                    format!("unknown ethertype {}", m.ethertype),
                ));
            }
        }
        let protocol = match pb::Protocol::try_from(m.protocol) {
            Ok(pb::Protocol::Any) => Protocol::Any,
            Ok(pb::Protocol::Tcp) => Protocol::Tcp,
            Ok(pb::Protocol::Udp) => Protocol::Udp,
            Ok(pb::Protocol::Icmp) => Protocol::Icmp,
            Err(_) => {
                return Err(Error::invalid(
                    "protocol",
                    format!("unknown protocol {}", m.protocol),
                ));
            }
        };
        let (min, max) = (m.port_range_min, m.port_range_max);
        if (min, max) != (0, 0) {
            if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
                return Err(Error::invalid(
                    "port_range_min",
                    format!("a port range needs tcp or udp, not {}", protocol.as_str()),
                ));
            }
            if min == 0 || max > 65535 || min > max {
                return Err(Error::invalid(
                    "port_range_min",
                    format!("{min}-{max} is not a port range within 1-65535"),
                ));
            }
        }
        let remote_group = if m.remote_group_id.is_empty() {
            None
        } else {
            Some(NameOrId::parse("remote_group_id", &m.remote_group_id)?)
        };
        let remote_ip_prefix = if m.remote_ip_prefix.is_empty() {
            String::new()
        } else {
            if remote_group.is_some() {
                return Err(Error::invalid(
                    "remote_ip_prefix",
                    "give a remote_ip_prefix or a remote_group_id, not both",
                ));
            }
            remote_prefix(&m.remote_ip_prefix)?.to_string()
        };
        Ok(NewRule {
            group,
            direction,
            protocol,
            port_min: min as u16,
            port_max: max as u16,
            remote_ip_prefix,
            remote_group,
        })
    }
}

/// A remote prefix may be any length (0.0.0.0/0, a /32 host).
fn remote_prefix(s: &str) -> Result<String, Error> {
    let bad = || {
        Error::invalid(
            "remote_ip_prefix",
            format!("is not an IPv4 CIDR: {:?}", short(s)),
        )
    };
    let (a, p) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    if u32::from(ip) & !mask != 0 {
        return Err(Error::invalid(
            "remote_ip_prefix",
            format!("{s} has host bits set"),
        ));
    }
    Ok(format!("{ip}/{prefix}"))
}

// ------------------------------------------------------------ the service

#[tonic::async_trait]
impl pb::networks_server::Networks for Api {
    async fn create_network(&self, req: Request<pb::CreateNetworkRequest>) -> R<pb::Network> {
        let who = actor(&req)?;
        let m = req.into_inner();
        let mtu = match m.mtu {
            0 => None,
            n if (68..=9000).contains(&n) => Some(n),
            n => {
                return Err(
                    Error::invalid("mtu", format!("{n} is not between 68 and 9000")).into(),
                );
            }
        };
        let new = NewNetwork {
            name: Name::parse("name", &m.name)?,
            project_id: project_id("project_id", &m.project_id)?,
            shared: m.shared,
            admin_state_up: m.admin_state_up.unwrap_or(true),
            mtu,
        };
        let n = self.net.create_network(&who, new).await?;
        Ok(Response::new(network_pb(n, &who)))
    }

    async fn get_network(&self, req: Request<pb::GetRequest>) -> R<pb::Network> {
        let who = actor(&req)?;
        let key = NameOrId::parse("id", &req.get_ref().id)?;
        let n = self.net.get_network(&who, &key).await?;
        Ok(Response::new(network_pb(n, &who)))
    }

    async fn list_networks(&self, req: Request<pb::ListRequest>) -> R<pb::ListNetworksResponse> {
        let who = actor(&req)?;
        let v = self
            .net
            .list_networks(&who, req.get_ref().all_projects)
            .await?;
        Ok(Response::new(pb::ListNetworksResponse {
            networks: v.into_iter().map(|n| network_pb(n, &who)).collect(),
        }))
    }

    async fn update_network(&self, req: Request<pb::UpdateNetworkRequest>) -> R<pb::Network> {
        let who = actor(&req)?;
        let m = req.into_inner();
        let up = NetworkUpdate {
            id: NameOrId::parse("id", &m.id)?,
            name: m
                .name
                .as_deref()
                .map(|n| Name::parse("name", n))
                .transpose()?,
            shared: m.shared,
            admin_state_up: m.admin_state_up,
        };
        let n = self.net.update_network(&who, up).await?;
        Ok(Response::new(network_pb(n, &who)))
    }

    async fn delete_network(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let who = actor(&req)?;
        let key = NameOrId::parse("id", &req.get_ref().id)?;
        self.net.delete_network(&who, &key).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_subnet(&self, req: Request<pb::CreateSubnetRequest>) -> R<pb::Subnet> {
        let who = actor(&req)?;
        let new = NewSubnet::try_from(req.into_inner())?;
        Ok(Response::new(subnet_pb(
            self.net.create_subnet(&who, new).await?,
        )))
    }

    async fn get_subnet(&self, req: Request<pb::GetRequest>) -> R<pb::Subnet> {
        let who = actor(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(subnet_pb(
            self.net.get_subnet(&who, id).await?,
        )))
    }

    async fn list_subnets(
        &self,
        req: Request<pb::ListSubnetsRequest>,
    ) -> R<pb::ListSubnetsResponse> {
        let who = actor(&req)?;
        let network = match req.get_ref().network_id.as_str() {
            "" => None,
            s => Some(NameOrId::parse("network_id", s)?),
        };
        let v = self.net.list_subnets(&who, network).await?;
        Ok(Response::new(pb::ListSubnetsResponse {
            subnets: v.into_iter().map(subnet_pb).collect(),
        }))
    }

    async fn delete_subnet(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let who = actor(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        self.net.delete_subnet(&who, id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_port(&self, req: Request<pb::CreatePortRequest>) -> R<pb::Port> {
        let who = actor(&req)?;
        let new = NewPort::try_from(req.into_inner())?;
        Ok(Response::new(port_pb(
            self.net.create_port(&who, new).await?,
        )))
    }

    async fn get_port(&self, req: Request<pb::GetRequest>) -> R<pb::Port> {
        let who = actor(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(port_pb(self.net.get_port(&who, id).await?)))
    }

    async fn list_ports(&self, req: Request<pb::ListPortsRequest>) -> R<pb::ListPortsResponse> {
        let who = actor(&req)?;
        let m = req.into_inner();
        let q = PortQuery {
            network: match m.network_id.as_str() {
                "" => None,
                s => Some(NameOrId::parse("network_id", s)?),
            },
            device_id: match m.device_id.as_str() {
                "" => None,
                s => Some(text("device_id", s, MAX_DEVICE)?),
            },
            all_projects: m.all_projects,
        };
        let v = self.net.list_ports(&who, q).await?;
        Ok(Response::new(pb::ListPortsResponse {
            ports: v.into_iter().map(port_pb).collect(),
        }))
    }

    async fn update_port(&self, req: Request<pb::UpdatePortRequest>) -> R<pb::Port> {
        let who = actor(&req)?;
        let m = req.into_inner();
        let up = PortUpdate {
            id: parse_id("id", &m.id)?,
            name: m
                .name
                .as_deref()
                .map(|s| text("name", s, runtime::types::MAX_NAME))
                .transpose()?,
            admin_state_up: m.admin_state_up,
            device_id: m
                .device_id
                .as_deref()
                .map(|s| text("device_id", s, MAX_DEVICE))
                .transpose()?,
            device_owner: m
                .device_owner
                .as_deref()
                .map(|s| text("device_owner", s, MAX_DEVICE))
                .transpose()?,
            security_groups: m.security_groups.map(|g| groups(&g.ids)).transpose()?,
        };
        Ok(Response::new(port_pb(
            self.net.update_port(&who, up).await?,
        )))
    }

    async fn delete_port(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let who = actor(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        self.net.delete_port(&who, id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn bind_port(&self, req: Request<pb::BindPortRequest>) -> R<pb::Port> {
        let who = actor(&req)?;
        let m = req.get_ref();
        let id = parse_id("port_id", &m.port_id)?;
        if m.host.is_empty() {
            return Err(Error::invalid("host", "is required").into());
        }
        if !valid_host(&m.host) {
            return Err(Error::invalid(
                "host",
                format!("is not a host name: {:?}", short(&m.host)),
            )
            .into());
        }
        Ok(Response::new(port_pb(
            self.net.bind_port(&who, id, &m.host).await?,
        )))
    }

    async fn unbind_port(&self, req: Request<pb::UnbindPortRequest>) -> R<pb::Port> {
        let who = actor(&req)?;
        let id = parse_id("port_id", &req.get_ref().port_id)?;
        Ok(Response::new(port_pb(
            self.net.unbind_port(&who, id).await?,
        )))
    }

    type WatchPortsStream = Pin<Box<dyn Stream<Item = Result<pb::PortEvent, Status>> + Send>>;

    async fn watch_ports(&self, req: Request<pb::WatchPortsRequest>) -> R<Self::WatchPortsStream> {
        let who = actor(&req)?;
        let device = req.get_ref().device_id.clone();
        if device.is_empty() {
            return Err(Error::invalid("device_id", "is required").into());
        }
        let device = text("device_id", &device, MAX_DEVICE)?;
        let first = self.net.device_ports(&who, &device).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let net = self.net.clone();
        tokio::spawn(async move {
            let mut changes = net.changes.subscribe();
            let mut seen: Vec<(Uuid, model::PortStatus)> = Vec::new();
            let mut ports = first;
            let mut initial = true;
            loop {
                for p in &ports {
                    let before = seen.iter().find(|(id, _)| *id == p.id).map(|(_, s)| *s);
                    if before != Some(p.status) {
                        let ev = pb::PortEvent {
                            port_id: p.id.to_string(),
                            device_id: p.device_id.clone(),
                            status: p.status.as_str().into(),
                            initial,
                            exists: true,
                        };
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                }
                for (id, _) in seen
                    .iter()
                    .filter(|(id, _)| !ports.iter().any(|p| p.id == *id))
                {
                    let ev = pb::PortEvent {
                        port_id: id.to_string(),
                        device_id: device.clone(),
                        status: "DELETED".into(),
                        initial: false,
                        exists: false,
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                seen = ports.iter().map(|p| (p.id, p.status)).collect();
                initial = false;
                // A change, or at most 5 s (a missed notice only delays).
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_secs(5), changes.changed()) => {}
                    () = tx.closed() => return,
                }
                match net.device_ports(&who, &device).await {
                    Ok(p) => ports = p,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn create_security_group(
        &self,
        req: Request<pb::CreateSecurityGroupRequest>,
    ) -> R<pb::SecurityGroup> {
        let who = actor(&req)?;
        let m = req.get_ref();
        let name = Name::parse("name", &m.name)?;
        let description = text("description", &m.description, 1024)?;
        Ok(Response::new(group_pb(
            self.net.create_group(&who, name, description).await?,
        )))
    }

    async fn get_security_group(&self, req: Request<pb::GetRequest>) -> R<pb::SecurityGroup> {
        let who = actor(&req)?;
        let key = NameOrId::parse("id", &req.get_ref().id)?;
        Ok(Response::new(group_pb(
            self.net.get_group(&who, &key).await?,
        )))
    }

    async fn list_security_groups(
        &self,
        req: Request<pb::ListRequest>,
    ) -> R<pb::ListSecurityGroupsResponse> {
        let who = actor(&req)?;
        let v = self
            .net
            .list_groups(&who, req.get_ref().all_projects)
            .await?;
        Ok(Response::new(pb::ListSecurityGroupsResponse {
            security_groups: v.into_iter().map(group_pb).collect(),
        }))
    }

    async fn delete_security_group(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> R<pb::DeleteResponse> {
        let who = actor(&req)?;
        let key = NameOrId::parse("id", &req.get_ref().id)?;
        self.net.delete_group(&who, &key).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_security_group_rule(
        &self,
        req: Request<pb::CreateSecurityGroupRuleRequest>,
    ) -> R<pb::SecurityGroupRule> {
        let who = actor(&req)?;
        let new = NewRule::try_from(req.into_inner())?;
        Ok(Response::new(rule_pb(
            &self.net.create_rule(&who, new).await?,
        )))
    }

    async fn delete_security_group_rule(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> R<pb::DeleteResponse> {
        let who = actor(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        self.net.delete_rule(&who, id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_quota(&self, req: Request<pb::GetQuotaRequest>) -> R<pb::Quota> {
        let who = actor(&req)?;
        let project = project_id("project_id", &req.get_ref().project_id)?;
        let shown = project
            .clone()
            .or_else(|| who_project(&who))
            .unwrap_or_default();
        let items = self.net.get_quota(&who, project).await?;
        Ok(Response::new(quota_pb(shown, items)))
    }

    async fn set_quota(&self, req: Request<pb::SetQuotaRequest>) -> R<pb::Quota> {
        let who = actor(&req)?;
        let m = req.into_inner();
        let project = project_id("project_id", &m.project_id)?
            .ok_or_else(|| Error::invalid("project_id", "is required"))?;
        let mut limits = Vec::new();
        for (r, l) in m.limits {
            if !RESOURCES.contains(&r.as_str()) {
                return Err(
                    Error::invalid("limits", format!("unknown resource {:?}", short(&r))).into(),
                );
            }
            if l < -1 {
                return Err(Error::invalid(
                    "limits",
                    format!("{r}: {l} is neither -1 nor a limit"),
                )
                .into());
            }
            limits.push((r, l));
        }
        let items = self.net.set_quota(&who, project.clone(), limits).await?;
        Ok(Response::new(quota_pb(project, items)))
    }

    async fn list_agents(&self, req: Request<pb::ListAgentsRequest>) -> R<pb::ListAgentsResponse> {
        let who = actor(&req)?;
        let v = self.net.list_agents(&who).await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: v.into_iter().map(agent_pb).collect(),
        }))
    }
}

fn who_project(who: &Actor) -> Option<String> {
    match who {
        Actor::User { project, .. } => Some(project.clone()),
        _ => None,
    }
}

#[tonic::async_trait]
impl pb::agents_server::Agents for Api {
    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> R<pb::Agent> {
        let who = actor(&req)?;
        let m = req.get_ref();
        let version = text("version", &m.version, 64)?;
        let bridge = text("bridge", &m.bridge, 15)?;
        let started = text("started_at", &m.started_at, 64)?;
        let a = self
            .net
            .heartbeat(&who, &version, &bridge, &started)
            .await?;
        Ok(Response::new(agent_pb(a)))
    }

    async fn sync_host(&self, req: Request<pb::SyncHostRequest>) -> R<pb::HostState> {
        let who = actor(&req)?;
        let m = req.get_ref();
        let after = text("after", &m.after, 64)?;
        let wait = Duration::from_millis(u64::from(m.wait_ms));
        let (token, s) = self.net.sync_host(&who, &after, wait).await?;
        Ok(Response::new(pb::HostState {
            token,
            networks: s
                .networks
                .into_iter()
                .map(|n| pb::HostNetwork {
                    id: n.network.id.to_string(),
                    segmentation_id: n.network.segmentation_id,
                    mtu: n.network.mtu,
                    admin_state_up: n.network.admin_state_up,
                    dhcp: n.subnets.iter().any(|s| s.enable_dhcp),
                    subnets: n.subnets.into_iter().map(subnet_pb).collect(),
                    dhcp_hosts: n
                        .dhcp_hosts
                        .into_iter()
                        .map(|(id, mac, ips)| pb::DhcpHost {
                            hostname: ips
                                .first()
                                .map(|ip| format!("host-{}", ip.to_string().replace('.', "-")))
                                .unwrap_or_default(),
                            port_id: id.to_string(),
                            mac_address: mac,
                            ip_addresses: ips.iter().map(|ip| ip.to_string()).collect(),
                        })
                        .collect(),
                })
                .collect(),
            ports: s.ports.into_iter().map(port_pb).collect(),
            security_groups: s.security_groups.into_iter().map(group_pb).collect(),
            members: s
                .members
                .into_iter()
                .map(|(g, ips)| pb::GroupMembers {
                    security_group_id: g.to_string(),
                    ip_addresses: ips.iter().map(|ip| ip.to_string()).collect(),
                })
                .collect(),
        }))
    }

    async fn ensure_dhcp_port(&self, req: Request<pb::EnsureDhcpPortRequest>) -> R<pb::Port> {
        let who = actor(&req)?;
        let id = parse_id("network_id", &req.get_ref().network_id)?;
        Ok(Response::new(port_pb(
            self.net.ensure_dhcp_port(&who, id).await?,
        )))
    }

    async fn report_ports(
        &self,
        req: Request<pb::ReportPortsRequest>,
    ) -> R<pb::ReportPortsResponse> {
        let who = actor(&req)?;
        let m = req.get_ref();
        if m.ports.len() > 4096 {
            return Err(Error::invalid("ports", "at most 4096 per report").into());
        }
        let reports = m
            .ports
            .iter()
            .map(|r| Ok((parse_id("port_id", &r.port_id)?, r.wired)))
            .collect::<Result<Vec<_>, Error>>()?;
        let changed = self.net.report_ports(&who, &reports).await?;
        Ok(Response::new(pb::ReportPortsResponse { changed }))
    }
}
