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
    pool_with(url, schema, max_size, &[])
}

/// [`pool`], with more session settings (`("synchronous_commit", "off")`).
pub fn pool_with(
    url: &str,
    schema: &str,
    max_size: usize,
    settings: &[(&str, &str)],
) -> Result<Pool, DbError> {
    let mut cfg = parse(url)?;
    let mut options = format!("-c search_path={}", check_ident(schema)?);
    for (k, v) in settings {
        options.push_str(&format!(" -c {}={}", check_ident(k)?, check_ident(v)?));
    }
    cfg.options(options);
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

/// One pooled connection that concurrent short reads share.
///
/// tokio-postgres pipelines the statements of concurrent callers on one
/// connection: a burst of reads reaches one backend in one packet, and that
/// backend answers them back to back from one wake-up, where a connection
/// per caller wakes a backend per statement. On a small machine a wake-up
/// costs more than a short read (pgbench here: eight `SELECT 1` pipelined
/// on one connection cost a quarter of eight on eight connections). Use it
/// only for short reads outside any transaction: a slow statement delays
/// the ones queued behind it, and a transaction cannot be opened on a
/// shared connection. A connection found closed is replaced by the next
/// caller; callers holding the old one see its error once.
pub struct SharedReads {
    pool: Pool,
    slot: std::sync::Mutex<Option<std::sync::Arc<deadpool_postgres::Client>>>,
}

impl SharedReads {
    pub fn new(pool: Pool) -> Self {
        SharedReads {
            pool,
            slot: std::sync::Mutex::new(None),
        }
    }

    /// The shared connection, taken from the pool (and kept out of it) the
    /// first time and after it closed.
    pub async fn get(&self) -> Result<std::sync::Arc<deadpool_postgres::Client>, DbError> {
        if let Some(c) = self.open() {
            return Ok(c);
        }
        let fresh = std::sync::Arc::new(self.pool.get().await?);
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            // Another caller replaced it meanwhile: share theirs (ours goes
            // back to the pool when dropped).
            Some(c) if !c.is_closed() => Ok(c.clone()),
            _ => {
                *slot = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    fn open(&self) -> Option<std::sync::Arc<deadpool_postgres::Client>> {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().filter(|c| !c.is_closed()).cloned()
    }
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

/// Gives the planner statistics for the schema's tables that were never
/// analyzed, for a service whose tables stay small (identity's domains,
/// projects, roles): often below autovacuum's threshold (50 changed rows)
/// forever, and a never-analyzed table is planned as if it held at least 10
/// pages of rows: hash joins and sorts where an index probe would do.
/// Measured on identity's re-scope statement: 15–20 % less Postgres time per
/// execution once its tables had statistics. Not for tables that grow fast
/// (the queue's): a plan made while they are empty would outlive that until
/// autovacuum analyzes them.
pub async fn analyze_unseen(client: &tokio_postgres::Client, schema: &str) -> Result<(), DbError> {
    let tables = client
        .query(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'r' AND c.reltuples < 0",
            &[&schema],
        )
        .await?;
    for t in tables {
        let name: String = t.get(0);
        // The schema is checked as every schema name here is; table names
        // come from our own migrations and are quoted all the same.
        let quoted = format!("{}.\"{}\"", check_ident(schema)?, name.replace('"', "\"\""));
        client.batch_execute(&format!("ANALYZE {quoted}")).await?;
    }
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

    #[allow(clippy::unwrap_used, clippy::expect_used)]
    #[tokio::test]
    async fn a_pool_with_settings_sets_them_on_its_sessions_only() {
        let db = TestDatabase::create().await.expect("Postgres at 127.0.0.1");
        let show = |p: Pool| async move {
            let c = p.get().await.unwrap();
            let row = c.query_one("SHOW synchronous_commit", &[]).await.unwrap();
            let path = c.query_one("SHOW search_path", &[]).await.unwrap();
            (row.get::<_, String>(0), path.get::<_, String>(0))
        };
        let relaxed = pool_with(&db.url, "svc", 2, &[("synchronous_commit", "off")]).unwrap();
        assert_eq!(show(relaxed).await, ("off".to_string(), "svc".to_string()));
        let durable = pool(&db.url, "svc", 2).unwrap();
        assert_eq!(show(durable).await, ("on".to_string(), "svc".to_string()));
        // Settings are identifiers: nothing else reaches the options string.
        assert!(pool_with(&db.url, "svc", 2, &[("work_mem", "1MB -c x=y")]).is_err());
    }

    #[allow(clippy::unwrap_used, clippy::expect_used)]
    #[tokio::test]
    async fn tables_never_analyzed_get_statistics_and_others_are_left_alone() {
        let db = TestDatabase::create().await.expect("Postgres at 127.0.0.1");
        let c = connect(&db.url).await.unwrap();
        c.batch_execute(
            "CREATE SCHEMA svc; CREATE TABLE svc.fresh (id int); CREATE TABLE svc.\"Odd\"\"name\" (id int); \
             CREATE TABLE public.elsewhere (id int)",
        )
        .await
        .unwrap();
        let unseen = |schema: &'static str| {
            let c = &c;
            async move {
                c.query(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind = 'r' AND c.reltuples < 0 ORDER BY 1",
                    &[&schema],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
            }
        };
        assert_eq!(unseen("svc").await, ["Odd\"name", "fresh"]);
        analyze_unseen(&c, "svc").await.unwrap();
        assert!(unseen("svc").await.is_empty());
        // Another schema is not this service's.
        assert_eq!(unseen("public").await, ["elsewhere"]);
    }

    #[allow(clippy::unwrap_used, clippy::expect_used)]
    #[tokio::test]
    async fn shared_reads_share_one_backend_and_survive_its_death() {
        let db = TestDatabase::create().await.expect("Postgres at 127.0.0.1");
        let shared = SharedReads::new(pool(&db.url, "public", 4).unwrap());
        let pid = |c: std::sync::Arc<deadpool_postgres::Client>| async move {
            let row = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap();
            row.get::<_, i32>(0)
        };
        // Sixteen concurrent reads: one backend answers them all.
        let mut reads = Vec::new();
        for _ in 0..16 {
            let c = shared.get().await.unwrap();
            reads.push(tokio::spawn(pid(c)));
        }
        let mut pids = Vec::new();
        for r in reads {
            pids.push(r.await.unwrap());
        }
        pids.dedup();
        assert_eq!(pids.len(), 1, "backends seen: {pids:?}");

        // The backend is killed: the next caller gets a fresh connection.
        let admin = connect(&db.url).await.unwrap();
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
            .await
            .unwrap();
        // Callers holding the old connection see its error; a later caller
        // gets a fresh backend (bounded: each try is one statement).
        let mut seen = Vec::new();
        for _ in 0..50 {
            let c = shared.get().await.unwrap();
            match c.query_one("SELECT pg_backend_pid()", &[]).await {
                Ok(row) if row.get::<_, i32>(0) != pids[0] => return,
                Ok(_) => seen.push("the killed backend answered".to_string()),
                Err(e) => seen.push(e.to_string()),
            }
        }
        panic!("no fresh connection after 50 tries: {seen:?}");
    }
}
