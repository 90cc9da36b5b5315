//! Every SQL statement of the network service, parameterised. Functions take
//! any client (a pooled connection or a transaction) so that the service
//! decides what commits together. Addresses cross as text (`$1::text::inet`,
//! `host(ip)`), which keeps the driver free of an inet type.

use std::net::Ipv4Addr;

use deadpool_postgres::GenericClient;
use runtime::error::{Error, Result, constraint};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::addr::{Cidr4, Pool};
use crate::model::*;

/// The LISTEN/NOTIFY channel of changes an agent must see.
pub const CHANGES_CHANNEL: &str = "network_changes";
/// The queue topic of port status events.
pub const PORT_TOPIC: &str = "network.port";

fn bad_row(what: &str, value: &str) -> Error {
    Error::internal(format!("unexpected {what} {value:?} in the database"))
}

fn u32_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// Wakes every replica's watchers when this transaction commits.
pub async fn notify(c: &impl GenericClient) -> Result<()> {
    c.execute("SELECT pg_notify($1, '')", &[&CHANGES_CHANNEL])
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- networks

const NETWORK_COLUMNS: &str = "n.id, n.project_id, n.name, n.shared, n.admin_state_up, n.mtu, \
     n.segmentation_id, n.created_at, \
     COALESCE((SELECT array_agg(s.id ORDER BY s.created_at, s.id) FROM subnets s \
               WHERE s.network_id = n.id), '{}') AS subnet_ids";

fn network(r: &Row) -> Result<Network> {
    Ok(Network {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        shared: r.try_get("shared")?,
        admin_state_up: r.try_get("admin_state_up")?,
        mtu: u32_of(r.try_get("mtu")?),
        segmentation_id: u32_of(r.try_get("segmentation_id")?),
        subnet_ids: r.try_get("subnet_ids")?,
        created_at: r.try_get("created_at")?,
    })
}

pub struct NewNetwork<'a> {
    pub id: Uuid,
    pub project_id: &'a str,
    pub name: &'a str,
    pub shared: bool,
    pub admin_state_up: bool,
    pub mtu: u32,
}

/// Inserts with segmentation id `vni`; `false` when that VNI is taken.
pub async fn insert_network(c: &impl GenericClient, n: &NewNetwork<'_>, vni: u32) -> Result<bool> {
    let rows = c
        .query(
            "INSERT INTO networks (id, project_id, name, shared, admin_state_up, mtu, segmentation_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (segmentation_id) DO NOTHING RETURNING id",
            &[
                &n.id,
                &n.project_id,
                &n.name,
                &n.shared,
                &n.admin_state_up,
                &(n.mtu as i32),
                &(vni as i32),
            ],
        )
        .await
        .map_err(|e| constraint(e, "network", n.name))?;
    Ok(!rows.is_empty())
}

/// The lowest free VNI of the range, if any.
pub async fn free_vni(c: &impl GenericClient, lo: u32, hi: u32) -> Result<Option<u32>> {
    let row = c
        .query_opt(
            "SELECT g FROM generate_series($1::int, $2::int) g \
             WHERE NOT EXISTS (SELECT 1 FROM networks WHERE segmentation_id = g) LIMIT 1",
            &[&(lo as i32), &(hi as i32)],
        )
        .await?;
    Ok(row.map(|r| u32_of(r.get(0))))
}

pub async fn get_network(c: &impl GenericClient, id: Uuid) -> Result<Option<Network>> {
    let q = format!("SELECT {NETWORK_COLUMNS} FROM networks n WHERE n.id = $1");
    let q = c.prepare_cached(&q).await?;
    c.query_opt(&q, &[&id])
        .await?
        .as_ref()
        .map(network)
        .transpose()
}

/// Locks the network row until the transaction ends (subnet and port
/// changes of one network are serialised by it).
pub async fn networks_by_id(c: &impl GenericClient, ids: &[Uuid]) -> Result<Vec<Network>> {
    let q = format!(
        "SELECT {NETWORK_COLUMNS} FROM networks n WHERE n.id = ANY($1) ORDER BY n.created_at, n.id"
    );
    c.query(&q, &[&ids]).await?.iter().map(network).collect()
}

pub async fn lock_network(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(
        c.query_opt("SELECT 1 FROM networks WHERE id = $1 FOR UPDATE", &[&id])
            .await?
            .is_some(),
    )
}

/// Networks named `name` that `project` may see: its own first, then shared ones.
pub async fn find_networks_by_name(
    c: &impl GenericClient,
    project: &str,
    name: &str,
) -> Result<Vec<Network>> {
    let q = format!(
        "SELECT {NETWORK_COLUMNS} FROM networks n WHERE n.name = $2 AND (n.project_id = $1 OR n.shared) \
         ORDER BY (n.project_id = $1) DESC, n.created_at"
    );
    c.query(&q, &[&project, &name])
        .await?
        .iter()
        .map(network)
        .collect()
}

