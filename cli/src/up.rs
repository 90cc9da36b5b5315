//! `cirrus up` and `cirrus down`: the dev launcher. It finds or starts
//! Postgres, provisions each service's schema and login role, makes the
//! cluster CA and a short-lived certificate per workload, bootstraps
//! identity, runs every service and its sidecar as child processes with
//! their logs in the state directory, registers them in the catalog, prints
//! the endpoints, renews certificates while it runs, and stops everything on
//! Ctrl-C, SIGTERM or `cirrus down`. A second `cirrus up` reuses the state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use proto::identity::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::profile::Profile;

#[derive(Args, Clone)]
pub struct UpArgs {
    /// Where state, logs, keys, certificates and credentials live.
    #[arg(long, default_value = ".state", env = "CIRRUS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// First of the ports used: service i takes base+10i (the service on
    /// loopback), +1 (its sidecar's internal mTLS endpoint), +2 (public TLS
    /// endpoint), +3 (outbound), +4 and +5 (metrics of service and sidecar).
    #[arg(long, default_value_t = 5050)]
    pub port_base: u16,
    /// Return once the cloud is up, leaving it running in the background.
    #[arg(long, short)]
    pub detach: bool,
}

/// Every service `cirrus up` runs, in start order (identity first: the others need it).
const SERVICES: [&str; 3] = ["identity", "queue", "image"];

/// How long workload certificates live; they are renewed at a third left.
const CERT_HOURS: i64 = 24;

/// The ports of service number `i`.
#[derive(Clone, Copy)]
struct Ports {
    service: u16,
    internal: u16,
    public: u16,
    outbound: u16,
    metrics: u16,
    sidecar_metrics: u16,
}

