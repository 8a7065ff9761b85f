//! The mock's batch APIs, shaped like the real ones:
//! - OpenAI: `POST /v1/files` (multipart, purpose `batch`, a JSONL file of
//!   `{custom_id, method, url, body}`), `POST /v1/batches`, `GET /v1/batches/{id}`,
//!   `GET /v1/files/{id}/content` (the output file: `{id, custom_id, response: {status_code,
//!   body}}` lines; failures in the error file);
//! - Anthropic: `POST /v1/messages/batches` (`{requests: [{custom_id, params}]}`),
//!   `GET /v1/messages/batches/{id}` (`processing_status`, `results_url` once ended),
//!   `GET /v1/messages/batches/{id}/results` (`{custom_id, result: {type, message | error}}`).
//!
//! A batch ends `batch.completion_ms` after it was created; each request is answered by the
//! mock's own chat endpoint then (its answers, usage and faults), except the share
//! `batch.failure_rate` of requests, chosen by a hash of their id, which fail.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{json, Value};

use super::MockState;

/// Batches and files the mock keeps at most (the oldest go first).
const MAX_KEPT: usize = 1_000;
/// Requests one batch may hold.
const MAX_REQUESTS: usize = 50_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

struct Batch {
    api: Api,
    requests: Vec<(String, Value)>,
    created: Instant,
    created_unix: i64,
    input_file_id: Option<String>,
    /// Filled when it ends: (custom id, Ok(response body) | Err(message)).
    results: Option<Vec<(String, Result<Value, String>)>>,
}

#[derive(Default)]
pub(super) struct Batches {
    batches: HashMap<String, Batch>,
    files: HashMap<String, Vec<u8>>,
    order: std::collections::VecDeque<String>,
    next: u64,
}

impl Batches {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{:024x}", self.next)
    }

    fn keep(&mut self, id: String) {
        self.order.push_back(id);
        while self.order.len() > MAX_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.batches.remove(&old);
                self.files.remove(&old);
            }
        }
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn not_found(what: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        &format!("No such {what}"),
    )
}

/// The part named `file` of a multipart body.
fn multipart_file(headers: &HeaderMap, body: &[u8]) -> Option<Vec<u8>> {
    let content_type = headers.get("content-type")?.to_str().ok()?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let marker = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(at) = find(rest, marker.as_bytes()) {
        rest = &rest[at + marker.len()..];
        parts.push(rest);
    }
    parts.into_iter().find_map(|part| {
        let header_end = find(part, b"\r\n\r\n")?;
        let headers = String::from_utf8_lossy(&part[..header_end]);
        if !headers.contains("name=\"file\"") {
            return None;
        }
        let content = &part[header_end + 4..];
        let end = find(content, format!("\r\n--{boundary}").as_bytes())?;
        Some(content[..end].to_vec())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `POST /v1/files`.
pub(super) async fn upload(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(file) = multipart_file(&headers, &body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "expected a multipart body with a `file` part",
        );
    };
    let mut batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let id = batches.id("file-");
    let bytes = file.len();
    batches.files.insert(id.clone(), file);
    batches.keep(id.clone());
    Json(json!({"id": id, "object": "file", "bytes": bytes, "created_at": chrono::Utc::now().timestamp(),
                "filename": "batch.jsonl", "purpose": "batch"}))
    .into_response()
}

/// `POST /v1/batches`.
pub(super) async fn create_openai(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "We could not parse the JSON body of your request.",
        );
    };
    let Some(file_id) = request.get("input_file_id").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "input_file_id is required",
        );
    };
    let mut batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let Some(file) = batches.files.get(file_id) else {
        return not_found("file");
    };
    let mut requests = Vec::new();
    for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(line) = serde_json::from_slice::<Value>(line) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "a line of the input file is not JSON",
            );
        };
        let (Some(id), Some(body)) = (
            line.get("custom_id").and_then(Value::as_str),
            line.get("body"),
        ) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "each line needs custom_id and body",
            );
        };
        requests.push((id.to_owned(), body.clone()));
    }
    if requests.is_empty() || requests.len() > MAX_REQUESTS {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "a batch holds 1 to 50000 requests",
        );
    }
    let id = batches.id("batch_");
    let batch = Batch {
        api: Api::OpenAi,
        requests,
        created: Instant::now(),
        created_unix: chrono::Utc::now().timestamp(),
        input_file_id: Some(file_id.to_owned()),
        results: None,
    };
    let view = openai_view(&id, &batch, "validating", None, None);
    batches.batches.insert(id.clone(), batch);
    batches.keep(id);
    Json(view).into_response()
}

