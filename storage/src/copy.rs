//! Streaming copy into an object store with the checksum computed on the way, and
//! verification (the store's checksum, or reading back; local tiers: see [`crate::local`]).
//! Memory per copy is bounded by the block and part sizes, not by the file size.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, Attributes, ObjectStore, PutMode, PutMultipartOptions, PutOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::checksum::Algorithm;
use crate::records::{PartRecord, Records, StoreFacts, UploadRecord};
use crate::store::Tier;

/// The source file as an upload reads it: from its start, no further than its size
/// when the upload began.
type Source = tokio::io::Take<tokio::fs::File>;

/// Read size for the source file.
const CHUNK: usize = 1024 * 1024;
/// Parts uploading at once (memory: this many parts plus the one being read).
const PARTS_IN_FLIGHT: usize = 2;
/// S3's most parts in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's largest object (5 TiB).
pub const MAX_OBJECT: u64 = 5 * 1024 * 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// The longest tick of a filesystem whose times count whole seconds (FAT's two), or of a
/// share (whose server's granularity this machine does not know), with the kernel's own
/// tick on top: a time is the coarse clock's, up to one tick behind.
const COARSE_TICK: std::time::Duration = std::time::Duration::from_millis(2_020);
/// The longest clock tick of a Linux kernel (HZ=100), twice over: the granularity of
/// ext4, XFS, btrfs and tmpfs times before Linux 6.13, exFAT's 10 ms.
const FINE_TICK: std::time::Duration = std::time::Duration::from_millis(20);
/// How far ahead of this machine's clock a share's server may be for a change time
/// later than now to be taken as just now.
const CLOCK_AHEAD: std::time::Duration = std::time::Duration::from_secs(600);

/// The state of a source file that says it still holds the bytes a copy read: size,
/// modification and change times. A rewrite in place keeps the size but not the times
/// (and one that puts the mtime back still moves the ctime).
#[derive(Debug, Clone, Copy)]
pub struct SourceState {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// Its permission bits.
    mode: u32,
    /// On a filesystem that can hang on a server (see crate::mounts): looked at again on a
    /// blocking thread, never on the runtime's.
    remote: bool,
}

impl SourceState {
    /// The state `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
            remote: false,
        }
    }

    /// The read and write bits of the file's permissions, and the owner's always (the
    /// service reads its copies back): what a local copy of it is created with (less the
    /// umask, as `cp` does), so a file only its owner or group may read is not archived
    /// readable by all.
    pub fn copy_mode(&self) -> u32 {
        (self.mode & 0o666) | 0o600
    }

    /// This state, of a file on a filesystem that can hang on a server when `remote`.
    pub fn on_remote(self, remote: bool) -> Self {
        Self { remote, ..self }
    }

    /// The file's size and times as its server has them now, on a remote filesystem
    /// (NFS, SMB): a plain `fstat` there answers from the client's attribute cache (NFS for
    /// 3 s and more), where a file another machine is still appending to looks finished.
    /// None where the kernel cannot ask (before Linux 4.11): then the cached ones.
    fn from_server(file: &std::fs::File) -> Option<std::io::Result<Self>> {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        match statx(
            file,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC,
            StatxFlags::BASIC_STATS,
        ) {
            Ok(st) => Some(Ok(Self {
                size: st.stx_size,
                mtime: (st.stx_mtime.tv_sec, i64::from(st.stx_mtime.tv_nsec)),
                ctime: (st.stx_ctime.tv_sec, i64::from(st.stx_ctime.tv_nsec)),
                mode: u32::from(st.stx_mode),
                remote: true,
            })),
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// [`CopyError::SourceChanged`] unless `file` is still in this state (asked of its
    /// server where it is remote). Blocking.
    pub fn check(&self, file: &std::fs::File, shown: &str) -> Result<(), CopyError> {
        let read = |e| CopyError::Read(shown.to_string(), e);
        let now = match self.remote.then(|| Self::from_server(file)).flatten() {
            Some(state) => state.map_err(read)?,
            None => Self::of(&file.metadata().map_err(read)?),
        };
        if (now.size, now.mtime, now.ctime) == (self.size, self.mtime, self.ctime) {
            Ok(())
        } else {
            Err(CopyError::SourceChanged(shown.to_string()))
        }
    }

    /// How long after a change a write to this file may still leave its times as they are:
    /// a time holds its value for a tick of the filesystem's granularity (a whole second
    /// or two where its change time has no fraction: ext4 of 128-byte inodes, FAT, sshfs;
    /// one clock tick of the kernel elsewhere, before Linux 6.13), and a share's by its
    /// server's clock.
    fn tick(&self) -> std::time::Duration {
        if self.remote || self.ctime.1 == 0 {
            COARSE_TICK
        } else {
            FINE_TICK
        }
    }

    /// Whether the file changed within a tick of `now`, or says it changed later than
    /// `now` (a share's server whose clock is ahead; not a time set by hand: the change
    /// time is the kernel's).
    fn changed_within_a_tick(&self, now: std::time::SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let Ok(secs) = u64::try_from(secs) else {
            return false;
        };
        let nanos = u32::try_from(nanos).unwrap_or(0);
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        match now.duration_since(at) {
            Ok(age) => age < self.tick(),
            Err(ahead) => ahead.duration() < CLOCK_AHEAD,
        }
    }

    /// Waits out the tick of a file that changed just before it was opened, then
    /// [`CopyError::SourceChanged`] unless it is still in this state. A write within the
    /// tick of the file's last change leaves its times as they are: after a render that
    /// wrote its last data, its header rewritten in place (same size) while the copy ran
    /// went unseen, and the copy — half of each — was recorded and reported as verified.
    /// Once that tick is over, every write changes the times, which the copy checks.
    pub async fn settle(&self, file: &std::fs::File, shown: &str) -> Result<(), CopyError> {
        if !self.changed_within_a_tick(std::time::SystemTime::now()) {
            return Ok(());
        }
        tokio::time::sleep(self.tick()).await;
        self.confirm(file, shown).await
    }

    /// [`Self::check`] from async code: on a blocking thread where the file is remote (an
    /// `fstat` on a hard-mounted share whose server stopped answering waits for it).
    pub async fn confirm(&self, file: &std::fs::File, shown: &str) -> Result<(), CopyError> {
        if !self.remote {
            return self.check(file, shown);
        }
        let f = file
            .try_clone()
            .map_err(|e| CopyError::Read(shown.to_string(), e))?;
        let (state, owned) = (*self, shown.to_string());
        tokio::task::spawn_blocking(move || state.check(&f, &owned))
            .await
            .map_err(|e| CopyError::Read(shown.to_string(), std::io::Error::other(e)))?
    }
}

/// [`CopyError::SourceChanged`] unless all of the source was read (`read` bytes) and it is
/// still as it was when the copy began: checked before anything is published.
async fn unchanged(
    file: &std::fs::File,
    shown: &str,
    before: &SourceState,
    read: u64,
) -> Result<(), CopyError> {
    if read != before.size {
        return Err(CopyError::SourceChanged(shown.to_string()));
    }
    before.confirm(file, shown).await
}

/// Part size for a file of `len` bytes: at least `min_part`, and large enough (rounded up
/// to whole MiB) that the file fits in [`MAX_PARTS`] parts. For S3 stores (`s3`), a file
/// larger than [`MAX_OBJECT`] cannot be stored at all.
pub fn part_size(len: u64, min_part: u64, s3: bool) -> Result<u64, CopyError> {
    if s3 && len > MAX_OBJECT {
        return Err(CopyError::TooLarge(len));
    }
    let needed = len.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    Ok(needed.max(min_part).max(1))
}

/// Size and digest of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Bytes.
    pub size: u64,
    /// Lower-case hex digest.
    pub checksum: String,
    /// The bytes' SHA-256 (hex) where `checksum` is another algorithm's, computed in the
    /// same read: MD5 tells no two contents apart (colliding files are made in seconds),
    /// so one content is never taken for another on its MD5 and size alone.
    pub sha256: Option<String>,
}

