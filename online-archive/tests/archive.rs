//! online-archive against the real broker, SQLite, PostgreSQL, the local filesystem and a
//! real S3-protocol server (moto).

use std::path::Path;

use framework::headers as h;
use framework::lapin::BasicProperties;
use framework::testing::*;
use online_archive::OnlineArchive;
use sha2::Digest;
use storage::testing::{
    MotoServer, put_online_file as put_file, sweeper_message, sweeper_message_v1,
};

const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

fn sha256(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

async fn send(hs: &Harness, msg: &serde_json::Value) {
    hs.publish(
        KEY,
        msg.to_string().as_bytes(),
        BasicProperties::default().with_message_id("m-1".into()),
    )
    .await;
}

async fn records(data: &Path) -> storage::Records {
    storage::Records::open(&db::default_url(data, "online-archive"))
        .await
        .unwrap()
}

#[tokio::test]
async fn archives_verifies_and_reports_then_is_idempotent() {
    let data = tempfile::tempdir().unwrap();
    let content = b"frame data ".repeat(1000);
    let dir = put_file(data.path(), "proj/clip.mov", &content);
    let mut hs =
        Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(data.path(), &[]))
            .await;
    let mut out = hs.watch_output().await;
    let msg = sweeper_message(&dir, "clip.mov", false);
    send(&hs, &msg).await;
    let d = next(&mut out).await;
    assert_eq!(
        d.routing_key.as_str(),
        "storagetier.onlinearchive.newfile.success"
    );
    assert_eq!(header(&d, h::IN_RESPONSE_TO).as_deref(), Some("m-1"));
    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    let real = data
        .path()
        .join("online/proj/clip.mov")
        .canonicalize()
        .unwrap();
    assert_eq!(v["original_file_path"], real.display().to_string());
    assert_eq!(v["archive_key"], "proj/clip.mov");
    assert_eq!(v["size"], content.len());
    assert_eq!(v["checksum"], sha256(&content));
    assert_eq!(v["checksum_algorithm"], "sha256");
    assert_eq!(v["imported_id"], "VX-1234");
    assert!(v["archive_store"].as_str().unwrap().contains("archive"));
    chrono::DateTime::parse_from_rfc3339(v["archived_at"].as_str().unwrap()).unwrap();
    assert_eq!(v["uploaded"], true);
    let stored = std::fs::read(data.path().join("archive/proj/clip.mov")).unwrap();
    assert_eq!(stored, content);

    // The same message again: no second upload, still a success, no duplicate records.
    send(&hs, &msg).await;
    let v2: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v2["archive_key"], "proj/clip.mov");
    assert_eq!(v2["uploaded"], false);
    // Resent without the Pluto id (the sweeper's `file.new` after its `file.update`): the
    // report names the id recorded with the copy, not none.
    let mut without = msg.clone();
    without["imported_id"] = serde_json::Value::Null;
    send(&hs, &without).await;
    let v3: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v3["uploaded"], false);
    assert_eq!(v3["imported_id"], "VX-1234");
    let r = records(data.path()).await;
    assert_eq!(r.count("stored_objects").await.unwrap(), 1);
    assert_eq!(r.count("copied_files").await.unwrap(), 1);
    let files: Vec<_> = std::fs::read_dir(data.path().join("archive/proj"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1, "one object");
    hs.stop().await;
}

#[tokio::test]
async fn the_sweepers_real_shape_and_the_older_one_are_both_archived() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "wire/real.mov", b"real shape");
    put_file(data.path(), "wire/old.mov", b"old shape");
    let mut hs =
        Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(data.path(), &[]))
            .await;
    let mut out = hs.watch_output().await;
    // Exactly what the asset sweeper sends: parent_dir, epoch seconds (some fractional).
    let real = serde_json::json!({
        "imported_id": null, "size": 10, "ignore": false, "mime_type": "video/quicktime",
        "mtime": 1718000000, "ctime": 1718000000.123456, "atime": 1718000001.5,
        "owner": 1000, "group": 1000, "parent_dir": dir, "filename": "real.mov",
    });
    send(&hs, &real).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "wire/real.mov");
    assert_eq!(v["checksum"], sha256(b"real shape"));
    send(&hs, &sweeper_message_v1(&dir, "old.mov", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "wire/old.mov");
    assert_eq!(v["imported_id"], "VX-1234");
    hs.stop().await;
}

