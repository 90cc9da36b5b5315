//! The gRPC adapter: reads the caller from the sidecar's trusted headers,
//! validates every field of every request, turns wire types into domain
//! types, calls [`Images`], and maps the answer back. Nothing here decides
//! anything; the domain code does.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use proto::image::v1 as pb;
use time::OffsetDateTime;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Bytes, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use runtime::error::{Error, Result};
use runtime::types::{MAX_NAME, Name, check_text, page_limit, parse_id, parse_opt_id, short};

use crate::model::*;
use crate::policy::Caller;
use crate::service::Images;

pub const MAX_PROPERTIES: usize = 128;
pub const MAX_TAGS: usize = 128;
const MAX_PROPERTY_VALUE: usize = 4096;
const DEFAULT_LIMIT: u32 = 25;
const MAX_LIMIT: u32 = 1000;
/// Properties that name other images must hold image ids.
const IMAGE_REF_PROPERTIES: [&str; 2] = ["kernel_id", "ramdisk_id"];

type R<T> = std::result::Result<Response<T>, Status>;

#[derive(Clone)]
pub struct Api {
    pub images: Images,
}

// ------------------------------------------------------- request bodies

/// Whether a request's body ended with a transport error, as seen below
/// tonic: tonic's `Streaming` reports a client's RST_STREAM(CANCEL) as the
/// clean end of a client stream, which must never finish an upload.
#[derive(Debug, Clone, Default)]
pub struct BodyEnd(Arc<AtomicBool>);

impl BodyEnd {
    /// No transport error so far.
    pub fn clean(&self) -> bool {
        !self.0.load(Ordering::Acquire)
    }
}

/// A request body that records, in its [`BodyEnd`], an error from below.
struct Watched {
    inner: tonic::body::Body,
    end: BodyEnd,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.end.0.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a gRPC service so that every request carries a [`BodyEnd`] in its
/// extensions, kept by a watcher around its body.
#[derive(Debug, Clone)]
pub struct WatchBodies<S>(pub S);

impl<S: NamedService> NamedService for WatchBodies<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for WatchBodies<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> S::Future {
        let end = BodyEnd::default();
        let (mut parts, inner) = req.into_parts();
        parts.extensions.insert(end.clone());
        let body = tonic::body::Body::new(Watched { inner, end });
        self.0.call(http::Request::from_parts(parts, body))
    }
}

// ------------------------------------------------------------- validation

fn caller<T>(r: &Request<T>) -> Result<Caller> {
    let c = Caller::from_metadata(r.metadata());
    crate::policy::authenticated(&c)?;
    Ok(c)
}

/// A display name: may be empty (Glance allows it); otherwise a [`Name`]
/// (at most 255 characters, no control characters, not shaped like an id).
fn display_name(field: &'static str, s: &str) -> Result<String> {
    // Names are one line: no newline or tab either (free text allows them).
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(Name::parse_opt(field, s)?
        .map(Name::into_string)
        .unwrap_or_default())
}

/// A project id (identity makes them UUIDs), in the simple form identity
/// uses, so that one project is always spelled the same way.
fn project(field: &'static str, s: &str) -> Result<String> {
    Ok(parse_id(field, s)?.simple().to_string())
}

fn property_key(field: &'static str, k: &str) -> Result<()> {
    let ok = !k.is_empty()
        && k.len() <= MAX_NAME
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "property name {:?} must be 1 to {MAX_NAME} of A-Z a-z 0-9 _ - . :",
                short(k)
            ),
        ))
    }
}

fn properties(field: &'static str, p: HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if p.len() > MAX_PROPERTIES {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_PROPERTIES} properties"),
        ));
    }
    for (k, v) in &p {
        property_key(field, k)?;
        if v.len() > MAX_PROPERTY_VALUE || v.chars().any(char::is_control) {
            return Err(Error::invalid(
                field,
                format!(
                    "property {k}: the value must be at most {MAX_PROPERTY_VALUE} bytes, no control characters"
                ),
            ));
        }
        if IMAGE_REF_PROPERTIES.contains(&k.as_str()) && Uuid::parse_str(v).is_err() {
            return Err(Error::invalid(
                field,
                format!("property {k} must be an image id"),
            ));
        }
    }
    Ok(p.into_iter().collect())
}

