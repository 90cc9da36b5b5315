//! `cirrus up`, `cirrus down` and `cirrus status`: the dev launcher. It finds
//! or starts Postgres and gives this state directory its own database
//! ([`postgres`]), provisions each service's schema and login role, makes the
//! cluster CA and a short-lived certificate per workload ([`pki`]),
//! bootstraps identity, runs every service of the table in [`services`] and
//! its sidecar as supervised children with their logs in the state directory
//! ([`supervisor`]), registers them in the catalog ([`register`]), makes the
//! defaults a user needs to boot a server ([`defaults`]: the tiny guest's
//! images, a network), prints the endpoints and the command that boots a
//! server, renews certificates while it runs, and stops everything on
//! Ctrl-C, SIGTERM or `cirrus down`, clearing what the agents made on this
//! machine ([`host`]). What the machine offers (host name, Open vSwitch,
//! libvirt driver) is found at start ([`site`]). A second `cirrus up`
//! reuses the state.

mod defaults;
mod host;
mod pki;
mod postgres;
mod register;
mod services;
mod site;
mod state;
mod supervisor;
mod users;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::output::Record;
use crate::session::{Ctx, Profile};
use services::{Listing, Plan, Ports, SERVICES, Site, local};
use state::{Cluster, State, pid_alive, tail, terminate};
use supervisor::{ProcStatus, Supervisor};

#[derive(Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// First of the ports used: service i takes base+10i (the service on
    /// loopback, with --dev-tcp only), +1 (its sidecar's internal mTLS
    /// endpoint), +2 (public TLS endpoint), +3 (outbound, with --dev-tcp
    /// only), +4 and +5 (metrics of service and sidecar).
    #[arg(long, default_value_t = 5050)]
    pub port_base: u16,
    /// Return once the cloud is up, leaving it running in the background.
    #[arg(long, short)]
    pub detach: bool,
    /// The compute agent's libvirt driver: `qemu` (real guests through
    /// libvirtd, qemu:///system) or `test` (libvirt's test driver, simulated
    /// servers). Default: qemu when libvirtd answers, else test (said so).
    #[arg(long, value_enum)]
    pub driver: Option<site::Driver>,
    /// This machine's name for its agents (kept in the state directory;
    /// default: the machine's host name). Two clouds on one machine need two.
    #[arg(long)]
    pub host: Option<String>,
    /// The Open vSwitch integration bridge the network agent owns (kept in
    /// the state directory; default br-int). Two clouds on one machine need two.
    #[arg(long)]
    pub bridge: Option<String>,
    /// Development only: every service listens on loopback TCP and calls
    /// out through its sidecar's loopback TCP listener, as before issue 13
    /// — any local process can then call a service claiming any identity.
    /// Default: Unix sockets in `<state>/run/<service>/` that only the
    /// service and its sidecar can open.
    #[arg(long)]
    pub dev_tcp: bool,
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
    if let Some(h) = &args.host {
        site::check_host(h)?;
    }
    if let Some(b) = &args.bridge {
        site::check_bridge(b)?;
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
        .args(args.host.iter().flat_map(|h| ["--host", h.as_str()]))
        .args(args.bridge.iter().flat_map(|b| ["--bridge", b.as_str()]))
        .args(args.dev_tcp.then_some("--dev-tcp"))
        .args(args.driver.iter().flat_map(|d| match d {
            site::Driver::Test => ["--driver", "test"],
            site::Driver::Qemu => ["--driver", "qemu"],
        }))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .spawn()
        .context("starting cirrus up in the background")?;
    let limit = Duration::from_secs(600);
    let deadline = Instant::now() + limit;
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
                "cirrus up was not ready within {} s; see {}",
                limit.as_secs(),
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
    let site = site(state, args).await?;
    let mut children = Supervisor::new(state);
    let (accounts, users_note) = accounts(state).await?;
    let owners: pki::Owners = accounts
        .iter()
        .filter_map(|(svc, a)| Some((svc.clone(), a.sidecar.clone()?)))
        .collect();
    let result = async {
        let how = How {
            accounts: &accounts,
            owners: &owners,
            users_note: &users_note,
        };
        let summary = start(
            state,
            args,
            &site,
            &bin_dir,
            &db.admin_url,
            &how,
            &mut children,
        )
        .await?;
        std::fs::write(state.path("ready"), &summary)?;
        print!("{summary}");
        println!("Stop with Ctrl-C or `cirrus down`.");
        supervise(state, &site.host, &owners, &mut children).await
    }
    .await;
    children.stop_all().await;
    // A process killed after the grace period leaves its socket behind.
    for spec in SERVICES {
        for sock in [services::API_SOCKET, services::OUTBOUND_SOCKET] {
            let _ = std::fs::remove_file(state.run_dir(spec.name).join(sock));
        }
    }
    for problem in host::teardown(state).await {
        eprintln!("cirrus down: {problem}");
    }
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

/// This machine as the cloud sees it: the host name and bridge (given, or
/// remembered, or the defaults; then remembered), this cloud's namespace
/// prefix and the compute agent's hypervisor.
async fn site(state: &State, args: &UpArgs) -> anyhow::Result<Site> {
    let mut cluster = Cluster::load(state)?;
    if let Some(h) = &args.host {
        cluster.host = h.clone();
    } else if cluster.host.is_empty() {
        cluster.host = site::machine_host();
    }
    if let Some(b) = &args.bridge {
        cluster.bridge = b.clone();
    } else if cluster.bridge.is_empty() {
        cluster.bridge = "br-int".into();
    }
    cluster.save(state)?;
    let hv = site::hypervisor(args.driver).await?;
    Ok(Site {
        host: cluster.host.clone(),
        bridge: cluster.bridge.clone(),
        namespace_prefix: cluster.namespace_prefix(),
        libvirt_uri: hv.libvirt_uri,
        domain_type: hv.domain_type,
        driver_note: hv.note,
    })
}

/// Who runs what: per service, its accounts; and why not one user per
/// service, when not.
struct How<'a> {
    accounts: &'a HashMap<String, users::Accounts>,
    owners: &'a pki::Owners,
    users_note: &'a Option<String>,
}

