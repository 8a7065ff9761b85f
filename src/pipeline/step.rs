//! What every step kind shares: the context a step runs in, what it hands to later steps, and the
//! [`StepKind`] trait each kind implements (one module per kind under [`super::steps`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use crate::admission::JobBudget;
use crate::calls::{CallFailure, CallOutcome, CallScope};
use crate::config::{ModelPlan, PipelinePlan, StepPlan};
use crate::provider::ChatRequest;
use crate::template::{Scope, Template, Var};
use crate::wire::{DeadLetterReason, Job, StepRecord};

/// A step kind: given the outputs of the steps it needs, produce its own output and record.
pub(crate) trait StepKind {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult;
}

/// What a finished step hands to the steps after it (kept with a review held before
/// generation, so the approved job resumes where it stopped).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
        prompt: Option<String>,
        branch: String,
        review: bool,
    },
    /// `model` is the alias that answered (a fallback when `degraded`).
    Generated {
        text: String,
        model: String,
        degraded: bool,
        /// The validated JSON answer of a step with an `output_schema`.
        json: Option<Value>,
        /// The experiment and variant the job was assigned, when it is in one.
        variant: Option<(String, String)>,
    },
    /// Any other value: a template's, a split's chunks, a map's answers, a reduce's or refine's
    /// answer, a static `on_failure` answer. `fields` are readable as `steps.<name>.<field>`.
    Value {
        value: Value,
        fields: Map<String, Value>,
        degraded: bool,
    },
    /// The step's `when` did not hold.
    Skipped,
}

impl StepOutput {
    /// The value `{{steps.<name>.output}}` names.
    pub fn output(&self) -> Value {
        match self {
            StepOutput::Classified { category, .. } => Value::String(category.clone()),
            StepOutput::Routed { model, branch, .. } if model.is_empty() => {
                Value::String(branch.clone())
            }
            StepOutput::Routed { model, .. } => Value::String(model.clone()),
            StepOutput::Generated {
                json: Some(json), ..
            } => json.clone(),
            StepOutput::Generated { text, .. } => Value::String(text.clone()),
            StepOutput::Value { value, .. } => value.clone(),
            StepOutput::Skipped => Value::Null,
        }
    }

    /// The value at `steps.<name>.<path>`: `output` and what follows it reads into the output;
    /// the kind's other fields (`category`, `confidence`, `model`, `branch`, `skipped`, ...) by
    /// name. Absent fields are `null`.
    pub fn at(&self, path: &[String]) -> Value {
        let Some((first, rest)) = path.split_first() else {
            return self.output();
        };
        let head = match (self, first.as_str()) {
            (_, "output") => self.output(),
            (StepOutput::Skipped, "skipped") => Value::Bool(true),
            (_, "skipped") => Value::Bool(false),
            (
                StepOutput::Classified { category, .. } | StepOutput::Routed { category, .. },
                "category",
            ) => Value::String(category.clone()),
            (
                StepOutput::Classified { confidence, .. } | StepOutput::Routed { confidence, .. },
                "confidence",
            ) => Value::from(*confidence),
            (StepOutput::Routed { model, .. } | StepOutput::Generated { model, .. }, "model") => {
                Value::String(model.clone())
            }
            (StepOutput::Routed { prompt, .. }, "prompt") => {
                prompt.clone().map_or(Value::Null, Value::String)
            }
            (StepOutput::Routed { branch, .. }, "branch") => Value::String(branch.clone()),
            (StepOutput::Routed { review, .. }, "review") => Value::Bool(*review),
            (StepOutput::Generated { text, .. }, "text") => Value::String(text.clone()),
            (StepOutput::Generated { variant, .. }, "variant") => variant
                .as_ref()
                .map_or(Value::Null, |(_, v)| Value::String(v.clone())),
            (
                StepOutput::Classified { degraded, .. }
                | StepOutput::Generated { degraded, .. }
                | StepOutput::Value { degraded, .. },
                "degraded",
            ) => Value::Bool(*degraded),
            (StepOutput::Value { fields, .. }, name) => {
                fields.get(name).cloned().unwrap_or(Value::Null)
            }
            _ => Value::Null,
        };
        rest.iter().fold(head, |v, key| index(&v, key))
    }

    /// A fallback model, a static answer or a budget fallback served this step.
    pub fn degraded(&self) -> bool {
        match self {
            StepOutput::Classified { degraded, .. }
            | StepOutput::Generated { degraded, .. }
            | StepOutput::Value { degraded, .. } => *degraded,
            StepOutput::Routed { .. } | StepOutput::Skipped => false,
        }
    }
}

