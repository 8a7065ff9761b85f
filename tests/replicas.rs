//! Three `switchyard run` processes share a Kafka consumer group (and, separately, a NATS durable
//! consumer) with Redis state; one is killed with SIGKILL mid-stream and restarted. Nothing is
//! lost, and a finished job is never sent to the provider again: extra provider calls are bounded
//! by what the killed process had in flight. Then every replica gets SIGTERM under load and
//! exits 0 within its drain timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::testkit::{publish, publish_nats, OutputCollector};

use common::*;

const INFLIGHT: usize = 32;
const STALL: Duration = Duration::from_secs(60);

/// What every replica shares: the pipeline over the test's mock at `llm`, 32 jobs in flight,
/// a 10 s drain, no HTTP port, Redis state under `prefix` with a 3 s lease.
fn replica_config(source: TestConfig, llm: impl std::fmt::Display, prefix: &str) -> TestConfig {
    source
        .llm(llm)
        .set(
            "state",
            format!(
                "{{kind: redis, url: \"{}\", key_prefix: \"{prefix}\", claim_lease_ms: 3000}}",
                redis_url()
            ),
        )
        .set(
            "limits",
            "{max_inflight_jobs: 32, max_job_bytes: 4096, drain_timeout_ms: 10000}",
        )
        .set("http", "{listen: \"off\"}")
}

/// A Kafka source in `group` (a commit every 500 ms).
fn kafka_source(brokers: &str, group: &str) -> TestConfig {
    TestConfig::kafka(brokers).set(
        "source",
        format!(
            "{{kind: kafka, brokers: \"{brokers}\", group: \"{group}\", topic: {JOBS_TOPIC},\n         \
             librdkafka: {{auto.commit.interval.ms: 500, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}"
        ),
    )
}

