//! Every SQL statement of the queue, parameterised and prepared once per
//! connection, each function over `&impl GenericClient` (a pooled client or
//! a transaction: the caller decides). Publishing, claiming, settling and
//! dead-lettering each run in one transaction; the ones documented "inside
//! the caller's transaction" must be given one.
//!
//! Fan-out: a message row is stored once; each group of its topic gets a
//! delivery row. A publish holds a shared advisory lock on its topics and a
//! group's creation an exclusive one, so a message is either fanned out to
//! a new group by the publish or copied to it by the group's backfill,
//! never neither.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::model::*;
use runtime::error::{Error, Result, constraint};
use tokio_postgres::error::SqlState;

/// The first key of the queue's advisory locks (the second is a topic id).
const LOCK_CLASS: i32 = 0x5155; // "QU"
/// The channel replicas LISTEN on; the payload is a topic id.
pub const WAKE_CHANNEL: &str = "queue_wake";

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn topic_row(r: &Row) -> Topic {
    let ttl: i64 = r.get("ttl_secs");
    Topic {
        id: r.get("id"),
        name: r.get("name"),
        settings: TopicSettings {
            retention: Duration::from_secs(r.get::<_, i64>("retention_secs").max(0) as u64),
            ttl: (ttl > 0).then(|| Duration::from_secs(ttl as u64)),
            max_attempts: r.get::<_, i32>("max_attempts").max(1) as u32,
        },
        dead_letter_id: r.get("dead_letter_id"),
        dead_letter_name: r.get("dead_letter_name"),
        created_at: r.get("created_at"),
    }
}

const TOPIC_COLUMNS: &str = "t.id, t.name, t.retention_secs, t.ttl_secs, t.max_attempts, \
     t.dead_letter_id, d.name AS dead_letter_name, t.created_at \
     FROM topics t LEFT JOIN topics d ON d.id = t.dead_letter_id";

/// A foreign key to `topics` that no longer holds: the topic was deleted
/// while we wrote. The caller names the topic.
fn topic_gone(e: tokio_postgres::Error) -> Error {
    if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        Error::not_found("topic", "(deleted)")
    } else {
        e.into()
    }
}

// ------------------------------------------------------------------- topics

/// Creates a topic and its dead-letter topic `<name>.dlq`.
pub async fn create_topic(tx: &impl GenericClient, name: &str, s: &TopicSettings) -> Result<Topic> {
    let ttl = s.ttl.map_or(0, |t| t.as_secs() as i64);
    let retention = s.retention.as_secs() as i64;
    let dlq_name = format!("{name}{DLQ_SUFFIX}");
    let dlq: i32 = tx
        .query_one(
            "INSERT INTO topics (name, retention_secs, ttl_secs, max_attempts) \
             VALUES ($1, $2, 0, 1) RETURNING id",
            &[&dlq_name, &retention],
        )
        .await
        .map_err(|e| constraint(e, "topic", &format!("{name:?}")))?
        .get(0);
    tx.execute(
        "INSERT INTO topics (name, retention_secs, ttl_secs, max_attempts, dead_letter_id) \
         VALUES ($1, $2, $3, $4, $5)",
        &[&name, &retention, &ttl, &(s.max_attempts as i32), &dlq],
    )
    .await
    .map_err(|e| constraint(e, "topic", &format!("{name:?}")))?;
    get_topic(tx, name)
        .await?
        .ok_or_else(|| Error::internal("created topic vanished"))
}

pub async fn get_topic(c: &impl GenericClient, name: &str) -> Result<Option<Topic>> {
    let st = c
        .prepare_cached(&format!("SELECT {TOPIC_COLUMNS} WHERE t.name = $1"))
        .await?;
    Ok(c.query_opt(&st, &[&name]).await?.as_ref().map(topic_row))
}

pub async fn list_topics(c: &impl GenericClient) -> Result<Vec<Topic>> {
    let rows = c
        .query(&format!("SELECT {TOPIC_COLUMNS} ORDER BY t.name"), &[])
        .await?;
    Ok(rows.iter().map(topic_row).collect())
}

