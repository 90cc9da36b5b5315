//! The Cirrus queue service, a RabbitMQ + oslo.messaging equivalent: durable
//! topics on gRPC streams, stored in Postgres so that several replicas serve
//! the same topics side by side.
//!
//! - [`service`]: the domain logic: topics, group-committed publishing, the
//!   consumer session (leases, credits, acks, nacks, dead-lettering);
//! - [`grpc`]: the `queue.v1` adapter that validates every request;
//! - [`handoff`]: fresh messages leased in the publish transaction to a
//!   local consumer with free credits (no claim round trip);
//! - [`repo`]: every SQL statement (claims with `FOR UPDATE SKIP LOCKED`);
//! - [`wake`]: `LISTEN/NOTIFY` wake-ups across replicas;
//! - [`policy`]: who may publish to and consume from which topic;
//! - [`client`]: the library services use (the `queue-client` crate):
//!   `cast`, `subscribe`, with reconnection and trace context.
//!
//! Guarantees: at-least-once delivery; a publish is answered only once its
//! messages are committed; consumers dedupe by message id.
//!
//! [`run`] serves it all on a listener until shutdown.

pub mod grpc;
pub mod handoff;
pub mod model;
pub mod policy;
pub mod repo;
pub mod service;
pub mod wake;

use std::future::Future;
use std::pin::Pin;

use proto::queue::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

/// The client library, in its own crate (`queue-client`) so agents link no server.
pub use queue_client as client;
pub use service::Queue;

pub mod migrations {
    //! The queue schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The queue service's configuration (see `runtime::config` for how it loads):
/// the shared `[server]` and `[database]` tables, then the queue's own keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: where the gRPC API and `/metrics` listen.
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    /// `[database]`: the Postgres URL, the schema (`queue`) and the pool size.
    pub database: DatabaseConfig,
    /// The largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// How long an idempotency id is remembered.
    pub dedupe_window_secs: u64,
    /// Defaults for topics created without settings.
    pub default_retention_secs: u64,
    pub default_max_attempts: u32,
    /// Publish transactions committing in parallel, and the most messages one
    /// commits.
    pub committers: usize,
    pub commit_batch_messages: usize,
    /// A commit starts while another is in flight only once this many
    /// messages wait (or the batch is full); below that it waits for the one
    /// in flight to end and takes everything that came meanwhile. Small
    /// publishes thus make few, larger transactions (measured 2026-12-04 at
    /// 6,000 single-message publishes/s: Postgres 119-124 µs of CPU per
    /// message with one commit at a time, 138-139 with two, ~190 with four
    /// free-running), while batches of this size still commit in parallel.
    pub commit_overlap_messages: usize,
    /// A consumer looks for work at least this often (nack delays, ended
    /// leases, missed notifications). A consumer whose lease ended unsettled
    /// may take that message back only after twice this (the others first).
    pub poll_interval_ms: u64,
    /// How often TTL, retention and the dedupe window are enforced.
    pub sweep_interval_secs: u64,
    /// The most consumer streams one replica serves.
    pub max_subscriptions: usize,
    /// The SPIFFE trust domain of the mesh's workloads.
    pub trust_domain: String,
    /// Treat a call without the sidecar's `x-cirrus-peer` header as an
    /// administrator's. Only for development and tests on loopback.
    pub trust_direct_callers: bool,
    /// Runtime worker threads; absent: one per core.
    pub worker_threads: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        let (port, metrics) = ports::QUEUE;
        Self {
            server: ServerConfig::loopback(port, metrics),
            socket: None,
            database: DatabaseConfig::local("queue"),
            max_payload_bytes: 1024 * 1024,
            dedupe_window_secs: 600,
            default_retention_secs: 86_400,
            default_max_attempts: 5,
            committers: 4,
            commit_batch_messages: 1000,
            commit_overlap_messages: 100,
            poll_interval_ms: 1000,
            sweep_interval_secs: 30,
            max_subscriptions: 4096,
            trust_domain: "cirrus.local".into(),
            trust_direct_callers: false,
            worker_threads: None,
        }
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "queue";
    const ABOUT: &'static str = "Cirrus queue service (RabbitMQ + oslo.messaging)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn worker_threads(&self) -> Option<usize> {
        self.worker_threads
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        self.database.validate()?;
        if self.worker_threads.is_some_and(|n| n == 0 || n > 1024) {
            return bad("worker_threads must be between 1 and 1024 (absent: one per core)");
        }
        if self.database.pool_size < 2 {
            return bad("database.pool_size must be at least 2");
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 16 * 1024 * 1024 {
            return bad("max_payload_bytes must be between 1 and 16777216");
        }
        if self.committers == 0 || self.committers >= self.database.pool_size {
            return bad("committers must be at least 1 and below database.pool_size");
        }
        if self.commit_batch_messages == 0 || self.commit_batch_messages > 10_000 {
            return bad("commit_batch_messages must be between 1 and 10000");
        }
        if self.commit_overlap_messages == 0 {
            return bad(
                "commit_overlap_messages must be at least 1 (1: commits never wait for one another)",
            );
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return bad("poll_interval_ms must be between 10 and 60000");
        }
        if self.default_max_attempts == 0 || self.default_max_attempts > 1000 {
            return bad("default_max_attempts must be between 1 and 1000");
        }
        if self.default_retention_secs == 0 || self.dedupe_window_secs == 0 {
            return bad("default_retention_secs and dedupe_window_secs must be positive");
        }
        if self.sweep_interval_secs == 0 || self.max_subscriptions == 0 {
            return bad("sweep_interval_secs and max_subscriptions must be positive");
        }
        if self.trust_domain.is_empty() {
            return bad("trust_domain is required");
        }
        Ok(())
    }

