//! The build saga: a failure injected at each step in turn unwinds exactly
//! what ran (no domain, no files, no claim), and every step run twice (and
//! every undo run twice) changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use runtime::testing::req;

#[tokio::test]
async fn a_failure_at_each_step_unwinds_with_nothing_leaked() {
    let mut cloud = Cloud::start().await;
    let steps = compute_agent::saga::step_names();
    assert_eq!(steps.len(), 8);
    let mut previous: Option<String> = None;
    for step in steps {
        // A fresh host per step; the previous one is disabled.
        if let Some(p) = previous.take() {
            cloud.set_host(&p, false).await;
            cloud.kill_agent(&p);
        }
        let host = format!("h-{}", step.replace('_', "-"));
        let mut cfg = cloud.agent_config(&host);
        cfg.faults.fail_at = Some(step.to_string());
        cfg.faults.reschedulable = false;
        cloud.start_agent_with(cfg).await;

        let s = cloud
            .create(&member_a(), &format!("fail-{step}"), "m1.tiny")
            .await;
        let failed = cloud.wait_vm(&s.id, "error").await;
        let fault = failed.fault.clone().unwrap();
        assert_eq!(
            fault.message,
            format!("injected failure at step {step} on host {host}"),
            "step {step}"
        );
        assert_eq!(fault.code, 500);
        assert!(
            !cloud.domain_exists(&s.id).await,
            "step {step}: domain left"
        );
        assert_eq!(
            cloud.leftovers(&host, &s.id),
            Vec::<String>::new(),
            "step {step}"
        );
        assert_eq!(cloud.usage().await, (0, 0, 0, 0), "step {step}: claim left");

        // A server in error deletes cleanly too.
        cloud
            .servers()
            .delete_server(req(pb::ServerRef { id: s.id.clone() }, &member_a()))
            .await
            .unwrap();
        cloud.wait_vm(&s.id, "deleted").await;
        previous = Some(host);
    }
}

#[tokio::test]
async fn every_step_and_undo_run_twice_change_nothing() {
    let mut cloud = Cloud::start().await;
    let mut cfg = cloud.agent_config("h1");
    cfg.faults.repeat_steps = true;
    let state = cfg.state_dir.clone();
    cloud.start_agent_with(cfg).await;

    let s = cloud.create(&member_a(), "twice", "m1.tiny").await;
    let active = cloud.wait_vm(&s.id, "active").await;
    assert_eq!(active.power_state, "running");
    assert!(cloud.domain_exists(&s.id).await);
    assert_eq!(cloud.usage().await, (1, 1, 512, 1));
    let mut files = cloud.leftovers("h1", &s.id);
    files.sort();
    let dir = state.join("servers").join(&s.id);
    let mut expect: Vec<String> = [
        "",
        "config-drive",
        "config-drive/openstack",
        "config-drive/openstack/latest",
        "config-drive/openstack/latest/meta_data.json",
        "config-drive/openstack/latest/network_data.json",
        "disk.qcow2",
    ]
    .iter()
    .map(|p| {
        if p.is_empty() {
            dir.display().to_string()
        } else {
            dir.join(p).display().to_string()
        }
    })
    .collect();
    expect.sort();
    assert_eq!(files, expect);

    cloud
        .servers()
        .delete_server(req(pb::ServerRef { id: s.id.clone() }, &member_a()))
        .await
        .unwrap();
    cloud.wait_vm(&s.id, "deleted").await;
    assert!(!cloud.domain_exists(&s.id).await);
    assert_eq!(cloud.leftovers("h1", &s.id), Vec::<String>::new());
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));

    // A failure late in the build unwinds twice without complaint.
    cloud.kill_agent("h1");
    let mut cfg = cloud.agent_config("h1");
    cfg.faults.repeat_steps = true;
    cfg.faults.fail_at = Some("resume".into());
    cloud.start_agent_with(cfg).await;
    let s = cloud.create(&member_a(), "twice-fail", "m1.tiny").await;
    let failed = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(
        failed.fault.unwrap().message,
        "injected failure at step resume on host h1"
    );
    assert!(!cloud.domain_exists(&s.id).await);
    assert_eq!(cloud.leftovers("h1", &s.id), Vec::<String>::new());
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
}
