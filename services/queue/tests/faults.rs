//! Faults with real processes and a real Postgres: the queue killed with
//! SIGKILL during a publish burst, a consumer dying with leases, two
//! replicas on one database, per-key order under competing consumers.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use proto::queue::v1 as pb;
use queue::client::{Client, SubscribeOptions};
use runtime::db::TestDatabase;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_publish_survives_kill_9_of_the_queue() {
    let db = TestDatabase::create().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = Proc::spawn(dir.path(), &db.url, "127.0.0.1:0").await;
    let addr = first.addr;
    let client = Client::from_channel(first.channel());
    client
        .ensure_topic("burst", Default::default())
        .await
        .unwrap();

    // A consumer through the client library, which must ride out the crash.
    let received = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut sub = client.subscribe_with(
        "burst",
        "consumers",
        SubscribeOptions {
            credits: 64,
            lease: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let got = received.clone();
    let consumer = tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let Ok(d) = d else { continue };
            got.lock()
                .unwrap()
                .insert(String::from_utf8(d.payload.clone()).unwrap());
            // Acks of deliveries from the broken stream fail; they come back.
            let _ = d.ack().await;
        }
    });

    // Publishers record what the queue acknowledged.
    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (acked, stop, ch) = (acked.clone(), stop.clone(), first.channel());
        publishers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<String> = (0..1 + n % 5).map(|i| format!("p{p}-{n}-{i}")).collect();
                n += 1;
                let msgs = batch.iter().map(|b| msg(b)).collect();
                match tokio::time::timeout(WAIT, publish(&ch, "burst", msgs)).await {
                    Ok(Ok(_)) => acked.lock().unwrap().extend(batch),
                    // Refused or cut off by the crash: not acknowledged, may or may not be stored.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.lock().unwrap().len() < 400 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing too slow"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill9().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Same address: the consumer's client reconnects by itself.
    let second = Proc::spawn(dir.path(), &db.url, &addr.to_string()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing = acked.difference(&received.lock().unwrap()).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} acknowledged publishes never delivered",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.abort();
    second.kill9().await;
}

fn channel(s: &Server) -> Channel {
    // A connection of its own, so dropping it is the consumer dying.
    Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect_lazy()
}

#[tokio::test]
async fn a_dead_consumers_messages_go_to_another_after_the_lease() {
    let s = Server::start().await;
    s.create_topic("work", 0).await;
    let own = channel(&s);
    let mut doomed = Raw::open(&own, "work", "g", 5, 1000).await.unwrap();
    let published = s.publish("work", &["a", "b", "c", "d", "e"]).await;
    let mut held = HashSet::new();
    for _ in 0..5 {
        held.insert(doomed.next().await.message_id);
    }
    // It dies holding all five leases: its connection goes away.
    drop(doomed);
    drop(own);
    let mut heir = s.consumer("work", "g", 10, 30_000).await;
    let mut got = HashSet::new();
    for _ in 0..5 {
        let d = heir.next().await;
        assert_eq!(d.attempt, 2, "a redelivery after the lease");
        assert_eq!(heir.ack(&d.delivery_id).await.code, 0);
        got.insert(d.message_id);
    }
    assert_eq!(got, held);
    let all: HashSet<String> = published.into_iter().map(|p| p.message_id).collect();
    assert_eq!(got, all);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_competing_consumers_deliver_each_message_once() {
    let a = Server::start().await;
    let db = a.db.clone().unwrap();
    let b = Server::replica(&db, |_| {}).await;
    a.create_topic("shared", 0).await;

    const N: usize = 300;
    let seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for (i, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut c = Raw::open(&channel(server), "shared", "workers", 8, 30_000)
            .await
            .unwrap();
        let (seen, done) = (seen.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut mine = 0;
            while done.load(Ordering::SeqCst) < N && tokio::time::Instant::now() < deadline {
                let Some(d) = c.next_within(Duration::from_millis(200)).await else {
                    continue;
                };
                *seen
                    .lock()
                    .unwrap()
                    .entry(d.message_id.clone())
                    .or_default() += 1;
                done.fetch_add(1, Ordering::SeqCst);
                assert_eq!(c.ack(&d.delivery_id).await.code, 0, "consumer {i}");
                mine += 1;
            }
            mine
        }));
    }
    // Publishers on both replicas.
    let mut publishers = Vec::new();
    for (p, server) in [&a, &b].into_iter().enumerate() {
        let ch = server.channel.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..N / 2 / 5 {
                let msgs = (0..5).map(|i| msg(&format!("r{p}-{n}-{i}"))).collect();
                ids.extend(
                    publish(&ch, "shared", msgs)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|x| x.message_id),
                );
            }
            ids
        }));
    }
    let mut published = HashSet::new();
    for p in publishers {
        published.extend(p.await.unwrap());
    }
    let mut per_consumer = Vec::new();
    for c in consumers {
        per_consumer.push(
            tokio::time::timeout(Duration::from_secs(90), c)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(published.len(), N);
    assert_eq!(seen.len(), N, "every message delivered");
    assert!(
        seen.values().all(|n| *n == 1),
        "none delivered twice within a lease"
    );
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), published);
    assert_eq!(per_consumer.iter().sum::<usize>(), N);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_competing_consumers() {
    let s = Server::start().await;
    s.create_topic("ordered", 0).await;
    const KEYS: usize = 5;
    const PER_KEY: usize = 20;
    // Interleaved keys, published in order: k0-0, k1-0, ..., k0-1, ...
    let mut msgs = Vec::new();
    for n in 0..PER_KEY {
        for k in 0..KEYS {
            msgs.push(pb::Message {
                key: Some(format!("k{k}")),
                ..msg(&format!("{n}"))
            });
        }
    }
    let log = Arc::new(Mutex::new(Vec::<(String, usize)>::new()));
    let mut consumers = Vec::new();
    for i in 0..3u64 {
        let mut c = Raw::open(&channel(&s), "ordered", "g", 4, 30_000)
            .await
            .unwrap();
        let log = log.clone();
        consumers.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while log.lock().unwrap().len() < KEYS * PER_KEY
                && tokio::time::Instant::now() < deadline
            {
                let Some(d) = c.next_within(Duration::from_millis(200)).await else {
                    continue;
                };
                let n: usize = String::from_utf8(d.payload).unwrap().parse().unwrap();
                // Consumers work at different speeds; one nacks now and then
                // (a nacked message is not handled: it comes back, in order).
                tokio::time::sleep(Duration::from_millis(i * 3)).await;
                if i == 0 && n % 7 == 3 && d.attempt == 1 {
                    assert_eq!(c.nack(&d.delivery_id, 0).await.code, 0);
                } else {
                    log.lock().unwrap().push((d.key.unwrap(), n));
                    assert_eq!(c.ack(&d.delivery_id).await.code, 0);
                }
            }
        }));
    }
    for chunk in msgs.chunks(10) {
        publish(&s.channel, "ordered", chunk.to_vec())
            .await
            .unwrap();
    }
    for c in consumers {
        tokio::time::timeout(Duration::from_secs(90), c)
            .await
            .unwrap()
            .unwrap();
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), KEYS * PER_KEY);
    for k in 0..KEYS {
        let order: Vec<usize> = log
            .iter()
            .filter(|(key, _)| *key == format!("k{k}"))
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(order, (0..PER_KEY).collect::<Vec<_>>(), "key k{k}");
    }
    s.stop().await;
}

