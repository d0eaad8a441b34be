//! The copy-to-tier procedure both storage services run: resolve, deduplicate, stream,
//! verify, record. Services add only their names and success message shape.

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{Attribute, Attributes};

use crate::checksum::Algorithm;
use crate::copy::{self, CopyError, Digest};

use crate::message::AssetSweeperFile;
use crate::paths::{self, PathError, Root};
use crate::records::{Records, StoredObject};
use crate::store::Tier;

/// Longest object key S3 takes (bytes).
const MAX_S3_KEY: usize = 1024;

/// Most bytes a file's path and its object key may take together on PostgreSQL: the
/// records index the pair (its btree holds at most 2,704 bytes per entry), and a copy whose
/// record the database refuses would be stored, then dead-lettered, and again on every
/// replay. SQLite's indexes take any length.
pub const MAX_RECORDED_BYTES: usize = 2560;

/// Longest encoded original path kept in an object's metadata (S3 keeps 2 KB in all,
/// names included).
const MAX_PATH_METADATA: usize = 1800;

/// How a tier behaves.
#[derive(Debug, Clone, Copy)]
pub struct TierPolicy {
    /// Digest recorded and verified.
    pub algorithm: Algorithm,
    /// Keep original path, size and mtime as object metadata (where the store can).
    pub keep_metadata: bool,
    /// Reuse any stored object with identical content, wherever its key.
    pub reuse_identical: bool,
    /// A message marked `ignore` is recorded as ignored and dropped (online-archive);
    /// false: the file is copied all the same (online-nearline, a backup of every file, as
    /// the original's nearline copied them).
    pub skip_ignored: bool,
    /// A local store's copy is read back from its disk (not the page cache its writes
    /// filled) and its digest compared before it is published (online-nearline, whose
    /// design reads the stored object back); false: the digest of the bytes written, all
    /// written and fsynced, is the verification. An S3 store's own checksum settles it
    /// either way.
    pub read_back: bool,
}

/// The result of a successful copy (or of finding one already made).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    /// The resolved source path.
    pub original_path: String,
    /// Store description.
    pub store: String,
    /// Object key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Digest.
    pub checksum: String,
    /// Digest name.
    pub algorithm: &'static str,
    /// The content's SHA-256 (hex) where `checksum` is another algorithm's and it is known
    /// (nearline; a copy recorded before migration 0009 and never looked at since: none).
    pub content_sha256: Option<String>,
    /// Source mtime (RFC 3339).
    pub mtime: String,
    /// Whether this attempt uploaded (false: an identical copy already existed).
    pub uploaded: bool,
    /// The Pluto id: the message's, else the one recorded with the copy.
    pub imported_id: Option<String>,
}

/// What the processor should do.
#[derive(Debug)]
pub enum TierOutcome {
    /// Copied or already there.
    Copied(CopyReport),
    /// `ignore: true`: recorded, nothing copied.
    Ignored,
}

/// A failure, classified for the bus.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// Will never work (bad path, missing file).
    #[error("{0}")]
    Permanent(String),
    /// May work later (a source's I/O, a copy raced or interrupted).
    #[error("{0}")]
    Transient(String),
    /// Something every copy needs (the object store, the records database, an online
    /// share) is down or refuses us: retried without counting against the message (see
    /// `MessageContext::retry_for_outage`), so an outage does not dead-letter the backlog.
    #[error("{0}")]
    Unavailable(String),
}

/// A file's modification time as its records keep it (RFC 3339, as chrono writes a
/// `SystemTime`); `None` past chrono's range (year ±262,143), which some filesystems
/// allow and chrono's conversion from `SystemTime` panics on.
fn mtime_text(secs: i64, nanos: i64) -> Option<String> {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp(secs, u32::try_from(nanos).ok()?)?;
    Some(t.to_rfc3339())
}

impl From<PathError> for TierError {
    fn from(e: PathError) -> Self {
        if e.is_outage() {
            TierError::Unavailable(e.to_string())
        } else if e.is_transient() {
            TierError::Transient(e.to_string())
        } else {
            TierError::Permanent(e.to_string())
        }
    }
}

impl From<CopyError> for TierError {
    fn from(e: CopyError) -> Self {
        if e.is_permanent() {
            TierError::Permanent(e.to_string())
        } else if e.is_outage() {
            TierError::Unavailable(e.to_string())
        } else {
            TierError::Transient(e.to_string())
        }
    }
}

impl From<db::sqlx::Error> for TierError {
    fn from(e: db::sqlx::Error) -> Self {
        if db::refuses_the_data(&e) {
            TierError::Permanent(format!("the database refuses this file's record: {e}"))
        } else if db::is_outage(&e) {
            TierError::Unavailable(format!("database: {e}"))
        } else {
            TierError::Transient(format!("database: {e}"))
        }
    }
}

/// What opening a message's source found.
enum Opened {
    /// The file, opened beneath its root, with its metadata.
    File(paths::Resolved, std::fs::Metadata),
    /// No such file under a root that is mounted.
    Missing(PathError),
}

/// Opens the source `parent_dir/filename` beneath its root, with its metadata. Blocking.
fn open_source(
    roots: &[Root],
    parent_dir: &str,
    filename: &str,
    follow: bool,
) -> Result<Option<Opened>, TierError> {
    let resolved = match paths::resolve_unless_linked(roots, parent_dir, filename, follow) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        // A root with nothing in it is a share that is not mounted (its mount point
        // left empty), not a tree where this file is missing: retried, not
        // dead-lettered with every other file of the share.
        // Only a root the path can be under: an empty spare root says nothing about
        // a file missing from another.
        // So is a name no root holds a file under (a directory, a link out, in one root)
        // where a root the path can be under is such an empty mount point: its share may.
        Err(
            e @ (PathError::NotFound(_)
            | PathError::NotAFile(_)
            | PathError::OutsideRoots(_)
            | PathError::LinkLoop(_)),
        ) => {
            // Where the path lands under each root, as the lookup took it: a relative path
            // climbing out of every root (`../../etc`) is under none, an empty one included.
            let under = paths::candidates(roots, parent_dir, filename);
            let unmounted = roots
                .iter()
                .filter(|r| under.iter().any(|c| c.starts_with(&r.canonical)))
                .find(|r| paths::may_be_unmounted(r));
            return match unmounted {
                Some(r) => Err(TierError::Unavailable(format!(
                    "the online root {} is empty, unreadable or gone (a share not mounted?), \
                     retried as an outage (up to [retry] max_outage_ms): {e}",
                    r.configured.display()
                ))),
                None if matches!(e, PathError::NotFound(_)) => Ok(Some(Opened::Missing(e))),
                None => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let meta = resolved
        .file
        .metadata()
        .map_err(|e| PathError::io(&resolved.path.display().to_string(), &e))?;
    Ok(Some(Opened::File(resolved, meta)))
}

/// Every key this content may take holds other content. The keys beside the natural one
/// are derived from this very content: other bytes there are damage (or names crafted to
/// meet them) no retry will repair.
fn occupied(natural: &ObjectPath, last: &ObjectPath) -> TierError {
    TierError::Permanent(format!(
        "{natural} and the keys beside it, up to {last}, hold other content; refusing to overwrite"
    ))
}

/// Whether a file's recorded modification time (RFC 3339) is the one the sweeper saw:
/// to the second where the sweeper sent whole seconds (the older shape's strings), else
/// to the millisecond (its epoch seconds are a float: microseconds survive, not
/// nanoseconds).
fn same_mtime(recorded: &str, seen: crate::message::SweeperTime) -> bool {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(recorded) else {
        return false;
    };
    let secs = t.timestamp();
    if seen.0.fract() == 0.0 {
        return secs as f64 == seen.0;
    }
    let recorded = secs as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9;
    (recorded - seen.0).abs() < 1e-3
}

/// Whether the recorded modification time (RFC 3339) is later than the sweeper's, by more
/// than the millisecond `same_mtime` allows.
fn later_mtime(recorded: &str, seen: crate::message::SweeperTime) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(recorded).ok()?;
    let recorded = t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9;
    (recorded > seen.0 + 1e-3).then_some(recorded)
}

/// Copies asset-sweeper files from the online roots into one tier.
pub struct TierCopier {
    /// Shared with the blocking thread that opens each file where it may block.
    roots: Arc<[Root]>,
    /// Whether the roots' filesystems may block a thread on a server.
    mounts: crate::mounts::MountWatch,
    tier: Tier,
    records: Records,
    policy: TierPolicy,
    /// Opens and lookups where a share may never answer: bounded per share (see
    /// crate::stuck).
    remote: crate::stuck::PerShare,
    /// The digests of unchanged files hashed before, for their retries.
    hashed: crate::hashed::Hashed,
}

/// How long an open or a lookup on a share is waited for: a server this slow to answer
/// one is away, and the file is retried as an outage.
const REMOTE_WAIT: Duration = Duration::from_secs(30);

/// How many opens or lookups given up on one share may still hold a thread before no more
/// are started there, and on all shares together (tokio's blocking pool holds 512, and
/// the copies need theirs).
const MAX_STUCK: usize = 64;
const MAX_STUCK_ALL: usize = 256;

/// The claim key of a content (nearline's reuse): a leading `/` no object key has.
fn identical_content_key(alg: crate::Algorithm, d: &Digest) -> String {
    format!("/identical/{}/{}/{}", alg.name(), d.checksum, d.size)
}

/// A blocking call about `msg`'s file, on `share`, that was not answered (or not made).
fn share_not_answering(
    doing: &str,
    msg: &AssetSweeperFile,
    share: &std::path::Path,
    e: crate::stuck::Stuck,
) -> TierError {
    if e == crate::stuck::Stuck::Lost {
        return TierError::Transient(format!(
            "{doing} {}: {e}",
            framework::telemetry::LogText(&msg.joined_path())
        ));
    }
    TierError::Unavailable(format!(
        "{doing} {}: {e} on {} (a share whose server stopped answering?), retried as an \
         outage (up to [retry] max_outage_ms)",
        framework::telemetry::LogText(&msg.joined_path()),
        share.display()
    ))
}

/// Whether recorded objects hold more than one content: two checksums, or two SHA-256s
/// among those known (a record written before the SHA-256 was kept says nothing of it, as
/// in the records' own queries: counted as another content, one such record made a gone
/// file's good copy unreportable).
fn several_contents<'a>(objects: impl Iterator<Item = &'a StoredObject> + Clone) -> bool {
    let differ = |of: fn(&StoredObject) -> Option<&String>| {
        let mut known = objects.clone().filter_map(of);
        known.next().is_some_and(|first| known.any(|o| o != first))
    };
    differ(|o| Some(&o.checksum)) || differ(|o| o.content_sha256.as_ref())
}

