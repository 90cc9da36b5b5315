//! `identity`: serve the identity service, bootstrap it, or check its health.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use identity::model::Interface;
use identity::{Bootstrap, Config, Identity};

#[derive(Parser)]
#[command(
    name = "identity",
    version,
    about = "Cirrus identity service (Keystone)"
)]
struct Cli {
    /// TOML config file; CIRRUS_* environment variables override it.
    #[arg(long, short, global = true, env = "CIRRUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (the default).
    Serve,
    /// Create (idempotently) the default domain, roles, admin project and user, and the catalog entries.
    Bootstrap {
        #[arg(long, default_value = "admin")]
        admin_user: String,
        #[arg(long, env = "CIRRUS_ADMIN_PASSWORD")]
        admin_password: String,
        #[arg(long, default_value = "admin")]
        admin_project: String,
        #[arg(long, default_value = "RegionOne")]
        region: String,
        /// The public endpoint URL; defaults to http://<listen>.
        #[arg(long)]
        public_url: Option<String>,
        /// The internal endpoint URL; defaults to the public one.
        #[arg(long)]
        internal_url: Option<String>,
    },
    /// Exit 0 if the service at ADDR (default: the configured listen address) is serving.
    Healthcheck { addr: Option<SocketAddr> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    runtime::process::main(
        "identity",
        cli.config.as_deref(),
        Config::validate,
        |config| async_main(command, config),
    )
}

async fn async_main(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let _telemetry = runtime::telemetry::init("identity", config.metrics_listen)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
            identity::run(config, listener, runtime::serve::shutdown_signal()).await
        }
        Command::Bootstrap {
            admin_user,
            admin_password,
            admin_project,
            region,
            public_url,
            internal_url,
        } => {
            let public = public_url.unwrap_or_else(|| format!("http://{}", config.listen));
            let internal = internal_url.unwrap_or_else(|| public.clone());
            let id = Identity::start(config).await?;
            id.bootstrap(&Bootstrap {
                admin_user,
                admin_password,
                admin_project,
                region,
                endpoints: vec![(Interface::Public, public), (Interface::Internal, internal)],
            })
            .await?;
            println!("bootstrap complete");
            Ok(())
        }
        Command::Healthcheck { addr } => runtime::serve::healthcheck(addr.unwrap_or(config.listen))
            .await
            .map_err(anyhow::Error::msg),
    }
}
