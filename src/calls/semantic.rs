//! Semantic cache: a generate step's answer to a question serves later paraphrases of it.
//!
//! The question (one input field) is embedded by the step's `embedding_model`; the rest of the
//! rendered prompt must match exactly, so an index holds the entries of one tenant, pipeline,
//! step, model and prompt, with the question cut out of the prompt (never shared across
//! tenants). A lookup answers from the most similar stored question when its cosine similarity
//! is at least the threshold (0.95 by default: a false hit serves a wrong answer, a miss only
//! costs a call).
//!
//! Where the index lives: every entry is written to the state store (a Redis sorted set per
//! index, scored by when it was added, trimmed to `max_entries` and `ttl`), and each replica
//! keeps an in-process copy of the indexes it uses, brought up to date from the store before
//! each lookup (one round trip fetching only what was added since). Similarity is an exact
//! scan of at most `max_entries` vectors, a few hundred microseconds at the default 2,000: no
//! approximate index is needed at that size, nothing is lost to recall, and it needs nothing
//! beyond the Redis every deployment already runs (Redis' vector search, where a deployment
//! has it, would move the scan into Redis; most managed Redis offerings lack it).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::SemanticCachePlan;
use crate::provider::ChatResponse;
use crate::state::StateStore;
use crate::telemetry::metrics::Metrics;

/// Indexes one replica mirrors at most (the least recently used go first) ...
const MAX_LOCAL_INDEXES: usize = 1_000;
/// ... and entries in all of them (with 1,536-dimension vectors, about 1 GiB).
const MAX_LOCAL_ENTRIES: usize = 100_000;
/// Entries fetched from the store per round trip while catching up.
const SYNC_BATCH: usize = 500;
/// How far back each catch-up looks again, so an entry another replica stamped a little
/// earlier (clock skew, a slow write) is not missed; ids keep it from counting twice.
const LOOKBACK_MS: i64 = 2_000;

#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    /// The vector as little-endian f32, base64.
    v: String,
    content: String,
    input_tokens: u64,
    output_tokens: u64,
}

struct Entry {
    id: String,
    vector: Vec<f32>,
    content: String,
    input_tokens: u64,
    output_tokens: u64,
    at_ms: i64,
}

#[derive(Default)]
struct Local {
    entries: VecDeque<Entry>,
    ids: HashSet<String>,
    /// The newest entry fetched from the store (catch-ups start a little before it).
    fetched_ms: i64,
    used: u64,
}

/// A stored answer close enough to the question.
pub struct Hit {
    pub response: ChatResponse,
    pub similarity: f64,
}

pub struct SemanticCache {
    state: StateStore,
    metrics: Arc<Metrics>,
    local: Mutex<(HashMap<String, Local>, u64)>,
}

