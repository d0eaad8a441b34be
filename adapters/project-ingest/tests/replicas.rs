//! project-ingest run as its binary beside another consumer of its queue.

use std::process::Stdio;

use framework::testing::*;

const BIN: &str = env!("CARGO_BIN_EXE_project-ingest");

/// With `ordered = false` (the default), a replica that finds another consumer on its
/// queue says so: updates of one `updated` time are ordered by each replica's own clock,
/// so two replicas may keep an older one (docs/scaling.md) — a second replica started by
/// mistake, or a scale-out, showed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unordered_replica_beside_another_consumer_says_so() {
    let q = unique("pi-replicas");
    let _gone = Cleanup::service(&q, &[1000]);
    let dir = tempfile::tempdir().expect("config dir");
    let db = format!("sqlite://{}", dir.path().join("pi.db").display());
    let mut c = service_command(BIN, "project_ingest", &q, &amqp_url(), dir.path());
    c.env("STORAGETIER__PROJECT_INGEST__DATABASE_URL", &db)
        .env("STORAGETIER__AMQP__DECLARE_SOURCES", "true")
        .env("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "200")
        .env("STORAGETIER__RETRY__DELAYS_MS", "1000")
        .stderr(Stdio::piped());
    let mut replica = process::spawn(c.arg("run")).expect("project-ingest starts");
    let said = process::lines_holding(
        replica.take_stderr().expect("its stderr"),
        "several consumers take this queue",
    );
    let (conn, ch) = test_channel().await;
    // A second consumer, once the replica has declared its queue.
    let deadline = std::time::Instant::now() + WAIT;
    let _other = loop {
        let (probe_conn, probe) = test_channel().await;
        let passive = framework::lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let there = probe
            .queue_declare(q.as_str().into(), passive, Default::default())
            .await
            .is_ok();
        framework::testing::broker::close(probe_conn).await;
        if there {
            break consume(&ch, &q).await;
        }
        assert!(std::time::Instant::now() < deadline, "{q} declared");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    tokio::task::spawn_blocking(move || said.recv_timeout(WAIT))
        .await
        .expect("join")
        .expect("the replica warned about the other consumer");
    framework::testing::broker::close(conn).await;
    let code = replica.terminate(WAIT).and_then(|s| s.code());
    assert_eq!(code, Some(0), "drained and exited cleanly");
}
