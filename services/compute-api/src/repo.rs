//! Every SQL statement on the `compute` schema, parameterised, as functions
//! over any client (a pooled connection or a transaction) so that callers
//! decide what commits together. compute-api, the scheduler and conductor
//! all use these functions; no other code writes the schema.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use runtime::error::{Error, Result, constraint};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::model::*;

/// Every statement through the connection's prepared-statement cache: a
/// statement given as text is otherwise parsed and described by the server
/// in a round trip of its own before each execution (tokio-postgres's
/// unnamed statements), which doubled the round trips of every call. The
/// SQL here is fixed per call site (values are always parameters), so each
/// connection caches a bounded set.
mod sq {
    use deadpool_postgres::GenericClient;
    use tokio_postgres::types::ToSql;
    use tokio_postgres::{Error, Row};

    type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

    pub async fn query(
        c: &impl GenericClient,
        sql: &str,
        p: Params<'_>,
    ) -> Result<Vec<Row>, Error> {
        let s = c.prepare_cached(sql).await?;
        c.query(&s, p).await
    }

    pub async fn query_opt(
        c: &impl GenericClient,
        sql: &str,
        p: Params<'_>,
    ) -> Result<Option<Row>, Error> {
        let s = c.prepare_cached(sql).await?;
        c.query_opt(&s, p).await
    }

    pub async fn query_one(c: &impl GenericClient, sql: &str, p: Params<'_>) -> Result<Row, Error> {
        let s = c.prepare_cached(sql).await?;
        c.query_one(&s, p).await
    }

    pub async fn execute(c: &impl GenericClient, sql: &str, p: Params<'_>) -> Result<u64, Error> {
        let s = c.prepare_cached(sql).await?;
        c.execute(&s, p).await
    }
}

const SERVER_COLUMNS: &str = "id, project_id, user_id, name, flavor_id, flavor_name, vcpus, ram_mb, \
    disk_gb, ephemeral_gb, image_id, image_properties, key_name, public_key, user_data, metadata, \
    networks, block_devices, security_groups, availability_zone, server_group_id, host, alternates, \
    tried_hosts, attempt, vm_state, task_state, power_state, fault_code, fault_message, fault_at, \
    locked, locked_by, locked_reason, revision, created_at, updated_at, launched_at";

