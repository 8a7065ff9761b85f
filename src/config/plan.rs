//! The validated plan: what every component is built from. Nothing here is optional for "not
//! yet loaded"; references between sections are resolved (see [`super::validate`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::template::Template;

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
    /// The review round trip.
    pub reviews: ReviewsPlan,
    /// Things that work but deserve a look (e.g. a model without a price).
    pub warnings: Vec<String>,
}

/// Where review decisions come back (`reviews:`).
#[derive(Debug, Clone)]
pub struct ReviewsPlan {
    /// The decisions topic (Kafka) or subject (NATS).
    pub decisions: String,
    /// Whether this service consumes decisions and expires reviews.
    pub consume: bool,
    pub expire_every: Duration,
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
    pub access: NatsAccess,
    pub stream: String,
    pub subjects: Vec<String>,
    pub create_stream: bool,
    pub consumer: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    pub batch: usize,
}

/// How to reach a NATS server beyond its URL: credentials and TLS.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsAccess {
    pub auth: NatsAuth,
    pub tls: Option<TlsFiles>,
}

/// NATS authentication; every secret is read from the environment or a file at connect time.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum NatsAuth {
    #[default]
    None,
    /// `auth.token_env`.
    Token { env: String },
    /// `auth.user` with `auth.password_env`.
    UserPassword { user: String, password_env: String },
    /// `auth.nkey_seed_env` or `auth.nkey_seed_file`.
    NkeySeed(Secret),
    /// `auth.credentials_file`: a JWT and nkey seed, as NGS issues them.
    CredentialsFile(String),
}

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq)]
pub enum Secret {
    Env(String),
    File(String),
}

/// TLS material as files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsFiles {
    pub ca_file: Option<String>,
    /// Client certificate and key (both or neither).
    pub client: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct NatsSinkPlan {
    pub url: String,
    pub access: NatsAccess,
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
    /// What vouches for a job's tenant (`tenant_from`).
    pub tenant_from: TenantFrom,
    /// Where throttled jobs are parked until their turn (`source.delay_topic`).
    pub delay_topic: Option<String>,
    /// librdkafka properties passed through verbatim (they win over switchyard's defaults,
    /// except the ones at-least-once delivery depends on).
    pub librdkafka: Vec<(String, String)>,
    /// Secret properties and the environment variables that hold them (read when connecting).
    pub librdkafka_env: Vec<(String, String)>,
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
    /// Secret properties and the environment variables that hold them (read when connecting).
    pub librdkafka_env: Vec<(String, String)>,
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
        access: Box<RedisAccess>,
    },
}

/// How to reach Redis beyond its URL: an ACL user, TLS material.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisAccess {
    pub username: Option<String>,
    /// The environment variable holding the password.
    pub password_env: Option<String>,
    /// TLS files (the URL must be `rediss://`).
    pub tls: Option<TlsFiles>,
    /// Skip certificate verification (testing only).
    pub tls_insecure: bool,
    /// Redis Cluster: the URL lists seed nodes, comma-separated.
    pub cluster: bool,
    /// Redis Sentinel: the URL lists the sentinels; this is the master's name.
    pub sentinel_master: Option<String>,
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
    /// Throttled jobs whose turn is further off than this are parked outside the process.
    pub park_after: Duration,
    pub max_job_bytes: usize,
    pub max_response_bytes: usize,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitPolicy {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    /// At most this many recent calls are kept for the failure rate ...
    pub window: usize,
    /// ... those that finished within this span.
    pub window_for: Duration,
    pub min_calls: usize,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts on one target per round of the fallback chain.
    pub max_attempts: u32,
    /// How long a call goes on retrying transient failures, round after round.
    pub max_elapsed: Duration,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MockSettings {
    pub latency: Latency,
    pub faults: Faults,
    pub seed: Option<u64>,
    /// Canned answers, tried in order against the prompt (regexes checked at load).
    pub answers: Vec<MockAnswer>,
    /// Context window per model name.
    pub context_windows: BTreeMap<String, u64>,
    /// How the mock's batch APIs behave.
    pub batch: MockBatch,
}

/// The mock's batch APIs (OpenAI files + batches, Anthropic Message Batches): how long a batch
/// takes, and what share of its requests fail (decided per request id, so the same each time).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MockBatch {
    pub completion_ms: u64,
    pub failure_rate: f64,
}