impl SemanticCache {
    pub fn new(state: StateStore, metrics: Arc<Metrics>) -> Self {
        Self {
            state,
            metrics,
            local: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// The index of a tenant's step: everything but the question must be equal to share it.
    pub fn index(tenant: &str, parts: &[&str]) -> String {
        format!("{tenant}:{}", crate::digest::of_parts(parts, 16))
    }

    /// The most similar stored answer at or above the threshold, if any. Store errors are a
    /// miss: the step asks its model.
    pub async fn lookup(
        &self,
        index: &str,
        vector: &[f32],
        plan: &SemanticCachePlan,
    ) -> Option<Hit> {
        self.sync(index, plan).await;
        let now = chrono::Utc::now().timestamp_millis();
        let oldest = now - i64::try_from(plan.ttl.as_millis()).unwrap_or(i64::MAX);
        let best = {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            let (indexes, clock) = &mut *local;
            *clock += 1;
            let tick = *clock;
            indexes.get_mut(index).and_then(|l| {
                l.used = tick;
                l.entries
                    .iter()
                    .filter(|e| e.at_ms >= oldest)
                    .map(|e| (cosine(&e.vector, vector), e))
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(similarity, e)| {
                        (
                            similarity,
                            ChatResponse {
                                content: e.content.clone(),
                                input_tokens: e.input_tokens,
                                output_tokens: e.output_tokens,
                                ..ChatResponse::default()
                            },
                        )
                    })
            })
        };
        if let Some((similarity, _)) = &best {
            self.metrics.semantic_similarity.observe(*similarity);
        }
        let hit = best
            .filter(|(similarity, _)| *similarity >= plan.threshold)
            .map(|(similarity, response)| Hit {
                response,
                similarity,
            });
        let result = if hit.is_some() { "hit" } else { "miss" };
        self.metrics
            .semantic_cache_requests
            .with_label_values(&[result])
            .inc();
        hit
    }

    /// Stores the answer to the question embedded as `vector`.
    pub async fn insert(
        &self,
        index: &str,
        vector: &[f32],
        response: &ChatResponse,
        plan: &SemanticCachePlan,
    ) {
        let at_ms = chrono::Utc::now().timestamp_millis();
        let id = format!("{:032x}", rand::random::<u128>());
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        let stored = Stored {
            id: id.clone(),
            v: base64::engine::general_purpose::STANDARD.encode(bytes),
            content: response.content.clone(),
            input_tokens: response.input_tokens,
            output_tokens: response.output_tokens,
        };
        let Ok(encoded) = serde_json::to_vec(&stored) else {
            return;
        };
        if let Err(e) = self
            .state
            .index_add(
                index,
                at_ms,
                bytes::Bytes::from(encoded),
                plan.max_entries,
                plan.ttl,
            )
            .await
        {
            tracing::debug!(error = %e, "semantic cache: could not store an answer");
            return;
        }
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = local.0.get_mut(index) {
            push(
                l,
                Entry {
                    id,
                    vector: vector.to_vec(),
                    content: response.content.clone(),
                    input_tokens: response.input_tokens,
                    output_tokens: response.output_tokens,
                    at_ms,
                },
                plan.max_entries,
            );
        }
    }

    /// Brings the local copy of `index` up to date with what other replicas added.
    async fn sync(&self, index: &str, plan: &SemanticCachePlan) {
        let from = {
            let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            local
                .0
                .get(index)
                .map_or(0, |l| l.fetched_ms.saturating_sub(LOOKBACK_MS))
        };
        let mut from = from;
        let mut fetched = Vec::new();
        // At most max_entries are kept, so this many are ever worth fetching.
        for _ in 0..=(plan.max_entries / SYNC_BATCH) {
            match self.state.index_since(index, from, SYNC_BATCH).await {
                Ok(batch) => {
                    let done = batch.len() < SYNC_BATCH;
                    if let Some((_, last)) = batch.last() {
                        from = *last;
                    }
                    fetched.extend(batch);
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "semantic cache: could not read the index");
                    break;
                }
            }
        }
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let (indexes, _) = &mut *local;
        if !indexes.contains_key(index) && indexes.len() >= MAX_LOCAL_INDEXES {
            if let Some(coldest) = indexes
                .iter()
                .min_by_key(|(_, l)| l.used)
                .map(|(k, _)| k.clone())
            {
                indexes.remove(&coldest);
            }
        }
        // Bounded in total: the coldest other indexes go until the entries fit.
        let mut total: usize = indexes.values().map(|l| l.entries.len()).sum();
        while total + fetched.len() > MAX_LOCAL_ENTRIES {
            let Some(coldest) = indexes
                .iter()
                .filter(|(k, _)| k.as_str() != index)
                .min_by_key(|(_, l)| l.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            total -= indexes.remove(&coldest).map_or(0, |l| l.entries.len());
        }
        let l = indexes.entry(index.to_owned()).or_default();
        for (bytes, score) in fetched {
            l.fetched_ms = l.fetched_ms.max(score);
            let Ok(stored) = serde_json::from_slice::<Stored>(&bytes) else {
                continue;
            };
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(&stored.v) else {
                continue;
            };
            let vector: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            push(
                l,
                Entry {
                    id: stored.id,
                    vector,
                    content: stored.content,
                    input_tokens: stored.input_tokens,
                    output_tokens: stored.output_tokens,
                    at_ms: score,
                },
                plan.max_entries,
            );
        }
    }
}

fn push(local: &mut Local, entry: Entry, max: usize) {
    if !local.ids.insert(entry.id.clone()) {
        return;
    }
    local.entries.push_back(entry);
    while local.entries.len() > max.max(1) {
        if let Some(old) = local.entries.pop_front() {
            local.ids.remove(&old.id);
        }
    }
}

/// Cosine similarity (vectors of different lengths, or a zero vector: 0).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    let similarity = dot / (na.sqrt() * nb.sqrt());
    // A vector with values out of range never matches.
    if similarity.is_finite() {
        similarity
    } else {
        0.0
    }
}
