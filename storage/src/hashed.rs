//! Digests of source files already hashed, kept in memory for the file's next messages
//! (its retries above all): nearline hashes a file whole before it touches the store (to find an earlier
//! copy or an identical object), and a retry — a store outage waited out for hours, or
//! another copy of the same content still being stored — read a large file whole again at
//! every attempt (a 200 GiB render re-read every few minutes, from the share the copy it
//! waits for is reading).
//!
//! A digest is reused only for the same file (device and inode) with the same size,
//! modification time and change time, looked at after the file's tick has passed
//! (`copy::SourceState::settle`): every write after that moves the change time, which no
//! one can set by hand — where the filesystem keeps it ([`keeps_change_time`]; not a FUSE
//! one such as sshfs, which reports the modification time as change time). Only a file
//! quiet for a while when it was hashed is kept: a writer
//! through a shared mapping moves the times only when a page is first written after it
//! was last written back (about every 30 s), so a file written that way within the last
//! minute could still change unseen.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::copy::Digest;

/// Files smaller than this are hashed again: cheaper than remembering them.
const MIN_SIZE: u64 = 1024 * 1024;

/// How many digests are kept (about 300 bytes each): the oldest go first.
const KEPT: usize = 4096;

/// How long a file must have been left alone, when its hash began, to be remembered.
const QUIET: Duration = Duration::from_secs(60);

/// What a content change cannot leave the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    /// The identity `meta` gives.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file had been left alone for `quiet` at `at`.
    fn quiet_at(&self, at: SystemTime, quiet: Duration) -> bool {
        let (Ok(secs), Ok(nanos)) = (u64::try_from(self.ctime.0), u32::try_from(self.ctime.1))
        else {
            return false;
        };
        let changed = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        at.duration_since(changed).is_ok_and(|age| age >= quiet)
    }
}

/// Whether the filesystem holding `file` sets its change time itself at every change
/// ([`db::filesystem::keeps_change_time`]).
fn keeps_change_time(file: &std::fs::File) -> bool {
    db::filesystem::of_file(file).is_some_and(db::filesystem::keeps_change_time)
}

/// The digests of the files one copier hashed, by [`Identity`].
#[derive(Debug)]
pub struct Hashed {
    kept: Mutex<(HashMap<Identity, Digest>, VecDeque<Identity>)>,
    quiet: Duration,
    reused: std::sync::atomic::AtomicU64,
}

impl Default for Hashed {
    fn default() -> Self {
        Self::quiet_for(QUIET)
    }
}

impl Hashed {
    /// Keeps the digests of files left alone for `quiet` before their hash began.
    pub fn quiet_for(quiet: Duration) -> Self {
        Self {
            kept: Mutex::new((HashMap::new(), VecDeque::new())),
            quiet,
            reused: Default::default(),
        }
    }

    /// The digest kept for `id`, if any.
    pub fn get(&self, id: &Identity) -> Option<Digest> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let d = kept.0.get(id).cloned();
        if d.is_some() {
            self.reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        d
    }

    /// Keeps `d`, the digest of `file` (`id`) hashed from `began` on, where it is worth
    /// keeping and its filesystem keeps a real change time (asked on a blocking thread
    /// where the file is `remote`: a share's server may not answer).
    pub async fn keep(
        &self,
        id: Identity,
        d: &Digest,
        began: SystemTime,
        file: &std::fs::File,
        remote: bool,
    ) {
        if !self.worth_keeping(&id, began) {
            return;
        }
        let kept_by_its_filesystem = match (remote, file.try_clone()) {
            (false, _) => keeps_change_time(file),
            (true, Ok(f)) => tokio::task::spawn_blocking(move || keeps_change_time(&f))
                .await
                .unwrap_or(false),
            (true, Err(_)) => false,
        };
        if !kept_by_its_filesystem {
            return;
        }
        self.remember(id, d);
    }

    /// Whether the digest of `id`, hashed from `began` on, is worth keeping: a large file
    /// (a small one is read again quickly) left alone long enough before its hash began.
    fn worth_keeping(&self, id: &Identity, began: SystemTime) -> bool {
        id.size >= MIN_SIZE && id.quiet_at(began, self.quiet)
    }

    /// Forgets `id`'s digest: a copy that reused it failed other than by an outage (its
    /// content not what the digest says, say), and its retry reads the file again.
    pub fn forget(&self, id: &Identity) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *kept;
        if map.remove(id).is_some() {
            order.retain(|o| o != id);
        }
    }

    fn remember(&self, id: Identity, d: &Digest) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *kept;
        if map.insert(id.clone(), d.clone()).is_none() {
            order.push_back(id);
        }
        while order.len() > KEPT {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// How many digests were reused rather than computed again.
    pub fn reused(&self) -> u64 {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest {
            size: MIN_SIZE,
            checksum: "c".into(),
            sha256: None,
        }
    }

    fn id(ino: u64, changed: u64) -> Identity {
        Identity {
            dev: 1,
            ino,
            size: MIN_SIZE,
            mtime: (1, 0),
            ctime: (i64::try_from(changed).unwrap_or(0), 0),
        }
    }

    impl Hashed {
        /// `keep` without the filesystem's say.
        fn keep_at(&self, id: Identity, d: &Digest, began: SystemTime) {
            if self.worth_keeping(&id, began) {
                self.remember(id, d);
            }
        }
    }

    /// The machine's own filesystems keep a change time (the test's temporary files are
    /// on one); a FUSE one is not trusted to.
    #[test]
    fn a_local_filesystem_keeps_its_change_times() {
        // The crate's own sources are on a disk (a temporary file may be on tmpfs).
        let f = std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/src/hashed.rs"))
            .expect("this source");
        assert!(keeps_change_time(&f));
    }

    #[test]
    fn a_digest_forgotten_is_not_reused() {
        let h = Hashed::quiet_for(Duration::ZERO);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        h.keep_at(id(1, 0), &digest(), at);
        h.forget(&id(1, 0));
        assert!(h.get(&id(1, 0)).is_none());
    }

    #[test]
    fn only_files_left_alone_long_enough_are_kept() {
        let h = Hashed::default();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        h.keep_at(id(1, 999), &digest(), at);
        assert!(h.get(&id(1, 999)).is_none(), "changed a second before");
        h.keep_at(id(2, 1000 - 60), &digest(), at);
        assert!(h.get(&id(2, 940)).is_some());
        assert!(h.get(&id(2, 941)).is_none(), "another change time");
        let small = Identity {
            size: MIN_SIZE - 1,
            ..id(3, 0)
        };
        h.keep_at(small.clone(), &digest(), at);
        assert!(h.get(&small).is_none(), "small files are hashed again");
        assert_eq!(h.reused(), 1);
    }

    #[test]
    fn the_oldest_digests_go_first() {
        let h = Hashed::quiet_for(Duration::ZERO);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for ino in 0..=KEPT as u64 {
            h.keep_at(id(ino, 0), &digest(), at);
        }
        assert!(h.get(&id(0, 0)).is_none());
        assert!(h.get(&id(1, 0)).is_some());
        assert!(h.get(&id(KEPT as u64, 0)).is_some());
    }
}
