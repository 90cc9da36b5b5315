//! The API against a real `network` and Postgres: IPAM under concurrency
//! across replicas, bad input (exact codes and messages, nothing written),
//! authorization, binding to hosts without a live agent, quotas, events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use proto::network::v1 as pb;
use proto::network::v1::agents_client::AgentsClient;
use runtime::testing::{admin, assert_status, member_a, member_b, nobody, reader_a, req, workload};
use tonic::Code;

fn subnet_req(network: &str, cidr: &str) -> pb::CreateSubnetRequest {
    pb::CreateSubnetRequest {
        network_id: network.into(),
        cidr: cidr.into(),
        ..Default::default()
    }
}

fn port_req(network: &str) -> pb::CreatePortRequest {
    pb::CreatePortRequest {
        network_id: network.into(),
        ..Default::default()
    }
}

async fn count_ports(cloud: &Cloud, network: &str) -> usize {
    cloud
        .client()
        .list_ports(req(
            pb::ListPortsRequest {
                network_id: network.into(),
                all_projects: true,
                ..Default::default()
            },
            &admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .ports
        .len()
}

#[tokio::test]
async fn two_hundred_concurrent_creates_through_two_replicas_never_share_an_ip() {
    let cloud = Cloud::start(2).await;
    let a = member_a();
    let net = cloud.network(&a, "ipam").await;
    cloud.subnet(&a, &net.id, "10.30.0.0/24").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = cloud.client_of(i % 2);
        let a = a.clone();
        let net = net.id.clone();
        tasks.push(tokio::spawn(async move {
            c.create_port(req(port_req(&net), &a))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut ips = HashSet::new();
    let mut macs = HashSet::new();
    for t in tasks {
        let p = t.await.unwrap().unwrap();
        assert_eq!(p.fixed_ips.len(), 1);
        assert!(
            ips.insert(p.fixed_ips[0].ip_address.clone()),
            "IP twice: {}",
            p.fixed_ips[0].ip_address
        );
        assert!(macs.insert(p.mac_address.clone()));
    }
    assert_eq!(ips.len(), 200);
    assert!(!ips.contains("10.30.0.1"), "the gateway was handed out");
    // The /24 has 253 pool addresses: 53 more fit, then the subnet is exhausted.
    for _ in 0..53 {
        cloud
            .client()
            .create_port(req(port_req(&net.id), &a))
            .await
            .unwrap();
    }
    let full = cloud.client().create_port(req(port_req(&net.id), &a)).await;
    let subnet = cloud
        .client()
        .get_network(req(pb::GetRequest { id: net.id.clone() }, &a))
        .await
        .unwrap()
        .into_inner()
        .subnet_ids[0]
        .clone();
    assert_status(
        full,
        Code::ResourceExhausted,
        &format!("subnet {subnet} has no free address"),
    );
    assert_eq!(count_ports(&cloud, &net.id).await, 253);
}

#[tokio::test]
async fn bad_input_gets_exact_codes_and_writes_nothing() {
    let cloud = Cloud::start(1).await;
    let a = member_a();
    let net = cloud.network(&a, "bad").await;
    let mut c = cloud.client();
    let cases: Vec<(pb::CreateSubnetRequest, Code, String)> = vec![
        (
            subnet_req(&net.id, "10.0.0.0/33"),
            Code::InvalidArgument,
            "cidr: is not an IPv4 CIDR: \"10.0.0.0/33\"".into(),
        ),
        (
            subnet_req(&net.id, "banana"),
            Code::InvalidArgument,
            "cidr: is not an IPv4 CIDR: \"banana\"".into(),
        ),
        (
            subnet_req(&net.id, "10.0.0.5/24"),
            Code::InvalidArgument,
            "cidr: 10.0.0.5/24 has host bits set (did you mean 10.0.0.0/24?)".into(),
        ),
        (
            pb::CreateSubnetRequest {
                gateway_ip: Some("10.9.9.9".into()),
                ..subnet_req(&net.id, "10.0.0.0/24")
            },
            Code::InvalidArgument,
            "gateway_ip: 10.9.9.9 is not a host address of 10.0.0.0/24".into(),
        ),
        (
            pb::CreateSubnetRequest {
                allocation_pools: vec![pb::AllocationPool {
                    start: "10.0.0.10".into(),
                    end: "10.0.1.10".into(),
                }],
                ..subnet_req(&net.id, "10.0.0.0/24")
            },
            Code::InvalidArgument,
            "allocation_pools: 10.0.0.10-10.0.1.10 is not inside the host addresses of 10.0.0.0/24"
                .into(),
        ),
        (
            pb::CreateSubnetRequest {
                allocation_pools: vec![
                    pb::AllocationPool {
                        start: "10.0.0.10".into(),
                        end: "10.0.0.20".into(),
                    },
                    pb::AllocationPool {
                        start: "10.0.0.15".into(),
                        end: "10.0.0.30".into(),
                    },
                ],
                ..subnet_req(&net.id, "10.0.0.0/24")
            },
            Code::InvalidArgument,
            "allocation_pools: 10.0.0.15-10.0.0.30 overlaps 10.0.0.10-10.0.0.20".into(),
        ),
        (
            subnet_req("", "10.0.0.0/24"),
            Code::InvalidArgument,
            "network_id: is required".into(),
        ),
        (
            subnet_req("0a0a0a0a-0000-4000-8000-000000000000", "10.0.0.0/24"),
            Code::NotFound,
            "network 0a0a0a0a-0000-4000-8000-000000000000 not found".into(),
        ),
    ];
    for (m, code, msg) in cases {
        assert_status(c.create_subnet(req(m, &a)).await, code, &msg);
    }
    let n = c
        .get_network(req(pb::GetRequest { id: net.id.clone() }, &a))
        .await
        .unwrap()
        .into_inner();
    assert!(
        n.subnet_ids.is_empty(),
        "a refused subnet was written: {n:?}"
    );

    // Overlap within one network is refused; across networks it is fine.
    let s = cloud.subnet(&a, &net.id, "10.0.0.0/24").await;
    assert_status(
        c.create_subnet(req(subnet_req(&net.id, "10.0.0.128/25"), &a))
            .await,
        Code::InvalidArgument,
        "cidr: 10.0.0.128/25 overlaps 10.0.0.0/24, a subnet of the same network",
    );

    // Ports: a requested IP outside the subnet, taken, a MAC in use, an unknown group.
    let fixed = |ip: &str| {
        vec![pb::FixedIpRequest {
            subnet_id: s.id.clone(),
            ip_address: ip.into(),
        }]
    };
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                fixed_ips: fixed("10.1.0.5"),
                ..port_req(&net.id)
            },
            &a,
        ))
        .await,
        Code::InvalidArgument,
        &format!(
            "fixed_ips: 10.1.0.5 is outside subnet {} (10.0.0.0/24)",
            s.id
        ),
    );
    let p = c
        .create_port(req(
            pb::CreatePortRequest {
                fixed_ips: fixed("10.0.0.5"),
                mac_address: "fa:16:3e:00:00:05".into(),
                ..port_req(&net.id)
            },
            &a,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.fixed_ips[0].ip_address, "10.0.0.5");
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                fixed_ips: fixed("10.0.0.5"),
                ..port_req(&net.id)
            },
            &a,
        ))
        .await,
        Code::AlreadyExists,
        "ip address 10.0.0.5 already exists",
    );
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                mac_address: "FA:16:3E:00:00:05".into(),
                ..port_req(&net.id)
            },
            &a,
        ))
        .await,
        Code::AlreadyExists,
        "mac address fa:16:3e:00:00:05 already exists",
    );
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                mac_address: "01:00:5e:00:00:01".into(),
                ..port_req(&net.id)
            },
            &a,
        ))
        .await,
        Code::InvalidArgument,
        "mac_address: must be a unicast MAC address",
    );
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                security_groups: vec!["nope".into()],
                ..port_req(&net.id)
            },
            &a,
        ))
        .await,
        Code::NotFound,
        "security group nope not found",
    );
    assert_eq!(
        count_ports(&cloud, &net.id).await,
        1,
        "a refused port was written"
    );

    // Rules: a port range for icmp, a reversed range, both remotes.
    let g = cloud.group(&a, "g").await;
    let rule = |protocol: pb::Protocol, min: u32, max: u32| pb::CreateSecurityGroupRuleRequest {
        security_group_id: g.id.clone(),
        direction: pb::Direction::Ingress as i32,
        protocol: protocol as i32,
        port_range_min: min,
        port_range_max: max,
        ..Default::default()
    };
    assert_status(
        c.create_security_group_rule(req(rule(pb::Protocol::Icmp, 1, 10), &a))
            .await,
        Code::InvalidArgument,
        "port_range_min: a port range needs tcp or udp, not icmp",
    );
    assert_status(
        c.create_security_group_rule(req(rule(pb::Protocol::Tcp, 90, 80), &a))
            .await,
        Code::InvalidArgument,
        "port_range_min: 90-80 is not a port range within 1-65535",
    );
    assert_status(
        c.create_security_group_rule(req(
            pb::CreateSecurityGroupRuleRequest {
                remote_ip_prefix: "10.0.0.0/8".into(),
                remote_group_id: g.id.clone(),
                ..rule(pb::Protocol::Tcp, 80, 80)
            },
            &a,
        ))
        .await,
        Code::InvalidArgument,
        "remote_ip_prefix: give a remote_ip_prefix or a remote_group_id, not both",
    );
    assert_status(
        c.create_security_group_rule(req(
            pb::CreateSecurityGroupRuleRequest {
                direction: 0,
                ..rule(pb::Protocol::Tcp, 80, 80)
            },
            &a,
        ))
        .await,
        Code::InvalidArgument,
        "direction: is required",
    );
    let g = c
        .get_security_group(req(pb::GetRequest { id: g.id.clone() }, &a))
        .await
        .unwrap()
        .into_inner();
    assert!(g.rules.is_empty(), "a refused rule was written: {g:?}");

    // A network with ports in use cannot go; a subnet with addresses in use neither.
    assert_status(
        c.delete_network(req(pb::DeleteRequest { id: net.id.clone() }, &a))
            .await,
        Code::FailedPrecondition,
        &format!("network {} has 1 port(s) in use", net.id),
    );
    assert_status(
        c.delete_subnet(req(pb::DeleteRequest { id: s.id.clone() }, &a))
            .await,
        Code::FailedPrecondition,
        &format!("subnet {} has 1 address(es) in use", s.id),
    );
    c.delete_port(req(pb::DeleteRequest { id: p.id.clone() }, &a))
        .await
        .unwrap();
    c.delete_network(req(pb::DeleteRequest { id: net.id.clone() }, &a))
        .await
        .unwrap();
}

