//! The shared copy procedure under store faults and concurrency, against the local
//! filesystem and a real S3-protocol server (moto), through fault-injecting stores.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use storage::paths::open_roots;
use storage::testing::{CountingProxy, FaultyStore, MotoServer, files_under, sweeper_message};
use storage::tier::{TierCopier, TierError, TierOutcome, TierPolicy};
use storage::{Algorithm, AssetSweeperFile, Records, Tier};

/// Awaits a spawned task, failing the test if it has not ended within
/// [`framework::testing::WAIT`] (a regression that hangs fails instead of holding the suite).
async fn joined<T>(task: tokio::task::JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
    framework::testing::within(framework::testing::WAIT, "a spawned copy", task).await
}

const MIB: usize = 1024 * 1024;

fn policy() -> TierPolicy {
    TierPolicy {
        algorithm: Algorithm::Sha256,
        keep_metadata: false,
        reuse_identical: false,
        skip_ignored: true,
        read_back: false,
    }
}

async fn records(dir: &Path) -> Records {
    Records::open(&format!("sqlite://{}", dir.join("tier.db").display()))
        .await
        .expect("records")
}

/// A copier over `<base>/<root>` into `tier`.
fn copier(base: &Path, root: &str, tier: Tier, records: Records) -> TierCopier {
    let roots = open_roots(&[base.join(root)], true).expect("roots");
    TierCopier::new(roots, tier, records, policy())
}

/// The sweeper's message naming `filename` in `parent_dir` (a file it saw as new).
fn message(parent_dir: &str, filename: &str) -> AssetSweeperFile {
    serde_json::from_value(sweeper_message(parent_dir, filename, false)).expect("message")
}

/// Writes `<base>/<root>/<rel>`; the message names it relative to the root.
fn put(base: &Path, root: &str, rel: &str, content: &[u8]) -> AssetSweeperFile {
    let p = base.join(root).join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
    std::fs::write(&p, content).expect("write");
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    message(dir, name)
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn copied(r: Result<TierOutcome, TierError>) -> storage::CopyReport {
    match r {
        Ok(TierOutcome::Copied(c)) => c,
        other => panic!("expected a copy, got {other:?}"),
    }
}

/// A retry's reason, counted toward the attempts or an outage's.
fn transient(r: Result<TierOutcome, TierError>) -> String {
    match r {
        Err(TierError::Transient(e) | TierError::Unavailable(e)) => e,
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// An outage's retry (not counted against the message): its reason.
fn outage(r: Result<TierOutcome, TierError>) -> String {
    match r {
        Err(TierError::Unavailable(e)) => e,
        other => panic!("expected an outage's retry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_store_failing_as_the_upload_completes_is_a_retry_and_cleaned_up() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let mut tier = storage::store::local(&store_dir).expect("tier");
    tier.min_part = MIB as u64; // small parts keep the multipart file small
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let c = copier(base.path(), "online", faulty, records(base.path()).await);

    // Under one part: the whole upload happens as the writer completes.
    let small = put(base.path(), "online", "p/small.bin", b"small");
    faults.fail_put.store(true, Ordering::SeqCst);
    let e = transient(c.handle(&small, 1).await);
    assert!(e.contains("injected fault"), "{e}");

    // Multipart: every part stored, then the completion fails; the upload is aborted.
    let big_content = content(3 * MIB + 17, 1);
    let big = put(base.path(), "online", "p/big.bin", &big_content);
    faults.fail_complete.store(true, Ordering::SeqCst);
    let e = transient(c.handle(&big, 1).await);
    assert!(e.contains("injected fault"), "{e}");
    assert_eq!(
        faults.aborts.load(Ordering::SeqCst),
        1,
        "the upload was aborted"
    );
    assert_eq!(
        files_under(&store_dir),
        Vec::<String>::new(),
        "nothing left behind"
    );

    // The store recovers: both retries succeed.
    faults.fail_put.store(false, Ordering::SeqCst);
    faults.fail_complete.store(false, Ordering::SeqCst);
    assert_eq!(copied(c.handle(&small, 2).await).key, "p/small.bin");
    let r = copied(c.handle(&big, 2).await);
    assert_eq!(r.checksum, sha256(&big_content));
    assert_eq!(
        std::fs::read(store_dir.join("p/big.bin")).expect("stored"),
        big_content
    );
}

#[tokio::test]
async fn concurrent_uploads_of_different_content_to_one_key_never_overwrite() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let recs = records(base.path()).await;
    // Two instances sharing store and database, each seeing its own file at one path.
    let a = copier(base.path(), "a", faulty.clone(), recs.clone());
    let b = copier(base.path(), "b", faulty, recs);
    let msg_a = put(base.path(), "a", "show/ep.mov", b"content of A");
    let msg_b = put(base.path(), "b", "show/ep.mov", b"content of B, other");

    // A finds the key free and is held in the middle of its upload.
    let (entered, release) = faults.hold_next_upload();
    let first = tokio::spawn(async move { a.handle(&msg_a, 1).await });
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the copy reached the held upload");
    // Meanwhile B handles the same key: it must not find it free.
    let during = b.handle(&msg_b, 1).await;
    release.notify_one();
    let ra = copied(joined(first).await.expect("A ran"));
    assert_eq!(ra.key, "show/ep.mov");
    // Waited out uncounted: A's copy may outlast every tier.
    let e = outage(during);
    assert!(e.contains("in progress"), "{e}");
    // B's retry finds A's object there and stores beside it, never over it.
    let rb = copied(b.handle(&msg_b, 2).await);
    assert_eq!(
        rb.key,
        format!("show/ep.mov.{}", &sha256(b"content of B, other")[..16])
    );
    for (r, body) in [
        (&ra, &b"content of A"[..]),
        (&rb, &b"content of B, other"[..]),
    ] {
        assert_eq!(r.checksum, sha256(body), "{r:?}");
        assert_eq!(
            std::fs::read(store_dir.join(&r.key)).expect("stored"),
            body,
            "what {} reports is what is stored",
            r.key
        );
    }
}

/// A copy that finds its source changed after it published (the file rewritten in place
/// during the upload) takes its torn object away only while its claim on the key holds:
/// one stalled past its lease (a frozen VM) may find another replica has since taken the
/// key, found that object there, verified and recorded it — deleting it then loses the
/// only copy the records name.
#[tokio::test]
async fn a_copy_whose_claim_lapsed_leaves_what_it_published() {
    use std::os::unix::fs::FileExt;
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let (faulty, faults) = FaultyStore::wrap(&tier);
    // A lease no renewal of which falls within the test: the takeover is found by the
    // copy's look before it removes its object, not by a renewal racing it.
    let recs = records(base.path())
        .await
        .with_claim_lease(std::time::Duration::from_secs(600));
    let c = copier(base.path(), "online", faulty, recs);
    let body = content(64 * 1024, 3);
    let msg = put(base.path(), "online", "s/take.mov", &body);
    let path = base.path().join("online/s/take.mov");
    let (entered, release) = faults.hold_next_upload();
    let run = tokio::spawn(async move { c.handle(&msg, 1).await });
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the copy reached the held upload");
    // The file rewritten in place as it is uploaded, and the claim taken over meanwhile
    // (as another replica does once this one's lease lapsed).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all_at(b"edited", 100).expect("rewrite");
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .expect("touch");
    // A writer of its own: the records' pool only reads, on SQLite.
    db::sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", base.path().join("tier.db").display());
    let writer = db::sqlx::AnyPool::connect(&url).await.expect("writer");
    let taken = db::sqlx::query(
        "UPDATE upload_claims SET owner = 'another replica' WHERE object_key = 's/take.mov'",
    )
    .execute(&writer)
    .await
    .expect("taken over")
    .rows_affected();
    assert_eq!(taken, 1, "the copy held a claim on its key");
    release.notify_one();
    let e = transient(joined(run).await.expect("ran"));
    assert!(e.contains("changed while"), "{e}");
    assert!(
        store_dir.join("s/take.mov").exists(),
        "what the copy published stays: the key is no longer its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_to_one_key_of_a_local_store_never_overwrite_without_claims() {
    // A local store takes no claim: its copy is published only where no object is, and
    // one that lost the race looks at what won. Two instances sharing store and database,
    // each with other content at the same paths, all copies at once.
    const KEYS: usize = 40;
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let recs = records(base.path()).await;
    let a = Arc::new(copier(base.path(), "a", tier.clone(), recs.clone()));
    let b = Arc::new(copier(base.path(), "b", tier, recs.clone()));
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..KEYS {
        let rel = format!("show/ep{i}.mov");
        for (c, root) in [(&a, "a"), (&b, "b")] {
            let body = format!("{root}'s take of episode {i}")
                .repeat(50)
                .into_bytes();
            let msg = put(base.path(), root, &rel, &body);
            let c = c.clone();
            runs.spawn(async move { (copied(c.handle(&msg, 1).await), body) });
        }
    }
    let mut naturals = 0;
    while let Some(r) = runs.join_next().await {
        let (report, body) = r.expect("a copy ran");
        assert_eq!(report.checksum, sha256(&body), "{report:?}");
        assert_eq!(
            std::fs::read(store_dir.join(&report.key)).expect("stored"),
            body,
            "what {} reports is what is stored",
            report.key
        );
        if !report.key.contains(".mov.") {
            naturals += 1;
        }
    }
    assert_eq!(naturals, KEYS, "one copy per path under the natural key");
    let stored = files_under(&store_dir);
    assert_eq!(stored.len(), 2 * KEYS, "every copy stored once: {stored:?}");
    assert_eq!(
        recs.count("stored_objects").await.expect("count"),
        2 * KEYS as i64
    );
}

/// A local store holding the source file itself (a hard link of it, or an online root
/// bind-mounted as the store) holds no copy of it: refused as permanent, never reported
/// as archived (a media remover acting on that success would delete the only copy).
#[tokio::test]
async fn a_store_holding_the_source_itself_is_no_copy() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    for (rel, size) in [("show/small.mov", 4096), ("show/large.mov", 3 * MIB)] {
        let msg = put(base.path(), "online", rel, &content(size, 7));
        let at = store_dir.join(rel);
        std::fs::create_dir_all(at.parent().expect("parent")).expect("dir");
        std::fs::hard_link(base.path().join("online").join(rel), &at).expect("linked");
        match c.handle(&msg, 1).await {
            Err(TierError::Permanent(e)) => assert!(e.contains("itself"), "{rel}: {e}"),
            other => panic!("{rel}: expected a refusal, got {other:?}"),
        }
    }
}

/// A nearline vault inside an online root: its objects are swept as new files, and each
/// holds the content of a recorded copy — its own. Reused as its own backup, it was
/// reported copied ("uploaded": false), and a remover of backed-up files deleted the
/// vault's only copy. Refused as permanent, at every size, on every delivery.
#[tokio::test]
async fn a_vault_file_swept_through_an_online_root_is_no_copy_of_itself() {
    let base = tempfile::tempdir().expect("temp");
    let vault = base.path().join("online/vault");
    let tier = storage::store::local(&vault).expect("tier");
    let c = nearline(base.path(), tier, records(base.path()).await);
    for (name, size) in [("small.mov", 4096), ("large.mov", 3 * MIB)] {
        let first = put(
            base.path(),
            "online",
            &format!("show/{name}"),
            &content(size, 3),
        );
        assert!(copied(c.handle(&first, 1).await).uploaded, "{name}");
        let swept: AssetSweeperFile = message("vault/show", name);
        for delivery in 1..=2 {
            match c.handle(&swept, delivery).await {
                Err(TierError::Permanent(e)) => assert!(e.contains("itself"), "{name}: {e}"),
                other => panic!("{name}: expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(held(&vault, &format!("show/{name}")), content(size, 3));
    }
}

/// An archive store inside an online root (the sweeper not told to leave it out): a copy
/// swept as new media is refused, never copied into the store itself — where it was swept
/// again and copied one level deeper each time, each reported as a new copy.
#[tokio::test]
async fn an_archive_copy_swept_through_an_online_root_is_not_copied_into_the_store() {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("online/.archive");
    let tier = storage::store::local(&store).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    for (name, size) in [("small.mov", 4096), ("large.mov", 3 * MIB)] {
        let first = put(
            base.path(),
            "online",
            &format!("show/{name}"),
            &content(size, 5),
        );
        assert!(copied(c.handle(&first, 1).await).uploaded, "{name}");
        let swept: AssetSweeperFile = message(".archive/show", name);
        for delivery in 1..=2 {
            match c.handle(&swept, delivery).await {
                Err(TierError::Permanent(e)) => {
                    assert!(e.contains("own store"), "{name}: {e}")
                }
                other => panic!("{name}: expected a refusal, got {other:?}"),
            }
        }
    }
    assert_eq!(
        files_under(&store),
        ["show/large.mov", "show/small.mov"],
        "nothing copied into the store itself"
    );
    // The other way round — an online root inside the store — copies land outside the
    // root: its files are copied as any are.
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("media")).expect("tier");
    let c = copier(
        base.path(),
        "media/online",
        tier,
        records(base.path()).await,
    );
    let msg = put(
        base.path(),
        "media/online",
        "show/ep.mov",
        &content(4096, 8),
    );
    assert!(copied(c.handle(&msg, 1).await).uploaded);
}

/// U+0000 is valid JSON but PostgreSQL text cannot hold it: a field the records keep with
/// one is refused at once, naming the field (on PostgreSQL every attempt failed to record,
/// 50 retries); one in `mime_type`, which nothing keeps, is no matter.
#[tokio::test]
async fn a_nul_character_in_a_text_field_is_permanent_naming_it() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let mut msg = put(base.path(), "online", "n/clip.mov", b"x");
    msg.imported_id = Some("id\0".into());
    let mut ignored = put(base.path(), "online", "n/other.mov", b"y");
    ignored.ignore = true;
    ignored.filename = "other\0.mov".into();
    for (m, field) in [(&msg, "imported_id"), (&ignored, "filename")] {
        match c.handle(m, 1).await {
            Err(TierError::Permanent(e)) => assert!(e.contains(field) && e.contains("NUL"), "{e}"),
            other => panic!("{field}: expected permanent, got {other:?}"),
        }
    }
    let mut typed = put(base.path(), "online", "n/typed.mov", b"z");
    typed.mime_type = "video/\0mp4".into();
    assert!(copied(c.handle(&typed, 1).await).uploaded);
}

/// Keys a local store handles unlike object_store's local backend: a name like `take#1`
/// (which that backend refuses: every look at it failed as a retry) is stored and found
/// again; a directory already at the key sends the copy beside it; a stored file where the
/// key needs a directory is refused once, not retried to the DLQ.
#[tokio::test]
async fn awkward_keys_of_a_local_store_are_stored_or_refused_at_once() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);

    let big = content(2 * MIB, 9);
    let hash = put(base.path(), "online", "v/take#1", &big);
    let r = copied(c.handle(&hash, 1).await);
    assert_eq!(r.key, "v/take#1");
    assert!(r.uploaded);
    let again = copied(c.handle(&hash, 1).await);
    assert_eq!(again.key, "v/take#1");
    assert!(!again.uploaded, "the redelivery finds its copy");
    let small = put(base.path(), "online", "v/clip#2", b"small");
    assert_eq!(copied(c.handle(&small, 1).await).key, "v/clip#2");
    assert!(!copied(c.handle(&small, 1).await).uploaded);

    // `d/x.mov` archived makes `d` a directory of the store; then a file named `d`.
    let inner = put(base.path(), "online", "d/x.mov", b"inner");
    copied(c.handle(&inner, 1).await);
    std::fs::remove_dir_all(base.path().join("online/d")).expect("rm");
    let file_d = put(base.path(), "online", "d", b"a file named d");
    let r = copied(c.handle(&file_d, 1).await);
    assert_eq!(r.key, format!("d.{}", &sha256(b"a file named d")[..16]));

    // And the other way round: `f` archived as a file, then `f/y.mov`.
    let f = put(base.path(), "online", "f", b"a file named f");
    copied(c.handle(&f, 1).await);
    std::fs::remove_file(base.path().join("online/f")).expect("rm");
    let under = put(base.path(), "online", "f/y.mov", b"under f");
    match c.handle(&under, 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("needs a directory"), "{e}"),
        other => panic!("expected permanent, got {other:?}"),
    }

    // A recorded copy whose key became a directory (the object was lost, then `e/x.mov`
    // archived): the redelivery copies again beside it instead of failing to read it.
    let big_e = content(2 * MIB, 11);
    let e = put(base.path(), "online", "e", &big_e);
    copied(c.handle(&e, 1).await);
    std::fs::remove_file(store_dir.join("e")).expect("lose the object");
    std::fs::create_dir_all(store_dir.join("e")).expect("dir");
    std::fs::write(store_dir.join("e/x.mov"), b"other").expect("write");
    let r = copied(c.handle(&e, 2).await);
    assert_eq!(r.key, format!("e.{}", &sha256(&big_e)[..16]));
}

#[tokio::test]
async fn a_failed_verification_removes_what_the_attempt_stored() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let mut tier = storage::store::local(&store_dir).expect("tier");
    tier.min_part = MIB as u64;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    for (name, body) in [
        ("one.bin", content(1000, 2)),
        ("multi.bin", content(2 * MIB + 5, 3)),
    ] {
        let msg = put(base.path(), "online", &format!("v/{name}"), &body);
        faults.corrupt.store(1, Ordering::SeqCst);
        // The store blips as the bad object is taken away: tried again, it goes.
        faults
            .fail_deletes
            .store(storage::copy::REMOVE_TRIES as usize - 1, Ordering::SeqCst);
        let e = transient(c.handle(&msg, 1).await);
        assert!(e.contains("verification"), "{e}");
        assert_eq!(faults.fail_deletes.load(Ordering::SeqCst), 0, "tried again");
        assert!(
            !store_dir.join("v").join(name).exists(),
            "the damaged object is gone"
        );
        // The retry stores a good copy under the file's own key, not beside a bad one.
        let r = copied(c.handle(&msg, 2).await);
        assert_eq!(r.key, format!("v/{name}"));
        assert!(r.uploaded);
        assert_eq!(std::fs::read(store_dir.join(&r.key)).expect("stored"), body);
    }
    assert_eq!(files_under(&store_dir), ["v/multi.bin", "v/one.bin"]);
}

#[tokio::test]
async fn multipart_through_s3_survives_an_outage_mid_upload() {
    let bucket = "tier-multipart";
    let moto = Arc::new(tokio::sync::Mutex::new(MotoServer::start(bucket).await));
    let mut opts = moto.lock().await.store_options();
    opts.max_retries = 0;
    // Also each request's own limit: a 5 MiB part to moto on a loaded machine can take
    // seconds, and nothing here retries it.
    opts.retry_timeout_ms = 30_000;
    opts.part_size_mib = 5; // S3's smallest part
    let tier = storage::store::open(&format!("s3://{bucket}/pre"), &opts).expect("tier");
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    // Stops the server from inside a store call (uncontended: the test holds no lock).
    let stopper = || {
        let m = moto.clone();
        Box::new(move || m.try_lock().expect("moto free").stop()) as Box<dyn FnOnce() + Send>
    };

    // A single-request upload: the server goes away as it is sent.
    let small = put(base.path(), "online", "big/small.mov", b"small");
    *faults.before_put.lock().expect("hook") = Some(stopper());
    let e = transient(c.handle(&small, 1).await);
    assert!(e.contains("object store"), "{e}");
    moto.lock().await.restart(bucket).await;

    // Three parts (5 MiB, 5 MiB, the rest): the server goes away once the first is stored.
    let body = content(11 * MIB + 3, 4);
    let msg = put(base.path(), "online", "big/take.mov", &body);
    *faults.after_first_part.lock().expect("hook") = Some(stopper());
    let e = transient(c.handle(&msg, 1).await);
    assert!(e.contains("object store"), "{e}");
    // Kept (not aborted) for the retry to resume.
    assert_eq!(faults.aborts.load(Ordering::SeqCst), 0);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 1);

    // Back up (moto keeps nothing; the bucket is re-created): the retries store both whole,
    // the multipart one started over since the store no longer lists its upload.
    moto.lock().await.restart(bucket).await;
    assert_eq!(copied(c.handle(&small, 2).await).key, "pre/big/small.mov");
    let r = copied(c.handle(&msg, 2).await);
    assert_eq!(r.key, "pre/big/take.mov");
    let got = storage::copy::hash_object(&tier, &tier.key("big/take.mov"), Algorithm::Sha256)
        .await
        .expect("read back")
        .expect("stored");
    assert_eq!(got.size, body.len() as u64);
    assert_eq!(got.checksum, sha256(&body));
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// A tier on `url` with `opts` but checksums on.
fn on_again(url: &str, opts: &storage::StoreOptions) -> Tier {
    let mut opts = opts.clone();
    opts.checksums = true;
    storage::store::open(url, &opts).expect("tier")
}

/// An S3 tier through a request-counting proxy in front of moto (parts of 5 MiB).
async fn s3_tier(bucket: &str) -> (MotoServer, CountingProxy, Tier) {
    s3_tier_with(bucket, |_| {}).await
}

/// [`s3_tier`] with its store options changed by `change`.
async fn s3_tier_with(
    bucket: &str,
    change: impl FnOnce(&mut storage::store::StoreOptions),
) -> (MotoServer, CountingProxy, Tier) {
    let moto = MotoServer::start(bucket).await;
    let proxy = CountingProxy::start(&moto.endpoint).await;
    let mut opts = moto.store_options();
    opts.endpoint = Some(proxy.endpoint.clone());
    opts.part_size_mib = 5;
    // Room for one part at a time: parts then wait for each other (a part reused on
    // resume gives its room back before the next is read, or nothing more is ever read).
    opts.part_memory_mib = 5;
    change(&mut opts);
    let tier = storage::store::open(&format!("s3://{bucket}/pre"), &opts).expect("tier");
    (moto, proxy, tier)
}

/// A multipart completion the store carried out but whose answer was lost (answered 500
/// here; tried again, the upload is gone: S3's 404 `NoSuchUpload`, which moto does not
/// give, answered here) is this copy's own: reported uploaded and not downloaded — taken
/// for another's, the object was read back whole and compared.
#[tokio::test]
async fn a_completion_whose_answer_was_lost_is_this_copys_own() {
    let bucket = "tier-lost-completion";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let body = content(11 * MIB, 3);
    let msg = put(base.path(), "online", "l/big.bin", &body);
    let completion = |t: &str| t.contains("uploadId=") && !t.contains("partNumber=");
    proxy.lose_next_answer("POST", completion);
    proxy.answer_next(
        "POST",
        completion,
        "404 Not Found",
        "<Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist.</Message></Error>",
    );
    let r = c.handle(&msg, 1).await;
    let r = copied(r);
    assert_eq!(r.key, "pre/l/big.bin");
    assert!(r.uploaded, "this copy's upload: {r:?}");
    assert_eq!(
        downloads(&proxy, bucket, &r.key),
        0,
        "not read back: {:?}",
        proxy.requests()
    );
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// S3 keys written with a trailing newline (a Kubernetes secret made `--from-file`) are
/// used trimmed, as a key file's is: every request signed with the newline failed, retried
/// as an outage for a day, while `check-config` showed nothing amiss.
#[tokio::test]
async fn s3_keys_ending_in_a_newline_are_used_trimmed() {
    let (_moto, _proxy, tier) = s3_tier_with("trimmed-keys", |o| {
        o.access_key_id = Some("test\n".into());
        o.secret_access_key = Some(framework::Secret::new("test\n"));
    })
    .await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let msg = put(base.path(), "online", "k/clip.mov", b"clip");
    assert!(copied(c.handle(&msg, 1).await).uploaded);
}

/// A client writing to `bucket` as any other program would (no checksums, no claims).
fn plain_client(moto: &MotoServer, bucket: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&moto.endpoint)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .expect("a plain client")
}

/// Stores `body` at `key` of `bucket` in an archive storage class, as a plain client
/// would (no checksums).
async fn put_in_glacier(moto: &MotoServer, bucket: &str, key: &str, body: Vec<u8>) {
    let mut attrs = object_store::Attributes::new();
    attrs.insert(object_store::Attribute::StorageClass, "GLACIER".into());
    object_store::ObjectStore::put_opts(
        &plain_client(moto, bucket),
        &object_store::path::Path::from(key),
        body.into(),
        object_store::PutOptions {
            attributes: attrs,
            ..Default::default()
        },
    )
    .await
    .expect("put in glacier");
}

/// Records a copy of `file` at `key` (`checksum` of `algorithm`, modification time
/// `mtime`) with the store facts its HEAD shows now: what this service recorded when it
/// stored the object, before a lifecycle rule moved it where it cannot be read back.
#[allow(clippy::too_many_arguments)]
async fn record_as_stored(
    tier: &Tier,
    recs: &Records,
    key: &str,
    size: usize,
    checksum: String,
    algorithm: &str,
    file: &Path,
    mtime: &str,
) {
    let head = tier
        .s3
        .as_ref()
        .expect("s3")
        .head(&storage::store::object_path(key))
        .await
        .expect("head")
        .expect("there");
    recs.record_copy(
        &storage::records::StoredObject {
            object_key: key.into(),
            size: size as u64,
            checksum,
            content_sha256: None,
            store: storage::records::StoreFacts {
                etag: head.etag,
                version: head.version,
                checksum: head.checksum_sha256,
            },
        },
        algorithm,
        &file
            .canonicalize()
            .expect("real path")
            .display()
            .to_string(),
        mtime,
        None,
    )
    .await
    .expect("recorded");
}

/// Sets the modification time of the file at `path`.
fn set_modified(path: &Path, at: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(at))
        .expect("mtime");
}

