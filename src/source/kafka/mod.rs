//! Kafka source: a consumer-group member that stores an offset only when every earlier offset of
//! its partition is finished (see [`offsets`]).
//!
//! Offsets are stored by switchyard (`enable.auto.offset.store=false`) and committed by
//! librdkafka's auto-commit and on close, so a commit never covers an unfinished job. Revoked
//! partitions are forgotten before librdkafka commits at the rebalance.
//!
//! With `source.delay_topic`, a job held back by its tenant's rate limit is parked there (see
//! [`park`]): written and confirmed with its due time before its offset is stored, then read
//! back by the same group and held in memory, its offset in flight, until it is due.

use std::sync::Arc;

use chrono::Utc;
use futures::future::BoxFuture;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

mod offsets;
mod park;

use offsets::{OffsetTracker, PartitionKey, Ticket};
use park::{Held, Parking};

use super::{AckHandle, Acknowledge, Delivery, JobSource, SourceError};
use crate::config::{KafkaSourcePlan, TenantFrom};
use crate::wire::SourceInfo;

/// Longest a revocation waits for in-flight jobs of the revoked partitions.
const REVOKE_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);
/// Longest the final commit and leaving the group may take at shutdown. librdkafka's close waits
/// for the group coordinator; a broker that does not answer must not keep the process alive
/// (uncommitted offsets are redelivered and answered from the idempotency store).
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);

/// Properties at-least-once delivery depends on; config cannot override them.
const FORCED: [(&str, &str); 2] = [
    ("enable.auto.offset.store", "false"),
    ("enable.auto.commit", "true"),
];

pub struct SourceContext {
    tracker: Arc<OffsetTracker>,
    /// Whether this member has joined the group (an assignment, possibly empty, arrived).
    joined: std::sync::atomic::AtomicBool,
    /// Summed lag of this member's partitions from the last statistics report (-1: unknown).
    lag: std::sync::atomic::AtomicI64,
    /// Intake is paused for backpressure: partitions assigned meanwhile start paused too.
    paused: std::sync::atomic::AtomicBool,
    /// The group starts a partition it never committed on from its earliest offset
    /// (`auto.offset.reset`), so such a partition's whole retained log is waiting.
    from_earliest: bool,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0)
            .filter_map(|p| partition_lag(p, self.from_earliest))
            .sum();
        self.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A partition's lag as librdkafka reports it (log end minus the committed offset). Before the
/// group's first commit on the partition librdkafka reports none (-1); when the group starts such
/// a partition from its earliest offset, its whole retained log is then waiting, which is exactly
/// when an operator most wants to see it: a first deployment in front of a backlog. Only
/// partitions this member is assigned count that way (a revoked one stays in the statistics).
fn partition_lag(p: &rdkafka::statistics::Partition, from_earliest: bool) -> Option<i64> {
    if p.consumer_lag >= 0 {
        return Some(p.consumer_lag);
    }
    let never_committed = p.committed_offset < 0;
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    (from_earliest && p.desired && never_committed && end >= 0 && p.lo_offset >= 0)
        .then(|| (end - p.lo_offset).max(0))
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|e| PartitionKey {
                topic: Arc::from(e.topic()),
                partition: e.partition(),
            })
            .collect();
        // Give in-flight jobs of the revoked partitions a bounded moment to finish, so their
        // offsets are stored and committed with the revocation instead of being redelivered to
        // the next owner (which would answer them from the idempotency store). This runs on the
        // polling thread; the jobs finish on the other runtime workers.
        let started = std::time::Instant::now();
        while self.tracker.in_flight_in(&revoked) > 0 && started.elapsed() < REVOKE_DRAIN {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let handed_back = self.tracker.in_flight_in(&revoked);
        self.tracker.revoke(revoked.clone());
        // Commit now, while the partitions are still ours, so the next owner starts where this
        // member stopped rather than at the last periodic commit.
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "commit at revocation failed; the next owner replays from the last commit")
            }
        }
        tracing::info!(
            partitions = revoked.len(),
            handed_back,
            "kafka partitions revoked"
        );
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if self.paused.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(error = %e, "could not pause newly assigned partitions");
                    }
                }
                self.joined
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(partitions = tpl.count(), "kafka partitions assigned");
            }
            Rebalance::Error(e) => {
                self.joined
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "kafka rebalance error");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

