//! Port status events reach the queue's `network.port` topic through the
//! outbox: one message per change (port id, device id, status), written in
//! the transaction that changed the status, relayed after commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::network::v1 as pb;
use proto::network::v1::agents_client::AgentsClient;
use runtime::testing::{Served, member_a, req, workload};

#[tokio::test]
async fn status_changes_are_published_to_network_port_once_each() {
    let db = runtime::db::TestDatabase::create().await.unwrap();
    let mut qc = queue::Config::default();
    qc.server.listen = "127.0.0.1:0".parse().unwrap();
    qc.server.metrics_listen = None;
    qc.database.url = db.url.clone();
    qc.database.pool_size = 4;
    qc.committers = 1;
    // No sidecar here: direct calls are trusted (loopback test only).
    qc.trust_direct_callers = true;
    qc.poll_interval_ms = 100;
    let q = Served::spawn(move |l, s| queue::run(qc, l, s)).await;
    let queue_url = format!("http://{}", q.addr);
    let cloud = Cloud::start_with(1, |c| c.queue_url = queue_url.clone()).await;
    let a = member_a();
    let net = cloud.network(&a, "events").await;
    cloud.subnet(&a, &net.id, "10.90.0.0/24").await;
    let p = cloud.port(&a, &net.id, None, &[]).await;

    let h1 = workload("spiffe://cirrus.local/svc/network-agent/host/h1");
    let mut agents = AgentsClient::new(cloud.replicas[0].channel.clone());
    agents
        .heartbeat(req(pb::HeartbeatRequest::default(), &h1))
        .await
        .unwrap();
    cloud.bind(&via(&a, "h1"), &p.id, "h1").await.unwrap();
    let report = |wired: bool| pb::ReportPortsRequest {
        ports: vec![pb::PortReport {
            port_id: p.id.clone(),
            wired,
        }],
    };
    agents.report_ports(req(report(true), &h1)).await.unwrap();
    // Reporting the same state again changes nothing and publishes nothing.
    agents.report_ports(req(report(true), &h1)).await.unwrap();
    agents.report_ports(req(report(false), &h1)).await.unwrap();

    let client = queue_client::Client::connect_lazy(&format!("http://{}", q.addr)).unwrap();
    // The relay makes the topic; wait for it, then read from the start.
    let mut sub = None;
    for _ in 0..100 {
        let mut s = client.subscribe("network.port", "test");
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(d))) => {
                sub = Some((s, d));
                break;
            }
            Ok(Some(Err(e))) if e.code() == tonic::Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!(
                "no first event: {:?}",
                other.map(|o| o.map(|r| r.map(|d| d.message_id.clone())))
            ),
        }
    }
    let (mut sub, first) = sub.expect("the network.port topic within 10 s");
    // Events of one port come in order, the next after the previous is acked.
    let mut events: Vec<serde_json::Value> = vec![first.json().unwrap()];
    first.ack().await.unwrap();
    while events.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        events.push(d.json().unwrap());
        d.ack().await.unwrap();
    }
    for (e, status) in events.iter().zip(["ACTIVE", "DOWN"]) {
        assert_eq!(e["port_id"], p.id.as_str(), "{events:?}");
        assert_eq!(e["device_id"], p.device_id.as_str());
        assert_eq!(e["status"], status, "{events:?}");
    }
    // Nothing more (the repeated report published nothing), and the outbox is empty.
    let more = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        more.is_err(),
        "an extra event: {:?}",
        more.map(|m| m.map(|r| r.map(|d| String::from_utf8_lossy(&d.payload).into_owned())))
    );
    let net_state = network::repo::outbox_len(
        &runtime::db::pool(&cloud.db.url, "network", 1)
            .unwrap()
            .get()
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(net_state, 0);
    drop(db);
}
