//! online-nearline: MD5 verification, metadata, reuse of identical copies, damaged copies.

use framework::lapin::BasicProperties;
use framework::testing::*;
use md5::Digest;
use online_nearline::OnlineNearline;
use storage::testing::{
    MotoServer, put_online_file as put_file, sweeper_message, sweeper_message_v1,
};

const KEY: &str = "assetsweeper.asset_folder_importer.file.update";

fn md5hex(b: &[u8]) -> String {
    hex::encode(md5::Md5::digest(b))
}

async fn send(hs: &Harness, msg: &serde_json::Value) {
    hs.publish(KEY, msg.to_string().as_bytes(), BasicProperties::default())
        .await;
}

#[tokio::test]
async fn copies_with_md5_reuses_identical_and_detects_damage() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "show/ep1.mxf", b"episode one");
    // The file's own time, not the message's (2024) nor the copy's (now).
    set_mtime(&data.path().join("online/show/ep1.mxf"), MTIME);
    let mut hs = Harness::start_service::<OnlineNearline>(service_config::<OnlineNearline>(
        data.path(),
        &[],
    ))
    .await;
    let mut out = hs.watch_output().await;
    send(&hs, &sweeper_message(&dir, "ep1.mxf", false)).await;
    let d = next(&mut out).await;
    assert_eq!(
        d.routing_key.as_str(),
        "storagetier.onlinenearline.newfile.success"
    );
    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(v["vault_key"], "show/ep1.mxf");
    assert_eq!(v["md5"], md5hex(b"episode one"));
    assert_eq!(
        v["sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"episode one"))
    );
    assert_eq!(v["size"], 11);
    assert_eq!(v["mtime"], MTIME_TEXT);
    assert_eq!(v["uploaded"], true);
    assert_eq!(
        std::fs::read(data.path().join("nearline/show/ep1.mxf")).unwrap(),
        b"episode one"
    );

    // The same content at another path: the existing vault copy is reused, not copied.
    put_file(data.path(), "show/copy-of-ep1.mxf", b"episode one");
    set_mtime(&data.path().join("online/show/copy-of-ep1.mxf"), MTIME);
    send(&hs, &sweeper_message(&dir, "copy-of-ep1.mxf", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["vault_key"], "show/ep1.mxf");
    assert_eq!(v["uploaded"], false);
    assert_eq!(
        v["sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"episode one")),
        "a reused object's too"
    );
    assert!(!data.path().join("nearline/show/copy-of-ep1.mxf").exists());

    // The vault copy gets damaged (same size, other bytes): MD5 read-back catches it, the
    // damaged object is left alone and a good copy is stored beside it, under a key named
    // from its SHA-256 (two contents of one MD5 never meet there).
    std::fs::write(data.path().join("nearline/show/ep1.mxf"), b"episode 0ne").unwrap();
    send(&hs, &sweeper_message(&dir, "ep1.mxf", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"episode one"));
    assert_eq!(v["vault_key"], format!("show/ep1.mxf.{}", &sum[..16]));
    assert_eq!(v["uploaded"], true);
    assert_eq!(
        std::fs::read(
            data.path()
                .join(format!("nearline/show/ep1.mxf.{}", &sum[..16]))
        )
        .unwrap(),
        b"episode one"
    );
    let r = storage::Records::open(&db::default_url(data.path(), "online-nearline"))
        .await
        .unwrap();
    assert_eq!(r.count("stored_objects").await.unwrap(), 2);
    assert_eq!(r.count("copied_files").await.unwrap(), 3);
    let row = db::sqlx::query(
        "SELECT mtime, size FROM copied_files WHERE original_path LIKE '%copy-of-ep1.mxf'",
    )
    .fetch_one(r.pool())
    .await
    .unwrap();
    use db::Row;
    assert_eq!(
        row.get::<String, _>("mtime"),
        MTIME_TEXT,
        "the file's mtime kept in the database"
    );
    hs.stop().await;
}

#[tokio::test]
async fn the_sweepers_real_shape_and_the_older_one_are_both_copied() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "wire/real.mxf", b"real shape");
    put_file(data.path(), "wire/old.mxf", b"old shape");
    let mut hs = Harness::start_service::<OnlineNearline>(service_config::<OnlineNearline>(
        data.path(),
        &[],
    ))
    .await;
    let mut out = hs.watch_output().await;
    // Exactly what the asset sweeper sends: parent_dir, epoch seconds (some fractional).
    let real = serde_json::json!({
        "imported_id": null, "size": 10, "ignore": false, "mime_type": "application/mxf",
        "mtime": 1718000000, "ctime": 1718000000.123456, "atime": 1718000001.5,
        "owner": 1000, "group": 1000, "parent_dir": dir, "filename": "real.mxf",
    });
    send(&hs, &real).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["vault_key"], "wire/real.mxf");
    assert_eq!(v["md5"], md5hex(b"real shape"));
    send(&hs, &sweeper_message_v1(&dir, "old.mxf", false)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["vault_key"], "wire/old.mxf");
    hs.stop().await;
}

