//! Runs one job through its pipeline's DAG: a step starts when every step it needs has
//! finished, on its kind's worker pool; the first failing step fails the job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::step::{
    index, RunFailure, RunShared, StepContext, StepKind as _, StepOutput, StepResult,
};
use crate::admission::JobBudget;
use crate::calls::Calls;
use crate::config::{
    GuardAction, GuardrailsPlan, OutputPlan, PipelinePlan, PoolSizes, StepKindPlan,
};
use crate::expr::{Path, Root};
use crate::guardrails::{GuardrailSet, Verdict};
use crate::telemetry::metrics::Metrics;
use crate::wire::{DeadLetterReason, Job, ResultStatus, RouteInfo, StepRecord};

/// One semaphore per step kind: the most steps of that kind running at once.
#[derive(Clone)]
pub struct Pools {
    pub classify: Arc<Semaphore>,
    pub route: Arc<Semaphore>,
    pub generate: Arc<Semaphore>,
}

impl Pools {
    pub fn new(sizes: &PoolSizes) -> Self {
        Self {
            classify: Arc::new(Semaphore::new(sizes.classify)),
            route: Arc::new(Semaphore::new(sizes.route)),
            generate: Arc::new(Semaphore::new(sizes.generate)),
        }
    }

    /// The pool a step of `kind` holds a permit of while it runs; `None` for kinds that run
    /// locally and cheaply (template, split) or take a permit per call (see [`Self::per_call`]).
    fn for_kind(&self, kind: &StepKindPlan) -> Option<&Semaphore> {
        match kind {
            StepKindPlan::Classify(_) => Some(&self.classify),
            StepKindPlan::Route(_) => Some(&self.route),
            StepKindPlan::Generate(_) => Some(&self.generate),
            _ => None,
        }
    }

