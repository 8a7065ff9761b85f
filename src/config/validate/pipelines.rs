//! `prompts`, `pipelines` and `default_pipeline`: each step's kind, model, prompt, schema and
//! `needs`, resolved to indices and shared plans.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{keys, non_empty, Problems};
use crate::config::plan::*;
use crate::config::raw::{self, RawClassifyMethod, RawStep};
use crate::template::{Template, Var};

pub(super) fn pipelines_plan(
    p: &mut Problems,
    raw: BTreeMap<String, raw::RawPipeline>,
    models: &BTreeMap<String, Arc<ModelPlan>>,
    prompts: &BTreeMap<String, Arc<PromptPlan>>,
) -> BTreeMap<String, Arc<PipelinePlan>> {
    if raw.is_empty() {
        p.add("pipelines", "no pipeline is defined");
    }
    raw.into_iter()
        .map(|(name, pipeline)| {
            let mut plan = pipeline_plan(p, &name, pipeline.steps, models, prompts);
            if let Some(alias) = &pipeline.budget_fallback {
                if !models.contains_key(alias) {
                    p.add(
                        format!("pipelines.{name}.budget_fallback"),
                        format!(
                            "model `{alias}` is not defined under `models` (defined: {})",
                            keys(models)
                        ),
                    );
                }
            }
            plan.budget_fallback = pipeline.budget_fallback;
            (name, Arc::new(plan))
        })
        .collect()
}

pub(super) fn default_pipeline(
    p: &mut Problems,
    name: Option<String>,
    pipelines: &BTreeMap<String, Arc<PipelinePlan>>,
) -> Option<String> {
    match name {
        Some(name) if !pipelines.contains_key(&name) => {
            p.add(
                "default_pipeline",
                format!(
                    "pipeline `{name}` is not defined (defined: {})",
                    keys(pipelines)
                ),
            );
            None
        }
        Some(name) => Some(name),
        None if pipelines.len() == 1 => pipelines.keys().next().cloned(),
        None => None,
    }
}

pub(super) fn prompts_plan(
    p: &mut Problems,
    raw: BTreeMap<String, raw::RawPrompt>,
) -> BTreeMap<String, Arc<PromptPlan>> {
    let mut prompts = BTreeMap::new();
    for (name, prompt) in raw {
        let field = format!("prompts.{name}");
        let system = match prompt.system.as_deref().map(Template::compile).transpose() {
            Ok(t) => t,
            Err(e) => {
                p.add(format!("{field}.system"), e);
                None
            }
        };
        let user = match Template::compile(&prompt.user) {
            Ok(t) => t,
            Err(e) => {
                p.add(format!("{field}.user"), e);
                continue;
            }
        };
        prompts.insert(name.clone(), Arc::new(PromptPlan { name, system, user }));
    }
    prompts
}

const ROUTE_MODEL: &str = "{{route.model}}";

