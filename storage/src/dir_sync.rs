//! Directory fsyncs shared by concurrent copies into one directory (group commit): a
//! copy's new entry is durable once an fsync of its directory *started after the entry
//! was made* has succeeded, so one fsync serves every copy linked before it began.
//!
//! Sixteen handlers archiving files of one folder all link into one directory; each
//! flushing it on its own queued them on the directory's lock and cost one device cache
//! flush each. Here the first caller flushes, the callers arriving meanwhile wait, and one
//! of them flushes once for all of them when it is done.
//!
//! Errors are never shared: a caller returns `Ok` only after an fsync that covers its entry
//! succeeded; a failed fsync fails its own caller, and the callers it would have covered
//! flush again themselves.
//!
//! New directories: a copy that finds its directory already there cannot tell whether the
//! copy that made it a moment ago has flushed its entry in its parent yet. Directories
//! being made are marked ([`creating`]) until their entries are flushed, and a copy flushes
//! the parents of any marked directory on its path itself ([`flush_created_ancestors`])
//! before it reports success.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};

/// The directories being flushed or waited on, each while it has callers.
static DIRS: LazyLock<Mutex<HashMap<PathBuf, Arc<Dir>>>> = LazyLock::new(Default::default);

/// Directories being made whose entries may not be durable yet, with their makers' count.
static UNFLUSHED: LazyLock<Mutex<HashMap<PathBuf, usize>>> = LazyLock::new(Default::default);

/// Marks directories as being made until dropped (after their entries are flushed).
pub struct Creating(Vec<PathBuf>);

/// Marks `dirs` as being made: call it before making them, drop the guard once each new
/// entry is flushed into its parent.
pub fn creating(dirs: &[&Path]) -> Creating {
    let mut m = lock(&UNFLUSHED);
    for d in dirs {
        *m.entry(d.to_path_buf()).or_default() += 1;
    }
    Creating(dirs.iter().map(|d| d.to_path_buf()).collect())
}

impl Drop for Creating {
    fn drop(&mut self) {
        let mut m = lock(&UNFLUSHED);
        for d in &self.0 {
            if let Some(n) = m.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    m.remove(d);
                }
            }
        }
    }
}

/// Flushes the entry of `dir`, and of each directory above it, that another copy of this
/// process is still making (found there, not made here): once this returns, a power loss
/// keeps the path to `dir`. Blocking.
pub fn flush_created_ancestors(dir: &Path) -> std::io::Result<()> {
    for made in being_made(dir) {
        if let Some(parent) = made.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// `dir` and the directories above it that are marked as being made.
fn being_made(dir: &Path) -> Vec<PathBuf> {
    let m = lock(&UNFLUSHED);
    if m.is_empty() {
        return Vec::new();
    }
    dir.ancestors()
        .filter(|a| m.contains_key(*a))
        .map(Path::to_path_buf)
        .collect()
}

/// One directory's flushes.
#[derive(Default)]
struct Dir {
    state: Mutex<State>,
    flushed: Condvar,
}

#[derive(Default)]
struct State {
    /// Tickets handed out: a caller's entry was made before it took its ticket.
    issued: u64,
    /// Every ticket up to this one is covered by a successful fsync.
    covered: u64,
    /// Whether an fsync is running.
    flushing: bool,
}

/// Fsyncs `dir` so that every entry made in it before this call survives a power loss,
/// sharing the fsync with concurrent callers. Blocking.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    sync_with(dir, |d| {
        #[cfg(test)]
        lock(&tests::FLUSHED).push(d.to_path_buf());
        File::open(d)?.sync_all()
    })
}

/// Directories this process has made sure of: their entries, and those of the
/// directories above them up to their store's root, are flushed. Forgotten all at once
/// when [`KNOWN_DURABLE_MAX`] are held (each is then flushed once more).
static KNOWN_DURABLE: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

