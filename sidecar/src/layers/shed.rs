//! Bounds the requests in flight: past `max_concurrent_requests` a request
//! is refused at once with `UNAVAILABLE` (the caller retries elsewhere or
//! later) instead of queueing behind the others. A request holds its slot
//! until its response body ends, so a long stream counts for as long as it runs.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use super::rescue::Refusal;
use crate::connector::BoxError;
use crate::stack::{BoxBody, Req, Rsp};

pub fn layer(inflight: Arc<Semaphore>) -> ShedLayer {
    ShedLayer { inflight }
}

#[derive(Clone)]
pub struct ShedLayer {
    inflight: Arc<Semaphore>,
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            inflight: self.inflight.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    inflight: Arc<Semaphore>,
}

impl<S> Service<Req> for Shed<S>
where
    S: Service<Req, Response = Rsp, Error = Refusal>,
    S::Future: Send + 'static,
{
    type Response = Rsp;
    type Error = Refusal;
    type Future = BoxFuture<'static, Result<Rsp, Refusal>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            return Box::pin(async { Err(Refusal::Overloaded) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await?;
            Ok(rsp.map(|inner| {
                BoxBody::new(Held {
                    inner,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body that holds a slot until it is done (or dropped).
struct Held {
    inner: BoxBody,
    _permit: OwnedSemaphorePermit,
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
    use crate::layers::test_support::{ok, req};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn past_the_bound_requests_are_refused_until_a_response_body_ends() {
        let inflight = Arc::new(Semaphore::new(1));
        let inner = tower::service_fn(|_: Req| async { Ok::<_, Refusal>(ok()) });
        let svc = layer(inflight.clone()).layer(inner);
        let first = svc.clone().oneshot(req("/a.B/C")).await.unwrap();
        assert_eq!(
            inflight.available_permits(),
            0,
            "the open response holds the slot"
        );
        assert_eq!(
            svc.clone().oneshot(req("/a.B/C")).await.unwrap_err(),
            Refusal::Overloaded
        );
        // Reading the body to its end (here: dropping it) gives the slot back.
        let _ = first.into_body().collect().await.unwrap();
        assert_eq!(inflight.available_permits(), 1);
        svc.oneshot(req("/a.B/C")).await.unwrap();
    }

    #[tokio::test]
    async fn a_refusal_below_gives_the_slot_back() {
        let inflight = Arc::new(Semaphore::new(1));
        let inner =
            tower::service_fn(|_: Req| async { Err::<Rsp, _>(Refusal::Upstream("x".into())) });
        let svc = layer(inflight.clone()).layer(inner);
        svc.oneshot(req("/a.B/C")).await.unwrap_err();
        assert_eq!(inflight.available_permits(), 1);
    }
}
