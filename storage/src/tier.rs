//! The copy-to-tier procedure both storage services run: resolve, deduplicate, stream,
//! verify, record. Services add only their names and success message shape.

use std::path::PathBuf;

use object_store::{Attribute, Attributes};

use crate::checksum::Algorithm;
use crate::copy::{self, CopyError, Digest};
use crate::message::AssetSweeperFile;
use crate::paths::{self, PathError};
use crate::records::{Records, StoredObject};
use crate::store::Tier;

/// How a tier behaves.
#[derive(Debug, Clone, Copy)]
pub struct TierPolicy {
    /// Digest recorded and verified.
    pub algorithm: Algorithm,
    /// Keep original path, size and mtime as object metadata (where the store can).
    pub keep_metadata: bool,
    /// Reuse any stored object with identical content, wherever its key.
    pub reuse_identical: bool,
}

/// The result of a successful copy (or of finding one already made).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    /// The resolved source path.
    pub original_path: String,
    /// Store description.
    pub store: String,
    /// Object key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Digest.
    pub checksum: String,
    /// Digest name.
    pub algorithm: &'static str,
    /// Source mtime (RFC 3339).
    pub mtime: String,
    /// Whether this attempt uploaded (false: an identical copy already existed).
    pub uploaded: bool,
}

/// What the processor should do.
#[derive(Debug)]
pub enum TierOutcome {
    /// Copied or already there.
    Copied(CopyReport),
    /// `ignore: true`: recorded, nothing copied.
    Ignored,
}

/// A failure, classified for the bus.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// Will never work (bad path, missing file).
    #[error("{0}")]
    Permanent(String),
    /// May work later (store, database, I/O).
    #[error("{0}")]
    Transient(String),
}

impl From<PathError> for TierError {
    fn from(e: PathError) -> Self {
        if e.is_transient() {
            TierError::Transient(e.to_string())
        } else {
            TierError::Permanent(e.to_string())
        }
    }
}

impl From<CopyError> for TierError {
    fn from(e: CopyError) -> Self {
        TierError::Transient(e.to_string())
    }
}

impl From<db::sqlx::Error> for TierError {
    fn from(e: db::sqlx::Error) -> Self {
        TierError::Transient(format!("database: {e}"))
    }
}

/// Copies asset-sweeper files from the online roots into one tier.
pub struct TierCopier {
    roots: Vec<PathBuf>,
    tier: Tier,
    records: Records,
    policy: TierPolicy,
}

impl TierCopier {
    /// A copier over canonical `roots`.
    pub fn new(roots: Vec<PathBuf>, tier: Tier, records: Records, policy: TierPolicy) -> Self {
        Self {
            roots,
            tier,
            records,
            policy,
        }
    }

    /// The records (for tests and diagnostics).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Handles one message; failures are recorded with their attempt number.
    pub async fn handle(
        &self,
        msg: &AssetSweeperFile,
        attempt: u32,
    ) -> Result<TierOutcome, TierError> {
        let r = self.copy(msg).await;
        if let Err(e) = &r {
            let permanent = matches!(e, TierError::Permanent(_));
            if let Err(db) = self
                .records
                .record_failure(&msg.joined_path(), &e.to_string(), permanent, attempt)
                .await
            {
                tracing::warn!(error = %db, "could not record the failure");
            }
        }
        r
    }

