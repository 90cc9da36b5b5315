//! `cargo bench -p identity`: token issue and validation throughput and
//! latency, printed beside real Keystone measured on this same machine type
//! (../shared/anchors/keystone) and the targets.
//!
//! It starts a real identity server (release build, argon2id at OWASP's
//! minimum m = 19 MiB, t = 2, p = 1) on loopback against its own database;
//! the load generator runs in this process and shares the same 2 cores, as
//! Keystone's did. `BENCH_SECS` sets each measurement's length (default 8).

use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::model::Interface;
use identity::{Bootstrap, Config, Identity};
use proto::identity::v1 as pb;
use proto::identity::v1::tokens_client::TokensClient;
use tonic::Request;
use tonic::transport::Channel;

const PASSWORD: &str = "bench-admin-password";

struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `op` from `conc` tasks for `secs` seconds; returns completions/s and latency percentiles.
async fn load<F, Fut>(conc: usize, secs: f64, op: F) -> Figures
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if op().await {
                        lat.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    assert_eq!(errors, 0, "requests failed during the benchmark");
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    Figures {
        rate: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

fn password_request() -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        method: Some(pb::authenticate_request::Method::Password(
            pb::PasswordCredentials {
                user_name: "admin".into(),
                user_domain_name: "Default".into(),
                password: PASSWORD.into(),
                ..Default::default()
            },
        )),
        scope: Some(pb::Scope {
            target: Some(pb::scope::Target::Project(pb::ProjectScope {
                name: "admin".into(),
                domain_name: "Default".into(),
                ..Default::default()
            })),
        }),
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let db = runtime::db::TestDatabase::create()
        .await
        .expect("database (is Postgres running?)");
    let keys = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = Config {
        server: runtime::config::ServerConfig {
            listen: addr,
            metrics_listen: None,
        },
        database: runtime::config::DatabaseConfig {
            url: db.url.clone(),
            ..runtime::config::DatabaseConfig::local("identity")
        },
        key_dir: keys.path().join("keys"),
        ..Config::default()
    };
    let id = Identity::start(config).await.expect("start identity");
    id.bootstrap(&Bootstrap {
        admin_user: "admin".into(),
        admin_password: PASSWORD.into(),
        admin_project: "admin".into(),
        region: "RegionOne".into(),
        endpoints: vec![(Interface::Public, format!("http://{addr}"))],
    })
    .await
    .expect("bootstrap");
    let served = id.clone();
    tokio::spawn(async move { identity::serve(served, listener, std::future::pending()).await });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_lazy();
    let client = TokensClient::new(channel);
    let first = client
        .clone()
        .authenticate(password_request())
        .await
        .expect("login")
        .into_inner();
    let token = first.token.clone();

    println!(
        "Cirrus identity benchmark: {secs} s per row, server and load generator on this machine's {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("argon2id m=19 MiB t=2 p=1; PASETO v4.public (Ed25519) tokens\n");
    println!(
        "| test | conc | Cirrus req/s | p50 ms | p99 ms | Keystone 30 req/s (p50 ms) on this machine type | target |"
    );
    println!("|---|---|---|---|---|---|---|");

    for (conc, anchor) in [(1, "2.5 (412)"), (8, "5.0 (1581)"), (32, "5.1 (6295)")] {
        let c = client.clone();
        let f = load(conc, secs, move || {
            let mut c = c.clone();
            async move { c.authenticate(password_request()).await.is_ok() }
        })
        .await;
        let target = if conc == 8 { "≥ 100/s" } else { "" };
        println!(
            "| issue, password, project-scoped | {conc} | {:.1} | {:.1} | {:.1} | {anchor} | {target} |",
            f.rate, f.p50_ms, f.p99_ms
        );
    }

    for conc in [8, 32] {
        let c = client.clone();
        let t = token.clone();
        let f = load(conc, secs, move || {
            let mut c = c.clone();
            let t = t.clone();
            async move {
                let req = pb::AuthenticateRequest {
                    method: Some(pb::authenticate_request::Method::Token(
                        pb::TokenCredentials { token: t },
                    )),
                    scope: password_request().scope,
                };
                c.authenticate(req).await.is_ok()
            }
        })
        .await;
        println!(
            "| issue, token (re-scope) | {conc} | {:.0} | {:.2} | {:.2} | — | ≥ 5,000/s |",
            f.rate, f.p50_ms, f.p99_ms
        );
    }

    for (conc, anchor) in [
        (8, "25.8 (303); memcached 246.8 (31.5)"),
        (32, "25.8 (1225); memcached 233.1 (133.6)"),
    ] {
        let c = client.clone();
        let t = token.clone();
        let f = load(conc, secs, move || {
            let mut c = c.clone();
            let t = t.clone();
            async move {
                c.validate_token(with_token(
                    pb::ValidateTokenRequest { token: t.clone() },
                    &t,
                ))
                .await
                .is_ok()
            }
        })
        .await;
        println!(
            "| validate (ValidateToken RPC, catalog included) | {conc} | {:.0} | {:.2} | {:.2} | {anchor} | |",
            f.rate, f.p50_ms, f.p99_ms
        );
    }

    // Offline verification, as a sidecar does it: one thread, no network.
    // First a token never seen before (the signature checked: a
    // `token::Verifier` holding identity's public keys, as a sidecar's
    // does), then one seen before (identity's own verify, whose cache of
    // checked signatures leaves expiry and revocation per call).
    let mut verifier = token::Verifier::new();
    let keys = id.public_keys().expect("public keys");
    verifier.set_keys(keys.iter().map(|k| k.public_key.as_slice()));
    let per_core = |f: &dyn Fn() -> bool| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs_f64(secs.min(3.0)) {
            for _ in 0..100 {
                assert!(f());
            }
            n += 100;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let now = time::OffsetDateTime::now_utc();
    let first = per_core(&|| verifier.verify(&token, now).is_ok());
    println!(
        "| offline verification, a token not seen before (signature checked; one thread) | 1 | {first:.0} per core | {:.3} | | — | ≥ 20,000/s per core |",
        1000.0 / first
    );
    let again = per_core(&|| id.verify(&token).is_ok());
    println!(
        "| offline verification, a token seen before (cached signature; one thread) | 1 | {again:.0} per core | {:.3} | | — | |",
        1000.0 / again
    );
    println!(
        "\nKeystone anchor: ../shared/anchors/keystone/README.md (keystone 30.0, uWSGI 5x1, bcrypt cost 12, PostgreSQL, same 2-core machine type)."
    );
    println!(
        "At scale Keystone held 180 token issues/s at p50 71 ms on three controllers (OpenStack performance-docs, 1000-node Rally run)."
    );
}
