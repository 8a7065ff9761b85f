//! The embedded deployment: librdkafka's mock cluster (the real Kafka protocol, in-process) with
//! switchyard's topics, and the demo config pointed at it.

use std::path::PathBuf;

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;

use crate::config::{self, Plan, SinkPlan, SourcePlan};

/// The embedded default configuration.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// An in-process Kafka cluster with switchyard's topics created.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

impl EmbeddedKafka {
    pub fn start(
        jobs_topic: &str,
        topics: &config::Topics,
        partitions: i32,
    ) -> anyhow::Result<Self> {
        let cluster = MockCluster::new(1).context("starting the in-process Kafka cluster")?;
        cluster.create_topic(jobs_topic, partitions, 1)?;
        for topic in [&topics.results, &topics.review, &topics.dlq] {
            cluster.create_topic(topic, partitions.min(3), 1)?;
        }
        // Review decisions come back here (`reviews.decisions`' default).
        cluster.create_topic("switchyard.decisions", partitions.min(3), 1)?;
        Ok(Self { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    pub fn cluster(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        &self.cluster
    }
}

/// Loads the demo config (embedded, or `path`) pointed at `brokers`.
pub fn demo_plan(path: Option<&PathBuf>, brokers: &str) -> anyhow::Result<Plan> {
    let (text, origin) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEMO_CONFIG.to_owned(),
            "embedded config/demo.yaml".to_owned(),
        ),
    };
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.push(("SWITCHYARD__SOURCE__BROKERS".into(), brokers.into()));
    env.push(("SWITCHYARD__SINK__BROKERS".into(), brokers.into()));
    Ok(config::load_str(&text, &origin, env)?)
}

/// The jobs topic and output topics of a Kafka-to-Kafka plan (what the demo runs).
pub fn topics_of(plan: &Plan) -> anyhow::Result<(String, config::Topics)> {
    match (&plan.source, &plan.sink) {
        (SourcePlan::Kafka(source), SinkPlan::Kafka(sink)) => {
            Ok((source.topic.clone(), sink.topics.clone()))
        }
        _ => anyhow::bail!(
            "the demo runs an in-process Kafka cluster: its config needs a kafka source and sink"
        ),
    }
}
