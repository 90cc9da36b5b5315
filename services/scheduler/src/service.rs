//! One placement: read the server and the candidate hosts, filter, weigh,
//! then claim on the best host with a generation-checked update (a host
//! changed since we read it is re-read and re-checked, never over-committed),
//! record the host and alternates on the server in the same statement
//! (`repo::claim_and_place`: one round trip, all of it or none), and
//! cast `build` to the host's topic.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use compute_api::model::{
    Cast, CastMessage, Host, NO_VALID_HOST, Resources, Server, host_topic, task, vm,
};
use compute_api::repo;
use deadpool_postgres::Pool;
use runtime::error::{Error, Result};
use uuid::Uuid;

use crate::Config;
use crate::filters::{self, Request};

/// Re-reads of one host whose generation moved under us before moving on.
const CLAIM_RETRIES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinations {
    pub host: String,
    pub alternates: Vec<String>,
    pub considered: u32,
    pub passed: u32,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: Config,
    queue: queue_client::Client,
    hosts: Mutex<HostCache>,
}

/// The candidate hosts as last read, with this replica's own claims
/// applied since (Nova's HostState.consume_from_request).
#[derive(Default)]
struct HostCache {
    read_at: Option<Instant>,
    hosts: Vec<Host>,
}

impl HostCache {
    fn fresh(&self, ttl: Duration) -> Option<Vec<Host>> {
        match self.read_at {
            Some(t) if t.elapsed() < ttl => Some(self.hosts.clone()),
            _ => None,
        }
    }

    /// A claim this replica made: the host's usage and generation as the
    /// database now has them (unless another replica moved it too).
    fn claimed(&mut self, name: &str, generation: i64, r: Resources) {
        if let Some(h) = self.hosts.iter_mut().find(|h| h.name == name)
            && h.generation == generation
        {
            h.generation += 1;
            h.vcpus_used += r.vcpus;
            h.ram_mb_used += r.ram_mb;
            h.disk_gb_used += r.disk_gb;
            h.in_flight += 1;
        }
    }

    /// A host re-read after a conflict (or gone: `None` drops it).
    fn refreshed(&mut self, name: &str, fresh: Option<&Host>) {
        match fresh {
            Some(f) => {
                if let Some(h) = self.hosts.iter_mut().find(|h| h.name == name) {
                    *h = f.clone();
                }
            }
            None => self.hosts.retain(|h| h.name != name),
        }
    }
}

