//! The operator commands around the service: `demo`, `publish`, `tail`, `bench`,
//! `experiments report`, `reviews` and `cost`. They live
//! in the binary, not the library: the service never depends on them.

pub mod bench;
pub mod cost;
pub mod demo;
pub mod experiments;
pub mod publish;
pub mod reviews;
pub mod tail;

use std::path::Path;

use switchyard::config::{self, Plan};

fn load(path: &Path) -> anyhow::Result<Plan> {
    Ok(config::load(path)?)
}

/// The NATS subject prefix jobs are published under (`switchyard.jobs.>` -> `switchyard.jobs`).
fn subject_prefix(subject: &str) -> &str {
    subject
        .strip_suffix(".>")
        .or_else(|| subject.strip_suffix(".*"))
        .unwrap_or(subject)
}
