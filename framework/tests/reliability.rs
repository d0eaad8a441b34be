//! Zero-loss under faults that touch only this test's service: `kill -9` mid-stream and
//! the broker closing the service's connection repeatedly under load. Each prints its
//! figures (sent, lost, duplicated, time) for docs/reliability.md.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use framework::lapin::BasicProperties;
use framework::lapin::options::BasicPublishOptions;
use framework::testing::*;

const BIN: &str = env!("CARGO_BIN_EXE_echo");

fn echo(q: &str, name: &str, dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config-dir")
        .arg(dir)
        .env("STORAGETIER__AMQP__URL", amqp_url())
        .env("STORAGETIER__AMQP__CONNECTION_NAME", name)
        .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "100")
        .env("STORAGETIER__ECHO__QUEUE", q)
        .env("STORAGETIER__ECHO__OUTPUT_EXCHANGE", format!("{q}-out"))
        .env("STORAGETIER__ECHO__INPUT_EXCHANGE", format!("{q}-in"))
        .env("STORAGETIER__ECHO__HTTP_LISTEN", "127.0.0.1:0")
        .env("STORAGETIER__ECHO__DELAY_MS", "2")
        .env("STORAGETIER__RETRY__DELAYS_MS", "200,400")
        .env("STORAGETIER__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn spawn(c: &mut Command) -> Child {
    c.spawn().expect("echo starts")
}

async fn send(ch: &framework::lapin::Channel, q: &str, n: usize) {
    for i in 0..n {
        ch.basic_publish(
            format!("{q}-in").as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    }
    ch.wait_for_confirms().await.expect("confirms");
}

/// Records one output's id.
fn record(seen: &mut HashMap<u64, usize>, d: &framework::lapin::message::Delivery) {
    let v: serde_json::Value = serde_json::from_slice(&d.data).expect("json output");
    *seen.entry(v["i"].as_u64().expect("id")).or_default() += 1;
}

/// Collects outputs until every id 0..n was seen; returns (lost, duplicated).
async fn collect(
    out: &mut framework::lapin::Consumer,
    mut seen: HashMap<u64, usize>,
    n: usize,
    budget: Duration,
) -> (usize, usize) {
    let deadline = Instant::now() + budget;
    while seen.len() < n && Instant::now() < deadline {
        if let Some(d) = next_within(out, Duration::from_millis(500)).await {
            record(&mut seen, &d);
        }
    }
    // Let late duplicates arrive.
    while let Some(d) = next_within(out, Duration::from_millis(300)).await {
        record(&mut seen, &d);
    }
    let lost = n - seen.len();
    let dup = seen.values().map(|c| c - 1).sum();
    (lost, dup)
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing() {
    let q = unique("kill9");
    let dir = tempfile::tempdir().unwrap();
    let o = echo(&q, &unique("c"), dir.path())
        .arg("declare")
        .status()
        .unwrap();
    assert!(o.success());
    let (_c, ch) = test_channel().await;
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    let n = 2000;
    send(&ch, &q, n).await;
    let started = Instant::now();
    let mut child = spawn(echo(&q, &unique("c"), dir.path()).arg("run"));
    // Let it get going, then kill it without warning.
    let mut seen = HashMap::new();
    for _ in 0..200 {
        record(&mut seen, &next(&mut out).await);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut again = spawn(echo(&q, &unique("c"), dir.path()).arg("run"));
    let (lost, dup) = collect(&mut out, seen, n, WAIT * 3).await;
    let _ = Command::new("kill")
        .args(["-TERM", &again.id().to_string()])
        .status();
    assert_eq!(again.wait().unwrap().code(), Some(0));
    println!(
        "kill -9: sent {n}, lost {lost}, duplicated {dup} (prefetch 16), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "nothing lost");
    assert!(dup <= 16, "duplicates bounded by what was in flight");
    cleanup_service(&q, &[200, 400]);
}

#[tokio::test]
async fn repeated_forced_connection_closes_lose_nothing() {
    let q = unique("closes");
    let name = unique("conn");
    let dir = tempfile::tempdir().unwrap();
    assert!(
        echo(&q, &name, dir.path())
            .arg("declare")
            .status()
            .unwrap()
            .success()
    );
    let (_c, ch) = test_channel().await;
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    let n = 2000;
    send(&ch, &q, n).await;
    let started = Instant::now();
    let mut child = spawn(echo(&q, &name, dir.path()).arg("run"));
    let mut closes = 0;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    while seen.len() < n && started.elapsed() < WAIT * 3 {
        if let Some(d) = next_within(&mut out, Duration::from_millis(500)).await {
            record(&mut seen, &d);
            if seen.len().is_multiple_of(400) && closes < 4 && close_connection_named(&name) > 0 {
                closes += 1;
            }
        }
    }
    let (lost, dup) = collect(&mut out, seen, n, Duration::ZERO).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    println!(
        "connection closed {closes}×: sent {n}, lost {lost}, duplicated {dup}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(closes >= 2, "the connection was actually closed under load");
    assert_eq!(lost, 0);
    assert!(
        dup <= closes * 16,
        "duplicates bounded by prefetch per close"
    );
    cleanup_service(&q, &[200, 400]);
}
