//! The build as explicit steps, each with its undo (as Oxide's
//! instance-start saga). [`BUILD`] is the whole build in one table: a
//! failure at any step unwinds exactly what that step and the ones before it
//! did, in reverse; every step and every undo is idempotent, so a step run
//! twice (a redelivered cast, a restart) changes nothing, and a restarted
//! agent unwinds an interrupted build by running every undo.
//!
//! The claim itself is the scheduler's (a generation-checked update of the
//! host's usage); its undo — releasing it — is conductor's, done in the same
//! transaction that records the failure this agent reports.

use std::path::{Path, PathBuf};

use proto::conductor::v1 as pb;
use uuid::Uuid;

use crate::libvirt::{DomainSpec, Libvirt};

/// One step of the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Claim,
    Image,
    Ports,
    Volumes,
    ConfigDrive,
    DefinePaused,
    WaitVifPlugged,
    Resume,
}

/// A row of the build table: the step, its name (fault injection, logs),
/// the task_state the server shows while it runs, and what its undo does.
pub struct Row {
    pub step: Step,
    pub name: &'static str,
    pub task: &'static str,
    pub does: &'static str,
    pub undo: &'static str,
}

/// The build, in order.
pub const BUILD: [Row; 8] = [
    Row {
        step: Step::Claim,
        name: "claim",
        task: "scheduling",
        does: "check the claim the scheduler made is for this host and attempt",
        undo: "conductor releases the claim with the failure report",
    },
    Row {
        step: Step::Image,
        name: "image",
        task: "block_device_mapping",
        does: "the root disk: an overlay of the image for this server",
        undo: "remove the overlay",
    },
    Row {
        step: Step::Ports,
        name: "ports",
        task: "networking",
        does: "bind each requested port to this host (network service)",
        undo: "unbind; delete the ports the build created",
    },
    Row {
        step: Step::Volumes,
        name: "volumes",
        task: "block_device_mapping",
        does: "attach each requested volume with this host's connector (volume service)",
        undo: "delete the attachments",
    },
    Row {
        step: Step::ConfigDrive,
        name: "config_drive",
        task: "spawning",
        does: "meta_data.json, network_data.json, user_data",
        undo: "remove the config drive",
    },
    Row {
        step: Step::DefinePaused,
        name: "define_paused",
        task: "spawning",
        does: "define the libvirt domain and start it paused",
        undo: "destroy and undefine the domain",
    },
    Row {
        step: Step::WaitVifPlugged,
        name: "wait_vif_plugged",
        task: "spawning",
        does: "wait (bounded) until every port is ACTIVE",
        undo: "nothing (the steps above unwind)",
    },
    Row {
        step: Step::Resume,
        name: "resume",
        task: "spawning",
        does: "resume the paused domain",
        undo: "nothing (define_paused's undo destroys it)",
    },
];

pub fn step_names() -> Vec<&'static str> {
    BUILD.iter().map(|r| r.name).collect()
}

/// Why a step failed, and whether another host might succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub message: String,
    pub reschedulable: bool,
}

impl StepError {
    pub fn new(message: impl Into<String>, reschedulable: bool) -> Self {
        Self {
            message: message.into(),
            reschedulable,
        }
    }
}

/// What the steps work on.
pub struct Ctx<'a> {
    pub host: &'a str,
    pub id: Uuid,
    pub spec: &'a pb::BuildSpec,
    pub dir: PathBuf,
    pub libvirt: &'a Libvirt,
}

/// The server's own directory under the agent's state directory.
pub fn server_dir(state_dir: &Path, id: Uuid) -> PathBuf {
    state_dir.join("servers").join(id.to_string())
}

pub fn disk_path(dir: &Path) -> PathBuf {
    dir.join("disk.qcow2")
}

pub fn config_drive_path(dir: &Path) -> PathBuf {
    dir.join("config-drive")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::libvirt::VirtError> + Send + 'static,
) -> Result<T, StepError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        // A hypervisor failure on this host may not happen on another.
        Ok(Err(e)) => Err(StepError::new(format!("libvirt: {e}"), true)),
        Err(e) => Err(StepError::new(format!("libvirt call panicked: {e}"), true)),
    }
}

fn io(what: &str, e: std::io::Error) -> StepError {
    StepError::new(format!("{what}: {e}"), true)
}

async fn remove_file(p: &Path) -> Result<(), StepError> {
    match tokio::fs::remove_file(p).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", e)),
    }
}

async fn remove_dir(p: &Path) -> Result<(), StepError> {
    match tokio::fs::remove_dir_all(p).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", e)),
    }
}

