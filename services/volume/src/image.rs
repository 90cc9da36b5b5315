//! The volume service's client of the image service (`image.v1.Images`):
//! looks an image up and downloads its bytes into a file, *as the caller*.
//!
//! How the caller's token travels: the volume service's sidecar verifies
//! the client's bearer token and forwards the request with the
//! `authorization` header left in place (it strips only `x-cirrus-*`). The
//! service keeps that header ([`Credentials`]) and sets it on its own call
//! to `http://image` through its sidecar's outbound listener
//! ([`runtime::serve::via_sidecar`]); the outbound sidecar strips
//! `x-cirrus-*` again and dials image's sidecar over mTLS, which verifies
//! the same token and applies image's policy and visibility rules. So a
//! caller can make a volume only from an image it may download itself.
//!
//! Without a mesh (`[image] url`, for tests and sidecar-less development)
//! the service talks to image directly and passes the caller's verified
//! `x-cirrus-*` headers on, playing the sidecar's part.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proto::image::v1 as pb;
use proto::image::v1::images_client::ImagesClient;
use runtime::caller::Caller;
use runtime::error::{Error, Result};
use runtime::trace::Channel;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::model::Format;

/// HTTP/2 receive windows and largest frame of the image client (see [`Images::new`]).
const STREAM_WINDOW: u32 = 32 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024 + 64;

/// Where the image service is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// This workload's sidecar's outbound listener: calls go to
    /// `http://image` through it, with the caller's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<SocketAddr>,
    /// The sidecar's outbound Unix socket (issue 13): wins over `outbound`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_socket: Option<std::path::PathBuf>,
    /// Or a direct `http://host:port` of an image server (no mesh: the
    /// caller's verified headers are passed on). Wins over `outbound`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Deadline of a lookup, and the longest wait for one chunk of a download.
    pub timeout_secs: u64,
}

impl Default for ImageConfig {
    fn default() -> Self {
        let (sidecar, _) = runtime::config::ports::SIDECAR;
        Self {
            // The sidecar's internal listener; public and outbound follow.
            outbound: Some(SocketAddr::from(([127, 0, 0, 1], sidecar + 2))),
            outbound_socket: None,
            url: None,
            timeout_secs: 30,
        }
    }
}

/// What the volume service forwards of its caller on an outgoing call.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The caller's `authorization` header, as its sidecar passed it on.
    pub authorization: Option<String>,
    pub caller: Caller,
}

/// What a volume needs to know of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: Uuid,
    /// `None`: a disk format a volume cannot be made from (named in `disk_format`).
    pub format: Option<Format>,
    pub disk_format: String,
    pub active: bool,
    pub size: u64,
    pub min_disk_gb: u64,
}

#[derive(Clone)]
pub struct Images {
    client: ImagesClient<Channel>,
    direct: bool,
    timeout: Duration,
}

impl Images {
    /// `None` when no image service is configured.
    pub fn new(cfg: &ImageConfig) -> Result<Option<Self>, String> {
        let (channel, direct) = match (&cfg.url, cfg.outbound) {
            (Some(url), _) => (
                runtime::trace::traced(
                    tonic::transport::Endpoint::from_shared(url.clone())
                        .map_err(|e| format!("image.url {url:?}: {e}"))?
                        .connect_timeout(Duration::from_secs(2))
                        // A download is one long stream of 1 MiB messages: with
                        // HTTP/2's default windows and 16 KiB frames the image
                        // server waits for a WINDOW_UPDATE every few frames.
                        // Large windows keep it sending; 1 MiB frames carry a
                        // chunk in one frame.
                        .initial_stream_window_size(STREAM_WINDOW)
                        .initial_connection_window_size(CONNECTION_WINDOW)
                        .max_frame_size(MAX_FRAME)
                        .connect_lazy(),
                ),
                true,
            ),
            (None, outbound) => {
                let socket = cfg.outbound_socket.as_deref();
                match runtime::local::via_sidecar(socket, outbound, "image") {
                    Some(c) => (c?, false),
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Self {
            client: ImagesClient::new(channel).max_decoding_message_size(8 * 1024 * 1024),
            direct,
            timeout: Duration::from_secs(cfg.timeout_secs),
        }))
    }

    fn request<T>(&self, msg: T, creds: &Credentials) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if self.direct {
            creds.caller.to_metadata(r.metadata_mut());
        }
        if let Some(a) = creds.authorization.as_deref().and_then(|a| a.parse().ok()) {
            r.metadata_mut().insert("authorization", a);
        }
        r
    }

