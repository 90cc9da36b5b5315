//! Every call ends: the answer's headers must come within the shortest of
//! the caller's `grpc-timeout`, the rule's `timeout_ms` ([`Route`]) and the
//! sidecar's default, else `DEADLINE_EXCEEDED`. The caller's `grpc-timeout`
//! passes on, so the service knows its deadline too.

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderMap;
use tower::{Layer, Service};

use super::authorize::Route;
use super::rescue::Refusal;
use crate::stack::{Req, Rsp};

/// The `grpc-timeout` header as a duration (`<digits><unit>`).
pub fn grpc_timeout(h: &HeaderMap) -> Option<Duration> {
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

pub fn layer(default: Duration) -> DeadlineLayer {
    DeadlineLayer { default }
}

#[derive(Clone, Copy)]
pub struct DeadlineLayer {
    default: Duration,
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            default: self.default,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    default: Duration,
}

impl<S> Service<Req> for Deadline<S>
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
        let bound = req
            .extensions()
            .get::<Route>()
            .and_then(|r| r.timeout)
            .unwrap_or(self.default);
        let timeout = grpc_timeout(req.headers()).map_or(bound, |t| t.min(bound));
        let fut = self.inner.call(req);
        Box::pin(async move {
            tokio::time::timeout(timeout, fut)
                .await
                .map_err(|_| Refusal::Deadline(timeout))?
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::{ok, req};
    use http::HeaderValue;
    use tower::ServiceExt;

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

    /// An inner service that never answers.
    fn hang() -> impl Service<Req, Response = Rsp, Error = Refusal, Future: Send + 'static> + Clone
    {
        tower::service_fn(|_: Req| std::future::pending::<Result<Rsp, Refusal>>())
    }

    #[tokio::test(start_paused = true)]
    async fn the_shortest_of_caller_rule_and_default_wins() {
        let svc = layer(Duration::from_secs(30)).layer(hang());
        let e = svc.clone().oneshot(req("/a.B/C")).await.unwrap_err();
        assert_eq!(e, Refusal::Deadline(Duration::from_secs(30)));

        let mut r = req("/a.B/C");
        r.extensions_mut().insert(Route {
            max_message_bytes: None,
            timeout: Some(Duration::from_secs(5)),
        });
        assert_eq!(
            svc.clone().oneshot(r).await.unwrap_err(),
            Refusal::Deadline(Duration::from_secs(5))
        );

        let mut r = req("/a.B/C");
        r.headers_mut()
            .insert("grpc-timeout", HeaderValue::from_static("200m"));
        r.extensions_mut().insert(Route {
            max_message_bytes: None,
            timeout: Some(Duration::from_secs(5)),
        });
        assert_eq!(
            svc.oneshot(r).await.unwrap_err(),
            Refusal::Deadline(Duration::from_millis(200))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes() {
        let inner = tower::service_fn(|_: Req| async { Ok::<_, Refusal>(ok()) });
        layer(Duration::from_secs(1))
            .layer(inner)
            .oneshot(req("/a.B/C"))
            .await
            .unwrap();
    }
}
