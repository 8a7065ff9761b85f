//! Anthropic Messages API (`POST {base_url}/v1/messages`).
//!
//! The system prompt goes in the top-level `system` field; a long one is sent as a text block
//! with `cache_control: {type: ephemeral}` so Anthropic's prompt cache serves it on later calls.
//! `usage` maps to input tokens (including cache writes and reads) and output tokens. Errors use
//! Anthropic's `{"type": "error", "error": {"type", "message"}}` shape: `rate_limit_error`
//! (429, `retry-after`), `overloaded_error` (529) and `api_error` (500) are retried;
//! authentication and permission errors are not; a prompt that is too long is a context-length
//! error.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::{parse_retry_after, ProviderError};
use super::{ChatRequest, ChatResponse};

/// The API version switchyard speaks (sent as `anthropic-version`).
pub const API_VERSION: &str = "2023-06-01";

#[derive(Clone)]
pub struct AnthropicClient {
    http: reqwest::Client,
    /// Parsed once: parsing the URL on every request showed in profiles.
    endpoint: reqwest::Url,
    /// `{base_url}/v1/messages/batches`.
    batches: String,
    api_key: Option<String>,
    max_response_bytes: usize,
    /// System prompts at least this long (characters) are marked for prompt caching.
    cache_system_min_chars: usize,
}

impl AnthropicClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        api_key: Option<String>,
        max_response_bytes: usize,
        cache_system_min_chars: usize,
    ) -> anyhow::Result<Self> {
        let endpoint = super::endpoint(base_url, "/v1/messages")?;
        Ok(Self {
            http,
            endpoint,
            batches: format!("{}/v1/messages/batches", base_url.trim_end_matches('/')),
            api_key,
            max_response_bytes,
            cache_system_min_chars,
        })
    }

    /// One attempt, bounded by `timeout` from send to the last body byte.
    pub async fn chat(
        &self,
        request: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatResponse, ProviderError> {
        match tokio::time::timeout(timeout, self.attempt(request)).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout(timeout)),
        }
    }

    fn body(&self, request: &ChatRequest) -> Value {
        let mut body = json!({
            "model": request.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature.min(1.0),
            "messages": [{"role": "user", "content": request.user}],
        });
        if let Some(system) = &request.system {
            body["system"] = if system.chars().count() >= self.cache_system_min_chars {
                json!([{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}])
            } else {
                json!(system)
            };
        }
        body
    }

    /// Sends with the API version and key, reads a body of at most `max` bytes; a non-200 is
    /// classified.
    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
        max: usize,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut builder = builder.header("anthropic-version", API_VERSION);
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key);
        }
        let mut response = builder.send().await.map_err(super::transport_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let bytes = super::read_body(&mut response, max).await?;
        if status == 200 {
            return Ok(bytes);
        }
        Err(classify_status(status, retry_after, &bytes))
    }

    /// Creates a Message Batch of the requests (`POST /v1/messages/batches`).
    pub async fn batch_submit(&self, items: &[super::BatchItem]) -> Result<String, ProviderError> {
        let requests: Vec<Value> = items
            .iter()
            .map(|item| json!({"custom_id": item.custom_id, "params": self.body(&item.request)}))
            .collect();
        let bytes = self
            .send(
                self.http
                    .post(&self.batches)
                    .json(&json!({"requests": requests})),
                self.max_response_bytes,
            )
            .await?;
        let batch: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::InvalidResponse(format!("body is not JSON: {e}")))?;
        batch
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::InvalidResponse("no batch id in the response".into()))
    }

    /// The batch's answers once its processing ended (from its `results_url`).
    pub async fn batch_poll(
        &self,
        id: &str,
    ) -> Result<Option<Vec<super::BatchAnswer>>, ProviderError> {
        let bytes = self
            .send(
                self.http.get(format!("{}/{id}", self.batches)),
                self.max_response_bytes,
            )
            .await?;
        let batch: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::InvalidResponse(format!("body is not JSON: {e}")))?;
        if batch.get("processing_status").and_then(Value::as_str) != Some("ended") {
            return Ok(None);
        }
        let Some(url) = batch.get("results_url").and_then(Value::as_str) else {
            return Ok(Some(Vec::new()));
        };
        // A batch's results hold every answer of the batch.
        let max = self.max_response_bytes.max(super::BATCH_RESULTS_MAX);
        let results = self.send(self.http.get(url), max).await?;
        let mut answers = Vec::new();
        for line in results.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(line) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let Some(custom_id) = line.get("custom_id").and_then(Value::as_str) else {
                continue;
            };
            let answer = match line.pointer("/result/type").and_then(Value::as_str) {
                Some("succeeded") => {
                    let message = line.pointer("/result/message").cloned().unwrap_or_default();
                    let bytes = serde_json::to_vec(&message).unwrap_or_default();
                    parse_success(&bytes)
                        .map(|mut r| {
                            r.batch = true;
                            r
                        })
                        .map_err(|e| e.to_string())
                }
                other => Err(line
                    .pointer("/result/error/error/message")
                    .and_then(Value::as_str)
                    .map_or_else(
                        || format!("the batch request {}", other.unwrap_or("has no result")),
                        str::to_owned,
                    )),
            };
            answers.push((custom_id.to_owned(), answer));
        }
        Ok(Some(answers))
    }

    async fn attempt(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let builder = self
            .http
            .post(self.endpoint.clone())
            .json(&self.body(request));
        parse_success(&self.send(builder, self.max_response_bytes).await?)
    }
}

