//! Issue 11's benchmark: real TCG guests on this machine.
//!
//! 1. The floor: QEMU started by hand (no cloud) with the tiny guest's kernel
//!    and initramfs, a qcow2 overlay and a config drive like the agent's, a
//!    tap on a private bridge in a network namespace of its own and a dnsmasq
//!    (static leases, as the network agent runs it) — QEMU start → the
//!    guest's `CIRRUS-GUEST ip=` console line; one, two and five at once.
//! 2. A cloud (`cirrus up --driver qemu`) driven over compute.v1 gRPC:
//!    CreateServer → `active` (WatchServer) and → the DHCP address, both as
//!    the host's serial log shows it (polled every 20 ms) and as a user sees
//!    it through GetConsoleLog (polled every 100 ms); one at a time (each
//!    deleted before the next, as Rally's boot-and-delete) and five at once.
//! 3. The per-step breakdown of one boot: WatchServer's state/task changes,
//!    the server's files on the host, libvirt's domain status (paused →
//!    running), the console lines, all on one clock from the create call.
//!
//! Every figure is printed beside its anchor and the load average. Run:
//! `cargo bench -p tests --bench guests` after
//! `cargo build --release --bins` (the cloud's binaries, beside this one).
//! `GUESTS_SERIAL` (default 5) and `GUESTS_ROUNDS` (default 2) set the sample
//! counts; `GUESTS_FLOOR_RUNS` (default 3) the floor's; `GUESTS_CLOUD=0`
//! measures the floor only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::compute::v1 as pb;
use proto::compute::v1::servers_client::ServersClient;
use runtime::db::TestDatabase;
use tests::*;
use tonic::transport::Channel;

/// Bound for one guest to reach its DHCP address (TCG on a loaded machine).
const GUEST: Duration = Duration::from_secs(300);

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// p50 and p99 (nearest rank) of a sample; with few values p99 is the max.
fn pct(v: &[Duration]) -> (Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    let rank = |p: f64| {
        let i = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
        s[i - 1]
    };
    (rank(0.50), rank(0.99))
}

fn summary(label: &str, v: &[Duration], anchor: &str) {
    if v.is_empty() {
        println!("{label:<44} (no samples)");
        return;
    }
    let (p50, p99) = pct(v);
    println!(
        "{label:<44} p50 {:>8}  p99 {:>8}  n={}  load {}   anchor: {anchor}",
        secs(p50),
        secs(p99),
        v.len(),
        loadavg()
    );
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn guest_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // target/guest, where `cirrus up` looks (beside target/<profile>/deps/this).
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target/<profile>/deps/guests-*");
    let out = target.join("guest");
    let ok = Command::new("bash")
        .arg(root.join("scripts/guest/build.sh"))
        .arg(&out)
        .status()
        .expect("scripts/guest/build.sh");
    assert!(ok.success(), "guest build failed");
    out
}

// ---------------------------------------------------------------- the floor

