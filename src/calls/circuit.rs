//! Circuit breaker per provider + model: after a run of failures (consecutive, or a failure rate
//! over the calls of the last `window_ms`) the target is skipped at once for a cool-down, then a
//! limited number of probe calls decide whether it closes again.
//!
//! Only failures that say something about the target's health count (5xx, timeouts, connection
//! errors, unreadable responses). A 429 is a quota answer with its own wait; an auth or
//! content-filter error is about the request.
//!
//! Only news counts. A call's result is ignored when the call was sent before the circuit last
//! changed state. A failure extends a run of consecutive failures only when its call was sent
//! after the latest success (the target has not answered well since), and the failure rate is
//! taken over a span of time, not over the last N calls. Calls sent together fail together: with
//! hundreds in flight, the 2% of requests that hang all time out within the same milliseconds,
//! and those timeouts alone made five "consecutive" failures and filled a 20-call window,
//! opening a circuit for 30 s that the other 98% of calls showed was healthy.

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

/// What a call's result says about its target's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Nothing either way: a 429 (a quota answer) or an error about the request itself.
    Neutral,
}

impl Outcome {
    pub fn of<T>(result: &Result<T, ProviderError>) -> Self {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if counts_as_failure(e) => Outcome::Failure,
            Err(_) => Outcome::Neutral,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        consecutive: u32,
        /// When each recent call finished and whether it failed (the last `window_ms`, at most
        /// `window` calls).
        recent: VecDeque<(Instant, bool)>,
        /// How many of `recent` failed (kept as calls come and go, so a call never scans the
        /// window under the lock).
        failures: usize,
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
    shared: Mutex<Shared>,
    /// The `circuit_state` gauge of this provider and model, set as calls record a new state.
    gauge: Option<prometheus::IntGauge>,
}

#[derive(Debug)]
struct Shared {
    inner: Inner,
    /// When the circuit last changed state.
    changed_at: Instant,
    /// When the latest success was recorded.
    last_success: Option<Instant>,
    /// The state the gauge shows.
    reported: CircuitState,
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
            shared: Mutex::new(Shared {
                inner: Inner::Closed {
                    consecutive: 0,
                    recent: VecDeque::new(),
                    failures: 0,
                },
                changed_at: Instant::now(),
                last_success: None,
                reported: CircuitState::Closed,
            }),
            gauge: None,
        }
    }

    /// Keeps `gauge` at the state calls record: set now, then on every change (under the
    /// breaker's lock, so it always ends at the latest state).
    pub fn reporting_to(mut self, gauge: prometheus::IntGauge) -> Self {
        gauge.set(CircuitState::Closed.gauge());
        self.gauge = Some(gauge);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> CircuitState {
        match &self.lock().inner {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
            Inner::Open { until } if Instant::now() >= *until => CircuitState::HalfOpen,
            Inner::Open { .. } => CircuitState::Open,
        }
    }

    /// May a call go to this target now? A half-open circuit lets `half_open_probes` through.
    pub fn allow(&self) -> bool {
        let mut guard = self.lock();
        let shared = &mut *guard;
        let now = Instant::now();
        match &mut shared.inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now >= *until => {
                shared.inner = Inner::HalfOpen { probes: 1 };
                shared.changed_at = now;
                true
            }
            Inner::Open { .. } => false,
            Inner::HalfOpen { probes } if *probes < self.policy.half_open_probes => {
                *probes += 1;
                true
            }
            // A probe that never reported (its call was dropped mid-flight, e.g. a DAG sibling
            // failed): after another cooldown, probe again rather than stay half-open forever.
            Inner::HalfOpen { probes }
                if now.duration_since(shared.changed_at) >= self.policy.open_for =>
            {
                *probes = 1;
                shared.changed_at = now;
                true
            }
            Inner::HalfOpen { .. } => false,
        }
    }

    /// Records the result of a call sent at `sent`; returns the state afterwards (and shows it
    /// on the gauge, when it reports to one and the state changed).
    pub fn record(&self, outcome: Outcome, sent: Instant) -> CircuitState {
        let mut shared = self.lock();
        let state = self.record_locked(&mut shared, outcome, sent);
        self.report(&mut shared, state);
        state
    }

    /// A call skipped this target: the gauge shows the state that made it skip.
    pub fn skipped(&self) {
        let mut shared = self.lock();
        let state = Self::current(&shared.inner);
        self.report(&mut shared, state);
    }

    fn report(&self, shared: &mut Shared, state: CircuitState) {
        if let Some(gauge) = self.gauge.as_ref().filter(|_| shared.reported != state) {
            gauge.set(state.gauge());
            shared.reported = state;
        }
    }

    fn record_locked(&self, shared: &mut Shared, outcome: Outcome, sent: Instant) -> CircuitState {
        let policy = self.policy;
        let now = Instant::now();
        let stale = sent < shared.changed_at;
        let failed = match outcome {
            Outcome::Success => false,
            Outcome::Failure => true,
            Outcome::Neutral if stale => return Self::current(&shared.inner),
            Outcome::Neutral => {
                // No news about the target; a probe that got one leaves its slot to another.
                if let Inner::HalfOpen { probes } = &mut shared.inner {
                    *probes = probes.saturating_sub(1);
                }
                return Self::current(&shared.inner);
            }
        };
        // Sent before the latest success: the target has answered well since.
        let overtaken = failed && shared.last_success.is_some_and(|success| sent < success);
        if !failed && !stale {
            shared.last_success = Some(now);
        }
        let before = std::mem::discriminant(&shared.inner);
        let state = Self::apply(policy, &mut shared.inner, failed, stale, overtaken, now);
        if std::mem::discriminant(&shared.inner) != before {
            shared.changed_at = now;
        }
        state
    }

    /// The state as recorded (an open circuit past its cooldown turns half-open on `allow`).
    fn current(inner: &Inner) -> CircuitState {
        match inner {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
            Inner::Open { .. } => CircuitState::Open,
        }
    }

    fn apply(
        policy: CircuitPolicy,
        inner: &mut Inner,
        failed: bool,
        stale: bool,
        overtaken: bool,
        now: Instant,
    ) -> CircuitState {
        let open = |cooldown: Duration| Inner::Open {
            until: now + cooldown,
        };
        match inner {
            // Old news: the state stands.
            Inner::Closed { .. } | Inner::HalfOpen { .. } if stale => Self::current(inner),
            Inner::Closed {
                consecutive,
                recent,
                failures,
            } => {
                *consecutive = match (failed, overtaken) {
                    (false, _) => 0,
                    (true, false) => *consecutive + 1,
                    (true, true) => *consecutive,
                };
                recent.push_back((now, failed));
                *failures += usize::from(failed);
                while recent.len() > policy.window
                    || recent
                        .front()
                        .is_some_and(|(at, _)| now.duration_since(*at) > policy.window_for)
                {
                    if let Some((_, gone_failed)) = recent.pop_front() {
                        *failures = failures.saturating_sub(usize::from(gone_failed));
                    }
                }
                let rate_tripped = recent.len() >= policy.min_calls
                    && *failures as f64 >= policy.failure_rate * recent.len() as f64;
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
                    failures: 0,
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
            window_for: Duration::from_secs(10),
            min_calls: 6,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_gauge_shows_what_calls_recorded() {
        let gauge = prometheus::IntGauge::new("circuit_state_test", "test").unwrap();
        gauge.set(7);
        let b = CircuitBreaker::new(policy()).reporting_to(gauge.clone());
        assert_eq!(gauge.get(), 0, "closed from the start");
        for _ in 0..3 {
            b.record(Outcome::Failure, Instant::now());
        }
        assert_eq!(gauge.get(), 2, "open");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow());
        // A 429 says nothing about health: the probe's slot is freed, the state is half-open.
        b.record(Outcome::Neutral, Instant::now());
        assert_eq!(gauge.get(), 1, "half-open");
        assert!(b.allow());
        assert!(!b.allow(), "the probe's slot is taken");
        b.record(Outcome::Success, Instant::now());
        assert_eq!(gauge.get(), 0, "closed again");
        // A call refused while the probe was out reports only after it closed: the gauge
        // shows the breaker's state, not an open circuit.
        b.skipped();
        assert_eq!(gauge.get(), 0, "a late skip does not reopen the gauge");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_probes_and_closes() {
        let b = CircuitBreaker::new(policy());
        for _ in 0..2 {
            assert!(b.allow());
            assert_eq!(
                b.record(Outcome::Failure, Instant::now()),
                CircuitState::Closed
            );
        }
        assert!(b.allow());
        assert_eq!(
            b.record(Outcome::Failure, Instant::now()),
            CircuitState::Open
        );
        assert!(!b.allow(), "open: skipped at once");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe at a time");
        assert_eq!(
            b.record(Outcome::Success, Instant::now()),
            CircuitState::Closed
        );
        assert!(b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_cooldown() {
        let b = CircuitBreaker::new(policy());
        for _ in 0..3 {
            b.allow();
            b.record(Outcome::Failure, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow());
        assert_eq!(
            b.record(Outcome::Failure, Instant::now()),
            CircuitState::Open
        );
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
            last = b.record(
                if i % 2 == 0 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
                Instant::now(),
            );
        }
        assert_eq!(last, CircuitState::Closed, "the sixth call succeeded");
        assert!(b.allow());
        assert_eq!(
            b.record(Outcome::Failure, Instant::now()),
            CircuitState::Open,
            "4 of 7 failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_calls_sent_together_do_not_open_a_circuit_others_show_healthy() {
        let b = CircuitBreaker::new(CircuitPolicy {
            window: 1000,
            min_calls: 10,
            ..policy()
        });
        // Hundreds of calls sent at once; a few hang and time out together, after the rest
        // answered.
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        for _ in 0..95 {
            assert_eq!(b.record(Outcome::Success, sent), CircuitState::Closed);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..5 {
            assert_eq!(
                b.record(Outcome::Failure, sent),
                CircuitState::Closed,
                "timeouts of calls sent before the last success are no run of failures"
            );
        }
        // A target that really goes down: calls sent after the last success fail.
        let later = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.record(Outcome::Failure, later), CircuitState::Closed);
        }
        assert_eq!(b.record(Outcome::Failure, later), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_is_taken_over_time_not_a_burst() {
        let b = CircuitBreaker::new(CircuitPolicy {
            consecutive_failures: 1000,
            window: 1000,
            min_calls: 10,
            ..policy()
        });
        // Old failures drop out of the window.
        for _ in 0..9 {
            b.record(Outcome::Failure, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..9 {
            b.record(Outcome::Success, Instant::now());
        }
        assert_eq!(
            b.record(Outcome::Failure, Instant::now()),
            CircuitState::Closed,
            "1 of 10 in the window"
        );
        // 60% of the calls of the window failing, interleaved with successes: it opens.
        let mut last = CircuitState::Closed;
        for i in 0..30 {
            last = b.record(
                if i % 5 < 3 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
                Instant::now(),
            );
            if last == CircuitState::Open {
                break;
            }
        }
        assert_eq!(last, CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_from_before_the_circuit_changed_is_ignored() {
        let b = CircuitBreaker::new(policy());
        let early = Instant::now();
        tokio::time::advance(Duration::from_millis(1)).await;
        for _ in 0..3 {
            b.record(Outcome::Failure, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow(), "half-open: the probe");
        assert_eq!(
            b.record(Outcome::Success, early),
            CircuitState::HalfOpen,
            "a success sent before the circuit opened does not close it"
        );
        assert_eq!(
            b.record(Outcome::Success, Instant::now()),
            CircuitState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_replaced_after_another_cooldown() {
        let b = CircuitBreaker::new(policy());
        for _ in 0..3 {
            b.record(Outcome::Failure, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            b.allow(),
            "the probe (its call is then dropped, never recorded)"
        );
        assert!(!b.allow());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow(), "a new probe after another cooldown");
        assert_eq!(
            b.record(Outcome::Success, Instant::now()),
            CircuitState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_say_nothing_about_health() {
        let b = CircuitBreaker::new(policy());
        // Timeouts interleaved with fast 429s: still a run of failures.
        for _ in 0..2 {
            b.record(Outcome::Failure, Instant::now());
            b.record(Outcome::Neutral, Instant::now());
        }
        assert_eq!(
            b.record(Outcome::Failure, Instant::now()),
            CircuitState::Open
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow());
        assert_eq!(
            b.record(Outcome::Neutral, Instant::now()),
            CircuitState::HalfOpen,
            "a probe answered with a 429 does not close the circuit"
        );
        assert!(b.allow(), "and leaves its slot to another probe");
        assert!(!b.allow(), "one probe at a time");
        let before_probe = Instant::now();
        tokio::time::advance(Duration::from_millis(1)).await;
        b.record(Outcome::Failure, Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.allow(), "the next probe");
        b.record(Outcome::Neutral, before_probe);
        assert!(!b.allow(), "a 429 from before the probe frees no slot");
    }

    #[test]
    fn only_errors_about_the_targets_health_count_as_failures() {
        let s = || String::from("x");
        let failures = [
            ProviderError::Server {
                status: 503,
                retry_after: None,
                message: s(),
            },
            ProviderError::Timeout(Duration::from_secs(1)),
            ProviderError::Connect(s()),
            ProviderError::Interrupted(s()),
            ProviderError::InvalidResponse(s()),
        ];
        let neutral = [
            ProviderError::RateLimited {
                retry_after: None,
                message: s(),
            },
            ProviderError::ContextLength(s()),
            ProviderError::ContentFilter(s()),
            ProviderError::Auth {
                status: 401,
                message: s(),
            },
            ProviderError::BadRequest {
                status: 400,
                message: s(),
            },
            ProviderError::CircuitOpen,
        ];
        for error in failures {
            assert_eq!(
                Outcome::of::<()>(&Err(error.clone())),
                Outcome::Failure,
                "{error}"
            );
        }
        for error in neutral {
            assert_eq!(
                Outcome::of::<()>(&Err(error.clone())),
                Outcome::Neutral,
                "{error}"
            );
        }
        assert_eq!(Outcome::of::<()>(&Ok(())), Outcome::Success);
    }
}