/// A consumer that keeps its stream open but never acks, beside a healthy one
/// of the same group: after the hung one's lease ends, the message goes to the
/// healthy one (attempt 2), never back to the hung one, and is not
/// dead-lettered. `healthy_on` picks the replica of the healthy consumer.
async fn hung_consumer_case(cross_replica: bool) {
    // Slow polls: the healthy consumer can only learn of the ended lease by
    // being woken, not by a lucky poll.
    let slow = |c: &mut queue::Config| c.poll_interval_ms = 30_000;
    let a = Server::start_with(slow).await;
    let b = match cross_replica {
        true => Some(Server::replica(a.db.as_ref().unwrap(), slow).await),
        false => None,
    };
    a.create_topic("jobs", 2).await;
    let mut hung = Raw::open(&channel(&a), "jobs", "workers", 1, 1000)
        .await
        .unwrap();
    let published = a.publish("jobs", &["only"]).await;
    let first = hung.next().await;
    assert_eq!(
        (first.message_id.as_str(), first.attempt),
        (published[0].message_id.as_str(), 1)
    );
    // The healthy consumer joins with free credits; nothing is ready for it yet.
    let mut healthy = Raw::open(
        &channel(b.as_ref().unwrap_or(&a)),
        "jobs",
        "workers",
        4,
        30_000,
    )
    .await
    .unwrap();
    // The hung consumer never acks. Its lease ends after 1 s.
    let redelivered = healthy.next_within(WAIT).await;
    let stolen = hung.next_within(Duration::from_millis(300)).await;
    assert!(
        stolen.is_none(),
        "the hung consumer got its own expired message back: {stolen:?} (healthy saw {redelivered:?})"
    );
    let d = redelivered.expect("the healthy consumer gets the message after the lease");
    assert_eq!(
        (d.message_id.as_str(), d.attempt),
        (first.message_id.as_str(), 2)
    );
    assert_eq!(healthy.ack(&d.delivery_id).await.code, 0);
    // The hung consumer's late ack is refused: the lease is gone.
    assert_ne!(hung.ack(&first.delivery_id).await.code, 0);
    let stats = a.stats("jobs").await;
    let g = &stats.groups[0];
    assert_eq!(
        (g.depth, g.in_flight, g.dead_lettered),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(a.stats("jobs.dlq").await.messages, 0);
    drop(hung);
    drop(healthy);
    if let Some(b) = b {
        b.stop().await;
    }
    a.stop().await;
}

#[tokio::test]
async fn a_hung_consumers_redelivery_goes_to_a_healthy_one() {
    hung_consumer_case(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_consumers_redelivery_goes_to_a_healthy_one_on_another_replica() {
    hung_consumer_case(true).await;
}

/// Alone, a consumer whose lease ended still gets its message back (after
/// the grace the others had), up to the dead-letter topic.
#[tokio::test]
async fn a_lone_hung_consumer_still_gets_its_redeliveries() {
    let s = Server::start().await;
    s.create_topic("solo", 2).await;
    let mut hung = Raw::open(&channel(&s), "solo", "g", 1, 300).await.unwrap();
    s.publish("solo", &["x"]).await;
    let first = hung.next().await;
    let second = hung.next().await;
    assert_eq!((first.attempt, second.attempt), (1, 2));
    assert_eq!(first.message_id, second.message_id);
    // Past max_attempts (2) it goes to the dead-letter topic.
    runtime::testing::wait_for("the message in the dead-letter topic", WAIT, || async {
        let dlq = s.stats("solo.dlq").await;
        match dlq.messages {
            1 => Ok(()),
            _ => Err(format!("{dlq:?}")),
        }
    })
    .await;
    assert_eq!(s.stats("solo").await.groups[0].dead_lettered, 1);
    s.stop().await;
}
