//! Placement end to end: no valid host, reschedules on the alternates then
//! error after 3 attempts, hosts down or disabled are not chosen, two
//! scheduler replicas filling the hosts exactly without over-commit,
//! (anti-)affinity, and the build timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use compute_api::model::NO_VALID_HOST;
use proto::compute::v1 as pb;
use proto::compute::v1::quotas_client::QuotasClient;
use proto::compute::v1::server_groups_client::ServerGroupsClient;
use runtime::testing::{PROJECT_A, admin, req, wait_for};

async fn unlimited(cloud: &Cloud) {
    QuotasClient::new(cloud.api.channel.clone())
        .set_quota(req(
            pb::SetQuotaRequest {
                project_id: PROJECT_A.into(),
                limits: Some(pb::QuotaLimits {
                    instances: -1,
                    cores: -1,
                    ram_mb: -1,
                    key_pairs: -1,
                    server_groups: -1,
                }),
            },
            &admin(),
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn no_valid_host_is_an_error_with_nova_s_fault_and_no_claim() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    // m1.xlarge wants 8 vCPUs; the host has 4 and no overcommit.
    let s = cloud.create(&member_a(), "huge", "m1.xlarge").await;
    let e = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(e.fault.unwrap().message, NO_VALID_HOST);
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
}

#[tokio::test]
async fn a_failing_host_is_rescheduled_and_after_three_attempts_the_server_errors() {
    let mut cloud = Cloud::start().await;
    for h in ["h1", "h2", "h3", "h4"] {
        let mut cfg = cloud.agent_config(h);
        cfg.faults.fail_at = Some("define_paused".into());
        cfg.faults.reschedulable = true;
        cloud.start_agent_with(cfg).await;
    }
    let s = cloud.create(&member_a(), "unlucky", "m1.tiny").await;
    let e = cloud.wait_vm(&s.id, "error").await;
    let fault = e.fault.unwrap().message;
    let sql = cloud.sql().await;
    let row = sql
        .query_one(
            "SELECT attempt, tried_hosts, host FROM servers WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await
        .unwrap();
    let attempt: i32 = row.get(0);
    let tried: Vec<String> = row.get(1);
    let last: String = row.get(2);
    assert_eq!(attempt, 3, "three attempts in all");
    assert_eq!(
        tried.iter().collect::<HashSet<_>>().len(),
        3,
        "on three hosts: {tried:?}"
    );
    assert_eq!(
        fault,
        format!("injected failure at step define_paused on host {last}")
    );
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
    for h in &tried {
        assert_eq!(cloud.leftovers(h, &s.id), Vec::<String>::new());
    }
    assert!(!cloud.domain_exists(&s.id).await);
    // Recent failures weigh against the hosts: each failed once.
    let failures: Vec<i32> = sql
        .query(
            "SELECT failures FROM hosts WHERE name = ANY($1) ORDER BY name",
            &[&tried],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(failures, vec![1, 1, 1]);
}

#[tokio::test]
async fn a_reschedule_lands_on_a_healthy_alternate() {
    let mut cloud = Cloud::start().await;
    let mut bad = cloud.agent_config("bad");
    bad.faults.fail_at = Some("resume".into());
    bad.faults.reschedulable = true;
    // The failing host is the roomiest, so the weighers choose it first.
    bad.ram_mb = Some(16384);
    bad.vcpus = Some(16);
    cloud.start_agent_with(bad).await;
    cloud.start_agent("good").await;
    let s = cloud.create(&member_a(), "second-try", "m1.tiny").await;
    let ok = cloud.wait_vm(&s.id, "active").await;
    assert_eq!(ok.host, "good");
    assert_eq!(cloud.usage().await, (1, 1, 512, 1));
    assert!(cloud.leftovers("bad", &s.id).is_empty());
}

#[tokio::test]
async fn hosts_down_or_disabled_are_not_chosen() {
    let mut cloud = Cloud::start().await;
    cloud.start_agent("up").await;
    cloud.start_agent("off").await;
    cloud.start_agent("gone").await;
    cloud.set_host("off", false).await;
    cloud.kill_agent("gone");
    let hosts = cloud.hosts();
    wait_for("host gone down", WAIT, || {
        let mut h = hosts.clone();
        async move {
            let g = h
                .get_host(req(
                    pb::HostRef {
                        name: "gone".into(),
                    },
                    &admin(),
                ))
                .await
                .map_err(|e| e.to_string())?;
            if g.get_ref().up {
                Err("still up".into())
            } else {
                Ok(())
            }
        }
    })
    .await;
    for i in 0..3 {
        let s = cloud.create(&member_a(), &format!("s{i}"), "m1.tiny").await;
        let a = cloud.wait_vm(&s.id, "active").await;
        assert_eq!(a.host, "up");
    }
}

#[tokio::test]
async fn two_scheduler_replicas_fill_the_hosts_exactly_without_over_commit() {
    let mut cloud = Cloud::start_with(Options {
        schedulers: 2,
        ..Default::default()
    })
    .await;
    unlimited(&cloud).await;
    for h in ["h1", "h2", "h3"] {
        cloud.start_agent(h).await;
    }
    // 3 hosts x 4 vCPUs = 12 one-vCPU servers fit; 16 are asked for at once,
    // half through each compute-api (and so each scheduler).
    let apis = [
        cloud.api.channel.clone(),
        cloud.api2.as_ref().unwrap().channel.clone(),
    ];
    let mut tasks = Vec::new();
    for i in 0..16 {
        let ch = apis[i % 2].clone();
        let image_id = cloud.image_id.clone();
        tasks.push(tokio::spawn(async move {
            proto::compute::v1::servers_client::ServersClient::new(ch)
                .create_server(req(
                    pb::CreateServerRequest {
                        name: format!("fill-{i}"),
                        flavor: "m1.tiny".into(),
                        image_id,
                        ..Default::default()
                    },
                    &member_a(),
                ))
                .await
                .unwrap()
                .into_inner()
                .id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let servers = cloud.servers();
        let s = wait_for("a settled server", WAIT, || {
            let mut c = servers.clone();
            let id = id.clone();
            async move {
                let s = c
                    .get_server(req(pb::ServerRef { id }, &admin()))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if (s.vm_state == "active" || s.vm_state == "error") && s.task_state.is_empty() {
                    Ok(s)
                } else {
                    Err(s.vm_state)
                }
            }
        })
        .await;
        *by_state.entry(s.vm_state.clone()).or_default() += 1;
        if s.vm_state == "active" {
            *per_host.entry(s.host.clone()).or_default() += 1;
        } else {
            assert_eq!(s.fault.unwrap().message, NO_VALID_HOST);
        }
    }
    assert_eq!(by_state.get("active"), Some(&12), "{by_state:?}");
    assert_eq!(by_state.get("error"), Some(&4), "{by_state:?}");
    assert_eq!(
        per_host.values().copied().collect::<Vec<_>>(),
        vec![4, 4, 4],
        "{per_host:?}"
    );
    let sql = cloud.sql().await;
    let over: i64 = sql
        .query_one(
            "SELECT count(*) FROM hosts WHERE vcpus_used > vcpus OR ram_mb_used > ram_mb",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(over, 0);
    assert_eq!(cloud.usage().await, (12, 12, 12 * 512, 12));
}

async fn group(cloud: &Cloud, policy: &str) -> String {
    ServerGroupsClient::new(cloud.api.channel.clone())
        .create_server_group(req(
            pb::CreateServerGroupRequest {
                name: policy.into(),
                policy: policy.into(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn create_in(cloud: &Cloud, name: &str, group: &str) -> String {
    cloud
        .servers()
        .create_server(req(
            pb::CreateServerRequest {
                name: name.into(),
                flavor: "m1.tiny".into(),
                image_id: cloud.image_id.clone(),
                server_group_id: group.into(),
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner()
        .id
}

#[tokio::test]
async fn anti_affinity_spreads_and_affinity_packs() {
    let mut cloud = Cloud::start().await;
    for h in ["h1", "h2", "h3"] {
        cloud.start_agent(h).await;
    }
    let anti = group(&cloud, "anti-affinity").await;
    // Created at once: the group lock makes the check exact.
    let (a, b, c) = tokio::join!(
        create_in(&cloud, "a1", &anti),
        create_in(&cloud, "a2", &anti),
        create_in(&cloud, "a3", &anti)
    );
    let mut hosts = HashSet::new();
    for id in [&a, &b, &c] {
        hosts.insert(cloud.wait_vm(id, "active").await.host);
    }
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    let fourth = create_in(&cloud, "a4", &anti).await;
    assert_eq!(
        cloud.wait_vm(&fourth, "error").await.fault.unwrap().message,
        NO_VALID_HOST
    );

    let aff = group(&cloud, "affinity").await;
    let mut hosts = HashSet::new();
    for i in 0..3 {
        let id = create_in(&cloud, &format!("f{i}"), &aff).await;
        hosts.insert(cloud.wait_vm(&id, "active").await.host);
    }
    assert_eq!(hosts.len(), 1, "{hosts:?}");
}

#[tokio::test]
async fn a_build_that_outlives_the_timeout_goes_to_error_and_releases_its_claim() {
    let mut cloud = Cloud::start_with(Options {
        build_timeout_secs: 2,
        ..Default::default()
    })
    .await;
    let mut cfg = cloud.agent_config("h1");
    cfg.faults.hang_at = Some("wait_vif_plugged".into());
    cloud.start_agent_with(cfg).await;
    let s = cloud.create(&member_a(), "slow", "m1.tiny").await;
    let e = cloud.wait_vm(&s.id, "error").await;
    assert_eq!(
        e.fault.unwrap().message,
        "Build of instance timed out after 2 seconds"
    );
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
}
