//! `switchyard tail`: results, review requests and dead letters as they arrive, one readable
//! line each (or the raw JSON), from the outputs the config's sink writes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use futures::stream::{self, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use serde_json::Value;
use switchyard::config::SinkPlan;
use switchyard::testkit::{parse_output, Collected, OutputKind};

use super::load;

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The service's config: outputs are read from its sink.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Print each output as one JSON line (as written by the service).
    #[arg(long)]
    pub json: bool,
    /// Start from the oldest retained output instead of new ones only.
    #[arg(long)]
    pub from_beginning: bool,
    /// Only one kind of output.
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// Stop after this many outputs.
    #[arg(long)]
    pub count: Option<usize>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Only {
    Results,
    Review,
    Dlq,
}

pub async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let plan = load(&args.config)?;
    let topics = plan.sink.topics().clone();
    let wanted: Vec<&String> = match args.only {
        None => vec![&topics.results, &topics.review, &topics.dlq],
        Some(Only::Results) => vec![&topics.results],
        Some(Only::Review) => vec![&topics.review],
        Some(Only::Dlq) => vec![&topics.dlq],
    };
    let mut seen = 0usize;
    let mut print = |kind: OutputKind, topic: &str, payload: &[u8]| -> bool {
        let (collected, raw) = parse_output(kind, topic, payload);
        if args.json {
            println!("{raw}");
        } else {
            println!("{}", pretty(&collected));
        }
        seen += 1;
        args.count.is_some_and(|n| seen >= n)
    };
    match &plan.sink {
        SinkPlan::Kafka(k) => {
            let consumer: StreamConsumer =
                switchyard::connect::kafka(&k.brokers, &k.librdkafka, &k.librdkafka_env, "sink")?
                    .set(
                        "group.id",
                        format!("switchyard-tail-{:016x}", rand::random::<u64>()),
                    )
                    .set(
                        "auto.offset.reset",
                        if args.from_beginning {
                            "earliest"
                        } else {
                            "latest"
                        },
                    )
                    .set("enable.auto.commit", "false")
                    .create()
                    .context("creating the Kafka consumer")?;
            let names: Vec<&str> = wanted.iter().map(|t| t.as_str()).collect();
            consumer.subscribe(&names)?;
            loop {
                let message = consumer.recv().await?;
                let kind = OutputKind::of(&topics, message.topic());
                if print(kind, message.topic(), message.payload().unwrap_or_default()) {
                    break;
                }
            }
        }
        SinkPlan::Nats(n) => {
            let client = switchyard::connect::nats(
                &n.url,
                &n.access,
                "switchyard-tail",
                "sink",
                switchyard::connect::Retry::Never,
            )
            .await?;
            let mut subscriptions = Vec::new();
            let mut subjects = Vec::new();
            for prefix in &wanted {
                let subject = format!("{prefix}.>");
                subscriptions.push(client.subscribe(subject.clone()).await?);
                subjects.push(subject);
            }
            // Once the server has the subscriptions, nothing published from now on is missed.
            client.flush().await?;
            if args.from_beginning {
                eprintln!("note: NATS tail shows new outputs only; replay the output stream with `nats stream view`");
            }
            eprintln!("listening on {}", subjects.join(", "));
            let mut merged = stream::select_all(subscriptions);
            while let Some(message) = merged.next().await {
                let subject = message.subject.as_str();
                let prefix = subject.rsplit_once('.').map_or(subject, |(p, _)| p);
                if print(OutputKind::of(&topics, prefix), subject, &message.payload) {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One readable line per output.
pub fn pretty(collected: &Collected) -> String {
    match collected {
        Collected::Result(r) | Collected::Review(r) => {
            let route = match (&r.route.category, &r.route.model) {
                (Some(c), Some(m)) => format!("{c}->{m}"),
                (Some(c), None) => c.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => "-".into(),
            };
            let status = if r.duplicate {
                format!("{} (dup)", r.status.as_str())
            } else {
                r.status.as_str().to_owned()
            };
            let output = match &r.output {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let short: String = output.chars().take(80).collect();
            format!(
                "{}  {status:<10} {:<12} {:<16} {:<10} {route:<22} {:>6}ms  in={} out={}  ${:.6}  {short:?}",
                r.completed_at.format("%H:%M:%S%.3f"),
                r.tenant,
                r.job_id,
                r.pipeline,
                r.latency_ms,
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.cost_usd
            )
        }
        Collected::DeadLetter(d) => format!(
            "{}  {:<10} {:<12} {:<16} {:<18} {:?}",
            d.failed_at.format("%H:%M:%S%.3f"),
            if d.duplicate { "DLQ (dup)" } else { "DLQ" },
            d.tenant.as_deref().unwrap_or("-"),
            d.job_id.as_deref().unwrap_or("-"),
            d.reason.as_str(),
            d.error
        ),
        Collected::Unreadable { topic, error } => format!("unreadable output on {topic}: {error}"),
    }
}
