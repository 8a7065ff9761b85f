//! One builder for every test's service config. It starts from the settings most tests share
//! (memory state, an HTTP port on a free loopback port, the `support` pipeline over models
//! `small` and `large` on provider `llm`) and replaces whole top-level sections, so each test
//! states only what it is about.
//!
//! A section's value is YAML text: a flow value on one line (`{kind: memory}`), or block
//! entries whose first line is written as is and whose further lines are indented by two
//! spaces (`"small: {...}\n  large: {...}"`), as they appear under the section's key.

use std::path::{Path, PathBuf};

use switchyard::config::{self, Plan};

use super::{nats_url, redis_url, NatsNames, JOBS_TOPIC};

/// Models `small` and `large` on provider `llm`, with prices.
pub const MODELS: &str =
    "small: {provider: llm, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}, timeout_ms: 5000}\n  \
     large: {provider: llm, model: gpt-4o, price: {input: 2.5, output: 10}, timeout_ms: 5000}";

/// Prompts `triage` (classification) and `answer` (generation) used by [`SUPPORT`].
pub const PROMPTS: &str =
    "triage: {user: \"Categories: {{categories}}\\n\\nTicket:\\n{{input.text}}\"}\n  \
     answer: {system: \"Triaged as {{steps.classify.output}}.\", user: \"{{input.text}}\"}";

/// Classify on `small`, route `technical` to `large`, generate the answer.
pub const SUPPORT: &str = "support:
    steps:
      - {name: classify, kind: classify, model: small, prompt: triage, categories: [billing, technical, account]}
      - {name: route, kind: route, on: classify, routes: {technical: large, default: small}}
      - {name: answer, kind: generate, model: \"{{route.model}}\", prompt: answer}";

/// A service config under construction; see the module docs.
#[derive(Clone)]
pub struct TestConfig {
    sections: Vec<(&'static str, String)>,
}

impl TestConfig {
    fn with_source(source: String) -> Self {
        Self {
            sections: vec![
                ("source", source),
                ("state", "{kind: memory}".into()),
                ("http", "{listen: \"127.0.0.1:0\"}".into()),
                (
                    "limits",
                    "{max_inflight_jobs: 64, max_job_bytes: 4096, drain_timeout_ms: 5000}".into(),
                ),
                ("models", MODELS.into()),
                ("prompts", PROMPTS.into()),
                ("pipelines", SUPPORT.into()),
            ],
        }
    }

    /// Kafka in and out through `brokers` (the jobs topic [`JOBS_TOPIC`], a fresh consumer
    /// group). The short session timeout matters: the mock cluster holds a new member's join
    /// until the previous member's session expires, even after a clean LeaveGroup.
    pub fn kafka(brokers: &str) -> Self {
        Self::with_source(format!(
            "{{kind: kafka, brokers: \"{brokers}\", group: \"it-{group:x}\", topic: {JOBS_TOPIC},\n         \
             librdkafka: {{auto.commit.interval.ms: 200, session.timeout.ms: 6000, heartbeat.interval.ms: 500}}}}",
            group = rand::random::<u64>()
        ))
    }

    /// NATS JetStream in and out under the test's private names, Redis state.
    pub fn nats(names: &NatsNames) -> Self {
        let p = &names.prefix;
        Self::with_source(format!(
            "{{kind: nats, url: \"{nats}\", stream: {js}, subjects: [\"{p}.jobs.>\"], consumer: switchyard,\n         \
             ack_wait_ms: 3000, max_deliver: 20, batch: 32}}",
            nats = nats_url(),
            js = names.jobs_stream,
        ))
        .set(
            "sink",
            format!(
                "{{kind: nats, stream: {os}, topics: {{results: {p}.results, review: {p}.review, dlq: {p}.dlq}}}}",
                os = names.outputs_stream
            ),
        )
        .set(
            "state",
            format!(
                "{{kind: redis, url: \"{}\", key_prefix: \"{p}:\", claim_lease_ms: 3000}}",
                redis_url()
            ),
        )
        .set("reviews", format!("{{decisions: {p}.decisions}}"))
    }

    /// Provider `llm`: an OpenAI-compatible server at `addr` (a test-owned mock), default
    /// retry policy.
    pub fn llm(self, addr: impl std::fmt::Display) -> Self {
        self.set(
            "providers",
            format!("llm: {{kind: openai, base_url: \"http://{addr}/v1\"}}"),
        )
    }

    /// Replaces (or adds) the top-level section `key`.
    pub fn set(mut self, key: &'static str, yaml: impl Into<String>) -> Self {
        let yaml = yaml.into();
        match self.sections.iter_mut().find(|(k, _)| *k == key) {
            Some(section) => section.1 = yaml,
            None => self.sections.push((key, yaml)),
        }
        self
    }

    /// The YAML of section `key` (empty when absent).
    pub fn section(&self, key: &str) -> String {
        self.sections
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Leaves the section `key` out (the service's default applies).
    pub fn without(mut self, key: &str) -> Self {
        self.sections.retain(|(k, _)| *k != key);
        self
    }

    pub fn text(&self) -> String {
        let mut text = String::new();
        for (key, value) in &self.sections {
            if value.starts_with(['{', '[', '"']) || !value.contains(':') {
                text.push_str(&format!("{key}: {value}\n"));
            } else {
                text.push_str(&format!("{key}:\n  {value}\n"));
            }
        }
        text
    }

    pub fn plan(&self) -> Plan {
        self.plan_env(&[])
    }

    /// The config loaded with `SWITCHYARD__...` overrides, as the service would from its
    /// environment.
    pub fn plan_env(&self, env: &[(&str, &str)]) -> Plan {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        config::load_str(&self.text(), "test config", env)
            .unwrap_or_else(|e| panic!("{e:#}\nin:\n{}", self.text()))
    }

    /// Writes the config to `dir/name` (for `switchyard` processes) and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.text()).unwrap();
        path
    }
}
