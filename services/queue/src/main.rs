//! `queue`: serve the queue service, or check its health.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use queue::Config;

#[derive(Parser)]
#[command(name = "queue", version, about = "Cirrus queue service (RabbitMQ)")]
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
    /// Exit 0 if the service at ADDR (default: the configured listen address) is serving.
    Healthcheck { addr: Option<SocketAddr> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    runtime::process::main("queue", cli.config.as_deref(), Config::validate, |config| {
        async_main(command, config)
    })
}

async fn async_main(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let _telemetry = runtime::telemetry::init("queue", config.metrics_listen)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
            // One plain line on stdout, for scripts and tests that bind port 0.
            println!("queue listening on {}", listener.local_addr()?);
            queue::run(config, listener, runtime::serve::shutdown_signal()).await
        }
        Command::Healthcheck { addr } => runtime::serve::healthcheck(addr.unwrap_or(config.listen))
            .await
            .map_err(anyhow::Error::msg),
    }
}
