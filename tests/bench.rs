//! `switchyard bench --json` against the embedded deployment reports throughput against the
//! bare-loop baseline, latency and overhead percentiles, and that nothing was lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_json_reports_throughput_against_the_baseline_and_overhead() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "bench",
            "--jobs",
            "300",
            "--provider-latency-ms",
            "20",
            "--inflight",
            "64",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["mode"], "drain");
    assert_eq!(report["jobs"], 300);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    for key in [
        "throughput_jobs_per_s",
        "baseline_jobs_per_s",
        "ratio_vs_baseline",
        "process_cpu_ms_per_job",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    for key in ["p50", "p90", "p99", "max"] {
        assert!(
            report["latency_ms"][key].as_f64().unwrap()
                >= report["overhead_ms"][key].as_f64().unwrap()
        );
    }
    // Two 20 ms provider calls per job: end-to-end latency includes at least that.
    assert!(
        report["latency_ms"]["p50"].as_f64().unwrap() >= 40.0,
        "{report}"
    );
}

#[test]
fn bench_backlog_reports_memory_growth_against_a_tenth_of_the_backlog() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "bench",
            "--mode",
            "backlog",
            "--jobs",
            "3000",
            "--provider-latency-ms",
            "500",
            "--inflight",
            "64",
            "--duration-s",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["mode"], "backlog");
    assert_eq!(report["full"]["backlog"], 3000);
    assert_eq!(report["baseline"]["backlog"], 300);
    for run in ["baseline", "full"] {
        assert!(
            report[run]["rss_peak_mb"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert!(
            report[run]["finished_in_window"].as_u64().unwrap() > 0,
            "{report}"
        );
    }
    // Ten times the backlog must not mean anywhere near ten times the memory: the in-flight
    // bound, not the backlog, sets it. (Memory, not time: this does not depend on the
    // machine's speed.)
    let ratio = report["growth_ratio_vs_baseline"].as_f64().unwrap();
    assert!(
        ratio < 2.0,
        "RSS growth with 3,000 jobs waiting is {ratio:.2}x that with 300: {report}"
    );
}
