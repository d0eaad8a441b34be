//! The depth of each of a service's own queues is a gauge (`storagetier_queue_messages`),
//! read passively at `[amqp] queue_metrics_interval_ms`.

use framework::lapin::BasicProperties;
use framework::testing::*;
use framework::{MessageContext, Outcome};

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
