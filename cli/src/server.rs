//! `cirrus server create|list|show|delete|start|stop|reboot|pause|unpause|
//! suspend|resume|console-log` (compute.v1 `Servers`). `create --wait` and
//! `delete --wait` follow the server through `WatchServer` (a server stream:
//! the state now, then every change), printing a line per change of
//! vm_state / task_state; nothing polls.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use proto::compute::v1 as pb;
use proto::compute::v1::servers_client::ServersClient;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::api::{Api, COMPUTE, NETWORK, image_id, join, pick};
use crate::common::{is_id, ts};
use crate::output::record;
use crate::session::Ctx;

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ServerCmd {
    Create {
        name: String,
        /// Flavor name or id.
        #[arg(long)]
        flavor: String,
        /// Image name or id (not needed with --boot-volume).
        #[arg(long)]
        image: Option<String>,
        /// Boot from this volume (name or id) instead of an image.
        #[arg(long)]
        boot_volume: Option<String>,
        /// A network to put a port on (name or id; repeatable).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// An existing port to use (name or id; repeatable).
        #[arg(long = "port")]
        ports: Vec<String>,
        /// A key pair whose public key the guest gets.
        #[arg(long)]
        key_name: Option<String>,
        /// A file whose content is the guest's user data.
        #[arg(long)]
        user_data: Option<std::path::PathBuf>,
        /// KEY=VALUE (repeatable).
        #[arg(long = "property")]
        properties: Vec<String>,
        /// Security group names or ids (repeatable).
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// A server group (name or id).
        #[arg(long)]
        server_group: Option<String>,
        #[arg(long)]
        availability_zone: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    List {
        /// Only servers whose name contains this.
        #[arg(long)]
        name: Option<String>,
        /// Only servers in this vm_state (active, error, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only servers on this host (admin only).
        #[arg(long)]
        host: Option<String>,
        /// Every project's (admin only).
        #[arg(long)]
        all_projects: bool,
    },
    Show {
        server: String,
    },
    Delete {
        server: String,
        #[command(flatten)]
        wait: Wait,
    },
    Start {
        server: String,
    },
    Stop {
        server: String,
    },
    Reboot {
        server: String,
        /// Power-cycle rather than ask the guest.
        #[arg(long)]
        hard: bool,
    },
    Pause {
        server: String,
    },
    Unpause {
        server: String,
    },
    Suspend {
        server: String,
    },
    Resume {
        server: String,
    },
    /// Attaches a volume to a running, paused or stopped server (live when running).
    AttachVolume {
        server: String,
        /// Volume name or id.
        volume: String,
        /// Return once the host attached it (non-zero if the attach failed).
        #[arg(long)]
        wait: bool,
    },
    /// Detaches a volume from a server.
    DetachVolume {
        server: String,
        /// Volume name or id.
        volume: String,
        /// Return once the host detached it.
        #[arg(long)]
        wait: bool,
    },
    /// The volumes attached to a server.
    Volumes {
        server: String,
    },
    /// An interactive serial console: stdin goes to the guest, its output to stdout.
    Console {
        server: String,
    },
    /// The tail of the server's serial console.
    ConsoleLog {
        server: String,
        /// The last N lines (default: all that is kept).
        #[arg(long, default_value_t = 0)]
        lines: u32,
    },
}

#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Follow the server until it is done (active, or gone for delete); non-zero on error.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 600, requires = "wait")]
    timeout: u64,
}

fn fault(s: &pb::Server) -> String {
    s.fault
        .as_ref()
        .map(|f| format!("{} {}", f.code, f.message))
        .unwrap_or_default()
}

fn nets(s: &pb::Server) -> String {
    join(s.networks.iter().map(|n| {
        let what = if n.port_id.is_empty() {
            format!("network {}", n.network_id)
        } else {
            format!("port {}", n.port_id)
        };
        if n.fixed_ip.is_empty() {
            what
        } else {
            format!("{what} ({})", n.fixed_ip)
        }
    }))
}

fn volumes(s: &pb::Server) -> String {
    join(s.block_devices.iter().map(|b| {
        format!(
            "{} {} (boot index {}, {} GiB)",
            b.source, b.uuid, b.boot_index, b.size_gb
        )
    }))
}

record!(pb::Server, |s| {
    "ID": s.id, "Name": s.name, "Status": s.vm_state, "Task State": s.task_state,
    "Power State": s.power_state, "Fault": fault(s), "Flavor ID": s.flavor_id,
    "Image ID": s.image_id, "Networks": nets(s), "Block Devices": volumes(s),
    "Key Name": s.key_name, "Security Groups": join(&s.security_groups),
    "Server Group ID": s.server_group_id, "Availability Zone": s.availability_zone,
    "Host": s.host, "VCPUs": s.vcpus, "RAM": s.ram_mb, "Disk": s.disk_gb,
    "Locked": s.locked, "Project ID": s.project_id, "User ID": s.user_id,
    "Created At": ts(s.created_at), "Launched At": ts(s.launched_at),
    "Updated At": ts(s.updated_at),
});

