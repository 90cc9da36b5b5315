//! Who the CLI is and how it reaches the cloud, as OpenStack's `OS_*`
//! variables and clouds.yaml work: a [`Profile`] file (`--profile`,
//! `CIRRUS_PROFILE`) overridden by `CIRRUS_*` environment variables, a
//! [`channel`] (plaintext, TLS with the cluster CA, or mTLS with an operator
//! certificate), and a token cached beside the profile so that consecutive
//! commands log in once. Every noun module starts from [`Session::open`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use proto::identity::v1 as pb;
use proto::identity::v1::{
    catalog_client::CatalogClient, resources_client::ResourcesClient, roles_client::RolesClient,
    tokens_client::TokensClient, users_client::UsersClient,
};
use serde::{Deserialize, Serialize};
use tonic::Request;
use tonic::transport::Channel;

/// Every call gets this deadline.
pub const DEADLINE: Duration = Duration::from_secs(30);

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
        for (field, default) in [
            (&mut p.url, "http://127.0.0.1:5050"),
            (&mut p.user_domain_name, "Default"),
            (&mut p.project_domain_name, "Default"),
            (&mut p.server_name, "identity"),
        ] {
            if field.is_empty() {
                *field = default.into();
            }
        }
        Ok(p)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        write_private(path, text.as_bytes())
    }

    fn check_password_login(&self) -> anyhow::Result<()> {
        if self.username.is_empty() || self.password.is_empty() {
            bail!(
                "no credentials: set CIRRUS_PROFILE to a profile file (cirrus up writes one) \
                 or CIRRUS_USERNAME and CIRRUS_PASSWORD"
            );
        }
        Ok(())
    }

    fn password_request(&self) -> pb::AuthenticateRequest {
        let scope = (!self.project_name.is_empty()).then(|| pb::Scope {
            target: Some(pb::scope::Target::Project(pb::ProjectScope {
                name: self.project_name.clone(),
                domain_name: self.project_domain_name.clone(),
                ..Default::default()
            })),
        });
        pb::AuthenticateRequest {
            method: Some(pb::authenticate_request::Method::Password(
                pb::PasswordCredentials {
                    user_name: self.username.clone(),
                    user_domain_name: self.user_domain_name.clone(),
                    password: self.password.clone(),
                    ..Default::default()
                },
            )),
            scope,
        }
    }
}

/// The profile path: `--profile`, else `CIRRUS_PROFILE`, else `~/.config/cirrus/profile.toml`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/cirrus/profile.toml"))
}

/// Writes a file only its owner can read, atomically. Each writer has its own
/// temporary file, so two commands refreshing the same token cache at once both
/// succeed (the last rename wins) instead of one renaming the other's file away.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // A NamedTempFile is created 0600 on Unix.
    let mut f = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing a temporary file in {}", dir.display()))?;
    f.write_all(bytes)?;
    f.as_file().sync_all()?;
    f.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A token cached beside the profile, reused until shortly before it expires.
#[derive(Debug, Serialize, Deserialize)]
struct CachedToken {
    token: String,
    expires_at: i64,
    username: String,
    project_name: String,
    url: String,
}

impl CachedToken {
    fn path(profile: Option<&Path>) -> Option<PathBuf> {
        profile.map(|p| p.with_extension("token"))
    }

    /// The cached token, if it was issued for this profile and lives another minute.
    fn read(profile_path: Option<&Path>, p: &Profile) -> Option<String> {
        let text = std::fs::read_to_string(Self::path(profile_path)?).ok()?;
        let c: CachedToken = serde_json::from_str(&text).ok()?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let fits = c.username == p.username && c.project_name == p.project_name && c.url == p.url;
        (fits && c.expires_at > now + 60).then_some(c.token)
    }
}

