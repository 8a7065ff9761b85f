//! One delivery from bytes to acknowledged output, in the admission order of DESIGN section 4:
//! decode -> pipeline -> deadline -> idempotency claim -> pipeline run -> confirmed write ->
//! idempotency complete -> ack.
//!
//! Every path ends in exactly one of: an output confirmed by the sink and then an ack, or a hand
//! back (no ack, claim released) when the process is stopping. Nothing is dropped silently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::telemetry::metrics::Metrics;

use crate::admission::Scheduler;
use crate::config::Plan;
use crate::pipeline::{RunFailure, RunOutput, Runner};
use crate::sink::{Destination, Output, OutputSink, SinkError};
use crate::source::Delivery;
use crate::state::{Claim, ClaimToken, StateStore};
use crate::wire::{
    decode_job, DeadLetter, DeadLetterReason, Job, JobResult, Outcome, ResultStatus, SourceInfo,
    TenantId, Usage,
};

/// How long to wait between looks at a key another worker is processing.
const BUSY_POLL: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a job whose tenant queue is full tries to enter it again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(50);
/// How long a JetStream message whose tenant queue was full waits before its redelivery.
const QUEUE_FULL_DEFER: Duration = Duration::from_secs(2);

pub struct Engine<K> {
    plan: Arc<Plan>,
    runner: Runner,
    scheduler: Scheduler,
    state: StateStore,
    sink: K,
    metrics: Arc<Metrics>,
}

/// The job was stopped before its output was confirmed: it stays unacked for redelivery, at
/// once or after a delay (its tenant's queue was full and the broker can redeliver later).
#[derive(Debug, Clone, Copy)]
enum Stopped {
    Now,
    Deferred(Duration),
}

/// The claim on a job's key now belongs to someone else.
struct LeaseLost;

/// What a decided job needs written and remembered.
struct Decision {
    outcome: Outcome,
    /// The claim to complete once the outcome is written (absent for replays and for payloads
    /// that never got as far as a claim).
    claim: Option<(String, ClaimToken)>,
    /// The pipeline the job ran (or would have run) in, when known: a metrics label.
    pipeline: Option<String>,
}

