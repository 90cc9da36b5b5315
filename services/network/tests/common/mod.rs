//! The network test harness: a real `network` server (one or more replicas
//! on one test database), a real `network-agent` on a test-unique bridge and
//! namespace prefix, and stand-in guests (namespaces on a veth whose bridge
//! end carries the port's `iface-id`). Everything made is removed on drop,
//! even when the test panics.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command as StdCommand;
use std::time::Duration;

use network::Config;
use proto::network::v1 as pb;
use proto::network::v1::networks_client::NetworksClient;
use runtime::caller::Caller;
use runtime::db::TestDatabase;
use runtime::testing::{Served, admin, req, wait_for};
use tonic::transport::Channel;

/// `who`'s token as the compute agent of `host` passes it along (the
/// sidecar sets the verified peer beside the token's claims).
pub fn via(who: &Caller, host: &str) -> Caller {
    Caller {
        peer: Some(format!(
            "spiffe://cirrus.local/svc/compute-agent/host/{host}"
        )),
        ..who.clone()
    }
}

pub fn uniq() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_string()
}

pub fn config(db: &TestDatabase) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.metrics_listen = None;
    c.database.url = db.url.clone();
    c.database.pool_size = 8;
    c.agent_down_secs = 5;
    c
}

/// One or more served replicas of `network` on one database.
pub struct Cloud {
    pub replicas: Vec<Served>,
    pub db: TestDatabase,
}

impl Cloud {
    pub async fn start(replicas: usize) -> Self {
        Self::start_with(replicas, |_| {}).await
    }

    pub async fn start_with(replicas: usize, tweak: impl Fn(&mut Config)) -> Self {
        let db = TestDatabase::create()
            .await
            .expect("test database (is Postgres running?)");
        let mut cloud = Cloud {
            replicas: Vec::new(),
            db,
        };
        // One after the other: each serving (migrations done) before the next starts.
        for i in 0..replicas {
            let mut c = config(&cloud.db);
            tweak(&mut c);
            cloud
                .replicas
                .push(Served::spawn(move |l, s| network::run(c, l, s)).await);
            let c = cloud.client_of(i);
            wait_for("network serving", Duration::from_secs(30), || {
                let mut c = c.clone();
                async move {
                    c.list_agents(req(pb::ListAgentsRequest {}, &admin()))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            })
            .await;
        }
        cloud
    }

    pub fn client(&self) -> NetworksClient<Channel> {
        self.client_of(0)
    }

    pub fn client_of(&self, i: usize) -> NetworksClient<Channel> {
        NetworksClient::new(self.replicas[i].channel.clone())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.replicas[0].addr)
    }

