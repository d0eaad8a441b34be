//! Scale-out benchmark: 1, 2 and 4 replicas of online-archive (separate processes, every
//! node in `[amqp] urls`, one PostgreSQL database, one local archive store) archiving small
//! files, on a private three-node RabbitMQ cluster with quorum queues replicated on all
//! three. Each run archives its own fresh set of files into a fresh store and database,
//! timed from the moment every replica consumes; ratios are against one replica in the same
//! run.
//!
//! `cargo bench -p online-archive --bench cluster` (env: BENCH_SMALL_FILES, default 2000;
//! BENCH_SMALL_KIB, default 4; BENCH_REPLICAS, default "1,2,4"; BENCH_DIR, default
//! /var/tmp). Needs `rabbitmq-server` (root) and PostgreSQL on 127.0.0.1:5432 like the
//! tests; `STORAGETIER_TEST_RABBITMQ_ROOT` picks the 4.x install.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use framework::testing::cluster::PrivateCluster;
use framework::testing::{process, service_command, unique};
use storage::testing::sweeper_message;

const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn archive(
    cluster: &PrivateCluster,
    r: usize,
    q: &str,
    data: &std::path::Path,
    db_url: &str,
) -> Command {
    let bin = env!("CARGO_BIN_EXE_online-archive");
    let urls = cluster.urls_from(r);
    let first = urls.split(',').next().unwrap_or_default().to_string();
    let mut c = service_command(bin, "online_archive", q, &first, &data.join("no-config"));
    c.env("STORAGETIER__AMQP__URLS", &urls)
        .env("STORAGETIER__STORAGE__DATA_DIR", data)
        .env("STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL", db_url)
        .env("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "0")
        .stderr(Stdio::null());
    c
}

/// One run: `replicas` processes archiving `n` files of `kib` KiB; files per second.
async fn run(cluster: &PrivateCluster, replicas: usize, n: usize, kib: usize) -> f64 {
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let data = tempfile::tempdir_in(base).expect("bench dir");
    std::fs::create_dir_all(data.path().join("no-config")).expect("config dir");
    let online = data.path().join("online/small");
    std::fs::create_dir_all(&online).expect("online dir");
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let name = format!("f{i:05}.dat");
            let mut content = vec![(i % 251) as u8; kib * 1024];
            content[..8].copy_from_slice(&(i as u64).to_le_bytes());
            std::fs::write(online.join(&name), content).expect("write a small file");
            sweeper_message(&online.display().to_string(), &name, false)
                .to_string()
                .into_bytes()
        })
        .collect();
    let pg = db::testing::TempPostgres::create()
        .await
        .expect("a database on the local PostgreSQL");
    let q = unique("bench-archive-cluster");
    let sink = format!("{q}-sink");
    let declared = archive(cluster, 0, &q, data.path(), &pg.url)
        .arg("declare")
        .status()
        .expect("online-archive runs");
    assert!(declared.success(), "declare");
    cluster.sink(&sink, &format!("{q}-out")).await;
    cluster.await_replicas_online(&[&q, &sink]).await;
    cluster
        .preload(&format!("{q}-in"), KEY, messages.into_iter())
        .await;
    let mut procs: Vec<process::Guarded> = (0..replicas)
        .map(|r| {
            process::spawn(archive(cluster, r, &q, data.path(), &pg.url).arg("run"))
                .expect("online-archive starts")
        })
        .collect();
    let limit = Instant::now() + Duration::from_secs(900);
    while (cluster.consumers(&q).await as usize) < replicas {
        assert!(Instant::now() < limit, "every replica consumes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let at_t0 = cluster.count(&sink).await.unwrap_or(0) as usize;
    while (cluster.count(&sink).await.unwrap_or(0) as usize) < n {
        assert!(Instant::now() < limit, "every file archived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    for p in &mut procs {
        let _ = p.terminate(Duration::from_secs(60));
    }
    let _ = pg.drop_db().await;
    (n - at_t0) as f64 / secs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_usize("BENCH_SMALL_FILES", 2_000);
    let kib = env_usize("BENCH_SMALL_KIB", 4);
    let counts: Vec<usize> = std::env::var("BENCH_REPLICAS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cluster = PrivateCluster::start().await;
    let version = cluster.nodes()[0].version();
    println!(
        "RabbitMQ {}.{} three-node cluster, quorum queues on all three; {n} files × {kib} KiB, local archive store, PostgreSQL records, prefetch 16 per replica\n",
        version.0, version.1
    );
    println!("| online-archive replicas | files/s | vs 1 replica |");
    println!("|---:|---:|---:|");
    let mut one = None;
    for r in counts {
        let rate = run(&cluster, r, n, kib).await;
        let base = *one.get_or_insert(rate);
        println!("| {r} | {rate:.0} | {:.2}× |", rate / base);
    }
}
