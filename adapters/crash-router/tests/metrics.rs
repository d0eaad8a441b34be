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
    hs.stop().await;
}
