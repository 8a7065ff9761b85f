//! `generate`: render the prompt and ask the step's model (fixed, or chosen by a route step).

use std::time::Instant;

use super::structured;
use crate::config::{GeneratePlan, ModelChoice};
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::provider::ChatRequest;
use crate::wire::DeadLetterReason;

impl StepKind for GeneratePlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        run(ctx, self).await
    }
}

async fn run(ctx: &StepContext<'_>, plan: &GeneratePlan) -> StepResult {
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
    let request = |user: &str| {
        let system = system.clone();
        let user = user.to_owned();
        move |m: &crate::config::ModelPlan| ChatRequest {
            model: m.model.clone(),
            system: system.clone(),
            user: user.clone(),
            max_tokens: m.max_tokens,
            temperature: m.temperature,
        }
    };
    let mut outcome = ctx.call(&alias, request(&user)).await?;
    let mut record = ctx.record(started, &outcome);
    let json = match &plan.output {
        None => None,
        Some(schema) => {
            // Validate; on failure ask again with the error, at most `max_repairs` times.
            let mut repairs = 0;
            loop {
                match structured::check(&outcome.response.content, schema) {
                    Ok(value) => break Some(value),
                    Err(problem) if repairs < schema.max_repairs => {
                        repairs += 1;
                        tracing::debug!(step = %ctx.step.name, repairs, problem = %problem, "answer does not satisfy the output schema; asking for a repair");
                        let repair =
                            structured::repair_prompt(&user, &outcome.response.content, &problem);
                        let attempts = record.attempts;
                        let (input, output, cost) =
                            (record.input_tokens, record.output_tokens, record.cost_usd);
                        outcome = ctx.call(&alias, request(&repair)).await?;
                        record = ctx.record(started, &outcome);
                        record.attempts += attempts;
                        record.input_tokens += input;
                        record.output_tokens += output;
                        record.cost_usd += cost;
                    }
                    Err(problem) => {
                        return Err(RunFailure {
                            reason: DeadLetterReason::OutputInvalid,
                            error: format!(
                                "step `{}`: the answer does not satisfy {} after {repairs} repair attempt(s): {problem}",
                                ctx.step.name, schema.path
                            ),
                            attempts: record.attempts,
                        });
                    }
                }
            }
        }
    };
    let output = StepOutput::Generated {
        text: outcome.response.content,
        model: outcome.model.alias.clone(),
        degraded: outcome.degraded,
        json,
    };
    Ok((output, record))
}
