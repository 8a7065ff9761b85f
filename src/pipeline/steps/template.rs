//! `template`: text or JSON assembled from earlier outputs, without a provider call (the merge
//! of a fan-out, or the shape of the job's answer).

use std::time::Instant;

use serde_json::{Map, Value};

use crate::config::{Assemble, JsonTemplate};
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};

impl StepKind for Assemble {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        let started = Instant::now();
        let value = assemble(ctx, self)?;
        let output = StepOutput::Value {
            value,
            fields: Map::new(),
            degraded: false,
        };
        Ok((output, ctx.local_record(started)))
    }
}

/// The assembled value: rendered text, or the JSON template with every variable filled in.
pub(crate) fn assemble(ctx: &StepContext<'_>, assemble: &Assemble) -> Result<Value, RunFailure> {
    match assemble {
        Assemble::Text(template) => Ok(Value::String(ctx.render(template, &[])?)),
        Assemble::Json(json) => fill(ctx, json),
    }
}

fn fill(ctx: &StepContext<'_>, json: &JsonTemplate) -> Result<Value, RunFailure> {
    Ok(match json {
        JsonTemplate::Literal(value) => value.clone(),
        JsonTemplate::Var(var) => ctx.value_of(var)?,
        JsonTemplate::Text(template) => Value::String(ctx.render(template, &[])?),
        JsonTemplate::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| fill(ctx, item))
                .collect::<Result<_, _>>()?,
        ),
        JsonTemplate::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, item)| Ok((key.clone(), fill(ctx, item)?)))
                .collect::<Result<_, RunFailure>>()?,
        ),
    })
}
