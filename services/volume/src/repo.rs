//! Every SQL statement of the volume service, parameterised. Functions take
//! any client (a pooled connection or a transaction) so that the service
//! decides what commits together.
//!
//! Status changes are *conditional* updates (`... WHERE id = $1 AND status
//! = ANY($2) RETURNING ...`): of two racing callers, the second re-checks
//! the condition under the row lock the first one held, finds the new
//! status and gets no row back. `None` from a transition means "the
//! volume was not in any of those statuses".

use std::collections::{BTreeMap, HashSet};

use deadpool_postgres::GenericClient;
use runtime::error::{Error, Result, constraint};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::model::*;

const VOLUME_COLUMNS: &str = "id, name, description, project_id, user_id, size_gb, status, \
     format, bootable, metadata, source_image_id, source_snapshot_id, status_reason, \
     created_at, updated_at, \
     (SELECT a.id FROM attachments a WHERE a.volume_id = volumes.id) AS attachment_id";

const SNAPSHOT_COLUMNS: &str = "id, volume_id, name, description, project_id, size_gb, status, \
     metadata, status_reason, created_at, updated_at";

const ATTACHMENT_COLUMNS: &str = "id, volume_id, server_id, project_id, status, connector, \
     connection_info, mountpoint, made_by_host, created_at, updated_at";

