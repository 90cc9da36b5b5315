//! Outbound only: the local service calls `http://<service>/...`; the
//! service name is resolved through identity's catalog (internal endpoints,
//! cached, round-robin over replicas) and the request is pointed at the
//! chosen peer sidecar, whose SPIFFE id the connector then checks.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::HeaderValue;
use tower::{Layer, Service};

use super::rescue::Refusal;
use crate::catalog::Catalog;
use crate::connector::MeshConnector;
use crate::stack::{Req, Rsp};

/// The service a request names: the URI's host, else the `Host` header's.
pub fn service_of(req: &Req) -> Option<String> {
    req.uri().host().map(str::to_owned).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.split(':').next().unwrap_or(h).to_owned())
    })
}

pub fn layer(catalog: Catalog, connector: MeshConnector) -> ResolveLayer {
    ResolveLayer { catalog, connector }
}

#[derive(Clone)]
pub struct ResolveLayer {
    catalog: Catalog,
    connector: MeshConnector,
}

impl<S> Layer<S> for ResolveLayer {
    type Service = Resolve<S>;
    fn layer(&self, inner: S) -> Resolve<S> {
        Resolve {
            inner,
            catalog: self.catalog.clone(),
            connector: self.connector.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Resolve<S> {
    inner: S,
    catalog: Catalog,
    connector: MeshConnector,
}

impl<S> Service<Req> for Resolve<S>
where
    S: Service<Req, Response = Rsp, Error = Refusal> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Rsp;
    type Error = Refusal;
    type Future = BoxFuture<'static, Result<Rsp, Refusal>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        // The ready inner service is taken for this call (tower's clone-and-swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (catalog, connector) = (self.catalog.clone(), self.connector.clone());
        Box::pin(async move {
            let host = service_of(&req).ok_or_else(|| {
                Refusal::Unroutable("call http://<service-name>/... through the sidecar".into())
            })?;
            let endpoint = catalog.pick(&host).await.map_err(Refusal::Unroutable)?;
            let route = connector.route(&host, &endpoint);
            let authority = route
                .parse()
                .map_err(|_| Refusal::Upstream(format!("bad endpoint {route}")))?;
            *req.uri_mut() = super::forward::retarget(req.uri(), authority)?;
            if let Ok(v) = HeaderValue::from_str(&host) {
                req.headers_mut().insert(http::header::HOST, v);
            }
            inner.call(req).await
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::req;

    #[tokio::test]
    async fn a_name_the_catalog_cannot_resolve_is_unroutable_and_goes_nowhere() {
        use tower::ServiceExt;
        // Identity is unreachable: no catalog, so no endpoint for anyone.
        let identity = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let catalog = Catalog::new(identity, "spiffe://cirrus.local/svc/test".into());
        let (_dir, files) = test_tls();
        let tls = crate::tls::Tls::load(files).unwrap();
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        let inner = tower::service_fn(move |_: Req| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, Refusal>(crate::layers::test_support::ok()) }
        });
        let svc = layer(catalog, MeshConnector::new(tls)).layer(inner);
        let e = svc.oneshot(req("/a.B/C")).await.unwrap_err();
        assert!(
            matches!(&e, Refusal::Unroutable(m) if m.starts_with("cannot read the catalog")),
            "{e:?}"
        );
        assert!(!reached.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// A throw-away CA and workload certificate on disk.
    fn test_tls() -> (tempfile::TempDir, crate::tls::Files) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let ca = certs::Authority::create("test CA", time::Duration::hours(1)).unwrap();
        ca.save(&dir).unwrap();
        let pair = ca
            .issue(
                &certs::service_id("test", None).unwrap(),
                &["test".into()],
                time::Duration::hours(1),
            )
            .unwrap();
        certs::write_pair(&dir, "test", &pair).unwrap();
        let files = crate::tls::Files {
            cert: dir.join("test.crt"),
            key: dir.join("test.key"),
            bundle: dir.join("bundle.pem"),
        };
        (tmp, files)
    }

    #[test]
    fn the_service_name_comes_from_the_uri_or_the_host_header() {
        assert_eq!(service_of(&req("/a.B/C")).as_deref(), Some("svc"));
        let mut r = http::Request::builder()
            .uri("/a.B/C")
            .body(crate::layers::test_support::body(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(service_of(&r), None);
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("image:80"));
        assert_eq!(service_of(&r).as_deref(), Some("image"));
    }
}
