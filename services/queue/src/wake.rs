//! Wake-ups: consumers sleep until a publish to their topic commits.
//!
//! Each replica keeps one `watch` channel per topic with waiting consumers.
//! A publish committed by this replica bumps it at once; a publish committed
//! by another replica reaches us through Postgres `LISTEN/NOTIFY` on a
//! dedicated connection, which reconnects with backoff when it breaks.
//! Consumers also poll at a bounded interval, so a lost notification only
//! delays, never loses, a delivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use runtime::listen::{Heard, Listen};
use tokio::sync::watch;
use uuid::Uuid;

use crate::repo::WAKE_CHANNEL;

/// Past this many idle topic entries, idle ones are dropped.
const MAX_IDLE_ENTRIES: usize = 1024;

#[derive(Clone, Default)]
pub struct Wakers {
    topics: Arc<Mutex<HashMap<i32, watch::Sender<u64>>>>,
}

impl Wakers {
    /// A receiver that changes whenever `topic` gets new messages.
    pub fn subscribe(&self, topic: i32) -> watch::Receiver<u64> {
        let mut map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_IDLE_ENTRIES {
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        map.entry(topic)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn wake(&self, topic: i32) {
        let map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&topic) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every consumer (after the listener reconnects, notices may have been missed).
    pub fn wake_all(&self) {
        let map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        for tx in map.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Listens for other replicas' publishes until the task is aborted; notices
/// of this replica's own (`replica`) are skipped: it woke its consumers itself.
pub async fn listen(url: String, wakers: Wakers, replica: Uuid) {
    let me = replica.to_string();
    let listen = Listen::new(url, WAKE_CHANNEL, "cirrus-queue-listener".to_string());
    listen
        .run(|heard| {
            match heard {
                // We may have missed notices while disconnected.
                Heard::Listening => wakers.wake_all(),
                // `<topic> <replica>`; a bare `<topic>` from an older replica.
                Heard::Notice(payload) => {
                    let (topic, from) = payload.split_once(' ').unwrap_or((&payload, ""));
                    if from != me
                        && let Ok(topic) = topic.parse::<i32>()
                    {
                        wakers.wake(topic);
                    }
                }
            }
            std::future::ready(Ok(()))
        })
        .await;
}