/// SHA-256 of what `tier` holds at `key`.
async fn stored_sha256(tier: &Tier, key: &str) -> String {
    storage::copy::hash_object(tier, &storage::store::object_path(key), Algorithm::Sha256)
        .await
        .expect("read")
        .expect("stored")
        .checksum
}

#[tokio::test]
async fn an_s3_copy_never_replaces_an_object_published_while_it_uploads() {
    // Another writer publishes at the key after the copy found it free: a copy whose
    // claim lapsed while it stalled, or a program outside the services. The copy's
    // single request and its multipart completion are create-only, so what the other
    // wrote stays, and the copy goes beside it.
    let bucket = "tier-create-only";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = Arc::new(copier(
        base.path(),
        "online",
        faulty,
        records(base.path()).await,
    ));
    let plain = plain_client(&moto, bucket);
    for (name, body) in [
        ("one.bin", content(64 * 1024, 7)),
        ("multi.bin", content(11 * MIB + 3, 8)),
    ] {
        let key = format!("pre/w/{name}");
        let msg = put(base.path(), "online", &format!("w/{name}"), &body);
        let theirs = format!("the other writer's {name}").into_bytes();
        // Held as it sends its (first) upload request, having found the key free.
        let (entered, release) = faults.hold_next_upload();
        let copy = {
            let c = c.clone();
            tokio::spawn(async move { c.handle(&msg, 1).await })
        };
        tokio::time::timeout(framework::testing::WAIT, entered.notified())
            .await
            .expect("the copy reached the held upload");
        object_store::ObjectStore::put(
            &plain,
            &storage::store::object_path(&key),
            theirs.clone().into(),
        )
        .await
        .expect("the other writer publishes");
        release.notify_one();
        let r = copied(joined(copy).await.expect("the copy ran"));
        assert_eq!(r.key, format!("{key}.{}", &sha256(&body)[..16]), "{name}");
        assert_eq!(r.checksum, sha256(&body));
        assert_eq!(
            stored_sha256(&tier, &key).await,
            sha256(&theirs),
            "{name}: the other writer's object is untouched"
        );
        assert_eq!(stored_sha256(&tier, &r.key).await, sha256(&body), "{name}");
    }
    assert_eq!(
        faults.aborts.load(Ordering::SeqCst),
        1,
        "the multipart upload refused at its completion was aborted"
    );
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// A store that refuses the checksum headers (Backblaze B2 answers 400 InvalidArgument to
/// `x-amz-checksum-sha256` and `x-amz-checksum-mode`): every copy failed on them, and no
/// setting helped (a redelivery's HEAD says so too). With `checksums = false` no request carries them, and copies of one
/// request and of several parts are verified without the store's checksum (the ETag of a
/// single upload, the bytes read back of a multipart one).
#[tokio::test]
async fn a_store_that_refuses_checksums_takes_copies_with_checksums_off() {
    let bucket = "tier-no-checksums";
    let moto = MotoServer::start(bucket).await;
    let proxy = CountingProxy::start(&moto.endpoint).await;
    proxy.refuse_header("x-amz-checksum-");
    let mut opts = moto.store_options();
    opts.endpoint = Some(proxy.endpoint.clone());
    opts.part_size_mib = 5;
    let base = tempfile::tempdir().expect("temp");
    let url = format!("s3://{bucket}/pre");
    let on = storage::store::open(&url, &opts).expect("tier");
    let c = copier(base.path(), "online", on, records(base.path()).await);
    let one = content(64 * 1024, 1);
    let msg = put(base.path(), "online", "b2/one.bin", &one);
    transient(c.handle(&msg, 1).await);
    let refused = proxy.refused();
    assert!(
        refused > 0,
        "the default sends checksums, which this store refuses"
    );

    opts.checksums = false;
    let off = storage::store::open(&url, &opts).expect("tier");
    let c = copier(
        base.path(),
        "online",
        off.clone(),
        records(base.path()).await,
    );
    let multi = content(11 * MIB + 3, 2);
    let msg_multi = put(base.path(), "online", "b2/multi.bin", &multi);
    let mut keys = Vec::new();
    for (msg, body) in [(&msg, &one), (&msg_multi, &multi)] {
        let r = copied(c.handle(msg, 1).await);
        assert_eq!(r.checksum, sha256(body));
        keys.push((r.key, body));
    }
    assert_eq!(
        proxy.refused(),
        refused,
        "no request carried a checksum header"
    );
    // With checksums on again, a redelivery's look at the stored object is refused: the
    // error says which setting helps (a HEAD's answer has no body to say it).
    let again = copier(
        base.path(),
        "online",
        on_again(&url, &opts),
        records(base.path()).await,
    );
    let e = transient(again.handle(&msg, 2).await);
    assert!(e.contains("checksums = false"), "{e}");
    assert_eq!(
        downloads(&proxy, bucket, "pre/b2/multi.bin"),
        1,
        "the multipart copy was read back"
    );
    for (key, body) in keys {
        assert_eq!(stored_sha256(&off, &key).await, sha256(body));
    }
}

/// A store throttling its clients (503 SlowDown) is waited out by the requests the
/// services make outside object_store (the HEAD that verifies a copy, ListParts): a
/// throttled HEAD failed the copy at once, and its retry then read the whole object back
/// from the store that was asking for less.
#[tokio::test]
async fn a_throttling_store_is_waited_out() {
    let bucket = "tier-throttled";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let s3 = tier.s3.as_ref().expect("an S3 tier");
    let key = storage::store::object_path("pre/none/here.bin");
    proxy.throttle_next("HEAD", 2);
    assert_eq!(
        s3.head(&key).await.expect("answered after two pauses"),
        None
    );
    proxy.throttle_next("GET", 2);
    assert_eq!(
        s3.list_parts(&key, "no-such-upload")
            .await
            .expect("answered after two pauses"),
        None
    );
    assert_eq!(
        proxy.count("HEAD", |_| true),
        1,
        "the throttled ones were answered by the proxy"
    );
}

/// GetObject requests (a download, not ListParts) of `key` in `bucket`.
fn downloads(proxy: &CountingProxy, bucket: &str, key: &str) -> usize {
    let path = format!("/{bucket}/{key}");
    proxy.count("GET", |t| {
        t.split('?').next() == Some(path.as_str()) && !t.contains("uploadId")
    })
}

#[tokio::test]
async fn s3_objects_are_verified_and_redeliveries_confirmed_by_the_stores_checksum() {
    let bucket = "tier-checksums";
    let (moto, proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(
        base.path(),
        "online",
        tier.clone(),
        records(base.path()).await,
    );
    let mut rows = Vec::new();
    for (name, body) in [
        ("small.bin", content(100 * 1024, 5)),
        ("multi.bin", content(11 * MIB + 3, 6)),
    ] {
        let key = format!("pre/c/{name}");
        let msg = put(base.path(), "online", &format!("c/{name}"), &body);
        proxy.reset();
        let r = copied(c.handle(&msg, 1).await);
        assert!(r.uploaded);
        assert_eq!(r.checksum, sha256(&body));
        let verify_gets = downloads(&proxy, bucket, &key);
        assert_eq!(
            verify_gets,
            0,
            "verified without downloading {key}: {:?}",
            proxy.requests()
        );

        // A redelivery: one HEAD, no download.
        proxy.reset();
        let again = copied(c.handle(&msg, 2).await);
        assert!(!again.uploaded);
        assert_eq!(again.key, key);
        let redelivery_gets = downloads(&proxy, bucket, &key);
        assert_eq!(redelivery_gets, 0, "{:?}", proxy.requests());

        // The file touched (same bytes, a new mtime): no copy of this version is
        // recorded, and the key's record and one HEAD settle it — it was downloaded whole.
        let path = base.path().join("online").join(format!("c/{name}"));
        set_modified(
            &path,
            std::time::SystemTime::now() + std::time::Duration::from_secs(60),
        );
        proxy.reset();
        let touched = copied(c.handle(&msg, 3).await);
        assert!(!touched.uploaded);
        assert_eq!(touched.key, key);
        let touched_gets = downloads(&proxy, bucket, &key);
        assert_eq!(touched_gets, 0, "{:?}", proxy.requests());

        // Other bytes of the same size written under the key behind the service's back
        // (no checksum, as a plain client writes): detected, and never overwritten.
        let mut other = body.clone();
        other[body.len() / 2] ^= 0x55;
        let plain = plain_client(&moto, bucket);
        object_store::ObjectStore::put(
            &plain,
            &storage::store::object_path(&key),
            other.clone().into(),
        )
        .await
        .expect("replace the object");
        proxy.reset();
        let beside = copied(c.handle(&msg, 4).await);
        assert_eq!(beside.key, format!("{key}.{}", &sha256(&body)[..16]));
        assert!(beside.uploaded);
        let replaced_gets = downloads(&proxy, bucket, &key);
        assert!(replaced_gets >= 1, "the replaced object was read back");
        // Once: its record forgotten, the next look goes to the copy beside it.
        proxy.reset();
        assert_eq!(copied(c.handle(&msg, 5).await).key, beside.key);
        assert_eq!(
            downloads(&proxy, bucket, &key),
            0,
            "the replaced object is not read again"
        );
        let stored = storage::copy::hash_object(
            &tier,
            &storage::store::object_path(&beside.key),
            Algorithm::Sha256,
        )
        .await
        .expect("read")
        .expect("stored");
        assert_eq!(stored.checksum, sha256(&body));
        let kept = storage::copy::hash_object(
            &tier,
            &storage::store::object_path(&key),
            Algorithm::Sha256,
        )
        .await
        .expect("read")
        .expect("stored");
        assert_eq!(
            kept.checksum,
            sha256(&other),
            "the other object is untouched"
        );
        rows.push(format!(
            "| {name} ({} bytes) | {verify_gets} | {redelivery_gets} | {touched_gets} | {replaced_gets} |",
            body.len()
        ));
    }
    // The store's checksum of the multipart object as recorded (S3 writes `<b64>-3`,
    // moto the `<b64>` alone): its copy beside the replaced one, whose record is forgotten.
    let row = db::sqlx::query(
        "SELECT store_checksum FROM stored_objects WHERE object_key LIKE 'pre/c/multi.bin.%'",
    )
    .fetch_one(c.records().pool())
    .await
    .expect("record");
    let sum: Option<String> = db::Row::try_get(&row, "store_checksum").expect("column");
    assert!(sum.is_some(), "the store's checksum is recorded");
    println!("multi.bin ChecksumSHA256 as moto reports it: {sum:?}");
    println!(
        "| object | GETs verifying the upload | GETs on redelivery | GETs of a touched file | GETs after a replacement |"
    );
    for r in rows {
        println!("{r}");
    }
}

/// Files at the edges of the sizes a copy treats apart — empty, one byte, around a read
/// block, around a part, exactly two parts — are stored whole and verified on S3 (with
/// the store's checksums and without: one request, or a multipart upload ending on a whole
/// part) and on a local store, and a redelivery of each finds its copy. No test stored an
/// empty file, or one of exactly a part, on S3.
#[tokio::test]
async fn files_at_every_size_edge_are_stored_whole() {
    let bucket = "tier-size-edges";
    let (moto, _proxy, s3) = s3_tier(bucket).await;
    let mut opts = moto.store_options();
    opts.part_size_mib = 5;
    opts.checksums = false;
    let plain = storage::store::open(&format!("s3://{bucket}/plain"), &opts).expect("tier");
    let base = tempfile::tempdir().expect("temp");
    let local = storage::store::local(&base.path().join("store")).expect("tier");
    let part = 5 * MIB;
    let sizes = [
        0,
        1,
        MIB - 1,
        MIB,
        MIB + 1,
        part - 1,
        part,
        part + 1,
        2 * part,
    ];
    for (name, tier) in [("s3", s3), ("s3-no-checksums", plain), ("local", local)] {
        let dir = base.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let c = copier(&dir, "online", tier.clone(), records(&dir).await);
        for (i, size) in sizes.into_iter().enumerate() {
            let body = content(size, i as u8);
            let msg = put(&dir, "online", &format!("edge/{size}.bin"), &body);
            let r = copied(c.handle(&msg, 1).await);
            assert!(r.uploaded, "{name} {size}");
            assert_eq!(r.size, size as u64, "{name} {size}");
            assert_eq!(r.checksum, sha256(&body), "{name} {size}");
            assert_eq!(
                stored_sha256(&tier, &r.key).await,
                sha256(&body),
                "{name} {size}"
            );
            let again = copied(c.handle(&msg, 2).await);
            assert!(!again.uploaded, "{name} {size}: its copy found again");
            assert_eq!(again.key, r.key, "{name} {size}");
        }
    }
}

/// An object whose store facts changed while its bytes did not (re-encrypted or copied in
/// place, the vault moved to another bucket, checksums switched off) is read back once and
/// its new facts recorded: the next redelivery is settled by one HEAD again. They were
/// never recorded: every later look downloaded the whole object, and once a lifecycle
/// rule moved it to an archive storage class every redelivery was dead-lettered.
#[tokio::test]
async fn an_object_read_back_unchanged_has_its_store_facts_recorded_again() {
    let bucket = "tier-refacts";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let body = content(100 * 1024, 9);
    let msg = put(base.path(), "online", "f/clip.mov", &body);
    let key = "pre/f/clip.mov";
    assert!(copied(c.handle(&msg, 1).await).uploaded);
    // Facts of another time (a writer of its own: the records' pool only reads).
    db::sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", base.path().join("tier.db").display());
    let writer = db::sqlx::AnyPool::connect(&url).await.expect("writer");
    db::sqlx::query(
        "UPDATE stored_objects SET store_etag = '\"moved\"', store_version = NULL, \
         store_checksum = NULL",
    )
    .execute(&writer)
    .await
    .expect("facts of another time");
    proxy.reset();
    let first = copied(c.handle(&msg, 2).await);
    assert!(!first.uploaded);
    assert_eq!(downloads(&proxy, bucket, key), 1, "read back once");
    proxy.reset();
    let second = copied(c.handle(&msg, 3).await);
    assert!(!second.uploaded);
    assert_eq!(
        downloads(&proxy, bucket, key),
        0,
        "settled by a HEAD: {:?}",
        proxy.requests()
    );
}

#[tokio::test]
async fn an_interrupted_s3_multipart_upload_resumes_from_its_stored_parts() {
    let bucket = "tier-resume";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let body = content(5 * 5 * MIB - 1000, 7); // 5 parts
    let msg = put(base.path(), "online", "r/take.mov", &body);

    // The store fails from the third part on: the upload stays recorded with its parts.
    *faults.fail_parts_from.lock().expect("faults") = Some(2);
    let e = transient(c.handle(&msg, 1).await);
    assert!(e.contains("injected fault"), "{e}");
    assert_eq!(faults.aborts.load(Ordering::SeqCst), 0, "kept for resuming");
    let recorded = c.records().count("multipart_parts").await.unwrap() as usize;
    assert!((1..=2).contains(&recorded), "{recorded}");

    // The retry sends only what the store does not hold.
    *faults.fail_parts_from.lock().expect("faults") = None;
    faults.parts_sent.store(0, Ordering::SeqCst);
    proxy.reset();
    let r = copied(
        framework::testing::within(
            framework::testing::WAIT,
            "the resumed copy",
            c.handle(&msg, 2),
        )
        .await,
    );
    assert_eq!(r.checksum, sha256(&body));
    let sent = faults.parts_sent.load(Ordering::SeqCst);
    assert_eq!(sent, 5 - recorded, "only the missing parts were sent");
    assert_eq!(proxy.count("PUT", |t| t.contains("partNumber=")), sent);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
    assert_eq!(c.records().count("multipart_parts").await.unwrap(), 0);
    let got = storage::copy::hash_object(&tier, &tier.key("r/take.mov"), Algorithm::Sha256)
        .await
        .expect("read back")
        .expect("stored");
    assert_eq!(got.checksum, sha256(&body));
    println!(
        "| resumed 5-part upload | parts stored before the failure: {recorded} | parts sent on resume: {sent} |"
    );
}

/// An upload recorded for another file of the same size and mtime on the same key (two
/// roots holding one relative path) is not resumed: its object's metadata, written when it
/// was created, names that file (nearline's `original-path`). Nor is one recorded by an
/// earlier release, which did not say which file it was for.
#[tokio::test]
async fn an_upload_started_for_another_file_is_not_resumed() {
    let bucket = "tier-other-file";
    let (_moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let body = content(5 * 5 * MIB - 1000, 8);
    let msg = put(base.path(), "online", "r/twin.mov", &body);
    // A writer of its own (the records' pool only reads).
    db::sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", base.path().join("tier.db").display());
    let writer = db::sqlx::AnyPool::connect(&url).await.expect("writer");
    for recorded_for in [Some("/another/root/r/twin.mov"), None] {
        *faults.fail_parts_from.lock().expect("faults") = Some(2);
        transient(c.handle(&msg, 1).await);
        db::sqlx::query("UPDATE multipart_uploads SET source_path = $1")
            .bind(recorded_for)
            .execute(&writer)
            .await
            .expect("the upload named as another file's");
        *faults.fail_parts_from.lock().expect("faults") = None;
        faults.parts_sent.store(0, Ordering::SeqCst);
        let aborts = faults.aborts.load(Ordering::SeqCst);
        let r = copied(c.handle(&msg, 2).await);
        assert_eq!(r.checksum, sha256(&body));
        assert_eq!(
            faults.parts_sent.load(Ordering::SeqCst),
            5,
            "{recorded_for:?}: started over"
        );
        assert_eq!(faults.aborts.load(Ordering::SeqCst), aborts + 1);
        // The next round copies it again from nothing.
        tier.store
            .delete(&tier.key("r/twin.mov"))
            .await
            .expect("delete");
        db::sqlx::query("DELETE FROM stored_objects")
            .execute(&writer)
            .await
            .expect("forget");
        db::sqlx::query("DELETE FROM copied_files")
            .execute(&writer)
            .await
            .expect("forget");
    }
}

/// A recorded upload of an earlier version of the file that cannot be aborted (a blip) is
/// kept recorded (the sweep finds it later) and the copy retried: starting a new upload
/// would have replaced its record, leaving its parts billed with nothing left to find
/// them. One whose abort is not permitted at all is left to the bucket's lifecycle rule.
#[tokio::test]
async fn an_earlier_upload_that_cannot_be_aborted_stays_recorded_and_the_copy_is_retried() {
    let bucket = "tier-stale";
    let (_moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let msg = put(
        base.path(),
        "online",
        "r/stale.mov",
        &content(5 * 5 * MIB, 1),
    );
    *faults.fail_parts_from.lock().expect("faults") = Some(2);
    transient(c.handle(&msg, 1).await);
    let key = tier.key("r/stale.mov").to_string();
    let earlier = c
        .records()
        .upload_for(&key)
        .await
        .unwrap()
        .expect("recorded");
    // The file changes (another size): the recorded upload can never be resumed.
    *faults.fail_parts_from.lock().expect("faults") = None;
    let msg = put(
        base.path(),
        "online",
        "r/stale.mov",
        &content(5 * 5 * MIB + 7, 2),
    );
    faults.fail_abort.store(true, Ordering::SeqCst);
    let e = transient(c.handle(&msg, 2).await);
    assert!(e.contains("could not be aborted"), "{e}");
    let kept = c.records().upload_for(&key).await.unwrap().expect("kept");
    assert_eq!(
        kept.upload_id, earlier.upload_id,
        "still findable by the sweep"
    );
    // A passing 403 (a signature refused while keys rotate) is a blip too: kept.
    faults.fail_abort.store(false, Ordering::SeqCst);
    faults.refuse_abort_signature.store(true, Ordering::SeqCst);
    transient(c.handle(&msg, 3).await);
    let kept = c.records().upload_for(&key).await.unwrap().expect("kept");
    assert_eq!(kept.upload_id, earlier.upload_id);
    // So is a 401 (a credential expired or rotating): no refusal of the permission.
    faults.refuse_abort_signature.store(false, Ordering::SeqCst);
    faults.unauthenticated_abort.store(true, Ordering::SeqCst);
    transient(c.handle(&msg, 3).await);
    let kept = c.records().upload_for(&key).await.unwrap().expect("kept");
    assert_eq!(kept.upload_id, earlier.upload_id);
    faults.unauthenticated_abort.store(false, Ordering::SeqCst);
    // An abort never allowed (a role without the permission) is no blip: the upload is
    // left to the bucket's lifecycle rule and the copy goes on.
    faults.refuse_abort_signature.store(false, Ordering::SeqCst);
    faults.deny_abort.store(true, Ordering::SeqCst);
    copied(c.handle(&msg, 3).await);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// An object found holding the file's content and gone before its details are read (a
/// lifecycle expiry, an operator) is no copy to record: looked at again, the key is empty
/// and the file is uploaded. It was recorded, and reported copied ("uploaded": false),
/// with nothing at the key — a remover of backed-up files then deleted the only copy.
#[tokio::test]
async fn an_object_gone_between_its_checks_is_uploaded_not_recorded() {
    let bucket = "tier-gone-between";
    let (moto, proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let body = content(4096, 6);
    let msg = put(base.path(), "online", "g/gone.mov", &body);
    let key = c.tier().key("g/gone.mov");
    c.tier()
        .store
        .put(&key, body.clone().into())
        .await
        .expect("an identical object, unrecorded");
    // The key's first HEAD finds it; its download shows the same content; the second
    // HEAD (its details, to record) is held while the object goes.
    let held = proxy.hold_from("HEAD", |t| t.contains("g/gone.mov"), 2);
    let gone = async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while !held.reached() {
            assert!(tokio::time::Instant::now() < deadline, "the second HEAD");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            proxy
                .requests()
                .iter()
                .any(|r| r.starts_with("GET ") && r.contains("g/gone.mov")),
            "held after the object was read: {:?}",
            proxy.requests()
        );
        object_store::ObjectStore::delete(&plain_client(&moto, bucket), &key)
            .await
            .expect("gone");
        held.release();
    };
    let (r, ()) = tokio::join!(c.handle(&msg, 1), gone);
    let r = copied(r);
    assert!(r.uploaded, "{r:?}");
    assert_eq!(stored_sha256(c.tier(), &r.key).await, sha256(&body));
}

/// A recorded upload whose parts the store lists in a shape no upload can be resumed on
/// (a part without its size or ETag) is given up — aborted, forgotten — and the copy
/// starts over at once, instead of waiting as an outage for the same listing again.
#[tokio::test]
async fn an_upload_whose_parts_cannot_be_listed_usably_is_given_up_and_started_over() {
    let bucket = "tier-badlist";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let body = content(5 * 5 * MIB, 4);
    let msg = put(base.path(), "online", "r/listed.mov", &body);
    *faults.fail_parts_from.lock().expect("faults") = Some(2);
    transient(c.handle(&msg, 1).await);
    let key = tier.key("r/listed.mov").to_string();
    assert!(c.records().upload_for(&key).await.unwrap().is_some());
    *faults.fail_parts_from.lock().expect("faults") = None;
    proxy.answer_next(
        "GET",
        |t| t.contains("uploadId="),
        "200 OK",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListPartsResult>\
         <IsTruncated>false</IsTruncated><Part><PartNumber>1</PartNumber></Part>\
         </ListPartsResult>",
    );
    let aborts = faults.aborts.load(Ordering::SeqCst);
    let r = copied(c.handle(&msg, 2).await);
    assert!(r.uploaded);
    assert_eq!(faults.aborts.load(Ordering::SeqCst), aborts + 1, "given up");
    assert_eq!(stored_sha256(&tier, &r.key).await, sha256(&body));
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// An upload begun with checksums (`checksums = true`, the default) and interrupted is
/// not resumed once the store's `checksums` is turned off (nor the other way round): S3
/// completes no upload of parts of both modes, so every resumed attempt failed alike to
/// the DLQ. It is aborted and the copy starts over in the new mode.
#[tokio::test]
async fn an_upload_of_another_checksum_mode_is_started_over() {
    let bucket = "tier-checksum-mode";
    let (moto, proxy, on) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&on);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let body = content(3 * 5 * MIB + 5, 7);
    let msg = put(base.path(), "online", "r/mode.mov", &body);
    *faults.fail_parts_from.lock().expect("faults") = Some(2);
    transient(c.handle(&msg, 1).await);
    let key = on.key("r/mode.mov").to_string();
    let begun = c
        .records()
        .upload_for(&key)
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(begun.checksums, Some(true));

    let mut opts = moto.store_options();
    opts.endpoint = Some(proxy.endpoint.clone());
    opts.part_size_mib = 5;
    opts.part_memory_mib = 5;
    opts.checksums = false;
    let off = storage::store::open(&format!("s3://{bucket}/pre"), &opts).expect("tier");
    let (faulty, faults) = FaultyStore::wrap(&off);
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let created = || proxy.count("POST", |t| t.ends_with("?uploads="));
    assert_eq!(created(), 1);
    let r = copied(c.handle(&msg, 2).await);
    assert!(r.uploaded);
    assert_eq!(
        faults.aborts.load(Ordering::SeqCst),
        1,
        "the begun upload aborted"
    );
    assert_eq!(created(), 2, "a new upload, without checksums");
    assert_eq!(r.checksum, sha256(&body));
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// A completion the store refuses as a whole (400: here as S3 answers one whose parts
/// lack the checksums the upload was created with, after `checksums` changed between two
/// attempts) gives the upload up — aborted, forgotten — so that the retry uploads afresh
/// instead of sending the same refused completion until the message is dead-lettered.
#[tokio::test]
async fn a_completion_the_store_refuses_gives_the_upload_up() {
    refused_completion_gives_the_upload_up("tier-refusedcomplete", true).await;
}

/// The same through object_store's own completion (`conditional_writes = false`), which
/// was never given up: refused at every retry, to the DLQ, and again after a replay.
#[tokio::test]
async fn a_completion_refused_without_conditional_writes_gives_the_upload_up() {
    refused_completion_gives_the_upload_up("tier-refusedplain", false).await;
}

async fn refused_completion_gives_the_upload_up(bucket: &str, conditional_writes: bool) {
    let (_moto, proxy, tier) =
        s3_tier_with(bucket, |o| o.conditional_writes = conditional_writes).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let body = content(3 * 5 * MIB + 11, 6);
    let msg = put(base.path(), "online", "r/refused.mov", &body);
    let key = tier.key("r/refused.mov").to_string();
    proxy.answer_next(
        "POST",
        |t| t.contains("uploadId="),
        "400 Bad Request",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidRequest</Code>\
         <Message>The upload was created using a sha256 checksum. The complete request must \
         include the checksum for each part. It was missing for part 1 in the request.\
         </Message></Error>",
    );
    let e = transient(c.handle(&msg, 1).await);
    assert!(e.contains("400"), "{e}");
    assert_eq!(faults.aborts.load(Ordering::SeqCst), 1, "given up");
    assert!(
        c.records().upload_for(&key).await.unwrap().is_none(),
        "forgotten: the retry does not resume it"
    );
    let created = || proxy.count("POST", |t| t.ends_with("?uploads="));
    assert_eq!(created(), 1);
    let r = copied(c.handle(&msg, 2).await);
    assert!(r.uploaded);
    assert_eq!(created(), 2, "a new upload");
    assert_eq!(stored_sha256(&tier, &r.key).await, sha256(&body));
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// A completion answered 400 for the store's own trouble (`RequestTimeout`, an expired
/// token) is no refusal of the parts: the upload is kept, and the retry completes it
/// without sending a part again (given up, a 200 GiB file was sent whole once more).
#[tokio::test]
async fn a_completion_failed_by_the_stores_trouble_keeps_the_upload() {
    let bucket = "tier-completetimeout";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let body = content(3 * 5 * MIB + 11, 7);
    let msg = put(base.path(), "online", "r/timeout.mov", &body);
    let key = tier.key("r/timeout.mov").to_string();
    proxy.answer_next(
        "POST",
        |t| t.contains("uploadId="),
        "400 Bad Request",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>RequestTimeout</Code>\
         <Message>Your socket connection to the server was not read from or written to \
         within the timeout period.</Message></Error>",
    );
    let e = outage(c.handle(&msg, 1).await);
    assert!(e.contains("RequestTimeout"), "{e}");
    assert_eq!(faults.aborts.load(Ordering::SeqCst), 0, "not given up");
    assert!(
        c.records().upload_for(&key).await.unwrap().is_some(),
        "kept for the retry"
    );
    let parts = || proxy.count("PUT", |t| t.contains("partNumber="));
    let sent = parts();
    assert!(sent >= 3, "{sent} parts sent");
    let r = copied(c.handle(&msg, 2).await);
    assert!(r.uploaded);
    assert_eq!(parts(), sent, "no part sent again");
    assert_eq!(
        proxy.count("POST", |t| t.ends_with("?uploads=")),
        1,
        "no new upload"
    );
    assert_eq!(stored_sha256(&tier, &r.key).await, sha256(&body));
}

/// A file gone from online after its copy, while the store's bucket is not there (renamed,
/// re-created, a store restarted before its buckets): the copy cannot be seen, which does
/// not make the file lost — an outage's retry, not "does not exist" dead-lettered.
#[tokio::test]
async fn a_gone_file_is_retried_while_its_bucket_is_not_there() {
    let bucket = "tier-nobucket";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(
        base.path(),
        "online",
        tier.clone(),
        records(base.path()).await,
    );
    let msg = put(base.path(), "online", "g/gone.mov", b"gone soon");
    let r = copied(c.handle(&msg, 0).await);
    std::fs::remove_file(base.path().join("online/g/gone.mov")).expect("moved on");
    {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        let plain = plain_client(&moto, bucket);
        let all: Vec<_> = plain.list(None).try_collect().await.expect("listed");
        assert_eq!(all.len(), 1, "{all:?} for {}", r.key);
        plain.delete(&all[0].location).await.expect("emptied");
    }
    delete_bucket(&moto, bucket).await;
    let e = outage(c.handle(&msg, 1).await);
    assert!(e.contains("NoSuchBucket"), "{e}");
}

/// A file written to while it is uploaded (the sweeper reports files still being
/// written; an editor rewrites one in place): the upload stops at the first part read
/// after the change (not after sending all of the file, at every attempt while the writer
/// goes on), nothing is left at the key, nothing recorded — and a retry of the settled
/// file stores it whole under its own key, not beside a torn one.
#[tokio::test]
async fn a_source_written_to_during_an_s3_upload_leaves_nothing_at_its_key() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let bucket = "tier-changed";
    let (_moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let msg = put(
        base.path(),
        "online",
        "w/take.mov",
        &content(26 * MIB + 3, 5),
    );
    let path = base.path().join("online/w/take.mov");
    let key = tier.key("w/take.mov");
    let grow = {
        let p = path.clone();
        Box::new(move || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .expect("open");
            f.write_all(&[1u8; 1024]).expect("append");
        }) as Box<dyn FnOnce() + Send>
    };
    let rewrite = {
        let p = path.clone();
        Box::new(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open");
            f.write_all_at(b"edited", 10 * MIB as u64).expect("rewrite");
            f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
                .expect("touch");
        }) as Box<dyn FnOnce() + Send>
    };
    for (attempt, (how, hook)) in [("grown", grow), ("rewritten in place", rewrite)]
        .into_iter()
        .enumerate()
    {
        *faults.after_first_part.lock().expect("hook") = Some(hook);
        let before = faults.parts_sent.load(std::sync::atomic::Ordering::SeqCst);
        let e = transient(c.handle(&msg, attempt as u32 + 1).await);
        assert!(e.contains("changed while"), "{how}: {e}");
        // Room for one part at a time: the next part is read only once the first (and
        // the change after it) is done, and is not sent.
        assert_eq!(
            faults.parts_sent.load(std::sync::atomic::Ordering::SeqCst) - before,
            1,
            "{how}: 6 parts, only the first sent"
        );
        assert_eq!(
            storage::copy::object_size(&tier, &key).await.expect("head"),
            None,
            "{how}: nothing left at the key"
        );
    }
    let settled = std::fs::read(&path).expect("read");
    let r = copied(c.handle(&msg, 3).await);
    assert_eq!(r.key, "pre/w/take.mov");
    assert_eq!(r.checksum, sha256(&settled));
    assert_eq!(r.size, settled.len() as u64);
}

#[tokio::test]
async fn abandoned_s3_multipart_uploads_are_aborted_after_their_age() {
    let bucket = "tier-abandoned";
    let (_moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let msg = put(base.path(), "online", "a/gone.mov", &content(11 * MIB, 8));
    *faults.fail_parts_from.lock().expect("faults") = Some(1);
    transient(c.handle(&msg, 1).await);
    let u = c
        .records()
        .upload_for("pre/a/gone.mov")
        .await
        .expect("query")
        .expect("recorded");
    let s3 = tier.s3.as_ref().expect("s3");
    let key = tier.key("a/gone.mov");
    assert!(
        s3.list_parts(&key, &u.upload_id)
            .await
            .expect("list")
            .is_some()
    );

    // Younger than the age: kept.
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(c.abort_abandoned_uploads(hour).await.expect("sweep"), 0);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 1);
    // Older: aborted in the store and forgotten.
    assert_eq!(
        c.abort_abandoned_uploads(std::time::Duration::ZERO)
            .await
            .expect("sweep"),
        1
    );
    assert_eq!(faults.aborts.load(Ordering::SeqCst), 1);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
    assert_eq!(c.records().count("multipart_parts").await.unwrap(), 0);
    assert!(
        s3.list_parts(&key, &u.upload_id)
            .await
            .expect("list")
            .is_none(),
        "gone from the store"
    );

    // A record of an upload the store no longer holds (one completed whose record could
    // not be forgotten, the database out of reach): forgotten, not counted nor logged as
    // an abandoned upload aborted.
    c.records().start_upload(&u).await.expect("recorded again");
    assert_eq!(
        c.abort_abandoned_uploads(std::time::Duration::ZERO)
            .await
            .expect("sweep"),
        0,
        "nothing was abandoned"
    );
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// An object found at a file's key, read and found identical, then replaced before the
/// HEAD that gives its store facts (an outside writer): the facts of the replacement are
/// not recorded with the file's digest — they would vouch, at every later one-HEAD look,
/// for bytes never read. The key is looked at again, and the file stored beside what is
/// there now.
#[tokio::test]
async fn an_object_replaced_after_it_was_read_is_not_recorded_as_the_file() {
    use object_store::ObjectStore;
    let bucket = "tier-swapped";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let ours = content(64 * 1024, 6);
    let msg = put(base.path(), "online", "r/take.mov", &ours);
    let plain = plain_client(&moto, bucket);
    let key = object_store::path::Path::from("pre/r/take.mov");
    plain.put(&key, ours.clone().into()).await.expect("placed");
    let (entered, release) = faults.hold_next_get();
    let run = tokio::spawn(async move { c.handle(&msg, 1).await });
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the copy read the object at its key");
    let theirs = content(64 * 1024, 7);
    plain.put(&key, theirs.into()).await.expect("replaced");
    release.notify_one();
    let r = copied(joined(run).await.expect("ran"));
    assert_eq!(
        r.key,
        format!("pre/r/take.mov.{}", &sha256(&ours)[..16]),
        "stored beside what the key holds now"
    );
    assert_eq!(r.checksum, sha256(&ours));
}

/// A store answering `NoSuchBucket` (a restarting MinIO before its buckets are loaded, a
/// bucket re-created) does not make an interrupted upload "gone": its record and parts are
/// kept and the copy waits as an outage — forgotten, its parts stayed in the store with no
/// record to abort them by, and the copy started over once the bucket was back. (moto
/// deletes a bucket holding an unfinished upload, which S3 refuses: it stands here for a
/// store that has not loaded its buckets yet.)
#[tokio::test]
async fn an_interrupted_upload_is_kept_while_its_bucket_is_not_there() {
    let bucket = "tier-nobucket";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let msg = put(base.path(), "online", "b/take.mov", &content(11 * MIB, 4));
    *faults.fail_parts_from.lock().expect("faults") = Some(1);
    transient(c.handle(&msg, 1).await);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 1);
    *faults.fail_parts_from.lock().expect("faults") = None;
    delete_bucket(&moto, bucket).await;
    let e = outage(c.handle(&msg, 2).await);
    assert!(e.contains("NoSuchBucket"), "{e}");
    assert_eq!(
        c.records().count("multipart_uploads").await.unwrap(),
        1,
        "the upload's record is kept"
    );
    // Nor does the abandoned-upload sweep forget it.
    assert_eq!(
        c.abort_abandoned_uploads(std::time::Duration::ZERO)
            .await
            .expect("sweep"),
        0
    );
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 1);
}

/// An abandoned upload whose abort is never allowed (a role without
/// `s3:AbortMultipartUpload`) is forgotten, left to the bucket's lifecycle rule — and not
/// counted nor logged as aborted: its parts are still billed.
#[tokio::test]
async fn an_abandoned_upload_not_allowed_to_be_aborted_is_not_counted_aborted() {
    let bucket = "tier-abort-denied";
    let (_moto, _proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", faulty, records(base.path()).await);
    let msg = put(base.path(), "online", "d/denied.mov", &content(11 * MIB, 9));
    *faults.fail_parts_from.lock().expect("faults") = Some(1);
    transient(c.handle(&msg, 1).await);
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 1);
    faults.deny_abort.store(true, Ordering::SeqCst);
    assert_eq!(
        c.abort_abandoned_uploads(std::time::Duration::ZERO)
            .await
            .expect("sweep"),
        0,
        "nothing was aborted"
    );
    assert_eq!(c.records().count("multipart_uploads").await.unwrap(), 0);
}

/// Multipart uploads of `names` interrupted after their first part (a copier through a
/// faulty store on `bucket`), and a writer on the copier's records (their pool only reads)
/// to age them; the returned server, proxy and directory live as long as the test needs.
struct Interrupted {
    _moto: MotoServer,
    _proxy: CountingProxy,
    _base: tempfile::TempDir,
    c: Arc<TierCopier>,
    faults: Arc<storage::testing::Faults>,
    pool: db::sqlx::AnyPool,
}

async fn interrupted_uploads(bucket: &str, names: &[&str]) -> Interrupted {
    let (moto, proxy, tier) = s3_tier(bucket).await;
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let base = tempfile::tempdir().expect("temp");
    let c = Arc::new(copier(
        base.path(),
        "online",
        faulty,
        records(base.path()).await,
    ));
    for name in names {
        let msg = put(base.path(), "online", name, &content(11 * MIB, 8));
        *faults.fail_parts_from.lock().expect("faults") = Some(1);
        transient(c.handle(&msg, 1).await);
    }
    db::sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", base.path().join("tier.db").display());
    let pool = db::sqlx::AnyPool::connect(&url).await.expect("writer");
    Interrupted {
        _moto: moto,
        _proxy: proxy,
        _base: base,
        c,
        faults,
        pool,
    }
}

/// Runs the abandoned-upload sweep (uploads untouched for an hour) on a task of its own,
/// its first abort held until the returned release is notified; returns once it is held.
async fn sweep_held_at_first_abort(
    run: &Interrupted,
) -> (
    tokio::task::JoinHandle<Result<usize, TierError>>,
    Arc<tokio::sync::Notify>,
) {
    let (entered, release) = run.faults.hold_next_abort();
    let c = run.c.clone();
    let sweep = tokio::spawn(async move {
        c.abort_abandoned_uploads(std::time::Duration::from_secs(3600))
            .await
    });
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the sweep reached the held abort");
    (sweep, release)
}

/// The abandoned-upload sweep reads its list once, then aborts one upload after another
/// (a store call each): an upload a copy resumed meanwhile (a part stored, then the copy
/// stopped and let its claim go) is no longer abandoned and is kept, not aborted from
/// under the next attempt, which would start the whole file over.
#[tokio::test]
async fn an_upload_resumed_while_the_sweep_runs_is_not_aborted() {
    // Held whole: its server and directory live as long as the test.
    let run = interrupted_uploads("tier-sweep-race", &["a/first.mov", "a/second.mov"]).await;
    let (c, pool) = (&run.c, &run.pool);
    // Both untouched for two hours, the first longer (the sweep's list is oldest first).
    for (key, hours) in [("pre/a/first.mov", 3), ("pre/a/second.mov", 2)] {
        db::sqlx::query(
            "UPDATE multipart_uploads SET touched_at = touched_at - $1 WHERE object_key = $2",
        )
        .bind(hours * 3_600_000i64)
        .bind(key)
        .execute(pool)
        .await
        .expect("aged");
    }
    let (sweep, release) = sweep_held_at_first_abort(&run).await;
    // While the first is being aborted, a copy stores a part of the second.
    db::sqlx::query(
        "UPDATE multipart_uploads SET touched_at = touched_at + $1 WHERE object_key = $2",
    )
    .bind(2 * 3_600_000i64)
    .bind("pre/a/second.mov")
    .execute(pool)
    .await
    .expect("touched");
    release.notify_one();
    assert_eq!(joined(sweep).await.expect("sweep").expect("swept"), 1);
    assert!(
        c.records()
            .upload_for("pre/a/second.mov")
            .await
            .expect("query")
            .is_some(),
        "the resumed upload is kept"
    );
    assert!(
        c.records()
            .upload_for("pre/a/first.mov")
            .await
            .expect("query")
            .is_none()
    );
}

/// An abort the store is slow to answer (longer than a claim's 20 s lease) keeps its key
/// claimed throughout, as a copy keeps its own: a redelivered copy cannot take the key and
/// resume the upload the abort then removes under it (one counted retry, "not found", and
/// the resumed work lost).
#[tokio::test]
async fn a_slow_abort_keeps_its_key_claimed() {
    // Held whole: its server and directory live as long as the test.
    let run = interrupted_uploads("tier-slow-abort", &["a/slow.mov"]).await;
    let (c, pool) = (&run.c, &run.pool);
    db::sqlx::query("UPDATE multipart_uploads SET touched_at = touched_at - $1")
        .bind(3 * 3_600_000i64)
        .execute(pool)
        .await
        .expect("aged");
    let (sweep, release) = sweep_held_at_first_abort(&run).await;
    // The fault itself: the store answers the abort only after the lease would have run out.
    tokio::time::sleep(std::time::Duration::from_secs(25)).await;
    let lease = std::time::Duration::from_secs(20);
    assert!(
        !c.records()
            .claim("pre/a/slow.mov", "a redelivered copy", lease)
            .await
            .expect("claim"),
        "the key is still claimed by the abort"
    );
    release.notify_one();
    assert_eq!(joined(sweep).await.expect("sweep").expect("swept"), 1);
}

#[tokio::test]
async fn concurrent_claims_and_records_are_group_committed_each_answered_truthfully() {
    use std::time::Duration;
    let base = tempfile::tempdir().expect("temp");
    let recs = records(base.path()).await;
    let lease = Duration::from_secs(20);
    // Many handlers at once: each claims its key, records its copy (giving the claim up
    // in the same commit); a rival's claim on a held key is refused meanwhile.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let r = recs.clone();
        tasks.spawn(async move {
            let key = format!("k/{i}");
            let owner = format!("owner-{i}");
            assert!(
                r.claim(&key, &owner, lease).await.expect("claim"),
                "{key} free"
            );
            assert!(
                !r.claim(&key, "rival", lease).await.expect("rival claim"),
                "{key} is held"
            );
            let obj = storage::records::StoredObject {
                object_key: key.clone(),
                size: i,
                checksum: format!("sum-{i}"),
                content_sha256: None,
                store: Default::default(),
            };
            r.record_copy_releasing(
                &obj,
                "sha256",
                &format!("/on/{i}"),
                "m",
                None,
                Some((&key, &owner)),
            )
            .await
            .expect("record");
            // Recorded before the answer: visible to any reader now.
            assert_eq!(
                r.copies_of(&format!("/on/{i}"), i, "m")
                    .await
                    .expect("read")
                    .into_iter()
                    .map(|e| e.object)
                    .collect::<Vec<_>>(),
                [obj]
            );
            // The claim went with the record; a late renewal does not bring it back.
            assert!(!r.renew(&key, &owner, lease).await.expect("renew"));
            assert!(
                r.claim(&key, "next", lease).await.expect("claim again"),
                "{key} released"
            );
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.expect("handler");
    }
    assert_eq!(recs.count("stored_objects").await.expect("count"), 64);
    assert_eq!(recs.count("copied_files").await.expect("count"), 64);
}

/// What S3 cannot take is said plainly instead of failing every retry: a key over its
/// 1,024 bytes is permanent; an original path too long for its 2 KB of metadata (a
/// non-ASCII path triples when encoded) is left out of the metadata, the copy made.
#[tokio::test]
async fn s3_limits_on_keys_and_metadata_never_loop_through_retries() {
    let bucket = "tier-limits";
    let (_moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = TierCopier::new(
        open_roots(&[base.path().join("online")], true).expect("roots"),
        tier.clone(),
        records(base.path()).await,
        TierPolicy {
            keep_metadata: true,
            ..policy()
        },
    );
    // 5 directories of 250 bytes: a key of over 1,250 bytes.
    let long: Vec<String> = (0..5).map(|i| format!("{i}{}", "d".repeat(249))).collect();
    let msg = put(
        base.path(),
        "online",
        &format!("{}/f.mov", long.join("/")),
        b"x",
    );
    match c.handle(&msg, 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("1024"), "{e}"),
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    // 3 directories of 80 CJK characters (240 bytes each, 720 encoded).
    let cjk: Vec<String> = (0..3).map(|_| "映".repeat(80)).collect();
    let rel = format!("{}/f.mov", cjk.join("/"));
    let msg = put(base.path(), "online", &rel, b"kept");
    let r = copied(c.handle(&msg, 1).await);
    let got =
        object_store::ObjectStore::get(tier.store.as_ref(), &storage::store::object_path(&r.key))
            .await
            .expect("stored");
    let meta: Vec<String> = got
        .attributes
        .iter()
        .filter_map(|(k, _)| match k {
            object_store::Attribute::Metadata(m) => Some(m.to_string()),
            _ => None,
        })
        .collect();
    assert!(meta.contains(&"size".to_string()), "{meta:?}");
    assert!(!meta.contains(&"original-path".to_string()), "{meta:?}");

    // A key of 1,016 bytes (the prefix `pre/` included) whose sibling would be 1,033: its
    // name is shortened so the key fits.
    let dirs = (0..4)
        .map(|_| "d".repeat(249))
        .collect::<Vec<_>>()
        .join("/");
    let rel = format!("{dirs}/take-one.mov");
    let v1 = put(base.path(), "online", &rel, b"first take");
    assert_eq!(copied(c.handle(&v1, 1).await).key.len(), 1016);
    let v2 = put(base.path(), "online", &rel, b"second take");
    let r = copied(c.handle(&v2, 1).await);
    let tag = &sha256(b"second take")[..16];
    assert_eq!(r.key, format!("pre/{dirs}/tak.{tag}"));
    assert!(r.uploaded, "{r:?}");
    let again = copied(c.handle(&v2, 2).await);
    assert_eq!(again.key, r.key);
    assert!(!again.uploaded, "{again:?}");
}

/// Each name of `key` as a local store holds it, within the filesystem's limit.
fn names_fit(key: &str) {
    for name in key.split('/') {
        assert!(name.len() <= 255, "{} bytes: {name}", name.len());
    }
}

/// A name near the filesystem's limit whose key holds an earlier version: the new
/// version is stored beside it under a name shortened to fit (cut between characters),
/// and found there again when its message comes again.
#[tokio::test]
async fn a_new_version_of_a_long_named_file_is_stored_beside_the_first() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let rel = format!("long3/{}.mo", "映".repeat(83));
    let first = put(base.path(), "online", &rel, b"version one");
    let r1 = copied(c.handle(&first, 1).await);
    assert_eq!(r1.key, rel);
    let second = put(base.path(), "online", &rel, b"the second version");
    let r2 = copied(c.handle(&second, 1).await);
    assert!(r2.uploaded, "{r2:?}");
    assert_ne!(r2.key, r1.key);
    names_fit(&r2.key);
    let tag = &sha256(b"the second version")[..16];
    assert!(r2.key.ends_with(&format!(".{tag}")), "{r2:?}");
    assert_eq!(
        std::fs::read(store_dir.join(&r2.key)).expect("stored"),
        b"the second version"
    );
    assert_eq!(
        std::fs::read(store_dir.join(&r1.key)).expect("kept"),
        b"version one"
    );
    let again = copied(c.handle(&second, 2).await);
    assert_eq!(again.key, r2.key);
    assert!(!again.uploaded, "{again:?}");
    assert_eq!(files_under(&store_dir).len(), 2, "no third object");
}

/// A name that fits its filesystem but not once its control characters are encoded is
/// stored on its first attempt under a shortened name, and found there again.
#[tokio::test]
async fn a_name_too_long_once_encoded_is_stored_at_once() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let rel = format!("ctl/{}{}.mov", "c".repeat(240), "\r".repeat(7));
    let msg = put(base.path(), "online", &rel, b"icon-ish");
    let r = copied(c.handle(&msg, 1).await);
    assert!(r.uploaded, "{r:?}");
    assert!(
        r.key.starts_with(&format!("ctl/{}", "c".repeat(238))),
        "{r:?}"
    );
    names_fit(&r.key);
    assert_eq!(
        std::fs::read(store_dir.join(&r.key)).expect("stored"),
        b"icon-ish"
    );
    let again = copied(c.handle(&msg, 2).await);
    assert_eq!(again.key, r.key);
    assert!(!again.uploaded, "{again:?}");
    assert_eq!(files_under(&store_dir), vec![r.key.clone()]);
}

/// A key whose object was lost and then stored again with other content (another root's
/// file at the same path) is no longer a copy of the file first recorded there: that
/// file's redelivery copies it again, beside the new object, instead of reporting the
/// other content as its copy.
#[tokio::test]
async fn a_key_reused_for_other_content_is_no_copy_of_the_first_file() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let roots =
        open_roots(&[base.path().join("nas1"), base.path().join("nas2")], true).expect("roots");
    let c = TierCopier::new(roots, tier, records(base.path()).await, policy());
    // Over 1 MiB, so the copy's records are looked up first (not the small-file path).
    let (x, y) = (content(2 * MIB, 1), content(2 * MIB, 2));
    let first = put(base.path(), "nas1", "p/a.bin", &x);
    assert_eq!(copied(c.handle(&first, 1).await).key, "p/a.bin");
    std::fs::remove_file(store_dir.join("p/a.bin")).expect("the object is lost");
    put(base.path(), "nas2", "p/a.bin", &y);
    // Named absolutely: a relative path is looked for in each root in turn.
    let nas2 = base.path().join("nas2/p").display().to_string();
    let second: AssetSweeperFile = message(&nas2, "a.bin");
    assert_eq!(copied(c.handle(&second, 1).await).key, "p/a.bin");
    let again = copied(c.handle(&first, 2).await);
    assert_eq!(again.checksum, sha256(&x), "{again:?}");
    assert!(again.uploaded, "{again:?}");
    assert_eq!(
        std::fs::read(store_dir.join(&again.key)).expect("stored"),
        x
    );
    assert_eq!(std::fs::read(store_dir.join("p/a.bin")).expect("kept"), y);
}

/// A share not mounted leaves its mount point, an empty directory, as the root: a file
/// missing there is a retry (the share comes back), not a dead letter like every other
/// file of the share; a file missing from a root with files in it is permanent.
#[tokio::test]
async fn a_missing_file_under_an_empty_root_is_retried_not_dead_lettered() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let roots =
        open_roots(&[base.path().join("nas1"), base.path().join("nas2")], true).expect("roots");
    let c = TierCopier::new(roots, tier, records(base.path()).await, policy());
    put(base.path(), "nas1", "p/here.bin", b"here");
    let at = |root: &str, name: &str| -> AssetSweeperFile {
        let dir = base.path().join(root).join("p").display().to_string();
        message(&dir, name)
    };
    let e = outage(c.handle(&at("nas2", "a.bin"), 1).await);
    assert!(e.contains("is empty"), "{e}");
    // Mounted: the same message copies.
    put(base.path(), "nas2", "p/a.bin", b"mounted");
    assert!(copied(c.handle(&at("nas2", "a.bin"), 2).await).uploaded);
    // Every root has files: a missing one is missing.
    match c.handle(&at("nas1", "gone.bin"), 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("does not exist"), "{e}"),
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

/// A claim whose renewal never answers (its row locked by another session, as a hung
/// database connection leaves it) is given up before its lease ends: the copy stops with
/// "lost the upload claim" while the row is still locked, instead of running on while
/// another instance may take the key once the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_renewal_never_answers_stops_the_copy() {
    use db::sqlx::Connection as _;
    let pg = db::testing::TempPostgres::create().await.expect("database");
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let (faulty, faults) = FaultyStore::wrap(&tier);
    let recs = Records::open(&pg.url).await.expect("records");
    let c = copier(base.path(), "a", faulty, recs.clone());
    let msg = put(base.path(), "a", "show/held.mov", b"held in the middle");
    let (entered, release) = faults.hold_next_upload();
    let run = tokio::spawn(async move { c.handle(&msg, 1).await });
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the copy reached the held upload");
    let mut locker = db::sqlx::AnyConnection::connect(&pg.url)
        .await
        .expect("another session");
    let mut tx = locker.begin().await.expect("begin");
    db::sqlx::query(
        "SELECT owner FROM upload_claims WHERE object_key = 'show/held.mov' FOR UPDATE",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("the copy's claim row, locked");
    // Bounded only so a regression fails instead of hanging: the old code waited on the
    // lock for as long as it was held.
    let r = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the copy stopped while its claim's row was locked")
        .expect("ran");
    let e = outage(r);
    assert!(e.contains("lost the upload claim"), "{e}");
    tx.rollback().await.expect("rollback");
    release.notify_one();
    drop(locker);
    recs.close().await;
    pg.drop_db().await.expect("drop");
}

/// A nearline copy that loses its claim on the file's content (the database does not
/// answer its renewal within the lease: a failover, a row lock held by a stalled session)
/// goes on to the end: the claim only keeps one content from being stored twice at once,
/// and a second object of it is the worst that can follow. Stopped, the copy started again
/// from nothing at its retry — every large copy in flight, at every stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearline_copy_that_loses_its_content_claim_goes_on() {
    use db::sqlx::Connection as _;
    let pg = db::testing::TempPostgres::create().await.expect("database");
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let recs = Records::open(&pg.url).await.expect("records");
    let c = nearline(base.path(), tier, recs.clone());
    let body = content(2 * MIB, 9);
    let msg = put(base.path(), "online", "show/long.mov", &body);
    let (entered, release) = storage::testing::hold_local_copy("show/long.mov");
    let run = tokio::spawn(async move { c.handle(&msg, 1).await });
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the copy is under way");
    let mut locker = db::sqlx::AnyConnection::connect(&pg.url)
        .await
        .expect("another session");
    let mut tx = locker.begin().await.expect("begin");
    db::sqlx::query(
        "SELECT owner FROM upload_claims WHERE object_key LIKE '/identical/%' FOR UPDATE",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("the content's claim row, locked");
    // Past its lease by the database's clock: the copy gave the claim up before then.
    let expired = "SELECT count(*) FROM upload_claims WHERE object_key LIKE '/identical/%' \
                   AND expires_at < (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";
    let deadline = tokio::time::Instant::now() + framework::testing::WAIT;
    while db::sqlx::query_scalar::<_, i64>(expired)
        .fetch_one(&mut *tx)
        .await
        .expect("lease")
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim's lease ran out"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    if run.is_finished() {
        panic!("the copy stopped with its claim: {:?}", run.await);
    }
    tx.rollback().await.expect("rollback");
    drop(locker);
    release.send(()).expect("released");
    let r = tokio::time::timeout(framework::testing::WAIT, run)
        .await
        .expect("the copy ended")
        .expect("ran");
    let r = copied(r);
    assert!(r.uploaded, "{r:?}");
    assert_eq!(held(&store_dir, &r.key), body);
    recs.close().await;
    pg.drop_db().await.expect("drop");
}

/// Replicas starting together: one migrating (here: another session holding sqlx's
/// migration lock) for longer than the lock timeout ordinary statements get. The others
/// wait for it, instead of failing at start-up over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_waits_out_another_ones_long_migration() {
    use db::sqlx::Connection as _;
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let pg = db::testing::TempPostgres::create().await.expect("database");
    let name = pg
        .url
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_string();
    // sqlx's migration lock of this database (sqlx-postgres `generate_lock_id`).
    let lock = 0x3d32_ad9e_i64 * i64::from(crc32(name.as_bytes()));
    let mut locker = db::sqlx::AnyConnection::connect(&pg.url)
        .await
        .expect("another session");
    db::sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(lock)
        .execute(&mut locker)
        .await
        .expect("the migration lock, held");
    let url = pg.url.clone();
    let opening = tokio::spawn(async move { Records::open(&url).await });
    // In this test's database only: other tests' migrations wait for locks of their own.
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let deadline = tokio::time::Instant::now() + framework::testing::WAIT;
    while db::sqlx::query_scalar::<_, i64>(waiting)
        .fetch_one(&mut locker)
        .await
        .expect("pg_locks")
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the opener waits for the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The fault itself: a migration longer than the 10 s lock timeout.
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert!(
        !opening.is_finished(),
        "still waiting for the migration, not failed"
    );
    db::sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock)
        .execute(&mut locker)
        .await
        .expect("unlocked");
    let recs = tokio::time::timeout(framework::testing::WAIT, opening)
        .await
        .expect("opened once the lock was free")
        .expect("ran")
        .expect("migrated");
    recs.close().await;
    drop(locker);
    pg.drop_db().await.expect("drop");
}

