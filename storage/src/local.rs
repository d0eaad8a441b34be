//! Durable copies into a local-filesystem tier: the file is written, while it is hashed,
//! to an unnamed file (`O_TMPFILE`) in the key's directory, fsynced, linked under its key
//! (a link never replaces an object), and the directory fsynced, so a success reported
//! afterwards survives a power loss, not only a crash. A copy that dies leaves nothing: the
//! kernel frees an unnamed file with its last descriptor.
//!
//! Where the filesystem has no unnamed files (NFS, most FUSE) the copy is staged in a
//! named file in one reserved directory under the store's root ([`STAGING_DIR`]) and
//! published with a hard link (the staging name then removed), or a rename that never
//! replaces where the filesystem has no hard links. Staging files are never kept beside the
//! object: any name beside it could be another object's (a source file named `take#1` is
//! archived as `take#1`), so a sweep of leftovers there could delete an archived copy.
//! The reserved directory is one flat listing to sweep after a crash.
//!
//! The digest is computed from the very buffers that were written, and every write and
//! the fsync succeeded: that is the verification of a local copy. Where it is asked for
//! (`Expected::read_back`: nearline) the copy is also read back before it is published,
//! from the disk, its pages dropped from the page cache first (read from there, the bytes
//! just written would prove nothing more).
//!
//! Large files go through a pipeline: this thread reads blocks, one thread hashes them
//! (nearline: two, its MD5 and its SHA-256) and another writes them, at most
//! [`BLOCKS_IN_FLIGHT`] blocks ahead, so reading,
//! hashing and writing overlap while memory stays bounded (about
//! `(BLOCKS_IN_FLIGHT + 3) × BLOCK` per copy). The writer asks the kernel to start
//! writing back each window as soon as it is written, so the final fsync finds little
//! left to flush.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::time::Duration;

use crate::checksum::Algorithm;
use crate::copy::{CopyError, Digest};
// Shared with concurrent copies into the same directory.
use crate::dir_sync::sync_dir;

/// Read and write size.
pub const BLOCK: usize = 1024 * 1024;
/// Blocks read ahead of the slower of hashing and writing.
pub const BLOCKS_IN_FLIGHT: usize = 6;
/// Written bytes after which the writer starts their writeback.
const WRITEBACK_WINDOW: u64 = 8 * 1024 * 1024;

/// The directory under a local store's root that holds copies being written; a reserved
/// name no object key may start with.
pub const STAGING_DIR: &str = ".storagetier-staging";

/// A staging file untouched for this long belongs to a process that died mid-copy
/// (kill -9, out of memory): a live copy writes to it continuously, and touches it
/// while it reads it back ([`FRESHEN_EVERY`]).
pub const STALE_STAGING: Duration = Duration::from_secs(15 * 60);

/// How often a copy being read back touches its staging file: a read-back writes nothing,
/// and one of a large file on a slow share (200 GiB at 150 MB/s: 23 minutes) was taken
/// for a dead copy's and swept, every attempt, so the file was never published.
const FRESHEN_EVERY: Duration = Duration::from_secs(60);

/// Why a key whose path goes through a stored file can never be stored.
pub const FILE_IN_THE_WAY: &str =
    "a stored object is a file where the key needs a directory (rename the source)";

/// Why a key whose name the store's filesystem refuses is never stored.
pub const NAME_REFUSED: &str = "the store's filesystem refuses a name on its path (a character \
     it does not allow, or a name that is not UTF-8): rename the source or store elsewhere";

/// `e`, met on the way to `key` in a local store, as the permanent error it is where no
/// retry can mend it (a file where a directory is needed, a name too long).
pub(crate) fn unstorable(key: &str, e: &std::io::Error) -> Option<CopyError> {
    match e.raw_os_error() {
        Some(libc::ENOTDIR) => Some(CopyError::Unstorable(key.to_string(), FILE_IN_THE_WAY)),
        Some(libc::ENAMETOOLONG) => Some(CopyError::Unstorable(
            key.to_string(),
            "a name on its path is longer than the store's filesystem allows",
        )),
        _ => None,
    }
}

/// `e`, met publishing a copy under `key`, where it is more than a write error: another
/// copy there first, or a name the store's filesystem refuses.
fn not_published(key: &str, e: std::io::Error) -> Result<CopyError, std::io::Error> {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        return Ok(CopyError::Exists(key.to_string()));
    }
    match e.raw_os_error() {
        // A filesystem refusing a name (not UTF-8 on ZFS `utf8only`, or ext4/F2FS strict
        // casefolding; a character an NFS server's export does not take) says so only
        // where the copy is named: retried, each of the 50 attempts copied the whole file
        // again first. (FAT, with no hard links, says it to the rename, whose EINVAL
        // `publish` cannot tell from "no renameat2 here"; SMB says ENOENT: both still
        // retried.)
        Some(libc::EINVAL | libc::EILSEQ) => {
            Ok(CopyError::Unstorable(key.to_string(), NAME_REFUSED))
        }
        _ => Err(e),
    }
}

/// What the copy must match before it is published under its key.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The source's size when it was opened.
    pub size: u64,
    /// The source's digest, where it was hashed before (a copy of other bytes is not
    /// published).
    pub digest: Option<&'a Digest>,
    /// The source's state when the copy began: a file written to while it was read (in
    /// place, same size) is not published.
    pub unchanged: Option<crate::copy::SourceState>,
    /// Set when whoever waits for the copy is gone (its handler stopped: a lost
    /// connection, a shutdown): the copy stops at its next block and publishes nothing.
    /// A blocking thread cannot be stopped otherwise, and the message, redelivered at
    /// once, would be copied by a second one beside it.
    pub stopped: Option<&'a std::sync::atomic::AtomicBool>,
    /// Read the copy back from its disk and compare its digest before it is published
    /// (nearline: design §"online-nearline"), not only the digest of what was written.
    pub read_back: bool,
}

/// Copies `file` (from its start) to `key` under the store directory `root`; returns the
/// size and digest of what was read and written. The copy's data is fsynced before it is
/// published under its key, so whatever a power loss leaves under the key is whole; then
/// the new directory entry is fsynced, so the object is durable when this returns. The
/// copy is published only if it matches `expected`, and never over an object already there
/// ([`CopyError::Exists`]: another copy won the key): a conditional create, so concurrent
/// copies to one key need no claim. Blocking: run it on a blocking thread.
pub fn copy(
    file: &File,
    root: &Path,
    key: &str,
    shown: &str,
    alg: Algorithm,
    expected: Expected<'_>,
) -> Result<Digest, CopyError> {
    copy_via(file, root, key, shown, alg, expected, unnamed_files())
}

