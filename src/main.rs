//! The `switchyard` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::{self, Faults, Latency, MockSettings};
use switchyard::{app, provider, telemetry};

mod cli;
use cli::{demo, publish, tail};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Stream processor for production LLM jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service with a config file (SWITCHYARD__* environment variables override it).
    Run {
        #[arg(long, short, env = "SWITCHYARD_CONFIG")]
        config: PathBuf,
        /// Log as JSON lines (overrides `log.format`).
        #[arg(long)]
        log_json: bool,
    },
    /// Run everything in one process (in-process Kafka, mock LLM) on a sample workload.
    Demo(demo::DemoArgs),
    /// Serve the mock LLM provider (OpenAI-compatible) on a local port.
    MockLlm {
        #[arg(long, default_value_t = 8089)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Median latency in milliseconds.
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        /// 99th percentile latency in milliseconds (log-normal); equal to --latency-ms for fixed.
        #[arg(long)]
        latency_p99_ms: Option<u64>,
        /// Share of requests answered 429 with Retry-After.
        #[arg(long, default_value_t = 0.0)]
        rate_429: f64,
        #[arg(long, default_value_t = 1)]
        retry_after_s: u64,
        /// Share of requests answered 500.
        #[arg(long, default_value_t = 0.0)]
        rate_500: f64,
        /// Share of requests that hang.
        #[arg(long, default_value_t = 0.0)]
        rate_hang: f64,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Publish jobs (JSONL file or generated) to the source of a config.
    Publish(publish::PublishArgs),
    /// Print results, review requests and dead letters as they arrive.
    Tail(tail::TailArgs),
    /// Benchmark the embedded deployment (drain: throughput against a bare loop; rate: latency).
    Bench(cli::bench::BenchArgs),
    /// Validate a config file; exits non-zero naming every bad field.
    CheckConfig { file: PathBuf },
    /// The prompt registry.
    #[command(subcommand)]
    Prompts(PromptsCommand),
    /// A/B experiments.
    #[command(subcommand)]
    Experiments(ExperimentsCommand),
    /// Spend by tenant, pipeline, model and variant from results as `tail --json` prints them
    /// (a file, or `-` for standard input), and what the response cache and routing saved
    /// against each pipeline's largest model, priced from the config.
    Cost {
        #[arg(long, short, env = "SWITCHYARD_CONFIG")]
        config: PathBuf,
        file: PathBuf,
        /// Only results completed at or after this time (RFC 3339).
        #[arg(long, conflicts_with = "hours")]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only results completed in the last this many hours.
        #[arg(long)]
        hours: Option<u32>,
    },
    /// The reviews waiting for a decision (from the config's state store), earliest deadline
    /// first. Decisions go to `reviews.decisions` (see docs/architecture.md, "Review").
    Reviews {
        #[arg(long, short, env = "SWITCHYARD_CONFIG")]
        config: PathBuf,
        /// Only this tenant's reviews.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per review (with the proposed output).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ExperimentsCommand {
    /// Per-variant jobs, share, latency, cost, review and degraded rates from results as
    /// `tail --json` prints them (a file, or `-` for standard input).
    Report { file: PathBuf },
}

#[derive(Subcommand)]
enum PromptsCommand {
    /// Record the content hash of every versioned prompt (name@version) in the config's
    /// prompt lock, so a later change of its text without a new version fails at start-up.
    Lock {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// glibc's allocator serialises the runtime's worker threads on its arena locks and spends a
/// fifth of the CPU of a busy replica; mimalloc's thread-local heaps do not (see the README's
/// Performance section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Work still running here (a broker close that never answered, a blocking call) was already
    // given its bounded time; it must not keep the process from exiting.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

/// Builds (without connecting) the clients the plan's source, sink and state store would use.
fn kafka_clients_build(plan: &config::Plan) -> anyhow::Result<()> {
    use rdkafka::producer::BaseProducer;
    switchyard::state::check(&plan.state)?;
    for (field, url) in [
        ("source.url", nats_url_of_source(plan)),
        ("sink.url", nats_url_of_sink(plan)),
    ] {
        if let Some(url) = url {
            for server in url.split(',') {
                server
                    .trim()
                    .parse::<async_nats::ServerAddr>()
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{field}: `{}` is not a NATS server address: {e}",
                            config::redact_url(server)
                        )
                    })?;
            }
        }
    }
    if let config::SourcePlan::Kafka(k) = &plan.source {
        switchyard::connect::kafka(&k.brokers, &k.librdkafka, &k.librdkafka_env, "source")?
            .create::<BaseProducer>()
            .map_err(|e| anyhow::anyhow!("source.librdkafka: {e}"))?;
    }
    if let config::SinkPlan::Kafka(k) = &plan.sink {
        switchyard::connect::kafka(&k.brokers, &k.librdkafka, &k.librdkafka_env, "sink")?
            .create::<BaseProducer>()
            .map_err(|e| anyhow::anyhow!("sink.librdkafka: {e}"))?;
    }
    Ok(())
}

