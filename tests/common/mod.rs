//! Shared test harness: an in-process Kafka cluster (librdkafka's mock cluster, the real Kafka
//! protocol), a mock LLM server owned by the test (so provider calls can be counted across
//! service restarts), schema validators, and the service running in the background.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchyard::config::{self, Faults, Latency, MockSettings, Plan, Topics};
use switchyard::provider::mock::MockServer;
use switchyard::state::{MemoryStore, StateStore};
use switchyard::telemetry::health::Health;
use switchyard::telemetry::metrics::Metrics;
use switchyard::telemetry::Telemetry;
use switchyard::testkit::{Collected, EmbeddedKafka, OutputCollector};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod builder;
pub use self::builder::*;

pub const JOBS_TOPIC: &str = "switchyard.jobs";

pub fn topics() -> Topics {
    Topics {
        results: "switchyard.results".into(),
        review: "switchyard.review".into(),
        dlq: "switchyard.dlq".into(),
    }
}

/// A service config pointed at `brokers` and an external (test-owned) mock LLM at `llm`, with
/// the default retry policy.
pub fn plan(brokers: &str, llm: &str, extra_env: &[(&str, &str)]) -> Plan {
    TestConfig::kafka(brokers).llm(llm).plan_env(extra_env)
}

/// A service config with the given `providers:` and `models:` entries (YAML, one per line,
/// indented by two spaces after the first); models `small` and `large` must exist.
pub fn plan_with(brokers: &str, providers: &str, models: &str, extra_env: &[(&str, &str)]) -> Plan {
    TestConfig::kafka(brokers)
        .set("providers", providers)
        .set("models", models)
        .plan_env(extra_env)
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Names private to one test run: subjects, streams and Redis keys never collide.
pub struct NatsNames {
    pub prefix: String,
    pub jobs_stream: String,
    pub outputs_stream: String,
}

impl NatsNames {
    pub fn new() -> Self {
        let id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        Self {
            prefix: format!("it{id}"),
            jobs_stream: format!("SYJ_{id}"),
            outputs_stream: format!("SYO_{id}"),
        }
    }

    /// Where decisions for `tenant`'s reviews are published.
    pub fn decision_subject(&self, tenant: &str) -> String {
        format!("{}.decisions.{tenant}", self.prefix)
    }

    pub fn job_subject(&self, tenant: &str) -> String {
        format!("{}.jobs.{tenant}", self.prefix)
    }

    pub fn topics(&self) -> Topics {
        Topics {
            results: format!("{}.results", self.prefix),
            review: format!("{}.review", self.prefix),
            dlq: format!("{}.dlq", self.prefix),
        }
    }
}

impl NatsNames {
    /// Removes the test's streams (best effort).
    pub async fn delete_streams(&self) {
        let Ok(client) = async_nats::connect(nats_url()).await else {
            return;
        };
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(&self.jobs_stream).await;
        let _ = js.delete_stream(&self.outputs_stream).await;
        let _ = js
            .delete_stream(format!("{}_DECISIONS", self.jobs_stream))
            .await;
    }
}

/// Non-duplicate outputs (results and dead letters) per job id.
pub fn originals(outputs: &[(Collected, Value)]) -> std::collections::HashMap<String, usize> {
    let mut per_job = std::collections::HashMap::new();
    for (c, _) in outputs {
        let id = match c {
            Collected::Result(r) | Collected::Review(r) if !r.duplicate => r.job_id.clone(),
            Collected::DeadLetter(d) if !d.duplicate => d.job_id.clone().unwrap_or_default(),
            _ => continue,
        };
        *per_job.entry(id).or_default() += 1;
    }
    per_job
}

/// Every output conforms to its schema, and each of `total` jobs has exactly one original output:
/// nothing lost, nothing answered twice.
pub fn assert_each_job_once(outputs: &[(Collected, Value)], total: usize) {
    assert_schema_valid(outputs);
    let per_job = originals(outputs);
    assert_eq!(per_job.len(), total, "no job lost");
    assert!(per_job.values().all(|&c| c == 1), "no job answered twice");
}

/// Every output is a result or a review request: `why` no job may have been dead-lettered.
pub fn assert_no_dead_letters(outputs: &[(Collected, Value)], why: &str) {
    let dead: Vec<_> = outputs
        .iter()
        .filter(|(c, _)| !matches!(c, Collected::Result(_) | Collected::Review(_)))
        .collect();
    assert!(dead.is_empty(), "{why}: {dead:?}");
}

/// NATS JetStream in, NATS out, Redis state, a test-owned mock LLM at `llm` (default retry
/// policy): the config text.
pub fn nats_config(names: &NatsNames, llm: &str) -> String {
    TestConfig::nats(names).llm(llm).text()
}

/// [`nats_config`], loaded with `extra_env` overrides.
pub fn nats_plan(names: &NatsNames, llm: &str, extra_env: &[(&str, &str)]) -> Plan {
    let text = nats_config(names, llm);
    let env = extra_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    config::load_str(&text, "test config", env).unwrap()
}

pub async fn mock_llm(latency_ms: u64) -> MockServer {
    mock_llm_with(latency_ms, Faults::default()).await
}

pub async fn mock_llm_with(latency_ms: u64, faults: Faults) -> MockServer {
    let settings = MockSettings {
        latency: Latency::Fixed { ms: latency_ms },
        faults,
        seed: Some(1),
        ..MockSettings::default()
    };
    MockServer::start("127.0.0.1:0", settings).await.unwrap()
}

pub fn kafka() -> EmbeddedKafka {
    EmbeddedKafka::start(JOBS_TOPIC, &topics(), 4).unwrap()
}

pub fn collector(brokers: &str) -> OutputCollector {
    OutputCollector::start(brokers, &topics()).unwrap()
}

/// The service running in the background until `stop`.
pub struct Service {
    pub shutdown: CancellationToken,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    pub fn start(plan: Plan, state: StateStore) -> Self {
        // Through the test harness's capture, so passing tests stay quiet.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let shutdown = CancellationToken::new();
        let telemetry = Telemetry::new().unwrap();
        let (health, metrics) = (telemetry.health.clone(), telemetry.metrics.clone());
        let tracker = TaskTracker::new();
        let run = switchyard::app::run_with(plan, state, telemetry, shutdown.clone());
        let handle = tracker.spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                // In the test's output, so a start-up failure is not just "not ready".
                tracing::error!(error = format!("{e:#}"), "the service exited with an error");
            }
            result
        });
        Self {
            shutdown,
            health,
            metrics,
            handle,
        }
    }

    /// Waits until readiness is reported (source connected, state reachable).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.health.is_ready() {
            assert!(
                !self.handle.is_finished(),
                "the service exited before it was ready (its error is logged above)"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "service not ready within 30s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("service stops within 30s")
            .expect("service task")
            .expect("service exits cleanly");
    }
}