/// Deletes a topic with its dead-letter topic, messages, groups and deliveries.
pub async fn delete_topic(tx: &impl GenericClient, t: &Topic) -> Result<()> {
    let ids: Vec<i32> = std::iter::once(t.id).chain(t.dead_letter_id).collect();
    // Exclusive: no publish is half-way through these topics.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, id) FROM unnest($2::int[]) id ORDER BY id",
        &[&LOCK_CLASS, &ids],
    )
    .await?;
    tx.execute(
        "DELETE FROM deliveries WHERE group_id IN (SELECT id FROM groups WHERE topic_id = ANY($1))",
        &[&ids],
    )
    .await?;
    tx.execute("DELETE FROM messages WHERE topic_id = ANY($1)", &[&ids])
        .await?;
    tx.execute("DELETE FROM topics WHERE id = ANY($1)", &[&ids])
        .await?;
    Ok(())
}

// ------------------------------------------------------------------- groups

/// Finds or creates the group; a new group gets a delivery for every retained
/// message when it starts at the earliest. Returns (group id, created).
pub async fn open_group(
    tx: &impl GenericClient,
    topic_id: i32,
    name: &str,
    start: Start,
) -> Result<(i32, bool)> {
    if let Some(r) = tx
        .query_opt(
            "SELECT id FROM groups WHERE topic_id = $1 AND name = $2",
            &[&topic_id, &name],
        )
        .await?
    {
        return Ok((r.get(0), false));
    }
    // Exclusive against publishes to this topic: see the module doc.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &topic_id],
    )
    .await?;
    let row = tx
        .query_opt(
            "INSERT INTO groups (topic_id, name) VALUES ($1, $2) \
             ON CONFLICT (topic_id, name) DO NOTHING RETURNING id",
            &[&topic_id, &name],
        )
        .await
        .map_err(topic_gone)?;
    let Some(row) = row else {
        // Another replica made it first.
        let id = tx
            .query_one(
                "SELECT id FROM groups WHERE topic_id = $1 AND name = $2",
                &[&topic_id, &name],
            )
            .await?
            .get(0);
        return Ok((id, false));
    };
    let id: i32 = row.get(0);
    if start == Start::Earliest {
        tx.execute(
            "INSERT INTO deliveries (group_id, seq, key, published_at) \
             SELECT $1, seq, key, published_at FROM messages WHERE topic_id = $2",
            &[&id, &topic_id],
        )
        .await?;
    }
    Ok((id, true))
}

// ------------------------------------------------------------------ publish

/// One message ready to insert.
pub struct Insert<'a> {
    pub topic_id: i32,
    pub id: Uuid,
    pub payload: &'a [u8],
    pub headers: serde_json::Value,
    pub key: Option<&'a str>,
}

const LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock_shared($1, id) FROM unnest($2::int[]) id ORDER BY id";
/// Messages, then one delivery row per group of their topic: the statement
/// when nothing is handed off.
const INSERT_SQL: &str = "WITH m AS ( \
       INSERT INTO messages (topic_id, id, payload, headers, key) \
       SELECT * FROM unnest($1::int[], $2::uuid[], $3::bytea[], $4::jsonb[], $5::text[]) \
       RETURNING seq, topic_id, key, published_at) \
     INSERT INTO deliveries (group_id, seq, key, published_at) \
     SELECT g.id, m.seq, m.key, m.published_at FROM m JOIN groups g ON g.topic_id = m.topic_id";