/// A server as `server list` shows it.
struct Row(pb::Server);

record!(Row, |r| {
    "ID": r.0.id, "Name": r.0.name, "Status": r.0.vm_state, "Task State": r.0.task_state,
    "Power State": r.0.power_state, "Networks": nets(&r.0), "Image ID": r.0.image_id,
    "Flavor ID": r.0.flavor_id, "Host": r.0.host,
});

pub fn client(api: &Api) -> ServersClient<Channel> {
    ServersClient::new(api.ch.clone())
}

async fn list(api: &Api, mut req: pb::ListServersRequest) -> anyhow::Result<Vec<pb::Server>> {
    let mut all = Vec::new();
    req.limit = 1000;
    loop {
        let page = client(api)
            .list_servers(api.req(req.clone()))
            .await?
            .into_inner();
        all.extend(page.servers);
        if page.next_marker.is_empty() || page.next_marker == req.marker {
            return Ok(all);
        }
        req.marker = page.next_marker;
    }
}

/// A server by id or (exact) name.
pub async fn find(api: &Api, server: &str) -> anyhow::Result<pb::Server> {
    if is_id(server) {
        let r = api.req(pb::ServerRef { id: server.into() });
        return Ok(client(api).get_server(r).await?.into_inner());
    }
    let req = pb::ListServersRequest {
        name: server.into(),
        ..Default::default()
    };
    let all = list(api, req).await?;
    pick("server", server, all, |s| &s.id, |s| &s.name)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    Active,
    Deleted,
}

/// Follows a server through `WatchServer` until it is active (or deleted),
/// printing each change of vm_state / task_state; an error state is an
/// error carrying the server's fault.
async fn watch(
    api: &Api,
    ctx: &Ctx<'_>,
    s: &pb::Server,
    until: Until,
    wait: Wait,
) -> anyhow::Result<Option<pb::Server>> {
    let limit = Duration::from_secs(wait.timeout);
    let mut r = api.req(pb::ServerRef { id: s.id.clone() });
    r.set_timeout(limit);
    let deadline = tokio::time::Instant::now() + limit;
    let mut stream = match client(api).watch_server(r).await {
        Ok(st) => st.into_inner(),
        Err(e) if until == Until::Deleted && e.code() == tonic::Code::NotFound => {
            ctx.out.done(&format!("server {}: deleted", s.name));
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let mut seen: Option<(String, String)> = None;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(n) => n,
            Err(_) => {
                let (vm, task) = seen.unwrap_or_default();
                bail!(
                    "server {} is not {} after {} s (vm_state {vm}, task_state {})",
                    s.name,
                    if until == Until::Active {
                        "active"
                    } else {
                        "deleted"
                    },
                    wait.timeout,
                    if task.is_empty() { "none" } else { &task }
                );
            }
        };
        let now = match next {
            Ok(Some(now)) => now,
            Ok(None) if until == Until::Deleted => return Ok(None),
            Err(e) if until == Until::Deleted && e.code() == tonic::Code::NotFound => {
                return Ok(None);
            }
            Ok(None) => bail!("the watch of server {} ended before it was active", s.name),
            Err(e) => return Err(e.into()),
        };
        let state = (now.vm_state.clone(), now.task_state.clone());
        if seen.as_ref() != Some(&state) {
            let task = if now.task_state.is_empty() {
                "none"
            } else {
                &now.task_state
            };
            ctx.out.done(&format!(
                "server {}: vm_state {}, task_state {task}",
                now.name, now.vm_state
            ));
            seen = Some(state);
        }
        match until {
            Until::Active if now.vm_state == "error" => {
                let f = now.fault.clone().unwrap_or_default();
                bail!(
                    "server {} is in error: fault {}: {}",
                    now.name,
                    f.code,
                    f.message
                );
            }
            Until::Active if now.vm_state == "active" && now.task_state.is_empty() => {
                return Ok(Some(now));
            }
            Until::Deleted if now.vm_state == "deleted" => return Ok(None),
            _ => {}
        }
    }
}

