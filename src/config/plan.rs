//! The validated plan and the checks that build it from raw config.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::raw::{
    self, RawClassifyMethod, RawConfig, RawProvider, RawSink, RawSource, RawState, RawStep,
};
use crate::template::{Template, Var};

pub use super::raw::{RawFaults as Faults, RawLatency as Latency};

#[derive(Debug, Clone)]
pub struct Plan {
    pub source: SourcePlan,
    pub sink: SinkPlan,
    pub state: StatePlan,
    pub limits: Limits,
    pub providers: BTreeMap<String, ProviderPlan>,
    pub models: BTreeMap<String, Arc<ModelPlan>>,
    pub pipelines: BTreeMap<String, Arc<PipelinePlan>>,
    pub default_pipeline: Option<String>,
    pub pools: PoolSizes,
    /// Where `/healthz`, `/readyz` and `/metrics` listen; `None` when disabled.
    pub http_listen: Option<String>,
    pub log: LogPlan,
    pub tenants: TenantsPlan,
    /// The response cache; `None` when disabled.
    pub cache: Option<CachePlan>,
    /// Things that work but deserve a look (e.g. a model without a price).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LogPlan {
    pub json: bool,
    pub filter: String,
    pub payloads: bool,
}

#[derive(Debug, Clone)]
pub enum SourcePlan {
    Kafka(KafkaSourcePlan),
    Nats(NatsSourcePlan),
}

#[derive(Debug, Clone)]
pub struct NatsSourcePlan {
    pub url: String,
    pub stream: String,
    pub subjects: Vec<String>,
    pub create_stream: bool,
    pub consumer: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub batch: usize,
}