/// Each service's accounts ([`users`]): its own system user where this
/// machine allows, else none (everything runs as `cirrus up`, said once).
async fn accounts(
    state: &State,
) -> anyhow::Result<(HashMap<String, users::Accounts>, Option<String>)> {
    let mut map = HashMap::new();
    if let Some(why) = users::blocker(&state.dir) {
        return Ok((map, Some(why)));
    }
    // Others must pass through the state directory to reach their files.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&state.dir)?.permissions().mode();
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(
            &state.dir,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o011),
        )?;
    }
    for spec in SERVICES {
        map.insert(
            spec.name.to_string(),
            users::for_service(spec.name, spec.agent).await?,
        );
    }
    Ok((map, None))
}

/// The service's directories: `run/<svc>/` for its sockets (0770, owner
/// the service's user, group its sidecar's), and what it writes itself
/// (identity's keys, the image and volume stores) given to its user; its
/// and its sidecar's config files readable by them only.
fn hand_over(
    state: &State,
    svc: &str,
    accounts: &users::Accounts,
    files: &[&Path],
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let run = state.path("run");
    std::fs::create_dir_all(&run)?;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o711))?;
    let dir = state.run_dir(svc);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))?;
    let Some(group) = &accounts.sidecar else {
        return Ok(());
    };
    let owner = accounts.service.as_ref().map_or(0, |a| a.uid);
    std::os::unix::fs::chown(&dir, Some(owner), Some(group.gid))?;
    for f in files {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o640))?;
        std::os::unix::fs::chown(f, Some(0), Some(group.gid))?;
    }
    if let Some(a) = &accounts.service {
        let own: &[&str] = match svc {
            "identity" => &["identity"],
            "image" => &["image"],
            "volume" => &["volume"],
            _ => &[],
        };
        for d in own {
            let d = state.path(d);
            std::fs::create_dir_all(&d)?;
            users::chown_tree(&d, a.uid, a.gid)
                .with_context(|| format!("giving {} to {}", d.display(), a.name))?;
        }
    }
    Ok(())
}