type Inner = StreamConsumer<SourceContext>;

pub struct KafkaSource {
    consumer: Arc<Inner>,
    tracker: Arc<OffsetTracker>,
    topic: Arc<str>,
    /// Messages that arrived while paused (fetched before the pause took effect).
    stash: std::collections::VecDeque<Delivery>,
    /// What vouches for a job's tenant (`tenant_from`).
    tenant_from: TenantFrom,
    /// Jobs handed back outside shutdown, to run again here: their offsets stay in flight
    /// meanwhile, so nothing is committed past them and nothing after them is blocked for good.
    requeue: Arc<Requeue>,
    /// The delay topic's producer, when one is configured.
    parking: Option<Arc<Parking>>,
    /// Parked jobs read back before they are due.
    held: Held,
}

/// Jobs to run again in this process, at most [`REQUEUE_MAX`]: each was an in-flight job, so
/// `limits.max_inflight_jobs` bounds it in practice, far below that.
#[derive(Default)]
struct Requeue {
    queue: std::sync::Mutex<std::collections::VecDeque<Delivery>>,
    added: tokio::sync::Notify,
}

impl Requeue {
    fn push(&self, delivery: Delivery) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= REQUEUE_MAX {
            return false;
        }
        queue.push_back(delivery);
        drop(queue);
        self.added.notify_one();
        true
    }

    fn pop(&self) -> Option<Delivery> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

/// How many times a job is run in this process (first delivery plus local redeliveries after a
/// hand-back) before its last hand-back becomes a `max_deliveries_exceeded` dead letter.
const MAX_LOCAL_DELIVERIES: u64 = 10;

/// Most handed-back jobs waiting to run again (a safety bound; in-flight limits keep it far lower).
const REQUEUE_MAX: usize = 65_536;
/// Most messages kept while paused; beyond it polling stops until intake resumes.
const STASH_MAX: usize = 4096;

/// Reads the lag librdkafka reported in its last statistics. Holds the context, not the
/// consumer, so only the source itself keeps the consumer alive and closes it.
#[derive(Clone)]
pub struct LagReader(Arc<SourceContext>);

impl LagReader {
    pub fn lag(&self) -> Option<i64> {
        let lag = self.0.lag.load(std::sync::atomic::Ordering::Relaxed);
        (lag >= 0).then_some(lag)
    }
}

impl KafkaSource {
    pub fn lag_reader(&self) -> LagReader {
        LagReader(self.consumer.context().clone())
    }

    pub fn new(plan: &KafkaSourcePlan) -> anyhow::Result<Self> {
        let mut config = crate::connect::kafka(&plan.brokers, &[], &plan.librdkafka_env, "source")?;
        for (key, value) in [
            ("group.id", plan.group.as_str()),
            ("auto.offset.reset", "earliest"),
            ("auto.commit.interval.ms", "1000"),
            // librdkafka waits up to 500 ms for a fetch to fill by default: seconds of LLM
            // latency hide it, but a job should not wait for a batch to form.
            ("fetch.wait.max.ms", "50"),
            ("client.id", "switchyard"),
            ("statistics.interval.ms", "5000"),
        ] {
            config.set(key, value);
        }
        for (key, value) in &plan.librdkafka {
            if FORCED.iter().any(|(k, _)| k == key) {
                tracing::warn!(property = %key, "ignoring source.librdkafka override: switchyard manages it");
                continue;
            }
            config.set(key, value);
        }
        for (key, value) in FORCED {
            config.set(key, value);
        }
        let tracker = Arc::new(OffsetTracker::default());
        let from_earliest = matches!(
            config.get("auto.offset.reset"),
            Some("earliest" | "smallest" | "beginning")
        );
        let consumer: Inner = config.create_with_context(SourceContext {
            tracker: tracker.clone(),
            joined: Default::default(),
            lag: std::sync::atomic::AtomicI64::new(-1),
            paused: Default::default(),
            from_earliest,
        })?;
        let parking = match &plan.delay_topic {
            Some(delay_topic) => {
                consumer.subscribe(&[&plan.topic, delay_topic])?;
                Some(Arc::new(Parking::new(plan, delay_topic)?))
            }
            None => {
                consumer.subscribe(&[&plan.topic])?;
                None
            }
        };
        Ok(Self {
            consumer: Arc::new(consumer),
            tracker,
            topic: Arc::from(plan.topic.as_str()),
            stash: Default::default(),
            tenant_from: plan.tenant_from.clone(),
            requeue: Arc::default(),
            parking,
            held: Held::default(),
        })
    }
}

