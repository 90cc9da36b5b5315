//! The sidecar's configuration (defaults → TOML → `CIRRUS_*` environment).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The service this sidecar stands beside (its policy and SPIFFE name).
    pub service: String,
    /// mTLS listener for mesh peers (the catalog's internal endpoint).
    pub internal_listen: SocketAddr,
    /// Server-TLS listener for users and their clients (the public endpoint); none to serve no public side.
    pub public_listen: Option<SocketAddr>,
    /// Plaintext loopback listener the service calls `http://<service-name>` through; none for no outbound.
    pub outbound_listen: Option<SocketAddr>,
    /// The service itself, on loopback.
    pub upstream: SocketAddr,
    /// This workload's certificate, key and the trust bundle (PEM), re-read when they change.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// Where identity's `Watch` and catalog are: `https://` through identity's
    /// sidecar (mTLS), or `http://` straight to identity on loopback (identity's own sidecar).
    pub identity_url: String,
    /// The policy file for `service`.
    pub policy: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    /// Largest request message (bytes); a policy rule may override it per method.
    pub max_message_bytes: usize,
    /// Requests in flight beyond this are refused with UNAVAILABLE.
    pub max_concurrent_requests: usize,
    /// Deadline for a request without a shorter `grpc-timeout`.
    pub request_timeout_ms: u64,
    pub h2_max_concurrent_streams: u32,
    pub max_header_bytes: u32,
    /// On SIGTERM, how long open requests get to finish.
    pub drain_secs: u64,
    /// Identity's longest token lifetime, after which revocation rules are dropped.
    pub max_token_ttl_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            service: String::new(),
            internal_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_listen: None,
            outbound_listen: None,
            upstream: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            bundle: PathBuf::new(),
            identity_url: "https://127.0.0.1:5051".into(),
            policy: PathBuf::new(),
            metrics_listen: None,
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 512,
            request_timeout_ms: 30_000,
            h2_max_concurrent_streams: 256,
            max_header_bytes: 16 * 1024,
            drain_secs: 10,
            max_token_ttl_secs: 3600,
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
        {
            return bad("max_concurrent_requests, max_message_bytes and request_timeout_ms must be positive".into());
        }
        if let Some(o) = self.outbound_listen
            && !o.ip().is_loopback()
        {
            return bad("outbound_listen must be a loopback address: it is plaintext".into());
        }
        Ok(())
    }
}
