//! The engine's own guarantees that no broker can provoke on demand: a job task that panics is
//! dead-lettered, counted and acknowledged, never dropped silently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Engine;
use crate::admission::{Gate, Scheduler};
use crate::calls::Calls;
use crate::config;
use crate::pipeline::{Pools, Runner};
use crate::provider::Providers;
use crate::sink::{Destination, Output, OutputSink, SinkError};
use crate::source::{AckHandle, Acknowledge, Delivery};
use crate::state::{MemoryStore, StateStore};
use crate::telemetry::Telemetry;
use crate::wire::{Outcome, SourceInfo};

const CONFIG: &str = r#"
source: {kind: kafka, brokers: "127.0.0.1:9", topic: jobs}
providers:
  local: {kind: mock}
models:
  small: {provider: local, model: gpt-4o-mini, price: {input: 0.15, output: 0.6}}
prompts:
  p: {user: "{{input.text}}"}
pipelines:
  support:
    steps:
      - {name: answer, kind: generate, model: small, prompt: p}
"#;

/// A sink with a bug: writing a result panics (as a header assertion once did).
#[derive(Default)]
struct PanickingSink {
    written: Mutex<Vec<Output>>,
}

impl OutputSink for PanickingSink {
    async fn send(&self, output: &Output) -> Result<(), SinkError> {
        if output.destination != Destination::DeadLetters {
            panic!("invalid header value: cannot contain '\\r' or '\\n'");
        }
        self.written.lock().unwrap().push(output.clone());
        Ok(())
    }

    async fn flush(&self) {}
}

#[derive(Clone, Default)]
struct Seen {
    acked: Arc<AtomicBool>,
    handed_back: Arc<AtomicBool>,
}

impl Acknowledge for Seen {
    fn ack(self: Box<Self>, _poison: bool) -> BoxFuture<'static, ()> {
        self.acked.store(true, Ordering::SeqCst);
        Box::pin(std::future::ready(()))
    }

    fn keep_alive(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn keep_alive_every(&self) -> Option<std::time::Duration> {
        None
    }

    fn hand_back(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.handed_back.store(true, Ordering::SeqCst);
        Box::pin(std::future::ready(()))
    }
}

#[tokio::test]
async fn a_job_whose_task_panics_is_dead_lettered_counted_and_acknowledged() {
    let plan = config::load_str(CONFIG, "test", Vec::new()).unwrap();
    let telemetry = Telemetry::new().unwrap();
    let metrics = telemetry.metrics.clone();
    let state = StateStore::from(MemoryStore::new(100));
    let gate = Arc::new(Gate::new(&plan, state.clone(), metrics.clone()));
    let tasks = TaskTracker::new();
    let calls = Calls::new(
        &plan,
        Providers::start(&plan).await.unwrap(),
        metrics.clone(),
        tasks.clone(),
    )
    .with_gate(gate.clone());
    let runner = Runner::new(Arc::new(calls), Pools::new(&plan.pools), metrics.clone());
    let stop = CancellationToken::new();
    let limits = crate::admission::SchedulerLimits {
        max_running: 4,
        max_inflight: 16,
        park_after: std::time::Duration::from_secs(1),
    };
    let scheduler = Scheduler::start(gate, limits, &tasks, stop.clone());
    let engine = Engine::new(
        Arc::new(plan),
        runner,
        scheduler,
        state,
        PanickingSink::default(),
        &telemetry,
    );
    let seen = Seen::default();
    let delivery = Delivery {
        payload: br#"{"id":"p-1","tenant":"acme","input":{"text":"hello"}}"#.to_vec(),
        traceparent: None,
        source: SourceInfo {
            transport: "kafka".into(),
            topic: "jobs".into(),
            partition: Some(0),
            offset: Some(7),
            stream_seq: None,
        },
        tenant: None,
        received_at: chrono::Utc::now(),
        ack: AckHandle::new(seen.clone()),
    };
    engine.handle(delivery, &CancellationToken::new()).await;
    stop.cancel();

    let written = engine.sink().written.lock().unwrap().clone();
    assert_eq!(written.len(), 1, "exactly one output: the dead letter");
    let Ok(Outcome::DeadLetter(dl)) =
        serde_json::from_slice::<serde_json::Value>(&written[0].payload)
            .map(|body| {
                serde_json::from_value(serde_json::json!({"kind": "dead_letter", "body": body}))
            })
            .unwrap()
    else {
        panic!("a dead letter")
    };
    assert_eq!(dl.reason.as_str(), "internal");
    assert_eq!(dl.job_id.as_deref(), Some("p-1"));
    assert!(dl.error.contains("cannot contain"), "{}", dl.error);
    assert_eq!(metrics.job_panics.get(), 1, "the panic is counted");
    assert!(
        seen.acked.load(Ordering::SeqCst),
        "the message is acknowledged"
    );
    assert!(!seen.handed_back.load(Ordering::SeqCst));
}