/// `project`'s networks and the shared ones; every network when `None`.
pub async fn list_networks(c: &impl GenericClient, project: Option<&str>) -> Result<Vec<Network>> {
    let rows = match project {
        Some(p) => {
            let q = format!(
                "SELECT {NETWORK_COLUMNS} FROM networks n WHERE n.project_id = $1 OR n.shared \
                 ORDER BY n.created_at, n.id"
            );
            c.query(&q, &[&p]).await?
        }
        None => {
            let q = format!("SELECT {NETWORK_COLUMNS} FROM networks n ORDER BY n.created_at, n.id");
            c.query(&q, &[]).await?
        }
    };
    rows.iter().map(network).collect()
}

pub async fn update_network(
    c: &impl GenericClient,
    id: Uuid,
    name: Option<&str>,
    shared: Option<bool>,
    admin_state_up: Option<bool>,
) -> Result<()> {
    c.execute(
        "UPDATE networks SET name = COALESCE($2, name), shared = COALESCE($3, shared), \
         admin_state_up = COALESCE($4, admin_state_up) WHERE id = $1",
        &[&id, &name, &shared, &admin_state_up],
    )
    .await?;
    Ok(())
}

/// Ports of the network other than DHCP ports.
pub async fn ports_in_use(c: &impl GenericClient, network: Uuid) -> Result<i64> {
    let r = c
        .query_one(
            "SELECT count(*) FROM ports WHERE network_id = $1 AND device_owner <> $2",
            &[&network, &DHCP_OWNER],
        )
        .await?;
    Ok(r.get(0))
}

pub async fn delete_network(c: &impl GenericClient, id: Uuid) -> Result<u64> {
    Ok(c.execute("DELETE FROM networks WHERE id = $1", &[&id])
        .await?)
}

// ----------------------------------------------------------------- subnets

const SUBNET_COLUMNS: &str = "s.id, s.network_id, s.project_id, s.name, s.cidr::text AS cidr, \
     host(s.gateway_ip) AS gateway_ip, s.allocation_pools, s.dns_nameservers, s.host_routes, \
     s.enable_dhcp, s.created_at";

