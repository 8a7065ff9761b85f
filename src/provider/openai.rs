//! OpenAI-compatible chat completions (`POST {base_url}/chat/completions`).
//!
//! Only the common subset is used (`model`, `messages`, `max_tokens`, `temperature`), so the same
//! client works with OpenAI, vLLM, Ollama and llama.cpp servers; a missing `usage` is estimated.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::{parse_retry_after, ProviderError};
use super::{ChatRequest, ChatResponse};

#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    /// Parsed once: parsing the URL on every request showed in profiles.
    endpoint: reqwest::Url,
    /// `{base_url}/embeddings`.
    embeddings: String,
    /// `{base_url}` (files and batches live under it).
    base: String,
    api_key: Option<String>,
    max_response_bytes: usize,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    max_tokens: u32,
    temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'static str>,
}

impl OpenAiClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        api_key: Option<String>,
        max_response_bytes: usize,
    ) -> anyhow::Result<Self> {
        let endpoint = super::endpoint(base_url, "/chat/completions")?;
        Ok(Self {
            http,
            endpoint,
            embeddings: format!("{}/embeddings", base_url.trim_end_matches('/')),
            base: base_url.trim_end_matches('/').to_owned(),
            api_key,
            max_response_bytes,
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

    /// The embedding of `text` by `model` and the tokens it was billed for, bounded by
    /// `timeout` (`POST {base_url}/embeddings`).
    pub async fn embed(
        &self,
        model: &str,
        text: &str,
        timeout: Duration,
    ) -> Result<(Vec<f32>, u64), ProviderError> {
        let call = async {
            let body = serde_json::json!({"model": model, "input": text});
            let builder = self.http.post(&self.embeddings).json(&body);
            let body = json_of(&self.send(builder, self.max_response_bytes).await?)?;
            let vector: Vec<f32> = body
                .pointer("/data/0/embedding")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    ProviderError::InvalidResponse("no data[0].embedding in the response".into())
                })?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    ProviderError::InvalidResponse("an embedding value is not a number".into())
                })?;
            let tokens = body
                .pointer("/usage/prompt_tokens")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| crate::tokens::count(model, text));
            Ok((vector, tokens))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout(timeout)),
        }
    }

    fn body<'a>(request: &'a ChatRequest) -> Body<'a> {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = &request.system {
            messages.push(Message {
                role: "system",
                content: system,
            });
        }
        messages.push(Message {
            role: "user",
            content: &request.user,
        });
        Body {
            model: &request.model,
            messages,
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            service_tier: request.flex.then_some("flex"),
        }
    }

    /// Sends with the API key, reads a body of at most `max` bytes; a non-200 is classified.
    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
        max: usize,
    ) -> Result<Vec<u8>, ProviderError> {
        let builder = match &self.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        };
        let mut response = builder.send().await.map_err(super::transport_error)?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let bytes = super::read_body(&mut response, max).await?;
        if status == 200 {
            return Ok(bytes);
        }
        Err(classify_status(status, retry_after, &bytes))
    }

    /// Uploads the requests as a JSONL file (`POST /files`, purpose `batch`) and creates a
    /// batch over it (`POST /batches`, 24 h window).
    pub async fn batch_submit(&self, items: &[super::BatchItem]) -> Result<String, ProviderError> {
        let mut jsonl = Vec::new();
        for item in items {
            let line = serde_json::json!({
                "custom_id": item.custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": Self::body(&item.request),
            });
            serde_json::to_writer(&mut jsonl, &line)
                .map_err(|e| ProviderError::InvalidResponse(e.to_string()))?;
            jsonl.push(b'\n');
        }
        let boundary = format!("switchyard{:032x}", rand::random::<u128>());
        let mut form = Vec::with_capacity(jsonl.len() + 512);
        form.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").as_bytes(),
        );
        form.extend_from_slice(&jsonl);
        form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let upload = self
            .http
            .post(format!("{}/files", self.base))
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(form);
        let file: Value = json_of(&self.send(upload, self.max_response_bytes).await?)?;
        let file_id = text(&file, "/id")?;
        let create = self
            .http
            .post(format!("{}/batches", self.base))
            .json(&serde_json::json!({
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }));
        let batch: Value = json_of(&self.send(create, self.max_response_bytes).await?)?;
        text(&batch, "/id")
    }

    /// The batch's answers once it ended: the output file's answers and the error file's
    /// reasons; a request in neither (expired, cancelled) gets the batch's status as reason.
    pub async fn batch_poll(
        &self,
        id: &str,
    ) -> Result<Option<Vec<super::BatchAnswer>>, ProviderError> {
        let batch: Value = json_of(
            &self
                .send(
                    self.http.get(format!("{}/batches/{id}", self.base)),
                    self.max_response_bytes,
                )
                .await?,
        )?;
        let status = text(&batch, "/status")?;
        if !matches!(
            status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        ) {
            return Ok(None);
        }
        let mut answers = Vec::new();
        for field in ["/output_file_id", "/error_file_id"] {
            let Some(file) = batch.pointer(field).and_then(Value::as_str) else {
                continue;
            };
            let content = self
                // A batch's results hold every answer of the batch.
                .send(
                    self.http.get(format!("{}/files/{file}/content", self.base)),
                    self.max_response_bytes.max(super::BATCH_RESULTS_MAX),
                )
                .await?;
            for line in content.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(line) = serde_json::from_slice::<Value>(line) else {
                    continue;
                };
                let Some(custom_id) = line.get("custom_id").and_then(Value::as_str) else {
                    continue;
                };
                let status = line
                    .pointer("/response/status_code")
                    .and_then(Value::as_u64);
                let answer = match (status, line.pointer("/response/body")) {
                    (Some(200), Some(body)) => {
                        let bytes = serde_json::to_vec(body).unwrap_or_default();
                        parse_success(&bytes, &ChatRequest::default())
                            .map(|mut r| {
                                r.batch = true;
                                r
                            })
                            .map_err(|e| e.to_string())
                    }
                    _ => Err(line
                        .pointer("/response/body/error/message")
                        .or_else(|| line.pointer("/error/message"))
                        .and_then(Value::as_str)
                        .unwrap_or("the batch returned no answer for this request")
                        .to_owned()),
                };
                answers.push((custom_id.to_owned(), answer));
            }
        }
        if status != "completed" && answers.is_empty() {
            tracing::warn!(batch = %id, status = %status, "batch ended without answers");
        }
        Ok(Some(answers))
    }

    async fn attempt(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let builder = self
            .http
            .post(self.endpoint.clone())
            .json(&Self::body(request));
        let bytes = self.send(builder, self.max_response_bytes).await?;
        parse_success(&bytes, request)
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
    {
        return (ms >= 0.0)
            .then(|| Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX));
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, chrono::Utc::now())
}

