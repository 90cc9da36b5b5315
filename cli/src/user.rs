//! `cirrus user list|show|create|set|delete`.

use clap::Subcommand;
use proto::identity::v1 as pb;

use crate::common::{Toggle, delete, ts};
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum UserCmd {
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Show {
        user: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
    Create {
        name: String,
        #[arg(long, env = "CIRRUS_NEW_PASSWORD")]
        password: Option<String>,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[arg(long)]
        disable: bool,
    },
    Set {
        user: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[command(flatten)]
        toggle: Toggle,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        email: Option<String>,
    },
    Delete {
        user: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
}

record!(pb::User, |u| {
    "ID": u.id, "Name": u.name, "Domain ID": u.domain_id,
    "Enabled": u.enabled, "Email": u.email, "Locked Until": ts(u.locked_until),
});

pub async fn run(cmd: UserCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    match cmd {
        UserCmd::List { domain } => {
            let domain_id = s.domain_id(domain.as_deref()).await?;
            let req = s.req(pb::ListUsersRequest { domain_id });
            ctx.out
                .list(&s.users().list_users(req).await?.into_inner().users)
        }
        UserCmd::Show { user, domain } => ctx.out.one(&s.user(&user, &domain).await?),
        UserCmd::Create {
            name,
            password,
            email,
            description,
            domain,
            disable,
        } => {
            let req = s.req(pb::CreateUserRequest {
                name,
                domain_name: domain,
                password: password.unwrap_or_default(),
                email,
                description,
                enabled: Some(!disable),
                ..Default::default()
            });
            ctx.out.one(&s.users().create_user(req).await?.into_inner())
        }
        UserCmd::Set {
            user,
            domain,
            toggle,
            password,
            email,
        } => {
            let req = s.req(pb::UpdateUserRequest {
                id: s.user(&user, &domain).await?.id,
                enabled: toggle.value(),
                password,
                email,
                ..Default::default()
            });
            ctx.out.one(&s.users().update_user(req).await?.into_inner())
        }
        UserCmd::Delete { user, domain } => {
            s.users().delete_user(s.req(delete(&user, &domain))).await?;
            ctx.out.done(&format!("deleted user {user}"));
            Ok(())
        }
    }
}