impl KafkaSource {
    /// Pauses every assigned partition; fetching stops and the group membership stays.
    pub fn pause(&mut self) {
        self.consumer
            .context()
            .paused
            .store(true, std::sync::atomic::Ordering::Relaxed);
        match self.consumer.assignment() {
            Ok(tpl) => {
                if let Err(e) = self.consumer.pause(&tpl) {
                    tracing::warn!(error = %e, "could not pause the assigned partitions");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the assignment to pause it"),
        }
    }

    pub fn resume(&mut self) {
        self.held.resumed();
        self.consumer
            .context()
            .paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match self.consumer.assignment() {
            Ok(tpl) => {
                if let Err(e) = self.consumer.resume(&tpl) {
                    tracing::warn!(error = %e, "could not resume the assigned partitions");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the assignment to resume it"),
        }
    }

    /// Polls while paused so the consumer keeps its group membership and serves rebalances;
    /// a message fetched before the pause took effect is kept for [`JobSource::next`].
    pub async fn poll_paused(&mut self) {
        if self.stash.len() >= STASH_MAX {
            return std::future::pending().await;
        }
        match self.receive().await {
            Ok((delivery, Some(due))) => self.held.hold(due, delivery),
            Ok((delivery, None)) => self.stash.push_back(delivery),
            Err(e) => {
                tracing::debug!(error = ?e, "kafka poll while paused failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    /// The next message, with its due time when it is a parked job not yet due.
    async fn receive(&self) -> Result<(Delivery, Option<std::time::Instant>), SourceError> {
        let message = self.consumer.recv().await.map_err(classify)?;
        let parked = self
            .parking
            .as_ref()
            .filter(|p| message.topic() == p.topic())
            .map(|_| park::parked_headers(message.headers()));
        let topic = if message.topic() == &*self.topic {
            self.topic.clone()
        } else {
            Arc::from(message.topic())
        };
        let key = PartitionKey {
            topic,
            partition: message.partition(),
        };
        let ticket = self.tracker.register(key, message.offset());
        let source = SourceInfo {
            transport: "kafka".into(),
            topic: message.topic().to_owned(),
            partition: Some(message.partition()),
            offset: Some(message.offset()),
            stream_seq: None,
        };
        let payload = message.payload().unwrap_or_default().to_vec();
        let traceparent = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key.eq_ignore_ascii_case("traceparent"))
                .and_then(|h| h.value)
                .and_then(crate::wire::valid_traceparent)
        });
        // With `tenant_from: key` (or a header) that part of the message vouches for the
        // tenant; a missing or unreadable one vouches for none, so the job cannot match.
        let vouching = match &self.tenant_from {
            TenantFrom::Payload => None,
            TenantFrom::Key => Some(message.key()),
            TenantFrom::Header(name) => Some(message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key.eq_ignore_ascii_case(name))
                    .and_then(|h| h.value)
            })),
        };
        let tenant = vouching.map(|bytes| {
            bytes
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or("")
                .to_owned()
        });
        let vouch_header = match &self.tenant_from {
            TenantFrom::Header(name) => Some(name.clone()),
            _ => None,
        };
        let ack = KafkaAck {
            ticket,
            consumer: Arc::downgrade(&self.consumer),
            tracker: self.tracker.clone(),
            again: Box::new(Again {
                payload: payload.clone(),
                traceparent: traceparent.clone(),
                tenant: tenant.clone(),
                source: source.clone(),
                deliveries: parked.map_or(1, |p| p.deliveries + 1),
                requeue: Arc::downgrade(&self.requeue),
                key: message.key().map(<[u8]>::to_vec),
                vouch_header,
            }),
            parking: self.parking.clone(),
        };
        let due = parked
            .and_then(|p| p.due)
            .and_then(|due| (due - Utc::now()).to_std().ok())
            .map(|wait| std::time::Instant::now() + wait);
        let delivery = Delivery {
            payload,
            traceparent,
            tenant,
            source,
            received_at: Utc::now(),
            ack: AckHandle::new(ack),
        };
        Ok((delivery, due))
    }
}

impl JobSource for KafkaSource {
    async fn next(&mut self) -> Result<Delivery, SourceError> {
        if let Some(delivery) = self.stash.pop_front() {
            return Ok(delivery);
        }
        // A job handed back here runs again before new messages. (One whose partition is
        // revoked meanwhile runs once more; its ack is then ignored and the claim answers the
        // new owner's redelivery.)
        loop {
            if let Some(again) = self.requeue.pop() {
                return Ok(again);
            }
            if let Some(due) = self.held.pop_due() {
                return Ok(due);
            }
            self.held.bound(&self.consumer, self.parking.as_deref());
            let next_due = self.held.next_due();
            tokio::select! {
                biased;
                // `notify_one` keeps a permit when nobody waits, so no hand-back is missed.
                () = self.requeue.added.notified() => {}
                () = park::sleep_until(next_due) => {}
                received = self.receive() => match received? {
                    (delivery, Some(due)) => self.held.hold(due, delivery),
                    (delivery, None) => return Ok(delivery),
                },
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.consumer
            .context()
            .joined
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn close(self) {
        let consumer = self.consumer;
        let in_flight = self.tracker.in_flight();
        // Commit, leave the group and destroy the client on a thread of its own: each is a
        // blocking network exchange, and dropping the last handle waits until librdkafka has
        // closed the consumer. Acks hold weak handles, so this is the last one.
        let (done, finished) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("kafka-close".into())
            .spawn(move || {
                let result = consumer.commit_consumer_state(CommitMode::Sync);
                consumer.unsubscribe();
                drop(consumer);
                let _ = done.send(result);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the kafka close thread; leaving the group uncommitted");
            return;
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, finished).await {
            Ok(Ok(Ok(())))
            | Ok(Ok(Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)))) => {
                tracing::info!(
                    handed_back = in_flight,
                    "kafka source closed, offsets committed"
                )
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "final kafka commit failed; uncommitted jobs will be redelivered")
            }
            Ok(Err(_)) => tracing::warn!("kafka close thread ended without a result"),
            Err(_) => tracing::warn!(
                timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
                "kafka consumer did not close in time; exiting without waiting (uncommitted jobs will be redelivered)"
            ),
        }
    }
}

fn classify(e: KafkaError) -> SourceError {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::TopicAuthorizationFailed | C::GroupAuthorizationFailed | C::SaslAuthenticationFailed,
        ) => SourceError::Fatal(e.to_string()),
        _ => SourceError::Transient(e.to_string()),
    }
}

struct KafkaAck {
    ticket: Ticket,
    /// Weak, so a job still running at shutdown does not keep the consumer (and the group
    /// membership) alive; its offset is then simply not stored.
    consumer: std::sync::Weak<Inner>,
    tracker: Arc<OffsetTracker>,
    /// What it takes to run the job again after a hand-back.
    again: Box<Again>,
    /// The delay topic, when configured: throttled jobs can be parked there.
    parking: Option<Arc<Parking>>,
}

/// A delivery's content kept for a local redelivery.
struct Again {
    payload: Vec<u8>,
    traceparent: Option<String>,
    tenant: Option<String>,
    source: SourceInfo,
    /// Times this process has run the job so far.
    deliveries: u64,
    /// Weak: queued deliveries hold it, and must not keep the queue alive after the source.
    requeue: std::sync::Weak<Requeue>,
    /// The message key, kept when the job is parked (it may vouch for the tenant).
    key: Option<Vec<u8>>,
    /// The header that vouches for the tenant (`tenant_from: header:<name>`), if any.
    vouch_header: Option<String>,
}

impl Acknowledge for KafkaAck {
    fn ack(self: Box<Self>, _poison: bool) -> BoxFuture<'static, ()> {
        self.store();
        Box::pin(std::future::ready(()))
    }

