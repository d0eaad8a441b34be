//! Resolving a message's path inside the configured online roots, refusing escapes, and
//! opening the file once, beneath its root, so what is hashed and uploaded is what was
//! checked.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};

/// Why a path cannot be used; all but `Io` are permanent for the message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PathError {
    /// Empty file name, a NUL byte, or a file name with a directory in it.
    #[error("invalid file name `{0}`")]
    InvalidName(String),
    /// A name on the path is longer than the filesystem allows.
    #[error("name or path too long for the filesystem: `{0}`")]
    NameTooLong(String),
    /// Reached through a link, its real path is not UTF-8: no key or record can name it.
    #[error("path `{0}` leads (through a link) to a real path that is not UTF-8: {1}")]
    NotUtf8(String, String),
    /// The path resolves (after `..` and symlinks) outside every online root.
    #[error("path `{0}` is outside the online roots")]
    OutsideRoots(String),
    /// Inside the roots as written, but climbing with `..`: the kernel resolves `..`
    /// after a symlinked directory where the link leads, not where the text says.
    #[error(
        "path `{0}` climbs with `..`: refused (after a symlinked directory `..` leads where \
         the link goes, not where the path reads); send the path without it"
    )]
    ParentDir(String),
    /// Nothing there.
    #[error("file `{0}` does not exist")]
    NotFound(String),
    /// There, but not a regular file.
    #[error("`{0}` is not a regular file")]
    NotAFile(String),
    /// Its symlinks lead round in a loop (or through more links than the system follows).
    #[error("`{0}` leads through a loop of symlinks")]
    LinkLoop(String),
    /// Could not be inspected (permissions, I/O).
    #[error("cannot access `{0}`: {1}")]
    Io(String, String),
    /// Could not be opened for want of descriptors or memory (EMFILE, ENFILE, ENOMEM), or
    /// its share is away (ESTALE, ENOTCONN, ETIMEDOUT… from a soft-mounted NFS or SMB
    /// share, a dead FUSE mount): the process's, the host's or the share's trouble, which
    /// every file meets alike, not this file's — as the same errors met while reading are.
    #[error("cannot access `{0}`: {1}")]
    Unavailable(String, String),
}

impl PathError {
    /// The error of `e` met at `shown`: short of resources or a share away, or another I/O
    /// problem.
    pub(crate) fn io(shown: &str, e: &std::io::Error) -> Self {
        if e.raw_os_error()
            .is_some_and(|n| crate::copy::short_of_resources(n) || crate::copy::share_down(n))
        {
            PathError::Unavailable(shown.to_string(), e.to_string())
        } else {
            PathError::Io(shown.to_string(), e.to_string())
        }
    }

    /// Permission or I/O problems may pass; the rest never will.
    pub fn is_transient(&self) -> bool {
        matches!(self, PathError::Io(..) | PathError::Unavailable(..))
    }

    /// Whether every file would meet it now (out of descriptors or memory, a share away):
    /// an outage to wait out, not a retry counted against this file.
    pub fn is_outage(&self) -> bool {
        matches!(self, PathError::Unavailable(..))
    }
}

/// One online root: as configured (absolute, `.`/`..` removed) and as it really is
/// (symlinks resolved; `/srv/online` → `/mnt/nas`). Message paths may name either form.
#[derive(Debug, Clone, PartialEq)]
pub struct Root {
    /// The configured path, made absolute and lexically normalised.
    pub configured: PathBuf,
    /// Its canonical form.
    pub canonical: PathBuf,
    /// The device it was on at start (`st_dev`): a root gone since, whose nearest
    /// directory still there is on another device, went with the filesystem it was on.
    pub device: u64,
    /// Whether it may be a share's mount point, left empty while the share is not mounted:
    /// a configured root. The default root under `data_dir` is this machine's own
    /// directory, made by the service: empty, it holds no file, and a missing file is
    /// missing (dead-lettered), not an outage retried for a day (gone, it is still taken
    /// for away with its filesystem).
    pub share: bool,
}

/// A file inside a root, opened once beneath it.
#[derive(Debug)]
pub struct Resolved {
    /// Canonical absolute path (symlinks resolved).
    pub path: PathBuf,
    /// Path relative to the root it is in, with `/` separators (the object key).
    pub relative: String,
    /// The file, opened beneath its root without following links out of it: hashing and
    /// uploading read this handle, never the name again.
    pub file: File,
}

/// Why the roots cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A configured root is missing (an unmounted share must not be papered over).
    #[error("online root {0} does not exist")]
    Missing(String),
    /// A root exists but is not a directory.
    #[error("online root {0} is not a directory")]
    NotADirectory(String),
    /// A root cannot be created or inspected.
    #[error("online root {0}: {1}")]
    Io(String, std::io::Error),
}

