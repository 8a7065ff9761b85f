//! The built-in mock LLM server: OpenAI-compatible `POST /v1/chat/completions` and Anthropic's
//! `POST /v1/messages` with each real API's JSON (including `usage`; for Anthropic also prompt
//! cache writes and reads of `cache_control` system blocks, and the required `anthropic-version`
//! header), simulated latency and the same injected faults (429 with `Retry-After`, 500 or
//! Anthropic's 529 `overloaded_error`, hangs), plus `GET /mock/stats` counting what it served and `GET /mock/log` listing recent requests
//! (time, body hash, outcome), so client behaviour such as Retry-After can be checked afterwards.
//!
//! A classify prompt (one with a `Categories: a, b, c` line) gets a JSON answer
//! `{"category": .., "confidence": ..}` chosen from the text, so routing is exercised; other
//! prompts get a deterministic answer sized by the input. A request can force a fault with the
//! `x-mock-fault: 429|500|hang` header.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::estimate_tokens;
use crate::config::{Faults, Latency, MockSettings};

/// How long a "hang" fault holds the request before answering 504.
const HANG: Duration = Duration::from_secs(120);

/// Counters of what the mock served.
#[derive(Debug, Default, Serialize)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub hung: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Requests that carried `Authorization: Bearer ...`.
    pub authorized: AtomicU64,
}

impl MockStats {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    RateLimited,
    ServerError,
    Hang,
}

struct MockState {
    latency: Latency,
    /// The random source and the current faults (adjustable while serving).
    dice: Mutex<(StdRng, Faults)>,
    stats: Arc<MockStats>,
    /// Hashes of system prompts marked `cache_control` (Anthropic), bounded.
    prompt_cache: Mutex<std::collections::HashSet<u64>>,
    /// The most recent requests, for checking client behaviour (e.g. Retry-After) afterwards.
    log: Mutex<std::collections::VecDeque<LogEntry>>,
    started: std::time::Instant,
}

/// Requests the log keeps (the oldest are dropped).
const LOG_MAX: usize = 200_000;

/// One request the mock answered.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// Milliseconds since the server started.
    pub at_ms: f64,
    /// FNV-1a hash of the request body: a retry of the same call has the same one.
    pub body_hash: u64,
    /// `ok`, `rate_limited`, `server_error`, `hang` or `bad_request`.
    pub outcome: &'static str,
    /// The `Retry-After` seconds sent with a 429.
    pub retry_after_s: Option<u64>,
}

impl MockState {
    fn record(&self, body: &[u8], outcome: &'static str, retry_after_s: Option<u64>) {
        let entry = LogEntry {
            at_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            body_hash: fnv1a(body),
            outcome,
            retry_after_s,
        };
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= LOG_MAX {
            log.pop_front();
        }
        log.push_back(entry);
    }
}

/// Most cached prompts the mock remembers.
const PROMPT_CACHE_MAX: usize = 1024;

impl MockState {
    /// The fault for a request: the `x-mock-fault` header's (429, 500, hang) or a random draw.
    fn draw_for(&self, headers: &HeaderMap) -> (Fault, Duration, u64) {
        let (drawn, latency, retry_after_s) = self.draw();
        let fault = match headers.get("x-mock-fault").and_then(|v| v.to_str().ok()) {
            Some("429") => Fault::RateLimited,
            Some("500") => Fault::ServerError,
            Some("hang") => Fault::Hang,
            _ => drawn,
        };
        (fault, latency, retry_after_s)
    }

    fn draw(&self) -> (Fault, Duration, u64) {
        let mut dice = self.dice.lock().unwrap_or_else(|e| e.into_inner());
        let (rng, f) = &mut *dice;
        let f = f.clone();
        let roll: f64 = rng.random();
        let fault = if roll < f.rate_429 {
            Fault::RateLimited
        } else if roll < f.rate_429 + f.rate_500 {
            Fault::ServerError
        } else if roll < f.rate_429 + f.rate_500 + f.rate_hang {
            Fault::Hang
        } else {
            Fault::None
        };
        (fault, sample_latency(&self.latency, rng), f.retry_after_s)
    }
}

