//! The queue's API against a real server and a real Postgres: bad input,
//! idempotency, fan-out, credits, nacks, dead letters, settlements, policy.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use pb::subscribe_request::Request as Q;
use proto::queue::v1 as pb;
use runtime::testing::{assert_status, wait_for};
use tonic::Code;

#[tokio::test]
async fn bad_input_gets_clear_errors_and_stores_nothing() {
    let s = Server::start().await;
    s.create_topic("orders", 0).await;
    for (bad, why) in [
        ("", "must not be empty"),
        (
            "a b",
            "may hold only letters, digits, '.', '_' and '-', not ' '",
        ),
        ("x..y", "must not contain '..' or end with '.'"),
        (".x", "must start with a letter or a digit"),
        ("ü", "must start with a letter or a digit"),
    ] {
        assert_status(
            publish(&s.channel, bad, vec![msg("p")]).await,
            Code::InvalidArgument,
            &format!("topic: {why}"),
        );
    }
    assert_status(
        publish(&s.channel, "orders", vec![]).await,
        Code::InvalidArgument,
        "messages: must not be empty",
    );
    let big = pb::Message {
        payload: vec![0; 1024 * 1024 + 1],
        ..Default::default()
    };
    assert_status(
        publish(&s.channel, "orders", vec![msg("ok"), big]).await,
        Code::ResourceExhausted,
        "messages: [1] has a payload of 1048577 bytes, over the limit of 1048576 bytes",
    );
    let empty_key = pb::Message {
        key: Some(String::new()),
        ..msg("k")
    };
    assert_status(
        publish(&s.channel, "orders", vec![empty_key]).await,
        Code::InvalidArgument,
        "messages: [0].key must not be empty",
    );
    assert_status(
        publish(&s.channel, "nope", vec![msg("p")]).await,
        Code::NotFound,
        r#"topic "nope" not found"#,
    );
    // Nothing of the refused batches was stored.
    assert_eq!(s.stats("orders").await.messages, 0);

    // Topic admin.
    let mut t = s.topics();
    let dup = t
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            settings: None,
        })
        .await;
    assert_status(dup, Code::AlreadyExists, r#"topic "orders" already exists"#);
    let reserved = t
        .create_topic(pb::CreateTopicRequest {
            name: "x.dlq".into(),
            settings: None,
        })
        .await;
    assert_status(
        reserved,
        Code::InvalidArgument,
        r#"name: names ending in ".dlq" are reserved for dead-letter topics"#,
    );
    assert_status(
        t.delete_topic(pb::DeleteTopicRequest {
            name: "nope".into(),
        })
        .await,
        Code::NotFound,
        r#"topic "nope" not found"#,
    );
    assert_status(
        publish(&s.channel, "orders.dlq", vec![msg("p")]).await,
        Code::PermissionDenied,
        "only the queue itself publishes to dead-letter topics",
    );

    // Subscribing: unknown topic, bad open, missing open.
    assert_status(
        Raw::open(&s.channel, "nope", "g", 1, 1000).await,
        Code::NotFound,
        r#"topic "nope" not found"#,
    );
    assert_status(
        Raw::open(&s.channel, "orders", "", 1, 1000).await,
        Code::InvalidArgument,
        "group: must not be empty",
    );
    assert_status(
        Raw::open(&s.channel, "orders", "g", 0, 1000).await,
        Code::InvalidArgument,
        "credits: must be between 1 and 10000",
    );
    assert_status(
        Raw::open(&s.channel, "orders", "g", 1, 5).await,
        Code::InvalidArgument,
        "lease_ms: must be between 100 and 3600000",
    );
    let not_open = pb::SubscribeRequest {
        request: Some(Q::Credit(pb::Credit { credits: 1 })),
    };
    assert_status(
        Raw::open_with(&s.channel, not_open, |_| {}).await,
        Code::InvalidArgument,
        "open: the stream must start with open",
    );

    // A second open on an open stream ends it with INVALID_ARGUMENT.
    let mut c = s.consumer("orders", "g", 1, 1000).await;
    c.send(Q::Open(pb::Open::default())).await;
    let e = c.error().await;
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "open: the stream is already open")
    );
    s.stop().await;
}

