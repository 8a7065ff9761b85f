//! `classify`: pick one of the step's categories, with a confidence, by LLM or by keyword rules.

use std::time::Instant;

use serde_json::Value;

use crate::config::{ClassifyMethod, ClassifyPlan};
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::provider::ChatRequest;
use crate::wire::DeadLetterReason;

impl StepKind for ClassifyPlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        run(ctx, self).await
    }
}

async fn run(ctx: &StepContext<'_>, plan: &ClassifyPlan) -> StepResult {
    let started = Instant::now();
    match &plan.method {
        ClassifyMethod::Rules(rules) => {
            let text = ctx
                .job
                .input
                .values()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
                .to_lowercase();
            let category = rules
                .iter()
                .find(|(_, keywords)| keywords.iter().any(|k| text.contains(k.as_str())))
                .map(|(c, _)| c.clone())
                .or_else(|| plan.categories.last().cloned())
                .unwrap_or_default();
            Ok((
                StepOutput::Classified {
                    category,
                    confidence: 1.0,
                    degraded: false,
                },
                ctx.local_record(started),
            ))
        }
        ClassifyMethod::Llm { model, prompt } => {
            let system = prompt
                .system
                .as_ref()
                .map(|t| ctx.render(t, &plan.categories))
                .transpose()?;
            let user = ctx.render(&prompt.user, &plan.categories)?;
            let outcome = ctx
                .call(model, |m| ChatRequest {
                    model: m.model.clone(),
                    system: system.clone(),
                    user: user.clone(),
                    max_tokens: m.max_tokens,
                    temperature: m.temperature,
                })
                .await?;
            let record = ctx.record(started, &outcome);
            let (category, confidence) = parse_answer(&outcome.response.content, &plan.categories)
                .map_err(|e| RunFailure {
                    reason: DeadLetterReason::OutputInvalid,
                    error: format!("step `{}`: {e}", ctx.step.name),
                    attempts: outcome.attempts,
                })?;
            Ok((
                StepOutput::Classified {
                    category,
                    confidence,
                    degraded: outcome.degraded,
                },
                record,
            ))
        }
    }
}

/// Reads `{"category": .., "confidence": ..}` (code fences and surrounding prose tolerated) or a
/// bare category name.
fn parse_answer(content: &str, categories: &[String]) -> Result<(String, f64), String> {
    let trimmed = content.trim();
    let json = match (trimmed.find('{'), trimmed.rfind('}')) {
        (Some(a), Some(b)) if a < b => serde_json::from_str::<Value>(&trimmed[a..=b]).ok(),
        _ => None,
    };
    let (category, confidence) = match &json {
        Some(v) => (
            v.get("category")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .trim()
                .to_owned(),
            v.get("confidence").and_then(Value::as_f64).unwrap_or(1.0),
        ),
        None => (
            trimmed
                .trim_matches(|c: char| c == '"' || c == '.' || c.is_whitespace())
                .to_owned(),
            1.0,
        ),
    };
    let found = categories
        .iter()
        .find(|c| c.eq_ignore_ascii_case(&category))
        .ok_or_else(|| {
            let shown: String = content.chars().take(120).collect();
            format!(
                "the model answered {shown:?}, which names none of the categories [{}]",
                categories.join(", ")
            )
        })?;
    Ok((found.clone(), confidence.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cats() -> Vec<String> {
        vec!["billing".into(), "technical".into()]
    }

    #[test]
    fn reads_json_fenced_json_and_bare_names() {
        assert_eq!(
            parse_answer(r#"{"category":"billing","confidence":0.8}"#, &cats()).unwrap(),
            ("billing".into(), 0.8)
        );
        let fenced = "```json\n{\"category\": \"Technical\", \"confidence\": 0.6}\n```";
        assert_eq!(
            parse_answer(fenced, &cats()).unwrap(),
            ("technical".into(), 0.6)
        );
        assert_eq!(
            parse_answer("billing.", &cats()).unwrap(),
            ("billing".into(), 1.0)
        );
    }

    #[test]
    fn an_unknown_category_is_an_error_that_quotes_the_answer() {
        let err = parse_answer(r#"{"category":"sales"}"#, &cats()).unwrap_err();
        assert!(
            err.contains("sales") && err.contains("billing, technical"),
            "{err}"
        );
    }
}