#[derive(Debug, Clone)]
pub struct NatsSinkPlan {
    pub url: String,
    pub topics: Topics,
    pub jetstream: bool,
    pub stream: Option<String>,
    pub delivery_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct KafkaSourcePlan {
    pub brokers: String,
    pub group: String,
    pub topic: String,
    /// librdkafka properties passed through verbatim (they win over switchyard's defaults,
    /// except the ones at-least-once delivery depends on).
    pub librdkafka: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub enum SinkPlan {
    Kafka(KafkaSinkPlan),
    Nats(NatsSinkPlan),
}

impl SinkPlan {
    pub fn topics(&self) -> &Topics {
        match self {
            SinkPlan::Kafka(k) => &k.topics,
            SinkPlan::Nats(n) => &n.topics,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KafkaSinkPlan {
    pub brokers: String,
    pub topics: Topics,
    pub delivery_timeout: Duration,
    pub librdkafka: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub results: String,
    pub review: String,
    pub dlq: String,
}

#[derive(Debug, Clone)]
pub struct StatePlan {
    pub kind: StateKind,
    /// How long a finished key is remembered.
    pub result_ttl: Duration,
    /// How long a claim outlives its last renewal (a crashed worker's job waits this long).
    pub claim_lease: Duration,
}

#[derive(Debug, Clone)]
pub enum StateKind {
    Memory {
        max_entries: usize,
    },
    Redis {
        url: RedisUrl,
        key_prefix: String,
        timeout: Duration,
    },
}

/// Where the Redis URL comes from; an env var keeps a password out of the file.
#[derive(Debug, Clone)]
pub enum RedisUrl {
    Inline(String),
    Env(String),
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_inflight_jobs: usize,
    pub max_running_jobs: usize,
    /// Intake resumes below this many in-flight jobs after reaching `max_inflight_jobs`.
    pub resume_at: usize,
    pub max_job_bytes: usize,
    pub max_response_bytes: usize,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitPolicy {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub window: usize,
    pub min_calls: usize,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_s: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MockSettings {
    pub latency: Latency,
    pub faults: Faults,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum ProviderKind {
    OpenAi {
        base_url: String,
        api_key_env: Option<String>,
    },
    Anthropic {
        base_url: String,
        api_key_env: Option<String>,
        cache_system_min_chars: usize,
    },
    /// Served in-process by the built-in mock server, spoken to over HTTP with the given API.
    Mock(MockSettings, WireApi),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachePlan {
    pub ttl: Duration,
    pub max_temperature: f64,
}

/// Which HTTP API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireApi {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone)]
pub struct ProviderPlan {
    pub kind: ProviderKind,
    pub limits: RateLimits,
    pub retry: RetryPolicy,
    pub circuit: CircuitPolicy,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

impl Price {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input + output_tokens as f64 * self.output) / 1_000_000.0
    }
}

#[derive(Debug, Clone)]
pub struct ModelPlan {
    pub alias: String,
    pub provider: String,
    pub model: String,
    pub price: Price,
    pub timeout: Duration,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Aliases tried in order after this one fails.
    pub fallbacks: Vec<String>,
    pub limits: RateLimits,
}

/// Requests and tokens per minute, summed over all replicas; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    pub rpm: Option<f64>,
    pub tpm: Option<f64>,
}

/// What one tenant may use. Unset limits are unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPlan {
    pub rps: Option<f64>,
    pub tokens_per_min: Option<f64>,
    pub budget_usd_per_day: Option<f64>,
    pub budget_usd_per_month: Option<f64>,
    pub weight: u32,
    pub max_queued: usize,
}

#[derive(Debug, Clone)]
pub struct TenantsPlan {
    pub default: TenantPlan,
    /// Tenants named in config: they get their own metric labels.
    pub named: BTreeMap<String, TenantPlan>,
}

impl TenantsPlan {
    pub fn get(&self, tenant: &str) -> &TenantPlan {
        self.named.get(tenant).unwrap_or(&self.default)
    }

    /// The metric label for a tenant: its name when configured, `other` otherwise.
    pub fn label<'a>(&self, tenant: &'a str) -> &'a str {
        if self.named.contains_key(tenant) {
            tenant
        } else {
            "other"
        }
    }
}

#[derive(Debug, Clone)]
pub struct PromptPlan {
    pub name: String,
    pub system: Option<Template>,
    pub user: Template,
}

#[derive(Debug, Clone)]
pub struct PipelinePlan {
    pub name: String,
    /// Model alias to use when the tenant's budget cannot cover a step's model.
    pub budget_fallback: Option<String>,
    /// In config order, which is a topological order: `needs` only name earlier steps.
    pub steps: Vec<StepPlan>,
}

impl PipelinePlan {
    /// The job's output is the last step's output.
    pub fn output_step(&self) -> usize {
        self.steps.len().saturating_sub(1)
    }
}

#[derive(Debug, Clone)]
pub struct StepPlan {
    pub name: String,
    pub needs: Vec<usize>,
    pub kind: StepKindPlan,
}

#[derive(Debug, Clone)]
pub enum StepKindPlan {
    Classify(ClassifyPlan),
    Route(RoutePlan),
    Generate(GeneratePlan),
}

impl StepKindPlan {
    pub fn name(&self) -> &'static str {
        match self {
            StepKindPlan::Classify(_) => "classify",
            StepKindPlan::Route(_) => "route",
            StepKindPlan::Generate(_) => "generate",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClassifyPlan {
    pub categories: Vec<String>,
    pub method: ClassifyMethod,
}

#[derive(Debug, Clone)]
pub enum ClassifyMethod {
    Llm {
        model: String,
        prompt: Arc<PromptPlan>,
    },
    /// category -> lower-cased keywords; the first category with a keyword in the text wins,
    /// else the last category.
    Rules(Vec<(String, Vec<String>)>),
}

#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Index of the classify step whose category is routed on.
    pub on: usize,
    pub routes: BTreeMap<String, String>,
    pub default: String,
    pub review_below_confidence: Option<f64>,
}

#[derive(Debug, Clone)]
pub enum ModelChoice {
    Fixed(String),
    /// `{{route.model}}`: the model alias chosen by the route step at this index.
    FromRoute(usize),
}

#[derive(Debug, Clone)]
pub struct GeneratePlan {
    pub model: ModelChoice,
    pub prompt: Arc<PromptPlan>,
    /// When set, the answer must be JSON satisfying this schema.
    pub output: Option<OutputSchema>,
}

/// A step's output schema, compiled at start-up.
#[derive(Clone)]
pub struct OutputSchema {
    pub path: String,
    pub validator: Arc<jsonschema::Validator>,
    pub max_repairs: u32,
}

impl std::fmt::Debug for OutputSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSchema")
            .field("path", &self.path)
            .field("max_repairs", &self.max_repairs)
            .finish()
    }
}

/// Reads and compiles a step's `output_schema`; problems name the field.
fn output_schema(
    p: &mut Problems,
    field: &str,
    path: &str,
    max_repairs: u32,
) -> Option<OutputSchema> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            p.add(field, format!("cannot read `{path}`: {e}"));
            return None;
        }
    };
    let schema: serde_json::Value = match serde_json::from_str(&text) {
        Ok(schema) => schema,
        Err(e) => {
            p.add(field, format!("`{path}` is not JSON: {e}"));
            return None;
        }
    };
    match jsonschema::validator_for(&schema) {
        Ok(validator) => Some(OutputSchema {
            path: path.to_owned(),
            validator: Arc::new(validator),
            max_repairs,
        }),
        Err(e) => {
            p.add(field, format!("`{path}` is not a valid JSON Schema: {e}"));
            None
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSizes {
    pub classify: usize,
    pub route: usize,
    pub generate: usize,
}

/// Collects problems instead of stopping at the first, so one run shows everything to fix;
/// warnings are things that work but deserve a look.
#[derive(Default)]
struct Problems(Vec<String>, Vec<String>);

impl Problems {
    fn warn(&mut self, field: impl AsRef<str>, message: impl AsRef<str>) {
        self.1
            .push(format!("{}: {}", field.as_ref(), message.as_ref()));
    }

    fn add(&mut self, field: impl AsRef<str>, message: impl AsRef<str>) {
        self.0
            .push(format!("{}: {}", field.as_ref(), message.as_ref()));
    }
}

pub(super) fn validate(raw: RawConfig) -> Result<Plan, Vec<String>> {
    let mut p = Problems::default();

    let source = match raw.source {
        RawSource::Kafka {
            brokers,
            group,
            topic,
            librdkafka,
        } => {
            non_empty(&mut p, "source.brokers", &brokers);
            non_empty(&mut p, "source.group", &group);
            non_empty(&mut p, "source.topic", &topic);
            SourcePlan::Kafka(KafkaSourcePlan {
                brokers,
                group,
                topic,
                librdkafka: properties(&mut p, "source.librdkafka", librdkafka),
            })
        }
        RawSource::Nats {
            url,
            stream,
            subjects,
            create_stream,
            consumer,
            ack_wait_ms,
            max_deliver,
            batch,
        } => {
            if !(url.starts_with("nats://") || url.starts_with("tls://") || url.contains(':')) {
                p.add(
                    "source.url",
                    format!("`{url}` is not a NATS URL (nats://host:4222)"),
                );
            }
            if stream.is_empty() || stream.contains(['.', ' ', '*', '>']) {
                p.add(
                    "source.stream",
                    "a stream name cannot be empty or contain `.`, spaces or wildcards",
                );
            }
            if consumer.is_empty() || consumer.contains(['.', ' ', '*', '>']) {
                p.add(
                    "source.consumer",
                    "a consumer name cannot be empty or contain `.`, spaces or wildcards",
                );
            }
            if subjects.is_empty() {
                p.add(
                    "source.subjects",
                    "list at least one subject (e.g. switchyard.jobs.>)",
                );
            }
            if ack_wait_ms < 1000 {
                p.add(
                    "source.ack_wait_ms",
                    "must be at least 1000 (in-progress acks are sent every third of it)",
                );
            }
            if max_deliver == 0 || max_deliver < -1 {
                p.add("source.max_deliver", "must be -1 (unlimited) or at least 1");
            }
            positive(&mut p, "source.batch", batch as u64);
            SourcePlan::Nats(NatsSourcePlan {
                url,
                stream,
                subjects,
                create_stream,
                consumer,
                ack_wait: Duration::from_millis(ack_wait_ms),
                max_deliver,
                batch,
            })
        }
    };
    let sink = match raw.sink {
        RawSink::Kafka {
            brokers,
            topics,
            delivery_timeout_ms,
            librdkafka,
        } => {
            let brokers = match (brokers, &source) {
                (Some(b), _) => b,
                (None, SourcePlan::Kafka(k)) => k.brokers.clone(),
                (None, SourcePlan::Nats(_)) => {
                    p.add("sink.brokers", "required when the source is not Kafka");
                    String::new()
                }
            };
            let topics = topics_plan(&mut p, topics);
            positive(&mut p, "sink.delivery_timeout_ms", delivery_timeout_ms);
            SinkPlan::Kafka(KafkaSinkPlan {
                brokers,
                topics,
                delivery_timeout: Duration::from_millis(delivery_timeout_ms),
                librdkafka: properties(&mut p, "sink.librdkafka", librdkafka),
            })
        }
        RawSink::Nats {
            url,
            topics,
            jetstream,
            stream,
            delivery_timeout_ms,
        } => {
            let url = match (url, &source) {
                (Some(u), _) => u,
                (None, SourcePlan::Nats(n)) => n.url.clone(),
                (None, SourcePlan::Kafka(_)) => {
                    p.add("sink.url", "required when the source is not NATS");
                    String::new()
                }
            };
            let topics = topics_plan(&mut p, topics);
            for (field, subject) in [
                ("results", &topics.results),
                ("review", &topics.review),
                ("dlq", &topics.dlq),
            ] {
                if subject.contains(['*', '>', ' ']) {
                    p.add(
                        format!("sink.topics.{field}"),
                        "a subject prefix cannot contain wildcards or spaces",
                    );
                }
            }
            positive(&mut p, "sink.delivery_timeout_ms", delivery_timeout_ms);
            SinkPlan::Nats(NatsSinkPlan {
                url,
                topics,
                jetstream,
                stream,
                delivery_timeout: Duration::from_millis(delivery_timeout_ms),
            })
        }
    };
    let jobs_topic: String = match &source {
        SourcePlan::Kafka(k) => k.topic.clone(),
        SourcePlan::Nats(n) => n.subjects.first().cloned().unwrap_or_default(),
    };
    let outputs = sink.topics();
    for (field, topic) in [
        ("results", &outputs.results),
        ("review", &outputs.review),
        ("dlq", &outputs.dlq),
    ] {
        let jobs_prefix = jobs_topic.trim_end_matches(".>");
        if *topic == jobs_topic
            || topic.starts_with(&format!("{jobs_prefix}."))
            || topic == jobs_prefix
        {
            p.add(format!("sink.topics.{field}"), format!("`{topic}` overlaps the jobs topic `{jobs_topic}`: outputs would be read back as jobs"));
        }
    }
    let state = match raw.state {
        RawState::Memory {
            max_entries,
            result_ttl_s,
            claim_lease_ms,
        } => {
            positive(&mut p, "state.max_entries", max_entries as u64);
            state_plan(
                &mut p,
                StateKind::Memory { max_entries },
                result_ttl_s,
                claim_lease_ms,
            )
        }
        RawState::Redis {
            url,
            url_env,
            key_prefix,
            result_ttl_s,
            claim_lease_ms,
            timeout_ms,
        } => {
            positive(&mut p, "state.timeout_ms", timeout_ms);
            let url = match (url, url_env) {
                (Some(url), None) => {
                    if !(url.starts_with("redis://")
                        || url.starts_with("rediss://")
                        || url.starts_with("redis+unix://"))
                    {
                        p.add(
                            "state.url",
                            format!("`{url}` is not a redis:// or rediss:// URL"),
                        );
                    }
                    RedisUrl::Inline(url)
                }
                (None, Some(var)) => {
                    non_empty(&mut p, "state.url_env", &var);
                    RedisUrl::Env(var)
                }
                (Some(_), Some(_)) => {
                    p.add("state.url", "set either `url` or `url_env`, not both");
                    RedisUrl::Inline(String::new())
                }
                (None, None) => {
                    p.add("state.url", "a redis state store needs `url` (or `url_env` naming a variable holding it)");
                    RedisUrl::Inline(String::new())
                }
            };
            let kind = StateKind::Redis {
                url,
                key_prefix,
                timeout: Duration::from_millis(timeout_ms),
            };
            state_plan(&mut p, kind, result_ttl_s, claim_lease_ms)
        }
    };
    let l = raw.limits;
    positive(
        &mut p,
        "limits.max_inflight_jobs",
        l.max_inflight_jobs as u64,
    );
    positive(&mut p, "limits.max_job_bytes", l.max_job_bytes as u64);
    positive(
        &mut p,
        "limits.max_response_bytes",
        l.max_response_bytes as u64,
    );
    positive(&mut p, "limits.max_running_jobs", l.max_running_jobs as u64);
    if !(l.resume_below > 0.0 && l.resume_below <= 1.0) {
        p.add(
            "limits.resume_below",
            "must be a share above 0 and at most 1",
        );
    }
    let limits = Limits {
        max_inflight_jobs: l.max_inflight_jobs,
        max_running_jobs: l.max_running_jobs,
        resume_at: ((l.max_inflight_jobs as f64 * l.resume_below) as usize).max(1),
        max_job_bytes: l.max_job_bytes,
        max_response_bytes: l.max_response_bytes,
        drain_timeout: Duration::from_millis(l.drain_timeout_ms),
    };

    if raw.providers.is_empty() {
        p.add(
            "providers",
            "no provider is defined; add one (e.g. `local: {kind: mock}`)",
        );
    }
    let providers: BTreeMap<String, ProviderPlan> = raw
        .providers
        .into_iter()
        .map(|(name, provider)| {
            let field = format!("providers.{name}");
            let plan = provider_plan(&mut p, &field, provider);
            (name, plan)
        })
        .collect();

    let models = models_plan(&mut p, raw.models, &providers);
    let prompts = prompts_plan(&mut p, raw.prompts);

    if raw.pipelines.is_empty() {
        p.add("pipelines", "no pipeline is defined");
    }
    let pipelines: BTreeMap<String, Arc<PipelinePlan>> = raw
        .pipelines
        .into_iter()
        .map(|(name, pipeline)| {
            let mut plan = pipeline_plan(&mut p, &name, pipeline.steps, &models, &prompts);
            if let Some(alias) = &pipeline.budget_fallback {
                if !models.contains_key(alias) {
                    p.add(
                        format!("pipelines.{name}.budget_fallback"),
                        format!(
                            "model `{alias}` is not defined under `models` (defined: {})",
                            keys(&models)
                        ),
                    );
                }
            }
            plan.budget_fallback = pipeline.budget_fallback;
            (name, Arc::new(plan))
        })
        .collect();

    let default_pipeline = match raw.default_pipeline {
        Some(name) if !pipelines.contains_key(&name) => {
            p.add(
                "default_pipeline",
                format!(
                    "pipeline `{name}` is not defined (defined: {})",
                    keys(&pipelines)
                ),
            );
            None
        }
        Some(name) => Some(name),
        None if pipelines.len() == 1 => pipelines.keys().next().cloned(),
        None => None,
    };

    let pools = PoolSizes {
        classify: raw.pools.classify,
        route: raw.pools.route,
        generate: raw.pools.generate,
    };
    for (field, size) in [
        ("classify", pools.classify),
        ("route", pools.route),
        ("generate", pools.generate),
    ] {
        positive(&mut p, format!("pools.{field}"), size as u64);
    }

    let http_listen = match raw.http.listen.as_str() {
        "off" => None,
        listen
            if listen.parse::<std::net::SocketAddr>().is_ok()
                || listen
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok()) =>
        {
            Some(listen.to_owned())
        }
        listen => {
            p.add(
                "http.listen",
                format!("`{listen}` is not host:port (or `off`)"),
            );
            None
        }
    };

    let json = match raw.log.format.as_str() {
        "json" => true,
        "pretty" => false,
        other => {
            p.add("log.format", format!("`{other}` is not `pretty` or `json`"));
            false
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.filter) {
        p.add(
            "log.filter",
            format!("`{}` is not a tracing filter: {e}", raw.log.filter),
        );
    }
    let log = LogPlan {
        json,
        filter: raw.log.filter,
        payloads: raw.log.payloads,
    };

    let tenants = tenants_plan(&mut p, raw.tenants, limits.max_inflight_jobs);
    let cache = raw.cache.enabled.then(|| {
        positive(&mut p, "cache.ttl_s", raw.cache.ttl_s);
        if !(0.0..=2.0).contains(&raw.cache.max_temperature) {
            p.add("cache.max_temperature", "must be between 0 and 2");
        }
        CachePlan {
            ttl: Duration::from_secs(raw.cache.ttl_s),
            max_temperature: raw.cache.max_temperature,
        }
    });

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Plan {
        tenants,
        cache,
        source,
        sink,
        state,
        limits,
        providers,
        models,
        pipelines,
        default_pipeline,
        pools,
        http_listen,
        log,
        warnings: p.1,
    })
}

fn topics_plan(p: &mut Problems, topics: raw::RawTopics) -> Topics {
    for (field, topic) in [
        ("results", &topics.results),
        ("review", &topics.review),
        ("dlq", &topics.dlq),
    ] {
        non_empty(p, format!("sink.topics.{field}"), topic);
    }
    Topics {
        results: topics.results,
        review: topics.review,
        dlq: topics.dlq,
    }
}

fn state_plan(
    p: &mut Problems,
    kind: StateKind,
    result_ttl_s: u64,
    claim_lease_ms: u64,
) -> StatePlan {
    positive(p, "state.result_ttl_s", result_ttl_s);
    if result_ttl_s > 366 * 86_400 {
        p.add("state.result_ttl_s", "must be at most a year (31622400)");
    }
    if !(1000..=86_400_000).contains(&claim_lease_ms) {
        p.add(
            "state.claim_lease_ms",
            "must be between 1000 (it is renewed every third of it) and 86400000 (a day)",
        );
    }
    StatePlan {
        kind,
        result_ttl: Duration::from_secs(result_ttl_s),
        claim_lease: Duration::from_millis(claim_lease_ms),
    }
}

/// Checks an HTTP provider's `base_url` and `api_key_env`; the URL without a trailing `/`.
fn http_endpoint(
    p: &mut Problems,
    field: &str,
    base_url: &str,
    api_key_env: Option<&str>,
) -> String {
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        p.add(
            format!("{field}.base_url"),
            format!("`{base_url}` is not an http(s) URL"),
        );
    }
    if let Some(var) = api_key_env {
        non_empty(p, format!("{field}.api_key_env"), var);
    }
    base_url.trim_end_matches('/').to_owned()
}

fn provider_plan(p: &mut Problems, field: &str, provider: RawProvider) -> ProviderPlan {
    let (kind, retry, circuit, limits) = match provider {
        RawProvider::Openai {
            base_url,
            api_key_env,
            retry,
            circuit,
            limits,
        } => {
            let base_url = http_endpoint(p, field, &base_url, api_key_env.as_deref());
            (
                ProviderKind::OpenAi {
                    base_url,
                    api_key_env,
                },
                retry,
                circuit,
                limits,
            )
        }
        RawProvider::Anthropic {
            base_url,
            api_key_env,
            cache_system_min_chars,
            retry,
            circuit,
            limits,
        } => {
            let base_url = http_endpoint(p, field, &base_url, api_key_env.as_deref());
            (
                ProviderKind::Anthropic {
                    base_url,
                    api_key_env,
                    cache_system_min_chars,
                },
                retry,
                circuit,
                limits,
            )
        }
        RawProvider::Mock {
            api,
            latency,
            faults,
            seed,
            retry,
            circuit,
            limits,
        } => {
            for (name, rate) in [
                ("rate_429", faults.rate_429),
                ("rate_500", faults.rate_500),
                ("rate_hang", faults.rate_hang),
            ] {
                if !(0.0..=1.0).contains(&rate) {
                    p.add(
                        format!("{field}.faults.{name}"),
                        format!("{rate} is not a probability between 0 and 1"),
                    );
                }
            }
            if faults.rate_429 + faults.rate_500 + faults.rate_hang > 1.0 {
                p.add(
                    format!("{field}.faults"),
                    "the fault rates add up to more than 1",
                );
            }
            match latency {
                Latency::Uniform { min_ms, max_ms } if min_ms > max_ms => {
                    p.add(format!("{field}.latency"), "min_ms is larger than max_ms")
                }
                Latency::Lognormal { p50_ms, p99_ms } if p50_ms == 0 || p99_ms < p50_ms => p.add(
                    format!("{field}.latency"),
                    "lognormal needs 0 < p50_ms <= p99_ms",
                ),
                _ => {}
            }
            (
                ProviderKind::Mock(
                    MockSettings {
                        latency,
                        faults,
                        seed,
                    },
                    match api {
                        raw::RawApi::Openai => WireApi::OpenAi,
                        raw::RawApi::Anthropic => WireApi::Anthropic,
                    },
                ),
                retry,
                circuit,
                limits,
            )
        }
    };
    positive(
        p,
        format!("{field}.retry.max_attempts"),
        u64::from(retry.max_attempts),
    );
    if !(retry.budget_ratio.is_finite() && retry.budget_ratio >= 0.0) {
        p.add(
            format!("{field}.retry.budget_ratio"),
            "must be 0 or more (retries per first attempt)",
        );
    }
    if !(retry.budget_min_per_s.is_finite() && retry.budget_min_per_s >= 0.0) {
        p.add(
            format!("{field}.retry.budget_min_per_s"),
            "must be 0 or more",
        );
    }
    if retry.base_delay_ms > retry.max_delay_ms {
        p.add(
            format!("{field}.retry"),
            "base_delay_ms is larger than max_delay_ms",
        );
    }
    positive(
        p,
        format!("{field}.circuit.consecutive_failures"),
        u64::from(circuit.consecutive_failures),
    );
    positive(p, format!("{field}.circuit.window"), circuit.window as u64);
    positive(
        p,
        format!("{field}.circuit.half_open_probes"),
        u64::from(circuit.half_open_probes),
    );
    if !(circuit.failure_rate > 0.0 && circuit.failure_rate <= 1.0) {
        p.add(
            format!("{field}.circuit.failure_rate"),
            "must be a share above 0 and at most 1",
        );
    }
    if circuit.min_calls > circuit.window {
        p.add(
            format!("{field}.circuit.min_calls"),
            "cannot exceed circuit.window",
        );
    }
    ProviderPlan {
        kind,
        limits: rate_limits(p, &format!("{field}.limits"), &limits),
        retry: RetryPolicy {
            max_attempts: retry.max_attempts,
            base_delay: Duration::from_millis(retry.base_delay_ms),
            max_delay: Duration::from_millis(retry.max_delay_ms),
            budget_ratio: retry.budget_ratio,
            budget_min_per_s: retry.budget_min_per_s,
        },
        circuit: CircuitPolicy {
            consecutive_failures: circuit.consecutive_failures,
            failure_rate: circuit.failure_rate,
            window: circuit.window,
            min_calls: circuit.min_calls,
            open_for: Duration::from_millis(circuit.open_ms),
            half_open_probes: circuit.half_open_probes,
        },
    }
}

fn models_plan(
    p: &mut Problems,
    raw: BTreeMap<String, raw::RawModel>,
    providers: &BTreeMap<String, ProviderPlan>,
) -> BTreeMap<String, Arc<ModelPlan>> {
    let aliases: BTreeSet<String> = raw.keys().cloned().collect();
    let mut models = BTreeMap::new();
    for (alias, m) in raw {
        let field = format!("models.{alias}");
        if !providers.contains_key(&m.provider) {
            p.add(
                format!("{field}.provider"),
                format!(
                    "provider `{}` is not defined under `providers` (defined: {})",
                    m.provider,
                    keys(providers)
                ),
            );
        }
        non_empty(p, format!("{field}.model"), &m.model);
        positive(p, format!("{field}.timeout_ms"), m.timeout_ms);
        positive(p, format!("{field}.max_tokens"), u64::from(m.max_tokens));
        let price = match &m.price {
            Some(price) => Price {
                input: price.input,
                output: price.output,
            },
            None => {
                p.warn(
                    format!("{field}.price"),
                    "no price set: calls to this model count as $0 in results and metrics",
                );
                Price {
                    input: 0.0,
                    output: 0.0,
                }
            }
        };
        if !(price.input.is_finite()
            && price.output.is_finite()
            && price.input >= 0.0
            && price.output >= 0.0)
        {
            p.add(
                format!("{field}.price"),
                "prices must be finite and not negative (USD per million tokens)",
            );
        }
        if !(0.0..=2.0).contains(&m.temperature) {
            p.add(format!("{field}.temperature"), "must be between 0 and 2");
        }
        for (i, fallback) in m.fallbacks.iter().enumerate() {
            if fallback == &alias {
                p.add(
                    format!("{field}.fallbacks[{i}]"),
                    "a model cannot fall back to itself",
                );
            } else if !aliases.contains(fallback) {
                p.add(
                    format!("{field}.fallbacks[{i}]"),
                    format!("model `{fallback}` is not defined under `models`"),
                );
            }
        }
        models.insert(
            alias.clone(),
            Arc::new(ModelPlan {
                alias,
                provider: m.provider,
                model: m.model,
                price,
                timeout: Duration::from_millis(m.timeout_ms),
                max_tokens: m.max_tokens,
                temperature: m.temperature,
                fallbacks: m.fallbacks,
                limits: rate_limits(p, &format!("{field}.limits"), &m.limits),
            }),
        );
    }
    models
}

fn prompts_plan(
    p: &mut Problems,
    raw: BTreeMap<String, raw::RawPrompt>,
) -> BTreeMap<String, Arc<PromptPlan>> {
    let mut prompts = BTreeMap::new();
    for (name, prompt) in raw {
        let field = format!("prompts.{name}");
        let system = match prompt.system.as_deref().map(Template::compile).transpose() {
            Ok(t) => t,
            Err(e) => {
                p.add(format!("{field}.system"), e);
                None
            }
        };
        let user = match Template::compile(&prompt.user) {
            Ok(t) => t,
            Err(e) => {
                p.add(format!("{field}.user"), e);
                continue;
            }
        };
        prompts.insert(name.clone(), Arc::new(PromptPlan { name, system, user }));
    }
    prompts
}

const ROUTE_MODEL: &str = "{{route.model}}";

fn pipeline_plan(
    p: &mut Problems,
    pipeline: &str,
    raw_steps: Vec<RawStep>,
    models: &BTreeMap<String, Arc<ModelPlan>>,
    prompts: &BTreeMap<String, Arc<PromptPlan>>,
) -> PipelinePlan {
    let mut steps: Vec<StepPlan> = Vec::with_capacity(raw_steps.len());
    if raw_steps.is_empty() {
        p.add(
            format!("pipelines.{pipeline}.steps"),
            "a pipeline needs at least one step",
        );
    }
    // ancestors[i]: every step index step i transitively depends on.
    let mut ancestors: Vec<BTreeSet<usize>> = Vec::new();
    for (i, step) in raw_steps.into_iter().enumerate() {
        let field = format!("pipelines.{pipeline}.steps[{i}]");
        let (name, needs_raw) = match &step {
            RawStep::Classify { name, needs, .. }
            | RawStep::Route { name, needs, .. }
            | RawStep::Generate { name, needs, .. } => (name.clone(), needs.clone()),
        };
        non_empty(p, format!("{field}.name"), &name);
        if steps.iter().any(|s| s.name == name) {
            p.add(
                format!("{field}.name"),
                format!("step name `{name}` is used twice"),
            );
        }
        let index_of = |n: &str| steps.iter().position(|s| s.name == n);
        let needs: Vec<usize> = match needs_raw {
            None => i.checked_sub(1).into_iter().collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| {
                    let found = index_of(n);
                    if found.is_none() {
                        p.add(
                            format!("{field}.needs"),
                            format!("`{n}` is not an earlier step of pipeline `{pipeline}`"),
                        );
                    }
                    found
                })
                .collect(),
        };
        let mut mine: BTreeSet<usize> = BTreeSet::new();
        for &n in &needs {
            mine.insert(n);
            mine.extend(ancestors[n].iter().copied());
        }
        let depends_on = |target: usize| mine.contains(&target);
        let kind = match step {
            RawStep::Classify {
                categories,
                method,
                model,
                prompt,
                rules,
                ..
            } => {
                if categories.is_empty() {
                    p.add(format!("{field}.categories"), "list at least one category");
                }
                let method = match method {
                    RawClassifyMethod::Llm => {
                        let model = model_ref(p, &field, model.as_deref(), models);
                        let prompt = prompt_ref(p, &field, prompt.as_deref(), prompts);
                        if !rules.is_empty() {
                            p.add(
                                format!("{field}.rules"),
                                "rules only apply with `method: rules`",
                            );
                        }
                        ClassifyMethod::Llm { model, prompt }
                    }
                    RawClassifyMethod::Rules => {
                        for category in rules.keys() {
                            if !categories.contains(category) {
                                p.add(
                                    format!("{field}.rules.{category}"),
                                    "not one of `categories`",
                                );
                            }
                        }
                        let ordered = categories
                            .iter()
                            .filter_map(|c| {
                                rules.get(c).map(|kw| {
                                    (c.clone(), kw.iter().map(|k| k.to_lowercase()).collect())
                                })
                            })
                            .collect();
                        ClassifyMethod::Rules(ordered)
                    }
                };
                StepKindPlan::Classify(ClassifyPlan { categories, method })
            }
            RawStep::Route {
                on,
                routes,
                review_below_confidence,
                ..
            } => {
                let on_index = match index_of(&on) {
                    Some(j) if matches!(steps[j].kind, StepKindPlan::Classify(_)) => {
                        if !depends_on(j) {
                            p.add(
                                format!("{field}.on"),
                                format!("step `{name}` must depend on `{on}`; add it to `needs`"),
                            );
                        }
                        j
                    }
                    Some(_) => {
                        p.add(
                            format!("{field}.on"),
                            format!("`{on}` is not a classify step"),
                        );
                        0
                    }
                    None => {
                        p.add(
                            format!("{field}.on"),
                            format!("`{on}` is not an earlier step of pipeline `{pipeline}`"),
                        );
                        0
                    }
                };
                let mut routes = routes;
                let default = routes.remove("default");
                if default.is_none() {
                    p.add(
                        format!("{field}.routes"),
                        "add a `default` route for categories without their own",
                    );
                }
                if let Some(StepKindPlan::Classify(c)) = index_of(&on).map(|j| &steps[j].kind) {
                    for category in routes.keys() {
                        if !c.categories.contains(category) {
                            p.add(
                                format!("{field}.routes.{category}"),
                                format!("`{category}` is not a category of step `{on}`"),
                            );
                        }
                    }
                }
                let named = routes.iter().map(|(c, a)| (c.as_str(), a));
                for (key, alias) in named.chain(default.iter().map(|d| ("default", d))) {
                    if !models.contains_key(alias) {
                        p.add(
                            format!("{field}.routes.{key}"),
                            format!("model `{alias}` is not defined under `models`"),
                        );
                    }
                }
                if let Some(t) = review_below_confidence {
                    if !(0.0..=1.0).contains(&t) {
                        p.add(
                            format!("{field}.review_below_confidence"),
                            "must be between 0 and 1",
                        );
                    }
                }
                StepKindPlan::Route(RoutePlan {
                    on: on_index,
                    routes,
                    default: default.unwrap_or_default(),
                    review_below_confidence,
                })
            }
            RawStep::Generate {
                model,
                prompt,
                output_schema: schema_path,
                max_repairs,
                ..
            } => {
                let model = if model.replace(' ', "") == ROUTE_MODEL {
                    let routes: Vec<usize> = mine
                        .iter()
                        .copied()
                        .filter(|&j| matches!(steps[j].kind, StepKindPlan::Route(_)))
                        .collect();
                    match routes.as_slice() {
                        [j] => ModelChoice::FromRoute(*j),
                        [] => {
                            p.add(
                                format!("{field}.model"),
                                "`{{route.model}}` needs a route step in this step's `needs`",
                            );
                            ModelChoice::Fixed(String::new())
                        }
                        _ => {
                            p.add(format!("{field}.model"), "`{{route.model}}` is ambiguous: this step depends on several route steps");
                            ModelChoice::Fixed(String::new())
                        }
                    }
                } else {
                    ModelChoice::Fixed(model_ref(p, &field, Some(&model), models))
                };
                let prompt = prompt_ref(p, &field, Some(&prompt), prompts);
                let output = schema_path.and_then(|path| {
                    output_schema(p, &format!("{field}.output_schema"), &path, max_repairs)
                });
                StepKindPlan::Generate(GeneratePlan {
                    model,
                    prompt,
                    output,
                })
            }
        };
        // Every step a prompt reads must be one this step waits for.
        let prompt = match &kind {
            StepKindPlan::Classify(ClassifyPlan {
                method: ClassifyMethod::Llm { prompt, .. },
                ..
            })
            | StepKindPlan::Generate(GeneratePlan { prompt, .. }) => Some(prompt.clone()),
            _ => None,
        };
        if let Some(prompt) = prompt {
            let vars = prompt
                .system
                .iter()
                .flat_map(|t| t.vars())
                .chain(prompt.user.vars());
            for var in vars {
                if let Var::StepOutput(other) = var {
                    match index_of(other) {
                        Some(j) if depends_on(j) => {}
                        Some(_) => p.add(
                            format!("{field}.prompt"),
                            format!("prompt `{}` reads step `{other}`, which step `{name}` does not depend on; add it to `needs`", prompt.name),
                        ),
                        None => p.add(
                            format!("{field}.prompt"),
                            format!("prompt `{}` reads step `{other}`, which is not an earlier step", prompt.name),
                        ),
                    }
                }
            }
        }
        ancestors.push(mine);
        steps.push(StepPlan { name, needs, kind });
    }
    PipelinePlan {
        name: pipeline.to_owned(),
        budget_fallback: None,
        steps,
    }
}