/// A file the asset sweeper marks `ignore` (no media asset expected for it) is still
/// backed up to nearline, as the original's nearline did: only online-archive skips them.
#[tokio::test]
async fn an_ignored_file_is_still_backed_up() {
    let data = tempfile::tempdir().unwrap();
    let dir = put_file(data.path(), "misc/notes.txt", b"keep me");
    let mut hs = Harness::start_service::<OnlineNearline>(service_config::<OnlineNearline>(
        data.path(),
        &[],
    ))
    .await;
    let mut out = hs.watch_output().await;
    send(&hs, &sweeper_message(&dir, "notes.txt", true)).await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["vault_key"], "misc/notes.txt");
    assert_eq!(
        std::fs::read(data.path().join("nearline/misc/notes.txt")).unwrap(),
        b"keep me"
    );
    hs.stop().await;
}

/// A file time unlike any other in the tests (2021-03-04T05:06:07Z), and as recorded.
const MTIME: u64 = 1_614_834_367;
const MTIME_TEXT: &str = "2021-03-04T05:06:07+00:00";

fn set_mtime(path: &std::path::Path, secs: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)))
        .expect("set the file's mtime");
}

#[tokio::test]
async fn s3_vault_keeps_path_size_and_mtime_as_metadata() {
    let bucket = "vault";
    let moto = MotoServer::start(bucket).await;
    let data = tempfile::tempdir().unwrap();
    // One request, and a multipart upload (created by the resumable path) of 2 parts.
    let big: Vec<u8> = (0..6 * 1024 * 1024 + 5u32)
        .map(|i| (i % 249) as u8)
        .collect();
    let files: [(&str, &[u8]); 2] = [("clip é.mov", b"clip bytes"), ("big é.mov", &big)];
    let mut dir = String::new();
    for (name, body) in files {
        dir = put_file(data.path(), &format!("a b/{name}"), body);
        set_mtime(&data.path().join(format!("online/a b/{name}")), MTIME);
    }
    let cfg = service_config::<OnlineNearline>(
        data.path(),
        &[
            ("online_nearline.vault_url", &format!("s3://{bucket}")),
            ("online_nearline.vault_options.endpoint", &moto.endpoint),
            ("online_nearline.vault_options.allow_http", "true"),
            ("online_nearline.vault_options.access_key_id", "test"),
            ("online_nearline.vault_options.secret_access_key", "test"),
            ("online_nearline.vault_options.part_size_mib", "5"),
        ],
    );
    let mut hs = Harness::start_service::<OnlineNearline>(cfg).await;
    let mut out = hs.watch_output().await;
    for (name, body) in files {
        send(&hs, &sweeper_message(&dir, name, false)).await;
        let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
        assert_eq!(v["vault_key"], format!("a b/{name}"));
        assert_eq!(v["md5"], md5hex(body));
        let opts = moto.store_options();
        let tier = storage::store::open(&format!("s3://{bucket}"), &opts).unwrap();
        let got = tier
            .store
            .get(&tier.key(&format!("a b/{name}")))
            .await
            .unwrap();
        let attrs = got.attributes.clone();
        let meta = |k: &str| {
            attrs
                .get(&object_store::Attribute::Metadata(k.to_string().into()))
                .map(|v| v.to_string())
        };
        let original = meta("original-path").expect("original-path metadata");
        assert!(
            original.contains("clip") || original.contains("big"),
            "{original}"
        );
        // Percent-encoded, as a URL path: decoded, the file's own path (a form's `+` for
        // a space decoded as a `+`).
        let decoded = percent_encoding::percent_decode_str(&original)
            .decode_utf8()
            .expect("UTF-8");
        assert!(
            decoded.ends_with(&format!("/online/a b/{name}")),
            "{original} decodes to {decoded}"
        );
        assert_eq!(meta("size"), Some(body.len().to_string()));
        assert_eq!(
            meta("mtime").as_deref(),
            Some(MTIME_TEXT),
            "the file's mtime"
        );
        assert_eq!(got.bytes().await.unwrap().as_ref(), body);
    }
    hs.stop().await;
}

