//! Each step kind's own fields: models, prompts, rules, route targets, templates, splits and
//! loops, with every problem naming its field.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::pipelines::{model_ref, output_schema, prompt_ref, StepScope};
use super::Problems;
use crate::config::plan::*;
use crate::config::raw::{
    self as raw, RawClassifyMethod, RawExperiment, RawOverflow, RawRouteTarget, RawRule, RawRules,
    RawSplitBy, RawStepKind, RawStickyBy,
};
use crate::template::{Template, Var};

const ROUTE_MODEL: &str = "{{route.model}}";
const ROUTE_PROMPT: &str = "{{route.prompt}}";
/// Most rounds of a `refine` loop.
const MAX_ROUNDS: u32 = 10;

pub(super) fn step_kind(p: &mut Problems, s: &StepScope<'_>, kind: RawStepKind) -> StepKindPlan {
    let field = &s.field;
    match kind {
        RawStepKind::Classify {
            categories,
            method,
            model,
            prompt,
            rules,
        } => {
            if categories.is_empty() {
                p.add(format!("{field}.categories"), "list at least one category");
            }
            let method = match method {
                RawClassifyMethod::Llm => {
                    let model = model_ref(p, field, model.as_deref(), s.models);
                    let prompt = prompt_ref(p, field, prompt.as_deref(), s.prompts);
                    s.prompt_vars(p, &format!("{field}.prompt"), &prompt, &[]);
                    if rules.is_some() {
                        p.add(
                            format!("{field}.rules"),
                            "rules only apply with `method: rules`",
                        );
                    }
                    ClassifyMethod::Llm { model, prompt }
                }
                RawClassifyMethod::Rules => rules_plan(p, field, &categories, rules),
            };
            StepKindPlan::Classify(ClassifyPlan { categories, method })
        }
        RawStepKind::Route {
            on,
            routes,
            review_below_confidence,
        } => route(p, s, on, routes, review_below_confidence),
        RawStepKind::Generate {
            model,
            prompt,
            output_schema: schema_path,
            max_repairs,
            on_context_overflow,
            experiment,
            semantic_cache,
        } => {
            let model = if model.replace(' ', "") == ROUTE_MODEL {
                match one_route(p, s, "model", ROUTE_MODEL) {
                    Some(j) => {
                        if let StepKindPlan::Route(r) = &s.steps[j].kind {
                            if r.default.model.is_none() {
                                p.add(
                                    format!("{field}.model"),
                                    format!("`{ROUTE_MODEL}` needs the `default` route of step `{}` to name a model", s.steps[j].name),
                                );
                            }
                        }
                        ModelChoice::FromRoute(j)
                    }
                    None => ModelChoice::Fixed(String::new()),
                }
            } else {
                ModelChoice::Fixed(model_ref(p, field, Some(&model), s.models))
            };
            let prompt = if prompt.replace(' ', "") == ROUTE_PROMPT {
                route_prompts(p, s)
            } else {
                PromptChoice::Fixed(prompt_ref(p, field, Some(&prompt), s.prompts))
            };
            for one in prompt.all() {
                s.prompt_vars(p, &format!("{field}.prompt"), one, &[]);
            }
            let output = schema_path.and_then(|path| {
                output_schema(p, &format!("{field}.output_schema"), &path, max_repairs)
            });
            let truncate_to_fit = on_context_overflow == RawOverflow::Truncate;
            if truncate_to_fit {
                let window = match &model {
                    ModelChoice::Fixed(alias) => s.models.get(alias).and_then(|m| m.context_window),
                    ModelChoice::FromRoute(_) => None,
                };
                if window.is_none() {
                    p.add(
                        format!("{field}.on_context_overflow"),
                        "`truncate` needs a fixed `model` whose `context_window` is set",
                    );
                }
            }
            let experiment = experiment.map(|e| Arc::new(experiment_plan(p, s, e, &model)));
            let semantic_cache =
                semantic_cache.map(|c| Arc::new(semantic_cache_plan(p, field, c, s.models)));
            StepKindPlan::Generate(GeneratePlan {
                model,
                prompt,
                output,
                truncate_to_fit,
                experiment,
                semantic_cache,
            })
        }
        RawStepKind::Template { template: t, json } => template(p, s, t, json),
        RawStepKind::Split {
            from,
            by,
            size,
            overlap,
            max_chunks,
            model,
        } => {
            let source = match from.split('.').collect::<Vec<_>>().as_slice() {
                ["input", f] if !f.is_empty() => SplitSource::Input((*f).to_owned()),
                ["steps", step, "output"] => {
                    match s.dependency(p, &format!("{field}.from"), "`from`", step) {
                        Some(j) => SplitSource::Step(j),
                        None => SplitSource::Input(String::new()),
                    }
                }
                _ => {
                    p.add(
                        format!("{field}.from"),
                        format!("`{from}` is neither `input.<field>` nor `steps.<name>.output`"),
                    );
                    SplitSource::Input(String::new())
                }
            };
            if !(1..=10_000).contains(&max_chunks) {
                p.add(format!("{field}.max_chunks"), "must be between 1 and 10000");
            }
            let sized = |p: &mut Problems, default: (usize, usize)| {
                let size = size.unwrap_or(default.0);
                let overlap = overlap.unwrap_or(default.1.min(size / 2));
                if size == 0 {
                    p.add(format!("{field}.size"), "must be at least 1");
                } else if overlap >= size {
                    p.add(
                        format!("{field}.overlap"),
                        format!("{overlap} must be smaller than `size` ({size})"),
                    );
                }
                (size, overlap)
            };
            let by = match by {
                RawSplitBy::Chars => {
                    let (size, overlap) = sized(p, (4_000, 200));
                    SplitBy::Chars { size, overlap }
                }
                RawSplitBy::Tokens => {
                    let (size, overlap) = sized(p, (1_000, 50));
                    let model = match model {
                        Some(alias) => model_ref(p, field, Some(&alias), s.models),
                        None => String::new(),
                    };
                    let model = s
                        .models
                        .get(&model)
                        .map_or_else(|| "gpt-4o".to_owned(), |m| m.model.clone());
                    SplitBy::Tokens {
                        size,
                        overlap,
                        model,
                    }
                }
                RawSplitBy::JsonArray => {
                    if size.is_some() || overlap.is_some() {
                        p.add(
                            format!("{field}.size"),
                            "`by: json_array` takes the array's items as they are: no `size` or `overlap`",
                        );
                    }
                    SplitBy::JsonArray
                }
            };
            StepKindPlan::Split(SplitPlan {
                from: source,
                by,
                max_chunks,
            })
        }
        RawStepKind::Map {
            over,
            model,
            prompt,
        } => {
            let over = over_step(p, s, &over, "split", |k| {
                matches!(k, StepKindPlan::Split(_))
            });
            let model = model_ref(p, field, Some(&model), s.models);
            let prompt = prompt_ref(p, field, Some(&prompt), s.prompts);
            let locals = ["chunk", "chunk_index", "chunk_count"];
            s.prompt_vars(p, &format!("{field}.prompt"), &prompt, &locals);
            reads(
                p,
                field,
                &prompt,
                "chunk",
                "every chunk would get the same prompt",
            );
            StepKindPlan::Map(MapPlan {
                over,
                model,
                prompt,
            })
        }
        RawStepKind::Reduce {
            over,
            model,
            prompt,
            max_input_chars,
        } => {
            let over = over_step(p, s, &over, "map", |k| matches!(k, StepKindPlan::Map(_)));
            let model = model_ref(p, field, Some(&model), s.models);
            let prompt = prompt_ref(p, field, Some(&prompt), s.prompts);
            s.prompt_vars(p, &format!("{field}.prompt"), &prompt, &["mapped"]);
            reads(
                p,
                field,
                &prompt,
                "mapped",
                "the mapped answers would never reach the model",
            );
            if max_input_chars < 100 {
                p.add(format!("{field}.max_input_chars"), "must be at least 100");
            }
            StepKindPlan::Reduce(ReducePlan {
                over,
                model,
                prompt,
                max_input_chars,
            })
        }
        RawStepKind::Refine {
            model,
            prompt,
            evaluator,
            max_rounds,
            stop_at,
        } => {
            let max_rounds = match max_rounds {
                None => {
                    p.add(
                        format!("{field}.max_rounds"),
                        format!("a loop needs a bound: set `max_rounds` (1 to {MAX_ROUNDS})"),
                    );
                    1
                }
                Some(n) if !(1..=MAX_ROUNDS).contains(&n) => {
                    p.add(
                        format!("{field}.max_rounds"),
                        format!("{n} is not between 1 and {MAX_ROUNDS}"),
                    );
                    1
                }
                Some(n) => n,
            };
            if !(0.0..=1.0).contains(&stop_at) {
                p.add(format!("{field}.stop_at"), "a score between 0 and 1");
            }
            let model = model_ref(p, field, Some(&model), s.models);
            let prompt = prompt_ref(p, field, Some(&prompt), s.prompts);
            s.prompt_vars(
                p,
                &format!("{field}.prompt"),
                &prompt,
                &["round", "candidate", "feedback"],
            );
            let at = format!("{field}.evaluator");
            let evaluator_model = model_ref(p, &at, Some(&evaluator.model), s.models);
            let evaluator_prompt = prompt_ref(p, &at, Some(&evaluator.prompt), s.prompts);
            s.prompt_vars(
                p,
                &format!("{at}.prompt"),
                &evaluator_prompt,
                &["round", "candidate"],
            );
            reads(
                p,
                &at,
                &evaluator_prompt,
                "candidate",
                "the evaluator would never see the answer",
            );
            StepKindPlan::Refine(RefinePlan {
                model,
                prompt,
                evaluator_model,
                evaluator_prompt,
                max_rounds,
                stop_at,
            })
        }
    }
}