/// `value[key]`: an object's field or an array's element; `null` when absent.
pub fn index(value: &Value, key: &str) -> Value {
    match value {
        Value::Object(map) => map.get(key).cloned().unwrap_or(Value::Null),
        Value::Array(items) => key
            .parse::<usize>()
            .ok()
            .and_then(|i| items.get(i).cloned())
            .unwrap_or(Value::Null),
        _ => Value::Null,
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
    /// The job's input as the steps see it (after guardrail redaction).
    pub input: &'a Map<String, Value>,
    pub pipeline: &'a PipelinePlan,
    /// Milliseconds this step's calls waited for rate limits.
    pub throttled_ms: AtomicU64,
    /// The job's budget reservation its calls draw on, when it has one.
    pub job_budget: Option<&'a Arc<JobBudget>>,
    /// For kinds that make many calls (map, reduce, refine): the pool each call takes a
    /// permit from, instead of one permit for the whole step.
    pub call_pool: Option<&'a tokio::sync::Semaphore>,
    /// What this step's answered calls spent so far, so a step that fails half-way (a map whose
    /// last chunk fails, a loop whose evaluator breaks) still shows the calls that were paid.
    pub spent: std::sync::Mutex<Spent>,
    /// What the steps of this run share.
    pub shared: &'a RunShared<'a>,
}

/// What the steps of one run share: answers for the semantic cache, stored once the job's
/// result is known good, and the provider batch round the run is in, when it is.
#[derive(Default)]
pub struct RunShared<'a> {
    pub semantic_inserts: std::sync::Mutex<Vec<SemanticInsert>>,
    pub batch: Option<&'a crate::calls::batch::BatchRound>,
    /// The job's budget reservation its calls draw on, when it has one.
    pub job_budget: Option<&'a Arc<JobBudget>>,
}

/// An answer to store in a step's semantic cache if the job's result turns out good.
pub struct SemanticInsert {
    pub index: String,
    pub vector: Vec<f32>,
    pub response: crate::provider::ChatResponse,
    pub plan: Arc<crate::config::SemanticCachePlan>,
}

/// Attempts, tokens and cost of a step's answered calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spent {
    pub attempts: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

