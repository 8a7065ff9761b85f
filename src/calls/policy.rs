//! The call policy around a model alias, top-down: [`Calls::call`] (the budget fallback) ->
//! [`Calls::call_chain`] (the alias, then its fallbacks) -> [`Calls::try_target`] (cache, then
//! attempts) -> per attempt: deadline, circuit, [`Calls::admit`] (gate), [`Calls::attempt`]
//! (timeout, HTTP call, breaker, settlement, metrics) and [`Calls::after_failure`] (retry here
//! after a backoff, or move on). Transient failures of every target send the call round the
//! chain again after a wait, until the deadline or `retry.max_elapsed_ms`.
//!
//! It ends in success or in a failure that carries every target's last error, so a dead letter
//! can say exactly what was tried. The job's deadline bounds the whole loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng as _;

use super::circuit::{self, CircuitBreaker, CircuitState};
use super::retry_budget::RetryBudget;
use super::Calls;
use crate::admission::{CallScope, Gate, Refusal, Reservation};
use crate::config::{ModelPlan, RetryPolicy};
use crate::provider::ProviderHandle;
use crate::provider::{ChatRequest, ChatResponse, ErrorAction, ProviderError};

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
    /// The call goes into the job's next provider batch (the job waits for it, parked).
    #[error("waiting for a provider batch")]
    Batched,
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
            CallFailure::Batched => 0,
        }
    }

    /// Every target failed because the prompt does not fit its context window.
    pub fn only_context_length(&self) -> bool {
        matches!(self, CallFailure::AllTargetsFailed { errors, .. }
            if !errors.is_empty()
                && errors.iter().all(|(_, e)| matches!(e, ProviderError::ContextLength(_))))
    }
}

/// One target of a fallback chain, with what its attempts share.
struct Target<'a> {
    alias: &'a str,
    model: &'a Arc<ModelPlan>,
    provider: &'a ProviderHandle,
    breaker: Option<&'a CircuitBreaker>,
    /// Its metric series (absent only for a model whose provider is not configured).
    series: Option<&'a crate::telemetry::metrics::LlmSeries>,
    retry_budget: Option<&'a RetryBudget>,
    request: ChatRequest,
    /// A fallback, not the alias asked for.
    degraded: bool,
}

impl Target<'_> {
    fn outcome(&self, response: ChatResponse, attempts: u32, cached: bool) -> CallOutcome {
        CallOutcome {
            response,
            model: self.model.clone(),
            attempts,
            degraded: self.degraded,
            cached,
        }
    }
}

/// How trying one target ended.
enum TargetEnd {
    Answered(CallOutcome),
    /// Move on to the next target; the error that ended this one, if any was seen (none when
    /// its retry budget allowed no attempt this round).
    Failed(Option<ProviderError>),
    /// The whole call ends here (deadline, budget).
    Stop(CallFailure),
}

/// What to do after a failed attempt.
enum AfterFailure {
    RetryAfter(Duration),
    MoveOn,
}

impl Calls {
    /// Calls `alias` (then its fallbacks); `request` renders the request for a given model. When
    /// the tenant's budget cannot cover the call and `budget_fallback` names another model, that
    /// (cheaper) model answers instead, as a degraded outcome.
    pub async fn call(
        &self,
        alias: &str,
        request: impl Fn(&ModelPlan) -> ChatRequest,
        scope: &CallScope<'_>,
        budget_fallback: Option<&str>,
    ) -> Result<CallOutcome, CallFailure> {
        if let (Some(round), Some(model)) = (scope.batch, self.model(alias)) {
            let request = request(model);
            let key = super::batch::key(alias, &request);
            if let Some(answer) = round.answers.get(&key) {
                // Answered by the batch (priced and charged when the batch ended).
                return Ok(CallOutcome {
                    response: answer.clone(),
                    model: model.clone(),
                    attempts: 1,
                    degraded: false,
                    cached: false,
                });
            }
            if !round.failed.contains(&key) {
                // The budget holds the batch call's worst case until its answer is priced.
                let (reserved, reserved_in) = match &self.gate {
                    Some(gate) => gate
                        .reserve_batch(scope, model, &request)
                        .await
                        .map_err(|refusal| refused(refusal, 0))?,
                    None => (0.0, None),
                };
                round.need(super::batch::BatchNeed {
                    key,
                    alias: alias.to_owned(),
                    request,
                    tenant: scope.tenant.to_owned(),
                    reserved,
                    reserved_in,
                });
                return Err(CallFailure::Batched);
            }
        }
        match self.call_chain(alias, &request, scope).await {
            Err(CallFailure::BudgetExceeded { attempts, detail }) => {
                let Some(cheaper) = budget_fallback.filter(|f| *f != alias) else {
                    return Err(CallFailure::BudgetExceeded { attempts, detail });
                };
                tracing::info!(
                    step = scope.step,
                    model = alias,
                    fallback = cheaper,
                    "budget cannot cover the model; using the pipeline's budget fallback"
                );
                let mut outcome = self.call_chain(cheaper, &request, scope).await?;
                outcome.degraded = true;
                outcome.attempts += attempts;
                Ok(outcome)
            }
            other => other,
        }
    }

