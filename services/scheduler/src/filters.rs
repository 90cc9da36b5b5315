//! Host choice as Nova's filter scheduler makes it: every filter must pass,
//! then the weighers order what is left. Pure functions over the hosts'
//! rows, so that they are tested without a database.

use std::collections::HashSet;

use compute_api::model::{Host, Resources, Server};
use serde::{Deserialize, Serialize};

/// What a placement needs to know of the server and its group.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub server: &'a Server,
    pub resources: Resources,
    /// Hosts not to consider (tried before, or asked to ignore).
    pub ignore: HashSet<&'a str>,
    /// The group's policy and the hosts of its other members.
    pub group: Option<(&'a str, HashSet<String>)>,
}

/// A filter that refused a host, for the logs and the "considered/passed" figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Ignored,
    Disabled,
    Vcpus,
    Ram,
    Disk,
    Zone,
    Architecture,
    Hypervisor,
    Affinity,
    AntiAffinity,
}

/// Each filter in turn; the first that refuses names itself.
pub fn check(h: &Host, r: &Request<'_>) -> Result<(), Refusal> {
    if r.ignore.contains(h.name.as_str()) {
        return Err(Refusal::Ignored);
    }
    if !h.enabled || !h.up {
        return Err(Refusal::Disabled);
    }
    if h.free_vcpus() < f64::from(r.resources.vcpus) {
        return Err(Refusal::Vcpus);
    }
    if h.free_ram_mb() < r.resources.ram_mb as f64 {
        return Err(Refusal::Ram);
    }
    if h.free_disk_gb() < r.resources.disk_gb as f64 {
        return Err(Refusal::Disk);
    }
    let az = r.server.availability_zone.as_str();
    if !az.is_empty() && h.availability_zone != az {
        return Err(Refusal::Zone);
    }
    let props = &r.server.image_properties;
    if let Some(arch) = props
        .get("hw_architecture")
        .or_else(|| props.get("architecture"))
        && !arch.is_empty()
        && !h.architecture.eq_ignore_ascii_case(arch)
    {
        return Err(Refusal::Architecture);
    }
    if let Some(hv) = props
        .get("img_hv_type")
        .or_else(|| props.get("hypervisor_type"))
        && !hv.is_empty()
        && !h.hypervisor_type.eq_ignore_ascii_case(hv)
    {
        return Err(Refusal::Hypervisor);
    }
    if let Some((policy, hosts)) = &r.group {
        match *policy {
            "affinity" if !hosts.is_empty() && !hosts.contains(&h.name) => {
                return Err(Refusal::Affinity);
            }
            "anti-affinity" if hosts.contains(&h.name) => return Err(Refusal::AntiAffinity),
            _ => {}
        }
    }
    Ok(())
}

/// The weighers' multipliers (Nova's names: `ram_weight_multiplier`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    pub ram: f64,
    pub vcpu: f64,
    pub disk: f64,
    /// Per build in flight on the host (negative: spread the builds).
    pub in_flight: f64,
    /// Per recent build failure on the host (strongly negative).
    pub failures: f64,
    /// Soft (anti-)affinity: toward / away from the group's hosts.
    pub soft_affinity: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            ram: 1.0,
            vcpu: 1.0,
            disk: 0.5,
            in_flight: -1.0,
            failures: -10.0,
            soft_affinity: 10.0,
        }
    }
}

