//! `cirrus up` supervises its children (issue 12 item 5): a child killed
//! with SIGKILL comes back and the cloud answers again; a child that keeps
//! failing stops the cloud with the tail of its log.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use runtime::db::TestDatabase;
use tests::*;

fn process<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

async fn kill9(pid: &str) {
    let s = tokio::process::Command::new("kill")
        .args(["-9", pid])
        .status()
        .await
        .unwrap();
    assert!(s.success());
}

#[tokio::test]
async fn a_killed_service_is_restarted_and_the_cloud_answers() {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::up(&[("CIRRUS_DATABASE_URL", db.url.as_str())]).await;
    let before = cloud.status().await;
    let c = &cloud;

    // identity: every login goes through it; image-sidecar: a mesh process.
    for name in ["identity", "image-sidecar"] {
        let pid = process(&before, name)["pid"].as_str().unwrap().to_string();
        kill9(&pid).await;
        let old = pid.as_str();
        let now = eventually(
            Duration::from_secs(30),
            &format!("{name} restarted"),
            || async move {
                let s = c.status().await;
                let p = process(&s, name);
                let back = p["state"] == "running" && p["restarts"] == "1" && p["pid"] != old;
                if back {
                    Ok(p.clone())
                } else {
                    Err(s.to_string())
                }
            },
        )
        .await;
        assert!(now["last_exit"].as_str().unwrap().contains("9"), "{now}");
        let log = std::fs::read_to_string(now["log"].as_str().unwrap()).unwrap();
        assert!(log.contains("cirrus up: restart 1"), "{log}");
    }

    // The cloud answers again, through the restarted processes.
    let token = eventually(
        Duration::from_secs(30),
        "a token from the restarted identity",
        || async move {
            let o = c
                .admin(&["token", "issue", "-f", "value", "-c", "token"])
                .await;
            if o.status.success() {
                Ok(stdout(&o))
            } else {
                Err(stderr(&o))
            }
        },
    )
    .await;
    assert!(token.starts_with("v4.public."), "{token}");
    cloud.admin_ok(&["user", "show", "admin"]).await;
    let (_, _, image_public, _) = cloud.ports("image");
    // image serves only its Unix socket; its config names it.
    let config = format!("{}/image.toml", cloud.dir());
    let o = run("image", &["--config", &config, "healthcheck"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", image_public))
            .await
            .is_ok(),
        "image's restarted sidecar does not listen"
    );
    // Everything else kept running, unrestarted.
    let after = cloud.status().await;
    for p in after.as_array().unwrap() {
        let expected = if ["identity", "image-sidecar"].contains(&p["name"].as_str().unwrap()) {
            "1"
        } else {
            "0"
        };
        assert_eq!(p["restarts"], expected, "{after}");
        assert_eq!(p["state"], "running", "{after}");
    }
    cloud.down().await;
}

#[tokio::test]
async fn a_service_that_keeps_failing_stops_the_cloud_with_its_log() {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::up(&[("CIRRUS_DATABASE_URL", db.url.as_str())]).await;

    // From now on image cannot start: its config names a key it does not know.
    let conf = format!("{}/image.toml", cloud.dir());
    std::fs::write(&conf, "no_such_key = 1\n").unwrap();
    let pid = process(&cloud.status().await, "image")["pid"]
        .as_str()
        .unwrap()
        .to_string();
    kill9(&pid).await;

    // `cirrus up` removes its pid file once it has stopped everything.
    let pid_file = &std::path::PathBuf::from(format!("{}/up.pid", cloud.dir()));
    eventually(
        Duration::from_secs(60),
        "cirrus up gave up on image",
        || async move {
            if pid_file.exists() {
                Err(format!("{} still there", pid_file.display()))
            } else {
                Ok(())
            }
        },
    )
    .await;
    let log = std::fs::read_to_string(format!("{}/logs/up.log", cloud.dir())).unwrap();
    assert!(
        log.contains("image keeps failing (5 exits within 60 s"),
        "{log}"
    );
    assert!(
        log.contains("no_such_key"),
        "the image log's tail is printed: {log}"
    );
    assert!(log.contains("restarting it in"), "{log}");
    // Every other process was stopped with it.
    let (identity, ..) = cloud.ports("identity");
    let o = run(
        "identity",
        &["healthcheck", &format!("127.0.0.1:{identity}")],
        &[],
    )
    .await;
    assert!(
        !o.status.success(),
        "identity still answers after the cloud stopped"
    );
}
