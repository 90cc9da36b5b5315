//! Conductor's domain: every method first turns the caller's SPIFFE id into
//! the host it speaks for, then touches only servers placed on that host.
//!
//! A build's end is decided here: `active`; or, on a reschedulable fault,
//! its claim released and the build moved to the next alternate that still
//! fits (generation-checked, as the scheduler claims), cast again, up to
//! `max_attempts` in all; else `error` with the last fault. The sweeper sends
//! builds that outlive `build_timeout_secs` to `error` and releases their
//! claims.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use compute_api::model::*;
use compute_api::repo;
use deadpool_postgres::Pool;
use runtime::caller::Caller;
use runtime::error::{Error, Result};
use uuid::Uuid;

use crate::Config;

/// The console log tail kept per server.
const CONSOLE_LOG_MAX: i32 = 64 * 1024;

/// The host a caller's SPIFFE id speaks for:
/// `spiffe://<trust domain>/svc/compute-agent/host/<h>`.
pub fn agent_host(c: &Caller, trust_domain: &str) -> Result<String> {
    let refuse = || Error::forbidden("only a compute agent may call conductor");
    let peer = c.peer.as_deref().ok_or_else(refuse)?;
    let rest = peer
        .strip_prefix("spiffe://")
        .and_then(|r| r.strip_prefix(trust_domain))
        .and_then(|r| r.strip_prefix("/svc/compute-agent/host/"))
        .ok_or_else(refuse)?;
    if rest.is_empty() || rest.contains('/') {
        return Err(refuse());
    }
    Ok(rest.to_string())
}

fn not_yours(id: Uuid, host: &str) -> Error {
    Error::forbidden(format!("server {id} is not on host {host}"))
}

/// What an agent may set.
#[derive(Debug, Clone, Default)]
pub struct StateUpdate {
    pub vm_state: Option<String>,
    /// Some(None) clears the task.
    pub task_state: Option<Option<String>>,
    pub power_state: Option<String>,
    /// Some(None): only while no task runs.
    pub expected_task_state: Option<Option<String>>,
}

