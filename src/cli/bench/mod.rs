//! `switchyard bench`: the service under load through the real Kafka protocol (librdkafka's
//! in-process cluster) and the mock provider at a fixed latency, so every figure is switchyard's
//! own cost.
//!
//! * `drain`: a backlog of `--jobs` is drained; throughput is compared with a bare loop measured
//!   in the same run (consume, two provider POSTs, produce, store offset: the unavoidable I/O of
//!   a job, nothing else), as a ratio.
//! * `rate`: jobs are published at `--rate` per second; end-to-end latency (publish to result
//!   completed) and orchestration overhead (end-to-end minus the provider's own latency for the
//!   calls the job made) from HDR histograms.
//! * `backlog`: resident memory while a deep backlog waits behind a slow provider, against a
//!   run with a tenth of the backlog (see [`backlog`]).

mod backlog;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use switchyard::config::{self, Faults, Latency, MockSettings, Topics};
use switchyard::provider::mock::MockServer;
use switchyard::testkit::{publish, Collected, EmbeddedKafka, OutputCollector, DEMO_CONFIG};

#[derive(Debug, Clone, Copy, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Drain,
    Rate,
    /// Resident memory with a deep backlog behind a slow provider.
    Backlog,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "drain")]
    pub mode: Mode,
    /// Jobs to run.
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Jobs per second in rate mode.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// The mock provider's fixed latency per call.
    #[arg(long, default_value_t = 200)]
    pub provider_latency_ms: u64,
    /// Jobs in flight (switchyard's limits.max_inflight_jobs and max_running_jobs, and the bare
    /// loop's bound).
    #[arg(long, default_value_t = 512)]
    pub inflight: usize,
    /// Backlog mode: how long each run works through its backlog.
    #[arg(long, default_value_t = 20)]
    pub duration_s: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    mode: Mode,
    jobs: usize,
    provider_latency_ms: u64,
    inflight: usize,
    throughput_jobs_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_jobs_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_vs_baseline: Option<f64>,
    latency_ms: Percentiles,
    overhead_ms: Percentiles,
    process_cpu_ms_per_job: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_process_cpu_ms_per_job: Option<f64>,
    lost: usize,
    duplicated: usize,
}

/// CPU time (user + system) this process has used, from /proc (Linux); zero elsewhere.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn micros_now() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0)
}

