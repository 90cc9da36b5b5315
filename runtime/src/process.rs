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
    main_with_threads(name, config_file, validate, |_| None, body)
}

/// [`main`] with the number of runtime worker threads taken from the config
/// (`None`: one per core, Tokio's default).
pub fn main_with_threads<C, F, Fut, E>(
    name: &str,
    config_file: Option<&Path>,
    validate: fn(&C) -> Result<(), ConfigError>,
    threads: fn(&C) -> Option<usize>,
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
    let built = match threads(&config) {
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    };
    let rt = match built {
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

    /// Runs the service on the bound listener until `shutdown` resolves:
    /// the Unix socket of [`Service::socket`] when it has one, else
    /// `server.listen` on TCP.
    fn run(
        self,
        listener: crate::local::Listener,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The Unix socket this service listens on instead of `server.listen`
    /// (its config's `[socket]` table); `None` (the default) keeps loopback
    /// TCP, which [`service_main`] logs as a development set-up.
    fn socket(&self) -> Option<&crate::config::SocketConfig> {
        None
    }

    /// Whether whoever connects to `server.listen` is trusted (a service
    /// believes the `x-cirrus-*` headers its sidecar sets): then loopback TCP
    /// is logged as a development set-up. The sidecar, whose listener
    /// authenticates every peer by mTLS, says no.
    fn trusts_local_callers(&self) -> bool {
        true
    }

    /// How many runtime worker threads to start; `None` (the default): one
    /// per core. A proxy beside every service (the sidecar) may want fewer.
    fn worker_threads(&self) -> Option<usize> {
        None
    }

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
    main_with_threads(
        S::NAME,
        args.config.as_deref(),
        S::validate,
        S::worker_threads,
        |config: S| async move {
            match command {
                Command::Serve => {
                    let server = config.server().clone();
                    if let Some(socket) = config.socket() {
                        socket.validate("socket")?;
                    }
                    let _telemetry = crate::telemetry::init(S::NAME, server.metrics_listen)?;
                    if let Some(socket) = config.socket().cloned() {
                        let listener = bind_unix(&socket).map_err(|e| {
                            anyhow::anyhow!("cannot listen on {}: {e}", socket.path.display())
                        })?;
                        tracing::info!(
                            socket = %socket.path.display(),
                            mode = %format!("{:o}", socket.mode),
                            group = socket.group.as_deref().unwrap_or("(the process's)"),
                            "serving on a Unix socket only: no TCP port"
                        );
                        let result = config
                            .run(listener.into(), Box::pin(crate::serve::shutdown_signal()))
                            .await;
                        let _ = std::fs::remove_file(&socket.path);
                        return result;
                    }
                    if config.trusts_local_callers() {
                        tracing::warn!(
                            listen = %server.listen,
                            "serving on loopback TCP: any local process can call this service \
                             and claim an identity; a development set-up (give the config a \
                             [socket] table for a Unix socket only the sidecar can reach)"
                        );
                    }
                    let listener = tokio::net::TcpListener::bind(server.listen)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", server.listen))?;
                    config
                        .run(listener.into(), Box::pin(crate::serve::shutdown_signal()))
                        .await
                }
                Command::Healthcheck { addr: None } if config.socket().is_some() => {
                    let path = config.socket().map(|s| s.path.clone()).unwrap_or_default();
                    healthcheck_unix(&path).await.map_err(anyhow::Error::msg)
                }
                Command::Healthcheck { addr } => config
                    .healthcheck(addr.unwrap_or(config.server().listen))
                    .await
                    .map_err(anyhow::Error::msg),
            }
        },
    )
}

/// The gid of `group`: a number, or a name looked up in `/etc/group`.
pub fn group_id(group: &str) -> std::io::Result<u32> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (name, _, gid) = (f.next()?, f.next()?, f.next()?);
            (name == group).then(|| gid.parse::<u32>().ok()).flatten()
        })
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no group {group:?} in /etc/group"),
            )
        })
}

