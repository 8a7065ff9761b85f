//! Token counts for reservations against token limits and budgets: exact for models an OpenAI
//! tokenizer is known for (o200k for GPT-4o, GPT-4.1, GPT-5 and the o-series; cl100k for GPT-4
//! and GPT-3.5), and otherwise an upper bound, one token per UTF-8 byte, which no byte-level BPE
//! tokenizer can exceed. A reservation made from these never undercounts a prompt, whatever its
//! script (a CJK character is one or more tokens, not a quarter of one).
//!
//! The tables load once per process, on first use.

use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

/// What the chat format adds per message (role and separators), as OpenAI documents it.
const PER_MESSAGE: u64 = 4;
/// What every request adds (the reply's priming).
const PER_REQUEST: u64 = 3;

/// The exact tokenizer of `model`, when one is known.
fn exact(model: &str) -> Option<&'static CoreBPE> {
    match get_tokenizer(model)? {
        Tokenizer::O200kBase | Tokenizer::O200kHarmony => Some(tiktoken_rs::o200k_base_singleton()),
        Tokenizer::Cl100kBase => Some(tiktoken_rs::cl100k_base_singleton()),
        _ => None,
    }
}

/// The tokenizer that splits text for `model`: its own when known, else GPT-4o's (o200k).
pub fn encoder(model: &str) -> &'static CoreBPE {
    exact(model).unwrap_or_else(tiktoken_rs::o200k_base_singleton)
}

/// At least as many tokens as `model` counts for `text`.
pub fn count(model: &str, text: &str) -> u64 {
    match exact(model) {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => text.len() as u64,
    }
}

/// At least as many prompt tokens as `model` counts for a system and a user message.
pub fn prompt(model: &str, system: Option<&str>, user: &str) -> u64 {
    let messages = 1 + u64::from(system.is_some());
    count(model, user)
        + system.map_or(0, |s| count(model, s))
        + messages * PER_MESSAGE
        + PER_REQUEST
}

/// A realistic count for text whatever the model (o200k), for the mock provider's `usage`.
pub fn typical(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjk_text_is_counted_as_the_model_counts_it_not_as_a_quarter_token_per_char() {
        let text = "我上个月的账单被重复收费了，请退还其中一笔付款。谢谢！";
        let chars = text.chars().count() as u64;
        let exact = count("gpt-4o-mini", text);
        assert!(exact >= chars / 2, "{exact} tokens for {chars} characters");
        assert!(
            count("claude-3-5-haiku", text) >= exact,
            "the bound is never below"
        );
        assert_eq!(count("claude-3-5-haiku", text), text.len() as u64);
    }

    #[test]
    fn the_prompt_count_includes_the_chat_framing() {
        let user = "hello";
        assert_eq!(
            prompt("gpt-4o", None, user),
            count("gpt-4o", user) + PER_MESSAGE + PER_REQUEST
        );
        assert!(prompt("gpt-4o", Some("be brief"), user) > prompt("gpt-4o", None, user));
    }
}
