//! A job's worst-case cost before it runs: what its budget reservation must cover so it is
//! never refused half-way. Every LLM step counts once (a fallback chain ends in one successful
//! call; failed attempts are not billed) on its costliest candidate model, with the prompt as
//! large as this job's input can make it and the answer at the model's `max_tokens`; a step
//! with an output schema counts once more per allowed repair, whose prompt also carries the
//! rejected answer and the problem.

use crate::config::{
    Assemble, ClassifyMethod, GeneratePlan, ModelChoice, ModelPlan, PipelinePlan, PromptPlan,
    SplitBy, SplitSource, StepKindPlan,
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
                // Over every model and prompt the step may use, its experiment's variants' too.
                StepKindPlan::Generate(g) => {
                    let aliases = generate_aliases(pipeline, g);
                    let repairs = g.output.as_ref().map_or(0, |o| o.max_repairs);
                    let variant_prompts = g
                        .experiment
                        .iter()
                        .flat_map(|e| e.variants.iter().filter_map(|v| v.prompt.as_ref()));
                    g.prompt
                        .all()
                        .into_iter()
                        .chain(variant_prompts)
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
                // At most one call per chunk over all levels plus the last. A prompt carries
                // at most `max_input_chars` of answers (4 bytes a character), or a group of up
                // to three answers that are each longer than that.
                StepKindPlan::Reduce(r) => {
                    let (chunks, mapped) = match pipeline.steps.get(r.over).map(|s| &s.kind) {
                        Some(StepKindPlan::Map(m)) => (
                            self.chunks_bound(job, pipeline, m.over).0,
                            self.max_tokens_of(&[m.model.as_str()]),
                        ),
                        _ => (1, 0),
                    };
                    let answer = mapped.max(self.max_tokens_of(&[r.model.as_str()]));
                    let mut prompt = self.render(job, pipeline, &r.prompt, &[]);
                    prompt.outputs += 4 * r.max_input_chars as u64 + 3 * answer;
                    chunks.max(1) as f64 * self.costliest(&[r.model.as_str()], &prompt, 0)
                }
                // Each round: one generation (its revision carries the previous answer and
                // the evaluator's feedback) and one evaluation of one answer.
                StepKindPlan::Refine(r) => {
                    let answer = self.max_tokens_of(&[r.model.as_str()]);
                    let feedback = self.max_tokens_of(&[r.evaluator_model.as_str()]);
                    let mut prompt = self.render(job, pipeline, &r.prompt, &[]);
                    prompt.outputs += answer + feedback + REPAIR_PROBLEM_TOKENS;
                    let generate = self.costliest(&[r.model.as_str()], &prompt, 0);
                    let mut judge = self.render(job, pipeline, &r.evaluator_prompt, &[]);
                    judge.outputs += answer;
                    let evaluate = self.costliest(&[r.evaluator_model.as_str()], &judge, 0);
                    f64::from(r.max_rounds) * (generate + evaluate)
                }
            })
            .sum()
    }

    /// How many chunks the split step at `index` can make of this job's input, and the most
    /// tokens one of them can have (a token is at least a byte, a character at most 4).
    fn chunks_bound(&self, job: &Job, pipeline: &PipelinePlan, index: usize) -> (u64, u64) {
        let Some(StepKindPlan::Split(split)) = pipeline.steps.get(index).map(|s| &s.kind) else {
            return (0, 0);
        };
        let max = split.max_chunks as u64;
        let source = match &split.from {
            SplitSource::Input(field) => job.input.get(field),
            SplitSource::Step(_) => None,
        };
        let bytes = source.map(|v| match v {
            serde_json::Value::String(s) => s.len() as u64,
            other => other.to_string().len() as u64,
        });
        let count = |step: usize| bytes.map_or(max, |b| (b / step.max(1) as u64 + 1).min(max));
        match &split.by {
            // A chunk may end at a break in the last fifth of its window.
            SplitBy::Chars { size, overlap } => (
                count(size.saturating_sub(size / 5 + overlap)),
                4 * *size as u64,
            ),
            SplitBy::Tokens { size, overlap, .. } => (count(size - overlap), *size as u64),
            SplitBy::JsonArray => match source {
                Some(serde_json::Value::Array(items)) => (
                    (items.len() as u64).min(max),
                    items
                        .iter()
                        .map(|i| i.to_string().len() as u64)
                        .max()
                        .unwrap_or(0),
                ),
                _ => {
                    let whole = match &split.from {
                        SplitSource::Step(j) => pipeline
                            .steps
                            .get(*j)
                            .map_or(0, |s| self.output_bound(job, pipeline, &s.name)),
                        SplitSource::Input(_) => bytes.unwrap_or(0),
                    };
                    (max, whole)
                }
            },
        }
    }

    /// The largest `max_tokens` among `aliases` and their fallbacks.
    fn max_tokens_of(&self, aliases: &[&str]) -> u64 {
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
                // A prompt may be written to the provider's prompt cache, priced apart.
                let price = m.price.worst_case();
                let first = price.cost(prompt, answer);
                let repair = price.cost(prompt + answer + REPAIR_PROBLEM_TOKENS, answer);
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
                    Var::Step(name, _) => self.output_bound(job, pipeline, name),
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
    fn output_bound(&self, job: &Job, pipeline: &PipelinePlan, name: &str) -> u64 {
        let Some(step) = pipeline.steps.iter().find(|s| s.name == name) else {
            return 0;
        };
        let answers = |aliases: &[&str]| self.max_tokens_of(aliases);
        let own = match &step.kind {
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
            StepKindPlan::Generate(g) => answers(&generate_aliases(pipeline, g)),
            StepKindPlan::Reduce(r) => answers(&[r.model.as_str()]),
            StepKindPlan::Refine(r) => answers(&[r.model.as_str()]),
            // Every answer of the map, for as many chunks as this job's input can make.
            StepKindPlan::Map(m) => {
                self.chunks_bound(job, pipeline, m.over).0 * answers(&[m.model.as_str()])
            }
            // What the template reads, plus its own text.
            StepKindPlan::Template(assemble) => {
                let vars: Vec<&Var> = match assemble {
                    Assemble::Text(t) => t.vars().collect(),
                    Assemble::Json(j) => j.vars(),
                };
                // Each step read once, times how often it is read: templates reading templates
                // stay linear, not exponential.
                let mut reads: std::collections::BTreeMap<&str, u64> = Default::default();
                let mut input = 0u64;
                for var in vars {
                    match var {
                        Var::Step(step, _) => *reads.entry(step.as_str()).or_default() += 1,
                        Var::Input(field) => {
                            input += job
                                .input
                                .get(field)
                                .map_or(0, |v| v.to_string().len() as u64)
                        }
                        _ => {}
                    }
                }
                reads
                    .into_iter()
                    .map(|(step, n)| n.saturating_mul(self.output_bound(job, pipeline, step)))
                    .fold(input, u64::saturating_add)
                    .saturating_add(assemble.literal_bytes())
            }
            // A split hands on the document it split.
            StepKindPlan::Split(split) => match &split.from {
                SplitSource::Input(field) => job
                    .input
                    .get(field)
                    .map_or(0, |v| v.to_string().len() as u64),
                SplitSource::Step(j) => pipeline
                    .steps
                    .get(*j)
                    .map_or(0, |s| self.output_bound(job, pipeline, &s.name)),
            },
        };
        // A static `on_failure` answer may stand in for the output.
        let stand_in = step
            .on_failure
            .as_ref()
            .map_or(0, |v| v.to_string().len() as u64);
        own.max(stand_in)
    }
}

