//! The idempotency claim around a running job: taking it (or finding the stored outcome),
//! keeping its lease alive while the job runs, releasing it when the job is handed back, and
//! recording the outcome under it once the output is confirmed.
//!
//! Fencing: every claim has its own token, and renew, complete and release succeed only for the
//! token's holder. Before publishing, a worker whose lease was not confirmed within the lease
//! less a margin renews it first and waits for the answer, so it never publishes while another
//! worker may already hold the key; a renewal that finds another holder hands the job back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Engine, Stopped, BUSY_POLL, RETRY_MAX, RETRY_MIN};
use crate::sink::OutputSink;
use crate::state::{Claim, ClaimToken, Renewal};

/// The claim on a job's key now belongs to someone else, or can no longer be proven ours.
pub(super) struct LeaseLost;

/// A claim this worker holds.
pub(super) struct Held {
    pub key: String,
    token: ClaimToken,
    /// When the store last confirmed the lease (taken before the request was sent, so the
    /// lease surely runs at least `lease` from here).
    confirmed: Mutex<Instant>,
}

impl Held {
    fn confirmed(&self) -> Instant {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn confirm(&self, at: Instant) {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// Until when the claim is surely ours: the last confirmation plus the lease, less a
    /// margin for timer drift and the time a write takes to land.
    pub(super) fn safe_until(&self, lease: Duration) -> Instant {
        self.confirmed() + lease - margin(lease)
    }
}

/// A fifth of the lease: what a worker keeps in hand before its lease could lapse.
fn margin(lease: Duration) -> Duration {
    lease / 5
}

impl<K: OutputSink> Engine<K> {
    /// Claims the key: `Ok(Ok(held))` to process it, `Ok(Err(stored))` when it finished before.
    /// Waits while another worker holds a live lease (it ends in an outcome or lapses).
    pub(super) async fn claim(
        &self,
        key: &str,
        stop: &CancellationToken,
    ) -> Result<Result<Held, Bytes>, Stopped> {
        let lease = self.plan.state.claim_lease;
        let mut delay = RETRY_MIN;
        loop {
            let asked = Instant::now();
            let wait = match self.state.claim(key, lease).await {
                Ok(Claim::Acquired(token)) => {
                    return Ok(Ok(Held {
                        key: key.to_owned(),
                        token,
                        confirmed: Mutex::new(asked),
                    }))
                }
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

    /// One claim attempt: `None` while another worker holds the key or the store is
    /// unreachable.
    pub(super) async fn try_claim(&self, key: &str) -> Option<Result<Held, Bytes>> {
        let asked = Instant::now();
        match self.state.claim(key, self.plan.state.claim_lease).await {
            Ok(Claim::Acquired(token)) => Some(Ok(Held {
                key: key.to_owned(),
                token,
                confirmed: Mutex::new(asked),
            })),
            Ok(Claim::Done(stored)) => Some(Err(stored)),
            Ok(Claim::Busy) | Err(_) => None,
        }
    }

    pub(super) async fn release(&self, held: &Held) {
        if let Err(e) = self.state.release(&held.key, &held.token).await {
            tracing::warn!(key = %held.key, error = %e, "could not release claim; it lapses with its lease");
        }
    }

    /// Renews the claim every third of the lease while its job runs (more often after a failed
    /// renewal); returns only when the claim was lost (taken over by another worker). A store
    /// outage is ridden out here: [`Self::confirm_lease`] decides before anything is published.
    pub(super) async fn hold_claim(&self, held: &Held) -> LeaseLost {
        let lease = self.plan.state.claim_lease;
        let mut every = lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let asked = Instant::now();
            match self.state.renew(&held.key, &held.token, lease).await {
                Ok(Renewal::Held) => {
                    held.confirm(asked);
                    every = lease / 3;
                }
                // This job records its outcome only after it stops holding the claim, so a
                // finished key is another worker's outcome: ours is lost.
                Ok(Renewal::Finished | Renewal::Lost) => return LeaseLost,
                Err(e) => {
                    tracing::warn!(key = %held.key, error = %e, "could not renew the claim lease");
                    every = (lease / 10).max(Duration::from_millis(50));
                }
            }
        }
    }

    /// Makes sure the claim is still ours before the output is published: at once when the
    /// store confirmed it within the lease less its margin, otherwise by renewing it now,
    /// waiting through a store outage. `Err` hands the job back: another worker took the key
    /// (or finished it), or the process is stopping.
    pub(super) async fn confirm_lease(
        &self,
        held: &Held,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let lease = self.plan.state.claim_lease;
        if Instant::now() < held.safe_until(lease) {
            return Ok(());
        }
        let mut delay = RETRY_MIN;
        loop {
            let asked = Instant::now();
            match self.state.renew(&held.key, &held.token, lease).await {
                Ok(Renewal::Held) => {
                    held.confirm(asked);
                    return Ok(());
                }
                Ok(Renewal::Finished | Renewal::Lost) => {
                    tracing::warn!(key = %held.key, "the claim passed to another worker while the store could not be reached; handing the job back unpublished");
                    return Err(Stopped::Now);
                }
                Err(e) => {
                    tracing::warn!(key = %held.key, error = %e, "cannot confirm the claim lease; holding the output until the state store answers");
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

    /// Stores the finished outcome, fenced by the claim's token. The output is already written,
    /// so this retries through a short state-store outage rather than leave the key claimed (a
    /// redelivery would then wait for the lease and process the job again).
    pub(super) async fn record(&self, held: &Held, outcome: Bytes) {
        self.record_for(held, outcome, self.plan.state.result_ttl)
            .await;
    }

    /// [`Self::record`], remembered for `ttl`.
    pub(super) async fn record_for(&self, held: &Held, outcome: Bytes, ttl: Duration) {
        let key = &held.key;
        let mut delay = RETRY_MIN;
        for _ in 0..8 {
            match self
                .state
                .complete(key, &held.token, outcome.clone(), ttl)
                .await
            {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!(key, "another worker holds or finished this job's key; its outcome stands and this one is not recorded");
                    return;
                }
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
