//! What a delivery ends as: decoded and validated, matched to its pipeline, checked against its
//! deadline, claimed (or replayed from its stored outcome), admitted and run. Every dead letter
//! of the engine is built here, by [`Incoming::dead_letter`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::claim::Held;
use super::{
    seconds_since, Engine, Incoming, LeaseLost, Stopped, QUEUE_FULL_DEFER, QUEUE_FULL_RETRY,
};
use crate::admission::{Booked, CallScope, Gate, JobBudget, NotQueued, Refusal, UserWait};
use crate::config::{PipelinePlan, UnknownTenants};
use crate::pipeline::{RunFailure, RunOutput};
use crate::sink::OutputSink;
use crate::wire::{
    decode_job, DeadLetter, DeadLetterReason, Job, JobResult, Outcome, StepRecord, TenantId, Usage,
};

/// What a decided job needs written and remembered.
pub(super) struct Decision {
    /// `None`: the job waits for a provider batch, parked in the state store (nothing to
    /// write; the source message is acknowledged).
    pub outcome: Option<Outcome>,
    /// The claim to complete once the outcome is written (absent for replays and for payloads
    /// that never got as far as a claim).
    pub claim: Option<Held>,
    /// The pipeline the job ran (or would have run) in, when known: a metrics label.
    pub pipeline: Option<String>,
    /// The identity its outputs' ids derive from: tenant + idempotency key for a decoded job,
    /// the source position for a payload that did not decode.
    pub output_key: String,
    /// The review to keep pending before a review request is written.
    pub review: Option<crate::review::PendingReview>,
}

/// A job's budget reservation, settled to what its calls cost when the job is done with it
/// (finished, failed or abandoned).
struct SettledOnDrop {
    gate: Arc<Gate>,
    budget: Arc<JobBudget>,
}

impl std::ops::Deref for SettledOnDrop {
    type Target = Arc<JobBudget>;

    fn deref(&self) -> &Self::Target {
        &self.budget
    }
}

impl Drop for SettledOnDrop {
    fn drop(&mut self) {
        self.gate.settle_job_later(self.budget.clone());
    }
}

/// Whose dead letter it is.
pub(super) enum Who<'a> {
    /// A decoded job.
    Job(&'a Job),
    /// An outcome already built for a job.
    Known {
        job_id: Option<String>,
        tenant: Option<String>,
    },
    /// A payload that did not decode: what can still be read of it.
    Undecoded,
}

impl Who<'_> {
    pub(super) fn of(outcome: &Outcome) -> Who<'static> {
        match outcome {
            Outcome::Result(r) => Who::Known {
                job_id: Some(r.job_id.clone()),
                tenant: Some(r.tenant.clone()),
            },
            Outcome::DeadLetter(d) => Who::Known {
                job_id: d.job_id.clone(),
                tenant: d.tenant.clone(),
            },
        }
    }

    pub(super) fn job_id(&self) -> Option<&str> {
        match self {
            Who::Job(job) => Some(&job.id),
            Who::Known { job_id, .. } => job_id.as_deref(),
            Who::Undecoded => None,
        }
    }
}