/// The roots in both their forms. Only the default root may be created (`create`): a
/// configured one that is missing is an error, never silently made.
pub fn open_roots(roots: &[PathBuf], create: bool) -> Result<Vec<Root>, RootError> {
    roots
        .iter()
        .map(|r| {
            let shown = r.display().to_string();
            if create {
                std::fs::create_dir_all(r).map_err(|e| RootError::Io(shown.clone(), e))?;
            }
            let canonical = r.canonicalize().map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    RootError::Missing(shown.clone())
                } else {
                    RootError::Io(shown.clone(), e)
                }
            })?;
            let meta =
                std::fs::metadata(&canonical).map_err(|e| RootError::Io(shown.clone(), e))?;
            if !meta.is_dir() {
                return Err(RootError::NotADirectory(shown));
            }
            let abs = std::path::absolute(r).map_err(|e| RootError::Io(shown, e))?;
            Ok(Root {
                configured: normalize(&abs),
                canonical,
                device: std::os::unix::fs::MetadataExt::dev(&meta),
                share: true,
            })
        })
        .collect()
}

/// Checks configured roots exist (for a service's config validation: exit 2 naming
/// `key`, e.g. `online_archive.online_roots`).
pub fn check_configured_roots(
    key: &str,
    roots: &[PathBuf],
) -> Result<(), framework::config::ConfigError> {
    open_roots(roots, false)
        .map(|_| ())
        .map_err(|e| framework::config::ConfigError::new(key, e.to_string()))
}

/// The paths `filepath/filename` may name under the roots, each under a root's canonical
/// form (a path naming the configured form, through a symlinked root, is rewritten onto
/// the real one), without looking at the filesystem: where [`resolve`] looks, and where
/// the records of a file no longer there are looked for.
pub fn candidates(roots: &[Root], filepath: &str, filename: &str) -> Vec<PathBuf> {
    let joined = Path::new(filepath).join(filename);
    if joined.is_absolute() {
        let n = normalize(&joined);
        roots
            .iter()
            .filter_map(|r| {
                n.strip_prefix(&r.canonical)
                    .or_else(|_| n.strip_prefix(&r.configured))
                    .ok()
                    .map(|rest| r.canonical.join(rest))
            })
            .collect()
    } else {
        roots
            .iter()
            .map(|r| normalize(&r.canonical.join(&joined)))
            .filter(|c| roots.iter().any(|r| c.starts_with(&r.canonical)))
            .collect()
    }
}

