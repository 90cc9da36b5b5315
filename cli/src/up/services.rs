//! The table of what `cirrus up` runs: each process's name (its binary, its
//! mesh name and certificate), the schema it logs in to, its sidecar policy,
//! its catalog entry, its slot in the port plan, and how its config file is
//! made — from the service crate's own typed `Config`, serialised with
//! `toml`, so that a renamed or moved key fails to compile here instead of
//! failing at start-up. A new service is one row and one builder.

use std::net::SocketAddr;
use std::path::PathBuf;

use runtime::config::{DatabaseConfig, ServerConfig, SocketConfig};

use super::state::State;

/// How a process is listed in identity's catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Not listed (identity bootstraps its own entry; agents serve no API).
    None,
    /// Public (server TLS, users) and internal (mTLS) endpoints, under this type.
    Public(&'static str),
    /// Only the internal (mTLS) endpoint: called by the mesh, never by users.
    Internal(&'static str),
}

/// One process `cirrus up` runs, beside its sidecar.
pub struct Spec {
    /// The binary, the process and the mesh name (its certificate's
    /// `spiffe://cirrus.local/svc/<name>`, its catalog name).
    pub name: &'static str,
    /// The Postgres schema (and login role `cirrus_<schema>`) it uses, if any.
    pub schema: Option<&'static str>,
    /// Its sidecar's policy file, `policy/<policy>.toml` in the state directory.
    pub policy: &'static str,
    pub listing: Listing,
    /// One per host: its certificate names the host (`.../host/<host>`).
    pub agent: bool,
    /// Its ports start at `port_base + Ports::SPAN * slot`.
    pub slot: u16,
    /// Its config file.
    pub config: fn(&Plan) -> anyhow::Result<String>,
}

/// Every process `cirrus up` runs, in start order: identity first (the
/// others need it to validate tokens and resolve names), then what each
/// next one calls.
pub const SERVICES: &[Spec] = &[
    Spec {
        name: "identity",
        schema: Some("identity"),
        policy: "identity",
        listing: Listing::None,
        agent: false,
        slot: 0,
        config: identity_config,
    },
    Spec {
        name: "queue",
        schema: Some("queue"),
        policy: "queue",
        listing: Listing::Public("queue"),
        agent: false,
        slot: 1,
        config: queue_config,
    },
    Spec {
        name: "image",
        schema: Some("image"),
        policy: "image",
        listing: Listing::Public("image"),
        agent: false,
        slot: 2,
        config: image_config,
    },
    Spec {
        name: "volume",
        schema: Some("volume"),
        policy: "volume",
        listing: Listing::Public("volume"),
        agent: false,
        slot: 3,
        config: volume_config,
    },
    Spec {
        name: "network",
        schema: Some("network"),
        policy: "network",
        listing: Listing::Public("network"),
        agent: false,
        slot: 4,
        config: network_config,
    },
    Spec {
        name: "network-agent",
        schema: None,
        policy: "network-agent",
        listing: Listing::None,
        agent: true,
        slot: 5,
        config: network_agent_config,
    },
    // Listed as `compute-api` (its certificate's name, which the scheduler's
    // and the queue's policies name) with type `compute`.
    Spec {
        name: "compute-api",
        schema: Some("compute"),
        policy: "compute",
        listing: Listing::Public("compute"),
        agent: false,
        slot: 6,
        config: compute_api_config,
    },
    // Scheduler and conductor work on compute-api's schema (its repo), with its login.
    Spec {
        name: "scheduler",
        schema: Some("compute"),
        policy: "scheduler",
        listing: Listing::Internal("scheduler"),
        agent: false,
        slot: 7,
        config: scheduler_config,
    },
    Spec {
        name: "conductor",
        schema: Some("compute"),
        policy: "conductor",
        listing: Listing::Internal("conductor"),
        agent: false,
        slot: 8,
        config: conductor_config,
    },
    Spec {
        name: "compute-agent",
        schema: None,
        policy: "compute-agent",
        listing: Listing::None,
        agent: true,
        slot: 9,
        config: compute_agent_config,
    },
];

/// The policies of the agents' sidecars (written by `cirrus up`, as the
/// services' defaults are, once): the network agent serves no API; the
/// compute agent serves its guests' serial consoles to compute-api only.
pub const AGENT_POLICIES: [(&str, &str); 2] = [
    (
        "network-agent",
        "\
# Mesh policy for the network agent's sidecar (written by cirrus up): the
# agent serves no API, only health and reflection (default deny for the rest).
[[rule]]
methods = [\"grpc.health.v1.Health/*\", \"grpc.reflection.v1.ServerReflection/*\", \"grpc.reflection.v1alpha.ServerReflection/*\"]
token = \"none\"
",
    ),
    (
        "compute-agent",
        "\
# Mesh policy for the compute agent's sidecar (written by cirrus up): health
# and reflection, and the guests' serial consoles for compute-api only (it
# has checked the user; the agent checks the server is on its host).
[[rule]]
methods = [\"grpc.health.v1.Health/*\", \"grpc.reflection.v1.ServerReflection/*\", \"grpc.reflection.v1alpha.ServerReflection/*\"]
token = \"none\"

[[rule]]
methods = [\"conductor.v1.Agent/AttachConsole\"]
token = \"none\"
peers = [\"spiffe://cirrus.local/svc/compute-api\"]
internal_only = true
",
    ),
];

/// The service's socket and its sidecar's outbound socket, in `run/<svc>/`.
pub const API_SOCKET: &str = "api.sock";
pub const OUTBOUND_SOCKET: &str = "outbound.sock";

pub fn spec(name: &str) -> Option<&'static Spec> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The ports of one service and its sidecar.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// The service itself on loopback, with `--dev-tcp` only (else its
    /// Unix socket, [`Plan::socket`]); still written as `server.listen`.
    pub service: u16,
    /// The sidecar's mTLS endpoint (the catalog's internal one).
    pub internal: u16,
    /// The sidecar's server-TLS endpoint (the catalog's public one).
    pub public: u16,
    /// The sidecar's plaintext loopback listener for the service's own
    /// calls out, with `--dev-tcp` only (else [`Plan::outbound_socket`]).
    pub outbound: u16,
    pub metrics: u16,
    pub sidecar_metrics: u16,
}

impl Ports {
    /// Ports one slot takes.
    pub const SPAN: u16 = 10;

    pub fn of(base: u16, slot: u16) -> Self {
        let b = base + Self::SPAN * slot;
        Self {
            service: b,
            internal: b + 1,
            public: b + 2,
            outbound: b + 3,
            metrics: b + 4,
            sidecar_metrics: b + 5,
        }
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What this machine is to the cloud: the host its agents serve, the
/// integration bridge, the namespace prefix, the hypervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The host name of this machine's agents (their SPIFFE ids, `compute.<host>`).
    pub host: String,
    /// The OVS integration bridge the network agent owns.
    pub bridge: String,
    /// The network agent's namespaces start with this (per cloud: the agent
    /// removes namespaces with its prefix that its state does not name).
    pub namespace_prefix: String,
    /// `qemu:///system` or `test:///default`.
    pub libvirt_uri: String,
    /// `kvm`, `qemu` (TCG) or `test`.
    pub domain_type: String,
    /// Why that driver (said in the summary and in `cirrus status`).
    pub driver_note: String,
}

/// What a config builder knows of the cloud.
pub struct Plan<'a> {
    pub state: &'a State,
    pub spec: &'a Spec,
    pub ports: Ports,
    pub identity: Ports,
    pub site: &'a Site,
    /// This service's own login on the cloud's database (empty for agents).
    pub database_url: String,
    /// `--dev-tcp`: the service and its sidecar's outbound side on
    /// loopback TCP, as before issue 13 (any local process can reach them).
    pub dev_tcp: bool,
    /// The group that owns the service's socket directory and sockets
    /// (`cirrus-<service>`), when `cirrus up` runs it as its own user.
    pub group: Option<String>,
}

impl Plan<'_> {
    /// `[server]`: the service on loopback, its metrics beside it.
    fn server(&self) -> ServerConfig {
        ServerConfig::loopback(self.ports.service, self.ports.metrics)
    }

    /// `[database]`: its login, its schema.
    fn database(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.database_url.clone(),
            ..DatabaseConfig::local(self.spec.schema.unwrap_or(self.spec.name))
        }
    }

    /// Its sidecar's outbound listener on loopback TCP (`--dev-tcp` only):
    /// calls to other services go through it by name.
    fn outbound(&self) -> Option<SocketAddr> {
        self.dev_tcp.then(|| local(self.ports.outbound))
    }

    /// The service's `[socket]`: `<state>/run/<svc>/api.sock`, which only
    /// its user and its sidecar's group can open; none with `--dev-tcp`.
    pub fn socket(&self) -> Option<SocketConfig> {
        (!self.dev_tcp).then(|| SocketConfig {
            group: self.group.clone(),
            ..SocketConfig::at(self.state.run_dir(self.spec.name).join(API_SOCKET))
        })
    }

    /// The sidecar's `[outbound_socket]` beside it: the service calls out there.
    pub fn outbound_socket(&self) -> Option<SocketConfig> {
        (!self.dev_tcp).then(|| SocketConfig {
            group: self.group.clone(),
            ..SocketConfig::at(self.state.run_dir(self.spec.name).join(OUTBOUND_SOCKET))
        })
    }

    fn outbound_path(&self) -> Option<PathBuf> {
        self.outbound_socket().map(|s| s.path)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.state.path(name)
    }
}

fn to_toml<C: serde::Serialize>(c: &C) -> anyhow::Result<String> {
    Ok(toml::to_string(c)?)
}

fn identity_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&identity::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        key_dir: p.dir("identity/keys"),
        ..Default::default()
    })
}

