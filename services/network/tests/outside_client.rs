//! An outside client: grpcurl, learning the API by reflection, creates a
//! network, a subnet and a port (with the headers a sidecar would set), and
//! the port it gets has an address of the subnet. Needs `grpcurl` (see
//! scripts/setup.sh); fails, never skips, without it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use runtime::testing::PROJECT_A;

async fn grpcurl(addr: &str, method: &str, body: &str) -> serde_json::Value {
    let project = format!("x-cirrus-project-id: {PROJECT_A}");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new("grpcurl")
            .args([
                "-plaintext",
                "-H",
                "x-cirrus-user-id: alice-id",
                "-H",
                &project,
                "-H",
                "x-cirrus-roles: member,reader",
                "-H",
                "x-cirrus-peer: external",
                "-d",
                body,
                addr,
                method,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("grpcurl finished within 60 s")
    .expect("grpcurl is required for this test (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "grpcurl {method} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn grpcurl_creates_a_network_a_subnet_and_a_port() {
    let cloud = Cloud::start(1).await;
    let addr = cloud.replicas[0].addr.to_string();
    let net = grpcurl(
        &addr,
        "network.v1.Networks/CreateNetwork",
        r#"{"name": "from-grpcurl"}"#,
    )
    .await;
    let net_id = net["id"].as_str().unwrap().to_string();
    assert_eq!(net["mtu"], 1450);
    let body = format!(r#"{{"network_id": "{net_id}", "cidr": "192.168.7.0/24"}}"#);
    let subnet = grpcurl(&addr, "network.v1.Networks/CreateSubnet", &body).await;
    assert_eq!(subnet["gatewayIp"], "192.168.7.1");
    assert_eq!(subnet["allocationPools"][0]["start"], "192.168.7.2");
    let body = format!(r#"{{"network_id": "{net_id}", "name": "p"}}"#);
    let port = grpcurl(&addr, "network.v1.Networks/CreatePort", &body).await;
    let ip = port["fixedIps"][0]["ipAddress"].as_str().unwrap();
    assert!(ip.starts_with("192.168.7."), "{port}");
    assert_eq!(port["status"], "DOWN");
    assert!(
        port["macAddress"]
            .as_str()
            .unwrap()
            .starts_with("fa:16:3e:")
    );
}
