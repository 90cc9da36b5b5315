//! The service catalog: `cirrus service ...`, `cirrus endpoint ...` and
//! `cirrus catalog` (what a client resolves service names through).

use anyhow::{Context as _, bail};
use clap::Subcommand;
use proto::identity::v1 as pb;

use crate::common::{delete, is_id};
use crate::output::{View, record};
use crate::session::{Ctx, Session};

#[derive(Subcommand)]
pub enum ServiceCmd {
    List,
    Show {
        service: String,
    },
    Create {
        name: String,
        #[arg(long = "type")]
        kind: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Delete {
        service: String,
    },
}

#[derive(Subcommand)]
pub enum EndpointCmd {
    List {
        #[arg(long)]
        service: Option<String>,
    },
    Show {
        endpoint: String,
    },
    Create {
        service: String,
        /// public, internal or admin.
        interface: String,
        url: String,
        #[arg(long, default_value = "RegionOne")]
        region: String,
    },
    Delete {
        endpoint: String,
    },
}

pub fn interface(s: &str) -> anyhow::Result<pb::Interface> {
    Ok(match s {
        "public" => pb::Interface::Public,
        "internal" => pb::Interface::Internal,
        "admin" => pb::Interface::Admin,
        other => bail!("interface must be public, internal or admin, not {other:?}"),
    })
}

fn interface_name(i: i32) -> String {
    match pb::Interface::try_from(i) {
        Ok(pb::Interface::Public) => "public",
        Ok(pb::Interface::Internal) => "internal",
        Ok(pb::Interface::Admin) => "admin",
        _ => "?",
    }
    .into()
}

record!(pb::Service, |s| {
    "ID": s.id, "Name": s.name, "Type": s.r#type,
    "Enabled": s.enabled, "Description": s.description,
});

record!(pb::Endpoint, |e| {
    "ID": e.id, "Service ID": e.service_id, "Interface": interface_name(e.interface),
    "Region": e.region, "URL": e.url, "Enabled": e.enabled,
});

/// One endpoint of the catalog, beside its service's name and type.
struct Entry<'a>(&'a pb::CatalogService, &'a pb::Endpoint);

record!(Entry<'_>, |x| {
    "Name": x.0.name, "Type": x.0.r#type, "Interface": interface_name(x.1.interface),
    "Region": x.1.region, "URL": x.1.url,
});

impl Session {
    pub async fn services(&self) -> anyhow::Result<Vec<pb::Service>> {
        let req = self.req(pb::ListRequest {});
        Ok(self
            .catalog()
            .list_services(req)
            .await?
            .into_inner()
            .services)
    }

    /// A service by id or name.
    async fn service(&self, service: &str) -> anyhow::Result<pb::Service> {
        self.services()
            .await?
            .into_iter()
            .find(|s| s.id == service || s.name == service)
            .with_context(|| format!("NOT_FOUND: service {service:?} not found"))
    }

    pub async fn endpoints(&self, service_id: String) -> anyhow::Result<Vec<pb::Endpoint>> {
        let req = self.req(pb::ListEndpointsRequest {
            service_id,
            interface: 0,
        });
        Ok(self
            .catalog()
            .list_endpoints(req)
            .await?
            .into_inner()
            .endpoints)
    }
}

pub async fn service(cmd: ServiceCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    match cmd {
        ServiceCmd::List => ctx.out.list(&s.services().await?),
        ServiceCmd::Show { service } => ctx.out.one(&s.service(&service).await?),
        ServiceCmd::Create {
            name,
            kind,
            description,
        } => {
            let req = s.req(pb::CreateServiceRequest {
                name,
                r#type: kind,
                description,
                enabled: None,
            });
            ctx.out
                .one(&s.catalog().create_service(req).await?.into_inner())
        }
        ServiceCmd::Delete { service } => {
            s.catalog()
                .delete_service(s.req(delete(&service, "")))
                .await?;
            ctx.out.done(&format!("deleted service {service}"));
            Ok(())
        }
    }
}

pub async fn endpoint(cmd: EndpointCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    match cmd {
        EndpointCmd::List { service } => {
            let service_id = match service {
                Some(x) if is_id(&x) => x,
                Some(x) => s.service(&x).await?.id,
                None => String::new(),
            };
            ctx.out.list(&s.endpoints(service_id).await?)
        }
        EndpointCmd::Show { endpoint } => {
            let list = s.endpoints(String::new()).await?;
            let e = list
                .iter()
                .find(|e| e.id == endpoint)
                .with_context(|| format!("NOT_FOUND: endpoint {endpoint:?} not found"))?;
            ctx.out.one(e)
        }
        EndpointCmd::Create {
            service,
            interface: i,
            url,
            region,
        } => {
            let req = s.req(pb::CreateEndpointRequest {
                service,
                interface: interface(&i)? as i32,
                region,
                url,
                enabled: None,
            });
            ctx.out
                .one(&s.catalog().create_endpoint(req).await?.into_inner())
        }
        EndpointCmd::Delete { endpoint } => {
            let req = s.req(pb::DeleteRequest {
                id: endpoint.clone(),
                ..Default::default()
            });
            s.catalog().delete_endpoint(req).await?;
            ctx.out.done(&format!("deleted endpoint {endpoint}"));
            Ok(())
        }
    }
}

pub async fn catalog(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    let req = s.req(pb::GetCatalogRequest {});
    let cat = s.catalog().get_catalog(req).await?.into_inner().catalog;
    let entries: Vec<Entry> = cat
        .iter()
        .flat_map(|svc| svc.endpoints.iter().map(move |e| Entry(svc, e)))
        .collect();
    ctx.out.print(View::list(&entries))
}
