//! The compute nouns of the CLI (`server`, `flavor`, `keypair`,
//! `server-group`, `quota`, `host`) against a cloud from `cirrus up` whose
//! compute agent runs on libvirt's test driver: real binaries, real
//! Postgres, real sidecars. `server create --wait` follows `WatchServer`.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use runtime::db::TestDatabase;
use tests::*;

async fn up() -> (TestDatabase, Cloud) {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::new(&[("CIRRUS_DATABASE_URL", db.url.as_str())]);
    let o = cloud.start_with(&["--driver", "test"]).await;
    assert!(o.status.success(), "up: {}{}", stdout(&o), stderr(&o));
    // The agent's host is up (heartbeating) before anything is placed.
    let host = cloud.host.clone();
    until(&cloud, &["host", "list"], |l| {
        l.as_array().is_some_and(|a| {
            a.iter()
                .any(|h| h["name"] == host.as_str() && h["up"] == "true")
        })
    })
    .await;
    (db, cloud)
}

/// No network: on libvirt's test driver no port of a guest is ever wired
/// (there is no tap for the network agent to see), so a build with a port
/// waits for its vif in vain; ports are the network tests' and the real
/// guests' business.
const BOOT: [&str; 4] = ["--flavor", "m1.tiny", "--image", "cirrus-tiny"];

#[tokio::test]
async fn a_server_built_watched_acted_on_and_deleted() {
    let (_db, cloud) = up().await;

    // create --wait: live progress from WatchServer, exit 0 on active.
    let mut args = vec!["server", "create", "web1", "--wait"];
    args.extend(BOOT);
    let o = cloud.admin(&args).await;
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("server web1: vm_state building, task_state scheduling"),
        "{out}"
    );
    assert!(
        out.contains("server web1: vm_state active, task_state none"),
        "{out}"
    );
    // The building lines come before the active one; then the server's table.
    let first_active = out.find("vm_state active").unwrap();
    assert!(
        out.find("vm_state building").unwrap() < first_active,
        "{out}"
    );
    assert!(out[first_active..].contains("│ Status"), "{out}");

    let s = json(&cloud, &["server", "show", "web1"]).await;
    assert_eq!(s["status"], "active");
    assert_eq!(s["power_state"], "running");
    assert_eq!(s["host"], cloud.host.as_str());
    let list = cloud
        .admin_ok(&[
            "server", "list", "-f", "value", "-c", "Name", "-c", "Status",
        ])
        .await;
    assert!(list.lines().any(|l| l == "web1 active"), "{list}");

    // The actions, by name; each lands in its state.
    for (verb, extra, state) in [
        ("stop", None, "stopped"),
        ("start", None, "active"),
        ("pause", None, "paused"),
        ("unpause", None, "active"),
        ("suspend", None, "suspended"),
        ("resume", None, "active"),
        ("reboot", Some("--hard"), "active"),
        ("reboot", None, "active"),
    ] {
        let mut a = vec!["server", verb, "web1"];
        a.extend(extra);
        cloud.admin_ok(&a).await;
        until(&cloud, &["server", "show", "web1"], |s| {
            s["status"] == state && s["task_state"] == ""
        })
        .await;
    }
    // An action refused in the current state: one line naming the state.
    cloud.admin_ok(&["server", "stop", "web1"]).await;
    until(&cloud, &["server", "show", "web1"], |s| {
        s["status"] == "stopped" && s["task_state"] == ""
    })
    .await;
    let err = fails(&cloud, &["server", "pause", "web1"]).await;
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cirrus: FAILED_PRECONDITION"), "{err}");
    assert!(err.contains("stopped"), "{err}");
    cloud.admin_ok(&["server", "console-log", "web1"]).await;

    // The quota counts it.
    let q = json(&cloud, &["quota", "show"]).await;
    assert_eq!(q["instances_used"], "1", "{q}");

    // delete --wait: returns once the server is gone.
    let o = cloud.admin(&["server", "delete", "web1", "--wait"]).await;
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("deleted server web1"), "{}", stdout(&o));
    let err = fails(&cloud, &["server", "show", "web1"]).await;
    assert_eq!(err.trim(), "cirrus: NOT_FOUND: no server named \"web1\"");
    let q = json(&cloud, &["quota", "show"]).await;
    assert_eq!(q["instances_used"], "0", "{q}");
    cloud.down().await;
}

