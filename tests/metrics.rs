//! `/metrics` after a known workload: the key series have exactly the values the outputs imply.
//! The scrape is saved to `target/metrics-sample.prom`; `.ci/run` checks it with
//! `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use switchyard::state::{MemoryStore, StateStore};
use switchyard::testkit::{publish, Collected};

use common::*;

/// The value of one series, `name{labels}` exactly as exposed (labels in the order given).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("series {series} not found in:\n{text}"))
}

fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_known_workload_match_the_outputs() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(2).await;
    let outputs = collector(&brokers);
    let service = Service::start(
        plan(
            &brokers,
            &llm.addr().to_string(),
            &[(
                "SWITCHYARD__TENANTS",
                "{acme: {weight: 2, budget_usd_per_day: 100}}",
            )],
        ),
        StateStore::from(MemoryStore::new(1000)),
    );

    let mut payloads: Vec<Vec<u8>> = (0..20)
        .map(|i| job(&format!("m-{i}"), "acme", "billing question"))
        .collect();
    payloads.push(b"{not json".to_vec());
    payloads.push(br#"{"id":"x","input":{}}"#.to_vec());
    payloads.push(vec![0xff]);
    payloads.push(
        serde_json::json!({"id": "late", "tenant": "acme", "input": {"text": "x"}, "deadline": "2020-01-01T00:00:00Z"})
            .to_string()
            .into_bytes(),
    );
    publish(&brokers, JOBS_TOPIC, payloads).await.unwrap();
    assert_eq!(
        outputs.wait_for(24, Duration::from_secs(30), |_| {}).await,
        24
    );
    // One more job alone: its settlement is the last change to the budget, with no other
    // reservation outstanding, so the remaining-budget gauge must then be exact.
    publish(
        &brokers,
        JOBS_TOPIC,
        [job("m-20", "acme", "billing question")],
    )
    .await
    .unwrap();
    assert_eq!(
        outputs.wait_for(25, Duration::from_secs(30), |_| {}).await,
        25
    );
    // Two redeliveries of finished jobs: answered from the store.
    publish(
        &brokers,
        JOBS_TOPIC,
        [
            job("m-0", "acme", "billing question"),
            job("m-1", "acme", "billing question"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        outputs.wait_for(27, Duration::from_secs(30), |_| {}).await,
        27
    );

    let (mut tokens_in, mut tokens_out, mut cost) = (0u64, 0u64, 0.0f64);
    for (c, _) in outputs.snapshot() {
        if let Collected::Result(r) = c {
            if !r.duplicate {
                tokens_in += r.usage.input_tokens;
                tokens_out += r.usage.output_tokens;
                cost += r.usage.cost_usd;
            }
        }
    }
    let addr = service.health.http_addr().expect("metrics port bound");
    let http = reqwest::Client::new();
    let scrape = || async {
        http.get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // The job's budget settles just after its result is written: wait for that (bounded).
    let remaining_is = |text: &str| {
        let remaining = sample(
            text,
            r#"switchyard_budget_remaining_usd{period="day",tenant="acme"}"#,
        );
        (remaining - (100.0 - cost)).abs() < 1e-9
    };
    let settled = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut text = scrape().await;
    while !remaining_is(&text) && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape().await;
    }
    let ready = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready while running");
    let alive = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status(), 200, "alive while running");
    assert_eq!(alive.text().await.unwrap(), "ok");
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/metrics-sample.prom"),
        &text,
    )
    .unwrap();

    assert_eq!(
        sample(&text, r#"switchyard_jobs_received_total{source="kafka"}"#),
        27.0
    );
    // Per-tenant usage and budget for the tenant named in config.
    assert_eq!(
        sample(
            &text,
            r#"switchyard_tenant_tokens_total{direction="input",tenant="acme"}"#
        ),
        tokens_in as f64
    );
    assert!(
        (sample(&text, r#"switchyard_tenant_cost_usd_total{tenant="acme"}"#) - cost).abs() < 1e-9
    );
    let remaining = sample(
        &text,
        r#"switchyard_budget_remaining_usd{period="day",tenant="acme"}"#,
    );
    assert!(
        (remaining - (100.0 - cost)).abs() < 1e-9,
        "budget remaining {remaining} after spending {cost}: no reservation left counted"
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_jobs_finished_total{pipeline="support",status="ok"}"#
        ),
        21.0
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_jobs_finished_total{pipeline="support",status="duplicate"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_jobs_finished_total{pipeline="support",status="dead_letter"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_jobs_finished_total{pipeline="none",status="dead_letter"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_dead_letters_total{reason="invalid_job"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_dead_letters_total{reason="deadline_exceeded"}"#
        ),
        1.0
    );
    assert_eq!(
        sum_of(&text, r#"switchyard_llm_requests_total{"#),
        42.0,
        "two provider calls per valid job"
    );
    let tokens = sum_of(&text, "switchyard_llm_tokens_total{") as u64;
    assert_eq!(
        tokens,
        tokens_in + tokens_out,
        "token totals equal the results' usage"
    );
    let spent = sum_of(&text, "switchyard_llm_cost_usd_total{");
    assert!(
        (spent - cost).abs() < 1e-9,
        "cost {spent} equals the results' usage {cost}"
    );
    assert_eq!(sample(&text, "switchyard_inflight_jobs"), 0.0);
    assert_eq!(
        sample(
            &text,
            r#"switchyard_job_duration_seconds_count{pipeline="support"}"#
        ),
        24.0
    );
    assert_eq!(
        sample(
            &text,
            r#"switchyard_step_duration_seconds_count{step="classify"}"#
        ),
        21.0
    );
    assert!(
        sample(
            &text,
            r#"switchyard_pool_available_permits{pool="generate"}"#
        ) > 0.0
    );

    service.shutdown.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while service.health.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready once draining"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    service.stop().await;
}
