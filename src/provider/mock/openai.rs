//! The mock's OpenAI-compatible `POST /v1/chat/completions`: OpenAI's request checks, response
//! JSON (with `usage`) and error bodies.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{limit_to, play_fault, ErrorShapes, MockState};
use crate::tokens::typical;

const ERRORS: ErrorShapes = ErrorShapes {
    rate_limited: |model| {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            Some("rate_limit_exceeded"),
            &format!(
                "Rate limit reached for {model} on requests per min (RPM). Please try again later."
            ),
        )
    },
    hang: || {
        error(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            None,
            "upstream timed out",
        )
    },
    server_error: || {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        )
    },
};

fn error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// OpenAI Chat Completions.
/// How much slower the flex tier answers than the default one.
const FLEX_SLOWDOWN: u32 = 2;

pub(super) async fn chat_completions(
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
    let max_tokens = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(4096)
        .max(1);
    let prompt_tokens: u64 = messages.iter().map(|(_, c)| typical(c) + 3).sum::<u64>() + 3;
    if let Some(window) = state.context_window(&model) {
        if prompt_tokens + max_tokens > window {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            state.record(&body, "bad_request", None);
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
                &format!(
                    "This model's maximum context length is {window} tokens. However, you requested {} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                    prompt_tokens + max_tokens
                ),
            );
        }
    }
    let flex = request.get("service_tier").and_then(Value::as_str) == Some("flex");
    let latency = match play_fault(&state, &body, &model, &headers, &ERRORS).await {
        // The flex tier answers more slowly, as OpenAI's does.
        Ok(latency) if flex => latency * FLEX_SLOWDOWN,
        Ok(latency) => latency,
        Err(response) => return response,
    };
    tokio::time::sleep(latency).await;
    let (content, cut) = limit_to(state.answer(&messages), max_tokens);
    let finish_reason = if cut { "length" } else { "stop" };
    let completion_tokens = typical(&content);
    state.record_answer(&body, "ok", None, prompt_tokens + completion_tokens);
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
        "service_tier": if flex { "flex" } else { "default" },
        "system_fingerprint": "fp_switchyard_mock"
    }))
    .into_response()
}
