//! `providers` and `models`: every provider's endpoint, retry, circuit and limits; every model
//! alias's provider, price, timeout and fallbacks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::{keys, non_empty, positive, rate_limits, Problems};
use crate::config::plan::*;
use crate::config::raw::{self, RawProvider};

pub(super) fn providers_plan(
    p: &mut Problems,
    raw: BTreeMap<String, RawProvider>,
) -> BTreeMap<String, ProviderPlan> {
    if raw.is_empty() {
        p.add(
            "providers",
            "no provider is defined; add one (e.g. `local: {kind: mock}`)",
        );
    }
    raw.into_iter()
        .map(|(name, provider)| {
            let field = format!("providers.{name}");
            let plan = provider_plan(p, &field, provider);
            (name, plan)
        })
        .collect()
}

/// Checks an HTTP provider's `base_url` and `api_key_env`; the URL without a trailing `/`.
pub(super) fn http_endpoint(
    p: &mut Problems,
    field: &str,
    base_url: &str,
    api_key_env: Option<&str>,
) -> String {
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        p.add(
            format!("{field}.base_url"),
            format!("`{base_url}` is not an http(s) URL"),
        );
    } else if let Err(e) = reqwest::Url::parse(base_url) {
        p.add(
            format!("{field}.base_url"),
            format!(
                "`{}` is not a valid URL: {e}",
                crate::config::redact_url(base_url)
            ),
        );
    }
    if let Some(var) = api_key_env {
        non_empty(p, format!("{field}.api_key_env"), var);
        if let Some(host) = plaintext_remote_host(base_url) {
            p.warn(
                format!("{field}.base_url"),
                format!("the API key would travel unencrypted over http:// to `{host}`; use https:// (plain http is only safe to a loopback address)"),
            );
        }
    }
    base_url.trim_end_matches('/').to_owned()
}

/// The host of an `http://` URL when it is not a loopback address.
fn plaintext_remote_host(base_url: &str) -> Option<String> {
    let rest = base_url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_owned())
}

