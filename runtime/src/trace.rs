//! One trace across the cloud: the W3C trace context (`traceparent`,
//! `tracestate`) travels in gRPC metadata between services and in message
//! headers through the queue.
//!
//! - Server side, [`request_span`] (the shared router's `trace_fn`) makes each
//!   request's `grpc` span a child of the caller's span when the request
//!   carries a `traceparent`.
//! - Client side, every channel the runtime builds ([`crate::serve::via_sidecar`],
//!   [`crate::process::via_sidecar_unix`], or [`traced`] around a direct
//!   one) is a [`Channel`]: it writes the current span's context into each
//!   outgoing request's metadata. A call made inside a request's span (or a
//!   span made from a queue message) thus continues its trace.
//! - Sidecars pass `traceparent` through untouched both ways (they strip only
//!   `x-cirrus-*`), so the hop through them is invisible to the trace.
//! - The queue client puts the publisher's context into each message's
//!   headers; `Delivery::span` makes the consumer's span its child.
//!
//! A task spawned from a request (`tokio::spawn`) leaves the span behind
//! unless it is instrumented with it (`.in_current_span()`).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A channel to another service that carries the caller's trace context.
pub type Channel = InterceptedService<tonic::transport::Channel, Inject>;

/// The interceptor behind [`Channel`]: writes the current span's context
/// into the request's metadata (nothing when there is no current span).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inject;

impl tonic::service::Interceptor for Inject {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject_metadata(req.metadata_mut());
        Ok(req)
    }
}

/// `channel`, carrying the trace context of each call from now on.
pub fn traced(channel: tonic::transport::Channel) -> Channel {
    InterceptedService::new(channel, Inject)
}

/// Writes the current span's W3C context into `metadata`, unless the
/// request already names a parent of its own.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    if metadata.contains_key("traceparent") {
        return;
    }
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// The trace context a request's headers carry (an empty context without one).
pub fn extract_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The span of one incoming gRPC request, named by its path; a child of the
/// caller's span when the request carries a `traceparent`.
pub fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    let span = tracing::info_span!("grpc", path = %req.uri().path(), otel.kind = "server");
    let parent = extract_headers(req.headers());
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_call_inside_a_span_carries_its_trace_and_the_server_span_continues_it() {
        with_otel(|| {
            let caller = tracing::info_span!("caller");
            let caller_trace = caller.context().span().span_context().trace_id();
            let mut md = MetadataMap::new();
            caller.in_scope(|| inject_metadata(&mut md));
            let tp = md.get("traceparent").unwrap().to_str().unwrap().to_string();
            assert!(tp.contains(&caller_trace.to_string()), "{tp}");

            let req = http::Request::builder()
                .uri("http://x/svc.v1.S/Call")
                .header("traceparent", tp.as_str())
                .body(())
                .unwrap();
            let server = request_span(&req);
            assert_eq!(
                server.context().span().span_context().trace_id(),
                caller_trace
            );
        });
    }

    #[test]
    fn no_span_no_header_and_an_explicit_parent_is_kept() {
        with_otel(|| {
            let mut md = MetadataMap::new();
            inject_metadata(&mut md);
            assert!(md.get("traceparent").is_none());

            let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            md.insert("traceparent", given.parse().unwrap());
            tracing::info_span!("other").in_scope(|| inject_metadata(&mut md));
            assert_eq!(md.get("traceparent").unwrap(), given);

            let bare = http::Request::builder().uri("http://x/a").body(()).unwrap();
            let span = request_span(&bare);
            assert!(
                span.context().span().span_context().is_valid(),
                "a root span of its own"
            );
        });
    }
}