/// Copy and verification failures; all are worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the source file failed.
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    /// The object store failed.
    #[error("object store: {}", crate::s3::described(.0))]
    Store(#[from] object_store::Error),
    /// A native S3 request failed.
    #[error("object store: {0}")]
    S3(#[from] crate::s3::S3Error),
    /// The records database failed.
    #[error("database: {0}")]
    Db(#[from] db::sqlx::Error),
    /// Writing to the object store failed.
    #[error("writing {0}: {1}")]
    Write(String, std::io::Error),
    /// What was stored is not what was read.
    #[error(
        "verification of {key} failed: stored {stored_size} bytes {alg} {stored}, expected {expected_size} bytes {expected}"
    )]
    Mismatch {
        /// Object key.
        key: String,
        /// Digest name.
        alg: &'static str,
        /// Digest read back.
        stored: String,
        /// Size read back.
        stored_size: u64,
        /// Digest of the source.
        expected: String,
        /// Size of the source.
        expected_size: u64,
    },
    /// The source changed while being copied.
    #[error("{0} changed while it was being copied")]
    SourceChanged(String),
    /// Larger than any object the store can hold (S3: 5 TiB); never retried.
    #[error("{0} bytes is larger than the store's largest object (5 TiB)")]
    TooLarge(u64),
    /// Another copy published an object under the key first (a local store never
    /// replaces one): the caller looks at what is there now.
    #[error("{0} was stored by another copy meanwhile")]
    Exists(String),
    /// A key inside the local store's reserved staging directory; never retried.
    #[error("{0} is inside the store's reserved staging directory ({dir}); rename the source", dir = crate::local::STAGING_DIR)]
    Reserved(String),
    /// A key the local store can never hold (a stored file where the key needs a
    /// directory, a name longer than its filesystem allows); never retried.
    #[error("cannot store {0}: {1}")]
    Unstorable(String, &'static str),
    /// An earlier multipart upload of another version of the file could not be aborted
    /// (or forgotten): retried rather than started over beside it, unrecorded.
    #[error("an earlier multipart upload of {0} could not be aborted; retried")]
    EarlierUpload(String),
    /// The copy's handler was stopped while it ran: nothing was published.
    #[error("the copy of {0} was stopped with its handler; nothing was published")]
    Stopped(String),
    /// The object at a key is in an archive storage class (Glacier, Deep Archive) and
    /// cannot be read back to compare; no retry changes that until it is restored.
    #[error(
        "{0} holds an object in an archive storage class (Glacier, Deep Archive), which \
         cannot be read back to compare with the file: restore it (or move it away), then \
         replay the message"
    )]
    Archived(String),
    /// The local store's directory is not on its share (see
    /// [`crate::mounts::StoreMount`]): nothing is written until it is mounted again.
    #[error(
        "the store's share at {0} is not mounted: nothing is written beneath it (retried as \
         an outage, up to [retry] max_outage_ms)"
    )]
    StoreUnmounted(String),
}

impl CopyError {
    /// Whether retrying can ever help (not for an impossible size or a reserved key, nor
    /// for a file larger than the store's filesystem takes: FAT's 4 GiB).
    pub fn is_permanent(&self) -> bool {
        match self {
            CopyError::TooLarge(_)
            | CopyError::Reserved(_)
            | CopyError::Unstorable(..)
            | CopyError::Archived(_) => true,
            CopyError::Write(_, e) => e.raw_os_error() == Some(libc::EFBIG),
            _ => false,
        }
    }

    /// Whether the failure is the store's or the database's, not the file's: a store or
    /// database down, unreachable or refusing our credentials, a local store's disk full
    /// or read-only. Such retries wait out the outage uncounted.
    pub fn is_outage(&self) -> bool {
        use object_store::Error as E;
        match self {
            CopyError::Store(e) if store_trouble_code(e) => true,
            CopyError::Store(e) if !store_outage_status(client_status(e)) => false,
            CopyError::Store(e) => !matches!(
                e,
                E::NotFound { .. }
                    | E::AlreadyExists { .. }
                    | E::Precondition { .. }
                    | E::NotModified { .. }
                    | E::InvalidPath { .. }
                    | E::NotSupported { .. }
                    | E::NotImplemented
                    | E::UnknownConfigurationKey { .. }
            ),
            CopyError::S3(crate::s3::S3Error::Status(_, code, text)) => {
                store_outage_status(Some(*code)) || STORE_TROUBLE.iter().any(|c| text.contains(c))
            }
            CopyError::S3(e) => !matches!(e, crate::s3::S3Error::Taken(_)),
            CopyError::Db(e) => db::is_outage(e),
            // Its abort failed on the store or the records, neither of them the file's.
            CopyError::EarlierUpload(_) | CopyError::StoreUnmounted(_) => true,
            CopyError::Write(_, e) => e
                .raw_os_error()
                .is_some_and(|n| store_down(n) || short_of_resources(n)),
            // A source share gone away (its server not answering, a stale handle), not
            // a bad sector of one file (EIO).
            CopyError::Read(_, e) => e
                .raw_os_error()
                .is_some_and(|n| share_down(n) || short_of_resources(n)),
            _ => false,
        }
    }
}

/// Whether `errno` from a share says the share (its server, its mount) is away rather than
/// the file being bad.
pub fn share_down(errno: i32) -> bool {
    [
        libc::ENOTCONN,
        libc::ESTALE,
        libc::ETIMEDOUT,
        libc::EHOSTDOWN,
        libc::EHOSTUNREACH,
        libc::ENETUNREACH,
        libc::ENODEV,
    ]
    .contains(&errno)
}

/// Whether `errno` says this process or machine ran short of descriptors or memory (at
/// full concurrency, beside a leak): it passes, and is no file's fault — counted, a
/// backlog went to the DLQ as "retries exhausted" while it lasted.
pub(crate) fn short_of_resources(errno: i32) -> bool {
    [libc::EMFILE, libc::ENFILE, libc::ENOMEM].contains(&errno)
}

/// Whether `errno` writing to a local store says the store cannot take anything now (its
/// disk full or read-only, its device failing or its share away), not that this file's
/// name or place is refused (EINVAL, EILSEQ, EACCES stay the file's).
fn store_down(errno: i32) -> bool {
    share_down(errno) || [libc::ENOSPC, libc::EDQUOT, libc::EROFS, libc::EIO].contains(&errno)
}

/// Whether a store's answer of `status` (None: no answer, or one object_store does not
/// show) is the store's trouble rather than the request's: no answer, a server error,
/// throttling, a timeout, refused credentials, a bucket not found. Another 4xx (a key the
/// store will not take, a malformed request) is about this file, and so is a 501: a store
/// that does not implement what the request asks (a conditional create, a checksum
/// header) will not by waiting — counted, its error names it, where an outage's retries
/// waited a day saying nothing.
fn store_outage_status(status: Option<u16>) -> bool {
    match status {
        Some(501) => false,
        Some(code @ 400..=499) => [401, 403, 404, 408, 429].contains(&code),
        _ => true,
    }
}

/// S3 error codes that are the store's or the credentials' trouble, whatever their status
/// (a 404 `NoSuchBucket` is no missing object, a 400 `ExpiredToken` no bad request).
const STORE_TROUBLE: [&str; 4] = [
    "NoSuchBucket",
    "ExpiredToken",
    "RequestTimeout",
    "TokenRefreshRequired",
];

/// Whether the store refused a multipart completion for good: the parts as a whole (400 or
/// 409), not its own or the credentials' trouble (a 400 `RequestTimeout` or
/// `ExpiredToken`, after which the same parts complete: given up, every part was sent
/// again).
fn completion_refused(e: &CopyError) -> bool {
    let status = match e {
        CopyError::S3(crate::s3::S3Error::Status(_, code, _)) => Some(*code),
        CopyError::Store(s) => client_status(s),
        _ => None,
    };
    matches!(status, Some(400 | 409)) && !e.is_outage()
}

/// Whether object_store's error (or its sources) names one of [`STORE_TROUBLE`].
fn store_trouble_code(e: &object_store::Error) -> bool {
    crate::s3::chain_texts(e).any(|text| STORE_TROUBLE.iter().any(|c| text.contains(c)))
}

/// The HTTP status object_store's error (or its sources) shows, if any: its own type for
/// it is not public, its text is ("… non-2xx status code: 400 Bad Request: …").
fn client_status(e: &object_store::Error) -> Option<u16> {
    crate::s3::chain_texts(e)
        .find_map(|text| {
            let (_, rest) = text.split_once("status code: ")?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some(digits.parse().ok())
        })
        .flatten()
}

/// A flag set when it is dropped: tells a blocking copy its caller is gone.
#[derive(Default)]
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Digest of an open file from its start (its own offset is left untouched: the
/// handle is read positionally).
pub async fn hash_open(
    file: &std::fs::File,
    shown: &str,
    alg: Algorithm,
) -> Result<Digest, CopyError> {
    let f = file
        .try_clone()
        .map_err(|e| CopyError::Read(shown.to_string(), e))?;
    let owned = shown.to_string();
    // Stops reading when this future is dropped (its handler stopped): the redelivered
    // message's handler reads the file again meanwhile.
    let stop = StopOnDrop::default();
    let stopped = stop.0.clone();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut h = alg.hasher();
        // Large blocks for large files; small files get a buffer their size (memory
        // stays bounded with many handlers at once).
        // A file that cannot be looked at (NFS's ESTALE) cannot be read either: its error,
        // classed as such, not "changed while it was being copied" after one buffer.
        let len = f.metadata()?.len();
        let cap = usize::try_from(len.saturating_add(1))
            .unwrap_or(usize::MAX)
            .min(4 * CHUNK);
        let mut buf = vec![0u8; cap.max(4096)];
        let mut size = 0u64;
        // Past the size at the start, the file is growing (a recording still being
        // written): its caller sees the change and retries, so reading on until the
        // writer stops would only hold this handler.
        while size <= len {
            if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::other("stopped with its handler"));
            }
            let n = f.read_at(&mut buf, size)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        let (checksum, sha256) = h.finish();
        Ok(Digest {
            size,
            checksum,
            sha256,
        })
    })
    .await
    .map_err(|e| CopyError::Read(owned.clone(), std::io::Error::other(e)))?
    .map_err(|e: std::io::Error| CopyError::Read(owned, e))
}

