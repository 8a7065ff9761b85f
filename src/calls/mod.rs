//! What happens around one LLM call, in the order a call meets it (see
//! `docs/architecture.md`, "Calls"): the response [`cache`], the [`circuit`] breaker of the
//! provider + model, the admission [`Gate`] (rate limits and budget), the attempt itself with its
//! timeout, the error's class, then a retry (bounded by the provider's [`retry_budget`]) or the
//! next target of the fallback chain. [`policy`] is that sequence, one small function a step.
//!
//! The HTTP clients themselves are in [`crate::provider`]; nothing here speaks a wire format.

pub mod batch;
pub mod cache;
pub mod circuit;
mod observe;
mod policy;
pub mod retry_budget;
pub mod semantic;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

pub use crate::admission::CallScope;
use crate::admission::Gate;
use crate::config::{ModelPlan, Plan};
use crate::provider::Providers;
use crate::telemetry::metrics::Metrics;
pub use policy::{backoff, CallFailure, CallOutcome};

/// What every call to one provider + model shares: its circuit breaker and its metric series.
pub(crate) struct TargetState {
    pub breaker: circuit::CircuitBreaker,
    pub series: crate::telemetry::metrics::LlmSeries,
}

/// One [`TargetState`] per provider, then model (looked up by `&str`, without building a key).
type Targets = BTreeMap<String, BTreeMap<String, TargetState>>;

/// Every model alias of the plan, callable with the plan's policies.
pub struct Calls {
    providers: Providers,
    models: BTreeMap<String, Arc<ModelPlan>>,
    targets: Targets,
    /// One retry budget per provider.
    retry_budgets: BTreeMap<String, retry_budget::RetryBudget>,
    /// Limits and budgets every call passes first (absent when nothing is limited).
    gate: Option<Arc<Gate>>,
    cache: Option<cache::ResponseCache>,
    semantic: Option<semantic::SemanticCache>,
    metrics: Arc<Metrics>,
    /// Log prompt and response text with each call (`log.payloads`).
    log_payloads: bool,
    /// Where reservations of abandoned calls are given back.
    tasks: TaskTracker,
}

impl Calls {
    /// The plan's models over `providers`; background work (returning the reservations of
    /// abandoned calls) runs on `tasks`.
    pub fn new(
        plan: &Plan,
        providers: Providers,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Self {
        let mut targets = Targets::new();
        for model in plan.models.values() {
            if let Some(provider) = plan.providers.get(&model.provider) {
                targets
                    .entry(model.provider.clone())
                    .or_default()
                    .entry(model.model.clone())
                    .or_insert_with(|| {
                        let labels = [model.provider.as_str(), model.model.as_str()];
                        let gauge = metrics.circuit_state.with_label_values(&labels);
                        TargetState {
                            breaker: circuit::CircuitBreaker::new(provider.circuit)
                                .reporting_to(gauge),
                            series: metrics.llm_series(labels[0], labels[1]),
                        }
                    });
            }
        }
        let retry_budgets = plan
            .providers
            .iter()
            .map(|(name, p)| (name.clone(), retry_budget::RetryBudget::new(&p.retry)))
            .collect();
        Self {
            providers,
            models: plan.models.clone(),
            targets,
            retry_budgets,
            gate: None,
            cache: None,
            semantic: None,
            metrics,
            log_payloads: plan.log.payloads,
            tasks,
        }
    }

    /// Answers paraphrases from the semantic cache of steps that have one.
    pub fn with_semantic_cache(mut self, cache: semantic::SemanticCache) -> Self {
        self.semantic = Some(cache);
        self
    }

    /// Where background work of calls runs (tracked, so shutdown waits for it).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn semantic_cache(&self) -> Option<&semantic::SemanticCache> {
        self.semantic.as_ref()
    }

    /// The embedding of `text` by the model `alias` and what it cost (one attempt; the
    /// semantic cache treats any failure as a miss).
    pub async fn embed(
        &self,
        alias: &str,
        text: &str,
    ) -> Result<(Vec<f32>, f64), crate::provider::ProviderError> {
        use crate::provider::ProviderError;
        let model = self
            .model(alias)
            .ok_or_else(|| ProviderError::InvalidResponse(format!("no model `{alias}`")))?;
        let provider = self.providers.target(&model.provider).ok_or_else(|| {
            ProviderError::InvalidResponse(format!("no provider `{}`", model.provider))
        })?;
        // An embedding is quick; a slow one is a miss, not a held-up job.
        let timeout = model.timeout.min(std::time::Duration::from_secs(10));
        let (vector, tokens) = provider.client.embed(&model.model, text, timeout).await?;
        Ok((vector, model.price.cost(tokens, 0)))
    }

    /// Answers deterministic requests from `cache` when it can.
    pub fn with_cache(mut self, cache: cache::ResponseCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Puts every call behind `gate`'s limits and budgets.
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The breaker of a provider + model (every configured model has one).
    pub fn circuit(&self, provider: &str, model: &str) -> Option<&circuit::CircuitBreaker> {
        self.target_state(provider, model).map(|t| &t.breaker)
    }

    fn target_state(&self, provider: &str, model: &str) -> Option<&TargetState> {
        self.targets.get(provider)?.get(model)
    }

    pub fn model(&self, alias: &str) -> Option<&Arc<ModelPlan>> {
        self.models.get(alias)
    }

    pub fn providers(&self) -> &Providers {
        &self.providers
    }
}