pub async fn run(cmd: ServerCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, COMPUTE).await?;
    let mut c = client(&api);
    match cmd {
        ServerCmd::Create {
            name,
            flavor,
            image,
            boot_volume,
            networks,
            ports,
            key_name,
            user_data,
            properties,
            security_groups,
            server_group,
            availability_zone,
            wait,
        } => {
            let image_id = match image {
                Some(i) => image_id(&api, &i).await?,
                None => String::new(),
            };
            let mut block_devices = Vec::new();
            if let Some(v) = boot_volume {
                let vapi = Api::open(ctx, crate::api::VOLUME).await?;
                let vol = crate::volume::find(&vapi, &v).await?;
                block_devices.push(pb::BlockDevice {
                    source: "volume".into(),
                    uuid: vol.id,
                    size_gb: u32::try_from(vol.size_gb).unwrap_or(u32::MAX),
                    boot_index: 0,
                    delete_on_termination: false,
                });
            }
            let mut nics = Vec::new();
            if !networks.is_empty() || !ports.is_empty() {
                let napi = Api::open(ctx, NETWORK).await?;
                for n in &networks {
                    nics.push(pb::NetworkRequest {
                        network_id: crate::network::find(&napi, n).await?.id,
                        ..Default::default()
                    });
                }
                for p in &ports {
                    nics.push(pb::NetworkRequest {
                        port_id: crate::port::find(&napi, p).await?.id,
                        ..Default::default()
                    });
                }
            }
            let server_group_id = match server_group {
                Some(g) => crate::server_group::find(&api, &g).await?.id,
                None => String::new(),
            };
            let user_data = match user_data {
                Some(path) => {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
                }
                None => Vec::new(),
            };
            let r = api.req(pb::CreateServerRequest {
                name,
                flavor,
                image_id,
                networks: nics,
                block_devices,
                key_name: key_name.unwrap_or_default(),
                user_data,
                metadata: crate::api::pairs(&properties, "--property")?,
                security_groups,
                server_group_id,
                availability_zone: availability_zone.unwrap_or_default(),
                idempotency_key: uuid::Uuid::new_v4().to_string(),
            });
            let s = c.create_server(r).await?.into_inner();
            if !wait.wait {
                return ctx.out.one(&s);
            }
            match watch(&api, ctx, &s, Until::Active, wait).await? {
                Some(active) => ctx.out.one(&active),
                None => bail!("server {} was deleted while it was built", s.name),
            }
        }
        ServerCmd::List {
            name,
            status,
            host,
            all_projects,
        } => {
            let req = pb::ListServersRequest {
                name: name.unwrap_or_default(),
                vm_state: status.unwrap_or_default(),
                host: host.unwrap_or_default(),
                all_projects,
                ..Default::default()
            };
            let rows: Vec<Row> = list(&api, req).await?.into_iter().map(Row).collect();
            ctx.out.list(&rows)
        }
        ServerCmd::Show { server } => ctx.out.one(&find(&api, &server).await?),
        ServerCmd::Delete { server, wait } => {
            let s = find(&api, &server).await?;
            let r = api.req(pb::ServerRef { id: s.id.clone() });
            let deleting = c.delete_server(r).await?.into_inner();
            if wait.wait {
                watch(&api, ctx, &deleting, Until::Deleted, wait).await?;
            }
            ctx.out.done(&format!("deleted server {server}"));
            Ok(())
        }
        ServerCmd::Reboot { server, hard } => {
            let id = find(&api, &server).await?.id;
            c.reboot_server(api.req(pb::RebootServerRequest { id, hard }))
                .await?;
            let how = if hard { "hard" } else { "soft" };
            ctx.out.done(&format!("rebooting server {server} ({how})"));
            Ok(())
        }
        ServerCmd::ConsoleLog { server, lines } => {
            let id = find(&api, &server).await?.id;
            let r = api.req(pb::GetConsoleLogRequest { id, lines });
            let log = c.get_console_log(r).await?.into_inner().output;
            print!("{log}");
            if !log.is_empty() && !log.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        ServerCmd::AttachVolume {
            server,
            volume,
            wait,
        } => attach_volume(&api, ctx, &server, &volume, true, wait).await,
        ServerCmd::DetachVolume {
            server,
            volume,
            wait,
        } => attach_volume(&api, ctx, &server, &volume, false, wait).await,
        ServerCmd::Volumes { server } => {
            let id = find(&api, &server).await?.id;
            let r = api.req(pb::ServerRef { id });
            let all = c.list_volume_attachments(r).await?.into_inner().attachments;
            ctx.out.list(&all)
        }
        ServerCmd::Console { server } => console(&api, &server).await,
        ServerCmd::Start { server } => action(&api, ctx, &server, Action::Start).await,
        ServerCmd::Stop { server } => action(&api, ctx, &server, Action::Stop).await,
        ServerCmd::Pause { server } => action(&api, ctx, &server, Action::Pause).await,
        ServerCmd::Unpause { server } => action(&api, ctx, &server, Action::Unpause).await,
        ServerCmd::Suspend { server } => action(&api, ctx, &server, Action::Suspend).await,
        ServerCmd::Resume { server } => action(&api, ctx, &server, Action::Resume).await,
    }
}

