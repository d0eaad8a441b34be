//! Optional span export over OTLP/HTTP (design §6, `[telemetry] otlp_endpoint`): one span
//! per handled message, POSTed in batches as OTLP JSON to `<endpoint>/v1/traces`.
//!
//! The spans carry exactly the trace and span ids this service writes on its outputs'
//! `traceparent` (see [`crate::trace`]), so a collector joins them with the spans of the
//! services downstream; an SDK that mints its own span ids could not promise that. Export
//! never slows or fails message handling: spans go through a bounded buffer, and a full
//! buffer or an unreachable collector drops spans (counted in
//! `storagetier_spans_dropped_total`) instead of messages.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::TelemetryConfig;
use crate::trace::TraceContext;

/// Spans not exported: the buffer was full or the collector failed.
pub const SPANS_DROPPED_TOTAL: &str = "storagetier_spans_dropped_total";

/// Spans held for export at most; beyond, new spans are dropped.
const BUFFER: usize = 8192;
/// Spans per request at most.
const BATCH: usize = 512;

/// One handled message, as exported.
#[derive(Debug, Clone)]
pub struct Span {
    /// The trace ids of the handling (those written on its outputs).
    pub trace: TraceContext,
    /// When handling started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// The input queue.
    pub queue: String,
    /// The message's original routing key.
    pub routing_key: String,
    /// Its message id, if any.
    pub message_id: Option<String>,
    /// Its 0-based attempt.
    pub attempt: u32,
    /// The outcome's metric label (success, retry, dead_letter, drop, interrupted).
    pub outcome: &'static str,
    /// Why it failed, for retries and dead letters.
    pub error: Option<String>,
}

/// Exports the spans of one runtime to an OTLP/HTTP collector.
#[derive(Debug)]
pub struct SpanExporter {
    tx: mpsc::Sender<Span>,
    rx: Mutex<Option<mpsc::Receiver<Span>>>,
    url: String,
    timeout: Duration,
    service: String,
}

/// `<endpoint>/v1/traces`, the path added before any query (`?api_key=…`, which a text
/// appended after would have corrupted, sending every batch to `/`). An endpoint already
/// ending in `/v1/traces` (the full URL, as other exporters' `…_TRACES_ENDPOINT` take it)
/// is kept: doubled, every batch went to `/v1/traces/v1/traces` (404) and was dropped.
fn traces_url(endpoint: &str) -> String {
    const TRACES: &str = "/v1/traces";
    match url::Url::parse(endpoint) {
        Ok(mut u) => {
            let base = u.path().trim_end_matches('/');
            let path = if base.ends_with(TRACES) {
                base.to_string()
            } else {
                format!("{base}{TRACES}")
            };
            u.set_path(&path);
            u.to_string()
        }
        Err(_) if endpoint.ends_with(TRACES) => endpoint.to_string(),
        Err(_) => format!("{endpoint}{TRACES}"),
    }
}

impl SpanExporter {
    /// An exporter for `service` when `[telemetry] otlp_endpoint` is set; None when export
    /// is off.
    pub fn new(cfg: &TelemetryConfig, service: &str) -> Option<Self> {
        let endpoint = cfg.otlp_endpoint.trim().trim_end_matches('/');
        if endpoint.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel(BUFFER);
        Some(Self {
            tx,
            rx: Mutex::new(Some(rx)),
            url: traces_url(endpoint),
            timeout: Duration::from_millis(cfg.otlp_timeout_ms),
            service: service.to_string(),
        })
    }

    /// Queues a span for export; drops it (counted) if the buffer is full.
    pub fn record(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            metrics::counter!(SPANS_DROPPED_TOTAL).increment(1);
        }
    }

    /// Sends what is buffered, in batches, until `stop`, then the rest; only the first
    /// call of an exporter does anything.
    pub async fn run(&self, stop: CancellationToken) {
        let rx = self.rx.lock().ok().and_then(|mut r| r.take());
        let Some(mut rx) = rx else { return };
        // Shown at 0 from the start: `increase(...) > 0` cannot see a first sample of 1.
        metrics::counter!(SPANS_DROPPED_TOTAL).increment(0);
        let client = match reqwest::Client::builder().timeout(self.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the OTLP client; spans are not exported");
                return;
            }
        };
        let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
        let mut failing = Failing::default();
        loop {
            // Whatever is buffered goes out at once: a batch waits only for the request
            // before it, so a span reaches the collector about as soon as the next
            // export can start.
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
                _ = stop.cancelled() => {
                    rx.close();
                    while rx.recv_many(&mut batch, BATCH).await > 0 {
                        self.export(&client, std::mem::take(&mut batch), &mut failing).await;
                    }
                    return;
                }
            }
            self.export(&client, std::mem::take(&mut batch), &mut failing)
                .await;
            // A collector that keeps failing is asked less and less often (spans wait in
            // the buffer, and beyond it are dropped and counted): not a request per message.
            if let Some(wait) = failing.backoff {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }

    async fn export(&self, client: &reqwest::Client, spans: Vec<Span>, failing: &mut Failing) {
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        let body = request_body(&self.service, &spans);
        let sent = client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let failure = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status())),
            Err(e) => Some(e.without_url().to_string()),
        };
        match failure {
            Some(why) => {
                metrics::counter!(SPANS_DROPPED_TOTAL).increment(n);
                failing.failed(n, |dropped| {
                    tracing::warn!(url = %crate::config::redacted_url(&self.url), error = %why,
                        spans = dropped, "OTLP export failed; spans dropped");
                });
            }
            None => failing.recovered(),
        }
    }
}

