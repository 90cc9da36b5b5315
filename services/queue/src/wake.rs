//! Wake-ups: consumers sleep until a publish to their topic commits.
//!
//! Each replica keeps one `watch` channel per topic with waiting consumers.
//! A publish committed by this replica bumps it at once; a publish committed
//! by another replica reaches us through Postgres `LISTEN/NOTIFY` on a
//! dedicated connection, which reconnects with backoff when it breaks.
//! Consumers also poll at a bounded interval, so a lost notification only
//! delays, never loses, a delivery.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};
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
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&url, &wakers, &replica.to_string()).await {
            Ok(()) => tracing::warn!("notification connection closed; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "notification connection failed; reconnecting"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(url: &str, wakers: &Wakers, me: &str) -> Result<(), tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::from_str(url)?;
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("cirrus-queue-listener");
    let (client, mut conn) = cfg.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AsyncMessage>(1024);
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(m) => {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification connection error");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))
        .await?;
    // We may have missed notices while disconnected.
    wakers.wake_all();
    while let Some(m) = rx.recv().await {
        let AsyncMessage::Notification(n) = m else {
            continue;
        };
        // `<topic> <replica>`; a bare `<topic>` from an older replica.
        let (topic, from) = n.payload().split_once(' ').unwrap_or((n.payload(), ""));
        if from != me
            && let Ok(topic) = topic.parse::<i32>()
        {
            wakers.wake(topic);
        }
    }
    driver.abort();
    Ok(())
}
