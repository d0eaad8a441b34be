//! Resolving a message's path inside the configured online roots, refusing escapes.

use std::path::{Component, Path, PathBuf};

/// Why a path cannot be used; all of these are permanent for the message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PathError {
    /// Empty file name, a NUL byte, or a file name with a directory in it.
    #[error("invalid file name `{0}`")]
    InvalidName(String),
    /// The path resolves (after `..` and symlinks) outside every online root.
    #[error("path `{0}` is outside the online roots")]
    OutsideRoots(String),
    /// Nothing there.
    #[error("file `{0}` does not exist")]
    NotFound(String),
    /// There, but not a regular file.
    #[error("`{0}` is not a regular file")]
    NotAFile(String),
    /// Could not be inspected (permissions, I/O).
    #[error("cannot access `{0}`: {1}")]
    Io(String, String),
}

impl PathError {
    /// Permission or I/O problems may pass; the rest never will.
    pub fn is_transient(&self) -> bool {
        matches!(self, PathError::Io(..))
    }
}

/// A file inside a root: its canonical path and its path relative to that root.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Canonical absolute path (symlinks resolved).
    pub path: PathBuf,
    /// Path relative to the root it is in, with `/` separators (the object key).
    pub relative: String,
}

/// Canonical forms of the configured roots (created if missing, so defaults just work).
pub fn canonical_roots(roots: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    roots
        .iter()
        .map(|r| {
            std::fs::create_dir_all(r)?;
            r.canonicalize()
        })
        .collect()
}

/// Resolves `filepath/filename` under `roots` (canonical). Absolute paths must lie in a
/// root; relative ones are taken relative to each root in turn. Nothing outside a root is
/// opened: the check is made on the fully resolved path before any read.
pub fn resolve(roots: &[PathBuf], filepath: &str, filename: &str) -> Result<Resolved, PathError> {
    let shown = format!("{}/{}", filepath.trim_end_matches('/'), filename);
    if filename.is_empty()
        || filename.contains('/')
        || filename == "."
        || filename == ".."
        || filename.contains('\0')
        || filepath.contains('\0')
    {
        return Err(PathError::InvalidName(shown));
    }
    let joined = Path::new(filepath).join(filename);
    let candidates: Vec<PathBuf> = if joined.is_absolute() {
        vec![joined.clone()]
    } else {
        roots.iter().map(|r| r.join(&joined)).collect()
    };
    // Lexical check first: a path that climbs out with `..` is refused even if the
    // target does not exist, so existence outside the roots is never revealed.
    let lexically_inside = candidates.iter().any(|c| {
        let n = normalize(c);
        roots.iter().any(|r| n.starts_with(r))
    });
    if !lexically_inside {
        return Err(PathError::OutsideRoots(shown));
    }
    let mut last_err = PathError::NotFound(shown.clone());
    for c in candidates {
        match c.canonicalize() {
            Ok(real) => {
                let Some(root) = roots.iter().find(|r| real.starts_with(r)) else {
                    return Err(PathError::OutsideRoots(shown));
                };
                let meta = std::fs::metadata(&real)
                    .map_err(|e| PathError::Io(shown.clone(), e.to_string()))?;
                if !meta.is_file() {
                    return Err(PathError::NotAFile(shown));
                }
                let rel = real
                    .strip_prefix(root)
                    .map_err(|_| PathError::OutsideRoots(shown.clone()))?;
                let relative = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                return Ok(Resolved {
                    path: real,
                    relative,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => last_err = PathError::Io(shown.clone(), e.to_string()),
        }
    }
    Err(last_err)
}

/// Removes `.` and resolves `..` lexically (no filesystem access).
fn normalize(p: &Path) -> PathBuf {
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
        let roots = canonical_roots(std::slice::from_ref(&root)).unwrap();

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
        assert!(matches!(
            resolve(&roots, "", "proj"),
            Err(PathError::NotAFile(_))
        ));
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
}