fn map_of(v: serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn json_of(m: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::internal(format!("json: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned + Default>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}

pub fn server(r: &Row) -> Result<Server> {
    let fault_code: Option<i32> = r.try_get("fault_code")?;
    let fault = match fault_code {
        Some(code) => Some(Fault {
            code,
            message: r
                .try_get::<_, Option<String>>("fault_message")?
                .unwrap_or_default(),
            at: r.try_get("fault_at")?,
        }),
        None => None,
    };
    Ok(Server {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        flavor_id: r.try_get("flavor_id")?,
        flavor_name: r.try_get("flavor_name")?,
        vcpus: r.try_get("vcpus")?,
        ram_mb: r.try_get("ram_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        ephemeral_gb: r.try_get("ephemeral_gb")?,
        image_id: r.try_get("image_id")?,
        image_properties: map_of(r.try_get("image_properties")?),
        key_name: r.try_get("key_name")?,
        public_key: r.try_get("public_key")?,
        user_data: r.try_get("user_data")?,
        metadata: map_of(r.try_get("metadata")?),
        networks: from_json(r.try_get("networks")?),
        block_devices: from_json(r.try_get("block_devices")?),
        security_groups: from_json(r.try_get("security_groups")?),
        availability_zone: r.try_get("availability_zone")?,
        server_group_id: r.try_get("server_group_id")?,
        host: r.try_get("host")?,
        alternates: r.try_get("alternates")?,
        tried_hosts: r.try_get("tried_hosts")?,
        attempt: r.try_get("attempt")?,
        vm_state: r.try_get("vm_state")?,
        task_state: r.try_get("task_state")?,
        power_state: r.try_get("power_state")?,
        fault,
        locked: r.try_get("locked")?,
        locked_by: r.try_get("locked_by")?,
        locked_reason: r.try_get("locked_reason")?,
        revision: r.try_get("revision")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        launched_at: r.try_get("launched_at")?,
    })
}

// ------------------------------------------------------------------ servers

pub async fn insert_server(c: &impl GenericClient, s: &NewServer) -> Result<Server> {
    let sql = format!(
        "INSERT INTO servers (id, project_id, user_id, name, flavor_id, flavor_name, vcpus, ram_mb, \
         disk_gb, ephemeral_gb, image_id, image_properties, key_name, public_key, user_data, \
         metadata, networks, block_devices, security_groups, availability_zone, server_group_id, \
         vm_state, task_state, idempotency_key) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21, \
         'building', 'scheduling', $22) RETURNING {SERVER_COLUMNS}"
    );
    let row = sq::query_one(
        c,
        &sql,
        &[
            &s.id,
            &s.project_id,
            &s.user_id,
            &s.name,
            &s.flavor.id,
            &s.flavor.name,
            &s.flavor.vcpus,
            &s.flavor.ram_mb,
            &s.flavor.disk_gb,
            &s.flavor.ephemeral_gb,
            &s.image_id,
            &json_of(&s.image_properties),
            &s.key_name,
            &s.public_key,
            &s.user_data,
            &json_of(&s.metadata),
            &to_json(&s.networks)?,
            &to_json(&s.block_devices)?,
            &to_json(&s.security_groups)?,
            &s.availability_zone,
            &s.server_group_id,
            &s.idempotency_key,
        ],
    )
    .await
    .map_err(|e| constraint(e, "server", &s.name))?;
    server(&row)
}

pub async fn get_server(c: &impl GenericClient, id: Uuid) -> Result<Option<Server>> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = $1");
    sq::query_opt(c, &sql, &[&id])
        .await?
        .map(|r| server(&r))
        .transpose()
}

/// The server, locked for the rest of the transaction.
pub async fn lock_server(c: &impl GenericClient, id: Uuid) -> Result<Option<Server>> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = $1 FOR UPDATE");
    sq::query_opt(c, &sql, &[&id])
        .await?
        .map(|r| server(&r))
        .transpose()
}

pub async fn find_by_idempotency_key(
    c: &impl GenericClient,
    project_id: &str,
    key: &str,
) -> Result<Option<Server>> {
    let sql = format!(
        "SELECT {SERVER_COLUMNS} FROM servers WHERE project_id = $1 AND idempotency_key = $2"
    );
    sq::query_opt(c, &sql, &[&project_id, &key])
        .await?
        .map(|r| server(&r))
        .transpose()
}

#[derive(Debug, Clone, Default)]
pub struct ServerFilter {
    /// None: every project.
    pub project_id: Option<String>,
    pub name: Option<String>,
    pub vm_state: Option<String>,
    pub host: Option<String>,
    pub flavor_id: Option<Uuid>,
    pub image_id: Option<String>,
    pub marker: Option<Uuid>,
    pub limit: i64,
}

pub async fn list_servers(c: &impl GenericClient, f: &ServerFilter) -> Result<Vec<Server>> {
    let sql = format!(
        "SELECT {SERVER_COLUMNS} FROM servers WHERE \
         ($1::text IS NULL OR project_id = $1) \
         AND ($2::text IS NULL OR strpos(lower(name), lower($2)) > 0) \
         AND (CASE WHEN $3::text IS NULL THEN vm_state <> 'deleted' ELSE vm_state = $3 END) \
         AND ($4::text IS NULL OR host = $4) \
         AND ($5::uuid IS NULL OR flavor_id = $5) \
         AND ($6::text IS NULL OR image_id = $6) \
         AND ($7::uuid IS NULL OR id > $7) \
         ORDER BY id LIMIT $8"
    );
    let rows = sq::query(
        c,
        &sql,
        &[
            &f.project_id,
            &f.name,
            &f.vm_state,
            &f.host,
            &f.flavor_id,
            &f.image_id,
            &f.marker,
            &f.limit,
        ],
    )
    .await?;
    rows.iter().map(server).collect()
}

/// The servers placed on a host that are not deleted.
pub async fn host_servers(c: &impl GenericClient, host: &str) -> Result<Vec<Server>> {
    let sql = format!(
        "SELECT {SERVER_COLUMNS} FROM servers WHERE host = $1 AND vm_state <> 'deleted' ORDER BY id"
    );
    let rows = sq::query(c, &sql, &[&host]).await?;
    rows.iter().map(server).collect()
}

/// A change of a server's states. `None` fields are left as they are.
#[derive(Debug, Clone, Default)]
pub struct Change<'a> {
    pub vm_state: Option<&'a str>,
    /// Some(None) clears the task.
    pub task_state: Option<Option<&'a str>>,
    pub power_state: Option<&'a str>,
    /// Some(None) clears the fault.
    pub fault: Option<Option<(i32, &'a str)>>,
    pub launched: bool,
    pub deleted: bool,
}

/// When a change may apply. `None` fields are not checked.
#[derive(Debug, Clone, Default)]
pub struct Guard<'a> {
    pub vm_states: Option<&'a [&'a str]>,
    /// Some(None): no task may be running.
    pub task_state: Option<Option<&'a str>>,
    pub host: Option<&'a str>,
    pub attempt: Option<i32>,
}

/// Applies `change` if `guard` holds; the server after the change, or None
/// when the guard did not hold (or there is no such server).
pub async fn change_server(
    c: &impl GenericClient,
    id: Uuid,
    change: &Change<'_>,
    guard: &Guard<'_>,
) -> Result<Option<Server>> {
    let set_task = change.task_state.is_some();
    let task = change.task_state.flatten();
    let set_fault = change.fault.is_some();
    let (fault_code, fault_message) = match change.fault.flatten() {
        Some((c, m)) => (Some(c), Some(m)),
        None => (None, None),
    };
    let check_task = guard.task_state.is_some();
    let expect_task = guard.task_state.flatten();
    let vm_states: Option<Vec<&str>> = guard.vm_states.map(|v| v.to_vec());
    let sql = format!(
        "UPDATE servers SET \
           vm_state = COALESCE($2, vm_state), \
           task_state = CASE WHEN $3 THEN $4 ELSE task_state END, \
           power_state = COALESCE($5, power_state), \
           fault_code = CASE WHEN $6 THEN $7 ELSE fault_code END, \
           fault_message = CASE WHEN $6 THEN $8 ELSE fault_message END, \
           fault_at = CASE WHEN $6 THEN now() ELSE fault_at END, \
           launched_at = CASE WHEN $9 THEN now() ELSE launched_at END, \
           deleted_at = CASE WHEN $10 THEN now() ELSE deleted_at END \
         WHERE id = $1 \
           AND ($11::text[] IS NULL OR vm_state = ANY($11)) \
           AND (NOT $12 OR task_state IS NOT DISTINCT FROM $13) \
           AND ($14::text IS NULL OR host = $14) \
           AND ($15::int IS NULL OR attempt = $15) \
         RETURNING {SERVER_COLUMNS}"
    );
    let row = sq::query_opt(
        c,
        &sql,
        &[
            &id,
            &change.vm_state,
            &set_task,
            &task,
            &change.power_state,
            &set_fault,
            &fault_code,
            &fault_message,
            &change.launched,
            &change.deleted,
            &vm_states,
            &check_task,
            &expect_task,
            &guard.host,
            &guard.attempt,
        ],
    )
    .await?;
    row.map(|r| server(&r)).transpose()
}

/// Places a server being scheduled on `host` with its alternates (the claim
/// is written separately, in the same transaction).
pub async fn place_server(
    c: &impl GenericClient,
    id: Uuid,
    host: &str,
    alternates: &[String],
) -> Result<Option<Server>> {
    let sql = format!(
        "UPDATE servers SET host = $2, alternates = $3, tried_hosts = array_append(tried_hosts, $2), \
         attempt = attempt + 1 \
         WHERE id = $1 AND vm_state = 'building' AND task_state = 'scheduling' \
         RETURNING {SERVER_COLUMNS}"
    );
    let row = sq::query_opt(c, &sql, &[&id, &host, &alternates]).await?;
    row.map(|r| server(&r)).transpose()
}

/// Records the hosts a failed build may be retried on.
pub async fn set_alternates(c: &impl GenericClient, id: Uuid, alternates: &[String]) -> Result<()> {
    sq::execute(
        c,
        "UPDATE servers SET alternates = $2 WHERE id = $1",
        &[&id, &alternates],
    )
    .await?;
    Ok(())
}

/// Moves a failed build to the next host for another attempt.
pub async fn replace_server(
    c: &impl GenericClient,
    id: Uuid,
    host: &str,
    alternates: &[String],
    expect_attempt: i32,
) -> Result<Option<Server>> {
    let sql = format!(
        "UPDATE servers SET host = $2, alternates = $3, tried_hosts = array_append(tried_hosts, $2), \
         attempt = attempt + 1, task_state = 'scheduling', power_state = 'nostate' \
         WHERE id = $1 AND vm_state = 'building' AND attempt = $4 \
         RETURNING {SERVER_COLUMNS}"
    );
    let row = sq::query_opt(c, &sql, &[&id, &host, &alternates, &expect_attempt]).await?;
    row.map(|r| server(&r)).transpose()
}

pub async fn set_lock(
    c: &impl GenericClient,
    id: Uuid,
    locked: bool,
    by: Option<&str>,
    reason: &str,
) -> Result<Option<Server>> {
    let sql = format!(
        "UPDATE servers SET locked = $2, locked_by = $3, locked_reason = $4 WHERE id = $1 \
         RETURNING {SERVER_COLUMNS}"
    );
    let row = sq::query_opt(c, &sql, &[&id, &locked, &by, &reason]).await?;
    row.map(|r| server(&r)).transpose()
}

/// Servers still building after `timeout_secs`.
pub async fn timed_out_builds(c: &impl GenericClient, timeout_secs: f64) -> Result<Vec<Server>> {
    let sql = format!(
        "SELECT {SERVER_COLUMNS} FROM servers WHERE vm_state = 'building' \
         AND build_started_at < now() - make_interval(secs => $1) LIMIT 100"
    );
    let rows = sq::query(c, &sql, &[&timeout_secs]).await?;
    rows.iter().map(server).collect()
}

/// The server's state after each change with a sequence number above `after`.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: i64,
    pub revision: i64,
    pub vm_state: String,
    pub task_state: Option<String>,
    pub power_state: String,
    pub fault: Option<(i32, String)>,
    pub host: Option<String>,
    pub locked: bool,
}