    /// `alias`, then each of its fallbacks once, in order.
    fn chain<'a>(&'a self, alias: &'a str) -> Vec<&'a str> {
        let mut chain = vec![alias];
        if let Some(model) = self.model(alias) {
            for fallback in &model.fallbacks {
                if !chain.contains(&fallback.as_str()) {
                    chain.push(fallback);
                }
            }
        }
        chain
    }

    /// Rounds over `alias` and its fallbacks. Each round gives every target that can still
    /// serve the request up to `retry.max_attempts` attempts; when all of them failed on
    /// transient errors (rate limits, 5xx, timeouts, broken connections, an open circuit, a
    /// spent retry budget), the call waits (backoff, at least the provider's `Retry-After`)
    /// and goes round again, until the job's deadline or `retry.max_elapsed_ms` of the first
    /// target's provider. A target that answers with an error no retry can fix (auth, bad
    /// request, content filter, context length) leaves the chain; when none is left the call
    /// fails at once.
    async fn call_chain(
        &self,
        alias: &str,
        request: &impl Fn(&ModelPlan) -> ChatRequest,
        scope: &CallScope<'_>,
    ) -> Result<CallOutcome, CallFailure> {
        let started = Instant::now();
        let targets: Vec<Target<'_>> = self
            .chain(alias)
            .into_iter()
            .enumerate()
            .filter_map(|(position, target_alias)| {
                let model = self.model(target_alias)?;
                let provider = self.providers.target(&model.provider)?;
                let state = self.target_state(&model.provider, &model.model);
                Some(Target {
                    alias: target_alias,
                    model,
                    provider,
                    breaker: state.map(|s| &s.breaker),
                    series: state.map(|s| &s.series),
                    retry_budget: self.retry_budgets.get(&model.provider),
                    request: {
                        let mut request = request(model);
                        // Work that can wait goes to the cheaper, slower tier where there is one.
                        request.flex = scope.low_priority && model.flex.is_some();
                        request
                    },
                    degraded: position > 0,
                })
            })
            .collect();
        let mut attempts = 0u32;
        let mut errors: Vec<(String, ProviderError)> = Vec::new();
        let Some(policy) = targets.first().map(|t| t.provider.retry) else {
            return Err(CallFailure::AllTargetsFailed { attempts, errors });
        };
        let mut out_of_chain = vec![false; targets.len()];
        let mut round = 0u32;
        loop {
            let mut retry_after = Duration::ZERO;
            for (target, out) in targets.iter().zip(out_of_chain.iter_mut()) {
                if *out {
                    continue;
                }
                let error = match self.try_target(target, scope, &mut attempts, round).await {
                    TargetEnd::Answered(outcome) => return Ok(outcome),
                    TargetEnd::Stop(failure) => return Err(failure),
                    TargetEnd::Failed(None) => continue,
                    TargetEnd::Failed(Some(error)) => error,
                };
                match error.action() {
                    ErrorAction::NextTarget if !matches!(error, ProviderError::CircuitOpen) => {
                        *out = true
                    }
                    ErrorAction::RetrySameTarget { after: Some(after) } => {
                        retry_after = retry_after.max(after.min(MAX_RETRY_AFTER))
                    }
                    _ => {}
                }
                match errors.iter_mut().find(|(a, _)| a == target.alias) {
                    // The provider's own error says more than the circuit it opened.
                    Some(_) if matches!(error, ProviderError::CircuitOpen) => {}
                    Some(seen) => seen.1 = error,
                    None => errors.push((target.alias.to_owned(), error)),
                }
            }
            if out_of_chain.iter().all(|out| *out) {
                return Err(CallFailure::AllTargetsFailed { attempts, errors });
            }
            round = round.saturating_add(1);
            // At least the base delay: a round after an open circuit must not spin.
            let wait = backoff(&policy, round)
                .max(policy.base_delay)
                .max(retry_after);
            if started.elapsed() + wait > policy.max_elapsed {
                tracing::warn!(
                    step = scope.step,
                    model = alias,
                    attempts,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "giving up on the call after retry.max_elapsed_ms of transient failures"
                );
                return Err(CallFailure::AllTargetsFailed { attempts, errors });
            }
            if let Some(left) = remaining(scope.deadline).filter(|left| *left < wait) {
                // Not before the deadline: the provider may recover until then.
                tokio::time::sleep(left).await;
                return Err(CallFailure::DeadlineExceeded { attempts });
            }
            tracing::debug!(
                model = alias,
                round,
                wait_ms = wait.as_millis() as u64,
                "every target failed transiently; going round the chain again"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// The cache, then up to `retry.max_attempts` attempts on one target. In rounds after the
    /// first every attempt is a retry, paid for from the provider's retry budget.
    async fn try_target(
        &self,
        target: &Target<'_>,
        scope: &CallScope<'_>,
        attempts: &mut u32,
        round: u32,
    ) -> TargetEnd {
        let cache_key = self
            .cache
            .as_ref()
            .and_then(|c| c.key(scope.tenant, &target.provider.name, &target.request));
        if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
            if let Some(response) = cache.get(key).await {
                return TargetEnd::Answered(target.outcome(response, *attempts, true));
            }
        }
        // Counted at most once per target, and only if the gate needs it.
        let prompt_tokens = std::sync::OnceLock::new();
        let prompt_tokens = || {
            *prompt_tokens.get_or_init(|| {
                crate::tokens::prompt(
                    &target.request.model,
                    target.request.system.as_deref(),
                    &target.request.user,
                )
            })
        };
        if let Some(window) = target.model.context_window {
            let needed = prompt_tokens() + u64::from(target.request.max_tokens);
            if needed > window {
                // The provider would refuse it (and may bill the attempt): no call is made.
                return TargetEnd::Failed(Some(ProviderError::ContextLength(format!(
                    "the prompt and answer need up to {needed} tokens; model `{}` has a context window of {window}",
                    target.alias
                ))));
            }
        }
        let mut last = None;
        for attempt in 0..target.provider.retry.max_attempts {
            if remaining(scope.deadline).is_some_and(|left| left.is_zero()) {
                return TargetEnd::Stop(CallFailure::DeadlineExceeded {
                    attempts: *attempts,
                });
            }
            if target
                .breaker
                .is_some_and(|b| matches!(b.state(), CircuitState::Open))
            {
                self.circuit_skipped(target);
                last.get_or_insert(ProviderError::CircuitOpen);
                break;
            }
            if attempt == 0 && round > 0 && !self.withdraw_retry(target) {
                break;
            }
            // Limits and budget come before the attempt and its timeout: waiting for them is
            // not time the provider gets.
            let reservation = match self.admit(target, scope, &prompt_tokens).await {
                Ok(reservation) => reservation,
                Err(refusal) => return TargetEnd::Stop(refused(refusal, *attempts)),
            };
            let model_timeout = match &target.model.flex {
                Some(flex) if target.request.flex => flex.timeout,
                _ => target.model.timeout,
            };
            let Some(timeout) = attempt_timeout(scope.deadline, model_timeout) else {
                settle(reservation, 0, 0.0).await;
                return TargetEnd::Stop(CallFailure::DeadlineExceeded {
                    attempts: *attempts,
                });
            };
            if target.breaker.is_some_and(|b| !b.allow()) {
                // Skipped at once: no attempt is made, so none is counted. Keep the error that
                // opened it, when this call saw one.
                settle(reservation, 0, 0.0).await;
                self.circuit_skipped(target);
                last.get_or_insert(ProviderError::CircuitOpen);
                break;
            }
            *attempts += 1;
            if attempt == 0 && round == 0 {
                if let Some(budget) = target.retry_budget {
                    budget.deposit();
                }
            }
            match self
                .attempt(target, scope.step, attempt, timeout, reservation)
                .await
            {
                Ok(response) => {
                    if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
                        cache.put(key, &response).await;
                    }
                    return TargetEnd::Answered(target.outcome(response, *attempts, false));
                }
                Err(error) => {
                    let next = self.after_failure(target, attempt, &error, scope.deadline);
                    last = Some(error);
                    match next {
                        AfterFailure::RetryAfter(delay) => tokio::time::sleep(delay).await,
                        AfterFailure::MoveOn => break,
                    }
                }
            }
        }
        TargetEnd::Failed(last)
    }

    /// Waits for the gate's limits and reserves the call's tokens and spend.
    async fn admit(
        &self,
        target: &Target<'_>,
        scope: &CallScope<'_>,
        prompt_tokens: &(dyn Fn() -> u64 + Sync),
    ) -> Result<Option<Pending>, Refusal> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let reservation = gate.before_call(scope, target.model, prompt_tokens).await?;
        Ok(Some(Pending {
            gate: gate.clone(),
            model: target.model.clone(),
            reservation: Some(reservation),
            tasks: self.tasks.clone(),
        }))
    }

