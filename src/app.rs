//! Wires the components of a plan together and owns the shutdown tree.
//!
//! The consume loop takes a permit of the in-flight bound before it fetches a message, so memory
//! stays flat however deep the backlog. When the bound is reached it pauses the source (Kafka:
//! every assigned partition, still polled so the member stays in its group) until in-flight jobs
//! fall below `limits.resume_below` of the bound. While the state store is unreachable it fetches nothing
//! (and readiness is false) until a probe succeeds: no job runs without its claim. On shutdown it
//! stops fetching and reports not-ready, lets in-flight jobs finish for `limits.drain_timeout`,
//! hands back the rest (unacked / nak'ed), flushes the sink and commits.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Gate, Scheduler, SchedulerLimits};
use crate::calls::cache::ResponseCache;
use crate::calls::Calls;
use crate::config::Plan;
use crate::engine::{Engine, Kind};
use crate::pipeline::{Pools, Runner};
use crate::provider::Providers;
use crate::sink::{OutputSink, Sink};
use crate::source::{JobSource, Source, SourceError};
use crate::state::StateStore;
use crate::telemetry::health;
use crate::telemetry::Telemetry;

/// How often source connectivity (and, while paused, the low-water mark) is sampled.
const HEALTH_TICK: Duration = Duration::from_millis(100);
/// How long intake waits for a free in-flight slot before it pauses the source.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// How long job budget settlements get at exit.
const SETTLE_GRACE: Duration = Duration::from_secs(2);
/// How long shutdown takes messages a NATS source pulled but did not start, to hand them back.
const BUFFERED_HAND_BACK: Duration = Duration::from_millis(200);
/// How long handed-back jobs get to stop after the drain timeout.
const HAND_BACK_GRACE: Duration = Duration::from_secs(5);
/// How often consumer lag is sampled.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Runs the service until `shutdown` is cancelled (or the source fails for good).
pub async fn run(plan: Plan, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = StateStore::open(&plan.state).await?;
    let telemetry = Telemetry::new().context("registering metrics")?;
    run_with(plan, state, telemetry, shutdown).await
}

/// [`run`] with a given state store and telemetry, so tests can share a store across restarts
/// and watch readiness and metrics.
pub async fn run_with(
    plan: Plan,
    state: StateStore,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let plan = Arc::new(plan);
    let health = telemetry.health.clone();
    let metrics = telemetry.metrics.clone();
    health.watch_state(state.availability());
    let background = TaskTracker::new();
    let http_stop = CancellationToken::new();
    if let Some(listen) = &plan.http_listen {
        let (listen, telemetry, stop) = (listen.clone(), telemetry.clone(), http_stop.clone());
        background.spawn(async move {
            if let Err(e) = health::serve(&listen, telemetry, stop).await {
                tracing::error!(error = %e, "health endpoints stopped");
            }
        });
    }
    let result = async {
        let gate = Arc::new(Gate::new(&plan, state.clone(), metrics.clone()));
        let providers = Providers::start(&plan).await?;
        let mut calls = Calls::new(&plan, providers, metrics.clone(), background.clone())
            .with_gate(gate.clone());
        if let Some(cache) = plan.cache {
            calls = calls.with_cache(ResponseCache::new(cache, state.clone(), metrics.clone()));
        }
        calls = calls.with_semantic_cache(crate::calls::semantic::SemanticCache::new(
            state.clone(),
            metrics.clone(),
        ));
        let calls = Arc::new(calls);
        let settling = gate.clone();
        let scheduler = Scheduler::start(
            gate,
            SchedulerLimits {
                max_running: plan.limits.max_running_jobs,
                max_inflight: plan.limits.max_inflight_jobs,
                park_after: plan.limits.park_after,
            },
            &background,
            http_stop.clone(),
        );
        let mut connections = crate::connect::NatsConnections::new(match &plan.source {
            crate::config::SourcePlan::Nats(n) => Some((n.url.as_str(), &n.access)),
            crate::config::SourcePlan::Kafka(_) => None,
        });
        let sink = Sink::open(&plan.sink, &mut connections).await?;
        let source = Source::open(&plan.source, &mut connections).await?;
        let decisions = if plan.reviews.consume {
            let decisions = crate::source::decisions_plan(&plan.source, &plan.reviews.decisions);
            Some(
                Source::open(&decisions, &mut connections)
                    .await
                    .context("opening the review decisions source (reviews.decisions)")?,
            )
        } else {
            None
        };
        let (probe, lag_gauge, stop) = (
            source.lag_probe(),
            metrics
                .consumer_lag
                .with_label_values(&[source.transport()]),
            http_stop.clone(),
        );
        background.spawn(async move {
            let mut every = tokio::time::interval(LAG_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = every.tick() => {
                        if let Some(lag) = probe.lag().await {
                            lag_gauge.set(lag);
                        }
                    }
                }
            }
        });
        let runner = Runner::new(calls, Pools::new(&plan.pools), metrics.clone());
        let engine = Arc::new(Engine::new(
            plan.clone(),
            runner,
            scheduler,
            state.clone(),
            sink,
            &telemetry,
        ));
        tracing::info!(
            pipelines = plan.pipelines.len(),
            max_inflight = plan.limits.max_inflight_jobs,
            "switchyard running"
        );
        // Either consumer failing for good stops the other.
        let stopping = shutdown.child_token();
        {
            // Always: jobs parked under an earlier config still finish.
            let (engine, stop, every) = (engine.clone(), stopping.clone(), engine.batch_every());
            background.spawn(async move { batch_loop(&engine, every, &stop).await });
        }
        if plan.reviews.consume {
            let (engine, stop, every) =
                (engine.clone(), stopping.clone(), plan.reviews.expire_every);
            background.spawn(async move { expire_reviews(&engine, every, &stop).await });
        }
        let run = |source: Source, kind: Kind| {
            let (engine, state, telemetry, plan, stopping) =
                (engine.clone(), &state, &telemetry, &plan, stopping.clone());
            async move {
                let consumed = consume(
                    source,
                    kind,
                    engine,
                    state,
                    telemetry,
                    plan,
                    stopping.clone(),
                )
                .await;
                if consumed.is_err() {
                    stopping.cancel();
                }
                consumed
            }
        };
        let jobs = run(source, Kind::Job);
        let decided = async {
            match decisions {
                Some(decisions) => run(decisions, Kind::Decision).await,
                None => Ok(()),
            }
        };
        let (jobs, decided) = tokio::join!(jobs, decided);
        let consumed = jobs.and(decided.context("review decisions"));
        // Budget reservations of jobs that ended during shutdown are settled before exit.
        settling.finish_settling(SETTLE_GRACE).await;
        consumed
    }
    .await;
    http_stop.cancel();
    background.close();
    background.wait().await;
    result
}

