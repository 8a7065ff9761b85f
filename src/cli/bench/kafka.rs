//! The Kafka shape: librdkafka's in-process cluster in and out, in-memory state (the embedded
//! default). The bare loop consumes with its own group, makes the two provider calls, produces
//! the result and stores the offset; duplicates are caught by an in-memory set, as the memory
//! state store does.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::{
    measure, micros_now, process_cpu, switchyard_timeline, wait_until, BenchArgs, Measured, Mode,
    Side, Timeline, Window, Workload,
};
use switchyard::config::{self, Topics};
use switchyard::testkit::{
    parse_output, publish, Collected, EmbeddedKafka, OutputKind, DEMO_CONFIG,
};

/// One round: both sides over one in-process cluster, the bare loop first when `bare_first`.
pub async fn run(args: &BenchArgs, llm: &str, bare_first: bool) -> anyhow::Result<Measured> {
    let topics = Topics {
        results: "bench.results".into(),
        review: "bench.review".into(),
        dlq: "bench.dlq".into(),
    };
    let kafka = EmbeddedKafka::start("bench.jobs", &topics, 6)?;
    let brokers = kafka.bootstrap_servers();
    let bare = match bare_first {
        true => Some(bare_side(args, &kafka, &brokers, llm).await?),
        false => None,
    };
    let (switchyard, outputs) = switchyard_side(args, &brokers, &topics, llm).await?;
    let bare = match bare {
        Some(bare) => bare,
        None => bare_side(args, &kafka, &brokers, llm).await?,
    };
    Ok((switchyard, bare, outputs, Vec::new()))
}

/// The workload's payloads, in order.
fn payloads(jobs: usize) -> Vec<Vec<u8>> {
    let mut workload = Workload::new();
    (0..jobs).map(|i| workload.job(i).payload).collect()
}

/// Offers the workload at `--rate` in the background.
fn offer_at_rate(args: &BenchArgs, brokers: &str, topic: &str) -> anyhow::Result<TaskTracker> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    let (topic, jobs, rate) = (topic.to_owned(), args.jobs, args.rate);
    let tracker = TaskTracker::new();
    tracker.spawn(async move {
        let mut workload = Workload::new();
        let started = Instant::now();
        let every = Duration::from_secs_f64(1.0 / rate);
        let sends = TaskTracker::new();
        for i in 0..jobs {
            tokio::time::sleep_until((started + every.mul_f64(i as f64)).into()).await;
            let (producer, topic, payload) =
                (producer.clone(), topic.clone(), workload.job(i).payload);
            sends.spawn(async move {
                let key = i.to_string();
                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                let _ = producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
                    .await;
            });
        }
        sends.close();
        sends.wait().await;
    });
    tracker.close();
    Ok(tracker)
}

/// Messages in `topics` (sum of high watermarks).
fn produced(consumer: &BaseConsumer, topics: &Topics) -> u64 {
    let mut total = 0;
    for topic in [&topics.results, &topics.review, &topics.dlq] {
        let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
            continue;
        };
        for t in metadata.topics() {
            for p in t.partitions() {
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                {
                    total += u64::try_from(high).unwrap_or(0);
                }
            }
        }
    }
    total
}

async fn switchyard_side(
    args: &BenchArgs,
    brokers: &str,
    topics: &Topics,
    llm: &str,
) -> anyhow::Result<(Side, Vec<(Collected, Value)>)> {
    if args.mode == Mode::Drain {
        publish(brokers, "bench.jobs", payloads(args.jobs)).await?;
    }
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
    ];
    let env = overrides
        .into_iter()
        .chain(super::service_overrides(
            args,
            "SWITCHYARD__PROVIDERS__LOCAL",
            llm,
        ))
        .map(|(k, v)| (k.to_owned(), v));
    let plan = config::load_str(DEMO_CONFIG, "embedded config/demo.yaml (bench)", env)?;
    let watcher: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let watcher = Arc::new(watcher);
    let readers = TaskTracker::new();
    let reader = readers.spawn(read_outputs(
        brokers.to_owned(),
        topics.clone(),
        vec![
            topics.results.clone(),
            topics.review.clone(),
            topics.dlq.clone(),
        ],
        args.jobs,
    ));
    readers.close();
    let (service, health, shutdown) = super::start_service(plan).await?;
    super::wait_ready(&health).await?;
    let publisher = if args.mode == Mode::Rate {
        // Readiness comes with the group join; give the assignment a moment to settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some(offer_at_rate(args, brokers, "bench.jobs")?)
    } else {
        None
    };
    let (cpu0, started) = (process_cpu(), Instant::now());
    // Every delivery of a job gives one output (a result, a replayed result or a dead letter).
    let jobs = args.jobs as u64;
    let drained = wait_until(Duration::from_secs(60), || {
        let (watcher, topics) = (watcher.clone(), topics.clone());
        async move {
            let n = tokio::task::spawn_blocking(move || produced(&watcher, &topics))
                .await
                .unwrap_or(0);
            (n >= jobs, n)
        }
    })
    .await;
    let (cpu, elapsed) = (process_cpu().saturating_sub(cpu0), started.elapsed());
    shutdown.cancel();
    service.await.context("bench service task")??;
    if let Some(p) = publisher {
        p.close();
        p.wait().await;
    }
    drained.context("switchyard did not produce an output for every job")?;
    let outputs = reader.await.context("bench output reader")??;
    let side = measure(Window {
        jobs: args.jobs,
        elapsed,
        cpu,
        redis_round_trips: None,
        redis_commands: None,
        broker_messages: None,
        timeline: switchyard_timeline(&outputs, args.provider_latency_ms),
    })?;
    Ok((side, outputs))
}

