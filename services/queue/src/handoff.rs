//! Direct hand-off: a fresh message goes straight to a consumer of this
//! replica that has free credits, leased to it in the publish transaction
//! itself, instead of being claimed by that consumer after a wake-up.
//!
//! It saves, per message, the claim statement and the wake → claim delay:
//! publish → deliver is then the commit plus one hop through a channel.
//! Nothing about durability changes: the delivery row is written, leased,
//! in the same transaction as the message, and the consumer gets it only
//! after that transaction committed.
//!
//! A consumer that is *drained* (its last claim found nothing more ready)
//! offers its free slots here; the committer takes one slot of one consumer
//! per local group for each message without a key (keyed messages keep the
//! claim path, which enforces per-key order). Every slot taken is answered
//! with exactly one [`Handed`]: the delivery after the commit, or `Cancel`
//! when the commit failed, so the consumer's count of promised slots is
//! always exact and it never holds more than its credits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::model::Delivery;

/// What a consumer receives for a slot it offered.
#[derive(Debug)]
pub enum Handed {
    /// A committed delivery, leased to this consumer.
    Delivery(Box<Delivery>),
    /// The slot comes back unused (the commit failed or the group is gone).
    Cancel,
}

/// One consumer session as the committers see it.
#[derive(Debug)]
pub struct Taker {
    pub group_id: i32,
    /// The session's id (`deliveries.last_consumer`).
    pub consumer: Uuid,
    pub lease: Duration,
    slots: AtomicUsize,
    tx: mpsc::UnboundedSender<Handed>,
}

impl Taker {
    pub fn new(
        group_id: i32,
        consumer: Uuid,
        lease: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Handed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let taker = Self {
            group_id,
            consumer,
            lease,
            slots: AtomicUsize::new(0),
            tx,
        };
        (Arc::new(taker), rx)
    }

    /// Offers `n` slots (after [`Taker::withdraw`]).
    pub fn offer(&self, n: usize) {
        self.slots.store(n, Ordering::SeqCst);
    }

    /// Takes back every slot not yet taken; returns how many.
    pub fn withdraw(&self) -> usize {
        self.slots.swap(0, Ordering::SeqCst)
    }

    fn take_slot(&self) -> bool {
        self.slots
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Answers one taken slot; gives the value back if the session is gone.
    pub fn hand(&self, h: Handed) -> Result<(), Handed> {
        self.tx.send(h).map_err(|e| e.0)
    }
}

/// The local consumers by topic.
#[derive(Default)]
pub struct Registry {
    topics: Mutex<HashMap<i32, Vec<Arc<Taker>>>>,
    /// Rotates the first consumer tried, so that members of a group share.
    turn: AtomicUsize,
}

impl Registry {
    pub fn register(&self, topic: i32, taker: Arc<Taker>) {
        let mut map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(topic).or_default().push(taker);
    }

    pub fn unregister(&self, topic: i32, taker: &Arc<Taker>) {
        let mut map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&topic) {
            list.retain(|t| !Arc::ptr_eq(t, taker));
            if list.is_empty() {
                map.remove(&topic);
            }
        }
    }

    /// Whether `topic` has consumers on this replica.
    pub fn has_consumers(&self, topic: i32) -> bool {
        let map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&topic)
    }

    /// Takes one free slot of one consumer in each local group of `topic`.
    /// Returns the consumers whose slot was taken, and how many local groups
    /// the topic has (a message handed to all of them needs no wake-up here).
    pub fn reserve(&self, topic: i32) -> (Vec<Arc<Taker>>, usize) {
        let map = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = map.get(&topic) else {
            return (Vec::new(), 0);
        };
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % list.len();
        let mut groups = HashSet::new();
        let mut served = HashSet::new();
        let mut taken = Vec::new();
        for i in 0..list.len() {
            let t = &list[(start + i) % list.len()];
            groups.insert(t.group_id);
            if !served.contains(&t.group_id) && t.take_slot() {
                served.insert(t.group_id);
                taken.push(t.clone());
            }
        }
        (taken, groups.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_group_and_members_take_turns() {
        let r = Registry::default();
        let (a, _ra) = Taker::new(1, Uuid::new_v4(), Duration::from_secs(1));
        let (b, _rb) = Taker::new(1, Uuid::new_v4(), Duration::from_secs(1));
        let (c, _rc) = Taker::new(2, Uuid::new_v4(), Duration::from_secs(1));
        for t in [&a, &b, &c] {
            r.register(7, t.clone());
            t.offer(2);
        }
        let mut per_taker = HashMap::new();
        for _ in 0..2 {
            let (taken, groups) = r.reserve(7);
            assert_eq!(groups, 2);
            assert_eq!(taken.len(), 2, "one of group 1, one of group 2");
            for t in taken {
                *per_taker.entry(t.consumer).or_insert(0) += 1;
            }
        }
        assert_eq!(per_taker[&c.consumer], 2);
        assert_eq!(
            per_taker.get(&a.consumer).copied().unwrap_or(0)
                + per_taker.get(&b.consumer).copied().unwrap_or(0),
            2
        );
        // Withdrawn slots are not taken; an unknown topic has no groups.
        for t in [&a, &b, &c] {
            t.withdraw();
        }
        assert_eq!(r.reserve(7).0.len(), 0);
        assert_eq!(r.reserve(8).1, 0);
        r.unregister(7, &a);
        r.unregister(7, &b);
        r.unregister(7, &c);
        assert_eq!(r.reserve(7).1, 0);
    }
}
