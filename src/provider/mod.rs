//! LLM providers over HTTP: one pooled HTTP client, a client per configured provider (enum
//! dispatch), and the error taxonomy their failures map to ([`errors`]). What happens around a
//! call (cache, circuit, limits, retries, fallbacks) is [`crate::calls`].
//!
//! `kind: mock` providers are served by the built-in mock server ([`mock`]) on a loopback port
//! and reached through the same OpenAI-compatible client, so tests and the demo exercise the
//! real HTTP path.

pub mod anthropic;
pub mod errors;
pub mod mock;
pub mod openai;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Plan, ProviderKind, RetryPolicy, WireApi};
pub use errors::{ErrorAction, ProviderError};

/// One chat request, already rendered from its prompt.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub system: Option<String>,
    pub user: String,
    pub max_tokens: u32,
    pub temperature: f64,
    /// The prompt it was rendered from (`name@version`), for logs and metrics; not sent.
    pub prompt: Option<String>,
    /// Ask for OpenAI's flex tier (`service_tier: "flex"`).
    pub flex: bool,
}

impl ChatRequest {
    /// The request for `model` (its name, answer limit and temperature) with these messages.
    pub fn to(model: &crate::config::ModelPlan, system: &Option<String>, user: &str) -> Self {
        Self {
            model: model.model.clone(),
            system: system.clone(),
            user: user.to_owned(),
            max_tokens: model.max_tokens,
            temperature: model.temperature,
            prompt: None,
            flex: false,
        }
    }

