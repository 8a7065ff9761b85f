//! Job sources: broker messages in, [`Delivery`] values out.
//!
//! The pipeline never sees a broker type: a delivery is the payload bytes, where they came from,
//! and an [`AckHandle`]. Acking says "this job's result or dead letter is confirmed written";
//! dropping the handle unacked hands the message back (it is redelivered after a restart or
//! rebalance), which is what shutdown does with work it could not finish.

pub mod kafka;
pub mod nats;

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;

use chrono::{DateTime, Utc};

use crate::wire::SourceInfo;

pub struct Delivery {
    pub payload: Vec<u8>,
    /// The W3C `traceparent` header of the message, carried to the outputs and logs.
    pub traceparent: Option<String>,
    pub source: SourceInfo,
    /// The tenant the transport vouches for (the NATS subject's tenant token, or the Kafka key
    /// with `tenant_from: key`); the job's own `tenant` must match it.
    pub tenant: Option<String>,
    pub received_at: DateTime<Utc>,
    pub ack: AckHandle,
}

/// Transport-specific acknowledgement of one delivery.
pub trait Acknowledge: Send + Sync {
    /// The job's output is confirmed written. `poison` marks a message that can never succeed
    /// (an invalid job): transports that can, tell the broker not to redeliver it.
    fn ack(self: Box<Self>, poison: bool) -> BoxFuture<'static, ()>;

    /// The job is still being worked on (JetStream in-progress ack); a no-op where the broker
    /// does not redeliver on a timer.
    fn keep_alive(&self) -> BoxFuture<'_, ()>;

    /// How often [`Acknowledge::keep_alive`] must be called, if at all.
    fn keep_alive_every(&self) -> Option<Duration>;

    /// The job could not be finished here: let the broker redeliver it (JetStream nak; Kafka
    /// leaves the offset uncommitted).
    fn hand_back(self: Box<Self>) -> BoxFuture<'static, ()>;

    /// Whether this delivery still belongs to this consumer (Kafka: its partition was not
    /// revoked since it was read).
    fn still_ours(&self) -> bool {
        true
    }

    /// Whether the broker can redeliver this message after a delay without it counting against
    /// a delivery limit it is close to (JetStream nak with delay; Kafka with a delay topic).
    fn can_defer(&self) -> bool {
        false
    }

    /// Hands the message back for redelivery after `delay` (where [`Self::can_defer`]).
    fn defer(self: Box<Self>, _delay: Duration) -> BoxFuture<'static, ()> {
        self.hand_back()
    }

    /// `Some(deliveries made)` when a hand-back now would be the end of the message: no
    /// redelivery will follow (JetStream's `max_deliver` reached; Kafka's local redelivery
    /// limit outside shutdown). The engine then dead-letters it instead of handing it back.
    /// `stopping`: the process is shutting down (Kafka redelivers after the restart).
    fn last_delivery(&self, _stopping: bool) -> Option<u64> {
        None
    }
}

pub struct AckHandle(Box<dyn Acknowledge>);

impl AckHandle {
    pub fn new(inner: impl Acknowledge + 'static) -> Self {
        Self(Box::new(inner))
    }

    pub async fn ack(self, poison: bool) {
        self.0.ack(poison).await;
    }

    pub async fn hand_back(self) {
        self.0.hand_back().await;
    }

    pub fn can_defer(&self) -> bool {
        self.0.can_defer()
    }

    /// See [`Acknowledge::still_ours`].
    pub fn still_ours(&self) -> bool {
        self.0.still_ours()
    }

    /// See [`Acknowledge::last_delivery`].
    pub fn last_delivery(&self, stopping: bool) -> Option<u64> {
        self.0.last_delivery(stopping)
    }

    pub async fn defer(self, delay: Duration) {
        self.0.defer(delay).await;
    }

    /// Keeps the delivery alive for as long as it is polled; never returns.
    pub async fn keep_alive_forever(&self) -> std::convert::Infallible {
        let Some(every) = self.0.keep_alive_every() else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            self.0.keep_alive().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The broker connection or a fetch failed; the source retries by itself.
    #[error("source temporarily failing: {0}")]
    Transient(String),
    /// The source cannot go on (bad credentials, topic authorization).
    #[error("source failed: {0}")]
    Fatal(String),
}

pub trait JobSource: Send {
    /// The next delivery; cancel-safe (dropping the future loses nothing).
    fn next(&mut self) -> impl Future<Output = Result<Delivery, SourceError>> + Send;

    /// Commits what is acked and leaves the group/consumer.
    fn close(self) -> impl Future<Output = ()> + Send;

