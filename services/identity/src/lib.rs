//! The Cirrus identity service, a Keystone v3 equivalent.
//!
//! Read it in this order (every Cirrus service has the same shape):
//!
//! - this file: [`Config`] (the shared `[server]` and `[database]` tables
//!   and identity's own keys), the [`runtime::process::Service`] impl that
//!   makes `main.rs` one line (and adds the `bootstrap` subcommand), and
//!   [`run`], which serves until shutdown;
//! - [`grpc`]: the only tonic code; reads the caller (identity verifies
//!   bearer tokens itself: it issues them) and turns every request into a
//!   validated value of [`model`] with `TryFrom`;
//! - [`service`]: the domain logic; each method resolves what the request
//!   names, authorizes through [`policy`], and acts, in one place; reads
//!   answer `NotFound` for what the caller may not see;
//! - [`repo`]: every SQL statement, as functions over any
//!   `deadpool_postgres::GenericClient` (a connection or a transaction);
//! - [`keys`]: the signing keys every replica shares through the database,
//!   sealed with a key-encryption key from a file; [`sync`]: how replicas
//!   hear each other's changes (`LISTEN/NOTIFY`, resync on reconnect);
//!   [`password`]: argon2id.
//!
//! Errors are `runtime::error::Error` throughout; the client reads only its
//! safe half (`internal error`, `authentication failed`, ...).

pub mod grpc;
pub mod keys;
pub mod model;
pub mod password;
pub mod policy;
pub mod repo;
pub mod service;
pub mod sync;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use proto::identity::v1 as pb;
use runtime::config::{ConfigError, DatabaseConfig, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use service::{Bootstrap, DEFAULT_DOMAIN, Identity};

pub mod migrations {
    //! The identity schema's migrations, embedded in the binary.
    refinery::embed_migrations!("migrations");
    pub use self::migrations::runner;
}

/// The identity service's configuration (see `runtime::config` for how it
/// loads): the shared `[server]` and `[database]` tables, then its own keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This replica's key directory (mode 0700): it holds the
    /// key-encryption key file unless `key_encryption_key_file` says
    /// otherwise. Signing keys of an older version found here (files named
    /// by index) are imported once into the shared key set.
    pub key_dir: PathBuf,
    /// The key-encryption key (64 hex digits, mode 0600) that seals the
    /// shared signing keys; every replica on one database needs the same
    /// file. Default: `<key_dir>/kek`, created on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_encryption_key_file: Option<PathBuf>,
    /// Keys kept: staged + primary + secondaries.
    pub max_active_keys: usize,
    /// Token lifetime.
    pub token_ttl_secs: u64,
    /// Consecutive failed logins that lock an account; 0 disables lockout.
    pub lockout_failure_attempts: u32,
    pub lockout_duration_secs: u64,
    pub password_hash: password::HashParams,
    /// Where the gRPC API and `/metrics` listen.
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    /// Postgres; the service works in `database.schema` only.
    pub database: DatabaseConfig,
}

impl Default for Config {
    fn default() -> Self {
        let (grpc, metrics) = ports::IDENTITY;
        Self {
            key_dir: PathBuf::from(".state/identity/keys"),
            key_encryption_key_file: None,
            max_active_keys: 3,
            token_ttl_secs: 3600,
            lockout_failure_attempts: 6,
            lockout_duration_secs: 1800,
            password_hash: password::HashParams::default(),
            server: ServerConfig::loopback(grpc, metrics),
            socket: None,
            database: DatabaseConfig::local("identity"),
        }
    }
}

impl Config {
    /// Where the key-encryption key is read from.
    pub fn kek_path(&self) -> PathBuf {
        self.key_encryption_key_file
            .clone()
            .unwrap_or_else(|| self.key_dir.join("kek"))
    }
}

