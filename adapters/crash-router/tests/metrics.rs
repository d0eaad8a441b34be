//! crash-router's counters from its start (a test binary of its own: the counters are
//! this process's, which no other test moves).

use crash_router::CrashRouterService;
use crash_router::router::{RECORD_RESULTS, RECORDS_METRIC};
use framework::lapin::options::QueueDeclareOptions;
use framework::lapin::types::FieldTable;
use framework::testing::*;

/// Every documented `result` is exported at 0 as soon as the service runs: an
/// `increase()` alert over a series that appeared with its first record missed that
/// first burst after a restart.
#[tokio::test]
async fn every_result_is_exported_at_zero_from_the_start() {
    let handle = framework::telemetry::metrics_handle();
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let dest = unique("crash-dest");
    // Deleted however the test ends.
    let _gone = Cleanup::new(vec![dest.clone()], Vec::new());
    ch.queue_declare(
        dest.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare destination queue");
    let mut hs = Harness::start_service::<CrashRouterService>(
        service_config::<CrashRouterService>(data.path(), &[("crash_router.queues", &dest)]),
    )
    .await;
    let text = handle.render();
    for result in RECORD_RESULTS {
        let line = format!("{RECORDS_METRIC}{{result=\"{result}\"}} 0");
        assert!(text.lines().any(|l| l == line), "`{line}` in:\n{text}");
    }
    // Then each record of a notification is counted under its own result (here, not in a
    // test beside it: the counters are this process's).
    let mut out = hs.watch_output().await;
    let put = |key: String, event: &str| {
        serde_json::json!({"eventSource": "aws:s3", "eventName": event,
            "s3": {"bucket": {"name": "crashes"}, "object": {"key": key, "size": 100}}})
    };
    let raw = |digit: char| {
        format!("v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc0{digit}180313")
    };
    let body = serde_json::json!({"Records": [
        put(raw('0'), "ObjectCreated:Put"),     // accepted
        put(raw('1'), "ObjectCreated:Put"),     // deferred
        put(raw('7'), "ObjectCreated:Put"),     // junk: another throttle digit
        put(raw('0'), "ObjectRemoved:Delete"),  // ignored: another event
    ]});
    hs.publish("k", body.to_string().as_bytes(), Default::default())
        .await;
    next(&mut out).await;
    // Counted once the input's ack is sent, which may follow the output's arrival here.
    let want: Vec<String> = [
        ("accepted", 1),
        ("deferred", 1),
        ("junk", 1),
        ("ignored", 1),
    ]
    .iter()
    .map(|(result, n)| format!("{RECORDS_METRIC}{{result=\"{result}\"}} {n}"))
    .collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = handle.render();
        if want.iter().all(|line| text.lines().any(|l| l == line)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{want:?} in:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hs.stop().await;
}
