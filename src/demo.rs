//! `switchyard demo`: the whole product in one process.
//!
//! Starts librdkafka's mock cluster (the real Kafka protocol, in-process), runs the service on
//! the embedded `config/demo.yaml` (the built-in mock provider), publishes a realistic workload
//! (several tenants, short and long texts, invalid payloads, duplicate idempotency keys), waits
//! until every message has its result or dead letter, and prints what happened. The publisher
//! and collector here are also what the integration tests drive the service with.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Plan, SinkPlan, SourcePlan};
use crate::model::{DeadLetter, JobResult};

/// The embedded default configuration.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

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
}

/// One message of the workload and what it should produce.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub payload: Vec<u8>,
    /// The job id when the payload is a valid job.
    pub valid_id: Option<String>,
    /// Exact re-publication of an earlier item.
    pub duplicate: bool,
}

/// A realistic mixed workload of `n` messages (deterministic for a given `n`).
pub fn workload(n: usize, max_job_bytes: usize) -> Vec<WorkItem> {
    const TENANTS: [(&str, usize); 4] = [
        ("acme", 40),
        ("globex", 30),
        ("initech", 20),
        ("umbrella", 10),
    ];
    const SHORT: [&str; 8] = [
        "I was charged twice for order #{n}, please refund one of the payments.",
        "The mobile app crashes every time I upload a photo to ticket {n}.",
        "How do I reset my password? The reset email never arrives.",
        "Can I change the delivery address for order #{n}?",
        "Your invoice {n} lists a plan I cancelled last month.",
        "The export to CSV times out for workspaces with more than 10k rows.",
        "Please add my colleague to our team account.",
        "Is there a discount for annual billing?",
    ];
    const PARAGRAPH: &str = "We migrated our account last week and since then the dashboard shows \
        stale numbers, the API returns intermittent 502 errors for the reporting endpoints, and two \
        of our scheduled exports failed silently. We rely on these reports for our month-end close, \
        so this is blocking our finance team. We already tried clearing caches and regenerating API \
        keys. Could you look into what changed during the migration and tell us when it will be fixed? ";
    let mut items: Vec<WorkItem> = Vec::with_capacity(n);
    let weighted: Vec<&str> = TENANTS
        .iter()
        .flat_map(|(t, w)| std::iter::repeat_n(*t, *w))
        .collect();
    let mut valid_so_far: Vec<usize> = Vec::new();
    for i in 0..n {
        // Every 50th message is invalid (five kinds in turn), every 33rd repeats an earlier job.
        if i % 50 == 49 {
            let payload = match (i / 50) % 5 {
                0 => b"ticket 4821: charged twice {not json".to_vec(),
                1 => vec![0xff, 0xfe, b'{', 0x80, b'}'],
                2 => json!({"id": format!("bad-{i}"), "input": {"text": "no tenant"}}).to_string().into_bytes(),
                3 => json!({"id": format!("bad-{i}"), "tenant": "acme", "input": "not an object"}).to_string().into_bytes(),
                _ => json!({"id": format!("big-{i}"), "tenant": "acme", "input": {"text": "x".repeat(max_job_bytes + 10)}})
                    .to_string()
                    .into_bytes(),
            };
            items.push(WorkItem {
                payload,
                valid_id: None,
                duplicate: false,
            });
            continue;
        }
        if i % 33 == 32 && !valid_so_far.is_empty() {
            let earlier = valid_so_far[(i * 7) % valid_so_far.len()];
            let mut copy = items[earlier].clone();
            copy.duplicate = true;
            items.push(copy);
            continue;
        }
        let tenant = weighted[(i * 37) % weighted.len()];
        let text = if i % 10 == 3 {
            PARAGRAPH.repeat(2 + i % 3)
        } else {
            SHORT[(i * 13) % SHORT.len()].replace("{n}", &(4000 + i).to_string())
        };
        let id = format!("{tenant}-{i:06}");
        let priority = ["normal", "normal", "high", "low"][i % 4];
        let job = json!({
            "id": id, "tenant": tenant, "pipeline": "support",
            "input": {"text": text}, "priority": priority, "ttl_ms": 600_000,
            "user": format!("u-{}", i % 97), "metadata": {"seq": i}
        });
        valid_so_far.push(items.len());
        items.push(WorkItem {
            payload: job.to_string().into_bytes(),
            valid_id: Some(id),
            duplicate: false,
        });
    }
    items
}