fn experiment_plan(
    p: &mut Problems,
    s: &StepScope<'_>,
    raw: RawExperiment,
    model: &ModelChoice,
) -> ExperimentPlan {
    let field = format!("{}.experiment", s.field);
    if !(0.0..=100.0).contains(&raw.rollout) {
        p.add(format!("{field}.rollout"), "a percentage between 0 and 100");
    }
    if raw.variants.is_empty() || raw.variants.values().all(|v| v.weight == 0) {
        p.add(
            format!("{field}.variants"),
            "name at least one variant with a weight above 0",
        );
    }
    let step_max_tokens = |alias: &str| s.models.get(alias).map(|m| m.max_tokens);
    let variants = raw
        .variants
        .into_iter()
        .map(|(name, v)| {
            let at = format!("{field}.variants.{name}");
            let model_alias = v.model.map(|m| model_ref(p, &at, Some(&m), s.models));
            let prompt = v.prompt.map(|name| {
                let prompt = prompt_ref(p, &at, Some(&name), s.prompts);
                s.prompt_vars(p, &format!("{at}.prompt"), &prompt, &[]);
                prompt
            });
            if let Some(t) = v.temperature {
                if !(0.0..=2.0).contains(&t) {
                    p.add(format!("{at}.temperature"), "must be between 0 and 2");
                }
            }
            // A cap, never a raise: budget reservations count the model's own max_tokens.
            let alias = model_alias.clone().or(match model {
                ModelChoice::Fixed(a) => Some(a.clone()),
                ModelChoice::FromRoute(_) => None,
            });
            if v.max_tokens == Some(0) {
                p.add(format!("{at}.max_tokens"), "must be at least 1");
            }
            if let (Some(n), Some(cap)) = (v.max_tokens, alias.as_deref().and_then(step_max_tokens))
            {
                if n > cap {
                    p.add(
                        format!("{at}.max_tokens"),
                        format!("must be between 1 and the model's max_tokens ({cap})"),
                    );
                }
            }
            VariantPlan {
                name,
                weight: v.weight,
                model: model_alias,
                prompt,
                temperature: v.temperature,
                max_tokens: v.max_tokens,
            }
        })
        .collect();
    ExperimentPlan {
        name: raw
            .name
            .unwrap_or_else(|| format!("{}.{}", s.pipeline, s.name)),
        sticky_by: match raw.sticky_by {
            RawStickyBy::User => StickyBy::User,
            RawStickyBy::Tenant => StickyBy::Tenant,
            RawStickyBy::Job => StickyBy::Job,
        },
        rollout: raw.rollout,
        variants,
    }
}

