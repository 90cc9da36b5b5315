//! Counts and times every request by the gRPC status it ended with
//! (`sidecar_requests_total{service,method,code,listener}`,
//! `sidecar_request_duration_seconds`), refusals included, and runs it in a
//! tracing span. The status is read from the response headers (a
//! trailers-only answer) or else from the trailers when the body ends.
//!
//! The `method` label is the method only when a policy rule named it:
//! paths that are no method and methods no rule knows are labelled
//! `unknown`, so a caller cannot grow the metric's label set without bound.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use metrics::{Counter, Histogram};
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;

use super::rescue::Refused;
use crate::connector::BoxError;
use crate::stack::{BoxBody, Peer, Req, Rsp};

/// Which path a request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Inbound,
    Outbound,
}

pub fn layer(service: &str, side: Side) -> ObserveLayer {
    ObserveLayer {
        service: service.into(),
        side,
        handles: Arc::default(),
        // Spans are exported only with an OTLP endpoint (runtime::telemetry);
        // without one, a span per request at the default `info` filter is
        // pure cost (the log formatter records its fields), so it is `debug`.
        traced: std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some(),
    }
}

/// The metric handles of one (method, code, listener): registering a
/// labelled metric (label strings, hashing, the registry's lock) costs more
/// than counting, so each combination is looked up once. Bounded: past
/// [`HANDLE_LIMIT`] combinations the registry is asked each time.
type Handles = Arc<std::sync::Mutex<HashMap<(Arc<str>, Code, &'static str), (Counter, Histogram)>>>;
const HANDLE_LIMIT: usize = 4096;

#[derive(Clone)]
pub struct ObserveLayer {
    service: Arc<str>,
    side: Side,
    handles: Handles,
    traced: bool,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            service: self.service.clone(),
            side: self.side,
            handles: self.handles.clone(),
            traced: self.traced,
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    service: Arc<str>,
    side: Side,
    handles: Handles,
    /// Per-request spans at `info` (exported) rather than `debug`.
    traced: bool,
}

impl<S> Service<Req> for Observe<S>
where
    S: Service<Req, Response = Rsp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Rsp;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Rsp, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let start = Instant::now();
        let peer = req.extensions().get::<Peer>();
        let listener = match (self.side, peer) {
            (Side::Outbound, _) => "outbound",
            (Side::Inbound, Some(p)) if !p.public => "internal",
            (Side::Inbound, _) => "public",
        };
        let method: Arc<str> = super::method::of(req.uri()).unwrap_or("unknown").into();
        let peer_id = peer.map_or("", |p| &*p.id);
        let span = match (self.side, self.traced) {
            (Side::Inbound, true) => tracing::info_span!("inbound", service = %self.service,
                %method, peer = %peer_id, listener),
            (Side::Inbound, false) => tracing::debug_span!("inbound", service = %self.service,
                %method, peer = %peer_id, listener),
            (Side::Outbound, true) => {
                tracing::info_span!("outbound", from = %self.service, %method)
            }
            (Side::Outbound, false) => {
                tracing::debug_span!("outbound", from = %self.service, %method)
            }
        };
        let service = self.service.clone();
        let handles = self.handles.clone();
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let Ok(rsp) = fut.await;
                let known = !matches!(
                    rsp.extensions().get::<Refused>(),
                    Some(Refused("bad_path" | "no_rule"))
                );
                let record = Record {
                    service,
                    method: if known { method } else { "unknown".into() },
                    listener,
                    start,
                    handles,
                };
                Ok(observe(rsp, record))
            }
            .instrument(span),
        )
    }
}

/// Records `rsp` now if its headers carry the status, else when its body ends.
fn observe(rsp: Rsp, record: Record) -> Rsp {
    match tonic::Status::from_header_map(rsp.headers()) {
        Some(s) => {
            record.done(s.code());
            rsp
        }
        None => rsp.map(|inner| {
            BoxBody::new(Observed {
                inner,
                record: Some(record),
            })
        }),
    }
}

struct Record {
    service: Arc<str>,
    method: Arc<str>,
    listener: &'static str,
    start: Instant,
    handles: Handles,
}

