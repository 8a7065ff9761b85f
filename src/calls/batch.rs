//! A job's calls in a provider batch round: the answers its earlier rounds got, the requests
//! whose batch request failed (these go through the normal retry and fallback path), and the
//! requests this run still needs (collected, then sent in the next batch).
//!
//! A job that runs in batch mode is run again from the start after each round: steps that make
//! no call are cheap and deterministic, and every call already answered is answered from the
//! round's answers, so the job reaches the call it still needs with the same prompts.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::provider::{ChatRequest, ChatResponse};

/// A call this run needs answered by a batch.
#[derive(Debug, Clone)]
pub struct BatchNeed {
    /// Of the alias and the request: the same call in the next run has the same key.
    pub key: String,
    pub alias: String,
    pub request: ChatRequest,
    pub tenant: String,
    /// What the tenant's budget holds for it until its answer is priced (USD), and the day
    /// and month budget keys it is held on.
    pub reserved: f64,
    pub reserved_in: Option<(String, String)>,
}

#[derive(Debug, Default)]
pub struct BatchRound {
    pub answers: HashMap<String, ChatResponse>,
    /// Requests their batch could not answer: called synchronously, with retries and
    /// fallbacks.
    pub failed: HashSet<String>,
    pub needed: Mutex<Vec<BatchNeed>>,
}

impl BatchRound {
    pub fn needed(&self) -> Vec<BatchNeed> {
        self.needed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn need(&self, need: BatchNeed) {
        let mut needed = self.needed.lock().unwrap_or_else(|e| e.into_inner());
        if !needed.iter().any(|n| n.key == need.key) {
            needed.push(need);
        }
    }
}

/// The key of a call to `alias` with `request`.
pub fn key(alias: &str, request: &ChatRequest) -> String {
    let parts = [
        alias,
        &request.model,
        request.system.as_deref().unwrap_or_default(),
        &request.user,
        &request.max_tokens.to_string(),
        &request.temperature.to_string(),
    ];
    crate::digest::of_parts(&parts, 16)
}
