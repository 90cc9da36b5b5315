//! Dialling mesh peers: TCP, then TLS with our certificate, checking that
//! the server is the service we meant. Used by the outbound proxy and by the
//! sidecar's own calls to identity (`Watch`, the catalog).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::tls::Tls;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tower connector for hyper and tonic clients. Each authority it is asked
/// to dial must first be registered with the service expected there; the
/// authority is also the connection pool's key, so a connection made for one
/// service is never reused for another.
#[derive(Clone)]
pub struct MeshConnector {
    tls: Source,
    /// authority → (expected service, address to dial)
    names: Arc<RwLock<HashMap<String, (String, String)>>>,
}

/// Where the client TLS configuration comes from.
#[derive(Clone)]
enum Source {
    /// A workload's certificate, re-read when it changes.
    Files(Tls),
    /// A fixed configuration (the CLI: the trust bundle, maybe an operator certificate).
    Fixed(Arc<rustls::ClientConfig>),
}

impl MeshConnector {
    pub fn new(tls: Tls) -> Self {
        Self {
            tls: Source::Files(tls),
            names: Arc::default(),
        }
    }

    pub fn with_config(config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: Source::Fixed(config),
            names: Arc::default(),
        }
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        match &self.tls {
            Source::Files(t) => t.client(),
            Source::Fixed(c) => c.clone(),
        }
    }

    /// Connections to `authority` (`host:port`) must present `service`'s SPIFFE id.
    pub fn expect(&self, authority: &str, service: &str) {
        if let Ok(mut m) = self.names.write() {
            m.insert(
                authority.to_string(),
                (service.to_string(), authority.to_string()),
            );
        }
    }

    /// An authority naming both the service and its endpoint
    /// (`<service>.<host>:<port>`), to put in request URIs.
    pub fn route(&self, service: &str, endpoint: &str) -> String {
        let key = format!("{service}.{endpoint}");
        if let Ok(mut m) = self.names.write() {
            m.entry(key.clone())
                .or_insert_with(|| (service.to_string(), endpoint.to_string()));
        }
        key
    }

    fn lookup(&self, authority: &str) -> Option<(String, String)> {
        self.names.read().ok()?.get(authority).cloned()
    }
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or("uri has no authority")?
                .as_str()
                .to_string();
            let (service, addr) = this
                .lookup(&authority)
                .ok_or_else(|| format!("{authority} is not a known mesh endpoint"))?;
            let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr))
                .await
                .map_err(|_| format!("connecting to {addr} timed out"))??;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(service.clone())?;
            let tls = tokio::time::timeout(
                Duration::from_secs(5),
                TlsConnector::from(this.client_config()).connect(name, tcp),
            )
            .await
            .map_err(|_| format!("TLS handshake with {authority} timed out"))??;
            Ok(MeshStream(TokioIo::new(tls)))
        })
    }
}

/// A TLS connection to a mesh peer, speaking HTTP/2.
pub struct MeshStream(TokioIo<TlsStream<TcpStream>>);

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// How the inbound path reaches the service beside it: a Unix socket (the
/// production set-up, issue 13: only the service's user and its sidecar can
/// open it) or, for development, loopback TCP.
#[derive(Clone)]
pub enum LocalConnector {
    Tcp(hyper_util::client::legacy::connect::HttpConnector),
    Unix(Arc<std::path::Path>),
}

impl tower::Service<Uri> for LocalConnector {
    type Response = LocalStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<LocalStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::Tcp(h) => h.poll_ready(cx).map_err(Into::into),
            Self::Unix(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            Self::Tcp(h) => {
                let f = h.call(uri);
                Box::pin(async move { Ok(LocalStream::Tcp(f.await?)) })
            }
            Self::Unix(path) => {
                let path = path.clone();
                Box::pin(async move {
                    let s = tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::net::UnixStream::connect(&*path),
                    )
                    .await
                    .map_err(|_| format!("connecting to {} timed out", path.display()))?
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
                    Ok(LocalStream::Unix(TokioIo::new(s)))
                })
            }
        }
    }
}

/// A connection to the local service.
pub enum LocalStream {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<tokio::net::UnixStream>),
}

impl Connection for LocalStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            LocalStream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            LocalStream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl hyper::rt::Read for LocalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_read(cx, buf))
    }
}

impl hyper::rt::Write for LocalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write_vectored(cx, bufs))
    }
}
