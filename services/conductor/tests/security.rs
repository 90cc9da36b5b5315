//! Who may touch what: an agent only its own host's servers (conductor,
//! from the SPIFFE id), and the user rules of compute-api (reader, member,
//! other project, admin).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use proto::conductor::v1 as cpb;
use proto::conductor::v1::conductor_client::ConductorClient;
use runtime::testing::{admin, assert_status, nobody, req, workload};
use tonic::Code;

fn agent(host: &str) -> runtime::caller::Caller {
    workload(&format!(
        "spiffe://cirrus.local/svc/compute-agent/host/{host}"
    ))
}

#[tokio::test]
async fn an_agent_may_touch_only_its_own_hosts_servers() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let s = cloud.create(&member_a(), "mine", "m1.tiny").await;
    cloud.wait_vm(&s.id, "active").await;
    let mut conductor = ConductorClient::new(cloud.conductor.channel.clone());
    let denied = format!("server {} is not on host h2", s.id);

    let r = conductor
        .get_build_spec(req(cpb::ServerRef { id: s.id.clone() }, &agent("h1")))
        .await
        .unwrap();
    assert_eq!(r.get_ref().host, "h1");

    assert_status(
        conductor
            .get_build_spec(req(cpb::ServerRef { id: s.id.clone() }, &agent("h2")))
            .await,
        Code::PermissionDenied,
        &denied,
    );
    assert_status(
        conductor
            .update_server_state(req(
                cpb::UpdateServerStateRequest {
                    id: s.id.clone(),
                    vm_state: "stopped".into(),
                    ..Default::default()
                },
                &agent("h2"),
            ))
            .await,
        Code::PermissionDenied,
        &denied,
    );
    assert_status(
        conductor
            .report_deleted(req(cpb::ServerRef { id: s.id.clone() }, &agent("h2")))
            .await,
        Code::PermissionDenied,
        &denied,
    );
    assert_status(
        conductor
            .report_build_result(req(
                cpb::ReportBuildResultRequest {
                    id: s.id.clone(),
                    attempt: 1,
                    ok: false,
                    ..Default::default()
                },
                &agent("h2"),
            ))
            .await,
        Code::PermissionDenied,
        &denied,
    );
    assert_status(
        conductor
            .append_console_log(req(
                cpb::AppendConsoleLogRequest {
                    id: s.id.clone(),
                    text: "x".into(),
                },
                &agent("h2"),
            ))
            .await,
        Code::PermissionDenied,
        &denied,
    );
    assert_status(
        conductor
            .list_host_servers(req(
                cpb::ListHostServersRequest { host: "h1".into() },
                &agent("h2"),
            ))
            .await,
        Code::PermissionDenied,
        "host h2 may not list the servers of host h1",
    );
    assert_status(
        conductor
            .heartbeat(req(
                cpb::HeartbeatRequest {
                    host: "h1".into(),
                    vcpus: 1,
                    ram_mb: 1,
                    disk_gb: 1,
                    ..Default::default()
                },
                &agent("h2"),
            ))
            .await,
        Code::PermissionDenied,
        "host h2 may not report for host h1",
    );
    // Not an agent at all: users, other services, nobody.
    for who in [
        member_a(),
        admin(),
        workload("spiffe://cirrus.local/svc/compute-api"),
        nobody(),
    ] {
        assert_status(
            conductor
                .get_build_spec(req(cpb::ServerRef { id: s.id.clone() }, &who))
                .await,
            Code::PermissionDenied,
            "only a compute agent may call conductor",
        );
    }
    // Nothing changed.
    let after = cloud.wait_vm(&s.id, "active").await;
    assert_eq!(after.power_state, "running");
}

#[tokio::test]
async fn readers_look_members_change_other_projects_see_nothing() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let s = cloud.create(&member_a(), "rbac", "m1.tiny").await;
    let id = s.id.clone();
    cloud.wait_vm(&id, "active").await;
    let mut c = cloud.servers();

    // A reader of the project sees it (no host), may not change it.
    let seen = c
        .get_server(req(pb::ServerRef { id: id.clone() }, &reader_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.host, "");
    assert_status(
        c.stop_server(req(pb::ServerRef { id: id.clone() }, &reader_a()))
            .await,
        Code::PermissionDenied,
        "the member role is required to change servers",
    );
    assert_status(
        c.create_server(req(
            pb::CreateServerRequest {
                name: "r".into(),
                flavor: "m1.tiny".into(),
                image_id: cloud.image_id.clone(),
                ..Default::default()
            },
            &reader_a(),
        ))
        .await,
        Code::PermissionDenied,
        "the member role is required to change servers",
    );
    // Another project: not found, exactly as a missing one.
    let nf = format!("server {id} not found");
    assert_status(
        c.get_server(req(pb::ServerRef { id: id.clone() }, &member_b()))
            .await,
        Code::NotFound,
        &nf,
    );
    assert_status(
        c.delete_server(req(pb::ServerRef { id: id.clone() }, &member_b()))
            .await,
        Code::NotFound,
        &nf,
    );
    assert_status(
        c.stop_server(req(pb::ServerRef { id: id.clone() }, &member_b()))
            .await,
        Code::NotFound,
        &nf,
    );
    assert_status(
        c.watch_server(req(pb::ServerRef { id: id.clone() }, &member_b()))
            .await
            .map(|_| ()),
        Code::NotFound,
        &nf,
    );
    let theirs = c
        .list_servers(req(pb::ListServersRequest::default(), &member_b()))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.servers.is_empty());
    assert_status(
        c.list_servers(req(
            pb::ListServersRequest {
                all_projects: true,
                ..Default::default()
            },
            &member_a(),
        ))
        .await,
        Code::PermissionDenied,
        "only an administrator may list other projects' servers or filter by host",
    );
    // An administrator sees every project and the host.
    let all = c
        .list_servers(req(
            pb::ListServersRequest {
                all_projects: true,
                ..Default::default()
            },
            &admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.servers.len(), 1);
    assert_eq!(all.servers[0].host, "h1");
    // Nobody (no sidecar identity) is refused outright.
    assert_status(
        c.get_server(req(pb::ServerRef { id: id.clone() }, &nobody()))
            .await,
        Code::Unauthenticated,
        "authentication failed",
    );
    // Hosts are an administrator's.
    assert_status(
        cloud
            .hosts()
            .list_hosts(req(pb::ListHostsRequest {}, &member_a()))
            .await,
        Code::PermissionDenied,
        "only an administrator may do this",
    );
    let hosts = cloud
        .hosts()
        .list_hosts(req(pb::ListHostsRequest {}, &admin()))
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        (hosts[0].vcpus_used, hosts[0].ram_mb_used, hosts[0].servers),
        (1, 512, 1)
    );
}
