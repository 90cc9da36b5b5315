//! The Cirrus volume service, a Cinder v3 core equivalent: volume,
//! snapshot and attachment records in Postgres (schema `volume`), volume
//! bytes in a store backend (files made with `qemu-img`). Compute agents
//! get from it how to reach a server's persistent disks.
//!
//! - [`service`]: the domain logic (the status machine as one conditional
//!   update per transition, quotas, the file work in tasks that outlive
//!   requests, start-up recovery);
//! - [`grpc`]: the `volume.v1` gRPC adapter that validates requests;
//! - [`repo`]: every SQL statement; [`store`]: the store trait and its
//!   filesystem backend; [`image`]: the image service client that fetches
//!   an image's bytes as the caller; [`policy`]: who may do what;
//!   [`model`]: the domain types.
//!
//! [`run`] serves it all on a listener until shutdown. The service trusts
//! the caller identity in the `x-cirrus-*` headers: it listens on loopback
//! behind its sidecar, which sets them.

pub mod grpc;
pub mod image;
pub mod model;
pub mod policy;
pub mod repo;
pub mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use proto::volume::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use image::ImageConfig;
pub use model::Format;
pub use service::{Recovered, Volumes};

pub mod migrations {
    //! The volume schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The volume service's configuration (see `runtime::config` for how it
/// loads): `[server]`, `[database]`, `[store]`, `[quotas]`, `[image]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The mesh's SPIFFE trust domain: a compute agent is
    /// `spiffe://<trust_domain>/svc/compute-agent/host/<h>`.
    pub trust_domain: String,
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    pub database: DatabaseConfig,
    pub store: StoreConfig,
    pub quotas: QuotaDefaults,
    pub image: ImageConfig,
}

/// The filesystem store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The store's directory (created, mode 0700).
    pub dir: PathBuf,
    /// The `qemu-img` program.
    pub qemu_img: PathBuf,
    /// The format of a volume whose request names none.
    pub default_format: Format,
    /// The largest volume, in GiB.
    pub max_volume_gb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".state/volume/store"),
            qemu_img: PathBuf::from("qemu-img"),
            default_format: Format::Raw,
            max_volume_gb: 16 * 1024,
        }
    }
}

/// Per-project limits of a project without its own (`SetQuota`), as
/// Cinder's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaDefaults {
    pub volumes: u64,
    pub gigabytes: u64,
    pub snapshots: u64,
}

impl Default for QuotaDefaults {
    fn default() -> Self {
        Self {
            volumes: 10,
            gigabytes: 1000,
            snapshots: 10,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let (grpc, metrics) = ports::VOLUME;
        Self {
            trust_domain: "cirrus.local".into(),
            server: ServerConfig::loopback(grpc, metrics),
            socket: None,
            database: DatabaseConfig::local("volume"),
            store: StoreConfig::default(),
            quotas: QuotaDefaults::default(),
            image: ImageConfig::default(),
        }
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "volume";
    const ABOUT: &'static str = "Cirrus volume service (Cinder)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return bad("trust_domain must be a non-empty name without '/'");
        }
        if self.store.dir.as_os_str().is_empty() {
            return bad("store.dir is required");
        }
        if self.store.qemu_img.as_os_str().is_empty() {
            return bad("store.qemu_img is required");
        }
        if self.store.max_volume_gb == 0 || self.store.max_volume_gb > 1024 * 1024 {
            return bad("store.max_volume_gb must be between 1 and 1048576");
        }
        let q = self.quotas;
        if [q.volumes, q.gigabytes, q.snapshots]
            .iter()
            .any(|v| *v > i64::MAX as u64)
        {
            return bad("quotas must fit in a signed 64-bit integer");
        }
        if self.image.timeout_secs == 0 || self.image.timeout_secs > 3600 {
            return bad("image.timeout_secs must be between 1 and 3600");
        }
        if let Some(u) = &self.image.url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return bad("image.url must be an http:// or https:// URL");
        }
        Ok(())
    }

    fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, listener, shutdown)
    }
}

/// Every gRPC service name this server reports in `grpc.health.v1`.
pub const SERVICE_NAMES: [&str; 1] = ["volume.v1.Volumes"];

/// Starts the service (migrations, store, recovery) and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    <Config as runtime::process::Service>::validate(&config)?;
    let volumes = Volumes::start(config)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.internal_detail().unwrap_or(&e.to_string())))?;
    serve(volumes, listener, shutdown).await
}

/// Serves an already started [`Volumes`] until `shutdown`.
pub async fn serve(
    volumes: Volumes,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = grpc::Api { volumes };
    let routes = tonic::service::Routes::new(pb::volumes_server::VolumesServer::new(api));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "volume serving");
    let options = runtime::serve::ServeOptions {
        // A create with `wait` from a large image takes minutes; the work
        // bounds its own waits (image.timeout_secs per chunk).
        request_timeout: None,
        ..runtime::serve::ServeOptions::default()
    };
    runtime::serve::serve_with(routes, &SERVICE_NAMES, listener, shutdown, options).await?;
    tracing::info!("volume stopped");
    Ok(())
}