/// How many directories [`KNOWN_DURABLE`] holds at most.
const KNOWN_DURABLE_MAX: usize = 65_536;

/// Flushes, the first time this process meets `dir`, the entries of `dir` and of every
/// directory above it up to `root` into their parents: a directory found already there
/// may have been made by a process that died before flushing its entry (or whose flush
/// failed), and a record must not name an object a power loss then takes away with its
/// path. Blocking.
pub fn flush_path_once(root: &Path, dir: &Path) -> std::io::Result<()> {
    if lock(&KNOWN_DURABLE).contains(dir) {
        return Ok(());
    }
    for a in dir
        .ancestors()
        .take_while(|a| *a != root && a.starts_with(root))
    {
        if let Some(parent) = a.parent() {
            sync_dir(parent)?;
        }
    }
    let mut known = lock(&KNOWN_DURABLE);
    if known.len() >= KNOWN_DURABLE_MAX {
        known.clear();
    }
    known.insert(dir.to_path_buf());
    Ok(())
}

/// Flushes the entry of every directory from `dir` up to the filesystem's root into its
/// parent (a store's root made at start, with any parents it needed); a directory that
/// cannot be flushed (one this process may not read) is warned about, not fatal: the
/// store may still be durable, and the copies in it are flushed as they are made.
pub fn flush_all_ancestors(dir: &Path) {
    for a in dir.ancestors() {
        if let Some(parent) = a.parent()
            && let Err(e) = sync_dir(parent)
        {
            tracing::warn!(dir = %parent.display(), error = %e, "could not flush a directory above the store; its entries may not survive a power loss");
        }
    }
}

