//! An outside client in another language: Python grpcio, learning the API by
//! reflection, uploads and downloads an image and checks its SHA-256.
//! Needs `python3` with `pip install grpcio grpcio-reflection`; the test
//! fails (does not skip) without them.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::image::v1 as pb;

#[tokio::test]
async fn python_grpcio_round_trips_an_image_with_matching_sha256() {
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

    let s = Server::start().await;
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new("python3")
            .args([script, &s.addr.to_string(), PROJECT_A])
            .output(),
    )
    .await
    .expect("the Python client finished within 180 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "round trip ok <id> <sha256>": check it against the service's record.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("round trip ok"))
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let (id, sum) = (words[3], words[4]);
    let img = s.get(&reader(), id).await.unwrap();
    assert_eq!(status_of(&img), pb::Status::Active);
    assert_eq!(img.sha256, sum);
    assert_eq!(img.owner, PROJECT_A);
    let back = s.download(&owner(), id, 0, None).await.unwrap();
    assert_eq!(sha256_hex(&back), sum);
}
