//! Verifies the bearer token offline ([`crate::authn::Authn`]: keys and
//! revocation rules followed from identity) and records the outcome for the
//! layers below as an [`Authenticated`] extension. It refuses nothing itself:
//! whether a method needs a token is the policy's call ([`super::authorize`]),
//! and a token that fails is refused only where one is needed.

use std::task::{Context, Poll};

use http::HeaderMap;
use token::{Claims, TokenError};
use tower::{Layer, Service};

use crate::authn::Authn;
use crate::stack::Req;

/// What the token said, if one came.
#[derive(Debug, Clone, Default)]
pub struct Authenticated {
    pub claims: Option<std::sync::Arc<Claims>>,
    /// Why the token that came was refused.
    pub refused: Option<TokenError>,
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

pub fn layer(authn: Authn) -> AuthenticateLayer {
    AuthenticateLayer { authn }
}

#[derive(Clone)]
pub struct AuthenticateLayer {
    authn: Authn,
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            authn: self.authn.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    authn: Authn,
}

impl<S: Service<Req>> Service<Req> for Authenticate<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        let outcome = match bearer(req.headers()) {
            None => Authenticated::default(),
            Some(t) => match self.authn.verify(t) {
                Ok(c) => Authenticated {
                    claims: Some(c),
                    refused: None,
                },
                Err(e) => Authenticated {
                    claims: None,
                    refused: Some(e),
                },
            },
        };
        req.extensions_mut().insert(outcome);
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

    async fn outcome(header: Option<&str>) -> Authenticated {
        let inner = tower::service_fn(|r: Req| async move {
            let a = r.extensions().get::<Authenticated>().cloned().unwrap();
            let mut rsp = ok();
            rsp.extensions_mut().insert(a);
            Ok::<_, Refusal>(rsp)
        });
        let mut r = req("/a.B/C");
        if let Some(h) = header {
            r.headers_mut()
                .insert(http::header::AUTHORIZATION, h.parse().unwrap());
        }
        // An Authn that has not heard from identity knows no key.
        let rsp = layer(Authn::default())
            .layer(inner)
            .oneshot(r)
            .await
            .unwrap();
        rsp.extensions().get::<Authenticated>().cloned().unwrap()
    }

    #[tokio::test]
    async fn no_token_is_recorded_as_none_and_a_bad_one_with_its_reason() {
        let none = outcome(None).await;
        assert!(none.claims.is_none() && none.refused.is_none());
        let bad = outcome(Some("Bearer v4.public.whatever")).await;
        assert!(bad.claims.is_none());
        assert_eq!(bad.refused, Some(TokenError::UnknownKey));
        // Not a bearer token at all: as if none came.
        let basic = outcome(Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l")).await;
        assert!(basic.claims.is_none() && basic.refused.is_none());
    }

    #[tokio::test]
    async fn a_valid_token_gives_its_claims() {
        let key = token::SigningKey::generate().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let claims = Claims {
            sub: "u1".into(),
            user_name: "ann".into(),
            user_domain_id: "d".into(),
            scope: None,
            roles: vec!["reader".into()],
            iat: now,
            exp: now + time::Duration::hours(1),
            audit_ids: vec!["a1".into()],
            methods: vec!["password".into()],
            is_admin_project: false,
        };
        let t = key.sign(&claims).unwrap();
        let authn = Authn::default();
        authn.set_public_keys([key.public_key()]);
        let inner = tower::service_fn(|r: Req| async move {
            let a = r.extensions().get::<Authenticated>().unwrap();
            assert_eq!(a.claims.as_ref().map(|c| c.sub.as_str()), Some("u1"));
            assert!(a.refused.is_none());
            Ok::<_, Refusal>(ok())
        });
        let mut r = req("/a.B/C");
        r.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        layer(authn).layer(inner).oneshot(r).await.unwrap();
    }

    #[test]
    fn bearer_tokens_are_found_in_either_case() {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
    }
}
