//! The Cirrus compute agent, a nova-compute equivalent: one per host. It
//! holds no database credentials — everything it reads or records goes
//! through conductor, whose answers are limited to servers on this host —
//! and links no Postgres client.
//!
//! - [`agent`]: the host loop: heal at start (Nova's `_init_instance`),
//!   heartbeat with the host's resources, consume `compute.<host>` and run
//!   each cast (build, delete, the power actions);
//! - [`saga`]: the build as a table of steps, each with its undo;
//! - [`libvirt`]: the hypervisor through the `virt` crate (isolated there),
//!   `test:///default` (many simulated hosts on one machine) or
//!   `qemu:///system`, by configuration;
//! - [`conductor`]: the calls to conductor, with this host's SPIFFE id.
//!
//! For tests, [`Faults`] injects a failure (or a hang) at a named build step
//! and can run every step twice; it is off unless configured.

pub mod agent;
pub mod clients;
pub mod conductor;
pub mod console;
pub mod images;
pub mod libvirt;
pub mod saga;
pub mod steps;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use runtime::config::{ConfigError, ServerConfig, ports};
use serde::{Deserialize, Serialize};

pub use agent::Agent;

/// Fault injection, for tests only (all off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fail every build at this step (a name of the build table: claim,
    /// image, ports, volumes, config_drive, define_paused, wait_vif_plugged,
    /// resume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_at: Option<String>,
    /// Whether the injected failure is reschedulable (another host may succeed).
    pub reschedulable: bool,
    /// Hang every build at this step (to kill the agent mid-build, or to let
    /// the build time out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hang_at: Option<String>,
    /// Run every step twice, and unwind twice (idempotence checks).
    pub repeat_steps: bool,
}

/// The agent's configuration (see `runtime::config` for how it loads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Serves only health and reflection (and answers `healthcheck`).
    pub server: ServerConfig,
    /// The Unix socket to serve on instead of `server.listen` (issue 13:
    /// only this service's sidecar can open it); absent: loopback TCP, a
    /// development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    /// This host's name: its topic is `compute.<host>`, its SPIFFE id
    /// `spiffe://<trust_domain>/svc/compute-agent/host/<host>`.
    pub host: String,
    pub trust_domain: String,
    /// `test:///default` (libvirt's in-memory test driver) or `qemu:///system`.
    pub libvirt_uri: String,
    /// The domain type in the XML: `test` for the test driver, `qemu` or
    /// `kvm`, or `auto`: `kvm` when usable here, else `qemu` (TCG).
    pub domain_type: String,
    /// Where server disks and config drives live.
    pub state_dir: PathBuf,
    /// This workload's sidecar outbound listener: when set, conductor and the
    /// queue are reached through it by name and the URLs below are unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_outbound: Option<SocketAddr>,
    /// The sidecar's outbound Unix socket (its `[outbound_socket] path`,
    /// issue 13): when set, calls go through it and `sidecar_outbound` is unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_outbound_socket: Option<std::path::PathBuf>,
    pub conductor_url: String,
    pub queue_url: String,
    pub heartbeat_interval_ms: u64,
    pub availability_zone: String,
    /// The host's size; the node's own (libvirt's node info) when unset.
    /// Simulated hosts on the test driver set them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u64>,
    pub disk_gb: u64,
    pub cpu_allocation_ratio: f64,
    pub ram_allocation_ratio: f64,
    pub disk_allocation_ratio: f64,
    pub max_concurrent_builds: usize,
    /// The image cache's size bound (least recently used unused bases go).
    pub image_cache_max_bytes: u64,
    /// How long a build waits for its ports to be ACTIVE before it fails.
    pub vif_plug_timeout_secs: u64,
    /// The kernel command line of a direct kernel boot (an image's
    /// `os_command_line` property wins).
    pub kernel_cmdline: String,
    /// How often the guests' serial logs are read and their new output
    /// appended to the console log conductor keeps.
    pub console_poll_ms: u64,
    /// How often the power state of every server here is compared with
    /// libvirt's (Nova's `_sync_power_states`); 0: never.
    pub power_sync_interval_ms: u64,
    /// Where compute-api reaches this agent's `conductor.v1.Agent`
    /// (`AttachConsole`), registered with conductor at start
    /// (`SetAgentEndpoint`): a service name its sidecar resolves, or an
    /// `http://` URL it dials directly. Unset: `compute-agent` behind a
    /// sidecar (the mesh name its own sidecar is listed under), else
    /// `http://<server.listen>`; empty: no console on this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_endpoint: Option<String>,
    /// How long a stop waits for the guest to power off on the ACPI power
    /// button before it destroys it (Nova's `shutdown_timeout`).
    pub stop_timeout_secs: u64,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::loopback(ports::COMPUTE_AGENT.0, ports::COMPUTE_AGENT.1),
            socket: None,
            host: "host1".into(),
            trust_domain: "cirrus.local".into(),
            libvirt_uri: "test:///default".into(),
            domain_type: "test".into(),
            state_dir: PathBuf::from(".state/compute-agent"),
            sidecar_outbound: None,
            sidecar_outbound_socket: None,
            conductor_url: format!("http://127.0.0.1:{}", ports::CONDUCTOR.0),
            queue_url: format!("http://127.0.0.1:{}", ports::QUEUE.0),
            heartbeat_interval_ms: 10_000,
            availability_zone: "nova".into(),
            vcpus: None,
            ram_mb: None,
            disk_gb: 100,
            cpu_allocation_ratio: 16.0,
            ram_allocation_ratio: 1.5,
            disk_allocation_ratio: 1.0,
            max_concurrent_builds: 10,
            image_cache_max_bytes: 10 * 1024 * 1024 * 1024,
            vif_plug_timeout_secs: 60,
            kernel_cmdline: "console=ttyS0 quiet panic=-1".into(),
            console_poll_ms: 500,
            power_sync_interval_ms: 10_000,
            console_endpoint: None,
            stop_timeout_secs: 60,
            faults: Faults::default(),
        }
    }
}