#[test]
fn a_configured_online_root_that_does_not_exist_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("unmounted/share");
    let o = isolated_command(env!("CARGO_BIN_EXE_online-nearline"))
        .arg("--config-dir")
        .arg(dir.path())
        .env("STORAGETIER__STORAGE__DATA_DIR", dir.path())
        .env("STORAGETIER__ONLINE_NEARLINE__ONLINE_ROOTS", &missing)
        .arg("check-config")
        .output_within(WAIT)
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("online_nearline.online_roots"), "{err}");
    assert!(!missing.exists(), "not created");
}

/// The two tiers given one store (a section copied with its URL left in), or one inside
/// the other, would each report a copy where there is one: the second finds the first's
/// object and records it as its own. Refused at start, exit 2 naming the key — read from
/// the shared files (online-archive's section) or the environment.
#[test]
fn a_store_shared_with_online_archive_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let check = |files: &str, env: &[(&str, &str)]| {
        std::fs::write(dir.path().join("default.toml"), files).unwrap();
        let o = isolated_command(env!("CARGO_BIN_EXE_online-nearline"))
            .arg("--config-dir")
            .arg(dir.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", dir.path())
            .envs(env.iter().copied())
            .arg("check-config")
            .output_within(WAIT)
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let shared = "[online_archive]\narchive_url = \"s3://media/p\"\n\
                  [online_nearline]\nvault_url = \"s3://media/p/\"\n";
    let (code, err) = check(shared, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("online_nearline.vault_url") && err.contains("online_archive.archive_url"),
        "{err}"
    );
    let (code, err) = check(
        "[online_nearline]\nvault_url = \"s3://media\"\n",
        &[(
            "STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_URL",
            "s3://media/archive",
        )],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("online_nearline.vault_url"), "{err}");
    let apart = "[online_archive]\narchive_url = \"s3://media/archive\"\n\
                 [online_nearline]\nvault_url = \"s3://media/nearline\"\n";
    let (code, err) = check(apart, &[]);
    assert_eq!(code, Some(0), "{err}");
}

/// Design §5: `[online_nearline] online_roots` and `database_url` are what the service
/// runs on — a file under the configured root is copied and recorded in the configured
/// database (PostgreSQL here, as in production), one under the default root that the
/// configuration replaced is outside the roots, and no SQLite file is made beside.
#[tokio::test]
async fn the_configured_roots_and_database_are_the_ones_used() {
    let data = tempfile::tempdir().unwrap();
    let media = data.path().join("mnt/media");
    std::fs::create_dir_all(media.join("show")).unwrap();
    std::fs::write(media.join("show/a.mxf"), b"configured root").unwrap();
    let default_dir = put_file(data.path(), "show/b.mxf", b"default root");
    let pg = db::testing::TempPostgres::create().await.unwrap();
    let roots = format!("[\"{}\"]", media.display());
    let mut hs = Harness::start_service::<OnlineNearline>(service_config::<OnlineNearline>(
        data.path(),
        &[
            ("online_nearline.online_roots", &roots),
            ("online_nearline.database_url", &pg.url),
        ],
    ))
    .await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    send(
        &hs,
        &sweeper_message(&media.join("show").display().to_string(), "a.mxf", false),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(v["vault_key"], "show/a.mxf");
    send(&hs, &sweeper_message(&default_dir, "b.mxf", false)).await;
    let d = next(&mut dlq).await;
    assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    let why = header(&d, "x-error").unwrap_or_default();
    assert!(why.contains("outside the online roots"), "{why}");
    hs.stop().await;
    let r = storage::Records::open(&pg.url).await.unwrap();
    let row = db::sqlx::query("SELECT size FROM copied_files")
        .fetch_one(r.pool())
        .await
        .unwrap();
    use db::Row;
    assert_eq!(
        row.get::<i64, _>("size"),
        i64::try_from(b"configured root".len()).unwrap(),
        "recorded in the configured database"
    );
    r.pool().close().await;
    assert!(
        !data.path().join("online-nearline.db").exists(),
        "no SQLite database beside it"
    );
    pg.drop_db().await.unwrap();
}