/// A network namespace with a bridge, taps and a dnsmasq, and the QEMUs in
/// it: all of it ours, all of it gone when dropped.
struct Floor {
    ns: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Floor {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    sh("ip", &a);
}

fn mac(i: usize) -> String {
    format!("52:54:00:77:00:{:02x}", i + 10)
}

/// Config drive in the OpenStack layout (as the agent writes it).
fn config_drive(dir: &Path, name: &str) -> PathBuf {
    let latest = dir.join(format!("{name}-cd/openstack/latest"));
    std::fs::create_dir_all(&latest).unwrap();
    std::fs::write(
        latest.join("meta_data.json"),
        format!(r#"{{"uuid": "00000000-0000-4000-8000-0000000000ff", "name": "{name}", "hostname": "{name}"}}"#),
    )
    .unwrap();
    std::fs::write(latest.join("network_data.json"), "{}").unwrap();
    let iso = dir.join(format!("{name}.iso"));
    sh(
        "genisoimage",
        &[
            "-quiet",
            "-V",
            "config-2",
            "-r",
            "-J",
            "-o",
            iso.to_str().unwrap(),
            dir.join(format!("{name}-cd")).to_str().unwrap(),
        ],
    );
    iso
}

/// `n` guests started at once by hand; each one's QEMU start → `ip=` line
/// (and → `boot`, the init's first line).
fn floor_once(guest: &Path, n: usize) -> Vec<(Duration, Duration)> {
    let tag = unique_tag();
    let ns = format!("gbf{tag}");
    sh("ip", &["netns", "add", &ns]);
    let mut f = Floor {
        ns: ns.clone(),
        dir: tempfile::tempdir().unwrap(),
        children: Vec::new(),
    };
    in_ns(&ns, &["ip", "link", "set", "lo", "up"]);
    in_ns(&ns, &["ip", "link", "add", "br0", "type", "bridge"]);
    in_ns(&ns, &["ip", "addr", "add", "10.77.0.1/24", "dev", "br0"]);
    in_ns(&ns, &["ip", "link", "set", "br0", "up"]);
    let mut dnsmasq = vec![
        "netns",
        "exec",
        &ns,
        "dnsmasq",
        "--keep-in-foreground",
        "--no-hosts",
        "--no-resolv",
        "--port=0",
        "--user=root",
        "--bind-interfaces",
        "--interface=br0",
        "--except-interface=lo",
        "--dhcp-authoritative",
        "--leasefile-ro",
        "--dhcp-range=10.77.0.0,static,255.255.255.0,86400s",
    ];
    let hosts: Vec<String> = (0..n)
        .map(|i| format!("--dhcp-host={},10.77.0.{}", mac(i), i + 10))
        .collect();
    let pid = format!("--pid-file={}/dnsmasq.pid", f.dir.path().display());
    let log = format!("--log-facility={}/dnsmasq.log", f.dir.path().display());
    dnsmasq.extend(hosts.iter().map(String::as_str));
    dnsmasq.extend([pid.as_str(), log.as_str()]);
    f.children.push(
        Command::new("ip")
            .args(&dnsmasq)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq"),
    );
    let mut disks = Vec::new();
    for i in 0..n {
        let tap = format!("tap{i}");
        in_ns(&ns, &["ip", "tuntap", "add", &tap, "mode", "tap"]);
        in_ns(&ns, &["ip", "link", "set", &tap, "master", "br0", "up"]);
        let overlay = f.dir.path().join(format!("g{i}.qcow2"));
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                guest.join("root.qcow2").to_str().unwrap(),
                overlay.to_str().unwrap(),
            ],
        );
        disks.push((overlay, config_drive(f.dir.path(), &format!("g{i}"))));
    }
    // dnsmasq is listening before any guest starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f.dir.path().join("dnsmasq.pid").exists() {
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    for (i, (overlay, iso)) in disks.iter().enumerate() {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &ns, "qemu-system-x86_64"])
            .args(["-machine", "accel=tcg", "-m", "512", "-smp", "1"])
            .args(["-nodefaults", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initramfs.img"))
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                iso.display()
            ))
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname=tap{i},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={},romfile=", mac(i)),
            ])
            .args(["-serial", "stdio", "-monitor", "none", "-display", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        let out = c.stdout.take().unwrap();
        f.children.push(c);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).to_string();
                if tx.send((i, t0.elapsed(), line)).is_err() {
                    break;
                }
            }
        });
    }
    let mut boot = vec![None; n];
    let mut ip = vec![None; n];
    let deadline = Instant::now() + GUEST;
    while ip.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, at, line) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("floor: not every guest got an address: {ip:?}"));
        if line.contains("CIRRUS-GUEST boot") && boot[i].is_none() {
            boot[i] = Some(at);
        }
        if let Some(rest) = line.split("CIRRUS-GUEST ip=").nth(1) {
            assert_eq!(
                rest.trim(),
                format!("10.77.0.{}/24", i + 10),
                "floor guest {i}'s address"
            );
            ip[i].get_or_insert(at);
        }
    }
    drop(f);
    ip.into_iter()
        .zip(boot)
        .map(|(ip, boot)| (ip.unwrap(), boot.unwrap_or_default()))
        .collect()
}

