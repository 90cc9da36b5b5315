//! The queue beside RabbitMQ, measured in the same run on this machine.
//!
//! Starts the `queue` binary against a fresh database and, side by side,
//! drives RabbitMQ at 127.0.0.1:5672 (guest/guest; durable queue,
//! persistent messages, publisher confirms, manual acks). Prints one table
//! with each figure beside RabbitMQ's and the oslo.messaging anchor.
//!
//! `cargo bench -p queue` (about two minutes). Set `QUEUE_BENCH_SECS` to
//! change the length of each timed phase (default 5).
//! `QUEUE_BENCH_LATENCY=<msg/s>` runs only this build's publish→deliver
//! phase at that rate and prints where the CPU went (the queue process,
//! every Postgres process, the bench's own clients), for profiling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use proto::queue::v1 as pb;
use queue::client::{Client, SubscribeOptions};
use runtime::testing::{cpu_seconds, postgres_cpu_seconds};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

#[path = "queue/nats.rs"]
mod nats;

const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Concurrent single-message publishers (the anchor ran 50 threads).
const PUBLISHERS: usize = 50;
/// Batched publishing: publishers x messages per batch.
const BATCH_PUBLISHERS: usize = 8;
const BATCH: usize = 100;
/// Messages preloaded for the consume-and-ack phase, and its consumers.
const PRELOAD: usize = 20_000;
const CONSUMERS: usize = 4;
const CREDITS: u32 = 256;
const PAYLOAD: usize = 256;
/// A light load, to show the latency floor.
const LOW_RATE: f64 = 200.0;

