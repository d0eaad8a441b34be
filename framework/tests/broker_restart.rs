//! Broker restart mid-stream (`rabbitmqctl stop_app` / `start_app`) with 10,000 messages
//! flowing through the echo service, on a private RabbitMQ node so the shared broker and
//! every other test are untouched. The service is not restarted: it must reconnect,
//! re-declare and finish the stream with nothing lost and duplicates bounded by what was
//! in flight (`prefetch`). Prints its figures for docs/reliability.md.
//!
//! `cargo test -p framework --test broker_restart -- --nocapture` (RESTART_MESSAGES
//! overrides the 10,000).

use std::process::{Command, Stdio};
use std::time::Duration;

use framework::testing::broker::{PrivateBroker, Tally};
use framework::testing::unique;

const PREFETCH: usize = 16;

fn messages() -> usize {
    std::env::var("RESTART_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let n = messages();
    let broker = PrivateBroker::start().await;
    let q = unique("restart");
    let sink = format!("{q}-sink");
    let dir = tempfile::tempdir().expect("config dir");
    let echo = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_echo"));
        c.arg("--config-dir")
            .arg(dir.path())
            .env("STORAGETIER__AMQP__URL", broker.url())
            .env("STORAGETIER__AMQP__PREFETCH", PREFETCH.to_string())
            .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "200")
            .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "1000")
            .env("STORAGETIER__ECHO__QUEUE", &q)
            .env("STORAGETIER__ECHO__OUTPUT_EXCHANGE", format!("{q}-out"))
            .env("STORAGETIER__ECHO__INPUT_EXCHANGE", format!("{q}-in"))
            .env("STORAGETIER__ECHO__HTTP_LISTEN", "127.0.0.1:0")
            .env("STORAGETIER__LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .args(args);
        c
    };
    assert!(echo(&["declare"]).status().expect("echo runs").success());
    broker.sink(&sink, &format!("{q}-out")).await;
    broker
        .preload(
            &format!("{q}-in"),
            "k",
            (0..n).map(|i| format!("{{\"i\":{i}}}").into_bytes()),
        )
        .await;

    let mut child = echo(&["run"])
        .stderr(Stdio::null())
        .spawn()
        .expect("echo starts");
    let r = broker
        .restart_mid_stream(&q, &sink, n, Duration::from_secs(3))
        .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let code = child.wait().expect("echo exits").code();

    let seen = broker
        .drain_ids(&sink, |b| {
            let v: serde_json::Value = serde_json::from_slice(b).ok()?;
            v["i"].as_u64().map(|i| i.to_string())
        })
        .await;
    let t = Tally::of(n, &seen);
    println!("{}", t.restart_row("echo", &r));
    assert_eq!(t.lost, 0, "nothing lost");
    assert!(
        t.duplicated <= PREFETCH,
        "duplicates bounded by what was in flight: {t:?}"
    );
    assert_eq!(code, Some(0), "the service drained and exited cleanly");
}
