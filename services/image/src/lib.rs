//! The Cirrus image service, a Glance v2 equivalent: image records in
//! Postgres, image bytes in a store backend, streamed in and out over gRPC.
//! Compute agents fetch guest images from it through the mesh.
//!
//! - [`service`]: the domain logic (life cycle, visibility and sharing,
//!   quotas, the upload and download pipelines, start-up recovery);
//! - [`grpc`]: the `image.v1` gRPC adapter that validates requests;
//! - [`repo`]: every SQL statement; [`store`]: the byte store trait and its
//!   filesystem backend; [`format`]: checks that uploaded bytes are what
//!   their disk format says (and refuses qcow2 files that point at host
//!   files); [`policy`]: who may do what.
//!
//! [`run`] serves it all on a listener until shutdown. The service trusts
//! the caller identity in the `x-cirrus-*` headers: it listens on loopback
//! behind its sidecar, which sets them.

pub mod error;
pub mod format;
pub mod grpc;
pub mod model;
pub mod policy;
pub mod repo;
pub mod service;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use proto::image::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use service::{Images, Recovered};

pub mod migrations {
    //! The image schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The image service's configuration (see `runtime::config` for how it loads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the gRPC API listens (loopback: the sidecar fronts it).
    pub listen: SocketAddr,
    /// Where Prometheus `/metrics` is served; none to serve no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// A Postgres URL; the service works in `schema` only.
    pub database_url: String,
    pub schema: String,
    pub db_pool_size: usize,
    /// The filesystem store's directory (created, mode 0700).
    pub store_dir: PathBuf,
    /// Default per-project limits; `SetQuota` overrides them per project.
    pub quota_bytes: u64,
    pub quota_images: u64,
    /// An upload that sends nothing for this long is abandoned.
    pub upload_idle_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5060)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9160))),
            database_url: "postgres://postgres@127.0.0.1:5432/cirrus".into(),
            schema: "image".into(),
            db_pool_size: 16,
            store_dir: PathBuf::from(".state/image/store"),
            quota_bytes: 100 * 1024 * 1024 * 1024,
            quota_images: 1000,
            upload_idle_timeout_secs: 60,
        }
    }
}

impl Config {
    /// Checks what serde cannot, before anything binds or connects.
    pub fn validate(&self) -> Result<(), runtime::config::ConfigError> {
        let bad = |m: &str| Err(runtime::config::ConfigError(m.to_string()));
        if self.db_pool_size == 0 {
            return bad("db_pool_size must be at least 1");
        }
        if self.database_url.is_empty() {
            return bad("database_url is required");
        }
        if self.store_dir.as_os_str().is_empty() {
            return bad("store_dir is required");
        }
        if self.upload_idle_timeout_secs == 0 || self.upload_idle_timeout_secs > 3600 {
            return bad("upload_idle_timeout_secs must be between 1 and 3600");
        }
        if self.quota_bytes > i64::MAX as u64 || self.quota_images > i64::MAX as u64 {
            return bad("quota_bytes and quota_images must fit in a signed 64-bit integer");
        }
        Ok(())
    }
}

/// Every gRPC service name this server reports in `grpc.health.v1`.
pub const SERVICE_NAMES: [&str; 1] = ["image.v1.Images"];

/// HTTP/2 flow-control windows: large enough that a loopback stream is not
/// held back by the 64 KiB default, small enough to bound memory per
/// transfer.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Frames of up to 2 MiB: a 1 MiB chunk crosses in one frame, not 64.
const MAX_FRAME: u32 = 2 * 1024 * 1024;

/// Starts the service (migrations, store, recovery) and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let images = Images::start(config).await?;
    serve(images, listener, shutdown).await
}

/// Serves an already started [`Images`] until `shutdown`.
pub async fn serve(
    images: Images,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = grpc::Api { images };
    // Every request body is watched, so that an upload knows whether its
    // stream ended cleanly (see `grpc::BodyEnd`).
    let routes =
        tonic::service::Routes::new(grpc::WatchBodies(pb::images_server::ImagesServer::new(api)));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "image serving");
    let options = runtime::serve::ServeOptions {
        // An upload of many GiB outlives any fixed deadline; the service
        // bounds each wait for upload data itself (upload_idle_timeout_secs).
        request_timeout: None,
        stream_window: Some(STREAM_WINDOW),
        connection_window: Some(CONNECTION_WINDOW),
        max_frame_size: Some(MAX_FRAME),
    };
    runtime::serve::serve_with(routes, &SERVICE_NAMES, listener, shutdown, options).await?;
    tracing::info!("image stopped");
    Ok(())
}