/// Pauses the source until `resume` holds, polling it meanwhile so a Kafka member keeps its
/// group membership however long the pause; `false` when shutdown came first.
async fn paused_until(
    source: &mut Source,
    shutdown: &CancellationToken,
    tick: &mut tokio::time::Interval,
    health: &health::Health,
    resume: impl Fn() -> bool,
) -> bool {
    source.pause();
    let resumed = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break false,
            _ = tick.tick() => {
                health.set_source_connected(source.is_connected());
                if resume() {
                    break true;
                }
            }
            () = source.poll_paused() => {}
        }
    };
    if resumed {
        source.resume();
    }
    resumed
}

/// Sends queued provider batch requests and settles ended batches, every `every`, until
/// `stop`. Every replica runs it (see `engine::batch`).
async fn batch_loop<K: OutputSink>(engine: &Engine<K>, every: Duration, stop: &CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clock = crate::engine::BatchClock::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => engine.batch_pass(&mut clock, stop).await,
        }
    }
}

/// Settles reviews past their deadline and reports pending reviews, every `every`, until
/// `stop`. Every replica runs it; each review is settled once (its decision claim).
async fn expire_reviews<K: OutputSink>(
    engine: &Engine<K>,
    every: Duration,
    stop: &CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                engine.expire_due_reviews(stop).await;
                engine.report_pending_reviews(&mut seen).await;
            }
        }
    }
}

