//! The client: publishing, subscribing, settling.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use proto::queue::v1 as pb;
use runtime::trace::Channel;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use pb::StartPosition;
pub use pb::queue_client::QueueClient;
pub use pb::topics_client::TopicsClient;

/// The queue's name in the catalog (what a sidecar resolves).
pub const SERVICE: &str = "queue";
/// The header naming a payload's encoding, and the value [`json_message`] sets.
pub const CONTENT_TYPE: &str = "content-type";
pub const JSON: &str = "application/json";

/// Every call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one publish while the queue is unavailable.
const PUBLISH_ATTEMPTS: u32 = 5;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A handle on the queue; cheap to clone.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

/// How a subscription consumes.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeOptions {
    /// Most unacked deliveries held at once.
    pub credits: u32,
    /// How long a delivery is ours before it is redelivered.
    pub lease: Duration,
    /// Where a new group starts.
    pub start: StartPosition,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            credits: 16,
            lease: Duration::from_secs(30),
            start: StartPosition::Earliest,
        }
    }
}

/// Writes the current span's W3C trace context into `headers`.
pub fn inject_trace_context(headers: &mut HashMap<String, String>) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, headers);
}

/// Reads a W3C trace context from message headers.
pub fn extract_trace_context(headers: &HashMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(headers)
}

/// A message carrying `payload`, the current span's trace context and a fresh
/// idempotency id (which makes the client's retries exact).
pub fn message(payload: Vec<u8>) -> pb::Message {
    let mut headers = HashMap::new();
    inject_trace_context(&mut headers);
    pb::Message {
        payload,
        headers,
        key: None,
        idempotency_id: Some(uuid::Uuid::new_v4().to_string()),
    }
}

/// A [`message`] whose payload is `value` as JSON, with a
/// `content-type: application/json` header.
pub fn json_message<T: Serialize + ?Sized>(value: &T) -> Result<pb::Message, Status> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| Status::invalid_argument(format!("cannot encode the message as JSON: {e}")))?;
    let mut msg = message(payload);
    msg.headers
        .insert(CONTENT_TYPE.to_string(), JSON.to_string());
    Ok(msg)
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown
    )
}

