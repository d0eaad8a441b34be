//! Two replicas of echo (separate processes, every node in `[amqp] urls`, each starting at
//! a node of them chosen at random) on a private three-node RabbitMQ cluster, quorum queues replicated on
//! all three: the node leading the service's queue stopped mid-stream, and a rolling restart
//! of every node under load. Nothing is lost, the replicas are never restarted, and each run
//! prints its docs/reliability.md row (sent, lost, duplicated, time to recover).
//!
//! `cargo test -p framework --test cluster -- --nocapture` (CLUSTER_MESSAGES overrides the
//! 10,000 messages).

use std::process::{Command, Stdio};

use framework::testing::broker::Tally;
use framework::testing::cluster::{Feed, PrivateCluster};
use framework::testing::*;

const BIN: &str = env!("CARGO_BIN_EXE_echo");

/// In-flight limit of each replica: duplicates after a fault are bounded by it.
const PREFETCH: usize = 16;
const REPLICAS: usize = 2;

fn messages() -> usize {
    std::env::var("CLUSTER_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Echo replica `r` on queue `q`: every node of the cluster (listed from node `r`; the
/// service starts at one of them chosen at random).
fn echo(
    cluster: &PrivateCluster,
    r: usize,
    q: &str,
    dir: &std::path::Path,
    delay_ms: u64,
) -> Command {
    let urls = cluster.urls_from(r);
    let first = urls.split(',').next().unwrap_or_default().to_string();
    let mut c = service_command(BIN, "echo", q, &first, dir);
    c.env("STORAGETIER__AMQP__URLS", &urls)
        .env("STORAGETIER__AMQP__CONNECTION_NAME", unique("replica"))
        .env("STORAGETIER__AMQP__PREFETCH", PREFETCH.to_string())
        .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "100")
        .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "1000")
        .env("STORAGETIER__ECHO__DELAY_MS", delay_ms.to_string())
        .env("STORAGETIER__RETRY__DELAYS_MS", "200,400")
        .stderr(Stdio::null());
    c
}

/// Input `i` of a run.
fn input(i: usize) -> Vec<u8> {
    format!("{{\"i\":{i}}}").into_bytes()
}

/// Echo declared on the cluster, its queue replicated on every node, a sink bound to its
/// output, inputs `0..n` preloaded, then `REPLICAS` replicas started.
async fn replicas_with_backlog(
    cluster: &PrivateCluster,
    q: &str,
    sink: &str,
    n: usize,
    dir: &std::path::Path,
    delay_ms: u64,
) -> Vec<process::Guarded> {
    let declared = echo(cluster, 0, q, dir, delay_ms)
        .arg("declare")
        .status_within(WAIT)
        .expect("echo runs");
    assert!(declared.success());
    cluster.sink(sink, &format!("{q}-out")).await;
    let r = cluster.replicas(q).expect("the service's queue exists");
    assert_eq!(
        r.members.len(),
        cluster.nodes().len(),
        "the quorum queue has a replica on every node: {r:?}"
    );
    cluster.await_replicas_online(&[q, sink]).await;
    cluster
        .preload(&format!("{q}-in"), "k", (0..n).map(input))
        .await;
    (0..REPLICAS)
        .map(|r| {
            process::spawn(echo(cluster, r, q, dir, delay_ms).arg("run")).expect("echo starts")
        })
        .collect()
}