/// [`candidates`], and where a candidate's directory is reached through links, the place
/// they lead to (`current/ep.mov` with `current` → `2024`: `2024/ep.mov`), which is what a
/// copy records: a file gone after its copy is found by the directory link it was named
/// through; and where the candidate is itself a link (`ep.mov` → `takes/ep-3.mov`), left
/// dangling once its target was moved away, the place it names. Looks at the filesystem
/// (blocking).
pub fn recorded_candidates(roots: &[Root], filepath: &str, filename: &str) -> Vec<PathBuf> {
    let mut out = candidates(roots, filepath, filename);
    let real_place = |p: &Path| -> Option<PathBuf> {
        let real = std::fs::canonicalize(p.parent()?)
            .ok()?
            .join(p.file_name()?);
        roots
            .iter()
            .any(|r| real.starts_with(&r.canonical))
            .then_some(real)
    };
    let linked: Vec<PathBuf> = out
        .iter()
        .flat_map(|c| {
            let through_dirs = real_place(c).filter(|real| real != c);
            // A link's target is relative to the link's directory (or absolute).
            let target = std::fs::read_link(c)
                .ok()
                .and_then(|t| real_place(&c.parent()?.join(t)));
            through_dirs.into_iter().chain(target)
        })
        .collect();
    for l in linked {
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

/// Resolves `parent_dir/filename` under `roots` and opens it. Absolute paths must lie in
/// a root (either form); relative ones are taken relative to each root in turn. Nothing
/// outside a root is opened: the lexical check comes first, then the resolved path is
/// checked, then the file is opened beneath its root with links out of it refused.
pub fn resolve(roots: &[Root], filepath: &str, filename: &str) -> Result<Resolved, PathError> {
    resolve_unless_linked(roots, filepath, filename, true)
        .map(|r| r.expect("a resolve that may follow links always ends"))
}

/// [`resolve`], but where a link is on the way and `follow` is false, `Ok(None)` before any
/// link is followed: a link's target may be anywhere — a share whose server stopped
/// answering blocks a thread that follows it until it answers — so a caller on a thread
/// that must not block takes that path elsewhere.
pub fn resolve_unless_linked(
    roots: &[Root],
    filepath: &str,
    filename: &str,
    follow: bool,
) -> Result<Option<Resolved>, PathError> {
    // As the message names it: no leading `/` where `filepath` is empty (a relative
    // path, not one under `/`).
    let shown = if filepath.is_empty() {
        filename.to_string()
    } else {
        format!("{}/{}", filepath.trim_end_matches('/'), filename)
    };
    if filename.is_empty()
        || filename.contains('/')
        || filename == "."
        || filename == ".."
        || filename.contains('\0')
        || filepath.contains('\0')
    {
        return Err(PathError::InvalidName(shown));
    }
    let candidates = candidates(roots, filepath, filename);
    // Lexical check first: a path that climbs out with `..` is refused even if the
    // target does not exist, so existence outside the roots is never revealed.
    if candidates.is_empty() {
        return Err(PathError::OutsideRoots(shown));
    }
    // Inside as written: `a/..` read as "here" would copy another file than the kernel
    // names when `a` is a link (`a` → `x/y`: `a/..` is `x`), and record it under this name.
    if Path::new(filepath)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(PathError::ParentDir(shown));
    }
    let mut last_err = PathError::NotFound(shown.clone());
    // What one root holds under the name that is no file to copy (a directory, a FIFO, a
    // link out) does not hide a file a later root holds under it, as a missing one does
    // not: the first root's answer is given only where no root has the file.
    let settle = |r: Result<Resolved, PathError>, last: &mut PathError| match r {
        Err(e @ (PathError::NotAFile(_) | PathError::OutsideRoots(_) | PathError::LinkLoop(_))) => {
            if matches!(last, PathError::NotFound(_)) {
                *last = e;
            }
            None
        }
        r => Some(r.map(Some)),
    };
    for c in candidates {
        // A path with no symlink in it is its own canonical form: opened in one walk that
        // refuses any link, it needs no canonicalize (a readlink per component). A link on
        // the way takes the general path below.
        if let Some(root) = roots.iter().find(|r| c.starts_with(&r.canonical))
            && let Ok(rel) = c.strip_prefix(&root.canonical)
        {
            match open_without_links(&root.canonical, rel) {
                Ok(file) => match settle(opened(c.clone(), root, file, &shown), &mut last_err) {
                    Some(r) => return r,
                    None => continue,
                },
                Err(rustix::io::Errno::NOENT) => continue,
                Err(rustix::io::Errno::NXIO) => {
                    settle(Err(PathError::NotAFile(shown.clone())), &mut last_err);
                    continue;
                }
                Err(_) => {}
            }
        }
        if !follow {
            return Ok(None);
        }
        match c.canonicalize() {
            Ok(real) => {
                let found = match roots.iter().find(|r| real.starts_with(&r.canonical)) {
                    None => Err(PathError::OutsideRoots(shown.clone())),
                    Some(root) => real
                        .strip_prefix(&root.canonical)
                        .map_err(|_| PathError::OutsideRoots(shown.clone()))
                        .and_then(|rel| open_beneath(&root.canonical, rel, &shown))
                        .and_then(|file| opened(real.clone(), root, file, &shown)),
                };
                if let Some(r) = settle(found, &mut last_err) {
                    return r;
                }
            }
            // A directory on the way that is a file: nothing is there.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            // Retrying cannot change these; the message is wrong or the tree is.
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                return Err(PathError::NameTooLong(shown));
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                settle(Err(PathError::LinkLoop(shown.clone())), &mut last_err);
            }
            Err(e) => last_err = PathError::io(&shown, &e),
        }
    }
    Err(last_err)
}

/// Whether `root` may be on a share that is not mounted: an empty directory (the mount
/// point itself), one that cannot be read now (out of descriptors, a share gone stale or
/// not answering), which says nothing about what is in it, or one gone whose nearest
/// directory still there is on another device than the root was at start, or empty — a
/// root below its share's mount point (`/mnt/share/Media`), or under an automounter's
/// directory (`/mnt/auto/share/Media`), is no longer there while the share is away. A
/// root removed from a directory of its own filesystem is gone, not away.
pub fn may_be_unmounted(root: &Root) -> bool {
    let passing = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(
                libc::EMFILE
                    | libc::ENFILE
                    | libc::ESTALE
                    | libc::EIO
                    | libc::ENOTCONN
                    | libc::ENODEV
                    | libc::EHOSTDOWN
                    | libc::EHOSTUNREACH
                    | libc::ETIMEDOUT
            )
        )
    };
    let gone = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR));
    match std::fs::read_dir(&root.canonical) {
        Ok(mut entries) => return root.share && entries.next().is_none(),
        // A root that may not be listed (EACCES) says the file is missing as well as any
        // other.
        Err(e) if !gone(&e) => return passing(&e),
        // Gone, the default root too may have gone with the filesystem it was on (a
        // volume mounted at `data_dir`).
        Err(_) => {}
    }
    for d in root.canonical.ancestors().skip(1) {
        match std::fs::metadata(d) {
            Ok(meta) => {
                let empty = std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none());
                return empty || std::os::unix::fs::MetadataExt::dev(&meta) != root.device;
            }
            Err(e) if gone(&e) => {}
            Err(e) => return passing(&e),
        }
    }
    false
}

