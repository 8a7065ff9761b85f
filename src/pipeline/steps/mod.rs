//! The step kinds, one module each, each implementing [`super::step::StepKind`] for its plan.

mod classify;
mod generate;
mod map;
mod refine;
mod route;
mod split;
mod structured;
mod template;

pub(crate) use template::assemble;
