//! Admission between the idempotency claim and the pipeline: per-tenant rate limits, budgets
//! and fair scheduling, shared by every replica through the state store.
//!
//! [`scheduler`] hands out run slots fairly across tenants (weights, priorities, requests per
//! second); [`gate`] gates each provider call (tokens per minute for tenants, providers and
//! models; day and month budgets), reserving estimates before the call and reconciling them with
//! the reported usage after it.

mod booking;
pub mod gate;
pub mod scheduler;

pub use gate::{CallScope, Gate, JobBudget, Refusal, Reservation, UserWait};
pub use scheduler::{Booked, NotQueued, RunSlot, Scheduler, SchedulerLimits};
