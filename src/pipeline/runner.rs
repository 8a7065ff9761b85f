//! Runs one job through its pipeline's DAG.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::StepOutput;
use crate::config::{PipelinePlan, PoolSizes, StepKindPlan, StepPlan};
use crate::model::{DeadLetterReason, Job, ResultStatus, RouteInfo, StepRecord};
use crate::pipeline::template::Scope;
use crate::provider::{CallFailure, Providers};

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

    fn for_kind(&self, kind: &StepKindPlan) -> &Semaphore {
        match kind {
            StepKindPlan::Classify(_) => &self.classify,
            StepKindPlan::Route(_) => &self.route,
            StepKindPlan::Generate(_) => &self.generate,
        }
    }
}

#[derive(Debug)]
pub struct RunOutput {
    pub status: ResultStatus,
    pub output: Value,
    pub route: RouteInfo,
    pub steps: Vec<StepRecord>,
}

/// Why a job could not be finished, as it goes into the dead letter.
#[derive(Debug)]
pub struct RunFailure {
    pub reason: DeadLetterReason,
    pub error: String,
    pub attempts: u32,
}

/// What a step returns: its output for later steps and its record for the result.
pub(super) type StepResult = Result<(StepOutput, StepRecord), RunFailure>;

/// Everything a step needs to run.
pub(super) struct StepContext<'a> {
    pub job: &'a Job,
    pub step: &'a StepPlan,
    pub providers: &'a Providers,
    /// Outputs of every step this one depends on, by index into the pipeline.
    pub inputs: Vec<(usize, StepOutput)>,
    pub pipeline: &'a PipelinePlan,
    /// Milliseconds this step's calls waited for rate limits.
    pub throttled_ms: std::sync::atomic::AtomicU64,
}