fn nats_url_of_source(plan: &config::Plan) -> Option<&str> {
    match &plan.source {
        config::SourcePlan::Nats(n) => Some(&n.url),
        config::SourcePlan::Kafka(_) => None,
    }
}

fn nats_url_of_sink(plan: &config::Plan) -> Option<&str> {
    match &plan.sink {
        config::SinkPlan::Nats(n) => Some(&n.url),
        config::SinkPlan::Kafka(_) => None,
    }
}

/// How long leftover tasks get once the command has finished.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Cost {
            config,
            file,
            since,
            hours,
        } => {
            let since = since.or_else(|| {
                hours.map(|h| chrono::Utc::now() - chrono::Duration::hours(i64::from(h)))
            });
            cli::cost::run(&config, &file, since)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reviews {
            config,
            tenant,
            limit,
            json,
        } => {
            cli::reviews::list(&config, tenant.as_deref(), limit, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Experiments(ExperimentsCommand::Report { file }) => {
            cli::experiments::run(&file)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Prompts(PromptsCommand::Lock { config: file }) => {
            match config::lock_prompts(&file) {
                Ok((lock, n)) => {
                    println!("{}: {n} prompt version(s) locked", lock.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(plan) => {
                for warning in &plan.warnings {
                    eprintln!("warning: {warning}");
                }
                // What `run` would reject when building its Kafka clients (an unknown or
                // unsupported librdkafka property, an unreadable CA file, a missing secret).
                if let Err(e) = kafka_clients_build(&plan) {
                    eprintln!("invalid config {}:\n  - {e:#}", file.display());
                    return Ok(ExitCode::FAILURE);
                }
                println!(
                    "{}: ok ({} providers, {} models, {} pipelines)",
                    file.display(),
                    plan.providers.len(),
                    plan.models.len(),
                    plan.pipelines.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run {
            config: path,
            log_json,
        } => {
            let plan = match config::load(&path) {
                Ok(plan) => plan,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            telemetry::init_tracing(&plan.log.filter, plan.log.json || log_json);
            for warning in &plan.warnings {
                tracing::warn!(%warning, "config");
            }
            let shutdown = CancellationToken::new();
            let service = app::run(plan, shutdown.clone());
            tokio::pin!(service);
            let result = tokio::select! {
                result = &mut service => result,
                () = wait_for_signal() => {
                    tracing::info!("shutdown requested; draining");
                    shutdown.cancel();
                    service.await
                }
            };
            result.map(|()| ExitCode::SUCCESS)
        }
        Command::Publish(args) => {
            telemetry::init_tracing("warn", false);
            publish::publish(args).await
        }
        Command::Tail(args) => {
            telemetry::init_tracing("warn", false);
            tail::tail(args).await
        }
        // The bench installs its own subscriber: the service's lines are formatted and dropped.
        Command::Bench(args) => cli::bench::run(args).await,
        Command::Demo(args) => {
            telemetry::init_tracing("error", false);
            demo::run(args).await
        }
        Command::MockLlm {
            port,
            host,
            latency_ms,
            latency_p99_ms,
            rate_429,
            retry_after_s,
            rate_500,
            rate_hang,
            seed,
        } => {
            telemetry::init_tracing("info", false);
            let latency = match latency_p99_ms {
                Some(p99) if p99 > latency_ms && latency_ms > 0 => Latency::Lognormal {
                    p50_ms: latency_ms,
                    p99_ms: p99,
                },
                _ => Latency::Fixed { ms: latency_ms },
            };
            for (name, rate) in [
                ("--rate-429", rate_429),
                ("--rate-500", rate_500),
                ("--rate-hang", rate_hang),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&rate),
                    "{name} must be between 0 and 1"
                );
            }
            let settings = MockSettings {
                latency,
                faults: Faults {
                    rate_429,
                    retry_after_s,
                    rate_500,
                    rate_hang,
                },
                seed,
                ..MockSettings::default()
            };
            let server =
                provider::mock::MockServer::start(&format!("{host}:{port}"), settings).await?;
            println!(
                "mock LLM listening on http://{}/v1 (POST /v1/chat/completions, GET /mock/stats)",
                server.addr()
            );
            wait_for_signal().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