/// Orders the passing hosts best first. Each free-resource weigher is
/// normalised to 0..1 over the candidates (as Nova does), so that the
/// multipliers compare like with like.
pub fn weigh(hosts: &mut [&Host], r: &Request<'_>, w: &Weights) {
    let max = |f: fn(&Host) -> f64| {
        hosts
            .iter()
            .map(|h| f(h))
            .fold(0.0_f64, f64::max)
            .max(f64::MIN_POSITIVE)
    };
    let (ram_max, cpu_max, disk_max) = (
        max(Host::free_ram_mb),
        max(Host::free_vcpus),
        max(Host::free_disk_gb),
    );
    let score = |h: &Host| {
        let mut s = w.ram * h.free_ram_mb() / ram_max
            + w.vcpu * h.free_vcpus() / cpu_max
            + w.disk * h.free_disk_gb() / disk_max
            + w.in_flight * f64::from(h.in_flight)
            + w.failures * f64::from(h.failures);
        if let Some((policy, members)) = &r.group {
            let here = members.contains(&h.name);
            match *policy {
                "soft-affinity" if here => s += w.soft_affinity,
                "soft-anti-affinity" if here => s -= w.soft_affinity,
                _ => {}
            }
        }
        s
    };
    hosts.sort_by(|a, b| {
        score(b)
            .partial_cmp(&score(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.name.cmp(&b.name))
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use time::OffsetDateTime;
    use uuid::Uuid;

    pub fn host(name: &str, ram_used: i64) -> Host {
        Host {
            name: name.into(),
            enabled: true,
            disabled_reason: String::new(),
            availability_zone: "nova".into(),
            hypervisor_type: "test".into(),
            architecture: "x86_64".into(),
            vcpus: 4,
            ram_mb: 4096,
            disk_gb: 100,
            cpu_ratio: 1.0,
            ram_ratio: 1.0,
            disk_ratio: 1.0,
            vcpus_used: 0,
            ram_mb_used: ram_used,
            disk_gb_used: 0,
            in_flight: 0,
            failures: 0,
            generation: 0,
            last_heartbeat: OffsetDateTime::now_utc(),
            up: true,
            servers: 0,
        }
    }

    fn server() -> Server {
        let now = OffsetDateTime::now_utc();
        Server {
            id: Uuid::new_v4(),
            project_id: "p".into(),
            user_id: "u".into(),
            name: "s".into(),
            flavor_id: Uuid::new_v4(),
            flavor_name: "f".into(),
            vcpus: 1,
            ram_mb: 1024,
            disk_gb: 10,
            ephemeral_gb: 0,
            image_id: String::new(),
            image_properties: BTreeMap::new(),
            key_name: String::new(),
            public_key: String::new(),
            user_data: vec![],
            metadata: BTreeMap::new(),
            networks: vec![],
            block_devices: vec![],
            security_groups: vec![],
            availability_zone: String::new(),
            server_group_id: None,
            host: None,
            alternates: vec![],
            tried_hosts: vec![],
            attempt: 0,
            vm_state: "building".into(),
            task_state: Some("scheduling".into()),
            power_state: "nostate".into(),
            fault: None,
            locked: false,
            locked_by: None,
            locked_reason: String::new(),
            revision: 1,
            created_at: now,
            updated_at: now,
            launched_at: None,
        }
    }

    #[test]
    fn filters_refuse_by_name_and_weighers_prefer_free_hosts() {
        let s = server();
        let req = Request {
            server: &s,
            resources: s.resources(),
            ignore: HashSet::new(),
            group: None,
        };
        let full = host("full", 3500);
        assert_eq!(check(&full, &req), Err(Refusal::Ram));
        let mut off = host("off", 0);
        off.enabled = false;
        assert_eq!(check(&off, &req), Err(Refusal::Disabled));
        let mut down = host("down", 0);
        down.up = false;
        assert_eq!(check(&down, &req), Err(Refusal::Disabled));
        let (a, b) = (host("a", 2048), host("b", 0));
        let mut hosts = vec![&a, &b];
        weigh(&mut hosts, &req, &Weights::default());
        assert_eq!(hosts[0].name, "b");

        let mut failing = host("b", 0);
        failing.failures = 3;
        let mut hosts = vec![&a, &failing];
        weigh(&mut hosts, &req, &Weights::default());
        assert_eq!(
            hosts[0].name, "a",
            "recent failures weigh strongly against a host"
        );
    }

    #[test]
    fn groups_and_image_properties_filter() {
        let mut s = server();
        s.image_properties
            .insert("hw_architecture".into(), "aarch64".into());
        let mut req = Request {
            server: &s,
            resources: s.resources(),
            ignore: HashSet::new(),
            group: None,
        };
        assert_eq!(check(&host("a", 0), &req), Err(Refusal::Architecture));
        let s2 = server();
        req.server = &s2;
        req.group = Some(("anti-affinity", ["a".to_string()].into()));
        assert_eq!(check(&host("a", 0), &req), Err(Refusal::AntiAffinity));
        assert_eq!(check(&host("b", 0), &req), Ok(()));
        req.group = Some(("affinity", ["a".to_string()].into()));
        assert_eq!(check(&host("b", 0), &req), Err(Refusal::Affinity));
        assert_eq!(check(&host("a", 0), &req), Ok(()));
    }
}
