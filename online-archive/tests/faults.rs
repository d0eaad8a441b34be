//! online-archive as its own process under faults, printing figures for
//! docs/reliability.md:
//! - a broker restart mid-stream (`rabbitmqctl stop_app` / `start_app`) with 10,000 files,
//!   on a private RabbitMQ node so the shared broker and every other test are untouched.
//!   The service is not restarted: every file must be archived and reported at least once,
//!   duplicates bounded by `prefetch`, and a redelivered file never becomes a second object;
//! - an abrupt death in the middle of copying a large file (SIGXFSZ at the write past half
//!   the object): no partial object under the key, the restarted service archives it whole
//!   and nothing of the dead upload is left.
//!
//! `cargo test -p online-archive --test faults -- --nocapture` (RESTART_MESSAGES overrides
//! the 10,000).

use std::process::{Command, Stdio};

use std::time::Duration;

use framework::testing::broker::{PrivateBroker, Tally};
use framework::testing::{
    Cleanup, RunWithin, WAIT, amqp_url, next, next_within, process, ready_count, service_command,
    test_channel, unique, watch,
};
use storage::testing::{files_under, put_online_file, sweeper_message};

const PREFETCH: usize = 16;
const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

fn messages() -> usize {
    std::env::var("RESTART_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// online-archive as a process on `q` of the shared broker, its data under `data`; where
/// `s3` names a bucket and its endpoint, archiving there (parts of 5 MiB), its retries a
/// second apart (a redelivery waits out a killed copy's 20 s claim a second at a time).
fn archive_command(q: &str, data: &std::path::Path, s3: Option<(&str, &str)>) -> Command {
    let bin = env!("CARGO_BIN_EXE_online-archive");
    let mut c = service_command(bin, "online_archive", q, &amqp_url(), data);
    c.env("STORAGETIER__STORAGE__DATA_DIR", data);
    if let Some((bucket, endpoint)) = s3 {
        let o = "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__";
        c.env("STORAGETIER__RETRY__DELAYS_MS", "1000")
            .env(
                "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL",
                format!("s3://{bucket}/pre"),
            )
            .env(format!("{o}ENDPOINT"), endpoint)
            .env(format!("{o}ALLOW_HTTP"), "true")
            .env(format!("{o}ACCESS_KEY_ID"), "test")
            .env(format!("{o}SECRET_ACCESS_KEY"), "test")
            .env(format!("{o}PART_SIZE_MIB"), "5");
    }
    c
}

/// Declares `q`'s topology with `archive` (its `declare` command) and watches its output
/// exchange: the test's connection, channel and output consumer.
async fn declared_and_watched(
    mut archive: Command,
    q: &str,
) -> (
    framework::lapin::Connection,
    framework::lapin::Channel,
    framework::lapin::Consumer,
) {
    assert!(
        archive
            .arg("declare")
            .status_within(WAIT)
            .expect("declare runs")
            .success()
    );
    let (c, ch) = test_channel().await;
    let out = watch(&ch, &format!("{q}-out"), "#").await;
    (c, ch, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_archives_every_file_once() {
    let n = messages();
    let broker = PrivateBroker::start().await;
    let q = unique("archive-restart");
    let sink = format!("{q}-sink");
    let data = tempfile::tempdir().expect("data dir");
    let mut messages: Vec<Vec<u8>> = (0..n)
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
            .status_within(WAIT)
            .expect("online-archive runs")
            .success()
    );
    broker.sink(&sink, &format!("{q}-out")).await;
    // The last tenth goes in only after the restart.
    let held_back = framework::testing::cluster::Feed {
        exchange: format!("{q}-in"),
        key: KEY.into(),
        bodies: messages.split_off(n - (n / 10).max(1)),
    };
    broker
        .preload(&format!("{q}-in"), KEY, messages.into_iter())
        .await;

    let mut child =
        process::spawn(archive(&["run"]).stderr(Stdio::null())).expect("online-archive starts");
    let r = broker
        .restart_mid_stream(&q, &sink, n, Duration::from_secs(3), held_back)
        .await;
    let code = child.terminate(WAIT).and_then(|s| s.code());

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
    let stored = files_under(&data.path().join("archive"));
    assert_eq!(stored.len(), n, "one object per file, no second copies");
    assert_eq!(code, Some(0), "the service drained and exited cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_mid_copy_leaves_no_partial_object() {
    let q = unique("archive-kill9");
    let _gone = Cleanup::service(&q, &[1000, 5000, 30000, 120000]);
    let data = tempfile::tempdir().expect("data dir");
    let content: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let dir = put_online_file(data.path(), "big/file.bin", &content);
    let archive = || archive_command(&q, data.path(), None);
    let (_c, ch, mut out) = declared_and_watched(archive(), &q).await;
    framework::testing::publish(
        &ch,
        &format!("{q}-in"),
        KEY,
        sweeper_message(&dir, "file.bin", false)
            .to_string()
            .as_bytes(),
        Default::default(),
    )
    .await;
    // The service dies abruptly (as by kill -9: nothing of it runs after) at the write that
    // takes the object past half its size: exactly mid-copy, however fast the machine.
    let mut cmd = archive();
    process::die_writing_past(&mut cmd, content.len() as u64 / 2);
    let mut child = process::spawn(cmd.arg("run")).expect("online-archive starts");
    let died = child.wait_for(WAIT * 4).expect("the service dies mid-copy");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&died),
        Some(process::SIGXFSZ),
        "the service died writing past half the object ({died}): the copy was cut in the middle"
    );
    let object = data.path().join("archive/big/file.bin");
    let staging = data
        .path()
        .join("archive")
        .join(storage::local::STAGING_DIR);
    let named = || {
        std::fs::read_dir(&staging)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    };
    assert!(!object.exists(), "no partial object under the key");
    if let Some(staged) = named() {
        // Age the dead upload's staging file past the staleness limit before the restart.
        let old = std::time::SystemTime::now() - storage::local::STALE_STAGING * 2;
        std::fs::File::options()
            .write(true)
            .open(&staged)
            .and_then(|f| f.set_modified(old))
            .expect("age the staging file");
    }
    let mut again = process::spawn(archive().arg("run")).expect("online-archive restarts");
    let d = next(&mut out).await;
    let v: serde_json::Value = serde_json::from_slice(&d.data).expect("json output");
    assert_eq!(v["archive_key"], "big/file.bin");
    assert_eq!(v["size"], content.len());
    assert_eq!(again.terminate(WAIT).and_then(|s| s.code()), Some(0));
    assert!(
        std::fs::read(&object).expect("archived object") == content,
        "the archived object is whole"
    );
    assert_eq!(
        files_under(&data.path().join("archive")),
        vec!["big/file.bin".to_string()],
        "nothing of the dead upload is left (an unnamed file dies with its process, a named one is swept at start-up)"
    );
    println!(
        "| death mid-copy of a {} MiB file, then restart, online-archive | 1 | 0 | 0 | no partial object; nothing of the dead copy left |",
        content.len() >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_s3_multipart_upload_resumes_from_the_stored_parts() {
    const PARTS: usize = 12;
    let bucket = "archive-resume";
    let moto = storage::testing::MotoServer::start(bucket).await;
    let proxy = storage::testing::CountingProxy::start(&moto.endpoint).await;
    let q = unique("archive-resume");
    let _gone = Cleanup::service(&q, &[1000]);
    let data = tempfile::tempdir().expect("data dir");
    // 12 parts of 5 MiB (S3's smallest), the last one short.
    let len = PARTS * 5 * 1024 * 1024 - 4096;
    let content: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8).collect();
    let dir = put_online_file(data.path(), "big/resume.bin", &content);
    let archive = || archive_command(&q, data.path(), Some((bucket, &proxy.endpoint)));
    let (_c, ch, mut out) = declared_and_watched(archive(), &q).await;
    framework::testing::publish(
        &ch,
        &format!("{q}-in"),
        KEY,
        sweeper_message(&dir, "resume.bin", false)
            .to_string()
            .as_bytes(),
        Default::default(),
    )
    .await;
    let parts_sent = |p: &storage::testing::CountingProxy| {
        p.count("PUT", |t| {
            t.contains("partNumber=") && t.contains("uploadId=")
        })
    };
    // Killed past half way, at an exact point: the 7th part is held back at the proxy, so
    // 6 went on and at least 5 are stored (2 upload at once), however fast the upload.
    let held = proxy.hold_from(
        "PUT",
        |t| t.contains("partNumber=") && t.contains("uploadId="),
        PARTS / 2 + 1,
    );
    let mut child = process::spawn(archive().arg("run")).expect("online-archive starts");
    framework::testing::wait_until("the 7th part to be held back", || held.reached()).await;
    child.kill();
    let before = parts_sent(&proxy);
    proxy.reset_after_client_died();
    held.release();
    let records = storage::Records::open(&format!(
        "sqlite://{}",
        data.path().join("online-archive.db").display()
    ))
    .await
    .expect("records");
    let recorded = records.count("multipart_parts").await.expect("count") as usize;
    let upload = records
        .upload_for("pre/big/resume.bin")
        .await
        .expect("query")
        .expect("the upload is recorded");
    assert!(recorded >= PARTS / 2 - 1, "{recorded} parts recorded");

    let mut again = process::spawn(archive().arg("run")).expect("online-archive restarts");
    // The killed copy's claim (20 s) runs out first, then the rest of the parts go.
    let d = next_within(&mut out, WAIT + Duration::from_secs(30))
        .await
        .expect("the resumed copy's success message");
    let v: serde_json::Value = serde_json::from_slice(&d.data).expect("json output");
    assert_eq!(v["archive_key"], "pre/big/resume.bin");
    assert_eq!(v["size"], content.len());
    assert_eq!(again.terminate(WAIT).and_then(|s| s.code()), Some(0));
    let resumed = parts_sent(&proxy);
    // Only what the store did not hold as recorded went again (moto lists no part
    // checksums, so a part stored but not yet recorded when killed is sent again).
    assert_eq!(resumed, PARTS - recorded, "parts sent after the restart");
    assert!(resumed < PARTS, "resumed, not started over");
    assert_eq!(records.count("multipart_uploads").await.expect("count"), 0);
    let opts = storage::StoreOptions {
        endpoint: Some(moto.endpoint.clone()),
        ..moto.store_options()
    };
    let tier = storage::store::open(&format!("s3://{bucket}/pre"), &opts).expect("tier");
    let key = tier.key("big/resume.bin");
    let s3 = tier.s3.as_ref().expect("s3");
    assert!(
        s3.list_parts(&key, &upload.upload_id)
            .await
            .expect("list parts")
            .is_none(),
        "the resumed upload was completed"
    );
    let got = storage::copy::hash_object(&tier, &key, storage::Algorithm::Sha256)
        .await
        .expect("read back")
        .expect("stored");
    assert_eq!(got.size, content.len() as u64);
    assert_eq!(v["checksum"], got.checksum, "the object is whole");
    records.close().await;
    println!(
        "| kill -9 mid-multipart upload to S3 (moto) of a {} MiB file ({PARTS} parts), then restart, online-archive | parts begun before the kill: {before}, recorded: {recorded} | parts sent after the restart: {resumed} of {PARTS} |",
        content.len() >> 20
    );
}

/// Two replicas of online-archive on S3 (moto) and one PostgreSQL database, every file's
/// message sent twice in a row (so the replicas take one key at once), one replica killed
/// (`kill -9`) while its first upload is on its way (held at a proxy: a copy in flight,
/// its claim on the key held): every message is answered, each file archived once at its
/// own key (nothing stored beside it, no second object), one record each, no upload left
/// unfinished, nothing dead-lettered. The production backends with two instances and a death
/// mid-upload: before, only the local store and SQLite saw two replicas end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_replicas_on_s3_and_postgres_archives_each_file_once() {
    use futures_util::TryStreamExt;
    use sha2::Digest;
    const FILES: usize = 40;
    let bucket = "archive-pair";
    let moto = storage::testing::MotoServer::start(bucket).await;
    // A request-holding proxy in front of it.
    let proxy = storage::testing::CountingProxy::start(&moto.endpoint).await;
    let pg = db::testing::TempPostgres::create()
        .await
        .expect("a test database on the local PostgreSQL");
    let q = unique("archive-pair");
    let _gone = Cleanup::service(&q, &[1000]);
    let data = tempfile::tempdir().expect("data dir");
    // Every fifth file takes three parts of 5 MiB; the others one request.
    let files: Vec<(String, String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            let len = if i % 5 == 0 { 11 << 20 } else { 200 << 10 };
            let body: Vec<u8> = (0..len).map(|j| ((j * 7 + i) % 251) as u8).collect();
            let name = format!("f{i}.bin");
            let dir = put_online_file(data.path(), &format!("pair/{name}"), &body);
            (dir, name, body)
        })
        .collect();
    // Both replicas through the proxy: the records name the store by its endpoint.
    let archive = || {
        let mut c = archive_command(&q, data.path(), Some((bucket, &proxy.endpoint)));
        c.env("STORAGETIER__AMQP__PREFETCH", "4")
            .env("STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL", &pg.url)
            .stderr(Stdio::null());
        c
    };
    let (_c, ch, mut out) = declared_and_watched(archive(), &q).await;
    let mut inputs = std::collections::HashSet::new();
    for (i, (dir, name, _)) in files.iter().enumerate() {
        let msg = sweeper_message(dir, name, false).to_string();
        for copy in ["a", "b"] {
            let id = format!("f{i}-{copy}");
            let props =
                framework::lapin::BasicProperties::default().with_message_id(id.clone().into());
            framework::testing::publish(&ch, &format!("{q}-in"), KEY, msg.as_bytes(), props).await;
            inputs.insert(id);
        }
    }
    // The first upload request (of the replica started first) is held, never let through
    // (sent on for a client gone, the store would wait for a body that never comes); every
    // other request passes.
    let first = std::sync::atomic::AtomicBool::new(false);
    let held = proxy.hold_from(
        "PUT",
        move |_| !first.swap(true, std::sync::atomic::Ordering::SeqCst),
        1,
    );
    let mut doomed = process::spawn(archive().arg("run")).expect("starts");
    framework::testing::wait_until("the first upload held", || held.reached()).await;
    let mut survivor = process::spawn(archive().arg("run")).expect("starts");
    // Outputs by the input they answer, until every input is answered; the replica whose
    // upload is held is killed once half are (both at work meanwhile, its held copy's
    // message answered only after the survivor took the key over).
    let mut answered = std::collections::HashSet::new();
    let mut outputs = Vec::new();
    let mut killed = false;
    let deadline = std::time::Instant::now() + 3 * WAIT;
    while answered.len() < inputs.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let d = next_within(&mut out, left).await.unwrap_or_else(|| {
            panic!(
                "every message answered: {} of {}",
                answered.len(),
                inputs.len()
            )
        });
        let by = framework::testing::header(&d, framework::headers::IN_RESPONSE_TO)
            .expect("an output answers its input");
        assert!(inputs.contains(&by), "answers one of the inputs: {by}");
        answered.insert(by);
        outputs.push(serde_json::from_slice::<serde_json::Value>(&d.data).expect("json"));
        if !killed && answered.len() >= inputs.len() / 2 {
            doomed.kill();
            killed = true;
        }
    }
    let code = survivor.terminate(WAIT).and_then(|s| s.code());
    assert_eq!(code, Some(0), "the survivor drained and exited cleanly");
    let expected: std::collections::HashMap<String, (String, String)> = files
        .iter()
        .map(|(dir, name, body)| {
            (
                format!("{dir}/{name}"),
                (
                    format!("pre/pair/{name}"),
                    hex::encode(sha2::Sha256::digest(body)),
                ),
            )
        })
        .collect();
    for v in &outputs {
        let path = v["original_file_path"].as_str().expect("a path");
        let (key, sum) = &expected[path];
        assert_eq!(v["archive_key"], key.as_str(), "at its own key: {v}");
        assert_eq!(v["checksum"], sum.as_str(), "{v}");
    }
    let tier =
        storage::store::open(&format!("s3://{bucket}/pre"), &moto.store_options()).expect("tier");
    let objects: Vec<_> = tier
        .store
        .list(Some(&object_store::path::Path::from("pre")))
        .try_collect()
        .await
        .expect("list the bucket");
    assert_eq!(objects.len(), FILES, "one object per file: {objects:?}");
    for (key, sum) in expected.values() {
        let got = storage::copy::hash_object(
            &tier,
            &storage::store::object_path(key),
            storage::Algorithm::Sha256,
        )
        .await
        .expect("read back")
        .expect("stored");
        assert_eq!(&got.checksum, sum, "{key}");
    }
    let records = storage::Records::open(&pg.url).await.expect("records");
    assert_eq!(
        records.count("stored_objects").await.expect("count"),
        FILES as i64
    );
    // An upload recorded is left only where the killed replica completed it and died before
    // forgetting it: the store holds no such upload any more, and the abandoned-upload
    // sweep forgets the record (a `kill -9` anywhere else leaves an upload to resume).
    let s3 = tier.s3.as_ref().expect("an S3 store");
    for key in expected.values().map(|(key, _)| key) {
        if let Some(u) = records.upload_for(key).await.expect("query") {
            let parts = s3
                .list_parts(&storage::store::object_path(key), &u.upload_id)
                .await
                .expect("list parts");
            assert!(
                parts.is_none(),
                "{key}: an upload left unfinished: {parts:?}"
            );
        }
    }
    records.close().await;
    assert_eq!(
        ready_count(&ch, &format!("{q}-dlq")).await,
        0,
        "nothing dead-lettered"
    );
    println!(
        "| kill -9 of one of 2 replicas on S3 (moto) + PostgreSQL mid-upload, {FILES} files each sent twice, online-archive | {} inputs | {} outputs | one object and one record per file |",
        inputs.len(),
        outputs.len()
    );
}
