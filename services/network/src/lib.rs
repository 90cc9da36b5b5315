//! The Cirrus network service, a Neutron v2 core equivalent: networks with
//! a VXLAN segmentation id, subnets and IPAM, ports and their binding to a
//! host with a live agent, security groups, quotas, and the agents' view of
//! their host. The per-host `network-agent` wires what this service decides
//! into Open vSwitch and dnsmasq.
//!
//! - [`service`]: the domain (resolve → authorize → act in one method);
//! - [`grpc`]: the `network.v1` adapter that validates every request field;
//! - [`repo`]: every SQL statement; [`addr`]: CIDR, pool and MAC checks;
//! - [`changes`]: LISTEN/NOTIFY wake-ups for agents and `WatchPorts`;
//! - [`outbox`]: relays port status events to the queue's `network.port`.
//!
//! [`run`] serves it on a listener until shutdown. The service trusts the
//! caller identity in the `x-cirrus-*` headers: it listens on loopback
//! behind its sidecar, which sets them.

pub mod addr;
pub mod changes;
pub mod grpc;
pub mod model;
pub mod outbox;
pub mod repo;
pub mod service;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use proto::network::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use service::Net;

pub mod migrations {
    //! The network schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// Default per-project limits (`SetQuota` overrides them; -1: unlimited).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaDefaults {
    pub networks: i64,
    pub subnets: i64,
    pub ports: i64,
    pub security_groups: i64,
    pub security_group_rules: i64,
}

impl Default for QuotaDefaults {
    fn default() -> Self {
        Self {
            networks: 100,
            subnets: 100,
            ports: 500,
            security_groups: 10,
            security_group_rules: 100,
        }
    }
}

/// The network service's configuration (see `runtime::config` for how it loads).
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
    /// The VXLAN VNIs networks get their segmentation id from.
    pub vni_min: u32,
    pub vni_max: u32,
    /// A network's MTU when its creator gives none (VXLAN: 1450).
    pub default_mtu: u32,
    /// An agent silent for longer than this is down: binding to it fails.
    pub agent_down_secs: u64,
    pub quota: QuotaDefaults,
    /// The queue's endpoint (its sidecar's outbound address in production);
    /// empty: port events stay in the outbox until one is configured.
    pub queue_url: String,
    /// In production: this service's sidecar's outbound address; the queue
    /// is then reached through it (`http://queue`), and `queue_url` is unused.
    pub queue_via_sidecar: Option<std::net::SocketAddr>,
    /// The sidecar's outbound Unix socket (issue 13): wins over `queue_via_sidecar`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_via_sidecar_socket: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::loopback(ports::NETWORK.0, ports::NETWORK.1),
            socket: None,
            database: DatabaseConfig::local("network"),
            vni_min: 1000,
            vni_max: 99_999,
            default_mtu: 1450,
            agent_down_secs: 15,
            quota: QuotaDefaults::default(),
            queue_url: String::new(),
            queue_via_sidecar: None,
            queue_via_sidecar_socket: None,
        }
    }
}

impl Config {
    /// Checks what serde cannot, before anything binds or connects.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.vni_min == 0 || self.vni_min > self.vni_max || self.vni_max > 16_777_215 {
            return bad("vni_min..vni_max must be a non-empty range inside 1..16777215");
        }
        if !(68..=9000).contains(&self.default_mtu) {
            return bad("default_mtu must be between 68 and 9000");
        }
        if self.agent_down_secs == 0 || self.agent_down_secs > 3600 {
            return bad("agent_down_secs must be between 1 and 3600");
        }
        Ok(())
    }
}

/// Every gRPC service name this server reports in `grpc.health.v1`.
pub const SERVICE_NAMES: [&str; 2] = ["network.v1.Networks", "network.v1.Agents"];

impl runtime::process::Service for Config {
    const NAME: &'static str = "network";
    const ABOUT: &'static str = "Cirrus network service (Neutron)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check()
    }

    fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, listener, shutdown)
    }
}

impl Net {
    /// Connects, migrates, and starts the change listener and the outbox relay.
    pub async fn start(config: Config) -> anyhow::Result<(Net, Vec<tokio::task::JoinHandle<()>>)> {
        config.check()?;
        let db = &config.database;
        let pool = runtime::db::pool(&db.url, &db.schema, db.pool_size)?;
        runtime::db::migrate(&pool, &db.schema, migrations::runner()).await?;
        let changes = changes::Changes::new();
        let listen_url = listen_url(&db.url, &db.schema);
        let mut tasks = vec![tokio::spawn(changes::listen(listen_url, changes.clone()))];
        let net = Net {
            pool,
            config: Arc::new(config),
            changes,
            default_groups: Default::default(),
        };
        if !net.config.queue_url.is_empty()
            || net.config.queue_via_sidecar.is_some()
            || net.config.queue_via_sidecar_socket.is_some()
        {
            tasks.push(tokio::spawn(outbox::relay(net.clone())));
        }
        Ok((net, tasks))
    }
}

/// The listener's connection needs no schema; NOTIFY is database-wide.
fn listen_url(url: &str, _schema: &str) -> String {
    url.to_string()
}

/// Starts the service and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (net, tasks) = Net::start(config).await?;
    let r = serve(net, listener, shutdown).await;
    for t in tasks {
        t.abort();
    }
    r
}

/// Serves an already started [`Net`] until `shutdown`.
pub async fn serve(
    net: Net,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = grpc::Api { net };
    let routes = tonic::service::Routes::new(pb::networks_server::NetworksServer::new(api.clone()))
        .add_service(pb::agents_server::AgentsServer::new(api));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "network serving");
    let options = runtime::serve::ServeOptions {
        // WatchPorts streams live as long as their watcher.
        request_timeout: None,
        ..Default::default()
    };
    runtime::serve::serve_with(routes, &SERVICE_NAMES, listener, shutdown, options).await?;
    tracing::info!("network stopped");
    Ok(())
}
