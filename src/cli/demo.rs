//! `switchyard demo`: the whole product in one process.
//!
//! Starts librdkafka's mock cluster (the real Kafka protocol, in-process), runs the service on
//! the embedded `config/demo.yaml` (the built-in mock provider), publishes a realistic workload
//! (several tenants, short and long texts, invalid payloads, duplicate idempotency keys), waits
//! until every message has its result or dead letter, and prints what happened. The publisher,
//! collector and workload are [`switchyard::testkit`]'s, which the integration tests use too.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use switchyard::testkit::{
    demo_plan, publish, topics_of, workload, Collected, EmbeddedKafka, OutputCollector, WorkItem,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Messages to publish (including the invalid payloads and duplicates mixed in).
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Give up when no output arrived for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub stall_timeout_s: u64,
    /// Use this config instead of the embedded one (its brokers are replaced by the mock cluster).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also write every output read back (results, review requests and dead letters, as the
    /// service wrote them) to this file, one JSON object per line, to inspect or check.
    #[arg(long)]
    pub outputs: Option<PathBuf>,
}

/// What the demo prints.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub jobs: usize,
    pub results: BTreeMap<&'static str, u64>,
    pub dead_letters: BTreeMap<&'static str, u64>,
    pub duplicates: u64,
    pub lost: u64,
    /// Valid jobs with more than one non-duplicate output (must be 0).
    pub double_processed: u64,
    pub throughput_jobs_per_s: f64,
    pub latency_ms: BTreeMap<&'static str, u64>,
    pub tokens: BTreeMap<&'static str, u64>,
    pub cost_usd: f64,
    pub elapsed_s: f64,
}

