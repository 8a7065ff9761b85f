//! NATS sink: outputs to `<prefix>.<tenant>` subjects; with JetStream, a send resolves on the
//! stream's publish ack.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{Destination, Output, OutputSink, SinkError};
use crate::config::{NatsSinkPlan, Topics};

/// The subject token for outputs whose tenant could not be read (cannot start a tenant name).
pub const UNKNOWN_TENANT: &str = "_unknown";

#[derive(Clone)]
pub struct NatsSink {
    client: async_nats::Client,
    js: Option<jetstream::Context>,
    topics: Topics,
    timeout: Duration,
}

impl NatsSink {
    pub async fn connect(
        plan: &NatsSinkPlan,
        connections: &mut crate::connect::NatsConnections,
    ) -> anyhow::Result<Self> {
        let client = connections
            .get(&plan.url, &plan.access, "switchyard-sink", "sink")
            .await?;
        let js = if plan.jetstream {
            let mut js = jetstream::new(client.clone());
            js.set_timeout(plan.delivery_timeout);
            if let Some(name) = &plan.stream {
                let subjects = [&plan.topics.results, &plan.topics.review, &plan.topics.dlq]
                    .iter()
                    .map(|t| format!("{t}.>"))
                    .collect();
                let config = stream::Config {
                    name: name.clone(),
                    subjects,
                    ..Default::default()
                };
                crate::connect::open_or_create_stream(&js, config)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("sink.stream: cannot create or open stream {name}: {e}")
                    })?;
            }
            Some(js)
        } else {
            None
        };
        Ok(Self {
            client,
            js,
            topics: plan.topics.clone(),
            timeout: plan.delivery_timeout,
        })
    }

    fn subject(&self, output: &Output) -> String {
        let prefix = match output.destination {
            Destination::Results => &self.topics.results,
            Destination::Review => &self.topics.review,
            Destination::DeadLetters => &self.topics.dlq,
        };
        format!(
            "{prefix}.{}",
            output.tenant.as_deref().unwrap_or(UNKNOWN_TENANT)
        )
    }
}

/// The output's headers, each value checked: `Nats-Msg-Id` (JetStream drops a repeat within the
/// stream's duplicate window) and `traceparent` when it has one.
fn headers(output: &Output) -> Option<async_nats::HeaderMap> {
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("Nats-Msg-Id", Some(output.id.as_str())),
        ("traceparent", output.traceparent.as_deref()),
    ] {
        let checked = value
            .and_then(super::header_value)
            .and_then(|v| v.parse::<async_nats::HeaderValue>().ok());
        if let Some(v) = checked {
            headers.insert(name, v);
        }
    }
    Some(headers)
}

impl OutputSink for NatsSink {
    async fn send(&self, output: &Output) -> Result<(), SinkError> {
        let subject = self.subject(output);
        let payload = output.payload.clone();
        if payload.len() > self.client.server_info().max_payload {
            return Err(SinkError::Permanent(format!(
                "{} bytes exceed the server's max_payload of {}",
                payload.len(),
                self.client.server_info().max_payload
            )));
        }
        let headers = headers(output);
        let transient = |e: &dyn std::fmt::Display| SinkError::Transient(e.to_string());
        match &self.js {
            Some(js) => {
                let ack = match headers {
                    Some(h) => js.publish_with_headers(subject, h, payload).await,
                    None => js.publish(subject, payload).await,
                }
                .map_err(|e| transient(&e))?;
                ack.await.map(|_| ()).map_err(|e| transient(&e))
            }
            None => {
                match headers {
                    Some(h) => self.client.publish_with_headers(subject, h, payload).await,
                    None => self.client.publish(subject, payload).await,
                }
                .map_err(|e| transient(&e))?;
                tokio::time::timeout(self.timeout, self.client.flush())
                    .await
                    .map_err(|_| SinkError::Transient("flush timed out".into()))?
                    .map_err(|e| transient(&e))
            }
        }
    }

    async fn flush(&self) {
        match tokio::time::timeout(self.timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "NATS sink flush failed"),
            Err(_) => tracing::warn!(
                timeout_ms = self.timeout.as_millis() as u64,
                "NATS sink flush timed out"
            ),
        }
    }
}