impl<K: OutputSink> Engine<K> {
    pub fn new(
        plan: Arc<Plan>,
        runner: Runner,
        scheduler: Scheduler,
        state: StateStore,
        sink: K,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            plan,
            runner,
            scheduler,
            state,
            sink,
            metrics,
        }
    }

    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// Processes one delivery to its end; `stop` hands unfinished work back.
    pub async fn handle(&self, delivery: Delivery, stop: &CancellationToken) {
        let Delivery {
            payload,
            traceparent,
            source,
            received_at,
            ack,
        } = delivery;
        let trace = traceparent.as_deref();
        let deferrable = ack.can_defer();
        let work = self.process(&payload, &source, received_at, trace, stop, deferrable);
        let finished = tokio::select! {
            finished = work => finished,
            never = ack.keep_alive_forever() => match never {},
        };
        match finished {
            Ok(poison) => ack.ack(poison).await,
            Err(Stopped::Now) => ack.hand_back().await,
            Err(Stopped::Deferred(delay)) => ack.defer(delay).await,
        }
    }

    /// Decides, writes and records the outcome; `Ok(poison)` once it is confirmed written.
    async fn process(
        &self,
        payload: &[u8],
        source: &SourceInfo,
        received_at: DateTime<Utc>,
        trace: Option<&str>,
        stop: &CancellationToken,
        deferrable: bool,
    ) -> Result<bool, Stopped> {
        let Decision {
            outcome,
            claim,
            pipeline,
        } = self
            .decide(payload, source, received_at, trace, stop, deferrable)
            .await?;
        let poison = matches!(&outcome, Outcome::DeadLetter(dl) if dl.reason == DeadLetterReason::InvalidJob);
        let Some((key, token)) = claim else {
            let written = self.write(outcome, payload, source, trace, stop).await?;
            self.finished(&written, pipeline.as_deref(), received_at, trace);
            return Ok(poison);
        };
        // The claim stays held until the outcome is recorded: a slow write must not let a
        // redelivery take the key over and call the provider again.
        let finish = async {
            let written = self.write(outcome, payload, source, trace, stop).await?;
            match serde_json::to_vec(&written) {
                Ok(bytes) => self.record(&key, Bytes::from(bytes)).await,
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "could not encode the outcome for the state store")
                }
            }
            Ok(written)
        };
        let finished = tokio::select! {
            finished = finish => finished,
            LeaseLost = self.hold_claim(&key, &token) => {
                // Another worker owns the key now; writing too would duplicate its output.
                tracing::warn!(key = %key, "claim lease lost before the output was written; handing the job back");
                return Err(Stopped::Now);
            }
        };
        match finished {
            Ok(written) => {
                self.finished(&written, pipeline.as_deref(), received_at, trace);
                Ok(poison)
            }
            Err(stopped) => {
                self.release(&key, &token).await;
                Err(stopped)
            }
        }
    }

    /// The job's outcome is confirmed written: one metrics update and one log record.
    fn finished(
        &self,
        outcome: &Outcome,
        pipeline: Option<&str>,
        received_at: DateTime<Utc>,
        trace: Option<&str>,
    ) {
        let pipeline = pipeline.unwrap_or("none");
        let m = &self.metrics;
        m.job_duration
            .with_label_values(&[pipeline])
            .observe(seconds_since(received_at));
        match outcome {
            Outcome::Result(r) => {
                let status = if r.duplicate {
                    "duplicate"
                } else {
                    r.status.as_str()
                };
                m.jobs_finished.with_label_values(&[pipeline, status]).inc();
                if !r.duplicate {
                    let tenant = self.plan.tenants.label(&r.tenant);
                    m.tenant_tokens
                        .with_label_values(&[tenant, "input"])
                        .inc_by(r.usage.input_tokens);
                    m.tenant_tokens
                        .with_label_values(&[tenant, "output"])
                        .inc_by(r.usage.output_tokens);
                    if r.usage.cost_usd.is_finite() && r.usage.cost_usd > 0.0 {
                        m.tenant_cost
                            .with_label_values(&[tenant])
                            .inc_by(r.usage.cost_usd);
                    }
                }
                tracing::info!(job_id = %r.job_id, tenant = %r.tenant, pipeline, status, traceparent = trace, latency_ms = r.latency_ms,
                    input_tokens = r.usage.input_tokens, output_tokens = r.usage.output_tokens, cost_usd = r.usage.cost_usd,
                    "job finished");
            }
            Outcome::DeadLetter(dl) => {
                let status = if dl.duplicate {
                    "duplicate"
                } else {
                    "dead_letter"
                };
                m.jobs_finished.with_label_values(&[pipeline, status]).inc();
                if !dl.duplicate {
                    m.dead_letters
                        .with_label_values(&[dl.reason.as_str()])
                        .inc();
                }
                tracing::warn!(job_id = dl.job_id.as_deref().unwrap_or("-"), tenant = dl.tenant.as_deref().unwrap_or("-"),
                    pipeline, status, traceparent = trace, reason = dl.reason.as_str(), attempts = dl.attempts, error = %dl.error, "job dead-lettered");
            }
        }
    }

    /// Stores the finished outcome. The output is already written, so this retries through a
    /// short state-store outage rather than leave the key claimed (a redelivery would then wait
    /// for the lease and process the job again).
    async fn record(&self, key: &str, outcome: Bytes) {
        let mut delay = RETRY_MIN;
        for _ in 0..8 {
            match self
                .state
                .complete(key, outcome.clone(), self.plan.state.result_ttl)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not record the finished job; retrying")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        tracing::error!(
            key,
            "gave up recording the finished job; a redelivery would process it again"
        );
    }

    /// Renews the claim every third of the lease while its job runs; returns only when the claim
    /// was lost (expired and taken over, or finished by another worker). A store outage is
    /// waited out: the claim's owner token is still ours when it returns.
    async fn hold_claim(&self, key: &str, token: &ClaimToken) -> LeaseLost {
        let lease = self.plan.state.claim_lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            match self.state.renew(key, token, lease).await {
                Ok(true) => {}
                Ok(false) => return LeaseLost,
                Err(e) => tracing::warn!(key, error = %e, "could not renew the claim lease"),
            }
        }
    }

    async fn decide(
        &self,
        payload: &[u8],
        source: &SourceInfo,
        received_at: DateTime<Utc>,
        trace: Option<&str>,
        stop: &CancellationToken,
        deferrable: bool,
    ) -> Result<Decision, Stopped> {
        let dead = |reason, error: String, job: Option<&Job>, attempts| {
            let mut dl = DeadLetter::new(reason, error, payload, source.clone());
            dl.attempts = attempts;
            match job {
                Some(job) => {
                    dl.job_id = Some(job.id.clone());
                    dl.tenant = Some(job.tenant.to_string());
                }
                None => (dl.job_id, dl.tenant) = best_effort_identity(payload),
            }
            Outcome::DeadLetter(dl)
        };
        let job = match decode_job(payload, self.plan.limits.max_job_bytes, received_at) {
            Ok(job) => job,
            Err(invalid) => {
                return Ok(Decision {
                    outcome: dead(DeadLetterReason::InvalidJob, invalid.to_string(), None, 0),
                    claim: None,
                    pipeline: None,
                })
            }
        };
        let pipeline = match self.pipeline_for(&job) {
            Ok(p) => p,
            Err(error) => {
                return Ok(Decision {
                    outcome: dead(DeadLetterReason::InvalidJob, error, Some(&job), 0),
                    claim: None,
                    pipeline: None,
                })
            }
        };
        if let Some(deadline) = job.deadline.filter(|d| *d <= Utc::now()) {
            let error = format!(
                "deadline {} had passed when the job was received",
                deadline.to_rfc3339()
            );
            return Ok(Decision {
                outcome: dead(DeadLetterReason::DeadlineExceeded, error, Some(&job), 0),
                claim: None,
                pipeline: Some(pipeline.name.clone()),
            });
        }
        let key = job.state_key();
        let token = match self.claim(&key, stop).await? {
            Ok(token) => token,
            Err(stored) => {
                return Ok(Decision {
                    outcome: replay(&stored, payload, source, &job),
                    claim: None,
                    pipeline: Some(pipeline.name.clone()),
                })
            }
        };
        let started = Instant::now();
        self.metrics.queue_wait.observe(seconds_since(received_at));
        let span = tracing::info_span!("job", job_id = %job.id, tenant = %job.tenant, pipeline = %pipeline.name, traceparent = trace);
        let run = tokio::select! {
            biased;
            () = stop.cancelled() => {
                self.release(&key, &token).await;
                return Err(Stopped::Now);
            }
            run = self.admit_and_run(&job, &pipeline, deferrable).instrument(span) => match run {
                Ok(run) => run,
                Err(deferred) => {
                    self.release(&key, &token).await;
                    return Err(deferred);
                }
            },
            LeaseLost = self.hold_claim(&key, &token) => {
                tracing::warn!(key = %key, "claim lease lost while the job ran; handing it back to the worker that holds it");
                return Err(Stopped::Now);
            }
        };
        let outcome = match run {
            Ok(out) => {
                let mut usage = Usage::default();
                out.steps.iter().for_each(|s| usage.add(s));
                let completed_at = Utc::now();
                Outcome::Result(JobResult {
                    job_id: job.id.clone(),
                    tenant: job.tenant.to_string(),
                    pipeline: pipeline.name.clone(),
                    status: out.status,
                    output: out.output,
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
                dead(reason, error, Some(&job), attempts)
            }
        };
        Ok(Decision {
            outcome,
            claim: Some((key, token)),
            pipeline: Some(pipeline.name.clone()),
        })
    }

    /// Waits for the job's turn under its tenant's limits and the fair scheduler, then runs
    /// its pipeline. A deadline that passes while it waits dead-letters it before any call.
    async fn admit_and_run(
        &self,
        job: &Job,
        pipeline: &crate::config::PipelinePlan,
        deferrable: bool,
    ) -> Result<Result<RunOutput, RunFailure>, Stopped> {
        let expired = async {
            match job.deadline {
                Some(deadline) => {
                    let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        let admitted = async {
            loop {
                match self
                    .scheduler
                    .admit(job.tenant.as_str(), job.priority)
                    .await
                {
                    Ok(Some(slot)) => return Ok(slot),
                    // The scheduler stopped: the process is shutting down and hands this back.
                    Ok(None) => std::future::pending::<()>().await,
                    // The tenant's queue is full. Where the broker can redeliver later
                    // (JetStream), give the message back with a delay so it frees its in-flight
                    // slot for other tenants; otherwise wait outside the queue (still bounded
                    // by the in-flight limit).
                    Err(crate::admission::QueueFull) if deferrable => {
                        return Err(Stopped::Deferred(QUEUE_FULL_DEFER))
                    }
                    Err(crate::admission::QueueFull) => tokio::time::sleep(QUEUE_FULL_RETRY).await,
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
        let mut out = match self.runner.run(job, pipeline).await {
            Ok(out) => out,
            Err(failure) => return Ok(Err(failure)),
        };
        if slot.throttled {
            let queued_ms = u64::try_from(slot.queued.as_millis()).unwrap_or(u64::MAX);
            out.steps.insert(
                0,
                crate::wire::StepRecord {
                    name: "admission".into(),
                    kind: "admission".into(),
                    provider: None,
                    model: None,
                    attempts: 0,
                    cached: false,
                    latency_ms: queued_ms,
                    input_tokens: 0,
                    output_tokens: 0,
                    cost_usd: 0.0,
                    throttled_ms: queued_ms,
                },
            );
        }
        drop(slot);
        Ok(Ok(out))
    }

    fn pipeline_for(&self, job: &Job) -> Result<Arc<crate::config::PipelinePlan>, String> {
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

    /// Claims the key: `Ok(Ok(token))` to process it, `Ok(Err(stored))` when it finished before.
    /// Waits while another worker holds a live lease (it ends in an outcome or lapses).
    async fn claim(
        &self,
        key: &str,
        stop: &CancellationToken,
    ) -> Result<Result<ClaimToken, Bytes>, Stopped> {
        let lease = self.plan.state.claim_lease;
        let mut delay = RETRY_MIN;
        loop {
            let wait = match self.state.claim(key, lease).await {
                Ok(Claim::Acquired(token)) => return Ok(Ok(token)),
                Ok(Claim::Done(stored)) => return Ok(Err(stored)),
                Ok(Claim::Busy) => BUSY_POLL,
                Err(e) => {
                    tracing::warn!(error = %e, "state store unavailable; job waits");
                    delay = (delay * 2).min(RETRY_MAX);
                    delay
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn release(&self, key: &str, token: &ClaimToken) {
        if let Err(e) = self.state.release(key, token).await {
            tracing::warn!(key, error = %e, "could not release claim; it lapses with its lease");
        }
    }

    /// Writes the outcome, retrying failures until confirmed or stopped, and returns what was
    /// written. A result the sink can never take becomes an `internal` dead letter instead; a
    /// dead letter that cannot be written is retried (and logged) until the topic is fixed,
    /// never dropped and never handed back for a paid re-run.
    async fn write(
        &self,
        outcome: Outcome,
        payload: &[u8],
        source: &SourceInfo,
        trace: Option<&str>,
        stop: &CancellationToken,
    ) -> Result<Outcome, Stopped> {
        let mut outcome = outcome;
        let mut output = output_for(&outcome, trace)?;
        let mut delay = RETRY_MIN;
        loop {
            match self.sink.send(&output).await {
                Ok(()) => return Ok(outcome),
                Err(SinkError::Transient(e)) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "output write failed; retrying");
                }
                Err(SinkError::Permanent(e)) if output.destination != Destination::DeadLetters => {
                    let (job_id, tenant) = match &outcome {
                        Outcome::Result(r) => (r.job_id.clone(), r.tenant.clone()),
                        Outcome::DeadLetter(d) => (
                            d.job_id.clone().unwrap_or_default(),
                            d.tenant.clone().unwrap_or_default(),
                        ),
                    };
                    tracing::error!(job_id = %job_id, error = %e, "result cannot be written; dead-lettering it");
                    let mut dl = DeadLetter::new(
                        DeadLetterReason::Internal,
                        format!(
                            "the result ({} bytes) could not be written to its topic: {e}; raise the sink's message size limit or lower the model's max_tokens",
                            output.payload.len()
                        ),
                        payload,
                        source.clone(),
                    );
                    dl.job_id = Some(job_id);
                    dl.tenant = Some(tenant);
                    outcome = Outcome::DeadLetter(dl);
                    output = output_for(&outcome, trace)?;
                    continue;
                }
                Err(SinkError::Permanent(e)) => {
                    // Dead-letter payloads are capped, so the dead-letter topic itself is unusable
                    // (not authorized, missing). Keep the job and retry until an operator fixes it.
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "dead letter cannot be written; retrying");
                }
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

fn seconds_since(at: DateTime<Utc>) -> f64 {
    (Utc::now() - at)
        .to_std()
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn output_for(outcome: &Outcome, trace: Option<&str>) -> Result<Output, Stopped> {
    let (destination, tenant, payload) = match outcome {
        Outcome::Result(r) => {
            let destination = if r.status == ResultStatus::Review {
                Destination::Review
            } else {
                Destination::Results
            };
            (destination, Some(r.tenant.clone()), serde_json::to_vec(r))
        }
        Outcome::DeadLetter(dl) => (
            Destination::DeadLetters,
            dl.tenant.clone(),
            serde_json::to_vec(dl),
        ),
    };
    let payload = payload.map_err(|e| {
        tracing::error!(error = %e, "could not encode output");
        Stopped::Now
    })?;
    Ok(Output {
        destination,
        tenant,
        payload,
        traceparent: trace.map(str::to_owned),
    })
}

/// The stored outcome of an earlier delivery, marked as a duplicate.
fn replay(stored: &[u8], payload: &[u8], source: &SourceInfo, job: &Job) -> Outcome {
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
            let mut dl = DeadLetter::new(
                DeadLetterReason::Internal,
                format!("this idempotency key finished before but its stored outcome is unreadable ({e}); republish with a new idempotency_key to process it again"),
                payload,
                source.clone(),
            );
            dl.job_id = Some(job.id.clone());
            dl.tenant = Some(job.tenant.to_string());
            dl.duplicate = true;
            Outcome::DeadLetter(dl)
        }
    }
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
