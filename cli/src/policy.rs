//! `cirrus policy check`: may this caller call that method, and why — the
//! same decision the sidecar makes, from the same policy file.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use sidecar::policy::{EXTERNAL, Policy, Subject};
use token::{Claims, Scope};

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// May this caller call that method, and why (exit 1 when denied).
    Check(CheckArgs),
}

/// Runs a policy command; `false` when the answer is a denial.
pub fn run(cmd: PolicyCmd) -> anyhow::Result<bool> {
    match cmd {
        PolicyCmd::Check(a) => check(a),
    }
}

#[derive(Args)]
pub struct CheckArgs {
    /// `package.Service/Method`, e.g. identity.v1.Users/CreateUser.
    #[arg(long)]
    method: String,
    /// The service whose policy decides (default: the method's package).
    #[arg(long)]
    service: Option<String>,
    /// A policy file (default: the state directory's copy, else the shipped default).
    #[arg(long)]
    policy: Option<PathBuf>,
    #[arg(long, default_value = ".state", env = "CIRRUS_STATE_DIR")]
    state_dir: PathBuf,
    /// The caller's roles (comma-separated), as in its token.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// The token's scope: project, domain, system, or none (unscoped).
    #[arg(long, default_value = "project")]
    scope: String,
    /// The token is scoped to the cloud's admin project.
    #[arg(long)]
    admin_project: bool,
    /// The caller sends no token.
    #[arg(long)]
    no_token: bool,
    /// The caller's SPIFFE id, or `external` for the public listener.
    #[arg(long, default_value = EXTERNAL)]
    peer: String,
}

fn check(a: CheckArgs) -> anyhow::Result<bool> {
    let service = match a.service {
        Some(s) => s,
        None => a.method.split('.').next().unwrap_or_default().to_string(),
    };
    let policy = match a.policy {
        Some(p) => Policy::load(&p)?,
        None => {
            let copy = a.state_dir.join(format!("policy/{service}.toml"));
            if copy.is_file() {
                Policy::load(&copy)?
            } else {
                let (_, text) = sidecar::policy::DEFAULTS
                    .iter()
                    .find(|(s, _)| *s == service)
                    .with_context(|| format!("no policy for service {service:?}; give --policy"))?;
                Policy::parse(text).map_err(anyhow::Error::msg)?
            }
        }
    };
    let scope = match a.scope.as_str() {
        "project" => Some(Scope::Project {
            id: "project".into(),
            name: "project".into(),
            domain_id: "domain".into(),
        }),
        "domain" => Some(Scope::Domain {
            id: "domain".into(),
            name: "domain".into(),
        }),
        "system" => Some(Scope::System),
        "none" => None,
        other => bail!("--scope must be project, domain, system or none, not {other:?}"),
    };
    let now = time::OffsetDateTime::now_utc();
    let claims = Claims {
        sub: "user".into(),
        user_name: "user".into(),
        user_domain_id: "domain".into(),
        scope,
        roles: a.roles,
        iat: now,
        exp: now,
        audit_ids: vec!["audit".into()],
        methods: vec!["password".into()],
        is_admin_project: a.admin_project,
    };
    let public = a.peer == EXTERNAL;
    let subject = Subject {
        claims: (!a.no_token).then_some(&claims),
        peer: &a.peer,
        public,
    };
    let listener = if public { "public" } else { "internal (mTLS)" };
    match policy.check(&a.method, &subject) {
        Ok((i, rule)) => {
            println!(
                "ALLOW: {} on the {listener} listener, by rule #{} ({})",
                a.method,
                i + 1,
                rule.methods.join(", ")
            );
            Ok(true)
        }
        Err(d) => {
            let code = if d.is_unauthenticated() {
                "UNAUTHENTICATED"
            } else {
                "PERMISSION_DENIED"
            };
            println!("DENY ({code}): {}", d.message(&a.method));
            Ok(false)
        }
    }
}