/// The same, where the rows named
/// in the hand-off arrays ($6..$10) are written already leased to a local
/// consumer (attempt 1), and come back so that the consumer can be given them.
const INSERT_HANDOFF_SQL: &str = "WITH m AS ( \
       INSERT INTO messages (topic_id, id, payload, headers, key) \
       SELECT * FROM unnest($1::int[], $2::uuid[], $3::bytea[], $4::jsonb[], $5::text[]) \
       RETURNING seq, id, topic_id, key, published_at), \
     h AS (SELECT * FROM unnest($6::uuid[], $7::int[], $8::uuid[], $9::uuid[], $10::float8[]) \
           AS h(msg_id, group_id, token, consumer, lease_ms)), \
     d AS ( \
       INSERT INTO deliveries (group_id, seq, key, published_at, attempts, lease_token, \
                               visible_at, last_consumer) \
       SELECT g.id, m.seq, m.key, m.published_at, \
              CASE WHEN h.token IS NULL THEN 0 ELSE 1 END, h.token, \
              CASE WHEN h.token IS NULL THEN now() \
                   ELSE clock_timestamp() + make_interval(secs => h.lease_ms / 1000) END, \
              h.consumer \
       FROM m JOIN groups g ON g.topic_id = m.topic_id \
       LEFT JOIN h ON h.msg_id = m.id AND h.group_id = g.id \
       RETURNING seq, lease_token, visible_at) \
     SELECT d.seq, d.lease_token, d.visible_at, m.published_at \
     FROM d JOIN m ON m.seq = d.seq WHERE d.lease_token IS NOT NULL";

/// A delivery to write already leased to a local consumer (see `handoff`).
pub struct HandOff {
    pub message_id: Uuid,
    pub group_id: i32,
    pub token: Uuid,
    pub consumer: Uuid,
    pub lease: Duration,
}

/// A handed-off delivery as written: its lease token, seq, lease end and
/// publish time.
pub struct Leased {
    pub token: Uuid,
    pub seq: i64,
    pub lease_until: OffsetDateTime,
    pub published_at: OffsetDateTime,
}

