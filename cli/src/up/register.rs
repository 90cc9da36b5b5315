//! Lists each service's sidecar endpoints in identity's catalog, once: the
//! sidecars resolve service names through it, the CLI finds public
//! endpoints in it.

use proto::identity::v1 as pb;

use super::services::{Listing, Ports, local};
use crate::session::{Profile, Session, login};

/// Registers `svc`'s endpoints as `listing` says, replacing stale ones (and
/// removing a public endpoint an internal-only service no longer has).
pub async fn register(
    admin: &Profile,
    identity: Ports,
    svc: &str,
    listing: Listing,
    p: Ports,
) -> anyhow::Result<()> {
    let (kind, public) = match listing {
        Listing::None => return Ok(()),
        Listing::Public(t) => (t, true),
        Listing::Internal(t) => (t, false),
    };
    // Through identity's public endpoint as the admin: identity itself
    // serves only its Unix socket, which only its sidecar can open.
    let _ = identity;
    let direct = admin.clone();
    let token = login(&direct, None).await?.token;
    let s = Session::new(crate::session::channel(&direct).await?, token);
    let service_id = match s.services().await?.into_iter().find(|x| x.name == svc) {
        Some(x) => x.id,
        None => {
            let req = s.req(pb::CreateServiceRequest {
                name: svc.into(),
                r#type: kind.into(),
                description: format!("Cirrus {svc} service"),
                enabled: None,
            });
            s.catalog().create_service(req).await?.into_inner().id
        }
    };
    let existing = s.endpoints(service_id.clone()).await?;
    let mut wanted = vec![(pb::Interface::Internal, Some(p.internal))];
    wanted.push((pb::Interface::Public, public.then_some(p.public)));
    for (interface, port) in wanted {
        let url = port.map(|port| format!("https://{}", local(port)));
        match existing.iter().find(|e| e.interface == interface as i32) {
            Some(e) if Some(&e.url) == url.as_ref() => continue,
            Some(e) => {
                let req = s.req(pb::DeleteRequest {
                    id: e.id.clone(),
                    ..Default::default()
                });
                s.catalog().delete_endpoint(req).await?;
            }
            None => {}
        }
        let Some(url) = url else { continue };
        let req = s.req(pb::CreateEndpointRequest {
            service: service_id.clone(),
            interface: interface as i32,
            region: "RegionOne".into(),
            url,
            enabled: None,
        });
        s.catalog().create_endpoint(req).await?;
    }
    Ok(())
}
