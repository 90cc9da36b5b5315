//! The domain: every operation resolves what it names, authorizes the
//! caller, and acts, in one method. No tonic types here; `grpc.rs`
//! validates requests into the `New*`/`*Update` values below.
//!
//! Who may do what (the README's table says the same):
//! - a user's token is scoped to a project; readers read, members and admins
//!   change. A network is visible to its project, to everyone when shared,
//!   and to admins; everything else (subnets, ports, groups) to its project
//!   and admins. Anything a caller may not see is NOT_FOUND.
//! - `shared`, another `project_id`, `network:*` device owners and quotas
//!   are admin-only; segmentation ids are shown to admins only.
//! - a port's `binding_host` is set by an admin, or by the compute agent of
//!   that host (`.../svc/compute-agent/host/<h>`, the sidecar's verified
//!   peer), either with the user's token it passes along (then the port must
//!   be the user's project's) or with its identity alone; a compute agent
//!   without a token may also create ports for a server (`project_id`,
//!   `device_id` and a `compute:*` owner required) on a network that project
//!   may use, and read and watch ports;
//! - a network agent (`.../svc/network-agent/host/<h>`) sees and wires only
//!   the ports bound to `<h>`.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use runtime::caller::Caller;
use runtime::error::{Error, Result};
use runtime::types::{Name, NameOrId};
use uuid::Uuid;

use crate::Config;
use crate::addr::{self, Cidr4};
use crate::changes::Changes;
use crate::model::*;
use crate::repo;

const SPIFFE_NETWORK_AGENT: &str = "spiffe://cirrus.local/svc/network-agent/host/";
const SPIFFE_COMPUTE_AGENT: &str = "spiffe://cirrus.local/svc/compute-agent/host/";
/// Random probes before the IPAM scans a pool for a free address.
const RANDOM_PROBES: usize = 8;
/// Scans before the IPAM gives up on a contended subnet (then UNAVAILABLE).
const SCANS: usize = 64;
/// Longest `SyncHost` wait an agent may ask for.
pub const MAX_SYNC_WAIT: Duration = Duration::from_secs(30);

/// The caller, as the service's rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    User {
        project: String,
        can_write: bool,
        admin: bool,
        /// The compute agent's host when the user's token came through a
        /// compute agent (the verified peer): it may bind to that host.
        via_host: Option<String>,
    },
    ComputeAgent {
        host: String,
    },
    NetworkAgent {
        host: String,
    },
}

impl Actor {
    pub fn from_caller(c: &Caller) -> Result<Self> {
        let peer = c.peer.as_deref().unwrap_or_default();
        let compute_host = peer
            .strip_prefix(SPIFFE_COMPUTE_AGENT)
            .filter(|h| valid_host(h));
        if c.is_authenticated() {
            let admin = c.is_admin;
            let project = match &c.project_id {
                Some(p) => p.clone(),
                None => {
                    return Err(Error::forbidden(
                        "a project-scoped token is required for the network service",
                    ));
                }
            };
            return Ok(Actor::User {
                project,
                can_write: admin || c.has_role("member") || c.has_role("admin"),
                admin,
                via_host: compute_host.map(str::to_string),
            });
        }
        if let Some(h) = peer
            .strip_prefix(SPIFFE_NETWORK_AGENT)
            .filter(|h| valid_host(h))
        {
            return Ok(Actor::NetworkAgent { host: h.into() });
        }
        if let Some(h) = compute_host {
            return Ok(Actor::ComputeAgent { host: h.into() });
        }
        Err(Error::unauthenticated(format!(
            "no user and no agent identity (peer {peer:?})"
        )))
    }

    fn is_admin(&self) -> bool {
        matches!(self, Actor::User { admin: true, .. })
    }

    /// The project of a user; agents act for nobody's project.
    fn project(&self) -> Option<&str> {
        match self {
            Actor::User { project, .. } => Some(project),
            _ => None,
        }
    }

    /// A user who may change things: their project.
    fn writer(&self) -> Result<&str> {
        match self {
            Actor::User {
                project,
                can_write: true,
                ..
            } => Ok(project),
            Actor::User { .. } => Err(Error::forbidden(
                "the member or admin role is required to change networks",
            )),
            _ => Err(Error::forbidden("a user token is required")),
        }
    }

    fn network_agent(&self) -> Result<&str> {
        match self {
            Actor::NetworkAgent { host } => Ok(host),
            _ => Err(Error::forbidden("only a network agent may call this")),
        }
    }

    /// Whether this caller may read objects of `project`.
    fn reads(&self, project: &str) -> bool {
        match self {
            Actor::User { admin: true, .. } => true,
            Actor::User { project: p, .. } => p == project,
            _ => false,
        }
    }
}

/// A host name as agents report it: 1 to 63 of `a-z A-Z 0-9 . _ -`.
pub fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A random address of the subnet's pools (`None`: no pool address).
fn random_pool_address(s: &Subnet) -> Option<Ipv4Addr> {
    let total: u64 = s.pools.iter().map(|p| p.size()).sum();
    if total == 0 {
        return None;
    }
    let mut n = addr::random_below(total);
    for p in &s.pools {
        if n < p.size() {
            return Some(p.nth(n));
        }
        n -= p.size();
    }
    None
}

// --------------------------------------------------------------- requests

pub struct NewNetwork {
    pub name: Name,
    pub project_id: Option<String>,
    pub shared: bool,
    pub admin_state_up: bool,
    pub mtu: Option<u32>,
}

pub struct NetworkUpdate {
    pub id: NameOrId,
    pub name: Option<Name>,
    pub shared: Option<bool>,
    pub admin_state_up: Option<bool>,
}

pub struct NewSubnet {
    pub network: NameOrId,
    pub name: String,
    pub cidr: Cidr4,
    pub gateway: Option<Ipv4Addr>,
    /// Already checked against the CIDR and the gateway.
    pub pools: Vec<addr::Pool>,
    pub dns: Vec<Ipv4Addr>,
    pub routes: Vec<Route>,
    pub enable_dhcp: bool,
}

pub struct FixedIpRequest {
    pub subnet: Option<Uuid>,
    pub ip: Option<Ipv4Addr>,
}

pub struct NewPort {
    pub network: NameOrId,
    pub name: String,
    pub mac: Option<String>,
    pub fixed_ips: Vec<FixedIpRequest>,
    pub device_id: String,
    pub device_owner: String,
    pub security_groups: Vec<NameOrId>,
    pub admin_state_up: bool,
    pub project_id: Option<String>,
}

