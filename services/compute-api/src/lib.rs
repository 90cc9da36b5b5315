//! The Cirrus compute API, a nova-api equivalent: server records as users
//! see them, the server actions with Nova's allowed-state rules, flavors, key
//! pairs, server groups, quotas and hosts. It writes a new server in
//! `building`/`scheduling` with its quota in one transaction, asks the
//! scheduler to place it, and casts actions to the server's host.
//!
//! - [`service`]: the domain logic (resolve, authorize, act);
//! - [`grpc`]: the `compute.v1` adapter that validates every request;
//! - [`repo`]: every SQL statement on the `compute` schema. This crate owns
//!   that schema ([`migrations`]); the scheduler and conductor link this
//!   library for [`repo`] and [`model`] so that the schema has one set of
//!   queries (compute agents never do: they go through conductor);
//! - [`watch`]: change notifications for `WatchServer`;
//! - [`keys`]: OpenSSH key parsing and Ed25519 generation;
//! - [`peers`]: image, network and volume, asked as the caller at create.
//!
//! [`run`] serves it all on a listener until shutdown. The service trusts
//! the caller identity in the `x-cirrus-*` headers: it listens on loopback
//! behind its sidecar, which sets them.

pub mod grpc;
pub mod keys;
pub mod model;
pub mod peers;
pub mod repo;
pub mod service;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use proto::compute::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use service::Compute;

pub mod migrations {
    //! The compute schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The compute API's configuration (see `runtime::config` for how it loads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    pub database: DatabaseConfig,
    /// This workload's sidecar outbound listener: when set, the scheduler and
    /// the queue are reached through it by name and the URLs below are unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_outbound: Option<SocketAddr>,
    /// The sidecar's outbound Unix socket (its `[outbound_socket] path`,
    /// issue 13): when set, calls go through it and `sidecar_outbound` is unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_outbound_socket: Option<std::path::PathBuf>,
    /// Direct addresses (development and tests).
    pub scheduler_url: String,
    pub queue_url: String,
    /// Default per-project limits; `SetQuota` overrides them per project.
    pub quota: model::Limits,
    /// A host whose agent has not heartbeated for this long is down.
    pub host_down_after_secs: u64,
    /// Image, network and volume (`[peers]`): each `"mesh"` or a URL; one
    /// left unset refuses the requests that need it (FAILED_PRECONDITION).
    pub peers: peers::PeersConfig,
    /// The SPIFFE trust domain (names compute-api to agents without a mesh).
    pub trust_domain: String,
    /// How long an image service answer (an active image, per project)
    /// serves later creates; 0 asks at every create.
    pub image_cache_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::loopback(ports::COMPUTE_API.0, ports::COMPUTE_API.1),
            socket: None,
            database: DatabaseConfig::local("compute"),
            sidecar_outbound: None,
            sidecar_outbound_socket: None,
            scheduler_url: format!("http://127.0.0.1:{}", ports::SCHEDULER.0),
            queue_url: format!("http://127.0.0.1:{}", ports::QUEUE.0),
            quota: model::Limits::default(),
            host_down_after_secs: 60,
            peers: peers::PeersConfig::default(),
            trust_domain: "cirrus.local".into(),
            image_cache_ms: 2000,
        }
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "compute-api";
    const ABOUT: &'static str = "Cirrus compute API (nova-api)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        if self.host_down_after_secs == 0 || self.host_down_after_secs > 3600 {
            return Err(ConfigError(
                "host_down_after_secs must be between 1 and 3600".into(),
            ));
        }
        if self.image_cache_ms > 60_000 {
            return Err(ConfigError("image_cache_ms must be at most 60000".into()));
        }
        self.peers
            .validate(self.outbound().is_some())
            .map_err(ConfigError)?;
        if (self.sidecar_outbound.is_none() && self.sidecar_outbound_socket.is_none())
            && (self.scheduler_url.is_empty() || self.queue_url.is_empty())
        {
            return Err(ConfigError(
                "scheduler_url and queue_url are required without sidecar_outbound".into(),
            ));
        }
        Ok(())
    }

    async fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> anyhow::Result<()> {
        run(self, listener, shutdown).await
    }
}

impl Config {
    /// Its sidecar's outbound side: the Unix socket, else the TCP listener.
    pub fn outbound(&self) -> Option<runtime::local::Outbound> {
        runtime::local::Outbound::of(
            self.sidecar_outbound_socket.as_deref(),
            self.sidecar_outbound,
        )
    }
}

/// A channel to a peer: through the sidecar by service name, or directly.
pub fn channel(
    outbound: Option<&runtime::local::Outbound>,
    service: &str,
    url: &str,
) -> anyhow::Result<runtime::trace::Channel> {
    match outbound {
        Some(out) => out.channel(service).map_err(anyhow::Error::msg),
        None => Ok(runtime::trace::traced(
            tonic::transport::Endpoint::from_shared(url.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
        )),
    }
}

/// Every gRPC service name this server reports in `grpc.health.v1`.
pub const SERVICE_NAMES: [&str; 6] = [
    "compute.v1.Servers",
    "compute.v1.Flavors",
    "compute.v1.KeyPairs",
    "compute.v1.ServerGroups",
    "compute.v1.Quotas",
    "compute.v1.Hosts",
];

/// Starts the service (migrations, notification listener) and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::process::Service::validate(&config)?;
    let compute = Compute::start(config).await?;
    serve(compute, listener, shutdown).await
}

/// Serves an already started [`Compute`] until `shutdown`.
pub async fn serve(
    compute: Compute,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = grpc::Api { compute };
    let routes = tonic::service::Routes::new(pb::servers_server::ServersServer::new(api.clone()))
        .add_service(pb::flavors_server::FlavorsServer::new(api.clone()))
        .add_service(pb::key_pairs_server::KeyPairsServer::new(api.clone()))
        .add_service(pb::server_groups_server::ServerGroupsServer::new(
            api.clone(),
        ))
        .add_service(pb::quotas_server::QuotasServer::new(api.clone()))
        .add_service(pb::hosts_server::HostsServer::new(api));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "compute-api serving");
    runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await?;
    tracing::info!("compute-api stopped");
    Ok(())
}
