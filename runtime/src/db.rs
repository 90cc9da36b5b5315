//! Postgres: one schema and one login role per service, a connection pool
//! whose sessions live in that schema, and versioned migrations (refinery)
//! that run at start-up.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

pub use deadpool_postgres;
pub use tokio_postgres;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// the database URL cannot be parsed
    #[error("invalid database url: {0}")]
    Url(String),
    /// schema and role names are plain identifiers
    #[error("invalid schema name {0:?}: use lower-case letters, digits and _")]
    Schema(String),
    #[error("database error: {}", detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool error: {0}")]
    Pool(String),
    #[error("migration failed: {0}")]
    Migration(String),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e.to_string())
    }
}

/// A Postgres error with the server's own message, which `Display` leaves out.
pub fn detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn check_ident(name: &str) -> Result<&str, DbError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(name)
    } else {
        Err(DbError::Schema(name.to_string()))
    }
}

fn parse(url: &str) -> Result<tokio_postgres::Config, DbError> {
    tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))
}

/// A pool whose every session has `search_path` set to `schema`.
pub fn pool(url: &str, schema: &str, max_size: usize) -> Result<Pool, DbError> {
    let mut cfg = parse(url)?;
    cfg.options(format!("-c search_path={}", check_ident(schema)?));
    cfg.connect_timeout(Duration::from_secs(5));
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Creates `schema` if needed and applies the service's migrations to it.
/// Migrations are recorded in `<schema>.refinery_schema_history`.
pub async fn migrate(pool: &Pool, schema: &str, runner: refinery::Runner) -> Result<(), DbError> {
    let mut client = pool.get().await?;
    // A service role owns its schema but may not create schemas in the
    // database, so only create it when it is missing (tests, dev superuser).
    let exists = client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                check_ident(schema)?
            ))
            .await?;
    }
    let client: &mut tokio_postgres::Client = &mut client;
    runner
        .run_async(client)
        .await
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(())
}

/// Connects once, for administrative statements.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, DbError> {
    let mut cfg = parse(url)?;
    cfg.connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "admin connection closed");
        }
    });
    Ok(client)
}

/// As a superuser at `admin_url`: makes the login role `cirrus_<service>`
/// and the schema `<schema>` it owns, idempotently. Returns the URL the
/// service should use (the same server and database, as that role).
pub async fn provision(admin_url: &str, service_schema: &str) -> Result<String, DbError> {
    let schema = check_ident(service_schema)?;
    let role = format!("cirrus_{schema}");
    let client = connect(admin_url).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_some();
    if !exists {
        // Another provisioner may create the role at the same moment; that is fine.
        if let Err(e) = client
            .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
            .await
        {
            let raced = client
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
                .await?
                .is_some();
            if !raced {
                return Err(e.into());
            }
        }
    }
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}; \
             ALTER SCHEMA {schema} OWNER TO {role}"
        ))
        .await?;
    let mut cfg = parse(admin_url)?;
    cfg.user(&role);
    Ok(url_for(&cfg))
}

/// Writes a connection config back as a `postgres://` URL (no password: the
/// dev cluster trusts loopback).
fn url_for(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{}:{}/{}",
        cfg.get_user().unwrap_or("postgres"),
        host,
        port,
        cfg.get_dbname().unwrap_or("postgres")
    )
}

/// Whether a Postgres server answers at `url` within a second.
pub async fn reachable(url: &str) -> bool {
    let Ok(mut cfg) = parse(url) else {
        return false;
    };
    cfg.connect_timeout(Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(2), cfg.connect(NoTls))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A database of its own for one test, dropped when the value is dropped.
/// The server comes from `CIRRUS_TEST_DATABASE_URL`, else the local default.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDatabase {
    pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    pub async fn create() -> Result<Self, DbError> {
        let admin_url = std::env::var("CIRRUS_TEST_DATABASE_URL")
            .unwrap_or_else(|_| Self::DEFAULT_ADMIN_URL.to_string());
        let name = format!("cirrus_test_{}", uuid::Uuid::new_v4().simple());
        let client = connect(&admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let mut cfg = parse(&admin_url)?;
        cfg.dbname(&name);
        Ok(Self {
            url: url_for(&cfg),
            admin_url,
            name,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside or outside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(c) = connect(&admin_url).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        assert!(check_ident("identity").is_ok());
        assert!(check_ident("compute_api2").is_ok());
        for bad in ["", "Identity", "x;drop", "1abc", "a-b"] {
            assert!(check_ident(bad).is_err(), "{bad}");
        }
    }
}