/// The parts of a chat completion switchyard reads, deserialized without a `Value` tree of
/// the whole response. Every field is lenient: one missing, null or of an unexpected type
/// reads as absent, as with a JSON pointer, and the fallbacks below apply.
#[derive(Deserialize, Default)]
struct Completion {
    #[serde(default, deserialize_with = "super::lenient_objects")]
    choices: Option<Vec<Option<Choice>>>,
    #[serde(default, deserialize_with = "super::lenient_object")]
    usage: Option<Usage>,
    #[serde(default, deserialize_with = "super::lenient")]
    service_tier: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default, deserialize_with = "super::lenient_object")]
    message: Option<AnswerMessage>,
}

#[derive(Deserialize)]
struct AnswerMessage {
    #[serde(default, deserialize_with = "super::lenient")]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default, deserialize_with = "super::lenient")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient_object")]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default, deserialize_with = "super::lenient")]
    cached_tokens: Option<u64>,
}

fn parse_success(bytes: &[u8], request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
    let body: Completion = super::decode_answer(bytes)?;
    let content = body
        .choices
        .and_then(|choices| choices.into_iter().next().flatten())
        .and_then(|choice| choice.message)
        .and_then(|message| message.content)
        .ok_or_else(|| {
            ProviderError::InvalidResponse("no choices[0].message.content in the response".into())
        })?;
    let usage = body.usage;
    let usage = usage.as_ref();
    // A server that omits `usage` is billed at our own (never lower) count.
    let input_tokens = usage.and_then(|u| u.prompt_tokens).unwrap_or_else(|| {
        crate::tokens::prompt(&request.model, request.system.as_deref(), &request.user)
    });
    let output_tokens = usage
        .and_then(|u| u.completion_tokens)
        .unwrap_or_else(|| crate::tokens::count(&request.model, &content));
    Ok(ChatResponse {
        content,
        input_tokens,
        output_tokens,
        // Prompt tokens OpenAI served from its automatic prompt cache (billed at a discount).
        cache_read_tokens: usage
            .and_then(|u| u.prompt_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
        cache_write_tokens: 0,
        batch: false,
        // What the server says served it; a server that does not say served what was asked.
        flex: body
            .service_tier
            .map_or(request.flex, |tier| tier == "flex"),
    })
}

fn classify_status(status: u16, retry_after: Option<Duration>, bytes: &[u8]) -> ProviderError {
    let body: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let field = |name: &str| {
        body.pointer(&format!("/error/{name}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let message = match field("message") {
        "" => String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
        m => m.to_owned(),
    };
    let code = field("code");
    match status {
        429 => ProviderError::RateLimited {
            retry_after,
            message,
        },
        401 | 403 => ProviderError::Auth { status, message },
        400 if code == "context_length_exceeded" => ProviderError::ContextLength(message),
        400 if code == "content_filter" || field("type").contains("content_filter") => {
            ProviderError::ContentFilter(message)
        }
        408 | 409 | 500..=599 => ProviderError::Server {
            status,
            retry_after,
            message,
        },
        _ => ProviderError::BadRequest { status, message },
    }
}

fn json_of(bytes: &[u8]) -> Result<Value, ProviderError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ProviderError::InvalidResponse(format!("body is not JSON: {e}")))
}

fn text(value: &Value, pointer: &str) -> Result<String, ProviderError> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ProviderError::InvalidResponse(format!("no {pointer} in the response")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_like_a_json_pointer_would() {
        let request = ChatRequest {
            model: "gpt-4o-mini".into(),
            user: "hello there".into(),
            ..ChatRequest::default()
        };
        let read = |body: &str| parse_success(body.as_bytes(), &request);
        let full = read(r#"{"id":"x","choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}},"service_tier":"flex"}"#).unwrap();
        assert_eq!(
            (full.content.as_str(), full.input_tokens, full.output_tokens),
            ("hi", 12, 3)
        );
        assert_eq!(full.cache_read_tokens, 4);
        assert!(full.flex);
        // Odd shapes around the answer read as absent (our own token count stands in); a
        // second choice that is null does not spoil the first; the last of duplicate keys wins.
        for odd in [
            r#"{"choices":[{"message":{"content":"hi"}},null],"usage":"n/a"}"#,
            r#"{"choices":[{"message":{"content":"hi"}}],"usage":[10,5]}"#,
            r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1.5,"prompt_tokens_details":0}}"#,
            r#"{"usage":{"prompt_tokens":99},"usage":null,"choices":[{"message":{"content":"hi"}}]}"#,
        ] {
            let answer = read(odd).unwrap();
            assert_eq!(answer.content, "hi", "{odd}");
            assert_eq!(answer.cache_read_tokens, 0, "{odd}");
            assert_ne!(answer.input_tokens, 99, "{odd}");
            assert_ne!(answer.input_tokens, 10, "{odd}");
        }
        for missing in [
            r#"{"choices":[]}"#,
            r#"{"choices":[null,{"message":{"content":"hi"}}]}"#,
            r#"{"choices":[{"message":{"content":null}}]}"#,
            r#"{"choices":[{"message":["hi"]}]}"#,
            r#"[[{"message":{"content":"x"}}]]"#,
        ] {
            let error = read(missing).unwrap_err().to_string();
            assert!(
                error.contains("no choices[0].message.content"),
                "{missing}: {error}"
            );
        }
        assert!(read("not json")
            .unwrap_err()
            .to_string()
            .contains("body is not JSON"));
    }

    #[test]
    fn maps_documented_error_bodies() {
        let body = br#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        assert!(matches!(
            classify_status(400, None, body),
            ProviderError::ContextLength(_)
        ));
        let body = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert!(matches!(
            classify_status(401, None, body),
            ProviderError::Auth { status: 401, .. }
        ));
        let e = classify_status(429, Some(Duration::from_secs(2)), b"{}");
        assert_eq!(
            e.action(),
            super::super::errors::ErrorAction::RetrySameTarget {
                after: Some(Duration::from_secs(2))
            }
        );
        assert!(matches!(
            classify_status(503, None, b"oops"),
            ProviderError::Server { status: 503, .. }
        ));
    }

    #[test]
    fn reads_content_and_usage() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        let req = ChatRequest {
            model: "m".into(),
            system: None,
            user: "u".into(),
            max_tokens: 5,
            temperature: 0.0,
            prompt: None,
            flex: false,
        };
        let r = parse_success(body, &req).unwrap();
        assert_eq!(
            (r.content.as_str(), r.input_tokens, r.output_tokens),
            ("hi", 12, 3)
        );
    }
}
