//! Output sinks: results, review requests and dead letters to their topics.
//!
//! `send` resolves only when the broker confirmed the write; the job's ack waits for it.

pub mod kafka;
pub mod nats;

use std::future::Future;

/// Where an output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Results,
    Review,
    DeadLetters,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub destination: Destination,
    /// The tenant, when known: the message key, so one tenant's outputs stay in order.
    pub tenant: Option<String>,
    pub payload: bytes::Bytes,
    /// Propagated W3C `traceparent` (validated at the source), written as a message header.
    pub traceparent: Option<String>,
    /// Deterministic id of this output: the same job (tenant + idempotency key, or the source
    /// position of an undecodable message) and the same output kind give the same id, so a
    /// broker with duplicate detection (JetStream `Nats-Msg-Id`) drops a second copy. Lowercase
    /// hex, safe in any header.
    pub id: String,
}

/// A header value a broker or consumer can take as it is: printable ASCII only, so no CR/LF
/// can split a header and no control character reaches a consumer. Anything else is dropped.
pub fn header_value(value: &str) -> Option<&str> {
    (!value.is_empty() && value.len() <= 256 && value.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .then_some(value)
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The broker did not confirm in time or is unreachable: retry later.
    #[error("output write failed, will retry: {0}")]
    Transient(String),
    /// The topic refuses writes (not authorized, missing, invalid): nothing this output can
    /// change, and an operator can fix it. The write is retried, intake pauses and readiness
    /// fails meanwhile; the output is never replaced.
    #[error("output topic rejects writes: {0}")]
    Rejected(String),
    /// This output itself can never be written (larger than the broker takes).
    #[error("output cannot be written: {0}")]
    Permanent(String),
}

pub trait OutputSink: Send + Sync + 'static {
    fn send(&self, output: &Output) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Waits until queued writes are confirmed, up to the sink's delivery timeout.
    fn flush(&self) -> impl Future<Output = ()> + Send;
}

/// The configured sink (enum dispatch over the transports).
#[derive(Clone)]
pub enum Sink {
    Kafka(kafka::KafkaSink),
    Nats(Box<nats::NatsSink>),
}

impl Sink {
    /// Opens the sink; a NATS sink shares a connection in `connections` where it can.
    pub async fn open(
        plan: &crate::config::SinkPlan,
        connections: &mut crate::connect::NatsConnections,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        Ok(match plan {
            crate::config::SinkPlan::Kafka(k) => {
                Sink::Kafka(kafka::KafkaSink::new(k).context("creating the Kafka producer (sink)")?)
            }
            crate::config::SinkPlan::Nats(n) => {
                Sink::Nats(Box::new(nats::NatsSink::connect(n, connections).await?))
            }
        })
    }
}

impl OutputSink for Sink {
    async fn send(&self, output: &Output) -> Result<(), SinkError> {
        match self {
            Sink::Kafka(s) => s.send(output).await,
            Sink::Nats(s) => s.send(output).await,
        }
    }

    async fn flush(&self) {
        match self {
            Sink::Kafka(s) => s.flush().await,
            Sink::Nats(s) => s.flush().await,
        }
    }
}
