//! Archive throughput and memory through the real `online-archive` binary, each against a
//! reference measured in the same run, reference and service interleaved round by round
//! (other work shares this machine): medians, ratios and the spread are printed.
//!
//! `cargo bench -p online-archive --bench archive`
//!
//! Sections (`BENCH_ONLY`, comma-separated; default `small,big,parallel`; add `s3`):
//! - `small`: `BENCH_SMALL_FILES` (5000) × `BENCH_SMALL_KIB` (4) files, their messages
//!   preloaded into the input queue; the reference is the framework's echo hop (a
//!   pass-through processor in the framework's `Background` runtime) fed the same
//!   messages with the same prefetch (`BENCH_PREFETCH`, 16) on the same broker.
//!   Timed from the first output to the last, files/s and msgs/s.
//! - `big`: one `BENCH_BIG_MIB` (1024) file on the local filesystem; the reference is
//!   `rclone copy` (hashes and checks what it wrote), also shown with an fsync of the copy
//!   (`sync FILE`), and `cp` + `sync FILE` for context.
//! - `parallel`: `BENCH_PARALLEL_FILES` (16) files × `BENCH_PARALLEL_MIB` (256) at once
//!   (prefetch 16): the service's peak RSS.
//! - `s3`: the big and small workloads through moto (one round; measures moto mostly).
//!
//! `BENCH_ROUNDS` (3) rounds per comparison; `BENCH_DIR` (/var/tmp) holds the data
//! (`BENCH_KEEP_DIR` keeps it afterwards, so that a following run pays for no deletions);
//! `BENCH_ARCHIVE_BEFORE` (the path of another `online-archive` build) runs it too in every
//! small-files round, so a change is measured before and after in the same run.
//! Peak RSS is the service process's VmHWM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use framework::lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use framework::lapin::types::FieldTable;
use framework::lapin::{BasicProperties, Channel};
use framework::testing::{
    Background, FnProcessor, amqp_url, cleanup_service, next, process, service_command,
    test_channel, unique, watch,
};
use framework::{Outcome, ProcessorConfiguration, Runtime};
use storage::testing::{MotoServer, sweeper_message};

const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

// The echo hop runs in this process: on the allocator a service binary runs on.
#[global_allocator]
static GLOBAL: framework::ServiceAllocator = framework::ServiceAllocator;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn write_big(path: &Path, mib: usize, seed: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1024 * 1024];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i * 31 + j * 7 + seed * 13) as u8;
        }
        f.write_all(&block).unwrap();
    }
}

fn secs_of(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?}");
    t.elapsed().as_secs_f64()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

/// Publishes every message persistently, confirms awaited per thousand.
async fn preload(ch: &Channel, exchange: &str, files: &[(String, String)]) {
    let props = BasicProperties::default().with_delivery_mode(2);
    for chunk in files.chunks(1000) {
        for (dir, name) in chunk {
            let m = sweeper_message(dir, name, false).to_string();
            ch.basic_publish(
                exchange.into(),
                KEY.into(),
                BasicPublishOptions::default(),
                m.as_bytes(),
                props.clone(),
            )
            .await
            .expect("publish");
        }
        ch.wait_for_confirms().await.expect("confirms");
    }
}

/// Receives `n` outputs; returns the instants of the first and the last.
async fn outputs(out: &mut framework::lapin::Consumer, n: usize) -> (Instant, Instant) {
    let mut first = None;
    for _ in 0..n {
        next(out).await;
        first.get_or_insert_with(Instant::now);
    }
    (first.unwrap_or_else(Instant::now), Instant::now())
}

/// Messages per second from the first output to the last (preloaded input: start-up
/// is not timed, for the echo hop and the service alike).
fn rate(n: usize, (first, last): (Instant, Instant)) -> f64 {
    (n.saturating_sub(1)) as f64 / (last - first).as_secs_f64().max(1e-9)
}

/// The framework's echo hop over the same messages, same prefetch: msgs/s.
async fn echo(files: &[(String, String)], prefetch: usize) -> f64 {
    let q = unique("bench-echo");
    let cfg = framework::testing::config(&q, &[("amqp.prefetch", &prefetch.to_string())]);
    let pc = || {
        ProcessorConfiguration::new(
            &format!("{q}-in"),
            "assetsweeper.#",
            "bench.echo",
            FnProcessor(|v: serde_json::Value, _: &framework::MessageContext| Outcome::success(v)),
        )
    };
    let (c, ch) = test_channel().await;
    Runtime::new("bench-echo", &cfg, pc())
        .topology()
        .declare(&c)
        .await
        .expect("declare");
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    preload(&ch, &format!("{q}-in"), files).await;
    let bg = Background::start("bench-echo", &cfg, pc());
    let r = rate(files.len(), outputs(&mut out, files.len()).await);
    bg.stop().await;
    cleanup_service(&q, &cfg.retry.delays_ms);
    r
}