/// A problem when `prompt` never reads `{{local}}`.
fn reads(p: &mut Problems, field: &str, prompt: &PromptPlan, local: &str, why: &str) {
    let found = prompt
        .system
        .iter()
        .chain(std::iter::once(&prompt.user))
        .flat_map(Template::vars)
        .any(|v| matches!(v, Var::Local(n) if n == local));
    if !found && !prompt.name.is_empty() {
        p.add(
            format!("{field}.prompt"),
            format!(
                "prompt `{}` never reads `{{{{{local}}}}}`: {why}",
                prompt.name
            ),
        );
    }
}

/// The earlier step `over` names, which must be of the kind `want` tests and be depended on.
fn over_step(
    p: &mut Problems,
    s: &StepScope<'_>,
    over: &str,
    kind: &str,
    want: impl Fn(&StepKindPlan) -> bool,
) -> usize {
    let at = format!("{}.over", s.field);
    match s.index_of(over) {
        Some(j) if want(&s.steps[j].kind) => s.dependency(p, &at, "`over`", over).unwrap_or(j),
        Some(j) => {
            p.add(
                at,
                format!(
                    "`{over}` is a {} step; `over` must name a {kind} step",
                    s.steps[j].kind.name()
                ),
            );
            j
        }
        None => {
            p.add(
                at,
                format!(
                    "a {} needs a {kind} step: `{over}` is not an earlier step",
                    s.field.rsplit('.').next().unwrap_or("step")
                ),
            );
            0
        }
    }
}

