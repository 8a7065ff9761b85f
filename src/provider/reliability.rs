//! The call loop around a model alias: per-attempt timeout, typed retry with backoff and full
//! jitter (or the provider's `Retry-After`), then the alias's fallbacks in order.
//!
//! It ends in success or in a failure that carries every target's last error, so a dead letter
//! can say exactly what was tried. The job's deadline bounds the whole loop.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng as _;

use super::{ChatRequest, ChatResponse, ErrorAction, ProviderError, Providers};
use crate::admission::{CallScope, Refusal};
use crate::config::{ModelPlan, RetryPolicy};

/// Longest `Retry-After` honoured; a provider asking for more is treated as down for this job.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct CallOutcome {
    pub response: ChatResponse,
    /// The model that answered (a fallback when `degraded`).
    pub model: Arc<ModelPlan>,
    pub attempts: u32,
    pub degraded: bool,
    /// Answered from the response cache (no provider call).
    pub cached: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CallFailure {
    #[error("all targets failed: {}", describe(.errors))]
    AllTargetsFailed {
        attempts: u32,
        errors: Vec<(String, ProviderError)>,
    },
    #[error("the job's deadline passed after {attempts} attempt(s)")]
    DeadlineExceeded { attempts: u32 },
    #[error("budget exceeded: {detail}")]
    BudgetExceeded { attempts: u32, detail: String },
}

