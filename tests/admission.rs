//! Fair multi-tenant admission across replicas: three services share a Kafka consumer group and
//! Redis. A noisy tenant is held to its configured rate summed over all replicas while a quiet
//! tenant's latency stays close to what it is alone; a small daily budget holds across the
//! replicas; high-priority jobs overtake low ones under saturation; a deadline that passes while
//! a job waits for its tenant's limit ends it without a provider call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use switchyard::config::{self, Plan};
use switchyard::state::StateStore;
use switchyard::testkit::{publish, Collected};
use switchyard::wire::{DeadLetterReason, JobResult};

use common::*;

const STALL: Duration = Duration::from_secs(60);

/// A replica's plan: Redis state under `prefix`, the mock LLM at `llm`, the given `tenants:`
/// and `limits:` blocks.
fn replica_plan(
    brokers: &str,
    group: &str,
    prefix: &str,
    llm: &str,
    limits: &str,
    tenants: &str,
) -> Plan {
    let text = replica_config(brokers, group, prefix, llm, limits, tenants);
    config::load_str(&text, "test config", std::iter::empty()).unwrap()
}

fn replica_config(
    brokers: &str,
    group: &str,
    prefix: &str,
    llm: &str,
    limits: &str,
    tenants: &str,
) -> String {
    format!(
        r#"
source: {{kind: kafka, brokers: "{brokers}", group: "{group}", topic: {JOBS_TOPIC},
         librdkafka: {{auto.commit.interval.ms: 200, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}
state: {{kind: redis, url: "{redis}", key_prefix: "{prefix}"}}
http: {{listen: "off"}}
limits: {limits}
providers:
  llm: {{kind: openai, base_url: "http://{llm}/v1", retry: {{max_attempts: 3, base_delay_ms: 10, max_delay_ms: 100}}}}
models:
  small: {{provider: llm, model: gpt-4o-mini, price: {{input: 1000, output: 1000}}, max_tokens: 64, timeout_ms: 5000}}
prompts:
  triage: {{user: "Categories: {{{{categories}}}}\n\nTicket:\n{{{{input.text}}}}"}}
  answer: {{user: "{{{{input.text}}}}"}}
pipelines:
  support:
    steps:
      - {{name: classify, kind: classify, model: small, prompt: triage, categories: [billing, technical, account]}}
      - {{name: answer, kind: generate, model: small, prompt: answer}}
tenants:
  {tenants}
"#,
        redis = redis_url(),
    )
}

/// `k` replicas of one plan.
async fn replicas_of(k: usize, plan: Plan) -> Vec<Service> {
    replicas(vec![plan; k]).await
}

async fn replicas(plans: Vec<Plan>) -> Vec<Service> {
    let mut services = Vec::new();
    for plan in plans {
        let state = StateStore::open(&plan.state).await.unwrap();
        services.push(Service::start(plan, state));
    }
    for s in &services {
        s.wait_ready().await;
    }
    services
}

fn unique(name: &str) -> String {
    format!("{name}{:x}", rand::random::<u32>())
}

fn results_of<'a>(all: &'a [(Collected, serde_json::Value)], tenant: &str) -> Vec<&'a JobResult> {
    all.iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) if r.tenant == tenant => Some(r),
            _ => None,
        })
        .collect()
}

fn p99(results: &[&JobResult]) -> u64 {
    let mut latencies: Vec<u64> = results.iter().map(|r| r.latency_ms).collect();
    latencies.sort_unstable();
    // Nearest rank.
    let rank = (latencies.len() * 99).div_ceil(100);
    latencies[rank.saturating_sub(1)]
}