impl Client {
    /// A client whose connection is made on first use (and remade as needed).
    pub fn connect_lazy(endpoint: &str) -> Result<Self, Status> {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| Status::invalid_argument(format!("bad queue endpoint: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self::from_channel(channel))
    }

    /// A client that reaches the queue through this workload's sidecar: plaintext
    /// to the sidecar's outbound listener on loopback, addressed `http://queue`;
    /// the sidecar dials the queue over mTLS with this workload's identity.
    pub fn via_sidecar(outbound: SocketAddr) -> Result<Self, Status> {
        let channel = runtime::serve::via_sidecar(outbound, SERVICE)
            .map_err(|e| Status::invalid_argument(format!("bad sidecar address: {e}")))?;
        Ok(Self { channel })
    }

    /// [`Client::via_sidecar`] over the sidecar's outbound Unix socket when
    /// `socket` is given (issue 13), else its loopback TCP listener `addr`;
    /// `None` without either.
    pub fn through_sidecar(
        socket: Option<&std::path::Path>,
        addr: Option<SocketAddr>,
    ) -> Option<Result<Self, Status>> {
        runtime::local::via_sidecar(socket, addr, SERVICE).map(|c| {
            c.map(|channel| Self { channel })
                .map_err(|e| Status::invalid_argument(format!("bad sidecar address: {e}")))
        })
    }

    /// A client over an existing channel (tests, or a caller's own settings);
    /// its calls carry the trace context like every runtime channel's.
    pub fn from_channel(channel: tonic::transport::Channel) -> Self {
        Self {
            channel: runtime::trace::traced(channel),
        }
    }

    pub fn queue(&self) -> QueueClient<Channel> {
        QueueClient::new(self.channel.clone())
    }

    pub fn topics(&self) -> TopicsClient<Channel> {
        TopicsClient::new(self.channel.clone())
    }

    /// Creates the topic unless it exists.
    pub async fn ensure_topic(
        &self,
        name: &str,
        settings: pb::TopicSettings,
    ) -> Result<(), Status> {
        let mut req = tonic::Request::new(pb::CreateTopicRequest {
            name: name.to_string(),
            settings: Some(settings),
        });
        req.set_timeout(CALL_TIMEOUT);
        match self.topics().create_topic(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(s),
        }
    }

    /// Publishes one message (a cast) durably; returns its message id.
    pub async fn cast(&self, topic: &str, payload: Vec<u8>) -> Result<String, Status> {
        self.publish_one(topic, message(payload)).await
    }

    /// Publishes `value` as JSON (content type `application/json` in the
    /// headers), with the current trace context; returns its message id.
    pub async fn cast_json<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<String, Status> {
        self.publish_one(topic, json_message(value)?).await
    }

    /// Publishes one message as built (see [`message`] and [`json_message`]
    /// for ones with trace context and an idempotency id); returns its id.
    pub async fn publish_one(&self, topic: &str, msg: pb::Message) -> Result<String, Status> {
        let mut out = self.publish(topic, vec![msg]).await?;
        out.pop()
            .map(|p| p.message_id)
            .ok_or_else(|| Status::internal("the queue answered a publish with no message id"))
    }

    /// Publishes messages durably, retrying with backoff while the queue is
    /// unavailable. Give messages idempotency ids to make retries exact.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<pb::Message>,
    ) -> Result<Vec<pb::Published>, Status> {
        let mut backoff = BACKOFF_START;
        let mut attempt = 1;
        loop {
            let mut req = tonic::Request::new(pb::PublishRequest {
                topic: topic.to_string(),
                messages: messages.clone(),
            });
            req.set_timeout(CALL_TIMEOUT);
            match self.queue().publish(req).await {
                Ok(r) => return Ok(r.into_inner().messages),
                Err(s) if retryable(s.code()) && attempt < PUBLISH_ATTEMPTS => {
                    tracing::debug!(%topic, status = %s, "publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// Consumes `topic` as a member of `group` with default options.
    pub fn subscribe(&self, topic: &str, group: &str) -> Subscription {
        self.subscribe_with(topic, group, SubscribeOptions::default())
    }

    pub fn subscribe_with(&self, topic: &str, group: &str, opts: SubscribeOptions) -> Subscription {
        let credits = opts.credits.max(1);
        let (deliveries, rx) = mpsc::channel(credits as usize);
        let (control, control_rx) = mpsc::channel(credits as usize * 2 + 16);
        let open = pb::Open {
            topic: topic.to_string(),
            group: group.to_string(),
            credits,
            lease_ms: opts.lease.as_millis().min(u32::MAX as u128) as u32,
            start: opts.start as i32,
        };
        let task = tokio::spawn(consume(
            self.queue(),
            open,
            deliveries,
            control.clone(),
            control_rx,
        ));
        Subscription { rx, task }
    }
}

/// A running subscription; dropping it closes the stream.
pub struct Subscription {
    rx: mpsc::Receiver<Result<Delivery, Status>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    /// The next delivery; an `Err` is final (the topic is gone, the caller
    /// may not consume it, the request was invalid), after which this
    /// returns `None`.
    pub async fn next(&mut self) -> Option<Result<Delivery, Status>> {
        self.rx.recv().await
    }
}

enum Settle {
    Ack,
    Nack(Duration),
    Extend(Duration),
}

struct Control {
    generation: u64,
    delivery_id: String,
    op: Settle,
    reply: oneshot::Sender<Result<(), Status>>,
}

/// One message leased to this consumer.
#[derive(Debug)]
pub struct Delivery {
    pub message_id: String,
    pub delivery_id: String,
    pub attempt: u32,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
    pub key: Option<String>,
    pub published_at_ms: i64,
    pub lease_expires_at_ms: i64,
    generation: u64,
    control: mpsc::Sender<Control>,
}

impl Delivery {
    async fn settle(&self, op: Settle) -> Result<(), Status> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control {
                generation: self.generation,
                delivery_id: self.delivery_id.clone(),
                op,
                reply,
            })
            .await
            .map_err(|_| Status::cancelled("the subscription was dropped"))?;
        tokio::time::timeout(CALL_TIMEOUT, answer)
            .await
            .map_err(|_| Status::deadline_exceeded("no answer to the settlement"))?
            .map_err(|_| Status::unavailable("the stream broke; the message will be redelivered"))?
    }

    /// Done with it: the queue forgets the message for this group.
    pub async fn ack(&self) -> Result<(), Status> {
        self.settle(Settle::Ack).await
    }

    /// Give it back, to be redelivered (attempt + 1) after `delay`.
    pub async fn nack(&self, delay: Duration) -> Result<(), Status> {
        self.settle(Settle::Nack(delay)).await
    }

    /// Keep it for `lease` more from now.
    pub async fn extend(&self, lease: Duration) -> Result<(), Status> {
        self.settle(Settle::Extend(lease)).await
    }

    /// The payload decoded from JSON. An `Err` means the message can never be
    /// handled: settle it (ack, or nack to let it reach the dead-letter topic).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The publisher's trace context.
    pub fn trace_context(&self) -> opentelemetry::Context {
        extract_trace_context(&self.headers)
    }

    /// A span for handling this message, child of the publisher's span.
    pub fn span(&self) -> tracing::Span {
        let span = tracing::info_span!("queue.consume", message_id = %self.message_id, attempt = self.attempt);
        let _ = span.set_parent(self.trace_context());
        span
    }
}

/// Keeps one stream open (reopening it with backoff) and moves deliveries
/// and settlements between it and the application.
async fn consume(
    mut client: QueueClient<Channel>,
    open: pb::Open,
    deliveries: mpsc::Sender<Result<Delivery, Status>>,
    control: mpsc::Sender<Control>,
    mut control_rx: mpsc::Receiver<Control>,
) {
    let credits = open.credits as usize;
    let mut backoff = BACKOFF_START;
    let mut generation = 0u64;
    loop {
        generation += 1;
        let (req_tx, req_rx) = mpsc::channel::<pb::SubscribeRequest>(credits * 2 + 16);
        let _ = req_tx
            .send(pb::SubscribeRequest {
                request: Some(pb::subscribe_request::Request::Open(open.clone())),
            })
            .await;
        let mut stream = match client.subscribe(ReceiverStream::new(req_rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) if retryable(s.code()) => {
                tracing::debug!(status = %s, "subscribe failed; retrying");
                if !wait_or_answer(backoff, &mut control_rx, &deliveries).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(s) => {
                let _ = deliveries.send(Err(s)).await;
                return;
            }
        };
        // Deliveries read but not yet handed over; bounded by the credits.
        let mut ready: VecDeque<Delivery> = VecDeque::new();
        let mut pending: Waiters = HashMap::new();
        let broke: Status = loop {
            tokio::select! {
                permit = deliveries.reserve(), if !ready.is_empty() => match permit {
                    Ok(p) => {
                        if let Some(d) = ready.pop_front() {
                            p.send(Ok(d));
                        }
                    }
                    Err(_) => return,
                },
                msg = stream.message(), if ready.len() < credits => match msg {
                    Ok(Some(m)) => match m.response {
                        Some(pb::subscribe_response::Response::Opened(_)) => backoff = BACKOFF_START,
                        Some(pb::subscribe_response::Response::Delivery(d)) => ready.push_back(Delivery {
                            message_id: d.message_id,
                            delivery_id: d.delivery_id,
                            attempt: d.attempt,
                            headers: d.headers,
                            payload: d.payload,
                            key: d.key,
                            published_at_ms: d.published_at_ms,
                            lease_expires_at_ms: d.lease_expires_at_ms,
                            generation,
                            control: control.clone(),
                        }),
                        Some(pb::subscribe_response::Response::Settled(s)) => {
                            if let Some(waiters) = pending.remove(&s.delivery_id) {
                                let code = Code::from_i32(s.code);
                                for w in waiters {
                                    let r = if code == Code::Ok { Ok(()) } else { Err(Status::new(code, s.message.clone())) };
                                    let _ = w.send(r);
                                }
                            }
                        }
                        None => {}
                    },
                    Ok(None) => break Status::unavailable("the queue closed the stream"),
                    Err(s) if retryable(s.code()) => break s,
                    Err(s) => {
                        let _ = deliveries.send(Err(s)).await;
                        return;
                    }
                },
                () = deliveries.closed() => return,
                c = control_rx.recv() => {
                    let Some(first) = c else { return };
                    // Settlements that are already waiting go in one request per
                    // kind: one `ack` frame for many deliveries.
                    let mut batch = vec![first];
                    while batch.len() < credits.max(16) {
                        match control_rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    let mut acks = Vec::new();
                    for c in batch {
                        if c.generation != generation {
                            let _ = c.reply.send(Err(Status::failed_precondition(
                                "the stream that carried this delivery broke; it will be redelivered",
                            )));
                            continue;
                        }
                        use pb::subscribe_request::Request as Q;
                        let ids = vec![c.delivery_id.clone()];
                        let request = match c.op {
                            Settle::Ack => {
                                acks.push(c);
                                continue;
                            }
                            Settle::Nack(d) => Q::Nack(pb::Nack {
                                delivery_ids: ids,
                                requeue_delay_ms: d.as_millis().min(u32::MAX as u128) as u32,
                            }),
                            Settle::Extend(d) => Q::Extend(pb::Extend {
                                delivery_ids: ids,
                                lease_ms: d.as_millis().min(u32::MAX as u128) as u32,
                            }),
                        };
                        send_settle(&req_tx, request, vec![c], &mut pending).await;
                    }
                    if !acks.is_empty() {
                        let ids = acks.iter().map(|c| c.delivery_id.clone()).collect();
                        let request = pb::subscribe_request::Request::Ack(pb::Ack { delivery_ids: ids });
                        send_settle(&req_tx, request, acks, &mut pending).await;
                    }
                }
            }
        };
        tracing::debug!(status = %broke, "subscription stream broke; reconnecting");
        // Waiters of the broken stream get an error when `pending` drops.
        drop(pending);
        if !wait_or_answer(backoff, &mut control_rx, &deliveries).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type Waiters = HashMap<String, Vec<oneshot::Sender<Result<(), Status>>>>;

/// Sends one settlement request and records who waits for its outcomes.
async fn send_settle(
    req_tx: &mpsc::Sender<pb::SubscribeRequest>,
    request: pb::subscribe_request::Request,
    controls: Vec<Control>,
    pending: &mut Waiters,
) {
    if req_tx
        .send(pb::SubscribeRequest {
            request: Some(request),
        })
        .await
        .is_err()
    {
        for c in controls {
            let _ = c.reply.send(Err(Status::unavailable("the stream broke")));
        }
        return;
    }
    for c in controls {
        let waiters = pending.entry(c.delivery_id).or_default();
        // Bounded: a delivery settled over and over keeps only a few waiters.
        if waiters.len() < 16 {
            waiters.push(c.reply);
        }
    }
}

/// Sleeps for `backoff` while refusing settlements of the broken stream.
/// Returns false when the subscription was dropped.
async fn wait_or_answer(
    backoff: Duration,
    control_rx: &mut mpsc::Receiver<Control>,
    deliveries: &mpsc::Sender<Result<Delivery, Status>>,
) -> bool {
    let sleep = tokio::time::sleep(backoff);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return !deliveries.is_closed(),
            c = control_rx.recv() => match c {
                Some(c) => {
                    let _ = c.reply.send(Err(Status::failed_precondition(
                        "the stream that carried this delivery broke; it will be redelivered",
                    )));
                }
                None => return false,
            },
            () = deliveries.closed() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_messages_are_marked_and_carry_an_idempotency_id() {
        let m = json_message(&serde_json::json!({"op": "build"})).expect("encodes");
        assert_eq!(m.payload, br#"{"op":"build"}"#);
        assert_eq!(m.headers.get(CONTENT_TYPE).map(String::as_str), Some(JSON));
        let id = m.idempotency_id.expect("an idempotency id");
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        assert_ne!(message(vec![]).idempotency_id, Some(id));
    }
}
