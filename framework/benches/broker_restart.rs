//! Reliability harness (not part of the test suite: it restarts the whole broker):
//! 10,000 messages flow through the echo service while RabbitMQ is stopped and started
//! (`rabbitmqctl stop_app` / `start_app`); counts lost and duplicated outcomes and the
//! time the service took to resume without being restarted.
//!
//! `cargo bench -p framework --bench broker_restart` (BENCH_MESSAGES, default 10000)

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use framework::lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use framework::lapin::types::FieldTable;
use framework::lapin::{BasicProperties, Channel, Connection};
use framework::testing::{amqp_url, cleanup, cleanup_service, unique};

async fn channel() -> Option<(Connection, Channel)> {
    let conn = Connection::connect(&amqp_url(), Default::default())
        .await
        .ok()?;
    let ch = framework::runtime::confirm_channel(&conn).await.ok()?;
    Some((conn, ch))
}

async fn count(q: &str) -> Option<u32> {
    let (conn, ch) = channel().await?;
    let n = ch
        .queue_declare(
            q.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = conn.close(200, "".into()).await;
    n
}

fn ctl(args: &[&str]) {
    let ok = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success());
    assert_eq!(ok.ok(), Some(true), "rabbitmqctl {args:?}");
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let q = unique("restart");
    let sink = unique("restart-sink");
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_echo");
    let echo = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("--config-dir")
            .arg(dir.path())
            .env("STORAGETIER__AMQP__URL", amqp_url())
            .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "200")
            .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "2000")
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
    assert!(echo(&["declare"]).status().unwrap().success());
    let (conn, ch) = channel().await.expect("broker up");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        framework::lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        sink.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        sink.as_str().into(),
        format!("{q}-out").as_str().into(),
        "#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..n {
        ch.basic_publish(
            format!("{q}-in").as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let _ = conn.close(200, "".into()).await;

    let mut child = echo(&["run"]).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while count(&sink).await.unwrap_or(0) < (n / 5) as u32 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = count(&sink).await.unwrap_or(0);
    ctl(&["stop_app"]);
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    ctl(&["start_app"]);
    ctl(&["await_startup"]);
    let up_at = Instant::now();
    let before = count(&sink).await.unwrap_or(before);
    // Recovered when the sink grows again after the broker is back.
    let mut recovered = None;
    loop {
        if let Some(c) = count(&sink).await {
            if recovered.is_none() && c > before {
                recovered = Some(up_at.elapsed());
            }
            if c as usize >= n && count(&q).await == Some(0) {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "finished in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let code = child.wait().unwrap().code();

    let (conn, ch) = channel().await.unwrap();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    while let Ok(Some(m)) = ch
        .basic_get(sink.as_str().into(), BasicGetOptions { no_ack: true })
        .await
    {
        let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        *seen.entry(v["i"].as_u64().unwrap()).or_default() += 1;
    }
    let _ = conn.close(200, "".into()).await;
    let lost = n - seen.len();
    let dup: usize = seen.values().map(|c| c - 1).sum();
    println!(
        "| broker stop_app/start_app mid-stream (3 s down) | {n} | {lost} | {dup} | {:.1} s after start_app (down {:.1} s) | exit {code:?} |",
        recovered.unwrap_or_default().as_secs_f64(),
        (up_at - down_at).as_secs_f64()
    );
    cleanup_service(&q, &[1000, 5000, 30000, 120000]);
    cleanup(vec![sink], vec![]);
}
