//! The outbox relay: port status events are written in the transaction that
//! changes the status (`repo::set_status`), then this task publishes them
//! to the queue's `network.port` topic and deletes them. Replicas share the
//! work (`FOR UPDATE SKIP LOCKED`); each event's idempotency id is its row
//! id, so an event published just before a crash and published again after
//! it is stored once. Events of one port keep their order (key = port id).

use std::time::Duration;

use queue_client::pb;
use runtime::error::{Error, Result};

use crate::Net;
use crate::repo;

/// Events per publish.
const BATCH: i64 = 100;
/// The longest sleep between two looks at the outbox.
const POLL: Duration = Duration::from_secs(1);

/// Runs until aborted: publish, delete, repeat; sleep until a change.
pub async fn relay(net: Net) {
    let client = match queue_client::Client::through_sidecar(
        net.config.queue_via_sidecar_socket.as_deref(),
        net.config.queue_via_sidecar,
    ) {
        Some(c) => c,
        None => queue_client::Client::connect_lazy(&net.config.queue_url),
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "bad queue_url; port events stay in the outbox");
            return;
        }
    };
    let mut topic_ready = false;
    let mut changes = net.changes.subscribe();
    let mut backoff = Duration::from_millis(100);
    loop {
        if !topic_ready {
            match client
                .ensure_topic(repo::PORT_TOPIC, Default::default())
                .await
            {
                Ok(()) => topic_ready = true,
                Err(e) => tracing::warn!(error = %e, "cannot make the network.port topic yet"),
            }
        }
        match relay_once(&net, &client).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, detail = e.internal_detail().unwrap_or_default(), "outbox relay failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        let _ = tokio::time::timeout(POLL, changes.changed()).await;
    }
}

/// Publishes and deletes one batch; returns how many events it sent.
pub async fn relay_once(net: &Net, client: &queue_client::Client) -> Result<usize> {
    let mut conn = net.pool.get().await?;
    let tx = conn.transaction().await?;
    let rows = repo::claim_outbox(&tx, BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    // One topic today; group by topic anyway so a second kind fits.
    let mut topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
    topics.dedup();
    for topic in topics {
        let msgs: Vec<pb::Message> = rows
            .iter()
            .filter(|r| r.topic == topic)
            .map(|r| {
                let mut m = queue_client::message(r.payload.clone());
                m.key = Some(r.key.clone());
                m.idempotency_id = Some(format!("network-outbox-{}", r.id));
                m
            })
            .collect();
        client
            .publish(topic, msgs)
            .await
            .map_err(|s| Error::unavailable(format!("queue publish: {s}")))?;
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    repo::delete_outbox(&tx, &ids).await?;
    tx.commit().await?;
    Ok(rows.len())
}
