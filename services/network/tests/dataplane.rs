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
        let bound = cloud
            .bind(&via(&a, host.host()), &p.id, host.host())
            .await
            .unwrap();
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
        cloud
            .bind(&via(&a, host.host()), &p.id, host.host())
            .await
            .unwrap();
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

#[tokio::test]
async fn agent_restart_keeps_a_ping_flowing_and_picks_up_a_port_made_while_it_was_down() {
    let cloud = Cloud::start(1).await;
    let mut host = Host::start(&cloud.url()).await;
    cloud.wait_agent(host.host()).await;
    let a = member_a();
    let net = cloud.network(&a, "restart").await;
    cloud.subnet(&a, &net.id, "10.70.0.0/24").await;
    let p1 = cloud.port(&a, &net.id, Some("10.70.0.11"), &[]).await;
    let p2 = cloud.port(&a, &net.id, Some("10.70.0.12"), &[]).await;
    let g1 = host.plug(1, &p1);
    let g2 = host.plug(2, &p2);
    for p in [&p1, &p2] {
        cloud
            .bind(&via(&a, host.host()), &p.id, host.host())
            .await
            .unwrap();
    }
    for p in [&p1, &p2] {
        cloud.wait_status(&a, &p.id, "ACTIVE").await;
    }
    g1.dhcp().await.unwrap();
    g2.dhcp().await.unwrap();
    assert!(g1.ping_within("10.70.0.12", 5).await);
    let dnsmasq =
        std::fs::read_to_string(host.config.state_dir.join("dhcp").join(&net.id).join("pid"))
            .unwrap();

    // 60 pings, 100 ms apart, across the agent's stop and start.
    let ns = g1.ns.clone();
    let pinger = tokio::spawn(async move {
        tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "busybox",
                "ping",
                "-c",
                "60",
                "-i",
                "0.1",
                "-W",
                "1",
                "10.70.0.12",
            ])
            .kill_on_drop(true)
            .output()
            .await
            .unwrap()
    });
    host.stop_agent().await;
    // While the agent is away: a new port, plugged and bound (its last heartbeat is recent).
    let p3 = cloud.port(&a, &net.id, Some("10.70.0.13"), &[]).await;
    let g3 = host.plug(3, &p3);
    cloud
        .bind(&via(&a, host.host()), &p3.id, host.host())
        .await
        .unwrap();
    host.run();
    cloud.wait_status(&a, &p3.id, "ACTIVE").await;
    assert_eq!(
        g3.dhcp().await.unwrap().split_whitespace().next(),
        Some("10.70.0.13")
    );
    assert!(
        g3.ping_within("10.70.0.11", 5).await,
        "the new port cannot reach an old one"
    );
    let out = pinger.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("60 packets transmitted, 60 packets received"),
        "the ping blipped across the restart:\n{text}"
    );
    // dnsmasq was kept (same process), not restarted.
    let after =
        std::fs::read_to_string(host.config.state_dir.join("dhcp").join(&net.id).join("pid"))
            .unwrap();
    assert_eq!(dnsmasq, after);
}

#[tokio::test]
async fn a_crashed_agent_leaves_nothing_orphaned_once_back_and_unknown_interfaces_are_dead() {
    let cloud = Cloud::start(1).await;
    let mut host = Host::start(&cloud.url()).await;
    cloud.wait_agent(host.host()).await;
    let a = member_a();
    let net = cloud.network(&a, "crash").await;
    cloud.subnet(&a, &net.id, "10.80.0.0/24").await;
    let p = cloud.port(&a, &net.id, None, &[]).await;
    let _g = host.plug(1, &p);
    cloud
        .bind(&via(&a, host.host()), &p.id, host.host())
        .await
        .unwrap();
    cloud.wait_status(&a, &p.id, "ACTIVE").await;
    let dhcp_ns = format!("{}dhcp-{}", host.config.namespace_prefix, net.id);
    assert!(sh(&["ip", "netns", "list"]).contains(&dhcp_ns));

    // The agent dies; meanwhile the port and the network go away, and an
    // interface nobody knows is plugged into the bridge.
    host.kill_agent();
    let mut c = cloud.client();
    c.delete_port(req(pb::DeleteRequest { id: p.id.clone() }, &a))
        .await
        .unwrap();
    c.delete_network(req(pb::DeleteRequest { id: net.id.clone() }, &a))
        .await
        .unwrap();
    let stranger = pb::Port {
        id: uuid::Uuid::new_v4().to_string(),
        mac_address: "fa:16:3e:12:34:56".into(),
        ..Default::default()
    };
    let gs = host.plug(2, &stranger);

    host.run();
    let bridge = host.config.bridge.clone();
    let state = host.config.state_dir.clone();
    let gs_if = gs.host_if.clone();
    runtime::testing::wait_for("no orphans", std::time::Duration::from_secs(30), || {
        let dhcp_ns = dhcp_ns.clone();
        let bridge = bridge.clone();
        let state = state.clone();
        let gs_if = gs_if.clone();
        async move {
            let nss = sh(&["ip", "netns", "list"]);
            let ports = sh(&["ovs-vsctl", "list-ports", &bridge]);
            let tag = sh(&["ovs-vsctl", "get", "Port", &gs_if, "tag"]);
            let dirs = std::fs::read_dir(state.join("dhcp")).map(|d| d.count()).unwrap_or(0);
            let dnsmasq = sh(&["ps", "-eo", "args"]).lines().filter(|l| l.contains(&state.display().to_string())).count();
            let clean = !nss.contains(&dhcp_ns) && ports.lines().all(|l| !l.starts_with("dh")) && tag.trim() == "4095" && dirs == 0 && dnsmasq == 0;
            if clean {
                Ok(())
            } else {
                Err(format!("namespaces {nss:?} ports {ports:?} stranger tag {tag:?} dirs {dirs} dnsmasq {dnsmasq}"))
            }
        }
    })
    .await;
    // The unknown interface is dead: nothing from it leaves (table 0 drops it).
    assert!(!gs.ping_within("10.80.0.1", 1).await);
}