fn subnet(r: &Row) -> Result<Subnet> {
    let cidr: String = r.try_get("cidr")?;
    let gw: Option<String> = r.try_get("gateway_ip")?;
    let pools: serde_json::Value = r.try_get("allocation_pools")?;
    let routes: serde_json::Value = r.try_get("host_routes")?;
    Ok(Subnet {
        id: r.try_get("id")?,
        network_id: r.try_get("network_id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        cidr: Cidr4::parse("cidr", &cidr).map_err(|_| bad_row("cidr", &cidr))?,
        gateway: gw
            .map(|g| g.parse().map_err(|_| bad_row("gateway", &g)))
            .transpose()?,
        pools: serde_json::from_value(pools).map_err(|e| bad_row("pools", &e.to_string()))?,
        dns: r.try_get("dns_nameservers")?,
        routes: serde_json::from_value(routes).map_err(|e| bad_row("routes", &e.to_string()))?,
        enable_dhcp: r.try_get("enable_dhcp")?,
        created_at: r.try_get("created_at")?,
    })
}

pub async fn insert_subnet(c: &impl GenericClient, s: &Subnet) -> Result<()> {
    let pools = serde_json::to_value(&s.pools).map_err(|e| Error::internal(e.to_string()))?;
    let routes = serde_json::to_value(&s.routes).map_err(|e| Error::internal(e.to_string()))?;
    c.execute(
        "INSERT INTO subnets (id, network_id, project_id, name, ip_version, cidr, gateway_ip, \
         allocation_pools, dns_nameservers, host_routes, enable_dhcp) \
         VALUES ($1, $2, $3, $4, 4, $5::text::cidr, $6::text::inet, $7, $8, $9, $10)",
        &[
            &s.id,
            &s.network_id,
            &s.project_id,
            &s.name,
            &s.cidr.to_string(),
            &s.gateway.map(|g| g.to_string()),
            &pools,
            &s.dns,
            &routes,
            &s.enable_dhcp,
        ],
    )
    .await
    .map_err(|e| constraint(e, "subnet", &s.name))?;
    Ok(())
}

/// A subnet of `network` overlapping `cidr`, if any.
pub async fn overlapping_subnet(
    c: &impl GenericClient,
    network: Uuid,
    cidr: &Cidr4,
) -> Result<Option<String>> {
    Ok(c.query_opt(
        "SELECT cidr::text FROM subnets WHERE network_id = $1 AND cidr && $2::text::cidr LIMIT 1",
        &[&network, &cidr.to_string()],
    )
    .await?
    .map(|r| r.get(0)))
}

pub async fn get_subnet(c: &impl GenericClient, id: Uuid) -> Result<Option<Subnet>> {
    let q = format!("SELECT {SUBNET_COLUMNS} FROM subnets s WHERE s.id = $1");
    c.query_opt(&q, &[&id])
        .await?
        .as_ref()
        .map(subnet)
        .transpose()
}

pub async fn subnets_of(c: &impl GenericClient, networks: &[Uuid]) -> Result<Vec<Subnet>> {
    let q = format!(
        "SELECT {SUBNET_COLUMNS} FROM subnets s WHERE s.network_id = ANY($1) ORDER BY s.created_at, s.id"
    );
    let q = c.prepare_cached(&q).await?;
    c.query(&q, &[&networks])
        .await?
        .iter()
        .map(subnet)
        .collect()
}

/// Subnets of the networks `project` may see (every one when `None`).
pub async fn list_subnets(c: &impl GenericClient, project: Option<&str>) -> Result<Vec<Subnet>> {
    let q = format!(
        "SELECT {SUBNET_COLUMNS} FROM subnets s JOIN networks n ON n.id = s.network_id \
         WHERE $1::text IS NULL OR n.project_id = $1 OR n.shared ORDER BY s.created_at, s.id"
    );
    c.query(&q, &[&project]).await?.iter().map(subnet).collect()
}

/// Addresses of the subnet held by ports other than DHCP ports.
pub async fn subnet_in_use(c: &impl GenericClient, subnet: Uuid) -> Result<i64> {
    let r = c
        .query_one(
            "SELECT count(*) FROM ip_allocations a JOIN ports p ON p.id = a.port_id \
             WHERE a.subnet_id = $1 AND p.device_owner <> $2",
            &[&subnet, &DHCP_OWNER],
        )
        .await?;
    Ok(r.get(0))
}

pub async fn delete_subnet(c: &impl GenericClient, id: Uuid) -> Result<u64> {
    Ok(c.execute("DELETE FROM subnets WHERE id = $1", &[&id])
        .await?)
}

// -------------------------------------------------------------------- IPAM

/// Takes `ip` of `subnet` for `port`; `false` when another port holds it
/// (the primary key decides, across every replica).
pub async fn try_allocate(
    c: &impl GenericClient,
    subnet: Uuid,
    ip: Ipv4Addr,
    port: Uuid,
) -> Result<bool> {
    let n = c
        .execute(
            "INSERT INTO ip_allocations (subnet_id, ip, port_id) VALUES ($1, $2::text::inet, $3) \
             ON CONFLICT (subnet_id, ip) DO NOTHING",
            &[&subnet, &ip.to_string(), &port],
        )
        .await?;
    Ok(n == 1)
}

/// The first address of `pool` no port holds, if any.
pub async fn first_free(
    c: &impl GenericClient,
    subnet: Uuid,
    pool: &Pool,
) -> Result<Option<Ipv4Addr>> {
    let start = i64::from(u32::from(pool.start));
    let end = i64::from(u32::from(pool.end));
    let row = c
        .query_opt(
            "SELECT g FROM generate_series($2::bigint, $3::bigint) g WHERE NOT EXISTS \
             (SELECT 1 FROM ip_allocations a WHERE a.subnet_id = $1 AND a.ip = '0.0.0.0'::inet + g) \
             LIMIT 1",
            &[&subnet, &start, &end],
        )
        .await?;
    Ok(row.and_then(|r| u32::try_from(r.get::<_, i64>(0)).ok().map(Ipv4Addr::from)))
}

// ------------------------------------------------------------------- ports

const PORT_COLUMNS: &str = "p.id, p.network_id, p.project_id, p.name, p.mac_address, p.device_id, \
     p.device_owner, p.admin_state_up, p.status, p.port_security, p.binding_host, p.binding_bridge, p.binding_error, \
     p.created_at, \
     COALESCE((SELECT array_agg(a.subnet_id::text || ' ' || host(a.ip) ORDER BY a.ip) \
               FROM ip_allocations a WHERE a.port_id = p.id), '{}') AS fixed_ips, \
     COALESCE((SELECT array_agg(g.security_group_id ORDER BY g.security_group_id) \
               FROM port_security_groups g WHERE g.port_id = p.id), '{}') AS security_groups";

fn port(r: &Row) -> Result<Port> {
    let status: String = r.try_get("status")?;
    let ips: Vec<String> = r.try_get("fixed_ips")?;
    let fixed_ips = ips
        .iter()
        .map(|s| {
            let (sub, ip) = s.split_once(' ').ok_or_else(|| bad_row("fixed ip", s))?;
            Ok((
                Uuid::parse_str(sub).map_err(|_| bad_row("fixed ip", s))?,
                ip.parse().map_err(|_| bad_row("fixed ip", s))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Port {
        id: r.try_get("id")?,
        network_id: r.try_get("network_id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        mac: r.try_get("mac_address")?,
        fixed_ips,
        device_id: r.try_get("device_id")?,
        device_owner: r.try_get("device_owner")?,
        security_groups: r.try_get("security_groups")?,
        admin_state_up: r.try_get("admin_state_up")?,
        status: PortStatus::parse(&status).ok_or_else(|| bad_row("status", &status))?,
        port_security: r.try_get("port_security")?,
        binding_host: r.try_get("binding_host")?,
        binding_bridge: r.try_get("binding_bridge")?,
        binding_error: r.try_get("binding_error")?,
        created_at: r.try_get("created_at")?,
    })
}

pub struct NewPort<'a> {
    pub id: Uuid,
    pub network_id: Uuid,
    pub project_id: &'a str,
    pub name: &'a str,
    pub mac: &'a str,
    pub device_id: &'a str,
    pub device_owner: &'a str,
    pub admin_state_up: bool,
    pub port_security: bool,
    pub binding_host: &'a str,
    pub binding_bridge: &'a str,
}

impl NewPort<'_> {
    /// The port's columns in the order both insert statements name them.
    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.id,
            &self.network_id,
            &self.project_id,
            &self.name,
            &self.mac,
            &self.device_id,
            &self.device_owner,
            &self.admin_state_up,
            &self.port_security,
            &self.binding_host,
            &self.binding_bridge,
        ]
    }
}

/// Inserts a port; `false` when its MAC is taken on the network.
pub async fn insert_port(c: &impl GenericClient, p: &NewPort<'_>) -> Result<bool> {
    let rows = c
        .query(
            "INSERT INTO ports (id, network_id, project_id, name, mac_address, device_id, device_owner, \
             admin_state_up, port_security, binding_host, binding_bridge) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (network_id, mac_address) DO NOTHING RETURNING id",
            &p.params(),
        )
        .await
        .map_err(|e| constraint(e, "port", &p.id.to_string()))?;
    Ok(!rows.is_empty())
}

const CREATE_PORT_SQL: &str = "WITH p AS (INSERT INTO ports (id, network_id, project_id, name, mac_address, device_id, \
             device_owner, admin_state_up, port_security, binding_host, binding_bridge) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING created_at), \
             a AS (INSERT INTO ip_allocations (subnet_id, ip, port_id) \
             SELECT t.s, t.ip::inet, $1 FROM unnest($12::uuid[], $13::text[]) AS t(s, ip) RETURNING 1), \
             g AS (INSERT INTO port_security_groups (port_id, security_group_id) \
             SELECT $1, unnest($14::uuid[]) RETURNING 1), \
             u AS (INSERT INTO usage AS u (project_id, resource, shard, used) \
             SELECT $3, 'ports', $15::smallint, 1 WHERE $15::smallint >= 0 \
             ON CONFLICT (project_id, resource, shard) DO UPDATE SET used = u.used + EXCLUDED.used \
             RETURNING 1) \
             SELECT created_at, (SELECT count(*) FROM a) + (SELECT count(*) FROM g) + (SELECT count(*) FROM u) FROM p";

const PORTS_USED_SQL: &str =
    "SELECT COALESCE(sum(used), 0)::bigint FROM usage WHERE project_id = $1 AND resource = 'ports'";

/// Prepares (once per connection) the two statements of a fast create.
pub async fn prepare_create_port(c: &impl GenericClient) -> Result<()> {
    c.prepare_cached(CREATE_PORT_SQL).await?;
    c.prepare_cached(PORTS_USED_SQL).await?;
    Ok(())
}

/// What [`create_port_whole`] did.
pub enum Created {
    /// Written (not yet committed when inside a transaction); its `created_at`.
    Done(time::OffsetDateTime),
    /// A unique constraint refused it (a MAC or an address taken): nothing
    /// was written by the statement; the caller takes the careful path.
    Taken,
}

/// A port, its addresses, its groups and (with `charge_shard`) one `ports`
/// usage charge on that shard, in ONE statement: atomic by itself, one round
/// trip with the cached prepared statement. No `ON CONFLICT` on the
/// addresses or the MAC: a taken one fails the whole statement (the primary
/// key of `ip_allocations` still decides between replicas).
pub async fn create_port_whole(
    c: &impl GenericClient,
    p: &NewPort<'_>,
    ips: &[(Uuid, Ipv4Addr)],
    groups: &[Uuid],
    charge_shard: Option<i16>,
) -> Result<Created> {
    let st = c.prepare_cached(CREATE_PORT_SQL).await?;
    let subnets: Vec<Uuid> = ips.iter().map(|(s, _)| *s).collect();
    let addrs: Vec<String> = ips.iter().map(|(_, ip)| ip.to_string()).collect();
    let shard = charge_shard.unwrap_or(-1);
    let tail: [&(dyn ToSql + Sync); 4] = [&subnets, &addrs, &groups, &shard];
    let params: Vec<&(dyn ToSql + Sync)> = p.params().into_iter().chain(tail).collect();
    let r = c.query_one(&st, &params).await;
    match r {
        Ok(r) => Ok(Created::Done(r.try_get(0)?)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            Ok(Created::Taken)
        }
        Err(e) => Err(constraint(e, "port", &p.id.to_string())),
    }
}

/// The fresh sum of `project`'s `ports` usage (after [`create_port_whole`]
/// charged a shard in the same transaction).
pub async fn ports_used(c: &impl GenericClient, project: &str) -> Result<i64> {
    let st = c.prepare_cached(PORTS_USED_SQL).await?;
    Ok(c.query_one(&st, &[&project]).await?.get(0))
}

/// A random shard of the usage counters.
pub fn usage_shard() -> i16 {
    random_shard()
}

pub async fn set_port_groups(c: &impl GenericClient, port: Uuid, groups: &[Uuid]) -> Result<()> {
    c.execute(
        "DELETE FROM port_security_groups WHERE port_id = $1",
        &[&port],
    )
    .await?;
    c.execute(
        "INSERT INTO port_security_groups (port_id, security_group_id) SELECT $1, unnest($2::uuid[])",
        &[&port, &groups],
    )
    .await
    .map_err(|e| constraint(e, "security group", "of the port"))?;
    Ok(())
}

pub async fn get_port(c: &impl GenericClient, id: Uuid) -> Result<Option<Port>> {
    let q = format!("SELECT {PORT_COLUMNS} FROM ports p WHERE p.id = $1");
    c.query_opt(&q, &[&id])
        .await?
        .as_ref()
        .map(port)
        .transpose()
}

/// Locks a port row until the transaction ends.
pub async fn lock_port(c: &impl GenericClient, id: Uuid) -> Result<Option<Port>> {
    let q = format!("SELECT {PORT_COLUMNS} FROM ports p WHERE p.id = $1 FOR UPDATE OF p");
    c.query_opt(&q, &[&id])
        .await?
        .as_ref()
        .map(port)
        .transpose()
}

pub struct PortFilter<'a> {
    /// `None`: every project.
    pub project: Option<&'a str>,
    pub network: Option<Uuid>,
    pub device_id: Option<&'a str>,
    pub host: Option<&'a str>,
}