fn describe(errors: &[(String, ProviderError)]) -> String {
    errors
        .iter()
        .map(|(alias, e)| format!("{alias}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl CallFailure {
    pub fn attempts(&self) -> u32 {
        match self {
            CallFailure::AllTargetsFailed { attempts, .. }
            | CallFailure::DeadlineExceeded { attempts }
            | CallFailure::BudgetExceeded { attempts, .. } => *attempts,
        }
    }
}

impl Providers {
    /// Calls `alias` (then its fallbacks); `request` renders the request for a given model.
    pub async fn call(
        &self,
        alias: &str,
        request: impl Fn(&ModelPlan) -> ChatRequest,
        scope: &CallScope<'_>,
    ) -> Result<CallOutcome, CallFailure> {
        let deadline = scope.deadline;
        let mut chain: Vec<&str> = vec![alias];
        if let Some(model) = self.model(alias) {
            for fallback in &model.fallbacks {
                if !chain.contains(&fallback.as_str()) {
                    chain.push(fallback);
                }
            }
        }
        let mut attempts = 0u32;
        let mut errors = Vec::new();
        for (position, target_alias) in chain.iter().enumerate() {
            let Some(model) = self.model(target_alias) else {
                continue;
            };
            let Some(target) = self.target(&model.provider) else {
                continue;
            };
            let breaker = self.circuit(&model.provider, &model.model);
            let req = request(model);
            let mut last = None;
            let cache_key = self.cache.as_ref().and_then(|c| c.key(&target.name, &req));
            if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
                if let Some(response) = cache.get(key).await {
                    return Ok(CallOutcome {
                        response,
                        model: model.clone(),
                        attempts,
                        degraded: position > 0,
                        cached: true,
                    });
                }
            }
            let prompt_tokens = super::estimate_tokens(&req.user)
                + req.system.as_deref().map_or(0, super::estimate_tokens);
            for attempt in 0..target.retry.max_attempts {
                if let Some(left) = remaining(deadline) {
                    if left.is_zero() {
                        return Err(CallFailure::DeadlineExceeded { attempts });
                    }
                }
                if breaker.is_some_and(|b| matches!(b.state(), super::circuit::CircuitState::Open))
                {
                    self.metrics
                        .circuit_state
                        .with_label_values(&[&target.name, &model.model])
                        .set(2);
                    last.get_or_insert(ProviderError::CircuitOpen);
                    break;
                }
                // Limits and budget come before the attempt and its timeout: waiting for them
                // is not time the provider gets.
                let reservation = match &self.gate {
                    Some(gate) => match gate.before_call(scope, model, prompt_tokens).await {
                        Ok(r) => Some(Pending {
                            gate: gate.clone(),
                            model: model.clone(),
                            reservation: Some(r),
                        }),
                        Err(Refusal::Deadline) => {
                            return Err(CallFailure::DeadlineExceeded { attempts })
                        }
                        Err(Refusal::Budget(detail)) => {
                            return Err(CallFailure::BudgetExceeded { attempts, detail })
                        }
                    },
                    None => None,
                };
                let timeout = match remaining(deadline) {
                    Some(left) if left.is_zero() => {
                        settle(reservation, 0, 0.0).await;
                        return Err(CallFailure::DeadlineExceeded { attempts });
                    }
                    Some(left) => left.min(model.timeout),
                    None => model.timeout,
                };
                if breaker.is_some_and(|b| !b.allow()) {
                    settle(reservation, 0, 0.0).await;
                    // Skipped at once: no attempt is made, so none is counted.
                    self.metrics
                        .circuit_state
                        .with_label_values(&[&target.name, &model.model])
                        .set(2);
                    // Keep the error that opened it, when this call saw one.
                    last.get_or_insert(ProviderError::CircuitOpen);
                    break;
                }
                attempts += 1;
                if attempt == 0 {
                    target.retry_budget.deposit();
                }
                let started = std::time::Instant::now();
                let result = target.client.chat(&req, timeout).await;
                if let Some(b) = breaker {
                    let failed = result
                        .as_ref()
                        .err()
                        .is_some_and(super::circuit::counts_as_failure);
                    let state = b.record(failed);
                    self.metrics
                        .circuit_state
                        .with_label_values(&[&target.name, &model.model])
                        .set(state.gauge());
                }
                let (used, cost) = match &result {
                    Ok(r) => (
                        r.input_tokens + r.output_tokens,
                        model.price.cost(r.input_tokens, r.output_tokens),
                    ),
                    Err(_) => (0, 0.0),
                };
                settle(reservation, used, cost).await;
                self.observe(
                    &target.name,
                    model,
                    attempt + 1,
                    &req,
                    &result,
                    started.elapsed(),
                );
                match result {
                    Ok(response) => {
                        if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
                            cache.put(key, &response).await;
                        }
                        return Ok(CallOutcome {
                            response,
                            model: model.clone(),
                            attempts,
                            degraded: position > 0,
                            cached: false,
                        });
                    }
                    Err(error) => {
                        let action = error.action();
                        last = Some(error);
                        let ErrorAction::RetrySameTarget { after } = action else {
                            break;
                        };
                        if attempt + 1 == target.retry.max_attempts {
                            break;
                        }
                        if !target.retry_budget.try_withdraw() {
                            // The provider's retry budget is spent (it is failing a lot): no
                            // extra load on it; the fallbacks get the call.
                            self.metrics
                                .ratelimit_throttled
                                .with_label_values(&["retry_budget"])
                                .inc();
                            tracing::debug!(provider = %target.name, "retry budget exhausted; moving on");
                            break;
                        }
                        let delay = match after {
                            Some(d) if d > MAX_RETRY_AFTER => break,
                            Some(d) => d,
                            None => backoff(&target.retry, attempt),
                        };
                        if remaining(deadline).is_some_and(|left| left < delay) {
                            return Err(CallFailure::DeadlineExceeded { attempts });
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            }
            if let Some(error) = last {
                errors.push(((*target_alias).to_owned(), error));
            }
        }
        Err(CallFailure::AllTargetsFailed { attempts, errors })
    }
}

/// A reservation for one call, reconciled when the call ends. If the call is abandoned instead
/// (the job stopped, or a sibling step failed and the pipeline dropped this one), dropping it
/// gives the reservation back in the background, so the budget is not left over-counted.
struct Pending {
    gate: Arc<crate::admission::Gate>,
    model: Arc<ModelPlan>,
    reservation: Option<crate::admission::Reservation>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (gate, model) = (self.gate.clone(), self.model.clone());
            runtime.spawn(async move { gate.after_call(reservation, &model, 0, 0.0).await });
        }
    }
}

/// Reconciles a call's reservation with what it used (nothing, when it was not made).
async fn settle(pending: Option<Pending>, used: u64, cost: f64) {
    let Some(mut pending) = pending else {
        return;
    };
    if let Some(reservation) = pending.reservation.take() {
        pending
            .gate
            .after_call(reservation, &pending.model, used, cost)
            .await;
    }
}

impl Providers {
    /// One metrics update and one log record per provider attempt. The record carries the job,
    /// tenant, pipeline and step from the enclosing spans; prompt and response text only with
    /// `log.payloads: true`.
    fn observe(
        &self,
        provider: &str,
        model: &ModelPlan,
        attempt: u32,
        request: &ChatRequest,
        result: &Result<ChatResponse, ProviderError>,
        elapsed: Duration,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics
            .llm_attempt(provider, &model.model, outcome, elapsed.as_secs_f64());
        let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(r) => {
                let cost_usd = model.price.cost(r.input_tokens, r.output_tokens);
                self.metrics.llm_usage(
                    provider,
                    &model.model,
                    r.input_tokens,
                    r.output_tokens,
                    cost_usd,
                );
                if self.log_payloads {
                    tracing::info!(target: "switchyard::llm", provider, model = %model.model, attempt, outcome, latency_ms,
                        input_tokens = r.input_tokens, output_tokens = r.output_tokens, cost_usd,
                        prompt = %request.user, system = request.system.as_deref().unwrap_or_default(), response = %r.content,
                        "provider call");
                } else {
                    tracing::info!(target: "switchyard::llm", provider, model = %model.model, attempt, outcome, latency_ms,
                        input_tokens = r.input_tokens, output_tokens = r.output_tokens, cost_usd, "provider call");
                }
            }
            Err(error) => {
                tracing::info!(target: "switchyard::llm", provider, model = %model.model, attempt, outcome, latency_ms,
                    input_tokens = 0u64, output_tokens = 0u64, cost_usd = 0.0, error = %error, "provider call");
            }
        }
    }
}

fn remaining(deadline: Option<DateTime<Utc>>) -> Option<Duration> {
    deadline.map(|d| (d - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// Full jitter: uniform in `[0, min(max_delay, base_delay * 2^attempt)]`.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .base_delay
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(policy.max_delay);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_exponential_ceiling() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            budget_ratio: 0.5,
            budget_min_per_s: 10.0,
        };
        for attempt in 0..10 {
            let ceiling = Duration::from_millis((100u64 << attempt.min(20)).min(1000));
            for _ in 0..50 {
                assert!(backoff(&policy, attempt) <= ceiling);
            }
        }
    }
}