/// The parts of a Messages API answer switchyard reads, deserialized without a `Value` tree of
/// the whole response. Every field is lenient: one missing, null or of an unexpected type
/// reads as absent.
#[derive(Deserialize, Default)]
struct Answer {
    #[serde(default, deserialize_with = "super::lenient_objects")]
    content: Option<Vec<Option<Block>>>,
    #[serde(default, deserialize_with = "super::lenient_object")]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(default, rename = "type", deserialize_with = "super::lenient")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    text: Option<String>,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default, deserialize_with = "super::lenient")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient")]
    cache_read_input_tokens: Option<u64>,
}

fn parse_success(bytes: &[u8]) -> Result<ChatResponse, ProviderError> {
    let body: Answer = super::decode_answer(bytes)?;
    let blocks = body.content.ok_or_else(|| {
        ProviderError::InvalidResponse("no `content` array in the response".into())
    })?;
    let content: String = blocks
        .into_iter()
        .flatten()
        .filter(|b| b.kind.as_deref() == Some("text"))
        .filter_map(|b| b.text)
        .collect();
    let usage = body.usage.unwrap_or_default();
    let read = usage.cache_read_input_tokens.unwrap_or(0);
    let written = usage.cache_creation_input_tokens.unwrap_or(0);
    Ok(ChatResponse {
        content,
        input_tokens: usage.input_tokens.unwrap_or(0) + written + read,
        output_tokens: usage.output_tokens.unwrap_or(0),
        cache_read_tokens: read,
        cache_write_tokens: written,
        flex: false,
        batch: false,
    })
}

fn classify_status(status: u16, retry_after: Option<Duration>, bytes: &[u8]) -> ProviderError {
    let body: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let kind = body
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let message = match body.pointer("/error/message").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
    };
    match (status, kind) {
        (429, _) | (_, "rate_limit_error") => ProviderError::RateLimited {
            retry_after,
            message,
        },
        (401 | 403, _) | (_, "authentication_error" | "permission_error") => {
            ProviderError::Auth { status, message }
        }
        (400 | 413, _) if message.contains("prompt is too long") || kind == "request_too_large" => {
            ProviderError::ContextLength(message)
        }
        (408 | 409 | 500..=599, _) | (_, "overloaded_error" | "api_error") => {
            ProviderError::Server {
                status,
                retry_after,
                message,
            }
        }
        _ => ProviderError::BadRequest { status, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(system: Option<&str>) -> ChatRequest {
        ChatRequest {
            model: "claude-3-5-haiku-latest".into(),
            system: system.map(str::to_owned),
            user: "hello".into(),
            max_tokens: 64,
            temperature: 0.0,
            prompt: None,
            flex: false,
        }
    }

    fn client(cache_min: usize) -> AnthropicClient {
        let client =
            AnthropicClient::new(reqwest::Client::new(), "http://x", None, 1024, cache_min);
        client.unwrap_or_else(|e| unreachable!("a valid URL: {e}"))
    }

    #[test]
    fn an_answer_reads_like_a_json_pointer_would() {
        let answer = parse_success(br#"{"content":[null,{"type":"text","text":"hi "},["text","x"],{"type":"tool_use"},{"type":"text","text":"there"}],"usage":{"input_tokens":10,"output_tokens":2,"cache_creation_input_tokens":5,"cache_read_input_tokens":"7"}}"#).unwrap();
        assert_eq!(answer.content, "hi there");
        assert_eq!((answer.input_tokens, answer.output_tokens), (15, 2));
        assert_eq!(
            (answer.cache_write_tokens, answer.cache_read_tokens),
            (5, 0)
        );
        let odd =
            parse_success(br#"{"content":[{"type":"text","text":"ok"}],"usage":[1,2]}"#).unwrap();
        assert_eq!((odd.content.as_str(), odd.input_tokens), ("ok", 0));
        for missing in [r#"{"content":"hi"}"#, r#"["content"]"#, r#"{}"#] {
            let error = parse_success(missing.as_bytes()).unwrap_err().to_string();
            assert!(error.contains("no `content` array"), "{missing}: {error}");
        }
    }

    #[test]
    fn long_system_prompts_are_marked_for_caching() {
        let short = client(100).body(&request(Some("be brief")));
        assert_eq!(short["system"], "be brief");
        let long_text = "policy ".repeat(50);
        let long = client(100).body(&request(Some(&long_text)));
        assert_eq!(long["system"][0]["cache_control"]["type"], "ephemeral");
        assert_eq!(long["messages"][0]["role"], "user");
        assert_eq!(long["max_tokens"], 64);
    }

    #[test]
    fn reads_the_documented_response_and_usage() {
        let body = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hi there"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":100,"output_tokens":4}}"#;
        let r = parse_success(body).unwrap();
        assert_eq!(
            (r.content.as_str(), r.input_tokens, r.output_tokens),
            ("Hi there", 112, 4)
        );
    }

    #[test]
    fn maps_documented_error_types() {
        let e = |status, kind: &str, msg: &str| {
            let body =
                format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"{msg}"}}}}"#);
            classify_status(status, Some(Duration::from_secs(3)), body.as_bytes())
        };
        assert!(matches!(
            e(429, "rate_limit_error", "slow down"),
            ProviderError::RateLimited {
                retry_after: Some(_),
                ..
            }
        ));
        assert!(matches!(
            e(529, "overloaded_error", "Overloaded"),
            ProviderError::Server { status: 529, .. }
        ));
        assert!(matches!(
            e(401, "authentication_error", "invalid x-api-key"),
            ProviderError::Auth { .. }
        ));
        assert!(matches!(
            e(
                400,
                "invalid_request_error",
                "prompt is too long: 210000 tokens > 200000 maximum"
            ),
            ProviderError::ContextLength(_)
        ));
        assert!(matches!(
            e(400, "invalid_request_error", "max_tokens: field required"),
            ProviderError::BadRequest { .. }
        ));
    }
}