fn model_ref(
    p: &mut Problems,
    field: &str,
    alias: Option<&str>,
    models: &BTreeMap<String, Arc<ModelPlan>>,
) -> String {
    match alias {
        None => {
            p.add(
                format!("{field}.model"),
                "an LLM step needs a `model` (an alias under `models`)",
            );
            String::new()
        }
        Some(a) if !models.contains_key(a) => {
            p.add(
                format!("{field}.model"),
                format!(
                    "model `{a}` is not defined under `models` (defined: {})",
                    keys(models)
                ),
            );
            a.to_owned()
        }
        Some(a) => a.to_owned(),
    }
}

fn prompt_ref(
    p: &mut Problems,
    field: &str,
    name: Option<&str>,
    prompts: &BTreeMap<String, Arc<PromptPlan>>,
) -> Arc<PromptPlan> {
    let found = name.and_then(|n| prompts.get(n));
    match (name, found) {
        (_, Some(prompt)) => prompt.clone(),
        (None, None) => {
            p.add(
                format!("{field}.prompt"),
                "an LLM step needs a `prompt` (a name under `prompts`)",
            );
            empty_prompt()
        }
        (Some(n), None) => {
            p.add(
                format!("{field}.prompt"),
                format!(
                    "prompt `{n}` is not defined under `prompts` (defined: {})",
                    keys(prompts)
                ),
            );
            empty_prompt()
        }
    }
}

