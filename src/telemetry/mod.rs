//! What the service says about itself: structured logs (`tracing`, human-readable or JSON
//! lines), health endpoints and Prometheus metrics.

pub mod health;
pub mod metrics;

use std::sync::Arc;

use tracing_subscriber::EnvFilter;

/// What the service reports about itself: readiness and metrics.
#[derive(Clone)]
pub struct Telemetry {
    pub health: Arc<health::Health>,
    pub metrics: Arc<metrics::Metrics>,
}

impl Telemetry {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            health: health::Health::new(),
            metrics: metrics::Metrics::new()?,
        })
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: the first subscriber stays. JSON records put the event's
    // fields at the top level and list the enclosing spans (job: job_id, tenant, pipeline;
    // step: step) under `spans`.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init()
    } else {
        builder.try_init()
    };
}
