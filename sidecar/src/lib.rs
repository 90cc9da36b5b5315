//! The Cirrus sidecar: one beside every service instance, the only way
//! services talk to each other.
//!
//! - [`tls`]: rustls configurations from files, re-read when they change;
//! - [`policy`]: who may call which method (default deny);
//! - [`authn`]: offline token verification fed by identity's `Watch`;
//! - [`catalog`]: service names to internal endpoints;
//! - [`connector`]: dialling peers over mTLS, checking their SPIFFE id;
//! - [`stack`]: the inbound and outbound paths, each built in one function
//!   from the tower layers of [`layers`] (one module per concern, one rescue
//!   that turns typed refusals into statuses);
//! - [`config`]: what the operator sets.
//!
//! [`run`] serves the internal (mTLS), public (server TLS) and outbound
//! (plaintext: a Unix socket only the service can open, or loopback TCP in
//! development) listeners until shutdown, then drains. The service itself
//! is reached on its Unix socket (`upstream_socket`) or, in development, on
//! loopback TCP; both TCP set-ups are logged as such at start. The binary's
//! `main` is the shared `runtime::process::service_main` ([`Config`]
//! implements `runtime::process::Service`): it binds `server.listen` (the
//! internal listener) and [`Config::run`] binds the other two.

pub mod authn;
pub mod catalog;
pub mod config;
pub mod connector;
pub mod layers;
pub mod policy;
pub mod stack;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

pub use config::Config;

/// The listeners a sidecar serves; the caller binds them (ephemeral ports in tests).
pub struct Listeners {
    pub internal: TcpListener,
    pub public: Option<TcpListener>,
    pub outbound: Option<TcpListener>,
}

async fn bind(a: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(a)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))
}

impl Listeners {
    /// Binds every listener `c` names.
    pub async fn bind(c: &Config) -> std::io::Result<Self> {
        Self::bind_rest(c, bind(c.server.listen).await?).await
    }

    /// Binds the public and outbound listeners beside an `internal` one bound already.
    pub async fn bind_rest(c: &Config, internal: TcpListener) -> std::io::Result<Self> {
        Ok(Self {
            internal,
            public: match c.public_listen {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
            outbound: match c.outbound_listen {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }
}

/// A channel to identity: straight (http://) or through its sidecar over mTLS (https://).
fn identity_channel(c: &Config, connector: &connector::MeshConnector) -> anyhow::Result<Channel> {
    let url = &c.identity_url;
    if let Some(rest) = url.strip_prefix("https://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        connector.expect(authority, "identity");
        Ok(Endpoint::from_shared(format!("http://{authority}"))?
            .timeout(Duration::from_secs(3600 * 24))
            .connect_with_connector_lazy(connector.clone()))
    } else {
        Ok(Endpoint::from_shared(url.clone())?.connect_lazy())
    }
}

/// Serves until `shutdown`, then stops accepting and drains for `drain_secs`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    let policy = Arc::new(policy::Policy::load(&config.policy)?);
    let tls = tls::Tls::load(tls::Files {
        cert: config.cert.clone(),
        key: config.key.clone(),
        bundle: config.bundle.clone(),
    })?;
    let reloader = tls.spawn_reloader(Duration::from_secs(2));
    let connector = connector::MeshConnector::new(tls.clone());
    let identity = identity_channel(&config, &connector)?;

    let self_id = certs::service_id(&config.service, None)?;
    let authn = authn::Authn::default();
    let watcher = authn.spawn_watch(identity.clone(), self_id.clone());
    let max_ttl = time::Duration::seconds(i64::try_from(config.max_token_ttl_secs).unwrap_or(3600));
    let pruner = {
        let authn = authn.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                authn.prune(max_ttl);
            }
        })
    };