pub async fn list_ports(c: &impl GenericClient, f: &PortFilter<'_>) -> Result<Vec<Port>> {
    let q = format!(
        "SELECT {PORT_COLUMNS} FROM ports p WHERE ($1::text IS NULL OR p.project_id = $1) \
         AND ($2::uuid IS NULL OR p.network_id = $2) AND ($3::text IS NULL OR p.device_id = $3) \
         AND ($4::text IS NULL OR p.binding_host = $4) ORDER BY p.created_at, p.id"
    );
    c.query(&q, &[&f.project, &f.network, &f.device_id, &f.host])
        .await?
        .iter()
        .map(port)
        .collect()
}

pub async fn update_port(
    c: &impl GenericClient,
    id: Uuid,
    name: Option<&str>,
    admin_state_up: Option<bool>,
    device_id: Option<&str>,
    device_owner: Option<&str>,
) -> Result<()> {
    c.execute(
        "UPDATE ports SET name = COALESCE($2, name), admin_state_up = COALESCE($3, admin_state_up), \
         device_id = COALESCE($4, device_id), device_owner = COALESCE($5, device_owner) WHERE id = $1",
        &[&id, &name, &admin_state_up, &device_id, &device_owner],
    )
    .await?;
    Ok(())
}

pub async fn set_binding(
    c: &impl GenericClient,
    id: Uuid,
    host: &str,
    bridge: &str,
    error: &str,
) -> Result<()> {
    c.execute(
        "UPDATE ports SET binding_host = $2, binding_bridge = $3, binding_error = $4 WHERE id = $1",
        &[&id, &host, &bridge, &error],
    )
    .await?;
    Ok(())
}