pub async fn events_after(c: &impl GenericClient, id: Uuid, after: i64) -> Result<Vec<Event>> {
    let rows = sq::query(c,
            "SELECT seq, revision, vm_state, task_state, power_state, fault_code, fault_message, \
             host, locked FROM server_events WHERE server_id = $1 AND seq > $2 ORDER BY seq LIMIT 1000",
            &[&id, &after],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let code: Option<i32> = r.try_get("fault_code")?;
            let message: Option<String> = r.try_get("fault_message")?;
            Ok(Event {
                seq: r.try_get("seq")?,
                revision: r.try_get("revision")?,
                vm_state: r.try_get("vm_state")?,
                task_state: r.try_get("task_state")?,
                power_state: r.try_get("power_state")?,
                fault: code.map(|c| (c, message.unwrap_or_default())),
                host: r.try_get("host")?,
                locked: r.try_get("locked")?,
            })
        })
        .collect()
}

/// The sequence number of the server's latest event.
pub async fn last_event(c: &impl GenericClient, id: Uuid) -> Result<i64> {
    let row = sq::query_one(
        c,
        "SELECT COALESCE(max(seq), 0) FROM server_events WHERE server_id = $1",
        &[&id],
    )
    .await?;
    Ok(row.try_get(0)?)
}

/// Appends to the console log, keeping its last `max` bytes.
pub async fn append_console(c: &impl GenericClient, id: Uuid, text: &str, max: i32) -> Result<()> {
    sq::execute(
        c,
        "UPDATE servers SET console_log = right(console_log || $2, $3) WHERE id = $1",
        &[&id, &text, &max],
    )
    .await?;
    Ok(())
}

pub async fn console_log(c: &impl GenericClient, id: Uuid) -> Result<String> {
    let row = sq::query_opt(c, "SELECT console_log FROM servers WHERE id = $1", &[&id]).await?;
    Ok(row
        .map(|r| r.try_get::<_, String>(0))
        .transpose()?
        .unwrap_or_default())
}

// ------------------------------------------------------------------- claims

/// What [`claim_and_place`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Claimed and placed.
    Placed,
    /// The host changed since `generation`, went down or is full: nothing written.
    HostMoved,
    /// The server is no longer waiting for a host (deleted, timed out): nothing written.
    ServerGone,
}

