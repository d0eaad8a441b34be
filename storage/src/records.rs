//! The tier's records: stored objects, copied files, ignored files and failures.
//! Single upserts keyed by unique constraints, so repeated or concurrent messages never
//! create duplicates.

use db::{AnyPool, Row};

/// Embedded migrations shared by both storage tiers.
pub static MIGRATOR: db::Migrator = db::sqlx::migrate!("./migrations");

/// Database access for one tier.
#[derive(Clone, Debug)]
pub struct Records {
    pool: AnyPool,
}

/// A stored object as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// Key in the store.
    pub object_key: String,
    /// Verified size.
    pub size: u64,
    /// Verified digest.
    pub checksum: String,
}

/// Now, RFC 3339 UTC with milliseconds (the format of every recorded time).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Records {
    /// Connects and migrates.
    pub async fn open(url: &str) -> Result<Self, db::DbError> {
        Ok(Self {
            pool: db::connect(url, &MIGRATOR).await?,
        })
    }

    /// The pool (tests and operators' queries).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Objects already holding `original_path` at this size and mtime.
    pub async fn copies_of(
        &self,
        original_path: &str,
        size: u64,
        mtime: &str,
    ) -> Result<Vec<StoredObject>, db::sqlx::Error> {
        let rows = db::sqlx::query(
            "SELECT o.object_key, o.size, o.checksum FROM copied_files f \
             JOIN stored_objects o ON o.object_key = f.object_key \
             WHERE f.original_path = $1 AND f.size = $2 AND f.mtime = $3",
        )
        .bind(original_path)
        .bind(size as i64)
        .bind(mtime)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored_object).collect()
    }

    /// Objects with this content.
    pub async fn objects_with(
        &self,
        checksum: &str,
        size: u64,
    ) -> Result<Vec<StoredObject>, db::sqlx::Error> {
        let rows = db::sqlx::query(
            "SELECT object_key, size, checksum FROM stored_objects WHERE checksum = $1 AND size = $2",
        )
        .bind(checksum)
        .bind(size as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored_object).collect()
    }

    /// Records a verified object and the file it holds.
    pub async fn record_copy(
        &self,
        object: &StoredObject,
        algorithm: &str,
        original_path: &str,
        mtime: &str,
        imported_id: Option<&str>,
    ) -> Result<(), db::sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        db::sqlx::query(
            "INSERT INTO stored_objects (object_key, size, algorithm, checksum, stored_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (object_key) DO UPDATE SET size = excluded.size, \
             algorithm = excluded.algorithm, checksum = excluded.checksum",
        )
        .bind(&object.object_key)
        .bind(object.size as i64)
        .bind(algorithm)
        .bind(&object.checksum)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        db::sqlx::query(
            "INSERT INTO copied_files (original_path, object_key, size, mtime, imported_id, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (original_path, object_key) DO UPDATE SET size = excluded.size, \
             mtime = excluded.mtime, imported_id = excluded.imported_id, recorded_at = excluded.recorded_at",
        )
        .bind(original_path)
        .bind(&object.object_key)
        .bind(object.size as i64)
        .bind(mtime)
        .bind(imported_id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Records an ignored file (idempotent).
    pub async fn record_ignored(
        &self,
        original_path: &str,
        imported_id: Option<&str>,
    ) -> Result<(), db::sqlx::Error> {
        db::sqlx::query(
            "INSERT INTO ignored_files (original_path, imported_id, recorded_at) VALUES ($1, $2, $3) \
             ON CONFLICT (original_path) DO UPDATE SET imported_id = excluded.imported_id, \
             recorded_at = excluded.recorded_at",
        )
        .bind(original_path)
        .bind(imported_id)
        .bind(now())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Records one failed attempt.
    pub async fn record_failure(
        &self,
        original_path: &str,
        error: &str,
        permanent: bool,
        attempt: u32,
    ) -> Result<(), db::sqlx::Error> {
        db::sqlx::query(
            "INSERT INTO failures (id, original_path, error, permanent, attempt, failed_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(uuid_v4())
        .bind(original_path)
        .bind(error)
        .bind(i64::from(permanent))
        .bind(i64::from(attempt))
        .bind(now())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Takes (or renews) the upload claim on `key` for `owner` until `lease` from now;
    /// false when another owner holds an unexpired claim.
    pub async fn claim(
        &self,
        key: &str,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<bool, db::sqlx::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let r = db::sqlx::query(
            "INSERT INTO upload_claims (object_key, owner, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (object_key) DO UPDATE SET owner = excluded.owner, \
             expires_at = excluded.expires_at \
             WHERE upload_claims.owner = excluded.owner OR upload_claims.expires_at < $4",
        )
        .bind(key)
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives up `owner`'s claim on `key` (nothing if it expired and was taken since).
    pub async fn release(&self, key: &str, owner: &str) -> Result<(), db::sqlx::Error> {
        db::sqlx::query("DELETE FROM upload_claims WHERE object_key = $1 AND owner = $2")
            .bind(key)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Counts rows of a table (tests and diagnostics); `table` must be one of ours.
    pub async fn count(&self, table: &str) -> Result<i64, db::sqlx::Error> {
        let t = match table {
            "stored_objects" | "copied_files" | "ignored_files" | "failures" => table,
            _ => return Err(db::sqlx::Error::Protocol(format!("unknown table {table}"))),
        };
        let row = db::sqlx::query(&format!("SELECT COUNT(*) AS n FROM {t}"))
            .fetch_one(&self.pool)
            .await?;
        row.try_get::<i64, _>("n")
    }
}

fn stored_object(r: &db::sqlx::any::AnyRow) -> Result<StoredObject, db::sqlx::Error> {
    Ok(StoredObject {
        object_key: r.try_get("object_key")?,
        size: r.try_get::<i64, _>("size")?.max(0) as u64,
        checksum: r.try_get("checksum")?,
    })
}

fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}
