//! The wire contract (v1): jobs in, results and dead letters out.
//!
//! `schemas/*.v1.json` is the normative description; the types here serialize to exactly those
//! shapes and `decode_job` enforces `job.v1.json` on every incoming payload, turning a bad one into
//! a sentence a person can act on. Nothing else in the crate parses job bytes.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest accepted job id (`job.v1.json`).
pub const MAX_ID_CHARS: usize = 128;
/// Most bytes of the original payload a dead letter carries, so a dead letter always fits the
/// output topic's message size (escaping can grow JSON text up to six times).
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 128 * 1024;
/// Longest error sentence in a dead letter.
pub const MAX_DEAD_LETTER_ERROR: usize = 4 * 1024;
/// Longest accepted idempotency key.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 256;

/// A tenant name: `^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`, so it is always one NATS subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// Checks the tenant pattern; the error says what is wrong with the name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut chars = raw.chars();
        let Some(first) = chars.next() else {
            return Err("field `tenant` is empty".into());
        };
        if raw.len() > 64 {
            return Err(format!(
                "field `tenant` is {} characters long; the limit is 64",
                raw.len()
            ));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(format!(
                "field `tenant` ({raw:?}) must start with a letter or digit"
            ));
        }
        if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
            return Err(format!(
                "field `tenant` ({raw:?}) contains {bad:?}; only letters, digits, `_` and `-` are allowed"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

/// A job exactly as producers send it (`schemas/job.v1.json`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WireJob {
    id: String,
    tenant: String,
    #[serde(default)]
    pipeline: Option<String>,
    input: Map<String, Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    deadline: Option<DateTime<Utc>>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    reply_to: Option<String>,
}

/// A decoded, validated job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub tenant: TenantId,
    pub pipeline: Option<String>,
    pub input: Map<String, Value>,
    /// Defaults to `tenant:id`.
    pub idempotency_key: String,
    pub priority: Priority,
    /// The earlier of `deadline` and `received_at + ttl_ms`.
    pub deadline: Option<DateTime<Utc>>,
    pub user: Option<String>,
    pub metadata: Option<Value>,
    pub reply_to: Option<String>,
}

/// Why a payload is not a job; `Display` is the sentence that goes into the dead letter.
impl Job {
    /// The state store key: idempotency keys are scoped by tenant, so two tenants using the
    /// same key never see each other's results.
    pub fn state_key(&self) -> String {
        format!("{}/{}", self.tenant, self.idempotency_key)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum InvalidJob {
    #[error("payload is {size} bytes; the limit is {limit} bytes (limits.max_job_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "payload is not valid UTF-8 (first bad byte at offset {offset}); jobs must be UTF-8 JSON"
    )]
    NotUtf8 { offset: usize },
    #[error("payload is not a JSON object: {0}")]
    NotJson(String),
    #[error("{0}")]
    Schema(String),
}

/// Decodes and validates one payload against `job.v1.json`.
///
/// `received_at` turns a relative `ttl_ms` into an absolute deadline.
pub fn decode_job(
    payload: &[u8],
    max_bytes: usize,
    received_at: DateTime<Utc>,
) -> Result<Job, InvalidJob> {
    if payload.len() > max_bytes {
        return Err(InvalidJob::TooLarge {
            size: payload.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(payload).map_err(|e| InvalidJob::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    // Most jobs are valid and are read straight from their text. One this refuses is read again
    // through a JSON tree, which names what is wrong (the failing field's path); one only the
    // tree takes (a key given twice: the last one wins) is taken from there.
    let wire = match serde_json::from_str::<WireJob>(text) {
        Ok(wire) => wire,
        Err(_) => decode_tree(text)?,
    };
    validate(wire, received_at)
}

/// [`decode_job`]'s reading through a JSON tree, with the path of a field that does not match.
fn decode_tree(text: &str) -> Result<WireJob, InvalidJob> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| InvalidJob::NotJson(format!("it does not parse as JSON ({e})")))?;
    if !value.is_object() {
        return Err(InvalidJob::NotJson(format!("it is {}", json_kind(&value))));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            InvalidJob::Schema(format!("job does not match job.v1: {inner}"))
        } else {
            InvalidJob::Schema(format!("job field `{path}`: {inner}"))
        }
    })
}

