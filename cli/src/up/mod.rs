//! `cirrus up`, `cirrus down` and `cirrus status`: the dev launcher. It finds
//! or starts Postgres and gives this state directory its own database
//! ([`postgres`]), provisions each service's schema and login role, makes the
//! cluster CA and a short-lived certificate per workload ([`pki`]),
//! bootstraps identity, runs every service of the table in [`services`] and
//! its sidecar as supervised children with their logs in the state directory
//! ([`supervisor`]), registers them in the catalog ([`register`]), prints the
//! endpoints, renews certificates while it runs, and stops everything on
//! Ctrl-C, SIGTERM or `cirrus down`. A second `cirrus up` reuses the state.

mod pki;
mod postgres;
mod register;
mod services;
mod state;
mod supervisor;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::output::Record;
use crate::session::{Ctx, Profile};
use services::{Plan, Ports, SERVICES, local};
use state::{State, pid_alive, tail, terminate};
use supervisor::{ProcStatus, Supervisor};

#[derive(Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// First of the ports used: service i takes base+10i (the service on
    /// loopback), +1 (its sidecar's internal mTLS endpoint), +2 (public TLS
    /// endpoint), +3 (outbound), +4 and +5 (metrics of service and sidecar).
    #[arg(long, default_value_t = 5050)]
    pub port_base: u16,
    /// Return once the cloud is up, leaving it running in the background.
    #[arg(long, short)]
    pub detach: bool,
}

#[derive(Args, Clone)]
pub struct StateArgs {
    /// Where state, logs, keys, certificates and credentials live.
    #[arg(long, default_value = ".state", env = "CIRRUS_STATE_DIR")]
    pub state_dir: PathBuf,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let state = State::new(&args.state.state_dir)?;
    if let Some(pid) = State::running(&state.dir) {
        bail!(
            "cirrus is already running from {} (pid {pid}); stop it with `cirrus down`",
            state.dir.display()
        );
    }
    let last = SERVICES.iter().map(|s| s.slot).max().unwrap_or(0) + 1;
    if u32::from(args.port_base) + u32::from(Ports::SPAN * last) > u32::from(u16::MAX) {
        bail!(
            "--port-base {} leaves no room for {last} services of {} ports",
            args.port_base,
            Ports::SPAN
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
            bail!(
                "cirrus up exited ({status}) before it was ready:\n{}",
                tail(&state.log("up"), 20)
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

async fn run_foreground(state: &State, args: &UpArgs) -> anyhow::Result<()> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("cannot locate the cirrus binary's directory")?;
    let db = postgres::open(state).await?;
    let mut children = Supervisor::new(state);
    let result = async {
        let summary = start(state, args, &bin_dir, &db.admin_url, &mut children).await?;
        std::fs::write(state.path("ready"), &summary)?;
        print!("{summary}");
        println!("Stop with Ctrl-C or `cirrus down`.");
        supervise(state, &mut children).await
    }
    .await;
    children.stop_all().await;
    if db.private {
        postgres::stop_private(state).await;
    }
    if result.is_ok() {
        println!("Cirrus stopped.");
    }
    result
}

/// The admin's profiles (public endpoint with the CA; internal with the
/// operator certificate), keeping the password of an earlier run.
fn write_profiles(state: &State, identity: Ports) -> anyhow::Result<Profile> {
    let profile_path = state.path("admin.toml");
    let mut profile = Profile::load(Some(&profile_path)).unwrap_or_default();
    if profile.password.is_empty() {
        profile.password = uuid::Uuid::new_v4().simple().to_string();
    }
    profile.url = format!("https://{}", local(identity.public));
    profile.username = "admin".into();
    profile.user_domain_name = "Default".into();
    profile.project_name = "admin".into();
    profile.project_domain_name = "Default".into();
    profile.ca_cert = state.pki().join("bundle.pem").display().to_string();
    profile.write(&profile_path)?;
    let mut internal = profile.clone();
    internal.url = format!("https://{}", local(identity.internal));
    internal.client_cert = state.pki().join("user-admin.crt").display().to_string();
    internal.client_key = state.pki().join("user-admin.key").display().to_string();
    internal.write(&state.path("admin-internal.toml"))?;
    Ok(profile)
}

/// Starts every service of the table and its sidecar; returns the summary.
async fn start(
    state: &State,
    args: &UpArgs,
    bin_dir: &Path,
    db_admin_url: &str,
    children: &mut Supervisor,
) -> anyhow::Result<String> {
    pki::ensure(state)?;
    // The default policies, written once; an operator may edit them.
    std::fs::create_dir_all(state.path("policy"))?;
    for (svc, text) in sidecar::policy::DEFAULTS {
        let p = state.path(&format!("policy/{svc}.toml"));
        if !p.exists() {
            std::fs::write(&p, text)?;
        }
    }
    let identity = Ports::of(args.port_base, SERVICES[0].slot);
    let profile = write_profiles(state, identity)?;

    let mut lines = Vec::new();
    for spec in SERVICES {
        let svc = spec.name;
        let plan = Plan {
            state,
            spec,
            ports: Ports::of(args.port_base, spec.slot),
            identity,
            database_url: runtime::db::provision(db_admin_url, svc).await?,
        };
        let ports = plan.ports;
        let conf = state.path(&format!("{svc}.toml"));
        std::fs::write(&conf, (spec.config)(&plan)?)?;
        let side_conf = state.path(&format!("{svc}-sidecar.toml"));
        std::fs::write(&side_conf, services::sidecar_config(&plan)?)?;
        let bin = service_binary(bin_dir, svc)?;

        if svc == "identity" {
            bootstrap(state, &bin, &conf, &profile, ports).await?;
        }
        children.start(svc, &bin, &conf, &state.log(svc))?;
        wait_for(svc, local(ports.service), Check::Health, children, state).await?;
        let name = format!("{svc}-sidecar");
        let side = service_binary(bin_dir, "sidecar")?;
        children.start(&name, &side, &side_conf, &state.log(&name))?;
        wait_for(
            &name,
            local(ports.internal),
            Check::Listening,
            children,
            state,
        )
        .await?;
        if svc != "identity" {
            register::register(&profile, identity, svc, ports).await?;
        }
        lines.push(format!(
            "  {svc:<9} public https://{}   internal https://{}   metrics http://{}/metrics   log {}\n",
            local(ports.public),
            local(ports.internal),
            local(ports.metrics),
            state.log(svc).display()
        ));
    }
    let profile_path = state.path("admin.toml");
    Ok(format!(
        "Cirrus is up.\n{}  postgres  {}\n\
         Admin credentials: {} (public endpoint, TLS with the cluster CA)\n\
         \x20 and {} (internal endpoint, mTLS with the operator certificate)\n\
         \x20 export CIRRUS_PROFILE={}\n\
         \x20 TOKEN=$(cirrus token issue -f value -c token)\n\
         \x20 cirrus status --state-dir {}\n\
         grpcurl: grpcurl -cacert {} -servername identity {} list\n",
        lines.concat(),
        db_admin_url,
        profile_path.display(),
        state.path("admin-internal.toml").display(),
        profile_path.display(),
        state.dir.display(),
        state.pki().join("bundle.pem").display(),
        local(identity.public),
    ))
}

/// `identity bootstrap`: the default domain, roles, admin and catalog entry.
async fn bootstrap(
    state: &State,
    bin: &Path,
    conf: &Path,
    admin: &Profile,
    ports: Ports,
) -> anyhow::Result<()> {
    let public = format!("https://{}", local(ports.public));
    let internal = format!("https://{}", local(ports.internal));
    let log = state.log("identity");
    let args = [
        "bootstrap",
        "--public-url",
        &public,
        "--internal-url",
        &internal,
    ];
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        supervisor::oneshot(bin, conf, &log, &args)?
            .env("CIRRUS_ADMIN_PASSWORD", &admin.password)
            .status(),
    )
    .await
    .context("identity bootstrap did not finish within 120 s")??;
    if !status.success() {
        bail!("identity bootstrap failed; see {}", log.display());
    }
    Ok(())
}

/// Waits for a signal, or for a child that keeps failing (which stops
/// everything); restarts children that exit; renews certificates.
async fn supervise(state: &State, children: &mut Supervisor) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut renew = tokio::time::interval(Duration::from_secs(60));
    let signal = runtime::serve::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            _ = renew.tick() => {
                if let Err(e) = pki::renew(state) {
                    eprintln!("certificate renewal failed: {e:#}");
                }
            }
            _ = tick.tick() => children.tick()?,
        }
    }
}

