//! The agent's loops: heartbeats; a long poll of `SyncHost` for what this
//! host must wire; an OVSDB monitor for interfaces coming and going; and
//! one reconcile that makes the bridge, the flows and the DHCP servers match
//! the latest state, then reports the ports it wired.
//!
//! Restart safety: local VLAN tags are recovered from OVS (each tagged
//! port carries `other_config:cirrus-net`), the flows are recomputed
//! identically and installed with `replace-flows` (only differences change),
//! and running dnsmasqs are kept: a restart causes no blip. Whatever the
//! state no longer names (namespaces with this agent's prefix, DHCP ports,
//! state directories) is removed by the same reconcile, so a crash at any
//! point leaves nothing orphaned once the agent is back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use proto::network::v1 as pb;
use runtime::trace::Channel;
use tokio::sync::{Notify, watch};

use crate::Config;
use crate::dhcp::{Dhcp, Spec};
use crate::flows::{self, DEAD_VLAN, FlowPort, FlowRule, Proto};
use crate::ovs::{self, Bridge};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const DHCP_OWNER: &str = "network:dhcp";

/// The agent's client of `network.v1.Agents`. Every call carries the
/// host's SPIFFE id in `x-cirrus-peer`: through the sidecar (production)
/// that header is replaced by the verified one; direct (tests), the network
/// service reads it as the sidecar would have set it.
#[derive(Clone)]
pub struct Client {
    inner: pb::agents_client::AgentsClient<Channel>,
    peer: String,
}

impl Client {
    pub fn new(channel: Channel, host: &str) -> Self {
        Self {
            inner: pb::agents_client::AgentsClient::new(channel),
            peer: format!("spiffe://cirrus.local/svc/network-agent/host/{host}"),
        }
    }

    fn req<T>(&self, m: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.set_timeout(timeout);
        if let Ok(v) = self.peer.parse() {
            r.metadata_mut().insert(runtime::caller::PEER, v);
        }
        r
    }

    pub async fn heartbeat(&self, m: pb::HeartbeatRequest) -> Result<pb::Agent, tonic::Status> {
        Ok(self
            .inner
            .clone()
            .heartbeat(self.req(m, CALL_TIMEOUT))
            .await?
            .into_inner())
    }

    pub async fn sync(&self, after: &str, wait_ms: u32) -> Result<pb::HostState, tonic::Status> {
        let m = pb::SyncHostRequest {
            after: after.into(),
            wait_ms,
        };
        let t = CALL_TIMEOUT + Duration::from_millis(u64::from(wait_ms));
        Ok(self
            .inner
            .clone()
            .sync_host(self.req(m, t))
            .await?
            .into_inner())
    }

    pub async fn ensure_dhcp_port(&self, network_id: &str) -> Result<pb::Port, tonic::Status> {
        let m = pb::EnsureDhcpPortRequest {
            network_id: network_id.into(),
        };
        Ok(self
            .inner
            .clone()
            .ensure_dhcp_port(self.req(m, CALL_TIMEOUT))
            .await?
            .into_inner())
    }

    pub async fn report(&self, ports: Vec<pb::PortReport>) -> Result<u32, tonic::Status> {
        let m = pb::ReportPortsRequest { ports };
        Ok(self
            .inner
            .clone()
            .report_ports(self.req(m, CALL_TIMEOUT))
            .await?
            .map(|r| r.changed)
            .into_inner())
    }
}

/// What one reconcile did, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub wired: usize,
    pub dead: usize,
    pub dhcp: usize,
    pub removed: usize,
}

pub struct Agent {
    pub config: Arc<Config>,
    pub client: Client,
    pub bridge: Bridge,
    pub dhcp: Dhcp,
    /// What was last reported per port (reported again after a restart).
    reported: HashMap<String, bool>,
}

