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

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, DropGuard};

mod answer;
mod anthropic;
mod batch;
pub mod embed;
mod openai;

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
    /// Canned answers: the first regex that finds the prompt answers it.
    answers: Vec<(regex::Regex, Value)>,
    /// Context window per model name.
    context_windows: std::collections::BTreeMap<String, u64>,
    /// The batch APIs' settings and the batches and files they hold.
    batch: crate::config::MockBatch,
    batches: Mutex<batch::Batches>,
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
    /// Tokens the answer reported as used (input + output; 0 when it failed).
    pub tokens: u64,
}

impl MockState {
    /// The answer to a conversation: the first canned answer whose regex finds its text
    /// (`$1`, `${name}` expanded from the match; a JSON answer as its JSON text), else the
    /// built-in one.
    fn answer(&self, messages: &[(String, String)]) -> String {
        if !self.answers.is_empty() {
            let text = messages
                .iter()
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            for (pattern, answer) in &self.answers {
                if let Some(found) = pattern.captures(&text) {
                    return match answer {
                        Value::String(template) => {
                            let mut out = String::new();
                            found.expand(template, &mut out);
                            out
                        }
                        other => other.to_string(),
                    };
                }
            }
        }
        answer::answer(messages).0
    }

    /// The context window of `model`, when the mock is told one.
    fn context_window(&self, model: &str) -> Option<u64> {
        self.context_windows.get(model).copied()
    }

    fn record(&self, body: &[u8], outcome: &'static str, retry_after_s: Option<u64>) {
        self.record_answer(body, outcome, retry_after_s, 0);
    }

    fn record_answer(
        &self,
        body: &[u8],
        outcome: &'static str,
        retry_after_s: Option<u64>,
        tokens: u64,
    ) {
        let entry = LogEntry {
            at_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            body_hash: fnv1a(body),
            outcome,
            retry_after_s,
            tokens,
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
        // Checked when the config was loaded; a pattern that still fails is left out.
        answers: settings
            .answers
            .iter()
            .filter_map(|a| Some((regex::Regex::new(&a.pattern).ok()?, a.answer.clone())))
            .collect(),
        context_windows: settings.context_windows,
        batch: settings.batch,
        batches: Mutex::new(batch::Batches::default()),
    })
}

fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/embeddings", post(embed::embeddings))
        .route("/v1/files", post(batch::upload))
        .route("/v1/files/{id}/content", get(batch::file_content))
        .route("/v1/batches", post(batch::create_openai))
        .route("/v1/batches/{id}", get(batch::get_openai))
        .route("/v1/messages/batches", post(batch::create_anthropic))
        .route("/v1/messages/batches/{id}", get(batch::get_anthropic))
        .route(
            "/v1/messages/batches/{id}/results",
            get(batch::results_anthropic),
        )
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

/// How one API words the errors a fault produces.
struct ErrorShapes {
    rate_limited: fn(model: &str) -> Response,
    /// What a hung request finally gets (504), if the client is still waiting.
    hang: fn() -> Response,
    server_error: fn() -> Response,
}

/// Plays the fault drawn for a request: the response to send instead of an answer, after the
/// fault's delay (a 429 at once with `Retry-After`, a server error after the usual latency, a
/// hang for [`HANG`]); `None` when the request is to be answered.
async fn play_fault(
    state: &MockState,
    body: &[u8],
    model: &str,
    headers: &HeaderMap,
    shapes: &ErrorShapes,
) -> Result<Duration, Response> {
    let stats = &state.stats;
    let (fault, latency, retry_after_s) = state.draw_for(headers);
    match fault {
        Fault::RateLimited => {
            state.record(body, "rate_limited", Some(retry_after_s));
            stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut response = (shapes.rate_limited)(model);
            if let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
            Err(response)
        }
        Fault::Hang => {
            state.record(body, "hang", None);
            stats.hung.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(HANG).await;
            Err((shapes.hang)())
        }
        Fault::ServerError => {
            state.record(body, "server_error", None);
            tokio::time::sleep(latency).await;
            stats.server_errors.fetch_add(1, Ordering::Relaxed);
            Err((shapes.server_error)())
        }
        Fault::None => Ok(latency),
    }
}

/// `content` cut to `max_tokens` tokens, and whether it was cut.
fn limit_to(content: String, max_tokens: u64) -> (String, bool) {
    let max = usize::try_from(max_tokens.max(1)).unwrap_or(usize::MAX);
    let bpe = tiktoken_rs::o200k_base_singleton();
    let tokens = bpe.encode_ordinary(&content);
    if tokens.len() <= max {
        return (content, false);
    }
    // A cut through a multi-byte character does not decode; one token less always ends on a
    // character within a few tries.
    let cut = (max.saturating_sub(3)..=max)
        .rev()
        .find_map(|n| bpe.decode(&tokens[..n]).ok())
        .unwrap_or_else(|| content.chars().take(max).collect());
    (cut, true)
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