/// The one route step this step depends on, for `{{route.<what>}}`.
fn one_route(p: &mut Problems, s: &StepScope<'_>, what: &str, var: &str) -> Option<usize> {
    let routes: Vec<usize> = s
        .depends_on
        .iter()
        .copied()
        .filter(|&j| matches!(s.steps[j].kind, StepKindPlan::Route(_)))
        .collect();
    match routes.as_slice() {
        [j] => Some(*j),
        [] => {
            p.add(
                format!("{}.{what}", s.field),
                format!("`{var}` needs a route step in this step's `needs`"),
            );
            None
        }
        _ => {
            p.add(
                format!("{}.{what}", s.field),
                format!("`{var}` is ambiguous: this step depends on several route steps"),
            );
            None
        }
    }
}

/// `prompt: "{{route.prompt}}"`: every prompt the route can choose.
fn route_prompts(p: &mut Problems, s: &StepScope<'_>) -> PromptChoice {
    let Some(route) = one_route(p, s, "prompt", ROUTE_PROMPT) else {
        return PromptChoice::Fixed(super::pipelines::empty_prompt());
    };
    let StepKindPlan::Route(r) = &s.steps[route].kind else {
        return PromptChoice::Fixed(super::pipelines::empty_prompt());
    };
    if r.default.prompt.is_none() {
        p.add(
            format!("{}.prompt", s.field),
            format!(
                "`{ROUTE_PROMPT}` needs the `default` route of step `{}` to name a prompt",
                s.steps[route].name
            ),
        );
    }
    let prompts = r
        .routes
        .values()
        .chain(std::iter::once(&r.default))
        .filter_map(|t| t.prompt.as_ref())
        .filter_map(|name| Some((name.clone(), s.prompts.get(name)?.clone())))
        .collect();
    PromptChoice::FromRoute { route, prompts }
}

