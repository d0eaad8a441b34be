//! Streaming copy into an object store with the checksum computed on the way, and
//! read-back verification. Memory stays bounded by the chunk and part sizes whatever the
//! file size.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{Attributes, ObjectStore, PutMultipartOptions, PutOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::checksum::Algorithm;
use crate::store::Tier;

/// Read size for the source file.
const CHUNK: usize = 1024 * 1024;
/// Parts uploading at once (memory: this many parts plus the one being read).
const PARTS_IN_FLIGHT: usize = 2;
/// S3's most parts in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's largest object (5 TiB).
pub const MAX_OBJECT: u64 = 5 * 1024 * 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

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
    /// Larger than any object the store can hold (S3: 5 TiB); never retried.
    #[error("{0} bytes is larger than the store's largest object (5 TiB)")]
    TooLarge(u64),
}

impl CopyError {
    /// Whether retrying can ever help (only an impossible size cannot).
    pub fn is_permanent(&self) -> bool {
        matches!(self, CopyError::TooLarge(_))
    }
}

/// Digest of a local file, read in large blocks on a blocking thread.
pub async fn hash_file(path: &Path, alg: Algorithm) -> Result<Digest, CopyError> {
    let shown = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| CopyError::Read(shown.clone(), e))?;
    hash_open(&f, &shown, alg).await
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
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
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
            let n = f.read_at(&mut buf, size)?;
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
    .map_err(|e| CopyError::Read(owned.clone(), std::io::Error::other(e)))?
    .map_err(|e: std::io::Error| CopyError::Read(owned, e))
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

/// Streams the open `file` (from its start) to `key`, hashing as it goes. A file smaller
/// than one part goes up in one request; a larger one as a multipart upload with parts
/// sized by [`part_size`], aborted on any error (a failed completion included).
pub async fn upload(
    tier: &Tier,
    key: &ObjectPath,
    file: &std::fs::File,
    shown: &str,
    alg: Algorithm,
    attributes: Attributes,
) -> Result<Digest, CopyError> {
    sweep_stale_staging(tier, key).await;
    let read_err = |e| CopyError::Read(shown.to_string(), e);
    let len = file.metadata().map_err(read_err)?.len();
    let part = part_size(len, tier.min_part, tier.local_dir.is_none())?;
    let mut f = tokio::fs::File::from_std(file.try_clone().map_err(read_err)?);
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(read_err)?;
    let mut h = alg.hasher();
    let mut size = 0u64;
    let attributes = if tier.supports_metadata {
        attributes
    } else {
        Attributes::new()
    };

    let first = read_part(&mut f, part, &mut h, shown).await?;
    size += first.len() as u64;
    if (first.len() as u64) < part {
        // One request: atomic, so a failure leaves nothing to clean up.
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        tier.store.put_opts(key, first.into(), opts).await?;
    } else {
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let mut up = tier.store.put_multipart_opts(key, opts).await?;
        let result: Result<(), CopyError> = async {
            // Spawned, so parts upload while the next one is read.
            let mut in_flight = tokio::task::JoinSet::new();
            let mut parts = 0u64;
            let mut next = first;
            while !next.is_empty() {
                parts += 1;
                if parts > MAX_PARTS {
                    // Only a file that grew past its size at open can get here.
                    return Err(CopyError::SourceChanged(shown.to_string()));
                }
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    join_part(in_flight.join_next().await)?;
                }
                in_flight.spawn(up.put_part(next.into()));
                next = read_part(&mut f, part, &mut h, shown).await?;
                size += next.len() as u64;
            }
            while let Some(r) = in_flight.join_next().await {
                join_part(Some(r))?;
            }
            up.complete().await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // Parts already stored are billed until aborted; a failed abort is left to
            // the bucket's lifecycle rule (docs/storage.md).
            if let Err(a) = up.abort().await {
                tracing::warn!(key = %key, error = %a, "could not abort the failed multipart upload");
            }
            return Err(e);
        }
    }
    if size != len {
        return Err(CopyError::SourceChanged(shown.to_string()));
    }
    Ok(Digest {
        size,
        checksum: h.finish(),
    })
}

/// Reads up to `part` bytes, hashing them.
async fn read_part(
    f: &mut tokio::fs::File,
    part: u64,
    h: &mut crate::checksum::Hasher,
    shown: &str,
) -> Result<Vec<u8>, CopyError> {
    let mut buf = Vec::with_capacity(usize::try_from(part).unwrap_or(usize::MAX).min(64 * CHUNK));
    (&mut *f)
        .take(part)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| CopyError::Read(shown.to_string(), e))?;
    h.update(&buf);
    Ok(buf)
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

/// Deletes an object this attempt wrote and that failed verification.
pub async fn remove(store: &dyn ObjectStore, key: &ObjectPath) -> Result<(), CopyError> {
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
