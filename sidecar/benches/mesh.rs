//! `cargo bench -p sidecar`: what the sidecar pair costs, measured side by
//! side in one run. A small unary RPC (`grpc.health.v1.Health/Check` on an
//! in-process server) is called directly, and through
//! client → outbound sidecar → inbound sidecar → server, both sidecars being
//! real `sidecar` processes with real mTLS and token checks. Printed beside
//! Linkerd's and Istio's published figures and the issue's targets.
//!
//! The same calls also go through the anchor, a pair of nginx proxies doing
//! gRPC with mTLS (`../shared/anchors/nginx-grpc-mtls/`), when nginx is
//! installed. CPU per request per proxy is each pair's CPU time (utime +
//! stime from `/proc`, masters and workers) over the requests completed, halved.
//!
//! `BENCH_SECS` sets the length of each measurement (default 8).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::model::Interface;
use identity::{Bootstrap, Identity};
use proto::identity::v1 as pb;
use time::Duration as TDuration;
use tonic::Request;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const PASSWORD: &str = "bench-pw";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn proc_stat(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let cpu_secs = runtime::testing::cpu_seconds(&pid.to_string());
    (rss_kib / 1024.0, cpu_secs)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1))
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Open loop at `rate` requests/s for `secs`: latencies of the completed calls.
async fn fixed_rate(
    client: HealthClient<runtime::trace::Channel>,
    token: Arc<str>,
    rate: u64,
    secs: f64,
) -> Vec<Duration> {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (rate as f64 * secs) as usize;
    let mut tasks = Vec::with_capacity(total);
    for _ in 0..total {
        tick.tick().await;
        let mut c = client.clone();
        let t = token.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            c.check(with_token(HealthCheckRequest::default(), &t))
                .await
                .map(|_| start.elapsed())
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        if let Ok(Ok(d)) = t.await {
            lat.push(d);
        }
    }
    assert!(
        lat.len() * 100 >= total * 99,
        "more than 1% of calls failed"
    );
    lat.sort();
    lat
}

/// Closed loop with `conc` callers for `secs`: completions per second.
async fn max_rate(
    client: HealthClient<runtime::trace::Channel>,
    token: Arc<str>,
    conc: usize,
    secs: f64,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let mut c = client.clone();
            let t = token.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if c.check(with_token(HealthCheckRequest::default(), &t))
                        .await
                        .is_ok()
                    {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap_or(0);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Runs `f`, returning its result and the CPU seconds `pids` spent meanwhile.
async fn measured<T, F, Fut>(pids: &[u32], f: F) -> (T, f64)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let cpu = || pids.iter().map(|p| proc_stat(*p).1).sum::<f64>();
    let before = cpu();
    let out = f().await;
    (out, cpu() - before)
}

/// The nginx anchor pair, stopped on drop.
struct NginxPair {
    dir: std::path::PathBuf,
    port: u16,
}

impl NginxPair {
    fn start(dir: &Path, backend: std::net::SocketAddr) -> Option<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/anchors/nginx-grpc-mtls/run.sh");
        if !script.is_file() || Command::new("nginx").arg("-v").output().is_err() {
            eprintln!("nginx or its anchor script is missing: the nginx pair is not measured");
            return None;
        }
        let (out_port, in_port) = (free_port(), free_port());
        let out = Command::new("bash")
            .arg(&script)
            .arg(backend.to_string())
            .arg(dir)
            .env("OUT_PORT", out_port.to_string())
            .env("IN_PORT", in_port.to_string())
            .output()
            .expect("run.sh");
        if !out.status.success() {
            eprintln!(
                "the nginx pair did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Self {
            dir: dir.to_path_buf(),
            port: out_port,
        })
    }

    /// Masters and workers of both nginx instances.
    fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for name in ["inbound.pid", "outbound.pid"] {
            let Some(master) = std::fs::read_to_string(self.dir.join(name))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            pids.push(master);
            let children =
                std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                    .unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        pids
    }
}

impl Drop for NginxPair {
    fn drop(&mut self) {
        for name in ["inbound.pid", "outbound.pid"] {
            if let Some(master) = std::fs::read_to_string(self.dir.join(name))
                .ok()
                .map(|s| s.trim().to_string())
            {
                let _ = Command::new("kill").arg(&master).status();
            }
        }
    }
}

/// The floor of any proxy that sleeps between requests: a byte relay (no
/// TLS, no HTTP/2, no policy; one thread, `copy_bidirectional` per
/// connection), run as its own process so that its CPU is measured as the
/// proxies' is. `BENCH_RELAY=<listen>,<upstream>` makes this binary one.
fn relay(spec: &str) -> ! {
    let (listen, upstream) = spec.split_once(',').expect("BENCH_RELAY=listen,upstream");
    let (listen, upstream) = (listen.to_string(), upstream.to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        loop {
            let (mut down, _) = l.accept().await.expect("accept");
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let _ = down.set_nodelay(true);
                if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    })
}

