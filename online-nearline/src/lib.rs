//! online-nearline: online storage → nearline vault (design §7).
//! MD5 is the vault's checksum: computed while streaming and verified by reading the
//! stored object back; original path, size and mtime are kept as object metadata where
//! the store supports it (S3) and always in the database; an identical object already in
//! the vault is reused instead of copying twice.

use std::path::PathBuf;

use db::DatabaseUrl;
use serde::{Deserialize, Serialize};
use storage::overlap::TierKeys;
use storage::service::{TierKind, TierService, TierSetup};
use storage::{Algorithm, CopyReport, StoreOptions, TierPolicy};

/// `[online_nearline]` keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NearlineSettings {
    /// Directories files may be read from (empty = `<data_dir>/online`).
    #[serde(default)]
    pub online_roots: Vec<PathBuf>,
    /// `s3://bucket/prefix` or a directory (unset = `<data_dir>/nearline`).
    #[serde(default)]
    pub vault_url: Option<String>,
    /// S3 options for `vault_url`.
    #[serde(default)]
    pub vault_options: StoreOptions,
    /// `postgres://…` or `sqlite://…` (unset = `<data_dir>/online-nearline.db`).
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

/// What sets online-nearline apart from the other tier (see [`TierService`]).
pub struct Nearline;

/// The online-nearline service.
pub type OnlineNearline = TierService<Nearline>;

impl TierKind for Nearline {
    const NAME: &'static str = "online-nearline";
    const ABOUT: &'static str =
        "copies online media into the nearline vault (MD5 verified, metadata kept)";
    const OWN: TierKeys = storage::overlap::NEARLINE;
    const OTHER: TierKeys = storage::overlap::ARCHIVE;
    const OUTPUT_ROUTING_KEY: &'static str = "storagetier.onlinenearline.newfile";
    const POLICY: TierPolicy = TierPolicy {
        algorithm: Algorithm::Md5,
        keep_metadata: true,
        reuse_identical: true,
        skip_ignored: false,
        read_back: true,
    };
    type Settings = NearlineSettings;

    fn setup(s: &NearlineSettings) -> TierSetup {
        TierSetup {
            online_roots: s.online_roots.clone(),
            store_url: s.vault_url.clone(),
            store_options: s.vault_options.clone(),
            database_url: s.database_url.clone(),
            database_password_file: s.database_password_file.clone(),
            abort_abandoned_uploads_after: std::time::Duration::from_millis(
                s.abort_abandoned_uploads_after_ms,
            ),
            keep_failures: storage::service::keep_failures(s.keep_failures_days),
        }
    }

    fn success(r: &CopyReport) -> serde_json::Value {
        let mut v = serde_json::json!({
            "original_file_path": r.original_path,
            "vault_store": r.store,
            "vault_key": r.key,
            "size": r.size,
            "checksum": r.checksum,
            "checksum_algorithm": r.algorithm,
            "md5": r.checksum,
            "mtime": r.mtime,
            "imported_id": r.imported_id,
            "copied_at": storage::records::now(),
            "uploaded": r.uploaded,
        });
        // The content's collision-resistant digest, for fixity checks downstream (MD5 alone
        // tells no two contents apart); absent where not known.
        if let Some(sha256) = &r.content_sha256 {
            v["sha256"] = sha256.clone().into();
        }
        v
    }
}
