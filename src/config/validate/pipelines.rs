//! `prompts`, `pipelines` and `default_pipeline`: each step's kind, model, prompt, schema and
//! `needs`, resolved to indices and shared plans.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{keys, non_empty, Problems};
use crate::config::plan::*;
use crate::config::raw::{self, RawStep};
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
            let budget_fallback = pipeline.budget_fallback.clone();
            let mut plan = pipeline_plan(p, &name, pipeline, models, prompts);
            if let Some(alias) = &budget_fallback {
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
            plan.budget_fallback = budget_fallback;
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

/// What validating one step sees: the pipeline so far and the models and prompts.
pub(super) struct StepScope<'a> {
    pub pipeline: &'a str,
    /// `pipelines.<name>.steps[<i>]`.
    pub field: String,
    pub name: String,
    /// The steps before this one.
    pub steps: &'a [StepPlan],
    /// Every earlier step this one transitively depends on.
    pub depends_on: BTreeSet<usize>,
    pub models: &'a BTreeMap<String, Arc<ModelPlan>>,
    pub prompts: &'a BTreeMap<String, Arc<PromptPlan>>,
}

impl StepScope<'_> {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The index of step `name` when this step depends on it; otherwise a problem at `at`
    /// saying what to fix (`what` says who reads it, e.g. "`when`").
    pub fn dependency(&self, p: &mut Problems, at: &str, what: &str, name: &str) -> Option<usize> {
        match self.index_of(name) {
            Some(j) if self.depends_on.contains(&j) => Some(j),
            Some(_) => {
                p.add(
                    at,
                    format!("{what} reads step `{name}`, which step `{}` does not depend on; add it to `needs`", self.name),
                );
                None
            }
            None => {
                p.add(
                    at,
                    format!(
                        "{what} reads step `{name}`, which is not an earlier step of pipeline `{}`",
                        self.pipeline
                    ),
                );
                None
            }
        }
    }

    /// Checks a `steps.<name>.<field>` path: the step is depended on and has that field.
    pub fn step_path(&self, p: &mut Problems, at: &str, what: &str, name: &str, path: &[String]) {
        let Some(j) = self.dependency(p, at, what, name) else {
            return;
        };
        let kind = &self.steps[j].kind;
        let fields = fields_of(kind);
        if let Some(first) = path.first() {
            if !fields.contains(&first.as_str()) {
                p.add(
                    at,
                    format!(
                        "{what} reads `steps.{name}.{first}`, but a {} step has no `{first}` (it has: {})",
                        kind.name(),
                        fields.join(", ")
                    ),
                );
            }
        }
    }

    /// Every variable of `template` names something this step can read; `locals` are the
    /// step kind's own `{{..}}` names.
    pub fn template_vars(&self, p: &mut Problems, at: &str, template: &Template, locals: &[&str]) {
        for var in template.vars() {
            match var {
                Var::Step(name, path) => self.step_path(p, at, "the template", name, path),
                Var::Local(local) if !locals.contains(&local.as_str()) => p.add(
                    at,
                    if locals.is_empty() {
                        format!("`{{{{{local}}}}}` is not available here: only map, reduce and refine steps provide their own values")
                    } else {
                        format!("`{{{{{local}}}}}` is not available here (this step provides: {})", locals.join(", "))
                    },
                ),
                _ => {}
            }
        }
    }

    /// A prompt's templates checked as [`Self::template_vars`].
    pub fn prompt_vars(&self, p: &mut Problems, at: &str, prompt: &PromptPlan, locals: &[&str]) {
        if let Some(system) = &prompt.system {
            self.template_vars(p, at, system, locals);
        }
        self.template_vars(p, at, &prompt.user, locals);
    }
}

/// What `steps.<name>.<field>` can read of a step of this kind.
pub(super) fn fields_of(kind: &StepKindPlan) -> &'static [&'static str] {
    match kind {
        StepKindPlan::Classify(_) => &["output", "category", "confidence", "degraded", "skipped"],
        StepKindPlan::Route(_) => &[
            "output",
            "category",
            "confidence",
            "model",
            "prompt",
            "branch",
            "review",
            "skipped",
        ],
        StepKindPlan::Generate(_) => &["output", "text", "model", "variant", "degraded", "skipped"],
        StepKindPlan::Template(_) => &["output", "skipped"],
        StepKindPlan::Split(_) | StepKindPlan::Map(_) => {
            &["output", "count", "degraded", "skipped"]
        }
        StepKindPlan::Reduce(_) => &["output", "levels", "degraded", "skipped"],
        StepKindPlan::Refine(_) => &["output", "score", "rounds", "passed", "degraded", "skipped"],
    }
}

