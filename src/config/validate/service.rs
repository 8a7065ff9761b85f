//! `limits`, `pools`, `log` and `cache`: how the service itself runs.

use std::time::Duration;

use super::{positive, Problems};
use crate::config::plan::*;
use crate::config::raw::{self};

pub(super) fn limits_plan(p: &mut Problems, l: raw::RawLimits) -> Limits {
    positive(p, "limits.max_inflight_jobs", l.max_inflight_jobs as u64);
    positive(p, "limits.max_job_bytes", l.max_job_bytes as u64);
    positive(p, "limits.max_response_bytes", l.max_response_bytes as u64);
    positive(p, "limits.max_running_jobs", l.max_running_jobs as u64);
    if !(l.resume_below > 0.0 && l.resume_below <= 1.0) {
        p.add(
            "limits.resume_below",
            "must be a share above 0 and at most 1",
        );
    }
    Limits {
        max_inflight_jobs: l.max_inflight_jobs,
        max_running_jobs: l.max_running_jobs,
        resume_at: ((l.max_inflight_jobs as f64 * l.resume_below) as usize).max(1),
        park_after: Duration::from_millis(l.park_after_ms),
        max_job_bytes: l.max_job_bytes,
        max_response_bytes: l.max_response_bytes,
        drain_timeout: Duration::from_millis(l.drain_timeout_ms),
    }
}

pub(super) fn pools_plan(p: &mut Problems, raw: raw::RawPools) -> PoolSizes {
    let pools = PoolSizes {
        classify: raw.classify,
        route: raw.route,
        generate: raw.generate,
    };
    for (field, size) in [
        ("classify", pools.classify),
        ("route", pools.route),
        ("generate", pools.generate),
    ] {
        positive(p, format!("pools.{field}"), size as u64);
    }
    pools
}

pub(super) fn log_plan(p: &mut Problems, raw: raw::RawLog) -> LogPlan {
    let json = match raw.format.as_str() {
        "json" => true,
        "pretty" => false,
        other => {
            p.add("log.format", format!("`{other}` is not `pretty` or `json`"));
            false
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.filter) {
        p.add(
            "log.filter",
            format!("`{}` is not a tracing filter: {e}", raw.filter),
        );
    }
    LogPlan {
        json,
        filter: raw.filter,
        payloads: raw.payloads,
    }
}

pub(super) fn cache_plan(p: &mut Problems, raw: raw::RawCache) -> Option<CachePlan> {
    raw.enabled.then(|| {
        positive(p, "cache.ttl_s", raw.ttl_s);
        if !(0.0..=2.0).contains(&raw.max_temperature) {
            p.add("cache.max_temperature", "must be between 0 and 2");
        }
        let global = match raw.scope.as_str() {
            "tenant" => false,
            "global" => true,
            other => {
                p.add(
                    "cache.scope",
                    format!("`{other}` is not `tenant` (answers shared within a tenant) or `global` (shared across tenants)"),
                );
                false
            }
        };
        CachePlan {
            ttl: Duration::from_secs(raw.ttl_s),
            max_temperature: raw.max_temperature,
            global,
        }
    })
}
