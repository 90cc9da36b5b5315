//! The queue beside RabbitMQ, measured in the same run on this machine.
//!
//! Starts the `queue` binary against a fresh database and, side by side,
//! drives RabbitMQ at 127.0.0.1:5672 (guest/guest; durable queue,
//! persistent messages, publisher confirms, manual acks). Prints one table
//! with each figure beside RabbitMQ's and the oslo.messaging anchor.
//!
//! `cargo bench -p queue` (about two minutes). Set `QUEUE_BENCH_SECS` to
//! change the length of each timed phase (default 5).
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
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

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
    async fn start(epoch: Instant) -> Self {
        let db = runtime::db::TestDatabase::create()
            .await
            .expect("a Postgres at 127.0.0.1:5432");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("queue.toml");
        let config = queue::Config {
            server: runtime::config::ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            },
            database: runtime::config::DatabaseConfig {
                url: db.url.clone(),
                ..queue::Config::default().database
            },
            trust_direct_callers: true,
            ..Default::default()
        };
        std::fs::write(&cfg, toml::to_string(&config).unwrap()).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue"))
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

async fn async_main() {
    let epoch = Instant::now();
    let started = Instant::now();
    let cirrus = Cirrus::start(epoch).await;
    let rabbit = Rabbit::connect(epoch).await;
    let mut c = Figures::default();
    let mut r = Figures::default();
    let tag = uuid::Uuid::new_v4().simple().to_string();

    eprintln!("publish, single ...");
    c.single = cirrus.publish_rate("bench.single", PUBLISHERS, 1).await;
    if let Some(rb) = &rabbit {
        r.single = rb
            .publish_rate(&format!("cirrus-bench-single-{tag}"), PUBLISHERS, 1)
            .await;
    }
    eprintln!("publish, batched ...");
    c.batched = cirrus
        .publish_rate("bench.batched", BATCH_PUBLISHERS, BATCH)
        .await;
    if let Some(rb) = &rabbit {
        r.batched = rb
            .publish_rate(
                &format!("cirrus-bench-batched-{tag}"),
                BATCH_PUBLISHERS,
                BATCH,
            )
            .await;
    }
    // The same offered load for both: half the smaller single-publish maximum.
    let offered = 0.5
        * if rabbit.is_some() {
            c.single.min(r.single)
        } else {
            c.single
        };
    eprintln!("publish -> deliver latency at {offered:.0} msg/s ...");
    (c.p50, c.p99, c.confirm_p50) = cirrus.latency("bench.latency", offered).await;
    c.latency_rate = offered;
    if let Some(rb) = &rabbit {
        (r.p50, r.p99, r.confirm_p50) = rb
            .latency(&format!("cirrus-bench-latency-{tag}"), offered)
            .await;
        r.latency_rate = offered;
    }
    eprintln!("publish -> deliver latency at {LOW_RATE} msg/s ...");
    (c.low_p50, c.low_p99, _) = cirrus.latency("bench.latency-low", LOW_RATE).await;
    if let Some(rb) = &rabbit {
        (r.low_p50, r.low_p99, _) = rb
            .latency(&format!("cirrus-bench-latency-low-{tag}"), LOW_RATE)
            .await;
    }
    eprintln!("consume and ack ...");
    c.consume = cirrus.consume_rate("bench.consume").await;
    if let Some(rb) = &rabbit {
        r.consume = rb
            .consume_rate(&format!("cirrus-bench-consume-{tag}"))
            .await;
    }

    let na = |s: String| if rabbit.is_some() { s } else { "n/a".into() };
    println!();
    println!(
        "Cirrus queue vs RabbitMQ, same run, same machine ({} s phases, {PAYLOAD}-byte persistent messages)",
        phase().as_secs()
    );
    println!(
        "| figure | Cirrus queue | RabbitMQ (same run) | anchor: oslo.messaging on 3-node RabbitMQ |"
    );
    println!("|---|---|---|---|");
    println!(
        "| durable confirmed publish, 1 msg/request, {PUBLISHERS} publishers | {} | {} | 9,300 casts/s |",
        rate(c.single),
        na(rate(r.single))
    );
    println!(
        "| durable confirmed publish, batches of {BATCH}, {BATCH_PUBLISHERS} publishers | {} | {} | - |",
        rate(c.batched),
        na(rate(r.batched))
    );
    println!(
        "| publish→deliver p50 at {:.0} msg/s | {} | {} | 13.6 ms (call latency, 50 threads) |",
        offered,
        ms(c.p50),
        na(ms(r.p50))
    );
    println!(
        "| publish→deliver p99 at {:.0} msg/s | {} | {} | - |",
        offered,
        ms(c.p99),
        na(ms(r.p99))
    );
    println!(
        "| publish→deliver p50 / p99 at {LOW_RATE:.0} msg/s | {} / {} | {} | - |",
        ms(c.low_p50),
        ms(c.low_p99),
        na(format!("{} / {}", ms(r.low_p50), ms(r.low_p99)))
    );
    println!(
        "| publish→confirm p50 at {:.0} msg/s (the durable write alone) | {} | {} | - |",
        offered,
        ms(c.confirm_p50),
        na(ms(r.confirm_p50))
    );
    println!(
        "| consume and ack, {CONSUMERS} consumers × {CREDITS} credits, {PRELOAD} messages | {} | {} | - |",
        rate(c.consume),
        na(rate(r.consume))
    );
    println!();
    if rabbit.is_some() {
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
        "target: publish→deliver p50 ≤ 5 ms at half the maximum rate: {} ({})",
        if c.p50 <= Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        },
        ms(c.p50)
    );
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());
    let mut child = cirrus.child;
    let _ = child.start_kill();
    let _ = child.wait().await;
}