fn bench_job(i: usize) -> Vec<u8> {
    let tenants = ["acme", "globex", "initech"];
    json!({"id": format!("b-{i:07}"), "tenant": tenants[i % 3], "pipeline": "support",
           "input": {"text": format!("My invoice {i} lists a plan I cancelled; please check the charge.")},
           "metadata": {"sent_us": micros_now()}})
    .to_string()
    .into_bytes()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.jobs > 0, "--jobs must be at least 1");
    if let Mode::Backlog = args.mode {
        backlog::run(&args).await?;
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be positive"
    );
    let mock = start_mock(args.provider_latency_ms).await?;
    let topics = Topics {
        results: "bench.results".into(),
        review: "bench.review".into(),
        dlq: "bench.dlq".into(),
    };
    let kafka = EmbeddedKafka::start("bench.jobs", &topics, 6)?;
    let brokers = kafka.bootstrap_servers();
    let llm = format!("http://{}/v1", mock.addr());

    let (throughput, latency, overhead, cpu, outputs) =
        run_switchyard(&args, &brokers, &topics, &llm).await?;
    let (lost, duplicated) = account(&outputs, args.jobs);
    let (baseline, baseline_cpu) = match args.mode {
        Mode::Drain => {
            let (jobs_per_s, cpu) =
                bare_loop(&kafka, &brokers, &llm, args.jobs, args.inflight).await?;
            (Some(jobs_per_s), Some(cpu))
        }
        Mode::Rate | Mode::Backlog => (None, None),
    };
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let report = Report {
        mode: args.mode,
        jobs: args.jobs,
        provider_latency_ms: args.provider_latency_ms,
        inflight: args.inflight,
        throughput_jobs_per_s: round(throughput),
        baseline_jobs_per_s: baseline.map(round),
        ratio_vs_baseline: baseline.map(|b| (throughput / b * 1000.0).round() / 1000.0),
        latency_ms: Percentiles::of(&latency),
        overhead_ms: Percentiles::of(&overhead),
        process_cpu_ms_per_job: (cpu * 1000.0).round() / 1000.0,
        baseline_process_cpu_ms_per_job: baseline_cpu.map(|c| (c * 1000.0).round() / 1000.0),
        lost,
        duplicated,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if lost == 0 && duplicated == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

type Measured = (
    f64,
    Histogram<u64>,
    Histogram<u64>,
    f64,
    Vec<(Collected, Value)>,
);

async fn run_switchyard(
    args: &BenchArgs,
    brokers: &str,
    topics: &Topics,
    llm: &str,
) -> anyhow::Result<Measured> {
    let overrides = [
        ("SWITCHYARD__SOURCE__BROKERS", brokers.to_owned()),
        ("SWITCHYARD__SOURCE__TOPIC", "bench.jobs".to_owned()),
        (
            "SWITCHYARD__SOURCE__GROUP",
            format!("bench-{:x}", rand::random::<u32>()),
        ),
        ("SWITCHYARD__SINK__BROKERS", brokers.to_owned()),
        (
            "SWITCHYARD__SINK__TOPICS",
            format!(
                "{{results: {}, review: {}, dlq: {}}}",
                topics.results, topics.review, topics.dlq
            ),
        ),
        (
            "SWITCHYARD__PROVIDERS__LOCAL",
            format!("{{kind: openai, base_url: \"{llm}\"}}"),
        ),
        (
            "SWITCHYARD__LIMITS__MAX_INFLIGHT_JOBS",
            args.inflight.to_string(),
        ),
        (
            "SWITCHYARD__LIMITS__MAX_RUNNING_JOBS",
            args.inflight.to_string(),
        ),
        (
            "SWITCHYARD__POOLS",
            format!(
                "{{classify: {0}, route: {0}, generate: {0}}}",
                args.inflight
            ),
        ),
    ];
    let env = overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone()));
    let plan = config::load_str(DEMO_CONFIG, "embedded config/demo.yaml (bench)", env)?;
    let collector = OutputCollector::start(brokers, topics)?;
    let (service, health, shutdown) = start_service(plan).await?;

    let stall = Duration::from_secs(60);
    let cpu_before;
    let started;
    match args.mode {
        // Backlog mode has its own runner; treat it as a drain if it ever gets here.
        Mode::Drain | Mode::Backlog => {
            publish(brokers, "bench.jobs", (0..args.jobs).map(bench_job)).await?;
            cpu_before = process_cpu();
            started = Instant::now();
        }
        Mode::Rate => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !health.is_ready() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the service did not become ready"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Readiness comes with the group join; give the assignment a moment to settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
            cpu_before = process_cpu();
            started = Instant::now();
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("linger.ms", "0")
                .create()?;
            let every = Duration::from_secs_f64(1.0 / args.rate);
            let sends = TaskTracker::new();
            for i in 0..args.jobs {
                tokio::time::sleep_until((started + every.mul_f64(i as f64)).into()).await;
                let producer = producer.clone();
                sends.spawn(async move {
                    let payload = bench_job(i);
                    let key = i.to_string();
                    let record = FutureRecord::to("bench.jobs").key(&key).payload(&payload);
                    let _ = producer
                        .send(record, Timeout::After(Duration::from_secs(30)))
                        .await;
                });
            }
            sends.close();
            sends.wait().await;
        }
    }
    collector.wait_for(args.jobs, stall, |_| {}).await;
    let cpu = process_cpu().saturating_sub(cpu_before);
    shutdown.cancel();
    service.await.context("bench service task")??;
    let outputs = collector.snapshot();
    collector.stop().await;

    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut overhead = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut first, mut last) = (None, None);
    for (c, _) in &outputs {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            continue;
        };
        first = Some(
            first.map_or(r.received_at, |f: chrono::DateTime<chrono::Utc>| {
                f.min(r.received_at)
            }),
        );
        last = Some(
            last.map_or(r.completed_at, |l: chrono::DateTime<chrono::Utc>| {
                l.max(r.completed_at)
            }),
        );
        let Some(sent) = r
            .metadata
            .as_ref()
            .and_then(|m| m.get("sent_us"))
            .and_then(Value::as_u64)
        else {
            continue;
        };
        let done = u64::try_from(r.completed_at.timestamp_micros()).unwrap_or(0);
        let e2e = done.saturating_sub(sent).max(1);
        let calls: u64 = r
            .steps
            .iter()
            .filter(|s| s.provider.is_some())
            .map(|s| u64::from(s.attempts))
            .sum();
        let provider = calls * args.provider_latency_ms * 1000;
        latency.record(e2e)?;
        overhead.record(e2e.saturating_sub(provider).max(1))?;
    }
    let span = match (first, last) {
        (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::ZERO),
        _ => started.elapsed(),
    };
    let throughput = outputs.len() as f64 / span.as_secs_f64().max(1e-3);
    let cpu_per_job = cpu.as_secs_f64() * 1000.0 / args.jobs as f64;
    Ok((throughput, latency, overhead, cpu_per_job, outputs))
}

/// The service on `plan` in the background: its task, its health and the token that stops it.
/// The mock provider every bench mode calls: a fixed latency, no faults, a fixed seed.
async fn start_mock(latency_ms: u64) -> anyhow::Result<MockServer> {
    Ok(MockServer::start(
        "127.0.0.1:0",
        MockSettings {
            latency: Latency::Fixed { ms: latency_ms },
            faults: Faults::default(),
            seed: Some(7),
            ..MockSettings::default()
        },
    )
    .await?)
}

