//! The review round trip: a pending review is kept before its request is written; a decision
//! (or the deadline) settles it into the job's final result or a `review_rejected` dead letter.
//!
//! Settling a review holds the claim of its decision key (`review/<id>`) like a job holds its
//! idempotency key: one worker at a time, fenced, and the decision remembered once its output
//! is confirmed. So the same decision twice gives one result, a different decision for a
//! decided review is refused with what was decided, and a review expiring on one replica while
//! a decision arrives on another ends once.

use bytes::Bytes;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::outcome::Who;
use super::{Engine, Incoming, Kind, LeaseLost, Stopped, RETRY_MAX, RETRY_MIN};
use crate::config::{ModelChoice, PipelinePlan, ReviewPlan, StepKindPlan};
use crate::review::{
    decision_key, decode_decision, fingerprint, DecidedReview, DecisionMessage, OnTimeout,
    PendingReview, Reviewed, Verdict,
};
use crate::sink::OutputSink;
use crate::state::Peek;
use crate::wire::{
    decode_job, DeadLetter, DeadLetterReason, JobResult, Outcome, ResultStatus, SourceInfo,
    TenantId,
};

/// Reviews one expiry pass settles at most.
const EXPIRE_BATCH: usize = 32;
/// The shortest time a decision is remembered (to recognize the same decision again).
const MIN_DECISION_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a decision for a job whose review request is not yet recorded waits to come again.
const JOB_RUNNING_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the reviewed job's idempotency key says of the review.
enum JobState {
    /// Its outcome is this review's request: the review is the job's to settle.
    Requested,
    /// Still claimed: the request was written but not yet recorded (or the job runs again).
    Running,
    /// Another outcome: the job ended without this review.
    Other,
    /// Forgotten or unreadable: the pending review is all there is to go by.
    Unknown,
}

/// What a stored decision meant.
enum Before {
    /// Handled: a duplicate, a refusal, or nothing to do.
    Settled,
    /// It belonged to an earlier review of the same job key and was dropped: claim again.
    Stale,
}

/// How a review is being settled.
enum Settle<'a> {
    Decision(&'a DecisionMessage),
    /// Its deadline passed.
    Expired,
}

