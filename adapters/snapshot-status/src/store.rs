//! Collection and product state: every change is one atomic statement (or one
//! transaction), so several instances never lose or double-count an update.

use db::{AnyPool, Row};
use serde::Serialize;

use crate::message::StatusMessage;

/// Migrations embedded in the binary.
pub static MIGRATOR: db::Migrator = db::sqlx::migrate!("./migrations");

/// Database failures (all transient for a message): the shared database error.
pub type StoreError = db::DbError;

/// A collection row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Collection {
    /// Snapshot run id.
    pub correlation_id: String,
    /// Collection name.
    pub collection_name: String,
    /// `Pending|Exported|Sent|Received|Success`.
    pub status: String,
    /// Reported by the exporter.
    pub files_exported: Option<i64>,
    /// Reported by the sender.
    pub files_sent: Option<i64>,
    /// Distinct files received so far.
    pub files_received: i64,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// `shutdown_flag` of the last file counted, if any file was.
    pub shutdown_flag: Option<String>,
    /// `reprocess_files` of the last file counted, if any file was.
    pub reprocess_files: Option<String>,
}

impl Collection {
    /// The count the collection waits for: `files_sent` once known, else `files_exported`.
    pub fn files_expected(&self) -> Option<i64> {
        self.files_sent.or(self.files_exported)
    }
}

/// What recording a received file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOutcome {
    /// The collection after the change.
    pub collection: Collection,
    /// False when the file had been counted before (redelivery).
    pub counted: bool,
    /// This file moved the collection to Received (now, or on its first delivery).
    pub triggered_received: bool,
}

/// The state store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// PostgreSQL (else SQLite): the few statements whose fast form differs.
    postgres: bool,
}

