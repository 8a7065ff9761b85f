//! The JSON Schemas and the decoder agree: whatever `job.v1.json` accepts decodes, whatever it
//! rejects becomes an `invalid_job` dead letter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use serde_json::json;
use switchyard::wire::decode_job;

#[test]
fn the_job_schema_and_the_decoder_agree() {
    let s = common::schemas();
    let cases = [
        json!({"id": "t-1", "tenant": "acme", "input": {"text": "hi"}}),
        json!({"id": "t-1", "tenant": "acme", "pipeline": "support", "input": {"text": "hi"},
               "idempotency_key": "acme:t-1", "priority": "high", "deadline": "2026-11-22T05:00:00Z",
               "ttl_ms": 1000, "user": "u-17", "metadata": {"any": ["json"]}, "reply_to": "x"}),
        json!({"id": "t-1", "tenant": "acme", "input": {}, "user": null, "priority": null}),
        json!({"id": "", "tenant": "acme", "input": {}}),
        json!({"id": "x".repeat(129), "tenant": "acme", "input": {}}),
        json!({"id": "t", "tenant": "a.b", "input": {}}),
        json!({"id": "t", "tenant": "_a", "input": {}}),
        json!({"id": "t", "tenant": "a".repeat(65), "input": {}}),
        json!({"id": "t", "tenant": "acme"}),
        json!({"id": "t", "tenant": "acme", "input": "text"}),
        json!({"id": 7, "tenant": "acme", "input": {}}),
        json!({"id": "t", "tenant": "acme", "input": {}, "priority": "urgent"}),
        json!({"id": "t", "tenant": "acme", "input": {}, "deadline": "tomorrow"}),
        json!({"id": "t", "tenant": "acme", "input": {}, "ttl_ms": -5}),
        json!({"id": "t", "tenant": "acme", "input": {}, "idempotency_key": ""}),
        json!({"id": "t", "tenant": "acme", "input": {}, "extra": 1}),
    ];
    for case in cases {
        let schema_ok = s.job.is_valid(&case);
        let decoded = decode_job(case.to_string().as_bytes(), 1 << 20, chrono::Utc::now());
        assert_eq!(
            schema_ok,
            decoded.is_ok(),
            "schema says {schema_ok}, decoder says {decoded:?} for {case}"
        );
    }
}

#[test]
fn the_decision_schema_and_the_decoder_agree() {
    let s = common::schemas();
    let id = "rv-0123456789abcdef0123456789abcdef";
    let cases = [
        json!({"review_id": id, "decision": "approve", "reviewer": "ana"}),
        json!({"review_id": id, "decision": "approve", "reviewer": "ana", "reason": "fine", "tenant": "acme"}),
        json!({"review_id": id, "decision": "edit", "reviewer": "ana", "output": {"answer": 1}}),
        json!({"review_id": id, "decision": "edit", "reviewer": "ana"}),
        json!({"review_id": id, "decision": "reject", "reviewer": "ana", "reason": "wrong"}),
        json!({"review_id": id, "decision": "reject", "reviewer": "ana"}),
        json!({"review_id": id, "decision": "approve", "reviewer": "ana", "output": "x"}),
        json!({"review_id": id, "decision": "maybe", "reviewer": "ana"}),
        json!({"review_id": "rv-1", "decision": "approve", "reviewer": "ana"}),
        json!({"review_id": id, "decision": "approve", "reviewer": ""}),
        json!({"review_id": id, "decision": "approve"}),
        json!({"review_id": id, "decision": "approve", "reviewer": "ana", "extra": 1}),
    ];
    for case in cases {
        let schema_ok = s.decision.is_valid(&case);
        let decoded = switchyard::review::decode_decision(case.to_string().as_bytes());
        assert_eq!(
            schema_ok,
            decoded.is_ok(),
            "schema says {schema_ok}, decoder says {decoded:?} for {case}"
        );
    }
}
