//! The one place a refusal becomes a gRPC status: every layer below fails
//! with a typed [`Refusal`]; this layer answers it as a trailers-only
//! response, counts it in `sidecar_denials_total{service,reason}`, logs the
//! detail, and marks the response with [`Refused`] for the observer.
//!
//! Why a token was refused (unknown key, bad signature, expired, revoked) is
//! logged and counted always, and told to mesh peers (mTLS callers, and the
//! local service on the outbound side); callers on the public listener read
//! one constant, [`runtime::error::UNAUTHENTICATED_MESSAGE`], for every
//! authentication failure, so the public side is no oracle for tokens.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use token::TokenError;
use tonic::Code;
use tower::{Layer, Service};

use super::message_size::FrameError;
use crate::policy::Denial;
use crate::stack::{BoxBody, Peer, Req, Rsp};

/// Why the sidecar refused a request, before or instead of the service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path is not `/<package>.<Service>/<Method>`.
    BadPath,
    /// The header block is over the limit.
    HeadersTooLarge { limit: usize },
    /// The method needs a token and none came.
    NoToken,
    /// A token came and was refused.
    BadToken(TokenError),
    /// The policy said no (never [`Denial::NeedsToken`]: that is one of the two above).
    Denied { denial: Denial, method: String },
    /// Too many requests in flight.
    Overloaded,
    /// A request message over the limit.
    MessageTooLarge { limit: usize },
    /// The request body is not a sequence of gRPC messages.
    BadFraming(FrameError),
    /// No answer within the deadline.
    Deadline(Duration),
    /// Outbound: the name cannot be resolved to an endpoint (the text names it).
    Unroutable(String),
    /// The service (or the peer) could not be reached; the detail is for the log.
    Upstream(String),
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Refusal::BadPath => Code::Unimplemented,
            Refusal::HeadersTooLarge { .. } | Refusal::MessageTooLarge { .. } => {
                Code::ResourceExhausted
            }
            Refusal::NoToken | Refusal::BadToken(_) => Code::Unauthenticated,
            Refusal::Denied { .. } => Code::PermissionDenied,
            Refusal::Overloaded | Refusal::Unroutable(_) | Refusal::Upstream(_) => {
                Code::Unavailable
            }
            Refusal::BadFraming(_) => Code::InvalidArgument,
            Refusal::Deadline(_) => Code::DeadlineExceeded,
        }
    }

    /// What the caller reads; `public` callers learn nothing about tokens.
    pub fn message(&self, public: bool) -> String {
        match self {
            Refusal::NoToken | Refusal::BadToken(_) if public => {
                runtime::error::UNAUTHENTICATED_MESSAGE.to_string()
            }
            Refusal::BadPath => {
                "not a gRPC method path: expected /<package>.<Service>/<Method>".into()
            }
            Refusal::HeadersTooLarge { limit } => {
                format!("request headers larger than {limit} bytes")
            }
            Refusal::NoToken => Denial::NeedsToken.message(""),
            Refusal::BadToken(e) => e.to_string(),
            Refusal::Denied { denial, method } => denial.message(method),
            Refusal::Overloaded => "overloaded: too many requests in flight; retry later".into(),
            Refusal::MessageTooLarge { limit } => {
                format!("request message larger than {limit} bytes")
            }
            Refusal::BadFraming(e) => e.to_string(),
            Refusal::Deadline(t) => format!("no answer within {t:?}"),
            Refusal::Unroutable(m) => m.clone(),
            Refusal::Upstream(_) => "upstream service unavailable".into(),
        }
    }

    /// The `reason` label of `sidecar_denials_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadPath => "bad_path",
            Refusal::HeadersTooLarge { .. } => "headers_too_large",
            Refusal::NoToken => "no_token",
            Refusal::BadToken(e) => match e {
                TokenError::Malformed => "token_malformed",
                TokenError::UnknownKey => "token_unknown_key",
                TokenError::BadSignature => "token_bad_signature",
                TokenError::Expired => "token_expired",
                TokenError::Revoked => "token_revoked",
            },
            Refusal::Denied { denial, .. } => denial.reason(),
            Refusal::Overloaded => "overload",
            Refusal::MessageTooLarge { .. } => "message_too_large",
            Refusal::BadFraming(_) => "bad_framing",
            Refusal::Deadline(_) => "deadline",
            Refusal::Unroutable(_) => "unroutable",
            Refusal::Upstream(_) => "upstream",
        }
    }

    /// The answer: a trailers-only gRPC status.
    pub fn into_response(self, public: bool) -> Rsp {
        let reason = self.reason();
        let mut r = tonic::Status::new(self.code(), self.message(public)).into_http::<BoxBody>();
        r.extensions_mut().insert(Refused(reason));
        r
    }
}

/// Set on a response the sidecar made itself: the refusal's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