/// Inserts messages with their deliveries for every group of their topics,
/// inside the caller's transaction. Call [`notify`] after the commit.
pub async fn insert_messages(
    tx: &impl GenericClient,
    msgs: &[Insert<'_>],
    handoffs: &[HandOff],
) -> Result<Vec<Leased>> {
    let lock = tx.prepare_cached(LOCK_SQL).await?;
    let insert = tx.prepare_cached(insert_sql(handoffs)).await?;
    insert_pipelined(tx, &lock, &insert, msgs, handoffs, false).await
}

/// Publishes `msgs` in one round trip on a connection outside any
/// transaction: `BEGIN`, lock, insert, `COMMIT` are pipelined. On error the
/// transaction is rolled back before returning. Call [`notify`] after.
pub async fn publish_in_one_trip(
    c: &impl GenericClient,
    msgs: &[Insert<'_>],
    handoffs: &[HandOff],
) -> Result<Vec<Leased>> {
    let lock = c.prepare_cached(LOCK_SQL).await?;
    let insert = c.prepare_cached(insert_sql(handoffs)).await?;
    let r = insert_pipelined(c, &lock, &insert, msgs, handoffs, true).await;
    if r.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    r
}

fn insert_sql(handoffs: &[HandOff]) -> &'static str {
    if handoffs.is_empty() {
        INSERT_SQL
    } else {
        INSERT_HANDOFF_SQL
    }
}

/// Gives back a handed-off lease whose consumer went away before it got it:
/// claimable at once, as if never delivered.
pub async fn release(c: &impl GenericClient, group_id: i32, seq: i64, token: Uuid) -> Result<()> {
    let st = c
        .prepare_cached(
            "UPDATE deliveries SET lease_token = NULL, last_consumer = NULL, visible_at = now(), \
               attempts = greatest(attempts - 1, 0) \
             WHERE group_id = $1 AND seq = $2 AND lease_token = $3",
        )
        .await?;
    c.execute(&st, &[&group_id, &seq, &token]).await?;
    Ok(())
}

/// Wakes the consumers of `topics` on every other replica (`replica` names
/// this one, whose listener ignores its own notices: it woke its consumers
/// directly).
///
/// Its own transaction, after the publish committed: a transaction that
/// NOTIFYs takes an xid and holds a database-wide lock from its commit until
/// the end of its WAL flush, which would serialise every publish behind the
/// previous fsync and undo group commit. This one does not wait for its
/// flush (`synchronous_commit = off`, see [`relaxed`]): it stores nothing
/// (the messages it announces are already durable), so it adds no fsync of
/// its own and holds the lock only for its commit; a crash may lose the
/// notice, which the consumers' poll covers.
pub async fn notify(c: &impl GenericClient, topics: &[i32], replica: Uuid) -> Result<()> {
    let st = c
        .prepare_cached(
            "SELECT pg_notify($1, id::text || ' ' || $3::text) FROM unnest($2::int[]) id",
        )
        .await?;
    relaxed(c, &st, &[&WAKE_CHANNEL, &topics, &replica.to_string()]).await?;
    Ok(())
}

async fn insert_pipelined(
    tx: &impl GenericClient,
    lock: &tokio_postgres::Statement,
    insert: &tokio_postgres::Statement,
    msgs: &[Insert<'_>],
    handoffs: &[HandOff],
    own_transaction: bool,
) -> Result<Vec<Leased>> {
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let mut topics: Vec<i32> = msgs.iter().map(|m| m.topic_id).collect();
    topics.sort_unstable();
    topics.dedup();
    let topic_ids: Vec<i32> = msgs.iter().map(|m| m.topic_id).collect();
    let ids: Vec<Uuid> = msgs.iter().map(|m| m.id).collect();
    let payloads: Vec<&[u8]> = msgs.iter().map(|m| m.payload).collect();
    let headers: Vec<&serde_json::Value> = msgs.iter().map(|m| &m.headers).collect();
    let keys: Vec<Option<&str>> = msgs.iter().map(|m| m.key).collect();
    // Pipelined: Postgres runs them in order (the insert's snapshot is taken
    // after the lock is held), we wait one round trip instead of four.
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&LOCK_CLASS, &topics];
    let plain: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&topic_ids, &ids, &payloads, &headers, &keys];
    let h_msgs: Vec<Uuid> = handoffs.iter().map(|h| h.message_id).collect();
    let h_groups: Vec<i32> = handoffs.iter().map(|h| h.group_id).collect();
    let h_tokens: Vec<Uuid> = handoffs.iter().map(|h| h.token).collect();
    let h_consumers: Vec<Uuid> = handoffs.iter().map(|h| h.consumer).collect();
    let h_leases: Vec<f64> = handoffs.iter().map(|h| millis(h.lease)).collect();
    let insert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &topic_ids,
        &ids,
        &payloads,
        &headers,
        &keys,
        &h_msgs,
        &h_groups,
        &h_tokens,
        &h_consumers,
        &h_leases,
    ];
    let begin = async {
        if own_transaction {
            tx.batch_execute("BEGIN").await
        } else {
            Ok(())
        }
    };
    let commit = async {
        if own_transaction {
            tx.batch_execute("COMMIT").await
        } else {
            Ok(())
        }
    };
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = match handoffs.is_empty() {
        true => &plain,
        false => &insert_params,
    };
    let (_, _, rows, _) = futures_util::try_join!(
        begin,
        tx.execute(lock, &lock_params),
        tx.query(insert, params),
        commit,
    )
    .map_err(topic_gone)?;
    Ok(rows
        .iter()
        .map(|r| Leased {
            seq: r.get(0),
            token: r.get(1),
            lease_until: r.get(2),
            published_at: r.get(3),
        })
        .collect())
}

