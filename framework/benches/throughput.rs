//! Bus throughput: the framework's `echo` service against a raw lapin loop and a
//! ruststream-lapin 0.7.2 service, each consume → publish persistently to an output exchange →
//! await the confirm → ack, same prefetch, same queue type, same broker.
//!
//! ```sh
//! cargo bench -p framework --bench throughput --features bench-peers
//! ```
//!
//! Env: `BENCH_MESSAGES` (default 20000), `BENCH_ROUNDS` (3), `BENCH_PREFETCH` (`16,128`),
//! `BENCH_QUEUE_TYPES` (`quorum,classic`), `BENCH_CONTENDERS` (`raw,ruststream,framework`;
//! raw lapin is always measured, the ratios are against it), `BENCH_ECHO_BEFORE` (the path
//! of another build of `echo`, measured as one more contender: a change before and after in
//! one run), `STORAGETIER_TEST_AMQP_URL` (the broker).
//!
//! Every contender runs as a process of its own (the echo binary; this bench re-executed for
//! raw lapin and ruststream), so its CPU time is read from `/proc/<pid>/stat` alone. A run is
//! timed from the moment the contender's consumer shows on the pre-loaded queue until the
//! sink bound to its output exchange holds every message; its CPU is the same window's.
//! Rounds interleave the contenders (the order rotates each round) and the table gives
//! medians, as ratios against raw lapin measured in the same round. Prints markdown tables
//! for docs/benchmarks.md.

use std::num::NonZeroUsize;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use framework::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use framework::lapin::types::{AMQPValue, FieldTable};
use framework::lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use framework::testing::{Cleanup, amqp_url, process, ready_count, service_command, unique};
use futures_util::{FutureExt, StreamExt};

const ECHO: &str = env!("CARGO_BIN_EXE_echo");
/// The longest a run may take before the bench gives up (a stuck contender).
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Linux reports process CPU in USER_HZ ticks, 100 per second on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn env_list(k: &str, d: &str) -> Vec<String> {
    env_or(k, d)
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A 1 KiB JSON document.
fn body() -> Vec<u8> {
    let pad = "x".repeat(1024 - 10);
    format!("{{\"pad\":\"{pad}\"}}").into_bytes()
}

async fn connect() -> (Connection, Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("broker reachable");
    let ch = framework::runtime::confirm_channel(&conn)
        .await
        .expect("channel");
    (conn, ch)
}

/// Publishes `n` persistent copies of the 1 KiB body, confirmed in batches of 1000.
async fn fill(ch: &Channel, exchange: &str, key: &str, n: usize) {
    let b = body();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut left = n;
    while left > 0 {
        let m = left.min(1000);
        for _ in 0..m {
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &b,
                props.clone(),
            )
            .await
            .expect("publish");
        }
        assert!(ch.wait_for_confirms().await.expect("confirms").is_empty());
        left -= m;
    }
}

/// Declares queue `name`, bound to `exchange` with `#`.
async fn sink(ch: &Channel, name: &str, exchange: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("sink");
    ch.queue_bind(
        name.into(),
        exchange.into(),
        "#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind sink");
}

/// Consumers on `queue` now (passive declare).
async fn consumers(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue exists")
    .consumer_count()
}

/// Polls `cond` every 10 ms until it holds; panics after `RUN_LIMIT` (a stuck contender).
async fn poll_until<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + RUN_LIMIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// User + system CPU seconds of process `pid` so far (all its threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("contender alive");
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit(')').next().expect("stat format");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / TICKS_PER_SECOND
}

/// Resident set of process `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("alive");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Contender {
    Raw,
    RustStream,
    Framework,
    /// Another build of `echo` (`BENCH_ECHO_BEFORE`), to compare a change in the same run.
    Before,
}