fn empty_prompt() -> Arc<PromptPlan> {
    Arc::new(PromptPlan {
        name: String::new(),
        system: None,
        user: Template::empty(),
    })
}

fn properties(
    p: &mut Problems,
    field: &str,
    raw: BTreeMap<String, serde_norway::Value>,
) -> Vec<(String, String)> {
    raw.into_iter()
        .filter_map(|(key, value)| {
            let text = match value {
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                _ => {
                    p.add(
                        format!("{field}.{key}"),
                        "librdkafka properties must be strings, numbers or booleans",
                    );
                    return None;
                }
            };
            Some((key, text))
        })
        .collect()
}

fn rate_limits(p: &mut Problems, field: &str, raw: &raw::RawRateLimits) -> RateLimits {
    for (name, value) in [("rpm", raw.rpm), ("tpm", raw.tpm)] {
        rate(p, &format!("{field}.{name}"), value);
    }
    RateLimits {
        rpm: raw.rpm,
        tpm: raw.tpm,
    }
}

/// A rate or budget must be a positive, finite number when set.
fn rate(p: &mut Problems, field: &str, value: Option<f64>) {
    if let Some(v) = value {
        if !(v.is_finite() && v > 0.0) {
            p.add(field, format!("{v} must be a positive number"));
        }
    }
}