/// The resolved file at `real` (beneath `root`), if it is a regular file.
fn opened(real: PathBuf, root: &Root, file: File, shown: &str) -> Result<Resolved, PathError> {
    let meta = file.metadata().map_err(|e| PathError::io(shown, &e))?;
    if !meta.is_file() {
        return Err(PathError::NotAFile(shown.to_string()));
    }
    // A name reached through a link may not be UTF-8 (the message's own is: JSON): read
    // lossily, two such names would share one key, and `original_file_path` would name
    // a file that is not there.
    let relative =
        real.strip_prefix(&root.canonical)
            .map_err(|_| PathError::OutsideRoots(shown.to_string()))?
            .components()
            .map(|c| {
                c.as_os_str().to_str().map(str::to_string).ok_or_else(|| {
                    PathError::NotUtf8(shown.to_string(), real.display().to_string())
                })
            })
            .collect::<Result<Vec<_>, _>>()?
            .join("/");
    Ok(Resolved {
        path: real,
        relative,
        file,
    })
}

/// Opens `rel` beneath `root` if no component of it is a symlink (`ELOOP` if one is;
/// `ENOSYS` before Linux 5.6).
fn open_without_links(root: &Path, rel: &Path) -> rustix::io::Result<File> {
    if rel.as_os_str().is_empty() {
        return Err(rustix::io::Errno::ISDIR);
    }
    let dir = rustix::fs::open(root, root_flags(), rustix::fs::Mode::empty())?;
    openat2_without_links(&dir, rel)
}

/// What a local store holds at a key, the key itself looked at without following it.
#[derive(Debug)]
pub enum AtKey {
    /// A regular file, opened for reading.
    File(File),
    /// Something no copy matches: a directory, a symbolic link at the key, a FIFO… A link
    /// read through would report content held elsewhere — in the source tree, another
    /// tier — as this store's copy.
    Other,
    /// Nothing.
    Nothing,
}

/// What is at `rel` beneath a local store's `root` (canonical). Directory links on the way
/// that stay in the store are followed, as the store's writes follow them (a link leading
/// out of it makes the key [`AtKey::Other`]: the writes refuse it too); the key's own last
/// component is not followed. Only a regular file is opened for reading (see
/// [`path_flags`]: a FIFO's writer or a device's driver is not disturbed).
pub fn at_key(root: &Path, rel: &Path) -> std::io::Result<AtKey> {
    use rustix::io::Errno;
    let at = match rustix::fs::open(root.join(rel), path_flags(), rustix::fs::Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(AtKey::Nothing),
        Err(e) => return Err(e.into()),
    };
    // Where the kernel really found it: beneath the store, or out of it through a link.
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&at));
    if let Ok(real) = std::fs::read_link(&link)
        && !real.starts_with(root)
    {
        return Ok(AtKey::Other);
    }
    match for_reading(at) {
        Ok(f) => Ok(AtKey::File(f)),
        Err(Errno::LOOP | Errno::NXIO) => Ok(AtKey::Other),
        Err(e) => Err(e.into()),
    }
}

/// `rel` opened beneath `dir` following no link at all.
fn openat2_without_links(dir: &impl AsFd, rel: &Path) -> rustix::io::Result<File> {
    use rustix::fs::{Mode, ResolveFlags};
    let open = |flags| {
        rustix::fs::openat2(
            dir.as_fd(),
            rel,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
    };
    match for_reading(open(path_flags())?) {
        // No `/proc` to reopen the handle by: opened for reading directly, as before (the
        // caller refuses what is not a regular file).
        Err(rustix::io::Errno::NOENT) => open(file_flags()).map(File::from),
        r => r,
    }
}

/// How a source is found before it is opened: by its place only (`O_PATH`), which opens
/// nothing. Opening a FIFO or a device for reading has effects of its own — a writer
/// blocked on the FIFO (a capture) goes on and then meets a closed pipe; a device runs
/// its driver's open — so only a regular file is opened for reading.
fn path_flags() -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW
}