#[tokio::test]
async fn different_content_under_an_existing_key_is_never_overwritten() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "p/a.wav", b"new content");
    let existing = data.path().join("archive/p/a.wav");
    std::fs::create_dir_all(existing.parent().unwrap()).unwrap();
    std::fs::write(&existing, b"old content").unwrap();
    let mut hs =
        Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(data.path(), &[]))
            .await;
    let mut out = hs.watch_output().await;
    send(&hs, &sweeper_message(&dir, "a.wav", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    let sum = sha256(b"new content");
    assert_eq!(v["archive_key"], format!("p/a.wav.{}", &sum[..16]));
    assert_eq!(
        std::fs::read(&existing).unwrap(),
        b"old content",
        "not overwritten"
    );
    assert_eq!(
        std::fs::read(data.path().join(format!("archive/p/a.wav.{}", &sum[..16]))).unwrap(),
        b"new content"
    );
    // Identical content under the natural key is recognised without a copy.
    std::fs::write(data.path().join("online/p/b.wav"), b"same").unwrap();
    std::fs::write(data.path().join("archive/p/b.wav"), b"same").unwrap();
    send(&hs, &sweeper_message(&dir, "b.wav", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "p/b.wav");
    assert_eq!(v["uploaded"], false);
    hs.stop().await;
}

#[tokio::test]
async fn escapes_and_missing_files_are_dead_lettered() {
    let data = tempfile::tempdir().unwrap();
    let secret = data.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("passwd"), b"root:x").unwrap();
    let dir = put_file(data.path(), "proj/ok.txt", b"ok");
    std::os::unix::fs::symlink(&secret, data.path().join("online/proj/link")).unwrap();
    let mut hs =
        Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(data.path(), &[]))
            .await;
    let mut dlq = hs.watch_dlq().await;
    let cases = [
        (
            format!("{dir}/../../secret"),
            "passwd",
            "outside the online roots",
        ),
        (
            "../secret".to_string(),
            "passwd",
            "outside the online roots",
        ),
        (
            secret.display().to_string(),
            "passwd",
            "outside the online roots",
        ),
        (format!("{dir}/link"), "passwd", "outside the online roots"),
        (dir.clone(), "missing.mov", "does not exist"),
        (dir.clone(), "../ok.txt", "invalid file name"),
    ];
    for (fp, fname, why) in &cases {
        let msg = sweeper_message(fp, fname, false);
        send(&hs, &msg).await;
        let d = next(&mut dlq).await;
        assert_eq!(d.data, msg.to_string().as_bytes());
        assert_eq!(header(&d, h::ERROR_KIND).as_deref(), Some("permanent"));
        let e = header(&d, h::ERROR).unwrap();
        assert!(e.contains(why), "{fp}/{fname}: {e}");
    }
    // A message of the wrong shape names the field.
    send(
        &hs,
        &serde_json::json!({"filepath": dir, "filename": "ok.txt"}),
    )
    .await;
    let d = next(&mut dlq).await;
    assert!(header(&d, h::ERROR).unwrap().contains("missing field"));
    assert!(!data.path().join("archive").join("passwd").exists());
    let r = records(data.path()).await;
    assert!(r.count("failures").await.unwrap() >= 6, "failures recorded");
    assert_eq!(r.count("stored_objects").await.unwrap(), 0);
    hs.stop().await;
}

/// The default online root is the service's own directory, made by it: while it is empty
/// a missing file is missing (dead-lettered at once), not an unmounted share's outage
/// retried for up to a day as a configured root's would be.
#[tokio::test]
async fn a_missing_file_under_the_empty_default_root_is_dead_lettered() {
    let data = tempfile::tempdir().unwrap();
    let mut hs =
        Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(data.path(), &[]))
            .await;
    let mut dlq = hs.watch_dlq().await;
    let online = data.path().join("online");
    assert_eq!(std::fs::read_dir(&online).unwrap().count(), 0, "made empty");
    let msg = sweeper_message(
        &online.join("proj").display().to_string(),
        "gone.mov",
        false,
    );
    send(&hs, &msg).await;
    let d = next(&mut dlq).await;
    assert_eq!(header(&d, h::ERROR_KIND).as_deref(), Some("permanent"));
    let e = header(&d, h::ERROR).unwrap_or_default();
    assert!(e.contains("does not exist"), "{e}");
    hs.stop().await;
}

