//! The gRPC adapter, the only place that knows tonic: validates every field
//! of every request into a typed value (`TryFrom` the wire message, into the
//! types of [`crate::model`]), calls [`Queue`], and maps the answers back.
//! Errors reach the wire through runtime's one `From<Error> for Status`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use proto::queue::v1 as pb;
use runtime::caller::Caller;
use runtime::error::Error;
use runtime::types::short;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::model::*;
use crate::policy::Principal;
use crate::service::Queue;

type R<T> = Result<Response<T>, Status>;

/// Most headers on one message, and their size.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_BYTES: usize = 8192;
const MAX_KEY: usize = 256;
const MAX_CREDITS: u32 = 10_000;
const MIN_LEASE_MS: u32 = 100;
const MAX_LEASE_MS: u32 = 3_600_000;
const MAX_DELAY_MS: u32 = 86_400_000;
const MAX_SECS: u64 = 365 * 86_400;
/// How long a new stream may take to send its `open`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Api {
    pub queue: Queue,
    pub closed: watch::Receiver<bool>,
}

fn who<T>(q: &Queue, req: &Request<T>) -> Result<Principal, Error> {
    q.principal(&Caller::from_metadata(req.metadata()))
}

/// One message of a publish, `i` its place in the batch.
fn message(i: usize, m: pb::Message) -> Result<NewMessage, Error> {
    if m.headers.len() > MAX_HEADERS {
        return Err(Error::invalid(
            "messages",
            format!("[{i}] has more than {MAX_HEADERS} headers"),
        ));
    }
    let header_bytes: usize = m.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Error::exhausted(format!(
            "messages: [{i}] has headers over {MAX_HEADER_BYTES} bytes"
        )));
    }
    if m.headers.keys().any(|k| k.is_empty()) {
        return Err(Error::invalid(
            "messages",
            format!("[{i}] has an empty header name"),
        ));
    }
    let short_text = |field: &str, s: Option<String>| -> Result<Option<String>, Error> {
        let bad = |why: &str| Error::invalid("messages", format!("[{i}].{field} {why}"));
        match s {
            None => Ok(None),
            Some(s) if s.is_empty() => Err(bad("must not be empty")),
            Some(s) if s.len() > MAX_KEY => Err(bad(&format!("is longer than {MAX_KEY} bytes"))),
            Some(s) if s.chars().any(char::is_control) => Err(bad("contains control characters")),
            Some(s) => Ok(Some(s)),
        }
    };
    Ok(NewMessage {
        payload: m.payload,
        headers: m.headers.into_iter().collect::<BTreeMap<_, _>>(),
        key: short_text("key", m.key)?,
        idempotency_id: short_text("idempotency_id", m.idempotency_id)?,
    })
}

impl TryFrom<pb::PublishRequest> for Publish {
    type Error = Error;
    fn try_from(r: pb::PublishRequest) -> Result<Self, Error> {
        let topic = QueueName::parse("topic", &r.topic)?;
        if r.messages.is_empty() {
            return Err(Error::invalid("messages", "must not be empty"));
        }
        if r.messages.len() > MAX_BATCH {
            return Err(Error::exhausted(format!(
                "more than {MAX_BATCH} messages in one publish"
            )));
        }
        let messages = r
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Publish { topic, messages })
    }
}

impl TryFrom<pb::CreateTopicRequest> for CreateTopic {
    type Error = Error;
    fn try_from(r: pb::CreateTopicRequest) -> Result<Self, Error> {
        let name = QueueName::parse("name", &r.name)?;
        let s = r.settings.unwrap_or_default();
        if s.retention_secs > MAX_SECS {
            return Err(Error::invalid("retention_secs", "must be at most a year"));
        }
        if s.ttl_secs > MAX_SECS {
            return Err(Error::invalid("ttl_secs", "must be at most a year"));
        }
        if s.max_attempts > 1000 {
            return Err(Error::invalid("max_attempts", "must be at most 1000"));
        }
        let nonzero = |v: u64| (v > 0).then(|| Duration::from_secs(v));
        Ok(CreateTopic {
            name,
            retention: nonzero(s.retention_secs),
            ttl: nonzero(s.ttl_secs),
            max_attempts: (s.max_attempts > 0).then_some(s.max_attempts),
        })
    }
}