    pub async fn network(&self, who: &Caller, name: &str) -> pb::Network {
        self.client()
            .create_network(req(
                pb::CreateNetworkRequest {
                    name: name.into(),
                    ..Default::default()
                },
                who,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn subnet(&self, who: &Caller, network: &str, cidr: &str) -> pb::Subnet {
        self.client()
            .create_subnet(req(
                pb::CreateSubnetRequest {
                    network_id: network.into(),
                    cidr: cidr.into(),
                    dns_nameservers: vec!["192.0.2.53".into()],
                    ..Default::default()
                },
                who,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn port(
        &self,
        who: &Caller,
        network: &str,
        ip: Option<&str>,
        groups: &[&str],
    ) -> pb::Port {
        self.client()
            .create_port(req(
                pb::CreatePortRequest {
                    network_id: network.into(),
                    fixed_ips: ip
                        .map(|ip| {
                            vec![pb::FixedIpRequest {
                                subnet_id: String::new(),
                                ip_address: ip.into(),
                            }]
                        })
                        .unwrap_or_default(),
                    security_groups: groups.iter().map(|g| g.to_string()).collect(),
                    device_id: format!("vm-{}", uniq()),
                    ..Default::default()
                },
                who,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn bind(
        &self,
        who: &Caller,
        port: &str,
        host: &str,
    ) -> Result<pb::Port, tonic::Status> {
        self.client()
            .bind_port(req(
                pb::BindPortRequest {
                    port_id: port.into(),
                    host: host.into(),
                },
                who,
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get_port(&self, who: &Caller, id: &str) -> pb::Port {
        self.client()
            .get_port(req(pb::GetRequest { id: id.into() }, who))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn wait_status(&self, who: &Caller, id: &str, status: &str) {
        let c = self.client();
        wait_for(
            &format!("port {id} {status}"),
            Duration::from_secs(30),
            || {
                let mut c = c.clone();
                let who = who.clone();
                let id = id.to_string();
                let status = status.to_string();
                async move {
                    let p = c
                        .get_port(req(pb::GetRequest { id }, &who))
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    if p.status == status {
                        Ok(())
                    } else {
                        Err(format!("{p:?}"))
                    }
                }
            },
        )
        .await
    }

    pub async fn wait_agent(&self, host: &str) {
        let c = self.client();
        wait_for(
            &format!("agent {host} alive"),
            Duration::from_secs(30),
            || {
                let mut c = c.clone();
                let host = host.to_string();
                async move {
                    let a = c
                        .list_agents(req(pb::ListAgentsRequest {}, &admin()))
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    if a.agents.iter().any(|a| a.host == host && a.alive) {
                        Ok(())
                    } else {
                        Err(format!("{a:?}"))
                    }
                }
            },
        )
        .await
    }
}

/// A running agent on its own bridge; torn down (bridge, namespaces,
/// dnsmasq, files) on drop.
pub struct Host {
    pub config: network_agent::Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
    /// Stand-in guests made on this host.
    pub guest_prefix: String,
}

impl Host {
    pub fn config(network_url: &str) -> (network_agent::Config, tempfile::TempDir, String) {
        let u = uniq();
        let dir = tempfile::tempdir().unwrap();
        let c = network_agent::Config {
            host: format!("h-{u}"),
            network_url: network_url.into(),
            bridge: format!("bt{u}"),
            namespace_prefix: format!("ct{u}-"),
            state_dir: dir.path().join("agent"),
            heartbeat_secs: 1,
            sync_wait_ms: 5000,
            ..network_agent::Config::default()
        };
        (c, dir, format!("tg{u}"))
    }

    pub async fn start(network_url: &str) -> Self {
        let (config, dir, guest_prefix) = Self::config(network_url);
        let mut h = Host {
            config,
            stop: None,
            task: None,
            dir,
            guest_prefix,
        };
        h.run();
        h
    }

    /// Starts (again) the agent process on this host.
    pub fn run(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = self.config.clone();
        self.task = Some(tokio::spawn(network_agent::run(c, async {
            let _ = rx.await;
        })));
        self.stop = Some(tx);
    }

    /// Stops the agent, leaving its wiring in place (as a crash or an upgrade would).
    pub async fn stop_agent(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("agent stopped within 20 s")
                .unwrap()
                .unwrap();
        }
    }

    /// Kills the agent task (no orderly stop).
    pub fn kill_agent(&mut self) {
        self.stop.take();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// A stand-in guest for `port`: namespace `<guest_prefix><n>` with
    /// `eth0` carrying the port's MAC, its veth peer on the bridge with the
    /// port's `iface-id`.
    pub fn plug(&self, n: u32, port: &pb::Port) -> Guest {
        let ns = format!("{}{n}", self.guest_prefix);
        let short: String = port.id.chars().filter(|c| *c != '-').take(11).collect();
        let host_if = format!("tv{short}");
        let peer = format!("tp{short}");
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", &peer, "name", "eth0"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "link",
            "set",
            "eth0",
            "address",
            &port.mac_address,
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off",
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        let id = format!("external_ids:iface-id={}", port.id);
        sh(&[
            "ovs-vsctl",
            "--timeout=10",
            "add-port",
            &self.config.bridge,
            &host_if,
            "--",
            "set",
            "Interface",
            &host_if,
            &id,
        ]);
        let script = self.dir.path().join("udhcpc.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in\n  bound|renew)\n    ip addr flush dev \"$interface\"\n    ip addr add \"$ip/$mask\" dev \"$interface\"\n    [ -n \"$mtu\" ] && ip link set \"$interface\" mtu \"$mtu\"\n    echo \"$ip $mask $router $mtu $dns\" > \"$LEASE_OUT\"\n    ;;\nesac\nexit 0\n",
        )
        .unwrap();
        sh(&["chmod", "+x", &script.display().to_string()]);
        Guest {
            servers: std::sync::Mutex::new(Vec::new()),
            ns,
            host_if,
            script: script.display().to_string(),
            lease_out: self
                .dir
                .path()
                .join(format!("lease-{n}"))
                .display()
                .to_string(),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_agent();
        cleanup(
            &self.config.bridge,
            &[&self.config.namespace_prefix, &self.guest_prefix],
        );
    }
}

/// Synchronous (drop-safe) removal of a bridge and namespaces by prefix.
pub fn cleanup(bridge: &str, prefixes: &[&str]) {
    let list = StdCommand::new("ip").args(["netns", "list"]).output();
    if let Ok(out) = list {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(ns) = line.split_whitespace().next() else {
                continue;
            };
            if prefixes.iter().any(|p| ns.starts_with(p)) {
                if let Ok(p) = StdCommand::new("ip").args(["netns", "pids", ns]).output() {
                    for pid in String::from_utf8_lossy(&p.stdout).split_whitespace() {
                        let _ = StdCommand::new("kill").args(["-KILL", pid]).status();
                    }
                }
                let _ = StdCommand::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
    if let Ok(out) = StdCommand::new("ovs-vsctl")
        .args(["--timeout=10", "list-ports", bridge])
        .output()
    {
        for p in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = StdCommand::new("ip")
                .args(["link", "del", p.trim()])
                .output();
        }
    }
    let _ = StdCommand::new("ovs-vsctl")
        .args(["--timeout=10", "--if-exists", "del-br", bridge])
        .status();
}

#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = StdCommand::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Guest {
    pub ns: String,
    servers: std::sync::Mutex<Vec<std::process::Child>>,
    pub host_if: String,
    script: String,
    lease_out: String,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for mut c in self
            .servers
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Guest {
    /// Runs udhcpc (bounded) and returns the address it was given.
    pub async fn dhcp(&self) -> Result<String, String> {
        let out = tokio::process::Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t",
                "20", "-T", "1", "-A", "1",
            ])
            .args(["-O", "mtu", "-s", &self.script])
            .env("LEASE_OUT", &self.lease_out)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(40), out)
            .await
            .map_err(|_| "udhcpc ran for 40 s".to_string())?
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "udhcpc: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let lease = std::fs::read_to_string(&self.lease_out).map_err(|e| e.to_string())?;
        Ok(lease)
    }

    /// One ping (1 s bound); true when answered.
    pub async fn ping(&self, ip: &str) -> bool {
        self.run(&["busybox", "ping", "-c", "1", "-W", "1", ip])
            .await
    }

    /// Pings up to `tries` times; true at the first answer.
    pub async fn ping_within(&self, ip: &str, tries: u32) -> bool {
        for _ in 0..tries {
            if self.ping(ip).await {
                return true;
            }
        }
        false
    }

    /// A TCP connect within 2 s.
    pub async fn connect(&self, ip: &str, port: u16) -> bool {
        let target = format!("exec 3<>/dev/tcp/{ip}/{port}");
        self.run(&["timeout", "2", "bash", "-c", &target]).await
    }

    /// A TCP server on `port` accepting forever (killed with the namespace).
    pub fn listen(&self, port: u16) {
        let p = port.to_string();
        let child = StdCommand::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "busybox",
                "nc",
                "-ll",
                "-p",
                &p,
                "-e",
                "/bin/true",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.servers.lock().unwrap().push(child);
    }

    pub async fn run(&self, args: &[&str]) -> bool {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn sh(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.ns];
        a.extend_from_slice(args);
        sh(&a)
    }
}

impl Cloud {
    pub async fn group(&self, who: &Caller, name: &str) -> pb::SecurityGroup {
        self.client()
            .create_security_group(req(
                pb::CreateSecurityGroupRequest {
                    name: name.into(),
                    description: String::new(),
                },
                who,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn rule(
        &self,
        who: &Caller,
        group: &str,
        direction: pb::Direction,
        protocol: pb::Protocol,
        ports: (u32, u32),
        remote_group: &str,
    ) -> Result<pb::SecurityGroupRule, tonic::Status> {
        self.client()
            .create_security_group_rule(req(
                pb::CreateSecurityGroupRuleRequest {
                    security_group_id: group.into(),
                    direction: direction as i32,
                    protocol: protocol as i32,
                    port_range_min: ports.0,
                    port_range_max: ports.1,
                    remote_group_id: remote_group.into(),
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|r| r.into_inner())
    }
}

/// Retries `check` (each try bounded by its own timeout) until it gives
/// `want`, at most `tries` times; for dataplane changes that follow an API
/// call by one agent reconcile.
pub async fn eventually<F, Fut>(tries: u32, mut check: F, want: bool) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if check().await == want {
            return true;
        }
    }
    false
}