    /// One HTTP attempt: the call under its timeout, then the breaker, the reservation's
    /// settlement and one metrics update and log record.
    async fn attempt(
        &self,
        target: &Target<'_>,
        step: Option<&str>,
        attempt: u32,
        timeout: Duration,
        reservation: Option<Pending>,
    ) -> Result<ChatResponse, ProviderError> {
        let (provider, model) = (&target.provider.name, target.model);
        let started = Instant::now();
        let sent = tokio::time::Instant::now();
        let result = target.provider.client.chat(&target.request, timeout).await;
        if let Some(breaker) = target.breaker {
            let before = breaker.state();
            let state = breaker.record(circuit::Outcome::of(&result), sent);
            match (before, state) {
                (CircuitState::Closed | CircuitState::HalfOpen, CircuitState::Open) => {
                    tracing::warn!(provider = %provider, model = %model.model, probe = before == CircuitState::HalfOpen,
                        "circuit opened: calls skip this target until its cooldown ends")
                }
                (CircuitState::HalfOpen, CircuitState::Closed) => {
                    tracing::info!(provider = %provider, model = %model.model, "circuit closed: the probe call succeeded")
                }
                _ => {}
            }
        }
        let (used, cost) = match &result {
            Ok(r) => (r.input_tokens + r.output_tokens, model.response_cost(r)),
            // Sent, then lost: the provider may well have billed it, so it is charged at its
            // reservation (the most it could have cost) rather than at nothing.
            Err(e) if e.may_have_been_billed() => reservation
                .as_ref()
                .and_then(|p| p.reservation.as_ref())
                .map_or((0, 0.0), |r| (r.tokens(), r.cost())),
            Err(_) => (0, 0.0),
        };
        settle(reservation, used, cost).await;
        let call = super::observe::Call {
            provider,
            step,
            model,
            request: &target.request,
            series: target.series,
        };
        self.observe(call, attempt + 1, &result, started.elapsed());
        result
    }