/// A channel to the profile's endpoint: plaintext for `http://`, TLS with
/// the cluster's CA for `https://` (plus the operator certificate if given).
pub async fn channel(p: &Profile) -> anyhow::Result<Channel> {
    let url = &p.url;
    let Some(rest) = url.strip_prefix("https://") else {
        return endpoint(url)?
            .connect()
            .await
            .with_context(|| format!("cannot reach {url}"));
    };
    if p.ca_cert.is_empty() {
        bail!(
            "{url} is https: set ca_cert in the profile (or CIRRUS_CA_CERT) to the cluster's bundle.pem"
        );
    }
    let client = match (p.client_cert.is_empty(), p.client_key.is_empty()) {
        (false, false) => Some((Path::new(&p.client_cert), Path::new(&p.client_key))),
        _ => None,
    };
    let tls = sidecar::tls::client_config(Path::new(&p.ca_cert), client)?;
    let connector = sidecar::connector::MeshConnector::with_config(tls);
    let authority = rest.split('/').next().unwrap_or(rest);
    connector.expect(authority, &p.server_name);
    endpoint(&format!("http://{authority}"))?
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("cannot reach {url}"))
}

fn endpoint(url: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid url {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(DEADLINE))
}

/// A request carrying a bearer token and the CLI's deadline.
pub fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(DEADLINE);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Authenticates with the profile's password and caches the token beside
/// the profile (when there is a profile file).
pub async fn login(
    p: &Profile,
    profile_path: Option<&Path>,
) -> anyhow::Result<pb::AuthenticateResponse> {
    p.check_password_login()?;
    let mut req = Request::new(p.password_request());
    req.set_timeout(DEADLINE);
    let issued = TokensClient::new(channel(p).await?)
        .authenticate(req)
        .await?
        .into_inner();
    if let Some(path) = CachedToken::path(profile_path) {
        let cached = CachedToken {
            token: issued.token.clone(),
            expires_at: issued
                .claims
                .as_ref()
                .and_then(|c| c.expires_at)
                .map(|t| t.seconds)
                .unwrap_or(0),
            username: p.username.clone(),
            project_name: p.project_name.clone(),
            url: p.url.clone(),
        };
        write_private(&path, serde_json::to_string(&cached)?.as_bytes())?;
    }
    Ok(issued)
}

/// A connected, authenticated client of the cloud.
pub struct Session {
    channel: Channel,
    token: String,
}

impl Session {
    /// A session with a token: `CIRRUS_TOKEN` / the profile's token, else
    /// the cached one, else a fresh login.
    pub async fn open(p: &Profile, profile_path: Option<&Path>) -> anyhow::Result<Self> {
        let token = if !p.token.is_empty() {
            p.token.clone()
        } else if let Some(t) = CachedToken::read(profile_path, p) {
            t
        } else {
            login(p, profile_path).await?.token
        };
        Ok(Self {
            channel: channel(p).await?,
            token,
        })
    }

    /// A session over an existing channel with a known token.
    pub fn new(channel: Channel, token: String) -> Self {
        Self { channel, token }
    }

    /// Wraps a request message with this session's token and deadline.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        with_token(msg, &self.token)
    }
    pub fn tokens(&self) -> TokensClient<Channel> {
        TokensClient::new(self.channel.clone())
    }
    pub fn resources(&self) -> ResourcesClient<Channel> {
        ResourcesClient::new(self.channel.clone())
    }
    pub fn users(&self) -> UsersClient<Channel> {
        UsersClient::new(self.channel.clone())
    }
    pub fn roles(&self) -> RolesClient<Channel> {
        RolesClient::new(self.channel.clone())
    }
    pub fn catalog(&self) -> CatalogClient<Channel> {
        CatalogClient::new(self.channel.clone())
    }
}

/// What every noun command receives: where the profile is (for the token
/// cache) and how to print.
pub struct Ctx<'a> {
    pub profile_path: Option<&'a Path>,
    pub out: &'a crate::output::Printer,
}

impl Ctx<'_> {
    pub fn profile(&self) -> anyhow::Result<Profile> {
        Profile::load(self.profile_path)
    }

    pub async fn session(&self) -> anyhow::Result<Session> {
        Session::open(&self.profile()?, self.profile_path).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    /// `cirrus` commands run at once share one token cache: every write succeeds,
    /// the file is whole and private, and no temporary file is left beside it.
    #[test]
    fn concurrent_private_writes_all_succeed_and_leave_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        super::write_private(&path, format!("writer {i}").repeat(100).as_bytes())
                            .expect("a concurrent write");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.split(' ').nth(1).unwrap().chars().next().unwrap();
        assert_eq!(text, format!("writer {first}").repeat(100), "a torn file");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["admin.token"], "stray files: {names:?}");
    }
}
