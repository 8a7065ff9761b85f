//! Exact-match response cache for deterministic requests, in the state store (Redis shared by
//! every replica, or memory in embedded mode).
//!
//! The key is a SHA-256 of everything that determines the answer: provider, model, system and
//! user prompt, `max_tokens` and temperature. Only requests at or below `cache.max_temperature`
//! (0 by default) are cached. A hit answers without a provider call, a rate-limit wait or spend;
//! its step record says `cached: true`. Cache errors never fail a call: it just goes to the
//! provider.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::CachePlan;
use crate::provider::{ChatRequest, ChatResponse};
use crate::state::StateStore;
use crate::telemetry::metrics::Metrics;

pub struct ResponseCache {
    plan: CachePlan,
    state: StateStore,
    metrics: Arc<Metrics>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    content: String,
    input_tokens: u64,
    output_tokens: u64,
}

impl ResponseCache {
    pub fn new(plan: CachePlan, state: StateStore, metrics: Arc<Metrics>) -> Self {
        Self {
            plan,
            state,
            metrics,
        }
    }

    /// The cache key of `tenant`'s request to `provider`, or `None` when it is not cacheable.
    /// The tenant is part of the key unless `cache.scope: global`: one tenant's answers (and
    /// their timing) never reach another by default.
    pub fn key(&self, tenant: &str, provider: &str, request: &ChatRequest) -> Option<String> {
        if request.temperature > self.plan.max_temperature {
            return None;
        }
        let parts = [
            if self.plan.global { "" } else { tenant },
            provider,
            &request.model,
            request.system.as_deref().unwrap_or_default(),
            &request.user,
            &request.max_tokens.to_string(),
            &request.temperature.to_string(),
        ];
        Some(crate::digest::of_parts(&parts, 32))
    }

    pub async fn get(&self, key: &str) -> Option<ChatResponse> {
        let found = match self.state.cache_get(key).await {
            Ok(found) => found.and_then(|bytes| serde_json::from_slice::<Stored>(&bytes).ok()),
            Err(e) => {
                tracing::debug!(error = %e, "response cache unavailable");
                None
            }
        };
        let result = if found.is_some() { "hit" } else { "miss" };
        self.metrics
            .cache_requests
            .with_label_values(&[result])
            .inc();
        found.map(|s| ChatResponse {
            content: s.content,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            ..ChatResponse::default()
        })
    }

    pub async fn put(&self, key: &str, response: &ChatResponse) {
        let stored = Stored {
            content: response.content.clone(),
            input_tokens: response.input_tokens,
            output_tokens: response.output_tokens,
        };
        let Ok(bytes) = serde_json::to_vec(&stored) else {
            return;
        };
        if let Err(e) = self.state.cache_put(key, bytes.into(), self.plan.ttl).await {
            tracing::debug!(error = %e, "could not store a response in the cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn request(user: &str, temperature: f64) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            system: Some("s".into()),
            user: user.into(),
            max_tokens: 10,
            temperature,
            prompt: None,
            flex: false,
        }
    }

    #[tokio::test]
    async fn a_deterministic_request_is_answered_from_the_cache() {
        let cache = ResponseCache::new(
            CachePlan {
                ttl: std::time::Duration::from_secs(60),
                max_temperature: 0.0,
                global: false,
            },
            StateStore::from(MemoryStore::new(10)),
            Metrics::new().unwrap(),
        );
        assert!(
            cache.key("t", "p", &request("hi", 0.7)).is_none(),
            "sampled requests are not cached"
        );
        let key = cache.key("t", "p", &request("hi", 0.0)).unwrap();
        assert_ne!(
            Some(&key),
            cache.key("t", "p", &request("hi!", 0.0)).as_ref()
        );
        assert_ne!(
            Some(&key),
            cache.key("t", "q", &request("hi", 0.0)).as_ref()
        );
        assert_ne!(
            Some(&key),
            cache.key("u", "p", &request("hi", 0.0)).as_ref(),
            "another tenant never shares the answer"
        );
        assert!(cache.get(&key).await.is_none());
        let answer = ChatResponse {
            content: "hello".into(),
            input_tokens: 3,
            output_tokens: 1,
            ..ChatResponse::default()
        };
        cache.put(&key, &answer).await;
        assert_eq!(cache.get(&key).await.unwrap().content, "hello");
    }

    fn cache(ttl: std::time::Duration, global: bool) -> ResponseCache {
        ResponseCache::new(
            CachePlan {
                ttl,
                max_temperature: 0.0,
                global,
            },
            StateStore::from(MemoryStore::new(10)),
            Metrics::new().unwrap(),
        )
    }

    #[test]
    fn a_global_cache_shares_answers_across_tenants() {
        let cache = cache(std::time::Duration::from_secs(60), true);
        assert_eq!(
            cache.key("t", "p", &request("hi", 0.0)),
            cache.key("u", "p", &request("hi", 0.0)),
        );
    }

    #[tokio::test]
    async fn a_cached_answer_expires_after_its_ttl() {
        let ttl = std::time::Duration::from_millis(100);
        let cache = cache(ttl, false);
        let key = cache.key("t", "p", &request("hi", 0.0)).unwrap();
        let answer = ChatResponse {
            content: "hello".into(),
            input_tokens: 3,
            output_tokens: 1,
            ..ChatResponse::default()
        };
        cache.put(&key, &answer).await;
        assert!(cache.get(&key).await.is_some());
        tokio::time::sleep(ttl * 2).await;
        assert!(cache.get(&key).await.is_none(), "expired after its TTL");
    }
}
