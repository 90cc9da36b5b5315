//! `cirrus up` as a newcomer runs it, then the CLI as an operator uses it,
//! then `cirrus down`; all real processes against a real Postgres.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use runtime::db::TestDatabase;
use tests::*;

#[tokio::test]
async fn up_login_administer_and_down() {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::up(&[("CIRRUS_DATABASE_URL", db.url.as_str())]).await;
    let (identity_port, _, public_port, metrics) = cloud.ports("identity");

    // A second `up` on the same state refuses politely.
    let o = cloud.start().await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));

    // The admin's profile works: issue a token, as JSON.
    let t: serde_json::Value =
        serde_json::from_str(&cloud.admin_ok(&["token", "issue", "-f", "json"]).await).unwrap();
    assert!(t["token"].as_str().unwrap().starts_with("v4.public."));
    assert!(t["roles"].as_str().unwrap().contains("admin"));

    // Administer: a user, a project, a role assignment.
    for args in [
        vec!["user", "create", "alice", "--password", "alice-pw"],
        vec!["project", "create", "demo"],
        vec![
            "role",
            "add",
            "--user",
            "alice",
            "--project",
            "demo",
            "member",
        ],
    ] {
        cloud.admin_ok(&args).await;
    }
    let users = cloud.admin_ok(&["user", "list"]).await;
    assert!(
        users.contains("alice") && users.contains("admin"),
        "{users}"
    );
    let catalog = cloud.admin_ok(&["catalog"]).await;
    for svc in CATALOG {
        assert!(
            catalog.contains(svc),
            "{svc} missing from the catalog: {catalog}"
        );
    }
    assert!(catalog.contains("https://127.0.0.1"), "{catalog}");

    // The operator certificate reaches the internal (mTLS) endpoint.
    let internal = format!("{}/admin-internal.toml", cloud.dir());
    let o = run(
        "cirrus",
        &["key", "list"],
        &[("CIRRUS_PROFILE", internal.as_str())],
    )
    .await;
    assert!(
        o.status.success() && stdout(&o).contains("primary"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );

    // Alice, by environment variables alone, may log in but not administer.
    let url = format!("https://127.0.0.1:{public_port}");
    let bundle = format!("{}/pki/bundle.pem", cloud.dir());
    let alice = [
        ("CIRRUS_PROFILE", "/nonexistent/profile.toml"),
        ("CIRRUS_URL", url.as_str()),
        ("CIRRUS_CA_CERT", bundle.as_str()),
        ("CIRRUS_USERNAME", "alice"),
        ("CIRRUS_PASSWORD", "alice-pw"),
        ("CIRRUS_PROJECT_NAME", "demo"),
    ];
    let o = run("cirrus", &["login"], &alice).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("member"), "{}", stdout(&o));
    let o = run("cirrus", &["user", "list"], &alice).await;
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one readable line: {err}");
    assert!(err.starts_with("cirrus: PERMISSION_DENIED"), "{err}");

    // Metrics are served on their own port.
    let body = http_get(metrics, "/metrics").await.unwrap();
    assert!(body.contains("identity_tokens_issued_total"), "{body}");

    // `cirrus status` lists every process, running, none restarted yet.
    let status = cloud.status().await;
    let names: Vec<&str> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2 * SERVICES.len(), "{status}");
    for svc in SERVICES {
        assert!(names.contains(&svc), "{status}");
        assert!(
            names.contains(&format!("{svc}-sidecar").as_str()),
            "{status}"
        );
    }
    for p in status.as_array().unwrap() {
        assert_eq!(p["state"], "running", "{status}");
        assert_eq!(p["restarts"], "0", "{status}");
        assert!(p["log"].as_str().unwrap().ends_with(".log"), "{status}");
    }

    // Down stops everything; the service no longer answers.
    cloud.down().await;
    let o = run(
        "identity",
        &["healthcheck", &format!("127.0.0.1:{identity_port}")],
        &[],
    )
    .await;
    assert!(!o.status.success(), "identity still answers after down");
    let o = run("cirrus", &["status", "--state-dir", cloud.dir()], &[]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not running"), "{}", stderr(&o));

    // A second `up` reuses the state: the same admin credentials still work.
    let o = cloud.start().await;
    assert!(
        o.status.success(),
        "second up: {}{}",
        stdout(&o),
        stderr(&o)
    );
    cloud.admin_ok(&["token", "issue"]).await;
    cloud.admin_ok(&["user", "show", "alice"]).await;
    cloud.down().await;
}

