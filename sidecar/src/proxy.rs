//! The request path. Inbound: strip identity headers the caller sent, verify
//! the token, decide by policy, bound concurrency and message size, forward
//! to the service on loopback with trusted headers, and answer every failure
//! with a gRPC status (the outermost "rescue"). Outbound: resolve a service
//! name through the catalog, dial it over mTLS, forward.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tracing::Instrument;

use crate::authn::Authn;
use crate::catalog::Catalog;
use crate::connector::{BoxError, MeshConnector};
use crate::policy::{Policy, Subject};

pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Bounds applied to every request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
}

/// A gRPC status as a trailers-only response.
pub fn status(code: Code, message: &str) -> Response<BoxBody> {
    tonic::Status::new(code, message).into_http::<BoxBody>()
}

/// The `grpc-timeout` header as a duration (`<digits><unit>`).
fn grpc_timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

/// Removes every `x-cirrus-*` header: only the sidecar may set them.
fn strip_identity_headers(h: &mut HeaderMap) {
    let names: Vec<_> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-cirrus-"))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

fn set_trusted_headers(h: &mut HeaderMap, claims: Option<&token::Claims>, peer: &str) {
    let caller = runtime::caller::Caller {
        user_id: claims.map(|c| c.sub.clone()),
        user_name: claims.map(|c| c.user_name.clone()),
        project_id: claims.and_then(|c| c.project_id().map(str::to_owned)),
        roles: claims.map(|c| c.roles.clone()).unwrap_or_default(),
        audit_id: claims.map(|c| c.audit_id().to_owned()),
        is_admin: claims.is_some_and(token::Claims::is_cloud_admin),
        peer: Some(peer.to_string()),
    };
    let mut meta = tonic::metadata::MetadataMap::new();
    caller.to_metadata(&mut meta);
    for (k, v) in meta.into_headers().iter() {
        h.insert(k.clone(), v.clone());
    }
}

// ---------------------------------------------------------------- inbound

pub struct Inbound {
    pub service: String,
    pub policy: Arc<Policy>,
    pub authn: Authn,
    pub upstream: String,
    pub client: Client<HttpConnector, BoxBody>,
    pub limits: Limits,
    pub inflight: Arc<Semaphore>,
}

impl Inbound {
    pub fn client() -> Client<HttpConnector, BoxBody> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .http2_adaptive_window(true)
            .build(http)
    }
}

/// Serves one inbound request; never fails, never panics: errors become statuses.
pub async fn inbound(
    state: Arc<Inbound>,
    peer: Arc<str>,
    public: bool,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let method = req.uri().path().trim_start_matches('/').to_string();
    let listener = if public { "public" } else { "internal" };
    let span = tracing::info_span!("inbound", service = %state.service, %method, %peer, listener);
    let start = Instant::now();
    let resp = match handle_inbound(&state, &peer, public, &method, req)
        .instrument(span.clone())
        .await
    {
        Ok(r) => r,
        Err((code, msg)) => {
            span.in_scope(|| tracing::debug!(?code, %msg, "refused"));
            status(code, &msg)
        }
    };
    Ok(observe(
        resp,
        state.service.clone(),
        method,
        listener,
        start,
    ))
}

async fn handle_inbound(
    state: &Inbound,
    peer: &str,
    public: bool,
    method: &str,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody>, (Code, String)> {
    strip_identity_headers(req.headers_mut());
    let (claims, token_error) = match bearer(req.headers()) {
        None => (None, None),
        Some(t) => match state.authn.verify(t) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e)),
        },
    };
    let subject = Subject {
        claims: claims.as_ref(),
        peer,
        public,
    };
    let (_, rule) = state.policy.check(method, &subject).map_err(|d| {
        metrics::counter!("sidecar_denials_total", "service" => state.service.clone(), "reason" => d.reason()).increment(1);
        if d.is_unauthenticated() {
            let msg = token_error.as_ref().map_or_else(|| d.message(method), ToString::to_string);
            (Code::Unauthenticated, msg)
        } else {
            (Code::PermissionDenied, d.message(method))
        }
    })?;
    let permit = state.inflight.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!("sidecar_denials_total", "service" => state.service.clone(), "reason" => "overload").increment(1);
        (Code::Unavailable, "overloaded: too many requests in flight; retry later".to_string())
    })?;
    set_trusted_headers(req.headers_mut(), claims.as_ref(), peer);

    let limit = rule
        .max_message_bytes
        .unwrap_or(state.limits.max_message_bytes);
    let default_timeout = rule
        .timeout_ms
        .map_or(state.limits.request_timeout, Duration::from_millis);
    let timeout = grpc_timeout(req.headers()).map_or(default_timeout, |t| t.min(default_timeout));
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = format!("http://{}{path}", state.upstream)
        .parse::<Uri>()
        .map_err(|_| (Code::Internal, "bad upstream address".to_string()))?;
    forward(&state.client, req, limit, timeout, permit).await
}

