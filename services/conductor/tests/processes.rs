//! kill -9 of real processes mid-build (issue 10: "a kill -9 of any
//! control-plane process or of an agent mid-build never leaves a server in
//! `building` forever nor a claim leaked"). Each test runs the process it
//! kills as its real binary, a child of the test configured through the
//! environment, and SIGKILLs it while a server's build is in flight:
//!
//! - the compute-agent binary (on its own `test:///default` hypervisor,
//!   which dies with it), killed at `spawning`: at restart the server goes
//!   to `error`, its claim is released, nothing is left in its directory,
//!   and the host builds the next server;
//! - the conductor binary, killed while an agent is mid-build: the
//!   restarted conductor's build timeout sends the server to `error` and
//!   releases the claim;
//! - the scheduler binary, frozen (SIGSTOP) with compute-api's placement
//!   call in it (its bytes unread in the scheduler's socket), then killed: the call fails, the server goes to `error`,
//!   no claim is held; the restarted scheduler places the next server.
//!
//! They need the scheduler and compute-agent binaries built beside this
//! test (`cargo build -p scheduler -p compute-agent --bins`); conductor's
//! own binary cargo builds for its tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use runtime::testing::{admin, req, wait_for};

/// Waits until the server is `building` with `task` (as an admin sees it).
async fn wait_task(cloud: &Cloud, id: &str, task: &str) {
    let servers = cloud.servers();
    wait_for(&format!("server {id} building/{task}"), WAIT, || {
        let mut c = servers.clone();
        let id = id.to_string();
        async move {
            let s = c
                .get_server(req(pb::ServerRef { id }, &admin()))
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if s.vm_state == "building" && s.task_state == task {
                Ok(())
            } else {
                Err(format!("{}/{}", s.vm_state, s.task_state))
            }
        }
    })
    .await;
}

/// Bytes received and not yet read on the established TCP connections to
/// loopback `port` (`/proc/net/tcp`'s rx_queue): a frozen server's unread
/// requests.
fn unread_bytes(port: u16) -> u64 {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .sum()
}