#[tokio::test]
async fn ignored_files_are_recorded_and_dropped() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "proj/skip.mov", b"skip me");
    let cfg = service_config::<OnlineArchive>(data.path(), &[("amqp.prefetch", "1")]);
    let mut hs = Harness::start_service::<OnlineArchive>(cfg).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    send(&hs, &sweeper_message(&dir, "skip.mov", true)).await;
    // prefetch 1: the second message is handled only after the first was acked.
    put_file(data.path(), "proj/next.mov", b"next");
    send(&hs, &sweeper_message(&dir, "next.mov", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(
        v["archive_key"], "proj/next.mov",
        "the ignored file published nothing"
    );
    assert!(
        next_within(&mut dlq, std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
    assert!(!data.path().join("archive/proj/skip.mov").exists());
    let r = records(data.path()).await;
    assert_eq!(r.count("ignored_files").await.unwrap(), 1);
    hs.stop().await;
}

#[tokio::test]
async fn the_sweepers_other_file_events_are_dropped_not_dead_lettered() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "proj/a.mov", b"a");
    let cfg = service_config::<OnlineArchive>(data.path(), &[("amqp.prefetch", "1")]);
    let mut hs = Harness::start_service::<OnlineArchive>(cfg).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    // What pluto-core sends on the same prefix: not a file to copy, not the file shape.
    let problem = serde_json::json!({
        "is_dir": false, "is_file": true, "filename": "a.mov", "parent_dir": dir,
    });
    hs.publish(
        "assetsweeper.asset_folder_importer.file.permissions_problem",
        problem.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    // Even a file's own body under such a key is not copied, nor under one naming no event.
    for key in [
        "assetsweeper.asset_folder_importer.file.deleted",
        "assetsweeper.asset_folder_importer.file",
    ] {
        hs.publish(
            key,
            sweeper_message(&dir, "a.mov", false).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    // prefetch 1: this one is handled only after both were settled.
    hs.publish(
        "assetsweeper.asset_folder_importer.file.update",
        sweeper_message(&dir, "a.mov", false).to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    // The first output is the update's: either dropped message copied would have come
    // before it, for the same file and key.
    let first = next(&mut out).await;
    assert_eq!(
        header(&first, "x-in-response-to").as_deref(),
        Some("assetsweeper.asset_folder_importer.file.update"),
        "only the update was copied"
    );
    let v: serde_json::Value = serde_json::from_slice(&first.data).unwrap();
    assert_eq!(v["archive_key"], "proj/a.mov");
    // Published straight to the queue (its name as the key, no sweeper event in it): a
    // file message as ever.
    let b = put_file(data.path(), "proj/b.mov", b"b");
    publish(
        &hs.ch,
        "",
        &hs.q,
        sweeper_message(&b, "b.mov", false).to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "proj/b.mov");
    assert!(
        next_within(&mut dlq, std::time::Duration::from_millis(200))
            .await
            .is_none(),
        "nothing dead-lettered"
    );
    hs.stop().await;
}

#[tokio::test]
async fn s3_and_postgres_backends_with_store_outage_retried() {
    let bucket = "archive";
    let mut moto = MotoServer::start(bucket).await;
    let pg = db::testing::TempPostgres::create().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let content = vec![7u8; 6 * 1024 * 1024 + 123]; // over one multipart part
    let dir = put_file(data.path(), "big/file.bin", &content);
    let cfg = service_config::<OnlineArchive>(
        data.path(),
        &[
            (
                "online_archive.archive_url",
                &format!("s3://{bucket}/prefix"),
            ),
            ("online_archive.archive_options.endpoint", &moto.endpoint),
            ("online_archive.archive_options.allow_http", "true"),
            ("online_archive.archive_options.access_key_id", "test"),
            ("online_archive.archive_options.secret_access_key", "test"),
            ("online_archive.archive_options.max_retries", "0"),
            ("online_archive.archive_options.retry_timeout_ms", "2000"),
            // Two parts: the multipart records go through PostgreSQL too.
            ("online_archive.archive_options.part_size_mib", "5"),
            ("online_archive.database_url", &pg.url),
            // An outage's attempts are not counted: it outlasts these two.
            ("retry.max_attempts", "2"),
        ],
    );
    let mut hs = Harness::start_service::<OnlineArchive>(cfg).await;
    let mut out = hs.watch_output().await;
    send(&hs, &sweeper_message(&dir, "file.bin", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "prefix/big/file.bin");
    assert_eq!(v["checksum"], sha256(&content));
    let opts = moto.store_options();
    let tier = storage::store::open(&format!("s3://{bucket}/prefix"), &opts).unwrap();
    let got =
        storage::copy::hash_object(&tier, &tier.key("big/file.bin"), storage::Algorithm::Sha256)
            .await
            .unwrap()
            .expect("object stored in S3");
    assert_eq!(got.size, content.len() as u64);
    assert_eq!(got.checksum, sha256(&content));

    // The store goes down: the message waits in the retry tiers, then succeeds.
    moto.stop();
    std::fs::write(data.path().join("online/big/second.bin"), b"second").unwrap();
    // The outage outlasts several retry tiers (200 ms, then 400 ms each) and more
    // attempts than max_attempts (2): the message waits in the tiers, its attempts not
    // counted, and nothing is dead-lettered.
    // Q-retry is a direct exchange; bind both tiers' keys.
    let mut retry_tier = watch(&hs.ch, &format!("{}-retry", hs.q), "200").await;
    hs.ch
        .queue_bind(
            retry_tier.queue(),
            format!("{}-retry", hs.q).as_str().into(),
            "400".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    send(&hs, &sweeper_message(&dir, "second.bin", false)).await;
    let mut count = 0;
    while count < 4 {
        let r = next(&mut retry_tier).await;
        let last = header(&r, h::LAST_ERROR).unwrap();
        // The cause, not only object_store's "error sending request".
        assert!(
            last.contains("object store") && last.to_lowercase().contains("refused"),
            "{last}"
        );
        assert!(
            int_header(&r, h::OUTAGE_SINCE).is_some(),
            "an outage's retry"
        );
        count = int_header(&r, h::RETRY_COUNT).unwrap();
    }
    assert_eq!(
        ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await,
        0,
        "nothing dead-lettered during the outage"
    );
    moto.restart(bucket).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "prefix/big/second.bin");
    hs.stop().await;
    drop(hs);
    let rec = storage::Records::open(&pg.url).await.unwrap();
    assert_eq!(rec.count("stored_objects").await.unwrap(), 2);
    assert!(rec.count("failures").await.unwrap() >= 1);
    rec.close().await;
    pg.drop_db().await.unwrap();
}

#[test]
fn a_bad_database_url_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = isolated_command(env!("CARGO_BIN_EXE_online-archive"))
        .arg("--config-dir")
        .arg(dir.path())
        .env(
            "STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL",
            "mysql://u:hunter2@db/x",
        )
        .arg("check-config")
        .output_within(WAIT)
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("online_archive.database_url"), "{err}");
    assert!(!err.contains("hunter2"), "password hidden: {err}");
}

/// A database that refuses the login — no such database, no such role — is a setting no
/// wait fixes: `run` exits 2 naming `database_url` (it was exit 1, "cannot start").
#[test]
fn a_database_refusing_the_login_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = db::testing::postgres_server();
    let host = server.rsplit('@').next().unwrap_or(&server);
    let host = host.trim_start_matches("postgres://");
    for (url, why) in [
        (
            format!("{server}/storagetier_no_such_database"),
            Some("does not exist"),
        ),
        // Under password authentication the server says no more than that the password
        // failed: the key is named either way.
        (
            format!("postgres://storagetier_no_such_role@{host}/postgres"),
            None,
        ),
    ] {
        let (code, err) = run_on_database(dir.path(), &url);
        assert_eq!(code, Some(2), "{url}: {err}");
        assert!(err.contains("online_archive.database_url"), "{err}");
        assert!(why.is_none_or(|w| err.contains(w)), "{err}");
    }
}

/// The two tiers share one schema: pointed at online-nearline's database, online-archive
/// would take its multipart uploads and claims. It refuses to start (exit 2).
#[tokio::test]
async fn another_tiers_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("nearline.db").display());
    let r = storage::Records::open(&url).await.unwrap();
    let store = "file:///srv/nearline";
    assert_eq!(
        r.foreign_owner("online-nearline", store).await.unwrap(),
        None
    );
    r.close().await;
    let (code, err) = run_on_database(dir.path(), &url);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("online_archive.database_url") && err.contains("online-nearline's records"),
        "{err}"
    );
}