/// [`copy`], staging in an unnamed file where `unnamed` (else in the staging directory).
fn copy_via(
    file: &File,
    root: &Path,
    key: &str,
    shown: &str,
    alg: Algorithm,
    expected: Expected<'_>,
    unnamed: bool,
) -> Result<Digest, CopyError> {
    // Any case: on a case-insensitive store (SMB, a casefolded directory) another spelling
    // is the same directory — Unicode's too (`ſ` folds to `s`, `ı` to `i`, the Kelvin sign
    // to `k`) — and its sweep would delete what was published there.
    if key
        .split('/')
        .next()
        .is_some_and(|d| d.to_uppercase().to_lowercase() == STAGING_DIR)
    {
        return Err(CopyError::Reserved(key.to_string()));
    }
    let dest = root.join(key);
    // No retry can mend some: say so instead of retrying to the DLQ.
    let write_err = |e: std::io::Error| {
        unstorable(key, &e).unwrap_or_else(|| CopyError::Write(dest.display().to_string(), e))
    };
    let parent = dest
        .parent()
        .ok_or_else(|| write_err(std::io::Error::other("no parent directory")))?;
    // The key's directory is usually there: made only when the copy cannot start in it
    // (one stat per file fewer).
    let mode = expected.unchanged.map_or(0o644, |s| s.copy_mode());
    let staged = match Staged::create(root, parent, unnamed, mode) {
        // Its directories are made only where no link leads out of the store: made through
        // one, they were left outside it whatever the copy then found.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match resolves_beneath(root, parent) {
                Ok(true) => create_dirs_durably(parent)
                    .and_then(|()| Staged::create(root, parent, unnamed, mode)),
                Ok(false) => return Err(CopyError::Unstorable(key.to_string(), LEADS_OUT)),
                Err(e) => Err(e),
            }
        }
        r => r,
    }
    .map_err(write_err)?;
    // The key's directory is found by name: a link planted in the store (by anyone who may
    // write there) would take the copy, and the files after it, out of the store. An
    // unnamed file says where it really is (one readlink); the key's directory of a named
    // staging (a share: NFS, most FUSE) is resolved once it is there.
    if let Staged::Unnamed(f) = &staged
        && !created_beneath(root, f)
    {
        staged.discard();
        return Err(CopyError::Unstorable(key.to_string(), LEADS_OUT));
    }
    // Staged elsewhere: its link (or rename) needs the key's directory.
    if let Staged::Named(..) = staged {
        let beneath = resolves_beneath(root, parent).and_then(|beneath| match beneath {
            true => create_dirs_durably(parent).and_then(|()| resolves_beneath(root, parent)),
            false => Ok(false),
        });
        match beneath {
            Ok(true) => {}
            Ok(false) => {
                staged.discard();
                return Err(CopyError::Unstorable(key.to_string(), LEADS_OUT));
            }
            Err(e) => {
                staged.discard();
                return Err(write_err(e));
            }
        }
    }
    let staging = staged.file();
    // Held until the copy ends: the room it takes is not offered to another copy.
    let room = match room_for(staging, expected.size, key) {
        Ok(room) => room,
        Err(e) => {
            staged.discard();
            return Err(e.unwrap_or_else(&write_err));
        }
    };
    let stopped = || {
        expected
            .stopped
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    let result = (|| {
        let digest = if expected.size < BLOCK as u64 {
            copy_small(file, staging, shown, &dest, alg, expected.size)?
        } else {
            let run = Run {
                len: expected.size,
                stopped: &stopped,
                written: &room.written,
            };
            copy_pipelined(file, staging, shown, &dest, alg, run)?
        };
        if stopped() {
            return Err(CopyError::Stopped(shown.to_string()));
        }
        if digest.size != expected.size || expected.digest.is_some_and(|d| d != &digest) {
            return Err(CopyError::SourceChanged(shown.to_string()));
        }
        if let Some(state) = expected.unchanged {
            state.check(file, shown)?;
        }
        staging.sync_all().map_err(write_err)?;
        #[cfg(test)]
        corrupt_for_test(staging);
        if expected.read_back {
            // A read of the store that fails is the store's trouble, as its writes' are
            // (an EIO of its disk an outage, not the file's fault).
            read_back(staging, key, alg, &digest, &stopped).map_err(|e| match e {
                ReadBack::Io(e) => write_err(e),
                ReadBack::Differs(e) => e,
                // Stopped while it read: the redelivery copies the file beside this thread.
                ReadBack::Stopped => CopyError::Stopped(shown.to_string()),
            })?;
        }
        staged
            .publish(&dest)
            .map_err(|e| not_published(key, e).unwrap_or_else(&write_err))?;
        // On this thread, not another blocking trip: a small file's copy is a handful of
        // syscalls, and each trip costs about as much CPU as they do.
        sync_parent(root, &dest).map_err(write_err)?;
        Ok(digest)
    })();
    if result.is_err() {
        staged.discard();
    }
    result
}

/// Why a read-back failed.
enum ReadBack {
    /// Reading the copy failed.
    Io(std::io::Error),
    /// It holds other bytes than were written ([`CopyError::Mismatch`]).
    Differs(CopyError),
    /// Whoever waits for the copy is gone (see `Expected::stopped`).
    Stopped,
}

/// Reads the fsynced copy `f` back from its disk and compares its digest with `written`'s.
/// Its pages are dropped from the page cache first (clean once fsynced): read from there,
/// the bytes just written would prove nothing about what the disk or the share keeps (a
/// failing disk, a NAS corrupting data in flight).
fn read_back(
    f: &File,
    key: &str,
    alg: Algorithm,
    written: &Digest,
    stopped: &dyn Fn() -> bool,
) -> Result<(), ReadBack> {
    // Advice only: a filesystem that ignores it is read as it is.
    let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
    // The fsync may have taken long too.
    freshen(f);
    let mut freshened = std::time::Instant::now();
    let (mut h, _) = alg.hasher().split();
    // One byte more than the copy: its end is seen in the read that fills the rest.
    let mut buf =
        vec![0u8; usize::try_from(written.size.saturating_add(1)).map_or(BLOCK, |n| n.min(BLOCK))];
    let mut at = 0u64;
    loop {
        if stopped() {
            return Err(ReadBack::Stopped);
        }
        let n = match f.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadBack::Io(e)),
        };
        h.update(&buf[..n]);
        at += n as u64;
        #[cfg(test)]
        let swept = age_staging_for_test(f);
        #[cfg(not(test))]
        let swept: Option<std::path::PathBuf> = None;
        if swept.is_some() || freshened.elapsed() >= FRESHEN_EVERY {
            freshen(f);
            freshened = std::time::Instant::now();
        }
        if let Some(root) = swept {
            sweep_stale_staging(&root).map_err(ReadBack::Io)?;
        }
    }
    let (checksum, _) = h.finish();
    if at == written.size && checksum == written.checksum {
        return Ok(());
    }
    Err(ReadBack::Differs(CopyError::Mismatch {
        key: key.to_string(),
        alg: alg.name(),
        stored: checksum,
        stored_size: at,
        expected: written.checksum.clone(),
        expected_size: written.size,
    }))
}

/// Sets the modification time of the staging file `f` to now by the store's clock
/// (`UTIME_NOW`: on a share, the file server's, which the staging sweep ages it by).
/// Best effort: where it fails, the copy goes on as it did before.
fn freshen(f: &File) {
    use rustix::fs::{Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
    };
    if let Err(e) = rustix::fs::futimens(f, &times) {
        tracing::debug!(error = %e, "could not touch a staging file being read back");
    }
}

#[cfg(test)]
thread_local! {
    /// Set by a test: the next copy on this thread has its first byte changed once it is
    /// fsynced, as a disk that does not keep what it was given would.
    static CORRUPT_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set by a test to a store's root: the next read-back on this thread, after its first
    /// block, finds [`STALE_STAGING`] and more gone by (its file aged so), and the staging
    /// sweep of that root runs.
    static SWEEP_DURING_READ_BACK: std::cell::RefCell<Option<std::path::PathBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// See `SWEEP_DURING_READ_BACK`: the root to sweep, once `f` is aged.
#[cfg(test)]
fn age_staging_for_test(f: &File) -> Option<std::path::PathBuf> {
    let root = SWEEP_DURING_READ_BACK.with(|r| r.borrow_mut().take())?;
    let long_ago = std::time::SystemTime::now() - STALE_STAGING - Duration::from_secs(60);
    f.set_modified(long_ago).expect("age the staging file");
    Some(root)
}

#[cfg(test)]
fn corrupt_for_test(f: &File) {
    if CORRUPT_NEXT.with(|c| c.replace(false)) {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0).expect("read back");
        f.write_all_at(&[b[0] ^ 0xff], 0).expect("corrupted");
    }
}

/// From this size on, a copy first asks whether the store's filesystem has room for it
/// (one `fstatvfs`; a small file's copy does not pay for it).
const ROOM_CHECKED_FROM: u64 = 64 * 1024 * 1024;

/// The large copies under way, by filesystem (device): what each will still write is
/// not free space yet, yet counted free: 16 copies each finding room for itself alone
/// filled the disk together, and all of them (and the records beside them) failed.
static TAKEN: std::sync::Mutex<Vec<UnderWay>> = std::sync::Mutex::new(Vec::new());

