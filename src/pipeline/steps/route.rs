//! `route`: map the classify step's category to a model alias; low confidence means review.

use std::time::Instant;

use crate::config::RoutePlan;
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::wire::DeadLetterReason;

impl StepKind for RoutePlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        run(ctx, self)
    }
}

fn run(ctx: &StepContext<'_>, plan: &RoutePlan) -> StepResult {
    let started = Instant::now();
    let Some(StepOutput::Classified {
        category,
        confidence,
        ..
    }) = ctx.output_of(plan.on)
    else {
        return Err(RunFailure {
            reason: DeadLetterReason::Internal,
            error: format!(
                "step `{}` ran before its classify step finished",
                ctx.step.name
            ),
            attempts: 0,
        });
    };
    let model = plan.routes.get(category).unwrap_or(&plan.default).clone();
    let review = plan
        .review_below_confidence
        .is_some_and(|t| *confidence < t);
    let output = StepOutput::Routed {
        category: category.clone(),
        confidence: *confidence,
        model,
        review,
    };
    Ok((output, ctx.local_record(started)))
}