impl Default for MockBatch {
    fn default() -> Self {
        Self {
            completion_ms: 2_000,
            failure_rate: 0.0,
        }
    }
}

/// A canned answer of the mock: the first rule whose `match` regex finds the prompt (system
/// and user text) answers with `answer` (a string, `$1`-style captures expanded, or JSON).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MockAnswer {
    #[serde(rename = "match")]
    pub pattern: String,
    pub answer: serde_json::Value,
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
    /// Answers are shared across tenants (`cache.scope: global`); by default only within one.
    pub global: bool,
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
    /// Prompt-cache reads and writes (Anthropic).
    pub cache_read: f64,
    pub cache_write: f64,
}

impl Price {
    /// The price of uncached input and output tokens.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input + output_tokens as f64 * self.output) / 1_000_000.0
    }

    /// These prices with input at the dearer of uncached and cache-write input: what a
    /// reservation counts before it knows whether the prompt will be written to the cache.
    pub fn worst_case(&self) -> Price {
        Price {
            input: self.input.max(self.cache_write),
            ..*self
        }
    }

    /// The price of a response's usage: prompt-cache reads and writes at their own prices,
    /// the rest of the prompt at the input price.
    pub fn response_cost(&self, r: &crate::provider::ChatResponse) -> f64 {
        let cached = r.cache_read_tokens + r.cache_write_tokens;
        self.cost(r.input_tokens.saturating_sub(cached), r.output_tokens)
            + (r.cache_read_tokens as f64 * self.cache_read
                + r.cache_write_tokens as f64 * self.cache_write)
                / 1_000_000.0
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
    /// Context window in tokens, when known.
    pub context_window: Option<u64>,
    /// OpenAI's flex tier, which low-priority jobs use.
    pub flex: Option<FlexTier>,
    /// Prices of answers through the provider's batch API.
    pub batch_price: Price,
}

/// A cheaper, slower synchronous tier for work that can wait (OpenAI `service_tier: "flex"`).
#[derive(Debug, Clone, Copy)]
pub struct FlexTier {
    pub price: Price,
    pub timeout: Duration,
}

impl ModelPlan {
    /// What a response cost: at the flex tier's prices when it was served there.
    pub fn response_cost(&self, r: &crate::provider::ChatResponse) -> f64 {
        match (&self.flex, r.flex) {
            _ if r.batch => self.batch_price.response_cost(r),
            (Some(flex), true) => flex.price.response_cost(r),
            _ => self.price.response_cost(r),
        }
    }
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
    /// The bound of the tenant's queue on one replica; `None`: a fair share of
    /// `limits.max_inflight_jobs` among the tenants with jobs queued (see the scheduler).
    pub max_queued: Option<usize>,
    /// Limits on each user of the tenant (jobs with a `user`).
    pub per_user: PerUserLimits,
}

/// What one user of a tenant may use; unset is unlimited. Their limiter state in the store
/// expires once a user is idle, so it stays bounded by the users active in the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerUserLimits {
    pub rps: Option<f64>,
    pub tokens_per_min: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct TenantsPlan {
    pub default: TenantPlan,
    /// Tenants named in config: they get their own metric labels.
    pub named: BTreeMap<String, TenantPlan>,
    /// What happens to jobs of tenants not named (`tenants.unknown`).
    pub unknown: UnknownTenants,
}

/// `source.tenant_from` (Kafka): what must name the same tenant as the job's `tenant` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantFrom {
    /// Nothing but the payload itself.
    Payload,
    /// The message key.
    Key,
    /// The named message header.
    Header(String),
}

/// `tenants.unknown`: whether a tenant the config does not name may run at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownTenants {
    /// It runs under the `default` plan (limits and budgets per tenant name).
    Default,
    /// Its jobs are dead-lettered as `unknown_tenant`: inventing a name buys nothing.
    Reject,
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
    pub output: OutputPlan,
    /// The static answer when a step fails and has none of its own.
    pub on_failure: Option<serde_json::Value>,
    pub guardrails: Option<Arc<GuardrailsPlan>>,
    /// Characters of each step's output kept in its record (0: none).
    pub record_output_chars: usize,
    pub review: ReviewPlan,
    /// Jobs that can wait go through the providers' batch APIs.
    pub batch: Option<BatchPlan>,
}

