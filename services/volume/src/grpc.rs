//! The gRPC adapter: reads the caller from the sidecar's trusted headers,
//! validates every field of every request into the domain's types, calls
//! [`Volumes`], and maps the answer back. Nothing here decides anything.

use std::collections::{BTreeMap, HashMap};

use proto::volume::v1 as pb;
use runtime::error::Error;
use runtime::types::{Name, check_text, page_limit, parse_id, parse_opt_id};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::image::Credentials;
use crate::model::*;
use crate::policy::{self, Caller};
use crate::service::{MAX_METADATA, Volumes};

const MAX_DESCRIPTION: usize = 4096;
const MAX_METADATA_VALUE: usize = 255;
const MAX_PROJECT_ID: usize = 64;
const MAX_SERVER_ID: usize = 64;
const DEFAULT_LIMIT: u32 = 25;
const MAX_LIMIT: u32 = 1000;

type R<T> = Result<Response<T>, Status>;

#[derive(Clone)]
pub struct Api {
    pub volumes: Volumes,
}

// ------------------------------------------------------------- validation

fn caller<T>(r: &Request<T>) -> Result<Caller, Error> {
    let c = Caller::from_metadata(r.metadata());
    policy::authenticated(&c)?;
    Ok(c)
}

/// The caller: a verified user, or a compute agent on its certificate
/// alone (the attachment RPCs; the service decides what it may touch).
fn caller_or_agent<T>(r: &Request<T>, trust_domain: &str) -> Result<Caller, Error> {
    let c = Caller::from_metadata(r.metadata());
    policy::user_or_agent(&c, trust_domain)?;
    Ok(c)
}

/// The caller, and its `authorization` header to pass on to the image service.
fn credentials<T>(r: &Request<T>) -> Result<Credentials, Error> {
    Ok(Credentials {
        caller: caller(r)?,
        authorization: r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    })
}

fn metadata(m: HashMap<String, String>) -> Result<BTreeMap<String, String>, Error> {
    if m.len() > MAX_METADATA {
        return Err(Error::invalid(
            "metadata",
            format!("at most {MAX_METADATA} pairs"),
        ));
    }
    for (k, v) in &m {
        metadata_key(k)?;
        check_text("metadata", v, MAX_METADATA_VALUE)?;
    }
    Ok(m.into_iter().collect())
}

fn metadata_key(k: &str) -> Result<(), Error> {
    if k.trim().is_empty() {
        return Err(Error::invalid("metadata", "keys must not be empty"));
    }
    check_text("metadata", k, 255)
}

fn project(field: &'static str, s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() <= MAX_PROJECT_ID
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(Error::invalid(field, "is not a valid project id"))
    }
}

fn format(v: i32) -> Result<Option<Format>, Error> {
    match pb::VolumeFormat::try_from(v) {
        Ok(pb::VolumeFormat::Unspecified) => Ok(None),
        Ok(pb::VolumeFormat::Raw) => Ok(Some(Format::Raw)),
        Ok(pb::VolumeFormat::Qcow2) => Ok(Some(Format::Qcow2)),
        Err(_) => Err(Error::invalid("format", format!("unknown format {v}"))),
    }
}

fn volume_status(v: i32) -> Result<Option<VolumeStatus>, Error> {
    use pb::VolumeStatus as P;
    Ok(Some(match P::try_from(v) {
        Ok(P::Unspecified) => return Ok(None),
        Ok(P::Creating) => VolumeStatus::Creating,
        Ok(P::Available) => VolumeStatus::Available,
        Ok(P::Reserved) => VolumeStatus::Reserved,
        Ok(P::Attaching) => VolumeStatus::Attaching,
        Ok(P::InUse) => VolumeStatus::InUse,
        Ok(P::Detaching) => VolumeStatus::Detaching,
        Ok(P::Extending) => VolumeStatus::Extending,
        Ok(P::Deleting) => VolumeStatus::Deleting,
        Ok(P::Error) => VolumeStatus::Error,
        Ok(P::ErrorDeleting) => VolumeStatus::ErrorDeleting,
        Err(_) => return Err(Error::invalid("status", format!("unknown status {v}"))),
    }))
}

