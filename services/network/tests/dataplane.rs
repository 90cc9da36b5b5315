//! The dataplane end to end: a real `network`, a real `network-agent` on a
//! real Open vSwitch bridge (netdev datapath), real dnsmasq in namespaces,
//! and stand-in guests (namespaces on veths) that take DHCP and ping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use proto::network::v1 as pb;
use runtime::testing::{member_a, req};

#[tokio::test]
async fn guests_get_their_ips_by_dhcp_ping_each_other_and_another_network_cannot_reach_them() {
    let cloud = Cloud::start(1).await;
    let host = Host::start(&cloud.url()).await;
    cloud.wait_agent(host.host()).await;
    let a = member_a();
    let net_a = cloud.network(&a, "net-a").await;
    let net_b = cloud.network(&a, "net-b").await;
    // Overlapping CIDRs across networks are allowed.
    cloud.subnet(&a, &net_a.id, "10.10.0.0/24").await;
    cloud.subnet(&a, &net_b.id, "10.10.0.0/24").await;
    let a1 = cloud.port(&a, &net_a.id, Some("10.10.0.11"), &[]).await;
    let a2 = cloud.port(&a, &net_a.id, Some("10.10.0.12"), &[]).await;
    let b1 = cloud.port(&a, &net_b.id, Some("10.10.0.13"), &[]).await;
    let g1 = host.plug(1, &a1);
    let g2 = host.plug(2, &a2);
    let g3 = host.plug(3, &b1);
    for p in [&a1, &a2, &b1] {
        let bound = cloud.bind(&a, &p.id, host.host()).await.unwrap();
        let b = bound.binding.unwrap();
        assert_eq!(b.vif_type, pb::VifType::Ovs as i32);
        assert_eq!(b.interface_id, p.id);
        assert_eq!(b.bridge, host.config.bridge);
    }
    for p in [&a1, &a2, &b1] {
        cloud.wait_status(&a, &p.id, "ACTIVE").await;
    }
    for (g, ip) in [
        (&g1, "10.10.0.11"),
        (&g2, "10.10.0.12"),
        (&g3, "10.10.0.13"),
    ] {
        let lease = g.dhcp().await.unwrap();
        let fields: Vec<&str> = lease.split_whitespace().collect();
        assert_eq!(fields[0], ip, "lease {lease}");
        assert_eq!(fields[1], "24", "lease {lease}");
        assert_eq!(fields[2], "10.10.0.1", "router; lease {lease}");
        assert_eq!(fields[3], "1450", "mtu; lease {lease}");
        assert_eq!(fields[4], "192.0.2.53", "dns; lease {lease}");
    }
    assert!(g1.ping_within("10.10.0.12", 5).await, "a1 → a2");
    assert!(g2.ping_within("10.10.0.11", 5).await, "a2 → a1");
    assert!(
        !g3.ping_within("10.10.0.11", 3).await,
        "b1 reached a1 across networks"
    );
    assert!(
        !g3.ping_within("10.10.0.12", 2).await,
        "b1 reached a2 across networks"
    );

    // The DHCP port is a real port of each network, owned by network:dhcp.
    let ports = cloud
        .client()
        .list_ports(req(
            pb::ListPortsRequest {
                network_id: net_a.id.clone(),
                ..Default::default()
            },
            &a,
        ))
        .await
        .unwrap()
        .into_inner()
        .ports;
    let dhcp: Vec<_> = ports
        .iter()
        .filter(|p| p.device_owner == "network:dhcp")
        .collect();
    assert_eq!(dhcp.len(), 1, "{ports:?}");
    assert_eq!(dhcp[0].status, "ACTIVE");
}
