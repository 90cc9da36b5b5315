//! The queue's domain logic: topics, durable publishing with group commit,
//! and the consumer session that leases, settles and redelivers. No tonic
//! types here: the gRPC adapter validates requests and maps the results.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::{FutureExt, Stream, StreamExt};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use uuid::Uuid;

use crate::Config;
use crate::handoff::{Handed, Registry, Taker};
use crate::model::*;
use crate::policy::{self, Action, Principal};
use crate::repo;
use crate::wake::Wakers;
use runtime::error::{Error, Result};

/// How long a topic looked up by name is trusted before it is read again.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(5);
const TOPIC_CACHE_MAX: usize = 4096;
/// Pending publish requests waiting for a commit slot.
const PUBLISH_QUEUE: usize = 4096;

struct PublishJob {
    topic: Topic,
    messages: Vec<NewMessage>,
    reply: oneshot::Sender<Result<Vec<Published>>>,
}

/// The queue service. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    pool: Pool,
    /// Sessions with `synchronous_commit = off`, for consumer bookkeeping
    /// only (claims, acks, nacks, extensions, notices): a crash may forget
    /// the last few, which means a redelivery, which at-least-once allows.
    /// Nothing that stores a message goes this way.
    relaxed: Pool,
    wakers: Wakers,
    topics: Mutex<HashMap<String, (Topic, Instant)>>,
    publish_tx: mpsc::Sender<PublishJob>,
    /// Topics to NOTIFY the other replicas about (see [`notifier`]).
    notify_tx: mpsc::Sender<Vec<i32>>,
    /// Local consumers that take fresh messages straight from the committers.
    registry: Arc<Registry>,
    /// Names this replica in its NOTIFY payloads (its listener skips them).
    replica: Uuid,
    subscriptions: Arc<Semaphore>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Queue {
    /// Connects, migrates, and starts the committers, the listener and the sweeper.
    pub async fn start(config: Config) -> Result<Self> {
        let pool = runtime::db::pool(
            &config.database.url,
            &config.database.schema,
            config.database.pool_size,
        )
        .map_err(Error::from)?;
        runtime::db::migrate(&pool, &config.database.schema, crate::migrations::runner())
            .await
            .map_err(Error::from)?;
        let relaxed = runtime::db::pool_with(
            &config.database.url,
            &config.database.schema,
            (config.database.pool_size / 2).max(2),
            &[("synchronous_commit", "off")],
        )
        .map_err(Error::from)?;
        let wakers = Wakers::default();
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (notify_tx, notify_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            subscriptions: Arc::new(Semaphore::new(config.max_subscriptions)),
            config: config.clone(),
            pool,
            relaxed,
            wakers: wakers.clone(),
            topics: Mutex::new(HashMap::new()),
            publish_tx,
            notify_tx: notify_tx.clone(),
            registry: Arc::new(Registry::default()),
            replica: Uuid::new_v4(),
            tasks: Mutex::new(Vec::new()),
        });
        let q = Queue { inner };
        let mut tasks = Vec::new();
        let rx = Arc::new(tokio::sync::Mutex::new(publish_rx));
        let commits = Arc::new(InFlight::default());
        let replica = q.inner.replica;
        tasks.push(tokio::spawn(notifier(
            q.inner.relaxed.clone(),
            replica,
            notify_rx,
        )));
        for _ in 0..config.committers.max(1) {
            tasks.push(tokio::spawn(committer(
                q.inner.pool.clone(),
                q.inner.wakers.clone(),
                q.inner.registry.clone(),
                notify_tx.clone(),
                rx.clone(),
                commits.clone(),
                config.clone(),
            )));
        }
        // The listener connects with the pool's search path set by URL options.
        tasks.push(tokio::spawn(crate::wake::listen(
            config.database.url.clone(),
            wakers,
            replica,
        )));
        tasks.push(tokio::spawn(sweeper(q.inner.pool.clone(), config.clone())));
        *q.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(q)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn principal(&self, c: &runtime::caller::Caller) -> Result<Principal> {
        policy::principal(
            c,
            &self.inner.config.trust_domain,
            self.inner.config.trust_direct_callers,
        )
    }

    // ---------------------------------------------------------------- topics

    /// The topic named `name`, from a short-lived cache.
    pub async fn topic(&self, name: &str) -> Result<Topic> {
        {
            let cache = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((t, at)) = cache.get(name)
                && at.elapsed() < TOPIC_CACHE_TTL
            {
                return Ok(t.clone());
            }
        }
        let client = self.inner.pool.get().await?;
        let t = repo::get_topic(&client, name)
            .await?
            .ok_or_else(|| Error::not_found("topic", format!("{name:?}")))?;
        let mut cache = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= TOPIC_CACHE_MAX {
            cache.clear();
        }
        cache.insert(name.to_string(), (t.clone(), Instant::now()));
        Ok(t)
    }

    fn forget_topic(&self, name: &str) {
        let mut cache = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
        cache.remove(name);
        cache.remove(&format!("{name}{DLQ_SUFFIX}"));
    }

    pub async fn create_topic(&self, who: &Principal, create: CreateTopic) -> Result<Topic> {
        let CreateTopic {
            name,
            retention,
            ttl,
            max_attempts,
        } = create;
        let name = name.as_str();
        policy::authorize(who, Action::Create, name)?;
        if is_dead_letter(name) {
            return Err(Error::invalid(
                "name",
                format!("names ending in {DLQ_SUFFIX:?} are reserved for dead-letter topics"),
            ));
        }
        let c = &self.inner.config;
        let settings = TopicSettings {
            retention: retention.unwrap_or(Duration::from_secs(c.default_retention_secs)),
            ttl,
            max_attempts: max_attempts.unwrap_or(c.default_max_attempts),
        };
        let mut client = self.inner.pool.get().await?;
        let tx = client.transaction().await?;
        let t = repo::create_topic(&tx, name, &settings).await?;
        tx.commit().await?;
        self.forget_topic(name);
        Ok(t)
    }

    pub async fn delete_topic(&self, who: &Principal, name: &str) -> Result<()> {
        policy::authorize(who, Action::Delete, name)?;
        if is_dead_letter(name) {
            return Err(Error::precondition(
                "a dead-letter topic goes with its topic: delete that one",
            ));
        }
        let mut client = self.inner.pool.get().await?;
        let tx = client.transaction().await?;
        let t = repo::get_topic(&tx, name)
            .await?
            .ok_or_else(|| Error::not_found("topic", format!("{name:?}")))?;
        repo::delete_topic(&tx, &t).await?;
        tx.commit().await?;
        self.forget_topic(name);
        Ok(())
    }

    pub async fn list_topics(&self, who: &Principal) -> Result<Vec<Topic>> {
        policy::authorize(who, Action::Read, "")?;
        let client = self.inner.pool.get().await?;
        repo::list_topics(&client).await
    }

    pub async fn stats(&self, who: &Principal, name: &str) -> Result<TopicStats> {
        policy::authorize(who, Action::Read, name)?;
        let client = self.inner.pool.get().await?;
        let t = repo::get_topic(&client, name)
            .await?
            .ok_or_else(|| Error::not_found("topic", format!("{name:?}")))?;
        repo::stats(&client, &t).await
    }

    // --------------------------------------------------------------- publish

    /// Stores the messages durably (group-committed with concurrent
    /// publishes) and answers only after the commit.
    pub async fn publish(&self, who: &Principal, publish: Publish) -> Result<Vec<Published>> {
        let Publish { topic, messages } = publish;
        let topic = topic.as_str();
        policy::authorize(who, Action::Publish, topic)?;
        let max = self.inner.config.max_payload_bytes;
        if let Some((i, m)) = messages
            .iter()
            .enumerate()
            .find(|(_, m)| m.payload.len() > max)
        {
            return Err(Error::exhausted(format!(
                "messages: [{i}] has a payload of {} bytes, over the limit of {max} bytes",
                m.payload.len()
            )));
        }
        if is_dead_letter(topic) {
            return Err(Error::forbidden(
                "only the queue itself publishes to dead-letter topics",
            ));
        }
        let topic = self.topic(topic).await?;
        let (reply, answer) = oneshot::channel();
        let name = topic.name.clone();
        self.inner
            .publish_tx
            .send(PublishJob {
                topic,
                messages,
                reply,
            })
            .await
            .map_err(|_| Error::unavailable("the queue is shutting down"))?;
        let result = answer
            .await
            .map_err(|_| Error::unavailable("the publish was interrupted"))?;
        if matches!(result, Err(Error::NotFound { .. })) {
            self.forget_topic(&name);
            return Err(Error::not_found("topic", format!("{name:?}")));
        }
        result
    }

    // ------------------------------------------------------------- subscribe

    /// Opens a consumer's session: checks the topic and the caller, makes the
    /// group if needed, and returns the session to run.
    pub async fn open(&self, who: &Principal, open: Open) -> Result<Session> {
        policy::authorize(who, Action::Consume, &open.topic)?;
        let permit = self
            .inner
            .subscriptions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::exhausted("too many subscriptions on this replica"))?;
        let topic = self.topic(&open.topic).await?;
        let mut client = self.inner.pool.get().await?;
        let tx = client.transaction().await?;
        let (group_id, created) = repo::open_group(&tx, topic.id, &open.group, open.start)
            .await
            .map_err(|e| match e {
                Error::NotFound { .. } => {
                    Error::not_found("topic", format!("{:?}", open.topic.as_str()))
                }
                e => e,
            })?;
        tx.commit().await?;
        let wake = self.inner.wakers.subscribe(topic.id);
        let id = Uuid::new_v4();
        let (taker, handed) = Taker::new(group_id, id, open.lease);
        self.inner.registry.register(topic.id, taker.clone());
        Ok(Session {
            id,
            taker,
            handed,
            offered: 0,
            promised: 0,
            drained: false,
            queue: self.clone(),
            topic,
            group: open.group.as_str().to_string(),
            group_id,
            created,
            window: open.credits,
            lease: open.lease,
            wake,
            in_flight: HashMap::new(),
            expired: VecDeque::new(),
            _permit: permit,
        })
    }
}