async fn start_service(
    plan: config::Plan,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    std::sync::Arc<switchyard::telemetry::health::Health>,
    CancellationToken,
)> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let telemetry = switchyard::telemetry::Telemetry::new().context("metrics")?;
    let health = telemetry.health.clone();
    let state = switchyard::state::StateStore::open(&plan.state).await?;
    let service = tasks.spawn(switchyard::app::run_with(
        plan,
        state,
        telemetry,
        shutdown.clone(),
    ));
    tasks.close();
    Ok((service, health, shutdown))
}

/// (lost, duplicated): jobs without a result, and results beyond one per job.
fn account(outputs: &[(Collected, Value)], jobs: usize) -> (usize, usize) {
    let mut ids: Vec<&str> = outputs
        .iter()
        .filter_map(|(c, _)| match c {
            Collected::Result(r) | Collected::Review(r) => Some(r.job_id.as_str()),
            _ => None,
        })
        .collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    (jobs.saturating_sub(ids.len()), total - ids.len())
}

/// The baseline: consume, two provider POSTs, produce, store the offset. Nothing else.
async fn bare_loop(
    kafka: &EmbeddedKafka,
    brokers: &str,
    llm: &str,
    jobs: usize,
    inflight: usize,
) -> anyhow::Result<(f64, f64)> {
    kafka.cluster().create_topic("bare.jobs", 6, 1)?;
    kafka.cluster().create_topic("bare.results", 3, 1)?;
    publish(brokers, "bare.jobs", (0..jobs).map(bench_job)).await?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bare-{:x}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .create()?;
    consumer.subscribe(&["bare.jobs"])?;
    let consumer = Arc::new(consumer);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()?;
    let http = reqwest::Client::new();
    let endpoint = format!("{llm}/chat/completions");
    let permits = Arc::new(Semaphore::new(inflight));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks = TaskTracker::new();
    let mut started = None;
    let mut cpu_before = Duration::ZERO;
    for _ in 0..jobs {
        let permit = permits.clone().acquire_owned().await?;
        let message = consumer.recv().await?;
        if started.is_none() {
            started = Some(Instant::now());
            cpu_before = process_cpu();
        }
        let (payload, partition, offset) = (
            message.payload().unwrap_or_default().to_vec(),
            message.partition(),
            message.offset(),
        );
        let (http, endpoint, producer, consumer, done) = (
            http.clone(),
            endpoint.clone(),
            producer.clone(),
            consumer.clone(),
            done.clone(),
        );
        tasks.spawn(async move {
            let job: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            let text = job.pointer("/input/text").and_then(Value::as_str).unwrap_or_default().to_owned();
            let mut answers = Vec::new();
            for prompt in [format!("Categories: billing, technical\n\n{text}"), text] {
                let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "max_tokens": 512});
                let Ok(response) = http.post(&endpoint).json(&body).send().await else { return };
                let Ok(value) = response.json::<Value>().await else { return };
                answers.push(value);
            }
            let result = json!({"job_id": job["id"], "output": answers.last().and_then(|a| a.pointer("/choices/0/message/content")).cloned()});
            let bytes = result.to_string();
            if producer.send(FutureRecord::<(), _>::to("bare.results").payload(&bytes), Timeout::After(Duration::from_secs(30))).await.is_ok() {
                let mut tpl = TopicPartitionList::new();
                if tpl.add_partition_offset("bare.jobs", partition, Offset::Offset(offset + 1)).is_ok() {
                    let _ = consumer.store_offsets(&tpl);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    let cpu = process_cpu().saturating_sub(cpu_before);
    let finished = done.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(
        finished == jobs,
        "the bare loop finished {finished} of {jobs} jobs"
    );
    Ok((
        jobs as f64 / elapsed.as_secs_f64().max(1e-3),
        cpu.as_secs_f64() * 1000.0 / jobs as f64,
    ))
}

fn print_report(r: &Report) {
    println!(
        "switchyard bench ({:?}): {} jobs, provider latency {} ms, {} in flight",
        r.mode, r.jobs, r.provider_latency_ms, r.inflight
    );
    println!("  throughput        {:.1} jobs/s", r.throughput_jobs_per_s);
    if let (Some(b), Some(ratio)) = (r.baseline_jobs_per_s, r.ratio_vs_baseline) {
        println!("  bare loop         {b:.1} jobs/s   (switchyard / bare loop = {ratio:.3})");
    }
    let p = |x: &Percentiles| {
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms",
            x.p50, x.p90, x.p99, x.max
        )
    };
    println!("  end-to-end        {}", p(&r.latency_ms));
    println!(
        "  overhead          {}   (end-to-end minus the provider's own latency)",
        p(&r.overhead_ms)
    );
    match r.baseline_process_cpu_ms_per_job {
        Some(b) => println!("  process CPU/job   {:.3} ms (bare loop {b:.3} ms; both include the in-process broker and mock)", r.process_cpu_ms_per_job),
        None => println!("  process CPU/job   {:.3} ms (includes the in-process broker and mock)", r.process_cpu_ms_per_job),
    }
    println!("  lost {}, duplicated {}", r.lost, r.duplicated);
}