/// The scheduler's claim in one statement (one round trip, atomic by
/// itself, inside a transaction or not): lock the server while it waits
/// for a host, add `res` to `host`'s usage if the host is still at
/// `generation`, enabled, up and has room (as [`claim`] checks), and only
/// then record the claim and place the server there with its alternates.
/// Either all of it is written or none of it. The server row is locked
/// before the host's, the order conductor's result handling uses.
pub async fn claim_and_place(
    c: &impl GenericClient,
    server_id: Uuid,
    host: &str,
    generation: i64,
    res: Resources,
    down_after_secs: f64,
    alternates: &[String],
) -> Result<Placement> {
    let row = sq::query_one(
        c,
        "WITH srv AS ( \
           SELECT id FROM servers WHERE id = $1 AND vm_state = 'building' \
           AND task_state = 'scheduling' FOR UPDATE), \
         h AS ( \
           UPDATE hosts SET vcpus_used = vcpus_used + $4::int, \
             ram_mb_used = ram_mb_used + $5::bigint, disk_gb_used = disk_gb_used + $6::bigint, \
             generation = generation + 1 \
           WHERE name = $2 AND generation = $3 AND enabled \
             AND last_heartbeat > now() - make_interval(secs => $7::float8) \
             AND vcpus_used + $4::int <= vcpus * cpu_ratio \
             AND ram_mb_used + $5::bigint <= ram_mb * ram_ratio \
             AND disk_gb_used + $6::bigint <= disk_gb * disk_ratio \
             AND EXISTS (SELECT 1 FROM srv) \
           RETURNING name), \
         s AS ( \
           UPDATE servers SET host = $2, alternates = $8, \
             tried_hosts = array_append(tried_hosts, $2::text), attempt = attempt + 1 \
           WHERE id IN (SELECT id FROM srv) AND EXISTS (SELECT 1 FROM h) \
           RETURNING id), \
         cl AS ( \
           INSERT INTO claims (server_id, host, vcpus, ram_mb, disk_gb) \
           SELECT id, $2, $4::int, $5::bigint, $6::bigint FROM s RETURNING server_id) \
         SELECT (SELECT count(*) FROM srv), (SELECT count(*) FROM cl)",
        &[
            &server_id,
            &host,
            &generation,
            &res.vcpus,
            &res.ram_mb,
            &res.disk_gb,
            &down_after_secs,
            &alternates,
        ],
    )
    .await
    .map_err(|e| constraint(e, "claim", &server_id.to_string()))?;
    let waiting: i64 = row.try_get(0)?;
    let claimed: i64 = row.try_get(1)?;
    Ok(match (waiting, claimed) {
        (0, _) => Placement::ServerGone,
        (_, 0) => Placement::HostMoved,
        _ => Placement::Placed,
    })
}

/// Claims `res` on `host` for `server`, if the host is still at `generation`,
/// enabled, up (heartbeat within `down_after_secs`) and has room (with its
/// allocation ratios). False when it changed, went down or is full — so a
/// caller deciding on a cached view of the hosts never claims wrongly.
pub async fn claim(
    c: &impl GenericClient,
    server_id: Uuid,
    host: &str,
    generation: i64,
    res: Resources,
    down_after_secs: f64,
) -> Result<bool> {
    let n = sq::execute(
        c,
        "UPDATE hosts SET vcpus_used = vcpus_used + $3, ram_mb_used = ram_mb_used + $4, \
             disk_gb_used = disk_gb_used + $5, generation = generation + 1 \
             WHERE name = $1 AND generation = $2 AND enabled \
             AND last_heartbeat > now() - make_interval(secs => $6) \
             AND vcpus_used + $3 <= vcpus * cpu_ratio \
             AND ram_mb_used + $4 <= ram_mb * ram_ratio \
             AND disk_gb_used + $5 <= disk_gb * disk_ratio",
        &[
            &host,
            &generation,
            &res.vcpus,
            &res.ram_mb,
            &res.disk_gb,
            &down_after_secs,
        ],
    )
    .await?;
    if n == 0 {
        return Ok(false);
    }
    sq::execute(
        c,
        "INSERT INTO claims (server_id, host, vcpus, ram_mb, disk_gb) VALUES ($1, $2, $3, $4, $5)",
        &[&server_id, &host, &res.vcpus, &res.ram_mb, &res.disk_gb],
    )
    .await
    .map_err(|e| constraint(e, "claim", &server_id.to_string()))?;
    Ok(true)
}

/// Releases the server's claim, if it holds one; the host it was on.
pub async fn release_claim(c: &impl GenericClient, server_id: Uuid) -> Result<Option<String>> {
    let row = sq::query_opt(
        c,
        "DELETE FROM claims WHERE server_id = $1 RETURNING host, vcpus, ram_mb, disk_gb",
        &[&server_id],
    )
    .await?;
    let Some(r) = row else { return Ok(None) };
    let host: String = r.try_get(0)?;
    let vcpus: i32 = r.try_get(1)?;
    let ram: i64 = r.try_get(2)?;
    let disk: i64 = r.try_get(3)?;
    sq::execute(c,
        "UPDATE hosts SET vcpus_used = GREATEST(vcpus_used - $2, 0), \
         ram_mb_used = GREATEST(ram_mb_used - $3, 0), disk_gb_used = GREATEST(disk_gb_used - $4, 0), \
         generation = generation + 1 WHERE name = $1",
        &[&host, &vcpus, &ram, &disk],
    )
    .await?;
    Ok(Some(host))
}