/// Asserts every replica is still the process it was (never restarted), SIGTERMs each,
/// asserts a clean exit, and tallies `sink` by input id.
async fn finish(
    cluster: &PrivateCluster,
    replicas: Vec<process::Guarded>,
    sink: &str,
    n: usize,
) -> Tally {
    for mut r in replicas {
        assert!(r.is_running(), "the replica kept running through the fault");
        let code = r.terminate(WAIT).and_then(|s| s.code());
        assert_eq!(code, Some(0), "the replica drained and exited cleanly");
    }
    let seen = cluster
        .drain_ids(sink, |b| {
            let v: serde_json::Value = serde_json::from_slice(b).ok()?;
            v["i"].as_u64().map(|i| i.to_string())
        })
        .await;
    Tally::of(n, &seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_leader_stopped_mid_stream_loses_nothing() {
    let n = messages();
    let cluster = PrivateCluster::start().await;
    let q = unique("leader");
    let sink = format!("{q}-sink");
    let dir = tempfile::tempdir().expect("config dir");
    // Half preloaded, half published after the stop: the stream outlasts the stop
    // however fast the replicas run.
    // 200 ms a message, 16 at a time per replica: at most 160 outputs a second, so the
    // preloaded half (3,000 left when the stop starts, of 10,000) outlasts `stop_app` by
    // far however fast the machine, and inputs are in flight and waiting when it lands.
    let replicas = replicas_with_backlog(&cluster, &q, &sink, n / 2, dir.path(), 200).await;
    let held_back = Feed {
        exchange: format!("{q}-in"),
        key: "k".into(),
        bodies: (n / 2..n).map(input).collect(),
    };
    let f = cluster
        .stop_leader_mid_stream(&q, &sink, n, held_back)
        .await;
    let t = finish(&cluster, replicas, &sink, n).await;
    println!(
        "{}",
        t.row(
            &format!(
                "queue leader node stopped mid-stream (3-node cluster), {REPLICAS} replicas of echo"
            ),
            &format!(
                "stopped at {} outputs ({} once stop_app returned), new leader within {:.1} s, outputs resumed {:.1} s after stop_app, {:.1} s in all",
                f.outputs_before,
                f.outputs_at_stop,
                f.new_leader.as_secs_f64(),
                f.resumed.as_secs_f64(),
                f.total.as_secs_f64()
            )
        )
    );
    assert!(
        f.outputs_at_stop < n / 2,
        "preloaded inputs were still to do when the leader went down: {} of {} done",
        f.outputs_at_stop,
        n / 2
    );
    assert_eq!(t.lost, 0, "nothing lost");
    assert!(
        t.duplicated <= REPLICAS * PREFETCH,
        "duplicates bounded by what was in flight: {t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_node_loses_nothing() {
    let n = messages();
    let cluster = PrivateCluster::start().await;
    let q = unique("rolling");
    let sink = format!("{q}-sink");
    let dir = tempfile::tempdir().expect("config dir");
    // Slow enough handlers that the stream outlasts three node restarts: at most
    // REPLICAS × PREFETCH / 200 ms = 160 messages a second (10,000 take a minute).
    let replicas = replicas_with_backlog(&cluster, &q, &sink, n, dir.path(), 200).await;
    let r = cluster.rolling_restart_mid_stream(&q, &sink, n).await;
    let t = finish(&cluster, replicas, &sink, n).await;
    let cycles: Vec<String> = r
        .node_cycle
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect();
    println!(
        "{}",
        t.row(
            &format!("rolling restart of all 3 nodes under load, {REPLICAS} replicas of echo (never restarted)"),
            &format!(
                "nodes back with every replica online after {} s; longest gap in outputs {:.1} s; outputs at each stop {:?} of {n}; {:.1} s in all",
                cycles.join(" / "),
                r.longest_stall.as_secs_f64(),
                r.outputs_at_stop,
                r.total.as_secs_f64()
            )
        )
    );
    assert!(
        r.outputs_at_stop.iter().all(|&o| o < n),
        "every node was restarted mid-stream: {:?}",
        r.outputs_at_stop
    );
    assert_eq!(t.lost, 0, "nothing lost");
    assert!(
        t.duplicated <= r.node_cycle.len() * REPLICAS * PREFETCH,
        "duplicates bounded by what was in flight at each restart: {t:?}"
    );
}

/// A quorum DLQ without a leader (two of three nodes down) answers a passive declare with
/// 0 messages whatever it holds: `dlq list` must not print "0 of 0" (nor a replay
/// "replayed 0", nor `--message-id` "no dead letter matched", after which an operator
/// republishes from upstream what the DLQ still holds) — it fails, saying the DLQ did not
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_without_a_leader_is_not_reported_empty() {
    let cluster = PrivateCluster::start().await;
    let q = unique("noleader");
    let dlq = format!("{q}-dlq");
    let dir = tempfile::tempdir().expect("config dir");
    let declared = echo(&cluster, 0, &q, dir.path(), 0)
        .arg("declare")
        .status_within(WAIT)
        .expect("echo runs");
    assert!(declared.success());
    cluster.await_replicas_online(&[&dlq]).await;
    let (conn, ch) = cluster.nodes()[0].channel().await.expect("node 0");
    publish(
        &ch,
        "",
        &dlq,
        b"{}",
        framework::lapin::BasicProperties::default().with_message_id("held".into()),
    )
    .await;
    await_ready_count(&ch, &dlq, 1).await;
    framework::testing::broker::close(conn).await;
    for n in &cluster.nodes()[1..] {
        n.stop_app();
    }
    let listed = echo(&cluster, 0, &q, dir.path(), 0)
        .env("STORAGETIER__AMQP__URLS", cluster.nodes()[0].url())
        .env("STORAGETIER__AMQP__OPERATION_TIMEOUT_MS", "5000")
        .args(["dlq", "list"])
        .output_within(WAIT)
        .expect("dlq list runs");
    let (out, err) = (
        String::from_utf8_lossy(&listed.stdout),
        String::from_utf8_lossy(&listed.stderr),
    );
    assert_eq!(listed.status.code(), Some(1), "{out}\n{err}");
    // Said either way: a node that still gives the count it knew finds the read time out.
    assert!(
        err.contains("without a leader") || err.contains("timed out"),
        "{err}"
    );
    let replay = echo(&cluster, 0, &q, dir.path(), 0)
        .env("STORAGETIER__AMQP__URLS", cluster.nodes()[0].url())
        .env("STORAGETIER__AMQP__OPERATION_TIMEOUT_MS", "5000")
        .args(["dlq", "replay", "--message-id", "held", "--dry-run"])
        .output_within(WAIT)
        .expect("dlq replay runs");
    let err = String::from_utf8_lossy(&replay.stderr);
    assert_eq!(replay.status.code(), Some(1), "{err}");
    assert!(!err.contains("matched"), "{err}");
}

/// A node cut off from the rest of its cluster while it runs (a network partition) keeps
/// its clients connected — on RabbitMQ 4.3 whatever `cluster_partition_handling` says —
/// and a replica consuming through it would sit there idle, while the majority gives the
/// queue's messages to nobody. The replica's queue watcher finds the queue without a
/// leader it can reach (no consumer while it consumes) and ends the session once that has
/// lasted 30 s; the replica connects to another node of `[amqp] urls` and consumes there,
/// never restarted. The queue's leader is kept off the cut-off node (the replica is given
/// only the other two): a leader cut off with it answers for the queue from its own
/// state there, as though nothing happened (docs/scaling.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_a_node_cut_off_from_its_cluster_moves_to_another() {
    let cluster = PrivateCluster::start().await;
    let q = unique("cutoff");
    let sink = format!("{q}-sink");
    let dir = tempfile::tempdir().expect("config dir");
    let declared = echo(&cluster, 0, &q, dir.path(), 0)
        .arg("declare")
        .status_within(WAIT)
        .expect("echo runs");
    assert!(declared.success());
    cluster.sink(&sink, &format!("{q}-out")).await;
    cluster.await_replicas_online(&[&q, &sink]).await;
    let (leader, others) = cluster.leader_and_others(&q);
    let name = unique("cutoff-replica");
    let mut replica = process::spawn(
        echo(&cluster, 0, &q, dir.path(), 0)
            .env("STORAGETIER__AMQP__URLS", others.join(","))
            .env("STORAGETIER__AMQP__CONNECTION_NAME", &name)
            .env("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "1000")
            .env("STORAGETIER__AMQP__OPERATION_TIMEOUT_MS", "5000")
            .arg("run"),
    )
    .expect("echo starts");
    let through = cluster.node_of_connection(&name).await;
    assert_ne!(through, leader, "the replica is given only the other nodes");
    // Consuming (not only connected) before the cut: a consumer the majority knew.
    let majority = &cluster.nodes()[leader];
    cluster.await_consumer(&q).await;
    cluster.cut_off(through);
    let n = 20;
    let since = std::time::Instant::now();
    majority
        .preload(&format!("{q}-in"), "k", (0..n).map(input))
        .await;
    // 30 s without a leader, the looks' own time, a reconnect: well within three minutes.
    within(
        WAIT * 3,
        "the inputs handled through another node",
        framework::testing::broker::await_outputs(majority, &sink, n, since),
    )
    .await;
    cluster
        .assert_moved(&mut replica, &name, through, leader)
        .await;
}