// ------------------------------------------------------------ group commit

/// The publish transactions in flight, and a signal when one ends.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

/// Counts one commit in flight until dropped (also when its task is cancelled).
struct Committing<'a>(&'a InFlight);

impl<'a> Committing<'a> {
    fn start(f: &'a InFlight) -> Self {
        f.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(f)
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// The jobs of the next commit: the first to come and whatever else waits,
/// up to `max` messages. While another commit is in flight (`commits`), it
/// keeps gathering until `overlap` messages wait or that commit ends. None
/// when the queue is closed and empty.
async fn gather(
    rx: &mut mpsc::Receiver<PublishJob>,
    commits: &InFlight,
    max: usize,
    overlap: usize,
) -> Option<Vec<PublishJob>> {
    let first = rx.recv().await?;
    let mut count = first.messages.len();
    let mut jobs = vec![first];
    let mut open = true;
    loop {
        while count < max {
            match rx.try_recv() {
                Ok(j) => {
                    count += j.messages.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // Registered before the count is read, so an end in between is not missed.
        let ended = commits.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let busy = commits.count.load(std::sync::atomic::Ordering::SeqCst) > 0;
        if !open || count >= overlap || !busy {
            return Some(jobs);
        }
        tokio::select! {
            () = &mut ended => {}
            j = rx.recv() => match j {
                Some(j) => {
                    count += j.messages.len();
                    jobs.push(j);
                }
                None => open = false,
            },
        }
    }
}

/// Takes publish jobs as they come and commits as many as are waiting (up to
/// `commit_batch_messages`) in one transaction: one fsync for many publishes.
/// While another commit is in flight it starts only with at least
/// `commit_overlap_messages`, else it gathers until that one ends.
async fn committer(
    pool: Pool,
    wakers: Wakers,
    registry: Arc<Registry>,
    notifier: mpsc::Sender<Vec<i32>>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<PublishJob>>>,
    commits: Arc<InFlight>,
    config: Config,
) {
    let max = config.commit_batch_messages.max(1);
    let overlap = config.commit_overlap_messages.clamp(1, max);
    let window = Duration::from_secs(config.dedupe_window_secs);
    loop {
        let (jobs, _committing) = {
            let mut rx = rx.lock().await;
            let Some(jobs) = gather(&mut rx, &commits, max, overlap).await else {
                return;
            };
            (jobs, Committing::start(&commits))
        };
        metrics::histogram!("queue_commit_batch_jobs").record(jobs.len() as f64);
        match commit(&pool, &registry, &jobs, window).await {
            Ok((results, wake)) => {
                let topics = topics_of(&jobs);
                finish(&wakers, &wake, jobs, results);
                notify_replicas(&notifier, topics);
            }
            Err(e) if jobs.len() > 1 => {
                // One bad job (say, its topic was just deleted) must not fail
                // the others: commit each on its own.
                tracing::debug!(error = %e, "batch commit failed; committing one by one");
                for job in jobs {
                    let r = commit(&pool, &registry, std::slice::from_ref(&job), window).await;
                    match r {
                        Ok((mut res, wake)) => {
                            let topics = topics_of(std::slice::from_ref(&job));
                            finish(&wakers, &wake, vec![job], vec![res.remove(0)]);
                            notify_replicas(&notifier, topics);
                        }
                        Err(e) => {
                            let _ = job.reply.send(Err(e));
                        }
                    }
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(clone_error(&e)));
                }
            }
        }
    }
}

fn topics_of(jobs: &[PublishJob]) -> Vec<i32> {
    let mut t: Vec<i32> = jobs.iter().map(|j| j.topic.id).collect();
    t.sort_unstable();
    t.dedup();
    t
}

/// Hands the topics to the notifier; never waits. When the notifier is
/// behind, the wake-up is dropped: the other replicas' consumers still poll.
fn notify_replicas(notifier: &mpsc::Sender<Vec<i32>>, topics: Vec<i32>) {
    let _ = notifier.try_send(topics);
}

/// Tells the other replicas about commits, off the publishers' path, with
/// all the topics that piled up meanwhile in one statement.
async fn notifier(pool: Pool, replica: Uuid, mut rx: mpsc::Receiver<Vec<i32>>) {
    while let Some(first) = rx.recv().await {
        let mut topics = first;
        while let Ok(more) = rx.try_recv() {
            topics.extend(more);
        }
        topics.sort_unstable();
        topics.dedup();
        let r = async {
            let c = pool.get().await?;
            repo::notify(&c, &topics, replica).await
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "notify failed");
        }
    }
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::NotFound { kind, key } => Error::not_found(kind, key),
        Error::Unavailable { internal } => Error::unavailable(internal.clone()),
        e => Error::internal(
            e.internal_detail()
                .unwrap_or("a batch commit failed")
                .to_string(),
        ),
    }
}

/// Answers the publishers and wakes the local consumers of `wake` (the
/// topics with messages that were not handed to every local group).
fn finish(
    wakers: &Wakers,
    wake: &HashSet<i32>,
    jobs: Vec<PublishJob>,
    results: Vec<Vec<Published>>,
) {
    for t in wake {
        wakers.wake(*t);
    }
    for (job, result) in jobs.into_iter().zip(results) {
        metrics::counter!("queue_published_total").increment(result.len() as u64);
        let _ = job.reply.send(Ok(result));
    }
}

/// Slots taken from local consumers for the messages of one commit.
struct Reserved {
    handoffs: Vec<repo::HandOff>,
    /// By lease token: the consumer and the insert it is for.
    takers: HashMap<Uuid, (Arc<Taker>, usize)>,
    /// Topics that still need their local consumers woken.
    wake: HashSet<i32>,
}

/// Takes, for each message without a key, one free slot of a consumer in
/// each local group of its topic (see [`crate::handoff`]).
fn reserve(registry: &Registry, inserts: &[repo::Insert<'_>]) -> Reserved {
    let mut r = Reserved {
        handoffs: Vec::new(),
        takers: HashMap::new(),
        wake: HashSet::new(),
    };
    for (i, m) in inserts.iter().enumerate() {
        let (taken, groups) = match m.key {
            None => registry.reserve(m.topic_id),
            Some(_) => (Vec::new(), usize::from(registry.has_consumers(m.topic_id))),
        };
        if taken.len() < groups {
            r.wake.insert(m.topic_id);
        }
        for t in taken {
            let token = Uuid::new_v4();
            r.handoffs.push(repo::HandOff {
                message_id: m.id,
                group_id: t.group_id,
                token,
                consumer: t.consumer,
                lease: t.lease,
            });
            r.takers.insert(token, (t, i));
        }
    }
    r
}

/// After the commit: each consumer gets its delivery (or its slot back).
fn hand_out(pool: &Pool, r: Reserved, inserts: &[repo::Insert<'_>], leased: Vec<repo::Leased>) {
    let mut takers = r.takers;
    // RETURNING promises no row order (a clean-clone CI run saw a batch come
    // back reversed): hand out in publish order, the batch's own.
    let mut handed: Vec<(Arc<Taker>, usize, repo::Leased)> = leased
        .into_iter()
        .filter_map(|l| takers.remove(&l.token).map(|(t, i)| (t, i, l)))
        .collect();
    handed.sort_by_key(|(_, i, l)| (*i, l.seq));
    for (taker, i, l) in handed {
        let m = &inserts[i];
        let d = Delivery {
            seq: l.seq,
            message_id: m.id,
            delivery_id: l.token,
            attempt: 1,
            headers: repo::headers_from_json(m.headers.clone()),
            payload: m.payload.to_vec(),
            key: None,
            published_at: l.published_at,
            lease_until: l.lease_until,
        };
        if taker.hand(Handed::Delivery(Box::new(d))).is_err() {
            // The consumer went away meanwhile: give the lease back now
            // rather than at its end.
            let (pool, group, seq, token) = (pool.clone(), taker.group_id, l.seq, l.token);
            tokio::spawn(async move {
                let r = async { repo::release(&pool.get().await?, group, seq, token).await };
                if let Err(e) = r.await {
                    tracing::debug!(error = %e, "releasing a handed-off lease failed");
                }
            });
        }
    }
    // Not written (the group went away): the slots come back.
    for (taker, _) in takers.into_values() {
        let _ = taker.hand(Handed::Cancel);
    }
}

/// Gives every slot back: the commit failed.
fn cancel(r: Reserved) {
    for (taker, _) in r.takers.into_values() {
        let _ = taker.hand(Handed::Cancel);
    }
}

/// Commits the jobs in one transaction; returns each job's results and the
/// topics whose local consumers need waking.
async fn commit(
    pool: &Pool,
    registry: &Registry,
    jobs: &[PublishJob],
    window: Duration,
) -> Result<(Vec<Vec<Published>>, HashSet<i32>)> {
    let mut client = pool.get().await?;
    // Ids first, so duplicates can point at the first occurrence.
    let mut results: Vec<Vec<Published>> = jobs
        .iter()
        .map(|j| {
            j.messages
                .iter()
                .map(|_| Published {
                    message_id: Uuid::new_v4(),
                    duplicate: false,
                })
                .collect()
        })
        .collect();
    // Duplicates within this batch: the first occurrence wins.
    let mut first: HashMap<(i32, &str), Uuid> = HashMap::new();
    let mut claims: Vec<(i32, &str, Uuid)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for (i, m) in job.messages.iter().enumerate() {
            if let Some(idem) = m.idempotency_id.as_deref() {
                let k = (job.topic.id, idem);
                if let Some(id) = first.get(&k) {
                    results[j][i] = Published {
                        message_id: *id,
                        duplicate: true,
                    };
                } else {
                    first.insert(k, results[j][i].message_id);
                    claims.push((job.topic.id, idem, results[j][i].message_id));
                }
            }
        }
    }
    if claims.is_empty() {
        // No idempotency ids: one pipelined round trip, BEGIN to COMMIT.
        let inserts = inserts_for(jobs, &results);
        let reserved = reserve(registry, &inserts);
        match repo::publish_in_one_trip(&client, &inserts, &reserved.handoffs).await {
            Ok(leased) => {
                let wake = reserved.wake.clone();
                hand_out(pool, reserved, &inserts, leased);
                return Ok((results, wake));
            }
            Err(e) => {
                cancel(reserved);
                return Err(e);
            }
        }
    }
    let tx = client.transaction().await?;
    let seen = repo::dedupe(&tx, &claims, window).await?;
    if !seen.is_empty() {
        for (j, job) in jobs.iter().enumerate() {
            for (i, m) in job.messages.iter().enumerate() {
                if let Some(idem) = m.idempotency_id.as_deref()
                    && let Some(id) = seen.get(&(job.topic.id, idem.to_string()))
                {
                    results[j][i] = Published {
                        message_id: *id,
                        duplicate: true,
                    };
                }
            }
        }
    }
    let inserts = inserts_for(jobs, &results);
    let reserved = reserve(registry, &inserts);
    let written = async {
        let leased = repo::insert_messages(&tx, &inserts, &reserved.handoffs).await?;
        tx.commit().await?;
        Ok::<_, Error>(leased)
    };
    match written.await {
        Ok(leased) => {
            let wake = reserved.wake.clone();
            hand_out(pool, reserved, &inserts, leased);
            Ok((results, wake))
        }
        Err(e) => {
            cancel(reserved);
            Err(e)
        }
    }
}

/// The rows to insert: every message that is not a duplicate.
fn inserts_for<'a>(jobs: &'a [PublishJob], results: &[Vec<Published>]) -> Vec<repo::Insert<'a>> {
    let mut inserts = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for (i, m) in job.messages.iter().enumerate() {
            if !results[j][i].duplicate {
                inserts.push(repo::Insert {
                    topic_id: job.topic.id,
                    id: results[j][i].message_id,
                    payload: &m.payload,
                    headers: repo::headers_to_json(&m.headers),
                    key: m.key.as_deref(),
                });
            }
        }
    }
    inserts
}