/// Two deployments of one tier with different S3 stores on one database (staging and
/// production) would abort each other's recorded multipart uploads against the wrong
/// bucket and overwrite each other's records of one key: the second refuses to start
/// (exit 2), naming the store the records are of — also where only the endpoint differs
/// (one bucket name on two S3 services).
#[tokio::test]
async fn a_database_of_another_s3_store_is_refused() {
    let moto = MotoServer::start("archive").await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("archive.db").display());
    let elsewhere = "s3://archive/online at http://production-minio:9000";
    let r = storage::Records::open(&url).await.unwrap();
    assert_eq!(
        r.foreign_owner("online-archive", elsewhere).await.unwrap(),
        None
    );
    r.close().await;
    let (mut cmd, _cleanup) = refused_run(dir.path());
    let o = cmd
        .env("STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL", &url)
        .env(
            "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL",
            "s3://archive/online",
        )
        .env(
            "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__ENDPOINT",
            &moto.endpoint,
        )
        .env(
            "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__ALLOW_HTTP",
            "true",
        )
        .env(
            "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__ACCESS_KEY_ID",
            "test",
        )
        .env(
            "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__SECRET_ACCESS_KEY",
            "test",
        )
        .arg("run")
        .output_within(WAIT)
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("online_archive.database_url") && err.contains(elsewhere),
        "{err}"
    );
}

