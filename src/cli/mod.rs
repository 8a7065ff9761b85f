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

/// The lines of `path`, or of standard input for `-`.
fn lines(path: &Path) -> anyhow::Result<Box<dyn Iterator<Item = String>>> {
    use std::io::BufRead as _;
    if path.as_os_str() == "-" {
        return Ok(Box::new(
            std::io::stdin().lock().lines().map_while(Result::ok),
        ));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(Box::new(
        std::io::BufReader::new(file).lines().map_while(Result::ok),
    ))
}