fn validate(wire: WireJob, received_at: DateTime<Utc>) -> Result<Job, InvalidJob> {
    let id_chars = wire.id.chars().count();
    if id_chars == 0 || id_chars > MAX_ID_CHARS {
        return Err(InvalidJob::Schema(format!(
            "field `id` must be 1 to {MAX_ID_CHARS} characters; it has {id_chars}"
        )));
    }
    let tenant = TenantId::parse(&wire.tenant).map_err(InvalidJob::Schema)?;
    let idempotency_key = match wire.idempotency_key {
        Some(key) => {
            let n = key.chars().count();
            if n == 0 || n > MAX_IDEMPOTENCY_KEY_CHARS {
                return Err(InvalidJob::Schema(format!(
                    "field `idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters; it has {n}"
                )));
            }
            key
        }
        None => format!("{}:{}", tenant, wire.id),
    };
    if let Some(pipeline) = &wire.pipeline {
        if pipeline.is_empty() {
            return Err(InvalidJob::Schema("field `pipeline` is empty".into()));
        }
    }
    let ttl_deadline = wire
        .ttl_ms
        .and_then(|ms| i64::try_from(ms).ok())
        .and_then(|ms| received_at.checked_add_signed(chrono::Duration::milliseconds(ms)));
    let deadline = match (wire.deadline, ttl_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Job {
        id: wire.id,
        tenant,
        pipeline: wire.pipeline,
        input: wire.input,
        idempotency_key,
        priority: wire.priority.unwrap_or_default(),
        deadline,
        user: wire.user,
        metadata: wire.metadata,
        reply_to: wire.reply_to,
    })
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// The configured model answered.
    Ok,
    /// A fallback model (or a static answer) served the job.
    Degraded,
    /// Sent for human review (goes to the review topic).
    Review,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Ok => "ok",
            ResultStatus::Degraded => "degraded",
            ResultStatus::Review => "review",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub category: Option<String>,
    pub confidence: Option<f64>,
    pub model: Option<String>,
    pub variant: Option<String>,
}

/// What one step did: which target served it, how often it tried, what it cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub kind: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub attempts: u32,
    pub cached: bool,
    pub latency_ms: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Time the step's calls (or, for the `admission` record, the job) waited for rate limits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub throttled_ms: u64,
    /// The step's `when` did not hold: it did not run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub skipped: bool,
    /// What the step produced, cut to the pipeline's `record_output_chars`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    /// Why the step failed, when a static `on_failure` answer stood in for it (or the job
    /// was blocked or sent to review by a guardrail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The prompt the step rendered (a route may choose it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Chunks a split step produced or a map step processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u32>,
    /// Each round of an evaluator-optimizer loop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Round>,
    /// What a guardrail redacted, by kind (`email`, `card`, ...): counts, never the text.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub redacted: std::collections::BTreeMap<String, u32>,
    /// A response-cache hit (`cached`): the stored answer's tokens and what it would have
    /// cost on this model, which this job did not spend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<CacheHit>,
    /// A semantic-cache hit: how similar the stored question was (cosine, at or above the
    /// step's threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// `flex`: served by OpenAI's flex tier, at the model's flex prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
}

/// What a response-cache hit saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheHit {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub saved_usd: f64,
}

/// One round of a `refine` step: the evaluator's score and feedback on that round's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub round: u32,
    pub score: f64,
    pub feedback: String,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

impl Usage {
    pub fn add(&mut self, step: &StepRecord) {
        self.input_tokens += step.input_tokens;
        self.output_tokens += step.output_tokens;
        self.cost_usd += step.cost_usd;
    }
}

/// A finished job (`schemas/result.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: String,
    pub tenant: String,
    pub pipeline: String,
    pub status: ResultStatus,
    pub output: Value,
    pub route: RouteInfo,
    pub steps: Vec<StepRecord>,
    pub usage: Usage,
    pub duplicate: bool,
    pub metadata: Option<Value>,
    pub received_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    pub latency_ms: u64,
    /// Why a result went to review (status `review`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_reason: Option<String>,
    /// What a reviewer needs besides the proposed output (status `review`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewRequest>,
    /// Who decided a reviewed result, how and when (a result that came back from review).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed: Option<Box<crate::review::Reviewed>>,
}

/// The parts of a review request beyond the result: an id a decision names, the time by which
/// it is due, and the job's input as the pipeline saw it (after guardrail redaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewRequest {
    /// The same for every delivery of the same job.
    pub id: String,
    pub deadline: DateTime<Utc>,
    pub input: Map<String, Value>,
}

