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
use crate::libvirt::{Libvirt, Power};
use crate::saga::{self, BUILD, Ctx, Step, StepError};

/// One message on `compute.<host>` (compute-api's `model::Cast`, as JSON).
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
}

impl Cast {
    fn server_id(&self) -> Uuid {
        match self {
            Cast::Build { server_id, .. }
            | Cast::Delete { server_id }
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
}

/// What an action does to libvirt and the states it ends in.
struct ActionPlan {
    task: &'static str,
    vm_state: &'static str,
    power: Power,
}

impl Agent {
    pub fn new(config: Config, libvirt: Libvirt, conductor: Conductor) -> Self {
        let builds = Semaphore::new(config.max_concurrent_builds);
        Self {
            inner: Arc::new(Inner {
                config,
                libvirt,
                conductor,
                locks: Mutex::new(HashMap::new()),
                builds,
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
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
                hypervisor_type: if c.libvirt_uri.starts_with("test:") {
                    "test".into()
                } else {
                    "qemu".into()
                },
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
            Cast::Build { attempt, .. } => {
                let _permit = self
                    .inner
                    .builds
                    .acquire()
                    .await
                    .map_err(|_| Status::unavailable("shutting down"))?;
                self.build(id, attempt).await
            }
            Cast::Delete { .. } => self.delete(id).await,
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

    fn ctx<'a>(&'a self, id: Uuid, spec: &'a pb::BuildSpec) -> Ctx<'a> {
        Ctx {
            host: self.host(),
            id,
            spec,
            dir: self.dir(id),
            libvirt: &self.inner.libvirt,
        }
    }

    /// The build saga: each step of [`BUILD`] in turn under its task state;
    /// on a failure, every undo of what ran, then the failure to conductor
    /// (which releases the claim and reschedules or records the fault).
    async fn build(&self, id: Uuid, attempt: i32) -> Result<(), Status> {
        let spec = self.inner.conductor.build_spec(&id.to_string()).await?;
        if spec.vm_state != "building" || spec.attempt as i32 != attempt {
            tracing::info!(server = %id, vm_state = %spec.vm_state, "stale build cast");
            return Ok(());
        }
        let faults = &self.inner.config.faults;
        let ctx = self.ctx(id, &spec);
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
        }
        Ok(())
    }

    /// Destroys everything the build made (every undo), then tells conductor.
    async fn delete(&self, id: Uuid) -> Result<(), Status> {
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
        let ctx = self.ctx(id, &spec);
        saga::unwind(&saga::all_steps(), &ctx)
            .await
            .map_err(|e| Status::internal(format!("delete failed: {}", e.message)))?;
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
            Cast::Build { .. } | Cast::Delete { .. } => return None,
        })
    }

    async fn action(&self, id: Uuid, cast: &Cast) -> Result<(), Status> {
        let Some(plan) = Self::plan(cast) else {
            return Ok(());
        };
        let lv = self.inner.libvirt.clone();
        let c = cast.clone();
        let done = tokio::task::spawn_blocking(move || match c {
            Cast::Start { .. } | Cast::Resume { .. } => lv.start(id),
            Cast::Stop { .. } => lv.stop(id),
            Cast::Reboot { hard, .. } => lv.reboot(id, hard),
            Cast::Pause { .. } => lv.pause(id),
            Cast::Unpause { .. } => lv.unpause(id),
            Cast::Suspend { .. } => lv.suspend(id),
            Cast::Build { .. } | Cast::Delete { .. } => Ok(()),
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let update = match done {
            Ok(()) => {
                self.console(id, format!("{} done", plan.task)).await;
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
                (_, "deleting") => self.delete(id).await,
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
        let ctx = self.ctx(id, &spec);
        saga::unwind(&saga::all_steps(), &ctx)
            .await
            .map_err(|e| Status::internal(format!("unwinding failed: {}", e.message)))?;
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