impl Incoming<'_> {
    /// The dead letter of this delivery: its reason, a sentence to act on, the attempts made,
    /// the original payload and source position, and whose job it was.
    pub(super) fn dead_letter(
        &self,
        reason: DeadLetterReason,
        error: String,
        who: Who<'_>,
        attempts: u32,
    ) -> DeadLetter {
        let mut dl = DeadLetter::new(reason, error, self.payload, self.source.clone());
        dl.attempts = attempts;
        (dl.job_id, dl.tenant) = match who {
            Who::Job(job) => (Some(job.id.clone()), Some(job.tenant.to_string())),
            Who::Known { job_id, tenant } => (job_id, tenant),
            Who::Undecoded => best_effort_identity(self.payload),
        };
        // Where the transport vouches for a tenant, its dead letters go to that tenant only,
        // whatever the payload claims: they carry the payload.
        if let Some(vouched) = self.vouched_tenant {
            dl.tenant = TenantId::parse(vouched).ok().map(|t| t.to_string());
        }
        dl
    }

    /// A decision that ends the job before any claim.
    fn unclaimed(
        &self,
        reason: DeadLetterReason,
        error: String,
        who: Who<'_>,
        pipeline: Option<String>,
    ) -> Decision {
        // Nothing is recorded for it, so the same key may later end differently: its id is
        // this message's, not the job key's.
        let output_key = self.position();
        Decision {
            outcome: Some(Outcome::DeadLetter(self.dead_letter(reason, error, who, 0))),
            claim: None,
            pipeline,
            output_key,
            review: None,
        }
    }

    /// Where the message sits in its source: the identity of a payload that has no other.
    pub(super) fn position(&self) -> String {
        let s = self.source;
        format!(
            "{}:{}:{}:{}:{}",
            s.transport,
            s.topic,
            s.partition.map_or(String::new(), |p| p.to_string()),
            s.offset.map_or(String::new(), |o| o.to_string()),
            s.stream_seq.map_or(String::new(), |q| q.to_string()),
        )
    }

    /// The stored outcome of an earlier delivery, marked as a duplicate.
    fn replay(&self, stored: &[u8], job: &Job) -> Outcome {
        match serde_json::from_slice::<Outcome>(stored) {
            Ok(Outcome::Result(mut r)) => {
                r.duplicate = true;
                Outcome::Result(r)
            }
            Ok(Outcome::DeadLetter(mut dl)) => {
                dl.duplicate = true;
                Outcome::DeadLetter(dl)
            }
            Err(e) => {
                let mut dl = self.dead_letter(
                    DeadLetterReason::Internal,
                    format!("this idempotency key finished before but its stored outcome is unreadable ({e}); republish with a new idempotency_key to process it again"),
                    Who::Job(job),
                    0,
                );
                dl.duplicate = true;
                Outcome::DeadLetter(dl)
            }
        }
    }
}

