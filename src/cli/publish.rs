//! `switchyard publish`: jobs from a JSONL file or generated, to the configured source.
//!
//! It reads the same config file as `run`, so jobs go exactly where the service reads them: the
//! Kafka jobs topic (keyed by tenant), or the NATS subject `<jobs prefix>.<tenant>`.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{self, StreamExt};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::Value;
use switchyard::config::{Plan, SourcePlan};
use switchyard::testkit::workload;
use switchyard::wire::TenantId;

use super::{load, subject_prefix};

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The service's config: jobs go to its source.
    #[arg(long, short)]
    pub config: PathBuf,
    /// A JSONL file with one job per line (`-` for standard input). Lines are sent verbatim,
    /// so invalid jobs can be published on purpose to exercise dead letters.
    #[arg(long, conflicts_with = "generate")]
    pub file: Option<PathBuf>,
    /// Publish this many generated sample jobs (several tenants, a few invalid and duplicates).
    #[arg(long)]
    pub generate: Option<usize>,
    /// Jobs per second; unlimited when absent.
    #[arg(long)]
    pub rate: Option<f64>,
}

/// The tenant token of a payload, for the Kafka key and the NATS subject.
fn tenant_of(payload: &[u8]) -> String {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| {
            v.get("tenant")
                .and_then(Value::as_str)
                .and_then(|t| TenantId::parse(t).ok())
        })
        .map_or_else(|| "_unknown".to_owned(), |t| t.to_string())
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let plan = load(&args.config)?;
    let payloads: Vec<Vec<u8>> = match (&args.file, args.generate) {
        (Some(path), _) => read_lines(path)?,
        (None, Some(n)) => workload(n, plan.limits.max_job_bytes)
            .into_iter()
            .map(|i| i.payload)
            .collect(),
        (None, None) => anyhow::bail!("give --file FILE (JSONL, `-` for stdin) or --generate N"),
    };
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of jobs per second"
        );
    }
    let bar = indicatif::ProgressBar::new(payloads.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} published  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let sender = Sender::open(&plan).await?;
    let pacing = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let total = payloads.len();
    let results: Vec<anyhow::Result<()>> = stream::iter(payloads.into_iter().enumerate())
        .then(|(i, payload)| async move {
            if let Some(every) = pacing {
                let due = started + every.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            payload
        })
        .map(|payload| {
            let (sender, bar) = (&sender, &bar);
            async move {
                let result = sender.send(payload).await;
                bar.inc(1);
                result
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    bar.finish_and_clear();
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {} of {total} jobs in {secs:.2}s ({:.1} jobs/s)",
        total - failed.len(),
        (total - failed.len()) as f64 / secs.max(1e-9)
    );
    if let Some(first) = failed.first() {
        eprintln!("{} failed; first error: {first:#}", failed.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let reader: Box<dyn std::io::BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if !line.trim().is_empty() {
            lines.push(line.into_bytes());
        }
    }
    Ok(lines)
}

enum Sender {
    Kafka {
        producer: FutureProducer,
        topic: String,
    },
    Nats {
        js: Box<async_nats::jetstream::Context>,
        prefix: String,
    },
}

impl Sender {
    async fn open(plan: &Plan) -> anyhow::Result<Self> {
        Ok(match &plan.source {
            SourcePlan::Kafka(k) => {
                let mut config = switchyard::connect::kafka(
                    &k.brokers,
                    &k.librdkafka,
                    &k.librdkafka_env,
                    "source",
                )?;
                config
                    .set("linger.ms", "5")
                    .set("enable.idempotence", "true");
                Sender::Kafka {
                    producer: config.create().context("creating the Kafka producer")?,
                    topic: k.topic.clone(),
                }
            }
            SourcePlan::Nats(n) => {
                let client = switchyard::connect::nats(
                    &n.url,
                    &n.access,
                    "switchyard-publish",
                    "source",
                    switchyard::connect::Retry::Never,
                )
                .await?;
                let prefix = subject_prefix(
                    n.subjects
                        .first()
                        .map(String::as_str)
                        .unwrap_or("switchyard.jobs"),
                )
                .to_owned();
                Sender::Nats {
                    js: Box::new(async_nats::jetstream::new(client)),
                    prefix,
                }
            }
        })
    }

    async fn send(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        let tenant = tenant_of(&payload);
        match self {
            Sender::Kafka { producer, topic } => {
                let record = FutureRecord::to(topic).key(&tenant).payload(&payload);
                producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
                    .await
                    .map_err(|(e, _)| e)?;
            }
            Sender::Nats { js, prefix } => {
                js.publish(format!("{prefix}.{tenant}"), payload.into())
                    .await?
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_prefixes_and_tenants_come_from_config_and_payload() {
        assert_eq!(subject_prefix("switchyard.jobs.>"), "switchyard.jobs");
        assert_eq!(subject_prefix("jobs.*"), "jobs");
        assert_eq!(tenant_of(br#"{"tenant":"acme"}"#), "acme");
        assert_eq!(tenant_of(br#"{"tenant":"a.b"}"#), "_unknown");
        assert_eq!(tenant_of(b"garbage"), "_unknown");
    }
}
