//! The image service's domain logic. Every public method takes the
//! [`Caller`] and checks, through [`crate::policy`], that it may do what it
//! asks; an image the caller may not see is reported as not found.
//!
//! Uploads run in a task of their own, so that a client that drops its
//! stream (which drops the request handler) still leaves the image QUEUED
//! and its partial bytes removed. The task is tied to its request by an
//! [`Attendance`]: it gives up as soon as the request is gone, and it
//! finishes an upload only when the request confirms, after the last byte,
//! that its stream ended cleanly (see [`Attendant::attend`]). Bytes move
//! between the network and the store through bounded channels and blocking
//! threads: memory is bounded by a few chunks per transfer, whatever the
//! image size.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::{Stream, StreamExt};
use prost::bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::Config;
use crate::format::Inspector;
use crate::model::*;
use crate::policy::{self, Caller};
use crate::repo;
use crate::store::{FsStore, Store, StoreWriter};
use runtime::error::{Error, Result};

/// Largest chunk a download sends (gRPC messages stay well under 4 MiB).
pub const DOWNLOAD_CHUNK: usize = 1024 * 1024;
/// Chunks in flight between the network and a store thread, per transfer.
const PIPELINE_DEPTH: usize = 4;

#[derive(Clone)]
pub struct Images {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    store: Arc<dyn Store>,
    cfg: Config,
    /// Bytes received so far by the uploads in progress, per owner project.
    inflight: Mutex<HashMap<String, u64>>,
}

/// What start-up recovery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Images a crash left SAVING, now QUEUED again.
    pub requeued: usize,
    /// Partial or unwanted files removed from the store.
    pub files_removed: usize,
}

/// Counts one upload's bytes in the project's in-flight total until dropped.
struct InflightGuard {
    inner: Arc<Inner>,
    project: String,
    bytes: u64,
}

impl InflightGuard {
    /// Adds `n` bytes; returns the project's in-flight total.
    fn add(&mut self, n: u64) -> u64 {
        self.bytes += n;
        let mut m = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let total = m.entry(self.project.clone()).or_default();
        *total += n;
        *total
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut m = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(total) = m.get_mut(&self.project) {
            *total = total.saturating_sub(self.bytes);
            if *total == 0 {
                m.remove(&self.project);
            }
        }
    }
}

/// How an upload that did not complete ends.
enum Failed {
    /// The bytes are wrong (size, checksum, format): the image is KILLED.
    Kill(String),
    /// The transfer failed (client gone, quota, I/O): the image is QUEUED
    /// again and may be uploaded anew.
    Requeue(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed::Requeue(e)
    }
}

/// What a client whose upload stream did not end cleanly is told (if it
/// still listens) and the log records.
fn stream_failed() -> Error {
    Error::aborted(
        "the upload stream ended without finishing (cancelled, reset or past its deadline): \
         the image is queued again",
    )
}

struct Written {
    writer: Box<dyn StoreWriter>,
    size: u64,
    sha256: String,
}

/// The upload task's end of its link to the request that feeds it.
pub struct Attendance {
    asks: mpsc::Sender<oneshot::Sender<()>>,
}

/// The request's end: it answers the task's one question, "did your stream
/// end cleanly?", while it is still being served.
pub struct Attendant {
    asks: mpsc::Receiver<oneshot::Sender<()>>,
}

/// A linked pair: give the [`Attendance`] to [`Images::upload`] and drive
/// the upload with [`Attendant::attend`].
pub fn attendance() -> (Attendance, Attendant) {
    let (tx, rx) = mpsc::channel(1);
    (Attendance { asks: tx }, Attendant { asks: rx })
}

impl Attendance {
    /// Resolves when the request is gone (reset, past its deadline, its
    /// connection closed): nothing it sent may be kept.
    async fn gone(&self) {
        self.asks.closed().await
    }

    /// Asked once the data has ended: true only if the request is still
    /// served and its stream ended cleanly.
    async fn confirm(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.asks.send(tx).await.is_ok() && rx.await.is_ok()
    }
}

