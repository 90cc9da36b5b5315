//! Just enough of the NATS client protocol to drive JetStream beside the
//! queue: `PUB` with a reply inbox (JetStream answers with its publish ack
//! once the message is stored), stream and consumer creation through
//! `$JS.API`, a push consumer in a deliver group, and acks to the reply
//! subject of each delivery. Text protocol over one TCP connection per
//! [`Conn`]; no TLS, no headers, no flow control (none is asked for).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

pub const NATS_ADDR: &str = "127.0.0.1:4222";

/// One delivery on a subscription.
pub struct Msg {
    pub reply: Option<String>,
    pub payload: Vec<u8>,
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;
type Subs = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Msg>>>>;

/// One connection: requests answered on its inbox, and subscriptions.
#[derive(Clone)]
pub struct Conn {
    w: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    waiters: Waiters,
    subs: Subs,
    next: Arc<AtomicU64>,
    inbox: String,
}

/// The subscription id of the connection's inbox.
const INBOX_SID: u64 = 1;

impl Conn {
    pub async fn connect() -> std::io::Result<Self> {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(NATS_ADDR))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut info = String::new();
        r.read_line(&mut info).await?;
        if !info.starts_with("INFO ") || !info.contains("\"jetstream\":true") {
            return Err(std::io::Error::other(format!(
                "not a JetStream server: {}",
                info.trim()
            )));
        }
        let inbox = format!("_INBOX.{}", uuid::Uuid::new_v4().simple());
        let c = Self {
            w: Arc::new(tokio::sync::Mutex::new(w)),
            waiters: Arc::default(),
            subs: Arc::default(),
            next: Arc::new(AtomicU64::new(INBOX_SID + 1)),
            inbox,
        };
        c.write(
            format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false,\"name\":\"cirrus-bench\"}}\r\nSUB {}.* {INBOX_SID}\r\n",
                c.inbox
            )
            .as_bytes(),
        )
        .await?;
        tokio::spawn(read_loop(r, c.clone()));
        // A round trip proves the server took CONNECT and SUB.
        c.request("$JS.API.INFO", b"").await?;
        Ok(c)
    }

    async fn write(&self, b: &[u8]) -> std::io::Result<()> {
        self.w.lock().await.write_all(b).await
    }

    fn pub_frame(subject: &str, reply: Option<&str>, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(payload.len() + subject.len() + 64);
        f.extend_from_slice(b"PUB ");
        f.extend_from_slice(subject.as_bytes());
        if let Some(r) = reply {
            f.push(b' ');
            f.extend_from_slice(r.as_bytes());
        }
        f.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
        f.extend_from_slice(payload);
        f.extend_from_slice(b"\r\n");
        f
    }

    /// Publishes and waits for the answer on the inbox (for JetStream
    /// subjects: the publish ack, sent once the message is stored).
    pub async fn request(&self, subject: &str, payload: &[u8]) -> std::io::Result<Vec<u8>> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, tx);
        let reply = format!("{}.{token}", self.inbox);
        self.write(&Self::pub_frame(subject, Some(&reply), payload))
            .await?;
        let answer = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| std::io::Error::other(format!("no answer on {subject}")))?
            .map_err(|_| std::io::Error::other("connection closed"))?;
        Ok(answer)
    }

    /// A JetStream API call; panics on an API error.
    pub async fn api(&self, subject: &str, body: &str) -> String {
        let a = self.request(subject, body.as_bytes()).await.unwrap();
        let a = String::from_utf8_lossy(&a).into_owned();
        assert!(!a.contains("\"error\""), "{subject}: {a}");
        a
    }

    /// A durable publish: stored (and acked by JetStream) or a panic.
    pub async fn publish(&self, subject: &str, payload: &[u8]) {
        let a = self.request(subject, payload).await.unwrap();
        assert!(
            !a.windows(7).any(|w| w == b"\"error\""),
            "publish: {}",
            String::from_utf8_lossy(&a)
        );
    }

    /// Subscribes `subject` in queue group `group`.
    pub async fn subscribe(&self, subject: &str, group: &str) -> mpsc::UnboundedReceiver<Msg> {
        let sid = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sid, tx);
        self.write(format!("SUB {subject} {group} {sid}\r\n").as_bytes())
            .await
            .unwrap();
        rx
    }

    /// Acks a JetStream delivery (fire and forget, as RabbitMQ's basic.ack).
    pub async fn ack(&self, reply: &str) {
        self.write(&Self::pub_frame(reply, None, b""))
            .await
            .unwrap();
    }
}

async fn read_loop(mut r: BufReader<tokio::net::tcp::OwnedReadHalf>, c: Conn) {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let parts: Vec<&str> = line.split_ascii_whitespace().collect();
        match parts.first().copied() {
            Some("MSG") => {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let (subject, sid, reply, len) = match parts.len() {
                    4 => (parts[1], parts[2], None, parts[3]),
                    5 => (parts[1], parts[2], Some(parts[3].to_string()), parts[4]),
                    _ => return,
                };
                let len: usize = len.parse().unwrap_or(0);
                let mut payload = vec![0; len + 2];
                if r.read_exact(&mut payload).await.is_err() {
                    return;
                }
                payload.truncate(len);
                let sid: u64 = sid.parse().unwrap_or(0);
                if sid == INBOX_SID {
                    let token = subject.rsplit('.').next().and_then(|t| t.parse().ok());
                    let w = token.and_then(|t: u64| {
                        c.waiters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&t)
                    });
                    if let Some(w) = w {
                        let _ = w.send(payload);
                    }
                } else if let Some(tx) = c.subs.lock().unwrap_or_else(|p| p.into_inner()).get(&sid)
                {
                    let _ = tx.send(Msg { reply, payload });
                }
            }
            Some("PING") => {
                let _ = c.write(b"PONG\r\n").await;
            }
            Some("-ERR") => eprintln!("NATS: {}", line.trim()),
            _ => {}
        }
    }
}