impl ReviewRequest {
    /// The review id of the job whose idempotency state key is `state_key`.
    pub fn id_for(state_key: &str) -> String {
        format!("rv-{}", crate::digest::of(state_key.as_bytes(), 16))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    InvalidJob,
    DeadlineExceeded,
    BudgetExceeded,
    RateLimited,
    ProviderFailed,
    OutputInvalid,
    /// No model the step may use has a context window that holds the prompt.
    ContextLengthExceeded,
    GuardrailBlocked,
    /// Handed back on its last allowed delivery; the broker will not deliver it again.
    MaxDeliveriesExceeded,
    /// The tenant is not named in config and `tenants.unknown: reject`.
    UnknownTenant,
    /// A reviewer rejected the result (or its review timed out with `on_timeout: reject`).
    ReviewRejected,
    /// A review decision that cannot be applied: unknown or already-decided review, another
    /// tenant's review, or a malformed decision.
    DecisionRefused,
    Internal,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::InvalidJob => "invalid_job",
            DeadLetterReason::DeadlineExceeded => "deadline_exceeded",
            DeadLetterReason::BudgetExceeded => "budget_exceeded",
            DeadLetterReason::RateLimited => "rate_limited",
            DeadLetterReason::ProviderFailed => "provider_failed",
            DeadLetterReason::OutputInvalid => "output_invalid",
            DeadLetterReason::ContextLengthExceeded => "context_length_exceeded",
            DeadLetterReason::GuardrailBlocked => "guardrail_blocked",
            DeadLetterReason::UnknownTenant => "unknown_tenant",
            DeadLetterReason::MaxDeliveriesExceeded => "max_deliveries_exceeded",
            DeadLetterReason::ReviewRejected => "review_rejected",
            DeadLetterReason::DecisionRefused => "decision_refused",
            DeadLetterReason::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    Utf8,
    Base64,
}

/// Where a message came from, so a dead letter can be traced back to its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub transport: String,
    pub topic: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<i64>,
    /// JetStream stream sequence.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stream_seq: Option<u64>,
}

/// A job that could not be finished (`schemas/dead_letter.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job_id: Option<String>,
    pub tenant: Option<String>,
    pub reason: DeadLetterReason,
    /// A sentence a person can act on.
    pub error: String,
    pub attempts: u32,
    pub payload: String,
    pub payload_encoding: PayloadEncoding,
    /// The payload holds only the first [`MAX_DEAD_LETTER_PAYLOAD`] bytes of the original.
    pub payload_truncated: bool,
    pub source: SourceInfo,
    /// Times the message was delivered before it was given up (`max_deliveries_exceeded`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deliveries: Option<u64>,
    pub duplicate: bool,
    pub failed_at: DateTime<Utc>,
}

impl DeadLetter {
    /// Builds a dead letter that carries the original bytes: as text when they are UTF-8,
    /// otherwise base64.
    pub fn new(
        reason: DeadLetterReason,
        error: String,
        payload: &[u8],
        source: SourceInfo,
    ) -> Self {
        let payload_truncated = payload.len() > MAX_DEAD_LETTER_PAYLOAD;
        let kept = &payload[..payload.len().min(MAX_DEAD_LETTER_PAYLOAD)];
        let (payload, payload_encoding) = match std::str::from_utf8(kept) {
            Ok(text) => (text.to_owned(), PayloadEncoding::Utf8),
            // A cut through a multi-byte character is still valid text up to the cut.
            Err(e) if payload_truncated && e.error_len().is_none() => (
                String::from_utf8_lossy(&kept[..e.valid_up_to()]).into_owned(),
                PayloadEncoding::Utf8,
            ),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(kept),
                PayloadEncoding::Base64,
            ),
        };
        let mut error = error;
        if error.len() > MAX_DEAD_LETTER_ERROR {
            let mut cut = MAX_DEAD_LETTER_ERROR;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
            error.push('…');
        }
        Self {
            job_id: None,
            tenant: None,
            reason,
            error,
            attempts: 0,
            payload,
            payload_encoding,
            payload_truncated,
            source,
            deliveries: None,
            duplicate: false,
            failed_at: Utc::now(),
        }
    }
}

/// A final outcome as the idempotency store keeps it, so a redelivery replays it verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Outcome {
    Result(JobResult),
    DeadLetter(DeadLetter),
}

