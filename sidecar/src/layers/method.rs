//! Only a path of exactly `/<package>.<Service>/<Method>` names a method.
//! Policy matching is on that name, so anything else — `..` segments,
//! percent-escapes, a query, a third segment, a missing package — is refused
//! here, before the policy is consulted: otherwise
//! `/grpc.health.v1.Health/../../identity.v1.Users/ListUsers` would match the
//! open health rule and reach the service. The refusal is `UNIMPLEMENTED`,
//! what a gRPC server answers for a method it does not have.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};

use super::rescue::Refusal;
use crate::stack::{Req, Rsp};

fn identifier(s: &str) -> bool {
    let mut chars = s.bytes();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `package.Service/Method` (no leading slash) when `uri` is exactly a gRPC
/// method path; `None` for anything else.
pub fn of(uri: &http::Uri) -> Option<&str> {
    if uri.query().is_some() {
        return None;
    }
    let name = uri.path().strip_prefix('/')?;
    let (service, method) = name.split_once('/')?;
    let (package, svc) = service.rsplit_once('.')?;
    (identifier(method) && identifier(svc) && package.split('.').all(identifier)).then_some(name)
}

pub fn layer() -> MethodLayer {
    MethodLayer
}

#[derive(Clone, Copy)]
pub struct MethodLayer;

impl<S> Layer<S> for MethodLayer {
    type Service = Method<S>;
    fn layer(&self, inner: S) -> Method<S> {
        Method { inner }
    }
}

#[derive(Clone)]
pub struct Method<S> {
    inner: S,
}

impl<S> Service<Req> for Method<S>
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
        if of(req.uri()).is_none() {
            return Either::Left(ready(Err(Refusal::BadPath)));
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

    #[test]
    fn only_exact_method_paths_are_methods() {
        let m = |p: &str| of(&p.parse::<http::Uri>().unwrap()).map(str::to_owned);
        assert_eq!(
            m("/grpc.health.v1.Health/Check").as_deref(),
            Some("grpc.health.v1.Health/Check")
        );
        assert_eq!(
            m("/identity.v1.Users/ListUsers").as_deref(),
            Some("identity.v1.Users/ListUsers")
        );
        assert_eq!(m("/a_1.B_2/_c3").as_deref(), Some("a_1.B_2/_c3"));
        for bad in [
            "/grpc.health.v1.Health/../../identity.v1.Users/ListUsers",
            "/grpc.health.v1.Health/Check/",
            "/grpc.health.v1.Health/Check?x=1",
            "/grpc.health.v1.Health/%43heck",
            "/grpc.health.v1.Health/",
            "/Health/Check",
            "/.Health/Check",
            "/grpc..Health/Check",
            "/grpc.health.v1.1Health/Check",
            "//grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health//Check",
            "/",
            "*",
        ] {
            assert_eq!(m(bad), None, "{bad} is no method path");
        }
    }

    #[tokio::test]
    async fn a_bad_path_never_reaches_the_inner_service() {
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = reached.clone();
        let inner = tower::service_fn(move |_: Req| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, Refusal>(ok()) }
        });
        let svc = layer().layer(inner);
        let e = svc
            .clone()
            .oneshot(req(
                "/grpc.health.v1.Health/../../identity.v1.Users/ListUsers",
            ))
            .await
            .unwrap_err();
        assert_eq!(e, Refusal::BadPath);
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
        svc.oneshot(req("/grpc.health.v1.Health/Check"))
            .await
            .unwrap();
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
