//! The mock's OpenAI-compatible `/v1/embeddings`: deterministic vectors in which paraphrases
//! are close and questions that differ in meaning are not.
//!
//! A text becomes its content words after a normalisation a small embedding model learns:
//! lower case, contractions and phrasal verbs folded into one word (`turn on` -> `enable`),
//! synonyms onto one (`can I`, `how do I`, `how to` -> `how`), filler dropped. A negation
//! (`not`, `never`, `no`) marks the word after it, so "enable" and "do not enable" differ.
//! Features are the words (weight 1) and each ordered pair of neighbours (weight 0.8, so "USD
//! to EUR" and "EUR to USD" differ), sign-hashed into 256 dimensions and scaled to unit length.
//! Cosine similarity of two texts with the same content words in the same order is 1.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::MockState;

/// Dimensions of the mock's vectors.
pub const DIMENSIONS: usize = 256;
const PAIR_WEIGHT: f32 = 0.8;

/// Phrases folded into one word before the text is split (longest first where they overlap).
const PHRASES: &[(&str, &str)] = &[
    ("two-factor", "2fa"),
    ("two factor", "2fa"),
    ("multi-factor", "2fa"),
    ("multi factor", "2fa"),
    ("turn on", "enable"),
    ("switch on", "enable"),
    ("turn off", "disable"),
    ("switch off", "disable"),
    ("log in", "login"),
    ("sign in", "login"),
    ("log into", "login"),
    ("sign into", "login"),
    ("log out", "logout"),
    ("sign out", "logout"),
    ("sign up", "register"),
    ("set up", "configure"),
    ("how do i", "how"),
    ("how can i", "how"),
    ("how should i", "how"),
    ("how would i", "how"),
    ("how to", "how"),
    ("what is the way to", "how"),
    ("is it possible to", "how"),
    ("can i", "how"),
    ("e-mail", "email"),
    ("don't", "do not"),
    ("doesn't", "does not"),
    ("can't", "can not"),
    ("cannot", "can not"),
    ("won't", "will not"),
    ("isn't", "is not"),
    ("aren't", "are not"),
    ("shouldn't", "should not"),
];

/// Single words mapped onto the one the model treats as the same.
const SYNONYMS: &[(&str, &str)] = &[
    ("activate", "enable"),
    ("switch", "change"),
    ("modify", "change"),
    ("update", "change"),
    ("deactivate", "disable"),
    ("remove", "delete"),
    ("erase", "delete"),
    ("cancel", "cancel"),
    ("terminate", "cancel"),
    ("purchase", "buy"),
    ("order", "order"),
    ("refund", "refund"),
    ("reimbursement", "refund"),
    ("money", "refund"),
    ("parcel", "package"),
    ("shipment", "package"),
    ("delivery", "package"),
    ("passcode", "password"),
    ("pwd", "password"),
    ("reset", "reset"),
    ("recover", "reset"),
    ("forgot", "reset"),
    ("forgotten", "reset"),
    ("bill", "invoice"),
    ("receipt", "invoice"),
    ("subscription", "plan"),
    ("membership", "plan"),
    ("upgrade", "upgrade"),
    ("downgrade", "downgrade"),
    ("account", "account"),
    ("profile", "account"),
    ("phone", "phone"),
    ("mobile", "phone"),
    ("cellphone", "phone"),
    ("address", "address"),
    ("where's", "where"),
    ("whereabouts", "where"),
    ("track", "where"),
    ("tracking", "where"),
    ("locate", "where"),
    ("begin", "start"),
    ("commence", "start"),
    ("end", "stop"),
    ("halt", "stop"),
    ("alter", "change"),
    ("get", "get"),
    ("obtain", "get"),
    ("receive", "get"),
    ("dollars", "usd"),
    ("euros", "eur"),
    ("dollar", "usd"),
    ("euro", "eur"),
];

