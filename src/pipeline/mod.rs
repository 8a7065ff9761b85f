//! The pipeline runner: a job's steps as a DAG, each step kind on its own bounded worker pool.
//!
//! Steps whose `needs` are met run concurrently inside the job's task (fan-out) and a step starts
//! when all it needs have finished (fan-in); no extra tasks are spawned per step. One file per
//! step kind; [`template`] renders prompts.

mod classify;
mod generate;
mod route;
mod runner;
mod structured;
pub mod template;

pub use runner::{Pools, RunFailure, RunOutput, Runner};

/// What a finished step hands to the steps after it.
#[derive(Debug, Clone)]
pub enum StepOutput {
    /// `degraded`: a fallback model classified it.
    Classified {
        category: String,
        confidence: f64,
        degraded: bool,
    },
    Routed {
        category: String,
        confidence: f64,
        model: String,
        review: bool,
    },
    /// `model` is the alias that answered (a fallback when `degraded`).
    Generated {
        text: String,
        model: String,
        degraded: bool,
        /// The validated JSON answer of a step with an `output_schema`.
        json: Option<serde_json::Value>,
    },
}

impl StepOutput {
    /// The text `{{steps.<name>.output}}` renders to.
    pub fn text(&self) -> &str {
        match self {
            StepOutput::Classified { category, .. } => category,
            StepOutput::Routed { model, .. } => model,
            StepOutput::Generated { text, .. } => text,
        }
    }
}
