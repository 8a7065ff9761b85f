//! End-to-end through the Kafka protocol (librdkafka's in-process mock cluster) and a real HTTP
//! mock LLM: jobs in, schema-valid results and dead letters out, offsets committed only for
//! finished work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use switchyard::config::SourcePlan;
use switchyard::testkit::{publish, Collected};
use switchyard::wire::{DeadLetterReason, PayloadEncoding, ResultStatus};

use common::*;

const STALL: Duration = Duration::from_secs(30);

/// Sum of the committed offsets of `group` on the jobs topic.
fn committed(brokers: &str, group: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition(JOBS_TOPIC, p);
    }
    let offsets = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

fn group_of(plan: &switchyard::config::Plan) -> String {
    let SourcePlan::Kafka(k) = &plan.source else {
        panic!("kafka source")
    };
    k.group.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_gets_exactly_one_schema_valid_result() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(2).await;
    let plan = plan(&brokers, &llm.addr().to_string(), &[]);
    let group = group_of(&plan);
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());

    let n = 200;
    let texts = [
        "my billing statement is wrong",
        "technical problem: the app crashes",
        "please close my account",
    ];
    let jobs: Vec<Vec<u8>> = (0..n)
        .map(|i| job(&format!("j-{i}"), "acme", texts[i % 3]))
        .collect();
    publish(&brokers, JOBS_TOPIC, jobs).await.unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    service.stop().await;

    let all = outputs.snapshot();
    assert_eq!(all.len(), n, "one output per job, no extras");
    assert_schema_valid(&all);
    let per_job = originals(&all);
    assert_eq!(per_job.len(), n);
    assert!(per_job.values().all(|&c| c == 1));
    for (c, _) in &all {
        let Collected::Result(r) = c else {
            panic!("expected only results, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Ok);
        assert_eq!(r.steps.len(), 3);
        assert!(r.usage.input_tokens > 0 && r.usage.output_tokens > 0 && r.usage.cost_usd > 0.0);
        let category = r.route.category.as_deref().unwrap();
        let expected_model = if category == "technical" {
            "large"
        } else {
            "small"
        };
        assert_eq!(
            r.route.model.as_deref(),
            Some(expected_model),
            "routed by category"
        );
    }
    assert_eq!(
        llm.stats().requests(),
        2 * n as u64,
        "classify + generate per job"
    );
    assert_eq!(
        committed(&brokers, &group),
        n as i64,
        "every offset committed after the outputs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_become_invalid_job_dead_letters_and_the_offset_moves_on() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let plan = plan(&brokers, &llm.addr().to_string(), &[]);
    let group = group_of(&plan);
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());

    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"id\": 1, oops".to_vec(), "does not parse as JSON"),
        (vec![0xc3, 0x28, b'{', b'}'], "not valid UTF-8"),
        (br#"[1, 2, 3]"#.to_vec(), "it is an array"),
        (
            br#"{"id":"m-1","input":{"text":"x"}}"#.to_vec(),
            "missing field `tenant`",
        ),
        (
            br#"{"id":"w-1","tenant":"acme","input":{"text":"x"},"priority":"urgent"}"#.to_vec(),
            "`priority`",
        ),
        (
            br#"{"id":"w-2","tenant":"acme","input":["x"]}"#.to_vec(),
            "`input`",
        ),
        (
            br#"{"id":"w-3","tenant":"ac.me","input":{}}"#.to_vec(),
            "`tenant`",
        ),
        (
            format!(
                r#"{{"id":"big","tenant":"acme","input":{{"text":"{}"}}}}"#,
                "x".repeat(5000)
            )
            .into_bytes(),
            "limits.max_job_bytes",
        ),
        (
            br#"{"id":"p-1","tenant":"acme","pipeline":"nope","input":{"text":"x"}}"#.to_vec(),
            "pipeline `nope` is not configured",
        ),
    ];
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for (i, (payload, _)) in bad.iter().enumerate() {
        payloads.push(job(&format!("ok-{i}"), "acme", "a normal ticket"));
        payloads.push(payload.clone());
    }
    let total = payloads.len();
    publish(&brokers, JOBS_TOPIC, payloads).await.unwrap();
    assert_eq!(outputs.wait_for(total, STALL, |_| {}).await, total);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let dead: Vec<_> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::DeadLetter(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(dead.len(), bad.len());
    for (payload, expected) in &bad {
        let original = |d: &switchyard::wire::DeadLetter| match d.payload_encoding {
            PayloadEncoding::Utf8 => d.payload.as_bytes().to_vec(),
            PayloadEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(&d.payload)
                .unwrap(),
        };
        let d = dead
            .iter()
            .find(|d| original(d) == *payload)
            .expect("the dead letter carries the original payload");
        assert_eq!(d.reason, DeadLetterReason::InvalidJob);
        assert!(
            d.error.contains(expected),
            "error {:?} should mention {expected:?}",
            d.error
        );
        assert_eq!(d.source.transport, "kafka");
    }
    assert_eq!(
        all.len() - dead.len(),
        bad.len(),
        "valid jobs around them still succeed"
    );
    assert_eq!(
        llm.stats().requests(),
        2 * bad.len() as u64,
        "no provider call for an invalid job"
    );
    assert_eq!(
        committed(&brokers, &group),
        total as i64,
        "offsets moved past every bad payload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_is_answered_from_the_store_without_a_provider_call() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let outputs = collector(&brokers);
    let service = Service::start(plan(&brokers, &llm.addr().to_string(), &[]), memory());

    let first = job("t-4821", "acme", "I was charged twice for order #4821");
    publish(&brokers, JOBS_TOPIC, [first.clone()])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    // The same key again: once as an exact redelivery, once under a new id with the same key.
    let same_key = serde_json::json!({"id": "t-4821-retry", "tenant": "acme", "idempotency_key": "acme:t-4821",
        "input": {"text": "I was charged twice for order #4821"}})
    .to_string()
    .into_bytes();
    // Another tenant using the very same key: keys are scoped by tenant, so this is its own
    // job, processed and paid for, never answered with acme's result.
    let other_tenant =
        serde_json::json!({"id": "t-4821", "tenant": "globex", "idempotency_key": "acme:t-4821",
        "input": {"text": "I was charged twice for order #4821"}})
        .to_string()
        .into_bytes();
    publish(&brokers, JOBS_TOPIC, [first, same_key, other_tenant])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(4, STALL, |_| {}).await, 4);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let results: Vec<_> = all
        .iter()
        .map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) => r.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let (acme, globex): (Vec<_>, Vec<_>) = results.iter().partition(|r| r.tenant == "acme");
    assert_eq!(acme.iter().filter(|r| !r.duplicate).count(), 1);
    assert_eq!(acme.iter().filter(|r| r.duplicate).count(), 2);
    assert_eq!(globex.len(), 1);
    assert!(
        !globex[0].duplicate,
        "another tenant's key is not a duplicate"
    );
    let original = acme.iter().find(|r| !r.duplicate).unwrap();
    for replay in acme.iter().filter(|r| r.duplicate) {
        assert_eq!(
            replay.output, original.output,
            "the stored result is replayed"
        );
        assert_eq!(replay.job_id, "t-4821");
    }
    assert_eq!(
        llm.stats().requests(),
        4,
        "one classify and one generate call per tenant's job"
    );

    // Every Kafka output carries its id (deterministic: the same output written again, after a
    // crash between the write and its record, has the same one). Each of these four is an
    // output of its own: the original, two replays answering two deliveries, another tenant's.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "output-id-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topics().results]).unwrap();
    let mut ids: Vec<(String, String)> = Vec::new();
    while ids.len() < 4 {
        let message = tokio::time::timeout(STALL, consumer.recv())
            .await
            .expect("the results are on the topic")
            .unwrap();
        let result: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        let id = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "switchyard-output-id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .expect("every output carries switchyard-output-id");
        ids.push((result["tenant"].as_str().unwrap().to_owned(), id));
    }
    let distinct: std::collections::HashSet<_> = ids.iter().map(|(_, id)| id).collect();
    assert_eq!(distinct.len(), 4, "{ids:?}");
    assert!(
        ids.iter()
            .all(|(_, id)| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())),
        "{ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stopped_mid_stream_loses_nothing_and_repeats_no_finished_provider_call() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(15).await;
    let llm_addr = llm.addr().to_string();
    // One store for both runs: the state that outlives a consumer restart (Redis in production).
    let state = memory();
    // No drain time: the stop abandons in-flight jobs, the harshest stop short of a crash.
    let overrides = [
        ("SWITCHYARD__LIMITS__DRAIN_TIMEOUT_MS", "0"),
        ("SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS", "16"),
    ];
    let first_plan = plan(&brokers, &llm_addr, &overrides);
    let group = group_of(&first_plan);
    let outputs = collector(&brokers);

    let n = 300;
    let jobs: Vec<Vec<u8>> = (0..n)
        .map(|i| job(&format!("r-{i}"), "globex", "technical question"))
        .collect();
    publish(&brokers, JOBS_TOPIC, jobs).await.unwrap();

    let service = Service::start(first_plan, state.clone());
    let before = outputs.wait_for(80, STALL, |_| {}).await;
    service.stop().await;
    let at_stop = outputs.len();
    assert!(
        before >= 80 && at_stop < n,
        "stopped mid-stream ({at_stop} of {n} done)"
    );
    let calls_at_stop = llm.stats().requests();

    let mut second_plan = plan(&brokers, &llm_addr, &overrides);
    let SourcePlan::Kafka(k) = &mut second_plan.source else {
        panic!("kafka source")
    };
    k.group = group;
    let service = Service::start(second_plan, state);
    // Every job must end with one non-duplicate result; replays of finished-but-uncommitted jobs
    // may add duplicates.
    let deadline = tokio::time::Instant::now() + STALL;
    loop {
        let per_job = originals(&outputs.snapshot());
        if per_job.len() == n || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let per_job = originals(&all);
    assert_eq!(per_job.len(), n, "no job lost");
    assert!(
        per_job.values().all(|&c| c == 1),
        "no job finished twice: {per_job:?}"
    );
    // Jobs finished before the stop are never sent to the provider again: at most the jobs that
    // were in flight when it stopped (16, two calls each) are called again.
    let calls = llm.stats().requests();
    let replays = all.len() - n;
    eprintln!("stopped at {at_stop}/{n} outputs after {calls_at_stop} calls; {calls} calls in all; {replays} replayed duplicates");
    assert!(
        calls <= 2 * n as u64 + 2 * 16,
        "{calls} provider calls for {n} jobs"
    );
    assert!(calls_at_stop >= 2 * before as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_and_a_broker_outage_lose_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(5).await;
    let plan = plan(&brokers, &llm.addr().to_string(), &[]);
    let group = group_of(&plan);
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());

    let n = 400;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("e-{i}"), "acme", "billing")),
    )
    .await
    .unwrap();
    outputs.wait_for(n / 4, STALL, |_| {}).await;
    // Retriable produce and commit errors, then the only broker goes away for two seconds.
    let cluster = kafka.cluster();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10],
    );
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 3],
    );
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(1).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while originals(&outputs.snapshot()).len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "all jobs finish after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let per_job = originals(&all);
    assert_eq!(per_job.len(), n, "no job lost");
    assert!(per_job.values().all(|&c| c == 1), "no job finished twice");
    assert_eq!(
        llm.stats().requests(),
        2 * n as u64,
        "no provider call repeated"
    );
    assert_eq!(
        committed(&brokers, &group),
        n as i64,
        "every offset committed once the broker is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traceparent_header_is_carried_from_the_job_to_its_result() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let service = Service::start(plan(&brokers, &llm.addr().to_string(), &[]), memory());

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let payload = job("tp-1", "acme", "hello");
    let record = FutureRecord::to(JOBS_TOPIC)
        .key("acme")
        .payload(&payload)
        .headers(OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some(traceparent),
        }));
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "tp-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&topics().results, &topics().review])
        .unwrap();
    let message = tokio::time::timeout(STALL, consumer.recv())
        .await
        .unwrap()
        .unwrap();
    let headers = message.headers().expect("the result carries headers");
    let found = headers
        .iter()
        .find(|h| h.key == "traceparent")
        .and_then(|h| h.value)
        .expect("traceparent header");
    assert_eq!(std::str::from_utf8(found).unwrap(), traceparent);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_pauses_intake_which_resumes_without_loss() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    // Every call hangs (until the 5 s attempt timeout) at first: all 16 in-flight jobs stall
    // and intake stays at its bound long enough to pause the source.
    let hang = switchyard::config::Faults {
        rate_429: 0.0,
        retry_after_s: 1,
        rate_500: 0.0,
        rate_hang: 1.0,
    };
    let llm = mock_llm_with(5, hang.clone()).await;
    // The hung calls open the provider's circuit. Its cooldown is the one knob set here (3 s
    // instead of 30 s) so that the recovery after it, which is what this test is about, comes
    // within a short test.
    let providers = format!(
        "llm: {{kind: openai, base_url: \"http://{}/v1\", circuit: {{open_ms: {COOLDOWN_MS}}}}}",
        llm.addr()
    );
    let models = "small: {provider: llm, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}, timeout_ms: 5000}\n  \
                  large: {provider: llm, model: gpt-4o, price: {input: 2.5, output: 10}, timeout_ms: 5000}";
    const COOLDOWN_MS: u64 = 3000;
    const BOUND: i64 = 16;
    let plan = plan_with(
        &brokers,
        &providers,
        models,
        &[("SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS", "16")],
    );
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    let metrics = service.metrics.clone();
    // The in-flight gauge, sampled for the whole run: it must never pass the bound.
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio_util::task::TaskTracker::new().spawn({
        let (metrics, stop) = (metrics.clone(), stop_sampling.clone());
        async move {
            let mut peak = 0;
            while !stop.is_cancelled() {
                peak = peak.max(metrics.inflight.get());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        }
    });
    let n = 150;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("bp-{i}"), "acme", "billing")),
    )
    .await
    .unwrap();
    eventually(STALL, "intake reached its bound", || {
        metrics.inflight.get() >= BOUND
    })
    .await;
    // Held at the bound: the source pauses (the pause is counted) instead of pulling on.
    eventually(
        STALL,
        "intake paused while every in-flight job was stalled",
        || metrics.intake_pauses.get() > 0,
    )
    .await;
    let paused = metrics.intake_pauses.get();
    // The backlog the paused consumer leaves in the topic shows as consumer lag (from
    // librdkafka's statistics, every 5 s).
    let lag = metrics.consumer_lag.with_label_values(&["kafka"]);
    eventually(
        STALL,
        "switchyard_consumer_lag showed the waiting jobs",
        || lag.get() > 0,
    )
    .await;
    let lag_seen = lag.get();
    llm.set_faults(switchyard::config::Faults {
        rate_hang: 0.0,
        ..hang
    });
    // Nothing arrives until the hung attempts time out and the circuit's cooldown ends.
    let quiet_for = STALL + Duration::from_millis(COOLDOWN_MS);
    assert_eq!(outputs.wait_for(n, quiet_for, |_| {}).await, n);
    stop_sampling.cancel();
    let peak = sampler.await.unwrap();
    service.stop().await;
    let all = outputs.snapshot();
    assert_each_job_once(&all, n);
    // The provider came back well within the jobs' deadline: a stall is not a failure.
    assert_no_dead_letters(&all, "no job dead-lettered");
    eprintln!(
        "{n} jobs through {BOUND} in-flight slots (peak {peak}); intake paused {paused} time(s) while the provider hung, consumer lag {lag_seen}"
    );
    assert!(
        peak <= BOUND,
        "in-flight jobs peaked at {peak}, above the bound of {BOUND}"
    );
}