/// Publishes payloads to `topic` (keyed by position so they spread over partitions) and waits
/// for every broker ack.
pub async fn publish(
    brokers: &str,
    topic: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.max.bytes", "10000000")
        .create()
        .context("creating the publisher")?;
    let results: Vec<_> = stream::iter(payloads.into_iter().enumerate())
        .map(|(i, payload)| {
            let producer = producer.clone();
            async move {
                let key = i.to_string();
                let record = FutureRecord::to(topic).key(&key).payload(&payload);
                producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        })
        .buffer_unordered(512)
        .collect()
        .await;
    for result in results {
        result.context("publishing a job")?;
    }
    Ok(())
}

/// Publishes `(subject, payload)` pairs through JetStream and waits for every publish ack.
pub async fn publish_nats(
    url: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let client = async_nats::connect(url)
        .await
        .context("connecting the publisher to NATS")?;
    let js = async_nats::jetstream::new(client);
    let acks: Vec<_> = stream::iter(messages)
        .map(|(subject, payload)| {
            let js = js.clone();
            async move {
                let ack = js
                    .publish(subject, payload.into())
                    .await
                    .map_err(anyhow::Error::from)?;
                ack.await.map(|_| ()).map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    acks.into_iter()
        .collect::<anyhow::Result<Vec<()>>>()
        .context("publishing a job to NATS")?;
    Ok(())
}

/// An output read back from the output topics.
#[derive(Debug, Clone)]
pub enum Collected {
    Result(JobResult),
    Review(JobResult),
    DeadLetter(DeadLetter),
    /// Bytes on an output topic that are not a valid output (never expected).
    Unreadable {
        topic: String,
        error: String,
    },
}

/// Outputs collected so far, shared with the reading task.
type Shared = Arc<Mutex<Vec<(Collected, Value)>>>;

/// Which output topic a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Result,
    Review,
    DeadLetter,
}

impl OutputKind {
    /// The kind of a topic (Kafka) or subject prefix (NATS, without the tenant token).
    pub fn of(topics: &config::Topics, topic: &str) -> Self {
        if topic == topics.dlq {
            OutputKind::DeadLetter
        } else if topic == topics.review {
            OutputKind::Review
        } else {
            OutputKind::Result
        }
    }
}

/// Reads one output message: typed, and as raw JSON.
pub fn parse_output(kind: OutputKind, topic: &str, payload: &[u8]) -> (Collected, Value) {
    let value: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let parsed = match kind {
        OutputKind::DeadLetter => serde_json::from_value(value.clone()).map(Collected::DeadLetter),
        OutputKind::Review => serde_json::from_value(value.clone()).map(Collected::Review),
        OutputKind::Result => serde_json::from_value(value.clone()).map(Collected::Result),
    };
    let collected = parsed.unwrap_or_else(|e| Collected::Unreadable {
        topic: topic.to_owned(),
        error: e.to_string(),
    });
    (collected, value)
}

fn push(sink: &Mutex<Vec<(Collected, Value)>>, kind: OutputKind, topic: &str, payload: &[u8]) {
    let output = parse_output(kind, topic, payload);
    sink.lock().unwrap_or_else(|e| e.into_inner()).push(output);
}

/// Reads every output topic in the background.
pub struct OutputCollector {
    outputs: Shared,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl OutputCollector {
    /// Reads the Kafka output topics from the beginning.
    pub fn start(brokers: &str, topics: &config::Topics) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("switchyard-collector-{:016x}", rand::random::<u64>()),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the output collector")?;
        consumer.subscribe(&[&topics.results, &topics.review, &topics.dlq])?;
        let (collector, sink, cancelled) = Self::empty();
        let topics = topics.clone();
        collector.tasks.spawn(async move {
            loop {
                let message = tokio::select! {
                    () = cancelled.cancelled() => break,
                    m = consumer.recv() => m,
                };
                let Ok(message) = message else { continue };
                let kind = OutputKind::of(&topics, message.topic());
                push(
                    &sink,
                    kind,
                    message.topic(),
                    message.payload().unwrap_or_default(),
                );
            }
        });
        collector.tasks.close();
        Ok(collector)
    }

    /// Subscribes to the NATS output subjects (`<prefix>.<tenant>`); start it before the
    /// service so nothing is published unseen.
    pub async fn start_nats(url: &str, topics: &config::Topics) -> anyhow::Result<Self> {
        let client = async_nats::connect(url)
            .await
            .context("connecting the output collector to NATS")?;
        let mut subscriptions = Vec::new();
        for prefix in [&topics.results, &topics.review, &topics.dlq] {
            subscriptions.push(client.subscribe(format!("{prefix}.>")).await?);
        }
        client.flush().await?;
        let mut merged = futures::stream::select_all(subscriptions);
        let (collector, sink, cancelled) = Self::empty();
        let topics = topics.clone();
        collector.tasks.spawn(async move {
            let _client = client;
            loop {
                let message = tokio::select! {
                    () = cancelled.cancelled() => break,
                    m = merged.next() => m,
                };
                let Some(message) = message else { break };
                let subject = message.subject.as_str();
                let prefix = subject.rsplit_once('.').map_or(subject, |(p, _)| p);
                push(
                    &sink,
                    OutputKind::of(&topics, prefix),
                    subject,
                    &message.payload,
                );
            }
        });
        collector.tasks.close();
        Ok(collector)
    }

    fn empty() -> (Self, Shared, CancellationToken) {
        let outputs = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let collector = Self {
            outputs: outputs.clone(),
            stop: stop.clone(),
            tasks: TaskTracker::new(),
        };
        (collector, outputs, stop)
    }

    pub fn len(&self) -> usize {
        self.outputs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything collected so far: typed, and as the raw JSON (for schema checks).
    pub fn snapshot(&self) -> Vec<(Collected, Value)> {
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` outputs arrived or none arrived for `stall`; calls `progress` on change.
    pub async fn wait_for(
        &self,
        n: usize,
        stall: Duration,
        mut progress: impl FnMut(usize),
    ) -> usize {
        let mut last = (0, Instant::now());
        loop {
            let seen = self.len();
            if seen != last.0 {
                progress(seen);
                last = (seen, Instant::now());
            }
            if seen >= n || last.1.elapsed() > stall {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// An in-process Kafka cluster with switchyard's topics created.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

impl EmbeddedKafka {
    pub fn start(
        jobs_topic: &str,
        topics: &config::Topics,
        partitions: i32,
    ) -> anyhow::Result<Self> {
        let cluster = MockCluster::new(1).context("starting the in-process Kafka cluster")?;
        cluster.create_topic(jobs_topic, partitions, 1)?;
        for topic in [&topics.results, &topics.review, &topics.dlq] {
            cluster.create_topic(topic, partitions.min(3), 1)?;
        }
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    pub fn cluster(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        &self.cluster
    }
}

/// Loads the demo config (embedded, or `path`) pointed at `brokers`.
pub fn demo_plan(path: Option<&PathBuf>, brokers: &str) -> anyhow::Result<Plan> {
    let (text, origin) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEMO_CONFIG.to_owned(),
            "embedded config/demo.yaml".to_owned(),
        ),
    };
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.push(("SWITCHYARD__SOURCE__BROKERS".into(), brokers.into()));
    env.push(("SWITCHYARD__SINK__BROKERS".into(), brokers.into()));
    Ok(config::load_str(&text, &origin, env)?)
}

/// The jobs topic and output topics of a Kafka-to-Kafka plan (what the demo runs).
pub fn topics_of(plan: &Plan) -> anyhow::Result<(String, config::Topics)> {
    match (&plan.source, &plan.sink) {
        (SourcePlan::Kafka(source), SinkPlan::Kafka(sink)) => {
            Ok((source.topic.clone(), sink.topics.clone()))
        }
        _ => anyhow::bail!(
            "the demo runs an in-process Kafka cluster: its config needs a kafka source and sink"
        ),
    }
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
    let service_done = service.spawn(crate::app::run(plan, shutdown.clone()));
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
