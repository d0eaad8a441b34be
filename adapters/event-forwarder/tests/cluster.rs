//! event-forwarder (its own process) on a private three-node RabbitMQ cluster.

use std::time::{Duration, Instant};

use framework::testing::cluster::PrivateCluster;
use framework::testing::*;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const BIN: &str = env!("CARGO_BIN_EXE_event-forwarder");

/// POSTs the endpoint received so far.
async fn posts(server: &MockServer) -> usize {
    server.received_requests().await.map_or(0, |r| r.len())
}

/// An ordered event-forwarder whose endpoint keeps failing waits between its tries of the
/// one event it holds (in place, up to a third of the consumer timeout: ten minutes). On a
/// node cut off from its cluster (as the private clusters here are set, with the default
/// `cluster_partition_handling`, and on RabbitMQ 4.3 whatever it says, the node keeps its
/// clients connected) that wait
/// counted as work: the queue watcher, which ends a session finding its queue without a
/// leader for 30 s only where some handler is idle, kept the replica there — posting its
/// event beside the replica the majority gave it to — until the wait ended. A handler
/// only waiting is not at work: the replica finds itself cut off, moves to another node,
/// and posts the event from there. (With `pause_minority`, RabbitMQ 3.x closes a paused
/// minority's connections itself, and there this holds without the watcher.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_replica_waiting_between_tries_on_a_cut_off_node_moves_to_another() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let endpoint = format!("{}/events", server.uri());
    let cluster = PrivateCluster::start().await;
    let q = unique("efcut");
    let dir = tempfile::tempdir().expect("config dir");
    let forwarder = |urls: &str, name: &str| {
        let first = urls.split(',').next().unwrap_or_default().to_string();
        let mut c = service_command(BIN, "event_forwarder", &q, &first, dir.path());
        c.env("STORAGETIER__AMQP__URLS", urls)
            .env("STORAGETIER__AMQP__CONNECTION_NAME", name)
            .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "100")
            .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "1000")
            .env("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "1000")
            .env("STORAGETIER__AMQP__OPERATION_TIMEOUT_MS", "5000")
            .env("STORAGETIER__EVENT_FORWARDER__ENDPOINT", &endpoint)
            .env("STORAGETIER__EVENT_FORWARDER__TOKEN", "tok-cluster")
            .env("STORAGETIER__EVENT_FORWARDER__ORDERED", "true")
            // Ten minutes between tries: longer than the event may be held, so it waits
            // in place until it is handed back.
            .env("STORAGETIER__RETRY__DELAYS_MS", "600000")
            .env("STORAGETIER__RETRY__MAX_ATTEMPTS", "50");
        c
    };
    let declared = forwarder(&cluster.urls_from(0), "declare")
        .arg("declare")
        .status_within(WAIT)
        .expect("event-forwarder runs");
    assert!(declared.success());
    cluster.await_replicas_online(&[&q]).await;
    let (leader, others) = cluster.leader_and_others(&q);
    let name = unique("efcut-replica");
    let log = dir.path().join("replica.log");
    let mut replica = process::spawn(
        forwarder(&others.join(","), &name)
            .arg("run")
            .stderr(std::fs::File::create(&log).expect("log file")),
    )
    .expect("event-forwarder starts");
    let through = cluster.node_of_connection(&name).await;
    assert_ne!(through, leader, "the replica is given only the other nodes");
    cluster.await_consumer(&q).await;
    let majority = &cluster.nodes()[leader];
    majority
        .preload(
            &format!("{q}-in"),
            "k",
            std::iter::once(br#"{"event":1}"#.to_vec()),
        )
        .await;
    // Tried once and refused: the handler now waits to try again.
    let deadline = Instant::now() + WAIT;
    while posts(&server).await == 0 {
        assert!(Instant::now() < deadline, "the event is posted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tried = posts(&server).await;
    cluster.cut_off(through);
    // 30 s without a leader, the looks' own time, a reconnect, the event delivered again:
    // well within three minutes (the wait itself is ten).
    let deadline = Instant::now() + WAIT * 3;
    while posts(&server).await == tried {
        assert!(
            Instant::now() < deadline,
            "the event is posted again from another node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster
        .assert_moved(&mut replica, &name, through, leader)
        .await;
    // Moved as cut off, not by the broker's own error a minute later (a look at a queue
    // failing with an internal timeout that closes the connection, on 4.3).
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("ending the session to connect to another node"),
        "the replica found itself cut off: {said}"
    );
}
