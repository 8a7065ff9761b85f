//! One delivery from bytes to acknowledged output, in the admission order of
//! `docs/architecture.md` ("One job's path"): decode -> tenant -> pipeline -> idempotency claim
//! (or replay) -> deadline -> scheduler -> pipeline run -> confirmed write -> idempotency
//! complete -> ack.
//!
//! Every path ends in exactly one of: an output confirmed by the sink and then an ack, or a hand
//! back (no ack, claim released) when the process is stopping. Nothing is dropped silently.
//! [`outcome`] decides what a delivery ends as (and builds every dead letter), [`claim`] holds
//! the idempotency claim, [`write`] gets the output confirmed by the sink.

mod batch;
mod claim;
mod outcome;
mod review;
#[cfg(test)]
mod tests;
mod write;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;

use crate::admission::Scheduler;
use crate::config::Plan;
use crate::pipeline::Runner;
use crate::sink::OutputSink;
use crate::source::Delivery;
use crate::state::StateStore;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Telemetry;
use crate::wire::{decode_job, DeadLetterReason, Outcome, SourceInfo};
pub use batch::BatchClock;
use claim::LeaseLost;
use outcome::{Decision, Who};

/// How long to wait between looks at a key another worker is processing.
const BUSY_POLL: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a job whose tenant queue is full tries to enter it again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(50);
/// How long the dead letter of a job on its last delivery may take to write.
const GIVE_UP_WRITE: Duration = Duration::from_secs(3);
/// How long a JetStream message whose tenant queue was full waits before its redelivery.
const QUEUE_FULL_DEFER: Duration = Duration::from_secs(2);

pub struct Engine<K> {
    plan: Arc<Plan>,
    runner: Runner,
    scheduler: Scheduler,
    state: StateStore,
    sink: K,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The job was stopped before its output was confirmed: it stays unacked for redelivery, at
/// once or after a delay (its tenant's queue was full and the broker can redeliver later).
#[derive(Debug, Clone, Copy)]
enum Stopped {
    Now,
    Deferred(Duration),
}

/// What a delivery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A job (`schemas/job.v1.json`).
    Job,
    /// A review decision (`schemas/decision.v1.json`).
    Decision,
}

/// One delivery as the engine sees it: what every stage of its path needs.
#[derive(Clone, Copy)]
struct Incoming<'a> {
    kind: Kind,
    payload: &'a [u8],
    source: &'a SourceInfo,
    received_at: DateTime<Utc>,
    /// The validated W3C `traceparent` it arrived with.
    trace: Option<&'a str>,
    /// The broker can redeliver it later (JetStream), so a full tenant queue may defer it.
    deferrable: bool,
    /// The tenant the transport vouches for, which the job's own must match.
    vouched_tenant: Option<&'a str>,
}

impl<K: OutputSink> Engine<K> {
    pub fn new(
        plan: Arc<Plan>,
        runner: Runner,
        scheduler: Scheduler,
        state: StateStore,
        sink: K,
        telemetry: &Telemetry,
    ) -> Self {
        Self {
            plan,
            runner,
            scheduler,
            state,
            sink,
            metrics: telemetry.metrics.clone(),
            health: telemetry.health.clone(),
        }
    }

    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// Processes one job delivery to its end; `stop` hands unfinished work back.
    pub async fn handle(&self, delivery: Delivery, stop: &CancellationToken) {
        self.handle_as(delivery, Kind::Job, stop).await;
    }

