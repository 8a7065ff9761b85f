//! `map` and `reduce`: one LLM call per chunk of a split step (each call with the usual
//! retries and fallbacks, on the generate pool), then one call that combines the answers,
//! reducing in groups first when they are too long for one prompt.

use std::time::Instant;

use futures::future::try_join_all;
use serde_json::{Map, Value};

use crate::config::{MapPlan, ModelPlan, PromptPlan, ReducePlan};
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::provider::ChatRequest;
use crate::wire::{DeadLetterReason, StepRecord};

/// Between two mapped answers in `{{mapped}}`.
const SEPARATOR: &str = "\n\n---\n\n";
/// Most levels of a hierarchical reduce.
const MAX_LEVELS: u32 = 16;

/// One answer of a many-call step, with its record.
pub(super) struct Answer {
    pub text: String,
    pub record: StepRecord,
    pub degraded: bool,
}

/// Renders `prompt` with `locals` and asks `alias`.
pub(super) async fn ask(
    ctx: &StepContext<'_>,
    alias: &str,
    prompt: &PromptPlan,
    locals: &[(&str, &str)],
) -> Result<Answer, RunFailure> {
    let started = Instant::now();
    let system = prompt
        .system
        .as_ref()
        .map(|t| ctx.render_with(t, &[], locals))
        .transpose()?;
    let user = ctx.render_with(&prompt.user, &[], locals)?;
    let outcome = ctx
        .call(alias, |m: &ModelPlan| {
            ChatRequest::to(m, &system, &user).from_prompt(&prompt.name)
        })
        .await?;
    let mut record = ctx.record(started, &outcome);
    record.prompt = Some(prompt.name.clone());
    Ok(Answer {
        record,
        degraded: outcome.degraded,
        text: outcome.response.content,
    })
}

/// The texts of an earlier step's array output (a split's chunks, a map's answers).
fn items_of(ctx: &StepContext<'_>, index: usize) -> Result<Vec<String>, RunFailure> {
    match ctx.output_of(index).map(|o| o.output()) {
        Some(Value::Array(items)) => Ok(items
            .iter()
            .map(|v| {
                let mut text = String::new();
                crate::template::to_text(v, &mut text);
                text
            })
            .collect()),
        Some(Value::Null) => Ok(Vec::new()),
        _ => Err(RunFailure {
            reason: DeadLetterReason::Internal,
            error: format!(
                "step `{}` found no list of items in the step it works over",
                ctx.step.name
            ),
            attempts: 0,
        }),
    }
}

pub(super) fn finish(ctx: &StepContext<'_>, started: Instant, answers: &[Answer]) -> StepRecord {
    let mut record = ctx.local_record(started);
    for answer in answers {
        StepContext::absorb(&mut record, &answer.record);
    }
    record.cached = !answers.is_empty() && answers.iter().all(|a| a.record.cached);
    record.throttled_ms = ctx.throttled_ms.load(std::sync::atomic::Ordering::Relaxed);
    record
}

impl StepKind for MapPlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        let started = Instant::now();
        let chunks = items_of(ctx, self.over)?;
        let count = chunks.len().to_string();
        let answers = try_join_all(chunks.iter().enumerate().map(|(i, chunk)| {
            let index = i.to_string();
            let count = count.clone();
            async move {
                let locals = [
                    ("chunk", chunk.as_str()),
                    ("chunk_index", index.as_str()),
                    ("chunk_count", count.as_str()),
                ];
                ask(ctx, &self.model, &self.prompt, &locals).await
            }
        }))
        .await?;
        let mut record = finish(ctx, started, &answers);
        record.chunks = Some(u32::try_from(answers.len()).unwrap_or(u32::MAX));
        let mut fields = Map::new();
        fields.insert("count".into(), Value::from(answers.len()));
        let output = StepOutput::Value {
            degraded: answers.iter().any(|a| a.degraded),
            value: Value::Array(answers.into_iter().map(|a| Value::String(a.text)).collect()),
            fields,
        };
        Ok((output, record))
    }
}

impl StepKind for ReducePlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        let started = Instant::now();
        let mut level = items_of(ctx, self.over)?;
        let mut answers: Vec<Answer> = Vec::new();
        let mut levels = 0;
        // While the answers are too long for one prompt, reduce consecutive groups of them.
        while level.len() > 1 && joined_chars(&level) > self.max_input_chars {
            levels += 1;
            if levels > MAX_LEVELS {
                return Err(RunFailure {
                    reason: DeadLetterReason::OutputInvalid,
                    error: format!(
                        "step `{}`: the answers are still longer than max_input_chars ({}) after {MAX_LEVELS} levels of reduction",
                        ctx.step.name, self.max_input_chars
                    ),
                    attempts: 0,
                });
            }
            let groups = group(&level, self.max_input_chars);
            let reduced = try_join_all(groups.iter().map(|g| {
                let mapped = g.join(SEPARATOR);
                async move { ask(ctx, &self.model, &self.prompt, &[("mapped", &mapped)]).await }
            }))
            .await?;
            level = reduced.iter().map(|a| a.text.clone()).collect();
            answers.extend(reduced);
        }
        let mapped = level.join(SEPARATOR);
        let last = ask(ctx, &self.model, &self.prompt, &[("mapped", &mapped)]).await?;
        let text = last.text.clone();
        answers.push(last);
        let record = finish(ctx, started, &answers);
        let mut fields = Map::new();
        fields.insert("levels".into(), Value::from(levels + 1));
        let output = StepOutput::Value {
            value: Value::String(text),
            fields,
            degraded: answers.iter().any(|a| a.degraded),
        };
        Ok((output, record))
    }
}

fn joined_chars(items: &[String]) -> usize {
    items.iter().map(|s| s.chars().count()).sum::<usize>()
        + SEPARATOR.len() * items.len().saturating_sub(1)
}

/// Consecutive groups whose joined text fits `max` characters, at least two items each (so
/// every level shrinks the list, even when single answers are long).
fn group(items: &[String], max: usize) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for item in items {
        let mut candidate = current.clone();
        candidate.push(item.clone());
        if current.len() >= 2 && joined_chars(&candidate) > max {
            groups.push(std::mem::take(&mut current));
        }
        current.push(item.clone());
    }
    if current.len() == 1 {
        match groups.last_mut() {
            Some(last) => last.append(&mut current),
            None => groups.push(current),
        }
    } else if !current.is_empty() {
        groups.push(current);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_fit_and_always_shrink_the_list() {
        let items: Vec<String> = (0..7).map(|i| format!("{i}").repeat(10)).collect();
        let groups = group(&items, 30);
        assert!(groups.len() < items.len());
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 7);
        assert!(groups.iter().all(|g| g.len() >= 2));
        // Answers longer than the limit on their own are still paired.
        let long: Vec<String> = (0..4).map(|_| "x".repeat(100)).collect();
        assert_eq!(group(&long, 50).len(), 2);
    }
}
