//! Persistent by default (issue 12): with the default retry policy, transient provider faults
//! never kill a job; an outage is waited out, and a job's deadline, not an attempt count, ends
//! the wait — at the deadline, never before. Real NATS JetStream and Redis, the mock provider
//! over HTTP with injected faults.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use switchyard::config::{Faults, Plan};
use switchyard::state::StateStore;
use switchyard::testkit::{publish_nats, Collected, OutputCollector};
use switchyard::wire::DeadLetterReason;

use common::*;

/// Default retry, circuit and limit settings; only the model's attempt timeout is short, so a
/// hung request costs 2 s rather than the default 30 s.
fn plan(names: &NatsNames, llm: &str) -> Plan {
    // The source's own defaults (ack_wait, max_deliver, batch, max_ack_pending).
    let p = &names.prefix;
    TestConfig::nats(names)
        .set(
            "source",
            format!(
                "{{kind: nats, url: \"{}\", stream: {}, subjects: [\"{p}.jobs.>\"]}}",
                nats_url(),
                names.jobs_stream
            ),
        )
        .set(
            "state",
            format!("{{kind: redis, url: \"{}\", key_prefix: \"{p}:\"}}", redis_url()),
        )
        .without("limits")
        .llm(llm)
        .set(
            "models",
            "small: {provider: llm, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}, timeout_ms: 2000}",
        )
        .set(
            "pipelines",
            "support:
    steps:
      - {name: classify, kind: classify, model: small, prompt: triage, categories: [billing, technical, account]}
      - {name: answer, kind: generate, model: small, prompt: answer}",
        )
        .plan()
}

fn job_with_deadline(id: &str, deadline: Option<DateTime<Utc>>) -> Vec<u8> {
    let mut job =
        serde_json::json!({"id": id, "tenant": "acme", "input": {"text": "where is my invoice"}});
    if let Some(deadline) = deadline {
        job["deadline"] = deadline.to_rfc3339().into();
    }
    job.to_string().into_bytes()
}

async fn start(names: &NatsNames, llm: &str) -> (Service, OutputCollector) {
    let plan = plan(names, llm);
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    (service, outputs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_never_dead_letter_a_job_under_the_default_policy() {
    let names = NatsNames::new();
    // 10% 429 (Retry-After: 1 s), 5% 500, 2% hung requests.
    let faults = Faults {
        rate_429: 0.10,
        retry_after_s: 1,
        rate_500: 0.05,
        rate_hang: 0.02,
    };
    let llm = mock_llm_with(2, faults).await;
    let (service, outputs) = start(&names, &llm.addr().to_string()).await;
    let n = 2000;
    publish_nats(
        &nats_url(),
        (0..n).map(|i| {
            (
                names.job_subject("acme"),
                job_with_deadline(&format!("f-{i}"), None),
            )
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        outputs.wait_for(n, Duration::from_secs(60), |_| {}).await,
        n
    );
    service.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    names.delete_streams().await;

    let all = outputs.snapshot();
    let dead: Vec<String> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::DeadLetter(d) => Some(format!("{:?}: {}", d.reason, d.error)),
            _ => None,
        })
        .collect();
    assert_each_job_once(&all, n);
    let stats = llm.stats();
    let (limited, failed, hung) = (
        stats
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed),
        stats
            .server_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        stats.hung.load(std::sync::atomic::Ordering::Relaxed),
    );
    eprintln!(
        "{n} jobs: {} requests, {} ok, {limited} rate limited, {failed} server errors, {hung} hung; {} dead letters",
        stats.requests(),
        stats.ok(),
        dead.len()
    );
    assert!(
        dead.is_empty(),
        "transient faults dead-lettered jobs: {:?}",
        &dead[..dead.len().min(5)]
    );
    assert!(
        limited > 100 && failed > 50 && hung > 20,
        "the faults happened"
    );
    // Two calls a job, each answered once: nothing was retried after it succeeded.
    assert_eq!(stats.ok(), 2 * n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_waited_out_and_a_deadline_ends_a_job_at_the_deadline_not_before() {
    let names = NatsNames::new();
    let llm = mock_llm(2).await;
    let (service, outputs) = start(&names, &llm.addr().to_string()).await;
    // The provider answers nothing but 500s for 60 s.
    llm.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let outage_started = Utc::now();
    let deadline = Utc::now() + chrono::Duration::seconds(30);
    let (patient, hurried) = (30, 30);
    let mut jobs: Vec<(String, Vec<u8>)> = (0..patient)
        .map(|i| {
            (
                names.job_subject("acme"),
                job_with_deadline(&format!("patient-{i}"), None),
            )
        })
        .collect();
    jobs.extend((0..hurried).map(|i| {
        (
            names.job_subject("acme"),
            job_with_deadline(&format!("hurried-{i}"), Some(deadline)),
        )
    }));
    publish_nats(&nats_url(), jobs).await.unwrap();

    tokio::time::sleep(Duration::from_secs(60)).await;
    let outage_ended = Utc::now();
    let during = outputs.snapshot();
    llm.set_faults(Faults::default());
    let total = patient + hurried;
    assert_eq!(
        outputs
            .wait_for(total, Duration::from_secs(120), |_| {})
            .await,
        total
    );
    service.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    names.delete_streams().await;

    let all = outputs.snapshot();
    assert_each_job_once(&all, total);
    let mut finished_after_outage = 0;
    let mut expired = Vec::new();
    for (c, _) in &all {
        match c {
            Collected::Result(r) => {
                assert!(r.job_id.starts_with("patient-"), "{} finished", r.job_id);
                assert!(
                    r.completed_at >= outage_ended,
                    "{} finished during the outage",
                    r.job_id
                );
                finished_after_outage += 1;
            }
            Collected::DeadLetter(d) => {
                let id = d.job_id.clone().unwrap_or_default();
                assert!(
                    id.starts_with("hurried-"),
                    "{id}: {:?} {}",
                    d.reason,
                    d.error
                );
                assert_eq!(
                    d.reason,
                    DeadLetterReason::DeadlineExceeded,
                    "{id}: {}",
                    d.error
                );
                expired.push((id, d.failed_at));
            }
            other => panic!("unexpected output {other:?}"),
        }
    }
    let earliest = expired.iter().map(|(_, at)| *at).min().unwrap();
    let latest = expired.iter().map(|(_, at)| *at).max().unwrap();
    eprintln!(
        "outage of {} s: {finished_after_outage} jobs without a deadline finished after it; {} with a 30 s deadline dead-lettered between {} and {} ms after it (outputs during the outage: {})",
        (outage_ended - outage_started).num_seconds(),
        expired.len(),
        (earliest - deadline).num_milliseconds(),
        (latest - deadline).num_milliseconds(),
        during.len(),
    );
    assert_eq!(
        finished_after_outage, patient,
        "every patient job completed"
    );
    assert_eq!(expired.len(), hurried);
    for (id, at) in &expired {
        assert!(
            *at >= deadline,
            "{id} was dead-lettered before its deadline"
        );
    }
    assert!(
        latest - deadline < chrono::Duration::seconds(5),
        "dead-lettered within moments of the deadline"
    );
}
