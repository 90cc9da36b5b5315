//! Tells the service who is calling, in the `x-cirrus-*` headers of
//! [`runtime::caller::Caller`] (user, project, roles, audit id, admin flag and
//! the peer's SPIFFE id), built from what the sidecar verified itself: the
//! [`Authenticated`] token and the connection's [`Peer`]. The caller's own
//! `x-cirrus-*` headers are gone by now ([`super::strip`]).
//!
//! The headers a token gives are built once per verified token (the
//! verified-token cache hands out the same `Arc<Claims>` for every call
//! with that token) and then copied by reference count; only the peer's is
//! set per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, Service};

use super::authenticate::Authenticated;
use crate::stack::{Peer, Req};

/// The trusted headers a token (or no token) gives, peer aside.
type ClaimHeaders = Arc<[(HeaderName, HeaderValue)]>;

/// The headers of `claims`: what [`runtime::caller::Caller::to_metadata`]
/// writes, built from borrowed claims. A value that is no valid ASCII
/// metadata is left out, as `to_metadata` does.
fn claim_headers(claims: Option<&token::Claims>) -> ClaimHeaders {
    use runtime::caller::{AUDIT_ID, IS_ADMIN, PROJECT_ID, ROLES, USER_ID, USER_NAME};
    let mut out = Vec::with_capacity(6);
    let mut put = |k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            out.push((HeaderName::from_static(k), v));
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
    out.into()
}

fn apply(h: &mut HeaderMap, built: &[(HeaderName, HeaderValue)], peer: &str) {
    for (k, v) in built {
        h.insert(k.clone(), v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(peer) {
        h.insert(HeaderName::from_static(runtime::caller::PEER), v);
    }
}

/// Sets the trusted headers on `h` from `claims` and `peer` (no cache).
pub fn set(h: &mut HeaderMap, claims: Option<&token::Claims>, peer: &str) {
    apply(h, &claim_headers(claims), peer);
}

/// How many tokens' headers are remembered (as many as verified tokens).
const CACHE_LIMIT: usize = 10_000;

/// Built headers by the address of the claims they came from. The `Weak`
/// keeps that allocation from being reused by other claims while the entry
/// lives, so an equal address with a live entry is the same claims.
#[derive(Default)]
struct Cache {
    by_claims: HashMap<usize, (Weak<token::Claims>, ClaimHeaders)>,
    anonymous: Option<ClaimHeaders>,
}

impl Cache {
    fn headers(&mut self, claims: Option<&Arc<token::Claims>>) -> ClaimHeaders {
        let Some(c) = claims else {
            return self
                .anonymous
                .get_or_insert_with(|| claim_headers(None))
                .clone();
        };
        let at = Arc::as_ptr(c) as usize;
        if let Some((weak, built)) = self.by_claims.get(&at)
            && std::ptr::eq(weak.as_ptr(), Arc::as_ptr(c))
        {
            return built.clone();
        }
        if self.by_claims.len() >= CACHE_LIMIT {
            self.by_claims.clear();
        }
        let built = claim_headers(Some(c));
        self.by_claims
            .insert(at, (Arc::downgrade(c), built.clone()));
        built
    }
}

pub fn layer() -> TrustedLayer {
    TrustedLayer::default()
}

#[derive(Clone, Default)]
pub struct TrustedLayer {
    cache: Arc<Mutex<Cache>>,
}

impl<S> Layer<S> for TrustedLayer {
    type Service = Trusted<S>;
    fn layer(&self, inner: S) -> Trusted<S> {
        Trusted {
            inner,
            cache: self.cache.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Trusted<S> {
    inner: S,
    cache: Arc<Mutex<Cache>>,
}

impl<S: Service<Req>> Service<Req> for Trusted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        let claims = req
            .extensions()
            .get::<Authenticated>()
            .and_then(|a| a.claims.as_ref());
        let built = match self.cache.lock() {
            Ok(mut cache) => cache.headers(claims),
            Err(_) => claim_headers(claims.map(|c| &**c)),
        };
        let peer = req
            .extensions()
            .get::<Peer>()
            .map_or(crate::policy::EXTERNAL, |p| &*p.id);
        let peer = HeaderValue::from_str(peer).ok();
        let h = req.headers_mut();
        for (k, v) in built.iter() {
            h.insert(k.clone(), v.clone());
        }
        if let Some(v) = peer {
            h.insert(HeaderName::from_static(runtime::caller::PEER), v);
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
    async fn headers_built_once_per_token_never_mix_tokens() {
        let now = time::OffsetDateTime::now_utc();
        let claims = |user: &str, admin: bool| {
            std::sync::Arc::new(token::Claims {
                sub: user.into(),
                user_name: user.into(),
                user_domain_id: "d".into(),
                scope: Some(token::Scope::System),
                roles: if admin { vec!["admin".into()] } else { vec![] },
                iat: now,
                exp: now,
                audit_ids: vec![format!("audit-{user}")],
                methods: vec![],
                is_admin_project: false,
            })
        };
        let svc = layer().layer(tower::service_fn(|r: Req| async move {
            let meta = tonic::metadata::MetadataMap::from_headers(r.headers().clone());
            Ok::<_, Refusal>(runtime::caller::Caller::from_metadata(&meta))
        }));
        let call = |c: Option<std::sync::Arc<token::Claims>>| {
            let svc = svc.clone();
            async move {
                let mut r = req("/a.B/C");
                r.extensions_mut().insert(Authenticated {
                    claims: c,
                    refused: None,
                });
                svc.oneshot(r).await.unwrap()
            }
        };
        let (ann, bob) = (claims("ann", true), claims("bob", false));
        for _ in 0..3 {
            let a = call(Some(ann.clone())).await;
            assert_eq!(a.user_id.as_deref(), Some("ann"));
            assert!(a.is_admin);
            let b = call(Some(bob.clone())).await;
            assert_eq!(b.user_id.as_deref(), Some("bob"));
            assert_eq!(b.audit_id.as_deref(), Some("audit-bob"));
            assert!(!b.is_admin);
            let none = call(None).await;
            assert!(none.user_id.is_none() && !none.is_admin);
        }
        // Claims dropped and made anew (perhaps at the same address) are read anew.
        drop(ann);
        for i in 0..50 {
            let name = format!("user{i}");
            let c = call(Some(claims(&name, false))).await;
            assert_eq!(c.user_id.as_deref(), Some(name.as_str()));
        }
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
