//! `switchyard bench --json` reports throughput, CPU per job and round trips against the bare
//! loop, latency and overhead percentiles, and that nothing was lost, on both shapes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;

/// Runs `switchyard bench` with `args` and returns its JSON report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Both sides measured, nothing lost or answered twice, the workload's invalid jobs dead-lettered.
fn assert_complete_report(report: &Value, jobs: u64) {
    assert_eq!(report["mode"], "drain");
    assert_eq!(report["jobs"], jobs);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    // Every 100th job of the workload is not valid JSON.
    assert_eq!(report["dead_letters"], jobs / 100, "{report}");
    for side in ["switchyard", "bare_loop"] {
        for key in ["jobs_per_s", "cpu_ms_per_job"] {
            assert!(
                report[side][key].as_f64().unwrap() > 0.0,
                "{side}.{key} in {report}"
            );
        }
        for key in ["p50", "p90", "p99", "max"] {
            assert!(
                report[side]["latency_ms"][key].as_f64().unwrap()
                    >= report[side]["overhead_ms"][key].as_f64().unwrap()
            );
        }
        // Two 20 ms provider calls per job: end-to-end latency includes at least that.
        assert!(
            report[side]["latency_ms"]["p50"].as_f64().unwrap() >= 40.0,
            "{side} in {report}"
        );
    }
    for key in ["throughput", "cpu_per_job"] {
        assert!(
            report["ratio"][key].as_f64().unwrap() > 0.0,
            "{key} in {report}"
        );
    }
}

#[test]
fn bench_json_reports_throughput_and_cpu_against_the_bare_loop() {
    let report = bench(&[
        "--jobs",
        "300",
        "--provider-latency-ms",
        "20",
        "--inflight",
        "64",
    ]);
    assert_eq!(report["shape"], "kafka");
    assert_complete_report(&report, 300);
}

#[test]
fn bench_on_nats_and_redis_counts_round_trips_and_plots_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("bench.svg");
    let report = bench(&[
        "--shape",
        "nats",
        "--jobs",
        "300",
        "--provider-latency-ms",
        "20",
        "--inflight",
        "64",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert_eq!(report["shape"], "nats");
    assert_complete_report(&report, 300);
    // The bare loop's one SET NX per delivery (duplicates included), and at least a claim per
    // job for switchyard; both pull, publish and ack through NATS.
    let bare = report["bare_loop"]["redis_round_trips_per_job"]
        .as_f64()
        .unwrap();
    assert!((0.9..=1.1).contains(&bare), "{report}");
    for side in ["switchyard", "bare_loop"] {
        for key in ["redis_round_trips_per_job", "redis_commands_per_job"] {
            assert!(
                report[side][key].as_f64().unwrap() >= 0.9,
                "{side}.{key} in {report}"
            );
        }
        assert!(
            report[side]["broker_messages_per_job"].as_f64().unwrap() >= 2.0,
            "{side} in {report}"
        );
    }
    assert!(
        !report["redis_commands"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    // Two curves (switchyard and the bare loop) in each of the two panels.
    assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
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
