//! The Anthropic Messages provider against the mock's `/v1/messages`: jobs complete through
//! injected 429s (with `retry-after`) and 529 `overloaded_error`s, an OpenAI-compatible model
//! falls back to an Anthropic one across providers, and the mock answers like the real API
//! (required `anthropic-version`, error shape, prompt-cache usage).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use switchyard::config::Faults;
use switchyard::testkit::{publish, Collected};
use switchyard::wire::ResultStatus;

use common::*;

const STALL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_complete_on_anthropic_through_rate_limits_and_overloads() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm_with(
        1,
        Faults {
            rate_429: 0.15,
            retry_after_s: 1,
            rate_500: 0.05,
            rate_hang: 0.0,
        },
    )
    .await;
    let providers = format!(
        "claude: {{kind: anthropic, base_url: \"http://{}\", retry: {{max_attempts: 8, base_delay_ms: 5, max_delay_ms: 50}}}}",
        llm.addr()
    );
    let models = "small: {provider: claude, model: claude-3-5-haiku-latest, price: {input: 0.8, output: 4}, timeout_ms: 5000}\n  \
                  large: {provider: claude, model: claude-sonnet-4-5, price: {input: 3, output: 15}, timeout_ms: 5000}";
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &[]), memory());
    let n = 60;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("a-{i}"), "acme", "my invoice is wrong")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    for (c, _) in &all {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            panic!("every job completes, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Ok);
        assert!(r.usage.input_tokens > 0 && r.usage.output_tokens > 0 && r.usage.cost_usd > 0.0);
        assert!(r.steps.iter().filter(|s| s.provider.is_some()).all(|s| s
            .model
            .as_deref()
            .unwrap_or_default()
            .starts_with("claude")));
    }
    let stats = llm.stats();
    let limited = stats
        .rate_limited
        .load(std::sync::atomic::Ordering::Relaxed);
    let overloaded = stats
        .server_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        limited > 0 && overloaded > 0,
        "faults were injected ({limited} 429s, {overloaded} 529s)"
    );
    assert_eq!(
        stats.ok(),
        2 * n as u64,
        "exactly one successful call per step"
    );
    assert_eq!(
        stats
            .bad_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "every request was well-formed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_model_falls_back_to_an_anthropic_one() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let broken = mock_llm_with(
        1,
        Faults {
            rate_500: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let claude = mock_llm(1).await;
    let providers = format!(
        "openai: {{kind: openai, base_url: \"http://{}/v1\", retry: {{max_attempts: 1}}}}\n  \
         claude: {{kind: anthropic, base_url: \"http://{}\"}}",
        broken.addr(),
        claude.addr()
    );
    let models = "small: {provider: openai, model: gpt-4o-mini, fallbacks: [haiku]}\n  \
                  large: {provider: openai, model: gpt-4o, fallbacks: [haiku]}\n  \
                  haiku: {provider: claude, model: claude-3-5-haiku-latest}";
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &[]), memory());
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..5).map(|i| job(&format!("fb-{i}"), "acme", "hello")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(5, STALL, |_| {}).await, 5);
    service.stop().await;
    for (c, _) in &outputs.snapshot() {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            panic!("expected a degraded result, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Degraded);
        assert!(r
            .steps
            .iter()
            .filter(|s| s.provider.is_some())
            .all(|s| s.provider.as_deref() == Some("claude")));
    }
    assert_eq!(claude.stats().ok(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_messages_api_answers_like_anthropic() {
    let llm = mock_llm(1).await;
    let url = format!("http://{}/v1/messages", llm.addr());
    let http = reqwest::Client::new();
    let system = "You follow the support policy below.\n".repeat(200);
    let body = json!({
        "model": "claude-3-5-haiku-latest", "max_tokens": 50,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Where is my refund?"}]
    });
    let missing_version = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(missing_version.status(), 400);
    let error: Value = missing_version.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    let call = || async {
        let response = http
            .post(&url)
            .header("anthropic-version", "2023-06-01")
            .header("x-api-key", "sk-ant-test")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()
    };
    let first = call().await;
    assert_eq!(first["type"], "message");
    assert_eq!(first["content"][0]["type"], "text");
    assert!(
        first["usage"]["cache_creation_input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(first["usage"]["cache_read_input_tokens"], 0);
    let second = call().await;
    assert_eq!(second["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(
        second["usage"]["cache_read_input_tokens"], first["usage"]["cache_creation_input_tokens"],
        "the cached system prompt is read back"
    );

    let limited = http
        .post(&url)
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-fault", "429")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    let error: Value = limited.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
}
