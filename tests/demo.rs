//! `switchyard demo` (the README's first command) runs the whole product in one process and
//! accounts for every message it published.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;

#[test]
fn the_demo_accounts_for_every_message_and_exits_zero() {
    let n = 300;
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("outputs.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--jobs", &n.to_string(), "--json", "--outputs"])
        .arg(&saved)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    let workload = switchyard::testkit::workload(n, 65_536);
    let invalid = workload.iter().filter(|i| i.valid_id.is_none()).count() as u64;
    let duplicates = workload.iter().filter(|i| i.duplicate).count() as u64;
    let valid = n as u64 - invalid - duplicates;
    assert_eq!(summary["jobs"], n);
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["double_processed"], 0);
    assert_eq!(summary["dead_letters"]["invalid_job"], invalid);
    assert_eq!(summary["duplicates"], duplicates);
    let results = &summary["results"];
    let finished: u64 = ["ok", "degraded", "review"]
        .iter()
        .map(|k| results[k].as_u64().unwrap())
        .sum();
    assert_eq!(
        finished, valid,
        "every valid job has exactly one non-duplicate result"
    );
    for key in ["throughput_jobs_per_s", "latency_ms", "tokens", "cost_usd"] {
        assert!(summary.get(key).is_some(), "summary has {key}");
    }
    assert!(summary["latency_ms"]["p50"].as_u64().unwrap() > 0);

    // Counted here, from the outputs themselves, not from the demo's own tally: every valid
    // job has exactly one original result, every invalid payload one dead letter, every
    // duplicate one replay, and nothing else reached the output topics.
    let outputs: Vec<Value> = std::fs::read_to_string(&saved)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outputs.len(), n, "one output per published message");
    let mut originals: std::collections::HashMap<&str, usize> = Default::default();
    let (mut dead, mut replays) = (0u64, 0u64);
    for output in &outputs {
        if output["duplicate"] == true {
            replays += 1;
        } else if output.get("reason").is_some() {
            dead += 1;
            assert_eq!(output["reason"], "invalid_job", "{output}");
        } else {
            *originals
                .entry(output["job_id"].as_str().unwrap())
                .or_default() += 1;
        }
    }
    assert_eq!(dead, invalid);
    assert_eq!(replays, duplicates);
    for item in &workload {
        if let (Some(id), false) = (&item.valid_id, item.duplicate) {
            assert_eq!(
                originals.get(id.as_str()),
                Some(&1),
                "job {id}: exactly one original result"
            );
        }
    }
    assert_eq!(
        originals.len() as u64,
        valid,
        "no result for a job never published"
    );

    // `switchyard cost` over the same outputs: every valid job counted once, and routing the
    // simple tickets to the small model saved money against the pipeline's largest.
    let cost = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["cost", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.yaml"))
        .arg(&saved)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&cost.stdout);
    assert!(
        cost.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&cost.stderr)
    );
    assert!(
        table.contains(&format!("savings over {valid} job(s)")),
        "{table}"
    );
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
    assert!(dollars("saved by routing") > 0.0, "{table}");
    let spent = summary["cost_usd"].as_f64().unwrap();
    assert!(
        (dollars("spent") - spent).abs() < 1e-6,
        "the report's spend is the demo's: {spent}\n{table}"
    );
}