/// Sets the status; when it changed, writes the `network.port` event in
/// the same transaction (the outbox) and returns true.
pub async fn set_status(c: &impl GenericClient, id: Uuid, status: PortStatus) -> Result<bool> {
    let row = c
        .query_opt(
            "UPDATE ports SET status = $2 WHERE id = $1 AND status <> $2 RETURNING device_id",
            &[&id, &status.as_str()],
        )
        .await?;
    let Some(row) = row else { return Ok(false) };
    let device_id: String = row.get(0);
    outbox_port_event(c, id, &device_id, status.as_str()).await?;
    Ok(true)
}

pub async fn outbox_port_event(
    c: &impl GenericClient,
    port: Uuid,
    device_id: &str,
    status: &str,
) -> Result<()> {
    let payload = serde_json::to_vec(&serde_json::json!({
        "port_id": port.to_string(),
        "device_id": device_id,
        "status": status,
    }))
    .map_err(|e| Error::internal(e.to_string()))?;
    c.execute(
        "INSERT INTO outbox (topic, msg_key, payload) VALUES ($1, $2, $3)",
        &[&PORT_TOPIC, &port.to_string(), &payload],
    )
    .await?;
    Ok(())
}

pub async fn delete_port(c: &impl GenericClient, id: Uuid) -> Result<u64> {
    Ok(c.execute("DELETE FROM ports WHERE id = $1", &[&id]).await?)
}

/// The DHCP port of `network` on `host`, if any.
pub async fn dhcp_port(
    c: &impl GenericClient,
    network: Uuid,
    device_id: &str,
) -> Result<Option<Port>> {
    let q = format!(
        "SELECT {PORT_COLUMNS} FROM ports p WHERE p.network_id = $1 AND p.device_id = $2 \
         AND p.device_owner = $3"
    );
    c.query_opt(&q, &[&network, &device_id, &DHCP_OWNER])
        .await?
        .as_ref()
        .map(port)
        .transpose()
}

