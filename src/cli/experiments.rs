//! `switchyard experiments report`: per-variant figures from results as `tail --json` prints
//! them (one JSON result per line): jobs, share, latency, cost, and how many went to review or
//! were degraded. Lines that are not results with a variant are counted apart, not guessed at.

use std::collections::BTreeMap;

use serde_json::Value;

/// What one variant's results add up to.
#[derive(Debug, Default)]
struct Figures {
    latencies: Vec<u64>,
    cost: f64,
    review: u64,
    degraded: u64,
}

/// The report for `lines` of JSON results, as a table.
pub fn report(lines: impl Iterator<Item = String>) -> String {
    let mut by_variant: BTreeMap<(String, String), Figures> = BTreeMap::new();
    let (mut without, mut unreadable) = (0u64, 0u64);
    for line in lines {
        let Ok(result) = serde_json::from_str::<Value>(&line) else {
            if !line.trim().is_empty() {
                unreadable += 1;
            }
            continue;
        };
        // A replay of a finished job is the same job again, not another sample.
        if result.get("duplicate").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let text = |pointer: &str| result.pointer(pointer).and_then(Value::as_str);
        let Some(variant) = text("/route/variant") else {
            without += 1;
            continue;
        };
        let pipeline = text("/pipeline").unwrap_or("-").to_owned();
        let figures = by_variant
            .entry((pipeline, variant.to_owned()))
            .or_default();
        figures.latencies.push(
            result
                .get("latency_ms")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        );
        figures.cost += result
            .pointer("/usage/cost_usd")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        match text("/status") {
            Some("review") => figures.review += 1,
            Some("degraded") => figures.degraded += 1,
            _ => {}
        }
    }
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    for ((pipeline, _), f) in &by_variant {
        *totals.entry(pipeline.clone()).or_default() += f.latencies.len();
    }
    let mut out = format!(
        "{:<16} {:<14} {:>7} {:>7} {:>9} {:>9} {:>12} {:>7} {:>9}\n",
        "pipeline",
        "variant",
        "jobs",
        "share",
        "p50 ms",
        "p95 ms",
        "cost/job $",
        "review",
        "degraded"
    );
    for ((pipeline, variant), f) in &mut by_variant {
        let n = f.latencies.len();
        let total = totals.get(pipeline).copied().unwrap_or(n).max(1);
        f.latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((n as f64 - 1.0) * q).round() as usize;
            f.latencies.get(i).copied().unwrap_or(0)
        };
        let percent = |k: u64| 100.0 * k as f64 / n.max(1) as f64;
        out.push_str(&format!(
            "{pipeline:<16} {variant:<14} {n:>7} {:>6.1}% {:>9} {:>9} {:>12.6} {:>6.1}% {:>8.1}%\n",
            100.0 * n as f64 / total as f64,
            at(0.5),
            at(0.95),
            f.cost / n.max(1) as f64,
            percent(f.review),
            percent(f.degraded),
        ));
    }
    out.push_str(&format!(
        "{without} result(s) without a variant (no experiment, or outside its rollout); {unreadable} line(s) not JSON\n"
    ));
    out
}

/// Reads `path` (`-`: standard input) and prints the report.
pub fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let lines = super::lines(path)?;
    print!("{}", report(lines));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_per_variant() {
        let line = |variant: Option<&str>, status: &str, latency: u64, cost: f64| {
            serde_json::json!({
                "pipeline": "support", "status": status, "latency_ms": latency,
                "route": {"variant": variant}, "usage": {"cost_usd": cost}
            })
            .to_string()
        };
        let lines = vec![
            line(Some("control"), "ok", 100, 0.001),
            line(Some("control"), "ok", 300, 0.001),
            line(Some("control"), "review", 200, 0.001),
            line(Some("v2"), "degraded", 50, 0.004),
            line(None, "ok", 10, 0.0),
            "not json".to_owned(),
        ];
        let table = report(lines.into_iter());
        let control = table.lines().find(|l| l.contains("control")).unwrap();
        assert!(
            control.contains(" 3 ") && control.contains("75.0%"),
            "{table}"
        );
        assert!(
            control.contains("200") && control.contains("33.3%"),
            "{table}"
        );
        let v2 = table.lines().find(|l| l.contains("v2")).unwrap();
        assert!(
            v2.contains("25.0%") && v2.contains("0.004000") && v2.contains("100.0%"),
            "{table}"
        );
        assert!(
            table.contains("1 result(s) without a variant") && table.contains("1 line(s) not JSON"),
            "{table}"
        );
    }
}
