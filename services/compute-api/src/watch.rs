//! Server change notifications for `WatchServer`.
//!
//! Every change of a server's states writes a row to `server_events` and a
//! `pg_notify('compute_server', id)` in the same transaction (a trigger does
//! it, whoever writes: compute-api, the scheduler or conductor). One
//! connection per compute-api replica LISTENs and fans the ids out on a
//! broadcast channel; each watcher then reads its server's events after the
//! last one it sent, so it sees every transition in order. Watchers also
//! look every second, so a notification lost while the listener reconnects
//! only delays an event.

use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

pub const CHANNEL: &str = "compute_server";
/// Notifications held for slow watchers; one that falls behind re-reads.
const CAPACITY: usize = 4096;

#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Uuid>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }

    /// Listens until the task is aborted, reconnecting with backoff.
    pub async fn listen(self, url: String, schema: String) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen_once(&url, &schema).await {
                Ok(()) => tracing::warn!("notification connection closed; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, "notification connection failed; reconnecting")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(&self, url: &str, schema: &str) -> Result<(), tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::from_str(url)?;
        cfg.connect_timeout(Duration::from_secs(5));
        cfg.application_name("cirrus-compute-watch");
        cfg.options(format!("-c search_path={schema}"));
        let (client, mut conn) = cfg.connect(NoTls).await?;
        let tx = self.tx.clone();
        let driver = tokio::spawn(async move {
            let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = stream.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if let Ok(id) = Uuid::parse_str(n.payload()) {
                            let _ = tx.send(id);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        match driver.await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}
