//! The OpenFlow pipeline of the integration bridge, computed as text from
//! the desired state (pure; unit-tested here) and installed whole with
//! `ovs-ofctl replace-flows`, which changes only the flows that differ, so
//! that a restarted agent computing the same flows causes no blip.
//!
//! It follows the design of Neutron's OVS firewall, on conntrack:
//!
//! | table | does |
//! |---|---|
//! | 0 | classify by `in_port`: a guest port loads reg5 = its ofport and reg6 = its network's local VLAN (also the conntrack zone) and goes to 10; a trusted port (DHCP) goes to 20; anything else (unbound, unknown, dead-tagged) is dropped |
//! | 10 | egress anti-spoofing: guest DHCP servers dropped; DHCP client allowed (its MAC only); ARP only with its MAC and IPs; IPv4 only from its MAC and IPs, into conntrack; everything else dropped |
//! | 11 | egress rules: invalid dropped, established/related allowed, new connections allowed by the port's egress rules are committed; the rest dropped |
//! | 20 | forwarding: to a guest MAC of the same network on this host → reg7 = its ofport → 30; anything else (broadcast, DHCP port, other hosts) by `NORMAL` within the VLAN |
//! | 30 | ingress: ARP and DHCP replies delivered; IPv4 into conntrack; the rest dropped |
//! | 31 | ingress rules: as table 11, for the destination port's ingress rules, then `output:reg7` |

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The VLAN of interfaces this agent does not own or know: no traffic.
pub const DEAD_VLAN: u16 = 4095;

const ZONE: &str = "zone=NXM_NX_REG6[0..15]";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRule {
    pub ingress: bool,
    pub proto: Proto,
    /// (0, 0): every port.
    pub ports: (u16, u16),
    /// Remote addresses as CIDRs; `None`: anywhere. For a remote-group
    /// rule: the group's member addresses.
    pub remote: Option<Vec<String>>,
    /// The remote group's id, for a remote-group rule: its members become
    /// one conjunctive clause shared by every port with such a rule
    /// (`conjunction(id,k/2)`), so flows grow as members + ports.
    pub remote_group: Option<String>,
}

/// One wired port, as the pipeline needs it.
#[derive(Debug, Clone)]
pub struct FlowPort {
    pub ofport: u32,
    pub vlan: u16,
    pub mac: String,
    pub ips: Vec<Ipv4Addr>,
    /// No anti-spoofing or rules (the DHCP port).
    pub trusted: bool,
    pub rules: Vec<FlowRule>,
}

/// Splits an inclusive port range into `value/mask` matches.
pub fn port_masks(lo: u16, hi: u16) -> Vec<String> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest aligned block starting at lo that fits.
        let mut size = 1u32;
        while lo.is_multiple_of(size * 2) && lo + size * 2 - 1 <= hi && size < 65536 {
            size *= 2;
        }
        if size == 1 {
            out.push(format!("{lo}"));
        } else {
            let mask = 0xffff & !(size - 1);
            out.push(format!("0x{lo:04x}/0x{mask:04x}"));
        }
        lo += size;
    }
    out
}