fn queue_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&queue::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        ..Default::default()
    })
}

fn image_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&image::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        store_dir: p.dir("image/store"),
        ..Default::default()
    })
}

fn volume_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&volume::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        store: volume::StoreConfig {
            dir: p.dir("volume/store"),
            ..Default::default()
        },
        image: volume::ImageConfig {
            outbound: p.outbound(),
            outbound_socket: p.outbound_path(),
            url: None,
            ..Default::default()
        },
        ..Default::default()
    })
}

fn network_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&network::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        queue_via_sidecar: p.outbound(),
        queue_via_sidecar_socket: p.outbound_path(),
        ..Default::default()
    })
}

fn network_agent_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&network_agent::Config {
        server: p.server(),
        socket: p.socket(),
        host: p.site.host.clone(),
        network_via_sidecar: p.outbound(),
        network_via_sidecar_socket: p.outbound_path(),
        bridge: p.site.bridge.clone(),
        namespace_prefix: p.site.namespace_prefix.clone(),
        state_dir: p.dir("network-agent"),
        ..Default::default()
    })
}

fn compute_api_config(p: &Plan) -> anyhow::Result<String> {
    let mut c = toml::Value::try_from(compute_api::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        sidecar_outbound: p.outbound(),
        sidecar_outbound_socket: p.outbound_path(),
        ..Default::default()
    })?;
    // Image, network and volume through the mesh (`[peers]`, each "mesh":
    // by name through the sidecar). Set by key while that table is new, so
    // that this builds with compute-api before and after it.
    if let Some(peers) = c.get_mut("peers").and_then(toml::Value::as_table_mut) {
        for peer in MESH_PEERS {
            peers.insert(peer.into(), "mesh".into());
        }
    }
    Ok(toml::to_string(&c)?)
}

