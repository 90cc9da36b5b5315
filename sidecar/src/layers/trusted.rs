//! Tells the service who is calling, in the `x-cirrus-*` headers of
//! [`runtime::caller::Caller`] (user, project, roles, audit id, admin flag and
//! the peer's SPIFFE id), built from what the sidecar verified itself: the
//! [`Authenticated`] token and the connection's [`Peer`]. The caller's own
//! `x-cirrus-*` headers are gone by now ([`super::strip`]).

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::authenticate::Authenticated;
use crate::stack::{Peer, Req};

/// Sets the trusted headers on `h` from `claims` and `peer`: what
/// [`runtime::caller::Caller::to_metadata`] writes, built from borrowed
/// claims (no `Caller` copy per request). A value that is no valid ASCII
/// metadata is left out, as `to_metadata` does.
pub fn set(h: &mut http::HeaderMap, claims: Option<&token::Claims>, peer: &str) {
    use runtime::caller::{AUDIT_ID, IS_ADMIN, PEER, PROJECT_ID, ROLES, USER_ID, USER_NAME};
    let mut meta = tonic::metadata::MetadataMap::from_headers(std::mem::take(h));
    let mut put = |k: &'static str, v: &str| {
        if let Ok(v) = v.parse() {
            meta.insert(k, v);
        }
    };
    if let Some(c) = claims {
        put(USER_ID, &c.sub);
        put(USER_NAME, &c.user_name);
        if let Some(p) = c.project_id() {
            put(PROJECT_ID, p);
        }
        if !c.roles.is_empty() {
            put(ROLES, &c.roles.join(","));
        }
        put(AUDIT_ID, c.audit_id());
    }
    let admin = claims.is_some_and(token::Claims::is_cloud_admin);
    put(IS_ADMIN, if admin { "true" } else { "false" });
    put(PEER, peer);
    *h = meta.into_headers();
}

pub fn layer() -> TrustedLayer {
    TrustedLayer
}

#[derive(Clone, Copy)]
pub struct TrustedLayer;

impl<S> Layer<S> for TrustedLayer {
    type Service = Trusted<S>;
    fn layer(&self, inner: S) -> Trusted<S> {
        Trusted { inner }
    }
}

#[derive(Clone)]
pub struct Trusted<S> {
    inner: S,
}

impl<S: Service<Req>> Service<Req> for Trusted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        let (parts, body) = req.into_parts();
        let mut parts = parts;
        {
            let claims = parts
                .extensions
                .get::<Authenticated>()
                .and_then(|a| a.claims.as_deref());
            let peer = parts
                .extensions
                .get::<Peer>()
                .map_or(crate::policy::EXTERNAL, |p| &*p.id);
            set(&mut parts.headers, claims, peer);
        }
        req = Req::from_parts(parts, body);
        self.inner.call(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::rescue::Refusal;
    use crate::layers::test_support::{ok, req};
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_service_hears_the_verified_caller() {
        let now = time::OffsetDateTime::now_utc();
        let claims = token::Claims {
            sub: "u1".into(),
            user_name: "ann".into(),
            user_domain_id: "d".into(),
            scope: Some(token::Scope::Project {
                id: "p1".into(),
                name: "p".into(),
                domain_id: "d".into(),
            }),
            roles: vec!["member".into(), "reader".into()],
            iat: now,
            exp: now,
            audit_ids: vec!["a1".into()],
            methods: vec![],
            is_admin_project: false,
        };
        let inner = tower::service_fn(|r: Req| async move {
            let meta = tonic::metadata::MetadataMap::from_headers(r.headers().clone());
            let c = runtime::caller::Caller::from_metadata(&meta);
            assert_eq!(c.user_id.as_deref(), Some("u1"));
            assert_eq!(c.project_id.as_deref(), Some("p1"));
            assert_eq!(c.roles, ["member", "reader"]);
            assert_eq!(c.audit_id.as_deref(), Some("a1"));
            assert!(!c.is_admin);
            assert_eq!(c.peer.as_deref(), Some("spiffe://cirrus.local/svc/image"));
            assert!(
                r.headers().contains_key("traceparent"),
                "other headers stay"
            );
            Ok::<_, Refusal>(ok())
        });
        let mut r = req("/a.B/C");
        r.headers_mut()
            .insert("traceparent", "00-abc-def-01".parse().unwrap());
        r.extensions_mut().insert(Authenticated {
            claims: Some(claims.into()),
            refused: None,
        });
        r.extensions_mut().insert(Peer {
            id: "spiffe://cirrus.local/svc/image".into(),
            public: false,
        });
        layer().layer(inner).oneshot(r).await.unwrap();
    }

    #[tokio::test]
    async fn without_a_token_only_the_peer_is_told() {
        let inner = tower::service_fn(|r: Req| async move {
            let meta = tonic::metadata::MetadataMap::from_headers(r.headers().clone());
            let c = runtime::caller::Caller::from_metadata(&meta);
            assert!(c.user_id.is_none() && c.roles.is_empty() && !c.is_admin);
            assert_eq!(c.peer.as_deref(), Some("external"));
            Ok::<_, Refusal>(ok())
        });
        layer().layer(inner).oneshot(req("/a.B/C")).await.unwrap();
    }
}