impl Scheduler {
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
                hosts: Mutex::new(HostCache::default()),
            }),
        })
    }

    fn down_after(&self) -> f64 {
        self.inner.config.host_down_after_secs as f64
    }

    /// Places the server; the `build` cast carries the caller's `token`.
    pub async fn select(
        &self,
        id: Uuid,
        ignore: &[String],
        dry_run: bool,
        token: String,
    ) -> Result<Destinations> {
        let started = Instant::now();
        let db = self.inner.pool.get().await?;
        let server = repo::get_server(&db, id)
            .await?
            .ok_or_else(|| Error::not_found("server", id))?;
        if server.vm_state != vm::BUILDING || server.task_state.as_deref() != Some(task::SCHEDULING)
        {
            return Err(Error::precondition(format!(
                "server {id} is {} (task {}), not waiting for a host",
                server.vm_state,
                server.task_state.as_deref().unwrap_or("none")
            )));
        }
        let policy = match server.server_group_id {
            Some(g) => repo::get_group(&db, g).await?.map(|g| g.policy),
            None => None,
        };
        let members = match server.server_group_id {
            Some(g) => repo::group_hosts(&db, g, id).await?,
            None => vec![],
        };
        drop(db);
        let mut ignore_set: HashSet<&str> = ignore.iter().map(String::as_str).collect();
        ignore_set.extend(server.tried_hosts.iter().map(String::as_str));
        let req = Request {
            server: &server,
            resources: server.resources(),
            ignore: ignore_set,
            group: policy
                .as_deref()
                .map(|p| (p, members.into_iter().collect())),
        };

        // From the cached view first; when nothing in it can be claimed,
        // once more from the database (a host registered or freed since the
        // view was read is then seen before "no valid host" is said).
        let ttl = Duration::from_millis(self.inner.config.host_cache_ms);
        let mut placed = None;
        let (mut considered, mut passed) = (0, 0);
        for pass in 0..2 {
            let cached = if pass == 0 {
                self.cache().fresh(ttl)
            } else {
                None
            };
            let from_cache = cached.is_some();
            let hosts = match cached {
                Some(h) => h,
                None => {
                    let db = self.inner.pool.get().await?;
                    let h = repo::candidate_hosts(&db, self.down_after()).await?;
                    let mut c = self.cache();
                    c.read_at = Some(Instant::now());
                    c.hosts = h.clone();
                    h
                }
            };
            let mut passing: Vec<_> = hosts
                .iter()
                .filter(|h| filters::check(h, &req).is_ok())
                .collect();
            filters::weigh(&mut passing, &req, &self.inner.config.weights);
            considered = hosts.len() as u32;
            passed = passing.len() as u32;
            let alternates_of = |i: usize| -> Vec<String> {
                passing
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .take(self.inner.config.alternates)
                    .map(|(_, h)| h.name.clone())
                    .collect()
            };
            for (i, h) in passing.iter().enumerate() {
                let alternates = alternates_of(i);
                if self
                    .try_claim(&server, &req, &h.name, h.generation, &alternates)
                    .await?
                {
                    placed = Some((h.name.clone(), alternates));
                    break;
                }
            }
            if placed.is_some() || !from_cache {
                break;
            }
        }
        metrics::histogram!("scheduler_decision_seconds").record(started.elapsed().as_secs_f64());
        let Some((host, alternates)) = placed else {
            self.no_valid_host(&server).await?;
            return Err(Error::exhausted(NO_VALID_HOST));
        };
        if !dry_run {
            let cast = CastMessage {
                cast: Cast::Build {
                    server_id: id,
                    attempt: server.attempt + 1,
                },
                token,
            };
            if let Err(s) = self.inner.queue.cast_json(&host_topic(&host), &cast).await {
                self.fail(&server, 500, "could not reach the chosen host's queue")
                    .await?;
                return Err(Error::unavailable(format!("queue: {s}")));
            }
        }
        tracing::debug!(server = %id, %host, ?alternates, considered, passed, "placed");
        Ok(Destinations {
            host,
            alternates,
            considered,
            passed,
        })
    }

    /// Claims on `host` at `generation`; when another claim moved it, re-reads
    /// the host and tries again while it still passes the filters.
    async fn try_claim(
        &self,
        server: &Server,
        req: &Request<'_>,
        host: &str,
        mut generation: i64,
        alternates: &[String],
    ) -> Result<bool> {
        for _ in 0..CLAIM_RETRIES {
            let mut db = self.inner.pool.get().await?;
            let placement = match server.server_group_id {
                // Members of one group are placed one at a time, so that the
                // (anti-)affinity checked here is the one that commits.
                Some(g) => {
                    let tx = db.transaction().await?;
                    repo::lock_group(&tx, g).await?;
                    let members: HashSet<String> = repo::group_hosts(&tx, g, server.id)
                        .await?
                        .into_iter()
                        .collect();
                    let fresh = Request {
                        group: req.group.as_ref().map(|(p, _)| (*p, members)),
                        ..req.clone()
                    };
                    let Some(h) = repo::get_host(&tx, host, self.down_after()).await? else {
                        return Ok(false);
                    };
                    if filters::check(&h, &fresh).is_err() {
                        return Ok(false);
                    }
                    generation = h.generation;
                    let p = repo::claim_and_place(
                        &tx,
                        server.id,
                        host,
                        generation,
                        req.resources,
                        self.down_after(),
                        alternates,
                    )
                    .await?;
                    if p == repo::Placement::Placed {
                        tx.commit().await?;
                    }
                    p
                }
                // Claim, host and alternates in one statement: one round trip.
                None => {
                    repo::claim_and_place(
                        &db,
                        server.id,
                        host,
                        generation,
                        req.resources,
                        self.down_after(),
                        alternates,
                    )
                    .await?
                }
            };
            match placement {
                repo::Placement::Placed => {
                    self.cache().claimed(host, generation, req.resources);
                    return Ok(true);
                }
                repo::Placement::ServerGone => {
                    // Deleted (or timed out) while we chose: nothing was written.
                    return Err(Error::precondition(format!(
                        "server {} is no longer waiting for a host",
                        server.id
                    )));
                }
                repo::Placement::HostMoved => {}
            }
            let fresh = repo::get_host(&db, host, self.down_after()).await?;
            self.cache().refreshed(host, fresh.as_ref());
            let Some(h) = fresh else {
                return Ok(false);
            };
            if !h.enabled || !h.up {
                return Ok(false);
            }
            if filters::check(&h, req).is_err() {
                return Ok(false);
            }
            generation = h.generation;
            metrics::counter!("scheduler_claim_conflicts_total").increment(1);
        }
        Ok(false)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HostCache> {
        // A panic while holding it cannot leave the view half-written in a
        // way that matters: every claim is re-checked by the database.
        self.inner
            .hosts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn no_valid_host(&self, server: &Server) -> Result<()> {
        tracing::info!(server = %server.id, "no valid host");
        self.fail(server, 500, NO_VALID_HOST).await
    }

    async fn fail(&self, server: &Server, code: i32, message: &str) -> Result<()> {
        let mut db = self.inner.pool.get().await?;
        let tx = db.transaction().await?;
        repo::release_claim(&tx, server.id).await?;
        repo::change_server(
            &tx,
            server.id,
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
        tx.commit().await?;
        Ok(())
    }
}