/// Claim rows held locked by another session inside an open transaction, as a replica
/// paused (or cut off) mid-transaction holds them, until [`ClaimRowsLocked::release`].
struct ClaimRowsLocked(db::sqlx::AnyConnection);

impl ClaimRowsLocked {
    /// Locks the claim rows of `keys` (`FOR UPDATE`) from a session of its own.
    async fn by_another_session(url: &str, keys: &[&str]) -> Self {
        use db::sqlx::Connection as _;
        let mut c = db::sqlx::AnyConnection::connect(url)
            .await
            .expect("another session");
        db::sqlx::raw_sql("BEGIN")
            .execute(&mut c)
            .await
            .expect("begin");
        let listed = keys
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = db::sqlx::query(&format!(
            "SELECT owner FROM upload_claims WHERE object_key IN ({listed}) FOR UPDATE"
        ))
        .fetch_all(&mut c)
        .await
        .expect("the claim rows, locked");
        assert_eq!(rows.len(), keys.len(), "every row to lock exists");
        Self(c)
    }

    /// Ends the transaction, freeing the rows.
    async fn release(mut self) {
        db::sqlx::raw_sql("ROLLBACK")
            .execute(&mut self.0)
            .await
            .expect("rollback");
    }
}

/// A row another session holds locked (a replica paused or cut off inside a transaction)
/// fails the write waiting on it after PostgreSQL's lock timeout — an error, so a retry —
/// and the writes of other keys go on, instead of all of them hanging behind it for as
/// long as the other transaction lives (hours, until a keepalive notices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_locked_by_a_paused_replica_fails_one_write_not_all() {
    let pg = db::testing::TempPostgres::create().await.expect("database");
    let recs = Records::open(&pg.url).await.expect("records");
    let lease = std::time::Duration::from_secs(600);
    assert!(recs.claim("k", "a", lease).await.expect("claim"));
    let locker = ClaimRowsLocked::by_another_session(&pg.url, &["k"]).await;
    let waiting = tokio::spawn({
        let recs = recs.clone();
        async move { recs.claim("k", "b", lease).await }
    });
    // Bounded only so a regression fails instead of hanging.
    let budget = std::time::Duration::from_secs(120);
    let other = tokio::time::timeout(budget, recs.claim("j", "c", lease))
        .await
        .expect("another key's write is not held behind the lock")
        .expect("another key's write succeeds");
    assert!(other);
    let r = tokio::time::timeout(budget, waiting)
        .await
        .expect("the write waiting on the lock ends")
        .expect("ran");
    assert!(r.is_err(), "the lock wait ended as an error: {r:?}");
    locker.release().await;
    recs.close().await;
    pg.drop_db().await.expect("drop");
}