/// A DAG from config: keyword rules classify (no provider call), two generate steps that need
/// only it run at once, a third joins them; and a pipeline whose route sends low-confidence
/// classifications to the review topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_fans_out_and_joins_and_low_confidence_goes_to_review() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    // Each answer takes a second: two steps running one after the other cannot be answered
    // within a second of each other, and a step that waits for both cannot be answered within
    // a second of the later one.
    const LATENCY_MS: f64 = 1000.0;
    let llm = mock_llm(LATENCY_MS as u64).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set(
            "prompts",
            format!(
                "{PROMPTS}\n  \
                 summary: {{user: \"Summarise: {{{{input.text}}}}\"}}\n  \
                 reply: {{user: \"Reply to: {{{{input.text}}}}\"}}\n  \
                 both: {{user: \"{{{{steps.summary.output}}}} / {{{{steps.reply.output}}}}\"}}"
            ),
        )
        .set(
            "pipelines",
            "dag:
    steps:
      - {name: classify, kind: classify, method: rules, categories: [billing, other], rules: {billing: [invoice, refund]}}
      - {name: summary, kind: generate, needs: [classify], model: small, prompt: summary}
      - {name: reply, kind: generate, needs: [classify], model: small, prompt: reply}
      - {name: both, kind: generate, needs: [summary, reply], model: small, prompt: both}
  reviewed:
    steps:
      - {name: classify, kind: classify, model: small, prompt: triage, categories: [billing, technical, account]}
      - {name: route, kind: route, on: classify, routes: {default: small}, review_below_confidence: 1.0}
      - {name: answer, kind: generate, model: \"{{route.model}}\", prompt: answer}",
        )
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    let job_in = |id: &str, pipeline: &str, text: &str| {
        serde_json::json!({"id": id, "tenant": "acme", "pipeline": pipeline, "input": {"text": text}})
            .to_string()
            .into_bytes()
    };
    // One DAG job alone, so the provider's log is its calls only.
    publish(
        &brokers,
        JOBS_TOPIC,
        [job_in("dag-1", "dag", "my invoice is wrong")],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    let log = llm.log();
    assert_eq!(log.len(), 3, "rules classify makes no call: {log:?}");
    let (first, second, join) = (log[0].at_ms, log[1].at_ms, log[2].at_ms);
    assert!(
        second - first < LATENCY_MS,
        "the two independent steps ran at once (answered {:.0} ms apart)",
        second - first
    );
    assert!(
        join - second >= LATENCY_MS,
        "the joining step waited for both ({:.0} ms after the later)",
        join - second
    );
    publish(
        &brokers,
        JOBS_TOPIC,
        [
            job_in("dag-2", "dag", "hello there"),
            job_in("rev-1", "reviewed", "my invoice is wrong"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(3, STALL, |_| {}).await, 3);
    service.stop().await;

    let all = outputs.snapshot();
    assert_each_job_once(&all, 3);
    let by_id = |id: &str| {
        all.iter()
            .find_map(|(c, _)| match c {
                Collected::Result(r) | Collected::Review(r) if r.job_id == id => Some((c, r)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no result for {id}"))
    };
    for (id, category) in [("dag-1", "billing"), ("dag-2", "other")] {
        let (kind, r) = by_id(id);
        assert!(matches!(kind, Collected::Result(_)), "{id}: {kind:?}");
        assert_eq!(r.status, ResultStatus::Ok);
        assert_eq!(r.route.category.as_deref(), Some(category), "{id}");
        let names: Vec<&str> = r.steps.iter().map(|s| s.name.as_str()).collect();
        for step in ["classify", "summary", "reply", "both"] {
            assert!(
                names.contains(&step),
                "{id}: step {step} recorded in {names:?}"
            );
        }
        let classify = r.steps.iter().find(|s| s.name == "classify").unwrap();
        assert_eq!((classify.provider.as_ref(), classify.cost_usd), (None, 0.0));
    }
    let (kind, r) = by_id("rev-1");
    assert!(
        matches!(kind, Collected::Review(_)),
        "below the review threshold: the review topic, got {kind:?}"
    );
    assert_eq!(r.status, ResultStatus::Review);
    assert!(r.route.confidence.is_some_and(|c| c < 1.0));
    assert_eq!(llm.stats().requests(), 3 + 3 + 2);
}