    /// The image, if the caller may see it.
    pub async fn get(&self, creds: &Credentials, id: Uuid) -> Result<ImageInfo> {
        let mut req = self.request(pb::GetImageRequest { id: id.to_string() }, creds);
        req.set_timeout(self.timeout);
        let i = self
            .client
            .clone()
            .get_image(req)
            .await
            .map_err(|s| from_status(s, id))?
            .into_inner();
        let disk = pb::DiskFormat::try_from(i.disk_format).unwrap_or(pb::DiskFormat::Unspecified);
        Ok(ImageInfo {
            id,
            format: match disk {
                pb::DiskFormat::Raw => Some(Format::Raw),
                pb::DiskFormat::Qcow2 => Some(Format::Qcow2),
                _ => None,
            },
            disk_format: disk
                .as_str_name()
                .trim_start_matches("DISK_FORMAT_")
                .to_ascii_lowercase(),
            active: i.status == pb::Status::Active as i32,
            size: i.size.unwrap_or(0),
            min_disk_gb: u64::from(i.min_disk),
        })
    }

    /// The image's bytes as a stream of chunks (at most 1 MiB each).
    async fn stream(
        &self,
        creds: &Credentials,
        id: Uuid,
    ) -> Result<tonic::Streaming<pb::DownloadResponse>> {
        let req = self.request(
            pb::DownloadRequest {
                image_id: id.to_string(),
                offset: 0,
                length: None,
            },
            creds,
        );
        Ok(
            tokio::time::timeout(self.timeout, self.client.clone().download(req))
                .await
                .map_err(|_| Error::unavailable("the image service did not answer a download"))?
                .map_err(|s| from_status(s, id))?
                .into_inner(),
        )
    }

    async fn next(
        &self,
        stream: &mut tonic::Streaming<pb::DownloadResponse>,
        id: Uuid,
    ) -> Result<Option<prost::bytes::Bytes>> {
        Ok(tokio::time::timeout(self.timeout, stream.message())
            .await
            .map_err(|_| Error::unavailable("the image download stalled"))?
            .map_err(|s| from_status(s, id))?
            .map(|m| m.data))
    }

    /// Downloads the image's bytes into `dest` (made anew); returns how many.
    pub async fn download(&self, creds: &Credentials, id: Uuid, dest: &Path) -> Result<u64> {
        let mut stream = self.stream(creds, id).await?;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(|e| Error::internal(format!("staging {}: {e}", dest.display())))?;
        let mut file = tokio::io::BufWriter::with_capacity(4 * 1024 * 1024, file);
        let mut total = 0u64;
        while let Some(chunk) = self.next(&mut stream, id).await? {
            total += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::internal(format!("writing {}: {e}", dest.display())))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::internal(format!("writing {}: {e}", dest.display())))?;
        Ok(total)
    }

    /// Sends the image's bytes to `to` as they arrive, then
    /// [`Chunk::End`] once exactly `expected` bytes came. On any failure no
    /// `End` is sent, so the receiver keeps nothing.
    pub async fn download_to(
        &self,
        creds: &Credentials,
        id: Uuid,
        expected: u64,
        to: tokio::sync::mpsc::Sender<Chunk>,
    ) -> Result<u64> {
        let mut stream = self.stream(creds, id).await?;
        let mut total = 0u64;
        while let Some(chunk) = self.next(&mut stream, id).await? {
            total += chunk.len() as u64;
            if to.send(Chunk::Data(chunk)).await.is_err() {
                // The store stopped: its own error says why.
                return Err(Error::aborted("the volume store stopped reading"));
            }
        }
        if total != expected {
            return Err(Error::precondition(format!(
                "image {id} sent {total} bytes, {expected} were recorded"
            )));
        }
        let _ = to.send(Chunk::End).await;
        Ok(total)
    }
}

/// A piece of a streamed import.
#[derive(Debug)]
pub enum Chunk {
    Data(prost::bytes::Bytes),
    /// Every byte came: the import may be kept.
    End,
}

/// The image service's answer, as this service's caller should see it.
fn from_status(s: tonic::Status, id: Uuid) -> Error {
    use tonic::Code;
    match s.code() {
        // An image the caller may not read is, to it, missing.
        Code::NotFound | Code::PermissionDenied => Error::not_found("image", id),
        Code::Unauthenticated => Error::unauthenticated(format!("image service: {}", s.message())),
        Code::FailedPrecondition => Error::precondition(format!(
            "image {id} cannot be read: {}",
            runtime::types::short(s.message())
        )),
        _ => Error::unavailable(format!("image service: {:?} {}", s.code(), s.message())),
    }
}
