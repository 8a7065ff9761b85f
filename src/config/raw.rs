//! The configuration file exactly as written: serde structs with `deny_unknown_fields`, so a
//! typo is an error that names the field. Nothing outside `config` sees these types.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_norway::Value;

use super::plan::{Faults, Latency, MockAnswer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub source: RawSource,
    #[serde(default)]
    pub sink: RawSink,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub limits: RawLimits,
    pub providers: BTreeMap<String, RawProvider>,
    pub models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub prompts: BTreeMap<String, RawPrompt>,
    /// Versioned prompts as files, labels, and the lock of their content hashes.
    #[serde(default)]
    pub prompt_registry: Option<RawPromptRegistry>,
    pub pipelines: BTreeMap<String, RawPipeline>,
    #[serde(default)]
    pub default_pipeline: Option<String>,
    #[serde(default)]
    pub pools: RawPools,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub log: RawLog,
    /// Per-tenant limits, budgets and scheduling weight; `default` applies to every tenant
    /// not named (and fills the fields a named tenant leaves out).
    #[serde(default)]
    /// Tenant name -> [`RawTenant`], plus the reserved `unknown: default | reject`; each entry
    /// is read in validation, so a problem names its tenant.
    pub tenants: BTreeMap<String, Value>,
    #[serde(default)]
    pub cache: RawCache,
    /// Where review decisions come back, and how often due reviews are looked for.
    #[serde(default)]
    pub reviews: RawReviews,
}

/// The review round trip (`reviews:`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReviews {
    /// The decisions topic (Kafka) or subject (NATS; `<subject>.<tenant>` vouches for the
    /// tenant, like a job's subject).
    pub decisions: String,
    /// Consume decisions: `true`, `false`, or unset for "when any pipeline can send a result
    /// to review".
    pub consume: Option<bool>,
    /// How often each replica looks for reviews past their deadline.
    pub expire_every_ms: u64,
}

impl Default for RawReviews {
    fn default() -> Self {
        Self {
            decisions: "switchyard.decisions".into(),
            consume: None,
            expire_every_ms: 1000,
        }
    }
}

/// Exact-match response cache in the state store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    pub ttl_s: u64,
    /// `tenant` (default): answers are shared only within a tenant; `global`: across tenants.
    pub scope: String,
    /// Only requests at or below this temperature are cached (deterministic ones by default).
    pub max_temperature: f64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_s: 3600,
            scope: "tenant".into(),
            max_temperature: 0.0,
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// Jobs admitted per second, summed over all replicas.
    pub rps: Option<f64>,
    /// LLM tokens (input + output) per minute, summed over all replicas.
    pub tokens_per_min: Option<f64>,
    pub budget_usd_per_day: Option<f64>,
    pub budget_usd_per_month: Option<f64>,
    /// Share of the run slots relative to other waiting tenants.
    pub weight: Option<u32>,
    /// Jobs of this tenant waiting for admission in one replica, at most.
    pub max_queued: Option<usize>,
    /// Limits on each of the tenant's users (the job's `user`), summed over all replicas.
    pub per_user: Option<RawPerUser>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPerUser {
    /// Jobs of one user admitted per second.
    pub rps: Option<f64>,
    /// LLM tokens (input + output) of one user per minute.
    pub tokens_per_min: Option<f64>,
}

/// Requests and tokens per minute a provider or model may be sent, summed over all replicas.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
}

/// Structured logs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `pretty` or `json` (one JSON object per line).
    pub format: String,
    /// A tracing filter, e.g. `info` or `info,switchyard::llm=warn`; `RUST_LOG` overrides it.
    pub filter: String,
    /// Include prompt and response text in the per-call records.
    pub payloads: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            filter: "info".into(),
            payloads: false,
        }
    }
}