    async fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> anyhow::Result<()> {
        // One plain line on stdout, for scripts and tests that bind port 0.
        println!("queue listening on {}", listener.describe());
        run(self, listener, shutdown).await
    }
}

/// Every gRPC service name this server reports in `grpc.health.v1`.
pub const SERVICE_NAMES: [&str; 2] = ["queue.v1.Queue", "queue.v1.Topics"];

/// Starts the service (migrations, committers, listener) and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::process::Service::validate(&config)?;
    let queue = Queue::start(config).await?;
    serve(queue, listener, shutdown).await
}

/// Serves an already started [`Queue`] until `shutdown`.
pub async fn serve(
    queue: Queue,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    if queue.config().trust_direct_callers {
        tracing::warn!("trust_direct_callers is on: calls without a sidecar act as administrator");
    }
    let (close, closed) = tokio::sync::watch::channel(false);
    let max_message = queue.config().max_payload_bytes * 4 + 4 * 1024 * 1024;
    let api = grpc::Api { queue, closed };
    let routes = tonic::service::Routes::new(
        pb::queue_server::QueueServer::new(api.clone()).max_decoding_message_size(max_message),
    )
    .add_service(pb::topics_server::TopicsServer::new(api));
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "queue serving");
    let shutdown = async move {
        shutdown.await;
        // End consumer streams so the graceful drain can finish.
        let _ = close.send(true);
    };
    runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await?;
    tracing::info!("queue stopped");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use runtime::process::Service;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.toml");
        std::fs::write(&path, text).unwrap();
        runtime::config::load::<Config>(Some(&path)).and_then(|c| c.validate().map(|()| c))
    }

    #[test]
    fn config_nests_server_and_database_and_refuses_the_old_keys() {
        let c = Config::default();
        assert_eq!(c.server.listen.port(), ports::QUEUE.0);
        assert_ne!(
            ports::QUEUE,
            ports::IMAGE,
            "queue and image must not collide"
        );
        assert_eq!(c.database.schema, "queue");

        let c = load(
            "committers = 2\n[server]\nlisten = \"127.0.0.1:0\"\n\
             [database]\nurl = \"postgres://q@127.0.0.1:5432/other\"\npool_size = 4\n",
        )
        .unwrap();
        assert_eq!(c.database.url, "postgres://q@127.0.0.1:5432/other");
        assert_eq!((c.database.pool_size, c.committers), (4, 2));
        assert_eq!(
            c.server.metrics_listen,
            Config::default().server.metrics_listen
        );

        // The keys that moved are refused by name, in one line.
        let e = load("database_url = \"postgres://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("database_url") && !e.contains('\n'), "{e}");
        let e = load("committers = 4\n[database]\npool_size = 4\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid configuration: committers must be at least 1 and below database.pool_size"
        );

        // Worker threads: absent is one per core; zero is refused.
        assert_eq!(Config::default().worker_threads, None);
        assert_eq!(
            load(
                "worker_threads = 1
"
            )
            .unwrap()
            .worker_threads,
            Some(1)
        );
        let e = load(
            "worker_threads = 0
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("worker_threads must be between 1 and 1024"),
            "{e}"
        );
    }
}
