//! Coalesced bookings: the jobs of one tenant that arrive while a booking of its limiter is on
//! its way to the state store are booked together by the next one, in arrival order.
//!
//! A tenant that floods the source sends hundreds of jobs at once; booked one by one, their
//! round trips would queue in front of every other tenant's on the shared connection. Booked
//! this way a flood costs a handful of round trips, one at a time per tenant and replica, and
//! the other tenants' bookings go straight through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::state::{Booking, Rate, StateError, StateStore};

/// Most jobs booked by one round trip.
const MAX_BATCH: usize = 256;

struct Request {
    ticket: String,
    park_after: Option<Duration>,
    answer: oneshot::Sender<Result<Booking, StateError>>,
}

/// Jobs waiting for the next booking of one limiter; a driver task is on it while it exists.
#[derive(Default)]
struct Line {
    waiting: Vec<Request>,
}

pub(super) struct Bookings {
    state: StateStore,
    /// Where the drivers run.
    tasks: tokio_util::task::TaskTracker,
    /// By limiter key.
    lines: Mutex<HashMap<String, Line>>,
}

impl Bookings {
    pub(super) fn new(state: StateStore) -> Arc<Self> {
        Arc::new(Self {
            state,
            tasks: tokio_util::task::TaskTracker::new(),
            lines: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Line>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Books the job named `ticket` on the limiter `key` with the next round trip.
    pub(super) async fn book(
        self: &Arc<Self>,
        key: &str,
        ticket: String,
        rate: Rate,
        park_after: Option<Duration>,
    ) -> Result<Booking, StateError> {
        let (answer, answered) = oneshot::channel();
        let request = Request {
            ticket,
            park_after,
            answer,
        };
        let start = {
            let mut lines = self.lock();
            match lines.get_mut(key) {
                Some(line) => {
                    line.waiting.push(request);
                    false
                }
                None => {
                    lines.insert(
                        key.to_owned(),
                        Line {
                            waiting: vec![request],
                        },
                    );
                    true
                }
            }
        };
        if start {
            // A task of its own, so a job that stops waiting does not strand the others.
            self.tasks.spawn(self.clone().drive(key.to_owned(), rate));
        }
        answered.await.unwrap_or_else(|_| {
            Err(StateError::Unavailable(
                "the booking was dropped before it was answered".into(),
            ))
        })
    }

    /// Books what is waiting on `key`, batch after batch, until nothing is; then the line goes.
    async fn drive(self: Arc<Self>, key: String, rate: Rate) {
        loop {
            let batch: Vec<Request> = {
                let mut lines = self.lock();
                let Some(line) = lines.get_mut(&key) else {
                    return;
                };
                if line.waiting.is_empty() {
                    lines.remove(&key);
                    return;
                }
                let n = line.waiting.len().min(MAX_BATCH);
                line.waiting.drain(..n).collect()
            };
            let jobs: Vec<(&str, Option<Duration>)> = batch
                .iter()
                .map(|r| (r.ticket.as_str(), r.park_after))
                .collect();
            match self.state.book(&key, &jobs, rate).await {
                Ok(bookings) if bookings.len() == batch.len() => {
                    for (request, booking) in batch.into_iter().zip(bookings) {
                        let _ = request.answer.send(Ok(booking));
                    }
                }
                Ok(bookings) => {
                    let error = format!(
                        "the state store answered {} bookings for {} jobs",
                        bookings.len(),
                        batch.len()
                    );
                    for request in batch {
                        let _ = request
                            .answer
                            .send(Err(StateError::Unavailable(error.clone())));
                    }
                }
                Err(e) => {
                    let error = e.to_string();
                    for request in batch {
                        let _ = request
                            .answer
                            .send(Err(StateError::Unavailable(error.clone())));
                    }
                }
            }
        }
    }
}