impl Config {
    /// What [`Config::console_endpoint`] resolves to.
    pub fn console_endpoint(&self) -> String {
        match &self.console_endpoint {
            Some(e) => e.clone(),
            None if self.sidecar_outbound.is_some() || self.sidecar_outbound_socket.is_some() => {
                "compute-agent".into()
            }
            None if self.socket.is_some() => String::new(),
            None => format!("http://{}", self.server.listen),
        }
    }

    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/svc/compute-agent/host/{}",
            self.trust_domain, self.host
        )
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "compute-agent";
    const ABOUT: &'static str = "Cirrus compute agent (nova-compute)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let host_ok = !self.host.is_empty()
            && self.host.len() <= 63
            && self
                .host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !host_ok {
            return bad("host must be 1 to 63 of A-Z a-z 0-9 - _".into());
        }
        if self.libvirt_uri.is_empty() || self.domain_type.is_empty() {
            return bad("libvirt_uri and domain_type are required".into());
        }
        if !(10..=600_000).contains(&self.heartbeat_interval_ms) {
            return bad("heartbeat_interval_ms must be between 10 and 600000".into());
        }
        if self.max_concurrent_builds == 0 || self.max_concurrent_builds > 1000 {
            return bad("max_concurrent_builds must be between 1 and 1000".into());
        }
        if !(1..=3600).contains(&self.vif_plug_timeout_secs) {
            return bad("vif_plug_timeout_secs must be between 1 and 3600".into());
        }
        if !(10..=60_000).contains(&self.console_poll_ms) {
            return bad("console_poll_ms must be between 10 and 60000".into());
        }
        if !(1..=3600).contains(&self.stop_timeout_secs) {
            return bad("stop_timeout_secs must be between 1 and 3600".into());
        }
        if self.power_sync_interval_ms != 0 && self.power_sync_interval_ms < 10 {
            return bad("power_sync_interval_ms must be 0 (off) or at least 10".into());
        }
        let names = saga::step_names();
        for (field, v) in [
            ("faults.fail_at", &self.faults.fail_at),
            ("faults.hang_at", &self.faults.hang_at),
        ] {
            if let Some(step) = v
                && !names.contains(&step.as_str())
            {
                return bad(format!(
                    "{field} must name a build step: {}",
                    names.join(", ")
                ));
            }
        }
        if (self.sidecar_outbound.is_none() && self.sidecar_outbound_socket.is_none())
            && (self.conductor_url.is_empty() || self.queue_url.is_empty())
        {
            return bad("conductor_url and queue_url are required without sidecar_outbound".into());
        }
        Ok(())
    }

    async fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> anyhow::Result<()> {
        run(self, listener, shutdown).await
    }
}

