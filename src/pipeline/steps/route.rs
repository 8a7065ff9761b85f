//! `route`: map the classify step's category to a target (a model alias, a prompt, a branch
//! name later steps test in `when:`); low confidence means review.

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
    let target = plan.routes.get(category).unwrap_or(&plan.default);
    let pick = |f: fn(&crate::config::RouteTarget) -> &Option<String>| {
        f(target).clone().or_else(|| f(&plan.default).clone())
    };
    let review = plan
        .review_below_confidence
        .is_some_and(|t| *confidence < t);
    let output = StepOutput::Routed {
        category: category.clone(),
        confidence: *confidence,
        model: pick(|t| &t.model).unwrap_or_default(),
        prompt: pick(|t| &t.prompt),
        // A target without its own branch name is the category's branch.
        branch: target.branch.clone().unwrap_or_else(|| category.clone()),
        review,
    };
    Ok((output, ctx.local_record(started)))
}
