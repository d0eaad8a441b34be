//! Streaming copy into an object store with the checksum computed on the way, and
//! read-back verification. Memory stays bounded by the chunk and part sizes whatever the
//! file size.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{Attributes, ObjectStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::checksum::Algorithm;
use crate::store::Tier;

/// Read size for the source file.
const CHUNK: usize = 1024 * 1024;
/// Multipart part size (S3's minimum is 5 MiB); smaller objects go up in one request.
const PART: usize = 8 * 1024 * 1024;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

/// Size and digest of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Bytes.
    pub size: u64,
    /// Lower-case hex digest.
    pub checksum: String,
}

/// Copy and verification failures; all are worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the source file failed.
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
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
}

/// Digest of a local file, read in large blocks on a blocking thread.
pub async fn hash_file(path: &Path, alg: Algorithm) -> Result<Digest, CopyError> {
    let p = path.to_path_buf();
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut h = alg.hasher();
        // Large blocks for large files; small files get a buffer their size (memory
        // stays bounded with many handlers at once).
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let cap = usize::try_from(len.saturating_add(1))
            .unwrap_or(usize::MAX)
            .min(4 * CHUNK);
        let mut buf = vec![0u8; cap.max(4096)];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        Ok(Digest {
            size,
            checksum: h.finish(),
        })
    })
    .await
    .map_err(|e| CopyError::Read(shown.clone(), std::io::Error::other(e)))?
    .map_err(|e: std::io::Error| CopyError::Read(shown, e))
}

/// Digest of a stored object by reading it back; `None` if there is no such object.
pub async fn hash_object(
    tier: &Tier,
    key: &ObjectPath,
    alg: Algorithm,
) -> Result<Option<Digest>, CopyError> {
    if let Some(dir) = &tier.local_dir {
        let file = dir.join(key.as_ref());
        return match hash_file(&file, alg).await {
            Ok(d) => Ok(Some(d)),
            Err(CopyError::Read(_, e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
    }
    let got = match tier.store.get(key).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut stream = got.into_stream();
    let mut h = alg.hasher();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        h.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok(Some(Digest {
        size,
        checksum: h.finish(),
    }))
}

/// Size of a stored object, or `None` if absent.
pub async fn object_size(tier: &Tier, key: &ObjectPath) -> Result<Option<u64>, CopyError> {
    match tier.store.head(key).await {
        Ok(m) => Ok(Some(m.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A local tier's staging file (`<object>#<n>`: the local store writes an upload there,
/// then renames it into place) untouched for this long belongs to a process that died
/// mid-upload (kill -9, out of memory); a live upload writes a part every few seconds.
pub const STALE_STAGING: Duration = Duration::from_secs(15 * 60);

/// Deletes stale staging files an interrupted upload left beside `key` in a local tier,
/// so a crash mid-copy costs no disk; returns how many. (S3 keeps such parts as incomplete
/// multipart uploads: a bucket lifecycle rule aborts them, see docs/storage.md.)
pub async fn sweep_stale_staging(tier: &Tier, key: &ObjectPath) -> usize {
    let Some(dir) = &tier.local_dir else {
        return 0;
    };
    let dest = dir.join(key.as_ref());
    let mut removed = 0;
    // The store numbers staging files from 0 (copies) and 1 (uploads) upwards.
    for n in 0..1000u32 {
        let mut staged = dest.clone().into_os_string();
        staged.push(format!("#{n}"));
        let staged = std::path::PathBuf::from(staged);
        let age = match tokio::fs::metadata(&staged).await {
            Ok(m) => m.modified().ok().and_then(|t| t.elapsed().ok()),
            Err(_) if n == 0 => continue,
            Err(_) => break,
        };
        if age.is_some_and(|a| a >= STALE_STAGING) && tokio::fs::remove_file(&staged).await.is_ok()
        {
            tracing::warn!(file = %staged.display(), "removed a partial upload left by an interrupted copy");
            removed += 1;
        }
    }
    removed
}

/// Streams `path` to `key`, hashing as it goes; aborts the upload on any error.
pub async fn upload(
    tier: &Tier,
    key: &ObjectPath,
    path: &Path,
    alg: Algorithm,
    attributes: Attributes,
) -> Result<Digest, CopyError> {
    sweep_stale_staging(tier, key).await;
    let shown = path.display().to_string();
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| CopyError::Read(shown.clone(), e))?;
    let mut w = BufWriter::with_capacity(tier.store.clone(), key.clone(), PART)
        .with_max_concurrency(PARTS_IN_FLIGHT);
    if tier.supports_metadata && !attributes.is_empty() {
        w = w.with_attributes(attributes);
    }
    let mut h = alg.hasher();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    let result: Result<(), CopyError> = async {
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| CopyError::Read(shown.clone(), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
            w.write_all(&buf[..n])
                .await
                .map_err(|e| CopyError::Write(key.to_string(), e))?;
        }
        w.shutdown()
            .await
            .map_err(|e| CopyError::Write(key.to_string(), e))
    }
    .await;
    if let Err(e) = result {
        let _ = w.abort().await;
        return Err(e);
    }
    Ok(Digest {
        size,
        checksum: h.finish(),
    })
}

/// Reads `key` back and checks it matches `expected`.
pub async fn verify(
    tier: &Tier,
    key: &ObjectPath,
    alg: Algorithm,
    expected: &Digest,
) -> Result<(), CopyError> {
    let stored = hash_object(tier, key, alg).await?.unwrap_or(Digest {
        size: 0,
        checksum: "missing".into(),
    });
    if &stored != expected {
        return Err(CopyError::Mismatch {
            key: key.to_string(),
            alg: alg.name(),
            stored: stored.checksum,
            stored_size: stored.size,
            expected: expected.checksum.clone(),
            expected_size: expected.size,
        });
    }
    Ok(())
}

/// Deletes an object (used only for objects this copy wrote and failed to verify).
pub async fn remove(store: &dyn ObjectStore, key: &ObjectPath) {
    let _ = store.delete(key).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_stale_staging_files_of_the_key_are_swept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let tier = crate::store::local(dir.path()).expect("local tier");
        let key = tier.key("a/clip.mov");
        let base = dir.path().join("a");
        std::fs::create_dir_all(&base).expect("dir");
        let old = std::time::SystemTime::now() - STALE_STAGING * 2;
        for (name, stale) in [
            ("clip.mov#1", true),
            ("clip.mov#2", false),
            ("clip.mov#3", true),
            ("clip.mov#x", true),
            ("other.mov#1", true),
        ] {
            let f = std::fs::File::create(base.join(name)).expect("create");
            if stale {
                f.set_modified(old).expect("age");
            }
        }
        assert_eq!(sweep_stale_staging(&tier, &key).await, 2);
        let mut left: Vec<String> = std::fs::read_dir(&base)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["clip.mov#2", "clip.mov#x", "other.mov#1"]);
    }
}