fn sample_latency(latency: &Latency, rng: &mut impl Rng) -> Duration {
    let ms = match *latency {
        Latency::Fixed { ms } => ms as f64,
        Latency::Uniform { min_ms, max_ms } => rng.random_range(min_ms..=max_ms) as f64,
        Latency::Lognormal { p50_ms, p99_ms } => {
            let mu = (p50_ms as f64).ln();
            let sigma = ((p99_ms as f64).ln() - mu) / 2.326_348;
            // Box-Muller: one standard normal from two uniforms.
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mu + sigma * z).exp().min(p99_ms as f64 * 10.0)
        }
    };
    Duration::from_micros((ms * 1000.0) as u64)
}

/// A running mock server; it stops when this is dropped.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<MockState>,
    _stop: DropGuard,
}

impl MockServer {
    /// Binds `addr` (use port 0 for any free port) and serves until dropped.
    pub async fn start(addr: &str, settings: MockSettings) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = mock_state(settings);
        let stop = CancellationToken::new();
        let app = router(state.clone());
        let cancelled = stop.clone();
        // Detached on purpose: the server belongs to this handle, which stops it on drop.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            tokio::select! {
                result = axum::serve(listener, app) => {
                    if let Err(e) = result { tracing::error!(error = %e, "mock server stopped"); }
                }
                () = cancelled.cancelled() => {}
            }
        });
        Ok(Self {
            addr,
            state,
            _stop: stop.drop_guard(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The most recent requests (also `GET /mock/log`).
    pub fn log(&self) -> Vec<LogEntry> {
        self.state
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn stats(&self) -> &MockStats {
        &self.state.stats
    }

    /// Changes the injected faults from now on (also `PUT /mock/faults` with the same JSON).
    pub fn set_faults(&self, faults: Faults) {
        self.state.dice.lock().unwrap_or_else(|e| e.into_inner()).1 = faults;
    }
}

fn mock_state(settings: MockSettings) -> Arc<MockState> {
    let rng = match settings.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    Arc::new(MockState {
        latency: settings.latency,
        dice: Mutex::new((rng, settings.faults)),
        stats: Arc::new(MockStats::default()),
        prompt_cache: Mutex::new(Default::default()),
        log: Mutex::new(Default::default()),
        started: std::time::Instant::now(),
    })
}

fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .route("/mock/stats", get(stats_handler))
        .route("/mock/log", get(log_handler))
        .route("/mock/faults", axum::routing::put(set_faults_handler))
        .with_state(state)
}

async fn set_faults_handler(
    State(state): State<Arc<MockState>>,
    Json(faults): Json<Faults>,
) -> StatusCode {
    state.dice.lock().unwrap_or_else(|e| e.into_inner()).1 = faults;
    StatusCode::NO_CONTENT
}

async fn log_handler(State(state): State<Arc<MockState>>) -> Json<Value> {
    let log = state.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(serde_json::to_value(log).unwrap_or(Value::Null))
}

async fn stats_handler(State(state): State<Arc<MockState>>) -> Json<Value> {
    Json(serde_json::to_value(&*state.stats).unwrap_or(Value::Null))
}

fn error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

async fn chat_completions(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stats = &state.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "))
    {
        stats.authorized.fetch_add(1, Ordering::Relaxed);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "We could not parse the JSON body of your request.",
            );
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let messages: Vec<(String, String)> = request
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| {
                    let role = m.get("role")?.as_str()?.to_owned();
                    let content = m.get("content")?.as_str()?.to_owned();
                    Some((role, content))
                })
                .collect()
        })
        .unwrap_or_default();
    if model.is_empty() || messages.is_empty() {
        stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "you must provide a model parameter and at least one message",
        );
    }
    let (fault, latency, retry_after_s) = state.draw_for(&headers);
    match fault {
        Fault::RateLimited => {
            state.record(&body, "rate_limited", Some(retry_after_s));
            stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
                &format!("Rate limit reached for {model} on requests per min (RPM). Please try again later."),
            );
            let retry_after = retry_after_s.to_string();
            if let Ok(value) = HeaderValue::from_str(&retry_after) {
                response.headers_mut().insert("retry-after", value);
            }
            return response;
        }
        Fault::Hang => {
            state.record(&body, "hang", None);
            stats.hung.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(HANG).await;
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                None,
                "upstream timed out",
            );
        }
        Fault::ServerError => {
            state.record(&body, "server_error", None);
            tokio::time::sleep(latency).await;
            stats.server_errors.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                "The server had an error while processing your request. Sorry about that!",
            );
        }
        Fault::None => {}
    }
    tokio::time::sleep(latency).await;
    let max_tokens = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(4096)
        .max(1);
    let prompt_tokens: u64 = messages
        .iter()
        .map(|(_, c)| estimate_tokens(c) + 3)
        .sum::<u64>()
        + 3;
    let (mut content, _) = answer(&messages);
    let mut finish_reason = "stop";
    if estimate_tokens(&content) > max_tokens {
        content = content
            .chars()
            .take(usize::try_from(max_tokens * 4).unwrap_or(usize::MAX))
            .collect();
        finish_reason = "length";
    }
    let completion_tokens = estimate_tokens(&content);
    state.record(&body, "ok", None);
    stats.ok.fetch_add(1, Ordering::Relaxed);
    let id = stats.requests.load(Ordering::Relaxed);
    Json(json!({
        "id": format!("chatcmpl-mock{id:012}"),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        },
        "system_fingerprint": "fp_switchyard_mock"
    }))
    .into_response()
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, Json(body)).into_response()
}

