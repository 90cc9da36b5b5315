//! The compute API's domain logic: each method resolves what it names,
//! authorizes the caller, and acts — in that order, in one place. No tonic
//! types here; [`crate::grpc`] validates requests into the values below.
//!
//! Authorization (the table in the README, which the sidecar's policy file
//! matches): readers look, members change, administrators do anything and
//! see every project; anything of another project is `NOT_FOUND`, exactly as
//! a missing one; a locked server refuses changes from everyone but an
//! administrator.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use proto::scheduler::v1 as spb;
use proto::scheduler::v1::scheduler_client::SchedulerClient;
use runtime::caller::Caller;
use runtime::error::{Error, Result};
use runtime::trace::Channel;
use runtime::types::{Name, NameOrId};
use tonic::Code;
use uuid::Uuid;

use crate::model::*;
use crate::peers::{Credentials, ImageInfo, Peers};
use crate::repo;
use crate::watch::Hub;
use crate::{Config, keys};

/// Most bytes of user data (Nova's limit is 64 KiB after base64).
pub const MAX_USER_DATA: usize = 64 * 1024;
/// The console log tail kept per server.
pub const CONSOLE_LOG_MAX: i32 = 64 * 1024;
const SCHEDULER_TIMEOUT: Duration = Duration::from_secs(15);
const GIB: u64 = 1024 * 1024 * 1024;
/// Nova's states for attaching and detaching a volume (no task running).
pub const VOLUME_STATES: [&str; 3] = [vm::ACTIVE, vm::PAUSED, vm::STOPPED];
/// The states in which a guest has a serial console to attach to.
pub const CONSOLE_STATES: [&str; 2] = [vm::ACTIVE, vm::PAUSED];

/// A validated CreateServer request.
#[derive(Debug, Clone)]
pub struct CreateServer {
    pub name: Name,
    pub flavor: NameOrId,
    pub image_id: Option<Uuid>,
    pub networks: Vec<NetworkRequest>,
    pub block_devices: Vec<BlockDevice>,
    pub key_name: Option<Name>,
    pub user_data: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub security_groups: Vec<String>,
    pub server_group_id: Option<Uuid>,
    pub availability_zone: Option<String>,
    pub idempotency_key: Option<String>,
}

/// The server actions that cast to the server's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Reboot { hard: bool },
    Pause,
    Unpause,
    Suspend,
    Resume,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Reboot { hard: false } => "reboot",
            Action::Reboot { hard: true } => "hard reboot",
            Action::Pause => "pause",
            Action::Unpause => "unpause",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
        }
    }

    /// Nova's allowed vm_states for the action (task_state must be none).
    pub fn allowed(self) -> &'static [&'static str] {
        match self {
            Action::Start => &[vm::STOPPED],
            Action::Stop => &[vm::ACTIVE, vm::ERROR],
            Action::Reboot { hard: false } => &[vm::ACTIVE],
            Action::Reboot { hard: true } => &[
                vm::ACTIVE,
                vm::STOPPED,
                vm::PAUSED,
                vm::SUSPENDED,
                vm::ERROR,
            ],
            Action::Pause => &[vm::ACTIVE],
            Action::Unpause => &[vm::PAUSED],
            Action::Suspend => &[vm::ACTIVE],
            Action::Resume => &[vm::SUSPENDED],
        }
    }

    pub fn task(self) -> &'static str {
        match self {
            Action::Start => task::POWERING_ON,
            Action::Stop => task::POWERING_OFF,
            Action::Reboot { hard: false } => task::REBOOTING,
            Action::Reboot { hard: true } => task::REBOOTING_HARD,
            Action::Pause => task::PAUSING,
            Action::Unpause => task::UNPAUSING,
            Action::Suspend => task::SUSPENDING,
            Action::Resume => task::RESUMING,
        }
    }

    pub fn cast(self, server_id: Uuid) -> Cast {
        match self {
            Action::Start => Cast::Start { server_id },
            Action::Stop => Cast::Stop { server_id },
            Action::Reboot { hard } => Cast::Reboot { server_id, hard },
            Action::Pause => Cast::Pause { server_id },
            Action::Unpause => Cast::Unpause { server_id },
            Action::Suspend => Cast::Suspend { server_id },
            Action::Resume => Cast::Resume { server_id },
        }
    }
}

