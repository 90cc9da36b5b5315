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

#[tokio::test]
async fn security_groups_are_enforced_statefully_and_follow_membership() {
    use pb::{Direction::*, Protocol::*};
    let cloud = Cloud::start(1).await;
    let host = Host::start(&cloud.url()).await;
    cloud.wait_agent(host.host()).await;
    let a = member_a();
    let net = cloud.network(&a, "sg-net").await;
    cloud.subnet(&a, &net.id, "10.20.0.0/24").await;
    // `web`: all egress, nothing in (yet). `client` and `trusted`: all egress.
    let web = cloud.group(&a, "web").await;
    let client = cloud.group(&a, "client").await;
    let trusted = cloud.group(&a, "trusted").await;
    for g in [&web, &client, &trusted] {
        cloud
            .rule(&a, &g.id, Egress, Any, (0, 0), "")
            .await
            .unwrap();
    }
    let server = cloud
        .port(&a, &net.id, Some("10.20.0.10"), &[&web.id])
        .await;
    let c1 = cloud
        .port(&a, &net.id, Some("10.20.0.11"), &[&client.id])
        .await;
    let c2 = cloud
        .port(&a, &net.id, Some("10.20.0.12"), &[&client.id])
        .await;
    let gs = host.plug(1, &server);
    let g1 = host.plug(2, &c1);
    let g2 = host.plug(3, &c2);
    for p in [&server, &c1, &c2] {
        cloud.bind(&a, &p.id, host.host()).await.unwrap();
    }
    for p in [&server, &c1, &c2] {
        cloud.wait_status(&a, &p.id, "ACTIVE").await;
    }
    for g in [&gs, &g1, &g2] {
        g.dhcp().await.unwrap();
    }
    gs.listen(8080);
    gs.listen(8081);
    gs.listen(9090);

    // ICMP refused until a rule allows it; the reply is allowed by state.
    assert!(
        !g1.ping_within("10.20.0.10", 2).await,
        "icmp passed with no ingress rule"
    );
    cloud
        .rule(&a, &web.id, Ingress, Icmp, (0, 0), "")
        .await
        .unwrap();
    assert!(
        eventually(20, || g1.ping("10.20.0.10"), true).await,
        "icmp refused after the rule"
    );
    // The server's egress is allowed, but c1 has no ingress rule: c1 is not reachable.
    assert!(
        !gs.ping_within("10.20.0.11", 2).await,
        "c1 reachable without an ingress rule"
    );

    // One TCP port allowed, its neighbour refused.
    assert!(
        !g1.connect("10.20.0.10", 8080).await,
        "8080 open before its rule"
    );
    cloud
        .rule(&a, &web.id, Ingress, Tcp, (8080, 8080), "")
        .await
        .unwrap();
    assert!(
        eventually(20, || g1.connect("10.20.0.10", 8080), true).await,
        "8080 refused after its rule"
    );
    assert!(
        !g1.connect("10.20.0.10", 8081).await,
        "8081 open without a rule"
    );

    // A remote-group rule follows membership: c2 reaches 9090 only once it joins `trusted`.
    cloud
        .rule(&a, &web.id, Ingress, Tcp, (9090, 9090), &trusted.id)
        .await
        .unwrap();
    assert!(
        !g2.connect("10.20.0.10", 9090).await,
        "9090 open to a non-member"
    );
    cloud
        .client()
        .update_port(req(
            pb::UpdatePortRequest {
                id: c2.id.clone(),
                security_groups: Some(pb::SecurityGroupList {
                    ids: vec![client.id.clone(), trusted.id.clone()],
                }),
                ..Default::default()
            },
            &a,
        ))
        .await
        .unwrap();
    assert!(
        eventually(20, || g2.connect("10.20.0.10", 9090), true).await,
        "9090 refused to a member"
    );
    assert!(
        !g1.connect("10.20.0.10", 9090).await,
        "9090 open to c1, not a member"
    );

    // Forged source IP and forged MAC are dropped; the real ones still pass.
    g1.sh(&["ip", "addr", "add", "10.20.0.99/24", "dev", "eth0"]);
    assert!(
        !g1.run(&[
            "busybox",
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "10.20.0.99",
            "10.20.0.10"
        ])
        .await,
        "forged IP passed"
    );
    assert!(g1.ping_within("10.20.0.10", 3).await, "real IP refused");
    g2.sh(&["ip", "link", "set", "eth0", "address", "fa:16:3e:de:ad:01"]);
    assert!(!g2.ping_within("10.20.0.10", 3).await, "forged MAC passed");
}
