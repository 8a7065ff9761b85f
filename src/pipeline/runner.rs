//! Runs one job through its pipeline's DAG: a step starts when every step it needs has
//! finished, on its kind's worker pool; the first failing step fails the job.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::step::{RunFailure, StepContext, StepKind as _, StepOutput, StepResult};
use crate::admission::JobBudget;
use crate::calls::Calls;
use crate::config::{PipelinePlan, PoolSizes, StepKindPlan};
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

    /// Runs every step of `pipeline` for `job`, its calls drawing on `job_budget` when the job
    /// has a budget reservation; the first failing step fails the job.
    pub async fn run(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        job_budget: Option<&Arc<JobBudget>>,
    ) -> Result<RunOutput, RunFailure> {
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
                    calls: &self.calls,
                    inputs,
                    pipeline,
                    throttled_ms: Default::default(),
                    job_budget,
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
        StepKindPlan::Classify(plan) => plan.run(ctx).await,
        StepKindPlan::Route(plan) => plan.run(ctx).await,
        StepKindPlan::Generate(plan) => plan.run(ctx).await,
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
