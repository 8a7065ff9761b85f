//! NATS JetStream source: a durable pull consumer shared by every replica (queue semantics),
//! explicit acks only after the job's output is confirmed.
//!
//! While a job runs, in-progress acks (every third of `ack_wait`) keep the server from
//! redelivering it; a job handed back (at shutdown, or after its claim's lease was lost) is
//! nak'ed with a short delay, [`HAND_BACK_DELAY`], so another replica takes it within a second;
//! an invalid job is `term`ed after its dead letter is written, so it is never redelivered.
//! Pulls are small (`batch`) so prefetched messages do not sit in the client past their ack wait.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self, stream};
use chrono::Utc;
use futures::future::BoxFuture;
use futures::StreamExt;

use super::{AckHandle, Acknowledge, Delivery, JobSource, SourceError};
use crate::config::NatsSourcePlan;
use crate::wire::SourceInfo;

/// The delay of a hand-back's nak. Not zero: the pull subscription keeps fetching while the
/// process stops (the engine's buffered hand-back, then [`JobSource::close`], ~400 ms in all),
/// and a message nak'ed without delay comes straight back to it, to be handed back again; that
/// loop spent a message's whole `max_deliver` in a fraction of a second, after which JetStream
/// never delivers it again. With the delay, it reaches the replicas that stay.
pub const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

/// How long closing waits for the last acks to leave the socket.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// The server's idle heartbeat on an open pull request; async-nats reports a missed one after
/// two beats without a message or a heartbeat.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long one pull request waits on the server for messages before it is renewed. Not
/// shorter: async-nats also pulls on its own `expires` + 5 s after its last request, whether
/// the stream is read or not, and during a shutdown drain such a pull only brings fresh backlog
/// to hand back (a delivery each). A lost pull is restarted on missed heartbeats instead.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

pub struct NatsSource {
    client: async_nats::Client,
    consumer: PullConsumer,
    messages: pull::Stream,
    ack_wait: Duration,
    /// -1: unlimited.
    max_deliver: i64,
    /// The configured subject patterns: a subject's tenant token comes after their prefix.
    subjects: Vec<String>,
    /// Messages per pull request.
    batch: usize,
    /// When a heartbeat was last missed, if no message came since.
    missed_beat: Option<tokio::time::Instant>,
    /// The pull is to start afresh before the next read.
    restart_due: bool,
    /// The intake has stopped: no restarts.
    draining: bool,
}

/// A pull subscription on `consumer`, `batch` messages per request.
async fn pull_stream(
    consumer: &PullConsumer,
    batch: usize,
) -> Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(PULL_HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await
}

impl NatsSource {
    pub async fn connect(
        plan: &NatsSourcePlan,
        connections: &mut crate::connect::NatsConnections,
    ) -> anyhow::Result<Self> {
        let client = connections
            .get(&plan.url, &plan.access, "switchyard", "source")
            .await?;
        let js = jetstream::new(client.clone());
        let stream = if plan.create_stream {
            let config = stream::Config {
                name: plan.stream.clone(),
                subjects: plan.subjects.clone(),
                ..Default::default()
            };
            crate::connect::open_or_create_stream(&js, config)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "source.stream: cannot create or open stream {}: {e}",
                        plan.stream
                    )
                })?
        } else {
            js.get_stream(&plan.stream).await.map_err(|e| {
                anyhow::anyhow!("source.stream: stream {} is not available ({e}); create it or set create_stream: true", plan.stream)
            })?
        };
        let config = pull::Config {
            durable_name: Some(plan.consumer.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: plan.ack_wait,
            max_deliver: plan.max_deliver,
            max_ack_pending: plan.max_ack_pending,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&plan.consumer, config.clone())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "source.consumer: cannot create or open consumer {}: {e}",
                    plan.consumer
                )
            })?;
        // A durable consumer keeps the settings it was created with; in-progress acks are timed
        // from the configured ack_wait, so the server's must match.
        let current = &consumer.cached_info().config;
        if current.ack_wait != plan.ack_wait
            || current.max_deliver != plan.max_deliver
            || current.max_ack_pending != plan.max_ack_pending
            || current.ack_policy != AckPolicy::Explicit
        {
            tracing::info!(consumer = %plan.consumer, "updating the durable consumer to the configured ack_wait / max_deliver / max_ack_pending");
            consumer = stream.update_consumer(config).await.map_err(|e| {
                anyhow::anyhow!(
                    "source.consumer: consumer {} exists with other settings (ack_wait, max_deliver, max_ack_pending) and cannot be updated: {e}",
                    plan.consumer
                )
            })?;
        }
        let messages = pull_stream(&consumer, plan.batch).await.map_err(|e| {
            anyhow::anyhow!("source: cannot start pulling from {}: {e}", plan.consumer)
        })?;
        Ok(Self {
            client,
            consumer,
            messages,
            missed_beat: None,
            restart_due: false,
            draining: false,
            ack_wait: plan.ack_wait,
            max_deliver: plan.max_deliver,
            subjects: plan.subjects.clone(),
            batch: plan.batch,
        })
    }
}