/// The regular file `at` (found with [`path_flags`]) opened for reading: that inode, by
/// its `/proc/self/fd` link, not its path again. Anything else: `NXIO` (not a file);
/// `NOENT` where there is no `/proc` to reopen it by.
fn for_reading(at: rustix::fd::OwnedFd) -> rustix::io::Result<File> {
    use rustix::fs::{FileType, Mode};
    let st = rustix::fs::fstat(&at)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        // `O_PATH | O_NOFOLLOW` hands back a last component that is a link instead of
        // refusing it: refused here as an open without `O_PATH` would have.
        FileType::Symlink => return Err(rustix::io::Errno::LOOP),
        _ => return Err(rustix::io::Errno::NXIO),
    }
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&at));
    let reading = rustix::fs::OFlags::RDONLY
        | rustix::fs::OFlags::CLOEXEC
        | rustix::fs::OFlags::NOCTTY
        | rustix::fs::OFlags::NONBLOCK;
    rustix::fs::open(link.as_str(), reading, Mode::empty()).map(File::from)
}

/// How a root is opened to resolve beneath it.
fn root_flags() -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// How a source file is opened. NONBLOCK: a FIFO put in the file's place must not hang
/// the handler (it is then refused as not a regular file); it changes nothing for
/// regular files.
fn file_flags() -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY
}

/// Opens `rel` (a canonical path: no symlink in it) beneath `root`, following no link: a
/// component swapped for a symlink since the path was resolved — leading out of the root
/// or to another file inside it — is not followed; the message is retried and its path
/// resolved afresh.
pub(crate) fn open_beneath(root: &Path, rel: &Path, shown: &str) -> Result<File, PathError> {
    use rustix::fs::Mode;
    let io = |e: std::io::Error| PathError::io(shown, &e);
    // A retry resolves the path afresh: through the link if it stays inside the roots,
    // refused as outside them if not.
    let swapped = || {
        PathError::Io(
            shown.to_string(),
            "a symlink appeared on the path while it was opened".into(),
        )
    };
    let dir = rustix::fs::open(root, root_flags(), Mode::empty()).map_err(|e| io(e.into()))?;
    // The root itself: nothing to resolve beneath it (only a directory, refused below).
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    match openat2_without_links(&dir, rel) {
        Ok(file) => Ok(file),
        Err(rustix::io::Errno::XDEV) => Err(PathError::OutsideRoots(shown.to_string())),
        Err(rustix::io::Errno::LOOP) => Err(swapped()),
        Err(rustix::io::Errno::NOENT) => Err(PathError::NotFound(shown.to_string())),
        // A UNIX socket (or a device node without its device): no file to copy, and no
        // retry makes one.
        Err(rustix::io::Errno::NXIO) => Err(PathError::NotAFile(shown.to_string())),
        // Kernels before 5.6 (or a seccomp filter) lack openat2: open without following
        // the last link, then check the handle is where the path says.
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
            let fd =
                rustix::fs::openat(dir.as_fd(), rel, path_flags(), Mode::empty()).map_err(|e| {
                    match e {
                        rustix::io::Errno::LOOP => swapped(),
                        rustix::io::Errno::NOENT => PathError::NotFound(shown.to_string()),
                        e => io(e.into()),
                    }
                })?;
            let at = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&fd)
            ))
            .map_err(io)?;
            let expected = if rel == Path::new(".") {
                root.to_path_buf()
            } else {
                root.join(rel)
            };
            if at != expected {
                return Err(swapped());
            }
            for_reading(fd).map_err(|e| match e {
                rustix::io::Errno::LOOP => swapped(),
                rustix::io::Errno::NXIO => PathError::NotAFile(shown.to_string()),
                e => io(e.into()),
            })
        }
        Err(e) => Err(io(e.into())),
    }
}