impl Ports {
    fn of(base: u16, i: usize) -> Self {
        let b = base + 10 * i as u16;
        Self {
            service: b,
            internal: b + 1,
            public: b + 2,
            outbound: b + 3,
            metrics: b + 4,
            sidecar_metrics: b + 5,
        }
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What a state directory remembers between runs.
#[derive(Serialize, Deserialize, Default)]
struct Cluster {
    /// A superuser URL for the Postgres server in use.
    admin_url: String,
    /// Set when Cirrus runs its own private Postgres in the state directory.
    private_pg_port: Option<u16>,
    /// Taken from `CIRRUS_DATABASE_URL` for this run (not remembered).
    #[serde(skip)]
    from_env: bool,
}

/// Where everything lives in a state directory.
struct State {
    dir: PathBuf,
}

impl State {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        Ok(Self { dir })
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }
    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Sends SIGTERM (through kill(1), so the CLI needs no unsafe code).
async fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let state = State::new(&args.state_dir)?;
    if let Some(pid) = read_pid(&state.path("up.pid")).filter(|p| pid_alive(*p)) {
        bail!(
            "cirrus is already running from {} (pid {pid}); stop it with `cirrus down`",
            state.dir.display()
        );
    }
    let _ = std::fs::remove_file(state.path("ready"));
    if args.detach {
        return detach(&state, &args).await;
    }
    std::fs::write(state.path("up.pid"), std::process::id().to_string())?;
    let result = run_foreground(&state, &args).await;
    let _ = std::fs::remove_file(state.path("up.pid"));
    let _ = std::fs::remove_file(state.path("ready"));
    result
}

/// Starts `cirrus up` in its own process group and waits until it is ready.
async fn detach(state: &State, args: &UpArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(state.log("up"))?;
    let mut child = std::process::Command::new(exe);
    child
        .arg("up")
        .arg("--state-dir")
        .arg(&state.dir)
        .arg("--port-base")
        .arg(args.port_base.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .spawn()
        .context("starting cirrus up in the background")?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(summary) = std::fs::read_to_string(state.path("ready")) {
            print!("{summary}");
            println!(
                "Running in the background (pid {}); stop it with `cirrus down`.",
                child.id()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(state.log("up")).unwrap_or_default();
            bail!(
                "cirrus up exited ({status}) before it was ready:\n{}",
                tail(&log, 20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "cirrus up was not ready within 180 s; see {}",
                state.log("up").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Running {
    name: String,
    child: Child,
}

/// Makes the CA once, and a certificate for every workload that lacks a fresh one.
fn ensure_pki(state: &State) -> anyhow::Result<()> {
    let dir = state.pki();
    if !dir.join("ca.crt").is_file() {
        certs::Authority::create("Cirrus cluster CA", time::Duration::days(3650))?.save(&dir)?;
    }
    renew_certs(state)
}

/// Re-issues certificates with less than a third of their life left; the
/// sidecars pick the new files up without a restart.
fn renew_certs(state: &State) -> anyhow::Result<()> {
    let dir = state.pki();
    let validity = time::Duration::hours(CERT_HOURS);
    let mut ca = None;
    for svc in SERVICES {
        if certs::needs_renewal(&dir.join(format!("{svc}.crt")), validity) {
            let ca = match &mut ca {
                Some(c) => c,
                None => ca.insert(certs::Authority::load(&dir)?),
            };
            let pair = ca.issue(
                &certs::service_id(svc, None)?,
                &[svc.to_string(), "localhost".into()],
                validity,
            )?;
            certs::write_pair(&dir, svc, &pair)?;
        }
    }
    if certs::needs_renewal(&dir.join("user-admin.crt"), validity) {
        let ca = match &mut ca {
            Some(c) => c,
            None => ca.insert(certs::Authority::load(&dir)?),
        };
        let pair = ca.issue(&certs::user_id("admin")?, &[], validity)?;
        certs::write_pair(&dir, "user-admin", &pair)?;
    }
    Ok(())
}

/// The service's config file: where it listens, its database, its extras.
fn service_config(state: &State, svc: &str, p: Ports, db_url: &str) -> String {
    let mut c = format!(
        "listen = \"{}\"\nmetrics_listen = \"{}\"\ndatabase_url = \"{db_url}\"\n",
        local(p.service),
        local(p.metrics)
    );
    match svc {
        "identity" => c.push_str(&format!(
            "key_dir = \"{}\"\n",
            state.path("identity/keys").display()
        )),
        "image" => c.push_str(&format!(
            "store_dir = \"{}\"\n",
            state.path("image/store").display()
        )),
        _ => {}
    }
    c
}

/// The sidecar's config file. Identity's own sidecar follows identity
/// straight on loopback; every other one through identity's sidecar.
fn sidecar_config(state: &State, svc: &str, p: Ports, identity: Ports) -> String {
    let pki = state.pki();
    let identity_url = if svc == "identity" {
        format!("http://{}", local(identity.service))
    } else {
        format!("https://{}", local(identity.internal))
    };
    format!(
        "service = \"{svc}\"\ninternal_listen = \"{}\"\npublic_listen = \"{}\"\noutbound_listen = \"{}\"\n\
         upstream = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\nidentity_url = \"{identity_url}\"\n\
         policy = \"{}\"\nmetrics_listen = \"{}\"\n",
        local(p.internal),
        local(p.public),
        local(p.outbound),
        local(p.service),
        pki.join(format!("{svc}.crt")).display(),
        pki.join(format!("{svc}.key")).display(),
        pki.join("bundle.pem").display(),
        state.path(&format!("policy/{svc}.toml")).display(),
        local(p.sidecar_metrics),
    )
}

async fn run_foreground(state: &State, args: &UpArgs) -> anyhow::Result<()> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("cannot locate the cirrus binary's directory")?;
    let mut children: Vec<Running> = Vec::new();

    let (cluster, private_pg) = postgres(state).await?;
    let result = async {
        // CIRRUS_DATABASE_URL names the database to use; otherwise we make `cirrus`.
        let db_admin_url = if cluster.from_env {
            cluster.admin_url.clone()
        } else {
            ensure_database(&cluster.admin_url, "cirrus").await?;
            with_dbname(&cluster.admin_url, "cirrus")?
        };
        ensure_pki(state)?;
        // The default policies, written once; an operator may edit them.
        std::fs::create_dir_all(state.path("policy"))?;
        for (svc, text) in sidecar::policy::DEFAULTS {
            let p = state.path(&format!("policy/{svc}.toml"));
            if !p.exists() {
                std::fs::write(&p, text)?;
            }
        }

        let identity_ports = Ports::of(args.port_base, 0);
        let profile_path = state.path("admin.toml");
        let mut profile = Profile::load(Some(&profile_path)).unwrap_or_default();
        if profile.password.is_empty() {
            profile.password = uuid::Uuid::new_v4().simple().to_string();
        }
        profile.url = format!("https://{}", local(identity_ports.public));
        profile.username = "admin".into();
        profile.user_domain_name = "Default".into();
        profile.project_name = "admin".into();
        profile.project_domain_name = "Default".into();
        profile.ca_cert = state.pki().join("bundle.pem").display().to_string();
        profile.write(&profile_path)?;
        let mut internal = profile.clone();
        internal.url = format!("https://{}", local(identity_ports.internal));
        internal.client_cert = state.pki().join("user-admin.crt").display().to_string();
        internal.client_key = state.pki().join("user-admin.key").display().to_string();
        internal.write(&state.path("admin-internal.toml"))?;

        let mut lines = Vec::new();
        for (i, svc) in SERVICES.iter().enumerate() {
            let ports = Ports::of(args.port_base, i);
            let db_url = runtime::db::provision(&db_admin_url, svc).await?;
            let conf = state.path(&format!("{svc}.toml"));
            std::fs::write(&conf, service_config(state, svc, ports, &db_url))?;
            let side_conf = state.path(&format!("{svc}-sidecar.toml"));
            std::fs::write(&side_conf, sidecar_config(state, svc, ports, identity_ports))?;
            let bin = service_binary(&bin_dir, svc)?;

            if *svc == "identity" {
                let status = tokio::time::timeout(
                    Duration::from_secs(120),
                    service_command(&bin, &conf, state.log(svc))?
                        .arg("bootstrap")
                        .arg("--public-url")
                        .arg(format!("https://{}", local(ports.public)))
                        .arg("--internal-url")
                        .arg(format!("https://{}", local(ports.internal)))
                        .env("CIRRUS_ADMIN_PASSWORD", &profile.password)
                        .status(),
                )
                .await
                .context("identity bootstrap did not finish within 120 s")??;
                if !status.success() {
                    bail!("identity bootstrap failed; see {}", state.log(svc).display());
                }
            }
            let child = service_command(&bin, &conf, state.log(svc))?
                .arg("serve")
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {svc}"))?;
            children.push(Running {
                name: svc.to_string(),
                child,
            });
            wait_healthy(svc, local(ports.service), &mut children, state).await?;
            let side = service_binary(&bin_dir, "sidecar")?;
            let name = format!("{svc}-sidecar");
            let child = service_command(&side, &side_conf, state.log(&name))?
                .arg("serve")
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            children.push(Running { name, child });
            wait_listening(&format!("{svc}-sidecar"), local(ports.internal), &mut children, state).await?;
            if *svc != "identity" {
                register(&profile, identity_ports, svc, ports).await?;
            }
            lines.push(format!(
                "  {svc:<9} public https://{}   internal https://{}   metrics http://{}/metrics   log {}\n",
                local(ports.public),
                local(ports.internal),
                local(ports.metrics),
                state.log(svc).display()
            ));
        }

        let summary = format!(
            "Cirrus is up.\n{}  postgres  {}\n\
             Admin credentials: {} (public endpoint, TLS with the cluster CA)\n\
             \x20 and {} (internal endpoint, mTLS with the operator certificate)\n\
             \x20 export CIRRUS_PROFILE={}\n\
             \x20 cirrus token issue\n\
             grpcurl: grpcurl -cacert {} -servername identity {} list\n",
            lines.concat(),
            db_admin_url,
            profile_path.display(),
            state.path("admin-internal.toml").display(),
            profile_path.display(),
            state.pki().join("bundle.pem").display(),
            local(identity_ports.public),
        );
        std::fs::write(state.path("ready"), &summary)?;
        print!("{summary}");
        println!("Stop with Ctrl-C or `cirrus down`.");
        supervise(state, &mut children).await
    }
    .await;

    // Stop in reverse order: sidecars before their services, identity last.
    for r in children.iter().rev() {
        if let Some(pid) = r.child.id() {
            terminate(pid).await;
        }
    }
    for r in children.iter_mut().rev() {
        if tokio::time::timeout(Duration::from_secs(15), r.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop within 15 s; killing it", r.name);
            let _ = r.child.kill().await;
        }
    }
    if private_pg {
        stop_private_postgres(state).await;
    }
    if result.is_ok() {
        println!("Cirrus stopped.");
    }
    result
}

/// Lists `svc`'s public and internal sidecar endpoints in the catalog, once.
async fn register(admin: &Profile, identity: Ports, svc: &str, p: Ports) -> anyhow::Result<()> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", local(identity.service)))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
    let mut direct = admin.clone();
    direct.url = format!("http://{}", local(identity.service));
    let token = crate::commands::login(&direct, None).await?.token;
    let a = Authed(&token);
    let mut cat = pb::catalog_client::CatalogClient::new(channel);
    let services = cat
        .list_services(a.r(pb::ListRequest {}))
        .await?
        .into_inner()
        .services;
    let service_id = match services.iter().find(|s| s.name == svc) {
        Some(s) => s.id.clone(),
        None => {
            cat.create_service(a.r(pb::CreateServiceRequest {
                name: svc.into(),
                r#type: svc.into(),
                description: format!("Cirrus {svc} service"),
                enabled: None,
            }))
            .await?
            .into_inner()
            .id
        }
    };
    let existing = cat
        .list_endpoints(a.r(pb::ListEndpointsRequest {
            service_id: service_id.clone(),
            interface: 0,
        }))
        .await?
        .into_inner()
        .endpoints;
    for (interface, port) in [
        (pb::Interface::Public, p.public),
        (pb::Interface::Internal, p.internal),
    ] {
        let url = format!("https://{}", local(port));
        let same = existing.iter().find(|e| e.interface == interface as i32);
        match same {
            Some(e) if e.url == url => continue,
            Some(e) => {
                cat.delete_endpoint(a.r(pb::DeleteRequest {
                    id: e.id.clone(),
                    ..Default::default()
                }))
                .await?;
            }
            None => {}
        }
        cat.create_endpoint(a.r(pb::CreateEndpointRequest {
            service: service_id.clone(),
            interface: interface as i32,
            region: "RegionOne".into(),
            url,
            enabled: None,
        }))
        .await?;
    }
    Ok(())
}

/// Wraps requests with the launcher's admin token.
struct Authed<'a>(&'a str);

impl Authed<'_> {
    fn r<T>(&self, msg: T) -> tonic::Request<T> {
        crate::commands::with_token(msg, self.0)
    }
}

/// Waits for a signal, or for a child to die (which stops everything);
/// renews certificates on the way.
async fn supervise(state: &State, children: &mut [Running]) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut renew = tokio::time::interval(Duration::from_secs(60));
    let signal = runtime::serve::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            _ = renew.tick() => {
                if let Err(e) = renew_certs(state) {
                    eprintln!("certificate renewal failed: {e:#}");
                }
            }
            _ = tick.tick() => {
                for r in children.iter_mut() {
                    if let Some(status) = r.child.try_wait()? {
                        bail!("{} exited unexpectedly ({status}); stopping the cloud", r.name);
                    }
                }
            }
        }
    }
}

