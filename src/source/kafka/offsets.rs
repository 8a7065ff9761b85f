//! Per-partition ordered completion: which offset may be committed.
//!
//! Jobs finish out of order, but a Kafka offset commit says "everything below this is done". The
//! tracker keeps the offsets still in flight per partition; the committable position is the lowest
//! in-flight offset (or one past the highest seen when none are in flight), so nothing unfinished
//! is ever skipped. Revoking a partition forgets it: acks from before the revocation carry an old
//! epoch and are ignored, so a partition we no longer own is never committed from stale state.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    pub topic: Arc<str>,
    pub partition: i32,
}

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    /// One past the highest offset registered.
    next: i64,
    /// The last position handed out for committing.
    committed: i64,
}

#[derive(Debug, Default)]
struct Inner {
    epoch: u64,
    partitions: HashMap<PartitionKey, PartitionState>,
}

/// A registered offset: what the ack must present.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub key: PartitionKey,
    pub offset: i64,
    epoch: u64,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<Inner>,
}

impl OffsetTracker {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `offset` was handed to a worker.
    pub fn register(&self, key: PartitionKey, offset: i64) -> Ticket {
        let mut inner = self.lock();
        let epoch = inner.epoch;
        let state = inner
            .partitions
            .entry(key.clone())
            .or_insert_with(|| PartitionState {
                epoch,
                in_flight: BTreeSet::new(),
                next: offset,
                committed: offset,
            });
        state.in_flight.insert(offset);
        state.next = state.next.max(offset + 1);
        Ticket {
            key,
            offset,
            epoch: state.epoch,
        }
    }

    /// Marks the ticket's offset finished. When the committable position (the next offset to
    /// consume) advanced, calls `store` with it while still holding the lock, so concurrent acks
    /// store positions in increasing order; returns that position. `None` when it did not advance
    /// or the partition was revoked since.
    pub fn finish(&self, ticket: &Ticket, store: impl FnOnce(&PartitionKey, i64)) -> Option<i64> {
        let mut inner = self.lock();
        let state = inner.partitions.get_mut(&ticket.key)?;
        if state.epoch != ticket.epoch {
            return None;
        }
        state.in_flight.remove(&ticket.offset);
        let position = state.in_flight.first().copied().unwrap_or(state.next);
        (position > state.committed).then(|| {
            state.committed = position;
            store(&ticket.key, position);
            position
        })
    }

    /// Whether `ticket`'s partition is still ours since it was handed out (not revoked).
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.lock()
            .partitions
            .get(&ticket.key)
            .is_some_and(|state| state.epoch == ticket.epoch)
    }

    /// Forgets partitions that were revoked; later acks for them are ignored.
    pub fn revoke(&self, keys: impl IntoIterator<Item = PartitionKey>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        for key in keys {
            inner.partitions.remove(&key);
        }
    }

    /// Offsets still in flight in the given partitions.
    pub fn in_flight_in(&self, keys: &[PartitionKey]) -> usize {
        let inner = self.lock();
        keys.iter()
            .filter_map(|k| inner.partitions.get(k))
            .map(|s| s.in_flight.len())
            .sum()
    }

    /// Offsets still in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock()
            .partitions
            .values()
            .map(|s| s.in_flight.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> PartitionKey {
        PartitionKey {
            topic: Arc::from("jobs"),
            partition: p,
        }
    }

    #[test]
    fn commits_only_up_to_the_lowest_unfinished_offset() {
        let t = OffsetTracker::default();
        let tickets: Vec<Ticket> = (10..15).map(|o| t.register(key(0), o)).collect();
        assert_eq!(
            t.finish(&tickets[2], |_, _| {}),
            None,
            "12 finished but 10 and 11 are in flight"
        );
        assert_eq!(t.finish(&tickets[1], |_, _| {}), None);
        assert_eq!(
            t.finish(&tickets[0], |_, _| {}),
            Some(13),
            "10..=12 done: resume at 13"
        );
        assert_eq!(t.finish(&tickets[4], |_, _| {}), None);
        assert_eq!(t.finish(&tickets[3], |_, _| {}), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let t = OffsetTracker::default();
        let a = t.register(key(0), 0);
        let b = t.register(key(1), 7);
        assert_eq!(t.finish(&b, |_, _| {}), Some(8));
        assert_eq!(t.finish(&a, |_, _| {}), Some(1));
    }

    #[test]
    fn acks_from_before_a_revocation_are_ignored() {
        let t = OffsetTracker::default();
        let old = t.register(key(0), 5);
        t.revoke([key(0)]);
        let new = t.register(key(0), 3);
        assert_eq!(t.finish(&old, |_, _| {}), None);
        assert_eq!(t.finish(&new, |_, _| {}), Some(4));
    }
}