/// Removes `.` and resolves `..` lexically (no filesystem access).
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share away (a soft mount's ESTALE, ENOTCONN, ETIMEDOUT…) or a process short of
    /// descriptors or memory while a file is opened is an outage, as the same errors while
    /// reading it are: before, a share away at the open was a counted retry, and a backlog
    /// went to the dead-letter queue as "retries exhausted" while the share was away.
    #[test]
    fn a_share_away_or_resources_short_at_the_open_is_an_outage() {
        let met = |n: i32| PathError::io("f", &std::io::Error::from_raw_os_error(n));
        for n in [
            libc::ESTALE,
            libc::ENOTCONN,
            libc::ETIMEDOUT,
            libc::EHOSTDOWN,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
        ] {
            let e = met(n);
            assert!(e.is_outage() && e.is_transient(), "{e}");
        }
        for n in [libc::EACCES, libc::EIO] {
            let e = met(n);
            assert!(!e.is_outage() && e.is_transient(), "{e}");
        }
    }

    /// A link's target may be on a share that stops answering: a resolve that must not
    /// block stops at the first link, before following it (a link into a dead mount held a
    /// runtime thread in an unkillable wait), and a path without links resolves at once.
    #[test]
    fn a_resolve_that_may_not_follow_links_stops_at_one() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        std::fs::create_dir_all(root.join("proj")).unwrap();
        std::fs::write(root.join("proj/a.mov"), b"x").unwrap();
        // Targets that following would have reported on: missing, outside, inside.
        std::os::unix::fs::symlink("/nonexistent/mount/x.mov", root.join("proj/gone.mov")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("a.mov", root.join("proj/in.mov")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        let at_once = |dir: &str, name: &str| resolve_unless_linked(&roots, dir, name, false);
        assert_eq!(
            at_once("proj", "a.mov").unwrap().map(|r| r.relative),
            Some("proj/a.mov".to_string())
        );
        assert!(matches!(
            at_once("proj", "missing"),
            Err(PathError::NotFound(_))
        ));
        for (dir, name) in [("proj", "gone.mov"), ("etc", "passwd"), ("proj", "in.mov")] {
            assert!(matches!(at_once(dir, name), Ok(None)), "{dir}/{name}");
        }
        // Followed (on a thread that may block), each gets its answer.
        assert!(matches!(
            resolve(&roots, "proj", "gone.mov"),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(
            resolve(&roots, "etc", "passwd"),
            Err(PathError::OutsideRoots(_))
        ));
        assert_eq!(
            resolve(&roots, "proj", "in.mov").unwrap().relative,
            "proj/a.mov"
        );
    }

    /// With several roots, a relative name that is no file in one root (a directory, a
    /// FIFO, a link out) does not hide the file a later root holds under it — it was
    /// dead-lettered as "not a regular file" — and where no root has one, that is said.
    #[test]
    fn a_name_that_is_no_file_in_one_root_does_not_hide_the_next_roots_file() {
        let base = tempfile::tempdir().unwrap();
        let (a, b) = (base.path().join("a"), base.path().join("b"));
        std::fs::create_dir_all(a.join("proj/dir.mov")).unwrap();
        std::fs::create_dir_all(a.join("proj")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", a.join("proj/out.mov")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            a.join("proj/fifo.mov"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::create_dir_all(b.join("proj")).unwrap();
        for name in ["dir.mov", "out.mov", "fifo.mov"] {
            std::fs::write(b.join("proj").join(name), b"x").unwrap();
        }
        let roots = open_roots(&[a.clone(), b.clone()], false).unwrap();
        for name in ["dir.mov", "out.mov", "fifo.mov"] {
            let r = resolve(&roots, "proj", name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                r.path.starts_with(roots[1].canonical.as_path()),
                "{name}: {:?}",
                r.path
            );
        }
        let only_a = open_roots(std::slice::from_ref(&a), false).unwrap();
        assert!(matches!(
            resolve(&only_a, "proj", "dir.mov"),
            Err(PathError::NotAFile(_))
        ));
        assert!(matches!(
            resolve(&only_a, "proj", "fifo.mov"),
            Err(PathError::NotAFile(_))
        ));
        assert!(matches!(
            resolve(&only_a, "proj", "out.mov"),
            Err(PathError::OutsideRoots(_))
        ));
    }

    #[test]
    fn resolves_inside_and_refuses_escapes() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        let outside = base.path().join("secret");
        std::fs::create_dir_all(root.join("proj")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("proj/a.mov"), b"x").unwrap();
        std::fs::write(outside.join("s.txt"), b"s").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("proj/link")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();

        let r = resolve(&roots, root.join("proj").to_str().unwrap(), "a.mov").unwrap();
        assert_eq!(r.relative, "proj/a.mov");
        let r = resolve(&roots, "proj", "a.mov").unwrap();
        assert_eq!(r.relative, "proj/a.mov");

        let up = format!("{}/proj/../../secret", root.display());
        assert!(matches!(
            resolve(&roots, &up, "s.txt"),
            Err(PathError::OutsideRoots(_))
        ));
        assert!(matches!(
            resolve(&roots, "../secret", "s.txt"),
            Err(PathError::OutsideRoots(_))
        ));
        assert!(matches!(
            resolve(&roots, outside.to_str().unwrap(), "s.txt"),
            Err(PathError::OutsideRoots(_))
        ));
        assert!(matches!(
            resolve(&roots, "proj/link", "s.txt"),
            Err(PathError::OutsideRoots(_))
        ));
        assert!(matches!(
            resolve(&roots, "proj", "missing"),
            Err(PathError::NotFound(_))
        ));
        // Named as the message names it: relative, not `/proj`.
        match resolve(&roots, "", "proj") {
            Err(PathError::NotAFile(shown)) => assert_eq!(shown, "proj"),
            other => panic!("{other:?}"),
        }
        for bad in ["", "..", "a/b", "x\0y"] {
            assert!(matches!(
                resolve(&roots, "proj", bad),
                Err(PathError::InvalidName(_))
            ));
        }
        // Nonexistent paths outside are refused as outside, revealing nothing.
        assert!(matches!(
            resolve(&roots, "/etc", "nope"),
            Err(PathError::OutsideRoots(_))
        ));
    }

    /// A FIFO must not hang the handler (opened without blocking) and a UNIX socket
    /// cannot be opened at all (ENXIO): both are refused at once as not files, not
    /// retried.
    #[test]
    fn fifos_and_sockets_are_refused_at_once() {
        use rustix::fs::{FileType, Mode};
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        std::fs::create_dir_all(&root).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("pipe"),
            FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        // A writer waiting for a reader (a capture writing into the FIFO): it must go on
        // waiting, not be let through to a pipe that is then closed under it.
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let fifo = root.join("pipe");
        let writer = std::thread::spawn(move || {
            // SAFETY: a plain system call.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let w = std::fs::OpenOptions::new().write(true).open(&fifo);
            let _ = opened_tx.send(());
            w
        });
        // Waiting in its open for a reader, for sure, before the look.
        let tid = tid_rx.recv().unwrap();
        let in_open = format!("{} ", libc::SYS_openat);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
            .is_ok_and(|s| s.starts_with(&in_open))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer waits in open"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for name in ["pipe", "sock"] {
            let e = resolve(&roots, "", name).expect_err(name);
            assert!(matches!(e, PathError::NotAFile(_)), "{name}: {e:?}");
            assert!(!e.is_transient(), "{name}");
        }
        assert!(
            opened_rx
                .recv_timeout(std::time::Duration::from_millis(500))
                .is_err(),
            "the FIFO's writer was let through by the look at it"
        );
        // Ours now: the writer goes on and ends.
        let _reader = std::fs::File::open(root.join("pipe")).unwrap();
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn a_link_inside_the_root_resolves_to_the_real_path() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        std::fs::create_dir_all(root.join("proj/cuts")).unwrap();
        std::fs::write(root.join("proj/cuts/a.mov"), b"x").unwrap();
        // Relative: a link an open beneath the root would follow without leaving it.
        std::os::unix::fs::symlink("proj", root.join("alias")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        // The key is the file's real place, whichever way the message names it.
        for dir in ["alias/cuts", "proj/cuts"] {
            let r = resolve(&roots, dir, "a.mov").unwrap();
            assert_eq!(r.relative, "proj/cuts/a.mov", "{dir}");
            assert_eq!(r.path, roots[0].canonical.join("proj/cuts/a.mov"));
        }
        // A missing file under the link is missing, not outside.
        assert!(matches!(
            resolve(&roots, "alias/cuts", "b.mov"),
            Err(PathError::NotFound(_))
        ));
    }

    #[test]
    fn paths_no_retry_can_mend_are_permanent() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        std::fs::create_dir_all(root.join("proj")).unwrap();
        std::fs::write(root.join("proj/a.mov"), b"x").unwrap();
        std::os::unix::fs::symlink("loop2", root.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", root.join("loop2")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        let long = "n".repeat(300);
        for (dir, name, want) in [
            // A file where the message says a directory is.
            (
                "proj/a.mov",
                "x",
                PathError::NotFound("proj/a.mov/x".into()),
            ),
            (
                "proj",
                &*long,
                PathError::NameTooLong(format!("proj/{long}")),
            ),
            ("loop1", "x", PathError::LinkLoop("loop1/x".into())),
        ] {
            let e = resolve(&roots, dir, name).unwrap_err();
            assert_eq!(e, want);
            assert!(!e.is_transient(), "{e}");
        }
    }

    /// A link whose target's name is not UTF-8 (the message, JSON, names only the link):
    /// refused as a name no key and no report can carry, not read lossily (two such
    /// targets shared one key of U+FFFD).
    #[test]
    fn a_link_to_a_name_that_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        let odd = root.join(std::ffi::OsStr::from_bytes(b"\xff"));
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::write(odd.join("x.mov"), b"x").unwrap();
        std::os::unix::fs::symlink(&odd, root.join("a")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        match resolve(&roots, "a", "x.mov") {
            Err(e @ PathError::NotUtf8(..)) => assert!(e.to_string().contains("not UTF-8"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_root_that_is_a_symlink_takes_paths_in_either_form() {
        let base = tempfile::tempdir().unwrap();
        let nas = base.path().join("mnt/nas");
        std::fs::create_dir_all(nas.join("show")).unwrap();
        std::fs::write(nas.join("show/ep1.mov"), b"ep1").unwrap();
        let link = base.path().join("online");
        std::os::unix::fs::symlink(&nas, &link).unwrap();
        let roots = open_roots(std::slice::from_ref(&link), false).unwrap();
        for dir in [link.join("show"), nas.join("show")] {
            let r = resolve(&roots, dir.to_str().unwrap(), "ep1.mov").unwrap();
            assert_eq!(r.relative, "show/ep1.mov");
            assert_eq!(r.path, nas.canonicalize().unwrap().join("show/ep1.mov"));
        }
        assert_eq!(
            resolve(&roots, "show", "ep1.mov").unwrap().relative,
            "show/ep1.mov"
        );
        let up = format!("{}/show/../..", link.display());
        assert!(matches!(
            resolve(&roots, &up, "etc"),
            Err(PathError::OutsideRoots(_))
        ));
    }

    /// `a/..` with `a` a link to `x/y` is `x` to the kernel, the root to a lexical
    /// reading: refused rather than copying the root's `b` under the message's name.
    #[test]
    fn a_path_climbing_with_dotdot_inside_the_roots_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        std::fs::create_dir_all(root.join("x/y")).unwrap();
        std::fs::write(root.join("b"), b"root's b").unwrap();
        std::fs::write(root.join("x/b"), b"x's b").unwrap();
        std::os::unix::fs::symlink(root.join("x/y"), root.join("a")).unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        for dir in ["a/..", &format!("{}/a/..", root.display()), "x/../x"] {
            assert!(
                matches!(resolve(&roots, dir, "b"), Err(PathError::ParentDir(_))),
                "{dir}"
            );
        }
        assert!(!PathError::ParentDir(String::new()).is_transient());
    }

    #[test]
    fn the_file_is_opened_once_beneath_its_root() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("online");
        let outside = base.path().join("secret");
        std::fs::create_dir_all(root.join("proj")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("proj/a.mov"), b"inside").unwrap();
        std::fs::write(outside.join("a.mov"), b"secret").unwrap();
        let roots = open_roots(std::slice::from_ref(&root), false).unwrap();
        let r = resolve(&roots, "proj", "a.mov").unwrap();
        // The directory is swapped for a link out of the root after the check: the
        // handle still reads what was checked, and opening by name now refuses.
        std::fs::rename(root.join("proj"), root.join("old")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("proj")).unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut &r.file, &mut got).unwrap();
        assert_eq!(got, "inside");
        let real = &roots[0].canonical;
        // Not followed; retried, the path resolves afresh (then outside the roots).
        let refused = |rel: &str| match open_beneath(real, Path::new(rel), rel) {
            Err(e @ PathError::Io(..)) => assert!(e.is_transient(), "{rel}"),
            other => panic!("{rel}: {other:?}"),
        };
        refused("proj/a.mov");
        // A directory swapped for a link to another directory inside the root: the other
        // directory's file of the same name is not opened as this one.
        std::fs::remove_file(root.join("proj")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        std::fs::write(root.join("other/a.mov"), b"another file").unwrap();
        std::os::unix::fs::symlink(root.join("other"), root.join("proj")).unwrap();
        refused("proj/a.mov");
        // The file itself replaced by a link (even one inside the root) is refused too.
        std::fs::remove_file(root.join("proj")).unwrap();
        std::fs::rename(root.join("old"), root.join("proj")).unwrap();
        std::fs::rename(root.join("proj/a.mov"), root.join("proj/b.mov")).unwrap();
        std::os::unix::fs::symlink(root.join("proj/b.mov"), root.join("proj/a.mov")).unwrap();
        refused("proj/a.mov");
        assert!(open_beneath(real, Path::new("proj/b.mov"), "proj/b.mov").is_ok());
    }

    #[test]
    fn only_the_default_root_is_created() {
        let base = tempfile::tempdir().unwrap();
        let missing = base.path().join("unmounted/share");
        assert!(matches!(
            open_roots(std::slice::from_ref(&missing), false),
            Err(RootError::Missing(_))
        ));
        assert!(!missing.exists(), "a configured root is never created");
        let e = check_configured_roots(
            "online_archive.online_roots",
            std::slice::from_ref(&missing),
        )
        .unwrap_err();
        assert_eq!(e.key, "online_archive.online_roots");
        open_roots(std::slice::from_ref(&missing), true).unwrap();
        assert!(missing.is_dir(), "the default root is");
    }
}
