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
use std::sync::Mutex;
use std::time::Duration;

use proto::conductor::v1 as pb;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clients::Services;
use crate::images::ImageCache;
use crate::libvirt::Libvirt;

use crate::steps;

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

/// What the host gives every build: the other services, the image cache,
/// the settings the steps need.
pub struct Env {
    pub services: Services,
    pub cache: ImageCache,
    pub availability_zone: String,
    /// How long `wait_vif_plugged` waits for every port to be ACTIVE.
    pub vif_plug_timeout: Duration,
    /// The kernel command line of a direct kernel boot without `os_command_line`.
    pub kernel_cmdline: String,
}

/// What the build made that its undo (possibly after a restart) must find:
/// `build.json` in the server's directory, rewritten after each change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Journal {
    /// The cached base the overlay stands on (kept from eviction).
    pub base: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub ramdisk: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub ports: Vec<PortRecord>,
    pub attachments: Vec<AttachmentRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PortRecord {
    pub id: String,
    pub network_id: String,
    /// Made by this build (deleted by its undo) rather than given.
    pub created: bool,
    pub bound: bool,
    pub mac: String,
    pub bridge: String,
    pub interface_id: String,
    pub fixed_ips: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttachmentRecord {
    pub id: String,
    pub volume_id: String,
    pub path: String,
    pub format: String,
    pub dev: String,
    /// The root disk (boot from volume).
    pub boot: bool,
    /// Whether the volume service was told the disk is plugged in.
    pub completed: bool,
}

/// What the steps work on.
pub struct Ctx<'a> {
    pub host: &'a str,
    pub id: Uuid,
    pub spec: &'a pb::BuildSpec,
    pub dir: PathBuf,
    pub libvirt: &'a Libvirt,
    pub env: &'a Env,
    /// The user's token from the cast, if it carried one.
    pub token: Option<&'a str>,
    pub journal: Mutex<Journal>,
}

impl Ctx<'_> {
    /// The test driver boots nothing: no image bytes, no ISO.
    pub fn simulated(&self) -> bool {
        self.libvirt.domain_type() == "test"
    }

    pub fn journal(&self) -> Journal {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the journal and writes it down before going on.
    pub async fn record(&self, f: impl FnOnce(&mut Journal)) -> Result<(), StepError> {
        let j = {
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut j);
            j.clone()
        };
        save_journal(&self.dir, &j).await
    }
}

pub fn journal_path(dir: &Path) -> PathBuf {
    dir.join("build.json")
}

/// The journal of a server directory (empty when there is none).
pub fn load_journal(dir: &Path) -> Journal {
    std::fs::read(journal_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

async fn save_journal(dir: &Path, j: &Journal) -> Result<(), StepError> {
    let bytes =
        serde_json::to_vec_pretty(j).map_err(|e| StepError::new(format!("journal: {e}"), false))?;
    write_file(&journal_path(dir), &bytes).await
}

/// The server's own directory under the agent's state directory.
pub fn server_dir(state_dir: &Path, id: Uuid) -> PathBuf {
    state_dir.join("servers").join(id.to_string())
}

pub fn disk_path(dir: &Path) -> PathBuf {
    dir.join("disk.qcow2")
}

/// The config drive's files (the ISO is made from them).
pub fn config_drive_path(dir: &Path) -> PathBuf {
    dir.join("config-drive")
}

pub fn config_drive_iso(dir: &Path) -> PathBuf {
    dir.join("config-drive.iso")
}

pub fn console_log_path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

/// The serial port's interactive side (QEMU listens there).
pub fn console_socket_path(dir: &Path) -> PathBuf {
    dir.join("console.sock")
}

/// A Unix socket's path must fit `sun_path` (108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

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
pub async fn write_file(path: &Path, data: &[u8]) -> Result<(), StepError> {
    if let Ok(existing) = tokio::fs::read(path).await
        && existing == data
    {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io("create directory", e))?;
        crate::images::open_dir(parent);
    }
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, data)
        .await
        .map_err(|e| io("write", e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| io("rename", e))
}

/// The guest device of the `n`th virtio disk (0: vda).
pub fn dev_name(n: usize) -> String {
    let n = n.min(25) as u8;
    format!("vd{}", (b'a' + n) as char)
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
            Step::Image => steps::image(c).await,
            Step::Ports => steps::ports(c).await,
            Step::Volumes => steps::volumes(c).await,
            Step::ConfigDrive => steps::config_drive(c).await,
            Step::DefinePaused => {
                let spec = steps::domain_spec(c);
                let lv = c.libvirt.clone();
                blocking(move || lv.define_start_paused(&spec)).await
            }
            Step::WaitVifPlugged => steps::wait_vif_plugged(c).await,
            Step::Resume => {
                let lv = c.libvirt.clone();
                let id = c.id;
                blocking(move || lv.unpause(id)).await
            }
        }
    }

    pub async fn undo(self, c: &Ctx<'_>) -> Result<(), StepError> {
        match self {
            Step::Claim | Step::WaitVifPlugged | Step::Resume => Ok(()),
            Step::Image => {
                remove_file(&disk_path(&c.dir)).await?;
                c.record(|j| {
                    j.base = None;
                    j.kernel = None;
                    j.ramdisk = None;
                })
                .await?;
                Ok(())
            }
            Step::Ports => steps::undo_ports(c).await,
            Step::Volumes => steps::undo_volumes(c).await,
            Step::ConfigDrive => {
                remove_file(&config_drive_iso(&c.dir)).await?;
                remove_dir(&config_drive_path(&c.dir)).await
            }
            Step::DefinePaused => {
                let lv = c.libvirt.clone();
                let id = c.id;
                blocking(move || lv.destroy(id)).await?;
                remove_file(&console_socket_path(&c.dir)).await?;
                remove_file(&console_log_path(&c.dir)).await
            }
        }
    }
}

/// After every undo: the server's directory and everything left in it
/// (journal, console log) goes.
pub async fn remove_server_dir(dir: &Path) -> Result<(), StepError> {
    remove_dir(dir).await
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