/// Two replicas on one PostgreSQL database (two pools, two committers) claiming the same
/// keys at once: exactly one gets each, and neither takes the other's live claim — the
/// claim upsert between sessions, which tests over one `Records` (one committer, one
/// transaction ordering both) never reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_claiming_one_key_at_once_get_it_once() {
    let pg = db::testing::TempPostgres::create().await.expect("database");
    let a = Records::open(&pg.url).await.expect("replica a");
    let b = Records::open(&pg.url).await.expect("replica b");
    let lease = std::time::Duration::from_secs(600);
    for round in 0..200 {
        let key = format!("show/ep{round}.mov");
        let (ra, rb) = tokio::join!(a.claim(&key, "a", lease), b.claim(&key, "b", lease));
        let (ra, rb) = (ra.expect("a's claim"), rb.expect("b's claim"));
        assert!(ra != rb, "round {round}: a {ra}, b {rb}");
        // Asked again, the owner keeps it and the other still cannot take it.
        let (winner, loser, w, l) = if ra {
            (&a, &b, "a", "b")
        } else {
            (&b, &a, "b", "a")
        };
        assert!(winner.renew(&key, w, lease).await.expect("renewal"));
        assert!(!loser.claim(&key, l, lease).await.expect("claim again"));
    }
    a.close().await;
    b.close().await;
    pg.drop_db().await.expect("drop");
}

