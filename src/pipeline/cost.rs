//! A job's worst-case cost before it runs: what its budget reservation must cover so it is
//! never refused half-way. Every LLM step counts once (a fallback chain ends in one successful
//! call; failed attempts are not billed) on its costliest candidate model, with the prompt as
//! large as this job's input can make it and the answer at the model's `max_tokens`; a step
//! with an output schema counts once more per allowed repair, whose prompt also carries the
//! rejected answer and the problem.

use crate::config::{
    ClassifyMethod, ModelChoice, ModelPlan, PipelinePlan, PromptPlan, SplitBy, SplitSource,
    StepKindPlan,
};
use crate::template::{Scope, Template, Var};
use crate::wire::Job;

use super::Runner;

/// Tokens allowed for the validation problem quoted in a repair prompt.
const REPAIR_PROBLEM_TOKENS: u64 = 512;
/// Tokens allowed per variable for merges at its boundaries.
const PER_VAR_SLACK: u64 = 2;

/// A step's prompt as this job renders it, before a model's tokenizer counts it: the text with
/// every earlier step's output left out, and the most tokens those outputs can add.
struct Prompt {
    user: String,
    system: Option<String>,
    outputs: u64,
}

impl Prompt {
    /// At least as many tokens as `model` counts for the prompt.
    fn tokens(&self, model: &ModelPlan) -> u64 {
        crate::tokens::prompt(&model.model, self.system.as_deref(), &self.user) + self.outputs
    }
}

impl Runner {
    /// The most `job` can cost in `pipeline`, in USD.
    pub fn worst_case_cost(&self, job: &Job, pipeline: &PipelinePlan) -> f64 {
        pipeline
            .steps
            .iter()
            .map(|step| match &step.kind {
                StepKindPlan::Classify(c) => match &c.method {
                    ClassifyMethod::Llm { model, prompt } => {
                        let prompt = self.render(job, pipeline, prompt, &c.categories);
                        self.costliest(&[model.as_str()], &prompt, 0)
                    }
                    ClassifyMethod::Rules { .. } => 0.0,
                },
                StepKindPlan::Route(_) | StepKindPlan::Template(_) | StepKindPlan::Split(_) => 0.0,
                StepKindPlan::Generate(g) => {
                    let aliases: Vec<&str> = match &g.model {
                        ModelChoice::Fixed(alias) => vec![alias.as_str()],
                        ModelChoice::FromRoute(index) => route_targets(pipeline, *index),
                    };
                    let repairs = g.output.as_ref().map_or(0, |o| o.max_repairs);
                    g.prompt
                        .all()
                        .into_iter()
                        .map(|p| {
                            let prompt = self.render(job, pipeline, p, &[]);
                            self.costliest(&aliases, &prompt, repairs)
                        })
                        .fold(0.0, f64::max)
                }
                // One call per chunk, each prompt carrying at most one chunk.
                StepKindPlan::Map(m) => {
                    let (chunks, chunk_tokens) = self.chunks_bound(job, pipeline, m.over);
                    let mut prompt = self.render(job, pipeline, &m.prompt, &[]);
                    prompt.outputs += chunk_tokens;
                    chunks as f64 * self.costliest(&[m.model.as_str()], &prompt, 0)
                }
                // At most one call per chunk over all levels plus the last, each prompt
                // carrying at most `max_input_chars` of answers (4 bytes a character).
                StepKindPlan::Reduce(r) => {
                    let chunks = match pipeline.steps.get(r.over).map(|s| &s.kind) {
                        Some(StepKindPlan::Map(m)) => self.chunks_bound(job, pipeline, m.over).0,
                        _ => 1,
                    };
                    let mut prompt = self.render(job, pipeline, &r.prompt, &[]);
                    prompt.outputs += 4 * r.max_input_chars as u64;
                    chunks.max(1) as f64 * self.costliest(&[r.model.as_str()], &prompt, 0)
                }
                // Each round: one generation (its revision carries the previous answer and
                // the feedback) and one evaluation; counted twice over for slack.
                StepKindPlan::Refine(r) => {
                    let answer = self.output_bound(pipeline, &step.name);
                    let mut prompt = self.render(job, pipeline, &r.prompt, &[]);
                    prompt.outputs += 2 * answer + REPAIR_PROBLEM_TOKENS;
                    let generate = 2.0 * self.costliest(&[r.model.as_str()], &prompt, 0);
                    let mut judge = self.render(job, pipeline, &r.evaluator_prompt, &[]);
                    judge.outputs += answer;
                    let evaluate = self.costliest(&[r.evaluator_model.as_str()], &judge, 0);
                    f64::from(r.max_rounds) * (generate + evaluate)
                }
            })
            .sum()
    }

    /// How many chunks the split step at `index` can make of this job's input, and the most
    /// tokens one of them can have.
    fn chunks_bound(&self, job: &Job, pipeline: &PipelinePlan, index: usize) -> (u64, u64) {
        let Some(StepKindPlan::Split(split)) = pipeline.steps.get(index).map(|s| &s.kind) else {
            return (0, 0);
        };
        let max = split.max_chunks as u64;
        let source_bytes = match &split.from {
            SplitSource::Input(field) => job.input.get(field).map(|v| match v {
                serde_json::Value::String(s) => s.len() as u64,
                other => other.to_string().len() as u64,
            }),
            SplitSource::Step(_) => None,
        };
        match (&split.by, source_bytes) {
            (SplitBy::Chars { size, overlap }, bytes) => {
                let step = (size - overlap).max(1) as u64;
                let n = bytes.map_or(max, |b| (b / step + 1).min(max));
                (n, 4 * *size as u64)
            }
            (SplitBy::Tokens { size, overlap, .. }, bytes) => {
                let step = (size - overlap).max(1) as u64;
                let n = bytes.map_or(max, |b| (b / step + 1).min(max));
                (n, *size as u64)
            }
            (SplitBy::JsonArray, bytes) => (max, bytes.unwrap_or(0)),
        }
    }

