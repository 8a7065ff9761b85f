//! What the mock answers: a JSON classification for a classify prompt (one with a
//! `Categories: a, b, c` line), otherwise a deterministic reply sized by the input.

use serde_json::json;

use super::fnv1a;

/// The mock's answer and whether it was a classification.
pub(super) fn answer(messages: &[(String, String)]) -> (String, bool) {
    let mut categories: Vec<String> = Vec::new();
    for (_, content) in messages {
        for line in content.lines() {
            if let Some(list) = line.trim().strip_prefix("Categories:") {
                categories = list
                    .split(',')
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
            }
        }
    }
    let text: String = messages
        .iter()
        .filter(|(role, _)| role == "user")
        .flat_map(|(_, c)| c.lines().filter(|l| !l.trim().starts_with("Categories:")))
        .collect::<Vec<_>>()
        .join("\n");
    let hash = fnv1a(text.as_bytes());
    if !categories.is_empty() {
        let lower = text.to_lowercase();
        let category = categories
            .iter()
            .find(|c| lower.contains(&c.to_lowercase()))
            .cloned()
            .unwrap_or_else(|| categories[(hash % categories.len() as u64) as usize].clone());
        let confidence = 0.40 + ((hash >> 8) % 60) as f64 / 100.0;
        return (
            json!({"category": category, "confidence": confidence}).to_string(),
            true,
        );
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let topic = words
        .iter()
        .rev()
        .take(8)
        .rev()
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let mut reply = format!("Thank you for your message about \"{topic}\". ");
    const SENTENCES: [&str; 4] = [
        "I have looked into this and here is what I found.",
        "The most likely cause is a temporary issue on our side, which has now been resolved.",
        "If anything is still unclear, reply to this message and we will follow up.",
        "I have also added a note to your account so the team has the full context.",
    ];
    let n = 1 + (words.len() / 40).min(6);
    for i in 0..n {
        reply.push_str(SENTENCES[(hash as usize + i) % SENTENCES.len()]);
        reply.push(' ');
    }
    (reply.trim_end().to_owned(), false)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn classify_prompts_get_a_listed_category() {
        let msgs = vec![(
            "user".to_owned(),
            "Categories: billing, technical, general\n\nTicket: I was charged twice".to_owned(),
        )];
        let (content, classified) = answer(&msgs);
        assert!(classified);
        let v: Value = serde_json::from_str(&content).unwrap();
        assert!(["billing", "technical", "general"].contains(&v["category"].as_str().unwrap()));
        let c = v["confidence"].as_f64().unwrap();
        assert!((0.4..1.0).contains(&c));
    }

    #[test]
    fn a_category_named_in_the_text_wins() {
        let msgs = vec![(
            "user".to_owned(),
            "Categories: billing, technical\nmy billing is wrong".to_owned(),
        )];
        let v: Value = serde_json::from_str(&answer(&msgs).0).unwrap();
        assert_eq!(v["category"], "billing");
    }
}