impl Attendant {
    /// Runs `work` (the upload) and answers its confirmation request.
    /// `clean` says whether the request's body ended without a transport
    /// error (gRPC libraries report a client's RST_STREAM(CANCEL) as a
    /// normal end of the stream, so the adapter watches the body itself).
    ///
    /// Before answering, the handler returns to the HTTP/2 server once:
    /// hyper checks for a RST_STREAM each time a handler is pending, and
    /// drops the handler if the client reset the stream. A reset is
    /// recorded on the stream before its body reports the end, so a reset
    /// stream is always caught here, and its upload is never finished.
    pub async fn attend<T>(mut self, work: impl Future<Output = T>, clean: impl Fn() -> bool) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                Some(reply) = self.asks.recv() => {
                    tokio::task::yield_now().await;
                    if clean() {
                        let _ = reply.send(());
                    }
                }
            }
        }
    }
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::internal(format!("a store task failed: {e}"))
}

impl Images {
    /// Connects, migrates, opens the filesystem store and heals what a crash left.
    pub async fn start(cfg: Config) -> Result<Self> {
        let store = FsStore::open(&cfg.store_dir).map_err(|e| {
            Error::internal(format!(
                "cannot open the store {}: {e}",
                cfg.store_dir.display()
            ))
        })?;
        Self::start_with_store(cfg, Arc::new(store)).await
    }

    /// As [`Images::start`], with any store backend.
    pub async fn start_with_store(cfg: Config, store: Arc<dyn Store>) -> Result<Self> {
        let pool = runtime::db::pool(
            &cfg.database.url,
            &cfg.database.schema,
            cfg.database.pool_size,
        )
        .map_err(|e| Error::internal(e.to_string()))?;
        runtime::db::migrate(&pool, &cfg.database.schema, crate::migrations::runner())
            .await
            .map_err(|e| Error::internal(e.to_string()))?;
        let images = Self {
            inner: Arc::new(Inner {
                pool,
                store,
                cfg,
                inflight: Mutex::new(HashMap::new()),
            }),
        };
        let r = images.recover().await?;
        if r != Recovered::default() {
            tracing::warn!(
                requeued = r.requeued,
                files_removed = r.files_removed,
                "recovered from an unclean stop"
            );
        }
        Ok(images)
    }

