//! Serving gRPC the same way in every service: the service's routes plus
//! reflection (v1 and v1alpha, from the shared descriptor set) and
//! `grpc.health.v1.Health`, on a listener the caller bound (loopback TCP in
//! development and tests, else the Unix socket only the sidecar can open:
//! [`crate::local`]), until `shutdown`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::local::Listener;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How [`serve_with`] tunes the HTTP/2 server; [`ServeOptions::default`] is
/// what [`serve`] uses.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// The limit on one request handler's run time. A service taking long
    /// client streams (image uploads) sets `None` and bounds its own waits.
    pub request_timeout: Option<Duration>,
    /// HTTP/2 stream and connection flow-control windows, in bytes; `None`
    /// keeps the protocol default (64 KiB), enough for small messages.
    pub stream_window: Option<u32>,
    pub connection_window: Option<u32>,
    /// The largest HTTP/2 frame peers may send us; `None` keeps 16 KiB.
    /// Bulk streams send fewer, larger frames with a larger value.
    pub max_frame_size: Option<u32>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            request_timeout: Some(Duration::from_secs(60)),
            stream_window: None,
            connection_window: None,
            max_frame_size: None,
        }
    }
}

/// Serves `routes` with reflection and health until `shutdown` resolves, then
/// drains in-flight requests. `health_names` are the fully-qualified gRPC
/// service names reported as SERVING (the empty name always is).
pub async fn serve(
    routes: Routes,
    health_names: &[&str],
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(
        routes,
        health_names,
        listener,
        shutdown,
        ServeOptions::default(),
    )
    .await
}

/// [`serve`] with explicit [`ServeOptions`].
pub async fn serve_with(
    routes: Routes,
    health_names: &[&str],
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> Result<(), ServeError> {
    let router = router(routes, health_names, options).await?;
    match listener.into() {
        // TCP_NODELAY: tonic sets it only on listeners it binds itself.
        // Without it, small frames (unary answers, stream messages) wait
        // for the peer's delayed ACK under Nagle's algorithm.
        Listener::Tcp(l) => {
            router
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(l).with_nodelay(Some(true)),
                    shutdown,
                )
                .await?
        }
        Listener::Unix(l) => {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await?
        }
    }
    Ok(())
}

/// A service's routes with health (every name in `health_names` serving),
/// reflection and the per-connection bounds of `options`.
async fn router(
    routes: Routes,
    health_names: &[&str],
    options: ServeOptions,
) -> Result<tonic::transport::server::Router, ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in health_names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut server = Server::builder()
        // One span per request, named by its gRPC path, continuing the
        // caller's trace when the request carries a `traceparent`.
        .trace_fn(crate::trace::request_span)
        // Bound what one connection can ask of us.
        .max_concurrent_streams(Some(256))
        .initial_stream_window_size(options.stream_window)
        .initial_connection_window_size(options.connection_window)
        .max_frame_size(options.max_frame_size);
    if let Some(t) = options.request_timeout {
        server = server.timeout(t);
    }
    Ok(server
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received, draining");
}

/// The `healthcheck` subcommand of every binary: asks `grpc.health.v1.Health`
/// at `addr` and succeeds only on SERVING, within three seconds.
pub async fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("health check failed: {}", s.message()))?;
        match reply.into_inner().status() {
            WireStatus::Serving => Ok(()),
            other => Err(format!("service at {addr} is {}", other.as_str_name())),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .map_err(|_| format!("no health answer from {addr} within 3 s"))?
}

/// A channel to another service through this workload's sidecar: plaintext to
/// the sidecar's outbound listener on loopback, addressed `http://<service>`,
/// which the sidecar resolves through the catalog and dials over mTLS. Each
/// call carries the current span's trace context ([`crate::trace`]).
pub fn via_sidecar(outbound: SocketAddr, service: &str) -> Result<crate::trace::Channel, String> {
    let origin: tonic::codegen::http::Uri = format!("http://{service}")
        .parse()
        .map_err(|_| format!("invalid service name {service:?}"))?;
    Ok(crate::trace::traced(
        tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
            .map_err(|e| e.to_string())?
            .origin(origin)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy(),
    ))
}
