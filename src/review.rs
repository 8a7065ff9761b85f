//! The review protocol (v1): what a pending review keeps, what a decision says, and what the
//! final result records of it.
//!
//! A result with status `review` goes to the review topic carrying a `review` object (id,
//! deadline, input); the review is kept in the state store as a [`PendingReview`] until a
//! [`DecisionMessage`] for its id comes back on the decisions topic / subject
//! (`schemas/decision.v1.json`) or its deadline passes and its [`OnTimeout`] default applies.
//! The final result (or `review_rejected` dead letter) records the decision as [`Reviewed`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wire::{JobResult, SourceInfo};

/// Longest accepted decision payload.
pub const MAX_DECISION_BYTES: usize = 1024 * 1024;
/// Longest reviewer name and rejection reason.
const MAX_REVIEWER_CHARS: usize = 256;
const MAX_REASON_CHARS: usize = 4096;

/// What a review that times out becomes (`review.on_timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OnTimeout {
    /// The proposed output becomes the result.
    Approve,
    /// A `review_rejected` dead letter.
    Reject,
    /// The job runs again with every generate step on `model`; its answer is the result.
    Rerun { model: String },
}

impl OnTimeout {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnTimeout::Approve => "approve",
            OnTimeout::Reject => "reject",
            OnTimeout::Rerun { .. } => "rerun",
        }
    }
}

/// A review waiting for its decision, as the state store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingReview {
    pub id: String,
    pub tenant: String,
    pub pipeline: String,
    pub job_id: String,
    /// The job's idempotency state key.
    pub job_key: String,
    pub deadline: DateTime<Utc>,
    pub on_timeout: OnTimeout,
    /// The review request as it was published (status `review`).
    pub proposed: JobResult,
    /// The job's original payload (a rejection's dead letter carries it; a rerun decodes it).
    pub payload: String,
    pub source: SourceInfo,
    pub traceparent: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Held before generation (`review.before_generate`): the step outputs to resume from
    /// once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<Option<crate::pipeline::StepOutput>>>,
    /// The pipeline's step names when it was held: a resume needs the same steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_steps: Vec<String>,
}

/// What a reviewer decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Edit,
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Edit => "edit",
            Verdict::Reject => "reject",
        }
    }
}

/// A decision on the decisions topic (`schemas/decision.v1.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionMessage {
    pub review_id: String,
    pub decision: Verdict,
    /// The reviewer's output (`edit`).
    #[serde(default)]
    pub output: Option<Value>,
    /// Why (required for `reject`, kept for the others).
    #[serde(default)]
    pub reason: Option<String>,
    pub reviewer: String,
    /// The tenant whose review it is; when given it must match the review's.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Reads a decision, or says in one sentence why it is not one.
pub fn decode_decision(payload: &[u8]) -> Result<DecisionMessage, String> {
    if payload.len() > MAX_DECISION_BYTES {
        return Err(format!(
            "the decision is {} bytes, more than the {MAX_DECISION_BYTES} accepted",
            payload.len()
        ));
    }
    let decision: DecisionMessage = serde_json::from_slice(payload).map_err(|e| {
        format!("the payload is not a review decision (schemas/decision.v1.json): {e}")
    })?;
    if !decision.review_id.starts_with("rv-") || decision.review_id.len() != 35 {
        return Err(format!(
            "`review_id` `{}` is not a review id (rv- and 32 hex characters, as the review request's review.id)",
            decision.review_id.chars().take(64).collect::<String>()
        ));
    }
    if decision.reviewer.trim().is_empty() || decision.reviewer.chars().count() > MAX_REVIEWER_CHARS
    {
        return Err(format!(
            "`reviewer` must name who decided (1 to {MAX_REVIEWER_CHARS} characters)"
        ));
    }
    if decision
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(format!(
            "`reason` is longer than {MAX_REASON_CHARS} characters"
        ));
    }
    match decision.decision {
        Verdict::Edit if decision.output.is_none() => {
            Err("an `edit` decision must carry the reviewer's `output`".into())
        }
        Verdict::Approve | Verdict::Reject if decision.output.is_some() => Err(format!(
            "a `{}` decision carries no `output` (use `edit` to change the output)",
            decision.decision.as_str()
        )),
        Verdict::Reject if decision.reason.as_ref().is_none_or(|r| r.trim().is_empty()) => {
            Err("a `reject` decision must say why in `reason`".into())
        }
        _ => Ok(decision),
    }
}