/// A build on `host` ended (either way): it no longer counts as in flight.
pub async fn build_ended(c: &impl GenericClient, host: &str, failed: bool) -> Result<()> {
    sq::execute(
        c,
        "UPDATE hosts SET failures = CASE WHEN $2 THEN failures + 1 ELSE 0 END WHERE name = $1",
        &[&host, &failed],
    )
    .await?;
    Ok(())
}

/// The claim a server holds: (host, vcpus, ram_mb, disk_gb).
pub async fn claim_of(
    c: &impl GenericClient,
    server_id: Uuid,
) -> Result<Option<(String, Resources)>> {
    let row = sq::query_opt(
        c,
        "SELECT host, vcpus, ram_mb, disk_gb FROM claims WHERE server_id = $1",
        &[&server_id],
    )
    .await?;
    row.map(|r| {
        Ok((
            r.try_get(0)?,
            Resources {
                vcpus: r.try_get(1)?,
                ram_mb: r.try_get(2)?,
                disk_gb: r.try_get(3)?,
            },
        ))
    })
    .transpose()
}

pub async fn claim_count(c: &impl GenericClient) -> Result<i64> {
    Ok(sq::query_one(c, "SELECT count(*) FROM claims", &[])
        .await?
        .try_get(0)?)
}

// -------------------------------------------------------------------- hosts

const HOST_COLUMNS: &str = "h.name, h.enabled, h.disabled_reason, h.availability_zone, \
    h.hypervisor_type, h.architecture, h.vcpus, h.ram_mb, h.disk_gb, h.cpu_ratio, h.ram_ratio, \
    h.disk_ratio, h.vcpus_used, h.ram_mb_used, h.disk_gb_used, h.failures, \
    h.generation, h.last_heartbeat, COALESCE(b.n, 0)::int AS in_flight";

/// Builds in flight per host (the `building` servers, from a partial index).
const IN_FLIGHT_JOIN: &str = "LEFT JOIN (SELECT host, count(*) AS n FROM servers \
    WHERE vm_state = 'building' AND host IS NOT NULL GROUP BY host) b ON b.host = h.name";

