//! The volume service's domain logic. Every public method takes the
//! [`Caller`], resolves what it names, checks through [`crate::policy`]
//! that the caller may do what it asks, and acts; something of another
//! project is reported as not found.
//!
//! Every status change is one conditional UPDATE ([`crate::repo`]), so of
//! two racing requests exactly one wins and the other gets
//! `FAILED_PRECONDITION`. Work on files (create, copy, snapshot, extend,
//! delete) runs in a task of its own that outlives the request: a client
//! that goes away never leaves a volume stuck in a transient status, and a
//! crash is healed by [`Volumes::recover`] at the next start.

use std::collections::BTreeMap;
use std::sync::Arc;

use deadpool_postgres::{GenericClient, Pool};
use runtime::error::{Error, Result};
use uuid::Uuid;

use crate::Config;
use crate::image::{Credentials, Images};
use crate::model::*;
use crate::policy::{self, Caller};
use crate::repo;
use crate::store::{FsStore, Store};

/// Most metadata pairs on one volume or snapshot.
pub const MAX_METADATA: usize = 128;

#[derive(Clone)]
pub struct Volumes {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    store: Arc<dyn Store>,
    images: Option<Images>,
    cfg: Config,
}

/// What start-up recovery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Volumes a crash left CREATING or EXTENDING, now ERROR.
    pub volumes_failed: usize,
    /// Snapshots a crash left CREATING, now ERROR.
    pub snapshots_failed: usize,
    /// Deletes and detaches a crash interrupted, now finished.
    pub finished: usize,
    /// Stray files removed from the store.
    pub files_removed: usize,
}

/// What the client may read of a failure, for `status_reason`.
fn reason(e: &Error) -> String {
    match e {
        Error::Internal { .. } => "the operation failed (internal error)".into(),
        Error::Unavailable { .. } => "the image service was unavailable".into(),
        other => other.to_string(),
    }
}

fn not_on_host(id: Uuid, host: &str) -> Error {
    Error::forbidden(format!("attachment {id} is not on host {host}"))
}

fn wrong_status(kind: &str, id: Uuid, status: impl std::fmt::Display, wanted: &str) -> Error {
    Error::precondition(format!("{kind} {id} is {status}; {wanted}"))
}

impl Volumes {
    /// Connects, migrates, opens the filesystem store and heals what a crash left.
    pub async fn start(cfg: Config) -> Result<Self> {
        let store = FsStore::open(&cfg.store.dir, &cfg.store.qemu_img).map_err(|e| {
            Error::internal(format!(
                "cannot open the store {}: {e}",
                cfg.store.dir.display()
            ))
        })?;
        Self::start_with_store(cfg, Arc::new(store)).await
    }