/// Runs one statement on a session of the queue's relaxed pool, whose
/// commits do not wait for their WAL flush (`synchronous_commit = off`, set
/// for the session, so the statement is its own transaction: one message
/// on the wire, no `BEGIN`/`SET LOCAL`/`COMMIT` to parse). For consumer
/// bookkeeping only (leases, acks, nacks, notices): a crash may forget the
/// last few, which means a redelivery, which at-least-once allows.
/// Publishes never go this way.
async fn relaxed(
    c: &impl GenericClient,
    st: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>> {
    Ok(c.query(st, params).await?)
}

/// Records idempotency ids: returns, for each (topic, id) already seen within
/// `window`, the message id stored under it. The others are claimed for the
/// given new message ids.
pub async fn dedupe(
    tx: &impl GenericClient,
    entries: &[(i32, &str, Uuid)],
    window: Duration,
) -> Result<HashMap<(i32, String), Uuid>> {
    if entries.is_empty() {
        return Ok(HashMap::new());
    }
    let topics: Vec<i32> = entries.iter().map(|e| e.0).collect();
    let idems: Vec<&str> = entries.iter().map(|e| e.1).collect();
    let ids: Vec<Uuid> = entries.iter().map(|e| e.2).collect();
    // An entry older than the window is taken over as if new.
    let claim = tx
        .prepare_cached(
            "INSERT INTO dedupe (topic_id, idempotency_id, message_id) \
             SELECT * FROM unnest($1::int[], $2::text[], $3::uuid[]) \
             ON CONFLICT (topic_id, idempotency_id) DO UPDATE \
               SET message_id = EXCLUDED.message_id, created_at = now() \
               WHERE dedupe.created_at < now() - make_interval(secs => $4::float8 / 1000) \
             RETURNING topic_id, idempotency_id",
        )
        .await?;
    let claimed: std::collections::HashSet<(i32, String)> = tx
        .query(&claim, &[&topics, &idems, &ids, &millis(window)])
        .await
        .map_err(topic_gone)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if claimed.len() == entries.len() {
        return Ok(HashMap::new());
    }
    let seen = tx
        .prepare_cached(
            "SELECT d.topic_id, d.idempotency_id, d.message_id FROM dedupe d \
             JOIN unnest($1::int[], $2::text[]) AS x(topic_id, idempotency_id) \
               ON d.topic_id = x.topic_id AND d.idempotency_id = x.idempotency_id",
        )
        .await?;
    Ok(tx
        .query(&seen, &[&topics, &idems])
        .await?
        .iter()
        .map(|r| ((r.get::<_, i32>(0), r.get::<_, String>(1)), r.get(2)))
        .filter(|(k, _)| !claimed.contains(k))
        .collect())
}

// ------------------------------------------------------------------ consume

pub fn headers_from_json(v: serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

pub fn headers_to_json(h: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        h.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// Leases up to `limit` ready deliveries of the group, oldest first, skipping
/// rows other consumers hold and keys whose earlier message is still pending.
/// A delivery whose lease `consumer` itself let expire is skipped until
/// `grace` after that expiry, so that another consumer of the group takes it
/// first when one has credits (a hung consumer must not take every attempt).
/// One statement, so it needs no transaction of its own. Returns the
/// deliveries to send and those past `max_attempts`, which the caller moves
/// to the dead-letter topic with [`dead_letter`].
pub async fn claim(
    c: &impl GenericClient,
    group_id: i32,
    topic: &Topic,
    consumer: Uuid,
    limit: i64,
    lease: Duration,
    grace: Duration,
) -> Result<(Vec<Delivery>, Vec<Delivery>)> {
    let st = c
        .prepare_cached(
            "WITH c AS ( \
               SELECT d.ctid FROM deliveries d \
               WHERE d.group_id = $1 AND d.visible_at <= now() \
                 AND (d.last_consumer IS DISTINCT FROM $4 \
                      OR d.visible_at <= now() - make_interval(secs => $5::float8 / 1000)) \
                 AND (d.key IS NULL OR NOT EXISTS ( \
                   SELECT 1 FROM deliveries e \
                   WHERE e.group_id = d.group_id AND e.key = d.key AND e.seq < d.seq)) \
               ORDER BY d.seq LIMIT $2 \
               FOR UPDATE OF d SKIP LOCKED) \
             UPDATE deliveries d \
               SET attempts = d.attempts + 1, lease_token = gen_random_uuid(), \
                   last_consumer = $4, \
                   visible_at = clock_timestamp() + make_interval(secs => $3::float8 / 1000) \
             FROM messages m \
             WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM c)) AND m.seq = d.seq \
             RETURNING d.seq, d.attempts, d.lease_token, d.visible_at, \
                       m.id, m.payload, m.headers, m.key, m.published_at",
        )
        .await?;
    let rows = relaxed(
        c,
        &st,
        &[&group_id, &limit, &millis(lease), &consumer, &millis(grace)],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut dead = Vec::new();
    for r in rows {
        let d = Delivery {
            seq: r.get(0),
            attempt: r.get::<_, i32>(1).max(0) as u32,
            delivery_id: r.get(2),
            lease_until: r.get(3),
            message_id: r.get(4),
            payload: r.get(5),
            headers: headers_from_json(r.get(6)),
            key: r.get(7),
            published_at: r.get(8),
        };
        if d.attempt > topic.settings.max_attempts && topic.dead_letter_id.is_some() {
            dead.push(d);
        } else {
            out.push(d);
        }
    }
    out.sort_by_key(|d| d.seq);
    Ok((out, dead))
}

/// Moves deliveries we hold the lease of to the topic's dead-letter topic,
/// as new messages that say where they came from. Should we crash first,
/// the lease ends and the next claim finds them past `max_attempts` again.
pub async fn dead_letter(
    tx: &impl GenericClient,
    group_id: i32,
    group_name: &str,
    topic: &Topic,
    dead: &[Delivery],
) -> Result<()> {
    let Some(dlq) = topic.dead_letter_id else {
        return Ok(());
    };
    let seqs: Vec<i64> = dead.iter().map(|d| d.seq).collect();
    let tokens: Vec<Uuid> = dead.iter().map(|d| d.delivery_id).collect();
    let gone: std::collections::HashSet<i64> = tx
        .query(
            "DELETE FROM deliveries d USING unnest($2::bigint[], $3::uuid[]) AS a(seq, token) \
             WHERE d.group_id = $1 AND d.seq = a.seq AND d.lease_token = a.token \
             RETURNING d.seq",
            &[&group_id, &seqs, &tokens],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let inserts: Vec<Insert<'_>> = dead
        .iter()
        .filter(|d| gone.contains(&d.seq))
        .map(|d| {
            let mut h = d.headers.clone();
            h.insert("x-dead-letter-topic".into(), topic.name.clone());
            h.insert("x-dead-letter-group".into(), group_name.to_string());
            h.insert("x-dead-letter-message-id".into(), d.message_id.to_string());
            h.insert(
                "x-dead-letter-attempts".into(),
                (d.attempt.saturating_sub(1)).to_string(),
            );
            Insert {
                topic_id: dlq,
                id: Uuid::new_v4(),
                payload: &d.payload,
                headers: headers_to_json(&h),
                key: d.key.as_deref(),
            }
        })
        .collect();
    insert_messages(tx, &inserts, &[]).await?;
    tx.execute(
        "UPDATE groups SET dead_lettered = dead_lettered + $2 WHERE id = $1",
        &[&group_id, &(inserts.len() as i64)],
    )
    .await?;
    tracing::info!(topic = %topic.name, group = group_name, count = inserts.len(), "dead-lettered");
    Ok(())
}

/// Acks: deletes the deliveries whose lease is current. Returns the seqs done.
///
/// Leases are (seq, token) pairs, each looked up by the primary key in
/// `ack_leases` (migration V3 says why: a plan of one `= ANY` statement
/// read every index entry of the group once the table had churned).
pub async fn ack(
    c: &impl GenericClient,
    group_id: i32,
    leases: &[(i64, Uuid)],
) -> Result<Vec<i64>> {
    let (seqs, tokens) = split(leases);
    let st = c.prepare_cached("SELECT ack_leases($1, $2, $3)").await?;
    Ok(relaxed(c, &st, &[&group_id, &seqs, &tokens])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

fn split(leases: &[(i64, Uuid)]) -> (Vec<i64>, Vec<Uuid>) {
    leases.iter().copied().unzip()
}

/// Nacks: ends the leases now; the messages come back after `delay`.
pub async fn nack(
    c: &impl GenericClient,
    group_id: i32,
    leases: &[(i64, Uuid)],
    delay: Duration,
) -> Result<Vec<i64>> {
    let (seqs, tokens) = split(leases);
    let st = c
        .prepare_cached("SELECT nack_leases($1, $2, $3, $4)")
        .await?;
    Ok(
        relaxed(c, &st, &[&group_id, &seqs, &tokens, &millis(delay)])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    )
}

/// Extends current leases to `lease` from now. Returns (seq, new end).
pub async fn extend(
    c: &impl GenericClient,
    group_id: i32,
    leases: &[(i64, Uuid)],
    lease: Duration,
) -> Result<Vec<(i64, OffsetDateTime)>> {
    let (seqs, tokens) = split(leases);
    let st = c
        .prepare_cached("SELECT seq, until FROM extend_leases($1, $2, $3, $4)")
        .await?;
    Ok(
        relaxed(c, &st, &[&group_id, &seqs, &tokens, &millis(lease)])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    )
}

// -------------------------------------------------------------------- stats

pub async fn stats(c: &impl GenericClient, topic: &Topic) -> Result<TopicStats> {
    let messages: i64 = c
        .query_one(
            "SELECT count(*) FROM messages WHERE topic_id = $1",
            &[&topic.id],
        )
        .await?
        .get(0);
    let rows = c
        .query(
            "SELECT g.name, g.dead_lettered, \
               count(d.seq) FILTER (WHERE d.lease_token IS NULL OR d.visible_at <= now()), \
               count(d.seq) FILTER (WHERE d.lease_token IS NOT NULL AND d.visible_at > now()), \
               COALESCE(EXTRACT(EPOCH FROM now() - min(d.published_at)) * 1000, 0)::float8 \
             FROM groups g LEFT JOIN deliveries d ON d.group_id = g.id \
             WHERE g.topic_id = $1 GROUP BY g.id ORDER BY g.name",
            &[&topic.id],
        )
        .await?;
    Ok(TopicStats {
        name: topic.name.clone(),
        messages: messages.max(0) as u64,
        groups: rows
            .iter()
            .map(|r| GroupStats {
                group: r.get(0),
                dead_lettered: r.get::<_, i64>(1).max(0) as u64,
                depth: r.get::<_, i64>(2).max(0) as u64,
                in_flight: r.get::<_, i64>(3).max(0) as u64,
                oldest_age: Duration::from_millis(r.get::<_, f64>(4).max(0.0) as u64),
            })
            .collect(),
    })
}

// -------------------------------------------------------------------- sweep

/// Drops undelivered messages past their topic's TTL, messages past retention
/// that no group still needs, and idempotency ids past the window; at most
/// `limit` rows of each per call. Returns how many rows went.
pub async fn sweep(c: &impl GenericClient, dedupe_window: Duration, limit: i64) -> Result<u64> {
    let expired = c
        .execute(
            "DELETE FROM deliveries WHERE (group_id, seq) IN ( \
               SELECT d.group_id, d.seq FROM deliveries d \
               JOIN groups g ON g.id = d.group_id JOIN topics t ON t.id = g.topic_id \
               WHERE t.ttl_secs > 0 \
                 AND d.published_at < now() - make_interval(secs => t.ttl_secs) \
                 AND (d.lease_token IS NULL OR d.visible_at <= now()) \
               LIMIT $1)",
            &[&limit],
        )
        .await?;
    let retained = c
        .execute(
            "DELETE FROM messages WHERE seq IN ( \
               SELECT m.seq FROM messages m JOIN topics t ON t.id = m.topic_id \
               WHERE m.published_at < now() - make_interval(secs => t.retention_secs) \
                 AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN groups g ON g.id = d.group_id \
                                 WHERE g.topic_id = m.topic_id AND d.seq = m.seq) \
               LIMIT $1)",
            &[&limit],
        )
        .await?;
    let dedupe = c
        .execute(
            "DELETE FROM dedupe WHERE (topic_id, idempotency_id) IN ( \
               SELECT topic_id, idempotency_id FROM dedupe \
               WHERE created_at < now() - make_interval(secs => $1::float8 / 1000) LIMIT $2)",
            &[&millis(dedupe_window), &limit],
        )
        .await?;
    Ok(expired + retained + dedupe)
}
