//! An agent killed mid-build (its runtime dropped with every task, as a
//! kill -9 ends a process; the hypervisor keeps the paused domain) heals at
//! restart: the build is unwound and reported, the server goes to error,
//! its claim is released. An interrupted delete is finished.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use runtime::testing::{admin, req, wait_for};

#[tokio::test]
async fn an_agent_killed_mid_build_heals_at_restart() {
    let mut cloud = Cloud::start().await;
    let mut cfg = cloud.agent_config("h1");
    cfg.faults.hang_at = Some("wait_vif_plugged".into());
    cloud.start_agent_with(cfg).await;
    let s = cloud.create(&member_a(), "interrupted", "m1.tiny").await;
    let servers = cloud.servers();
    let id = s.id.clone();
    wait_for("the build to reach wait_vif_plugged", WAIT, || {
        let mut c = servers.clone();
        let id = id.clone();
        async move {
            let s = c
                .get_server(req(pb::ServerRef { id }, &admin()))
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if s.task_state == "spawning" {
                Ok(())
            } else {
                Err(s.task_state)
            }
        }
    })
    .await;
    // The domain is defined and paused before the agent dies.
    wait_for("the paused domain", WAIT, || async {
        if cloud.domain_exists(&s.id).await {
            Ok(())
        } else {
            Err("no domain".into())
        }
    })
    .await;
    cloud.kill_agent("h1");
    assert_eq!(
        cloud.usage().await.0,
        1,
        "the claim is still held while the agent is dead"
    );
    assert!(
        cloud.domain_exists(&s.id).await,
        "the hypervisor keeps the domain"
    );

    cloud.start_agent("h1").await;
    let e = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(
        e.fault.unwrap().message,
        "build interrupted: the compute agent on h1 restarted"
    );
    assert!(!cloud.domain_exists(&s.id).await);
    assert_eq!(cloud.leftovers("h1", &s.id), Vec::<String>::new());
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
    // The redelivered build cast (if any) is stale and changes nothing.
    let again = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(again.revision, e.revision);
}

#[tokio::test]
async fn an_interrupted_delete_finishes_at_restart() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let s = cloud.create(&member_a(), "to-delete", "m1.tiny").await;
    cloud.wait_vm(&s.id, "active").await;
    // The agent dies; the delete is asked while its host still counts as up.
    cloud.kill_agent("h1");
    let d = cloud
        .servers()
        .delete_server(req(pb::ServerRef { id: s.id.clone() }, &member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.task_state, "deleting");
    assert!(cloud.domain_exists(&s.id).await);
    cloud.start_agent("h1").await;
    cloud.wait_vm(&s.id, "deleted").await;
    assert!(!cloud.domain_exists(&s.id).await);
    assert_eq!(cloud.leftovers("h1", &s.id), Vec::<String>::new());
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
}
