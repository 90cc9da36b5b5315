//! Change wake-ups: agents (long-polling `SyncHost`), `WatchPorts` streams
//! and the outbox relay sleep until a change an agent must see commits.
//!
//! Every such transaction runs `pg_notify('network_changes')`, which
//! Postgres delivers only at commit, to every replica's dedicated `LISTEN`
//! connection; this replica also bumps the counter at once after its own
//! commits. Waiters poll at a bound as well, so a notice lost while the
//! listener reconnects delays, never loses, a change.

use std::time::Duration;

use runtime::listen::Listen;
use tokio::sync::watch;

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

/// Listens for every replica's changes until the task is aborted
/// (`runtime::listen`: bounded steps, ping, reconnect with backoff).
pub async fn listen(url: String, changes: Changes) {
    let listen = Listen::new(url, CHANGES_CHANNEL, "cirrus-network-listener".to_string());
    listen
        .run(|_heard| {
            // A notice, or a (re)connect after which changes may have
            // committed unheard: either way the waiters look again.
            changes.bump();
            std::future::ready(Ok(()))
        })
        .await;
}
