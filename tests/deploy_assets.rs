//! The Helm chart's dashboard and alert rules only use metric names switchyard exports, and the
//! switchyard config in the chart's values (and every config snippet in docs/) loads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use switchyard::telemetry::metrics::Metrics;

/// Every series name switchyard exposes (each vector touched once so it is exported).
fn exported() -> BTreeSet<String> {
    let m = Metrics::new().unwrap();
    m.jobs_received.with_label_values(&["kafka"]).inc();
    m.jobs_finished.with_label_values(&["p", "ok"]).inc();
    m.job_duration.with_label_values(&["p"]).observe(1.0);
    m.queue_wait.observe(1.0);
    m.step_duration.with_label_values(&["s"]).observe(1.0);
    m.llm_attempt(&m.llm_series("p", "m"), ["p", "m", "triage@v1", "ok"], 1.0);
    m.llm_usage("p", "m", 1, 1, 1.0);
    m.dead_letters.with_label_values(&["internal"]).inc();
    m.pool_permits.with_label_values(&["generate"]).set(1);
    m.consumer_lag.with_label_values(&["kafka"]).set(1);
    m.circuit_state.with_label_values(&["p", "m"]).set(0);
    m.ratelimit_throttled
        .with_label_values(&["tenant_requests"])
        .inc();
    m.budget_remaining.with_label_values(&["t", "day"]).set(1.0);
    m.budget_limit.with_label_values(&["t", "day"]).set(1.0);
    m.cache_requests.with_label_values(&["hit"]).inc();
    m.tenant_tokens.with_label_values(&["t", "input"]).inc();
    m.tenant_cost.with_label_values(&["t"]).inc_by(1.0);
    // Sample names, and family names (a histogram's, without _bucket/_sum/_count) from # TYPE.
    m.encode()
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next().map(str::to_owned),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next().map(str::to_owned),
        })
        .collect()
}

fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("switchyard_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/switchyard/files");
    let rules = std::fs::read_to_string(root.join("alerts.yaml")).unwrap();
    let _: serde_norway::Value = serde_norway::from_str(&rules).expect("rules are YAML");
    let dashboard = std::fs::read_to_string(root.join("dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut checked = 0;
    for name in referenced(&rules).into_iter().chain(referenced(&dashboard)) {
        assert!(
            exported.contains(&name),
            "{name} is not exported; exported: {exported:?}"
        );
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn the_config_in_the_chart_values_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/switchyard/values.yaml");
    let values: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let config = serde_norway::to_string(&values["config"]).unwrap();
    let plan = switchyard::config::load_str(&config, "helm values .config", Vec::new());
    assert!(
        plan.is_ok(),
        "{}",
        plan.err().map(|e| e.to_string()).unwrap_or_default()
    );
}

#[test]
fn every_config_snippet_in_the_docs_loads_and_every_command_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut configs = 0;
    let mut commands = 0;
    let files = tempfile::tempdir().unwrap();
    for doc in ["docs/operations.md", "README.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```") {
            let after = &rest[start + 3..];
            let (lang, body_start) = after.split_once('\n').unwrap();
            let end = body_start.find("```").unwrap();
            let body = &body_start[..end];
            rest = &body_start[end + 3..];
            if lang.trim() == "yaml" && body.starts_with("# switchyard config") {
                let body = &with_secrets_in_place(body, &files);
                let plan = switchyard::config::load_str(body, doc, Vec::new());
                assert!(
                    plan.is_ok(),
                    "{doc}: {}",
                    plan.err().map(|e| e.to_string()).unwrap_or_default()
                );
                configs += 1;
            }
            if lang.trim() == "sh" {
                for line in body
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with("switchyard "))
                {
                    check_command(line);
                    commands += 1;
                }
            }
        }
    }
    assert!(
        configs >= 1 && commands >= 5,
        "{configs} configs, {commands} commands checked"
    );
}

/// A documented config as the deployment would have it: every variable its `*_env` fields
/// name is set, and every file under `/etc/switchyard/` exists (under `files` instead).
fn with_secrets_in_place(body: &str, files: &tempfile::TempDir) -> String {
    let env = regex::Regex::new(r"_env: *\{?[^A-Z]*([A-Z][A-Z0-9_]+)").unwrap();
    for found in env.captures_iter(body) {
        std::env::set_var(&found[1], "set-by-the-deployment");
    }
    let paths = regex::Regex::new(r#"/etc/switchyard/[^"\s]+"#).unwrap();
    let mut out = body.to_owned();
    for found in paths.find_iter(body) {
        let local = files.path().join(found.as_str().trim_start_matches('/'));
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, "").unwrap();
        out = out.replace(found.as_str(), &local.display().to_string());
    }
    out
}

/// The subcommand and every `--flag` of a documented command line are ones the binary accepts.
fn check_command(line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let sub = words[1];
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([sub, "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "`{line}`: unknown subcommand {sub}");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in words.iter().filter(|w| w.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(help.contains(flag), "`{line}`: {sub} has no flag {flag}");
    }
}