#[tokio::test]
async fn authorization_owner_shared_and_admin_fields() {
    let cloud = Cloud::start(1).await;
    let (a, b, r) = (member_a(), member_b(), reader_a());
    let mut c = cloud.client();
    let private = cloud.network(&a, "private").await;
    cloud.subnet(&a, &private.id, "10.40.0.0/24").await;
    let missing = format!("network {} not found", private.id);
    // Another project can neither see nor use a private network.
    assert_status(
        c.get_network(req(
            pb::GetRequest {
                id: private.id.clone(),
            },
            &b,
        ))
        .await,
        Code::NotFound,
        &missing,
    );
    assert_status(
        c.create_port(req(port_req(&private.id), &b)).await,
        Code::NotFound,
        &missing,
    );
    let seen = c
        .list_networks(req(pb::ListRequest::default(), &b))
        .await
        .unwrap()
        .into_inner();
    assert!(seen.networks.iter().all(|n| n.id != private.id));
    // Readers read but do not change.
    c.get_network(req(
        pb::GetRequest {
            id: private.id.clone(),
        },
        &r,
    ))
    .await
    .unwrap();
    assert_status(
        c.create_port(req(port_req(&private.id), &r)).await,
        Code::PermissionDenied,
        "the member or admin role is required to change networks",
    );
    // Non-admins cannot set admin fields.
    assert_status(
        c.create_network(req(
            pb::CreateNetworkRequest {
                name: "s".into(),
                shared: true,
                ..Default::default()
            },
            &a,
        ))
        .await,
        Code::PermissionDenied,
        "only an administrator may set shared",
    );
    assert_status(
        c.create_network(req(
            pb::CreateNetworkRequest {
                name: "x".into(),
                project_id: runtime::testing::PROJECT_B.into(),
                ..Default::default()
            },
            &a,
        ))
        .await,
        Code::PermissionDenied,
        "only an administrator may set project_id",
    );
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                device_owner: "network:dhcp".into(),
                ..port_req(&private.id)
            },
            &a,
        ))
        .await,
        Code::PermissionDenied,
        "only an administrator may set a network:* device_owner",
    );
    assert_eq!(
        private.segmentation_id, 0,
        "segmentation id shown to a non-admin"
    );
    let as_admin = c
        .get_network(req(
            pb::GetRequest {
                id: private.id.clone(),
            },
            &admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        (1000..=99_999).contains(&as_admin.segmentation_id),
        "{as_admin:?}"
    );
    // A shared network (admin-made) is visible and usable by every project.
    let shared = c
        .create_network(req(
            pb::CreateNetworkRequest {
                name: "public".into(),
                shared: true,
                ..Default::default()
            },
            &admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    cloud.subnet(&admin(), &shared.id, "10.41.0.0/24").await;
    let pb_port = c
        .create_port(req(port_req(&shared.id), &b))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pb_port.project_id, runtime::testing::PROJECT_B);
    // ... but not changeable by them, and b's port stays b's.
    assert_status(
        c.delete_network(req(
            pb::DeleteRequest {
                id: shared.id.clone(),
            },
            &b,
        ))
        .await,
        Code::PermissionDenied,
        &format!("network {} belongs to another project", shared.id),
    );
    assert_status(
        c.get_port(req(
            pb::GetRequest {
                id: pb_port.id.clone(),
            },
            &a,
        ))
        .await,
        Code::NotFound,
        &format!("port {} not found", pb_port.id),
    );
    // No identity at all is refused.
    assert_status(
        c.list_networks(req(pb::ListRequest::default(), &nobody()))
            .await,
        Code::Unauthenticated,
        "authentication failed",
    );
    // Users may not call the agents' API.
    let mut agents = AgentsClient::new(cloud.replicas[0].channel.clone());
    assert_status(
        agents
            .sync_host(req(pb::SyncHostRequest::default(), &a))
            .await,
        Code::PermissionDenied,
        "only a network agent may call this",
    );
}

#[tokio::test]
async fn binding_needs_a_live_agent_and_agents_see_only_their_host() {
    let cloud = Cloud::start(1).await;
    let a = member_a();
    let net = cloud.network(&a, "bind").await;
    cloud.subnet(&a, &net.id, "10.50.0.0/24").await;
    let p = cloud.port(&a, &net.id, None, &[]).await;
    // Never seen: refused, and the reason is on the port.
    let why = format!(
        "cannot bind port {} to host ghost: no network agent has ever reported from ghost",
        p.id
    );
    assert_status(
        cloud.bind(&via(&a, "ghost"), &p.id, "ghost").await,
        Code::FailedPrecondition,
        &why,
    );
    let got = cloud.get_port(&a, &p.id).await;
    let b = got.binding.unwrap();
    assert_eq!(b.vif_type, pb::VifType::BindingFailed as i32);
    assert_eq!(b.binding_error, why);
    assert!(b.host.is_empty());

    // An agent that heartbeats is live; one silent past agent_down_secs is down.
    let h1 = workload("spiffe://cirrus.local/svc/network-agent/host/h1");
    let mut agents = AgentsClient::new(cloud.replicas[0].channel.clone());
    agents
        .heartbeat(req(
            pb::HeartbeatRequest {
                bridge: "br-int".into(),
                ..Default::default()
            },
            &h1,
        ))
        .await
        .unwrap();
    let bound = cloud.bind(&via(&a, "h1"), &p.id, "h1").await.unwrap();
    assert_eq!(bound.binding.as_ref().unwrap().bridge, "br-int");
    assert_eq!(bound.status, "DOWN");

    // h1 sees its port; h2 sees nothing and cannot wire h1's port.
    let s1 = agents
        .sync_host(req(pb::SyncHostRequest::default(), &h1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s1.ports.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        vec![p.id.clone()]
    );
    let h2 = workload("spiffe://cirrus.local/svc/network-agent/host/h2");
    let s2 = agents
        .sync_host(req(pb::SyncHostRequest::default(), &h2))
        .await
        .unwrap()
        .into_inner();
    assert!(s2.ports.is_empty() && s2.networks.is_empty(), "{s2:?}");
    let r = agents
        .report_ports(req(
            pb::ReportPortsRequest {
                ports: vec![pb::PortReport {
                    port_id: p.id.clone(),
                    wired: true,
                }],
            },
            &h2,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.changed, 0);
    assert_eq!(cloud.get_port(&a, &p.id).await.status, "DOWN");
    assert_status(
        agents
            .ensure_dhcp_port(req(
                pb::EnsureDhcpPortRequest {
                    network_id: net.id.clone(),
                },
                &h2,
            ))
            .await,
        Code::NotFound,
        &format!("network {} not found", net.id),
    );
    // h1 wires it: ACTIVE, and a watcher of the device sees DOWN then ACTIVE.
    let mut watch = cloud
        .client()
        .watch_ports(req(
            pb::WatchPortsRequest {
                device_id: p.device_id.clone(),
            },
            &a,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!((first.status.as_str(), first.initial), ("DOWN", true));
    let r = agents
        .report_ports(req(
            pb::ReportPortsRequest {
                ports: vec![pb::PortReport {
                    port_id: p.id.clone(),
                    wired: true,
                }],
            },
            &h1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.changed, 1);
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (next.port_id.as_str(), next.status.as_str(), next.initial),
        (p.id.as_str(), "ACTIVE", false)
    );

    // A compute agent binds only to its own host.
    let c2 = workload("spiffe://cirrus.local/svc/compute-agent/host/h2");
    assert_status(
        cloud.bind(&c2, &p.id, "h1").await,
        Code::PermissionDenied,
        "a compute agent may bind ports to its own host (h2) only",
    );
}

#[tokio::test]
async fn quotas_count_and_refuse() {
    let cloud = Cloud::start(1).await;
    let a = member_a();
    let mut c = cloud.client();
    c.set_quota(req(
        pb::SetQuotaRequest {
            project_id: runtime::testing::PROJECT_A.into(),
            limits: [("ports".to_string(), 2)].into_iter().collect(),
        },
        &admin(),
    ))
    .await
    .unwrap();
    assert_status(
        c.set_quota(req(
            pb::SetQuotaRequest {
                project_id: runtime::testing::PROJECT_A.into(),
                ..Default::default()
            },
            &a,
        ))
        .await,
        Code::PermissionDenied,
        "only an administrator may set quotas",
    );
    let net = cloud.network(&a, "q").await;
    cloud.subnet(&a, &net.id, "10.60.0.0/24").await;
    let p1 = cloud.port(&a, &net.id, None, &[]).await;
    cloud.port(&a, &net.id, None, &[]).await;
    assert_status(
        c.create_port(req(port_req(&net.id), &a)).await,
        Code::ResourceExhausted,
        "quota exceeded for ports: limit 2",
    );
    assert_eq!(count_ports(&cloud, &net.id).await, 2);
    c.delete_port(req(pb::DeleteRequest { id: p1.id }, &a))
        .await
        .unwrap();
    cloud.port(&a, &net.id, None, &[]).await;
    let q = c
        .get_quota(req(pb::GetQuotaRequest::default(), &a))
        .await
        .unwrap()
        .into_inner();
    let item = |r: &str| q.items.iter().find(|i| i.resource == r).cloned().unwrap();
    assert_eq!((item("ports").limit, item("ports").used), (2, 2));
    assert_eq!((item("networks").limit, item("networks").used), (100, 1));
    assert_eq!(item("subnets").used, 1);
    // The default group was made on first use.
    let groups = c
        .list_security_groups(req(pb::ListRequest::default(), &a))
        .await
        .unwrap()
        .into_inner();
    let d = groups
        .security_groups
        .iter()
        .find(|g| g.name == "default")
        .unwrap();
    assert_eq!(d.rules.len(), 2, "{d:?}");
}

#[tokio::test]
async fn compute_agents_create_and_bind_ports_only_for_their_host() {
    let cloud = Cloud::start(1).await;
    let a = member_a();
    let net = cloud.network(&a, "servers").await;
    cloud.subnet(&a, &net.id, "10.61.0.0/24").await;
    let b_net = cloud.network(&member_b(), "b-private").await;
    let mut agents = AgentsClient::new(cloud.replicas[0].channel.clone());
    for h in ["h1", "h2"] {
        agents
            .heartbeat(req(
                pb::HeartbeatRequest {
                    bridge: "br-int".into(),
                    ..Default::default()
                },
                &workload(&format!("spiffe://cirrus.local/svc/network-agent/host/{h}")),
            ))
            .await
            .unwrap();
    }
    let mut c = cloud.client();
    let server_port = |network: &str, project: &str| pb::CreatePortRequest {
        network_id: network.into(),
        device_id: "vm-1".into(),
        device_owner: "compute:nova".into(),
        project_id: project.into(),
        ..Default::default()
    };

    // With the user's token, passed along by the compute agent of h1.
    let a1 = via(&a, "h1");
    let p = c
        .create_port(req(server_port(&net.id, ""), &a1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            p.device_id.as_str(),
            p.device_owner.as_str(),
            p.project_id.as_str()
        ),
        ("vm-1", "compute:nova", runtime::testing::PROJECT_A)
    );
    let bound = cloud.bind(&a1, &p.id, "h1").await.unwrap();
    assert_eq!(bound.binding.unwrap().host, "h1");
    assert_status(
        cloud.bind(&a1, &p.id, "h2").await,
        Code::PermissionDenied,
        "a compute agent may bind ports to its own host (h1) only",
    );
    // The same member's token from anywhere else may not bind, nor unbind.
    assert_status(
        cloud.bind(&a, &p.id, "h2").await,
        Code::PermissionDenied,
        "only an administrator or the compute agent of host h2 may bind a port to it",
    );
    assert_status(
        c.unbind_port(req(
            pb::UnbindPortRequest {
                port_id: p.id.clone(),
            },
            &a,
        ))
        .await,
        Code::PermissionDenied,
        &format!(
            "only an administrator or the compute agent of host h1 may unbind port {}",
            p.id
        ),
    );
    // h2's agent (with a token) may not unbind h1's port; an admin binds anywhere.
    assert_status(
        c.unbind_port(req(
            pb::UnbindPortRequest {
                port_id: p.id.clone(),
            },
            &via(&a, "h2"),
        ))
        .await,
        Code::PermissionDenied,
        &format!("port {} is not bound to this compute agent's host", p.id),
    );
    assert_eq!(
        cloud
            .bind(&admin(), &p.id, "h2")
            .await
            .unwrap()
            .binding
            .unwrap()
            .host,
        "h2"
    );

    // With only its identity: for the server's project, a server's port.
    let c1 = workload("spiffe://cirrus.local/svc/compute-agent/host/h1");
    let q = c
        .create_port(req(server_port(&net.id, runtime::testing::PROJECT_A), &c1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.project_id, runtime::testing::PROJECT_A);
    assert_eq!(q.security_group_ids.len(), 1, "the project's default group");
    assert_eq!(
        cloud
            .bind(&c1, &q.id, "h1")
            .await
            .unwrap()
            .binding
            .unwrap()
            .host,
        "h1"
    );
    assert_status(
        cloud.bind(&c1, &q.id, "h2").await,
        Code::PermissionDenied,
        "a compute agent may bind ports to its own host (h1) only",
    );
    assert_status(
        c.create_port(req(server_port(&net.id, ""), &c1)).await,
        Code::InvalidArgument,
        "project_id: a compute agent must name the server's project",
    );
    assert_status(
        c.create_port(req(
            pb::CreatePortRequest {
                device_owner: "network:dhcp".into(),
                ..server_port(&net.id, runtime::testing::PROJECT_A)
            },
            &c1,
        ))
        .await,
        Code::InvalidArgument,
        "device_owner: a compute agent creates only server ports (device_id and a compute:* device_owner)",
    );
    // Project A's server may not use project B's private network.
    assert_status(
        c.create_port(req(
            server_port(&b_net.id, runtime::testing::PROJECT_A),
            &c1,
        ))
        .await,
        Code::NotFound,
        &format!("network {} not found", b_net.id),
    );
    // The agent's port is project A's: A's member sees it, B's does not.
    cloud.get_port(&a, &q.id).await;
    assert_status(
        c.get_port(req(pb::GetRequest { id: q.id.clone() }, &member_b()))
            .await,
        Code::NotFound,
        &format!("port {} not found", q.id),
    );
}

#[tokio::test]
async fn quota_holds_exactly_under_concurrent_creates_on_sharded_usage() {
    let cloud = Cloud::start(2).await;
    let a = member_a();
    cloud
        .client()
        .set_quota(req(
            pb::SetQuotaRequest {
                project_id: runtime::testing::PROJECT_A.into(),
                limits: [("ports".to_string(), 30)].into_iter().collect(),
            },
            &admin(),
        ))
        .await
        .unwrap();
    let net = cloud.network(&a, "qc").await;
    cloud.subnet(&a, &net.id, "10.62.0.0/24").await;
    // 80 creates at once through two replicas: exactly 30 pass.
    let mut tasks = Vec::new();
    for i in 0..80 {
        let mut c = cloud.client_of(i % 2);
        let a = a.clone();
        let r = port_req(&net.id);
        tasks.push(tokio::spawn(async move { c.create_port(req(r, &a)).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert_eq!(s.message(), "quota exceeded for ports: limit 30");
            }
        }
    }
    assert_eq!(ok, 30);
    assert_eq!(count_ports(&cloud, &net.id).await, 30);
    let q = cloud
        .client()
        .get_quota(req(pb::GetQuotaRequest::default(), &a))
        .await
        .unwrap()
        .into_inner();
    let ports = q.items.iter().find(|i| i.resource == "ports").unwrap();
    assert_eq!((ports.limit, ports.used), (30, 30));
}