pub struct PortUpdate {
    pub id: Uuid,
    pub name: Option<String>,
    pub admin_state_up: Option<bool>,
    pub device_id: Option<String>,
    pub device_owner: Option<String>,
    pub security_groups: Option<Vec<NameOrId>>,
}

pub struct NewRule {
    pub group: NameOrId,
    pub direction: Direction,
    pub protocol: Protocol,
    pub port_min: u16,
    pub port_max: u16,
    pub remote_ip_prefix: String,
    pub remote_group: Option<NameOrId>,
}

pub struct PortQuery {
    pub network: Option<NameOrId>,
    pub device_id: Option<String>,
    pub all_projects: bool,
}

/// The network service: a pool, the config, and the change counter.
#[derive(Clone)]
pub struct Net {
    pub pool: Pool,
    pub config: Arc<Config>,
    pub changes: Changes,
    /// Each project's `default` group once known (it is never deleted).
    pub default_groups: Arc<std::sync::Mutex<HashMap<String, Uuid>>>,
}

type Conn = deadpool_postgres::Object;

impl Net {
    async fn conn(&self) -> Result<Conn> {
        Ok(self.pool.get().await?)
    }

    fn down_secs(&self) -> f64 {
        self.config.agent_down_secs as f64
    }

    fn limit(&self, overrides: &[(String, i64)], resource: &str) -> i64 {
        overrides
            .iter()
            .find(|(r, _)| r == resource)
            .map(|(_, l)| *l)
            .unwrap_or(match resource {
                "networks" => self.config.quota.networks,
                "subnets" => self.config.quota.subnets,
                "ports" => self.config.quota.ports,
                "security_groups" => self.config.quota.security_groups,
                _ => self.config.quota.security_group_rules,
            })
    }

    /// Charges `n` of `resource` to `project` in `c`'s transaction.
    async fn charge(
        &self,
        c: &impl GenericClient,
        project: &str,
        resource: &str,
        n: i64,
    ) -> Result<()> {
        let overrides = repo::quota_overrides(c, project).await?;
        let limit = self.limit(&overrides, resource);
        if !repo::charge(c, project, resource, n, limit).await? {
            return Err(Error::exhausted(format!(
                "quota exceeded for {resource}: limit {limit}"
            )));
        }
        Ok(())
    }

    // ----------------------------------------------------------- networks

    async fn visible_network(
        &self,
        c: &impl GenericClient,
        who: &Actor,
        key: &NameOrId,
    ) -> Result<Network> {
        let found = match key {
            NameOrId::Id(id) => repo::get_network(c, *id).await?,
            NameOrId::Name(n) => match who.project() {
                Some(p) => repo::find_networks_by_name(c, p, n.as_str())
                    .await?
                    .into_iter()
                    .next(),
                None => None,
            },
        };
        self.network_if_visible(found, who, key)
    }

    fn network_if_visible(
        &self,
        found: Option<Network>,
        who: &Actor,
        key: &NameOrId,
    ) -> Result<Network> {
        match found {
            Some(n) if n.shared || who.reads(&n.project_id) => Ok(n),
            Some(n) if matches!(who, Actor::ComputeAgent { .. }) => Ok(n),
            _ => Err(Error::not_found("network", key)),
        }
    }

    /// A network the caller may change (owner's member, or admin).
    async fn owned_network(
        &self,
        c: &impl GenericClient,
        who: &Actor,
        key: &NameOrId,
    ) -> Result<Network> {
        let project = who.writer()?;
        let n = self.visible_network(c, who, key).await?;
        if n.project_id != project && !who.is_admin() {
            return Err(Error::forbidden(format!(
                "network {} belongs to another project",
                n.id
            )));
        }
        Ok(n)
    }

    pub async fn create_network(&self, who: &Actor, req: NewNetwork) -> Result<Network> {
        let mut project = who.writer()?.to_string();
        if let Some(p) = req.project_id.filter(|p| *p != project) {
            if !who.is_admin() {
                return Err(Error::forbidden("only an administrator may set project_id"));
            }
            project = p;
        }
        if req.shared && !who.is_admin() {
            return Err(Error::forbidden("only an administrator may set shared"));
        }
        let mtu = req.mtu.unwrap_or(self.config.default_mtu);
        let id = Uuid::new_v4();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let new = repo::NewNetwork {
            id,
            project_id: &project,
            name: req.name.as_str(),
            shared: req.shared,
            admin_state_up: req.admin_state_up,
            mtu,
        };
        let (lo, hi) = (self.config.vni_min, self.config.vni_max);
        let span = u64::from(hi - lo) + 1;
        let mut done = false;
        for _ in 0..RANDOM_PROBES {
            let vni = lo + addr::random_below(span) as u32;
            if repo::insert_network(&tx, &new, vni).await? {
                done = true;
                break;
            }
        }
        while !done {
            let Some(vni) = repo::free_vni(&tx, lo, hi).await? else {
                return Err(Error::exhausted(format!(
                    "no free segmentation id in {lo}-{hi}"
                )));
            };
            done = repo::insert_network(&tx, &new, vni).await?;
        }
        self.charge(&tx, &project, "networks", 1).await?;
        tx.commit().await?;
        repo::get_network(&conn, id)
            .await?
            .ok_or_else(|| Error::not_found("network", id))
    }

    pub async fn get_network(&self, who: &Actor, key: &NameOrId) -> Result<Network> {
        self.visible_network(&self.conn().await?, who, key).await
    }

    pub async fn list_networks(&self, who: &Actor, all_projects: bool) -> Result<Vec<Network>> {
        let project = match who {
            Actor::User { admin: true, .. } if all_projects => None,
            Actor::User { project, .. } => Some(project.as_str()),
            _ => return Err(Error::forbidden("a user token is required")),
        };
        repo::list_networks(&self.conn().await?, project).await
    }

    pub async fn update_network(&self, who: &Actor, req: NetworkUpdate) -> Result<Network> {
        if req.shared.is_some() && !who.is_admin() {
            return Err(Error::forbidden("only an administrator may set shared"));
        }
        let conn = self.conn().await?;
        let n = self.owned_network(&conn, who, &req.id).await?;
        repo::update_network(
            &conn,
            n.id,
            req.name.as_ref().map(Name::as_str),
            req.shared,
            req.admin_state_up,
        )
        .await?;
        repo::notify(&conn).await?;
        self.changes.bump();
        repo::get_network(&conn, n.id)
            .await?
            .ok_or_else(|| Error::not_found("network", n.id))
    }

