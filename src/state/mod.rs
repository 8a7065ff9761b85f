//! The state store: idempotency claims and final outcomes, behind one interface.
//!
//! A claim is a lease (owner token + expiry), renewed while its job runs, so a crashed worker's
//! job can be taken over once the lease runs out; a completed key holds the job's final outcome
//! for `result_ttl`, so a redelivery replays it instead of calling a provider again.
//! `memory` is per process (embedded mode, tests); `redis` is shared by all replicas.
//!
//! The store tracks its own reachability: any operation that fails marks it unavailable and the
//! next success marks it available again. The consume loop pauses while it is unavailable and
//! readiness reports it; no job is ever processed without its claim.

mod batches;
pub mod counters;
mod memory;
mod redis;

pub use redis::round_trips as redis_round_trips;
mod reviews;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use self::counters::{Booking, BudgetKeys, Rate, Spend};
pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
use crate::config::{RedisUrl, StateKind, StatePlan};

/// Pending reviews an in-process store made from a bare [`MemoryStore`] holds at most.
const MEMORY_REVIEWS: usize = 10_000;

/// Proof of holding a claim; completing or releasing a key needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken(pub(crate) String);

impl ClaimToken {
    pub(crate) fn random() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }
}

/// The answer to "may I process this key?".
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Nobody holds the key: process it, then `complete` or `release`.
    Acquired(ClaimToken),
    /// Finished before: these are the stored outcome's bytes.
    Done(bytes::Bytes),
    /// Another worker holds a live lease on it.
    Busy,
}

/// What a key holds, looked at without claiming it.
#[derive(Debug, Clone, PartialEq)]
pub enum Peek {
    Absent,
    /// A live claim: a worker is processing it.
    Claimed,
    Done(bytes::Bytes),
}

/// What renewing a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, lease extended (or re-taken after the key vanished in a store restart).
    Held,
    /// The key holds a finished outcome: ours, recorded a moment ago (a renew racing the
    /// record), or another worker's.
    Finished,
    /// Another worker holds the claim: ours lapsed and was taken over.
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store cannot be reached; the job must wait, never run unclaimed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone)]
enum Backend {
    Memory(MemoryStore, reviews::MemoryReviews, batches::MemoryBatches),
    Redis(Box<RedisStore>),
}

#[derive(Clone)]
pub struct StateStore {
    backend: Backend,
    available: Arc<AtomicBool>,
}

impl From<MemoryStore> for StateStore {
    fn from(store: MemoryStore) -> Self {
        Self {
            backend: Backend::Memory(
                store,
                reviews::MemoryReviews::new(MEMORY_REVIEWS),
                batches::MemoryBatches::new(MEMORY_REVIEWS),
            ),
            available: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// What opening the configured store would reject before reaching the network (for
/// `check-config`): an unparsable Redis URL, a missing password variable, unreadable TLS files.
pub fn check(plan: &StatePlan) -> anyhow::Result<()> {
    let StateKind::Redis { url, access, .. } = &plan.kind else {
        return Ok(());
    };
    self::redis::check(&resolved(url)?, access).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The Redis URL itself, or the one the variable `url_env` names holds.
fn resolved(url: &RedisUrl) -> anyhow::Result<String> {
    match url {
        RedisUrl::Inline(url) => Ok(url.clone()),
        RedisUrl::Env(var) => {
            crate::config::secret_from_env("state.url_env", var).map_err(anyhow::Error::msg)
        }
    }
}

impl From<RedisStore> for StateStore {
    fn from(store: RedisStore) -> Self {
        Self {
            backend: Backend::Redis(Box::new(store)),
            available: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl StateStore {
    /// Opens the configured store. Redis must be reachable at start-up; the error says how.
    pub async fn open(plan: &StatePlan) -> anyhow::Result<Self> {
        let backend = match &plan.kind {
            StateKind::Memory { max_entries } => Backend::Memory(
                MemoryStore::new(*max_entries),
                reviews::MemoryReviews::new(*max_entries),
                batches::MemoryBatches::new(*max_entries),
            ),
            StateKind::Redis {
                url,
                key_prefix,
                timeout,
                access,
            } => {
                let url = resolved(url)?;
                let store = RedisStore::connect_with(&url, key_prefix, *timeout, access)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "state: cannot connect to Redis at {}: {}",
                            crate::config::redact_url(&url),
                            crate::config::redact_in(&e.to_string(), &url)
                        )
                    })?;
                Backend::Redis(Box::new(store))
            }
        };
        Ok(Self {
            backend,
            available: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The flag behind [`Self::is_available`], for readiness.
    pub fn availability(&self) -> Arc<AtomicBool> {
        self.available.clone()
    }

    /// Whether the last operation reached the store.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    fn track<T>(&self, result: Result<T, StateError>) -> Result<T, StateError> {
        let ok = result.is_ok();
        if self.available.swap(ok, Ordering::Relaxed) != ok {
            match &result {
                Ok(_) => tracing::info!("state store reachable again"),
                Err(e) => tracing::warn!(error = %e, "state store unreachable; pausing intake"),
            }
        }
        result
    }

    pub async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.claim(key, lease)),
            Backend::Redis(r) => r.claim(key, lease).await,
        };
        self.track(result)
    }

    /// Extends a live claim (re-claiming a key that vanished, e.g. after a Redis restart without
    /// persistence), only for the holder of `token`.
    pub async fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<Renewal, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.renew(key, token, lease)),
            Backend::Redis(r) => r.renew(key, token, lease).await,
        };
        self.track(result)
    }

