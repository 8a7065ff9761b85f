//! Structured output: an answer that must be JSON satisfying a step's `output_schema`.
//!
//! Models wrap JSON in Markdown code fences and leave trailing commas; both are forgiven before
//! parsing. What still fails is described in one sentence (parse error, or the schema's first
//! few violations with their JSON pointers) that goes back to the model in a repair prompt and,
//! if the repairs run out, into the `output_invalid` dead letter.

use serde_json::Value;

use crate::config::OutputSchema;

/// Most schema violations described in one message.
const MAX_VIOLATIONS: usize = 3;

/// The answer as validated JSON, or what is wrong with it.
pub fn check(answer: &str, schema: &OutputSchema) -> Result<Value, String> {
    let cleaned = remove_trailing_commas(strip_fences(answer));
    let value: Value = serde_json::from_str(&cleaned)
        .map_err(|e| format!("the answer is not valid JSON ({e})"))?;
    let violations: Vec<String> = schema
        .validator
        .iter_errors(&value)
        .take(MAX_VIOLATIONS)
        .map(|e| {
            let at = e.instance_path.to_string();
            let at = if at.is_empty() { "/".to_owned() } else { at };
            format!("at {at}: {e}")
        })
        .collect();
    if violations.is_empty() {
        Ok(value)
    } else {
        Err(format!(
            "the JSON does not satisfy the schema: {}",
            violations.join("; ")
        ))
    }
}

/// The follow-up prompt: the original request, the rejected answer and why it was rejected.
pub fn repair_prompt(user: &str, answer: &str, problem: &str) -> String {
    format!(
        "{user}\n\nYour previous answer was:\n{answer}\n\nIt was rejected: {problem}\n\
         Answer again with only the corrected JSON, no explanation and no code fences."
    )
}

fn strip_fences(answer: &str) -> &str {
    let trimmed = answer.trim();
    let Some(rest) = trimmed.strip_prefix("```") else {
        return trimmed;
    };
    // Drop the info string (`json`) up to the end of the first line, and the closing fence.
    let body = rest.split_once('\n').map_or("", |(_, body)| body);
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

/// Removes commas that directly precede `}` or `]` (outside strings).
fn remove_trailing_commas(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    let chars: Vec<char> = json.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if c == ',' {
            let next = chars[i + 1..].iter().find(|n| !n.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn schema() -> OutputSchema {
        let schema = serde_json::json!({
            "type": "object",
            "required": ["answer", "sentiment"],
            "properties": {"answer": {"type": "string"}, "sentiment": {"enum": ["pos", "neg"]}}
        });
        OutputSchema {
            path: "test.json".into(),
            validator: Arc::new(jsonschema::validator_for(&schema).unwrap()),
            max_repairs: 1,
        }
    }

    #[test]
    fn fenced_json_with_trailing_commas_is_accepted() {
        let answer = "```json\n{\"answer\": \"a, b\", \"sentiment\": \"pos\",}\n```";
        let value = check(answer, &schema()).unwrap();
        assert_eq!(value["answer"], "a, b");
    }

    #[test]
    fn violations_name_where_and_what() {
        let e = check(r#"{"answer": 3, "sentiment": "meh"}"#, &schema()).unwrap_err();
        assert!(e.contains("/answer") && e.contains("/sentiment"), "{e}");
        let e = check("Sure! Here it is", &schema()).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn commas_inside_strings_stay() {
        assert_eq!(
            remove_trailing_commas(r#"{"a": ",}", "b": [1,2,],}"#),
            r#"{"a": ",}", "b": [1,2]}"#
        );
    }
}