fn tags(t: Vec<String>) -> Result<Vec<String>> {
    if t.len() > MAX_TAGS {
        return Err(Error::invalid("tags", format!("at most {MAX_TAGS} tags")));
    }
    let mut out: Vec<String> = Vec::with_capacity(t.len());
    for tag in t {
        if tag.trim().is_empty() {
            return Err(Error::invalid("tags", "a tag must not be blank"));
        }
        check_text("tags", &tag, MAX_NAME)?;
        if !out.contains(&tag) {
            out.push(tag);
        }
    }
    Ok(out)
}

fn sha256(field: &'static str, s: &str) -> Result<String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(Error::invalid(field, "must be 64 hex digits"))
    }
}

fn unknown(field: &'static str, v: i32) -> Error {
    Error::invalid(field, format!("unknown value {v}"))
}

fn disk_format(v: i32) -> Result<DiskFormat> {
    match pb::DiskFormat::try_from(v) {
        Ok(pb::DiskFormat::Raw) => Ok(DiskFormat::Raw),
        Ok(pb::DiskFormat::Qcow2) => Ok(DiskFormat::Qcow2),
        Ok(pb::DiskFormat::Iso) => Ok(DiskFormat::Iso),
        Ok(pb::DiskFormat::Aki) => Ok(DiskFormat::Aki),
        Ok(pb::DiskFormat::Ari) => Ok(DiskFormat::Ari),
        Ok(pb::DiskFormat::Unspecified) => Err(Error::invalid("disk_format", "is required")),
        Err(_) => Err(unknown("disk_format", v)),
    }
}

fn container_format(v: i32) -> Result<ContainerFormat> {
    match pb::ContainerFormat::try_from(v) {
        Ok(pb::ContainerFormat::Bare) => Ok(ContainerFormat::Bare),
        Ok(pb::ContainerFormat::Ovf) => Ok(ContainerFormat::Ovf),
        Ok(pb::ContainerFormat::Unspecified) => {
            Err(Error::invalid("container_format", "is required"))
        }
        Err(_) => Err(unknown("container_format", v)),
    }
}

fn visibility(v: i32) -> Result<Option<Visibility>> {
    match pb::Visibility::try_from(v) {
        Ok(pb::Visibility::Unspecified) => Ok(None),
        Ok(pb::Visibility::Private) => Ok(Some(Visibility::Private)),
        Ok(pb::Visibility::Shared) => Ok(Some(Visibility::Shared)),
        Ok(pb::Visibility::Community) => Ok(Some(Visibility::Community)),
        Ok(pb::Visibility::Public) => Ok(Some(Visibility::Public)),
        Err(_) => Err(unknown("visibility", v)),
    }
}

fn status(v: i32) -> Result<Option<Status_>> {
    match pb::Status::try_from(v) {
        Ok(pb::Status::Unspecified) => Ok(None),
        Ok(pb::Status::Queued) => Ok(Some(Status_::Queued)),
        Ok(pb::Status::Saving) => Ok(Some(Status_::Saving)),
        Ok(pb::Status::Active) => Ok(Some(Status_::Active)),
        Ok(pb::Status::Killed) => Ok(Some(Status_::Killed)),
        Ok(pb::Status::Deactivated) => Ok(Some(Status_::Deactivated)),
        Err(_) => Err(unknown("status", v)),
    }
}

use crate::model::Status as Status_;

fn member_status(v: i32) -> Result<Option<MemberStatus>> {
    match pb::MemberStatus::try_from(v) {
        Ok(pb::MemberStatus::Unspecified) => Ok(None),
        Ok(pb::MemberStatus::Pending) => Ok(Some(MemberStatus::Pending)),
        Ok(pb::MemberStatus::Accepted) => Ok(Some(MemberStatus::Accepted)),
        Ok(pb::MemberStatus::Rejected) => Ok(Some(MemberStatus::Rejected)),
        Err(_) => Err(unknown("member_status", v)),
    }
}