    let limits = stack::Limits {
        max_message_bytes: config.max_message_bytes,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        max_header_bytes: config.max_header_bytes as usize,
    };
    let inflight = Arc::new(Semaphore::new(config.max_concurrent_requests));
    let inbound = stack::inbound(stack::Inbound {
        service: config.service.clone(),
        policy,
        authn,
        upstream: config.upstream.to_string().parse()?,
        client: stack::upstream_client(config.upstream_socket.as_deref()),
        limits: limits.clone(),
        inflight: inflight.clone(),
    });
    let outbound = stack::outbound(stack::Outbound {
        service: config.service.clone(),
        catalog: catalog::Catalog::new(identity, self_id),
        connector: connector.clone(),
        client: stack::mesh_client(connector),
        limits,
        inflight,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let h2 = {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.max_concurrent_streams(config.h2_max_concurrent_streams)
            // Far above `max_header_bytes`: a request between the two gets a
            // gRPC status from the header-limit layer instead of a GOAWAY.
            .max_header_list_size(layers::header_limit::h2_hard_limit(
                config.max_header_bytes as usize,
            ))
            // Grow flow-control windows with the measured bandwidth-delay
            // product, so bulk streams (image transfers) are not held to 64 KiB.
            .adaptive_window(true);
        b
    };

    match &config.upstream_socket {
        Some(p) => {
            tracing::info!(socket = %p.display(), "the service is reached on its Unix socket")
        }
        None => tracing::warn!(
            upstream = %config.upstream,
            "the service is reached on loopback TCP, where any local process can call it \
             and claim an identity: a development set-up (set upstream_socket)"
        ),
    }
    let outbound_listener = match (listeners.outbound, &config.outbound_socket) {
        (Some(l), _) => {
            tracing::warn!(
                outbound = %l.local_addr()?,
                "outbound on loopback TCP: any local process can speak as this workload; \
                 a development set-up (set [outbound_socket])"
            );
            Some(Plain::Tcp(l))
        }
        (None, Some(s)) => {
            let l = runtime::process::bind_unix(s)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", s.path.display()))?;
            tracing::info!(socket = %s.path.display(), mode = %format!("{:o}", s.mode), "outbound on a Unix socket");
            Some(Plain::Unix(l))
        }
        (None, None) => None,
    };
    tracing::info!(service = %config.service, internal = %listeners.internal.local_addr()?, "sidecar serving");
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(accept_tls(
        listeners.internal,
        tls.clone(),
        false,
        inbound.clone(),
        h2.clone(),
        graceful.clone(),
        stop_rx.clone(),
    )));
    if let Some(l) = listeners.public {
        tasks.push(tokio::spawn(accept_tls(
            l,
            tls.clone(),
            true,
            inbound.clone(),
            h2.clone(),
            graceful.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = outbound_listener {
        tasks.push(tokio::spawn(accept_plain(
            l,
            outbound,
            h2,
            graceful.clone(),
            stop_rx,
        )));
    }

    shutdown.await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let drain = Duration::from_secs(config.drain_secs);
    if let Ok(graceful) = Arc::try_unwrap(graceful)
        && tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
    {
        tracing::warn!("drain took longer than {drain:?}; closing the remaining connections");
    }
    if let Some(s) = &config.outbound_socket {
        let _ = std::fs::remove_file(&s.path);
    }
    reloader.abort();
    watcher.abort();
    pruner.abort();
    tracing::info!("sidecar stopped");
    Ok(())
}

/// A request as the stacks take it: the body boxed, the connection's peer attached.
fn entering(req: http::Request<Incoming>, peer: Option<&stack::Peer>) -> stack::Req {
    let mut req = req.map(stack::BoxBody::new);
    if let Some(p) = peer {
        req.extensions_mut().insert(p.clone());
    }
    req
}

async fn accept_tls(
    listener: TcpListener,
    tls: tls::Tls,
    public: bool,
    stack: stack::Stack,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let listener_name = if public { "public" } else { "internal" };
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let _ = tcp.set_nodelay(true);
        let config = if public { tls.public() } else { tls.internal() };
        let (stack, h2, watcher) = (stack.clone(), h2.clone(), graceful.watcher());
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics::counter!("sidecar_handshake_failures_total", "listener" => listener_name).increment(1);
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics::counter!("sidecar_handshake_failures_total", "listener" => listener_name).increment(1);
                    return;
                }
            };
            let peer: Arc<str> = if public {
                Arc::from(policy::EXTERNAL)
            } else {
                let id = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| certs::spiffe_id_of_der(c));
                match id {
                    Some(id) => Arc::from(id.as_str()),
                    None => {
                        metrics::counter!("sidecar_handshake_failures_total", "listener" => listener_name).increment(1);
                        tracing::info!(%remote, "peer certificate has no SPIFFE id");
                        return;
                    }
                }
            };
            let peer = stack::Peer { id: peer, public };
            let svc = service_fn(move |req| stack.clone().oneshot(entering(req, Some(&peer))));
            let conn = h2.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
        });
    }
}

/// The outbound listener: a Unix socket (production) or loopback TCP (development).
enum Plain {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn accept_plain(
    listener: Plain,
    stack: stack::Stack,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = async {
                match &listener {
                    Plain::Tcp(l) => l.accept().await.map(|(t, _)| {
                        let _ = t.set_nodelay(true);
                        Conn::Tcp(t)
                    }),
                    Plain::Unix(l) => l.accept().await.map(|(u, _)| Conn::Unix(u)),
                }
            } => r,
            () = stopped(&mut stop) => return,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (stack, h2, watcher) = (stack.clone(), h2.clone(), graceful.watcher());
        tokio::spawn(async move {
            let svc = service_fn(move |req| stack.clone().oneshot(entering(req, None)));
            let _ = match conn {
                Conn::Tcp(t) => {
                    watcher
                        .watch(h2.serve_connection(TokioIo::new(t), svc))
                        .await
                }
                Conn::Unix(u) => {
                    watcher
                        .watch(h2.serve_connection(TokioIo::new(u), svc))
                        .await
                }
            };
        });
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Resolves once shutdown has been signalled.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