// ---------------------------------------------------------- security groups

const SG_COLUMNS: &str = "id, project_id, name, description, created_at";
const RULE_COLUMNS: &str = "id, security_group_id, direction, protocol, port_range_min, \
     port_range_max, remote_ip_prefix, remote_group_id";

fn group(r: &Row) -> Result<SecurityGroup> {
    Ok(SecurityGroup {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        rules: Vec::new(),
        created_at: r.try_get("created_at")?,
    })
}

fn rule(r: &Row) -> Result<Rule> {
    let d: String = r.try_get("direction")?;
    let p: String = r.try_get("protocol")?;
    let min: i32 = r.try_get("port_range_min")?;
    let max: i32 = r.try_get("port_range_max")?;
    Ok(Rule {
        id: r.try_get("id")?,
        security_group_id: r.try_get("security_group_id")?,
        direction: match d.as_str() {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            _ => return Err(bad_row("direction", &d)),
        },
        protocol: Protocol::parse(&p).ok_or_else(|| bad_row("protocol", &p))?,
        port_min: u16::try_from(min).unwrap_or(0),
        port_max: u16::try_from(max).unwrap_or(0),
        remote_ip_prefix: r.try_get("remote_ip_prefix")?,
        remote_group_id: r.try_get("remote_group_id")?,
    })
}

/// Inserts a group; `false` when the project has one of that name.
pub async fn insert_group(c: &impl GenericClient, g: &SecurityGroup) -> Result<bool> {
    let n = c
        .execute(
            "INSERT INTO security_groups (id, project_id, name, description) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project_id, name) DO NOTHING",
            &[&g.id, &g.project_id, &g.name, &g.description],
        )
        .await?;
    Ok(n == 1)
}

pub async fn insert_rule(c: &impl GenericClient, r: &Rule) -> Result<()> {
    c.execute(
        "INSERT INTO security_group_rules (id, security_group_id, direction, ethertype, protocol, \
         port_range_min, port_range_max, remote_ip_prefix, remote_group_id) \
         VALUES ($1, $2, $3, 4, $4, $5, $6, $7, $8)",
        &[
            &r.id,
            &r.security_group_id,
            &r.direction.as_str(),
            &r.protocol.as_str(),
            &i32::from(r.port_min),
            &i32::from(r.port_max),
            &r.remote_ip_prefix,
            &r.remote_group_id,
        ],
    )
    .await
    .map_err(|e| constraint(e, "security group rule", &r.id.to_string()))?;
    Ok(())
}

async fn with_rules(
    c: &impl GenericClient,
    mut groups: Vec<SecurityGroup>,
) -> Result<Vec<SecurityGroup>> {
    let ids: Vec<Uuid> = groups.iter().map(|g| g.id).collect();
    let q = format!(
        "SELECT {RULE_COLUMNS} FROM security_group_rules WHERE security_group_id = ANY($1) \
         ORDER BY created_at, id"
    );
    let rules: Vec<Rule> = c
        .query(&q, &[&ids])
        .await?
        .iter()
        .map(rule)
        .collect::<Result<_>>()?;
    for g in &mut groups {
        g.rules = rules
            .iter()
            .filter(|r| r.security_group_id == g.id)
            .cloned()
            .collect();
    }
    Ok(groups)
}

pub async fn get_group(c: &impl GenericClient, id: Uuid) -> Result<Option<SecurityGroup>> {
    let q = format!("SELECT {SG_COLUMNS} FROM security_groups WHERE id = $1");
    let Some(g) = c
        .query_opt(&q, &[&id])
        .await?
        .as_ref()
        .map(group)
        .transpose()?
    else {
        return Ok(None);
    };
    Ok(with_rules(c, vec![g]).await?.pop())
}

pub async fn find_group_by_name(
    c: &impl GenericClient,
    project: &str,
    name: &str,
) -> Result<Option<SecurityGroup>> {
    let q = format!("SELECT {SG_COLUMNS} FROM security_groups WHERE project_id = $1 AND name = $2");
    let Some(g) = c
        .query_opt(&q, &[&project, &name])
        .await?
        .as_ref()
        .map(group)
        .transpose()?
    else {
        return Ok(None);
    };
    Ok(with_rules(c, vec![g]).await?.pop())
}

pub async fn groups_by_id(c: &impl GenericClient, ids: &[Uuid]) -> Result<Vec<SecurityGroup>> {
    let q = format!(
        "SELECT {SG_COLUMNS} FROM security_groups WHERE id = ANY($1) ORDER BY created_at, id"
    );
    let groups = c
        .query(&q, &[&ids])
        .await?
        .iter()
        .map(group)
        .collect::<Result<_>>()?;
    with_rules(c, groups).await
}