/// Sends `req` upstream with a bounded request message size and deadline.
async fn forward<C>(
    client: &Client<C, BoxBody>,
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> Result<Response<BoxBody>, (Code, String)>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let exceeded = Arc::new(AtomicBool::new(false));
    let req = req.map(|b| MaxMessage::new(b, limit, exceeded.clone()).boxed_unsync());
    let too_big = || {
        (
            Code::ResourceExhausted,
            format!("request message larger than {limit} bytes"),
        )
    };
    let resp = match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => {
            return Err((
                Code::DeadlineExceeded,
                format!("no answer within {timeout:?}"),
            ));
        }
        Ok(Err(e)) if exceeded.load(Ordering::Relaxed) => {
            tracing::debug!(error = %e, "request over the size limit");
            return Err(too_big());
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upstream unavailable");
            return Err((
                Code::Unavailable,
                "upstream service unavailable".to_string(),
            ));
        }
        Ok(Ok(r)) => r,
    };
    if exceeded.load(Ordering::Relaxed) {
        return Err(too_big());
    }
    Ok(resp.map(|b| {
        Held {
            inner: b,
            _permit: permit,
        }
        .boxed_unsync()
    }))
}

// --------------------------------------------------------------- outbound

pub struct Outbound {
    pub service: String,
    pub catalog: Catalog,
    pub connector: MeshConnector,
    pub client: Client<MeshConnector, BoxBody>,
    pub limits: Limits,
    pub inflight: Arc<Semaphore>,
}

impl Outbound {
    pub fn client(connector: MeshConnector) -> Client<MeshConnector, BoxBody> {
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .http2_adaptive_window(true)
            .build(connector)
    }
}

/// Serves one outbound request from the local service to `http://<service>/...`.
pub async fn outbound(
    state: Arc<Outbound>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let method = req.uri().path().trim_start_matches('/').to_string();
    let start = Instant::now();
    let span = tracing::info_span!("outbound", from = %state.service, %method);
    let resp = match handle_outbound(&state, req).instrument(span).await {
        Ok(r) => r,
        Err((code, msg)) => status(code, &msg),
    };
    Ok(observe(
        resp,
        state.service.clone(),
        method,
        "outbound",
        start,
    ))
}

async fn handle_outbound(
    state: &Outbound,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody>, (Code, String)> {
    let host = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or(h).to_owned())
        })
        .ok_or((
            Code::InvalidArgument,
            "call http://<service-name>/... through the sidecar".to_string(),
        ))?;
    let endpoint = state
        .catalog
        .pick(&host)
        .await
        .map_err(|e| (Code::Unavailable, e))?;
    let route = state.connector.route(&host, &endpoint);
    let permit = state.inflight.clone().try_acquire_owned().map_err(|_| {
        (
            Code::Unavailable,
            "overloaded: too many requests in flight".to_string(),
        )
    })?;
    // Our own service cannot vouch for anyone: the peer's sidecar decides.
    strip_identity_headers(req.headers_mut());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = format!("http://{route}{path}")
        .parse::<Uri>()
        .map_err(|_| (Code::Internal, "bad endpoint".to_string()))?;
    if let Ok(v) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let timeout = grpc_timeout(req.headers()).map_or(state.limits.request_timeout, |t| {
        t.min(state.limits.request_timeout)
    });
    forward(
        &state.client,
        req,
        state.limits.max_message_bytes,
        timeout,
        permit,
    )
    .await
}

