//! Configuration: a service's `Config` struct is filled from its `Default`,
//! then an optional TOML file, then `CIRRUS_<FIELD>` environment variables
//! (nested fields with `__`, e.g. `CIRRUS_LOCKOUT__ATTEMPTS`). Only variables
//! naming a field of this service's config are read, so one environment can
//! hold the settings of several services and tools.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;

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
