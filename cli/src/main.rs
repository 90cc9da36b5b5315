//! `cirrus`: the Cirrus command line, shaped as omicron's `omdb`. This file
//! parses and dispatches; [`session`] holds the profile, the channel and the
//! token cache; [`output`] is the one printer (`-f table|value|json|shell|yaml`,
//! `-c COLUMN`) every noun uses; each noun group is its own module
//! (`token`, `key`, `user`, `project`, `domain`, `role`, `catalog` for
//! services, endpoints and the catalog, `policy`); [`up`] is the dev
//! launcher (`cirrus up`, `down`, `status`) with its table of services.
//! A new noun (server, network, volume) is a new module and one line in
//! [`Cmd`].

mod api;
mod catalog;
mod common;
mod domain;
mod flavor;
mod host;
mod key;
mod keypair;
mod network;
mod output;
mod policy;
mod port;
mod project;
mod role;
mod security_group;
mod server;
mod server_group;
mod session;
mod snapshot;
mod subnet;
mod token;
mod up;
mod user;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::Printer;
use crate::session::Ctx;

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
    #[command(flatten)]
    out: Printer,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cloud on this machine (Postgres, migrations, bootstrap, every service).
    Up(up::UpArgs),
    /// Stop a cloud started with `cirrus up`.
    Down(up::StateArgs),
    /// Every process of a cloud started with `cirrus up`: state, restarts, log.
    Status(up::StateArgs),
    /// Check the credentials and cache a token for the next commands.
    Login,
    #[command(subcommand)]
    Token(token::TokenCmd),
    #[command(subcommand)]
    Key(key::KeyCmd),
    #[command(subcommand)]
    User(user::UserCmd),
    #[command(subcommand)]
    Project(project::ProjectCmd),
    #[command(subcommand)]
    Domain(domain::DomainCmd),
    #[command(subcommand)]
    Role(role::RoleCmd),
    #[command(subcommand)]
    Service(catalog::ServiceCmd),
    #[command(subcommand)]
    Endpoint(catalog::EndpointCmd),
    /// Show the service catalog.
    Catalog,
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    // The wave-2 services' nouns (network, volume, compute).
    #[command(subcommand)]
    Network(network::NetworkCmd),
    #[command(subcommand)]
    Subnet(subnet::SubnetCmd),
    #[command(subcommand)]
    Port(port::PortCmd),
    #[command(subcommand)]
    SecurityGroup(security_group::SecurityGroupCmd),
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    #[command(subcommand)]
    Server(server::ServerCmd),
    #[command(subcommand)]
    Flavor(flavor::FlavorCmd),
    #[command(subcommand)]
    Keypair(keypair::KeypairCmd),
    #[command(subcommand)]
    ServerGroup(server_group::ServerGroupCmd),
    #[command(subcommand)]
    Quota(host::QuotaCmd),
    #[command(subcommand)]
    Host(host::HostCmd),
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
        Ok(code) => code,
        Err(e) => {
            eprintln!("cirrus: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let path = cli.profile.clone().or_else(session::default_path);
    let ctx = Ctx {
        profile_path: path.as_deref(),
        out: &cli.out,
    };
    match cli.command {
        Cmd::Up(args) => up::up(args).await?,
        Cmd::Down(args) => up::down(&args.state_dir).await?,
        Cmd::Status(args) => up::status(&args.state_dir, &ctx)?,
        Cmd::Login => token::login_cmd(&ctx).await?,
        Cmd::Token(c) => token::run(c, &ctx).await?,
        Cmd::Key(c) => key::run(c, &ctx).await?,
        Cmd::User(c) => user::run(c, &ctx).await?,
        Cmd::Project(c) => project::run(c, &ctx).await?,
        Cmd::Domain(c) => domain::run(c, &ctx).await?,
        Cmd::Role(c) => role::run(c, &ctx).await?,
        Cmd::Service(c) => catalog::service(c, &ctx).await?,
        Cmd::Endpoint(c) => catalog::endpoint(c, &ctx).await?,
        Cmd::Catalog => catalog::catalog(&ctx).await?,
        Cmd::Network(c) => network::run(c, &ctx).await?,
        Cmd::Subnet(c) => subnet::run(c, &ctx).await?,
        Cmd::Port(c) => port::run(c, &ctx).await?,
        Cmd::SecurityGroup(c) => security_group::run(c, &ctx).await?,
        Cmd::Volume(c) => volume::run(c, &ctx).await?,
        Cmd::Snapshot(c) => snapshot::run(c, &ctx).await?,
        Cmd::Server(c) => server::run(c, &ctx).await?,
        Cmd::Flavor(c) => flavor::run(c, &ctx).await?,
        Cmd::Keypair(c) => keypair::run(c, &ctx).await?,
        Cmd::ServerGroup(c) => server_group::run(c, &ctx).await?,
        Cmd::Quota(c) => host::quota(c, &ctx).await?,
        Cmd::Host(c) => host::host(c, &ctx).await?,
        // Exit 1 when denied, as `test` does: scripts can branch on it.
        Cmd::Policy(c) => return Ok(ExitCode::from(u8::from(!policy::run(c)?))),
    }
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_print_as_grpc_names() {
        assert_eq!(screaming("PermissionDenied"), "PERMISSION_DENIED");
        assert_eq!(screaming("Unauthenticated"), "UNAUTHENTICATED");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
