//! `cirrus project list|show|create|set|delete`.

use clap::Subcommand;
use proto::identity::v1 as pb;

use crate::common::{Toggle, delete};
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum ProjectCmd {
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Show {
        project: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        disable: bool,
    },
    Set {
        project: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[command(flatten)]
        toggle: Toggle,
    },
    Delete {
        project: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
}

record!(pb::Project, |p| {
    "ID": p.id, "Name": p.name, "Domain ID": p.domain_id,
    "Enabled": p.enabled, "Description": p.description,
});

pub async fn run(cmd: ProjectCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    match cmd {
        ProjectCmd::List { domain } => {
            let req = s.req(pb::ListProjectsRequest {
                domain_id: s.domain_id(domain.as_deref()).await?,
                ..Default::default()
            });
            let list = s.resources().list_projects(req).await?.into_inner();
            ctx.out.list(&list.projects)
        }
        ProjectCmd::Show { project, domain } => ctx.out.one(&s.project(&project, &domain).await?),
        ProjectCmd::Create {
            name,
            domain,
            description,
            disable,
        } => {
            let req = s.req(pb::CreateProjectRequest {
                name,
                domain_name: domain,
                description,
                enabled: Some(!disable),
                ..Default::default()
            });
            ctx.out
                .one(&s.resources().create_project(req).await?.into_inner())
        }
        ProjectCmd::Set {
            project,
            domain,
            toggle,
        } => {
            let req = s.req(pb::UpdateProjectRequest {
                id: s.project(&project, &domain).await?.id,
                enabled: toggle.value(),
                ..Default::default()
            });
            ctx.out
                .one(&s.resources().update_project(req).await?.into_inner())
        }
        ProjectCmd::Delete { project, domain } => {
            let req = s.req(delete(&project, &domain));
            s.resources().delete_project(req).await?;
            ctx.out.done(&format!("deleted project {project}"));
            Ok(())
        }
    }
}