/// Which of a pipeline's jobs wait for a provider batch, and how batches are made.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    pub low_priority: bool,
    pub min_deadline: Option<Duration>,
    pub collect: Duration,
    pub max_requests: usize,
    pub poll: Duration,
    pub max_queued: u64,
}

impl BatchPlan {
    /// Whether `job` can wait for a batch.
    pub fn applies(&self, job: &crate::wire::Job) -> bool {
        (self.low_priority && job.priority == crate::wire::Priority::Low)
            || self.min_deadline.is_some_and(|min| {
                job.deadline.is_some_and(|deadline| {
                    (deadline - chrono::Utc::now())
                        .to_std()
                        .is_ok_and(|left| left >= min)
                })
            })
    }
}

impl PipelinePlan {
    /// Whether any result of this pipeline can go to review.
    pub fn can_review(&self) -> bool {
        let review = &self.review;
        review.when.is_some()
            || review.cost_above_usd.is_some()
            || review.before_generate
            || self.guardrails.as_ref().is_some_and(|g| {
                g.on_block == GuardAction::Review || g.on_error == GuardAction::Review
            })
            || self.steps.iter().any(|s| {
                matches!(&s.kind, StepKindPlan::Route(r) if r.review_below_confidence.is_some())
            })
    }
}

/// What sends a pipeline's result to review besides a route's low confidence, and how long a
/// review request is given.
#[derive(Debug, Clone)]
pub struct ReviewPlan {
    /// The expression and its source text (quoted in the review reason).
    pub when: Option<(crate::expr::Expr, String)>,
    pub cost_above_usd: Option<f64>,
    /// A review request is due this long after the job was received.
    pub timeout: Duration,
    /// What a review that times out becomes.
    pub on_timeout: crate::review::OnTimeout,
    /// Review is asked before the first model-calling generation step (generate, map, reduce,
    /// refine) instead of after the pipeline: nothing is spent on generation until approved.
    pub before_generate: bool,
}

impl Default for ReviewPlan {
    fn default() -> Self {
        Self {
            when: None,
            cost_above_usd: None,
            timeout: Duration::from_secs(24 * 3600),
            on_timeout: crate::review::OnTimeout::Reject,
            before_generate: false,
        }
    }
}

/// What becomes the job's output.
#[derive(Debug, Clone)]
pub enum OutputPlan {
    /// The output of the last step that ran (not skipped).
    LastRun,
    Step(usize),
    /// A `template` step over every step, run after them.
    Assembled(Box<StepPlan>),
}

/// Text or JSON assembled from earlier outputs.
#[derive(Debug, Clone)]
pub enum Assemble {
    Text(Template),
    /// A JSON value whose strings are templates; a string that is a single `{{..}}` becomes
    /// the value it names, with its JSON type.
    Json(JsonTemplate),
}

