//! API keys never appear in logs, errors or outputs, even at debug level and with provider
//! failures; the per-call log records carry the job, tenant, pipeline and step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard::config::Faults;
use switchyard::testkit::publish;

use common::*;

const SECRET: &str = "sk-test-SECRETVALUE-3f9a1c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_sent_but_never_logged_or_echoed() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm_with(
        1,
        Faults {
            rate_500: 0.3,
            ..Faults::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The failures are there to put provider errors in the logs; the breaker stays closed, as
    // an open one (a run of failures early on) would only make the jobs wait past the test.
    let config = format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", group: "secrets-{g:x}", topic: {JOBS_TOPIC}}}
http: {{listen: "off"}}
log: {{format: json, filter: "debug,librdkafka=warn,rdkafka=warn"}}
providers:
  llm: {{kind: openai, base_url: "http://{llm}/v1", api_key_env: SY_TEST_API_KEY,
        retry: {{max_attempts: 2, base_delay_ms: 1, max_delay_ms: 5}},
        circuit: {{consecutive_failures: 1000, failure_rate: 1.0}}}}
models:
  small: {{provider: llm, model: gpt-4o-mini, price: {{input: 0.15, output: 0.6}}}}
prompts:
  p: {{user: "{{{{input.text}}}}"}}
pipelines:
  support:
    steps:
      - {{name: answer, kind: generate, model: small, prompt: p}}
"#,
        g = rand::random::<u64>(),
        llm = llm.addr(),
    );
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, config).unwrap();
    let log_path = dir.path().join("log.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(&path)
        .env("SY_TEST_API_KEY", SECRET)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let outputs = collector(&brokers);
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..20).map(|i| job(&format!("s-{i}"), "acme", &format!("hello PROMPTTEXT{i}"))),
    )
    .await
    .unwrap();
    outputs.wait_for(20, Duration::from_secs(30), |_| {}).await;
    let exit = terminate(&mut child);
    assert_eq!(exit.code(), Some(0), "SIGTERM is a clean exit");

    assert_eq!(outputs.len(), 20);
    let requests = llm.stats().requests();
    assert_eq!(
        llm.stats()
            .authorized
            .load(std::sync::atomic::Ordering::Relaxed),
        requests,
        "every request carried the key"
    );
    assert!(
        llm.stats()
            .server_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "error paths were exercised"
    );
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !logs.contains("SECRETVALUE"),
        "the API key leaked into the logs"
    );
    assert!(
        !logs.contains("PROMPTTEXT"),
        "prompt text is logged only with log.payloads: true (even at debug)"
    );
    for (_, raw) in outputs.snapshot() {
        assert!(
            !raw.to_string().contains("SECRETVALUE"),
            "the API key leaked into an output"
        );
    }
    let calls: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "provider call")
        .collect();
    assert_eq!(
        calls.len() as u64,
        requests,
        "one record per provider call ({} found) in:\n{}",
        calls.len(),
        logs.lines()
            .filter(|l| l.contains("provider"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for call in &calls {
        for field in [
            "provider",
            "model",
            "attempt",
            "outcome",
            "latency_ms",
            "input_tokens",
            "output_tokens",
            "cost_usd",
        ] {
            assert!(
                call.get(field).is_some(),
                "provider call record lacks {field}: {call}"
            );
        }
        let spans = call["spans"].as_array().expect("span list");
        let job = spans.iter().find(|s| s["name"] == "job").expect("job span");
        assert!(
            job["job_id"].is_string() && job["tenant"] == "acme" && job["pipeline"] == "support",
            "{call}"
        );
        assert!(
            spans
                .iter()
                .any(|s| s["name"] == "step" && s["step"] == "answer"),
            "{call}"
        );
    }
    assert!(calls.iter().any(|c| c["outcome"] == "server_error"));
    let outcomes = logs
        .lines()
        .filter(|l| {
            l.contains("\"message\":\"job finished\"")
                || l.contains("\"message\":\"job dead-lettered\"")
        })
        .count();
    assert_eq!(outcomes, 20, "one record per job outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_key_is_not_sent_on_to_another_host_by_a_redirect() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    // "Elsewhere": counts requests that arrive carrying the key.
    let leaked = Arc::new(AtomicU64::new(0));
    let seen = leaked.clone();
    let elsewhere = axum::Router::new().route(
        "/v1/messages",
        post(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                if headers.contains_key("x-api-key") {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                StatusCode::OK
            }
        }),
    );
    let other_port = serve(elsewhere).await.port();
    // The configured endpoint redirects every call to another host name.
    let redirector = axum::Router::new().route(
        "/v1/messages",
        post(move || async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(
                    "location",
                    format!("http://localhost:{other_port}/v1/messages"),
                )],
            )
        }),
    );
    let addr = serve(redirector).await;

    std::env::set_var("SY_TEST_REDIRECT_KEY", SECRET);
    let config = format!(
        r#"
source: {{kind: kafka, brokers: "127.0.0.1:9", topic: t}}
providers:
  llm: {{kind: anthropic, base_url: "http://{addr}", api_key_env: SY_TEST_REDIRECT_KEY}}
models:
  small: {{provider: llm, model: claude-haiku}}
prompts:
  p: {{user: "{{{{input.text}}}}"}}
pipelines:
  support:
    steps:
      - {{name: answer, kind: generate, model: small, prompt: p}}
"#
    );
    let plan = switchyard::config::load_str(&config, "test", Vec::new()).unwrap();
    let providers = switchyard::provider::Providers::start(&plan).await.unwrap();
    let request = switchyard::provider::ChatRequest {
        model: "claude-haiku".into(),
        system: None,
        user: "hello".into(),
        max_tokens: 16,
        temperature: 0.0,
        prompt: None,
        flex: false,
    };
    let answer = providers
        .target("llm")
        .unwrap()
        .client
        .chat(&request, Duration::from_secs(5))
        .await;
    assert!(answer.is_err(), "a cross-host redirect is not followed");
    assert_eq!(
        leaked.load(Ordering::Relaxed),
        0,
        "the key never reached the other host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_readable_logs_to_a_file_have_no_colour_codes_and_no_forged_lines() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set(
            "log",
            "{format: pretty, payloads: true, filter: \"debug,librdkafka=warn,rdkafka=warn\"}",
        )
        .write(dir.path(), "c.yaml");
    let log_path = dir.path().join("log.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let outputs = collector(&brokers);
    let forged = "2000-01-01T00:00:00.000000Z  INFO switchyard: forged";
    let payload = serde_json::json!({
        "id": format!("evil\n{forged}\r\n\u{1b}[2J"), "tenant": "acme",
        "input": {"text": "hello PROMPTTEXT, card 4111 1111 1111 1111, mail jane.doe@example.com"}
    })
    .to_string()
    .into_bytes();
    publish(&brokers, JOBS_TOPIC, [payload]).await.unwrap();
    outputs.wait_for(1, Duration::from_secs(30), |_| {}).await;
    assert_eq!(terminate(&mut child).code(), Some(0));
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("job finished") || logs.contains("job dead-lettered"),
        "{logs}"
    );
    assert!(
        logs.contains("PROMPTTEXT"),
        "with log.payloads: true the prompt text is logged: {logs}"
    );
    // Raw PII never reaches the log, whatever the level and even with payloads on.
    for pii in ["4111 1111 1111 1111", "jane.doe@example.com"] {
        assert!(!logs.contains(pii), "`{pii}` logged: {logs}");
    }
    assert!(
        logs.contains("[CARD]") && logs.contains("[EMAIL]"),
        "{logs}"
    );
    assert!(
        !logs.contains('\u{1b}'),
        "no ANSI escape in a file: {logs:?}"
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("2000-01-01")),
        "a job id cannot start a log line of its own: {logs}"
    );
}
