//! Change wake-ups: agents (long-polling `SyncHost`), `WatchPorts` streams
//! and the outbox relay sleep until a change an agent must see commits.
//!
//! Every such transaction runs `pg_notify('network_changes')`, which
//! Postgres delivers only at commit, to every replica's dedicated `LISTEN`
//! connection; this replica also bumps the counter at once after its own
//! commits. Waiters poll at a bound as well, so a notice lost while the
//! listener reconnects delays, never loses, a change.

use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::repo::CHANGES_CHANNEL;

/// A counter that moves on every committed change.
#[derive(Clone)]
pub struct Changes {
    tx: watch::Sender<u64>,
    /// Distinguishes this replica's counters from another's (or an earlier run's).
    pub epoch: String,
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}

impl Changes {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(0).0,
            epoch: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        }
    }

    pub fn bump(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn current(&self) -> u64 {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// The token an agent passes back: `<epoch>:<counter>`.
    pub fn token(&self, n: u64) -> String {
        format!("{}:{n}", self.epoch)
    }

    /// Waits until the counter passes the one in `token` (answers at once
    /// for another replica's or a malformed token), at most `bound`.
    pub async fn wait_after(&self, token: &str, bound: Duration) {
        let seen = match token.split_once(':') {
            Some((e, n)) if e == self.epoch => match n.parse::<u64>() {
                Ok(n) => n,
                Err(_) => return,
            },
            _ => return,
        };
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(bound, rx.wait_for(|n| *n != seen)).await;
    }
}

/// Listens for every replica's changes until the task is aborted.
pub async fn listen(url: String, changes: Changes) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&url, &changes).await {
            Ok(()) => tracing::warn!("notification connection closed; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "notification connection failed; reconnecting"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(url: &str, changes: &Changes) -> Result<(), tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::from_str(url)?;
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("cirrus-network-listener");
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
        .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
        .await?;
    // Changes may have committed while we were disconnected.
    changes.bump();
    while let Some(m) = rx.recv().await {
        if let AsyncMessage::Notification(_) = m {
            changes.bump();
        }
    }
    driver.abort();
    Ok(())
}
