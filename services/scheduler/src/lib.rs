//! The Cirrus scheduler, a nova-scheduler equivalent. compute-api calls
//! `SelectDestinations` for a new server; the scheduler reads the server and
//! the hosts from the `compute` schema, keeps the hosts every [`filters`]
//! pass (enabled, up, RAM / vCPU / disk with allocation ratios, availability
//! zone, image properties, server group (anti-)affinity), orders them with
//! the weighers, and claims the best one with a generation-checked update
//! (Placement's rule: a claim applies only to the usage it was decided on),
//! so that any number of scheduler replicas never over-commit a host. It
//! then records the host and two alternates on the server and casts `build`
//! to `compute.<host>`.
//!
//! - [`service`]: one placement; [`filters`]: filters and weighers (pure);
//! - [`grpc`]: the `scheduler.v1` adapter.
//!
//! The SQL is compute-api's ([`compute_api::repo`]): one schema, one set of
//! queries. The scheduler runs no migrations; compute-api owns them.

pub mod filters;
pub mod grpc;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;

use proto::scheduler::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use service::Scheduler;

/// The scheduler's configuration (see `runtime::config` for how it loads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    /// The compute schema (compute-api's).
    pub database: DatabaseConfig,
    /// This workload's sidecar outbound listener: when set, the queue is
    /// reached through it by name and `queue_url` is unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_outbound: Option<SocketAddr>,
    /// The sidecar's outbound Unix socket (its `[outbound_socket] path`,
    /// issue 13): when set, calls go through it and `sidecar_outbound` is unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_outbound_socket: Option<std::path::PathBuf>,
    pub queue_url: String,
    /// A host whose agent has not heartbeated for this long is not chosen.
    pub host_down_after_secs: u64,
    /// How many alternates to record for rescheduling.
    pub alternates: usize,
    /// How long the in-memory view of the hosts serves placements before
    /// it is read again (Nova's HostManager cache). Each claim is still
    /// generation-checked in Postgres (and requires the host enabled and up),
    /// so a stale view costs a retry, never an over-commit. 0: read per call.
    pub host_cache_ms: u64,
    pub weights: filters::Weights,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::loopback(ports::SCHEDULER.0, ports::SCHEDULER.1),
            socket: None,
            database: DatabaseConfig::local("compute"),
            sidecar_outbound: None,
            sidecar_outbound_socket: None,
            queue_url: format!("http://127.0.0.1:{}", ports::QUEUE.0),
            host_down_after_secs: 60,
            alternates: 2,
            host_cache_ms: 500,
            weights: filters::Weights::default(),
        }
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "scheduler";
    const ABOUT: &'static str = "Cirrus scheduler (nova-scheduler)";

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
        if self.host_cache_ms > 60_000 {
            return Err(ConfigError("host_cache_ms must be at most 60000".into()));
        }
        if self.alternates > 10 {
            return Err(ConfigError("alternates must be at most 10".into()));
        }
        if (self.sidecar_outbound.is_none() && self.sidecar_outbound_socket.is_none())
            && self.queue_url.is_empty()
        {
            return Err(ConfigError(
                "queue_url is required without sidecar_outbound".into(),
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

pub const SERVICE_NAMES: [&str; 1] = ["scheduler.v1.Scheduler"];

/// Connects and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::process::Service::validate(&config)?;
    let scheduler = Scheduler::start(config).await?;
    let routes =
        tonic::service::Routes::new(pb::scheduler_server::SchedulerServer::new(grpc::Api {
            scheduler,
        }));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "scheduler serving");
    runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await?;
    tracing::info!("scheduler stopped");
    Ok(())
}
