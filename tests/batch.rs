//! Provider batch APIs for jobs that can wait, through NATS JetStream and Redis: 1,000
//! low-priority jobs are parked, sent through the mock's OpenAI batch API (files + batches) and
//! answered at the batch price; a replica is replaced while the batches run and 5% of the batch
//! requests fail (called directly instead): nothing is lost, nothing answered twice, jobs that
//! cannot wait are not batched. Anthropic's Message Batches answer a two-call pipeline in two
//! rounds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use switchyard::config::{Latency, MockBatch, MockSettings};
use switchyard::provider::mock::MockServer;
use switchyard::state::StateStore;
use switchyard::testkit::{publish_nats, Collected, OutputCollector};

use common::*;

const STALL: Duration = Duration::from_secs(90);

async fn batch_mock(completion_ms: u64, failure_rate: f64) -> MockServer {
    let settings = MockSettings {
        latency: Latency::Fixed { ms: 0 },
        seed: Some(3),
        batch: MockBatch {
            completion_ms,
            failure_rate,
        },
        ..MockSettings::default()
    };
    MockServer::start("127.0.0.1:0", settings).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_low_priority_jobs_go_through_batches_across_a_replica_restart() {
    let names = NatsNames::new();
    let llm = batch_mock(3_000, 0.05).await;
    let config = TestConfig::nats(&names)
        .llm(llm.addr())
        .set(
            "limits",
            "{max_inflight_jobs: 512, max_job_bytes: 4096, drain_timeout_ms: 5000}",
        )
        .set(
            "models",
            "small: {provider: llm, model: gpt-4o-mini, price: {input: 1.0, output: 2.0}}",
        )
        .set("prompts", "plain: {user: \"Summarise: {{input.text}}\"}")
        .set(
            "pipelines",
            "digest:\n    steps:\n      - {name: answer, kind: generate, model: small, prompt: plain}\n    \
             batch: {collect_ms: 300, poll_ms: 300, max_requests: 400}",
        );
    let plan = config.plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let first = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    first.wait_ready().await;
    let (low, normal) = (1_000, 20);
    let job = |id: String, priority: &str| {
        let job = json!({"id": id, "tenant": "acme", "priority": priority,
                         "input": {"text": format!("Report {id}: sales were flat.")}});
        (names.job_subject("acme"), job.to_string().into_bytes())
    };
    publish_nats(
        &nats_url(),
        (0..low)
            .map(|i| job(format!("b-{i}"), "low"))
            .chain((0..normal).map(|i| job(format!("n-{i}"), "normal"))),
    )
    .await
    .unwrap();
    // Every low-priority job parked and its request sent, then the replica goes while the
    // batches are still running.
    let submitted = || {
        first
            .metrics
            .batch_requests
            .with_label_values(&["submitted"])
            .get()
    };
    eventually(STALL, "every batch request is submitted", || {
        submitted() >= low as u64
    })
    .await;
    assert_eq!(
        collector.snapshot().len(),
        normal,
        "only the jobs that cannot wait are answered before the batches end"
    );
    first.stop().await;
    let second = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    second.wait_ready().await;
    assert_eq!(
        collector.wait_for(low + normal, STALL, |_| {}).await,
        low + normal
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = collector.snapshot();
    let failed = second
        .metrics
        .batch_requests
        .with_label_values(&["failed"])
        .get();
    second.stop().await;
    collector.stop().await;
    names.delete_streams().await;

    assert_schema_valid(&all);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let (mut batched, mut direct) = (0, 0);
    for (c, _) in &all {
        let Collected::Result(r) = c else {
            panic!("no dead letters: {c:?}")
        };
        assert!(!r.duplicate);
        *seen.entry(r.job_id.clone()).or_default() += 1;
        let step = step_of(r, "answer");
        let standard = (step.input_tokens as f64 * 1.0 + step.output_tokens as f64 * 2.0) / 1e6;
        match step.service_tier.as_deref() {
            Some("batch") => {
                assert!(r.job_id.starts_with("b-"), "{} is not batched", r.job_id);
                assert!(
                    (step.cost_usd - standard / 2.0).abs() < 1e-12,
                    "batch price: {step:#?}"
                );
                batched += 1;
            }
            None => {
                assert!((step.cost_usd - standard).abs() < 1e-12, "{step:#?}");
                direct += 1;
            }
            other => panic!("unexpected tier {other:?}"),
        }
    }
    assert_eq!(seen.len(), low + normal, "0 lost");
    assert!(seen.values().all(|n| *n == 1), "0 answered twice");
    assert!(failed > 0, "some batch requests failed");
    assert_eq!(batched + direct, low + normal);
    assert_eq!(
        direct as u64,
        normal as u64 + failed,
        "the failed batch requests, and only they (and the normal jobs), were called directly"
    );

    // `switchyard cost` over the results prices what the batch saved.
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("results.jsonl");
    let lines: Vec<String> = all.iter().map(|(_, raw)| raw.to_string()).collect();
    std::fs::write(&saved, lines.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["cost", "--config"])
        .arg(config.write(dir.path(), "batch.yaml"))
        .arg(&saved)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = table
        .lines()
        .find(|l| l.trim_start().starts_with("saved by batch APIs"))
        .unwrap();
    let saved_usd: f64 = line.split('$').nth(1).unwrap().trim().parse().unwrap();
    assert!(saved_usd > 0.0, "{table}");
}

/// Classify, route and answer over Anthropic's Message Batches (Kafka in and out): each job
/// needs two batch rounds (its classification, then its answer), both at the batch price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_call_pipeline_takes_two_anthropic_batch_rounds() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = batch_mock(500, 0.0).await;
    let plan = TestConfig::kafka(&brokers)
        .set(
            "providers",
            format!("llm: {{kind: anthropic, base_url: \"http://{}\"}}", llm.addr()),
        )
        .set(
            "pipelines",
            "support:
    steps:
      - {name: classify, kind: classify, model: small, prompt: triage, categories: [billing, technical, account]}
      - {name: route, kind: route, on: classify, routes: {technical: large, default: small}}
      - {name: answer, kind: generate, model: \"{{route.model}}\", prompt: answer}
    batch: {collect_ms: 200, poll_ms: 200}",
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    let n = 30;
    let jobs = (0..n).map(|i| {
        json!({"id": format!("a-{i}"), "tenant": "acme", "priority": "low",
               "input": {"text": format!("My invoice {i} was charged twice")}})
        .to_string()
        .into_bytes()
    });
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, jobs)
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    let all = outputs.snapshot();
    let parked = service
        .metrics
        .batch_jobs
        .with_label_values(&["parked"])
        .get();
    service.stop().await;
    assert_schema_valid(&all);
    assert_eq!(parked, 2 * n as u64, "each job parked for two rounds");
    for i in 0..n {
        let r = result_of(&all, &format!("a-{i}"));
        assert_eq!(r.status.as_str(), "ok");
        for step in ["classify", "answer"] {
            let s = step_of(r, step);
            assert_eq!(s.service_tier.as_deref(), Some("batch"), "{step}: {s:#?}");
            assert!(s.cost_usd > 0.0);
        }
    }
}

/// A duplicate of a job that waits for its batch waits too, then replays the job's result:
/// one answer, one replay, one batch request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_a_parked_job_replays_its_result_once_the_batch_answers() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = batch_mock(1_500, 0.0).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "digest:\n    steps:\n      - {name: answer, kind: generate, model: small, prompt: plain}\n    \
             batch: {collect_ms: 200, poll_ms: 200}",
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    let job = json!({"id": "d-1", "tenant": "acme", "priority": "low", "input": {"text": "Summarise Q3"}})
        .to_string()
        .into_bytes();
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, [job.clone()])
        .await
        .unwrap();
    eventually(STALL, "the job is parked", || {
        service
            .metrics
            .batch_jobs
            .with_label_values(&["parked"])
            .get()
            == 1
    })
    .await;
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, [job])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    let all = outputs.snapshot();
    let submitted = service
        .metrics
        .batch_requests
        .with_label_values(&["submitted"])
        .get();
    service.stop().await;
    let results: Vec<_> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(results.len(), 2, "{all:#?}");
    assert_eq!(
        results.iter().filter(|r| r.duplicate).count(),
        1,
        "one replay"
    );
    assert_eq!(results[0].output, results[1].output);
    assert_eq!(
        submitted, 1,
        "one batch request for the job and its duplicate"
    );
}