record!(pb::VolumeAttachment, |a| {
    "Volume ID": a.volume_id, "Status": a.status, "Device": a.device,
    "Attachment ID": a.attachment_id, "Server ID": a.server_id, "Created At": ts(a.created_at),
});

/// How long `attach-volume --wait` / `detach-volume --wait` wait for the host.
const ATTACH_WAIT: Duration = Duration::from_secs(120);

/// Asks for an attach (or detach); with `wait`, follows the server's
/// attachments until the host has done it. The host's answer shows in the
/// attachment list, not in the server's state, so this re-reads the list
/// (every 250 ms, bounded) rather than watching the server.
async fn attach_volume(
    api: &Api,
    ctx: &Ctx<'_>,
    server: &str,
    volume: &str,
    attach: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let server_id = find(api, server).await?.id;
    let vapi = Api::open(ctx, crate::api::VOLUME).await?;
    let volume_id = crate::volume::find(&vapi, volume).await?.id;
    let mut c = client(api);
    if attach {
        let r = pb::AttachVolumeRequest {
            server_id: server_id.clone(),
            volume_id: volume_id.clone(),
        };
        c.attach_volume(api.req(r)).await?;
    } else {
        let r = pb::DetachVolumeRequest {
            server_id: server_id.clone(),
            volume_id: volume_id.clone(),
        };
        c.detach_volume(api.req(r)).await?;
    }
    let verb = if attach { "attach" } else { "detach" };
    if !wait {
        ctx.out.done(&format!(
            "asked to {verb} volume {volume} on server {server}"
        ));
        return Ok(());
    }
    let deadline = std::time::Instant::now() + ATTACH_WAIT;
    loop {
        let r = api.req(pb::ServerRef {
            id: server_id.clone(),
        });
        let all = c.list_volume_attachments(r).await?.into_inner().attachments;
        let mine = all.iter().find(|a| a.volume_id == volume_id);
        match (attach, mine) {
            (true, Some(a)) if a.status == "attached" => {
                ctx.out.done(&format!(
                    "attached volume {volume} to server {server} as {}",
                    a.device
                ));
                return Ok(());
            }
            (true, None) => anyhow::bail!(
                "the host could not attach volume {volume} to server {server} \
                 (see `cirrus server show {server}` and the volume's status)"
            ),
            (false, None) => {
                ctx.out
                    .done(&format!("detached volume {volume} from server {server}"));
                return Ok(());
            }
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            let seen = mine.map_or("no attachment".to_string(), |a| a.status.clone());
            anyhow::bail!("volume {volume} on server {server}: still {seen} after {ATTACH_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Clone, Copy)]
enum Action {
    Start,
    Stop,
    Pause,
    Unpause,
    Suspend,
    Resume,
}

async fn action(api: &Api, ctx: &Ctx<'_>, server: &str, a: Action) -> anyhow::Result<()> {
    let id = find(api, server).await?.id;
    let r = api.req(pb::ServerRef { id });
    let mut c = client(api);
    let (s, verb) = match a {
        Action::Start => (c.start_server(r).await?, "starting"),
        Action::Stop => (c.stop_server(r).await?, "stopping"),
        Action::Pause => (c.pause_server(r).await?, "pausing"),
        Action::Unpause => (c.unpause_server(r).await?, "unpausing"),
        Action::Suspend => (c.suspend_server(r).await?, "suspending"),
        Action::Resume => (c.resume_server(r).await?, "resuming"),
    };
    let s = s.into_inner();
    ctx.out.done(&format!(
        "{verb} server {server} (vm_state {}, task_state {})",
        s.vm_state, s.task_state
    ));
    Ok(())
}

/// Pipes stdin to the server's serial console (`AttachConsole`, a bidi
/// stream) and its output to stdout, until either side closes.
async fn console(api: &Api, server: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let id = find(api, server).await?.id;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsoleInput>(16);
    tx.send(pb::ConsoleInput {
        server_id: id,
        data: Vec::new(),
    })
    .await?;
    // Standard input is read on a thread of its own (a blocking read).
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = pb::ConsoleInput {
                        server_id: String::new(),
                        data: buf[..n].to_vec(),
                    };
                    if tx.blocking_send(msg).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut r = api.req(ReceiverStream::new(rx));
    // A console stays open as long as its user wants.
    r.set_timeout(Duration::from_secs(7 * 24 * 3600));
    let mut output = client(api).attach_console(r).await?.into_inner();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = output.message().await? {
        stdout.write_all(&chunk.data)?;
        stdout.flush()?;
    }
    Ok(())
}