#[derive(Debug, Clone)]
pub struct BuildResult {
    pub id: Uuid,
    pub attempt: i32,
    pub ok: bool,
    pub power_state: Option<String>,
    pub fault_code: i32,
    pub fault_message: String,
    pub reschedulable: bool,
    /// The build cast's token, carried on to the next host.
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Active,
    Rescheduled(String),
    Error,
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeOp {
    Attach,
    Detach,
}

#[derive(Debug, Clone)]
pub struct VolumeResult {
    pub server_id: Uuid,
    pub volume_id: Uuid,
    pub op: VolumeOp,
    pub ok: bool,
    pub device: String,
    pub attachment_id: String,
    pub fault_message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeOutcome {
    Attached,
    Detached,
    Failed,
    Stale,
}

#[derive(Clone)]
pub struct Conductor {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: Config,
    queue: queue_client::Client,
}

impl Conductor {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let pool = runtime::db::pool(
            &config.database.url,
            &config.database.schema,
            config.database.pool_size,
        )?;
        let queue = match queue_client::Client::through_sidecar(
            config.sidecar_outbound_socket.as_deref(),
            config.sidecar_outbound,
        ) {
            Some(q) => q?,
            None => queue_client::Client::connect_lazy(&config.queue_url)?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                queue,
            }),
        })
    }

    pub fn host_of(&self, c: &Caller) -> Result<String> {
        agent_host(c, &self.inner.config.trust_domain)
    }

    fn down_after(&self) -> f64 {
        self.inner.config.host_down_after_secs as f64
    }

    /// The server, if it is placed on `host`; PERMISSION_DENIED otherwise
    /// (also for one that does not exist: no oracle for other hosts).
    async fn own_server(&self, host: &str, id: Uuid) -> Result<Server> {
        let db = self.inner.pool.get().await?;
        match repo::get_server(&db, id).await? {
            Some(s) if s.host.as_deref() == Some(host) => Ok(s),
            _ => Err(not_yours(id, host)),
        }
    }

    pub async fn heartbeat(&self, c: &Caller, report: HostReport) -> Result<bool> {
        let host = self.host_of(c)?;
        if report.name != host {
            return Err(Error::forbidden(format!(
                "host {host} may not report for host {}",
                report.name
            )));
        }
        let db = self.inner.pool.get().await?;
        repo::heartbeat(&db, &report).await
    }

    pub async fn build_spec(&self, c: &Caller, id: Uuid) -> Result<Server> {
        let host = self.host_of(c)?;
        self.own_server(&host, id).await
    }

    pub async fn update_state(&self, c: &Caller, id: Uuid, u: StateUpdate) -> Result<Server> {
        let host = self.host_of(c)?;
        // One statement: the guard holds the host check (a miss is explained
        // below with a read, off the common path).
        let db = self.inner.pool.get().await?;
        let task = u.task_state.as_ref().map(|t| t.as_deref());
        let expected = u.expected_task_state.as_ref().map(|t| t.as_deref());
        let changed = repo::change_server(
            &db,
            id,
            &repo::Change {
                vm_state: u.vm_state.as_deref(),
                task_state: task,
                power_state: u.power_state.as_deref(),
                ..Default::default()
            },
            &repo::Guard {
                vm_states: Some(&[
                    vm::BUILDING,
                    vm::ACTIVE,
                    vm::STOPPED,
                    vm::PAUSED,
                    vm::SUSPENDED,
                    vm::ERROR,
                ]),
                task_state: expected,
                host: Some(&host),
                ..Default::default()
            },
        )
        .await?;
        match changed {
            Some(s) => Ok(s),
            None => {
                drop(db);
                let now = self.own_server(&host, id).await?;
                if now.vm_state == vm::DELETED {
                    return Err(Error::precondition(format!("server {id} is deleted")));
                }
                Err(Error::precondition(format!(
                    "server {id} is {} with task {}",
                    now.vm_state,
                    now.task_state.as_deref().unwrap_or("none")
                )))
            }
        }
    }

    pub async fn build_result(&self, c: &Caller, r: BuildResult) -> Result<Outcome> {
        let host = self.host_of(c)?;
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        let Some(s) = repo::lock_server(&tx, r.id)
            .await?
            .filter(|s| s.host.as_deref() == Some(host.as_str()))
        else {
            return Err(not_yours(r.id, &host));
        };
        let current = s.host.as_deref() == Some(host.as_str())
            && s.vm_state == vm::BUILDING
            && s.attempt == r.attempt
            && s.task_state.as_deref() != Some(task::DELETING);
        if !current {
            return Ok(Outcome::Stale);
        }
        if r.ok {
            repo::change_server(
                &tx,
                r.id,
                &repo::Change {
                    vm_state: Some(vm::ACTIVE),
                    task_state: Some(None),
                    power_state: Some(r.power_state.as_deref().unwrap_or(power::RUNNING)),
                    fault: Some(None),
                    launched: true,
                    ..Default::default()
                },
                &repo::Guard::default(),
            )
            .await?;
            repo::build_ended(&tx, &host, false).await?;
            tx.commit().await?;
            metrics::counter!("conductor_builds_total", "outcome" => "active").increment(1);
            return Ok(Outcome::Active);
        }

        repo::release_claim(&tx, r.id).await?;
        repo::build_ended(&tx, &host, true).await?;
        if r.reschedulable
            && s.attempt < self.inner.config.max_attempts
            && let Some(next) = self.claim_alternate(&tx, &s).await?
        {
            tx.commit().await?;
            let cast = CastMessage {
                cast: Cast::Build {
                    server_id: r.id,
                    attempt: s.attempt + 1,
                },
                token: r.token.clone(),
            };
            if let Err(e) = self.inner.queue.cast_json(&host_topic(&next), &cast).await {
                tracing::warn!(server = %r.id, status = %e, "reschedule cast failed");
                self.to_error(r.id, 500, "could not reach the next host's queue")
                    .await?;
                return Ok(Outcome::Error);
            }
            tracing::info!(server = %r.id, from = %host, to = %next, "rescheduled");
            metrics::counter!("conductor_builds_total", "outcome" => "rescheduled").increment(1);
            return Ok(Outcome::Rescheduled(next));
        }
        let message = if r.fault_message.is_empty() {
            "build failed".to_string()
        } else {
            r.fault_message.clone()
        };
        let code = if r.fault_code == 0 { 500 } else { r.fault_code };
        repo::change_server(
            &tx,
            r.id,
            &repo::Change {
                vm_state: Some(vm::ERROR),
                task_state: Some(None),
                power_state: Some(power::NOSTATE),
                fault: Some(Some((code, &message))),
                ..Default::default()
            },
            &repo::Guard::default(),
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("conductor_builds_total", "outcome" => "error").increment(1);
        Ok(Outcome::Error)
    }

    /// Claims the first alternate that still fits and moves the server to it.
    async fn claim_alternate(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        s: &Server,
    ) -> Result<Option<String>> {
        let (policy, members): (Option<String>, HashSet<String>) = match s.server_group_id {
            Some(g) => {
                repo::lock_group(tx, g).await?;
                let p = repo::get_group(tx, g).await?.map(|g| g.policy);
                (
                    p,
                    repo::group_hosts(tx, g, s.id).await?.into_iter().collect(),
                )
            }
            None => (None, HashSet::new()),
        };
        for (i, alt) in s.alternates.iter().enumerate() {
            if s.tried_hosts.contains(alt) {
                continue;
            }
            match policy.as_deref() {
                Some("anti-affinity") if members.contains(alt) => continue,
                Some("affinity") if !members.is_empty() && !members.contains(alt) => continue,
                _ => {}
            }
            let Some(h) = repo::get_host(tx, alt, self.down_after()).await? else {
                continue;
            };
            if !h.enabled || !h.up {
                continue;
            }
            if repo::claim(
                tx,
                s.id,
                alt,
                h.generation,
                s.resources(),
                self.down_after(),
            )
            .await?
            {
                let rest: Vec<String> = s.alternates[i + 1..].to_vec();
                if repo::replace_server(tx, s.id, alt, &rest, s.attempt)
                    .await?
                    .is_some()
                {
                    return Ok(Some(alt.clone()));
                }
                return Ok(None);
            }
        }
        Ok(None)
    }

    async fn to_error(&self, id: Uuid, code: i32, message: &str) -> Result<()> {
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        let s = repo::change_server(
            &tx,
            id,
            &repo::Change {
                vm_state: Some(vm::ERROR),
                task_state: Some(None),
                fault: Some(Some((code, message))),
                ..Default::default()
            },
            &repo::Guard {
                vm_states: Some(&[vm::BUILDING]),
                ..Default::default()
            },
        )
        .await?;
        if s.is_some() {
            repo::release_claim(&tx, id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn deleted(&self, c: &Caller, id: Uuid) -> Result<Server> {
        let host = self.host_of(c)?;
        let s = self.own_server(&host, id).await?;
        if s.vm_state == vm::DELETED {
            return Ok(s);
        }
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        repo::release_claim(&tx, id).await?;
        repo::delete_attachments(&tx, id).await?;
        let s = repo::change_server(
            &tx,
            id,
            &repo::Change {
                vm_state: Some(vm::DELETED),
                task_state: Some(None),
                power_state: Some(power::NOSTATE),
                deleted: true,
                ..Default::default()
            },
            &repo::Guard {
                host: Some(&host),
                ..Default::default()
            },
        )
        .await?
        .ok_or_else(|| not_yours(id, &host))?;
        tx.commit().await?;
        Ok(s)
    }

    pub async fn host_servers(&self, c: &Caller, host: &str) -> Result<Vec<Server>> {
        let me = self.host_of(c)?;
        if me != host {
            return Err(Error::forbidden(format!(
                "host {me} may not list the servers of host {host}"
            )));
        }
        let db = self.inner.pool.get().await?;
        repo::host_servers(&db, host).await
    }

    pub async fn append_console(&self, c: &Caller, id: Uuid, text: &str) -> Result<()> {
        let host = self.host_of(c)?;
        let _ = self.own_server(&host, id).await?;
        let db = self.inner.pool.get().await?;
        repo::append_console(&db, id, text, CONSOLE_LOG_MAX).await
    }

    /// Records the end of an `attach_volume` / `detach_volume` cast.
    pub async fn volume_result(&self, c: &Caller, r: VolumeResult) -> Result<VolumeOutcome> {
        let host = self.host_of(c)?;
        let _ = self.own_server(&host, r.server_id).await?;
        let db = self.inner.pool.get().await?;
        let (id, v) = (r.server_id, r.volume_id);
        let outcome = match (r.op, r.ok) {
            (VolumeOp::Attach, true) => repo::set_attachment(
                &db,
                id,
                v,
                attach::ATTACHING,
                attach::ATTACHED,
                Some(&r.device),
                Some(&r.attachment_id),
            )
            .await?
            .map(|_| VolumeOutcome::Attached),
            (VolumeOp::Attach, false) => repo::delete_attachment(&db, id, v, attach::ATTACHING)
                .await?
                .then_some(VolumeOutcome::Failed),
            (VolumeOp::Detach, true) => repo::delete_attachment(&db, id, v, attach::DETACHING)
                .await?
                .then_some(VolumeOutcome::Detached),
            (VolumeOp::Detach, false) => {
                repo::set_attachment(&db, id, v, attach::DETACHING, attach::ATTACHED, None, None)
                    .await?
                    .map(|_| VolumeOutcome::Failed)
            }
        };
        if !r.ok {
            tracing::warn!(server = %id, volume = %v, op = ?r.op, fault = %r.fault_message, "volume operation failed on the host");
            let text = format!(
                "{} of volume {v} failed on {host}: {}",
                match r.op {
                    VolumeOp::Attach => "attach",
                    VolumeOp::Detach => "detach",
                },
                r.fault_message
            );
            repo::append_console(&db, id, &text, CONSOLE_LOG_MAX).await?;
        }
        Ok(outcome.unwrap_or(VolumeOutcome::Stale))
    }

    pub async fn attachments(&self, c: &Caller, id: Uuid) -> Result<Vec<VolumeAttachment>> {
        let host = self.host_of(c)?;
        let _ = self.own_server(&host, id).await?;
        let db = self.inner.pool.get().await?;
        repo::list_attachments(&db, id).await
    }

    pub async fn set_agent_endpoint(&self, c: &Caller, host: &str, endpoint: &str) -> Result<()> {
        let me = self.host_of(c)?;
        if me != host {
            return Err(Error::forbidden(format!(
                "host {me} may not register the endpoint of host {host}"
            )));
        }
        let db = self.inner.pool.get().await?;
        repo::set_agent_endpoint(&db, host, endpoint).await
    }

    /// Sends builds that outlived the timeout to error, every `sweep_interval_ms`.
    pub async fn sweep_forever(self) {
        let every = Duration::from_millis(self.inner.config.sweep_interval_ms);
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = ?e, "sweep failed");
            }
        }
    }

    pub async fn sweep(&self) -> Result<usize> {
        let timeout = self.inner.config.build_timeout_secs as f64;
        let stuck = {
            let db = self.inner.pool.get().await?;
            repo::timed_out_builds(&db, timeout).await?
        };
        let message = format!(
            "Build of instance timed out after {} seconds",
            self.inner.config.build_timeout_secs
        );
        for s in &stuck {
            tracing::warn!(server = %s.id, host = ?s.host, "build timed out");
            let mut db = self.inner.pool.get().await?;
            let tx = db.transaction().await?;
            let changed = repo::change_server(
                &tx,
                s.id,
                &repo::Change {
                    vm_state: Some(vm::ERROR),
                    task_state: Some(None),
                    fault: Some(Some((500, &message))),
                    ..Default::default()
                },
                &repo::Guard {
                    vm_states: Some(&[vm::BUILDING]),
                    ..Default::default()
                },
            )
            .await?;
            if changed.is_some() {
                repo::release_claim(&tx, s.id).await?;
                if let Some(h) = &s.host {
                    repo::build_ended(&tx, h, true).await?;
                }
            }
            tx.commit().await?;
        }
        Ok(stuck.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use runtime::testing::{member_a, workload};

    #[test]
    fn only_an_agent_s_spiffe_id_names_a_host() {
        let host = |c: &Caller| agent_host(c, "cirrus.local").map_err(|e| e.to_string());
        assert_eq!(
            host(&workload("spiffe://cirrus.local/svc/compute-agent/host/h1")),
            Ok("h1".to_string())
        );
        for bad in [
            "spiffe://cirrus.local/svc/compute-agent/host/",
            "spiffe://cirrus.local/svc/compute-agent/host/h1/x",
            "spiffe://other.domain/svc/compute-agent/host/h1",
            "spiffe://cirrus.local/svc/network-agent/host/h1",
            "spiffe://cirrus.local/svc/compute-agent",
            "external",
        ] {
            assert_eq!(
                host(&workload(bad)),
                Err("only a compute agent may call conductor".to_string()),
                "{bad}"
            );
        }
        assert!(host(&member_a()).is_err());
    }
}