    /// This request, rendered from the prompt named `prompt`.
    pub fn from_prompt(mut self, prompt: &str) -> Self {
        self.prompt = Some(prompt.to_owned());
        self
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChatResponse {
    pub content: String,
    /// Every prompt token, prompt-cache reads and writes included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Of `input_tokens`: read from the provider's prompt cache ...
    pub cache_read_tokens: u64,
    /// ... and written to it (each priced on its own).
    pub cache_write_tokens: u64,
    /// Served by OpenAI's flex tier (priced at the model's flex prices).
    pub flex: bool,
    /// Answered through the provider's batch API (priced at the model's batch prices).
    pub batch: bool,
}

/// The most bytes of a batch call's response (its results file holds every answer): room for
/// the largest batch a pipeline may send (`batch.max_requests`, at most 10,000) of long answers.
pub const BATCH_RESULTS_MAX: usize = 256 * 1024 * 1024;

/// One request of a batch, named by an id unique within it.
pub struct BatchItem {
    pub custom_id: String,
    pub request: ChatRequest,
}

/// What a provider's batch answered for one request: its answer, or why it has none.
pub type BatchAnswer = (String, Result<ChatResponse, String>);

/// Reads a response body, failing once it grows past `max` bytes (`limits.max_response_bytes`).
async fn read_body(response: &mut reqwest::Response, max: usize) -> Result<Vec<u8>, ProviderError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if bytes.len() + chunk.len() > max {
            return Err(ProviderError::InvalidResponse(format!(
                "response is larger than {max} bytes (limits.max_response_bytes)"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Transport failures: timeouts; failures to connect (nothing was sent); and everything else
/// (reset, truncated) as an interrupted exchange.
fn transport_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout(Duration::ZERO)
    } else if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else {
        ProviderError::Interrupted(e.to_string())
    }
}

/// Redirects are followed only within the same host (at most 5): reqwest drops
/// `Authorization` on a cross-host redirect, but not Anthropic's `x-api-key`, so an API key is
/// never sent to a host the config did not name.
fn same_host_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_host = attempt.previous().last().is_some_and(|prev| {
            prev.host_str() == attempt.url().host_str()
                && prev.port_or_known_default() == attempt.url().port_or_known_default()
        });
        if !same_host {
            attempt.stop()
        } else if attempt.previous().len() > 5 {
            attempt.error("more than 5 redirects")
        } else {
            attempt.follow()
        }
    })
}

#[derive(Clone)]
pub enum LlmProvider {
    OpenAi(openai::OpenAiClient),
    Anthropic(anthropic::AnthropicClient),
}

impl LlmProvider {
    pub async fn chat(
        &self,
        request: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatResponse, ProviderError> {
        match self {
            LlmProvider::OpenAi(client) => client.chat(request, timeout).await,
            LlmProvider::Anthropic(client) => client.chat(request, timeout).await,
        }
    }

    /// Submits `items` to the provider's batch API; the batch's id.
    pub async fn batch_submit(
        &self,
        items: &[BatchItem],
        timeout: Duration,
    ) -> Result<String, ProviderError> {
        let call = async {
            match self {
                LlmProvider::OpenAi(client) => client.batch_submit(items).await,
                LlmProvider::Anthropic(client) => client.batch_submit(items).await,
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(ProviderError::Timeout(timeout)))
    }

    /// A batch's answers once it has ended (`None` while it is still running). A request the
    /// batch did not answer (errored, expired, cancelled) has the reason instead.
    pub async fn batch_poll(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<Vec<BatchAnswer>>, ProviderError> {
        let call = async {
            match self {
                LlmProvider::OpenAi(client) => client.batch_poll(id).await,
                LlmProvider::Anthropic(client) => client.batch_poll(id).await,
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(ProviderError::Timeout(timeout)))
    }

    /// An embedding (OpenAI-compatible providers only) and the tokens it was billed for.
    pub async fn embed(
        &self,
        model: &str,
        text: &str,
        timeout: Duration,
    ) -> Result<(Vec<f32>, u64), ProviderError> {
        match self {
            LlmProvider::OpenAi(client) => client.embed(model, text, timeout).await,
            LlmProvider::Anthropic(_) => Err(ProviderError::InvalidResponse(
                "Anthropic has no embeddings endpoint".into(),
            )),
        }
    }
}

pub struct ProviderHandle {
    pub name: String,
    pub client: LlmProvider,
    pub retry: RetryPolicy,
}

/// Every provider of the plan, ready to call.
pub struct Providers {
    targets: BTreeMap<String, ProviderHandle>,
    /// Keeps the in-process mock servers running as long as the providers live.
    mock_servers: Vec<mock::MockServer>,
}

impl Providers {
    /// Builds the clients; starts a mock server for each `kind: mock` provider. Fails naming the
    /// field when a referenced API key variable is not set.
    pub async fn start(plan: &Plan) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .redirect(same_host_redirects())
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        let mut targets = BTreeMap::new();
        let mut mock_servers = Vec::new();
        for (name, provider) in &plan.providers {
            let key_of = |var: &Option<String>| match var {
                Some(var) => std::env::var(var).map(Some).map_err(|_| {
                    anyhow::anyhow!(
                        "providers.{name}.api_key_env: environment variable {var} is not set"
                    )
                }),
                None => Ok(None),
            };
            let max_body = plan.limits.max_response_bytes;
            let client = match &provider.kind {
                ProviderKind::OpenAi {
                    base_url,
                    api_key_env,
                } => LlmProvider::OpenAi(
                    openai::OpenAiClient::new(
                        http.clone(),
                        base_url,
                        key_of(api_key_env)?,
                        max_body,
                    )
                    .with_context(|| format!("providers.{name}.base_url"))?,
                ),
                ProviderKind::Anthropic {
                    base_url,
                    api_key_env,
                    cache_system_min_chars,
                } => LlmProvider::Anthropic(
                    anthropic::AnthropicClient::new(
                        http.clone(),
                        base_url,
                        key_of(api_key_env)?,
                        max_body,
                        *cache_system_min_chars,
                    )
                    .with_context(|| format!("providers.{name}.base_url"))?,
                ),
                ProviderKind::Mock(settings, api) => {
                    let server = mock::MockServer::start("127.0.0.1:0", settings.clone())
                        .await
                        .with_context(|| {
                            format!("starting the mock server for providers.{name}")
                        })?;
                    let addr = server.addr();
                    mock_servers.push(server);
                    match api {
                        WireApi::OpenAi => LlmProvider::OpenAi(openai::OpenAiClient::new(
                            http.clone(),
                            &format!("http://{addr}/v1"),
                            None,
                            max_body,
                        )?),
                        WireApi::Anthropic => {
                            LlmProvider::Anthropic(anthropic::AnthropicClient::new(
                                http.clone(),
                                &format!("http://{addr}"),
                                None,
                                max_body,
                                4096,
                            )?)
                        }
                    }
                }
            };
            targets.insert(
                name.clone(),
                ProviderHandle {
                    name: name.clone(),
                    client,
                    retry: provider.retry,
                },
            );
        }
        Ok(Self {
            targets,
            mock_servers,
        })
    }

    pub fn target(&self, provider: &str) -> Option<&ProviderHandle> {
        self.targets.get(provider)
    }

    /// Addresses of the in-process mock servers (for stats in tests and the demo).
    pub fn mock_servers(&self) -> impl Iterator<Item = &mock::MockServer> {
        self.mock_servers.iter()
    }
}

/// `base_url` (without its trailing `/`) joined with `path`, parsed once for every request.
fn endpoint(base_url: &str, path: &str) -> anyhow::Result<reqwest::Url> {
    let url = format!("{}{path}", base_url.trim_end_matches('/'));
    reqwest::Url::parse(&url).map_err(|e| {
        anyhow::anyhow!(
            "`{}` is not a valid URL: {e}",
            crate::config::redact_url(&url)
        )
    })
}

/// A provider's JSON answer decoded into `T`: straight from the bytes when it is an object
/// the derive reads, else through a `Value` (duplicate keys: the last wins). Anything but an
/// object reads as `T::default()` (every field absent), so the caller's "no ... in the
/// response" error names what is missing.
fn decode_answer<T: serde::de::DeserializeOwned + Default>(
    bytes: &[u8],
) -> Result<T, ProviderError> {
    if bytes.trim_ascii_start().first() == Some(&b'{') {
        if let Ok(answer) = serde_json::from_slice(bytes) {
            return Ok(answer);
        }
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ProviderError::InvalidResponse(format!("body is not JSON: {e}")))?;
    Ok(match value {
        serde_json::Value::Object(_) => serde_json::from_value(value).unwrap_or_default(),
        _ => T::default(),
    })
}

/// A leaf field (a number, a string) read leniently: one of an unexpected type reads as
/// absent, so the caller's fallback applies instead of failing the whole answer. Read as it
/// streams by, without a `Value` tree.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    deserializer.deserialize_any(Lenient::<T, Leaf>::new())
}

/// An object field read leniently: anything but an object is absent. `T`'s own fields are
/// lenient, so an object always reads as `T`.
fn lenient_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    deserializer.deserialize_any(Lenient::<T, Object>::new())
}

/// A list of objects read leniently: anything but a list is absent; an element that is not an
/// object is `None` in its place.
fn lenient_objects<'de, D, T>(deserializer: D) -> Result<Option<Vec<Option<T>>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    deserializer.deserialize_any(Lenient::<T, Objects>::new())
}

/// What a [`Lenient`] visitor reads: a leaf, an object, or a list of objects.
struct Leaf;
struct Object;
struct Objects;

/// Visits any JSON value and reads it as `Option<T>` (as `Option<Vec<Option<T>>>` for
/// [`Objects`]): a value of another shape is consumed and reads as `None`.
struct Lenient<T, Shape>(std::marker::PhantomData<(T, Shape)>);

impl<T, Shape> Lenient<T, Shape> {
    fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// One element of a lenient list: an object as `Some(T)`, anything else as `None`.
struct Element<T>(Option<T>);

impl<'de, T: serde::de::DeserializeOwned> serde::Deserialize<'de> for Element<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(Lenient::<T, Object>::new())
            .map(Element)
    }
}

