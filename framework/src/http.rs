//! `/metrics`, `/healthz` and `/readyz` (design §6).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::runtime::Status;
use crate::telemetry;

/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Connections served at once: a scraper and a few probes need a handful. Beyond it the
/// oldest is closed for the newest, so idle or half-sent requests can neither use up the
/// descriptors that copies, the database and the broker need, nor keep a probe out (a
/// liveness probe refused restarts a healthy service).
const MAX_CONNECTIONS: usize = 64;

/// A request's headers must have arrived within this (a half-sent request held a
/// connection, and the server's shutdown with it, for ever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection is closed after this however it is used (a scraper reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

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
                    telemetry::count_dropped_log_lines();
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
    let task = tokio::spawn(accept(listener, app, shutdown, HEADER_READ_TIMEOUT));
    Ok((local, task))
}

/// The connections being served, oldest first, each with what closes it.
#[derive(Default)]
struct Open {
    next: u64,
    live: std::collections::VecDeque<(u64, CancellationToken)>,
}

impl Open {
    /// Admits a new connection, closing the oldest when [`MAX_CONNECTIONS`] are open.
    fn admit(&mut self, max: usize) -> (u64, CancellationToken) {
        while self.live.len() >= max {
            match self.live.pop_front() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let id = self.next;
        self.next += 1;
        let close = CancellationToken::new();
        self.live.push_back((id, close.clone()));
        (id, close)
    }

    fn remove(&mut self, id: u64) {
        self.live.retain(|(i, _)| *i != id);
    }
}

/// Serves `app` on `listener` until `shutdown`: one request per connection (a client
/// cannot queue pipelined requests it never reads), each bounded in the time its headers
/// take and in its lifetime, at most [`MAX_CONNECTIONS`] at once (the oldest making room),
/// and closed when the server stops (a scrape in flight is cut: the process is going away).
async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
    header_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = Arc::new(std::sync::Mutex::new(Open::default()));
    // Failed accepts since the last warning, and when it was: one line a minute, not five
    // a second, while the process is out of descriptors.
    let mut failed = 0u64;
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((stream, _)) => stream,
                // Out of descriptors, say: the listener stays, and the next try waits a
                // moment instead of spinning.
                Err(e) => {
                    failed += 1;
                    if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(error = %e, failed,
                            "health/metrics server cannot accept connections");
                        warned = Some(tokio::time::Instant::now());
                        failed = 0;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            },
        };
        let (id, close) = open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(MAX_CONNECTIONS);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                _ = stop.cancelled() => {}
                _ = close.cancelled() => {}
            }
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A server of `/healthz` alone, its headers never overdue: its address, what stops it
    /// and its task.
    async fn healthz_server() -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let stop = CancellationToken::new();
        let server = tokio::spawn(accept(
            listener,
            app,
            stop.clone(),
            Duration::from_secs(3600),
        ));
        (addr, stop, server)
    }

    /// A probe's whole answer to `GET /healthz` on a connection of its own.
    async fn probe(addr: SocketAddr) -> Vec<u8> {
        let mut probe = tokio::net::TcpStream::connect(addr).await.expect("connect");
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("a whole request");
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut probe, &mut answer)
            .await
            .expect("answered");
        answer
    }

    /// The server stops when told, whatever its connections are doing: one holding a
    /// half-sent request (its headers not overdue yet) kept axum's graceful shutdown, and
    /// SIGTERM with it, waiting for ever.
    #[tokio::test]
    async fn the_server_stops_with_a_request_still_half_sent() {
        let (addr, stop, server) = healthz_server().await;
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a request");
        // Accepted and being served before the stop.
        let answer = probe(addr).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), server)
            .await
            .expect("stopped with a connection still open")
            .expect("server task");
        drop(client);
    }

    /// Connections that hold their place (headers sent slowly, pipelined requests never
    /// read) cannot keep a probe out: the oldest makes room for it. Refused, a liveness
    /// probe restarts a healthy service.
    #[tokio::test]
    async fn held_connections_do_not_keep_a_probe_out() {
        let (addr, stop, server) = healthz_server().await;
        let mut held = Vec::new();
        for i in 0..MAX_CONNECTIONS * 2 {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let half: &[u8] = if i % 2 == 0 {
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            } else {
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            };
            c.write_all(half).await.expect("held");
            held.push(c);
        }
        let answer = probe(addr).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        stop.cancel();
        server.await.expect("server task");
    }
}
