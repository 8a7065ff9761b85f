//! The gate in front of every provider call: the tenant's tokens per minute, the provider's and
//! model's requests and tokens per minute, and the tenant's day and month budgets.
//!
//! Limits are waited for, never turned into errors: a throttled call sleeps until its limiter
//! admits it (or the job's deadline would pass first). Tokens and spend are reserved from an
//! estimate before the call (prompt size plus the model's `max_tokens`, the way providers count
//! a request against their own limits) and reconciled with the reported `usage` after it, so
//! the limits hold across replicas while the estimates are corrected. A budget that cannot
//! cover the estimate refuses the call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng as _;

use crate::config::{ModelPlan, Plan, RateLimits, TenantsPlan};
use crate::state::{Booking, BudgetKeys, Rate, StateStore};
use crate::telemetry::metrics::Metrics;

const MINUTE: Duration = Duration::from_secs(60);
/// Per-minute limits may burst by this much of their rate.
const MINUTE_BURST: Duration = Duration::from_secs(6);
/// How long a call that does not fit the budget waits for in-flight reservations to settle.
const BUDGET_SETTLE: Duration = Duration::from_secs(3);
const BUDGET_RETRY: Duration = Duration::from_millis(100);
/// After a final refusal, how long the tenant's further refusals skip the settling wait.
const EXHAUSTED_MEMO: Duration = Duration::from_secs(5);
/// Most tenants remembered as exhausted at once.
const EXHAUSTED_MAX: usize = 4096;
/// How long to wait between attempts while the state store is unreachable.
const STORE_RETRY: Duration = Duration::from_millis(250);

/// Who a provider call is for, and what its waits are charged to.
#[derive(Clone, Copy)]
pub struct CallScope<'a> {
    pub tenant: &'a str,
    /// The pipeline step making the call, named in its log lines.
    pub step: Option<&'a str>,
    /// The job's `user`, held to its tenant's `per_user` limits.
    pub user: Option<&'a str>,
    pub deadline: Option<DateTime<Utc>>,
    /// Milliseconds this job's calls spent waiting for limits (goes into the step record).
    pub throttled_ms: &'a AtomicU64,
    /// The job's budget reservation, which its calls draw on instead of reserving their own.
    pub job_budget: Option<&'a Arc<JobBudget>>,
    /// The job can wait (`priority: low`): models with a flex tier serve it there.
    pub low_priority: bool,
    /// The job runs in a provider batch round: its calls are answered from the round or
    /// collected for the next batch.
    pub batch: Option<&'a crate::calls::batch::BatchRound>,
}

/// A job's budget reservation: its pipeline's worst case, reserved before its first call so
/// the job is never refused half-way (after paying for its first steps). Its calls draw on it,
/// and it is settled to what they cost when the job ends.
#[derive(Debug)]
pub struct JobBudget {
    keys: BudgetKeys,
    tenant: String,
    reserved: f64,
    /// What the job's calls cost so far (failed attempts that may have been billed included).
    charged: std::sync::Mutex<f64>,
}

impl JobBudget {
    fn charge(&self, cost: f64) {
        *self.charged.lock().unwrap_or_else(|e| e.into_inner()) += cost;
    }

    /// The spend reserved for the whole job, in USD.
    pub fn reserved(&self) -> f64 {
        self.reserved
    }
}

/// Why the gate will not let a call through.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The tenant's budget cannot cover the call; the text says which and by how much.
    Budget(String),
    /// The job's deadline passes before the limiters would admit it.
    Deadline,
}

/// What was reserved for one call, to reconcile afterwards.
#[derive(Debug)]
pub struct Reservation {
    tokens: f64,
    cost: f64,
    tenant: String,
    /// The user's token limiter key, when its tokens were reserved there.
    user_key: Option<String>,
    provider: String,
    model: String,
    /// The budget keys reserved against (kept, so a call crossing midnight settles on the day
    /// it reserved).
    budget: Option<BudgetKeys>,
    /// The job reservation the call drew on instead of reserving its own.
    job: Option<Arc<JobBudget>>,
}

