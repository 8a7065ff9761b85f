//! A/B experiments through NATS JetStream and Redis with two replicas: a 90/10 experiment over
//! 2,000 users assigns 10% ± 2% to the variant, every user keeps its variant across a restart
//! of both replicas, the variant is in `route.variant`, in the step's prompt and in metrics,
//! and `experiments report` counts what the results topic holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use switchyard::config::Plan;
use switchyard::state::StateStore;
use switchyard::testkit::{publish_nats, Collected, OutputCollector};

use common::*;

const STALL: Duration = Duration::from_secs(60);

async fn replicas(plan: &Plan, n: usize) -> Vec<Service> {
    let mut services = Vec::new();
    for _ in 0..n {
        services.push(Service::start(
            plan.clone(),
            StateStore::open(&plan.state).await.unwrap(),
        ));
    }
    for s in &services {
        s.wait_ready().await;
    }
    services
}

/// (user, variant) of every result, and the raw results.
fn variants(outputs: &[(Collected, serde_json::Value)]) -> Vec<(String, String)> {
    outputs
        .iter()
        .map(|(c, raw)| {
            let Collected::Result(r) = c else {
                panic!("every job gets a result: {c:?}")
            };
            let user = raw["metadata"]["user"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let variant = r
                .route
                .variant
                .clone()
                .expect("every user is in the experiment");
            let prompt = r
                .steps
                .iter()
                .find(|s| s.name == "answer")
                .and_then(|s| s.prompt.clone());
            let expected = if variant == "concise" {
                "answer@v2"
            } else {
                "answer@v1"
            };
            assert_eq!(
                prompt.as_deref(),
                Some(expected),
                "the variant's prompt ran"
            );
            (user, variant)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_experiment_is_sticky_per_user_across_restarts_and_replicas() {
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let plan = TestConfig::nats(&names)
        .llm(llm.addr())
        .set(
            "limits",
            "{max_inflight_jobs: 512, max_job_bytes: 4096, drain_timeout_ms: 5000}",
        )
        .set(
            "prompts",
            "answer@v1: {user: \"{{input.text}}\"}\n  answer@v2: {user: \"Briefly: {{input.text}}\"}",
        )
        .set(
            "pipelines",
            "support:
    steps:
      - name: answer
        kind: generate
        model: small
        prompt: answer@v1
        experiment:
          name: concise-answers
          variants: {control: {weight: 90}, concise: {weight: 10, prompt: answer@v2, temperature: 0.2}}",
        )
        .plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let first = replicas(&plan, 2).await;
    let n = 2_000;
    // The user travels in metadata too, so the test can read it back from each result.
    let with_user = |(id, user): (String, String)| {
        let job = json!({"id": id, "tenant": "acme", "user": user, "metadata": {"user": user},
                         "input": {"text": "Where is my parcel?"}});
        (names.job_subject("acme"), job.to_string().into_bytes())
    };
    publish_nats(
        &nats_url(),
        (0..n).map(|i| with_user((format!("e-{i}"), format!("u-{i}")))),
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(n, STALL, |_| {}).await, n);
    let assigned: u64 = first
        .iter()
        .map(|s| {
            s.metrics
                .experiment_assignments
                .with_label_values(&["support", "concise-answers", "concise"])
                .get()
        })
        .sum();
    for s in first {
        s.stop().await;
    }
    let before = collector.snapshot();
    let by_user: HashMap<String, String> = variants(&before).into_iter().collect();
    assert_eq!(by_user.len(), n);
    let concise = by_user.values().filter(|v| *v == "concise").count();
    let share = concise as f64 / n as f64;
    assert!(
        (0.08..=0.12).contains(&share),
        "10% ± 2% get the variant: {concise} of {n}"
    );
    assert_eq!(
        assigned, concise as u64,
        "metrics count each assignment once"
    );

    // Both replicas replaced; the first 200 users come back with new jobs.
    let second = replicas(&plan, 2).await;
    publish_nats(
        &nats_url(),
        (0..200).map(|i| with_user((format!("again-{i}"), format!("u-{i}")))),
    )
    .await
    .unwrap();
    assert_eq!(collector.wait_for(n + 200, STALL, |_| {}).await, n + 200);
    for s in second {
        s.stop().await;
    }
    let all = collector.snapshot();
    collector.stop().await;
    names.delete_streams().await;
    for (user, variant) in variants(&all) {
        assert_eq!(by_user[&user], variant, "{user} kept its variant");
    }

    // The report over the results as `tail --json` prints them.
    let lines = all.iter().map(|(_, raw)| raw.to_string());
    let table = switchyard_report(lines);
    let row = table.lines().find(|l| l.contains("concise")).unwrap();
    let again = (0..200)
        .filter(|i| by_user[&format!("u-{i}")] == "concise")
        .count();
    assert!(
        row.split_whitespace().nth(2) == Some(&(concise + again).to_string()),
        "{table}"
    );
}

/// `switchyard experiments report -` over `lines`.
fn switchyard_report(lines: impl Iterator<Item = String>) -> String {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["experiments", "report", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `per_user.rps`: one user's burst is held to its rate while another user of the same tenant
/// is not held behind it; jobs without a user are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_rate_limit_holds_that_user_only() {
    let names = NatsNames::new();
    let llm = mock_llm(0).await;
    let plan = TestConfig::nats(&names)
        .llm(llm.addr())
        .set("tenants", "{acme: {per_user: {rps: 4}}}")
        .set("prompts", "plain: {user: \"{{input.text}}\"}")
        .set(
            "pipelines",
            "support:\n    steps:\n      - {name: answer, kind: generate, model: small, prompt: plain}",
        )
        .plan();
    let collector = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let service = Service::start(plan.clone(), StateStore::open(&plan.state).await.unwrap());
    service.wait_ready().await;
    let job = |id: String, user: Option<&str>| {
        let job = json!({"id": id, "tenant": "acme", "user": user, "input": {"text": "hi"}});
        (names.job_subject("acme"), job.to_string().into_bytes())
    };
    let heavy = (0..24).map(|i| job(format!("heavy-{i}"), Some("heavy")));
    let light = (0..4).map(|i| job(format!("light-{i}"), Some("light")));
    let anonymous = (0..8).map(|i| job(format!("anon-{i}"), None));
    publish_nats(&nats_url(), heavy.chain(light).chain(anonymous))
        .await
        .unwrap();
    assert_eq!(collector.wait_for(36, STALL, |_| {}).await, 36);
    let parked = service
        .metrics
        .jobs_parked
        .with_label_values(&["user_rate"])
        .get();
    service.stop().await;
    // Turns more than a second off wait at the broker, not in the process's in-flight slots.
    assert!(
        parked > 0,
        "heavy's later jobs were parked until their turn"
    );
    let all = collector.snapshot();
    collector.stop().await;
    names.delete_streams().await;
    let finished = |prefix: &str| -> Vec<switchyard::wire::JobResult> {
        all.iter()
            .filter_map(|(c, _)| match c {
                Collected::Result(r) if r.job_id.starts_with(prefix) => Some(r.clone()),
                _ => None,
            })
            .collect()
    };
    let heavy = finished("heavy-");
    assert_eq!(heavy.len(), 24);
    let first = heavy.iter().map(|r| r.completed_at).min().unwrap();
    let last = heavy.iter().map(|r| r.completed_at).max().unwrap();
    // 24 jobs at 4/s: whatever the burst (at most two seconds' worth, 8), the other 16 take
    // at least 4 s. Unlimited, they all finish within a few hundred ms.
    let spread = (last - first).num_milliseconds();
    assert!(
        spread >= 4_000,
        "heavy's 24 jobs finished within {spread} ms"
    );
    for prefix in ["light-", "anon-"] {
        let others = finished(prefix);
        assert!(!others.is_empty());
        let slowest = others.iter().map(|r| r.latency_ms).max().unwrap();
        assert!(
            slowest < 2_500,
            "{prefix} jobs are not held behind heavy's limit (slowest {slowest} ms)"
        );
    }
}