    /// Processes one delivery of `kind` to its end; `stop` hands unfinished work back.
    pub async fn handle_as(&self, delivery: Delivery, kind: Kind, stop: &CancellationToken) {
        let Delivery {
            payload,
            traceparent,
            source,
            tenant,
            received_at,
            ack,
        } = delivery;
        let incoming = Incoming {
            kind,
            payload: &payload,
            source: &source,
            received_at,
            trace: traceparent.as_deref(),
            deferrable: ack.can_defer(),
            vouched_tenant: tenant.as_deref(),
        };
        // The panic path runs under the same keep-alive, so the broker does not redeliver the
        // job while its dead letter is being written.
        let work = async {
            // Boxed: the job's future is large, and every wrapper would otherwise copy it. (Each
            // future is boxed in a statement of its own: a temporary that lives until an await
            // takes its whole size in this future too.)
            let job = Box::pin(self.process(&incoming, stop));
            match AssertUnwindSafe(job).catch_unwind().await {
                Ok(finished) => finished,
                Err(panic) => {
                    let message = panic_message(&*panic);
                    // Boxed: a rare path, kept out of every job's future.
                    let dead_letter = Box::pin(self.after_panic(&incoming, message, stop));
                    match AssertUnwindSafe(dead_letter).catch_unwind().await {
                        Ok(finished) => finished,
                        Err(_) => {
                            tracing::error!(
                                "dead-lettering a panicked job panicked too; handing the job back"
                            );
                            Err(Stopped::Now)
                        }
                    }
                }
            }
        };
        let finished = tokio::select! {
            finished = work => finished,
            never = ack.keep_alive_forever() => match never {},
        };
        match finished {
            Ok(poison) => ack.ack(poison).await,
            Err(Stopped::Now) => match ack.last_delivery(stop.is_cancelled()) {
                // Handing it back would be the end of it: the broker will not deliver it again.
                Some(deliveries) => {
                    // Boxed: a rare path, kept out of every job's future.
                    let last = Box::pin(self.give_up(&incoming, deliveries));
                    let last = tokio::select! {
                        last = last => last,
                        never = ack.keep_alive_forever() => match never {},
                    };
                    match last {
                        Ok(()) => ack.ack(false).await,
                        Err(()) => ack.hand_back().await,
                    }
                }
                None => ack.hand_back().await,
            },
            Err(Stopped::Deferred(delay)) => ack.defer(delay).await,
        }
    }

    /// The delivery decoded again, for a dead letter written outside the normal path (its
    /// tenant is then the transport's, when it vouches for one: see `Incoming::dead_letter`).
    fn decoded(&self, incoming: &Incoming<'_>) -> Option<crate::wire::Job> {
        decode_job(
            incoming.payload,
            self.plan.limits.max_job_bytes,
            incoming.received_at,
        )
        .ok()
    }

    /// The job was handed back on its last allowed delivery: it becomes a
    /// `max_deliveries_exceeded` dead letter with its payload, so it is not silently lost. The
    /// write gets [`GIVE_UP_WRITE`] even while the process stops; `Err` when it did not land.
    async fn give_up(&self, incoming: &Incoming<'_>, deliveries: u64) -> Result<(), ()> {
        let job = self.decoded(incoming);
        let who = job.as_ref().map_or(Who::Undecoded, Who::Job);
        let error = format!("the job was handed back (shutdown, or its claim passed to another worker) on its last allowed delivery ({deliveries}); the broker will not deliver it again, so it is dead-lettered with its payload: republish it to run it");
        let mut dl = incoming.dead_letter(DeadLetterReason::MaxDeliveriesExceeded, error, who, 0);
        dl.deliveries = Some(deliveries);
        // Not the process's stop token: it is cancelled while shutting down, and this is the
        // last chance to keep the job.
        let own_stop = CancellationToken::new();
        let key = incoming.position();
        let write = self.write(Outcome::DeadLetter(dl), incoming, &key, None, &own_stop);
        match tokio::time::timeout(GIVE_UP_WRITE, write).await {
            Ok(Ok(written)) => {
                self.finished(&written.outcome, None, incoming);
                Ok(())
            }
            _ => {
                tracing::error!(source = ?incoming.source, deliveries, "could not write the dead letter of a job on its last delivery; handing it back (the broker may drop it)");
                Err(())
            }
        }
    }

    /// Decides, writes and records the outcome; `Ok(poison)` once it is confirmed written.
    async fn process(
        &self,
        incoming: &Incoming<'_>,
        stop: &CancellationToken,
    ) -> Result<bool, Stopped> {
        if incoming.kind == Kind::Decision {
            // Boxed: a review decision's path is larger than a job's, and every job's future
            // would otherwise be as large (it is copied whole when boxed and spawned).
            let decision = Box::pin(self.process_decision(incoming, stop));
            return decision.await;
        }
        let decision = self.decide(incoming, stop).await?;
        self.deliver(decision, incoming, stop).await
    }

