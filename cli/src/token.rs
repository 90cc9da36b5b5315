//! `cirrus login` and `cirrus token issue|revoke|validate`.

use anyhow::bail;
use clap::Subcommand;
use proto::identity::v1 as pb;

use crate::common::ts;
use crate::output::View;
use crate::session::{Ctx, login};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a token with the profile's credentials and print it.
    Issue,
    /// Revoke a token, or every token of an audit chain.
    Revoke {
        token: Option<String>,
        #[arg(long, conflicts_with = "token")]
        audit_id: Option<String>,
    },
    /// Show what a token says, if it is valid.
    Validate { token: String },
}

/// `cirrus login`: checks the credentials and caches a token.
pub async fn login_cmd(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let issued = login(&ctx.profile()?, ctx.profile_path).await?;
    let c = issued.claims.unwrap_or_default();
    let scope = if c.project_name.is_empty() {
        "unscoped".to_string()
    } else {
        format!("project {}", c.project_name)
    };
    println!(
        "Logged in as {} ({scope}), roles {}.",
        c.user_name,
        c.roles.join(",")
    );
    Ok(())
}

pub async fn run(cmd: TokenCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Issue => {
            let issued = login(&ctx.profile()?, ctx.profile_path).await?;
            let claims = issued.claims.unwrap_or_default();
            ctx.out.print(claims_view(&claims, Some(issued.token)))
        }
        TokenCmd::Revoke { token, audit_id } => {
            let target = match (token, audit_id) {
                (Some(t), None) => pb::revoke_token_request::Target::Token(t),
                (None, Some(a)) => pb::revoke_token_request::Target::AuditId(a),
                _ => bail!("give a token or --audit-id"),
            };
            let s = ctx.session().await?;
            let req = s.req(pb::RevokeTokenRequest {
                target: Some(target),
            });
            s.tokens().revoke_token(req).await?;
            ctx.out.done("revoked");
            Ok(())
        }
        TokenCmd::Validate { token } => {
            let s = ctx.session().await?;
            let req = s.req(pb::ValidateTokenRequest { token });
            let v = s.tokens().validate_token(req).await?.into_inner();
            ctx.out
                .print(claims_view(&v.claims.unwrap_or_default(), None))
        }
    }
}

fn claims_view(c: &pb::TokenClaims, token: Option<String>) -> View {
    let scope = if !c.project_id.is_empty() {
        format!("project {} ({})", c.project_name, c.project_id)
    } else if !c.domain_id.is_empty() {
        format!("domain {}", c.domain_id)
    } else if c.system {
        "system".into()
    } else {
        "unscoped".into()
    };
    let mut v: Vec<(&str, String)> = token.map(|t| ("token", t)).into_iter().collect();
    v.extend([
        ("user", format!("{} ({})", c.user_name, c.user_id)),
        ("scope", scope),
        ("roles", c.roles.join(",")),
        ("issued_at", ts(c.issued_at)),
        ("expires_at", ts(c.expires_at)),
        ("audit_ids", c.audit_ids.join(",")),
        ("key_id", c.key_id.clone()),
    ]);
    View::fields(v)
}