impl Record {
    fn register(&self, code: Code) -> (Counter, Histogram) {
        let counter = metrics::counter!("sidecar_requests_total",
            "service" => self.service.to_string(), "method" => self.method.to_string(),
            "code" => format!("{code:?}"), "listener" => self.listener);
        let histogram = metrics::histogram!("sidecar_request_duration_seconds",
            "service" => self.service.to_string(), "method" => self.method.to_string(),
            "listener" => self.listener);
        (counter, histogram)
    }

    fn done(self, code: Code) {
        let key = (self.method.clone(), code, self.listener);
        let cached = self.handles.lock().ok().and_then(|m| m.get(&key).cloned());
        let (counter, histogram) = match cached {
            Some(h) => h,
            None => {
                let h = self.register(code);
                if let Ok(mut m) = self.handles.lock()
                    && m.len() < HANDLE_LIMIT
                {
                    m.insert(key, h.clone());
                }
                h
            }
        };
        counter.increment(1);
        histogram.record(self.start.elapsed().as_secs_f64());
    }
}

struct Observed {
    inner: BoxBody,
    record: Option<Record>,
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| tonic::Status::from_header_map(t).map_or(Code::Ok, |s| s.code())),
            Poll::Ready(Some(Err(_))) => Some(Code::Unavailable),
            Poll::Ready(None) => Some(Code::Ok),
            Poll::Pending => None,
        };
        if let (Some(code), Some(r)) = (code, self.record.take_if(|_| code.is_some())) {
            r.done(code);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::rescue::Refusal;
    use crate::layers::test_support::{ok, req};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn answers_and_refusals_are_counted_by_code_and_known_method() {
        let recorder = metrics_util_free::Capture::default();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let inner = tower::service_fn(|r: Req| async move {
            Ok::<_, Infallible>(match r.uri().path() {
                "/a.B/Known" => ok(),
                "/a.B/Unnamed" => Refusal::Denied {
                    denial: crate::policy::Denial::NoRule,
                    method: "a.B/Unnamed".into(),
                }
                .into_response(false),
                _ => Refusal::BadPath.into_response(false),
            })
        });
        let svc = layer("svc", Side::Inbound).layer(inner);
        let rsp = svc.clone().oneshot(req("/a.B/Known")).await.unwrap();
        // Counted when the body ends, as OK (no trailers: a plain end).
        let _ = rsp.into_body().collect().await.unwrap();
        svc.clone().oneshot(req("/a.B/Unnamed")).await.unwrap();
        svc.oneshot(req("/a.B/x/../y")).await.unwrap();
        let seen = recorder.counters();
        assert!(
            seen.contains(&"method=a.B/Known code=Ok listener=public".to_string()),
            "{seen:?}"
        );
        assert!(
            seen.contains(&"method=unknown code=PermissionDenied listener=public".to_string()),
            "{seen:?}"
        );
        assert!(
            seen.contains(&"method=unknown code=Unimplemented listener=public".to_string()),
            "{seen:?}"
        );
    }

    /// A tiny metrics recorder for the test (labels of every counter increment).
    mod metrics_util_free {
        use std::sync::{Arc, Mutex};

        use metrics::{
            Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
            Unit,
        };

        #[derive(Default, Clone)]
        pub struct Capture(Arc<Mutex<Vec<String>>>);

        impl Capture {
            pub fn counters(&self) -> Vec<String> {
                self.0.lock().unwrap().clone()
            }
        }

        struct One(Arc<Mutex<Vec<String>>>, String);
        impl CounterFn for One {
            fn increment(&self, _: u64) {
                self.0.lock().unwrap().push(self.1.clone());
            }
            fn absolute(&self, _: u64) {}
        }

        impl Recorder for Capture {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
                if key.name() != "sidecar_requests_total" {
                    return Counter::noop();
                }
                let get = |n: &str| {
                    key.labels()
                        .find(|l| l.key() == n)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let text = format!(
                    "method={} code={} listener={}",
                    get("method"),
                    get("code"),
                    get("listener")
                );
                Counter::from_arc(Arc::new(One(self.0.clone(), text)))
            }
            fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
                Gauge::noop()
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
                Histogram::noop()
            }
        }
    }
}