impl<K: OutputSink> Engine<K> {
    /// Keeps `review` pending in the state store, waiting through an outage.
    pub(super) async fn open_review(
        &self,
        review: &PendingReview,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let record = serde_json::to_vec(review).map_err(|e| {
            tracing::error!(error = %e, "could not encode a pending review");
            Stopped::Now
        })?;
        let record = Bytes::from(record);
        let deadline_ms = review.deadline.timestamp_millis();
        let mut delay = RETRY_MIN;
        loop {
            match self
                .state
                .review_open(&review.id, &review.tenant, deadline_ms, record.clone())
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(review_id = %review.id, error = %e, "could not keep the pending review; retrying")
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

    /// A decision delivery: applied to its pending review, or refused with a dead letter that
    /// says why. `Ok(poison)` once its outputs are confirmed.
    pub(super) async fn process_decision(
        &self,
        incoming: &Incoming<'_>,
        stop: &CancellationToken,
    ) -> Result<bool, Stopped> {
        let decision = match decode_decision(incoming.payload) {
            Ok(decision) => decision,
            Err(error) => {
                let error = format!("{error}; fix the decision and publish it again");
                self.refuse(incoming, error, None, stop).await?;
                return Ok(true);
            }
        };
        let claimed = decision
            .tenant
            .as_deref()
            .and_then(|t| TenantId::parse(t).ok());
        if let (Some(vouched), Some(claimed)) = (incoming.vouched_tenant, &claimed) {
            if vouched != claimed.as_str() {
                let error = format!("the decision says tenant `{claimed}` but its subject or key names `{vouched}`; a reviewer may only decide reviews of the tenant it publishes for");
                self.refuse(incoming, error, None, stop).await?;
                return Ok(false);
            }
        }
        if incoming.vouched_tenant.is_none() && claimed.is_none() {
            let error = "the decision names no tenant: publish it on `<reviews.decisions>.<tenant>` (NATS), with the tenant as the message key (Kafka with tenant_from: key), or set `tenant`".to_owned();
            self.refuse(incoming, error, None, stop).await?;
            return Ok(true);
        }
        self.settle(
            &decision.review_id,
            Settle::Decision(&decision),
            incoming,
            stop,
        )
        .await
        .map(|()| false)
    }

    /// Settles the reviews whose deadline has passed with their `on_timeout` default; how many
    /// it settled.
    pub async fn expire_due_reviews(&self, stop: &CancellationToken) -> usize {
        let mut due = match self
            .state
            .reviews_by_deadline(Some(Utc::now().timestamp_millis()), EXPIRE_BATCH)
            .await
        {
            Ok(due) => due,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for expired reviews");
                return 0;
            }
        };
        let source = SourceInfo {
            transport: "switchyard".into(),
            topic: "review-expiry".into(),
            partition: None,
            offset: None,
            stream_seq: None,
        };
        // Replicas take the due reviews in different orders, so they settle different ones
        // at once instead of queueing on the same claims.
        {
            use rand::seq::SliceRandom as _;
            due.shuffle(&mut rand::rng());
        }
        let mut settled = 0;
        for id in due {
            if stop.is_cancelled() {
                break;
            }
            let incoming = Incoming {
                kind: Kind::Decision,
                payload: id.as_bytes(),
                source: &source,
                received_at: Utc::now(),
                trace: None,
                deferrable: false,
                vouched_tenant: None,
            };
            if self
                .settle(&id, Settle::Expired, &incoming, stop)
                .await
                .is_ok()
            {
                settled += 1;
            }
        }
        settled
    }

    /// Pending reviews by tenant, into `reviews_pending` (tenants not configured by name are
    /// summed under `other`).
    pub async fn report_pending_reviews(&self, seen: &mut std::collections::BTreeSet<String>) {
        let Ok(counts) = self.state.review_counts().await else {
            return;
        };
        let mut by_label: std::collections::BTreeMap<String, i64> =
            seen.iter().map(|label| (label.clone(), 0)).collect();
        for (tenant, n) in counts {
            *by_label
                .entry(self.plan.tenants.label(&tenant).to_owned())
                .or_default() += i64::try_from(n).unwrap_or(i64::MAX);
        }
        for (label, n) in by_label {
            self.metrics
                .reviews_pending
                .with_label_values(&[label.as_str()])
                .set(n);
            seen.insert(label);
        }
    }

    /// Applies a decision (or the deadline) to review `id` under its decision claim.
    async fn settle(
        &self,
        id: &str,
        how: Settle<'_>,
        incoming: &Incoming<'_>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let key = decision_key(id);
        let mut stale_decisions = 0;
        let held = loop {
            let claimed = match how {
                Settle::Decision(_) => self.claim(&key, stop).await?,
                // Another replica settling it (or a decision being applied) is left to finish.
                Settle::Expired => match self.try_claim(&key).await {
                    Some(claimed) => claimed,
                    None => return Ok(()),
                },
            };
            match claimed {
                Ok(held) => break held,
                Err(stored) => {
                    match self
                        .decided_before(id, &stored, &how, incoming, stop)
                        .await?
                    {
                        Before::Settled => return Ok(()),
                        // The decision of an earlier review of the same job, forgotten now.
                        Before::Stale if stale_decisions < 2 => stale_decisions += 1,
                        Before::Stale => return Err(Stopped::Now),
                    }
                }
            }
        };
        let pending = match self.pending(id, stop).await {
            Ok(Some(pending)) => pending,
            Ok(None) => {
                self.release(&held).await;
                return match how {
                    // Forgotten meanwhile by the worker that decided it.
                    Settle::Expired => Ok(()),
                    Settle::Decision(d) => {
                        let error = unknown_review(id, d, incoming);
                        self.refuse(incoming, error, d.tenant.clone(), stop).await
                    }
                };
            }
            Err(stopped) => {
                self.release(&held).await;
                return Err(stopped);
            }
        };
        if let Settle::Decision(d) = &how {
            // Another tenant's review is answered exactly like an unknown one: a reviewer
            // learns nothing of other tenants' reviews.
            let tenant = incoming.vouched_tenant.or(d.tenant.as_deref());
            if tenant.is_some_and(|t| t != pending.tenant) {
                self.release(&held).await;
                let error = unknown_review(id, d, incoming);
                return self.refuse(incoming, error, d.tenant.clone(), stop).await;
            }
        }
        if matches!(how, Settle::Expired) && pending.deadline > Utc::now() {
            self.release(&held).await;
            return Ok(());
        }
        // The review settles only what it was opened for: the job's recorded outcome must be
        // this review's request (a job run again after a hand-back may have ended otherwise).
        let mut state = self.job_state(&pending, stop).await;
        for _ in 0..5 {
            if !matches!(state, Ok(JobState::Running)) {
                break;
            }
            // Its request is out but not yet recorded: a moment normally.
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = tokio::time::sleep(JOB_RUNNING_RETRY / 5) => {}
            }
            state = self.job_state(&pending, stop).await;
        }
        match state {
            Ok(JobState::Requested | JobState::Unknown) => {}
            Ok(JobState::Running) => {
                // Its request is not recorded yet: the decision comes again in a moment.
                self.release(&held).await;
                return match how {
                    Settle::Expired => Ok(()),
                    Settle::Decision(_) => Err(Stopped::Deferred(JOB_RUNNING_RETRY)),
                };
            }
            Ok(JobState::Other) => {
                tracing::warn!(review_id = %id, job_id = %pending.job_id, "the job ended without this review (it ran again after a hand-back); dropping the review");
                self.forget_review(id, &pending.tenant).await;
                self.release(&held).await;
                return match how {
                    Settle::Expired => Ok(()),
                    Settle::Decision(d) => {
                        let error = unknown_review(id, d, incoming);
                        self.refuse(incoming, error, d.tenant.clone(), stop).await
                    }
                };
            }
            Err(stopped) => {
                self.release(&held).await;
                return Err(stopped);
            }
        }
        let trace = pending.traceparent.as_deref().or(incoming.trace);
        let at_write = Incoming { trace, ..*incoming };
        let (outcome, reviewed, label) = tokio::select! {
            biased;
            () = stop.cancelled() => {
                self.release(&held).await;
                return Err(Stopped::Now);
            }
            settled = self.settled_outcome(&pending, &how) => settled,
            LeaseLost = self.hold_claim(&held) => return Err(Stopped::Now),
        };
        self.confirm_lease(&held, stop).await?;
        let output_key = format!("{}#reviewed", pending.job_key);
        let written = tokio::select! {
            written = self.write(outcome, &at_write, &output_key, Some(&held), stop) => written,
            LeaseLost = self.hold_claim(&held) => {
                tracing::warn!(review_id = %id, "decision claim lost before the outcome was written; handing it back");
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
        let decided = DecidedReview {
            reviewed: reviewed.clone(),
            fingerprint: match &how {
                Settle::Decision(d) => fingerprint(d),
                Settle::Expired => String::new(),
            },
            tenant: pending.tenant.clone(),
        };
        // Remembered as long as the job's own outcome (from when the review was opened), so a
        // job republished under the same key once that is forgotten opens a fresh review.
        let remember = (pending.created_at
            + chrono::Duration::from_std(self.plan.state.result_ttl)
                .unwrap_or(chrono::Duration::days(1))
            - Utc::now())
        .to_std()
        .unwrap_or_default()
        .max(MIN_DECISION_MEMORY);
        match serde_json::to_vec(&decided) {
            Ok(bytes) => self.record_for(&held, Bytes::from(bytes), remember).await,
            Err(e) => tracing::error!(review_id = %id, error = %e, "could not encode the decision"),
        }
        self.forget_review(id, &pending.tenant).await;
        // A replay of the job (a duplicate publication) now gives its final outcome.
        if let Err(e) = self
            .state
            .replace_outcome(&pending.job_key, written.stored())
            .await
        {
            tracing::warn!(review_id = %id, error = %e, "could not store the final outcome for the job's replays; they give the review request");
        }
        self.metrics
            .review_decisions
            .with_label_values(&[label])
            .inc();
        let (status, reason) = match &written.outcome {
            Outcome::Result(r) => (r.status.as_str(), None),
            Outcome::DeadLetter(dl) => ("dead_letter", Some(dl.reason.as_str())),
        };
        tracing::info!(review_id = %id, job_id = %pending.job_id, tenant = %pending.tenant, pipeline = %pending.pipeline,
            decision = %reviewed.decision, by = %reviewed.by, expired = reviewed.expired, status, reason, traceparent = trace, "review settled");
        Ok(())
    }

    /// What the reviewed job's idempotency key holds now, waiting through a store outage.
    async fn job_state(
        &self,
        pending: &PendingReview,
        stop: &CancellationToken,
    ) -> Result<JobState, Stopped> {
        let mut delay = RETRY_MIN;
        loop {
            match self.state.peek(&pending.job_key).await {
                Ok(Peek::Absent) => return Ok(JobState::Unknown),
                Ok(Peek::Claimed) => return Ok(JobState::Running),
                Ok(Peek::Done(stored)) => {
                    return Ok(match serde_json::from_slice::<Outcome>(&stored) {
                        Ok(Outcome::Result(r))
                            if r.reviewed.is_none()
                                && r.review.as_ref().is_some_and(|q| q.id == pending.id) =>
                        {
                            JobState::Requested
                        }
                        Ok(_) => JobState::Other,
                        Err(_) => JobState::Unknown,
                    })
                }
                Err(e) => {
                    tracing::warn!(review_id = %pending.id, error = %e, "cannot read the reviewed job's outcome; retrying")
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

    /// The review's decision key holds a decision already: the same decision again, a
    /// different one (refused), or the decision of an earlier review of the same job key
    /// (a job republished once its outcome was forgotten), which is dropped.
    async fn decided_before(
        &self,
        id: &str,
        stored: &[u8],
        how: &Settle<'_>,
        incoming: &Incoming<'_>,
        stop: &CancellationToken,
    ) -> Result<Before, Stopped> {
        let decided = serde_json::from_slice::<DecidedReview>(stored).ok();
        if let Some(decided) = &decided {
            if let Some(pending) = self.pending(id, stop).await? {
                if pending.created_at > decided.reviewed.at {
                    if let Err(e) = self.state.forget_outcome(&decision_key(id), stored).await {
                        tracing::warn!(review_id = %id, error = %e, "cannot drop an earlier review's decision");
                        return Err(Stopped::Now);
                    }
                    return Ok(Before::Stale);
                }
            }
        }
        // A worker that stopped between recording the decision and forgetting the review.
        match &decided {
            Some(decided) => self.forget_review(id, &decided.tenant).await,
            None => {
                tracing::error!(review_id = %id, "a review's decision cannot be read");
                if let Ok(Some(pending)) = self.pending(id, stop).await {
                    self.forget_review(id, &pending.tenant).await;
                }
            }
        }
        let Settle::Decision(d) = how else {
            return Ok(Before::Settled);
        };
        // Another tenant learns nothing of this review, not even that it was decided.
        let asking = incoming.vouched_tenant.or(d.tenant.as_deref());
        if decided
            .as_ref()
            .is_some_and(|decided| asking != Some(decided.tenant.as_str()))
        {
            let error = unknown_review(id, d, incoming);
            self.refuse(incoming, error, d.tenant.clone(), stop).await?;
            return Ok(Before::Settled);
        }
        if let Some(decided) = decided
            .as_ref()
            .filter(|decided| decided.fingerprint == fingerprint(d))
        {
            self.metrics
                .review_decisions
                .with_label_values(&["duplicate"])
                .inc();
            tracing::info!(review_id = %id, tenant = %decided.tenant, decision = %decided.reviewed.decision, "the same decision again; its result stands and nothing more is written");
            return Ok(Before::Settled);
        }
        let error = match decided {
            Some(decided) => {
                let r = &decided.reviewed;
                let how = if r.expired {
                    format!("its deadline passed and it took its default ({})", r.decision)
                } else {
                    format!("{} decided `{}`", r.by, r.decision)
                };
                format!(
                    "review `{id}` was already decided: {how} at {}; this different decision (`{}` by {}) is not applied",
                    r.at.to_rfc3339(),
                    d.decision.as_str(),
                    d.reviewer
                )
            }
            None => format!("review `{id}` was already decided, but what was decided cannot be read; this decision is not applied"),
        };
        self.refuse(incoming, error, d.tenant.clone(), stop).await?;
        Ok(Before::Settled)
    }

    /// The pending review `id`, waiting through a store outage; `None` when there is none (or
    /// its record cannot be read, which is logged).
    async fn pending(
        &self,
        id: &str,
        stop: &CancellationToken,
    ) -> Result<Option<PendingReview>, Stopped> {
        let mut delay = RETRY_MIN;
        loop {
            match self.state.review_get(id).await {
                Ok(None) => return Ok(None),
                Ok(Some(bytes)) => {
                    return Ok(match serde_json::from_slice(&bytes) {
                        Ok(pending) => Some(pending),
                        Err(e) => {
                            // Dropped, so it does not block the expiry of the others.
                            tracing::error!(review_id = %id, error = %e, "a pending review's record cannot be read; dropping it");
                            let tenant = serde_json::from_slice::<serde_json::Value>(&bytes)
                                .ok()
                                .and_then(|v| v.get("tenant")?.as_str().map(str::to_owned))
                                .unwrap_or_default();
                            self.forget_review(id, &tenant).await;
                            None
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(review_id = %id, error = %e, "cannot read the pending review; retrying")
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

    /// Drops the review from the pending ones; a failure leaves it to the expiry pass, which
    /// finds its decision and drops it then.
    pub(super) async fn forget_review(&self, id: &str, tenant: &str) {
        if let Err(e) = self.state.review_forget(id, tenant).await {
            tracing::warn!(review_id = %id, error = %e, "could not drop the decided review from the pending ones; the expiry pass will");
        }
    }

    /// A `decision_refused` dead letter carrying the decision, for `tenant` (or the one the
    /// transport vouches for).
    async fn refuse(
        &self,
        incoming: &Incoming<'_>,
        error: String,
        tenant: Option<String>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let tenant = tenant.and_then(|t| TenantId::parse(&t).ok().map(|t| t.to_string()));
        let who = Who::Known {
            job_id: None,
            tenant,
        };
        let dl = incoming.dead_letter(DeadLetterReason::DecisionRefused, error, who, 0);
        self.write(
            Outcome::DeadLetter(dl),
            incoming,
            &incoming.position(),
            None,
            stop,
        )
        .await?;
        self.metrics
            .review_decisions
            .with_label_values(&["refused"])
            .inc();
        self.metrics
            .dead_letters
            .with_label_values(&[DeadLetterReason::DecisionRefused.as_str()])
            .inc();
        tracing::warn!(source = ?incoming.source, "review decision refused");
        Ok(())
    }

    /// What the review ends as, what the result records of it, and the metrics label.
    async fn settled_outcome(
        &self,
        pending: &PendingReview,
        how: &Settle<'_>,
    ) -> (Outcome, Reviewed, &'static str) {
        let now = Utc::now();
        let (verdict, output, reviewed, label) = match how {
            Settle::Decision(d) => {
                let reviewed = Reviewed {
                    review_id: pending.id.clone(),
                    decision: d.decision.as_str().to_owned(),
                    by: d.reviewer.clone(),
                    at: now,
                    reason: d.reason.clone(),
                    expired: false,
                };
                (d.decision, d.output.clone(), reviewed, d.decision.as_str())
            }
            Settle::Expired => {
                let reviewed = Reviewed {
                    review_id: pending.id.clone(),
                    decision: pending.on_timeout.as_str().to_owned(),
                    by: "timeout".into(),
                    at: now,
                    reason: Some(format!(
                        "no decision by the deadline {}",
                        pending.deadline.to_rfc3339()
                    )),
                    expired: true,
                };
                match &pending.on_timeout {
                    OnTimeout::Approve => (Verdict::Approve, None, reviewed, "expired_approve"),
                    OnTimeout::Reject => (Verdict::Reject, None, reviewed, "expired_reject"),
                    OnTimeout::Rerun { model } => {
                        let outcome = self.rerun(pending, model, &reviewed).await;
                        return (outcome, reviewed, "expired_rerun");
                    }
                }
            }
        };
        let outcome = match verdict {
            Verdict::Approve if pending.held.is_some() => self.resume(pending, &reviewed).await,
            Verdict::Approve => Outcome::Result(final_result(pending, None, &reviewed)),
            Verdict::Edit => Outcome::Result(final_result(pending, output, &reviewed)),
            Verdict::Reject => {
                let error = if reviewed.expired {
                    format!(
                        "review `{}` got no decision by its deadline {} and the pipeline's review.on_timeout is reject; republish the job with a new idempotency_key to run it again",
                        pending.id,
                        pending.deadline.to_rfc3339()
                    )
                } else {
                    format!(
                        "rejected in review `{}` by {}: {}",
                        pending.id,
                        reviewed.by,
                        reviewed.reason.as_deref().unwrap_or("no reason given")
                    )
                };
                Outcome::DeadLetter(rejected(
                    pending,
                    DeadLetterReason::ReviewRejected,
                    error,
                    0,
                ))
            }
        };
        (outcome, reviewed, label)
    }

    /// The timed-out review's job run again with every model-calling step on `model`, and no
    /// review trigger (nobody is there to decide); its answer is the result.
    async fn rerun(&self, pending: &PendingReview, model: &str, reviewed: &Reviewed) -> Outcome {
        let (job, pipeline) = match self.job_of(pending, &format!("run it again on `{model}`")) {
            Ok(found) => found,
            Err(dl) => return Outcome::DeadLetter(*dl),
        };
        let pipeline = on_model(&pipeline, model);
        let run = self.runner.run(&job, &pipeline, None).await;
        self.ran_again(pending, reviewed, run, &format!("ran again on `{model}`"))
    }

    /// A job approved before generation (`review.before_generate`), resumed from the steps it
    /// was held after.
    async fn resume(&self, pending: &PendingReview, reviewed: &Reviewed) -> Outcome {
        let (job, pipeline) = match self.job_of(pending, "resume after approval") {
            Ok(found) => found,
            Err(dl) => return Outcome::DeadLetter(*dl),
        };
        let held = pending.held.clone().unwrap_or_default();
        let run = self
            .runner
            .resume(&job, &pipeline, held, &pending.held_steps)
            .await;
        self.ran_again(pending, reviewed, run, "was approved and generated")
    }

    /// The reviewed job and its pipeline, for running it again (`what` names why).
    fn job_of(
        &self,
        pending: &PendingReview,
        what: &str,
    ) -> Result<(crate::wire::Job, std::sync::Arc<PipelinePlan>), Box<DeadLetter>> {
        let job = decode_job(
            pending.payload.as_bytes(),
            self.plan.limits.max_job_bytes,
            pending.proposed.received_at,
        )
        .map_err(|e| {
            let error = format!("review `{}`: could not {what}: the job's payload no longer decodes ({e}); republish it", pending.id);
            Box::new(rejected(pending, DeadLetterReason::Internal, error, 0))
        })?;
        let pipeline = self.plan.pipelines.get(&pending.pipeline).cloned().ok_or_else(|| {
            let error = format!("review `{}`: could not {what}: pipeline `{}` is no longer configured; republish the job", pending.id, pending.pipeline);
            Box::new(rejected(pending, DeadLetterReason::Internal, error, 0))
        })?;
        Ok((job, pipeline))
    }

    /// The outcome of running the reviewed job again (`how`: what happened to it).
    fn ran_again(
        &self,
        pending: &PendingReview,
        reviewed: &Reviewed,
        run: Result<crate::pipeline::RunOutput, crate::pipeline::RunFailure>,
        how: &str,
    ) -> Outcome {
        match run {
            Ok(out) if out.status == ResultStatus::Review => {
                let error = format!("after review `{}` the job {how}, and that answer needed review too ({}), so it is not published unreviewed", pending.id, out.review_reason.unwrap_or_default());
                Outcome::DeadLetter(rejected(
                    pending,
                    DeadLetterReason::ReviewRejected,
                    error,
                    0,
                ))
            }
            Ok(out) => {
                let mut usage = pending.proposed.usage;
                out.steps.iter().for_each(|s| usage.add(s));
                let mut result = final_result(pending, Some(out.output), reviewed);
                result.status = out.status;
                result.route = out.route;
                let mut steps = pending.proposed.steps.clone();
                steps.extend(out.steps);
                result.steps = steps;
                result.usage = usage;
                Outcome::Result(result)
            }
            Err(failure) => {
                let error = format!(
                    "after review `{}` the job {how}, which failed: {}",
                    pending.id, failure.error
                );
                Outcome::DeadLetter(rejected(pending, failure.reason, error, failure.attempts))
            }
        }
    }
}

/// Why a decision for a review that is unknown (or another tenant's: answered the same) is
/// refused.
fn unknown_review(id: &str, d: &DecisionMessage, incoming: &Incoming<'_>) -> String {
    format!("there is no pending review `{id}`{}: it was never sent for review, or it was decided or expired and its decision is no longer remembered (state.result_ttl)", tenant_note(d, incoming))
}

/// The note on which tenant a refused decision was read for.
fn tenant_note(d: &DecisionMessage, incoming: &Incoming<'_>) -> String {
    match incoming.vouched_tenant.or(d.tenant.as_deref()) {
        Some(t) => format!(" for tenant `{t}`"),
        None => String::new(),
    }
}

/// The reviewed job's final result: the proposal with `output` (or its own), decided.
fn final_result(
    pending: &PendingReview,
    output: Option<serde_json::Value>,
    reviewed: &Reviewed,
) -> JobResult {
    let mut result = pending.proposed.clone();
    if let Some(output) = output {
        result.output = output;
    }
    let completed_at = Utc::now();
    result.status = ResultStatus::Ok;
    result.review = None;
    result.reviewed = Some(Box::new(reviewed.clone()));
    result.duplicate = false;
    result.completed_at = completed_at;
    result.latency_ms = u64::try_from(
        (completed_at - result.received_at)
            .num_milliseconds()
            .max(0),
    )
    .unwrap_or(0);
    result
}

/// A dead letter of the reviewed job, carrying its original payload so it can be republished.
fn rejected(
    pending: &PendingReview,
    reason: DeadLetterReason,
    error: String,
    attempts: u32,
) -> DeadLetter {
    let mut dl = DeadLetter::new(
        reason,
        error,
        pending.payload.as_bytes(),
        pending.source.clone(),
    );
    dl.job_id = Some(pending.job_id.clone());
    dl.tenant = Some(pending.tenant.clone());
    dl.attempts = attempts;
    dl
}

/// `pipeline` with every model-calling step on `model`, no experiment and no review trigger.
fn on_model(pipeline: &PipelinePlan, model: &str) -> PipelinePlan {
    let mut rerun = pipeline.clone();
    rerun.review = ReviewPlan::default();
    for step in &mut rerun.steps {
        match &mut step.kind {
            StepKindPlan::Generate(g) => {
                g.model = ModelChoice::Fixed(model.to_owned());
                g.experiment = None;
            }
            StepKindPlan::Map(m) => m.model = model.to_owned(),
            StepKindPlan::Reduce(r) => r.model = model.to_owned(),
            StepKindPlan::Refine(r) => r.model = model.to_owned(),
            StepKindPlan::Route(r) => r.review_below_confidence = None,
            _ => {}
        }
    }
    rerun
}