fn route(
    p: &mut Problems,
    s: &StepScope<'_>,
    on: String,
    routes: BTreeMap<String, RawRouteTarget>,
    review_below_confidence: Option<f64>,
) -> StepKindPlan {
    let field = &s.field;
    let on_index = match s.index_of(&on) {
        Some(j) if matches!(s.steps[j].kind, StepKindPlan::Classify(_)) => {
            if !s.depends_on.contains(&j) {
                p.add(
                    format!("{field}.on"),
                    format!("step `{}` must depend on `{on}`; add it to `needs`", s.name),
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
                format!("`{on}` is not an earlier step of pipeline `{}`", s.pipeline),
            );
            0
        }
    };
    let mut targets: BTreeMap<String, RouteTarget> = BTreeMap::new();
    for (key, target) in routes {
        let at = format!("{field}.routes.{key}");
        let target = match target {
            RawRouteTarget::Model(alias) => RouteTarget {
                model: Some(alias),
                ..RouteTarget::default()
            },
            RawRouteTarget::Full(full) => RouteTarget {
                model: full.model,
                prompt: full.prompt,
                branch: full.branch,
            },
        };
        if let Some(alias) = &target.model {
            if !s.models.contains_key(alias) {
                p.add(
                    format!("{at}.model"),
                    format!("model `{alias}` is not defined under `models`"),
                );
            }
        }
        if let Some(prompt) = &target.prompt {
            if !s.prompts.contains_key(prompt) {
                p.add(
                    format!("{at}.prompt"),
                    format!("prompt `{prompt}` is not defined under `prompts`"),
                );
            }
        }
        if target.model.is_none() && target.prompt.is_none() && target.branch.is_none() {
            p.add(&at, "name a `model`, a `prompt` or a `branch`");
        }
        targets.insert(key, target);
    }
    let default = targets.remove("default");
    if default.is_none() {
        p.add(
            format!("{field}.routes"),
            "add a `default` route for categories without their own",
        );
    }
    if let Some(StepKindPlan::Classify(c)) = s.index_of(&on).map(|j| &s.steps[j].kind) {
        for category in targets.keys() {
            if !c.categories.contains(category) {
                p.add(
                    format!("{field}.routes.{category}"),
                    format!("`{category}` is not a category of step `{on}`"),
                );
            }
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
        routes: targets,
        default: default.unwrap_or_default(),
        review_below_confidence,
    })
}

fn rules_plan(
    p: &mut Problems,
    field: &str,
    categories: &[String],
    rules: Option<RawRules>,
) -> ClassifyMethod {
    let last = categories.last().cloned().unwrap_or_default();
    let known = |p: &mut Problems, at: String, category: &str| {
        if !categories.iter().any(|c| c == category) {
            p.add(at, format!("`{category}` is not one of `categories`"));
        }
    };
    match rules {
        None => {
            p.add(
                format!("{field}.rules"),
                "`method: rules` needs `rules` (category -> keywords, or a list of rules)",
            );
            ClassifyMethod::Rules {
                rules: Vec::new(),
                otherwise: (last, 0.0),
            }
        }
        // The keyword form: first category (in `categories` order) with a keyword wins, with
        // confidence 1; none found is the last category, also with confidence 1.
        Some(RawRules::Keywords(map)) => {
            for category in map.keys() {
                known(p, format!("{field}.rules.{category}"), category);
            }
            let rules = categories
                .iter()
                .filter_map(|c| {
                    map.get(c).map(|kw| RulePlan {
                        category: c.clone(),
                        keywords: kw.iter().map(|k| k.to_lowercase()).collect(),
                        regex: None,
                        min_chars: None,
                        max_chars: None,
                        looks_like_code: None,
                        confidence: 1.0,
                    })
                })
                .collect();
            ClassifyMethod::Rules {
                rules,
                otherwise: (last, 1.0),
            }
        }
        Some(RawRules::List(list)) => {
            let rules = list
                .into_iter()
                .enumerate()
                .map(|(i, rule)| rule_plan(p, &format!("{field}.rules[{i}]"), rule, &known))
                .collect();
            // Nothing matched: the last category, with a confidence low enough for review.
            ClassifyMethod::Rules {
                rules,
                otherwise: (last, 0.5),
            }
        }
    }
}

fn rule_plan(
    p: &mut Problems,
    at: &str,
    rule: RawRule,
    known: &impl Fn(&mut Problems, String, &str),
) -> RulePlan {
    known(p, format!("{at}.category"), &rule.category);
    let regex = rule.regex.and_then(|r| match regex::Regex::new(&r) {
        Ok(re) => Some(re),
        Err(e) => {
            p.add(format!("{at}.regex"), e.to_string());
            None
        }
    });
    if !(0.0..=1.0).contains(&rule.confidence) {
        p.add(format!("{at}.confidence"), "must be between 0 and 1");
    }
    if let (Some(min), Some(max)) = (rule.min_chars, rule.max_chars) {
        if min > max {
            p.add(format!("{at}.min_chars"), "is larger than `max_chars`");
        }
    }
    RulePlan {
        category: rule.category,
        keywords: rule.keywords.iter().map(|k| k.to_lowercase()).collect(),
        regex,
        min_chars: rule.min_chars,
        max_chars: rule.max_chars,
        looks_like_code: rule.looks_like_code,
        confidence: rule.confidence,
    }
}

/// A `template` step (or a pipeline's assembled `output`): exactly one of `template` or `json`.
pub(super) fn template(
    p: &mut Problems,
    s: &StepScope<'_>,
    text: Option<String>,
    json: Option<serde_json::Value>,
) -> StepKindPlan {
    let field = &s.field;
    let assemble = match (text, json) {
        (Some(text), None) => match Template::compile(&text) {
            Ok(t) => {
                s.template_vars(p, &format!("{field}.template"), &t, &[]);
                Assemble::Text(t)
            }
            Err(e) => {
                p.add(format!("{field}.template"), e);
                Assemble::Text(Template::empty())
            }
        },
        (None, Some(json)) => Assemble::Json(json_template(p, s, &format!("{field}.json"), json)),
        _ => {
            p.add(field, "set exactly one of `template` (text) or `json`");
            Assemble::Text(Template::empty())
        }
    };
    StepKindPlan::Template(assemble)
}

fn json_template(
    p: &mut Problems,
    s: &StepScope<'_>,
    at: &str,
    value: serde_json::Value,
) -> JsonTemplate {
    use serde_json::Value;
    match value {
        Value::String(text) => match Template::compile(&text) {
            Ok(t) => {
                s.template_vars(p, at, &t, &[]);
                match t.single_var() {
                    Some(var) => JsonTemplate::Var(var.clone()),
                    None if t.vars().next().is_none() => JsonTemplate::Literal(Value::String(text)),
                    None => JsonTemplate::Text(t),
                }
            }
            Err(e) => {
                p.add(at, e);
                JsonTemplate::Literal(Value::Null)
            }
        },
        Value::Array(items) => JsonTemplate::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| json_template(p, s, &format!("{at}[{i}]"), v))
                .collect(),
        ),
        Value::Object(map) => JsonTemplate::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let item = json_template(p, s, &format!("{at}.{k}"), v);
                    (k, item)
                })
                .collect(),
        ),
        other => JsonTemplate::Literal(other),
    }
}

