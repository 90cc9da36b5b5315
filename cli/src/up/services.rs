//! The table of what `cirrus up` runs: each process's name (its binary, its
//! mesh name and certificate), the schema it logs in to, its sidecar policy,
//! its catalog entry, its slot in the port plan, and how its config file is
//! made — from the service crate's own typed `Config`, serialised with
//! `toml`, so that a renamed or moved key fails to compile here instead of
//! failing at start-up. A new service is one row and one builder.

use std::net::SocketAddr;
use std::path::PathBuf;

use runtime::config::{DatabaseConfig, ServerConfig};

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

pub fn spec(name: &str) -> Option<&'static Spec> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The ports of one service and its sidecar.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// The service itself, on loopback (only its sidecar calls it).
    pub service: u16,
    /// The sidecar's mTLS endpoint (the catalog's internal one).
    pub internal: u16,
    /// The sidecar's server-TLS endpoint (the catalog's public one).
    pub public: u16,
    /// The sidecar's plaintext loopback listener for the service's own calls out.
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

    /// Its sidecar's outbound listener: calls to other services go through it by name.
    fn outbound(&self) -> SocketAddr {
        local(self.ports.outbound)
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
        database: p.database(),
        key_dir: p.dir("identity/keys"),
        ..Default::default()
    })
}

fn queue_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&queue::Config {
        server: p.server(),
        database: p.database(),
        ..Default::default()
    })
}

fn image_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&image::Config {
        server: p.server(),
        database: p.database(),
        store_dir: p.dir("image/store"),
        ..Default::default()
    })
}

fn volume_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&volume::Config {
        server: p.server(),
        database: p.database(),
        store: volume::StoreConfig {
            dir: p.dir("volume/store"),
            ..Default::default()
        },
        image: volume::ImageConfig {
            outbound: Some(p.outbound()),
            url: None,
            ..Default::default()
        },
        ..Default::default()
    })
}

fn network_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&network::Config {
        server: p.server(),
        database: p.database(),
        queue_via_sidecar: Some(p.outbound()),
        ..Default::default()
    })
}

fn network_agent_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&network_agent::Config {
        server: p.server(),
        host: p.site.host.clone(),
        network_via_sidecar: Some(p.outbound()),
        bridge: p.site.bridge.clone(),
        namespace_prefix: p.site.namespace_prefix.clone(),
        state_dir: p.dir("network-agent"),
        ..Default::default()
    })
}

fn compute_api_config(p: &Plan) -> anyhow::Result<String> {
    let mut c = toml::Value::try_from(compute_api::Config {
        server: p.server(),
        database: p.database(),
        sidecar_outbound: Some(p.outbound()),
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
        database: p.database(),
        sidecar_outbound: Some(p.outbound()),
        ..Default::default()
    })
}

fn conductor_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&conductor::Config {
        server: p.server(),
        database: p.database(),
        sidecar_outbound: Some(p.outbound()),
        ..Default::default()
    })
}

fn compute_agent_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&compute_agent::Config {
        server: p.server(),
        host: p.site.host.clone(),
        libvirt_uri: p.site.libvirt_uri.clone(),
        domain_type: p.site.domain_type.clone(),
        state_dir: p.dir("compute-agent"),
        sidecar_outbound: Some(p.outbound()),
        // Heartbeats often enough that the host is listed up soon after start.
        heartbeat_interval_ms: 5_000,
        ..Default::default()
    })
}

/// The sidecar's config. Identity's own sidecar follows identity straight
/// on loopback; every other one through identity's sidecar (mTLS). Only
/// services listed as public get a public listener; agents none.
pub fn sidecar_config(p: &Plan) -> anyhow::Result<String> {
    let svc = p.spec.name;
    let pki = p.state.pki();
    let identity_url = if svc == "identity" {
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
        outbound_listen: Some(local(p.ports.outbound)),
        upstream: local(p.ports.service),
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
    /// (which refuses unknown keys and validates) and carries what the plan says.
    #[test]
    fn every_config_loads_in_its_service() {
        use runtime::process::Service as _;
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path()).unwrap();
        let identity = Ports::of(7000, 0);
        let site = site();
        for spec in SERVICES {
            let plan = Plan {
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
            let outbound = Some(local(plan.ports.outbound));
            match spec.name {
                "identity" => runtime::config::load::<identity::Config>(f)
                    .unwrap()
                    .validate()
                    .unwrap(),
                "queue" => runtime::config::load::<queue::Config>(f)
                    .unwrap()
                    .validate()
                    .unwrap(),
                "image" => runtime::config::load::<image::Config>(f)
                    .unwrap()
                    .validate()
                    .unwrap(),
                "volume" => {
                    let c = runtime::config::load::<volume::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.image.outbound, outbound);
                    assert!(c.store.dir.starts_with(&state.dir));
                    assert_eq!(c.database.schema, "volume");
                }
                "network" => {
                    let c = runtime::config::load::<network::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.queue_via_sidecar, outbound);
                }
                "network-agent" => {
                    let c = runtime::config::load::<network_agent::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!((c.host.as_str(), c.bridge.as_str()), ("h1", "br-int"));
                    assert_eq!(c.network_via_sidecar, outbound);
                    assert!(c.state_dir.starts_with(&state.dir));
                }
                "compute-api" => {
                    let c = runtime::config::load::<compute_api::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.database.schema, "compute");
                    assert_eq!(c.sidecar_outbound, outbound);
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
                }
                "conductor" => {
                    let c = runtime::config::load::<conductor::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.database.schema, "compute");
                    assert!(c.database.url.contains("cirrus_compute@"));
                }
                "compute-agent" => {
                    let c = runtime::config::load::<compute_agent::Config>(f).unwrap();
                    c.validate().unwrap();
                    assert_eq!(c.host, "h1");
                    assert_eq!(c.libvirt_uri, "test:///default");
                    assert_eq!(c.sidecar_outbound, outbound);
                }
                other => panic!("no loader for {other} in this test"),
            }
            let side = state.path(&format!("{}-sidecar.toml", spec.name));
            std::fs::write(&side, sidecar_config(&plan).unwrap()).unwrap();
            let c: sidecar::config::Config = runtime::config::load(Some(side.as_path())).unwrap();
            assert_eq!(c.upstream, local(plan.ports.service));
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