/// Publishes `n` jobs of `tenant` at `per_sec`.
async fn trickle(brokers: &str, tenant: &str, n: usize, per_sec: f64) {
    let gap = Duration::from_secs_f64(1.0 / per_sec);
    for i in 0..n {
        publish(
            brokers,
            JOBS_TOPIC,
            [job(&format!("{tenant}-{i}"), tenant, "where is my invoice")],
        )
        .await
        .unwrap();
        tokio::time::sleep(gap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_is_held_to_its_global_rate_and_does_not_slow_a_quiet_one() {
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(10).await;
    let (noisy, quiet) = (unique("noisy"), unique("quiet"));
    let (group, prefix) = (unique("adm-"), format!("{}:", unique("it")));
    let rps = 40.0;
    let tenants = format!("{noisy}: {{rps: {rps}}}\n  {quiet}: {{rps: 100}}");
    // Default in-flight and running bounds: the flood (600) fits in neither a fair share of
    // them nor their whole.
    let limits = "{drain_timeout_ms: 5000}";
    let services = replicas_of(
        3,
        replica_plan(
            &brokers,
            &group,
            &prefix,
            &llm.addr().to_string(),
            limits,
            &tenants,
        ),
    )
    .await;
    let outputs = collector(&brokers);

    // The quiet tenant alone: its baseline latency.
    let alone = 100;
    trickle(&brokers, &quiet, alone, 20.0).await;
    assert_eq!(outputs.wait_for(alone, STALL, |_| {}).await, alone);
    let baseline = p99(&results_of(&outputs.snapshot(), &quiet));

    // Now the noisy tenant floods at more than ten times its limit while the quiet one trickles.
    let flood = 600;
    let started = std::time::Instant::now();
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..flood).map(|i| job(&format!("{noisy}-{i}"), &noisy, "refund now")),
    )
    .await
    .unwrap();
    let published_in = started.elapsed();
    // 300 quiet jobs: a p99 that one or two stray fetch waits cannot decide alone.
    let quiet_jobs = 300;
    let quiet_copy = quiet.clone();
    let b = brokers.clone();
    let tracker = tokio_util::task::TaskTracker::new();
    let trickling = tracker.spawn(async move {
        // Offset ids so they do not collide with the baseline's.
        let gap = Duration::from_millis(40);
        for i in 0..quiet_jobs {
            publish(
                &b,
                JOBS_TOPIC,
                [job(
                    &format!("{quiet_copy}-x{i}"),
                    &quiet_copy,
                    "where is my invoice",
                )],
            )
            .await
            .unwrap();
            tokio::time::sleep(gap).await;
        }
    });
    let total = alone + flood + quiet_jobs;
    assert_eq!(
        outputs.wait_for(total, STALL, |_| {}).await,
        total,
        "every job finished"
    );
    trickling.await.unwrap();
    for s in services {
        s.stop().await;
    }

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let noisy_results = results_of(&all, &noisy);
    assert_eq!(noisy_results.len(), flood);
    let quiet_results: Vec<&JobResult> = results_of(&all, &quiet)
        .into_iter()
        .filter(|r| r.job_id.contains("-x"))
        .collect();
    // The noisy tenant's admissions: the steady rate between its 10th and 90th percentile
    // pipeline starts (skipping the initial burst the limiter allows).
    let mut starts: Vec<f64> = noisy_results
        .iter()
        .map(|r| {
            let queued = r
                .steps
                .iter()
                .find(|s| s.kind == "admission")
                .map_or(0, |s| s.latency_ms);
            (r.received_at.timestamp_millis() as f64 + queued as f64) / 1000.0
        })
        .collect();
    starts.sort_by(f64::total_cmp);
    let (lo, hi) = (starts[flood / 10], starts[flood * 9 / 10]);
    let achieved = (flood * 8 / 10) as f64 / (hi - lo);
    let quiet_p99 = p99(&quiet_results);
    let admission_steps: Vec<_> = noisy_results
        .iter()
        .filter_map(|r| r.steps.iter().find(|s| s.kind == "admission"))
        .collect();
    let throttled = admission_steps.len();
    assert!(
        admission_steps.iter().all(|s| s.throttled_ms > 0),
        "a held-back job's admission step says how long it waited (throttled_ms)"
    );
    eprintln!(
        "noisy: {flood} jobs published in {published_in:?} (limit {rps}/s over 3 replicas), achieved {achieved:.1}/s, {throttled} recorded as throttled; \
         quiet p99: {quiet_p99} ms alongside, {baseline} ms alone"
    );
    assert!(
        (achieved - rps).abs() <= rps * 0.10,
        "achieved {achieved:.1}/s is not within 10% of the {rps}/s limit"
    );
    // Only the limiter's burst (one second's worth) and what the rate allowed while the flood
    // was being published run at once; every other job was held back and says so.
    let at_once = (rps * (1.0 + published_in.as_secs_f64())).ceil() as usize + 1;
    assert!(
        throttled >= flood - at_once,
        "{throttled} of {flood} jobs record their wait; at most {at_once} could run at once"
    );
    assert!(
        quiet_p99 <= 2 * baseline + 50,
        "quiet tenant's p99 {quiet_p99} ms is more than twice its {baseline} ms alone plus 50 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_budget_holds_across_replicas() {
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(5).await;
    let tenant = unique("thrifty");
    let monthly = unique("monthly");
    let (group, prefix) = (unique("budget-"), format!("{}:", unique("it")));
    let budget = 1.0;
    let tenants = format!(
        "{tenant}: {{budget_usd_per_day: {budget}}}\n  {monthly}: {{budget_usd_per_month: {budget}}}"
    );
    let limits = "{max_inflight_jobs: 256, drain_timeout_ms: 5000}";
    let services = replicas_of(
        3,
        replica_plan(
            &brokers,
            &group,
            &prefix,
            &llm.addr().to_string(),
            limits,
            &tenants,
        ),
    )
    .await;
    let outputs = collector(&brokers);
    let n = 120;
    publish(
        &brokers,
        JOBS_TOPIC,
        [&tenant, &monthly].into_iter().flat_map(|t| {
            (0..n).map(move |i| {
                job(
                    &format!("{t}-{i}"),
                    t,
                    "please summarise my last three invoices",
                )
            })
        }),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(2 * n, STALL, |_| {}).await, 2 * n);
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let results = results_of(&all, &tenant);
    let spent: f64 = results.iter().map(|r| r.usage.cost_usd).sum();
    let most = results.iter().map(|r| r.usage.cost_usd).fold(0.0, f64::max);
    let refused_of = |t: &str| -> Vec<_> {
        all.iter()
            .filter_map(|(c, _)| match c {
                Collected::DeadLetter(dl)
                    if dl.reason == DeadLetterReason::BudgetExceeded
                        && dl.tenant.as_deref() == Some(t) =>
                {
                    Some(dl)
                }
                _ => None,
            })
            .collect()
    };
    let refused = refused_of(&tenant);
    // What the tenant really spent, as every replica recorded it (including the first calls of
    // jobs whose later calls the budget refused).
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let day_key = format!(
        "{prefix}budget:{{{tenant}}}:d:{}",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    let recorded: f64 = redis::cmd("GET")
        .arg(&day_key)
        .query_async::<String>(&mut redis)
        .await
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "{} jobs finished within the budget (their results: ${spent:.4}; recorded spend ${recorded:.4} of ${budget}), {} refused; costliest job ${most:.4}",
        results.len(),
        refused.len()
    );
    // A job reserves its worst case before its first call, so the budget is never overrun
    // and a refused job has made no call: everything recorded was paid for by a result.
    assert!(
        recorded <= budget,
        "recorded spend ${recorded:.4}: over the ${budget} budget"
    );
    assert!(
        (recorded - spent).abs() < 1e-9,
        "recorded spend ${recorded:.6} is what the results cost (${spent:.6})"
    );
    assert!(
        !results.is_empty() && !refused.is_empty(),
        "the budget ran out part way"
    );
    assert_eq!(
        results.len() + refused.len(),
        n,
        "every job is a result or a budget dead letter"
    );
    // The reason a person can act on: who, what was spent of which budget, what the job
    // would have cost.
    assert!(
        refused[0].error.contains(&tenant)
            && refused[0].error.contains("of its $1.0000 budget today")
            && refused[0].error.contains("may cost up to $"),
        "{}",
        refused[0].error
    );

    // The monthly budget holds the same way, on its own key.
    let month_results = results_of(&all, &monthly);
    let month_spent: f64 = month_results.iter().map(|r| r.usage.cost_usd).sum();
    let month_refused = refused_of(&monthly);
    let month_key = format!(
        "{prefix}budget:{{{monthly}}}:m:{}",
        chrono::Utc::now().format("%Y-%m")
    );
    let month_recorded: f64 = redis::cmd("GET")
        .arg(&month_key)
        .query_async::<String>(&mut redis)
        .await
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "monthly: {} jobs finished (${month_spent:.4}; recorded ${month_recorded:.4} of ${budget}), {} refused",
        month_results.len(),
        month_refused.len()
    );
    assert!(
        month_recorded <= budget,
        "${month_recorded:.4} over the monthly budget"
    );
    assert!((month_recorded - month_spent).abs() < 1e-9);
    assert!(!month_results.is_empty() && !month_refused.is_empty());
    assert_eq!(month_results.len() + month_refused.len(), n);
    assert!(
        month_refused[0].error.contains("this month"),
        "{}",
        month_refused[0].error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_overtake_low_ones_under_saturation() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(15).await;
    let (group, prefix) = (unique("prio-"), format!("{}:", unique("it")));
    let limits = "{max_inflight_jobs: 512, max_running_jobs: 2, drain_timeout_ms: 5000}";
    let plan = replica_plan(
        &brokers,
        &group,
        &prefix,
        &llm.addr().to_string(),
        limits,
        "default: {}",
    );
    let services = replicas(vec![plan]).await;
    let outputs = collector(&brokers);
    let job_with = |id: String, priority: &str| {
        serde_json::json!({"id": id, "tenant": "acme", "priority": priority, "input": {"text": "hello"}})
            .to_string()
            .into_bytes()
    };
    let (low, high) = (200, 20);
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..low).map(|i| job_with(format!("low-{i}"), "low")),
    )
    .await
    .unwrap();
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..high).map(|i| job_with(format!("high-{i}"), "high")),
    )
    .await
    .unwrap();
    assert_eq!(
        outputs.wait_for(low + high, STALL, |_| {}).await,
        low + high
    );
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    // In the order the jobs finished (not the order their results arrived from the results
    // topic's partitions).
    let mut finished: Vec<&JobResult> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) => Some(r),
            _ => None,
        })
        .collect();
    finished.sort_by_key(|r| r.completed_at);
    let order: Vec<&str> = finished.iter().map(|r| r.job_id.as_str()).collect();
    let last_high = order
        .iter()
        .rposition(|id| id.starts_with("high-"))
        .unwrap();
    let lows_after = order[last_high..]
        .iter()
        .filter(|id| id.starts_with("low-"))
        .count();
    eprintln!("the last high-priority job finished at position {last_high}; {lows_after} low-priority jobs after it");
    assert!(
        lows_after >= low * 9 / 10,
        "high-priority jobs published after {low} low ones finished before at least nine in ten of them ({lows_after} after)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_throttled_costs_no_provider_call() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(5).await;
    let tenant = unique("slow");
    let (group, prefix) = (unique("dl-"), format!("{}:", unique("it")));
    let limits = "{max_inflight_jobs: 256, drain_timeout_ms: 5000}";
    let tenants = format!("{tenant}: {{rps: 2}}");
    let plan = replica_plan(
        &brokers,
        &group,
        &prefix,
        &llm.addr().to_string(),
        limits,
        &tenants,
    );
    let services = replicas(vec![plan]).await;
    let outputs = collector(&brokers);
    let n = 30;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| {
            serde_json::json!({"id": format!("{tenant}-{i}"), "tenant": tenant, "ttl_ms": 2000, "input": {"text": "hi"}})
                .to_string()
                .into_bytes()
        }),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let finished = results_of(&all, &tenant).len();
    let expired = all
        .iter()
        .filter(|(c, _)| matches!(c, Collected::DeadLetter(dl) if dl.reason == DeadLetterReason::DeadlineExceeded))
        .count();
    eprintln!("{finished} finished within their deadline, {expired} expired while throttled; {} provider calls", llm.stats().requests());
    assert_eq!(finished + expired, n);
    assert!(
        expired >= n / 2,
        "most jobs cannot get through 2/s within 2 s"
    );
    // A job admitted just before its deadline may still expire in its pipeline, before its
    // first call or between its two; those say so. Every job that expired while held back by
    // the limit made no call at all: the only calls beyond the finished jobs' two each are
    // those admitted jobs' (at most one each).
    let expired_after_admission = all
        .iter()
        .filter(|(c, _)| {
            matches!(c, Collected::DeadLetter(dl)
                if dl.reason == DeadLetterReason::DeadlineExceeded && !dl.error.contains("waited for admission"))
        })
        .count();
    assert!(
        expired_after_admission <= 2,
        "{expired_after_admission} expired after admission"
    );
    let calls = llm.stats().requests();
    assert!(
        calls >= 2 * finished as u64 && calls <= 2 * finished as u64 + expired_after_admission as u64,
        "jobs that expired while throttled never reached the provider: {calls} calls for {finished} finished jobs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_moves_jobs_to_the_pipelines_budget_fallback_model() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(5).await;
    let tenant = unique("frugal");
    let (group, prefix) = (unique("bf-"), format!("{}:", unique("it")));
    let limits = "{max_inflight_jobs: 256, drain_timeout_ms: 5000}";
    let tenants = format!("{tenant}: {{budget_usd_per_day: 0.5}}");
    let text = replica_config(&brokers, &group, &prefix, &llm.addr().to_string(), limits, &tenants)
        .replace(
            "models:\n",
            "models:\n  free: {provider: llm, model: local-free, price: {input: 0, output: 0}, timeout_ms: 5000}\n",
        )
        .replace("  support:\n    steps:", "  support:\n    budget_fallback: free\n    steps:");
    let plan = config::load_str(&text, "test config", std::iter::empty()).unwrap();
    let services = replicas(vec![plan]).await;
    let outputs = collector(&brokers);
    let n = 40;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("{tenant}-{i}"), &tenant, "summarise my invoices")),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    let results = results_of(&all, &tenant);
    assert_eq!(
        results.len(),
        n,
        "no job dead-lettered: the fallback model answered"
    );
    let on_fallback = results
        .iter()
        .filter(|r| {
            r.steps
                .iter()
                .any(|s| s.model.as_deref() == Some("local-free"))
        })
        .collect::<Vec<_>>();
    let spent: f64 = results.iter().map(|r| r.usage.cost_usd).sum();
    eprintln!(
        "{} of {n} jobs used the budget fallback; spent ${spent:.4} of $0.5",
        on_fallback.len()
    );
    assert!(!on_fallback.is_empty(), "the budget ran out part way");
    assert!(on_fallback
        .iter()
        .all(|r| r.status == switchyard::wire::ResultStatus::Degraded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cjk_jobs_on_three_replicas_never_spend_past_the_budget() {
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(20).await;
    let tenant = unique("cjk");
    let (group, prefix) = (unique("budget-cjk-"), format!("{}:", unique("it")));
    let budget = 1.0;
    let tenants = format!("{tenant}: {{budget_usd_per_day: {budget}}}");
    // 50 jobs at once per replica.
    let limits = "{max_inflight_jobs: 50, max_running_jobs: 50, drain_timeout_ms: 5000}";
    let services = replicas_of(
        3,
        replica_plan(
            &brokers,
            &group,
            &prefix,
            &llm.addr().to_string(),
            limits,
            &tenants,
        ),
    )
    .await;
    let outputs = collector(&brokers);
    // About one token a character, where a chars/4 estimate would see a quarter of that.
    let text = "我上个月的账单被重复收费了，请尽快退还其中一笔付款。".repeat(6);
    let n = 150;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("{tenant}-{i}"), &tenant, &text)),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    let results = results_of(&all, &tenant);
    let spent: f64 = results.iter().map(|r| r.usage.cost_usd).sum();
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let day_key = format!(
        "{prefix}budget:{{{tenant}}}:d:{}",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    let recorded: f64 = redis::cmd("GET")
        .arg(&day_key)
        .query_async::<String>(&mut redis)
        .await
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "{} of {n} CJK jobs finished; results ${spent:.4}, recorded spend ${recorded:.4} of ${budget}",
        results.len()
    );
    assert!(
        recorded <= budget + 1e-9,
        "recorded spend ${recorded:.4} is over the ${budget} budget"
    );
    assert!(!results.is_empty(), "the budget paid for some jobs");
    assert!(recorded >= spent - 1e-9, "every result's cost was recorded");
    assert!(
        recorded <= spent + 1e-9,
        "no job was refused half-way: all ${recorded:.4} spent is in results (${spent:.4})"
    );
    let refused = all.iter().find_map(|(c, _)| match c {
        Collected::DeadLetter(d) if d.reason == DeadLetterReason::BudgetExceeded => Some(d),
        _ => None,
    });
    let refused = refused.expect("the budget ran out");
    assert!(
        refused.error.contains("no provider was called") && refused.attempts == 0,
        "{}",
        refused.error
    );
}