    /// Stores the final outcome under `key` for `ttl`, ending `token`'s claim. Fenced: `Ok(false)`
    /// (nothing stored) when another worker holds the claim or the key already has an outcome,
    /// so a worker whose lease lapsed never overwrites the worker that took over.
    pub async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: bytes::Bytes,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.complete(key, token, outcome, ttl)),
            Backend::Redis(r) => r.complete(key, token, outcome, ttl).await,
        };
        self.track(result)
    }

    /// Replaces the outcome a finished key holds (keeping how long it is remembered), so a
    /// later replay gives the new one; `Ok(false)` when the key holds no outcome.
    pub async fn replace_outcome(
        &self,
        key: &str,
        outcome: bytes::Bytes,
    ) -> Result<bool, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.replace_outcome(key, outcome)),
            Backend::Redis(r) => r.replace_outcome(key, outcome).await,
        };
        self.track(result)
    }

    /// What `key` holds, without claiming it.
    pub async fn peek(&self, key: &str) -> Result<Peek, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.peek(key)),
            Backend::Redis(r) => r.peek(key).await,
        };
        self.track(result)
    }

    /// Forgets a finished key's outcome if it is still `outcome` (a claim or another outcome
    /// is left alone); `Ok(true)` when it was forgotten.
    pub async fn forget_outcome(&self, key: &str, outcome: &[u8]) -> Result<bool, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.forget_outcome(key, outcome)),
            Backend::Redis(r) => r.forget_outcome(key, outcome).await,
        };
        self.track(result)
    }

    /// Gives a claim up without an outcome, so a redelivery processes the job again.
    pub async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => {
                m.release(key, token);
                Ok(())
            }
            Backend::Redis(r) => r.release(key, token).await,
        };
        self.track(result)
    }

    /// Rate limiter: `None` when `cost` units are admitted under `key`, else how long to wait.
    /// Shared by every replica with Redis.
    pub async fn throttle(
        &self,
        key: &str,
        cost: f64,
        rate: Rate,
    ) -> Result<Option<Duration>, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.counters().throttle(key, cost, rate)),
            Backend::Redis(r) => r.gcra(key, cost, rate, true).await,
        };
        self.track(result)
    }

    /// Books the slots of several jobs on the rate limiter `key` in one round trip, in order
    /// (see [`Booking`]); each job is named by its ticket (which must share `key`'s Redis
    /// Cluster hash tag) and may park after its own wait. Shared by every replica with Redis.
    pub async fn book(
        &self,
        key: &str,
        jobs: &[(&str, Option<Duration>)],
        rate: Rate,
    ) -> Result<Vec<Booking>, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(jobs
                .iter()
                .map(|(ticket, park_after)| m.counters().book(key, ticket, rate, *park_after))
                .collect()),
            Backend::Redis(r) => r.book(key, jobs, rate).await,
        };
        self.track(result)
    }

    /// Reconciles a rate limiter with what was really used (`delta` units, may be negative).
    pub async fn adjust(&self, key: &str, delta: f64, rate: Rate) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => {
                m.counters().adjust(key, delta, rate);
                Ok(())
            }
            Backend::Redis(r) => r.gcra(key, delta, rate, false).await.map(|_| ()),
        };
        self.track(result)
    }

    /// Adds `amount` USD to a budget's sums; with `check`, only if it stays within the limits.
    pub async fn spend(
        &self,
        keys: &BudgetKeys,
        amount: f64,
        check: bool,
    ) -> Result<Spend, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.counters().spend(keys, amount, check)),
            Backend::Redis(r) => r.spend(keys, amount, check).await,
        };
        self.track(result)
    }

    /// A cached provider response, if one is stored under `key`.
    pub async fn cache_get(&self, key: &str) -> Result<Option<bytes::Bytes>, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.cache_get(key)),
            Backend::Redis(r) => r.cache_get(key).await,
        };
        self.track(result)
    }

    pub async fn cache_put(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => {
                m.cache_put(key, value, ttl);
                Ok(())
            }
            Backend::Redis(r) => r.cache_put(key, value, ttl).await,
        };
        self.track(result)
    }

    /// Keeps a pending review (`record`) under `id` until it is decided or expires, replacing
    /// an earlier record of the same review (a job run again after a hand-back: its latest
    /// request is the one a reviewer answers); `Ok(false)` when it replaced one.
    pub async fn review_open(
        &self,
        id: &str,
        tenant: &str,
        deadline_ms: i64,
        record: bytes::Bytes,
    ) -> Result<bool, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, r, _) => r.open(id, tenant, deadline_ms, record),
            Backend::Redis(r) => r.review_open(id, tenant, deadline_ms, record).await,
        };
        self.track(result)
    }

    /// The pending review `id`, if it is still pending.
    pub async fn review_get(&self, id: &str) -> Result<Option<bytes::Bytes>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, r, _) => Ok(r.get(id)),
            Backend::Redis(r) => r.review_get(id).await,
        };
        self.track(result)
    }

    /// Drops a review from the pending ones (it was decided or expired).
    pub async fn review_forget(&self, id: &str, tenant: &str) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, r, _) => {
                r.forget(id);
                Ok(())
            }
            Backend::Redis(r) => r.review_forget(id, tenant).await,
        };
        self.track(result)
    }

    /// Up to `limit` pending review ids, earliest deadline first; only those due by
    /// `until_ms` (milliseconds since the epoch) when given.
    pub async fn reviews_by_deadline(
        &self,
        until_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<String>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, r, _) => Ok(r.by_deadline(until_ms, limit)),
            Backend::Redis(r) => r.reviews_by_deadline(until_ms, limit).await,
        };
        self.track(result)
    }

    /// Pending reviews by tenant.
    pub async fn review_counts(&self) -> Result<Vec<(String, u64)>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, r, _) => Ok(r.counts()),
            Backend::Redis(r) => r.review_counts().await,
        };
        self.track(result)
    }

    /// Adds `entry` at `score_ms` to the semantic-cache index `index`, keeping its newest
    /// `max_entries` of the last `ttl`.
    pub async fn index_add(
        &self,
        index: &str,
        score_ms: i64,
        entry: bytes::Bytes,
        max_entries: usize,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => {
                m.index_add(index, score_ms, entry, max_entries, ttl);
                Ok(())
            }
            Backend::Redis(r) => r.index_add(index, score_ms, entry, max_entries, ttl).await,
        };
        self.track(result)
    }

    /// Up to `limit` entries of `index` added at or after `from_ms`, oldest first, with their
    /// scores.
    pub async fn index_since(
        &self,
        index: &str,
        from_ms: i64,
        limit: usize,
    ) -> Result<Vec<(bytes::Bytes, i64)>, StateError> {
        let result = match &self.backend {
            Backend::Memory(m, _, _) => Ok(m.index_since(index, from_ms, limit)),
            Backend::Redis(r) => r.index_since(index, from_ms, limit).await,
        };
        self.track(result)
    }

    /// Keeps a job waiting for a provider batch (its parking record), replacing an earlier one.
    pub async fn batch_park(&self, job_key: &str, record: bytes::Bytes) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                if b.park(job_key, record) {
                    Ok(())
                } else {
                    Err(StateError::Unavailable(
                        "the in-process store holds its most jobs waiting for batches; use Redis"
                            .into(),
                    ))
                }
            }
            Backend::Redis(r) => r.batch_park(job_key, record).await,
        };
        self.track(result)
    }

    pub async fn batch_parked(&self, job_key: &str) -> Result<Option<bytes::Bytes>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => Ok(b.parked(job_key)),
            Backend::Redis(r) => r.batch_parked(job_key).await,
        };
        self.track(result)
    }

    /// Forgets a parked job and its answers.
    pub async fn batch_unpark(&self, job_key: &str) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                b.unpark(job_key);
                Ok(())
            }
            Backend::Redis(r) => r.batch_unpark(job_key).await,
        };
        self.track(result)
    }

    /// Stores a batch's answer to a parked job's request `key` (only while it is parked).
    pub async fn batch_answer(
        &self,
        job_key: &str,
        key: &str,
        answer: bytes::Bytes,
    ) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                b.answer(job_key, key, answer);
                Ok(())
            }
            Backend::Redis(r) => r.batch_answer(job_key, key, answer).await,
        };
        self.track(result)
    }

    pub async fn batch_answers(
        &self,
        job_key: &str,
    ) -> Result<Vec<(String, bytes::Bytes)>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => Ok(b.answers(job_key)),
            Backend::Redis(r) => r.batch_answers(job_key).await,
        };
        self.track(result)
    }

    /// Requests waiting in the batch queue of `queue` (a model alias).
    pub async fn batch_queued(&self, queue: &str) -> Result<u64, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => Ok(b.queued(queue)),
            Backend::Redis(r) => r.batch_queued(queue).await,
        };
        self.track(result)
    }

    /// Queues requests for the next batch of `queue` (a model alias).
    pub async fn batch_enqueue(
        &self,
        queue: &str,
        items: Vec<bytes::Bytes>,
    ) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                b.enqueue(queue, items);
                Ok(())
            }
            Backend::Redis(r) => r.batch_enqueue(queue, items).await,
        };
        self.track(result)
    }

    /// Takes up to `max` queued requests as the submission `submission` (remembered, with
    /// them, until [`Self::batch_opened`] or [`Self::batch_requeue`]).
    pub async fn batch_take(
        &self,
        queue: &str,
        max: usize,
        submission: &str,
        at_ms: i64,
    ) -> Result<Vec<bytes::Bytes>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => Ok(b.take(queue, max, submission, at_ms)),
            Backend::Redis(r) => r.batch_take(queue, max, submission, at_ms).await,
        };
        self.track(result)
    }

    /// The submission became the open batch `batch`, described by `meta`.
    pub async fn batch_opened(
        &self,
        submission: &str,
        batch: &str,
        meta: bytes::Bytes,
    ) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                b.opened(submission, batch, meta);
                Ok(())
            }
            Backend::Redis(r) => r.batch_opened(submission, batch, meta).await,
        };
        self.track(result)
    }

    /// The submission failed: its requests go back to the queue.
    pub async fn batch_requeue(
        &self,
        submission: &str,
        queue: &str,
        items: Vec<bytes::Bytes>,
    ) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                b.requeue(submission, queue, items);
                Ok(())
            }
            Backend::Redis(r) => r.batch_requeue(submission, queue, items).await,
        };
        self.track(result)
    }

    /// Submissions under way (`{queue, at, items}` each).
    pub async fn batch_submissions(&self) -> Result<Vec<(String, bytes::Bytes)>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => Ok(b.submissions()),
            Backend::Redis(r) => r.batch_hash("submitting").await,
        };
        self.track(result)
    }

    /// Open batches and their descriptions.
    pub async fn batch_open(&self) -> Result<Vec<(String, bytes::Bytes)>, StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => Ok(b.open()),
            Backend::Redis(r) => r.batch_hash("open").await,
        };
        self.track(result)
    }

    pub async fn batch_close(&self, batch: &str) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(_, _, b) => {
                b.close(batch);
                Ok(())
            }
            Backend::Redis(r) => r.batch_close(batch).await,
        };
        self.track(result)
    }

    /// Checks reachability (updates [`Self::is_available`]).
    pub async fn ping(&self) -> Result<(), StateError> {
        let result = match &self.backend {
            Backend::Memory(..) => Ok(()),
            Backend::Redis(r) => r.ping().await,
        };
        self.track(result)
    }
}
