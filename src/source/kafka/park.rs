//! The delay topic: where a job held back by its tenant's rate limit waits for its turn without
//! holding an in-flight slot or its partition (partitions mix tenants, so pausing one would hold
//! the quiet tenants back too).
//!
//! Parking writes the job to `source.delay_topic` with its key, its trace and tenant headers, its
//! due time and the deliveries made so far, and waits for the broker's confirmation (`acks=all`,
//! idempotent); only then is the original offset stored. The same consumer group reads the delay
//! topic back; a message not yet due is held here, its offset in flight (so no commit passes
//! it), and handed to the engine when due. The job's id, idempotency key and deadline are in its
//! payload, which is copied unchanged; its turn was booked when it was parked (a ticket in the
//! state store), so it runs at once when it comes back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;

use super::{Again, Inner};
use crate::config::KafkaSourcePlan;
use crate::source::Delivery;

/// The header with the parked job's due time (ms since the epoch).
const DUE_HEADER: &str = "switchyard-due-ms";
/// The header with the deliveries the job had before it was parked.
const DELIVERIES_HEADER: &str = "switchyard-deliveries";
/// The header naming where the job was first read (`topic/partition/offset`), for operators.
const ORIGIN_HEADER: &str = "switchyard-parked-from";
/// How long a park may wait for the broker's confirmation.
const PARK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most parked jobs held in memory before the delay topic's partitions are paused ...
const HELD_MAX: usize = 10_000;
/// ... or most payload bytes.
const HELD_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Longest a job is parked at once. A longer wait comes back after this and, its ticket saying
/// its turn has not come, is parked again for the rest.
pub(crate) const MAX_PARK: Duration = Duration::from_secs(3600);

/// The delay topic's producer.
pub(super) struct Parking {
    producer: FutureProducer,
    topic: String,
}

impl Parking {
    pub(super) fn new(plan: &KafkaSourcePlan, topic: &str) -> anyhow::Result<Self> {
        let mut config =
            crate::connect::kafka(&plan.brokers, &[], &plan.librdkafka_env, "source.delay")?;
        config
            .set("linger.ms", "5")
            .set("message.timeout.ms", PARK_TIMEOUT.as_millis().to_string())
            .set("client.id", "switchyard-delay");
        // The source's own properties (security above all) apply to its delay topic, except
        // consumer-only ones, which a producer rejects.
        for (key, value) in &plan.librdkafka {
            if !consumer_only(key) {
                config.set(key, value);
            }
        }
        config.set("acks", "all").set("enable.idempotence", "true");
        Ok(Self {
            producer: config.create()?,
            topic: topic.to_owned(),
        })
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes the job to the delay topic, due after `delay`; `Ok` once the broker confirmed it.
    pub(super) async fn park(&self, job: &Again, delay: Duration) -> Result<(), KafkaError> {
        let delay = delay.min(MAX_PARK);
        let due = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        let due_ms = due.timestamp_millis().to_string();
        let deliveries = job.deliveries.to_string();
        let origin = format!(
            "{}/{}/{}",
            job.source.topic,
            job.source.partition.unwrap_or(-1),
            job.source.offset.unwrap_or(-1)
        );
        let mut headers = OwnedHeaders::new();
        for (key, value) in [
            (DUE_HEADER, Some(due_ms.as_str())),
            (DELIVERIES_HEADER, Some(deliveries.as_str())),
            (ORIGIN_HEADER, Some(origin.as_str())),
            ("traceparent", job.traceparent.as_deref()),
        ] {
            if let Some(value) = value {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
        }
        if let (Some(name), Some(tenant)) = (&job.vouch_header, &job.tenant) {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: Some(tenant.as_bytes()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
            .payload(&job.payload)
            .headers(headers);
        if let Some(key) = &job.key {
            record = record.key(key.as_slice());
        }
        self.producer
            .send(record, Timeout::After(PARK_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

/// librdkafka properties a producer does not accept.
fn consumer_only(key: &str) -> bool {
    key.starts_with("group.")
        || key.starts_with("fetch.")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("partition.assignment")
        || key.starts_with("max.poll.")
        || key.starts_with("queued.")
        || key.starts_with("isolation.")
        || key.starts_with("check.crcs")
        || key.starts_with("consume.")
        || key.starts_with("allow.auto.create")
}

/// What a message read from the delay topic says about its parking.
#[derive(Debug, Clone, Copy)]
pub(super) struct Parked {
    pub due: Option<DateTime<Utc>>,
    pub deliveries: u64,
}

pub(super) fn parked_headers(headers: Option<&BorrowedHeaders>) -> Parked {
    let value = |name: &str| {
        headers.and_then(|h| {
            h.iter()
                .find(|header| header.key == name)
                .and_then(|header| header.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok())
        })
    };
    Parked {
        due: value(DUE_HEADER).and_then(DateTime::from_timestamp_millis),
        deliveries: value(DELIVERIES_HEADER)
            .and_then(|d| u64::try_from(d).ok())
            .unwrap_or(1),
    }
}

/// Parked jobs read back early, by due time.
#[derive(Default)]
pub(super) struct Held {
    jobs: BTreeMap<(Instant, u64), Delivery>,
    seq: u64,
    /// Payload bytes of the held jobs.
    bytes: usize,
    /// The delay topic's partitions are paused because too many jobs are held.
    paused: bool,
}

impl Held {
    /// Holds a parked job read back before it is due. (Partitions are not paused until their
    /// next job is due: the jobs behind it may be other tenants', due sooner.)
    pub(super) fn hold(&mut self, due: Instant, delivery: Delivery) {
        // A due time from a header is capped: a far-future one cannot pin its partition.
        let due = due.min(Instant::now() + MAX_PARK);
        self.seq += 1;
        self.bytes += delivery.payload.len();
        self.jobs.insert((due, self.seq), delivery);
    }

    /// The earliest held job that is due and still ours (one of a partition revoked meanwhile
    /// is dropped unacked: its next owner reads it again).
    pub(super) fn pop_due(&mut self) -> Option<Delivery> {
        let now = Instant::now();
        while let Some(entry) = self.jobs.first_entry() {
            if entry.key().0 > now {
                return None;
            }
            let delivery = entry.remove();
            self.bytes = self.bytes.saturating_sub(delivery.payload.len());
            if delivery.ack.still_ours() {
                return Some(delivery);
            }
        }
        None
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.jobs.keys().next().map(|(due, _)| *due)
    }

    /// Pauses the delay topic's partitions while [`HELD_MAX`] jobs (or [`HELD_MAX_BYTES`]) are
    /// held, and resumes them once half have gone.
    pub(super) fn bound(&mut self, consumer: &Inner, parking: Option<&Parking>) {
        let Some(parking) = parking else {
            return;
        };
        let pause = self.jobs.len() >= HELD_MAX || self.bytes >= HELD_MAX_BYTES;
        let half_empty = self.jobs.len() < HELD_MAX / 2 && self.bytes < HELD_MAX_BYTES / 2;
        if pause == self.paused || (!pause && !half_empty) {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for element in assignment.elements_for_topic(parking.topic()) {
            tpl.add_partition(element.topic(), element.partition());
        }
        let done = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match done {
            Ok(()) => self.paused = pause,
            Err(e) => {
                tracing::warn!(error = %e, pause, "could not pause or resume the delay topic")
            }
        }
    }

    /// The source resumed every partition: the bound is checked again from scratch.
    pub(super) fn resumed(&mut self) {
        self.paused = false;
    }
}

/// Sleeps until `at`, or forever without one.
pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