impl<K: OutputSink> Engine<K> {
    /// Decides what the delivery ends as; `Err` when it is stopped (handed back) first.
    pub(super) async fn decide(
        &self,
        incoming: &Incoming<'_>,
        stop: &CancellationToken,
    ) -> Result<Decision, Stopped> {
        let (payload, received_at) = (incoming.payload, incoming.received_at);
        let job = match decode_job(payload, self.plan.limits.max_job_bytes, received_at) {
            Ok(job) => job,
            Err(invalid) => {
                return Ok(incoming.unclaimed(
                    DeadLetterReason::InvalidJob,
                    invalid.to_string(),
                    Who::Undecoded,
                    None,
                ))
            }
        };
        if let Some(refusal) = self.tenant_refusal(&job, incoming) {
            return Ok(refusal);
        }
        let pipeline = match self.pipeline_for(&job) {
            Ok(p) => p,
            Err(error) => {
                return Ok(incoming.unclaimed(
                    DeadLetterReason::InvalidJob,
                    error,
                    Who::Job(&job),
                    None,
                ))
            }
        };
        let key = job.state_key();
        // The job's turn is booked before its claim, so a job parked until its turn costs one
        // round trip to the state store, not three (claim, book, release).
        let expired = job.deadline.is_some_and(|d| d <= Utc::now());
        if !expired {
            self.user_turn(&job, &key, incoming.deferrable, stop)
                .await?;
        }
        let booked = if expired {
            Booked::now()
        } else {
            self.book(&job, &key, incoming.deferrable, stop).await?
        };
        // A job of a pipeline that batches may be waiting for its batch already (this is a
        // duplicate or a redelivery): this delivery waits until that one has its outcome, then
        // replays it like any duplicate.
        let batching = pipeline.batch.is_some();
        let claimed = loop {
            let claimed = self.claim(&key, stop).await?;
            match &claimed {
                Ok(held) if batching && self.is_parked(&key, stop).await? => {
                    self.release(held).await;
                    // Boxed, like the other batch-only paths below: kept out of every job's
                    // future, which is copied whole when it is boxed and spawned.
                    let unparked = Box::pin(self.wait_unparked(&key, stop));
                    unparked.await?;
                }
                _ => break claimed,
            }
        };
        let held = match claimed {
            Ok(held) => held,
            Err(stored) => {
                // A duplicate never runs: its booked turn goes back to its tenant.
                self.scheduler.give_back(job.tenant.as_str(), booked).await;
                return Ok(Decision {
                    outcome: Some(incoming.replay(&stored, &job)),
                    claim: None,
                    pipeline: Some(pipeline.name.clone()),
                    // Each repeated publication gets its own answer; a redelivery of the same
                    // message does not.
                    output_key: incoming.position(),
                    review: None,
                });
            }
        };
        // After the stored-outcome lookup: a redelivery past the deadline of a job that finished
        // replays its outcome instead of adding a dead letter next to it. The dead letter of an
        // expired job is recorded like any other outcome.
        if let Some(deadline) = job.deadline.filter(|d| *d <= Utc::now()) {
            let error = format!(
                "deadline {} had passed when the job was received",
                deadline.to_rfc3339()
            );
            let dl =
                incoming.dead_letter(DeadLetterReason::DeadlineExceeded, error, Who::Job(&job), 0);
            return Ok(Decision {
                outcome: Some(Outcome::DeadLetter(dl)),
                claim: Some(held),
                pipeline: Some(pipeline.name.clone()),
                output_key: key,
                review: None,
            });
        }
        // A job that can wait runs in a provider batch round, unless its models' batch queues
        // are full (then it runs at once: parked jobs are bounded by the queues).
        let round = match pipeline.batch.as_ref().filter(|b| b.applies(&job)) {
            Some(b) if self.batch_room(&pipeline, b.max_queued).await => {
                Some(crate::calls::batch::BatchRound::default())
            }
            _ => None,
        };
        let started = Instant::now();
        self.metrics.queue_wait.observe(seconds_since(received_at));
        let span = tracing::info_span!("job", job_id = %job.id, tenant = %job.tenant, pipeline = %pipeline.name, traceparent = incoming.trace);
        let run = tokio::select! {
            biased;
            () = stop.cancelled() => {
                self.release(&held).await;
                return Err(Stopped::Now);
            }
            run = self.admit_and_run(&job, &pipeline, booked, incoming.deferrable, round.as_ref()).instrument(span) => match run {
                Ok(run) => run,
                Err(deferred) => {
                    self.release(&held).await;
                    return Err(deferred);
                }
            },
            LeaseLost = self.hold_claim(&held) => {
                tracing::warn!(key = %key, "claim lease lost while the job ran; handing it back to the worker that holds it");
                return Err(Stopped::Now);
            }
        };
        if let Some(round) = &round {
            let needs = round.needed();
            if !needs.is_empty() {
                // Its calls wait for a provider batch: the job is parked in the state store
                // (which holds it from now on) and its message acknowledged.
                let parked =
                    Box::pin(self.park(incoming, &job, &pipeline.name, &key, needs, 1, stop));
                let parked = parked.await;
                self.release(&held).await;
                if parked? {
                    // Its batch answered before it was parked: it goes on at once.
                    let resumed = Box::pin(self.resume_now(&key, stop));
                    resumed.await;
                }
                return Ok(Decision {
                    outcome: None,
                    claim: None,
                    pipeline: Some(pipeline.name.clone()),
                    output_key: key,
                    review: None,
                });
            }
        }
        let (outcome, review) = self.conclude(incoming, &job, &pipeline, &key, run, started);
        Ok(Decision {
            outcome: Some(outcome),
            claim: Some(held),
            pipeline: Some(pipeline.name.clone()),
            output_key: key,
            review,
        })
    }