/// The HTTP port for `/healthz` and `/readyz`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// `host:port`; `off` disables the port.
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawSource {
    Kafka {
        brokers: String,
        #[serde(default = "default_group")]
        group: String,
        #[serde(default = "default_jobs_topic")]
        topic: String,
        #[serde(default)]
        librdkafka: BTreeMap<String, Value>,
        /// librdkafka properties whose values are secrets, by the environment variable that
        /// holds each (`sasl.password: KAFKA_PASSWORD`).
        #[serde(default)]
        librdkafka_env: BTreeMap<String, String>,
        /// Where a job's tenant is vouched for: `payload` (its `tenant` field alone) or `key`
        /// (the message key must name the same tenant).
        #[serde(default)]
        tenant_from: Option<String>,
        /// Where jobs held back by their tenant's rate limit are parked until their turn
        /// (written and confirmed before the job's offset is committed, read back when due).
        /// switchyard creates no topic: create it like the jobs topic. Unset: such jobs wait
        /// in the process, holding in-flight slots.
        #[serde(default)]
        delay_topic: Option<String>,
    },
    /// A durable JetStream pull consumer, shared by all replicas (queue semantics).
    Nats {
        url: String,
        #[serde(default = "default_jobs_stream")]
        stream: String,
        /// Subjects of the stream when switchyard creates it.
        #[serde(default = "default_jobs_subjects")]
        subjects: Vec<String>,
        /// Create the stream when it is missing (otherwise it must exist).
        #[serde(default = "default_true")]
        create_stream: bool,
        /// Durable consumer name.
        #[serde(default = "default_group")]
        consumer: String,
        #[serde(default = "default_ack_wait_ms")]
        ack_wait_ms: u64,
        #[serde(default = "default_max_deliver")]
        max_deliver: i64,
        /// Messages delivered and not yet acked, parked ones included (JetStream stops
        /// delivering at this bound; its own default of 1,000 would let a parked backlog stall
        /// every tenant).
        #[serde(default = "default_max_ack_pending")]
        max_ack_pending: i64,
        /// Messages fetched per pull request.
        #[serde(default = "default_batch")]
        batch: usize,
        /// How to authenticate (secrets from the environment or files, never inline).
        #[serde(default)]
        auth: RawNatsAuth,
        #[serde(default)]
        tls: Option<RawTls>,
    },
}

/// NATS authentication: at most one of a token, a user and password, an nkey seed or a
/// credentials file (JWT + nkey, as Synadia Cloud/NGS issue them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNatsAuth {
    pub token_env: Option<String>,
    pub user: Option<String>,
    pub password_env: Option<String>,
    pub nkey_seed_env: Option<String>,
    pub nkey_seed_file: Option<String>,
    pub credentials_file: Option<String>,
}

/// TLS material as files: a CA to trust (beyond the system's), a client certificate and key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

fn default_jobs_stream() -> String {
    "SWITCHYARD_JOBS".into()
}
fn default_jobs_subjects() -> Vec<String> {
    vec!["switchyard.jobs.>".into()]
}
fn default_true() -> bool {
    true
}
fn default_ack_wait_ms() -> u64 {
    30_000
}
/// Unlimited: switchyard acks or terminates every message it finishes (poison messages become
/// dead letters), so redeliveries only come from hand-backs and crashes, and a cap would strand
/// a job that was handed back on its last allowed delivery.
fn default_max_deliver() -> i64 {
    -1
}
fn default_max_ack_pending() -> i64 {
    50_000
}
fn default_batch() -> usize {
    16
}

