//! The embedded deployment and the harness around it: an in-process Kafka cluster, a publisher,
//! an output collector and a realistic workload.
//!
//! Used by the `demo` and `bench` commands and by the integration tests; the service itself
//! (`app`, `engine` and below) never imports it. It is compiled with the `testkit` cargo feature
//! (on by default, since the CLI's `demo` and `bench` run on it).

mod collector;
mod embedded;
mod publish;
mod workload;

pub use collector::{parse_output, Collected, OutputCollector, OutputKind};
pub use embedded::{demo_plan, topics_of, EmbeddedKafka, DEMO_CONFIG};
pub use publish::{publish, publish_nats};
pub use workload::{workload, WorkItem};