    /// What a run ends as: the job's result (and the review to keep pending, when it goes to
    /// review) or its dead letter.
    pub(super) fn conclude(
        &self,
        incoming: &Incoming<'_>,
        job: &Job,
        pipeline: &PipelinePlan,
        key: &str,
        run: Result<RunOutput, RunFailure>,
        started: Instant,
    ) -> (Outcome, Option<crate::review::PendingReview>) {
        let (payload, received_at) = (incoming.payload, incoming.received_at);
        let mut held_steps = None;
        let outcome = match run {
            Ok(mut out) => {
                held_steps = out.held.take();
                let mut usage = Usage::default();
                out.steps.iter().for_each(|s| usage.add(s));
                let completed_at = Utc::now();
                Outcome::Result(JobResult {
                    job_id: job.id.clone(),
                    tenant: job.tenant.to_string(),
                    pipeline: pipeline.name.clone(),
                    status: out.status,
                    output: out.output,
                    review_reason: out.review_reason,
                    review: (out.status == crate::wire::ResultStatus::Review).then(|| {
                        crate::wire::ReviewRequest {
                            id: crate::wire::ReviewRequest::id_for(key),
                            deadline: received_at
                                + chrono::Duration::from_std(pipeline.review.timeout)
                                    .unwrap_or(chrono::Duration::days(1)),
                            input: out.review_input.unwrap_or_default(),
                        }
                    }),
                    reviewed: None,
                    route: out.route,
                    steps: out.steps,
                    usage,
                    duplicate: false,
                    metadata: job.metadata.clone(),
                    received_at,
                    completed_at,
                    latency_ms: u64::try_from(
                        (completed_at - received_at).num_milliseconds().max(0),
                    )
                    .unwrap_or(0),
                })
            }
            Err(RunFailure {
                reason,
                error,
                attempts,
            }) => {
                tracing::debug!(job_id = %job.id, elapsed_ms = started.elapsed().as_millis() as u64, "pipeline failed");
                Outcome::DeadLetter(incoming.dead_letter(reason, error, Who::Job(job), attempts))
            }
        };
        let review = match &outcome {
            Outcome::Result(r) => r
                .review
                .as_ref()
                .map(|request| crate::review::PendingReview {
                    id: request.id.clone(),
                    tenant: r.tenant.clone(),
                    pipeline: pipeline.name.clone(),
                    job_id: job.id.clone(),
                    job_key: key.to_owned(),
                    deadline: request.deadline,
                    on_timeout: pipeline.review.on_timeout.clone(),
                    proposed: r.clone(),
                    payload: String::from_utf8_lossy(payload).into_owned(),
                    source: incoming.source.clone(),
                    traceparent: incoming.trace.map(str::to_owned),
                    created_at: Utc::now(),
                    held_steps: if held_steps.is_some() {
                        pipeline.steps.iter().map(|s| s.name.clone()).collect()
                    } else {
                        Vec::new()
                    },
                    held: held_steps.take(),
                }),
            Outcome::DeadLetter(_) => None,
        };
        (outcome, review)
    }

    /// Waits for the job's turn under its tenant's limits and the fair scheduler, then runs
    /// its pipeline. A deadline that passes while it waits dead-letters it before any call.
    async fn admit_and_run(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        booked: Booked,
        deferrable: bool,
        round: Option<&crate::calls::batch::BatchRound>,
    ) -> Result<Result<RunOutput, RunFailure>, Stopped> {
        let expired = deadline_passes(job);
        let admitted = async {
            loop {
                match self
                    .scheduler
                    .admit(job.tenant.as_str(), job.priority, booked)
                    .await
                {
                    Ok(Some(slot)) => return Ok(slot),
                    // The scheduler stopped: the process is shutting down and hands this back.
                    Ok(None) => std::future::pending::<()>().await,
                    Err(NotQueued::Parked(wait)) => {
                        return Err(Stopped::Deferred(until_deadline(job, wait)))
                    }
                    // The queue filled up since the booking: see `book`.
                    Err(NotQueued::QueueFull) if deferrable => return Err(self.queue_full(job)),
                    Err(NotQueued::QueueFull) => tokio::time::sleep(QUEUE_FULL_RETRY).await,
                }
            }
        };
        let slot = tokio::select! {
            slot = admitted => slot?,
            () = expired => {
                return Ok(Err(RunFailure {
                    reason: DeadLetterReason::DeadlineExceeded,
                    error: "the deadline passed while the job waited for admission (tenant limits or a full scheduler); no provider was called".into(),
                    attempts: 0,
                }));
            }
        };
        let job_budget = match self.reserve_job(job, pipeline).await {
            Ok(job_budget) => job_budget,
            Err(failure) => return Ok(Err(failure)),
        };
        let run = match round {
            Some(round) => {
                self.runner
                    .run_batched(job, pipeline, job_budget.as_deref(), round)
                    .await
            }
            None => self.runner.run(job, pipeline, job_budget.as_deref()).await,
        };
        drop(job_budget);
        let mut out = match run {
            Ok(out) => out,
            Err(failure) => return Ok(Err(failure)),
        };
        if slot.throttled {
            let queued_ms = u64::try_from(slot.queued.as_millis()).unwrap_or(u64::MAX);
            out.steps.insert(
                0,
                StepRecord {
                    name: "admission".into(),
                    kind: "admission".into(),
                    latency_ms: queued_ms,
                    throttled_ms: queued_ms,
                    ..StepRecord::default()
                },
            );
        }
        drop(slot);
        Ok(Ok(out))
    }