/// One run of the service: its own data dir (store and database) under `base`, files
/// read from `online`.
#[derive(Clone)]
struct Archive<'a> {
    base: &'a Path,
    online: &'a Path,
    extra_env: Vec<(&'static str, String)>,
    /// Leave each run's store for the end of the bench instead of deleting it at once: on
    /// an ext4 without a journal (this machine's), every new inode is allocated past
    /// the ones deleted in the last minute, scanning them one by one, so deleting a run's
    /// 5,000 objects made the next run's copies pay for that scan.
    keep_data: bool,
    /// The `online-archive` binary.
    bin: String,
}

/// What one service run measured.
struct Measured {
    /// Seconds (see the caller for from when).
    secs: f64,
    /// Messages per second, first output to last.
    rate: f64,
    /// Peak RSS in KiB.
    rss: u64,
}

impl Archive<'_> {
    /// Sends one message per file, `preloaded` before the service starts (timed first
    /// output to last) or once it consumes (timed from the first publish to the last
    /// output).
    async fn run(&self, files: &[(String, String)], preloaded: bool) -> Measured {
        let q = unique("bench-archive");
        let data = self.base.join(&q);
        std::fs::create_dir_all(data.join("no-config")).unwrap();
        let bin = self.bin.as_str();
        let cmd = || {
            let mut c = service_command(
                bin,
                "online_archive",
                &q,
                &amqp_url(),
                &data.join("no-config"),
            );
            c.env("STORAGETIER__STORAGE__DATA_DIR", &data);
            c.env("STORAGETIER__ONLINE_ARCHIVE__ONLINE_ROOTS", self.online);
            c.env(
                "STORAGETIER__AMQP__PREFETCH",
                env_usize("BENCH_PREFETCH", 16).to_string(),
            );
            for (k, v) in &self.extra_env {
                c.env(k, v);
            }
            c
        };
        assert!(cmd().arg("declare").status().unwrap().success(), "declare");
        let (_c, ch) = test_channel().await;
        let mut out = watch(&ch, &format!("{q}-out"), "#").await;
        let input = format!("{q}-in");
        if preloaded {
            preload(&ch, &input, files).await;
        }
        let mut child = process::spawn(cmd().arg("run")).unwrap();
        let start = if preloaded {
            Instant::now()
        } else {
            wait_consumer(&ch, &q).await;
            let t = Instant::now();
            preload(&ch, &input, files).await;
            t
        };
        let (first, last) = outputs(&mut out, files.len()).await;
        let rss = vm_hwm_kib(child.id());
        assert!(child.terminate(Duration::from_secs(30)).is_some(), "stops");
        cleanup_service(&q, &[1000, 5000, 30000, 120000]);
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&data);
        }
        Measured {
            secs: (last - if preloaded { first } else { start }).as_secs_f64(),
            rate: rate(files.len(), (first, last)),
            rss,
        }
    }
}

