//! `generate`: render the prompt and ask the step's model (fixed, or chosen by a route step).

use std::time::Instant;

use super::runner::{RunFailure, StepContext, StepResult};
use super::StepOutput;
use crate::config::{GeneratePlan, ModelChoice};
use crate::model::DeadLetterReason;
use crate::provider::ChatRequest;

pub(super) async fn run(ctx: &StepContext<'_>, plan: &GeneratePlan) -> StepResult {
    let started = Instant::now();
    let alias = match &plan.model {
        ModelChoice::Fixed(alias) => alias.clone(),
        ModelChoice::FromRoute(index) => match ctx.output_of(*index) {
            Some(StepOutput::Routed { model, .. }) => model.clone(),
            _ => {
                return Err(RunFailure {
                    reason: DeadLetterReason::Internal,
                    error: format!(
                        "step `{}` ran before its route step finished",
                        ctx.step.name
                    ),
                    attempts: 0,
                })
            }
        },
    };
    let system = plan
        .prompt
        .system
        .as_ref()
        .map(|t| ctx.render(t, &[]))
        .transpose()?;
    let user = ctx.render(&plan.prompt.user, &[])?;
    let outcome = ctx
        .call(&alias, |m| ChatRequest {
            model: m.model.clone(),
            system: system.clone(),
            user: user.clone(),
            max_tokens: m.max_tokens,
            temperature: m.temperature,
        })
        .await?;
    let record = ctx.record(started, &outcome);
    let output = StepOutput::Generated {
        text: outcome.response.content,
        model: outcome.model.alias.clone(),
        degraded: outcome.degraded,
    };
    Ok((output, record))
}
