//! `switchyard cost`: spend by tenant, pipeline, model and variant from results as `tail --json`
//! prints them, and what caching and routing saved: the same jobs on each pipeline's largest
//! model, uncached, priced from the config's price table.
//!
//! A job may appear twice (its review request, then its decided result, which carries the
//! request's spend plus any run after the decision): each job counts once, at its larger spend.
//! Replays (`duplicate`) and dead letters are not spend.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use chrono::{DateTime, Utc};
use switchyard::config::{ModelPlan, Plan, Price};
use switchyard::wire::{JobResult, StepRecord};

/// Spend and what the savings add up to, for one row of a table.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    jobs: u64,
    cost: f64,
    cache: f64,
    routing: f64,
    flex: f64,
    batch: f64,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.jobs += other.jobs;
        self.cost += other.cost;
        self.cache += other.cache;
        self.routing += other.routing;
        self.flex += other.flex;
        self.batch += other.batch;
    }

    /// What the same work would have cost on the pipeline's largest model, uncached.
    fn baseline(&self) -> f64 {
        self.cost + self.cache + self.routing + self.flex + self.batch
    }
}

/// The report for `lines` (results as JSON, one per line) under `plan`'s prices; only results
/// completed at or after `since`, when given.
pub fn report(
    plan: &Plan,
    lines: impl Iterator<Item = String>,
    since: Option<DateTime<Utc>>,
) -> String {
    // (tenant, job id) -> the output with the larger spend.
    let mut jobs: HashMap<(String, String), JobResult> = HashMap::new();
    let (mut unreadable, mut replays) = (0u64, 0u64);
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(result) = serde_json::from_str::<JobResult>(&line) else {
            // Dead letters and anything else that is not a result.
            unreadable += 1;
            continue;
        };
        if result.duplicate {
            replays += 1;
            continue;
        }
        if since.is_some_and(|since| result.completed_at < since) {
            continue;
        }
        let key = (result.tenant.clone(), result.job_id.clone());
        match jobs.get(&key) {
            Some(seen) if seen.usage.cost_usd >= result.usage.cost_usd => {}
            _ => {
                jobs.insert(key, result);
            }
        }
    }
    let largest: HashMap<&str, Option<&ModelPlan>> = plan
        .pipelines
        .iter()
        .map(|(name, p)| (name.as_str(), largest_model(plan, p)))
        .collect();
    let mut by_tenant: BTreeMap<String, Sums> = BTreeMap::new();
    let mut by_pipeline: BTreeMap<String, Sums> = BTreeMap::new();
    let mut by_model: BTreeMap<String, Sums> = BTreeMap::new();
    let mut by_variant: BTreeMap<(String, String), Sums> = BTreeMap::new();
    let mut total = Sums::default();
    for result in jobs.values() {
        let largest = largest.get(result.pipeline.as_str()).copied().flatten();
        let mut job = Sums {
            jobs: 1,
            cost: result.usage.cost_usd,
            ..Sums::default()
        };
        for step in result.steps.iter().filter(|s| s.model.is_some()) {
            let (cache, routing, flex, batch) = savings(plan, step, largest);
            job.cache += cache;
            job.routing += routing;
            job.flex += flex;
            job.batch += batch;
            let model = by_model
                .entry(step.model.clone().unwrap_or_default())
                .or_default();
            model.cost += step.cost_usd;
            model.cache += cache;
            model.routing += routing;
            model.flex += flex;
            model.batch += batch;
        }
        // A model's job count: the jobs that called it.
        let mut called: Vec<&str> = result
            .steps
            .iter()
            .filter_map(|s| s.model.as_deref())
            .collect();
        called.sort_unstable();
        called.dedup();
        for model in called {
            by_model.entry(model.to_owned()).or_default().jobs += 1;
        }
        by_tenant
            .entry(result.tenant.clone())
            .or_default()
            .add(&job);
        by_pipeline
            .entry(result.pipeline.clone())
            .or_default()
            .add(&job);
        let variant = result.route.variant.clone().unwrap_or_else(|| "-".into());
        by_variant
            .entry((result.pipeline.clone(), variant))
            .or_default()
            .add(&job);
        total.add(&job);
    }
    let mut out = String::new();
    table(
        &mut out,
        "tenant",
        by_tenant.iter().map(|(k, v)| (k.clone(), *v)),
    );
    table(
        &mut out,
        "pipeline",
        by_pipeline.iter().map(|(k, v)| (k.clone(), *v)),
    );
    table(
        &mut out,
        "model",
        by_model.iter().map(|(k, v)| (k.clone(), *v)),
    );
    table(
        &mut out,
        "pipeline/variant",
        by_variant
            .iter()
            .map(|((p, v), s)| (format!("{p}/{v}"), *s)),
    );
    let saved = total.baseline() - total.cost;
    let share = if total.baseline() > 0.0 {
        100.0 * saved / total.baseline()
    } else {
        0.0
    };
    out.push_str(&format!(
        "\nsavings over {} job(s)\n  spent                                  ${:>12.6}\n  saved by the response cache            ${:>12.6}\n  saved by routing to smaller models     ${:>12.6}\n  saved by the flex tier                 ${:>12.6}\n  saved by batch APIs                    ${:>12.6}\n  on each pipeline's largest model,\n    uncached and unbatched, it would be  ${:>12.6}  (saved {share:.1}%)\n",
        total.jobs,
        total.cost,
        total.cache,
        total.routing,
        total.flex,
        total.batch,
        total.baseline(),
    ));
    out.push_str(&format!(
        "{replays} replay(s) and {unreadable} line(s) that are not results (dead letters, other) not counted\n"
    ));
    out
}

