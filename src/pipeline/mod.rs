//! The pipeline runner: a job's steps as a DAG, each step kind on its own bounded worker pool.
//!
//! Steps whose `needs` are met run concurrently inside the job's task (fan-out) and a step starts
//! when all it needs have finished (fan-in); no extra tasks are spawned per step. [`runner`]
//! schedules the DAG; [`step`] is what every step kind shares (its context, output and the
//! `StepKind` trait); each kind is one module under [`steps`].

mod chunk;
mod cost;
mod runner;
mod step;
mod steps;

pub use cost::pipeline_aliases;
pub use runner::{Pools, RunOutput, Runner};
pub use step::{RunFailure, StepOutput};
