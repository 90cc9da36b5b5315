//! The Cirrus network agent (neutron-openvswitch-agent + dhcp-agent), one
//! per host, with no database credentials: it asks `network` (through its
//! sidecar) what is bound to its host and makes Open vSwitch and dnsmasq
//! match.
//!
//! - [`agent`]: the loops (heartbeat, `SyncHost` long poll, OVSDB monitor)
//!   and the one reconcile;
//! - [`flows`]: the OpenFlow pipeline (anti-spoofing, conntrack security
//!   groups, forwarding), as pure text from the desired state;
//! - [`ovs`]: the real driver (`ovs-vsctl`, `ovs-ofctl`, `ip`);
//! - [`dhcp`]: dnsmasq per network in its own namespace.
//!
//! The integration bridge runs with `datapath_type=netdev` where the kernel
//! datapath is missing (as on the dev machines) and `fail_mode=secure`.

pub mod agent;
pub mod dhcp;
pub mod flows;
pub mod ovs;
pub mod ovsdb;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runtime::config::{ConfigError, ServerConfig, ports};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

/// The agent's configuration (see `runtime::config` for how it loads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Health (`grpc.health.v1`) on `listen`; the agent serves no API.
    pub server: ServerConfig,
    /// The Unix socket to serve health on instead of `server.listen`
    /// (issue 13: only this agent's sidecar can open it); absent: loopback
    /// TCP, a development set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<runtime::config::SocketConfig>,
    /// This host's name, as in its SPIFFE id `.../svc/network-agent/host/<host>`.
    pub host: String,
    /// The network service: its sidecar's outbound address in production.
    pub network_url: String,
    /// In production: the agent's sidecar's outbound address; `network` is
    /// then reached through it (`http://network`), and `network_url` is unused.
    pub network_via_sidecar: Option<std::net::SocketAddr>,
    /// The sidecar's outbound Unix socket (issue 13): wins over `network_via_sidecar`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_via_sidecar_socket: Option<std::path::PathBuf>,
    /// The integration bridge (at most 15 characters).
    pub bridge: String,
    /// `netdev` (userspace) where the kernel datapath is missing, else `system`.
    pub datapath_type: String,
    /// Namespaces this agent makes start with this (it removes any other
    /// namespace with the prefix that the state no longer names).
    pub namespace_prefix: String,
    /// dnsmasq files and scratch space.
    pub state_dir: PathBuf,
    /// The OVSDB server's unix socket (JSON-RPC).
    pub ovsdb_socket: PathBuf,
    pub heartbeat_secs: u64,
    /// How long one `SyncHost` may wait for a change (then a full resync).
    pub sync_wait_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::loopback(ports::NETWORK_AGENT.0, ports::NETWORK_AGENT.1),
            socket: None,
            host: "localhost".into(),
            network_url: format!("http://127.0.0.1:{}", ports::NETWORK.0),
            network_via_sidecar: None,
            network_via_sidecar_socket: None,
            bridge: "br-int".into(),
            datapath_type: "netdev".into(),
            namespace_prefix: "cirrus-".into(),
            state_dir: PathBuf::from(".state/network-agent"),
            ovsdb_socket: PathBuf::from(ovsdb::DEFAULT_SOCKET),
            heartbeat_secs: 5,
            sync_wait_ms: 10_000,
        }
    }
}

impl Config {
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        let host_ok = !self.host.is_empty()
            && self.host.len() <= 63
            && self
                .host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !host_ok {
            return bad("host must be 1 to 63 of a-z A-Z 0-9 . _ -");
        }
        if self.bridge.is_empty() || self.bridge.len() > 15 {
            return bad("bridge must be 1 to 15 characters");
        }
        if !matches!(self.datapath_type.as_str(), "netdev" | "system") {
            return bad("datapath_type must be netdev or system");
        }
        if self.namespace_prefix.is_empty() || self.namespace_prefix.len() > 20 {
            return bad("namespace_prefix must be 1 to 20 characters");
        }
        if self.heartbeat_secs == 0 || self.heartbeat_secs > 300 {
            return bad("heartbeat_secs must be between 1 and 300");
        }
        if self.sync_wait_ms > 30_000 {
            return bad("sync_wait_ms must be at most 30000");
        }
        if !self.network_url.starts_with("http://") && !self.network_url.starts_with("https://") {
            return bad("network_url must be an http:// or https:// URL");
        }
        Ok(())
    }
}

impl runtime::process::Service for Config {
    const NAME: &'static str = "network-agent";
    const ABOUT: &'static str = "Cirrus network agent (Open vSwitch, dnsmasq)";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check()
    }

    fn socket(&self) -> Option<&runtime::config::SocketConfig> {
        self.socket.as_ref()
    }

    fn run(
        self,
        listener: runtime::local::Listener,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        run_with_health(self, listener, shutdown)
    }
}

