//! Only the sidecar may say who is calling: every `x-cirrus-*` header a
//! caller sent is removed before anything reads the request (as
//! linkerd2-proxy removes `l5d-client-id` from what clients send).
//!
//! One is not an identity but a carrier: between two sidecars the bearer
//! token travels as [`MESH_BEARER`] instead of `authorization` ([`to_mesh`]
//! on the outbound side, put back here on the inbound side). HTTP/2 never
//! adds `authorization` to its header-compression table, so a token of
//! several hundred bytes is Huffman-coded and decoded again on every call —
//! the largest single cost of a proxied call in the profile (issue 13). Under
//! another name the peer's HPACK table keeps it and a repeated token costs a
//! byte or two. Indexing a token is safe from compression oracles (CRIME,
//! RFC 7541 §7.1) because HPACK matches whole values only and a token's
//! signature cannot be guessed; the name is still stripped from anything a
//! caller sends when a real `authorization` header is present.

use std::task::{Context, Poll};

use http::HeaderMap;
use tower::{Layer, Service};

use crate::stack::Req;

/// The header a sidecar sends the bearer token in to another sidecar.
pub const MESH_BEARER: http::HeaderName = http::HeaderName::from_static("x-cirrus-bearer");

/// Outbound: the token moves from `authorization` to [`MESH_BEARER`].
pub fn to_mesh(h: &mut HeaderMap) {
    if let Some(v) = h.remove(http::header::AUTHORIZATION) {
        h.insert(MESH_BEARER, v);
    }
}

/// Removes every `x-cirrus-*` header; a token sent as [`MESH_BEARER`]
/// becomes `authorization` again, unless the request has one of its own.
pub fn strip_identity_headers(h: &mut HeaderMap) {
    // Most requests carry none: look before allocating.
    if !h.keys().any(|k| k.as_str().starts_with("x-cirrus-")) {
        return;
    }
    if let Some(v) = h.remove(MESH_BEARER)
        && !h.contains_key(http::header::AUTHORIZATION)
    {
        h.insert(http::header::AUTHORIZATION, v);
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
    StripLayer { to_mesh: false }
}

/// The outbound form: strips, then sends the token as [`MESH_BEARER`].
pub fn outbound() -> StripLayer {
    StripLayer { to_mesh: true }
}

#[derive(Clone, Copy)]
pub struct StripLayer {
    to_mesh: bool,
}

impl<S> Layer<S> for StripLayer {
    type Service = Strip<S>;
    fn layer(&self, inner: S) -> Strip<S> {
        Strip {
            inner,
            to_mesh: self.to_mesh,
        }
    }
}

#[derive(Clone)]
pub struct Strip<S> {
    inner: S,
    to_mesh: bool,
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
        if self.to_mesh {
            to_mesh(req.headers_mut());
        }
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

    #[tokio::test]
    async fn the_token_crosses_the_mesh_as_its_own_header_and_comes_back() {
        // Outbound: `authorization` leaves as `x-cirrus-bearer`.
        let inner = tower::service_fn(|r: Req| async move {
            assert!(r.headers().get(http::header::AUTHORIZATION).is_none());
            assert_eq!(r.headers()[MESH_BEARER], "Bearer t0k");
            Ok::<_, Refusal>(ok())
        });
        let mut r = req("/a.B/C");
        r.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0k"),
        );
        outbound().layer(inner).oneshot(r).await.unwrap();

        // Inbound: it is `authorization` again, and no `x-cirrus-*` is left.
        let mut h = HeaderMap::new();
        h.insert(MESH_BEARER, HeaderValue::from_static("Bearer t0k"));
        h.insert("x-cirrus-is-admin", HeaderValue::from_static("true"));
        strip_identity_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[http::header::AUTHORIZATION], "Bearer t0k");

        // A caller's own `authorization` wins over a carried one.
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mine"),
        );
        h.insert(MESH_BEARER, HeaderValue::from_static("Bearer other"));
        strip_identity_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[http::header::AUTHORIZATION], "Bearer mine");
    }
}
