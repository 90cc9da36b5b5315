//! The network nouns of the CLI (`network`, `subnet`, `port`,
//! `security-group`) against a cloud from `cirrus up`: real binaries, real
//! Postgres, the public endpoint through the catalog.
#![allow(clippy::unwrap_used)]

use tests::*;

#[tokio::test]
async fn networks_subnets_ports_and_security_groups_by_name() {
    let cloud = Cloud::up_on("test", &[]).await;

    // A network, by name from then on.
    let net = json(&cloud, &["network", "create", "blue"]).await;
    let net_id = net["id"].as_str().unwrap().to_string();
    assert_eq!(net["name"], "blue");
    let names = cloud
        .admin_ok(&["network", "list", "-f", "value", "-c", "Name"])
        .await;
    assert!(names.lines().any(|l| l == "blue"), "{names}");
    let shown = json(&cloud, &["network", "show", "blue"]).await;
    assert_eq!(shown["id"], net_id.as_str());

    // A subnet on it, named by the network's name.
    let sub = json(
        &cloud,
        &[
            "subnet",
            "create",
            "blue-sub",
            "--network",
            "blue",
            "--subnet-range",
            "10.77.0.0/24",
            "--dns-nameserver",
            "10.77.0.53",
        ],
    )
    .await;
    assert_eq!(sub["network_id"], net_id.as_str());
    assert_eq!(sub["subnet"], "10.77.0.0/24");
    assert_eq!(sub["gateway_ip"], "10.77.0.1");
    assert_eq!(sub["dns_nameservers"], "10.77.0.53");
    let subs = json(&cloud, &["subnet", "list", "--network", "blue"]).await;
    assert_eq!(subs.as_array().unwrap().len(), 1, "{subs}");
    assert_eq!(
        json(&cloud, &["subnet", "show", "blue-sub"]).await["id"],
        sub["id"]
    );

    // A security group and a rule, by the group's name.
    let sg = json(&cloud, &["security-group", "create", "web"]).await;
    let rule = json(
        &cloud,
        &[
            "security-group",
            "rule",
            "create",
            "web",
            "--protocol",
            "tcp",
            "--dst-port",
            "8000:8080",
            "--remote-ip",
            "192.0.2.0/24",
        ],
    )
    .await;
    assert_eq!(rule["security_group_id"], sg["id"]);
    assert_eq!(rule["direction"], "ingress");
    assert_eq!(rule["protocol"], "tcp");
    assert_eq!(rule["port_range"], "8000:8080");
    let rules = json(&cloud, &["security-group", "show", "web"]).await["rules"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        rules.contains("ingress tcp port 8000:8080 192.0.2.0/24"),
        "{rules}"
    );

    // A port with a fixed address of the subnet, in the group.
    let port = json(
        &cloud,
        &[
            "port",
            "create",
            "blue-p1",
            "--network",
            "blue",
            "--subnet",
            "blue-sub",
            "--ip-address",
            "10.77.0.20",
            "--security-group",
            "web",
        ],
    )
    .await;
    assert_eq!(port["fixed_ip_addresses"], "10.77.0.20");
    assert_eq!(port["security_groups"], sg["id"]);
    assert_eq!(port["status"], "DOWN", "unbound: {port}");
    let p = json(&cloud, &["port", "show", "blue-p1"]).await;
    assert_eq!(p["id"], port["id"]);
    let ports = cloud
        .admin_ok(&[
            "port",
            "list",
            "--network",
            "blue",
            "-f",
            "value",
            "-c",
            "Name",
        ])
        .await;
    assert!(ports.lines().any(|l| l == "blue-p1"), "{ports}");

    // What a user gets wrong: one line each, non-zero.
    let err = fails(&cloud, &["port", "create", "x", "--network", "nosuch"]).await;
    assert_eq!(err.trim(), "cirrus: NOT_FOUND: no network named \"nosuch\"");
    let err = fails(
        &cloud,
        &[
            "subnet",
            "create",
            "x",
            "--network",
            "blue",
            "--subnet-range",
            "nonsense",
        ],
    )
    .await;
    assert!(err.starts_with("cirrus: INVALID_ARGUMENT"), "{err}");
    let err = fails(&cloud, &["network", "delete", "blue"]).await;
    assert!(
        err.starts_with("cirrus: FAILED_PRECONDITION"),
        "in use: {err}"
    );
    let err = fails(
        &cloud,
        &[
            "security-group",
            "rule",
            "create",
            "web",
            "--protocol",
            "sctp",
        ],
    )
    .await;
    assert!(err.contains("tcp, udp, icmp or any"), "{err}");
    // Two networks of one name: the name is ambiguous, the ids are not.
    let twin_a = json(&cloud, &["network", "create", "twin"]).await;
    let twin_b = json(&cloud, &["network", "create", "twin"]).await;
    let err = fails(&cloud, &["network", "show", "twin"]).await;
    assert!(err.contains("2 networks are named \"twin\""), "{err}");
    assert!(err.contains(twin_a["id"].as_str().unwrap()), "{err}");
    for t in [&twin_a, &twin_b] {
        cloud
            .admin_ok(&["network", "delete", t["id"].as_str().unwrap()])
            .await;
    }

    // Tear down by name, in order; then the names are gone.
    cloud
        .admin_ok(&[
            "security-group",
            "rule",
            "delete",
            rule["id"].as_str().unwrap(),
        ])
        .await;
    let rules = json(&cloud, &["security-group", "show", "web"]).await;
    assert_eq!(rules["rules"], "", "{rules}");
    cloud.admin_ok(&["port", "delete", "blue-p1"]).await;
    cloud.admin_ok(&["security-group", "delete", "web"]).await;
    cloud.admin_ok(&["subnet", "delete", "blue-sub"]).await;
    let out = cloud.admin_ok(&["network", "delete", "blue"]).await;
    assert!(out.contains("deleted network blue"), "{out}");
    let err = fails(&cloud, &["network", "show", "blue"]).await;
    assert!(err.contains("NOT_FOUND"), "{err}");
    cloud.down().await;
}
