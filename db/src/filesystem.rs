//! Filesystems told apart by their `statfs` magic number (`f_type`), with what each lets
//! a database or a store rely on: whether a server stands behind it, whether its size is
//! its own, whether it keeps change times no one can set back. One list, so that a
//! filesystem named in one of these answers is named the same way in the others.

use std::fs::File;
use std::path::Path;

/// ext2, ext3 and ext4.
pub const EXT: u32 = 0xEF53;
/// XFS.
pub const XFS: u32 = 0x5846_5342;
/// Btrfs.
pub const BTRFS: u32 = 0x9123_683E;
/// OpenZFS.
pub const ZFS: u32 = 0x2FC1_2FC1;
/// F2FS.
pub const F2FS: u32 = 0xF2F5_2010;
/// tmpfs.
pub const TMPFS: u32 = 0x0102_1994;
/// overlayfs (a container's root).
pub const OVERLAY: u32 = 0x794C_7630;
/// The kernel's ntfs3.
pub const NTFS3: u32 = 0x7366_746E;
/// NFS, every version.
pub const NFS: u32 = 0x6969;
/// SMB (the old smbfs).
pub const SMB: u32 = 0x517B;
/// CIFS.
pub const CIFS: u32 = 0xFF53_4D42;
/// SMB 2 and 3.
pub const SMB2: u32 = 0xFE53_4D42;
/// FUSE (sshfs, s3fs, rclone mount…).
pub const FUSE: u32 = 0x6573_5546;
/// CephFS.
pub const CEPH: u32 = 0x00C3_6400;
/// 9p.
pub const P9: u32 = 0x0102_1997;
/// AFS.
pub const AFS: u32 = 0x5346_414F;
/// Coda.
pub const CODA: u32 = 0x7375_7245;

/// The magic number of the filesystem holding `path`; None where it cannot be read.
pub fn of_path(path: &Path) -> Option<u32> {
    rustix::fs::statfs(path).ok().map(|st| magic(&st))
}

/// The magic number of the filesystem `file` is on; None where it cannot be read.
pub fn of_file(file: &File) -> Option<u32> {
    rustix::fs::fstatfs(file).ok().map(|st| magic(&st))
}

/// `f_type`'s width and sign differ between platforms; the magic numbers are its low 32 bits.
#[allow(
    clippy::unnecessary_cast,
    clippy::cast_sign_loss,
    clippy::cast_possible_truncation
)]
fn magic(st: &rustix::fs::StatFs) -> u32 {
    st.f_type as u32
}

/// The name of a network (or FUSE) filesystem: one whose server stands behind every call.
pub fn network_name(magic: u32) -> Option<&'static str> {
    Some(match magic {
        NFS => "nfs",
        SMB => "smb",
        CIFS => "cifs",
        SMB2 => "smb2",
        FUSE => "fuse (sshfs, s3fs, …)",
        CEPH => "ceph",
        P9 => "9p",
        AFS => "afs",
        CODA => "coda",
        _ => return None,
    })
}

/// Whether the filesystem's size is its own (ext2/3/4, XFS, F2FS, tmpfs), not one that
/// follows what a pool, a quota or a server has free (ZFS, btrfs with devices added, NFS,
/// SMB, FUSE): a file larger than it never fits.
pub fn has_fixed_size(magic: u32) -> bool {
    matches!(magic, EXT | XFS | F2FS | TMPFS)
}

/// Whether the filesystem sets a file's change time itself at every change, so that no
/// one can set it back: the kernel's own filesystems and the network ones whose server
/// keeps it (NFS, SMB). Not FUSE ones, whose times are whatever the daemon says (sshfs
/// gives the modification time as change time, which `cp -p` sets back), nor tmpfs (with
/// no writeback, a writable shared mapping is never write-protected again, and writes
/// through it change neither time), nor any other not known.
pub fn keeps_change_time(magic: u32) -> bool {
    matches!(
        magic,
        EXT | XFS | BTRFS | ZFS | F2FS | OVERLAY | NFS | CIFS | SMB2 | NTFS3
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local directory's filesystem is read and not taken for a network one; a path that
    /// does not exist has none.
    #[test]
    fn a_local_directory_is_no_network_filesystem() {
        let dir = tempfile::tempdir().expect("dir");
        let magic = of_path(dir.path()).expect("statfs");
        assert_eq!(network_name(magic), None, "{magic:#x}");
        let file = File::create(dir.path().join("f")).expect("file");
        assert_eq!(of_file(&file), Some(magic));
        assert_eq!(of_path(&dir.path().join("missing")), None);
    }

    /// Network filesystems are named; the kernel's local ones are not.
    #[test]
    fn network_filesystems_are_told_by_their_magic_number() {
        assert_eq!(network_name(NFS), Some("nfs"));
        assert_eq!(network_name(CIFS), Some("cifs"));
        for local in [EXT, XFS, BTRFS, ZFS, TMPFS, OVERLAY] {
            assert_eq!(network_name(local), None, "{local:#x}");
        }
    }

    /// ZFS, btrfs (devices added), NFS, SMB and FUSE sizes follow a pool, a quota or a
    /// server: a file larger than them now may fit later.
    #[test]
    fn only_a_filesystem_of_its_own_size_refuses_a_larger_file_for_good() {
        for fixed in [EXT, XFS, F2FS, TMPFS] {
            assert!(has_fixed_size(fixed), "{fixed:#x}");
        }
        for grows in [ZFS, BTRFS, NFS, SMB2, FUSE, OVERLAY] {
            assert!(!has_fixed_size(grows), "{grows:#x}");
        }
    }

    /// Change times a user can set back (FUSE) or that a mapping can leave behind (tmpfs)
    /// are not relied on.
    #[test]
    fn only_change_times_no_one_can_set_back_are_relied_on() {
        for kept in [EXT, XFS, BTRFS, ZFS, NFS, SMB2] {
            assert!(keeps_change_time(kept), "{kept:#x}");
        }
        for not in [FUSE, TMPFS, CEPH, 0] {
            assert!(!keeps_change_time(not), "{not:#x}");
        }
    }
}
