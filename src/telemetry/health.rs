//! Liveness and readiness, and the HTTP port that serves them with the metrics (`/healthz`,
//! `/readyz`, `/metrics`).
//!
//! Ready means: the source is connected, the state store is reachable, no output topic is
//! refusing writes and the process is not draining. Kubernetes stops routing to (and the HPA stops counting on) a replica that is not
//! ready; a replica that is alive but not ready is never restarted for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Health {
    source_connected: AtomicBool,
    /// The state store's own reachability flag, read live.
    state_available: OnceLock<Arc<AtomicBool>>,
    draining: AtomicBool,
    /// The last write refused by an output topic (authorization, missing topic), until a write
    /// succeeds again.
    sink_rejecting: Mutex<Option<String>>,
    http_addr: OnceLock<SocketAddr>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_source_connected(&self, yes: bool) {
        self.source_connected.store(yes, Ordering::Relaxed);
    }

    /// Reads readiness of the state store from its own flag from now on.
    pub fn watch_state(&self, available: Arc<AtomicBool>) {
        let _ = self.state_available.set(available);
    }

    fn state_available(&self) -> bool {
        self.state_available
            .get()
            .is_some_and(|a| a.load(Ordering::Relaxed))
    }

    /// An output topic refused a write (`Some`, with the error), or a write went through again.
    pub fn set_sink_rejecting(&self, error: Option<&str>) {
        let mut current = self
            .sink_rejecting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match error {
            None if current.is_none() => {}
            None => *current = None,
            Some(e) => *current = Some(e.chars().take(300).collect()),
        }
    }

    /// Whether an output topic is refusing writes (intake pauses meanwhile).
    pub fn sink_rejecting(&self) -> bool {
        self.sink_rejecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.source_connected.load(Ordering::Relaxed)
            && self.state_available()
            && !self.sink_rejecting()
            && !self.draining.load(Ordering::Relaxed)
    }

    /// The address the HTTP port is bound to, once it is.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr.get().copied()
    }

    fn report(&self) -> serde_json::Value {
        json!({
            "ready": self.is_ready(),
            "source_connected": self.source_connected.load(Ordering::Relaxed),
            "state_available": self.state_available(),
            "draining": self.draining.load(Ordering::Relaxed),
            "sink_rejecting": *self.sink_rejecting.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

/// Serves `/healthz` and `/readyz` on `listen` until `stop`.
pub async fn serve(
    listen: &str,
    telemetry: super::Telemetry,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let health = telemetry.health.clone();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen: cannot bind {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let _ = health.http_addr.set(addr);
    tracing::info!(%addr, "health endpoints listening");
    let metrics = telemetry.metrics.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(readyz))
        .with_state(health)
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await?;
    Ok(())
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, Json<serde_json::Value>) {
    let status = if health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health.report()))
}