pub(super) fn pipeline_plan(
    p: &mut Problems,
    pipeline: &str,
    raw: raw::RawPipeline,
    models: &BTreeMap<String, Arc<ModelPlan>>,
    prompts: &BTreeMap<String, Arc<PromptPlan>>,
) -> PipelinePlan {
    let mut steps: Vec<StepPlan> = Vec::with_capacity(raw.steps.len());
    if raw.steps.is_empty() {
        p.add(
            format!("pipelines.{pipeline}.steps"),
            "a pipeline needs at least one step",
        );
    }
    // ancestors[i]: every step index step i transitively depends on.
    let mut ancestors: Vec<BTreeSet<usize>> = Vec::new();
    for (i, step) in raw.steps.into_iter().enumerate() {
        let field = format!("pipelines.{pipeline}.steps[{i}]");
        let RawStep {
            name,
            needs,
            when,
            on_failure,
            kind,
        } = step;
        non_empty(p, format!("{field}.name"), &name);
        if steps.iter().any(|s| s.name == name) {
            p.add(
                format!("{field}.name"),
                format!("step name `{name}` is used twice"),
            );
        }
        let index_of = |n: &str| steps.iter().position(|s| s.name == n);
        let needs: Vec<usize> = match needs {
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
        let mut depends_on: BTreeSet<usize> = BTreeSet::new();
        for &n in &needs {
            depends_on.insert(n);
            depends_on.extend(ancestors[n].iter().copied());
        }
        let scope = StepScope {
            pipeline,
            field: field.clone(),
            name: name.clone(),
            steps: &steps,
            depends_on,
            models,
            prompts,
        };
        let when = when.and_then(|text| match crate::expr::Expr::parse(&text) {
            Ok(expr) => {
                for path in expr.paths() {
                    if let crate::expr::Root::Step(step) = &path.root {
                        scope.step_path(p, &format!("{field}.when"), "`when`", step, &path.fields);
                    }
                }
                Some(expr)
            }
            Err(e) => {
                p.add(format!("{field}.when"), e);
                None
            }
        });
        let kind = super::steps::step_kind(p, &scope, kind);
        if let Some(answer) = on_failure.as_ref().map(|f| &f.output) {
            match &kind {
                StepKindPlan::Generate(_) | StepKindPlan::Reduce(_) | StepKindPlan::Refine(_) => {}
                StepKindPlan::Map(_) if answer.is_array() => {}
                StepKindPlan::Map(_) => p.add(
                    format!("{field}.on_failure.output"),
                    "a map's stand-in answer must be a list, like the answers it stands in for",
                ),
                other => p.add(
                    format!("{field}.on_failure"),
                    format!(
                        "`on_failure` applies to generate, map, reduce and refine steps, not a {} step (its output is read by kind, so a stand-in could not take its place)",
                        other.name()
                    ),
                ),
            }
        }
        let depends_on = scope.depends_on;
        ancestors.push(depends_on);
        steps.push(StepPlan {
            name,
            needs,
            kind,
            when,
            on_failure: on_failure.map(|f| f.output),
        });
    }
    let experiments: Vec<&str> = steps
        .iter()
        .filter_map(|s| match &s.kind {
            StepKindPlan::Generate(GeneratePlan {
                experiment: Some(e),
                ..
            }) => Some(e.name.as_str()),
            _ => None,
        })
        .collect();
    if experiments.len() > 1 {
        p.add(
            format!("pipelines.{pipeline}.steps"),
            format!(
                "one experiment per pipeline (a result records one variant); found {}",
                experiments.join(", ")
            ),
        );
    }
    let output = match raw.output {
        None => OutputPlan::LastRun,
        Some(raw::RawOutput::Step(name)) => match steps.iter().position(|s| s.name == name) {
            Some(i) => OutputPlan::Step(i),
            None => {
                p.add(
                    format!("pipelines.{pipeline}.output"),
                    format!("`{name}` is not a step of pipeline `{pipeline}`"),
                );
                OutputPlan::LastRun
            }
        },
        Some(raw::RawOutput::Assembled(assemble)) => {
            let scope = StepScope {
                pipeline,
                field: format!("pipelines.{pipeline}.output"),
                name: "output".into(),
                steps: &steps,
                depends_on: (0..steps.len()).collect(),
                models,
                prompts,
            };
            let kind = super::steps::template(p, &scope, assemble.template, assemble.json);
            OutputPlan::Assembled(Box::new(StepPlan {
                name: "output".into(),
                needs: (0..steps.len()).collect(),
                kind,
                when: None,
                on_failure: None,
            }))
        }
    };
    let review = raw.review.map_or_else(ReviewPlan::default, |r| {
        let field = format!("pipelines.{pipeline}.review");
        let r = match r {
            raw::RawReviewSpec::Settings(r) => r,
            raw::RawReviewSpec::Keyword(word) => {
                if word != "before_generate" {
                    p.add(
                        field.clone(),
                        format!("`{word}` is not a review keyword: write `before_generate` or the settings {{when, cost_above_usd, timeout_s, on_timeout, rerun_model, before_generate}}"),
                    );
                }
                raw::RawReview {
                    before_generate: true,
                    ..raw::RawReview::default()
                }
            }
        };
        if r.before_generate {
            if r.cost_above_usd.is_some() {
                p.add(
                    format!("{field}.cost_above_usd"),
                    "the cost is known only after generation; with before_generate, use `when`",
                );
            }
            if !steps.iter().any(|s| s.kind.generates()) {
                p.add(
                    format!("{field}.before_generate"),
                    "the pipeline has no generation step (generate, map, reduce, refine) to hold",
                );
            }
            if r.on_timeout.as_deref() == Some("rerun") {
                p.add(
                    format!("{field}.on_timeout"),
                    "`rerun` would generate without approval; with before_generate use approve (generate) or reject",
                );
            }
            // What `when` reads must be known before generation.
            let mut before: Vec<bool> = Vec::with_capacity(steps.len());
            for step in steps.iter() {
                let ok = !step.kind.generates()
                    && step.needs.iter().all(|&j| before.get(j).copied().unwrap_or(false));
                before.push(ok);
            }
            if let Some(text) = &r.when {
                if let Ok(expr) = crate::expr::Expr::parse(text) {
                    for path in expr.paths() {
                        if let crate::expr::Root::Step(name) = &path.root {
                            let known = steps
                                .iter()
                                .position(|s| &s.name == name)
                                .is_some_and(|i| before[i]);
                            if !known {
                                p.add(
                                    format!("{field}.when"),
                                    format!("reads step `{name}`, which runs only after generation; with before_generate, `when` can read the input and the steps before generation"),
                                );
                            }
                        }
                    }
                }
            }
        }
        let scope = StepScope {
            pipeline,
            field: field.clone(),
            name: "review".into(),
            steps: &steps,
            depends_on: (0..steps.len()).collect(),
            models,
            prompts,
        };
        let when = r
            .when
            .and_then(|text| match crate::expr::Expr::parse(&text) {
                Ok(expr) => {
                    for path in expr.paths() {
                        if let crate::expr::Root::Step(step) = &path.root {
                            scope.step_path(
                                p,
                                &format!("{field}.when"),
                                "`review.when`",
                                step,
                                &path.fields,
                            );
                        }
                    }
                    Some((expr, text))
                }
                Err(e) => {
                    p.add(format!("{field}.when"), e);
                    None
                }
            });
        if r.cost_above_usd
            .is_some_and(|c| !(c.is_finite() && c >= 0.0))
        {
            p.add(
                format!("{field}.cost_above_usd"),
                "a cost in USD, 0 or more",
            );
        }
        if r.timeout_s == Some(0) {
            p.add(format!("{field}.timeout_s"), "must be at least 1");
        }
        let on_timeout = match (r.on_timeout.as_deref(), r.rerun_model) {
            (None | Some("reject"), None) => crate::review::OnTimeout::Reject,
            (Some("approve"), None) => crate::review::OnTimeout::Approve,
            (Some("rerun"), Some(model)) => {
                if !models.contains_key(&model) {
                    p.add(
                        format!("{field}.rerun_model"),
                        format!("`{model}` is not a model under `models`"),
                    );
                }
                crate::review::OnTimeout::Rerun { model }
            }
            (Some("rerun"), None) => {
                p.add(
                    format!("{field}.rerun_model"),
                    "required with `on_timeout: rerun`: the model the job runs again on",
                );
                crate::review::OnTimeout::Reject
            }
            (Some("approve" | "reject") | None, Some(_)) => {
                p.add(
                    format!("{field}.rerun_model"),
                    "only used with `on_timeout: rerun`",
                );
                crate::review::OnTimeout::Reject
            }
            (Some(other), _) => {
                p.add(
                    format!("{field}.on_timeout"),
                    format!("`{other}` is not one of approve, reject, rerun"),
                );
                crate::review::OnTimeout::Reject
            }
        };
        ReviewPlan {
            before_generate: r.before_generate,
            on_timeout,
            when,
            cost_above_usd: r.cost_above_usd,
            timeout: r.timeout_s.map_or(
                ReviewPlan::default().timeout,
                std::time::Duration::from_secs,
            ),
        }
    });
    if raw.record_output_chars > 1_000_000 {
        p.add(
            format!("pipelines.{pipeline}.record_output_chars"),
            "at most 1000000 (step outputs travel in every result)",
        );
    }
    let batch = raw.batch.map(|b| {
        let field = format!("pipelines.{pipeline}.batch");
        if b.collect_ms == 0 {
            p.add(format!("{field}.collect_ms"), "must be at least 1");
        }
        if b.poll_ms < 100 {
            p.add(format!("{field}.poll_ms"), "must be at least 100");
        }
        if b.max_requests == 0 || b.max_requests > 10_000 {
            p.add(
                format!("{field}.max_requests"),
                "between 1 and 10000 (a batch's results are read whole)",
            );
        }
        if b.min_deadline_s.is_some_and(|s| s < 86_400) {
            p.warn(
                format!("{field}.min_deadline_s"),
                "below 24 h: a provider may take up to 24 h to end a batch, and a job whose deadline passes first is dead-lettered after its batch was paid for",
            );
        }
        if !b.low_priority && b.min_deadline_s.is_none() {
            p.add(
                field.clone(),
                "selects no job: set low_priority: true and/or min_deadline_s",
            );
        }
        BatchPlan {
            low_priority: b.low_priority,
            min_deadline: b.min_deadline_s.map(std::time::Duration::from_secs),
            collect: std::time::Duration::from_millis(b.collect_ms.max(1)),
            max_requests: b.max_requests.clamp(1, 10_000),
            poll: std::time::Duration::from_millis(b.poll_ms.max(100)),
            max_queued: b.max_queued.max(1),
        }
    });
    PipelinePlan {
        batch,
        name: pipeline.to_owned(),
        budget_fallback: None,
        steps,
        output,
        on_failure: raw.on_failure.map(|f| f.output),
        guardrails: raw
            .guardrails
            .and_then(|g| guardrails_plan(p, &format!("pipelines.{pipeline}.guardrails"), g))
            .map(Arc::new),
        record_output_chars: raw.record_output_chars,
        review,
    }
}

fn guardrails_plan(
    p: &mut Problems,
    field: &str,
    raw: raw::RawGuardrails,
) -> Option<GuardrailsPlan> {
    use crate::guardrails::{default_injection_patterns, GuardrailSet, PiiKind, SideConfig};
    let mut side = |name: &str, raw: raw::RawGuardSide, injection_default: bool| {
        let at = format!("{field}.{name}");
        let injection = match raw.injection {
            None if injection_default => default_patterns(),
            None => Vec::new(),
            Some(raw::RawPatterns::Keyword(k)) if k == "default" => default_patterns(),
            Some(raw::RawPatterns::Keyword(k)) if k == "none" => Vec::new(),
            Some(raw::RawPatterns::Keyword(k)) => {
                p.add(
                    format!("{at}.injection"),
                    format!("`{k}` is not `default`, `none` or a list of patterns"),
                );
                Vec::new()
            }
            Some(raw::RawPatterns::List(list)) => list,
        };
        let redact = match raw.redact_pii {
            None => Vec::new(),
            Some(raw::RawPatterns::Keyword(k)) if k == "all" => PiiKind::ALL.to_vec(),
            Some(raw::RawPatterns::Keyword(k)) if k == "none" => Vec::new(),
            Some(raw::RawPatterns::Keyword(k)) => {
                p.add(format!("{at}.redact_pii"), format!("`{k}` is not `all`, `none` or a list of kinds"));
                Vec::new()
            }
            Some(raw::RawPatterns::List(list)) => list
                .iter()
                .enumerate()
                .filter_map(|(i, kind)| {
                    let found = PiiKind::parse(kind);
                    if found.is_none() {
                        p.add(
                            format!("{at}.redact_pii[{i}]"),
                            format!("`{kind}` is not a PII kind (email, phone, card, iban, national_id)"),
                        );
                    }
                    found
                })
                .collect(),
        };
        SideConfig {
            max_chars: raw.max_chars,
            max_tokens: raw.max_tokens,
            injection,
            deny: raw.deny,
            redact,
        }
    };
    fn default_patterns() -> Vec<String> {
        default_injection_patterns()
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }
    let input = side("input", raw.input, true);
    let output = side("output", raw.output, false);
    let action = |a: raw::RawGuardAction| match a {
        raw::RawGuardAction::DeadLetter => GuardAction::DeadLetter,
        raw::RawGuardAction::Review => GuardAction::Review,
    };
    match GuardrailSet::new(input, output) {
        Ok(set) => Some(GuardrailsPlan {
            set,
            on_block: action(raw.on_block),
            on_error: action(raw.on_error),
        }),
        Err(e) => {
            p.add(field, e);
            None
        }
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