pub async fn list_groups(
    c: &impl GenericClient,
    project: Option<&str>,
) -> Result<Vec<SecurityGroup>> {
    let q = format!(
        "SELECT {SG_COLUMNS} FROM security_groups WHERE $1::text IS NULL OR project_id = $1 \
         ORDER BY created_at, id"
    );
    let groups = c
        .query(&q, &[&project])
        .await?
        .iter()
        .map(group)
        .collect::<Result<_>>()?;
    with_rules(c, groups).await
}

pub async fn group_rule_count(c: &impl GenericClient, group: Uuid) -> Result<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM security_group_rules WHERE security_group_id = $1",
        &[&group],
    )
    .await?
    .get(0))
}

/// Deletes a group; a group ports still use is refused (FAILED_PRECONDITION).
pub async fn delete_group(c: &impl GenericClient, id: Uuid) -> Result<u64> {
    c.execute("DELETE FROM security_groups WHERE id = $1", &[&id])
        .await
        .map_err(|e| match constraint(e, "security group", &id.to_string()) {
            Error::Precondition(_) => {
                Error::precondition(format!("security group {id} is in use by ports"))
            }
            other => other,
        })
}

pub async fn get_rule(c: &impl GenericClient, id: Uuid) -> Result<Option<Rule>> {
    let q = format!("SELECT {RULE_COLUMNS} FROM security_group_rules WHERE id = $1");
    c.query_opt(&q, &[&id])
        .await?
        .as_ref()
        .map(rule)
        .transpose()
}

pub async fn delete_rule(c: &impl GenericClient, id: Uuid) -> Result<u64> {
    Ok(
        c.execute("DELETE FROM security_group_rules WHERE id = $1", &[&id])
            .await?,
    )
}