/// Starts every service of the table and its sidecar, then the defaults;
/// returns the summary.
async fn start(
    state: &State,
    args: &UpArgs,
    site: &Site,
    bin_dir: &Path,
    db_admin_url: &str,
    how: &How<'_>,
    children: &mut Supervisor,
) -> anyhow::Result<String> {
    pki::ensure(state, &site.host, how.owners)?;
    // The default policies, written once; an operator may edit them.
    std::fs::create_dir_all(state.path("policy"))?;
    for (svc, text) in sidecar::policy::DEFAULTS
        .into_iter()
        .chain(services::AGENT_POLICIES)
    {
        let p = state.path(&format!("policy/{svc}.toml"));
        if !p.exists() {
            std::fs::write(&p, text)?;
        }
    }
    let identity = Ports::of(args.port_base, SERVICES[0].slot);
    let profile = write_profiles(state, identity)?;
    let network_blocker = site::network_agent_blocker().await;
    // The tiny guest builds (when missing) while the services start.
    let guest = tokio::spawn(defaults::guest_dir(bin_dir.to_path_buf()));

    let mut lines = Vec::new();
    let mut notes = Vec::new();
    if args.dev_tcp {
        notes.push(
            "  NOTE: --dev-tcp: every service listens on loopback TCP (base+10i) and so does its \
             sidecar's outbound side; any local process can call them as anyone (development only)"
                .to_string(),
        );
    }
    match how.users_note {
        Some(why) => notes.push(format!(
            "  NOTE: every process runs as this user ({why}): no user per service"
        )),
        None => notes.push(
            "  users: each service and its sidecar run as cirrus-<service>; the network and \
             compute agents as root (OVS, namespaces, libvirt), their sidecars as cirrus-<agent>"
                .to_string(),
        ),
    }
    let none = users::Accounts::default();
    for spec in SERVICES {
        let svc = spec.name;
        if svc == "network-agent"
            && let Some(why) = &network_blocker
        {
            let _ = std::fs::remove_file(state.path("network-agent.toml"));
            notes.push(format!(
                "  NOTE: the network agent is not running: {why}; servers get no network on this host"
            ));
            continue;
        }
        let database_url = match spec.schema {
            Some(schema) => runtime::db::provision(db_admin_url, schema).await?,
            None => String::new(),
        };
        let acc = how.accounts.get(svc).unwrap_or(&none);
        let plan = Plan {
            state,
            spec,
            ports: Ports::of(args.port_base, spec.slot),
            identity,
            site,
            database_url,
            dev_tcp: args.dev_tcp,
            group: acc.group(),
        };
        let api_socket = plan.socket().map(|s| s.path);
        let ports = plan.ports;
        let conf = state.path(&format!("{svc}.toml"));
        std::fs::write(&conf, (spec.config)(&plan)?)?;
        let side_conf = state.path(&format!("{svc}-sidecar.toml"));
        std::fs::write(&side_conf, services::sidecar_config(&plan)?)?;
        hand_over(state, svc, acc, &[&conf, &side_conf])?;
        let bin = service_binary(bin_dir, svc)?;
        let (svc_user, side_user) = (acc.service.as_ref(), acc.sidecar.as_ref());
        let up = match &api_socket {
            Some(p) => Check::Socket(p.clone()),
            None => Check::Health(local(ports.service)),
        };

        let name = format!("{svc}-sidecar");
        let side = service_binary(bin_dir, "sidecar")?;
        if svc == "identity" {
            // Identity first: its sidecar follows it on loopback.
            bootstrap(state, &bin, &conf, &profile, ports, svc_user).await?;
            children.start(svc, &bin, &conf, &state.log(svc), svc_user)?;
            wait_for(svc, up, children, state).await?;
            children.start(&name, &side, &side_conf, &state.log(&name), side_user)?;
            let internal = Check::Listening(local(ports.internal));
            wait_for(&name, internal, children, state).await?;
        } else {
            // The sidecar first: a service (an agent above all) calls out
            // through it as it starts.
            children.start(&name, &side, &side_conf, &state.log(&name), side_user)?;
            let internal = Check::Listening(local(ports.internal));
            wait_for(&name, internal, children, state).await?;
            children.start(svc, &bin, &conf, &state.log(svc), svc_user)?;
            wait_for(svc, up, children, state).await?;
        }
        register::register(&profile, identity, svc, spec.listing, ports).await?;
        let public = match spec.listing {
            Listing::Public(_) => format!("public https://{}", local(ports.public)),
            _ if svc == "identity" => format!("public https://{}", local(ports.public)),
            Listing::Internal(_) => "(internal only)".to_string(),
            Listing::None => format!("host {}", site.host),
        };
        let user = svc_user.map_or("(this user)", |a| a.name.as_str());
        let at = match &api_socket {
            Some(p) => format!("socket {}", p.display()),
            None => format!("tcp {}", local(ports.service)),
        };
        lines.push(format!(
            "  {svc:<13} {public:<30} internal https://{}   metrics http://{}/metrics   log {}\n  {:<13} {at}   user {user}\n",
            local(ports.internal),
            local(ports.metrics),
            state.log(svc).display(),
            ""
        ));
        if svc == "compute-agent" {
            // Its consoles (conductor.v1.Agent) are reached through the mesh
            // as `compute-agent`: listed internal, for compute-api's sidecar.
            let console = Listing::Internal("compute-agent");
            register::register(&profile, identity, svc, console, ports).await?;
            children.set_note(svc, &format!("driver {}", site.driver_note));
            notes.push(format!("  compute agent driver: {}", site.driver_note));
        }
    }
    let at = defaults::Endpoints {
        image: Ports::of(
            args.port_base,
            services::spec("image").map_or(0, |s| s.slot),
        ),
        network: Ports::of(
            args.port_base,
            services::spec("network").map_or(0, |s| s.slot),
        ),
        compute: Ports::of(
            args.port_base,
            services::spec("compute-api").map_or(0, |s| s.slot),
        ),
    };
    let guest = guest
        .await
        .unwrap_or_else(|e| Err(format!("the guest build failed: {e}")));
    let made = defaults::ensure(&profile, &at, guest).await?;
    let profile_path = state.path("admin.toml");
    Ok(format!(
        "Cirrus is up.\n{}  postgres  {}\n{}\n{}\n\
         Boot a server:\n\
         \x20 CIRRUS_PROFILE={} cirrus server create demo --flavor {} --image {} --network {} --wait\n\
         Admin credentials: {} (public endpoint, TLS with the cluster CA)\n\
         \x20 and {} (internal endpoint, mTLS with the operator certificate)\n\
         \x20 export CIRRUS_PROFILE={}\n\
         \x20 TOKEN=$(cirrus token issue -f value -c token)\n\
         \x20 cirrus status --state-dir {}\n\
         grpcurl: grpcurl -cacert {} -servername identity {} list\n",
        lines.concat(),
        db_admin_url,
        notes.join("\n"),
        made.join("\n"),
        profile_path.display(),
        defaults::FLAVOR,
        defaults::IMAGE,
        defaults::NETWORK,
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
    account: Option<&users::Account>,
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
        supervisor::oneshot(bin, conf, &log, &args, account)?
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
async fn supervise(
    state: &State,
    host: &str,
    owners: &pki::Owners,
    children: &mut Supervisor,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut renew = tokio::time::interval(Duration::from_secs(60));
    let signal = runtime::serve::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            _ = renew.tick() => {
                if let Err(e) = pki::renew(state, host, owners) {
                    eprintln!("certificate renewal failed: {e:#}");
                }
            }
            _ = tick.tick() => children.tick()?,
        }
    }
}

enum Check {
    /// `grpc.health.v1.Health` answers SERVING on loopback TCP (`--dev-tcp`).
    Health(SocketAddr),
    /// `grpc.health.v1.Health` answers SERVING on the service's Unix socket.
    Socket(PathBuf),
    /// Something accepts TCP connections.
    Listening(SocketAddr),
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Health(a) | Self::Listening(a) => write!(f, "{a}"),
            Self::Socket(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Waits (bounded) until `check` passes; fails at once if a child exits.
async fn wait_for(
    name: &str,
    check: Check,
    children: &mut Supervisor,
    state: &State,
) -> anyhow::Result<()> {
    let limit = Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    let addr = &check;
    loop {
        let ok = match &check {
            Check::Health(a) => runtime::serve::healthcheck(*a).await.is_ok(),
            Check::Socket(p) => runtime::process::healthcheck_unix(p).await.is_ok(),
            Check::Listening(a) => tokio::net::TcpStream::connect(a).await.is_ok(),
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
        // What a `cirrus up` that died without cleaning up left on the host.
        if state_dir.join("cluster.toml").is_file() {
            let state = State::new(state_dir)?;
            for problem in host::teardown(&state).await {
                eprintln!("cirrus down: {problem}");
            }
        }
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
    const COLUMNS: &'static [&'static str] = &[
        "Name",
        "PID",
        "State",
        "Restarts",
        "Last Exit",
        "Log",
        "Note",
    ];
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
            self.note.clone(),
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
