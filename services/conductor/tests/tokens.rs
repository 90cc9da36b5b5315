//! The user's token travels with the work (Nova serialises the request
//! context, token included, into its RPC messages): the `build` cast that
//! the scheduler sends, the `build` cast of a reschedule, and the actions'
//! casts carry the token of the user who asked, so that the host calls
//! image, network and volume as that user. Hosts here are played by the
//! test through conductor (as the agent's SPIFFE id), and the casts are
//! read from the queue as a host would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use proto::compute::v1 as pb;
use proto::conductor::v1 as cpb;
use proto::conductor::v1::conductor_client::ConductorClient;
use proto::queue::v1 as qpb;
use runtime::testing::{req, workload};

fn agent(host: &str) -> runtime::caller::Caller {
    workload(&format!(
        "spiffe://cirrus.local/svc/compute-agent/host/{host}"
    ))
}

/// A request as the caller's sidecar forwards it: trusted headers plus the
/// caller's own `authorization`.
fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = req(msg, &member_a());
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// The next cast on `compute.<host>`, acked, as JSON.
async fn next_cast(sub: &mut queue_client::Subscription, host: &str) -> serde_json::Value {
    let d = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no cast on compute.{host} within {WAIT:?}"))
        .expect("subscription ended")
        .expect("delivery");
    d.ack().await.unwrap();
    d.json().unwrap()
}

#[tokio::test]
async fn every_cast_to_a_host_carries_the_token_of_the_user_who_asked() {
    let cloud = Cloud::start().await;
    let mut conductor = ConductorClient::new(cloud.conductor.channel.clone());
    let queue =
        queue_client::Client::connect_lazy(&format!("http://{}", cloud.queue.addr)).unwrap();
    // Two hosts whose agents the test plays: h9 better than h8 (more RAM).
    for (h, ram) in [("h9", 8192), ("h8", 4096)] {
        queue
            .ensure_topic(&format!("compute.{h}"), qpb::TopicSettings::default())
            .await
            .unwrap();
        conductor
            .heartbeat(req(
                cpb::HeartbeatRequest {
                    host: h.into(),
                    vcpus: 4,
                    ram_mb: ram,
                    disk_gb: 40,
                    cpu_allocation_ratio: 1.0,
                    ram_allocation_ratio: 1.0,
                    disk_allocation_ratio: 1.0,
                    architecture: "x86_64".into(),
                    hypervisor_type: "test".into(),
                    ..Default::default()
                },
                &agent(h),
            ))
            .await
            .unwrap();
    }
    let mut h9 = queue.subscribe("compute.h9", "test");
    let mut h8 = queue.subscribe("compute.h8", "test");

    let s = cloud
        .servers()
        .create_server(with_token(
            pb::CreateServerRequest {
                name: "t".into(),
                flavor: "m1.tiny".into(),
                image_id: cloud.image_id.clone(),
                ..Default::default()
            },
            "user-token-1",
        ))
        .await
        .unwrap()
        .into_inner();
    let build = next_cast(&mut h9, "h9").await;
    assert_eq!(
        build,
        serde_json::json!({"op": "build", "server_id": s.id, "attempt": 1, "token": "user-token-1"})
    );

    // h9 fails the build (reschedulable) and hands the token back: the
    // next host's build carries it.
    let out = conductor
        .report_build_result(req(
            cpb::ReportBuildResultRequest {
                id: s.id.clone(),
                attempt: 1,
                ok: false,
                fault_code: 500,
                fault_message: "injected".into(),
                reschedulable: true,
                token: "user-token-1".into(),
                ..Default::default()
            },
            &agent("h9"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (out.outcome.as_str(), out.host.as_str()),
        ("rescheduled", "h8")
    );
    let rebuild = next_cast(&mut h8, "h8").await;
    assert_eq!(
        rebuild,
        serde_json::json!({"op": "build", "server_id": s.id, "attempt": 2, "token": "user-token-1"})
    );
    let out = conductor
        .report_build_result(req(
            cpb::ReportBuildResultRequest {
                id: s.id.clone(),
                attempt: 2,
                ok: true,
                power_state: "running".into(),
                ..Default::default()
            },
            &agent("h8"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.outcome, "active");

    // An action carries the token of whoever asked for it.
    cloud
        .servers()
        .stop_server(with_token(
            pb::ServerRef { id: s.id.clone() },
            "user-token-2",
        ))
        .await
        .unwrap();
    let stop = next_cast(&mut h8, "h8").await;
    assert_eq!(
        stop,
        serde_json::json!({"op": "stop", "server_id": s.id, "token": "user-token-2"})
    );
    // And the BuildSpec carries the image's properties for the host.
    let spec = conductor
        .get_build_spec(req(cpb::ServerRef { id: s.id.clone() }, &agent("h8")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        spec.image_properties
            .get("architecture")
            .map(String::as_str),
        Some("x86_64")
    );
}