fn main() {
    if let Ok(spec) = std::env::var("BENCH_RELAY") {
        relay(&spec);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();

    // PKI: a CA and certificates for the two workloads.
    let ca = certs::Authority::create("bench CA", TDuration::days(1)).expect("ca");
    ca.save(dir).expect("save ca");
    for svc in ["echo", "compute-api"] {
        let pair = ca
            .issue(
                &certs::service_id(svc, None).expect("id"),
                &[svc.into(), "localhost".into()],
                TDuration::hours(24),
            )
            .expect("issue");
        certs::write_pair(dir, svc, &pair).expect("write");
    }

    // identity, in process, for tokens, keys and the catalog.
    let db = runtime::db::TestDatabase::create()
        .await
        .expect("database (is Postgres running?)");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let id_addr = listener.local_addr().expect("addr");
    let id = Identity::start(identity::Config {
        server: runtime::config::ServerConfig {
            listen: id_addr,
            metrics_listen: None,
        },
        database: runtime::config::DatabaseConfig {
            url: db.url.clone(),
            ..runtime::config::DatabaseConfig::local("identity")
        },
        key_dir: dir.join("keys"),
        ..identity::Config::default()
    })
    .await
    .expect("identity");
    id.bootstrap(&Bootstrap {
        admin_user: "admin".into(),
        admin_password: PASSWORD.into(),
        admin_project: "admin".into(),
        region: "RegionOne".into(),
        endpoints: vec![(Interface::Internal, format!("http://{id_addr}"))],
    })
    .await
    .expect("bootstrap");
    let served = id.clone();
    tokio::spawn(async move { identity::serve(served, listener, std::future::pending()).await });
    let id_channel = Channel::from_shared(format!("http://{id_addr}"))
        .expect("url")
        .connect_lazy();
    let token: Arc<str> = pb::tokens_client::TokensClient::new(id_channel.clone())
        .authenticate(pb::AuthenticateRequest {
            method: Some(pb::authenticate_request::Method::Password(
                pb::PasswordCredentials {
                    user_name: "admin".into(),
                    user_domain_name: "Default".into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                },
            )),
            scope: Some(pb::Scope {
                target: Some(pb::scope::Target::System(true)),
            }),
        })
        .await
        .expect("token")
        .into_inner()
        .token
        .into();

    // The server: a gRPC health service.
    let echo_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_addr = echo_listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                echo_listener,
            )),
    );

    // Two sidecar processes: echo's (inbound) and compute-api's (outbound).
    let (echo_internal, api_internal, api_outbound) = (free_port(), free_port(), free_port());
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy/echo.toml");
    let write_conf = |name: &str, body: String| {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, body).expect("config");
        p
    };
    // BENCH_SIDECAR_THREADS: the sidecars' `worker_threads` (absent: the
    // sidecar's default, one, as the nginx anchor's one worker process per
    // proxy; 0: one per core).
    let threads = std::env::var("BENCH_SIDECAR_THREADS")
        .ok()
        .map(|n| format!("worker_threads = {n}\n"))
        .unwrap_or_default();
    let common = |svc: &str| {
        format!(
            "service = \"{svc}\"\ncert = \"{d}/{svc}.crt\"\nkey = \"{d}/{svc}.key\"\nbundle = \"{d}/bundle.pem\"\n\
             identity_url = \"http://{id_addr}\"\npolicy = \"{p}\"\n{threads}",
            d = dir.display(),
            p = policy.display()
        )
    };
    let echo_conf = write_conf(
        "echo-sidecar",
        format!(
            "{}upstream = \"{echo_addr}\"\n[server]\nlisten = \"127.0.0.1:{echo_internal}\"\n",
            common("echo")
        ),
    );
    let api_conf = write_conf(
        "api-sidecar",
        format!(
            "{}outbound_listen = \"127.0.0.1:{api_outbound}\"\nupstream = \"{echo_addr}\"\n[server]\nlisten = \"127.0.0.1:{api_internal}\"\n",
            common("compute-api")
        ),
    );
    // BENCH_WRAP runs the sidecars under a profiler, e.g.
    // `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p`.
    let wrap: Vec<String> = std::env::var("BENCH_WRAP")
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let spawn = |conf: &Path| {
        let mut cmd = match wrap.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(env!("CARGO_BIN_EXE_sidecar"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_sidecar")),
        };
        Proc(
            cmd.arg("--config")
                .arg(conf)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("sidecar binary"),
        )
    };
    let inbound = spawn(&echo_conf);
    let outbound = spawn(&api_conf);

    // The catalog tells the outbound sidecar where "echo" is.
    let admin = token.to_string();
    let mut cat = pb::catalog_client::CatalogClient::new(id_channel);
    cat.create_service(with_token(
        pb::CreateServiceRequest {
            name: "echo".into(),
            r#type: "echo".into(),
            ..Default::default()
        },
        &admin,
    ))
    .await
    .expect("service");
    cat.create_endpoint(with_token(
        pb::CreateEndpointRequest {
            service: "echo".into(),
            interface: pb::Interface::Internal as i32,
            url: format!("https://127.0.0.1:{echo_internal}"),
            ..Default::default()
        },
        &admin,
    ))
    .await
    .expect("endpoint");

    // Every path's client is the traced channel the services use, so the
    // client side costs the same on each.
    let direct = HealthClient::new(runtime::trace::traced(
        Channel::from_shared(format!("http://{echo_addr}"))
            .expect("url")
            .connect_lazy(),
    ));
    let via = HealthClient::new(
        runtime::serve::via_sidecar(
            format!("127.0.0.1:{api_outbound}").parse().expect("addr"),
            "echo",
        )
        .expect("channel"),
    );
    // Wait until the pair has keys and routes.
    let ready = Instant::now();
    loop {
        let mut c = via.clone();
        if c.check(with_token(HealthCheckRequest::default(), &token))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(if wrap.is_empty() { 20 } else { 180 }),
            "the sidecar pair never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // BENCH_PROFILE=N: N sequential calls through the pair and stop (for a profiler).
    if let Some(n) = std::env::var("BENCH_PROFILE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let mut c = via.clone();
        for _ in 0..n {
            c.check(with_token(HealthCheckRequest::default(), &token))
                .await
                .expect("call through the pair");
        }
        // SIGTERM lets the profiled sidecars write their output.
        for p in [&inbound, &outbound] {
            let _ = Command::new("kill").arg(p.0.id().to_string()).status();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!("{n} calls through the pair");
        return;
    }

    // The anchor: a pair of nginx proxies doing gRPC with mTLS between them
    // (../shared/anchors/nginx-grpc-mtls), in front of the same server.
    let nginx = NginxPair::start(&dir.join("nginx"), echo_addr);
    let via_nginx = nginx.as_ref().map(|n| {
        HealthClient::new(runtime::trace::traced(
            Channel::from_shared(format!("http://127.0.0.1:{}", n.port))
                .expect("url")
                .connect_lazy(),
        ))
    });

    // The floor: two byte relays in a row, in front of the same server.
    let (relay_a, relay_b) = (free_port(), free_port());
    let me = std::env::current_exe().expect("this binary");
    let relay_proc = |listen: u16, up: String| {
        Proc(
            Command::new(&me)
                .env("BENCH_RELAY", format!("127.0.0.1:{listen},{up}"))
                .stdout(Stdio::null())
                .spawn()
                .expect("relay"),
        )
    };
    let relays = [
        relay_proc(relay_b, echo_addr.to_string()),
        relay_proc(relay_a, format!("127.0.0.1:{relay_b}")),
    ];
    let relay_pids: Vec<u32> = relays.iter().map(|p| p.0.id()).collect();
    let via_relays = HealthClient::new(runtime::trace::traced(
        Channel::from_shared(format!("http://127.0.0.1:{relay_a}"))
            .expect("url")
            .connect_lazy(),
    ));

    // Warm up every path.
    let _ = max_rate(via_relays.clone(), token.clone(), 8, 1.0).await;
    let _ = max_rate(direct.clone(), token.clone(), 8, 1.0).await;
    let _ = max_rate(via.clone(), token.clone(), 8, 1.0).await;
    if let Some(n) = &via_nginx {
        let _ = max_rate(n.clone(), token.clone(), 8, 1.0).await;
    }

    let cirrus_pids = [inbound.0.id(), outbound.0.id()];
    let d = fixed_rate(direct.clone(), token.clone(), 1000, secs).await;
    let (v, cirrus_cpu) = measured(&cirrus_pids, || {
        fixed_rate(via.clone(), token.clone(), 1000, secs)
    })
    .await;
    let rss = (proc_stat(inbound.0.id()).0, proc_stat(outbound.0.id()).0);
    let nginx_fixed = match (&via_nginx, &nginx) {
        (Some(c), Some(n)) => {
            let pids = n.pids();
            Some(measured(&pids, || fixed_rate(c.clone(), token.clone(), 1000, secs)).await)
        }
        _ => None,
    };

    let (relay_fixed, relay_cpu) = measured(&relay_pids, || {
        fixed_rate(via_relays.clone(), token.clone(), 1000, secs)
    })
    .await;

    let direct_max = max_rate(direct, token.clone(), 32, secs).await;
    let (relay_max, relay_max_cpu) = measured(&relay_pids, || {
        max_rate(via_relays, token.clone(), 32, secs)
    })
    .await;
    let (via_max, cirrus_max_cpu) =
        measured(&cirrus_pids, || max_rate(via, token.clone(), 32, secs)).await;
    let nginx_max = match (&via_nginx, &nginx) {
        (Some(c), Some(n)) => {
            let pids = n.pids();
            Some(measured(&pids, || max_rate(c.clone(), token.clone(), 32, secs)).await)
        }
        _ => None,
    };

    println!(
        "Cirrus sidecar benchmark: unary grpc.health.v1.Health/Check, {secs} s per row, everything on this machine's {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "pair = client → outbound proxy → (mTLS) → inbound proxy → server; Cirrus's inbound also checks the token and the policy\n"
    );
    // CPU µs per request per proxy: the pair's CPU time over the completed requests, halved.
    let per_req = |cpu: f64, n: f64| 1e6 * cpu / n.max(1.0) / 2.0;
    let fixed_n = (1000.0 * secs) as usize as f64;
    println!("| measure | direct | nginx pair | Cirrus pair | target (Cirrus) |");
    println!("|---|---|---|---|---|");
    type Run = (Vec<Duration>, f64);
    let ng = |f: &dyn Fn(&Run) -> String| {
        nginx_fixed
            .as_ref()
            .map_or("not run (no nginx)".to_string(), f)
    };
    println!(
        "| p50 at 1,000 req/s (ms) | {:.3} | {} | {:.3} (+{:.3}) | ≤ +0.3 ms |",
        pct(&d, 0.5),
        ng(&|(l, _)| format!("{:.3} (+{:.3})", pct(l, 0.5), pct(l, 0.5) - pct(&d, 0.5))),
        pct(&v, 0.5),
        pct(&v, 0.5) - pct(&d, 0.5)
    );
    println!(
        "| p99 at 1,000 req/s (ms) | {:.3} | {} | {:.3} (+{:.3}) | ≤ +1 ms |",
        pct(&d, 0.99),
        ng(&|(l, _)| format!("{:.3} (+{:.3})", pct(l, 0.99), pct(l, 0.99) - pct(&d, 0.99))),
        pct(&v, 0.99),
        pct(&v, 0.99) - pct(&d, 0.99)
    );
    println!(
        "| max rate, 32 callers (req/s) | {direct_max:.0} | {} | {via_max:.0} ({:.0}% of direct) | ≥ 50% of direct |",
        nginx_max
            .as_ref()
            .map_or("not run".to_string(), |(r, _)| format!(
                "{r:.0} ({:.0}% of direct)",
                100.0 * r / direct_max
            )),
        100.0 * via_max / direct_max
    );
    println!(
        "| CPU per request per proxy at 1,000 req/s (µs) | | {} | {:.0} | ≤ 75 (pair ≤ 150) |",
        ng(&|(_, cpu)| format!("{:.0}", per_req(*cpu, fixed_n))),
        per_req(cirrus_cpu, fixed_n)
    );
    println!(
        "| CPU per request per proxy at full load (µs) | | {} | {:.0} | |",
        nginx_max
            .as_ref()
            .map_or("not run".to_string(), |(r, cpu)| format!(
                "{:.0}",
                per_req(*cpu, r * secs)
            )),
        per_req(cirrus_max_cpu, via_max * secs)
    );
    println!(
        "| RSS per proxy at 1,000 req/s (MiB) | | | inbound {:.1}, outbound {:.1} | ≤ 20 MiB |",
        rss.0, rss.1
    );
    println!(
        "\nFloor: a pair of byte relays (plain TCP, no TLS, no HTTP/2, one thread each) in front of the same server, same run:"
    );
    println!("| measure | relay pair |");
    println!("|---|---|");
    println!(
        "| p50 / p99 at 1,000 req/s (ms) | {:.3} (+{:.3}) / {:.3} (+{:.3}) |",
        pct(&relay_fixed, 0.5),
        pct(&relay_fixed, 0.5) - pct(&d, 0.5),
        pct(&relay_fixed, 0.99),
        pct(&relay_fixed, 0.99) - pct(&d, 0.99)
    );
    println!(
        "| max rate, 32 callers (req/s) | {relay_max:.0} ({:.0}% of direct) |",
        100.0 * relay_max / direct_max
    );
    println!(
        "| CPU per request per proxy at 1,000 req/s (µs) | {:.0} |",
        per_req(relay_cpu, fixed_n)
    );
    println!(
        "| CPU per request per proxy at full load (µs) | {:.0} |",
        per_req(relay_max_cpu, relay_max * secs)
    );
    drop(relays);
    drop(nginx);
    drop(inbound);
    drop(outbound);
}
