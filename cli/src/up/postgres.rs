//! The Postgres a cloud uses: `CIRRUS_DATABASE_URL`, else the server already
//! answering on 127.0.0.1:5432, else a private one in the state directory.
//! Each state directory has its own database on that server, and claims it
//! with its cluster id: a database claimed by another cloud is refused with
//! one line, never silently taken over (two clouds on one server used to
//! share `cirrus` and overwrite each other's admin and catalog).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

use super::state::{Cluster, State};

/// The database this cloud's services use, as a superuser URL; and whether
/// we started a private server (and must stop it).
pub struct Database {
    pub admin_url: String,
    pub private: bool,
}

pub async fn open(state: &State) -> anyhow::Result<Database> {
    let mut cluster = Cluster::load(state)?;
    let from_env = std::env::var("CIRRUS_DATABASE_URL").ok();
    if from_env.is_none() && cluster.private_pg_port.is_none() {
        let local = runtime::db::TestDatabase::DEFAULT_ADMIN_URL;
        cluster.admin_url = if runtime::db::reachable(local).await {
            local.into()
        } else {
            // The first free port from 5433, remembered: another state
            // directory's private server may hold 5433 already.
            let port = (5433..5533)
                .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
                .context("no free port for a private Postgres in 5433..5533")?;
            cluster.private_pg_port = Some(port);
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        };
    }
    let server_url = from_env
        .clone()
        .unwrap_or_else(|| cluster.admin_url.clone());
    let mut private = false;
    if from_env.is_none()
        && let Some(port) = cluster.private_pg_port
        && !runtime::db::reachable(&server_url).await
    {
        start_private(state, port).await?;
        private = true;
    }
    if !runtime::db::reachable(&server_url).await {
        bail!("Postgres does not answer at {server_url}");
    }
    // CIRRUS_DATABASE_URL names the very database to use; otherwise this cloud's own.
    let admin_url = match from_env {
        Some(url) => url,
        None => {
            ensure_database(&server_url, &cluster.database).await?;
            with_dbname(&server_url, &cluster.database)?
        }
    };
    claim(&admin_url, &cluster.id, &state.dir).await?;
    cluster.save(state)?;
    Ok(Database { admin_url, private })
}

/// Records `id` as the owner of the database at `url`, or refuses when
/// another cloud owns it. A copy of a state directory carries the same id:
/// it is told apart by the path the owner recorded, which still holds a
/// state directory with that id (a directory that was moved does not).
async fn claim(url: &str, id: &str, dir: &Path) -> anyhow::Result<()> {
    let db = url.rsplit('/').next().unwrap_or(url);
    let mut c = runtime::db::connect(url).await?;
    let tx = c.transaction().await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS public.cirrus_cloud (
             id text NOT NULL, state_dir text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now());
         LOCK TABLE public.cirrus_cloud IN EXCLUSIVE MODE",
    )
    .await?;
    let owner = tx
        .query_opt("SELECT id, state_dir FROM public.cirrus_cloud LIMIT 1", &[])
        .await?
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
    let here = dir.display().to_string();
    match owner {
        None => {
            tx.execute(
                "INSERT INTO public.cirrus_cloud (id, state_dir) VALUES ($1, $2)",
                &[&id, &here],
            )
            .await?;
        }
        Some((owner, owner_dir)) if owner != id => bail!(
            "database {db} belongs to another cloud ({owner}, state dir {owner_dir}); \
             refusing to take it over: give this cloud its own database"
        ),
        Some((_, owner_dir)) if owner_dir != here => {
            let original = Path::new(&owner_dir).join("cluster.toml");
            let copied = std::fs::read_to_string(original)
                .ok()
                .and_then(|t| toml::from_str::<Cluster>(&t).ok())
                .is_some_and(|c| c.id == id);
            if copied {
                bail!(
                    "database {db} belongs to the cloud of state dir {owner_dir}, which {here} is a copy of; \
                     refusing to share it: remove {here}/cluster.toml to make this a new cloud"
                );
            }
            tx.execute("UPDATE public.cirrus_cloud SET state_dir = $1", &[&here])
                .await?;
        }
        Some(_) => {}
    }
    tx.commit().await?;
    Ok(())
}

pub fn with_dbname(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, _) = url
        .rsplit_once('/')
        .context("database url has no database name")?;
    if !base.contains("://") {
        bail!("database url {url:?} is not a postgres:// url");
    }
    Ok(format!("{base}/{db}"))
}

async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("database name {name:?} must be letters, digits and _");
    }
    let c = runtime::db::connect(admin_url).await?;
    let exists = "SELECT 1 FROM pg_database WHERE datname = $1";
    if c.query_opt(exists, &[&name]).await?.is_none() {
        // Two clouds may create theirs at once; only our own name matters.
        if let Err(e) = c.batch_execute(&format!("CREATE DATABASE {name}")).await
            && c.query_opt(exists, &[&name]).await?.is_none()
        {
            return Err(e.into());
        }
    }
    Ok(())
}

fn pg_bin(tool: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(tool))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!("no PostgreSQL {tool} under /usr/lib/postgresql: install postgresql (apt-get install postgresql)")
    })
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(tool: &Path) -> Command {
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(tool);
        c
    } else {
        Command::new(tool)
    }
}

async fn chown_postgres(path: &Path) {
    let _ = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .await;
}

async fn start_private(state: &State, port: u16) -> anyhow::Result<()> {
    let data = state.path("pg");
    if !data.join("PG_VERSION").is_file() {
        std::fs::create_dir_all(&data)?;
        chown_postgres(&data).await;
        let status = as_postgres(&pg_bin("initdb")?)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-instructions"])
            .stdout(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("initdb failed for {}", data.display());
        }
    }
    let log = state.log("postgres");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    chown_postgres(&log).await;
    let status = as_postgres(&pg_bin("pg_ctl")?)
        .arg("-D")
        .arg(&data)
        .arg("-o")
        .arg(format!("-p {port} -c listen_addresses=127.0.0.1 -k /tmp"))
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "start"])
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("the private Postgres did not start; see {}", log.display());
    }
    Ok(())
}

pub async fn stop_private(state: &State) {
    if let Ok(pg_ctl) = pg_bin("pg_ctl") {
        let _ = as_postgres(&pg_ctl)
            .arg("-D")
            .arg(state.path("pg"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status()
            .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dbname_is_replaced() {
        assert_eq!(
            with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "cirrus")
                .ok()
                .as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/cirrus")
        );
        assert!(with_dbname("nonsense", "x").is_err());
    }

    #[tokio::test]
    async fn a_database_claimed_by_another_cloud_is_refused() {
        let db = runtime::db::TestDatabase::create().await.unwrap();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        claim(&db.url, "cloud-a", a.path()).await.unwrap();
        claim(&db.url, "cloud-a", a.path()).await.unwrap();
        let err = claim(&db.url, "cloud-b", b.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to another cloud (cloud-a"), "{err}");
        assert!(!err.contains('\n'));

        // A copy of a's state directory (same id, a still there) is refused too.
        let sa = State::new(a.path()).unwrap();
        Cluster {
            id: "cloud-a".into(),
            ..Default::default()
        }
        .save(&sa)
        .unwrap();
        let err = claim(&db.url, "cloud-a", b.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a copy of"), "{err}");
        // Moved: the old directory is gone, the claim follows the new path.
        std::fs::remove_file(sa.path("cluster.toml")).unwrap();
        claim(&db.url, "cloud-a", b.path()).await.unwrap();
    }
}
