//! `classify`: pick one of the step's categories, with a confidence, by LLM or by keyword rules.

use std::time::Instant;

use serde_json::Value;

use crate::config::{ClassifyMethod, ClassifyPlan, RulePlan};
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
        ClassifyMethod::Rules { rules, otherwise } => {
            let text = ctx
                .input
                .values()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n");
            let text = Text::new(&text);
            let (category, confidence) = rules
                .iter()
                .find(|rule| text.passes(rule))
                .map(|rule| (rule.category.clone(), rule.confidence))
                .unwrap_or_else(|| otherwise.clone());
            Ok((
                StepOutput::Classified {
                    category,
                    confidence,
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
                .call(model, |m| {
                    ChatRequest::to(m, &system, &user).from_prompt(&prompt.name)
                })
                .await?;
            let mut record = ctx.record(started, &outcome);
            record.prompt = Some(prompt.name.clone());
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

/// The job's text as the rules test it, with what several rules share computed once.
struct Text<'a> {
    raw: &'a str,
    lower: String,
    chars: usize,
    code: std::cell::OnceCell<bool>,
}

impl<'a> Text<'a> {
    fn new(raw: &'a str) -> Self {
        Self {
            raw,
            lower: raw.to_lowercase(),
            chars: raw.chars().count(),
            code: std::cell::OnceCell::new(),
        }
    }

    /// Every test the rule sets passes (a rule with no tests always passes).
    fn passes(&self, rule: &RulePlan) -> bool {
        (rule.keywords.is_empty()
            || rule
                .keywords
                .iter()
                .any(|k| self.lower.contains(k.as_str())))
            && rule.regex.as_ref().is_none_or(|r| r.is_match(self.raw))
            && rule.min_chars.is_none_or(|n| self.chars >= n)
            && rule.max_chars.is_none_or(|n| self.chars <= n)
            && rule
                .looks_like_code
                .is_none_or(|want| *self.code.get_or_init(|| looks_like_code(self.raw)) == want)
    }
}

/// Whether text reads as source code: a fenced block, or at least two lines (and a fifth of
/// the non-empty ones) that end in `;`, `{` or `}`, start with a keyword of common languages,
/// or hold an arrow or call syntax.
pub(crate) fn looks_like_code(text: &str) -> bool {
    if text.contains("```") {
        return true;
    }
    const STARTS: [&str; 14] = [
        "def ",
        "fn ",
        "function ",
        "class ",
        "import ",
        "from ",
        "#include",
        "public ",
        "private ",
        "return ",
        "const ",
        "let ",
        "var ",
        "SELECT ",
    ];
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let code = lines
        .iter()
        .filter(|l| {
            l.ends_with(';')
                || l.ends_with('{')
                || l.ends_with('}')
                || STARTS.iter().any(|s| l.starts_with(s))
                || l.contains("=>")
                || l.contains("();")
                || l.contains("->")
        })
        .count();
    code >= 2 && code * 5 >= lines.len()
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
            let shown =
                crate::guardrails::scrub_for_log(&content.chars().take(120).collect::<String>());
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
    fn code_is_told_from_prose() {
        assert!(looks_like_code(
            "fn main() {\n    let x = compute();\n    println!(\"{x}\");\n}"
        ));
        assert!(looks_like_code("see\n```\nls -la\n```"));
        assert!(!looks_like_code(
            "Hello, I was charged twice this month.\nPlease refund me; thanks."
        ));
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