/// A fault of the database reaches the client as exactly `internal error`;
/// what went wrong (here a missing table) stays in the log.
#[tokio::test]
async fn a_database_failure_reads_internal_error() {
    let s = Server::start().await;
    s.create_topic("orders", 0).await;
    let db = runtime::db::connect(&s.db.as_ref().unwrap().url)
        .await
        .unwrap();
    db.batch_execute("ALTER TABLE queue.topics RENAME TO topics_gone")
        .await
        .unwrap();
    assert_status(
        s.topics()
            .list_topics(pb::ListTopicsRequest::default())
            .await,
        Code::Internal,
        "internal error",
    );
    assert_status(
        s.topics()
            .get_topic_stats(pb::GetTopicStatsRequest {
                name: "orders".into(),
            })
            .await,
        Code::Internal,
        "internal error",
    );
    s.stop().await;
}

#[tokio::test]
async fn acks_of_unknown_or_expired_deliveries_are_refused() {
    let s = Server::start().await;
    s.create_topic("jobs", 0).await;
    s.publish("jobs", &["one"]).await;
    let mut c = s.consumer("jobs", "workers", 1, 300).await;
    let d = c.next().await;
    assert_eq!(d.attempt, 1);
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(c.ack(&unknown).await.code, Code::NotFound as i32);
    // Let the lease end: the ack is refused, the message comes back.
    let again = c.next().await;
    assert_eq!(again.message_id, d.message_id);
    assert_eq!(again.attempt, 2);
    let late = c.ack(&d.delivery_id).await;
    assert_eq!(late.code, Code::FailedPrecondition as i32, "{late:?}");
    assert_eq!(c.ack(&again.delivery_id).await.code, 0);
    // Acked twice: the second time it is no longer ours.
    assert_ne!(c.ack(&again.delivery_id).await.code, 0);
    let st = s.stats("jobs").await;
    assert_eq!((st.depth, st.in_flight), (0, 0));
    s.stop().await;
}

/// Settlements sent in one burst are looked up lease by lease (migration V3):
/// each id settles its own delivery, an extension keeps its lease past the
/// original end, and a nacked one comes back while the extended one does not.
#[tokio::test]
async fn a_burst_of_acks_nacks_and_extensions_settles_each_lease() {
    use pb::subscribe_request::Request;
    let s = Server::start().await;
    s.create_topic("burst", 0).await;
    s.publish("burst", &["a", "b", "c", "d"]).await;
    let mut c = s.consumer("burst", "workers", 4, 500).await;
    let d: Vec<pb::Delivery> = vec![
        c.next().await,
        c.next().await,
        c.next().await,
        c.next().await,
    ];
    let id = |i: usize| d[i].delivery_id.clone();
    // One ack message for two leases, in the reverse of their order.
    c.send(Request::Ack(pb::Ack {
        delivery_ids: vec![id(2), id(0)],
    }))
    .await;
    c.send(Request::Extend(pb::Extend {
        delivery_ids: vec![id(1)],
        lease_ms: 30_000,
    }))
    .await;
    c.send(Request::Nack(pb::Nack {
        delivery_ids: vec![id(3)],
        requeue_delay_ms: 0,
    }))
    .await;
    for i in 0..4 {
        let o = c.outcome(&id(i)).await;
        assert_eq!(o.code, 0, "delivery {i}: {o:?}");
    }
    // The nacked one comes back, attempt 2.
    let again = c.next().await;
    assert_eq!(
        (again.message_id.as_str(), again.attempt),
        (d[3].message_id.as_str(), 2)
    );
    assert_eq!(c.ack(&again.delivery_id).await.code, 0);
    // The extended one outlives its first lease of 500 ms and is still ours.
    assert!(c.next_within(Duration::from_millis(1_500)).await.is_none());
    assert_eq!(c.ack(&id(1)).await.code, 0);
    // The acked ones are gone: acking them again is refused.
    assert_ne!(c.ack(&id(0)).await.code, 0);
    let st = s.stats("burst").await;
    assert_eq!((st.depth, st.in_flight), (0, 0));
    s.stop().await;
}