/// Parked jobs are bounded by their model's batch queue: with `max_queued: 1`, a job that could
/// wait runs at once while the queue holds a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_queue_runs_jobs_at_once_instead_of_parking_them() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = batch_mock(500, 0.0).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "digest:\n    steps:\n      - {name: answer, kind: generate, model: small, prompt: plain}\n    \
             batch: {collect_ms: 10000, poll_ms: 200, max_queued: 1}",
        )
        .plan();
    // The queue holds q-0's request for collect_ms: long enough that q-1..q-3 are consumed and
    // checked while it is still full, even on a loaded machine (3 s was not always).
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    let job = |id: &str| {
        json!({"id": id, "tenant": "acme", "priority": "low", "input": {"text": format!("Summarise {id}")}})
            .to_string()
            .into_bytes()
    };
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, [job("q-0")])
        .await
        .unwrap();
    eventually(STALL, "the first job is parked", || {
        service
            .metrics
            .batch_jobs
            .with_label_values(&["parked"])
            .get()
            == 1
    })
    .await;
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, (1..4).map(|i| job(&format!("q-{i}"))))
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(4, STALL, |_| {}).await, 4);
    let all = outputs.snapshot();
    service.stop().await;
    let tier = |id: &str| step_of(result_of(&all, id), "answer").service_tier.clone();
    assert_eq!(tier("q-0").as_deref(), Some("batch"));
    for i in 1..4 {
        assert_eq!(tier(&format!("q-{i}")), None, "q-{i} ran at once");
    }
}
