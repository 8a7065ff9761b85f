//! `generate`: render the prompt and ask the step's model (fixed, or chosen by a route step).

use std::time::Instant;

use super::structured;
use crate::config::{GeneratePlan, ModelChoice, PromptChoice, StickyBy};
use crate::pipeline::step::{RunFailure, StepContext, StepKind, StepOutput, StepResult};
use crate::provider::ChatRequest;
use crate::wire::DeadLetterReason;

impl StepKind for GeneratePlan {
    async fn run(&self, ctx: &StepContext<'_>) -> StepResult {
        run(ctx, self).await
    }
}

async fn run(ctx: &StepContext<'_>, plan: &GeneratePlan) -> StepResult {
    let started = Instant::now();
    let variant = plan.experiment.as_ref().and_then(|e| {
        let job = ctx.job;
        let unit = match e.sticky_by {
            // A user is one within its tenant; a job without one is its own unit.
            StickyBy::User => match &job.user {
                Some(user) => format!("{}\0{user}", job.tenant.as_str()),
                None => format!("job\0{}", job.idempotency_key),
            },
            StickyBy::Tenant => job.tenant.as_str().to_owned(),
            StickyBy::Job => format!("job\0{}", job.idempotency_key),
        };
        e.assign(&unit).map(|v| (e, v))
    });
    let alias = match &plan.model {
        ModelChoice::Fixed(alias) => alias.clone(),
        ModelChoice::FromRoute(index) => match ctx.output_of(*index) {
            Some(StepOutput::Routed { model, .. }) => model.clone(),
            _ => {
                return Err(RunFailure {
                    reason: DeadLetterReason::Internal,
                    error: format!(
                        "step `{}` ran before its route step finished",
                        ctx.step.name
                    ),
                    attempts: 0,
                })
            }
        },
    };
    let prompt = match &plan.prompt {
        PromptChoice::Fixed(prompt) => prompt.clone(),
        PromptChoice::FromRoute { route, prompts } => {
            let chosen = match ctx.output_of(*route) {
                Some(StepOutput::Routed { prompt, .. }) => prompt.as_ref(),
                _ => None,
            };
            chosen
                .and_then(|name| prompts.get(name))
                .cloned()
                .ok_or_else(|| RunFailure {
                    reason: DeadLetterReason::Internal,
                    error: format!(
                        "step `{}`: its route step chose no prompt it knows",
                        ctx.step.name
                    ),
                    attempts: 0,
                })?
        }
    };
    // The variant's prompt and model, when the job is in the experiment.
    let (alias, prompt) = match variant {
        Some((_, v)) => (
            v.model.clone().unwrap_or(alias),
            v.prompt.clone().unwrap_or(prompt),
        ),
        None => (alias, prompt),
    };
    let overrides = variant.map(|(_, v)| (v.temperature, v.max_tokens));
    let system = prompt
        .system
        .as_ref()
        .map(|t| ctx.render(t, &[]))
        .transpose()?;
    let mut user = ctx.render(&prompt.user, &[])?;
    // The prompt as rendered, before any cut to fit a context window.
    let asked = user.clone();
    let request = |user: &str| {
        let (system, user) = (system.clone(), user.to_owned());
        let name = prompt.name.clone();
        move |m: &crate::config::ModelPlan| {
            let mut request = ChatRequest::to(m, &system, &user).from_prompt(&name);
            if let Some((temperature, max_tokens)) = overrides {
                request.temperature = temperature.unwrap_or(request.temperature);
                request.max_tokens = max_tokens.map_or(request.max_tokens, |n| n.min(m.max_tokens));
            }
            request
        }
    };
    // A paraphrase of a question this step answered before is answered from the cache.
    let probe = match &plan.semantic_cache {
        Some(sc) => {
            let (temperature, max_tokens) = overrides.unwrap_or_default();
            // Everything that shapes the answer besides the question is in the index.
            let shape = format!(
                "{}\u{0}{temperature:?}\u{0}{max_tokens:?}\u{0}{}",
                variant.map_or("", |(_, v)| v.name.as_str()),
                sc.embedding_model,
            );
            let key = SemanticKey {
                alias: &alias,
                prompt: &prompt.name,
                system: system.as_deref(),
                user: &user,
                shape: &shape,
            };
            semantic_probe(ctx, sc, key).await
        }
        None => None,
    };
    let hit = probe.as_ref().and_then(|p| {
        let (hit, model) = (p.hit.as_ref()?, ctx.calls.model(&alias)?);
        Some((
            crate::calls::CallOutcome {
                response: hit.response.clone(),
                model: model.clone(),
                attempts: 0,
                degraded: false,
                cached: true,
            },
            hit.similarity,
        ))
    });
    let similarity = hit.as_ref().map(|(_, s)| *s);
    let called = match hit {
        Some((outcome, _)) => Ok(outcome),
        None => ctx.call_raw(&alias, request(&user)).await,
    };
    let mut outcome = match called {
        Ok(outcome) => outcome,
        Err(failure) if plan.truncate_to_fit && failure.only_context_length() => {
            // No model's window holds the prompt: cut it to the step's model's window.
            let Some(cut) = truncate(ctx, &alias, system.as_deref(), &user) else {
                return Err(ctx.call_failed(failure));
            };
            tracing::info!(step = %ctx.step.name, from = user.len(), to = cut.len(), "prompt cut to fit the model's context window");
            user = cut;
            ctx.call(&alias, request(&user)).await?
        }
        Err(failure) => return Err(ctx.call_failed(failure)),
    };
    let mut record = ctx.record(started, &outcome);
    record.prompt = Some(prompt.name.clone());
    record.similarity = similarity;
    let json = match &plan.output {
        None => None,
        Some(schema) => {
            // Validate; on failure ask again with the error, at most `max_repairs` times.
            let mut repairs = 0;
            loop {
                match structured::check(&outcome.response.content, schema) {
                    Ok(value) => break Some(value),
                    Err(problem) if repairs < schema.max_repairs => {
                        repairs += 1;
                        tracing::debug!(step = %ctx.step.name, repairs, problem = %crate::guardrails::scrub_for_log(&problem), "answer does not satisfy the output schema; asking for a repair");
                        let repair =
                            structured::repair_prompt(&user, &outcome.response.content, &problem);
                        let attempts = record.attempts;
                        let (input, output, cost) =
                            (record.input_tokens, record.output_tokens, record.cost_usd);
                        outcome = ctx.call(&alias, request(&repair)).await?;
                        record = ctx.record(started, &outcome);
                        record.prompt = Some(prompt.name.clone());
                        record.attempts += attempts;
                        record.input_tokens += input;
                        record.output_tokens += output;
                        record.cost_usd += cost;
                    }
                    Err(problem) => {
                        return Err(RunFailure {
                            reason: DeadLetterReason::OutputInvalid,
                            error: format!(
                                "step `{}`: the answer does not satisfy {} after {repairs} repair attempt(s): {problem}",
                                ctx.step.name, schema.path
                            ),
                            attempts: record.attempts,
                        });
                    }
                }
            }
        }
    };
    if let (Some(p), Some(sc)) = (probe, &plan.semantic_cache) {
        // What the question cost to embed is this step's spend.
        record.cost_usd += p.cost;
        // Stored only if the job's result is good (see the runner), and only the answer the
        // index stands for: the step's own model, to the whole prompt, uncached.
        let own = !outcome.degraded && outcome.model.alias == alias && user == asked;
        if p.hit.is_none() && !outcome.cached && own {
            ctx.shared
                .semantic_inserts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(crate::pipeline::step::SemanticInsert {
                    index: p.index,
                    vector: p.vector,
                    response: outcome.response.clone(),
                    plan: sc.clone(),
                });
        }
    }
    let output = StepOutput::Generated {
        text: outcome.response.content,
        model: outcome.model.alias.clone(),
        degraded: outcome.degraded,
        json,
        variant: variant.map(|(e, v)| (e.name.clone(), v.name.clone())),
    };
    Ok((output, record))
}