#[tokio::test]
async fn idempotent_publish_is_stored_once() {
    let s = Server::start().await;
    s.create_topic("casts", 0).await;
    let m = |p: &str, id: &str| pb::Message {
        idempotency_id: Some(id.into()),
        ..msg(p)
    };
    let first = publish(&s.channel, "casts", vec![m("a", "id-1"), m("b", "id-2")])
        .await
        .unwrap();
    assert!(first.iter().all(|p| !p.duplicate));
    // Again, in another request, and twice within one request.
    let again = publish(
        &s.channel,
        "casts",
        vec![m("a", "id-1"), m("c", "id-3"), m("c", "id-3")],
    )
    .await
    .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].message_id, first[0].message_id);
    assert!(!again[1].duplicate);
    assert!(again[2].duplicate);
    assert_eq!(again[2].message_id, again[1].message_id);
    // Concurrent republishes of one id.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let ch = s.channel.clone();
        tasks.push(tokio::spawn(async move {
            publish(&ch, "casts", vec![m("z", "id-z")]).await.unwrap()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap()[0].message_id.clone());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(s.stats("casts").await.messages, 4);

    let mut c = s.consumer("casts", "g", 10, 30_000).await;
    let mut got = Vec::new();
    while let Some(d) = c.next_within(Duration::from_millis(500)).await {
        got.push(String::from_utf8(d.payload).unwrap());
    }
    got.sort();
    assert_eq!(got, ["a", "b", "c", "z"]);
    s.stop().await;
}

#[tokio::test]
async fn every_group_sees_every_message_and_members_compete() {
    let s = Server::start().await;
    s.create_topic("notifications.info", 0).await;
    let mut audit = s.consumer("notifications.info", "audit", 100, 30_000).await;
    let mut billing_a = s
        .consumer("notifications.info", "billing", 100, 30_000)
        .await;
    let mut billing_b = s
        .consumer("notifications.info", "billing", 100, 30_000)
        .await;
    let payloads: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    s.publish("notifications.info", &refs).await;

    let mut seen_audit = Vec::new();
    for _ in 0..40 {
        let d = audit.next().await;
        seen_audit.push(d.message_id.clone());
        audit.ack(&d.delivery_id).await;
    }
    let mut seen_billing = HashMap::new();
    while seen_billing.len() < 40 {
        let (who, d) = tokio::select! {
            Some(d) = billing_a.next_within(WAIT) => ("a", d),
            Some(d) = billing_b.next_within(WAIT) => ("b", d),
        };
        let c = if who == "a" {
            &mut billing_a
        } else {
            &mut billing_b
        };
        assert_eq!(c.ack(&d.delivery_id).await.code, 0);
        assert!(
            seen_billing.insert(d.message_id, who).is_none(),
            "delivered twice"
        );
    }
    let mut a: Vec<_> = seen_audit.clone();
    a.sort();
    let mut b: Vec<_> = seen_billing.keys().cloned().collect();
    b.sort();
    assert_eq!(a, b);
    // A group created later starts with what the topic still retains.
    let mut late = s.consumer("notifications.info", "late", 100, 30_000).await;
    for _ in 0..40 {
        late.next().await;
    }
    let st = s.stats("notifications.info").await;
    assert_eq!(st.groups.len(), 3);
    assert_eq!(st.in_flight, 40);
    s.stop().await;
}

#[tokio::test]
async fn a_consumer_never_holds_more_than_its_credits() {
    let s = Server::start().await;
    s.create_topic("slow", 0).await;
    let refs: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    s.publish("slow", &refs).await;
    let mut c = s.consumer("slow", "g", 3, 60_000).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(c.next().await);
    }
    // It stops acking: nothing more comes while it holds its credits.
    assert!(c.next_within(Duration::from_millis(800)).await.is_none());
    let st = s.stats("slow").await;
    assert_eq!((st.in_flight, st.depth), (3, 17));
    // One ack frees one slot.
    let d = held.remove(0);
    assert_eq!(c.ack(&d.delivery_id).await.code, 0);
    held.push(c.next().await);
    assert!(c.next_within(Duration::from_millis(500)).await.is_none());
    // More credits, more in flight.
    c.send(Q::Credit(pb::Credit { credits: 2 })).await;
    held.push(c.next().await);
    held.push(c.next().await);
    assert!(c.next_within(Duration::from_millis(500)).await.is_none());
    assert_eq!(s.stats("slow").await.in_flight, 5);

    // A stream that stops reading altogether gets no more than its credits.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(open_req("slow", "stalled", 4, 60_000))
        .await
        .unwrap();
    let stalled = s
        .queue()
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = s.stats("slow").await;
        let g = st.groups.iter().find(|g| g.group == "stalled");
        if g.is_some_and(|g| g.in_flight == 4) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = s.stats("slow").await;
    let g = st.groups.iter().find(|g| g.group == "stalled").unwrap();
    assert_eq!((g.in_flight, g.depth), (4, 16));
    drop((stalled, tx));
    s.stop().await;
}