/// Digest of a stored object by reading it back; `None` if there is no such object.
pub async fn hash_object(
    tier: &Tier,
    key: &ObjectPath,
    alg: Algorithm,
) -> Result<Option<Digest>, CopyError> {
    Ok(hash_object_tagged(tier, key, alg).await?.map(|(d, _)| d))
}

/// [`hash_object`], with the ETag of the object the store's answer came from (none for a
/// local store, or where the store gave none).
async fn hash_object_tagged(
    tier: &Tier,
    key: &ObjectPath,
    alg: Algorithm,
) -> Result<Option<(Digest, Option<String>)>, CopyError> {
    if let Some(dir) = &tier.local_dir {
        // A directory or a link at the key holds no object of this store.
        return match at_local_key(dir, key).await? {
            crate::paths::AtKey::File(f) => {
                let shown = dir.join(key.as_ref()).display().to_string();
                Ok(Some((hash_open(&f, &shown, alg).await?, None)))
            }
            crate::paths::AtKey::Other | crate::paths::AtKey::Nothing => Ok(None),
        };
    }
    let got = match tier.store.get(key).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        // S3's answer for an object of an archive storage class not restored: a 403
        // whose body names that code.
        Err(e @ object_store::Error::PermissionDenied { .. })
            if e.to_string().contains("<Code>InvalidObjectState</Code>") =>
        {
            return Err(CopyError::Archived(key.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    let etag = got.meta.e_tag.clone();
    let mut stream = got.into_stream();
    let mut h = alg.hasher();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        h.update(&chunk);
        size += chunk.len() as u64;
    }
    let (checksum, sha256) = h.finish();
    Ok(Some((
        Digest {
            size,
            checksum,
            sha256,
        },
        etag,
    )))
}

/// What a local store at `dir` holds at `key`, following no link (on a blocking thread).
async fn at_local_key(
    dir: &std::path::Path,
    key: &ObjectPath,
) -> Result<crate::paths::AtKey, CopyError> {
    let path = dir.join(key.as_ref());
    let (root, rel) = (dir.to_path_buf(), std::path::PathBuf::from(key.as_ref()));
    tokio::task::spawn_blocking(move || crate::paths::at_key(&root, &rel))
        .await
        .map_err(|e| CopyError::Read(path.display().to_string(), std::io::Error::other(e)))?
        .map_err(|e| {
            crate::local::unstorable(key.as_ref(), &e)
                .unwrap_or_else(|| CopyError::Read(path.display().to_string(), e))
        })
}

/// Size of a stored object, or `None` if absent. On a local store a directory at the key
/// counts as an object no file matches (`u64::MAX` bytes), so a copy goes beside it.
pub async fn object_size(tier: &Tier, key: &ObjectPath) -> Result<Option<u64>, CopyError> {
    if let Some(dir) = &tier.local_dir {
        // Not through object_store: its local store refuses names such as `take#1`,
        // which a local tier stores (see crate::local).
        return match at_local_key(dir, key).await? {
            crate::paths::AtKey::File(f) => f
                .metadata()
                .map(|m| Some(m.len()))
                .map_err(|e| CopyError::Read(dir.join(key.as_ref()).display().to_string(), e)),
            crate::paths::AtKey::Other => Ok(Some(u64::MAX)),
            crate::paths::AtKey::Nothing => Ok(None),
        };
    }
    match tier.store.head(key).await {
        Ok(m) => Ok(Some(m.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether the object at `key` of a local store is the file `source` itself (one inode):
/// the store is the source's own directory reached another way (a bind mount of an online
/// root, or a hard link of the source put in the store), where the file would be taken
/// for its own copy.
pub async fn is_the_source(
    tier: &Tier,
    key: &ObjectPath,
    source: &std::fs::File,
) -> Result<bool, CopyError> {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = &tier.local_dir else {
        return Ok(false);
    };
    let crate::paths::AtKey::File(at) = at_local_key(dir, key).await? else {
        return Ok(false);
    };
    Ok(match (at.metadata(), source.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    })
}

/// What an upload stored: the source's digest and, for an S3 store, the
/// `ChecksumSHA256` the store must report for those bytes.
#[derive(Debug)]
pub struct Uploaded {
    /// Size and digest of what was read and sent.
    pub digest: Digest,
    /// `<base64>` (one request) or `<base64>-<parts>` (multipart); None for local stores.
    pub store_checksum: Option<String>,
    /// For a one-request upload to S3: the MD5 (hex) of what was sent, which a plain S3
    /// object's ETag is (used where the store keeps no checksum).
    pub md5: Option<String>,
    /// Multipart parts this attempt sent (resumed ones not counted) and reused.
    pub parts_sent: u64,
    /// Parts a resumed upload already had in the store.
    pub parts_reused: u64,
    /// Written to a local tier by [`crate::local::copy`]: the digest is of the bytes
    /// written and fsynced, which verifies the copy without reading it back, and its
    /// directory entry is fsynced too.
    pub written_durably: bool,
    /// Published, then found changed (grown, or rewritten in place) or no longer to be
    /// checked (its source unreadable): what is at the key is this attempt's unverified
    /// copy, for the caller to take away — only while its claim on the key still holds (a
    /// copy stalled past it must not delete what another replica has since found there,
    /// verified and recorded) — with this error.
    pub torn: Option<CopyError>,
}

/// Where the multipart state of a resumable upload is kept, and what is known of the
/// source (an upload started for another version of the file is not resumed; a local
/// copy of other bytes is not published).
#[derive(Clone, Copy)]
pub struct Resume<'a> {
    /// The tier's records.
    pub records: &'a Records,
    /// The source's mtime as recorded.
    pub mtime: &'a str,
    /// The source's digest, where it was hashed before the upload.
    pub digest: Option<&'a Digest>,
    /// The source's state when it was first looked at (its size and mtime are what the
    /// copy is recorded with): the copy must find it so throughout.
    pub state: Option<SourceState>,
}

/// Streams the open `file` (from its start) to `key`, hashing as it goes. A file smaller
/// than one part goes up in one request; a larger one as a multipart upload with parts
/// sized by [`part_size`]. On S3 the upload id and every stored part are recorded
/// (`resume`), so an attempt cut short (a crash, a store outage) is resumed by the next
/// one from the parts the store still lists; elsewhere a failed upload is aborted.
pub async fn upload(
    tier: &Tier,
    key: &ObjectPath,
    file: &std::fs::File,
    shown: &str,
    alg: Algorithm,
    attributes: Attributes,
    resume: Resume<'_>,
) -> Result<Uploaded, CopyError> {
    let read_err = |e| CopyError::Read(shown.to_string(), e);
    // Compared again once every byte was read, before anything is published under the
    // key: a file written to meanwhile is not published (on an object store, one that
    // changed in the moment between that check and the completion is taken away again,
    // see the tier).
    let before = match resume.state {
        Some(s) => {
            s.confirm(file, shown).await?;
            s
        }
        None => SourceState::of(&file.metadata().map_err(read_err)?),
    };
    let len = before.size;
    if let Some(dir) = &tier.local_dir {
        // A local tier is written directly and durably (see crate::local): no object
        // store layer; read back from its disk where the policy says; published only if it
        // matches the source as opened (and its read-back).
        let (root, key) = (dir.clone(), key.to_string());
        let f = file.try_clone().map_err(read_err)?;
        let owned = shown.to_string();
        let expected_digest = resume.digest.cloned();
        // Set when this future is dropped (its handler stopped) before the copy ended.
        let stop = StopOnDrop::default();
        let stopped = stop.0.clone();
        let mount = tier.local_mount.clone();
        let read_back = tier.read_back;
        let digest = tokio::task::spawn_blocking(move || {
            // Here, on the blocking thread: the directory is on a share that may not answer.
            if let Some(share) = mount.as_ref().and_then(|m| m.unmounted()) {
                return Err(CopyError::StoreUnmounted(share.display().to_string()));
            }
            let expected = crate::local::Expected {
                size: len,
                digest: expected_digest.as_ref(),
                unchanged: Some(before),
                stopped: Some(&stopped),
                read_back,
            };
            crate::local::copy(&f, &root, &key, &owned, alg, expected)
        })
        .await
        .map_err(|e| CopyError::Write(shown.to_string(), std::io::Error::other(e)))??;
        return Ok(Uploaded {
            digest,
            store_checksum: None,
            md5: None,
            parts_sent: 0,
            parts_reused: 0,
            written_durably: true,
            torn: None,
        });
    }
    let part = part_size(len, tier.min_part, tier.local_dir.is_none())?;
    let mut f = tokio::fs::File::from_std(file.try_clone().map_err(read_err)?);
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(read_err)?;
    // No further than the size at the start: a file still growing is refused once read
    // (`before`), and its parts keep S3's sizes (a short part then more would be refused
    // as too small at completion, hiding why).
    let mut f = f.take(len);
    let mut h = alg.hasher();
    let attributes = if tier.supports_metadata {
        attributes
    } else {
        Attributes::new()
    };
    // An upload recorded for another version of the file, another part size, another
    // file (its metadata names that one) or another checksum mode (S3 completes no upload
    // of parts of both) can never be resumed: give it up before anything else is sent.
    let recorded = match (&tier.s3, &tier.multipart) {
        (Some(s3), Some(mp)) => {
            let r = resume.records.upload_for(key.as_ref()).await?;
            match r {
                Some(u)
                    if u.source_size == len
                        && u.source_mtime == resume.mtime
                        && u.part_size == part
                        && u.source_path.as_deref() == Some(shown)
                        && u.checksums.is_none_or(|c| c == s3.checksums()) =>
                {
                    Some(u)
                }
                Some(u) => {
                    let given_up = abort_recorded(mp.as_ref(), resume.records, key, &u.upload_id)
                        .await
                        .forgotten();
                    // A new upload's record would replace this one's: its parts then billed
                    // with nothing left to find them (the sweep reads the records). A file
                    // sent in one request leaves the record to the sweep.
                    if !given_up && len >= part {
                        return Err(CopyError::EarlierUpload(shown.to_string()));
                    }
                    None
                }
                None => None,
            }
        }
        _ => None,
    };

    let first = read_part(
        &mut f,
        part,
        &mut h,
        shown,
        &tier.part_budget,
        tier.s3.is_some(),
    )
    .await?;
    let mut up = if (first.bytes.len() as u64) < part {
        // One request: atomic, so a failure leaves nothing to clean up.
        let Part {
            bytes: mut first,
            room: _room,
            sum,
        } = first;
        let sums = match sum {
            Some(sum) => {
                use base64::Engine;
                let md5;
                (md5, first) = md5_hex(first, shown).await?;
                Some((base64::engine::general_purpose::STANDARD.encode(sum), md5))
            }
            None => None,
        };
        let size = first.len() as u64;
        unchanged(file, shown, &before, size).await?;
        let opts = PutOptions {
            attributes,
            mode: if tier.create_only {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..Default::default()
        };
        match tier.store.put_opts(key, first.into(), opts).await {
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(CopyError::Exists(key.to_string()));
            }
            r => r?,
        };
        Uploaded {
            digest: Digest {
                size,
                checksum: String::new(),
                sha256: None,
            },
            store_checksum: sums.as_ref().map(|s| s.0.clone()),
            md5: sums.map(|s| s.1),
            parts_sent: 0,
            parts_reused: 0,
            written_durably: false,
            torn: None,
        }
    } else if let (Some(s3), Some(mp)) = (&tier.s3, &tier.multipart) {
        let ctx = Multipart {
            s3,
            mp: mp.clone(),
            records: resume.records,
            key,
            shown,
            part,
            budget: &tier.part_budget,
            source: (file, before),
            create_only: tier.create_only,
        };
        ctx.run(
            &mut f,
            first,
            &mut h,
            recorded,
            resume.mtime,
            len,
            &attributes,
        )
        .await?
    } else {
        let source = (file, before);
        upload_multipart(
            tier, key, &mut f, source, first, part, &mut h, shown, attributes,
        )
        .await?
    };
    let changed = if up.digest.size != len {
        Err(CopyError::SourceChanged(shown.to_string()))
    } else {
        before.confirm(file, shown).await
    };
    match changed {
        // Published before the change was seen: the caller takes it away (see `torn`).
        Err(e) => up.torn = Some(e),
        Ok(()) => (up.digest.checksum, up.digest.sha256) = h.finish(),
    }
    Ok(up)
}

/// A multipart upload through object_store's own (non-resumable) writer: local stores.
#[allow(clippy::too_many_arguments)]
async fn upload_multipart(
    tier: &Tier,
    key: &ObjectPath,
    f: &mut Source,
    source: (&std::fs::File, SourceState),
    first: Part,
    part: u64,
    h: &mut crate::checksum::Hasher,
    shown: &str,
    attributes: Attributes,
) -> Result<Uploaded, CopyError> {
    let mut size = first.bytes.len() as u64;
    let opts = PutMultipartOptions {
        attributes,
        ..Default::default()
    };
    let mut up = tier.store.put_multipart_opts(key, opts).await?;
    let mut parts = 0u64;
    let result: Result<(), CopyError> = async {
        // Spawned, so parts upload while the next one is read.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut next = first;
        while !next.bytes.is_empty() {
            parts += 1;
            if parts > MAX_PARTS {
                // Only a file that grew past its size at open can get here.
                return Err(CopyError::SourceChanged(shown.to_string()));
            }
            while in_flight.len() >= PARTS_IN_FLIGHT {
                join_part(in_flight.join_next().await)?;
            }
            let Part { bytes, room, .. } = next;
            let put = up.put_part(bytes.into());
            in_flight.spawn(async move {
                let r = put.await;
                drop(room);
                r
            });
            next = read_part(f, part, h, shown, &tier.part_budget, false).await?;
            size += next.bytes.len() as u64;
        }
        while let Some(r) = in_flight.join_next().await {
            join_part(Some(r))?;
        }
        unchanged(source.0, shown, &source.1, size).await?;
        up.complete().await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        // Parts already stored are billed until aborted; a failed abort is left to
        // the bucket's lifecycle rule (docs/storage.md).
        if let Err(a) = up.abort().await {
            tracing::warn!(key = %key, error = %framework::telemetry::LogText(&crate::s3::described(&a)), "could not abort the failed multipart upload");
        }
        return Err(e);
    }
    Ok(Uploaded {
        digest: Digest {
            size,
            checksum: String::new(),
            sha256: None,
        },
        store_checksum: None,
        md5: None,
        parts_sent: parts,
        parts_reused: 0,
        written_durably: false,
        torn: None,
    })
}

/// What became of a recorded upload given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GivenUp {
    /// Aborted in the store, and forgotten.
    Aborted,
    /// The abort is never allowed (`AccessDenied`): forgotten, its parts left to the
    /// bucket's lifecycle rule — not counted as aborted.
    NotAllowed,
    /// The store no longer held it (completed — its record not forgotten then, the
    /// database out of reach —, or aborted by a lifecycle rule): forgotten.
    AlreadyGone,
    /// Still recorded: the abort or the forgetting failed (a retry or the sweep tries again).
    Kept,
}

impl GivenUp {
    /// Whether the upload's record is gone.
    pub fn forgotten(self) -> bool {
        self != GivenUp::Kept
    }
}

/// Aborts a recorded upload and forgets it (a failure is left to the abandoned-upload
/// sweep and the bucket's lifecycle rule).
pub async fn abort_recorded(
    mp: &dyn MultipartStore,
    records: &Records,
    key: &ObjectPath,
    upload_id: &str,
) -> GivenUp {
    let mut outcome = GivenUp::Aborted;
    match mp.abort_multipart(key, &upload_id.to_string()).await {
        Ok(()) => {}
        // A bucket not there (a store restarting before its buckets) is no upload gone:
        // forgotten then, its parts stayed in the store with no record to abort them by.
        Err(e @ object_store::Error::NotFound { .. })
            if crate::s3::chain_texts(&e).any(|t| crate::s3::no_such_bucket(&t)) =>
        {
            tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "could not abort a multipart upload: the store's bucket is not there");
            return GivenUp::Kept;
        }
        Err(object_store::Error::NotFound { .. }) => outcome = GivenUp::AlreadyGone,
        // Never allowed (a role without `s3:AbortMultipartUpload`: `AccessDenied`): no
        // retry aborts it, and keeping its record would stop every later copy to the key.
        // Forgotten, it is left to the bucket's lifecycle rule (docs/storage.md). Another
        // 403 (a signature refused while keys rotate, a clock skewed) or a 401 (a
        // credential expired or rotating: no refusal of the permission) passes: kept, for
        // the sweep to abort later.
        // (The store's error document's own code, not a key that holds the word.)
        Err(e)
            if matches!(e, object_store::Error::PermissionDenied { .. })
                && e.to_string().contains("<Code>AccessDenied</Code>") =>
        {
            tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "not allowed to abort a multipart upload: left to the bucket's lifecycle rule");
            outcome = GivenUp::NotAllowed;
        }
        Err(e) => {
            tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "could not abort a multipart upload");
            return GivenUp::Kept;
        }
    }
    if let Err(e) = records.forget_upload(key.as_ref(), upload_id).await {
        tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "could not forget an aborted multipart upload");
        return GivenUp::Kept;
    }
    outcome
}