fn bad_row(what: &str, value: &str) -> Error {
    Error::internal(format!("unexpected {what} {value:?} in the database"))
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i64_of(field: &'static str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(field, "is too large"))
}

fn metadata_of(v: serde_json::Value) -> BTreeMap<String, String> {
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

fn metadata_json(m: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

fn volume(r: &Row) -> Result<Volume> {
    let status: String = r.try_get("status")?;
    let format: String = r.try_get("format")?;
    Ok(Volume {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        project_id: r.try_get("project_id")?,
        user_id: r.try_get("user_id")?,
        size_gb: u64_of(r.try_get("size_gb")?),
        status: VolumeStatus::parse(&status).ok_or_else(|| bad_row("volume status", &status))?,
        format: Format::parse(&format).ok_or_else(|| bad_row("format", &format))?,
        bootable: r.try_get("bootable")?,
        metadata: metadata_of(r.try_get("metadata")?),
        source_image_id: r.try_get("source_image_id")?,
        source_snapshot_id: r.try_get("source_snapshot_id")?,
        attachment_id: r.try_get("attachment_id")?,
        status_reason: r.try_get("status_reason")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn snapshot(r: &Row) -> Result<Snapshot> {
    let status: String = r.try_get("status")?;
    Ok(Snapshot {
        id: r.try_get("id")?,
        volume_id: r.try_get("volume_id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        project_id: r.try_get("project_id")?,
        size_gb: u64_of(r.try_get("size_gb")?),
        status: SnapshotStatus::parse(&status)
            .ok_or_else(|| bad_row("snapshot status", &status))?,
        metadata: metadata_of(r.try_get("metadata")?),
        status_reason: r.try_get("status_reason")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn attachment(r: &Row) -> Result<Attachment> {
    let status: String = r.try_get("status")?;
    let connector: Option<serde_json::Value> = r.try_get("connector")?;
    let info: Option<serde_json::Value> = r.try_get("connection_info")?;
    Ok(Attachment {
        id: r.try_get("id")?,
        volume_id: r.try_get("volume_id")?,
        server_id: r.try_get("server_id")?,
        project_id: r.try_get("project_id")?,
        status: AttachmentStatus::parse(&status)
            .ok_or_else(|| bad_row("attachment status", &status))?,
        connector: connector
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::internal(format!("stored connector: {e}")))?,
        connection_info: info
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::internal(format!("stored connection info: {e}")))?,
        mountpoint: r.try_get("mountpoint")?,
        made_by_host: r.try_get("made_by_host")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn statuses(s: &[VolumeStatus]) -> Vec<&'static str> {
    s.iter().map(|s| s.as_str()).collect()
}

fn one<T>(rows: Option<Row>, f: fn(&Row) -> Result<T>) -> Result<Option<T>> {
    rows.as_ref().map(f).transpose()
}

// ------------------------------------------------------------------ volumes

pub async fn insert_volume(c: &impl GenericClient, v: &Volume) -> Result<Volume> {
    let sql = format!(
        "INSERT INTO volumes (id, name, description, project_id, user_id, size_gb, status, \
         format, bootable, metadata, source_image_id, source_snapshot_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {VOLUME_COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &v.id,
                &v.name,
                &v.description,
                &v.project_id,
                &v.user_id,
                &i64_of("size_gb", v.size_gb)?,
                &v.status.as_str(),
                &v.format.as_str(),
                &v.bootable,
                &metadata_json(&v.metadata),
                &v.source_image_id,
                &v.source_snapshot_id,
            ],
        )
        .await
        .map_err(|e| constraint(e, "volume", &v.id.to_string()))?;
    volume(&row)
}

pub async fn get_volume(c: &impl GenericClient, id: Uuid) -> Result<Option<Volume>> {
    let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1");
    one(c.query_opt(&sql, &[&id]).await?, volume)
}

/// Locks the row until the transaction ends.
pub async fn get_volume_for_update(c: &impl GenericClient, id: Uuid) -> Result<Option<Volume>> {
    let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1 FOR UPDATE");
    one(c.query_opt(&sql, &[&id]).await?, volume)
}

/// Writes name, description, bootable and metadata back.
pub async fn save_volume(c: &impl GenericClient, v: &Volume) -> Result<Volume> {
    let sql = format!(
        "UPDATE volumes SET name = $2, description = $3, bootable = $4, metadata = $5, \
         updated_at = now() WHERE id = $1 RETURNING {VOLUME_COLUMNS}"
    );
    one(
        c.query_opt(
            &sql,
            &[
                &v.id,
                &v.name,
                &v.description,
                &v.bootable,
                &metadata_json(&v.metadata),
            ],
        )
        .await?,
        volume,
    )?
    .ok_or_else(|| Error::not_found("volume", v.id))
}

/// One status transition: from any of `from` to `to`, with a reason
/// (empty clears it).
pub async fn transition(
    c: &impl GenericClient,
    id: Uuid,
    from: &[VolumeStatus],
    to: VolumeStatus,
    reason: &str,
) -> Result<Option<Volume>> {
    let sql = format!(
        "UPDATE volumes SET status = $3, status_reason = $4, updated_at = now() \
         WHERE id = $1 AND status = ANY($2) RETURNING {VOLUME_COLUMNS}"
    );
    one(
        c.query_opt(&sql, &[&id, &statuses(from), &to.as_str(), &reason])
            .await?,
        volume,
    )
}

/// AVAILABLE -> EXTENDING, only while no snapshot is being copied from it.
pub async fn begin_extend(c: &impl GenericClient, id: Uuid) -> Result<Option<Volume>> {
    let sql = format!(
        "UPDATE volumes SET status = 'extending', status_reason = '', updated_at = now() \
         WHERE id = $1 AND status = 'available' AND snapshots_copying = 0 \
         RETURNING {VOLUME_COLUMNS}"
    );
    one(c.query_opt(&sql, &[&id]).await?, volume)
}

/// EXTENDING -> AVAILABLE at the new size.
pub async fn finish_extend(
    c: &impl GenericClient,
    id: Uuid,
    size_gb: u64,
) -> Result<Option<Volume>> {
    let sql = format!(
        "UPDATE volumes SET status = 'available', size_gb = $2, updated_at = now() \
         WHERE id = $1 AND status = 'extending' RETURNING {VOLUME_COLUMNS}"
    );
    one(
        c.query_opt(&sql, &[&id, &i64_of("size_gb", size_gb)?])
            .await?,
        volume,
    )
}

/// `from` -> DELETING, only with no snapshot, no attachment, no copy running.
pub async fn begin_delete(
    c: &impl GenericClient,
    id: Uuid,
    from: &[VolumeStatus],
) -> Result<Option<Volume>> {
    let sql = format!(
        "UPDATE volumes SET status = 'deleting', status_reason = '', updated_at = now() \
         WHERE id = $1 AND status = ANY($2) AND snapshots_copying = 0 \
         AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.volume_id = volumes.id) \
         AND NOT EXISTS (SELECT 1 FROM attachments a WHERE a.volume_id = volumes.id) \
         RETURNING {VOLUME_COLUMNS}"
    );
    one(c.query_opt(&sql, &[&id, &statuses(from)]).await?, volume)
}

pub async fn delete_volume_row(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(c.execute(
        "DELETE FROM volumes WHERE id = $1 AND status = 'deleting'",
        &[&id],
    )
    .await?
        > 0)
}

pub async fn snapshot_count(c: &impl GenericClient, volume_id: Uuid) -> Result<u64> {
    let r = c
        .query_one(
            "SELECT COUNT(*) FROM snapshots WHERE volume_id = $1",
            &[&volume_id],
        )
        .await?;
    Ok(u64_of(r.try_get(0)?))
}

/// Counts a snapshot copy starting on the volume, if it is in one of `from`.
pub async fn begin_copy(
    c: &impl GenericClient,
    id: Uuid,
    from: &[VolumeStatus],
) -> Result<Option<Volume>> {
    let sql = format!(
        "UPDATE volumes SET snapshots_copying = snapshots_copying + 1 \
         WHERE id = $1 AND status = ANY($2) RETURNING {VOLUME_COLUMNS}"
    );
    one(c.query_opt(&sql, &[&id, &statuses(from)]).await?, volume)
}

pub async fn end_copy(c: &impl GenericClient, id: Uuid) -> Result<()> {
    c.execute(
        "UPDATE volumes SET snapshots_copying = GREATEST(snapshots_copying - 1, 0) WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

pub async fn list_volumes(
    c: &impl GenericClient,
    project: Option<&str>,
    f: &VolumeFilter,
) -> Result<Vec<Volume>> {
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut clauses: Vec<String> = Vec::new();
    let mut param = |v: Box<dyn ToSql + Sync + Send>| {
        params.push(v);
        format!("${}", params.len())
    };
    if let Some(p) = project {
        clauses.push(format!("project_id = {}", param(Box::new(p.to_string()))));
    }
    if let Some(n) = &f.name {
        clauses.push(format!("name = {}", param(Box::new(n.clone()))));
    }
    if let Some(s) = f.status {
        clauses.push(format!("status = {}", param(Box::new(s.as_str()))));
    }
    if let Some(b) = f.bootable {
        clauses.push(format!("bootable = {}", param(Box::new(b))));
    }
    if let Some(m) = f.marker {
        let m = param(Box::new(m));
        clauses.push(format!(
            "(created_at, id) < (SELECT created_at, id FROM volumes WHERE id = {m})"
        ));
    }
    let limit = param(Box::new(i64::from(f.limit) + 1));
    let filter = if clauses.is_empty() {
        "true".to_string()
    } else {
        clauses.join(" AND ")
    };
    let sql = format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE {filter} \
         ORDER BY created_at DESC, id DESC LIMIT {limit}"
    );
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    c.query(&sql, &refs).await?.iter().map(volume).collect()
}

// ---------------------------------------------------------------- snapshots

pub async fn insert_snapshot(c: &impl GenericClient, s: &Snapshot) -> Result<Snapshot> {
    let sql = format!(
        "INSERT INTO snapshots (id, volume_id, name, description, project_id, size_gb, status, \
         metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {SNAPSHOT_COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &s.id,
                &s.volume_id,
                &s.name,
                &s.description,
                &s.project_id,
                &i64_of("size_gb", s.size_gb)?,
                &s.status.as_str(),
                &metadata_json(&s.metadata),
            ],
        )
        .await
        .map_err(|e| constraint(e, "snapshot", &s.id.to_string()))?;
    snapshot(&row)
}

pub async fn get_snapshot(c: &impl GenericClient, id: Uuid) -> Result<Option<Snapshot>> {
    let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = $1");
    one(c.query_opt(&sql, &[&id]).await?, snapshot)
}

pub async fn snapshot_transition(
    c: &impl GenericClient,
    id: Uuid,
    from: &[SnapshotStatus],
    to: SnapshotStatus,
    reason: &str,
) -> Result<Option<Snapshot>> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "UPDATE snapshots SET status = $3, status_reason = $4, updated_at = now() \
         WHERE id = $1 AND status = ANY($2) RETURNING {SNAPSHOT_COLUMNS}"
    );
    one(
        c.query_opt(&sql, &[&id, &from, &to.as_str(), &reason])
            .await?,
        snapshot,
    )
}

/// `from` -> DELETING, only while no volume is being restored from it.
pub async fn begin_delete_snapshot(
    c: &impl GenericClient,
    id: Uuid,
    from: &[SnapshotStatus],
) -> Result<Option<Snapshot>> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "UPDATE snapshots SET status = 'deleting', status_reason = '', updated_at = now() \
         WHERE id = $1 AND status = ANY($2) AND readers = 0 RETURNING {SNAPSHOT_COLUMNS}"
    );
    one(c.query_opt(&sql, &[&id, &from]).await?, snapshot)
}

pub async fn delete_snapshot_row(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(c.execute(
        "DELETE FROM snapshots WHERE id = $1 AND status = 'deleting'",
        &[&id],
    )
    .await?
        > 0)
}

/// Counts a restore starting from an AVAILABLE snapshot.
pub async fn begin_read(c: &impl GenericClient, id: Uuid) -> Result<Option<Snapshot>> {
    let sql = format!(
        "UPDATE snapshots SET readers = readers + 1 WHERE id = $1 AND status = 'available' \
         RETURNING {SNAPSHOT_COLUMNS}"
    );
    one(c.query_opt(&sql, &[&id]).await?, snapshot)
}

pub async fn end_read(c: &impl GenericClient, id: Uuid) -> Result<()> {
    c.execute(
        "UPDATE snapshots SET readers = GREATEST(readers - 1, 0) WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

pub async fn list_snapshots(
    c: &impl GenericClient,
    project: Option<&str>,
    f: &SnapshotFilter,
) -> Result<Vec<Snapshot>> {
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut clauses: Vec<String> = Vec::new();
    let mut param = |v: Box<dyn ToSql + Sync + Send>| {
        params.push(v);
        format!("${}", params.len())
    };
    if let Some(p) = project {
        clauses.push(format!("project_id = {}", param(Box::new(p.to_string()))));
    }
    if let Some(v) = f.volume_id {
        clauses.push(format!("volume_id = {}", param(Box::new(v))));
    }
    if let Some(s) = f.status {
        clauses.push(format!("status = {}", param(Box::new(s.as_str()))));
    }
    if let Some(m) = f.marker {
        let m = param(Box::new(m));
        clauses.push(format!(
            "(created_at, id) < (SELECT created_at, id FROM snapshots WHERE id = {m})"
        ));
    }
    let limit = param(Box::new(i64::from(f.limit) + 1));
    let filter = if clauses.is_empty() {
        "true".to_string()
    } else {
        clauses.join(" AND ")
    };
    let sql = format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE {filter} \
         ORDER BY created_at DESC, id DESC LIMIT {limit}"
    );
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    c.query(&sql, &refs).await?.iter().map(snapshot).collect()
}

// -------------------------------------------------------------- attachments

fn json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<serde_json::Value>> {
    v.as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| Error::internal(format!("encoding json: {e}")))
}

pub async fn insert_attachment(c: &impl GenericClient, a: &Attachment) -> Result<Attachment> {
    let sql = format!(
        "INSERT INTO attachments (id, volume_id, server_id, project_id, status, connector, \
         connection_info, made_by_host) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         RETURNING {ATTACHMENT_COLUMNS}"
    );
    let row = c
        .query_one(
            &sql,
            &[
                &a.id,
                &a.volume_id,
                &a.server_id,
                &a.project_id,
                &a.status.as_str(),
                &json(&a.connector)?,
                &json(&a.connection_info)?,
                &a.made_by_host,
            ],
        )
        .await
        .map_err(|e| constraint(e, "attachment", &a.volume_id.to_string()))?;
    attachment(&row)
}

pub async fn get_attachment(c: &impl GenericClient, id: Uuid) -> Result<Option<Attachment>> {
    let sql = format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id = $1");
    one(c.query_opt(&sql, &[&id]).await?, attachment)
}

/// One attachment transition; `connect` also records the connector and
/// connection info, `mountpoint` the guest device.
pub async fn attachment_transition(
    c: &impl GenericClient,
    id: Uuid,
    from: &[AttachmentStatus],
    to: AttachmentStatus,
    connect: Option<(&Connector, &ConnectionInfo)>,
    mountpoint: Option<&str>,
) -> Result<Option<Attachment>> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let (connector, info) = match connect {
        Some((c, i)) => (json(&Some(c))?, json(&Some(i))?),
        None => (None, None),
    };
    let sql = format!(
        "UPDATE attachments SET status = $3, connector = COALESCE($4, connector), \
         connection_info = COALESCE($5, connection_info), \
         mountpoint = COALESCE($6, mountpoint), updated_at = now() \
         WHERE id = $1 AND status = ANY($2) RETURNING {ATTACHMENT_COLUMNS}"
    );
    one(
        c.query_opt(
            &sql,
            &[&id, &from, &to.as_str(), &connector, &info, &mountpoint],
        )
        .await?,
        attachment,
    )
}

pub async fn delete_attachment_row(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(c.execute("DELETE FROM attachments WHERE id = $1", &[&id])
        .await?
        > 0)
}

/// The attachment of `volume_id` (volumes are single-attach).
pub async fn attachment_of_volume(
    c: &impl GenericClient,
    volume_id: Uuid,
) -> Result<Option<Attachment>> {
    let sql = format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE volume_id = $1");
    one(c.query_opt(&sql, &[&volume_id]).await?, attachment)
}

/// Attachments, optionally only of one project, one volume, one server,
/// and only those on one host ([`Attachment::on_host`]).
pub async fn list_attachments(
    c: &impl GenericClient,
    project: Option<&str>,
    volume_id: Option<Uuid>,
    server_id: Option<&str>,
    host: Option<&str>,
) -> Result<Vec<Attachment>> {
    let sql = format!(
        "SELECT {ATTACHMENT_COLUMNS} FROM attachments \
         WHERE ($1::text IS NULL OR project_id = $1) AND ($2::uuid IS NULL OR volume_id = $2) \
         AND ($3::text IS NULL OR server_id = $3) \
         AND ($4::text IS NULL OR connector ->> 'host' = $4 \
              OR (connector IS NULL AND made_by_host = $4)) \
         ORDER BY created_at, id LIMIT 1000"
    );
    c.query(&sql, &[&project, &volume_id, &server_id, &host])
        .await?
        .iter()
        .map(attachment)
        .collect()
}

// ------------------------------------------------------------------- quotas

pub async fn limits(c: &impl GenericClient, project: &str) -> Result<Option<Limits>> {
    let row = c
        .query_opt(
            "SELECT max_volumes, max_gigabytes, max_snapshots FROM quotas WHERE project_id = $1",
            &[&project],
        )
        .await?;
    row.map(|r| {
        Ok(Limits {
            volumes: u64_of(r.try_get("max_volumes")?),
            gigabytes: u64_of(r.try_get("max_gigabytes")?),
            snapshots: u64_of(r.try_get("max_snapshots")?),
        })
    })
    .transpose()
}

pub async fn set_limits(c: &impl GenericClient, project: &str, l: Limits) -> Result<()> {
    c.execute(
        "INSERT INTO quotas (project_id, max_volumes, max_gigabytes, max_snapshots) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (project_id) DO UPDATE \
         SET max_volumes = $2, max_gigabytes = $3, max_snapshots = $4",
        &[
            &project,
            &i64_of("max_volumes", l.volumes)?,
            &i64_of("max_gigabytes", l.gigabytes)?,
            &i64_of("max_snapshots", l.snapshots)?,
        ],
    )
    .await?;
    Ok(())
}

/// What the project uses: its volumes, its snapshots, and their gigabytes
/// together (Cinder counts snapshots against the gigabytes quota too).
pub async fn usage(c: &impl GenericClient, project: &str) -> Result<Usage> {
    let r = c
        .query_one(
            "SELECT (SELECT COUNT(*) FROM volumes WHERE project_id = $1) AS volumes, \
             (SELECT COUNT(*) FROM snapshots WHERE project_id = $1) AS snapshots, \
             ((SELECT COALESCE(SUM(size_gb), 0) FROM volumes WHERE project_id = $1) + \
              (SELECT COALESCE(SUM(size_gb), 0) FROM snapshots WHERE project_id = $1))::bigint \
              AS gigabytes",
            &[&project],
        )
        .await?;
    Ok(Usage {
        volumes: u64_of(r.try_get("volumes")?),
        gigabytes: u64_of(r.try_get("gigabytes")?),
        snapshots: u64_of(r.try_get("snapshots")?),
    })
}

/// Serialises quota checks for one project inside a transaction.
pub async fn lock_project(c: &impl GenericClient, project: &str) -> Result<()> {
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtext('volume-quota:' || $1))",
        &[&project],
    )
    .await?;
    Ok(())
}

// ----------------------------------------------------------------- recovery

/// Start-up: every volume in one of `from` goes to `to`; returns their ids.
pub async fn reset_volumes(
    c: &impl GenericClient,
    from: VolumeStatus,
    to: VolumeStatus,
    reason: &str,
) -> Result<Vec<Uuid>> {
    let rows = c
        .query(
            "UPDATE volumes SET status = $2, status_reason = $3, updated_at = now() \
             WHERE status = $1 RETURNING id",
            &[&from.as_str(), &to.as_str(), &reason],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(Error::from))
        .collect()
}

pub async fn reset_snapshots(
    c: &impl GenericClient,
    from: SnapshotStatus,
    to: SnapshotStatus,
    reason: &str,
) -> Result<Vec<Uuid>> {
    let rows = c
        .query(
            "UPDATE snapshots SET status = $2, status_reason = $3, updated_at = now() \
             WHERE status = $1 RETURNING id",
            &[&from.as_str(), &to.as_str(), &reason],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(Error::from))
        .collect()
}

/// Start-up: no copy or restore is running any more.
pub async fn reset_counters(c: &impl GenericClient) -> Result<()> {
    c.batch_execute(
        "UPDATE volumes SET snapshots_copying = 0 WHERE snapshots_copying <> 0; \
         UPDATE snapshots SET readers = 0 WHERE readers <> 0",
    )
    .await?;
    Ok(())
}

pub async fn volume_ids(
    c: &impl GenericClient,
    status: Option<VolumeStatus>,
) -> Result<HashSet<Uuid>> {
    let rows = c
        .query(
            "SELECT id FROM volumes WHERE $1::text IS NULL OR status = $1",
            &[&status.map(|s| s.as_str())],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(Error::from))
        .collect()
}

pub async fn snapshot_ids(
    c: &impl GenericClient,
    status: Option<SnapshotStatus>,
) -> Result<HashSet<Uuid>> {
    let rows = c
        .query(
            "SELECT id FROM snapshots WHERE $1::text IS NULL OR status = $1",
            &[&status.map(|s| s.as_str())],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(Error::from))
        .collect()
}

/// Attachments a crash left DETACHING, with their volumes.
pub async fn detaching_attachments(c: &impl GenericClient) -> Result<Vec<(Uuid, Uuid)>> {
    let rows = c
        .query(
            "SELECT id, volume_id FROM attachments WHERE status = 'detaching'",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("volume_id")?)))
        .collect()
}
