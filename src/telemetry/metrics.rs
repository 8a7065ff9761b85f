//! Prometheus metrics: every name and label in one place (`docs/architecture.md`, section 6).
//!
//! Labels are bounded by configuration: pipeline and step names, provider and model names from
//! the plan, fixed enums for status, outcome, reason and direction. Nothing job- or user-derived
//! becomes a label. Histograms use buckets for LLM latencies (10 ms to 120 s).

use std::sync::{Arc, Mutex};

use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use tokio::sync::Semaphore;

const NAMESPACE: &str = "switchyard";
const LATENCY_BUCKETS: [f64; 15] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0,
];

/// The series every attempt on one provider + model updates: its latency, tokens and spend
/// (the request count is labelled by prompt and outcome too, so it is looked up per attempt).
#[derive(Clone)]
pub struct LlmSeries {
    duration: Histogram,
    input_tokens: IntCounter,
    output_tokens: IntCounter,
    cost: Counter,
}

impl LlmSeries {
    /// Records the usage and spend of a successful provider call.
    pub fn usage(&self, input_tokens: u64, output_tokens: u64, cost_usd: f64) {
        self.input_tokens.inc_by(input_tokens);
        self.output_tokens.inc_by(output_tokens);
        if cost_usd.is_finite() && cost_usd > 0.0 {
            self.cost.inc_by(cost_usd);
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub jobs_received: IntCounterVec,
    pub jobs_finished: IntCounterVec,
    pub job_duration: HistogramVec,
    pub queue_wait: Histogram,
    pub step_duration: HistogramVec,
    pub llm_requests: IntCounterVec,
    pub llm_request_duration: HistogramVec,
    pub llm_tokens: IntCounterVec,
    pub llm_cost: CounterVec,
    pub dead_letters: IntCounterVec,
    pub inflight: IntGauge,
    pub pool_permits: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub circuit_state: IntGaugeVec,
    pub ratelimit_throttled: IntCounterVec,
    pub budget_remaining: GaugeVec,
    pub budget_limit: GaugeVec,
    pub tenant_queued: IntGauge,
    pub job_wait: HistogramVec,
    pub jobs_parked: IntCounterVec,
    pub intake_pauses: IntCounter,
    pub job_panics: IntCounter,
    pub cache_requests: IntCounterVec,
    pub guardrail_verdicts: IntCounterVec,
    pub experiment_assignments: IntCounterVec,
    pub reviews_pending: IntGaugeVec,
    pub semantic_cache_requests: IntCounterVec,
    pub batch_jobs: IntCounterVec,
    pub batch_requests: IntCounterVec,
    pub semantic_similarity: Histogram,
    pub review_decisions: IntCounterVec,
    pub pii_redacted: IntCounterVec,
    pub tenant_tokens: IntCounterVec,
    pub tenant_cost: CounterVec,
    /// Worker pools whose free permits a scrape reports, by pool name.
    pools: Mutex<Vec<(&'static str, Arc<Semaphore>)>>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn histogram(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(LATENCY_BUCKETS.to_vec())
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new();
        let m = Self {
            jobs_received: IntCounterVec::new(opts("jobs_received_total", "Messages taken from the source."), &["source"])?,
            jobs_finished: IntCounterVec::new(
                opts("jobs_finished_total", "Jobs whose output was confirmed, by pipeline and status (ok, degraded, review, dead_letter, duplicate)."),
                &["pipeline", "status"],
            )?,
            job_duration: HistogramVec::new(
                histogram("job_duration_seconds", "From receipt to confirmed output."),
                &["pipeline"],
            )?,
            queue_wait: Histogram::with_opts(histogram(
                "queue_wait_seconds",
                "From receipt until the pipeline starts (idempotency claim and admission).",
            ))?,
            step_duration: HistogramVec::new(histogram("step_duration_seconds", "One pipeline step, including its pool wait."), &["step"])?,
            llm_requests: IntCounterVec::new(
                opts("llm_requests_total", "Provider attempts by prompt (name@version, `-` for none) and outcome (ok or the error class)."),
                &["provider", "model", "prompt", "outcome"],
            )?,
            llm_request_duration: HistogramVec::new(
                histogram("llm_request_duration_seconds", "One provider attempt."),
                &["provider", "model"],
            )?,
            llm_tokens: IntCounterVec::new(
                opts("llm_tokens_total", "Tokens reported by providers (direction: input, output)."),
                &["provider", "model", "direction"],
            )?,
            llm_cost: CounterVec::new(opts("llm_cost_usd_total", "Spend from the model price table, in USD."), &["provider", "model"])?,
            dead_letters: IntCounterVec::new(opts("dead_letters_total", "Dead letters written, by reason."), &["reason"])?,
            inflight: IntGauge::with_opts(opts("inflight_jobs", "Jobs taken from the source and not yet finished."))?,
            pool_permits: IntGaugeVec::new(opts("pool_available_permits", "Free permits of each step kind's worker pool."), &["pool"])?,
            consumer_lag: IntGaugeVec::new(
                opts("consumer_lag", "Messages waiting for this consumer (Kafka: summed partition lag; NATS: consumer pending)."),
                &["source"],
            )?,
            circuit_state: IntGaugeVec::new(
                opts("circuit_state", "Circuit breaker per provider and model: 0 closed, 1 half-open, 2 open."),
                &["provider", "model"],
            )?,
            ratelimit_throttled: IntCounterVec::new(
                opts("ratelimit_throttled_total", "Times a limiter held work back, by scope (tenant_requests, tenant_tokens, tenant_budget, provider_requests, provider_tokens, model_requests, model_tokens; retry_budget: a retry skipped because the provider's retry budget was spent)."),
                &["scope"],
            )?,
            budget_remaining: GaugeVec::new(
                opts("budget_remaining_usd", "Budget left for tenants named in config, by period (day, month), as last seen by this replica."),
                &["tenant", "period"],
            )?,
            budget_limit: GaugeVec::new(
                opts("budget_limit_usd", "Configured budget of tenants named in config, by period (day, month)."),
                &["tenant", "period"],
            )?,
            tenant_queued: IntGauge::with_opts(opts("scheduler_queued_jobs", "Jobs holding their claim and waiting for a run slot in their tenant's queue."))?,
            job_wait: HistogramVec::new(
                histogram("job_wait_seconds", "Why a job waited before its pipeline ran, per job and reason: tenant_rate (for its turn under its tenant's requests per second), run_slot (for a free run slot once its turn had come), parked (handed back to the broker until its turn: nak with delay or the Kafka delay topic). Waits of zero are not observed."),
                &["reason"],
            )?,
            jobs_parked: IntCounterVec::new(
                opts("jobs_parked_total", "Jobs handed back to the broker to come again later instead of waiting in the process, by reason (rate_limit: their turn was more than limits.park_after_ms off; queue_full: their tenant's queue was at its bound; user_rate: their user's per_user.rps turn was more than limits.park_after_ms off)."),
                &["reason"],
            )?,
            job_panics: IntCounter::with_opts(opts(
                "job_panics_total",
                "Job tasks that panicked; each such job was dead-lettered as internal (a bug to report).",
            ))?,
            intake_pauses: IntCounter::with_opts(opts(
                "intake_pauses_total",
                "Times intake paused the source because in-flight jobs stayed at limits.max_inflight_jobs.",
            ))?,
            cache_requests: IntCounterVec::new(opts("cache_requests_total", "Response cache lookups by result (hit, miss)."), &["result"])?,
            experiment_assignments: IntCounterVec::new(
                opts("experiment_assignments_total", "Jobs run in an experiment's variant, by pipeline, experiment and variant (units outside the rollout are not counted)."),
                &["pipeline", "experiment", "variant"],
            )?,
            batch_jobs: IntCounterVec::new(
                opts("batch_jobs_total", "Jobs that waited for a provider batch, by event (parked: for a batch round; finished: their outcome written after it)."),
                &["event"],
            )?,
            batch_requests: IntCounterVec::new(
                opts("batch_requests_total", "Provider batch requests by event (submitted; answered; failed: the batch did not answer it, so it was called directly)."),
                &["event"],
            )?,
            semantic_cache_requests: IntCounterVec::new(
                opts("semantic_cache_requests_total", "Semantic cache lookups by result (hit: a stored question at or above the threshold answered; miss)."),
                &["result"],
            )?,
            semantic_similarity: Histogram::with_opts(
                HistogramOpts::new("semantic_cache_similarity", "The best cosine similarity of each semantic cache lookup that had entries to compare.")
                    .namespace(NAMESPACE)
                    .buckets(vec![0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0]),
            )?,
            reviews_pending: IntGaugeVec::new(
                opts("reviews_pending", "Reviews waiting for a decision, by tenant (read from the state store, so every replica reports the same: aggregate with max())."),
                &["tenant"],
            )?,
            review_decisions: IntCounterVec::new(
                opts("review_decisions_total", "Review decisions applied, by decision (approve, edit, reject; expired_approve, expired_reject, expired_rerun for timed-out reviews; duplicate: the same decision again; refused: dead-lettered as decision_refused)."),
                &["decision"],
            )?,
            guardrail_verdicts: IntCounterVec::new(
                opts("guardrail_verdicts_total", "Guardrail checks by pipeline, side (input, output) and verdict (pass; blocked: a limit or pattern matched; error: the check could not run, so the job was not passed)."),
                &["pipeline", "side", "verdict"],
            )?,
            pii_redacted: IntCounterVec::new(
                opts("pii_redacted_total", "PII values replaced by guardrails, by side and kind (email, phone, card, iban, national_id)."),
                &["side", "kind"],
            )?,
            tenant_tokens: IntCounterVec::new(
                opts("tenant_tokens_total", "Tokens of finished jobs by tenant (tenants named in config; the rest are `other`) and direction."),
                &["tenant", "direction"],
            )?,
            tenant_cost: CounterVec::new(
                opts("tenant_cost_usd_total", "Spend of finished jobs by tenant (tenants named in config; the rest are `other`), in USD."),
                &["tenant"],
            )?,
            registry,
            pools: Mutex::new(Vec::new()),
        };
        m.registry.register(Box::new(m.jobs_received.clone()))?;
        m.registry.register(Box::new(m.jobs_finished.clone()))?;
        m.registry.register(Box::new(m.job_duration.clone()))?;
        m.registry.register(Box::new(m.queue_wait.clone()))?;
        m.registry.register(Box::new(m.step_duration.clone()))?;
        m.registry.register(Box::new(m.llm_requests.clone()))?;
        m.registry
            .register(Box::new(m.llm_request_duration.clone()))?;
        m.registry.register(Box::new(m.llm_tokens.clone()))?;
        m.registry.register(Box::new(m.llm_cost.clone()))?;
        m.registry.register(Box::new(m.dead_letters.clone()))?;
        m.registry.register(Box::new(m.inflight.clone()))?;
        m.registry.register(Box::new(m.pool_permits.clone()))?;
        m.registry.register(Box::new(m.consumer_lag.clone()))?;
        m.registry.register(Box::new(m.circuit_state.clone()))?;
        m.registry
            .register(Box::new(m.ratelimit_throttled.clone()))?;
        m.registry.register(Box::new(m.budget_remaining.clone()))?;
        m.registry.register(Box::new(m.budget_limit.clone()))?;
        m.registry.register(Box::new(m.tenant_queued.clone()))?;
        m.registry.register(Box::new(m.job_wait.clone()))?;
        m.registry.register(Box::new(m.jobs_parked.clone()))?;
        m.registry.register(Box::new(m.intake_pauses.clone()))?;
        m.registry.register(Box::new(m.job_panics.clone()))?;
        m.registry.register(Box::new(m.cache_requests.clone()))?;
        m.registry
            .register(Box::new(m.guardrail_verdicts.clone()))?;
        m.registry.register(Box::new(m.pii_redacted.clone()))?;
        m.registry
            .register(Box::new(m.experiment_assignments.clone()))?;
        m.registry.register(Box::new(m.reviews_pending.clone()))?;
        m.registry
            .register(Box::new(m.semantic_cache_requests.clone()))?;
        m.registry.register(Box::new(m.batch_jobs.clone()))?;
        m.registry.register(Box::new(m.batch_requests.clone()))?;
        m.registry
            .register(Box::new(m.semantic_similarity.clone()))?;
        m.registry.register(Box::new(m.review_decisions.clone()))?;
        m.registry.register(Box::new(m.tenant_tokens.clone()))?;
        m.registry.register(Box::new(m.tenant_cost.clone()))?;
        Ok(Arc::new(m))
    }

    /// Lets scrapes report a worker pool's free permits as `pool_available_permits{pool=name}`.
    pub fn watch_pool(&self, name: &'static str, pool: Arc<Semaphore>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|(n, _)| *n != name);
        pools.push((name, pool));
    }

    /// The series of one provider + model, looked up once by whoever calls it often.
    pub fn llm_series(&self, provider: &str, model: &str) -> LlmSeries {
        LlmSeries {
            duration: self
                .llm_request_duration
                .with_label_values(&[provider, model]),
            input_tokens: self
                .llm_tokens
                .with_label_values(&[provider, model, "input"]),
            output_tokens: self
                .llm_tokens
                .with_label_values(&[provider, model, "output"]),
            cost: self.llm_cost.with_label_values(&[provider, model]),
        }
    }

    /// Records one provider attempt (`series`: the provider + model's, from [`Self::llm_series`]).
    pub fn llm_attempt(
        &self,
        series: &LlmSeries,
        [provider, model, prompt, outcome]: [&str; 4],
        seconds: f64,
    ) {
        self.llm_requests
            .with_label_values(&[provider, model, prompt, outcome])
            .inc();
        series.duration.observe(seconds);
    }

    /// Records one guardrail check: its verdict and what it redacted.
    pub fn guardrail(&self, pipeline: &str, side: &str, verdict: &crate::guardrails::Verdict) {
        use crate::guardrails::Verdict;
        let name = match verdict {
            Verdict::Pass { redacted } => {
                for (kind, n) in redacted {
                    self.pii_redacted
                        .with_label_values(&[side, kind])
                        .inc_by(u64::from(*n));
                }
                "pass"
            }
            Verdict::Blocked { .. } => "blocked",
            Verdict::Error { .. } => "error",
        };
        self.guardrail_verdicts
            .with_label_values(&[pipeline, side, name])
            .inc();
    }

    /// Records the usage and spend of a successful provider call.
    pub fn llm_usage(
        &self,
        provider: &str,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
        cost_usd: f64,
    ) {
        self.llm_series(provider, model)
            .usage(input_tokens, output_tokens, cost_usd);
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        for (name, pool) in self.pools.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            self.pool_permits
                .with_label_values(&[name])
                .set(pool.available_permits() as i64);
        }
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