/// Consumes the rest of a map or a list that reads as absent.
fn skip_map<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map
        .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
        .is_some()
    {}
    Ok(())
}

fn skip_seq<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The visits every shape shares: `null` is absent, and so is any scalar the shape does not
/// read itself.
macro_rules! absent {
    ($($visit:ident: $ty:ty),*) => {
        $(fn $visit<E: serde::de::Error>(self, _: $ty) -> Result<Self::Value, E> {
            Ok(None)
        })*
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
    };
}

impl<'de, T: serde::de::DeserializeOwned> serde::de::Visitor<'de> for Lenient<T, Leaf> {
    type Value = Option<T>;

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(T::deserialize(serde::de::value::BoolDeserializer::<E>::new(v)).ok())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(T::deserialize(serde::de::value::I64Deserializer::<E>::new(v)).ok())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(T::deserialize(serde::de::value::U64Deserializer::<E>::new(v)).ok())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(T::deserialize(serde::de::value::F64Deserializer::<E>::new(v)).ok())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(T::deserialize(serde::de::value::StrDeserializer::<E>::new(v)).ok())
    }
    absent!();

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| None)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| None)
    }
}

impl<'de, T: serde::de::DeserializeOwned> serde::de::Visitor<'de> for Lenient<T, Object> {
    type Value = Option<T>;

    absent!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| None)
    }
}

impl<'de, T: serde::de::DeserializeOwned> serde::de::Visitor<'de> for Lenient<T, Objects> {
    type Value = Option<Vec<Option<T>>>;

    absent!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| None)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
        while let Some(Element(item)) = seq.next_element::<Element<T>>()? {
            items.push(item);
        }
        Ok(Some(items))
    }
}
