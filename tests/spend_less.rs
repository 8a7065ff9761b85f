//! Spending less on work that can wait (issue 16): low-priority jobs on a model with a flex
//! tier are served there (OpenAI `service_tier: "flex"`) and priced at its rates; other jobs
//! are not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::json;

use common::*;

const STALL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_priority_jobs_use_the_flex_tier_at_its_price() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(0).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set(
            "models",
            "small: {provider: llm, model: gpt-4o-mini, price: {input: 1.0, output: 2.0},\n          \
             flex: {price: {input: 0.5, output: 1.0}}}",
        )
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "support:\n    steps:\n      - {name: answer, kind: generate, model: small, prompt: plain}",
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    let job = |id: &str, priority: &str| {
        json!({"id": id, "tenant": "acme", "priority": priority,
               "input": {"text": "Summarise last quarter's tickets."}})
        .to_string()
        .into_bytes()
    };
    switchyard::testkit::publish(
        &brokers,
        JOBS_TOPIC,
        [
            job("low", "low"),
            job("normal", "normal"),
            job("high", "high"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(3, STALL, |_| {}).await, 3);
    let all = outputs.snapshot();
    service.stop().await;
    assert_schema_valid(&all);
    let standard = |s: &switchyard::wire::StepRecord| {
        (s.input_tokens as f64 * 1.0 + s.output_tokens as f64 * 2.0) / 1e6
    };
    let low = step_of(result_of(&all, "low"), "answer");
    assert_eq!(
        low.service_tier.as_deref(),
        Some("flex"),
        "the provider served it on flex"
    );
    assert!(
        (low.cost_usd - standard(low) / 2.0).abs() < 1e-12,
        "priced at the flex rates: {low:#?}"
    );
    for id in ["normal", "high"] {
        let s = step_of(result_of(&all, id), "answer");
        assert_eq!(s.service_tier, None, "{id} is not sent to flex");
        assert!((s.cost_usd - standard(s)).abs() < 1e-12, "{id}: {s:#?}");
    }
}

/// A service on the Kafka mock cluster whose `support` pipeline answers `input.text` on
/// `small`, with a semantic cache over the mock's embeddings.
async fn semantic_service(
    brokers: &str,
    llm: std::net::SocketAddr,
) -> (Service, switchyard::testkit::OutputCollector) {
    let plan = TestConfig::kafka(brokers)
        .llm(llm)
        .set(
            "models",
            "small: {provider: llm, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}}\n  \
             embed: {provider: llm, model: text-embedding-3-small, price: {input: 0.02, output: 0}}",
        )
        .set("prompts", "plain: {system: \"Answer the customer.\", user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "support:\n    steps:\n      - {name: answer, kind: generate, model: small, prompt: plain,\n         \
             semantic_cache: {embedding_model: embed}}",
        )
        .plan();
    let outputs = collector(brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    (service, outputs)
}

fn question(id: &str, tenant: &str, text: &str) -> Vec<u8> {
    json!({"id": id, "tenant": tenant, "input": {"text": text}})
        .to_string()
        .into_bytes()
}

/// The labelled pairs of `tests/data/semantic_cache.jsonl`: paraphrases, negations, reversed
/// questions and different questions, each asked first and then second under its own tenant.
/// A paraphrase answered from the first answer is a true hit; any other hit is a false one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_semantic_cache_answers_paraphrases_and_not_negations_or_reversals() {
    let pairs: Vec<serde_json::Value> = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/semantic_cache.jsonl"
    ))
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(0).await;
    let (service, outputs) = semantic_service(&brokers, llm.addr()).await;
    let n = pairs.len();
    let text = |p: &serde_json::Value, which: &str| p[which].as_str().unwrap().to_owned();
    let firsts = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| question(&format!("a{i}"), &format!("p{i}"), &text(p, "first")));
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, firsts)
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    let seconds = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| question(&format!("b{i}"), &format!("p{i}"), &text(p, "second")));
    switchyard::testkit::publish(&brokers, JOBS_TOPIC, seconds)
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(2 * n, STALL, |_| {}).await, 2 * n);
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let hits_metric = service
        .metrics
        .semantic_cache_requests
        .with_label_values(&["hit"])
        .get();
    service.stop().await;

    let (mut true_hits, mut false_hits, mut paraphrases) = (0u64, Vec::new(), 0u64);
    let mut missed = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let first = result_of(&all, &format!("a{i}"));
        assert!(
            !step_of(first, "answer").cached,
            "nothing to hit on a first question"
        );
        let second = result_of(&all, &format!("b{i}"));
        let step = step_of(second, "answer");
        let same = p["same"].as_bool().unwrap();
        paraphrases += u64::from(same);
        if step.cached {
            assert_eq!(
                second.output, first.output,
                "a hit answers with the first answer"
            );
            assert!(step.similarity.unwrap() >= 0.95);
            assert_eq!(
                step.input_tokens + step.output_tokens,
                0,
                "a hit spends no tokens"
            );
            if same {
                true_hits += 1;
            } else {
                false_hits.push(format!("{} / {}", text(p, "first"), text(p, "second")));
            }
        } else if same {
            missed.push(format!("{} / {}", text(p, "first"), text(p, "second")));
        }
    }
    let lookups = 2 * n as u64;
    let hits = true_hits + false_hits.len() as u64;
    let precision = if hits == 0 {
        1.0
    } else {
        true_hits as f64 / hits as f64
    };
    let recall = true_hits as f64 / paraphrases as f64;
    println!(
        "semantic cache over {n} labelled pairs ({paraphrases} paraphrases): {hits} hits, \
         {} false; precision {precision:.3}, recall {recall:.3}; missed paraphrases: {missed:#?}",
        false_hits.len()
    );
    assert_eq!(hits_metric, hits, "metrics count every hit");
    assert!(
        false_hits.len() as f64 <= 0.01 * lookups as f64,
        "false hits at most 1% of {lookups} lookups: {false_hits:#?}"
    );
    assert!(
        recall >= 0.8,
        "most paraphrases are answered from the cache (recall {recall:.3}): {missed:#?}"
    );
}

/// Two tenants asking the same question never share an entry; the same tenant asking again
/// does hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_semantic_cache_is_never_shared_between_tenants() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(0).await;
    let (service, outputs) = semantic_service(&brokers, llm.addr()).await;
    let q = "How do I export my invoices?";
    for (i, (id, tenant)) in [
        ("acme-1", "acme"),
        ("globex-1", "globex"),
        ("acme-2", "acme"),
    ]
    .into_iter()
    .enumerate()
    {
        switchyard::testkit::publish(&brokers, JOBS_TOPIC, [question(id, tenant, q)])
            .await
            .unwrap();
        assert_eq!(outputs.wait_for(i + 1, STALL, |_| {}).await, i + 1);
    }
    let all = outputs.snapshot();
    service.stop().await;
    let cached = |id: &str| step_of(result_of(&all, id), "answer").cached;
    assert!(!cached("acme-1"));
    assert!(!cached("globex-1"), "globex never sees acme's entry");
    assert!(
        cached("acme-2"),
        "acme's own repeat is answered from its entry"
    );
}