fn default_group() -> String {
    "switchyard".into()
}
fn default_jobs_topic() -> String {
    "switchyard.jobs".into()
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawSink {
    Kafka {
        /// Defaults to the source's brokers.
        #[serde(default)]
        brokers: Option<String>,
        #[serde(default)]
        topics: RawTopics,
        #[serde(default = "default_delivery_timeout_ms")]
        delivery_timeout_ms: u64,
        #[serde(default)]
        librdkafka: BTreeMap<String, Value>,
        /// Secret librdkafka properties by environment variable; default to the source's when
        /// the brokers are the source's.
        #[serde(default)]
        librdkafka_env: BTreeMap<String, String>,
    },
    /// Publishes to `<topic>.<tenant>` subjects (`_unknown` when the tenant is unreadable).
    Nats {
        /// Defaults to the source's URL when the source is NATS.
        #[serde(default)]
        url: Option<String>,
        /// Subject prefixes.
        #[serde(default)]
        topics: RawTopics,
        /// Wait for JetStream publish acks (a stream must capture the subjects); `false`
        /// publishes with core NATS (confirmed only as far as the server's socket).
        #[serde(default = "default_true")]
        jetstream: bool,
        /// Stream to create for the outputs when missing (JetStream only).
        #[serde(default = "default_outputs_stream")]
        stream: Option<String>,
        #[serde(default = "default_delivery_timeout_ms")]
        delivery_timeout_ms: u64,
        /// Default to the source's when the source is NATS and no `url` is set.
        #[serde(default)]
        auth: Option<RawNatsAuth>,
        #[serde(default)]
        tls: Option<RawTls>,
    },
}

fn default_outputs_stream() -> Option<String> {
    Some("SWITCHYARD_OUTPUTS".into())
}

impl Default for RawSink {
    fn default() -> Self {
        RawSink::Kafka {
            brokers: None,
            topics: RawTopics::default(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            librdkafka: BTreeMap::new(),
            librdkafka_env: BTreeMap::new(),
        }
    }
}

fn default_delivery_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTopics {
    pub results: String,
    pub review: String,
    pub dlq: String,
}

impl Default for RawTopics {
    fn default() -> Self {
        Self {
            results: "switchyard.results".into(),
            review: "switchyard.review".into(),
            dlq: "switchyard.dlq".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
// Read once at start-up: the size of the Redis variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum RawState {
    Memory {
        #[serde(default = "default_max_entries")]
        max_entries: usize,
        #[serde(default = "default_result_ttl_s")]
        result_ttl_s: u64,
        #[serde(default = "default_claim_lease_ms")]
        claim_lease_ms: u64,
    },
    Redis {
        /// `redis://host:6379/0`; use `url_env` instead when the URL carries a password.
        #[serde(default)]
        url: Option<String>,
        #[serde(default)]
        url_env: Option<String>,
        #[serde(default = "default_key_prefix")]
        key_prefix: String,
        #[serde(default = "default_result_ttl_s")]
        result_ttl_s: u64,
        #[serde(default = "default_claim_lease_ms")]
        claim_lease_ms: u64,
        #[serde(default = "default_state_timeout_ms")]
        timeout_ms: u64,
        /// ACL user (Redis 6+); its password comes from `password_env`.
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password_env: Option<String>,
        /// TLS files for a `rediss://` URL: a CA to trust, a client certificate and key.
        #[serde(default)]
        tls: Option<RawTls>,
        /// Skip certificate verification (testing only; a start-up warning says so).
        #[serde(default)]
        tls_insecure: bool,
        /// Redis Cluster: `url` lists seed nodes, comma-separated; commands go by hash slot.
        #[serde(default)]
        cluster: bool,
        /// Redis Sentinel: `url` lists the sentinels, comma-separated, and this names the
        /// master they watch; a failover is followed by asking them again.
        #[serde(default)]
        sentinel_master: Option<String>,
    },
}

impl Default for RawState {
    fn default() -> Self {
        RawState::Memory {
            max_entries: default_max_entries(),
            result_ttl_s: default_result_ttl_s(),
            claim_lease_ms: default_claim_lease_ms(),
        }
    }
}

fn default_key_prefix() -> String {
    "sy:".into()
}
fn default_state_timeout_ms() -> u64 {
    2_000
}
fn default_max_entries() -> usize {
    100_000
}
fn default_result_ttl_s() -> u64 {
    86_400
}
fn default_claim_lease_ms() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_inflight_jobs: usize,
    /// Jobs running their pipeline at once; the rest wait in their tenant's queue.
    pub max_running_jobs: usize,
    /// Intake resumes once in-flight jobs fall below this fraction of `max_inflight_jobs`.
    pub resume_below: f64,
    /// A job whose tenant's rate limit puts its turn further off than this leaves the line
    /// (JetStream: nak with that delay; Kafka: the delay topic) instead of holding a slot.
    pub park_after_ms: u64,
    pub max_job_bytes: usize,
    pub max_response_bytes: usize,
    pub drain_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_inflight_jobs: 1024,
            max_running_jobs: 256,
            resume_below: 0.8,
            park_after_ms: 1_000,
            max_job_bytes: 1024 * 1024,
            max_response_bytes: 4 * 1024 * 1024,
            drain_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawProvider {
    /// Any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama, llama.cpp, ...).
    Openai {
        base_url: String,
        #[serde(default)]
        api_key_env: Option<String>,
        #[serde(default)]
        retry: RawRetry,
        #[serde(default)]
        circuit: RawCircuit,
        #[serde(default)]
        limits: RawRateLimits,
    },
    /// Anthropic's Messages API.
    Anthropic {
        #[serde(default = "anthropic_url")]
        base_url: String,
        #[serde(default)]
        api_key_env: Option<String>,
        /// System prompts at least this long (characters) are marked for prompt caching.
        #[serde(default = "cache_system_min_chars")]
        cache_system_min_chars: usize,
        #[serde(default)]
        retry: RawRetry,
        #[serde(default)]
        circuit: RawCircuit,
        #[serde(default)]
        limits: RawRateLimits,
    },
    /// The built-in mock provider, served in-process over HTTP on a loopback port.
    Mock {
        /// Which API the mock is spoken to with: `openai` (default) or `anthropic`.
        #[serde(default)]
        api: RawApi,
        #[serde(default)]
        latency: Latency,
        #[serde(default)]
        faults: Faults,
        #[serde(default)]
        seed: Option<u64>,
        /// Canned answers: the first rule whose regex matches the prompt answers it.
        #[serde(default)]
        answers: Vec<MockAnswer>,
        /// Context window per model name; a longer prompt gets the API's 400 error.
        #[serde(default)]
        context_windows: BTreeMap<String, u64>,
        /// The batch APIs: `completion_ms` (how long a batch takes), `failure_rate`.
        #[serde(default)]
        batch: crate::config::MockBatch,
        #[serde(default)]
        retry: RawRetry,
        #[serde(default)]
        circuit: RawCircuit,
        #[serde(default)]
        limits: RawRateLimits,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    /// Attempts on one target in a round before the call moves on to its next fallback.
    pub max_attempts: u32,
    /// How long a call keeps going round its targets after transient failures (the job's
    /// deadline, when sooner, ends it first).
    pub max_elapsed_ms: u64,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Retries allowed per first attempt to this provider (a retry budget, so an outage adds
    /// at most this share of load) ...
    pub budget_ratio: f64,
    /// ... plus this many retries per second regardless.
    pub budget_min_per_s: f64,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            max_elapsed_ms: 600_000,
            base_delay_ms: 200,
            max_delay_ms: 10_000,
            budget_ratio: 0.5,
            budget_min_per_s: 10.0,
        }
    }
}

/// Circuit breaker per provider + model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCircuit {
    /// Open after this many failures in a row (a failure of a call sent before the latest
    /// success does not extend the run: the target has answered well since) ...
    pub consecutive_failures: u32,
    /// ... or when this share of the calls that finished in the last `window_ms` failed (once
    /// `min_calls` did; at most the last `window` calls are kept).
    pub failure_rate: f64,
    pub window: usize,
    pub window_ms: u64,
    pub min_calls: usize,
    /// How long an open circuit skips the target before probing it.
    pub open_ms: u64,
    /// Calls let through while half-open.
    pub half_open_probes: u32,
}

impl Default for RawCircuit {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 1000,
            window_ms: 10_000,
            min_calls: 10,
            open_ms: 30_000,
            half_open_probes: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub provider: String,
    pub model: String,
    /// Without a price the model's calls cost 0 (a start-up warning says so).
    #[serde(default)]
    pub price: Option<RawPrice>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub fallbacks: Vec<String>,
    #[serde(default)]
    pub limits: RawRateLimits,
    /// The model's context window in tokens: a prompt that cannot fit skips this model (on to
    /// a fallback with a larger window) without a call.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// OpenAI's flex tier (`service_tier: "flex"`): cheaper and slower; jobs with
    /// `priority: low` use it.
    #[serde(default)]
    pub flex: Option<RawFlex>,
    /// The provider's batch API prices (default half of `price`, as OpenAI and Anthropic
    /// charge).
    #[serde(default)]
    pub batch_price: Option<RawPrice>,
}

/// `models.<m>.flex`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlex {
    /// The flex tier's prices (USD per million tokens).
    pub price: RawPrice,
    /// Each flex attempt's timeout (flex answers can take minutes; default 10 minutes).
    #[serde(default = "default_flex_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_flex_timeout_ms() -> u64 {
    600_000
}

fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_tokens() -> u32 {
    1024
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawApi {
    #[default]
    Openai,
    Anthropic,
}

fn anthropic_url() -> String {
    "https://api.anthropic.com".into()
}

fn cache_system_min_chars() -> usize {
    4096
}

/// USD per million tokens.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub output: f64,
    /// Prompt-cache reads and writes (Anthropic); by default 0.1x and 1.25x the input price.
    #[serde(default)]
    pub cache_read: Option<f64>,
    #[serde(default)]
    pub cache_write: Option<f64>,
}

/// `prompt_registry`: `dir` holds `<name>/<version>.yaml` (a prompt: `system`, `user`) and
/// `<name>/labels.yaml` (`label: version`); `lock` (default `<dir>/prompts.lock`) records the
/// content hash of every versioned prompt (`switchyard prompts lock` writes it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPromptRegistry {
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrompt {
    #[serde(default)]
    pub system: Option<String>,
    pub user: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub steps: Vec<RawStep>,
    /// Model alias used instead when the tenant's budget cannot cover the configured model.
    #[serde(default)]
    pub budget_fallback: Option<String>,
    /// The job's output: a step's name, or `{template: ..}` / `{json: ..}` assembled from the
    /// steps' outputs; by default the output of the last step that ran.
    #[serde(default)]
    pub output: Option<RawOutput>,
    /// A static answer (status `degraded`) instead of a `provider_failed` / `output_invalid`
    /// dead letter.
    #[serde(default)]
    pub on_failure: Option<RawOnFailure>,
    /// Checks on the job's input before any provider sees it and on its output before it leaves.
    #[serde(default)]
    pub guardrails: Option<RawGuardrails>,
    /// When a result goes to review besides low route confidence: an expression over the
    /// steps' outputs and the input, a cost threshold.
    #[serde(default)]
    pub review: Option<RawReviewSpec>,
    /// Jobs that can wait go through the providers' batch APIs, at the batch price.
    #[serde(default)]
    pub batch: Option<RawBatch>,
    /// Each step record carries its output up to this many characters (0: none).
    #[serde(default = "default_record_output_chars")]
    pub record_output_chars: usize,
}

fn default_record_output_chars() -> usize {
    2_000
}

/// `batch:` of a pipeline: which jobs wait for a provider batch, and how batches are made.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    /// Jobs with `priority: low` (default true).
    #[serde(default = "yes")]
    pub low_priority: bool,
    /// Jobs whose deadline is at least this far off.
    #[serde(default)]
    pub min_deadline_s: Option<u64>,
    /// How long requests are collected before a batch is sent.
    #[serde(default = "default_collect_ms")]
    pub collect_ms: u64,
    /// Requests per batch at most.
    #[serde(default = "default_batch_requests")]
    pub max_requests: usize,
    /// How often an open batch is asked whether it has ended.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Requests waiting to be sent per model at most: beyond it, jobs run at once instead of
    /// parking (the state store holds every parked job).
    #[serde(default = "default_max_queued")]
    pub max_queued: u64,
}

fn default_max_queued() -> u64 {
    100_000
}

fn yes() -> bool {
    true
}
fn default_collect_ms() -> u64 {
    10_000
}
fn default_batch_requests() -> usize {
    1_000
}
fn default_poll_ms() -> u64 {
    30_000
}

/// `semantic_cache:` of a generate step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSemanticCache {
    /// The model (an OpenAI-compatible provider's embeddings) that embeds the question.
    pub embedding_model: String,
    /// The question: `input.<field>` (default `input.text`). The rest of the rendered prompt
    /// must match exactly for an entry to answer.
    #[serde(default = "default_semantic_on")]
    pub on: String,
    /// Cosine similarity at or above which a stored question counts as the same (0.95).
    #[serde(default = "default_semantic_threshold")]
    pub threshold: f64,
    /// Questions kept per tenant and prompt (the oldest go first).
    #[serde(default = "default_semantic_entries")]
    pub max_entries: usize,
    #[serde(default = "default_semantic_ttl_s")]
    pub ttl_s: u64,
    /// Only steps whose model's temperature is at most this use the cache (deterministic
    /// ones by default: a sampled answer is one of many).
    #[serde(default)]
    pub max_temperature: f64,
}

