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
    let mut tail = Command::new(bin)
        .args(["tail", "--json", "--count", "13", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Publish once tail says it is subscribed (NATS core subscriptions see new messages only).
    let stderr = tail.stderr.take().unwrap();
    let (subscribed, listening) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut subscribed = Some(subscribed);
        // Read to the end: a closed pipe would fail tail's later writes to stderr.
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("listening on ") {
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), listening)
        .await
        .expect("tail subscribed within 30 s")
        .expect("tail exited before subscribing");

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

/// Runs `command` to its end, or fails the test after `within` (killing it) instead of hanging.
async fn run_within(mut command: Command, within: Duration) -> std::process::Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    match tokio::time::timeout(
        within,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    {
        Ok(output) => output.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("{command:?} did not finish within {within:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_publish_generates_sample_jobs_and_tail_filters_by_kind() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .write(dir.path(), "service.yaml");
    let plan = switchyard::config::load(&path).unwrap();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;

    let bin = env!("CARGO_BIN_EXE_switchyard");
    let mut publish = Command::new(bin);
    publish
        .args(["publish", "--generate", "60", "--config"])
        .arg(&path);
    let out = run_within(publish, Duration::from_secs(60)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "publish failed: {stdout}");
    assert!(stdout.contains("published 60 of 60 jobs"), "{stdout}");
    // Counted independently of the CLI: what reached the output topics.
    assert_eq!(
        outputs.wait_for(60, Duration::from_secs(30), |_| {}).await,
        60
    );
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let dead = all
        .iter()
        .filter(|(c, _)| matches!(c, switchyard::testkit::Collected::DeadLetter(_)))
        .count();
    assert!(dead > 0, "the generated sample includes invalid jobs");

    let mut tail = Command::new(bin);
    tail.args([
        "tail",
        "--from-beginning",
        "--only",
        "dlq",
        "--json",
        "--count",
    ])
    .arg(dead.to_string())
    .arg("--config")
    .arg(&path);
    let out = run_within(tail, Duration::from_secs(60)).await;
    assert!(out.status.success());
    let printed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), dead);
    assert!(
        printed.iter().all(|v| v.get("reason").is_some()),
        "--only dlq prints dead letters only: {printed:?}"
    );
}