/// Publishes `n` jobs of `tenant` with distinct texts of about `words` words.
async fn flood(brokers: &str, tenant: &str, n: usize, words: usize) {
    let filler =
        "my order arrived late and the invoice shows the wrong amount ".repeat(words / 11 + 1);
    publish(
        brokers,
        JOBS_TOPIC,
        (0..n).map(|i| {
            job(
                &format!("{tenant}-{i}"),
                tenant,
                &format!("ticket {i}: {filler}"),
            )
        }),
    )
    .await
    .unwrap();
}

/// A provider's `rpm` and a tenant's `tokens_per_min` are each held across two replicas: the
/// provider never sees more than the limit's burst (six seconds' worth) plus the rate over the
/// time the calls took. Load can only slow the calls down, so the bound cannot flake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_rpm_and_tenant_tokens_per_min_hold_across_replicas() {
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let limits = "{drain_timeout_ms: 5000}";
    let outputs = collector(&brokers);

    // The provider at 1,200 requests/min (20/s, a burst of 120): 200 calls.
    let llm = mock_llm(1).await;
    let (group, prefix) = (unique("rpm-"), format!("{}:", unique("it")));
    let text = replica_config(
        &brokers,
        &group,
        &prefix,
        &llm.addr().to_string(),
        limits,
        "default: {}",
    )
    .replace(
        "retry: {max_attempts: 3",
        "limits: {rpm: 1200}, retry: {max_attempts: 3",
    );
    let plan = config::load_str(&text, "test config", std::iter::empty()).unwrap();
    let services = replicas_of(2, plan).await;
    let n = 100;
    flood(&brokers, "acme", n, 5).await;
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    for s in services {
        s.stop().await;
    }
    // After its burst the limiter admits one call per 50 ms. Measured on the provider's last
    // 60 answers, well past the burst (the burst's own answers lag their admissions by the
    // time 120 new connections take, so the first answer cannot mark its start).
    let mut at: Vec<f64> = llm.log().iter().map(|e| e.at_ms).collect();
    at.sort_by(f64::total_cmp);
    assert_eq!(at.len(), 2 * n);
    let tail = (at[at.len() - 1] - at[at.len() - 60]) / 1000.0;
    eprintln!(
        "rpm 1200: the last 60 of {} calls took {tail:.2} s (at least 2.95 s at 20/s)",
        at.len()
    );
    assert!(
        tail >= 59.0 * 0.05 - 0.1,
        "60 calls in {tail:.2} s: faster than 1,200/min"
    );

    // A tenant at 120,000 tokens/min (2,000/s, a burst of 12,000): each call counts its prompt
    // and max_tokens (64) up front, then what it really used.
    // A cluster of its own: a new group on the first one would read the first part's jobs.
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let outputs = collector(&brokers);
    let llm = mock_llm(1).await;
    let tenant = unique("tokens");
    let (group, prefix) = (unique("tpm-"), format!("{}:", unique("it")));
    let tenants = format!("{tenant}: {{tokens_per_min: 120000}}");
    let services = replicas_of(
        2,
        replica_plan(
            &brokers,
            &group,
            &prefix,
            &llm.addr().to_string(),
            limits,
            &tenants,
        ),
    )
    .await;
    flood(&brokers, &tenant, n, 80).await;
    assert_eq!(outputs.wait_for(n, STALL, |_| {}).await, n);
    for s in services {
        s.stop().await;
    }
    let all = outputs.snapshot();
    let results = results_of(&all, &tenant);
    assert_eq!(results.len(), n);
    // Past the burst, the limiter admits 2,000 tokens a second. Measured call by call on the
    // provider's last 100 answers (single file by then): what they used, less the first one's,
    // over the time they took; 10% for reservations being estimates (prompt + max_tokens)
    // corrected after each call.
    let log = llm.log();
    let used: u64 = log.iter().map(|e| e.tokens).sum();
    assert!(
        used > 2 * 12_000,
        "the workload ({used} tokens) must be well past the burst"
    );
    let mut answers: Vec<(f64, u64)> = log.iter().map(|e| (e.at_ms, e.tokens)).collect();
    answers.sort_by(|a, b| a.0.total_cmp(&b.0));
    let late = &answers[answers.len() - 100..];
    let late_used = late[1..].iter().map(|(_, t)| *t).sum::<u64>() as f64;
    let late_span = (late[late.len() - 1].0 - late[0].0) / 1000.0;
    eprintln!("tokens_per_min 120000: {used} tokens in all; the last 100 calls used {late_used} in {late_span:.2} s");
    assert!(
        late_used <= 2_000.0 * late_span * 1.1,
        "{late_used} tokens in {late_span:.2} s: over 120,000/min"
    );
}