    fn keep_alive(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn keep_alive_every(&self) -> Option<std::time::Duration> {
        None
    }

    fn hand_back(self: Box<Self>) -> BoxFuture<'static, ()> {
        // The offset stays in flight, so no commit passes it. The job is queued to run here
        // again (a lost claim, an unwritable dead letter), so the partition's commits move on
        // once it finishes; at shutdown nothing takes it from the queue and it is redelivered
        // after the restart or rebalance.
        let KafkaAck {
            ticket,
            consumer,
            tracker,
            again,
            parking,
        } = *self;
        if !tracker.is_current(&ticket) {
            return Box::pin(std::future::ready(()));
        }
        let Again {
            payload,
            traceparent,
            tenant,
            source,
            deliveries,
            requeue,
            key,
            vouch_header,
        } = *again;
        let ack = KafkaAck {
            ticket,
            consumer,
            tracker,
            again: Box::new(Again {
                payload: payload.clone(),
                traceparent: traceparent.clone(),
                tenant: tenant.clone(),
                source: source.clone(),
                deliveries: deliveries + 1,
                requeue: requeue.clone(),
                key,
                vouch_header,
            }),
            parking,
        };
        let delivery = Delivery {
            payload,
            traceparent,
            tenant,
            source,
            received_at: Utc::now(),
            ack: AckHandle::new(ack),
        };
        let Some(queue) = requeue.upgrade() else {
            return Box::pin(std::future::ready(()));
        };
        if !queue.push(delivery) {
            tracing::warn!(
                "local redelivery queue full; the job is redelivered after a restart or rebalance"
            );
        }
        Box::pin(std::future::ready(()))
    }

