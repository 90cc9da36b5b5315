//! Every server action, its effect on the libvirt domain and the states it
//! ends in, and the states in which Nova refuses it (FAILED_PRECONDITION
//! naming the state); locked servers.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use runtime::testing::{admin, assert_status, req};
use tonic::Code;

async fn act(
    cloud: &Cloud,
    id: &str,
    what: &str,
    who: &runtime::caller::Caller,
) -> Result<pb::Server, tonic::Status> {
    let mut c = cloud.servers();
    let r = pb::ServerRef { id: id.into() };
    let out = match what {
        "start" => c.start_server(req(r, who)).await,
        "stop" => c.stop_server(req(r, who)).await,
        "pause" => c.pause_server(req(r, who)).await,
        "unpause" => c.unpause_server(req(r, who)).await,
        "suspend" => c.suspend_server(req(r, who)).await,
        "resume" => c.resume_server(req(r, who)).await,
        "reboot" => {
            c.reboot_server(req(
                pb::RebootServerRequest {
                    id: id.into(),
                    hard: false,
                },
                who,
            ))
            .await
        }
        "hard reboot" => {
            c.reboot_server(req(
                pb::RebootServerRequest {
                    id: id.into(),
                    hard: true,
                },
                who,
            ))
            .await
        }
        other => panic!("no action {other}"),
    };
    out.map(|r| r.into_inner())
}

#[tokio::test]
async fn every_action_moves_the_domain_and_the_states() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let s = cloud.create(&member_a(), "acts", "m1.tiny").await;
    let id = s.id.clone();
    cloud.wait_vm(&id, "active").await;

    // (action, task while it runs, vm_state after, power_state after)
    let plan = [
        ("stop", "powering-off", "stopped", "shutdown"),
        ("start", "powering-on", "active", "running"),
        ("pause", "pausing", "paused", "paused"),
        ("unpause", "unpausing", "active", "running"),
        ("suspend", "suspending", "suspended", "suspended"),
        ("resume", "resuming", "active", "running"),
        ("reboot", "rebooting", "active", "running"),
        ("hard reboot", "rebooting_hard", "active", "running"),
        ("stop", "powering-off", "stopped", "shutdown"),
        ("hard reboot", "rebooting_hard", "active", "running"),
    ];
    for (what, task, vm, power) in plan {
        let during = act(&cloud, &id, what, &member_a()).await.unwrap();
        assert_eq!(during.task_state, task, "{what}");
        let after = cloud.wait_vm(&id, vm).await;
        assert_eq!(after.power_state, power, "{what}");
    }
    let log = cloud
        .servers()
        .get_console_log(req(
            pb::GetConsoleLogRequest {
                id: id.clone(),
                lines: 2,
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.ends_with("rebooting_hard done"), "{log}");
}

#[tokio::test]
async fn actions_refused_in_the_wrong_state_name_it() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let s = cloud.create(&member_a(), "refusals", "m1.tiny").await;
    let id = s.id.clone();
    cloud.wait_vm(&id, "active").await;

    for what in ["start", "unpause", "resume"] {
        assert_status(
            act(&cloud, &id, what, &member_a()).await,
            Code::FailedPrecondition,
            &format!("cannot {what} server {id} while it is active"),
        );
    }
    act(&cloud, &id, "stop", &member_a()).await.unwrap();
    cloud.wait_vm(&id, "stopped").await;
    for what in ["stop", "pause", "unpause", "suspend", "resume", "reboot"] {
        assert_status(
            act(&cloud, &id, what, &member_a()).await,
            Code::FailedPrecondition,
            &format!("cannot {what} server {id} while it is stopped"),
        );
    }
    act(&cloud, &id, "start", &member_a()).await.unwrap();
    cloud.wait_vm(&id, "active").await;
    act(&cloud, &id, "pause", &member_a()).await.unwrap();
    cloud.wait_vm(&id, "paused").await;
    for what in ["pause", "suspend", "stop", "start", "resume", "reboot"] {
        assert_status(
            act(&cloud, &id, what, &member_a()).await,
            Code::FailedPrecondition,
            &format!("cannot {what} server {id} while it is paused"),
        );
    }
    act(&cloud, &id, "unpause", &member_a()).await.unwrap();
    cloud.wait_vm(&id, "active").await;
    act(&cloud, &id, "suspend", &member_a()).await.unwrap();
    cloud.wait_vm(&id, "suspended").await;
    for what in ["suspend", "pause", "unpause", "stop", "start", "reboot"] {
        assert_status(
            act(&cloud, &id, what, &member_a()).await,
            Code::FailedPrecondition,
            &format!("cannot {what} server {id} while it is suspended"),
        );
    }

    // A server in error with no host refuses everything but delete.
    let mut big = cloud.create(&member_a(), "too-big", "m1.xlarge").await;
    big = cloud.wait_vm(&big.id, "error").await;
    for what in ["start", "pause", "reboot"] {
        assert_status(
            act(&cloud, &big.id, what, &member_a()).await,
            Code::FailedPrecondition,
            &format!("cannot {what} server {} while it is error", big.id),
        );
    }
}

#[tokio::test]
async fn a_busy_server_refuses_a_second_action_naming_its_task() {
    let mut cloud = Cloud::start().await;
    let mut cfg = cloud.agent_config("h1");
    cfg.faults.hang_at = Some("wait_vif_plugged".into());
    cloud.start_agent_with(cfg).await;
    let s = cloud.create(&member_a(), "busy", "m1.tiny").await;
    let servers = cloud.servers();
    let id = s.id.clone();
    runtime::testing::wait_for("spawning", WAIT, || {
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
    assert_status(
        act(&cloud, &s.id, "stop", &member_a()).await,
        Code::FailedPrecondition,
        &format!("cannot stop server {} while its task is spawning", s.id),
    );
}

#[tokio::test]
async fn a_locked_server_refuses_changes_except_from_an_admin() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let s = cloud.create(&member_a(), "locked", "m1.tiny").await;
    let id = s.id.clone();
    cloud.wait_vm(&id, "active").await;
    let locked = cloud
        .servers()
        .lock_server(req(
            pb::LockServerRequest {
                id: id.clone(),
                reason: "maintenance".into(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(locked.locked);
    assert_eq!(locked.locked_reason, "maintenance");
    let refused = format!("server {id} is locked");
    assert_status(
        act(&cloud, &id, "stop", &member_a()).await,
        Code::FailedPrecondition,
        &refused,
    );
    assert_status(
        cloud
            .servers()
            .delete_server(req(pb::ServerRef { id: id.clone() }, &member_a()))
            .await,
        Code::FailedPrecondition,
        &refused,
    );
    // An administrator acts on a locked server.
    act(&cloud, &id, "stop", &admin()).await.unwrap();
    cloud.wait_vm(&id, "stopped").await;
    // An administrator's lock binds the owner even to unlock.
    cloud
        .servers()
        .lock_server(req(
            pb::LockServerRequest {
                id: id.clone(),
                reason: String::new(),
            },
            &admin(),
        ))
        .await
        .unwrap();
    assert_status(
        cloud
            .servers()
            .unlock_server(req(pb::ServerRef { id: id.clone() }, &member_a()))
            .await,
        Code::FailedPrecondition,
        &format!("server {id} was locked by an administrator"),
    );
    cloud
        .servers()
        .unlock_server(req(pb::ServerRef { id: id.clone() }, &admin()))
        .await
        .unwrap();
    act(&cloud, &id, "start", &member_a()).await.unwrap();
    cloud.wait_vm(&id, "active").await;
}