fn prefix_len(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = cidr.split_once('/')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

fn netmask(p: u8) -> Ipv4Addr {
    Ipv4Addr::from(if p == 0 { 0 } else { u32::MAX << (32 - p) })
}

impl Agent {
    pub fn new(config: Arc<Config>, channel: Channel) -> Self {
        Self {
            client: Client::new(channel, &config.host),
            bridge: Bridge::new(
                &config.bridge,
                &config.datapath_type,
                crate::ovsdb::Ovsdb::new(&config.ovsdb_socket),
            ),
            dhcp: Dhcp {
                prefix: config.namespace_prefix.clone(),
                state_dir: config.state_dir.clone(),
            },
            config,
            reported: HashMap::new(),
        }
    }

    /// Makes the host match `state`; then reports the ports it wired.
    pub async fn reconcile(&mut self, state: &pb::HostState) -> anyhow::Result<Outcome> {
        let mut out = Outcome::default();
        let host = self.config.host.clone();
        let dhcp_device = format!("dhcp-{host}");

        // DHCP ports first: each dhcp network needs one on this host.
        let mut dhcp_ports: BTreeMap<String, pb::Port> = state
            .ports
            .iter()
            .filter(|p| p.device_owner == DHCP_OWNER && p.device_id == dhcp_device)
            .map(|p| (p.network_id.clone(), p.clone()))
            .collect();
        for n in state.networks.iter().filter(|n| n.dhcp) {
            // Missing, or without an address on a DHCP subnet added since.
            let complete = dhcp_ports.get(&n.id).is_some_and(|p| {
                n.subnets
                    .iter()
                    .filter(|s| s.enable_dhcp)
                    .all(|s| p.fixed_ips.iter().any(|f| f.subnet_id == s.id))
            });
            if !complete {
                match self.client.ensure_dhcp_port(&n.id).await {
                    Ok(p) => {
                        dhcp_ports.insert(n.id.clone(), p);
                    }
                    Err(e) => {
                        tracing::warn!(network = %n.id, status = %e, "cannot get a DHCP port")
                    }
                }
            }
        }
        let mut bound: BTreeMap<String, pb::Port> = state
            .ports
            .iter()
            .map(|p| (p.id.clone(), p.clone()))
            .collect();
        for p in dhcp_ports.values() {
            bound.entry(p.id.clone()).or_insert_with(|| p.clone());
        }

        // Local VLANs: those OVS remembers, then the lowest free for the rest.
        let mut ifaces = self.bridge.interfaces().await?;
        let wanted_nets: BTreeSet<&str> = state.networks.iter().map(|n| n.id.as_str()).collect();
        let mut tags: BTreeMap<String, u16> = BTreeMap::new();
        for i in &ifaces {
            if let (Some(net), Some(tag)) = (i.other_config.get("cirrus-net"), i.tag)
                && tag != DEAD_VLAN
                && wanted_nets.contains(net.as_str())
                && !tags.values().any(|t| *t == tag)
            {
                tags.entry(net.clone()).or_insert(tag);
            }
        }
        for n in &wanted_nets {
            if !tags.contains_key(*n) {
                let used: BTreeSet<u16> = tags.values().copied().collect();
                if let Some(t) = (1..DEAD_VLAN).find(|t| !used.contains(t)) {
                    tags.insert(n.to_string(), t);
                }
            }
        }

        // DHCP servers.
        let mut dhcp_ready: BTreeSet<String> = BTreeSet::new();
        for n in state.networks.iter().filter(|n| n.dhcp) {
            let Some(port) = dhcp_ports.get(&n.id) else {
                continue;
            };
            let spec = dhcp_spec(n, port);
            match self.dhcp.ensure(&spec, &self.bridge).await {
                Ok(()) => {
                    dhcp_ready.insert(n.id.clone());
                    out.dhcp += 1;
                }
                Err(e) => tracing::warn!(network = %n.id, error = %e, "DHCP server not ready"),
            }
        }
        // Orphans: DHCP servers and ports nothing names any more.
        for net in self.dhcp.present().await? {
            if !dhcp_ready.contains(&net) && !state.networks.iter().any(|n| n.id == net && n.dhcp) {
                self.dhcp.remove(&net).await?;
                out.removed += 1;
            }
        }
        ifaces = self.bridge.interfaces().await?;
        for i in &ifaces {
            let owned = i
                .external_ids
                .get("cirrus-owner")
                .is_some_and(|o| o == "dhcp");
            let still = i
                .iface_id()
                .is_some_and(|id| dhcp_ports.values().any(|p| p.id == id));
            if owned && !still {
                self.bridge.del_port(&i.name).await?;
                if ovs::link_exists(&i.name).await {
                    let _ = ovs::run("ip", &["link", "del", &i.name]).await;
                }
                out.removed += 1;
            }
        }
        ifaces.retain(|i| {
            i.external_ids
                .get("cirrus-owner")
                .is_none_or(|o| o != "dhcp")
                || i.iface_id()
                    .is_some_and(|id| dhcp_ports.values().any(|p| p.id == id))
        });

        // Tags: a bound port's interface gets its network's; any other is dead.
        let mut tag_changes = Vec::new();
        let mut flow_ports = Vec::new();
        let mut wired_ids: BTreeSet<String> = BTreeSet::new();
        for i in &ifaces {
            let port = i.iface_id().and_then(|id| bound.get(id));
            let (want, net) = match port
                .and_then(|p| tags.get(&p.network_id).map(|t| (*t, p.network_id.clone())))
            {
                Some((t, net)) => (t, net),
                None => (DEAD_VLAN, String::new()),
            };
            if i.tag != Some(want)
                || i.other_config
                    .get("cirrus-net")
                    .map(String::as_str)
                    .unwrap_or("")
                    != net
            {
                tag_changes.push((i.name.clone(), want, net.clone()));
            }
            let Some(p) = port.filter(|_| want != DEAD_VLAN && i.ofport > 0) else {
                out.dead += 1;
                continue;
            };
            flow_ports.push(flow_port(p, i.ofport as u32, want, state));
            wired_ids.insert(p.id.clone());
        }
        self.bridge.set_tags(&tag_changes).await?;
        let text = flows::pipeline(&flow_ports);
        self.bridge
            .replace_flows(&text, &self.config.state_dir)
            .await?;

        // Report: wired (and, on a DHCP network, its server ready) → ACTIVE.
        let mut reports = Vec::new();
        for p in bound.values() {
            let dhcp_ok = !state
                .networks
                .iter()
                .any(|n| n.id == p.network_id && n.dhcp)
                || dhcp_ready.contains(&p.network_id);
            let wired = wired_ids.contains(&p.id) && dhcp_ok;
            if wired {
                out.wired += 1;
            }
            if self.reported.get(&p.id) != Some(&wired) {
                reports.push(pb::PortReport {
                    port_id: p.id.clone(),
                    wired,
                });
            }
        }
        if !reports.is_empty() {
            match self.client.report(reports.clone()).await {
                Ok(_) => {
                    for r in reports {
                        self.reported.insert(r.port_id, r.wired);
                    }
                }
                Err(e) => tracing::warn!(status = %e, "report failed; will report again"),
            }
        }
        self.reported.retain(|id, _| bound.contains_key(id));
        Ok(out)
    }
}

fn dhcp_spec(n: &pb::HostNetwork, port: &pb::Port) -> Spec {
    let mut addrs = Vec::new();
    let mut ranges = Vec::new();
    let mut opts = String::new();
    let dhcp_subnets: Vec<&pb::Subnet> = n.subnets.iter().filter(|s| s.enable_dhcp).collect();
    for (i, s) in dhcp_subnets.iter().enumerate() {
        let Some((net, p)) = prefix_len(&s.cidr) else {
            continue;
        };
        ranges.push((net, netmask(p)));
        if let Some(ip) = port.fixed_ips.iter().find(|f| f.subnet_id == s.id)
            && let Ok(ip) = ip.ip_address.parse()
        {
            addrs.push((ip, p));
        }
        if s.gateway_ip.is_empty() {
            opts.push_str(&format!("tag:s{i},option:router\n"));
        } else {
            opts.push_str(&format!("tag:s{i},option:router,{}\n", s.gateway_ip));
        }
        if !s.dns_nameservers.is_empty() {
            opts.push_str(&format!(
                "tag:s{i},option:dns-server,{}\n",
                s.dns_nameservers.join(",")
            ));
        }
        if !s.host_routes.is_empty() {
            let mut r: Vec<String> = s
                .host_routes
                .iter()
                .map(|h| format!("{},{}", h.destination, h.nexthop))
                .collect();
            if !s.gateway_ip.is_empty() {
                r.push(format!("0.0.0.0/0,{}", s.gateway_ip));
            }
            opts.push_str(&format!(
                "tag:s{i},option:classless-static-route,{}\n",
                r.join(",")
            ));
        }
        opts.push_str(&format!("tag:s{i},option:mtu,{}\n", n.mtu));
    }
    let mut hosts = String::new();
    let mut sorted = n.dhcp_hosts.clone();
    sorted.sort_by(|a, b| a.port_id.cmp(&b.port_id));
    for h in sorted {
        if h.port_id == port.id {
            continue;
        }
        for ip in &h.ip_addresses {
            hosts.push_str(&format!("{},{},{}\n", h.mac_address, ip, h.hostname));
        }
    }
    Spec {
        network_id: n.id.clone(),
        port_id: port.id.clone(),
        mac: port.mac_address.clone(),
        addrs,
        ranges,
        hosts,
        opts,
    }
}

fn flow_port(p: &pb::Port, ofport: u32, vlan: u16, state: &pb::HostState) -> FlowPort {
    let ips: Vec<Ipv4Addr> = p
        .fixed_ips
        .iter()
        .filter_map(|f| f.ip_address.parse().ok())
        .collect();
    let mut rules = Vec::new();
    for g in state
        .security_groups
        .iter()
        .filter(|g| p.security_group_ids.contains(&g.id))
    {
        for r in &g.rules {
            let remote = if !r.remote_group_id.is_empty() {
                let members = state
                    .members
                    .iter()
                    .find(|m| m.security_group_id == r.remote_group_id)
                    .map(|m| m.ip_addresses.iter().map(|ip| format!("{ip}/32")).collect())
                    .unwrap_or_default();
                Some(members)
            } else if !r.remote_ip_prefix.is_empty() {
                Some(vec![r.remote_ip_prefix.clone()])
            } else {
                None
            };
            let proto = match pb::Protocol::try_from(r.protocol) {
                Ok(pb::Protocol::Tcp) => Proto::Tcp,
                Ok(pb::Protocol::Udp) => Proto::Udp,
                Ok(pb::Protocol::Icmp) => Proto::Icmp,
                _ => Proto::Any,
            };
            rules.push(FlowRule {
                ingress: r.direction == pb::Direction::Ingress as i32,
                proto,
                ports: (r.port_range_min as u16, r.port_range_max as u16),
                remote,
                remote_group: (!r.remote_group_id.is_empty()).then(|| r.remote_group_id.clone()),
            });
        }
    }
    FlowPort {
        ofport,
        vlan,
        mac: p.mac_address.clone(),
        ips,
        trusted: !p.port_security_enabled,
        rules,
    }
}

/// Heartbeats every `heartbeat_secs` until `stop` changes.
pub async fn heartbeats(
    client: Client,
    config: Arc<Config>,
    started_at: String,
    mut stop: watch::Receiver<bool>,
) {
    let period = Duration::from_secs(config.heartbeat_secs.max(1));
    loop {
        let m = pb::HeartbeatRequest {
            version: env!("CARGO_PKG_VERSION").into(),
            bridge: config.bridge.clone(),
            started_at: started_at.clone(),
        };
        if let Err(e) = client.heartbeat(m).await {
            tracing::warn!(status = %e, "heartbeat failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Wakes `notify` whenever an OVSDB Interface row changes (a guest plugged
/// or unplugged), until `stop` changes; restarts the monitor if it dies.
pub async fn monitor_interfaces(notify: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    use tokio::io::AsyncBufReadExt;
    loop {
        let child = tokio::process::Command::new("ovsdb-client")
            .args([
                "monitor",
                "Open_vSwitch",
                "Interface",
                "name,ofport,external_ids",
                "--format=csv",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    let mut lines = tokio::io::BufReader::new(out).lines();
                    loop {
                        tokio::select! {
                            l = lines.next_line() => match l {
                                Ok(Some(_)) => notify.notify_one(),
                                _ => break,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                }
                let _ = child.kill().await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot monitor OVSDB"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhcp_files_hold_static_leases_and_options_but_not_the_server_itself() {
        let subnet = pb::Subnet {
            id: "s1".into(),
            cidr: "10.0.0.0/24".into(),
            gateway_ip: "10.0.0.1".into(),
            dns_nameservers: vec!["192.0.2.53".into()],
            enable_dhcp: true,
            ..Default::default()
        };
        let port = pb::Port {
            id: "dhcp-port".into(),
            mac_address: "fa:16:3e:00:00:02".into(),
            fixed_ips: vec![pb::FixedIp {
                subnet_id: "s1".into(),
                ip_address: "10.0.0.2".into(),
            }],
            ..Default::default()
        };
        let n = pb::HostNetwork {
            id: "n1".into(),
            mtu: 1450,
            dhcp: true,
            subnets: vec![subnet],
            dhcp_hosts: vec![
                pb::DhcpHost {
                    port_id: "guest".into(),
                    mac_address: "fa:16:3e:00:00:05".into(),
                    ip_addresses: vec!["10.0.0.5".into()],
                    hostname: "host-10-0-0-5".into(),
                },
                pb::DhcpHost {
                    port_id: "dhcp-port".into(),
                    mac_address: "fa:16:3e:00:00:02".into(),
                    ip_addresses: vec!["10.0.0.2".into()],
                    hostname: "host-10-0-0-2".into(),
                },
            ],
            ..Default::default()
        };
        let s = dhcp_spec(&n, &port);
        assert_eq!(s.hosts, "fa:16:3e:00:00:05,10.0.0.5,host-10-0-0-5\n");
        assert_eq!(
            s.opts,
            "tag:s0,option:router,10.0.0.1\ntag:s0,option:dns-server,192.0.2.53\ntag:s0,option:mtu,1450\n"
        );
        assert_eq!(s.addrs, vec![(Ipv4Addr::new(10, 0, 0, 2), 24)]);
        assert_eq!(
            s.ranges,
            vec![(Ipv4Addr::new(10, 0, 0, 0), Ipv4Addr::new(255, 255, 255, 0))]
        );
    }

    #[test]
    fn config_is_checked() {
        let ok = Config::default();
        assert!(ok.check().is_ok());
        let long = Config {
            bridge: "a-bridge-name-too-long".into(),
            ..Config::default()
        };
        assert_eq!(
            long.check().err().map(|e| e.to_string()).as_deref(),
            Some("invalid configuration: bridge must be 1 to 15 characters")
        );
        let host = Config {
            host: "bad host".into(),
            ..Config::default()
        };
        assert!(host.check().is_err());
    }
}