/// A claim renewal is not held up behind a write waiting on a row another replica locked
/// (a replica paused mid-transaction, whose redelivered keys this one claims): queued
/// behind it, the renewal waited out that write's lock timeout, past what its lease lets
/// it take, and every S3 copy of the healthy replica gave up its claim and its parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_renewal_does_not_wait_behind_a_locked_row() {
    use db::sqlx::Connection as _;
    let pg = db::testing::TempPostgres::create().await.expect("database");
    let recs = Records::open(&pg.url).await.expect("records");
    let lease = std::time::Duration::from_secs(600);
    assert!(recs.claim("held", "paused", lease).await.expect("claim"));
    assert!(recs.claim("mine", "me", lease).await.expect("claim"));
    assert!(recs.claim("also-mine", "me", lease).await.expect("claim"));
    // `held`, and one of this replica's own claims (as another replica's claim of it
    // locks it while it looks).
    let locker = ClaimRowsLocked::by_another_session(&pg.url, &["held", "also-mine"]).await;
    let mut waiting = tokio::spawn({
        let recs = recs.clone();
        async move { recs.claim("held", "me", lease).await }
    });
    // The claim's write is waiting on the lock.
    let mut check = db::sqlx::AnyConnection::connect(&pg.url)
        .await
        .expect("a third session");
    let deadline = tokio::time::Instant::now() + framework::testing::WAIT;
    while db::sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&mut check)
    .await
    .expect("activity")
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim never waited on the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::select! {
        biased;
        renewed = recs.renew("mine", "me", lease) => {
            assert!(renewed.expect("renewed"), "the claim is still mine");
        }
        r = &mut waiting => panic!("the renewal waited for the blocked claim: {r:?}"),
    }
    // A renewal whose own row is locked fails alone, and not after the whole lock timeout
    // (the other renewals queued behind it waited that long): the next renewal goes on
    // before the claim above gives up.
    let blocked_renewal = tokio::spawn({
        let recs = recs.clone();
        async move { recs.renew("also-mine", "me", lease).await }
    });
    tokio::select! {
        biased;
        r = async {
            let blocked = blocked_renewal.await.expect("ran");
            (blocked, recs.renew("mine", "me", lease).await)
        } => {
            assert!(r.0.is_err(), "the locked row's renewal fails: {:?}", r.0);
            assert!(r.1.expect("renewed"), "the claim is still mine");
        }
        r = &mut waiting => panic!("the renewals waited out the lock timeout: {r:?}"),
    }
    locker.release().await;
    let _ = waiting.await;
    drop(check);
    recs.close().await;
    pg.drop_db().await.expect("drop");
}

/// A file replaced by other content of the same size with its modification time kept
/// (`cp -p`, `rsync -t`) is not the file copied before: its redelivery copies it (beside
/// the earlier object, which holds other content) instead of reporting the earlier copy.
#[tokio::test]
async fn a_file_replaced_with_its_size_and_time_kept_is_copied_again() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "a", tier, records(base.path()).await);
    // Above the size a local store copies without looking up earlier copies.
    let first = content(3 << 20, 1);
    let msg = put(base.path(), "a", "show/ep.mov", &first);
    let r1 = copied(c.handle(&msg, 1).await);
    assert_eq!(r1.checksum, sha256(&first));
    let path = base.path().join("a/show/ep.mov");
    let mtime = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let second = content(3 << 20, 2);
    std::fs::write(&path, &second).expect("replace");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(mtime))
        .expect("time kept");
    let r2 = copied(c.handle(&msg, 1).await);
    assert_eq!(r2.checksum, sha256(&second), "{r2:?}");
    assert_ne!(r2.key, r1.key, "never over the earlier object");
    assert_eq!(
        std::fs::read(store_dir.join(&r2.key)).expect("stored"),
        second
    );
    assert_eq!(std::fs::read(store_dir.join(&r1.key)).expect("kept"), first);
}

/// A file missing under its root is Permanent even when another configured root is
/// empty: only an empty root the path could be under looks like a share not mounted.
#[tokio::test]
async fn a_missing_file_is_not_blamed_on_another_empty_root() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let full = base.path().join("full");
    let spare = base.path().join("spare");
    std::fs::create_dir_all(full.join("p")).expect("dir");
    std::fs::write(full.join("p/there.mov"), b"x").expect("file");
    std::fs::create_dir_all(&spare).expect("dir");
    let roots = open_roots(&[full.clone(), spare.clone()], true).expect("roots");
    let c = TierCopier::new(roots, tier, records(base.path()).await, policy());
    let missing = format!("{}/p", full.display());
    let msg: AssetSweeperFile = message(&missing, "gone.mov");
    match c.handle(&msg, 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("gone.mov"), "{e}"),
        other => panic!("expected Permanent, got {other:?}"),
    }
    // Under the empty root itself it is still a share that may not be mounted.
    let unmounted = format!("{}/p", spare.display());
    let msg: AssetSweeperFile = message(&unmounted, "x.mov");
    assert!(transient(c.handle(&msg, 1).await).contains("empty"));
    // A relative path that climbs out of every root is under none of them, the empty one
    // included: refused at once, not retried as an outage for up to `max_outage_ms`.
    for climbing in ["../../etc", "p/../../.."] {
        let msg: AssetSweeperFile = message(climbing, "passwd");
        match c.handle(&msg, 1).await {
            Err(TierError::Permanent(e)) => assert!(e.contains("passwd"), "{climbing}: {e}"),
            other => panic!("{climbing}: expected Permanent, got {other:?}"),
        }
    }
}