    /// Books the job's turn under its tenant's rate limit. A turn far off (more than
    /// `limits.park_after_ms`) parks the job where the broker can redeliver it later: handed
    /// back with that delay (JetStream nak, Kafka delay topic), with a ticket that lets it run
    /// at once when it comes back, so it holds no in-flight slot and no place in the source's
    /// line meanwhile. Not past its deadline, though: it comes back just after it and ends as
    /// `deadline_exceeded` then. A full tenant queue parks it too (for a fixed delay); where the
    /// broker cannot redeliver later, the job waits in the process instead (still bounded by
    /// the in-flight limit).
    async fn book(
        &self,
        job: &Job,
        key: &str,
        deferrable: bool,
        stop: &CancellationToken,
    ) -> Result<Booked, Stopped> {
        let booking = self.scheduler.book(job.tenant.as_str(), key, deferrable);
        let expired = deadline_passes(job);
        let booked = tokio::select! {
            biased;
            () = stop.cancelled() => return Err(Stopped::Now),
            booked = booking => booked,
            // The store is out and the deadline passed meanwhile: on to the claim, and the
            // deadline check after it.
            () = expired => Ok(Booked::now()),
        };
        match booked {
            Ok(booked) => Ok(booked),
            Err(NotQueued::Parked(wait)) => Err(Stopped::Deferred(until_deadline(job, wait))),
            Err(NotQueued::QueueFull) => Err(self.queue_full(job)),
        }
    }

