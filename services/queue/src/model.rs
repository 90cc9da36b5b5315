//! The queue's domain types, free of wire and SQL types.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use runtime::error::Error;

pub use queue_client::names::{DLQ_SUFFIX, MAX_NAME, is_dead_letter};

/// A topic or group name, checked by the queue's rule
/// ([`queue_client::names::check`]: the client checks the same way). Topic
/// names are never looked up by id, so unlike `runtime::types::Name` they
/// may take any shape the rule allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(String);

impl QueueName {
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Error> {
        queue_client::names::check(s).map_err(|reason| Error::invalid(field, reason))?;
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for QueueName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A validated `CreateTopic`: unset settings take the configured defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopic {
    pub name: QueueName,
    pub retention: Option<Duration>,
    pub ttl: Option<Duration>,
    pub max_attempts: Option<u32>,
}

/// A validated `Publish`: 1 to [`MAX_BATCH`] well-formed messages. The
/// payload limit is the service's configuration, checked by the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: QueueName,
    pub messages: Vec<NewMessage>,
}

/// Most messages in one Publish.
pub const MAX_BATCH: usize = 1000;

/// A topic as the service knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub id: i32,
    pub name: String,
    pub settings: TopicSettings,
    pub dead_letter_id: Option<i32>,
    pub dead_letter_name: Option<String>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    pub retention: Duration,
    /// None: messages never expire undelivered.
    pub ttl: Option<Duration>,
    pub max_attempts: u32,
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub key: Option<String>,
    pub idempotency_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub message_id: Uuid,
    pub duplicate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    #[default]
    Earliest,
    Latest,
}

/// What a consumer asks for when it opens its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub topic: QueueName,
    pub group: QueueName,
    pub credits: u32,
    pub lease: Duration,
    pub start: Start,
}

/// One lease of one message to one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub seq: i64,
    pub message_id: Uuid,
    pub delivery_id: Uuid,
    pub attempt: u32,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
    pub key: Option<String>,
    pub published_at: OffsetDateTime,
    pub lease_until: OffsetDateTime,
}

/// What a consumer sends after `Open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    Ack(Vec<Uuid>),
    Nack(Vec<Uuid>, Duration),
    Extend(Vec<Uuid>, Duration),
    Credit(u32),
}

/// What the server sends on a consumer's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    Opened {
        topic: String,
        group: String,
        created: bool,
    },
    Delivery(Box<Delivery>),
    Settled {
        delivery_id: Uuid,
        outcome: Settle,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ok,
    /// Not a delivery of this stream.
    Unknown,
    /// Its lease had ended (it may already be with another consumer).
    Expired,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub group: String,
    pub depth: u64,
    pub in_flight: u64,
    pub oldest_age: Duration,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicStats {
    pub name: String,
    pub messages: u64,
    pub groups: Vec<GroupStats>,
}