    /// Classifies a failed attempt: retry this target after a delay (`Retry-After` or
    /// backoff, while the retry budget allows; cut to what is left of the deadline, so the call
    /// ends as late as it may), or move on to the next target.
    fn after_failure(
        &self,
        target: &Target<'_>,
        attempt: u32,
        error: &ProviderError,
        deadline: Option<DateTime<Utc>>,
    ) -> AfterFailure {
        let ErrorAction::RetrySameTarget { after } = error.action() else {
            return AfterFailure::MoveOn;
        };
        if attempt + 1 == target.provider.retry.max_attempts || !self.withdraw_retry(target) {
            return AfterFailure::MoveOn;
        }
        let delay = match after {
            Some(d) if d > MAX_RETRY_AFTER => return AfterFailure::MoveOn,
            Some(d) => d,
            None => backoff(&target.provider.retry, attempt),
        };
        AfterFailure::RetryAfter(remaining(deadline).map_or(delay, |left| left.min(delay)))
    }

    /// Takes one retry from the target provider's retry budget; when it is spent (the provider
    /// is failing a lot) the call adds no load to it now: its fallbacks get the call, or the
    /// chain waits for its next round.
    fn withdraw_retry(&self, target: &Target<'_>) -> bool {
        if target.retry_budget.is_none_or(RetryBudget::try_withdraw) {
            return true;
        }
        self.metrics
            .ratelimit_throttled
            .with_label_values(&["retry_budget"])
            .inc();
        tracing::debug!(provider = %target.provider.name, "retry budget exhausted; moving on");
        false
    }