/// Tallies outputs against the workload that was published.
pub fn summarize(items: &[WorkItem], outputs: &[(Collected, Value)], elapsed: Duration) -> Summary {
    let mut results: BTreeMap<&'static str, u64> =
        [("ok", 0), ("degraded", 0), ("review", 0)].into();
    let mut dead_letters: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut duplicates = 0;
    let mut per_job: HashMap<&str, u64> = HashMap::new();
    let mut latencies = Vec::new();
    let mut span: Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = None;
    let (mut tokens_in, mut tokens_out, mut cost) = (0, 0, 0.0);
    for (collected, _) in outputs {
        match collected {
            Collected::Result(r) | Collected::Review(r) => {
                if r.duplicate {
                    duplicates += 1;
                    continue;
                }
                *results.entry(r.status.as_str()).or_default() += 1;
                *per_job.entry(&r.job_id).or_default() += 1;
                latencies.push(r.latency_ms);
                span = Some(match span {
                    None => (r.received_at, r.completed_at),
                    Some((a, b)) => (a.min(r.received_at), b.max(r.completed_at)),
                });
                tokens_in += r.usage.input_tokens;
                tokens_out += r.usage.output_tokens;
                cost += r.usage.cost_usd;
            }
            Collected::DeadLetter(dl) => {
                if dl.duplicate {
                    duplicates += 1;
                    continue;
                }
                *dead_letters.entry(dl.reason.as_str()).or_default() += 1;
                if let Some(id) = &dl.job_id {
                    *per_job.entry(id).or_default() += 1;
                }
            }
            Collected::Unreadable { .. } => {}
        }
    }
    let mut lost = (items.len() as u64).saturating_sub(outputs.len() as u64);
    let mut double_processed = 0;
    let mut unique_valid: Vec<&str> = items
        .iter()
        .filter(|i| !i.duplicate)
        .filter_map(|i| i.valid_id.as_deref())
        .collect();
    unique_valid.sort_unstable();
    unique_valid.dedup();
    for id in unique_valid {
        match per_job.get(id).copied().unwrap_or(0) {
            0 => lost = lost.max(1),
            1 => {}
            _ => double_processed += 1,
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    // Throughput over the processing span (first job received to last result completed), so the
    // consumer group's start-up is not counted as processing time.
    let processing = span
        .and_then(|(a, b)| (b - a).to_std().ok())
        .map_or(secs, |d| d.as_secs_f64().max(1e-3));
    Summary {
        jobs: items.len(),
        results,
        dead_letters,
        duplicates,
        lost,
        double_processed,
        throughput_jobs_per_s: (outputs.len() as f64 / processing * 10.0).round() / 10.0,
        latency_ms: [("p50", pct(0.50)), ("p99", pct(0.99))].into(),
        tokens: [("input", tokens_in), ("output", tokens_out)].into(),
        cost_usd: (cost * 1e6).round() / 1e6,
        elapsed_s: (secs * 100.0).round() / 100.0,
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.jobs > 0, "--jobs must be at least 1");
    // The cluster's own config does not matter; topics come from the plan.
    let probe = demo_plan(args.config.as_ref(), "127.0.0.1:9")?;
    let (jobs_topic, topics) = topics_of(&probe)?;
    let kafka = EmbeddedKafka::start(&jobs_topic, &topics, 6)?;
    let brokers = kafka.bootstrap_servers();
    let plan = demo_plan(args.config.as_ref(), &brokers)?;
    let items = workload(args.jobs, plan.limits.max_job_bytes);

    let collector = OutputCollector::start(&brokers, &topics)?;
    let shutdown = CancellationToken::new();
    let service = TaskTracker::new();
    let service_done = service.spawn(switchyard::app::run(plan, shutdown.clone()));
    service.close();

    let bar = indicatif::ProgressBar::new(items.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} outputs  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    publish(
        &brokers,
        &jobs_topic,
        items.iter().map(|i| i.payload.clone()),
    )
    .await?;
    let seen = collector
        .wait_for(
            items.len(),
            Duration::from_secs(args.stall_timeout_s),
            |n| bar.set_position(n as u64),
        )
        .await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    // Let stray late outputs (there must be none) arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    let service_result = service_done.await;
    let outputs = collector.snapshot();
    collector.stop().await;
    drop(kafka);

    if let Some(path) = &args.outputs {
        let mut lines = String::new();
        for (_, raw) in &outputs {
            lines.push_str(&raw.to_string());
            lines.push('\n');
        }
        std::fs::write(path, lines)
            .map_err(|e| anyhow::anyhow!("cannot write --outputs {}: {e}", path.display()))?;
    }
    let summary = summarize(&items, &outputs, elapsed);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    match service_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => anyhow::bail!("the service failed: {e:#}"),
        Err(e) => anyhow::bail!("the service task failed: {e}"),
    }
    let extra = outputs.len().saturating_sub(items.len());
    let ok =
        summary.lost == 0 && summary.double_processed == 0 && extra == 0 && seen >= items.len();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(s: &Summary) {
    let line = |m: &BTreeMap<&str, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "switchyard demo: {} jobs in {:.2}s including start-up ({:.1} jobs/s while processing)",
        s.jobs, s.elapsed_s, s.throughput_jobs_per_s
    );
    println!("  results       {}", line(&s.results));
    println!(
        "  dead letters  {}",
        if s.dead_letters.is_empty() {
            "none".into()
        } else {
            line(&s.dead_letters)
        }
    );
    println!(
        "  duplicates    {} (answered from the idempotency store, no provider call)",
        s.duplicates
    );
    println!(
        "  latency       p50 {} ms, p99 {} ms",
        s.latency_ms["p50"], s.latency_ms["p99"]
    );
    println!(
        "  tokens        {} in, {} out; cost ${:.4}",
        s.tokens["input"], s.tokens["output"], s.cost_usd
    );
    let verdict = if s.lost == 0 && s.double_processed == 0 {
        "nothing lost, nothing processed twice"
    } else {
        "FAILED"
    };
    println!(
        "  lost          {} (double-processed {}): {verdict}",
        s.lost, s.double_processed
    );
}