/// `POST /v1/messages/batches`.
pub(super) async fn create_anthropic(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "We could not parse the JSON body of your request.",
        );
    };
    let requests: Vec<(String, Value)> = request
        .get("requests")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|r| {
                    Some((
                        r.get("custom_id")?.as_str()?.to_owned(),
                        r.get("params")?.clone(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if requests.is_empty() || requests.len() > MAX_REQUESTS {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "a batch holds 1 to 50000 requests with custom_id and params",
        );
    }
    let mut batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let id = batches.id("msgbatch_");
    let batch = Batch {
        api: Api::Anthropic,
        requests,
        created: Instant::now(),
        created_unix: chrono::Utc::now().timestamp(),
        input_file_id: None,
        results: None,
    };
    let view = anthropic_view(&id, &batch, None);
    batches.batches.insert(id.clone(), batch);
    batches.keep(id);
    Json(view).into_response()
}

fn openai_view(
    id: &str,
    b: &Batch,
    status: &str,
    output: Option<&str>,
    errors: Option<&str>,
) -> Value {
    let failed = b
        .results
        .as_ref()
        .map_or(0, |r| r.iter().filter(|(_, a)| a.is_err()).count());
    let completed = b.results.as_ref().map_or(0, |r| r.len() - failed);
    json!({"id": id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": null,
           "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
           "output_file_id": output, "error_file_id": errors, "created_at": b.created_unix,
           "request_counts": {"total": b.requests.len(), "completed": completed, "failed": failed}})
}

fn anthropic_view(id: &str, b: &Batch, results_url: Option<String>) -> Value {
    let ended = b.results.is_some();
    let errored = b
        .results
        .as_ref()
        .map_or(0, |r| r.iter().filter(|(_, a)| a.is_err()).count());
    let succeeded = b.results.as_ref().map_or(0, |r| r.len() - errored);
    json!({"id": id, "type": "message_batch",
           "processing_status": if ended { "ended" } else { "in_progress" },
           "request_counts": {"processing": if ended { 0 } else { b.requests.len() }, "succeeded": succeeded,
                              "errored": errored, "canceled": 0, "expired": 0},
           "created_at": chrono::DateTime::from_timestamp(b.created_unix, 0).map(|t| t.to_rfc3339()),
           "results_url": results_url})
}

/// Whether the request `custom_id` of a batch fails (the configured share, by its hash).
fn fails(custom_id: &str, rate: f64) -> bool {
    let h = super::fnv1a(custom_id.as_bytes());
    (h % 10_000) as f64 / 10_000.0 < rate
}

/// Ends the batch `id` once its time has come: answers every request through the mock's own
/// chat endpoint. `true` when it has ended.
async fn settle(state: &Arc<MockState>, id: &str) -> Option<bool> {
    let (api, requests) = {
        let batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
        let b = batches.batches.get(id)?;
        if b.results.is_some() {
            return Some(true);
        }
        if b.created.elapsed() < Duration::from_millis(state.batch.completion_ms) {
            return Some(false);
        }
        (b.api, b.requests.clone())
    };
    let rate = state.batch.failure_rate;
    let results: Vec<(String, Result<Value, String>)> = futures::stream::iter(requests)
        .map(|(custom_id, body)| {
            let state = state.clone();
            async move {
                if fails(&custom_id, rate) {
                    return (
                        custom_id,
                        Err("The server had an error processing this request.".to_owned()),
                    );
                }
                let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                let response = match api {
                    Api::OpenAi => {
                        super::openai::chat_completions(State(state), HeaderMap::new(), bytes).await
                    }
                    Api::Anthropic => {
                        // The batch request carries what the API's own request needs.
                        let mut headers = HeaderMap::new();
                        headers.insert(
                            "anthropic-version",
                            axum::http::HeaderValue::from_static("2023-06-01"),
                        );
                        super::anthropic::messages(State(state), headers, bytes).await
                    }
                };
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 16 << 20)
                    .await
                    .unwrap_or_default();
                let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if status == StatusCode::OK {
                    (custom_id, Ok(value))
                } else {
                    let message = value
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_owned();
                    (custom_id, Err(message))
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let b = batches.batches.get_mut(id)?;
    b.results.get_or_insert(results);
    Some(true)
}

/// `GET /v1/batches/{id}`.
pub(super) async fn get_openai(
    State(state): State<Arc<MockState>>,
    Path(id): Path<String>,
) -> Response {
    let Some(ended) = settle(&state, &id).await else {
        return not_found("batch");
    };
    let mut batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    if !ended {
        let Some(b) = batches.batches.get(&id) else {
            return not_found("batch");
        };
        return Json(openai_view(&id, b, "in_progress", None, None)).into_response();
    }
    // The output and error files, written once.
    let (output_id, error_id) = (format!("{id}-output"), format!("{id}-errors"));
    let Some(b) = batches.batches.get(&id) else {
        return not_found("batch");
    };
    let mut output = Vec::new();
    let mut errors = Vec::new();
    for (n, (custom_id, result)) in b.results.iter().flatten().enumerate() {
        let line = match result {
            Ok(body) => json!({"id": format!("batch_req_{n}"), "custom_id": custom_id,
                               "response": {"status_code": 200, "request_id": format!("req_{n}"), "body": body}, "error": null}),
            Err(message) => json!({"id": format!("batch_req_{n}"), "custom_id": custom_id,
                                   "response": {"status_code": 500, "request_id": format!("req_{n}"),
                                                "body": {"error": {"message": message, "type": "server_error"}}}, "error": null}),
        };
        let target = if result.is_ok() {
            &mut output
        } else {
            &mut errors
        };
        target.extend_from_slice(line.to_string().as_bytes());
        target.push(b'\n');
    }
    let view = openai_view(
        &id,
        b,
        "completed",
        (!output.is_empty()).then_some(output_id.as_str()),
        (!errors.is_empty()).then_some(error_id.as_str()),
    );
    if !batches.files.contains_key(&output_id) {
        batches.files.insert(output_id.clone(), output);
        batches.files.insert(error_id.clone(), errors);
        batches.keep(output_id);
        batches.keep(error_id);
    }
    Json(view).into_response()
}

/// `GET /v1/files/{id}/content`.
pub(super) async fn file_content(
    State(state): State<Arc<MockState>>,
    Path(id): Path<String>,
) -> Response {
    let batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    match batches.files.get(&id) {
        Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
        None => not_found("file"),
    }
}

/// `GET /v1/messages/batches/{id}`.
pub(super) async fn get_anthropic(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(ended) = settle(&state, &id).await else {
        return not_found("batch");
    };
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let Some(b) = batches.batches.get(&id) else {
        return not_found("batch");
    };
    let url = ended.then(|| format!("http://{host}/v1/messages/batches/{id}/results"));
    Json(anthropic_view(&id, b, url)).into_response()
}

/// `GET /v1/messages/batches/{id}/results`.
pub(super) async fn results_anthropic(
    State(state): State<Arc<MockState>>,
    Path(id): Path<String>,
) -> Response {
    let batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let Some(results) = batches.batches.get(&id).and_then(|b| b.results.as_ref()) else {
        return not_found("batch results");
    };
    let mut out = Vec::new();
    for (custom_id, result) in results {
        let line = match result {
            Ok(message) => {
                json!({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})
            }
            Err(message) => json!({"custom_id": custom_id, "result": {"type": "errored",
                                   "error": {"type": "error", "error": {"type": "api_error", "message": message}}}}),
        };
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    (StatusCode::OK, out).into_response()
}
