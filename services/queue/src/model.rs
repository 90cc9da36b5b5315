//! The queue's domain types, free of wire and SQL types.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

/// Longest topic or group name, in bytes.
pub const MAX_NAME: usize = 200;
/// The suffix of every dead-letter topic; reserved.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Checks a topic or group name: 1 to 200 of `[A-Za-z0-9._-]`, starting
/// with a letter or digit, without `..` and not ending in `.`.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if s.len() > MAX_NAME {
        return Err(format!("{what} is longer than {MAX_NAME} characters"));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("{what} must start with a letter or a digit"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} may hold only letters, digits, '.', '_' and '-', not {c:?}"
        ));
    }
    if s.contains("..") || s.ends_with('.') {
        return Err(format!("{what} must not contain '..' or end with '.'"));
    }
    Ok(())
}

pub fn is_dead_letter(topic: &str) -> bool {
    topic.ends_with(DLQ_SUFFIX)
}

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
    pub topic: String,
    pub group: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["compute.host-1", "notifications.info", "a", "A_b-9.c"] {
            assert!(check_name("topic", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".a",
            "a..b",
            "a.",
            "a b",
            "a/b",
            "é",
            "-a",
            &"x".repeat(201),
        ] {
            assert!(check_name("topic", bad).is_err(), "{bad:?}");
        }
    }
}
