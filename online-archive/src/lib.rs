//! online-archive: online storage → archive object store (design §7).
//! SHA-256 is the archive's checksum: computed while streaming, verified before the success
//! message goes out (on S3 against the store's own ChecksumSHA256, elsewhere by reading
//! the stored object back; a local store hashes exactly what it writes and fsyncs).

use std::path::PathBuf;

use db::DatabaseUrl;
use serde::{Deserialize, Serialize};
use storage::overlap::TierKeys;
use storage::service::{TierKind, TierService, TierSetup};
use storage::{Algorithm, CopyReport, StoreOptions, TierPolicy};

/// `[online_archive]` keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSettings {
    /// Directories files may be read from (empty = `<data_dir>/online`).
    #[serde(default)]
    pub online_roots: Vec<PathBuf>,
    /// `s3://bucket/prefix` or a directory (unset = `<data_dir>/archive`).
    #[serde(default)]
    pub archive_url: Option<String>,
    /// S3 options for `archive_url`.
    #[serde(default)]
    pub archive_options: StoreOptions,
    /// `postgres://…` or `sqlite://…` (unset = `<data_dir>/online-archive.db`).
    #[serde(default)]
    pub database_url: Option<DatabaseUrl>,
    /// A file holding the PostgreSQL password of `database_url` (a mounted secret).
    #[serde(default)]
    pub database_password_file: Option<PathBuf>,
    /// An S3 multipart upload left by an interrupted copy and not resumed (no part
    /// stored) for this long is aborted, so its parts stop being billed.
    #[serde(default = "storage::service::default_abort_abandoned_uploads_after_ms")]
    pub abort_abandoned_uploads_after_ms: u64,
    /// Failure records (one per failed attempt) older than this many days are deleted
    /// every hour; 0 keeps them all.
    #[serde(default = "storage::service::default_keep_failures_days")]
    pub keep_failures_days: u64,
}

/// What sets online-archive apart from the other tier (see [`TierService`]).
pub struct Archive;

/// The online-archive service.
pub type OnlineArchive = TierService<Archive>;

impl TierKind for Archive {
    const NAME: &'static str = "online-archive";
    const ABOUT: &'static str =
        "copies online media into the archive object store (SHA-256 verified)";
    const OWN: TierKeys = storage::overlap::ARCHIVE;
    const OTHER: TierKeys = storage::overlap::NEARLINE;
    const OUTPUT_ROUTING_KEY: &'static str = "storagetier.onlinearchive.newfile";
    const POLICY: TierPolicy = TierPolicy {
        algorithm: Algorithm::Sha256,
        keep_metadata: false,
        reuse_identical: false,
        skip_ignored: true,
        read_back: false,
    };
    type Settings = ArchiveSettings;

    fn setup(s: &ArchiveSettings) -> TierSetup {
        TierSetup {
            online_roots: s.online_roots.clone(),
            store_url: s.archive_url.clone(),
            store_options: s.archive_options.clone(),
            database_url: s.database_url.clone(),
            database_password_file: s.database_password_file.clone(),
            abort_abandoned_uploads_after: std::time::Duration::from_millis(
                s.abort_abandoned_uploads_after_ms,
            ),
            keep_failures: storage::service::keep_failures(s.keep_failures_days),
        }
    }

    fn success(r: &CopyReport) -> serde_json::Value {
        serde_json::json!({
            "original_file_path": r.original_path,
            "archive_store": r.store,
            "archive_key": r.key,
            "size": r.size,
            "checksum": r.checksum,
            "checksum_algorithm": r.algorithm,
            "imported_id": r.imported_id,
            "archived_at": storage::records::now(),
            "mtime": r.mtime,
            "uploaded": r.uploaded,
        })
    }
}
