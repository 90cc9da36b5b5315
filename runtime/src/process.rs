//! The start of every service binary's `main`: load and validate the config
//! (status 2 and one line when it is bad), start the Tokio runtime, run the
//! command, and turn its outcome into an exit status with one readable line.

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigError, load};

pub fn main<C, F, Fut, E>(
    name: &str,
    config_file: Option<&Path>,
    validate: fn(&C) -> Result<(), ConfigError>,
    body: F,
) -> ExitCode
where
    C: Default + Serialize + DeserializeOwned,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let config: C = match load(config_file).and_then(|c: C| validate(&c).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(body(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `#` shows an error's causes too (anyhow), on one line.
            eprintln!("{name}: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// What the shared [`service_main`] needs to know of a service: its config
/// type carries the `[server]` table and knows how to run the service.
/// Implemented once per service in its `lib.rs`; its `main.rs` is then one
/// line: `runtime::process::service_main::<Config>()`.
pub trait Service: Default + Serialize + DeserializeOwned + Send + 'static {
    /// The binary's name, in log lines and errors.
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;

    /// The `[server]` table: what to bind, where metrics go, what
    /// `healthcheck` asks by default.
    fn server(&self) -> &crate::config::ServerConfig;

    /// Checks what serde cannot, before anything binds or connects.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Runs the service on the bound listener until `shutdown` resolves.
    fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Subcommands this binary has besides `serve` and `healthcheck`
    /// (identity's `bootstrap`); none by default.
    fn commands() -> Vec<clap::Command> {
        Vec::new()
    }

    /// Runs the subcommand `name` of [`Service::commands`] with its arguments,
    /// after the config is loaded and validated (no listener, no telemetry).
    fn command(
        self,
        name: &str,
        args: &clap::ArgMatches,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = args;
        let name = name.to_string();
        async move { Err(anyhow::anyhow!("{}: unknown command {name}", Self::NAME)) }
    }

    /// The `healthcheck` subcommand's check of `addr`: by default
    /// `grpc.health.v1.Health` over plaintext (a service behind its sidecar);
    /// a binary whose listener speaks something else (the sidecar: mTLS) says how.
    fn healthcheck(
        &self,
        addr: std::net::SocketAddr,
    ) -> impl Future<Output = Result<(), String>> + Send {
        crate::serve::healthcheck(addr)
    }
}

#[derive(clap::Parser)]
struct Args {
    /// TOML config file; CIRRUS_* environment variables override it.
    #[arg(long, short, global = true, env = "CIRRUS_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Exit 0 if the service at ADDR (default: the configured `server.listen`) is serving.
    Healthcheck { addr: Option<std::net::SocketAddr> },
}

/// The whole `main` of a service binary: parse the command line, load and
/// validate the config (status 2 and one line when it is bad), then either
/// bind `server.listen`, start telemetry and run until SIGINT/SIGTERM, or
/// answer `healthcheck`.
pub fn service_main<S: Service>() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let extra = S::commands();
    let names: Vec<String> = extra.iter().map(|c| c.get_name().to_string()).collect();
    let matches = Args::command()
        .name(S::NAME)
        .about(S::ABOUT)
        .version(env!("CARGO_PKG_VERSION"))
        .subcommands(extra)
        .get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if let Some((name, sub)) = matches.subcommand()
        && names.iter().any(|n| n == name)
    {
        let (name, sub) = (name.to_string(), sub.clone());
        return main(
            S::NAME,
            args.config.as_deref(),
            S::validate,
            |config: S| async move { config.command(&name, &sub).await },
        );
    }
    let command = args.command.unwrap_or(Command::Serve);
    main(
        S::NAME,
        args.config.as_deref(),
        S::validate,
        |config: S| async move {
            match command {
                Command::Serve => {
                    let server = config.server().clone();
                    let _telemetry = crate::telemetry::init(S::NAME, server.metrics_listen)?;
                    let listener = tokio::net::TcpListener::bind(server.listen)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", server.listen))?;
                    config
                        .run(listener, Box::pin(crate::serve::shutdown_signal()))
                        .await
                }
                Command::Healthcheck { addr } => config
                    .healthcheck(addr.unwrap_or(config.server().listen))
                    .await
                    .map_err(anyhow::Error::msg),
            }
        },
    )
}