pub(super) fn provider_plan(p: &mut Problems, field: &str, provider: RawProvider) -> ProviderPlan {
    let (kind, retry, circuit, limits) = match provider {
        RawProvider::Openai {
            base_url,
            api_key_env,
            retry,
            circuit,
            limits,
        } => {
            let base_url = http_endpoint(p, field, &base_url, api_key_env.as_deref());
            (
                ProviderKind::OpenAi {
                    base_url,
                    api_key_env,
                },
                retry,
                circuit,
                limits,
            )
        }
        RawProvider::Anthropic {
            base_url,
            api_key_env,
            cache_system_min_chars,
            retry,
            circuit,
            limits,
        } => {
            let base_url = http_endpoint(p, field, &base_url, api_key_env.as_deref());
            (
                ProviderKind::Anthropic {
                    base_url,
                    api_key_env,
                    cache_system_min_chars,
                },
                retry,
                circuit,
                limits,
            )
        }
        RawProvider::Mock {
            api,
            latency,
            faults,
            seed,
            answers,
            context_windows,
            batch,
            retry,
            circuit,
            limits,
        } => {
            if !(0.0..=1.0).contains(&batch.failure_rate) {
                p.add(
                    format!("{field}.batch.failure_rate"),
                    "a share between 0 and 1",
                );
            }
            for (i, a) in answers.iter().enumerate() {
                if let Err(e) = regex::Regex::new(&a.pattern) {
                    p.add(format!("{field}.answers[{i}].match"), format!("{e}"));
                }
            }
            for (name, rate) in [
                ("rate_429", faults.rate_429),
                ("rate_500", faults.rate_500),
                ("rate_hang", faults.rate_hang),
            ] {
                if !(0.0..=1.0).contains(&rate) {
                    p.add(
                        format!("{field}.faults.{name}"),
                        format!("{rate} is not a probability between 0 and 1"),
                    );
                }
            }
            if faults.rate_429 + faults.rate_500 + faults.rate_hang > 1.0 {
                p.add(
                    format!("{field}.faults"),
                    "the fault rates add up to more than 1",
                );
            }
            match latency {
                Latency::Uniform { min_ms, max_ms } if min_ms > max_ms => {
                    p.add(format!("{field}.latency"), "min_ms is larger than max_ms")
                }
                Latency::Lognormal { p50_ms, p99_ms } if p50_ms == 0 || p99_ms < p50_ms => p.add(
                    format!("{field}.latency"),
                    "lognormal needs 0 < p50_ms <= p99_ms",
                ),
                _ => {}
            }
            (
                ProviderKind::Mock(
                    MockSettings {
                        latency,
                        faults,
                        seed,
                        answers,
                        context_windows,
                        batch,
                    },
                    match api {
                        raw::RawApi::Openai => WireApi::OpenAi,
                        raw::RawApi::Anthropic => WireApi::Anthropic,
                    },
                ),
                retry,
                circuit,
                limits,
            )
        }
    };
    positive(
        p,
        format!("{field}.retry.max_attempts"),
        u64::from(retry.max_attempts),
    );
    positive(
        p,
        format!("{field}.retry.max_elapsed_ms"),
        retry.max_elapsed_ms,
    );
    if !(retry.budget_ratio.is_finite() && retry.budget_ratio >= 0.0) {
        p.add(
            format!("{field}.retry.budget_ratio"),
            "must be 0 or more (retries per first attempt)",
        );
    }
    if !(retry.budget_min_per_s.is_finite() && retry.budget_min_per_s >= 0.0) {
        p.add(
            format!("{field}.retry.budget_min_per_s"),
            "must be 0 or more",
        );
    }
    if retry.base_delay_ms > retry.max_delay_ms {
        p.add(
            format!("{field}.retry"),
            "base_delay_ms is larger than max_delay_ms",
        );
    }
    positive(
        p,
        format!("{field}.circuit.consecutive_failures"),
        u64::from(circuit.consecutive_failures),
    );
    positive(p, format!("{field}.circuit.window"), circuit.window as u64);
    positive(p, format!("{field}.circuit.window_ms"), circuit.window_ms);
    positive(
        p,
        format!("{field}.circuit.half_open_probes"),
        u64::from(circuit.half_open_probes),
    );
    if !(circuit.failure_rate > 0.0 && circuit.failure_rate <= 1.0) {
        p.add(
            format!("{field}.circuit.failure_rate"),
            "must be a share above 0 and at most 1",
        );
    }
    if circuit.min_calls > circuit.window {
        p.add(
            format!("{field}.circuit.min_calls"),
            "cannot exceed circuit.window",
        );
    }
    ProviderPlan {
        kind,
        limits: rate_limits(p, &format!("{field}.limits"), &limits),
        retry: RetryPolicy {
            max_attempts: retry.max_attempts,
            max_elapsed: Duration::from_millis(retry.max_elapsed_ms),
            base_delay: Duration::from_millis(retry.base_delay_ms),
            max_delay: Duration::from_millis(retry.max_delay_ms),
            budget_ratio: retry.budget_ratio,
            budget_min_per_s: retry.budget_min_per_s,
        },
        circuit: CircuitPolicy {
            consecutive_failures: circuit.consecutive_failures,
            failure_rate: circuit.failure_rate,
            window: circuit.window,
            window_for: Duration::from_millis(circuit.window_ms),
            min_calls: circuit.min_calls,
            open_for: Duration::from_millis(circuit.open_ms),
            half_open_probes: circuit.half_open_probes,
        },
    }
}

