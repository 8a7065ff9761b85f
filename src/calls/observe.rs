//! One metrics update and one log record per provider attempt. The record names its step and
//! carries the job, tenant and pipeline from the job's span; prompt and response text only
//! with `log.payloads: true`.

use std::time::Duration;

use super::Calls;
use crate::config::ModelPlan;
use crate::provider::{ChatRequest, ChatResponse, ProviderError};
use crate::telemetry::metrics::LlmSeries;

/// Which call an attempt belonged to.
pub(super) struct Call<'a> {
    pub provider: &'a str,
    /// The pipeline step that made it.
    pub step: Option<&'a str>,
    pub model: &'a ModelPlan,
    pub request: &'a ChatRequest,
    /// The provider + model's metric series, when looked up already.
    pub series: Option<&'a LlmSeries>,
}

impl Calls {
    pub(super) fn observe(
        &self,
        call: Call<'_>,
        attempt: u32,
        result: &Result<ChatResponse, ProviderError>,
        elapsed: Duration,
    ) {
        let Call {
            provider,
            step,
            model,
            request,
            series,
        } = call;
        let looked_up;
        let series = match series {
            Some(series) => series,
            None => {
                looked_up = self.metrics.llm_series(provider, &model.model);
                &looked_up
            }
        };
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        // Prompt names come from config: a bounded label.
        let prompt = request.prompt.as_deref().unwrap_or("-");
        self.metrics.llm_attempt(
            series,
            [provider, &model.model, prompt, outcome],
            elapsed.as_secs_f64(),
        );
        let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(r) => {
                let cost_usd = model.response_cost(r);
                series.usage(r.input_tokens, r.output_tokens, cost_usd);
                if self.log_payloads {
                    // Texts go to the log with PII redacted, whatever the pipeline's guardrails.
                    let scrub = crate::guardrails::scrub_for_log;
                    tracing::info!(target: "switchyard::llm", provider, step, model = %model.model, prompt_version = prompt, attempt, outcome, latency_ms,
                        input_tokens = r.input_tokens, output_tokens = r.output_tokens, cost_usd,
                        prompt = %scrub(&request.user), system = %scrub(request.system.as_deref().unwrap_or_default()),
                        response = %scrub(&r.content), "provider call");
                } else {
                    // Per call, so DEBUG: at INFO the job's one "job finished" line carries its
                    // totals, and metrics count every call (a line per call cost a tenth of a
                    // busy replica's CPU).
                    tracing::debug!(target: "switchyard::llm", provider, step, model = %model.model, prompt_version = prompt, attempt, outcome, latency_ms,
                        input_tokens = r.input_tokens, output_tokens = r.output_tokens, cost_usd, "provider call");
                }
            }
            Err(error) => {
                tracing::info!(target: "switchyard::llm", provider, step, model = %model.model, prompt_version = prompt, attempt, outcome, latency_ms,
                    input_tokens = 0u64, output_tokens = 0u64, cost_usd = 0.0, error = %error, "provider call");
            }
        }
    }
}
