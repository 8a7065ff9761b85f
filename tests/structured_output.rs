//! A step's `output_schema` is enforced: fenced JSON with trailing commas is accepted, an answer
//! that violates the schema is repaired by asking again with the validation error, and one that
//! stays invalid becomes an `output_invalid` dead letter carrying the last error.
//! The provider here is a scripted OpenAI-compatible server, so each answer is known.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use switchyard::config;
use switchyard::testkit::{publish, Collected};
use switchyard::wire::DeadLetterReason;

use common::*;

const STALL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Script {
    calls: AtomicU64,
    repairs: AtomicU64,
}

/// Answers like the OpenAI API. A first answer misses the required `sentiment` (and comes
/// fenced, with a trailing comma); a repair request gets a valid answer unless the ticket says
/// "stubborn".
async fn chat(State(script): State<Arc<Script>>, Json(body): Json<Value>) -> Json<Value> {
    script.calls.fetch_add(1, Ordering::Relaxed);
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let repair = prompt.contains("Your previous answer was");
    if repair {
        script.repairs.fetch_add(1, Ordering::Relaxed);
    }
    let content = if repair && !prompt.contains("stubborn") {
        r#"{"answer": "Refund issued", "sentiment": "neg"}"#.to_owned()
    } else {
        "```json\n{\"answer\": \"Refund issued\",}\n```".to_owned()
    };
    Json(json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_answers_are_repaired_or_dead_lettered_with_the_validation_error() {
    let script = Arc::new(Script::default());
    let llm = serve(
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(script.clone()),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("answer.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["answer", "sentiment"],
            "properties": {"answer": {"type": "string"}, "sentiment": {"enum": ["pos", "neg", "neutral"]}},
            "additionalProperties": false}"#,
    )
    .unwrap();
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let plan = TestConfig::kafka(&brokers)
        .llm(llm)
        .set(
            "models",
            "small: {provider: llm, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}}",
        )
        .set(
            "prompts",
            "answer: {user: \"Reply as JSON with answer and sentiment.\\n{{input.text}}\"}",
        )
        .set(
            "pipelines",
            format!(
                "support:\n    steps:\n      - {{name: answer, kind: generate, model: small, prompt: answer, output_schema: \"{}\", max_repairs: 2}}",
                schema.display()
            ),
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    publish(
        &brokers,
        JOBS_TOPIC,
        [
            job("ok-1", "acme", "I was charged twice"),
            job("stubborn-1", "acme", "stubborn customer"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let mut seen = 0;
    for (c, _) in &all {
        match c {
            Collected::Result(r) => {
                assert_eq!(r.job_id, "ok-1");
                assert_eq!(
                    r.output,
                    json!({"answer": "Refund issued", "sentiment": "neg"})
                );
                assert_eq!(r.steps[0].attempts, 2, "one call and one repair");
                assert_eq!(r.usage.input_tokens, 40, "both calls are accounted");
                seen += 1;
            }
            Collected::DeadLetter(dl) => {
                assert_eq!(dl.job_id.as_deref(), Some("stubborn-1"));
                assert_eq!(dl.reason, DeadLetterReason::OutputInvalid);
                assert!(
                    dl.error.contains("after 2 repair attempt(s)")
                        && dl.error.contains("sentiment"),
                    "{}",
                    dl.error
                );
                seen += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, 2);
    // ok-1: 1 call + 1 repair; stubborn-1: 1 call + 2 repairs.
    assert_eq!(script.calls.load(Ordering::Relaxed), 5);
    assert_eq!(script.repairs.load(Ordering::Relaxed), 3);
}

#[test]
fn a_missing_or_broken_output_schema_fails_at_start_up_naming_the_field() {
    let text = r#"
source: {kind: kafka, brokers: "localhost:9092", group: g, topic: t}
providers: {llm: {kind: mock}}
models: {small: {provider: llm, model: m}}
prompts: {p: {user: "hi"}}
pipelines:
  support:
    steps:
      - {name: answer, kind: generate, model: small, prompt: p, output_schema: /nonexistent/schema.json}
"#;
    let problem = |text: &str| {
        config::load_str(text, "test", std::iter::empty())
            .unwrap_err()
            .to_string()
    };
    let e = problem(text);
    assert!(
        e.contains("pipelines.support.steps[0].output_schema") && e.contains("cannot read"),
        "{e}"
    );
    // A file that is there but is not JSON, and one that is JSON but not a JSON Schema.
    let dir = tempfile::tempdir().unwrap();
    for (name, content, why) in [
        (
            "truncated.json",
            "{\"type\": \"object\", \"properties\": {",
            "is not JSON",
        ),
        ("wrong.json", "{\"type\": 12}", "is not a valid JSON Schema"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let e = problem(&text.replace("/nonexistent/schema.json", path.to_str().unwrap()));
        assert!(
            e.contains("pipelines.support.steps[0].output_schema") && e.contains(why),
            "{name}: {e}"
        );
    }
}