fn table(out: &mut String, what: &str, rows: impl Iterator<Item = (String, Sums)>) {
    out.push_str(&format!(
        "{what:<28} {:>7} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}\n",
        "jobs", "spent $", "cache $", "routing $", "flex $", "batch $", "baseline $"
    ));
    for (name, s) in rows {
        out.push_str(&format!(
            "{name:<28} {:>7} {:>12.6} {:>12.6} {:>12.6} {:>12.6} {:>12.6} {:>12.6}\n",
            s.jobs,
            s.cost,
            s.cache,
            s.routing,
            s.flex,
            s.batch,
            s.baseline()
        ));
    }
    out.push('\n');
}

/// The most expensive model (input plus output price) a pipeline's steps may call.
fn largest_model<'a>(
    plan: &'a Plan,
    pipeline: &switchyard::config::PipelinePlan,
) -> Option<&'a ModelPlan> {
    switchyard::pipeline::pipeline_aliases(pipeline)
        .into_iter()
        .filter_map(|alias| plan.models.get(alias).map(AsRef::as_ref))
        .max_by(|a, b| weight(&a.price).total_cmp(&weight(&b.price)))
}

fn weight(price: &Price) -> f64 {
    price.input + price.output
}

/// What a step's call saved: (by the response cache, by running on its model rather than the
/// pipeline's largest, by the flex tier, by the batch API). Priced from the config; a model
/// the config no longer names saves nothing by routing, flex or batch.
fn savings(plan: &Plan, step: &StepRecord, largest: Option<&ModelPlan>) -> (f64, f64, f64, f64) {
    let cache = step.cache_hit.map_or(0.0, |h| h.saved_usd);
    let (input, output) = match step.cache_hit {
        Some(hit) => (hit.input_tokens, hit.output_tokens),
        None => (step.input_tokens, step.output_tokens),
    };
    let own = plan.models.values().find(|m| {
        Some(m.model.as_str()) == step.model.as_deref()
            && Some(m.provider.as_str()) == step.provider.as_deref()
    });
    let routing = match (own, largest) {
        (Some(own), Some(largest)) => {
            (largest.price.cost(input, output) - own.price.cost(input, output)).max(0.0)
        }
        _ => 0.0,
    };
    // What the tier saved against the standard price of the same tokens.
    let tier = |name: &str| match own {
        Some(own) if step.service_tier.as_deref() == Some(name) => {
            (own.price.cost(input, output) - step.cost_usd).max(0.0)
        }
        _ => 0.0,
    };
    (cache, routing, tier("flex"), tier("batch"))
}

