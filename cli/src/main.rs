//! `cirrus`: the Cirrus command line. `cirrus up` runs the cloud on this
//! machine (see [`up`]); the other commands talk to it in OpenStack client's
//! noun-verb shape (see [`commands`]), with credentials from a profile file
//! or `CIRRUS_*` environment variables (see [`profile`]).

mod commands;
mod output;
mod policy;
mod profile;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::*;
use crate::output::Format;

#[derive(Parser)]
#[command(
    name = "cirrus",
    version,
    about = "Cirrus: a small, real IaaS cloud",
    propagate_version = true
)]
struct Cli {
    /// Profile file with url and credentials (default ~/.config/cirrus/profile.toml).
    #[arg(long, global = true, env = "CIRRUS_PROFILE")]
    profile: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'f', global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cloud on this machine (Postgres, migrations, bootstrap, every service).
    Up(up::UpArgs),
    /// Stop a cloud started with `cirrus up`.
    Down {
        #[arg(long, default_value = ".state", env = "CIRRUS_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Check the credentials and cache a token for the next commands.
    Login,
    #[command(subcommand)]
    Token(TokenCmd),
    #[command(subcommand)]
    Key(KeyCmd),
    #[command(subcommand)]
    User(UserCmd),
    #[command(subcommand)]
    Project(ProjectCmd),
    #[command(subcommand)]
    Domain(DomainCmd),
    #[command(subcommand)]
    Role(RoleCmd),
    #[command(subcommand)]
    Service(ServiceCmd),
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Show the service catalog.
    Catalog,
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// May this caller call that method, and why (exit 1 when denied).
    Check(policy::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cirrus: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cirrus: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// One readable line: a gRPC status as `CODE: message`, anything else with its causes.
fn one_line(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        let code = format!("{:?}", s.code());
        return format!("{}: {}", screaming(&code), s.message());
    }
    format!("{e:#}").replace('\n', " ")
}

/// `PermissionDenied` → `PERMISSION_DENIED`, as gRPC names its codes.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let f = cli.format;
    let path = cli.profile.clone().or_else(profile::default_path);
    let path = path.as_deref();
    let profile = || profile::Profile::load(path);
    match cli.command {
        Cmd::Up(args) => up::up(args).await,
        Cmd::Down { state_dir } => up::down(&state_dir).await,
        Cmd::Login => {
            let p = profile()?;
            let issued = login(&p, path).await?;
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
        Cmd::Token(c) => token(c, &profile()?, path, f).await,
        Cmd::Key(c) => key(c, &profile()?, path, f).await,
        Cmd::User(c) => user(c, &profile()?, path, f).await,
        Cmd::Project(c) => project(c, &profile()?, path, f).await,
        Cmd::Domain(c) => domain(c, &profile()?, path, f).await,
        Cmd::Role(c) => role(c, &profile()?, path, f).await,
        Cmd::Service(c) => service(c, &profile()?, path, f).await,
        Cmd::Endpoint(c) => endpoint(c, &profile()?, path, f).await,
        Cmd::Catalog => catalog(&profile()?, path, f).await,
        Cmd::Policy(PolicyCmd::Check(a)) => {
            if policy::check(a)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_print_as_grpc_names() {
        assert_eq!(screaming("PermissionDenied"), "PERMISSION_DENIED");
        assert_eq!(screaming("Unauthenticated"), "UNAUTHENTICATED");
    }
}