/// The protocol and destination-port part of a rule's matches.
fn proto_matches(r: &FlowRule) -> Vec<String> {
    let proto = match r.proto {
        Proto::Any => "ip",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    if r.ports == (0, 0) || !matches!(r.proto, Proto::Tcp | Proto::Udp) {
        return vec![proto.to_string()];
    }
    port_masks(r.ports.0, r.ports.1)
        .into_iter()
        .map(|m| format!("{proto},tp_dst={m}"))
        .collect()
}

/// A conjunction id for each (direction, remote group): a stable hash of
/// the key (so the ids of other groups do not move when one comes or goes),
/// probed past collisions in key order, never 0.
fn conjunction_ids(keys: &BTreeSet<(bool, String)>) -> BTreeMap<(bool, String), u32> {
    let mut used = BTreeSet::new();
    let mut out = BTreeMap::new();
    for k in keys {
        // FNV-1a, 32 bits.
        let mut h: u32 = 0x811c_9dc5;
        for b in [u8::from(k.0)].iter().chain(k.1.as_bytes()) {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let mut id = (h & 0x7fff_ffff).max(1);
        while !used.insert(id) {
            id = (id % 0x7fff_ffff) + 1;
        }
        out.insert(k.clone(), id);
    }
    out
}

fn rule_matches(r: &FlowRule) -> Vec<String> {
    let proto = match r.proto {
        Proto::Any => "ip",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    let ports: Vec<String> = if r.ports == (0, 0) || !matches!(r.proto, Proto::Tcp | Proto::Udp) {
        vec![String::new()]
    } else {
        port_masks(r.ports.0, r.ports.1)
            .into_iter()
            .map(|m| format!(",tp_dst={m}"))
            .collect()
    };
    let field = if r.ingress { "nw_src" } else { "nw_dst" };
    let remotes: Vec<String> = match &r.remote {
        None => vec![String::new()],
        Some(list) => list
            .iter()
            .map(|c| {
                if c == "0.0.0.0/0" {
                    String::new()
                } else {
                    format!(",{field}={c}")
                }
            })
            .collect(),
    };
    let mut out = Vec::new();
    for rem in &remotes {
        for p in &ports {
            out.push(format!("{proto}{rem}{p}"));
        }
    }
    out
}

/// The whole flow table for these ports, one flow per line, in a stable order.
pub fn pipeline(ports: &[FlowPort]) -> String {
    let mut f = String::new();
    let mut sorted: Vec<&FlowPort> = ports.iter().collect();
    sorted.sort_by_key(|p| p.ofport);
    let mut line = |s: String| {
        f.push_str(&s);
        f.push('\n');
    };
    line("table=0,priority=0,actions=drop".into());
    line("table=10,priority=0,actions=drop".into());
    line("table=11,priority=0,actions=drop".into());
    line("table=11,priority=200,ct_state=+inv+trk,actions=drop".into());
    line("table=11,priority=190,ct_state=+est-rel-inv+trk,actions=resubmit(,20)".into());
    line("table=11,priority=190,ct_state=+rel-inv+trk,actions=resubmit(,20)".into());
    line("table=20,priority=0,actions=NORMAL".into());
    line("table=30,priority=0,actions=drop".into());
    line("table=31,priority=0,actions=drop".into());
    line("table=31,priority=200,ct_state=+inv+trk,actions=drop".into());
    // Remote-group rules as conjunctive matches (Neutron's OVS firewall):
    // clause 1/2 is the port side (its register, protocol and ports), one
    // flow per port and rule; clause 2/2 is the group's member addresses,
    // one flow per member, shared by every port; the `conj_id` flow allows.
    // Clauses sit at priority 95, below every plain rule (100), so no plain
    // flow shares their match and priority.
    let keys: BTreeSet<(bool, String)> = sorted
        .iter()
        .filter(|p| !p.trusted)
        .flat_map(|p| p.rules.iter())
        .filter_map(|r| r.remote_group.clone().map(|g| (r.ingress, g)))
        .collect();
    let ids = conjunction_ids(&keys);
    // Clause match → its conjunction actions (one flow per distinct match).
    let mut clauses: BTreeMap<String, BTreeSet<(u32, u8)>> = BTreeMap::new();
    let mut members_done: BTreeSet<u32> = BTreeSet::new();
    for p in sorted.iter().filter(|p| !p.trusted) {
        for r in &p.rules {
            let Some(g) = &r.remote_group else { continue };
            let id = ids[&(r.ingress, g.clone())];
            let (table, reg, field) = if r.ingress {
                (31, "reg7", "nw_src")
            } else {
                (11, "reg5", "nw_dst")
            };
            for mat in proto_matches(r) {
                clauses
                    .entry(format!(
                        "table={table},priority=95,{reg}={},ct_state=+new-est+trk,{mat}",
                        p.ofport
                    ))
                    .or_default()
                    .insert((id, 1));
            }
            if members_done.insert(id) {
                for m in r.remote.iter().flatten() {
                    clauses
                        .entry(format!(
                            "table={table},priority=95,ct_state=+new-est+trk,ip,{field}={m}"
                        ))
                        .or_default()
                        .insert((id, 2));
                }
            }
        }
    }
    for ((ingress, _), id) in &ids {
        if *ingress {
            line(format!(
                "table=31,priority=100,conj_id={id},ct_state=+new-est+trk,ip,actions=ct(commit,{ZONE}),output:NXM_NX_REG7[0..15]"
            ));
        } else {
            line(format!(
                "table=11,priority=100,conj_id={id},ct_state=+new-est+trk,ip,actions=ct(commit,{ZONE}),resubmit(,20)"
            ));
        }
    }
    for (mat, acts) in &clauses {
        let acts: Vec<String> = acts
            .iter()
            .map(|(id, k)| format!("conjunction({id},{k}/2)"))
            .collect();
        line(format!("{mat},actions={}", acts.join(",")));
    }
    // The same flow text twice would be refused; keep each once.
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    let mut once = |s: String, line: &mut dyn FnMut(String)| {
        if seen.insert(s.clone(), ()).is_none() {
            line(s);
        }
    };
    for p in sorted {
        let (o, v, m) = (p.ofport, p.vlan, &p.mac);
        if p.trusted {
            once(
                format!(
                    "table=0,priority=100,in_port={o},actions=load:{v}->NXM_NX_REG6[],resubmit(,20)"
                ),
                &mut line,
            );
            continue;
        }
        once(
            format!(
                "table=0,priority=100,in_port={o},actions=load:{o}->NXM_NX_REG5[],load:{v}->NXM_NX_REG6[],resubmit(,10)"
            ),
            &mut line,
        );
        // Egress anti-spoofing.
        once(
            format!("table=10,priority=120,reg5={o},udp,tp_src=67,actions=drop"),
            &mut line,
        );
        once(
            format!(
                "table=10,priority=110,reg5={o},udp,dl_src={m},tp_src=68,tp_dst=67,actions=NORMAL"
            ),
            &mut line,
        );
        for ip in &p.ips {
            once(
                format!(
                    "table=10,priority=100,reg5={o},arp,dl_src={m},arp_sha={m},arp_spa={ip},actions=NORMAL"
                ),
                &mut line,
            );
            once(
                format!(
                    "table=10,priority=100,reg5={o},ip,dl_src={m},nw_src={ip},actions=ct(table=11,{ZONE})"
                ),
                &mut line,
            );
        }
        // Forwarding to this port, and its ingress.
        once(
            format!(
                "table=20,priority=100,reg6={v},dl_dst={m},actions=load:{o}->NXM_NX_REG7[],resubmit(,30)"
            ),
            &mut line,
        );
        once(
            format!("table=30,priority=100,reg7={o},arp,actions=output:{o}"),
            &mut line,
        );
        once(
            format!("table=30,priority=100,reg7={o},udp,tp_src=67,tp_dst=68,actions=output:{o}"),
            &mut line,
        );
        once(
            format!("table=30,priority=90,reg7={o},ip,actions=ct(table=31,{ZONE})"),
            &mut line,
        );
        once(
            format!("table=31,priority=190,reg7={o},ct_state=+est-rel-inv+trk,actions=output:{o}"),
            &mut line,
        );
        once(
            format!("table=31,priority=190,reg7={o},ct_state=+rel-inv+trk,actions=output:{o}"),
            &mut line,
        );
        for r in p.rules.iter().filter(|r| r.remote_group.is_none()) {
            for mat in rule_matches(r) {
                if r.ingress {
                    once(
                        format!(
                            "table=31,priority=100,reg7={o},ct_state=+new-est+trk,{mat},actions=ct(commit,{ZONE}),output:{o}"
                        ),
                        &mut line,
                    );
                } else {
                    once(
                        format!(
                            "table=11,priority=100,reg5={o},ct_state=+new-est+trk,{mat},actions=ct(commit,{ZONE}),resubmit(,20)"
                        ),
                        &mut line,
                    );
                }
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_masks() {
        assert_eq!(port_masks(22, 22), vec!["22"]);
        assert_eq!(port_masks(8080, 8081), vec!["0x1f90/0xfffe"]);
        assert_eq!(port_masks(1, 3), vec!["1", "0x0002/0xfffe"]);
        assert_eq!(port_masks(1, 65535).len(), 16);
    }

    fn guest() -> FlowPort {
        FlowPort {
            ofport: 7,
            vlan: 3,
            mac: "fa:16:3e:00:00:01".into(),
            ips: vec![Ipv4Addr::new(10, 0, 0, 5)],
            trusted: false,
            rules: vec![
                FlowRule {
                    ingress: true,
                    proto: Proto::Tcp,
                    ports: (22, 22),
                    remote: None,
                    remote_group: None,
                },
                FlowRule {
                    ingress: false,
                    proto: Proto::Any,
                    ports: (0, 0),
                    remote: Some(vec!["0.0.0.0/0".into()]),
                    remote_group: None,
                },
            ],
        }
    }

    #[test]
    fn a_guest_gets_anti_spoofing_and_its_rules() {
        let f = pipeline(&[guest()]);
        assert!(f.contains("table=10,priority=100,reg5=7,ip,dl_src=fa:16:3e:00:00:01,nw_src=10.0.0.5,actions=ct(table=11,zone=NXM_NX_REG6[0..15])"), "{f}");
        assert!(f.contains("table=31,priority=100,reg7=7,ct_state=+new-est+trk,tcp,tp_dst=22,actions=ct(commit,zone=NXM_NX_REG6[0..15]),output:7"), "{f}");
        assert!(f.contains("table=11,priority=100,reg5=7,ct_state=+new-est+trk,ip,actions=ct(commit,zone=NXM_NX_REG6[0..15]),resubmit(,20)"), "{f}");
        assert!(f.contains("table=10,priority=120,reg5=7,udp,tp_src=67,actions=drop"));
        // Stable: the same input gives the same text (no blip on restart).
        assert_eq!(f, pipeline(&[guest()]));
    }

    fn member(ofport: u32, group_ips: &[Ipv4Addr]) -> FlowPort {
        FlowPort {
            ofport,
            vlan: 3,
            mac: format!("fa:16:3e:00:01:{:02x}", ofport % 256),
            ips: vec![Ipv4Addr::new(10, 0, 1, ofport as u8)],
            trusted: false,
            rules: vec![FlowRule {
                ingress: true,
                proto: Proto::Any,
                ports: (0, 0),
                remote: Some(group_ips.iter().map(|ip| format!("{ip}/32")).collect()),
                remote_group: Some("g-default".into()),
            }],
        }
    }

    #[test]
    fn a_remote_group_is_one_conjunction_growing_as_members_plus_ports() {
        let count = |ports: u32, members: u32| {
            let ips: Vec<Ipv4Addr> = (0..members)
                .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
                .collect();
            let all: Vec<FlowPort> = (1..=ports).map(|o| member(o, &ips)).collect();
            let f = pipeline(&all);
            f.lines().filter(|l| l.contains("conj")).count()
        };
        // One clause per port, one per member, one conj_id flow.
        assert_eq!(count(10, 100), 10 + 100 + 1);
        assert_eq!(count(100, 1000), 100 + 1000 + 1);
        let ips = [Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 0, 1, 2)];
        let f = pipeline(&[member(1, &ips), member(2, &ips)]);
        let id = conjunction_ids(&[(true, "g-default".to_string())].into_iter().collect())
            [&(true, "g-default".to_string())];
        assert!(
            f.contains(&format!(
                "table=31,priority=95,reg7=1,ct_state=+new-est+trk,ip,actions=conjunction({id},1/2)"
            )),
            "{f}"
        );
        assert!(f.contains(&format!("table=31,priority=95,ct_state=+new-est+trk,ip,nw_src=10.0.1.2/32,actions=conjunction({id},2/2)")), "{f}");
        assert!(f.contains(&format!("table=31,priority=100,conj_id={id},ct_state=+new-est+trk,ip,actions=ct(commit,zone=NXM_NX_REG6[0..15]),output:NXM_NX_REG7[0..15]")), "{f}");
        assert_eq!(f, pipeline(&[member(1, &ips), member(2, &ips)]));
    }

    #[test]
    fn two_groups_sharing_a_member_share_its_clause_flow() {
        let mut a = member(1, &[Ipv4Addr::new(10, 0, 1, 9)]);
        let mut other = a.rules[0].clone();
        other.remote_group = Some("g-other".into());
        a.rules.push(other);
        let f = pipeline(&[a]);
        let member_flows: Vec<&str> = f
            .lines()
            .filter(|l| l.contains("nw_src=10.0.1.9/32"))
            .collect();
        assert_eq!(member_flows.len(), 1, "{f}");
        assert_eq!(member_flows[0].matches("conjunction(").count(), 2, "{f}");
        let ids: BTreeSet<&str> = f.lines().filter(|l| l.contains("conj_id=")).collect();
        assert_eq!(ids.len(), 2, "{f}");
    }
}