fn snapshot_status(v: i32) -> Result<Option<SnapshotStatus>, Error> {
    use pb::SnapshotStatus as P;
    Ok(Some(match P::try_from(v) {
        Ok(P::Unspecified) => return Ok(None),
        Ok(P::Creating) => SnapshotStatus::Creating,
        Ok(P::Available) => SnapshotStatus::Available,
        Ok(P::Deleting) => SnapshotStatus::Deleting,
        Ok(P::Error) => SnapshotStatus::Error,
        Ok(P::ErrorDeleting) => SnapshotStatus::ErrorDeleting,
        Err(_) => return Err(Error::invalid("status", format!("unknown status {v}"))),
    }))
}

fn connector(c: pb::HostConnector) -> Result<Connector, Error> {
    if c.host.is_empty() {
        return Err(Error::invalid("connector.host", "is required"));
    }
    let ok = c.host.len() <= 253
        && c.host
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if !ok {
        return Err(Error::invalid(
            "connector.host",
            "must be a host name (letters, digits, - _ .)",
        ));
    }
    if c.transports.is_empty() {
        return Err(Error::invalid(
            "connector.transports",
            "must name at least one transport",
        ));
    }
    let transports = c
        .transports
        .iter()
        .map(|t| match pb::Transport::try_from(*t) {
            Ok(pb::Transport::LocalFile) => Ok(Transport::LocalFile),
            Ok(pb::Transport::Nbd) => Ok(Transport::Nbd),
            _ => Err(Error::invalid(
                "connector.transports",
                format!("unknown transport {t}"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Connector {
        host: c.host,
        transports,
    })
}

fn server_id(s: &str) -> Result<String, Error> {
    if s.is_empty() {
        return Err(Error::invalid("server_id", "is required"));
    }
    check_text("server_id", s, MAX_SERVER_ID)?;
    Ok(s.to_string())
}

fn mountpoint(s: &str) -> Result<String, Error> {
    check_text("mountpoint", s, 255)?;
    Ok(s.to_string())
}

fn size(field: &'static str, v: u64) -> Result<u64, Error> {
    if v > i64::MAX as u64 {
        Err(Error::invalid(field, "is too large"))
    } else {
        Ok(v)
    }
}

impl TryFrom<pb::CreateVolumeRequest> for NewVolume {
    type Error = Error;

    fn try_from(m: pb::CreateVolumeRequest) -> Result<Self, Error> {
        let image = parse_opt_id("image_id", &m.image_id)?;
        let snapshot = parse_opt_id("snapshot_id", &m.snapshot_id)?;
        let source = match (image, snapshot) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "image_id",
                    "give an image or a snapshot, not both",
                ));
            }
            (Some(i), None) => Source::Image(i),
            (None, Some(s)) => Source::Snapshot(s),
            (None, None) => Source::Empty,
        };
        check_text("description", &m.description, MAX_DESCRIPTION)?;
        Ok(NewVolume {
            size_gb: match m.size_gb {
                0 => None,
                n => Some(size("size_gb", n)?),
            },
            name: Name::parse_opt("name", &m.name)?,
            description: m.description,
            metadata: metadata(m.metadata)?,
            format: format(m.format)?,
            source,
            bootable: m.bootable,
            wait: m.wait,
        })
    }
}

// ----------------------------------------------------------- conversions