    /// The pool each call of a many-call kind (map, reduce, refine) takes a permit from, so a
    /// map over 50 chunks shares the generate pool with every other job instead of holding one
    /// permit (or deadlocking on several).
    fn per_call(&self, kind: &StepKindPlan) -> Option<&Semaphore> {
        match kind {
            StepKindPlan::Map(_) | StepKindPlan::Reduce(_) | StepKindPlan::Refine(_) => {
                Some(&self.generate)
            }
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct RunOutput {
    pub status: ResultStatus,
    pub output: Value,
    pub route: RouteInfo,
    pub steps: Vec<StepRecord>,
    /// Why it goes to review, when it does.
    pub review_reason: Option<String>,
    /// The input as the pipeline saw it (redacted by the guardrails), when it goes to review.
    pub review_input: Option<Map<String, Value>>,
    /// Held for review before generation (`review.before_generate`): every step's output so
    /// far, to resume from once approved.
    pub held: Option<Vec<Option<StepOutput>>>,
}

pub struct Runner {
    calls: Arc<Calls>,
    pools: Pools,
    metrics: Arc<Metrics>,
}

impl Runner {
    pub fn new(calls: Arc<Calls>, pools: Pools, metrics: Arc<Metrics>) -> Self {
        for (name, pool) in [
            ("classify", &pools.classify),
            ("route", &pools.route),
            ("generate", &pools.generate),
        ] {
            metrics.watch_pool(name, pool.clone());
        }
        Self {
            calls,
            pools,
            metrics,
        }
    }

    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// Runs `pipeline` for `job`: the input guardrails, every step whose `when` holds (a step
    /// starts when every step it needs has finished or was skipped), the job's output and the
    /// output guardrails. Calls draw on `job_budget` when the job has a budget reservation. A
    /// failing step fails the job, unless it (or the pipeline) has a static `on_failure` answer.
    pub async fn run(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        job_budget: Option<&Arc<JobBudget>>,
    ) -> Result<RunOutput, RunFailure> {
        self.run_from(job, pipeline, job_budget, None, None).await
    }

    /// [`Self::run`] in a provider batch round: calls are answered from `round` or collected
    /// in it for the next batch (the run then fails, and the caller parks the job).
    pub async fn run_batched(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        job_budget: Option<&Arc<JobBudget>>,
        round: &crate::calls::batch::BatchRound,
    ) -> Result<RunOutput, RunFailure> {
        self.run_from(job, pipeline, job_budget, None, Some(round))
            .await
    }

    /// Resumes a job held for review before generation (`review.before_generate`) from the
    /// step outputs it was held with; no review trigger applies again.
    pub async fn resume(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        held: Vec<Option<StepOutput>>,
        step_names: &[String],
    ) -> Result<RunOutput, RunFailure> {
        let now: Vec<&str> = pipeline.steps.iter().map(|s| s.name.as_str()).collect();
        if held.len() != pipeline.steps.len() || now != step_names {
            return Err(RunFailure {
                reason: DeadLetterReason::Internal,
                error: format!("pipeline `{}` changed while the job waited for review before generation (steps {} then, {} now); republish the job to run it", pipeline.name, step_names.join(", "), now.join(", ")),
                attempts: 0,
            });
        }
        self.run_from(job, pipeline, None, Some(held), None).await
    }

    async fn run_from(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        job_budget: Option<&Arc<JobBudget>>,
        resumed: Option<Vec<Option<StepOutput>>>,
        batch: Option<&crate::calls::batch::BatchRound>,
    ) -> Result<RunOutput, RunFailure> {
        let shared = RunShared {
            batch,
            job_budget,
            ..RunShared::default()
        };
        let shared = &shared;
        let guard = pipeline.guardrails.clone();
        let mut guard_record = guard_record();
        let redacted_input;
        let input = match &guard {
            None => &job.input,
            Some(g) => {
                let (checked, verdict) = check_input(g.clone(), job.input.clone()).await;
                self.metrics.guardrail(&pipeline.name, "input", &verdict);
                match verdict {
                    Verdict::Pass { redacted } => count_redactions(&mut guard_record, &redacted),
                    Verdict::Blocked { reason, .. } => {
                        let why = format!("input guardrail: {reason}");
                        // A person may look at it: redacted as it would have been.
                        let mut shown = job.input.clone();
                        g.set.redact_input(&mut shown);
                        return guard_stop(
                            g.on_block,
                            why,
                            vec![guard_record],
                            Value::Null,
                            Some(shown),
                        );
                    }
                    Verdict::Error { reason } => {
                        let why = format!("input guardrail could not check the job, so it was not passed: {reason}");
                        // It could not be scanned: not even a reviewer gets it from here.
                        return guard_stop(g.on_error, why, vec![guard_record], Value::Null, None);
                    }
                }
                redacted_input = checked;
                &redacted_input
            }
        };
        let hold = pipeline.review.before_generate && resumed.is_none();
        // Review was asked (or not) before generation: not again after it. A job that had
        // nothing to hold (no generation step ran) is reviewed after, like any other.
        let mut before_generate = resumed.is_some();
        let seeded = resumed.unwrap_or_else(|| vec![None; pipeline.steps.len()]);
        let (mut outputs, mut records, mut failure, held) = self
            .run_steps(job, input, pipeline, seeded, hold, shared)
            .await;
        if held && failure.is_none() {
            before_generate = true;
            let (route, route_review) = route_info(&outputs);
            if let Some(why) = hold_reason(pipeline, input, &outputs, route_review) {
                if let Some(g) = &guard {
                    records.iter_mut().for_each(|r| redact_record(&g.set, r));
                    records.insert(0, guard_record);
                }
                return Ok(RunOutput {
                    status: ResultStatus::Review,
                    output: Value::Null,
                    route,
                    steps: records,
                    review_reason: Some(why),
                    review_input: Some(input.clone()),
                    held: Some(outputs),
                });
            }
            let (rest, more, failed, _) = self
                .run_steps(job, input, pipeline, outputs, false, shared)
                .await;
            (outputs, failure) = (rest, failed);
            records.extend(more);
        }
        let (route, review) = route_info(&outputs);
        // Under before_generate, review was asked (or not) before generation: not again.
        let review = review.filter(|_| !before_generate);
        for output in outputs.iter().flatten() {
            if let StepOutput::Generated {
                variant: Some((experiment, variant)),
                ..
            } = output
            {
                self.metrics
                    .experiment_assignments
                    .with_label_values(&[pipeline.name.as_str(), experiment, variant])
                    .inc();
            }
        }
        let finished = match failure {
            None => {
                self.job_output(job, input, pipeline, &outputs, shared)
                    .await
            }
            Some(failure) => Err(failure),
        };
        let (mut output, mut status) = match finished {
            Ok(output) if review.is_some() => (output, ResultStatus::Review),
            Ok(output) if outputs.iter().flatten().any(StepOutput::degraded) => {
                (output, ResultStatus::Degraded)
            }
            Ok(output) => (output, ResultStatus::Ok),
            // The static answer stands in; the failure stays in the failing step's record.
            Err(failure) => match &pipeline.on_failure {
                Some(answer) if stands_in(&failure) => (answer.clone(), ResultStatus::Degraded),
                _ => return Err(failure),
            },
        };
        let mut review_reason = review;
        if status != ResultStatus::Review && !before_generate {
            review_reason = review_trigger(pipeline, input, &outputs, &records);
            if review_reason.is_some() {
                status = ResultStatus::Review;
            }
        }
        if let Some(g) = &guard {
            // What travels with the output (errors, feedback; step outputs already were) is
            // redacted like it.
            records.iter_mut().for_each(|r| redact_record(&g.set, r));
            let verdict = g.set.check_output(&mut output, &guard_tokens);
            self.metrics.guardrail(&pipeline.name, "output", &verdict);
            match verdict {
                Verdict::Pass { redacted } => count_redactions(&mut guard_record, &redacted),
                Verdict::Blocked { reason, .. } => {
                    // A person may look at it: redacted, as it would have left.
                    count_redactions(&mut guard_record, &g.set.redact_output(&mut output));
                    records.insert(0, guard_record);
                    let why = format!("output guardrail: {reason}");
                    return guard_stop(g.on_block, why, records, output, Some(input.clone()));
                }
                Verdict::Error { reason } => {
                    // It could not be scanned, so it does not leave, not even for review, nor
                    // in the records of the steps that made it.
                    records.iter_mut().for_each(|r| r.output = None);
                    records.insert(0, guard_record);
                    let why = format!("output guardrail could not check the answer, so it was not passed: {reason}");
                    return guard_stop(g.on_error, why, records, Value::Null, Some(input.clone()));
                }
            }
            records.insert(0, guard_record);
        }
        Ok(RunOutput {
            review_input: (status == ResultStatus::Review).then(|| input.clone()),
            status,
            output,
            route,
            steps: records,
            review_reason,
            held: None,
        })
        .inspect(|out| {
            if out.status == ResultStatus::Ok {
                // Only a good result's answers: not one a guardrail blocked, a reviewer has to
                // see, or a fallback gave.
                self.pending_semantic(shared);
            }
        })
    }

    /// Stores the run's semantic-cache answers, in the background: the result does not wait
    /// for the cache.
    fn pending_semantic(&self, shared: &RunShared<'_>) {
        let inserts = std::mem::take(
            &mut *shared
                .semantic_inserts
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if inserts.is_empty() {
            return;
        }
        let calls = self.calls.clone();
        self.calls.tasks().spawn(async move {
            if let Some(cache) = calls.semantic_cache() {
                for i in inserts {
                    cache
                        .insert(&i.index, &i.vector, &i.response, &i.plan)
                        .await;
                }
            }
        });
    }

    /// The DAG from the `seeded` outputs (steps that already ran): each step's output (`None`
    /// for steps that never started because an earlier one failed, or were held), the records
    /// of the steps that finished here, the failure that stopped it, and whether a
    /// model-calling step was held back (`hold`: the steps that spend on generation wait).
    async fn run_steps(
        &self,
        job: &Job,
        input: &Map<String, Value>,
        pipeline: &PipelinePlan,
        seeded: Vec<Option<StepOutput>>,
        hold: bool,
        shared: &RunShared<'_>,
    ) -> (
        Vec<Option<StepOutput>>,
        Vec<StepRecord>,
        Option<RunFailure>,
        bool,
    ) {
        let n = pipeline.steps.len();
        let mut outputs = seeded;
        outputs.resize(n, None);
        let mut records: Vec<Option<StepRecord>> = vec![None; n];
        let mut started: Vec<bool> = outputs.iter().map(Option::is_some).collect();
        let mut held = false;
        let mut running = FuturesUnordered::new();
        let mut failure = None;
        loop {
            for (i, step) in pipeline.steps.iter().enumerate() {
                if started[i] || !step.needs.iter().all(|&j| outputs[j].is_some()) {
                    continue;
                }
                started[i] = true;
                // A step that works on a skipped step's output (a route's classify, a map's
                // split, ...) has nothing to work on: it is skipped too.
                let source_skipped = step
                    .kind
                    .works_on()
                    .is_some_and(|j| matches!(outputs[j], Some(StepOutput::Skipped)));
                let holds = || {
                    step.when.as_ref().is_none_or(|when| {
                        when.eval(&|path| lookup(pipeline, input, &outputs, path))
                    })
                };
                {
                    if source_skipped || !holds() {
                        outputs[i] = Some(StepOutput::Skipped);
                        records[i] = Some(StepRecord {
                            name: step.name.clone(),
                            kind: step.kind.name().to_owned(),
                            skipped: true,
                            ..StepRecord::default()
                        });
                        continue;
                    }
                }
                if hold && step.kind.generates() {
                    // Started only once a reviewer approves (or the review is not asked).
                    started[i] = false;
                    held = true;
                    continue;
                }
                let inputs = step
                    .needs
                    .iter()
                    .flat_map(|&j| ancestors_with_outputs(pipeline, j, &outputs))
                    .collect();
                let ctx = StepContext {
                    job,
                    step,
                    calls: &self.calls,
                    inputs,
                    input,
                    pipeline,
                    throttled_ms: Default::default(),
                    job_budget: shared.job_budget,
                    call_pool: self.pools.per_call(&step.kind),
                    spent: Default::default(),
                    shared,
                };
                let pool = self.pools.for_kind(&step.kind);
                // DEBUG: the per-call lines it frames are DEBUG too (a span per step cost a busy
                // replica ~5% of its CPU per job); lines at INFO and above carry the job's span.
                let span = tracing::debug_span!("step", step = %step.name);
                let metrics = &self.metrics;
                // Boxed before it is wrapped and queued: only a pointer moves after that.
                running.push(
                    Box::pin(async move {
                        let started = Instant::now();
                        let result = match pool.map(Semaphore::acquire) {
                            None => run_step(&ctx).await,
                            Some(acquire) => match acquire.await {
                                Ok(_permit) => run_step(&ctx).await,
                                Err(_) => Err(RunFailure {
                                    reason: DeadLetterReason::Internal,
                                    error: "worker pool closed during shutdown".into(),
                                    attempts: 0,
                                }),
                            },
                        };
                        metrics
                            .step_duration
                            .with_label_values(&[ctx.step.name.as_str()])
                            .observe(started.elapsed().as_secs_f64());
                        let failed = result.as_ref().err().map(|f| ctx.failed_record(started, f));
                        (i, result, failed)
                    })
                    .instrument(span),
                );
            }
            let Some((i, result, failed)) = running.next().await else {
                break;
            };
            let step = &pipeline.steps[i];
            let (output, mut record) = match result {
                Ok(done) => done,
                Err(f) => {
                    let record = failed.unwrap_or_default();
                    match &step.on_failure {
                        Some(answer) if stands_in(&f) => {
                            tracing::info!(step = %step.name, reason = f.reason.as_str(), "step failed; its on_failure answer stands in");
                            let output = StepOutput::Value {
                                value: answer.clone(),
                                fields: Map::new(),
                                degraded: true,
                            };
                            (output, record)
                        }
                        _ => {
                            records[i] = Some(record);
                            failure = Some(f);
                            break;
                        }
                    }
                }
            };
            if pipeline.record_output_chars > 0 {
                let mut value = output.output();
                // Redacted whole, before the cut: a cut PII value would no longer be found.
                if let Some(g) = &pipeline.guardrails {
                    g.set.redact_output(&mut value);
                }
                record.output = Some(bounded(value, pipeline.record_output_chars));
            }
            outputs[i] = Some(output);
            records[i] = Some(record);
        }
        (
            outputs,
            records.into_iter().flatten().collect(),
            failure,
            held,
        )
    }

    /// The job's output: a named step's, an assembled one, or the last step that ran.
    async fn job_output(
        &self,
        job: &Job,
        input: &Map<String, Value>,
        pipeline: &PipelinePlan,
        outputs: &[Option<StepOutput>],
        shared: &RunShared<'_>,
    ) -> Result<Value, RunFailure> {
        match &pipeline.output {
            OutputPlan::LastRun => Ok(outputs
                .iter()
                .rev()
                .flatten()
                .find(|o| !matches!(o, StepOutput::Skipped))
                .map(StepOutput::output)
                .unwrap_or(Value::Null)),
            OutputPlan::Step(i) => Ok(outputs
                .get(*i)
                .and_then(Option::as_ref)
                .map(StepOutput::output)
                .unwrap_or(Value::Null)),
            OutputPlan::Assembled(step) => {
                let ctx = StepContext {
                    job,
                    step,
                    calls: &self.calls,
                    inputs: outputs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, o)| o.clone().map(|o| (i, o)))
                        .collect(),
                    input,
                    pipeline,
                    throttled_ms: Default::default(),
                    job_budget: None,
                    call_pool: None,
                    spent: Default::default(),
                    shared,
                };
                match &step.kind {
                    StepKindPlan::Template(assemble) => super::steps::assemble(&ctx, assemble),
                    _ => Ok(Value::Null),
                }
            }
        }
    }
}

/// Failures a static `on_failure` answer may stand in for: the models could not give a usable
/// answer. Not a bad job, a deadline, a budget or a guardrail: those must stay visible.
fn stands_in(failure: &RunFailure) -> bool {
    matches!(
        failure.reason,
        DeadLetterReason::ProviderFailed | DeadLetterReason::OutputInvalid
    )
}

/// Tokens a guardrail's `max_tokens` counts: GPT-4o's tokenizer (o200k), a fair measure for
/// any modern model.
fn guard_tokens(text: &str) -> u64 {
    crate::tokens::count("gpt-4o", text)
}

/// The input check, off the async workers: counting tokens and scanning a large input is
/// CPU work (bounded by the scan limits).
async fn check_input(
    guard: Arc<GuardrailsPlan>,
    mut input: Map<String, Value>,
) -> (Map<String, Value>, Verdict) {
    let checked = tokio::task::spawn_blocking(move || {
        let verdict = guard.set.check_input(&mut input, &guard_tokens);
        (input, verdict)
    })
    .await;
    match checked {
        Ok(checked) => checked,
        // The check did not finish (a panic in it): fail closed.
        Err(e) => (
            Map::new(),
            Verdict::Error {
                reason: format!("the check stopped: {e}"),
            },
        ),
    }
}

/// A step record redacted as the output side redacts the output.
/// (Its `output` was redacted when the step finished, before it was cut: not scanned again.)
fn redact_record(set: &GuardrailSet, record: &mut StepRecord) {
    let redact_text = |text: &mut String| {
        let mut value = Value::String(std::mem::take(text));
        set.redact_output(&mut value);
        if let Value::String(redacted) = value {
            *text = redacted;
        }
    };
    if let Some(error) = &mut record.error {
        redact_text(error);
    }
    record
        .rounds
        .iter_mut()
        .for_each(|round| redact_text(&mut round.feedback));
}

fn guard_record() -> StepRecord {
    StepRecord {
        name: "guardrails".into(),
        kind: "guardrail".into(),
        ..StepRecord::default()
    }
}

fn count_redactions(record: &mut StepRecord, redacted: &BTreeMap<&'static str, u32>) {
    for (kind, n) in redacted {
        *record.redacted.entry((*kind).to_owned()).or_default() += n;
    }
}

/// A blocked job (or one whose check failed): a `guardrail_blocked` dead letter, or a review
/// request whose record says why.
fn guard_stop(
    action: GuardAction,
    why: String,
    mut steps: Vec<StepRecord>,
    output: Value,
    review_input: Option<Map<String, Value>>,
) -> Result<RunOutput, RunFailure> {
    match action {
        GuardAction::DeadLetter => Err(RunFailure {
            reason: DeadLetterReason::GuardrailBlocked,
            error: why,
            attempts: 0,
        }),
        GuardAction::Review => {
            if let Some(record) = steps.iter_mut().find(|r| r.kind == "guardrail") {
                record.error = Some(why.clone());
            }
            Ok(RunOutput {
                status: ResultStatus::Review,
                output,
                route: RouteInfo::default(),
                steps,
                review_reason: Some(why),
                review_input,
                held: None,
            })
        }
    }
}

/// The value a `when` path names: the job's input or a finished step's output.
fn lookup(
    pipeline: &PipelinePlan,
    input: &Map<String, Value>,
    outputs: &[Option<StepOutput>],
    path: &Path,
) -> Option<Value> {
    match &path.root {
        Root::Input => {
            let (first, rest) = path.fields.split_first()?;
            let head = input.get(first)?.clone();
            Some(rest.iter().fold(head, |v, key| index(&v, key)))
        }
        Root::Step(name) => {
            let i = pipeline.steps.iter().position(|s| &s.name == name)?;
            outputs.get(i)?.as_ref().map(|o| o.at(&path.fields))
        }
    }
}

/// `value` as a step record keeps it: whole when its JSON is at most `max` characters, else its
/// first `max` characters as a string with a note of how much was cut.
fn bounded(value: Value, max: usize) -> Value {
    let text = match &value {
        Value::String(s) if s.chars().count() <= max => return value,
        Value::String(s) => s.clone(),
        // Counted as it is written, without keeping the text: most outputs fit.
        other if serde_json::to_writer(CharBound { left: max }, other).is_ok() => return value,
        other => {
            let json = other.to_string();
            if json.chars().count() <= max {
                return value;
            }
            json
        }
    };
    let total = text.chars().count();
    let kept: String = text.chars().take(max).collect();
    Value::String(format!("{kept}... [{} more characters]", total - max))
}

/// A writer that takes at most `left` characters of UTF-8 and fails on the next one.
struct CharBound {
    left: usize,
}

impl std::io::Write for CharBound {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A character starts at every byte that is not a continuation byte.
        let chars = buf.iter().filter(|&&b| b & 0xC0 != 0x80).count();
        self.left = self
            .left
            .checked_sub(chars)
            .ok_or(std::io::ErrorKind::WriteZero)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `index` and every step it transitively depends on, paired with their outputs.
fn ancestors_with_outputs(
    pipeline: &PipelinePlan,
    index: usize,
    outputs: &[Option<StepOutput>],
) -> Vec<(usize, StepOutput)> {
    let mut stack = vec![index];
    let mut seen = vec![false; pipeline.steps.len()];
    let mut found = Vec::new();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        if let Some(output) = &outputs[i] {
            found.push((i, output.clone()));
        }
        stack.extend(pipeline.steps[i].needs.iter().copied());
    }
    found
}

async fn run_step(ctx: &StepContext<'_>) -> StepResult {
    if let Some(deadline) = ctx.job.deadline {
        if deadline <= Utc::now() {
            return Err(RunFailure {
                reason: DeadLetterReason::DeadlineExceeded,
                error: format!(
                    "deadline {} passed before step `{}`",
                    deadline.to_rfc3339(),
                    ctx.step.name
                ),
                attempts: 0,
            });
        }
    }
    match &ctx.step.kind {
        StepKindPlan::Classify(plan) => plan.run(ctx).await,
        StepKindPlan::Route(plan) => plan.run(ctx).await,
        StepKindPlan::Generate(plan) => plan.run(ctx).await,
        StepKindPlan::Template(plan) => plan.run(ctx).await,
        StepKindPlan::Split(plan) => plan.run(ctx).await,
        StepKindPlan::Map(plan) => plan.run(ctx).await,
        StepKindPlan::Reduce(plan) => plan.run(ctx).await,
        StepKindPlan::Refine(plan) => plan.run(ctx).await,
    }
}

/// Why a job held before generation (`review.before_generate`) waits for a reviewer: its
/// route asked for review, or `review.when` holds (every job, without a `when`).
fn hold_reason(
    pipeline: &PipelinePlan,
    input: &Map<String, Value>,
    outputs: &[Option<StepOutput>],
    route_review: Option<String>,
) -> Option<String> {
    if let Some(why) = route_review {
        return Some(format!("before generation: {why}"));
    }
    match &pipeline.review.when {
        None => Some("review.before_generate: every job is approved before generation".into()),
        Some((when, text)) => when
            .eval(&|path| lookup(pipeline, input, outputs, path))
            .then(|| format!("before generation: review.when holds: {text}")),
    }
}

/// The pipeline's own review triggers (`review.when`, `review.cost_above_usd`): why the job
/// goes to review, if it does.
fn review_trigger(
    pipeline: &PipelinePlan,
    input: &Map<String, Value>,
    outputs: &[Option<StepOutput>],
    records: &[StepRecord],
) -> Option<String> {
    if let Some((when, text)) = &pipeline.review.when {
        if when.eval(&|path| lookup(pipeline, input, outputs, path)) {
            return Some(format!("review.when holds: {text}"));
        }
    }
    let cost: f64 = records.iter().map(|r| r.cost_usd).sum();
    match pipeline.review.cost_above_usd {
        Some(limit) if cost > limit => Some(format!(
            "the job cost ${cost:.6}, above review.cost_above_usd (${limit})"
        )),
        _ => None,
    }
}

/// The job's route (category, confidence, model) from its classify and route steps, and
/// why a route asked for review, if it did.
fn route_info(outputs: &[Option<StepOutput>]) -> (RouteInfo, Option<String>) {
    let mut route = RouteInfo::default();
    let mut review = None;
    for output in outputs.iter().flatten() {
        match output {
            StepOutput::Classified {
                category,
                confidence,
                ..
            } => {
                route.category = Some(category.clone());
                route.confidence = Some(*confidence);
            }
            StepOutput::Routed {
                category,
                confidence,
                model,
                review: r,
                ..
            } => {
                route.category = Some(category.clone());
                route.confidence = Some(*confidence);
                route.model = (!model.is_empty()).then(|| model.clone());
                if *r {
                    review = Some(format!(
                        "the classification of `{category}` has confidence {confidence:.2}, below the route's review_below_confidence"
                    ));
                }
            }
            StepOutput::Generated { model, variant, .. } => {
                route.model.get_or_insert_with(|| model.clone());
                if let Some((_, variant)) = variant {
                    route.variant = Some(variant.clone());
                }
            }
            StepOutput::Value { .. } | StepOutput::Skipped => {}
        }
    }
    (route, review)
}

#[cfg(test)]
mod tests {
    use super::bounded;
    use serde_json::json;

    #[test]
    fn a_recorded_output_is_cut_at_its_character_bound() {
        let object = json!({"category": "billing", "confidence": 0.9});
        let text = object.to_string();
        let n = text.chars().count();
        assert_eq!(
            bounded(object.clone(), n),
            object,
            "exactly at the bound it is kept"
        );
        let cut = bounded(object.clone(), n - 1);
        assert_eq!(
            cut,
            json!(format!(
                "{}... [1 more characters]",
                text.chars().take(n - 1).collect::<String>()
            ))
        );
        // Characters, not bytes: 3 two-byte letters fit a bound of 3 as a string and, quoted
        // as JSON, a bound of 5.
        assert_eq!(bounded(json!("äöü"), 3), json!("äöü"));
        assert_eq!(bounded(json!(["äöü"]), 7), json!(["äöü"]));
        assert_eq!(
            bounded(json!(["äöü"]), 6),
            json!("[\"äöü\"... [1 more characters]")
        );
    }
}
