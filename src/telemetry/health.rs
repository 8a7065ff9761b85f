//! Liveness and readiness, and the HTTP port that serves them with the metrics (`/healthz`,
//! `/readyz`, `/metrics`).
//!
//! Ready means: the source is connected, the state store is reachable, no output topic is
//! refusing writes and the process is not draining. Kubernetes stops routing to (and the HPA stops counting on) a replica that is not
//! ready; a replica that is alive but not ready is never restarted for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Output writes currently held because their topic refuses them (authorization, missing
    /// topic), and the last such refusal.
    sink_refusals: AtomicUsize,
    last_refusal: Mutex<Option<String>>,
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

    /// An output write was refused by its topic: readiness fails and intake pauses for as long
    /// as the returned guard lives (the write holds it until it goes through or ends).
    pub fn sink_refused(self: &Arc<Self>, error: &str) -> SinkRefusal {
        self.note_refusal(error);
        self.sink_refusals.fetch_add(1, Ordering::Relaxed);
        SinkRefusal(self.clone())
    }

    /// Records the latest refusal's text (for `/readyz`).
    pub fn note_refusal(&self, error: &str) {
        *self.last_refusal.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(error.chars().take(300).collect());
    }

    /// Whether some output write is held by a topic refusing it (intake pauses meanwhile).
    pub fn sink_rejecting(&self) -> bool {
        self.sink_refusals.load(Ordering::Relaxed) > 0
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
            "sink_rejecting": self
                .sink_rejecting()
                .then(|| self.last_refusal.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        })
    }
}

/// Held by an output write its topic refuses; dropping it (the write went through, or ended)
/// lifts the refusal's hold on readiness and intake.
#[derive(Debug)]
pub struct SinkRefusal(Arc<Health>);

impl Drop for SinkRefusal {
    fn drop(&mut self) {
        self.0.sink_refusals.fetch_sub(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_write_holds_readiness_only_while_it_lives() {
        let health = Health::new();
        health.set_source_connected(true);
        health.watch_state(Arc::new(AtomicBool::new(true)));
        assert!(health.is_ready());
        let first = health.sink_refused("TopicAuthorizationFailed on results");
        let second = health.sink_refused("TopicAuthorizationFailed on review");
        assert!(!health.is_ready() && health.sink_rejecting());
        drop(first);
        assert!(
            health.sink_rejecting(),
            "another write is still refused: one topic working again does not clear it"
        );
        // The second write ends without succeeding (stopped, lease lost): its hold ends too.
        drop(second);
        assert!(health.is_ready(), "nothing left holding it: ready again");
    }
}