    fn last_delivery(&self, stopping: bool) -> Option<u64> {
        (!stopping && self.again.deliveries >= MAX_LOCAL_DELIVERIES)
            .then_some(self.again.deliveries)
    }

    fn still_ours(&self) -> bool {
        self.tracker.is_current(&self.ticket)
    }

    fn can_defer(&self) -> bool {
        // Parking is a delivery too: never let it use up the last ones.
        self.parking.is_some() && self.again.deliveries + 2 < MAX_LOCAL_DELIVERIES
    }

    fn defer(self: Box<Self>, delay: std::time::Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Some(parking) = self.parking.clone() else {
                return self.hand_back().await;
            };
            if !self.tracker.is_current(&self.ticket) {
                // The partition was revoked meanwhile: its next owner redelivers the job.
                return;
            }
            match parking.park(&self.again, delay).await {
                // Confirmed on the delay topic: only now may the original offset be committed.
                Ok(()) => self.store(),
                Err(e) => {
                    // Its turn is booked (a ticket): it waits for it here instead, then runs.
                    tracing::warn!(error = %e, "could not park a throttled job on the delay topic; it waits for its turn in the process");
                    tokio::time::sleep(delay.min(park::MAX_PARK)).await;
                    self.hand_back().await;
                }
            }
        })
    }
}

impl KafkaAck {
    fn store(&self) {
        let Some(consumer) = self.consumer.upgrade() else {
            return;
        };
        self.tracker.finish(&self.ticket, |key, position| {
            let mut tpl = TopicPartitionList::new();
            if tpl.add_partition_offset(&key.topic, key.partition, Offset::Offset(position)).is_err() {
                return;
            }
            // Fails with a state error when the partition was revoked meanwhile: then the new
            // owner redelivers from the last commit, which is what must happen.
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::debug!(error = %e, partition = key.partition, position, "offset not stored");
            }
        });
    }
}
