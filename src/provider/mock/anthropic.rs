//! The mock's Anthropic `POST /v1/messages`: the required `anthropic-version` header, content
//! blocks, prompt-cache writes and reads of `cache_control` system blocks, Anthropic's error
//! bodies (529 `overloaded_error` for server faults).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{fnv1a, limit_to, play_fault, ErrorShapes, MockState, PROMPT_CACHE_MAX};
use crate::tokens::typical;

const ERRORS: ErrorShapes = ErrorShapes {
    rate_limited: |_model| {
        anthropic_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of requests per minute.",
        )
    },
    hang: || {
        anthropic_error(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "upstream timed out",
        )
    },
    server_error: || {
        let overloaded = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        anthropic_error(overloaded, "overloaded_error", "Overloaded")
    },
};

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
pub(super) async fn messages(
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
    if let Some(window) = state.context_window(&model) {
        let system_tokens = request
            .get("system")
            .map_or(0, |s| typical(&blocks_text(s)));
        let prompt: u64 = system_tokens + turns.iter().map(|(_, c)| typical(c) + 3).sum::<u64>();
        if prompt > window {
            state.record(&body, "bad_request", None);
            return bad(&format!(
                "prompt is too long: {prompt} tokens > {window} maximum"
            ));
        }
    }
    let latency = match play_fault(&state, &body, &model, &headers, &ERRORS).await {
        Ok(latency) => latency,
        Err(response) => return response,
    };
    tokio::time::sleep(latency).await;
    let system_tokens = if system.is_empty() {
        0
    } else {
        typical(&system)
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
    let message_tokens: u64 = turns.iter().map(|(_, c)| typical(c) + 3).sum();
    let input_tokens = message_tokens + if cached_system { 0 } else { system_tokens };
    if !system.is_empty() {
        turns.insert(0, ("system".into(), system));
    }
    let (content, cut) = limit_to(state.answer(&turns), max_tokens);
    let stop_reason = if cut { "max_tokens" } else { "end_turn" };
    let output_tokens = typical(&content);
    state.record_answer(
        &body,
        "ok",
        None,
        input_tokens + cache_write + cache_read + output_tokens,
    );
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
            "output_tokens": output_tokens
        }
    }))
    .into_response()
}