/// Words that carry no meaning a cache should tell apart.
const FILLER: &[&str] = &[
    "a",
    "an",
    "the",
    "i",
    "me",
    "my",
    "mine",
    "we",
    "our",
    "you",
    "your",
    "please",
    "pls",
    "kindly",
    "could",
    "would",
    "can",
    "will",
    "shall",
    "do",
    "does",
    "did",
    "is",
    "are",
    "am",
    "be",
    "to",
    "of",
    "for",
    "in",
    "on",
    "at",
    "it",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "some",
    "any",
    "just",
    "really",
    "hi",
    "hello",
    "hey",
    "thanks",
    "thank",
    "help",
    "want",
    "need",
    "like",
    "tell",
    "know",
    "let",
    "show",
    "way",
    "with",
    "and",
    "so",
    "about",
    "into",
    "onto",
    "from",
    "by",
    "as",
    "us",
    "now",
    "currently",
    "possible",
    "able",
    "someone",
    "anyone",
    "explain",
    "steps",
    "guide",
    "question",
    "quick",
    "again",
];

const NEGATIONS: &[&str] = &["not", "never", "no", "without"];

/// The content words of `text`, normalised as the module docs say.
pub fn words(text: &str) -> Vec<String> {
    let mut lowered = format!(
        " {} ",
        text.to_lowercase()
            .replace(['?', '!', '.', ',', ';', ':', '"'], " ")
    );
    for (phrase, word) in PHRASES {
        lowered = lowered.replace(&format!(" {phrase} "), &format!(" {word} "));
        // Overlapping phrases ("how do i turn on"): a second pass catches the neighbour.
        lowered = lowered.replace(&format!(" {phrase} "), &format!(" {word} "));
    }
    let mut words = Vec::new();
    let mut negate = false;
    for raw in lowered.split(|c: char| !(c.is_alphanumeric() || c == '\'')) {
        let raw = raw.trim_matches('\'');
        if raw.is_empty() {
            continue;
        }
        if NEGATIONS.contains(&raw) {
            negate = true;
            continue;
        }
        if FILLER.contains(&raw) {
            continue;
        }
        let word = SYNONYMS
            .iter()
            .find(|(from, _)| *from == raw)
            .map_or(raw, |(_, to)| to);
        // Plurals fold onto the singular.
        let word = word
            .strip_suffix('s')
            .filter(|w| w.len() > 3 && !w.ends_with('s'))
            .unwrap_or(word);
        words.push(if negate {
            format!("not_{word}")
        } else {
            word.to_owned()
        });
        negate = false;
    }
    words
}

/// The unit vector of `text`.
pub fn embed(text: &str) -> Vec<f32> {
    let words = words(text);
    let mut v = vec![0.0f32; DIMENSIONS];
    let mut add = |feature: &str, weight: f32| {
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::digest(feature.as_bytes());
        let index = usize::from(u16::from_be_bytes([digest[0], digest[1]])) % DIMENSIONS;
        let sign = if digest[2] & 1 == 0 { 1.0 } else { -1.0 };
        v[index] += sign * weight;
    };
    for word in &words {
        add(word, 1.0);
    }
    for pair in words.windows(2) {
        add(&format!("{} {}", pair[0], pair[1]), PAIR_WEIGHT);
    }
    if words.is_empty() {
        add("", 1.0);
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    (status, Json(body)).into_response()
}

/// `POST /v1/embeddings`: `{model, input}` (a string or a list of strings).
pub(super) async fn embeddings(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        state.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
        );
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if model.is_empty() || inputs.is_empty() {
        state.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::BAD_REQUEST,
            "you must provide a model and a non-empty input",
        );
    }
    let tokens: u64 = inputs.iter().map(|i| crate::tokens::typical(i)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": embed(text)}))
        .collect();
    state.stats.ok.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &str, b: &str) -> f32 {
        embed(a).iter().zip(embed(b)).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn paraphrases_are_close_and_opposites_are_not() {
        assert!(
            cosine(
                "How do I enable two-factor authentication?",
                "How can I turn on 2FA authentication"
            ) > 0.99
        );
        assert!(
            cosine(
                "How do I enable two-factor authentication?",
                "How do I disable two-factor authentication?"
            ) < 0.8
        );
        assert!(cosine("Convert 100 USD to EUR", "Convert 100 EUR to USD") < 0.9);
        assert!(cosine("Should I enable backups?", "Should I not enable backups?") < 0.8);
        assert_eq!(
            words("Can't log in to my account!"),
            ["not_login", "account"]
        );
    }
}