fn phase() -> Duration {
    Duration::from_secs(
        std::env::var("QUEUE_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    )
}

fn payload(stamp: Option<Instant>, epoch: Instant) -> Vec<u8> {
    let mut p = vec![b'x'; PAYLOAD];
    let nanos = stamp.map_or(0u64, |t| (t - epoch).as_nanos() as u64);
    p[..8].copy_from_slice(&nanos.to_le_bytes());
    p
}

fn latency_of(p: &[u8], epoch: Instant) -> Option<Duration> {
    let nanos = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    (nanos > 0).then(|| epoch.elapsed().saturating_sub(Duration::from_nanos(nanos)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default, Clone, Copy)]
struct Figures {
    single: f64,
    batched: f64,
    p50: Duration,
    p99: Duration,
    confirm_p50: Duration,
    low_p50: Duration,
    low_p99: Duration,
    latency_rate: f64,
    consume: f64,
}

// ------------------------------------------------------------------ Cirrus

struct Cirrus {
    _db: runtime::db::TestDatabase,
    _dir: tempfile::TempDir,
    child: tokio::process::Child,
    channels: Vec<Channel>,
    epoch: Instant,
}

impl Cirrus {
    async fn start(epoch: Instant, binary: &str) -> Self {
        let db = runtime::db::TestDatabase::create()
            .await
            .expect("a Postgres at 127.0.0.1:5432");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("queue.toml");
        // Only what the bench needs, so that a baseline binary runs with its
        // own defaults (committers and the like), not this build's.
        let config = format!(
            "trust_direct_callers = true\n\
             [server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
             [database]\nurl = {:?}\nschema = \"queue\"\npool_size = 16\n",
            db.url
        );
        std::fs::write(&cfg, config).unwrap();
        let mut command = tokio::process::Command::new(binary);
        if binary != env!("CARGO_BIN_EXE_queue") {
            // A baseline runs as it was built: `CIRRUS_*` settings meant for
            // this build (say `CIRRUS_COMMITTERS`) are not passed on.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("CIRRUS_") {
                    command.env_remove(k);
                }
            }
        }
        let mut child = command
            .args(["--config", cfg.to_str().unwrap(), "serve"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await.unwrap() {
                if let Some(a) = l.strip_prefix("queue listening on ") {
                    return a.trim().to_string();
                }
            }
            panic!("queue exited");
        })
        .await
        .expect("queue started");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let channels = (0..4)
            .map(|_| {
                Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy()
            })
            .collect();
        let c = Self {
            _db: db,
            _dir: dir,
            child,
            channels,
            epoch,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c
            .client(0)
            .ensure_topic("warmup", Default::default())
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "queue not serving");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c
    }

    fn client(&self, i: usize) -> Client {
        Client::from_channel(self.channels[i % self.channels.len()].clone())
    }

    async fn topic(&self, name: &str) {
        self.client(0)
            .ensure_topic(name, Default::default())
            .await
            .unwrap();
    }

    /// Messages per second from `publishers` loops of `batch`-message publishes.
    async fn publish_rate(&self, topic: &str, publishers: usize, batch: usize) -> f64 {
        self.topic(topic).await;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..publishers {
            let (mut q, stop, count, topic) = (
                self.client(i).queue(),
                stop.clone(),
                count.clone(),
                topic.to_string(),
            );
            let body = payload(None, self.epoch);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let messages = (0..batch)
                        .map(|_| pb::Message {
                            payload: body.clone(),
                            ..Default::default()
                        })
                        .collect();
                    q.publish(pb::PublishRequest {
                        topic: topic.clone(),
                        messages,
                    })
                    .await
                    .expect("publish");
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }));
        }
        timed(stop, count, tasks).await
    }

    async fn latency(&self, topic: &str, rate: f64) -> (Duration, Duration, Duration) {
        self.topic(topic).await;
        let mut sub = self.client(1).subscribe_with(
            topic,
            "latency",
            SubscribeOptions {
                credits: CREDITS,
                ..Default::default()
            },
        );
        let epoch = self.epoch;
        let total = (rate * phase().as_secs_f64()) as usize;
        let consumer = tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            let mut acks = FuturesUnordered::new();
            let deadline = Instant::now() + phase() + Duration::from_secs(20);
            while lat.len() < total && Instant::now() < deadline {
                tokio::select! {
                    d = sub.next() => {
                        let d = d.expect("subscription").expect("delivery");
                        if let Some(l) = latency_of(&d.payload, epoch) {
                            lat.push(l);
                        }
                        acks.push(async move { d.ack().await });
                    }
                    Some(_) = acks.next(), if !acks.is_empty() => {}
                }
            }
            while acks.next().await.is_some() {}
            lat
        });
        // Let the group exist before pacing starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let clients: Vec<_> = (0..4).map(|i| self.client(i)).collect();
        let topic = topic.to_string();
        let confirms = pace(rate, total, move |i| {
            let (c, topic) = (clients[i % clients.len()].clone(), topic.clone());
            async move {
                c.queue()
                    .publish(pb::PublishRequest {
                        topic,
                        messages: vec![pb::Message {
                            payload: payload(Some(Instant::now()), epoch),
                            ..Default::default()
                        }],
                    })
                    .await
                    .expect("publish");
            }
        })
        .await;
        let mut lat = consumer.await.unwrap();
        lat.sort();
        (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&confirms, 0.5),
        )
    }

    async fn consume_rate(&self, topic: &str) -> f64 {
        self.topic(topic).await;
        // Preload in batches, then time draining with acks.
        let q = self.client(0);
        for _ in 0..PRELOAD / 1000 {
            let messages = (0..1000)
                .map(|_| pb::Message {
                    payload: payload(None, self.epoch),
                    ..Default::default()
                })
                .collect();
            q.publish(topic, messages).await.unwrap();
        }
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..CONSUMERS {
            let mut sub = self.client(i).subscribe_with(
                topic,
                "drain",
                SubscribeOptions {
                    credits: CREDITS,
                    ..Default::default()
                },
            );
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut acks = FuturesUnordered::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::Relaxed) < PRELOAD as u64 && Instant::now() < deadline {
                    tokio::select! {
                        d = sub.next() => {
                            let d = d.expect("subscription").expect("delivery");
                            acks.push(async move { d.ack().await });
                        }
                        Some(r) = acks.next(), if !acks.is_empty() => {
                            if r.is_ok() { done.fetch_add(1, Ordering::Relaxed); }
                        }
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
    }
}

// ---------------------------------------------------------------- RabbitMQ

struct Rabbit {
    conns: Vec<Connection>,
    epoch: Instant,
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

impl Rabbit {
    async fn connect(epoch: Instant) -> Option<Self> {
        let mut conns = Vec::new();
        for _ in 0..4 {
            match tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(RABBIT_URL, ConnectionProperties::default()),
            )
            .await
            {
                Ok(Ok(c)) => conns.push(c),
                other => {
                    eprintln!("RabbitMQ not reachable at {RABBIT_URL}: {other:?}");
                    return None;
                }
            }
        }
        Some(Self { conns, epoch })
    }

    async fn channel(&self, i: usize) -> lapin::Channel {
        self.conns[i % self.conns.len()]
            .create_channel()
            .await
            .unwrap()
    }

    async fn declare(&self, queue: &str) {
        let ch = self.channel(0).await;
        ch.queue_delete(queue, QueueDeleteOptions::default())
            .await
            .ok();
        let ch = self.channel(0).await;
        ch.queue_declare(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }

    async fn delete(&self, queue: &str) {
        let ch = self.channel(0).await;
        ch.queue_delete(queue, QueueDeleteOptions::default())
            .await
            .ok();
    }

    async fn publish_rate(&self, queue: &str, publishers: usize, batch: usize) -> f64 {
        self.declare(queue).await;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..publishers {
            let ch = self.channel(i).await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let (stop, count, queue) = (stop.clone(), count.clone(), queue.to_string());
            let body = payload(None, self.epoch);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if batch == 1 {
                        let confirm = ch
                            .basic_publish(
                                "",
                                queue.as_str(),
                                BasicPublishOptions::default(),
                                &body,
                                persistent(),
                            )
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                        assert!(confirm.is_ack());
                    } else {
                        for _ in 0..batch {
                            ch.basic_publish(
                                "",
                                queue.as_str(),
                                BasicPublishOptions::default(),
                                &body,
                                persistent(),
                            )
                            .await
                            .unwrap();
                        }
                        ch.wait_for_confirms().await.unwrap();
                    }
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }));
        }
        let rate = timed(stop, count, tasks).await;
        self.delete(queue).await;
        rate
    }

    async fn latency(&self, queue: &str, rate: f64) -> (Duration, Duration, Duration) {
        self.declare(queue).await;
        let epoch = self.epoch;
        let total = (rate * phase().as_secs_f64()) as usize;
        let ch = self.channel(1).await;
        ch.basic_qos(CREDITS as u16, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                queue,
                "latency",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            let deadline = Instant::now() + phase() + Duration::from_secs(20);
            while lat.len() < total && Instant::now() < deadline {
                let Ok(Some(d)) =
                    tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
                else {
                    continue;
                };
                let d = d.unwrap();
                if let Some(l) = latency_of(&d.data, epoch) {
                    lat.push(l);
                }
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            lat
        });
        let mut chans = Vec::new();
        for i in 0..4 {
            let ch = self.channel(i).await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            chans.push(ch);
        }
        let q = queue.to_string();
        let confirms = pace(rate, total, move |i| {
            let (ch, q) = (chans[i % chans.len()].clone(), q.clone());
            async move {
                ch.basic_publish(
                    "",
                    q.as_str(),
                    BasicPublishOptions::default(),
                    &payload(Some(Instant::now()), epoch),
                    persistent(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
        })
        .await;
        let mut lat = reader.await.unwrap();
        lat.sort();
        self.delete(queue).await;
        (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&confirms, 0.5),
        )
    }

    async fn consume_rate(&self, queue: &str) -> f64 {
        self.declare(queue).await;
        let ch = self.channel(0).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let body = payload(None, self.epoch);
        for _ in 0..PRELOAD {
            ch.basic_publish(
                "",
                queue,
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await
            .unwrap();
        }
        ch.wait_for_confirms().await.unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..CONSUMERS {
            let ch = self.channel(i).await;
            ch.basic_qos(CREDITS as u16, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = ch
                .basic_consume(
                    queue,
                    format!("drain-{i}").as_str(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::Relaxed) < PRELOAD as u64 && Instant::now() < deadline {
                    let Ok(Some(d)) =
                        tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
                    else {
                        continue;
                    };
                    d.unwrap().ack(BasicAckOptions::default()).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
                drop(ch);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        self.delete(queue).await;
        rate
    }
}

// ------------------------------------------------------------ NATS JetStream

/// JetStream on 127.0.0.1:4222: a file-stored work-queue stream per phase,
/// publishes acked by JetStream once stored, a durable push consumer with
/// explicit acks and `max_ack_pending` = the same 256 credits. Note that
/// JetStream's file store does not fsync each message (`sync_interval`,
/// 2 min by default): its ack means "written", not "flushed".
struct Nats {
    conns: Vec<nats::Conn>,
    epoch: Instant,
}

impl Nats {
    async fn connect(epoch: Instant) -> Option<Self> {
        let mut conns = Vec::new();
        for _ in 0..4 {
            match nats::Conn::connect().await {
                Ok(c) => conns.push(c),
                Err(e) => {
                    eprintln!("NATS JetStream not reachable at {}: {e}", nats::NATS_ADDR);
                    return None;
                }
            }
        }
        Some(Self { conns, epoch })
    }

    fn conn(&self, i: usize) -> nats::Conn {
        self.conns[i % self.conns.len()].clone()
    }

    async fn declare(&self, stream: &str) {
        let c = self.conn(0);
        let _ = c
            .request(&format!("$JS.API.STREAM.DELETE.{stream}"), b"")
            .await;
        c.api(
            &format!("$JS.API.STREAM.CREATE.{stream}"),
            &format!(
                r#"{{"name":"{stream}","subjects":["{stream}"],"storage":"file","retention":"workqueue","num_replicas":1}}"#
            ),
        )
        .await;
    }

    async fn delete(&self, stream: &str) {
        let _ = self
            .conn(0)
            .request(&format!("$JS.API.STREAM.DELETE.{stream}"), b"")
            .await;
    }

    /// A durable push consumer delivering to `deliver.<stream>` in queue group `q`.
    async fn consumer(&self, stream: &str) -> String {
        let deliver = format!("deliver.{stream}");
        self.conn(0)
            .api(
                &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.c"),
                &format!(
                    r#"{{"stream_name":"{stream}","config":{{"durable_name":"c","deliver_subject":"{deliver}","deliver_group":"q","ack_policy":"explicit","max_ack_pending":{CREDITS},"deliver_policy":"all","ack_wait":30000000000}}}}"#
                ),
            )
            .await;
        deliver
    }

    async fn publish_rate(&self, stream: &str, publishers: usize, batch: usize) -> f64 {
        self.declare(stream).await;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..publishers {
            let (c, stop, count, stream) = (
                self.conn(i),
                stop.clone(),
                count.clone(),
                stream.to_string(),
            );
            let body = payload(None, self.epoch);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let all: FuturesUnordered<_> =
                        (0..batch).map(|_| c.publish(&stream, &body)).collect();
                    all.collect::<Vec<()>>().await;
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }));
        }
        let rate = timed(stop, count, tasks).await;
        self.delete(stream).await;
        rate
    }

    async fn latency(&self, stream: &str, rate: f64) -> (Duration, Duration, Duration) {
        self.declare(stream).await;
        let deliver = self.consumer(stream).await;
        let epoch = self.epoch;
        let total = (rate * phase().as_secs_f64()) as usize;
        let sub_conn = self.conn(1);
        let mut rx = sub_conn.subscribe(&deliver, "q").await;
        let reader = tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            let deadline = Instant::now() + phase() + Duration::from_secs(20);
            while lat.len() < total && Instant::now() < deadline {
                let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
                else {
                    continue;
                };
                if let Some(l) = latency_of(&m.payload, epoch) {
                    lat.push(l);
                }
                if let Some(r) = m.reply {
                    sub_conn.ack(&r).await;
                }
            }
            lat
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let conns: Vec<_> = (0..4).map(|i| self.conn(i)).collect();
        let subject = stream.to_string();
        let confirms = pace(rate, total, move |i| {
            let (c, subject) = (conns[i % conns.len()].clone(), subject.clone());
            async move {
                c.publish(&subject, &payload(Some(Instant::now()), epoch))
                    .await;
            }
        })
        .await;
        let mut lat = reader.await.unwrap();
        lat.sort();
        self.delete(stream).await;
        (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&confirms, 0.5),
        )
    }

    async fn consume_rate(&self, stream: &str) -> f64 {
        self.declare(stream).await;
        let c = self.conn(0);
        let body = payload(None, self.epoch);
        for _ in 0..PRELOAD / 1000 {
            let all: FuturesUnordered<_> = (0..1000).map(|_| c.publish(stream, &body)).collect();
            all.collect::<Vec<()>>().await;
        }
        let deliver = self.consumer(stream).await;
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..CONSUMERS {
            let c = self.conn(i);
            let mut rx = c.subscribe(&deliver, "q").await;
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::Relaxed) < PRELOAD as u64 && Instant::now() < deadline {
                    let Ok(Some(m)) =
                        tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
                    else {
                        continue;
                    };
                    if let Some(r) = m.reply {
                        c.ack(&r).await;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        self.delete(stream).await;
        rate
    }
}

// ----------------------------------------------------------------- helpers

/// Lets the tasks run for one phase after a short warm-up; returns msg/s.
async fn timed(
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> f64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(phase()).await;
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

/// Starts `total` publishes at `rate` per second, each its own task, at
/// most 1024 in flight. Returns how long each took to be confirmed, sorted.
async fn pace<F, Fut>(rate: f64, total: usize, publish: F) -> Vec<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(1024));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = gate.clone().acquire_owned().await.unwrap();
        let f = publish(i);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            f.await;
            drop(permit);
            t.elapsed()
        }));
    }
    let mut confirms = Vec::with_capacity(total);
    for t in tasks {
        confirms.push(t.await.unwrap());
    }
    confirms.sort();
    confirms
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn rate(r: f64) -> String {
    if r == 0.0 {
        "n/a".into()
    } else {
        format!("{r:.0} msg/s")
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async_main());
}