#[tokio::test]
async fn nack_redelivers_and_poison_goes_to_the_dead_letter_topic() {
    let s = Server::start().await;
    s.create_topic("builds", 3).await;
    let mut c = s.consumer("builds", "compute", 5, 30_000).await;
    s.publish("builds", &["poison"]).await;
    for attempt in 1..=3 {
        let d = c.next().await;
        assert_eq!(d.attempt, attempt);
        assert_eq!(d.payload, b"poison");
        assert_eq!(c.nack(&d.delivery_id, 0).await.code, 0);
    }
    // After its third attempt it is no longer delivered here...
    assert!(c.next_within(Duration::from_millis(800)).await.is_none());
    // ...but in builds.dlq, saying where it came from.
    let mut dlq = s.consumer("builds.dlq", "ops", 5, 30_000).await;
    let d = dlq.next().await;
    assert_eq!(d.payload, b"poison");
    assert_eq!(d.headers["x-dead-letter-topic"], "builds");
    assert_eq!(d.headers["x-dead-letter-group"], "compute");
    assert_eq!(d.headers["x-dead-letter-attempts"], "3");
    let st = s.stats("builds").await;
    assert_eq!((st.dead_lettered, st.depth, st.in_flight), (1, 0, 0));

    // A nack with a delay: back after it, attempt + 1.
    s.publish("builds", &["later"]).await;
    let d = c.next().await;
    c.nack(&d.delivery_id, 300).await;
    let again = c.next().await;
    assert_eq!((again.message_id, again.attempt), (d.message_id, 2));
    s.stop().await;
}

