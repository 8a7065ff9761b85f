//! `tenants`: the default plan and each named tenant's rates, budgets, weight and queue bound.

use std::collections::BTreeMap;

use super::{rate, Problems};
use crate::config::plan::*;
use crate::config::raw::{self};

pub(super) fn tenants_plan(
    p: &mut Problems,
    entries: BTreeMap<String, serde_norway::Value>,
) -> TenantsPlan {
    let mut unknown = UnknownTenants::Default;
    let mut raw: BTreeMap<String, raw::RawTenant> = BTreeMap::new();
    for (name, value) in entries {
        if name == "unknown" {
            match value.as_str() {
                Some("default") => unknown = UnknownTenants::Default,
                Some("reject") => unknown = UnknownTenants::Reject,
                _ => p.add(
                    "tenants.unknown",
                    "must be `default` (tenants not named here get the default plan) or `reject` (their jobs are dead-lettered as unknown_tenant); `unknown` is reserved and cannot name a tenant",
                ),
            }
            continue;
        }
        match serde_path_to_error::deserialize::<_, raw::RawTenant>(value) {
            Ok(t) => {
                raw.insert(name, t);
            }
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." {
                    format!("tenants.{name}")
                } else {
                    format!("tenants.{name}.{path}")
                };
                p.add(field, e.into_inner().to_string());
            }
        }
    }
    let base = raw.remove("default").unwrap_or_default();
    let mut plan_of = |name: &str, t: &raw::RawTenant| {
        let field = format!("tenants.{name}");
        let merged = TenantPlan {
            rps: t.rps.or(base.rps),
            tokens_per_min: t.tokens_per_min.or(base.tokens_per_min),
            budget_usd_per_day: t.budget_usd_per_day.or(base.budget_usd_per_day),
            budget_usd_per_month: t.budget_usd_per_month.or(base.budget_usd_per_month),
            weight: t.weight.or(base.weight).unwrap_or(1),
            max_queued: t.max_queued.or(base.max_queued),
            per_user: {
                let (own, base) = (
                    t.per_user.unwrap_or_default(),
                    base.per_user.unwrap_or_default(),
                );
                PerUserLimits {
                    rps: own.rps.or(base.rps),
                    tokens_per_min: own.tokens_per_min.or(base.tokens_per_min),
                }
            },
        };
        if let Some(u) = &t.per_user {
            rate(p, &format!("{field}.per_user.rps"), u.rps);
            rate(
                p,
                &format!("{field}.per_user.tokens_per_min"),
                u.tokens_per_min,
            );
        }
        for (key, value) in [
            ("rps", t.rps),
            ("tokens_per_min", t.tokens_per_min),
            ("budget_usd_per_day", t.budget_usd_per_day),
            ("budget_usd_per_month", t.budget_usd_per_month),
        ] {
            rate(p, &format!("{field}.{key}"), value);
        }
        if t.weight == Some(0) {
            p.add(format!("{field}.weight"), "must be at least 1");
        }
        if t.max_queued == Some(0) {
            p.add(format!("{field}.max_queued"), "must be at least 1");
        }
        merged
    };
    let default = plan_of("default", &base.clone());
    let mut named = BTreeMap::new();
    let mut bad_names = Vec::new();
    for (name, t) in &raw {
        if crate::wire::TenantId::parse(name).is_err() {
            bad_names.push(name.clone());
        }
        named.insert(name.clone(), plan_of(name, t));
    }
    for name in bad_names {
        p.add(
            format!("tenants.{name}"),
            "not a valid tenant name (letters, digits, `_` and `-`, starting with a letter or digit)",
        );
    }
    TenantsPlan {
        default,
        named,
        unknown,
    }
}
