//! snapshot-status's counters against the real RabbitMQ (a test binary of its own: the
//! counters are this process's, which no other test moves).

use framework::lapin::BasicProperties;
use framework::testing::*;
use serde_json::{Value, json};
use snapshot_status::{FILES_METRIC, SnapshotStatus, TRANSITIONS, TRANSITIONS_METRIC};

fn file(cid: &str, coll: &str, extra: Value) -> Value {
    let mut v = json!({"correlation_id": cid, "collection_name": coll,
                       "snapshot_type": "incremental", "export_date": "2020-01-01"});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

fn files(counted: &str) -> u64 {
    framework::testing::counted(FILES_METRIC, &[("counted", counted)])
}

/// Every series is exported at 0 from the start (an `increase()` alert missed the first
/// burst after a restart), and `counted="false"` counts duplicates from the sender only:
/// a file message whose first attempt counted its file, then failed (its export-state
/// message unroutable), counted a duplicate at each of its own retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_own_retries_are_no_duplicates_and_every_series_starts_at_zero() {
    let handle = framework::telemetry::metrics_handle();
    let dir = tempfile::tempdir().unwrap();
    let url = db::default_url(dir.path(), "snapshot-status");
    let export_ex = unique("export-state");
    let monitoring_ex = unique("monitoring");
    // Deleted however the test ends.
    let _gone = Cleanup::new(Vec::new(), vec![export_ex.clone(), monitoring_ex.clone()]);
    let cfg = service_config::<SnapshotStatus>(
        dir.path(),
        &[
            ("snapshot_status.database_url", url.as_str()),
            ("snapshot_status.export_state_exchange", export_ex.as_str()),
            (
                "snapshot_status.monitoring_exchange",
                monitoring_ex.as_str(),
            ),
            ("amqp.prefetch", "1"),
        ],
    );
    let mut hs = Harness::start_service::<SnapshotStatus>(cfg).await;
    let text = handle.render();
    let mut zeros: Vec<String> = ["true", "false"]
        .iter()
        .map(|c| format!("{FILES_METRIC}{{counted=\"{c}\"}} 0"))
        .collect();
    zeros.extend(
        TRANSITIONS
            .iter()
            .map(|t| format!("{TRANSITIONS_METRIC}{{to=\"{t}\"}} 0")),
    );
    for line in zeros {
        assert!(text.lines().any(|l| l == line), "`{line}` in:\n{text}");
    }

    let mut out = hs.watch_output().await;
    // Monitoring messages are routable throughout; only the export-state ones are not.
    let _monitoring = watch(&hs.ch, &monitoring_ex, "#").await;
    let send = |v: Value| {
        let hs = &hs;
        async move {
            hs.publish(
                "snapshot.status.update",
                &serde_json::to_vec(&v).unwrap(),
                BasicProperties::default(),
            )
            .await
        }
    };
    let c = "corr-counted-once";
    send(file(c, "db.c", json!({"files_exported": 1}))).await;
    next(&mut out).await;
    // Nothing is bound to the export-state exchange: the file completes its collection,
    // and the attempt that counted it fails on the export-state publish and is retried.
    send(file(c, "db.c", json!({"filename": "c1"}))).await;
    await_outcome_count(&hs.q, "retry", 3).await;
    assert_eq!(files("true"), 1);
    assert_eq!(files("false"), 0, "its own retries are no duplicates");
    // Bound, a retry delivers the export-state message and the file message succeeds.
    let mut export = watch(&hs.ch, &export_ex, "#").await;
    next(&mut export).await;
    next(&mut out).await;
    assert_eq!(files("false"), 0, "its own retries are no duplicates");
    // The sender sending the file again is a duplicate.
    send(file(c, "db.c", json!({"filename": "c1"}))).await;
    next(&mut out).await;
    assert_eq!(files("true"), 1);
    assert_eq!(files("false"), 1, "a second message for the file");
    hs.stop().await;
}
