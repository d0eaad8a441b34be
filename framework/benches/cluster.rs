//! Scale-out benchmark: 1, 2 and 4 replicas of echo (separate processes, every node in
//! `[amqp] urls`, each starting at a node of them chosen at random) on a private three-node RabbitMQ cluster,
//! quorum queues replicated on all three. Each run preloads its own queue, starts the
//! replicas, and times the outputs from the moment every replica consumes; ratios are
//! against one replica in the same run.
//!
//! `cargo bench -p framework --bench cluster` (env: BENCH_MESSAGES, default 20000;
//! BENCH_PREFETCH, default 16; BENCH_REPLICAS, default "1,2,4"; BENCH_DELAY_MS, the echo
//! handler's delay, default 0). Needs what the fault tests need (`rabbitmq-server`, root);
//! `STORAGETIER_TEST_RABBITMQ_ROOT` picks the 4.x install. Prints a markdown table for
//! docs/benchmarks.md.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use framework::testing::cluster::PrivateCluster;
use framework::testing::{process, service_command, unique};

const BIN: &str = env!("CARGO_BIN_EXE_echo");

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn echo(
    cluster: &PrivateCluster,
    r: usize,
    q: &str,
    dir: &std::path::Path,
    prefetch: usize,
) -> Command {
    let urls = cluster.urls_from(r);
    let first = urls.split(',').next().unwrap_or_default().to_string();
    let mut c = service_command(BIN, "echo", q, &first, dir);
    c.env("STORAGETIER__AMQP__URLS", &urls)
        .env("STORAGETIER__AMQP__PREFETCH", prefetch.to_string())
        .env(
            "STORAGETIER__ECHO__DELAY_MS",
            env_usize("BENCH_DELAY_MS", 0).to_string(),
        )
        .env("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "0")
        .stderr(Stdio::null());
    c
}

/// One run: `replicas` echo processes over a preloaded queue of `n` 1 KiB messages;
/// returns messages per second from the moment all of them consume.
async fn run(cluster: &PrivateCluster, replicas: usize, n: usize, prefetch: usize) -> f64 {
    let q = unique("bench-cluster");
    let sink = format!("{q}-sink");
    let dir = tempfile::tempdir().expect("config dir");
    let declared = echo(cluster, 0, &q, dir.path(), prefetch)
        .arg("declare")
        .status()
        .expect("echo runs");
    assert!(declared.success(), "declare");
    cluster.sink(&sink, &format!("{q}-out")).await;
    cluster.await_replicas_online(&[&q, &sink]).await;
    let pad = "x".repeat(1024 - 16);
    cluster
        .preload(
            &format!("{q}-in"),
            "bench.x",
            (0..n).map(|i| format!("{{\"i\":{i},\"p\":\"{pad}\"}}").into_bytes()),
        )
        .await;
    let mut procs: Vec<process::Guarded> = (0..replicas)
        .map(|r| {
            process::spawn(echo(cluster, r, &q, dir.path(), prefetch).arg("run"))
                .expect("echo starts")
        })
        .collect();
    let limit = Instant::now() + Duration::from_secs(600);
    while (cluster.consumers(&q).await as usize) < replicas {
        assert!(Instant::now() < limit, "every replica consumes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let at_t0 = cluster.count(&sink).await.unwrap_or(0) as usize;
    while (cluster.count(&sink).await.unwrap_or(0) as usize) < n {
        assert!(Instant::now() < limit, "every output arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    for p in &mut procs {
        let _ = p.terminate(Duration::from_secs(60));
    }
    (n - at_t0) as f64 / secs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_usize("BENCH_MESSAGES", 20_000);
    let prefetch = env_usize("BENCH_PREFETCH", 16);
    let counts: Vec<usize> = std::env::var("BENCH_REPLICAS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cluster = PrivateCluster::start().await;
    let version = cluster.nodes()[0].version();
    println!(
        "RabbitMQ {}.{} three-node cluster, quorum queues on all three; {n} × 1 KiB persistent messages, prefetch {prefetch} per replica, publisher confirms\n",
        version.0, version.1
    );
    println!("| echo replicas | msg/s | vs 1 replica |");
    println!("|---:|---:|---:|");
    let mut one = None;
    for r in counts {
        let rate = run(&cluster, r, n, prefetch).await;
        let base = *one.get_or_insert(rate);
        println!("| {r} | {rate:.0} | {:.2}× |", rate / base);
    }
}