impl Reservation {
    /// The tokens reserved (prompt count plus `max_tokens`).
    pub fn tokens(&self) -> u64 {
        self.tokens as u64
    }

    /// The spend reserved, in USD.
    pub fn cost(&self) -> f64 {
        self.cost
    }
}

pub struct Gate {
    state: StateStore,
    tenants: TenantsPlan,
    providers: std::collections::BTreeMap<String, RateLimits>,
    metrics: Arc<Metrics>,
    /// Tenants whose budget refused a call after waiting for in-flight reservations, until when:
    /// their next refusals are immediate instead of waiting again.
    exhausted: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Where job reservations are settled once their jobs let go of them.
    settling: tokio_util::task::TaskTracker,
    /// Tenants' rate bookings, coalesced per tenant.
    bookings: Arc<super::booking::Bookings>,
    /// A user's turn further off than this parks the job (`limits.park_after_ms`).
    park_after: Duration,
}

impl Gate {
    pub fn new(plan: &Plan, state: StateStore, metrics: Arc<Metrics>) -> Self {
        let gate = Self {
            bookings: super::booking::Bookings::new(state.clone()),
            state,
            tenants: plan.tenants.clone(),
            providers: plan
                .providers
                .iter()
                .map(|(name, p)| (name.clone(), p.limits))
                .collect(),
            metrics,
            exhausted: Default::default(),
            settling: tokio_util::task::TaskTracker::new(),
            park_after: plan.limits.park_after,
        };
        for (name, tenant) in &gate.tenants.named {
            for (period, limit) in [
                ("day", tenant.budget_usd_per_day),
                ("month", tenant.budget_usd_per_month),
            ] {
                if let Some(limit) = limit {
                    gate.metrics
                        .budget_remaining
                        .with_label_values(&[name, period])
                        .set(limit);
                    gate.metrics
                        .budget_limit
                        .with_label_values(&[name, period])
                        .set(limit);
                }
            }
        }
        gate
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn tenants(&self) -> &TenantsPlan {
        &self.tenants
    }

    /// Waits for every limiter that applies and reserves the estimate against the budget.
    pub async fn before_call(
        &self,
        scope: &CallScope<'_>,
        model: &ModelPlan,
        prompt_tokens: impl FnOnce() -> u64,
    ) -> Result<Reservation, Refusal> {
        // Counting a prompt means tokenizing it: only when a token limit or a budget needs it.
        let prompt_tokens = if self.counts_tokens(scope.tenant, model) {
            prompt_tokens()
        } else {
            0
        };
        let tokens = (prompt_tokens + u64::from(model.max_tokens)) as f64;
        let cost = model
            .price
            .worst_case()
            .cost(prompt_tokens, u64::from(model.max_tokens));
        // The budget first: a refused call must not use up rate limits others share.
        // A free model (the usual budget fallback) needs no reservation.
        let budget = match self.budget_keys(scope.tenant).filter(|_| cost > 0.0) {
            // The job's own reservation already covers it.
            Some(_) if scope.job_budget.is_some() => None,
            Some(keys) => {
                let what = format!("a call to `{}`", model.alias);
                self.reserve_budget(scope, &what, &keys, cost).await?;
                Some(keys)
            }
            None => None,
        };
        let tenant = self.tenants.get(scope.tenant);
        let user_tpm = scope.user.and(tenant.per_user.tokens_per_min);
        let provider = self
            .providers
            .get(&model.provider)
            .copied()
            .unwrap_or_default();
        // Keys are built only for the limits that apply: most calls have none.
        let (t, p, m) = (scope.tenant, &model.provider, &model.model);
        let limiters: [(&str, Option<_>, f64, &(dyn Fn() -> String + Sync)); 6] = [
            ("user_tokens", user_tpm, tokens, &|| {
                user_key(t, scope.user.unwrap_or_default(), "tpm")
            }),
            ("tenant_tokens", tenant.tokens_per_min, tokens, &|| {
                format!("t:{t}:tpm")
            }),
            ("provider_requests", provider.rpm, 1.0, &|| {
                format!("p:{p}:rpm")
            }),
            ("provider_tokens", provider.tpm, tokens, &|| {
                format!("p:{p}:tpm")
            }),
            ("model_requests", model.limits.rpm, 1.0, &|| {
                format!("m:{p}:{m}:rpm")
            }),
            ("model_tokens", model.limits.tpm, tokens, &|| {
                format!("m:{p}:{m}:tpm")
            }),
        ];
        let mut charged: Vec<(String, f64, Rate)> = Vec::new();
        for (scope_name, limit, units, key) in limiters {
            let Some(limit) = limit else { continue };
            let key = key();
            let rate = per_minute(limit);
            if let Err(refusal) = self.wait(scope, scope_name, &key, units, rate).await {
                // Give back what this call already took: it will not be made.
                for (key, units, rate) in charged {
                    let _ = self.state.adjust(&key, -units, rate).await;
                }
                if let Some(keys) = &budget {
                    let _ = self.state.spend(keys, -cost, false).await;
                }
                return Err(refusal);
            }
            charged.push((key, units, rate));
        }
        Ok(Reservation {
            tokens,
            cost,
            tenant: scope.tenant.to_owned(),
            user_key: user_tpm
                .and(scope.user)
                .map(|u| user_key(scope.tenant, u, "tpm")),
            provider: model.provider.clone(),
            model: model.model.clone(),
            budget,
            job: scope.job_budget.cloned(),
        })
    }

    /// Whether a call of `tenant` to `model` is held to a token limit or a budget.
    fn counts_tokens(&self, tenant: &str, model: &ModelPlan) -> bool {
        let provider_tpm = self
            .providers
            .get(&model.provider)
            .is_some_and(|p| p.tpm.is_some());
        let plan = self.tenants.get(tenant);
        plan.tokens_per_min.is_some()
            || plan.per_user.tokens_per_min.is_some()
            || provider_tpm
            || model.limits.tpm.is_some()
            || plan.budget_usd_per_day.is_some()
            || plan.budget_usd_per_month.is_some()
    }

    /// Reserves `worst()` (the job's pipeline at its worst: every LLM step on its costliest
    /// candidate model, full prompts and `max_tokens`) against the tenant's budget before the
    /// job's first call. `Ok(None)` when the tenant has no budget or the job cannot cost
    /// anything.
    pub async fn reserve_job(
        &self,
        scope: &CallScope<'_>,
        pipeline: &str,
        worst: impl FnOnce() -> f64,
    ) -> Result<Option<Arc<JobBudget>>, Refusal> {
        // Worked out only for a tenant with a budget: it renders and counts every prompt.
        let Some(keys) = self.budget_keys(scope.tenant) else {
            return Ok(None);
        };
        let worst = worst();
        if worst <= 0.0 {
            return Ok(None);
        }
        let what = format!("a job of pipeline `{pipeline}`");
        self.reserve_budget(scope, &what, &keys, worst).await?;
        Ok(Some(Arc::new(JobBudget {
            keys,
            tenant: scope.tenant.to_owned(),
            reserved: worst,
            charged: std::sync::Mutex::new(0.0),
        })))
    }

    /// Settles a job's reservation in the background (the job's calls are all done or
    /// abandoned; abandoned ones give their share back through their own reservations).
    pub fn settle_job_later(self: &Arc<Self>, job: Arc<JobBudget>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let gate = self.clone();
        self.settling
            .spawn(async move { gate.settle_job(&job).await });
    }

    /// Waits (bounded) for job settlements still running, at shutdown.
    pub async fn finish_settling(&self, within: Duration) {
        self.settling.close();
        if tokio::time::timeout(within, self.settling.wait())
            .await
            .is_err()
        {
            tracing::warn!("job budget settlements still running at exit; those reservations stay counted until the period ends");
        }
    }

    /// Settles a job's reservation to what its calls cost.
    pub async fn settle_job(&self, job: &JobBudget) {
        let charged = *job.charged.lock().unwrap_or_else(|e| e.into_inner());
        let settle = charged - job.reserved;
        if settle == 0.0 {
            return;
        }
        match self.state.spend(&job.keys, settle, false).await {
            Ok(spend) => self.publish_remaining(&job.tenant, &job.keys, spend.day, spend.month),
            Err(e) => {
                tracing::warn!(tenant = %job.tenant, error = %e, "could not settle a job's budget reservation")
            }
        }
    }

    /// Reserves `cost` against the tenant's budget. Calls in flight hold reservations (their
    /// worst case) that shrink to the real cost when they finish, so a refusal is final only
    /// once that has had time to happen (or the deadline is near).
    async fn reserve_budget(
        &self,
        scope: &CallScope<'_>,
        what: &str,
        keys: &BudgetKeys,
        cost: f64,
    ) -> Result<(), Refusal> {
        let started = std::time::Instant::now();
        let recently_exhausted = self
            .exhausted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(scope.tenant)
            .is_some_and(|until| *until > started);
        let spend = loop {
            let spend = self
                .retrying(scope, || self.state.spend(keys, cost, true))
                .await?;
            let settled = recently_exhausted
                || started.elapsed() >= BUDGET_SETTLE
                || scope.deadline.is_some_and(|d| {
                    d <= Utc::now() + chrono::Duration::from_std(BUDGET_RETRY).unwrap_or_default()
                });
            if spend.allowed || settled {
                break spend;
            }
            tokio::time::sleep(BUDGET_RETRY + jitter(BUDGET_RETRY)).await;
        };
        self.publish_remaining(scope.tenant, keys, spend.day, spend.month);
        if spend.allowed {
            return Ok(());
        }
        self.metrics
            .ratelimit_throttled
            .with_label_values(&["tenant_budget"])
            .inc();
        {
            let mut exhausted = self.exhausted.lock().unwrap_or_else(|e| e.into_inner());
            if exhausted.len() >= EXHAUSTED_MAX {
                exhausted.clear();
            }
            exhausted.insert(
                scope.tenant.to_owned(),
                std::time::Instant::now() + EXHAUSTED_MEMO,
            );
        }
        let (spent, limit, period) = match keys.day_limit {
            Some(l) if spend.day + cost > l => (spend.day, l, "today"),
            _ => (spend.month, keys.month_limit.unwrap_or(0.0), "this month"),
        };
        Err(Refusal::Budget(format!(
            "tenant `{}` has spent ${spent:.4} of its ${limit:.4} budget {period}; {what} may cost up to ${cost:.4}",
            scope.tenant
        )))
    }

    /// Reserves a provider batch call's worst case (at the batch price) on the tenant's budget,
    /// which it holds until the batch ends and [`Self::settle_batch`] prices it; what was
    /// reserved (0 without a budget). Not the job's own reservation: the job is parked, and
    /// that one ends with this run. Rate limits do not apply: batches have their own quotas.
    pub async fn reserve_batch(
        &self,
        scope: &CallScope<'_>,
        model: &ModelPlan,
        request: &crate::provider::ChatRequest,
    ) -> Result<(f64, Option<(String, String)>), Refusal> {
        let Some(keys) = self.budget_keys(scope.tenant) else {
            return Ok((0.0, None));
        };
        let prompt = crate::tokens::prompt(&model.model, request.system.as_deref(), &request.user);
        let cost = model
            .batch_price
            .worst_case()
            .cost(prompt, u64::from(request.max_tokens));
        if cost <= 0.0 {
            return Ok((0.0, None));
        }
        let own = CallScope {
            job_budget: None,
            ..*scope
        };
        let what = format!("a batch call to `{}`", model.alias);
        self.reserve_budget(&own, &what, &keys, cost).await?;
        Ok((cost, Some((keys.day, keys.month))))
    }

    /// Corrects a batch call's reservation by `delta` (its price less what was reserved; minus
    /// the reservation when the batch did not answer it), on the day and month it was reserved
    /// in (`reserved_in`).
    pub async fn settle_batch(
        &self,
        tenant: &str,
        reserved_in: Option<&(String, String)>,
        delta: f64,
    ) {
        if delta == 0.0 {
            return;
        }
        let (Some(mut keys), Some((day, month))) = (self.budget_keys(tenant), reserved_in) else {
            return;
        };
        keys.day.clone_from(day);
        keys.month.clone_from(month);
        match self.state.spend(&keys, delta, false).await {
            Ok(spend) => self.publish_remaining(tenant, &keys, spend.day, spend.month),
            Err(e) => {
                tracing::warn!(tenant, error = %e, "could not settle a batch call's budget reservation")
            }
        }
    }

    /// Corrects the reservation with what the call really used (zero when it failed).
    pub async fn after_call(
        &self,
        reservation: Reservation,
        model: &ModelPlan,
        used_tokens: u64,
        cost: f64,
    ) {
        // First, before anything that waits: a job's settlement must not miss this cost.
        if let Some(job) = &reservation.job {
            job.charge(cost);
        }
        let delta = used_tokens as f64 - reservation.tokens;
        let tenant = self.tenants.get(&reservation.tenant);
        let provider = self
            .providers
            .get(&reservation.provider)
            .copied()
            .unwrap_or_default();
        let user = reservation
            .user_key
            .clone()
            .map(|key| (key, tenant.per_user.tokens_per_min));
        let (t, p, m) = (
            &reservation.tenant,
            &reservation.provider,
            &reservation.model,
        );
        let limits: [(Option<_>, &(dyn Fn() -> String + Sync)); 3] = [
            (tenant.tokens_per_min, &|| format!("t:{t}:tpm")),
            (provider.tpm, &|| format!("p:{p}:tpm")),
            (model.limits.tpm, &|| format!("m:{p}:{m}:tpm")),
        ];
        let keyed = limits
            .into_iter()
            .filter_map(|(limit, key)| limit.map(|l| (key(), Some(l))));
        for (key, limit) in user.into_iter().chain(keyed) {
            if let Some(limit) = limit {
                if let Err(e) = self.state.adjust(&key, delta, per_minute(limit)).await {
                    tracing::debug!(key, error = %e, "could not reconcile a token reservation");
                }
            }
        }
        let settle = cost - reservation.cost;
        if let Some(keys) = reservation.budget.as_ref().filter(|_| settle != 0.0) {
            match self.state.spend(keys, settle, false).await {
                Ok(spend) => {
                    self.publish_remaining(&reservation.tenant, keys, spend.day, spend.month)
                }
                Err(e) => {
                    tracing::warn!(tenant = %reservation.tenant, error = %e, "could not reconcile a budget reservation")
                }
            }
        }
    }

    /// Books the turn of the job `job_key` of `tenant` under the tenant's requests-per-second
    /// limit, shared by every replica (see [`Booking`]): now, after a wait, or (when the wait
    /// is longer than `park_after`) parked with a ticket it runs on when it comes back. Retried
    /// through a store outage; the caller's deadline and shutdown bound the wait.
    pub async fn book_job(
        &self,
        tenant: &str,
        job_key: &str,
        park_after: Option<Duration>,
    ) -> Booking {
        let Some(rps) = self.tenants.get(tenant).rps else {
            return Booking::Now;
        };
        let rate = Rate::new(rps, Duration::from_secs(1), Duration::from_secs(1));
        // `{tenant}`: a Redis Cluster hash tag, so the limiter and the ticket share a slot.
        let key = format!("t:{{{tenant}}}:rps");
        let ticket = format!("t:{{{tenant}}}:ticket:{job_key}");
        loop {
            let booking = self
                .bookings
                .book(&key, ticket.clone(), rate, park_after)
                .await;
            match booking {
                Ok(booking) => {
                    if matches!(booking, Booking::After(_) | Booking::Parked(_)) {
                        self.metrics
                            .ratelimit_throttled
                            .with_label_values(&["tenant_requests"])
                            .inc();
                    }
                    return booking;
                }
                Err(e) => {
                    tracing::warn!(error = %e, tenant, "rate limiter unreachable; the job waits");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }

    /// Gives one unit back to `tenant`'s requests-per-second limiter (best effort).
    pub async fn unbook_job(&self, tenant: &str) {
        let Some(rps) = self.tenants.get(tenant).rps else {
            return;
        };
        let rate = Rate::new(rps, Duration::from_secs(1), Duration::from_secs(1));
        if let Err(e) = self
            .state
            .adjust(&format!("t:{{{tenant}}}:rps"), -1.0, rate)
            .await
        {
            tracing::debug!(error = %e, tenant, "could not give a booked turn back");
        }
    }

    async fn wait(
        &self,
        scope: &CallScope<'_>,
        scope_name: &str,
        key: &str,
        cost: f64,
        rate: Rate,
    ) -> Result<(), Refusal> {
        loop {
            let wait = match self.state.throttle(key, cost, rate).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => {
                    self.metrics
                        .ratelimit_throttled
                        .with_label_values(&[scope_name])
                        .inc();
                    wait
                }
                Err(_) => STORE_RETRY,
            };
            // Spread the wake-ups of waiters that were told the same time.
            let wait = wait + jitter(wait);
            if let Some(deadline) = scope.deadline {
                let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                if left < wait {
                    // Ended at the deadline, not before: a job is never given up early.
                    tokio::time::sleep(left).await;
                    return Err(Refusal::Deadline);
                }
            }
            tokio::time::sleep(wait).await;
            scope.throttled_ms.fetch_add(
                u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
    }

    /// Budget operations are retried through a store outage (a call never runs unreserved),
    /// until the job's deadline.
    async fn retrying<F, Fut>(
        &self,
        scope: &CallScope<'_>,
        op: F,
    ) -> Result<crate::state::Spend, Refusal>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<crate::state::Spend, crate::state::StateError>>,
    {
        loop {
            match op().await {
                Ok(spend) => return Ok(spend),
                Err(e) => {
                    if scope.deadline.is_some_and(|d| d <= Utc::now()) {
                        return Err(Refusal::Deadline);
                    }
                    tracing::warn!(error = %e, "budget store unreachable; the call waits");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }

    fn budget_keys(&self, tenant: &str) -> Option<BudgetKeys> {
        let plan = self.tenants.get(tenant);
        if plan.budget_usd_per_day.is_none() && plan.budget_usd_per_month.is_none() {
            return None;
        }
        let now = Utc::now();
        // `{tenant}` is a Redis Cluster hash tag: the day and month keys, which one script
        // updates together, always live in the same slot.
        Some(BudgetKeys {
            day: format!("{{{tenant}}}:d:{}", now.format("%Y-%m-%d")),
            month: format!("{{{tenant}}}:m:{}", now.format("%Y-%m")),
            day_limit: plan.budget_usd_per_day,
            month_limit: plan.budget_usd_per_month,
        })
    }

    fn publish_remaining(&self, tenant: &str, keys: &BudgetKeys, day: f64, month: f64) {
        if !self.tenants.named.contains_key(tenant) {
            return;
        }
        for (period, spent, limit) in [
            ("day", day, keys.day_limit),
            ("month", month, keys.month_limit),
        ] {
            if let Some(limit) = limit {
                self.metrics
                    .budget_remaining
                    .with_label_values(&[tenant, period])
                    .set((limit - spent).max(0.0));
            }
        }
    }
}

/// Why a job did not get its user's turn now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserWait {
    /// The turn is further off than `limits.park_after_ms`: park the job until then.
    Park(Duration),
    /// The job's deadline passed while it waited.
    Deadline,
}

/// A user's limiter key: the user hashed, so any user string makes a short key of its own.
/// (In braces: a Redis Cluster hash tag, so a user's limiter and its tickets share a slot.)
fn user_key(tenant: &str, user: &str, what: &str) -> String {
    let short = crate::digest::of(user.as_bytes(), 12);
    format!("u:{{{tenant}:{short}}}:{what}")
}

impl Gate {
    /// Books the job's turn under its user's `per_user.rps` (a job with no `user`, or a
    /// tenant without the limit, goes at once), shared by every replica: now, after a short
    /// wait here, or (when `deferrable` and further off than `park_after`) parked with a ticket
    /// the job runs on when it comes back, like a tenant's turn.
    pub async fn user_turn(
        &self,
        tenant: &str,
        user: Option<&str>,
        job_key: &str,
        deadline: Option<chrono::DateTime<Utc>>,
        deferrable: bool,
    ) -> Result<(), UserWait> {
        let (Some(user), Some(rps)) = (user, self.tenants.get(tenant).per_user.rps) else {
            return Ok(());
        };
        let key = user_key(tenant, user, "rps");
        let ticket = format!("{key}:ticket:{job_key}");
        let rate = Rate::new(rps, Duration::from_secs(1), Duration::from_secs(1));
        let park_after = deferrable.then_some(self.park_after);
        let wait = loop {
            match self
                .state
                .book(&key, &[(ticket.as_str(), park_after)], rate)
                .await
            {
                Ok(booked) => match booked.first() {
                    Some(Booking::After(wait)) => break *wait,
                    Some(Booking::Parked(wait)) => {
                        self.metrics
                            .ratelimit_throttled
                            .with_label_values(&["user_requests"])
                            .inc();
                        return Err(UserWait::Park(*wait));
                    }
                    _ => return Ok(()),
                },
                // The store is out: try again, within the deadline.
                Err(_) => {
                    if until(deadline).is_some_and(|left| left < STORE_RETRY) {
                        return Err(UserWait::Deadline);
                    }
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        };
        self.metrics
            .ratelimit_throttled
            .with_label_values(&["user_requests"])
            .inc();
        if let Some(left) = until(deadline).filter(|left| *left < wait) {
            tokio::time::sleep(left).await;
            return Err(UserWait::Deadline);
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// Time left until `deadline`, if there is one.
fn until(deadline: Option<chrono::DateTime<Utc>>) -> Option<Duration> {
    deadline.map(|d| (d - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

fn per_minute(limit: f64) -> Rate {
    Rate::new(limit, MINUTE, MINUTE_BURST)
}

fn jitter(wait: Duration) -> Duration {
    let ceiling = (wait.as_millis() as u64 / 10).clamp(1, 50);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    /// Redis Cluster's slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole key.
    fn slot(key: &str) -> u16 {
        let tagged = key
            .find('{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                rest.find('}')
                    .filter(|&close| close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(key);
        let mut crc: u16 = 0;
        for byte in tagged.bytes() {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    fn a_tenants_budget_keys_share_one_cluster_slot() {
        assert_eq!(slot("123456789"), 12739, "the reference CRC16 value");
        let plan = crate::config::load_str(
            r#"
source: {kind: kafka, brokers: "k:9092", topic: t}
providers:
  llm: {kind: mock}
models:
  small: {provider: llm, model: m}
prompts:
  p: {user: "{{input.text}}"}
pipelines:
  s:
    steps:
      - {name: a, kind: generate, model: small, prompt: p}
tenants:
  default: {budget_usd_per_day: 1, budget_usd_per_month: 10}
"#,
            "t",
            Vec::new(),
        )
        .unwrap();
        let gate = Gate::new(
            &plan,
            StateStore::from(MemoryStore::new(10)),
            Metrics::new().unwrap(),
        );
        for tenant in ["acme", "globex", "a-very-long-tenant-name_42"] {
            let keys = gate.budget_keys(tenant).unwrap();
            // As the Redis store writes them, under its prefix.
            let (day, month) = (
                format!("sy:budget:{}", keys.day),
                format!("sy:budget:{}", keys.month),
            );
            assert_eq!(slot(&day), slot(&month), "{day} and {month}");
        }
    }
}
