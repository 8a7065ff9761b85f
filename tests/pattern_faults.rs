//! The failure edges of the pipeline patterns, through the Kafka mock cluster with a test-owned
//! mock provider: a prompt too long for a model's context window moves to a model with a larger
//! one (without a call when the window is declared, after the provider's 400 when it is not) or
//! is cut to fit; a failing step's static `on_failure` answer stands in for it; the output
//! guardrail redacts what the model wrote; a guardrail that cannot check a job fails closed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::config::{MockAnswer, MockSettings};
use switchyard::provider::mock::MockServer;
use switchyard::testkit::{publish, Collected};
use switchyard::wire::ResultStatus;

use common::*;

const STALL: Duration = Duration::from_secs(30);

async fn mock(windows: &[(&str, u64)], answers: &[(&str, &str)]) -> MockServer {
    let settings = MockSettings {
        seed: Some(1),
        context_windows: windows
            .iter()
            .map(|(m, w)| ((*m).to_owned(), *w))
            .collect::<BTreeMap<_, _>>(),
        answers: answers
            .iter()
            .map(|(pattern, answer)| MockAnswer {
                pattern: (*pattern).to_owned(),
                answer: Value::String((*answer).to_owned()),
            })
            .collect(),
        ..MockSettings::default()
    };
    MockServer::start("127.0.0.1:0", settings).await.unwrap()
}

fn job_in(id: &str, pipeline: &str, input: Value) -> Vec<u8> {
    json!({"id": id, "tenant": "acme", "pipeline": pipeline, "input": input})
        .to_string()
        .into_bytes()
}