/// An `online-archive` command for a start that must be refused (data and config under
/// `dir`), on names of its own: were the refusal gone, what the service declared is not
/// the production names other tests' binaries use, and is deleted with the guard.
fn refused_run(dir: &std::path::Path) -> (std::process::Command, Cleanup) {
    let q = unique("refused");
    let mut cmd = service_command(
        env!("CARGO_BIN_EXE_online-archive"),
        "online_archive",
        &q,
        &amqp_url(),
        dir,
    );
    cmd.env("STORAGETIER__STORAGE__DATA_DIR", dir)
        .env("STORAGETIER__RETRY__DELAYS_MS", "1000");
    (cmd, Cleanup::service(&q, &[1000]))
}

/// `online-archive run` on the database at `url` (data and config under `dir`): its exit
/// code and stderr, for a start that must fail.
fn run_on_database(dir: &std::path::Path, url: &str) -> (Option<i32>, String) {
    let (mut cmd, _cleanup) = refused_run(dir);
    let o = cmd
        .env("STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL", url)
        .arg("run")
        .output_within(WAIT)
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A store that is an online root would take every file there for its own copy, and
/// report each as archived: refused at start (exit 2, naming the store's key), and by
/// `check-config` too (a deployment gated on it crash-looped).
#[test]
fn a_store_that_is_an_online_root_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let online = dir.path().join("online");
    std::fs::create_dir(&online).unwrap();
    for command in ["run", "check-config"] {
        let (mut cmd, _cleanup) = refused_run(dir.path());
        let o = cmd
            .env("STORAGETIER__ONLINE_ARCHIVE__ONLINE_ROOTS", &online)
            .env("STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL", &online)
            .arg(command)
            .output_within(WAIT)
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{command}: {err}");
        assert!(
            err.contains("online_archive.archive_url"),
            "{command}: {err}"
        );
    }
}