    /// Writes what a job ended as, under its claim when it holds one, records it and says it
    /// is done; `Ok(poison)` once confirmed. A job parked for a provider batch writes nothing
    /// (its parking record holds it now).
    async fn deliver(
        &self,
        decision: Decision,
        incoming: &Incoming<'_>,
        stop: &CancellationToken,
    ) -> Result<bool, Stopped> {
        let Decision {
            outcome,
            claim,
            pipeline,
            output_key,
            review,
        } = decision;
        let Some(outcome) = outcome else {
            return Ok(false);
        };
        let poison = matches!(&outcome, Outcome::DeadLetter(dl) if dl.reason == DeadLetterReason::InvalidJob);
        let Some(held) = claim else {
            let written = self
                .write(outcome, incoming, &output_key, None, stop)
                .await?;
            self.finished(&written.outcome, pipeline.as_deref(), incoming);
            return Ok(poison);
        };
        // Publish only with the lease surely ours (fencing): a worker cut off from the store
        // for most of a lease waits here until the store confirms it, or hands the job back if
        // another worker took it meanwhile.
        self.confirm_lease(&held, stop).await?;
        if let Some(review) = &review {
            // Kept before its request is out, so a decision can never arrive for a review
            // the store does not know.
            if let Err(stopped) = self.open_review(review, stop).await {
                self.release(&held).await;
                return Err(stopped);
            }
            // Keeping it may have waited through a store outage: the claim must still be ours.
            self.confirm_lease(&held, stop).await?;
        }
        let written = tokio::select! {
            written = self.write(outcome, incoming, &output_key, Some(&held), stop) => written,
            LeaseLost = self.hold_claim(&held) => {
                // Another worker owns the key now: writing too would duplicate its output.
                tracing::warn!(key = %held.key, "claim lease lost before the output was written; handing the job back");
                return Err(Stopped::Now);
            }
        };
        let written = match written {
            Ok(written) => written,
            Err(stopped) => {
                self.release(&held).await;
                return Err(stopped);
            }
        };
        if let Some(review) = &review {
            let requested = matches!(&written.outcome, Outcome::Result(r) if r.review.is_some());
            if !requested {
                // The request could not be written (it became a dead letter): nobody can
                // decide the review, so it must not settle into a second outcome later.
                self.forget_review(&review.id, &review.tenant).await;
            }
        }
        // The output is out: record it (fenced, so never over another worker's claim) and ack,
        // whatever the lease does meanwhile; handing back now would run the job again.
        self.record(&held, written.stored()).await;
        self.finished(&written.outcome, pipeline.as_deref(), incoming);
        Ok(poison)
    }

    /// A bug panicked the job's task. The job becomes an `internal` dead letter (written without
    /// the headers it came with) and is counted, so it is neither lost nor silently re-run after
    /// every restart. Nothing is recorded in the state store: the panic may have come at any
    /// point, including while another worker held the claim or while a stored result was being
    /// replayed, and neither may be overwritten. The dead letter is filed under the job's tenant
    /// only when the transport does not contradict it.
    async fn after_panic(
        &self,
        incoming: &Incoming<'_>,
        message: String,
        stop: &CancellationToken,
    ) -> Result<bool, Stopped> {
        self.metrics.job_panics.inc();
        tracing::error!(error = %message, source = ?incoming.source, "job task panicked; dead-lettering the job as internal");
        let job = self.decoded(incoming);
        let who = job.as_ref().map_or(Who::Undecoded, Who::Job);
        let error = format!("switchyard failed internally while processing this job ({message}); it is not retried automatically, so please report it with this dead letter and republish the job with a new idempotency_key once fixed");
        let dl = incoming.dead_letter(DeadLetterReason::Internal, error, who, 0);
        let bare = Incoming {
            trace: None,
            ..*incoming
        };
        let written = self
            .write(
                Outcome::DeadLetter(dl),
                &bare,
                &incoming.position(),
                None,
                stop,
            )
            .await?;
        self.finished(&written.outcome, None, incoming);
        Ok(false)
    }

    /// The job's outcome is confirmed written: one metrics update and one log record.
    fn finished(&self, outcome: &Outcome, pipeline: Option<&str>, incoming: &Incoming<'_>) {
        let trace = incoming.trace;
        let pipeline = pipeline.unwrap_or("none");
        let m = &self.metrics;
        m.job_duration
            .with_label_values(&[pipeline])
            .observe(seconds_since(incoming.received_at));
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
                    pipeline, status, traceparent = trace, reason = dl.reason.as_str(), attempts = dl.attempts, error = %crate::guardrails::scrub_for_log(&dl.error), "job dead-lettered");
            }
        }
    }
}

fn seconds_since(at: DateTime<Utc>) -> f64 {
    (Utc::now() - at)
        .to_std()
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    text.chars().take(300).collect()
}
