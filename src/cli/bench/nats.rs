//! The NATS + Redis shape: JetStream in and out, Redis state, as `config/nats-redis.yaml` runs
//! on many replicas. The bare loop pulls from its own stream with the same batch size, claims
//! the job with one `SET NX`, makes the two provider calls, publishes the result and waits for
//! the stream's ack, then acks the job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::{
    measure, micros_now, process_cpu, switchyard_timeline, wait_until, BenchArgs, Measured, Mode,
    Timeline, Window, Workload,
};
use switchyard::config::{self, Topics};
use switchyard::testkit::{parse_output, Collected, OutputKind};

const NATS_REDIS_CONFIG: &str = include_str!("../../../config/nats-redis.yaml");

/// Names private to one bench run.
pub(super) struct Names {
    prefix: String,
    jobs: String,
    outputs: String,
    bare_jobs: String,
    bare_outputs: String,
    key_prefix: String,
}

impl Names {
    pub(super) fn new() -> Self {
        let id = format!("{:08x}", rand::random::<u32>());
        Self {
            prefix: format!("bench{id}"),
            jobs: format!("BENCH_{id}"),
            outputs: format!("BENCH_{id}_OUT"),
            bare_jobs: format!("BARE_{id}"),
            bare_outputs: format!("BARE_{id}_OUT"),
            key_prefix: format!("bench{id}:"),
        }
    }

    fn topics(&self) -> Topics {
        Topics {
            results: format!("{}.results", self.prefix),
            review: format!("{}.review", self.prefix),
            dlq: format!("{}.dlq", self.prefix),
        }
    }
}

/// One round: both sides over the same services, the bare loop first when `bare_first`.
pub async fn run(args: &BenchArgs, llm: &str, bare_first: bool) -> anyhow::Result<Measured> {
    let names = Names::new();
    let client = async_nats::connect(&args.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats_url))?;
    let js = jetstream::new(client);
    let redis = redis::Client::open(args.redis_url.as_str())?;
    let mut info = redis
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to Redis at {}", args.redis_url))?;
    let outcome = async {
        let bare = match bare_first {
            true => Some(bare_side(args, llm, &names, &js, &redis, &mut info).await?),
            false => None,
        };
        let (switchyard, outputs, commands) =
            switchyard_side(args, llm, &names, &js, &mut info).await?;
        let bare = match bare {
            Some(bare) => bare,
            None => bare_side(args, llm, &names, &js, &redis, &mut info).await?,
        };
        anyhow::Ok((switchyard, bare, outputs, commands))
    }
    .await;
    cleanup(&js, &names, &mut info).await;
    outcome
}

/// Removes the run's streams and Redis keys (best effort).
async fn cleanup(
    js: &jetstream::Context,
    names: &Names,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    for stream in [
        &names.jobs,
        &names.outputs,
        &names.bare_jobs,
        &names.bare_outputs,
        &format!("{}_DECISIONS", names.jobs),
    ] {
        let _ = js.delete_stream(stream).await;
    }
    forget_keys(redis, &names.key_prefix).await;
}

/// A deep backlog on NATS for `bench --mode backlog`: `backlog` jobs wait in the stream (held by
/// the NATS server, not this process) while the service works through them for `--duration-s`.
/// (RSS after publishing, peak RSS while working, jobs finished.)
pub(super) async fn backlog_run(
    args: &BenchArgs,
    backlog: usize,
    llm: &str,
) -> anyhow::Result<(f64, f64, usize)> {
    let names = Names::new();
    let js = jetstream::new(async_nats::connect(&args.nats_url).await?);
    let mut redis = redis::Client::open(args.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let outcome = async {
        let jobs_prefix = format!("{}.jobs", names.prefix);
        create_stream(&js, &names.jobs, format!("{jobs_prefix}.>")).await?;
        publish_jobs(args, &jobs_prefix, backlog).await?;
        let (plan, consumer) = plan(args, llm, &names)?;
        let (rss_after_publish, peak) = super::backlog::work_window(args, plan).await?;
        let (_, acked) = drained(&js, &names.jobs, &consumer, backlog).await;
        anyhow::Ok((rss_after_publish, peak, usize::try_from(acked).unwrap_or(0)))
    }
    .await;
    cleanup(&js, &names, &mut redis).await;
    outcome
}

/// Publishes the whole workload on `<prefix>.<tenant>` and waits for the stream's acks (drain
/// mode: before the window opens).
async fn publish_backlog(args: &BenchArgs, prefix: &str) -> anyhow::Result<()> {
    publish_jobs(args, prefix, args.jobs).await
}

async fn publish_jobs(args: &BenchArgs, prefix: &str, count: usize) -> anyhow::Result<()> {
    let mut workload = Workload::new();
    let jobs: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            let job = workload.job(i);
            (format!("{prefix}.{}", job.tenant), job.payload)
        })
        .collect();
    switchyard::testkit::publish_nats(&args.nats_url, jobs).await
}

