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