// ------------------------------------------------------------------ sweeper

async fn sweeper(pool: Pool, config: Config) {
    let mut tick = tokio::time::interval(Duration::from_secs(config.sweep_interval_secs.max(1)));
    let window = Duration::from_secs(config.dedupe_window_secs);
    loop {
        tick.tick().await;
        let r = async {
            let client = pool.get().await?;
            repo::sweep(&client, window, 10_000).await
        }
        .await;
        match r {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "swept"),
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
    }
}

// ------------------------------------------------------------------ session

struct Lease {
    seq: i64,
    /// Its settlement may make the next message of its key ready.
    keyed: bool,
    /// When this replica stops counting it against the window.
    until: Instant,
}

/// One consumer's stream: leases messages of its group within its credit
/// window, settles acks, nacks and extensions, and frees the window's slot
/// of a lease that ended.
pub struct Session {
    /// Names this consumer in the deliveries it leases (`last_consumer`).
    id: Uuid,
    /// This session as the committers see it, and what they hand it.
    taker: Arc<Taker>,
    handed: mpsc::UnboundedReceiver<Handed>,
    /// Slots last offered to the committers, and slots they took that are
    /// not answered yet: together with `in_flight`, never over the window.
    offered: usize,
    promised: usize,
    /// The last claim found nothing more ready: until a wake-up, a poll, a
    /// nack or a keyed ack, new work can only come by hand-off.
    drained: bool,
    queue: Queue,
    topic: Topic,
    group: String,
    group_id: i32,
    created: bool,
    window: u32,
    lease: Duration,
    wake: watch::Receiver<u64>,
    /// Current leases by delivery id; never more than the window.
    in_flight: HashMap<Uuid, Lease>,
    /// Recently ended leases, so their late acks get FAILED_PRECONDITION
    /// rather than NOT_FOUND; bounded.
    expired: VecDeque<Uuid>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// How long a consumer whose lease ended unsettled waits before it may claim
/// that message again: long enough for every other consumer of the group to
/// have been woken or to have polled once.
pub fn redelivery_grace(poll_interval: Duration) -> Duration {
    poll_interval * 2
}

/// Most client messages settled in one round trip.
const INPUT_BATCH: usize = 256;
const MAX_WINDOW: u32 = 100_000;

/// A lease counts as ended this long after the database's end, so that the
/// consumers woken by its end find it claimable (clocks read apart).
const LEASE_MARGIN: Duration = Duration::from_millis(5);

fn instant_for(t: OffsetDateTime) -> Instant {
    let left = t - OffsetDateTime::now_utc();
    Instant::now() + left.try_into().unwrap_or(Duration::ZERO) + LEASE_MARGIN
}

/// Resolves once `closed` is true (without holding its guard across awaits).
async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    if closed.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Session {
    /// Serves the stream until the client closes it, the client goes away
    /// (`out` closed), or `closed` becomes true (server shutdown).
    pub async fn run(
        mut self,
        mut input: impl Stream<Item = Result<ClientMsg>> + Unpin,
        out: mpsc::Sender<Result<ServerMsg>>,
        mut closed: watch::Receiver<bool>,
    ) {
        let poll = Duration::from_millis(self.queue.inner.config.poll_interval_ms.max(10));
        metrics::gauge!("queue_subscriptions").increment(1.0);
        let opened = ServerMsg::Opened {
            topic: self.topic.name.clone(),
            group: self.group.clone(),
            created: self.created,
        };
        let mut want_claim = out.send(Ok(opened)).await.is_ok();
        let mut alive = want_claim;
        let mut next_poll = Instant::now() + poll;
        while alive {
            self.expire();
            // Whatever the committers handed over meanwhile.
            while let Ok(h) = self.handed.try_recv() {
                if !self.take(h, &out).await {
                    alive = false;
                    break;
                }
            }
            if !alive {
                break;
            }
            if want_claim {
                // Claiming: nothing may be handed meanwhile beyond what the
                // claim leaves free.
                self.withdraw();
            }
            let free = self.free();
            if want_claim && free > 0 {
                match self.claim(free).await {
                    Ok(got) => {
                        want_claim = got.len() == free;
                        self.drained = !want_claim;
                        for d in got {
                            if out
                                .send(Ok(ServerMsg::Delivery(Box::new(d))))
                                .await
                                .is_err()
                            {
                                alive = false;
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, topic = %self.topic.name, "claim failed");
                        want_claim = false;
                    }
                }
                next_poll = Instant::now() + poll;
                if !alive {
                    break;
                }
                // Settle what the client sent meanwhile before claiming more.
                if let Some(Some(first)) = input.next().now_or_never() {
                    alive = self.handle(first, &mut input, &out).await;
                    want_claim = !self.drained;
                }
                continue;
            }
            if self.drained {
                // Nothing is waiting in the database for us: fresh messages
                // come by hand-off, into the slots offered here.
                self.reoffer();
            }
            let deadline = self
                .in_flight
                .values()
                .map(|l| l.until)
                .min()
                .map_or(next_poll, |t| t.min(next_poll));
            tokio::select! {
                h = self.handed.recv() => {
                    if let Some(h) = h {
                        alive = self.take(h, &out).await;
                    }
                }
                msg = input.next() => match msg {
                    Some(first) => {
                        alive = self.handle(first, &mut input, &out).await;
                        // Acks alone free slots for hand-offs; a nack, a
                        // credit or a keyed ack may have made work ready.
                        want_claim = !self.drained;
                    }
                    None => alive = false,
                },
                r = self.wake.changed() => {
                    if r.is_err() { alive = false; }
                    self.drained = false;
                    want_claim = true;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if Instant::now() >= next_poll {
                        self.drained = false;
                        want_claim = true;
                        next_poll = Instant::now() + poll;
                    }
                }
                () = wait_closed(&mut closed) => {
                    let _ = out.send(Err(Error::unavailable("the queue replica is shutting down"))).await;
                    alive = false;
                }
            }
        }
        metrics::gauge!("queue_subscriptions").decrement(1.0);
    }

    /// Slots neither leased nor promised to a committer.
    fn free(&self) -> usize {
        (self.window as usize).saturating_sub(self.in_flight.len() + self.promised)
    }

    /// Takes back the slots offered for hand-off; those already taken are
    /// promised (their delivery or cancel is on its way).
    fn withdraw(&mut self) {
        let left = self.taker.withdraw();
        self.promised += self.offered.saturating_sub(left);
        self.offered = 0;
    }

    /// Offers every free slot for hand-off.
    fn reoffer(&mut self) {
        self.withdraw();
        self.offered = self.free();
        self.taker.offer(self.offered);
    }

    /// One answer to a promised slot. Returns false when the client is gone.
    async fn take(&mut self, h: Handed, out: &mpsc::Sender<Result<ServerMsg>>) -> bool {
        // The slot was promised at a withdraw, or is of the current offer
        // (the committer already took it off the taker's count).
        if self.promised > 0 {
            self.promised -= 1;
        } else {
            self.offered = self.offered.saturating_sub(1);
        }
        let Handed::Delivery(d) = h else {
            return true;
        };
        metrics::counter!("queue_delivered_total").increment(1);
        metrics::counter!("queue_handed_off_total").increment(1);
        self.in_flight.insert(
            d.delivery_id,
            Lease {
                seq: d.seq,
                keyed: false,
                until: instant_for(d.lease_until),
            },
        );
        out.send(Ok(ServerMsg::Delivery(d))).await.is_ok()
    }

    /// Forgets leases whose time is up: their slots are free again. Their
    /// messages are claimable by the group's other consumers now (and by this
    /// one only after the grace), so those are woken here and on every replica
    /// rather than left to their next poll.
    fn expire(&mut self) {
        let now = Instant::now();
        let ended: Vec<Uuid> = self
            .in_flight
            .iter()
            .filter(|(_, l)| l.until <= now)
            .map(|(id, _)| *id)
            .collect();
        if !ended.is_empty() {
            metrics::counter!("queue_lease_expired_total").increment(ended.len() as u64);
            self.queue.inner.wakers.wake(self.topic.id);
            notify_replicas(&self.queue.inner.notify_tx, vec![self.topic.id]);
        }
        for id in ended {
            self.in_flight.remove(&id);
            self.remember_expired(id);
        }
    }

    fn remember_expired(&mut self, id: Uuid) {
        if self.expired.len() >= (self.window as usize).clamp(64, 10_000) * 4 {
            self.expired.pop_front();
        }
        self.expired.push_back(id);
    }

    async fn claim(&mut self, n: usize) -> Result<Vec<Delivery>> {
        let client = self.queue.inner.relaxed.get().await?;
        let poll = Duration::from_millis(self.queue.inner.config.poll_interval_ms);
        let (got, dead) = repo::claim(
            &client,
            self.group_id,
            &self.topic,
            self.id,
            n as i64,
            self.lease,
            redelivery_grace(poll),
        )
        .await?;
        if !dead.is_empty() {
            // Moving a message to the dead-letter topic stores it: durable.
            let mut durable = self.queue.inner.pool.get().await?;
            let tx = durable.transaction().await?;
            repo::dead_letter(&tx, self.group_id, &self.group, &self.topic, &dead).await?;
            tx.commit().await?;
            if let Some(dlq) = self.topic.dead_letter_id {
                self.queue.inner.wakers.wake(dlq);
                let _ = repo::notify(&client, &[dlq], self.queue.inner.replica).await;
            }
            metrics::counter!("queue_dead_lettered_total").increment(dead.len() as u64);
        }
        metrics::counter!("queue_delivered_total").increment(got.len() as u64);
        for d in &got {
            self.in_flight.insert(
                d.delivery_id,
                Lease {
                    seq: d.seq,
                    keyed: d.key.is_some(),
                    until: instant_for(d.lease_until),
                },
            );
        }
        Ok(got)
    }

    /// Handles `first` and whatever else the client already sent, batching
    /// acks into one statement. Returns false when the stream must end.
    async fn handle(
        &mut self,
        first: Result<ClientMsg>,
        input: &mut (impl Stream<Item = Result<ClientMsg>> + Unpin),
        out: &mpsc::Sender<Result<ServerMsg>>,
    ) -> bool {
        let mut batch = vec![first];
        while batch.len() < INPUT_BATCH {
            match input.next().now_or_never() {
                Some(Some(m)) => batch.push(m),
                _ => break,
            }
        }
        let mut acks = Vec::new();
        let mut replies = Vec::new();
        for m in batch {
            match m {
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return false;
                }
                Ok(ClientMsg::Credit(n)) => {
                    self.window = self.window.saturating_add(n).min(MAX_WINDOW);
                    self.drained = false;
                }
                Ok(ClientMsg::Ack(ids)) => acks.extend(ids),
                Ok(ClientMsg::Nack(ids, delay)) => {
                    self.drained = false;
                    let r = self.settle(&ids, Op::Nack(delay), out).await;
                    replies.push(r);
                }
                Ok(ClientMsg::Extend(ids, lease)) => {
                    let r = self.settle(&ids, Op::Extend(lease), out).await;
                    replies.push(r);
                }
            }
        }
        if !acks.is_empty() {
            let r = self.settle(&acks, Op::Ack, out).await;
            replies.push(r);
        }
        for r in replies {
            match r {
                Ok(settled) => {
                    for (delivery_id, outcome) in settled {
                        if out
                            .send(Ok(ServerMsg::Settled {
                                delivery_id,
                                outcome,
                            }))
                            .await
                            .is_err()
                        {
                            return false;
                        }
                    }
                }
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return false;
                }
            }
        }
        true
    }

