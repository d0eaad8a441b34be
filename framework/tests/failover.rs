//! A cluster node lost with its host (design §5, `[amqp] urls`): the reconnect after the
//! lost session starts at the next node instead of waiting out the connect timeout on
//! the dead one. One test in a binary of its own: which node a connect starts at is per
//! process, and other tests' connects would move it.

use std::time::Duration;

use framework::lapin::BasicProperties;
use framework::testing::relay::Relay;
use framework::testing::*;
use framework::{MessageContext, Outcome};

/// Publishes message `n` and waits for its output. Earlier messages' outputs may come
/// again first: the ack of one whose output was seen can still be on its way when the
/// node goes, and the broker then redelivers it (at least once, as designed).
async fn round_trip(hs: &Harness, n: u32) {
    let mut out = hs.watch_output().await;
    let body = |n: u32| format!("{{\"n\":{n}}}").into_bytes();
    hs.publish("test.x", &body(n), BasicProperties::default())
        .await;
    loop {
        let got = next(&mut out).await.data;
        if got == body(n) {
            return;
        }
        assert!(
            (1..n).any(|e| got == body(e)),
            "an output of no message: {got:?}"
        );
    }
}

#[tokio::test]
async fn a_lost_node_is_not_tried_first_on_the_reconnect() {
    // Two nodes as the service sees them: relays to the suite's broker.
    let nodes = [Relay::start().await, Relay::start().await];
    let urls = format!("[\"{}\", \"{}\"]", nodes[0].url, nodes[1].url);
    let mut hs = Harness::start(
        "failover",
        &[
            ("amqp.urls", &urls),
            ("amqp.url", &nodes[0].url),
            // Waited out on the dead node, this connect timeout outlasts the test's bound.
            ("amqp.connect_timeout_ms", "600000"),
            ("amqp.reconnect_initial_ms", "100"),
        ],
        FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v)),
    )
    .await;
    round_trip(&hs, 1).await;
    let on: Vec<usize> = nodes.iter().map(Relay::connections).collect();
    let first = match on.as_slice() {
        [1, 0] => 0,
        [0, 1] => 1,
        other => panic!("one connection, through one node: {other:?}"),
    };
    nodes[first].lose_host();
    tokio::time::timeout(Duration::from_secs(120), round_trip(&hs, 2))
        .await
        .expect("reconnected through the other node without waiting on the dead one");
    assert_eq!(
        nodes[1 - first].connections(),
        1,
        "the other node took over"
    );
    hs.stop().await;
}