    /// Start-up healing: uploads interrupted by a crash go back to QUEUED,
    /// and the store keeps only the bytes of ACTIVE and DEACTIVATED images.
    /// Runs before serving, so no upload of this process is in progress.
    pub async fn recover(&self) -> Result<Recovered> {
        let c = self.inner.pool.get().await?;
        let requeued = repo::requeue_saving(&c).await?;
        for id in &requeued {
            tracing::warn!(image = %id, "upload interrupted by a stop: image queued again");
        }
        let keep = repo::images_with_data(&c).await?;
        let store = self.inner.store.clone();
        let files_removed = tokio::task::spawn_blocking(move || store.sweep(&keep))
            .await
            .map_err(join_err)??;
        Ok(Recovered {
            requeued: requeued.len(),
            files_removed,
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The image if the caller may see it; NOT_FOUND otherwise.
    async fn visible_image(&self, caller: &Caller, id: Uuid) -> Result<Image> {
        let c = self.inner.pool.get().await?;
        let not_found = || Error::not_found("image", id);
        let image = repo::get_image(&c, id).await?.ok_or_else(not_found)?;
        if caller.is_admin || policy::owns(caller, &image) {
            return Ok(image);
        }
        let membership = match (&caller.project_id, image.visibility) {
            (Some(p), Visibility::Shared) => repo::member_status(&c, id, p).await?,
            _ => None,
        };
        if policy::visible(caller, &image, membership) {
            Ok(image)
        } else {
            Err(not_found())
        }
    }

    async fn limits(
        &self,
        c: &impl deadpool_postgres::GenericClient,
        project: &str,
    ) -> Result<Limits> {
        Ok(repo::limits(c, project).await?.unwrap_or(Limits {
            max_bytes: self.inner.cfg.quota_bytes,
            max_images: self.inner.cfg.quota_images,
        }))
    }

    // ----------------------------------------------------------- records

    pub async fn create(&self, caller: &Caller, new: NewImage) -> Result<Image> {
        let owner = policy::creator(caller)?.to_string();
        policy::set_visibility(caller, new.visibility)?;
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        repo::lock_project(&tx, &owner).await?;
        let limits = self.limits(&tx, &owner).await?;
        let (used_bytes, used_images) = repo::usage(&tx, &owner).await?;
        if used_images >= limits.max_images {
            return Err(Error::exhausted(format!(
                "the project has {used_images} images, its quota is {}",
                limits.max_images
            )));
        }
        if let Some(expected) = new.expected_size
            && used_bytes.saturating_add(expected) > limits.max_bytes
        {
            return Err(Error::exhausted(format!(
                "an image of {expected} bytes would exceed the project's quota of {} bytes ({used_bytes} used)",
                limits.max_bytes
            )));
        }
        let now = time::OffsetDateTime::now_utc();
        let image = repo::insert_image(
            &tx,
            &Image {
                id: Uuid::new_v4(),
                name: new.name,
                owner,
                status: Status::Queued,
                visibility: new.visibility,
                disk_format: new.disk_format,
                container_format: new.container_format,
                min_disk: new.min_disk,
                min_ram: new.min_ram,
                protected: new.protected,
                properties: new.properties,
                tags: new.tags,
                expected_size: new.expected_size,
                expected_sha256: new.expected_sha256,
                size: None,
                sha256: String::new(),
                created_at: now,
                updated_at: now,
            },
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("image_created_total").increment(1);
        Ok(image)
    }

    pub async fn get(&self, caller: &Caller, id: Uuid) -> Result<Image> {
        policy::reader(caller)?;
        self.visible_image(caller, id).await
    }

    /// A page of images and the marker of the next page, if there is one.
    pub async fn list(
        &self,
        caller: &Caller,
        filter: ListFilter,
    ) -> Result<(Vec<Image>, Option<Uuid>)> {
        policy::reader(caller)?;
        if let Some(m) = filter.marker {
            self.visible_image(caller, m).await.map_err(|e| match e {
                Error::NotFound { .. } => Error::invalid("marker", format!("{m} is not an image")),
                other => other,
            })?;
        }
        let viewer = if caller.is_admin {
            repo::Viewer::Admin
        } else {
            repo::Viewer::Project(caller.project_id.as_deref())
        };
        let c = self.inner.pool.get().await?;
        let mut images = repo::list_images(&c, viewer, &filter).await?;
        let limit = filter.limit as usize;
        let next = if images.len() > limit {
            images.truncate(limit);
            images.last().map(|i| i.id)
        } else {
            None
        };
        Ok((images, next))
    }

    pub async fn update(&self, caller: &Caller, id: Uuid, u: ImageUpdate) -> Result<Image> {
        policy::reader(caller)?;
        let seen = self.visible_image(caller, id).await?;
        policy::modify(caller, &seen)?;
        if let Some(v) = u.visibility {
            policy::set_visibility(caller, v)?;
        }
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        let mut image = repo::get_image_for_update(&tx, id)
            .await?
            .ok_or_else(|| Error::not_found("image", id))?;
        if let Some(n) = u.name {
            image.name = n;
        }
        for k in &u.remove_properties {
            image.properties.remove(k);
        }
        image.properties.extend(u.set_properties);
        if image.properties.len() > crate::grpc::MAX_PROPERTIES {
            return Err(Error::invalid(
                "set_properties",
                format!(
                    "an image has at most {} properties",
                    crate::grpc::MAX_PROPERTIES
                ),
            ));
        }
        if let Some(t) = u.tags {
            image.tags = t;
        }
        if let Some(v) = u.visibility {
            // Sharing ends when an image stops being shared; members stay
            // recorded, as in Glance, and count again if it is shared anew.
            image.visibility = v;
        }
        if let Some(p) = u.protected {
            image.protected = p;
        }
        if let Some(d) = u.min_disk {
            image.min_disk = d;
        }
        if let Some(r) = u.min_ram {
            image.min_ram = r;
        }
        let image = repo::save_image(&tx, &image).await?;
        tx.commit().await?;
        Ok(image)
    }

    /// Removes the record, then the bytes (a crash between the two leaves a
    /// file that start-up sweeps away).
    pub async fn delete(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::reader(caller)?;
        let image = self.visible_image(caller, id).await?;
        policy::modify(caller, &image)?;
        let mut c = self.inner.pool.get().await?;
        let tx = c.transaction().await?;
        let image = repo::get_image_for_update(&tx, id)
            .await?
            .ok_or_else(|| Error::not_found("image", id))?;
        if image.protected {
            return Err(Error::precondition(
                "the image is protected; unprotect it before deleting it",
            ));
        }
        repo::delete_image(&tx, id).await?;
        tx.commit().await?;
        let store = self.inner.store.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || store.delete(id))
            .await
            .map_err(join_err)?
        {
            // The record is gone; the next start-up sweep removes the file.
            tracing::error!(image = %id, error = %e, "cannot remove a deleted image's bytes");
        }
        metrics::counter!("image_deleted_total").increment(1);
        Ok(())
    }

    pub async fn deactivate(&self, caller: &Caller, id: Uuid) -> Result<Image> {
        self.toggle(caller, id, Status::Active, Status::Deactivated)
            .await
    }

    pub async fn reactivate(&self, caller: &Caller, id: Uuid) -> Result<Image> {
        self.toggle(caller, id, Status::Deactivated, Status::Active)
            .await
    }

    async fn toggle(&self, caller: &Caller, id: Uuid, from: Status, to: Status) -> Result<Image> {
        policy::admin(caller)?;
        let image = self.visible_image(caller, id).await?;
        if image.status == to {
            return Ok(image);
        }
        let c = self.inner.pool.get().await?;
        repo::transition(&c, id, &[from], to).await?.ok_or_else(|| {
            Error::precondition(format!(
                "the image is {}; only a {from} image can become {to}",
                image.status
            ))
        })
    }

    // ----------------------------------------------------------- members

    /// The image, which must be SHARED, if the caller may manage its members.
    async fn shared_image_to_manage(&self, caller: &Caller, id: Uuid) -> Result<Image> {
        policy::reader(caller)?;
        let image = self.visible_image(caller, id).await?;
        policy::modify(caller, &image)?;
        if image.visibility != Visibility::Shared {
            return Err(Error::precondition(format!(
                "only a shared image has members; this one is {}",
                image.visibility
            )));
        }
        Ok(image)
    }

    pub async fn add_member(&self, caller: &Caller, id: Uuid, project: String) -> Result<Member> {
        let image = self.shared_image_to_manage(caller, id).await?;
        if project == image.owner {
            return Err(Error::invalid(
                "member_id",
                "the owner project cannot be a member of its own image",
            ));
        }
        let c = self.inner.pool.get().await?;
        repo::add_member(&c, id, &project).await
    }

    pub async fn remove_member(&self, caller: &Caller, id: Uuid, project: String) -> Result<()> {
        policy::reader(caller)?;
        let image = self.visible_image(caller, id).await?;
        // The owner removes members; a member may also leave.
        if caller.project_id.as_deref() != Some(project.as_str()) {
            policy::modify(caller, &image)?;
        } else {
            policy::member_of(caller, &project)?;
        }
        let c = self.inner.pool.get().await?;
        if repo::remove_member(&c, id, &project).await? {
            Ok(())
        } else {
            Err(Error::not_found(
                "member",
                format!("{project} of image {id}"),
            ))
        }
    }

    pub async fn update_member(
        &self,
        caller: &Caller,
        id: Uuid,
        project: String,
        status: MemberStatus,
    ) -> Result<Member> {
        policy::reader(caller)?;
        self.visible_image(caller, id).await?;
        policy::member_of(caller, &project)?;
        let c = self.inner.pool.get().await?;
        repo::set_member_status(&c, id, &project, status)
            .await?
            .ok_or_else(|| Error::not_found("member", format!("{project} of image {id}")))
    }

    /// The owner (or an admin) sees every member; a member sees itself.
    pub async fn list_members(&self, caller: &Caller, id: Uuid) -> Result<Vec<Member>> {
        policy::reader(caller)?;
        let image = self.visible_image(caller, id).await?;
        let c = self.inner.pool.get().await?;
        let mut members = repo::list_members(&c, id).await?;
        if !(caller.is_admin || policy::owns(caller, &image)) {
            members.retain(|m| Some(m.member.as_str()) == caller.project_id.as_deref());
        }
        Ok(members)
    }

    // ------------------------------------------------------------ quotas

    pub async fn quota(&self, caller: &Caller, project: Option<String>) -> Result<Quota> {
        policy::reader(caller)?;
        let project = match project {
            Some(p) => {
                if !caller.is_admin && caller.project_id.as_deref() != Some(p.as_str()) {
                    return Err(Error::forbidden(
                        "only an administrator may see another project's quota",
                    ));
                }
                p
            }
            None => caller.project_id.clone().ok_or_else(|| {
                Error::invalid("project_id", "is required for a project-less token")
            })?,
        };
        let c = self.inner.pool.get().await?;
        let limits = self.limits(&c, &project).await?;
        let (used_bytes, used_images) = repo::usage(&c, &project).await?;
        Ok(Quota {
            project_id: project,
            limits,
            used_bytes,
            used_images,
        })
    }

    pub async fn set_quota(
        &self,
        caller: &Caller,
        project: String,
        limits: Limits,
    ) -> Result<Quota> {
        policy::admin(caller)?;
        {
            let c = self.inner.pool.get().await?;
            repo::set_limits(&c, &project, limits).await?;
        }
        self.quota(caller, Some(project)).await
    }

    // ----------------------------------------------------------- transfer

    /// Stores the bytes of a QUEUED image from `data`. `data` yields
    /// `Err(Error::Aborted)` when the client's stream fails. Runs to its end
    /// even if the caller stops waiting for it, but finishes the upload
    /// (makes the image ACTIVE) only if `attendance` confirms, after the
    /// last byte, that the request's stream ended cleanly; a request that
    /// goes away before stops the upload at once. Either way a failed
    /// upload leaves the image QUEUED and keeps none of its bytes.
    pub async fn upload<S>(
        &self,
        caller: Caller,
        id: Uuid,
        data: S,
        attendance: Attendance,
    ) -> Result<Image>
    where
        S: Stream<Item = Result<Bytes>> + Send + Unpin + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move { this.upload_task(caller, id, data, attendance).await })
            .await
            .map_err(join_err)?
    }

    async fn upload_task<S>(
        &self,
        caller: Caller,
        id: Uuid,
        data: S,
        attendance: Attendance,
    ) -> Result<Image>
    where
        S: Stream<Item = Result<Bytes>> + Send + Unpin,
    {
        policy::reader(&caller)?;
        let seen = self.visible_image(&caller, id).await?;
        policy::modify(&caller, &seen)?;
        let (image, limits, used) = {
            let c = self.inner.pool.get().await?;
            let image = repo::transition(&c, id, &[Status::Queued], Status::Saving)
                .await?
                .ok_or_else(|| {
                    Error::precondition(format!(
                        "the image is {}; only a queued image takes data",
                        seen.status
                    ))
                })?;
            let limits = self.limits(&c, &image.owner).await?;
            let (used, _) = repo::usage(&c, &image.owner).await?;
            (image, limits, used)
        };
        tracing::info!(image = %id, owner = %image.owner, "upload started");
        let outcome = match self.receive(&image, limits, used, data, &attendance).await {
            Ok(written) => self.complete(&image, limits, written).await,
            Err(f) => Err(f),
        };
        let c = self.inner.pool.get().await?;
        match outcome {
            Ok(done) => {
                metrics::counter!("image_upload_bytes_total").increment(done.size.unwrap_or(0));
                tracing::info!(image = %id, size = ?done.size, sha256 = %done.sha256, "image active");
                Ok(done)
            }
            Err(Failed::Kill(why)) => {
                repo::transition(&c, id, &[Status::Saving], Status::Killed).await?;
                tracing::warn!(image = %id, reason = %why, "upload rejected: image killed");
                Err(Error::invalid(
                    "data",
                    format!("refused, the image is killed: {why}"),
                ))
            }
            Err(Failed::Requeue(e)) => {
                repo::transition(&c, id, &[Status::Saving], Status::Queued).await?;
                tracing::warn!(image = %id, error = %e, "upload failed: image queued again");
                Err(e)
            }
        }
    }

    /// Receives the stream into a temporary store file, checking size,
    /// format and quota as the bytes come.
    async fn receive<S>(
        &self,
        image: &Image,
        limits: Limits,
        used: u64,
        mut data: S,
        attendance: &Attendance,
    ) -> Result<Written, Failed>
    where
        S: Stream<Item = Result<Bytes>> + Send + Unpin,
    {
        // Two store threads, each fed through a bounded channel: one writes,
        // one hashes, so that neither waits for the other. Both end when
        // their channel closes.
        let (wtx, mut wrx) = mpsc::channel::<Bytes>(PIPELINE_DEPTH);
        let (htx, mut hrx) = mpsc::channel::<Bytes>(PIPELINE_DEPTH);
        let store = self.inner.store.clone();
        let id = image.id;
        let writer = tokio::task::spawn_blocking(move || -> Result<(Box<dyn StoreWriter>, u64)> {
            let mut writer = store.begin(id)?;
            let mut size = 0u64;
            while let Some(chunk) = wrx.blocking_recv() {
                writer.write_all(&chunk)?;
                size += chunk.len() as u64;
            }
            writer.flush()?;
            Ok((writer, size))
        });
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = hrx.blocking_recv() {
                hasher.update(&chunk);
            }
            hex::encode(hasher.finalize())
        });
        let result = self
            .pump(image, (limits, used), &mut data, attendance, wtx, htx)
            .await;
        // The senders are gone (pump took them): the store threads finish.
        let sha256 = hasher.await.map_err(join_err)?;
        let written = writer
            .await
            .map_err(join_err)?
            .map(|(writer, size)| Written {
                writer,
                size,
                sha256,
            });
        match (result, written) {
            (Ok(()), Ok(w)) => Ok(w),
            (Err(f), w) => {
                // Drop (and so remove) the partial file off the async threads.
                let _ = tokio::task::spawn_blocking(move || drop(w)).await;
                Err(f)
            }
            (Ok(()), Err(e)) => Err(Failed::Requeue(e)),
        }
    }

    async fn pump<S>(
        &self,
        image: &Image,
        (limits, used): (Limits, u64),
        data: &mut S,
        attendance: &Attendance,
        to_store: mpsc::Sender<Bytes>,
        to_hasher: mpsc::Sender<Bytes>,
    ) -> Result<(), Failed>
    where
        S: Stream<Item = Result<Bytes>> + Send + Unpin,
    {
        let idle = Duration::from_secs(self.inner.cfg.upload_idle_timeout_secs);
        let mut inspector = Inspector::new(image.disk_format, image.container_format);
        let mut inflight = InflightGuard {
            inner: self.inner.clone(),
            project: image.owner.clone(),
            bytes: 0,
        };
        let mut received = 0u64;
        loop {
            let next = tokio::select! {
                biased;
                next = tokio::time::timeout(idle, data.next()) => next.map_err(|_| {
                    Error::aborted(format!("no upload data for {} s", idle.as_secs()))
                })?,
                () = attendance.gone() => return Err(Failed::Requeue(stream_failed())),
            };
            let chunk = match next {
                // Only a clean end of the request's stream ends the data;
                // any other end leaves the image queued.
                None if attendance.confirm().await => break,
                None => return Err(Failed::Requeue(stream_failed())),
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Err(Failed::Requeue(e)),
            };
            if chunk.is_empty() {
                continue;
            }
            received += chunk.len() as u64;
            if let Some(expected) = image.expected_size
                && received > expected
            {
                return Err(Failed::Kill(format!(
                    "more than the declared {expected} bytes were sent"
                )));
            }
            let project_total = inflight.add(chunk.len() as u64);
            if used.saturating_add(project_total) > limits.max_bytes {
                return Err(Failed::Requeue(Error::exhausted(format!(
                    "the upload exceeds the project's quota of {} bytes ({used} stored)",
                    limits.max_bytes
                ))));
            }
            inspector.feed(&chunk).map_err(|r| Failed::Kill(r.0))?;
            // `Bytes` clones share the buffer: no copy.
            if to_hasher.send(chunk.clone()).await.is_err() || to_store.send(chunk).await.is_err() {
                // The store thread stopped: its error comes out of receive.
                return Ok(());
            }
        }
        inspector.finish().map_err(|r| Failed::Kill(r.0))?;
        if let Some(expected) = image.expected_size
            && received != expected
        {
            return Err(Failed::Kill(format!(
                "{received} bytes were sent, {expected} were declared"
            )));
        }
        Ok(())
    }

    /// Checks the checksum, makes the bytes durable and the image ACTIVE.
    async fn complete(&self, image: &Image, limits: Limits, w: Written) -> Result<Image, Failed> {
        let id = image.id;
        if let Some(expected) = image.expected_size
            && w.size != expected
        {
            return Err(Failed::Kill(format!(
                "{} bytes were stored, {expected} were declared",
                w.size
            )));
        }
        if !image.expected_sha256.is_empty()
            && !image.expected_sha256.eq_ignore_ascii_case(&w.sha256)
        {
            return Err(Failed::Kill(format!(
                "the data's sha256 is {}, {} was declared",
                w.sha256, image.expected_sha256
            )));
        }
        let (size, sha256) = (w.size, w.sha256.clone());
        tokio::task::spawn_blocking(move || w.writer.commit())
            .await
            .map_err(join_err)?
            .map_err(Error::from)?;
        // From here the file is in place: any failure must remove it.
        let result = async {
            let mut c = self.inner.pool.get().await?;
            let tx = c.transaction().await?;
            repo::lock_project(&tx, &image.owner).await?;
            let (used, _) = repo::usage(&tx, &image.owner).await?;
            if used.saturating_add(size) > limits.max_bytes {
                return Err(Error::exhausted(format!(
                    "an image of {size} bytes exceeds the project's quota of {} bytes ({used} stored)",
                    limits.max_bytes
                )));
            }
            let done = repo::finish_upload(&tx, id, size, &sha256)
                .await?
                .ok_or_else(|| Error::not_found("image", id))?;
            tx.commit().await?;
            Ok(done)
        }
        .await;
        if result.is_err() {
            let store = self.inner.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.delete(id)).await;
        }
        result.map_err(Failed::Requeue)
    }

    /// The bytes of an ACTIVE image (or a DEACTIVATED one, for an admin)
    /// from `offset`, at most `length` of them, in chunks of at most
    /// [`DOWNLOAD_CHUNK`]. Returns how many bytes will come, and the chunks.
    pub async fn download(
        &self,
        caller: &Caller,
        id: Uuid,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(u64, mpsc::Receiver<Result<Bytes>>)> {
        policy::reader(caller)?;
        let image = self.visible_image(caller, id).await?;
        match image.status {
            Status::Active => {}
            Status::Deactivated if caller.is_admin => {}
            Status::Deactivated => {
                return Err(Error::precondition(
                    "the image is deactivated; only an administrator may download it",
                ));
            }
            other => {
                return Err(Error::precondition(format!(
                    "the image has no data: it is {other}"
                )));
            }
        }
        let size = image.size.unwrap_or(0);
        if offset > size {
            return Err(Error::out_of_range(format!(
                "offset {offset} is past the end of the image ({size} bytes)"
            )));
        }
        let count = length.map_or(size - offset, |l| l.min(size - offset));
        let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || {
            let send_err = |e: Error| {
                let _ = tx.blocking_send(Err(e));
            };
            let mut reader = match store.open(id, offset) {
                Ok((r, stored)) if stored == size => r,
                Ok((_, stored)) => {
                    return send_err(Error::internal(format!(
                        "image {id} has {stored} bytes in the store, {size} recorded"
                    )));
                }
                Err(e) => return send_err(Error::internal(format!("image {id}: {e}"))),
            };
            let mut left = count;
            while left > 0 {
                let want = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(DOWNLOAD_CHUNK);
                let mut buf = vec![0u8; want];
                if let Err(e) = reader.read_exact(&mut buf) {
                    return send_err(Error::internal(format!("reading image {id}: {e}")));
                }
                left -= want as u64;
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return; // the client went away
                }
            }
        });
        metrics::counter!("image_download_bytes_total").increment(count);
        Ok((count, rx))
    }
}
