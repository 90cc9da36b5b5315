//! The sidecar's configuration (defaults → TOML → `CIRRUS_*` environment).
//! Like every service's, it nests the shared `[server]` table: `listen` is
//! the internal (mTLS) listener, the catalog's internal endpoint, and
//! `metrics_listen` serves Prometheus. The public and outbound listeners
//! stay top-level keys: no other service has them.

use std::net::SocketAddr;
use std::path::PathBuf;

use runtime::config::{ServerConfig, SocketConfig, ports};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The service this sidecar stands beside (its policy and SPIFFE name).
    pub service: String,
    /// `[server]`: `listen` = the mTLS listener for mesh peers (the catalog's
    /// internal endpoint); `metrics_listen` = Prometheus `/metrics`.
    pub server: ServerConfig,
    /// Server-TLS listener for users and their clients (the public endpoint); none to serve no public side.
    pub public_listen: Option<SocketAddr>,
    /// Plaintext loopback TCP listener the service calls `http://<service-name>`
    /// through; none for no outbound. Any local process can speak as this
    /// workload there: a development set-up (logged); use `[outbound_socket]`.
    pub outbound_listen: Option<SocketAddr>,
    /// `[outbound_socket]`: the Unix socket the service calls
    /// `http://<service-name>` through, which only the service's user and
    /// this sidecar's group can open (issue 13).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_socket: Option<SocketConfig>,
    /// The service itself on loopback TCP (development), and the authority
    /// requests to it carry.
    pub upstream: SocketAddr,
    /// The service's Unix socket (its `[socket] path`): when set, the
    /// service is reached there and `upstream` is only the authority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_socket: Option<PathBuf>,
    /// This workload's certificate, key and the trust bundle (PEM), re-read when they change.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// Where identity's `Watch` and catalog are: `https://` through identity's
    /// sidecar (mTLS), or `http://` straight to identity on loopback (identity's own sidecar).
    pub identity_url: String,
    /// The policy file for `service`.
    pub policy: PathBuf,
    /// Largest request message (bytes); a policy rule may override it per method.
    pub max_message_bytes: usize,
    /// Requests in flight beyond this are refused with UNAVAILABLE.
    pub max_concurrent_requests: usize,
    /// Deadline for a request without a shorter `grpc-timeout`.
    pub request_timeout_ms: u64,
    pub h2_max_concurrent_streams: u32,
    /// Largest request header block; a larger one is refused with
    /// RESOURCE_EXHAUSTED for that request alone (the connection carries on).
    pub max_header_bytes: u32,
    /// On SIGTERM, how long open requests get to finish.
    pub drain_secs: u64,
    /// Identity's longest token lifetime, after which revocation rules are dropped.
    pub max_token_ttl_secs: u64,
    /// Runtime worker threads of the binary; absent: one (as nginx's
    /// `worker_processes 1`: a request's tasks — the client connection, its
    /// stream, the upstream connection — then wake each other on one thread
    /// instead of across threads, measured cheaper per request; see the
    /// README); `0`: one per core. One sidecar runs beside every service,
    /// so a machine holds many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            service: String::new(),
            // No metrics listener unless asked for: several sidecars run on
            // one machine, and a default port would collide (with the
            // defaults merged under a file's `[server]`, a file cannot unset it).
            server: ServerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], ports::SIDECAR.0)),
                metrics_listen: None,
            },
            public_listen: None,
            outbound_listen: None,
            outbound_socket: None,
            upstream: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream_socket: None,
            cert: PathBuf::new(),
            key: PathBuf::new(),
            bundle: PathBuf::new(),
            identity_url: "https://127.0.0.1:5051".into(),
            policy: PathBuf::new(),
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 512,
            request_timeout_ms: 30_000,
            h2_max_concurrent_streams: 256,
            max_header_bytes: 16 * 1024,
            drain_secs: 10,
            max_token_ttl_secs: 3600,
            worker_threads: None,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), runtime::config::ConfigError> {
        let bad = |m: String| Err(runtime::config::ConfigError(m));
        if self.service.is_empty() {
            return bad("service is required".into());
        }
        for (name, p) in [
            ("cert", &self.cert),
            ("key", &self.key),
            ("bundle", &self.bundle),
            ("policy", &self.policy),
        ] {
            if p.as_os_str().is_empty() {
                return bad(format!("{name} is required"));
            }
            if !p.is_file() {
                return bad(format!("{name} {} does not exist", p.display()));
            }
        }
        if !(self.identity_url.starts_with("http://") || self.identity_url.starts_with("https://"))
        {
            return bad("identity_url must start with http:// or https://".into());
        }
        if self.max_concurrent_requests == 0
            || self.max_message_bytes == 0
            || self.request_timeout_ms == 0
            || self.max_header_bytes == 0
        {
            return bad("max_concurrent_requests, max_message_bytes, max_header_bytes and request_timeout_ms must be positive".into());
        }
        if let Some(o) = self.outbound_listen
            && !o.ip().is_loopback()
        {
            return bad("outbound_listen must be a loopback address: it is plaintext".into());
        }
        if let Some(s) = &self.outbound_socket {
            s.validate("outbound_socket")?;
            if self.outbound_listen.is_some() {
                return bad(
                    "outbound_listen and outbound_socket exclude each other: choose one".into(),
                );
            }
        }
        if let Some(p) = &self.upstream_socket
            && p.as_os_str().is_empty()
        {
            return bad("upstream_socket must be a path".into());
        }
        Ok(())
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "sidecar";
    const ABOUT: &'static str =
        "Cirrus mesh sidecar: mTLS, token checks, policy and discovery beside a service";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), runtime::config::ConfigError> {
        Config::validate(self)
    }

    /// The internal listener authenticates every peer by mTLS.
    fn trusts_local_callers(&self) -> bool {
        false
    }

    fn worker_threads(&self) -> Option<usize> {
        match self.worker_threads {
            None => Some(1),
            Some(0) => None,
            Some(n) => Some(n),
        }
    }

    /// `listener` is `server.listen` (internal); the public and outbound
    /// listeners are bound here.
    async fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> anyhow::Result<()> {
        let runtime::local::Listener::Tcp(listener) = listener else {
            anyhow::bail!("the sidecar's internal listener is mTLS over TCP, not a Unix socket");
        };
        let listeners = crate::Listeners::bind_rest(&self, listener).await?;
        crate::run(self, listeners, shutdown).await
    }

    /// The internal listener speaks only mTLS: the check is a handshake with
    /// this workload's own certificate that must meet the sidecar's.
    async fn healthcheck(&self, addr: SocketAddr) -> Result<(), String> {
        let check = async {
            let tls = crate::tls::Tls::load(crate::tls::Files {
                cert: self.cert.clone(),
                key: self.key.clone(),
                bundle: self.bundle.clone(),
            })
            .map_err(|e| e.to_string())?;
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from(self.service.clone())
                .map_err(|e| format!("service name {:?}: {e}", self.service))?;
            tokio_rustls::TlsConnector::from(tls.client())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
            Ok(())
        };
        tokio::time::timeout(std::time::Duration::from_secs(3), check)
            .await
            .map_err(|_| format!("no TLS answer from {addr} within 3 s"))?
    }
}