/// A validated ListServers request.
#[derive(Debug, Clone, Default)]
pub struct ListServers {
    pub name: Option<String>,
    pub vm_state: Option<String>,
    pub host: Option<String>,
    pub flavor_id: Option<Uuid>,
    pub image_id: Option<Uuid>,
    pub all_projects: bool,
    pub project_id: Option<String>,
    pub marker: Option<Uuid>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct NewFlavor {
    pub name: Name,
    pub vcpus: i32,
    pub ram_mb: i32,
    pub disk_gb: i32,
    pub ephemeral_gb: i32,
    pub extra_specs: BTreeMap<String, String>,
    pub is_public: bool,
}

#[derive(Clone)]
pub struct Compute {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: Config,
    scheduler: SchedulerClient<Channel>,
    queue: queue_client::Client,
    hub: Hub,
    peers: Peers,
    images: Mutex<HashMap<ImageKey, (Instant, ImageInfo)>>,
}

/// Whose image lookup an entry answers: the image service shows an image to
/// a project (its own, shared with it, public) or to an admin (any).
type ImageKey = (Option<String>, bool, Uuid);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumeOp {
    Attach,
    Detach,
}

/// Image lookups held at most (entries of many projects and images).
const IMAGE_CACHE_ENTRIES: usize = 4096;

// ------------------------------------------------------------ authorization

fn authenticated(c: &Caller) -> Result<()> {
    if c.is_authenticated() {
        Ok(())
    } else {
        Err(Error::unauthenticated(
            "no caller identity: call compute through its sidecar",
        ))
    }
}

fn project(c: &Caller) -> Result<&str> {
    authenticated(c)?;
    c.project_id
        .as_deref()
        .ok_or_else(|| Error::forbidden("a project-scoped token is required"))
}

fn user(c: &Caller) -> Result<&str> {
    authenticated(c)?;
    c.user_id
        .as_deref()
        .ok_or_else(|| Error::unauthenticated("no user id"))
}

fn can_change(c: &Caller) -> Result<()> {
    if c.is_admin || c.has_role("member") || c.has_role("admin") {
        Ok(())
    } else {
        Err(Error::forbidden(
            "the member role is required to change servers",
        ))
    }
}

fn admin_only(c: &Caller) -> Result<()> {
    authenticated(c)?;
    if c.is_admin {
        Ok(())
    } else {
        Err(Error::forbidden("only an administrator may do this"))
    }
}

fn sees(c: &Caller, project_id: &str) -> bool {
    c.is_admin || c.project_id.as_deref() == Some(project_id)
}

fn not_locked(c: &Caller, s: &Server) -> Result<()> {
    if s.locked && !c.is_admin {
        Err(Error::precondition(format!("server {} is locked", s.id)))
    } else {
        Ok(())
    }
}

fn state_refusal(verb: &str, s: &Server) -> Error {
    match &s.task_state {
        Some(t) => Error::precondition(format!(
            "cannot {verb} server {} while its task is {t}",
            s.id
        )),
        None => Error::precondition(format!(
            "cannot {verb} server {} while it is {}",
            s.id, s.vm_state
        )),
    }
}

/// What a caller sees of a server: the host only for administrators.
pub fn view(c: &Caller, mut s: Server) -> Server {
    if !c.is_admin {
        s.host = None;
        s.alternates.clear();
        s.tried_hosts.clear();
    }
    s.user_data.clear();
    s
}

impl Compute {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let pool = runtime::db::pool(
            &config.database.url,
            &config.database.schema,
            config.database.pool_size,
        )?;
        runtime::db::migrate(&pool, &config.database.schema, crate::migrations::runner()).await?;
        let scheduler = SchedulerClient::new(crate::channel(
            config.outbound().as_ref(),
            "scheduler",
            &config.scheduler_url,
        )?);
        let queue = match queue_client::Client::through_sidecar(
            config.sidecar_outbound_socket.as_deref(),
            config.sidecar_outbound,
        ) {
            Some(q) => q?,
            None => queue_client::Client::connect_lazy(&config.queue_url)?,
        };
        let peers = Peers::new(&config.peers, config.outbound().as_ref())?;
        let hub = Hub::default();
        tokio::spawn(
            hub.clone()
                .listen(config.database.url.clone(), config.database.schema.clone()),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                scheduler,
                queue,
                hub,
                peers,
                images: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    fn down_after(&self) -> f64 {
        self.inner.config.host_down_after_secs as f64
    }

    // -------------------------------------------------------------- servers

    /// The server if the caller may see it, else NOT_FOUND either way.
    async fn visible_server(&self, c: &Caller, id: Uuid) -> Result<Server> {
        authenticated(c)?;
        let db = self.inner.pool.get().await?;
        match repo::get_server(&db, id).await? {
            Some(s) if s.vm_state != vm::DELETED && sees(c, &s.project_id) => Ok(s),
            _ => Err(Error::not_found("server", id)),
        }
    }

    async fn visible_flavor(&self, c: &Caller, f: &NameOrId) -> Result<Flavor> {
        let db = self.inner.pool.get().await?;
        let found = match f {
            NameOrId::Id(id) => repo::get_flavor(&db, Some(*id), None).await?,
            NameOrId::Name(n) => repo::get_flavor(&db, None, Some(n.as_str())).await?,
        };
        match found {
            Some(fl)
                if fl.is_public
                    || c.is_admin
                    || c.project_id
                        .as_deref()
                        .is_some_and(|p| fl.projects.iter().any(|x| x == p)) =>
            {
                Ok(fl)
            }
            _ => Err(Error::not_found("flavor", f)),
        }
    }

    pub async fn create_server(&self, creds: &Credentials, req: CreateServer) -> Result<Server> {
        let c = &creds.caller;
        let project = project(c)?.to_string();
        let user = user(c)?.to_string();
        can_change(c)?;
        let flavor = self.visible_flavor(c, &req.flavor).await?;
        if req.image_id.is_none() && !req.block_devices.iter().any(|b| b.source == "volume") {
            return Err(Error::invalid(
                "image_id",
                "is required unless a boot volume is given",
            ));
        }
        let public_key = match &req.key_name {
            Some(k) => {
                let db = self.inner.pool.get().await?;
                repo::get_keypair(&db, &user, k.as_str())
                    .await?
                    .ok_or_else(|| Error::not_found("key pair", k))?
                    .public_key
            }
            None => String::new(),
        };
        if let Some(g) = req.server_group_id {
            let db = self.inner.pool.get().await?;
            match repo::get_group(&db, g).await? {
                Some(grp) if grp.project_id == project => {}
                _ => return Err(Error::not_found("server group", g)),
            }
        }
        let image_properties = self.check_peers(creds, &req, &flavor).await?;
        let new = NewServer {
            id: Uuid::new_v4(),
            project_id: project.clone(),
            user_id: user,
            name: req.name.into_string(),
            flavor,
            image_id: req.image_id.map(|i| i.to_string()).unwrap_or_default(),
            image_properties,
            key_name: req.key_name.map(Name::into_string).unwrap_or_default(),
            public_key,
            user_data: req.user_data,
            metadata: req.metadata,
            networks: req.networks,
            block_devices: req.block_devices,
            security_groups: req.security_groups,
            availability_zone: req.availability_zone.unwrap_or_default(),
            server_group_id: req.server_group_id,
            idempotency_key: req.idempotency_key.clone(),
        };

        // Quota and the row commit together, one creation per project at a time.
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        repo::lock_project(&tx, &project).await?;
        if let Some(key) = &req.idempotency_key
            && let Some(existing) = repo::find_by_idempotency_key(&tx, &project, key).await?
        {
            tx.commit().await?;
            return Ok(view(c, existing));
        }
        let (limits, usage) = repo::quota(&tx, &project, self.inner.config.quota).await?;
        over_quota("instances", limits.instances, usage.instances, 1)?;
        over_quota(
            "cores",
            limits.cores,
            usage.cores,
            i64::from(new.flavor.vcpus),
        )?;
        over_quota(
            "ram",
            limits.ram_mb,
            usage.ram_mb,
            i64::from(new.flavor.ram_mb),
        )?;
        let server = repo::insert_server(&tx, &new).await?;
        tx.commit().await?;
        metrics::counter!("compute_servers_created_total").increment(1);

        // Placement runs on; the caller watches the server (WatchServer).
        let this = self.clone();
        let id = server.id;
        let token = creds.token.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            this.schedule(id, token).await
        }));
        Ok(view(c, server))
    }

    /// Asks the scheduler to place the server. The scheduler records a "no
    /// valid host" fault itself; any other failure is recorded here.
    async fn schedule(&self, id: Uuid, token: String) {
        let mut req = tonic::Request::new(spb::SelectDestinationsRequest {
            server_id: id.to_string(),
            ignore_hosts: vec![],
            dry_run: false,
            token,
        });
        req.set_timeout(SCHEDULER_TIMEOUT);
        let mut client = self.inner.scheduler.clone();
        match client.select_destinations(req).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::ResourceExhausted => {}
            Err(s) => {
                tracing::warn!(server = %id, status = %s, "scheduling failed");
                let result = async {
                    let mut db = self.inner.pool.get().await?;
                    let tx = db.transaction().await?;
                    let changed = repo::change_server(
                        &tx,
                        id,
                        &repo::Change {
                            vm_state: Some(vm::ERROR),
                            task_state: Some(None),
                            fault: Some(Some((
                                500,
                                "scheduling failed: the scheduler is unavailable",
                            ))),
                            ..Default::default()
                        },
                        &repo::Guard {
                            vm_states: Some(&[vm::BUILDING]),
                            task_state: Some(Some(task::SCHEDULING)),
                            ..Default::default()
                        },
                    )
                    .await?;
                    if changed.is_some() {
                        repo::release_claim(&tx, id).await?;
                    }
                    tx.commit().await?;
                    Ok::<_, Error>(())
                }
                .await;
                if let Err(e) = result {
                    tracing::error!(server = %id, error = ?e, "could not record the scheduling fault");
                }
            }
        }
    }

    /// What Nova's API checks of a create in the other services, as the
    /// caller: the image (visible, active, fits the flavor), every network
    /// and port, every volume (available). Returns the image's properties.
    /// The image as the caller's project sees it, from the image service or
    /// from an answer it gave this project at most `image_cache_ms` ago
    /// (active images only: any other state is asked again each time).
    /// Nova asks Glance at every boot; a create every few milliseconds of one
    /// project need not. An image deleted or deactivated meanwhile is refused
    /// at most that much later, a window Nova has anyway between its check
    /// and the host's download (which fails then, and so does the build).
    async fn image(&self, creds: &Credentials, id: Uuid) -> Result<ImageInfo> {
        let ttl = Duration::from_millis(self.inner.config.image_cache_ms);
        let key: ImageKey = (creds.caller.project_id.clone(), creds.caller.is_admin, id);
        if !ttl.is_zero()
            && let Some((at, img)) = self.images().get(&key)
            && at.elapsed() < ttl
        {
            metrics::counter!("compute_image_cache_hits_total").increment(1);
            return Ok(img.clone());
        }
        let img = self.inner.peers.image(creds, id).await?;
        if !ttl.is_zero() && img.status == "active" {
            let mut c = self.images();
            if c.len() >= IMAGE_CACHE_ENTRIES {
                c.retain(|_, (at, _)| at.elapsed() < ttl);
                if c.len() >= IMAGE_CACHE_ENTRIES {
                    c.clear();
                }
            }
            c.insert(key, (Instant::now(), img.clone()));
        }
        Ok(img)
    }

    fn images(&self) -> std::sync::MutexGuard<'_, HashMap<ImageKey, (Instant, ImageInfo)>> {
        // Entries are whole values: a panic elsewhere cannot leave one half-written.
        self.inner
            .images
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn check_peers(
        &self,
        creds: &Credentials,
        req: &CreateServer,
        flavor: &Flavor,
    ) -> Result<BTreeMap<String, String>> {
        let peers = &self.inner.peers;
        let mut properties = BTreeMap::new();
        let boot_volume = req
            .block_devices
            .iter()
            .any(|b| b.source == "volume" && b.boot_index == 0);
        if let Some(id) = req.image_id {
            let img = self.image(creds, id).await?;
            if img.status != "active" {
                return Err(Error::precondition(format!(
                    "image {id} is not active (it is {})",
                    img.status
                )));
            }
            // A root disk of 0 GB takes the image's size (Nova's rule); a
            // boot volume makes the flavor's disk irrelevant.
            let root_gb = u64::try_from(flavor.disk_gb).unwrap_or(0);
            if !boot_volume && root_gb > 0 {
                if img.size > root_gb * GIB {
                    return Err(Error::invalid(
                        "flavor",
                        format!(
                            "{}'s root disk of {root_gb} GB is smaller than image {id} ({} bytes)",
                            flavor.name, img.size
                        ),
                    ));
                }
                if u64::from(img.min_disk_gb) > root_gb {
                    return Err(Error::invalid(
                        "flavor",
                        format!(
                            "{}'s root disk of {root_gb} GB is smaller than image {id}'s min_disk of {} GB",
                            flavor.name, img.min_disk_gb
                        ),
                    ));
                }
            }
            if i64::from(img.min_ram_mb) > i64::from(flavor.ram_mb) {
                return Err(Error::invalid(
                    "flavor",
                    format!(
                        "{}'s {} MB of RAM is less than image {id}'s min_ram of {} MB",
                        flavor.name, flavor.ram_mb, img.min_ram_mb
                    ),
                ));
            }
            properties = img.properties;
        }
        for n in &req.networks {
            if let Some(net) = n.network_id {
                peers.network(creds, net).await?;
            }
            if let Some(port) = n.port_id {
                peers.port(creds, port).await?;
            }
        }
        for b in req.block_devices.iter().filter(|b| b.source == "volume") {
            if let Some(v) = b.uuid {
                let status = peers.volume(creds, v).await?;
                if status != "available" {
                    return Err(Error::precondition(format!(
                        "volume {v} is {status}, not available"
                    )));
                }
            }
        }
        Ok(properties)
    }

    pub async fn get_server(&self, c: &Caller, id: Uuid) -> Result<Server> {
        Ok(view(c, self.visible_server(c, id).await?))
    }

    pub async fn list_servers(
        &self,
        c: &Caller,
        q: ListServers,
    ) -> Result<(Vec<Server>, Option<Uuid>)> {
        let own = project(c)?.to_string();
        if (q.all_projects || q.project_id.is_some() || q.host.is_some()) && !c.is_admin {
            return Err(Error::forbidden(
                "only an administrator may list other projects' servers or filter by host",
            ));
        }
        let project_id = if q.all_projects {
            None
        } else {
            Some(q.project_id.unwrap_or(own))
        };
        let filter = repo::ServerFilter {
            project_id,
            name: q.name,
            vm_state: q.vm_state,
            host: q.host,
            flavor_id: q.flavor_id,
            image_id: q.image_id.map(|i| i.to_string()),
            marker: q.marker,
            limit: i64::from(q.limit) + 1,
        };
        let db = self.inner.pool.get().await?;
        let mut servers = repo::list_servers(&db, &filter).await?;
        let next = if servers.len() > q.limit as usize {
            servers.truncate(q.limit as usize);
            servers.last().map(|s| s.id)
        } else {
            None
        };
        Ok((servers.into_iter().map(|s| view(c, s)).collect(), next))
    }

    pub async fn delete_server(&self, creds: &Credentials, id: Uuid) -> Result<Server> {
        let c = &creds.caller;
        let s = self.visible_server(c, id).await?;
        can_change(c)?;
        not_locked(c, &s)?;
        if s.task_state.as_deref() == Some(task::DELETING) {
            return Ok(view(c, s));
        }
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        let s = repo::lock_server(&tx, id)
            .await?
            .filter(|s| s.vm_state != vm::DELETED)
            .ok_or_else(|| Error::not_found("server", id))?;
        let host_up = match &s.host {
            Some(h) => repo::get_host(&tx, h, self.down_after())
                .await?
                .is_some_and(|h| h.up),
            None => false,
        };
        if !host_up {
            // Never placed, or its host is down: delete here (Nova's local delete).
            repo::release_claim(&tx, id).await?;
            repo::delete_attachments(&tx, id).await?;
            let done = repo::change_server(
                &tx,
                id,
                &repo::Change {
                    vm_state: Some(vm::DELETED),
                    task_state: Some(None),
                    power_state: Some(power::NOSTATE),
                    deleted: true,
                    ..Default::default()
                },
                &repo::Guard::default(),
            )
            .await?
            .ok_or_else(|| Error::not_found("server", id))?;
            tx.commit().await?;
            return Ok(view(c, done));
        }
        let host = s.host.clone().unwrap_or_default();
        let changed = repo::change_server(
            &tx,
            id,
            &repo::Change {
                task_state: Some(Some(task::DELETING)),
                ..Default::default()
            },
            &repo::Guard::default(),
        )
        .await?
        .ok_or_else(|| Error::not_found("server", id))?;
        // The cast is durable before the change commits: a crash between
        // them leaves a delete cast for a server not marked deleting, which
        // the agent performs all the same.
        self.cast(&host, Cast::Delete { server_id: id }, creds)
            .await?;
        tx.commit().await?;
        Ok(view(c, changed))
    }

    /// Casts to the host with the caller's token (the host acts as the caller).
    async fn cast(&self, host: &str, cast: Cast, creds: &Credentials) -> Result<()> {
        let message = CastMessage {
            cast,
            token: creds.token.clone(),
        };
        self.inner
            .queue
            .cast_json(&host_topic(host), &message)
            .await
            .map(|_| ())
            .map_err(|s| Error::unavailable(format!("queue: {s}")))
    }

    pub async fn action(&self, creds: &Credentials, id: Uuid, action: Action) -> Result<Server> {
        let c = &creds.caller;
        let s = self.visible_server(c, id).await?;
        can_change(c)?;
        not_locked(c, &s)?;
        if s.task_state.is_some() || !action.allowed().contains(&s.vm_state.as_str()) {
            return Err(state_refusal(action.verb(), &s));
        }
        let Some(host) = s.host.clone() else {
            return Err(Error::precondition(format!(
                "cannot {} server {id}: it was never placed on a host",
                action.verb()
            )));
        };
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        let changed = repo::change_server(
            &tx,
            id,
            &repo::Change {
                task_state: Some(Some(action.task())),
                ..Default::default()
            },
            &repo::Guard {
                vm_states: Some(action.allowed()),
                task_state: Some(None),
                ..Default::default()
            },
        )
        .await?;
        let Some(changed) = changed else {
            // It changed under us: answer with what it is now.
            drop(tx);
            let now = self.visible_server(c, id).await?;
            return Err(state_refusal(action.verb(), &now));
        };
        self.cast(&host, action.cast(id), creds).await?;
        tx.commit().await?;
        Ok(view(c, changed))
    }

    pub async fn lock(&self, c: &Caller, id: Uuid, lock: bool, reason: &str) -> Result<Server> {
        let s = self.visible_server(c, id).await?;
        can_change(c)?;
        if !lock && s.locked && s.locked_by.as_deref() == Some("admin") && !c.is_admin {
            return Err(Error::precondition(format!(
                "server {id} was locked by an administrator"
            )));
        }
        let by = if c.is_admin { "admin" } else { "owner" };
        let db = self.inner.pool.get().await?;
        let s = repo::set_lock(
            &db,
            id,
            lock,
            lock.then_some(by),
            if lock { reason } else { "" },
        )
        .await?
        .ok_or_else(|| Error::not_found("server", id))?;
        Ok(view(c, s))
    }

    // ----------------------------------------------------- volume attachments

    /// A server the caller may change, in one of `states` with no task, and
    /// placed on a host; its host.
    fn placed_in(verb: &str, s: &Server, states: &[&str]) -> Result<String> {
        if s.task_state.is_some() || !states.contains(&s.vm_state.as_str()) {
            return Err(state_refusal(verb, s));
        }
        s.host.clone().ok_or_else(|| {
            Error::precondition(format!(
                "cannot {verb} server {}: it was never placed on a host",
                s.id
            ))
        })
    }

    /// Records the attachment (`attaching`) and casts `attach_volume` to
    /// the host before it commits; the host reports through conductor.
    pub async fn attach_volume(
        &self,
        creds: &Credentials,
        id: Uuid,
        volume: Uuid,
    ) -> Result<VolumeAttachment> {
        self.volume_action(creds, id, volume, VolumeOp::Attach)
            .await
    }

    /// Marks an attached volume `detaching` and casts `detach_volume`.
    pub async fn detach_volume(
        &self,
        creds: &Credentials,
        id: Uuid,
        volume: Uuid,
    ) -> Result<VolumeAttachment> {
        self.volume_action(creds, id, volume, VolumeOp::Detach)
            .await
    }

    /// Attach or detach: the server checked as the caller sees it, then
    /// again locked in the transaction that records the attachment's new
    /// state and casts to the host before it commits.
    async fn volume_action(
        &self,
        creds: &Credentials,
        id: Uuid,
        volume: Uuid,
        op: VolumeOp,
    ) -> Result<VolumeAttachment> {
        let c = &creds.caller;
        let s = self.visible_server(c, id).await?;
        can_change(c)?;
        not_locked(c, &s)?;
        let verb = match op {
            VolumeOp::Attach => "attach a volume to",
            VolumeOp::Detach => "detach a volume from",
        };
        Self::placed_in(verb, &s, &VOLUME_STATES)?;
        if op == VolumeOp::Attach {
            self.inner.peers.require_volume()?;
            let status = self.inner.peers.volume(creds, volume).await?;
            if status != "available" {
                return Err(Error::precondition(format!(
                    "volume {volume} is {status}, not available"
                )));
            }
        }
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        let s = repo::lock_server(&tx, id)
            .await?
            .filter(|s| s.vm_state != vm::DELETED)
            .ok_or_else(|| Error::not_found("server", id))?;
        let host = Self::placed_in(verb, &s, &VOLUME_STATES)?;
        let (a, cast) = match op {
            VolumeOp::Attach => (
                repo::insert_attachment(&tx, id, volume)
                    .await?
                    .ok_or_else(|| {
                        Error::precondition(format!("volume {volume} is already attached"))
                    })?,
                Cast::AttachVolume {
                    server_id: id,
                    volume_id: volume,
                },
            ),
            VolumeOp::Detach => {
                let a = repo::get_attachment(&tx, id, volume)
                    .await?
                    .ok_or_else(|| Error::not_found("volume attachment", volume))?;
                if a.status != attach::ATTACHED {
                    return Err(Error::precondition(format!(
                        "volume {volume} is {} on server {id}",
                        a.status
                    )));
                }
                let a = repo::set_attachment(
                    &tx,
                    id,
                    volume,
                    attach::ATTACHED,
                    attach::DETACHING,
                    None,
                    None,
                )
                .await?
                .ok_or_else(|| Error::not_found("volume attachment", volume))?;
                (
                    a,
                    Cast::DetachVolume {
                        server_id: id,
                        volume_id: volume,
                    },
                )
            }
        };
        self.cast(&host, cast, creds).await?;
        tx.commit().await?;
        Ok(a)
    }

    pub async fn list_attachments(&self, c: &Caller, id: Uuid) -> Result<Vec<VolumeAttachment>> {
        let _ = self.visible_server(c, id).await?;
        let db = self.inner.pool.get().await?;
        repo::list_attachments(&db, id).await
    }

    // ------------------------------------------------------------- console

    /// Checks that the caller may open the server's console and opens one
    /// on its host's agent: `input` goes to the guest's serial line, the
    /// answer streams what the guest writes.
    pub async fn console(
        &self,
        c: &Caller,
        id: Uuid,
        first: Vec<u8>,
        input: impl futures_util::Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<tonic::Streaming<proto::conductor::v1::AgentConsoleOutput>> {
        use futures_util::StreamExt;
        use proto::conductor::v1 as cpb;
        let s = self.visible_server(c, id).await?;
        can_change(c)?;
        let host =
            Self::placed_in("attach to the console of", &s, &CONSOLE_STATES).or_else(|e| {
                // A running task (rebooting ...) leaves the console usable.
                if CONSOLE_STATES.contains(&s.vm_state.as_str()) && s.task_state.is_some() {
                    s.host.clone().ok_or(e)
                } else {
                    Err(e)
                }
            })?;
        let endpoint = {
            let db = self.inner.pool.get().await?;
            repo::agent_endpoint(&db, &host).await?
        }
        .ok_or_else(|| {
            Error::precondition(format!(
                "host {host} offers no console (its agent registered no endpoint)"
            ))
        })?;
        let (channel, direct) = if endpoint.starts_with("http://")
            || endpoint.starts_with("https://")
        {
            (
                runtime::trace::traced(
                    tonic::transport::Endpoint::from_shared(endpoint.clone())
                        .map_err(|e| Error::internal(format!("agent endpoint {endpoint:?}: {e}")))?
                        .connect_timeout(Duration::from_secs(2))
                        .connect_lazy(),
                ),
                true,
            )
        } else {
            let out = self.inner.config.outbound().ok_or_else(|| {
                Error::precondition(format!(
                    "host {host}'s console is behind the mesh ({endpoint}) and compute-api has no sidecar_outbound"
                ))
            })?;
            (out.channel(&endpoint).map_err(Error::internal)?, false)
        };
        let head = cpb::AgentConsoleInput {
            server_id: id.to_string(),
            data: first,
        };
        let rest = input.map(|data| cpb::AgentConsoleInput {
            server_id: String::new(),
            data,
        });
        let mut req = tonic::Request::new(futures_util::stream::iter([head]).chain(rest));
        if direct {
            // No mesh: play the sidecar's part and name ourselves.
            Caller {
                peer: Some(format!(
                    "spiffe://{}/svc/compute-api",
                    self.inner.config.trust_domain
                )),
                ..Default::default()
            }
            .to_metadata(req.metadata_mut());
        }
        let answer = cpb::agent_client::AgentClient::new(channel)
            .attach_console(req)
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => Error::not_found("server", id),
                Code::FailedPrecondition => Error::precondition(s.message().to_string()),
                _ => Error::unavailable(format!(
                    "the console of host {host}: {:?} {}",
                    s.code(),
                    runtime::types::short(s.message())
                )),
            })?;
        Ok(answer.into_inner())
    }

    pub async fn console_log(&self, c: &Caller, id: Uuid, lines: u32) -> Result<String> {
        let _ = self.visible_server(c, id).await?;
        can_change(c)?;
        let db = self.inner.pool.get().await?;
        let log = repo::console_log(&db, id).await?;
        if lines == 0 {
            return Ok(log);
        }
        let all: Vec<&str> = log.lines().collect();
        let from = all.len().saturating_sub(lines as usize);
        Ok(all[from..].join("\n"))
    }

    /// The server now, then each change, on `tx` until it is deleted or the
    /// receiver goes away.
    pub async fn watch(
        &self,
        c: &Caller,
        id: Uuid,
        tx: tokio::sync::mpsc::Sender<Result<Server>>,
    ) -> Result<()> {
        let mut notes = self.inner.hub.subscribe();
        // The event position first, then the state: a change in between is
        // then both in `first` and after `seq`, and skipped by its revision
        // (read the other way round, it would be in neither).
        authenticated(c)?;
        let mut seq = {
            let db = self.inner.pool.get().await?;
            repo::last_event(&db, id).await?
        };
        let first = self.visible_server(c, id).await?;
        let mut sent = first.revision;
        let c = c.clone();
        let this = self.clone();
        tokio::spawn(async move {
            if tx.send(Ok(view(&c, first))).await.is_err() {
                return;
            }
            loop {
                // Wait for a notice of this server, or look anyway each second.
                let wait = async {
                    loop {
                        match notes.recv().await {
                            Ok(n) if n == id => return,
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await
                            }
                        }
                    }
                };
                tokio::select! {
                    () = wait => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = tx.closed() => return,
                }
                let batch = async {
                    let db = this.inner.pool.get().await?;
                    let events = repo::events_after(&db, id, seq).await?;
                    let now = if events.is_empty() {
                        None
                    } else {
                        repo::get_server(&db, id).await?
                    };
                    Ok::<_, Error>((events, now))
                }
                .await;
                let (events, now) = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let Some(now) = now else { continue };
                for e in events {
                    seq = e.seq;
                    if e.revision <= sent {
                        continue;
                    }
                    sent = e.revision;
                    let mut s = now.clone();
                    s.revision = e.revision;
                    s.vm_state = e.vm_state;
                    s.task_state = e.task_state;
                    s.power_state = e.power_state;
                    s.fault = e.fault.map(|(code, message)| Fault {
                        code,
                        message,
                        at: None,
                    });
                    s.host = e.host;
                    s.locked = e.locked;
                    let deleted = s.vm_state == vm::DELETED;
                    if tx.send(Ok(view(&c, s))).await.is_err() || deleted {
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    // -------------------------------------------------------------- flavors

    pub async fn create_flavor(&self, c: &Caller, f: NewFlavor) -> Result<Flavor> {
        admin_only(c)?;
        let db = self.inner.pool.get().await?;
        repo::insert_flavor(
            &db,
            &Flavor {
                id: Uuid::new_v4(),
                name: f.name.into_string(),
                vcpus: f.vcpus,
                ram_mb: f.ram_mb,
                disk_gb: f.disk_gb,
                ephemeral_gb: f.ephemeral_gb,
                extra_specs: f.extra_specs,
                is_public: f.is_public,
                projects: vec![],
            },
        )
        .await
    }

    pub async fn get_flavor(&self, c: &Caller, f: &NameOrId) -> Result<Flavor> {
        authenticated(c)?;
        let mut fl = self.visible_flavor(c, f).await?;
        if !c.is_admin {
            fl.projects.clear();
        }
        Ok(fl)
    }

    pub async fn list_flavors(&self, c: &Caller) -> Result<Vec<Flavor>> {
        authenticated(c)?;
        let db = self.inner.pool.get().await?;
        let all = repo::list_flavors(&db).await?;
        Ok(all
            .into_iter()
            .filter(|f| {
                f.is_public
                    || c.is_admin
                    || c.project_id
                        .as_deref()
                        .is_some_and(|p| f.projects.iter().any(|x| x == p))
            })
            .map(|mut f| {
                if !c.is_admin {
                    f.projects.clear();
                }
                f
            })
            .collect())
    }

    pub async fn delete_flavor(&self, c: &Caller, f: &NameOrId) -> Result<()> {
        admin_only(c)?;
        let fl = self.visible_flavor(c, f).await?;
        let db = self.inner.pool.get().await?;
        repo::delete_flavor(&db, fl.id).await?;
        Ok(())
    }

    pub async fn flavor_access(
        &self,
        c: &Caller,
        f: &NameOrId,
        project: &str,
        add: bool,
    ) -> Result<Flavor> {
        admin_only(c)?;
        let fl = self.visible_flavor(c, f).await?;
        if fl.is_public {
            return Err(Error::precondition(format!(
                "flavor {} is public: access applies to private flavors only",
                fl.name
            )));
        }
        let db = self.inner.pool.get().await?;
        repo::set_flavor_access(&db, fl.id, project, add).await?;
        repo::get_flavor(&db, Some(fl.id), None)
            .await?
            .ok_or_else(|| Error::not_found("flavor", f))
    }

    // ------------------------------------------------------------ key pairs

    /// Imports `public_key`, or generates a pair and returns its private half.
    pub async fn create_keypair(
        &self,
        c: &Caller,
        name: Name,
        public_key: Option<String>,
    ) -> Result<(KeyPair, Option<String>)> {
        let project = project(c)?.to_string();
        let user = user(c)?.to_string();
        can_change(c)?;
        let (public, private) = match public_key {
            Some(line) => (keys::parse_public(&line)?, None),
            None => {
                let (p, k) = keys::generate(name.as_str())?;
                (p, Some(k))
            }
        };
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        repo::lock_project(&tx, &project).await?;
        let (limits, usage) = repo::quota(&tx, &project, self.inner.config.quota).await?;
        over_quota("key_pairs", limits.key_pairs, usage.key_pairs, 1)?;
        let kp = repo::insert_keypair(
            &tx,
            &KeyPair {
                user_id: user,
                name: name.into_string(),
                project_id: project,
                kind: public.kind,
                public_key: public.line,
                fingerprint: public.fingerprint,
                created_at: time::OffsetDateTime::now_utc(),
            },
        )
        .await?;
        tx.commit().await?;
        Ok((kp, private))
    }

    pub async fn get_keypair(&self, c: &Caller, name: &Name) -> Result<KeyPair> {
        let user = user(c)?;
        let db = self.inner.pool.get().await?;
        repo::get_keypair(&db, user, name.as_str())
            .await?
            .ok_or_else(|| Error::not_found("key pair", name))
    }

    pub async fn list_keypairs(&self, c: &Caller) -> Result<Vec<KeyPair>> {
        let user = user(c)?;
        let db = self.inner.pool.get().await?;
        repo::list_keypairs(&db, user).await
    }

    pub async fn delete_keypair(&self, c: &Caller, name: &Name) -> Result<()> {
        let user = user(c)?;
        can_change(c)?;
        let db = self.inner.pool.get().await?;
        if repo::delete_keypair(&db, user, name.as_str()).await? {
            Ok(())
        } else {
            Err(Error::not_found("key pair", name))
        }
    }

    // -------------------------------------------------------- server groups

    pub async fn create_group(
        &self,
        c: &Caller,
        name: Name,
        policy: String,
    ) -> Result<ServerGroup> {
        let project = project(c)?.to_string();
        let user = user(c)?.to_string();
        can_change(c)?;
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        repo::lock_project(&tx, &project).await?;
        let (limits, usage) = repo::quota(&tx, &project, self.inner.config.quota).await?;
        over_quota(
            "server_groups",
            limits.server_groups,
            usage.server_groups,
            1,
        )?;
        let g = repo::insert_group(
            &tx,
            &ServerGroup {
                id: Uuid::new_v4(),
                project_id: project,
                user_id: user,
                name: name.into_string(),
                policy,
                members: vec![],
            },
        )
        .await?;
        tx.commit().await?;
        Ok(g)
    }

    async fn visible_group(&self, c: &Caller, id: Uuid) -> Result<ServerGroup> {
        authenticated(c)?;
        let db = self.inner.pool.get().await?;
        match repo::get_group(&db, id).await? {
            Some(g) if sees(c, &g.project_id) => Ok(g),
            _ => Err(Error::not_found("server group", id)),
        }
    }

    pub async fn get_group(&self, c: &Caller, id: Uuid) -> Result<ServerGroup> {
        self.visible_group(c, id).await
    }

    pub async fn list_groups(&self, c: &Caller) -> Result<Vec<ServerGroup>> {
        let p = project(c)?;
        let db = self.inner.pool.get().await?;
        repo::list_groups(&db, Some(p)).await
    }

    pub async fn delete_group(&self, c: &Caller, id: Uuid) -> Result<()> {
        let g = self.visible_group(c, id).await?;
        can_change(c)?;
        if !g.members.is_empty() {
            return Err(Error::precondition(format!(
                "server group {id} still has {} servers",
                g.members.len()
            )));
        }
        let db = self.inner.pool.get().await?;
        repo::delete_group(&db, id).await?;
        Ok(())
    }

    // --------------------------------------------------------------- quotas

    pub async fn get_quota(
        &self,
        c: &Caller,
        project_id: Option<String>,
    ) -> Result<(String, Limits, Limits)> {
        let own = project(c)?.to_string();
        let p = project_id.unwrap_or(own.clone());
        if p != own && !c.is_admin {
            return Err(Error::forbidden(
                "only an administrator may read another project's quota",
            ));
        }
        let db = self.inner.pool.get().await?;
        let (limits, usage) = repo::quota(&db, &p, self.inner.config.quota).await?;
        Ok((p, limits, usage))
    }

    pub async fn set_quota(
        &self,
        c: &Caller,
        project_id: String,
        l: Limits,
    ) -> Result<(String, Limits, Limits)> {
        admin_only(c)?;
        let db = self.inner.pool.get().await?;
        repo::set_quota(&db, &project_id, &l).await?;
        drop(db);
        self.get_quota(c, Some(project_id)).await
    }

    // ---------------------------------------------------------------- hosts

    pub async fn list_hosts(&self, c: &Caller) -> Result<Vec<Host>> {
        admin_only(c)?;
        let db = self.inner.pool.get().await?;
        repo::list_hosts(&db, self.down_after()).await
    }

    pub async fn get_host(&self, c: &Caller, name: &str) -> Result<Host> {
        admin_only(c)?;
        let db = self.inner.pool.get().await?;
        repo::get_host(&db, name, self.down_after())
            .await?
            .ok_or_else(|| Error::not_found("host", name))
    }

    pub async fn set_host(
        &self,
        c: &Caller,
        name: &str,
        enabled: bool,
        reason: &str,
    ) -> Result<Host> {
        admin_only(c)?;
        let db = self.inner.pool.get().await?;
        if !repo::set_host(&db, name, enabled, if enabled { "" } else { reason }).await? {
            return Err(Error::not_found("host", name));
        }
        repo::get_host(&db, name, self.down_after())
            .await?
            .ok_or_else(|| Error::not_found("host", name))
    }
}

fn over_quota(what: &str, limit: i64, used: i64, more: i64) -> Result<()> {
    if limit >= 0 && used + more > limit {
        Err(Error::exhausted(format!(
            "quota exceeded for {what}: {more} requested, {used} of {limit} used"
        )))
    } else {
        Ok(())
    }
}