    async fn copy(&self, msg: &AssetSweeperFile) -> Result<TierOutcome, TierError> {
        if msg.ignore {
            self.records
                .record_ignored(&msg.joined_path(), msg.imported_id.as_deref())
                .await?;
            return Ok(TierOutcome::Ignored);
        }
        let resolved = paths::resolve(&self.roots, &msg.parent_dir, &msg.filename)?;
        let original = resolved.path.display().to_string();
        let meta = tokio::fs::metadata(&resolved.path)
            .await
            .map_err(|e| PathError::Io(original.clone(), e.to_string()))?;
        let size = meta.len();
        let mtime = meta
            .modified()
            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
            .unwrap_or_default();
        let alg = self.policy.algorithm;
        let report = |obj: &StoredObject, uploaded: bool| CopyReport {
            original_path: original.clone(),
            store: self.tier.display.clone(),
            key: obj.object_key.clone(),
            size: obj.size,
            checksum: obj.checksum.clone(),
            algorithm: alg.name(),
            mtime: mtime.clone(),
            uploaded,
        };

        // 1. This very file (same size and mtime) was copied before and the stored object
        //    still reads back with the recorded checksum (a damaged copy is not trusted).
        for obj in self.records.copies_of(&original, size, &mtime).await? {
            let key = crate::store::object_path(&obj.object_key);
            let expected = Digest {
                size: obj.size,
                checksum: obj.checksum.clone(),
            };
            if copy::hash_object(&self.tier, &key, alg).await?.as_ref() == Some(&expected) {
                return Ok(TierOutcome::Copied(report(&obj, false)));
            }
            tracing::warn!(key = %key, "recorded copy is missing or damaged; copying again");
        }

        let natural = self.tier.key(&resolved.relative);
        let natural_size = copy::object_size(&self.tier, &natural).await?;
        let mut source: Option<Digest> = None;

        // 2. Nearline: any identical object already in the vault is reused.
        if self.policy.reuse_identical || natural_size.is_some() {
            let d = copy::hash_file(&resolved.path, alg).await?;
            if self.policy.reuse_identical {
                for obj in self.records.objects_with(&d.checksum, d.size).await? {
                    let key = crate::store::object_path(&obj.object_key);
                    // Read back: a damaged copy must not be trusted.
                    if copy::hash_object(&self.tier, &key, alg).await?.as_ref() == Some(&d) {
                        self.record(&obj, &original, &mtime, msg).await?;
                        return Ok(TierOutcome::Copied(report(&obj, false)));
                    }
                }
            }
            source = Some(d);
        }

        // 3. Choose the key: the natural one, unless it holds other content.
        let mut key = natural.clone();
        if let (Some(existing), Some(d)) = (natural_size, &source) {
            let same = existing == d.size
                && copy::hash_object(&self.tier, &natural, alg).await?.as_ref() == Some(d);
            let obj = StoredObject {
                object_key: natural.to_string(),
                size: d.size,
                checksum: d.checksum.clone(),
            };
            if same {
                self.record(&obj, &original, &mtime, msg).await?;
                return Ok(TierOutcome::Copied(report(&obj, false)));
            }
            // Never overwrite: store beside it under a content-derived key.
            key = crate::store::object_path(&format!(
                "{}.{}",
                natural,
                &d.checksum[..16.min(d.checksum.len())]
            ));
            if let Some(got) = copy::hash_object(&self.tier, &key, alg).await? {
                if &got == d {
                    let obj = StoredObject {
                        object_key: key.to_string(),
                        ..obj
                    };
                    self.record(&obj, &original, &mtime, msg).await?;
                    return Ok(TierOutcome::Copied(report(&obj, false)));
                }
                return Err(TierError::Transient(format!(
                    "both {natural} and {key} hold other content; refusing to overwrite"
                )));
            }
            tracing::warn!(key = %natural, sibling = %key, "different content already stored under this key; storing beside it");
        }

        // 4. Stream, hashing as we go; then read back and compare.
        let mut attrs = Attributes::new();
        if self.policy.keep_metadata {
            attrs.insert(
                Attribute::Metadata("original-path".into()),
                url::form_urlencoded::byte_serialize(original.as_bytes())
                    .collect::<String>()
                    .into(),
            );
            attrs.insert(Attribute::Metadata("size".into()), size.to_string().into());
            attrs.insert(Attribute::Metadata("mtime".into()), mtime.clone().into());
        }
        let written = copy::upload(&self.tier, &key, &resolved.path, alg, attrs).await?;
        if let Some(d) = &source
            && d != &written
        {
            return Err(CopyError::SourceChanged(original.clone()).into());
        }
        copy::verify(&self.tier, &key, alg, &written).await?;
        let obj = StoredObject {
            object_key: key.to_string(),
            size: written.size,
            checksum: written.checksum,
        };
        self.record(&obj, &original, &mtime, msg).await?;
        Ok(TierOutcome::Copied(report(&obj, true)))
    }

    async fn record(
        &self,
        obj: &StoredObject,
        original: &str,
        mtime: &str,
        msg: &AssetSweeperFile,
    ) -> Result<(), TierError> {
        self.records
            .record_copy(
                obj,
                self.policy.algorithm.name(),
                original,
                mtime,
                msg.imported_id.as_deref(),
            )
            .await?;
        Ok(())
    }
}
