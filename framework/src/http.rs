//! `/metrics`, `/healthz` and `/readyz` (design §6).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::runtime::Status;
use crate::telemetry;

/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr` (failing fast, e.g. port in use) and serves until `shutdown`.
pub async fn serve(
    addr: &str,
    status: Arc<Status>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = telemetry::metrics_handle();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<Status>>| async move {
                if s.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move {
                    h.run_upkeep();
                    ([("content-type", "text/plain; version=0.0.4")], h.render())
                }
            }),
        )
        .with_state(status);
    // Histogram samples are kept until upkeep folds them into their buckets: without it
    // an instance nobody scrapes would grow with every message.
    let upkeep = telemetry::metrics_handle();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => break,
                _ = tokio::time::sleep(UPKEEP_EVERY) => upkeep.run_upkeep(),
            }
        }
    });
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "health/metrics server failed");
        }
    });
    Ok((local, task))
}
