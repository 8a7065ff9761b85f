//! Jobs that wait for a provider batch (a pipeline's `batch:`, for jobs that can wait).
//!
//! A job in batch mode runs until it needs a call; the calls it needs are queued (per model)
//! and the job is **parked**: a record in the state store holds its payload, source position
//! and which answers it waits for, and its source message is acknowledged (the record has
//! custody of it from then on; in production that is Redis with persistence). No in-flight
//! slot is held while the batch runs, which can be hours.
//!
//! Every replica's batch loop sends what is queued every `collect_ms` (each queued request is
//! taken by one replica, atomically; a submission that fails goes back to the queue, one
//! whose replica died is put back after [`STALE_SUBMISSION`]) and asks open batches, one
//! replica at a time (a claim per batch), whether they ended. An ended batch's answers are
//! stored with the jobs that wait for them, and each job whose answers are all in runs again
//! under its idempotency claim: its calls are answered from the batch, at the batch price; a
//! request the batch could not answer goes through the normal retry and fallback path; a
//! call it needs next (a later step) parks it again for another round. The outcome is then
//! written, recorded and the job unparked, as for any job. A restart anywhere in this loses
//! nothing: the records, queues and open batches are in the store, and every step is
//! idempotent (answers by request key, outcomes under the job's claim).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::outcome::Who;
use super::{Engine, Incoming, Kind, LeaseLost, Stopped, RETRY_MAX, RETRY_MIN};
use crate::calls::batch::{BatchNeed, BatchRound};
use crate::provider::{BatchItem, ChatRequest, ChatResponse};
use crate::sink::OutputSink;
use crate::wire::{decode_job, DeadLetterReason, Job, Outcome, SourceInfo};

/// A submission whose replica neither opened nor gave back its batch within this long is put
/// back in the queue.
const STALE_SUBMISSION: Duration = Duration::from_secs(600);
/// How long a provider's batch calls may take.
const BATCH_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a batch is remembered as priced (longer than it can stay open).
const PRICED_MEMORY: Duration = Duration::from_secs(8 * 24 * 3600);
/// How often a duplicate of a parked job looks whether it has its outcome.
const UNPARK_POLL: Duration = Duration::from_secs(1);
/// How often the batch loop runs when no pipeline batches (jobs parked under an earlier
/// config still finish).
const IDLE_EVERY: Duration = Duration::from_secs(5);

/// When the batch loop last sent each model's queue and asked each open batch.
#[derive(Default)]
pub struct BatchClock {
    sent: std::collections::HashMap<String, Instant>,
    polled: std::collections::HashMap<String, Instant>,
}

/// What a parked job's record holds.
#[derive(Debug, Serialize, Deserialize)]
struct Parked {
    job_key: String,
    job_id: String,
    tenant: String,
    pipeline: String,
    payload: String,
    source: SourceInfo,
    traceparent: Option<String>,
    received_at: DateTime<Utc>,
    /// The answers it waits for (request keys).
    pending: Vec<String>,
    round: u32,
}

/// A request waiting in a model's queue.
#[derive(Debug, Serialize, Deserialize)]
struct Queued {
    custom_id: String,
    job_key: String,
    key: String,
    alias: String,
    request: ChatRequest,
    tenant: String,
    /// What the tenant's budget holds for it, and on which day and month keys.
    reserved: f64,
    #[serde(default)]
    reserved_in: Option<(String, String)>,
}

/// One request of an open batch: whose it is and what its budget holds.
#[derive(Debug, Serialize, Deserialize)]
struct Item {
    custom_id: String,
    job_key: String,
    key: String,
    tenant: String,
    reserved: f64,
    #[serde(default)]
    reserved_in: Option<(String, String)>,
}

/// An open batch, as the store keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct OpenBatch {
    provider: String,
    alias: String,
    items: Vec<Item>,
    submitted_at: DateTime<Utc>,
}

/// A submission under way, as the store keeps it.
#[derive(Debug, Deserialize)]
struct Submission {
    queue: String,
    at: i64,
    items: Vec<String>,
}

