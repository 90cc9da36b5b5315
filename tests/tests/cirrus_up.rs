//! `cirrus up` as a newcomer runs it, then the CLI as an operator uses it,
//! then `cirrus down`; all real processes against a real Postgres.
#![allow(clippy::unwrap_used)]

use runtime::db::TestDatabase;
use tests::*;

#[tokio::test]
async fn up_login_administer_and_down() {
    let db = TestDatabase::create().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let base = free_port_range(30);
    let base_s = base.to_string();
    // identity is service 0: loopback base, internal base+1, public base+2, metrics base+4.
    let (identity_port, public_port, metrics) = (base, base + 2, base + 4);
    let env = [("CIRRUS_DATABASE_URL", db.url.as_str())];
    let up_args = [
        "up",
        "--detach",
        "--state-dir",
        &state_dir,
        "--port-base",
        &base_s,
    ];

    let o = run("cirrus", &up_args, &env).await;
    assert!(
        o.status.success(),
        "cirrus up failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).contains("Cirrus is up"), "{}", stdout(&o));
    let profile = format!("{state_dir}/admin.toml");
    let admin = [("CIRRUS_PROFILE", profile.as_str())];

    // A second `up` on the same state refuses politely.
    let o = run("cirrus", &up_args, &env).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));

    // The admin's profile works: issue a token, as JSON.
    let o = run("cirrus", &["token", "issue", "-f", "json"], &admin).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let t: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
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
        let o = run("cirrus", &args, &admin).await;
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = run("cirrus", &["user", "list"], &admin).await;
    assert!(
        stdout(&o).contains("alice") && stdout(&o).contains("admin"),
        "{}",
        stdout(&o)
    );
    let o = run("cirrus", &["catalog"], &admin).await;
    for svc in ["identity", "queue", "image"] {
        assert!(
            stdout(&o).contains(svc),
            "{svc} missing from the catalog: {}",
            stdout(&o)
        );
    }
    assert!(stdout(&o).contains("https://127.0.0.1"), "{}", stdout(&o));

    // The operator certificate reaches the internal (mTLS) endpoint.
    let internal = format!("{state_dir}/admin-internal.toml");
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
    let bundle = format!("{state_dir}/pki/bundle.pem");
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

    // Down stops everything; the service no longer answers.
    let o = run("cirrus", &["down", "--state-dir", &state_dir], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        "identity",
        &["healthcheck", &format!("127.0.0.1:{identity_port}")],
        &[],
    )
    .await;
    assert!(!o.status.success(), "identity still answers after down");

    // A second `up` reuses the state: the same admin credentials still work.
    let o = run("cirrus", &up_args, &env).await;
    assert!(
        o.status.success(),
        "second up: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = run("cirrus", &["token", "issue"], &admin).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run("cirrus", &["user", "show", "alice"], &admin).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run("cirrus", &["down", "--state-dir", &state_dir], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
}

#[tokio::test]
async fn a_bad_config_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("identity.toml");
    std::fs::write(&bad, "token_ttl_secs = \"an hour\"\n").unwrap();
    let o = run(
        "identity",
        &["--config", bad.to_str().unwrap(), "serve"],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("invalid configuration"), "{err}");

    std::fs::write(&bad, "token_ttl_secs = 0\n").unwrap();
    let o = run(
        "identity",
        &["--config", bad.to_str().unwrap(), "serve"],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("token_ttl_secs"), "{}", stderr(&o));

    let o = run(
        "identity",
        &["serve"],
        &[("CIRRUS_LISTEN", "not-an-address")],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let o = run(
        "cirrus",
        &["user", "list"],
        &[
            ("CIRRUS_PROFILE", "/nonexistent"),
            ("CIRRUS_URL", "http://127.0.0.1:1"),
        ],
    )
    .await;
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[tokio::test]
async fn policy_check_answers_may_x_call_y_and_why() {
    let state = tempfile::tempdir().unwrap();
    let sd = state.path().to_str().unwrap();
    let check = |args: Vec<&'static str>| {
        let mut a = vec!["policy", "check", "--state-dir"];
        a.push(Box::leak(sd.to_string().into_boxed_str()));
        a.extend(args);
        a
    };
    let o = run(
        "cirrus",
        &check(vec![
            "--method",
            "identity.v1.Users/CreateUser",
            "--roles",
            "member,reader",
        ]),
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("DENY (PERMISSION_DENIED)") && stdout(&o).contains("administrator"),
        "{}",
        stdout(&o)
    );

    let o = run(
        "cirrus",
        &check(vec![
            "--method",
            "identity.v1.Users/CreateUser",
            "--roles",
            "admin",
            "--admin-project",
        ]),
        &[],
    )
    .await;
    assert!(
        o.status.success() && stdout(&o).starts_with("ALLOW"),
        "{}",
        stdout(&o)
    );

    let o = run(
        "cirrus",
        &check(vec![
            "--method",
            "identity.v1.Roles/ListRoles",
            "--no-token",
        ]),
        &[],
    )
    .await;
    assert!(stdout(&o).contains("UNAUTHENTICATED"), "{}", stdout(&o));

    let agent = "spiffe://cirrus.local/svc/compute-agent/host/h1";
    let o = run(
        "cirrus",
        &check(vec![
            "--method",
            "queue.v1.Queue/Subscribe",
            "--no-token",
            "--peer",
            agent,
        ]),
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", stdout(&o));
    let o = run(
        "cirrus",
        &check(vec![
            "--method",
            "queue.v1.Queue/Subscribe",
            "--roles",
            "admin",
        ]),
        &[],
    )
    .await;
    assert!(stdout(&o).contains("internal only"), "{}", stdout(&o));
    let o = run(
        "cirrus",
        &check(vec!["--method", "image.v1.Images/Nope", "--roles", "admin"]),
        &[],
    )
    .await;
    assert!(stdout(&o).contains("default deny"), "{}", stdout(&o));
}