#[tokio::test]
async fn topics_are_listed_with_stats_and_deleted_with_their_dead_letters() {
    let s = Server::start().await;
    let mut t = s.topics();
    let created = t
        .create_topic(pb::CreateTopicRequest {
            name: "compute.h1".into(),
            settings: Some(pb::TopicSettings {
                retention_secs: 60,
                ttl_secs: 3600,
                max_attempts: 4,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.dead_letter_topic, "compute.h1.dlq");
    let settings = created.settings.unwrap();
    assert_eq!(
        (
            settings.retention_secs,
            settings.ttl_secs,
            settings.max_attempts
        ),
        (60, 3600, 4)
    );
    let names: Vec<String> = t
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["compute.h1", "compute.h1.dlq"]);
    let mut c = s.consumer("compute.h1", "agent", 5, 30_000).await;
    s.publish("compute.h1", &["a", "b"]).await;
    c.next().await;
    let st = wait_for("one message in flight", WAIT, || async {
        let st = s.stats("compute.h1").await;
        match st.in_flight >= 1 {
            true => Ok(st),
            false => Err(format!("{st:?}")),
        }
    })
    .await;
    assert_eq!((st.messages, st.depth + st.in_flight), (2, 2));
    assert_status(
        t.delete_topic(pb::DeleteTopicRequest {
            name: "compute.h1.dlq".into(),
        })
        .await,
        Code::FailedPrecondition,
        "a dead-letter topic goes with its topic: delete that one",
    );
    t.delete_topic(pb::DeleteTopicRequest {
        name: "compute.h1".into(),
    })
    .await
    .unwrap();
    assert!(
        t.list_topics(pb::ListTopicsRequest {})
            .await
            .unwrap()
            .into_inner()
            .topics
            .is_empty()
    );
    assert_status(
        publish(&s.channel, "compute.h1", vec![msg("x")]).await,
        Code::NotFound,
        r#"topic "compute.h1" not found"#,
    );
    s.stop().await;
}

fn as_peer(peer: &'static str) -> impl FnOnce(&mut tonic::metadata::MetadataMap) {
    move |m| {
        runtime::caller::Caller {
            peer: Some(peer.into()),
            ..Default::default()
        }
        .to_metadata(m)
    }
}

#[tokio::test]
async fn topic_policy_follows_the_callers_spiffe_id() {
    let s = Server::start().await;
    s.create_topic("compute.h1", 0).await;
    let with = |peer: &'static str, topic: &str| {
        let mut r = tonic::Request::new(pb::PublishRequest {
            topic: topic.into(),
            messages: vec![msg("build")],
        });
        as_peer(peer)(r.metadata_mut());
        r
    };
    let sched = "spiffe://cirrus.local/svc/scheduler";
    let h1 = "spiffe://cirrus.local/svc/compute-agent/host/h1";
    let h2 = "spiffe://cirrus.local/svc/compute-agent/host/h2";
    s.queue().publish(with(sched, "compute.h1")).await.unwrap();
    assert_status(
        s.queue().publish(with(h1, "compute.h1")).await,
        Code::PermissionDenied,
        r#"the caller may not publish to topic "compute.h1""#,
    );
    assert_status(
        Raw::open_with(
            &s.channel,
            open_req("compute.h1", "agent", 1, 1000),
            as_peer(h2),
        )
        .await,
        Code::PermissionDenied,
        r#"the caller may not consume from topic "compute.h1""#,
    );
    let mut agent = Raw::open_with(
        &s.channel,
        open_req("compute.h1", "agent", 1, 1000),
        as_peer(h1),
    )
    .await
    .unwrap();
    assert_eq!(agent.next().await.payload, b"build");

    // Without a sidecar's header, and without trusting direct callers: refused.
    let strict = Server::start_with(|c| c.trust_direct_callers = false).await;
    assert_status(
        publish(&strict.channel, "compute.h1", vec![msg("x")]).await,
        Code::Unauthenticated,
        "authentication failed",
    );
    strict.stop().await;
    s.stop().await;
}

#[tokio::test]
async fn the_client_library_casts_consumes_and_carries_the_trace() {
    let s = Server::start().await;
    let q = s.client();
    q.ensure_topic("scheduler", Default::default())
        .await
        .unwrap();
    q.ensure_topic("scheduler", Default::default())
        .await
        .unwrap();
    let id = q.cast("scheduler", b"select".to_vec()).await.unwrap();
    // A publisher that carries a trace context explicitly.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    q.publish(
        "scheduler",
        vec![pb::Message {
            headers: [("traceparent".to_string(), traceparent.to_string())].into(),
            ..msg("traced")
        }],
    )
    .await
    .unwrap();
    let mut sub = q.subscribe("scheduler", "scheduler");
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!((first.message_id.as_str(), first.attempt), (id.as_str(), 1));
    first.ack().await.unwrap();
    // Acking twice is refused: the delivery is settled.
    assert!(first.ack().await.is_err());
    let traced = sub.next().await.unwrap().unwrap();
    use opentelemetry::trace::TraceContextExt;
    let cx = traced.trace_context();
    assert_eq!(
        cx.span().span_context().trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    traced.nack(Duration::ZERO).await.unwrap();
    let again = sub.next().await.unwrap().unwrap();
    assert_eq!(
        (again.message_id.as_str(), again.attempt),
        (traced.message_id.as_str(), 2)
    );
    again.ack().await.unwrap();
    // A typed cast: JSON in, the same value out, marked as JSON.
    let op = serde_json::json!({"op": "build", "server": "a1"});
    let id = q.cast_json("scheduler", &op).await.unwrap();
    let typed = sub.next().await.unwrap().unwrap();
    assert_eq!(typed.message_id, id);
    assert_eq!(typed.json::<serde_json::Value>().unwrap(), op);
    assert_eq!(
        typed
            .headers
            .get(queue::client::CONTENT_TYPE)
            .map(String::as_str),
        Some(queue::client::JSON)
    );
    typed.ack().await.unwrap();
    // Subscribing to a topic that does not exist is a final error.
    let mut bad = q.subscribe("nope", "g");
    assert_eq!(
        bad.next().await.unwrap().unwrap_err().code(),
        Code::NotFound
    );
    s.stop().await;
}

#[tokio::test]
async fn undelivered_messages_expire_after_the_topic_ttl() {
    let s = Server::start().await;
    s.topics()
        .create_topic(pb::CreateTopicRequest {
            name: "ephemeral".into(),
            settings: Some(pb::TopicSettings {
                ttl_secs: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut c = s.consumer("ephemeral", "g", 1, 60_000).await;
    s.publish("ephemeral", &["held", "waiting"]).await;
    let held = c.next().await;
    // The waiting one expires (the sweeper runs every second in tests); the
    // leased one is not taken from its consumer.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = s.stats("ephemeral").await;
        if st.depth == 0 {
            assert_eq!(st.in_flight, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.ack(&held.delivery_id).await.code, 0);
    assert!(c.next_within(Duration::from_millis(300)).await.is_none());
    s.stop().await;
}

/// Fresh messages reach an idle consumer by hand-off (leased in the publish
/// transaction), never past its credits; what does not fit waits in the
/// database and comes once a slot frees. Polls are slow here (30 s), so
/// only the hand-off or a wake-up can explain a delivery.
#[tokio::test]
async fn fresh_messages_are_handed_to_idle_consumers_within_their_credits() {
    let s = Server::start_with(|c| c.poll_interval_ms = 30_000).await;
    s.create_topic("fresh", 0).await;
    let mut a = s.consumer("fresh", "g", 2, 30_000).await;
    let mut other = s.consumer("fresh", "audit", 8, 30_000).await;
    let sent = s.publish("fresh", &["1", "2", "3"]).await;
    let first = a.next().await;
    let second = a.next().await;
    assert_eq!((first.attempt, second.attempt), (1, 1));
    assert!(
        a.next_within(Duration::from_millis(300)).await.is_none(),
        "never more than the credits"
    );
    // The other group gets all three.
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..3 {
        let d = other.next().await;
        seen.push(d.message_id.clone());
        assert_eq!(other.ack(&d.delivery_id).await.code, 0);
    }
    let all: Vec<String> = sent.iter().map(|p| p.message_id.clone()).collect();
    assert_eq!(seen, all, "handed off in publish order");
    assert_eq!(a.ack(&first.delivery_id).await.code, 0);
    let third = a.next().await;
    assert_eq!(third.message_id, all[2]);
    assert_eq!(a.ack(&second.delivery_id).await.code, 0);
    assert_eq!(a.ack(&third.delivery_id).await.code, 0);
    let st = s.stats("fresh").await;
    assert_eq!((st.depth, st.in_flight), (0, 0), "{st:?}");
    s.stop().await;
}
