//! switchyard: a stream processor for production LLM jobs.
//!
//! Jobs arrive from a broker ([`source`]) as bytes with an ack handle, are decoded and validated
//! against the v1 wire contract ([`wire`]), claimed for idempotency ([`state`]), admitted fairly
//! under their tenant's limits and budget ([`admission`]), run through their pipeline's DAG of
//! steps on bounded per-kind worker pools ([`pipeline`]) whose LLM calls go through the call
//! policy ([`calls`]: cache, circuit, limits, retries, fallbacks) to the HTTP clients
//! ([`provider`]), and end as a result, review request or dead letter written to the broker
//! ([`sink`]). Only after the broker confirms that write is the input acknowledged (Kafka
//! offsets are committed only below the lowest unfinished one). [`engine`] is that per-job path;
//! [`app`] wires it to a plan ([`config`]) and owns shutdown. `testkit` (cargo feature
//! `testkit`) is the embedded deployment the `demo` and `bench` commands and the tests run on.
//! The design, and which module owns what, is `docs/architecture.md`.

pub mod admission;
pub mod app;
pub mod calls;
pub mod config;
pub mod connect;
pub mod digest;
pub mod engine;
pub mod expr;
pub mod guardrails;
pub mod pipeline;
pub mod provider;
pub mod review;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod template;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tokens;
pub mod wire;
