//! The thin end-to-end slice: a member creates a server; the scheduler
//! places it, the agent builds it on the test driver through its steps,
//! conductor records it active, WatchServer sees every transition; delete
//! releases the claim and leaves nothing on the host.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use runtime::testing::{admin, req};

#[tokio::test]
async fn create_watch_active_delete_releases_everything() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;

    let created = cloud.create(&member_a(), "web-1", "m1.tiny").await;
    assert_eq!(created.vm_state, "building");
    assert_eq!(created.task_state, "scheduling");
    assert_eq!(created.host, "", "a member does not see hosts");

    let mut watch = cloud.watch(&member_a(), &created.id).await;
    let seen = watch_until(&mut watch, "active").await;
    // Every step's task state, in the order of the build table.
    let tasks: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    let expect = ["block_device_mapping", "networking", "spawning", ""];
    let mut at = 0;
    for t in &tasks {
        if at < expect.len() && *t == expect[at] {
            at += 1;
        }
    }
    assert_eq!(at, expect.len(), "transitions seen: {seen:?}");

    let s = cloud.wait_vm(&created.id, "active").await;
    assert_eq!(s.host, "h1");
    assert_eq!(s.power_state, "running");
    assert!(s.launched_at.is_some());
    assert!(cloud.domain_exists(&created.id).await);
    assert_eq!(cloud.usage().await, (1, 1, 512, 1));

    let log = cloud
        .servers()
        .get_console_log(req(
            pb::GetConsoleLogRequest {
                id: created.id.clone(),
                lines: 0,
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert!(
        log.contains("running on host h1 (test:///default)"),
        "{log}"
    );

    let deleting = cloud
        .servers()
        .delete_server(req(
            pb::ServerRef {
                id: created.id.clone(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleting.task_state, "deleting");
    let seen = watch_until(&mut watch, "deleted").await;
    assert_eq!(seen.last().unwrap().0, "deleted");
    cloud.wait_vm(&created.id, "deleted").await;
    assert!(!cloud.domain_exists(&created.id).await);
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
    assert_eq!(cloud.leftovers("h1", &created.id), Vec::<String>::new());

    // Deleted servers are gone for everyone, admins included.
    let gone = cloud
        .servers()
        .get_server(req(
            pb::ServerRef {
                id: created.id.clone(),
            },
            &admin(),
        ))
        .await;
    runtime::testing::assert_status(
        gone,
        tonic::Code::NotFound,
        &format!("server {} not found", created.id),
    );
}
