//! The request paths as tower stacks, each built in one function with a line
//! of why per layer (linkerd2-proxy's `push_http_server` style). Every layer
//! is its own module under [`crate::layers`] with its own unit tests; the
//! layers speak [`Req`] → [`Rsp`] and fail with a typed [`Refusal`], which
//! only [`layers::rescue`] turns into a gRPC status.
//!
//! Values found by one layer reach the next as request extensions: the
//! connection's [`Peer`], the verified token ([`layers::authenticate::Authenticated`]),
//! and the rule's limits ([`layers::authorize::Route`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

use crate::authn::Authn;
use crate::catalog::Catalog;
use crate::connector::{BoxError, LocalConnector, MeshConnector};
use crate::layers;
pub use crate::layers::rescue::Refusal;
use crate::policy::Policy;

/// Every body on both paths, boxed once where it enters. A struct rather
/// than an alias of `UnsyncBoxBody<Bytes, BoxError>`: with the trait object
/// in its type arguments, rustc cannot prove the layers' boxed futures `Send`
/// (the higher-ranked lifetime limitation of async blocks).
pub struct BoxBody(UnsyncBoxBody<Bytes, BoxError>);

impl BoxBody {
    pub fn new<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(body.map_err(Into::into).boxed_unsync())
    }
}

impl std::fmt::Debug for BoxBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxBody")
    }
}

impl Default for BoxBody {
    fn default() -> Self {
        Self::new(http_body_util::Empty::new())
    }
}

impl http_body::Body for BoxBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}
pub type Req = Request<BoxBody>;
pub type Rsp = Response<BoxBody>;

/// A whole path: never fails (refusals are statuses by then), cheap to clone.
pub type Stack = BoxCloneService<Req, Rsp, Infallible>;

/// Who is at the other end of the connection a request came on, as the
/// accept loop verified it: the certificate's SPIFFE id on the internal
/// listener, [`crate::policy::EXTERNAL`] on the public one.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: Arc<str>,
    pub public: bool,
}

/// Bounds applied to every request unless its policy rule says otherwise.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
    /// The header block a request may carry (refused with a status above it).
    pub max_header_bytes: usize,
}

/// What the inbound stack is built from.
pub struct Inbound {
    pub service: String,
    pub policy: Arc<Policy>,
    pub authn: Authn,
    /// The service itself: the authority requests carry (`host:port`); the
    /// client's connector decides where they go (a Unix socket or that address).
    pub upstream: http::uri::Authority,
    pub client: Client<LocalConnector, BoxBody>,
    pub limits: Limits,
    pub inflight: Arc<Semaphore>,
}

/// The plaintext client to the service behind this sidecar: over its Unix
/// socket when `socket` is given, else over loopback TCP to the request's authority.
pub fn upstream_client(socket: Option<&std::path::Path>) -> Client<LocalConnector, BoxBody> {
    let connector = match socket {
        Some(p) => LocalConnector::Unix(Arc::from(p)),
        None => {
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(2)));
            LocalConnector::Tcp(http)
        }
    };
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_adaptive_window(true)
        .build(connector)
}

/// The mTLS client to other sidecars.
pub fn mesh_client(connector: MeshConnector) -> Client<MeshConnector, BoxBody> {
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_adaptive_window(true)
        .build(connector)
}

/// The inbound path, outermost first. A request enters with a [`Peer`] extension.
pub fn inbound(i: Inbound) -> Stack {
    let svc = ServiceBuilder::new()
        // Count and trace every request by its outcome, refusals included.
        .layer(layers::observe::layer(
            &i.service,
            layers::observe::Side::Inbound,
        ))
        // Turn every typed refusal below into a gRPC status and a metric reason.
        .layer(layers::rescue::layer(&i.service))
        // Only `/<package>.<Service>/<Method>` is a method: `..`, `%2e` and
        // queries would let a path match one rule and mean another.
        .layer(layers::method::layer())
        // An oversized header block costs this request, not the connection.
        .layer(layers::header_limit::layer(i.limits.max_header_bytes))
        // Only this sidecar may say who the caller is.
        .layer(layers::strip::layer())
        // Verify the bearer token offline (keys and revocations from identity).
        .layer(layers::authenticate::layer(i.authn))
        // The policy decides, by method, token and peer (default deny).
        .layer(layers::authorize::layer(i.policy))
        // Past the concurrency bound, refuse at once rather than queue.
        .layer(layers::shed::layer(i.inflight))
        // Tell the service who is calling, in headers it can trust.
        .layer(layers::trusted::layer())
        // Every call ends: the rule's, the caller's or the default deadline.
        .layer(layers::deadline::layer(i.limits.request_timeout))
        // No request message past the limit reaches the service; nor a broken frame.
        .layer(layers::message_size::layer(i.limits.max_message_bytes))
        // Send it to the service (its Unix socket, or loopback TCP in development).
        .service(layers::forward::Forward::new(i.client, Some(i.upstream)));
    BoxCloneService::new(svc)
}

/// What the outbound stack is built from.
pub struct Outbound {
    pub service: String,
    pub catalog: Catalog,
    pub connector: MeshConnector,
    pub client: Client<MeshConnector, BoxBody>,
    pub limits: Limits,
    pub inflight: Arc<Semaphore>,
}

/// The outbound path (the local service calling `http://<service>/...`), outermost first.
pub fn outbound(o: Outbound) -> Stack {
    let svc = ServiceBuilder::new()
        // Count and trace every call the service makes.
        .layer(layers::observe::layer(
            &o.service,
            layers::observe::Side::Outbound,
        ))
        // Refusals become statuses the local service can read in full.
        .layer(layers::rescue::layer(&o.service))
        // The peer's sidecar checks the method; a bad path is refused here already.
        .layer(layers::method::layer())
        // Our own service cannot vouch for anyone: the peer's sidecar decides.
        // The token goes on under a name HPACK may index (see the module).
        .layer(layers::strip::outbound())
        // Past the concurrency bound, refuse at once.
        .layer(layers::shed::layer(o.inflight))
        // Every outgoing call has a deadline.
        .layer(layers::deadline::layer(o.limits.request_timeout))
        // The peer would refuse an oversized message anyway; do not send it.
        .layer(layers::message_size::layer(o.limits.max_message_bytes))
        // The service name → an endpoint from the catalog, dialled over mTLS.
        .layer(layers::resolve::layer(o.catalog, o.connector))
        .service(layers::forward::Forward::new(o.client, None));
    BoxCloneService::new(svc)
}
