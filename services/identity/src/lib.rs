//! The Cirrus identity service, a Keystone v3 equivalent.
//!
//! - [`service`]: the domain logic (authentication, tokens, keys, revocation
//!   rules, domains, projects, users, roles, catalog, bootstrap);
//! - [`grpc`]: the `identity.v1` gRPC adapter that validates requests;
//! - [`repo`]: every SQL statement; [`keys`]: the signing key repository on
//!   disk; [`password`]: argon2id; [`policy`]: who may call what.
//!
//! [`run`] serves it all on a listener until shutdown.

pub mod error;
pub mod grpc;
pub mod keys;
pub mod model;
pub mod password;
pub mod policy;
pub mod repo;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proto::identity::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use service::{Bootstrap, DEFAULT_DOMAIN, Identity};

pub mod migrations {
    //! The identity schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The identity service's configuration (see `runtime::config` for how it loads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the gRPC API listens.
    pub listen: SocketAddr,
    /// Where Prometheus `/metrics` is served; none to serve no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// A Postgres URL; the service works in `schema` only.
    pub database_url: String,
    pub schema: String,
    pub db_pool_size: usize,
    /// The signing key repository (mode 0700).
    pub key_dir: PathBuf,
    /// Keys kept: staged + primary + secondaries.
    pub max_active_keys: usize,
    /// Token lifetime.
    pub token_ttl_secs: u64,
    /// Consecutive failed logins that lock an account; 0 disables lockout.
    pub lockout_failure_attempts: u32,
    pub lockout_duration_secs: u64,
    pub password_hash: password::HashParams,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5050)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9150))),
            database_url: "postgres://postgres@127.0.0.1:5432/cirrus".into(),
            schema: "identity".into(),
            db_pool_size: 16,
            key_dir: PathBuf::from(".state/identity/keys"),
            max_active_keys: 3,
            token_ttl_secs: 3600,
            lockout_failure_attempts: 6,
            lockout_duration_secs: 1800,
            password_hash: password::HashParams::default(),
        }
    }
}

impl Config {
    /// Checks what serde cannot, before anything binds or connects.
    pub fn validate(&self) -> Result<(), runtime::config::ConfigError> {
        let bad = |m: &str| Err(runtime::config::ConfigError(m.to_string()));
        if self.token_ttl_secs == 0 || self.token_ttl_secs > 30 * 24 * 3600 {
            return bad("token_ttl_secs must be between 1 and 2592000 (30 days)");
        }
        if self.max_active_keys < 3 {
            return bad("max_active_keys must be at least 3");
        }
        if self.db_pool_size == 0 {
            return bad("db_pool_size must be at least 1");
        }
        if self.password_hash.memory_kib < 8 * self.password_hash.parallelism
            || self.password_hash.iterations == 0
        {
            return bad(
                "password_hash: memory_kib must be at least 8 x parallelism and iterations at least 1",
            );
        }
        if self.database_url.is_empty() {
            return bad("database_url is required");
        }
        Ok(())
    }
}

/// Every gRPC service name this server reports in `grpc.health.v1`.
pub const SERVICE_NAMES: [&str; 5] = [
    "identity.v1.Tokens",
    "identity.v1.Resources",
    "identity.v1.Users",
    "identity.v1.Roles",
    "identity.v1.Catalog",
];

/// Starts the service (migrations, keys, revocations) and serves until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let identity = Identity::start(config).await?;
    serve(identity, listener, shutdown).await
}

/// Serves an already started [`Identity`] until `shutdown`.
pub async fn serve(
    identity: Identity,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (close, closed) = tokio::sync::watch::channel(false);
    let api = grpc::Api {
        id: identity.clone(),
        closed,
    };
    let routes = tonic::service::Routes::new(pb::tokens_server::TokensServer::new(api.clone()))
        .add_service(pb::resources_server::ResourcesServer::new(api.clone()))
        .add_service(pb::users_server::UsersServer::new(api.clone()))
        .add_service(pb::roles_server::RolesServer::new(api.clone()))
        .add_service(pb::catalog_server::CatalogServer::new(api));

    // Forget revocation rules older than any live token, once a minute.
    let pruner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = identity.prune().await {
                tracing::warn!(error = %e, "pruning revocation rules failed");
            }
        }
    });
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "identity serving");
    let shutdown = async move {
        shutdown.await;
        // End Watch streams so the graceful drain can finish.
        let _ = close.send(true);
    };
    let result = runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await;
    pruner.abort();
    result?;
    tracing::info!("identity stopped");
    Ok(())
}