impl TierCopier {
    /// A copier over `roots` (see [`paths::open_roots`]).
    pub fn new(roots: Vec<Root>, mut tier: Tier, records: Records, policy: TierPolicy) -> Self {
        tier.read_back = policy.read_back;
        Self {
            mounts: crate::mounts::MountWatch::new(
                roots.iter().map(|r| r.canonical.clone()).collect(),
            ),
            roots: roots.into(),
            tier,
            records,
            policy,
            remote: crate::stuck::PerShare::new(REMOTE_WAIT, MAX_STUCK, MAX_STUCK_ALL),
            hashed: Default::default(),
        }
    }

    /// Keeps the digests of files left alone for `quiet` (a minute otherwise), for tests
    /// whose files were just written.
    #[cfg(feature = "testing")]
    pub fn remember_digests_of_files_quiet_for(mut self, quiet: Duration) -> Self {
        self.hashed = crate::hashed::Hashed::quiet_for(quiet);
        self
    }

    /// How many source digests were reused from an earlier attempt instead of reading
    /// the file again.
    pub fn digests_reused(&self) -> u64 {
        self.hashed.reused()
    }

    /// The records (for tests and diagnostics).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// The share `msg`'s file is on (its first candidate's), and the budget of blocking
    /// calls given up there.
    fn share_of(&self, msg: &AssetSweeperFile) -> (std::path::PathBuf, crate::stuck::Bounded) {
        let share = paths::candidates(&self.roots, &msg.parent_dir, &msg.filename)
            .first()
            .map(|p| self.mounts.share_of(p))
            .unwrap_or_default();
        let budget = self.remote.of(&share);
        (share, budget)
    }

    /// The store (tests and diagnostics).
    pub fn tier(&self) -> &Tier {
        &self.tier
    }