fn ms(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn topic_pb(t: Topic) -> pb::Topic {
    pb::Topic {
        settings: Some(pb::TopicSettings {
            retention_secs: t.settings.retention.as_secs(),
            ttl_secs: t.settings.ttl.map_or(0, |d| d.as_secs()),
            max_attempts: t.settings.max_attempts,
        }),
        dead_letter_topic: t.dead_letter_name.unwrap_or_default(),
        created_at_ms: ms(t.created_at),
        name: t.name,
    }
}

fn ids(list: Vec<String>) -> Result<Vec<Uuid>, Error> {
    if list.is_empty() {
        return Err(Error::invalid("delivery_ids", "must not be empty"));
    }
    if list.len() > MAX_CREDITS as usize {
        return Err(Error::invalid(
            "delivery_ids",
            format!("must hold at most {MAX_CREDITS} ids"),
        ));
    }
    list.iter()
        .map(|s| {
            Uuid::parse_str(s).map_err(|_| {
                Error::invalid("delivery_ids", format!("{:?} is not a valid id", short(s)))
            })
        })
        .collect()
}

fn lease_ms(field: &'static str, ms: u32) -> Result<Duration, Error> {
    if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&ms) {
        return Err(Error::invalid(
            field,
            format!("must be between {MIN_LEASE_MS} and {MAX_LEASE_MS}"),
        ));
    }
    Ok(Duration::from_millis(ms.into()))
}

fn credits(n: u32) -> Result<u32, Error> {
    if n == 0 || n > MAX_CREDITS {
        return Err(Error::invalid(
            "credits",
            format!("must be between 1 and {MAX_CREDITS}"),
        ));
    }
    Ok(n)
}

impl TryFrom<pb::SubscribeRequest> for ClientMsg {
    type Error = Error;
    fn try_from(r: pb::SubscribeRequest) -> Result<Self, Error> {
        use pb::subscribe_request::Request as Q;
        match r.request {
            None => Err(Error::invalid("request", "must not be empty")),
            Some(Q::Open(_)) => Err(Error::invalid("open", "the stream is already open")),
            Some(Q::Ack(a)) => Ok(ClientMsg::Ack(ids(a.delivery_ids)?)),
            Some(Q::Nack(n)) => {
                if n.requeue_delay_ms > MAX_DELAY_MS {
                    return Err(Error::invalid(
                        "requeue_delay_ms",
                        format!("must be at most {MAX_DELAY_MS}"),
                    ));
                }
                Ok(ClientMsg::Nack(
                    ids(n.delivery_ids)?,
                    Duration::from_millis(n.requeue_delay_ms.into()),
                ))
            }
            Some(Q::Extend(x)) => Ok(ClientMsg::Extend(
                ids(x.delivery_ids)?,
                lease_ms("lease_ms", x.lease_ms)?,
            )),
            Some(Q::Credit(c)) => Ok(ClientMsg::Credit(credits(c.credits)?)),
        }
    }
}

impl TryFrom<pb::Open> for Open {
    type Error = Error;
    fn try_from(o: pb::Open) -> Result<Self, Error> {
        let start = match pb::StartPosition::try_from(o.start) {
            Ok(pb::StartPosition::Earliest) => Start::Earliest,
            Ok(pb::StartPosition::Latest) => Start::Latest,
            Err(_) => return Err(Error::invalid("start", "is not a known start position")),
        };
        Ok(Open {
            topic: QueueName::parse("topic", &o.topic)?,
            group: QueueName::parse("group", &o.group)?,
            credits: credits(o.credits)?,
            lease: lease_ms("lease_ms", o.lease_ms)?,
            start,
        })
    }
}

fn server_msg(m: ServerMsg) -> pb::SubscribeResponse {
    use pb::subscribe_response::Response as A;
    let r = match m {
        ServerMsg::Opened {
            topic,
            group,
            created,
        } => A::Opened(pb::Opened {
            topic,
            group,
            created,
        }),
        ServerMsg::Delivery(d) => A::Delivery(pb::Delivery {
            message_id: d.message_id.to_string(),
            delivery_id: d.delivery_id.to_string(),
            attempt: d.attempt,
            headers: d.headers.into_iter().collect(),
            payload: d.payload,
            key: d.key,
            published_at_ms: ms(d.published_at),
            lease_expires_at_ms: ms(d.lease_until),
        }),
        ServerMsg::Settled {
            delivery_id,
            outcome,
        } => {
            let (code, message) = match outcome {
                Settle::Ok => (tonic::Code::Ok, ""),
                Settle::Unknown => (tonic::Code::NotFound, "not a delivery of this stream"),
                Settle::Expired => (
                    tonic::Code::FailedPrecondition,
                    "the delivery's lease had ended; it will be redelivered",
                ),
            };
            A::Settled(pb::Settled {
                delivery_id: delivery_id.to_string(),
                code: code as i32,
                message: message.to_string(),
            })
        }
    };
    pb::SubscribeResponse { response: Some(r) }
}