/// A root below its share's mount point (`/mnt/share/Media`, the share mounted at
/// `/mnt/share`) is gone while the share is away: its files are retried as an outage, not
/// dead-lettered one by one as "does not exist".
#[tokio::test]
async fn a_root_gone_with_its_share_is_an_outage() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    // The mount point, and the share's tree mounted on it (moved away: unmounted).
    let mount_point = base.path().join("mnt/share");
    let root = mount_point.join("Media");
    std::fs::create_dir_all(root.join("p")).expect("dir");
    std::fs::write(root.join("p/take.mov"), b"x").expect("file");
    let roots = open_roots(std::slice::from_ref(&root), true).expect("roots");
    let c = TierCopier::new(roots, tier, records(base.path()).await, policy());
    let msg: AssetSweeperFile = message(&format!("{}/p", root.display()), "take.mov");
    let away = base.path().join("share-tree");
    std::fs::rename(&root, &away).expect("unmounted");
    let e = outage(c.handle(&msg, 1).await);
    assert!(e.contains("gone"), "{e}");
    // Relative to the root too.
    let relative: AssetSweeperFile = message("p", "take.mov");
    outage(c.handle(&relative, 1).await);
    std::fs::rename(&away, &root).expect("mounted again");
    assert_eq!(copied(c.handle(&relative, 2).await).checksum, sha256(b"x"));
    // A root removed from a directory that still holds other things is gone, not away:
    // its files are missing.
    std::fs::write(mount_point.join("other"), b"o").expect("file");
    std::fs::rename(&root, &away).expect("removed");
    let never: AssetSweeperFile = message(&format!("{}/p", root.display()), "never.mov");
    match c.handle(&never, 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("never.mov"), "{e}"),
        other => panic!("expected Permanent, got {other:?}"),
    }
}

/// A root on a share an automounter mounts (`/mnt/auto/share/Media`): while the share is
/// away its directory is gone too, and the nearest one still there lists the other
/// shares — on another device than the root was: an outage, not a dead letter per file.
/// (Mounts a tmpfs: the suite runs as root.)
#[tokio::test]
async fn a_root_whose_automounted_share_went_is_an_outage() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let auto = base.path().join("auto");
    let share = auto.join("share");
    std::fs::create_dir_all(&share).expect("dir");
    std::fs::create_dir_all(auto.join("other-share")).expect("dir");
    let mounted = Mounted::at(&share);
    let root = share.join("Media");
    std::fs::create_dir_all(root.join("p")).expect("dir");
    let roots = open_roots(std::slice::from_ref(&root), true).expect("roots");
    let c = TierCopier::new(roots, tier, records(base.path()).await, policy());
    drop(mounted);
    std::fs::remove_dir(&share).expect("the automounter's directory goes");
    let msg: AssetSweeperFile = message(&format!("{}/p", root.display()), "take.mov");
    let e = outage(c.handle(&msg, 1).await);
    assert!(e.contains("gone"), "{e}");
}

/// A relative name that one root holds no file under (a directory there) while another
/// root the name can be under is empty — a share not mounted — is retried, not
/// dead-lettered as "not a regular file": the share, once back, may hold the file; with
/// no empty root it is still permanent.
#[tokio::test]
async fn a_name_that_is_no_file_in_one_root_waits_for_an_unmounted_other() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let full = base.path().join("full");
    let spare = base.path().join("spare");
    std::fs::create_dir_all(full.join("p/dir.mov")).expect("dir");
    std::fs::create_dir_all(&spare).expect("dir");
    let roots = open_roots(&[full.clone(), spare.clone()], true).expect("roots");
    let c = TierCopier::new(roots, tier, records(base.path()).await, policy());
    let msg: AssetSweeperFile = message("p", "dir.mov");
    assert!(transient(c.handle(&msg, 1).await).contains("empty"));
    std::fs::write(spare.join("other"), b"mounted").expect("the share is back");
    match c.handle(&msg, 2).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("dir.mov"), "{e}"),
        other => panic!("expected Permanent, got {other:?}"),
    }
}

/// A file copied, then moved away before its message came again (a lost ack: whoever
/// acted on the success message moved it; or a dead letter replayed after an operator
/// tidied up) is reported as its recorded copy, not dead-lettered — only the copy of the
/// file as the sweeper saw it (size and mtime), and only while the object still holds it.
#[tokio::test]
async fn a_file_gone_after_its_copy_is_reported_as_that_copy() {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    let tier = storage::store::local(&store).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let body = content(3000, 7);
    let path = base.path().join("online/p/take.mov");
    let seen = 1_704_067_200.25;
    let message = |size: usize, mtime: f64| -> AssetSweeperFile {
        let mut m = sweeper_message("p", "take.mov", false);
        m["size"] = size.into();
        m["mtime"] = mtime.into();
        serde_json::from_value(m).expect("message")
    };
    put(base.path(), "online", "p/take.mov", &body);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| {
            f.set_modified(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_704_067_200_250),
            )
        })
        .expect("mtime");
    let first = copied(c.handle(&message(body.len(), seen), 1).await);
    assert!(first.uploaded);
    std::fs::remove_file(&path).expect("moved away");

    let again = copied(c.handle(&message(body.len(), seen), 2).await);
    assert!(!again.uploaded, "{again:?}");
    assert_eq!(
        (
            &again.key,
            &again.checksum,
            again.size,
            &again.original_path
        ),
        (
            &first.key,
            &sha256(&body),
            body.len() as u64,
            &first.original_path
        )
    );
    // Another version of the file (other size, other mtime) was never copied.
    for other in [
        message(body.len() + 1, seen),
        message(body.len(), seen + 1.0),
    ] {
        match c.handle(&other, 1).await {
            Err(TierError::Permanent(e)) => assert!(e.contains("take.mov"), "{e}"),
            r => panic!("expected Permanent for a version never copied, got {r:?}"),
        }
    }
    // A copy no longer in the store is not reported.
    std::fs::remove_file(store.join(&first.key)).expect("object lost");
    match c.handle(&message(body.len(), seen), 3).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("take.mov"), "{e}"),
        r => panic!("expected Permanent with the object lost, got {r:?}"),
    }
}

/// A gone file's copy is reported though the same path, size and time also has a record
/// written before the SHA-256 was kept (of the same MD5, its object since lost): a record
/// that says nothing of the SHA-256 is no other content. It was counted as one, and the
/// message dead-lettered as "no such file" for a file safe in the store.
#[tokio::test]
async fn a_gone_file_is_reported_beside_an_older_record_without_its_sha256() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let c = nearline(base.path(), tier, records(base.path()).await);
    let body = content(3000, 8);
    let msg = put(base.path(), "online", "p/a.mov", &body);
    let first = copied(c.handle(&msg, 1).await);
    assert!(first.uploaded);
    c.records()
        .record_copy(
            &storage::records::StoredObject {
                object_key: "p/a.mov.old".into(),
                size: first.size,
                checksum: first.checksum.clone(),
                content_sha256: None,
                store: Default::default(),
            },
            "md5",
            &first.original_path,
            &first.mtime,
            None,
        )
        .await
        .expect("an older record");
    std::fs::remove_file(base.path().join("online/p/a.mov")).expect("moved away");
    let again = copied(c.handle(&msg, 2).await);
    assert!(!again.uploaded, "{again:?}");
    assert_eq!(again.key, first.key);
}

/// A local copy keeps its source's read and write permissions (less the umask, as `cp`
/// does): a file only its group may read is not archived readable by every user of the
/// archive's machine or share. Before, every copy was created 0644.
#[tokio::test]
async fn a_local_copy_keeps_who_may_read_its_source() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    let tier = storage::store::local(&store).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    for (name, mode) in [("private.mov", 0o640), ("shared.mov", 0o644)] {
        let msg = put(base.path(), "online", &format!("p/{name}"), b"frames");
        let src = base.path().join("online/p").join(name);
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let r = copied(c.handle(&msg, 1).await);
        let got = std::fs::metadata(store.join(&r.key))
            .expect("stored")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(got, mode & !umask(), "{name}");
    }
}

/// This process's umask (from /proc: reading it with umask(2) would change it meanwhile).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|m| u32::from_str_radix(m.trim(), 8).ok())
        .expect("Umask line")
}

/// Two contents were copied for one path at one size and time (a file replaced with its
/// time kept, `cp -p`, stored beside the first): once the file is gone the message cannot
/// say which it meant, so neither is reported — it stays permanent, as before.
#[tokio::test]
async fn a_gone_file_copied_as_two_contents_is_not_guessed() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let path = base.path().join("online/p/take.mov");
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_704_067_200);
    let mut m = sweeper_message("p", "take.mov", false);
    m["size"] = 3000.into();
    let msg: AssetSweeperFile = serde_json::from_value(m).expect("message");
    for seed in [1, 2] {
        put(base.path(), "online", "p/take.mov", &content(3000, seed));
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(at))
            .expect("mtime");
        assert!(copied(c.handle(&msg, 1).await).uploaded);
    }
    std::fs::remove_file(&path).expect("moved away");
    match c.handle(&msg, 2).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("take.mov"), "{e}"),
        r => panic!("expected Permanent, got {r:?}"),
    }
}

/// A link planted in the store (by anyone who may write there) does not take copies out of
/// it: the key's directory leading elsewhere is permanent, naming the link, and nothing is
/// written where it points. Before, the file was created there and reported as archived.
#[tokio::test]
async fn a_link_in_the_store_does_not_take_copies_out_of_it() {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&outside).expect("dir");
    let tier = storage::store::local(&store).expect("tier");
    std::os::unix::fs::symlink(&outside, store.join("p")).expect("link");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let msg = put(base.path(), "online", "p/a.mov", b"frames");
    match c.handle(&msg, 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("symbolic link"), "{e}"),
        r => panic!("expected Permanent, got {r:?}"),
    }
    assert!(
        files_under(&outside).is_empty(),
        "{:?}",
        files_under(&outside)
    );
}

/// A file path of `len` bytes relative to a root, of random hex (which PostgreSQL cannot
/// compress below its index's limit) in directories of at most 64 bytes.
fn incompressible_path(len: usize) -> String {
    use sha2::Digest;
    let mut text = String::new();
    let mut i = 0u32;
    while text.len() < len {
        text.push_str(&hex::encode(sha2::Sha256::digest(i.to_be_bytes())));
        i += 1;
    }
    let mut rel: String = text
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("hex"))
        .collect::<Vec<_>>()
        .join("/");
    rel.truncate(len - 1);
    let mut rel = rel.trim_end_matches('/').to_string();
    while rel.len() < len {
        rel.push('x');
    }
    rel
}

/// A path whose record PostgreSQL could not index (its path and key together past the
/// btree's limit) is refused before anything is stored: before, the object was stored
/// and its record refused, so the message was dead-lettered, and again on every replay.
/// A path just within the limit is stored and recorded.
#[tokio::test]
async fn a_path_too_long_to_record_is_refused_before_anything_is_stored() {
    let pg = db::testing::TempPostgres::create().await.expect("postgres");
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let recs = Records::open(&pg.url).await.expect("records");
    let c = copier(base.path(), "online", tier, recs.clone());
    // original = <base>/online/<rel>, key = <rel>.
    let fixed = base.path().join("online").display().to_string().len() + 1;
    let limit = storage::tier::MAX_RECORDED_BYTES;
    let within = incompressible_path((limit - fixed) / 2);
    let r = copied(
        c.handle(&put(base.path(), "online", &within, b"fits"), 1)
            .await,
    );
    assert_eq!(r.key, within);
    assert_eq!(recs.count("copied_files").await.expect("count"), 1);
    // Just past the limit, and long enough for PostgreSQL to refuse the record.
    for len in [1400, (limit - fixed) / 2 + 1] {
        let beyond = incompressible_path(len);
        match c
            .handle(&put(base.path(), "online", &beyond, b"too long"), 1)
            .await
        {
            Err(TierError::Permanent(e)) => assert!(e.contains("bytes together"), "{e}"),
            other => panic!("{len}: expected permanent, got {other:?}"),
        }
        assert!(
            !store_dir.join(&beyond).exists(),
            "nothing stored for a path refused"
        );
    }
    assert_eq!(recs.count("copied_files").await.expect("count"), 1);
    recs.close().await;
    pg.drop_db().await.expect("drop");
    // SQLite's indexes take any length: the longest path is stored and recorded there.
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let long = incompressible_path(1400);
    let r = copied(
        c.handle(&put(base.path(), "online", &long, b"long"), 1)
            .await,
    );
    assert_eq!(r.key, long);
}

/// Nearline's reuse of another file's identical object, where that file's key with this
/// file's path is more than the records promise to index (`MAX_RECORDED_BYTES`; roots of
/// different depths: a long key under a shallow root, this file under a deep one): the
/// object is not reused, this file is copied under its own key, which fits. The reuse was
/// recorded past the limit, where PostgreSQL refuses an entry that does not compress
/// (the message dead-lettered though a copy of its own fits).
#[tokio::test]
async fn another_files_object_too_long_to_record_with_this_path_is_not_reused() {
    let pg = db::testing::TempPostgres::create().await.expect("postgres");
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let recs = Records::open(&pg.url).await.expect("records");
    let deep = base.path().join("deep").join(incompressible_path(1400));
    std::fs::create_dir_all(&deep).expect("deep root");
    let roots = open_roots(&[base.path().join("online"), deep.clone()], true).expect("roots");
    let c = TierCopier::new(
        roots,
        tier,
        recs.clone(),
        TierPolicy {
            algorithm: Algorithm::Md5,
            reuse_identical: true,
            ..policy()
        },
    );
    let body = b"same bytes, two files".to_vec();
    // A long key under the shallow root: its own path and key fit.
    let long = format!("g/{}", incompressible_path(1200));
    let g = copied(c.handle(&put(base.path(), "online", &long, &body), 1).await);
    assert_eq!(g.key, long);
    // The same bytes under the deep root, at a short relative path.
    let f = deep.join("f/clip.mov");
    std::fs::create_dir_all(f.parent().expect("parent")).expect("dir");
    std::fs::write(&f, &body).expect("write");
    let msg: AssetSweeperFile = message(&deep.join("f").display().to_string(), "clip.mov");
    let r = copied(c.handle(&msg, 1).await);
    assert_eq!((r.key.as_str(), r.uploaded), ("f/clip.mov", true), "{r:?}");
    assert_eq!(recs.count("copied_files").await.expect("count"), 2);
    recs.close().await;
    pg.drop_db().await.expect("drop");
}

/// An object already at the key whose storage class cannot be read back (Glacier, Deep
/// Archive: a lifecycle rule moved it, or the bucket is the previous system's): the copy
/// cannot compare its content, and no retry changes that until someone restores it. It is
/// refused at once saying so, not retried 50 times to a dead letter as a store fault.
#[tokio::test]
async fn an_object_in_an_archive_storage_class_at_the_key_is_refused_at_once() {
    let bucket = "tier-glacier";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let msg = put(base.path(), "online", "cold/clip.mov", b"same size!");
    put_in_glacier(&moto, bucket, "pre/cold/clip.mov", b"other byte".to_vec()).await;
    match c.handle(&msg, 1).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("storage class"), "{e}"),
        other => panic!("expected permanent, got {other:?}"),
    }
}

/// The same, where the object is this archive's own recorded copy (a lifecycle rule moved
/// it to Glacier after it was archived): its record, confirmed by the store's HEAD, says
/// what it holds. The file edited at the same size is stored beside it, and the same
/// bytes with a new modification time (a restore, a `touch`) are reported as that copy —
/// both were dead-lettered until someone restored the object.
#[tokio::test]
async fn an_archived_copy_moved_to_glacier_is_compared_by_its_record() {
    let bucket = "tier-glacier-own";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let recs = records(base.path()).await;
    let first = b"first take".to_vec();
    let key = "pre/cold/clip.mov";
    put_in_glacier(&moto, bucket, key, first.clone()).await;
    let msg = put(base.path(), "online", "cold/clip.mov", &first);
    let file = base.path().join("online/cold/clip.mov");
    record_as_stored(
        &tier,
        &recs,
        key,
        first.len(),
        sha256(&first),
        "sha256",
        &file,
        "2020-01-01T00:00:00+00:00",
    )
    .await;
    let c = copier(base.path(), "online", tier, recs);
    // The same bytes, touched since the copy.
    let r = copied(c.handle(&msg, 1).await);
    assert_eq!((r.key.as_str(), r.uploaded), (key, false), "{r:?}");
    // Edited in place at the same size.
    let edited = b"other take".to_vec();
    let msg = put(base.path(), "online", "cold/clip.mov", &edited);
    let r = copied(c.handle(&msg, 1).await);
    assert!(r.uploaded && r.key.starts_with(&format!("{key}.")), "{r:?}");
    assert_eq!(r.checksum, sha256(&edited));
}

/// online-nearline reuses an identical object another file's copy stored. One that cannot
/// be read back now (moved to an archive storage class, and recorded by a release that
/// kept no store facts, so only a read-back confirms it) is not confirmed: this file gets
/// a copy of its own. It was dead-lettered as permanent, for another file's object — and
/// so it still was where this file's own earlier copy was recorded as that object (a
/// reuse of it, by a release that kept no store facts).
#[tokio::test]
async fn an_archived_object_of_another_file_is_not_reused_nor_held_against_this_one() {
    let bucket = "tier-reuse-cold";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let recs = records(base.path()).await;
    let body = b"same bytes".to_vec();
    put_in_glacier(&moto, bucket, "pre/other/clip.mov", body.clone()).await;
    let roots = open_roots(&[base.path().join("online")], true).expect("roots");
    let msg = put(base.path(), "online", "mine/clip.mov", &body);
    let mine = base.path().join("online/mine/clip.mov");
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_577_836_800);
    set_modified(&mine, then);
    // The object recorded as another file's copy, and as this file's own earlier one.
    let mine_real = mine
        .canonicalize()
        .expect("real path")
        .display()
        .to_string();
    for path in ["/elsewhere/other/clip.mov", mine_real.as_str()] {
        recs.record_copy(
            &storage::records::StoredObject {
                object_key: "pre/other/clip.mov".into(),
                size: body.len() as u64,
                checksum: sha256(&body),
                content_sha256: None,
                store: Default::default(),
            },
            "sha256",
            path,
            "2020-01-01T00:00:00+00:00",
            None,
        )
        .await
        .expect("recorded");
    }
    let c = TierCopier::new(
        roots,
        tier,
        recs,
        TierPolicy {
            reuse_identical: true,
            ..policy()
        },
    );
    let r = copied(c.handle(&msg, 1).await);
    assert_eq!(r.key, "pre/mine/clip.mov");
    assert!(r.uploaded);
}

