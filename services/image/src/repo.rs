//! Every SQL statement of the image service, parameterised. Functions take
//! any client (a pooled connection or a transaction) so that the service
//! decides what commits together.

use std::collections::{BTreeMap, HashSet};

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::model::*;
use runtime::error::{Error, Result, constraint};

const IMAGE_COLUMNS: &str = "id, name, owner, status, visibility, disk_format, container_format, \
     min_disk, min_ram, protected, properties, tags, expected_size, expected_sha256, size, \
     sha256, created_at, updated_at";

fn bad_row(what: &str, value: &str) -> Error {
    Error::internal(format!("unexpected {what} {value:?} in the database"))
}

fn u64_of(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn image(r: &Row) -> Result<Image> {
    let status: String = r.try_get("status")?;
    let visibility: String = r.try_get("visibility")?;
    let disk: String = r.try_get("disk_format")?;
    let container: String = r.try_get("container_format")?;
    let props: serde_json::Value = r.try_get("properties")?;
    let properties = match props {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let min_disk: i32 = r.try_get("min_disk")?;
    let min_ram: i32 = r.try_get("min_ram")?;
    Ok(Image {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        status: Status::parse(&status).ok_or_else(|| bad_row("status", &status))?,
        visibility: Visibility::parse(&visibility)
            .ok_or_else(|| bad_row("visibility", &visibility))?,
        disk_format: DiskFormat::parse(&disk).ok_or_else(|| bad_row("disk format", &disk))?,
        container_format: ContainerFormat::parse(&container)
            .ok_or_else(|| bad_row("container format", &container))?,
        min_disk: u32::try_from(min_disk).unwrap_or(0),
        min_ram: u32::try_from(min_ram).unwrap_or(0),
        protected: r.try_get("protected")?,
        properties,
        tags: r.try_get("tags")?,
        expected_size: u64_of(r.try_get("expected_size")?),
        expected_sha256: r.try_get("expected_sha256")?,
        size: u64_of(r.try_get("size")?),
        sha256: r.try_get("sha256")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn member(r: &Row) -> Result<Member> {
    let status: String = r.try_get("status")?;
    Ok(Member {
        image_id: r.try_get("image_id")?,
        member: r.try_get("member")?,
        status: MemberStatus::parse(&status).ok_or_else(|| bad_row("member status", &status))?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn props_json(p: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        p.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid("value", format!("{v} is too large")))
}

fn i32_of(v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid("value", format!("{v} is too large")))
}

// ------------------------------------------------------------------ images

pub async fn insert_image(c: &impl GenericClient, i: &Image) -> Result<Image> {
    let sql = format!(
        "INSERT INTO images (id, name, owner, status, visibility, disk_format, container_format, \
         min_disk, min_ram, protected, properties, tags, expected_size, expected_sha256) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         RETURNING {IMAGE_COLUMNS}"
    );
    let expected = i.expected_size.map(i64_of).transpose()?;
    let row = c
        .query_one(
            &sql,
            &[
                &i.id,
                &i.name,
                &i.owner,
                &i.status.as_str(),
                &i.visibility.as_str(),
                &i.disk_format.as_str(),
                &i.container_format.as_str(),
                &i32_of(i.min_disk)?,
                &i32_of(i.min_ram)?,
                &i.protected,
                &props_json(&i.properties),
                &i.tags,
                &expected,
                &i.expected_sha256,
            ],
        )
        .await
        .map_err(|e| constraint(e, "image", &i.id.to_string()))?;
    image(&row)
}

pub async fn get_image(c: &impl GenericClient, id: Uuid) -> Result<Option<Image>> {
    let sql = format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = $1");
    c.query_opt(&sql, &[&id])
        .await?
        .as_ref()
        .map(image)
        .transpose()
}

/// Locks the row until the transaction ends.
pub async fn get_image_for_update(c: &impl GenericClient, id: Uuid) -> Result<Option<Image>> {
    let sql = format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = $1 FOR UPDATE");
    c.query_opt(&sql, &[&id])
        .await?
        .as_ref()
        .map(image)
        .transpose()
}

/// Writes every mutable attribute of `i` back.
pub async fn save_image(c: &impl GenericClient, i: &Image) -> Result<Image> {
    let sql = format!(
        "UPDATE images SET name = $2, visibility = $3, min_disk = $4, min_ram = $5, \
         protected = $6, properties = $7, tags = $8, updated_at = now() \
         WHERE id = $1 RETURNING {IMAGE_COLUMNS}"
    );
    let row = c
        .query_opt(
            &sql,
            &[
                &i.id,
                &i.name,
                &i.visibility.as_str(),
                &i32_of(i.min_disk)?,
                &i32_of(i.min_ram)?,
                &i.protected,
                &props_json(&i.properties),
                &i.tags,
            ],
        )
        .await?
        .ok_or_else(|| Error::not_found("image", i.id))?;
    image(&row)
}

/// Moves the image from one of `from` to `to`; `None` when it was in no such state.
pub async fn transition(
    c: &impl GenericClient,
    id: Uuid,
    from: &[Status],
    to: Status,
) -> Result<Option<Image>> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "UPDATE images SET status = $3, updated_at = now() \
         WHERE id = $1 AND status = ANY($2) RETURNING {IMAGE_COLUMNS}"
    );
    c.query_opt(&sql, &[&id, &from, &to.as_str()])
        .await?
        .as_ref()
        .map(image)
        .transpose()
}

/// SAVING -> ACTIVE with the stored size and checksum; `None` if the image
/// left SAVING meanwhile (deleted).
pub async fn finish_upload(
    c: &impl GenericClient,
    id: Uuid,
    size: u64,
    sha256: &str,
) -> Result<Option<Image>> {
    let sql = format!(
        "UPDATE images SET status = 'active', size = $2, sha256 = $3, updated_at = now() \
         WHERE id = $1 AND status = 'saving' RETURNING {IMAGE_COLUMNS}"
    );
    c.query_opt(&sql, &[&id, &i64_of(size)?, &sha256])
        .await?
        .as_ref()
        .map(image)
        .transpose()
}

pub async fn delete_image(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(c.execute("DELETE FROM images WHERE id = $1", &[&id])
        .await?
        > 0)
}

/// Start-up: uploads a crash interrupted go back to QUEUED; returns their ids.
pub async fn requeue_saving(c: &impl GenericClient) -> Result<Vec<Uuid>> {
    let rows = c
        .query(
            "UPDATE images SET status = 'queued', updated_at = now() \
             WHERE status = 'saving' RETURNING id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(Error::from))
        .collect()
}

/// The images whose bytes the store must keep.
pub async fn images_with_data(c: &impl GenericClient) -> Result<HashSet<Uuid>> {
    let rows = c
        .query(
            "SELECT id FROM images WHERE status IN ('active', 'deactivated')",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(Error::from))
        .collect()
}

/// Who is asking a list, for the visibility rule.
pub enum Viewer<'a> {
    Admin,
    Project(Option<&'a str>),
}

pub async fn list_images(
    c: &impl GenericClient,
    viewer: Viewer<'_>,
    f: &ListFilter,
) -> Result<Vec<Image>> {
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut clauses: Vec<String> = Vec::new();
    let mut param = |v: Box<dyn ToSql + Sync + Send>| {
        params.push(v);
        format!("${}", params.len())
    };

    if let Viewer::Project(project) = viewer {
        // A project-less caller is compared with '' which owns nothing.
        let project = project.unwrap_or("").to_string();
        match f.visibility {
            Some(Visibility::Public | Visibility::Community) => {}
            Some(Visibility::Private) => {
                clauses.push(format!("owner = {}", param(Box::new(project))));
            }
            None | Some(Visibility::Shared) => {
                let p = param(Box::new(project));
                let ms = param(Box::new(f.member_status.as_str()));
                let member = format!(
                    "EXISTS (SELECT 1 FROM image_members m WHERE m.image_id = images.id \
                     AND m.member = {p} AND m.status = {ms})"
                );
                clauses.push(if f.visibility.is_none() {
                    format!(
                        "(owner = {p} OR visibility = 'public' OR (visibility = 'shared' AND {member}))"
                    )
                } else {
                    format!("(owner = {p} OR {member})")
                });
            }
        }
    }
    if let Some(v) = f.visibility {
        clauses.push(format!("visibility = {}", param(Box::new(v.as_str()))));
    }
    if let Some(n) = &f.name {
        clauses.push(format!("name = {}", param(Box::new(n.clone()))));
    }
    if let Some(s) = f.status {
        clauses.push(format!("status = {}", param(Box::new(s.as_str()))));
    }
    if let Some(o) = &f.owner {
        clauses.push(format!("owner = {}", param(Box::new(o.clone()))));
    }
    if !f.tags.is_empty() {
        clauses.push(format!("tags @> {}", param(Box::new(f.tags.clone()))));
    }
    if !f.properties.is_empty() {
        clauses.push(format!(
            "properties @> {}",
            param(Box::new(props_json(&f.properties)))
        ));
    }
    let key = f.sort_key.sql();
    let (cmp, dir) = if f.ascending {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    if let Some(m) = f.marker {
        let m = param(Box::new(m));
        clauses.push(format!(
            "({key}, id) {cmp} (SELECT {key}, id FROM images WHERE id = {m})"
        ));
    }
    let limit = param(Box::new(i64::from(f.limit) + 1));
    let filter = if clauses.is_empty() {
        "true".to_string()
    } else {
        clauses.join(" AND ")
    };
    let sql = format!(
        "SELECT {IMAGE_COLUMNS} FROM images WHERE {filter} \
         ORDER BY {key} {dir}, id {dir} LIMIT {limit}"
    );
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    c.query(&sql, &refs).await?.iter().map(image).collect()
}

// ------------------------------------------------------------------ members

pub async fn member_status(
    c: &impl GenericClient,
    image_id: Uuid,
    project: &str,
) -> Result<Option<MemberStatus>> {
    let row = c
        .query_opt(
            "SELECT image_id, member, status, created_at, updated_at FROM image_members \
             WHERE image_id = $1 AND member = $2",
            &[&image_id, &project],
        )
        .await?;
    Ok(row.as_ref().map(member).transpose()?.map(|m| m.status))
}

pub async fn add_member(c: &impl GenericClient, image_id: Uuid, project: &str) -> Result<Member> {
    let row = c
        .query_one(
            "INSERT INTO image_members (image_id, member, status) VALUES ($1, $2, 'pending') \
             RETURNING image_id, member, status, created_at, updated_at",
            &[&image_id, &project],
        )
        .await
        .map_err(|e| constraint(e, "member", project))?;
    member(&row)
}

pub async fn set_member_status(
    c: &impl GenericClient,
    image_id: Uuid,
    project: &str,
    status: MemberStatus,
) -> Result<Option<Member>> {
    c.query_opt(
        "UPDATE image_members SET status = $3, updated_at = now() \
         WHERE image_id = $1 AND member = $2 \
         RETURNING image_id, member, status, created_at, updated_at",
        &[&image_id, &project, &status.as_str()],
    )
    .await?
    .as_ref()
    .map(member)
    .transpose()
}

pub async fn remove_member(c: &impl GenericClient, image_id: Uuid, project: &str) -> Result<bool> {
    Ok(c.execute(
        "DELETE FROM image_members WHERE image_id = $1 AND member = $2",
        &[&image_id, &project],
    )
    .await?
        > 0)
}

pub async fn list_members(c: &impl GenericClient, image_id: Uuid) -> Result<Vec<Member>> {
    c.query(
        "SELECT image_id, member, status, created_at, updated_at FROM image_members \
         WHERE image_id = $1 ORDER BY created_at, member",
        &[&image_id],
    )
    .await?
    .iter()
    .map(member)
    .collect()
}

// ------------------------------------------------------------------- quotas

pub async fn limits(c: &impl GenericClient, project: &str) -> Result<Option<Limits>> {
    let row = c
        .query_opt(
            "SELECT max_bytes, max_images FROM quotas WHERE project_id = $1",
            &[&project],
        )
        .await?;
    Ok(row.map(|r| Limits {
        max_bytes: u64_of(r.get("max_bytes")).unwrap_or(0),
        max_images: u64_of(r.get("max_images")).unwrap_or(0),
    }))
}

pub async fn set_limits(c: &impl GenericClient, project: &str, l: Limits) -> Result<()> {
    c.execute(
        "INSERT INTO quotas (project_id, max_bytes, max_images) VALUES ($1, $2, $3) \
         ON CONFLICT (project_id) DO UPDATE SET max_bytes = $2, max_images = $3",
        &[&project, &i64_of(l.max_bytes)?, &i64_of(l.max_images)?],
    )
    .await?;
    Ok(())
}

/// (bytes stored for the project's images, number of its images).
pub async fn usage(c: &impl GenericClient, project: &str) -> Result<(u64, u64)> {
    let r = c
        .query_one(
            "SELECT COALESCE(SUM(size) FILTER (WHERE status IN ('active', 'deactivated')), 0)::bigint AS bytes, \
             COUNT(*) AS images FROM images WHERE owner = $1",
            &[&project],
        )
        .await?;
    Ok((
        u64_of(Some(r.try_get("bytes")?)).unwrap_or(0),
        u64_of(Some(r.try_get("images")?)).unwrap_or(0),
    ))
}

/// Serialises quota checks for one project inside a transaction.
pub async fn lock_project(c: &impl GenericClient, project: &str) -> Result<()> {
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtext('image-quota:' || $1))",
        &[&project],
    )
    .await?;
    Ok(())
}
