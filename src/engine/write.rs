//! Getting an outcome confirmed by the sink: retried until confirmed or the process stops; a
//! result the sink can never take becomes an `internal` dead letter.

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::claim::Held;
use super::outcome::Who;
use super::{Engine, Incoming, Stopped, RETRY_MAX, RETRY_MIN};
use crate::sink::{Destination, Output, OutputSink, SinkError};
use crate::telemetry::health::SinkRefusal;
use crate::wire::{DeadLetterReason, Outcome, ResultStatus};

/// An outcome the sink confirmed, with the form the state store keeps it in.
pub(super) struct Written {
    pub outcome: Outcome,
    stored: Bytes,
}

impl Written {
    /// The outcome as the state store keeps it: the buffer the sink's payload was cut from
    /// (see [`encode`]), so it is encoded once and copied for neither.
    pub fn stored(&self) -> Bytes {
        self.stored.clone()
    }
}

impl<K: OutputSink> Engine<K> {
    /// Writes the outcome, retrying failures until confirmed or stopped, and returns what was
    /// written. A result the sink can never take becomes an `internal` dead letter instead; a
    /// dead letter that cannot be written is retried (and logged) until the topic is fixed,
    /// never dropped and never handed back for a paid re-run.
    pub(super) async fn write(
        &self,
        outcome: Outcome,
        incoming: &Incoming<'_>,
        output_key: &str,
        held: Option<&Held>,
        stop: &CancellationToken,
    ) -> Result<Written, Stopped> {
        let trace = incoming.trace;
        let mut outcome = outcome;
        let (mut output, mut stored) = output_for(&outcome, trace, output_key)?;
        let mut delay = RETRY_MIN;
        let mut refused: Option<SinkRefusal> = None;
        let mut retry = false;
        loop {
            // A retry may come long after the lease was last confirmed (a broker or topic
            // outage): the claim must still be ours before each one.
            if let (true, Some(held)) = (retry, held) {
                self.confirm_lease(held, stop).await?;
            }
            retry = true;
            match self.sink.send(&output).await {
                Ok(()) => {
                    return Ok(Written { outcome, stored });
                }
                Err(SinkError::Transient(e)) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "output write failed; retrying");
                }
                Err(SinkError::Rejected(e)) => {
                    // A paid answer is never swapped for a dead letter because of the topic:
                    // keep it, stop taking jobs and report not-ready until the topic takes it.
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "output topic rejects writes; holding the output, intake paused until it is fixed");
                    match &refused {
                        Some(_) => self.health.note_refusal(&e),
                        None => refused = Some(self.health.sink_refused(&e)),
                    }
                }
                Err(SinkError::Permanent(e)) if output.destination != Destination::DeadLetters => {
                    let who = Who::of(&outcome);
                    tracing::error!(job_id = who.job_id().unwrap_or("-"), error = %e, "result cannot be written; dead-lettering it");
                    let error = format!(
                        "the result ({} bytes) could not be written to its topic: {e}; raise the sink's message size limit or lower the model's max_tokens",
                        output.payload.len()
                    );
                    outcome = Outcome::DeadLetter(incoming.dead_letter(
                        DeadLetterReason::Internal,
                        error,
                        who,
                        0,
                    ));
                    (output, stored) = output_for(&outcome, trace, output_key)?;
                    continue;
                }
                Err(SinkError::Permanent(e)) => {
                    // Dead-letter payloads are capped, so this is the dead-letter topic's own
                    // limit. Keep the job and retry until an operator raises it.
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "dead letter cannot be written; retrying");
                }
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

/// The output of an outcome, and the outcome as the state store keeps it. The output's id is
/// derived from `output_key` (the job's identity) and the output's kind, so the same job's same
/// output always has the same id.
fn output_for(
    outcome: &Outcome,
    trace: Option<&str>,
    output_key: &str,
) -> Result<(Output, Bytes), Stopped> {
    let (destination, tenant, variant) = match outcome {
        Outcome::Result(r) => {
            let destination = if r.status == ResultStatus::Review {
                Destination::Review
            } else {
                Destination::Results
            };
            let variant = if r.duplicate { "replay" } else { "first" };
            (destination, Some(r.tenant.clone()), variant)
        }
        Outcome::DeadLetter(dl) => (
            Destination::DeadLetters,
            dl.tenant.clone(),
            if dl.duplicate {
                "replay"
            } else {
                dl.reason.as_str()
            },
        ),
    };
    let (stored, payload) = encode(outcome).map_err(|e| {
        tracing::error!(error = %e, "could not encode output");
        Stopped::Now
    })?;
    let output = Output {
        destination,
        tenant,
        payload,
        traceparent: trace.map(str::to_owned),
        id: output_id(output_key, destination, variant),
    };
    Ok((output, stored))
}