fn host(r: &Row) -> Result<Host> {
    Ok(Host {
        name: r.try_get("name")?,
        enabled: r.try_get("enabled")?,
        disabled_reason: r.try_get("disabled_reason")?,
        availability_zone: r.try_get("availability_zone")?,
        hypervisor_type: r.try_get("hypervisor_type")?,
        architecture: r.try_get("architecture")?,
        vcpus: r.try_get("vcpus")?,
        ram_mb: r.try_get("ram_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        cpu_ratio: r.try_get("cpu_ratio")?,
        ram_ratio: r.try_get("ram_ratio")?,
        disk_ratio: r.try_get("disk_ratio")?,
        vcpus_used: r.try_get("vcpus_used")?,
        ram_mb_used: r.try_get("ram_mb_used")?,
        disk_gb_used: r.try_get("disk_gb_used")?,
        in_flight: r.try_get("in_flight")?,
        failures: r.try_get("failures")?,
        generation: r.try_get("generation")?,
        last_heartbeat: r.try_get("last_heartbeat")?,
        up: r.try_get("up")?,
        servers: r.try_get("servers")?,
    })
}

/// Every host; `up` is whether it heartbeated within `down_after_secs`.
pub async fn list_hosts(c: &impl GenericClient, down_after_secs: f64) -> Result<Vec<Host>> {
    let sql = format!(
        "SELECT {HOST_COLUMNS}, h.last_heartbeat > now() - make_interval(secs => $1) AS up, \
         (SELECT count(*) FROM claims WHERE claims.host = h.name) AS servers \
         FROM hosts h {IN_FLIGHT_JOIN} ORDER BY h.name"
    );
    let rows = sq::query(c, &sql, &[&down_after_secs]).await?;
    rows.iter().map(host).collect()
}

/// The hosts a scheduler may consider: enabled and up (without the server count).
pub async fn candidate_hosts(c: &impl GenericClient, down_after_secs: f64) -> Result<Vec<Host>> {
    let sql = format!(
        "SELECT {HOST_COLUMNS}, true AS up, 0::bigint AS servers FROM hosts h {IN_FLIGHT_JOIN} \
         WHERE h.enabled AND h.last_heartbeat > now() - make_interval(secs => $1)"
    );
    let rows = sq::query(c, &sql, &[&down_after_secs]).await?;
    rows.iter().map(host).collect()
}

pub async fn get_host(
    c: &impl GenericClient,
    name: &str,
    down_after_secs: f64,
) -> Result<Option<Host>> {
    let sql = format!(
        "SELECT {HOST_COLUMNS}, h.last_heartbeat > now() - make_interval(secs => $2) AS up, \
         (SELECT count(*) FROM claims WHERE claims.host = h.name) AS servers \
         FROM hosts h {IN_FLIGHT_JOIN} WHERE h.name = $1"
    );
    sq::query_opt(c, &sql, &[&name, &down_after_secs])
        .await?
        .map(|r| host(&r))
        .transpose()
}

/// Registers or refreshes a host from its agent's heartbeat; whether it is enabled.
pub async fn heartbeat(c: &impl GenericClient, h: &HostReport) -> Result<bool> {
    let row = sq::query_one(
        c,
        "INSERT INTO hosts (name, vcpus, ram_mb, disk_gb, availability_zone, hypervisor_type, \
             architecture, cpu_ratio, ram_ratio, disk_ratio, last_heartbeat) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10, now()) \
             ON CONFLICT (name) DO UPDATE SET vcpus = $2, ram_mb = $3, disk_gb = $4, \
             availability_zone = $5, hypervisor_type = $6, architecture = $7, cpu_ratio = $8, \
             ram_ratio = $9, disk_ratio = $10, last_heartbeat = now(), \
             generation = CASE WHEN (hosts.vcpus, hosts.ram_mb, hosts.disk_gb, hosts.cpu_ratio, \
               hosts.ram_ratio, hosts.disk_ratio) IS DISTINCT FROM ($2, $3, $4, $8, $9, $10) \
               THEN hosts.generation + 1 ELSE hosts.generation END \
             RETURNING enabled",
        &[
            &h.name,
            &h.vcpus,
            &h.ram_mb,
            &h.disk_gb,
            &h.availability_zone,
            &h.hypervisor_type,
            &h.architecture,
            &h.cpu_ratio,
            &h.ram_ratio,
            &h.disk_ratio,
        ],
    )
    .await?;
    Ok(row.try_get(0)?)
}

pub async fn set_host(
    c: &impl GenericClient,
    name: &str,
    enabled: bool,
    reason: &str,
) -> Result<bool> {
    let n = sq::execute(
        c,
        "UPDATE hosts SET enabled = $2, disabled_reason = $3 WHERE name = $1",
        &[&name, &enabled, &reason],
    )
    .await?;
    Ok(n > 0)
}

/// The hosts of the other members of a server group.
pub async fn group_hosts(c: &impl GenericClient, group: Uuid, except: Uuid) -> Result<Vec<String>> {
    let rows = sq::query(
        c,
        "SELECT DISTINCT cl.host FROM servers s JOIN claims cl ON cl.server_id = s.id \
             WHERE s.server_group_id = $1 AND s.id <> $2",
        &[&group, &except],
    )
    .await?;
    rows.iter()
        .map(|r| r.try_get(0).map_err(Error::from))
        .collect()
}

/// Serialises placements of one server group's members (for (anti-)affinity).
pub async fn lock_group(c: &impl GenericClient, group: Uuid) -> Result<()> {
    sq::execute(
        c,
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 1))",
        &[&group.to_string()],
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ flavors

const FLAVOR_COLUMNS: &str = "f.id, f.name, f.vcpus, f.ram_mb, f.disk_gb, f.ephemeral_gb, f.extra_specs, \
    f.is_public, COALESCE((SELECT array_agg(project_id ORDER BY project_id) FROM flavor_access a \
    WHERE a.flavor_id = f.id), '{}') AS projects";

fn flavor(r: &Row) -> Result<Flavor> {
    Ok(Flavor {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        vcpus: r.try_get("vcpus")?,
        ram_mb: r.try_get("ram_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        ephemeral_gb: r.try_get("ephemeral_gb")?,
        extra_specs: map_of(r.try_get("extra_specs")?),
        is_public: r.try_get("is_public")?,
        projects: r.try_get("projects")?,
    })
}

pub async fn insert_flavor(c: &impl GenericClient, f: &Flavor) -> Result<Flavor> {
    sq::execute(c,
        "INSERT INTO flavors (id, name, vcpus, ram_mb, disk_gb, ephemeral_gb, extra_specs, is_public) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        &[
            &f.id,
            &f.name,
            &f.vcpus,
            &f.ram_mb,
            &f.disk_gb,
            &f.ephemeral_gb,
            &json_of(&f.extra_specs),
            &f.is_public,
        ],
    )
    .await
    .map_err(|e| constraint(e, "flavor", &f.name))?;
    get_flavor(c, Some(f.id), None)
        .await?
        .ok_or_else(|| Error::internal("flavor vanished"))
}

pub async fn get_flavor(
    c: &impl GenericClient,
    id: Option<Uuid>,
    name: Option<&str>,
) -> Result<Option<Flavor>> {
    let sql = format!(
        "SELECT {FLAVOR_COLUMNS} FROM flavors f WHERE ($1::uuid IS NOT NULL AND f.id = $1) \
         OR ($2::text IS NOT NULL AND f.name = $2)"
    );
    sq::query_opt(c, &sql, &[&id, &name])
        .await?
        .map(|r| flavor(&r))
        .transpose()
}

pub async fn list_flavors(c: &impl GenericClient) -> Result<Vec<Flavor>> {
    let sql = format!("SELECT {FLAVOR_COLUMNS} FROM flavors f ORDER BY f.ram_mb, f.name");
    let rows = sq::query(c, &sql, &[]).await?;
    rows.iter().map(flavor).collect()
}

pub async fn delete_flavor(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(sq::execute(c, "DELETE FROM flavors WHERE id = $1", &[&id]).await? > 0)
}

pub async fn set_flavor_access(
    c: &impl GenericClient,
    id: Uuid,
    project: &str,
    add: bool,
) -> Result<()> {
    if add {
        sq::execute(c,
            "INSERT INTO flavor_access (flavor_id, project_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&id, &project],
        )
        .await?;
    } else {
        sq::execute(
            c,
            "DELETE FROM flavor_access WHERE flavor_id = $1 AND project_id = $2",
            &[&id, &project],
        )
        .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- key pairs

fn keypair(r: &Row) -> Result<KeyPair> {
    Ok(KeyPair {
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        project_id: r.try_get("project_id")?,
        kind: r.try_get("type")?,
        public_key: r.try_get("public_key")?,
        fingerprint: r.try_get("fingerprint")?,
        created_at: r.try_get("created_at")?,
    })
}

pub async fn insert_keypair(c: &impl GenericClient, k: &KeyPair) -> Result<KeyPair> {
    let row = sq::query_one(
        c,
        "INSERT INTO keypairs (user_id, name, project_id, type, public_key, fingerprint) \
             VALUES ($1,$2,$3,$4,$5,$6) RETURNING *",
        &[
            &k.user_id,
            &k.name,
            &k.project_id,
            &k.kind,
            &k.public_key,
            &k.fingerprint,
        ],
    )
    .await
    .map_err(|e| constraint(e, "key pair", &k.name))?;
    keypair(&row)
}

pub async fn get_keypair(
    c: &impl GenericClient,
    user: &str,
    name: &str,
) -> Result<Option<KeyPair>> {
    sq::query_opt(
        c,
        "SELECT * FROM keypairs WHERE user_id = $1 AND name = $2",
        &[&user, &name],
    )
    .await?
    .map(|r| keypair(&r))
    .transpose()
}

pub async fn list_keypairs(c: &impl GenericClient, user: &str) -> Result<Vec<KeyPair>> {
    let rows = sq::query(
        c,
        "SELECT * FROM keypairs WHERE user_id = $1 ORDER BY name",
        &[&user],
    )
    .await?;
    rows.iter().map(keypair).collect()
}

pub async fn delete_keypair(c: &impl GenericClient, user: &str, name: &str) -> Result<bool> {
    Ok(sq::execute(
        c,
        "DELETE FROM keypairs WHERE user_id = $1 AND name = $2",
        &[&user, &name],
    )
    .await?
        > 0)
}

// ------------------------------------------------------------ server groups

fn group(r: &Row) -> Result<ServerGroup> {
    Ok(ServerGroup {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        policy: r.try_get("policy")?,
        members: r.try_get("members")?,
    })
}

const GROUP_COLUMNS: &str = "g.id, g.project_id, g.user_id, g.name, g.policy, \
    COALESCE((SELECT array_agg(s.id ORDER BY s.id) FROM servers s WHERE s.server_group_id = g.id \
    AND s.vm_state <> 'deleted'), '{}') AS members";

pub async fn insert_group(c: &impl GenericClient, g: &ServerGroup) -> Result<ServerGroup> {
    sq::execute(
        c,
        "INSERT INTO server_groups (id, project_id, user_id, name, policy) VALUES ($1,$2,$3,$4,$5)",
        &[&g.id, &g.project_id, &g.user_id, &g.name, &g.policy],
    )
    .await
    .map_err(|e| constraint(e, "server group", &g.name))?;
    get_group(c, g.id)
        .await?
        .ok_or_else(|| Error::internal("server group vanished"))
}

pub async fn get_group(c: &impl GenericClient, id: Uuid) -> Result<Option<ServerGroup>> {
    let sql = format!("SELECT {GROUP_COLUMNS} FROM server_groups g WHERE g.id = $1");
    sq::query_opt(c, &sql, &[&id])
        .await?
        .map(|r| group(&r))
        .transpose()
}

pub async fn list_groups(
    c: &impl GenericClient,
    project: Option<&str>,
) -> Result<Vec<ServerGroup>> {
    let sql = format!(
        "SELECT {GROUP_COLUMNS} FROM server_groups g WHERE ($1::text IS NULL OR g.project_id = $1) \
         ORDER BY g.name, g.id"
    );
    let rows = sq::query(c, &sql, &[&project]).await?;
    rows.iter().map(group).collect()
}

pub async fn delete_group(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    sq::execute(c,
        "UPDATE servers SET server_group_id = NULL WHERE server_group_id = $1 AND vm_state = 'deleted'",
        &[&id],
    )
    .await?;
    let n = sq::execute(c, "DELETE FROM server_groups WHERE id = $1", &[&id])
        .await
        .map_err(|e| constraint(e, "server group", &id.to_string()))?;
    Ok(n > 0)
}

// ------------------------------------------------------------------- quotas

/// Serialises quota-checked creations of one project until the transaction ends.
pub async fn lock_project(c: &impl GenericClient, project: &str) -> Result<()> {
    sq::execute(
        c,
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&project],
    )
    .await?;
    Ok(())
}

pub async fn quota_limits(
    c: &impl GenericClient,
    project: &str,
    defaults: Limits,
) -> Result<Limits> {
    let row = sq::query_opt(c,
            "SELECT instances, cores, ram_mb, key_pairs, server_groups FROM quotas WHERE project_id = $1",
            &[&project],
        )
        .await?;
    Ok(match row {
        Some(r) => Limits {
            instances: r.try_get(0)?,
            cores: r.try_get(1)?,
            ram_mb: r.try_get(2)?,
            key_pairs: r.try_get(3)?,
            server_groups: r.try_get(4)?,
        },
        None => defaults,
    })
}

pub async fn set_quota(c: &impl GenericClient, project: &str, l: &Limits) -> Result<()> {
    sq::execute(
        c,
        "INSERT INTO quotas (project_id, instances, cores, ram_mb, key_pairs, server_groups) \
         VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (project_id) DO UPDATE SET instances = $2, \
         cores = $3, ram_mb = $4, key_pairs = $5, server_groups = $6",
        &[
            &project,
            &l.instances,
            &l.cores,
            &l.ram_mb,
            &l.key_pairs,
            &l.server_groups,
        ],
    )
    .await?;
    Ok(())
}

/// What a project uses now. Key pairs belong to users; they count in the
/// project they were created in.
pub async fn quota_usage(c: &impl GenericClient, project: &str) -> Result<Limits> {
    Ok(quota(c, project, Limits::default()).await?.1)
}

/// The project's limits (`defaults` without a row of its own) and its usage,
/// in one statement (one round trip, one scan of its servers).
pub async fn quota(
    c: &impl GenericClient,
    project: &str,
    defaults: Limits,
) -> Result<(Limits, Limits)> {
    let r = sq::query_one(
        c,
        "SELECT q.instances, q.cores, q.ram_mb, q.key_pairs, q.server_groups, \
         u.n, u.cores, u.ram, \
         (SELECT count(*) FROM keypairs WHERE project_id = $1), \
         (SELECT count(*) FROM server_groups WHERE project_id = $1) \
         FROM (SELECT count(*) AS n, COALESCE(sum(vcpus), 0)::bigint AS cores, \
               COALESCE(sum(ram_mb), 0)::bigint AS ram \
               FROM servers WHERE project_id = $1 AND vm_state <> 'deleted') u \
         LEFT JOIN quotas q ON q.project_id = $1",
        &[&project],
    )
    .await?;
    let own: Option<i64> = r.try_get(0)?;
    let limits = match own {
        Some(instances) => Limits {
            instances,
            cores: r.try_get(1)?,
            ram_mb: r.try_get(2)?,
            key_pairs: r.try_get(3)?,
            server_groups: r.try_get(4)?,
        },
        None => defaults,
    };
    let usage = Limits {
        instances: r.try_get(5)?,
        cores: r.try_get(6)?,
        ram_mb: r.try_get(7)?,
        key_pairs: r.try_get(8)?,
        server_groups: r.try_get(9)?,
    };
    Ok((limits, usage))
}

// ------------------------------------------------------ volume attachments

fn attachment_of(r: &tokio_postgres::Row) -> Result<VolumeAttachment> {
    Ok(VolumeAttachment {
        server_id: r.try_get("server_id")?,
        volume_id: r.try_get("volume_id")?,
        status: r.try_get("status")?,
        device: r.try_get("device")?,
        attachment_id: r.try_get("attachment_id")?,
        created_at: r.try_get("created_at")?,
    })
}

const ATTACHMENT_COLUMNS: &str = "server_id, volume_id, status, device, attachment_id, created_at";

/// Records a new attachment in `attaching`; `None` when the volume is
/// already attached (to this server or another).
pub async fn insert_attachment(
    c: &impl GenericClient,
    server: Uuid,
    volume: Uuid,
) -> Result<Option<VolumeAttachment>> {
    let sql = format!(
        "INSERT INTO volume_attachments (server_id, volume_id, status) VALUES ($1, $2, 'attaching') \
         ON CONFLICT (volume_id) DO NOTHING RETURNING {ATTACHMENT_COLUMNS}"
    );
    sq::query_opt(c, &sql, &[&server, &volume])
        .await?
        .map(|r| attachment_of(&r))
        .transpose()
}

pub async fn get_attachment(
    c: &impl GenericClient,
    server: Uuid,
    volume: Uuid,
) -> Result<Option<VolumeAttachment>> {
    let sql = format!(
        "SELECT {ATTACHMENT_COLUMNS} FROM volume_attachments WHERE server_id = $1 AND volume_id = $2"
    );
    sq::query_opt(c, &sql, &[&server, &volume])
        .await?
        .map(|r| attachment_of(&r))
        .transpose()
}

pub async fn list_attachments(
    c: &impl GenericClient,
    server: Uuid,
) -> Result<Vec<VolumeAttachment>> {
    let sql = format!(
        "SELECT {ATTACHMENT_COLUMNS} FROM volume_attachments WHERE server_id = $1 ORDER BY created_at, volume_id"
    );
    sq::query(c, &sql, &[&server])
        .await?
        .iter()
        .map(attachment_of)
        .collect()
}

/// Moves an attachment from status `from` to `to` (with the device and
/// attachment id when given); `None` when it is not in `from`.
pub async fn set_attachment(
    c: &impl GenericClient,
    server: Uuid,
    volume: Uuid,
    from: &str,
    to: &str,
    device: Option<&str>,
    attachment_id: Option<&str>,
) -> Result<Option<VolumeAttachment>> {
    let sql = format!(
        "UPDATE volume_attachments SET status = $4, device = COALESCE($5, device), \
         attachment_id = COALESCE($6, attachment_id) \
         WHERE server_id = $1 AND volume_id = $2 AND status = $3 RETURNING {ATTACHMENT_COLUMNS}"
    );
    sq::query_opt(
        c,
        &sql,
        &[&server, &volume, &from, &to, &device, &attachment_id],
    )
    .await?
    .map(|r| attachment_of(&r))
    .transpose()
}

/// Removes an attachment in status `from`; whether there was one.
pub async fn delete_attachment(
    c: &impl GenericClient,
    server: Uuid,
    volume: Uuid,
    from: &str,
) -> Result<bool> {
    Ok(sq::execute(
        c,
        "DELETE FROM volume_attachments WHERE server_id = $1 AND volume_id = $2 AND status = $3",
        &[&server, &volume, &from],
    )
    .await?
        > 0)
}

/// Forgets every attachment of a deleted server.
pub async fn delete_attachments(c: &impl GenericClient, server: Uuid) -> Result<u64> {
    Ok(sq::execute(
        c,
        "DELETE FROM volume_attachments WHERE server_id = $1",
        &[&server],
    )
    .await?)
}

// ---------------------------------------------------------- agent endpoints

pub async fn set_agent_endpoint(c: &impl GenericClient, host: &str, endpoint: &str) -> Result<()> {
    sq::execute(
        c,
        "INSERT INTO agent_endpoints (host, endpoint) VALUES ($1, $2) \
         ON CONFLICT (host) DO UPDATE SET endpoint = EXCLUDED.endpoint, updated_at = now()",
        &[&host, &endpoint],
    )
    .await?;
    Ok(())
}

pub async fn agent_endpoint(c: &impl GenericClient, host: &str) -> Result<Option<String>> {
    Ok(sq::query_opt(
        c,
        "SELECT endpoint FROM agent_endpoints WHERE host = $1 AND endpoint <> ''",
        &[&host],
    )
    .await?
    .map(|r| r.get(0)))
}