pub fn layer(service: &str) -> RescueLayer {
    RescueLayer {
        service: service.into(),
    }
}

#[derive(Clone)]
pub struct RescueLayer {
    service: std::sync::Arc<str>,
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            service: self.service.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Rescue<S> {
    inner: S,
    service: std::sync::Arc<str>,
}

impl<S> Service<Req> for Rescue<S>
where
    S: Service<Req, Response = Rsp, Error = Refusal>,
    S::Future: Send + 'static,
{
    type Response = Rsp;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every layer below is always ready; a refusal here would have no request to answer.
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The outbound side has no peer: the local service reads every detail.
        let public = req.extensions().get::<Peer>().is_some_and(|p| p.public);
        RescueFuture {
            inner: Box::pin(self.inner.call(req)),
            service: self.service.clone(),
            public,
        }
    }
}

pub struct RescueFuture<F> {
    inner: Pin<Box<F>>,
    service: std::sync::Arc<str>,
    public: bool,
}

impl<F> Future for RescueFuture<F>
where
    F: Future<Output = Result<Rsp, Refusal>>,
{
    type Output = Result<Rsp, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = match self.inner.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(refusal)) => {
                let reason = refusal.reason();
                match &refusal {
                    Refusal::Upstream(detail) => {
                        tracing::warn!(reason, %detail, "upstream unavailable")
                    }
                    Refusal::BadToken(e) => tracing::info!(reason, error = %e, "token refused"),
                    other => tracing::debug!(reason, refusal = ?other, "refused"),
                }
                metrics::counter!("sidecar_denials_total",
                    "service" => self.service.to_string(), "reason" => reason)
                .increment(1);
                refusal.into_response(self.public)
            }
        };
        Poll::Ready(Ok(r))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::req;
    use tower::ServiceExt;

    fn status_of(r: &Rsp) -> tonic::Status {
        tonic::Status::from_header_map(r.headers()).unwrap()
    }

    async fn answer(refusal: Refusal, public: bool) -> Rsp {
        let inner = tower::service_fn(move |_: Req| {
            let r = refusal.clone();
            async move { Err::<Rsp, _>(r) }
        });
        let mut rq = req("/a.B/C");
        rq.extensions_mut().insert(Peer {
            id: (if public {
                "external"
            } else {
                "spiffe://cirrus.local/svc/x"
            })
            .into(),
            public,
        });
        layer("svc").layer(inner).oneshot(rq).await.unwrap()
    }

    #[tokio::test]
    async fn token_reasons_reach_mesh_peers_and_public_callers_read_a_constant() {
        let mesh = answer(Refusal::BadToken(TokenError::Expired), false).await;
        let s = status_of(&mesh);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unauthenticated, "token has expired")
        );
        assert_eq!(
            mesh.extensions().get::<Refused>(),
            Some(&Refused("token_expired"))
        );

        for refusal in [
            Refusal::BadToken(TokenError::Expired),
            Refusal::BadToken(TokenError::UnknownKey),
            Refusal::BadToken(TokenError::BadSignature),
            Refusal::NoToken,
        ] {
            let public = answer(refusal, true).await;
            let s = status_of(&public);
            assert_eq!(
                (s.code(), s.message()),
                (
                    Code::Unauthenticated,
                    runtime::error::UNAUTHENTICATED_MESSAGE
                )
            );
        }
        let s = status_of(&answer(Refusal::BadToken(TokenError::UnknownKey), false).await);
        assert_eq!(s.message(), "token signed by an unknown key");
    }

    #[tokio::test]
    async fn every_refusal_is_a_status_and_internal_detail_stays_in_the_log() {
        let s = status_of(
            &answer(
                Refusal::Upstream("connect ECONNREFUSED 127.0.0.1:9".into()),
                false,
            )
            .await,
        );
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "upstream service unavailable")
        );
        let s = status_of(&answer(Refusal::BadPath, true).await);
        assert_eq!(s.code(), Code::Unimplemented);
        let s = status_of(&answer(Refusal::HeadersTooLarge { limit: 16 }, true).await);
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::ResourceExhausted,
                "request headers larger than 16 bytes"
            )
        );
        let s = status_of(
            &answer(
                Refusal::Denied {
                    denial: Denial::NoRule,
                    method: "a.B/C".into(),
                },
                true,
            )
            .await,
        );
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::PermissionDenied,
                "no policy allows a.B/C (default deny)"
            )
        );
    }

    #[tokio::test]
    async fn answers_pass_through_untouched() {
        let inner = tower::service_fn(|_: Req| async {
            Ok::<_, Refusal>(crate::layers::test_support::ok())
        });
        let r = layer("svc")
            .layer(inner)
            .oneshot(req("/a.B/C"))
            .await
            .unwrap();
        assert_eq!(r.status(), http::StatusCode::OK);
        assert!(r.extensions().get::<Refused>().is_none());
    }
}