/// Offers the workload on `<prefix>.<tenant>` at `--rate` in the background (rate mode).
fn offer_at_rate(args: &BenchArgs, js: &jetstream::Context, prefix: &str) -> TaskTracker {
    let mut workload = Workload::new();
    let (js, prefix, jobs, rate) = (js.clone(), prefix.to_owned(), args.jobs, args.rate);
    let tracker = TaskTracker::new();
    tracker.spawn(async move {
        let started = Instant::now();
        let every = Duration::from_secs_f64(1.0 / rate);
        let acks = TaskTracker::new();
        for i in 0..jobs {
            tokio::time::sleep_until((started + every.mul_f64(i as f64)).into()).await;
            let job = workload.job(i);
            let subject = format!("{prefix}.{}", job.tenant);
            if let Ok(ack) = js.publish(subject, job.payload.into()).await {
                acks.spawn(async move {
                    let _ = ack.await;
                });
            }
        }
        acks.close();
        acks.wait().await;
    });
    tracker.close();
    tracker
}

async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: String,
) -> anyhow::Result<()> {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects],
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {name}"))?;
    Ok(())
}

/// The service's config: `config/nats-redis.yaml` pointed at the run's streams, subjects and
/// key prefix, the mock provider and `--inflight`; with its durable consumer's name.
pub(super) fn plan(
    args: &BenchArgs,
    llm: &str,
    names: &Names,
) -> anyhow::Result<(config::Plan, String)> {
    let jobs_prefix = format!("{}.jobs", names.prefix);
    let topics = names.topics();
    let overrides = [
        ("SWITCHYARD__SOURCE__URL", args.nats_url.clone()),
        ("SWITCHYARD__SOURCE__STREAM", names.jobs.clone()),
        (
            "SWITCHYARD__SOURCE__SUBJECTS",
            format!("[\"{jobs_prefix}.>\"]"),
        ),
        ("SWITCHYARD__SINK__STREAM", names.outputs.clone()),
        (
            "SWITCHYARD__SINK__TOPICS",
            format!(
                "{{results: {}, review: {}, dlq: {}}}",
                topics.results, topics.review, topics.dlq
            ),
        ),
        ("SWITCHYARD__STATE__URL", args.redis_url.clone()),
        (
            "SWITCHYARD__STATE__KEY_PREFIX",
            format!("\"{}\"", names.key_prefix),
        ),
        (
            "SWITCHYARD__REVIEWS__DECISIONS",
            format!("{}.decisions", names.prefix),
        ),
        ("SWITCHYARD__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let env = overrides
        .into_iter()
        .chain(super::service_overrides(
            args,
            "SWITCHYARD__PROVIDERS__OPENAI",
            llm,
        ))
        .map(|(k, v)| (k.to_owned(), v));
    let plan = config::load_str(NATS_REDIS_CONFIG, "config/nats-redis.yaml (bench)", env)?;
    let consumer_name = match &plan.source {
        config::SourcePlan::Nats(n) => n.consumer.clone(),
        config::SourcePlan::Kafka(_) => anyhow::bail!("config/nats-redis.yaml reads from NATS"),
    };
    Ok((plan, consumer_name))
}

/// Switchyard's run: its window opens when the service is ready and closes when its consumer
/// has nothing pending and nothing unacknowledged.
async fn switchyard_side(
    args: &BenchArgs,
    llm: &str,
    names: &Names,
    js: &jetstream::Context,
    info: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<(super::Side, Vec<(Collected, Value)>, Vec<(String, f64)>)> {
    let jobs_prefix = format!("{}.jobs", names.prefix);
    create_stream(js, &names.jobs, format!("{jobs_prefix}.>")).await?;
    if args.mode == Mode::Drain {
        publish_backlog(args, &jobs_prefix).await?;
    }
    let topics = names.topics();
    let (plan, consumer_name) = plan(args, llm, names)?;
    let (service, health, shutdown) = super::start_service(plan).await?;
    super::wait_ready(&health).await?;
    let (cpu0, redis0, trips0, nats0, started) = (
        process_cpu(),
        command_counts(info).await?,
        switchyard::state::redis_round_trips(),
        switchyard::connect::nats_messages(),
        Instant::now(),
    );
    let publisher = (args.mode == Mode::Rate).then(|| offer_at_rate(args, js, &jobs_prefix));
    let drained = wait_until(Duration::from_secs(60), || async {
        drained(js, &names.jobs, &consumer_name, args.jobs).await
    })
    .await;
    let (cpu, trips, nats, elapsed) = (
        process_cpu().saturating_sub(cpu0),
        switchyard::state::redis_round_trips().saturating_sub(trips0),
        switchyard::connect::nats_messages().saturating_sub(nats0),
        started.elapsed(),
    );
    let redis1 = command_counts(info).await?;
    shutdown.cancel();
    service.await.context("bench service task")??;
    if let Some(p) = publisher {
        p.close();
        p.wait().await;
    }
    drained.context("switchyard did not drain its stream")?;
    let outputs = read_outputs(js, &names.outputs, &topics).await?;
    let (total, by_command) = command_delta(&redis0, &redis1, args.jobs);
    let side = measure(Window {
        jobs: args.jobs,
        elapsed,
        cpu,
        redis_round_trips: Some(trips),
        redis_commands: Some(total),
        broker_messages: Some(nats),
        timeline: switchyard_timeline(&outputs, args.provider_latency_ms),
    })?;
    Ok((side, outputs, by_command))
}

/// (drained, progress): the consumer has delivered all `jobs` and has none unacknowledged.
async fn drained(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    jobs: usize,
) -> (bool, u64) {
    let Ok(mut c) = js
        .get_consumer_from_stream::<pull::Config, _, _>(consumer, stream)
        .await
    else {
        return (false, 0);
    };
    let Ok(info) = c.info().await else {
        return (false, 0);
    };
    let acked = info.ack_floor.stream_sequence;
    (
        info.num_pending == 0 && info.num_ack_pending == 0 && acked >= jobs as u64,
        acked,
    )
}

/// Every message in the outputs stream, parsed as the collector does.
async fn read_outputs(
    js: &jetstream::Context,
    name: &str,
    topics: &Topics,
) -> anyhow::Result<Vec<(Collected, Value)>> {
    let mut stream = js.get_stream(name).await?;
    let total = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut outputs = Vec::new();
    while (outputs.len() as u64) < total {
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(10), messages.next()).await
        else {
            break;
        };
        let subject = message.subject.as_str();
        let prefix = subject.rsplit_once('.').map_or(subject, |(p, _)| p);
        outputs.push(parse_output(
            OutputKind::of(topics, prefix),
            subject,
            &message.payload,
        ));
    }
    Ok(outputs)
}

/// Calls per Redis command since the server started (`INFO commandstats`).
async fn command_counts(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<HashMap<String, u64>> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .context("INFO commandstats")?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

/// Commands issued between two counts (the bench's own INFO left out): in all, and per job by
/// command, most first.
fn command_delta(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    jobs: usize,
) -> (u64, Vec<(String, f64)>) {
    let mut by: Vec<(String, u64)> = after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, n)| {
            (
                name.clone(),
                n.saturating_sub(before.get(name).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    by.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let total = by.iter().map(|(_, n)| n).sum();
    let per_job = by
        .into_iter()
        .map(|(name, n)| {
            (
                name.to_uppercase(),
                (n as f64 / jobs.max(1) as f64 * 100.0).round() / 100.0,
            )
        })
        .collect();
    (total, per_job)
}

/// Removes the run's Redis keys (best effort).
async fn forget_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("UNLINK").arg(&keys).query_async(conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// The bare loop's run: same services, only the unavoidable I/O.
async fn bare_side(
    args: &BenchArgs,
    llm: &str,
    names: &Names,
    js: &jetstream::Context,
    redis: &redis::Client,
    info: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<super::Side> {
    let jobs_prefix = format!("{}.bare", names.prefix);
    let out_prefix = format!("{}.bareout", names.prefix);
    create_stream(js, &names.bare_jobs, format!("{jobs_prefix}.>")).await?;
    create_stream(js, &names.bare_outputs, format!("{out_prefix}.>")).await?;
    if args.mode == Mode::Drain {
        publish_backlog(args, &jobs_prefix).await?;
    }
    let client = async_nats::connect(&args.nats_url).await?;
    let own = jetstream::new(client.clone());
    let consumer = own
        .get_stream(&names.bare_jobs)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("bare".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 50_000,
            ..Default::default()
        })
        .await?;
    let state = redis::aio::ConnectionManager::new(redis.clone()).await?;
    let http = reqwest::Client::new();
    let endpoint = format!("{llm}/chat/completions");
    let permits = Arc::new(Semaphore::new(args.inflight));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let failed = Arc::new(AtomicUsize::new(0));
    let tasks = TaskTracker::new();

    let stats = client.statistics();
    let count =
        || stats.in_messages.load(Ordering::Relaxed) + stats.out_messages.load(Ordering::Relaxed);
    let (cpu0, redis0, nats0, started) = (
        process_cpu(),
        command_counts(info).await?,
        count(),
        Instant::now(),
    );
    let publisher = (args.mode == Mode::Rate).then(|| offer_at_rate(args, js, &jobs_prefix));
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(32)
        .messages()
        .await?;
    for _ in 0..args.jobs {
        let permit = permits.clone().acquire_owned().await?;
        let message = tokio::time::timeout(Duration::from_secs(60), messages.next())
            .await
            .context("the bare loop got no message for 60 s")?
            .context("the bare loop's message stream ended")?
            .map_err(|e| anyhow::anyhow!("bare loop: {e}"))?;
        let (http, endpoint, own, state, timeline, failed) = (
            http.clone(),
            endpoint.clone(),
            own.clone(),
            state.clone(),
            timeline.clone(),
            failed.clone(),
        );
        let (out_prefix, key_prefix, latency) = (
            out_prefix.clone(),
            names.key_prefix.clone(),
            args.provider_latency_ms,
        );
        tasks.spawn(async move {
            let ok = bare_job(
                &message,
                &http,
                &endpoint,
                &own,
                state,
                &out_prefix,
                &key_prefix,
            )
            .await;
            match ok {
                Some(sent) => {
                    if message.ack().await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(sent) = sent {
                        let done = micros_now();
                        let e2e = done.saturating_sub(sent);
                        if let Ok(mut t) = timeline.lock() {
                            t.push(done, e2e, e2e.saturating_sub(2 * latency * 1000));
                        }
                    }
                }
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    let (cpu, nats, elapsed) = (
        process_cpu().saturating_sub(cpu0),
        count().saturating_sub(nats0),
        started.elapsed(),
    );
    let redis1 = command_counts(info).await?;
    if let Some(p) = publisher {
        p.close();
        p.wait().await;
    }
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "the bare loop failed {failed} jobs");
    let (total, _) = command_delta(&redis0, &redis1, args.jobs);
    let timeline = std::mem::take(&mut *timeline.lock().unwrap_or_else(|e| e.into_inner()));
    measure(Window {
        jobs: args.jobs,
        elapsed,
        cpu,
        // The bare loop sends plain commands only: one round trip each.
        redis_round_trips: Some(total),
        redis_commands: Some(total),
        broker_messages: Some(nats),
        timeline,
    })
}

/// One job of the bare loop. `None`: it failed; `Some(None)`: done without a result to time (a
/// duplicate or a dead letter); `Some(Some(sent_us))`: a result was published.
async fn bare_job(
    message: &jetstream::Message,
    http: &reqwest::Client,
    endpoint: &str,
    js: &jetstream::Context,
    mut state: redis::aio::ConnectionManager,
    out_prefix: &str,
    key_prefix: &str,
) -> Option<Option<u64>> {
    let tenant = message.subject.as_str().rsplit('.').next().unwrap_or("_");
    let Ok(job) = serde_json::from_slice::<Value>(&message.payload) else {
        let dead = json!({"reason": "invalid_json"}).to_string();
        let ack = js
            .publish(format!("{out_prefix}.dlq.{tenant}"), dead.into())
            .await
            .ok()?;
        ack.await.ok()?;
        return Some(None);
    };
    let id = job["id"].as_str().unwrap_or_default();
    let claimed: Option<String> = redis::cmd("SET")
        .arg(format!("{key_prefix}bare:{tenant}:{id}"))
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(86_400)
        .query_async(&mut state)
        .await
        .ok()?;
    if claimed.is_none() {
        return Some(None);
    }
    let answer = super::bare_calls(&job, http, endpoint).await?;
    let result = json!({"job_id": id, "tenant": tenant,
                        "output": answer.pointer("/choices/0/message/content")});
    let ack = js
        .publish(
            format!("{out_prefix}.results.{tenant}"),
            result.to_string().into(),
        )
        .await
        .ok()?;
    ack.await.ok()?;
    Some(job.pointer("/metadata/sent_us").and_then(Value::as_u64))
}
