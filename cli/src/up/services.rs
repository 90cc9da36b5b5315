//! The table of what `cirrus up` runs: each service's name (its binary and
//! its schema), its slot in the port plan, and how its config file is made —
//! from the service crate's own typed `Config`, serialised with `toml`, so
//! that a renamed or moved key fails to compile here instead of failing at
//! start-up. A new service is one row and one builder.

use std::net::SocketAddr;

use runtime::config::{DatabaseConfig, ServerConfig};

use super::state::State;

/// One service `cirrus up` runs, beside its sidecar.
pub struct Spec {
    /// The binary, the Postgres schema and the mesh name.
    pub name: &'static str,
    /// Its ports start at `port_base + Ports::SPAN * slot`.
    pub slot: u16,
    /// Its config file.
    pub config: fn(&Plan) -> anyhow::Result<String>,
}

/// Every service `cirrus up` runs, in start order (identity first: the
/// others need it to validate tokens and resolve names).
pub const SERVICES: &[Spec] = &[
    Spec {
        name: "identity",
        slot: 0,
        config: identity_config,
    },
    Spec {
        name: "queue",
        slot: 1,
        config: queue_config,
    },
    Spec {
        name: "image",
        slot: 2,
        config: image_config,
    },
];

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

/// What a config builder knows of the cloud.
pub struct Plan<'a> {
    pub state: &'a State,
    pub spec: &'a Spec,
    pub ports: Ports,
    pub identity: Ports,
    /// This service's own login on the cloud's database.
    pub database_url: String,
}

impl Plan<'_> {
    /// `[server]`: the service on loopback, its metrics beside it.
    fn server(&self) -> ServerConfig {
        ServerConfig::loopback(self.ports.service, self.ports.metrics)
    }

    /// `[database]`: its own login, its own schema.
    fn database(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.database_url.clone(),
            ..DatabaseConfig::local(self.spec.name)
        }
    }
}

fn to_toml<C: serde::Serialize>(c: &C) -> anyhow::Result<String> {
    Ok(toml::to_string(c)?)
}

fn identity_config(p: &Plan) -> anyhow::Result<String> {
    to_toml(&identity::Config {
        server: p.server(),
        database: p.database(),
        key_dir: p.state.path("identity/keys"),
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
        store_dir: p.state.path("image/store"),
        ..Default::default()
    })
}

/// The sidecar's config. Identity's own sidecar follows identity straight
/// on loopback; every other one through identity's sidecar (mTLS).
pub fn sidecar_config(p: &Plan) -> anyhow::Result<String> {
    let svc = p.spec.name;
    let pki = p.state.pki();
    let identity_url = if svc == "identity" {
        format!("http://{}", local(p.identity.service))
    } else {
        format!("https://{}", local(p.identity.internal))
    };
    to_toml(&sidecar::config::Config {
        service: svc.into(),
        server: ServerConfig {
            listen: local(p.ports.internal),
            metrics_listen: Some(local(p.ports.sidecar_metrics)),
        },
        public_listen: Some(local(p.ports.public)),
        outbound_listen: Some(local(p.ports.outbound)),
        upstream: local(p.ports.service),
        cert: pki.join(format!("{svc}.crt")),
        key: pki.join(format!("{svc}.key")),
        bundle: pki.join("bundle.pem"),
        identity_url,
        policy: p.state.path(&format!("policy/{svc}.toml")),
        ..Default::default()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Each file `cirrus up` writes loads with the service's own loader
    /// (which refuses unknown keys) and carries what the plan says.
    #[test]
    fn every_config_loads_in_its_service() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path()).unwrap();
        let identity = Ports::of(7000, 0);
        for spec in SERVICES {
            let plan = Plan {
                state: &state,
                spec,
                ports: Ports::of(7000, spec.slot),
                identity,
                database_url: format!("postgres://cirrus_{}@127.0.0.1:5432/x", spec.name),
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
            match spec.name {
                "identity" => drop(runtime::config::load::<identity::Config>(f).unwrap()),
                "queue" => drop(runtime::config::load::<queue::Config>(f).unwrap()),
                "image" => drop(runtime::config::load::<image::Config>(f).unwrap()),
                other => panic!("no loader for {other} in this test"),
            }
            let side = state.path(&format!("{}-sidecar.toml", spec.name));
            std::fs::write(&side, sidecar_config(&plan).unwrap()).unwrap();
            let c: sidecar::config::Config = runtime::config::load(Some(side.as_path())).unwrap();
            assert_eq!(c.upstream, local(plan.ports.service));
            assert_eq!(c.service, spec.name);
        }
    }

    #[test]
    fn slots_do_not_overlap() {
        let mut slots: Vec<u16> = SERVICES.iter().map(|s| s.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), SERVICES.len());
        let p = Ports::of(0, 0);
        assert!(p.sidecar_metrics < Ports::SPAN);
    }
}
