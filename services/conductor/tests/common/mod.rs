//! A whole compute control plane for one test, every part real: its own
//! Postgres database, the queue service, compute-api, one or more
//! schedulers, conductor, and compute agents on libvirt's `test:///default`
//! driver — each served on an ephemeral loopback port. Tests act as the
//! sidecars: they set the trusted `x-cirrus-*` headers of the caller they
//! play (agents send their own SPIFFE id, as they do without a sidecar).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use compute_agent::libvirt::Libvirt;
use proto::compute::v1 as pb;
use proto::compute::v1::hosts_client::HostsClient;
use proto::compute::v1::servers_client::ServersClient;
use runtime::caller::Caller;
use runtime::config::{DatabaseConfig, ServerConfig};
use runtime::db::TestDatabase;
use runtime::testing::{Served, admin, req, wait_for};
use tonic::transport::Channel;

#[allow(unused_imports)]
pub use runtime::testing::{member_a, member_b, reader_a};

#[path = "../../../compute-api/tests/support/image.rs"]
mod image_support;
#[allow(unused_imports)]
pub use image_support::{TINY_IMAGE_BYTES, start_image, upload_image};

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Options {
    pub schedulers: usize,
    pub build_timeout_secs: u64,
    pub host_down_after_secs: u64,
    /// Run conductor as its real binary, a child process (to SIGKILL it).
    pub conductor_process: bool,
    /// Run the (one) scheduler as its real binary, a child process.
    pub scheduler_process: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            schedulers: 1,
            build_timeout_secs: 120,
            host_down_after_secs: 3,
            conductor_process: false,
            scheduler_process: false,
        }
    }
}

/// A service's real binary run as a child process, configured through the
/// environment as an operator would; healthy (its health service answers on
/// `addr`) before `spawn` returns. Dropping it kills it.
pub struct Process {
    pub addr: SocketAddr,
    what: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
}

/// A free loopback address (bound, then let go, for a child to bind).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A binary of the workspace built beside this test binary (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{name} is not built in {}: run `cargo build -p {name} --bins` first",
        dir.display()
    );
    bin
}

impl Process {
    /// A lazy plaintext channel to the process's listener.
    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    pub async fn spawn(
        what: &str,
        bin: PathBuf,
        addr: SocketAddr,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut p = Self {
            addr,
            what: what.into(),
            bin,
            env,
            child: None,
        };
        p.start().await;
        p
    }

    /// Starts the binary again (after [`Process::kill9`]) on the same address.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.what);
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("serve")
            .env_remove("CIRRUS_CONFIG")
            .env("CIRRUS_SERVER__LISTEN", self.addr.to_string())
            .env("CIRRUS_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{} ({}) starts: {e}", self.what, self.bin.display())),
        );
        let addr = self.addr;
        wait_for(
            &format!("{} healthy", self.what),
            Duration::from_secs(60),
            || async move { runtime::serve::healthcheck(addr).await },
        )
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(tokio::process::Child::id)
            .expect("running")
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {} ({})", self.pid(), self.what);
    }

    /// SIGKILL, and waits until the process is gone: no code of it runs after.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{} ended by SIGKILL: {status}",
            self.what
        );
    }
}

/// The environment that configures a service binary as `cfg` says
/// (`CIRRUS_<FIELD>`, nested fields joined by `__`).
pub fn config_env<T: serde::Serialize>(cfg: &T) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.to_ascii_uppercase()
                    } else {
                        format!("{prefix}__{}", k.to_ascii_uppercase())
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => out.push((format!("CIRRUS_{prefix}"), s.clone())),
            other => out.push((format!("CIRRUS_{prefix}"), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", &serde_json::to_value(cfg).unwrap(), &mut out);
    // The listen addresses are the Process's.
    out.retain(|(k, _)| !k.starts_with("CIRRUS_SERVER__"));
    out
}

/// Conductor, in this process or as a child process.
pub struct Conductor {
    pub addr: SocketAddr,
    pub channel: Channel,
    served: Option<Served>,
    pub process: Option<Process>,
}

pub struct Cloud {
    pub db: TestDatabase,
    pub queue: Served,
    /// The image service (schema `image` of the test database), which
    /// compute-api asks as the caller at every create.
    pub image: Served,
    /// A public, active raw image of 4 KiB that every test boots.
    pub image_id: String,
    pub api: Served,
    /// A second compute-api calling the second scheduler (with two).
    pub api2: Option<Served>,
    pub schedulers: Vec<Served>,
    pub conductor: Conductor,
    /// The scheduler as a child process (with `scheduler_process`).
    pub scheduler_process: Option<Process>,
    pub agents: HashMap<String, AgentRun>,
    pub state: tempfile::TempDir,
    pub options: Options,
    /// A connection that keeps the in-process test driver's state alive
    /// while agents come and go (it frees its domains with its last
    /// connection): the hypervisor outlives its agent, as on a real host.
    pub hypervisor: Libvirt,
}

fn server_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
    }
}