pub(super) fn models_plan(
    p: &mut Problems,
    raw: BTreeMap<String, raw::RawModel>,
    providers: &BTreeMap<String, ProviderPlan>,
) -> BTreeMap<String, Arc<ModelPlan>> {
    let aliases: BTreeSet<String> = raw.keys().cloned().collect();
    let mut models = BTreeMap::new();
    for (alias, m) in raw {
        let field = format!("models.{alias}");
        if !providers.contains_key(&m.provider) {
            p.add(
                format!("{field}.provider"),
                format!(
                    "provider `{}` is not defined under `providers` (defined: {})",
                    m.provider,
                    keys(providers)
                ),
            );
        }
        non_empty(p, format!("{field}.model"), &m.model);
        positive(p, format!("{field}.timeout_ms"), m.timeout_ms);
        positive(p, format!("{field}.max_tokens"), u64::from(m.max_tokens));
        // Prompt-cache prices default to what each API charges relative to input: Anthropic
        // 0.1x for reads and 1.25x for writes, OpenAI 0.5x for reads (it has no writes).
        let anthropic = matches!(
            providers.get(&m.provider).map(|p| &p.kind),
            Some(ProviderKind::Anthropic { .. } | ProviderKind::Mock(_, WireApi::Anthropic))
        );
        let (read, write) = if anthropic { (0.1, 1.25) } else { (0.5, 1.0) };
        let priced = |price: &raw::RawPrice| Price {
            input: price.input,
            output: price.output,
            cache_read: price.cache_read.unwrap_or(price.input * read),
            cache_write: price.cache_write.unwrap_or(price.input * write),
        };
        let flex = m.flex.as_ref().map(|f| {
            let price = priced(&f.price);
            if anthropic {
                p.add(
                    format!("{field}.flex"),
                    "the flex tier is OpenAI's (`service_tier: flex`); Anthropic has none",
                );
            }
            if ![
                price.input,
                price.output,
                price.cache_read,
                price.cache_write,
            ]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0)
            {
                p.add(
                    format!("{field}.flex.price"),
                    "prices must be finite and not negative (USD per million tokens)",
                );
            }
            positive(p, format!("{field}.flex.timeout_ms"), f.timeout_ms);
            crate::config::FlexTier {
                price,
                timeout: std::time::Duration::from_millis(f.timeout_ms),
            }
        });
        let price = match &m.price {
            Some(price) => priced(price),
            None => {
                p.warn(
                    format!("{field}.price"),
                    "no price set: calls to this model count as $0 in results and metrics",
                );
                Price {
                    input: 0.0,
                    output: 0.0,
                    cache_read: 0.0,
                    cache_write: 0.0,
                }
            }
        };
        if ![
            price.input,
            price.output,
            price.cache_read,
            price.cache_write,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
        {
            p.add(
                format!("{field}.price"),
                "prices must be finite and not negative (USD per million tokens)",
            );
        }
        if let Some(window) = m.context_window {
            if window <= u64::from(m.max_tokens) {
                p.add(
                    format!("{field}.context_window"),
                    format!(
                        "{window} tokens leave no room for a prompt next to max_tokens ({})",
                        m.max_tokens
                    ),
                );
            }
        }
        if !(0.0..=2.0).contains(&m.temperature) {
            p.add(format!("{field}.temperature"), "must be between 0 and 2");
        }
        for (i, fallback) in m.fallbacks.iter().enumerate() {
            if fallback == &alias {
                p.add(
                    format!("{field}.fallbacks[{i}]"),
                    "a model cannot fall back to itself",
                );
            } else if !aliases.contains(fallback) {
                p.add(
                    format!("{field}.fallbacks[{i}]"),
                    format!("model `{fallback}` is not defined under `models`"),
                );
            }
        }
        models.insert(
            alias.clone(),
            Arc::new(ModelPlan {
                flex,
                batch_price: m.batch_price.as_ref().map_or(
                    Price {
                        input: price.input / 2.0,
                        output: price.output / 2.0,
                        cache_read: price.cache_read / 2.0,
                        cache_write: price.cache_write / 2.0,
                    },
                    priced,
                ),
                alias,
                provider: m.provider,
                model: m.model,
                price,
                timeout: Duration::from_millis(m.timeout_ms),
                max_tokens: m.max_tokens,
                temperature: m.temperature,
                fallbacks: m.fallbacks,
                limits: rate_limits(p, &format!("{field}.limits"), &m.limits),
                context_window: m.context_window,
            }),
        );
    }
    models
}
