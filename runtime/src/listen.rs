//! One Postgres `LISTEN` connection per replica, kept open for ever.
//!
//! Services whose replicas must hear each other's commits (queue wake-ups,
//! identity revocations and keys, network changes) queue a `pg_notify` in
//! the transaction that makes the change — Postgres delivers it at commit
//! and only at commit — and listen on a dedicated connection. This module is
//! that connection: it reconnects with bounded backoff when it breaks, bounds
//! every step (connect, `LISTEN`, each handler call, a periodic ping that
//! finds a silently dead peer), and tells its owner [`Heard::Listening`]
//! after every (re)connect, because notices sent while it was away are lost:
//! the owner then re-reads what it must from the tables. So a lost notice
//! delays a change by at most one reconnect, never loses it.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio_postgres::{AsyncMessage, NoTls};

/// What the listener hands its owner.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Connected and listening; notices sent before now may have been
    /// missed, so resync from the tables.
    Listening,
    /// One notice's payload.
    Notice(String),
}

/// Where and how to listen.
#[derive(Clone, Debug)]
pub struct Listen {
    /// The database URL (the service's own).
    pub url: String,
    /// The notification channel, a plain identifier.
    pub channel: &'static str,
    /// The connection's `application_name` (shows in `pg_stat_activity`).
    pub application_name: String,
    /// The bound on each step: connect, `LISTEN`, one handler call, a ping.
    pub step_timeout: Duration,
    /// How often an idle connection is pinged.
    pub ping_every: Duration,
}

impl Listen {
    pub fn new(url: impl Into<String>, channel: &'static str, application_name: String) -> Self {
        Self {
            url: url.into(),
            channel,
            application_name,
            step_timeout: Duration::from_secs(10),
            ping_every: Duration::from_secs(15),
        }
    }

    /// Listens until the task is aborted. A handler error (a notice that
    /// could not be applied) drops the connection: the reconnect resyncs.
    pub async fn run<F, Fut>(self, mut on: F)
    where
        F: FnMut(Heard) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            let opened = Instant::now();
            match self.once(&mut on).await {
                Ok(()) => tracing::warn!(
                    channel = self.channel,
                    "notification connection closed; reconnecting"
                ),
                Err(e) => {
                    tracing::warn!(channel = self.channel, error = %e, "notification connection failed; reconnecting")
                }
            }
            metrics::counter!("db_listener_reconnects_total", "channel" => self.channel)
                .increment(1);
            if opened.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, E>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.step_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(anyhow::anyhow!("{what}: {e}")),
            Err(_) => Err(anyhow::anyhow!(
                "{what}: timed out after {:?}",
                self.step_timeout
            )),
        }
    }

    async fn once<F, Fut>(&self, on: &mut F) -> anyhow::Result<()>
    where
        F: FnMut(Heard) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let mut cfg = tokio_postgres::Config::from_str(&self.url)?;
        cfg.connect_timeout(self.step_timeout);
        cfg.application_name(&self.application_name);
        let (client, mut conn) = self.bounded("connect", cfg.connect(NoTls)).await?;
        // The connection is driven by its own task, which forwards notices.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
        let driver = tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "notification connection error");
                        break;
                    }
                }
            }
        });
        let result = async {
            let listen = format!("LISTEN {}", self.channel);
            self.bounded("LISTEN", client.batch_execute(&listen))
                .await?;
            self.bounded("resync", on(Heard::Listening)).await?;
            let mut ping = tokio::time::interval(self.ping_every);
            ping.tick().await;
            loop {
                tokio::select! {
                    m = rx.recv() => {
                        let Some(payload) = m else { return Ok(()) };
                        self.bounded("apply notice", on(Heard::Notice(payload))).await?;
                    }
                    _ = ping.tick() => {
                        self.bounded("ping", client.simple_query("SELECT 1")).await?;
                    }
                }
            }
        }
        .await;
        driver.abort();
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::db::{TestDatabase, connect};

    /// Waits (bounded) for the next thing the listener heard.
    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Heard>) -> Heard {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the listener heard nothing within 20 s")
            .expect("the listener stopped")
    }

    #[tokio::test]
    async fn notices_arrive_and_a_killed_connection_comes_back_listening() {
        let db = TestDatabase::create().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let listen = Listen::new(&db.url, "test_changes", "listen-test".to_string());
        let task = tokio::spawn(listen.run(move |heard| {
            let _ = tx.send(heard);
            std::future::ready(Ok(()))
        }));
        assert_eq!(next(&mut rx).await, Heard::Listening);
        let c = connect(&db.url).await.unwrap();
        // Delivered at commit, and only at commit.
        c.batch_execute("BEGIN; SELECT pg_notify('test_changes', 'rolled back'); ROLLBACK")
            .await
            .unwrap();
        c.batch_execute("SELECT pg_notify('test_changes', 'one')")
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, Heard::Notice("one".to_string()));
        // The server drops the listening connection (a reset, a restart):
        // the listener reconnects and says so, so its owner resyncs.
        c.batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'listen-test'",
        )
        .await
        .unwrap();
        assert_eq!(next(&mut rx).await, Heard::Listening);
        c.batch_execute("SELECT pg_notify('test_changes', 'two')")
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, Heard::Notice("two".to_string()));
        task.abort();
    }

    #[tokio::test]
    async fn a_handler_error_reconnects_and_resyncs() {
        let db = TestDatabase::create().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let listen = Listen::new(&db.url, "test_changes", "listen-test-2".to_string());
        let task = tokio::spawn(listen.run(move |heard| {
            let fail = heard == Heard::Notice("bad".to_string());
            let _ = tx.send(heard);
            std::future::ready(if fail {
                Err(anyhow::anyhow!("cannot apply"))
            } else {
                Ok(())
            })
        }));
        assert_eq!(next(&mut rx).await, Heard::Listening);
        let c = connect(&db.url).await.unwrap();
        c.batch_execute("SELECT pg_notify('test_changes', 'bad')")
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, Heard::Notice("bad".to_string()));
        assert_eq!(
            next(&mut rx).await,
            Heard::Listening,
            "a failed notice resyncs"
        );
        task.abort();
    }
}