/// python-openstackclient's conventions: `-f value -c token` gives a script
/// the bare token; `-f shell` gives `eval`-able lines; `-c` picks columns of
/// any command; a table never shows a 900-character cell.
#[tokio::test]
async fn output_formats_and_columns_as_openstack_client() {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::up(&[("CIRRUS_DATABASE_URL", db.url.as_str())]).await;

    // TOKEN=$(cirrus token issue -f value -c token), then use it.
    let token = cloud
        .admin_ok(&["token", "issue", "-f", "value", "-c", "token"])
        .await;
    assert_eq!(token.lines().count(), 1, "{token}");
    let token = token.trim_end();
    assert!(
        token.starts_with("v4.public.") && !token.contains(' '),
        "{token}"
    );
    let url = format!("https://127.0.0.1:{}", cloud.ports("identity").2);
    let bundle = format!("{}/pki/bundle.pem", cloud.dir());
    let by_token = [
        ("CIRRUS_PROFILE", "/nonexistent/profile.toml"),
        ("CIRRUS_URL", url.as_str()),
        ("CIRRUS_CA_CERT", bundle.as_str()),
        ("CIRRUS_TOKEN", token),
    ];
    let o = run(
        "cirrus",
        &["user", "list", "-f", "value", "-c", "Name"],
        &by_token,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let names = stdout(&o);
    assert!(names.lines().any(|l| l == "admin"), "{names}");
    assert!(
        names.lines().all(|l| !l.contains(' ') && !l.contains('│')),
        "{names}"
    );

    // Several columns, in the table's order, space-separated per row.
    let roles = cloud
        .admin_ok(&["role", "list", "-f", "value", "-c", "name", "-c", "id"])
        .await;
    let admin_row = roles
        .lines()
        .find(|l| l.ends_with(" admin"))
        .unwrap_or_else(|| panic!("{roles}"));
    let id = admin_row.split(' ').next().unwrap();
    assert_eq!(admin_row, format!("{id} admin"), "{roles}");
    assert_eq!(id.len(), 36, "{roles}");

    // -f shell: name="value" lines, with --prefix.
    let shell = cloud
        .admin_ok(&["token", "issue", "-f", "shell", "--prefix", "os_"])
        .await;
    assert!(
        shell
            .lines()
            .any(|l| l.starts_with("os_token=\"v4.public.")),
        "{shell}"
    );
    assert!(
        shell
            .lines()
            .all(|l| l.starts_with("os_") && l.ends_with('"')),
        "{shell}"
    );
    let yaml = cloud
        .admin_ok(&["project", "show", "admin", "-f", "yaml", "-c", "name"])
        .await;
    assert_eq!(yaml, "name: \"admin\"\n");

    // The default table keeps its cells short and tells how to get a value whole.
    let o = cloud.admin(&["token", "issue"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(table.contains("token") && table.contains('…'), "{table}");
    assert!(table.lines().all(|l| l.chars().count() <= 120), "{table}");
    assert!(stderr(&o).contains("-f value -c"), "{}", stderr(&o));

    // An unknown column, and shell output of a list, are one clear line each.
    for (args, says) in [
        (
            vec!["user", "list", "-c", "nope"],
            "no column \"nope\"; the columns are ID, Name",
        ),
        (
            vec!["user", "list", "-f", "shell"],
            "-f shell prints one object",
        ),
    ] {
        let o = cloud.admin(&args).await;
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    cloud.down().await;
}

#[tokio::test]
async fn a_bad_config_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("identity.toml");
    let file = bad.to_str().unwrap();
    // (config file text, environment, what the one line names)
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(&str, Env, &str); 3] = [
        (
            "token_ttl_secs = \"an hour\"\n",
            &[],
            "invalid configuration",
        ),
        ("token_ttl_secs = 0\n", &[], "token_ttl_secs"),
        (
            "",
            &[("CIRRUS_SERVER__LISTEN", "not-an-address")],
            "server.listen",
        ),
    ];
    for (text, env, says) in cases {
        std::fs::write(&bad, text).unwrap();
        let o = run("identity", &["--config", file, "serve"], env).await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{text:?} {env:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.to_lowercase().contains(says), "{text:?} {env:?}: {err}");
    }

    let unreachable = [
        ("CIRRUS_PROFILE", "/nonexistent"),
        ("CIRRUS_URL", "http://127.0.0.1:1"),
    ];
    let o = run("cirrus", &["user", "list"], &unreachable).await;
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[tokio::test]
async fn policy_check_answers_may_x_call_y_and_why() {
    let state = tempfile::tempdir().unwrap();
    let sd = state.path().to_str().unwrap();
    let agent = "spiffe://cirrus.local/svc/compute-agent/host/h1";
    // (method, caller's flags, exit code, what the answer says)
    let cases: [(&str, &[&str], i32, &str); 6] = [
        (
            "identity.v1.Users/CreateUser",
            &["--roles", "member,reader"],
            1,
            "DENY (PERMISSION_DENIED)",
        ),
        (
            "identity.v1.Users/CreateUser",
            &["--roles", "admin", "--admin-project"],
            0,
            "ALLOW",
        ),
        (
            "identity.v1.Roles/ListRoles",
            &["--no-token"],
            1,
            "UNAUTHENTICATED",
        ),
        (
            "queue.v1.Queue/Subscribe",
            &["--no-token", "--peer", agent],
            0,
            "ALLOW",
        ),
        (
            "queue.v1.Queue/Subscribe",
            &["--roles", "admin"],
            1,
            "internal only",
        ),
        (
            "image.v1.Images/Nope",
            &["--roles", "admin"],
            1,
            "default deny",
        ),
    ];
    for (method, flags, code, says) in cases {
        let mut args = vec!["policy", "check", "--state-dir", sd, "--method", method];
        args.extend_from_slice(flags);
        let o = run("cirrus", &args, &[]).await;
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stdout(&o));
        assert!(stdout(&o).contains(says), "{args:?}: {}", stdout(&o));
    }
    // A denial says why: creating users is for administrators.
    let o = run(
        "cirrus",
        &[
            "policy",
            "check",
            "--state-dir",
            sd,
            "--method",
            "identity.v1.Users/CreateUser",
            "--roles",
            "member",
        ],
        &[],
    )
    .await;
    assert!(stdout(&o).contains("administrator"), "{}", stdout(&o));
}

/// `grpcurl` as an outside client of `svc`'s public endpoint (TLS with the
/// cluster CA, the token in `authorization`); the answer as JSON.
async fn grpc(
    cloud: &Cloud,
    token: &str,
    svc: &str,
    method: &str,
    body: &str,
) -> Result<serde_json::Value, String> {
    let port = cloud.ports(svc).2;
    let bundle = format!("{}/pki/bundle.pem", cloud.dir());
    let auth = format!("authorization: Bearer {token}");
    let addr = format!("127.0.0.1:{port}");
    let mut c = tokio::process::Command::new("grpcurl");
    c.args([
        "-cacert",
        &bundle,
        "-servername",
        svc,
        "-H",
        &auth,
        "-emit-defaults",
    ])
    .args(["-max-time", "30", "-d", body, &addr, method])
    .stdin(std::process::Stdio::null());
    let o = tokio::time::timeout(std::time::Duration::from_secs(60), c.output())
        .await
        .map_err(|_| format!("grpcurl {method} did not finish within 60 s"))?
        .map_err(|e| format!("grpcurl: {e}"))?;
    if !o.status.success() {
        return Err(format!("{method}: {}{}", stdout(&o), stderr(&o)));
    }
    let text = stdout(&o);
    serde_json::from_str(if text.trim().is_empty() { "{}" } else { &text })
        .map_err(|e| format!("{method}: {e}: {text}"))
}

async fn grpc_ok(
    cloud: &Cloud,
    token: &str,
    svc: &str,
    method: &str,
    body: &str,
) -> serde_json::Value {
    grpc(cloud, token, svc, method, body)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn named<'a>(list: &'a serde_json::Value, key: &str, name: &str) -> Vec<&'a serde_json::Value> {
    list[key]
        .as_array()
        .map(|a| a.iter().filter(|x| x["name"] == name).collect())
        .unwrap_or_default()
}

/// A bounded command's stdout (empty when it fails).
async fn sh(prog: &str, args: &[&str]) -> String {
    let mut c = tokio::process::Command::new(prog);
    c.args(args).stdin(std::process::Stdio::null());
    match tokio::time::timeout(std::time::Duration::from_secs(30), c.output()).await {
        Ok(Ok(o)) => stdout(&o),
        _ => String::new(),
    }
}

/// What this cloud left on the host: its bridge, its namespaces, its
/// dnsmasqs, its libvirt domains (by the names and paths only it uses).
async fn leftovers(cloud: &Cloud, prefix: &str) -> Vec<String> {
    let mut left = Vec::new();
    let bridges = sh("ovs-vsctl", &["list-br"]).await;
    if bridges.lines().any(|b| b == cloud.bridge) {
        let ports = sh("ovs-vsctl", &["list-ports", &cloud.bridge]).await;
        left.push(format!("bridge {} (ports: {ports:?})", cloud.bridge));
    }
    for ns in sh("ip", &["netns", "list"]).await.lines() {
        if ns.starts_with(prefix) {
            left.push(format!("namespace {ns}"));
        }
    }
    for p in sh("pgrep", &["-a", "dnsmasq"]).await.lines() {
        if p.contains(cloud.dir()) || p.contains(prefix) {
            left.push(format!("dnsmasq {p}"));
        }
    }
    let agent_dir = format!("{}/compute-agent", cloud.dir());
    for d in sh(
        "virsh",
        &["-c", "qemu:///system", "list", "--all", "--name"],
    )
    .await
    .lines()
    .filter(|d| d.starts_with("cirrus-"))
    {
        if sh("virsh", &["-c", "qemu:///system", "dumpxml", d])
            .await
            .contains(&agent_dir)
        {
            left.push(format!("domain {d}"));
        }
    }
    left
}

/// The whole cloud on this machine (issues 10 and 11): every service and
/// both agents behind their sidecars, each public API answering an outside
/// client with a token, this host's compute agent heartbeating, the
/// defaults made once and reused by a second `up`, and `cirrus down`
/// leaving no bridge, namespace, dnsmasq or domain of this cloud behind.
#[tokio::test]
async fn up_runs_the_whole_cloud_with_defaults_and_down_clears_the_host() {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::new(&[("CIRRUS_DATABASE_URL", db.url.as_str())]);
    let o = cloud.start().await;
    let said = stdout(&o);
    assert!(
        o.status.success() && said.contains("Cirrus is up"),
        "cirrus up failed: {said}{}",
        stderr(&o)
    );
    assert!(
        said.contains("cirrus server create demo --flavor m1.tiny --image cirrus-tiny --network default --wait"),
        "{said}"
    );
    assert!(said.contains("compute agent driver: "), "{said}");
    let libvirtd = sh("virsh", &["-c", "qemu:///system", "version"]).await;
    if !libvirtd.is_empty() {
        assert!(
            said.contains("compute agent driver: qemu:///system, domain type"),
            "libvirtd answers, so the agent drives it: {said}"
        );
    }

    // Every process and its sidecar runs; the compute agent's driver is said.
    let status = cloud.status().await;
    let procs = status.as_array().unwrap();
    for svc in SERVICES {
        for name in [svc.to_string(), format!("{svc}-sidecar")] {
            let p = procs
                .iter()
                .find(|p| p["name"] == name.as_str())
                .unwrap_or_else(|| panic!("no {name} in {status}"));
            assert_eq!(p["state"], "running", "{status}");
        }
    }
    let agent = procs.iter().find(|p| p["name"] == "compute-agent").unwrap();
    assert!(
        agent["note"].as_str().unwrap().starts_with("driver "),
        "{status}"
    );

    let token = cloud
        .admin_ok(&["token", "issue", "-f", "value", "-c", "token"])
        .await;
    let token = token.trim();
    let c = &cloud;

    // Each public API answers an outside client.
    let flavors = grpc_ok(
        c,
        token,
        "compute-api",
        "compute.v1.Flavors/ListFlavors",
        "{}",
    )
    .await;
    assert_eq!(named(&flavors, "flavors", "m1.tiny").len(), 1, "{flavors}");
    let volumes = grpc_ok(c, token, "volume", "volume.v1.Volumes/ListVolumes", "{}").await;
    assert!(volumes.is_object(), "{volumes}");
    let nets = grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/ListNetworks",
        "{}",
    )
    .await;
    let default = named(&nets, "networks", "default");
    assert_eq!(default.len(), 1, "{nets}");
    let net_id = default[0]["id"].as_str().unwrap().to_string();
    let subnets = grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/ListSubnets",
        &format!("{{\"network_id\":\"{net_id}\"}}"),
    )
    .await;
    let subnet = &subnets["subnets"][0];
    assert_eq!(subnet["cidr"], "10.20.0.0/24", "{subnets}");
    assert_eq!(subnet["enableDhcp"], true, "{subnets}");
    let groups = grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/ListSecurityGroups",
        "{}",
    )
    .await;
    assert_eq!(
        named(&groups, "securityGroups", "default").len(),
        1,
        "{groups}"
    );

    // The tiny guest: a root disk whose kernel_id / ramdisk_id name an aki and an ari.
    let images = grpc_ok(c, token, "image", "image.v1.Images/ListImages", "{}").await;
    let tiny = named(&images, "images", "cirrus-tiny");
    assert_eq!(tiny.len(), 1, "{images}");
    let props = &tiny[0]["properties"];
    for (key, format) in [
        ("kernel_id", "DISK_FORMAT_AKI"),
        ("ramdisk_id", "DISK_FORMAT_ARI"),
    ] {
        let id = props[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key}: {images}"));
        let part = images["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("{key} {id} is not listed: {images}"));
        assert_eq!(part["diskFormat"], format, "{images}");
        assert_eq!(part["status"], "STATUS_ACTIVE", "{images}");
    }

    // This host's agents heartbeat: compute lists the host up, network its agent alive.
    let host = cloud.host.clone();
    let h = host.as_str();
    eventually(
        Duration::from_secs(60),
        "the compute host listed up",
        || async move {
            let hosts = grpc(c, token, "compute-api", "compute.v1.Hosts/ListHosts", "{}").await?;
            let up = hosts["hosts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["name"] == h && x["up"] == true));
            if up { Ok(()) } else { Err(hosts.to_string()) }
        },
    )
    .await;
    let bridge = cloud.bridge.clone();
    let b = bridge.as_str();
    eventually(
        Duration::from_secs(60),
        "the network agent alive",
        || async move {
            let agents = grpc(c, token, "network", "network.v1.Networks/ListAgents", "{}").await?;
            let alive = agents["agents"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["host"] == h && x["alive"] == true && x["bridge"] == b)
            });
            if alive {
                Ok(())
            } else {
                Err(agents.to_string())
            }
        },
    )
    .await;

    // A port bound to this host makes the agent wire the default network:
    // its DHCP namespace (this cloud's prefix) with a dnsmasq in it.
    let cluster = std::fs::read_to_string(format!("{}/cluster.toml", cloud.dir())).unwrap();
    let id = cluster
        .lines()
        .find_map(|l| l.strip_prefix("id = "))
        .unwrap()
        .trim_matches('"')
        .replace('-', "");
    let prefix = format!("cirrus-{}-", &id[..6]);
    let port = grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/CreatePort",
        &format!("{{\"network_id\":\"{net_id}\",\"name\":\"probe\"}}"),
    )
    .await;
    let port_id = port["id"].as_str().unwrap().to_string();
    grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/BindPort",
        &format!("{{\"port_id\":\"{port_id}\",\"host\":\"{h}\"}}"),
    )
    .await;
    let p = prefix.as_str();
    eventually(
        Duration::from_secs(60),
        "the DHCP namespace and its dnsmasq",
        || async move {
            let left = leftovers(c, p).await;
            let ns = left.iter().any(|l| l.starts_with("namespace "));
            let dnsmasq = left.iter().any(|l| l.starts_with("dnsmasq "));
            if ns && dnsmasq {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;

    // A second `up` reuses everything: the same defaults, none twice.
    cloud.down().await;
    let o = cloud.start().await;
    let said = stdout(&o);
    assert!(o.status.success(), "second up: {said}{}", stderr(&o));
    assert!(said.contains("(reused)"), "{said}");
    let token = cloud
        .admin_ok(&["token", "issue", "-f", "value", "-c", "token"])
        .await;
    let token = token.trim();
    let images = grpc_ok(c, token, "image", "image.v1.Images/ListImages", "{}").await;
    for name in ["cirrus-tiny", "cirrus-tiny-kernel", "cirrus-tiny-ramdisk"] {
        assert_eq!(named(&images, "images", name).len(), 1, "{name}: {images}");
    }
    let nets = grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/ListNetworks",
        "{}",
    )
    .await;
    assert_eq!(named(&nets, "networks", "default").len(), 1, "{nets}");
    let subnets = grpc_ok(
        c,
        token,
        "network",
        "network.v1.Networks/ListSubnets",
        &format!("{{\"network_id\":\"{net_id}\"}}"),
    )
    .await;
    assert_eq!(
        subnets["subnets"].as_array().map(Vec::len),
        Some(1),
        "{subnets}"
    );
    // The bound port is wired again after the restart.
    eventually(
        Duration::from_secs(60),
        "the DHCP namespace back",
        || async move {
            let left = leftovers(c, p).await;
            if left.iter().any(|l| l.starts_with("dnsmasq ")) {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;

    // Down leaves nothing of this cloud on the host.
    cloud.down().await;
    let left = leftovers(&cloud, &prefix).await;
    assert!(left.is_empty(), "cirrus down left {left:?}");
}
