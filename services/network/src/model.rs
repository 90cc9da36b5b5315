//! The domain's values: what the service reads and writes, with no wire or
//! SQL types in them.

use std::net::Ipv4Addr;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::addr::{Cidr4, Pool};

/// The device owner of the ports the agents make for their dnsmasq.
pub const DHCP_OWNER: &str = "network:dhcp";

#[derive(Debug, Clone)]
pub struct Network {
    pub id: Uuid,
    pub project_id: String,
    pub name: String,
    pub shared: bool,
    pub admin_state_up: bool,
    pub mtu: u32,
    pub segmentation_id: u32,
    pub subnet_ids: Vec<Uuid>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct Subnet {
    pub id: Uuid,
    pub network_id: Uuid,
    pub project_id: String,
    pub name: String,
    pub cidr: Cidr4,
    pub gateway: Option<Ipv4Addr>,
    pub pools: Vec<Pool>,
    pub dns: Vec<String>,
    pub routes: Vec<Route>,
    pub enable_dhcp: bool,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub destination: String,
    pub nexthop: String,
}

#[derive(Debug, Clone)]
pub struct Port {
    pub id: Uuid,
    pub network_id: Uuid,
    pub project_id: String,
    pub name: String,
    pub mac: String,
    pub fixed_ips: Vec<(Uuid, Ipv4Addr)>,
    pub device_id: String,
    pub device_owner: String,
    pub security_groups: Vec<Uuid>,
    pub admin_state_up: bool,
    pub status: PortStatus,
    pub port_security: bool,
    pub binding_host: String,
    pub binding_bridge: String,
    pub binding_error: String,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortStatus {
    Down,
    Active,
}

impl PortStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PortStatus::Down => "DOWN",
            PortStatus::Active => "ACTIVE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "DOWN" => Some(PortStatus::Down),
            "ACTIVE" => Some(PortStatus::Active),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SecurityGroup {
    pub id: Uuid,
    pub project_id: String,
    pub name: String,
    pub description: String,
    pub rules: Vec<Rule>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "any" => Some(Protocol::Any),
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: Uuid,
    pub security_group_id: Uuid,
    pub direction: Direction,
    pub protocol: Protocol,
    /// Both 0: every port.
    pub port_min: u16,
    pub port_max: u16,
    /// "" or a CIDR.
    pub remote_ip_prefix: String,
    pub remote_group_id: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub host: String,
    pub alive: bool,
    pub last_heartbeat: OffsetDateTime,
    pub started_at: String,
    pub version: String,
    pub bridge: String,
}

/// The quota'd resources, in the order they are shown.
pub const RESOURCES: [&str; 5] = [
    "networks",
    "subnets",
    "ports",
    "security_groups",
    "security_group_rules",
];

/// Everything one host's agent must wire.
#[derive(Debug, Clone, Default)]
pub struct HostState {
    pub networks: Vec<HostNetwork>,
    pub ports: Vec<Port>,
    pub security_groups: Vec<SecurityGroup>,
    pub members: Vec<(Uuid, Vec<Ipv4Addr>)>,
}

#[derive(Debug, Clone)]
pub struct HostNetwork {
    pub network: Network,
    pub subnets: Vec<Subnet>,
    /// Every port of the network (any host): MAC, addresses.
    pub dhcp_hosts: Vec<(Uuid, String, Vec<Ipv4Addr>)>,
}
