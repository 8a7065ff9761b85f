//! The idempotency claim around a running job: taking it (or finding the stored outcome),
//! keeping its lease alive while the job runs, releasing it when the job is handed back, and
//! recording the outcome under it once the output is confirmed.

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Engine, Stopped, BUSY_POLL, RETRY_MAX, RETRY_MIN};
use crate::sink::OutputSink;
use crate::state::{Claim, ClaimToken};

/// The claim on a job's key now belongs to someone else.
pub(super) struct LeaseLost;

impl<K: OutputSink> Engine<K> {
    /// Claims the key: `Ok(Ok(token))` to process it, `Ok(Err(stored))` when it finished before.
    /// Waits while another worker holds a live lease (it ends in an outcome or lapses).
    pub(super) async fn claim(
        &self,
        key: &str,
        stop: &CancellationToken,
    ) -> Result<Result<ClaimToken, Bytes>, Stopped> {
        let lease = self.plan.state.claim_lease;
        let mut delay = RETRY_MIN;
        loop {
            let wait = match self.state.claim(key, lease).await {
                Ok(Claim::Acquired(token)) => return Ok(Ok(token)),
                Ok(Claim::Done(stored)) => return Ok(Err(stored)),
                Ok(Claim::Busy) => BUSY_POLL,
                Err(e) => {
                    tracing::warn!(error = %e, "state store unavailable; job waits");
                    delay = (delay * 2).min(RETRY_MAX);
                    delay
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(Stopped::Now),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    pub(super) async fn release(&self, key: &str, token: &ClaimToken) {
        if let Err(e) = self.state.release(key, token).await {
            tracing::warn!(key, error = %e, "could not release claim; it lapses with its lease");
        }
    }

    /// Renews the claim every third of the lease while its job runs; returns only when the claim
    /// was lost (expired and taken over, or finished by another worker). A store outage is
    /// waited out: the claim's owner token is still ours when it returns.
    pub(super) async fn hold_claim(&self, key: &str, token: &ClaimToken) -> LeaseLost {
        let lease = self.plan.state.claim_lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            match self.state.renew(key, token, lease).await {
                Ok(true) => {}
                Ok(false) => return LeaseLost,
                Err(e) => tracing::warn!(key, error = %e, "could not renew the claim lease"),
            }
        }
    }

    /// Stores the finished outcome. The output is already written, so this retries through a
    /// short state-store outage rather than leave the key claimed (a redelivery would then wait
    /// for the lease and process the job again).
    pub(super) async fn record(&self, key: &str, outcome: Bytes) {
        let mut delay = RETRY_MIN;
        for _ in 0..8 {
            match self
                .state
                .complete(key, outcome.clone(), self.plan.state.result_ttl)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not record the finished job; retrying")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        tracing::error!(
            key,
            "gave up recording the finished job; a redelivery would process it again"
        );
    }
}