impl StepContext<'_> {
    pub fn output_of(&self, index: usize) -> Option<&StepOutput> {
        self.inputs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, o)| o)
    }

    /// The output of the earlier step named `name`, if this step depends on it.
    pub fn output_named(&self, name: &str) -> Option<&StepOutput> {
        let index = self.pipeline.steps.iter().position(|s| s.name == name)?;
        self.output_of(index)
    }

    pub fn render(&self, template: &Template, categories: &[String]) -> Result<String, RunFailure> {
        self.render_with(template, categories, &[])
    }

    /// Renders `template` with the step kind's own values (`{{chunk}}`, `{{mapped}}`, ...).
    pub fn render_with(
        &self,
        template: &Template,
        categories: &[String],
        locals: &[(&str, &str)],
    ) -> Result<String, RunFailure> {
        let lookup = |name: &str, path: &[String]| self.output_named(name).map(|o| o.at(path));
        let scope = Scope {
            input: self.input,
            categories,
            step: &lookup,
            locals,
        };
        template.render(&scope).map_err(|e| self.invalid(e))
    }

    /// The value of one variable (for JSON templates, which keep a value's type).
    pub fn value_of(&self, var: &Var) -> Result<Value, RunFailure> {
        let lookup = |name: &str, path: &[String]| self.output_named(name).map(|o| o.at(path));
        let scope = Scope {
            input: self.input,
            categories: &[],
            step: &lookup,
            locals: &[],
        };
        crate::template::value_of(var, &scope).map_err(|e| self.invalid(e))
    }

    fn invalid(&self, e: String) -> RunFailure {
        RunFailure {
            reason: DeadLetterReason::InvalidJob,
            error: format!("step `{}`: {e}", self.step.name),
            attempts: 0,
        }
    }

    /// Calls `alias` for this job; when the tenant's budget cannot cover it and the pipeline
    /// names a `budget_fallback`, that (cheaper) model answers instead, as a degraded result.
    pub async fn call(
        &self,
        alias: &str,
        request: impl Fn(&ModelPlan) -> ChatRequest,
    ) -> Result<CallOutcome, RunFailure> {
        self.call_raw(alias, request)
            .await
            .map_err(|f| self.call_failed(f))
    }

    /// [`Self::call`], its failure as the call policy reports it.
    pub async fn call_raw(
        &self,
        alias: &str,
        request: impl Fn(&ModelPlan) -> ChatRequest,
    ) -> Result<CallOutcome, CallFailure> {
        let scope = CallScope {
            tenant: self.job.tenant.as_str(),
            step: Some(self.step.name.as_str()),
            user: self.job.user.as_deref(),
            deadline: self.job.deadline,
            throttled_ms: &self.throttled_ms,
            job_budget: self.job_budget,
            low_priority: self.job.priority == crate::wire::Priority::Low,
            batch: self.shared.batch,
        };
        // A closed pool (shutdown) leaves the call unbounded rather than failing the job.
        let _permit = match self.call_pool {
            Some(pool) => pool.acquire().await.ok(),
            None => None,
        };
        let outcome = self
            .calls
            .call(
                alias,
                request,
                &scope,
                self.pipeline.budget_fallback.as_deref(),
            )
            .await?;
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        spent.attempts += outcome.attempts;
        if !outcome.cached {
            spent.input_tokens += outcome.response.input_tokens;
            spent.output_tokens += outcome.response.output_tokens;
            spent.cost_usd += outcome.model.response_cost(&outcome.response);
        }
        drop(spent);
        Ok(outcome)
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
                model.response_cost(r)
            },
            throttled_ms: self.throttled_ms.load(Ordering::Relaxed),
            service_tier: match (outcome.cached, r.batch, r.flex) {
                (false, true, _) => Some("batch".to_owned()),
                (false, false, true) => Some("flex".to_owned()),
                _ => None,
            },
            cache_hit: outcome.cached.then(|| crate::wire::CacheHit {
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                saved_usd: model.response_cost(r),
            }),
            ..StepRecord::default()
        }
    }

    /// The record of a step that failed: what its answered calls spent, plus the attempts of
    /// the failure itself.
    pub fn failed_record(&self, started: Instant, failure: &RunFailure) -> StepRecord {
        let spent = *self.spent.lock().unwrap_or_else(|e| e.into_inner());
        // An answer that failed validation counted the answered calls already; a call that
        // failed counted only its own attempts.
        let attempts = if failure.reason == DeadLetterReason::OutputInvalid {
            failure.attempts.max(spent.attempts)
        } else {
            spent.attempts + failure.attempts
        };
        StepRecord {
            attempts,
            input_tokens: spent.input_tokens,
            output_tokens: spent.output_tokens,
            cost_usd: spent.cost_usd,
            throttled_ms: self.throttled_ms.load(Ordering::Relaxed),
            error: Some(failure.error.clone()),
            ..self.local_record(started)
        }
    }

    /// A record for a step that ran locally.
    pub fn local_record(&self, started: Instant) -> StepRecord {
        StepRecord {
            name: self.step.name.clone(),
            kind: self.step.kind.name().to_owned(),
            latency_ms: elapsed_ms(started),
            ..StepRecord::default()
        }
    }

    /// Adds the tokens, cost and attempts of another call to `record`.
    pub fn absorb(record: &mut StepRecord, other: &StepRecord) {
        record.attempts += other.attempts;
        record.input_tokens += other.input_tokens;
        record.output_tokens += other.output_tokens;
        record.cost_usd += other.cost_usd;
        record.cached &= other.cached;
        if let Some(hit) = other.cache_hit {
            let sum = record.cache_hit.get_or_insert_with(Default::default);
            sum.input_tokens += hit.input_tokens;
            sum.output_tokens += hit.output_tokens;
            sum.saved_usd += hit.saved_usd;
        }
        if record.service_tier.is_none() {
            record.service_tier.clone_from(&other.service_tier);
        }
        if record.provider.is_none() {
            record.provider.clone_from(&other.provider);
            record.model.clone_from(&other.model);
            record.prompt.clone_from(&other.prompt);
        }
    }

    pub fn call_failed(&self, failure: CallFailure) -> RunFailure {
        let attempts = failure.attempts();
        let reason = match failure {
            CallFailure::DeadlineExceeded { .. } => DeadLetterReason::DeadlineExceeded,
            // Not the provider's fault: the job's prompt fits none of the step's models.
            CallFailure::AllTargetsFailed { .. } if failure.only_context_length() => {
                DeadLetterReason::ContextLengthExceeded
            }
            CallFailure::AllTargetsFailed { .. } => DeadLetterReason::ProviderFailed,
            CallFailure::BudgetExceeded { .. } => DeadLetterReason::BudgetExceeded,
            // Never a dead letter: the engine parks the job until its batch answers.
            CallFailure::Batched => DeadLetterReason::Internal,
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