/// How a completed product names what completed it: the collection and the message
/// whose success file did (the sender may send that file again, in another message).
fn completer(collection: &str, message_key: &str) -> String {
    format!("{collection}\n{message_key}")
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

const COLS: &str = "correlation_id, collection_name, status, files_exported, files_sent, \
                    files_received, updated_at, shutdown_flag, reprocess_files";

fn row_to_collection(r: &db::sqlx::any::AnyRow) -> Result<Collection, db::sqlx::Error> {
    Ok(Collection {
        correlation_id: r.try_get("correlation_id")?,
        collection_name: r.try_get("collection_name")?,
        status: r.try_get("status")?,
        files_exported: r.try_get("files_exported")?,
        files_sent: r.try_get("files_sent")?,
        files_received: r.try_get("files_received")?,
        updated_at: r.try_get("updated_at")?,
        shutdown_flag: r.try_get("shutdown_flag")?,
        reprocess_files: r.try_get("reprocess_files")?,
    })
}

type Tx<'a> = db::WriteTx;

/// Serialises the product changes of run `correlation_id` on PostgreSQL until the
/// transaction ends: a product marked complete by one replica while another adds a
/// collection to the run must end either with the product reopened or never marked (each
/// statement reads what committed before it, so without the lock both could miss the
/// other). SQLite runs one writing transaction at a time already.
async fn lock_run(tx: &mut Tx<'_>, correlation_id: &str) -> Result<(), db::sqlx::Error> {
    if tx.backend_name().eq_ignore_ascii_case("postgresql") {
        db::sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(correlation_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Keeps run `correlation_id` from being pruned until the transaction ends, and tells
/// whether a prune deleted it already (then nothing of it may be recorded: its collection
/// would start over as one that never completes). On PostgreSQL a shared lock, taken before
/// [`lock_run`], which the prune takes exclusively ([`lock_run_for_prune`]): runs' messages
/// still commit side by side, and a prune waits for those in flight and then sees them —
/// without it a prune decided on what had committed, then deleted a collection a file had
/// just updated (its `DELETE` waited for that row, then removed it), after that file's
/// message had been answered. The check reads after the lock, so a message behind a prune
/// finds the run pruned. SQLite runs one writing transaction at a time already.
async fn hold_run(tx: &mut Tx<'_>, correlation_id: &str) -> Result<bool, db::sqlx::Error> {
    if tx.backend_name().eq_ignore_ascii_case("postgresql") {
        db::sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 1))")
            .bind(correlation_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(
        db::sqlx::query("SELECT 1 FROM pruned_runs WHERE correlation_id = $1")
            .bind(correlation_id)
            .fetch_optional(&mut **tx)
            .await?
            .is_some(),
    )
}

/// The prune's side of [`hold_run`]: waits for every message of run `correlation_id` in
/// flight, keeps new ones out until the transaction ends, then takes [`lock_run`] (always
/// in that order, as every holder of both does).
async fn lock_run_for_prune(tx: &mut Tx<'_>, correlation_id: &str) -> Result<(), db::sqlx::Error> {
    if tx.backend_name().eq_ignore_ascii_case("postgresql") {
        db::sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))")
            .bind(correlation_id)
            .execute(&mut **tx)
            .await?;
    }
    lock_run(tx, correlation_id).await
}

/// Reopens the product of `c`'s run if it was marked RECEIVED or COMPLETED while `c`, which
/// this transaction `inserted`, is not Received yet (or COMPLETED while `c` is not Success:
/// an empty collection is Received at once): a collection first heard of after
/// every other collection of the run had arrived (the sender sends collections one after
/// another). Only the transaction that added the collection can find the product marked
/// without it, so only that one takes the run's lock: a run's files keep committing side
/// by side. The product then moves
/// again, and the monitoring message goes out again, when this collection gets there too,
/// as the original lambda did; before, the product stayed COMPLETED with a collection
/// still in flight and its real end was never announced.
async fn reopen_product(
    tx: &mut Tx<'_>,
    c: &Collection,
    inserted: bool,
) -> Result<(), db::sqlx::Error> {
    if !inserted || c.status == "Success" {
        return Ok(());
    }
    lock_run(tx, &c.correlation_id).await?;
    // A new collection Received at once (its count was 0) leaves a RECEIVED run as it is,
    // but not a COMPLETED one: that one is not Success yet.
    let only_completed = if c.status == "Received" {
        " AND status = 'COMPLETED'"
    } else {
        ""
    };
    let reopened = db::sqlx::query(&format!(
        "DELETE FROM snapshot_products WHERE correlation_id = $1{only_completed} RETURNING status"
    ))
    .bind(&c.correlation_id)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(r) = reopened {
        let was: String = r.try_get("status")?;
        tracing::warn!(
            correlation_id = %framework::telemetry::LogText(&c.correlation_id),
            collection = %framework::telemetry::LogText(&c.collection_name),
            was = %was,
            "a collection arrived after its run was marked {was}: the run is open again"
        );
    }
    Ok(())
}

/// One collection, by run (`$1`) and name (`$2`).
fn one_collection() -> String {
    format!(
        "SELECT {COLS} FROM snapshot_collections WHERE correlation_id = $1 AND collection_name = $2"
    )
}

/// A collection of run `$1` not yet Received: what stops the product being RECEIVED. Read
/// through the partial index `snapshot_collections_not_received` (migration 0004).
const NOT_RECEIVED: &str = "SELECT 1 FROM snapshot_collections \
    WHERE correlation_id = $1 AND status NOT IN ('Received', 'Success')";

/// Deletes a batch of the received files of run `$1`, each row found by its own place:
/// by `file_key` alone (the middle of the key left out) each batch read every row the run
/// had left — a run of millions of files took hours, its batches past the statement's
/// bound, and every prune after it stopped there.
fn delete_files_batch(postgres: bool) -> String {
    // SQLite's list is the subquery itself: in another pair of parentheses it would be a
    // scalar, its first row only (one file deleted per statement).
    let (id, open, close) = match postgres {
        true => ("ctid", "= ANY(ARRAY(", "))"),
        false => ("rowid", "IN (", ")"),
    };
    format!(
        "DELETE FROM snapshot_received_files WHERE {id} {open}\
         SELECT {id} FROM snapshot_received_files WHERE correlation_id = $1 LIMIT {}{close}",
        db::DELETE_BATCH
    )
}

/// A collection of run `$1` not yet Success: what stops the product being COMPLETED
/// (partial index `snapshot_collections_not_success`).
const NOT_SUCCESS: &str =
    "SELECT 1 FROM snapshot_collections WHERE correlation_id = $1 AND status <> 'Success'";

impl Store {
    /// Opens (and migrates) the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            pool: db::connect(url, &MIGRATOR).await?,
            postgres: db::is_postgres(url),
        })
    }

    /// Opens the database at `url` to read it as it is (no migrations): the `status`
    /// command.
    pub async fn open_read_only(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            pool: db::connect_read_only(url).await?,
            postgres: db::is_postgres(url),
        })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// All collections of a correlation id, by name.
    pub async fn collections(&self, correlation_id: &str) -> Result<Vec<Collection>, StoreError> {
        let sql = format!(
            "SELECT {COLS} FROM snapshot_collections WHERE correlation_id = $1 ORDER BY collection_name"
        );
        let rows = db::sqlx::query(&sql)
            .bind(correlation_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(row_to_collection)
            .collect::<Result<_, _>>()?)
    }

    /// One collection.
    pub async fn collection(
        &self,
        correlation_id: &str,
        name: &str,
    ) -> Result<Option<Collection>, StoreError> {
        let row = db::sqlx::query(&one_collection())
            .bind(correlation_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(row_to_collection).transpose()?)
    }

    /// The product status of a correlation id (`RECEIVED`, `COMPLETED`), if any.
    pub async fn product_status(&self, correlation_id: &str) -> Result<Option<String>, StoreError> {
        let row = db::sqlx::query("SELECT status FROM snapshot_products WHERE correlation_id = $1")
            .bind(correlation_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("status")?),
            None => None,
        })
    }

    /// The collection of `m` as `tx` sees it, if there is one.
    async fn find(tx: &mut Tx<'_>, m: &StatusMessage) -> Result<Option<Collection>, StoreError> {
        let row = db::sqlx::query(&one_collection())
            .bind(&m.correlation_id)
            .bind(&m.collection_name)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(row.as_ref().map(row_to_collection).transpose()?)
    }

    /// The collection of `m`, which `tx` has just written.
    async fn fetch(tx: &mut Tx<'_>, m: &StatusMessage) -> Result<Collection, StoreError> {
        Self::find(tx, m)
            .await?
            .ok_or_else(|| db::sqlx::Error::RowNotFound.into())
    }

    /// Exported/Sent → Received when enough files arrived; true if this call moved it.
    async fn try_receive(tx: &mut Tx<'_>, m: &StatusMessage) -> Result<bool, StoreError> {
        let row = db::sqlx::query(
            "UPDATE snapshot_collections SET status = 'Received', updated_at = $3 \
             WHERE correlation_id = $1 AND collection_name = $2 AND status IN ('Exported', 'Sent') \
             AND COALESCE(files_sent, files_exported) IS NOT NULL \
             AND files_received >= COALESCE(files_sent, files_exported) RETURNING status",
        )
        .bind(&m.correlation_id)
        .bind(&m.collection_name)
        .bind(now())
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }

    /// Records `files_exported` / `files_sent` of the counts message `key`; returns the
    /// collection, whether it became Received now, and whether this message made it
    /// Received (now, or on an earlier delivery whose export-state message may have been
    /// lost). None: the run was pruned, nothing recorded.
    pub async fn record_counts(
        &self,
        m: &StatusMessage,
        key: &str,
    ) -> Result<Option<(Collection, bool, bool)>, StoreError> {
        let mut tx = db::begin_write(&self.pool).await?;
        if hold_run(&mut tx, &m.correlation_id).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let existed = db::sqlx::query(
            "SELECT 1 FROM snapshot_collections WHERE correlation_id = $1 AND collection_name = $2",
        )
        .bind(&m.correlation_id)
        .bind(&m.collection_name)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        let initial = if m.files_sent.is_some() {
            "Sent"
        } else {
            "Exported"
        };
        db::sqlx::query(
            "INSERT INTO snapshot_collections (correlation_id, collection_name, status, \
             files_exported, files_sent, files_received, snapshot_type, export_date, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8) \
             ON CONFLICT (correlation_id, collection_name) DO UPDATE SET \
             files_exported = COALESCE(excluded.files_exported, snapshot_collections.files_exported), \
             files_sent = COALESCE(excluded.files_sent, snapshot_collections.files_sent), \
             status = CASE \
               WHEN snapshot_collections.status IN ('Pending', 'Exported') \
                    AND excluded.files_sent IS NOT NULL THEN 'Sent' \
               WHEN snapshot_collections.status = 'Pending' THEN 'Exported' \
               ELSE snapshot_collections.status END, \
             updated_at = excluded.updated_at",
        )
        .bind(&m.correlation_id)
        .bind(&m.collection_name)
        .bind(initial)
        .bind(m.files_exported)
        .bind(m.files_sent)
        .bind(&m.snapshot_type)
        .bind(&m.export_date)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        let moved = Self::try_receive(&mut tx, m).await?;
        let triggered = if moved {
            db::sqlx::query(
                "UPDATE snapshot_collections SET received_by = $3 \
                 WHERE correlation_id = $1 AND collection_name = $2",
            )
            .bind(&m.correlation_id)
            .bind(&m.collection_name)
            .bind(key)
            .execute(&mut *tx)
            .await?;
            true
        } else {
            let row = db::sqlx::query(
                "SELECT received_by FROM snapshot_collections \
                 WHERE correlation_id = $1 AND collection_name = $2",
            )
            .bind(&m.correlation_id)
            .bind(&m.collection_name)
            .fetch_one(&mut *tx)
            .await?;
            row.try_get::<Option<String>, _>("received_by")?.as_deref() == Some(key)
        };
        let c = Self::fetch(&mut tx, m).await?;
        reopen_product(&mut tx, &c, !existed).await?;
        tx.commit().await?;
        Ok(Some((c, moved, triggered)))
    }

    /// Counts a received file once per `file_key`, moving the collection to Received
    /// when it reaches its expected count.
    /// `message_key` names the message itself (a file sent again comes in another one):
    /// only the message that moved the collection is told it did, when it comes again.
    /// None: the run was pruned, nothing recorded.
    pub async fn record_file(
        &self,
        m: &StatusMessage,
        file_key: &str,
        message_key: &str,
    ) -> Result<Option<FileOutcome>, StoreError> {
        let trigger = format!("received by {message_key}");
        let mut tx = db::begin_write(&self.pool).await?;
        if hold_run(&mut tx, &m.correlation_id).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        // After the lock: a prune waiting for this message compares its cutoff with this.
        let t = now();
        // A file may arrive before its collection's counts: the collection starts Pending.
        let inserted = db::sqlx::query(
            "INSERT INTO snapshot_collections (correlation_id, collection_name, status, \
             files_exported, files_sent, files_received, snapshot_type, export_date, updated_at) \
             VALUES ($1, $2, 'Pending', NULL, NULL, 0, $3, $4, $5) \
             ON CONFLICT (correlation_id, collection_name) DO NOTHING",
        )
        .bind(&m.correlation_id)
        .bind(&m.collection_name)
        .bind(&m.snapshot_type)
        .bind(&m.export_date)
        .bind(&t)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let counted = db::sqlx::query(
            "INSERT INTO snapshot_received_files (correlation_id, collection_name, file_key, received_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (correlation_id, collection_name, file_key) DO NOTHING \
             RETURNING file_key",
        )
        .bind(&m.correlation_id)
        .bind(&m.collection_name)
        .bind(file_key)
        .bind(&t)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        let triggered_received = if counted {
            // The flags travel with the files: keep them for the export-state message, which
            // the counts message may trigger later with its own (default) values.
            db::sqlx::query(
                "UPDATE snapshot_collections SET files_received = files_received + 1, updated_at = $3, \
                 shutdown_flag = $4, reprocess_files = $5 \
                 WHERE correlation_id = $1 AND collection_name = $2",
            )
            .bind(&m.correlation_id)
            .bind(&m.collection_name)
            .bind(&t)
            .bind(&m.shutdown_flag)
            .bind(&m.reprocess_files)
            .execute(&mut *tx)
            .await?;
            let moved = Self::try_receive(&mut tx, m).await?;
            if moved {
                db::sqlx::query(
                    "UPDATE snapshot_received_files SET triggered = $4 \
                     WHERE correlation_id = $1 AND collection_name = $2 AND file_key = $3",
                )
                .bind(&m.correlation_id)
                .bind(&m.collection_name)
                .bind(file_key)
                .bind(&trigger)
                .execute(&mut *tx)
                .await?;
            }
            moved
        } else {
            let row = db::sqlx::query(
                "SELECT triggered FROM snapshot_received_files \
                 WHERE correlation_id = $1 AND collection_name = $2 AND file_key = $3",
            )
            .bind(&m.correlation_id)
            .bind(&m.collection_name)
            .bind(file_key)
            .fetch_one(&mut *tx)
            .await?;
            // `received`: written before the message was named (any copy counts as it).
            let by = row.try_get::<Option<String>, _>("triggered")?;
            matches!(by.as_deref(), Some(t) if t == "received" || t == trigger)
        };
        let collection = Self::fetch(&mut tx, m).await?;
        reopen_product(&mut tx, &collection, inserted).await?;
        tx.commit().await?;
        Ok(Some(FileOutcome {
            collection,
            counted,
            triggered_received,
        }))
    }

    /// Received/Sent → Success; returns the collection (None if unknown) and whether
    /// this call moved it. None: the run was pruned, nothing recorded.
    pub async fn record_success(
        &self,
        m: &StatusMessage,
    ) -> Result<Option<(Option<Collection>, bool)>, StoreError> {
        let mut tx = db::begin_write(&self.pool).await?;
        if hold_run(&mut tx, &m.correlation_id).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let sql = format!(
            "UPDATE snapshot_collections SET status = 'Success', updated_at = $3 \
             WHERE correlation_id = $1 AND collection_name = $2 AND status IN ('Received', 'Sent') \
             RETURNING {COLS}"
        );
        let row = db::sqlx::query(&sql)
            .bind(&m.correlation_id)
            .bind(&m.collection_name)
            .bind(now())
            .fetch_optional(&mut *tx)
            .await?;
        let recorded = match row {
            Some(r) => (Some(row_to_collection(&r)?), true),
            None => (Self::find(&mut tx, m).await?, false),
        };
        tx.commit().await?;
        Ok(Some(recorded))
    }

    /// Sets the product status to RECEIVED if every collection is Received or Success
    /// (never downgrades COMPLETED), naming `collection` and the message (`message_key`)
    /// that did it; true if this call changed it.
    pub async fn mark_product_received(
        &self,
        correlation_id: &str,
        collection: &str,
        message_key: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = db::begin_write(&self.pool).await?;
        // A run pruned since its message was recorded gets no product row back.
        if hold_run(&mut tx, correlation_id).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        lock_run(&mut tx, correlation_id).await?;
        let row = db::sqlx::query(
            &format!("INSERT INTO snapshot_products (correlation_id, status, updated_at, received_by) \
             SELECT $1, 'RECEIVED', $2, $3 WHERE NOT EXISTS ({NOT_RECEIVED}) \
             ON CONFLICT (correlation_id) DO UPDATE SET status = 'RECEIVED', updated_at = excluded.updated_at, \
             received_by = excluded.received_by \
             WHERE snapshot_products.status NOT IN ('RECEIVED', 'COMPLETED') RETURNING status"),
        )
        .bind(correlation_id)
        .bind(now())
        .bind(completer(collection, message_key))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.is_some())
    }

    /// Deletes every run COMPLETED more than `older_than` ago — its product status, its
    /// collections and its received files — a run at a time, its files in batches; how
    /// many runs.
    pub async fn prune_completed_runs(
        &self,
        older_than: std::time::Duration,
    ) -> Result<u64, StoreError> {
        self.prune_runs(Prunable::Completed, older_than).await
    }

    /// Deletes every run not COMPLETED that heard nothing for `idle_for` (an export given
    /// up on, a correlation id nobody finishes): without it, each such run's row per file
    /// stayed for as long as the database did. How many runs.
    pub async fn prune_idle_runs(&self, idle_for: std::time::Duration) -> Result<u64, StoreError> {
        self.prune_runs(Prunable::Idle, idle_for).await
    }

    async fn prune_runs(
        &self,
        which: Prunable,
        older_than: std::time::Duration,
    ) -> Result<u64, StoreError> {
        // An age past what the clock can subtract (years beyond chrono's range): nothing.
        let Some(cutoff) = chrono::TimeDelta::from_std(older_than)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        else {
            return Ok(0);
        };
        let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let still = which.condition("$1", "$2");
        // Left for the next prune if it fails: the runs due now are pruned all the same.
        if let Err(e) = self.delete_files_of_pruned_runs().await {
            tracing::warn!(error = %e, "the received files of pruned runs were not all deleted; the next prune goes on");
        }
        let mut pruned = 0;
        loop {
            // Every statement bounded: the housekeeping task waiting for ever on a server
            // that stopped answering would never prune again (nothing logs it).
            let runs: Vec<String> = db::bounded(
                db::sqlx::query(&which.candidates())
                    .bind(&cutoff)
                    .fetch_all(&self.pool),
            )
            .await?
            .iter()
            .map(|r| r.try_get("correlation_id"))
            .collect::<Result<_, _>>()?;
            if runs.is_empty() {
                return Ok(pruned);
            }
            for run in runs {
                // Decided first, under the run's lock, and its files deleted after: deleted
                // before the decision (in batches, outside the lock), a file of the run
                // arriving meanwhile (a dead letter replayed) found its row gone and was
                // counted a second time, and that message kept the run alive with a count
                // past its files — a collection Received before all of them had come.
                let gone = db::bounded(async {
                    let mut tx = db::begin_write(&self.pool).await?;
                    lock_run_for_prune(&mut tx, &run).await?;
                    // Still to be deleted: a message heard of meanwhile (a collection that
                    // reopened a completed run, a file of an idle one) keeps it.
                    let gone = db::sqlx::query(&format!("SELECT 1 AS one WHERE {still}"))
                        .bind(&run)
                        .bind(&cutoff)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_some();
                    if gone {
                        for table in ["snapshot_products", "snapshot_collections"] {
                            db::sqlx::query(&format!(
                                "DELETE FROM {table} WHERE correlation_id = $1"
                            ))
                            .bind(&run)
                            .execute(&mut *tx)
                            .await?;
                        }
                        db::sqlx::query(
                            "INSERT INTO pruned_runs (correlation_id, pruned_at) VALUES ($1, $2) \
                             ON CONFLICT (correlation_id) DO NOTHING",
                        )
                        .bind(&run)
                        .bind(now())
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    Ok::<_, StoreError>(gone)
                })
                .await?;
                if gone {
                    self.delete_files_of(&run).await?;
                    pruned += 1;
                }
            }
        }
    }

    /// Deletes the received files of pruned runs left by a prune that stopped before it
    /// had deleted them all (the process ended between its batches); how many runs.
    async fn delete_files_of_pruned_runs(&self) -> Result<u64, StoreError> {
        let mut runs = 0;
        loop {
            let left: Vec<String> = db::bounded(
                db::sqlx::query(
                    "SELECT p.correlation_id FROM pruned_runs p WHERE EXISTS (SELECT 1 FROM \
                     snapshot_received_files f WHERE f.correlation_id = p.correlation_id) \
                     LIMIT 100",
                )
                .fetch_all(&self.pool),
            )
            .await?
            .iter()
            .map(|r| r.try_get("correlation_id"))
            .collect::<Result<_, _>>()?;
            if left.is_empty() {
                return Ok(runs);
            }
            for run in left {
                self.delete_files_of(&run).await?;
                runs += 1;
            }
        }
    }

    /// Deletes the received files of pruned run `run`, a batch per transaction: a run of
    /// millions of files never holds the writer for long (on SQLite, every handler waits
    /// for it). Its messages are dropped meanwhile (`was_pruned`): none adds a file.
    async fn delete_files_of(&self, run: &str) -> Result<(), StoreError> {
        let sql = delete_files_batch(self.postgres);
        loop {
            // Every statement bounded: the housekeeping task waiting for ever on a server
            // that stopped answering would never prune again (nothing logs it).
            let n = db::bounded(db::sqlx::query(&sql).bind(run).execute(&self.pool))
                .await?
                .rows_affected();
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Whether run `correlation_id` was completed and then deleted past its keeping.
    pub async fn was_pruned(&self, correlation_id: &str) -> Result<bool, StoreError> {
        Ok(
            db::sqlx::query("SELECT 1 FROM pruned_runs WHERE correlation_id = $1")
                .bind(correlation_id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Whether the message `message_key` of `collection` made the product RECEIVED (it may
    /// be COMPLETED since: a run whose success file came before the retry of the message
    /// that made it RECEIVED lost that message's refused "all received" alert).
    pub async fn received_by(
        &self,
        correlation_id: &str,
        collection: &str,
        message_key: &str,
    ) -> Result<bool, StoreError> {
        let by = self
            .product_named_by(correlation_id, &["RECEIVED", "COMPLETED"], "received_by")
            .await?;
        Ok(by.is_some_and(|b| b == completer(collection, message_key)))
    }

    /// Who the product's `column` names, while its status is one of `statuses` (names of
    /// this module's, never input).
    async fn product_named_by(
        &self,
        correlation_id: &str,
        statuses: &[&'static str],
        column: &str,
    ) -> Result<Option<String>, StoreError> {
        let listed = statuses
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let row = db::sqlx::query(&format!(
            "SELECT {column} FROM snapshot_products WHERE correlation_id = $1 \
             AND status IN ({listed})"
        ))
        .bind(correlation_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => r.try_get(column)?,
            None => None,
        })
    }

    /// Sets the product status to COMPLETED if every collection is Success, naming
    /// `collection` and the message (`message_key`) whose success file did it; true if this
    /// call changed it.
    pub async fn mark_product_completed(
        &self,
        correlation_id: &str,
        collection: &str,
        message_key: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = db::begin_write(&self.pool).await?;
        // A run pruned since its message was recorded gets no product row back.
        if hold_run(&mut tx, correlation_id).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        lock_run(&mut tx, correlation_id).await?;
        let row = db::sqlx::query(&format!(
            "INSERT INTO snapshot_products (correlation_id, status, updated_at, completed_by) \
             SELECT $1, 'COMPLETED', $2, $3 WHERE NOT EXISTS ({NOT_SUCCESS}) \
             ON CONFLICT (correlation_id) DO UPDATE SET status = 'COMPLETED', \
             updated_at = excluded.updated_at, completed_by = excluded.completed_by \
             WHERE snapshot_products.status <> 'COMPLETED' RETURNING status"
        ))
        .bind(correlation_id)
        .bind(now())
        .bind(completer(collection, message_key))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.is_some())
    }

    /// Whether the product is completed and the success file of `collection` in the
    /// message `message_key` completed it (a product completed before messages were named
    /// in it: any success file of that collection).
    pub async fn completed_by(
        &self,
        correlation_id: &str,
        collection: &str,
        message_key: &str,
    ) -> Result<bool, StoreError> {
        let by = self
            .product_named_by(correlation_id, &["COMPLETED"], "completed_by")
            .await?;
        Ok(matches!(by, Some(b) if b == collection || b == completer(collection, message_key)))
    }
}

/// Which runs a prune deletes.
#[derive(Debug, Clone, Copy)]
enum Prunable {
    /// COMPLETED before the cutoff.
    Completed,
    /// Not COMPLETED, and nothing of it heard of since the cutoff.
    Idle,
}

impl Prunable {
    /// SQL that is true while run `run` (an SQL expression) is to be deleted, given the
    /// cutoff time `cut` (a parameter). A file counted updates its collection's time, so a
    /// run's collections say when it was last heard of.
    fn condition(self, run: &str, cut: &str) -> String {
        match self {
            Prunable::Completed => format!(
                "EXISTS (SELECT 1 FROM snapshot_products p WHERE p.correlation_id = {run} \
                 AND p.status = 'COMPLETED' AND p.updated_at < {cut})"
            ),
            Prunable::Idle => format!(
                "NOT EXISTS (SELECT 1 FROM snapshot_products p WHERE p.correlation_id = {run} \
                 AND (p.status = 'COMPLETED' OR p.updated_at >= {cut})) \
                 AND NOT EXISTS (SELECT 1 FROM snapshot_collections x \
                 WHERE x.correlation_id = {run} AND x.updated_at >= {cut})"
            ),
        }
    }

    /// A hundred runs to delete at most, the cutoff as `$1`: each run looked at once (not
    /// once per collection of it), with the same condition as [`Prunable::condition`], so
    /// a run left undeleted is not picked again.
    fn candidates(self) -> String {
        match self {
            Prunable::Completed => format!(
                "SELECT r.correlation_id FROM snapshot_products r WHERE {} LIMIT 100",
                self.condition("r.correlation_id", "$1")
            ),
            Prunable::Idle => "SELECT r.correlation_id FROM (SELECT correlation_id FROM \
                 snapshot_collections GROUP BY correlation_id HAVING MAX(updated_at) < $1) r \
                 WHERE NOT EXISTS (SELECT 1 FROM snapshot_products p \
                 WHERE p.correlation_id = r.correlation_id \
                 AND (p.status = 'COMPLETED' OR p.updated_at >= $1)) LIMIT 100"
                .to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Files of a run pruned by a prune that stopped between its batches of file deletions
    /// (the process ended) are deleted by the next prune; files of a run not pruned stay.
    #[tokio::test]
    async fn files_a_stopped_prune_left_are_deleted_by_the_next() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = Store::open(&url).await.expect("open");
        db::sqlx::query("INSERT INTO pruned_runs (correlation_id, pruned_at) VALUES ('gone', $1)")
            .bind(now())
            .execute(&store.pool)
            .await
            .expect("pruned");
        for (run, file) in [("gone", "a"), ("gone", "b"), ("live", "c")] {
            db::sqlx::query(
                "INSERT INTO snapshot_received_files (correlation_id, collection_name, \
                 file_key, received_at) VALUES ($1, 'db.x', $2, $3)",
            )
            .bind(run)
            .bind(file)
            .bind(now())
            .execute(&store.pool)
            .await
            .expect("file");
        }
        store
            .prune_idle_runs(std::time::Duration::from_secs(86_400))
            .await
            .expect("prune");
        let left = runs_with_files(&store).await;
        assert_eq!(left, ["live"]);
        store.close().await;
    }

    /// The run of each received file left, in table order.
    async fn runs_with_files(store: &Store) -> Vec<String> {
        db::sqlx::query("SELECT correlation_id FROM snapshot_received_files")
            .fetch_all(&store.pool)
            .await
            .expect("files")
            .iter()
            .map(|r| r.try_get("correlation_id").expect("id"))
            .collect()
    }

    fn status(v: serde_json::Value) -> StatusMessage {
        let mut base = serde_json::json!({"correlation_id": "run", "collection_name": "db.x",
            "snapshot_type": "incremental", "export_date": "2020-01-01"});
        if let (Some(o), serde_json::Value::Object(e)) = (base.as_object_mut(), v) {
            o.extend(e);
        }
        crate::message::parse_status(&base).expect("status message")
    }

    /// A run whose collection was last heard of long ago: idle past a day's keeping.
    async fn idle_run(store: &Store) {
        let counts = status(serde_json::json!({"files_exported": 5}));
        assert!(
            store
                .record_counts(&counts, "counts:1")
                .await
                .expect("counts")
                .is_some()
        );
        let first = status(serde_json::json!({"filename": "f1"}));
        assert!(
            store
                .record_file(&first, "file:f1", "m1")
                .await
                .expect("file")
                .is_some()
        );
        db::sqlx::query(
            "UPDATE snapshot_collections SET updated_at = '2000-01-01T00:00:00.000000Z'",
        )
        .execute(&store.pool)
        .await
        .expect("age");
    }

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

    /// A message of a run that a prune deleted after the handler looked (the handler's own
    /// check comes before the record's transaction) records nothing: before, its file or
    /// counts started the run over as a collection that never completes.
    async fn a_message_of_a_run_pruned_meanwhile_records_nothing(url: &str) {
        let store = Store::open(url).await.expect("open");
        idle_run(&store).await;
        assert_eq!(store.prune_idle_runs(DAY).await.expect("prune"), 1);
        let file = status(serde_json::json!({"filename": "f2"}));
        assert_eq!(
            store
                .record_file(&file, "file:f2", "m2")
                .await
                .expect("file"),
            None
        );
        let counts = status(serde_json::json!({"files_sent": 5}));
        assert!(
            store
                .record_counts(&counts, "counts:2")
                .await
                .expect("counts")
                .is_none()
        );
        let success = status(serde_json::json!({"filename": "_SUCCESS"}));
        assert!(
            store
                .record_success(&success)
                .await
                .expect("success")
                .is_none()
        );
        assert!(
            !store
                .mark_product_received("run", "db.x", "m3")
                .await
                .expect("received")
        );
        assert!(
            !store
                .mark_product_completed("run", "db.x", "m3")
                .await
                .expect("completed")
        );
        assert!(
            store
                .collections("run")
                .await
                .expect("collections")
                .is_empty()
        );
        assert_eq!(store.product_status("run").await.expect("product"), None);
        let files: i64 = db::sqlx::query("SELECT COUNT(*) AS n FROM snapshot_received_files")
            .fetch_one(&store.pool)
            .await
            .expect("files")
            .try_get("n")
            .expect("n");
        assert_eq!(files, 0);
        store.close().await;
    }

    /// Each batch of a pruned run's files is found by the rows' own places, not by a scan of
    /// every row the run has left (by `file_key` alone, the middle of the key left out).
    async fn a_pruned_runs_files_are_deleted_by_place(store: &Store, plan: &str, scanned: &[&str]) {
        let sql = delete_files_batch(store.postgres).replace("$1", "'run'");
        let mut conn = store.pool.acquire().await.expect("a connection");
        // An empty table is read whole whatever the statement (the cheapest way to read
        // nothing): the plan asked for is the one a table of millions of rows gets.
        if store.postgres {
            db::sqlx::query("SET enable_seqscan = off")
                .execute(&mut *conn)
                .await
                .expect("set");
        }
        let explained: Vec<String> = db::sqlx::query(&format!("{plan} {sql}"))
            .fetch_all(&mut *conn)
            .await
            .expect("plan")
            .iter()
            .map(|r| {
                (0..r.columns().len())
                    .filter_map(|i| r.try_get::<String, _>(i).ok())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let text = explained.join("\n");
        assert!(
            scanned.iter().all(|s| text.contains(s)),
            "{scanned:?}: {text}"
        );
        if store.postgres {
            db::sqlx::query("RESET enable_seqscan")
                .execute(&mut *conn)
                .await
                .expect("reset");
        }
        drop(conn);
        // And it works: one statement deletes a whole batch of a run's files (not one of
        // them), another run's stay.
        for (run, file) in [("run", "a"), ("run", "b"), ("run", "c"), ("other", "f")] {
            db::sqlx::query(
                "INSERT INTO snapshot_received_files (correlation_id, collection_name, file_key, received_at) \
                 VALUES ($1, 'db.x', $2, 'x')",
            )
            .bind(run)
            .bind(file)
            .execute(&store.pool)
            .await
            .expect("a file");
        }
        let once = db::sqlx::query(&delete_files_batch(store.postgres))
            .bind("run")
            .execute(&store.pool)
            .await
            .expect("a batch");
        assert_eq!(once.rows_affected(), 3, "the whole batch at once");
        idle_run(store).await;
        store.delete_files_of("run").await.expect("deleted");
        let left = runs_with_files(store).await;
        assert_eq!(left, ["other"]);
    }

    #[tokio::test]
    async fn a_pruned_runs_files_are_deleted_by_place_on_sqlite() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = Store::open(&url).await.expect("open");
        a_pruned_runs_files_are_deleted_by_place(
            &store,
            "EXPLAIN QUERY PLAN",
            &["(rowid=?)", "LIST SUBQUERY"],
        )
        .await;
        store.close().await;
    }

    #[tokio::test]
    async fn a_pruned_runs_files_are_deleted_by_place_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.expect("postgres");
        let store = Store::open(&pg.url).await.expect("open");
        a_pruned_runs_files_are_deleted_by_place(&store, "EXPLAIN", &["Tid Scan"]).await;
        store.close().await;
        pg.drop_db().await.expect("drop");
    }

    #[tokio::test]
    async fn a_message_of_a_run_pruned_meanwhile_records_nothing_on_sqlite() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        a_message_of_a_run_pruned_meanwhile_records_nothing(&url).await;
    }

    #[tokio::test]
    async fn a_message_of_a_run_pruned_meanwhile_records_nothing_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.expect("postgres");
        a_message_of_a_run_pruned_meanwhile_records_nothing(&pg.url).await;
        pg.drop_db().await.expect("drop");
    }

    /// On PostgreSQL a prune of an idle run waits for a file of that run being recorded
    /// (held in its transaction right after it updated the collection, by a trigger that
    /// waits for a lock this test holds), then sees it and keeps the run. Before, the prune
    /// decided on what had committed, its delete waited for the collection's row and then
    /// deleted it: the file's message was answered, and the run it had just revived was gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_waits_for_a_file_being_recorded_and_keeps_its_run() {
        let pg = db::testing::TempPostgres::create().await.expect("postgres");
        let store = Store::open(&pg.url).await.expect("open");
        idle_run(&store).await;
        let holder = db::testing::hold_writes(
            &store.pool,
            "snapshot_collections",
            "AFTER UPDATE",
            "ROW",
            "true",
        )
        .await
        .expect("hold");
        let recording = tokio::spawn({
            let store = store.clone();
            async move {
                let file = status(serde_json::json!({"filename": "f2"}));
                store.record_file(&file, "file:f2", "m2").await
            }
        });
        let until_waiting = |n: i64| {
            let pool = store.pool.clone();
            framework::testing::within(Duration::from_secs(60), "sessions waiting", async move {
                while db::testing::sessions_waiting(&pool).await.expect("locks") < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        until_waiting(1).await;
        let pruning = tokio::spawn({
            let store = store.clone();
            async move { store.prune_idle_runs(DAY).await }
        });
        until_waiting(2).await;
        holder.commit().await.expect("release");
        let limit = Duration::from_secs(60);
        let recorded = framework::testing::within(limit, "the record", recording).await;
        assert!(
            recorded
                .expect("join")
                .expect("record")
                .expect("open run")
                .counted
        );
        let pruned = framework::testing::within(limit, "the prune", pruning).await;
        assert_eq!(
            pruned.expect("join").expect("prune"),
            0,
            "the run was pruned"
        );
        let c = store
            .collection("run", "db.x")
            .await
            .expect("read")
            .expect("collection");
        assert_eq!(c.files_received, 2);
        store.close().await;
        pg.drop_db().await.expect("drop");
    }

    /// The product checks run every time a collection moves: they must read the run's open
    /// collections through their own index, not every collection of the run.
    #[tokio::test]
    async fn product_checks_read_only_the_open_collections() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = Store::open(&url).await.expect("open");
        for (query, index) in [
            (NOT_RECEIVED, "snapshot_collections_not_received"),
            (NOT_SUCCESS, "snapshot_collections_not_success"),
        ] {
            let plan: Vec<String> = db::sqlx::query(&format!("EXPLAIN QUERY PLAN {query}"))
                .bind("run")
                .fetch_all(&store.pool)
                .await
                .expect("plan")
                .iter()
                .map(|r| r.try_get::<String, _>(3).unwrap_or_default())
                .collect();
            assert!(plan.iter().any(|l| l.contains(index)), "{query}: {plan:?}");
        }
        store.close().await;
    }
}