/// Every model alias a step of `pipeline` may call first (fallbacks not included): classify,
/// generate (its route's choices and experiment variants), map, reduce and refine (and its
/// evaluator).
pub fn pipeline_aliases(pipeline: &PipelinePlan) -> Vec<&str> {
    let mut aliases = Vec::new();
    for step in &pipeline.steps {
        match &step.kind {
            StepKindPlan::Classify(c) => {
                if let crate::config::ClassifyMethod::Llm { model, .. } = &c.method {
                    aliases.push(model.as_str());
                }
            }
            StepKindPlan::Generate(g) => aliases.extend(generate_aliases(pipeline, g)),
            StepKindPlan::Map(m) => aliases.push(m.model.as_str()),
            StepKindPlan::Reduce(r) => aliases.push(r.model.as_str()),
            StepKindPlan::Refine(r) => {
                aliases.push(r.model.as_str());
                aliases.push(r.evaluator_model.as_str());
            }
            StepKindPlan::Route(_) | StepKindPlan::Template(_) | StepKindPlan::Split(_) => {}
        }
    }
    aliases.sort_unstable();
    aliases.dedup();
    aliases
}

/// Every model alias a generate step may call first: its own (or its route's choices) and its
/// experiment's variants'.
fn generate_aliases<'a>(pipeline: &'a PipelinePlan, g: &'a GeneratePlan) -> Vec<&'a str> {
    let mut aliases: Vec<&str> = match &g.model {
        ModelChoice::Fixed(alias) => vec![alias.as_str()],
        ModelChoice::FromRoute(index) => route_targets(pipeline, *index),
    };
    if let Some(e) = &g.experiment {
        aliases.extend(e.variants.iter().filter_map(|v| v.model.as_deref()));
    }
    aliases
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