// ---------------------------------------------------------------- the cloud

/// What one boot looked like, on one clock from the create call.
#[derive(Default, Debug)]
struct Boot {
    id: String,
    /// CreateServer answered.
    created: Duration,
    /// vm_state active, no task.
    active: Option<Duration>,
    /// The `ip=` line in the serial log on the host / through GetConsoleLog.
    ip_host: Option<Duration>,
    ip_api: Option<Duration>,
    /// Every event seen, by name, first time seen.
    events: BTreeMap<String, Duration>,
    delete: Option<Duration>,
}

fn first(events: &mut BTreeMap<String, Duration>, name: String, at: Duration) {
    events.entry(name).or_insert(at);
}

struct Api {
    servers: ServersClient<Channel>,
    token: String,
    network: String,
    image: String,
    agent_dir: PathBuf,
}

impl Api {
    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.set_timeout(Duration::from_secs(60));
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        r
    }
}

/// A TLS channel to a service's public endpoint, checked against its mesh name.
async fn public_channel(ca: &Path, port: u16, name: &str) -> Channel {
    let tls = sidecar::tls::client_config(ca, None).expect("client TLS");
    let connector = sidecar::connector::MeshConnector::with_config(tls);
    let authority = format!("127.0.0.1:{port}");
    connector.expect(&authority, name);
    tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .unwrap_or_else(|e| panic!("{name} at {authority}: {e}"))
}

fn profile_field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
        .unwrap_or_default()
}