pub const SERVICE_NAMES: [&str; 1] = ["conductor.v1.Agent"];

/// How long a delivery is this agent's before the queue gives it to another
/// consumer of the topic (a restarted agent).
const LEASE: Duration = Duration::from_secs(60);

/// Heals, then heartbeats and consumes the host's topic until `shutdown`.
pub async fn run(
    config: Config,
    listener: impl Into<runtime::local::Listener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::process::Service::validate(&config)?;
    if !config.faults.eq(&Faults::default()) {
        tracing::warn!(faults = ?config.faults, "fault injection is on");
    }
    let uri = config.libvirt_uri.clone();
    let dtype = config.domain_type.clone();
    let libvirt = tokio::task::spawn_blocking(move || libvirt::Libvirt::open(&uri, &dtype))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open libvirt {}: {e}", config.libvirt_uri))?;
    tracing::info!(uri = %config.libvirt_uri, domain_type = libvirt.domain_type(), "libvirt open");
    tokio::fs::create_dir_all(config.state_dir.join("servers")).await?;
    // QEMU runs as another user: it must reach the disks under the state dir.
    images::open_dir(&config.state_dir);
    images::open_dir(&config.state_dir.join("servers"));
    let outbound = runtime::local::Outbound::of(
        config.sidecar_outbound_socket.as_deref(),
        config.sidecar_outbound,
    );
    let services = clients::Services::new(outbound.clone(), &config.spiffe_id())
        .map_err(anyhow::Error::msg)?;
    let env = saga::Env {
        services,
        cache: images::ImageCache::new(
            config.state_dir.join("images"),
            config.image_cache_max_bytes,
        ),
        availability_zone: config.availability_zone.clone(),
        vif_plug_timeout: Duration::from_secs(config.vif_plug_timeout_secs),
        kernel_cmdline: config.kernel_cmdline.clone(),
    };
    let channel = match &outbound {
        Some(out) => out.channel("conductor").map_err(anyhow::Error::msg)?,
        None => runtime::trace::traced(
            tonic::transport::Endpoint::from_shared(config.conductor_url.clone())?
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
        ),
    };
    let conductor = conductor::Conductor::new(channel, &config.spiffe_id())?;
    let queue = match queue_client::Client::through_sidecar(
        config.sidecar_outbound_socket.as_deref(),
        config.sidecar_outbound,
    ) {
        Some(q) => q?,
        None => queue_client::Client::connect_lazy(&config.queue_url)?,
    };
    let topic = queue_client::names::compute_topic(&config.host);
    queue
        .ensure_topic(&topic, Default::default())
        .await
        .map_err(|s| anyhow::anyhow!("cannot create topic {topic}: {}", s.message()))?;
    let credits = config.max_concurrent_builds as u32 * 2;
    let agent = Agent::new(config, libvirt, conductor, env);

    // Heal before the first heartbeat makes the host a candidate again.
    let healed = agent
        .heal()
        .await
        .map_err(|s| anyhow::anyhow!("healing failed: {}", s.message()))?;
    agent
        .heartbeat()
        .await
        .map_err(|s| anyhow::anyhow!("first heartbeat failed: {}", s.message()))?;
    // Where compute-api reaches our console (after the first heartbeat:
    // conductor knows the host then). A failure leaves the host without
    // a console, not without its guests.
    let endpoint = agent.config().console_endpoint();
    match agent.register_console(&endpoint).await {
        Ok(()) => tracing::info!(endpoint = %endpoint, "console endpoint registered"),
        Err(s) => tracing::warn!(status = %s, "console endpoint not registered"),
    }
    tracing::info!(host = %agent.config().host, healed, "compute agent up");
    let beats = tokio::spawn(agent.clone().heartbeat_forever());
    let consoles = tokio::spawn(agent.clone().console_forever());
    let sync = tokio::spawn(agent.clone().power_sync_forever());

    let mut sub = queue.subscribe_with(
        &topic,
        "compute-agent",
        queue_client::SubscribeOptions {
            credits,
            lease: LEASE,
            ..Default::default()
        },
    );
    let worker = agent.clone();
    let consumer = tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let d = match d {
                Ok(d) => d,
                Err(s) => {
                    tracing::error!(status = %s, "the host topic refused us");
                    return;
                }
            };
            let agent = worker.clone();
            tokio::spawn(async move {
                let cast: agent::Cast = match d.json() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable cast; dropped");
                        let _ = d.ack().await;
                        return;
                    }
                };
                // A child of the span that published the cast (one trace per boot).
                match tracing::Instrument::instrument(agent.handle(cast), d.span()).await {
                    Ok(()) => {
                        let _ = d.ack().await;
                    }
                    Err(s) => {
                        tracing::warn!(status = %s, "cast failed; it will be redelivered");
                        let _ = d.nack(Duration::from_secs(1)).await;
                    }
                }
            });
        }
    });

    let routes = tonic::service::Routes::new(console::ConsoleService::new(agent.clone()).server());
    let result = runtime::serve::serve(routes, &SERVICE_NAMES, listener, shutdown).await;
    consumer.abort();
    beats.abort();
    consoles.abort();
    sync.abort();
    result?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use runtime::process::Service;

    #[test]
    fn the_build_table_names_each_step_once_and_faults_must_name_one() {
        let names = saga::step_names();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(
            names,
            [
                "claim",
                "image",
                "ports",
                "volumes",
                "config_drive",
                "define_paused",
                "wait_vif_plugged",
                "resume"
            ]
        );
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.faults.fail_at = Some("boot".into());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid configuration: faults.fail_at must name a build step: claim, image, ports, \
             volumes, config_drive, define_paused, wait_vif_plugged, resume"
        );
        let c = Config {
            host: "a/b".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        assert_eq!(
            Config::default().spiffe_id(),
            "spiffe://cirrus.local/svc/compute-agent/host/host1"
        );
    }

    #[test]
    fn casts_are_the_json_compute_api_sends() {
        let id = uuid::Uuid::nil();
        let c: agent::Cast = serde_json::from_str(&format!(
            r#"{{"op":"reboot","server_id":"{id}","hard":true}}"#
        ))
        .unwrap();
        assert_eq!(
            c,
            agent::Cast::Reboot {
                server_id: id,
                hard: true
            }
        );
        let b: agent::Cast = serde_json::from_str(&format!(
            r#"{{"op":"build","server_id":"{id}","attempt":2}}"#
        ))
        .unwrap();
        assert_eq!(
            b,
            agent::Cast::Build {
                server_id: id,
                attempt: 2,
                token: None,
            }
        );
        let b: agent::Cast = serde_json::from_str(&format!(
            r#"{{"op":"build","server_id":"{id}","attempt":1,"token":"t0k"}}"#
        ))
        .unwrap();
        assert_eq!(
            b,
            agent::Cast::Build {
                server_id: id,
                attempt: 1,
                token: Some("t0k".into()),
            }
        );
        let a: agent::Cast = serde_json::from_str(&format!(
            r#"{{"op":"attach_volume","server_id":"{id}","volume_id":"v1"}}"#
        ))
        .unwrap();
        assert_eq!(
            a,
            agent::Cast::AttachVolume {
                server_id: id,
                volume_id: "v1".into(),
                token: None,
            }
        );
    }
}
