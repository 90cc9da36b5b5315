//! How a service and its sidecar talk (issue 13: nothing local bypasses
//! the sidecar): the service serves on loopback TCP (development) or on the
//! Unix socket only its sidecar can open, and calls out through the
//! sidecar's outbound Unix socket or (development) its loopback listener.
//! [`crate::serve::serve`] takes `impl Into<Listener>`, so tests keep
//! handing a service a `TcpListener` while `service_main` hands it the socket.

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::{TcpListener, UnixListener};

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Self::Unix(l)
    }
}

impl Listener {
    /// Where it listens, for log lines: `127.0.0.1:5050` or `unix:/path`.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("(tcp: {e})")),
            Self::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix:{p}"),
                None => "unix:(unnamed)".into(),
            },
        }
    }
}

/// A workload's way out through its sidecar: the outbound Unix socket
/// (issue 13) or, in development, the loopback TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Unix(std::path::PathBuf),
    Tcp(SocketAddr),
}

impl From<SocketAddr> for Outbound {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a)
    }
}

impl From<std::path::PathBuf> for Outbound {
    fn from(p: std::path::PathBuf) -> Self {
        Self::Unix(p)
    }
}

impl Outbound {
    /// The socket when given (it wins), else the TCP address; `None` without either.
    pub fn of(socket: Option<&Path>, addr: Option<SocketAddr>) -> Option<Self> {
        match (socket, addr) {
            (Some(p), _) => Some(Self::Unix(p.to_path_buf())),
            (None, Some(a)) => Some(Self::Tcp(a)),
            (None, None) => None,
        }
    }

    /// A channel to `service` (addressed `http://<service>`) through it.
    pub fn channel(&self, service: &str) -> Result<crate::trace::Channel, String> {
        match self {
            Self::Unix(p) => crate::process::via_sidecar_unix(p, service),
            Self::Tcp(a) => crate::serve::via_sidecar(*a, service),
        }
    }
}

/// A channel to `service` through this workload's sidecar: over its
/// outbound Unix socket when `socket` is given (it wins), else over its
/// loopback TCP listener `addr` (development); `None` without either.
pub fn via_sidecar(
    socket: Option<&Path>,
    addr: Option<SocketAddr>,
    service: &str,
) -> Option<Result<crate::trace::Channel, String>> {
    Outbound::of(socket, addr).map(|o| o.channel(service))
}