#[tokio::test]
async fn the_dhcp_port_gets_an_address_on_a_subnet_added_later_and_serves_it() {
    let cloud = Cloud::start(1).await;
    let host = Host::start(&cloud.url()).await;
    cloud.wait_agent(host.host()).await;
    let a = member_a();
    let net = cloud.network(&a, "later").await;
    let first = cloud.subnet(&a, &net.id, "10.80.0.0/24").await;
    let p1 = cloud.port(&a, &net.id, Some("10.80.0.11"), &[]).await;
    let g1 = host.plug(1, &p1);
    cloud
        .bind(&via(&a, host.host()), &p1.id, host.host())
        .await
        .unwrap();
    cloud.wait_status(&a, &p1.id, "ACTIVE").await;
    let dhcp_ips = |cloud: &Cloud| {
        let mut c = cloud.client();
        let net = net.id.clone();
        async move {
            let ports = c
                .list_ports(req(
                    pb::ListPortsRequest {
                        network_id: net,
                        all_projects: true,
                        ..Default::default()
                    },
                    &runtime::testing::admin(),
                ))
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .ports;
            let d: Vec<pb::Port> = ports
                .into_iter()
                .filter(|p| p.device_owner == "network:dhcp")
                .collect();
            Ok::<_, String>(d)
        }
    };
    let before = dhcp_ips(&cloud).await.unwrap();
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].fixed_ips.len(), 1, "{before:?}");
    assert_eq!(before[0].fixed_ips[0].subnet_id, first.id);

    // A second DHCP subnet: the same DHCP port gets an address on it, and a
    // guest with an address only there gets its lease.
    let second = cloud.subnet(&a, &net.id, "10.81.0.0/24").await;
    runtime::testing::wait_for(
        "the DHCP port has an address on the new subnet",
        std::time::Duration::from_secs(30),
        || {
            let f = dhcp_ips(&cloud);
            let sid = second.id.clone();
            let id = before[0].id.clone();
            async move {
                let d = f.await?;
                match d.as_slice() {
                    [p] if p.id == id && p.fixed_ips.iter().any(|f| f.subnet_id == sid) => Ok(()),
                    _ => Err(format!("{d:?}")),
                }
            }
        },
    )
    .await;
    let p2 = cloud
        .client()
        .create_port(req(
            pb::CreatePortRequest {
                network_id: net.id.clone(),
                fixed_ips: vec![pb::FixedIpRequest {
                    subnet_id: second.id.clone(),
                    ip_address: String::new(),
                }],
                device_id: format!("vm-{}", uniq()),
                ..Default::default()
            },
            &a,
        ))
        .await
        .unwrap()
        .into_inner();
    let g2 = host.plug(2, &p2);
    cloud
        .bind(&via(&a, host.host()), &p2.id, host.host())
        .await
        .unwrap();
    cloud.wait_status(&a, &p2.id, "ACTIVE").await;
    let lease = match g2.dhcp().await {
        Ok(l) => l,
        Err(e) => {
            let dir = host.config.state_dir.join("dhcp").join(&net.id);
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            let hosts = std::fs::read_to_string(dir.join("hosts")).unwrap_or_default();
            let ns = format!("{}dhcp-{}", host.config.namespace_prefix, net.id);
            panic!(
                "{e}\nlog:\n{log}\nhosts:\n{hosts}\naddr:\n{}\novs:\n{}\nps:\n{}",
                sh(&["ip", "-n", &ns, "addr"]),
                sh(&[
                    "ovs-vsctl",
                    "--columns=name,ofport,external_ids",
                    "list",
                    "Interface"
                ]) + &sh(&[
                    "ovs-ofctl",
                    "-O",
                    "OpenFlow13",
                    "dump-flows",
                    &host.config.bridge,
                    "table=0"
                ]),
                sh(&["ip", "netns", "pids", &ns])
            );
        }
    };
    let fields: Vec<&str> = lease.split_whitespace().collect();
    assert_eq!(fields[0], p2.fixed_ips[0].ip_address, "lease {lease}");
    assert!(fields[0].starts_with("10.81.0."), "lease {lease}");
    assert_eq!(fields[2], "10.81.0.1", "router; lease {lease}");
    // The first subnet is still served.
    assert_eq!(
        g1.dhcp().await.unwrap().split_whitespace().next(),
        Some("10.80.0.11")
    );
}
