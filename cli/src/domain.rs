//! `cirrus domain list|show|create|set|delete`.

use clap::Subcommand;
use proto::identity::v1 as pb;

use crate::common::{Toggle, delete};
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum DomainCmd {
    List,
    Show {
        domain: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Set {
        domain: String,
        #[command(flatten)]
        toggle: Toggle,
    },
    Delete {
        domain: String,
    },
}

record!(pb::Domain, |d| {
    "ID": d.id, "Name": d.name, "Enabled": d.enabled, "Description": d.description,
});

pub async fn run(cmd: DomainCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    match cmd {
        DomainCmd::List => {
            let req = s.req(pb::ListRequest {});
            ctx.out
                .list(&s.resources().list_domains(req).await?.into_inner().domains)
        }
        DomainCmd::Show { domain } => ctx.out.one(&s.domain(&domain).await?),
        DomainCmd::Create { name, description } => {
            let req = s.req(pb::CreateDomainRequest {
                name,
                description,
                enabled: None,
            });
            ctx.out
                .one(&s.resources().create_domain(req).await?.into_inner())
        }
        DomainCmd::Set { domain, toggle } => {
            let req = s.req(pb::UpdateDomainRequest {
                id: s.domain(&domain).await?.id,
                enabled: toggle.value(),
                ..Default::default()
            });
            ctx.out
                .one(&s.resources().update_domain(req).await?.into_inner())
        }
        DomainCmd::Delete { domain } => {
            s.resources()
                .delete_domain(s.req(delete(&domain, "")))
                .await?;
            ctx.out.done(&format!("deleted domain {domain}"));
            Ok(())
        }
    }
}
