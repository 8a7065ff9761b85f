//! `switchyard bench`: the service under load against a bare loop that does only the unavoidable
//! I/O of a job, over the same services in the same invocation, one after the other. The mock
//! provider runs in a child process, so the CPU this process uses is the service's (or the bare
//! loop's) own.
//!
//! Shapes (`--shape`):
//! * `kafka`: librdkafka's in-process cluster in and out, in-memory state (the embedded default;
//!   the in-process broker's CPU is counted for both sides alike).
//! * `nats`: NATS JetStream in and out and Redis state, the multi-replica deployment
//!   (`config/nats-redis.yaml`); needs the servers at `--nats-url` and `--redis-url`.
//!
//! Modes (`--mode`):
//! * `drain`: a backlog of `--jobs` (10 tenants, 2% duplicates, 1% invalid) is drained by each
//!   side in turn: throughput, CPU per job (from this process's rusage), Redis commands and broker
//!   messages per job, and the ratios. `--provider-latency-ms 0` makes it CPU-bound.
//! * `rate`: jobs are offered at `--rate` per second to each side in turn: the sustained rate,
//!   end-to-end latency and overhead (end-to-end minus the provider's own latency).
//! * `backlog`: resident memory while a deep backlog waits behind a slow provider, against a
//!   run with a tenth of the backlog (see [`backlog`]).
//!
//! `--plot FILE.svg` draws throughput over time and the latency distribution of both sides.
//! `--rounds N` runs both sides N times, switchyard first in odd rounds and the bare loop first
//! in even ones, and reports the round with the median
//! throughput ratio, listing every round's ratios: on a virtual machine one round's figures
//! can be off by a quarter or more either way.

mod backlog;
mod kafka;
mod nats;
mod plot;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt as _;

use switchyard::testkit::Collected;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Drain,
    Rate,
    /// Resident memory with a deep backlog behind a slow provider.
    Backlog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// The in-process Kafka cluster and in-memory state (no external services).
    Kafka,
    /// NATS JetStream in and out, Redis state: the multi-replica shape.
    Nats,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "drain")]
    pub mode: Mode,
    #[arg(long, value_enum, default_value = "kafka")]
    pub shape: Shape,
    /// Jobs to run (each side).
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Jobs per second offered in rate mode.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// The mock provider's fixed latency per call; 0 makes the drain CPU-bound.
    #[arg(long, default_value_t = 200)]
    pub provider_latency_ms: u64,
    /// Jobs in flight (switchyard's limits.max_inflight_jobs and max_running_jobs, and the bare
    /// loop's bound).
    #[arg(long, default_value_t = 512)]
    pub inflight: usize,
    /// Backlog mode: how long each run works through its backlog.
    #[arg(long, default_value_t = 20)]
    pub duration_s: u64,
    /// NATS server for `--shape nats`.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Redis server for `--shape nats`.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Format the service's log lines as JSON (they are formatted at the default level, as in
    /// production, and discarded).
    #[arg(long)]
    pub log_json: bool,
    /// Draw throughput over time and the latency distribution of both sides to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Drain and rate modes: run both sides this many times (switchyard first, then the bare
    /// loop first, and so on), and report the round
    /// with the median throughput ratio (every round's ratios are listed). On a shared or
    /// virtual machine one round can be off by a quarter either way. Loss or a double answer in
    /// any round fails the run.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
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

/// What one side (switchyard or the bare loop) measured.
#[derive(Debug, Serialize)]
struct Side {
    jobs_per_s: f64,
    cpu_ms_per_job: f64,
    /// Requests sent to Redis (a command, a script or a pipeline each).
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_round_trips_per_job: Option<f64>,
    /// Commands Redis executed, those run inside scripts included.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_commands_per_job: Option<f64>,
    /// Messages sent and received by the side's NATS clients (pulls, deliveries, publishes,
    /// publish acks, job acks).
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_messages_per_job: Option<f64>,
    latency_ms: Percentiles,
    overhead_ms: Percentiles,
    #[serde(skip)]
    timeline: Timeline,
}

/// Per finished job: when it finished and its end-to-end and overhead latency (microseconds).
#[derive(Debug, Default)]
struct Timeline {
    done_us: Vec<u64>,
    latency_us: Vec<u64>,
    overhead_us: Vec<u64>,
}

