//! Only the sidecar may say who is calling: every `x-cirrus-*` header a
//! caller sent is removed before anything reads the request (as
//! linkerd2-proxy removes `l5d-client-id` from what clients send).

use std::task::{Context, Poll};

use http::HeaderMap;
use tower::{Layer, Service};

use crate::stack::Req;

/// Removes every `x-cirrus-*` header.
pub fn strip_identity_headers(h: &mut HeaderMap) {
    // Most requests carry none: look before allocating.
    if !h.keys().any(|k| k.as_str().starts_with("x-cirrus-")) {
        return;
    }
    let names: Vec<_> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-cirrus-"))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

pub fn layer() -> StripLayer {
    StripLayer
}

#[derive(Clone, Copy)]
pub struct StripLayer;

impl<S> Layer<S> for StripLayer {
    type Service = Strip<S>;
    fn layer(&self, inner: S) -> Strip<S> {
        Strip { inner }
    }
}

#[derive(Clone)]
pub struct Strip<S> {
    inner: S,
}

impl<S: Service<Req>> Service<Req> for Strip<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        strip_identity_headers(req.headers_mut());
        self.inner.call(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::rescue::Refusal;
    use crate::layers::test_support::{ok, req};
    use http::HeaderValue;
    use tower::ServiceExt;

    #[tokio::test]
    async fn spoofed_identity_headers_never_reach_the_inner_service() {
        let inner = tower::service_fn(|r: Req| async move {
            let names: Vec<String> = r.headers().keys().map(|k| k.to_string()).collect();
            assert_eq!(names, ["traceparent"], "only the trace context is left");
            Ok::<_, Refusal>(ok())
        });
        let mut r = req("/a.B/C");
        for (k, v) in [
            ("x-cirrus-user-id", "spoof"),
            ("x-cirrus-is-admin", "true"),
            ("x-cirrus-peer", "spiffe://cirrus.local/svc/conductor"),
            ("traceparent", "00-abc-def-01"),
        ] {
            r.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        layer().layer(inner).oneshot(r).await.unwrap();
    }
}
