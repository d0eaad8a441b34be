//! Whether opening a source file can block its thread for as long as a server does: on a
//! network or FUSE filesystem (NFS, SMB, sshfs…) whose server stopped answering, `open`
//! and `stat` wait until it answers (for ever on a hard mount). Such files are opened on a
//! blocking thread, so they cannot stall the runtime's own (the broker's heartbeats,
//! health, metrics, claim renewals); files on local disks are opened where they are, which
//! saves a hand-off between threads per file (about 8 % of small-file throughput).
//!
//! Decided from `/proc/self/mountinfo`: the filesystem each root is on and every filesystem
//! mounted below one. Read again at most every [`RECHECK`], so a share mounted on an empty
//! mount point after start-up is seen.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a reading of the mount table is trusted.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Filesystem types served from local disks or memory: they cannot hang on a server.
const LOCAL: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs", "vfat",
    "exfat", "bcachefs", "jfs", "reiserfs", "squashfs", "iso9660", "devtmpfs", "hfsplus", "ntfs3",
    "nilfs2",
];

/// The mount table's verdict for a set of roots, read again after [`RECHECK`].
#[derive(Debug)]
pub struct MountWatch {
    roots: Vec<PathBuf>,
    /// When the table was last read, and whether a root could block then.
    last: Mutex<Option<(Instant, bool)>>,
    /// Every mount point below a root seen in the table since start, with those
    /// `/etc/fstab` lists: where a share belongs even while it is not mounted.
    shares: Mutex<BTreeSet<PathBuf>>,
}

impl MountWatch {
    /// Watches the filesystems of `roots` (canonical paths).
    pub fn new(roots: Vec<PathBuf>) -> Self {
        let fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
        let shares = below(&roots, fstab_points(&fstab));
        let w = Self {
            roots,
            last: Mutex::new(None),
            shares: Mutex::new(shares),
        };
        w.may_block();
        w
    }

    /// The mount point of a share that `path` (canonical) is below and that is not
    /// mounted now: a file missing there is on a share that is away, not gone. Reads the
    /// mount table (only a missing file asks).
    pub fn unmounted_share_above(&self, path: &Path) -> Option<PathBuf> {
        let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mounted = parse(&table);
        self.remember(&mounted);
        let shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        unmounted_above(path, &shares, &mounted)
    }

    /// The share `path` (canonical) is on, as far as its roots tell: the deepest of the
    /// roots and the mount points below them seen since start (or listed in `/etc/fstab`)
    /// that holds it (an empty path where none does). No system call.
    pub fn share_of(&self, path: &Path) -> PathBuf {
        let shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        self.roots
            .iter()
            .chain(shares.iter())
            .filter(|s| path.starts_with(s))
            .max_by_key(|s| s.components().count())
            .unwrap_or(&PathBuf::new())
            .clone()
    }

    /// Takes every root to be on a share that may block (tests of the paths taken then).
    #[cfg(test)]
    pub(crate) fn assume_remote(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), true));
    }

    /// Adds the mount points below a root in `mounted` to those remembered.
    fn remember(&self, mounted: &[(PathBuf, String)]) {
        let seen = below(&self.roots, mounted.iter().map(|(at, _)| at.clone()));
        self.shares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(seen);
    }

    /// Whether a file under the roots may block its thread on a server (see the module
    /// doc); true where the mount table cannot be read.
    pub fn may_block(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, verdict)) = *last
            && at.elapsed() < RECHECK
        {
            return verdict;
        }
        let verdict = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| {
                let mounted = parse(&t);
                self.remember(&mounted);
                roots_may_block(&mounted, &self.roots)
            })
            .unwrap_or(true);
        *last = Some((Instant::now(), verdict));
        verdict
    }
}

/// Whether a local store's directory is on its share. Where the directory is, or is below,
/// a mount point `/etc/fstab` lists or that was mounted since start, and that is not
/// mounted now (a share whose mount failed at boot with `nofail`, or was unmounted), copies
/// would fill the disk beneath, be reported done, and vanish under the share when it
/// mounts again.
#[derive(Debug)]
pub struct StoreMount {
    dir: PathBuf,
    watch: MountWatch,
    /// The directory's device when it was last found on its share (`u64::MAX`: not yet).
    verified_dev: std::sync::atomic::AtomicU64,
}

