//! Broker restart mid-stream (`rabbitmqctl stop_app` / `start_app`) with 10,000 files
//! flowing through the online-archive binary, on a private RabbitMQ node so the shared
//! broker and every other test are untouched. The service is not restarted: every file
//! must be archived and reported at least once, duplicates bounded by `prefetch`, and a
//! redelivered file never becomes a second object. Prints its figures for
//! docs/reliability.md.
//!
//! `cargo test -p online-archive --test broker_restart -- --nocapture` (RESTART_MESSAGES
//! overrides the 10,000).

use std::process::{Command, Stdio};

use std::time::Duration;

use framework::testing::broker::{PrivateBroker, Tally};
use framework::testing::{service_command, unique};
use storage::testing::{put_online_file, sweeper_message};

const PREFETCH: usize = 16;
const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

fn messages() -> usize {
    std::env::var("RESTART_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Every regular file under `dir`, relative to it.
fn objects(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read archive dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_archives_every_file_once() {
    let n = messages();
    let broker = PrivateBroker::start().await;
    let q = unique("archive-restart");
    let sink = format!("{q}-sink");
    let data = tempfile::tempdir().expect("data dir");
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let name = format!("f{i}.bin");
            let dir = put_online_file(
                data.path(),
                &format!("d{}/{name}", i % 100),
                format!("file {i} ").repeat(64).as_bytes(),
            );
            sweeper_message(&dir, &name, false).to_string().into_bytes()
        })
        .collect();
    let archive = |args: &[&str]| {
        let bin = env!("CARGO_BIN_EXE_online-archive");
        let mut c = service_command(bin, "online_archive", &q, &broker.url(), data.path());
        c.env("STORAGETIER__AMQP__PREFETCH", PREFETCH.to_string())
            .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "200")
            .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "1000")
            .env("STORAGETIER__STORAGE__DATA_DIR", data.path())
            .args(args);
        c
    };
    assert!(
        archive(&["declare"])
            .status()
            .expect("online-archive runs")
            .success()
    );
    broker.sink(&sink, &format!("{q}-out")).await;
    broker
        .preload(&format!("{q}-in"), KEY, messages.into_iter())
        .await;

    let mut child = archive(&["run"])
        .stderr(Stdio::null())
        .spawn()
        .expect("online-archive starts");
    let r = broker
        .restart_mid_stream(&q, &sink, n, Duration::from_secs(3))
        .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let code = child.wait().expect("online-archive exits").code();

    let seen = broker
        .drain_ids(&sink, |b| {
            let v: serde_json::Value = serde_json::from_slice(b).ok()?;
            v["archive_key"].as_str().map(str::to_string)
        })
        .await;
    let t = Tally::of(n, &seen);
    println!("{}", t.restart_row("online-archive", &r));
    assert_eq!(t.lost, 0, "every file reported");
    assert!(
        t.duplicated <= PREFETCH,
        "duplicates bounded by what was in flight: {t:?}"
    );
    let dead = broker.count(&format!("{q}-dlq")).await;
    assert_eq!(dead, Some(0), "nothing dead-lettered");
    let stored = objects(&data.path().join("archive"));
    assert_eq!(stored.len(), n, "one object per file, no second copies");
    assert_eq!(code, Some(0), "the service drained and exited cleanly");
}