/// What the final result (or rejection) records of its review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reviewed {
    pub review_id: String,
    /// `approve`, `edit`, `reject`, or for a timed-out review its default (`approve`,
    /// `reject`, `rerun`).
    pub decision: String,
    /// The reviewer, or `timeout` when the deadline passed.
    pub by: String,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The deadline passed without a decision.
    #[serde(default)]
    pub expired: bool,
}

/// What the state store remembers of a decided review, so the same decision again is
/// recognized and a different one is refused with what was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecidedReview {
    pub reviewed: Reviewed,
    /// Of the decision's content (decision, output, reason, reviewer); empty for a timeout.
    pub fingerprint: String,
    /// The review's tenant: a decision for another tenant is refused like an unknown review.
    pub tenant: String,
}

/// A stable digest of what a decision says: redelivered or republished, the same decision has
/// the same fingerprint.
pub fn fingerprint(decision: &DecisionMessage) -> String {
    let output = decision
        .output
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default();
    let parts = [
        decision.review_id.as_str(),
        decision.decision.as_str(),
        output.as_str(),
        decision.reason.as_deref().unwrap_or(""),
        decision.reviewer.as_str(),
    ];
    crate::digest::of_parts(&parts, 16)
}

/// The state key under which a review's decision is claimed and remembered.
pub fn decision_key(review_id: &str) -> String {
    format!("review/{review_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "rv-0123456789abcdef0123456789abcdef";

    fn decode(json: serde_json::Value) -> Result<DecisionMessage, String> {
        decode_decision(json.to_string().as_bytes())
    }

    #[test]
    fn decisions_are_checked_for_what_their_verdict_needs() {
        let ok =
            decode(serde_json::json!({"review_id": ID, "decision": "approve", "reviewer": "ana"}));
        assert_eq!(ok.map(|d| d.decision), Ok(Verdict::Approve));
        let edit =
            decode(serde_json::json!({"review_id": ID, "decision": "edit", "reviewer": "ana"}));
        assert!(edit.unwrap_err().contains("output"));
        let reject =
            decode(serde_json::json!({"review_id": ID, "decision": "reject", "reviewer": "ana"}));
        assert!(reject.unwrap_err().contains("reason"));
        let bad_id =
            decode(serde_json::json!({"review_id": "x", "decision": "approve", "reviewer": "ana"}));
        assert!(bad_id.unwrap_err().contains("review id"));
        let anonymous =
            decode(serde_json::json!({"review_id": ID, "decision": "approve", "reviewer": " "}));
        assert!(anonymous.unwrap_err().contains("reviewer"));
        let unknown =
            decode(serde_json::json!({"review_id": ID, "decision": "maybe", "reviewer": "ana"}));
        assert!(unknown.unwrap_err().contains("decision"));
        assert!(decode_decision(b"not json").is_err());
    }

    #[test]
    fn the_same_decision_has_the_same_fingerprint() {
        let a = decode(serde_json::json!({"review_id": ID, "decision": "edit", "reviewer": "ana", "output": {"x": 1}})).unwrap();
        let b = decode(serde_json::json!({"review_id": ID, "decision": "edit", "reviewer": "ana", "output": {"x": 1}})).unwrap();
        let c = decode(serde_json::json!({"review_id": ID, "decision": "edit", "reviewer": "ana", "output": {"x": 2}})).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
