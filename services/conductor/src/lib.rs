//! The Cirrus conductor, a nova-conductor equivalent: the only door to the
//! compute database for compute agents, which hold no database credentials
//! (steps 14–19 and 29 of the boot). An agent's SPIFFE id
//! (`spiffe://cirrus.local/svc/compute-agent/host/<h>`, passed by the
//! sidecar in `x-cirrus-peer`) names its host; it may read and change only
//! servers placed on that host, anything else is `PERMISSION_DENIED`.
//!
//! - [`service`]: build specs, state changes, build results with
//!   rescheduling on the alternates, deletes, heartbeats, the build timeout
//!   sweeper;
//! - [`grpc`]: the `conductor.v1` adapter.
//!
//! The SQL is compute-api's ([`compute_api::repo`]). Conductor runs no
//! migrations; compute-api owns the schema.

pub mod grpc;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;

use proto::conductor::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use service::Conductor;

/// The conductor's configuration (see `runtime::config` for how it loads).
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
    /// The SPIFFE trust domain of the agents' ids.
    pub trust_domain: String,
    /// Attempts of one build in all (the first and the reschedules).
    pub max_attempts: i32,
    /// A build still `building` after this long goes to `error`.
    pub build_timeout_secs: u64,
    /// How often the build timeout is enforced.
    pub sweep_interval_ms: u64,
    /// A host whose agent has not heartbeated for this long is down (not
    /// rescheduled onto).
    pub host_down_after_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::loopback(ports::CONDUCTOR.0, ports::CONDUCTOR.1),
            socket: None,
            database: DatabaseConfig::local("compute"),
            sidecar_outbound: None,
            sidecar_outbound_socket: None,
            queue_url: format!("http://127.0.0.1:{}", ports::QUEUE.0),
            trust_domain: "cirrus.local".into(),
            max_attempts: 3,
            build_timeout_secs: 600,
            sweep_interval_ms: 5000,
            host_down_after_secs: 60,
        }
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "conductor";
    const ABOUT: &'static str = "Cirrus conductor (nova-conductor)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if !(1..=10).contains(&self.max_attempts) {
            return bad("max_attempts must be between 1 and 10");
        }
        if self.build_timeout_secs == 0 || self.build_timeout_secs > 86_400 {
            return bad("build_timeout_secs must be between 1 and 86400");
        }
        if !(10..=600_000).contains(&self.sweep_interval_ms) {
            return bad("sweep_interval_ms must be between 10 and 600000");
        }
        if self.host_down_after_secs == 0 || self.host_down_after_secs > 3600 {
            return bad("host_down_after_secs must be between 1 and 3600");
        }
        if self.trust_domain.is_empty() {
            return bad("trust_domain is required");
        }
        if (self.sidecar_outbound.is_none() && self.sidecar_outbound_socket.is_none())
            && self.queue_url.is_empty()
        {
            return bad("queue_url is required without sidecar_outbound");
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

pub const SERVICE_NAMES: [&str; 1] = ["conductor.v1.Conductor"];

/// Connects, starts the sweeper and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::process::Service::validate(&config)?;
    let conductor = Conductor::start(config).await?;
    let sweeper = tokio::spawn(conductor.clone().sweep_forever());
    let routes =
        tonic::service::Routes::new(pb::conductor_server::ConductorServer::new(grpc::Api {
            conductor,
        }));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "conductor serving");
    let result = runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await;
    sweeper.abort();
    result?;
    tracing::info!("conductor stopped");
    Ok(())
}
