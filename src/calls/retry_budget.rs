//! A retry budget per provider: every first attempt deposits `ratio` of a retry, every retry
//! withdraws one, and `min_per_s` retries a second are always allowed. While a provider is down
//! this caps the extra load retries add at `ratio` (plus the floor), instead of multiplying it by
//! `max_attempts`; calls that find the budget empty move on to their fallbacks at once.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::RetryPolicy;

/// Most retries that can be saved up (so a quiet period does not allow a storm later).
const MAX_BALANCE: f64 = 100.0;

pub struct RetryBudget {
    ratio: f64,
    min_per_s: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(policy: &RetryPolicy) -> Self {
        Self {
            ratio: policy.budget_ratio,
            min_per_s: policy.budget_min_per_s,
            state: Mutex::new((policy.budget_min_per_s.min(MAX_BALANCE), Instant::now())),
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        let elapsed = now.duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.min_per_s).min(MAX_BALANCE);
        state.1 = now;
    }

    /// A first attempt was made.
    pub fn deposit(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut state);
        state.0 = (state.0 + self.ratio).min(MAX_BALANCE);
    }

    /// May one retry be made now?
    pub fn try_withdraw(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut state);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn retries_are_capped_at_the_ratio_of_first_attempts() {
        let budget = RetryBudget::new(&RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(60),
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            budget_ratio: 0.2,
            budget_min_per_s: 0.0,
        });
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            // An outage: every call would like to retry many times.
            while budget.try_withdraw() {
                retries += 1;
            }
        }
        assert!((195..=200).contains(&retries), "{retries}");
    }
}