pub(super) fn pipeline_plan(
    p: &mut Problems,
    pipeline: &str,
    raw_steps: Vec<RawStep>,
    models: &BTreeMap<String, Arc<ModelPlan>>,
    prompts: &BTreeMap<String, Arc<PromptPlan>>,
) -> PipelinePlan {
    let mut steps: Vec<StepPlan> = Vec::with_capacity(raw_steps.len());
    if raw_steps.is_empty() {
        p.add(
            format!("pipelines.{pipeline}.steps"),
            "a pipeline needs at least one step",
        );
    }
    // ancestors[i]: every step index step i transitively depends on.
    let mut ancestors: Vec<BTreeSet<usize>> = Vec::new();
    for (i, step) in raw_steps.into_iter().enumerate() {
        let field = format!("pipelines.{pipeline}.steps[{i}]");
        let (name, needs_raw) = match &step {
            RawStep::Classify { name, needs, .. }
            | RawStep::Route { name, needs, .. }
            | RawStep::Generate { name, needs, .. } => (name.clone(), needs.clone()),
        };
        non_empty(p, format!("{field}.name"), &name);
        if steps.iter().any(|s| s.name == name) {
            p.add(
                format!("{field}.name"),
                format!("step name `{name}` is used twice"),
            );
        }
        let index_of = |n: &str| steps.iter().position(|s| s.name == n);
        let needs: Vec<usize> = match needs_raw {
            None => i.checked_sub(1).into_iter().collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| {
                    let found = index_of(n);
                    if found.is_none() {
                        p.add(
                            format!("{field}.needs"),
                            format!("`{n}` is not an earlier step of pipeline `{pipeline}`"),
                        );
                    }
                    found
                })
                .collect(),
        };
        let mut mine: BTreeSet<usize> = BTreeSet::new();
        for &n in &needs {
            mine.insert(n);
            mine.extend(ancestors[n].iter().copied());
        }
        let depends_on = |target: usize| mine.contains(&target);
        let kind = match step {
            RawStep::Classify {
                categories,
                method,
                model,
                prompt,
                rules,
                ..
            } => {
                if categories.is_empty() {
                    p.add(format!("{field}.categories"), "list at least one category");
                }
                let method = match method {
                    RawClassifyMethod::Llm => {
                        let model = model_ref(p, &field, model.as_deref(), models);
                        let prompt = prompt_ref(p, &field, prompt.as_deref(), prompts);
                        if !rules.is_empty() {
                            p.add(
                                format!("{field}.rules"),
                                "rules only apply with `method: rules`",
                            );
                        }
                        ClassifyMethod::Llm { model, prompt }
                    }
                    RawClassifyMethod::Rules => {
                        for category in rules.keys() {
                            if !categories.contains(category) {
                                p.add(
                                    format!("{field}.rules.{category}"),
                                    "not one of `categories`",
                                );
                            }
                        }
                        let ordered = categories
                            .iter()
                            .filter_map(|c| {
                                rules.get(c).map(|kw| {
                                    (c.clone(), kw.iter().map(|k| k.to_lowercase()).collect())
                                })
                            })
                            .collect();
                        ClassifyMethod::Rules(ordered)
                    }
                };
                StepKindPlan::Classify(ClassifyPlan { categories, method })
            }
            RawStep::Route {
                on,
                routes,
                review_below_confidence,
                ..
            } => {
                let on_index = match index_of(&on) {
                    Some(j) if matches!(steps[j].kind, StepKindPlan::Classify(_)) => {
                        if !depends_on(j) {
                            p.add(
                                format!("{field}.on"),
                                format!("step `{name}` must depend on `{on}`; add it to `needs`"),
                            );
                        }
                        j
                    }
                    Some(_) => {
                        p.add(
                            format!("{field}.on"),
                            format!("`{on}` is not a classify step"),
                        );
                        0
                    }
                    None => {
                        p.add(
                            format!("{field}.on"),
                            format!("`{on}` is not an earlier step of pipeline `{pipeline}`"),
                        );
                        0
                    }
                };
                let mut routes = routes;
                let default = routes.remove("default");
                if default.is_none() {
                    p.add(
                        format!("{field}.routes"),
                        "add a `default` route for categories without their own",
                    );
                }
                if let Some(StepKindPlan::Classify(c)) = index_of(&on).map(|j| &steps[j].kind) {
                    for category in routes.keys() {
                        if !c.categories.contains(category) {
                            p.add(
                                format!("{field}.routes.{category}"),
                                format!("`{category}` is not a category of step `{on}`"),
                            );
                        }
                    }
                }
                let named = routes.iter().map(|(c, a)| (c.as_str(), a));
                for (key, alias) in named.chain(default.iter().map(|d| ("default", d))) {
                    if !models.contains_key(alias) {
                        p.add(
                            format!("{field}.routes.{key}"),
                            format!("model `{alias}` is not defined under `models`"),
                        );
                    }
                }
                if let Some(t) = review_below_confidence {
                    if !(0.0..=1.0).contains(&t) {
                        p.add(
                            format!("{field}.review_below_confidence"),
                            "must be between 0 and 1",
                        );
                    }
                }
                StepKindPlan::Route(RoutePlan {
                    on: on_index,
                    routes,
                    default: default.unwrap_or_default(),
                    review_below_confidence,
                })
            }
            RawStep::Generate {
                model,
                prompt,
                output_schema: schema_path,
                max_repairs,
                ..
            } => {
                let model = if model.replace(' ', "") == ROUTE_MODEL {
                    let routes: Vec<usize> = mine
                        .iter()
                        .copied()
                        .filter(|&j| matches!(steps[j].kind, StepKindPlan::Route(_)))
                        .collect();
                    match routes.as_slice() {
                        [j] => ModelChoice::FromRoute(*j),
                        [] => {
                            p.add(
                                format!("{field}.model"),
                                "`{{route.model}}` needs a route step in this step's `needs`",
                            );
                            ModelChoice::Fixed(String::new())
                        }
                        _ => {
                            p.add(format!("{field}.model"), "`{{route.model}}` is ambiguous: this step depends on several route steps");
                            ModelChoice::Fixed(String::new())
                        }
                    }
                } else {
                    ModelChoice::Fixed(model_ref(p, &field, Some(&model), models))
                };
                let prompt = prompt_ref(p, &field, Some(&prompt), prompts);
                let output = schema_path.and_then(|path| {
                    output_schema(p, &format!("{field}.output_schema"), &path, max_repairs)
                });
                StepKindPlan::Generate(GeneratePlan {
                    model,
                    prompt,
                    output,
                })
            }
        };
        // Every step a prompt reads must be one this step waits for.
        let prompt = match &kind {
            StepKindPlan::Classify(ClassifyPlan {
                method: ClassifyMethod::Llm { prompt, .. },
                ..
            })
            | StepKindPlan::Generate(GeneratePlan { prompt, .. }) => Some(prompt.clone()),
            _ => None,
        };
        if let Some(prompt) = prompt {
            let vars = prompt
                .system
                .iter()
                .flat_map(|t| t.vars())
                .chain(prompt.user.vars());
            for var in vars {
                if let Var::StepOutput(other) = var {
                    match index_of(other) {
                        Some(j) if depends_on(j) => {}
                        Some(_) => p.add(
                            format!("{field}.prompt"),
                            format!("prompt `{}` reads step `{other}`, which step `{name}` does not depend on; add it to `needs`", prompt.name),
                        ),
                        None => p.add(
                            format!("{field}.prompt"),
                            format!("prompt `{}` reads step `{other}`, which is not an earlier step", prompt.name),
                        ),
                    }
                }
            }
        }
        ancestors.push(mine);
        steps.push(StepPlan { name, needs, kind });
    }
    PipelinePlan {
        name: pipeline.to_owned(),
        budget_fallback: None,
        steps,
    }
}