/// `semantic_cache:` of a generate step: an embeddings model on an OpenAI-compatible provider,
/// an `input.<field>` question, a threshold in (0, 1], bounded entries.
fn semantic_cache_plan(
    p: &mut Problems,
    field: &str,
    raw: raw::RawSemanticCache,
    models: &BTreeMap<String, Arc<ModelPlan>>,
) -> SemanticCachePlan {
    let field = format!("{field}.semantic_cache");
    if !models.contains_key(&raw.embedding_model) {
        p.add(
            format!("{field}.embedding_model"),
            format!("`{}` is not a model under `models`", raw.embedding_model),
        );
    }
    let on = match raw.on.strip_prefix("input.") {
        Some(name) if !name.is_empty() && !name.contains('.') => name.to_owned(),
        _ => {
            p.add(
                format!("{field}.on"),
                format!(
                    "`{}` is not `input.<field>`: the question is one input field",
                    raw.on
                ),
            );
            String::new()
        }
    };
    if !(raw.threshold > 0.0 && raw.threshold <= 1.0) {
        p.add(
            format!("{field}.threshold"),
            "a cosine similarity above 0 and at most 1 (0.95 by default: a false hit is worse than a miss)",
        );
    }
    if raw.max_entries == 0 || raw.max_entries > 10_000 {
        p.add(format!("{field}.max_entries"), "between 1 and 10000");
    }
    if raw.ttl_s == 0 {
        p.add(format!("{field}.ttl_s"), "must be at least 1");
    }
    SemanticCachePlan {
        embedding_model: raw.embedding_model,
        on,
        threshold: raw.threshold,
        max_entries: raw.max_entries,
        ttl: std::time::Duration::from_secs(raw.ttl_s),
        max_temperature: raw.max_temperature,
    }
}