    pub async fn delete_network(&self, who: &Actor, key: &NameOrId) -> Result<()> {
        let mut conn = self.conn().await?;
        let n = self.owned_network(&conn, who, key).await?;
        let tx = conn.transaction().await?;
        if !repo::lock_network(&tx, n.id).await? {
            return Err(Error::not_found("network", key));
        }
        let in_use = repo::ports_in_use(&tx, n.id).await?;
        if in_use > 0 {
            return Err(Error::precondition(format!(
                "network {} has {in_use} port(s) in use",
                n.id
            )));
        }
        let subnets = repo::subnets_of(&tx, &[n.id]).await?.len() as i64;
        repo::delete_network(&tx, n.id).await?;
        repo::refund(&tx, &n.project_id, "subnets", subnets).await?;
        repo::refund(&tx, &n.project_id, "networks", 1).await?;
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        Ok(())
    }

    // ------------------------------------------------------------ subnets

    pub async fn create_subnet(&self, who: &Actor, req: NewSubnet) -> Result<Subnet> {
        let mut conn = self.conn().await?;
        let n = self.owned_network(&conn, who, &req.network).await?;
        let tx = conn.transaction().await?;
        if !repo::lock_network(&tx, n.id).await? {
            return Err(Error::not_found("network", &req.network));
        }
        if let Some(other) = repo::overlapping_subnet(&tx, n.id, &req.cidr).await? {
            return Err(Error::invalid(
                "cidr",
                format!(
                    "{} overlaps {other}, a subnet of the same network",
                    req.cidr
                ),
            ));
        }
        let s = Subnet {
            id: Uuid::new_v4(),
            network_id: n.id,
            project_id: n.project_id.clone(),
            name: req.name,
            cidr: req.cidr,
            gateway: req.gateway,
            pools: req.pools,
            dns: req.dns.iter().map(|d| d.to_string()).collect(),
            routes: req.routes,
            enable_dhcp: req.enable_dhcp,
            created_at: time::OffsetDateTime::now_utc(),
        };
        repo::insert_subnet(&tx, &s).await?;
        repo::notify(&tx).await?;
        self.charge(&tx, &n.project_id, "subnets", 1).await?;
        tx.commit().await?;
        self.changes.bump();
        repo::get_subnet(&conn, s.id)
            .await?
            .ok_or_else(|| Error::not_found("subnet", s.id))
    }

    async fn visible_subnet(
        &self,
        c: &impl GenericClient,
        who: &Actor,
        id: Uuid,
    ) -> Result<Subnet> {
        let s = repo::get_subnet(c, id)
            .await?
            .ok_or_else(|| Error::not_found("subnet", id))?;
        // Visible with its network.
        self.visible_network(c, who, &NameOrId::Id(s.network_id))
            .await
            .map_err(|_| Error::not_found("subnet", id))?;
        Ok(s)
    }

    pub async fn get_subnet(&self, who: &Actor, id: Uuid) -> Result<Subnet> {
        self.visible_subnet(&self.conn().await?, who, id).await
    }

    pub async fn list_subnets(
        &self,
        who: &Actor,
        network: Option<NameOrId>,
    ) -> Result<Vec<Subnet>> {
        let conn = self.conn().await?;
        match network {
            Some(key) => {
                let n = self.visible_network(&conn, who, &key).await?;
                repo::subnets_of(&conn, &[n.id]).await
            }
            None => {
                let project = match who {
                    Actor::User { admin: true, .. } => None,
                    Actor::User { project, .. } => Some(project.as_str()),
                    _ => return Err(Error::forbidden("a user token is required")),
                };
                repo::list_subnets(&conn, project).await
            }
        }
    }