fn tenants_plan(
    p: &mut Problems,
    mut raw: BTreeMap<String, raw::RawTenant>,
    max_inflight: usize,
) -> TenantsPlan {
    let base = raw.remove("default").unwrap_or_default();
    let mut plan_of = |name: &str, t: &raw::RawTenant| {
        let field = format!("tenants.{name}");
        let merged = TenantPlan {
            rps: t.rps.or(base.rps),
            tokens_per_min: t.tokens_per_min.or(base.tokens_per_min),
            budget_usd_per_day: t.budget_usd_per_day.or(base.budget_usd_per_day),
            budget_usd_per_month: t.budget_usd_per_month.or(base.budget_usd_per_month),
            weight: t.weight.or(base.weight).unwrap_or(1),
            max_queued: t.max_queued.or(base.max_queued).unwrap_or(max_inflight),
        };
        for (key, value) in [
            ("rps", t.rps),
            ("tokens_per_min", t.tokens_per_min),
            ("budget_usd_per_day", t.budget_usd_per_day),
            ("budget_usd_per_month", t.budget_usd_per_month),
        ] {
            rate(p, &format!("{field}.{key}"), value);
        }
        if t.weight == Some(0) {
            p.add(format!("{field}.weight"), "must be at least 1");
        }
        if t.max_queued == Some(0) {
            p.add(format!("{field}.max_queued"), "must be at least 1");
        }
        merged
    };
    let default = plan_of("default", &base.clone());
    let mut named = BTreeMap::new();
    let mut bad_names = Vec::new();
    for (name, t) in &raw {
        if crate::wire::TenantId::parse(name).is_err() {
            bad_names.push(name.clone());
        }
        named.insert(name.clone(), plan_of(name, t));
    }
    for name in bad_names {
        p.add(
            format!("tenants.{name}"),
            "not a valid tenant name (letters, digits, `_` and `-`, starting with a letter or digit)",
        );
    }
    TenantsPlan { default, named }
}

fn non_empty(p: &mut Problems, field: impl AsRef<str>, value: &str) {
    if value.trim().is_empty() {
        p.add(field, "must not be empty");
    }
}

fn positive(p: &mut Problems, field: impl AsRef<str>, value: u64) {
    if value == 0 {
        p.add(field, "must be greater than 0");
    }
}

fn keys<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
