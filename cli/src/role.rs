//! `cirrus role list|show|create|delete|add|remove|assignments`.

use anyhow::bail;
use clap::{Args, Subcommand};
use proto::identity::v1 as pb;

use crate::common::{delete, get};
use crate::output::record;
use crate::session::{Ctx, Session};

#[derive(Args)]
pub struct AssignmentArgs {
    /// Role name or id.
    role: String,
    #[arg(long)]
    user: String,
    #[arg(long, default_value = "Default")]
    user_domain: String,
    #[arg(long, conflicts_with_all = ["domain", "system"])]
    project: Option<String>,
    #[arg(long, default_value = "Default")]
    project_domain: String,
    #[arg(long, conflicts_with = "system")]
    domain: Option<String>,
    #[arg(long)]
    system: bool,
}

#[derive(Subcommand)]
pub enum RoleCmd {
    List,
    Show {
        role: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Delete {
        role: String,
    },
    /// Give a user a role on a project, a domain or the system.
    Add(AssignmentArgs),
    /// Take a role away.
    Remove(AssignmentArgs),
    /// List role assignments.
    Assignments {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
}

record!(pb::Role, |r| { "ID": r.id, "Name": r.name, "Description": r.description });

record!(pb::RoleAssignment, |a| {
    "Role": a.role, "User ID": a.user_id, "Project ID": a.project_id,
    "Domain ID": a.domain_id, "System": a.system,
});

/// The assignment the arguments name, with names resolved to ids.
async fn assignment(s: &Session, a: AssignmentArgs) -> anyhow::Result<pb::RoleAssignment> {
    let mut out = pb::RoleAssignment {
        role: a.role,
        user_id: s.user(&a.user, &a.user_domain).await?.id,
        ..Default::default()
    };
    if let Some(p) = a.project {
        out.project_id = s.project(&p, &a.project_domain).await?.id;
    } else if let Some(d) = a.domain {
        out.domain_id = s.domain(&d).await?.id;
    } else if a.system {
        out.system = true;
    } else {
        bail!("give --project, --domain or --system");
    }
    Ok(out)
}

pub async fn run(cmd: RoleCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    match cmd {
        RoleCmd::List => {
            let req = s.req(pb::ListRequest {});
            ctx.out
                .list(&s.roles().list_roles(req).await?.into_inner().roles)
        }
        RoleCmd::Show { role } => ctx.out.one(
            &s.roles()
                .get_role(s.req(get(&role, "")))
                .await?
                .into_inner(),
        ),
        RoleCmd::Create { name, description } => {
            let req = s.req(pb::CreateRoleRequest { name, description });
            ctx.out.one(&s.roles().create_role(req).await?.into_inner())
        }
        RoleCmd::Delete { role } => {
            s.roles().delete_role(s.req(delete(&role, ""))).await?;
            ctx.out.done(&format!("deleted role {role}"));
            Ok(())
        }
        RoleCmd::Add(a) => {
            let a = assignment(&s, a).await?;
            s.roles().assign_role(s.req(a)).await?;
            ctx.out.done("role added");
            Ok(())
        }
        RoleCmd::Remove(a) => {
            let a = assignment(&s, a).await?;
            s.roles().unassign_role(s.req(a)).await?;
            ctx.out.done("role removed");
            Ok(())
        }
        RoleCmd::Assignments { user, project } => {
            let req = s.req(pb::ListRoleAssignmentsRequest {
                user_id: s.user_id(user.as_deref(), "Default").await?,
                project_id: s.project_id(project.as_deref(), "Default").await?,
                ..Default::default()
            });
            let list = s.roles().list_role_assignments(req).await?.into_inner();
            ctx.out.list(&list.assignments)
        }
    }
}