/// Runs `jobs` through `config` and returns one output per job.
async fn run(config: TestConfig, jobs: Vec<Vec<u8>>) -> Vec<(Collected, Value)> {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let source = TestConfig::kafka(&brokers);
    let plan = config
        .set("source", source.section("source"))
        .set(
            "limits",
            "{max_inflight_jobs: 64, max_job_bytes: 262144, drain_timeout_ms: 5000}",
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    let n = jobs.len();
    publish(&brokers, JOBS_TOPIC, jobs).await.unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    all
}

/// About 1,200 tokens: far more than a 300-token window.
fn long_text() -> String {
    (0..200)
        .map(|i| format!("Line {i} of the ticket. "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_long_for_a_model_moves_to_a_larger_window() {
    let llm = mock(&[("gpt-4o-mini", 300)], &[]).await;
    let config = TestConfig::kafka("brokers set by run()")
        .llm(llm.addr())
        .set(
            "models",
            "declared: {provider: llm, model: gpt-4o-mini, context_window: 300, max_tokens: 64, fallbacks: [large], price: {input: 0.15, output: 0.6}}\n  \
             blind: {provider: llm, model: gpt-4o-mini, max_tokens: 64, fallbacks: [large], price: {input: 0.15, output: 0.6}}\n  \
             large: {provider: llm, model: gpt-4o, context_window: 128000, max_tokens: 64, price: {input: 2.5, output: 10}}",
        )
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "declared:\n    steps:\n      - {name: answer, kind: generate, model: declared, prompt: plain}\n  \
             blind:\n    steps:\n      - {name: answer, kind: generate, model: blind, prompt: plain}",
        );
    let outputs = run(
        config,
        vec![
            job_in("d1", "declared", json!({"text": long_text()})),
            job_in("b1", "blind", json!({"text": long_text()})),
            job_in("s1", "declared", json!({"text": "short"})),
        ],
    )
    .await;
    for id in ["d1", "b1"] {
        let r = result_of(&outputs, id);
        assert_eq!(
            r.status,
            ResultStatus::Degraded,
            "{id}: a fallback answered"
        );
        assert_eq!(
            step_of(r, "answer").model.as_deref(),
            Some("gpt-4o"),
            "{id}"
        );
    }
    assert_eq!(result_of(&outputs, "s1").status, ResultStatus::Ok);
    let stats = llm.stats();
    // The declared window spared the doomed call; the undeclared one cost one refused request.
    assert_eq!(stats.bad_requests.load(Ordering::Relaxed), 1);
    assert_eq!(stats.ok(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_no_window_holds_is_cut_to_fit_when_the_step_says_so() {
    let llm = mock(&[("gpt-4o-mini", 300)], &[]).await;
    let config = TestConfig::kafka("brokers set by run()")
        .llm(llm.addr())
        .set(
            "models",
            "tiny: {provider: llm, model: gpt-4o-mini, context_window: 300, max_tokens: 64, price: {input: 0.15, output: 0.6}}",
        )
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "cut:\n    steps:\n      - {name: answer, kind: generate, model: tiny, prompt: plain, on_context_overflow: truncate}\n  \
             strict:\n    steps:\n      - {name: answer, kind: generate, model: tiny, prompt: plain}",
        );
    let outputs = run(
        config,
        vec![
            job_in("c1", "cut", json!({"text": long_text()})),
            job_in("x1", "strict", json!({"text": long_text()})),
        ],
    )
    .await;
    let r = result_of(&outputs, "c1");
    assert_eq!(r.status, ResultStatus::Ok);
    // The mock quotes the end of the prompt it got: the cut, marked.
    let answer = r.output.as_str().unwrap();
    assert!(
        answer.contains("truncated to fit the model's context window"),
        "{answer}"
    );
    assert!(step_of(r, "answer").input_tokens <= 300 - 64);
    // Without `truncate` the job is a dead letter that says why.
    let dead = dead_letter_of(&outputs, "x1");
    assert_eq!(
        dead.reason,
        switchyard::wire::DeadLetterReason::ContextLengthExceeded
    );
    assert!(dead.error.contains("context window"), "{}", dead.error);
    assert_eq!(
        llm.stats().requests(),
        1,
        "no call that could not fit was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_gets_its_static_answer_and_guardrails_fail_closed() {
    let llm = mock(
        &[],
        &[(
            "^Reply",
            "Write to help@example.com or call +44 20 7946 0958.",
        )],
    )
    .await;
    let config = TestConfig::kafka("brokers set by run()")
        .set(
            "providers",
            format!(
                "llm: {{kind: openai, base_url: \"http://{}/v1\"}}\n  \
                 broken: {{kind: mock, faults: {{rate_500: 1.0}}, retry: {{max_attempts: 2, base_delay_ms: 10, max_elapsed_ms: 300}}}}",
                llm.addr()
            ),
        )
        .set(
            "models",
            "small: {provider: llm, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}}\n  \
             flaky: {provider: broken, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}}",
        )
        .set(
            "prompts",
            "reply: {user: \"Reply to {{input.text}}\"}\n  extra: {user: \"Tag {{input.text}}\"}",
        )
        .set(
            "pipelines",
            "mixed:
    output: {json: {answer: '{{steps.answer.output}}', tags: '{{steps.tags.output}}'}}
    guardrails: {output: {redact_pii: [email, phone]}, on_error: review}
    steps:
      - {name: tags, kind: generate, model: flaky, prompt: extra, needs: [], on_failure: {output: []}}
      - {name: answer, kind: generate, model: small, prompt: reply, needs: []}",
        );
    // Nested deeper than the guardrail scans: it cannot be checked, so it is not passed.
    let mut deep = json!("bottom");
    for _ in 0..70 {
        deep = json!([deep]);
    }
    let outputs = run(
        config,
        vec![
            job_in("m1", "mixed", json!({"text": "my order"})),
            job_in("m2", "mixed", json!({"text": "my order", "history": deep})),
        ],
    )
    .await;
    let r = result_of(&outputs, "m1");
    assert_eq!(r.status, ResultStatus::Degraded, "a static answer stood in");
    assert_eq!(
        r.output,
        json!({"answer": "Write to [EMAIL] or call [PHONE].", "tags": []})
    );
    let tags = step_of(r, "tags");
    assert!(tags.error.as_deref().unwrap().contains("500"), "{tags:?}");
    assert_eq!(tags.output, Some(json!([])));
    // The step record travels with the output: redacted like it.
    assert_eq!(
        step_of(r, "answer").output,
        Some(json!("Write to [EMAIL] or call [PHONE]."))
    );
    let guard = step_of(r, "guardrails");
    assert_eq!(guard.redacted.get("email"), Some(&1));
    assert_eq!(guard.redacted.get("phone"), Some(&1));

    let held = result_of(&outputs, "m2");
    assert_eq!(
        held.status,
        ResultStatus::Review,
        "sent to a person, not passed"
    );
    let why = step_of(held, "guardrails").error.as_deref().unwrap();
    assert!(why.contains("could not check"), "{why}");
    assert_eq!(llm.stats().requests(), 1, "m2 reached no provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_that_work_on_a_skipped_step_are_skipped_too() {
    let llm = mock(&[], &[]).await;
    let config = TestConfig::kafka("brokers set by run()")
        .llm(llm.addr())
        .set(
            "pipelines",
            "gated:
    steps:
      - {name: classify, kind: classify, model: small, prompt: triage, categories: [billing, technical],
         when: 'input.triage == true'}
      - {name: route, kind: route, on: classify, routes: {technical: large, default: small}}
      - {name: answer, kind: generate, model: \"{{route.model}}\", prompt: answer}",
        );
    let outputs = run(
        config,
        vec![
            job_in(
                "on",
                "gated",
                json!({"text": "billing issue", "triage": true}),
            ),
            job_in("off", "gated", json!({"text": "billing issue"})),
        ],
    )
    .await;
    let on = result_of(&outputs, "on");
    assert!(on.steps.iter().all(|s| !s.skipped), "{:?}", on.steps);
    let off = result_of(&outputs, "off");
    assert_eq!(off.status, ResultStatus::Ok);
    for name in ["classify", "route", "answer"] {
        assert!(step_of(off, name).skipped, "{name}: {:?}", off.steps);
    }
    assert_eq!(off.output, Value::Null, "no step ran");
    assert_eq!(
        llm.stats().requests(),
        2,
        "only the gated-on job called the model"
    );
}

/// Review triggers besides low confidence: an expression over the steps (a category, a rule's
/// confidence) and a cost threshold; the result says why it went to review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_triggers_send_results_to_review_with_the_reason() {
    let llm = mock(&[], &[]).await;
    let config = TestConfig::kafka("brokers set by run()")
        .llm(llm.addr())
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "triggers:
    review: {when: 'steps.classify.category == \"legal\"', timeout_s: 3600}
    steps:
      - {name: classify, kind: classify, method: rules, categories: [legal, general],
         rules: [{category: legal, keywords: [lawsuit, subpoena], confidence: 0.9}]}
      - {name: answer, kind: generate, model: small, prompt: plain}
  costly:
    review: {cost_above_usd: 0.0}
    steps:
      - {name: answer, kind: generate, model: small, prompt: plain}",
        );
    let outputs = run(
        config,
        vec![
            job_in(
                "legal",
                "triggers",
                json!({"text": "We received a subpoena"}),
            ),
            job_in("plain", "triggers", json!({"text": "Where is my parcel?"})),
            job_in("paid", "costly", json!({"text": "Where is my parcel?"})),
        ],
    )
    .await;
    let legal = result_of(&outputs, "legal");
    assert_eq!(legal.status, ResultStatus::Review);
    let why = legal.review_reason.as_deref().unwrap();
    assert!(
        why.contains("review.when") && why.contains("legal"),
        "{why}"
    );
    // A review request carries what a reviewer needs: an id, the deadline, the input.
    let request = legal.review.as_ref().expect("a review request");
    assert!(
        request.id.starts_with("rv-") && request.id.len() == 35,
        "{request:?}"
    );
    assert_eq!(
        request.deadline - legal.received_at,
        chrono::Duration::hours(1)
    );
    assert_eq!(request.input["text"], "We received a subpoena");
    let plain = result_of(&outputs, "plain");
    assert!(plain.review.is_none());
    assert_eq!(
        (plain.status, plain.review_reason.as_deref()),
        (ResultStatus::Ok, None)
    );
    let paid = result_of(&outputs, "paid");
    assert_eq!(paid.status, ResultStatus::Review);
    assert!(
        paid.review_reason
            .as_deref()
            .unwrap()
            .contains("cost_above_usd"),
        "{paid:?}"
    );
}
