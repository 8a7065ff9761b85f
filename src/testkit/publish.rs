//! Publishing jobs to the embedded Kafka cluster or to NATS JetStream, waiting for every broker
//! acknowledgement.

use std::time::Duration;

use anyhow::Context as _;
use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// Publishes payloads to `topic` (keyed by position so they spread over partitions) and waits
/// for every broker ack.
pub async fn publish(
    brokers: &str,
    topic: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.max.bytes", "10000000")
        .create()
        .context("creating the publisher")?;
    let results: Vec<_> = stream::iter(payloads.into_iter().enumerate())
        .map(|(i, payload)| {
            let producer = producer.clone();
            async move {
                let key = i.to_string();
                let record = FutureRecord::to(topic).key(&key).payload(&payload);
                producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        })
        .buffer_unordered(512)
        .collect()
        .await;
    for result in results {
        result.context("publishing a job")?;
    }
    Ok(())
}

/// Publishes `(subject, payload)` pairs through JetStream and waits for every publish ack.
pub async fn publish_nats(
    url: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let client = async_nats::connect(url)
        .await
        .context("connecting the publisher to NATS")?;
    let js = async_nats::jetstream::new(client);
    let acks: Vec<_> = stream::iter(messages)
        .map(|(subject, payload)| {
            let js = js.clone();
            async move {
                let ack = js
                    .publish(subject, payload.into())
                    .await
                    .map_err(anyhow::Error::from)?;
                ack.await.map(|_| ()).map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    acks.into_iter()
        .collect::<anyhow::Result<Vec<()>>>()
        .context("publishing a job to NATS")?;
    Ok(())
}
