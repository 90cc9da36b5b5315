//! The innermost service: sends the request on over HTTP/2 — inbound to the
//! service on loopback (`upstream`), outbound to the peer sidecar the
//! [`super::resolve`] layer chose — and hands back its answer. A transport
//! failure is [`Refusal::Upstream`], whose detail only the log reads.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::Uri;
use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use tower::Service;

use super::rescue::Refusal;
use crate::stack::{BoxBody, Req, Rsp};

#[derive(Clone)]
pub struct Forward<C> {
    client: Client<C, BoxBody>,
    /// Where every request goes; `None`: to the URI's own authority.
    upstream: Option<Authority>,
}

impl<C> Forward<C> {
    pub fn new(client: Client<C, BoxBody>, upstream: Option<Authority>) -> Self {
        Self { client, upstream }
    }
}

/// `uri` with its scheme and authority replaced, the path and query kept.
pub fn retarget(uri: &Uri, authority: Authority) -> Result<Uri, Refusal> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = uri.path_and_query().cloned();
    Uri::from_parts(parts).map_err(|e| Refusal::Upstream(format!("bad target URI: {e}")))
}

impl<C> Service<Req> for Forward<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    type Response = Rsp;
    type Error = Refusal;
    type Future = BoxFuture<'static, Result<Rsp, Refusal>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        // The pooled client is always ready; connecting happens in the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        if let Some(a) = &self.upstream {
            match retarget(req.uri(), a.clone()) {
                Ok(u) => *req.uri_mut() = u,
                Err(e) => return Box::pin(async { Err(e) }),
            }
        }
        let fut = self.client.request(req);
        Box::pin(async move {
            let rsp = fut.await.map_err(|e| {
                use std::error::Error as _;
                let cause = e.source().map(ToString::to_string).unwrap_or_default();
                Refusal::Upstream(format!("{e}: {cause}"))
            })?;
            Ok(rsp.map(BoxBody::new))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::req;
    use tower::ServiceExt;

    #[test]
    fn retargeting_keeps_the_path() {
        let u: Uri = "http://echo/grpc.health.v1.Health/Check".parse().unwrap();
        let t = retarget(&u, "127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(
            t.to_string(),
            "http://127.0.0.1:9/grpc.health.v1.Health/Check"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_upstream_refusal() {
        // A port nothing listens on: bind, learn it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let f = Forward::new(
            crate::stack::upstream_client(None),
            Some(format!("127.0.0.1:{port}").parse().unwrap()),
        );
        let e = f.oneshot(req("/a.B/C")).await.unwrap_err();
        assert!(matches!(e, Refusal::Upstream(_)), "{e:?}");
    }
}