#[tokio::test]
async fn what_a_user_gets_wrong_and_a_build_that_fails() {
    let (_db, cloud) = up().await;

    // Unknown names: one line each, non-zero, nothing made.
    for (swap, (flag, bad), expect) in [
        (1, ("--flavor", "m1.nosuch"), "cirrus: NOT_FOUND"),
        (
            3,
            ("--image", "nosuch"),
            "cirrus: NOT_FOUND: no image named \"nosuch\"",
        ),
        (
            5,
            ("--network", "nosuch"),
            "cirrus: NOT_FOUND: no network named \"nosuch\"",
        ),
    ] {
        let mut boot = BOOT.to_vec();
        boot.extend(["--network", "default"]);
        assert_eq!(boot[swap - 1], flag);
        boot[swap] = bad;
        let mut args = vec!["server", "create", "bad", "--wait"];
        args.extend(boot);
        let err = fails(&cloud, &args).await;
        assert_eq!(err.lines().count(), 1, "{flag}: {err}");
        assert!(err.starts_with(expect), "{flag}: {err}");
    }
    let list = json(&cloud, &["server", "list"]).await;
    assert_eq!(list, serde_json::json!([]), "nothing made: {list}");

    // A flavor no host can hold: --wait ends non-zero with the fault.
    json(
        &cloud,
        &[
            "flavor", "create", "huge", "--vcpus", "1", "--ram", "64", "--disk", "100000",
        ],
    )
    .await;
    let mut args = vec!["server", "create", "big", "--wait"];
    args.extend(BOOT);
    args[5] = "huge";
    let o = cloud.admin(&args).await;
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("cirrus: server big is in error: fault "),
        "{err}"
    );
    assert!(err.to_lowercase().contains("no valid host"), "{err}");
    assert!(stdout(&o).contains("vm_state error"), "{}", stdout(&o));
    let s = json(&cloud, &["server", "show", "big"]).await;
    assert_eq!(s["status"], "error");
    assert!(
        s["fault"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("no valid host")
    );

    // A disabled host is not chosen either; enabled again, it is.
    let host = cloud.host.clone();
    let h = json(
        &cloud,
        &["host", "set", &host, "--disable", "--reason", "maintenance"],
    )
    .await;
    assert_eq!(h["enabled"], "false");
    assert_eq!(h["disabled_reason"], "maintenance");
    let mut args = vec!["server", "create", "later", "--wait"];
    args.extend(BOOT);
    let err = fails(&cloud, &args).await;
    assert!(err.to_lowercase().contains("no valid host"), "{err}");
    let h = json(&cloud, &["host", "set", &host, "--enable"]).await;
    assert_eq!(h["enabled"], "true");
    let err = fails(&cloud, &["host", "set", &host]).await;
    assert!(err.contains("--enable or --disable"), "{err}");

    // Two servers of one name: the name is ambiguous, the ids are not.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut args = vec!["server", "create", "twin"];
        args.extend(BOOT);
        ids.push(
            json(&cloud, &args).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let err = fails(&cloud, &["server", "show", "twin"]).await;
    assert!(err.contains("2 servers are named \"twin\""), "{err}");
    for id in &ids {
        cloud.admin_ok(&["server", "delete", id, "--wait"]).await;
    }
    for name in ["big", "later"] {
        cloud.admin_ok(&["server", "delete", name, "--wait"]).await;
    }
    cloud.admin_ok(&["flavor", "delete", "huge"]).await;
    cloud.down().await;
}

#[tokio::test]
async fn flavors_keypairs_server_groups_and_quotas() {
    let (_db, cloud) = up().await;

    let names = cloud
        .admin_ok(&["flavor", "list", "-f", "value", "-c", "Name"])
        .await;
    for f in ["m1.tiny", "m1.small"] {
        assert!(names.lines().any(|l| l == f), "{names}");
    }
    let f = json(
        &cloud,
        &[
            "flavor",
            "create",
            "c1.odd",
            "--vcpus",
            "3",
            "--ram",
            "768",
            "--disk",
            "5",
            "--property",
            "hw:cpu_policy=shared",
        ],
    )
    .await;
    assert_eq!(f["vcpus"], "3");
    assert_eq!(f["properties"], "hw:cpu_policy=shared");
    assert_eq!(
        json(&cloud, &["flavor", "show", "c1.odd"]).await["id"],
        f["id"]
    );
    cloud.admin_ok(&["flavor", "delete", "c1.odd"]).await;
    let err = fails(&cloud, &["flavor", "show", "c1.odd"]).await;
    assert!(err.starts_with("cirrus: NOT_FOUND"), "{err}");

    // A generated pair: the private key goes to a 0600 file, once.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k1");
    let key_path = key_file.to_str().unwrap();
    let k1 = json(
        &cloud,
        &["keypair", "create", "k1", "--private-key-file", key_path],
    )
    .await;
    assert_eq!(k1["type"], "ssh-ed25519");
    let private = std::fs::read_to_string(&key_file).unwrap();
    assert!(private.contains("BEGIN OPENSSH PRIVATE KEY"), "{private}");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Printed when no file is given.
    let k2 = json(&cloud, &["keypair", "create", "k2"]).await;
    assert!(
        k2["private_key"]
            .as_str()
            .unwrap()
            .contains("BEGIN OPENSSH PRIVATE KEY"),
        "{k2}"
    );
    // Imported: k1's public half under another name, same fingerprint.
    let pub_file = dir.path().join("k1.pub");
    std::fs::write(&pub_file, k1["public_key"].as_str().unwrap()).unwrap();
    let k3 = json(
        &cloud,
        &[
            "keypair",
            "import",
            "k3",
            "--public-key",
            pub_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(k3["fingerprint"], k1["fingerprint"]);
    let keys = cloud
        .admin_ok(&["keypair", "list", "-f", "value", "-c", "Name"])
        .await;
    for k in ["k1", "k2", "k3"] {
        assert!(keys.lines().any(|l| l == k), "{keys}");
    }
    std::fs::write(&pub_file, "ssh-ed25519 not-base64").unwrap();
    let err = fails(
        &cloud,
        &[
            "keypair",
            "import",
            "bad",
            "--public-key",
            pub_file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(err.starts_with("cirrus: INVALID_ARGUMENT"), "{err}");

    // A server group, by name, with a server in it that carries the key.
    let g = json(
        &cloud,
        &[
            "server-group",
            "create",
            "spread",
            "--policy",
            "anti-affinity",
        ],
    )
    .await;
    assert_eq!(g["policy"], "anti-affinity");
    let mut args = vec![
        "server",
        "create",
        "member",
        "--wait",
        "--server-group",
        "spread",
        "--key-name",
        "k1",
    ];
    args.extend(BOOT);
    cloud.admin_ok(&args).await;
    let s = json(&cloud, &["server", "show", "member"]).await;
    assert_eq!(s["server_group_id"], g["id"]);
    assert_eq!(s["key_name"], "k1");
    let g = json(&cloud, &["server-group", "show", "spread"]).await;
    assert_eq!(g["members"], s["id"]);
    let q = json(&cloud, &["quota", "show", "--project", "admin"]).await;
    assert_eq!(q["instances_used"], "1", "{q}");
    assert_eq!(q["cores_used"], "1", "{q}");
    cloud
        .admin_ok(&["server", "delete", "member", "--wait"])
        .await;
    cloud.admin_ok(&["server-group", "delete", "spread"]).await;
    let groups = json(&cloud, &["server-group", "list"]).await;
    assert_eq!(groups, serde_json::json!([]));
    for k in ["k1", "k2", "k3"] {
        cloud.admin_ok(&["keypair", "delete", k]).await;
    }
    cloud.down().await;
}
