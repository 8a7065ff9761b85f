//! `switchyard demo` (the README's first command) runs the whole product in one process and
//! accounts for every message it published.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;

#[test]
fn the_demo_accounts_for_every_message_and_exits_zero() {
    let n = 300;
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--jobs", &n.to_string(), "--json"])
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
}
