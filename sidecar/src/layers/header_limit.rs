//! An oversized header block (a 64 KiB bearer token, say) costs its own
//! request only: it is refused with `RESOURCE_EXHAUSTED`, and the other
//! streams of the connection carry on. HTTP/2 itself is set to accept header
//! blocks well past this limit ([`h2_hard_limit`]), because its own refusal
//! past `SETTINGS_MAX_HEADER_LIST_SIZE` is no gRPC status, and a single
//! header over it is a connection error (`GOAWAY`).

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};

use super::rescue::Refusal;
use crate::stack::{Req, Rsp};

/// The header-list limit given to HTTP/2: past it the connection is closed as
/// a flood. Requests between `max_header_bytes` and this get a status.
pub fn h2_hard_limit(max_header_bytes: usize) -> u32 {
    u32::try_from(max_header_bytes.saturating_mul(4).max(256 * 1024)).unwrap_or(u32::MAX)
}

/// The size of a header list as HTTP/2 counts it (RFC 9113 §6.5.2: name +
/// value + 32 per field), the `:path` included.
pub fn size(req: &Req) -> usize {
    let pseudo = req.uri().path_and_query().map_or(0, |p| p.as_str().len()) + 5 + 32;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + pseudo
}

pub fn layer(limit: usize) -> HeaderLimitLayer {
    HeaderLimitLayer { limit }
}

#[derive(Clone, Copy)]
pub struct HeaderLimitLayer {
    limit: usize,
}

impl<S> Layer<S> for HeaderLimitLayer {
    type Service = HeaderLimit<S>;
    fn layer(&self, inner: S) -> HeaderLimit<S> {
        HeaderLimit {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct HeaderLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> Service<Req> for HeaderLimit<S>
where
    S: Service<Req, Response = Rsp, Error = Refusal>,
{
    type Response = Rsp;
    type Error = Refusal;
    type Future = Either<Ready<Result<Rsp, Refusal>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if size(&req) > self.limit {
            return Either::Left(ready(Err(Refusal::HeadersTooLarge { limit: self.limit })));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::{ok, req};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_big_header_block_is_refused_and_a_normal_one_passes() {
        let inner = tower::service_fn(|_: Req| async { Ok::<_, Refusal>(ok()) });
        let svc = layer(16 * 1024).layer(inner);
        let mut big = req("/a.B/C");
        big.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {}", "x".repeat(64 * 1024)).parse().unwrap(),
        );
        assert_eq!(
            svc.clone().oneshot(big).await.unwrap_err(),
            Refusal::HeadersTooLarge { limit: 16 * 1024 }
        );
        let mut normal = req("/a.B/C");
        normal.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {}", "x".repeat(900)).parse().unwrap(),
        );
        svc.oneshot(normal).await.unwrap();
    }

    #[test]
    fn http2_accepts_more_than_the_polite_limit() {
        assert!(h2_hard_limit(16 * 1024) as usize >= 4 * 16 * 1024);
        assert!(h2_hard_limit(16 * 1024) as usize > 64 * 1024 + 1024);
    }
}