impl StepContext<'_> {
    pub fn output_of(&self, index: usize) -> Option<&StepOutput> {
        self.inputs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, o)| o)
    }

    pub fn render(
        &self,
        template: &super::template::Template,
        categories: &[String],
    ) -> Result<String, RunFailure> {
        let lookup = |name: &str| {
            let index = self.pipeline.steps.iter().position(|s| s.name == name)?;
            self.output_of(index).map(|o| o.text().to_owned())
        };
        let scope = Scope {
            input: &self.job.input,
            categories,
            step_output: &lookup,
        };
        template.render(&scope).map_err(|e| RunFailure {
            reason: DeadLetterReason::InvalidJob,
            error: format!("step `{}`: {e}", self.step.name),
            attempts: 0,
        })
    }

    /// Calls `alias` for this job; when the tenant's budget cannot cover it and the pipeline
    /// names a `budget_fallback`, that (cheaper) model answers instead, as a degraded result.
    pub async fn call(
        &self,
        alias: &str,
        request: impl Fn(&crate::config::ModelPlan) -> crate::provider::ChatRequest,
    ) -> Result<crate::provider::CallOutcome, RunFailure> {
        let scope = crate::admission::CallScope {
            tenant: self.job.tenant.as_str(),
            deadline: self.job.deadline,
            throttled_ms: &self.throttled_ms,
        };
        match self.providers.call(alias, &request, &scope).await {
            Err(CallFailure::BudgetExceeded { attempts, detail }) => {
                let Some(cheaper) = self
                    .pipeline
                    .budget_fallback
                    .as_deref()
                    .filter(|f| *f != alias)
                else {
                    return Err(self.call_failed(CallFailure::BudgetExceeded { attempts, detail }));
                };
                tracing::info!(step = %self.step.name, model = alias, fallback = cheaper, "budget cannot cover the model; using the pipeline's budget fallback");
                let mut outcome = self
                    .providers
                    .call(cheaper, &request, &scope)
                    .await
                    .map_err(|f| self.call_failed(f))?;
                outcome.degraded = true;
                outcome.attempts += attempts;
                Ok(outcome)
            }
            other => other.map_err(|f| self.call_failed(f)),
        }
    }

    /// A record for a step that made an LLM call.
    pub fn record(&self, started: Instant, outcome: &crate::provider::CallOutcome) -> StepRecord {
        let model = &outcome.model;
        let r = &outcome.response;
        StepRecord {
            name: self.step.name.clone(),
            kind: self.step.kind.name().to_owned(),
            provider: Some(model.provider.clone()),
            model: Some(model.model.clone()),
            attempts: outcome.attempts,
            cached: outcome.cached,
            latency_ms: elapsed_ms(started),
            // A cache hit spent nothing: no tokens were sent or generated for this job.
            input_tokens: if outcome.cached { 0 } else { r.input_tokens },
            output_tokens: if outcome.cached { 0 } else { r.output_tokens },
            cost_usd: if outcome.cached {
                0.0
            } else {
                model.price.cost(r.input_tokens, r.output_tokens)
            },
            throttled_ms: self.throttled_ms.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// A record for a step that ran locally.
    pub fn local_record(&self, started: Instant) -> StepRecord {
        StepRecord {
            name: self.step.name.clone(),
            kind: self.step.kind.name().to_owned(),
            provider: None,
            model: None,
            attempts: 0,
            cached: false,
            latency_ms: elapsed_ms(started),
            input_tokens: 0,
            output_tokens: 0,
            cost_usd: 0.0,
            throttled_ms: 0,
        }
    }

    pub fn call_failed(&self, failure: CallFailure) -> RunFailure {
        let attempts = failure.attempts();
        let reason = match failure {
            CallFailure::DeadlineExceeded { .. } => DeadLetterReason::DeadlineExceeded,
            CallFailure::AllTargetsFailed { .. } => DeadLetterReason::ProviderFailed,
            CallFailure::BudgetExceeded { .. } => DeadLetterReason::BudgetExceeded,
        };
        RunFailure {
            reason,
            error: format!("step `{}`: {failure}", self.step.name),
            attempts,
        }
    }
}

pub fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

pub struct Runner {
    providers: Arc<Providers>,
    pools: Pools,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl Runner {
    pub fn new(
        providers: Arc<Providers>,
        pools: Pools,
        metrics: Arc<crate::telemetry::metrics::Metrics>,
    ) -> Self {
        metrics.watch_pools(pools.clone());
        Self {
            providers,
            pools,
            metrics,
        }
    }

    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// Runs every step of `pipeline` for `job`; the first failing step fails the job.
    pub async fn run(&self, job: &Job, pipeline: &PipelinePlan) -> Result<RunOutput, RunFailure> {
        let n = pipeline.steps.len();
        let mut outputs: Vec<Option<StepOutput>> = vec![None; n];
        let mut records: Vec<Option<StepRecord>> = vec![None; n];
        let mut started = vec![false; n];
        let mut running = FuturesUnordered::new();
        loop {
            for (i, step) in pipeline.steps.iter().enumerate() {
                if started[i] || !step.needs.iter().all(|&j| outputs[j].is_some()) {
                    continue;
                }
                started[i] = true;
                let inputs = step
                    .needs
                    .iter()
                    .flat_map(|&j| ancestors_with_outputs(pipeline, j, &outputs))
                    .collect();
                let ctx = StepContext {
                    job,
                    step,
                    providers: &self.providers,
                    inputs,
                    pipeline,
                    throttled_ms: Default::default(),
                };
                let pool = self.pools.for_kind(&step.kind);
                let span = tracing::info_span!("step", step = %step.name);
                let metrics = &self.metrics;
                running.push(
                    async move {
                        let started = Instant::now();
                        let result = match pool.acquire().await {
                            Ok(_permit) => run_step(&ctx).await,
                            Err(_) => Err(RunFailure {
                                reason: DeadLetterReason::Internal,
                                error: "worker pool closed during shutdown".into(),
                                attempts: 0,
                            }),
                        };
                        metrics
                            .step_duration
                            .with_label_values(&[ctx.step.name.as_str()])
                            .observe(started.elapsed().as_secs_f64());
                        (i, result)
                    }
                    .instrument(span),
                );
            }
            let Some((i, result)) = running.next().await else {
                break;
            };
            let (output, record) = result?;
            outputs[i] = Some(output);
            records[i] = Some(record);
        }
        Ok(finish(pipeline, outputs, records))
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
        StepKindPlan::Classify(plan) => super::classify::run(ctx, plan).await,
        StepKindPlan::Route(plan) => super::route::run(ctx, plan),
        StepKindPlan::Generate(plan) => super::generate::run(ctx, plan).await,
    }
}

fn finish(
    pipeline: &PipelinePlan,
    outputs: Vec<Option<StepOutput>>,
    records: Vec<Option<StepRecord>>,
) -> RunOutput {
    let mut route = RouteInfo::default();
    let mut review = false;
    let mut degraded = false;
    for output in outputs.iter().flatten() {
        match output {
            StepOutput::Classified {
                category,
                confidence,
                degraded: d,
            } => {
                degraded |= *d;
                route.category = Some(category.clone());
                route.confidence = Some(*confidence);
            }
            StepOutput::Routed {
                category,
                confidence,
                model,
                review: r,
            } => {
                route.category = Some(category.clone());
                route.confidence = Some(*confidence);
                route.model = Some(model.clone());
                review |= *r;
            }
            StepOutput::Generated {
                degraded: d, model, ..
            } => {
                degraded |= *d;
                route.model.get_or_insert_with(|| model.clone());
            }
        }
    }
    let output = outputs
        .get(pipeline.output_step())
        .and_then(Option::as_ref)
        .map(|o| match o {
            StepOutput::Generated {
                json: Some(json), ..
            } => json.clone(),
            other => Value::String(other.text().to_owned()),
        })
        .unwrap_or(Value::Null);
    let status = if review {
        ResultStatus::Review
    } else if degraded {
        ResultStatus::Degraded
    } else {
        ResultStatus::Ok
    };
    RunOutput {
        status,
        output,
        route,
        steps: records.into_iter().flatten().collect(),
    }
}
