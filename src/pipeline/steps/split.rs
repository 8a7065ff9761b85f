//! `split`: a long text (or a JSON array) into chunks for a `map` step, by characters or
//! tokens with overlap, at most `max_chunks` of them.

use std::time::Instant;

use serde_json::{Map, Value};

use crate::config::{SplitBy, SplitPlan, SplitSource};
use crate::pipeline::chunk;
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::wire::DeadLetterReason;

impl StepKind for SplitPlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        let started = Instant::now();
        let invalid = |error: String| RunFailure {
            reason: DeadLetterReason::InvalidJob,
            error: format!("step `{}`: {error}", ctx.step.name),
            attempts: 0,
        };
        let value = match &self.from {
            SplitSource::Input(field) => ctx
                .input
                .get(field)
                .filter(|v| !v.is_null())
                .cloned()
                .ok_or_else(|| invalid(format!("job input has no field `{field}` to split")))?,
            SplitSource::Step(index) => ctx
                .output_of(*index)
                .map(|o| o.output())
                .ok_or_else(|| invalid("the step it splits has not finished".into()))?,
        };
        let chunks: Vec<Value> = match (&self.by, value) {
            (SplitBy::JsonArray, Value::Array(items)) => {
                if items.len() > self.max_chunks {
                    return Err(invalid(format!(
                        "the array has {} items; max_chunks is {}",
                        items.len(),
                        self.max_chunks
                    )));
                }
                items
            }
            (SplitBy::JsonArray, other) => {
                return Err(invalid(format!(
                    "`by: json_array` needs an array, got {}",
                    crate::wire::json_kind(&other)
                )))
            }
            (by, value) => {
                let mut text = String::new();
                crate::template::to_text(&value, &mut text);
                let pieces = match by {
                    SplitBy::Chars { size, overlap } => {
                        chunk::by_chars(&text, *size, *overlap, self.max_chunks)
                    }
                    SplitBy::Tokens {
                        size,
                        overlap,
                        model,
                    } => {
                        let bpe = crate::tokens::encoder(model);
                        chunk::by_tokens(
                            &text,
                            *size,
                            *overlap,
                            self.max_chunks,
                            &|t| bpe.encode_ordinary(t),
                            &|ids| bpe.decode(ids).ok(),
                        )
                    }
                    SplitBy::JsonArray => Ok(Vec::new()),
                };
                pieces
                    .map_err(invalid)?
                    .into_iter()
                    .map(Value::String)
                    .collect()
            }
        };
        let mut record = ctx.local_record(started);
        record.chunks = Some(u32::try_from(chunks.len()).unwrap_or(u32::MAX));
        let mut fields = Map::new();
        fields.insert("count".into(), Value::from(chunks.len()));
        let output = StepOutput::Value {
            value: Value::Array(chunks),
            fields,
            degraded: false,
        };
        Ok((output, record))
    }
}