impl Assemble {
    /// Bytes of text the template writes besides its variables.
    pub fn literal_bytes(&self) -> u64 {
        match self {
            Assemble::Text(t) => t.literal_bytes(),
            Assemble::Json(j) => j.literal_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum JsonTemplate {
    Literal(serde_json::Value),
    Var(crate::template::Var),
    Text(Template),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    /// Every variable the template reads.
    pub fn vars(&self) -> Vec<&crate::template::Var> {
        match self {
            JsonTemplate::Literal(_) => Vec::new(),
            JsonTemplate::Var(v) => vec![v],
            JsonTemplate::Text(t) => t.vars().collect(),
            JsonTemplate::Array(items) => items.iter().flat_map(JsonTemplate::vars).collect(),
            JsonTemplate::Object(fields) => fields.iter().flat_map(|(_, j)| j.vars()).collect(),
        }
    }

    /// Bytes of JSON the template writes besides its variables (quotes, keys, literals).
    pub fn literal_bytes(&self) -> u64 {
        match self {
            JsonTemplate::Literal(v) => v.to_string().len() as u64,
            JsonTemplate::Var(_) => 2,
            JsonTemplate::Text(t) => t.literal_bytes() + 2,
            JsonTemplate::Array(items) => {
                2 + items.iter().map(|j| j.literal_bytes() + 1).sum::<u64>()
            }
            JsonTemplate::Object(fields) => {
                2 + fields
                    .iter()
                    .map(|(k, j)| k.len() as u64 + 4 + j.literal_bytes())
                    .sum::<u64>()
            }
        }
    }
}

pub struct GuardrailsPlan {
    pub set: crate::guardrails::GuardrailSet,
    pub on_block: GuardAction,
    pub on_error: GuardAction,
}

impl std::fmt::Debug for GuardrailsPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardrailsPlan")
            .field("on_block", &self.on_block)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardAction {
    DeadLetter,
    Review,
}

#[derive(Debug, Clone)]
pub struct StepPlan {
    pub name: String,
    pub needs: Vec<usize>,
    pub kind: StepKindPlan,
    /// Run only when this holds; otherwise the step is recorded as skipped.
    pub when: Option<crate::expr::Expr>,
    /// The static output when the step fails.
    pub on_failure: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub enum StepKindPlan {
    Classify(ClassifyPlan),
    Route(RoutePlan),
    Generate(GeneratePlan),
    Template(Assemble),
    Split(SplitPlan),
    Map(MapPlan),
    Reduce(ReducePlan),
    Refine(RefinePlan),
}

impl StepKindPlan {
    /// Kinds that spend on generation: what `review.before_generate` holds back.
    pub fn generates(&self) -> bool {
        matches!(
            self,
            StepKindPlan::Generate(_)
                | StepKindPlan::Map(_)
                | StepKindPlan::Reduce(_)
                | StepKindPlan::Refine(_)
        )
    }

    /// The earlier step whose typed output this kind works on: a route's classify step, a
    /// generate's route (for `{{route.model}}` / `{{route.prompt}}`), a map's split, a
    /// reduce's map.
    pub fn works_on(&self) -> Option<usize> {
        match self {
            StepKindPlan::Route(r) => Some(r.on),
            StepKindPlan::Generate(g) => match (&g.model, &g.prompt) {
                (ModelChoice::FromRoute(j), _) | (_, PromptChoice::FromRoute { route: j, .. }) => {
                    Some(*j)
                }
                _ => None,
            },
            StepKindPlan::Map(m) => Some(m.over),
            StepKindPlan::Reduce(r) => Some(r.over),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            StepKindPlan::Classify(_) => "classify",
            StepKindPlan::Route(_) => "route",
            StepKindPlan::Generate(_) => "generate",
            StepKindPlan::Template(_) => "template",
            StepKindPlan::Split(_) => "split",
            StepKindPlan::Map(_) => "map",
            StepKindPlan::Reduce(_) => "reduce",
            StepKindPlan::Refine(_) => "refine",
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
    /// Tried in order: the first rule whose tests all pass gives the category and confidence;
    /// when none does, `otherwise`.
    Rules {
        rules: Vec<RulePlan>,
        otherwise: (String, f64),
    },
}

#[derive(Debug, Clone)]
pub struct RulePlan {
    pub category: String,
    /// Lower-cased; any one found passes.
    pub keywords: Vec<String>,
    pub regex: Option<regex::Regex>,
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    pub looks_like_code: Option<bool>,
    pub confidence: f64,
}

#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Index of the classify step whose category is routed on.
    pub on: usize,
    pub routes: BTreeMap<String, RouteTarget>,
    pub default: RouteTarget,
    pub review_below_confidence: Option<f64>,
}

/// Where a category goes: a model alias, a prompt, a branch name (for `when:`).
#[derive(Debug, Clone, Default)]
pub struct RouteTarget {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub branch: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SplitPlan {
    pub from: SplitSource,
    pub by: SplitBy,
    pub max_chunks: usize,
}

#[derive(Debug, Clone)]
pub enum SplitSource {
    Input(String),
    Step(usize),
}

#[derive(Debug, Clone)]
pub enum SplitBy {
    Chars {
        size: usize,
        overlap: usize,
    },
    Tokens {
        size: usize,
        overlap: usize,
        model: String,
    },
    JsonArray,
}

#[derive(Debug, Clone)]
pub struct MapPlan {
    /// The split step whose chunks are mapped.
    pub over: usize,
    pub model: String,
    pub prompt: Arc<PromptPlan>,
}

#[derive(Debug, Clone)]
pub struct ReducePlan {
    /// The map step whose outputs are reduced.
    pub over: usize,
    pub model: String,
    pub prompt: Arc<PromptPlan>,
    pub max_input_chars: usize,
}

#[derive(Debug, Clone)]
pub struct RefinePlan {
    pub model: String,
    pub prompt: Arc<PromptPlan>,
    pub evaluator_model: String,
    pub evaluator_prompt: Arc<PromptPlan>,
    pub max_rounds: u32,
    pub stop_at: f64,
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
    pub prompt: PromptChoice,
    /// When set, the answer must be JSON satisfying this schema.
    pub output: Option<OutputSchema>,
    /// When no model's window fits the prompt, cut the prompt to fit instead of failing.
    pub truncate_to_fit: bool,
    pub experiment: Option<Arc<ExperimentPlan>>,
    pub semantic_cache: Option<Arc<SemanticCachePlan>>,
}

/// A generate step's semantic cache: paraphrases of a question answered from its answer.
#[derive(Debug, Clone)]
pub struct SemanticCachePlan {
    pub embedding_model: String,
    /// The input field holding the question.
    pub on: String,
    pub threshold: f64,
    pub max_entries: usize,
    pub ttl: Duration,
    pub max_temperature: f64,
}

/// Weighted variants of a generate step, assigned by a stable hash of the experiment and the
/// sticky unit, so a user keeps its variant across restarts and replicas.
#[derive(Debug)]
pub struct ExperimentPlan {
    pub name: String,
    pub sticky_by: StickyBy,
    /// Percent of units in the experiment.
    pub rollout: f64,
    pub variants: Vec<VariantPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyBy {
    User,
    Tenant,
    Job,
}

#[derive(Debug)]
pub struct VariantPlan {
    pub name: String,
    pub weight: u32,
    pub model: Option<String>,
    pub prompt: Option<Arc<PromptPlan>>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
}

impl ExperimentPlan {
    /// The variant of `unit`, or `None` when the unit is outside the rollout. The same unit
    /// always gets the same answer for the same experiment (name, rollout, variants).
    pub fn assign(&self, unit: &str) -> Option<&VariantPlan> {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(self.name.as_bytes())
            .chain_update([0])
            .chain_update(unit.as_bytes())
            .finalize();
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(digest.get(i..i + 8).unwrap_or(&[0; 8]));
            u64::from_be_bytes(bytes)
        };
        let rollout = (self.rollout * 100.0).round() as u64;
        if word(0) % 10_000 >= rollout {
            return None;
        }
        let total: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
        let mut point = word(8) % total.max(1);
        for variant in &self.variants {
            let weight = u64::from(variant.weight);
            if point < weight {
                return Some(variant);
            }
            point -= weight;
        }
        self.variants.last()
    }
}

#[derive(Debug, Clone)]
pub enum PromptChoice {
    Fixed(Arc<PromptPlan>),
    /// `{{route.prompt}}`: the prompt chosen by the route step at this index (each target's
    /// prompt, resolved; `None` for targets without one, which use `default`).
    FromRoute {
        route: usize,
        prompts: BTreeMap<String, Arc<PromptPlan>>,
    },
}

impl PromptChoice {
    /// Every prompt this step may render.
    pub fn all(&self) -> Vec<&Arc<PromptPlan>> {
        match self {
            PromptChoice::Fixed(p) => vec![p],
            PromptChoice::FromRoute { prompts, .. } => prompts.values().collect(),
        }
    }
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

#[derive(Debug, Clone, Copy)]
pub struct PoolSizes {
    pub classify: usize,
    pub route: usize,
    pub generate: usize,
}

/// Simulated latency of the mock provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum Latency {
    Fixed {
        ms: u64,
    },
    Uniform {
        min_ms: u64,
        max_ms: u64,
    },
    /// Log-normal with the given median and 99th percentile: the long tail real APIs have.
    Lognormal {
        p50_ms: u64,
        p99_ms: u64,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed { ms: 0 }
    }
}

/// Faults the mock provider injects, as probabilities per request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    pub rate_429: f64,
    pub retry_after_s: u64,
    pub rate_500: f64,
    pub rate_hang: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            rate_429: 0.0,
            retry_after_s: 1,
            rate_500: 0.0,
            rate_hang: 0.0,
        }
    }
}