/// An export that keeps failing: a warning a minute (with the spans dropped since the
/// last), not a line per message, and a growing wait between requests.
#[derive(Debug, Default)]
struct Failing {
    backoff: Option<Duration>,
    warned: Option<tokio::time::Instant>,
    unwarned: u64,
}

impl Failing {
    const FIRST_WAIT: Duration = Duration::from_secs(1);
    const LONGEST_WAIT: Duration = Duration::from_secs(30);
    const WARN_EVERY: Duration = Duration::from_secs(60);

    fn failed(&mut self, dropped: u64, warn: impl FnOnce(u64)) {
        self.unwarned += dropped;
        if self.warned.is_none_or(|w| w.elapsed() >= Self::WARN_EVERY) {
            warn(self.unwarned);
            self.warned = Some(tokio::time::Instant::now());
            self.unwarned = 0;
        }
        self.backoff = Some(
            self.backoff
                .map_or(Self::FIRST_WAIT, |b| (b * 2).min(Self::LONGEST_WAIT)),
        );
    }

    /// An export worked: the spans dropped since the last warning are said, and the next
    /// failure is warned about at once (a collector that flaps is seen each time).
    fn recovered(&mut self) {
        if self.backoff.take().is_some() {
            tracing::info!(
                spans_dropped_unreported = self.unwarned,
                "OTLP export works again"
            );
        }
        self.unwarned = 0;
        self.warned = None;
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

fn attr(key: &str, value: Value) -> Value {
    json!({"key": key, "value": value})
}

/// The OTLP/HTTP JSON request of `spans` (ids hex, times as decimal strings, as the OTLP
/// JSON encoding has them).
pub fn request_body(service: &str, spans: &[Span]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut attributes = vec![
                attr("messaging.system", json!({"stringValue": "rabbitmq"})),
                attr(
                    "messaging.operation.type",
                    json!({"stringValue": "process"}),
                ),
                attr(
                    "messaging.destination.name",
                    json!({"stringValue": s.queue}),
                ),
                attr(
                    "messaging.rabbitmq.destination.routing_key",
                    json!({"stringValue": s.routing_key}),
                ),
                attr(
                    "storagetier.attempt",
                    json!({"intValue": s.attempt.to_string()}),
                ),
                attr("storagetier.outcome", json!({"stringValue": s.outcome})),
            ];
            if let Some(id) = &s.message_id {
                attributes.push(attr("messaging.message.id", json!({"stringValue": id})));
            }
            // OTLP status codes: 1 = OK, 2 = ERROR.
            let status = match &s.error {
                Some(e) => json!({"code": 2, "message": e}),
                None => json!({"code": 1}),
            };
            let mut span = json!({
                "traceId": s.trace.trace_id,
                "spanId": s.trace.span_id,
                "name": format!("{} process", s.queue),
                "kind": 5, // SPAN_KIND_CONSUMER
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": attributes,
                "status": status,
            });
            if let Some(p) = &s.trace.parent_span_id {
                span["parentSpanId"] = json!(p);
            }
            if let Some(ts) = &s.trace.tracestate {
                span["traceState"] = json!(ts);
            }
            span
        })
        .collect();
    json!({"resourceSpans": [{
        "resource": {"attributes": [attr("service.name", json!({"stringValue": service}))]},
        "scopeSpans": [{"scope": {"name": "storagetier"}, "spans": spans}],
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path goes before the query a collector's API key may travel in.
    #[test]
    fn the_traces_path_goes_before_the_query() {
        assert_eq!(
            traces_url("https://otel:4318?api_key=K"),
            "https://otel:4318/v1/traces?api_key=K"
        );
        assert_eq!(
            traces_url("http://otel-collector:4318"),
            "http://otel-collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://gw/otlp/?k=v"),
            "http://gw/otlp/v1/traces?k=v"
        );
    }

    /// A full traces URL is taken as it is: `/v1/traces` appended again sent every batch
    /// to a path the collector does not serve (404), dropping every span.
    #[test]
    fn an_endpoint_already_naming_the_traces_path_is_not_doubled() {
        for (endpoint, sent) in [
            ("http://host:4318/v1/traces", "http://host:4318/v1/traces"),
            (
                "http://host:4318/v1/traces/?k=v",
                "http://host:4318/v1/traces?k=v",
            ),
            (
                "https://gw/otlp/v1/traces?api_key=K",
                "https://gw/otlp/v1/traces?api_key=K",
            ),
        ] {
            assert_eq!(traces_url(endpoint), sent, "{endpoint}");
        }
        // Another path ending in `traces` is a base still.
        assert_eq!(
            traces_url("http://gw/my-traces"),
            "http://gw/my-traces/v1/traces"
        );
    }

    #[test]
    fn the_request_carries_the_ids_written_on_the_wire() {
        let mut h = lapin::types::FieldTable::default();
        crate::headers::set_str(
            &mut h,
            crate::trace::TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let trace = TraceContext::continue_from(&h);
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let span = Span {
            trace: trace.clone(),
            start,
            end: start + Duration::from_millis(5),
            queue: "q".into(),
            routing_key: "k.x".into(),
            message_id: Some("m-1".into()),
            attempt: 2,
            outcome: "retry",
            error: Some("down".into()),
        };
        let body = request_body("echo", &[span]);
        let s = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s["parentSpanId"], "b7ad6b7169203331");
        assert_eq!(s["spanId"], trace.span_id.as_str());
        assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(s["endTimeUnixNano"], "1700000000005000000");
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(
            body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "echo"
        );
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        let cfg = TelemetryConfig {
            otlp_endpoint: " ".into(),
            otlp_timeout_ms: 1000,
        };
        assert!(SpanExporter::new(&cfg, "echo").is_none());
    }
}