    /// Runs `work` (a database statement that does not touch the session)
    /// while passing on what the committers hand over meanwhile: a fresh
    /// message does not wait behind the round trip of an ack.
    async fn forwarding<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        out: &mpsc::Sender<Result<ServerMsg>>,
    ) -> T {
        tokio::pin!(work);
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                r = &mut work => return r,
                h = self.handed.recv(), if open => match h {
                    // A gone client shows at the next send of the caller.
                    Some(h) => open = self.take(h, out).await,
                    None => open = false,
                },
            }
        }
    }

    async fn settle(
        &mut self,
        ids: &[Uuid],
        op: Op,
        out: &mpsc::Sender<Result<ServerMsg>>,
    ) -> Result<Vec<(Uuid, Settle)>> {
        let mut outcomes = Vec::with_capacity(ids.len());
        let mut leases = Vec::new();
        for id in ids {
            match self.in_flight.get(id) {
                Some(l) => leases.push((l.seq, *id)),
                None if self.expired.contains(id) => outcomes.push((*id, Settle::Expired)),
                None => outcomes.push((*id, Settle::Unknown)),
            }
        }
        if leases.is_empty() {
            return Ok(outcomes);
        }
        let pool = self.queue.inner.relaxed.clone();
        let gid = self.group_id;
        let statement = async {
            let client = pool.get().await?;
            let done: HashMap<i64, Option<OffsetDateTime>> = match op {
                Op::Ack => repo::ack(&client, gid, &leases)
                    .await?
                    .into_iter()
                    .map(|s| (s, None))
                    .collect(),
                Op::Nack(delay) => repo::nack(&client, gid, &leases, delay)
                    .await?
                    .into_iter()
                    .map(|s| (s, None))
                    .collect(),
                Op::Extend(lease) => repo::extend(&client, gid, &leases, lease)
                    .await?
                    .into_iter()
                    .map(|(s, t)| (s, Some(t)))
                    .collect(),
            };
            Ok::<_, Error>(done)
        };
        let done = self.forwarding(statement, out).await?;
        if matches!(op, Op::Ack) {
            metrics::counter!("queue_acked_total").increment(done.len() as u64);
        }
        for (seq, id) in leases {
            match done.get(&seq) {
                Some(Some(until)) => {
                    if let Some(l) = self.in_flight.get_mut(&id) {
                        l.until = instant_for(*until);
                    }
                    outcomes.push((id, Settle::Ok));
                }
                Some(None) => {
                    if self.in_flight.remove(&id).is_some_and(|l| l.keyed) {
                        // The next message of its key may be ready now.
                        self.drained = false;
                    }
                    // The slot is free: the session claims again after this
                    // batch, which also picks up a nacked message or the next
                    // message of an acked one's key.
                    outcomes.push((id, Settle::Ok));
                }
                None => {
                    // The database says its lease is over, whatever our clock thought.
                    self.in_flight.remove(&id);
                    self.remember_expired(id);
                    outcomes.push((id, Settle::Expired));
                }
            }
        }
        Ok(outcomes)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Committers stop handing to it; what they still hand is released.
        self.queue
            .inner
            .registry
            .unregister(self.topic.id, &self.taker);
    }
}

