//! Replicas: every identity process on one database learns each change any
//! of them commits, and pushes it to its own `Watch` streams.
//!
//! A change that others must hear about queues a Postgres notice on
//! [`repo::CHANGES_CHANNEL`] in the transaction that makes it (`pg_notify`
//! is delivered on commit and only on commit); a catalog change notifies
//! right after its commit. The payload is `<kind> <replica> [detail]`:
//!
//! - `r <replica> <id>,<id>,...` (or `*`): revocation rules were stored;
//! - `k <replica>`: the shared signing keys changed (rotation);
//! - `c <replica>`: the catalog changed.
//!
//! Each replica keeps one dedicated listening connection. Its own notices
//! are skipped (it applied the change itself). Whenever that connection is
//! (re)established — and whenever applying a notice fails — the replica
//! **resyncs from the tables** (keys, every live revocation rule it does not
//! know yet, catalog), so a notice missed while disconnected delays a change
//! by at most one reconnect and never loses it. Every wait is bounded: the
//! connect, the `LISTEN`, each resync, and a ping every
//! [`PING_EVERY`] that detects a silently dead connection.

use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::repo::CHANGES_CHANNEL;
use crate::service::Identity;

/// How often an idle listening connection is checked.
pub const PING_EVERY: Duration = Duration::from_secs(15);
/// The bound on any one database step of the listener.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A notice, as [`Identity`] applies it.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// Revocation rules by id; `None`: too many to list, resync them all.
    Revocations(Option<Vec<i64>>),
    Keys,
    Catalog,
    /// Something this version does not understand: resync everything.
    Unknown,
}

/// Past this payload length a revocation notice says `*` (Postgres caps a
/// payload at 8000 bytes).
const MAX_LISTED: usize = 7000;

pub fn revocations_payload(replica: &str, ids: &[i64]) -> String {
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    if list.len() > MAX_LISTED {
        format!("r {replica} *")
    } else {
        format!("r {replica} {list}")
    }
}

/// Parses a payload; `None` when it came from `me`.
pub fn parse(payload: &str, me: &str) -> Option<Notice> {
    let mut parts = payload.splitn(3, ' ');
    let kind = parts.next().unwrap_or("");
    let from = parts.next().unwrap_or("");
    if from == me {
        return None;
    }
    let detail = parts.next().unwrap_or("");
    Some(match kind {
        "r" if detail == "*" => Notice::Revocations(None),
        "r" => detail
            .split(',')
            .map(str::parse::<i64>)
            .collect::<Result<Vec<_>, _>>()
            .map_or(Notice::Revocations(None), |ids| {
                Notice::Revocations(Some(ids))
            }),
        "k" => Notice::Keys,
        "c" => Notice::Catalog,
        _ => Notice::Unknown,
    })
}

/// The `application_name` of a replica's listening connection.
pub fn listener_name(replica: &str) -> String {
    format!("identity-listener-{replica}")
}

/// Listens until the task is aborted, reconnecting with bounded backoff.
pub async fn listen(id: Identity, url: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let opened = std::time::Instant::now();
        match listen_once(&id, &url).await {
            Ok(()) => tracing::warn!("notification connection closed; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "notification connection failed; reconnecting"),
        }
        metrics::counter!("identity_listener_reconnects_total").increment(1);
        if opened.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow::anyhow!("{what}: timed out after {STEP_TIMEOUT:?}")),
    }
}

async fn listen_once(id: &Identity, url: &str) -> anyhow::Result<()> {
    let me = id.replica_id().to_string();
    let mut cfg = tokio_postgres::Config::from_str(url)?;
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name(listener_name(&me));
    let (client, mut conn) = bounded("connect", cfg.connect(NoTls)).await?;
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
    let result = async {
        bounded(
            "LISTEN",
            client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")),
        )
        .await?;
        // Listening now: whatever committed before is in the tables.
        bounded("resync", id.resync()).await?;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { return Ok(()) };
                    let AsyncMessage::Notification(n) = m else { continue };
                    if let Some(notice) = parse(n.payload(), &me) {
                        // A notice that cannot be applied is not dropped:
                        // reconnecting resyncs from the tables.
                        bounded("apply notice", id.apply(notice)).await?;
                    }
                }
                _ = ping.tick() => {
                    bounded("ping", client.simple_query("SELECT 1")).await?;
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_own_notices_are_skipped() {
        assert_eq!(
            parse(&revocations_payload("a", &[3, 7]), "b"),
            Some(Notice::Revocations(Some(vec![3, 7])))
        );
        assert_eq!(parse(&revocations_payload("a", &[3]), "a"), None);
        let many: Vec<i64> = (1_000_000..1_002_000).collect();
        assert_eq!(
            parse(&revocations_payload("a", &many), "b"),
            Some(Notice::Revocations(None))
        );
        assert_eq!(parse("r a 1,x", "b"), Some(Notice::Revocations(None)));
        assert_eq!(parse("k a", "b"), Some(Notice::Keys));
        assert_eq!(parse("c a", "b"), Some(Notice::Catalog));
        assert_eq!(parse("z a", "b"), Some(Notice::Unknown));
    }
}