/// No server of the cloud is `building`; the claims are exactly those of
/// the servers that are not deleted, error or building.
async fn nothing_building_nothing_leaked(cloud: &Cloud) {
    let sql = cloud.sql().await;
    let building: Vec<String> = sql
        .query(
            "SELECT id::text FROM servers WHERE vm_state = 'building'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(building, Vec::<String>::new(), "servers left building");
    let leaked: Vec<String> = sql
        .query(
            "SELECT c.server_id::text FROM claims c JOIN servers s ON s.id = c.server_id \
             WHERE s.vm_state IN ('error', 'deleted')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(leaked, Vec::<String>::new(), "claims of ended servers");
    // The hosts' usage is the sum of the claims held.
    let r = sql
        .query_one(
            "SELECT (SELECT COALESCE(sum(vcpus), 0) FROM claims)::bigint, \
             (SELECT COALESCE(sum(vcpus_used), 0) FROM hosts)::bigint",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), r.get::<_, i64>(1), "usage = claims");
}

#[tokio::test]
async fn the_agent_binary_killed_mid_build_heals_at_restart() {
    let cloud = Cloud::start().await;
    let mut cfg = cloud.agent_config("p1");
    // Held at the step after the domain is defined and paused, so that
    // the kill lands mid-build and not between builds.
    cfg.faults.hang_at = Some("wait_vif_plugged".into());
    let mut agent = cloud.spawn_agent_process(&cfg).await;
    let s = cloud.create(&member_a(), "killed-agent", "m1.tiny").await;
    wait_task(&cloud, &s.id, "spawning").await;

    agent.kill9().await;
    let after_kill = cloud
        .servers()
        .get_server(req(pb::ServerRef { id: s.id.clone() }, &admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after_kill.vm_state.as_str(), after_kill.task_state.as_str()),
        ("building", "spawning"),
        "the kill leaves the build where it was"
    );
    assert_eq!(
        cloud.usage().await.0,
        1,
        "the claim is held while the agent is dead"
    );
    assert!(
        !cloud.leftovers("p1", &s.id).is_empty(),
        "the killed build left its files"
    );

    // The same binary, now without the hang.
    cfg.faults.hang_at = None;
    let mut agent = cloud.spawn_agent_process(&cfg).await;
    let e = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(
        e.fault.unwrap().message,
        "build interrupted: the compute agent on p1 restarted"
    );
    assert_eq!(cloud.leftovers("p1", &s.id), Vec::<String>::new());
    assert_eq!(cloud.usage().await, (0, 0, 0, 0), "claim released");
    nothing_building_nothing_leaked(&cloud).await;

    // The healed host builds the next server.
    let next = cloud.create(&member_a(), "after-heal", "m1.tiny").await;
    let active = cloud.wait_vm(&next.id, "active").await;
    assert_eq!(active.host, "p1");
    assert_eq!(cloud.usage().await.0, 1);
    agent.kill9().await;
}

#[tokio::test]
async fn the_conductor_binary_killed_mid_build_heals_by_the_build_timeout() {
    let mut cloud = Cloud::start_with(Options {
        conductor_process: true,
        build_timeout_secs: 6,
        ..Default::default()
    })
    .await;
    let mut cfg = cloud.agent_config("c1");
    cfg.faults.hang_at = Some("wait_vif_plugged".into());
    cloud.start_agent_with(cfg).await;
    let s = cloud
        .create(&member_a(), "killed-conductor", "m1.tiny")
        .await;
    wait_task(&cloud, &s.id, "spawning").await;
    assert_eq!(cloud.usage().await.0, 1);

    cloud.conductor.process.as_mut().unwrap().kill9().await;
    // Down, the server stays as it was: nothing else sweeps.
    let held = cloud
        .servers()
        .get_server(req(pb::ServerRef { id: s.id.clone() }, &admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.vm_state, "building");
    cloud.conductor.process.as_mut().unwrap().start().await;

    let e = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(
        e.fault.unwrap().message,
        "Build of instance timed out after 6 seconds"
    );
    assert_eq!(cloud.usage().await, (0, 0, 0, 0), "claim released");
    nothing_building_nothing_leaked(&cloud).await;
    cloud.kill_agent("c1");
}

#[tokio::test]
async fn the_scheduler_binary_killed_mid_placement_leaves_no_server_building() {
    let mut cloud = Cloud::start_with(Options {
        scheduler_process: true,
        ..Default::default()
    })
    .await;
    cloud.start_agent("s1").await;
    // Placed once through the process, so compute-api's channel to it is open.
    let first = cloud.create(&member_a(), "before", "m1.tiny").await;
    cloud.wait_vm(&first.id, "active").await;

    cloud.scheduler_process.as_ref().unwrap().signal("STOP");
    // compute-api's SelectDestinations is now in the frozen scheduler.
    let s = cloud
        .create(&member_a(), "killed-scheduler", "m1.tiny")
        .await;
    wait_task(&cloud, &s.id, "scheduling").await;
    // The placement request is in the frozen scheduler's socket, unread.
    let port = cloud.scheduler_process.as_ref().unwrap().addr.port();
    wait_for(
        "compute-api's request in the frozen scheduler",
        WAIT,
        || async move {
            match unread_bytes(port) {
                0 => Err("no unread bytes on the scheduler's connections".to_string()),
                n => Ok(n),
            }
        },
    )
    .await;
    cloud.scheduler_process.as_mut().unwrap().kill9().await;

    let e = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(
        e.fault.unwrap().message,
        "scheduling failed: the scheduler is unavailable"
    );
    assert_eq!(cloud.usage().await.0, 1, "only the first server's claim");
    nothing_building_nothing_leaked(&cloud).await;

    // The restarted scheduler places the next one.
    cloud.scheduler_process.as_mut().unwrap().start().await;
    let next = cloud.create(&member_a(), "after", "m1.tiny").await;
    cloud.wait_vm(&next.id, "active").await;
    assert_eq!(cloud.usage().await.0, 2);
    nothing_building_nothing_leaked(&cloud).await;
    cloud.kill_agent("s1");
}