    /// The cost of the dearest call among `aliases` and their fallbacks, times one plus
    /// `repairs` (each repair's prompt adds the rejected answer and the problem).
    fn costliest(&self, aliases: &[&str], prompt: &Prompt, repairs: u32) -> f64 {
        let mut candidates: Vec<&str> = Vec::new();
        for alias in aliases {
            candidates.push(alias);
            if let Some(model) = self.calls().model(alias) {
                candidates.extend(model.fallbacks.iter().map(String::as_str));
            }
        }
        candidates
            .iter()
            .filter_map(|alias| self.calls().model(alias))
            .map(|m| {
                let prompt = prompt.tokens(m);
                let answer = u64::from(m.max_tokens);
                let first = m.price.cost(prompt, answer);
                let repair = m
                    .price
                    .cost(prompt + answer + REPAIR_PROBLEM_TOKENS, answer);
                first + f64::from(repairs) * repair
            })
            .fold(0.0, f64::max)
    }

    /// The job's input rendered into `prompt` once (every candidate model counts the same
    /// text), with every earlier step's output bounded at its model's `max_tokens`.
    fn render(
        &self,
        job: &Job,
        pipeline: &PipelinePlan,
        prompt: &PromptPlan,
        categories: &[String],
    ) -> Prompt {
        let empty = |_: &str, _: &[String]| Some(serde_json::Value::Null);
        let locals: Vec<(&str, &str)> = crate::template::LOCALS.iter().map(|l| (*l, "")).collect();
        let scope = Scope {
            input: &job.input,
            categories,
            step: &empty,
            locals: &locals,
        };
        let mut outputs = 0;
        let mut text = |template: &Template| {
            outputs += template
                .vars()
                .map(|var| match var {
                    Var::Step(name, _) => self.output_bound(pipeline, name),
                    _ => 0,
                })
                .sum::<u64>()
                + PER_VAR_SLACK * template.vars().count() as u64;
            template.render(&scope).unwrap_or_default()
        };
        let user = text(&prompt.user);
        let system = prompt.system.as_ref().map(&mut text);
        Prompt {
            user,
            system,
            outputs,
        }
    }

    /// The most tokens step `name`'s output can have when rendered into a later prompt.
    fn output_bound(&self, pipeline: &PipelinePlan, name: &str) -> u64 {
        let Some(step) = pipeline.steps.iter().find(|s| s.name == name) else {
            return 0;
        };
        let max_tokens_of = |aliases: &[&str]| {
            aliases
                .iter()
                .filter_map(|a| self.calls().model(a))
                .flat_map(|m| {
                    std::iter::once(u64::from(m.max_tokens)).chain(
                        m.fallbacks
                            .iter()
                            .filter_map(|f| self.calls().model(f))
                            .map(|f| u64::from(f.max_tokens)),
                    )
                })
                .max()
                .unwrap_or(0)
        };
        match &step.kind {
            // A category or a model alias: short config text, counted as one token a byte.
            StepKindPlan::Classify(c) => c
                .categories
                .iter()
                .map(|c| c.len() as u64)
                .max()
                .unwrap_or(0),
            StepKindPlan::Route(r) => r
                .routes
                .values()
                .chain(std::iter::once(&r.default))
                .flat_map(|t| [&t.model, &t.prompt, &t.branch])
                .flatten()
                .map(|a| a.len() as u64)
                .max()
                .unwrap_or(0)
                .max(64),
            StepKindPlan::Generate(g) => match &g.model {
                ModelChoice::Fixed(alias) => max_tokens_of(&[alias.as_str()]),
                ModelChoice::FromRoute(index) => max_tokens_of(&route_targets(pipeline, *index)),
            },
            StepKindPlan::Reduce(r) => max_tokens_of(&[r.model.as_str()]),
            StepKindPlan::Refine(r) => max_tokens_of(&[r.model.as_str()]),
            // Every answer of the map, or every earlier step's output in the template.
            StepKindPlan::Map(m) => {
                let chunks = match pipeline.steps.get(m.over).map(|s| &s.kind) {
                    Some(StepKindPlan::Split(split)) => split.max_chunks as u64,
                    _ => 1,
                };
                chunks * max_tokens_of(&[m.model.as_str()])
            }
            StepKindPlan::Template(_) => pipeline
                .steps
                .iter()
                .take_while(|s| s.name != name)
                .map(|s| self.output_bound(pipeline, &s.name))
                .sum::<u64>()
                .saturating_add(1_024),
            // A split hands on the document it split: its size is not known here.
            StepKindPlan::Split(_) => 0,
        }
    }
}

/// Every model alias the route step at `index` can choose.
fn route_targets(pipeline: &PipelinePlan, index: usize) -> Vec<&str> {
    match pipeline.steps.get(index).map(|s| &s.kind) {
        Some(StepKindPlan::Route(r)) => r
            .routes
            .values()
            .chain(std::iter::once(&r.default))
            .filter_map(|t| t.model.as_deref())
            .collect(),
        _ => Vec::new(),
    }
}
