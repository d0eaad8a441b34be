//! Span export over OTLP/HTTP against a real HTTP collector stand-in: the exported span
//! carries the ids the service wrote on its output, and a collector that is down costs
//! spans, never messages.

use framework::headers as h;
use framework::lapin::BasicProperties;
use framework::lapin::types::FieldTable;
use framework::testing::*;
use framework::{MessageContext, Outcome};
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn echo() -> FnProcessor<impl Fn(Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v))
}

/// The tests that run a runtime take turns: `storagetier_spans_dropped_total` is one
/// counter for the whole process, so a test counts exactly its own drops only while no
/// other exporter runs. Each waits until all of its spans are counted before it lets go.
static EXPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Spans counted as dropped in this process so far.
fn dropped() -> u64 {
    framework::telemetry::metrics_handle()
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("storagetier_spans_dropped_total "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Every span the collector received so far.
async fn spans(server: &MockServer) -> Vec<Value> {
    let mut all = Vec::new();
    for r in server.received_requests().await.unwrap_or_default() {
        let body: Value = serde_json::from_slice(&r.body).expect("OTLP JSON");
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            assert_eq!(
                rs["resource"]["attributes"][0]["value"]["stringValue"], "test-service",
                "service.name"
            );
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                all.extend(ss["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_exported_as_a_span_with_the_ids_on_the_wire() {
    let _turn = EXPORTING.lock().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let endpoint = server.uri();
    let mut hs = Harness::start("otlp", &[("telemetry.otlp_endpoint", &endpoint)], echo()).await;
    let mut out = hs.watch_output().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut t = FieldTable::default();
    h::set_str(
        &mut t,
        "traceparent",
        &format!("00-{trace}-00f067aa0ba902b7-01"),
    );
    hs.publish(
        "test.span",
        br#"{"n":1}"#,
        BasicProperties::default()
            .with_headers(t)
            .with_message_id("m-otlp".into()),
    )
    .await;
    let d = next(&mut out).await;
    let tp = header(&d, "traceparent").expect("traceparent on the output");
    let span_id = tp.split('-').nth(2).expect("span id").to_string();

    let mut found = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while found.is_none() {
        found = spans(&server)
            .await
            .into_iter()
            .find(|s| s["spanId"] == span_id.as_str());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector received the span {span_id}"
        );
        if found.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let s = found.unwrap();
    assert_eq!(s["traceId"], trace);
    assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(s["kind"], 5);
    assert_eq!(s["status"]["code"], 1);
    let attr = |k: &str| {
        s["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
    };
    assert_eq!(
        attr("storagetier.outcome").unwrap()["stringValue"],
        "success"
    );
    assert_eq!(
        attr("messaging.message.id").unwrap()["stringValue"],
        "m-otlp"
    );
    assert_eq!(
        attr("messaging.destination.name").unwrap()["stringValue"],
        hs.q.as_str()
    );
    let start: u128 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 0 && end >= start);
    hs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_not_messages() {
    // Nothing listens on this port: every export fails.
    let dead = format!(
        "http://127.0.0.1:{}",
        framework::testing::broker::free_port()
    );
    let _turn = EXPORTING.lock().await;
    let before = dropped();
    let mut hs = Harness::start("otlp-down", &[("telemetry.otlp_endpoint", &dead)], echo()).await;
    let mut out = hs.watch_output().await;
    for i in 0..20 {
        hs.publish(
            "test.x",
            format!(r#"{{"i":{i}}}"#).as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    for _ in 0..20 {
        next(&mut out).await;
    }
    // Each lost span is counted, once.
    wait_until("the 20 spans counted as dropped", || {
        dropped() - before >= 20
    })
    .await;
    hs.stop().await;
    assert_eq!(dropped() - before, 20, "each of the 20 spans counted once");
}

/// A collector that fails fast (a wrong path, no endpoints behind its name) is asked less
/// and less often, not once per message (and the log gets a line a minute, not a line a
/// message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_collector_is_not_asked_once_per_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let endpoint = server.uri();
    let _turn = EXPORTING.lock().await;
    let before = dropped();
    let mut hs = Harness::start(
        "otlp-failing",
        &[("telemetry.otlp_endpoint", &endpoint)],
        echo(),
    )
    .await;
    let mut out = hs.watch_output().await;
    // One at a time: each span is alone in the buffer when it is exported.
    for i in 0..10 {
        hs.publish(
            "test.x",
            format!(r#"{{"i":{i}}}"#).as_bytes(),
            BasicProperties::default(),
        )
        .await;
        next(&mut out).await;
    }
    let requests = || async { server.received_requests().await.unwrap_or_default() };
    let exported = || async {
        let mut n = 0;
        for r in requests().await {
            let body: Value = serde_json::from_slice(&r.body).expect("OTLP JSON");
            n += body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .map_or(0, Vec::len);
        }
        n
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while exported().await < 10 {
        assert!(std::time::Instant::now() < deadline, "every span offered");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let asked = requests().await.len();
    assert!(asked < 10, "{asked} requests for 10 spans");
    // Counted when the collector's answer is back, a moment after it saw the request.
    wait_until("the 10 refused spans counted as dropped", || {
        dropped() - before >= 10
    })
    .await;
    hs.stop().await;
    assert_eq!(dropped() - before, 10, "each refused span counted once");
}

#[test]
fn a_bad_endpoint_is_a_config_error_naming_the_key() {
    let opts = framework::LoadOptions {
        overrides: vec![("telemetry.otlp_endpoint".into(), "collector:4318".into())],
        ..Default::default()
    };
    let e = framework::config::load::<serde::de::IgnoredAny>("echo", &opts).unwrap_err();
    assert_eq!(e.key, "telemetry.otlp_endpoint");
}