/// Waits until something accepts TCP connections at `addr`.
async fn wait_listening(
    name: &str,
    addr: SocketAddr,
    children: &mut [Running],
    state: &State,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        check_children(children, state)?;
        if Instant::now() > deadline {
            bail!(
                "{name} did not listen on {addr} within 30 s; see {}",
                state.log(name).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_children(children: &mut [Running], state: &State) -> anyhow::Result<()> {
    for r in children.iter_mut() {
        if let Some(status) = r.child.try_wait()? {
            let log = std::fs::read_to_string(state.log(&r.name)).unwrap_or_default();
            bail!(
                "{} exited ({status}) while starting:\n{}",
                r.name,
                tail(&log, 15)
            );
        }
    }
    Ok(())
}

fn service_binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "the {name} binary is not next to cirrus in {}; build the workspace first (cargo build --release)",
            bin_dir.display()
        )
    }
}

/// A service process: its config file, its log, and none of our `CIRRUS_*`
/// environment (which would override the file).
fn service_command(bin: &Path, config: &Path, log: PathBuf) -> anyhow::Result<Command> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CIRRUS_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

async fn wait_healthy(
    name: &str,
    addr: SocketAddr,
    children: &mut [Running],
    state: &State,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if runtime::serve::healthcheck(addr).await.is_ok() {
            return Ok(());
        }
        check_children(children, state)?;
        if Instant::now() > deadline {
            bail!(
                "{name} was not healthy at {addr} within 60 s; see {}",
                state.log(name).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn with_dbname(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, _) = url
        .rsplit_once('/')
        .context("database url has no database name")?;
    if !base.contains("://") {
        bail!("database url {url:?} is not a postgres:// url");
    }
    Ok(format!("{base}/{db}"))
}

async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let c = runtime::db::connect(admin_url).await?;
    let exists = c
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        c.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    }
    Ok(())
}