/// Binds the Unix socket `c` describes, so that only its owner and group
/// can connect (issue 13): the directory is created 0750 (and given the
/// group) when missing, and refused when it grants other users any access;
/// a stale socket left by a dead process is replaced, a live one is an
/// error; the socket gets `c.mode` and `c.group`. Call inside a Tokio runtime.
pub fn bind_unix(c: &crate::config::SocketConfig) -> std::io::Result<tokio::net::UnixListener> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let gid = c.group.as_deref().map(group_id).transpose()?;
    let dir = match c.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
        if gid.is_some() {
            std::os::unix::fs::chown(&dir, None, gid)?;
        }
    }
    let mode = std::fs::metadata(&dir)?.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "the socket's directory {} admits every local user (mode {:o}): make it 0750 or 0700",
                dir.display(),
                mode & 0o7777
            ),
        ));
    }
    match std::fs::symlink_metadata(&c.path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&c.path).is_ok() {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    format!("{} is served by a running process", c.path.display()),
                ));
            }
            std::fs::remove_file(&c.path)?;
        }
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", c.path.display()),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(&c.path)?;
    std::fs::set_permissions(&c.path, std::fs::Permissions::from_mode(c.mode))?;
    if gid.is_some() {
        std::os::unix::fs::chown(&c.path, None, gid)?;
    }
    Ok(listener)
}

/// [`crate::serve::via_sidecar`] over the sidecar's outbound Unix socket
/// (its `[outbound_socket]`): requests are addressed `http://<service>` and
/// carry the current span's trace context ([`crate::trace`]).
pub fn via_sidecar_unix(socket: &Path, service: &str) -> Result<crate::trace::Channel, String> {
    let origin: tonic::codegen::http::Uri = format!("http://{service}")
        .parse()
        .map_err(|_| format!("invalid service name {service:?}"))?;
    Ok(crate::trace::traced(
        tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
            .map_err(|e| e.to_string())?
            .origin(origin)
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy(),
    ))
}

/// The `healthcheck` subcommand for a service on a Unix socket.
pub async fn healthcheck_unix(socket: &Path) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let shown = socket.display().to_string();
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("unix:{shown}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {shown}: {e}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("health check failed: {}", s.message()))?;
        match reply.into_inner().status() {
            WireStatus::Serving => Ok(()),
            other => Err(format!("service at {shown} is {}", other.as_str_name())),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), check)
        .await
        .map_err(|_| format!("no health answer from {shown} within 3 s"))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::SocketConfig;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn a_socket_gets_its_mode_in_a_private_directory_and_replaces_a_stale_one() {
        let tmp = std::env::temp_dir().join(format!("cirrus-uds-{}", uuid::Uuid::new_v4()));
        let c = SocketConfig::at(tmp.join("run/api.sock"));
        let l = bind_unix(&c).unwrap();
        assert_eq!(mode(&tmp.join("run")), 0o750);
        assert_eq!(mode(&c.path), 0o660);
        // A live socket is not taken over.
        let e = bind_unix(&c).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        // A dead one (its listener gone, the file left) is.
        drop(l);
        let _l = bind_unix(&c).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[tokio::test]
    async fn a_directory_open_to_other_users_is_refused() {
        let tmp = std::env::temp_dir().join(format!("cirrus-uds-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = bind_unix(&SocketConfig::at(tmp.join("api.sock"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the socket's directory {} admits every local user (mode 755): make it 0750 or 0700",
                tmp.display()
            )
        );
        let file = tmp.join("plain");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(&file, "x").unwrap();
        let e = bind_unix(&SocketConfig::at(&file)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn groups_resolve_by_number_and_by_name() {
        assert_eq!(group_id("1234").unwrap(), 1234);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(group_id("no-such-group-cirrus").is_err());
    }

    #[tokio::test]
    async fn a_service_on_a_unix_socket_answers_health_and_reflection() {
        let tmp = std::env::temp_dir().join(format!("cirrus-uds-{}", uuid::Uuid::new_v4()));
        let c = SocketConfig::at(tmp.join("api.sock"));
        let l = bind_unix(&c).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::serve::serve(
            tonic::service::Routes::default(),
            &[],
            l,
            async {
                let _ = stopped.await;
            },
        ));
        healthcheck_unix(&c.path).await.unwrap();
        let _ = stop.send(());
        task.await.unwrap().unwrap();
        assert!(
            healthcheck_unix(&c.path)
                .await
                .unwrap_err()
                .starts_with("cannot connect to")
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