    /// As [`Volumes::start`], with any store backend.
    pub async fn start_with_store(cfg: Config, store: Arc<dyn Store>) -> Result<Self> {
        let db = &cfg.database;
        let pool = runtime::db::pool(&db.url, &db.schema, db.pool_size)?;
        runtime::db::migrate(&pool, &db.schema, crate::migrations::runner()).await?;
        let images = Images::new(&cfg.image).map_err(Error::internal)?;
        let volumes = Self {
            inner: Arc::new(Inner {
                pool,
                store,
                images,
                cfg,
            }),
        };
        let r = volumes.recover().await?;
        if r != Recovered::default() {
            tracing::warn!(?r, "recovered from an unclean stop");
        }
        Ok(volumes)
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// Start-up healing, before serving (no task of this process runs yet):
    /// creates and extends a crash cut short are ERROR (with their partial
    /// files removed), interrupted deletes and detaches are finished, and
    /// the store keeps only the files of volumes and snapshots that exist.
    /// One volume service per store and schema: a second replica's work in
    /// progress would look interrupted to this one.
    pub async fn recover(&self) -> Result<Recovered> {
        let mut r = Recovered::default();
        let c = self.inner.pool.get().await?;
        const CUT: &str = "interrupted by a restart of the volume service";
        let failed =
            repo::reset_volumes(&c, VolumeStatus::Creating, VolumeStatus::Error, CUT).await?;
        for id in &failed {
            // A create cut short may have renamed its file into place.
            self.inner.store.delete_volume(*id).await?;
        }
        let extending =
            repo::reset_volumes(&c, VolumeStatus::Extending, VolumeStatus::Error, CUT).await?;
        r.volumes_failed = failed.len() + extending.len();
        let snaps =
            repo::reset_snapshots(&c, SnapshotStatus::Creating, SnapshotStatus::Error, CUT).await?;
        for id in &snaps {
            self.inner.store.delete_snapshot(*id).await?;
        }
        r.snapshots_failed = snaps.len();
        repo::reset_counters(&c).await?;
        for id in repo::volume_ids(&c, Some(VolumeStatus::Deleting)).await? {
            self.finish_delete(id).await?;
            r.finished += 1;
        }
        for id in repo::snapshot_ids(&c, Some(SnapshotStatus::Deleting)).await? {
            self.finish_delete_snapshot(id).await?;
            r.finished += 1;
        }
        for (attachment, volume) in repo::detaching_attachments(&c).await? {
            self.finish_detach(attachment, volume).await?;
            r.finished += 1;
        }
        let keep_v = repo::volume_ids(&c, None).await?;
        let keep_s = repo::snapshot_ids(&c, None).await?;
        r.files_removed = self.inner.store.sweep(&keep_v, &keep_s).await?;
        for id in failed.iter().chain(&extending) {
            tracing::warn!(volume = %id, "{CUT}: volume is error");
        }
        Ok(r)
    }

    // --------------------------------------------------------- look-ups

    /// The volume if the caller may see it; NOT_FOUND otherwise.
    async fn visible_volume(&self, caller: &Caller, id: Uuid) -> Result<Volume> {
        let c = self.inner.pool.get().await?;
        match repo::get_volume(&c, id).await? {
            Some(v) if policy::visible(caller, &v.project_id) => Ok(v),
            _ => Err(Error::not_found("volume", id)),
        }
    }

    async fn visible_snapshot(&self, caller: &Caller, id: Uuid) -> Result<Snapshot> {
        let c = self.inner.pool.get().await?;
        match repo::get_snapshot(&c, id).await? {
            Some(s) if policy::visible(caller, &s.project_id) => Ok(s),
            _ => Err(Error::not_found("snapshot", id)),
        }
    }

    async fn visible_attachment(&self, caller: &Caller, id: Uuid) -> Result<Attachment> {
        let c = self.inner.pool.get().await?;
        match repo::get_attachment(&c, id).await? {
            Some(a) if policy::visible(caller, &a.project_id) => Ok(a),
            _ => Err(Error::not_found("attachment", id)),
        }
    }

    async fn limits(&self, c: &impl GenericClient, project: &str) -> Result<Limits> {
        Ok(repo::limits(c, project).await?.unwrap_or(Limits {
            volumes: self.inner.cfg.quotas.volumes,
            gigabytes: self.inner.cfg.quotas.gigabytes,
            snapshots: self.inner.cfg.quotas.snapshots,
        }))
    }

    /// Refuses what would take the project over its limits. Call under
    /// [`repo::lock_project`] in the transaction that writes.
    async fn check_quota(
        &self,
        c: &impl GenericClient,
        project: &str,
        volumes: u64,
        gigabytes: u64,
        snapshots: u64,
    ) -> Result<()> {
        let l = self.limits(c, project).await?;
        let u = repo::usage(c, project).await?;
        if volumes > 0 && u.volumes + volumes > l.volumes {
            return Err(Error::exhausted(format!(
                "the project has {} volumes, its quota is {}",
                u.volumes, l.volumes
            )));
        }
        if snapshots > 0 && u.snapshots + snapshots > l.snapshots {
            return Err(Error::exhausted(format!(
                "the project has {} snapshots, its quota is {}",
                u.snapshots, l.snapshots
            )));
        }
        if gigabytes > 0 && u.gigabytes + gigabytes > l.gigabytes {
            return Err(Error::exhausted(format!(
                "{gigabytes} GiB more would exceed the project's quota of {} GiB ({} used)",
                l.gigabytes, u.gigabytes
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------- volumes

    /// A new volume in CREATING; its bytes are made by a task of its own.
    /// With `wait`, answers once the volume is AVAILABLE or ERROR.
    pub async fn create(
        &self,
        caller: &Caller,
        creds: &Credentials,
        new: NewVolume,
    ) -> Result<Volume> {
        let project = policy::creator(caller)?.to_string();
        let format = new.format.unwrap_or(self.inner.cfg.store.default_format);
        // Resolve the source first: an unknown or unusable one writes nothing.
        let (min_size, bootable) = match new.source {
            Source::Empty => (1, new.bootable.unwrap_or(false)),
            Source::Snapshot(id) => {
                let s = self.visible_snapshot(caller, id).await?;
                if s.status != SnapshotStatus::Available {
                    return Err(wrong_status(
                        "snapshot",
                        id,
                        s.status,
                        "only an available snapshot can be restored",
                    ));
                }
                (s.size_gb, new.bootable.unwrap_or(false))
            }
            Source::Image(id) => {
                let images = self.inner.images.as_ref().ok_or_else(|| {
                    Error::precondition("this volume service has no image service configured")
                })?;
                let i = images.get(creds, id).await?;
                if i.format.is_none() {
                    return Err(Error::precondition(format!(
                        "image {id} has disk format {}; only raw and qcow2 images can become volumes",
                        i.disk_format
                    )));
                }
                if !i.active {
                    return Err(Error::precondition(format!(
                        "image {id} is not active: it has no bytes to copy"
                    )));
                }
                let bytes_gb = i.size.div_ceil(GIB);
                (
                    bytes_gb.max(i.min_disk_gb).max(1),
                    new.bootable.unwrap_or(true),
                )
            }
        };
        let size_gb = match new.size_gb {
            None if new.source == Source::Empty => {
                return Err(Error::invalid("size_gb", "is required for an empty volume"));
            }
            None => min_size,
            Some(s) if s < min_size => {
                return Err(Error::invalid(
                    "size_gb",
                    format!("must be at least {min_size} GiB, the size of the source"),
                ));
            }
            Some(s) => s,
        };
        if size_gb > self.inner.cfg.store.max_volume_gb {
            return Err(Error::invalid(
                "size_gb",
                format!("must be at most {} GiB", self.inner.cfg.store.max_volume_gb),
            ));
        }

        let now = time::OffsetDateTime::now_utc();
        let mut record = Volume {
            id: Uuid::new_v4(),
            name: new.name.map(|n| n.into_string()).unwrap_or_default(),
            description: new.description,
            project_id: project,
            user_id: caller.user_id.clone().unwrap_or_default(),
            size_gb,
            status: VolumeStatus::Creating,
            format,
            bootable,
            metadata: new.metadata,
            source_image_id: match new.source {
                Source::Image(id) => Some(id),
                _ => None,
            },
            source_snapshot_id: match new.source {
                Source::Snapshot(id) => Some(id),
                _ => None,
            },
            attachment_id: None,
            status_reason: String::new(),
            created_at: now,
            updated_at: now,
        };

        if new.source == Source::Empty && new.wait {
            // An empty volume the caller waits for: the file first (durable,
            // in place), then one transaction inserts the volume AVAILABLE —
            // no CREATING row, no second commit, no task. A crash between
            // the two leaves a file without a row, which the start-up sweep
            // removes; a refusal (quota) removes it at once. In a task, so
            // that a caller that goes away cannot cut it in half.
            record.status = VolumeStatus::Available;
            let this = self.clone();
            return tokio::spawn(async move {
                let id = record.id;
                this.inner.store.create(id, format, size_gb * GIB).await?;
                match this.insert_checked(&record, Source::Empty).await {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        if let Err(d) = this.inner.store.delete_volume(id).await {
                            tracing::error!(volume = %id, detail = ?d.internal_detail(), "cannot remove the file of a refused create");
                        }
                        Err(e)
                    }
                }
            })
            .await
            .map_err(|e| Error::internal(format!("volume create task: {e}")))?;
        }

        let volume = self.insert_checked(&record, new.source).await?;

        // The bytes: in a task that outlives this request.
        let this = self.clone();
        let creds = creds.clone();
        let (id, source) = (volume.id, new.source);
        let task =
            tokio::spawn(async move { this.build(id, format, size_gb, source, creds).await });
        if !new.wait {
            return Ok(volume);
        }
        task.await
            .map_err(|e| Error::internal(format!("volume build task: {e}")))?
    }

    /// Inserts a new volume in one transaction with its quota check (under
    /// the project's lock) and, for a restore, the snapshot's reader count.
    async fn insert_checked(&self, record: &Volume, source: Source) -> Result<Volume> {
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        repo::lock_project(&tx, &record.project_id).await?;
        self.check_quota(&tx, &record.project_id, 1, record.size_gb, 0)
            .await?;
        if let Source::Snapshot(id) = source
            && repo::begin_read(&tx, id).await?.is_none()
        {
            return Err(Error::precondition(format!(
                "snapshot {id} is no longer available"
            )));
        }
        let volume = repo::insert_volume(&tx, record).await?;
        tx.commit().await?;
        metrics::counter!("volume_created_total").increment(1);
        Ok(volume)
    }

    /// Makes the bytes of a CREATING volume, then AVAILABLE (or ERROR).
    async fn build(
        &self,
        id: Uuid,
        format: Format,
        size_gb: u64,
        source: Source,
        creds: Credentials,
    ) -> Result<Volume> {
        let size = size_gb * GIB;
        let store = &self.inner.store;
        let made = match source {
            Source::Empty => store.create(id, format, size).await,
            Source::Snapshot(snap) => {
                let r = store.restore(id, format, size, snap).await;
                if let Err(e) = async {
                    let c = self.inner.pool.get().await?;
                    repo::end_read(&c, snap).await
                }
                .await
                {
                    tracing::error!(snapshot = %snap, error = ?e.internal_detail(), "cannot end a restore");
                }
                r
            }
            Source::Image(image) => self.import(id, format, size, image, &creds).await,
        };
        let c = self.inner.pool.get().await?;
        let from = [VolumeStatus::Creating];
        match made {
            Ok(()) => repo::transition(&c, id, &from, VolumeStatus::Available, "")
                .await?
                .ok_or_else(|| Error::internal(format!("volume {id} left creating meanwhile"))),
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, detail = ?e.internal_detail(), "volume create failed");
                let _ = store.delete_volume(id).await;
                metrics::counter!("volume_create_failed_total").increment(1);
                repo::transition(&c, id, &from, VolumeStatus::Error, &reason(&e))
                    .await?
                    .ok_or_else(|| Error::internal(format!("volume {id} left creating meanwhile")))
            }
        }
    }

    /// The image's bytes, downloaded as the caller, converted into the volume.
    async fn import(
        &self,
        id: Uuid,
        format: Format,
        size: u64,
        image: Uuid,
        creds: &Credentials,
    ) -> Result<()> {
        let images = self
            .inner
            .images
            .as_ref()
            .ok_or_else(|| Error::precondition("no image service configured"))?;
        // Looked up again: the image may have changed since the request.
        let info = images.get(creds, image).await?;
        let src_format = info.format.ok_or_else(|| {
            Error::precondition(format!(
                "image {image} has disk format {}",
                info.disk_format
            ))
        })?;
        if src_format == Format::Raw && format == Format::Raw {
            // Raw into raw: the bytes go straight into the volume file as
            // they arrive, zero blocks skipped — one pass, no staging copy.
            if info.size > size {
                return Err(Error::precondition(format!(
                    "the image ({} bytes) is larger than the volume ({size} bytes)",
                    info.size
                )));
            }
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let (stored, pumped) = tokio::join!(
                self.inner.store.import_raw(id, size, rx),
                images.download_to(creds, image, info.size, tx),
            );
            return match (stored, pumped) {
                // The download failed first: its error is the reason.
                (Err(Error::Aborted(_)), Err(e)) => Err(e),
                (Err(e), _) | (Ok(()), Err(e)) => Err(e),
                (Ok(()), Ok(_)) => Ok(()),
            };
        }
        // Anything else goes through `qemu-img convert`, from a staged copy
        // (qcow2 is read out of order).
        let staged = self.inner.store.staging(id)?;
        let got = images.download(creds, image, &staged.path).await?;
        if got != info.size {
            return Err(Error::precondition(format!(
                "image {image} sent {got} bytes, {} were recorded",
                info.size
            )));
        }
        self.inner
            .store
            .import(id, format, size, &staged.path, src_format)
            .await
    }

    pub async fn get(&self, caller: &Caller, id: Uuid) -> Result<Volume> {
        policy::reader(caller)?;
        self.visible_volume(caller, id).await
    }

    /// A page of volumes, newest first, and the marker of the next page.
    pub async fn list(
        &self,
        caller: &Caller,
        filter: VolumeFilter,
    ) -> Result<(Vec<Volume>, Option<Uuid>)> {
        policy::reader(caller)?;
        let project = if caller.is_admin {
            filter.project_id.clone()
        } else {
            match (&filter.project_id, &caller.project_id) {
                (Some(asked), Some(own)) if asked != own => {
                    return Err(Error::forbidden(
                        "only an administrator may list another project's volumes",
                    ));
                }
                (_, Some(own)) => Some(own.clone()),
                (_, None) => return Err(Error::forbidden("a project-scoped token is required")),
            }
        };
        if let Some(m) = filter.marker {
            self.visible_volume(caller, m).await.map_err(|e| match e {
                Error::NotFound { .. } => Error::invalid("marker", format!("{m} is not a volume")),
                other => other,
            })?;
        }
        let c = self.inner.pool.get().await?;
        let mut volumes = repo::list_volumes(&c, project.as_deref(), &filter).await?;
        let limit = filter.limit as usize;
        let next = if volumes.len() > limit {
            volumes.truncate(limit);
            volumes.last().map(|v| v.id)
        } else {
            None
        };
        Ok((volumes, next))
    }

    pub async fn update(&self, caller: &Caller, id: Uuid, u: VolumeUpdate) -> Result<Volume> {
        policy::reader(caller)?;
        let seen = self.visible_volume(caller, id).await?;
        policy::modify(caller, &seen.project_id)?;
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        let mut v = repo::get_volume_for_update(&tx, id)
            .await?
            .ok_or_else(|| Error::not_found("volume", id))?;
        if let Some(n) = u.name {
            v.name = n.map(|n| n.into_string()).unwrap_or_default();
        }
        if let Some(d) = u.description {
            v.description = d;
        }
        if let Some(b) = u.bootable {
            v.bootable = b;
        }
        apply_metadata(&mut v.metadata, u.set_metadata, &u.remove_metadata)?;
        let v = repo::save_volume(&tx, &v).await?;
        tx.commit().await?;
        Ok(v)
    }

    /// AVAILABLE -> EXTENDING -> AVAILABLE at `new_size_gb`.
    pub async fn extend(&self, caller: &Caller, id: Uuid, new_size_gb: u64) -> Result<Volume> {
        policy::reader(caller)?;
        let seen = self.visible_volume(caller, id).await?;
        policy::modify(caller, &seen.project_id)?;
        if new_size_gb <= seen.size_gb {
            return Err(Error::invalid(
                "new_size_gb",
                format!(
                    "must be larger than the volume's current size ({} GiB)",
                    seen.size_gb
                ),
            ));
        }
        if new_size_gb > self.inner.cfg.store.max_volume_gb {
            return Err(Error::invalid(
                "new_size_gb",
                format!("must be at most {} GiB", self.inner.cfg.store.max_volume_gb),
            ));
        }
        if seen.status == VolumeStatus::InUse && !self.inner.store.can_extend_in_use() {
            return Err(Error::precondition(format!(
                "volume {id} is in-use and this store cannot grow an attached volume; detach it first"
            )));
        }
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        repo::lock_project(&tx, &seen.project_id).await?;
        let v = match repo::begin_extend(&tx, id).await? {
            Some(v) => v,
            None => {
                let now = repo::get_volume(&tx, id)
                    .await?
                    .ok_or_else(|| Error::not_found("volume", id))?;
                return Err(if now.status == VolumeStatus::Available {
                    Error::precondition(format!(
                        "volume {id} has a snapshot being taken; extend it when that is done"
                    ))
                } else {
                    wrong_status(
                        "volume",
                        id,
                        now.status,
                        "only an available volume can be extended",
                    )
                });
            }
        };
        if v.size_gb >= new_size_gb {
            return Err(Error::invalid(
                "new_size_gb",
                format!(
                    "must be larger than the volume's current size ({} GiB)",
                    v.size_gb
                ),
            ));
        }
        self.check_quota(&tx, &v.project_id, 0, new_size_gb - v.size_gb, 0)
            .await?;
        tx.commit().await?;
        drop(c);
        let this = self.clone();
        let format = v.format;
        tokio::spawn(async move {
            let r = this.inner.store.extend(id, format, new_size_gb * GIB).await;
            let c = this.inner.pool.get().await?;
            match r {
                Ok(()) => repo::finish_extend(&c, id, new_size_gb)
                    .await?
                    .ok_or_else(|| Error::internal(format!("volume {id} left extending"))),
                Err(e) => {
                    tracing::error!(volume = %id, detail = ?e.internal_detail(), "extend failed");
                    repo::transition(
                        &c,
                        id,
                        &[VolumeStatus::Extending],
                        VolumeStatus::Error,
                        &reason(&e),
                    )
                    .await?;
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| Error::internal(format!("extend task: {e}")))?
    }

    /// AVAILABLE, ERROR or ERROR_DELETING -> DELETING -> gone.
    pub async fn delete(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::reader(caller)?;
        let seen = self.visible_volume(caller, id).await?;
        policy::modify(caller, &seen.project_id)?;
        let c = self.inner.pool.get().await?;
        let from = [
            VolumeStatus::Available,
            VolumeStatus::Error,
            VolumeStatus::ErrorDeleting,
        ];
        if repo::begin_delete(&c, id, &from).await?.is_none() {
            let now = repo::get_volume(&c, id)
                .await?
                .ok_or_else(|| Error::not_found("volume", id))?;
            let snaps = repo::snapshot_count(&c, id).await?;
            return Err(if snaps > 0 {
                Error::precondition(format!(
                    "volume {id} has {snaps} snapshot(s); delete them first"
                ))
            } else if now.attachment_id.is_some() {
                Error::precondition(format!("volume {id} is attached; detach it first"))
            } else if from.contains(&now.status) {
                Error::precondition(format!("volume {id} has a snapshot being taken"))
            } else {
                wrong_status(
                    "volume",
                    id,
                    now.status,
                    "only an available or error volume can be deleted",
                )
            });
        }
        drop(c);
        let this = self.clone();
        tokio::spawn(async move { this.finish_delete(id).await })
            .await
            .map_err(|e| Error::internal(format!("delete task: {e}")))??;
        metrics::counter!("volume_deleted_total").increment(1);
        Ok(())
    }

    /// A DELETING volume: its file, then its row (ERROR_DELETING if the file stays).
    async fn finish_delete(&self, id: Uuid) -> Result<()> {
        let c = self.inner.pool.get().await?;
        if let Err(e) = self.inner.store.delete_volume(id).await {
            repo::transition(
                &c,
                id,
                &[VolumeStatus::Deleting],
                VolumeStatus::ErrorDeleting,
                &reason(&e),
            )
            .await?;
            return Err(e);
        }
        repo::delete_volume_row(&c, id).await?;
        Ok(())
    }

    // -------------------------------------------------------- snapshots

    pub async fn create_snapshot(&self, caller: &Caller, new: NewSnapshot) -> Result<Snapshot> {
        policy::reader(caller)?;
        let vol = self.visible_volume(caller, new.volume_id).await?;
        policy::modify(caller, &vol.project_id)?;
        let mut from = vec![VolumeStatus::Available];
        if new.force {
            from.push(VolumeStatus::InUse);
        }
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        repo::lock_project(&tx, &vol.project_id).await?;
        let vol = match repo::begin_copy(&tx, vol.id, &from).await? {
            Some(v) => v,
            None => {
                let now = repo::get_volume(&tx, vol.id)
                    .await?
                    .ok_or_else(|| Error::not_found("volume", vol.id))?;
                return Err(if now.status == VolumeStatus::InUse {
                    Error::precondition(format!(
                        "volume {} is in-use; set force to snapshot an attached volume",
                        vol.id
                    ))
                } else {
                    wrong_status(
                        "volume",
                        vol.id,
                        now.status,
                        "only an available (or, with force, in-use) volume can be snapshotted",
                    )
                });
            }
        };
        self.check_quota(&tx, &vol.project_id, 0, vol.size_gb, 1)
            .await?;
        let now = time::OffsetDateTime::now_utc();
        let snap = repo::insert_snapshot(
            &tx,
            &Snapshot {
                id: Uuid::new_v4(),
                volume_id: vol.id,
                name: new.name.map(|n| n.into_string()).unwrap_or_default(),
                description: new.description,
                project_id: vol.project_id.clone(),
                size_gb: vol.size_gb,
                status: SnapshotStatus::Creating,
                metadata: new.metadata,
                status_reason: String::new(),
                created_at: now,
                updated_at: now,
            },
        )
        .await?;
        tx.commit().await?;
        drop(c);
        let this = self.clone();
        let (sid, vid, format) = (snap.id, vol.id, vol.format);
        let task = tokio::spawn(async move {
            let r = this.inner.store.snapshot(vid, format, sid).await;
            let c = this.inner.pool.get().await?;
            repo::end_copy(&c, vid).await?;
            let from = [SnapshotStatus::Creating];
            match r {
                Ok(()) => repo::snapshot_transition(&c, sid, &from, SnapshotStatus::Available, "")
                    .await?
                    .ok_or_else(|| Error::internal(format!("snapshot {sid} left creating"))),
                Err(e) => {
                    tracing::error!(snapshot = %sid, detail = ?e.internal_detail(), "snapshot failed");
                    let _ = this.inner.store.delete_snapshot(sid).await;
                    repo::snapshot_transition(&c, sid, &from, SnapshotStatus::Error, &reason(&e))
                        .await?
                        .ok_or_else(|| Error::internal(format!("snapshot {sid} left creating")))
                }
            }
        });
        if !new.wait {
            return Ok(snap);
        }
        task.await
            .map_err(|e| Error::internal(format!("snapshot task: {e}")))?
    }

    pub async fn get_snapshot(&self, caller: &Caller, id: Uuid) -> Result<Snapshot> {
        policy::reader(caller)?;
        self.visible_snapshot(caller, id).await
    }

    pub async fn list_snapshots(
        &self,
        caller: &Caller,
        filter: SnapshotFilter,
    ) -> Result<(Vec<Snapshot>, Option<Uuid>)> {
        policy::reader(caller)?;
        let project = if caller.is_admin {
            None
        } else {
            Some(
                caller
                    .project_id
                    .clone()
                    .ok_or_else(|| Error::forbidden("a project-scoped token is required"))?,
            )
        };
        if let Some(v) = filter.volume_id {
            self.visible_volume(caller, v).await?;
        }
        if let Some(m) = filter.marker {
            self.visible_snapshot(caller, m)
                .await
                .map_err(|e| match e {
                    Error::NotFound { .. } => {
                        Error::invalid("marker", format!("{m} is not a snapshot"))
                    }
                    other => other,
                })?;
        }
        let c = self.inner.pool.get().await?;
        let mut snaps = repo::list_snapshots(&c, project.as_deref(), &filter).await?;
        let limit = filter.limit as usize;
        let next = if snaps.len() > limit {
            snaps.truncate(limit);
            snaps.last().map(|s| s.id)
        } else {
            None
        };
        Ok((snaps, next))
    }

    pub async fn delete_snapshot(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::reader(caller)?;
        let seen = self.visible_snapshot(caller, id).await?;
        policy::modify(caller, &seen.project_id)?;
        let c = self.inner.pool.get().await?;
        let from = [
            SnapshotStatus::Available,
            SnapshotStatus::Error,
            SnapshotStatus::ErrorDeleting,
        ];
        if repo::begin_delete_snapshot(&c, id, &from).await?.is_none() {
            let now = repo::get_snapshot(&c, id)
                .await?
                .ok_or_else(|| Error::not_found("snapshot", id))?;
            return Err(if from.contains(&now.status) {
                Error::precondition(format!(
                    "snapshot {id} is being restored into a volume; delete it when that is done"
                ))
            } else {
                wrong_status(
                    "snapshot",
                    id,
                    now.status,
                    "only an available or error snapshot can be deleted",
                )
            });
        }
        drop(c);
        let this = self.clone();
        tokio::spawn(async move { this.finish_delete_snapshot(id).await })
            .await
            .map_err(|e| Error::internal(format!("delete task: {e}")))?
    }

    async fn finish_delete_snapshot(&self, id: Uuid) -> Result<()> {
        let c = self.inner.pool.get().await?;
        if let Err(e) = self.inner.store.delete_snapshot(id).await {
            repo::snapshot_transition(
                &c,
                id,
                &[SnapshotStatus::Deleting],
                SnapshotStatus::ErrorDeleting,
                &reason(&e),
            )
            .await?;
            return Err(e);
        }
        repo::delete_snapshot_row(&c, id).await?;
        Ok(())
    }

    // ------------------------------------------------------ attachments

    /// The host a compute agent speaks for, if the call came from one.
    fn agent(&self, caller: &Caller) -> Option<String> {
        policy::agent_host(caller, &self.inner.cfg.trust_domain)
    }

    /// The attachment, for a caller with no user token: a compute agent
    /// (checked by the caller of this) sees any, by id.
    async fn any_attachment(&self, id: Uuid) -> Result<Attachment> {
        let c = self.inner.pool.get().await?;
        repo::get_attachment(&c, id)
            .await?
            .ok_or_else(|| Error::not_found("attachment", id))
    }

    /// An attachment the caller may change: by the user rules when a user
    /// token came (visible, then member or admin of its project); and when
    /// a compute agent calls, with a token or without, only one on its host
    /// ([`Attachment::on_host`]) — or, with `unplaced` and a user's token,
    /// one no host has yet (a user reserved it; the agent connects it).
    async fn changeable_attachment(
        &self,
        caller: &Caller,
        id: Uuid,
        unplaced: bool,
    ) -> Result<Attachment> {
        let agent = self.agent(caller);
        let a = if caller.is_authenticated() {
            policy::reader(caller)?;
            let a = self.visible_attachment(caller, id).await?;
            policy::modify(caller, &a.project_id)?;
            a
        } else {
            policy::user_or_agent(caller, &self.inner.cfg.trust_domain)?;
            self.any_attachment(id).await?
        };
        if let Some(h) = agent {
            let claimable = unplaced
                && caller.is_authenticated()
                && a.connector.is_none()
                && a.made_by_host.is_none();
            if !(a.on_host(&h) || claimable) {
                return Err(not_on_host(id, &h));
            }
        }
        Ok(a)
    }

    /// A compute agent may name only its own host in a connector.
    fn own_connector(&self, caller: &Caller, connector: Option<&Connector>) -> Result<()> {
        let Some(h) = self.agent(caller) else {
            return Ok(());
        };
        match connector {
            None => Err(Error::invalid(
                "connector",
                format!("is required from a compute agent (host {h})"),
            )),
            Some(c) if c.host != h => Err(Error::forbidden(format!(
                "the compute agent of host {h} may connect volumes only to its own host, not to {}",
                c.host
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Reserves an AVAILABLE volume for `server_id` (RESERVED), or with a
    /// connector connects it at once (ATTACHING). A compute agent must give
    /// its own host's connector; without a user token it may attach any
    /// volume to its host (the volume service does not know where servers
    /// are placed). The work runs in a task of its own: a caller killed or
    /// cancelled mid-way leaves either nothing or the whole attachment, and
    /// the same request again answers that attachment.
    pub async fn create_attachment(
        &self,
        caller: &Caller,
        volume_id: Uuid,
        server_id: String,
        connector: Option<Connector>,
    ) -> Result<Attachment> {
        self.own_connector(caller, connector.as_ref())?;
        let vol = if caller.is_authenticated() {
            policy::reader(caller)?;
            let vol = self.visible_volume(caller, volume_id).await?;
            policy::modify(caller, &vol.project_id)?;
            vol
        } else {
            policy::user_or_agent(caller, &self.inner.cfg.trust_domain)?;
            let c = self.inner.pool.get().await?;
            repo::get_volume(&c, volume_id)
                .await?
                .ok_or_else(|| Error::not_found("volume", volume_id))?
        };
        // Checked before anything is written: a connector the store cannot
        // serve refuses the attachment whole.
        let info = connector
            .as_ref()
            .map(|c| self.inner.store.connection(volume_id, vol.format, c))
            .transpose()?;
        let this = self.clone();
        let made_by = self.agent(caller);
        tokio::spawn(async move { this.reserve(vol, server_id, connector, info, made_by).await })
            .await
            .map_err(|e| Error::internal(format!("attach task: {e}")))?
    }

    async fn reserve(
        &self,
        vol: Volume,
        server_id: String,
        connector: Option<Connector>,
        info: Option<ConnectionInfo>,
        made_by_host: Option<String>,
    ) -> Result<Attachment> {
        let volume_id = vol.id;
        let (to, status) = match info {
            Some(_) => (VolumeStatus::Attaching, AttachmentStatus::Attaching),
            None => (VolumeStatus::Reserved, AttachmentStatus::Reserved),
        };
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        if repo::transition(&tx, volume_id, &[VolumeStatus::Available], to, "")
            .await?
            .is_none()
        {
            // A retry of a create that went through while its caller was
            // gone (killed, cancelled, timed out): the same attachment.
            if let Some(a) = repo::attachment_of_volume(&tx, volume_id).await?
                && a.server_id == server_id
                && a.connector == connector
                && matches!(
                    a.status,
                    AttachmentStatus::Reserved | AttachmentStatus::Attaching
                )
            {
                return Ok(a);
            }
            let now = repo::get_volume(&tx, volume_id)
                .await?
                .ok_or_else(|| Error::not_found("volume", volume_id))?;
            return Err(wrong_status(
                "volume",
                volume_id,
                now.status,
                "only an available volume can be attached",
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        let a = repo::insert_attachment(
            &tx,
            &Attachment {
                id: Uuid::new_v4(),
                volume_id,
                server_id,
                project_id: vol.project_id,
                status,
                connector,
                connection_info: info,
                mountpoint: String::new(),
                made_by_host,
                created_at: now,
                updated_at: now,
            },
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("volume_attachments_total").increment(1);
        Ok(a)
    }

    /// Gives a RESERVED attachment its host connector: ATTACHING.
    pub async fn update_attachment(
        &self,
        caller: &Caller,
        id: Uuid,
        connector: Connector,
    ) -> Result<Attachment> {
        self.own_connector(caller, Some(&connector))?;
        let a = self.changeable_attachment(caller, id, true).await?;
        let c0 = self.inner.pool.get().await?;
        let vol = repo::get_volume(&c0, a.volume_id)
            .await?
            .ok_or_else(|| Error::not_found("attachment", id))?;
        drop(c0);
        let info = self
            .inner
            .store
            .connection(a.volume_id, vol.format, &connector)?;
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        let updated = repo::attachment_transition(
            &tx,
            id,
            &[AttachmentStatus::Reserved],
            AttachmentStatus::Attaching,
            Some((&connector, &info)),
            None,
        )
        .await?
        .ok_or_else(|| {
            wrong_status(
                "attachment",
                id,
                a.status,
                "only a reserved attachment takes a connector",
            )
        })?;
        repo::transition(
            &tx,
            a.volume_id,
            &[VolumeStatus::Reserved],
            VolumeStatus::Attaching,
            "",
        )
        .await?
        .ok_or_else(|| {
            Error::internal(format!(
                "volume {} of a reserved attachment is not reserved",
                a.volume_id
            ))
        })?;
        tx.commit().await?;
        Ok(updated)
    }

    /// The host has the disk: attachment ATTACHED, volume IN_USE.
    pub async fn complete_attachment(
        &self,
        caller: &Caller,
        id: Uuid,
        mountpoint: String,
    ) -> Result<Attachment> {
        let a = self.changeable_attachment(caller, id, false).await?;
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        let done = repo::attachment_transition(
            &tx,
            id,
            &[AttachmentStatus::Attaching],
            AttachmentStatus::Attached,
            None,
            Some(&mountpoint),
        )
        .await?;
        let Some(done) = done else {
            let now = repo::get_attachment(&tx, id)
                .await?
                .ok_or_else(|| Error::not_found("attachment", id))?;
            // The same completion again (a retry after a lost answer).
            if now.status == AttachmentStatus::Attached && now.mountpoint == mountpoint {
                return Ok(now);
            }
            return Err(wrong_status(
                "attachment",
                id,
                now.status,
                "only an attaching attachment (one with a connector) can be completed",
            ));
        };
        repo::transition(
            &tx,
            a.volume_id,
            &[VolumeStatus::Attaching],
            VolumeStatus::InUse,
            "",
        )
        .await?
        .ok_or_else(|| {
            Error::internal(format!(
                "volume {} of an attaching attachment is not attaching",
                a.volume_id
            ))
        })?;
        tx.commit().await?;
        Ok(done)
    }

    /// A user sees its project's attachments (admin: all); a compute agent
    /// without a token, those on its host.
    pub async fn get_attachment(&self, caller: &Caller, id: Uuid) -> Result<Attachment> {
        if caller.is_authenticated() {
            policy::reader(caller)?;
            return self.visible_attachment(caller, id).await;
        }
        policy::user_or_agent(caller, &self.inner.cfg.trust_domain)?;
        let a = self.any_attachment(id).await?;
        match self.agent(caller) {
            Some(h) if a.on_host(&h) => Ok(a),
            Some(h) => Err(not_on_host(id, &h)),
            None => Err(Error::not_found("attachment", id)),
        }
    }

    pub async fn list_attachments(
        &self,
        caller: &Caller,
        volume_id: Option<Uuid>,
        server_id: Option<String>,
    ) -> Result<Vec<Attachment>> {
        let (project, host) =
            if caller.is_authenticated() {
                policy::reader(caller)?;
                let project =
                    if caller.is_admin {
                        None
                    } else {
                        Some(caller.project_id.clone().ok_or_else(|| {
                            Error::forbidden("a project-scoped token is required")
                        })?)
                    };
                if let Some(v) = volume_id {
                    self.visible_volume(caller, v).await?;
                }
                (project, None)
            } else {
                policy::user_or_agent(caller, &self.inner.cfg.trust_domain)?;
                (None, self.agent(caller))
            };
        let c = self.inner.pool.get().await?;
        repo::list_attachments(
            &c,
            project.as_deref(),
            volume_id,
            server_id.as_deref(),
            host.as_deref(),
        )
        .await
    }

    /// Detaches: volume (RESERVED, ATTACHING or IN_USE) -> DETACHING ->
    /// AVAILABLE, the attachment removed; in a task of its own, so that a
    /// caller that goes away never leaves the volume DETACHING.
    pub async fn delete_attachment(&self, caller: &Caller, id: Uuid) -> Result<()> {
        let a = self.changeable_attachment(caller, id, false).await?;
        let this = self.clone();
        tokio::spawn(async move { this.detach(id, a.volume_id).await })
            .await
            .map_err(|e| Error::internal(format!("detach task: {e}")))?
    }

    async fn detach(&self, id: Uuid, volume_id: Uuid) -> Result<()> {
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        let from = [
            VolumeStatus::Reserved,
            VolumeStatus::Attaching,
            VolumeStatus::InUse,
        ];
        if repo::transition(&tx, volume_id, &from, VolumeStatus::Detaching, "")
            .await?
            .is_none()
        {
            let now = repo::get_volume(&tx, volume_id)
                .await?
                .ok_or_else(|| Error::not_found("attachment", id))?;
            return Err(wrong_status(
                "volume",
                volume_id,
                now.status,
                "it is not attached",
            ));
        }
        repo::attachment_transition(
            &tx,
            id,
            &[
                AttachmentStatus::Reserved,
                AttachmentStatus::Attaching,
                AttachmentStatus::Attached,
            ],
            AttachmentStatus::Detaching,
            None,
            None,
        )
        .await?
        .ok_or_else(|| Error::not_found("attachment", id))?;
        tx.commit().await?;
        drop(c);
        self.finish_detach(id, volume_id).await
    }

    /// A DETACHING attachment: the store's export goes (nothing to undo for
    /// a local file; an NBD export would stop here), then the attachment,
    /// and the volume is AVAILABLE.
    async fn finish_detach(&self, attachment: Uuid, volume: Uuid) -> Result<()> {
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        repo::delete_attachment_row(&tx, attachment).await?;
        repo::transition(
            &tx,
            volume,
            &[VolumeStatus::Detaching],
            VolumeStatus::Available,
            "",
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ----------------------------------------------------------- quotas

    /// A project's limits and usage: the caller's own project (any reader),
    /// or any project for an admin.
    pub async fn quota(&self, caller: &Caller, project: Option<String>) -> Result<Quota> {
        policy::reader(caller)?;
        let project = match project {
            Some(p) => p,
            None => caller.project_id.clone().ok_or_else(|| {
                Error::invalid("project_id", "is required without a project-scoped token")
            })?,
        };
        if !policy::visible(caller, &project) {
            return Err(Error::forbidden(
                "only an administrator may read another project's quota",
            ));
        }
        let c = self.inner.pool.get().await?;
        Ok(Quota {
            limits: self.limits(&c, &project).await?,
            used: repo::usage(&c, &project).await?,
            project_id: project,
        })
    }

    pub async fn set_quota(
        &self,
        caller: &Caller,
        project: String,
        limits: Limits,
    ) -> Result<Quota> {
        policy::admin(caller)?;
        let c = self.inner.pool.get().await?;
        repo::set_limits(&c, &project, limits).await?;
        drop(c);
        self.quota(caller, Some(project)).await
    }
}

fn apply_metadata(
    m: &mut BTreeMap<String, String>,
    set: BTreeMap<String, String>,
    remove: &[String],
) -> Result<()> {
    for k in remove {
        m.remove(k);
    }
    m.extend(set);
    if m.len() > MAX_METADATA {
        return Err(Error::invalid(
            "metadata",
            format!("a volume has at most {MAX_METADATA} pairs"),
        ));
    }
    Ok(())
}
