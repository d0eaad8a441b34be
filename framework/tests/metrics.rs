//! The depth of each of a service's own queues is a gauge (`storagetier_queue_messages`),
//! read passively at `[amqp] queue_metrics_interval_ms`.

use framework::lapin::BasicProperties;
use framework::testing::*;
use framework::{MessageContext, Outcome, Publication};

#[tokio::test]
async fn queue_depths_are_served_as_gauges() {
    let handle = framework::telemetry::metrics_handle();
    let p = FnProcessor(|_: serde_json::Value, _: &MessageContext| Outcome::permanent("bad"));
    let hs = Harness::start("depth", &[("amqp.queue_metrics_interval_ms", "100")], p).await;
    for i in 0..2 {
        hs.publish(
            "test.x",
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let dlq = format!("storagetier_queue_messages{{queue=\"{}-dlq\"}} 2", hs.q);
    let input = format!("storagetier_queue_messages{{queue=\"{}\"}} 0", hs.q);
    let tier = format!(
        "storagetier_queue_messages{{queue=\"{}-retry-200\"}} 0",
        hs.q
    );
    wait_until("the DLQ depth to show 2", || {
        let text = handle.render();
        text.contains(&dlq) && text.contains(&input) && text.contains(&tier)
    })
    .await;
}

/// Every metric served has its `# HELP` line (Prometheus's metadata and Grafana show it
/// beside the series; without one each was a bare name).
#[tokio::test]
async fn every_metric_served_is_described() {
    let handle = framework::telemetry::metrics_handle();
    let hs = Harness::start(
        "described",
        &[],
        FnProcessor(|v: serde_json::Value, _: &MessageContext| Outcome::success(v)),
    )
    .await;
    hs.publish("test.x", b"{}", BasicProperties::default())
        .await;
    await_outcome_count(&hs.q, "success", 1).await;
    let text = handle.render();
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("storagetier_"))
        .collect();
    assert!(
        typed.contains(&framework::telemetry::MESSAGES_TOTAL)
            && typed.contains(&framework::telemetry::HANDLER_SECONDS),
        "{text}"
    );
    for name in typed {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "{name} has no HELP line"
        );
    }
}

/// Publishes from its handler to an exchange that does not exist, then, mandatory, to a
/// queue that does not exist; drops the message saying how each went.
struct PublishesNowhere;

#[framework::async_trait]
impl framework::MessageProcessor for PublishesNowhere {
    type Input = serde_json::Value;
    async fn handle(&self, _v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let missing = ctx
            .publish(Publication::text(
                &unique("no-such-exchange"),
                "k",
                "to nowhere",
            ))
            .await;
        let unroutable = ctx
            .publish(Publication::text("", &unique("no-such-queue"), "to nowhere").mandatory())
            .await;
        Outcome::drop(format!(
            "missing exchange: {}, unroutable: {}",
            missing.is_err(),
            unroutable.is_err()
        ))
    }
}

/// A handler's own publishes that fail count in `storagetier_publish_failures_total` as
/// outcome publishes do (crash-router's destinations, snapshot-status's exports).
#[tokio::test]
async fn a_handlers_failed_publishes_are_counted() {
    let _ = framework::telemetry::metrics_handle();
    let hs = Harness::start("pubfail", &[], PublishesNowhere).await;
    let failures = || counted("storagetier_publish_failures_total", &[("queue", &hs.q)]);
    assert_eq!(failures(), 0);
    hs.publish("test.x", b"{}", BasicProperties::default())
        .await;
    await_outcome_count(&hs.q, "drop", 1).await;
    assert_eq!(failures(), 2, "both of the handler's publishes failed");
}

/// An outcome that cannot be published and the retry that replaces it, failing too, are
/// two failed publishes: the second was not counted, so an alert on the counter missed
/// half of what a broken topology cost.
#[tokio::test]
async fn a_failed_outcome_and_its_failed_replacement_count_twice() {
    use framework::lapin::options::ExchangeDeleteOptions;
    let _ = framework::telemetry::metrics_handle();
    let hs = Harness::start(
        "pubfail-twice",
        &[],
        FnProcessor(|v: serde_json::Value, _: &MessageContext| Outcome::success(v)),
    )
    .await;
    let failures = || counted("storagetier_publish_failures_total", &[("queue", &hs.q)]);
    assert_eq!(failures(), 0);
    // Both the output exchange (the success) and the retry exchange (its replacement)
    // gone, deleted by hand: the next session declares them again.
    for x in [hs.output_exchange.clone(), format!("{}-retry", hs.q)] {
        hs.ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("deleted");
    }
    hs.publish("test.x", b"{}", BasicProperties::default())
        .await;
    await_outcome_count(&hs.q, "success", 1).await;
    assert_eq!(
        failures(),
        2,
        "the success and its replacement retry both failed"
    );
}

/// While the service is disconnected its queues' depths cannot be read: the gauges
/// would hold the last depths as if current, so `storagetier_queue_depth_unreadable` is 1
/// until the next session reads them again.
#[tokio::test]
async fn depths_are_unreadable_while_disconnected() {
    let handle = framework::telemetry::metrics_handle();
    let name = unique("depth-conn");
    let hs = Harness::start(
        "depthlost",
        &[
            ("amqp.queue_metrics_interval_ms", "100"),
            ("amqp.connection_name", &name),
            // Long enough a gap for the test to see it.
            ("amqp.reconnect_initial_ms", "2000"),
            ("amqp.reconnect_max_ms", "2000"),
        ],
        FnProcessor(|v: serde_json::Value, _: &MessageContext| Outcome::success(v)),
    )
    .await;
    let queues = hs.topology().queue_names();
    let all_show = |v: u8| {
        let text = handle.render();
        queues.iter().all(|q| {
            text.contains(&format!(
                "storagetier_queue_depth_unreadable{{queue=\"{q}\"}} {v}\n"
            ))
        })
    };
    wait_until("every depth to be read", || all_show(0)).await;
    let mut sessions = hs.status.sessions();
    assert_eq!(close_connection_named(&name).await, 1);
    wait_until("every depth to show unreadable while disconnected", || {
        all_show(1)
    })
    .await;
    assert!(
        !hs.status.is_ready(),
        "still disconnected when they showed it"
    );
    within(WAIT, "reconnecting", sessions.wait_for(|n| *n >= 2))
        .await
        .expect("status alive");
    wait_until("every depth to be read again", || all_show(0)).await;
}
