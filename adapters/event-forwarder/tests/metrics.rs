//! event-forwarder's counters from its start (a test binary of its own: the counters are
//! this process's, which no other test moves).

use event_forwarder::EventForwarderService;
use event_forwarder::service::{POST_RESULTS, POSTS_METRIC};
use framework::testing::*;

/// Every documented `result` is exported at 0 as soon as the service runs: an
/// `increase()` alert over a series that appeared with its first POST missed that first
/// burst after a restart.
#[tokio::test]
async fn every_result_is_exported_at_zero_from_the_start() {
    let handle = framework::telemetry::metrics_handle();
    let server = wiremock::MockServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let endpoint = format!("{}/events", server.uri());
    let mut hs =
        Harness::start_service::<EventForwarderService>(service_config::<EventForwarderService>(
            data.path(),
            &[
                ("event_forwarder.endpoint", endpoint.as_str()),
                ("event_forwarder.token", "tok-9f8e7d6c5b4a"),
            ],
        ))
        .await;
    let text = handle.render();
    for result in POST_RESULTS {
        let line = format!("{POSTS_METRIC}{{result=\"{result}\"}} 0");
        assert!(text.lines().any(|l| l == line), "`{line}` in:\n{text}");
    }
    hs.stop().await;
}
