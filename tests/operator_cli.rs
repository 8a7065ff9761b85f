//! `switchyard publish` and `switchyard tail` against a running service (NATS and Redis), through
//! the same config file the service uses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard::state::StateStore;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_jobs_that_tail_then_prints() {
    let names = NatsNames::new();
    let llm = mock_llm(2).await;
    let text = nats_config(&names, &llm.addr().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("service.yaml");
    std::fs::write(&path, &text).unwrap();
    let plan = switchyard::config::load(&path).unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;

    let bin = env!("CARGO_BIN_EXE_switchyard");
    let tail = Command::new(bin)
        .args(["tail", "--json", "--count", "13", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;

    let jobs = dir.path().join("jobs.jsonl");
    let mut lines: Vec<String> = (0..12)
        .map(|i| String::from_utf8(job(&format!("cli-{i}"), "acme", "hello there")).unwrap())
        .collect();
    lines.push("this line is not a job".into());
    std::fs::write(&jobs, lines.join("\n")).unwrap();
    let out = Command::new(bin)
        .args(["publish", "--rate", "200", "--file"])
        .arg(&jobs)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "publish failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("published 13 of 13 jobs"), "{stdout}");

    // A missed output must fail the test, not hang it.
    let tail_pid = tail.id();
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || tail.wait_with_output()),
    )
    .await;
    let Ok(output) = waited else {
        let _ = Command::new("kill").arg(tail_pid.to_string()).status();
        panic!("tail did not print all 13 outputs within 60 s");
    };
    let output = output.unwrap().unwrap();
    let printed: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), 13);
    assert_eq!(printed.iter().filter(|v| v["status"] == "ok").count(), 12);
    let dead: Vec<_> = printed
        .iter()
        .filter(|v| v["reason"] == "invalid_job")
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["payload"], "this line is not a job");
    service.stop().await;
    names.delete_streams().await;
}
