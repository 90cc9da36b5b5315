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

use std::time::Duration;

use runtime::listen::{Heard, Listen};

use crate::repo::CHANGES_CHANNEL;
use crate::service::Identity;

/// How often an idle listening connection is checked.
pub const PING_EVERY: Duration = Duration::from_secs(15);

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

/// Listens until the task is aborted (`runtime::listen`: reconnects with
/// bounded backoff, bounds every step, pings every [`PING_EVERY`]).
pub async fn listen(id: Identity, url: String) {
    let me = id.replica_id().to_string();
    let mut listen = Listen::new(url, CHANGES_CHANNEL, listener_name(&me));
    listen.ping_every = PING_EVERY;
    listen
        .run(|heard| {
            let (id, me) = (id.clone(), me.clone());
            async move {
                match heard {
                    // Listening now: whatever committed before is in the tables.
                    Heard::Listening => id.resync().await.map_err(|e| anyhow::anyhow!("{e}")),
                    // A notice that cannot be applied is not dropped: the
                    // handler's error reconnects, which resyncs.
                    Heard::Notice(payload) => match parse(&payload, &me) {
                        Some(notice) => id.apply(notice).await.map_err(|e| anyhow::anyhow!("{e}")),
                        None => Ok(()),
                    },
                }
            }
        })
        .await;
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