impl StoreMount {
    /// Watches the local store at `dir` (canonical).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            watch: MountWatch::new(vec![PathBuf::from("/")]),
            verified_dev: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// The mount point of the share the store belongs on, if it is not mounted now. One
    /// `stat` of the directory per call; the mount table is read only where the
    /// directory's device is not the one last found mounted. Blocking.
    pub fn unmounted(&self) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        use std::sync::atomic::Ordering;
        let dev = std::fs::metadata(&self.dir).ok().map(|m| m.dev());
        if dev.is_some() && dev == Some(self.verified_dev.load(Ordering::Relaxed)) {
            return None;
        }
        let share = self.watch.unmounted_share_above(&self.dir);
        if share.is_none()
            && let Some(d) = dev
        {
            self.verified_dev.store(d, Ordering::Relaxed);
        }
        share
    }
}

/// Whether any of `roots` is on, or has below it, a filesystem not known to be local.
fn roots_may_block(mounts: &[(PathBuf, String)], roots: &[PathBuf]) -> bool {
    roots.iter().any(|root| {
        // The mount a root is on: the deepest mount point at or above it.
        let on = mounts
            .iter()
            .filter(|(at, _)| root.starts_with(at))
            .max_by_key(|(at, _)| at.components().count());
        let below = mounts
            .iter()
            .filter(|(at, _)| at != root && at.starts_with(root));
        on.into_iter().chain(below).any(|(_, kind)| !is_local(kind))
    })
}

/// The mount points strictly below one of `roots`.
fn below(roots: &[PathBuf], points: impl IntoIterator<Item = PathBuf>) -> BTreeSet<PathBuf> {
    points
        .into_iter()
        .filter(|at| roots.iter().any(|r| at != r && at.starts_with(r)))
        .collect()
}

/// The deepest of `shares` that `path` is below and that `mounted` does not hold now.
fn unmounted_above(
    path: &Path,
    shares: &BTreeSet<PathBuf>,
    mounted: &[(PathBuf, String)],
) -> Option<PathBuf> {
    shares
        .iter()
        .filter(|s| path.starts_with(s) && !mounted.iter().any(|(at, _)| at == *s))
        .max_by_key(|s| s.components().count())
        .cloned()
}

/// The mount points `/etc/fstab` lists (its second field, with mountinfo's escapes) for
/// mounting at boot: bar comments, swap, `none` and `noauto` entries (removable media,
/// mounts made by hand now and then).
fn fstab_points(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (point, kind) = (*f.get(1)?, f.get(2).copied().unwrap_or(""));
            let opts: Vec<&str> = f.get(3).map(|o| o.split(',').collect()).unwrap_or_default();
            // `noauto` on a share is a share mounted by something else (a cluster manager,
            // an automounter): still where one belongs. Removable media are not.
            let network = kind.split(',').any(is_network)
                || opts
                    .iter()
                    .any(|o| *o == "_netdev" || o.starts_with("x-systemd.automount"));
            let noauto = opts.contains(&"noauto") && !network;
            (point.starts_with('/') && kind != "swap" && !noauto).then_some(point)
        })
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Filesystem types served over a network (fstab's names).
fn is_network(kind: &str) -> bool {
    kind.starts_with("nfs")
        || kind.starts_with("fuse.")
        || [
            "cifs",
            "smb3",
            "smbfs",
            "glusterfs",
            "ceph",
            "9p",
            "lustre",
            "gpfs",
            "beegfs",
        ]
        .contains(&kind)
}

fn is_local(kind: &str) -> bool {
    LOCAL.contains(&kind)
}

/// Mount points and filesystem types of a `mountinfo` text: `id parent dev root point
/// options [optional…] - type source super-options`, with spaces in paths as `\040`.
fn parse(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let kind = fields.get(dash + 1)?;
            Some((PathBuf::from(unescape(point)), (*kind).to_string()))
        })
        .collect()
}