/// Chooses the Postgres to use: `CIRRUS_DATABASE_URL`, else one already
/// answering on 127.0.0.1:5432, else a private cluster in the state directory.
/// Returns whether we started a private server (and must stop it).
async fn postgres(state: &State) -> anyhow::Result<(Cluster, bool)> {
    let remembered: Cluster = std::fs::read_to_string(state.path("cluster.toml"))
        .ok()
        .and_then(|s| toml::from_str(&s).ok())
        .unwrap_or_default();
    let cluster = if let Ok(url) = std::env::var("CIRRUS_DATABASE_URL") {
        Cluster {
            admin_url: url,
            private_pg_port: None,
            from_env: true,
        }
    } else if remembered.private_pg_port.is_some() {
        remembered
    } else if runtime::db::reachable(runtime::db::TestDatabase::DEFAULT_ADMIN_URL).await {
        Cluster {
            admin_url: runtime::db::TestDatabase::DEFAULT_ADMIN_URL.into(),
            private_pg_port: None,
            from_env: false,
        }
    } else {
        Cluster {
            admin_url: "postgres://postgres@127.0.0.1:5433/postgres".into(),
            private_pg_port: Some(5433),
            from_env: false,
        }
    };
    let mut started = false;
    if let Some(port) = cluster.private_pg_port
        && !runtime::db::reachable(&cluster.admin_url).await
    {
        start_private_postgres(state, port).await?;
        started = true;
    }
    if !runtime::db::reachable(&cluster.admin_url).await {
        bail!("Postgres does not answer at {}", cluster.admin_url);
    }
    if !cluster.from_env {
        std::fs::write(state.path("cluster.toml"), toml::to_string(&cluster)?)?;
    }
    Ok((cluster, started))
}