/// A symbolic link at a key of a local store (a migration that linked instead of copying,
/// a link left by hand) is no copy: read through, the source's own bytes matched, and the
/// file was reported archived while its content lived only in the online tree. A link
/// that leads nowhere is no copy either, and no cause for retries. Each file is stored
/// beside it, as a regular file holding its bytes.
#[tokio::test]
async fn a_link_at_a_key_of_a_local_store_is_no_copy() {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    std::fs::create_dir_all(store.join("p")).expect("store dir");
    let tier = storage::store::local(&store).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    for (name, len) in [
        ("small.mov", 5),
        ("large.mov", 2 << 20),
        ("dangling.mov", 5),
    ] {
        let body = content(len, 3);
        let msg = put(base.path(), "online", &format!("p/{name}"), &body);
        let target = if name == "dangling.mov" {
            base.path().join("nowhere")
        } else {
            base.path().join("online/p").join(name)
        };
        std::os::unix::fs::symlink(&target, store.join("p").join(name)).expect("link");
        let r = copied(c.handle(&msg, 0).await);
        assert!(r.uploaded, "{name}: {r:?}");
        assert_ne!(r.key, format!("p/{name}"), "{name}: not the link");
        let at = store.join(&r.key);
        let meta = std::fs::symlink_metadata(&at).expect("stored");
        assert!(
            meta.file_type().is_file(),
            "{name}: a regular file at {at:?}"
        );
        assert_eq!(std::fs::read(&at).expect("read"), body, "{name}");
    }
    // A directory link on the way, within the store, is followed as writes follow it: a
    // large file is stored through it, and found there again.
    let disk2 = store.join("real/show");
    std::fs::create_dir_all(&disk2).expect("disk2");
    std::os::unix::fs::symlink(&disk2, store.join("show")).expect("dir link");
    let body = content(2 << 20, 5);
    let msg = put(base.path(), "online", "show/big.mov", &body);
    let first = copied(c.handle(&msg, 0).await);
    assert!(first.uploaded, "{first:?}");
    assert_eq!(first.key, "show/big.mov");
    assert_eq!(std::fs::read(disk2.join("big.mov")).expect("read"), body);
    let again = copied(c.handle(&msg, 1).await);
    assert!(!again.uploaded, "found again through the link: {again:?}");
    assert_eq!(again.key, "show/big.mov");
    // One leading out of the store — here into the online tree itself — holds no copy of
    // this store: what it reaches is not vouched for (the write beside it is refused as a
    // link out of the store, as every write through it is).
    std::os::unix::fs::symlink(base.path().join("online/out"), store.join("out")).expect("out");
    let body = content(2 << 20, 6);
    let msg = put(base.path(), "online", "out/big.mov", &body);
    match c.handle(&msg, 0).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("out of the store"), "{e}"),
        other => panic!("expected a link out of the store refused, got {other:?}"),
    }
}

/// A file named through a link of its own (`ep.mov` → `takes/ep-3.mov`) is recorded at its
/// target; once that is moved away after its copy (the link left dangling, the ack lost),
/// its message again is answered with that copy — it was dead-lettered as "does not exist".
#[tokio::test]
async fn a_file_gone_after_its_copy_through_a_file_link_is_reported_as_that_copy() {
    gone_after_its_copy_through_a_link("show/takes/ep-3.mov", "show", "ep.mov", 10, |base| {
        std::os::unix::fs::symlink("takes/ep-3.mov", base.join("online/show/ep.mov"))
    })
    .await;
}

/// A file named through a directory link (`current` → `2024`) is recorded at its real
/// place; gone after its copy (moved away, the ack lost), its message again is answered
/// with that copy, found through the link — not dead-lettered as a file that never was.
#[tokio::test]
async fn a_file_gone_after_its_copy_through_a_directory_link_is_reported_as_that_copy() {
    gone_after_its_copy_through_a_link("2024/ep.mov", "current", "ep.mov", 9, |base| {
        std::os::unix::fs::symlink(base.join("online/2024"), base.join("online/current"))
    })
    .await;
}

/// Copies the file at `real` (under the root) as the message names it, `dir/name` through
/// the link `link` makes; moves it away; its message again is answered with that copy.
async fn gone_after_its_copy_through_a_link(
    real: &str,
    dir: &str,
    name: &str,
    seed: u8,
    link: impl FnOnce(&Path) -> std::io::Result<()>,
) {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    let tier = storage::store::local(&store).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let body = content(3000, seed);
    put(base.path(), "online", real, &body);
    link(base.path()).expect("link");
    // The message's modification time is the file's (a gone file's copy is found by it).
    let real = base.path().join("online").join(real);
    let mtime = std::fs::metadata(&real)
        .and_then(|m| m.modified())
        .expect("mtime")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let mut m = sweeper_message(dir, name, false);
    m["size"] = body.len().into();
    m["mtime"] = mtime.into();
    let msg: AssetSweeperFile = serde_json::from_value(m).expect("message");
    let first = copied(c.handle(&msg, 1).await);
    assert!(first.uploaded);
    std::fs::remove_file(&real).expect("moved away");
    let again = copied(c.handle(&msg, 2).await);
    assert!(!again.uploaded, "{again:?}");
    assert_eq!(again.key, first.key);
}

/// A file that changed between the sweep and its copy (a render still being written) is
/// copied as it was then; removed after, its message again (the ack lost, or a dead letter
/// replayed) is answered with that later version's copy — it was dead-lettered as "does
/// not exist" for a file safe in the store. A version older than the message's is not.
#[tokio::test]
async fn a_file_changed_after_its_sweep_then_gone_is_reported_as_its_later_copy() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let swept = content(2000, 4);
    put(base.path(), "online", "r/render.mov", &swept);
    let file = base.path().join("online/r/render.mov");
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_704_067_200);
    set_modified(&file, then);
    let message = |size: usize, at: u64| -> AssetSweeperFile {
        let mut m = sweeper_message("r", "render.mov", false);
        m["size"] = size.into();
        m["mtime"] = at.into();
        serde_json::from_value(m).expect("message")
    };
    let msg = message(swept.len(), 1_704_067_200);
    // Finished after the sweep: larger, and later.
    let done = content(3000, 5);
    std::fs::write(&file, &done).expect("rewrite");
    set_modified(&file, then + std::time::Duration::from_secs(600));
    let first = copied(c.handle(&msg, 1).await);
    assert!(
        first.uploaded && first.size == done.len() as u64,
        "{first:?}"
    );
    std::fs::remove_file(&file).expect("moved on");
    let again = copied(c.handle(&msg, 2).await);
    assert!(!again.uploaded, "{again:?}");
    assert_eq!((again.key, again.size), (first.key, first.size));
    // A message naming a time after every copy is not answered with an older one.
    match c.handle(&message(done.len(), 1_704_067_200 + 900), 3).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("does not exist"), "{e}"),
        other => panic!("expected permanent, got {other:?}"),
    }
}

/// Nearline stores one content once, also when two files of it are copied at once: each
/// found no identical object yet and each stored one (two objects, both reported
/// uploaded). The content is claimed while it is stored; the other copy waits (an
/// outage's retry) and then reuses the first's object.
#[tokio::test]
async fn identical_files_copied_at_once_are_stored_once() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let roots = open_roots(&[base.path().join("online")], true).expect("roots");
    let c = TierCopier::new(
        roots,
        tier,
        records(base.path()).await,
        TierPolicy {
            reuse_identical: true,
            ..policy()
        },
    );
    let body = content(3 * MIB + 5, 9);
    let a = put(base.path(), "online", "twins/a.mxf", &body);
    let b = put(base.path(), "online", "twins/b.mxf", &body);
    let (ra, rb) = tokio::join!(c.handle(&a, 0), c.handle(&b, 0));
    let mut reports = Vec::new();
    for (r, msg) in [(ra, &a), (rb, &b)] {
        reports.push(match r {
            Ok(TierOutcome::Copied(report)) => report,
            Err(TierError::Unavailable(e)) => {
                assert!(e.contains("identical content"), "{e}");
                copied(c.handle(msg, 1).await)
            }
            other => panic!("a copy or a wait for the other: {other:?}"),
        });
    }
    let uploaded: Vec<_> = reports.iter().filter(|r| r.uploaded).collect();
    assert_eq!(uploaded.len(), 1, "one upload: {reports:?}");
    assert_eq!(reports[0].key, reports[1].key, "one object: {reports:?}");
    assert_eq!(
        files_under(&store_dir)
            .into_iter()
            .filter(|f| !f.starts_with(storage::local::STAGING_DIR))
            .count(),
        1
    );
}

/// A copy waiting for another copy of its content (as it would for a store outage) does
/// not read its file whole again at every retry: the digest of the unchanged file is
/// reused. A file rewritten meanwhile with its size and modification time kept (`cp -p`)
/// is read again.
#[tokio::test]
async fn a_retry_of_an_unchanged_file_reuses_its_digest() {
    // Under the build directory, on a disk: a temporary directory may be on tmpfs, whose
    // digests are never kept.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp");
    let store_dir = base.path().join("store");
    let c = Arc::new(
        nearline(
            base.path(),
            storage::store::local(&store_dir).expect("tier"),
            records(base.path()).await,
        )
        .remember_digests_of_files_quiet_for(std::time::Duration::ZERO),
    );
    let body = content(3 * MIB, 4);
    let a = put(base.path(), "online", "reuse/a.mxf", &body);
    let b = put(base.path(), "online", "reuse/b.mxf", &body);
    let (entered, release) = storage::testing::hold_local_copy("reuse/a.mxf");
    let first = {
        let (c, a) = (c.clone(), a.clone());
        tokio::spawn(async move { c.handle(&a, 0).await })
    };
    tokio::time::timeout(framework::testing::WAIT, entered.notified())
        .await
        .expect("the first copy is held");
    for attempt in 0..3 {
        let e = outage(c.handle(&b, attempt).await);
        assert!(e.contains("identical content"), "{e}");
    }
    assert_eq!(
        c.digests_reused(),
        2,
        "hashed once, reused at its two retries"
    );
    drop(release);
    let ra = copied(joined(first).await.expect("the first copy ran"));
    let rb = copied(c.handle(&b, 3).await);
    assert_eq!((&rb.key, rb.uploaded), (&ra.key, false), "{rb:?}");
    assert_eq!(c.digests_reused(), 3);
    // Rewritten in place, its size and modification time kept: its change time moved.
    let path = base.path().join("online/reuse/b.mxf");
    let mtime = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let other = content(3 * MIB, 5);
    std::fs::write(&path, &other).expect("rewritten");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(mtime))
        .expect("mtime kept");
    let again = copied(c.handle(&b, 4).await);
    assert_eq!(c.digests_reused(), 3, "a changed file is read again");
    assert!(again.uploaded, "{again:?}");
    assert_eq!(held(&store_dir, &again.key), other);
}

/// Two different 128-byte blocks with one MD5 (Wang and Yu's published pair): any common
/// suffix keeps the collision, so files of any size can share an MD5 and differ.
fn md5_twins(len: usize) -> (Vec<u8>, Vec<u8>) {
    const A: &str = "d131dd02c5e6eec4693d9a0698aff95c2fcab58712467eab4004583eb8fb7f8955ad340609f4b30283e488832571415a085125e8f7cdc99fd91dbdf280373c5bd8823e3156348f5bae6dacd436c919c6dd53e2b487da03fd02396306d248cda0e99f33420f577ee8ce54b67080a80d1ec69821bcb6a8839396f9652b6ff72a70";
    const B: &str = "d131dd02c5e6eec4693d9a0698aff95c2fcab50712467eab4004583eb8fb7f8955ad340609f4b30283e4888325f1415a085125e8f7cdc99fd91dbd7280373c5bd8823e3156348f5bae6dacd436c919c6dd53e23487da03fd02396306d248cda0e99f33420f577ee8ce54b67080280d1ec69821bcb6a8839396f965ab6ff72a70";
    let suffix = content(len.saturating_sub(128), 3);
    let twin = |h: &str| [hex::decode(h).expect("hex"), suffix.clone()].concat();
    let (a, b) = (twin(A), twin(B));
    assert_ne!(a, b);
    let md5 = |b: &[u8]| {
        use md5::Digest;
        hex::encode(md5::Md5::digest(b))
    };
    assert_eq!(md5(&a), md5(&b), "the pair collides");
    (a, b)
}

/// A file whose earlier attempt left its finished copy at its key unrecorded (stopped after
/// the upload completed, its verification or record failed) takes that object when it
/// comes again, though another file of its content was recorded meanwhile: reusing the
/// other's left its own in the bucket unrecorded for ever, the content stored twice.
#[tokio::test]
async fn a_files_own_unrecorded_copy_is_taken_before_another_files_identical_one() {
    let bucket = "tier-own-orphan";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = nearline(base.path(), tier, records(base.path()).await);
    let body = content(64 * 1024, 9);
    let x = put(base.path(), "online", "a/x.mov", &body);
    let y = put(base.path(), "online", "b/y.mov", &body);
    object_store::ObjectStore::put(
        &plain_client(&moto, bucket),
        &storage::store::object_path("pre/a/x.mov"),
        body.clone().into(),
    )
    .await
    .expect("an earlier attempt's copy");
    let ry = copied(c.handle(&y, 1).await);
    assert_eq!(ry.key, "pre/b/y.mov");
    let rx = copied(c.handle(&x, 1).await);
    assert_eq!(rx.key, "pre/a/x.mov", "its own copy: {rx:?}");
    assert!(!rx.uploaded);
    assert!(
        c.records()
            .object_at("pre/a/x.mov")
            .await
            .expect("records")
            .is_some(),
        "recorded"
    );
    // Recorded, it is reused like any other: the next file of the content takes one of the
    // two, and nothing more is stored.
    let z = put(base.path(), "online", "c/z.mov", &body);
    assert!(!copied(c.handle(&z, 1).await).uploaded);
}

/// An object replaced behind the service's back (other bytes of its size; its record
/// forgotten once that was found) is not taken for the file's own unrecorded copy: the
/// file touched (a new mtime) goes to its copy beside it without reading the replaced one.
#[tokio::test]
async fn a_replaced_object_is_not_taken_for_a_files_own_unrecorded_copy() {
    let bucket = "tier-replaced-own";
    let (moto, proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = nearline(base.path(), tier, records(base.path()).await);
    let body = content(64 * 1024, 5);
    let msg = put(base.path(), "online", "r/f.mov", &body);
    let first = copied(c.handle(&msg, 1).await);
    assert_eq!(first.key, "pre/r/f.mov");
    let mut other = body.clone();
    other[100] ^= 0x55;
    object_store::ObjectStore::put(
        &plain_client(&moto, bucket),
        &storage::store::object_path(&first.key),
        other.into(),
    )
    .await
    .expect("replace the object");
    let beside = copied(c.handle(&msg, 2).await);
    assert_ne!(beside.key, first.key, "stored beside the replaced object");
    std::fs::File::options()
        .write(true)
        .open(base.path().join("online/r/f.mov"))
        .expect("open")
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .expect("touch");
    proxy.reset();
    let again = copied(c.handle(&msg, 3).await);
    assert_eq!(again.key, beside.key);
    assert_eq!(
        downloads(&proxy, bucket, &first.key),
        0,
        "the replaced object is not read: {:?}",
        proxy.requests()
    );
}

/// A nearline copier (MD5, identical content reused) over `<base>/online` into `tier`.
fn nearline(base: &Path, tier: Tier, records: Records) -> TierCopier {
    let roots = open_roots(&[base.join("online")], true).expect("roots");
    TierCopier::new(
        roots,
        tier,
        records,
        TierPolicy {
            algorithm: Algorithm::Md5,
            keep_metadata: true,
            reuse_identical: true,
            skip_ignored: true,
            read_back: true,
        },
    )
}

/// What a local store holds at `key`.
fn held(store: &Path, key: &str) -> Vec<u8> {
    std::fs::read(store.join(key)).expect("stored")
}

/// MD5 alone proves no content (colliding files are made in seconds): a nearline copy
/// reported for a file must hold that file's bytes, not another's of the same MD5 and
/// size — whether that other is another file's object (reuse), this path's earlier copy
/// (a file replaced with its size and time kept), or an unrecorded object at the key.
#[tokio::test]
async fn files_of_one_md5_and_other_bytes_are_never_taken_for_one_another() {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    let recs = records(base.path()).await;
    let c = nearline(
        base.path(),
        storage::store::local(&store).expect("tier"),
        recs,
    );
    let (a, b) = md5_twins(3 * MIB);
    // At the time the messages say (a gone file's copies are looked up by it).
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_704_067_200);
    let path = base.path().join("online/x/a.mxf");
    let mut m = sweeper_message("x", "a.mxf", false);
    m["size"] = a.len().into();
    let msg: AssetSweeperFile = serde_json::from_value(m).expect("message");
    put(base.path(), "online", "x/a.mxf", &a);
    set_modified(&path, at);
    let ra = copied(c.handle(&msg, 1).await);
    assert!(ra.uploaded);
    assert_eq!(held(&store, &ra.key), a);

    // Another file with the twin's bytes: not the first file's object.
    let rb = copied(
        c.handle(&put(base.path(), "online", "y/b.mxf", &b), 1)
            .await,
    );
    assert_eq!(rb.checksum, ra.checksum, "one MD5");
    assert_eq!(held(&store, &rb.key), b, "{rb:?}");
    assert!(rb.uploaded);

    // The first path's file replaced by the twin, its time kept: not its earlier copy.
    std::fs::write(&path, &b).expect("replace");
    set_modified(&path, at);
    let again = copied(c.handle(&msg, 2).await);
    assert_eq!(held(&store, &again.key), b, "{again:?}");

    // Then gone: copied as two contents at that size and time, which one cannot be told.
    std::fs::remove_file(&path).expect("moved away");
    match c.handle(&msg, 3).await {
        Err(TierError::Permanent(e)) => assert!(e.contains("a.mxf"), "{e}"),
        r => panic!("expected Permanent, got {r:?}"),
    }

    // The same bytes again are still reused: one object for `b`'s content.
    let rd = copied(
        c.handle(&put(base.path(), "online", "w/d.mxf", &b), 1)
            .await,
    );
    assert!(!rd.uploaded, "{rd:?}");
    assert_eq!(held(&store, &rd.key), b);

    // An object of the twin's bytes at the natural key of a vault recording nothing of
    // it (a copy whose record was lost): not this file's copy; stored beside it.
    let other = base.path().join("other-store");
    std::fs::create_dir_all(other.join("z")).expect("dir");
    std::fs::write(other.join("z/c.mxf"), &a).expect("unrecorded twin");
    let db = base.path().join("other-db");
    std::fs::create_dir_all(&db).expect("db dir");
    let c = nearline(
        base.path(),
        storage::store::local(&other).expect("tier"),
        records(&db).await,
    );
    let rc = copied(
        c.handle(&put(base.path(), "online", "z/c.mxf", &b), 1)
            .await,
    );
    assert_eq!(held(&other, &rc.key), b, "{rc:?}");
    assert_eq!(held(&other, "z/c.mxf"), a, "never overwritten");
}