impl Contender {
    /// Its name in `BENCH_CONTENDERS`.
    fn key(self) -> &'static str {
        match self {
            Contender::Raw => "raw",
            Contender::RustStream => "ruststream",
            Contender::Framework => "framework",
            Contender::Before => "before",
        }
    }

    /// The `echo` binary of a framework contender.
    fn echo_bin(self) -> String {
        match self {
            Contender::Before => std::env::var("BENCH_ECHO_BEFORE").expect("BENCH_ECHO_BEFORE"),
            _ => ECHO.to_string(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Contender::Raw => "raw lapin",
            Contender::RustStream => "ruststream-lapin 0.7.2",
            Contender::Framework => "framework echo",
            Contender::Before => "framework echo (BENCH_ECHO_BEFORE)",
        }
    }
}

/// One run's figures.
#[derive(Clone, Copy, Debug)]
struct Run {
    rate: f64,
    cpu: f64,
}

/// A measuring point (prefetch, queue type); its runs are kept per contender.
type Point = (u16, String);

/// One timed run of `who` over `n` pre-loaded messages.
async fn run(who: Contender, n: usize, prefetch: u16, queue_type: &str) -> Run {
    let (conn, ch) = connect().await;
    let q = unique("bench");
    let sink_q = format!("{q}-sink");
    let config_dir = tempfile::tempdir().expect("tmp");
    let (_cleanup, mut cmd) = match who {
        Contender::Framework | Contender::Before => {
            let echo = who.echo_bin();
            let mut cmd = service_command(&echo, "echo", &q, &amqp_url(), config_dir.path());
            cmd.env("STORAGETIER__AMQP__PREFETCH", prefetch.to_string())
                .env("STORAGETIER__AMQP__QUEUE_TYPE", queue_type)
                // The production default (info), not the tests' warn: logging is a cost.
                .env_remove("STORAGETIER__LOG__LEVEL")
                .stderr(Stdio::null());
            let cleanup = Cleanup::service(&q, &[1000, 5000, 30000, 120000]);
            let mut declare = service_command(&echo, "echo", &q, &amqp_url(), config_dir.path());
            declare
                .env("STORAGETIER__AMQP__QUEUE_TYPE", queue_type)
                .stderr(Stdio::null())
                .arg("declare");
            assert!(declare.status().expect("echo runs").success());
            sink(&ch, &sink_q, &format!("{q}-out")).await;
            fill(&ch, &format!("{q}-in"), "bench.x", n).await;
            cmd.arg("run");
            (cleanup, cmd)
        }
        Contender::Raw | Contender::RustStream => {
            let out = format!("{q}-out");
            let cleanup = Cleanup::new(vec![q.clone()], vec![out.clone()]);
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(queue_type.into()),
            );
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("declare");
            ch.exchange_declare(
                out.as_str().into(),
                ExchangeKind::Topic,
                framework::lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
            sink(&ch, &sink_q, &out).await;
            fill(&ch, "", &q, n).await;
            let mut cmd = Command::new(std::env::current_exe().expect("own path"));
            cmd.env(
                "BENCH_CHILD",
                if who == Contender::Raw {
                    "raw"
                } else {
                    "ruststream"
                },
            )
            .env("BENCH_QUEUE", &q)
            .env("BENCH_QUEUE_TYPE", queue_type)
            .env("BENCH_OUT", &out)
            .env("BENCH_PREFETCH", prefetch.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
            (cleanup, cmd)
        }
    };
    let _sink_cleanup = Cleanup::new(vec![sink_q.clone()], vec![]);
    let child = process::spawn(&mut cmd).expect("contender starts");
    let pid = child.id();
    poll_until("the contender's consumer", || {
        consumers(&ch, &q).map(|c| c >= 1)
    })
    .await;
    let (start, cpu0) = (Instant::now(), cpu_seconds(pid));
    poll_until("the sink to fill", || {
        ready_count(&ch, &sink_q).map(|c| c as usize >= n)
    })
    .await;
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds(pid) - cpu0);
    drop(child);
    let _ = conn.close(200, "done".into()).await;
    Run {
        rate: n as f64 / secs,
        cpu,
    }
}

