//! The host loop: heal what a crash left, heartbeat, consume the host's
//! topic and do what each cast says — one server at a time per server,
//! many servers at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::conductor::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::Config;
use crate::conductor::Conductor;
use crate::libvirt::{Libvirt, Power, Stopped};
use crate::saga::{self, BUILD, Ctx, Step, StepError};

/// One message on `compute.<host>` (compute-api's `model::Cast`, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Cast {
    /// `token`: the user's token (the request context), for the calls to
    /// image, network and volume; absent in older casts.
    Build {
        server_id: Uuid,
        attempt: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Delete {
        server_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Live attach of a data volume to a server on this host.
    AttachVolume {
        server_id: Uuid,
        volume_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    DetachVolume {
        server_id: Uuid,
        volume_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Start {
        server_id: Uuid,
    },
    Stop {
        server_id: Uuid,
    },
    Reboot {
        server_id: Uuid,
        hard: bool,
    },
    Pause {
        server_id: Uuid,
    },
    Unpause {
        server_id: Uuid,
    },
    Suspend {
        server_id: Uuid,
    },
    Resume {
        server_id: Uuid,
    },
}

impl Cast {
    fn server_id(&self) -> Uuid {
        match self {
            Cast::Build { server_id, .. }
            | Cast::Delete { server_id, .. }
            | Cast::AttachVolume { server_id, .. }
            | Cast::DetachVolume { server_id, .. }
            | Cast::Start { server_id }
            | Cast::Stop { server_id }
            | Cast::Reboot { server_id, .. }
            | Cast::Pause { server_id }
            | Cast::Unpause { server_id }
            | Cast::Suspend { server_id }
            | Cast::Resume { server_id } => *server_id,
        }
    }
}

#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    libvirt: Libvirt,
    conductor: Conductor,
    /// One operation per server at a time.
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    builds: Semaphore,
    env: saga::Env,
    /// How far each server's serial log has been sent to conductor.
    console_sent: Mutex<HashMap<Uuid, u64>>,
}

/// What an action does to libvirt and the states it ends in.
struct ActionPlan {
    task: &'static str,
    vm_state: &'static str,
    power: Power,
}

impl Agent {
    pub fn new(config: Config, libvirt: Libvirt, conductor: Conductor, env: saga::Env) -> Self {
        let builds = Semaphore::new(config.max_concurrent_builds);
        Self {
            inner: Arc::new(Inner {
                config,
                libvirt,
                conductor,
                locks: Mutex::new(HashMap::new()),
                builds,
                env,
                console_sent: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn libvirt(&self) -> &Libvirt {
        &self.inner.libvirt
    }

    /// The server's directory (disk, journal, serial log and socket).
    pub fn server_dir(&self, id: Uuid) -> PathBuf {
        self.dir(id)
    }

    /// Tells conductor where compute-api reaches this host's console.
    pub async fn register_console(&self, endpoint: &str) -> Result<(), Status> {
        self.inner
            .conductor
            .set_agent_endpoint(self.host(), endpoint)
            .await
    }

    fn host(&self) -> &str {
        &self.inner.config.host
    }

    fn dir(&self, id: Uuid) -> PathBuf {
        saga::server_dir(&self.inner.config.state_dir, id)
    }

    fn lock_of(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(id).or_default().clone()
    }

    /// The resources this host offers: configured, else the node's.
    pub async fn heartbeat(&self) -> Result<bool, Status> {
        let c = &self.inner.config;
        let lv = self.inner.libvirt.clone();
        let (cpus, ram) = tokio::task::spawn_blocking(move || lv.node())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("libvirt: {e}")))?;
        let r = self
            .inner
            .conductor
            .heartbeat(pb::HeartbeatRequest {
                host: c.host.clone(),
                vcpus: c.vcpus.unwrap_or(cpus),
                ram_mb: c.ram_mb.unwrap_or(ram),
                disk_gb: c.disk_gb,
                availability_zone: c.availability_zone.clone(),
                // The domain type detected at start (kvm, qemu = TCG, test).
                hypervisor_type: self.inner.libvirt.domain_type().to_string(),
                architecture: "x86_64".into(),
                cpu_allocation_ratio: c.cpu_allocation_ratio,
                ram_allocation_ratio: c.ram_allocation_ratio,
                disk_allocation_ratio: c.disk_allocation_ratio,
            })
            .await?;
        Ok(r.enabled)
    }

    pub async fn heartbeat_forever(self) {
        let every = Duration::from_millis(self.inner.config.heartbeat_interval_ms);
        loop {
            tokio::time::sleep(every).await;
            if let Err(s) = self.heartbeat().await {
                tracing::warn!(status = %s, "heartbeat failed");
            }
        }
    }

    async fn console(&self, id: Uuid, line: String) {
        let text = format!("[{}] {line}\n", time_now());
        if let Err(s) = self.inner.conductor.console(&id.to_string(), text).await {
            tracing::debug!(server = %id, status = %s, "console log append failed");
        }
    }

    /// Handles one cast; errors are logged (a cast is never retried for a
    /// refusal; an unavailable conductor is retried through redelivery).
    pub async fn handle(&self, cast: Cast) -> Result<(), Status> {
        let id = cast.server_id();
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let result = match cast {
            Cast::Build { attempt, token, .. } => {
                let _permit = self
                    .inner
                    .builds
                    .acquire()
                    .await
                    .map_err(|_| Status::unavailable("shutting down"))?;
                self.build(id, attempt, token.as_deref()).await
            }
            Cast::Delete { token, .. } => self.delete(id, token.as_deref()).await,
            Cast::AttachVolume {
                volume_id, token, ..
            } => self.attach_volume(id, &volume_id, token.as_deref()).await,
            Cast::DetachVolume {
                volume_id, token, ..
            } => self.detach_volume(id, &volume_id, token.as_deref()).await,
            other => self.action(id, &other).await,
        };
        match result {
            Err(s)
                if s.code() == Code::PermissionDenied || s.code() == Code::FailedPrecondition =>
            {
                tracing::info!(server = %id, status = %s, "cast no longer applies");
                Ok(())
            }
            other => other,
        }
    }

    fn ctx<'a>(&'a self, id: Uuid, spec: &'a pb::BuildSpec, token: Option<&'a str>) -> Ctx<'a> {
        let dir = self.dir(id);
        Ctx {
            host: self.host(),
            id,
            spec,
            journal: std::sync::Mutex::new(saga::load_journal(&dir)),
            dir,
            libvirt: &self.inner.libvirt,
            env: &self.inner.env,
            token,
        }
    }

    /// The build saga: each step of [`BUILD`] in turn under its task state;
    /// on a failure, every undo of what ran, then the failure to conductor
    /// (which releases the claim and reschedules or records the fault).
    async fn build(&self, id: Uuid, attempt: i32, token: Option<&str>) -> Result<(), Status> {
        let spec = self.inner.conductor.build_spec(&id.to_string()).await?;
        if spec.vm_state != "building" || spec.attempt as i32 != attempt {
            tracing::info!(server = %id, vm_state = %spec.vm_state, "stale build cast");
            return Ok(());
        }
        let faults = &self.inner.config.faults;
        let ctx = self.ctx(id, &spec, token);
        let mut task = spec.task_state.clone();
        let mut done: Vec<Step> = Vec::new();
        let mut failure: Option<StepError> = None;
        for row in &BUILD {
            if row.task != task {
                let moved = self
                    .inner
                    .conductor
                    .update(pb::UpdateServerStateRequest {
                        id: id.to_string(),
                        task_state: row.task.into(),
                        expected_task_state: if task.is_empty() {
                            "none".into()
                        } else {
                            task.clone()
                        },
                        ..Default::default()
                    })
                    .await;
                if let Err(s) = moved {
                    // Deleted, timed out or moved on: unwind, report nothing.
                    tracing::info!(server = %id, status = %s, "build interrupted");
                    let _ = saga::unwind(&done, &ctx).await;
                    let _ = saga::remove_server_dir(&ctx.dir).await;
                    return Ok(());
                }
                task = row.task.to_string();
            }
            if faults.hang_at.as_deref() == Some(row.name) {
                tracing::warn!(server = %id, step = row.name, "fault injection: hanging");
                std::future::pending::<()>().await;
            }
            done.push(row.step);
            let mut r = if faults.fail_at.as_deref() == Some(row.name) {
                Err(StepError::new(
                    format!(
                        "injected failure at step {} on host {}",
                        row.name,
                        self.host()
                    ),
                    faults.reschedulable,
                ))
            } else {
                row.step.run(&ctx).await
            };
            if r.is_ok() && faults.repeat_steps {
                r = row.step.run(&ctx).await;
            }
            if let Err(e) = r {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            tracing::warn!(server = %id, error = %e.message, "build failed; unwinding");
            saga::unwind(&done, &ctx)
                .await
                .map_err(|u| Status::internal(format!("unwinding failed: {}", u.message)))?;
            if faults.repeat_steps {
                saga::unwind(&done, &ctx)
                    .await
                    .map_err(|u| Status::internal(format!("unwinding failed: {}", u.message)))?;
            }
            saga::remove_server_dir(&ctx.dir)
                .await
                .map_err(|u| Status::internal(format!("unwinding failed: {}", u.message)))?;
            self.console(
                id,
                format!("build failed on {}: {}", self.host(), e.message),
            )
            .await;
            self.inner
                .conductor
                .build_result(pb::ReportBuildResultRequest {
                    id: id.to_string(),
                    attempt: attempt as u32,
                    ok: false,
                    fault_code: 500,
                    fault_message: e.message,
                    reschedulable: e.reschedulable,
                    // Carried on to the next host's build cast.
                    token: token.unwrap_or_default().to_string(),
                    ..Default::default()
                })
                .await?;
            return Ok(());
        }
        self.console(
            id,
            format!(
                "domain {} running on host {} ({})",
                crate::libvirt::domain_name(id),
                self.host(),
                self.inner.libvirt.uri
            ),
        )
        .await;
        let outcome = self
            .inner
            .conductor
            .build_result(pb::ReportBuildResultRequest {
                id: id.to_string(),
                attempt: attempt as u32,
                ok: true,
                power_state: "running".into(),
                ..Default::default()
            })
            .await?;
        if outcome.outcome != "active" {
            tracing::info!(server = %id, outcome = %outcome.outcome, "build no longer wanted; unwinding");
            let _ = saga::unwind(&done, &ctx).await;
            let _ = saga::remove_server_dir(&ctx.dir).await;
        }
        Ok(())
    }

    /// Destroys everything the build made (every undo), then tells conductor.
    async fn delete(&self, id: Uuid, token: Option<&str>) -> Result<(), Status> {
        let spec = match self.inner.conductor.build_spec(&id.to_string()).await {
            Ok(s) => s,
            Err(s) if s.code() == Code::PermissionDenied => {
                // Not ours any more (deleted here by compute-api while we were
                // down): clean up the host anyway.
                pb::BuildSpec {
                    server_id: id.to_string(),
                    host: self.host().to_string(),
                    ..Default::default()
                }
            }
            Err(s) => return Err(s),
        };
        let ctx = self.ctx(id, &spec, token);
        saga::unwind(&saga::all_steps(), &ctx)
            .await
            .map_err(|e| Status::internal(format!("delete failed: {}", e.message)))?;
        saga::remove_server_dir(&ctx.dir)
            .await
            .map_err(|e| Status::internal(format!("delete failed: {}", e.message)))?;
        self.forget_console(id);
        if spec.vm_state.is_empty() {
            return Ok(());
        }
        self.inner.conductor.deleted(&id.to_string()).await?;
        Ok(())
    }

    fn plan(cast: &Cast) -> Option<ActionPlan> {
        Some(match cast {
            Cast::Start { .. } => ActionPlan {
                task: "powering-on",
                vm_state: "active",
                power: Power::Running,
            },
            Cast::Stop { .. } => ActionPlan {
                task: "powering-off",
                vm_state: "stopped",
                power: Power::Shutdown,
            },
            Cast::Reboot { hard: false, .. } => ActionPlan {
                task: "rebooting",
                vm_state: "active",
                power: Power::Running,
            },
            Cast::Reboot { hard: true, .. } => ActionPlan {
                task: "rebooting_hard",
                vm_state: "active",
                power: Power::Running,
            },
            Cast::Pause { .. } => ActionPlan {
                task: "pausing",
                vm_state: "paused",
                power: Power::Paused,
            },
            Cast::Unpause { .. } => ActionPlan {
                task: "unpausing",
                vm_state: "active",
                power: Power::Running,
            },
            Cast::Suspend { .. } => ActionPlan {
                task: "suspending",
                vm_state: "suspended",
                power: Power::Suspended,
            },
            Cast::Resume { .. } => ActionPlan {
                task: "resuming",
                vm_state: "active",
                power: Power::Running,
            },
            Cast::Build { .. }
            | Cast::Delete { .. }
            | Cast::AttachVolume { .. }
            | Cast::DetachVolume { .. } => return None,
        })
    }

    async fn action(&self, id: Uuid, cast: &Cast) -> Result<(), Status> {
        let Some(plan) = Self::plan(cast) else {
            return Ok(());
        };
        let lv = self.inner.libvirt.clone();
        let c = cast.clone();
        let stop_timeout = Duration::from_secs(self.inner.config.stop_timeout_secs);
        let mut how = None;
        let done = tokio::task::spawn_blocking(move || match c {
            Cast::Start { .. } | Cast::Resume { .. } => lv.start(id).map(|()| None),
            // ACPI power button, then destroy after the timeout.
            Cast::Stop { .. } => lv.shutdown(id, stop_timeout).map(Some),
            Cast::Reboot { hard, .. } => lv.reboot(id, hard).map(|()| None),
            Cast::Pause { .. } => lv.pause(id).map(|()| None),
            Cast::Unpause { .. } => lv.unpause(id).map(|()| None),
            Cast::Suspend { .. } => lv.suspend(id).map(|()| None),
            Cast::Build { .. }
            | Cast::Delete { .. }
            | Cast::AttachVolume { .. }
            | Cast::DetachVolume { .. } => Ok(None),
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map(|s| how = s);
        let update = match done {
            Ok(()) => {
                let note = match how {
                    Some(Stopped::Clean) => " (the guest shut down on the ACPI power button)",
                    Some(Stopped::Destroyed) => {
                        " (the guest ignored the ACPI power button: destroyed after the timeout)"
                    }
                    Some(Stopped::AlreadyOff) | None => "",
                };
                self.console(id, format!("{} done{note}", plan.task)).await;
                pb::UpdateServerStateRequest {
                    id: id.to_string(),
                    vm_state: plan.vm_state.into(),
                    task_state: "none".into(),
                    power_state: plan.power.as_str().into(),
                    expected_task_state: plan.task.into(),
                }
            }
            Err(e) => {
                tracing::warn!(server = %id, task = plan.task, error = %e, "action failed");
                self.console(id, format!("{} failed: {e}", plan.task)).await;
                let lv = self.inner.libvirt.clone();
                let power = tokio::task::spawn_blocking(move || lv.power(id))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(Power::NoState);
                pb::UpdateServerStateRequest {
                    id: id.to_string(),
                    task_state: "none".into(),
                    power_state: power.as_str().into(),
                    expected_task_state: plan.task.into(),
                    ..Default::default()
                }
            }
        };
        self.inner.conductor.update(update).await?;
        Ok(())
    }

    /// Nova's `_init_instance`: for each server on this host, finish or undo
    /// what a crash interrupted. A build caught mid-way is unwound (every
    /// undo) and reported as failed (not rescheduled: the same cast may be
    /// redelivered, and is then stale); an interrupted delete is finished;
    /// an interrupted power change is done again; the power state of the rest
    /// is read from libvirt.
    pub async fn heal(&self) -> Result<usize, Status> {
        let servers = self.inner.conductor.host_servers(self.host()).await?;
        let mut healed = 0;
        for s in servers {
            let Ok(id) = Uuid::parse_str(&s.id) else {
                continue;
            };
            let lock = self.lock_of(id);
            let _held = lock.lock().await;
            let r = match (s.vm_state.as_str(), s.task_state.as_str()) {
                (_, "deleting") => self.delete(id, None).await,
                ("building", _) => self.abandon_build(id).await,
                (_, t) if !t.is_empty() => {
                    let cast = match t {
                        "powering-on" => Some(Cast::Start { server_id: id }),
                        "powering-off" => Some(Cast::Stop { server_id: id }),
                        "rebooting" => Some(Cast::Reboot {
                            server_id: id,
                            hard: false,
                        }),
                        "rebooting_hard" => Some(Cast::Reboot {
                            server_id: id,
                            hard: true,
                        }),
                        "pausing" => Some(Cast::Pause { server_id: id }),
                        "unpausing" => Some(Cast::Unpause { server_id: id }),
                        "suspending" => Some(Cast::Suspend { server_id: id }),
                        "resuming" => Some(Cast::Resume { server_id: id }),
                        _ => None,
                    };
                    match cast {
                        Some(c) => self.action(id, &c).await,
                        None => Ok(()),
                    }
                }
                _ => self.sync_power(id, &s.power_state).await,
            };
            match r {
                Ok(()) => healed += 1,
                Err(e) => tracing::warn!(server = %id, status = %e, "healing failed"),
            }
        }
        Ok(healed)
    }

    async fn abandon_build(&self, id: Uuid) -> Result<(), Status> {
        let spec = self.inner.conductor.build_spec(&id.to_string()).await?;
        let ctx = self.ctx(id, &spec, None);
        saga::unwind(&saga::all_steps(), &ctx)
            .await
            .map_err(|e| Status::internal(format!("unwinding failed: {}", e.message)))?;
        let _ = saga::remove_server_dir(&ctx.dir).await;
        self.inner
            .conductor
            .build_result(pb::ReportBuildResultRequest {
                id: id.to_string(),
                attempt: spec.attempt,
                ok: false,
                fault_code: 500,
                fault_message: format!(
                    "build interrupted: the compute agent on {} restarted",
                    self.host()
                ),
                reschedulable: false,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Live attach of a data volume (the cast's agent side): the volume is
    /// reserved and connected, plugged into the running guest and its
    /// definition (libvirt live + config), then completed; a failed plug
    /// rolls the attachment back. The end goes to conductor (the server's
    /// volume mapping); if conductor no longer wants it (stale), it is undone.
    async fn attach_volume(
        &self,
        id: Uuid,
        volume_id: &str,
        token: Option<&str>,
    ) -> Result<(), Status> {
        let spec = self.inner.conductor.build_spec(&id.to_string()).await?;
        let ctx = self.ctx(id, &spec, token);
        let report = match crate::steps::attach_volume(&ctx, volume_id).await {
            Ok(rec) => {
                self.console(
                    id,
                    format!("volume {volume_id} attached as /dev/{}", rec.dev),
                )
                .await;
                pb::ReportVolumeAttachmentRequest {
                    server_id: id.to_string(),
                    volume_id: volume_id.to_string(),
                    op: "attach".into(),
                    ok: true,
                    device: rec.dev,
                    attachment_id: rec.id,
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::warn!(server = %id, volume = volume_id, error = %e.message, "attach failed");
                self.console(
                    id,
                    format!("attaching volume {volume_id} failed: {}", e.message),
                )
                .await;
                pb::ReportVolumeAttachmentRequest {
                    server_id: id.to_string(),
                    volume_id: volume_id.to_string(),
                    op: "attach".into(),
                    ok: false,
                    fault_message: e.message,
                    ..Default::default()
                }
            }
        };
        let ok = report.ok;
        let outcome = self.inner.conductor.volume_result(report).await?;
        if ok && outcome == "stale" {
            tracing::info!(server = %id, volume = volume_id, "attach no longer wanted; detaching");
            let _ = crate::steps::detach_volume(&ctx, volume_id).await;
        }
        Ok(())
    }

    async fn detach_volume(
        &self,
        id: Uuid,
        volume_id: &str,
        token: Option<&str>,
    ) -> Result<(), Status> {
        let spec = self.inner.conductor.build_spec(&id.to_string()).await?;
        let ctx = self.ctx(id, &spec, token);
        let (ok, fault) = match crate::steps::detach_volume(&ctx, volume_id).await {
            Ok(()) => {
                self.console(id, format!("volume {volume_id} detached"))
                    .await;
                (true, String::new())
            }
            Err(e) => {
                tracing::warn!(server = %id, volume = volume_id, error = %e.message, "detach failed");
                self.console(
                    id,
                    format!("detaching volume {volume_id} failed: {}", e.message),
                )
                .await;
                (false, e.message)
            }
        };
        self.inner
            .conductor
            .volume_result(pb::ReportVolumeAttachmentRequest {
                server_id: id.to_string(),
                volume_id: volume_id.to_string(),
                op: "detach".into(),
                ok,
                fault_message: fault,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    fn forget_console(&self, id: Uuid) {
        self.inner
            .console_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Sends what each guest wrote on its serial port since the last round
    /// to conductor, which keeps the tail `console-log` answers with. The
    /// position sent so far is kept beside the log (`console.sent`), so a
    /// restarted agent does not send the same output twice.
    pub async fn console_forever(self) {
        let every = Duration::from_millis(self.inner.config.console_poll_ms);
        loop {
            tokio::time::sleep(every).await;
            let servers = self.inner.config.state_dir.join("servers");
            let Ok(mut rd) = tokio::fs::read_dir(&servers).await else {
                continue;
            };
            while let Ok(Some(e)) = rd.next_entry().await {
                let Some(id) = e.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                    continue;
                };
                self.send_console(id, &e.path()).await;
            }
        }
    }

    async fn send_console(&self, id: Uuid, dir: &std::path::Path) {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        const CHUNK: u64 = 16 * 1024;
        let log = saga::console_log_path(dir);
        let Ok(meta) = tokio::fs::metadata(&log).await else {
            return;
        };
        let marker = dir.join("console.sent");
        let known = self
            .inner
            .console_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied();
        let mut sent = match known {
            Some(n) => n,
            None => tokio::fs::read_to_string(&marker)
                .await
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
        };
        if meta.len() < sent {
            sent = 0; // the log was replaced
        }
        while meta.len() > sent {
            let Ok(mut f) = tokio::fs::File::open(&log).await else {
                return;
            };
            if f.seek(std::io::SeekFrom::Start(sent)).await.is_err() {
                return;
            }
            let want = (meta.len() - sent).min(CHUNK) as usize;
            let mut buf = vec![0u8; want];
            let Ok(n) = f.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let text = console_text(&buf);
            if let Err(s) = self.inner.conductor.console(&id.to_string(), text).await {
                // A refusal of this chunk would stall the log for ever if it
                // were retried: skip it. Anything else is tried again next round.
                if s.code() == tonic::Code::InvalidArgument {
                    tracing::warn!(server = %id, status = %s, "console output refused; skipped");
                } else {
                    tracing::debug!(server = %id, status = %s, "console log append failed");
                    break;
                }
            }
            sent += n as u64;
        }
        self.inner
            .console_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, sent);
        let _ = tokio::fs::write(&marker, sent.to_string()).await;
    }

    /// Nova's `_sync_power_states`: every interval, each server of this host
    /// with no task in progress has its power state compared with libvirt's;
    /// an `active` guest that died or was destroyed behind the cloud's back
    /// is recorded `stopped`.
    pub async fn power_sync_forever(self) {
        let ms = self.inner.config.power_sync_interval_ms;
        if ms == 0 {
            return;
        }
        let every = Duration::from_millis(ms);
        loop {
            tokio::time::sleep(every).await;
            let servers = match self.inner.conductor.host_servers(self.host()).await {
                Ok(s) => s,
                Err(s) => {
                    tracing::debug!(status = %s, "power sync: cannot list servers");
                    continue;
                }
            };
            for s in servers {
                let Ok(id) = Uuid::parse_str(&s.id) else {
                    continue;
                };
                if !s.task_state.is_empty() || s.vm_state == "building" {
                    continue;
                }
                let lock = self.lock_of(id);
                let Ok(_held) = lock.try_lock() else {
                    continue; // an operation is running: it reports its own state
                };
                if let Err(e) = self.sync_vm_state(id, &s.vm_state, &s.power_state).await {
                    tracing::debug!(server = %id, status = %e, "power sync failed");
                }
            }
        }
    }

    async fn sync_vm_state(&self, id: Uuid, vm_state: &str, recorded: &str) -> Result<(), Status> {
        let lv = self.inner.libvirt.clone();
        let power = tokio::task::spawn_blocking(move || lv.power(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("libvirt: {e}")))?;
        let dead = matches!(power, Power::Shutdown | Power::Crashed | Power::NoState);
        if vm_state == "active" && dead {
            tracing::warn!(server = %id, power = power.as_str(), "the guest stopped behind the cloud's back");
            self.console(
                id,
                format!(
                    "the guest is {} on host {}: recorded stopped",
                    power.as_str(),
                    self.host()
                ),
            )
            .await;
            self.inner
                .conductor
                .update(pb::UpdateServerStateRequest {
                    id: id.to_string(),
                    vm_state: "stopped".into(),
                    power_state: power.as_str().into(),
                    expected_task_state: "none".into(),
                    ..Default::default()
                })
                .await?;
            return Ok(());
        }
        if power.as_str() != recorded && vm_state != "stopped" {
            self.inner
                .conductor
                .update(pb::UpdateServerStateRequest {
                    id: id.to_string(),
                    power_state: power.as_str().into(),
                    expected_task_state: "none".into(),
                    ..Default::default()
                })
                .await?;
        }
        Ok(())
    }

    async fn sync_power(&self, id: Uuid, recorded: &str) -> Result<(), Status> {
        let lv = self.inner.libvirt.clone();
        let power = tokio::task::spawn_blocking(move || lv.power(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("libvirt: {e}")))?;
        if power.as_str() != recorded {
            self.inner
                .conductor
                .update(pb::UpdateServerStateRequest {
                    id: id.to_string(),
                    power_state: power.as_str().into(),
                    expected_task_state: "none".into(),
                    ..Default::default()
                })
                .await?;
        }
        Ok(())
    }
}

fn time_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

/// A guest's serial output as text the console log keeps: its shell writes
/// terminal escapes (`ESC [6n`) and carriage returns, and conductor keeps
/// text without control characters, so all but newlines and tabs go.
fn console_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::console_text;

    #[test]
    fn console_text_keeps_lines_and_drops_terminal_controls() {
        let raw = b"/ # \x1b[6nCIRRUS-GUEST ip=10.0.0.5/24\r\n\tok\x07\x00\n";
        assert_eq!(
            console_text(raw),
            "/ # [6nCIRRUS-GUEST ip=10.0.0.5/24\n\tok\n"
        );
    }
}