/// Bytes reserved up front for an outcome's encoding: most results fit, so the buffer is not
/// grown (and copied) while it is written.
const ENCODED_CAPACITY: usize = 4096;

/// The outcome as the state store keeps it (`serde_json::to_vec(&outcome)`, the adjacently
/// tagged `{"kind": ..., "body": ...}`), and the sink's payload (the body) as a view into it:
/// encoded once, into one buffer.
fn encode(outcome: &Outcome) -> serde_json::Result<(Bytes, Bytes)> {
    let kind: &[u8] = match outcome {
        Outcome::Result(_) => br#"{"kind":"result","body":"#,
        Outcome::DeadLetter(_) => br#"{"kind":"dead_letter","body":"#,
    };
    let mut stored = Vec::with_capacity(ENCODED_CAPACITY);
    stored.extend_from_slice(kind);
    match outcome {
        Outcome::Result(r) => serde_json::to_writer(&mut stored, r)?,
        Outcome::DeadLetter(dl) => serde_json::to_writer(&mut stored, dl)?,
    }
    stored.push(b'}');
    // Kept for the result's TTL by the in-memory store: no more than it needs (a shrink within
    // the allocator's block is made in place).
    stored.shrink_to_fit();
    let stored = Bytes::from(stored);
    let payload = stored.slice(kind.len()..stored.len() - 1);
    Ok((stored, payload))
}

/// 32 hex characters of SHA-256 over the job's identity, the output kind and its variant (a
/// dead letter's reason, or whether a result is a replay).
fn output_id(output_key: &str, destination: Destination, variant: &str) -> String {
    let kind = match destination {
        Destination::Results => "result",
        Destination::Review => "review",
        Destination::DeadLetters => "dead_letter",
    };
    crate::digest::of_parts(&[output_key, kind, variant], 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_is_the_outcome_as_serde_encodes_it() {
        let now = chrono::Utc::now();
        let result = crate::wire::JobResult {
            job_id: "j-1".into(),
            tenant: "acme".into(),
            pipeline: "support".into(),
            status: ResultStatus::Ok,
            output: serde_json::json!({"answer": "hi \"there\"\n"}),
            route: Default::default(),
            steps: Vec::new(),
            usage: Default::default(),
            duplicate: false,
            metadata: None,
            received_at: now,
            completed_at: now,
            latency_ms: 3,
            review_reason: None,
            review: None,
            reviewed: None,
        };
        let source = crate::wire::SourceInfo {
            transport: "nats".into(),
            topic: "jobs.acme".into(),
            partition: None,
            offset: None,
            stream_seq: Some(7),
        };
        let dead = crate::wire::DeadLetter::new(
            DeadLetterReason::InvalidJob,
            "bad".into(),
            b"{not json",
            source,
        );
        for outcome in [Outcome::Result(result), Outcome::DeadLetter(dead)] {
            let (output, stored) = output_for(&outcome, None, "acme/k").expect("encodes");
            let body = match &outcome {
                Outcome::Result(r) => serde_json::to_vec(r),
                Outcome::DeadLetter(dl) => serde_json::to_vec(dl),
            };
            assert_eq!(&output.payload[..], &body.expect("encodes")[..]);
            assert_eq!(
                &stored[..],
                &serde_json::to_vec(&outcome).expect("encodes")[..]
            );
            let back: Outcome = serde_json::from_slice(&stored).expect("decodes");
            assert_eq!(back, outcome);
        }
    }

    #[test]
    fn the_same_job_and_output_kind_always_get_the_same_id() {
        let a = output_id("acme/k-1", Destination::Results, "first");
        assert_eq!(a, output_id("acme/k-1", Destination::Results, "first"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, output_id("acme/k-2", Destination::Results, "first"));
        assert_ne!(a, output_id("acme/k-1", Destination::DeadLetters, "first"));
        assert_ne!(a, output_id("acme/k-1", Destination::Results, "replay"));
        assert_ne!(
            output_id("acme/k-1", Destination::DeadLetters, "provider_failed"),
            output_id("acme/k-1", Destination::DeadLetters, "output_invalid"),
        );
    }
}