/// Tenant weights share the run slots end to end: with two slots and both tenants' queues full,
/// a tenant of weight 2 finishes twice as many jobs as one of weight 1 while both have work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_slots_are_shared_by_tenant_weight() {
    let kafka = kafka();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(10).await;
    let plan = TestConfig::kafka(&brokers)
        .llm(llm.addr())
        .set("limits", "{max_running_jobs: 2, drain_timeout_ms: 5000}")
        .set("tenants", "heavy: {weight: 2}\n  light: {weight: 1}")
        .plan();
    let outputs = collector(&brokers);
    let service = Service::start(plan, memory());
    service.wait_ready().await;
    let n = 300;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).flat_map(|i| {
            [
                job(&format!("heavy-{i}"), "heavy", &format!("question {i}")),
                job(&format!("light-{i}"), "light", &format!("question {i}")),
            ]
        }),
    )
    .await
    .unwrap();
    assert_eq!(outputs.wait_for(2 * n, STALL, |_| {}).await, 2 * n);
    service.stop().await;
    let all = outputs.snapshot();
    assert_each_job_once(&all, 2 * n);
    let mut finished: Vec<&JobResult> = all
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) => Some(r),
            _ => None,
        })
        .collect();
    finished.sort_by_key(|r| r.completed_at);
    // While both had work: the first 300 to finish (the heavy tenant's 300 are gone by then
    // only if it got more than its share).
    let heavy = finished[..n].iter().filter(|r| r.tenant == "heavy").count();
    let share = heavy as f64 / n as f64;
    eprintln!("of the first {n} jobs to finish, {heavy} were the weight-2 tenant's ({share:.2}; 2/3 expected)");
    assert!(
        (share - 2.0 / 3.0).abs() <= 0.07,
        "the weight-2 tenant got {share:.2} of the run slots, not 2/3"
    );
}
