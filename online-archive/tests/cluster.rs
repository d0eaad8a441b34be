//! Two replicas of online-archive (separate processes, one PostgreSQL database, one archive
//! store, every node in `[amqp] urls`, each starting at a node chosen at random) on a private
//! three-node RabbitMQ cluster, quorum queues replicated on all three:
//! - the node leading the service's queue stopped mid-stream;
//! - `kill -9` of one replica mid-stream: the other finishes the work.
//!
//! Every file is archived and reported, exactly one object and one record per file, nothing
//! dead-lettered; each run prints its docs/reliability.md row. 2,000 small files per run
//! (CLUSTER_FILES overrides) keep both under two minutes on a loaded 2-core machine.
//!
//! `cargo test -p online-archive --test cluster -- --nocapture`

use std::process::{Command, Stdio};
use std::time::Instant;

use framework::testing::broker::{Tally, await_outputs};
use framework::testing::cluster::{Feed, PrivateCluster};
use framework::testing::{RunWithin, WAIT, process, service_command, unique};
use storage::testing::{files_under, put_online_file, sweeper_message};

const PREFETCH: usize = 16;
const REPLICAS: usize = 2;
const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

fn files() -> usize {
    std::env::var("CLUSTER_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// A staging file of the local store (in its reserved directory).
fn is_staging(path: &str) -> bool {
    path.split('/').next() == Some(storage::local::STAGING_DIR)
}

/// A run: the cluster, a PostgreSQL database, `n` online files as sweeper messages (the
/// first `preloaded` published, the rest held back), the service declared and a sink
/// bound to its output.
struct Run {
    cluster: PrivateCluster,
    pg: db::testing::TempPostgres,
    data: tempfile::TempDir,
    q: String,
    sink: String,
    n: usize,
    /// Inputs not preloaded, for a scenario to publish after its fault.
    held_back: Vec<Vec<u8>>,
}

impl Run {
    async fn start(prefix: &str, preloaded: usize) -> Run {
        let n = files();
        let cluster = PrivateCluster::start().await;
        let pg = db::testing::TempPostgres::create()
            .await
            .expect("a test database on the local PostgreSQL");
        let data = tempfile::tempdir().expect("data dir");
        let q = unique(prefix);
        let sink = format!("{q}-sink");
        let run = Run {
            cluster,
            pg,
            data,
            q,
            sink,
            n,
            held_back: Vec::new(),
        };
        let mut messages: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let name = format!("f{i}.bin");
                let dir = put_online_file(
                    run.data.path(),
                    &format!("d{}/{name}", i % 100),
                    format!("file {i} ").repeat(64).as_bytes(),
                );
                sweeper_message(&dir, &name, false).to_string().into_bytes()
            })
            .collect();
        let held_back = messages.split_off(preloaded.min(n));
        assert!(
            run.archive(0)
                .arg("declare")
                .status_within(WAIT)
                .expect("online-archive runs")
                .success()
        );
        run.cluster.sink(&run.sink, &format!("{}-out", run.q)).await;
        let r = run.cluster.replicas(&run.q).expect("the service's queue");
        assert_eq!(
            r.members.len(),
            run.cluster.nodes().len(),
            "a replica of the queue on every node: {r:?}"
        );
        run.cluster
            .await_replicas_online(&[&run.q, &run.sink])
            .await;
        run.cluster
            .preload(&format!("{}-in", run.q), KEY, messages.into_iter())
            .await;
        Run { held_back, ..run }
    }

    /// Replica `r`: every node (listed from node `r`; the service starts at one of them
    /// chosen at random); the shared database and store.
    fn archive(&self, r: usize) -> Command {
        let bin = env!("CARGO_BIN_EXE_online-archive");
        let urls = self.cluster.urls_from(r);
        let first = urls.split(',').next().unwrap_or_default().to_string();
        let mut c = service_command(bin, "online_archive", &self.q, &first, self.data.path());
        c.env("STORAGETIER__AMQP__URLS", &urls)
            .env("STORAGETIER__AMQP__PREFETCH", PREFETCH.to_string())
            .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "200")
            .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "1000")
            .env("STORAGETIER__RETRY__DELAYS_MS", "500,2000")
            .env("STORAGETIER__STORAGE__DATA_DIR", self.data.path())
            .env("STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL", &self.pg.url)
            .stderr(Stdio::null());
        c
    }

    fn replicas(&self) -> Vec<process::Guarded> {
        (0..REPLICAS)
            .map(|r| process::spawn(self.archive(r).arg("run")).expect("online-archive starts"))
            .collect()
    }

    /// Stops the surviving replicas (clean exit asserted), tallies the outputs by archive
    /// key and checks the store, the records and the DLQ.
    /// `left_staging`: staging files a killed replica may leave behind (one per copy it
    /// had in flight; swept once stale). A local store takes no upload claims at all.
    async fn finish(self, replicas: Vec<process::Guarded>, left_staging: usize) -> Tally {
        for mut r in replicas {
            let code = r.terminate(WAIT).and_then(|s| s.code());
            assert_eq!(code, Some(0), "the replica drained and exited cleanly");
        }
        let seen = self
            .cluster
            .drain_ids(&self.sink, |b| {
                let v: serde_json::Value = serde_json::from_slice(b).ok()?;
                v["archive_key"].as_str().map(str::to_string)
            })
            .await;
        let t = Tally::of(self.n, &seen);
        let dead = self.cluster.count(&format!("{}-dlq", self.q)).await;
        assert_eq!(dead, Some(0), "nothing dead-lettered");
        let all = files_under(&self.data.path().join("archive"));
        // A replica killed mid-copy leaves its staging files (in the store's staging
        // directory, never an object under a key); they are swept once stale
        // (`storage::local::sweep_stale_staging`), at most one per copy in flight.
        let (staging, stored): (Vec<String>, Vec<String>) =
            all.into_iter().partition(|p| is_staging(p));
        assert!(
            staging.len() <= left_staging,
            "staging files left: {staging:?}"
        );
        assert_eq!(stored.len(), self.n, "exactly one object per file");
        let rec = storage::Records::open(&self.pg.url)
            .await
            .expect("the records");
        let objects = rec.count("stored_objects").await.expect("count");
        let copies = rec.count("copied_files").await.expect("count");
        let claims: i64 = db::sqlx::query_scalar("SELECT COUNT(*) FROM upload_claims")
            .fetch_one(rec.pool())
            .await
            .expect("count the upload claims");
        rec.pool().close().await;
        self.pg.drop_db().await.expect("drop the test database");
        assert_eq!(
            objects as usize, self.n,
            "one stored object record per file"
        );
        assert_eq!(copies as usize, self.n, "one copied file record per file");
        assert_eq!(claims, 0, "a local store takes no upload claims");
        t
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_leader_stopped_mid_stream_archives_every_file_once() {
    // Half preloaded, half published after the stop: the stream outlasts the stop however
    // fast the replicas archive.
    let mut run = Run::start("archive-leader", files() / 2).await;
    let replicas = run.replicas();
    let (q, sink, n) = (run.q.clone(), run.sink.clone(), run.n);
    let held_back = Feed {
        exchange: format!("{q}-in"),
        key: KEY.into(),
        bodies: std::mem::take(&mut run.held_back),
    };
    let f = run
        .cluster
        .stop_leader_mid_stream(&q, &sink, n, held_back)
        .await;
    let t = run.finish(replicas, 0).await;
    println!(
        "{}",
        t.row(
            &format!(
                "queue leader node stopped mid-stream (3-node cluster), {REPLICAS} replicas of online-archive, PostgreSQL records"
            ),
            &format!(
                "new leader within {:.1} s, outputs resumed {:.1} s after stop_app, {:.1} s in all",
                f.new_leader.as_secs_f64(),
                f.resumed.as_secs_f64(),
                f.total.as_secs_f64()
            )
        )
    );
    // Mid-stream by construction: half the files are published only after the stop (an
    // assertion on the outputs before it could not fail).
    assert_eq!(t.lost, 0, "every file reported");
    assert!(
        t.duplicated <= REPLICAS * PREFETCH,
        "duplicates bounded by what was in flight: {t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_replica_mid_stream_the_other_finishes() {
    // Half preloaded, half published after the kill: the survivor has work after it.
    let mut run = Run::start("archive-replica-kill", files() / 2).await;
    let mut replicas = run.replicas();
    let (q, sink, n) = (run.q.clone(), run.sink.clone(), run.n);
    let started = Instant::now();
    let timeline = run.cluster.timeline(&sink);
    await_outputs(&run.cluster, &sink, n / 5, started).await;
    let mut killed = replicas.remove(0);
    let before = run.cluster.count(&sink).await.unwrap_or(0) as usize;
    killed.kill();
    let killed_at = Instant::now();
    let held_back = std::mem::take(&mut run.held_back);
    run.cluster
        .preload(&format!("{q}-in"), KEY, held_back.into_iter())
        .await;
    run.cluster.await_settled(&q, &sink, n, started).await;
    let finished = killed_at.elapsed();
    let resumed = timeline
        .first_output_after(killed_at)
        .map(|t| t - killed_at)
        .expect("outputs after the kill");
    let total = started.elapsed();
    let t = run.finish(replicas, PREFETCH).await;
    println!(
        "{}",
        t.row(
            "kill -9 of one of 2 replicas of online-archive mid-stream (3-node cluster), PostgreSQL records",
            &format!(
                "the other replica went on ({:.1} s to the next output) and finished the last {} files {:.1} s after the kill (nothing waits for the dead replica: a local store takes no claims); {:.1} s in all",
                resumed.as_secs_f64(),
                n - before,
                finished.as_secs_f64(),
                total.as_secs_f64()
            )
        )
    );
    assert!(
        before < n / 2,
        "the replica was killed while preloaded files were still to do: {before} of {} done",
        n / 2
    );
    assert_eq!(t.lost, 0, "every file reported");
    assert!(
        t.duplicated <= PREFETCH,
        "duplicates bounded by what the killed replica had in flight: {t:?}"
    );
}