/// Addresses of every port in each of `groups`.
pub async fn members(
    c: &impl GenericClient,
    groups: &[Uuid],
) -> Result<Vec<(Uuid, Vec<Ipv4Addr>)>> {
    let rows = c
        .query(
            "SELECT g.security_group_id, host(a.ip) FROM port_security_groups g \
             JOIN ip_allocations a ON a.port_id = g.port_id WHERE g.security_group_id = ANY($1) \
             ORDER BY 1, a.ip",
            &[&groups],
        )
        .await?;
    let mut out: Vec<(Uuid, Vec<Ipv4Addr>)> = groups.iter().map(|g| (*g, Vec::new())).collect();
    for r in rows {
        let g: Uuid = r.get(0);
        let ip: String = r.get(1);
        if let (Some(e), Ok(ip)) = (out.iter_mut().find(|(id, _)| *id == g), ip.parse()) {
            e.1.push(ip);
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ quotas

/// `project`'s overrides.
pub async fn quota_overrides(c: &impl GenericClient, project: &str) -> Result<Vec<(String, i64)>> {
    let q = c
        .prepare_cached("SELECT resource, max FROM quotas WHERE project_id = $1")
        .await?;
    Ok(c.query(&q, &[&project])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub async fn set_quota(
    c: &impl GenericClient,
    project: &str,
    resource: &str,
    max: i64,
) -> Result<()> {
    c.execute(
        "INSERT INTO quotas (project_id, resource, max) VALUES ($1, $2, $3) \
         ON CONFLICT (project_id, resource) DO UPDATE SET max = EXCLUDED.max",
        &[&project, &resource, &max],
    )
    .await?;
    Ok(())
}

pub async fn usage(c: &impl GenericClient, project: &str) -> Result<Vec<(String, i64)>> {
    Ok(c.query(
        "SELECT resource, GREATEST(sum(used), 0)::bigint FROM usage WHERE project_id = $1 \
         GROUP BY resource",
        &[&project],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Usage counter shards per (project, resource).
pub const USAGE_SHARDS: i16 = 16;

fn random_shard() -> i16 {
    (uuid::Uuid::new_v4().as_bytes()[0] % USAGE_SHARDS as u8) as i16
}

/// Adds `n` to the usage unless that passes `limit` (negative: no limit);
/// `false` when it would. Run it last in the transaction: a shard's row
/// lock is then held only until commit.
///
/// Exactness with shards: a charge locks one random shard (so each shard has
/// at most one uncharged-but-uncommitted charge in flight), then reads the
/// sum afresh. Whatever may still commit is either in that sum or holds
/// another shard's lock, so `sum + (shards - 1) <= limit` proves the limit
/// holds whatever the others do (charges are of 1). Nearer the limit (or for
/// a charge of more than 1) the fast attempt is rolled back to a savepoint
/// and the exact path locks every shard in order (no deadlock: fast charges
/// hold one shard and wait for nothing else of the resource), sees no charge
/// in flight, and decides on the exact sum.
pub async fn charge(
    c: &impl GenericClient,
    project: &str,
    resource: &str,
    n: i64,
    limit: i64,
) -> Result<bool> {
    let add = "INSERT INTO usage AS u (project_id, resource, shard, used) VALUES ($1, $2, $3, $4) \
               ON CONFLICT (project_id, resource, shard) DO UPDATE SET used = u.used + EXCLUDED.used";
    if limit < 0 {
        c.execute(add, &[&project, &resource, &random_shard(), &n])
            .await?;
        return Ok(true);
    }
    if n > limit {
        return Ok(false);
    }
    let sum =
        "SELECT COALESCE(sum(used), 0)::bigint FROM usage WHERE project_id = $1 AND resource = $2";
    if n == 1 {
        c.batch_execute("SAVEPOINT cirrus_quota").await?;
        c.execute(add, &[&project, &resource, &random_shard(), &n])
            .await?;
        let used: i64 = c.query_one(sum, &[&project, &resource]).await?.get(0);
        if used + i64::from(USAGE_SHARDS - 1) <= limit {
            c.batch_execute("RELEASE SAVEPOINT cirrus_quota").await?;
            return Ok(true);
        }
        c.batch_execute("ROLLBACK TO SAVEPOINT cirrus_quota; RELEASE SAVEPOINT cirrus_quota")
            .await?;
    }
    // Exact: every shard exists and is locked, so nothing is in flight.
    c.execute(
        "INSERT INTO usage (project_id, resource, shard, used) \
         SELECT $1, $2, s::smallint, 0 FROM generate_series(0, $3::int - 1) s \
         ON CONFLICT DO NOTHING",
        &[&project, &resource, &i32::from(USAGE_SHARDS)],
    )
    .await?;
    let rows = c
        .query(
            "SELECT used FROM usage WHERE project_id = $1 AND resource = $2 \
             ORDER BY shard FOR UPDATE",
            &[&project, &resource],
        )
        .await?;
    let used: i64 = rows.iter().map(|r| r.get::<_, i64>(0)).sum();
    if used + n > limit {
        return Ok(false);
    }
    c.execute(add, &[&project, &resource, &0i16, &n]).await?;
    Ok(true)
}

pub async fn refund(c: &impl GenericClient, project: &str, resource: &str, n: i64) -> Result<()> {
    if n > 0 {
        // Any shard: only the sum means anything.
        c.execute(
            "INSERT INTO usage AS u (project_id, resource, shard, used) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project_id, resource, shard) DO UPDATE SET used = u.used + EXCLUDED.used",
            &[&project, &resource, &random_shard(), &-n],
        )
        .await?;
    }
    Ok(())
}

// ------------------------------------------------------------------ agents

fn agent(r: &Row, down_secs: f64) -> Result<Agent> {
    let age: f64 = r.try_get("age")?;
    Ok(Agent {
        host: r.try_get("host")?,
        alive: age <= down_secs,
        last_heartbeat: r.try_get("last_heartbeat")?,
        started_at: r.try_get("started_at")?,
        version: r.try_get("version")?,
        bridge: r.try_get("bridge")?,
    })
}

const AGENT_COLUMNS: &str = "host, last_heartbeat, started_at, version, bridge, \
     EXTRACT(EPOCH FROM (now() - last_heartbeat))::float8 AS age";

pub async fn heartbeat(
    c: &impl GenericClient,
    host: &str,
    started_at: &str,
    version: &str,
    bridge: &str,
    down_secs: f64,
) -> Result<Agent> {
    let q = format!(
        "INSERT INTO agents (host, last_heartbeat, started_at, version, bridge) \
         VALUES ($1, now(), $2, $3, $4) ON CONFLICT (host) DO UPDATE SET last_heartbeat = now(), \
         started_at = EXCLUDED.started_at, version = EXCLUDED.version, bridge = EXCLUDED.bridge \
         RETURNING {AGENT_COLUMNS}"
    );
    let r = c
        .query_one(&q, &[&host, &started_at, &version, &bridge])
        .await?;
    agent(&r, down_secs)
}

pub async fn get_agent(
    c: &impl GenericClient,
    host: &str,
    down_secs: f64,
) -> Result<Option<Agent>> {
    let q = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE host = $1");
    c.query_opt(&q, &[&host])
        .await?
        .as_ref()
        .map(|r| agent(r, down_secs))
        .transpose()
}

pub async fn list_agents(c: &impl GenericClient, down_secs: f64) -> Result<Vec<Agent>> {
    let q = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY host");
    c.query(&q, &[])
        .await?
        .iter()
        .map(|r| agent(r, down_secs))
        .collect()
}

// ------------------------------------------------------------------ outbox

pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
}

/// Up to `limit` unsent events, locked so that other replicas skip them.
pub async fn claim_outbox(c: &impl GenericClient, limit: i64) -> Result<Vec<OutboxRow>> {
    Ok(c
        .query(
            "SELECT id, topic, msg_key, payload FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| OutboxRow {
            id: r.get(0),
            topic: r.get(1),
            key: r.get(2),
            payload: r.get(3),
        })
        .collect())
}

pub async fn delete_outbox(c: &impl GenericClient, ids: &[i64]) -> Result<()> {
    c.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
        .await?;
    Ok(())
}

pub async fn outbox_len(c: &impl GenericClient) -> Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0))
}