/// Polls the host side of one server: its files, libvirt's status of its
/// domain, its serial log; until the `ip=` line is seen or `stop` is set.
async fn watch_host(
    agent_dir: PathBuf,
    id: String,
    t0: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> BTreeMap<String, Duration> {
    use std::sync::atomic::Ordering;
    let mut ev = BTreeMap::new();
    let dir = agent_dir.join("servers").join(&id);
    let status = PathBuf::from(format!("/run/libvirt/qemu/cirrus-{id}.xml"));
    let deadline = Instant::now() + GUEST;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let at = t0.elapsed();
        for (f, name) in [
            ("", "host: server directory made"),
            ("disk.qcow2", "host: root overlay made"),
            ("config-drive.iso", "host: config drive made"),
            ("console.log", "host: serial log opened (QEMU started)"),
        ] {
            if !ev.contains_key(name) && dir.join(f).exists() {
                first(&mut ev, name.into(), at);
            }
        }
        if let Ok(x) = std::fs::read_to_string(&status) {
            if x.contains("state='paused'") {
                first(&mut ev, "libvirt: domain paused".into(), at);
            }
            if x.contains("state='running'") {
                first(&mut ev, "libvirt: domain running (resumed)".into(), at);
            }
        }
        if let Ok(log) = std::fs::read_to_string(dir.join("console.log")) {
            if log.contains("CIRRUS-GUEST boot") {
                first(&mut ev, "guest: init started (boot line)".into(), at);
            }
            if log.contains("CIRRUS-GUEST hostname=") {
                first(&mut ev, "guest: config drive read".into(), at);
            }
            if log.contains("CIRRUS-GUEST ip=") {
                first(&mut ev, "guest: DHCP address (host serial log)".into(), at);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ev
}

async fn boot_one(api: &Api, name: &str, t0: Instant) -> Boot {
    let mut c = api.servers.clone();
    let s = c
        .create_server(api.req(pb::CreateServerRequest {
            name: name.into(),
            flavor: "m1.tiny".into(),
            image_id: api.image.clone(),
            networks: vec![pb::NetworkRequest {
                network_id: api.network.clone(),
                ..Default::default()
            }],
            idempotency_key: format!("bench-{}", unique_tag()),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
        .into_inner();
    let mut b = Boot {
        id: s.id.clone(),
        created: t0.elapsed(),
        ..Default::default()
    };
    first(
        &mut b.events,
        format!(
            "api: CreateServer answered ({}/{})",
            s.vm_state, s.task_state
        ),
        b.created,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host = tokio::spawn(watch_host(
        api.agent_dir.clone(),
        s.id.clone(),
        t0,
        stop.clone(),
    ));

    // WatchServer until active (each change of states, first seen).
    let watch = async {
        let mut ev = Vec::new();
        let mut st = c
            .clone()
            .watch_server(api.req(pb::ServerRef { id: s.id.clone() }))
            .await
            .expect("watch")
            .into_inner();
        let mut last = (String::new(), String::new());
        let deadline = tokio::time::Instant::now() + GUEST;
        loop {
            let m = tokio::time::timeout_at(deadline, st.message())
                .await
                .unwrap_or_else(|_| panic!("{name} not active in {GUEST:?}; last {last:?}"))
                .expect("watch stream")
                .expect("watch ended");
            let now = (m.vm_state.clone(), m.task_state.clone());
            if now != last {
                let task = if m.task_state.is_empty() {
                    "none"
                } else {
                    &m.task_state
                };
                ev.push((format!("watch: {} / {task}", m.vm_state), t0.elapsed()));
                last = now;
            }
            assert_ne!(m.vm_state, "error", "{name}: {:?}", m.fault);
            if m.vm_state == "active" && m.task_state.is_empty() {
                return (ev, t0.elapsed());
            }
        }
    };
    // GetConsoleLog until the address is there, as a user sees it.
    let console = async {
        let deadline = Instant::now() + GUEST;
        loop {
            let log = c
                .clone()
                .get_console_log(api.req(pb::GetConsoleLogRequest {
                    id: s.id.clone(),
                    lines: 0,
                }))
                .await
                .map(|r| r.into_inner().output)
                .unwrap_or_default();
            if log.contains("CIRRUS-GUEST ip=") {
                return t0.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no address on the console in {GUEST:?}: {log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ((ev, active), ip_api) = tokio::join!(watch, console);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let host = host.await.unwrap();
    b.active = Some(active);
    b.ip_api = Some(ip_api);
    b.ip_host = host.get("guest: DHCP address (host serial log)").copied();
    for (k, v) in ev {
        first(&mut b.events, k, v);
    }
    b.events.extend(host);
    first(
        &mut b.events,
        "api: DHCP address through GetConsoleLog".into(),
        ip_api,
    );
    b
}

async fn delete(api: &Api, b: &mut Boot) {
    let t = Instant::now();
    let mut c = api.servers.clone();
    c.delete_server(api.req(pb::ServerRef { id: b.id.clone() }))
        .await
        .expect("delete");
    let st = c
        .watch_server(api.req(pb::ServerRef { id: b.id.clone() }))
        .await;
    if let Ok(st) = st {
        let mut st = st.into_inner();
        let deadline = tokio::time::Instant::now() + GUEST;
        loop {
            match tokio::time::timeout_at(deadline, st.message()).await {
                Ok(Ok(Some(m))) if m.vm_state != "deleted" => continue,
                Ok(_) => break,
                Err(_) => panic!("{} not deleted in {GUEST:?}", b.id),
            }
        }
    }
    b.delete = Some(t.elapsed());
}

fn breakdown(b: &Boot) {
    let mut ev: Vec<(&String, &Duration)> = b.events.iter().collect();
    ev.sort_by_key(|(_, at)| **at);
    println!("\nper-step breakdown of one boot (server {}):", b.id);
    println!("  {:>8}  {:>8}  event", "at", "step");
    let mut prev = Duration::ZERO;
    for (name, at) in ev {
        println!(
            "  {:>8}  {:>8}  {name}",
            format!("{:.3}", at.as_secs_f64()),
            format!("+{:.3}", at.saturating_sub(prev).as_secs_f64())
        );
        prev = *at;
    }
}

/// The agent's log lines about one server (its steps, as far as it logs them).
fn agent_log(state: &Path, id: &str) {
    let Ok(rd) = std::fs::read_dir(state.join("logs")) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        if !["agent", "conductor", "scheduler", "compute-api"]
            .iter()
            .any(|s| n.starts_with(s))
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(id)).collect();
        if !lines.is_empty() {
            println!("  {n}: {} lines about it:", lines.len());
            for l in lines.iter().take(12) {
                println!("    {}", l.chars().take(220).collect::<String>());
            }
        }
    }
}

fn find_dir(root: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    if root.file_name().is_some_and(|n| n == name) && root.join("servers").is_dir() {
        return Some(root.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    for e in std::fs::read_dir(root).ok()?.flatten() {
        if e.file_type().ok()?.is_dir()
            && let Some(d) = find_dir(&e.path(), name, depth - 1)
        {
            return Some(d);
        }
    }
    None
}

async fn cloud_bench(floor_one: Duration) {
    let serial = env_n("GUESTS_SERIAL", 5);
    let rounds = env_n("GUESTS_ROUNDS", 2);
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::new(&[("CIRRUS_DATABASE_URL", db.url.as_str())]);
    let t = Instant::now();
    let o = cloud.start_with(&["--driver", "qemu"]).await;
    assert!(
        o.status.success(),
        "cirrus up: {}{}",
        stdout(&o),
        stderr(&o)
    );
    println!(
        "\ncirrus up --driver qemu: {} (load {})",
        secs(t.elapsed()),
        loadavg()
    );

    // A first boot through the CLI, as a user would: its wall time, and the
    // image cached on the host (this one is cold: not in the figures).
    let t = Instant::now();
    let cold = json(
        &cloud,
        &[
            "server",
            "create",
            "cold",
            "--flavor",
            "m1.tiny",
            "--image",
            "cirrus-tiny",
            "--network",
            "default",
            "--wait",
        ],
    )
    .await;
    println!(
        "cold boot via `cirrus server create --wait` (image download, CLI start, TLS, login): {} to active (load {})",
        secs(t.elapsed()),
        loadavg()
    );
    let image = cold["image_id"].as_str().unwrap_or_default().to_string();
    let network = json(&cloud, &["network", "show", "default"]).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!image.is_empty() && !network.is_empty(), "{cold}");
    let token = json(&cloud, &["token", "issue"]).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let profile = std::fs::read_to_string(cloud.profile()).unwrap();
    let ca = PathBuf::from(profile_field(&profile, "ca_cert"));
    let ch = public_channel(&ca, cloud.ports("compute-api").2, "compute-api").await;
    let agent_dir = find_dir(cloud.state.path(), "compute-agent", 3)
        .expect("the compute agent's state directory");
    let api = Api {
        servers: ServersClient::new(ch),
        token,
        network,
        image,
        agent_dir,
    };
    cloud
        .admin_ok(&["server", "delete", "cold", "--wait"])
        .await;

    // One at a time, each deleted before the next.
    let mut boots = Vec::new();
    for i in 0..serial {
        let t0 = Instant::now();
        let mut b = boot_one(&api, &format!("one-{i}"), t0).await;
        delete(&api, &mut b).await;
        println!(
            "  one-{i}: active {}  ip(host log) {}  ip(api) {}  delete {}  load {}",
            secs(b.active.unwrap()),
            secs(b.ip_host.unwrap_or_default()),
            secs(b.ip_api.unwrap()),
            secs(b.delete.unwrap()),
            loadavg()
        );
        boots.push(b);
    }

    // Five at once.
    let mut five: Vec<Boot> = Vec::new();
    let mut all_five = Vec::new();
    for r in 0..rounds {
        let t0 = Instant::now();
        let names: Vec<String> = (0..5).map(|i| format!("five-{r}-{i}")).collect();
        let bs = futures_util::future::join_all(names.iter().map(|n| boot_one(&api, n, t0))).await;
        let all = bs
            .iter()
            .map(|b| b.ip_api.unwrap().max(b.ip_host.unwrap_or_default()))
            .max()
            .unwrap();
        let all_active = bs.iter().map(|b| b.active.unwrap()).max().unwrap();
        println!(
            "  five-{r}: all active {}  all with an address (api) {}  load {}",
            secs(all_active),
            secs(all),
            loadavg()
        );
        all_five.push(all);
        let mut bs = bs;
        for b in &mut bs {
            delete(&api, b).await;
        }
        five.extend(bs);
    }

    let get = |bs: &[Boot], f: fn(&Boot) -> Option<Duration>| -> Vec<Duration> {
        bs.iter().filter_map(f).collect()
    };
    println!("\n== cloud (TCG, m1.tiny 512 MB, 1 vCPU; warm image cache) ==");
    summary(
        "one at a time: create -> active",
        &get(&boots, |b| b.active),
        "target p50 <= 1.5 s; Nova/Rally c=5 boot mean 12-13 s (KVM)",
    );
    summary(
        "one at a time: create -> ip (host log)",
        &get(&boots, |b| b.ip_host),
        &format!(
            "target p50 <= 8 s and within 2 s of the floor ({} here)",
            secs(floor_one)
        ),
    );
    summary(
        "one at a time: create -> ip (GetConsoleLog)",
        &get(&boots, |b| b.ip_api),
        "as a user sees it (agent ships the log every 500 ms)",
    );
    let bad: Vec<Duration> = boots
        .iter()
        .map(|b| b.active.unwrap() + b.delete.unwrap())
        .collect();
    summary(
        "one at a time: boot-and-delete",
        &bad,
        "Rally boot-and-delete median 5.8 s at c=4 (KVM)",
    );
    summary(
        "five at once: create -> active (each)",
        &get(&five, |b| b.active),
        "Nova/Rally c=5 boot mean 12-13 s (KVM)",
    );
    summary(
        "five at once: create -> ip (GetConsoleLog)",
        &get(&five, |b| b.ip_api),
        "target p50 <= 8 s",
    );
    summary(
        "five at once: all five with an address",
        &all_five,
        "target <= 20 s for all five",
    );
    if let Some(b) = boots.first() {
        breakdown(b);
        agent_log(cloud.state.path(), &b.id);
    }
    cloud.down().await;
}

fn main() {
    println!(
        "guests bench, {} UTC, load {} (figures compare only with the floor of this same run)",
        sh("date", &["-u", "+%F %T"]).trim(),
        loadavg()
    );
    let guest = guest_dir();
    let runs = env_n("GUESTS_FLOOR_RUNS", 3);

    println!(
        "\n== the floor: QEMU by hand (same kernel, initramfs, 512 MB, overlay + config drive, tap + dnsmasq) =="
    );
    let mut floor = BTreeMap::new();
    for n in [1usize, 2, 5] {
        let mut ip = Vec::new();
        let mut init = Vec::new();
        let rounds = if n == 5 { 1 } else { runs };
        for _ in 0..rounds {
            for (a, b) in floor_once(&guest, n) {
                ip.push(a);
                init.push(b);
            }
        }
        summary(
            &format!("floor, {n} at once: QEMU start -> init"),
            &init,
            "Firecracker 125 ms to guest init (KVM, minimal kernel)",
        );
        summary(
            &format!("floor, {n} at once: QEMU start -> ip"),
            &ip,
            "ARCHITECTURE.md: 5.7-6.0 s, two at once",
        );
        floor.insert(n, pct(&ip).0);
    }

    if env_n("GUESTS_CLOUD", 1) == 0 {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(cloud_bench(floor[&1]));
}
