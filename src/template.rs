//! Prompt templates: `{{input.<field>}}`, `{{categories}}` and `{{steps.<name>.output}}`.
//!
//! Templates are compiled when the config is loaded, so an unknown variable is a config error
//! and rendering a job never parses template syntax again.

use serde_json::{Map, Value};

/// A variable a template may reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    Input(String),
    Categories,
    StepOutput(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// Values a template is rendered against.
pub struct Scope<'a> {
    pub input: &'a Map<String, Value>,
    pub categories: &'a [String],
    pub step_output: &'a dyn Fn(&str) -> Option<String>,
}

impl Template {
    pub fn empty() -> Self {
        Self {
            segments: Vec::new(),
        }
    }

    pub fn compile(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                segments.push(Segment::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| {
                format!(
                    "unclosed `{{{{` at byte {}",
                    text.len() - rest.len() + start
                )
            })?;
            segments.push(Segment::Var(parse_var(after[..end].trim())?));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        Ok(Self { segments })
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Var(v) => Some(v),
            Segment::Literal(_) => None,
        })
    }

    /// Renders the template; the error names the input field a job failed to provide.
    pub fn render(&self, scope: &Scope<'_>) -> Result<String, String> {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Var(Var::Input(field)) => match scope.input.get(field) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Null) | None => {
                        return Err(format!(
                            "job input has no field `{field}`, which the prompt needs"
                        ))
                    }
                    Some(other) => out.push_str(&other.to_string()),
                },
                Segment::Var(Var::Categories) => out.push_str(&scope.categories.join(", ")),
                Segment::Var(Var::StepOutput(step)) => match (scope.step_output)(step) {
                    Some(text) => out.push_str(&text),
                    None => return Err(format!("step `{step}` has no output yet")),
                },
            }
        }
        Ok(out)
    }
}

fn parse_var(expr: &str) -> Result<Var, String> {
    let parts: Vec<&str> = expr.split('.').collect();
    match parts.as_slice() {
        ["input", field] if !field.is_empty() => Ok(Var::Input((*field).to_owned())),
        ["categories"] => Ok(Var::Categories),
        ["steps", step, "output"] if !step.is_empty() => Ok(Var::StepOutput((*step).to_owned())),
        _ => Err(format!(
            "unknown variable `{{{{{expr}}}}}`; use input.<field>, categories or steps.<name>.output"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_input_categories_and_step_outputs() {
        let t = Template::compile("Cats: {{categories}}\n{{ input.text }} / {{steps.a.output}}")
            .unwrap();
        let input = serde_json::json!({"text": "hello"});
        let cats = vec!["x".to_owned(), "y".to_owned()];
        let lookup = |name: &str| (name == "a").then(|| "A".to_owned());
        let scope = Scope {
            input: input.as_object().unwrap(),
            categories: &cats,
            step_output: &lookup,
        };
        assert_eq!(t.render(&scope).unwrap(), "Cats: x, y\nhello / A");
    }

    #[test]
    fn unknown_variables_and_unclosed_braces_are_errors() {
        assert!(Template::compile("{{inptu.text}}")
            .unwrap_err()
            .contains("inptu.text"));
        assert!(Template::compile("{{input.text")
            .unwrap_err()
            .contains("unclosed"));
    }

    #[test]
    fn missing_input_field_names_it() {
        let t = Template::compile("{{input.body}}").unwrap();
        let input = serde_json::Map::new();
        let scope = Scope {
            input: &input,
            categories: &[],
            step_output: &|_| None,
        };
        assert!(t.render(&scope).unwrap_err().contains("`body`"));
    }
}
