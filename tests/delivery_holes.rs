//! The delivery holes an audit found, each proven closed against real brokers: a crafted header
//! must not crash a job, a late redelivery must replay (not dead-letter) a finished job, and a
//! job processed twice after the state store lost its data must reach the output stream once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use switchyard::config;
use switchyard::state::{MemoryStore, StateStore};
use switchyard::testkit::{publish, publish_nats, Collected, OutputCollector};

use common::*;

const STALL: Duration = Duration::from_secs(30);

async fn publish_with_traceparent(brokers: &str, payload: &[u8], traceparent: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "traceparent",
        value: Some(traceparent),
    });
    producer
        .send(
            FutureRecord::<str, [u8]>::to(JOBS_TOPIC)
                .payload(payload)
                .key("acme")
                .headers(headers),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .unwrap();
}

/// Kafka in (the embedded cluster), NATS JetStream out.
fn kafka_to_nats_plan(brokers: &str, names: &NatsNames, llm: &str) -> config::Plan {
    let p = &names.prefix;
    let text = format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", group: "it-{p}", topic: {JOBS_TOPIC},
         librdkafka: {{auto.commit.interval.ms: 200, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}
sink: {{kind: nats, url: "{nats}", stream: {os}, topics: {{results: {p}.results, review: {p}.review, dlq: {p}.dlq}}}}
state: {{kind: memory}}
http: {{listen: "127.0.0.1:0"}}
providers:
  llm: {{kind: openai, base_url: "http://{llm}/v1"}}
models:
  small: {{provider: llm, model: gpt-4o-mini, timeout_ms: 5000}}
prompts:
  answer: {{user: "{{{{input.text}}}}"}}
pipelines:
  support:
    steps:
      - {{name: answer, kind: generate, model: small, prompt: answer}}
"#,
        nats = nats_url(),
        os = names.outputs_stream,
    );
    config::load_str(&text, "test config", Vec::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_with_crlf_from_kafka_does_not_crash_the_job_on_a_nats_sink() {
    let kafka = kafka();
    let names = NatsNames::new();
    let llm = mock_llm(1).await;
    let plan = kafka_to_nats_plan(&kafka.bootstrap_servers(), &names, &llm.addr().to_string());
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;

    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let brokers = kafka.bootstrap_servers();
    publish_with_traceparent(
        &brokers,
        &job("crafted", "acme", "hello"),
        &format!("{good}-x\r\nX-Injected: yes"),
    )
    .await;
    publish_with_traceparent(&brokers, &job("plain", "acme", "hello"), good).await;

    let seen = outputs.wait_for(2, STALL, |_| {}).await;
    let panics = service.metrics.job_panics.get();
    service.stop().await;
    names.delete_streams().await;
    assert_eq!(
        seen,
        2,
        "each job gets its output: {:?}",
        outputs.snapshot()
    );
    for (c, _) in outputs.snapshot() {
        assert!(
            matches!(c, Collected::Result(ref r) if !r.duplicate),
            "a fresh result each, got {c:?}"
        );
    }
    assert_eq!(panics, 0, "no job task panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_the_deadline_replays_the_result_instead_of_a_dead_letter() {
    let kafka = kafka();
    let llm = mock_llm(1).await;
    let brokers = kafka.bootstrap_servers();
    let plan = plan(&brokers, &llm.addr().to_string(), &[]);
    let outputs = collector(&brokers);
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;

    let deadline = chrono::Utc::now() + chrono::Duration::seconds(3);
    let payload = serde_json::json!({
        "id": "late-1", "tenant": "acme", "input": {"text": "my invoice is wrong"},
        "deadline": deadline.to_rfc3339(),
    })
    .to_string()
    .into_bytes();
    publish(&brokers, JOBS_TOPIC, [payload.clone()])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    // The same message again, as a redelivery arriving after the deadline.
    let wait = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(300)).await;
    publish(&brokers, JOBS_TOPIC, [payload]).await.unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    service.stop().await;

    let all = outputs.snapshot();
    assert!(
        matches!(&all[0].0, Collected::Result(r) if !r.duplicate),
        "first: its result, got {:?}",
        all[0].0
    );
    assert!(
        matches!(&all[1].0, Collected::Result(r) if r.duplicate),
        "second: the stored result replayed, not a deadline_exceeded dead letter; got {:?}",
        all[1].0
    );
}

/// Messages on the outputs stream for one subject.
async fn stream_messages(names: &NatsNames) -> u64 {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&names.outputs_stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_processed_again_after_the_state_store_lost_it_reaches_the_output_stream_once() {
    let names = NatsNames::new();
    let llm = mock_llm(1).await;
    let mut plan = nats_plan(&names, &llm.addr().to_string(), &[]);
    // Memory state: each service below starts with an empty store, as after Redis lost its data.
    plan.state.kind = config::StateKind::Memory { max_entries: 1000 };
    let payload = job("lost-1", "acme", "where is my refund?");

    for _ in 0..2 {
        let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
            .await
            .unwrap();
        let service = Service::start(plan.clone(), StateStore::from(MemoryStore::new(1000)));
        service.wait_ready().await;
        publish_nats(&nats_url(), [(names.job_subject("acme"), payload.clone())])
            .await
            .unwrap();
        assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
        service.stop().await;
        outputs.stop().await;
    }
    let stored = stream_messages(&names).await;
    names.delete_streams().await;
    assert_eq!(
        llm.stats().requests(),
        4,
        "the job really ran twice (two calls each)"
    );
    assert_eq!(
        stored, 1,
        "the second fresh result carries the same Nats-Msg-Id and JetStream drops it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_spend_another_tenants_budget_or_invent_tenants() {
    let names = NatsNames::new();
    let llm = mock_llm(1).await;
    let plan = nats_plan(
        &names,
        &llm.addr().to_string(),
        &[
            ("SWITCHYARD__TENANTS__UNKNOWN", "reject"),
            ("SWITCHYARD__TENANTS__ACME__RPS", "1000"),
            ("SWITCHYARD__TENANTS__GLOBEX__RPS", "1000"),
        ],
    );
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let mut plan = plan;
    plan.state.kind = config::StateKind::Memory { max_entries: 1000 };
    let service = Service::start(plan, StateStore::from(MemoryStore::new(1000)));
    service.wait_ready().await;
    publish_nats(
        &nats_url(),
        [
            // On acme's subject, claiming to be globex.
            (names.job_subject("acme"), job("spoof-1", "globex", "hi")),
            // A tenant nobody configured.
            (
                names.job_subject("invented"),
                job("new-1", "invented", "hi"),
            ),
            (names.job_subject("acme"), job("fine-1", "acme", "hi")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(3, STALL, |_| {}).await, 3);
    service.stop().await;
    names.delete_streams().await;

    let all = outputs.snapshot();
    let dead: Vec<_> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::DeadLetter(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    let spoof = dead
        .iter()
        .find(|d| d.job_id.as_deref() == Some("spoof-1"))
        .expect("the spoofed job is dead-lettered");
    assert_eq!(spoof.reason.as_str(), "invalid_job");
    assert!(
        spoof.error.contains("`globex`") && spoof.error.contains("`acme`"),
        "names both tenants: {}",
        spoof.error
    );
    assert_eq!(
        spoof.tenant.as_deref(),
        Some("acme"),
        "filed under the subject's tenant"
    );
    let invented = dead
        .iter()
        .find(|d| d.job_id.as_deref() == Some("new-1"))
        .expect("the invented tenant's job is dead-lettered");
    assert_eq!(invented.reason.as_str(), "unknown_tenant");
    assert!(
        all.iter()
            .any(|(c, _)| matches!(c, Collected::Result(r) if r.job_id == "fine-1")),
        "the honest job runs"
    );
    assert_eq!(
        llm.stats().requests(),
        2,
        "only the honest job reached the provider"
    );
}
