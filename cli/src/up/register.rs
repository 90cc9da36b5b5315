//! Lists each service's sidecar endpoints in identity's catalog, once: the
//! sidecars resolve service names through it.

use proto::identity::v1 as pb;

use super::services::{Ports, local};
use crate::session::{Profile, Session, login};

/// Registers `svc`'s public and internal endpoints, replacing stale ones.
pub async fn register(admin: &Profile, identity: Ports, svc: &str, p: Ports) -> anyhow::Result<()> {
    // Straight to identity on loopback: the launcher is the operator.
    let mut direct = admin.clone();
    direct.url = format!("http://{}", local(identity.service));
    let token = login(&direct, None).await?.token;
    let s = Session::new(crate::session::channel(&direct).await?, token);
    let service_id = match s.services().await?.into_iter().find(|x| x.name == svc) {
        Some(x) => x.id,
        None => {
            let req = s.req(pb::CreateServiceRequest {
                name: svc.into(),
                r#type: svc.into(),
                description: format!("Cirrus {svc} service"),
                enabled: None,
            });
            s.catalog().create_service(req).await?.into_inner().id
        }
    };
    let existing = s.endpoints(service_id.clone()).await?;
    for (interface, port) in [
        (pb::Interface::Public, p.public),
        (pb::Interface::Internal, p.internal),
    ] {
        let url = format!("https://{}", local(port));
        match existing.iter().find(|e| e.interface == interface as i32) {
            Some(e) if e.url == url => continue,
            Some(e) => {
                let req = s.req(pb::DeleteRequest {
                    id: e.id.clone(),
                    ..Default::default()
                });
                s.catalog().delete_endpoint(req).await?;
            }
            None => {}
        }
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
