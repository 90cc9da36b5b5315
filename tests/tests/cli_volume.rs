//! The volume nouns of the CLI (`volume`, `snapshot`) against a cloud from
//! `cirrus up`: real binaries, real Postgres, real qemu-img, the public
//! endpoint through the catalog.
#![allow(clippy::unwrap_used)]

use tests::*;

#[tokio::test]
async fn volumes_and_snapshots_by_name() {
    let cloud = Cloud::up_on("test", &[]).await;

    // An empty volume, waited for.
    let v = json(
        &cloud,
        &[
            "volume",
            "create",
            "data",
            "--size",
            "1",
            "--wait",
            "--property",
            "tier=gold",
        ],
    )
    .await;
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(v["size"], "1");
    assert_eq!(v["properties"], "tier=gold");
    let id = v["id"].as_str().unwrap().to_string();
    let names = cloud
        .admin_ok(&[
            "volume", "list", "-f", "value", "-c", "Name", "-c", "Status",
        ])
        .await;
    assert!(names.lines().any(|l| l == "data available"), "{names}");
    assert_eq!(
        json(&cloud, &["volume", "show", "data"]).await["id"],
        id.as_str()
    );

    // Extend by name; it is available again at the new size.
    cloud
        .admin_ok(&["volume", "extend", "data", "--size", "2"])
        .await;
    until(&cloud, &["volume", "show", "data"], |v| {
        v["status"] == "available" && v["size"] == "2"
    })
    .await;

    // A snapshot of it, by the volume's name.
    let s = json(
        &cloud,
        &[
            "snapshot",
            "create",
            "data-snap",
            "--volume",
            "data",
            "--wait",
        ],
    )
    .await;
    assert_eq!(s["status"], "available", "{s}");
    assert_eq!(s["volume_id"], id.as_str());
    assert_eq!(s["size"], "2");
    let list = json(&cloud, &["snapshot", "list", "--volume", "data"]).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // A volume from the snapshot (its size by default).
    let copy = json(
        &cloud,
        &[
            "volume",
            "create",
            "copy",
            "--snapshot",
            "data-snap",
            "--wait",
        ],
    )
    .await;
    assert_eq!(copy["status"], "available", "{copy}");
    assert_eq!(copy["source_snapshot_id"], s["id"]);
    assert_eq!(copy["size"], "2");

    // What a user gets wrong: one line each, non-zero.
    let err = fails(&cloud, &["volume", "create", "x", "--image", "nosuch"]).await;
    assert_eq!(err.trim(), "cirrus: NOT_FOUND: no image named \"nosuch\"");
    let err = fails(&cloud, &["volume", "create", "x"]).await;
    assert!(err.contains("--size is required"), "{err}");
    let err = fails(&cloud, &["volume", "show", "nosuch"]).await;
    assert_eq!(err.trim(), "cirrus: NOT_FOUND: no volume named \"nosuch\"");
    let err = fails(&cloud, &["volume", "extend", "data", "--size", "1"]).await;
    assert!(err.starts_with("cirrus: INVALID_ARGUMENT"), "shrink: {err}");
    let err = fails(&cloud, &["volume", "delete", "data"]).await;
    assert!(
        err.starts_with("cirrus: FAILED_PRECONDITION"),
        "has a snapshot: {err}"
    );
    let err = fails(&cloud, &["snapshot", "create", "x", "--volume", "nosuch"]).await;
    assert!(err.contains("no volume named \"nosuch\""), "{err}");

    // Tear down by name; the names are gone.
    cloud.admin_ok(&["volume", "delete", "copy"]).await;
    cloud.admin_ok(&["snapshot", "delete", "data-snap"]).await;
    until(&cloud, &["snapshot", "list", "--volume", "data"], |l| {
        l.as_array().is_some_and(|a| a.is_empty())
    })
    .await;
    let out = cloud.admin_ok(&["volume", "delete", "data"]).await;
    assert!(out.contains("deleted volume data"), "{out}");
    until(&cloud, &["volume", "list"], |l| {
        l.as_array()
            .is_some_and(|a| a.iter().all(|v| v["name"] != "data" && v["name"] != "copy"))
    })
    .await;
    cloud.down().await;
}