/// Marks where a prompt was cut.
const CUT_NOTE: &str = "\n[... truncated to fit the model's context window]";

/// `user` cut (at a character boundary) so that it, the system prompt and the longest answer
/// fit the context window of `alias`; `None` when the model declares no window or even an
/// empty prompt would not fit.
fn truncate(
    ctx: &StepContext<'_>,
    alias: &str,
    system: Option<&str>,
    user: &str,
) -> Option<String> {
    let model = ctx.calls.model(alias)?;
    let window = model.context_window?;
    let budget = window.checked_sub(u64::from(model.max_tokens))?;
    let fits = |text: &str| crate::tokens::prompt(&model.model, system, text) <= budget;
    if !fits(CUT_NOTE) {
        return None;
    }
    // The longest prefix that fits, by binary search over character positions.
    let bounds: Vec<usize> = user.char_indices().map(|(i, _)| i).collect();
    let (mut lo, mut hi) = (0usize, bounds.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let cut = bounds.get(mid).copied().unwrap_or(user.len());
        if fits(&format!("{}{CUT_NOTE}", &user[..cut])) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let cut = bounds.get(lo).copied().unwrap_or(user.len());
    Some(format!("{}{CUT_NOTE}", &user[..cut]))
}

/// The semantic cache's look at a step's question: its index, its embedding, what the
/// embedding cost, and the stored answer it matched, if any.
struct Probe {
    index: String,
    vector: Vec<f32>,
    cost: f64,
    hit: Option<crate::calls::semantic::Hit>,
}

/// What a semantic-cache index is made of besides the tenant, pipeline and step.
struct SemanticKey<'a> {
    alias: &'a str,
    prompt: &'a str,
    system: Option<&'a str>,
    user: &'a str,
    /// Experiment variant, temperature and answer limit overrides, embedding model.
    shape: &'a str,
}

/// Embeds the step's question and looks it up; `None` when the job has no question in
/// `on`, the prompt does not contain it, the model's temperature is above the cache's, or the
/// embedding failed (the step then simply asks its model).
async fn semantic_probe(
    ctx: &StepContext<'_>,
    plan: &crate::config::SemanticCachePlan,
    key: SemanticKey<'_>,
) -> Option<Probe> {
    let SemanticKey {
        alias,
        prompt,
        system,
        user,
        shape,
    } = key;
    if ctx
        .calls
        .model(alias)
        .is_some_and(|m| m.temperature > plan.max_temperature)
    {
        return None;
    }
    let cache = ctx.calls.semantic_cache()?;
    let question = ctx.input.get(&plan.on)?.as_str()?.trim();
    if question.is_empty() || !user.contains(question) {
        return None;
    }
    // Everything but the question must match for an entry to answer.
    let rest = user.replace(question, "\u{0}");
    let index = crate::calls::semantic::SemanticCache::index(
        ctx.job.tenant.as_str(),
        &[
            &ctx.pipeline.name,
            &ctx.step.name,
            alias,
            prompt,
            system.unwrap_or_default(),
            &rest,
            shape,
        ],
    );
    let (vector, cost) = match ctx.calls.embed(&plan.embedding_model, question).await {
        Ok(embedded) => embedded,
        Err(e) => {
            tracing::debug!(step = %ctx.step.name, error = %e, "semantic cache: could not embed the question; asking the model");
            return None;
        }
    };
    let hit = cache.lookup(&index, &vector, plan).await;
    Some(Probe {
        index,
        vector,
        cost,
        hit,
    })
}
