//! Provider failures never drop a job: transient errors are retried (honouring Retry-After),
//! a failing model falls back, and when every target fails the job is a dead letter that says
//! what each target answered. Expired jobs never reach the provider.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use switchyard::config::Faults;
use switchyard::testkit::{publish, Collected};
use switchyard::wire::{DeadLetterReason, ResultStatus};

use common::*;

const STALL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_are_retried_until_every_job_completes() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let faults = Faults {
        rate_429: 0.15,
        retry_after_s: 1,
        rate_500: 0.05,
        rate_hang: 0.0,
    };
    let llm = mock_llm_with(1, faults).await;
    let providers = format!(
        "llm: {{kind: openai, base_url: \"http://{}/v1\", retry: {{max_attempts: 8, base_delay_ms: 5, max_delay_ms: 50}}}}",
        llm.addr()
    );
    let models = "small: {provider: llm, model: gpt-4o-mini, timeout_ms: 5000}\n  \
                  large: {provider: llm, model: gpt-4o, timeout_ms: 5000}";
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &[]), memory());

    let n = 100;
    publish(
        &brokers,
        JOBS_TOPIC,
        // Distinct texts: every call has its own request body, so the provider's log can be
        // read call by call.
        (0..n).map(|i| job(&format!("f-{i}"), "acme", &format!("billing question {i}"))),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let (mut retried_steps, mut recorded_attempts) = (0, 0u64);
    for (c, _) in &all {
        let Collected::Result(r) = c else {
            panic!("every job completes, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Ok);
        retried_steps += r.steps.iter().filter(|s| s.attempts > 1).count();
        recorded_attempts += r.steps.iter().map(|s| u64::from(s.attempts)).sum::<u64>();
    }
    // Call by call (same body = same call), in the order the provider saw them: every failure
    // is followed by one more attempt, and the call's last attempt, and only that one, is
    // its success.
    let mut calls: std::collections::HashMap<u64, Vec<&str>> = Default::default();
    for entry in llm.log() {
        calls
            .entry(entry.body_hash)
            .or_default()
            .push(entry.outcome);
    }
    assert_eq!(calls.len(), 2 * n, "two calls per job");
    for outcomes in calls.values() {
        let (last, before) = outcomes.split_last().unwrap();
        assert_eq!(*last, "ok", "a call ends with its success: {outcomes:?}");
        assert!(
            before
                .iter()
                .all(|o| matches!(*o, "rate_limited" | "server_error")),
            "no attempt after a success, one after each transient failure: {outcomes:?}"
        );
    }
    assert_eq!(
        recorded_attempts,
        llm.stats().requests(),
        "the step records count every attempt the provider saw"
    );
    let stats = llm.stats();
    let limited = stats
        .rate_limited
        .load(std::sync::atomic::Ordering::Relaxed);
    let failed = stats
        .server_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        limited > 0 && failed > 0,
        "faults were injected ({limited} 429s, {failed} 500s)"
    );
    assert_eq!(
        stats.ok(),
        2 * n as u64,
        "exactly one successful call per step"
    );
    assert_eq!(
        stats.requests(),
        stats.ok() + limited + failed,
        "every failed attempt was retried once more, no more"
    );
    assert!(retried_steps > 0, "step records show the extra attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_falls_back_and_the_result_is_degraded() {
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
    let healthy = mock_llm(1).await;
    let providers = format!(
        // The circuit is kept out of the way here (it has its own test): every job retries.
        "broken: {{kind: openai, base_url: \"http://{}/v1\", retry: {{max_attempts: 2, base_delay_ms: 1, max_delay_ms: 5}},
           circuit: {{consecutive_failures: 1000, failure_rate: 1.0, window: 1000, min_calls: 1000}}}}\n  \
         healthy: {{kind: openai, base_url: \"http://{}/v1\"}}",
        broken.addr(),
        healthy.addr()
    );
    let models = "small: {provider: broken, model: gpt-4o-mini, fallbacks: [backup]}\n  \
                  large: {provider: broken, model: gpt-4o, fallbacks: [backup]}\n  \
                  backup: {provider: healthy, model: llama-3-8b}";
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &[]), memory());
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..10).map(|i| job(&format!("d-{i}"), "acme", "account question")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(10, STALL, |_| {}).await, 10);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    for (c, _) in &all {
        let Collected::Result(r) = c else {
            panic!("expected a degraded result, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Degraded);
        let llm_steps: Vec<_> = r.steps.iter().filter(|s| s.provider.is_some()).collect();
        assert!(llm_steps
            .iter()
            .all(|s| s.provider.as_deref() == Some("healthy") && s.attempts == 3));
    }
    assert_eq!(
        broken.stats().requests(),
        10 * 2 * 2,
        "two attempts per step on the broken target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_target_fails_the_job_is_a_provider_failed_dead_letter() {
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
    let also_broken = mock_llm_with(
        1,
        Faults {
            rate_500: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let retry = "retry: {max_attempts: 3, max_elapsed_ms: 200, base_delay_ms: 1, max_delay_ms: 5}";
    let providers = format!(
        // Transient failures are retried round after round until the job's deadline or
        // max_elapsed_ms: here 200 ms, so the test sees the end of it.
        "broken: {{kind: openai, base_url: \"http://{}/v1\", {retry}}}\n  \
         also_broken: {{kind: openai, base_url: \"http://{}/v1\", {retry}}}",
        broken.addr(),
        also_broken.addr()
    );
    let models = "small: {provider: broken, model: gpt-4o-mini, fallbacks: [spare]}\n  \
                  large: {provider: broken, model: gpt-4o}\n  \
                  spare: {provider: also_broken, model: gpt-4o-mini}";
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &[]), memory());
    publish(&brokers, JOBS_TOPIC, [job("x-1", "acme", "anything")])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let Collected::DeadLetter(d) = &all[0].0 else {
        panic!("expected a dead letter, got {:?}", all[0].0)
    };
    assert_eq!(d.reason, DeadLetterReason::ProviderFailed);
    // Per target, three attempts in the first round and two in the second: the fifth failure
    // in a row opens its circuit (the default `consecutive_failures`), which stays open past
    // max_elapsed_ms, so the later rounds make none. The dead letter names every target with
    // the provider's own error, not the circuit's.
    assert_eq!(d.attempts, 10);
    assert!(d.error.contains("small: server error 500"), "{}", d.error);
    assert!(d.error.contains("spare: server error 500"), "{}", d.error);
    assert_eq!(broken.stats().requests(), 5);
    assert_eq!(also_broken.stats().requests(), 5);
    assert_eq!(d.job_id.as_deref(), Some("x-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_job_is_dead_lettered_without_a_provider_call() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(1).await;
    let outputs = collector(&brokers);
    let service = Service::start(plan(&brokers, &llm.addr().to_string(), &[]), memory());
    let expired = serde_json::json!({"id": "late-1", "tenant": "acme", "input": {"text": "hi"},
        "deadline": "2020-01-01T00:00:00Z"});
    publish(&brokers, JOBS_TOPIC, [expired.to_string().into_bytes()])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    // The same job published again (a producer retry, a replay of the topic): its dead letter
    // is replayed from the store, marked as a duplicate, so consumers of the dead-letter topic
    // can tell it from a second failure.
    publish(&brokers, JOBS_TOPIC, [expired.to_string().into_bytes()])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(2, STALL, |_| {}).await, 2);
    service.stop().await;

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let letters: Vec<_> = all
        .iter()
        .map(|(c, _)| match c {
            Collected::DeadLetter(d) => d,
            other => panic!("expected dead letters, got {other:?}"),
        })
        .collect();
    let (first, replay) = (letters[0], letters[1]);
    assert_eq!(first.reason, DeadLetterReason::DeadlineExceeded);
    assert!(first.error.contains("2020-01-01"), "{}", first.error);
    assert!(!first.duplicate);
    assert!(replay.duplicate, "the replay is marked as a duplicate");
    assert_eq!(replay.reason, first.reason);
    assert_eq!(replay.job_id, first.job_id);
    assert_eq!(llm.stats().requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_sends_traffic_to_the_fallback_until_the_primary_recovers() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let primary = mock_llm_with(
        1,
        Faults {
            rate_500: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let backup = mock_llm(1).await;
    let providers = format!(
        "primary: {{kind: openai, base_url: \"http://{}/v1\", retry: {{max_attempts: 1}},
           circuit: {{consecutive_failures: 3, open_ms: 400}}}}\n  \
         backup: {{kind: openai, base_url: \"http://{}/v1\"}}",
        primary.addr(),
        backup.addr()
    );
    let models = "small: {provider: primary, model: gpt-4o-mini, fallbacks: [spare]}\n  \
                  large: {provider: primary, model: gpt-4o-mini, fallbacks: [spare]}\n  \
                  spare: {provider: backup, model: llama-3-8b}";
    let outputs = collector(&brokers);
    let overrides = [("SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS", "4")];
    let service = Service::start(
        plan_with(&brokers, &providers, models, &overrides),
        memory(),
    );

    // Primary down: after three failures the circuit opens and calls stop reaching it.
    let phase = std::time::Instant::now();
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..40).map(|i| job(&format!("c-{i}"), "acme", "billing")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(40, STALL, |_| {}).await, 40);
    let primary_calls = primary.stats().requests();
    // What the breaker lets through: the calls already under way when the third failure
    // opened it (at most the 4 jobs in flight), then one probe per 400 ms cooldown.
    let cooldowns = (phase.elapsed().as_secs_f64() / 0.4).ceil() as u64;
    let allowed = 3 + 4 + cooldowns;
    assert!(
        primary_calls <= allowed,
        "{primary_calls} of 80 calls reached the primary; its breaker allows {allowed} in {:?}",
        phase.elapsed()
    );
    for (c, _) in outputs.snapshot() {
        let Collected::Result(r) = c else {
            panic!("expected results, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Degraded, "served by the fallback");
    }

    // Primary back: after the cool-down a probe closes the circuit and traffic returns.
    primary.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(&brokers, JOBS_TOPIC, [job("probe", "acme", "billing")])
        .await
        .unwrap();
    assert_eq!(outputs.wait_for(41, STALL, |_| {}).await, 41);
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..10).map(|i| job(&format!("r-{i}"), "acme", "billing")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(51, STALL, |_| {}).await, 51);
    let text = service.metrics.encode();
    service.stop().await;

    let recovered: Vec<_> = outputs
        .snapshot()
        .into_iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) if r.job_id.starts_with("r-") => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(recovered.len(), 10);
    assert!(
        recovered.iter().all(|r| r.status == ResultStatus::Ok),
        "the primary serves again"
    );
    assert!(
        text.contains(r#"switchyard_circuit_state{model="gpt-4o-mini",provider="primary"} 0"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_deterministic_requests_are_answered_from_the_cache() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(5).await;
    let plan = plan(
        &brokers,
        &llm.addr().to_string(),
        &[("SWITCHYARD__CACHE", "{enabled: true, ttl_s: 60}")],
    );
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    let metrics = service.metrics.clone();
    publish(
        &brokers,
        JOBS_TOPIC,
        [job("c-0", "acme", "my invoice is wrong")],
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(1, STALL, |_| {}).await, 1);
    let n = 20;
    publish(
        &brokers,
        JOBS_TOPIC,
        (1..n).map(|i| job(&format!("c-{i}"), "acme", "my invoice is wrong")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    assert_eq!(
        llm.stats().requests(),
        2,
        "only the first job reached the provider"
    );
    let mut cached_steps = 0;
    for (c, _) in &all {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            panic!("every job completes, got {c:?}")
        };
        if r.job_id != "c-0" {
            let llm_steps: Vec<_> = r.steps.iter().filter(|s| s.provider.is_some()).collect();
            assert!(llm_steps.iter().all(|s| s.cached && s.cost_usd == 0.0));
            cached_steps += llm_steps.len();
        }
    }
    assert_eq!(cached_steps, 2 * (n - 1));
    let hits = metrics.cache_requests.with_label_values(&["hit"]).get();
    let misses = metrics.cache_requests.with_label_values(&["miss"]).get();
    assert_eq!((hits, misses), (2 * (n as u64 - 1), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_jobs_complete_through_429s_500s_and_hangs_honouring_retry_after() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let faults = Faults {
        rate_429: 0.10,
        retry_after_s: 1,
        rate_500: 0.05,
        rate_hang: 0.02,
    };
    let llm = mock_llm_with(1, faults).await;
    // Hangs end at the 1 s attempt timeout. The circuit is kept out of the way (it has its own
    // test): with 17% failures, five in a row happen by chance over 10,000 calls.
    let providers = format!(
        "llm: {{kind: openai, base_url: \"http://{}/v1\", retry: {{max_attempts: 8, base_delay_ms: 5, max_delay_ms: 50}},
           circuit: {{consecutive_failures: 1000, failure_rate: 1.0, window: 1000, min_calls: 1000}}}}",
        llm.addr()
    );
    let models = "small: {provider: llm, model: gpt-4o-mini, timeout_ms: 1000}\n  \
                  large: {provider: llm, model: gpt-4o, timeout_ms: 1000}";
    let env = [
        ("SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS", "1024"),
        ("SWITCHYARD__LIMITS__MAX_RUNNING_JOBS", "1024"),
        (
            "SWITCHYARD__POOLS",
            "{classify: 1024, route: 1024, generate: 1024}",
        ),
    ];
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &env), memory());
    let n = 5000;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| {
            job(
                &format!("h-{i}"),
                "acme",
                &format!("ticket {i}: billing question"),
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

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let per_job = originals(&all);
    assert_eq!(per_job.len(), n, "no job lost");
    let mut retried_steps = 0;
    for (c, _) in &all {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            panic!("every job completes, got {c:?}")
        };
        retried_steps += r.steps.iter().filter(|s| s.attempts > 1).count();
    }
    // From the mock's log: every 429 was followed by the same request no sooner than its
    // Retry-After.
    let log = llm.log();
    let mut next_of: std::collections::HashMap<u64, Vec<f64>> = Default::default();
    for entry in &log {
        next_of
            .entry(entry.body_hash)
            .or_default()
            .push(entry.at_ms);
    }
    let (mut limited, mut hung, mut early) = (0, 0, 0);
    let mut shortest_wait = f64::MAX;
    for entry in &log {
        match entry.outcome {
            "rate_limited" => {
                limited += 1;
                let retry = next_of[&entry.body_hash]
                    .iter()
                    .copied()
                    .find(|&t| t > entry.at_ms)
                    .expect("a rate-limited request is retried");
                let waited = retry - entry.at_ms;
                shortest_wait = shortest_wait.min(waited);
                if waited < entry.retry_after_s.unwrap_or(0) as f64 * 1000.0 - 5.0 {
                    early += 1;
                }
            }
            "hang" => hung += 1,
            _ => {}
        }
    }
    eprintln!(
        "{n} jobs: {} requests ({limited} 429s, {hung} hangs), {retried_steps} steps retried; shortest wait after a 429: {shortest_wait:.0} ms",
        log.len()
    );
    assert!(limited > 0 && hung > 0, "faults were injected");
    assert!(retried_steps > 0, "step records show the extra attempts");
    assert_eq!(early, 0, "{early} retries came before their Retry-After");
}

/// A provider that always answers `status` with an OpenAI error body; counts its requests.
async fn refusing(
    status: u16,
    body: serde_json::Value,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use axum::routing::post;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let counter = counter.clone();
            let body = body.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    axum::Json(body),
                )
            }
        }),
    );
    (serve(app).await, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_filter_and_auth_errors_are_not_retried_on_the_same_target() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    // Bodies as the OpenAI API documents them.
    let (denied, denied_calls) = refusing(
        401,
        serde_json::json!({"error": {"message": "Incorrect API key provided: sk-****. You can find your API key at https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
    )
    .await;
    let (filtered, filtered_calls) = refusing(
        400,
        serde_json::json!({"error": {"message": "The response was filtered due to the prompt triggering content management policy.", "type": null, "param": "prompt", "code": "content_filter"}}),
    )
    .await;
    let healthy = mock_llm(1).await;
    let providers = format!(
        "denied: {{kind: openai, base_url: \"http://{denied}/v1\", retry: {{max_attempts: 5, base_delay_ms: 1, max_delay_ms: 5}}}}\n  \
         filtered: {{kind: openai, base_url: \"http://{filtered}/v1\", retry: {{max_attempts: 5, base_delay_ms: 1, max_delay_ms: 5}}}}\n  \
         healthy: {{kind: openai, base_url: \"http://{}/v1\"}}",
        healthy.addr()
    );
    let models = "small: {provider: denied, model: gpt-4o-mini, fallbacks: [backup]}\n  \
                  large: {provider: filtered, model: gpt-4o, fallbacks: [backup]}\n  \
                  backup: {provider: healthy, model: llama-3-8b}";
    let outputs = collector(&brokers);
    let service = Service::start(plan_with(&brokers, &providers, models, &[]), memory());
    let n = 10;
    // "technical" tickets route their answer to `large` (content filter), the rest to `small`.
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| {
            let text = if i % 2 == 0 {
                "technical error in the app"
            } else {
                "billing question"
            };
            job(&format!("nr-{i}"), "acme", text)
        }),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    service.stop().await;
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let mut llm_steps = 0u64;
    let mut on_large = 0u64;
    for (c, _) in &all {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            panic!("the fallback answers, got {c:?}")
        };
        assert_eq!(r.status, ResultStatus::Degraded);
        for s in r.steps.iter().filter(|s| s.provider.is_some()) {
            assert_eq!(s.provider.as_deref(), Some("healthy"));
            assert_eq!(s.attempts, 2, "one refused attempt, then the fallback");
            llm_steps += 1;
        }
        on_large += u64::from(r.route.model.as_deref() == Some("large"));
    }
    let (denied_calls, filtered_calls) = (
        denied_calls.load(std::sync::atomic::Ordering::Relaxed),
        filtered_calls.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(
        denied_calls + filtered_calls,
        llm_steps,
        "exactly one attempt per refused step"
    );
    assert_eq!(
        filtered_calls, on_large,
        "one content-filtered attempt per answer routed to `large`"
    );
    assert!(
        on_large > 0 && denied_calls > 0,
        "both refusals were exercised"
    );
}

/// A provider that is down gets, on top of each call's first attempt, at most the retry
/// budget's share of retries (half a retry per first attempt, plus 10 a second): an outage does
/// not multiply its load by `max_attempts` and the rounds. Default retry policy; the circuit is
/// kept out of the way (it would stop the load by itself, and has its own test), and
/// `max_elapsed_ms` ends the calls after two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_retries_stay_within_the_retry_budget() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let down = mock_llm_with(
        1,
        Faults {
            rate_500: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let providers = format!(
        "llm: {{kind: openai, base_url: \"http://{}/v1\", retry: {{max_elapsed_ms: 2000}},
           circuit: {{consecutive_failures: 100000, failure_rate: 1.0, window: 100000, min_calls: 100000}}}}",
        down.addr()
    );
    let outputs = collector(&brokers);
    // The budget refills from the moment the service starts (10 a second, up to 100 saved).
    let started = std::time::Instant::now();
    let service = Service::start(plan_with(&brokers, &providers, MODELS, &[]), memory());
    let n = 100;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("o-{i}"), "acme", &format!("outage {i}"))),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    let took = started.elapsed().as_secs_f64();
    service.stop().await;
    for (c, _) in outputs.snapshot() {
        assert!(
            matches!(&c, Collected::DeadLetter(d) if d.reason == DeadLetterReason::ProviderFailed),
            "{c:?}"
        );
    }
    // One first attempt per job (each ends at its first step); the budget starts with 10.
    let first = n as f64;
    let retries = down.stats().requests() as f64 - first;
    let allowed = 0.5 * first + 10.0 * took + 10.0 + 1.0;
    eprintln!("{n} jobs against a provider that is down: {retries} retries in {took:.2} s (budget allows {allowed:.0})");
    assert!(
        retries <= allowed,
        "{retries} retries in {took:.2} s: over the retry budget ({allowed:.0})"
    );
}
