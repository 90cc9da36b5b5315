//! An outside client in another language: Python grpcio, learning compute.v1
//! by reflection, creates a server and watches it become active, then
//! deletes it. Needs `python3` with `pip install grpcio grpcio-reflection`;
//! the test fails (does not skip) without them.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn python_grpcio_creates_a_server_and_watches_it_become_active() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/outside_client.py");
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection"])
        .output()
        .await
        .expect("python3 is required for this test");
    assert!(
        probe.status.success(),
        "python3 lacks grpcio: run `pip install grpcio grpcio-reflection` ({})",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let mut cloud = Cloud::start().await;
    cloud.start_agent("h1").await;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .args([
                script,
                &cloud.api.addr.to_string(),
                runtime::testing::PROJECT_A,
                &cloud.image_id,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finished within 120 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("watch active/- power=running"), "{stdout}");
    assert!(stdout.contains("watch building/spawning"), "{stdout}");
    assert!(stdout.trim_end().ends_with("OK"), "{stdout}");
    assert_eq!(cloud.usage().await, (0, 0, 0, 0));
}
