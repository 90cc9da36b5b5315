//! The compute domain's values, shared by compute-api, the scheduler and
//! conductor (they all read the one `compute` schema through [`crate::repo`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Nova's `vm_state` values.
pub mod vm {
    pub const BUILDING: &str = "building";
    pub const ACTIVE: &str = "active";
    pub const STOPPED: &str = "stopped";
    pub const PAUSED: &str = "paused";
    pub const SUSPENDED: &str = "suspended";
    pub const ERROR: &str = "error";
    pub const DELETED: &str = "deleted";
    pub const ALL: [&str; 7] = [BUILDING, ACTIVE, STOPPED, PAUSED, SUSPENDED, ERROR, DELETED];
}

/// Nova's `task_state` values (none is SQL NULL, "" on the wire).
pub mod task {
    pub const SCHEDULING: &str = "scheduling";
    pub const NETWORKING: &str = "networking";
    pub const BLOCK_DEVICE_MAPPING: &str = "block_device_mapping";
    pub const SPAWNING: &str = "spawning";
    pub const DELETING: &str = "deleting";
    pub const POWERING_OFF: &str = "powering-off";
    pub const POWERING_ON: &str = "powering-on";
    pub const REBOOTING: &str = "rebooting";
    pub const REBOOTING_HARD: &str = "rebooting_hard";
    pub const PAUSING: &str = "pausing";
    pub const UNPAUSING: &str = "unpausing";
    pub const SUSPENDING: &str = "suspending";
    pub const RESUMING: &str = "resuming";
    pub const ALL: [&str; 13] = [
        SCHEDULING,
        NETWORKING,
        BLOCK_DEVICE_MAPPING,
        SPAWNING,
        DELETING,
        POWERING_OFF,
        POWERING_ON,
        REBOOTING,
        REBOOTING_HARD,
        PAUSING,
        UNPAUSING,
        SUSPENDING,
        RESUMING,
    ];
}

/// Nova's `power_state` values.
pub mod power {
    pub const NOSTATE: &str = "nostate";
    pub const RUNNING: &str = "running";
    pub const PAUSED: &str = "paused";
    pub const SHUTDOWN: &str = "shutdown";
    pub const CRASHED: &str = "crashed";
    pub const SUSPENDED: &str = "suspended";
    pub const ALL: [&str; 6] = [NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED];
}

/// The fault of the "no valid host" case, as Nova words it.
pub const NO_VALID_HOST: &str = "No valid host was found. There are not enough hosts available.";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkRequest {
    #[serde(default)]
    pub network_id: Option<Uuid>,
    #[serde(default)]
    pub port_id: Option<Uuid>,
    #[serde(default)]
    pub fixed_ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub source: String,
    #[serde(default)]
    pub uuid: Option<Uuid>,
    #[serde(default)]
    pub size_gb: u32,
    #[serde(default)]
    pub boot_index: u32,
    #[serde(default)]
    pub delete_on_termination: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub code: i32,
    pub message: String,
    pub at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub id: Uuid,
    pub project_id: String,
    pub user_id: String,
    pub name: String,
    pub flavor_id: Uuid,
    pub flavor_name: String,
    pub vcpus: i32,
    pub ram_mb: i32,
    pub disk_gb: i32,
    pub ephemeral_gb: i32,
    pub image_id: String,
    pub image_properties: BTreeMap<String, String>,
    pub key_name: String,
    pub public_key: String,
    pub user_data: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub networks: Vec<NetworkRequest>,
    pub block_devices: Vec<BlockDevice>,
    pub security_groups: Vec<String>,
    pub availability_zone: String,
    pub server_group_id: Option<Uuid>,
    pub host: Option<String>,
    pub alternates: Vec<String>,
    pub tried_hosts: Vec<String>,
    pub attempt: i32,
    pub vm_state: String,
    pub task_state: Option<String>,
    pub power_state: String,
    pub fault: Option<Fault>,
    pub locked: bool,
    pub locked_by: Option<String>,
    pub locked_reason: String,
    pub revision: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub launched_at: Option<OffsetDateTime>,
}