impl Timeline {
    fn push(&mut self, done_us: u64, latency_us: u64, overhead_us: u64) {
        self.done_us.push(done_us);
        self.latency_us.push(latency_us.max(1));
        self.overhead_us.push(overhead_us.max(1));
    }
}

/// Raw figures of one side's window, turned into a [`Side`] by [`measure`].
struct Window {
    jobs: usize,
    elapsed: Duration,
    cpu: Duration,
    redis_round_trips: Option<u64>,
    redis_commands: Option<u64>,
    broker_messages: Option<u64>,
    timeline: Timeline,
}

fn measure(w: Window) -> anyhow::Result<Side> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut overhead = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for (l, o) in w.timeline.latency_us.iter().zip(&w.timeline.overhead_us) {
        latency.saturating_record(*l);
        overhead.saturating_record(*o);
    }
    let jobs = w.jobs.max(1) as f64;
    let per_job = |n: u64| (n as f64 / jobs * 100.0).round() / 100.0;
    Ok(Side {
        jobs_per_s: (w.jobs as f64 / w.elapsed.as_secs_f64().max(1e-3) * 10.0).round() / 10.0,
        cpu_ms_per_job: (w.cpu.as_secs_f64() * 1000.0 / jobs * 1000.0).round() / 1000.0,
        redis_round_trips_per_job: w.redis_round_trips.map(per_job),
        redis_commands_per_job: w.redis_commands.map(per_job),
        broker_messages_per_job: w.broker_messages.map(per_job),
        latency_ms: Percentiles::of(&latency),
        overhead_ms: Percentiles::of(&overhead),
        timeline: w.timeline,
    })
}

#[derive(Debug, Clone, Serialize)]
struct Ratios {
    throughput: f64,
    cpu_per_job: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_round_trips_per_job: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    mode: Mode,
    shape: Shape,
    jobs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    offered_jobs_per_s: Option<f64>,
    provider_latency_ms: u64,
    inflight: usize,
    switchyard: Side,
    bare_loop: Side,
    /// switchyard / bare loop.
    ratio: Ratios,
    /// Commands Redis executed for switchyard per job, by command, those inside its scripts
    /// included (NATS shape).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    redis_commands: Vec<(String, f64)>,
    lost: usize,
    duplicated: usize,
    dead_letters: usize,
    /// With `--rounds` above 1: every round's ratios, in the order run (the report is the
    /// round with the median throughput ratio; lost and duplicated are that round's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rounds: Vec<Ratios>,
}

/// CPU time (user + system) this process has used, from getrusage.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointer it is given; RUSAGE_SELF is valid.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return Duration::ZERO;
        }
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn micros_now() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0)
}

/// The tenants jobs are spread over.
const TENANTS: usize = 10;

/// One job of the bench workload.
#[derive(Clone)]
pub struct BenchJob {
    pub tenant: String,
    pub payload: Vec<u8>,
}

/// The workload: jobs spread over ten tenants; every 50th repeats an earlier job (2%
/// duplicates, byte for byte), every 100th is not valid JSON (1%, a dead letter).
pub struct Workload {
    /// Valid jobs so far, with their tenant: the duplicates repeat them.
    originals: Vec<BenchJob>,
}

impl Workload {
    pub fn new() -> Self {
        Self {
            originals: Vec::new(),
        }
    }

    /// Job `i`, stamped with the current time (end-to-end latency starts there).
    pub fn job(&mut self, i: usize) -> BenchJob {
        let tenant = format!("t{}", i % TENANTS);
        if i % 100 == 98 {
            let payload =
                format!("{{\"id\": \"b-{i:07}\", \"tenant\": \"{tenant}\", \"input\": {{\"te");
            return BenchJob {
                tenant,
                payload: payload.into_bytes(),
            };
        }
        if i % 50 == 49 {
            // An earlier job again, byte for byte, under its own tenant.
            if let Some(original) = self.originals.iter().rev().nth(6) {
                return original.clone();
            }
        }
        let job = BenchJob {
            payload: bench_job(i, &tenant),
            tenant,
        };
        self.originals.push(job.clone());
        job
    }
}

