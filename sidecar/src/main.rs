//! `sidecar`: run the mesh proxy beside a service, or check it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sidecar::Config;

#[derive(Parser)]
#[command(name = "sidecar", version, about = "Cirrus mesh sidecar")]
struct Cli {
    /// TOML config file; CIRRUS_* environment variables override it.
    #[arg(long, short, global = true, env = "CIRRUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Proxy (the default).
    Serve,
    /// Exit 0 if the internal listener accepts connections.
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config: Config = match runtime::config::load(cli.config.as_deref())
        .and_then(|c: Config| c.validate().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let _telemetry = runtime::telemetry::init("sidecar", config.metrics_listen)?;
                let listeners = sidecar::Listeners::bind(&config).await?;
                sidecar::run(config, listeners, runtime::serve::shutdown_signal()).await
            }
            Command::Healthcheck => {
                let addr = config.internal_listen;
                tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .map_err(|_| anyhow::anyhow!("no answer from {addr} within 3 s"))?
                .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
