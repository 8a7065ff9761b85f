//! `refine`: the evaluator-optimizer loop. Generate an answer, have an evaluator score it
//! (`{"score": 0..1, "feedback": ".."}`), and while the score is below `stop_at` generate again
//! with the previous answer and the feedback, at most `max_rounds` times. Every round is
//! recorded; the best-scored answer is the output.

use std::time::Instant;

use serde_json::{Map, Value};

use super::map::{ask, finish, Answer};
use crate::config::RefinePlan;
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::wire::{DeadLetterReason, Round};

/// Feedback kept per round in the record.
const FEEDBACK_CHARS: usize = 500;

impl StepKind for RefinePlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        let started = Instant::now();
        let mut answers: Vec<Answer> = Vec::new();
        let mut rounds: Vec<Round> = Vec::new();
        let mut best: Option<(f64, String)> = None;
        let mut revise: Option<(String, String)> = None;
        for round in 1..=self.max_rounds {
            let number = round.to_string();
            let (previous, feedback) = revise.clone().unwrap_or_default();
            let locals = [
                ("round", number.as_str()),
                ("candidate", previous.as_str()),
                ("feedback", feedback.as_str()),
            ];
            // A prompt that does not place the feedback itself gets it appended.
            let draft = if revise.is_some() && !self.prompt_reads_feedback() {
                let prompt = revision(&self.prompt, &previous, &feedback);
                ask(ctx, &self.model, &prompt, &locals).await?
            } else {
                ask(ctx, &self.model, &self.prompt, &locals).await?
            };
            let candidate = draft.text.clone();
            answers.push(draft);
            let locals = [
                ("round", number.as_str()),
                ("candidate", candidate.as_str()),
            ];
            let verdict = ask(ctx, &self.evaluator_model, &self.evaluator_prompt, &locals).await?;
            let parsed = parse_verdict(&verdict.text);
            answers.push(verdict);
            let (score, feedback) = parsed.map_err(|e| RunFailure {
                reason: DeadLetterReason::OutputInvalid,
                error: format!("step `{}` round {round}: {e}", ctx.step.name),
                attempts: answers.iter().map(|a| a.record.attempts).sum(),
            })?;
            rounds.push(Round {
                round,
                score,
                feedback: feedback.chars().take(FEEDBACK_CHARS).collect(),
            });
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, candidate.clone()));
            }
            if score >= self.stop_at {
                break;
            }
            revise = Some((candidate, feedback));
        }
        let mut record = finish(ctx, started, &answers);
        record.rounds = rounds;
        let (score, text) = best.unwrap_or_default();
        let mut fields = Map::new();
        fields.insert("score".into(), Value::from(score));
        fields.insert("rounds".into(), Value::from(record.rounds.len()));
        fields.insert("passed".into(), Value::Bool(score >= self.stop_at));
        let output = StepOutput::Value {
            value: Value::String(text),
            fields,
            degraded: answers.iter().any(|a| a.degraded),
        };
        Ok((output, record))
    }
}

impl RefinePlan {
    fn prompt_reads_feedback(&self) -> bool {
        let reads = |t: &crate::template::Template| {
            t.vars()
                .any(|v| matches!(v, crate::template::Var::Local(n) if n == "feedback"))
        };
        reads(&self.prompt.user) || self.prompt.system.as_ref().is_some_and(reads)
    }
}

/// The generation prompt with the previous answer and the evaluator's feedback appended.
fn revision(
    prompt: &crate::config::PromptPlan,
    previous: &str,
    feedback: &str,
) -> crate::config::PromptPlan {
    let mut revised = prompt.clone();
    let tail = crate::template::Template::literal(&format!(
        "\n\nYour previous answer was:\n{previous}\n\nA reviewer said: {feedback}\n\
         Write an improved answer that addresses the feedback."
    ));
    revised.user = revised.user.followed_by(tail);
    revised
}

/// Reads `{"score": .., "feedback": ..}` (code fences and prose around it tolerated). A score
/// out of 10 or 100 is scaled to 0..1.
fn parse_verdict(answer: &str) -> Result<(f64, String), String> {
    let json = match (answer.find('{'), answer.rfind('}')) {
        (Some(a), Some(b)) if a < b => serde_json::from_str::<Value>(&answer[a..=b]).ok(),
        _ => None,
    };
    let shown = crate::guardrails::scrub_for_log(&answer.chars().take(120).collect::<String>());
    let json = json.ok_or_else(|| {
        format!("the evaluator answered {shown:?}, not JSON with a `score` and `feedback`")
    })?;
    let score = json
        .get("score")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| format!("the evaluator's answer {shown:?} has no numeric `score`"))?;
    let score = match score {
        s if s <= 1.0 => s,
        s if s <= 10.0 => s / 10.0,
        s => (s / 100.0).min(1.0),
    };
    let feedback = json
        .get("feedback")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok((score, feedback))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_and_scaled() {
        assert_eq!(
            parse_verdict(r#"{"score": 0.5, "feedback": "shorter"}"#).unwrap(),
            (0.5, "shorter".into())
        );
        assert_eq!(
            parse_verdict("```json\n{\"score\": 8}\n```").unwrap().0,
            0.8
        );
        assert!(parse_verdict("looks good").is_err());
        assert!(parse_verdict(r#"{"feedback": "x"}"#).is_err());
    }
}