/// What a new server row holds.
#[derive(Debug, Clone)]
pub struct NewServer {
    pub id: Uuid,
    pub project_id: String,
    pub user_id: String,
    pub name: String,
    pub flavor: Flavor,
    pub image_id: String,
    pub image_properties: BTreeMap<String, String>,
    pub key_name: String,
    pub public_key: String,
    pub user_data: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub networks: Vec<NetworkRequest>,
    pub block_devices: Vec<BlockDevice>,
    pub security_groups: Vec<String>,
    pub availability_zone: String,
    pub server_group_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Flavor {
    pub id: Uuid,
    pub name: String,
    pub vcpus: i32,
    pub ram_mb: i32,
    pub disk_gb: i32,
    pub ephemeral_gb: i32,
    pub extra_specs: BTreeMap<String, String>,
    pub is_public: bool,
    pub projects: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyPair {
    pub user_id: String,
    pub name: String,
    pub project_id: String,
    pub kind: String,
    pub public_key: String,
    pub fingerprint: String,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerGroup {
    pub id: Uuid,
    pub project_id: String,
    pub user_id: String,
    pub name: String,
    pub policy: String,
    pub members: Vec<Uuid>,
}

pub const GROUP_POLICIES: [&str; 4] = [
    "affinity",
    "anti-affinity",
    "soft-affinity",
    "soft-anti-affinity",
];

/// Quota limits or usage; -1 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub instances: i64,
    pub cores: i64,
    pub ram_mb: i64,
    pub key_pairs: i64,
    pub server_groups: i64,
}

impl Default for Limits {
    /// Nova's defaults.
    fn default() -> Self {
        Self {
            instances: 10,
            cores: 20,
            ram_mb: 51200,
            key_pairs: 100,
            server_groups: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    pub enabled: bool,
    pub disabled_reason: String,
    pub availability_zone: String,
    pub hypervisor_type: String,
    pub architecture: String,
    pub vcpus: i32,
    pub ram_mb: i64,
    pub disk_gb: i64,
    pub cpu_ratio: f64,
    pub ram_ratio: f64,
    pub disk_ratio: f64,
    pub vcpus_used: i32,
    pub ram_mb_used: i64,
    pub disk_gb_used: i64,
    pub in_flight: i32,
    pub failures: i32,
    pub generation: i64,
    pub last_heartbeat: OffsetDateTime,
    /// Whether its heartbeat is fresh (computed by the query).
    pub up: bool,
    pub servers: i64,
}

impl Host {
    pub fn free_vcpus(&self) -> f64 {
        f64::from(self.vcpus) * self.cpu_ratio - f64::from(self.vcpus_used)
    }
    pub fn free_ram_mb(&self) -> f64 {
        self.ram_mb as f64 * self.ram_ratio - self.ram_mb_used as f64
    }
    pub fn free_disk_gb(&self) -> f64 {
        self.disk_gb as f64 * self.disk_ratio - self.disk_gb_used as f64
    }
}

/// What a host's agent reports in a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HostReport {
    pub name: String,
    pub vcpus: i32,
    pub ram_mb: i64,
    pub disk_gb: i64,
    pub availability_zone: String,
    pub hypervisor_type: String,
    pub architecture: String,
    pub cpu_ratio: f64,
    pub ram_ratio: f64,
    pub disk_ratio: f64,
}

/// Resources a server needs on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: i32,
    pub ram_mb: i64,
    pub disk_gb: i64,
}

impl Server {
    pub fn resources(&self) -> Resources {
        Resources {
            vcpus: self.vcpus,
            ram_mb: i64::from(self.ram_mb),
            disk_gb: i64::from(self.disk_gb) + i64::from(self.ephemeral_gb),
        }
    }
}

/// One message cast to `compute.<host>` (JSON on the queue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Cast {
    Build { server_id: Uuid, attempt: i32 },
    Delete { server_id: Uuid },
    Start { server_id: Uuid },
    Stop { server_id: Uuid },
    Reboot { server_id: Uuid, hard: bool },
    Pause { server_id: Uuid },
    Unpause { server_id: Uuid },
    Suspend { server_id: Uuid },
    Resume { server_id: Uuid },
    AttachVolume { server_id: Uuid, volume_id: Uuid },
    DetachVolume { server_id: Uuid, volume_id: Uuid },
}

/// A cast as it goes on the queue: the operation and the token of the user
/// who asked for it (Nova serialises the request context, token included,
/// into its RPC messages), with which the host calls image, network and
/// volume: `{"op":"build","server_id":..,"attempt":1,"token":".."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CastMessage {
    #[serde(flatten)]
    pub cast: Cast,
    /// The bare bearer token (send it as `authorization: Bearer <token>`);
    /// absent when the caller came without one (tests without a mesh).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

impl Cast {
    pub fn server_id(&self) -> Uuid {
        match self {
            Cast::Build { server_id, .. }
            | Cast::Delete { server_id }
            | Cast::Start { server_id }
            | Cast::Stop { server_id }
            | Cast::Reboot { server_id, .. }
            | Cast::Pause { server_id }
            | Cast::Unpause { server_id }
            | Cast::Suspend { server_id }
            | Cast::Resume { server_id }
            | Cast::AttachVolume { server_id, .. }
            | Cast::DetachVolume { server_id, .. } => *server_id,
        }
    }
}

/// A volume attached (or being attached or detached) to a server: Nova's
/// block device mapping of a live attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachment {
    pub server_id: Uuid,
    pub volume_id: Uuid,
    pub status: String,
    pub device: String,
    pub attachment_id: String,
    pub created_at: OffsetDateTime,
}

/// Volume attachment statuses.
pub mod attach {
    pub const ATTACHING: &str = "attaching";
    pub const ATTACHED: &str = "attached";
    pub const DETACHING: &str = "detaching";
}

/// The topic of one host's agent.
pub fn host_topic(host: &str) -> String {
    format!("compute.{host}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_cast_carries_its_caller_s_token_beside_the_op() {
        let id = Uuid::nil();
        let m = CastMessage {
            cast: Cast::Build {
                server_id: id,
                attempt: 1,
            },
            token: "t0k".into(),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            format!(r#"{{"op":"build","server_id":"{id}","attempt":1,"token":"t0k"}}"#)
        );
        assert_eq!(serde_json::from_str::<CastMessage>(&json).unwrap(), m);
        let a = CastMessage {
            cast: Cast::AttachVolume {
                server_id: id,
                volume_id: id,
            },
            token: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            format!(r#"{{"op":"attach_volume","server_id":"{id}","volume_id":"{id}"}}"#)
        );
    }
}