#[derive(Clone, Copy)]
enum Op {
    Ack,
    Nack(Duration),
    Extend(Duration),
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn job(messages: usize) -> PublishJob {
        PublishJob {
            topic: Topic {
                id: 1,
                name: "t".into(),
                settings: TopicSettings {
                    retention: Duration::from_secs(1),
                    ttl: None,
                    max_attempts: 1,
                },
                dead_letter_id: None,
                dead_letter_name: None,
                created_at: OffsetDateTime::now_utc(),
            },
            messages: (0..messages)
                .map(|_| NewMessage {
                    payload: Vec::new(),
                    headers: Default::default(),
                    key: None,
                    idempotency_id: None,
                })
                .collect(),
            reply: oneshot::channel().0,
        }
    }

    #[tokio::test]
    async fn small_jobs_gather_behind_a_commit_in_flight_and_a_large_one_does_not_wait() {
        let commits = InFlight::default();
        let (tx, mut rx) = mpsc::channel(16);
        // Nothing in flight: the first job commits at once, alone.
        tx.send(job(1)).await.unwrap();
        let got = gather(&mut rx, &commits, 1000, 100).now_or_never();
        assert_eq!(got.unwrap().unwrap().len(), 1);

        // One in flight: four small jobs wait, then a batch of 100 joins
        // them and they go.
        let in_flight = Committing::start(&commits);
        for _ in 0..4 {
            tx.send(job(1)).await.unwrap();
        }
        let mut next = Box::pin(gather(&mut rx, &commits, 1000, 100));
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        tx.send(job(100)).await.unwrap();
        let jobs = next.await.unwrap();
        assert_eq!(jobs.iter().map(|j| j.messages.len()).sum::<usize>(), 104);

        // One in flight and one small job: it goes when the other ends.
        tx.send(job(1)).await.unwrap();
        let mut next = Box::pin(gather(&mut rx, &commits, 1000, 100));
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        drop(in_flight);
        assert_eq!(next.await.unwrap().len(), 1);

        // A full batch never waits; a closed, empty queue ends the committer.
        let _in_flight = Committing::start(&commits);
        tx.send(job(1000)).await.unwrap();
        let got = gather(&mut rx, &commits, 1000, 100).now_or_never();
        assert_eq!(got.unwrap().unwrap().len(), 1);
        drop(tx);
        assert!(gather(&mut rx, &commits, 1000, 100).await.is_none());
    }
}