/// [`sync_dir`] with the flush given (the tests hold one in flight).
fn sync_with(dir: &Path, flush: impl Fn(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let user = User::enter(dir);
    let d = user.dir();
    let mut s = lock(&d.state);
    s.issued += 1;
    let ticket = s.issued;
    loop {
        if s.covered >= ticket {
            return Ok(());
        }
        if !s.flushing {
            s.flushing = true;
            // Every ticket issued so far belongs to an entry made before this flush starts.
            let upto = s.issued;
            drop(s);
            let result = flush(dir);
            s = lock(&d.state);
            s.flushing = false;
            if result.is_ok() {
                s.covered = s.covered.max(upto);
            }
            d.flushed.notify_all();
            return result;
        }
        s = d.flushed.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
}

/// A caller of one directory's flushes; the directory is forgotten when its last caller
/// leaves.
struct User {
    path: PathBuf,
    /// Always `Some` until dropped: taken in `drop` so that the reference is released
    /// under the map's lock.
    dir: Option<Arc<Dir>>,
}

impl User {
    fn enter(path: &Path) -> User {
        let mut dirs = lock(&DIRS);
        let dir = dirs.entry(path.to_path_buf()).or_default().clone();
        User {
            path: path.to_path_buf(),
            dir: Some(dir),
        }
    }

    fn dir(&self) -> &Dir {
        self.dir.as_deref().expect("held until dropped")
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let mut dirs = lock(&DIRS);
        // Callers enter and leave under the map's lock, and this reference is released
        // before the lock is: two callers leaving at once cannot both count the other
        // and leave the directory in the map for ever.
        if let Some(dir) = self.dir.take()
            && Arc::strong_count(&dir) == 2
        {
            dirs.remove(&self.path);
        }
    }
}

/// The counters stay consistent whatever panicked while they were held.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) mod tests {
    /// Every directory flushed by this process's tests, in order (filtered by path in
    /// each test: they run in parallel).
    pub(crate) static FLUSHED: std::sync::Mutex<Vec<std::path::PathBuf>> =
        std::sync::Mutex::new(Vec::new());

    /// Whether `dir` was flushed since the tests began.
    pub(crate) fn flushed(dir: &std::path::Path) -> bool {
        super::lock(&FLUSHED).iter().any(|d| d == dir)
    }

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// Waits until `n` callers hold tickets for `dir`.
    fn until_issued(dir: &Path, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let issued = lock(&DIRS).get(dir).map(|d| lock(&d.state).issued);
            if issued == Some(n) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "callers arrived");
            std::thread::yield_now();
        }
    }

    /// One flush in flight (held until released), four callers arriving meanwhile:
    /// `first` decides whether the held flush fails.
    fn callers_during_a_flush(dir: &Path, first: std::io::Result<()>) -> (usize, Vec<bool>) {
        let flushes = AtomicUsize::new(0);
        let (release, held) = mpsc::channel::<()>();
        let held = Mutex::new(held);
        let first = Mutex::new(Some(first));
        let flush = |_: &Path| {
            let n = flushes.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                let _ = lock(&held).recv();
                return lock(&first).take().expect("the first flush");
            }
            Ok(())
        };
        let results = std::thread::scope(|s| {
            let a = s.spawn(|| sync_with(dir, flush));
            until_issued(dir, 1);
            let later: Vec<_> = (0..4).map(|_| s.spawn(|| sync_with(dir, flush))).collect();
            until_issued(dir, 5);
            release.send(()).expect("release");
            let mut r = vec![a.join().expect("a").is_ok()];
            r.extend(later.into_iter().map(|t| t.join().expect("b").is_ok()));
            r
        });
        assert!(
            lock(&DIRS).get(dir).is_none(),
            "forgotten after its last caller"
        );
        (flushes.load(Ordering::SeqCst), results)
    }

    #[test]
    fn callers_arriving_during_a_flush_share_one_flush_started_after_them() {
        let dir = Path::new("/dir-sync-test/shared");
        let (flushes, ok) = callers_during_a_flush(dir, Ok(()));
        // The flush in flight began before their entries: it cannot cover them. One more
        // covers all four.
        assert_eq!(flushes, 2);
        assert_eq!(ok, [true; 5]);
    }

    #[test]
    fn a_failed_flush_fails_its_caller_only_and_the_others_flush_again() {
        let dir = Path::new("/dir-sync-test/failed");
        let (flushes, ok) = callers_during_a_flush(dir, Err(std::io::Error::other("EIO")));
        assert_eq!(flushes, 2);
        assert_eq!(ok, [false, true, true, true, true]);
    }

    #[test]
    fn callers_leaving_together_leave_nothing_behind() {
        let dir = Path::new("/dir-sync-test/leaving");
        // The window of a race between leaving callers is short: thousands of rounds show it.
        for _ in 0..5000 {
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        start.wait();
                        sync_with(dir, |_| Ok(())).expect("flushed");
                    });
                }
            });
            assert!(
                lock(&DIRS).get(dir).is_none(),
                "forgotten after its last caller"
            );
        }
    }

    #[test]
    fn directories_being_made_are_found_on_the_path_until_flushed() {
        let base = Path::new("/dir-sync-test/made");
        let (a, b) = (base.join("a"), base.join("a/b"));
        let guard = creating(&[&b, &a]);
        assert_eq!(being_made(&b.join("c")), [b.clone(), a.clone()]);
        assert_eq!(being_made(&a), std::slice::from_ref(&a));
        assert!(being_made(&base.join("other")).is_empty());
        // Two makers of one directory: marked until both are done.
        let second = creating(&[&b]);
        drop(guard);
        assert_eq!(being_made(&b), std::slice::from_ref(&b));
        drop(second);
        assert!(being_made(&b).is_empty());
    }

    #[test]
    fn a_lone_caller_flushes_a_real_directory() {
        let tmp = tempfile::tempdir().expect("temp");
        sync_dir(tmp.path()).expect("flushed");
        let e = sync_dir(&tmp.path().join("missing")).expect_err("no such directory");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(lock(&DIRS).get(tmp.path()).is_none());
    }
}