/// Writes `data` to `path` unless it already holds exactly that.
async fn write_once(path: &Path, data: &[u8]) -> Result<(), StepError> {
    if let Ok(existing) = tokio::fs::read(path).await
        && existing == data
    {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io("create directory", e))?;
    }
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, data)
        .await
        .map_err(|e| io("write", e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| io("rename", e))
}

impl Step {
    pub async fn run(self, c: &Ctx<'_>) -> Result<(), StepError> {
        match self {
            Step::Claim => {
                if c.spec.host != c.host {
                    return Err(StepError::new(
                        format!("the server is placed on {}, not {}", c.spec.host, c.host),
                        false,
                    ));
                }
                Ok(())
            }
            Step::Image => {
                // The test driver boots nothing: the overlay records its
                // base. The real-guest build (qemu-img create -b <cached
                // base>) replaces this body; the step and its undo stay.
                let body = format!("cirrus overlay of image {}\n", c.spec.image_id);
                write_once(&disk_path(&c.dir), body.as_bytes()).await
            }
            Step::Ports => {
                if c.spec.networks.is_empty() {
                    return Ok(());
                }
                Err(StepError::new(
                    format!(
                        "networking is not available on host {}: the network service has not joined this build yet",
                        c.host
                    ),
                    false,
                ))
            }
            Step::Volumes => {
                if c.spec.volumes.is_empty() {
                    return Ok(());
                }
                Err(StepError::new(
                    format!(
                        "volumes are not available on host {}: the volume service has not joined this build yet",
                        c.host
                    ),
                    false,
                ))
            }
            Step::ConfigDrive => {
                let root = config_drive_path(&c.dir).join("openstack").join("latest");
                let meta = serde_json::json!({
                    "uuid": c.id.to_string(),
                    "name": c.spec.name,
                    "hostname": c.spec.name,
                    "project_id": c.spec.project_id,
                    "availability_zone": "nova",
                    "meta": c.spec.metadata,
                    "public_keys": if c.spec.key_name.is_empty() {
                        serde_json::json!({})
                    } else {
                        serde_json::json!({ c.spec.key_name.clone(): c.spec.public_key })
                    },
                });
                let meta = serde_json::to_vec_pretty(&meta)
                    .map_err(|e| StepError::new(format!("meta_data.json: {e}"), false))?;
                write_once(&root.join("meta_data.json"), &meta).await?;
                write_once(
                    &root.join("network_data.json"),
                    br#"{"links": [], "networks": [], "services": []}"#,
                )
                .await?;
                if !c.spec.user_data.is_empty() {
                    write_once(&root.join("user_data"), &c.spec.user_data).await?;
                }
                Ok(())
            }
            Step::DefinePaused => {
                let spec = DomainSpec {
                    id: c.id,
                    vcpus: c.spec.vcpus.max(1),
                    ram_mb: c.spec.ram_mb.max(16),
                    disk: disk_path(&c.dir).display().to_string(),
                    config_drive: None,
                };
                let lv = c.libvirt.clone();
                blocking(move || lv.define_start_paused(&spec)).await
            }
            Step::WaitVifPlugged => Ok(()),
            Step::Resume => {
                let lv = c.libvirt.clone();
                let id = c.id;
                blocking(move || lv.unpause(id)).await
            }
        }
    }

    pub async fn undo(self, c: &Ctx<'_>) -> Result<(), StepError> {
        match self {
            Step::Claim | Step::Ports | Step::Volumes | Step::WaitVifPlugged | Step::Resume => {
                Ok(())
            }
            Step::Image => {
                remove_file(&disk_path(&c.dir)).await?;
                // The directory goes with its last file.
                match tokio::fs::remove_dir(&c.dir).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(_) => Ok(()),
                }
            }
            Step::ConfigDrive => remove_dir(&config_drive_path(&c.dir)).await,
            Step::DefinePaused => {
                let lv = c.libvirt.clone();
                let id = c.id;
                blocking(move || lv.destroy(id)).await
            }
        }
    }
}

/// Runs every undo of `done`, last first; returns the first undo failure
/// (after trying them all).
pub async fn unwind(done: &[Step], c: &Ctx<'_>) -> Result<(), StepError> {
    let mut first = None;
    for step in done.iter().rev() {
        if let Err(e) = step.undo(c).await {
            tracing::warn!(server = %c.id, ?step, error = %e.message, "undo failed");
            first.get_or_insert(e);
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every step of the table (what a restarted agent unwinds).
pub fn all_steps() -> Vec<Step> {
    BUILD.iter().map(|r| r.step).collect()
}
