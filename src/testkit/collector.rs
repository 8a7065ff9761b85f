//! Reading the output topics (Kafka) or subjects (NATS) back: every result, review request and
//! dead letter, typed and as raw JSON, so a test or the demo can account for each job.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config;
use crate::wire::{DeadLetter, JobResult};

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

/// Reads one output message: typed, and as raw JSON. The typed form is read from the parsed
/// tree where it lies, without a copy of it (`bench` reads every output of its Kafka shape while
/// the service runs, in the same process).
pub fn parse_output(kind: OutputKind, topic: &str, payload: &[u8]) -> (Collected, Value) {
    use serde::Deserialize as _;
    let value: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let parsed = match kind {
        OutputKind::DeadLetter => DeadLetter::deserialize(&value).map(Collected::DeadLetter),
        OutputKind::Review => JobResult::deserialize(&value).map(Collected::Review),
        OutputKind::Result => JobResult::deserialize(&value).map(Collected::Result),
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
