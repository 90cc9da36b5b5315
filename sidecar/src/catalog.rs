//! Service names to mesh endpoints, from identity's catalog (the internal
//! interface), cached for a few seconds and spread round-robin over replicas.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proto::identity::v1 as pb;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// How long a fetched catalog is used before asking identity again.
const FRESH: Duration = Duration::from_secs(10);

/// The last catalog read, and when: service name → internal endpoints.
type Cached = Option<(Instant, HashMap<String, Vec<String>>)>;

#[derive(Clone)]
pub struct Catalog {
    identity: Channel,
    /// This sidecar's SPIFFE id, sent as `x-cirrus-peer` (see `Authn::spawn_watch`).
    self_id: String,
    cache: Arc<Mutex<Cached>>,
    next: Arc<AtomicUsize>,
}

/// `https://host:port/...` or `host:port` → `host:port`.
fn authority(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let a = rest.split('/').next()?;
    (!a.is_empty()).then(|| a.to_string())
}

impl Catalog {
    pub fn new(identity: Channel, self_id: String) -> Self {
        Self {
            identity,
            self_id,
            cache: Arc::default(),
            next: Arc::default(),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Vec<String>>, String> {
        let mut client = pb::catalog_client::CatalogClient::new(self.identity.clone());
        let mut req = tonic::Request::new(pb::GetCatalogRequest {});
        req.set_timeout(Duration::from_secs(5));
        if let Ok(v) = self.self_id.parse() {
            req.metadata_mut().insert(runtime::caller::PEER, v);
        }
        let cat = client
            .get_catalog(req)
            .await
            .map_err(|s| format!("cannot read the catalog from identity: {}", s.message()))?
            .into_inner()
            .catalog;
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for svc in cat {
            let eps: Vec<String> = svc
                .endpoints
                .iter()
                .filter(|e| e.interface == pb::Interface::Internal as i32)
                .filter_map(|e| authority(&e.url))
                .collect();
            out.entry(svc.name).or_default().extend(eps);
        }
        Ok(out)
    }

    /// One internal endpoint (`host:port`) of `service`.
    pub async fn pick(&self, service: &str) -> Result<String, String> {
        let mut cache = self.cache.lock().await;
        let stale = cache
            .as_ref()
            .is_none_or(|(at, map)| at.elapsed() > FRESH || !map.contains_key(service));
        if stale {
            match self.fetch().await {
                Ok(map) => *cache = Some((Instant::now(), map)),
                // Keep serving from the old catalog while identity is away.
                Err(e) if cache.is_none() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "using the cached catalog"),
            }
        }
        let eps = cache
            .as_ref()
            .and_then(|(_, m)| m.get(service))
            .filter(|e| !e.is_empty())
            .ok_or_else(|| {
                format!("no internal endpoint for service {service:?} in the catalog")
            })?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % eps.len();
        Ok(eps[i].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_extracted() {
        assert_eq!(
            authority("https://127.0.0.1:7051").as_deref(),
            Some("127.0.0.1:7051")
        );
        assert_eq!(authority("https://h:1/x/y").as_deref(), Some("h:1"));
        assert_eq!(authority("h:2").as_deref(), Some("h:2"));
        assert_eq!(authority("https://"), None);
    }
}
