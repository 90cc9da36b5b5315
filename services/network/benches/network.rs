//! The network benchmark (a bench, not a test: `cargo bench -p network`).
//! Needs Postgres, Open vSwitch and dnsmasq as the tests do, and root.
//!
//! 1. Port create (with IP allocation, one transaction each) throughput and
//!    p50/p99 at concurrency 8 and 32, on one replica.
//! 2. Bind → ACTIVE: from the `BindPort` call to the `ACTIVE` event on
//!    `WatchPorts` (the agent woke, wired OVS, rewrote dnsmasq's leases and
//!    reported), with the stand-in already plugged.
//! 3. DHCP lease after port create: create, plug, bind, then `udhcpc` in the
//!    stand-in until it holds its address.
//!
//! Anchors: Neutron's port create + bind is a recurring bottleneck of boots
//! at scale; Nova waits up to 300 s (`vif_plugging_timeout`) for the
//! vif-plugged event. Targets on this 2-core machine: ≥ 1,000 creates/s,
//! bind → ACTIVE p50 ≤ 100 ms.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use proto::network::v1 as pb;
use runtime::testing::{admin, cpu_seconds, member_a, postgres_cpu_seconds, req};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU seconds of this process (client and server run here) and of every
/// Postgres process (shared with other sessions' tests: an upper bound).
fn cpu_now() -> (f64, f64) {
    (cpu_seconds("self"), postgres_cpu_seconds())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let cloud = Cloud::start_with(1, |c| {
        c.database.pool_size = 32;
        c.agent_down_secs = 30;
    })
    .await;
    let a = member_a();
    cloud
        .client()
        .set_quota(req(
            pb::SetQuotaRequest {
                project_id: runtime::testing::PROJECT_A.into(),
                // A limit far away: the quota check runs on every create.
                limits: [("ports".to_string(), 10_000_000)].into_iter().collect(),
            },
            &admin(),
        ))
        .await
        .unwrap();
    let net = cloud.network(&a, "bench").await;
    cloud.subnet(&a, &net.id, "10.128.0.0/16").await;
    // Warm up: the default group, the pool's connections.
    for _ in 0..64 {
        cloud.port(&a, &net.id, None, &[]).await;
    }

    println!("| measure | figure | target | load (1/5/15 min) |");
    println!("|---|---|---|---|");
    for (conc, limited) in [(8usize, true), (32, true), (32, false)] {
        if !limited {
            cloud
                .client()
                .set_quota(req(
                    pb::SetQuotaRequest {
                        project_id: runtime::testing::PROJECT_A.into(),
                        limits: [("ports".to_string(), -1)].into_iter().collect(),
                    },
                    &admin(),
                ))
                .await
                .unwrap();
        }
        let total = 4000usize;
        let (cpu0, pg0) = cpu_now();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conc {
            let mut c = cloud.client();
            let a = a.clone();
            let net = net.id.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for _ in 0..total / conc {
                    let t = Instant::now();
                    c.create_port(req(
                        pb::CreatePortRequest {
                            network_id: net.clone(),
                            ..Default::default()
                        },
                        &a,
                    ))
                    .await
                    .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        let (cpu1, pg1) = cpu_now();
        let n = lat.len();
        let quota = if limited {
            "quota limit set"
        } else {
            "no limit"
        };
        println!(
            "| port create, concurrency {conc}, {quota} ({n} ports) | {:.0}/s, p50 {}, p99 {}; CPU per create: {:.0} µs this process (client + server), {:.0} µs all postgres | ≥ 1,000/s | {} |",
            n as f64 / secs,
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99)),
            (cpu1 - cpu0) / n as f64 * 1e6,
            (pg1 - pg0) / n as f64 * 1e6,
            load()
        );
    }

    // Bind → ACTIVE and DHCP, with a real agent on its own bridge, in
    // another project (project A's default group has 12,000 members; the
    // agent would see them all in its remote-group clause).
    let a = runtime::testing::member_b();
    let host = Host::start(&cloud.url()).await;
    cloud.wait_agent(host.host()).await;
    let dnet = cloud.network(&a, "bench-dhcp").await;
    cloud.subnet(&a, &dnet.id, "10.129.0.0/24").await;
    let mut bind = Vec::new();
    let mut guests = Vec::new();
    for i in 0..40u32 {
        let p = cloud.port(&a, &dnet.id, None, &[]).await;
        let g = host.plug(i, &p);
        let mut watch = cloud
            .client()
            .watch_ports(req(
                pb::WatchPortsRequest {
                    device_id: p.device_id.clone(),
                },
                &a,
            ))
            .await
            .unwrap()
            .into_inner();
        watch.message().await.unwrap().unwrap();
        let t = Instant::now();
        cloud
            .bind(&via(&a, host.host()), &p.id, host.host())
            .await
            .unwrap();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(30), watch.message())
                .await
                .expect("ACTIVE within 30 s")
                .unwrap()
                .unwrap();
            if e.status == "ACTIVE" {
                break;
            }
        }
        bind.push(t.elapsed());
        guests.push(g);
    }
    println!(
        "| bind → ACTIVE ({} ports, one at a time, first with a new dnsmasq; anchor: Nova waits up to 300 s for vif-plugged) | p50 {}, p99 {}, max {} | p50 ≤ 100 ms | {} |",
        bind.len(),
        ms(pct(&mut bind, 0.5)),
        ms(pct(&mut bind, 0.99)),
        ms(pct(&mut bind, 1.0)),
        load()
    );

    let mut lease = Vec::new();
    for i in 100..120u32 {
        let t = Instant::now();
        let p = cloud.port(&a, &dnet.id, None, &[]).await;
        let g = host.plug(i, &p);
        cloud
            .bind(&via(&a, host.host()), &p.id, host.host())
            .await
            .unwrap();
        let got = g.dhcp().await.unwrap();
        assert_eq!(
            got.split_whitespace().next(),
            Some(p.fixed_ips[0].ip_address.as_str())
        );
        lease.push(t.elapsed());
        guests.push(g);
    }
    println!(
        "| DHCP lease after port create (create, plug, bind, udhcpc with 1 s retries; {} stand-ins; anchor: Nova's 300 s vif_plugging_timeout) | p50 {}, p99 {}, max {} | — | {} |",
        lease.len(),
        ms(pct(&mut lease, 0.5)),
        ms(pct(&mut lease, 0.99)),
        ms(pct(&mut lease, 1.0)),
        load()
    );
    drop(guests);
    drop(host);
}