struct Replica {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Replica {
    fn spawn(config: &Path, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("REPLICA_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Self {
            child,
            config: config.to_owned(),
            log,
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn restart(&mut self) {
        *self = Self::spawn(&self.config.clone(), self.log.clone());
    }

    /// SIGTERM; returns the exit code and how long the drain took.
    fn terminate(&mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return (exit.code(), started.elapsed());
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "replica did not exit within 30s of SIGTERM; last log lines:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The replica finished its in-flight work within its drain timeout: it did not have to hand
/// unfinished jobs back (it logs a warning when it does).
fn assert_drained_in_time(replica: &Replica) {
    let log = std::fs::read_to_string(&replica.log).unwrap_or_default();
    assert!(
        !log.contains("drain timeout reached"),
        "the drain ran out of time; log: {}",
        replica.log.display()
    );
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_all(
    outputs: &OutputCollector,
    n: usize,
    replicas: &[Replica],
) -> HashMap<String, usize> {
    let mut last = (0, Instant::now());
    loop {
        let per_job = originals(&outputs.snapshot());
        if per_job.len() >= n {
            return per_job;
        }
        if per_job.len() != last.0 {
            last = (per_job.len(), Instant::now());
        }
        if last.1.elapsed() >= STALL {
            // What each replica was doing, so a stall can be diagnosed from the CI log.
            let tails: Vec<String> = replicas
                .iter()
                .map(|r| {
                    let log = std::fs::read_to_string(&r.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(25).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {}\n{}", r.log.display(), tail.join("\n"))
                })
                .collect();
            panic!(
                "stalled at {} of {n} jobs; replica logs:\n{}",
                per_job.len(),
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mid-stream, SIGTERM replica 2 (it drains and exits 0) and start it again; then kill replica 0
/// with SIGKILL once `kill_at` jobs are done and restart it; wait for every job, then SIGTERM
/// all.
async fn kill_restart_and_check(
    replicas: &mut [Replica],
    outputs: &OutputCollector,
    n: usize,
    kill_at: usize,
    calls: impl Fn() -> u64,
) {
    outputs.wait_for(n / 5, STALL, |_| {}).await;
    let (code, _) = replicas[2].terminate();
    assert_eq!(code, Some(0), "SIGTERM mid-stream exits 0");
    assert_drained_in_time(&replicas[2]);
    let drained_at = outputs.len();
    assert!(
        drained_at < kill_at,
        "terminated mid-stream ({drained_at} of {n})"
    );
    replicas[2].restart();
    outputs.wait_for(kill_at, STALL, |_| {}).await;
    // Replica 2's unfinished work went to the others; a drain finishes or hands back, so
    // nothing it had started was answered twice.
    let twice: Vec<_> = originals(&outputs.snapshot())
        .into_iter()
        .filter(|(_, c)| *c > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "answered twice after a SIGTERM drain: {twice:?}"
    );
    replicas[0].kill9();
    let killed_at = outputs.len();
    assert!(killed_at < n, "killed mid-stream ({killed_at} of {n})");
    replicas[0].restart();
    let per_job = wait_all(outputs, n, replicas).await;
    for replica in replicas.iter_mut() {
        let (code, _) = replica.terminate();
        assert_eq!(
            code,
            Some(0),
            "SIGTERM exits 0; log: {}",
            replica.log.display()
        );
        assert_drained_in_time(replica);
    }
    let all = outputs.snapshot();
    assert_schema_valid(&all);
    assert_eq!(per_job.len(), n, "no job lost");
    // A restart is not a failure: no job may end as a dead letter (for instance with its
    // deliveries used up by hand-backs while a replica stops).
    assert_no_dead_letters(&all, "dead letters after restarts");
    // A job the killed process had written but not yet recorded in Redis is processed again
    // (Kafka/NATS and Redis cannot be written atomically); only its in-flight jobs can be.
    let twice = per_job.values().filter(|&&c| c > 1).count();
    assert!(
        twice <= INFLIGHT,
        "{twice} jobs finished twice; at most the killed process's {INFLIGHT} in flight may"
    );
    let calls = calls();
    eprintln!(
        "{n} jobs, killed at {killed_at}: {} outputs ({} replays), {twice} finished twice, {calls} provider calls",
        all.len(),
        all.len() - per_job.values().sum::<usize>()
    );
    assert!(
        calls <= 2 * n as u64 + 2 * INFLIGHT as u64,
        "{calls} provider calls for {n} jobs: finished jobs were sent to the provider again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kafka_replicas_lose_nothing_when_one_is_killed_and_restarted() {
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(20).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("it{:x}:", rand::random::<u64>());
    let path = replica_config(
        kafka_source(&brokers, &format!("replicas-{:x}", rand::random::<u64>())),
        llm.addr(),
        &prefix,
    )
    .write(dir.path(), "replica.yaml");
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::spawn(&path, dir.path().join(format!("replica-{i}.log"))))
        .collect();
    let outputs = collector(&brokers);

    let n = 5000;
    let tenants = ["acme", "globex", "initech"];
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("k-{i}"), tenants[i % 3], "my invoice is wrong")),
    )
    .await
    .unwrap();
    kill_restart_and_check(&mut replicas, &outputs, n, n / 2, || llm.stats().requests()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nats_replicas_lose_nothing_when_one_is_killed_and_restarted() {
    let names = NatsNames::new();
    let llm = mock_llm(20).await;
    let dir = tempfile::tempdir().unwrap();
    let p = &names.prefix;
    let source = TestConfig::nats(&names).set(
        "source",
        format!(
            "{{kind: nats, url: \"{}\", stream: {}, subjects: [\"{p}.jobs.>\"], consumer: switchyard,\n         \
             ack_wait_ms: 3000, max_deliver: 50, batch: 16}}",
            nats_url(),
            names.jobs_stream
        ),
    );
    let path =
        replica_config(source, llm.addr(), &format!("{p}:")).write(dir.path(), "replica.yaml");
    let outputs = OutputCollector::start_nats(&nats_url(), &names.topics())
        .await
        .unwrap();
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::spawn(&path, dir.path().join(format!("replica-{i}.log"))))
        .collect();
    // The first replica up creates the stream; publish once it exists.
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.get_stream(&names.jobs_stream).await.is_err() {
        assert!(Instant::now() < deadline, "no replica created the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let n = 5000;
    let tenants = ["acme", "globex", "initech"];
    let messages = (0..n).map(|i| {
        (
            names.job_subject(tenants[i % 3]),
            job(&format!("s-{i}"), tenants[i % 3], "refund please"),
        )
    });
    publish_nats(&nats_url(), messages).await.unwrap();
    kill_restart_and_check(&mut replicas, &outputs, n, n / 2, || llm.stats().requests()).await;
    names.delete_streams().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_joining_and_leaving_under_load_lose_nothing_and_finish_nothing_twice() {
    let kafka = switchyard::testkit::EmbeddedKafka::start(JOBS_TOPIC, &topics(), 6).unwrap();
    let brokers = kafka.bootstrap_servers();
    let llm = mock_llm(20).await;
    let dir = tempfile::tempdir().unwrap();

    let g = rand::random::<u64>();
    let path = replica_config(
        kafka_source(&brokers, &format!("rebalance-{g:x}")),
        llm.addr(),
        &format!("it{g:x}:"),
    )
    .write(dir.path(), "replica.yaml");
    let log = |i: usize| dir.path().join(format!("replica-{i}.log"));
    let outputs = collector(&brokers);
    let n = 3000;
    publish(
        &brokers,
        JOBS_TOPIC,
        (0..n).map(|i| job(&format!("b-{i}"), "acme", "where is my order")),
    )
    .await
    .unwrap();

    let mut first = Replica::spawn(&path, log(0));
    outputs.wait_for(n / 6, STALL, |_| {}).await;
    let mut joiners: Vec<Replica> = (1..3).map(|i| Replica::spawn(&path, log(i))).collect();
    outputs.wait_for(n / 2, STALL, |_| {}).await;
    let (code, _) = joiners[0].terminate();
    assert_eq!(code, Some(0));
    let per_job = wait_all(&outputs, n, std::slice::from_ref(&first)).await;
    for replica in std::iter::once(&mut first).chain(joiners.iter_mut().skip(1)) {
        assert_eq!(replica.terminate().0, Some(0));
    }

    let all = outputs.snapshot();
    assert_schema_valid(&all);
    assert_eq!(per_job.len(), n, "no job lost");
    assert!(
        per_job.values().all(|&c| c == 1),
        "no job finished twice across rebalances"
    );
    // Replays (answered from Redis, no provider call) come from the mock cluster refusing the
    // commit made at revocation (RebalanceInProgress, which a real broker accepts), so the next
    // owner restarts from the last periodic commit.
    eprintln!(
        "{n} jobs across two rebalances: {} outputs ({} replays)",
        all.len(),
        all.len() - n
    );
    assert_eq!(
        llm.stats().requests(),
        2 * n as u64,
        "no provider call repeated"
    );
}
