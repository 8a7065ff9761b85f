//! Raw config -> [`Plan`]: every section checked and every reference resolved, one file per
//! group of sections. Problems are collected, not returned at the first, so one run lists
//! everything to fix, each naming its field.

mod io;
mod pipelines;
mod providers;
mod registry;
mod service;
mod steps;
mod tenants;

use std::collections::BTreeMap;

use super::plan::*;
use super::raw::{self, RawConfig};

/// Collects problems instead of stopping at the first, so one run shows everything to fix;
/// warnings are things that work but deserve a look.
#[derive(Default)]
pub(super) struct Problems(Vec<String>, Vec<String>);

impl Problems {
    pub(super) fn warn(&mut self, field: impl AsRef<str>, message: impl AsRef<str>) {
        self.1
            .push(format!("{}: {}", field.as_ref(), message.as_ref()));
    }

    pub(super) fn add(&mut self, field: impl AsRef<str>, message: impl AsRef<str>) {
        self.0
            .push(format!("{}: {}", field.as_ref(), message.as_ref()));
    }
}

/// `name@version` -> content hash of every versioned prompt of `raw` (inline and registry
/// files), and where the lock goes; for `switchyard prompts lock`.
pub(super) fn prompt_hashes(
    raw: &RawConfig,
) -> Result<(std::path::PathBuf, BTreeMap<String, String>), Vec<String>> {
    let mut p = Problems::default();
    let Some(config) = &raw.prompt_registry else {
        return Err(vec![
            "prompt_registry: not set; name a `dir` and/or a `lock` file".into(),
        ]);
    };
    // The old lock is not read: it is what is being replaced.
    let registry = registry::read(&mut p, config, false);
    let mut prompts = raw.prompts.clone();
    registry::merge(&mut p, &registry, &mut prompts);
    let Some(lock) = registry.lock_path.clone() else {
        return Err(vec!["prompt_registry: name a `dir` or a `lock` file".into()]);
    };
    if !p.0.is_empty() {
        return Err(p.0);
    }
    let hashes = prompts
        .iter()
        .filter(|(k, _)| k.contains('@'))
        .map(|(k, v)| (k.clone(), registry::content_hash(v)))
        .collect();
    Ok((lock, hashes))
}

pub(super) fn validate(raw: RawConfig) -> Result<Plan, Vec<String>> {
    let mut p = Problems::default();
    let p = &mut p;
    let source = io::source_plan(p, raw.source);
    let sink = io::sink_plan(p, raw.sink, &source);
    io::outputs_apart_from_jobs(p, &source, &sink);
    let state = io::state_section(p, raw.state);
    let limits = service::limits_plan(p, raw.limits);
    let providers = providers::providers_plan(p, raw.providers);
    let models = providers::models_plan(p, raw.models, &providers);
    let mut raw_prompts = raw.prompts;
    let registry = raw
        .prompt_registry
        .as_ref()
        .map(|r| registry::read(p, r, true))
        .unwrap_or_default();
    registry::merge(p, &registry, &mut raw_prompts);
    registry::check_lock(p, &registry, &raw_prompts);
    let mut prompts = pipelines::prompts_plan(p, raw_prompts);
    registry::add_labels(p, &registry, &mut prompts);
    let pipelines = pipelines::pipelines_plan(p, raw.pipelines, &models, &prompts);
    let default_pipeline = pipelines::default_pipeline(p, raw.default_pipeline, &pipelines);
    let pools = service::pools_plan(p, raw.pools);
    let http_listen = io::http_listen(p, &raw.http.listen);
    let log = service::log_plan(p, raw.log);
    let tenants = tenants::tenants_plan(p, raw.tenants);
    if let SourcePlan::Kafka(k) = &source {
        let limited =
            tenants.default.rps.is_some() || tenants.named.values().any(|t| t.rps.is_some());
        if limited && k.delay_topic.is_none() {
            p.warn(
                "source.delay_topic",
                "not set: on Kafka, jobs held back by their tenant's rps limit wait in the process and hold in-flight slots (other tenants' jobs queue behind them once limits.max_inflight_jobs is reached); name a delay topic (create it like the jobs topic) to park them there until their turn",
            );
        }
    }
    let cache = service::cache_plan(p, raw.cache);
    let reviews = io::reviews_plan(p, raw.reviews, &source, &sink, &pipelines);
    for (name, pipeline) in &pipelines {
        if pipeline.can_review() && pipeline.review.timeout > state.result_ttl {
            p.add(
                format!("pipelines.{name}.review.timeout_s"),
                format!(
                    "{} s is longer than state.result_ttl_s ({} s): a review must be settled while its job's outcome is remembered; raise state.result_ttl_s or shorten the timeout",
                    pipeline.review.timeout.as_secs(),
                    state.result_ttl.as_secs()
                ),
            );
        }
    }
    if !p.0.is_empty() {
        return Err(std::mem::take(&mut p.0));
    }
    Ok(Plan {
        tenants,
        cache,
        source,
        sink,
        state,
        limits,
        providers,
        models,
        pipelines,
        default_pipeline,
        pools,
        http_listen,
        log,
        reviews,
        warnings: std::mem::take(&mut p.1),
    })
}

pub(super) fn properties(
    p: &mut Problems,
    field: &str,
    raw: BTreeMap<String, serde_norway::Value>,
) -> Vec<(String, String)> {
    raw.into_iter()
        .filter_map(|(key, value)| {
            let text = match value {
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                _ => {
                    p.add(
                        format!("{field}.{key}"),
                        "librdkafka properties must be strings, numbers or booleans",
                    );
                    return None;
                }
            };
            Some((key, text))
        })
        .collect()
}

pub(super) fn rate_limits(p: &mut Problems, field: &str, raw: &raw::RawRateLimits) -> RateLimits {
    for (name, value) in [("rpm", raw.rpm), ("tpm", raw.tpm)] {
        rate(p, &format!("{field}.{name}"), value);
    }
    RateLimits {
        rpm: raw.rpm,
        tpm: raw.tpm,
    }
}

/// A rate or budget must be a positive, finite number when set.
pub(super) fn rate(p: &mut Problems, field: &str, value: Option<f64>) {
    if let Some(v) = value {
        if !(v.is_finite() && v > 0.0) {
            p.add(field, format!("{v} must be a positive number"));
        }
    }
}

pub(super) fn non_empty(p: &mut Problems, field: impl AsRef<str>, value: &str) {
    if value.trim().is_empty() {
        p.add(field, "must not be empty");
    }
}

pub(super) fn positive(p: &mut Problems, field: impl AsRef<str>, value: u64) {
    if value == 0 {
        p.add(field, "must be greater than 0");
    }
}

pub(super) fn keys<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