/// Waits (bounded) until the service consumes from `q`.
async fn wait_consumer(ch: &Channel, q: &str) {
    let deadline = Instant::now() + framework::testing::WAIT;
    loop {
        let d = ch
            .queue_declare(
                q.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        if d.consumer_count() > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "service did not start consuming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn small_files(online: &Path, n: usize, kib: usize) -> Vec<(String, String)> {
    let dir = online.join("small");
    std::fs::create_dir_all(&dir).unwrap();
    (0..n)
        .map(|i| {
            let name = format!("f{i:05}.dat");
            std::fs::write(dir.join(&name), vec![(i % 251) as u8; kib * 1024]).unwrap();
            (dir.display().to_string(), name)
        })
        .collect()
}

fn rclone(src: &Path, dest: &Path) -> f64 {
    secs_of(
        Command::new("rclone")
            .args(["copy", "--config", "/dev/null"])
            .arg(src)
            .arg(dest),
    )
}

fn fsync_file(p: &Path) -> f64 {
    secs_of(Command::new("sync").arg(p))
}

#[tokio::main]
async fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "small,big,parallel".into());
    let want = |s: &str| only.split(',').any(|x| x.trim() == s);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let prefetch = env_usize("BENCH_PREFETCH", 16);
    let base_dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    // BENCH_KEEP_DIR: the data stays (deleted later, by hand): on a filesystem without a
    // journal, the next run's creates would pay for this run's deletions (see
    // docs/benchmarks.md), so runs one after another compare fairly.
    let (base, _removed_at_end) = if std::env::var_os("BENCH_KEEP_DIR").is_some() {
        let kept = base_dir.keep();
        eprintln!("BENCH_KEEP_DIR: the data stays in {}", kept.display());
        (kept, None)
    } else {
        (base_dir.path().to_path_buf(), Some(base_dir))
    };
    let base = base.as_path();
    let online = base.join("online");
    std::fs::create_dir_all(&online).unwrap();
    let archive = Archive {
        base,
        online: &online,
        extra_env: Vec::new(),
        keep_data: false,
        bin: env!("CARGO_BIN_EXE_online-archive").to_string(),
    };

    if want("small") {
        let n = env_usize("BENCH_SMALL_FILES", 5000);
        let kib = env_usize("BENCH_SMALL_KIB", 4);
        let files = small_files(&online, n, kib);
        let (mut e, mut a, mut ratios, mut rss) = (vec![], vec![], vec![], vec![]);
        let small = Archive {
            keep_data: true,
            ..archive.clone()
        };
        // Another build of the service (`BENCH_ARCHIVE_BEFORE`), measured in the same rounds.
        let before = std::env::var("BENCH_ARCHIVE_BEFORE")
            .ok()
            .map(|bin| Archive {
                bin,
                ..small.clone()
            });
        let (mut b, mut b_ratios) = (vec![], vec![]);
        for round in 0..rounds {
            let er = echo(&files, prefetch).await;
            // The two builds swap places every round: the second run of a round meets the
            // filesystem the first left behind.
            let mut bm = None;
            if let Some(before) = before.as_ref().filter(|_| round % 2 == 1) {
                bm = Some(before.run(&files, true).await);
            }
            let m = small.run(&files, true).await;
            eprintln!(
                "small round: echo {er:.0} msgs/s, archive {:.0} files/s ({:.2}×)",
                m.rate,
                m.rate / er
            );
            e.push(er);
            a.push(m.rate);
            ratios.push(m.rate / er);
            rss.push(m.rss as f64 / 1024.0);
            if let Some(before) = before.as_ref().filter(|_| round % 2 == 0) {
                bm = Some(before.run(&files, true).await);
            }
            if let Some(m) = bm {
                eprintln!(
                    "small round: archive before {:.0} files/s ({:.2}×)",
                    m.rate,
                    m.rate / er
                );
                b.push(m.rate);
                b_ratios.push(m.rate / er);
            }
        }
        println!(
            "\n{n} files × {kib} KiB, preloaded, prefetch {prefetch}, {rounds} rounds interleaved (median, [min–max])\n"
        );
        println!(
            "| echo hop msgs/s | online-archive files/s | ratio of medians | per-round ratios | service peak RSS |"
        );
        println!("|---:|---:|---:|---:|---:|");
        println!(
            "| {:.0} [{}] | {:.0} [{}] | {:.2}× | {} | {:.1} MiB |",
            median(&e),
            spread(&e),
            median(&a),
            spread(&a),
            median(&a) / median(&e),
            spread(&ratios),
            median(&rss)
        );
        if !b.is_empty() {
            println!(
                "\nBENCH_ARCHIVE_BEFORE: {:.0} [{}] files/s, {:.2}× the echo hop (per round {})",
                median(&b),
                spread(&b),
                median(&b) / median(&e),
                spread(&b_ratios)
            );
        }
    }

    if want("big") {
        let mib = env_usize("BENCH_BIG_MIB", 1024);
        std::fs::create_dir_all(online.join("big")).unwrap();
        let src = online.join("big/file.bin");
        write_big(&src, mib, 0);
        // Every contender reads a warm page cache.
        let _ = Command::new("cat")
            .arg(&src)
            .stdout(std::process::Stdio::null())
            .status();
        let big = vec![(
            online.join("big").display().to_string(),
            "file.bin".to_string(),
        )];
        let (mut rc, mut rcs, mut cps, mut a, mut rss, mut ratios) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mibf = mib as f64;
        for round in 0..rounds {
            let dest: PathBuf = base.join(format!("rclone-{round}"));
            let t = rclone(&src, &dest);
            let s = fsync_file(&dest.join("file.bin"));
            let _ = std::fs::remove_dir_all(&dest);
            let cp_dest = base.join("cp.bin");
            let c = secs_of(Command::new("cp").arg(&src).arg(&cp_dest)) + fsync_file(&cp_dest);
            let _ = std::fs::remove_file(&cp_dest);
            let m = archive.run(&big, false).await;
            eprintln!(
                "big round: rclone {:.0} MiB/s (+fsync {:.0}), cp+fsync {:.0}, archive {:.0} MiB/s, {:.1} MiB RSS",
                mibf / t,
                mibf / (t + s),
                mibf / c,
                mibf / m.secs,
                m.rss as f64 / 1024.0
            );
            rc.push(mibf / t);
            rcs.push(mibf / (t + s));
            cps.push(mibf / c);
            a.push(mibf / m.secs);
            ratios.push(t / m.secs);
            rss.push(m.rss as f64 / 1024.0);
        }
        println!(
            "\n1 file × {mib} MiB, local filesystem, warm page cache, {rounds} rounds interleaved (MiB/s, median [min–max])\n"
        );
        println!(
            "| rclone copy | rclone copy + fsync | cp + fsync | online-archive | vs rclone | vs rclone + fsync | per-round vs rclone | service peak RSS |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {:.0} [{}] | {:.0} [{}] | {:.0} [{}] | {:.0} [{}] | {:.2}× | {:.2}× | {} | {:.1} MiB |",
            median(&rc),
            spread(&rc),
            median(&rcs),
            spread(&rcs),
            median(&cps),
            spread(&cps),
            median(&a),
            spread(&a),
            median(&a) / median(&rc),
            median(&a) / median(&rcs),
            spread(&ratios),
            median(&rss)
        );
        let _ = std::fs::remove_file(&src);
    }

    if want("parallel") {
        let n = env_usize("BENCH_PARALLEL_FILES", 16);
        let mib = env_usize("BENCH_PARALLEL_MIB", 256);
        let dir = online.join("parallel");
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<(String, String)> = (0..n)
            .map(|i| {
                let name = format!("p{i:02}.bin");
                write_big(&dir.join(&name), mib, i + 1);
                (dir.display().to_string(), name)
            })
            .collect();
        let m = archive.run(&files, false).await;
        println!(
            "\n{n} files × {mib} MiB at once (prefetch {prefetch}), local filesystem\n\n| total s | MiB/s | service peak RSS |\n|---:|---:|---:|\n| {:.2} | {:.0} | {:.1} MiB |",
            m.secs,
            (n * mib) as f64 / m.secs,
            m.rss as f64 / 1024.0
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    if want("s3") {
        let big_mib = env_usize("BENCH_BIG_MIB", 1024);
        let moto = MotoServer::start("bench").await;
        let s3 = |prefix: &str| -> Vec<(&'static str, String)> {
            vec![
                (
                    "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL",
                    format!("s3://bench/{prefix}"),
                ),
                (
                    "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__ENDPOINT",
                    moto.endpoint.clone(),
                ),
                (
                    "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__ALLOW_HTTP",
                    "true".into(),
                ),
                (
                    "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__ACCESS_KEY_ID",
                    "bench".into(),
                ),
                (
                    "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__SECRET_ACCESS_KEY",
                    "bench".into(),
                ),
            ]
        };
        std::fs::create_dir_all(online.join("big")).unwrap();
        write_big(&online.join("big/file.bin"), big_mib, 0);
        let big = vec![(
            online.join("big").display().to_string(),
            "file.bin".to_string(),
        )];
        let a = Archive {
            base,
            online: &online,
            extra_env: s3("big"),
            keep_data: false,
            bin: archive.bin.clone(),
        };
        let m = a.run(&big, false).await;
        println!(
            "\nS3 (moto), one round\n\n| workload | online-archive s | service peak RSS |\n|---|---:|---:|\n| 1 file × {big_mib} MiB | {:.2} | {:.1} MiB |",
            m.secs,
            m.rss as f64 / 1024.0
        );
        let n = env_usize("BENCH_SMALL_FILES", 5000);
        let kib = env_usize("BENCH_SMALL_KIB", 4);
        let files = small_files(&online, n, kib);
        let a = Archive {
            base,
            online: &online,
            extra_env: s3("small"),
            keep_data: false,
            bin: archive.bin.clone(),
        };
        let m = a.run(&files, true).await;
        println!(
            "| {n} files × {kib} KiB | {:.2} ({:.0} files/s) | {:.1} MiB |",
            m.secs,
            m.rate,
            m.rss as f64 / 1024.0
        );
    }
}