/// The agent, and health (and reflection) on `listener` for its sidecar.
#[allow(clippy::manual_async_fn)] // Send is spelled out
fn run_with_health(
    config: Config,
    listener: runtime::local::Listener,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
) -> impl Future<Output = anyhow::Result<()>> + Send {
    async move {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        let mut rx2 = rx.clone();
        let health = runtime::serve::serve(
            tonic::service::Routes::default(),
            &[],
            listener,
            async move {
                let _ = rx2.wait_for(|s| *s).await;
            },
        );
        let mut rx3 = rx;
        let (a, h) = tokio::join!(
            run(config, async move {
                let _ = rx3.wait_for(|s| *s).await;
            }),
            health
        );
        h?;
        a
    }
}

/// Runs the agent until `shutdown`, leaving what it wired in place (guests
/// keep their network while the agent is away).
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    config.check()?;
    let config = Arc::new(config);
    tokio::fs::create_dir_all(&config.state_dir).await?;
    let channel = match runtime::local::via_sidecar(
        config.network_via_sidecar_socket.as_deref(),
        config.network_via_sidecar,
        "network",
    ) {
        Some(c) => c.map_err(anyhow::Error::msg)?,
        None => runtime::trace::traced(
            tonic::transport::Endpoint::from_shared(config.network_url.clone())?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .connect_lazy(),
        ),
    };
    let mut agent = agent::Agent::new(config.clone(), channel);
    agent.bridge.ensure().await?;
    let started_at = format!("{:?}", std::time::SystemTime::now());
    let (stop_tx, stop_rx) = watch::channel(false);
    let hb = tokio::spawn(agent::heartbeats(
        agent.client.clone(),
        config.clone(),
        started_at,
        stop_rx.clone(),
    ));
    let notify = Arc::new(Notify::new());
    let mon = tokio::spawn(agent::monitor_interfaces(notify.clone(), stop_rx.clone()));
    let (state_tx, mut state_rx) = watch::channel::<Option<proto::network::v1::HostState>>(None);
    let client = agent.client.clone();
    let wait_ms = config.sync_wait_ms;
    let poll = tokio::spawn(async move {
        let mut token = String::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            match client.sync(&token, wait_ms).await {
                Ok(s) => {
                    token = s.token.clone();
                    backoff = Duration::from_millis(100);
                    if state_tx.send(Some(s)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(status = %e, "sync failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    tracing::info!(host = %config.host, bridge = %config.bridge, "network agent running");
    let mut shutdown = std::pin::pin!(shutdown);
    let mut latest = None;
    let mut retry = Duration::from_secs(3600);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            r = state_rx.changed() => {
                if r.is_err() { break; }
                latest = state_rx.borrow_and_update().clone();
            }
            () = notify.notified() => {}
            () = tokio::time::sleep(retry) => {}
        }
        if let Some(s) = &latest {
            match agent.reconcile(s).await {
                Ok(o) => {
                    tracing::debug!(?o, "reconciled");
                    retry = Duration::from_secs(3600);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconcile failed; retrying in 1 s");
                    retry = Duration::from_secs(1);
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    poll.abort();
    let _ = hb.await;
    let _ = mon.await;
    tracing::info!("network agent stopped (wiring left in place)");
    Ok(())
}

/// Removes everything an agent with `config` made: its bridge, its
/// namespaces (and their dnsmasqs), its state directory. For tests and for
/// decommissioning a host, never run by the agent itself.
pub async fn teardown(config: &Config) -> anyhow::Result<()> {
    let d = dhcp::Dhcp {
        prefix: config.namespace_prefix.clone(),
        state_dir: config.state_dir.clone(),
    };
    for net in d.present().await.unwrap_or_default() {
        let _ = d.remove(&net).await;
    }
    for ns in ovs::namespaces(&config.namespace_prefix)
        .await
        .unwrap_or_default()
    {
        let _ = ovs::delete_namespace(&ns).await;
    }
    let b = ovs::Bridge::new(
        &config.bridge,
        &config.datapath_type,
        ovsdb::Ovsdb::new(&config.ovsdb_socket),
    );
    // DHCP veths die with their namespace; guest-side leftovers go with the bridge.
    if let Ok(ifaces) = b.interfaces().await {
        for i in ifaces {
            if ovs::link_exists(&i.name).await {
                let _ = ovs::run("ip", &["link", "del", &i.name]).await;
            }
        }
    }
    b.destroy().await?;
    if config.state_dir.exists() {
        let _ = tokio::fs::remove_dir_all(&config.state_dir).await;
    }
    Ok(())
}