/// Text of an Anthropic `content`/`system` value: a string or an array of text blocks.
fn blocks_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Anthropic Messages API.
async fn messages(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stats = &state.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if headers.contains_key("x-api-key") {
        stats.authorized.fetch_add(1, Ordering::Relaxed);
    }
    let bad = |message: &str| {
        stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    };
    if !headers.contains_key("anthropic-version") {
        return bad("anthropic-version: header is required");
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad("There was an issue with the format or content of your request.");
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(max_tokens) = request.get("max_tokens").and_then(Value::as_u64) else {
        return bad("max_tokens: Field required");
    };
    let mut turns: Vec<(String, String)> = request
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| {
                    let role = m.get("role")?.as_str()?.to_owned();
                    Some((role, blocks_text(m.get("content")?)))
                })
                .collect()
        })
        .unwrap_or_default();
    if model.is_empty() || turns.is_empty() {
        return bad("messages: at least one message is required");
    }
    let system = request.get("system").map(blocks_text).unwrap_or_default();
    let cached_system = request
        .pointer("/system/0/cache_control/type")
        .and_then(Value::as_str)
        == Some("ephemeral");
    let (fault, latency, retry_after_s) = state.draw_for(&headers);
    match fault {
        Fault::RateLimited => {
            state.record(&body, "rate_limited", Some(retry_after_s));
            stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut response = anthropic_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization of requests per minute.",
            );
            if let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
            return response;
        }
        Fault::Hang => {
            state.record(&body, "hang", None);
            stats.hung.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(HANG).await;
            return anthropic_error(
                StatusCode::GATEWAY_TIMEOUT,
                "api_error",
                "upstream timed out",
            );
        }
        Fault::ServerError => {
            state.record(&body, "server_error", None);
            tokio::time::sleep(latency).await;
            stats.server_errors.fetch_add(1, Ordering::Relaxed);
            let overloaded = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return anthropic_error(overloaded, "overloaded_error", "Overloaded");
        }
        Fault::None => {}
    }
    tokio::time::sleep(latency).await;
    let system_tokens = if system.is_empty() {
        0
    } else {
        estimate_tokens(&system)
    };
    let (cache_write, cache_read) = if cached_system {
        let key = fnv1a(system.as_bytes());
        let mut cache = state.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.contains(&key) {
            (0, system_tokens)
        } else {
            if cache.len() >= PROMPT_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key);
            (system_tokens, 0)
        }
    } else {
        (0, 0)
    };
    let message_tokens: u64 = turns.iter().map(|(_, c)| estimate_tokens(c) + 3).sum();
    let input_tokens = message_tokens + if cached_system { 0 } else { system_tokens };
    if !system.is_empty() {
        turns.insert(0, ("system".into(), system));
    }
    let (mut content, _) = answer(&turns);
    let mut stop_reason = "end_turn";
    if estimate_tokens(&content) > max_tokens.max(1) {
        content = content
            .chars()
            .take(usize::try_from(max_tokens * 4).unwrap_or(usize::MAX))
            .collect();
        stop_reason = "max_tokens";
    }
    state.record(&body, "ok", None);
    stats.ok.fetch_add(1, Ordering::Relaxed);
    let id = stats.requests.load(Ordering::Relaxed);
    Json(json!({
        "id": format!("msg_mock{id:016}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": content}],
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "output_tokens": estimate_tokens(&content)
        }
    }))
    .into_response()
}