/// A resumable S3 multipart upload of one file.
struct Multipart<'a> {
    s3: &'a crate::s3::S3Native,
    mp: Arc<dyn MultipartStore>,
    records: &'a Records,
    key: &'a ObjectPath,
    shown: &'a str,
    part: u64,
    /// Room for part buffers, shared by every upload to the store.
    budget: &'a crate::part_budget::PartBudget,
    /// The open source and its state when the copy began.
    source: (&'a std::fs::File, SourceState),
    /// Completed only if nothing is at the key (`Tier::create_only`).
    create_only: bool,
}

impl Multipart<'_> {
    /// Parts of a recorded upload the store still holds, by number: the SHA-256 (base64)
    /// and ETag of each. None: the store no longer has the upload.
    async fn stored_parts(
        &self,
        upload_id: &str,
    ) -> Result<Option<HashMap<u64, (String, String)>>, CopyError> {
        let Some(listed) = self.s3.list_parts(self.key, upload_id).await? else {
            return Ok(None);
        };
        let recorded: HashMap<u64, PartRecord> = self
            .records
            .parts_of(upload_id)
            .await?
            .into_iter()
            .map(|p| (p.number, p))
            .collect();
        let mut known = HashMap::new();
        for l in listed {
            // The store's own checksum of the part where it lists one; else ours, if the
            // part it holds is the one we recorded (same ETag and size).
            let sha = match (&l.checksum_sha256, recorded.get(&l.number)) {
                (Some(c), _) => Some(c.clone()),
                (None, Some(r)) if r.etag == l.etag && r.size == l.size => Some(r.sha256.clone()),
                _ => None,
            };
            if let Some(sha) = sha {
                known.insert(l.number, (sha, l.etag));
            }
        }
        Ok(Some(known))
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        f: &mut Source,
        first: Part,
        h: &mut crate::checksum::Hasher,
        recorded: Option<UploadRecord>,
        mtime: &str,
        len: u64,
        attributes: &Attributes,
    ) -> Result<Uploaded, CopyError> {
        let key = self.key;
        let mut resumed = None;
        if let Some(u) = recorded {
            match self.stored_parts(&u.upload_id).await {
                Ok(Some(known)) => resumed = Some((u.upload_id, known)),
                Ok(None) => {
                    // Completed, aborted or lost by the store: start over.
                    tracing::info!(key = %key, "the recorded multipart upload is gone from the store; starting over");
                    self.records
                        .forget_upload(key.as_ref(), &u.upload_id)
                        .await?;
                }
                // A listing no upload can be resumed on (more than 10,000 parts, a part
                // without its number, size or ETag): waiting would read it again, alike,
                // for as long as the outage's retries last. The upload is given up and
                // the copy starts over; one that cannot be aborted now is kept for a retry.
                Err(CopyError::S3(e @ crate::s3::S3Error::Response(..))) => {
                    tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "the store's list of the recorded upload's parts cannot be used; giving the upload up");
                    if !abort_recorded(self.mp.as_ref(), self.records, key, &u.upload_id)
                        .await
                        .forgotten()
                    {
                        return Err(CopyError::S3(e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let (upload_id, known) = match resumed {
            Some((id, known)) => {
                tracing::info!(key = %key, parts = known.len(), "resuming a multipart upload");
                (id, known)
            }
            None => {
                let metadata: Vec<(String, String)> = attributes
                    .iter()
                    .filter_map(|(k, v)| match k {
                        Attribute::Metadata(m) => Some((m.to_string(), v.to_string())),
                        _ => None,
                    })
                    .collect();
                let id = self.s3.create_multipart(key, &metadata).await?;
                let started = self
                    .records
                    .start_upload(&UploadRecord {
                        object_key: key.to_string(),
                        upload_id: id.clone(),
                        source_size: len,
                        source_mtime: mtime.to_string(),
                        part_size: self.part,
                        source_path: Some(self.shown.to_string()),
                        checksums: Some(self.s3.checksums()),
                    })
                    .await;
                if let Err(e) = started {
                    // Unrecorded, it could never be resumed nor swept: abort it now.
                    if let Err(a) = self.mp.abort_multipart(key, &id).await {
                        tracing::warn!(key = %key, error = %framework::telemetry::LogText(&crate::s3::described(&a)), "could not abort an unrecorded multipart upload");
                    }
                    return Err(e.into());
                }
                (id, HashMap::new())
            }
        };
        let result = self.parts(f, first, h, &upload_id, &known).await;
        if let Err(e @ CopyError::SourceChanged(_)) = &result {
            // These parts can never be completed into the file: give the upload up.
            tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "giving up the multipart upload");
            abort_recorded(self.mp.as_ref(), self.records, key, &upload_id).await;
        }
        // Any other failure keeps the upload (and its parts) for the retry to resume.
        result
    }

    async fn parts(
        &self,
        f: &mut Source,
        first: Part,
        h: &mut crate::checksum::Hasher,
        upload_id: &str,
        known: &HashMap<u64, (String, String)>,
    ) -> Result<Uploaded, CopyError> {
        let mut size = first.bytes.len() as u64;
        let mut ids: Vec<Option<PartId>> = Vec::new();
        let mut part_sums: Vec<u8> = Vec::new();
        let mut sent = 0u64;
        let mut reused = 0u64;
        // Spawned, so parts upload while the next one is read.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut next = first;
        while !next.bytes.is_empty() {
            let idx = ids.len();
            let number = idx as u64 + 1;
            if number > MAX_PARTS {
                // Only a file that grew past its size at open can get here.
                return Err(CopyError::SourceChanged(self.shown.to_string()));
            }
            // Taken off the runtime as the part was read; a part read without it (the
            // first, where the store was not S3) is hashed here.
            let raw = next.sum.unwrap_or_else(|| sha256_of(&next.bytes));
            part_sums.extend_from_slice(&raw);
            let sha = {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(raw)
            };
            match known.get(&number) {
                // The store holds exactly these bytes as this part: not sent again.
                Some((stored, etag)) if stored == &sha => {
                    ids.push(Some(self.s3.part_id(etag, &sha)));
                    reused += 1;
                    // Its room is given back before the next part waits for some: held
                    // through that wait, a budget of one part would never have any.
                    drop(next);
                }
                _ => {
                    ids.push(None);
                    while in_flight.len() >= PARTS_IN_FLIGHT {
                        self.store_part(&mut ids, in_flight.join_next().await, upload_id)
                            .await?;
                    }
                    let mp = self.mp.clone();
                    let key = self.key.clone();
                    let id = upload_id.to_string();
                    let Part { bytes, room, .. } = next;
                    let part_size = bytes.len() as u64;
                    in_flight.spawn(async move {
                        let r = mp.put_part(&key, &id, idx, bytes.into()).await;
                        drop(room);
                        (idx, part_size, sha, r)
                    });
                    sent += 1;
                }
            }
            next = read_part(f, self.part, h, self.shown, self.budget, true).await?;
            size += next.bytes.len() as u64;
            // A file still being written stops the upload at its first part read after
            // the change, not after all of it was sent (every attempt, up to the whole
            // file, while the writer goes on): one `fstat` per part.
            if !next.bytes.is_empty() {
                self.source.1.confirm(self.source.0, self.shown).await?;
            }
        }
        while let Some(r) = in_flight.join_next().await {
            self.store_part(&mut ids, Some(r), upload_id).await?;
        }
        let n = ids.len();
        let ids: Vec<PartId> = ids.into_iter().flatten().collect();
        if ids.len() != n {
            return Err(CopyError::Write(
                self.shown.to_string(),
                std::io::Error::other("a part is missing"),
            ));
        }
        unchanged(self.source.0, self.shown, &self.source.1, size).await?;
        let composite = {
            use base64::Engine;
            use sha2::Digest as _;
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&part_sums))
        };
        if self.create_only {
            match self
                .s3
                .complete_multipart_create(self.key, upload_id, &ids)
                .await
            {
                // This completion's own, its answer lost (tried again, the upload was gone
                // or the key taken): the object holds exactly these parts. Taken for
                // another's, it was read back whole and the source hashed again.
                Err(crate::s3::S3Error::Taken(_))
                    if self.holds_these_parts(&composite, size).await => {}
                Err(crate::s3::S3Error::Taken(_)) => {
                    // Another copy published first (one whose claim had lapsed, or a
                    // writer outside the services): these parts are never completed.
                    abort_recorded(self.mp.as_ref(), self.records, self.key, upload_id).await;
                    return Err(CopyError::Exists(self.key.to_string()));
                }
                Err(e) => return Err(self.completion_failed(e.into(), upload_id).await),
                Ok(()) => {}
            }
        } else if let Err(e) = self
            .mp
            .complete_multipart(self.key, &upload_id.to_string(), ids)
            .await
        {
            return Err(self.completion_failed(e.into(), upload_id).await);
        }
        if let Err(e) = self
            .records
            .forget_upload(self.key.as_ref(), upload_id)
            .await
        {
            // Harmless: the sweep finds the store has no such upload any more.
            tracing::warn!(key = %self.key, error = %framework::telemetry::LogText(&e.to_string()), "could not forget a completed upload");
        }
        Ok(Uploaded {
            digest: Digest {
                size,
                checksum: String::new(),
                sha256: None,
            },
            store_checksum: Some(format!("{composite}-{n}")),
            md5: None,
            parts_sent: sent,
            parts_reused: reused,
            written_durably: false,
            torn: None,
        })
    }

    /// Whether the key holds an object of `size` bytes whose `ChecksumSHA256` is
    /// `composite` (of this upload's parts' checksums, with or without its `-<parts>`): a
    /// store that keeps no checksum says nothing, and the key is taken as another's.
    async fn holds_these_parts(&self, composite: &str, size: u64) -> bool {
        match self.s3.head(self.key).await {
            Ok(Some(h)) => {
                h.size == size
                    && h.checksum_sha256
                        .as_deref()
                        .is_some_and(|c| c.split('-').next() == Some(composite))
            }
            _ => false,
        }
    }

    /// `e`, a failed completion of `upload_id`, once the upload is given up where the store
    /// refused these parts as a whole (a part it does not hold as listed, a checksum mode
    /// other than the upload's — `checksums` changed since it began —, a conflicting
    /// completion it asks to start over): the same completion would be refused at every
    /// retry, to the DLQ and after a replay. Given up, the retry uploads afresh. Not for
    /// the store's own trouble (a 400 `RequestTimeout`, an expired token), after which
    /// the same parts complete.
    async fn completion_failed(&self, e: CopyError, upload_id: &str) -> CopyError {
        if completion_refused(&e) {
            tracing::warn!(key = %self.key, error = %framework::telemetry::LogText(&e.to_string()), "the store refused to complete the multipart upload: giving it up");
            abort_recorded(self.mp.as_ref(), self.records, self.key, upload_id).await;
        }
        e
    }

    /// Takes one finished part: records it (so a crash after this point does not send
    /// it again) and keeps its id for the completion.
    async fn store_part(
        &self,
        ids: &mut [Option<PartId>],
        joined: Option<Result<PartResult, tokio::task::JoinError>>,
        upload_id: &str,
    ) -> Result<(), CopyError> {
        let Some(joined) = joined else {
            return Ok(());
        };
        let (idx, size, sha, r) =
            joined.map_err(|e| CopyError::Write("part".into(), std::io::Error::other(e)))?;
        let etag = crate::s3::part_etag(&r?.content_id);
        // Completed with our own checksum of the part, as a resumed part is: a store that
        // does not echo it back would otherwise be sent a completion without it, refused.
        let id = self.s3.part_id(&etag, &sha);
        self.records
            .record_part(
                upload_id,
                &PartRecord {
                    number: idx as u64 + 1,
                    etag,
                    sha256: sha,
                    size,
                },
            )
            .await?;
        if let Some(slot) = ids.get_mut(idx) {
            *slot = Some(id);
        }
        Ok(())
    }
}

type PartResult = (usize, u64, String, object_store::Result<PartId>);

/// A part's bytes as read and hashed, holding their room in the store's part budget until
/// dropped (once the part is uploaded).
struct Part {
    bytes: Vec<u8>,
    room: crate::part_budget::Room,
    /// The SHA-256 of `bytes` where asked for (S3 is sent it with each request).
    sum: Option<[u8; 32]>,
}

/// Reads up to `part` bytes, hashing them (and, with `sum`, taking their own SHA-256),
/// once `budget` has room for them.
async fn read_part(
    f: &mut Source,
    part: u64,
    h: &mut crate::checksum::Hasher,
    shown: &str,
    budget: &crate::part_budget::PartBudget,
    sum: bool,
) -> Result<Part, CopyError> {
    // Exactly the part (or what is left of the source, if less), allocated once: grown as
    // it was read (`read_to_end` doubles a full buffer), a 525 MiB part of a 5 TiB file
    // took a 1 GiB buffer and a 512 MiB copy on the way, three of them per file.
    let want = usize::try_from(part.min(f.limit())).unwrap_or(usize::MAX);
    let room = budget.take(want).await;
    let mut buf = Vec::with_capacity(want);
    while buf.len() < want {
        let n = f
            .read_buf(&mut buf)
            .await
            .map_err(|e| CopyError::Read(shown.to_string(), e))?;
        if n == 0 {
            break;
        }
    }
    // Off the runtime's threads: a part is up to 525 MiB (a 5 TiB file), a second of
    // hashing that would stall every other handler, heartbeat and renewal there. A small
    // file's one part is hashed in less time than the trip to a blocking thread takes.
    if buf.len() < HASH_INLINE_BELOW {
        h.update(&buf);
        let sum = sum.then(|| sha256_of(&buf));
        return Ok(Part {
            bytes: buf,
            room,
            sum,
        });
    }
    let hasher = std::mem::replace(h, Algorithm::Sha256.hasher());
    let (hasher, sum, buf) = tokio::task::spawn_blocking(move || {
        let (hasher, sum) = hash_block(hasher, &buf, sum);
        (hasher, sum, buf)
    })
    .await
    .map_err(|e| CopyError::Read(shown.to_string(), std::io::Error::other(e)))?;
    *h = hasher;
    Ok(Part {
        bytes: buf,
        room,
        sum,
    })
}

/// The MD5 of `b` (what a store's ETag is for one request) in hex, off the runtime's
/// threads where `b` is large: a single request may be up to `part_size_mib` (5 GiB), and
/// seconds of hashing on a runtime thread stalled every handler, heartbeat and claim
/// renewal there. `b` is handed back.
async fn md5_hex(b: Vec<u8>, shown: &str) -> Result<(String, Vec<u8>), CopyError> {
    let md5 = |b: &[u8]| hex::encode(<md5::Md5 as md5::Digest>::digest(b));
    if b.len() < HASH_INLINE_BELOW {
        return Ok((md5(&b), b));
    }
    tokio::task::spawn_blocking(move || (md5(&b), b))
        .await
        .map_err(|e| CopyError::Read(shown.to_string(), std::io::Error::other(e)))
}

/// The SHA-256 of `b`.
fn sha256_of(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

/// Parts smaller than this are hashed where they were read.
const HASH_INLINE_BELOW: usize = 256 * 1024;

/// `h` fed `b`, and with `sum` the SHA-256 of `b` alone: each digest on a thread of its
/// own (nearline's SHA-256 beside its MD5, the part's own beside the file's), since one
/// thread computing them in turn is a large copy's bound.
fn hash_block(
    h: crate::checksum::Hasher,
    b: &[u8],
    sum: bool,
) -> (crate::checksum::Hasher, Option<[u8; 32]>) {
    let (mut main, side) = h.split();
    std::thread::scope(|s| {
        let side = side.map(|mut side| {
            s.spawn(move || {
                side.update(b);
                side
            })
        });
        let part = sum.then(|| s.spawn(|| sha256_of(b)));
        main.update(b);
        if let Some(side) = side {
            main = main.rejoin(joined(side.join()));
        }
        (main, part.map(|t| joined(t.join())))
    })
}

/// A hashing thread's result. Hashing does not panic; were it to, the blocking task's
/// join reports it as a failed read.
fn joined<T>(r: std::thread::Result<T>) -> T {
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn join_part(
    r: Option<Result<object_store::Result<()>, tokio::task::JoinError>>,
) -> Result<(), CopyError> {
    match r {
        None => Ok(()),
        Some(Ok(r)) => Ok(r?),
        Some(Err(e)) => Err(CopyError::Write("part".into(), std::io::Error::other(e))),
    }
}

/// Checks that what `key` holds is what was uploaded. On S3, the store's own
/// ChecksumSHA256 (computed by S3 from the bytes it received) is compared with the one
/// computed here from the bytes read, or, for a one-request upload to a store that keeps
/// no checksum, its ETag with their MD5; only when neither settles it is the object
/// read back. A local tier's durable copy ([`crate::local`]) is verified as written (and
/// read back before it was published, where [`crate::tier::TierPolicy::read_back`]). Returns what the
/// store said about the object, to be recorded with it.
pub async fn verify_upload(
    tier: &Tier,
    key: &ObjectPath,
    alg: Algorithm,
    up: &Uploaded,
) -> Result<StoreFacts, CopyError> {
    let expected = &up.digest;
    let mut facts = StoreFacts::default();
    if up.written_durably {
        return Ok(facts);
    }
    if let Some(s3) = &tier.s3 {
        let Some(head) = s3.head(key).await? else {
            return Err(mismatch(key, alg, None, expected));
        };
        facts = StoreFacts {
            etag: head.etag.clone(),
            version: head.version.clone(),
            checksum: head.checksum_sha256.clone(),
        };
        let etag_md5 = head.etag.as_deref().map(|e| e.trim_matches('"'));
        let settled = match (&head.checksum_sha256, &up.store_checksum) {
            (Some(stored), Some(sent)) => Some(same_checksum(stored, sent)),
            (None, _) => match (etag_md5, &up.md5) {
                (Some(e), Some(m)) if e.len() == 32 => Some(e.eq_ignore_ascii_case(m)),
                _ => None,
            },
            _ => None,
        };
        if settled == Some(true) && head.size == expected.size {
            return Ok(facts);
        }
        // Disagreement or no evidence: the bytes themselves decide (a store computing
        // its checksum some other way must not fail a good copy).
    }
    let stored = hash_object(tier, key, alg).await?;
    if stored.as_ref() != Some(expected) {
        return Err(mismatch(key, alg, stored, expected));
    }
    Ok(facts)
}

/// Whether the recorded object `obj` is still what `key` holds. On S3 one HEAD settles
/// it when the store reports the same size and the ChecksumSHA256 recorded at
/// verification (or, where it keeps no checksum, the same ETag and version): the object
/// is then not downloaded. Anything else is read back and hashed, so a damaged or
/// replaced object is never trusted.
///
/// Where the HEAD disagreed with the record and the object read back whole all the same
/// (its facts changed, its bytes not: re-encrypted or copied in place, the vault moved to
/// another bucket, checksums switched off, a record older than its facts), the facts the
/// store reports now come with it: recorded, the next look needs one HEAD again instead
/// of another whole download — and can still settle it once a lifecycle rule has moved
/// the object to an archive storage class, where nothing can be read back.
pub async fn confirm_recorded(
    tier: &Tier,
    obj: &crate::records::StoredObject,
    alg: Algorithm,
) -> Result<Confirmation, CopyError> {
    let held = |held| Confirmation {
        held,
        facts: None,
        other_content: false,
    };
    match head_of(tier, obj).await? {
        Head::Gone => Ok(held(false)),
        Head::Seen { same: true, .. } => Ok(held(true)),
        Head::Seen { same: false, facts } => {
            let read = read_back_tagged(tier, obj, alg).await?;
            // Only where the bytes read are those of the object the HEAD described (its
            // ETag): replaced in between, the facts would vouch for content never read.
            let described = read
                .as_ref()
                .is_some_and(|(_, etag)| same_etag(etag.as_deref(), facts.etag.as_deref()));
            Ok(Confirmation {
                held: read.is_some(),
                facts: described.then_some(facts),
                other_content: read.is_none(),
            })
        }
        Head::NotS3 => Ok(held(read_back(tier, obj, alg).await?.is_some())),
    }
}

/// What a look at a recorded object found ([`confirm_recorded`]).
#[derive(Debug)]
pub struct Confirmation {
    /// Whether it still holds what was recorded.
    pub held: bool,
    /// The store's facts of it, where they changed while its bytes did not.
    pub facts: Option<crate::records::StoreFacts>,
    /// The key holds an object of other facts that read back as other content (replaced
    /// behind the service's back): the record no longer describes anything there.
    pub other_content: bool,
}

/// The store facts of the recorded object `obj` where one HEAD confirms it (see
/// [`confirm_recorded`]); `None` elsewhere (another store, gone, or other facts).
pub async fn head_confirming(
    tier: &Tier,
    obj: &crate::records::StoredObject,
) -> Result<Option<crate::records::StoreFacts>, CopyError> {
    Ok(match head_of(tier, obj).await? {
        Head::Seen { same: true, facts } => Some(facts),
        _ => None,
    })
}

/// Which object the store facts of a read belong to ([`hash_object_described`]).
#[derive(Debug)]
pub enum Described {
    /// Not an S3 store, or a read that gave no ETag to tie a HEAD to: no facts.
    NotS3,
    /// The object read, as a HEAD after the read describes it (the ETags agree).
    By(crate::records::StoreFacts),
    /// The key held another object at the HEAD (or none): replaced or gone since the read.
    Replaced,
}

/// [`hash_object`], with the store facts of the very object read: a HEAD after the read
/// whose ETag is the read's. Facts taken from a HEAD of another object (one replaced in
/// between) would vouch, at every later one-HEAD look, for content never read.
pub async fn hash_object_described(
    tier: &Tier,
    key: &ObjectPath,
    alg: Algorithm,
) -> Result<Option<(Digest, Described)>, CopyError> {
    let Some((read, etag)) = hash_object_tagged(tier, key, alg).await? else {
        return Ok(None);
    };
    let (Some(s3), Some(_)) = (&tier.s3, &etag) else {
        return Ok(Some((read, Described::NotS3)));
    };
    let described = match s3.head(key).await? {
        Some(h) if same_etag(etag.as_deref(), h.etag.as_deref()) => {
            Described::By(crate::records::StoreFacts {
                etag: h.etag,
                version: h.version,
                checksum: h.checksum_sha256,
            })
        }
        _ => Described::Replaced,
    };
    Ok(Some((read, described)))
}

/// Whether two ETags (quoted or not) are known and the same.
fn same_etag(a: Option<&str>, b: Option<&str>) -> bool {
    let unquoted = |e: &str| e.trim_matches('"').to_string();
    a.map(unquoted).is_some() && a.map(unquoted) == b.map(unquoted)
}

/// What one HEAD said of a recorded object.
enum Head {
    /// Not an S3 store: no HEAD taken.
    NotS3,
    /// The key holds nothing.
    Gone,
    /// An object, and whether it is what was recorded (see [`confirm_recorded`]).
    Seen {
        same: bool,
        facts: crate::records::StoreFacts,
    },
}

async fn head_of(tier: &Tier, obj: &crate::records::StoredObject) -> Result<Head, CopyError> {
    let Some(s3) = &tier.s3 else {
        return Ok(Head::NotS3);
    };
    let key = crate::store::object_path(&obj.object_key);
    let Some(head) = s3.head(&key).await? else {
        return Ok(Head::Gone);
    };
    let r = &obj.store;
    let same = head.size == obj.size
        && r.version
            .as_ref()
            .is_none_or(|v| head.version.as_ref() == Some(v))
        && match (&r.checksum, &head.checksum_sha256) {
            (Some(a), Some(b)) => same_checksum(a, b),
            (None, None) => r.etag.is_some() && r.etag == head.etag,
            _ => false,
        };
    Ok(Head::Seen {
        same,
        facts: crate::records::StoreFacts {
            etag: head.etag,
            version: head.version,
            checksum: head.checksum_sha256,
        },
    })
}

/// The digest of the recorded object `obj`, read back from the store and hashed, where it
/// still holds what was recorded (its size, checksum and any recorded SHA-256); `None`
/// where it is gone or holds anything else. Made durable before it is returned.
pub async fn read_back(
    tier: &Tier,
    obj: &crate::records::StoredObject,
    alg: Algorithm,
) -> Result<Option<Digest>, CopyError> {
    Ok(read_back_tagged(tier, obj, alg).await?.map(|(d, _)| d))
}

/// [`read_back`], with the ETag of the object read (see [`hash_object_tagged`]).
async fn read_back_tagged(
    tier: &Tier,
    obj: &crate::records::StoredObject,
    alg: Algorithm,
) -> Result<Option<(Digest, Option<String>)>, CopyError> {
    let key = crate::store::object_path(&obj.object_key);
    let read = hash_object_tagged(tier, &key, alg).await?.filter(|(r, _)| {
        r.size == obj.size
            && r.checksum == obj.checksum
            && (obj.content_sha256.is_none() || r.sha256 == obj.content_sha256)
    });
    if read.is_some() {
        // Recorded while its publisher's directory fsync may still run: reported only
        // once durable.
        make_durable(tier, &key).await?;
    }
    Ok(read)
}

/// Makes the object at `key` of a local store durable: its directory entry is fsynced
/// (the copy that published it may not have done so yet, so another handler that finds
/// the object meanwhile must not report it before). A completed upload to an object
/// store is durable already: nothing to do.
pub async fn make_durable(tier: &Tier, key: &ObjectPath) -> Result<(), CopyError> {
    let Some(root) = &tier.local_dir else {
        return Ok(());
    };
    let dest = root.join(key.as_ref());
    let shown = dest.display().to_string();
    let root = root.clone();
    tokio::task::spawn_blocking(move || crate::local::sync_parent(&root, &dest))
        .await
        .map_err(|e| CopyError::Write(shown.clone(), std::io::Error::other(e)))?
        .map_err(|e| CopyError::Write(shown, e))
}

/// Whether two ChecksumSHA256 values name the same digest: the part count S3 appends to
/// a multipart object's (`<base64>-<parts>`) is not sent by every store (moto omits it).
fn same_checksum(a: &str, b: &str) -> bool {
    let digest = |s: &str| match s.rsplit_once('-') {
        Some((d, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => d.to_string(),
        _ => s.to_string(),
    };
    digest(a) == digest(b)
}

fn mismatch(
    key: &ObjectPath,
    alg: Algorithm,
    stored: Option<Digest>,
    expected: &Digest,
) -> CopyError {
    let stored = stored.unwrap_or(Digest {
        size: 0,
        checksum: "missing".into(),
        sha256: None,
    });
    CopyError::Mismatch {
        key: key.to_string(),
        alg: alg.name(),
        stored: stored.checksum,
        stored_size: stored.size,
        expected: expected.checksum.clone(),
        expected_size: expected.size,
    }
}

/// Deletes an object this attempt wrote and that failed verification, trying again over
/// a store's brief blip ([`REMOVE_TRIES`] tries, 0.5 s then 1 s apart): left in place it
/// holds the file's own key with bytes no record names, and every later copy of the file
/// goes beside it.
pub async fn remove(store: &dyn ObjectStore, key: &ObjectPath) -> Result<(), CopyError> {
    let mut wait = std::time::Duration::from_millis(500);
    let mut tries = 1;
    loop {
        match store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) if tries < REMOVE_TRIES => {
                tracing::warn!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "could not remove what this attempt stored; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
                tries += 1;
            }
            Err(e) => {
                tracing::error!(key = %key, error = %framework::telemetry::LogText(&e.to_string()), "could not remove what this attempt stored: it stays at its key, recorded nowhere (remove it by hand); the file's next copy goes beside it");
                return Err(e.into());
            }
        }
    }
}

/// Tries at removing what failed verification before the attempt gives up on it.
pub const REMOVE_TRIES: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_short_of_descriptors_or_memory_is_an_outage_not_the_files_fault() {
        let io = |n| std::io::Error::from_raw_os_error(n);
        for n in [libc::EMFILE, libc::ENFILE, libc::ENOMEM] {
            assert!(CopyError::Write("k".into(), io(n)).is_outage(), "write {n}");
            assert!(CopyError::Read("k".into(), io(n)).is_outage(), "read {n}");
        }
        assert!(!CopyError::Write("k".into(), io(libc::EACCES)).is_outage());
        assert!(
            !CopyError::Read("k".into(), io(libc::EIO)).is_outage(),
            "a bad sector"
        );
    }

    #[test]
    fn a_file_larger_than_the_store_takes_is_permanent_other_write_errors_are_not() {
        let write = |errno| CopyError::Write("k".into(), std::io::Error::from_raw_os_error(errno));
        assert!(
            write(libc::EFBIG).is_permanent(),
            "retried 50 times into the same limit"
        );
        for errno in [libc::ENOSPC, libc::EIO, libc::EDQUOT, libc::EMFILE] {
            assert!(!write(errno).is_permanent(), "errno {errno}");
        }
    }

    #[test]
    fn the_stores_trouble_is_an_outage_a_refused_request_is_the_files() {
        let generic = |text: &str| {
            CopyError::Store(object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::other(text.to_string())),
            })
        };
        let denied = CopyError::Store(object_store::Error::PermissionDenied {
            path: "k".into(),
            source: Box::new(std::io::Error::other(
                "Server returned non-2xx status code: 403 Forbidden: ",
            )),
        });
        let outages = [
            generic("Error performing PUT http://s3/k in 2s - HTTP error: error sending request"),
            generic("Server returned non-2xx status code: 503 Service Unavailable: SlowDown"),
            // object_store makes every 404 NotFound: a missing bucket is no missing object.
            CopyError::Store(object_store::Error::NotFound {
                path: "k".into(),
                source: Box::new(std::io::Error::other(
                    "Server returned non-2xx status code: 404 Not Found: NoSuchBucket: The \
                     specified bucket does not exist",
                )),
            }),
            generic("Server returned non-2xx status code: 400 Bad Request: ExpiredToken"),
            denied,
            CopyError::S3(crate::s3::S3Error::Status("HeadObject", 500, String::new())),
            CopyError::Write("k".into(), std::io::Error::from_raw_os_error(libc::ENOSPC)),
            CopyError::Read("f".into(), std::io::Error::from_raw_os_error(libc::ESTALE)),
            CopyError::Db(db::sqlx::Error::PoolTimedOut),
            CopyError::EarlierUpload("k".into()),
        ];
        for e in &outages {
            assert!(e.is_outage(), "{e}");
        }
        let the_files = [
            generic("Server returned non-2xx status code: 400 Bad Request: KeyTooLongError"),
            CopyError::S3(crate::s3::S3Error::Status(
                "PutObject",
                400,
                "InvalidObjectName".into(),
            )),
            CopyError::S3(crate::s3::S3Error::Taken("PutObject")),
            generic("Server returned non-2xx status code: 501 Not Implemented: NotImplemented"),
            CopyError::S3(crate::s3::S3Error::Status(
                "CompleteMultipartUpload",
                501,
                "NotImplemented".into(),
            )),
            CopyError::Write("k".into(), std::io::Error::from_raw_os_error(libc::EFBIG)),
            // A name the store's filesystem refuses (CIFS, exFAT): this file's.
            CopyError::Write("k".into(), std::io::Error::from_raw_os_error(libc::EINVAL)),
            CopyError::Store(object_store::Error::NotFound {
                path: "k".into(),
                source: Box::new(std::io::Error::other("404 Not Found: NoSuchKey")),
            }),
            CopyError::Db(db::sqlx::Error::RowNotFound),
            CopyError::SourceChanged("f".into()),
            CopyError::Read("f".into(), std::io::Error::from_raw_os_error(libc::EIO)),
        ];
        for e in &the_files {
            assert!(!e.is_outage(), "{e}");
        }
    }

    #[tokio::test]
    async fn a_remote_source_is_looked_at_again_off_the_runtime_and_changes_are_seen() {
        let dir = tempfile::tempdir().expect("temp");
        let path = dir.path().join("f");
        std::fs::write(&path, b"first").expect("write");
        let f = std::fs::File::open(&path).expect("open");
        for remote in [false, true] {
            let state = SourceState::of(&f.metadata().expect("stat")).on_remote(remote);
            state.confirm(&f, "f").await.expect("unchanged");
        }
        let state = SourceState::of(&f.metadata().expect("stat")).on_remote(true);
        std::fs::write(&path, b"other content").expect("rewrite");
        assert!(matches!(
            state.confirm(&f, "f").await,
            Err(CopyError::SourceChanged(_))
        ));
    }

    /// A source growing while it is hashed (here without end) is hashed a buffer past
    /// its size at the start, not until its writer stops.
    #[tokio::test]
    async fn a_growing_source_is_hashed_a_buffer_past_its_size() {
        let endless = std::fs::File::open("/dev/zero").expect("/dev/zero");
        let d = hash_open(&endless, "zero", Algorithm::Sha256)
            .await
            .expect("hashed");
        assert!(d.size > 0 && d.size <= 4 * CHUNK as u64, "{}", d.size);
    }

    #[test]
    fn parts_grow_with_the_file_so_anything_s3_holds_fits() {
        let min = 8 * MIB;
        assert_eq!(part_size(0, min, true).unwrap(), min);
        assert_eq!(part_size(78 * 1024 * MIB, min, true).unwrap(), min);
        // Past 10,000 minimum parts the part grows, in whole MiB.
        let big = 100 * 1024 * MIB;
        let p = part_size(big, min, true).unwrap();
        assert!(
            p > min && p.is_multiple_of(MIB) && big.div_ceil(p) <= MAX_PARTS,
            "{p}"
        );
        for len in [MAX_OBJECT, MAX_OBJECT - 1, 3 * 1024 * 1024 * MIB + 12345] {
            let p = part_size(len, min, true).unwrap();
            assert!(len.div_ceil(p) <= MAX_PARTS, "{len}: {p}");
            assert!(p <= 5 * 1024 * MIB, "S3's largest part is 5 GiB");
        }
        assert_eq!(part_size(20 * MIB, 5 * MIB, true).unwrap(), 5 * MIB);
        // Too large for S3 at all: permanent, not retried.
        let e = part_size(MAX_OBJECT + 1, min, true).unwrap_err();
        assert!(e.is_permanent(), "{e}");
        // A local store has no such limit.
        assert!(part_size(MAX_OBJECT + 1, min, false).is_ok());
    }
}