/// The status line of `GET path` on `127.0.0.1:port`.
fn status_line(port: u16, path: &str) -> String {
    body_of(port, path)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The whole answer to `GET path` on `127.0.0.1:port`.
fn body_of(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// SIGTERM while the service is still opening its database (a server that accepts and
/// does not answer yet, or another replica's migration holding the lock) is a stop: exit 0
/// at once. It waited for the database, then exited 1. Meanwhile the process is alive and
/// not ready: a liveness probe restarted it while it waited (nothing listened).
#[test]
fn a_stop_while_the_database_is_opened_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let http = framework::testing::broker::free_port();
    let mut child = process::spawn(
        isolated_command(env!("CARGO_BIN_EXE_online-archive"))
            .arg("--config-dir")
            .arg(dir.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", dir.path())
            .env(
                "STORAGETIER__ONLINE_ARCHIVE__DATABASE_URL",
                format!("postgres://u@127.0.0.1:{port}/x"),
            )
            .env(
                "STORAGETIER__ONLINE_ARCHIVE__HTTP_LISTEN",
                format!("127.0.0.1:{http}"),
            )
            .arg("run")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    // Opening the database: its connection is here, and nothing answers it.
    silent.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let _held = loop {
        match silent.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    child.is_running(),
                    "the service exited before it opened its database (its HTTP port taken?)"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "the service opens its database"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    assert!(status_line(http, "/healthz").contains(" 200 "));
    assert!(status_line(http, "/readyz").contains(" 503 "));
    assert!(status_line(http, "/metrics").contains(" 200 "));
    let metrics = body_of(http, "/metrics");
    assert!(
        metrics.contains("\nstoragetier_connected 0\n"),
        "not connected, and said so"
    );
    // ... and why: still starting (the database), which the not-connected alert spares.
    assert!(metrics.contains("\nstoragetier_starting 1\n"), "{metrics}");
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_configured_online_root_that_does_not_exist_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("unmounted/share");
    let o = isolated_command(env!("CARGO_BIN_EXE_online-archive"))
        .arg("--config-dir")
        .arg(dir.path())
        .env("STORAGETIER__STORAGE__DATA_DIR", dir.path())
        .env("STORAGETIER__ONLINE_ARCHIVE__ONLINE_ROOTS", &missing)
        .arg("check-config")
        .output_within(WAIT)
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("online_archive.online_roots"), "{err}");
    assert!(!missing.exists(), "not created");
}

/// Store settings that can never work are config errors in `check-config` (exit 2 naming
/// the key), not a start-up failure of `run` after `check-config` passed; a mistyped URL
/// (`s3:/archive`) is not taken for a directory to fill.
#[test]
fn bad_store_settings_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = ("ARCHIVE_URL", "s3://archive");
    let absent = dir.path().join("unmounted/archive").display().to_string();
    let empty_secret = dir.path().join("empty-secret").display().to_string();
    std::fs::write(&empty_secret, "\n").unwrap();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        // A configured directory is never created (an unmounted share).
        (vec![("ARCHIVE_URL", &absent)], "online_archive.archive_url"),
        // An endpoint every request to would fail.
        (
            vec![s3, ("ARCHIVE_OPTIONS__ENDPOINT", "http://127.0.0.1:9")],
            "online_archive.archive_options.endpoint",
        ),
        (
            vec![s3, ("ARCHIVE_OPTIONS__ENDPOINT", "not a url")],
            "online_archive.archive_options.endpoint",
        ),
        (
            vec![s3, ("ARCHIVE_OPTIONS__ENDPOINT", "https://u:s3cr3t@h:9000")],
            "online_archive.archive_options.endpoint",
        ),
        (
            vec![("ARCHIVE_URL", "ftp://h/x")],
            "online_archive.archive_url",
        ),
        (vec![("ARCHIVE_URL", "s3://")], "online_archive.archive_url"),
        (
            vec![("ARCHIVE_URL", "s3://AKID:s3cr3t@archive/p")],
            "online_archive.archive_url",
        ),
        (
            vec![("ARCHIVE_URL", "s3:/archive")],
            "online_archive.archive_url",
        ),
        (vec![("ARCHIVE_URL", "")], "online_archive.archive_url"),
        (
            vec![s3, ("ARCHIVE_OPTIONS__PART_SIZE_MIB", "1")],
            "online_archive.archive_options.part_size_mib",
        ),
        (
            vec![s3, ("ARCHIVE_OPTIONS__PART_MEMORY_MIB", "0")],
            "online_archive.archive_options.part_memory_mib",
        ),
        // Shorter than a copy's wait in the 120 s retry tier: its upload aborted between
        // two attempts, a large file started over at every one.
        (
            vec![s3, ("ABORT_ABANDONED_UPLOADS_AFTER_MS", "60000")],
            "online_archive.abort_abandoned_uploads_after_ms",
        ),
        (
            vec![("KEEP_FAILURES_DAYS", "0.5")],
            "online_archive.keep_failures_days",
        ),
        (
            vec![
                s3,
                (
                    "ARCHIVE_OPTIONS__SECRET_ACCESS_KEY_FILE",
                    "/nonexistent/secret",
                ),
            ],
            "online_archive.archive_options.secret_access_key_file",
        ),
        // Signed with an empty secret, every request refused (403).
        (
            vec![
                s3,
                (
                    "ARCHIVE_OPTIONS__SECRET_ACCESS_KEY_FILE",
                    empty_secret.as_str(),
                ),
            ],
            "online_archive.archive_options.secret_access_key_file",
        ),
        // A key id without its secret: the client would not build at start (exit 1).
        (
            vec![s3, ("ARCHIVE_OPTIONS__ACCESS_KEY_ID", "AKID")],
            "online_archive.archive_options.secret_access_key",
        ),
        (
            vec![s3, ("ARCHIVE_OPTIONS__SECRET_ACCESS_KEY", "s3cr3t")],
            "online_archive.archive_options.access_key_id",
        ),
        // The secret set as the whole table of options: refused without quoting it.
        (
            vec![s3, ("ARCHIVE_OPTIONS", "s3cr3t/wJalrXUtnFEMI")],
            "online_archive.archive_options",
        ),
    ];
    let check_config = |env: &[(&str, &str)]| {
        let mut c = isolated_command(env!("CARGO_BIN_EXE_online-archive"));
        c.arg("--config-dir")
            .arg(dir.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("STORAGETIER__STORAGE__DATA_DIR", dir.path());
        for (k, v) in env {
            c.env(format!("STORAGETIER__ONLINE_ARCHIVE__{k}"), v);
        }
        c.arg("check-config").output_within(WAIT).unwrap()
    };
    for (env, key) in &cases {
        let o = check_config(env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{env:?}: {err}");
        assert!(err.contains(key), "{env:?} names {key}: {err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }
    assert!(!dir.path().join("s3:").exists(), "no directory made");
    // The S3 client's own environment may not switch off the store's certificate check
    // (an AWS_* variable left in a shared environment did, unseen).
    // Nor may it apply encryption to only the requests object_store makes (the uploads of
    // large files and their checks go through a client of our own).
    for (var, value) in [
        ("AWS_ALLOW_INVALID_CERTIFICATES", "true"),
        ("AWS_SSE_KMS_KEY_ID", "arn:aws:kms:eu-west-1:1:key/k"),
    ] {
        let o = isolated_command(env!("CARGO_BIN_EXE_online-archive"))
            .arg("--config-dir")
            .arg(dir.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", dir.path())
            .env("STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL", "s3://archive")
            .env(var, value)
            .arg("check-config")
            .output_within(WAIT)
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(var), "{err}");
    }
    assert!(!std::path::Path::new(&absent).exists(), "not created");
    // A secret key given in the environment or in a file is never shown (design §5).
    let key_file = dir.path().join("s3-secret");
    std::fs::write(&key_file, "file-s3cr3t\n").unwrap();
    for secret in [
        ("ARCHIVE_OPTIONS__SECRET_ACCESS_KEY", "env-s3cr3t"),
        (
            "ARCHIVE_OPTIONS__SECRET_ACCESS_KEY_FILE",
            key_file.to_str().unwrap(),
        ),
    ] {
        let o = check_config(&[s3, ("ARCHIVE_OPTIONS__ACCESS_KEY_ID", "AKID"), secret]);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert_eq!(o.status.code(), Some(0), "{secret:?}: {err}");
        assert!(out.contains("AKID"), "the options are shown: {out}");
        assert!(
            !out.contains("s3cr3t") && !err.contains("s3cr3t"),
            "{out}{err}"
        );
    }
    // S3 options are ignored for a directory store, and a directory may have a colon.
    let local = dir.path().join("vol1:archive");
    std::fs::create_dir_all(&local).unwrap();
    let local = local.to_str().unwrap();
    let o = check_config(&[
        ("ARCHIVE_URL", local),
        ("ARCHIVE_OPTIONS__PART_SIZE_MIB", "1"),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["resolved"]["store"], local);
    // Unset keys are shown where they lead: the defaults under the data directory, the
    // database's password hidden.
    let o = check_config(&[]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let under = |p: &str| dir.path().join(p).display().to_string();
    assert_eq!(
        shown["resolved"],
        serde_json::json!({
            "online_roots": [under("online")],
            "store": under("archive"),
            "database_url": db::default_url(dir.path(), "online-archive"),
        }),
        "{shown}"
    );
    let o = check_config(&[("DATABASE_URL", "postgres://u:pw-s3cr3t@db.example.org/a")]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("postgres://u:***@db.example.org/a") && !out.contains("pw-s3cr3t"),
        "{out}"
    );
}

/// An S3 store under a private CA (an on-premises MinIO, say) is reached through the
/// system's trust store — here `SSL_CERT_FILE` naming the CA, as an image would add it to
/// /etc/ssl/certs — by both S3 clients: a small file (object_store) and one in parts (the
/// resumable upload's own requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_store_under_a_private_ca_is_trusted_through_the_system_store() {
    let certs = tempfile::tempdir().unwrap();
    framework::testing::tls::make_certificates(certs.path());
    let bucket = "private-ca";
    let moto = MotoServer::start_tls(bucket, certs.path()).await;
    let data = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..6 * 1024 * 1024 + 3u32)
        .map(|i| (i % 251) as u8)
        .collect();
    let dir = put_file(data.path(), "tls/small.mov", b"over tls");
    put_file(data.path(), "tls/big.mov", &big);
    let q = unique("archive-tls");
    let _gone = Cleanup::service(&q, &[1000]);
    let archive = || {
        let bin = env!("CARGO_BIN_EXE_online-archive");
        let mut c = service_command(bin, "online_archive", &q, &amqp_url(), data.path());
        let o = "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS__";
        c.env("STORAGETIER__STORAGE__DATA_DIR", data.path())
            .env("STORAGETIER__RETRY__DELAYS_MS", "1000")
            .env(
                "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL",
                format!("s3://{bucket}"),
            )
            .env(format!("{o}ENDPOINT"), &moto.endpoint)
            .env(format!("{o}ACCESS_KEY_ID"), "test")
            .env(format!("{o}SECRET_ACCESS_KEY"), "test")
            .env(format!("{o}PART_SIZE_MIB"), "5")
            .env("SSL_CERT_FILE", certs.path().join("ca.pem"));
        c
    };
    assert!(
        archive()
            .arg("declare")
            .status_within(WAIT)
            .expect("declare runs")
            .success()
    );
    let (_c, ch) = test_channel().await;
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    let mut dlq = consume(&ch, &format!("{q}-dlq")).await;
    let mut svc = process::spawn(archive().arg("run").stderr(std::process::Stdio::null()))
        .expect("online-archive runs");
    for name in ["small.mov", "big.mov"] {
        publish(
            &ch,
            &format!("{q}-in"),
            KEY,
            sweeper_message(&dir, name, false).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
        assert_eq!(v["archive_key"], format!("tls/{name}"));
    }
    assert!(
        next_within(&mut dlq, std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
    assert_eq!(svc.terminate(WAIT).and_then(|s| s.code()), Some(0));
}

/// Design §5: `[online_archive] online_roots` replaces the default root — a file under the
/// configured one is archived, one under the default root is outside the roots.
#[tokio::test]
async fn the_configured_roots_are_the_ones_read() {
    let data = tempfile::tempdir().unwrap();
    let media = data.path().join("mnt/media");
    std::fs::create_dir_all(media.join("proj")).unwrap();
    std::fs::write(media.join("proj/a.mov"), b"configured root").unwrap();
    let default_dir = put_file(data.path(), "proj/b.mov", b"default root");
    let roots = format!("[\"{}\"]", media.display());
    let mut hs = Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(
        data.path(),
        &[("online_archive.online_roots", &roots)],
    ))
    .await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    send(
        &hs,
        &sweeper_message(&media.join("proj").display().to_string(), "a.mov", false),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["archive_key"], "proj/a.mov");
    assert_eq!(v["checksum"], sha256(b"configured root"));
    send(&hs, &sweeper_message(&default_dir, "b.mov", false)).await;
    let d = next(&mut dlq).await;
    assert_eq!(header(&d, h::ERROR_KIND).as_deref(), Some("permanent"));
    let why = header(&d, h::ERROR).unwrap_or_default();
    assert!(why.contains("outside the online roots"), "{why}");
    hs.stop().await;
}