/// A batch's answer to one request, stored with the job.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Answered {
        content: String,
        input_tokens: u64,
        output_tokens: u64,
        cache_read_tokens: u64,
        cache_write_tokens: u64,
    },
    Failed(String),
}

impl<K: OutputSink> Engine<K> {
    /// Whether every batch queue `pipeline` may use has room (fewer than `max` waiting); a
    /// store that cannot say means no.
    pub(super) async fn batch_room(
        &self,
        pipeline: &crate::config::PipelinePlan,
        max: u64,
    ) -> bool {
        for alias in crate::pipeline::pipeline_aliases(pipeline) {
            match self.state.batch_queued(alias).await {
                Ok(n) if n < max => {}
                Ok(n) => {
                    tracing::warn!(
                        model = alias,
                        queued = n,
                        max,
                        "the batch queue is full; jobs that could wait run at once"
                    );
                    return false;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Waits while the job under `key` is parked (its batch has not answered it yet).
    pub(super) async fn wait_unparked(
        &self,
        key: &str,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let mut logged = false;
        while self.is_parked(key, stop).await? {
            // A record that outlived its job (its unparking failed) does not hold anyone up.
            if let Ok(crate::state::Peek::Done(_)) = self.state.peek(key).await {
                let _ = self.state.batch_unpark(key).await;
                return Ok(());
            }
            if !logged {
                tracing::info!(key, "the job waits for its provider batch; this delivery replays its outcome once it has one");
                logged = true;
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(UNPARK_POLL) => {}
            }
        }
        Ok(())
    }

    /// Whether `key` is parked, waiting through a store outage.
    pub(super) async fn is_parked(
        &self,
        key: &str,
        stop: &CancellationToken,
    ) -> Result<bool, Stopped> {
        let mut delay = RETRY_MIN;
        loop {
            match self.state.batch_parked(key).await {
                Ok(found) => return Ok(found.is_some()),
                Err(e) => tracing::warn!(key, error = %e, "cannot look for a parked job; retrying"),
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Parks the job under `key` for round `round` and queues the calls it needs.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn park(
        &self,
        incoming: &Incoming<'_>,
        job: &Job,
        pipeline: &str,
        key: &str,
        needs: Vec<BatchNeed>,
        round: u32,
        stop: &CancellationToken,
    ) -> Result<bool, Stopped> {
        let pending: Vec<String> = needs.iter().map(|n| n.key.clone()).collect();
        let record = Parked {
            job_key: key.to_owned(),
            job_id: job.id.clone(),
            tenant: job.tenant.to_string(),
            pipeline: pipeline.to_owned(),
            payload: String::from_utf8_lossy(incoming.payload).into_owned(),
            source: incoming.source.clone(),
            traceparent: incoming.trace.map(str::to_owned),
            received_at: incoming.received_at,
            pending: needs.iter().map(|n| n.key.clone()).collect(),
            round,
        };
        let record = Bytes::from(serde_json::to_vec(&record).map_err(|_| Stopped::Now)?);
        let mut by_alias: std::collections::BTreeMap<String, Vec<Bytes>> = Default::default();
        for need in needs {
            let custom_id = custom_id(key, &need.key);
            let queued = Queued {
                custom_id,
                job_key: key.to_owned(),
                key: need.key,
                alias: need.alias.clone(),
                request: need.request,
                tenant: need.tenant,
                reserved: need.reserved,
                reserved_in: need.reserved_in,
            };
            let bytes = Bytes::from(serde_json::to_vec(&queued).map_err(|_| Stopped::Now)?);
            by_alias.entry(need.alias).or_default().push(bytes);
        }
        // The requests first, then the record that acknowledges the job: a job whose record
        // exists always has its requests queued. (Requests queued for a job whose record then
        // could not be written are answered for nothing; the job is redelivered.)
        for (alias, items) in by_alias {
            self.retry_store("queue a batch request", stop, || {
                self.state.batch_enqueue(&alias, items.clone())
            })
            .await?;
        }
        self.retry_store("park a job for its batch", stop, || {
            self.state.batch_park(key, record.clone())
        })
        .await?;
        // A batch so quick it answered before the record was written: the caller resumes it.
        let answered = self
            .state
            .batch_answers(key)
            .await
            .is_ok_and(|a| pending.iter().all(|p| a.iter().any(|(k, _)| k == p)));
        self.metrics.batch_jobs.with_label_values(&["parked"]).inc();
        tracing::info!(key, round, "job parked until its provider batch answers");
        Ok(answered)
    }

    /// Runs `op` until the store answers or the process stops.
    async fn retry_store<T, F>(
        &self,
        what: &str,
        stop: &CancellationToken,
        op: impl Fn() -> F,
    ) -> Result<T, Stopped>
    where
        F: std::future::Future<Output = Result<T, crate::state::StateError>>,
    {
        let mut delay = RETRY_MIN;
        loop {
            match op().await {
                Ok(done) => return Ok(done),
                Err(e) => tracing::warn!(error = %e, "could not {what}; retrying"),
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// One pass of the batch loop: puts back stale submissions, sends what was collected for
    /// `collect_ms` (or a full batch at once), and settles open batches that have ended.
    pub async fn batch_pass(&self, at: &mut BatchClock, stop: &CancellationToken) {
        let (max_requests, poll, collect) = self.batch_settings();
        self.requeue_stale().await;
        for alias in self.plan.models.keys() {
            if stop.is_cancelled() {
                return;
            }
            let due = at.sent.get(alias).is_none_or(|t| t.elapsed() >= collect);
            let full = !due
                && self
                    .state
                    .batch_queued(alias)
                    .await
                    .is_ok_and(|n| n >= max_requests as u64);
            if due || full {
                at.sent.insert(alias.clone(), Instant::now());
                self.submit(alias, max_requests, stop).await;
            }
        }
        let polled = &mut at.polled;
        let open = match self.state.batch_open().await {
            Ok(open) => open,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list open batches");
                return;
            }
        };
        polled.retain(|id, _| open.iter().any(|(o, _)| o == id));
        for (id, meta) in open {
            if stop.is_cancelled() {
                return;
            }
            if polled.get(&id).is_some_and(|at| at.elapsed() < poll) {
                continue;
            }
            polled.insert(id.clone(), Instant::now());
            let Ok(meta) = serde_json::from_slice::<OpenBatch>(&meta) else {
                tracing::error!(batch = %id, "an open batch's record cannot be read; dropping it");
                let _ = self.state.batch_close(&id).await;
                continue;
            };
            self.poll(&id, meta, stop).await;
        }
    }

    /// The most requests per batch, and the shortest poll interval and collection time of the
    /// pipelines that batch (defaults when none does, for jobs parked under an earlier config).
    fn batch_settings(&self) -> (usize, Duration, Duration) {
        let plans: Vec<_> = self
            .plan
            .pipelines
            .values()
            .filter_map(|p| p.batch.as_ref())
            .collect();
        let max = plans.iter().map(|b| b.max_requests).max().unwrap_or(1_000);
        let poll = plans.iter().map(|b| b.poll).min().unwrap_or(IDLE_EVERY);
        let collect = plans.iter().map(|b| b.collect).min().unwrap_or(IDLE_EVERY);
        (max, poll, collect)
    }

    /// How often the batch loop runs: the shortest `collect_ms` or `poll_ms` of the pipelines
    /// that batch, or every few seconds when none does.
    pub fn batch_every(&self) -> Duration {
        self.plan
            .pipelines
            .values()
            .filter_map(|p| p.batch.as_ref().map(|b| b.collect.min(b.poll)))
            .min()
            .unwrap_or(IDLE_EVERY)
    }

    async fn requeue_stale(&self) {
        let Ok(submissions) = self.state.batch_submissions().await else {
            return;
        };
        let now = Utc::now().timestamp_millis();
        let stale = i64::try_from(STALE_SUBMISSION.as_millis()).unwrap_or(i64::MAX);
        for (id, meta) in submissions {
            let Ok(s) = serde_json::from_slice::<Submission>(&meta) else {
                continue;
            };
            if now - s.at < stale {
                continue;
            }
            tracing::warn!(submission = %id, requests = s.items.len(), "a batch submission was never opened (its replica stopped); its requests go back to the queue");
            let items = s.items.into_iter().map(Bytes::from).collect();
            if let Err(e) = self.state.batch_requeue(&id, &s.queue, items).await {
                tracing::warn!(error = %e, "could not put a stale submission back");
            }
        }
    }

    /// Sends up to `max` queued requests of model `alias` as one batch.
    async fn submit(&self, alias: &str, max: usize, stop: &CancellationToken) {
        let Some(model) = self.plan.models.get(alias) else {
            return;
        };
        let submission = format!("{:032x}", rand::random::<u128>());
        let taken = match self
            .state
            .batch_take(alias, max, &submission, Utc::now().timestamp_millis())
            .await
        {
            Ok(taken) if !taken.is_empty() => taken,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot take queued batch requests");
                return;
            }
        };
        // A request queued twice (a job parked again by a second pass) is sent once.
        let mut ids = std::collections::HashSet::new();
        let queued: Vec<Queued> = taken
            .iter()
            .filter_map(|b| serde_json::from_slice::<Queued>(b).ok())
            .filter(|q| ids.insert(q.custom_id.clone()))
            .collect();
        let items: Vec<BatchItem> = queued
            .iter()
            .map(|q| BatchItem {
                custom_id: q.custom_id.clone(),
                request: q.request.clone(),
            })
            .collect();
        let Some(provider) = self.runner.calls().providers().target(&model.provider) else {
            tracing::error!(model = alias, provider = %model.provider, "no such provider for batch requests");
            let _ = self.state.batch_requeue(&submission, alias, taken).await;
            return;
        };
        match provider
            .client
            .batch_submit(&items, BATCH_CALL_TIMEOUT)
            .await
        {
            Ok(remote) => {
                let meta = OpenBatch {
                    provider: model.provider.clone(),
                    alias: alias.to_owned(),
                    items: queued
                        .into_iter()
                        .map(|q| Item {
                            custom_id: q.custom_id,
                            job_key: q.job_key,
                            key: q.key,
                            tenant: q.tenant,
                            reserved: q.reserved,
                            reserved_in: q.reserved_in.clone(),
                        })
                        .collect(),
                    submitted_at: Utc::now(),
                };
                let Ok(meta) = serde_json::to_vec(&meta) else {
                    return;
                };
                if let Err(e) = self
                    .state
                    .batch_opened(&submission, &remote, Bytes::from(meta))
                    .await
                {
                    // Put back after STALE_SUBMISSION and sent again: its answers are
                    // idempotent (the first batch's are simply not waited for).
                    tracing::warn!(batch = %remote, error = %e, "could not record an open batch");
                    return;
                }
                self.metrics
                    .batch_requests
                    .with_label_values(&["submitted"])
                    .inc_by(items.len() as u64);
                tracing::info!(model = alias, batch = %remote, requests = items.len(), "batch submitted");
            }
            Err(e) if matches!(e.action(), crate::provider::ErrorAction::NextTarget) => {
                // The provider will not take this batch (no batch API, a refused request):
                // its requests are called directly instead, through the normal path.
                tracing::warn!(model = alias, requests = items.len(), error = %e, "the provider refused the batch; its requests are called directly");
                let items = queued
                    .into_iter()
                    .map(|q| Item {
                        custom_id: q.custom_id,
                        job_key: q.job_key,
                        key: q.key,
                        tenant: q.tenant,
                        reserved: q.reserved,
                        reserved_in: q.reserved_in.clone(),
                    })
                    .collect();
                let failed = OpenBatch {
                    provider: model.provider.clone(),
                    alias: alias.to_owned(),
                    items,
                    submitted_at: Utc::now(),
                };
                let reason = format!("the provider refused the batch: {e}");
                let settled = self
                    .settle_items(
                        &submission,
                        &failed,
                        std::collections::HashMap::new(),
                        &reason,
                        stop,
                    )
                    .await;
                if settled {
                    // Done with: the submission goes (nothing is put back).
                    let _ = self
                        .state
                        .batch_requeue(&submission, alias, Vec::new())
                        .await;
                }
                // Otherwise it stays, and is sent again once stale (priced only once).
            }
            Err(e) => {
                tracing::warn!(model = alias, requests = items.len(), error = %e, "batch submission failed; its requests go back to the queue");
                if let Err(e) = self.state.batch_requeue(&submission, alias, taken).await {
                    tracing::warn!(error = %e, "could not put the requests back; they are put back when the submission is stale");
                }
            }
        }
    }

    /// Asks batch `id` whether it ended; if so stores its answers with their jobs, runs the
    /// jobs whose answers are all in, and closes it. One replica at a time (a claim per
    /// batch); one that stops half-way leaves it to the next.
    async fn poll(&self, id: &str, meta: OpenBatch, stop: &CancellationToken) {
        let key = format!("batch/{id}");
        let held = match self.try_claim(&key).await {
            Some(Ok(held)) => held,
            // Settled by another replica already: only the closing may be missing.
            Some(Err(_)) => {
                let _ = self.state.batch_close(id).await;
                return;
            }
            None => return,
        };
        let Some(provider) = self.runner.calls().providers().target(&meta.provider) else {
            self.release(&held).await;
            return;
        };
        let answers = match provider.client.batch_poll(id, BATCH_CALL_TIMEOUT).await {
            Ok(Some(answers)) => answers,
            Ok(None) => {
                self.release(&held).await;
                return;
            }
            Err(e) => {
                tracing::warn!(batch = %id, error = %e, "could not ask the provider about a batch; asking again later");
                self.release(&held).await;
                return;
            }
        };
        let by_id: std::collections::HashMap<String, Result<ChatResponse, String>> =
            answers.into_iter().collect();
        tracing::info!(batch = %id, model = %meta.alias, requests = meta.items.len(), "batch ended");
        // The claim is renewed while the jobs run: one that lapsed would let another replica
        // settle the same batch at once.
        // The claim is renewed while the jobs run, without cutting a job off half-way (its
        // output may be out and not yet recorded): were it lost, another replica settling the
        // batch too meets each job's own claim.
        let done = CancellationToken::new();
        let renew = async {
            tokio::select! {
                () = done.cancelled() => {}
                LeaseLost = self.hold_claim(&held) => {
                    tracing::warn!(batch = %id, "batch claim lost while settling; the jobs' own claims keep their outcomes single");
                }
            }
        };
        let work = async {
            let settled = self
                .settle_items(
                    id,
                    &meta,
                    by_id,
                    "the batch ended without an answer to this request",
                    stop,
                )
                .await;
            done.cancel();
            settled
        };
        let (settled, ()) = tokio::join!(work, renew);
        if settled {
            let _ = self.state.batch_close(id).await;
            self.record(&held, Bytes::from_static(b"closed")).await;
        } else {
            // Some job could not be brought to its outcome now: the batch stays open and is
            // settled again (stored answers are kept; finished jobs are skipped).
            self.release(&held).await;
        }
    }

    /// Stores a batch's answers with the jobs that wait for them (a request without one:
    /// `missing`), prices them on the tenants' budgets, and runs each job whose answers are
    /// all in. `true` when every job was brought as far as its answers allow.
    async fn settle_items(
        &self,
        batch: &str,
        meta: &OpenBatch,
        mut by_id: std::collections::HashMap<String, Result<ChatResponse, String>>,
        missing: &str,
        stop: &CancellationToken,
    ) -> bool {
        let model = self.plan.models.get(&meta.alias);
        let gate = self.scheduler.gate();
        // Priced once, however often the batch is settled again (a job that could not be
        // brought to its outcome, a replica that stopped half-way).
        let priced_key = format!("batch-priced:{batch}");
        let priced = matches!(self.state.cache_get(&priced_key).await, Ok(Some(_)));
        let mut jobs = BTreeSet::new();
        let (mut answered, mut failed) = (0u64, 0u64);
        for item in &meta.items {
            let answer = match by_id.remove(&item.custom_id) {
                Some(Ok(mut r)) => {
                    answered += 1;
                    r.batch = true;
                    let cost = model.map_or(item.reserved, |m| m.response_cost(&r));
                    if !priced {
                        if let Some(m) = model {
                            self.metrics.llm_usage(
                                &m.provider,
                                &m.model,
                                r.input_tokens,
                                r.output_tokens,
                                cost,
                            );
                        }
                        gate.settle_batch(
                            &item.tenant,
                            item.reserved_in.as_ref(),
                            cost - item.reserved,
                        )
                        .await;
                    }
                    Answer::Answered {
                        content: r.content,
                        input_tokens: r.input_tokens,
                        output_tokens: r.output_tokens,
                        cache_read_tokens: r.cache_read_tokens,
                        cache_write_tokens: r.cache_write_tokens,
                    }
                }
                other => {
                    failed += 1;
                    if !priced {
                        gate.settle_batch(&item.tenant, item.reserved_in.as_ref(), -item.reserved)
                            .await;
                    }
                    Answer::Failed(match other {
                        Some(Err(reason)) => reason,
                        _ => missing.to_owned(),
                    })
                }
            };
            let Ok(bytes) = serde_json::to_vec(&answer) else {
                continue;
            };
            if self
                .retry_store("store a batch answer", stop, || {
                    self.state
                        .batch_answer(&item.job_key, &item.key, Bytes::from(bytes.clone()))
                })
                .await
                .is_err()
            {
                return false;
            }
            jobs.insert(item.job_key.clone());
        }
        if !priced {
            let _ = self
                .state
                .cache_put(&priced_key, Bytes::from_static(b"1"), PRICED_MEMORY)
                .await;
            self.metrics
                .batch_requests
                .with_label_values(&["answered"])
                .inc_by(answered);
            self.metrics
                .batch_requests
                .with_label_values(&["failed"])
                .inc_by(failed);
        }
        let mut all = true;
        for job_key in jobs {
            if stop.is_cancelled() {
                return false;
            }
            all &= self.resume_parked(&job_key, stop).await;
        }
        all
    }

    /// Goes on with a job whose batch answered before it was parked.
    pub(super) async fn resume_now(&self, key: &str, stop: &CancellationToken) {
        if !self.resume_parked(key, stop).await {
            tracing::warn!(
                key,
                "could not go on with a job its batch answered early; its batch settles it again"
            );
        }
    }

    /// Runs a parked job again once every answer it waits for is in: its outcome, or the next
    /// round of its batch. `false` when it could not be done now (the store, a stop).
    async fn resume_parked(&self, job_key: &str, stop: &CancellationToken) -> bool {
        let record = match self.state.batch_parked(job_key).await {
            Ok(Some(record)) => record,
            // Finished and unparked already.
            Ok(None) => return true,
            Err(_) => return false,
        };
        let Ok(parked) = serde_json::from_slice::<Parked>(&record) else {
            tracing::error!(
                key = job_key,
                "a parked job's record cannot be read; dropping it"
            );
            let _ = self.state.batch_unpark(job_key).await;
            return true;
        };
        let Ok(stored) = self.state.batch_answers(job_key).await else {
            return false;
        };
        let mut round = BatchRound::default();
        for (key, bytes) in stored {
            match serde_json::from_slice::<Answer>(&bytes) {
                Ok(Answer::Answered {
                    content,
                    input_tokens,
                    output_tokens,
                    cache_read_tokens,
                    cache_write_tokens,
                }) => {
                    round.answers.insert(
                        key,
                        ChatResponse {
                            content,
                            input_tokens,
                            output_tokens,
                            cache_read_tokens,
                            cache_write_tokens,
                            batch: true,
                            ..ChatResponse::default()
                        },
                    );
                }
                Ok(Answer::Failed(_)) | Err(_) => {
                    round.failed.insert(key);
                }
            }
        }
        if !parked
            .pending
            .iter()
            .all(|k| round.answers.contains_key(k) || round.failed.contains(k))
        {
            // Another batch still holds some of its requests; that one resumes it.
            return true;
        }
        let incoming = Incoming {
            kind: Kind::Job,
            payload: parked.payload.as_bytes(),
            source: &parked.source,
            received_at: parked.received_at,
            trace: parked.traceparent.as_deref(),
            deferrable: false,
            vouched_tenant: None,
        };
        let held = match self.claim(job_key, stop).await {
            Ok(Ok(held)) => held,
            Ok(Err(_)) => {
                // Finished already (an earlier pass wrote its outcome).
                let _ = self.state.batch_unpark(job_key).await;
                return true;
            }
            Err(_) => return false,
        };
        let started = Instant::now();
        let job = decode_job(
            parked.payload.as_bytes(),
            self.plan.limits.max_job_bytes,
            parked.received_at,
        );
        let pipeline = self.plan.pipelines.get(&parked.pipeline).cloned();
        let (outcome, review) = match (job, pipeline) {
            (Ok(job), Some(pipeline)) => {
                if let Some(deadline) = job.deadline.filter(|d| *d <= Utc::now()) {
                    let error = format!(
                        "the job's deadline {} passed while it waited for its provider batch",
                        deadline.to_rfc3339()
                    );
                    let dl = incoming.dead_letter(
                        DeadLetterReason::DeadlineExceeded,
                        error,
                        Who::Job(&job),
                        0,
                    );
                    (Outcome::DeadLetter(dl), None)
                } else {
                    let run = tokio::select! {
                        biased;
                        () = stop.cancelled() => {
                            self.release(&held).await;
                            return false;
                        }
                        run = self.runner.run_batched(&job, &pipeline, None, &round) => run,
                        LeaseLost = self.hold_claim(&held) => return false,
                    };
                    let needs = round.needed();
                    if !needs.is_empty() {
                        let parked = self
                            .park(
                                &incoming,
                                &job,
                                &parked.pipeline,
                                job_key,
                                needs,
                                parked.round + 1,
                                stop,
                            )
                            .await;
                        self.release(&held).await;
                        return match parked {
                            Ok(true) => Box::pin(self.resume_parked(job_key, stop)).await,
                            Ok(false) => true,
                            Err(_) => {
                                tracing::warn!(key = job_key, "could not park the job for its next batch round; the open batch resumes it again");
                                false
                            }
                        };
                    }
                    self.conclude(&incoming, &job, &pipeline, job_key, run, started)
                }
            }
            (Err(e), _) => {
                let error = format!("the parked job's payload no longer decodes ({e})");
                let dl = incoming.dead_letter(DeadLetterReason::Internal, error, Who::Undecoded, 0);
                (Outcome::DeadLetter(dl), None)
            }
            (Ok(job), None) => {
                let error = format!(
                    "pipeline `{}` is no longer configured; republish the job",
                    parked.pipeline
                );
                let dl = incoming.dead_letter(DeadLetterReason::Internal, error, Who::Job(&job), 0);
                (Outcome::DeadLetter(dl), None)
            }
        };
        let decision = super::outcome::Decision {
            outcome: Some(outcome),
            claim: Some(held),
            pipeline: Some(parked.pipeline.clone()),
            output_key: job_key.to_owned(),
            review,
        };
        if self.deliver(decision, &incoming, stop).await.is_err() {
            return false;
        }
        if let Err(e) = self.state.batch_unpark(job_key).await {
            tracing::warn!(key = job_key, error = %e, "could not unpark a finished job; it is skipped when seen again");
        }
        self.metrics
            .batch_jobs
            .with_label_values(&["finished"])
            .inc();
        true
    }
}

/// The id of a job's request within a batch: unique per job and request, and within the
/// providers' limits (Anthropic: 1 to 64 of `[a-zA-Z0-9_-]`).
fn custom_id(job_key: &str, request_key: &str) -> String {
    crate::digest::of_parts(&[job_key, request_key], 16)
}