/// One path holding three contents in turn, two of them of one MD5: each is stored under
/// a key of its own (the key beside the first is named from the SHA-256, not the MD5
/// the twins share, which had the third refused as "damage").
#[tokio::test]
async fn a_path_holding_md5_twins_in_turn_stores_each_beside_the_first() {
    let base = tempfile::tempdir().expect("temp");
    let store = base.path().join("store");
    let c = nearline(
        base.path(),
        storage::store::local(&store).expect("tier"),
        records(base.path()).await,
    );
    let (a, b) = md5_twins(3 * MIB);
    let mut keys = Vec::new();
    for body in [content(3 * MIB, 7), a, b] {
        let r = copied(
            c.handle(&put(base.path(), "online", "p/f.mxf", &body), 1)
                .await,
        );
        assert!(r.uploaded, "{r:?}");
        assert_eq!(held(&store, &r.key), body);
        keys.push(r.key);
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3, "{keys:?}");
}

/// On S3 the vault's objects are told apart by the SHA-256 recorded with them, without
/// downloading: another file of one MD5 is not given the first's object, and its own is
/// stored. A record older than that SHA-256 is read back once (and filled in): an
/// identical file then reuses the object, and the next one needs no download.
#[tokio::test]
async fn s3_vault_objects_of_one_md5_are_told_apart_by_their_recorded_sha256() {
    let bucket = "tier-md5-twins";
    let (_moto, proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = nearline(base.path(), tier.clone(), records(base.path()).await);
    let (a, b) = md5_twins(64 * 1024);
    let ra = copied(
        c.handle(&put(base.path(), "online", "x/a.mxf", &a), 1)
            .await,
    );
    assert_eq!(ra.key, "pre/x/a.mxf");

    proxy.reset();
    let rb = copied(
        c.handle(&put(base.path(), "online", "y/b.mxf", &b), 1)
            .await,
    );
    assert_eq!(rb.key, "pre/y/b.mxf", "its own object: {rb:?}");
    assert!(rb.uploaded);
    assert_eq!(
        downloads(&proxy, bucket, &ra.key),
        0,
        "{:?}",
        proxy.requests()
    );
    assert_eq!(stored_sha256(&tier, &rb.key).await, sha256(&b));

    // Records written before the SHA-256 was kept (a writer of its own: the records'
    // pool only reads).
    db::sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", base.path().join("tier.db").display());
    let writer = db::sqlx::AnyPool::connect(&url).await.expect("writer");
    db::sqlx::query("UPDATE stored_objects SET content_sha256 = NULL")
        .execute(&writer)
        .await
        .expect("older records");
    // The twin's content looks at both objects: the first file's is read back to tell
    // (and its SHA-256 kept), its own is read back and reused.
    proxy.reset();
    let r1 = copied(
        c.handle(&put(base.path(), "online", "w/b1.mxf", &b), 1)
            .await,
    );
    assert_eq!(r1.key, rb.key, "reused: {r1:?}");
    assert!(!r1.uploaded);
    assert_eq!(downloads(&proxy, bucket, &rb.key), 1, "read back once");
    assert!(downloads(&proxy, bucket, &ra.key) <= 1);
    // Each read back once only: the next look knows both.
    proxy.reset();
    let r2 = copied(
        c.handle(&put(base.path(), "online", "w/b2.mxf", &b), 1)
            .await,
    );
    assert_eq!(r2.key, rb.key, "reused: {r2:?}");
    let gets = downloads(&proxy, bucket, &ra.key) + downloads(&proxy, bucket, &rb.key);
    assert_eq!(gets, 0, "{:?}", proxy.requests());
}

/// A nearline copy recorded before its content's SHA-256 was kept, whose object has since
/// moved to an archive storage class (it cannot be read back to learn that SHA-256): the
/// file's redelivery is settled by the store's HEAD as before, not dead-lettered for its
/// own copy.
#[tokio::test]
async fn an_older_nearline_record_of_an_archived_object_still_settles_its_redelivery() {
    let bucket = "tier-md5-cold";
    let (moto, _proxy, tier) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let recs = records(base.path()).await;
    let body = b"cold nearline bytes".to_vec();
    let msg = put(base.path(), "online", "cold/clip.mov", &body);
    let file = base.path().join("online/cold/clip.mov");
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_704_067_200);
    set_modified(&file, at);
    let key = "pre/cold/clip.mov";
    put_in_glacier(&moto, bucket, key, body.clone()).await;
    let md5 = {
        use md5::Digest;
        hex::encode(md5::Md5::digest(&body))
    };
    record_as_stored(
        &tier,
        &recs,
        key,
        body.len(),
        md5,
        "md5",
        &file,
        "2024-01-01T00:00:00+00:00",
    )
    .await;
    let c = nearline(base.path(), tier, recs);
    let r = copied(c.handle(&msg, 2).await);
    assert_eq!(r.key, key);
    assert!(!r.uploaded);
}

/// A nearline copy of several parts to S3 records the MD5 and the SHA-256 of the whole
/// file (each part hashed off the runtime, the SHA-256 beside the MD5 on a thread of its
/// own), and so does a local one (its hasher threads).
/// A file larger than S3 holds is refused (permanent) before anything reads it: nearline
/// hashed it whole first, to look for an identical object (terabytes read for a refusal,
/// at every redelivery). The file is sparse: its reading alone would outlast the test.
#[tokio::test]
async fn a_file_larger_than_s3_holds_is_refused_before_it_is_read() {
    let bucket = "tier-too-large";
    let (_moto, _proxy, s3) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let c = nearline(base.path(), s3, records(base.path()).await);
    let msg = put(base.path(), "online", "p/huge.mov", b"");
    std::fs::OpenOptions::new()
        .write(true)
        .open(base.path().join("online/p/huge.mov"))
        .and_then(|f| f.set_len(storage::copy::MAX_OBJECT + 1))
        .expect("a sparse file past the largest object");
    let r = framework::testing::within(framework::testing::WAIT, "the refusal", async {
        c.handle(&msg, 1).await
    })
    .await;
    match r {
        Err(TierError::Permanent(e)) => assert!(e.contains("largest object"), "{e}"),
        other => panic!("expected a permanent refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn nearline_copies_of_several_parts_record_both_digests_of_the_whole_file() {
    let bucket = "tier-md5-parts";
    let (_moto, _proxy, s3) = s3_tier(bucket).await;
    let base = tempfile::tempdir().expect("temp");
    let body = content(11 * MIB + 3, 4);
    let md5 = {
        use md5::Digest;
        hex::encode(md5::Md5::digest(&body))
    };
    for (name, tier) in [
        ("s3", s3),
        (
            "local",
            storage::store::local(&base.path().join("store")).expect("tier"),
        ),
    ] {
        let db = base.path().join(name);
        std::fs::create_dir_all(&db).expect("db dir");
        let recs = records(&db).await;
        let pool = recs.pool().clone();
        let c = nearline(base.path(), tier, recs);
        let r = copied(
            c.handle(
                &put(base.path(), "online", &format!("{name}/big.mxf"), &body),
                1,
            )
            .await,
        );
        assert_eq!(r.checksum, md5, "{name}");
        let (sum, sha): (String, String) = db::sqlx::query_as(
            "SELECT checksum, content_sha256 FROM stored_objects WHERE object_key = $1",
        )
        .bind(&r.key)
        .fetch_one(&pool)
        .await
        .expect("recorded");
        assert_eq!((sum, sha), (md5.clone(), sha256(&body)), "{name}");
    }
}

/// A later message bringing the Pluto id of a file already copied, unchanged (the sweeper
/// sends it once the file is imported), records it with the copy, whatever the file's
/// size: before, a file looked up as an earlier copy (any on S3; local ones of 1 MiB or
/// more) was reported with the id but the record kept none. A later message without one
/// keeps it.
#[tokio::test]
async fn a_later_imported_id_of_an_unchanged_copy_is_recorded() {
    let base = tempfile::tempdir().expect("temp");
    let tier = storage::store::local(&base.path().join("store")).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    for (name, size) in [("small.mov", 100), ("large.mov", 2 * MIB + 1)] {
        let mut msg = put(
            base.path(),
            "online",
            &format!("p/{name}"),
            &content(size, 3),
        );
        msg.imported_id = None;
        let first = copied(c.handle(&msg, 0).await);
        assert!(first.uploaded, "{name}");
        let recorded = || async {
            db::sqlx::query_scalar::<_, Option<String>>(
                "SELECT imported_id FROM copied_files WHERE original_path = $1",
            )
            .bind(&first.original_path)
            .fetch_one(c.records().pool())
            .await
            .expect("record")
        };
        assert_eq!(recorded().await, None, "{name}");
        msg.imported_id = Some(format!("VX-{size}"));
        let again = copied(c.handle(&msg, 0).await);
        assert!(!again.uploaded, "{name}: the earlier copy is reported");
        assert_eq!(recorded().await, Some(format!("VX-{size}")), "{name}");
        msg.imported_id = None;
        copied(c.handle(&msg, 0).await);
        assert_eq!(recorded().await, Some(format!("VX-{size}")), "{name}: kept");
        // Every sweep resends the id: where a file's earlier copy is looked up (not a
        // small file bound for a local store, whose copy finds it when published), the
        // id recorded already is not written again.
        if size >= storage::local::BLOCK {
            let mark = "2000-01-01T00:00:00Z";
            // A writer of its own: the records' pool only reads.
            db::sqlx::any::install_default_drivers();
            let url = format!("sqlite://{}", base.path().join("tier.db").display());
            let writer = db::sqlx::AnyPool::connect(&url).await.expect("writer");
            db::sqlx::query("UPDATE copied_files SET recorded_at = $1")
                .bind(mark)
                .execute(&writer)
                .await
                .expect("mark");
            writer.close().await;
            msg.imported_id = Some(format!("VX-{size}"));
            copied(c.handle(&msg, 0).await);
            let at: String = db::sqlx::query_scalar(
                "SELECT recorded_at FROM copied_files WHERE original_path = $1",
            )
            .bind(&first.original_path)
            .fetch_one(c.records().pool())
            .await
            .expect("record");
            assert_eq!(at, mark, "{name}: not written again");
        }
    }
}

/// A new version of a file whose key beside the first (`<name>.<16 hex>`) is another
/// file's own name, holding other content (a name made to meet it), is stored under the
/// whole digest instead of dead-lettered; what the other keys hold is untouched.
#[tokio::test]
async fn a_new_version_whose_key_beside_is_another_files_name_goes_further_beside() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let (first, second) = (content(5000, 1), content(6000, 2));
    let digest = sha256(&second);
    let squatter = format!("a.mov.{}", &digest[..16]);
    for (rel, body) in [
        ("p/a.mov".to_string(), &first),
        (format!("p/{squatter}"), &b"another file".to_vec()),
    ] {
        let msg = put(base.path(), "online", &rel, body);
        assert_eq!(copied(c.handle(&msg, 0).await).key, rel);
    }
    let msg = put(base.path(), "online", "p/a.mov", &second);
    let r = copied(c.handle(&msg, 0).await);
    assert_eq!(r.key, format!("p/a.mov.{digest}"));
    assert!(r.uploaded);
    for (key, body) in [
        (r.key.clone(), second.clone()),
        ("p/a.mov".into(), first.clone()),
        (format!("p/{squatter}"), b"another file".to_vec()),
    ] {
        assert_eq!(
            std::fs::read(store_dir.join(&key)).expect("stored"),
            body,
            "{key}"
        );
    }
    // Its redelivery finds that copy.
    let again = copied(c.handle(&msg, 1).await);
    assert_eq!((again.key, again.uploaded), (r.key, false));
}

/// Unmounts a test's filesystem however the test ends.
struct Mounted(std::path::PathBuf);

impl Mounted {
    /// A tmpfs at `dir`.
    fn at(dir: &Path) -> Mounted {
        Self::with(&["-t", "tmpfs", "tmpfs"], dir)
    }

    /// `mount <args> <dir>`.
    fn with(args: &[&str], dir: &Path) -> Mounted {
        use framework::testing::process::RunWithin;
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(dir)
            .status_within(framework::testing::WAIT)
            .expect("mount runs");
        assert!(
            ok.success(),
            "mount {args:?} at {} (needs root, and a loop device for an image)",
            dir.display()
        );
        Mounted(dir.to_path_buf())
    }

    /// An ext4 whose times count whole seconds (inodes of 128 bytes have no room for
    /// fractions, as FAT, HFS+ and sshfs have none) in `image`, at `dir`.
    fn whole_seconds(image: &Path, dir: &Path) -> Mounted {
        use framework::testing::process::RunWithin;
        std::fs::File::create(image)
            .and_then(|f| f.set_len(64 * MIB as u64))
            .expect("image");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-I", "128"])
            .arg(image)
            .output_within(framework::testing::WAIT)
            .expect("mkfs.ext4 runs");
        assert!(made.status.success(), "mkfs.ext4: {made:?}");
        let image = image.display().to_string();
        Self::with(&["-o", "loop", &image], dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        use framework::testing::process::RunWithin;
        let _ = std::process::Command::new("umount")
            .arg(&self.0)
            .status_within(framework::testing::WAIT);
    }
}

/// A file rewritten in place (its header, same size) while it is copied, within the second
/// of its last write on a filesystem whose times count whole seconds, leaves its times as
/// they were: the copy waits out that second before it starts, so the rewrite moves them
/// and the copy is retried — never a torn copy (old header, new body or the reverse)
/// recorded and reported as verified, as before. (Mounts a loop device: the suite runs as
/// root.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_the_second_of_its_last_write_is_no_verified_copy() {
    use std::os::unix::fs::FileExt;
    let base = tempfile::tempdir().expect("temp");
    let online = base.path().join("online");
    std::fs::create_dir(&online).expect("root");
    let _mounted = Mounted::whole_seconds(&base.path().join("online.img"), &online);
    let store_dir = base.path().join("store");
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    // Written early in a second, so that the copy starts and the rewrite comes within it
    // (on a slow machine they may not: then the times move and the case is not made).
    framework::testing::within(framework::testing::WAIT, "a new second", async {
        while std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .subsec_millis()
            > 100
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let msg = put(
        base.path(),
        "online",
        "show/render.mov",
        &content(2 * MIB, 3),
    );
    let (entered, release) = storage::testing::hold_local_copy("show/render.mov");
    let run = tokio::spawn(async move { c.handle(&msg, 1).await });
    framework::testing::within(framework::testing::WAIT, "the copy under way", async {
        entered.notified().await
    })
    .await;
    let path = online.join("show/render.mov");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.write_all_at(b"final header", 0))
        .expect("rewritten");
    release.send(()).expect("released");
    match joined(run).await.expect("ran") {
        Ok(TierOutcome::Copied(r)) => assert_eq!(
            r.checksum,
            sha256(&std::fs::read(&path).expect("read")),
            "a copy reported verified holds what the file holds: {r:?}"
        ),
        other => {
            let e = transient(other);
            assert!(e.contains("changed while it was being copied"), "{e}");
        }
    }
}

/// A local store on a share that is unmounted while the service runs (its mount point an
/// empty directory again) is an outage: nothing is written on the disk beneath, where the
/// copy would be reported done and then hidden when the share mounts again. Mounted
/// again, the same message copies. (Mounts a tmpfs: the suite runs as root.)
#[tokio::test]
async fn a_local_store_whose_share_is_unmounted_is_not_filled_beneath() {
    let base = tempfile::tempdir().expect("temp");
    let store_dir = base.path().join("store");
    std::fs::create_dir_all(&store_dir).expect("dir");
    let share = Mounted::at(&store_dir);
    let tier = storage::store::local(&store_dir).expect("tier");
    let c = copier(base.path(), "online", tier, records(base.path()).await);
    let first = put(base.path(), "online", "p/first.mov", b"first");
    assert!(copied(c.handle(&first, 0).await).uploaded);
    drop(share);
    assert!(!store_dir.join("p/first.mov").exists(), "unmounted");
    let second = put(base.path(), "online", "p/second.mov", b"second");
    let e = outage(c.handle(&second, 0).await);
    assert!(e.contains("not mounted"), "{e}");
    assert_eq!(
        files_under(&store_dir),
        Vec::<String>::new(),
        "nothing beneath"
    );
    // A file gone from online after its copy (moved on, its success's ack lost): its copy
    // cannot be seen while the store is away, which is no proof it is lost — an outage
    // too, not "does not exist" dead-lettered.
    std::fs::remove_file(base.path().join("online/p/first.mov")).expect("moved on");
    let e = outage(c.handle(&first, 1).await);
    assert!(e.contains("not mounted"), "{e}");
    let _share = Mounted::at(&store_dir);
    let r = copied(c.handle(&second, 1).await);
    assert!(r.uploaded);
    assert_eq!(
        std::fs::read(store_dir.join(&r.key)).expect("stored"),
        b"second"
    );
}

/// Deletes `bucket` (emptied) from moto, as a store restarting before its buckets shows.
async fn delete_bucket(moto: &MotoServer, bucket: &str) {
    let deleted = reqwest::Client::new()
        .delete(format!("{}/{bucket}", moto.endpoint.trim_end_matches('/')))
        .timeout(framework::testing::WAIT)
        .send()
        .await
        .expect("moto answers");
    assert!(deleted.status().is_success(), "{}", deleted.status());
}
