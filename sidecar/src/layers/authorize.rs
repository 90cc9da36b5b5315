//! The policy decides ([`crate::policy::Policy::check`]) by the method, the
//! verified token and the peer; a method no rule names is refused (default
//! deny). Where a token is needed and none — or a refused one — came, the
//! refusal is `UNAUTHENTICATED` with the token's own reason; every other
//! denial is `PERMISSION_DENIED`. The allowing rule's limits travel on as a
//! [`Route`] extension.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};

use super::authenticate::Authenticated;
use super::rescue::Refusal;
use crate::policy::{Denial, EXTERNAL, Policy, Subject};
use crate::stack::{Peer, Req, Rsp};

/// The limits of the rule that allowed a request (`None`: the sidecar's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Route {
    pub max_message_bytes: Option<usize>,
    pub timeout: Option<Duration>,
}

pub fn layer(policy: Arc<Policy>) -> AuthorizeLayer {
    AuthorizeLayer { policy }
}

#[derive(Clone)]
pub struct AuthorizeLayer {
    policy: Arc<Policy>,
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> Authorize<S> {
    fn decide(&self, req: &Req) -> Result<Route, Refusal> {
        let method = super::method::of(req.uri()).ok_or(Refusal::BadPath)?;
        // No peer means no verified connection: treat it as the public side.
        let (peer, public) = req
            .extensions()
            .get::<Peer>()
            .map_or((EXTERNAL, true), |p| (&*p.id, p.public));
        let authn = req.extensions().get::<Authenticated>();
        let subject = Subject {
            claims: authn.and_then(|a| a.claims.as_deref()),
            peer,
            public,
        };
        match self.policy.check(method, &subject) {
            Ok((_, rule)) => Ok(Route {
                max_message_bytes: rule.max_message_bytes,
                timeout: rule.timeout_ms.map(Duration::from_millis),
            }),
            Err(Denial::NeedsToken) => Err(match authn.and_then(|a| a.refused.clone()) {
                Some(e) => Refusal::BadToken(e),
                None => Refusal::NoToken,
            }),
            Err(denial) => Err(Refusal::Denied {
                denial,
                method: method.to_string(),
            }),
        }
    }
}

impl<S> Service<Req> for Authorize<S>
where
    S: Service<Req, Response = Rsp, Error = Refusal>,
{
    type Response = Rsp;
    type Error = Refusal;
    type Future = Either<Ready<Result<Rsp, Refusal>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        match self.decide(&req) {
            Ok(route) => {
                req.extensions_mut().insert(route);
                Either::Right(self.inner.call(req))
            }
            Err(r) => Either::Left(ready(Err(r))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::{ok, req};
    use token::{Claims, TokenError};
    use tower::ServiceExt;

    const POLICY: &str = r#"
[[rule]]
methods = ["a.Open/*"]
token = "none"
max_message_bytes = 10
timeout_ms = 1500

[[rule]]
methods = ["a.Users/List"]
roles = ["reader"]

[[rule]]
methods = ["a.Mesh/Watch"]
mesh = ["spiffe://cirrus.local/svc/*"]
internal_only = true
"#;

    fn claims(roles: &[&str]) -> Claims {
        let now = time::OffsetDateTime::now_utc();
        Claims {
            sub: "u".into(),
            user_name: "n".into(),
            user_domain_id: "d".into(),
            scope: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            iat: now,
            exp: now + time::Duration::hours(1),
            audit_ids: vec!["a".into()],
            methods: vec![],
            is_admin_project: false,
        }
    }

    async fn call(path: &str, peer: Option<Peer>, authn: Authenticated) -> Result<Route, Refusal> {
        let inner = tower::service_fn(|r: Req| async move {
            let mut rsp = ok();
            rsp.extensions_mut()
                .insert(*r.extensions().get::<Route>().unwrap());
            Ok::<_, Refusal>(rsp)
        });
        let mut r = req(path);
        if let Some(p) = peer {
            r.extensions_mut().insert(p);
        }
        r.extensions_mut().insert(authn);
        let svc = layer(Arc::new(Policy::parse(POLICY).unwrap())).layer(inner);
        svc.oneshot(r)
            .await
            .map(|rsp| *rsp.extensions().get::<Route>().unwrap())
    }

    fn public() -> Option<Peer> {
        Some(Peer {
            id: EXTERNAL.into(),
            public: true,
        })
    }
    fn mesh() -> Option<Peer> {
        Some(Peer {
            id: "spiffe://cirrus.local/svc/image".into(),
            public: false,
        })
    }

    #[tokio::test]
    async fn allowed_calls_carry_their_rules_limits() {
        let r = call("/a.Open/Anything", public(), Authenticated::default())
            .await
            .unwrap();
        assert_eq!(
            r,
            Route {
                max_message_bytes: Some(10),
                timeout: Some(Duration::from_millis(1500))
            }
        );
        let reader = Authenticated {
            claims: Some(claims(&["reader"]).into()),
            refused: None,
        };
        assert_eq!(
            call("/a.Users/List", public(), reader).await.unwrap(),
            Route::default()
        );
        call("/a.Mesh/Watch", mesh(), Authenticated::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn refusals_say_why() {
        assert_eq!(
            call("/a.Users/List", public(), Authenticated::default())
                .await
                .unwrap_err(),
            Refusal::NoToken
        );
        let expired = Authenticated {
            claims: None,
            refused: Some(TokenError::Expired),
        };
        assert_eq!(
            call("/a.Users/List", mesh(), expired).await.unwrap_err(),
            Refusal::BadToken(TokenError::Expired)
        );
        let nobody = Authenticated {
            claims: Some(claims(&[]).into()),
            refused: None,
        };
        assert_eq!(
            call("/a.Users/List", public(), nobody).await.unwrap_err(),
            Refusal::Denied {
                denial: Denial::Role,
                method: "a.Users/List".into()
            }
        );
        assert_eq!(
            call("/a.Users/Delete", mesh(), Authenticated::default())
                .await
                .unwrap_err(),
            Refusal::Denied {
                denial: Denial::NoRule,
                method: "a.Users/Delete".into()
            }
        );
        assert_eq!(
            call("/a.Mesh/Watch", public(), Authenticated::default())
                .await
                .unwrap_err(),
            Refusal::Denied {
                denial: Denial::InternalOnly,
                method: "a.Mesh/Watch".into()
            }
        );
        // No peer on the request: as strict as the public side.
        assert!(matches!(
            call("/a.Mesh/Watch", None, Authenticated::default())
                .await
                .unwrap_err(),
            Refusal::Denied {
                denial: Denial::InternalOnly,
                ..
            }
        ));
        // A path that is no method never matches a wildcard rule.
        assert_eq!(
            call(
                "/a.Open/x/../../a.Users/List",
                public(),
                Authenticated::default()
            )
            .await
            .unwrap_err(),
            Refusal::BadPath
        );
    }
}
