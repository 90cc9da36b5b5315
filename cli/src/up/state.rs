//! A state directory: where a cloud's files live, and what it remembers
//! between runs ([`Cluster`]: its id, its Postgres and its own database).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Where everything lives in a state directory.
pub struct State {
    pub dir: PathBuf,
}

impl State {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        Ok(Self { dir })
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }
    /// `run/<service>/`: the service's socket and its sidecar's outbound socket.
    pub fn run_dir(&self, service: &str) -> PathBuf {
        self.dir.join("run").join(service)
    }
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    /// The pid of the `cirrus up` running from here, if it is alive.
    pub fn running(dir: &Path) -> Option<u32> {
        read_pid(&dir.join("up.pid")).filter(|p| pid_alive(*p))
    }
}

/// What a state directory remembers between runs (`cluster.toml`).
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// This cloud's id, made on its first `up`; its database is claimed with it.
    pub id: String,
    /// A superuser URL for the Postgres server in use.
    pub admin_url: String,
    /// This cloud's own database on that server (`cirrus_<id prefix>`).
    pub database: String,
    /// Set when Cirrus runs its own private Postgres in the state directory.
    pub private_pg_port: Option<u16>,
    /// The host name of this machine's agents, kept between runs: servers
    /// are placed on a host by name, so a renamed host would orphan them.
    pub host: String,
    /// The OVS integration bridge this cloud's network agent owns.
    pub bridge: String,
}

impl Cluster {
    /// The remembered record, with an id and a database name made for a new
    /// state directory. A state directory from before databases were per
    /// cloud keeps the shared `cirrus` database it used (claimed on its
    /// next `up`, so that only one such directory can keep it).
    pub fn load(state: &State) -> anyhow::Result<Self> {
        let path = state.path("cluster.toml");
        let mut c: Cluster = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let c: Cluster = toml::from_str(&text)
                    .with_context(|| format!("{} is not a cluster record", path.display()))?;
                if c.database.is_empty() {
                    Cluster {
                        database: "cirrus".into(),
                        ..c
                    }
                } else {
                    c
                }
            }
            Err(_) => Cluster::default(),
        };
        if c.id.is_empty() {
            c.id = uuid::Uuid::new_v4().to_string();
        }
        if c.database.is_empty() {
            c.database = format!("cirrus_{}", &c.id.replace('-', "")[..8]);
        }
        Ok(c)
    }

    /// The prefix of this cloud's network namespaces: its own, so that two
    /// clouds on one machine never remove each other's.
    pub fn namespace_prefix(&self) -> String {
        format!("cirrus-{}-", &self.id.replace('-', "")[..6])
    }

    pub fn save(&self, state: &State) -> anyhow::Result<()> {
        std::fs::write(state.path("cluster.toml"), toml::to_string(self)?)?;
        Ok(())
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Sends SIGTERM (through kill(1), so the CLI needs no unsafe code).
pub async fn terminate(pid: u32) {
    let _ = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_new_state_dir_gets_its_own_database_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path()).unwrap();
        let c = Cluster::load(&state).unwrap();
        assert!(
            c.database.starts_with("cirrus_") && c.database.len() == 15,
            "{c:?}"
        );
        c.save(&state).unwrap();
        assert_eq!(Cluster::load(&state).unwrap(), c);

        let other = tempfile::tempdir().unwrap();
        let d = Cluster::load(&State::new(other.path()).unwrap()).unwrap();
        assert_ne!(d.id, c.id);
        assert_ne!(d.database, c.database);
    }

    #[test]
    fn a_state_dir_from_before_keeps_the_shared_database() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path()).unwrap();
        std::fs::write(
            state.path("cluster.toml"),
            "admin_url = \"postgres://postgres@127.0.0.1:5432/postgres\"\n",
        )
        .unwrap();
        let c = Cluster::load(&state).unwrap();
        assert_eq!(c.database, "cirrus");
        assert!(!c.id.is_empty());
    }
}