/// Every output in `read` (topics of `topics`), read from the start of each partition
/// (assigned, no group), until `expected` arrived or none came for 10 s (60 s for the first). It runs alongside the
/// side it reads for (the in-process broker keeps only the latest messages of a partition),
/// for both sides alike.
async fn read_outputs(
    brokers: String,
    topics: Topics,
    read: Vec<String>,
    expected: usize,
) -> anyhow::Result<Vec<(Collected, Value)>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("bench-reader-{:x}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in &read {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&assignment)?;
    let mut outputs = Vec::with_capacity(expected);
    while outputs.len() < expected {
        // The side it reads for may take a while to start (group join, slow provider); after
        // that, 10 s without an output ends the read.
        let idle = if outputs.is_empty() { 60 } else { 10 };
        let Ok(received) = tokio::time::timeout(Duration::from_secs(idle), consumer.recv()).await
        else {
            break;
        };
        // A transient consumer error (a fetch that failed) is retried by librdkafka.
        let Ok(message) = received else { continue };
        let topic = message.topic();
        outputs.push(parse_output(
            OutputKind::of(&topics, topic),
            topic,
            message.payload().unwrap_or_default(),
        ));
    }
    Ok(outputs)
}

/// The baseline: consume, two provider POSTs, produce, store the offset. Nothing else.
async fn bare_side(
    args: &BenchArgs,
    kafka: &EmbeddedKafka,
    brokers: &str,
    llm: &str,
) -> anyhow::Result<Side> {
    kafka.cluster().create_topic("bare.jobs", 6, 1)?;
    kafka.cluster().create_topic("bare.results", 3, 1)?;
    if args.mode == Mode::Drain {
        publish(brokers, "bare.jobs", payloads(args.jobs)).await?;
    }
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
    let permits = Arc::new(Semaphore::new(args.inflight));
    let done = Arc::new(AtomicUsize::new(0));
    let claimed = Arc::new(Mutex::new(HashSet::new()));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let tasks = TaskTracker::new();
    // The same output reader as switchyard's side has, so both pay for it alike.
    let readers = TaskTracker::new();
    let reader = readers.spawn(read_outputs(
        brokers.to_owned(),
        Topics {
            results: "bare.results".into(),
            review: "bare.review".into(),
            dlq: "bare.dlq".into(),
        },
        vec!["bare.results".into()],
        args.jobs,
    ));
    readers.close();
    let publisher = if args.mode == Mode::Rate {
        Some(offer_at_rate(args, brokers, "bare.jobs")?)
    } else {
        None
    };
    let mut started = None;
    let mut cpu0 = Duration::ZERO;
    let latency = args.provider_latency_ms;
    for _ in 0..args.jobs {
        let permit = permits.clone().acquire_owned().await?;
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("the bare loop got no message for 60 s")??;
        if started.is_none() {
            started = Some(Instant::now());
            cpu0 = process_cpu();
        }
        let (payload, partition, offset) = (
            message.payload().unwrap_or_default().to_vec(),
            message.partition(),
            message.offset(),
        );
        let (http, endpoint, producer, consumer, done, claimed, timeline) = (
            http.clone(),
            endpoint.clone(),
            producer.clone(),
            consumer.clone(),
            done.clone(),
            claimed.clone(),
            timeline.clone(),
        );
        tasks.spawn(async move {
            let sent = bare_job(&payload, &http, &endpoint, &producer, &claimed).await;
            let Some(sent) = sent else { return };
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset("bare.jobs", partition, Offset::Offset(offset + 1))
                .is_ok()
            {
                let _ = consumer.store_offsets(&tpl);
            }
            if let Some(sent) = sent {
                let now = micros_now();
                let e2e = now.saturating_sub(sent);
                if let Ok(mut t) = timeline.lock() {
                    t.push(now, e2e, e2e.saturating_sub(2 * latency * 1000));
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    let cpu = process_cpu().saturating_sub(cpu0);
    reader.abort();
    if let Some(p) = publisher {
        p.close();
        p.wait().await;
    }
    let finished = done.load(Ordering::Relaxed);
    anyhow::ensure!(
        finished == args.jobs,
        "the bare loop finished {finished} of {} jobs",
        args.jobs
    );
    let timeline = std::mem::take(&mut *timeline.lock().unwrap_or_else(|e| e.into_inner()));
    measure(Window {
        jobs: args.jobs,
        elapsed,
        cpu,
        redis_round_trips: None,
        redis_commands: None,
        broker_messages: None,
        timeline,
    })
}

/// One job of the bare loop. `None`: it failed; `Some(None)`: done without a result to time (a
/// duplicate or a dead letter); `Some(Some(sent_us))`: a result was produced.
async fn bare_job(
    payload: &[u8],
    http: &reqwest::Client,
    endpoint: &str,
    producer: &FutureProducer,
    claimed: &Mutex<HashSet<String>>,
) -> Option<Option<u64>> {
    let send = |topic: &'static str, bytes: String| async move {
        producer
            .send(
                FutureRecord::<(), _>::to(topic).payload(&bytes),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .is_ok()
    };
    let Ok(job) = serde_json::from_slice::<Value>(payload) else {
        return send(
            "bare.results",
            json!({"reason": "invalid_json"}).to_string(),
        )
        .await
        .then_some(None);
    };
    let id = job["id"].as_str().unwrap_or_default();
    let fresh = claimed.lock().ok()?.insert(id.to_owned());
    if !fresh {
        return Some(None);
    }
    let answer = super::bare_calls(&job, http, endpoint).await?;
    let result = json!({"job_id": id, "output": answer.pointer("/choices/0/message/content")});
    send("bare.results", result.to_string())
        .await
        .then_some(job.pointer("/metadata/sent_us").and_then(Value::as_u64))
}