pub(super) fn model_ref(
    p: &mut Problems,
    field: &str,
    alias: Option<&str>,
    models: &BTreeMap<String, Arc<ModelPlan>>,
) -> String {
    match alias {
        None => {
            p.add(
                format!("{field}.model"),
                "an LLM step needs a `model` (an alias under `models`)",
            );
            String::new()
        }
        Some(a) if !models.contains_key(a) => {
            p.add(
                format!("{field}.model"),
                format!(
                    "model `{a}` is not defined under `models` (defined: {})",
                    keys(models)
                ),
            );
            a.to_owned()
        }
        Some(a) => a.to_owned(),
    }
}

pub(super) fn prompt_ref(
    p: &mut Problems,
    field: &str,
    name: Option<&str>,
    prompts: &BTreeMap<String, Arc<PromptPlan>>,
) -> Arc<PromptPlan> {
    let found = name.and_then(|n| prompts.get(n));
    match (name, found) {
        (_, Some(prompt)) => prompt.clone(),
        (None, None) => {
            p.add(
                format!("{field}.prompt"),
                "an LLM step needs a `prompt` (a name under `prompts`)",
            );
            empty_prompt()
        }
        (Some(n), None) => {
            p.add(
                format!("{field}.prompt"),
                format!(
                    "prompt `{n}` is not defined under `prompts` (defined: {})",
                    keys(prompts)
                ),
            );
            empty_prompt()
        }
    }
}

pub(super) fn empty_prompt() -> Arc<PromptPlan> {
    Arc::new(PromptPlan {
        name: String::new(),
        system: None,
        user: Template::empty(),
    })
}

/// Reads and compiles a step's `output_schema`; problems name the field.
pub(super) fn output_schema(
    p: &mut Problems,
    field: &str,
    path: &str,
    max_repairs: u32,
) -> Option<OutputSchema> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            p.add(field, format!("cannot read `{path}`: {e}"));
            return None;
        }
    };
    let schema: serde_json::Value = match serde_json::from_str(&text) {
        Ok(schema) => schema,
        Err(e) => {
            p.add(field, format!("`{path}` is not JSON: {e}"));
            return None;
        }
    };
    match jsonschema::validator_for(&schema) {
        Ok(validator) => Some(OutputSchema {
            path: path.to_owned(),
            validator: Arc::new(validator),
            max_repairs,
        }),
        Err(e) => {
            p.add(field, format!("`{path}` is not a valid JSON Schema: {e}"));
            None
        }
    }
}