/// A W3C `traceparent` value, when the header is one exactly: version `00`, 55 characters
/// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`), lowercase hex, neither id all zeros.
/// Anything else (other versions, extra fields, whitespace, control characters) is dropped, never
/// copied: the value goes into output headers and log records.
pub fn valid_traceparent(value: &[u8]) -> Option<String> {
    let lower_hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let not_zero = |s: &[u8]| s.iter().any(|b| *b != b'0');
    let ok = value.len() == 55
        && value.starts_with(b"00-")
        && value[35] == b'-'
        && value[52] == b'-'
        && lower_hex(&value[3..35])
        && lower_hex(&value[36..52])
        && lower_hex(&value[53..55])
        && not_zero(&value[3..35])
        && not_zero(&value[36..52]);
    // Only ASCII passed the checks, so this cannot fail.
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

/// Counts of anything keyed by name, ordered for stable printing.
pub type Counts = BTreeMap<String, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    #[test]
    fn decodes_a_minimal_job_and_defaults_the_idempotency_key() {
        let job = decode_job(
            br#"{"id":"t-1","tenant":"acme","input":{"text":"hi"}}"#,
            1024,
            now(),
        )
        .unwrap();
        assert_eq!(job.idempotency_key, "acme:t-1");
        assert_eq!(job.priority, Priority::Normal);
        assert!(job.deadline.is_none());
    }

    #[test]
    fn names_the_missing_field() {
        let err = decode_job(br#"{"id":"t-1","input":{}}"#, 1024, now()).unwrap_err();
        assert!(err.to_string().contains("tenant"), "{err}");
    }

    #[test]
    fn names_the_field_with_the_wrong_type() {
        let err =
            decode_job(br#"{"id":"t-1","tenant":"a","input":"text"}"#, 1024, now()).unwrap_err();
        assert!(err.to_string().contains("`input`"), "{err}");
    }

    #[test]
    fn a_key_given_twice_takes_its_last_value_and_errors_still_name_the_field() {
        let job = decode_job(
            br#"{"id":"t-1","tenant":"acme","tenant":"globex","input":{"text":"hi"}}"#,
            1024,
            now(),
        )
        .unwrap();
        assert_eq!(job.tenant.as_str(), "globex");
        assert_eq!(job.idempotency_key, "globex:t-1");
        let err = decode_job(br#"[1, 2]"#, 1024, now()).unwrap_err();
        assert!(err.to_string().contains("it is an array"), "{err}");
        let err = decode_job(
            br#"{"id":"t-1","tenant":"a","input":{},"ttl_ms":"soon"}"#,
            1024,
            now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("job field `ttl_ms`"), "{err}");
    }

    #[test]
    fn rejects_tenants_that_are_not_one_subject_token() {
        let err = decode_job(br#"{"id":"1","tenant":"a.b","input":{}}"#, 1024, now()).unwrap_err();
        assert!(err.to_string().contains("'.'"), "{err}");
        let err = decode_job(br#"{"id":"1","tenant":"_x","input":{}}"#, 1024, now()).unwrap_err();
        assert!(err.to_string().contains("start with"), "{err}");
    }

    #[test]
    fn rejects_oversize_and_non_utf8_payloads() {
        let err = decode_job(&[b'x'; 20], 10, now()).unwrap_err();
        assert!(matches!(
            err,
            InvalidJob::TooLarge {
                size: 20,
                limit: 10
            }
        ));
        let err = decode_job(&[b'{', 0xff, b'}'], 10, now()).unwrap_err();
        assert!(matches!(err, InvalidJob::NotUtf8 { offset: 1 }));
    }

    #[test]
    fn ttl_and_deadline_take_the_earlier() {
        let at = "2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let job = decode_job(
            br#"{"id":"1","tenant":"a","input":{},"ttl_ms":1000,"deadline":"2026-01-01T00:00:05Z"}"#,
            1024,
            at,
        )
        .unwrap();
        assert_eq!(job.deadline, Some(at + chrono::Duration::seconds(1)));
    }

    #[test]
    fn only_well_formed_traceparents_are_kept() {
        let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            valid_traceparent(good).as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(valid_traceparent(b"00-xyz-1-01"), None);
        assert_eq!(valid_traceparent(&[0xff]), None);
    }

    #[test]
    fn a_traceparent_with_a_crlf_tail_or_any_deviation_is_dropped() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for bad in [
            format!("{good}-x\r\nX-Injected: 1"),
            format!("{good}\r\n"),
            format!(" {good}"),
            good.to_uppercase(),
            good.replacen("00-", "01-", 1),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".to_owned(),
        ] {
            assert_eq!(valid_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn dead_letter_keeps_binary_payloads_as_base64() {
        let src = SourceInfo {
            transport: "kafka".into(),
            topic: "t".into(),
            partition: Some(0),
            offset: Some(1),
            stream_seq: None,
        };
        let dl = DeadLetter::new(DeadLetterReason::InvalidJob, "x".into(), &[0xff, 0x00], src);
        assert_eq!(dl.payload_encoding, PayloadEncoding::Base64);
        assert_eq!(dl.payload, "/wA=");
    }

    #[test]
    fn dead_letters_cap_the_payload_they_carry() {
        let src = SourceInfo {
            transport: "kafka".into(),
            topic: "t".into(),
            partition: None,
            offset: None,
            stream_seq: None,
        };
        let big = "é".repeat(MAX_DEAD_LETTER_PAYLOAD);
        let dl = DeadLetter::new(
            DeadLetterReason::InvalidJob,
            "x".repeat(10_000),
            big.as_bytes(),
            src,
        );
        assert!(dl.payload_truncated);
        assert_eq!(
            dl.payload_encoding,
            PayloadEncoding::Utf8,
            "a cut inside a character stays text"
        );
        assert!(dl.payload.len() <= MAX_DEAD_LETTER_PAYLOAD);
        assert!(dl.error.len() <= MAX_DEAD_LETTER_ERROR + 3);
    }
}
