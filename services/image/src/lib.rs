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

pub mod format;
pub mod grpc;
pub mod model;
pub mod policy;
pub mod repo;
pub mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;

use proto::image::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use service::{Images, Recovered};

pub mod migrations {
    //! The image schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The image service's configuration (see `runtime::config` for how it
/// loads: defaults, then a TOML file, then `CIRRUS_*` variables such as
/// `CIRRUS_DATABASE__URL`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: where the gRPC API (loopback: the sidecar fronts it) and
    /// `/metrics` listen.
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    /// `[database]`: a Postgres URL, the schema (`image`), the pool size.
    pub database: DatabaseConfig,
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
        let (grpc, metrics) = ports::IMAGE;
        Self {
            server: ServerConfig::loopback(grpc, metrics),
            socket: None,
            database: DatabaseConfig::local("image"),
            store_dir: PathBuf::from(".state/image/store"),
            quota_bytes: 100 * 1024 * 1024 * 1024,
            quota_images: 1000,
            upload_idle_timeout_secs: 60,
        }
    }
}

impl Config {
    /// Checks what serde cannot, before anything binds or connects.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        self.database.validate()?;
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

impl runtime::process::Service for Config {
    const NAME: &'static str = "image";
    const ABOUT: &'static str = "Cirrus image service (Glance)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        Config::validate(self)
    }

    fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, listener, shutdown)
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
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let images = Images::start(config).await?;
    serve(images, listener, shutdown).await
}

/// Serves an already started [`Images`] until `shutdown`.
pub async fn serve(
    images: Images,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = grpc::Api { images };
    // Every request body is watched, so that an upload knows whether its
    // stream ended cleanly (see `grpc::BodyEnd`).
    let routes =
        tonic::service::Routes::new(grpc::WatchBodies(pb::images_server::ImagesServer::new(api)));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
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
