//! Prompt templates: `{{input.<field>}}`, `{{categories}}`, `{{steps.<name>.<field>...}}`
//! (`output`, `category`, `confidence`, `output.<json field>`, ...) and the locals a step kind
//! provides (`{{chunk}}` in a map step, `{{mapped}}` in a reduce step, ...).
//!
//! Templates are compiled when the config is loaded, so an unknown variable is a config error
//! and rendering a job never parses template syntax again.

use serde_json::{Map, Value};

/// A variable a template may reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    Input(String),
    Categories,
    /// `steps.<name>.<path...>`.
    Step(String, Vec<String>),
    /// A value the step kind provides (`chunk`, `mapped`, `candidate`, ...).
    Local(String),
}

impl Var {
    /// The step a variable reads, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Var::Step(name, _) => Some(name),
            _ => None,
        }
    }
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
    /// The value at a path of a finished step (`Null` for a skipped one); `None` when the step
    /// has not finished.
    pub step: &'a dyn Fn(&str, &[String]) -> Option<Value>,
    pub locals: &'a [(&'a str, &'a str)],
}

/// How a value is written into text: strings as they are, `null` as nothing, the rest as JSON.
pub fn to_text(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => out.push_str(s),
        Value::Null => {}
        other => out.push_str(&other.to_string()),
    }
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

    /// Text used as it is, without variables.
    pub fn literal(text: &str) -> Self {
        Self {
            segments: vec![Segment::Literal(text.to_owned())],
        }
    }

    /// This template with `other` rendered after it.
    pub fn followed_by(mut self, other: Template) -> Self {
        self.segments.extend(other.segments);
        self
    }

    /// Bytes of the template's own text (without its variables).
    pub fn literal_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(text) => text.len() as u64,
                Segment::Var(_) => 0,
            })
            .sum()
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
                Segment::Var(Var::Categories) => out.push_str(&scope.categories.join(", ")),
                Segment::Var(var) => to_text(&value_of(var, scope)?, &mut out),
            }
        }
        Ok(out)
    }

    /// The variable when the template is exactly one `{{..}}` and nothing else.
    pub fn single_var(&self) -> Option<&Var> {
        match self.segments.as_slice() {
            [Segment::Var(v)] => Some(v),
            _ => None,
        }
    }
}

/// The value of a variable in `scope`, as JSON.
pub fn value_of(var: &Var, scope: &Scope<'_>) -> Result<Value, String> {
    match var {
        Var::Input(field) => match scope.input.get(field) {
            Some(Value::Null) | None => Err(format!(
                "job input has no field `{field}`, which the prompt needs"
            )),
            Some(v) => Ok(v.clone()),
        },
        Var::Categories => Ok(Value::String(scope.categories.join(", "))),
        Var::Step(step, path) => {
            (scope.step)(step, path).ok_or_else(|| format!("step `{step}` has no output yet"))
        }
        Var::Local(name) => scope
            .locals
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Value::String((*v).to_owned()))
            .ok_or_else(|| format!("`{{{{{name}}}}}` is not available here")),
    }
}

/// The names a step kind may provide as `{{<name>}}`.
pub const LOCALS: [&str; 7] = [
    "chunk",
    "chunk_index",
    "chunk_count",
    "mapped",
    "candidate",
    "feedback",
    "round",
];

fn parse_var(expr: &str) -> Result<Var, String> {
    let parts: Vec<&str> = expr.split('.').collect();
    let fine = |s: &&str| !s.is_empty();
    match parts.as_slice() {
        ["input", field] if !field.is_empty() => Ok(Var::Input((*field).to_owned())),
        ["categories"] => Ok(Var::Categories),
        ["steps", step, path @ ..] if !step.is_empty() && !path.is_empty() && path.iter().all(fine) => Ok(
            Var::Step((*step).to_owned(), path.iter().map(|s| (*s).to_owned()).collect()),
        ),
        [local] if LOCALS.contains(local) => Ok(Var::Local((*local).to_owned())),
        _ => Err(format!(
            "unknown variable `{{{{{expr}}}}}`; use input.<field>, categories, steps.<name>.output (or .category, .confidence, .output.<field>) or a step kind's own ({})",
            LOCALS.join(", ")
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
        let lookup = |name: &str, _: &[String]| (name == "a").then(|| Value::from("A"));
        let scope = Scope {
            input: input.as_object().unwrap(),
            categories: &cats,
            step: &lookup,
            locals: &[],
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
            step: &|_, _| None,
            locals: &[],
        };
        assert!(t.render(&scope).unwrap_err().contains("`body`"));
    }
}
