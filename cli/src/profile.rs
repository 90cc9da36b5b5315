//! Credentials, as OpenStack's `OS_*` variables and clouds.yaml work: a
//! profile file (`--profile`, `CIRRUS_PROFILE`) overridden by `CIRRUS_*`
//! environment variables, and a token cached beside the profile.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// The identity endpoint, e.g. http://127.0.0.1:5050.
    pub url: String,
    pub username: String,
    pub password: String,
    pub user_domain_name: String,
    /// Empty: an unscoped token.
    pub project_name: String,
    pub project_domain_name: String,
    /// Use this token instead of a password.
    pub token: String,
    /// For `https://` URLs: the cluster's trust bundle (PEM).
    pub ca_cert: String,
    /// The service expected at `url` (its certificate's SPIFFE id); default `identity`.
    pub server_name: String,
    /// An operator certificate and key, for mTLS to an internal endpoint.
    pub client_cert: String,
    pub client_key: String,
}

impl Profile {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let path = path.filter(|p| p.exists());
        let mut p: Profile = runtime::config::load(path)?;
        if p.url.is_empty() {
            p.url = "http://127.0.0.1:5050".into();
        }
        if p.user_domain_name.is_empty() {
            p.user_domain_name = "Default".into();
        }
        if p.project_domain_name.is_empty() {
            p.project_domain_name = "Default".into();
        }
        if p.server_name.is_empty() {
            p.server_name = "identity".into();
        }
        Ok(p)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        write_private(path, text.as_bytes())
    }

    pub fn check_password_login(&self) -> anyhow::Result<()> {
        if self.username.is_empty() || self.password.is_empty() {
            bail!(
                "no credentials: set CIRRUS_PROFILE to a profile file (cirrus up writes one) \
                 or CIRRUS_USERNAME and CIRRUS_PASSWORD"
            );
        }
        Ok(())
    }
}

/// The profile path: `--profile`, else `CIRRUS_PROFILE`, else `~/.config/cirrus/profile.toml`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/cirrus/profile.toml"))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A token cached beside the profile, reused until shortly before it expires.
#[derive(Debug, Serialize, Deserialize)]
pub struct CachedToken {
    pub token: String,
    pub expires_at: i64,
    pub username: String,
    pub project_name: String,
    pub url: String,
}

pub fn cache_path(profile: Option<&Path>) -> Option<PathBuf> {
    profile.map(|p| p.with_extension("token"))
}

pub fn read_cache(path: &Path, p: &Profile) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let c: CachedToken = serde_json::from_str(&text).ok()?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let fits = c.username == p.username && c.project_name == p.project_name && c.url == p.url;
    (fits && c.expires_at > now + 60).then_some(c.token)
}