#[tonic::async_trait]
impl pb::queue_server::Queue for Api {
    async fn publish(&self, req: Request<pb::PublishRequest>) -> R<pb::PublishResponse> {
        let who = who(&self.queue, &req)?;
        let publish = Publish::try_from(req.into_inner())?;
        let published = self.queue.publish(&who, publish).await?;
        Ok(Response::new(pb::PublishResponse {
            messages: published
                .into_iter()
                .map(|p| pb::Published {
                    message_id: p.message_id.to_string(),
                    duplicate: p.duplicate,
                })
                .collect(),
        }))
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> R<Self::SubscribeStream> {
        let who = who(&self.queue, &req)?;
        let mut input = req.into_inner();
        let first = tokio::time::timeout(OPEN_TIMEOUT, input.message())
            .await
            .map_err(|_| Error::invalid("open", "the stream must start with open within 10 s"))??;
        let open = match first.and_then(|f| f.request) {
            Some(pb::subscribe_request::Request::Open(o)) => Open::try_from(o)?,
            _ => return Err(Error::invalid("open", "the stream must start with open").into()),
        };
        let session = self.queue.open(&who, open).await?;
        let (tx, rx) = mpsc::channel::<runtime::error::Result<ServerMsg>>(64);
        let input = input.map(|m| match m {
            Ok(m) => ClientMsg::try_from(m),
            // The client went away or broke the stream: nothing to answer.
            Err(s) => Err(Error::aborted(format!(
                "the consumer's stream broke: {}",
                s.code()
            ))),
        });
        tokio::spawn(session.run(Box::pin(input), tx, self.closed.clone()));
        let out = ReceiverStream::new(rx).map(|m| m.map(server_msg).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl pb::topics_server::Topics for Api {
    async fn create_topic(&self, req: Request<pb::CreateTopicRequest>) -> R<pb::Topic> {
        let who = who(&self.queue, &req)?;
        let create = CreateTopic::try_from(req.into_inner())?;
        let t = self.queue.create_topic(&who, create).await?;
        Ok(Response::new(topic_pb(t)))
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> R<pb::DeleteTopicResponse> {
        let who = who(&self.queue, &req)?;
        let topic = QueueName::parse("name", &req.get_ref().name)?;
        self.queue.delete_topic(&who, &topic).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(&self, req: Request<pb::ListTopicsRequest>) -> R<pb::ListTopicsResponse> {
        let who = who(&self.queue, &req)?;
        let topics = self.queue.list_topics(&who).await?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: topics.into_iter().map(topic_pb).collect(),
        }))
    }

    async fn get_topic_stats(&self, req: Request<pb::GetTopicStatsRequest>) -> R<pb::TopicStats> {
        let who = who(&self.queue, &req)?;
        let topic = QueueName::parse("name", &req.get_ref().name)?;
        let s = self.queue.stats(&who, &topic).await?;
        let sum = |f: fn(&GroupStats) -> u64| s.groups.iter().map(f).sum::<u64>();
        Ok(Response::new(pb::TopicStats {
            name: s.name.clone(),
            messages: s.messages,
            depth: sum(|g| g.depth),
            in_flight: sum(|g| g.in_flight),
            oldest_age_ms: s
                .groups
                .iter()
                .map(|g| g.oldest_age.as_millis() as u64)
                .max()
                .unwrap_or(0),
            dead_lettered: sum(|g| g.dead_lettered),
            groups: s
                .groups
                .iter()
                .map(|g| pb::GroupStats {
                    group: g.group.clone(),
                    depth: g.depth,
                    in_flight: g.in_flight,
                    oldest_age_ms: g.oldest_age.as_millis() as u64,
                    dead_lettered: g.dead_lettered,
                })
                .collect(),
        }))
    }
}