    /// Waits for the job's turn under its user's `per_user.rps` (before its tenant's turn is
    /// booked, so a busy user spends none of the tenant's rate). A turn further off than
    /// `limits.park_after_ms` parks the job at the broker, like a tenant's: a burst of one
    /// user does not hold in-flight slots. A deadline passing meanwhile goes on to the claim,
    /// and the deadline check after it.
    async fn user_turn(
        &self,
        job: &Job,
        key: &str,
        deferrable: bool,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let gate = self.scheduler.gate();
        let turn = gate.user_turn(
            job.tenant.as_str(),
            job.user.as_deref(),
            key,
            job.deadline,
            deferrable,
        );
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return Err(Stopped::Now),
            result = turn => result,
        };
        match result {
            Ok(()) | Err(UserWait::Deadline) => Ok(()),
            Err(UserWait::Park(wait)) => {
                self.metrics
                    .jobs_parked
                    .with_label_values(&["user_rate"])
                    .inc();
                Err(Stopped::Deferred(until_deadline(job, wait)))
            }
        }
    }

    fn queue_full(&self, job: &Job) -> Stopped {
        self.metrics
            .jobs_parked
            .with_label_values(&["queue_full"])
            .inc();
        Stopped::Deferred(until_deadline(job, QUEUE_FULL_DEFER))
    }

    /// Reserves the job's worst case against its tenant's budget before its first call, so it
    /// is never refused half-way. When the budget cannot cover it: a pipeline with a
    /// `budget_fallback` runs without a job reservation (each call then reserves its own and
    /// moves to the cheaper model when it does not fit); otherwise the job ends as
    /// `budget_exceeded` before any call.
    async fn reserve_job(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
    ) -> Result<Option<SettledOnDrop>, RunFailure> {
        let gate = self.scheduler.gate();
        let waited = std::sync::atomic::AtomicU64::new(0);
        let scope = CallScope {
            tenant: job.tenant.as_str(),
            step: None,
            user: job.user.as_deref(),
            deadline: job.deadline,
            throttled_ms: &waited,
            job_budget: None,
            low_priority: job.priority == crate::wire::Priority::Low,
            batch: None,
        };
        let worst = || self.runner.worst_case_cost(job, pipeline);
        match gate.reserve_job(&scope, &pipeline.name, worst).await {
            Ok(reserved) => Ok(reserved.map(|budget| SettledOnDrop {
                gate: gate.clone(),
                budget,
            })),
            Err(Refusal::Budget(_)) if pipeline.budget_fallback.is_some() => Ok(None),
            Err(Refusal::Budget(detail)) => Err(RunFailure {
                reason: DeadLetterReason::BudgetExceeded,
                error: format!("budget exceeded: {detail}; no provider was called"),
                attempts: 0,
            }),
            Err(Refusal::Deadline) => Err(RunFailure {
                reason: DeadLetterReason::DeadlineExceeded,
                error: "the deadline passed while the job waited for its budget reservation; no provider was called".into(),
                attempts: 0,
            }),
        }
    }

    /// A job whose tenant the transport contradicts, or an unknown tenant under
    /// `tenants.unknown: reject`, ends here: no claim, no spend, nothing stored under the
    /// tenant it claimed.
    fn tenant_refusal(&self, job: &Job, incoming: &Incoming<'_>) -> Option<Decision> {
        let tenant = job.tenant.as_str();
        if let Some(vouched) = incoming.vouched_tenant.filter(|v| *v != tenant) {
            let error = format!(
                "the job says tenant `{tenant}` but its {} names tenant `{vouched}`; a producer may only publish jobs for the tenant its {} names",
                if incoming.source.transport == "nats" { "subject" } else { "message key" },
                if incoming.source.transport == "nats" { "subject" } else { "key" },
            );
            // Not under the claimed tenant's identity: the dead letter goes to the vouched one.
            let decision = incoming.unclaimed(
                DeadLetterReason::InvalidJob,
                error,
                Who::Known {
                    job_id: Some(job.id.clone()),
                    tenant: crate::wire::TenantId::parse(vouched)
                        .ok()
                        .map(|t| t.to_string()),
                },
                None,
            );
            return Some(decision);
        }
        if self.plan.tenants.unknown == UnknownTenants::Reject
            && !self.plan.tenants.named.contains_key(tenant)
        {
            let error = format!("tenant `{tenant}` is not configured under `tenants` and `tenants.unknown` is `reject`; add the tenant to the config or publish under a configured one");
            return Some(incoming.unclaimed(
                DeadLetterReason::UnknownTenant,
                error,
                Who::Job(job),
                None,
            ));
        }
        None
    }

    fn pipeline_for(&self, job: &Job) -> Result<Arc<PipelinePlan>, String> {
        let name = match (&job.pipeline, &self.plan.default_pipeline) {
            (Some(name), _) | (None, Some(name)) => name,
            (None, None) => {
                return Err(format!(
                "job names no `pipeline` and the config sets no `default_pipeline`; set one of: {}",
                self.pipeline_names()
            ))
            }
        };
        self.plan.pipelines.get(name).cloned().ok_or_else(|| {
            format!(
                "pipeline `{name}` is not configured; configured pipelines: {}",
                self.pipeline_names()
            )
        })
    }

    fn pipeline_names(&self) -> String {
        self.plan
            .pipelines
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Resolves when the job's deadline passes; never for a job without one.
async fn deadline_passes(job: &Job) {
    match job.deadline {
        Some(deadline) => {
            let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// Longest a job is handed back for at once.
const MAX_PARK: Duration = Duration::from_secs(3600);

/// `wait`, but not past the job's deadline by more than a moment: a job handed back to come
/// again after its deadline would only come back to be dead-lettered late.
fn until_deadline(job: &Job, wait: Duration) -> Duration {
    // A longer wait comes back after an hour and is parked again for the rest (its ticket
    // knows its turn).
    let wait = wait.min(MAX_PARK);
    let Some(deadline) = job.deadline else {
        return wait;
    };
    let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    wait.min(left + Duration::from_millis(100))
}

/// `id` and `tenant` of a payload that failed validation, when they can still be read, so the
/// dead letter can be routed and traced.
fn best_effort_identity(payload: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(payload) else {
        return (None, None);
    };
    let id = map
        .get("id")
        .and_then(Value::as_str)
        .map(|s| s.chars().take(128).collect());
    let tenant = map
        .get("tenant")
        .and_then(Value::as_str)
        .and_then(|t| TenantId::parse(t).ok())
        .map(|t| t.to_string());
    (id, tenant)
}