/// Reads `path` (`-`: standard input) and prints the report.
pub fn run(config: &Path, path: &Path, since: Option<DateTime<Utc>>) -> anyhow::Result<()> {
    let plan = super::load(config)?;
    let lines = super::lines(path)?;
    print!("{}", report(&plan, lines, since));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
source: {kind: kafka, brokers: "localhost:9092"}
providers:
  llm: {kind: mock}
models:
  small: {provider: llm, model: gpt-4o-mini, price: {input: 1.0, output: 2.0}}
  large: {provider: llm, model: gpt-4o, price: {input: 10.0, output: 20.0}}
prompts:
  plain: {user: "{{input.text}}"}
pipelines:
  support:
    steps:
      - {name: answer, kind: generate, model: small, prompt: plain}
      - {name: check, kind: generate, model: large, prompt: plain}
"#;

    fn result(job: &str, status: &str, steps: serde_json::Value, cost: f64) -> String {
        serde_json::json!({
            "job_id": job, "tenant": "acme", "pipeline": "support", "status": status,
            "output": "x", "route": {"category": null, "confidence": null, "model": null, "variant": null},
            "steps": steps, "usage": {"input_tokens": 0, "output_tokens": 0, "cost_usd": cost},
            "duplicate": false, "metadata": null, "received_at": "2026-11-30T10:00:00Z",
            "completed_at": "2026-11-30T10:00:01Z", "latency_ms": 1000
        })
        .to_string()
    }

    fn step(input: u64, output: u64, cost: f64, hit: Option<(u64, u64, f64)>) -> serde_json::Value {
        let mut s = serde_json::json!({
            "name": "answer", "kind": "generate", "provider": "llm", "model": "gpt-4o-mini",
            "attempts": 1, "cached": hit.is_some(), "latency_ms": 1, "input_tokens": input,
            "output_tokens": output, "cost_usd": cost
        });
        if let Some((i, o, saved)) = hit {
            s["cache_hit"] =
                serde_json::json!({"input_tokens": i, "output_tokens": o, "saved_usd": saved});
        }
        s
    }

    #[test]
    fn savings_are_priced_against_the_pipelines_largest_model_and_each_job_counts_once() {
        let plan = switchyard::config::load_str(CONFIG, "t.yaml", Vec::new()).unwrap();
        // 1M input + 1M output tokens on small: $3 spent, $30 on large: $27 saved by routing.
        let routed = step(1_000_000, 1_000_000, 3.0, None);
        // A cache hit of the same size: $3 saved by the cache, $27 by routing.
        let cached = step(0, 0, 0.0, Some((1_000_000, 1_000_000, 3.0)));
        let lines = vec![
            // A review request and its decided result: one job, at the larger spend.
            result("j1", "review", serde_json::json!([routed.clone()]), 3.0),
            result("j1", "ok", serde_json::json!([routed]), 3.0),
            result("j2", "ok", serde_json::json!([cached]), 0.0),
            r#"{"reason": "invalid_job"}"#.to_owned(),
        ];
        let table = report(&plan, lines.into_iter(), None);
        let dollars = |label: &str| -> f64 {
            let line = table
                .lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap();
            line.split('$')
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(table.contains("savings over 2 job(s)"), "{table}");
        assert!((dollars("spent") - 3.0).abs() < 1e-6, "{table}");
        assert!(
            (dollars("saved by the response cache") - 3.0).abs() < 1e-6,
            "{table}"
        );
        assert!((dollars("saved by routing") - 54.0).abs() < 1e-6, "{table}");
        assert!(table.contains("1 line(s) that are not results"), "{table}");
    }
}