/// Waits until `condition` holds, checking every 20 ms; fails the test with `what` after
/// `within`. Timeouts are generous: a slow machine makes a test wait longer, never fail early.
pub async fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} (waited {within:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves `app` (a scripted provider or any other HTTP stand-in) on a free loopback port, in the
/// background for the rest of the test; returns its address.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    TaskTracker::new().spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Sends SIGTERM to a `switchyard` process and waits for it to exit; fails the test (after
/// killing it) if it has not exited within 30 s. Returns the exit status.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {}", child.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the process did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An in-process state store, for tests that do not need Redis.
pub fn memory() -> StateStore {
    StateStore::from(MemoryStore::new(100_000))
}

pub fn job(id: &str, tenant: &str, text: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "tenant": tenant, "input": {"text": text}})
        .to_string()
        .into_bytes()
}

pub struct Schemas {
    pub job: jsonschema::Validator,
    pub result: jsonschema::Validator,
    pub dead_letter: jsonschema::Validator,
    pub decision: jsonschema::Validator,
}

pub fn schemas() -> Schemas {
    let load = |name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(name);
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    };
    Schemas {
        job: load("job.v1.json"),
        result: load("result.v1.json"),
        dead_letter: load("dead_letter.v1.json"),
        decision: load("decision.v1.json"),
    }
}

/// Panics with the validator's messages unless every output conforms to its schema.
pub fn assert_schema_valid(outputs: &[(Collected, Value)]) {
    let s = schemas();
    for (collected, raw) in outputs {
        let validator = match collected {
            Collected::Result(_) | Collected::Review(_) => &s.result,
            Collected::DeadLetter(_) => &s.dead_letter,
            Collected::Unreadable { topic, error } => {
                panic!("unreadable output on {topic}: {error}")
            }
        };
        let errors: Vec<String> = validator
            .iter_errors(raw)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "output does not match its schema: {errors:?}\n{raw}"
        );
    }
}

/// The result (or review request) of job `id` among `outputs`.
pub fn result_of<'a>(
    outputs: &'a [(Collected, Value)],
    id: &str,
) -> &'a switchyard::wire::JobResult {
    outputs
        .iter()
        .find_map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) if r.job_id == id => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no result for {id}: {outputs:#?}"))
}

/// The dead letter of job `id` among `outputs`.
pub fn dead_letter_of<'a>(
    outputs: &'a [(Collected, Value)],
    id: &str,
) -> &'a switchyard::wire::DeadLetter {
    outputs
        .iter()
        .find_map(|(c, _)| match c {
            Collected::DeadLetter(d) if d.job_id.as_deref() == Some(id) => Some(d),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no dead letter for {id}: {outputs:#?}"))
}

/// The record of step `name` in `result`.
pub fn step_of<'a>(
    result: &'a switchyard::wire::JobResult,
    name: &str,
) -> &'a switchyard::wire::StepRecord {
    result
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step `{name}` in {:#?}", result.steps))
}