enum Check {
    /// `grpc.health.v1.Health` answers SERVING.
    Health,
    /// Something accepts TCP connections.
    Listening,
}

/// Waits (bounded) until `addr` passes `check`; fails at once if a child exits.
async fn wait_for(
    name: &str,
    addr: SocketAddr,
    check: Check,
    children: &mut Supervisor,
    state: &State,
) -> anyhow::Result<()> {
    let limit = Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    loop {
        let ok = match check {
            Check::Health => runtime::serve::healthcheck(addr).await.is_ok(),
            Check::Listening => tokio::net::TcpStream::connect(addr).await.is_ok(),
        };
        if ok {
            return Ok(());
        }
        children.check_starting()?;
        if Instant::now() > deadline {
            bail!(
                "{name} was not ready at {addr} within {} s; see {}",
                limit.as_secs(),
                state.log(name).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service_binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "the {name} binary is not next to cirrus in {}; build the workspace first (cargo build --bins)",
            bin_dir.display()
        )
    }
}

pub async fn down(state_dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = State::running(state_dir) else {
        let _ = std::fs::remove_file(state_dir.join("up.pid"));
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

impl Record for ProcStatus {
    const COLUMNS: &'static [&'static str] =
        &["Name", "PID", "State", "Restarts", "Last Exit", "Log"];
    fn values(&self) -> Vec<String> {
        // Between the supervisor's rounds a child may already be gone.
        let state = match self.pid {
            Some(pid) if !pid_alive(pid) => "exited",
            _ => &self.state,
        };
        vec![
            self.name.clone(),
            self.pid.map(|p| p.to_string()).unwrap_or_default(),
            state.to_string(),
            self.restarts.to_string(),
            self.last_exit.clone(),
            self.log.display().to_string(),
        ]
    }
}

/// `cirrus status`: every process of the running cloud.
pub fn status(state_dir: &Path, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let Some(pid) = State::running(state_dir) else {
        bail!("cirrus is not running from {}", state_dir.display());
    };
    let file = state_dir.join("status.json");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "cirrus up (pid {pid}) has not written {} yet",
            file.display()
        )
    })?;
    let list: Vec<ProcStatus> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a status file", file.display()))?;
    ctx.out.list(&list)
}
