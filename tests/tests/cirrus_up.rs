//! `cirrus up` as a newcomer runs it, then the CLI as an operator uses it,
//! then `cirrus down`; all real processes against a real Postgres.
#![allow(clippy::unwrap_used)]

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
    for svc in SERVICES {
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