fn bench_job(i: usize, tenant: &str) -> Vec<u8> {
    json!({"id": format!("b-{i:07}"), "tenant": tenant, "pipeline": "support",
           "input": {"text": format!("My invoice {i} lists a plan I cancelled; please check the charge.")},
           "metadata": {"sent_us": micros_now()}})
    .to_string()
    .into_bytes()
}

/// The mock provider in a child process (`switchyard mock-llm`): fixed latency, no faults.
pub struct MockProcess {
    child: tokio::process::Child,
    pub base_url: String,
}

impl MockProcess {
    pub async fn start(latency_ms: u64) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = tokio::process::Command::new(exe)
            .args(["mock-llm", "--port", &port.to_string()])
            .args(["--latency-ms", &latency_ms.to_string(), "--seed", "7"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the mock provider process")?;
        let stdout = child.stdout.take().context("mock provider stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("the mock provider did not start within 20 s")??;
        anyhow::ensure!(
            first.is_some_and(|l| l.contains("listening")),
            "the mock provider process did not start"
        );
        let mock = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}/v1"),
        };
        mock.warm_up().await;
        Ok(mock)
    }

    /// A few calls before anything is measured: the mock's first answers load its tokenizer
    /// and grow its pools, which would otherwise land on whichever side runs first.
    async fn warm_up(&self) {
        let http = reqwest::Client::new();
        let endpoint = format!("{}/chat/completions", self.base_url);
        let job: Value = serde_json::from_slice(&bench_job(0, "warm-up")).unwrap_or_default();
        let calls = (0..64).map(|_| bare_calls(&job, &http, &endpoint));
        futures::future::join_all(calls).await;
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.jobs > 0, "--jobs must be at least 1");
    anyhow::ensure!(args.inflight > 0, "--inflight must be at least 1");
    // Everything the service logs at its default level is formatted, as in production, and
    // discarded.
    switchyard::telemetry::init_tracing_to("info", args.log_json, false, std::io::sink);
    if let Mode::Backlog = args.mode {
        backlog::run(&args).await?;
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be positive"
    );
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let mock = MockProcess::start(args.provider_latency_ms).await?;
    let mut rounds = Vec::with_capacity(args.rounds);
    let mut failure = None;
    for round in 0..args.rounds {
        // Every other round the bare loop goes first, so neither side always meets the
        // services (and this process's heap) fresh.
        let bare_first = round % 2 == 1;
        let outcome = match args.shape {
            Shape::Kafka => kafka::run(&args, &mock.base_url, bare_first).await,
            Shape::Nats => nats::run(&args, &mock.base_url, bare_first).await,
        };
        match outcome {
            Ok(measured) => rounds.push(round_report(&args, measured)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    mock.stop().await;
    if let Some(e) = failure {
        return Err(e);
    }
    // Loss or a double answer in any round fails the run, whichever round is reported.
    let (lost, duplicated) = rounds
        .iter()
        .fold((0, 0), |(l, d), r| (l + r.lost, d + r.duplicated));
    let ratios: Vec<Ratios> = rounds.iter().map(|r| r.ratio.clone()).collect();
    rounds.sort_by(|a, b| a.ratio.throughput.total_cmp(&b.ratio.throughput));
    let median = rounds.len() / 2;
    let mut report = rounds.swap_remove(median);
    if ratios.len() > 1 {
        report.rounds = ratios;
    }
    if let Some(path) = &args.plot {
        plot::write(path, &report)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
        if let Some(path) = &args.plot {
            println!("  plot written to {}", path.display());
        }
    }
    Ok(if lost == 0 && duplicated == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One round's report from what its shape measured.
fn round_report(args: &BenchArgs, measured: Measured) -> Report {
    let (switchyard, bare, outputs, redis_commands) = measured;
    let (lost, duplicated, dead_letters) = account(&outputs, args.jobs);
    let ratio = |a: f64, b: f64| (a / b.max(1e-9) * 1000.0).round() / 1000.0;
    Report {
        mode: args.mode,
        shape: args.shape,
        jobs: args.jobs,
        offered_jobs_per_s: (args.mode == Mode::Rate).then_some(args.rate),
        provider_latency_ms: args.provider_latency_ms,
        inflight: args.inflight,
        ratio: Ratios {
            throughput: ratio(switchyard.jobs_per_s, bare.jobs_per_s),
            cpu_per_job: ratio(switchyard.cpu_ms_per_job, bare.cpu_ms_per_job),
            redis_round_trips_per_job: switchyard
                .redis_round_trips_per_job
                .zip(bare.redis_round_trips_per_job)
                .map(|(a, b)| ratio(a, b)),
        },
        switchyard,
        bare_loop: bare,
        redis_commands,
        lost,
        duplicated,
        dead_letters,
        rounds: Vec::new(),
    }
}

/// What a shape returns: switchyard's side, the bare loop's, switchyard's outputs and its Redis
/// commands per job by command.
type Measured = (Side, Side, Vec<(Collected, Value)>, Vec<(String, f64)>);

/// Switchyard's side from its outputs: results' completion times and latency (from the job's
/// `sent_us` stamp), overhead = latency minus the provider's latency for the calls made.
/// Duplicates (replayed results) are not jobs of their own and are left out.
fn switchyard_timeline(outputs: &[(Collected, Value)], provider_latency_ms: u64) -> Timeline {
    let mut timeline = Timeline::default();
    for (c, _) in outputs {
        let (Collected::Result(r) | Collected::Review(r)) = c else {
            continue;
        };
        if r.duplicate {
            continue;
        }
        let Some(sent) = r
            .metadata
            .as_ref()
            .and_then(|m| m.get("sent_us"))
            .and_then(Value::as_u64)
        else {
            continue;
        };
        let done = u64::try_from(r.completed_at.timestamp_micros()).unwrap_or(0);
        let e2e = done.saturating_sub(sent);
        let calls: u64 = r
            .steps
            .iter()
            .filter(|s| s.provider.is_some())
            .map(|s| u64::from(s.attempts))
            .sum();
        timeline.push(
            done,
            e2e,
            e2e.saturating_sub(calls * provider_latency_ms * 1000),
        );
    }
    timeline
}

/// (lost, duplicated, dead letters): distinct jobs without an original output, original
/// outputs beyond one per job, and dead letters.
fn account(outputs: &[(Collected, Value)], jobs: usize) -> (usize, usize, usize) {
    let mut workload = Workload::new();
    let mut expected: Vec<String> = (0..jobs)
        .map(|i| workload.job(i))
        .filter_map(|j| serde_json::from_slice::<Value>(&j.payload).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    expected.sort_unstable();
    expected.dedup();
    let mut ids: Vec<&str> = Vec::new();
    let mut dead = 0;
    for (c, _) in outputs {
        match c {
            Collected::Result(r) | Collected::Review(r) if !r.duplicate => ids.push(&r.job_id),
            Collected::DeadLetter(_) => dead += 1,
            _ => {}
        }
    }
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    let lost = expected
        .iter()
        .filter(|id| ids.binary_search(&id.as_str()).is_err())
        .count();
    (lost, total - ids.len(), dead)
}

/// Waits until `drained` says so, checking every 20 ms; gives up after `stall` without
/// progress (`progress` returns a count that should keep rising).
async fn wait_until<F, Fut>(stall: Duration, mut drained: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, u64)>,
{
    let mut last = (u64::MAX, std::time::Instant::now());
    loop {
        let (done, progress) = drained().await;
        if done {
            return Ok(());
        }
        if progress != last.0 {
            last = (progress, std::time::Instant::now());
        }
        anyhow::ensure!(
            last.1.elapsed() < stall,
            "no progress for {} s (at {progress})",
            stall.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn print_report(r: &Report) {
    println!(
        "switchyard bench ({:?}, {:?} shape): {} jobs over {TENANTS} tenants (2% duplicates, 1% invalid), provider latency {} ms, {} in flight{}",
        r.mode,
        r.shape,
        r.jobs,
        r.provider_latency_ms,
        r.inflight,
        r.offered_jobs_per_s
            .map_or(String::new(), |o| format!(", {o} jobs/s offered"))
    );
    let (s, b) = (&r.switchyard, &r.bare_loop);
    println!(
        "  {:<28} {:>12} {:>12} {:>8}",
        "", "switchyard", "bare loop", "ratio"
    );
    println!(
        "  {:<28} {:>12.1} {:>12.1} {:>8.3}",
        "throughput (jobs/s)", s.jobs_per_s, b.jobs_per_s, r.ratio.throughput
    );
    println!(
        "  {:<28} {:>12.3} {:>12.3} {:>8.3}",
        "CPU per job (ms)", s.cpu_ms_per_job, b.cpu_ms_per_job, r.ratio.cpu_per_job
    );
    if let (Some(a), Some(c)) = (s.redis_round_trips_per_job, b.redis_round_trips_per_job) {
        println!("  {:<28} {a:>12.2} {c:>12.2}", "Redis round trips per job");
    }
    if let (Some(a), Some(c)) = (s.redis_commands_per_job, b.redis_commands_per_job) {
        println!("  {:<28} {a:>12.2} {c:>12.2}", "Redis commands per job");
    }
    if let (Some(a), Some(c)) = (s.broker_messages_per_job, b.broker_messages_per_job) {
        println!("  {:<28} {a:>12.2} {c:>12.2}", "NATS messages per job");
    }
    for (name, p, q) in [
        ("end-to-end p50 (ms)", s.latency_ms.p50, b.latency_ms.p50),
        ("end-to-end p99 (ms)", s.latency_ms.p99, b.latency_ms.p99),
        ("overhead p50 (ms)", s.overhead_ms.p50, b.overhead_ms.p50),
        ("overhead p99 (ms)", s.overhead_ms.p99, b.overhead_ms.p99),
    ] {
        println!("  {name:<28} {p:>12.1} {q:>12.1}");
    }
    if !r.redis_commands.is_empty() {
        let parts: Vec<String> = r
            .redis_commands
            .iter()
            .map(|(c, n)| format!("{c} {n:.2}"))
            .collect();
        println!(
            "  Redis commands per switchyard job (inside scripts included): {}",
            parts.join(", ")
        );
    }
    println!(
        "  overhead = end-to-end minus the provider's own latency; CPU from this process's rusage (the mock provider runs in a child process{})",
        if r.shape == Shape::Kafka {
            "; the in-process Kafka cluster is counted for both sides"
        } else {
            ""
        }
    );
    println!(
        "  lost {}, answered twice {}, dead letters {}",
        r.lost, r.duplicated, r.dead_letters
    );
    if !r.rounds.is_empty() {
        let list = |f: fn(&Ratios) -> f64| {
            let parts: Vec<String> = r.rounds.iter().map(|x| format!("{:.3}", f(x))).collect();
            parts.join(", ")
        };
        // The round shown has the median throughput ratio; its CPU ratio need not be the
        // median one (the upper median for an even count, as for the round shown).
        let mut cpu: Vec<f64> = r.rounds.iter().map(|x| x.cpu_per_job).collect();
        cpu.sort_by(f64::total_cmp);
        println!(
            "  {} rounds (switchyard first in odd rounds, the bare loop in even ones), the median throughput ratio's shown; throughput ratios {}; CPU per job ratios {} (median {:.3})",
            r.rounds.len(),
            list(|x| x.throughput),
            list(|x| x.cpu_per_job),
            cpu.get(cpu.len() / 2).copied().unwrap_or(f64::NAN)
        );
    }
}

/// The bare loop's two provider calls for `job` (a classification, then the answer); the
/// answer's JSON, or `None` when a call failed.
async fn bare_calls(job: &Value, http: &reqwest::Client, endpoint: &str) -> Option<Value> {
    let text = job
        .pointer("/input/text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut answer = Value::Null;
    for prompt in [
        format!("Categories: billing, technical\n\n{text}"),
        text.to_owned(),
    ] {
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "max_tokens": 512});
        let response = http.post(endpoint).json(&body).send().await.ok()?;
        answer = response.json::<Value>().await.ok()?;
    }
    Some(answer)
}

/// The overrides both shapes make to their config: the provider at `provider_key` pointed at
/// the mock, and every in-flight bound at `--inflight`.
fn service_overrides(
    args: &BenchArgs,
    provider_key: &'static str,
    llm: &str,
) -> Vec<(&'static str, String)> {
    vec![
        (
            provider_key,
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
    ]
}

/// Waits (up to 30 s) for the service to report ready.
async fn wait_ready(health: &switchyard::telemetry::health::Health) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !health.is_ready() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The service on `plan` in the background: its task, its health and the token that stops it.
async fn start_service(
    plan: switchyard::config::Plan,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    std::sync::Arc<switchyard::telemetry::health::Health>,
    tokio_util::sync::CancellationToken,
)> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
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