    /// A call skipped because the target's breaker is open.
    fn circuit_skipped(&self, target: &Target<'_>) {
        if let Some(breaker) = target.breaker {
            breaker.skipped();
        }
    }
}

fn refused(refusal: Refusal, attempts: u32) -> CallFailure {
    match refusal {
        Refusal::Deadline => CallFailure::DeadlineExceeded { attempts },
        Refusal::Budget(detail) => CallFailure::BudgetExceeded { attempts, detail },
    }
}

/// A reservation for one call, reconciled when the call ends. If the call is abandoned instead
/// (the job stopped, or a sibling step failed and the pipeline dropped this one), dropping it
/// gives the reservation back in the background, so the budget is not left over-counted.
struct Pending {
    gate: Arc<Gate>,
    model: Arc<ModelPlan>,
    reservation: Option<Reservation>,
    tasks: tokio_util::task::TaskTracker,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let (gate, model) = (self.gate.clone(), self.model.clone());
            self.tasks
                .spawn(async move { gate.after_call(reservation, &model, 0, 0.0).await });
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

fn remaining(deadline: Option<DateTime<Utc>>) -> Option<Duration> {
    deadline.map(|d| (d - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// The attempt's timeout: the model's, cut to what is left of the deadline (`None`: nothing is).
fn attempt_timeout(deadline: Option<DateTime<Utc>>, model_timeout: Duration) -> Option<Duration> {
    match remaining(deadline) {
        Some(left) if left.is_zero() => None,
        Some(left) => Some(left.min(model_timeout)),
        None => Some(model_timeout),
    }
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
            max_elapsed: Duration::from_secs(60),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            budget_ratio: 0.5,
            budget_min_per_s: 10.0,
        };
        for attempt in 0..10 {
            let ceiling = Duration::from_millis((100u64 << attempt.min(20)).min(1000));
            let samples: Vec<Duration> = (0..400).map(|_| backoff(&policy, attempt)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling));
            // Full jitter is uniform below the ceiling: its mean is half of it (the bounds are
            // over seven standard deviations of a 400-sample mean away), so a backoff that
            // does not wait, or always waits the whole ceiling, fails.
            let mean = samples.iter().sum::<Duration>().as_secs_f64() / samples.len() as f64;
            let half = ceiling.as_secs_f64() / 2.0;
            assert!(
                (mean - half).abs() < 0.15 * ceiling.as_secs_f64(),
                "attempt {attempt}: mean {mean:.4}s for a ceiling of {ceiling:?}"
            );
        }
    }

    #[test]
    fn the_attempt_timeout_is_cut_to_the_deadline() {
        let model = Duration::from_secs(30);
        assert_eq!(attempt_timeout(None, model), Some(model));
        let past = Utc::now() - chrono::Duration::seconds(1);
        assert_eq!(attempt_timeout(Some(past), model), None);
        let soon = Utc::now() + chrono::Duration::seconds(2);
        assert!(attempt_timeout(Some(soon), model).is_some_and(|t| t <= Duration::from_secs(2)));
    }
}