impl NatsSource {
    /// At most what the last pull requests can have brought and the engine not yet read.
    pub fn prefetched_bound(&self) -> usize {
        2 * self.batch
    }

    pub fn consumer(&self) -> PullConsumer {
        self.consumer.clone()
    }

    /// async-nats saw neither a message nor the server's heartbeat for two beats.
    ///
    /// Once can be a slow moment on either side. A second time within three beats of the
    /// first, with no message between, means the server holds no pull request of ours while
    /// the client counts messages still to come: it would not ask again until its own
    /// fallback, `expires` + 5 s after its last request, and jobs would wait that long on a
    /// stream that has them. (async-nats counts a pull as sent only after publishing it, so on
    /// a busy machine that pull's messages can be read first and missed by its count; a drain
    /// of 20,000 jobs stalled for ~35 s about once in ten runs.) The pull is then due to start
    /// afresh. Not while disconnected (async-nats pulls again itself on reconnecting), nor
    /// once the intake stops ([`NatsSource::stop_pulling`]).
    fn note_missed_beat(&mut self) {
        let now = tokio::time::Instant::now();
        if self.draining
            || self.client.connection_state() != async_nats::connection::State::Connected
        {
            self.missed_beat = None;
            return;
        }
        match self.missed_beat {
            Some(first) if now.duration_since(first) <= PULL_HEARTBEAT * 3 => {
                tracing::warn!(
                    since_ms = (now.duration_since(first) + PULL_HEARTBEAT * 2).as_millis() as u64,
                    "the JetStream pull went quiet (no message, heartbeats missed twice); restarting it"
                );
                self.restart_due = true;
            }
            _ => self.missed_beat = Some(now),
        }
    }

    /// A new pull subscription in place of the old one. A message the old one was sent but
    /// did not read (its buffer is empty when the miss is reported, but a restart put off by
    /// a cancelled read or a failed subscribe can find some there) stays unacknowledged and is
    /// redelivered after `ack_wait`. Cancel-safe: until the new subscription is in place, the
    /// restart stays due.
    async fn restart(&mut self) -> Result<(), SourceError> {
        let messages = pull_stream(&self.consumer, self.batch)
            .await
            .map_err(|e| SourceError::Transient(format!("restarting the JetStream pull: {e}")))?;
        self.messages = messages;
        self.restart_due = false;
        self.missed_beat = None;
        Ok(())
    }

    /// The intake has stopped: no pull is restarted from here on, since it would only bring
    /// fresh backlog to hand back (each costing the message a delivery).
    pub fn stop_pulling(&mut self) {
        self.draining = true;
        self.restart_due = false;
    }
}