fn ts(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn format_pb(f: Format) -> pb::VolumeFormat {
    match f {
        Format::Raw => pb::VolumeFormat::Raw,
        Format::Qcow2 => pb::VolumeFormat::Qcow2,
    }
}

fn volume_pb(v: Volume) -> pb::Volume {
    use pb::VolumeStatus as P;
    pb::Volume {
        id: v.id.to_string(),
        name: v.name,
        description: v.description,
        project_id: v.project_id,
        user_id: v.user_id,
        size_gb: v.size_gb,
        status: match v.status {
            VolumeStatus::Creating => P::Creating,
            VolumeStatus::Available => P::Available,
            VolumeStatus::Reserved => P::Reserved,
            VolumeStatus::Attaching => P::Attaching,
            VolumeStatus::InUse => P::InUse,
            VolumeStatus::Detaching => P::Detaching,
            VolumeStatus::Extending => P::Extending,
            VolumeStatus::Deleting => P::Deleting,
            VolumeStatus::Error => P::Error,
            VolumeStatus::ErrorDeleting => P::ErrorDeleting,
        } as i32,
        format: format_pb(v.format) as i32,
        bootable: v.bootable,
        metadata: v.metadata.into_iter().collect(),
        source_image_id: v.source_image_id.map(|i| i.to_string()).unwrap_or_default(),
        source_snapshot_id: v
            .source_snapshot_id
            .map(|i| i.to_string())
            .unwrap_or_default(),
        attachment_id: v.attachment_id.map(|i| i.to_string()).unwrap_or_default(),
        status_reason: v.status_reason,
        created_at: Some(ts(v.created_at)),
        updated_at: Some(ts(v.updated_at)),
    }
}

fn snapshot_pb(s: Snapshot) -> pb::Snapshot {
    use pb::SnapshotStatus as P;
    pb::Snapshot {
        id: s.id.to_string(),
        volume_id: s.volume_id.to_string(),
        name: s.name,
        description: s.description,
        project_id: s.project_id,
        size_gb: s.size_gb,
        status: match s.status {
            SnapshotStatus::Creating => P::Creating,
            SnapshotStatus::Available => P::Available,
            SnapshotStatus::Deleting => P::Deleting,
            SnapshotStatus::Error => P::Error,
            SnapshotStatus::ErrorDeleting => P::ErrorDeleting,
        } as i32,
        metadata: s.metadata.into_iter().collect(),
        status_reason: s.status_reason,
        created_at: Some(ts(s.created_at)),
        updated_at: Some(ts(s.updated_at)),
    }
}

fn transport_pb(t: Transport) -> pb::Transport {
    match t {
        Transport::LocalFile => pb::Transport::LocalFile,
        Transport::Nbd => pb::Transport::Nbd,
    }
}

fn attachment_pb(a: Attachment) -> pb::Attachment {
    use pb::AttachmentStatus as P;
    pb::Attachment {
        id: a.id.to_string(),
        volume_id: a.volume_id.to_string(),
        server_id: a.server_id,
        status: match a.status {
            AttachmentStatus::Reserved => P::Reserved,
            AttachmentStatus::Attaching => P::Attaching,
            AttachmentStatus::Attached => P::Attached,
            AttachmentStatus::Detaching => P::Detaching,
        } as i32,
        connector: a.connector.map(|c| pb::HostConnector {
            host: c.host,
            transports: c
                .transports
                .into_iter()
                .map(|t| transport_pb(t) as i32)
                .collect(),
        }),
        connection_info: a.connection_info.map(|i| match i {
            ConnectionInfo::LocalFile { path, format } => pb::ConnectionInfo {
                transport: pb::Transport::LocalFile as i32,
                format: format_pb(format) as i32,
                target: Some(pb::connection_info::Target::LocalFile(pb::LocalFile {
                    path,
                })),
            },
            ConnectionInfo::Nbd {
                host,
                port,
                export_name,
                format,
                tls,
            } => pb::ConnectionInfo {
                transport: pb::Transport::Nbd as i32,
                format: format_pb(format) as i32,
                target: Some(pb::connection_info::Target::Nbd(pb::NbdExport {
                    host,
                    port: u32::from(port),
                    export_name,
                    tls,
                })),
            },
        }),
        mountpoint: a.mountpoint,
        project_id: a.project_id,
        created_at: Some(ts(a.created_at)),
        updated_at: Some(ts(a.updated_at)),
    }
}

fn quota_pb(q: Quota) -> pb::Quota {
    pb::Quota {
        project_id: q.project_id,
        max_volumes: q.limits.volumes,
        max_gigabytes: q.limits.gigabytes,
        max_snapshots: q.limits.snapshots,
        used_volumes: q.used.volumes,
        used_gigabytes: q.used.gigabytes,
        used_snapshots: q.used.snapshots,
    }
}

fn next(marker: Option<uuid::Uuid>) -> String {
    marker.map(|m| m.to_string()).unwrap_or_default()
}

// ------------------------------------------------------------------ API

#[tonic::async_trait]
impl pb::volumes_server::Volumes for Api {
    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> R<pb::Volume> {
        let creds = credentials(&r)?;
        let new = NewVolume::try_from(r.into_inner())?;
        let v = self.volumes.create(&creds.caller, &creds, new).await?;
        Ok(Response::new(volume_pb(v)))
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(volume_pb(self.volumes.get(&c, id).await?)))
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> R<pb::ListVolumesResponse> {
        let c = caller(&r)?;
        let m = r.into_inner();
        let filter = VolumeFilter {
            name: m
                .name
                .map(|n| check_text("name", &n, runtime::types::MAX_NAME).map(|()| n))
                .transpose()?,
            status: volume_status(m.status)?,
            bootable: m.bootable,
            project_id: if m.project_id.is_empty() {
                None
            } else {
                Some(project("project_id", &m.project_id)?)
            },
            marker: parse_opt_id("marker", &m.marker)?,
            limit: page_limit("limit", m.limit, DEFAULT_LIMIT, MAX_LIMIT)?,
        };
        let (volumes, marker) = self.volumes.list(&c, filter).await?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: volumes.into_iter().map(volume_pb).collect(),
            next_marker: next(marker),
        }))
    }

    async fn update_volume(&self, r: Request<pb::UpdateVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&r)?;
        let m = r.into_inner();
        let id = parse_id("id", &m.id)?;
        for k in &m.remove_metadata {
            metadata_key(k)?;
        }
        if let Some(d) = &m.description {
            check_text("description", d, MAX_DESCRIPTION)?;
        }
        let u = VolumeUpdate {
            name: m.name.map(|n| Name::parse_opt("name", &n)).transpose()?,
            description: m.description,
            bootable: m.bootable,
            set_metadata: metadata(m.set_metadata)?,
            remove_metadata: m.remove_metadata,
        };
        Ok(Response::new(volume_pb(
            self.volumes.update(&c, id, u).await?,
        )))
    }

    async fn extend_volume(&self, r: Request<pb::ExtendVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&r)?;
        let m = r.get_ref();
        let id = parse_id("id", &m.id)?;
        if m.new_size_gb == 0 {
            return Err(Error::invalid("new_size_gb", "is required").into());
        }
        let size = size("new_size_gb", m.new_size_gb)?;
        Ok(Response::new(volume_pb(
            self.volumes.extend(&c, id, size).await?,
        )))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> R<pb::DeleteVolumeResponse> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        self.volumes.delete(&c, id).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn create_snapshot(&self, r: Request<pb::CreateSnapshotRequest>) -> R<pb::Snapshot> {
        let c = caller(&r)?;
        let m = r.into_inner();
        check_text("description", &m.description, MAX_DESCRIPTION)?;
        let new = NewSnapshot {
            volume_id: parse_id("volume_id", &m.volume_id)?,
            name: Name::parse_opt("name", &m.name)?,
            description: m.description,
            metadata: metadata(m.metadata)?,
            force: m.force,
            wait: m.wait,
        };
        Ok(Response::new(snapshot_pb(
            self.volumes.create_snapshot(&c, new).await?,
        )))
    }

    async fn get_snapshot(&self, r: Request<pb::GetSnapshotRequest>) -> R<pb::Snapshot> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(snapshot_pb(
            self.volumes.get_snapshot(&c, id).await?,
        )))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> R<pb::ListSnapshotsResponse> {
        let c = caller(&r)?;
        let m = r.into_inner();
        let filter = SnapshotFilter {
            volume_id: parse_opt_id("volume_id", &m.volume_id)?,
            status: snapshot_status(m.status)?,
            marker: parse_opt_id("marker", &m.marker)?,
            limit: page_limit("limit", m.limit, DEFAULT_LIMIT, MAX_LIMIT)?,
        };
        let (snaps, marker) = self.volumes.list_snapshots(&c, filter).await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.into_iter().map(snapshot_pb).collect(),
            next_marker: next(marker),
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> R<pb::DeleteSnapshotResponse> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        self.volumes.delete_snapshot(&c, id).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn create_attachment(
        &self,
        r: Request<pb::CreateAttachmentRequest>,
    ) -> R<pb::Attachment> {
        let c = caller_or_agent(&r, &self.volumes.config().trust_domain)?;
        let m = r.into_inner();
        let volume_id = parse_id("volume_id", &m.volume_id)?;
        let server = server_id(&m.server_id)?;
        let conn = m.connector.map(connector).transpose()?;
        Ok(Response::new(attachment_pb(
            self.volumes
                .create_attachment(&c, volume_id, server, conn)
                .await?,
        )))
    }

    async fn update_attachment(
        &self,
        r: Request<pb::UpdateAttachmentRequest>,
    ) -> R<pb::Attachment> {
        let c = caller_or_agent(&r, &self.volumes.config().trust_domain)?;
        let m = r.into_inner();
        let id = parse_id("id", &m.id)?;
        let conn = connector(
            m.connector
                .ok_or_else(|| Error::invalid("connector", "is required"))?,
        )?;
        Ok(Response::new(attachment_pb(
            self.volumes.update_attachment(&c, id, conn).await?,
        )))
    }

    async fn complete_attachment(
        &self,
        r: Request<pb::CompleteAttachmentRequest>,
    ) -> R<pb::Attachment> {
        let c = caller_or_agent(&r, &self.volumes.config().trust_domain)?;
        let m = r.get_ref();
        let id = parse_id("id", &m.id)?;
        let mp = mountpoint(&m.mountpoint)?;
        Ok(Response::new(attachment_pb(
            self.volumes.complete_attachment(&c, id, mp).await?,
        )))
    }

    async fn get_attachment(&self, r: Request<pb::GetAttachmentRequest>) -> R<pb::Attachment> {
        let c = caller_or_agent(&r, &self.volumes.config().trust_domain)?;
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(attachment_pb(
            self.volumes.get_attachment(&c, id).await?,
        )))
    }

    async fn list_attachments(
        &self,
        r: Request<pb::ListAttachmentsRequest>,
    ) -> R<pb::ListAttachmentsResponse> {
        let c = caller_or_agent(&r, &self.volumes.config().trust_domain)?;
        let m = r.into_inner();
        let volume_id = parse_opt_id("volume_id", &m.volume_id)?;
        let server = if m.server_id.is_empty() {
            None
        } else {
            Some(server_id(&m.server_id)?)
        };
        let list = self.volumes.list_attachments(&c, volume_id, server).await?;
        Ok(Response::new(pb::ListAttachmentsResponse {
            attachments: list.into_iter().map(attachment_pb).collect(),
        }))
    }

    async fn delete_attachment(
        &self,
        r: Request<pb::DeleteAttachmentRequest>,
    ) -> R<pb::DeleteAttachmentResponse> {
        let c = caller_or_agent(&r, &self.volumes.config().trust_domain)?;
        let id = parse_id("id", &r.get_ref().id)?;
        self.volumes.delete_attachment(&c, id).await?;
        Ok(Response::new(pb::DeleteAttachmentResponse {}))
    }

    async fn get_quota(&self, r: Request<pb::GetQuotaRequest>) -> R<pb::Quota> {
        let c = caller(&r)?;
        let p = &r.get_ref().project_id;
        let p = if p.is_empty() {
            None
        } else {
            Some(project("project_id", p)?)
        };
        Ok(Response::new(quota_pb(self.volumes.quota(&c, p).await?)))
    }

    async fn set_quota(&self, r: Request<pb::SetQuotaRequest>) -> R<pb::Quota> {
        let c = caller(&r)?;
        let m = r.get_ref();
        let p = project("project_id", &m.project_id)?;
        let limits = Limits {
            volumes: size("max_volumes", m.max_volumes)?,
            gigabytes: size("max_gigabytes", m.max_gigabytes)?,
            snapshots: size("max_snapshots", m.max_snapshots)?,
        };
        Ok(Response::new(quota_pb(
            self.volumes.set_quota(&c, p, limits).await?,
        )))
    }
}
