//! Every node of `[amqp] urls` down at once (design §5): each reconnect tries them all,
//! and the next one starts at another node than the last — never at the same (perhaps
//! dead) node every time, which with two nodes it did (the start moved on twice per
//! failed attempt). One test in a binary of its own: which node a connect starts at is
//! per process, and other tests' connects would move it.

use std::time::Duration;

use framework::lapin::BasicProperties;
use framework::testing::relay::Relay;
use framework::testing::*;
use framework::{MessageContext, Outcome};

#[tokio::test]
async fn reconnects_to_a_down_cluster_take_turns_at_the_first_node() {
    let nodes = [Relay::start().await, Relay::start().await];
    let urls = format!("[\"{}\", \"{}\"]", nodes[0].url, nodes[1].url);
    let mut hs = Harness::start(
        "rotation",
        &[
            ("amqp.urls", &urls),
            ("amqp.url", &nodes[0].url),
            ("amqp.connect_timeout_ms", "1000"),
            ("amqp.reconnect_initial_ms", "50"),
            ("amqp.reconnect_max_ms", "100"),
        ],
        FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v)),
    )
    .await;
    let mut out = hs.watch_output().await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    next(&mut out).await;
    let before: Vec<usize> = nodes.iter().map(|n| n.attempts().len()).collect();
    // One host gone (a connect there waits out the timeout), the other node refusing.
    nodes[0].lose_host();
    nodes[1].refuse();
    // Three failed reconnects, two connects each.
    let deadline = tokio::time::Instant::now() + WAIT;
    let order = loop {
        let mut after: Vec<(std::time::Instant, usize)> = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.attempts()
                    .into_iter()
                    .skip(before[i])
                    .map(move |t| (t, i))
            })
            .collect();
        if after.len() >= 6 {
            after.sort();
            break after.into_iter().map(|(_, i)| i).collect::<Vec<_>>();
        }
        assert!(tokio::time::Instant::now() < deadline, "reconnect attempts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Each reconnect tries both nodes; the next starts at the node tried last, so one node
    // comes twice in a row where a reconnect ends and the next begins. Starting at the same
    // node every time, the nodes strictly alternated.
    assert!(
        order.windows(2).any(|w| w[0] == w[1]),
        "every reconnect started at the same node: {order:?}"
    );
    hs.stop().await;
}