fn pg_bin(tool: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(tool))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!("no PostgreSQL {tool} under /usr/lib/postgresql: install postgresql (apt-get install postgresql)")
    })
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(tool: &Path) -> Command {
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(tool);
        c
    } else {
        Command::new(tool)
    }
}

async fn start_private_postgres(state: &State, port: u16) -> anyhow::Result<()> {
    let data = state.path("pg");
    if !data.join("PG_VERSION").is_file() {
        std::fs::create_dir_all(&data)?;
        let _ = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&data)
            .status()
            .await;
        let status = as_postgres(&pg_bin("initdb")?)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-instructions"])
            .stdout(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("initdb failed for {}", data.display());
        }
    }
    let log = state.log("postgres");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let _ = Command::new("chown")
        .arg("postgres:postgres")
        .arg(&log)
        .status()
        .await;
    let status = as_postgres(&pg_bin("pg_ctl")?)
        .arg("-D")
        .arg(&data)
        .arg("-o")
        .arg(format!("-p {port} -c listen_addresses=127.0.0.1 -k /tmp"))
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "start"])
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("the private Postgres did not start; see {}", log.display());
    }
    Ok(())
}

async fn stop_private_postgres(state: &State) {
    if let Ok(pg_ctl) = pg_bin("pg_ctl") {
        let _ = as_postgres(&pg_ctl)
            .arg("-D")
            .arg(state.path("pg"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status()
            .await;
    }
}

pub async fn down(state_dir: &Path) -> anyhow::Result<()> {
    let pid_file = state_dir.join("up.pid");
    let Some(pid) = read_pid(&pid_file).filter(|p| pid_alive(*p)) else {
        let _ = std::fs::remove_file(&pid_file);
        println!("cirrus is not running from {}", state_dir.display());
        return Ok(());
    };
    terminate(pid).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            bail!("cirrus up (pid {pid}) did not stop within 40 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("Cirrus stopped.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbname_is_replaced() {
        assert_eq!(
            with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "cirrus")
                .ok()
                .as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/cirrus")
        );
        assert!(with_dbname("nonsense", "x").is_err());
    }
}