fn sort_key(v: i32) -> Result<SortKey> {
    match pb::SortKey::try_from(v) {
        Ok(pb::SortKey::Unspecified | pb::SortKey::CreatedAt) => Ok(SortKey::CreatedAt),
        Ok(pb::SortKey::UpdatedAt) => Ok(SortKey::UpdatedAt),
        Ok(pb::SortKey::Name) => Ok(SortKey::Name),
        Ok(pb::SortKey::Size) => Ok(SortKey::Size),
        Ok(pb::SortKey::Status) => Ok(SortKey::Status),
        Err(_) => Err(unknown("sort_key", v)),
    }
}

fn min_value(field: &'static str, v: u32) -> Result<u32> {
    if v > i32::MAX as u32 {
        Err(Error::invalid(field, "is too large"))
    } else {
        Ok(v)
    }
}

fn size_value(field: &'static str, v: u64) -> Result<u64> {
    if v > i64::MAX as u64 {
        Err(Error::invalid(field, "is too large"))
    } else {
        Ok(v)
    }
}

impl TryFrom<pb::CreateImageRequest> for NewImage {
    type Error = Error;

    fn try_from(m: pb::CreateImageRequest) -> Result<Self> {
        Ok(NewImage {
            name: display_name("name", &m.name)?,
            disk_format: disk_format(m.disk_format)?,
            container_format: container_format(m.container_format)?,
            visibility: visibility(m.visibility)?.unwrap_or(Visibility::Private),
            min_disk: min_value("min_disk", m.min_disk)?,
            min_ram: min_value("min_ram", m.min_ram)?,
            protected: m.protected,
            properties: properties("properties", m.properties)?,
            tags: tags(m.tags)?,
            expected_size: m
                .expected_size
                .map(|s| size_value("expected_size", s))
                .transpose()?,
            expected_sha256: sha256("expected_sha256", &m.expected_sha256)?,
        })
    }
}

impl TryFrom<pb::ListImagesRequest> for ListFilter {
    type Error = Error;

    fn try_from(m: pb::ListImagesRequest) -> Result<Self> {
        Ok(ListFilter {
            name: m
                .name
                .as_deref()
                .map(|n| display_name("name", n))
                .transpose()?,
            status: status(m.status)?,
            visibility: visibility(m.visibility)?,
            owner: m
                .owner
                .as_deref()
                .map(|o| project("owner", o))
                .transpose()?,
            tags: tags(m.tags)?,
            properties: properties("properties", m.properties)?,
            member_status: member_status(m.member_status)?.unwrap_or(MemberStatus::Accepted),
            sort_key: sort_key(m.sort_key)?,
            ascending: m.ascending,
            marker: parse_opt_id("marker", &m.marker)?,
            limit: page_limit("limit", m.limit, DEFAULT_LIMIT, MAX_LIMIT)?,
        })
    }
}

/// `UpdateImage`: the image and what changes.
struct UpdateImage(Uuid, ImageUpdate);

impl TryFrom<pb::UpdateImageRequest> for UpdateImage {
    type Error = Error;

    fn try_from(m: pb::UpdateImageRequest) -> Result<Self> {
        let id = parse_id("id", &m.id)?;
        for k in &m.remove_properties {
            property_key("remove_properties", k)?;
        }
        Ok(UpdateImage(
            id,
            ImageUpdate {
                name: m
                    .name
                    .as_deref()
                    .map(|n| display_name("name", n))
                    .transpose()?,
                set_properties: properties("set_properties", m.set_properties)?,
                remove_properties: m.remove_properties,
                tags: m.tags.map(|t| tags(t.tags)).transpose()?,
                visibility: visibility(m.visibility)?,
                protected: m.protected,
                min_disk: m.min_disk.map(|v| min_value("min_disk", v)).transpose()?,
                min_ram: m.min_ram.map(|v| min_value("min_ram", v)).transpose()?,
            },
        ))
    }
}

/// An image and a member project, as the member RPCs name them.
struct MemberRef(Uuid, String);

impl MemberRef {
    fn parse(image_id: &str, member_id: &str) -> Result<Self> {
        Ok(MemberRef(
            parse_id("image_id", image_id)?,
            project("member_id", member_id)?,
        ))
    }
}

// ----------------------------------------------------------- conversions