/// One large copy under way (see [`TAKEN`]).
#[derive(Debug)]
struct UnderWay {
    /// Its [`Room`]'s number.
    id: u64,
    /// The device of the filesystem it writes to.
    dev: u64,
    /// The bytes it will have written.
    size: u64,
    /// The bytes it has written so far, counted by its writer once each block is written.
    /// Counted, not asked of its staging file: an `fstat` of each other copy's file under
    /// the lock made NFS and SMB clients flush that file's unwritten data first, one after
    /// another, every new copy and every finished one waiting behind them.
    written: Arc<AtomicU64>,
}

impl UnderWay {
    /// The bytes it has still to write.
    fn left(&self) -> u64 {
        self.size
            .saturating_sub(self.written.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The room one copy under way takes (see [`TAKEN`]), given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct Room {
    id: Option<u64>,
    /// What the copy has written so far (see [`UnderWay::written`]).
    written: Arc<AtomicU64>,
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
            taken.retain(|t| t.id != id);
        }
    }
}

/// Whether the filesystem `staging` is on can take `size` more bytes: a file larger than
/// the whole filesystem is refused for good (`Ok(Err)`: each attempt filled the disk until
/// ENOSPC, and other copies and the records beside them failed meanwhile, for a day of
/// outage retries); one larger than the space free now, less what this process's counted
/// copies under way there have still to write, is an outage (`Err(ENOSPC)`, as writing it
/// would end) found before a byte is written. The room is then reserved in the filesystem
/// itself (see [`reserve`]): seen by every process writing there — the other tier's
/// service on the same disk, a second replica on this host — where copies that each found
/// room for themselves alone filled the disk together. Where the filesystem does not
/// reserve (NFS, ZFS, SMB, most FUSE), the copy is counted in this process instead, by
/// what it has still to write (its size less what its writer has written). The blocks
/// reserved for root count only for a service running as root: for any other, they are
/// neither free nor part of what it could ever fill.
fn room_for(
    staging: &File,
    size: u64,
    key: &str,
) -> Result<Room, Result<CopyError, std::io::Error>> {
    room_in(staging, size, key, true)
}

/// [`room_for`], reserving in the filesystem only where `reserving` (the tests of the count
/// turn it off).
fn room_in(
    staging: &File,
    size: u64,
    key: &str,
    reserving: bool,
) -> Result<Room, Result<CopyError, std::io::Error>> {
    if size < ROOM_CHECKED_FROM {
        return Ok(Room::default());
    }
    // A filesystem that cannot say is written to as before.
    let Some((total, _)) = space(staging) else {
        return Ok(Room::default());
    };
    // Only where the filesystem's size is its own: on ZFS, a thin volume, a quota'd or
    // network share, "total" is what is used plus what is free now, and a snapshot pruned
    // or a quota raised makes room — a full store to wait out, not a file to dead-letter.
    // With the headroom kept free beside it: one that never fits is no outage either.
    if !fits(size, total, total) && fixed_size(staging) {
        return Err(Ok(CopyError::Unstorable(
            key.to_string(),
            "the file is larger than the store's whole filesystem (less the room kept free)",
        )));
    }
    // Untracked where the file cannot be looked at: checked alone, as before.
    let dev = staging
        .metadata()
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        .ok();
    // Looked at and reserved under one lock, the free space read under it: two copies
    // started together both found the room free, and the second one's reservation filled
    // the disk before it failed (a partial allocation is kept until the file goes). And
    // read before the lock, the bytes counted copies wrote while this one waited for it
    // would be counted written, yet not gone from "free".
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    let Some((_, free)) = space(staging) else {
        return Ok(Room::default());
    };
    let left: u64 = taken
        .iter()
        .filter(|t| Some(t.dev) == dev)
        .map(UnderWay::left)
        .sum();
    if !fits(size, total, free.saturating_sub(left)) {
        return Err(Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
    }
    if reserving {
        match reserve(staging, size) {
            Ok(true) => return Ok(Room::default()),
            Ok(false) => {}
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                return Err(Ok(CopyError::Unstorable(
                    key.to_string(),
                    "the file is larger than the store's filesystem allows one file to be",
                )));
            }
            Err(e) => return Err(Err(e)),
        }
    }
    let Some(dev) = dev else {
        return Ok(Room::default());
    };
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let written = Arc::new(AtomicU64::new(0));
    taken.push(UnderWay {
        id,
        dev,
        size,
        written: written.clone(),
    });
    Ok(Room {
        id: Some(id),
        written,
    })
}

/// Reserves `size` bytes for `file` beyond its end (`fallocate` with `KEEP_SIZE`: its size
/// stays what is written): true once its blocks are there; false where the filesystem does
/// not reserve — refusing the call (NFS, FUSE) or taking it without allocating a block
/// (ZFS, SMB); an error where it cannot take them (ENOSPC, EDQUOT, EFBIG) or is failing
/// (EIO, EROFS: as writing would).
fn reserve(file: &File, size: u64) -> std::io::Result<bool> {
    use rustix::io::Errno;
    // What a refused or partial reservation took is given back at once, under the caller's
    // lock: kept until the copy's file goes, the next copy found it taken.
    let give_back = || {
        let _ = rustix::fs::ftruncate(file, 0);
    };
    loop {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, size) {
            Ok(()) => break,
            Err(Errno::INTR) => {}
            // No room, or a store that is failing: as writing would end.
            Err(e @ (Errno::NOSPC | Errno::DQUOT | Errno::FBIG | Errno::IO | Errno::ROFS)) => {
                give_back();
                return Err(e.into());
            }
            // Anything else (not supported, not allowed here) reserves nothing: counted.
            Err(_) => {
                give_back();
                return Ok(false);
            }
        }
    }
    use std::os::unix::fs::MetadataExt as _;
    let reserved = file
        .metadata()
        .is_ok_and(|m| m.blocks().saturating_mul(512) >= size);
    if !reserved {
        give_back();
    }
    Ok(reserved)
}

/// What a large copy leaves free on a filesystem of `total` bytes: 1 %, from 64 MiB to
/// 1 GiB. The records (SQLite by default, beside the store) and the small copies share the
/// disk: a copy that took its last byte failed its own record, and every other copy, for a
/// day of outage retries.
fn headroom(total: u64) -> u64 {
    (total / 100).clamp(64 << 20, 1 << 30)
}

/// Whether a copy of `size` bytes fits in `free` bytes of a filesystem of `total`,
/// leaving its [`headroom`].
fn fits(size: u64, total: u64, free: u64) -> bool {
    size.checked_add(headroom(total)).is_some_and(|n| n <= free)
}

/// Whether the filesystem `file` is on has a size of its own
/// ([`db::filesystem::has_fixed_size`]).
fn fixed_size(file: &File) -> bool {
    db::filesystem::of_file(file).is_some_and(db::filesystem::has_fixed_size)
}

/// The space of the filesystem `file` is on, as this process may fill it: (total, free)
/// in bytes; None where it cannot say (some FUSE and network filesystems report no size).
fn space(file: &File) -> Option<(u64, u64)> {
    let fs = rustix::fs::fstatvfs(file).ok()?;
    let reserved = match rustix::process::geteuid().is_root() {
        true => 0,
        false => fs.f_bfree.saturating_sub(fs.f_bavail),
    };
    let total = fs
        .f_blocks
        .saturating_sub(reserved)
        .saturating_mul(fs.f_frsize);
    let free = fs
        .f_bfree
        .saturating_sub(reserved)
        .saturating_mul(fs.f_frsize);
    (total > 0).then_some((total, free))
}

/// Where a copy is written before it is published under its key.
enum Staged {
    /// An unnamed file (`O_TMPFILE`) in the key's own directory: creating it takes no
    /// directory lock (16 handlers creating in one staging directory queued on its lock),
    /// it is published by a link (no rename across directories, which the kernel
    /// serialises per filesystem), and a process that dies leaves nothing behind — the
    /// kernel frees the file with its last descriptor.
    Unnamed(File),
    /// A named file in the staging directory, where the filesystem has no `O_TMPFILE`
    /// (NFS, most FUSE) or `/proc` is not mounted; swept if its copy dies.
    Named(File, PathBuf),
}

