//! A cluster node lost with its host (design §5, `[amqp] urls`): the reconnect after the
//! lost session starts at the next node instead of waiting out the connect timeout on
//! the dead one. One test in a binary of its own: which node a connect starts at is per
//! process, and other tests' connects would move it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use framework::lapin::BasicProperties;
use framework::testing::*;
use framework::{MessageContext, Outcome};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A cluster node as the service sees it: a TCP proxy to the suite's broker that can be
/// made to "lose its host" — every connection through it cut, every later one accepted
/// and never answered (a host gone mid-route, whose SYNs a router still answers).
struct Node {
    url: String,
    sessions: Arc<AtomicUsize>,
    down: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start() -> Node {
        let broker = url::Url::parse(&amqp_url()).expect("suite URL");
        let upstream = format!(
            "{}:{}",
            broker.host_str().unwrap_or("127.0.0.1"),
            broker.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut url = broker.clone();
        let _ = url.set_port(Some(listener.local_addr().expect("addr").port()));
        let sessions = Arc::new(AtomicUsize::new(0));
        let (down, _) = watch::channel(false);
        let (s, d) = (sessions.clone(), down.clone());
        let task = tokio::spawn(async move {
            let mut silent = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                if *d.borrow() {
                    silent.push(client);
                    continue;
                }
                s.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                let mut cut = d.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Node {
            url: url.to_string(),
            sessions,
            down,
            task,
        }
    }

    fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// The host is gone: connections through the node cut, new ones never answered.
    fn lose_host(&self) {
        let _ = self.down.send(true);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn round_trip(hs: &Harness, n: u32) {
    let mut out = hs.watch_output().await;
    let body = format!("{{\"n\":{n}}}");
    hs.publish("test.x", body.as_bytes(), BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, body.as_bytes());
}

#[tokio::test]
async fn a_lost_node_is_not_tried_first_on_the_reconnect() {
    let nodes = [Node::start().await, Node::start().await];
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
    let on: Vec<usize> = nodes.iter().map(Node::sessions).collect();
    let first = match on.as_slice() {
        [1, 0] => 0,
        [0, 1] => 1,
        other => panic!("one connection, through one node: {other:?}"),
    };
    nodes[first].lose_host();
    tokio::time::timeout(Duration::from_secs(120), round_trip(&hs, 2))
        .await
        .expect("reconnected through the other node without waiting on the dead one");
    assert_eq!(nodes[1 - first].sessions(), 1, "the other node took over");
    hs.stop().await;
}
