//! Kafka sink: an idempotent producer (`acks=all`); a send resolves on the broker's ack.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::{Destination, Output, OutputSink, SinkError};
use crate::config::{KafkaSinkPlan, Topics};

/// Properties a confirmed write depends on; config cannot override them.
const FORCED: [(&str, &str); 2] = [("acks", "all"), ("enable.idempotence", "true")];

#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
    topics: Topics,
    delivery_timeout: std::time::Duration,
}

impl KafkaSink {
    pub fn new(plan: &KafkaSinkPlan) -> anyhow::Result<Self> {
        let mut config = crate::connect::kafka(&plan.brokers, &[], &plan.librdkafka_env, "sink")?;
        config
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                plan.delivery_timeout.as_millis().to_string(),
            )
            .set("client.id", "switchyard");
        for (key, value) in &plan.librdkafka {
            if FORCED.iter().any(|(k, _)| k == key) {
                tracing::warn!(property = %key, "ignoring sink.librdkafka override: a write counts as confirmed only with it");
                continue;
            }
            config.set(key, value);
        }
        for (key, value) in FORCED {
            config.set(key, value);
        }
        Ok(Self {
            producer: config.create()?,
            topics: plan.topics.clone(),
            delivery_timeout: plan.delivery_timeout,
        })
    }

    fn topic(&self, destination: Destination) -> &str {
        match destination {
            Destination::Results => &self.topics.results,
            Destination::Review => &self.topics.review,
            Destination::DeadLetters => &self.topics.dlq,
        }
    }
}

impl OutputSink for KafkaSink {
    async fn send(&self, output: &Output) -> Result<(), SinkError> {
        let topic = self.topic(output.destination);
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(&output.payload);
        if let Some(tenant) = &output.tenant {
            record = record.key(tenant.as_str());
        }
        let mut headers = OwnedHeaders::new();
        for (key, value) in [
            ("switchyard-output-id", Some(output.id.as_str())),
            ("traceparent", output.traceparent.as_deref()),
        ] {
            if let Some(value) = value.and_then(super::header_value) {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        record = record.headers(headers);
        match self
            .producer
            .send(record, Timeout::After(self.delivery_timeout))
            .await
        {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(classify(e)),
        }
    }

    async fn flush(&self) {
        let producer = self.producer.clone();
        let timeout = self.delivery_timeout;
        match tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "kafka producer flush incomplete"),
            Err(e) => tracing::warn!(error = %e, "kafka producer flush task failed"),
        }
    }
}

fn classify(e: KafkaError) -> SinkError {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => SinkError::Permanent(e.to_string()),
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::InvalidTopic) => {
            SinkError::Rejected(e.to_string())
        }
        _ => SinkError::Transient(e.to_string()),
    }
}
