//! Configuration: a service's `Config` struct is filled from its `Default`,
//! then an optional TOML file, then `CIRRUS_<FIELD>` environment variables
//! (nested fields with `__`, e.g. `CIRRUS_LOCKOUT__ATTEMPTS`). Only variables
//! naming a field of this service's config are read, so one environment can
//! hold the settings of several services and tools.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The prefix of every Cirrus environment variable.
pub const ENV_PREFIX: &str = "CIRRUS_";

/// A configuration that could not be loaded or is invalid; the message is one line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Loads `C` from its defaults, then `file` (which must exist when given), then the environment.
pub fn load<C>(file: Option<&Path>) -> Result<C, ConfigError>
where
    C: Default + Serialize + DeserializeOwned,
{
    let defaults = Serialized::defaults(C::default());
    let known: Vec<String> = defaults
        .data()
        .map_err(|e| ConfigError(e.to_string()))?
        .values()
        .flat_map(|dict| dict.keys().cloned())
        .collect();

    let mut figment = Figment::from(defaults);
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError(format!(
                "config file {} not found",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file(path));
    }
    let env = Env::prefixed(ENV_PREFIX).split("__").filter(move |key| {
        let top = key.as_str().split('.').next().unwrap_or_default();
        known.iter().any(|k| k.eq_ignore_ascii_case(top))
    });
    figment
        .merge(env)
        .extract()
        .map_err(|e| ConfigError(one_line(&e.to_string())))
}

/// The `[server]` table every service shares: where its gRPC API and its
/// Prometheus `/metrics` listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the gRPC API listens (loopback: the sidecar fronts it).
    pub listen: SocketAddr,
    /// Where Prometheus `/metrics` is served; absent to serve none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ServerConfig {
    /// Loopback on `port`, metrics on `metrics_port`: the defaults of [`ports`].
    pub fn loopback(port: u16, metrics_port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], metrics_port))),
        }
    }
}

/// A Unix domain socket a service and its sidecar share (issue 13: nothing
/// local may bypass the sidecar). A service whose config carries one (a
/// `[socket]` table, returned by `runtime::process::Service::socket`) listens
/// only there, not on TCP; a sidecar connects to it (`upstream_socket`) and
/// serves its outbound side on one (`[outbound_socket]`).
///
/// Who may connect is decided by the file system: the socket is created
/// with `mode` (0660: owner and group), owned by `group` when given (the
/// group the service's user and its sidecar's user share), in a directory
/// that admits no other user (created 0750 when missing; a directory that
/// grants "other" any access is refused at start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// The socket's path, e.g. `.state/run/identity/api.sock`.
    pub path: std::path::PathBuf,
    /// The group to own the socket (and the directory when it is created):
    /// a name from `/etc/group` or a numeric gid; absent keeps the process's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The socket's permission bits (connecting needs write permission).
    #[serde(default = "SocketConfig::default_mode")]
    pub mode: u32,
}

impl SocketConfig {
    /// Owner and group read/write, nothing for others.
    pub const DEFAULT_MODE: u32 = 0o660;

    fn default_mode() -> u32 {
        Self::DEFAULT_MODE
    }

    /// A socket at `path` with the default mode and the process's group.
    pub fn at(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            path: path.into(),
            group: None,
            mode: Self::DEFAULT_MODE,
        }
    }

    /// Checks what serde cannot: a path, and a mode that admits no other user.
    pub fn validate(&self, what: &str) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError(format!("{what}.path is required")));
        }
        if self.mode & !0o777 != 0 {
            return Err(ConfigError(format!(
                "{what}.mode {:o} has bits beyond 0777",
                self.mode
            )));
        }
        if self.mode & 0o007 != 0 {
            return Err(ConfigError(format!(
                "{what}.mode {:o} lets any local user connect: use 0660 or 0600",
                self.mode
            )));
        }
        Ok(())
    }
}

/// The `[database]` table of every service that owns state: a Postgres URL
/// and the one schema the service works in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub schema: String,
    pub pool_size: usize,
}

impl DatabaseConfig {
    /// The local default server, database `cirrus`, this schema.
    pub fn local(schema: &str) -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/cirrus".into(),
            schema: schema.into(),
            pool_size: 16,
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.is_empty() {
            return Err(ConfigError("database.url is required".into()));
        }
        if self.schema.is_empty() {
            return Err(ConfigError("database.schema is required".into()));
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(ConfigError(
                "database.pool_size must be between 1 and 1024".into(),
            ));
        }
        Ok(())
    }
}

/// Every binary's default ports, in one table so that no two collide
/// (`cirrus up` assigns its own from a base; these are for a process run by hand).
pub mod ports {
    /// (gRPC, metrics) per service.
    pub const IDENTITY: (u16, u16) = (5050, 9150);
    pub const IMAGE: (u16, u16) = (5060, 9160);
    pub const QUEUE: (u16, u16) = (5070, 9170);
    pub const NETWORK: (u16, u16) = (5080, 9180);
    pub const VOLUME: (u16, u16) = (5090, 9190);
    pub const COMPUTE_API: (u16, u16) = (5100, 9200);
    pub const SCHEDULER: (u16, u16) = (5110, 9210);
    pub const CONDUCTOR: (u16, u16) = (5120, 9220);
    pub const COMPUTE_AGENT: (u16, u16) = (5130, 9230);
    pub const NETWORK_AGENT: (u16, u16) = (5140, 9240);
    /// The sidecar's internal (mTLS) listener; public and outbound follow.
    pub const SIDECAR: (u16, u16) = (5443, 9443);
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        listen: String,
        ttl_secs: u64,
    }

    #[test]
    fn a_socket_table_defaults_its_mode_and_refuses_modes_open_to_others() {
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct WithSocket {
            socket: Option<SocketConfig>,
        }
        let dir = std::env::temp_dir().join(format!("cirrus-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[socket]\npath = \"/run/x/api.sock\"\n").unwrap();
        let c: WithSocket = load(Some(&path)).unwrap();
        let s = c.socket.unwrap();
        assert_eq!(s, SocketConfig::at("/run/x/api.sock"));
        assert_eq!(s.mode, 0o660);
        s.validate("socket").unwrap();
        let open = SocketConfig {
            mode: 0o666,
            ..s.clone()
        };
        assert_eq!(
            open.validate("socket").unwrap_err().to_string(),
            "invalid configuration: socket.mode 666 lets any local user connect: use 0660 or 0600"
        );
        std::fs::write(
            &path,
            "[socket]\npath = \"/a\"\nmode = 0o600\ngroup = \"cirrus\"\n",
        )
        .unwrap();
        let s = load::<WithSocket>(Some(&path)).unwrap().socket.unwrap();
        assert_eq!((s.mode, s.group.as_deref()), (0o600, Some("cirrus")));
        assert!(WithSocket::default().socket.is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("cirrus-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "ttl_secs = 7\n").unwrap();
        let c: Sample = load(Some(&path)).unwrap();
        assert_eq!(c.ttl_secs, 7);

        std::fs::write(&path, "nonsense = 1\n").unwrap();
        let err = load::<Sample>(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
        assert!(!err.contains('\n'));

        std::fs::write(&path, "ttl_secs = \"soon\"\n").unwrap();
        assert!(load::<Sample>(Some(&path)).is_err());
        assert!(load::<Sample>(Some(&dir.join("missing.toml"))).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
