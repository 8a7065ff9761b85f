//! Pending reviews in the in-process store: the records by id, with their tenant and deadline.
//! Bounded: at most `max` pending reviews; opening one more fails like an unreachable store, so
//! the job waits (and is redelivered) instead of losing its review.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::StateError;

#[derive(Default)]
struct Inner {
    records: HashMap<String, (Bytes, String, i64)>,
    by_deadline: BTreeSet<(i64, String)>,
}

#[derive(Clone)]
pub struct MemoryReviews {
    inner: Arc<Mutex<Inner>>,
    max: usize,
}

impl MemoryReviews {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::default(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open(
        &self,
        id: &str,
        tenant: &str,
        deadline_ms: i64,
        record: Bytes,
    ) -> Result<bool, StateError> {
        let mut inner = self.lock();
        if let Some((stored, _, deadline)) = inner.records.get_mut(id) {
            // The latest request for the review is the one a reviewer answers.
            *stored = record;
            let old = std::mem::replace(deadline, deadline_ms);
            inner.by_deadline.remove(&(old, id.to_owned()));
            inner.by_deadline.insert((deadline_ms, id.to_owned()));
            return Ok(false);
        }
        if inner.records.len() >= self.max {
            return Err(StateError::Unavailable(format!(
                "the in-process store holds its most pending reviews ({}); decide some, or use Redis",
                self.max
            )));
        }
        inner
            .records
            .insert(id.to_owned(), (record, tenant.to_owned(), deadline_ms));
        inner.by_deadline.insert((deadline_ms, id.to_owned()));
        Ok(true)
    }

    pub fn get(&self, id: &str) -> Option<Bytes> {
        self.lock().records.get(id).map(|(r, _, _)| r.clone())
    }

    pub fn forget(&self, id: &str) {
        let mut inner = self.lock();
        if let Some((_, _, deadline)) = inner.records.remove(id) {
            inner.by_deadline.remove(&(deadline, id.to_owned()));
        }
    }

    pub fn by_deadline(&self, until_ms: Option<i64>, limit: usize) -> Vec<String> {
        self.lock()
            .by_deadline
            .iter()
            .take_while(|(deadline, _)| until_ms.is_none_or(|until| *deadline <= until))
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }

    pub fn counts(&self) -> Vec<(String, u64)> {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (_, tenant, _) in self.lock().records.values() {
            *counts.entry(tenant.clone()).or_default() += 1;
        }
        counts.into_iter().collect()
    }
}