impl Staged {
    /// An unnamed file in `dir` where `unnamed` and the filesystem supports it, else a
    /// named one in `root`'s staging directory; with permissions `mode` (less the umask).
    fn create(root: &Path, dir: &Path, unnamed: bool, mode: u32) -> std::io::Result<Staged> {
        use rustix::fs::{Mode, OFlags};
        if unnamed {
            // Readable: a copy may be read back before it is published.
            let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
            match rustix::fs::open(dir, flags, Mode::from_raw_mode(mode)) {
                Ok(fd) => return Ok(Staged::Unnamed(File::from(fd))),
                Err(e)
                    if [
                        rustix::io::Errno::OPNOTSUPP,
                        rustix::io::Errno::ISDIR,
                        rustix::io::Errno::INVAL,
                        rustix::io::Errno::NOSYS,
                    ]
                    .contains(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let (f, p) = staging_file(root, mode)?;
        Ok(Staged::Named(f, p))
    }

    fn file(&self) -> &File {
        match self {
            Staged::Unnamed(f) | Staged::Named(f, _) => f,
        }
    }

    /// Gives the copy the name `dest` unless `dest` exists (`AlreadyExists` then).
    fn publish(&self, dest: &Path) -> std::io::Result<()> {
        match self {
            // Through /proc: linking a descriptor itself (`AT_EMPTY_PATH`) needs
            // CAP_DAC_READ_SEARCH, which containers do not grant. A link never replaces.
            Staged::Unnamed(f) => {
                use std::os::fd::AsRawFd;
                let by_fd = format!("/proc/self/fd/{}", f.as_raw_fd());
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    by_fd.as_str(),
                    rustix::fs::CWD,
                    dest,
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(std::io::Error::from)
            }
            Staged::Named(_, staged) => publish(staged, dest),
        }
    }

    /// Removes what an unpublished copy left (an unnamed file needs nothing).
    fn discard(self) {
        if let Staged::Named(_, staged) = self {
            let _ = std::fs::remove_file(&staged);
        }
    }
}

/// Why a key whose directory in the store leads out of it is never stored there.
pub const LEADS_OUT: &str =
    "a directory on its way in the store is a symbolic link out of the store (remove it)";

/// Whether the unnamed file `f` was created in a directory beneath `root` (canonical), by
/// where the kernel says it is (`/proc/self/fd`); true where that cannot be read.
fn created_beneath(root: &Path, f: &File) -> bool {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
        Ok(real) => real.parent().is_some_and(|dir| dir.starts_with(root)),
        Err(_) => true,
    }
}

/// Whether copies may stage in unnamed files: they are published through `/proc/self/fd`.
fn unnamed_files() -> bool {
    static PROC_FD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// Moves `staged` to `dest` unless `dest` exists (`AlreadyExists` then): a hard link, which
/// the server itself refuses over an existing name (NFS, SMB), and the staging name
/// removed; where the filesystem has no hard links, `renameat2` with `RENAME_NOREPLACE`.
/// Not that rename first: on SMB only the client checks that the target is missing, and the
/// rename it sends replaces whatever another host published meanwhile.
fn publish(staged: &Path, dest: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    let linked = match std::fs::hard_link(staged, dest) {
        // NFS sends a LINK again whose answer was lost: the second finds the first's.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && same_file(staged, dest) => {
            Ok(())
        }
        r => r,
    };
    match linked {
        Ok(()) => {
            // A leftover name in the staging directory is swept later; the object is in
            // place either way.
            let _ = std::fs::remove_file(staged);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        // No hard links here (or refused for another reason a rename may not meet): a
        // rename that never replaces; where the filesystem has none either, the link's
        // error is the one to report.
        Err(link) => match renameat_with(CWD, staged, CWD, dest, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(e)
                if [
                    rustix::io::Errno::INVAL,
                    rustix::io::Errno::NOSYS,
                    rustix::io::Errno::OPNOTSUPP,
                ]
                .contains(&e) =>
            {
                Err(link)
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Whether `a` and `b` name one file (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Deletes the staging files under `root` untouched for [`STALE_STAGING`] (copies cut
/// short by a crash; fresh ones may be another live instance's), so a crash mid-copy
/// costs no disk; returns how many. Blocking.
pub fn sweep_stale_staging(root: &Path) -> std::io::Result<usize> {
    let dir = staging_dir(root)?;
    if !dir.is_dir() {
        return Ok(0);
    }
    // Ages are measured on the clock that stamped the files: on a share (where named
    // staging files are used) that is the file server's, and a replica whose own clock ran
    // 15 minutes ahead of it swept every other replica's live copies.
    // Without that clock nothing is swept: this machine's could be the one 15 minutes off.
    let now = store_clock(&dir)?;
    sweep_staged_before(&dir, now)
}

/// The start of the names, in the staging directory, of the files written to read the
/// store's clock (each new, then removed).
pub const CLOCK_FILE: &str = ".clock-";

/// The time by the clock of the filesystem holding `dir` (the file server's, on a
/// share): the modification time of a file created there now. A new file of its own
/// (`O_EXCL`), removed at once: a name planted there (a link to the database, say) is
/// never written through.
fn store_clock(dir: &Path) -> std::io::Result<std::time::SystemTime> {
    use std::io::Write as _;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let path = dir.join(format!("{CLOCK_FILE}{}-{nanos}", std::process::id()));
    let read = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(b"0")?;
            f.metadata()?.modified()
        });
    let _ = std::fs::remove_file(&path);
    read
}

/// Deletes the files in the staging directory `dir` last written [`STALE_STAGING`] or more
/// before `now` (a time of the clock that stamped them).
fn sweep_staged_before(dir: &Path, now: std::time::SystemTime) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        // A clock file is removed as soon as it is read: one this old was left by a
        // process that died in that instant (never a link: `is_file` does not follow one).
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // (`.clock`: an earlier release's file of one name, left in place.)
        let clock = name.starts_with(CLOCK_FILE) || name == ".clock";
        // Only names this service gives its files there: anything else is no partial copy
        // of ours (an object published into a directory the store folds onto this one).
        if !clock && !is_staging_name(&name) {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let stale = meta.is_file()
            && meta
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= STALE_STAGING);
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            if clock {
                tracing::debug!(file = %entry.path().display(), "removed a clock file left by an interrupted process");
                continue;
            }
            tracing::warn!(file = %entry.path().display(), "removed a partial copy left by an interrupted upload");
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `name` is one a staging file is given (a UUID's 32 lowercase hex digits).
fn is_staging_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A file under one block: one read, one write.
fn copy_small(
    file: &File,
    staging: &File,
    shown: &str,
    dest: &Path,
    alg: Algorithm,
    len: u64,
) -> Result<Digest, CopyError> {
    // One byte more than the size at open, so growth is seen (and reported by the caller).
    let mut buf = vec![0u8; len as usize + 1];
    let mut size = 0usize;
    loop {
        let n = file
            .read_at(&mut buf[size..], size as u64)
            .map_err(|e| CopyError::Read(shown.to_string(), e))?;
        size += n;
        if n == 0 || size == buf.len() {
            break;
        }
    }
    let mut h = alg.hasher();
    h.update(&buf[..size]);
    (&*staging)
        .write_all(&buf[..size])
        .map_err(|e| CopyError::Write(dest.display().to_string(), e))?;
    let (checksum, sha256) = h.finish();
    Ok(Digest {
        size: size as u64,
        checksum,
        sha256,
    })
}

/// How a pipelined copy runs: how far it reads, when it stops, where it counts.
struct Run<'a> {
    /// The size the file had: reading stops a block past it.
    len: u64,
    /// Whether the copy is to stop (looked at before each block).
    stopped: &'a dyn Fn() -> bool,
    /// Where the writer counts what it has written (see [`UnderWay::written`]).
    written: &'a AtomicU64,
}

/// Reader (this thread) → hasher thread(s) and writer thread, sharing each block; reading
/// stops a block past `run.len`, the size the file had.
fn copy_pipelined(
    file: &File,
    staging: &File,
    shown: &str,
    dest: &Path,
    alg: Algorithm,
    run: Run<'_>,
) -> Result<Digest, CopyError> {
    let Run {
        len,
        stopped,
        written: written_so_far,
    } = run;
    let (to_hasher, hasher_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(BLOCKS_IN_FLIGHT);
    let (to_writer, writer_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(BLOCKS_IN_FLIGHT);
    // Nearline's SHA-256 beside its MD5 on a thread of its own.
    let (main, side) = alg.hasher().split();
    let (to_side, side_rx) = match side {
        Some(_) => {
            let (t, r) = mpsc::sync_channel::<Arc<Vec<u8>>>(BLOCKS_IN_FLIGHT);
            (Some(t), Some(r))
        }
        None => (None, None),
    };
    // Blocks every consumer is done with come back here to be read into again.
    let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let hash_on = |mut h: crate::checksum::Hasher, rx: mpsc::Receiver<Arc<Vec<u8>>>| {
            let recycle = recycle.clone();
            s.spawn(move || {
                for block in rx {
                    h.update(&block);
                    if let Ok(b) = Arc::try_unwrap(block) {
                        let _ = recycle.send(b);
                    }
                }
                h.finish()
            })
        };
        let hasher = hash_on(main, hasher_rx);
        let side = side.zip(side_rx).map(|(h, rx)| hash_on(h, rx));
        let writer = s.spawn(move || -> std::io::Result<()> {
            let mut written = 0u64;
            let mut flushed = 0u64;
            for block in writer_rx {
                (&*staging).write_all(&block)?;
                written += block.len() as u64;
                // After the write: what is counted written is gone from the free space.
                written_so_far.store(written, std::sync::atomic::Ordering::Relaxed);
                if written - flushed >= WRITEBACK_WINDOW {
                    start_writeback(staging, flushed, written - flushed);
                    flushed = written;
                }
                if let Ok(b) = Arc::try_unwrap(block) {
                    let _ = recycle.send(b);
                }
            }
            Ok(())
        });
        let mut size = 0u64;
        let read = (|| -> Result<(), CopyError> {
            // Past the expected size the source is growing: the caller reports it changed
            // (and retries), so neither reading nor staging more of it is of use.
            while size <= len {
                if stopped() {
                    return Err(CopyError::Stopped(shown.to_string()));
                }
                let mut buf = recycled.try_recv().unwrap_or_else(|_| vec![0u8; BLOCK]);
                buf.resize(BLOCK, 0);
                let mut filled = 0usize;
                while filled < BLOCK {
                    let n = file
                        .read_at(&mut buf[filled..], size + filled as u64)
                        .map_err(|e| CopyError::Read(shown.to_string(), e))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    return Ok(());
                }
                buf.truncate(filled);
                size += filled as u64;
                #[cfg(feature = "testing")]
                if size == filled as u64 {
                    crate::testing::local_copy_gate(dest);
                }
                let block = Arc::new(buf);
                // A closed channel means that stage failed; its error is reported below.
                if to_side
                    .as_ref()
                    .is_some_and(|t| t.send(block.clone()).is_err())
                    || to_hasher.send(block.clone()).is_err()
                    || to_writer.send(block).is_err()
                {
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop((to_hasher, to_writer, to_side));
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread panicked")));
        let panicked = |_| {
            CopyError::Read(
                shown.to_string(),
                std::io::Error::other("a hasher thread panicked"),
            )
        };
        let (checksum, mut sha256) = hasher.join().map_err(panicked)?;
        if let Some(side) = side {
            sha256 = Some(side.join().map_err(panicked)?.0);
        }
        read?;
        written.map_err(|e| CopyError::Write(dest.display().to_string(), e))?;
        Ok(Digest {
            size,
            checksum,
            sha256,
        })
    })
}

/// Starts writing `len` bytes at `offset` back to disk without waiting for it (a hint:
/// the fsync at the end is what makes the copy durable).
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A new staging file in `root`'s [`STAGING_DIR`], named uniquely among every process
/// that shares the store (two replicas may write to one directory).
fn staging_file(root: &Path, mode: u32) -> std::io::Result<(File, PathBuf)> {
    let dir = staging_dir(root)?;
    create_dirs_durably(&dir)?;
    loop {
        let p = dir.join(uuid::Uuid::new_v4().simple().to_string());
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
        {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether `dir`, or where it is not there yet its nearest ancestor that is, resolves
/// (links followed) beneath `root` (canonical).
fn resolves_beneath(root: &Path, dir: &Path) -> std::io::Result<bool> {
    let mut d = dir;
    loop {
        match std::fs::canonicalize(d) {
            Ok(real) => return Ok(real.starts_with(root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match d.parent() {
                Some(p) => d = p,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

/// `root`'s staging directory, refused where it is a link: copies would be staged, and
/// sweeps delete old files, wherever it leads.
fn staging_dir(root: &Path) -> std::io::Result<PathBuf> {
    let dir = root.join(STAGING_DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::other(format!(
            "{} is a link: the store's staging directory is never followed out of it (remove \
             the link)",
            dir.display()
        ))),
        _ => Ok(dir),
    }
}

/// Creates `dir` and any missing parents, each new entry fsynced into its parent so
/// the path survives a power loss.
fn create_dirs_durably(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.is_dir() {
        missing.push(d);
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    // Marked before they exist: a copy that finds one must not count on its entry.
    let _creating = crate::dir_sync::creating(&missing);
    std::fs::create_dir_all(dir)?;
    for m in missing.iter().rev() {
        if let Some(p) = m.parent() {
            sync_dir(p)?;
        }
    }
    Ok(())
}

/// Fsyncs the directory holding `path` (in the store at `root`), so its entry survives a
/// power loss, the entries of the directories on its way that another copy is still
/// making, and — the first time this process meets that directory — every entry on its
/// way from `root` (made by a process that died before flushing them). Blocking.
pub fn sync_parent(root: &Path, path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => {
            sync_dir(dir)?;
            crate::dir_sync::flush_created_ancestors(dir)?;
            crate::dir_sync::flush_path_once(root, dir)
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(b: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(b))
    }

    /// Files in the staging directory (none if it was never made).
    fn staged_files(root: &Path) -> usize {
        std::fs::read_dir(root.join(STAGING_DIR)).map_or(0, |d| d.count())
    }

    #[test]
    fn this_filesystem_stages_in_unnamed_files() {
        // The tests below cover both ways; this one says which the services use here.
        assert!(unnamed_files(), "/proc/self/fd is there");
        let dir = tempfile::tempdir().expect("temp");
        let staged = Staged::create(dir.path(), dir.path(), true, 0o644).expect("create");
        assert!(matches!(staged, Staged::Unnamed(_)), "O_TMPFILE works here");
        assert_eq!(staged_files(dir.path()), 0);
    }

    /// A name the store's filesystem refuses where the copy is named (EINVAL, EILSEQ)
    /// is the file's for good: retried, each attempt copied the
    /// whole file again first. Another copy there first is no error; anything else is.
    #[test]
    fn a_name_refused_where_the_copy_is_published_is_permanent() {
        let io = std::io::Error::from_raw_os_error;
        for refused in [libc::EINVAL, libc::EILSEQ] {
            let e = not_published("a/b:c?.mov", io(refused)).expect("classed");
            assert!(e.is_permanent(), "{e}");
            assert!(e.to_string().contains("refuses a name"), "{e}");
        }
        let raced = not_published("k", io(libc::EEXIST)).expect("classed");
        assert!(matches!(raced, CopyError::Exists(_)), "{raced}");
        for other in [libc::EIO, libc::ENOSPC, libc::EACCES] {
            assert!(not_published("k", io(other)).is_err(), "{other}");
        }
    }

    /// A file larger than the store's whole filesystem is refused before a byte is written
    /// (for good: no retry makes it fit); each attempt used to fill the disk until ENOSPC,
    /// an outage retried for a day. The source is sparse: it takes no room of its own.
    #[test]
    fn a_file_larger_than_the_stores_filesystem_is_refused_before_writing() {
        let dir = tempfile::tempdir().expect("temp");
        let fs = rustix::fs::statvfs(dir.path()).expect("statvfs");
        let size = fs.f_blocks * fs.f_frsize + (1 << 30);
        let src = dir.path().join("huge.img");
        let f = File::create(&src).expect("create");
        // A filesystem whose largest file is smaller than itself (ext4 past 16 TiB) cannot
        // hold such a source: nothing to show there.
        if f.set_len(size).is_err() {
            return;
        }
        let f = File::open(&src).expect("open");
        let expected = Expected {
            size,
            digest: None,
            unchanged: None,
            stopped: None,
            read_back: false,
        };
        let e = copy(
            &f,
            dir.path(),
            "huge.img.copy",
            "huge.img",
            Algorithm::Sha256,
            expected,
        )
        .expect_err("no room");
        if !fixed_size(&f) {
            assert!(!matches!(e, CopyError::Unstorable(..)), "{e}");
            println!("a filesystem whose size follows its pool: an outage, as expected");
            return;
        }
        assert!(matches!(e, CopyError::Unstorable(..)), "{e}");
        assert!(
            e.to_string()
                .contains("larger than the store's whole filesystem"),
            "{e}"
        );
        assert!(!dir.path().join("huge.img.copy").exists());
        // One that fits the filesystem but not the room free now is an outage, not refused.
        // Root may fill the blocks reserved for it; any other user may not.
        let reserved = match rustix::process::geteuid().is_root() {
            true => 0,
            false => fs.f_bfree - fs.f_bavail,
        };
        let free = (fs.f_bfree - reserved) * fs.f_frsize;
        if free + (1 << 30) < (fs.f_blocks - reserved) * fs.f_frsize {
            let e = room_for(&f, free + (1 << 30), "k").expect_err("no room now");
            let e = e.expect_err("an outage");
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        }
    }

    /// Copies under way keep the room they will fill: two that each fit alone but not
    /// together are not both begun (together they filled the disk, and both failed).
    #[test]
    fn copies_under_way_keep_their_room() {
        let dir = tempfile::tempdir().expect("temp");
        let f = File::create(dir.path().join("probe")).expect("file");
        let fs = rustix::fs::fstatvfs(&f).expect("statvfs");
        // As `room_for` counts it: root may fill the blocks reserved for it.
        let free = match rustix::process::geteuid().is_root() {
            true => fs.f_bfree,
            false => fs.f_bavail,
        } * fs.f_frsize;
        // What copies may fill: the free space less the headroom kept.
        let Some(room) = free
            .checked_sub(headroom(fs.f_blocks * fs.f_frsize))
            .filter(|r| *r >= 1 << 30)
        else {
            println!("under a GiB free: not applicable");
            return;
        };
        // The free space may move a little meanwhile (other tests write): sizes keep clear
        // of the edges by a tenth of the room.
        let first = room_in(&f, room / 10 * 5, "a", false).expect("room for the first");
        let e = room_in(&f, room / 10 * 7, "b", false).expect_err("not beside the first");
        let e = e.expect_err("an outage");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        // What the first has written is taken off what it has still to write (and is gone
        // from the free space, which this test does not fill).
        first
            .written
            .store(room / 10 * 4, std::sync::atomic::Ordering::Relaxed);
        let second = room_in(&f, room / 10 * 7, "b", false).expect("room beside what is left");
        drop(second);
        drop(first);
        let _second = room_in(&f, room / 10 * 7, "b", false).expect("room once the first is done");
    }

    /// A large copy leaves the records and small copies beside the store room: one that
    /// took the disk's last byte failed its own record, and every other copy.
    #[test]
    fn a_large_copy_leaves_a_headroom_free() {
        let gib: u64 = 1 << 30;
        for (total, kept) in [(gib, 64 << 20), (50 * gib, gib / 2), (4096 * gib, gib)] {
            assert_eq!(headroom(total), kept, "{total}");
            let free = total / 2;
            assert!(fits(free - kept, total, free));
            assert!(!fits(free - kept + 1, total, free), "{total}");
        }
        assert!(!fits(u64::MAX, gib, u64::MAX));
    }

    /// Where the filesystem can, a large copy's room is reserved in it before a byte is
    /// written, beyond the file's end: seen by every process writing there (the other
    /// tier's service on the same disk, a second replica on this host), where a count in
    /// one process let two of them fill the disk together.
    #[test]
    fn a_large_copys_room_is_reserved_in_the_filesystem() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("temp");
        let f = File::create(dir.path().join("staging")).expect("file");
        let size = ROOM_CHECKED_FROM;
        // ext4, XFS, btrfs and tmpfs reserve; ZFS, NFS and most FUSE do not (counted there).
        use db::filesystem::{BTRFS, EXT, TMPFS, XFS};
        let kind = db::filesystem::of_file(&f).expect("statfs");
        if ![EXT, XFS, BTRFS, TMPFS].contains(&kind)
            || space(&f).is_none_or(|(_, free)| free < 2 << 30)
        {
            println!("a filesystem that does not reserve, or under 2 GiB free: not applicable");
            return;
        }
        let room = room_for(&f, size, "k").expect("room");
        let meta = f.metadata().expect("metadata");
        assert_eq!(meta.len(), 0, "the file's size is what is written");
        assert!(
            meta.blocks() * 512 >= size,
            "{} bytes reserved of {size}",
            meta.blocks() * 512
        );
        assert!(room.id.is_none(), "not counted in this process too");
    }

    /// A directory found already in the store — made by a process that died before
    /// flushing its entry into its parent — is flushed into its parent (and so on up to
    /// the store's root) before a copy in it is reported: else a power loss could take
    /// the path, and the object, away from under its record. And a store's root made at
    /// start is flushed into its parents.
    #[test]
    fn directories_found_on_the_way_and_the_stores_root_are_flushed_into_their_parents() {
        use crate::dir_sync::tests::flushed;
        let dir = tempfile::tempdir().expect("temp");
        let root = dir.path().join("new/store");
        crate::store::local(&root).expect("a local store");
        let root = root.canonicalize().expect("made");
        assert!(flushed(&dir.path().canonicalize().expect("temp")), "new");
        assert!(flushed(root.parent().expect("parent")), "store");
        // As a process that died before flushing them left them.
        std::fs::create_dir_all(root.join("left/behind")).expect("left behind");
        let src = dir.path().join("src");
        std::fs::write(&src, b"body").expect("write");
        let expected = Expected {
            size: 4,
            digest: None,
            unchanged: None,
            stopped: None,
            read_back: false,
        };
        let f = File::open(&src).expect("open");
        copy(
            &f,
            &root,
            "left/behind/f",
            "src",
            Algorithm::Sha256,
            expected,
        )
        .expect("copy");
        assert!(flushed(&root.join("left")), "entry `behind`");
        assert!(flushed(&root), "entry `left`");
    }

    #[test]
    fn small_and_pipelined_copies_store_and_hash_exactly_what_was_read() {
        for unnamed in [true, false] {
            copies_store_and_hash_exactly_what_was_read(unnamed);
        }
    }

    fn copies_store_and_hash_exactly_what_was_read(unnamed: bool) {
        let dir = tempfile::tempdir().expect("temp");
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 13 * BLOCK + 12345] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (len as u8)).collect();
            let src = dir.path().join(format!("src-{len}"));
            std::fs::write(&src, &body).expect("write");
            let key = format!("new/dir/{len}/out.bin");
            let dest = dir.path().join(&key);
            let f = File::open(&src).expect("open");
            let expected = Expected {
                size: len as u64,
                digest: None,
                unchanged: None,
                stopped: None,
                // Read back too: a good copy passes its read-back.
                read_back: len % 2 == 1,
            };
            let d = copy_via(
                &f,
                dir.path(),
                &key,
                "src",
                Algorithm::Sha256,
                expected,
                unnamed,
            )
            .expect("copy");
            assert_eq!(d.size, len as u64);
            assert_eq!(d.checksum, sha256(&body), "{len}");
            assert_eq!(std::fs::read(&dest).expect("stored"), body, "{len}");
            let left: Vec<_> = std::fs::read_dir(dest.parent().expect("parent"))
                .expect("list")
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(left, ["out.bin"], "nothing beside the object");
            assert_eq!(staged_files(dir.path()), 0, "no staging file left");
        }
    }

    /// A copy read back (nearline) that the disk did not keep as written — its first byte
    /// changed once fsynced — fails verification and is not published; not read back,
    /// the same copy is taken as written.
    #[test]
    fn a_copy_read_back_other_than_written_is_not_published() {
        for unnamed in [true, false] {
            for (len, read_back) in [(5, true), (3 * BLOCK + 7, true), (5, false)] {
                let dir = tempfile::tempdir().expect("temp");
                let body: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
                let src = dir.path().join("src");
                std::fs::write(&src, &body).expect("write");
                let f = File::open(&src).expect("open");
                let expected = Expected {
                    size: len as u64,
                    digest: None,
                    unchanged: None,
                    stopped: None,
                    read_back,
                };
                CORRUPT_NEXT.with(|c| c.set(true));
                let r = copy_via(
                    &f,
                    dir.path(),
                    "k/out.bin",
                    "src",
                    Algorithm::Md5,
                    expected,
                    unnamed,
                );
                let stored = dir.path().join("k/out.bin");
                if read_back {
                    assert!(
                        matches!(r, Err(CopyError::Mismatch { alg: "md5", .. })),
                        "{len} {unnamed}: {r:?}"
                    );
                    assert!(!stored.exists(), "{len} {unnamed}: not published");
                    assert_eq!(staged_files(dir.path()), 0, "no staging file left");
                } else {
                    r.expect("taken as written");
                    assert!(stored.exists());
                }
            }
        }
    }

    /// A copy read back for longer than the staging sweep gives an untouched file (a
    /// large file on a slow share) is still published: it touches its staging file as it
    /// reads. It was swept mid-read, and every attempt failed to publish.
    #[test]
    fn a_long_read_back_keeps_its_staging_file_from_the_sweep() {
        let dir = tempfile::tempdir().expect("temp");
        let len = 3 * BLOCK + 7;
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let src = dir.path().join("src");
        std::fs::write(&src, &body).expect("write");
        let f = File::open(&src).expect("open");
        let expected = Expected {
            size: len as u64,
            digest: None,
            unchanged: None,
            stopped: None,
            read_back: true,
        };
        SWEEP_DURING_READ_BACK.with(|r| *r.borrow_mut() = Some(dir.path().to_path_buf()));
        let stored = dir.path().join("k/out.bin");
        copy_via(
            &f,
            dir.path(),
            "k/out.bin",
            "src",
            Algorithm::Md5,
            expected,
            false,
        )
        .expect("published");
        assert!(
            SWEEP_DURING_READ_BACK.with(|r| r.borrow().is_none()),
            "the sweep ran"
        );
        assert_eq!(std::fs::read(&stored).expect("stored"), body);
        assert_eq!(staged_files(dir.path()), 0, "no staging file left");
    }

    /// A source that grows while it is copied (here without end) is read a block past
    /// its size, then reported changed: not read until its writer stops.
    #[test]
    fn a_source_growing_without_end_is_not_read_to_its_end() {
        let dir = tempfile::tempdir().expect("temp");
        let endless = File::open("/dev/zero").expect("/dev/zero");
        let expected = Expected {
            size: 3 * BLOCK as u64,
            digest: None,
            unchanged: None,
            stopped: None,
            read_back: false,
        };
        let e = copy_via(
            &endless,
            dir.path(),
            "grown.bin",
            "zero",
            Algorithm::Sha256,
            expected,
            true,
        )
        .expect_err("changed");
        assert!(matches!(e, CopyError::SourceChanged(_)), "{e}");
        assert_eq!(staged_files(dir.path()), 0);
    }

    /// The staging directory's name is reserved in every spelling a case-folding store
    /// takes for it (ASCII case, and Unicode's `ſ`, `ı` and Kelvin sign), never its
    /// look-alikes that fold to something else.
    #[test]
    fn the_staging_directory_is_reserved_in_every_folded_spelling() {
        let dir = tempfile::tempdir().expect("temp");
        let src = dir.path().join("src");
        std::fs::write(&src, b"x").expect("write");
        let root = dir.path().join("store");
        std::fs::create_dir_all(&root).expect("dir");
        let copy_to = |key: &str| {
            let expected = Expected {
                size: 1,
                digest: None,
                unchanged: None,
                stopped: None,
                read_back: false,
            };
            let f = File::open(&src).expect("open");
            copy_via(&f, &root, key, "src", Algorithm::Sha256, expected, false)
        };
        for key in [
            ".storagetier-staging/a.mov",
            ".STORAGETIER-Staging/a.mov",
            ".\u{17f}toragetier-staging/a.mov",
            ".storaget\u{131}er-staging/a.mov",
        ] {
            assert!(
                matches!(copy_to(key), Err(CopyError::Reserved(_))),
                "{key} is reserved"
            );
        }
        copy_to(".storagetier-staging-not/a.mov").expect("another name");
    }

    /// A directory link planted in the store never takes a copy out of it, whichever way
    /// the copy is staged (a named staging file is what NFS and most FUSE stores get),
    /// small or large; nor is a staging directory that is a link staged in or swept.
    #[test]
    fn a_link_in_the_store_never_takes_a_copy_or_a_sweep_out_of_it() {
        for (unnamed, size) in [
            (true, 100usize),
            (false, 100),
            (true, 3 * BLOCK),
            (false, 3 * BLOCK),
        ] {
            let dir = tempfile::tempdir().expect("temp");
            let src = dir.path().join("src");
            std::fs::write(&src, vec![7u8; size]).expect("write");
            let root = dir.path().join("store");
            let elsewhere = dir.path().join("elsewhere");
            std::fs::create_dir_all(&root).expect("dir");
            std::fs::create_dir_all(&elsewhere).expect("dir");
            std::os::unix::fs::symlink("../elsewhere", root.join("out")).expect("link");
            let expected = Expected {
                size: size as u64,
                digest: None,
                unchanged: None,
                stopped: None,
                read_back: false,
            };
            // Its directory there, or to be made there (nothing made through the link).
            for key in ["out/f.mov", "out/sub/f.mov"] {
                let f = File::open(&src).expect("open");
                let e = copy_via(&f, &root, key, "src", Algorithm::Sha256, expected, unnamed)
                    .expect_err("refused");
                assert!(
                    matches!(e, CopyError::Unstorable(_, LEADS_OUT)),
                    "unnamed {unnamed}, {size} bytes, {key}: {e}"
                );
                assert!(
                    std::fs::read_dir(&elsewhere).expect("dir").next().is_none(),
                    "nothing written out of the store: {key}"
                );
                assert_eq!(staged_files(&root), 0);
            }
        }
        let dir = tempfile::tempdir().expect("temp");
        let (root, other) = (dir.path().join("store"), dir.path().join("other"));
        std::fs::create_dir_all(&root).expect("dir");
        std::fs::create_dir_all(&other).expect("dir");
        let old = other.join("0123456789abcdef0123456789abcdef");
        File::create(&old)
            .expect("create")
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .expect("age");
        std::os::unix::fs::symlink(&other, root.join(STAGING_DIR)).expect("link");
        assert!(
            sweep_stale_staging(&root).is_err(),
            "a linked staging directory is not swept"
        );
        assert!(old.exists(), "nothing deleted through the link");
        assert!(staging_file(&root, 0o644).is_err(), "nor staged in");
    }

    /// A copy whose caller is gone (its handler stopped) stops and publishes nothing,
    /// small or large: the message, redelivered at once, is copied by the next handler.
    #[test]
    fn a_stopped_copy_publishes_nothing() {
        for size in [100usize, 3 * BLOCK] {
            let dir = tempfile::tempdir().expect("temp");
            let src = dir.path().join("src");
            std::fs::write(&src, vec![7u8; size]).expect("write");
            let root = dir.path().join("store");
            std::fs::create_dir_all(&root).expect("dir");
            let stop = std::sync::atomic::AtomicBool::new(true);
            let expected = Expected {
                size: size as u64,
                digest: None,
                unchanged: None,
                stopped: Some(&stop),
                read_back: false,
            };
            let f = File::open(&src).expect("open");
            let e = copy_via(&f, &root, "k", "src", Algorithm::Sha256, expected, true)
                .expect_err("stopped");
            assert!(matches!(e, CopyError::Stopped(_)), "{size}: {e}");
            assert!(!root.join("k").exists(), "{size}: nothing published");
            assert_eq!(staged_files(&root), 0);
        }
    }

    #[test]
    fn a_copy_not_published_leaves_no_staging_file() {
        for unnamed in [true, false] {
            not_published_leaves_nothing(unnamed);
        }
    }

    fn not_published_leaves_nothing(unnamed: bool) {
        let dir = tempfile::tempdir().expect("temp");
        let src = dir.path().join("src");
        std::fs::write(&src, vec![7u8; 3 * BLOCK]).expect("write");
        // The destination exists: the copy is not published over it.
        let root = dir.path().join("store");
        std::fs::create_dir_all(&root).expect("dir");
        std::fs::write(root.join("taken"), b"another copy's").expect("write");
        let f = File::open(&src).expect("open");
        let expected = Expected {
            size: 3 * BLOCK as u64,
            digest: None,
            unchanged: None,
            stopped: None,
            read_back: false,
        };
        let e = copy_via(
            &f,
            &root,
            "taken",
            "src",
            Algorithm::Sha256,
            expected,
            unnamed,
        )
        .expect_err("never replaces an object");
        assert!(matches!(e, CopyError::Exists(..)), "{e}");
        assert_eq!(
            std::fs::read(root.join("taken")).expect("kept"),
            b"another copy's"
        );
        // A source that changed since it was opened (or hashed) is not published.
        let e = copy_via(
            &f,
            &root,
            "fresh",
            "src",
            Algorithm::Sha256,
            Expected {
                size: 5,
                digest: None,
                unchanged: None,
                stopped: None,
                read_back: false,
            },
            unnamed,
        )
        .expect_err("changed");
        assert!(matches!(e, CopyError::SourceChanged(..)), "{e}");
        assert!(!root.join("fresh").exists());
        // Rewritten in place, same size, since the copy began: not published either.
        let began = crate::copy::SourceState::of(&f.metadata().expect("stat"));
        let w = OpenOptions::new().write(true).open(&src).expect("open");
        w.write_all_at(b"edited", BLOCK as u64).expect("rewrite");
        w.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
            .expect("touch");
        let e = copy_via(
            &f,
            &root,
            "rewritten",
            "src",
            Algorithm::Sha256,
            Expected {
                size: 3 * BLOCK as u64,
                digest: None,
                unchanged: Some(began),
                stopped: None,
                read_back: false,
            },
            unnamed,
        )
        .expect_err("changed in place");
        assert!(matches!(e, CopyError::SourceChanged(..)), "{e}");
        assert!(!root.join("rewritten").exists());
        assert_eq!(staged_files(&root), 0, "the staging file was removed");
        let left: Vec<_> = std::fs::read_dir(&root)
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != STAGING_DIR)
            .collect();
        assert_eq!(left, ["taken"], "nothing else in the store");
    }

    #[test]
    fn the_staging_directory_is_no_key() {
        let dir = tempfile::tempdir().expect("temp");
        let src = dir.path().join("src");
        std::fs::write(&src, b"x").expect("write");
        let f = File::open(&src).expect("open");
        for key in [
            format!("{STAGING_DIR}/a"),
            format!("{}/a", STAGING_DIR.to_uppercase()),
        ] {
            let e = copy(
                &f,
                dir.path(),
                &key,
                "src",
                Algorithm::Sha256,
                Expected {
                    size: 1,
                    digest: None,
                    unchanged: None,
                    stopped: None,
                    read_back: false,
                },
            )
            .expect_err("reserved");
            assert!(e.is_permanent(), "{key}: {e}");
        }
    }

    #[test]
    fn only_stale_staging_files_are_swept_and_objects_never() {
        let dir = tempfile::tempdir().expect("temp");
        let old = std::time::SystemTime::now() - STALE_STAGING * 2;
        let staging = dir.path().join(STAGING_DIR);
        let objects = dir.path().join("a");
        std::fs::create_dir_all(&staging).expect("dir");
        std::fs::create_dir_all(&objects).expect("dir");
        let (dead1, live, dead2) = (
            "0badc0de0badc0de0badc0de0badc0d1",
            "0badc0de0badc0de0badc0de0badc0d2",
            "0badc0de0badc0de0badc0de0badc0d3",
        );
        for (path, stale) in [
            (staging.join(dead1), true),
            (staging.join(live), false),
            (staging.join(dead2), true),
            // Not a name of this service's staging files: an object published into a
            // directory a case-folding store takes for the staging one.
            (staging.join("x.mov"), true),
            // Objects whose names look like the staging names of earlier versions.
            (objects.join("take#1"), true),
            (objects.join("take#2"), false),
        ] {
            let f = File::create(&path).expect("create");
            if stale {
                f.set_modified(old).expect("age");
            }
        }
        assert_eq!(sweep_stale_staging(dir.path()).expect("sweep"), 2);
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .expect("read")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&staging), [live, "x.mov"]);
        assert_eq!(
            names(&objects),
            ["take#1", "take#2"],
            "objects are never swept"
        );
        let empty = tempfile::tempdir().expect("temp");
        assert_eq!(
            sweep_stale_staging(empty.path()).expect("no staging dir"),
            0
        );
    }

    /// Ages are read on the clock that stamped the staging files (the file server's): a
    /// sweeping replica's clock ahead of it sweeps no live copy, and one behind it still
    /// sweeps what a crash left.
    #[test]
    fn staging_files_are_aged_by_the_clock_that_stamped_them() {
        let dir = tempfile::tempdir().expect("temp");
        let staging = dir.path().join(STAGING_DIR);
        std::fs::create_dir_all(&staging).expect("dir");
        // The server's clock, an hour ahead of this machine's.
        let server_now = std::time::SystemTime::now() + Duration::from_secs(3600);
        let (live, left) = (
            "1ab0c0de0badc0de0badc0de0badc0d1",
            "1ab0c0de0badc0de0badc0de0badc0d2",
        );
        for (name, age) in [(live, 60), (left, 3600)] {
            let f = File::create(staging.join(name)).expect("create");
            f.set_modified(server_now - Duration::from_secs(age))
                .expect("age");
        }
        // This machine's clock says the crash's leftover is from the future: kept.
        assert_eq!(
            sweep_staged_before(&staging, std::time::SystemTime::now()).expect("sweep"),
            0
        );
        // The server's says it is an hour old, and the live one a minute.
        assert_eq!(sweep_staged_before(&staging, server_now).expect("sweep"), 1);
        assert!(staging.join(live).exists());
        assert!(!staging.join(left).exists());
        // The store's clock is read from a file created there and removed; a name planted
        // where such a file goes is never written through, nor swept.
        let planted = staging.join(format!("{CLOCK_FILE}planted"));
        std::fs::write(dir.path().join("precious"), "keep").expect("write");
        std::os::unix::fs::symlink(dir.path().join("precious"), &planted).expect("link");
        let clock = store_clock(&staging).expect("a clock");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("precious")).expect("read"),
            "keep"
        );
        let skew = clock
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_else(|e| e.duration());
        assert!(
            skew < Duration::from_secs(60),
            "a local store's clock is this machine's"
        );
        assert_eq!(
            sweep_staged_before(&staging, clock + Duration::from_secs(3 * 3600)).expect("sweep"),
            1
        );
        assert!(std::fs::symlink_metadata(&planted).is_ok(), "not swept");
        // A clock file left by a process that died as it read the clock goes once stale.
        let left = staging.join(format!("{CLOCK_FILE}1-2"));
        File::create(&left)
            .expect("create")
            .set_modified(clock - STALE_STAGING)
            .expect("age");
        sweep_staged_before(&staging, clock).expect("sweep");
        assert!(!left.exists(), "a stale clock file is swept");
    }
}