async fn healthy(s: &Served, what: &str) {
    let addr = s.addr;
    wait_for(what, WAIT, || async move {
        runtime::serve::healthcheck(addr).await
    })
    .await;
}

impl Cloud {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let db = TestDatabase::create().await.expect("test database");
        let database = |schema: &str| DatabaseConfig {
            url: db.url.clone(),
            schema: schema.into(),
            pool_size: 8,
        };
        let queue_cfg = queue::Config {
            server: server_config(),
            database: database("queue"),
            committers: 2,
            poll_interval_ms: 50,
            trust_direct_callers: true,
            ..Default::default()
        };
        let queue = Served::spawn(|l, s| queue::run(queue_cfg, l, s)).await;
        healthy(&queue, "the queue").await;
        let queue_url = format!("http://{}", queue.addr);
        let state = tempfile::tempdir().unwrap();
        let (image, image_id) = start_image(&db.url, &state.path().join("image-store")).await;

        // Schedulers first (they connect lazily), so compute-api knows one.
        let mut schedulers = Vec::new();
        let mut scheduler_process = None;
        let scheduler_cfg = scheduler::Config {
            server: server_config(),
            database: database("compute"),
            queue_url: queue_url.clone(),
            host_down_after_secs: options.host_down_after_secs,
            ..Default::default()
        };
        if options.scheduler_process {
            scheduler_process = Some(
                Process::spawn(
                    "the scheduler binary",
                    workspace_bin("scheduler"),
                    free_addr(),
                    config_env(&scheduler_cfg),
                )
                .await,
            );
        } else {
            for _ in 0..options.schedulers.max(1) {
                let cfg = scheduler_cfg.clone();
                schedulers.push(Served::spawn(|l, s| scheduler::run(cfg, l, s)).await);
            }
        }
        let scheduler_addr = match &scheduler_process {
            Some(p) => p.addr,
            None => schedulers[0].addr,
        };
        let api_cfg = compute_api::Config {
            server: server_config(),
            database: database("compute"),
            scheduler_url: format!("http://{scheduler_addr}"),
            queue_url: queue_url.clone(),
            host_down_after_secs: options.host_down_after_secs,
            // Image is here; network and volume are not (requests naming
            // them are refused: FAILED_PRECONDITION).
            peers: compute_api::peers::PeersConfig {
                image: Some(format!("http://{}", image.addr)),
                ..Default::default()
            },
            ..Default::default()
        };
        let api2_cfg = (schedulers.len() > 1).then(|| compute_api::Config {
            scheduler_url: format!("http://{}", schedulers[1].addr),
            ..api_cfg.clone()
        });
        let api = Served::spawn(|l, s| compute_api::run(api_cfg, l, s)).await;
        healthy(&api, "compute-api (and its migrations)").await;
        let api2 = match api2_cfg {
            Some(cfg) => {
                let a = Served::spawn(|l, s| compute_api::run(cfg, l, s)).await;
                healthy(&a, "the second compute-api").await;
                Some(a)
            }
            None => None,
        };
        let conductor_cfg = conductor::Config {
            server: server_config(),
            database: database("compute"),
            queue_url,
            build_timeout_secs: options.build_timeout_secs,
            sweep_interval_ms: 100,
            host_down_after_secs: options.host_down_after_secs,
            ..Default::default()
        };
        let conductor = if options.conductor_process {
            let p = Process::spawn(
                "the conductor binary",
                PathBuf::from(env!("CARGO_BIN_EXE_conductor")),
                free_addr(),
                config_env(&conductor_cfg),
            )
            .await;
            Conductor {
                addr: p.addr,
                channel: p.channel(),
                served: None,
                process: Some(p),
            }
        } else {
            let served = Served::spawn(|l, s| conductor::run(conductor_cfg, l, s)).await;
            healthy(&served, "conductor").await;
            Conductor {
                addr: served.addr,
                channel: served.channel.clone(),
                served: Some(served),
                process: None,
            }
        };
        for s in &schedulers {
            healthy(s, "a scheduler").await;
        }
        Self {
            db,
            queue,
            image,
            image_id,
            api,
            api2,
            schedulers,
            conductor,
            scheduler_process,
            agents: HashMap::new(),
            state,
            options,
            hypervisor: tokio::task::spawn_blocking(|| {
                Libvirt::open("test:///default", "test").unwrap()
            })
            .await
            .unwrap(),
        }
    }

    /// An agent's config for `host`: 4 vCPUs, 4 GiB, 40 GB, no overcommit.
    pub fn agent_config(&self, host: &str) -> compute_agent::Config {
        compute_agent::Config {
            server: server_config(),
            host: host.into(),
            state_dir: self.state_dir(host),
            conductor_url: format!("http://{}", self.conductor.addr),
            queue_url: format!("http://{}", self.queue.addr),
            heartbeat_interval_ms: 200,
            vcpus: Some(4),
            ram_mb: Some(4096),
            disk_gb: 40,
            cpu_allocation_ratio: 1.0,
            ram_allocation_ratio: 1.0,
            disk_allocation_ratio: 1.0,
            ..Default::default()
        }
    }

    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.state.path().join(host)
    }

    /// Starts an agent and waits until its host is up.
    pub async fn start_agent_with(&mut self, cfg: compute_agent::Config) {
        let host = cfg.host.clone();
        self.agents.insert(host.clone(), AgentRun::spawn(cfg));
        self.wait_host_up(&host).await;
    }

    /// Waits until compute-api shows `host` up (its agent heartbeats).
    pub async fn wait_host_up(&self, host: &str) {
        let hosts = self.hosts();
        let h = host.to_string();
        wait_for(&format!("host {host} up"), WAIT, || {
            let mut hosts = hosts.clone();
            let h = h.clone();
            async move {
                match hosts.get_host(req(pb::HostRef { name: h }, &admin())).await {
                    Ok(r) if r.get_ref().up => Ok(()),
                    Ok(r) => Err(format!("{:?}", r.into_inner())),
                    Err(s) => Err(s.to_string()),
                }
            }
        })
        .await;
    }

    /// Runs the real compute-agent binary as `cfg` says, as a child process
    /// (its own `test:///default` hypervisor, which dies with it); returns
    /// once its host is up.
    pub async fn spawn_agent_process(&self, cfg: &compute_agent::Config) -> Process {
        let p = Process::spawn(
            &format!("the compute-agent binary ({})", cfg.host),
            workspace_bin("compute-agent"),
            free_addr(),
            config_env(cfg),
        )
        .await;
        self.wait_host_up(&cfg.host).await;
        p
    }

    pub async fn start_agent(&mut self, host: &str) {
        let cfg = self.agent_config(host);
        self.start_agent_with(cfg).await;
    }

    /// Stops an agent abruptly: its runtime is dropped with every task of
    /// it wherever it was (no unwinding runs), as a kill -9 would; the
    /// hypervisor (the test driver, in this process) keeps its domains.
    pub fn kill_agent(&mut self, host: &str) {
        drop(self.agents.remove(host));
    }

    pub async fn set_host(&self, host: &str, enabled: bool) {
        self.hosts()
            .set_host(req(
                pb::SetHostRequest {
                    name: host.into(),
                    enabled,
                    disabled_reason: if enabled {
                        String::new()
                    } else {
                        "test".into()
                    },
                },
                &admin(),
            ))
            .await
            .expect("set host");
    }

    pub fn servers(&self) -> ServersClient<Channel> {
        ServersClient::new(self.api.channel.clone())
    }

    pub fn hosts(&self) -> HostsClient<Channel> {
        HostsClient::new(self.api.channel.clone())
    }

    pub async fn create(&self, who: &Caller, name: &str, flavor: &str) -> pb::Server {
        self.servers()
            .create_server(req(
                pb::CreateServerRequest {
                    name: name.into(),
                    flavor: flavor.into(),
                    image_id: self.image_id.clone(),
                    ..Default::default()
                },
                who,
            ))
            .await
            .expect("create server")
            .into_inner()
    }

    /// Waits until the server is in `vm_state` with no task; returns it as an admin sees it.
    pub async fn wait_vm(&self, id: &str, vm_state: &str) -> pb::Server {
        let servers = self.servers();
        wait_for(&format!("server {id} {vm_state}"), WAIT, || {
            let mut c = servers.clone();
            let id = id.to_string();
            async move {
                match c.get_server(req(pb::ServerRef { id }, &admin())).await {
                    Ok(r)
                        if r.get_ref().vm_state == vm_state
                            && r.get_ref().task_state.is_empty() =>
                    {
                        Ok(r.into_inner())
                    }
                    Ok(r) => Err(format!(
                        "{}/{} fault {:?}",
                        r.get_ref().vm_state,
                        r.get_ref().task_state,
                        r.get_ref().fault
                    )),
                    Err(s) if s.code() == tonic::Code::NotFound && vm_state == "deleted" => {
                        Ok(pb::Server {
                            vm_state: "deleted".into(),
                            ..Default::default()
                        })
                    }
                    Err(s) => Err(s.to_string()),
                }
            }
        })
        .await
    }

    pub async fn sql(&self) -> runtime::db::tokio_postgres::Client {
        let c = runtime::db::connect(&self.db.url).await.unwrap();
        c.batch_execute("SET search_path = compute").await.unwrap();
        c
    }

    /// (claims, vCPUs, RAM, disk) in use over every host.
    pub async fn usage(&self) -> (i64, i64, i64, i64) {
        let c = self.sql().await;
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM claims), COALESCE(sum(vcpus_used),0)::bigint, \
                 COALESCE(sum(ram_mb_used),0)::bigint, COALESCE(sum(disk_gb_used),0)::bigint FROM hosts",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    }

    /// Whether the test driver holds a domain for the server.
    pub async fn domain_exists(&self, id: &str) -> bool {
        let id = uuid::Uuid::parse_str(id).unwrap();
        let lv = self.hypervisor.clone();
        tokio::task::spawn_blocking(move || lv.exists(id).unwrap())
            .await
            .unwrap()
    }

    /// Files left for the server in the agent's state directory.
    pub fn leftovers(&self, host: &str, id: &str) -> Vec<String> {
        let dir = self.state_dir(host).join("servers").join(id);
        let mut out = Vec::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            out.push(d.display().to_string());
            for e in rd.flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().display().to_string());
                }
            }
        }
        out
    }

    /// Every state the server passes through from now on, until `until`.
    pub async fn watch(&self, who: &Caller, id: &str) -> tonic::Streaming<pb::Server> {
        self.servers()
            .watch_server(req(pb::ServerRef { id: id.into() }, who))
            .await
            .expect("watch")
            .into_inner()
    }
}

/// Reads a watch until the server reaches `vm_state` with no task; the
/// (vm_state, task_state) pairs seen.
pub async fn watch_until(
    stream: &mut tonic::Streaming<pb::Server>,
    vm_state: &str,
) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let done = tokio::time::timeout(WAIT, async {
        while let Some(s) = stream.message().await.expect("watch stream") {
            seen.push((s.vm_state.clone(), s.task_state.clone()));
            if s.vm_state == vm_state && s.task_state.is_empty() {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(done, Ok(true)),
        "watch did not reach {vm_state}; saw {seen:?}"
    );
    seen
}

/// A compute agent on a runtime of its own (two worker threads), so that
/// killing it drops every task it spawned at once — heartbeats, the
/// consumer, builds midway — the way a kill -9 ends a process.
pub struct AgentRun {
    pub addr: std::net::SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentRun {
    pub fn spawn(cfg: compute_agent::Config) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn(async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                if let Err(e) = compute_agent::run(cfg, l, std::future::pending::<()>()).await {
                    eprintln!("compute agent ended: {e:#}");
                }
            });
            let _ = stopped.recv();
            rt.shutdown_background();
        });
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