fn default_semantic_on() -> String {
    "input.text".into()
}
fn default_semantic_threshold() -> f64 {
    0.95
}
fn default_semantic_entries() -> usize {
    2_000
}
fn default_semantic_ttl_s() -> u64 {
    86_400
}

/// `review:` of a pipeline: its settings, or the keyword `before_generate`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawReviewSpec {
    Keyword(String),
    Settings(RawReview),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReview {
    /// Ask review before the first generation step instead of after the pipeline.
    #[serde(default)]
    pub before_generate: bool,
    /// E.g. `steps.classify.category == "legal" or steps.rules.confidence < 0.6`.
    #[serde(default)]
    pub when: Option<String>,
    /// The job's cost (all its calls) above this sends it to review.
    #[serde(default)]
    pub cost_above_usd: Option<f64>,
    /// A review request is due this long after the job was received (default a day).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// What a review that times out becomes: `reject` (default), `approve`, or `rerun`.
    #[serde(default)]
    pub on_timeout: Option<String>,
    /// The model a timed-out review's job runs again on (`on_timeout: rerun`).
    #[serde(default)]
    pub rerun_model: Option<String>,
}

/// `output:` of a pipeline: a step's name or an assembled value.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawOutput {
    Step(String),
    Assembled(RawAssemble),
}

