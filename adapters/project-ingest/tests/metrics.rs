//! project-ingest's event counter against the real RabbitMQ (a test binary of its own:
//! the counters are this process's, which no other test moves).

use base64::Engine;
use framework::lapin::BasicProperties;
use framework::testing::*;
use project_ingest::{EVENT_RESULTS, EVENTS_METRIC, ProjectIngest};
use serde_json::{Value, json};

fn project(kind: &str, id: &str, title: &str) -> Value {
    json!({"type": kind, "id": id, "title": title, "status": "New",
           "commissionId": "c-1", "commissionTitle": "Commission one",
           "productionOffice": "UK", "created": "2017-04-24T17:20:11.503Z"})
}

/// A Kinesis envelope of `records`, the `i`th arriving `i` seconds after the first.
fn kinesis(records: &[Value]) -> Value {
    let recs: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let data =
                base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(r).unwrap());
            json!({"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "1",
                   "sequenceNumber": format!("4959{i}"), "data": data,
                   "approximateArrivalTimestamp": 1_545_084_650.987 + i as f64},
                   "eventSource": "aws:kinesis", "eventID": format!("shardId-000:{i}")})
        })
        .collect();
    json!({ "Records": recs })
}

fn events(result: &str) -> u64 {
    counted(EVENTS_METRIC, &[("result", result)])
}

/// Every `result` is exported at 0 from the start (an `increase()` alert missed the first
/// burst after a restart), and each record of a batch is counted once, on its message's
/// final outcome: retried while one update waited for its create, a batch of a create, a
/// bad record and that update counted every record at every attempt (stored=6, invalid=6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_is_counted_once_and_every_result_from_the_start() {
    let handle = framework::telemetry::metrics_handle();
    let dir = tempfile::tempdir().unwrap();
    let url = db::default_url(dir.path(), "project-ingest");
    let cfg = service_config::<ProjectIngest>(
        dir.path(),
        &[
            ("project_ingest.database_url", url.as_str()),
            ("project_ingest.missing_project_retries", "50"),
        ],
    );
    let mut hs = Harness::start_service::<ProjectIngest>(cfg).await;
    let text = handle.render();
    for result in EVENT_RESULTS {
        let line = format!("{EVENTS_METRIC}{{result=\"{result}\"}} 0");
        assert!(text.lines().any(|l| l == line), "`{line}` in:\n{text}");
    }

    let mut batch = kinesis(&[
        project("project-created", "counted-a", "a"),
        project("project-created", "counted-bad", "bad"),
        project("project-updated", "counted-b", "b, updated"),
    ]);
    batch["Records"][1]["kinesis"]["data"] = json!("%%% not base64 %%%");
    let send = |v: Value| {
        let hs = &hs;
        async move {
            hs.publish(
                "core.project.event",
                &serde_json::to_vec(&v).unwrap(),
                BasicProperties::default(),
            )
            .await
        }
    };
    send(batch).await;
    // The update waits for its create: the batch is retried, each attempt handling every
    // record again.
    await_outcome_count(&hs.q, "retry", 2).await;
    // Arriving before the update (Kinesis arrival times), so the update applies over it.
    send(kinesis(&[project("project-created", "counted-b", "b")])).await;
    await_outcome_count(&hs.q, "success", 2).await;
    assert_eq!(events("stored"), 3, "a, b's update and b's create");
    assert_eq!(events("invalid"), 1);
    for result in ["deleted", "missing", "stale", "unknown_type"] {
        assert_eq!(events(result), 0, "{result}");
    }

    // An announcement the broker refuses (a full queue bound to the output exchange that
    // rejects publishes) makes the message a retry: its record is counted when its outcome
    // is published at last, not at the refused attempt too.
    let full = format!("{}-full", hs.q);
    let _full_gone = Cleanup::new(vec![full.clone()], vec![]);
    let mut args = framework::lapin::types::FieldTable::default();
    args.insert(
        "x-max-length".into(),
        framework::lapin::types::AMQPValue::LongLongInt(0),
    );
    args.insert(
        "x-overflow".into(),
        framework::lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    hs.ch
        .queue_declare(
            full.as_str().into(),
            // Durable: RabbitMQ 4.x deprecates transient queues that are not exclusive.
            framework::lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("a full queue");
    hs.ch
        .queue_bind(
            full.as_str().into(),
            hs.output_exchange.as_str().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("bound to the output");
    let (retries, successes) = (
        outcome_count(&hs.q, "retry"),
        outcome_count(&hs.q, "success"),
    );
    send(kinesis(&[project("project-created", "counted-c", "c")])).await;
    await_outcome_count(&hs.q, "retry", retries + 1).await;
    assert_eq!(events("stored"), 3, "not counted at the refused attempt");
    hs.ch
        .queue_delete(full.as_str().into(), Default::default())
        .await
        .expect("the full queue deleted");
    await_outcome_count(&hs.q, "success", successes + 1).await;
    assert_eq!(events("stored"), 4, "counted once, when announced");
    hs.stop().await;
}