    pub async fn delete_subnet(&self, who: &Actor, id: Uuid) -> Result<()> {
        let mut conn = self.conn().await?;
        let s = self.visible_subnet(&conn, who, id).await?;
        self.owned_network(&conn, who, &NameOrId::Id(s.network_id))
            .await?;
        let tx = conn.transaction().await?;
        repo::lock_network(&tx, s.network_id).await?;
        let used = repo::subnet_in_use(&tx, id).await?;
        if used > 0 {
            return Err(Error::precondition(format!(
                "subnet {id} has {used} address(es) in use"
            )));
        }
        if repo::delete_subnet(&tx, id).await? == 1 {
            repo::refund(&tx, &s.project_id, "subnets", 1).await?;
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        Ok(())
    }

    // --------------------------------------------------------------- IPAM

    /// One address of `subnet` for `port`, in `c`'s transaction: `want` if
    /// free, else a random probe of the pools, then a scan; the primary key
    /// of `ip_allocations` is what keeps two ports from one address.
    async fn allocate(
        &self,
        c: &impl GenericClient,
        subnet: &Subnet,
        port: Uuid,
        want: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        if let Some(ip) = want {
            let ok_host = subnet.cidr.is_host(ip) && Some(ip) != subnet.gateway;
            if !ok_host {
                return Err(Error::invalid(
                    "fixed_ips",
                    format!("{ip} is not a free host address of subnet {}", subnet.cidr),
                ));
            }
            if !repo::try_allocate(c, subnet.id, ip, port).await? {
                return Err(Error::already_exists("ip address", ip));
            }
            return Ok(ip);
        }
        let total: u64 = subnet.pools.iter().map(|p| p.size()).sum();
        if total == 0 {
            return Err(Error::exhausted(format!(
                "subnet {} has no free address",
                subnet.id
            )));
        }
        for _ in 0..RANDOM_PROBES {
            let mut n = addr::random_below(total);
            let pool = subnet.pools.iter().find(|p| {
                if n < p.size() {
                    true
                } else {
                    n -= p.size();
                    false
                }
            });
            if let Some(pool) = pool {
                let ip = pool.nth(n);
                if repo::try_allocate(c, subnet.id, ip, port).await? {
                    return Ok(ip);
                }
            }
        }
        for _ in 0..SCANS {
            let mut found = None;
            for pool in &subnet.pools {
                if let Some(ip) = repo::first_free(c, subnet.id, pool).await? {
                    found = Some(ip);
                    break;
                }
            }
            let Some(ip) = found else {
                return Err(Error::exhausted(format!(
                    "subnet {} has no free address",
                    subnet.id
                )));
            };
            if repo::try_allocate(c, subnet.id, ip, port).await? {
                return Ok(ip);
            }
        }
        Err(Error::unavailable(format!(
            "subnet {} too contended to allocate",
            subnet.id
        )))
    }

    // -------------------------------------------------------------- ports

    async fn visible_port(&self, c: &impl GenericClient, who: &Actor, id: Uuid) -> Result<Port> {
        let p = repo::get_port(c, id)
            .await?
            .ok_or_else(|| Error::not_found("port", id))?;
        let ok = match who {
            Actor::User { .. } => who.reads(&p.project_id),
            Actor::ComputeAgent { .. } => true,
            Actor::NetworkAgent { host } => p.binding_host == *host,
        };
        if ok {
            Ok(p)
        } else {
            Err(Error::not_found("port", id))
        }
    }

    async fn owned_port(&self, c: &impl GenericClient, who: &Actor, id: Uuid) -> Result<Port> {
        let project = who.writer()?;
        let p = self.visible_port(c, who, id).await?;
        if p.project_id != project && !who.is_admin() {
            return Err(Error::not_found("port", id));
        }
        Ok(p)
    }

    /// The project's `default` group, made on first use: all egress, and
    /// ingress from the group's own members.
    pub async fn default_group(&self, project: &str) -> Result<Uuid> {
        let g = self.find_or_make_default_group(project).await?;
        if let Ok(mut m) = self.default_groups.lock() {
            m.insert(project.to_string(), g);
        }
        Ok(g)
    }

    async fn find_or_make_default_group(&self, project: &str) -> Result<Uuid> {
        let mut conn = self.conn().await?;
        if let Some(g) = repo::find_group_by_name(&conn, project, "default").await? {
            return Ok(g.id);
        }
        let tx = conn.transaction().await?;
        let g = SecurityGroup {
            id: Uuid::new_v4(),
            project_id: project.into(),
            name: "default".into(),
            description: "Default security group".into(),
            rules: Vec::new(),
            created_at: time::OffsetDateTime::now_utc(),
        };
        if repo::insert_group(&tx, &g).await? {
            for (direction, remote) in [(Direction::Egress, None), (Direction::Ingress, Some(g.id))]
            {
                repo::insert_rule(
                    &tx,
                    &Rule {
                        id: Uuid::new_v4(),
                        security_group_id: g.id,
                        direction,
                        protocol: Protocol::Any,
                        port_min: 0,
                        port_max: 0,
                        remote_ip_prefix: String::new(),
                        remote_group_id: remote,
                    },
                )
                .await?;
            }
            tx.commit().await?;
            return Ok(g.id);
        }
        drop(tx);
        repo::find_group_by_name(&conn, project, "default")
            .await?
            .map(|g| g.id)
            .ok_or_else(|| Error::internal("default group vanished"))
    }

    async fn resolve_groups(
        &self,
        c: &impl GenericClient,
        project: &str,
        keys: &[NameOrId],
    ) -> Result<Vec<Uuid>> {
        let mut out = BTreeSet::new();
        for k in keys {
            let g = match k {
                NameOrId::Id(id) => repo::get_group(c, *id)
                    .await?
                    .filter(|g| g.project_id == project),
                NameOrId::Name(n) => repo::find_group_by_name(c, project, n.as_str()).await?,
            };
            out.insert(g.ok_or_else(|| Error::not_found("security group", k))?.id);
        }
        Ok(out.into_iter().collect())
    }

    fn cached_default_group(&self, project: &str) -> Option<Uuid> {
        self.default_groups
            .lock()
            .ok()
            .and_then(|m| m.get(project).copied())
    }

    /// The common create in one statement (see [`repo::create_port_whole`]):
    /// generated MAC, addresses (requested, or random from the pools), groups
    /// and the quota charge. Without a limit that is one round trip; with one,
    /// the statement and the fresh usage sum are pipelined in a transaction
    /// (the charge's shard lock is taken before the sum is read, as in
    /// [`repo::charge`]). `None`: something was taken or the limit is near;
    /// nothing was written and the caller takes the careful path.
    #[allow(clippy::too_many_arguments)]
    async fn create_port_fast(
        &self,
        conn: &mut Conn,
        n: &Network,
        project: &str,
        req: &NewPort,
        wants: &[(Subnet, Option<Ipv4Addr>)],
        groups: &[Uuid],
        limit: i64,
    ) -> Result<Option<Port>> {
        let mut ips: Vec<(Uuid, Ipv4Addr)> = Vec::with_capacity(wants.len());
        for (s, want) in wants {
            let ip = match want {
                Some(ip) => {
                    if !(s.cidr.is_host(*ip) && Some(*ip) != s.gateway) {
                        return Err(Error::invalid(
                            "fixed_ips",
                            format!("{ip} is not a free host address of subnet {}", s.cidr),
                        ));
                    }
                    *ip
                }
                None => match random_pool_address(s) {
                    Some(ip) => ip,
                    None => return Ok(None),
                },
            };
            if ips.contains(&(s.id, ip)) {
                return Ok(None);
            }
            ips.push((s.id, ip));
        }
        if limit >= 0 && limit < i64::from(repo::USAGE_SHARDS) {
            return Ok(None);
        }
        let id = Uuid::new_v4();
        let mac = req.mac.clone().unwrap_or_else(addr::random_mac);
        let p = repo::NewPort {
            id,
            network_id: n.id,
            project_id: project,
            name: &req.name,
            mac: &mac,
            device_id: &req.device_id,
            device_owner: &req.device_owner,
            admin_state_up: req.admin_state_up,
            port_security: true,
            binding_host: "",
            binding_bridge: "",
        };
        let shard = Some(repo::usage_shard());
        let created_at = if limit < 0 {
            match repo::create_port_whole(&*conn, &p, &ips, groups, shard).await? {
                repo::Created::Done(at) => at,
                repo::Created::Taken => return Ok(None),
            }
        } else {
            let tx = conn.transaction().await?;
            // Both statements are prepared (cached) first, so that their two
            // executions go out in this order on the connection: the sum is
            // read after the charge took its shard's lock.
            repo::prepare_create_port(&tx).await?;
            let (created, used) = tokio::join!(
                repo::create_port_whole(&tx, &p, &ips, groups, shard),
                repo::ports_used(&tx, project),
            );
            let at = match created? {
                repo::Created::Done(at) => at,
                repo::Created::Taken => return Ok(None),
            };
            if used? + i64::from(repo::USAGE_SHARDS - 1) > limit {
                return Ok(None);
            }
            tx.commit().await?;
            at
        };
        let mut fixed_ips = ips;
        fixed_ips.sort_by_key(|(_, ip)| u32::from(*ip));
        let mut security_groups = groups.to_vec();
        security_groups.sort();
        Ok(Some(Port {
            id,
            network_id: n.id,
            project_id: project.to_string(),
            name: req.name.clone(),
            mac,
            fixed_ips,
            device_id: req.device_id.clone(),
            device_owner: req.device_owner.clone(),
            security_groups,
            admin_state_up: req.admin_state_up,
            status: PortStatus::Down,
            port_security: true,
            binding_host: String::new(),
            binding_bridge: String::new(),
            binding_error: String::new(),
            created_at,
        }))
    }

    pub async fn create_port(&self, who: &Actor, req: NewPort) -> Result<Port> {
        let project = match who {
            // A compute agent without a token creates its servers' ports:
            // for the server's project, marked as a server's port.
            Actor::ComputeAgent { .. } => {
                let Some(p) = req.project_id.clone() else {
                    return Err(Error::invalid(
                        "project_id",
                        "a compute agent must name the server's project",
                    ));
                };
                if req.device_id.is_empty() || !req.device_owner.starts_with("compute:") {
                    return Err(Error::invalid(
                        "device_owner",
                        "a compute agent creates only server ports (device_id and a compute:* device_owner)",
                    ));
                }
                p
            }
            _ => {
                let mut project = who.writer()?.to_string();
                if let Some(p) = req.project_id.clone().filter(|p| *p != project) {
                    if !who.is_admin() {
                        return Err(Error::forbidden("only an administrator may set project_id"));
                    }
                    project = p;
                }
                project
            }
        };
        if req.device_owner.starts_with("network:") && !who.is_admin() {
            return Err(Error::forbidden(
                "only an administrator may set a network:* device_owner",
            ));
        }
        // The default group is known after its first use (it cannot be deleted).
        let mut groups = if req.security_groups.is_empty() {
            self.cached_default_group(&project).map(|g| vec![g])
        } else {
            None
        };
        let mut conn = self.conn().await?;
        // The lookups, pipelined on one connection: the network, its
        // subnets, the project's quota overrides.
        let (n, subnets, overrides) = match &req.network {
            NameOrId::Id(nid) => {
                let (n, subnets, overrides) = tokio::try_join!(
                    repo::get_network(&conn, *nid),
                    repo::subnets_of(&conn, std::slice::from_ref(nid)),
                    repo::quota_overrides(&conn, &project),
                )?;
                (
                    self.network_if_visible(n, who, &req.network)?,
                    subnets,
                    overrides,
                )
            }
            NameOrId::Name(_) => {
                let n = self.visible_network(&conn, who, &req.network).await?;
                let (subnets, overrides) = tokio::try_join!(
                    repo::subnets_of(&conn, std::slice::from_ref(&n.id)),
                    repo::quota_overrides(&conn, &project),
                )?;
                (n, subnets, overrides)
            }
        };
        if n.project_id != project && !n.shared && !who.is_admin() {
            return Err(Error::not_found("network", &req.network));
        }
        // Which subnet each requested address comes from.
        let mut wants: Vec<(Subnet, Option<Ipv4Addr>)> = Vec::new();
        if req.fixed_ips.is_empty()
            && let Some(s) = subnets.first()
        {
            wants.push((s.clone(), None));
        }
        for f in &req.fixed_ips {
            let s = match (f.subnet, f.ip) {
                (Some(id), _) => subnets.iter().find(|s| s.id == id).ok_or_else(|| {
                    Error::invalid(
                        "fixed_ips",
                        format!("subnet {id} is not a subnet of network {}", n.id),
                    )
                })?,
                (None, Some(ip)) => {
                    subnets
                        .iter()
                        .find(|s| s.cidr.contains(ip))
                        .ok_or_else(|| {
                            Error::invalid(
                                "fixed_ips",
                                format!("{ip} is in no subnet of network {}", n.id),
                            )
                        })?
                }
                (None, None) => subnets.first().ok_or_else(|| {
                    Error::invalid("fixed_ips", format!("network {} has no subnet", n.id))
                })?,
            };
            if let Some(ip) = f.ip
                && !s.cidr.contains(ip)
            {
                return Err(Error::invalid(
                    "fixed_ips",
                    format!("{ip} is outside subnet {} ({})", s.id, s.cidr),
                ));
            }
            wants.push((s.clone(), f.ip));
        }
        if groups.is_none() && !req.security_groups.is_empty() {
            groups = Some(
                self.resolve_groups(&conn, &project, &req.security_groups)
                    .await?,
            );
        }
        let groups = match groups {
            Some(g) => g,
            None => {
                // Never hold a pooled connection while asking for another.
                drop(conn);
                let g = vec![self.default_group(&project).await?];
                conn = self.conn().await?;
                g
            }
        };
        let limit = self.limit(&overrides, "ports");
        if let Some(p) = self
            .create_port_fast(&mut conn, &n, &project, &req, &wants, &groups, limit)
            .await?
        {
            return Ok(p);
        }

        // The careful path (an address or MAC taken, a requested address,
        // near the quota): one statement at a time, with exact errors.
        let id = Uuid::new_v4();
        let tx = conn.transaction().await?;
        let mut mac = req.mac.clone().unwrap_or_else(addr::random_mac);
        let mut inserted = false;
        for _ in 0..8 {
            let p = repo::NewPort {
                id,
                network_id: n.id,
                project_id: &project,
                name: &req.name,
                mac: &mac,
                device_id: &req.device_id,
                device_owner: &req.device_owner,
                admin_state_up: req.admin_state_up,
                port_security: true,
                binding_host: "",
                binding_bridge: "",
            };
            if repo::insert_port(&tx, &p).await? {
                inserted = true;
                break;
            }
            if req.mac.is_some() {
                return Err(Error::already_exists("mac address", &mac));
            }
            mac = addr::random_mac();
        }
        if !inserted {
            return Err(Error::unavailable("no free generated MAC after 8 tries"));
        }
        for (s, want) in &wants {
            self.allocate(&tx, s, id, *want).await?;
        }
        repo::set_port_groups(&tx, id, &groups).await?;
        self.charge(&tx, &project, "ports", 1).await?;
        tx.commit().await?;
        repo::get_port(&conn, id)
            .await?
            .ok_or_else(|| Error::not_found("port", id))
    }

    pub async fn get_port(&self, who: &Actor, id: Uuid) -> Result<Port> {
        self.visible_port(&self.conn().await?, who, id).await
    }

    pub async fn list_ports(&self, who: &Actor, q: PortQuery) -> Result<Vec<Port>> {
        let conn = self.conn().await?;
        let network = match &q.network {
            Some(k) => Some(self.visible_network(&conn, who, k).await?.id),
            None => None,
        };
        let (project, host) = match who {
            Actor::User { admin: true, .. } if q.all_projects => (None, None),
            Actor::User { project, .. } => (Some(project.as_str()), None),
            Actor::ComputeAgent { .. } if q.device_id.is_some() => (None, None),
            Actor::ComputeAgent { host } | Actor::NetworkAgent { host } => {
                (None, Some(host.as_str()))
            }
        };
        repo::list_ports(
            &conn,
            &repo::PortFilter {
                project,
                network,
                device_id: q.device_id.as_deref(),
                host,
            },
        )
        .await
    }

    pub async fn update_port(&self, who: &Actor, req: PortUpdate) -> Result<Port> {
        if req
            .device_owner
            .as_deref()
            .is_some_and(|o| o.starts_with("network:"))
            && !who.is_admin()
        {
            return Err(Error::forbidden(
                "only an administrator may set a network:* device_owner",
            ));
        }
        let mut conn = self.conn().await?;
        let p = self.owned_port(&conn, who, req.id).await?;
        let groups = match &req.security_groups {
            Some(keys) => Some(self.resolve_groups(&conn, &p.project_id, keys).await?),
            None => None,
        };
        let tx = conn.transaction().await?;
        repo::update_port(
            &tx,
            p.id,
            req.name.as_deref(),
            req.admin_state_up,
            req.device_id.as_deref(),
            req.device_owner.as_deref(),
        )
        .await?;
        if let Some(g) = &groups {
            repo::set_port_groups(&tx, p.id, g).await?;
        }
        if req.admin_state_up == Some(false) {
            repo::set_status(&tx, p.id, PortStatus::Down).await?;
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        self.visible_port(&conn, who, p.id).await
    }

    pub async fn delete_port(&self, who: &Actor, id: Uuid) -> Result<()> {
        let mut conn = self.conn().await?;
        let p = self.owned_port(&conn, who, id).await?;
        if p.device_owner == DHCP_OWNER && !who.is_admin() {
            return Err(Error::forbidden(
                "DHCP ports are managed by the network agents",
            ));
        }
        let tx = conn.transaction().await?;
        if repo::delete_port(&tx, id).await? == 1 {
            if p.device_owner != DHCP_OWNER {
                repo::refund(&tx, &p.project_id, "ports", 1).await?;
            }
            if p.status != PortStatus::Down {
                repo::outbox_port_event(&tx, id, &p.device_id, "DELETED").await?;
            }
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        Ok(())
    }

    /// Binds `id` to `host`, which must have a live agent; a refusal is
    /// recorded on the port (`binding_error`) and answered FAILED_PRECONDITION.
    pub async fn bind_port(&self, who: &Actor, id: Uuid, host: &str) -> Result<Port> {
        let conn = self.conn().await?;
        let p = match who {
            Actor::ComputeAgent { host: own }
            | Actor::User {
                via_host: Some(own),
                admin: false,
                ..
            } => {
                if own != host {
                    return Err(Error::forbidden(format!(
                        "a compute agent may bind ports to its own host ({own}) only"
                    )));
                }
                match who {
                    Actor::ComputeAgent { .. } => self.visible_port(&conn, who, id).await?,
                    _ => self.owned_port(&conn, who, id).await?,
                }
            }
            Actor::User { admin: true, .. } => self.owned_port(&conn, who, id).await?,
            _ => {
                // Check visibility first: an unseen port stays NOT_FOUND.
                self.owned_port(&conn, who, id).await?;
                return Err(Error::forbidden(format!(
                    "only an administrator or the compute agent of host {host} may bind a port to it"
                )));
            }
        };
        let agent = repo::get_agent(&conn, host, self.down_secs()).await?;
        let live = agent.filter(|a| a.alive);
        let Some(agent) = live else {
            let why = match repo::get_agent(&conn, host, self.down_secs()).await? {
                None => format!(
                    "cannot bind port {id} to host {host}: no network agent has ever reported from {host}"
                ),
                Some(a) => format!(
                    "cannot bind port {id} to host {host}: its network agent is down (last heartbeat {})",
                    crate::grpc::timestamp(a.last_heartbeat)
                ),
            };
            repo::set_binding(&conn, id, "", "", &why).await?;
            return Err(Error::precondition(why));
        };
        let mut conn = conn;
        let tx = conn.transaction().await?;
        repo::lock_port(&tx, id).await?;
        repo::set_binding(&tx, id, host, &agent.bridge, "").await?;
        if p.binding_host != host {
            repo::set_status(&tx, id, PortStatus::Down).await?;
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        self.visible_port(&conn, who, id).await
    }

    pub async fn unbind_port(&self, who: &Actor, id: Uuid) -> Result<Port> {
        let mut conn = self.conn().await?;
        let p = match who {
            Actor::ComputeAgent { host }
            | Actor::User {
                via_host: Some(host),
                admin: false,
                ..
            } => {
                let p = match who {
                    Actor::ComputeAgent { .. } => self.visible_port(&conn, who, id).await?,
                    _ => self.owned_port(&conn, who, id).await?,
                };
                if p.binding_host != *host {
                    return Err(Error::forbidden(format!(
                        "port {id} is not bound to this compute agent's host"
                    )));
                }
                p
            }
            Actor::User { admin: true, .. } => self.owned_port(&conn, who, id).await?,
            _ => {
                let p = self.owned_port(&conn, who, id).await?;
                return Err(Error::forbidden(format!(
                    "only an administrator or the compute agent of host {} may unbind port {id}",
                    if p.binding_host.is_empty() {
                        "-"
                    } else {
                        &p.binding_host
                    }
                )));
            }
        };
        let tx = conn.transaction().await?;
        repo::set_binding(&tx, p.id, "", "", "").await?;
        repo::set_status(&tx, p.id, PortStatus::Down).await?;
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        self.visible_port(&conn, who, id).await
    }

    /// The ports of `device_id` the caller may see (for `WatchPorts`).
    pub async fn device_ports(&self, who: &Actor, device_id: &str) -> Result<Vec<Port>> {
        let conn = self.conn().await?;
        let (project, host) = match who {
            Actor::User { admin: true, .. } => (None, None),
            Actor::User { project, .. } => (Some(project.as_str()), None),
            Actor::ComputeAgent { host } | Actor::NetworkAgent { host } => {
                (None, Some(host.as_str()))
            }
        };
        repo::list_ports(
            &conn,
            &repo::PortFilter {
                project,
                network: None,
                device_id: Some(device_id),
                host,
            },
        )
        .await
    }

    // ---------------------------------------------------- security groups

    async fn visible_group(
        &self,
        c: &impl GenericClient,
        who: &Actor,
        key: &NameOrId,
    ) -> Result<SecurityGroup> {
        let g = match key {
            NameOrId::Id(id) => repo::get_group(c, *id).await?,
            NameOrId::Name(n) => match who.project() {
                Some(p) => repo::find_group_by_name(c, p, n.as_str()).await?,
                None => None,
            },
        };
        g.filter(|g| who.reads(&g.project_id))
            .ok_or_else(|| Error::not_found("security group", key))
    }

    pub async fn create_group(
        &self,
        who: &Actor,
        name: Name,
        description: String,
    ) -> Result<SecurityGroup> {
        let project = who.writer()?.to_string();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let g = SecurityGroup {
            id: Uuid::new_v4(),
            project_id: project.clone(),
            name: name.to_string(),
            description,
            rules: Vec::new(),
            created_at: time::OffsetDateTime::now_utc(),
        };
        if !repo::insert_group(&tx, &g).await? {
            return Err(Error::already_exists("security group", &name));
        }
        self.charge(&tx, &project, "security_groups", 1).await?;
        tx.commit().await?;
        repo::get_group(&conn, g.id)
            .await?
            .ok_or_else(|| Error::not_found("security group", g.id))
    }

    pub async fn get_group(&self, who: &Actor, key: &NameOrId) -> Result<SecurityGroup> {
        self.visible_group(&self.conn().await?, who, key).await
    }

    pub async fn list_groups(&self, who: &Actor, all_projects: bool) -> Result<Vec<SecurityGroup>> {
        let project = match who {
            Actor::User { admin: true, .. } if all_projects => None,
            Actor::User { project, .. } => {
                self.default_group(project).await?;
                Some(project.as_str())
            }
            _ => return Err(Error::forbidden("a user token is required")),
        };
        repo::list_groups(&self.conn().await?, project).await
    }

    pub async fn delete_group(&self, who: &Actor, key: &NameOrId) -> Result<()> {
        let project = who.writer()?;
        let mut conn = self.conn().await?;
        let g = self.visible_group(&conn, who, key).await?;
        if g.project_id != project && !who.is_admin() {
            return Err(Error::not_found("security group", key));
        }
        if g.name == "default" {
            return Err(Error::precondition(
                "the default security group cannot be deleted",
            ));
        }
        let tx = conn.transaction().await?;
        let rules = repo::group_rule_count(&tx, g.id).await?;
        if repo::delete_group(&tx, g.id).await? == 1 {
            repo::refund(&tx, &g.project_id, "security_groups", 1).await?;
            repo::refund(&tx, &g.project_id, "security_group_rules", rules).await?;
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        Ok(())
    }

    pub async fn create_rule(&self, who: &Actor, req: NewRule) -> Result<Rule> {
        let project = who.writer()?;
        let mut conn = self.conn().await?;
        let g = self.visible_group(&conn, who, &req.group).await?;
        if g.project_id != project && !who.is_admin() {
            return Err(Error::not_found("security group", &req.group));
        }
        let remote = match &req.remote_group {
            Some(k) => {
                let r = self.visible_group(&conn, who, k).await?;
                if r.project_id != g.project_id {
                    return Err(Error::not_found("security group", k));
                }
                Some(r.id)
            }
            None => None,
        };
        let r = Rule {
            id: Uuid::new_v4(),
            security_group_id: g.id,
            direction: req.direction,
            protocol: req.protocol,
            port_min: req.port_min,
            port_max: req.port_max,
            remote_ip_prefix: req.remote_ip_prefix,
            remote_group_id: remote,
        };
        let tx = conn.transaction().await?;
        repo::insert_rule(&tx, &r).await?;
        repo::notify(&tx).await?;
        self.charge(&tx, &g.project_id, "security_group_rules", 1)
            .await?;
        tx.commit().await?;
        self.changes.bump();
        Ok(r)
    }

    pub async fn delete_rule(&self, who: &Actor, id: Uuid) -> Result<()> {
        let project = who.writer()?;
        let mut conn = self.conn().await?;
        let r = repo::get_rule(&conn, id)
            .await?
            .ok_or_else(|| Error::not_found("security group rule", id))?;
        let g = self
            .visible_group(&conn, who, &NameOrId::Id(r.security_group_id))
            .await
            .map_err(|_| Error::not_found("security group rule", id))?;
        if g.project_id != project && !who.is_admin() {
            return Err(Error::not_found("security group rule", id));
        }
        let tx = conn.transaction().await?;
        if repo::delete_rule(&tx, id).await? == 1 {
            repo::refund(&tx, &g.project_id, "security_group_rules", 1).await?;
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        Ok(())
    }

    // ------------------------------------------------------------- quotas

    pub async fn get_quota(
        &self,
        who: &Actor,
        project: Option<String>,
    ) -> Result<Vec<(String, i64, i64)>> {
        let own = who
            .project()
            .ok_or_else(|| Error::forbidden("a user token is required"))?;
        let project = project.unwrap_or_else(|| own.to_string());
        if project != own && !who.is_admin() {
            return Err(Error::forbidden(
                "only an administrator may read another project's quota",
            ));
        }
        let conn = self.conn().await?;
        let overrides = repo::quota_overrides(&conn, &project).await?;
        let used: HashMap<String, i64> = repo::usage(&conn, &project).await?.into_iter().collect();
        Ok(RESOURCES
            .iter()
            .map(|r| {
                (
                    r.to_string(),
                    self.limit(&overrides, r),
                    used.get(*r).copied().unwrap_or(0),
                )
            })
            .collect())
    }

    pub async fn set_quota(
        &self,
        who: &Actor,
        project: String,
        limits: Vec<(String, i64)>,
    ) -> Result<Vec<(String, i64, i64)>> {
        if !who.is_admin() {
            return Err(Error::forbidden("only an administrator may set quotas"));
        }
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        for (r, l) in &limits {
            repo::set_quota(&tx, &project, r, *l).await?;
        }
        tx.commit().await?;
        drop(conn);
        self.get_quota(who, Some(project)).await
    }

    // ------------------------------------------------------------- agents

    pub async fn list_agents(&self, who: &Actor) -> Result<Vec<Agent>> {
        if !who.is_admin() {
            return Err(Error::forbidden("only an administrator may list agents"));
        }
        repo::list_agents(&self.conn().await?, self.down_secs()).await
    }

    pub async fn heartbeat(
        &self,
        who: &Actor,
        version: &str,
        bridge: &str,
        started_at: &str,
    ) -> Result<Agent> {
        let host = who.network_agent()?;
        repo::heartbeat(
            &self.conn().await?,
            host,
            started_at,
            version,
            bridge,
            self.down_secs(),
        )
        .await
    }

    /// Everything `who`'s host must wire; waits for a change after `after`
    /// first (bounded), so that an idle agent costs one call per `wait`.
    pub async fn sync_host(
        &self,
        who: &Actor,
        after: &str,
        wait: Duration,
    ) -> Result<(String, HostState)> {
        let host = who.network_agent()?.to_string();
        if !after.is_empty() {
            self.changes
                .wait_after(after, wait.min(MAX_SYNC_WAIT))
                .await;
        }
        // Read the counter first: a change after it is seen by the next call.
        let token = self.changes.token(self.changes.current());
        let conn = self.conn().await?;
        let ports = repo::list_ports(
            &conn,
            &repo::PortFilter {
                project: None,
                network: None,
                device_id: None,
                host: Some(&host),
            },
        )
        .await?;
        let net_ids: Vec<Uuid> = ports
            .iter()
            .map(|p| p.network_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let networks = repo::networks_by_id(&conn, &net_ids).await?;
        let subnets = repo::subnets_of(&conn, &net_ids).await?;
        let mut host_networks = Vec::with_capacity(networks.len());
        for n in networks {
            let subs: Vec<Subnet> = subnets
                .iter()
                .filter(|s| s.network_id == n.id)
                .cloned()
                .collect();
            let dhcp_hosts = if subs.iter().any(|s| s.enable_dhcp) {
                repo::list_ports(
                    &conn,
                    &repo::PortFilter {
                        project: None,
                        network: Some(n.id),
                        device_id: None,
                        host: None,
                    },
                )
                .await?
                .into_iter()
                .map(|p| {
                    (
                        p.id,
                        p.mac,
                        p.fixed_ips.into_iter().map(|(_, ip)| ip).collect(),
                    )
                })
                .collect()
            } else {
                Vec::new()
            };
            host_networks.push(HostNetwork {
                network: n,
                subnets: subs,
                dhcp_hosts,
            });
        }
        let group_ids: Vec<Uuid> = ports
            .iter()
            .flat_map(|p| p.security_groups.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let groups = repo::groups_by_id(&conn, &group_ids).await?;
        let remotes: Vec<Uuid> = groups
            .iter()
            .flat_map(|g| g.rules.iter().filter_map(|r| r.remote_group_id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let members = repo::members(&conn, &remotes).await?;
        Ok((
            token,
            HostState {
                networks: host_networks,
                ports,
                security_groups: groups,
                members,
            },
        ))
    }

    /// The DHCP port of `network` on the caller's host, made if missing;
    /// only for a network with a port bound to that host.
    pub async fn ensure_dhcp_port(&self, who: &Actor, network: Uuid) -> Result<Port> {
        let host = who.network_agent()?.to_string();
        let device_id = format!("dhcp-{host}");
        let mut conn = self.conn().await?;
        let bound = repo::list_ports(
            &conn,
            &repo::PortFilter {
                project: None,
                network: Some(network),
                device_id: None,
                host: Some(&host),
            },
        )
        .await?;
        if bound.is_empty() {
            return Err(Error::not_found("network", network));
        }
        if let Some(p) = repo::dhcp_port(&conn, network, &device_id).await? {
            // A DHCP subnet added since: the port gets an address on it too.
            let subnets = repo::subnets_of(&conn, &[network]).await?;
            let missing: Vec<&Subnet> = subnets
                .iter()
                .filter(|s| s.enable_dhcp && !p.fixed_ips.iter().any(|(sid, _)| *sid == s.id))
                .collect();
            if missing.is_empty() {
                return Ok(p);
            }
            let tx = conn.transaction().await?;
            let have: BTreeSet<Uuid> = repo::lock_port(&tx, p.id)
                .await?
                .map(|p| p.fixed_ips.into_iter().map(|(s, _)| s).collect())
                .unwrap_or_default();
            for s in missing.into_iter().filter(|s| !have.contains(&s.id)) {
                self.allocate(&tx, s, p.id, None).await?;
            }
            repo::notify(&tx).await?;
            tx.commit().await?;
            self.changes.bump();
            return repo::get_port(&conn, p.id)
                .await?
                .ok_or_else(|| Error::not_found("port", p.id));
        }
        let n = repo::get_network(&conn, network)
            .await?
            .ok_or_else(|| Error::not_found("network", network))?;
        let subnets = repo::subnets_of(&conn, &[network]).await?;
        let agent = repo::get_agent(&conn, &host, self.down_secs()).await?;
        let bridge = agent.map(|a| a.bridge).unwrap_or_default();
        let id = Uuid::new_v4();
        let tx = conn.transaction().await?;
        let mut inserted = false;
        for _ in 0..8 {
            let mac = addr::random_mac();
            let p = repo::NewPort {
                id,
                network_id: network,
                project_id: &n.project_id,
                name: "dhcp",
                mac: &mac,
                device_id: &device_id,
                device_owner: DHCP_OWNER,
                admin_state_up: true,
                port_security: false,
                binding_host: &host,
                binding_bridge: &bridge,
            };
            if repo::insert_port(&tx, &p).await? {
                inserted = true;
                break;
            }
        }
        if !inserted {
            return Err(Error::unavailable("no free generated MAC after 8 tries"));
        }
        for s in subnets.iter().filter(|s| s.enable_dhcp) {
            self.allocate(&tx, s, id, None).await?;
        }
        repo::notify(&tx).await?;
        tx.commit().await?;
        self.changes.bump();
        repo::get_port(&conn, id)
            .await?
            .ok_or_else(|| Error::not_found("port", id))
    }

    /// The agent's report: wired ports bound to its host become ACTIVE
    /// (when admin-up), unwired ones DOWN; ports of other hosts are ignored.
    pub async fn report_ports(&self, who: &Actor, reports: &[(Uuid, bool)]) -> Result<u32> {
        let host = who.network_agent()?.to_string();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let mut changed = 0;
        let mut sorted = reports.to_vec();
        // One lock order for every report: no deadlock between replicas.
        sorted.sort();
        for (id, wired) in sorted {
            let Some(p) = repo::lock_port(&tx, id).await? else {
                continue;
            };
            if p.binding_host != host {
                continue;
            }
            let status = if wired && p.admin_state_up {
                PortStatus::Active
            } else {
                PortStatus::Down
            };
            if repo::set_status(&tx, id, status).await? {
                changed += 1;
            }
        }
        if changed > 0 {
            repo::notify(&tx).await?;
        }
        tx.commit().await?;
        if changed > 0 {
            self.changes.bump();
        }
        Ok(changed)
    }
}