/// Text or JSON assembled from earlier outputs: `template:` (text) or `json:` (any YAML value
/// whose strings are templates; a string that is one `{{..}}` keeps the value's JSON type).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssemble {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub json: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOnFailure {
    pub output: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuardrails {
    #[serde(default)]
    pub input: RawGuardSide,
    #[serde(default)]
    pub output: RawGuardSide,
    /// What a blocked job becomes: `dead_letter` (`guardrail_blocked`) or `review`.
    #[serde(default)]
    pub on_block: RawGuardAction,
    /// What happens when a check itself fails: `dead_letter` or `review`; never a pass.
    #[serde(default)]
    pub on_error: RawGuardAction,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawGuardAction {
    #[default]
    DeadLetter,
    Review,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuardSide {
    #[serde(default)]
    pub max_chars: Option<usize>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Prompt-injection patterns: `default` (the shipped set), `none`, or a list of regexes.
    #[serde(default)]
    pub injection: Option<RawPatterns>,
    /// More regexes that block (case-insensitive).
    #[serde(default)]
    pub deny: Vec<String>,
    /// PII kinds to redact: `all` or a list of `email`, `phone`, `card`, `iban`, `national_id`.
    #[serde(default)]
    pub redact_pii: Option<RawPatterns>,
}

/// A keyword (`default`, `all`, `none`) or an explicit list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPatterns {
    Keyword(String),
    List(Vec<String>),
}

/// A pipeline step: what every kind shares, and the kind's own fields.
#[derive(Debug, Deserialize)]
pub struct RawStep {
    pub name: String,
    #[serde(default)]
    pub needs: Option<Vec<String>>,
    /// Run only when this expression over earlier outputs holds; otherwise recorded as skipped.
    #[serde(default)]
    pub when: Option<String>,
    /// A static output (the step then counts as degraded) instead of failing the job.
    #[serde(default)]
    pub on_failure: Option<RawOnFailure>,
    #[serde(flatten)]
    pub kind: RawStepKind,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawStepKind {
    Classify {
        categories: Vec<String>,
        #[serde(default)]
        method: RawClassifyMethod,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        prompt: Option<String>,
        /// `method: rules`: category -> keywords, or a list of rules with confidences.
        #[serde(default)]
        rules: Option<RawRules>,
    },
    Route {
        on: String,
        routes: BTreeMap<String, RawRouteTarget>,
        #[serde(default)]
        review_below_confidence: Option<f64>,
    },
    Generate {
        model: String,
        prompt: String,
        /// JSON Schema file the answer must satisfy (path relative to the working directory).
        #[serde(default)]
        output_schema: Option<String>,
        /// Repair attempts (the validation error fed back to the model) before `output_invalid`.
        #[serde(default = "default_max_repairs")]
        max_repairs: u32,
        /// When every model's context window is too small: `fail` (default) or `truncate`.
        #[serde(default)]
        on_context_overflow: RawOverflow,
        /// Weighted variants of this step (prompt, model, parameters), assigned stickily.
        #[serde(default)]
        experiment: Option<RawExperiment>,
        /// Answers paraphrases of an earlier question from its answer (opt-in).
        #[serde(default)]
        semantic_cache: Option<RawSemanticCache>,
    },
    /// Text or JSON assembled from earlier outputs, without a provider call.
    Template {
        #[serde(default)]
        template: Option<String>,
        #[serde(default)]
        json: Option<serde_json::Value>,
    },
    /// Splits `input.<field>` (or an earlier step's output) into chunks.
    Split {
        from: String,
        #[serde(default)]
        by: RawSplitBy,
        #[serde(default)]
        size: Option<usize>,
        #[serde(default)]
        overlap: Option<usize>,
        #[serde(default = "default_max_chunks")]
        max_chunks: usize,
        /// Whose tokenizer counts tokens (`by: tokens`); bytes bound the count otherwise.
        #[serde(default)]
        model: Option<String>,
    },
    /// One LLM call per chunk of a split step (`{{chunk}}`, `{{chunk_index}}`, `{{chunk_count}}`).
    Map {
        over: String,
        model: String,
        prompt: String,
    },
    /// Combines the outputs of a map step (`{{mapped}}`); hierarchical past `max_input_chars`.
    Reduce {
        over: String,
        model: String,
        prompt: String,
        #[serde(default = "default_reduce_chars")]
        max_input_chars: usize,
    },
    /// Evaluator-optimizer: generate, score with feedback, regenerate with the feedback.
    Refine {
        model: String,
        prompt: String,
        evaluator: RawEvaluator,
        #[serde(default)]
        max_rounds: Option<u32>,
        #[serde(default = "default_stop_at")]
        stop_at: f64,
    },
}

/// An A/B experiment on a generate step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExperiment {
    /// Default: `<pipeline>.<step>`.
    #[serde(default)]
    pub name: Option<String>,
    /// What keeps its variant: `user` (the job's `user`, else its tenant), `tenant` or `job`.
    #[serde(default)]
    pub sticky_by: RawStickyBy,
    /// Percent of units in the experiment; the rest run the step as configured, unrecorded.
    #[serde(default = "full_rollout")]
    pub rollout: f64,
    pub variants: BTreeMap<String, RawVariant>,
}

fn full_rollout() -> f64 {
    100.0
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawStickyBy {
    #[default]
    User,
    Tenant,
    Job,
}

/// A variant: its share and what it changes (nothing: the control).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariant {
    pub weight: u32,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

fn default_max_repairs() -> u32 {
    2
}

fn default_max_chunks() -> usize {
    64
}

fn default_reduce_chars() -> usize {
    12_000
}

fn default_stop_at() -> f64 {
    0.8
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvaluator {
    pub model: String,
    pub prompt: String,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawSplitBy {
    #[default]
    Chars,
    Tokens,
    JsonArray,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawOverflow {
    #[default]
    Fail,
    Truncate,
}

/// A route's target: a model alias, or a model and/or prompt and/or branch name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRouteTarget {
    Model(String),
    Full(RawRouteFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteFull {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRules {
    /// category -> keywords (case-insensitive); the first category with a keyword wins.
    Keywords(BTreeMap<String, Vec<String>>),
    /// Rules tried in order; the first whose tests all pass gives its category and confidence.
    List(Vec<RawRule>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub category: String,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub min_chars: Option<usize>,
    #[serde(default)]
    pub max_chars: Option<usize>,
    #[serde(default)]
    pub looks_like_code: Option<bool>,
    #[serde(default = "default_rule_confidence")]
    pub confidence: f64,
}

fn default_rule_confidence() -> f64 {
    1.0
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawClassifyMethod {
    #[default]
    Llm,
    Rules,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPools {
    pub classify: usize,
    pub route: usize,
    pub generate: usize,
}

impl Default for RawPools {
    fn default() -> Self {
        Self {
            classify: 64,
            route: 256,
            generate: 512,
        }
    }
}
