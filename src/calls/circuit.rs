//! Circuit breaker per provider + model: after a run of failures (consecutive, or a failure rate
//! over the last calls) the target is skipped at once for a cool-down, then a limited number of
//! probe calls decide whether it closes again.
//!
//! Only failures that say something about the target's health count (5xx, timeouts, connection
//! errors, unreadable responses). A 429 is a quota answer with its own wait; an auth or
//! content-filter error is about the request.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::CircuitPolicy;
use crate::provider::ProviderError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    /// The `circuit_state` gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        consecutive: u32,
        recent: VecDeque<bool>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probes: u32,
    },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    policy: CircuitPolicy,
    inner: Mutex<Inner>,
}

/// Whether an error counts against the target's health.
pub fn counts_as_failure(error: &ProviderError) -> bool {
    matches!(
        error,
        ProviderError::Server { .. }
            | ProviderError::Timeout(_)
            | ProviderError::Connect(_)
            | ProviderError::Interrupted(_)
            | ProviderError::InvalidResponse(_)
    )
}

impl CircuitBreaker {
    pub fn new(policy: CircuitPolicy) -> Self {
        Self {
            policy,
            inner: Mutex::new(Inner::Closed {
                consecutive: 0,
                recent: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> CircuitState {
        match &*self.lock() {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
            Inner::Open { until } if Instant::now() >= *until => CircuitState::HalfOpen,
            Inner::Open { .. } => CircuitState::Open,
        }
    }

    /// May a call go to this target now? A half-open circuit lets `half_open_probes` through.
    pub fn allow(&self) -> bool {
        let mut inner = self.lock();
        match &mut *inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if Instant::now() >= *until => {
                *inner = Inner::HalfOpen { probes: 1 };
                true
            }
            Inner::Open { .. } => false,
            Inner::HalfOpen { probes } if *probes < self.policy.half_open_probes => {
                *probes += 1;
                true
            }
            Inner::HalfOpen { .. } => false,
        }
    }

    /// Records a call's result; returns the state afterwards.
    pub fn record(&self, failed: bool) -> CircuitState {
        let policy = self.policy;
        let mut inner = self.lock();
        let open = |cooldown: Duration| Inner::Open {
            until: Instant::now() + cooldown,
        };
        match &mut *inner {
            Inner::Closed {
                consecutive,
                recent,
            } => {
                *consecutive = if failed { *consecutive + 1 } else { 0 };
                recent.push_back(failed);
                while recent.len() > policy.window {
                    recent.pop_front();
                }
                let failures = recent.iter().filter(|f| **f).count();
                let rate_tripped = recent.len() >= policy.min_calls
                    && failures as f64 >= policy.failure_rate * recent.len() as f64;
                if failed && (*consecutive >= policy.consecutive_failures || rate_tripped) {
                    *inner = open(policy.open_for);
                    return CircuitState::Open;
                }
                CircuitState::Closed
            }
            Inner::HalfOpen { .. } if failed => {
                *inner = open(policy.open_for);
                CircuitState::Open
            }
            Inner::HalfOpen { .. } => {
                *inner = Inner::Closed {
                    consecutive: 0,
                    recent: VecDeque::new(),
                };
                CircuitState::Closed
            }
            // A call admitted before the circuit opened finished late: the circuit stays open.
            Inner::Open { .. } => CircuitState::Open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CircuitPolicy {
        CircuitPolicy {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: 10,
            min_calls: 6,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_probes_and_closes() {
        let b = CircuitBreaker::new(policy());
        for _ in 0..2 {
            assert!(b.allow());
            assert_eq!(b.record(true), CircuitState::Closed);
        }
        assert!(b.allow());
        assert_eq!(b.record(true), CircuitState::Open);
        assert!(!b.allow(), "open: skipped at once");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe at a time");
        assert_eq!(b.record(false), CircuitState::Closed);
        assert!(b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_cooldown() {
        let b = CircuitBreaker::new(policy());
        for _ in 0..3 {
            b.allow();
            b.record(true);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow());
        assert_eq!(b.record(true), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!b.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_without_a_consecutive_run() {
        let b = CircuitBreaker::new(policy());
        // fail, ok, fail, ok, fail, ok: 50% of 6 calls, never 3 in a row.
        let mut last = CircuitState::Closed;
        for i in 0..6 {
            assert!(b.allow());
            last = b.record(i % 2 == 0);
        }
        assert_eq!(last, CircuitState::Closed, "the sixth call succeeded");
        assert!(b.allow());
        assert_eq!(b.record(true), CircuitState::Open, "4 of 7 failed");
    }
}