fn ts(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn image_pb(i: Image) -> pb::Image {
    pb::Image {
        id: i.id.to_string(),
        name: i.name,
        status: match i.status {
            Status_::Queued => pb::Status::Queued,
            Status_::Saving => pb::Status::Saving,
            Status_::Active => pb::Status::Active,
            Status_::Killed => pb::Status::Killed,
            Status_::Deactivated => pb::Status::Deactivated,
        } as i32,
        disk_format: match i.disk_format {
            DiskFormat::Raw => pb::DiskFormat::Raw,
            DiskFormat::Qcow2 => pb::DiskFormat::Qcow2,
            DiskFormat::Iso => pb::DiskFormat::Iso,
            DiskFormat::Aki => pb::DiskFormat::Aki,
            DiskFormat::Ari => pb::DiskFormat::Ari,
        } as i32,
        container_format: match i.container_format {
            ContainerFormat::Bare => pb::ContainerFormat::Bare,
            ContainerFormat::Ovf => pb::ContainerFormat::Ovf,
        } as i32,
        visibility: visibility_pb(i.visibility) as i32,
        owner: i.owner,
        min_disk: i.min_disk,
        min_ram: i.min_ram,
        protected: i.protected,
        properties: i.properties.into_iter().collect(),
        tags: i.tags,
        size: i.size,
        sha256: i.sha256,
        expected_size: i.expected_size,
        expected_sha256: i.expected_sha256,
        created_at: Some(ts(i.created_at)),
        updated_at: Some(ts(i.updated_at)),
    }
}

fn visibility_pb(v: Visibility) -> pb::Visibility {
    match v {
        Visibility::Private => pb::Visibility::Private,
        Visibility::Shared => pb::Visibility::Shared,
        Visibility::Community => pb::Visibility::Community,
        Visibility::Public => pb::Visibility::Public,
    }
}

fn member_pb(m: Member) -> pb::Member {
    pb::Member {
        image_id: m.image_id.to_string(),
        member_id: m.member,
        status: match m.status {
            MemberStatus::Pending => pb::MemberStatus::Pending,
            MemberStatus::Accepted => pb::MemberStatus::Accepted,
            MemberStatus::Rejected => pb::MemberStatus::Rejected,
        } as i32,
        created_at: Some(ts(m.created_at)),
        updated_at: Some(ts(m.updated_at)),
    }
}

fn quota_pb(q: Quota) -> pb::Quota {
    pb::Quota {
        project_id: q.project_id,
        max_bytes: q.limits.max_bytes,
        max_images: q.limits.max_images,
        used_bytes: q.used_bytes,
        used_images: q.used_images,
    }
}

// ------------------------------------------------------------------ API

type DownloadStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::images_server::Images for Api {
    async fn create_image(&self, r: Request<pb::CreateImageRequest>) -> R<pb::Image> {
        let c = caller(&r)?;
        let new = NewImage::try_from(r.into_inner())?;
        Ok(Response::new(image_pb(self.images.create(&c, new).await?)))
    }

    async fn upload(&self, r: Request<Streaming<pb::UploadRequest>>) -> R<pb::Image> {
        let c = caller(&r)?;
        let body = r.extensions().get::<BodyEnd>().cloned().unwrap_or_default();
        let mut stream = r.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Error::invalid(
                "image_id",
                "an upload needs at least one message, naming the image",
            )
        })?;
        let image_id = parse_id("image_id", &first.image_id)?;
        let expected = first.image_id.clone();
        let first_data = futures_util::stream::once(async move { Ok(first.data) });
        let rest = stream.map(move |m| match m {
            Ok(m) if m.image_id.is_empty() || m.image_id == expected => Ok(m.data),
            Ok(_) => Err(Error::aborted(
                "every message of an upload must name the same image",
            )),
            // The client reset the stream or the connection died.
            Err(s) => Err(Error::aborted(format!(
                "the upload stream failed: {}",
                s.message()
            ))),
        });
        let data = Box::pin(first_data.chain(rest));
        let (attendance, attendant) = crate::service::attendance();
        let upload = self.images.upload(c, image_id, data, attendance);
        let image = attendant.attend(upload, || body.clean()).await?;
        Ok(Response::new(image_pb(image)))
    }

    type DownloadStream = DownloadStream;

    async fn download(&self, r: Request<pb::DownloadRequest>) -> R<Self::DownloadStream> {
        let c = caller(&r)?;
        let m = r.into_inner();
        let image_id = parse_id("image_id", &m.image_id)?;
        let (_, rx) = self
            .images
            .download(&c, image_id, m.offset, m.length)
            .await?;
        let stream = ReceiverStream::new(rx).map(|chunk| {
            chunk
                .map(|data| pb::DownloadResponse { data })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_image(&self, r: Request<pb::GetImageRequest>) -> R<pb::Image> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(image_pb(self.images.get(&c, id).await?)))
    }

    async fn list_images(&self, r: Request<pb::ListImagesRequest>) -> R<pb::ListImagesResponse> {
        let c = caller(&r)?;
        let filter = ListFilter::try_from(r.into_inner())?;
        let (images, next) = self.images.list(&c, filter).await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.into_iter().map(image_pb).collect(),
            next_marker: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn update_image(&self, r: Request<pb::UpdateImageRequest>) -> R<pb::Image> {
        let c = caller(&r)?;
        let UpdateImage(id, update) = UpdateImage::try_from(r.into_inner())?;
        Ok(Response::new(image_pb(
            self.images.update(&c, id, update).await?,
        )))
    }

    async fn delete_image(&self, r: Request<pb::DeleteImageRequest>) -> R<pb::DeleteImageResponse> {
        let c = caller(&r)?;
        self.images
            .delete(&c, parse_id("id", &r.get_ref().id)?)
            .await?;
        Ok(Response::new(pb::DeleteImageResponse {}))
    }

    async fn deactivate_image(&self, r: Request<pb::ImageRef>) -> R<pb::Image> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(image_pb(
            self.images.deactivate(&c, id).await?,
        )))
    }

    async fn reactivate_image(&self, r: Request<pb::ImageRef>) -> R<pb::Image> {
        let c = caller(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        Ok(Response::new(image_pb(
            self.images.reactivate(&c, id).await?,
        )))
    }

    async fn add_member(&self, r: Request<pb::AddMemberRequest>) -> R<pb::Member> {
        let c = caller(&r)?;
        let MemberRef(id, member) =
            MemberRef::parse(&r.get_ref().image_id, &r.get_ref().member_id)?;
        Ok(Response::new(member_pb(
            self.images.add_member(&c, id, member).await?,
        )))
    }

    async fn update_member(&self, r: Request<pb::UpdateMemberRequest>) -> R<pb::Member> {
        let c = caller(&r)?;
        let m = r.get_ref();
        let MemberRef(id, member) = MemberRef::parse(&m.image_id, &m.member_id)?;
        let status =
            member_status(m.status)?.ok_or_else(|| Error::invalid("status", "is required"))?;
        Ok(Response::new(member_pb(
            self.images.update_member(&c, id, member, status).await?,
        )))
    }

    async fn remove_member(
        &self,
        r: Request<pb::RemoveMemberRequest>,
    ) -> R<pb::RemoveMemberResponse> {
        let c = caller(&r)?;
        let MemberRef(id, member) =
            MemberRef::parse(&r.get_ref().image_id, &r.get_ref().member_id)?;
        self.images.remove_member(&c, id, member).await?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn list_members(&self, r: Request<pb::ListMembersRequest>) -> R<pb::ListMembersResponse> {
        let c = caller(&r)?;
        let id = parse_id("image_id", &r.get_ref().image_id)?;
        let members = self.images.list_members(&c, id).await?;
        Ok(Response::new(pb::ListMembersResponse {
            members: members.into_iter().map(member_pb).collect(),
        }))
    }

    async fn get_quota(&self, r: Request<pb::GetQuotaRequest>) -> R<pb::Quota> {
        let c = caller(&r)?;
        let p = &r.get_ref().project_id;
        let p = if p.is_empty() {
            None
        } else {
            Some(project("project_id", p)?)
        };
        Ok(Response::new(quota_pb(self.images.quota(&c, p).await?)))
    }

    async fn set_quota(&self, r: Request<pb::SetQuotaRequest>) -> R<pb::Quota> {
        let c = caller(&r)?;
        let m = r.get_ref();
        let p = project("project_id", &m.project_id)?;
        let limits = Limits {
            max_bytes: size_value("max_bytes", m.max_bytes)?,
            max_images: size_value("max_images", m.max_images)?,
        };
        Ok(Response::new(quota_pb(
            self.images.set_quota(&c, p, limits).await?,
        )))
    }
}