/// The framework's idle footprint: an echo service started, consuming an empty queue, then
/// left idle for two seconds (its VmRSS, MiB).
async fn idle_rss() -> f64 {
    let (conn, ch) = connect().await;
    let q = unique("bench-idle");
    let _cleanup = Cleanup::service(&q, &[1000, 5000, 30000, 120000]);
    let config_dir = tempfile::tempdir().expect("tmp");
    let echo = || {
        let mut c = service_command(ECHO, "echo", &q, &amqp_url(), config_dir.path());
        // The production default (info), not the tests' warn.
        c.env_remove("STORAGETIER__LOG__LEVEL")
            .stderr(Stdio::null());
        c
    };
    assert!(echo().arg("declare").status().expect("echo runs").success());
    let child = process::spawn(echo().arg("run")).expect("echo starts");
    poll_until("echo's consumer", || consumers(&ch, &q).map(|c| c >= 1)).await;
    // Idle is a duration, not an event: let start-up allocations settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mib(child.id());
    drop(child);
    let _ = conn.close(200, "done".into()).await;
    rss
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Spread of `v` around its median, in percent (max − min over median).
fn spread(v: &[f64]) -> f64 {
    let m = median(v.to_vec());
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    100.0 * (hi - lo) / m
}

fn main() {
    if let Ok(kind) = std::env::var("BENCH_CHILD") {
        return child(&kind);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(parent());
}

async fn parent() {
    let n: usize = env_or("BENCH_MESSAGES", "20000")
        .parse()
        .expect("BENCH_MESSAGES");
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().expect("BENCH_ROUNDS");
    let prefetches: Vec<u16> = env_list("BENCH_PREFETCH", "16,128")
        .iter()
        .map(|p| p.parse().expect("BENCH_PREFETCH"))
        .collect();
    let types = env_list("BENCH_QUEUE_TYPES", "quorum,classic");
    // Raw lapin is always measured: the ratios are against it.
    let mut wanted = env_list("BENCH_CONTENDERS", "raw,ruststream,framework");
    if std::env::var_os("BENCH_ECHO_BEFORE").is_some() {
        wanted.push("before".to_string());
    }
    let all: Vec<Contender> = [
        Contender::Raw,
        Contender::RustStream,
        Contender::Framework,
        Contender::Before,
    ]
    .into_iter()
    .filter(|c| *c == Contender::Raw || wanted.iter().any(|w| w == c.key()))
    .collect();
    let mut results: Vec<(Point, Vec<Vec<Run>>)> = Vec::new();
    for p in &prefetches {
        for t in &types {
            results.push(((*p, t.clone()), vec![Vec::new(); all.len()]));
        }
    }
    for round in 0..rounds {
        for ((p, t), runs) in results.iter_mut() {
            for k in 0..all.len() {
                let i = (k + round) % all.len();
                let r = run(all[i], n, *p, t).await;
                eprintln!(
                    "round {} prefetch {p} {t} {}: {:.0} msg/s, {:.2} s CPU",
                    round + 1,
                    all[i].name(),
                    r.rate,
                    r.cpu
                );
                runs[i].push(r);
            }
        }
    }
    let rss = idle_rss().await;
    println!(
        "\n{n} messages × 1 KiB, persistent, confirm awaited before ack; medians of {rounds} \
         interleaved rounds; CPU = the contender process's user+system seconds\n"
    );
    println!(
        "| prefetch | queue | contender | msg/s | CPU s | msg/s vs raw | CPU/msg vs raw | msg/s spread |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for ((p, t), runs) in &results {
        // Ratios per round (raw measured beside it), then their median.
        let raw = &runs[0];
        for (i, who) in all.iter().enumerate() {
            let rs = &runs[i];
            let rate = median(rs.iter().map(|r| r.rate).collect());
            let cpu = median(rs.iter().map(|r| r.cpu).collect());
            let vs_rate = median(rs.iter().zip(raw).map(|(r, b)| r.rate / b.rate).collect());
            let vs_cpu = median(rs.iter().zip(raw).map(|(r, b)| r.cpu / b.cpu).collect());
            let spread = spread(&rs.iter().map(|r| r.rate).collect::<Vec<_>>());
            println!(
                "| {p} | {t} | {} | {rate:.0} | {cpu:.2} | {vs_rate:.2} | {vs_cpu:.2} | ±{:.0} % |",
                who.name(),
                spread / 2.0
            );
        }
    }
    println!("\nframework echo idle RSS: {rss:.1} MiB");
}

/// A contender's process: consume `BENCH_QUEUE` until killed.
fn child(kind: &str) {
    let q = std::env::var("BENCH_QUEUE").expect("BENCH_QUEUE");
    let out = std::env::var("BENCH_OUT").expect("BENCH_OUT");
    let quorum = std::env::var("BENCH_QUEUE_TYPE").as_deref() == Ok("quorum");
    let prefetch: u16 = env_or("BENCH_PREFETCH", "16").parse().expect("prefetch");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match kind {
        "raw" => rt.block_on(raw(&q, &out, prefetch)),
        "ruststream" => rt.block_on(peer::run(q, out, prefetch, quorum)),
        other => panic!("unknown contender {other}"),
    }
}

/// Raw lapin: one task per delivery publishes to `out` on a shared confirm channel, awaits
/// the confirm, then acks.
async fn raw(q: &str, out: &str, prefetch: u16) {
    let (_conn, ch) = connect().await;
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            q.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let out: std::sync::Arc<str> = out.into();
    while let Some(Ok(delivery)) = consumer.next().await {
        let ch = ch.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let c = ch
                .basic_publish(
                    (&*out).into(),
                    "raw.success".into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    props,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            if c.is_ack() {
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
        });
    }
}

/// ruststream-lapin 0.7.2 as its guide writes a service: a typed JSON handler on the queue,
/// `prefetch` workers, a persistent confirms publisher to the output exchange, ack after the
/// confirm.
mod peer {
    use super::*;
    use ruststream_lapin::prelude::*;
    use serde::{Deserialize, Serialize};

    /// The bench's document (`{"pad": "…"}`).
    #[derive(Debug, Deserialize, Serialize, Outgoing)]
    #[outgoing(name = "ruststream.success")]
    pub struct Doc {
        pad: String,
    }

    #[subscriber("placeholder")]
    async fn echo(doc: &Doc, Out(out): Out<impl Publisher>) -> HandlerOutcome {
        if out.message(doc).publish().await.is_err() {
            return HandlerOutcome::retry();
        }
        HandlerOutcome::ack()
    }

    pub async fn run(q: String, out: String, prefetch: u16, quorum: bool) {
        let window = NonZeroUsize::new(usize::from(prefetch)).expect("prefetch > 0");
        let prefetch = std::num::NonZeroU16::new(prefetch).expect("prefetch > 0");
        let broker = LapinBroker::new(amqp_url()).prefetch(prefetch);
        let publish = LapinPublish::default()
            .exchange(out)
            .persistent(true)
            .confirms();
        let app = RustStream::new(AppInfo::new("bench", "0.1.0")).with_broker(broker, |b| {
            let q = q.clone();
            if quorum {
                b.include(
                    echo.map_source(move |_| RabbitQuorumQueue::new(q.clone()))
                        .workers(window),
                )
                .out(DefaultSlot, publish.clone())
                .build();
            } else {
                b.include(
                    echo.map_source(move |_| RabbitQueue::new(q.clone()).durable(true))
                        .workers(window),
                )
                .out(DefaultSlot, publish.clone())
                .build();
            }
        });
        let _running = app.start().await.expect("ruststream starts");
        std::future::pending::<()>().await;
    }
}