    /// Aborts the recorded multipart uploads no part was stored for in `older_than`
    /// (their copy was given up: the file was deleted, or its message dead-lettered) and
    /// forgets them; returns how many it aborted (one the store no longer holds is only
    /// forgotten). An upload whose key is claimed is left alone: its
    /// copy is running.
    pub async fn abort_abandoned_uploads(&self, older_than: Duration) -> Result<usize, TierError> {
        let Some(mp) = &self.tier.multipart else {
            return Ok(0);
        };
        let mut aborted = 0;
        for u in self.records.uploads_untouched_for(older_than).await? {
            let key = crate::store::object_path(&u.object_key);
            // Claimed like a copy, so a redelivery cannot resume it while it is aborted.
            let Ok(claim) = Claim::take(&self.records, &key).await else {
                continue;
            };
            // Looked at again under the claim: a copy may have resumed it since the list
            // was read (each abort before it is a store call), and stopped again.
            match self
                .records
                .still_untouched(key.as_ref(), &u.upload_id, older_than)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    claim.release().await;
                    continue;
                }
                Err(e) => {
                    claim.release().await;
                    return Err(e.into());
                }
            }
            // The claim is kept alive while the abort runs, as a copy keeps its own: a store
            // slow to answer would otherwise outlast the lease, and a redelivered copy take
            // the key and resume the upload this abort then removes under it. Lost anyway
            // (the database stopped answering), the abort is given up for the next sweep.
            let abort = copy::abort_recorded(mp.as_ref(), &self.records, &key, &u.upload_id);
            let done = tokio::select! {
                biased;
                done = abort => done,
                e = claim.keep() => {
                    tracing::warn!(key = %key, upload_id = %u.upload_id, error = %e, "gave up aborting an abandoned multipart upload: its claim was lost");
                    copy::GivenUp::Kept
                }
            };
            claim.release().await;
            match done {
                copy::GivenUp::Aborted => {
                    tracing::warn!(key = %key, upload_id = %u.upload_id, "aborted an abandoned multipart upload");
                    aborted += 1;
                }
                // Most often a completed upload whose record could not be forgotten then
                // (the database out of reach): nothing was abandoned.
                copy::GivenUp::AlreadyGone => {
                    tracing::info!(key = %key, upload_id = %u.upload_id, "forgot a recorded multipart upload the store no longer holds (completed, or aborted by the bucket's lifecycle rule)");
                }
                // Logged where it was refused; its parts stay billed until the bucket's
                // lifecycle rule removes them.
                copy::GivenUp::NotAllowed | copy::GivenUp::Kept => {}
            }
        }
        Ok(aborted)
    }

    /// Handles one message; failures are recorded with their attempt number — an outage's
    /// only at attempts 0, 1, 2, 4, 8…: its retries go on for up to a day, and a row per
    /// attempt of every waiting file filled the table by millions.
    pub async fn handle(
        &self,
        msg: &AssetSweeperFile,
        attempt: u32,
    ) -> Result<TierOutcome, TierError> {
        let mut r = self.copy(msg).await;
        // An earlier copy found, by a message without the id an earlier one brought: the
        // report names the recorded id (a fresh upload's record holds the message's).
        if let Ok(TierOutcome::Copied(c)) = &mut r
            && c.imported_id.is_none()
            && !c.uploaded
        {
            match self
                .records
                .recorded_imported_id(&c.original_path, &c.key)
                .await
            {
                Ok(id) => c.imported_id = id,
                Err(e) => r = Err(e.into()),
            }
        }
        let recorded = |e: &TierError| {
            !matches!(e, TierError::Unavailable(_)) || attempt == 0 || attempt.is_power_of_two()
        };
        if let Err(e) = &r
            && recorded(e)
        {
            let permanent = matches!(e, TierError::Permanent(_));
            if let Err(db) = self
                .records
                .record_failure(&msg.joined_path(), &e.to_string(), permanent, attempt)
                .await
            {
                tracing::warn!(error = %db, "could not record the failure");
            }
        }
        r
    }

    async fn copy(&self, msg: &AssetSweeperFile) -> Result<TierOutcome, TierError> {
        let mut reused = None;
        let r = self.copy_reusing(msg, &mut reused).await;
        // A digest kept or reused by a copy that then failed other than by an outage
        // (what was read is not what the digest says) is not reused.
        if let (Err(e), Some(id)) = (&r, reused)
            && !matches!(e, TierError::Unavailable(_))
        {
            self.hashed.forget(&id);
        }
        r
    }

    /// [`Self::copy`]; `reused` names the file whose digest was kept for, or taken from,
    /// the file's other attempts, if one was.
    async fn copy_reusing(
        &self,
        msg: &AssetSweeperFile,
        reused: &mut Option<crate::hashed::Identity>,
    ) -> Result<TierOutcome, TierError> {
        msg.check_text()
            .map_err(|e| TierError::Permanent(e.to_string()))?;
        if msg.ignore && self.policy.skip_ignored {
            self.records
                .record_ignored(&msg.joined_path(), msg.imported_id.as_deref())
                .await?;
            return Ok(TierOutcome::Ignored);
        }
        // On a blocking thread where a root is on a share, or a link is on the way (its
        // target may be on one, whatever the roots are on): when a share's server stops
        // answering, opening or `stat`ing a file there blocks until it answers, and a few
        // such files on the runtime's own threads stalled everything else there — the
        // broker's heartbeats (the connection dropped), health, metrics, claim renewals.
        let inline = match self.mounts.may_block() {
            true => None,
            false => open_source(&self.roots, &msg.parent_dir, &msg.filename, false)?,
        };
        // Reached through a link, the file may be on a share whatever the roots are on: it is
        // looked at again as a remote one.
        let remote = inline.is_none();
        let opened = match inline {
            Some(o) => o,
            None => {
                let roots = self.roots.clone();
                let (parent_dir, filename) = (msg.parent_dir.clone(), msg.filename.clone());
                let (share, budget) = self.share_of(msg);
                budget
                    .run(move || open_source(&roots, &parent_dir, &filename, true))
                    .await
                    .map_err(|e| share_not_answering("opening", msg, &share, e))??
                    .ok_or_else(|| {
                        TierError::Transient("opening the source ended without an answer".into())
                    })?
            }
        };
        let (resolved, meta) = match opened {
            Opened::File(resolved, meta) => (resolved, meta),
            Opened::Missing(e) => {
                if let Some(report) = self.copied_before(msg).await? {
                    return Ok(TierOutcome::Copied(report));
                }
                // The store's own share away: its copy could not be seen, which does not
                // make the file's loss final — retried until the share is back, when the
                // copy is found (a blocking check: the share may not answer).
                if let Some(m) = self.tier.local_mount.clone()
                    && let Ok(Some(share)) =
                        tokio::task::spawn_blocking(move || m.unmounted()).await
                {
                    return Err(copy::CopyError::StoreUnmounted(share.display().to_string()).into());
                }
                // So is a bucket that is not there (renamed, re-created, a store restarted
                // before its buckets): its 404 read as "the copy is gone". Where the
                // bucket cannot be asked about (a role without `s3:ListBucket`), as before.
                if let Some(s3) = &self.tier.s3
                    && let Ok(false) = s3.bucket_exists().await
                {
                    return Err(TierError::Unavailable(format!(
                        "the store's bucket is not there (NoSuchBucket), retried as an outage \
                         (up to [retry] max_outage_ms): {e}"
                    )));
                }
                // Below a share that was mounted (or that fstab lists) and is not now: the
                // file is away with its share, not gone — retried, not dead-lettered with
                // every other file of the share.
                let away = paths::candidates(&self.roots, &msg.parent_dir, &msg.filename)
                    .iter()
                    .find_map(|p| self.mounts.unmounted_share_above(p));
                return Err(match away {
                    Some(share) => TierError::Unavailable(format!(
                        "the share mounted at {} is not mounted now, retried as an outage (up to \
                         [retry] max_outage_ms): {e}",
                        share.display()
                    )),
                    None => e.into(),
                });
            }
        };
        let file = &resolved.file;
        let original = resolved.path.display().to_string();
        // A file of this tier's own local store, swept through an online root that holds
        // the store: its copy would go inside the store itself, be swept and copied again,
        // one level deeper each time, each reported as a new copy. (A root inside the store
        // is not that: its files' copies land outside the root.)
        if let Some(store) = &self.tier.local_dir
            && resolved.path.starts_with(store)
            && self
                .roots
                .iter()
                .any(|r| store.starts_with(&r.canonical) && *store != r.canonical)
        {
            return Err(TierError::Permanent(format!(
                "{original} is inside this tier's own store {}: what the store holds is never \
                 copied into the store itself (leave the store out of the asset sweeper)",
                self.tier.display
            )));
        }
        let size = meta.len();
        let mtime = {
            use std::os::unix::fs::MetadataExt;
            mtime_text(meta.mtime(), meta.mtime_nsec()).ok_or_else(|| {
                TierError::Permanent(format!(
                    "{original}: its modification time ({} s since 1970) is out of range",
                    meta.mtime()
                ))
            })?
        };
        let alg = self.policy.algorithm;
        let report = |obj: &StoredObject, uploaded: bool| CopyReport {
            original_path: original.clone(),
            store: self.tier.display.clone(),
            key: obj.object_key.clone(),
            size: obj.size,
            checksum: obj.checksum.clone(),
            algorithm: alg.name(),
            content_sha256: obj.content_sha256.clone(),
            mtime: mtime.clone(),
            uploaded,
            imported_id: msg.imported_id.clone(),
        };

        // 1. This very file (same size and mtime) was copied before and the stored object
        //    still reads back with the recorded checksum (a damaged copy is not trusted).
        //    On S3 the store's checksum settles that without downloading the object.
        //    Not looked up for a small file bound for a local store: its copy finds an
        //    earlier one when it is published (the key is taken; the object there is read
        //    back, compared and recorded again), so only a redelivery pays, with a small
        //    copy, while every first copy saves a database round trip.
        let small_local = self.tier.local_dir.is_some() && size < crate::local::BLOCK as u64;
        let earlier = if small_local {
            Vec::new()
        } else {
            self.records.copies_of(&original, size, &mtime).await?
        };
        let state = copy::SourceState::of(&meta).on_remote(remote);
        state.settle(file, &original).await?;
        // A file the store can never hold is refused before anything reads it: nearline
        // hashed one whole first (terabytes read for a refusal, at every redelivery).
        copy::part_size(size, self.tier.min_part, self.tier.local_dir.is_none())?;
        // The source's digest, where an earlier copy or (nearline) an identical object is
        // looked for: size and modification time do not prove the content (a file
        // replaced by another of its size with its time kept, `cp -p`, must be copied,
        // not reported as the earlier copy). What was hashed is what the copy is
        // recorded with (size and mtime above).
        let mut source: Option<Digest> = None;
        if !earlier.is_empty() || self.policy.reuse_identical {
            let id = crate::hashed::Identity::of(&meta);
            source = Some(match self.hashed.get(&id) {
                // Its retry (an outage waited out, another copy of the content awaited):
                // not read whole again if it is the file hashed then, unchanged.
                Some(d) => {
                    *reused = Some(id);
                    state.confirm(file, &original).await?;
                    d
                }
                None => {
                    let began = std::time::SystemTime::now();
                    let d = copy::hash_open(file, &original, alg).await?;
                    state.confirm(file, &original).await?;
                    self.hashed.keep(id.clone(), &d, began, file, remote).await;
                    // Forgotten too if this copy fails other than by an outage.
                    *reused = Some(id);
                    d
                }
            });
        }
        if let Some(d) = &source {
            for earlier in earlier
                .into_iter()
                .filter(|e| e.object.checksum == d.checksum)
            {
                let mut obj = earlier.object;
                // Recorded by an earlier release that reused the vault's own file.
                self.not_the_source(&crate::store::object_path(&obj.object_key), file, &original)
                    .await?;
                // As below: one that cannot be read back now (an archive storage class; a
                // record of a reused object may hold nothing the store's HEAD can settle)
                // is not confirmed here — the file, still here, goes on to the steps below
                // (another key's object: copied again; its own natural key in an archive
                // class: refused there, saying so).
                let confirmed = match self.holds(&mut obj, d, true).await {
                    Err(CopyError::Archived(_)) => false,
                    r => r?,
                };
                if confirmed {
                    // A Pluto id the sweeper brings once the file is imported belongs with
                    // the copy (one without keeps the recorded one; the recorded one again
                    // is no write: every sweep resends it).
                    if msg.imported_id.is_some() && msg.imported_id != earlier.imported_id {
                        self.record(&obj, &original, &mtime, msg, None).await?;
                    }
                    return Ok(TierOutcome::Copied(report(&obj, false)));
                }
                tracing::warn!(key = %obj.object_key, "recorded copy is missing, damaged, of other content or cannot be read back now; copying again");
            }
        }

        // 2. Nearline: any identical object already in the vault is reused. Two files of
        //    one content copied at once (or by two instances) each found none yet and each
        //    stored one: where there is none, the content is claimed, looked for again and
        //    stored under the claim, and another copy of it meanwhile waits (an outage's
        //    retry, not counted) until the first is recorded, then reuses its object. The
        //    content's later copies reuse it without a claim.
        let natural = self.tier.key(&resolved.relative);
        if self.policy.reuse_identical
            && let Some(d) = &source
            && let Some(obj) = self
                .identical_object(d, &natural, file, &original, &mtime, msg)
                .await?
        {
            return Ok(TierOutcome::Copied(report(&obj, false)));
        }
        let identical = match (&source, self.policy.reuse_identical) {
            (Some(d), true) => Some(
                Claim::take_as(
                    &self.records,
                    &identical_content_key(alg, d),
                    format!(
                        "identical content ({} {}, {} bytes)",
                        alg.name(),
                        d.checksum,
                        d.size
                    ),
                )
                .await?,
            ),
            _ => None,
        };
        let placed = async {
            // Looked for again under the claim: a copy of it may have finished meanwhile.
            if let Some(d) = identical.as_ref().and(source.as_ref())
                && let Some(obj) = self
                    .identical_object(d, &natural, file, &original, &mtime, msg)
                    .await?
            {
                return Ok(TierOutcome::Copied(report(&obj, false)));
            }

            // 3. The natural key, unless it holds other content: then beside it under a
            //    content-derived key. Never overwritten: on an object store each key is
            //    claimed before it is looked at, so no other handler or instance can find it
            //    free at the same time; a local store needs no claim, its copy is published
            //    only where nothing is (see crate::local), and one that lost the race looks
            //    at what won.
            let mut key = natural.clone();
            let mut races = 0;
            // Keys tried beside the natural one.
            let mut beside = 0;
            loop {
                if self.tier.s3.is_some() && key.as_ref().len() > MAX_S3_KEY {
                    return Err(TierError::Permanent(format!(
                        "object key too long: {} bytes, more than S3's {MAX_S3_KEY} (shorten the \
                         path): {key}",
                        key.as_ref().len()
                    )));
                }
                let recorded = original.len() + key.as_ref().len();
                if recorded > MAX_RECORDED_BYTES && !self.records.indexes_any_length() {
                    return Err(TierError::Permanent(format!(
                        "path and object key too long to record: {recorded} bytes together, more \
                         than the {MAX_RECORDED_BYTES} the records can index (shorten the path): \
                         {original} → {key}"
                    )));
                }
                let claim = match self.tier.local_dir {
                    Some(_) => None,
                    None => Some(Claim::take(&self.records, &key).await?),
                };
                let src = Source {
                    file,
                    original: &original,
                    mtime: &mtime,
                    size,
                    state,
                };
                // A small file bound for a local store is copied without looking at the key
                // first: its copy is never published over an object, and one that finds the
                // key taken looks then (`Raced`). Looking costs a blocking trip per file; not
                // looking costs a wasted small copy where the key is taken.
                let look_first = !small_local || races > 0;
                let outcome = self
                    .copy_claimed(claim.as_ref(), &key, &src, &mut source, msg, look_first)
                    .await;
                if let Some(c) = claim {
                    c.release().await;
                }
                match outcome? {
                    Claimed::Raced if races < 3 => races += 1,
                    Claimed::Raced => {
                        return Err(TierError::Transient(format!(
                            "{key} keeps changing under other copies"
                        )));
                    }
                    Claimed::Done(obj, uploaded) => {
                        return Ok(TierOutcome::Copied(report(&obj, uploaded)));
                    }
                    // Beside it, under a key named from the content: first its digest's
                    // first 16 hex, then — where that is another file's own name, as a file
                    // named `<name>.<16 hex>` can be — the whole digest.
                    Claimed::Occupied(d) if beside < 2 => {
                        // Named from the SHA-256 where the checksum is MD5: two contents
                        // of one MD5 would otherwise meet at one sibling key.
                        let named = d.sha256.as_deref().unwrap_or(&d.checksum);
                        let max_key = match self.tier.s3 {
                            Some(_) => MAX_S3_KEY,
                            None => usize::MAX,
                        };
                        let next = crate::store::sibling_key(&natural, named, beside == 1, max_key);
                        if next == key {
                            return Err(occupied(&natural, &key));
                        }
                        key = next;
                        beside += 1;
                        tracing::warn!(key = %natural, sibling = %key, "different content already stored under this key; storing beside it");
                    }
                    Claimed::Occupied(_) => return Err(occupied(&natural, &key)),
                }
            }
        };
        let placed: Result<TierOutcome, TierError> = match &identical {
            Some(c) => {
                tokio::pin!(placed);
                tokio::select! {
                    biased;
                    r = &mut placed => r,
                    e = c.keep() => {
                        // The content's claim only keeps one content from being stored
                        // twice at once: lost (a database stall longer than its lease),
                        // the worst that follows is a second object of it, never an
                        // overwrite (each key is claimed or created exclusively). Stopped
                        // here, the copy started again from nothing at the retry — every
                        // large copy in flight, at every stall.
                        tracing::warn!(error = %e, "the copy goes on without its claim on the content; another copy of the same content may be stored beside it");
                        placed.await
                    }
                }
            }
            None => placed.await,
        };
        if let Some(c) = identical {
            c.release().await;
        }
        placed
    }

    /// Refuses the object at `key` as the copy of `original` where it is that very file:
    /// the store is the file's own directory reached another way (a vault inside an online
    /// root, a bind mount of one) or holds a hard link of it. Reported as its copy, a
    /// remover of backed-up files deleted the only one.
    async fn not_the_source(
        &self,
        key: &ObjectPath,
        file: &std::fs::File,
        original: &str,
    ) -> Result<(), TierError> {
        // Where the object cannot be looked at, the steps after this meet that and say so.
        if let Ok(true) = copy::is_the_source(&self.tier, key, file).await {
            return Err(TierError::Permanent(format!(
                "{key} in the store is {original} itself (one file): the store is this \
                 file's own directory reached another way (inside an online root, a bind \
                 mount of one) or holds a hard link of it — no copy can be made there"
            )));
        }
        Ok(())
    }

    /// An object of the vault holding `d` (nearline's reuse), recorded as the copy of
    /// `original` too, if there is one that reads back as recorded — unless the file's own
    /// key `natural` holds an unrecorded object of its size: an earlier attempt's finished
    /// copy (stopped after its upload, its verification or record failed), which the file
    /// then takes under its key claim. Reusing another file's object left that one in the
    /// bucket unrecorded for ever, and the content stored twice.
    async fn identical_object(
        &self,
        d: &Digest,
        natural: &ObjectPath,
        file: &std::fs::File,
        original: &str,
        mtime: &str,
        msg: &AssetSweeperFile,
    ) -> Result<Option<StoredObject>, TierError> {
        let found = self
            .records
            .objects_with(&d.checksum, d.size, original)
            .await?;
        if found.iter().any(|o| o.object_key != natural.as_ref())
            && self.own_unrecorded_copy(natural, d).await
        {
            return Ok(None);
        }
        for mut obj in found {
            // Another file's key with this path may be more than the records can index
            // (roots of different depths): that object is not reused, this file is copied
            // under its own key instead of its record being refused.
            if original.len() + obj.object_key.len() > MAX_RECORDED_BYTES
                && !self.records.indexes_any_length()
            {
                continue;
            }
            // The vault's own file reached through an online root reads back as its own
            // copy: reported backed up, it was deleted as a copy elsewhere.
            self.not_the_source(&crate::store::object_path(&obj.object_key), file, original)
                .await?;
            // Confirmed by the store's checksum or read back: a damaged copy must not be
            // trusted. Another file's object that cannot be read back now (moved to an
            // archive storage class) is not confirmed: this file gets a copy of its own,
            // not a dead letter for another file's object.
            let confirmed = match self.holds(&mut obj, d, false).await {
                Err(CopyError::Archived(_)) => false,
                r => r?,
            };
            if confirmed {
                self.record(&obj, original, mtime, msg, None).await?;
                return Ok(Some(obj));
            }
        }
        Ok(None)
    }

    /// Whether the key `natural` holds an unrecorded object that may be this file's copy:
    /// of its size and, where the store's ETag is a single request's MD5 and MD5 is this
    /// tier's checksum, of its MD5 (an object replaced behind the service's back, whose
    /// record was forgotten, is not taken for it). A look that fails says no: reuse goes
    /// on as before.
    async fn own_unrecorded_copy(&self, natural: &ObjectPath, d: &Digest) -> bool {
        if !matches!(self.records.object_at(natural.as_ref()).await, Ok(None)) {
            return false;
        }
        let Some(s3) = &self.tier.s3 else {
            return matches!(copy::object_size(&self.tier, natural).await, Ok(Some(s)) if s == d.size);
        };
        match s3.head(natural).await {
            Ok(Some(h)) if h.size == d.size => {
                match h.etag.as_deref().map(|e| e.trim_matches('"')) {
                    Some(md5) if !md5.contains('-') && self.policy.algorithm == Algorithm::Md5 => {
                        md5.eq_ignore_ascii_case(&d.checksum)
                    }
                    _ => true,
                }
            }
            _ => false,
        }
    }

    /// Whether the recorded object `obj` still holds what was recorded
    /// ([`copy::confirm_recorded`]); the store's facts of it recorded again where they
    /// changed while its bytes did not.
    async fn confirm(&self, obj: &mut StoredObject) -> Result<bool, CopyError> {
        let copy::Confirmation {
            held,
            facts,
            other_content,
        } = copy::confirm_recorded(&self.tier, obj, self.policy.algorithm).await?;
        // Kept, the record of an object replaced behind the service's back sent every later
        // look (this file's, every file of its content) to download it whole again.
        if other_content
            && let Err(e) = self
                .records
                .forget_object(&obj.object_key, obj.size, &obj.checksum)
                .await
        {
            tracing::warn!(key = %obj.object_key, error = %e, "could not forget the record of an object replaced by other content");
        }
        if let Some(facts) = facts {
            if let Err(e) = self
                .records
                .set_store_facts(&obj.object_key, obj.size, &obj.checksum, &facts)
                .await
            {
                // Only a saving: the next look reads the object back again.
                tracing::warn!(key = %obj.object_key, error = %e, "could not record what the store says of an object read back unchanged");
            }
            obj.store = facts;
        }
        Ok(held)
    }

    /// Whether the recorded object `obj` still holds what was recorded, and that is the
    /// content `d` (a source's digest): its size and checksum, and where the checksum is
    /// MD5 its SHA-256 as well — MD5 tells no two contents apart. A record older than
    /// that SHA-256 has it read back from the object (one download) and filled in, so
    /// the next look needs none — unless it cannot be read back now (an archive storage
    /// class): then this path's own earlier copy (`own`: recorded for this path, size and
    /// time) is settled by the store as before, another file's object is not reused.
    async fn holds(
        &self,
        obj: &mut StoredObject,
        d: &Digest,
        own: bool,
    ) -> Result<bool, CopyError> {
        let alg = self.policy.algorithm;
        if obj.size != d.size || obj.checksum != d.checksum {
            return Ok(false);
        }
        let Some(want) = &d.sha256 else {
            return self.confirm(obj).await;
        };
        if let Some(known) = &obj.content_sha256 {
            return match known == want {
                true => self.confirm(obj).await,
                false => Ok(false),
            };
        }
        let read = match copy::read_back(&self.tier, obj, alg).await {
            Err(CopyError::Archived(_)) if own => {
                return self.confirm(obj).await;
            }
            r => r?,
        };
        let Some(sha256) = read.and_then(|r| r.sha256) else {
            return Ok(false);
        };
        if let Err(e) = self
            .records
            .set_content_sha256(&obj.object_key, obj.size, &obj.checksum, &sha256)
            .await
        {
            // Only a saving: the next look at the object reads it back again.
            tracing::warn!(key = %obj.object_key, error = %e, "could not record the SHA-256 read back from the object");
        }
        let same = &sha256 == want;
        obj.content_sha256 = Some(sha256);
        Ok(same)
    }

    /// The copy recorded of the file `msg` names as the sweeper saw it (its size and
    /// modification time), whose object still holds what was recorded. A file copied and
    /// then moved or deleted — by whoever acted on the success message of a copy whose
    /// ack was lost, so the message came again, or by an operator before a dead letter
    /// was replayed — was copied: that is reported (not uploaded by this attempt) instead
    /// of a dead letter for a file that is safe in the store.
    async fn copied_before(&self, msg: &AssetSweeperFile) -> Result<Option<CopyReport>, TierError> {
        let alg = self.policy.algorithm;
        let roots = self.roots.clone();
        let (parent_dir, filename) = (msg.parent_dir.clone(), msg.filename.clone());
        // On a blocking thread: it looks at the directories (a share may not answer).
        let (share, budget) = self.share_of(msg);
        let candidates = budget
            .run(move || paths::recorded_candidates(&roots, &parent_dir, &filename))
            .await
            .map_err(|e| share_not_answering("looking for earlier copies of", msg, &share, e))?;
        let report = |original: &str, obj: StoredObject, mtime: String| CopyReport {
            original_path: original.to_string(),
            store: self.tier.display.clone(),
            key: obj.object_key,
            size: obj.size,
            checksum: obj.checksum,
            algorithm: alg.name(),
            content_sha256: obj.content_sha256,
            mtime,
            uploaded: false,
            imported_id: msg.imported_id.clone(),
        };
        for path in &candidates {
            let original = path.display().to_string();
            let matching: Vec<_> = self
                .records
                .copies_at(&original, Some(msg.size))
                .await?
                .into_iter()
                .filter(|(_, mtime)| same_mtime(mtime, msg.mtime))
                .collect();
            // Copies of other content at this size and time (a file replaced with its time
            // kept, stored beside the first): which one the message meant cannot be told
            // without the file, so none is reported.
            if several_contents(matching.iter().map(|(o, _)| o)) {
                return Ok(None);
            }
            for (mut obj, mtime) in matching {
                if self.confirm(&mut obj).await? {
                    tracing::info!(path = %framework::telemetry::LogText(&original), key = %obj.object_key, "the file is gone but was copied before; reporting that copy");
                    return Ok(Some(report(&original, obj, mtime)));
                }
            }
        }
        // None as the sweeper saw it, but a later version was copied: the file changed
        // between the sweep and the copy (a render still being written), and was removed
        // after — the ack of that copy lost, or its message dead-lettered and replayed
        // once the file was moved on. Its newest copy is reported: the message was
        // dead-lettered as "does not exist" for a file safe in the store. Several contents
        // copied at that newest time (stored beside each other) tell nothing: none.
        for path in &candidates {
            let original = path.display().to_string();
            let mut later: Vec<_> = self
                .records
                .copies_at(&original, None)
                .await?
                .into_iter()
                .filter_map(|(o, m)| later_mtime(&m, msg.mtime).map(|t| (o, m, t)))
                .collect();
            let Some(newest) = later.iter().map(|c| c.2).reduce(f64::max) else {
                continue;
            };
            later.retain(|c| c.2 == newest);
            if several_contents(later.iter().map(|(o, _, _)| o)) {
                return Ok(None);
            }
            for (mut obj, mtime, _) in later {
                if self.confirm(&mut obj).await? {
                    tracing::info!(path = %framework::telemetry::LogText(&original), key = %obj.object_key, %mtime, "the file is gone; a later version of it was copied; reporting that copy");
                    return Ok(Some(report(&original, obj, mtime)));
                }
            }
        }
        Ok(None)
    }

    /// Whether the object at `key` (of `d`'s size) holds `d`'s content. On S3 the key's
    /// record settles it where one HEAD shows the object is still what was recorded, as
    /// for the path's own copy: a touched file (same bytes, new mtime) had its whole
    /// object downloaded again — hours and the egress of a large one, the key's claim held
    /// all the while — and one in an archive storage class (a lifecycle rule moved it to
    /// Glacier or Deep Archive) cannot be read at all: a file edited at the same size is
    /// then stored beside it, an identical one reported, instead of both dead-lettered
    /// until someone restores the object. Otherwise the object is read back and hashed
    /// (an archived one without such a record is refused).
    async fn key_holds(&self, key: &ObjectPath, d: &Digest) -> Result<Holds, TierError> {
        if self.tier.s3.is_some()
            && let Some(obj) =
                (self.records.object_at(key.as_ref()).await?).filter(|o| o.size == d.size)
            && let Some(same) = recorded_content_is(&obj, d)
            && let Some(facts) = copy::head_confirming(&self.tier, &obj).await?
        {
            return Ok(if same {
                Holds::Same(Some(facts))
            } else {
                Holds::Other
            });
        }
        Ok(
            match copy::hash_object_described(&self.tier, key, self.policy.algorithm).await? {
                // Gone since its size was read: the key is looked at again.
                None => Holds::Raced,
                Some((read, _)) if &read != d => Holds::Other,
                Some((_, copy::Described::NotS3)) => Holds::Same(None),
                Some((_, copy::Described::By(facts))) => Holds::Same(Some(facts)),
                Some((_, copy::Described::Replaced)) => Holds::Raced,
            },
        )
    }

    /// Under the claim on `key` (none on a local store): an identical object there is
    /// recorded, other content reported, and an empty key gets the upload, verified and
    /// recorded. Without `look_first` the upload is tried at once (a local store's
    /// publish reports a taken key as `Raced`).
    async fn copy_claimed(
        &self,
        claim: Option<&Claim<'_>>,
        key: &ObjectPath,
        src: &Source<'_>,
        source: &mut Option<Digest>,
        msg: &AssetSweeperFile,
        look_first: bool,
    ) -> Result<Claimed, TierError> {
        let alg = self.policy.algorithm;
        let Source {
            file,
            original,
            mtime,
            size,
            state,
        } = *src;
        // The look at an object already there (a download and hash of it, minutes for a
        // large one) runs under the claim's renewal as the copy does: another copy
        // would otherwise take the key meanwhile and repeat the whole look.
        let work = async {
            let existing = if look_first {
                copy::object_size(&self.tier, key).await?
            } else {
                None
            };
            if let Some(existing) = existing {
                self.not_the_source(key, file, original).await?;
                let d = match source {
                    Some(d) => d.clone(),
                    None => source
                        .insert(copy::hash_open(file, original, alg).await?)
                        .clone(),
                };
                let holds = if existing == d.size {
                    self.key_holds(key, &d).await?
                } else {
                    Holds::Other
                };
                if let Holds::Same(facts) = holds {
                    let obj = StoredObject {
                        object_key: key.to_string(),
                        size: d.size,
                        checksum: d.checksum.clone(),
                        content_sha256: d.sha256.clone(),
                        store: facts.unwrap_or_default(),
                    };
                    // The file hashed is still the one first looked at (its size and mtime
                    // are recorded with this object).
                    state.confirm(file, original).await?;
                    // Another copy's object, whose directory fsync may still run.
                    copy::make_durable(&self.tier, key).await?;
                    self.record(&obj, original, mtime, msg, claim).await?;
                    return Ok(Claimed::Done(obj, false));
                }
                // Replaced or gone between the read and its HEAD (an outside writer, an
                // expiry): the key is looked at again.
                if let Holds::Raced = holds {
                    return Ok(Claimed::Raced);
                }
                return Ok(Claimed::Occupied(d));
            }

            // 4. Stream, hashing as we go; then verify (store checksum, read-back, or, on a
            //    local store, the durable write itself). The claim is renewed
            //    meanwhile; losing it stops the copy before anything is recorded.
            let mut attrs = Attributes::new();
            if self.policy.keep_metadata {
                // Percent-encoded as a URL path is (`%20` for a space, `/` kept): a form's
                // `+` for a space read back as a `+` by every URL decoder.
                let path = percent_encoding::utf8_percent_encode(original, &crate::s3::KEY_ENCODE)
                    .to_string();
                // S3 keeps at most 2 KB of user metadata and refuses the upload beyond it (a
                // long non-ASCII path triples when encoded): such a path is left out of the
                // metadata (it is in the record) instead of failing the copy on every retry.
                if path.len() <= MAX_PATH_METADATA {
                    attrs.insert(Attribute::Metadata("original-path".into()), path.into());
                } else {
                    tracing::warn!(key = %key, bytes = path.len(), "original path too long for the object's metadata; left out");
                }
                attrs.insert(Attribute::Metadata("size".into()), size.to_string().into());
                attrs.insert(
                    Attribute::Metadata("mtime".into()),
                    mtime.to_string().into(),
                );
            }
            let resume = copy::Resume {
                records: &self.records,
                mtime,
                digest: source.as_ref(),
                state: Some(state),
            };
            let mut up =
                match copy::upload(&self.tier, key, file, original, alg, attrs, resume).await {
                    Err(CopyError::Exists(_)) => return Ok(Claimed::Raced),
                    r => r?,
                };
            if up.parts_reused > 0 {
                tracing::info!(key = %key, reused = up.parts_reused, sent = up.parts_sent, "resumed an interrupted multipart upload");
            }
            let written = up.digest.clone();
            let checked = match up.torn.take() {
                Some(e) => Err(e),
                None if source.as_ref().is_some_and(|d| d != &written) => {
                    Err(CopyError::SourceChanged(original.to_string()))
                }
                None => match copy::verify_upload(&self.tier, key, alg, &up).await {
                    Err(e @ (CopyError::Mismatch { .. } | CopyError::SourceChanged(_))) => Err(e),
                    // Not verified for want of an answer (a store blip): the retry looks
                    // at what is there.
                    other => Ok(other),
                },
            };
            let verified = match checked {
                Ok(verified) => verified,
                Err(e) => {
                    // Only this attempt wrote here (the key is claimed; a local store checks
                    // before it publishes and never gets here): take it away so the retry
                    // finds the key free, instead of a bad object it must not overwrite. Not
                    // once the claim has lapsed (this process stalled past its lease): another
                    // replica may since have found that object, verified and recorded it.
                    if let Some(c) = claim
                        && !c.still_ours().await
                    {
                        tracing::error!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "left what this attempt stored at its key: its claim on the key lapsed (another copy may have found and recorded it); if none did, it stays there recorded nowhere and the file's next copy goes beside it");
                        return Err(TierError::from(e));
                    }
                    copy::remove(self.tier.store.as_ref(), key).await?;
                    tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "removed what this attempt stored");
                    return Err(TierError::from(e));
                }
            };
            let facts = verified?;
            let obj = StoredObject {
                object_key: key.to_string(),
                size: written.size,
                checksum: written.checksum,
                content_sha256: written.sha256,
                store: facts,
            };
            // The object is durable (a local copy fsyncs its directory entry too, an
            // object store's completed upload is), then recorded: a power loss between
            // them leaves an object without a record, which the redelivery finds
            // identical.
            self.record(&obj, original, mtime, msg, claim).await?;
            Ok(Claimed::Done(obj, true))
        };
        match claim {
            // The copy first: one that finished as its claim went (released by its own
            // record) is done, not "lost the upload claim".
            Some(claim) => tokio::select! {
                biased;
                r = work => r,
                e = claim.keep() => Err(e),
            },
            None => work.await,
        }
    }

    /// Records a copy; under a claim, gives the claim up in the same commit.
    async fn record(
        &self,
        obj: &StoredObject,
        original: &str,
        mtime: &str,
        msg: &AssetSweeperFile,
        claim: Option<&Claim<'_>>,
    ) -> Result<(), TierError> {
        if let Some(c) = claim {
            c.releasing
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.records
            .record_copy_releasing(
                obj,
                self.policy.algorithm.name(),
                original,
                mtime,
                msg.imported_id.as_deref(),
                claim.map(|c| (c.key.as_str(), c.owner.as_str())),
            )
            .await?;
        if let Some(c) = claim {
            c.released.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The opened source file and what is known of it.
#[derive(Clone, Copy)]
struct Source<'a> {
    file: &'a std::fs::File,
    original: &'a str,
    mtime: &'a str,
    size: u64,
    /// Its state when first looked at (size and mtime as recorded).
    state: copy::SourceState,
}

/// What an object found at a file's key holds, compared with the file.
enum Holds {
    /// The file's content, with the store's facts of the very object compared (S3: the
    /// HEAD that confirmed the record, or the one after the read whose ETag it shares).
    Same(Option<crate::records::StoreFacts>),
    /// Other content (or nothing).
    Other,
    /// Replaced or gone between the read and the HEAD describing it.
    Raced,
}

/// What a claimed key held.
enum Claimed {
    /// Recorded (uploaded or already there).
    Done(StoredObject, bool),
    /// Other content, with the source's digest.
    Occupied(Digest),
    /// Another copy published an object under the key first (local store), or the object
    /// found there went before it was recorded: look again.
    Raced,
}

/// How long a claim lasts unrenewed (it is renewed every quarter of it): a killed process
/// blocks its key this long at most, and the redelivery is retried meanwhile.
pub(crate) const CLAIM_LEASE: Duration = Duration::from_secs(20);

/// This attempt's claim on one key.
struct Claim<'a> {
    records: &'a Records,
    key: String,
    /// What is claimed, in messages.
    shown: String,
    owner: String,
    /// Until when the lease surely holds: counted from the request that took or last
    /// renewed it, not from its answer.
    held_until: std::sync::Mutex<tokio::time::Instant>,
    /// Given up already (with the record of the copy).
    released: std::sync::atomic::AtomicBool,
    /// Being given up with the record of the copy: a renewal finding it gone then is no
    /// loss (the record's commit released it).
    releasing: std::sync::atomic::AtomicBool,
}

impl<'a> Claim<'a> {
    /// Claims `key`, or a retryable error if another copy to it is in progress.
    async fn take(records: &'a Records, key: &ObjectPath) -> Result<Self, TierError> {
        Self::take_as(records, key.as_ref(), key.to_string()).await
    }

    /// Claims `key` (of an object, or of something else no object key can be), named
    /// `shown` in messages, or a retryable error if another copy holds it.
    async fn take_as(records: &'a Records, key: &str, shown: String) -> Result<Self, TierError> {
        // Made before it is asked for: dropped while the request is on its way (its
        // handler stopped: the write is committed all the same), or failing where the
        // commit may have landed, it is given up by `Drop` — not held for its whole lease
        // by an owner no one knows. Giving up a claim never granted deletes nothing (the
        // release is the owner's only).
        let claim = Self {
            records,
            key: key.to_string(),
            shown,
            owner: uuid::Uuid::new_v4().to_string(),
            held_until: std::sync::Mutex::new(tokio::time::Instant::now() + records.claim_lease()),
            released: std::sync::atomic::AtomicBool::new(false),
            releasing: std::sync::atomic::AtomicBool::new(false),
        };
        if !records
            .claim(key, &claim.owner, records.claim_lease())
            .await?
        {
            claim
                .released
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // Waited out, not counted: the other copy may take longer than all the
            // attempts' tiers together (a large file), and the key is not this message's
            // fault.
            return Err(TierError::Unavailable(format!(
                "another copy to {} is in progress",
                claim.shown
            )));
        }
        Ok(claim)
    }

    /// Renews the claim until it is lost (never returns while it is held). The lease is
    /// counted from each renewal's request, and a renewal that does not answer before
    /// the lease nears its end (a hung database connection) counts as lost: another
    /// instance may take the key once it expires, so this copy must stop before then.
    async fn keep(&self) -> TierError {
        use tokio::time::Instant;
        let margin = self.records.claim_lease() / 4;
        let mut pause = self.records.claim_lease() / 4;
        loop {
            // Looked at before waiting too: a process paused past the lease as the claim
            // was taken (a frozen VM) learns it at once, not a quarter of a lease later.
            if Instant::now() + margin >= self.held_until() {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = self.records.claim_lease() / 4;
            let held_until = self.held_until();
            match self.renew_within(margin).await {
                Ok(Ok(true)) => {}
                // Released by the copy's own record, committed with this renewal: the
                // copy is done, and its result is the one to report.
                Ok(Ok(false)) if self.releasing.load(std::sync::atomic::Ordering::Relaxed) => {
                    std::future::pending::<()>().await;
                }
                Ok(Ok(false)) => break,
                // A database blip, or the claim's row locked a while by another session
                // (PostgreSQL locks it for a claim of the same key that failed, until that
                // claim's batch ends: up to its lock timeout): kept while the lease still
                // covers us, and tried again soon — a quarter lease later, two failed
                // renewals in a row used up the lease however short the lock.
                Ok(Err(e)) if Instant::now() + margin < held_until => {
                    tracing::warn!(key = %self.key, error = %framework::telemetry::LogText(&e.to_string()), "could not renew the upload claim");
                    pause = (self.records.claim_lease() / 20).max(Duration::from_millis(100));
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        TierError::Unavailable(format!("lost the upload claim on {}", self.shown))
    }

    /// Whether the claim is still this copy's, asked before it acts on the key: a
    /// process stalled past its lease (a frozen VM, a stopped container) learns it here,
    /// not at the next renewal. Renewed to be sure; where the database does not answer in
    /// time, the lease as last renewed decides, with room (a quarter lease) for a request.
    async fn still_ours(&self) -> bool {
        use tokio::time::Instant;
        let margin = self.records.claim_lease() / 4;
        let surely_held = || {
            !self.released.load(std::sync::atomic::Ordering::Relaxed)
                && Instant::now() + margin < self.held_until()
        };
        if !surely_held() {
            return false;
        }
        match self.renew_within(margin).await {
            Ok(Ok(held)) => held,
            Ok(Err(_)) | Err(_) => surely_held(),
        }
    }

    /// Renews the claim once, given until `margin` before its lease ends (the lease is
    /// counted from the request), and extends the lease where the renewal held.
    async fn renew_within(
        &self,
        margin: Duration,
    ) -> Result<Result<bool, db::sqlx::Error>, tokio::time::error::Elapsed> {
        let asked = tokio::time::Instant::now();
        let lease = self.records.claim_lease();
        let budget = self
            .held_until()
            .saturating_duration_since(asked)
            .saturating_sub(margin);
        let renewed =
            tokio::time::timeout(budget, self.records.renew(&self.key, &self.owner, lease)).await;
        if let Ok(Ok(true)) = renewed {
            *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) = asked + lease;
        }
        renewed
    }

    fn held_until(&self) -> tokio::time::Instant {
        *self.held_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the claim up (a failure only delays others until the lease ends, so it is
    /// not waited for beyond that: a hung database must not hold the handler).
    async fn release(self) {
        if self
            .released
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let left = self
            .held_until()
            .saturating_duration_since(tokio::time::Instant::now());
        let release = self.records.release(&self.key, &self.owner);
        match tokio::time::timeout(left, release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %framework::telemetry::LogText(&e.to_string()), "could not release the upload claim");
            }
            Err(_) => {
                tracing::warn!(key = %self.key, "no answer releasing the upload claim; its lease ends it");
            }
        }
    }
}

/// A claim dropped unreleased — its handler stopped mid-copy (a lost connection, a
/// shutdown) — is given up in the background: its redelivery, at once, would otherwise
/// find the key held until the lease ran out and use up retries meanwhile.
impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.released.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let lease = self.records.claim_lease();
        let (records, key, owner) = (
            self.records.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        rt.spawn(async move {
            let _ = tokio::time::timeout(lease, records.release(&key, &owner)).await;
        });
    }
}

/// Whether the recorded object `obj` (confirmed still at its key) holds `d`'s content,
/// where the record tells: other checksum, other content; one MD5 does not tell two
/// contents apart, so the same only where the SHA-256 is known on both sides or is the
/// checksum itself.
fn recorded_content_is(obj: &StoredObject, d: &Digest) -> Option<bool> {
    if obj.checksum != d.checksum {
        return Some(false);
    }
    match (&obj.content_sha256, &d.sha256) {
        (Some(a), Some(b)) => Some(a == b),
        (_, None) => Some(true),
        (None, Some(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::mtime_text;

    /// Contents told apart by checksum, and by SHA-256 among the records that know it,
    /// every record against every other (not each against the first, which may know none).
    #[test]
    fn several_contents_are_told_by_every_known_digest() {
        use super::{StoredObject, several_contents};
        let obj = |md5: &str, sha: Option<&str>| StoredObject {
            object_key: "k".into(),
            size: 1,
            checksum: md5.into(),
            content_sha256: sha.map(Into::into),
            store: Default::default(),
        };
        let several = |v: &[StoredObject]| several_contents(v.iter());
        assert!(!several(&[obj("a", None), obj("a", Some("x"))]));
        assert!(!several(&[obj("a", Some("x")), obj("a", Some("x"))]));
        assert!(several(&[
            obj("a", None),
            obj("a", Some("x")),
            obj("a", Some("y"))
        ]));
        assert!(several(&[obj("a", None), obj("b", None)]));
        assert!(!several(&[obj("a", None)]));
    }

    /// Two roots on shares: the opens given up on one whose server stopped answering use
    /// up its budget only. With one budget for the copier, every file of the other root
    /// was refused ("earlier calls still have no answer") while the first was away.
    #[tokio::test]
    async fn a_share_that_stopped_answering_holds_back_only_its_own_files() {
        let dir = tempfile::tempdir().expect("temp");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for root in [&a, &b] {
            std::fs::create_dir_all(root.join("p")).expect("root");
            std::fs::write(root.join("p/f.mov"), b"bytes").expect("file");
        }
        let roots = crate::paths::open_roots(&[a.clone(), b.clone()], false).expect("roots");
        let tier = crate::store::local(&dir.path().join("store")).expect("store");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let records = crate::records::Records::open(&url).await.expect("records");
        let policy = super::TierPolicy {
            algorithm: crate::Algorithm::Sha256,
            keep_metadata: false,
            reuse_identical: false,
            skip_ignored: true,
            read_back: false,
        };
        let mut c = super::TierCopier::new(roots, tier, records, policy);
        c.mounts.assume_remote();
        // A wait no healthy call on a loaded machine reaches (root b's must answer).
        c.remote = crate::stuck::PerShare::new(framework::testing::WAIT, 1, 8);
        // Root a's server stops answering: a call there hangs, and is given up (its
        // caller stopped waiting: counted as stuck at once).
        let (release, hang) = std::sync::mpsc::channel::<()>();
        let share_a = c
            .mounts
            .share_of(&a.canonicalize().expect("a").join("p/f.mov"));
        {
            use futures_util::FutureExt;
            let budget = c.remote.of(&share_a);
            let call = budget.run(move || hang.recv());
            assert!(call.now_or_never().is_none(), "given up");
        }
        let msg = |root: &std::path::Path| -> crate::AssetSweeperFile {
            serde_json::from_value(serde_json::json!({
                "imported_id": null, "size": 5, "ignore": false, "mime_type": "video/quicktime",
                "mtime": 1704067200, "ctime": 1704067200, "atime": 1704067200,
                "owner": 1000, "group": 1000,
                "parent_dir": root.join("p").display().to_string(), "filename": "f.mov",
            }))
            .expect("message")
        };
        match c.handle(&msg(&b), 1).await {
            Ok(super::TierOutcome::Copied(r)) => assert!(r.uploaded, "{r:?}"),
            other => panic!("root b's file is copied: {other:?}"),
        }
        match c.handle(&msg(&a), 1).await {
            Err(super::TierError::Unavailable(e)) => {
                assert!(
                    e.contains("still have no answer") && e.contains("/a"),
                    "{e}"
                )
            }
            other => panic!("root a's file waits for its share: {other:?}"),
        }
        drop(release);
    }

    /// A claim released by its copy's own record is no lost claim: a renewal that finds it
    /// gone then (committed with the record) does not end the copy as "lost the upload
    /// claim" — a copy done and recorded reported as failed, hashed again and reported
    /// not uploaded at its retry.
    #[tokio::test]
    async fn a_claim_released_by_its_own_record_is_not_lost() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let records = crate::records::Records::open(&url).await.expect("records");
        let key = crate::store::object_path("k");
        let claim = super::Claim::take(&records, &key).await.expect("claimed");
        claim
            .releasing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let obj = crate::records::StoredObject {
            object_key: "k".into(),
            size: 1,
            checksum: "00".into(),
            content_sha256: None,
            store: Default::default(),
        };
        records
            .record_copy_releasing(
                &obj,
                "sha256",
                "/online/k",
                "2020-01-01T00:00:00+00:00",
                None,
                Some((claim.key.as_str(), claim.owner.as_str())),
            )
            .await
            .expect("recorded, the claim released");
        // Its first renewal comes a quarter of the lease in, and finds the claim gone.
        let watched = tokio::time::timeout(
            super::CLAIM_LEASE / 4 + super::CLAIM_LEASE / 8,
            claim.keep(),
        )
        .await;
        assert!(watched.is_err(), "{:?}", watched.map(|e| e.to_string()));
    }

    /// A claim whose lease ran out before it was watched (the process paused as it was
    /// taken) is lost at once: its copy wrote on for a quarter of a lease on a key another
    /// replica may hold by then.
    #[tokio::test]
    async fn a_claim_paused_past_its_lease_is_lost_at_once() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let records = crate::records::Records::open(&url).await.expect("records");
        let claim = super::Claim::take(&records, &crate::store::object_path("k"))
            .await
            .expect("claimed");
        *claim.held_until.lock().expect("lock") = tokio::time::Instant::now();
        let lost = tokio::time::timeout(super::CLAIM_LEASE / 8, claim.keep())
            .await
            .expect("lost before its first renewal");
        assert!(lost.to_string().contains("lost the upload claim"), "{lost}");
    }

    /// A claim whose row another session holds locked for two of its renewals (a failed
    /// claim of the same key waiting in its batch behind a paused replica's lock, up to the
    /// lock timeout) is kept once the lock goes, while its lease still covers it: renewed
    /// a quarter lease after each failure, it was lost after two, whenever the lock went.
    /// The lock goes once two renewals have waited on it (seen in `pg_stat_activity`), not
    /// at a time set beforehand.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_outlasts_a_lock_on_its_row_shorter_than_its_lease() {
        use db::sqlx::Connection as _;
        let pg = db::testing::TempPostgres::create().await.expect("database");
        let records = crate::records::Records::open(&pg.url)
            .await
            .expect("records");
        let lease = records.claim_lease();
        let claim = super::Claim::take(&records, &crate::store::object_path("k"))
            .await
            .expect("claimed");
        let mut kept = Box::pin(claim.keep());
        // Past the first renewal (a quarter lease in).
        tokio::select! {
            lost = &mut kept => panic!("lost before the lock: {lost}"),
            () = tokio::time::sleep(lease * 3 / 10) => {}
        }
        let mut locker = db::sqlx::AnyConnection::connect(&pg.url)
            .await
            .expect("another session");
        for step in [
            "BEGIN",
            "SELECT owner FROM upload_claims WHERE object_key = 'k' FOR UPDATE",
        ] {
            db::sqlx::raw_sql(step)
                .execute(&mut locker)
                .await
                .expect("the row, locked");
        }
        let mut look = db::sqlx::AnyConnection::connect(&pg.url)
            .await
            .expect("a session to look with");
        // Two renewals wait on the lock and give up (half a second each).
        for waiting in [true, false, true, false] {
            let deadline = tokio::time::Instant::now() + framework::testing::WAIT;
            loop {
                let waits: i64 = db::sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&mut look)
                .await
                .expect("activity");
                if (waits > 0) == waiting {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a renewal {} the lock",
                    if waiting {
                        "waiting on"
                    } else {
                        "giving up on"
                    }
                );
                tokio::select! {
                    lost = &mut kept => panic!("lost while the lease still covered it: {lost}"),
                    () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
        }
        db::sqlx::raw_sql("ROLLBACK")
            .execute(&mut locker)
            .await
            .expect("unlocked");
        // Renewed a quarter lease after its second failure, the lease had run out by then.
        tokio::select! {
            lost = &mut kept => panic!("lost after the lock went: {lost}"),
            () = tokio::time::sleep(lease / 2) => {}
        }
        drop(kept);
        claim.release().await;
        records.close().await;
        pg.drop_db().await.expect("drop");
    }

    /// Waits until another owner can take `key`: well before the lease of the claim given
    /// up on it would have ended.
    async fn next_owner_takes(records: &crate::records::Records, key: &str) {
        // Half the lease: room for a loaded machine's SQLite write, and still well before
        // the lease (taken before this wait began) ends.
        let deadline = tokio::time::Instant::now() + super::CLAIM_LEASE / 2;
        while !records
            .claim(key, "next", super::CLAIM_LEASE)
            .await
            .expect("claim")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "given up well before its lease ends"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A claim dropped without being released (its handler stopped mid-copy) is given up
    /// at once, not held until its lease ends: the redelivery can take the key.
    #[tokio::test]
    async fn a_claim_dropped_unreleased_is_given_up() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let records = crate::records::Records::open(&url).await.expect("records");
        let key = crate::store::object_path("k");
        let claim = super::Claim::take(&records, &key).await.expect("claimed");
        drop(claim);
        next_owner_takes(&records, "k").await;
    }

    /// A claim whose handler stopped while it was being taken (its write queued, its
    /// answer not yet come) is given up too: the write commits all the same, and held by
    /// an owner no one knew it blocked the redelivery for its whole lease.
    #[tokio::test]
    async fn a_claim_dropped_while_being_taken_is_given_up() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let records = crate::records::Records::open(&url).await.expect("records");
        let key = crate::store::object_path("k");
        assert!(
            super::Claim::take(&records, &key).now_or_never().is_none(),
            "its write is queued, its answer not come"
        );
        next_owner_takes(&records, "k").await;
    }

    /// Set in the child process of the test below, which runs out of descriptors.
    const OUT_OF_DESCRIPTORS: &str = "STORAGETIER_TEST_OUT_OF_DESCRIPTORS";

    /// A source that cannot be opened because the process is out of descriptors (16 large
    /// copies beside a leak) is an outage waited out uncounted, not a counted retry of a
    /// file that is fine: counted, a backlog went to the DLQ as "retries exhausted". Run
    /// in a child process of its own, as the limit is the whole process's.
    #[test]
    fn opening_a_source_out_of_descriptors_is_an_outage() {
        let dir = tempfile::tempdir().expect("temp");
        std::fs::write(dir.path().join("a.mov"), b"x").expect("source");
        let roots = crate::paths::open_roots(&[dir.path().to_path_buf()], false).expect("roots");
        let parent = dir.path().display().to_string();
        if std::env::var_os(OUT_OF_DESCRIPTORS).is_none() {
            use framework::testing::process::RunWithin;
            let exe = std::env::current_exe().expect("own test binary");
            let out = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "tier::tests::opening_a_source_out_of_descriptors_is_an_outage",
                    "--test-threads=1",
                ])
                .env(OUT_OF_DESCRIPTORS, "1")
                .output_within(framework::testing::WAIT)
                .expect("the child test runs");
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "the child ran the test"
            );
            // With descriptors to spare, the same file opens.
            assert!(matches!(
                super::open_source(&roots, &parent, "a.mov", true),
                Ok(Some(super::Opened::File(..)))
            ));
            return;
        }
        let highest = std::fs::read_dir("/proc/self/fd")
            .expect("own descriptors")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(2);
        let limit = libc::rlimit {
            rlim_cur: highest + 1,
            rlim_max: highest + 64,
        };
        // SAFETY: reads one struct; this child process runs this one test.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        // Fill whatever numbers below the limit are free.
        let mut held = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            held.push(f);
        }
        let got = super::open_source(&roots, &parent, "a.mov", true);
        drop(held);
        match got {
            Err(super::TierError::Unavailable(e)) => assert!(e.contains("a.mov"), "{e}"),
            Err(e) => panic!("not an outage: {e}"),
            Ok(_) => panic!("opened with no descriptor free"),
        }
    }

    #[test]
    fn modification_times_read_as_before_and_out_of_range_ones_are_refused() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_764_400_000, 250_000_000);
        assert_eq!(
            mtime_text(1_764_400_000, 250_000_000),
            Some(chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
            "the records' existing text, so earlier copies are still found"
        );
        assert_eq!(
            mtime_text(-1, 0).as_deref(),
            Some("1969-12-31T23:59:59+00:00")
        );
        assert_eq!(mtime_text(10_000_000_000_000, 0), None);
        assert_eq!(mtime_text(i64::MIN, 0), None);
    }
}