// `identity bootstrap`: what `keystone-manage bootstrap` takes.
#[derive(clap::Args)]
#[command(
    about = "Create (idempotently) the default domain, roles, admin project and user, and the catalog entries"
)]
struct BootstrapArgs {
    #[arg(long, default_value = "admin")]
    admin_user: String,
    #[arg(long, env = "CIRRUS_ADMIN_PASSWORD")]
    admin_password: String,
    #[arg(long, default_value = "admin")]
    admin_project: String,
    #[arg(long, default_value = "RegionOne")]
    region: String,
    /// The public endpoint URL; defaults to http://<server.listen>.
    #[arg(long)]
    public_url: Option<String>,
    /// The internal endpoint URL; defaults to the public one.
    #[arg(long)]
    internal_url: Option<String>,
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "identity";
    const ABOUT: &'static str = "Cirrus identity service (Keystone)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.token_ttl_secs == 0 || self.token_ttl_secs > 30 * 24 * 3600 {
            return bad("token_ttl_secs must be between 1 and 2592000 (30 days)");
        }
        if self.max_active_keys < 3 {
            return bad("max_active_keys must be at least 3");
        }
        if self.password_hash.memory_kib < 8 * self.password_hash.parallelism
            || self.password_hash.iterations == 0
        {
            return bad(
                "password_hash: memory_kib must be at least 8 x parallelism and iterations at least 1",
            );
        }
        self.database.validate()
    }

    fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, listener, shutdown)
    }

    fn commands() -> Vec<clap::Command> {
        use clap::Args;
        vec![BootstrapArgs::augment_args(clap::Command::new("bootstrap"))]
    }

    async fn command(self, name: &str, args: &clap::ArgMatches) -> anyhow::Result<()> {
        use clap::FromArgMatches;
        anyhow::ensure!(name == "bootstrap", "unknown command {name}");
        let a = BootstrapArgs::from_arg_matches(args)?;
        let public = a
            .public_url
            .unwrap_or_else(|| format!("http://{}", self.server.listen));
        let internal = a.internal_url.unwrap_or_else(|| public.clone());
        let id = Identity::start(self).await?;
        id.bootstrap(&Bootstrap {
            admin_user: a.admin_user,
            admin_password: a.admin_password,
            admin_project: a.admin_project,
            region: a.region,
            endpoints: vec![
                (model::Interface::Public, public),
                (model::Interface::Internal, internal),
            ],
        })
        .await
        .map_err(|e| {
            let detail = e.internal_detail().map(str::to_owned);
            anyhow::anyhow!(
                "bootstrap failed: {}",
                detail.unwrap_or_else(|| e.to_string())
            )
        })?;
        println!("bootstrap complete");
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
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::process::Service::validate(&config)?;
    let identity = Identity::start(config).await?;
    serve(identity, listener, shutdown).await
}

/// Serves an already started [`Identity`] until `shutdown`.
pub async fn serve(
    identity: Identity,
    listener: impl Into<runtime::local::Listener>,
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

    // Hear the other replicas' changes (and resync after any gap).
    let listener_task = tokio::spawn(sync::listen(
        identity.clone(),
        identity.database_url().to_string(),
    ));
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
    let listener: runtime::local::Listener = listener.into();
    let addr = listener.describe();
    tracing::info!(%addr, "identity serving");
    let shutdown = async move {
        shutdown.await;
        // End Watch streams so the graceful drain can finish.
        let _ = close.send(true);
    };
    let result = runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await;
    pruner.abort();
    listener_task.abort();
    result?;
    tracing::info!("identity stopped");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.toml");
        std::fs::write(&path, text).unwrap();
        runtime::config::load::<Config>(Some(&path))
    }

    #[test]
    fn the_shared_tables_load_and_the_old_flat_keys_are_refused_by_name() {
        let c = load(
            "token_ttl_secs = 600\n[server]\nlisten = \"127.0.0.1:7000\"\n\
             [database]\nurl = \"postgres://db/x\"\n",
        )
        .unwrap();
        assert_eq!(c.token_ttl_secs, 600);
        assert_eq!(c.server.listen.port(), 7000);
        // What the file leaves out keeps its default, table by table.
        assert_eq!(
            c.server.metrics_listen,
            Config::default().server.metrics_listen
        );
        assert_eq!(c.database.url, "postgres://db/x");
        assert_eq!(c.database.schema, "identity");
        assert_eq!(c.server.listen.ip().to_string(), "127.0.0.1");
        assert_eq!(Config::default().server.listen.port(), ports::IDENTITY.0);

        for old in [
            "listen",
            "metrics_listen",
            "database_url",
            "schema",
            "db_pool_size",
        ] {
            let e = load(&format!("{old} = \"x\"\n")).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown field: found `{old}`")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        use runtime::process::Service;
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.token_ttl_secs = 0).contains("token_ttl_secs"));
        assert!(bad(|c| c.max_active_keys = 2).contains("max_active_keys"));
        assert!(bad(|c| c.database.pool_size = 0).contains("database.pool_size"));
        assert!(bad(|c| c.database.url.clear()).contains("database.url"));
        assert!(Config::default().validate().is_ok());
    }
}