/// The services compute-api looks things up in, through its sidecar.
const MESH_PEERS: [&str; 3] = ["image", "network", "volume"];

fn scheduler_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&scheduler::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        sidecar_outbound: p.outbound(),
        sidecar_outbound_socket: p.outbound_path(),
        ..Default::default()
    })
}

fn conductor_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&conductor::Config {
        server: p.server(),
        socket: p.socket(),
        database: p.database(),
        sidecar_outbound: p.outbound(),
        sidecar_outbound_socket: p.outbound_path(),
        ..Default::default()
    })
}

fn compute_agent_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&compute_agent::Config {
        server: p.server(),
        socket: p.socket(),
        host: p.site.host.clone(),
        libvirt_uri: p.site.libvirt_uri.clone(),
        domain_type: p.site.domain_type.clone(),
        state_dir: p.dir("compute-agent"),
        sidecar_outbound: p.outbound(),
        sidecar_outbound_socket: p.outbound_path(),
        // Heartbeats often enough that the host is listed up soon after start.
        heartbeat_interval_ms: 5_000,
        ..Default::default()
    })
}

/// The sidecar's config. Every sidecar follows identity through identity's
/// sidecar (mTLS) — identity's own one through its own internal listener,
/// since identity serves on a socket only that sidecar can open (with
/// `--dev-tcp` it follows identity straight on loopback). The service is
/// reached on its socket and calls out on the outbound socket. Only
/// services listed as public get a public listener; agents none.
pub fn sidecar_config(p: &Plan) -> anyhow::Result<String> {
    let svc = p.spec.name;
    let pki = p.state.pki();
    let identity_url = if svc == "identity" && p.dev_tcp {
        format!("http://{}", local(p.identity.service))
    } else {
        format!("https://{}", local(p.identity.internal))
    };
    let public = matches!(p.spec.listing, Listing::Public(_)) || svc == "identity";
    to_toml(&sidecar::config::Config {
        service: svc.into(),
        server: ServerConfig {
            listen: local(p.ports.internal),
            metrics_listen: Some(local(p.ports.sidecar_metrics)),
        },
        public_listen: public.then(|| local(p.ports.public)),
        outbound_listen: p.outbound(),
        outbound_socket: p.outbound_socket(),
        upstream: local(p.ports.service),
        upstream_socket: p.socket().map(|s| s.path),
        cert: pki.join(format!("{svc}.crt")),
        key: pki.join(format!("{svc}.key")),
        bundle: pki.join("bundle.pem"),
        identity_url,
        policy: p.state.path(&format!("policy/{}.toml", p.spec.policy)),
        ..Default::default()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn site() -> Site {
        Site {
            host: "h1".into(),
            bridge: "br-int".into(),
            namespace_prefix: "cirrus-abc-".into(),
            libvirt_uri: "test:///default".into(),
            domain_type: "test".into(),
            driver_note: String::new(),
        }
    }

    /// Each file `cirrus up` writes loads with the service's own loader
    /// (which refuses unknown keys and validates) and carries what the plan
    /// says: by default the service on `run/<svc>/api.sock` and its calls out
    /// through `run/<svc>/outbound.sock`, no TCP port of either; with
    /// `--dev-tcp` both on loopback TCP.
    #[test]
    fn every_config_loads_in_its_service() {
        for dev_tcp in [false, true] {
            every_config_loads(dev_tcp);
        }
    }

    fn every_config_loads(dev_tcp: bool) {
        use runtime::process::Service as _;
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path()).unwrap();
        let identity = Ports::of(7000, 0);
        let site = site();
        for spec in SERVICES {
            let plan = Plan {
                dev_tcp,
                group: Some("cirrus-x".into()),
                state: &state,
                spec,
                ports: Ports::of(7000, spec.slot),
                identity,
                site: &site,
                database_url: spec
                    .schema
                    .map(|s| format!("postgres://cirrus_{s}@127.0.0.1:5432/x"))
                    .unwrap_or_default(),
            };
            let file = state.path(&format!("{}.toml", spec.name));
            std::fs::write(&file, (spec.config)(&plan).unwrap()).unwrap();
            let text = std::fs::read_to_string(&file).unwrap();
            let port = format!("127.0.0.1:{}", plan.ports.service);
            assert!(
                text.contains(&port) && text.contains(&plan.database_url),
                "{text}"
            );
            let f = Some(file.as_path());
            let run = state.run_dir(spec.name);
            let outbound = dev_tcp.then(|| local(plan.ports.outbound));
            let out_sock = (!dev_tcp).then(|| run.join(OUTBOUND_SOCKET));
            let socket = (!dev_tcp).then(|| SocketConfig {
                group: Some("cirrus-x".into()),
                ..SocketConfig::at(run.join(API_SOCKET))
            });
            match spec.name {
                "identity" => {
                    let c = runtime::config::load::<identity::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.socket(), socket.as_ref());
                }
                "queue" => {
                    let c = runtime::config::load::<queue::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.socket(), socket.as_ref());
                }
                "image" => {
                    let c = runtime::config::load::<image::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.socket(), socket.as_ref());
                }
                "volume" => {
                    let c = runtime::config::load::<volume::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.socket(), socket.as_ref());
                    // Without --dev-tcp the key is absent and loads as its
                    // default; the socket wins over it (volume's image.rs).
                    if dev_tcp {
                        assert_eq!(c.image.outbound, outbound);
                    }
                    assert_eq!(c.image.outbound_socket, out_sock);
                    assert!(c.store.dir.starts_with(&state.dir));
                    assert_eq!(c.database.schema, "volume");
                }
                "network" => {
                    let c = runtime::config::load::<network::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.socket(), socket.as_ref());
                    assert_eq!(c.queue_via_sidecar, outbound);
                    assert_eq!(c.queue_via_sidecar_socket, out_sock);
                }
                "network-agent" => {
                    let c = runtime::config::load::<network_agent::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!((c.host.as_str(), c.bridge.as_str()), ("h1", "br-int"));
                    assert_eq!(c.socket(), socket.as_ref());
                    assert_eq!(c.network_via_sidecar, outbound);
                    assert_eq!(c.network_via_sidecar_socket, out_sock);
                    assert!(c.state_dir.starts_with(&state.dir));
                }
                "compute-api" => {
                    let c = runtime::config::load::<compute_api::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.database.schema, "compute");
                    assert_eq!(c.socket(), socket.as_ref());
                    assert_eq!(c.sidecar_outbound, outbound);
                    assert_eq!(c.sidecar_outbound_socket, out_sock);
                    let raw: toml::Value = toml::from_str(&text).unwrap();
                    if let Some(peers) = raw.get("peers") {
                        for peer in MESH_PEERS {
                            assert_eq!(peers.get(peer).and_then(|v| v.as_str()), Some("mesh"));
                        }
                    }
                }
                "scheduler" => {
                    let c = runtime::config::load::<scheduler::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.database.schema, "compute");
                    assert!(c.database.url.contains("cirrus_compute@"));
                    assert_eq!(c.socket(), socket.as_ref());
                    assert_eq!(c.sidecar_outbound, outbound);
                    assert_eq!(c.sidecar_outbound_socket, out_sock);
                }
                "conductor" => {
                    let c = runtime::config::load::<conductor::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.database.schema, "compute");
                    assert!(c.database.url.contains("cirrus_compute@"));
                    assert_eq!(c.socket(), socket.as_ref());
                    assert_eq!(c.sidecar_outbound, outbound);
                    assert_eq!(c.sidecar_outbound_socket, out_sock);
                }
                "compute-agent" => {
                    let c = runtime::config::load::<compute_agent::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.host, "h1");
                    assert_eq!(c.libvirt_uri, "test:///default");
                    assert_eq!(c.socket(), socket.as_ref());
                    assert_eq!(c.sidecar_outbound, outbound);
                    assert_eq!(c.sidecar_outbound_socket, out_sock);
                }
                other => panic!("no loader for {other} in this test"),
            }
            let side = state.path(&format!("{}-sidecar.toml", spec.name));
            std::fs::write(&side, sidecar_config(&plan).unwrap()).unwrap();
            let c: sidecar::config::Config = runtime::config::load(Some(side.as_path())).unwrap();
            assert_eq!(c.upstream, local(plan.ports.service));
            assert_eq!(c.upstream_socket, socket.as_ref().map(|s| s.path.clone()));
            assert_eq!(c.outbound_listen, outbound);
            assert_eq!(c.outbound_socket.as_ref().map(|s| s.path.clone()), out_sock);
            // Every sidecar follows identity over mTLS (identity's own through
            // itself), except identity's with --dev-tcp, straight to it.
            assert_eq!(
                c.identity_url.starts_with("http://"),
                dev_tcp && spec.name == "identity",
                "{}",
                c.identity_url
            );
            assert_eq!(c.service, spec.name);
            assert_eq!(
                c.public_listen.is_some(),
                matches!(spec.listing, Listing::Public(_)) || spec.name == "identity",
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn slots_do_not_overlap_and_follow_the_start_order() {
        let slots: Vec<u16> = SERVICES.iter().map(|s| s.slot).collect();
        let mut sorted = slots.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, slots);
        let p = Ports::of(0, 0);
        assert!(p.sidecar_metrics < Ports::SPAN);
        let names: Vec<&str> = SERVICES.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "identity",
                "queue",
                "image",
                "volume",
                "network",
                "network-agent",
                "compute-api",
                "scheduler",
                "conductor",
                "compute-agent"
            ]
        );
    }

    #[test]
    fn the_agent_policies_parse_and_name_each_agent() {
        for (name, text) in AGENT_POLICIES {
            let p = sidecar::policy::Policy::parse(text).unwrap();
            assert!(!p.rules.is_empty(), "{name}");
            assert!(spec(name).is_some_and(|s| s.agent && s.policy == name));
        }
    }
}
