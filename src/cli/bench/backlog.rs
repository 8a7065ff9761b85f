//! `switchyard bench --mode backlog`: resident memory against a deep backlog.
//!
//! A backlog of `--jobs` waits in the broker (the in-process Kafka cluster, or the NATS server
//! with `--shape nats`) while the service works through it against a slow mock provider for
//! `--duration-s`. Resident memory is sampled throughout;
//! the figure that matters is how much it grows once the backlog is in place. The same run is
//! repeated first with a tenth of the backlog, as the baseline: if memory were proportional to
//! the backlog, the full run would grow ten times as much.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use super::{BenchArgs, Workload};
use switchyard::config::{self, Topics};
use switchyard::testkit::{publish, EmbeddedKafka, OutputCollector, DEMO_CONFIG};

#[derive(Debug, Serialize)]
pub struct BacklogRun {
    backlog: usize,
    rss_after_publish_mb: f64,
    rss_peak_mb: f64,
    growth_mb: f64,
    finished_in_window: usize,
}

impl BacklogRun {
    fn new(backlog: usize, rss_after_publish: f64, peak: f64, finished: usize) -> Self {
        let round = |x: f64| (x * 10.0).round() / 10.0;
        Self {
            backlog,
            rss_after_publish_mb: round(rss_after_publish),
            rss_peak_mb: round(peak),
            growth_mb: round((peak - rss_after_publish).max(0.0)),
            finished_in_window: finished,
        }
    }
}

#[derive(Debug, Serialize)]
struct BacklogReport {
    mode: &'static str,
    shape: super::Shape,
    inflight: usize,
    provider_latency_ms: u64,
    duration_s: u64,
    baseline: BacklogRun,
    full: BacklogRun,
    /// Growth with the full backlog over growth with a tenth of it (1.0: independent of it).
    growth_ratio_vs_baseline: f64,
}

/// Resident set size of this process in MiB, from /proc (Linux); zero elsewhere.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.jobs >= 10,
        "--jobs must be at least 10 in backlog mode"
    );
    let mock = super::MockProcess::start(args.provider_latency_ms).await?;
    let runs = async {
        let baseline = run_for(args, args.jobs / 10, &mock.base_url).await?;
        let full = run_for(args, args.jobs, &mock.base_url).await?;
        anyhow::Ok((baseline, full))
    }
    .await;
    mock.stop().await;
    let (baseline, full) = runs?;
    let ratio = full.growth_mb / baseline.growth_mb.max(1.0);
    let report = BacklogReport {
        mode: "backlog",
        shape: args.shape,
        inflight: args.inflight,
        provider_latency_ms: args.provider_latency_ms,
        duration_s: args.duration_s,
        growth_ratio_vs_baseline: (ratio * 100.0).round() / 100.0,
        baseline,
        full,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "switchyard bench (backlog, {:?} shape): {} in flight, provider latency {} ms, {} s per run",
            report.shape,
            report.inflight, report.provider_latency_ms, report.duration_s
        );
        for run in [&report.baseline, &report.full] {
            println!(
                "  backlog {:>8}: RSS {:.1} MiB after publishing, peak {:.1} MiB while working (+{:.1} MiB), {} jobs finished",
                run.backlog, run.rss_after_publish_mb, run.rss_peak_mb, run.growth_mb, run.finished_in_window
            );
        }
        println!(
            "  growth with the full backlog / growth with a tenth of it = {:.2} (memory does not follow the backlog when this stays near 1)",
            report.growth_ratio_vs_baseline
        );
    }
    Ok(())
}

async fn run_for(args: &BenchArgs, backlog: usize, llm: &str) -> anyhow::Result<BacklogRun> {
    match args.shape {
        super::Shape::Kafka => one_run(args, backlog, llm).await,
        super::Shape::Nats => {
            let (rss, peak, finished) = super::nats::backlog_run(args, backlog, llm).await?;
            Ok(BacklogRun::new(backlog, rss, peak, finished))
        }
    }
}

async fn one_run(args: &BenchArgs, backlog: usize, llm: &str) -> anyhow::Result<BacklogRun> {
    let topics = Topics {
        results: "backlog.results".into(),
        review: "backlog.review".into(),
        dlq: "backlog.dlq".into(),
    };
    let kafka = EmbeddedKafka::start("backlog.jobs", &topics, 6)?;
    let brokers = kafka.bootstrap_servers();
    let mut workload = Workload::new();
    publish(
        &brokers,
        "backlog.jobs",
        (0..backlog).map(|i| workload.job(i).payload),
    )
    .await?;
    let overrides = [
        ("SWITCHYARD__SOURCE__BROKERS", brokers.clone()),
        ("SWITCHYARD__SOURCE__TOPIC", "backlog.jobs".to_owned()),
        (
            "SWITCHYARD__SOURCE__GROUP",
            format!("backlog-{:x}", rand::random::<u32>()),
        ),
        ("SWITCHYARD__SINK__BROKERS", brokers.clone()),
        (
            "SWITCHYARD__SINK__TOPICS",
            "{results: backlog.results, review: backlog.review, dlq: backlog.dlq}".to_owned(),
        ),
        (
            "SWITCHYARD__PROVIDERS__LOCAL",
            format!("{{kind: openai, base_url: \"{llm}\"}}"),
        ),
        (
            "SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS",
            args.inflight.to_string(),
        ),
    ];
    let env = overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone()));
    let plan = config::load_str(DEMO_CONFIG, "embedded config/demo.yaml (bench)", env)?;
    let collector = OutputCollector::start(&brokers, &topics)?;
    let (rss_after_publish, peak) = work_window(args, plan).await?;
    let finished = collector.len();
    collector.stop().await;
    Ok(BacklogRun::new(backlog, rss_after_publish, peak, finished))
}

/// Runs the service on `plan` for `--duration-s` once it is ready, sampling resident memory:
/// (RSS before it started, peak RSS while it worked).
pub(super) async fn work_window(
    args: &BenchArgs,
    plan: switchyard::config::Plan,
) -> anyhow::Result<(f64, f64)> {
    let rss_before = rss_mb();
    let (service, health, shutdown) = super::start_service(plan).await?;
    // The window starts once the consumer has joined its group.
    let joined = Instant::now() + Duration::from_secs(30);
    while !health.is_ready() && Instant::now() < joined {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window = Instant::now() + Duration::from_secs(args.duration_s);
    let mut peak = rss_before;
    while Instant::now() < window {
        peak = peak.max(rss_mb());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shutdown.cancel();
    service.await.context("bench service task")??;
    Ok((rss_before, peak))
}