/// One system measured in the run.
enum System {
    Cirrus(Box<Cirrus>),
    Rabbit(Rabbit),
    Nats(Nats),
}

impl System {
    /// The topic, queue or stream name of a phase.
    fn name(&self, phase: &str, tag: &str) -> String {
        match self {
            System::Cirrus(_) => format!("bench.{phase}"),
            _ => format!("cirrus-bench-{phase}-{tag}"),
        }
    }

    async fn publish_rate(&self, name: &str, publishers: usize, batch: usize) -> f64 {
        match self {
            System::Cirrus(s) => s.publish_rate(name, publishers, batch).await,
            System::Rabbit(s) => s.publish_rate(name, publishers, batch).await,
            System::Nats(s) => s.publish_rate(name, publishers, batch).await,
        }
    }

    async fn latency(&self, name: &str, rate: f64) -> (Duration, Duration, Duration) {
        match self {
            System::Cirrus(s) => s.latency(name, rate).await,
            System::Rabbit(s) => s.latency(name, rate).await,
            System::Nats(s) => s.latency(name, rate).await,
        }
    }

    async fn consume_rate(&self, name: &str) -> f64 {
        match self {
            System::Cirrus(s) => s.consume_rate(name).await,
            System::Rabbit(s) => s.consume_rate(name).await,
            System::Nats(s) => s.consume_rate(name).await,
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `QUEUE_BENCH_LATENCY=<rate>`: this build's latency phase alone, with the
/// CPU each part spent per message.
async fn latency_only(epoch: Instant, rate: f64) {
    let c = Cirrus::start(epoch, env!("CARGO_BIN_EXE_queue")).await;
    let queue_pid = c.child.id().unwrap_or(0).to_string();
    let cpu = || {
        (
            cpu_seconds(&queue_pid),
            postgres_cpu_seconds(),
            cpu_seconds("self"),
        )
    };
    let before = cpu();
    let t0 = Instant::now();
    let (p50, p99, confirm) = c.latency("bench.latency", rate).await;
    let secs = t0.elapsed().as_secs_f64();
    let after = cpu();
    let n = rate * phase().as_secs_f64();
    let per = |a: f64, b: f64| (a - b) * 1e6 / n;
    println!(
        "publish→deliver at {rate:.0} msg/s: p50 {} p99 {} confirm p50 {}",
        ms(p50),
        ms(p99),
        ms(confirm)
    );
    println!(
        "CPU per message: queue {:.0} µs, Postgres {:.0} µs, bench clients {:.0} µs; \
         busy {:.0} % of 2 cores over {secs:.1} s",
        per(after.0, before.0),
        per(after.1, before.1),
        per(after.2, before.2),
        ((after.0 - before.0) + (after.1 - before.1) + (after.2 - before.2)) * 100.0 / (secs * 2.0)
    );
    let mut child = c.child;
    let _ = child.start_kill();
    let _ = child.wait().await;
}

async fn async_main() {
    let epoch = Instant::now();
    if let Some(rate) = std::env::var("QUEUE_BENCH_LATENCY")
        .ok()
        .and_then(|r| r.parse::<f64>().ok())
    {
        return latency_only(epoch, rate).await;
    }
    let started = Instant::now();
    let load_start = loadavg();
    // Column 0 is this build; the others are peers measured beside it.
    let mut systems: Vec<(String, System)> = vec![(
        "Cirrus queue".into(),
        System::Cirrus(Box::new(
            Cirrus::start(epoch, env!("CARGO_BIN_EXE_queue")).await,
        )),
    )];
    // `QUEUE_BENCH_BASELINE=/path/to/queue[:label]`: an earlier build of the
    // queue binary, measured in the same run ("before").
    if let Ok(b) = std::env::var("QUEUE_BENCH_BASELINE") {
        let (path, label) = b.split_once(':').unwrap_or((&b, "before"));
        systems.push((
            format!("Cirrus {label}"),
            System::Cirrus(Box::new(Cirrus::start(epoch, path).await)),
        ));
    }
    let rabbit_at = systems.len();
    let have_rabbit = match Rabbit::connect(epoch).await {
        Some(r) => {
            systems.push(("RabbitMQ".into(), System::Rabbit(r)));
            true
        }
        None => false,
    };
    if let Some(n) = Nats::connect(epoch).await {
        systems.push(("NATS JetStream".into(), System::Nats(n)));
    }
    let n = systems.len();
    let mut f = vec![Figures::default(); n];
    let tag = uuid::Uuid::new_v4().simple().to_string();

    eprintln!("publish, single ...");
    for (i, (_, s)) in systems.iter().enumerate() {
        f[i].single = s.publish_rate(&s.name("single", &tag), PUBLISHERS, 1).await;
    }
    eprintln!("publish, batched ...");
    for (i, (_, s)) in systems.iter().enumerate() {
        f[i].batched = s
            .publish_rate(&s.name("batched", &tag), BATCH_PUBLISHERS, BATCH)
            .await;
    }
    // The same offered load for all: half the smaller single-publish maximum
    // of this build and RabbitMQ.
    let offered = 0.5
        * if have_rabbit {
            f[0].single.min(f[rabbit_at].single)
        } else {
            f[0].single
        };
    eprintln!("publish -> deliver latency at {offered:.0} msg/s ...");
    for (i, (_, s)) in systems.iter().enumerate() {
        (f[i].p50, f[i].p99, f[i].confirm_p50) = s.latency(&s.name("latency", &tag), offered).await;
        f[i].latency_rate = offered;
    }
    eprintln!("publish -> deliver latency at {LOW_RATE} msg/s ...");
    for (i, (_, s)) in systems.iter().enumerate() {
        (f[i].low_p50, f[i].low_p99, _) = s.latency(&s.name("latency-low", &tag), LOW_RATE).await;
    }
    eprintln!("consume and ack ...");
    for (i, (_, s)) in systems.iter().enumerate() {
        f[i].consume = s.consume_rate(&s.name("consume", &tag)).await;
    }

    let row = |label: String, cell: &dyn Fn(&Figures) -> String, anchor: &str| {
        let cells: Vec<String> = f.iter().map(cell).collect();
        println!("| {label} | {} | {anchor} |", cells.join(" | "));
    };
    println!();
    println!(
        "Same run, same machine ({} s phases, {PAYLOAD}-byte persistent messages; load average {load_start} at start, {} at end)",
        phase().as_secs(),
        loadavg()
    );
    let names: Vec<&str> = systems.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "| figure | {} | anchor: oslo.messaging on 3-node RabbitMQ |",
        names.join(" | ")
    );
    println!("|---|{}---|", "---|".repeat(n));
    row(
        format!("durable confirmed publish, 1 msg/request, {PUBLISHERS} publishers"),
        &|x| rate(x.single),
        "9,300 casts/s",
    );
    row(
        format!("durable confirmed publish, batches of {BATCH}, {BATCH_PUBLISHERS} publishers"),
        &|x| rate(x.batched),
        "-",
    );
    row(
        format!("publish→deliver p50 at {offered:.0} msg/s"),
        &|x| ms(x.p50),
        "13.6 ms (call latency, 50 threads)",
    );
    row(
        format!("publish→deliver p99 at {offered:.0} msg/s"),
        &|x| ms(x.p99),
        "-",
    );
    row(
        format!("publish→deliver p50 / p99 at {LOW_RATE:.0} msg/s"),
        &|x| format!("{} / {}", ms(x.low_p50), ms(x.low_p99)),
        "-",
    );
    row(
        format!("publish→confirm p50 at {offered:.0} msg/s (the durable write alone)"),
        &|x| ms(x.confirm_p50),
        "-",
    );
    row(
        format!("consume and ack, {CONSUMERS} consumers × {CREDITS} credits, {PRELOAD} messages"),
        &|x| rate(x.consume),
        "-",
    );
    println!();
    let c = f[0];
    if have_rabbit {
        let r = f[rabbit_at];
        println!(
            "target: durable confirmed publish ≥ RabbitMQ's: single {} ({:.2}x), batched {} ({:.2}x)",
            if c.single >= r.single {
                "met"
            } else {
                "NOT met"
            },
            c.single / r.single.max(1.0),
            if c.batched >= r.batched {
                "met"
            } else {
                "NOT met"
            },
            c.batched / r.batched.max(1.0),
        );
    }
    println!(
        "target: publish→deliver p50 ≤ 5 ms and p99 ≤ 20 ms at half the maximum rate: {} ({} / {})",
        if c.p50 <= Duration::from_millis(5) && c.p99 <= Duration::from_millis(20) {
            "met"
        } else {
            "NOT met"
        },
        ms(c.p50),
        ms(c.p99)
    );
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());
    for (_, s) in systems {
        if let System::Cirrus(c) = s {
            let mut child = c.child;
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}
