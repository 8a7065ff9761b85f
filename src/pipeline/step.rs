//! What every step kind shares: the context a step runs in, what it hands to later steps, and the
//! [`StepKind`] trait each kind implements (one module per kind under [`super::steps`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::admission::JobBudget;
use crate::calls::{CallFailure, CallOutcome, CallScope};
use crate::config::{ModelPlan, PipelinePlan, StepPlan};
use crate::provider::ChatRequest;
use crate::template::{Scope, Template};
use crate::wire::{DeadLetterReason, Job, StepRecord};

/// A step kind: given the outputs of the steps it needs, produce its own output and record.
pub(crate) trait StepKind {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult;
}

/// What a finished step hands to the steps after it.
#[derive(Debug, Clone)]
pub enum StepOutput {
    /// `degraded`: a fallback model classified it.
    Classified {
        category: String,
        confidence: f64,
        degraded: bool,
    },
    Routed {
        category: String,
        confidence: f64,
        model: String,
        review: bool,
    },
    /// `model` is the alias that answered (a fallback when `degraded`).
    Generated {
        text: String,
        model: String,
        degraded: bool,
        /// The validated JSON answer of a step with an `output_schema`.
        json: Option<serde_json::Value>,
    },
}

impl StepOutput {
    /// The text `{{steps.<name>.output}}` renders to.
    pub fn text(&self) -> &str {
        match self {
            StepOutput::Classified { category, .. } => category,
            StepOutput::Routed { model, .. } => model,
            StepOutput::Generated { text, .. } => text,
        }
    }
}

/// Why a job could not be finished, as it goes into the dead letter.
#[derive(Debug)]
pub struct RunFailure {
    pub reason: DeadLetterReason,
    pub error: String,
    pub attempts: u32,
}

/// What a step returns: its output for later steps and its record for the result.
pub(crate) type StepResult = Result<(StepOutput, StepRecord), RunFailure>;

/// Everything a step needs to run.
pub(crate) struct StepContext<'a> {
    pub job: &'a Job,
    pub step: &'a StepPlan,
    pub calls: &'a crate::calls::Calls,
    /// Outputs of every step this one depends on, by index into the pipeline.
    pub inputs: Vec<(usize, StepOutput)>,
    pub pipeline: &'a PipelinePlan,
    /// Milliseconds this step's calls waited for rate limits.
    pub throttled_ms: AtomicU64,
    /// The job's budget reservation its calls draw on, when it has one.
    pub job_budget: Option<&'a Arc<JobBudget>>,
}

impl StepContext<'_> {
    pub fn output_of(&self, index: usize) -> Option<&StepOutput> {
        self.inputs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, o)| o)
    }

    pub fn render(&self, template: &Template, categories: &[String]) -> Result<String, RunFailure> {
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
        request: impl Fn(&ModelPlan) -> ChatRequest,
    ) -> Result<CallOutcome, RunFailure> {
        let scope = CallScope {
            tenant: self.job.tenant.as_str(),
            deadline: self.job.deadline,
            throttled_ms: &self.throttled_ms,
            job_budget: self.job_budget,
        };
        self.calls
            .call(
                alias,
                request,
                &scope,
                self.pipeline.budget_fallback.as_deref(),
            )
            .await
            .map_err(|f| self.call_failed(f))
    }

    /// A record for a step that made an LLM call.
    pub fn record(&self, started: Instant, outcome: &CallOutcome) -> StepRecord {
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
            throttled_ms: self.throttled_ms.load(Ordering::Relaxed),
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
