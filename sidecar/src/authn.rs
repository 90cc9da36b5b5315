//! Token verification without a round trip. The keys and revocation rules
//! come from identity's `Watch` stream, followed in the background and
//! re-opened with backoff when it breaks; while identity is away the cached
//! keys keep working. No keys at all, or an unknown key id, fails closed.
//! Verified tokens are cached (`token::VerifiedCache`, bounded) so the
//! signature is checked once; expiry and revocation rules are checked on
//! every call.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use proto::identity::v1 as pb;
use time::OffsetDateTime;
use token::{Claims, RevocationRule, TokenError, VerifiedCache, Verifier};
use tonic::transport::Channel;

#[derive(Clone, Default)]
pub struct Authn {
    inner: Arc<RwLock<State>>,
    verified: Arc<VerifiedCache>,
}

#[derive(Default)]
struct State {
    verifier: Verifier,
    has_keys: bool,
}

fn ts(t: Option<prost_types::Timestamp>) -> OffsetDateTime {
    t.and_then(|t| {
        OffsetDateTime::from_unix_timestamp(t.seconds)
            .ok()
            .map(|d| d + time::Duration::nanoseconds(i64::from(t.nanos)))
    })
    .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn rule(r: pb::RevocationEvent) -> RevocationRule {
    let opt = |s: String| (!s.is_empty()).then_some(s);
    RevocationRule {
        user_id: opt(r.user_id),
        project_id: opt(r.project_id),
        domain_id: opt(r.domain_id),
        audit_id: opt(r.audit_id),
        issued_before: ts(r.issued_before),
    }
}

impl Authn {
    /// Verifies `token`: cached signature check, then expiry and revocations.
    /// The claims are shared with the cache (no copy per request).
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        let s = self.inner.read().map_err(|_| TokenError::Malformed)?;
        if !s.has_keys {
            return Err(TokenError::UnknownKey);
        }
        self.verified
            .verify(&s.verifier, token, OffsetDateTime::now_utc())
    }

    pub fn has_keys(&self) -> bool {
        self.inner.read().map(|s| s.has_keys).unwrap_or(false)
    }

    fn set_keys(&self, keys: &[pb::SigningKey]) {
        self.set_public_keys(keys.iter().map(|k| k.public_key.as_slice()));
    }

    /// Trusts exactly these Ed25519 public keys, as a `Watch` snapshot from
    /// identity does (also for tests and tools that sign their own tokens).
    pub fn set_public_keys<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        if let Ok(mut s) = self.inner.write() {
            let keys: Vec<&[u8]> = keys.into_iter().collect();
            s.has_keys = !keys.is_empty();
            s.verifier.set_keys(keys);
            // A removed key stops verifying at once: entries checked under
            // the old key set are not used (dropped here to free them).
            self.verified.clear();
        }
    }

    fn apply(&self, event: pb::watch_event::Event) {
        match event {
            pb::watch_event::Event::Snapshot(snap) => {
                self.set_keys(&snap.keys);
                if let Ok(mut s) = self.inner.write() {
                    s.verifier
                        .set_rules(snap.revocations.into_iter().map(rule).collect());
                }
            }
            pb::watch_event::Event::Keys(k) => self.set_keys(&k.keys),
            pb::watch_event::Event::Revocation(r) => {
                if let Ok(mut s) = self.inner.write() {
                    s.verifier.add_rule(rule(r));
                }
            }
        }
        metrics::gauge!("sidecar_revocation_rules").set(
            self.inner
                .read()
                .map(|s| s.verifier.rules().len() as f64)
                .unwrap_or(0.0),
        );
    }

    /// Follows identity's `Watch` on `channel` until the task is dropped.
    /// `self_id` is this sidecar's SPIFFE id, which identity needs to hear
    /// when the sidecar calls it straight on loopback (identity's own sidecar);
    /// through identity's sidecar the header is replaced by the verified one.
    pub fn spawn_watch(&self, channel: Channel, self_id: String) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let opened = std::time::Instant::now();
                match this.watch_once(channel.clone(), &self_id).await {
                    Ok(()) => tracing::info!("identity watch stream ended; reconnecting"),
                    Err(e) => {
                        tracing::warn!(error = %e, "identity watch failed; keeping cached keys")
                    }
                }
                // A stream that lived a while was healthy: start the backoff over.
                if opened.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(200);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    async fn watch_once(&self, channel: Channel, self_id: &str) -> Result<(), tonic::Status> {
        let mut client = pb::tokens_client::TokensClient::new(channel);
        let mut req = tonic::Request::new(pb::WatchRequest {});
        if let Ok(v) = self_id.parse() {
            req.metadata_mut().insert(runtime::caller::PEER, v);
        }
        let mut stream = client.watch(req).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            if let Some(event) = ev.event {
                self.apply(event);
            }
        }
        Ok(())
    }

    /// Prunes rules older than any live token (identity's maximum lifetime).
    pub fn prune(&self, max_ttl: time::Duration) {
        if let Ok(mut s) = self.inner.write() {
            s.verifier.prune_rules(OffsetDateTime::now_utc(), max_ttl);
        }
    }
}
