//! Archive throughput and memory: one big file and many small files through the real
//! `online-archive` binary (local filesystem and S3 via moto), against `cp` of the same
//! data in the same run. Peak RSS is the service process's VmHWM.
//!
//! `cargo bench -p online-archive --bench archive`
//! env: BENCH_BIG_MIB (1024), BENCH_SMALL_FILES (10000), BENCH_SMALL_KIB (4), BENCH_S3 (1).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use framework::lapin::BasicProperties;
use framework::testing::{
    amqp_url, cleanup_service, next, publish, service_command, test_channel, unique, watch,
};
use storage::testing::{MotoServer, sweeper_message};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn write_big(path: &Path, mib: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1024 * 1024];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i * 31 + j * 7) as u8;
        }
        f.write_all(&block).unwrap();
    }
}

fn cp_secs(args: &[&str]) -> f64 {
    let t = Instant::now();
    let st = Command::new("cp").args(args).status().unwrap();
    assert!(st.success());
    let _ = Command::new("sync").status();
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

/// Runs the service, sends one message per file, returns (seconds, peak RSS KiB).
async fn archive(
    data: &Path,
    files: &[(String, String)],
    extra_env: &[(&str, String)],
) -> (f64, u64) {
    let q = unique("bench-archive");
    let bin = env!("CARGO_BIN_EXE_online-archive");
    let cmd = || {
        let mut c = service_command(
            bin,
            "online_archive",
            &q,
            &amqp_url(),
            &data.join("no-config"),
        );
        c.env("STORAGETIER__STORAGE__DATA_DIR", data);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c
    };
    let st = cmd().arg("declare").status().unwrap();
    assert!(st.success(), "declare");
    let (_c, ch) = test_channel().await;
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    let mut child = cmd().arg("run").spawn().unwrap();
    let t = Instant::now();
    for (dir, name) in files {
        let m = sweeper_message(dir, name, false);
        publish(
            &ch,
            &format!("{q}-in"),
            "assetsweeper.asset_folder_importer.file.new",
            m.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    for _ in files {
        next(&mut out).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let rss = vm_hwm_kib(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    cleanup_service(&q, &[1000, 5000, 30000, 120000]);
    (secs, rss)
}

#[tokio::main]
async fn main() {
    let big_mib = env_usize("BENCH_BIG_MIB", 1024);
    let n_small = env_usize("BENCH_SMALL_FILES", 10_000);
    let small_kib = env_usize("BENCH_SMALL_KIB", 4);
    let s3 = env_usize("BENCH_S3", 1) == 1;
    let base =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let data = base.path();
    std::fs::create_dir_all(data.join("no-config")).unwrap();
    let online = data.join("online");
    std::fs::create_dir_all(online.join("big")).unwrap();
    std::fs::create_dir_all(online.join("small")).unwrap();
    write_big(&online.join("big/file.bin"), big_mib);
    let small: Vec<(String, String)> = (0..n_small)
        .map(|i| {
            let name = format!("f{i:05}.dat");
            std::fs::write(
                online.join("small").join(&name),
                vec![(i % 251) as u8; small_kib * 1024],
            )
            .unwrap();
            (online.join("small").display().to_string(), name)
        })
        .collect();
    let big = vec![(
        online.join("big").display().to_string(),
        "file.bin".to_string(),
    )];

    println!(
        "| workload | backend | cp s | online-archive s | throughput vs cp | service peak RSS |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    let run = |label: &str, backend: &str, cp: f64, (secs, rss): (f64, u64)| {
        println!(
            "| {label} | {backend} | {cp:.2} | {secs:.2} | {:.2}× | {:.1} MiB |",
            cp / secs,
            rss as f64 / 1024.0
        );
    };
    let cp_big = cp_secs(&[
        online.join("big/file.bin").to_str().unwrap(),
        data.join("cp-big.bin").to_str().unwrap(),
    ]);
    let r = archive(data, &big, &[]).await;
    run(&format!("1 file × {big_mib} MiB"), "local fs", cp_big, r);
    let cp_small = cp_secs(&[
        "-r",
        online.join("small").to_str().unwrap(),
        data.join("cp-small").to_str().unwrap(),
    ]);
    let r = archive(data, &small, &[]).await;
    run(
        &format!("{n_small} files × {small_kib} KiB"),
        "local fs",
        cp_small,
        r,
    );
    if s3 {
        let moto = MotoServer::start("bench").await;
        let env = |prefix: &str| {
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
                (
                    "STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL",
                    format!("sqlite://{}/s3-{prefix}.db", data.display()),
                ),
            ]
        };
        let r = archive(data, &big, &env("big")).await;
        run(&format!("1 file × {big_mib} MiB"), "S3 (moto)", cp_big, r);
        let r = archive(data, &small, &env("small")).await;
        run(
            &format!("{n_small} files × {small_kib} KiB"),
            "S3 (moto)",
            cp_small,
            r,
        );
    }
}