impl JobSource for NatsSource {
    async fn next(&mut self) -> Result<Delivery, SourceError> {
        let message = loop {
            if self.restart_due {
                self.restart().await?;
            }
            match self.messages.next().await {
                Some(Ok(message)) => {
                    self.missed_beat = None;
                    break message;
                }
                Some(Err(e)) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                    self.note_missed_beat();
                }
                Some(Err(e)) => return Err(SourceError::Transient(e.to_string())),
                None => {
                    return Err(SourceError::Fatal(
                        "the JetStream consumer stream ended".into(),
                    ))
                }
            }
        };
        let info = message
            .info()
            .ok()
            .map(|i| (i.stream_sequence, i.delivered));
        let stream_seq = info.map(|(seq, _)| seq);
        let delivered = info.map_or(1, |(_, d)| d);
        let (message, acker) = message.split();
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .and_then(|v| crate::wire::valid_traceparent(v.as_str().as_bytes()));
        let source = SourceInfo {
            transport: "nats".into(),
            topic: message.subject.to_string(),
            partition: None,
            offset: None,
            stream_seq,
        };
        let ack = NatsAck {
            acker,
            keep_alive_every: self.ack_wait / 3,
            // Deferring is a redelivery: never let it use up the last deliveries.
            deferrable: self.max_deliver < 0 || delivered + 2 < self.max_deliver,
            delivered,
            max_deliver: self.max_deliver,
        };
        let tenant = subject_tenant(&self.subjects, &source.topic);
        Ok(Delivery {
            payload: message.payload.to_vec(),
            traceparent,
            tenant,
            source,
            received_at: Utc::now(),
            ack: AckHandle::new(ack),
        })
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn close(mut self) {
        // Messages pulled since the engine's last look go back after HAND_BACK_DELAY (not after
        // ack_wait), so another replica takes them soon. The engine dead-letters messages on
        // their last delivery while the app drains; one still arriving here cannot be saved by a
        // nak, and is named in an error so it is not lost silently.
        let mut handed_back = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        // At most what the last pulls can have brought: not fresh backlog pulled only to be
        // handed back.
        let mut left = self.prefetched_bound();
        while left > 0 {
            let Ok(Some(Ok(message))) =
                tokio::time::timeout_at(deadline, self.messages.next()).await
            else {
                break;
            };
            left -= 1;
            let info = message
                .info()
                .ok()
                .map(|i| (i.stream_sequence, i.delivered));
            if let Some((seq, delivered)) =
                info.filter(|(_, d)| self.max_deliver > 0 && *d >= self.max_deliver)
            {
                tracing::error!(stream_seq = seq, delivered, subject = %message.subject, "a message on its last allowed delivery arrived while closing; JetStream will not deliver it again (see the stream's max-deliveries advisory)");
            }
            if message
                .ack_with(AckKind::Nak(Some(HAND_BACK_DELAY)))
                .await
                .is_ok()
            {
                handed_back += 1;
            }
        }
        // Acks are already sent; flushing makes sure they left the socket before we exit (not
        // forever: with the server gone they cannot leave, and the broker redelivers).
        match tokio::time::timeout(CLOSE_FLUSH, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not flush NATS acks on close"),
            Err(_) => tracing::warn!("NATS acks not flushed on close within 5 s; the broker redelivers what they would have acked"),
        }
        tracing::info!(handed_back, "NATS source closed");
    }
}

struct NatsAck {
    acker: Acker,
    keep_alive_every: Duration,
    deferrable: bool,
    /// This delivery's number (1 for the first).
    delivered: i64,
    /// -1: unlimited.
    max_deliver: i64,
}

impl NatsAck {
    async fn send(acker: &Acker, kind: AckKind) {
        if let Err(e) = acker.ack_with(kind).await {
            // A lost ack means a redelivery, which the idempotency store answers as a duplicate.
            tracing::warn!(error = %e, kind = ?kind, "JetStream ack failed");
        }
    }
}

impl Acknowledge for NatsAck {
    fn ack(self: Box<Self>, poison: bool) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            Self::send(
                &self.acker,
                if poison { AckKind::Term } else { AckKind::Ack },
            )
            .await
        })
    }

    fn keep_alive(&self) -> BoxFuture<'_, ()> {
        Box::pin(Self::send(&self.acker, AckKind::Progress))
    }

    fn keep_alive_every(&self) -> Option<Duration> {
        Some(self.keep_alive_every)
    }

    fn hand_back(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { Self::send(&self.acker, AckKind::Nak(Some(HAND_BACK_DELAY))).await })
    }

    fn can_defer(&self) -> bool {
        self.deferrable
    }

    fn defer(self: Box<Self>, delay: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move { Self::send(&self.acker, AckKind::Nak(Some(delay))).await })
    }

    fn last_delivery(&self, _stopping: bool) -> Option<u64> {
        // JetStream never redelivers a message past `max_deliver`, shutdown or not.
        (self.max_deliver > 0 && self.delivered >= self.max_deliver)
            .then(|| u64::try_from(self.delivered).unwrap_or(0))
    }
}

/// The tenant token of `subject` under a configured pattern ending in a wildcard
/// (`switchyard.jobs.>` or `switchyard.jobs.*`): the token right after the prefix.
fn subject_tenant(patterns: &[String], subject: &str) -> Option<String> {
    patterns.iter().find_map(|pattern| {
        let prefix = pattern
            .strip_suffix(".>")
            .or_else(|| pattern.strip_suffix(".*"))?;
        let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
        rest.split('.').next().map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_names_the_tenant_after_the_wildcard_prefix() {
        let patterns = vec!["switchyard.jobs.>".to_owned()];
        assert_eq!(
            subject_tenant(&patterns, "switchyard.jobs.acme").as_deref(),
            Some("acme")
        );
        assert_eq!(
            subject_tenant(&patterns, "switchyard.jobs.acme.urgent").as_deref(),
            Some("acme")
        );
        assert_eq!(subject_tenant(&patterns, "other.acme"), None);
        assert_eq!(subject_tenant(&["jobs".to_owned()], "jobs"), None);
    }
}