async fn consume<K: OutputSink>(
    mut source: Source,
    kind: Kind,
    engine: Arc<Engine<K>>,
    state: &StateStore,
    telemetry: &Telemetry,
    plan: &Plan,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, metrics) = (&telemetry.health, &telemetry.metrics);
    let transport = source.transport();
    let inflight = Arc::new(Semaphore::new(plan.limits.max_inflight_jobs));
    let tasks = TaskTracker::new();
    let hand_back = CancellationToken::new();
    let mut failure = None;
    let mut backoff = Duration::from_millis(100);
    let mut tick = tokio::time::interval(HEALTH_TICK);
    'intake: loop {
        if health.sink_rejecting() {
            // An output topic refuses writes: jobs in flight keep their outputs and retry; no
            // new job is taken until none is held by a refusal.
            metrics.intake_pauses.inc();
            let resume = || !health.sink_rejecting();
            if !paused_until(&mut source, &shutdown, &mut tick, health, resume).await {
                break 'intake;
            }
            continue;
        }
        if !state.is_available() {
            // Paused: no new job is taken until the store answers again.
            tokio::select! {
                () = shutdown.cancelled() => break 'intake,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let _ = state.ping().await;
            continue;
        }
        // A short wait for a free slot needs nothing special (librdkafka's prefetch queue is
        // bounded); a long one pauses the source so it can be polled without taking more.
        let waited = tokio::select! {
            biased;
            () = shutdown.cancelled() => break 'intake,
            permit = tokio::time::timeout(PAUSE_AFTER, inflight.clone().acquire_owned()) => permit,
        };
        let permit = match waited {
            Ok(permit) => permit.context("in-flight semaphore closed")?,
            Err(_) => {
                // Backpressure: queued + running jobs reached their bound. Stop fetching until
                // they fall below the low-water mark, polling meanwhile so the consumer keeps
                // its group membership (Kafka) however long the wait.
                let resume_when_free = plan.limits.max_inflight_jobs - plan.limits.resume_at;
                metrics.intake_pauses.inc();
                tracing::debug!(in_flight = plan.limits.max_inflight_jobs, "intake paused");
                let resume = || inflight.available_permits() >= resume_when_free.max(1);
                if !paused_until(&mut source, &shutdown, &mut tick, health, resume).await {
                    break 'intake;
                }
                tracing::debug!("intake resumed");
                inflight
                    .clone()
                    .acquire_owned()
                    .await
                    .context("in-flight semaphore closed")?
            }
        };
        let delivery = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break 'intake,
                _ = tick.tick() => if kind == Kind::Job {
                    health.set_source_connected(source.is_connected());
                },
                delivery = source.next() => break delivery,
            }
        };
        match delivery {
            Ok(delivery) => {
                backoff = Duration::from_millis(100);
                if kind == Kind::Job {
                    metrics.jobs_received.with_label_values(&[transport]).inc();
                }
                metrics.inflight.inc();
                let (engine, stop, metrics) = (engine.clone(), hand_back.clone(), metrics.clone());
                tasks.spawn(async move {
                    engine.handle_as(delivery, kind, &stop).await;
                    metrics.inflight.dec();
                    drop(permit);
                });
            }
            Err(SourceError::Transient(e)) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "source error; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e @ SourceError::Fatal(_)) => {
                failure = Some(anyhow::anyhow!(e));
                break;
            }
        }
    }
    health.set_draining();
    if transport == "nats" {
        // JetStream has already counted the messages pulled but not started as deliveries:
        // each goes through the engine with the stop already given, which hands it back, or
        // dead-letters it when this was its last allowed delivery (a plain nak would lose it).
        let stopped = CancellationToken::new();
        stopped.cancel();
        // What was prefetched arrives at once; then stop, before the subscription's next pulls
        // bring fresh backlog only to hand it back (each costs the message a delivery).
        source.stop_pulling();
        let prefetched = source.prefetched_bound();
        let deadline = tokio::time::Instant::now() + BUFFERED_HAND_BACK;
        let mut seen = 0;
        while seen < prefetched {
            let Ok(next) = tokio::time::timeout_at(deadline, source.next()).await else {
                break;
            };
            seen += 1;
            match next {
                Ok(delivery) => {
                    let (engine, stopped) = (engine.clone(), stopped.clone());
                    tasks.spawn(async move { engine.handle_as(delivery, kind, &stopped).await });
                }
                Err(SourceError::Transient(_)) => {}
                Err(SourceError::Fatal(_)) => break,
            }
        }
    }
    tasks.close();
    let in_flight = tasks.len();
    tracing::info!(
        in_flight,
        drain_timeout_ms = plan.limits.drain_timeout.as_millis() as u64,
        "draining"
    );
    if tokio::time::timeout(plan.limits.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = tasks.len(),
            "drain timeout reached; handing back unfinished jobs"
        );
        hand_back.cancel();
        // Handing back is quick unless a write is mid-flight; bound it too, so flush and commit
        // still happen before the orchestrator's kill. Jobs still running then are simply not
        // acknowledged, and are redelivered.
        if tokio::time::timeout(HAND_BACK_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tasks.len(),
                "jobs still writing after the hand-back grace; leaving them unacknowledged"
            );
        }
    }
    engine.sink().flush().await;
    source.close().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