/// The mock's answer and whether it was a classification.
fn answer(messages: &[(String, String)]) -> (String, bool) {
    let mut categories: Vec<String> = Vec::new();
    for (_, content) in messages {
        for line in content.lines() {
            if let Some(list) = line.trim().strip_prefix("Categories:") {
                categories = list
                    .split(',')
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
            }
        }
    }
    let text: String = messages
        .iter()
        .filter(|(role, _)| role == "user")
        .flat_map(|(_, c)| c.lines().filter(|l| !l.trim().starts_with("Categories:")))
        .collect::<Vec<_>>()
        .join("\n");
    let hash = fnv1a(text.as_bytes());
    if !categories.is_empty() {
        let lower = text.to_lowercase();
        let category = categories
            .iter()
            .find(|c| lower.contains(&c.to_lowercase()))
            .cloned()
            .unwrap_or_else(|| categories[(hash % categories.len() as u64) as usize].clone());
        let confidence = 0.40 + ((hash >> 8) % 60) as f64 / 100.0;
        return (
            json!({"category": category, "confidence": confidence}).to_string(),
            true,
        );
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let topic = words
        .iter()
        .rev()
        .take(8)
        .rev()
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let mut reply = format!("Thank you for your message about \"{topic}\". ");
    const SENTENCES: [&str; 4] = [
        "I have looked into this and here is what I found.",
        "The most likely cause is a temporary issue on our side, which has now been resolved.",
        "If anything is still unclear, reply to this message and we will follow up.",
        "I have also added a note to your account so the team has the full context.",
    ];
    let n = 1 + (words.len() / 40).min(6);
    for i in 0..n {
        reply.push_str(SENTENCES[(hash as usize + i) % SENTENCES.len()]);
        reply.push(' ');
    }
    (reply.trim_end().to_owned(), false)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_prompts_get_a_listed_category() {
        let msgs = vec![(
            "user".to_owned(),
            "Categories: billing, technical, general\n\nTicket: I was charged twice".to_owned(),
        )];
        let (content, classified) = answer(&msgs);
        assert!(classified);
        let v: Value = serde_json::from_str(&content).unwrap();
        assert!(["billing", "technical", "general"].contains(&v["category"].as_str().unwrap()));
        let c = v["confidence"].as_f64().unwrap();
        assert!((0.4..1.0).contains(&c));
    }

    #[test]
    fn a_category_named_in_the_text_wins() {
        let msgs = vec![(
            "user".to_owned(),
            "Categories: billing, technical\nmy billing is wrong".to_owned(),
        )];
        let v: Value = serde_json::from_str(&answer(&msgs).0).unwrap();
        assert_eq!(v["category"], "billing");
    }

    #[test]
    fn lognormal_latency_has_the_configured_median() {
        let mut rng = StdRng::seed_from_u64(7);
        let dist = Latency::Lognormal {
            p50_ms: 100,
            p99_ms: 1000,
        };
        let mut samples: Vec<Duration> =
            (0..4001).map(|_| sample_latency(&dist, &mut rng)).collect();
        samples.sort();
        let median = samples[2000].as_millis();
        assert!((85..=115).contains(&median), "median {median}ms");
    }
}