// ------------------------------------------------------------ body layers

/// Counts a request when its response ends, by the gRPC status it carried.
fn observe(
    resp: Response<BoxBody>,
    service: String,
    method: String,
    listener: &'static str,
    start: Instant,
) -> Response<BoxBody> {
    let header_code = tonic::Status::from_header_map(resp.headers()).map(|s| s.code());
    let mut record = Some(Record {
        service,
        method,
        listener,
        start,
    });
    if let (Some(code), Some(r)) = (header_code, record.take_if(|_| header_code.is_some())) {
        r.done(code);
    }
    resp.map(|b| Observe { inner: b, record }.boxed_unsync())
}

struct Record {
    service: String,
    method: String,
    listener: &'static str,
    start: Instant,
}

impl Record {
    fn done(self, code: Code) {
        let code = format!("{code:?}");
        metrics::counter!("sidecar_requests_total",
            "service" => self.service.clone(), "method" => self.method.clone(),
            "code" => code, "listener" => self.listener)
        .increment(1);
        metrics::histogram!("sidecar_request_duration_seconds",
            "service" => self.service, "method" => self.method, "listener" => self.listener)
        .record(self.start.elapsed().as_secs_f64());
    }
}

struct Observe {
    inner: BoxBody,
    record: Option<Record>,
}

impl Body for Observe {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let code = frame
                    .trailers_ref()
                    .and_then(tonic::Status::from_header_map)
                    .map(|s| s.code());
                if let (Some(code), Some(r)) = (code, self.record.take_if(|_| code.is_some())) {
                    r.done(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = self.record.take() {
                    r.done(Code::Unavailable);
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = self.record.take() {
                    r.done(Code::Ok);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Holds a concurrency permit until the response body is done.
struct Held {
    inner: Incoming,
    _permit: OwnedSemaphorePermit,
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds gRPC message boundaries in a byte stream: each message is a 5-byte
/// prefix (flag, big-endian length) then its bytes. Nothing is buffered.
#[derive(Debug)]
struct Framer {
    limit: usize,
    prefix: [u8; 5],
    prefix_len: usize,
    remaining: usize,
}

impl Framer {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
        }
    }

    /// Walks `data`; false as soon as a message longer than the limit begins.
    fn scan(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if len > self.limit {
                    return false;
                }
                self.remaining = len;
                self.prefix_len = 0;
            }
        }
        true
    }
}

/// Refuses a request stream carrying a gRPC message longer than the limit.
struct MaxMessage {
    inner: Incoming,
    framer: Framer,
    exceeded: Arc<AtomicBool>,
}

impl MaxMessage {
    fn new(inner: Incoming, limit: usize, exceeded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            framer: Framer::new(limit),
            exceeded,
        }
    }
}

impl Body for MaxMessage {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !self.framer.scan(data.chunk())
                {
                    self.exceeded.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err("gRPC message over the size limit".into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("250m"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", HeaderValue::from_static("3S"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(3)));
        h.insert("grpc-timeout", HeaderValue::from_static("x"));
        assert_eq!(grpc_timeout(&h), None);
    }

    #[test]
    fn framer_finds_messages_across_chunk_boundaries() {
        let msg = |len: u32| {
            let mut v = vec![0u8];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend(std::iter::repeat_n(7u8, len as usize));
            v
        };
        let mut stream = msg(10);
        stream.extend(msg(100));
        let mut f = Framer::new(100);
        for chunk in stream.chunks(3) {
            assert!(f.scan(chunk));
        }
        let mut f = Framer::new(99);
        let ok = stream.chunks(7).all(|c| f.scan(c));
        assert!(!ok, "the second message is over 99 bytes");
    }

    #[test]
    fn identity_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("x-cirrus-user-id", HeaderValue::from_static("spoof"));
        h.insert("x-cirrus-anything", HeaderValue::from_static("spoof"));
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        strip_identity_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("traceparent"));
    }
}
