//! Real queue servers for tests: in-process on `127.0.0.1:0` with their own
//! Postgres database, or the built `queue` binary as a child process (for
//! kill -9), plus a raw consumer stream to drive the protocol by hand.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::queue::v1 as pb;
use queue::{Config, Queue};
use runtime::config::{DatabaseConfig, ServerConfig};
use runtime::db::TestDatabase;
use runtime::testing::Served;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn test_config(url: &str) -> Config {
    Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
        },
        database: DatabaseConfig {
            url: url.to_string(),
            pool_size: 4,
            ..Config::default().database
        },
        committers: 1,
        poll_interval_ms: 100,
        sweep_interval_secs: 1,
        trust_direct_callers: true,
        ..Config::default()
    }
}

/// A queue served in-process by `runtime::testing::Served`, with its database.
pub struct Server {
    pub addr: SocketAddr,
    pub channel: Channel,
    served: Served,
    pub db: Option<Arc<TestDatabase>>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = Arc::new(
            TestDatabase::create()
                .await
                .expect("test database (is Postgres running?)"),
        );
        Self::replica(&db, tweak).await
    }

    /// Another replica on the same database.
    pub async fn replica(db: &Arc<TestDatabase>, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(&db.url);
        tweak(&mut config);
        let q = Queue::start(config).await.unwrap();
        let served = Served::spawn(|listener, shutdown| queue::serve(q, listener, shutdown)).await;
        Self {
            addr: served.addr,
            channel: served.channel.clone(),
            served,
            db: Some(db.clone()),
        }
    }

    /// Drains the server (consumer streams end) and waits for it.
    pub async fn stop(self) {
        tokio::time::timeout(WAIT, self.served.stop())
            .await
            .expect("the queue did not stop within the wait")
            .unwrap();
    }

    pub fn client(&self) -> queue::client::Client {
        queue::client::Client::from_channel(self.channel.clone())
    }
    pub fn queue(&self) -> pb::queue_client::QueueClient<Channel> {
        pb::queue_client::QueueClient::new(self.channel.clone())
    }
    pub fn topics(&self) -> pb::topics_client::TopicsClient<Channel> {
        pb::topics_client::TopicsClient::new(self.channel.clone())
    }

    pub async fn create_topic(&self, name: &str, max_attempts: u32) {
        self.topics()
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                settings: Some(pb::TopicSettings {
                    max_attempts,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }

    pub async fn stats(&self, topic: &str) -> pb::TopicStats {
        self.topics()
            .get_topic_stats(pb::GetTopicStatsRequest { name: topic.into() })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn publish(&self, topic: &str, payloads: &[&str]) -> Vec<pb::Published> {
        let msgs = payloads.iter().map(|p| msg(p)).collect();
        publish(&self.channel, topic, msgs).await.unwrap()
    }

    pub async fn consumer(&self, topic: &str, group: &str, credits: u32, lease_ms: u32) -> Raw {
        Raw::open(&self.channel, topic, group, credits, lease_ms)
            .await
            .unwrap()
    }
}

pub fn msg(payload: &str) -> pb::Message {
    pb::Message {
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub async fn publish(
    ch: &Channel,
    topic: &str,
    messages: Vec<pb::Message>,
) -> Result<Vec<pb::Published>, tonic::Status> {
    pb::queue_client::QueueClient::new(ch.clone())
        .publish(pb::PublishRequest {
            topic: topic.into(),
            messages,
        })
        .await
        .map(|r| r.into_inner().messages)
}

/// A consumer stream driven by hand.
#[derive(Debug)]
pub struct Raw {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    rx: Streaming<pb::SubscribeResponse>,
    pub settled: Vec<pb::Settled>,
    pub deliveries: std::collections::VecDeque<pb::Delivery>,
}

pub fn open_req(topic: &str, group: &str, credits: u32, lease_ms: u32) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(pb::Open {
            topic: topic.into(),
            group: group.into(),
            credits,
            lease_ms,
            start: 0,
        })),
    }
}

impl Raw {
    pub async fn open(
        ch: &Channel,
        topic: &str,
        group: &str,
        credits: u32,
        lease_ms: u32,
    ) -> Result<Self, tonic::Status> {
        Self::open_with(ch, open_req(topic, group, credits, lease_ms), |_| {}).await
    }

    pub async fn open_with(
        ch: &Channel,
        first: pb::SubscribeRequest,
        meta: impl FnOnce(&mut tonic::metadata::MetadataMap),
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(first).await.unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        meta(req.metadata_mut());
        let mut rx = pb::queue_client::QueueClient::new(ch.clone())
            .subscribe(req)
            .await?
            .into_inner();
        // The server answers `opened` first.
        match tokio::time::timeout(WAIT, rx.message()).await.unwrap()? {
            Some(pb::SubscribeResponse {
                response: Some(pb::subscribe_response::Response::Opened(_)),
            }) => {}
            other => panic!("expected opened, got {other:?}"),
        }
        Ok(Self {
            tx,
            rx,
            settled: Vec::new(),
            deliveries: Default::default(),
        })
    }

    async fn read(&mut self, wait: Duration) -> Result<bool, tonic::Status> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Err(_) => Ok(false),
            Ok(Err(s)) => Err(s),
            Ok(Ok(None)) => Err(tonic::Status::unavailable("stream ended")),
            Ok(Ok(Some(m))) => {
                match m.response {
                    Some(pb::subscribe_response::Response::Delivery(d)) => {
                        self.deliveries.push_back(d)
                    }
                    Some(pb::subscribe_response::Response::Settled(s)) => self.settled.push(s),
                    other => panic!("unexpected {other:?}"),
                }
                Ok(true)
            }
        }
    }

    /// The next delivery, or None if none comes within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<pb::Delivery> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(d) = self.deliveries.pop_front() {
                return Some(d);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.read(left).await.unwrap() {
                return None;
            }
        }
    }

    pub async fn next(&mut self) -> pb::Delivery {
        self.next_within(WAIT)
            .await
            .expect("a delivery within the wait")
    }

    pub async fn send(&self, r: pb::subscribe_request::Request) {
        self.tx
            .send(pb::SubscribeRequest { request: Some(r) })
            .await
            .unwrap();
    }

    /// Sends a settlement and waits for its outcome.
    pub async fn settle(&mut self, r: pb::subscribe_request::Request, id: &str) -> pb::Settled {
        self.send(r).await;
        self.outcome(id).await
    }

    /// Waits for the outcome of a settlement already sent.
    pub async fn outcome(&mut self, id: &str) -> pb::Settled {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(i) = self.settled.iter().position(|s| s.delivery_id == id) {
                return self.settled.remove(i);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                self.read(left).await.unwrap(),
                "no settlement within the wait"
            );
        }
    }

    pub async fn ack(&mut self, id: &str) -> pb::Settled {
        let r = pb::subscribe_request::Request::Ack(pb::Ack {
            delivery_ids: vec![id.into()],
        });
        self.settle(r, id).await
    }

    pub async fn nack(&mut self, id: &str, delay_ms: u32) -> pb::Settled {
        let r = pb::subscribe_request::Request::Nack(pb::Nack {
            delivery_ids: vec![id.into()],
            requeue_delay_ms: delay_ms,
        });
        self.settle(r, id).await
    }

    /// Reads until the server ends the stream; returns its status.
    pub async fn error(&mut self) -> tonic::Status {
        loop {
            match self.read(WAIT).await {
                Ok(true) => continue,
                Ok(false) => panic!("the stream did not end within the wait"),
                Err(s) => return s,
            }
        }
    }
}

/// The `queue` binary as a child process, for kill -9.
pub struct Proc {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl Proc {
    /// Starts the binary with a TOML config in `dir`, listening on `listen`
    /// (port 0 for any), and waits for its "listening on" line.
    pub async fn spawn(dir: &Path, db_url: &str, listen: &str) -> Self {
        let cfg = dir.join("queue.toml");
        let mut config = test_config(db_url);
        config.server = ServerConfig {
            listen: listen.parse().unwrap(),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        };
        std::fs::write(&cfg, toml::to_string(&config).unwrap()).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue"))
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .env_remove("CIRRUS_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(WAIT, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                if let Some(a) = l.strip_prefix("queue listening on ") {
                    return a.trim().parse::<SocketAddr>().unwrap();
                }
            }
            panic!("queue exited before listening");
        })
        .await
        .expect("the queue binary did not start within the wait");
        // Keep draining stdout so the child never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let p = Self { child, addr };
        p.wait_healthy().await;
        p
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while runtime::serve::healthcheck(self.addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not healthy within the wait"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap()
            .unwrap();
    }
}