    /// Whether the source is connected to its broker (for readiness).
    fn is_connected(&self) -> bool;
}

/// The configured source (enum dispatch over the transports).
pub enum Source {
    Kafka(kafka::KafkaSource),
    Nats(Box<nats::NatsSource>),
}

/// Where review decisions are read: the job source's broker and credentials, on the decisions
/// topic (Kafka, group `<group>.decisions`) or subject (NATS: `<subject>.<tenant>` in stream
/// `<stream>_DECISIONS`, consumer `<consumer>-decisions`).
pub fn decisions_plan(
    source: &crate::config::SourcePlan,
    decisions: &str,
) -> crate::config::SourcePlan {
    use crate::config::SourcePlan;
    match source {
        SourcePlan::Kafka(k) => {
            let mut k = k.clone();
            k.topic = decisions.to_owned();
            k.group = format!("{}.decisions", k.group);
            k.delay_topic = None;
            SourcePlan::Kafka(k)
        }
        SourcePlan::Nats(n) => {
            let mut n = n.clone();
            n.stream = format!("{}_DECISIONS", n.stream);
            // Only under a tenant token: the subject vouches for the decision's tenant.
            n.subjects = vec![format!("{decisions}.>")];
            n.consumer = format!("{}-decisions", n.consumer);
            SourcePlan::Nats(n)
        }
    }
}

impl Source {
    /// Opens the source; a NATS source shares a connection in `connections` where it can.
    pub async fn open(
        plan: &crate::config::SourcePlan,
        connections: &mut crate::connect::NatsConnections,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        Ok(match plan {
            crate::config::SourcePlan::Kafka(k) => Source::Kafka(
                kafka::KafkaSource::new(k).context("creating the Kafka consumer (source)")?,
            ),
            crate::config::SourcePlan::Nats(n) => {
                Source::Nats(Box::new(nats::NatsSource::connect(n, connections).await?))
            }
        })
    }
}

impl JobSource for Source {
    async fn next(&mut self) -> Result<Delivery, SourceError> {
        match self {
            Source::Kafka(s) => s.next().await,
            Source::Nats(s) => s.next().await,
        }
    }

    async fn close(self) {
        match self {
            Source::Kafka(s) => s.close().await,
            Source::Nats(s) => s.close().await,
        }
    }

    fn is_connected(&self) -> bool {
        match self {
            Source::Kafka(s) => s.is_connected(),
            Source::Nats(s) => s.is_connected(),
        }
    }
}

/// Reads the consumer's lag, independently of the consume loop.
#[derive(Clone)]
pub enum LagProbe {
    Kafka(kafka::LagReader),
    Nats(Box<async_nats::jetstream::consumer::PullConsumer>),
}

impl LagProbe {
    /// Messages waiting for this consumer, when the broker says. Kafka: summed lag of this
    /// member's partitions. NATS: the durable consumer's pending count, the same on every
    /// replica (aggregate it with max(), not sum()).
    pub async fn lag(&self) -> Option<i64> {
        match self {
            LagProbe::Kafka(reader) => reader.lag(),
            LagProbe::Nats(consumer) => {
                let info = consumer.get_info().await.ok()?;
                i64::try_from(info.num_pending).ok()
            }
        }
    }
}

impl Source {
    pub fn lag_probe(&self) -> LagProbe {
        match self {
            Source::Kafka(s) => LagProbe::Kafka(s.lag_reader()),
            Source::Nats(s) => LagProbe::Nats(Box::new(s.consumer())),
        }
    }

    /// The `source` label of metrics.
    /// Stops fetching (backpressure): Kafka pauses every assigned partition; NATS simply
    /// stops pulling.
    pub fn pause(&mut self) {
        if let Source::Kafka(s) = self {
            s.pause();
        }
    }

    pub fn resume(&mut self) {
        if let Source::Kafka(s) = self {
            s.resume();
        }
    }

    /// While paused: keeps the client alive (Kafka must be polled to stay in its group and to
    /// serve rebalances). Messages fetched before the pause took effect are kept for `next`.
    /// Never returns for NATS.
    pub async fn poll_paused(&mut self) {
        match self {
            Source::Kafka(s) => s.poll_paused().await,
            Source::Nats(_) => std::future::pending().await,
        }
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Source::Kafka(_) => "kafka",
            Source::Nats(_) => "nats",
        }
    }

    /// Messages already pulled but not yet read that a stop must still hand back (NATS: what
    /// the last pull requests can have brought; Kafka keeps unread messages uncommitted).
    pub fn prefetched_bound(&self) -> usize {
        match self {
            Source::Kafka(_) => 0,
            Source::Nats(s) => s.prefetched_bound(),
        }
    }

    /// The intake has stopped: what is read from here on is handed back, so no new pull starts.
    pub fn stop_pulling(&mut self) {
        if let Source::Nats(s) = self {
            s.stop_pulling();
        }
    }
}
