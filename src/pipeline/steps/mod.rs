//! The step kinds, one module each, each implementing [`super::step::StepKind`] for its plan.

mod classify;
mod generate;
mod route;
mod structured;