/// A mountinfo path with its octal escapes (`\040` space, `\011` tab, `\012` newline,
/// `\134` backslash) decoded.
fn unescape(s: &str) -> String {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /srv/online rw,relatime shared:5 - ext4 /dev/sdb1 rw
31 30 0:41 / /srv/online/nas\\040share rw,relatime shared:6 - nfs4 nas:/media rw,vers=4.2
32 22 0:42 / /mnt/smb rw,relatime shared:7 - cifs //server/media rw
33 22 0:43 / /tmp rw shared:8 master:2 - tmpfs tmpfs rw";

    fn roots(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn a_root_on_or_above_a_network_filesystem_may_block() {
        let m = parse(TABLE);
        assert_eq!(
            m[2].0,
            PathBuf::from("/srv/online/nas share"),
            "\\040 decoded"
        );
        assert!(!roots_may_block(&m, &roots(&["/tmp/x", "/var/data"])));
        // A share mounted below a root, the root on a share, or inside one.
        assert!(roots_may_block(&m, &roots(&["/srv/online"])));
        assert!(roots_may_block(&m, &roots(&["/mnt/smb"])));
        assert!(roots_may_block(&m, &roots(&["/tmp", "/mnt/smb/projects"])));
        // A sibling of the share is not above it.
        assert!(!roots_may_block(&m, &roots(&["/srv/online-other"])));
        assert!(!roots_may_block(&m, &roots(&["/srv/online/local"])));
    }

    /// A share below a root that was mounted (or that fstab lists) and is not now: a file
    /// missing beneath it is away with its share, not gone.
    #[test]
    fn a_missing_file_below_a_share_that_is_away_is_seen_as_such() {
        let roots = roots(&["/srv/online"]);
        let fstab = "# media\n/dev/sdb1 /srv/online ext4 defaults 0 2\n\
                     nas:/b /srv/online/nas2 nfs4 defaults 0 0\n\
                     /swapfile none swap sw 0 0\n\
                     nas:/c /mnt/elsewhere nfs4 defaults 0 0\n\
                     /dev/sr0 /srv/online/cdrom udf,iso9660 ro,noauto,user 0 0\n\
                     /dev/sdc1 /srv/online/usb auto noauto,user 0 0\n\
                     nas:/d /srv/online/nas3 nfs4 noauto,_netdev 0 0\n";
        let mut shares = below(&roots, fstab_points(fstab));
        assert_eq!(
            shares.iter().collect::<Vec<_>>(),
            vec![
                &PathBuf::from("/srv/online/nas2"),
                &PathBuf::from("/srv/online/nas3")
            ],
            "only those below a root, the root itself and removable media excluded"
        );
        let mounted = parse(TABLE);
        shares.extend(below(&roots, mounted.iter().map(|(at, _)| at.clone())));
        let nas = PathBuf::from("/srv/online/nas share");
        // Both mounted: nothing is away.
        let mut now = mounted.clone();
        now.push((PathBuf::from("/srv/online/nas2"), "nfs4".into()));
        assert_eq!(
            unmounted_above(Path::new("/srv/online/nas2/p/a.mov"), &shares, &now),
            None
        );
        // nas2 not mounted now; "nas share" unmounted since it was seen.
        assert_eq!(
            unmounted_above(Path::new("/srv/online/nas2/p/a.mov"), &shares, &mounted),
            Some(PathBuf::from("/srv/online/nas2"))
        );
        let gone: Vec<_> = mounted
            .iter()
            .filter(|(at, _)| *at != nas)
            .cloned()
            .collect();
        assert_eq!(
            unmounted_above(&nas.join("x.mov"), &shares, &gone),
            Some(nas.clone())
        );
        // A file elsewhere under the root says nothing about a share.
        assert_eq!(
            unmounted_above(Path::new("/srv/online/local/x.mov"), &shares, &gone),
            None
        );
    }

    #[test]
    fn the_running_machines_table_is_read() {
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mounts = parse(&table);
        // A temporary directory gets the verdict of the filesystem it is on, whatever the
        // machine's (ext4 here; fuse-overlayfs or 9p elsewhere).
        let dir = tempfile::tempdir().expect("temp");
        let root = dir.path().canonicalize().expect("canonical");
        let on = mounts
            .iter()
            .filter(|(at, _)| root.starts_with(at))
            .max_by_key(|(at, _)| at.components().count())
            .expect("a mount holds the temporary directory");
        let w = MountWatch::new(vec![root]);
        assert_eq!(w.may_block(), !is_local(&on.1), "{on:?}");
        assert!(
            w.last.lock().expect("lock").is_some(),
            "kept until the recheck"
        );
        // /proc is on no disk this module knows: it counts as one that may block.
        assert!(MountWatch::new(vec![PathBuf::from("/proc")]).may_block());
    }
}
