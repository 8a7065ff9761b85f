//! Jobs waiting for a provider batch, in the in-process store: their parking records and
//! answers, the request queue per model, submissions under way and open batches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

#[derive(Default)]
struct Inner {
    parked: HashMap<String, Bytes>,
    answers: HashMap<String, BTreeMap<String, Bytes>>,
    queues: HashMap<String, VecDeque<Bytes>>,
    submitting: BTreeMap<String, Bytes>,
    open: BTreeMap<String, Bytes>,
}

/// Bounded like the store's other entries: at most `max` parked jobs (parking one more fails
/// like an unreachable store, so the job waits instead of being lost).
#[derive(Clone)]
pub struct MemoryBatches {
    inner: Arc<Mutex<Inner>>,
    max: usize,
}

impl MemoryBatches {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::default(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn park(&self, job_key: &str, record: Bytes) -> bool {
        let mut inner = self.lock();
        if !inner.parked.contains_key(job_key) && inner.parked.len() >= self.max {
            return false;
        }
        inner.parked.insert(job_key.to_owned(), record);
        true
    }

    pub fn parked(&self, job_key: &str) -> Option<Bytes> {
        self.lock().parked.get(job_key).cloned()
    }

    pub fn unpark(&self, job_key: &str) {
        let mut inner = self.lock();
        inner.parked.remove(job_key);
        inner.answers.remove(job_key);
    }

    /// Kept even before the job's record is written (a batch quicker than its parking).
    pub fn answer(&self, job_key: &str, key: &str, answer: Bytes) {
        let mut inner = self.lock();
        if inner.answers.len() >= self.max && !inner.answers.contains_key(job_key) {
            return;
        }
        inner
            .answers
            .entry(job_key.to_owned())
            .or_default()
            .insert(key.to_owned(), answer);
    }

    pub fn answers(&self, job_key: &str) -> Vec<(String, Bytes)> {
        self.lock()
            .answers
            .get(job_key)
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn queued(&self, queue: &str) -> u64 {
        self.lock().queues.get(queue).map_or(0, |q| q.len() as u64)
    }

    pub fn enqueue(&self, queue: &str, items: Vec<Bytes>) {
        self.lock()
            .queues
            .entry(queue.to_owned())
            .or_default()
            .extend(items);
    }

    pub fn take(&self, queue: &str, max: usize, submission: &str, at_ms: i64) -> Vec<Bytes> {
        let mut inner = self.lock();
        let taken: Vec<Bytes> = match inner.queues.get_mut(queue) {
            Some(q) => {
                let n = q.len().min(max);
                q.drain(..n).collect()
            }
            None => Vec::new(),
        };
        if !taken.is_empty() {
            let items: Vec<String> = taken
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect();
            let meta = serde_json::json!({"queue": queue, "at": at_ms, "items": items});
            inner
                .submitting
                .insert(submission.to_owned(), Bytes::from(meta.to_string()));
        }
        taken
    }

    pub fn opened(&self, submission: &str, batch: &str, meta: Bytes) {
        let mut inner = self.lock();
        inner.submitting.remove(submission);
        inner.open.insert(batch.to_owned(), meta);
    }

    pub fn submissions(&self) -> Vec<(String, Bytes)> {
        self.lock()
            .submitting
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Gives a submission's requests back to the queue, once (a submission already opened or
    /// given back is left alone).
    pub fn requeue(&self, submission: &str, queue: &str, items: Vec<Bytes>) {
        let mut inner = self.lock();
        if inner.submitting.remove(submission).is_some() {
            inner
                .queues
                .entry(queue.to_owned())
                .or_default()
                .extend(items);
        }
    }

    pub fn open(&self) -> Vec<(String, Bytes)> {
        self.lock()
            .open
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn close(&self, batch: &str) {
        self.lock().open.remove(batch);
    }
}
